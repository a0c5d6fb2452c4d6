//! The server's RocksDB database: one DB, one column family per concern.
//!
//! The Raft log (`raft_log`, `raft_meta`) and the state machine's tables share one DB and so one
//! write-ahead log: a synced log append also makes every earlier state-machine write durable,
//! which lets state-machine writes skip their own fsync (see `raft::state_machine`).
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use codafs_common::ids::VolumeId;
use codafs_common::Hash;
use rocksdb::{ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteBatch, DB};

use crate::fsm::{self, AccountRec, ChangeRec, ClusterRec, Delta, ObjectRec, StateView, StoreError, VolumeRec};

/// Raft log entries by index.
pub const CF_LOG: &str = "raft_log";
/// Vote, committed log id, last purged log id.
pub const CF_RAFT_META: &str = "raft_meta";
/// Last applied log id and membership of the state machine.
pub const CF_SM_META: &str = "sm_meta";
pub const CF_OBJECTS: &str = "objects";
pub const CF_DIRENTS: &str = "dirents";
pub const CF_VOLUMES: &str = "volumes";
pub const CF_ACCOUNTS: &str = "accounts";
pub const CF_CHANGES: &str = "changes";
pub const CF_BLOBREFS: &str = "blobrefs";
/// References to chunk manifests (hash -> count, big-endian u64): the file contents over
/// `chunks::CHUNK_THRESHOLD` whose hash names a manifest. Those hashes are in `blobrefs` too;
/// this table says which referenced blobs list chunks that repair and GC must keep.
pub const CF_MANIFESTREFS: &str = "manifestrefs";
/// Token generations by account name (big-endian u64): tokens carrying an older generation are
/// refused. A table of its own, so account records keep their format.
pub const CF_TOKEN_GENERATIONS: &str = "token_generations";
/// Applied commit requests: `r` + id -> record, and `t` + index + id (for trimming in order).
pub const CF_REQUESTS: &str = "requests";
/// Join tokens (`t` + hash of the secret) and removed servers (`r` + node id).
pub const CF_PKI: &str = "pki";

/// Tables that make up the state machine (and so a snapshot).
pub const SM_TABLES: &[&str] = &[
    CF_SM_META,
    CF_OBJECTS,
    CF_DIRENTS,
    CF_VOLUMES,
    CF_ACCOUNTS,
    CF_CHANGES,
    CF_BLOBREFS,
    CF_MANIFESTREFS,
    CF_REQUESTS,
    CF_TOKEN_GENERATIONS,
    CF_PKI,
];

const KEY_CLUSTER: &[u8] = b"cluster";

/// Set in `raft_meta` while a snapshot replaces the state tables (see `Tables::replace_start`).
const KEY_REPLACING: &[u8] = b"sm_replacing";

/// A consistent view of the state-machine tables (see [`Tables::state_snapshot`]).
pub struct StateSnapshot<'a> {
    db: &'a DB,
    snap: rocksdb::Snapshot<'a>,
}

impl StateSnapshot<'_> {
    /// One row of `table`.
    pub fn get(&self, table: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.snap.get_cf(cf(self.db, table)?, key).map_err(se)
    }

    /// Calls `f` with every row of `table`, in key order.
    pub fn each_row<E: From<StoreError>>(
        &self,
        table: &str,
        mut f: impl FnMut(&[u8], &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        for item in self.snap.iterator_cf(cf(self.db, table)?, IteratorMode::Start) {
            let (k, v) = item.map_err(se)?;
            f(&k, &v)?;
        }
        Ok(())
    }
}

/// The write-ahead logs' cap (see [`open`]).
const MAX_WAL_BYTES: u64 = 16 << 20;

/// Opens (or creates) the database under `dir`.
pub fn open(dir: &Path) -> Result<Arc<DB>, rocksdb::Error> {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    opts.set_keep_log_file_num(4);
    // The write-ahead log preallocates 1.1 x the largest write buffer on disk (64 MiB by
    // default): 70 MiB on every server, however little it holds, and more than a tree of 20,000
    // small files takes. Capped logs preallocate at most the cap; past it RocksDB flushes the
    // tables that keep the oldest log alive. The MANIFEST preallocates 4 MiB otherwise.
    opts.set_max_total_wal_size(MAX_WAL_BYTES);
    opts.set_manifest_preallocation_size(256 << 10);
    let cfs = [CF_LOG, CF_RAFT_META]
        .iter()
        .chain(SM_TABLES)
        .map(|n| ColumnFamilyDescriptor::new(*n, Options::default()));
    Ok(Arc::new(DB::open_cf_descriptors(&opts, dir, cfs)?))
}

