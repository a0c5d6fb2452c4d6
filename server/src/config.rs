//! Server configuration: what `codafs cluster init` / `codafs server` write to `DIR/server.toml`
//! on first start and read on every later one. Every field has a default that suits production;
//! tests shorten the intervals.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Name of the config file inside a server directory.
pub const CONFIG_FILE: &str = "server.toml";
/// Written by `cluster init`; consumed (and deleted) by the first start of that server.
pub const BOOTSTRAP_FILE: &str = "bootstrap.json";
/// The admin credential `cluster init` creates.
pub const ADMIN_CREDENTIAL_FILE: &str = "admin.token";

/// Settings of one server.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Random Raft node id chosen when the directory was created.
    pub node_id: u64,
    /// Address to listen on, e.g. `127.0.0.1:7400`.
    pub listen: String,
    /// Address other servers and clients use to reach this one (defaults to `listen`).
    #[serde(default)]
    pub advertise: String,
    /// Votes in Raft but stores no blobs.
    #[serde(default)]
    pub witness: bool,
    /// Build a snapshot (and compact the log) after this many entries.
    #[serde(default = "d_snapshot_every")]
    pub snapshot_every: u64,
    /// How often the repair pass looks for referenced blobs missing here.
    #[serde(default = "d_repair_ms")]
    pub repair_interval_ms: u64,
    /// How often a repair pass checks every referenced blob, not only those recent commits
    /// referenced (see `blobs::suspects`): catches blob files lost behind the server's back.
    #[serde(default = "d_full_repair_s")]
    pub full_repair_interval_s: u64,
    /// How often a scrub pass re-verifies every stored blob (0 = never).
    #[serde(default = "d_scrub_s")]
    pub scrub_interval_s: u64,
    /// Scrub read rate limit, MiB/s.
    #[serde(default = "d_scrub_rate")]
    pub scrub_rate_mib: u64,
    /// Unreferenced blobs are deleted once older than this.
    #[serde(default = "d_gc_grace")]
    pub gc_grace_s: u64,
    /// Largest blob accepted, bytes.
    #[serde(default = "d_max_blob")]
    pub max_blob_bytes: u64,
    /// Plaintext transport (`cluster init --insecure`, or joined with a token of such a
    /// cluster): no encryption, no server authentication, and any client can act as a peer.
    #[serde(default)]
    pub insecure: bool,
    /// Free-space watermark of the server directory's filesystem, bytes: blob puts that would
    /// leave less free, and commits that add data while less is free, are refused. Unset =
    /// max(1 GiB, 5 % of the filesystem), at most half of it (see `blobs::space`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_free_bytes: Option<u64>,
    /// GC grace period while free space is under twice the watermark, seconds (at most
    /// `gc_grace_s`): overwritten versions are reclaimed sooner when space runs short.
    #[serde(default = "d_gc_pressure_grace")]
    pub gc_pressure_grace_s: u64,
    /// Address of the Prometheus endpoint (`GET /metrics`, plain unauthenticated HTTP, see
    /// `crate::metrics`); unset = no endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<String>,
    /// On a witness: most bytes its spool holds, relayed blobs and hints for data replicas that
    /// are down together (see `blobs::handoff`). Past it, hints are refused. Unset =
    /// [`DEFAULT_SPOOL_MAX`] (and not written, so older builds still read the file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spool_max_bytes: Option<u64>,
    /// Most request bytes held before their handlers take them, shared out by who sends them
    /// (see `body_budget`). Unset = [`crate::body_budget::DEFAULT_BUDGET`] (and not
    /// written, so older builds still read the file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_buffer_bytes: Option<u64>,
    /// Longest a connection may leave a reply frame unwritten before the server closes it,
    /// seconds (see `conn_watch`). Unset =
    /// [`DEFAULT_REPLY_STALL_S`] (and not written, so older builds still read the file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_stall_s: Option<u64>,
}

/// The reply stall timeout when server.toml sets none: two minutes, long enough that a
/// client's pause (a stopped process, a network blip) is not taken for a caller that does not
/// read.
pub const DEFAULT_REPLY_STALL_S: u64 = 120;

/// A witness's spool bound when server.toml sets none.
pub const DEFAULT_SPOOL_MAX: u64 = 4 << 30;

fn d_snapshot_every() -> u64 {
    5000
}
fn d_repair_ms() -> u64 {
    2000
}
fn d_full_repair_s() -> u64 {
    600
}
fn d_scrub_s() -> u64 {
    24 * 3600
}
fn d_scrub_rate() -> u64 {
    64
}
fn d_gc_grace() -> u64 {
    3600
}
fn d_gc_pressure_grace() -> u64 {
    60
}
fn d_max_blob() -> u64 {
    16 << 30
}

impl ServerConfig {
    /// A new config with a fresh random node id and defaults.
    pub fn new(listen: String, witness: bool) -> Self {
        let mut node_id = 0;
        while node_id == 0 {
            node_id = rand::random::<u64>() >> 1;
        }
        ServerConfig {
            node_id,
            advertise: listen.clone(),
            listen,
            witness,
            snapshot_every: d_snapshot_every(),
            repair_interval_ms: d_repair_ms(),
            full_repair_interval_s: d_full_repair_s(),
            scrub_interval_s: d_scrub_s(),
            scrub_rate_mib: d_scrub_rate(),
            gc_grace_s: d_gc_grace(),
            max_blob_bytes: d_max_blob(),
            insecure: false,
            min_free_bytes: None,
            gc_pressure_grace_s: d_gc_pressure_grace(),
            metrics_listen: None,
            spool_max_bytes: None,
            request_buffer_bytes: None,
            reply_stall_s: None,
        }
    }

    /// The reply stall timeout (at least a second).
    pub fn reply_stall(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.reply_stall_s.unwrap_or(DEFAULT_REPLY_STALL_S).max(1))
    }

    /// The witness spool's bound.
    pub fn spool_max(&self) -> u64 {
        self.spool_max_bytes.unwrap_or(DEFAULT_SPOOL_MAX)
    }

    /// The address peers and clients should use.
    pub fn advertised(&self) -> &str {
        if self.advertise.is_empty() {
            &self.listen
        } else {
            &self.advertise
        }
    }

    /// Reads `dir/server.toml`, if present.
    pub fn load(dir: &Path) -> Result<Option<Self>, ConfigError> {
        let path = dir.join(CONFIG_FILE);
        match std::fs::read_to_string(&path) {
            Ok(s) => toml::from_str(&s)
                .map(Some)
                .map_err(|e| ConfigError::Parse(path, e.to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ConfigError::Io(path, e)),
        }
    }

    /// Writes `dir/server.toml` atomically.
    pub fn save(&self, dir: &Path) -> Result<(), ConfigError> {
        let path = dir.join(CONFIG_FILE);
        let text = toml::to_string_pretty(self).map_err(|e| ConfigError::Parse(path.clone(), e.to_string()))?;
        let tmp = dir.join(format!("{CONFIG_FILE}.tmp"));
        std::fs::write(&tmp, text).map_err(|e| ConfigError::Io(tmp.clone(), e))?;
        std::fs::rename(&tmp, &path).map_err(|e| ConfigError::Io(path, e))
    }
}

/// Config file problems.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("{0}: {1}")]
    Parse(PathBuf, String),
}

/// What `cluster init` leaves for the first start: the cluster's identity and first key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Bootstrap {
    pub cluster_id: String,
    pub key: [u8; 32],
    pub admin_user: String,
}
