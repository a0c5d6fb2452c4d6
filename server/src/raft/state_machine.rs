//! openraft's state machine over the RocksDB tables.
//!
//! Each entry's delta and the new last-applied id are written in one `WriteBatch`, so the tables
//! and the applied index never disagree. Those writes are not fsynced on their own: the log store
//! syncs the shared WAL on every append and before purging, and anything lost in a crash is
//! re-applied from the log. Snapshots are a consistent dump of all state tables (a RocksDB
//! snapshot), streamed into one file (`snapshot_file`) so a lagging or new replica can install
//! it; none of it is held in memory.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{AnyError, EntryPayload, LogId, RaftSnapshotBuilder, SnapshotMeta, StorageIOError, StoredMembership};
use rocksdb::WriteBatch;
use serde::Deserialize;
use tokio::sync::{broadcast, watch};

use super::{read_err, write_err, Entry, NodeId, NodeInfo, StoreErr, TypeConfig};
use crate::blobs::suspects::Suspects;
use crate::db::{decode, encode, Tables, CF_SM_META};
use crate::fsm::{self, ChangeRec, Outcome, Response};

pub(super) const KEY_APPLIED: &[u8] = b"last_applied";
pub(super) const KEY_MEMBERSHIP: &[u8] = b"membership";

/// A committed change to a volume, broadcast to change-stream subscribers as it is applied.
#[derive(Debug, Clone)]
pub enum Notice {
    Change {
        volume: u32,
        version: u64,
        change: Arc<ChangeRec>,
    },
    /// A snapshot replaced the state: subscribers re-read from the tables.
    Reset,
    /// Something that decides who may read changed (volume settings, accounts, keys,
    /// membership): subscribers check their right again.
    Rights,
}

/// Shared handles for readers of the applied state.
#[derive(Clone)]
pub struct Applied {
    pub tables: Tables,
    pub notices: broadcast::Sender<Notice>,
    pub index: watch::Receiver<u64>,
    /// Blobs repair should check: those applied entries referenced.
    pub suspects: Arc<Suspects>,
}

/// The state machine openraft drives.
pub struct StateMachine {
    tables: Tables,
    snapshot_path: PathBuf,
    guard: SnapshotFileGuard,
    notices: broadcast::Sender<Notice>,
    applied_tx: watch::Sender<u64>,
    suspects: Arc<Suspects>,
}

impl StateMachine {
    /// Opens the state machine over `tables`; snapshots are kept at `snapshot_path`.
    pub fn new(tables: Tables, snapshot_path: PathBuf) -> Result<(Self, Applied), StoreErr> {
        if tables.replace_pending().map_err(read_err)? {
            // The last snapshot install stopped halfway: the tables are part old, part new. The
            // snapshot it installed was kept before it started: install it again.
            let f = std::fs::File::open(&snapshot_path).map_err(read_err)?;
            let meta = super::snapshot_file::install(&tables, f)?;
            tracing::warn!(last = ?meta.last_log_id, "finished a snapshot install that a stop had cut short");
        }
        let (notices, _) = broadcast::channel(4096);
        let start = read_applied(&tables)?.map_or(0, |l| l.index);
        let (applied_tx, index) = watch::channel(start);
        let suspects = Arc::new(Suspects::default());
        let applied = Applied {
            tables: tables.clone(),
            notices: notices.clone(),
            index,
            suspects: suspects.clone(),
        };
        Ok((
            StateMachine {
                tables,
                guard: SnapshotFileGuard::for_file(&snapshot_path),
                snapshot_path,
                notices,
                applied_tx,
                suspects,
            },
            applied,
        ))
    }
}

fn read_applied(t: &Tables) -> Result<Option<LogId<NodeId>>, StoreErr> {
    let cf = t.cf(CF_SM_META).map_err(read_err)?;
    match t.db.get_cf(cf, KEY_APPLIED).map_err(read_err)? {
        Some(v) => decode(&v).map_err(read_err),
        None => Ok(None),
    }
}