pub(crate) fn se(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

fn cf<'a>(db: &'a DB, name: &str) -> Result<&'a rocksdb::ColumnFamily, StoreError> {
    db.cf_handle(name)
        .ok_or_else(|| StoreError(format!("column family {name} missing")))
}

pub(crate) fn encode<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    bincode::serialize(v).map_err(se)
}

pub(crate) fn decode<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, StoreError> {
    bincode::deserialize(b).map_err(se)
}

fn dirent_key(parent: u64, name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + name.len());
    k.extend_from_slice(&parent.to_be_bytes());
    k.extend_from_slice(name.as_bytes());
    k
}

fn request_key(id: &fsm::RequestId) -> Vec<u8> {
    let mut k = vec![b'r'];
    k.extend_from_slice(id);
    k
}

fn request_order_key(index: u64, id: &fsm::RequestId) -> Vec<u8> {
    let mut k = vec![b't'];
    k.extend_from_slice(&index.to_be_bytes());
    k.extend_from_slice(id);
    k
}

fn join_token_key(secret_hash: &[u8; 32]) -> Vec<u8> {
    let mut k = vec![b't'];
    k.extend_from_slice(secret_hash);
    k
}

fn removed_server_key(node_id: u64) -> Vec<u8> {
    let mut k = vec![b'r'];
    k.extend_from_slice(&node_id.to_be_bytes());
    k
}

fn change_key(volume: u32, version: u64) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..4].copy_from_slice(&volume.to_be_bytes());
    k[4..].copy_from_slice(&version.to_be_bytes());
    k
}

/// The state machine's tables, read directly from the live DB.
#[derive(Clone)]
pub struct Tables {
    pub db: Arc<DB>,
    /// Volume records by id, as of the database sequence number they were read at (see
    /// [`Tables::volume_by_id`]); shared by clones.
    by_id: Arc<std::sync::Mutex<Option<VolumesAt>>>,
}

/// Volume records by id, and the database sequence number they were read at.
type VolumesAt = (u64, Arc<HashMap<VolumeId, VolumeRec>>);

impl Tables {
    pub fn new(db: Arc<DB>) -> Self {
        Tables {
            db,
            by_id: Arc::default(),
        }
    }

