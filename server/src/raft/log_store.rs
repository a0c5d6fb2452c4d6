//! The Raft log in RocksDB: entries in `raft_log` keyed by big-endian index; vote, committed id
//! and last purged id in `raft_meta`. Appends and votes are written with fsync before openraft
//! is told they are durable.
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{LogId, OptionalSend, RaftLogReader, Vote};
use rocksdb::{Direction, IteratorMode, WriteBatch, WriteOptions, DB};

use super::{read_err, write_err, Entry, NodeId, StoreErr, TypeConfig};
use crate::db::{CF_LOG, CF_RAFT_META};

const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_PURGED: &[u8] = b"last_purged";

/// RocksDB-backed Raft log.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
    /// Highest committed index seen, for `status` (openraft's metrics do not carry it).
    committed: Arc<AtomicU64>,
}

fn synced() -> WriteOptions {
    let mut wo = WriteOptions::default();
    wo.set_sync(true);
    wo
}

impl LogStore {
    /// Wraps the shared database.
    pub fn new(db: Arc<DB>) -> Self {
        LogStore {
            db,
            committed: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Highest committed log index this node has recorded.
    pub fn committed_index(&self) -> Arc<AtomicU64> {
        self.committed.clone()
    }

    fn cf(&self, name: &str) -> Result<&rocksdb::ColumnFamily, StoreErr> {
        self.db
            .cf_handle(name)
            .ok_or_else(|| read_err(std::io::Error::other(format!("no column family {name}"))))
    }

    fn get_meta<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, StoreErr> {
        match self.db.get_cf(self.cf(CF_RAFT_META)?, key).map_err(read_err)? {
            Some(v) => Ok(Some(bincode::deserialize(&v).map_err(read_err)?)),
            None => Ok(None),
        }
    }

    fn put_meta<T: serde::Serialize>(&self, key: &[u8], v: &T) -> Result<(), StoreErr> {
        let bytes = bincode::serialize(v).map_err(write_err)?;
        self.db
            .put_cf_opt(self.cf(CF_RAFT_META)?, key, bytes, &synced())
            .map_err(write_err)
    }

    fn last_entry_id(&self) -> Result<Option<LogId<NodeId>>, StoreErr> {
        let mut it = self.db.iterator_cf(self.cf(CF_LOG)?, IteratorMode::End);
        match it.next() {
            Some(item) => {
                let (_, v) = item.map_err(read_err)?;
                let e: Entry = bincode::deserialize(&v).map_err(read_err)?;
                Ok(Some(e.log_id))
            }
            None => Ok(None),
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StoreErr> {
        let start = match range.start_bound() {
            Bound::Included(s) => *s,
            Bound::Excluded(s) => s.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let key = start.to_be_bytes();
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(CF_LOG)?, IteratorMode::From(&key, Direction::Forward))
        {
            let (k, v) = item.map_err(read_err)?;
            let idx = u64::from_be_bytes(k.as_ref().try_into().map_err(read_err)?);
            if !range.contains(&idx) {
                break;
            }
            out.push(bincode::deserialize(&v).map_err(read_err)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StoreErr> {
        let last_purged_log_id = self.get_meta::<LogId<NodeId>>(KEY_PURGED)?;
        let last_log_id = self.last_entry_id()?.or(last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StoreErr> {
        self.put_meta(KEY_VOTE, vote)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StoreErr> {
        self.get_meta(KEY_VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), StoreErr> {
        if let Some(c) = committed {
            self.committed.fetch_max(c.index, Ordering::Relaxed);
        }
        // Not synced: losing it only means re-deriving the committed index from a quorum.
        let bytes = bincode::serialize(&committed).map_err(write_err)?;
        self.db
            .put_cf(self.cf(CF_RAFT_META)?, KEY_COMMITTED, bytes)
            .map_err(write_err)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StoreErr> {
        let c: Option<Option<LogId<NodeId>>> = self.get_meta(KEY_COMMITTED)?;
        let c = c.flatten();
        if let Some(c) = c {
            self.committed.fetch_max(c.index, Ordering::Relaxed);
        }
        Ok(c)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StoreErr>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let cf = self.cf(CF_LOG)?;
        let mut batch = WriteBatch::default();
        for e in entries {
            batch.put_cf(
                cf,
                e.log_id.index.to_be_bytes(),
                bincode::serialize(&e).map_err(write_err)?,
            );
        }
        let res = self.db.write_opt(batch, &synced()).map_err(std::io::Error::other);
        let failed = res.as_ref().err().map(|e| std::io::Error::other(e.to_string()));
        callback.log_io_completed(res);
        match failed {
            Some(e) => Err(write_err(e)),
            None => Ok(()),
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StoreErr> {
        let cf = self.cf(CF_LOG)?;
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(cf, log_id.index.to_be_bytes(), u64::MAX.to_be_bytes());
        // delete_range's end is exclusive; u64::MAX is never a real index.
        self.db.write_opt(batch, &synced()).map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StoreErr> {
        // Make every state-machine write so far durable before dropping the log that could
        // replay it (state-machine writes are not synced on their own; they share this WAL).
        self.db.flush_wal(true).map_err(write_err)?;
        self.put_meta(KEY_PURGED, &log_id)?;
        let cf = self.cf(CF_LOG)?;
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(cf, 0u64.to_be_bytes(), (log_id.index + 1).to_be_bytes());
        self.db.write_opt(batch, &synced()).map_err(write_err)
    }
}