/// The servers of the last membership this state machine applied (read before Raft starts, e.g.
/// to find peers for a certificate rotation).
pub fn stored_members(t: &Tables) -> Result<Vec<(NodeId, NodeInfo)>, StoreErr> {
    let cf = t.cf(CF_SM_META).map_err(read_err)?;
    let m: StoredMembership<NodeId, NodeInfo> = match t.db.get_cf(cf, KEY_MEMBERSHIP).map_err(read_err)? {
        Some(v) => decode(&v).map_err(read_err)?,
        None => StoredMembership::default(),
    };
    Ok(m.membership().nodes().map(|(id, n)| (*id, n.clone())).collect())
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, NodeInfo>), StoreErr> {
        let applied = read_applied(&self.tables)?;
        let cf = self.tables.cf(CF_SM_META).map_err(read_err)?;
        let membership = match self.tables.db.get_cf(cf, KEY_MEMBERSHIP).map_err(read_err)? {
            Some(v) => decode(&v).map_err(read_err)?,
            None => StoredMembership::default(),
        };
        Ok((applied, membership))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StoreErr>
    where
        I: IntoIterator<Item = Entry> + openraft::OptionalSend,
        I::IntoIter: openraft::OptionalSend,
    {
        let mut out = Vec::new();
        for entry in entries {
            let log_id = entry.log_id;
            let mut batch = WriteBatch::default();
            let meta_cf = self.tables.cf(CF_SM_META).map_err(write_err)?;
            let mut notices = Vec::new();
            let mut referenced = Vec::new();
            let resp = match &entry.payload {
                EntryPayload::Blank => Ok(Outcome::Done),
                EntryPayload::Normal(cmd) => {
                    let (delta, resp) = fsm::apply(&self.tables, log_id.index, cmd).map_err(write_err)?;
                    // Every command but a namespace commit is an administrative change.
                    if !matches!(cmd, fsm::Command::Commit { .. }) {
                        notices.push(Notice::Rights);
                    }
                    self.tables.write_delta(&mut batch, &delta).map_err(write_err)?;
                    // Content whose references changed may be missing here: repair checks it.
                    let counts = delta.blobrefs.iter().chain(&delta.manifestrefs);
                    referenced.extend(counts.filter(|(_, n)| **n > 0).map(|(h, _)| *h));
                    for (volume, version, change) in delta.changes {
                        notices.push(Notice::Change {
                            volume,
                            version,
                            change: Arc::new(change),
                        });
                    }
                    resp
                }
                EntryPayload::Membership(m) => {
                    let sm = StoredMembership::new(Some(log_id), m.clone());
                    batch.put_cf(meta_cf, KEY_MEMBERSHIP, encode(&sm).map_err(write_err)?);
                    notices.push(Notice::Rights);
                    Ok(Outcome::Done)
                }
            };
            batch.put_cf(meta_cf, KEY_APPLIED, encode(&Some(log_id)).map_err(write_err)?);
            self.tables.db.write(batch).map_err(write_err)?;
            if !referenced.is_empty() {
                self.suspects.add(referenced);
            }
            for n in notices {
                // No subscribers is fine.
                let _ = self.notices.send(n);
            }
            self.applied_tx.send_replace(log_id.index);
            out.push(resp);
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            guard: self.guard.clone(),
            tables: self.tables.clone(),
            path: self.snapshot_path.clone(),
        }
    }

    /// A snapshot arrives into an unnamed file beside the kept one (created, then unlinked at
    /// once: nothing is left behind if the transfer stops).
    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>, StoreErr> {
        let path = self
            .snapshot_path
            .with_extension(format!("recv.{}", codafs_common::now_ns()));
        let f = create_private(&path).map_err(write_err)?;
        std::fs::remove_file(&path).map_err(write_err)?;
        Ok(Box::new(tokio::fs::File::from_std(f)))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, NodeInfo>,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StoreErr> {
        use std::io::{Seek, SeekFrom};
        let snap_err = |e: std::io::Error| {
            StoreErr::from(StorageIOError::read_snapshot(Some(meta.signature()), AnyError::new(&e)))
        };
        let mut received = snapshot.into_std().await;
        received.seek(SeekFrom::Start(0)).map_err(snap_err)?;
        // Kept first (a stop during the install below finds it and installs it again), then
        // installed from the kept copy.
        let index = meta.last_log_id.map_or(0, |l| l.index);
        let kept = self.guard.keep(&self.snapshot_path, index, |out| {
            std::io::copy(&mut received, out).map(drop)
        })?;
        let source = match kept {
            Some(f) => f,
            None => {
                received.seek(SeekFrom::Start(0)).map_err(snap_err)?;
                received
            }
        };
        super::snapshot_file::install(&self.tables, source)?;
        tracing::info!(last = ?meta.last_log_id, "installed snapshot");
        let _ = self.notices.send(Notice::Reset);
        self.suspects.everything();
        self.applied_tx.send_replace(meta.last_log_id.map_or(0, |l| l.index));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StoreErr> {
        let f = match std::fs::File::open(&self.snapshot_path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(read_err(e)),
        };
        let meta = super::snapshot_file::read_meta(&f)?;
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(rewound(f)?),
        }))
    }
}

/// Serialises writes of the snapshot file (openraft builds snapshots in a task of their own,
/// concurrently with installs) and remembers the newest one written, so an older snapshot never
/// replaces a newer one.
#[derive(Clone, Default)]
pub struct SnapshotFileGuard(Arc<std::sync::Mutex<Option<u64>>>);

impl SnapshotFileGuard {
    /// A guard that knows the index of the snapshot already at `path`, if any.
    fn for_file(path: &std::path::Path) -> Self {
        #[derive(Deserialize)]
        struct MetaOnly {
            meta: SnapshotMeta<NodeId, NodeInfo>,
        }
        // bincode reads struct fields in order: this reads the metadata prefix only.
        let index = std::fs::File::open(path)
            .ok()
            .and_then(|f| bincode::deserialize_from::<_, MetaOnly>(std::io::BufReader::new(f)).ok())
            .map(|m| m.meta.last_log_id.map_or(0, |l| l.index));
        SnapshotFileGuard(Arc::new(std::sync::Mutex::new(index)))
    }