    /// The volume with id `id`. A read that names a node by id names only its volume's id, and
    /// scanning every volume record for it cost a cluster of one volume per site a decode per
    /// volume on each such read (256 of them per `GetSmall`). The records are read once per
    /// database write instead: any write moves the sequence number, and a map read before it
    /// is not used after it.
    pub fn volume_by_id(&self, id: VolumeId) -> Result<Option<VolumeRec>, StoreError> {
        let seq = self.db.latest_sequence_number();
        let lock = || self.by_id.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, map)) = &*lock() {
            if *at == seq {
                return Ok(map.get(&id).cloned());
            }
        }
        // Read after the sequence number: a write meanwhile makes the next call read again.
        let map: HashMap<VolumeId, VolumeRec> = self.volumes()?.into_iter().map(|v| (v.id, v)).collect();
        let found = map.get(&id).cloned();
        *lock() = Some((seq, Arc::new(map)));
        Ok(found)
    }

    fn get<T: serde::de::DeserializeOwned>(&self, cf_name: &str, key: &[u8]) -> Result<Option<T>, StoreError> {
        match self.db.get_pinned_cf(cf(&self.db, cf_name)?, key).map_err(se)? {
            Some(v) => Ok(Some(decode(&v)?)),
            None => Ok(None),
        }
    }

    /// All accounts, by name.
    pub fn accounts(&self) -> Result<Vec<AccountRec>, StoreError> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(cf(&self.db, CF_ACCOUNTS)?, IteratorMode::Start) {
            let (_, v) = item.map_err(se)?;
            out.push(decode(&v)?);
        }
        Ok(out)
    }

    /// All volumes, by name.
    pub fn volumes(&self) -> Result<Vec<VolumeRec>, StoreError> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(cf(&self.db, CF_VOLUMES)?, IteratorMode::Start) {
            let (_, v) = item.map_err(se)?;
            out.push(decode(&v)?);
        }
        Ok(out)
    }

    /// Change records of a volume with version > `after`, at most `limit`.
    pub fn changes_after(&self, volume: u32, after: u64, limit: usize) -> Result<Vec<(u64, ChangeRec)>, StoreError> {
        Ok(self.changes_page(volume, after, limit, usize::MAX)?.0)
    }

    /// Change records of `volume` after `after`: at most `limit`, and no more once `max_bytes`
    /// of them are read (at least one). Also says whether more follow.
    pub fn changes_page(
        &self,
        volume: u32,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<(Vec<(u64, ChangeRec)>, bool), StoreError> {
        let start = change_key(volume, after.saturating_add(1));
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let it = self.db.iterator_cf(
            cf(&self.db, CF_CHANGES)?,
            IteratorMode::From(&start, Direction::Forward),
        );
        for item in it {
            let (k, v) = item.map_err(se)?;
            if k.len() != 12 || k[..4] != volume.to_be_bytes() {
                return Ok((out, false));
            }
            if out.len() >= limit || (bytes >= max_bytes && !out.is_empty()) {
                return Ok((out, true));
            }
            let mut idx = [0u8; 8];
            idx.copy_from_slice(&k[4..]);
            bytes += v.len();
            out.push((u64::from_be_bytes(idx), ChangeRec::decode(&v).map_err(se)?));
        }
        Ok((out, false))
    }

    /// Every referenced blob hash.
    pub fn referenced_blobs(&self) -> Result<Vec<Hash>, StoreError> {
        self.hash_keys(CF_BLOBREFS)
    }

    /// Every referenced chunk manifest's hash.
    pub fn referenced_manifests(&self) -> Result<Vec<Hash>, StoreError> {
        self.hash_keys(CF_MANIFESTREFS)
    }

    /// The keys of a table keyed by hash, in order.
    fn hash_keys(&self, table: &str) -> Result<Vec<Hash>, StoreError> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(cf(&self.db, table)?, IteratorMode::Start) {
            let (k, _) = item.map_err(se)?;
            out.push(Hash::from_slice(&k).map_err(se)?);
        }
        Ok(out)
    }

    /// A hash-keyed count (`blobrefs`, `manifestrefs`); 0 when absent.
    fn count(&self, table: &str, hash: &Hash) -> Result<u64, StoreError> {
        match self.db.get_pinned_cf(cf(&self.db, table)?, hash.0).map_err(se)? {
            Some(v) => Ok(u64::from_be_bytes(v.as_ref().try_into().map_err(se)?)),
            None => Ok(0),
        }
    }

    /// Adds a delta to a write batch.
    pub fn write_delta(&self, batch: &mut WriteBatch, d: &Delta) -> Result<(), StoreError> {
        let db = &self.db;
        for (ino, o) in &d.objects {
            match o {
                Some(o) => batch.put_cf(cf(db, CF_OBJECTS)?, ino.to_be_bytes(), encode(o)?),
                None => batch.delete_cf(cf(db, CF_OBJECTS)?, ino.to_be_bytes()),
            }
        }
        for ((parent, name), child) in &d.dirents {
            let k = dirent_key(*parent, name);
            match child {
                Some(c) => batch.put_cf(cf(db, CF_DIRENTS)?, k, c.to_be_bytes()),
                None => batch.delete_cf(cf(db, CF_DIRENTS)?, k),
            }
        }
        for (name, v) in &d.volumes {
            batch.put_cf(cf(db, CF_VOLUMES)?, name.as_bytes(), encode(v)?);
        }
        for (name, id) in &d.volume_deletes {
            batch.delete_cf(cf(db, CF_VOLUMES)?, name.as_bytes());
            let end = change_key(id.saturating_add(1), 0);
            batch.delete_range_cf(cf(db, CF_CHANGES)?, change_key(*id, 0), end);
        }
        if let Some(c) = &d.cluster {
            batch.put_cf(cf(db, CF_SM_META)?, KEY_CLUSTER, encode(c)?);
        }
        for (name, a) in &d.accounts {
            match a {
                Some(a) => batch.put_cf(cf(db, CF_ACCOUNTS)?, name.as_bytes(), encode(a)?),
                None => batch.delete_cf(cf(db, CF_ACCOUNTS)?, name.as_bytes()),
            }
        }
        for (name, g) in &d.token_generations {
            batch.put_cf(cf(db, CF_TOKEN_GENERATIONS)?, name.as_bytes(), g.to_be_bytes());
        }
        for (table, counts) in [(CF_BLOBREFS, &d.blobrefs), (CF_MANIFESTREFS, &d.manifestrefs)] {
            let h = cf(db, table)?;
            for (hash, n) in counts {
                if *n == 0 {
                    batch.delete_cf(h, hash.0);
                } else {
                    batch.put_cf(h, hash.0, n.to_be_bytes());
                }
            }
        }
        for (vol, idx, c) in &d.changes {
            batch.put_cf(cf(db, CF_CHANGES)?, change_key(*vol, *idx), encode(c)?);
        }
        for (vol, idx) in &d.change_deletes {
            batch.delete_cf(cf(db, CF_CHANGES)?, change_key(*vol, *idx));
        }
        for (id, rec, index) in &d.requests {
            let h = cf(db, CF_REQUESTS)?;
            match rec {
                Some(r) => {
                    batch.put_cf(h, request_key(id), encode(r)?);
                    batch.put_cf(h, request_order_key(*index, id), []);
                }
                None => {
                    batch.delete_cf(h, request_key(id));
                    batch.delete_cf(h, request_order_key(*index, id));
                }
            }
        }
        for (h, t) in &d.join_tokens {
            let cf = cf(db, CF_PKI)?;
            match t {
                Some(t) => batch.put_cf(cf, join_token_key(h), encode(t)?),
                None => batch.delete_cf(cf, join_token_key(h)),
            }
        }
        for (id, r) in &d.removed_servers {
            batch.put_cf(cf(db, CF_PKI)?, removed_server_key(*id), encode(r)?);
        }
        Ok(())
    }

    /// A consistent view of every state-machine table (a RocksDB snapshot), for building a
    /// Raft snapshot row by row.
    pub fn state_snapshot(&self) -> StateSnapshot<'_> {
        StateSnapshot {
            db: &self.db,
            snap: self.db.snapshot(),
        }
    }

    /// Begins replacing the state-machine tables (a Raft snapshot install): records that a
    /// replacement is under way (synced), then deletes every row. Rows follow in batches
    /// ([`Tables::replace_rows`]) and [`Tables::replace_finish`] ends it. A server that stops
    /// in between finds [`Tables::replace_pending`] at its next start and installs again.
    pub fn replace_start(&self) -> Result<(), StoreError> {
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(true);
        self.db
            .put_cf_opt(cf(&self.db, CF_RAFT_META)?, KEY_REPLACING, b"1", &wo)
            .map_err(se)?;
        for name in SM_TABLES {
            let h = cf(&self.db, name)?;
            let mut batch = WriteBatch::default();
            for item in self.db.iterator_cf(h, IteratorMode::Start) {
                let (k, _) = item.map_err(se)?;
                batch.delete_cf(h, k);
                if batch.len() >= 100_000 {
                    self.db.write(std::mem::take(&mut batch)).map_err(se)?;
                }
            }
            self.db.write(batch).map_err(se)?;
        }
        Ok(())
    }

    /// Writes one batch of rows of a replacement: (table, key, value).
    pub fn replace_rows(&self, rows: &[(&str, Vec<u8>, Vec<u8>)]) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        for (table, k, v) in rows {
            batch.put_cf(cf(&self.db, table)?, k, v);
        }
        self.db.write(batch).map_err(se)
    }

    /// Ends a replacement; the synced write makes every batch before it durable too (one WAL).
    pub fn replace_finish(&self) -> Result<(), StoreError> {
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(true);
        self.db
            .delete_cf_opt(cf(&self.db, CF_RAFT_META)?, KEY_REPLACING, &wo)
            .map_err(se)
    }

    /// Whether a replacement was started and not finished.
    pub fn replace_pending(&self) -> Result<bool, StoreError> {
        Ok(self
            .db
            .get_cf(cf(&self.db, CF_RAFT_META)?, KEY_REPLACING)
            .map_err(se)?
            .is_some())
    }

    pub(crate) fn cf(&self, name: &str) -> Result<&rocksdb::ColumnFamily, StoreError> {
        cf(&self.db, name)
    }

    /// One page of a directory read from a single RocksDB snapshot: the directory itself and up
    /// to `limit` entries after `after` with their objects, all as of one applied state (a
    /// concurrent commit is either wholly in the page or not at all). The bool says whether
    /// more entries follow.
    #[allow(clippy::type_complexity)]
    pub fn dir_page(
        &self,
        parent: u64,
        after: &str,
        limit: usize,
    ) -> Result<Option<(ObjectRec, Vec<(String, ObjectRec)>, bool)>, StoreError> {
        let snap = self.db.snapshot();
        let objects = cf(&self.db, CF_OBJECTS)?;
        let get_object = |ino: u64| -> Result<Option<ObjectRec>, StoreError> {
            match snap.get_cf(objects, ino.to_be_bytes()).map_err(se)? {
                Some(v) => Ok(Some(decode(&v)?)),
                None => Ok(None),
            }
        };
        let Some(dir) = get_object(parent)? else {
            return Ok(None);
        };
        let start = dirent_key(parent, after);
        let prefix = parent.to_be_bytes();
        let mut out = Vec::new();
        let mut more = false;
        let it = snap.iterator_cf(
            cf(&self.db, CF_DIRENTS)?,
            IteratorMode::From(&start, Direction::Forward),
        );
        for item in it {
            let (k, v) = item.map_err(se)?;
            if !k.starts_with(&prefix) {
                break;
            }
            let name = std::str::from_utf8(&k[8..]).map_err(se)?;
            if name == after {
                continue;
            }
            if out.len() >= limit {
                more = true;
                break;
            }
            let ino = u64::from_be_bytes(v.as_ref().try_into().map_err(se)?);
            if let Some(o) = get_object(ino)? {
                out.push((name.to_string(), o));
            }
        }
        Ok(Some((dir, out, more)))
    }
}

