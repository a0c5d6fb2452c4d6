//! Tokens held by a mount, one per local uid (as with Coda's `clog`).
//!
//! `codafs login` hands a token to the mount daemon over its control socket; the daemon learns
//! the caller's uid from the socket (SO_PEERCRED), so a user can only ever set their own token, and
//! only that uid's writes use it. Tokens are kept in `<cache-dir>/tokens/<uid>` (mode 0600, in a
//! 0700 directory) so they survive a daemon restart until they expire. The daemon cannot verify a
//! token's signature (only servers hold the keys); it reads the claims for expiry and for friendlier
//! errors, and the servers check every request anyway.
//!
//! A token is refused unless it names the mount's own cluster, learned from the servers and kept
//! in `<cache-dir>/tokens/cluster`: `codafs login` hands the token to every mount on the host,
//! and a mount of another cluster must not pass it on to that cluster's servers.
use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use codafs_common::token::{peek, Claims};

/// Why a token was not accepted by the mount.
#[derive(Debug, thiserror::Error)]
pub enum TokenStoreError {
    #[error("not a codafs token")]
    Malformed,
    #[error("token expired")]
    Expired,
    #[error("token is for cluster {got}, this mount talks to {want}")]
    WrongCluster { got: String, want: String },
    #[error("saving the token: {0}")]
    Io(#[from] std::io::Error),
}

/// Tokens by local uid.
pub struct TokenTable {
    dir: Option<PathBuf>,
    map: RwLock<HashMap<u32, (String, Claims)>>,
    /// The id of the cluster this mount belongs to, once learned.
    cluster: RwLock<Option<String>>,
}

/// The file in the token directory that keeps the cluster id (not a uid, so never a token).
const CLUSTER_FILE: &str = "cluster";

/// Writes `dir/name` whole or not at all (a temporary file, synced, renamed over it), readable
/// by the daemon's user only.
fn save(dir: &Path, name: &str, contents: &str) -> Result<(), std::io::Error> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl TokenTable {
    /// An empty table that keeps nothing on disk (tests).
    pub fn in_memory() -> Self {
        TokenTable {
            dir: None,
            map: RwLock::new(HashMap::new()),
            cluster: RwLock::new(None),
        }
    }

    /// Loads the tokens saved in `dir`, dropping expired and unreadable ones.
    pub fn load(dir: &Path) -> Result<Self, std::io::Error> {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        let cluster = std::fs::read_to_string(dir.join(CLUSTER_FILE))
            .ok()
            .map(|c| c.trim().to_string())
            .filter(|c| !c.is_empty());
        let mut map = HashMap::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let Some(uid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let token = std::fs::read_to_string(entry.path()).unwrap_or_default();
            match peek(token.trim()) {
                Ok(c) if c.expires > now_s() && cluster.as_ref().is_none_or(|k| *k == c.cluster) => {
                    map.insert(uid, (token.trim().to_string(), c));
                }
                _ => {
                    tracing::info!(uid, "dropping an expired, unreadable or other cluster's saved token");
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        Ok(TokenTable {
            dir: Some(dir.to_path_buf()),
            map: RwLock::new(map),
            cluster: RwLock::new(cluster),
        })
    }

    /// The id of the cluster this mount belongs to, if learned.
    pub fn cluster(&self) -> Option<String> {
        self.cluster.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Records the cluster id the servers gave (and keeps it for the next start); tokens held
    /// for another cluster are dropped. It is known in memory even if it cannot be kept (the
    /// error says so): a full cache disk must not leave the mount refusing every login.
    pub fn learn_cluster(&self, id: &str) -> Result<(), std::io::Error> {
        if self.cluster().as_deref() == Some(id) {
            return Ok(());
        }
        *self.cluster.write().unwrap_or_else(|p| p.into_inner()) = Some(id.to_string());
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        map.retain(|uid, (_, c)| {
            let keep = c.cluster == id;
            if !keep {
                tracing::warn!(uid, token_cluster = %c.cluster, cluster = id, "dropping a token of another cluster");
                if let Some(dir) = &self.dir {
                    let _ = std::fs::remove_file(dir.join(uid.to_string()));
                }
            }
            keep
        });
        drop(map);
        if let Some(dir) = &self.dir {
            save(dir, CLUSTER_FILE, id)?;
        }
        Ok(())
    }

    /// Sets `uid`'s token (replacing any earlier one) and saves it. The token must be for
    /// `cluster`, else for the cluster this mount learned, if any.
    pub fn set(&self, uid: u32, token: &str, cluster: Option<&str>) -> Result<Claims, TokenStoreError> {
        let token = token.trim();
        let learned = self.cluster();
        let claims = Self::check(token, cluster.or(learned.as_deref()))?;
        if let Some(dir) = &self.dir {
            save(dir, &uid.to_string(), token)?;
        }
        self.map
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(uid, (token.to_string(), claims.clone()));
        Ok(claims)
    }

    /// What the mount can check of a token without the servers: its form, its expiry and (if
    /// given) its cluster. Returns its claims.
    pub fn check(token: &str, cluster: Option<&str>) -> Result<Claims, TokenStoreError> {
        let claims = peek(token.trim()).map_err(|_| TokenStoreError::Malformed)?;
        if claims.expires <= now_s() {
            return Err(TokenStoreError::Expired);
        }
        if let Some(want) = cluster {
            if claims.cluster != want {
                return Err(TokenStoreError::WrongCluster {
                    got: claims.cluster,
                    want: want.to_string(),
                });
            }
        }
        Ok(claims)
    }

    /// Forgets `uid`'s token; returns whether there was one.
    pub fn remove(&self, uid: u32) -> bool {
        self.remove_of(uid, None)
    }

    /// Forgets `uid`'s token if it is for cluster `of_cluster` (any, if None), expired or not;
    /// returns whether it did.
    pub fn remove_of(&self, uid: u32, of_cluster: Option<&str>) -> bool {
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        if of_cluster.is_some_and(|c| map.get(&uid).is_none_or(|(_, claims)| claims.cluster != c)) {
            return false;
        }
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_file(dir.join(uid.to_string()));
        }
        map.remove(&uid).is_some()
    }

    /// `uid`'s token and claims, if it has one that has not expired.
    pub fn get(&self, uid: u32) -> Option<(String, Claims)> {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        map.get(&uid).filter(|(_, c)| c.expires > now_s()).cloned()
    }

    /// Every unexpired token held, with its claims, ordered by uid.
    pub fn all(&self) -> Vec<(String, Claims)> {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = map.iter().filter(|(_, (_, c))| c.expires > now_s()).collect();
        v.sort_by_key(|(uid, _)| **uid);
        v.into_iter().map(|(_, t)| t.clone()).collect()
    }

    /// (uid, user, expiry) of every token held, for `status`.
    pub fn list(&self) -> Vec<(u32, String, u64)> {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = map.iter().map(|(u, (_, c))| (*u, c.user.clone(), c.expires)).collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use codafs_common::token::{sign, Role};

    fn token(user: &str, expires: u64) -> String {
        sign(
            &Claims {
                user: user.into(),
                role: Role::User,
                cluster: "c1".into(),
                key_id: 1,
                expires,
                generation: 0,
            },
            &[7; 32],
        )
    }

    #[test]
    fn tokens_survive_a_restart_and_expired_ones_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let t = TokenTable::load(dir.path()).unwrap();
        t.set(1000, &token("alice", now_s() + 3600), Some("c1")).unwrap();
        assert!(matches!(
            t.set(1001, &token("bob", now_s() - 1), None),
            Err(TokenStoreError::Expired)
        ));
        assert!(matches!(
            t.set(1002, &token("carol", now_s() + 3600), Some("other")),
            Err(TokenStoreError::WrongCluster { .. })
        ));
        assert!(matches!(t.set(1003, "nonsense", None), Err(TokenStoreError::Malformed)));
        let mode = std::fs::metadata(dir.path().join("1000")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let again = TokenTable::load(dir.path()).unwrap();
        assert_eq!(again.get(1000).map(|(_, c)| c.user), Some("alice".into()));
        assert!(again.get(1001).is_none() && again.get(0).is_none());
        assert!(again.remove(1000));
        assert!(TokenTable::load(dir.path()).unwrap().get(1000).is_none());
    }

    /// `codafs logout` names the cluster of the token it removed: a mount keeps a token of
    /// another cluster, and drops its own cluster's even once expired.
    #[test]
    fn a_logout_for_another_cluster_keeps_the_token() {
        let dir = tempfile::tempdir().unwrap();
        let t = TokenTable::load(dir.path()).unwrap();
        t.set(1000, &token("alice", now_s() + 3600), None).unwrap();
        assert!(!t.remove_of(1000, Some("c2")));
        assert!(t.get(1000).is_some() && dir.path().join("1000").exists());
        assert!(!t.remove_of(1001, Some("c1")), "nothing held for that uid");
        assert!(t.remove_of(1000, Some("c1")));
        assert!(t.get(1000).is_none() && !dir.path().join("1000").exists());
    }

    /// Once the mount knows its cluster, another cluster's token is refused without a server
    /// seeing it, one held already is dropped, and the cluster is known again after a restart.
    #[test]
    fn a_learned_cluster_refuses_other_clusters_tokens_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let t = TokenTable::load(dir.path()).unwrap();
        assert_eq!(t.cluster(), None);
        t.set(1000, &token("alice", now_s() + 3600), None).unwrap();
        t.learn_cluster("c2").unwrap();
        assert!(t.get(1000).is_none(), "a token of cluster c1 is dropped");
        assert!(!dir.path().join("1000").exists());
        assert!(matches!(
            t.set(1000, &token("alice", now_s() + 3600), None),
            Err(TokenStoreError::WrongCluster { .. })
        ));
        let again = TokenTable::load(dir.path()).unwrap();
        assert_eq!(again.cluster().as_deref(), Some("c2"));
        assert!(again.set(1000, &token("alice", now_s() + 3600), None).is_err());
        again.learn_cluster("c1").unwrap();
        again.set(1000, &token("alice", now_s() + 3600), None).unwrap();
        assert_eq!(
            TokenTable::load(dir.path()).unwrap().get(1000).map(|(_, c)| c.user),
            Some("alice".into())
        );
    }
}
