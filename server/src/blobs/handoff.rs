//! Hinted handoff through witnesses: publishing goes on while a data replica is down.
//!
//! The classic farm runs two data servers and a witness with a write quorum of 2. Without help,
//! losing either data server stops every content write, and W=1 would leave a single copy. So a
//! witness keeps a *hint*: a durable copy of a blob for the data replicas that could not take it.
//! - On the put path (`replicate`), when forwards failed because data replicas are down, the
//!   copy goes to a witness; a witness that relayed a client's put keeps its own spool copy.
//! - A hint counts toward the write quorum, in the put's answer and in the commit check
//!   (`copies`), as long as at least one data replica holds the blob too: readers read from
//!   data replicas, and a witness serves nobody.
//! - The witness's handoff loop ([`run`]) asks every data replica which spooled blobs it lacks,
//!   sends them, and drops a blob from the spool once every data replica holds it. A replica
//!   that cannot be asked keeps the blob spooled; so does a member that is gone for good, until
//!   it is removed from the cluster (`cluster remove`).
//! - The spool is bounded ([`SpoolBudget`], `spool_max_bytes` in server.toml): past it a hint is
//!   refused and the put fails as it would have without one, saying why.
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use codafs_common::Hash;
use codafs_proto::error::ErrorKind;
use codafs_proto::limits::MAX_MISSING_QUERY;
use codafs_proto::pb;

use crate::blobs::replicate::send_blob;
use crate::node::Node;

/// How often the handoff loop looks at the spool.
pub const HANDOFF_INTERVAL: Duration = Duration::from_secs(2);

/// The spool would pass its limit.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "the witness spool is full: {held} bytes are held for data servers that are down, and {size} more would pass its limit of {limit} bytes (spool_max_bytes in server.toml, `codafs server --spool-max`); bring the data servers back or remove the dead one"
)]
pub struct SpoolFull {
    pub held: u64,
    pub size: u64,
    pub limit: u64,
}

/// The bound on what a witness's spool holds, counting writes in progress.
pub struct SpoolBudget {
    limit: u64,
    reserved: AtomicU64,
}

/// Bytes reserved in the spool until the write that reserved them ends (stored, the store
/// counts them; failed, they were never there).
pub struct SpoolReservation<'a> {
    budget: &'a SpoolBudget,
    bytes: u64,
}

impl SpoolReservation<'_> {
    /// Bytes reserved.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Reserves `more` bytes beside the `held` bytes the spool stores now (a write whose bytes
    /// came past what it reserved so far), or refuses.
    pub fn grow(&mut self, held: u64, more: u64) -> Result<(), SpoolFull> {
        let mut extra = self.budget.reserve(held, more)?;
        self.bytes += std::mem::take(&mut extra.bytes);
        Ok(())
    }
}

impl Drop for SpoolReservation<'_> {
    fn drop(&mut self) {
        self.budget.reserved.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

impl SpoolBudget {
    pub fn new(limit: u64) -> Self {
        SpoolBudget {
            limit,
            reserved: AtomicU64::new(0),
        }
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Reserves `size` bytes beside the `held` bytes the spool stores now, or refuses.
    pub fn reserve(&self, held: u64, size: u64) -> Result<SpoolReservation<'_>, SpoolFull> {
        let before = self.reserved.fetch_add(size, Ordering::Relaxed);
        let r = SpoolReservation {
            budget: self,
            bytes: size,
        };
        let total = held.saturating_add(before).saturating_add(size);
        if total > self.limit {
            drop(r);
            return Err(SpoolFull {
                held: held.saturating_add(before),
                size,
                limit: self.limit,
            });
        }
        Ok(r)
    }
}

/// What one pass did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PassOutcome {
    /// Copies sent to data replicas that lacked them.
    pub sent: u64,
    /// Blobs dropped from the spool: every data replica holds them.
    pub dropped: u64,
    /// Blobs still spooled.
    pub kept: u64,
}

/// Runs the handoff loop until the server stops or becomes a data replica.
pub async fn run(node: Arc<Node>) {
    let mut stop = node.tasks.stop_signal();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(HANDOFF_INTERVAL) => {}
            _ = stop.changed() => {}
        }
        if *stop.borrow() || !node.is_witness() {
            return;
        }
        let (count, _) = node.blobs.stats();
        if count == 0 {
            continue;
        }
        let out = pass(&node).await;
        if out.sent > 0 || out.dropped > 0 {
            tracing::info!(
                sent = out.sent,
                dropped = out.dropped,
                kept = out.kept,
                "hinted handoff"
            );
        }
    }
}

