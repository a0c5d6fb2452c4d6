//! What `codafs status MNT` reports, as types: the mount daemon fills a [`MountStatus`], the
//! control socket carries it as JSON (`codafs status --json` prints that JSON), and the CLI,
//! tests and benchmarks read the fields by name instead of indexing a JSON value.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One mount's state and counters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MountStatus {
    /// Where it is mounted (added by the control socket).
    #[serde(default)]
    pub mountpoint: String,
    /// Whether the servers answer.
    pub connected: bool,
    /// The server the mount's calls go to first now (`None` from a mount that does not know:
    /// an older version, or a test's fake). A change stream opened before the preference
    /// moved stays on its server until it reconnects.
    #[serde(default)]
    pub server: Option<String>,
    /// `--read-only`: writes refused for everyone.
    pub read_only: bool,
    /// Local users whose tokens the mount holds.
    pub tokens: Vec<TokenStatus>,
    pub writes: WriteCounters,
    /// Kernel requests the daemon answered, by operation.
    pub fuse_requests: BTreeMap<String, u64>,
    /// Kernel page caches dropped because a change kept a file's size and mtime.
    pub stale_page_drops: u64,
    /// Requests answered on the kernel's thread without waiting (a cache hit, a logged change).
    #[serde(default)]
    pub answered_inline: u64,
    /// Requests that waited for a server, a lock or a timer on the mount's runtime.
    #[serde(default)]
    pub handed_off: u64,
    pub volumes: Vec<VolumeStatus>,
    pub cache: CacheStatus,
}

impl MountStatus {
    /// Requests of kernel operation `op` ("read", "lookup", ...); 0 if none was counted.
    pub fn requests(&self, op: &str) -> u64 {
        self.fuse_requests.get(op).copied().unwrap_or(0)
    }

    /// The status of volume `name`, if the mount shows it.
    pub fn volume(&self, name: &str) -> Option<&VolumeStatus> {
        self.volumes.iter().find(|v| v.name == name)
    }
}

/// A local user the mount writes for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenStatus {
    pub uid: u32,
    pub user: String,
    /// Unix seconds.
    pub expires: u64,
}

/// Writes through the mount.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteCounters {
    pub commits: u64,
    /// Stores the servers refused or that failed.
    pub failed_commits: u64,
    pub stored_bytes: u64,
    /// The write-back log (absent on write-through and read-only mounts).
    #[serde(default)]
    pub write_back: Option<crate::core::write::BacklogStatus>,
}

/// One volume as this mount sees it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VolumeStatus {
    pub name: String,
    /// The last version whose change event the mount applied.
    pub version: u64,
    /// Whether its change stream is live.
    pub connected: bool,
    pub cached: CachedFiles,
    pub hits: u64,
    pub misses: u64,
    pub hit_ratio: f64,
}

/// Files (and their bytes) whose content is in the cache.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedFiles {
    pub files: u64,
    pub bytes: u64,
    /// False when the volume has more files in cached listings than a status looks at
    /// (`MAX_STATUS_FILES`): the figures are then a lower bound.
    #[serde(default = "counted_all")]
    pub complete: bool,
}

fn counted_all() -> bool {
    true
}

/// The whole-file cache.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CacheStatus {
    pub entries: u64,
    pub bytes: u64,
    pub max_bytes: u64,
    pub hits: u64,
    pub misses: u64,
    pub hit_ratio: f64,
    pub fetched_bytes: u64,
    pub evictions: u64,
    /// Cached files that failed verification and were dropped.
    pub corrupt_dropped: u64,
    /// Copies a replica sent that failed verification, fetched again elsewhere.
    pub bad_copies_refetched: u64,
    /// Reads served from the servers without caching (the file did not fit).
    pub streamed_uncached: u64,
    /// Small files brought into the cache with their directory's listing.
    #[serde(default)]
    pub prefetched: u64,
    /// Of the small files sent with a listing, copies that failed verification.
    #[serde(default)]
    pub bad_small_copies: u64,
    /// Bytes of large files' new versions taken from chunks already cached (old versions, other
    /// files) instead of fetched.
    #[serde(default)]
    pub reused_chunk_bytes: u64,
    /// Packs held (a listing's small files cached as one file each), and the files in them
    /// (counted in `entries` too).
    #[serde(default)]
    pub packs: u64,
    #[serde(default)]
    pub packed_files: u64,
}

/// `hits / (hits + misses)`, 0 before any access.
pub fn ratio(hits: u64, misses: u64) -> f64 {
    if hits + misses == 0 {
        0.0
    } else {
        hits as f64 / (hits + misses) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_json_keeps_its_field_names() {
        let mut st = MountStatus {
            mountpoint: "/coda".into(),
            connected: true,
            ..Default::default()
        };
        st.fuse_requests.insert("read".into(), 3);
        st.cache.hit_ratio = ratio(3, 1);
        let v = serde_json::to_value(&st).expect("serializable");
        assert_eq!(v["connected"], true);
        assert_eq!(v["fuse_requests"]["read"], 3);
        assert_eq!(v["cache"]["hit_ratio"], 0.75);
        let back: MountStatus = serde_json::from_value(v).expect("round trip");
        assert_eq!(back, st);
        assert_eq!(back.requests("read"), 3);
        assert_eq!(back.requests("write"), 0);
    }
}