    /// Keeps a snapshot up to `index` at `path`, written by `fill` into a new file that then
    /// replaces the old one, unless a newer snapshot is already there. Returns the kept file,
    /// open at its start, or `None` if the newer one stayed.
    fn keep(
        &self,
        path: &Path,
        index: u64,
        fill: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
    ) -> Result<Option<std::fs::File>, StoreErr> {
        let tmp = path.with_extension(format!("tmp.{}", codafs_common::now_ns()));
        let written = create_private(&tmp).and_then(|mut f| {
            fill(&mut f)?;
            f.sync_all()?;
            Ok(f)
        });
        let f = match written {
            Ok(f) => f,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(write_err(e));
            }
        };
        if !self.place(&tmp, path, index)? {
            return Ok(None);
        }
        rewound_std(f).map(Some).map_err(read_err)
    }

    /// Renames the complete, synced snapshot file `tmp` (up to `index`) to `path`, unless a
    /// newer snapshot is already there (then `tmp` is removed). Returns whether it was placed.
    fn place(&self, tmp: &Path, path: &Path, index: u64) -> Result<bool, StoreErr> {
        let mut last = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|l| index < l) {
            let _ = std::fs::remove_file(tmp);
            return Ok(false);
        }
        if let Err(e) = std::fs::rename(tmp, path) {
            let _ = std::fs::remove_file(tmp);
            return Err(write_err(e));
        }
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(write_err)?;
        }
        *last = Some(index);
        Ok(true)
    }
}

/// A new file only its owner may read: the snapshot holds the token-signing keys, whatever
/// the umask.
fn create_private(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

fn rewound_std(mut f: std::fs::File) -> std::io::Result<std::fs::File> {
    use std::io::Seek;
    f.seek(std::io::SeekFrom::Start(0))?;
    Ok(f)
}

/// `f` at its start, as openraft reads snapshots.
fn rewound(f: std::fs::File) -> Result<tokio::fs::File, StoreErr> {
    Ok(tokio::fs::File::from_std(rewound_std(f).map_err(read_err)?))
}

/// Builds snapshots from a consistent view of the tables.
pub struct SnapshotBuilder {
    tables: Tables,
    path: PathBuf,
    guard: SnapshotFileGuard,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StoreErr> {
        // Written straight into a new file from one RocksDB snapshot, row by row.
        let started = std::time::Instant::now();
        let id = |l: Option<LogId<NodeId>>| format!("{}-{}", l.map_or(0, |l| l.index), codafs_common::now_ns());
        let tmp = self.path.with_extension(format!("build.{}", codafs_common::now_ns()));
        let built = create_private(&tmp).map_err(write_err).and_then(|mut f| {
            let meta = super::snapshot_file::write(&self.tables, &mut f, id)?;
            f.sync_all().map_err(write_err)?;
            Ok((meta, f))
        });
        let (meta, f) = match built {
            Ok(b) => b,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        let bytes = f.metadata().map_or(0, |m| m.len());
        let index = meta.last_log_id.map_or(0, |l| l.index);
        // `f` stays readable for the caller whether or not its name is kept.
        if !self.guard.place(&tmp, &self.path, index)? {
            tracing::info!(last = ?meta.last_log_id, "a newer snapshot was installed meanwhile; keeping it");
        }
        let ms = started.elapsed().as_millis() as u64;
        tracing::info!(last = ?meta.last_log_id, bytes, ms, "built snapshot");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(rewound(f)?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db;

    /// A stop in the middle of a snapshot install leaves the tables half replaced; the next
    /// start installs the kept `snapshot.bin` again before anything reads them.
    #[test]
    fn an_interrupted_install_is_finished_at_the_next_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = Tables::new(db::open(&dir.path().join("src")).expect("open"));
        src.replace_rows(&[(db::CF_VOLUMES, b"www".to_vec(), b"v".to_vec())])
            .expect("row");
        let path = dir.path().join("snapshot.bin");
        let f = std::fs::File::create(&path).expect("create");
        super::super::snapshot_file::write(&src, f, |_| "s".into()).expect("write");

        let dst = Tables::new(db::open(&dir.path().join("dst")).expect("open"));
        dst.replace_rows(&[(db::CF_OBJECTS, b"old".to_vec(), b"o".to_vec())])
            .expect("row");
        dst.replace_start().expect("start, then the server stops");
        let (_sm, applied) = StateMachine::new(dst.clone(), path).expect("start");
        assert!(!applied.tables.replace_pending().expect("marker"));
        assert_eq!(
            applied.tables.row_counts().expect("rows"),
            src.row_counts().expect("rows")
        );
    }
}