/// One pass over the spool: hands each blob to the data replicas that lack it, and drops it
/// once all of them hold it.
pub async fn pass(node: &Arc<Node>) -> PassOutcome {
    let store = node.blobs.clone();
    let spooled = match tokio::task::spawn_blocking(move || store.list()).await {
        Ok(Ok(l)) => l,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "handoff: could not list the spool");
            return PassOutcome::default();
        }
        Err(e) => {
            tracing::warn!(error = %e, "handoff: listing the spool failed");
            return PassOutcome::default();
        }
    };
    let replicas: Vec<String> = node.data_replicas().into_iter().map(|m| m.info.addr).collect();
    let mut out = PassOutcome::default();
    if replicas.is_empty() {
        out.kept = spooled.len() as u64;
        return out;
    }
    let mut stop = node.tasks.stop_signal();
    for batch in spooled.chunks(MAX_MISSING_QUERY) {
        if *stop.borrow_and_update() {
            break;
        }
        hand_off(node, &replicas, batch, &mut out).await;
    }
    out
}

/// Hands off one batch of spooled blobs (at most one `Missing` query per replica).
async fn hand_off(node: &Node, replicas: &[String], batch: &[(Hash, u64)], out: &mut PassOutcome) {
    let hashes: Vec<Hash> = batch.iter().map(|(h, _)| *h).collect();
    // Per blob: the replicas that lack it; `None` once some replica could not say.
    let mut lacking: HashMap<Hash, Option<Vec<&str>>> = hashes.iter().map(|h| (*h, Some(Vec::new()))).collect();
    for addr in replicas {
        match missing_on(node, addr, &hashes).await {
            Ok(missing) => {
                for h in missing {
                    if let Some(Some(l)) = lacking.get_mut(&h) {
                        l.push(addr);
                    }
                }
            }
            Err(e) => {
                tracing::debug!(peer = %addr, error = %e, "handoff: could not ask a data replica; keeping the spool");
                lacking.values_mut().for_each(|l| *l = None);
            }
        }
    }
    for &(hash, size) in batch {
        let mut complete = matches!(lacking.get(&hash), Some(Some(_)));
        for addr in lacking.get(&hash).cloned().flatten().unwrap_or_default() {
            match send_blob(&node.peers, addr, node.blobs.clone(), hash, size).await {
                Ok(_) => out.sent += 1,
                Err(e) if e.kind == ErrorKind::Corrupt => {
                    // The receiver verifies: this copy is bad, and the put path checked it
                    // when it arrived, so the disk lost it. Other copies are the data replicas'.
                    tracing::warn!(%hash, error = %e, "handoff: the spooled copy failed verification; dropping it");
                    complete = true;
                    break;
                }
                Err(e) => {
                    tracing::debug!(%hash, error = %e, "handoff: sending failed; the next pass retries");
                    complete = false;
                }
            }
        }
        if complete {
            match node.blobs.remove(&hash) {
                Ok(()) => out.dropped += 1,
                Err(e) => {
                    tracing::debug!(%hash, error = %e, "handoff: could not drop a delivered blob");
                    out.kept += 1;
                }
            }
        } else {
            out.kept += 1;
        }
    }
}

/// The hashes of `hashes` the data replica at `addr` lacks, asked as a commit's check asks: an
/// old unreferenced copy there counts as lacking (its GC may take it before the commit that
/// needs it applies there), so the hint is handed off again, which restarts its grace.
async fn missing_on(node: &Node, addr: &str, hashes: &[Hash]) -> Result<Vec<Hash>, String> {
    let mut c = node.peers.blobs(addr).map_err(|e| e.to_string())?;
    let wire = hashes.iter().map(|h| bytes::Bytes::copy_from_slice(&h.0)).collect();
    let mut req = tonic::Request::new(pb::MissingBlobsRequest {
        hashes: wire,
        sizes: Vec::new(),
        exists_only: false,
    });
    req.set_timeout(Duration::from_secs(10));
    let r = c.missing(req).await.map_err(|s| s.message().to_string())?;
    Ok(r.into_inner()
        .missing
        .iter()
        .filter_map(|b| Hash::from_slice(b).ok())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_counts_what_is_held_and_what_is_in_flight() {
        let b = SpoolBudget::new(100);
        let first = b.reserve(40, 50).expect("fits");
        let err = b.reserve(40, 20).err().expect("40 held + 50 in flight + 20 > 100");
        assert_eq!((err.held, err.size, err.limit), (90, 20, 100));
        assert!(err.to_string().contains("spool is full"), "{err}");
        drop(first);
        assert!(b.reserve(40, 60).is_ok(), "a finished write frees its reservation");
        assert!(b.reserve(0, 101).is_err(), "one blob larger than the limit");
        // A write reserves as its bytes come: a step, then more, within the limit.
        let mut w = b.reserve(10, 30).expect("a first step");
        w.grow(10, 30).expect("a second");
        assert_eq!(w.bytes(), 60);
        let err = w.grow(10, 40).expect_err("10 held + 60 + 40 > 100");
        assert_eq!((err.held, err.size), (70, 40));
        assert_eq!(w.bytes(), 60, "a refused step takes nothing");
        drop(w);
        assert!(b.reserve(0, 100).is_ok(), "all given back");
    }
}
