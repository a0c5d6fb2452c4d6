//! How well a volume's contents are replicated, for `codafs volume info`: every content a file
//! of the volume names (for a large file, its manifest and each chunk) is looked up on every
//! data server with `Blobs.Missing`. Repair keeps every data server holding every referenced
//! blob, so anything held by fewer is under-replicated (a server is catching up, or lost a
//! copy), and anything held by fewer than the write quorum is at risk.
use std::collections::{BTreeMap, HashSet};

use codafs_common::chunks::{is_chunked, Manifest};
use codafs_common::Hash;
use codafs_proto::limits::MAX_MISSING_QUERY;

use crate::backup::{walk, BackupError};
use crate::transport::Cluster;

/// Copies of a volume's contents across the data servers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopyHealth {
    /// Distinct blobs the volume's files name (manifests and chunks included).
    pub blobs: u64,
    /// Data servers in the cluster.
    pub data_servers: u64,
    /// Data servers that could not be asked (their copies count as missing).
    pub unreachable: Vec<String>,
    /// Blobs some data server lacks.
    pub under_replicated: u64,
    /// Blobs with fewer copies than `quorum`.
    pub below_quorum: u64,
    /// Blobs no data server holds.
    pub lost: u64,
    /// The write quorum checked against (the volume's, capped at the data servers).
    pub quorum: u64,
}

/// Counts the copies of every blob `volume` names on every data server.
pub async fn check(c: &Cluster, volume: &str, write_quorum: u32) -> Result<CopyHealth, BackupError> {
    let (walked, _) = walk(c, volume, 0).await?;
    let mut hashes: HashSet<Hash> = HashSet::new();
    for w in &walked {
        let Some(blob) = &w.blob else { continue };
        hashes.insert(blob.hash);
        if is_chunked(w.node.size) {
            let m = c.get_blob(blob).await?;
            let m = Manifest::decode(&m)
                .map_err(|e| BackupError::Refused(format!("{}: its manifest is unreadable: {e}", w.node.path)))?;
            hashes.extend(m.chunks.iter().map(|ch| ch.hash));
        }
    }
    let servers = c.list_servers().await?.servers;
    let data: Vec<String> = servers.iter().filter(|s| !s.witness).map(|s| s.addr.clone()).collect();
    let hashes: Vec<Hash> = hashes.into_iter().collect();
    let mut holders: BTreeMap<Hash, u64> = hashes.iter().map(|h| (*h, 0)).collect();
    let mut health = CopyHealth {
        blobs: hashes.len() as u64,
        data_servers: data.len() as u64,
        quorum: u64::from(write_quorum.max(1)).min(data.len().max(1) as u64),
        ..Default::default()
    };
    'servers: for addr in &data {
        let mut lacking = HashSet::new();
        for part in hashes.chunks(MAX_MISSING_QUERY) {
            match c.missing_on(addr, part).await {
                Ok(m) => lacking.extend(m),
                Err(e) => {
                    tracing::debug!(server = %addr, error = %e, "could not ask a data server which blobs it lacks");
                    health.unreachable.push(addr.clone());
                    continue 'servers;
                }
            }
        }
        for (h, n) in holders.iter_mut() {
            if !lacking.contains(h) {
                *n += 1;
            }
        }
    }
    for n in holders.into_values() {
        health.under_replicated += u64::from(n < health.data_servers);
        health.below_quorum += u64::from(n < health.quorum);
        health.lost += u64::from(n == 0);
    }
    Ok(health)
}