impl StateView for Tables {
    fn object(&self, ino: u64) -> Result<Option<ObjectRec>, StoreError> {
        self.get(CF_OBJECTS, &ino.to_be_bytes())
    }

    fn dirent(&self, parent: u64, name: &str) -> Result<Option<u64>, StoreError> {
        match self
            .db
            .get_pinned_cf(cf(&self.db, CF_DIRENTS)?, dirent_key(parent, name))
            .map_err(se)?
        {
            Some(v) => Ok(Some(u64::from_be_bytes(v.as_ref().try_into().map_err(se)?))),
            None => Ok(None),
        }
    }

    fn dirents(&self, parent: u64, after: &str, limit: usize) -> Result<Vec<(String, u64)>, StoreError> {
        let start = dirent_key(parent, after);
        let prefix = parent.to_be_bytes();
        let mut out = Vec::new();
        let it = self.db.iterator_cf(
            cf(&self.db, CF_DIRENTS)?,
            IteratorMode::From(&start, Direction::Forward),
        );
        for item in it {
            let (k, v) = item.map_err(se)?;
            if !k.starts_with(&prefix) || out.len() >= limit {
                break;
            }
            let name = std::str::from_utf8(&k[8..]).map_err(se)?;
            if name == after {
                continue;
            }
            out.push((name.to_string(), u64::from_be_bytes(v.as_ref().try_into().map_err(se)?)));
        }
        Ok(out)
    }

