//! openraft's state machine over the RocksDB tables.
//!
//! Each entry's delta and the new last-applied id are written in one `WriteBatch`, so the tables
//! and the applied index never disagree. Those writes are not fsynced on their own: the log store
//! syncs the shared WAL on every append and before purging, and anything lost in a crash is
//! re-applied from the log. Snapshots are a consistent dump of all state tables (a RocksDB
//! snapshot), kept as one file so a lagging or new replica can install it.
use std::io::Cursor;
use std::path::PathBuf;
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{AnyError, EntryPayload, LogId, RaftSnapshotBuilder, SnapshotMeta, StorageIOError, StoredMembership};
use rocksdb::WriteBatch;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};

use super::{read_err, write_err, Entry, NodeId, NodeInfo, StoreErr, TypeConfig};
use crate::blobs::suspects::Suspects;
use crate::db::{decode, encode, TableDump, Tables, CF_SM_META};
use crate::fsm::{self, ChangeRec, Outcome, Response};

const KEY_APPLIED: &[u8] = b"last_applied";
const KEY_MEMBERSHIP: &[u8] = b"membership";

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

/// On-disk snapshot: openraft's metadata plus every state table.
#[derive(Serialize, Deserialize)]
struct SnapshotFile {
    meta: SnapshotMeta<NodeId, NodeInfo>,
    tables: TableDump,
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

/// Last applied log id and membership, as openraft asks for them.
type AppliedState = (Option<LogId<NodeId>>, StoredMembership<NodeId, NodeInfo>);

fn meta_from_dump(tables: &TableDump) -> Result<AppliedState, StoreErr> {
    let mut applied = None;
    let mut membership = StoredMembership::default();
    for (name, rows) in tables {
        if name == CF_SM_META {
            for (k, v) in rows {
                if k == KEY_APPLIED {
                    applied = decode(v).map_err(read_err)?;
                } else if k == KEY_MEMBERSHIP {
                    membership = decode(v).map_err(read_err)?;
                }
            }
        }
    }
    Ok((applied, membership))
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

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StoreErr> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, NodeInfo>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StoreErr> {
        let data = snapshot.into_inner();
        let file: SnapshotFile = bincode::deserialize(&data)
            .map_err(|e| StoreErr::from(StorageIOError::read_snapshot(Some(meta.signature()), AnyError::new(&e))))?;
        self.tables.replace_all(&file.tables).map_err(write_err)?;
        self.guard
            .write(&self.snapshot_path, &data, meta.last_log_id.map_or(0, |l| l.index))?;
        tracing::info!(last = ?meta.last_log_id, "installed snapshot");
        let _ = self.notices.send(Notice::Reset);
        self.suspects.everything();
        self.applied_tx.send_replace(meta.last_log_id.map_or(0, |l| l.index));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StoreErr> {
        let data = match std::fs::read(&self.snapshot_path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(read_err(e)),
        };
        let file: SnapshotFile = bincode::deserialize(&data).map_err(read_err)?;
        Ok(Some(Snapshot {
            meta: file.meta,
            snapshot: Box::new(Cursor::new(data)),
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

    /// Writes `data` (the snapshot up to `index`) unless a newer snapshot is already there.
    fn write(&self, path: &std::path::Path, data: &[u8], index: u64) -> Result<bool, StoreErr> {
        use std::io::Write;
        let mut last = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|l| index < l) {
            return Ok(false);
        }
        let tmp = path.with_extension(format!("tmp.{}", codafs_common::now_ns()));
        // The snapshot holds the token-signing keys: owner only, whatever the umask.
        let mut f = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(write_err)?
        };
        f.write_all(data).map_err(write_err)?;
        f.sync_all().map_err(write_err)?;
        std::fs::rename(&tmp, path).map_err(write_err)?;
        *last = Some(index);
        Ok(true)
    }
}

/// Builds snapshots from a consistent view of the tables.
pub struct SnapshotBuilder {
    tables: Tables,
    path: PathBuf,
    guard: SnapshotFileGuard,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StoreErr> {
        let tables = self.tables.dump().map_err(read_err)?;
        let (last_log_id, last_membership) = meta_from_dump(&tables)?;
        let snapshot_id = format!("{}-{}", last_log_id.map_or(0, |l| l.index), codafs_common::now_ns());
        let meta = SnapshotMeta {
            last_log_id,
            last_membership,
            snapshot_id,
        };
        let data = bincode::serialize(&SnapshotFile {
            meta: meta.clone(),
            tables,
        })
        .map_err(write_err)?;
        let index = meta.last_log_id.map_or(0, |l| l.index);
        if !self.guard.write(&self.path, &data, index)? {
            tracing::info!(last = ?meta.last_log_id, "a newer snapshot was installed meanwhile; keeping it");
        }
        tracing::info!(last = ?meta.last_log_id, bytes = data.len(), "built snapshot");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}
