//! Bytes each account stored on this server that no volume references yet.
//!
//! They count against the account's quota headroom until a commit references them or
//! [`PENDING_TTL`] passes, so a writer cannot fill the servers' disks with blobs it never
//! commits. Kept in memory per server: a restart forgets it, and garbage collection removes what
//! is never referenced.
//!
//! A store reserves its charge before it writes anything (so concurrent stores cannot all slip
//! under the headroom) and keeps it only once its content is verified and stored here: a
//! [`Charge`] dropped without [`Charge::keep`] takes its entries back. A refused or corrupt
//! store therefore leaves no trace, and since a full account is refused rather than trimmed,
//! no flood of stores can push real charges out.
use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use codafs_common::Hash;

use crate::node::NodeError;

/// How long stored-but-unreferenced bytes count against their uploader.
pub const PENDING_TTL: Duration = Duration::from_secs(3600);
/// Most uploaders tracked at once (beyond it, the one idle longest is forgotten).
const PENDING_USERS: usize = 4096;
/// Most pending blobs tracked per uploader; a store beyond it is refused until some are
/// committed or expire.
pub const PENDING_PER_USER: usize = 65_536;

/// One account's pending blobs.
#[derive(Default)]
struct Account {
    /// Hash → (size, when stored).
    blobs: HashMap<Hash, (u64, Instant)>,
    /// Sum of the sizes in `blobs`.
    bytes: u64,
    /// Last store admitted (which account to forget when too many are tracked).
    active: Option<Instant>,
}

impl Account {
    fn remove(&mut self, h: &Hash) -> Option<u64> {
        let (size, _) = self.blobs.remove(h)?;
        self.bytes -= size;
        Some(size)
    }

    /// Drops entries that expired or that a commit references by now. Each entry costs a
    /// lookup, so this runs only when a store would otherwise be refused.
    fn prune(&mut self, now: Instant, referenced: &impl Fn(&Hash) -> bool) {
        let gone: Vec<Hash> = self
            .blobs
            .iter()
            .filter(|(h, (_, at))| now.duration_since(*at) >= PENDING_TTL || referenced(h))
            .map(|(h, _)| *h)
            .collect();
        for h in &gone {
            self.remove(h);
        }
    }
}

/// See the module documentation.
#[derive(Default)]
pub struct PendingBytes {
    by_user: Mutex<HashMap<String, Account>>,
}

/// A reserved charge: taken back when dropped, unless [`Charge::keep`] was called.
#[must_use = "a charge is taken back when dropped: keep it once the content is stored"]
pub struct Charge<'a> {
    pending: &'a PendingBytes,
    user: String,
    hashes: Vec<Hash>,
}

impl Charge<'_> {
    /// The account charged.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The content is stored here: the charge stands (until committed or expired). Returns
    /// the account charged.
    pub fn keep(mut self) -> String {
        self.hashes.clear();
        std::mem::take(&mut self.user)
    }
}

impl Drop for Charge<'_> {
    fn drop(&mut self) {
        if self.hashes.is_empty() {
            return;
        }
        let mut map = self.pending.lock();
        if let Some(acct) = map.get_mut(&self.user) {
            for h in &self.hashes {
                acct.remove(h);
            }
        }
    }
}

impl PendingBytes {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Account>> {
        self.by_user.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reserves the charge of `blobs` to be stored by `user`, if its pending bytes plus theirs
    /// fit `headroom` (`None` = unlimited) and it tracks fewer than [`PENDING_PER_USER`] blobs.
    /// `referenced` says whether a hash is referenced by a commit by now (those cost nothing).
    /// A blob already charged, or named twice, is charged once.
    pub fn admit(
        &self,
        user: &str,
        blobs: &[(Hash, u64)],
        headroom: Option<u64>,
        referenced: impl Fn(&Hash) -> bool,
    ) -> Result<Charge<'_>, NodeError> {
        let mut map = self.lock();
        let now = Instant::now();
        if !map.contains_key(user) && map.len() >= PENDING_USERS {
            // Forget the account idle longest (bounded memory; GC still applies).
            let idle = map.iter().min_by_key(|(_, a)| a.active).map(|(k, _)| k.clone());
            if let Some(k) = idle {
                map.remove(&k);
            }
        }
        let acct = map.entry(user.to_string()).or_default();
        let mut seen = HashSet::new();
        let new: Vec<(Hash, u64)> = blobs
            .iter()
            .filter(|(h, _)| !acct.blobs.contains_key(h) && seen.insert(*h) && !referenced(h))
            .copied()
            .collect();
        let adding: u64 = new.iter().map(|(_, s)| *s).sum();
        let fits = |a: &Account| {
            headroom.is_none_or(|room| a.bytes.saturating_add(adding) <= room)
                && a.blobs.len() + new.len() <= PENDING_PER_USER
        };
        if !fits(acct) {
            acct.prune(now, &referenced);
        }
        if !fits(acct) {
            let minutes = PENDING_TTL.as_secs() / 60;
            if acct.blobs.len() + new.len() > PENDING_PER_USER {
                return Err(NodeError::Quota(format!(
                    "{user} has {} blobs stored but not yet committed on this server, and {} more would exceed \
                     the limit of {PENDING_PER_USER} (commit them, or wait up to {minutes} min)",
                    acct.blobs.len(),
                    new.len()
                )));
            }
            return Err(NodeError::Quota(format!(
                "{user} has {} bytes uploaded but not yet committed; {adding} more would exceed the {} bytes left \
                 in its volumes' quotas (commit or wait {minutes} min)",
                acct.bytes,
                headroom.unwrap_or(0)
            )));
        }
        for (h, s) in &new {
            acct.blobs.insert(*h, (*s, now));
        }
        acct.bytes += adding;
        acct.active = Some(now);
        Ok(Charge {
            pending: self,
            user: user.to_string(),
            hashes: new.into_iter().map(|(h, _)| h).collect(),
        })
    }