    fn volume(&self, name: &str) -> Result<Option<VolumeRec>, StoreError> {
        self.get(CF_VOLUMES, name.as_bytes())
    }

    fn volume_name(&self, id: u32) -> Result<Option<String>, StoreError> {
        // Volumes are few; a scan keeps one source of truth instead of a second index.
        Ok(self.volumes()?.into_iter().find(|v| v.id == id).map(|v| v.name))
    }

    fn cluster(&self) -> Result<Option<ClusterRec>, StoreError> {
        self.get(CF_SM_META, KEY_CLUSTER)
    }

    fn account(&self, name: &str) -> Result<Option<AccountRec>, StoreError> {
        self.get(CF_ACCOUNTS, name.as_bytes())
    }

    fn token_generation(&self, user: &str) -> Result<u64, StoreError> {
        match self
            .db
            .get_pinned_cf(cf(&self.db, CF_TOKEN_GENERATIONS)?, user.as_bytes())
            .map_err(se)?
        {
            Some(v) => Ok(u64::from_be_bytes(v.as_ref().try_into().map_err(se)?)),
            None => Ok(0),
        }
    }

    fn blobref(&self, hash: &Hash) -> Result<u64, StoreError> {
        self.count(CF_BLOBREFS, hash)
    }

    fn manifestref(&self, hash: &Hash) -> Result<u64, StoreError> {
        self.count(CF_MANIFESTREFS, hash)
    }

