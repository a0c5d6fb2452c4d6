//! An in-memory [`StateView`] that applies [`Delta`]s: the reference implementation the RocksDB
//! store is checked against, and the fast backend for unit tests of the apply logic.
use std::collections::BTreeMap;

use codafs_common::Hash;

use super::*;

/// The whole applied state in `BTreeMap`s.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MemState {
    pub objects: BTreeMap<u64, ObjectRec>,
    pub dirents: BTreeMap<(u64, String), u64>,
    pub volumes: BTreeMap<String, VolumeRec>,
    pub cluster: Option<ClusterRec>,
    pub accounts: BTreeMap<String, AccountRec>,
    pub token_generations: BTreeMap<String, u64>,
    pub blobrefs: BTreeMap<Hash, u64>,
    pub manifestrefs: BTreeMap<Hash, u64>,
    pub changes: BTreeMap<(u32, u64), ChangeRec>,
    pub requests: BTreeMap<RequestId, RequestRec>,
    pub join_tokens: BTreeMap<[u8; 32], JoinTokenRec>,
    pub removed_servers: BTreeMap<u64, RemovedServerRec>,
}

impl MemState {
    /// Writes a delta.
    pub fn write(&mut self, d: Delta) {
        for (k, v) in d.objects {
            match v {
                Some(o) => self.objects.insert(k, o),
                None => self.objects.remove(&k),
            };
        }
        for (k, v) in d.dirents {
            match v {
                Some(i) => self.dirents.insert(k, i),
                None => self.dirents.remove(&k),
            };
        }
        self.volumes.extend(d.volumes);
        for (name, id) in d.volume_deletes {
            self.volumes.remove(&name);
            self.changes.retain(|(v, _), _| *v != id);
        }
        if let Some(c) = d.cluster {
            self.cluster = Some(c);
        }
        for (k, v) in d.accounts {
            match v {
                Some(a) => self.accounts.insert(k, a),
                None => self.accounts.remove(&k),
            };
        }
        self.token_generations.extend(d.token_generations);
        write_counts(&mut self.blobrefs, d.blobrefs);
        write_counts(&mut self.manifestrefs, d.manifestrefs);
        for (v, i, c) in d.changes {
            self.changes.insert((v, i), c);
        }
        for k in d.change_deletes {
            self.changes.remove(&k);
        }
        for (id, rec, _) in d.requests {
            match rec {
                Some(r) => self.requests.insert(id, r),
                None => self.requests.remove(&id),
            };
        }
        for (h, t) in d.join_tokens {
            match t {
                Some(t) => self.join_tokens.insert(h, t),
                None => self.join_tokens.remove(&h),
            };
        }
        self.removed_servers.extend(d.removed_servers);
    }

    /// Applies a command as entry `index` and writes its delta.
    pub fn apply(&mut self, index: u64, cmd: &Command) -> Response {
        match super::apply(self, index, cmd) {
            Ok((delta, resp)) => {
                self.write(delta);
                resp
            }
            Err(e) => Err(ApplyError::Invalid(e.to_string())),
        }
    }
}

/// Writes final reference counts: a count of 0 removes the row, as in RocksDB.
fn write_counts(table: &mut BTreeMap<Hash, u64>, counts: BTreeMap<Hash, u64>) {
    for (h, n) in counts {
        if n == 0 {
            table.remove(&h);
        } else {
            table.insert(h, n);
        }
    }
}

impl StateView for MemState {
    fn object(&self, ino: u64) -> Result<Option<ObjectRec>, StoreError> {
        Ok(self.objects.get(&ino).cloned())
    }
    fn dirent(&self, parent: u64, name: &str) -> Result<Option<u64>, StoreError> {
        Ok(self.dirents.get(&(parent, name.to_string())).copied())
    }
    fn dirents(&self, parent: u64, after: &str, limit: usize) -> Result<Vec<(String, u64)>, StoreError> {
        Ok(self
            .dirents
            .range((parent, after.to_string())..)
            .take_while(|((p, _), _)| *p == parent)
            .filter(|((_, n), _)| n.as_str() > after)
            .take(limit)
            .map(|((_, n), i)| (n.clone(), *i))
            .collect())
    }
    fn volume(&self, name: &str) -> Result<Option<VolumeRec>, StoreError> {
        Ok(self.volumes.get(name).cloned())
    }
    fn volume_name(&self, id: u32) -> Result<Option<String>, StoreError> {
        Ok(self.volumes.values().find(|v| v.id == id).map(|v| v.name.clone()))
    }
    fn cluster(&self) -> Result<Option<ClusterRec>, StoreError> {
        Ok(self.cluster.clone())
    }
    fn account(&self, name: &str) -> Result<Option<AccountRec>, StoreError> {
        Ok(self.accounts.get(name).cloned())
    }
    fn token_generation(&self, user: &str) -> Result<u64, StoreError> {
        Ok(self.token_generations.get(user).copied().unwrap_or(0))
    }
    fn blobref(&self, hash: &Hash) -> Result<u64, StoreError> {
        Ok(self.blobrefs.get(hash).copied().unwrap_or(0))
    }
    fn manifestref(&self, hash: &Hash) -> Result<u64, StoreError> {
        Ok(self.manifestrefs.get(hash).copied().unwrap_or(0))
    }
    fn volume_owned_by(&self, user: &str) -> Result<Option<String>, StoreError> {
        Ok(self.volumes.values().find(|v| v.owner == user).map(|v| v.name.clone()))
    }

    fn volumes_written_by(&self, user: &str) -> Result<Vec<String>, StoreError> {
        Ok(self
            .volumes
            .values()
            .filter(|v| v.writers.iter().any(|w| w == user))
            .map(|v| v.name.clone())
            .collect())
    }

    fn request(&self, id: &RequestId) -> Result<Option<RequestRec>, StoreError> {
        Ok(self.requests.get(id).cloned())
    }

    fn requests_before(&self, before: u64, limit: usize) -> Result<Vec<(u64, RequestId)>, StoreError> {
        let mut v: Vec<(u64, RequestId)> = self
            .requests
            .iter()
            .filter(|(_, r)| r.index < before)
            .map(|(id, r)| (r.index, *id))
            .collect();
        v.sort();
        v.truncate(limit);
        Ok(v)
    }

    fn join_token(&self, secret_hash: &[u8; 32]) -> Result<Option<JoinTokenRec>, StoreError> {
        Ok(self.join_tokens.get(secret_hash).cloned())
    }

    fn join_tokens(&self) -> Result<Vec<([u8; 32], JoinTokenRec)>, StoreError> {
        Ok(self.join_tokens.iter().map(|(h, t)| (*h, t.clone())).collect())
    }

    fn removed_server(&self, node_id: u64) -> Result<Option<RemovedServerRec>, StoreError> {
        Ok(self.removed_servers.get(&node_id).cloned())
    }

    fn oldest_change(&self, volume: u32) -> Result<Option<u64>, StoreError> {
        Ok(self
            .changes
            .range((volume, 0)..=(volume, u64::MAX))
            .next()
            .map(|((_, i), _)| *i))
    }
}