    /// Moves `user`'s pending charges of `chunks` onto `manifest`: a large file's chunks are
    /// referenced only through its manifest, so their bytes stop counting once a commit
    /// references the manifest (or expire with it).
    pub fn fold(&self, user: &str, manifest: Hash, chunks: &HashSet<Hash>) {
        let mut map = self.lock();
        let Some(acct) = map.get_mut(user) else { return };
        let moved: u64 = chunks.iter().filter_map(|h| acct.remove(h)).sum();
        if moved == 0 {
            return;
        }
        let e = acct.blobs.entry(manifest).or_insert((0, Instant::now()));
        e.0 += moved;
        acct.bytes += moved;
    }

    /// Bytes and blobs `user` has pending (for tests and diagnostics).
    pub fn of(&self, user: &str) -> (u64, usize) {
        self.lock().get(user).map_or((0, 0), |a| (a.bytes, a.blobs.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_bytes_count_until_referenced() {
        let p = PendingBytes::default();
        let (a, b, c) = (Hash::of(b"a"), Hash::of(b"b"), Hash::of(b"c"));
        p.admit("web", &[(a, 600)], Some(1000), |_| false).unwrap().keep();
        // The same blob again costs nothing more.
        p.admit("web", &[(a, 600)], Some(1000), |_| false).unwrap().keep();
        let err = p.admit("web", &[(b, 500)], Some(1000), |_| false).err().unwrap();
        assert!(matches!(err, NodeError::Quota(_)), "{err}");
        // Another account has its own allowance.
        p.admit("other", &[(b, 500)], Some(1000), |_| false).unwrap().keep();
        // Once `a` is referenced by a commit, it no longer counts.
        p.admit("web", &[(b, 500)], Some(1000), |h| *h == a).unwrap().keep();
        p.admit("web", &[(c, 1)], None, |_| false).unwrap().keep();
        assert_eq!(p.of("web"), (501, 2));
    }

    /// A large file's chunks stop counting when a commit references its manifest.
    #[test]
    fn chunk_charges_move_onto_their_manifest() {
        let p = PendingBytes::default();
        let (c1, c2, m) = (Hash::of(b"c1"), Hash::of(b"c2"), Hash::of(b"m"));
        p.admit("web", &[(c1, 400), (c2, 400)], Some(1000), |_| false)
            .unwrap()
            .keep();
        p.admit("web", &[(m, 100)], Some(1000), |_| false).unwrap().keep();
        p.fold("web", m, &[c1, c2].into_iter().collect());
        assert_eq!(p.of("web"), (900, 1));
        // Still charged (900 of 1000) until the manifest is referenced...
        let err = p
            .admit("web", &[(Hash::of(b"x"), 200)], Some(1000), |_| false)
            .err()
            .unwrap();
        assert!(matches!(err, NodeError::Quota(_)), "{err}");
        // ...then nothing of it counts.
        p.admit("web", &[(Hash::of(b"x"), 900)], Some(1000), |h| *h == m)
            .unwrap()
            .keep();
    }

    /// A store that fails (its content did not verify, say) takes its charge back; one named
    /// twice in a batch is charged once.
    #[test]
    fn a_failed_store_leaves_no_charge_and_a_batch_charges_each_blob_once() {
        let p = PendingBytes::default();
        let (a, b) = (Hash::of(b"a"), Hash::of(b"b"));
        let charge = p.admit("web", &[(a, 600), (a, 600)], Some(1000), |_| false).unwrap();
        assert_eq!(charge.user(), "web");
        assert_eq!(p.of("web"), (600, 1), "reserved while the store runs");
        drop(charge);
        assert_eq!(p.of("web"), (0, 0), "taken back");
        p.admit("web", &[(b, 1000)], Some(1000), |_| false).unwrap().keep();
        assert_eq!(p.of("web"), (1000, 1));
    }

    /// A full account is refused, never trimmed: a flood of stores cannot push real charges
    /// out and so reset the count. Committed or expired entries make room.
    #[test]
    fn a_full_account_is_refused_rather_than_trimmed() {
        let p = PendingBytes::default();
        let hashes: Vec<(Hash, u64)> = (0..PENDING_PER_USER as u64)
            .map(|i| (Hash::of(&i.to_le_bytes()), 1))
            .collect();
        p.admit("web", &hashes, None, |_| false).unwrap().keep();
        let extra = Hash::of(b"one too many");
        let err = p.admit("web", &[(extra, 1)], None, |_| false).err().unwrap();
        assert!(err.to_string().contains("not yet committed"), "{err}");
        assert_eq!(p.of("web"), (PENDING_PER_USER as u64, PENDING_PER_USER));
        let first = hashes[0].0;
        p.admit("web", &[(extra, 1)], None, |h| *h == first).unwrap().keep();
        assert_eq!(p.of("web"), (PENDING_PER_USER as u64, PENDING_PER_USER));
    }
}
