//! The commit-time check that the blobs a commit references have W durable copies: the
//! leader asks every data replica which of them it lacks (`Blobs.Missing`), and counts.
use std::collections::HashMap;
use std::time::Duration;

use codafs_common::Hash;
use codafs_proto::pb;

use crate::node::{Node, NodeError};

impl Node {
    /// Checks that every blob a commit references has reached the volume's write quorum, and
    /// that declared sizes match the stored content where this server holds a copy. Copies found
    /// here get their mtime refreshed, so garbage collection's grace period restarts for content
    /// that is about to be referenced again.
    pub async fn check_blob_copies(&self, blobs: &[(Hash, u64)], write_quorum: u32) -> Result<(), NodeError> {
        if blobs.is_empty() {
            return Ok(());
        }
        let replicas = self.data_replicas();
        let need = crate::blobs::quorum::effective_write_quorum(write_quorum, replicas.len());
        let mut have: HashMap<Hash, usize> = blobs.iter().map(|(h, _)| (*h, 0)).collect();
        let mut failures = Vec::new();
        let mut queries = Vec::new();
        for m in &replicas {
            if m.id == self.id {
                for (h, size) in blobs {
                    if let Ok(meta) = std::fs::metadata(self.blobs.path(h)) {
                        if meta.len() != *size {
                            return Err(NodeError::Invalid(format!(
                                "declared size {size} of blob {h} does not match its {} stored bytes",
                                meta.len()
                            )));
                        }
                        self.blobs.touch(h);
                        if let Some(n) = have.get_mut(h) {
                            *n += 1;
                        }
                    }
                }
                continue;
            }
            let peers = self.peers.clone();
            let addr = m.info.addr.clone();
            let hashes: Vec<Hash> = have.keys().copied().collect();
            queries.push(async move {
                let mut missing = Vec::new();
                for chunk in hashes.chunks(codafs_proto::limits::MAX_MISSING_QUERY) {
                    let wire = chunk.iter().map(|h| bytes::Bytes::copy_from_slice(&h.0)).collect();
                    let mut c = peers.blobs(&addr).map_err(|e| format!("{addr}: {e}"))?;
                    let mut req = tonic::Request::new(pb::MissingBlobsRequest { hashes: wire });
                    req.set_timeout(Duration::from_secs(10));
                    let r = c.missing(req).await.map_err(|s| format!("{addr}: {}", s.message()))?;
                    missing.extend(r.into_inner().missing);
                }
                Ok::<_, String>(missing)
            });
        }
        for result in futures::future::join_all(queries).await {
            match result {
                Ok(missing) => {
                    let missing: std::collections::HashSet<&[u8]> = missing.iter().map(|b| b.as_ref()).collect();
                    for (h, n) in have.iter_mut() {
                        if !missing.contains(&h.0[..]) {
                            *n += 1;
                        }
                    }
                }
                Err(e) => failures.push(e),
            }
        }
        for (hash, n) in have {
            if n < need {
                if !failures.is_empty() {
                    return Err(NodeError::Unavailable(format!(
                        "only {n} of {need} copies of blob {hash} confirmed; could not ask: {}",
                        failures.join("; ")
                    )));
                }
                return Err(NodeError::NotEnoughCopies { hash, have: n, need });
            }
        }
        Ok(())
    }
}