    fn volume_owned_by(&self, user: &str) -> Result<Option<String>, StoreError> {
        // Volumes are few; a scan keeps one source of truth instead of an owner index.
        Ok(self.volumes()?.into_iter().find(|v| v.owner == user).map(|v| v.name))
    }

    fn volumes_written_by(&self, user: &str) -> Result<Vec<String>, StoreError> {
        Ok(self
            .volumes()?
            .into_iter()
            .filter(|v| v.writers.iter().any(|w| w == user))
            .map(|v| v.name)
            .collect())
    }

    fn oldest_change(&self, volume: u32) -> Result<Option<u64>, StoreError> {
        Ok(self.changes_after(volume, 0, 1)?.first().map(|(i, _)| *i))
    }

    fn request(&self, id: &fsm::RequestId) -> Result<Option<fsm::RequestRec>, StoreError> {
        self.get(CF_REQUESTS, &request_key(id))
    }

    fn requests_before(&self, before: u64, limit: usize) -> Result<Vec<(u64, fsm::RequestId)>, StoreError> {
        let mut out = Vec::new();
        let it = self
            .db
            .iterator_cf(cf(&self.db, CF_REQUESTS)?, IteratorMode::From(b"t", Direction::Forward));
        for item in it {
            let (k, _) = item.map_err(se)?;
            if k.first() != Some(&b't') || out.len() >= limit || k.len() != 25 {
                break;
            }
            let index = u64::from_be_bytes(k[1..9].try_into().map_err(se)?);
            if index >= before {
                break;
            }
            out.push((index, k[9..25].try_into().map_err(se)?));
        }
        Ok(out)
    }

    fn join_token(&self, secret_hash: &[u8; 32]) -> Result<Option<fsm::JoinTokenRec>, StoreError> {
        self.get(CF_PKI, &join_token_key(secret_hash))
    }

    fn join_tokens(&self) -> Result<Vec<([u8; 32], fsm::JoinTokenRec)>, StoreError> {
        let mut out = Vec::new();
        let it = self
            .db
            .iterator_cf(cf(&self.db, CF_PKI)?, IteratorMode::From(b"t", Direction::Forward));
        for item in it {
            let (k, v) = item.map_err(se)?;
            if k.first() != Some(&b't') {
                break;
            }
            out.push((k[1..].try_into().map_err(se)?, decode(&v)?));
        }
        Ok(out)
    }

    fn removed_server(&self, node_id: u64) -> Result<Option<fsm::RemovedServerRec>, StoreError> {
        self.get(CF_PKI, &removed_server_key(node_id))
    }
}

/// Checks that the RocksDB tables behave exactly like the in-memory reference state for the same
/// commands (used by the unit tests below and available to integration tests).
pub fn apply_to_both(
    tables: &Tables,
    mem: &mut fsm::mem::MemState,
    index: u64,
    cmd: &fsm::Command,
) -> Result<(), StoreError> {
    let (delta, _) = fsm::apply(tables, index, cmd)?;
    let mut batch = WriteBatch::default();
    tables.write_delta(&mut batch, &delta)?;
    tables.db.write(batch).map_err(se)?;
    mem.apply(index, cmd).ok();
    Ok(())
}

/// Empty state-machine tables in a temporary directory (removed when the guard drops).
#[cfg(test)]
pub(crate) fn temp_tables() -> (tempfile::TempDir, Tables) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let db = open(dir.path()).expect("RocksDB opens in a fresh directory");
    (dir, Tables::new(db))
}

#[cfg(test)]
impl Tables {
    /// Writes one delta at once (as the state machine does for an applied entry).
    pub(crate) fn write_now(&self, d: &Delta) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        self.write_delta(&mut batch, d)?;
        self.db.write(batch).map_err(se)
    }

    /// Rows per state-machine table.
    pub(crate) fn row_counts(&self) -> Result<std::collections::BTreeMap<String, usize>, StoreError> {
        let snap = self.state_snapshot();
        let mut counts = std::collections::BTreeMap::new();
        for name in SM_TABLES {
            let mut n = 0;
            snap.each_row::<StoreError>(name, |_, _| {
                n += 1;
                Ok(())
            })?;
            counts.insert(name.to_string(), n);
        }
        Ok(counts)
    }
}

