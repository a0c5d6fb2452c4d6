//! Metadata by consensus: openraft wired to RocksDB storage and a gRPC transport.
//!
//! One log entry is one [`Command`]; its index becomes the version stamp of the volume it
//! changes. Nodes carry their address and whether they are a witness (votes, stores no blobs).
// openraft's `StorageError` is large, and its traits fix it as our error type here.
#![allow(clippy::result_large_err)]
pub mod log_store;
pub mod network;
pub mod reach;
pub mod snapshot_file;
pub mod state_machine;

use std::fmt;

use openraft::{AnyError, StorageError, StorageIOError};
use serde::{Deserialize, Serialize};

use crate::fsm::{Command, Response};

/// Raft node id (random, chosen by each server when its directory is created).
pub type NodeId = u64;

/// What the cluster membership records about a server.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Address other servers and clients reach it at (host:port).
    pub addr: String,
    /// Votes but stores no blobs.
    pub witness: bool,
}

impl fmt::Display for NodeInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.addr, if self.witness { " (witness)" } else { "" })
    }
}

openraft::declare_raft_types!(
    /// codafs's Raft type configuration.
    pub TypeConfig:
        D = Command,
        R = Response,
        NodeId = NodeId,
        Node = NodeInfo,
        // A file, not bytes in memory: see `snapshot_file`.
        SnapshotData = tokio::fs::File,
);

/// A running Raft node.
pub type Raft = openraft::Raft<TypeConfig>;
/// A log entry.
pub type Entry = openraft::Entry<TypeConfig>;
/// Storage error type used by openraft.
pub type StoreErr = StorageError<NodeId>;

pub(crate) fn read_err(e: impl std::error::Error + 'static) -> StoreErr {
    StorageIOError::read(AnyError::new(&e)).into()
}

pub(crate) fn write_err(e: impl std::error::Error + 'static) -> StoreErr {
    StorageIOError::write(AnyError::new(&e)).into()
}

/// Raft timing and compaction settings used by every server.
pub fn raft_config(snapshot_every: u64) -> openraft::Config {
    openraft::Config {
        cluster_name: "codafs".into(),
        heartbeat_interval: 150,
        election_timeout_min: 600,
        election_timeout_max: 1200,
        // Keep enough log for short outages; longer ones catch up by snapshot.
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(snapshot_every),
        max_in_snapshot_log_to_keep: snapshot_every / 2,
        purge_batch_size: 256,
        // Commit entries can be large (a whole site); keep each AppendEntries message bounded.
        max_payload_entries: 64,
        snapshot_max_chunk_size: 4 << 20,
        install_snapshot_timeout: 10_000,
        ..Default::default()
    }
}

#[cfg(test)]
mod storage_suite;