/// A bootstrapped state with volume `www` owned by `admin`, applied as entries 1 and 2 to real
/// RocksDB tables and to the in-memory reference, for tests that continue from there.
#[cfg(test)]
pub(crate) fn www_fixture() -> (tempfile::TempDir, Tables, fsm::mem::MemState, fsm::Actor) {
    use crate::fsm::{AccountRec, Actor, Command, VolumeSpec};
    let dir = tempfile::tempdir().unwrap();
    let tables = Tables::new(open(dir.path()).unwrap());
    let mut mem = fsm::mem::MemState::default();
    let admin = AccountRec {
        name: "admin".into(),
        admin: true,
        password_hash: String::new(),
        created_ns: 0,
    };
    let actor = Actor {
        user: "admin".into(),
        admin: true,
    };
    let spec = VolumeSpec {
        name: "www".into(),
        owner: "admin".into(),
        quota_bytes: 0,
        quota_files: 0,
        write_quorum: 2,
        public_read: true,
    };
    apply_to_both(
        &tables,
        &mut mem,
        1,
        &Command::Bootstrap {
            cluster_id: "c".into(),
            key: [3; 32],
            admin,
        },
    )
    .unwrap();
    apply_to_both(
        &tables,
        &mut mem,
        2,
        &Command::CreateVolume {
            actor: actor.clone(),
            spec,
            now_ns: 1,
        },
    )
    .unwrap();
    (dir, tables, mem, actor)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsm::*;

    #[test]
    fn rocksdb_tables_match_the_reference_state() {
        let (_dir, tables, mut mem, actor) = www_fixture();
        let mut cmds = Vec::new();
        for i in 0..50u32 {
            let mk = |name: String, kind: Kind, content: Option<&[u8]>| Op {
                expect_version: None,
                kind: OpKind::Create {
                    parent: NodeRef::Path(if kind == Kind::Dir {
                        String::new()
                    } else {
                        format!("d{}", i / 10)
                    }),
                    name,
                    kind,
                    mode: 0o644,
                    hash: content.map(Hash::of),
                    size: content.map_or(0, |c| c.len() as u64),
                    symlink: String::new(),
                    replace: true,
                    uid: 0,
                    gid: 0,
                    mtime_ns: 0,
                },
            };
            let mut ops = Vec::new();
            if i % 10 == 0 {
                ops.push(mk(format!("d{}", i / 10), Kind::Dir, None));
            }
            ops.push(mk(format!("f{}", i % 7), Kind::File, Some(format!("c{i}").as_bytes())));
            cmds.push(Command::Commit {
                actor: actor.clone(),
                volume: "www".into(),
                ops,
                expect_volume_version: None,
                now_ns: i64::from(i),
                request: None,
            });
        }
        for (i, c) in cmds.iter().enumerate() {
            apply_to_both(&tables, &mut mem, i as u64 + 3, c).unwrap();
        }
        let root = codafs_common::make_ino(1, 1);
        assert_eq!(
            tables.dirents(root, "", 100).unwrap(),
            mem.dirents(root, "", 100).unwrap()
        );
        for (ino, o) in &mem.objects {
            assert_eq!(tables.object(*ino).unwrap().as_ref(), Some(o));
        }
        assert_eq!(tables.volume("www").unwrap(), mem.volume("www").unwrap());
        let mut refs = tables.referenced_blobs().unwrap();
        refs.sort();
        assert_eq!(refs, mem.blobrefs.keys().copied().collect::<Vec<_>>());
        // Paging: names strictly after the cursor.
        let d0 = tables.dirent(root, "d0").unwrap().unwrap();
        let page = tables.dirents(d0, "f1", 2).unwrap();
        assert_eq!(page, mem.dirents(d0, "f1", 2).unwrap());
        assert_eq!(page.len(), 2);

        // Snapshot pages: the same entries with their objects, the directory, and `more`.
        let (dir, all, more) = tables.dir_page(root, "", 1000).unwrap().unwrap();
        assert_eq!(dir, mem.objects[&root]);
        assert!(!more);
        let names: Vec<(String, u64)> = all.iter().map(|(n, o)| (n.clone(), o.ino)).collect();
        assert_eq!(names, mem.dirents(root, "", 1000).unwrap());
        for (_, o) in &all {
            assert_eq!(Some(o), mem.objects.get(&o.ino));
        }
        let (_, first, more) = tables.dir_page(root, "", 3).unwrap().unwrap();
        assert!(more && first.len() == 3);
        let (_, rest, more) = tables.dir_page(root, &first[2].0, 1000).unwrap().unwrap();
        assert!(!more);
        assert_eq!(first.len() + rest.len(), all.len());
        let exact = tables.dir_page(root, "", all.len()).unwrap().unwrap();
        assert!(!exact.2, "a page that ends at the last entry says no more follow");
        assert!(tables.dir_page(12345, "", 10).unwrap().is_none());
    }

    #[test]
    fn manifest_references_are_listed_and_travel_in_snapshots() {
        let (_dir, tables, mut mem, actor) = www_fixture();
        let (manifest, small) = (Hash::of(b"manifest"), Hash::of(b"small"));
        let file = |name: &str, hash: Hash, size: u64| Op {
            expect_version: None,
            kind: OpKind::Create {
                parent: NodeRef::Path(String::new()),
                name: name.into(),
                kind: Kind::File,
                mode: 0o644,
                hash: Some(hash),
                size,
                symlink: String::new(),
                replace: false,
                uid: 0,
                gid: 0,
                mtime_ns: 0,
            },
        };
        let big = codafs_common::chunks::CHUNK_THRESHOLD + 1;
        let cmd = Command::Commit {
            actor,
            volume: "www".into(),
            ops: vec![file("big", manifest, big), file("small", small, 5)],
            expect_volume_version: None,
            now_ns: 1,
            request: None,
        };
        apply_to_both(&tables, &mut mem, 3, &cmd).unwrap();
        assert_eq!(tables.referenced_manifests().unwrap(), vec![manifest]);
        assert_eq!(tables.manifestref(&manifest).unwrap(), 1);
        assert_eq!(tables.manifestref(&small).unwrap(), 0);
        let mut blobs = tables.referenced_blobs().unwrap();
        blobs.sort();
        let mut want = vec![manifest, small];
        want.sort();
        assert_eq!(blobs, want, "a manifest is a referenced blob too");
        assert_eq!(tables.row_counts().unwrap()[CF_MANIFESTREFS], 1);
    }

    #[test]
    fn token_generations_match_the_reference_state() {
        let (_dir, tables, mut mem, actor) = www_fixture();
        assert_eq!(tables.token_generation("admin").unwrap(), 0);
        let revoke = Command::RevokeTokens {
            actor,
            name: "admin".into(),
        };
        apply_to_both(&tables, &mut mem, 3, &revoke).unwrap();
        assert_eq!(tables.token_generation("admin").unwrap(), 3);
        assert_eq!(mem.token_generation("admin").unwrap(), 3);
        // Generations travel in snapshots like every other state table.
        assert_eq!(tables.row_counts().unwrap()[CF_TOKEN_GENERATIONS], 1);
    }

    #[test]
    fn join_tokens_and_removed_servers_round_trip_through_rocksdb() {
        use crate::fsm::Command;
        let (_dir, tables, mut mem, actor) = www_fixture();
        let cmds = [
            Command::IssueJoinToken {
                actor: actor.clone(),
                secret_hash: [1; 32],
                expires_ns: 100,
                now_ns: 10,
            },
            Command::IssueJoinToken {
                actor: actor.clone(),
                secret_hash: [2; 32],
                expires_ns: 100,
                now_ns: 10,
            },
            Command::UseJoinToken {
                secret_hash: [1; 32],
                node_id: 5,
                now_ns: 20,
            },
            Command::ForgetServer {
                actor: actor.clone(),
                node_id: 6,
                now_ns: 30,
            },
            // Trims both (expired more than a day ago).
            Command::IssueJoinToken {
                actor,
                secret_hash: [3; 32],
                expires_ns: i64::MAX,
                now_ns: 101 + crate::fsm::JOIN_TOKEN_KEEP_NS,
            },
        ];
        for (i, c) in cmds.iter().enumerate() {
            apply_to_both(&tables, &mut mem, i as u64 + 3, c).unwrap();
            let mut rows = tables.join_tokens().unwrap();
            rows.sort_by_key(|(h, _)| *h);
            assert_eq!(rows, mem.join_tokens().unwrap(), "after command {i}");
        }
        assert_eq!(mem.join_tokens.len(), 1);
        assert!(tables.removed_server(6).unwrap().is_some());
        assert_eq!(tables.removed_server(6).unwrap(), mem.removed_server(6).unwrap());
        assert!(tables.removed_server(5).unwrap().is_none());
    }
}
