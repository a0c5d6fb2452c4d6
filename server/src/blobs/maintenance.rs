//! Background blob maintenance on data replicas:
//! - **repair**: every referenced blob missing here (never received, lost in a crash, or
//!   quarantined as corrupt) is fetched from a peer and verified;
//! - **scrub**: stored blobs are re-hashed at a bounded rate; corrupt ones are quarantined;
//! - **GC**: blobs no volume references are deleted after a grace period (so a blob uploaded for
//!   a commit not yet made survives). Under space pressure (see `space`) the grace period is
//!   `gc_pressure_grace_s` instead and GC runs every few seconds, and at once after a put was
//!   refused for lack of space: overwritten versions cannot pile up until the disk is full.
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use codafs_common::Hash;
use codafs_proto::pb;

use crate::fsm::StateView;
use crate::node::Node;

/// Fetches `hash` from the server at `addr` into the local store, verifying it.
pub async fn fetch_from(node: &Node, addr: &str, hash: Hash) -> Result<(), String> {
    let mut client = node.peers.blobs(addr).map_err(|e| e.to_string())?;
    let mut req = tonic::Request::new(pb::GetBlobRequest {
        hash: bytes::Bytes::copy_from_slice(&hash.0),
        offset: 0,
        // Peers read by certificate (repair), with no ticket.
        ..Default::default()
    });
    req.set_timeout(Duration::from_secs(300));
    let mut stream = client.get(req).await.map_err(|s| s.message().to_string())?.into_inner();
    let mut writer = None;
    let mut room = None;
    while let Some(chunk) = stream.message().await.map_err(|s| s.message().to_string())? {
        if writer.is_none() {
            // Repair too stays above the watermark: a copy missing here is still on a peer.
            let what = format!("repair blob {hash} ({} bytes)", chunk.total_size);
            room = Some(node.space.reserve(chunk.total_size, &what).map_err(|e| e.to_string())?);
            writer = Some(node.blobs.writer(hash, chunk.total_size).map_err(|e| e.to_string())?);
        }
        if let Some(w) = writer.as_mut() {
            tokio::task::block_in_place(|| w.write(&chunk.data)).map_err(|e| e.to_string())?;
        }
    }
    let w = writer.ok_or("empty reply")?;
    tokio::task::block_in_place(|| w.finish()).map_err(|e| e.to_string())?;
    drop(room);
    Ok(())
}

/// One repair pass; returns how many blobs are still missing. Ends early when the server stops.
pub async fn repair_pass(node: &Arc<Node>) -> u64 {
    let refs = match node.tables().referenced_blobs() {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "repair: reading references failed");
            return node.counters.repair_backlog.load(Ordering::Relaxed);
        }
    };
    let missing: Vec<Hash> = refs.into_iter().filter(|h| !node.blobs.has(h)).collect();
    node.counters
        .repair_backlog
        .store(missing.len() as u64, Ordering::Relaxed);
    if missing.is_empty() {
        return 0;
    }
    let peers: Vec<String> = node
        .data_replicas()
        .into_iter()
        .filter(|m| m.id != node.id)
        .map(|m| m.info.addr)
        .collect();
    let mut left = missing.len() as u64;
    for hash in missing {
        if node.tasks.stopping() {
            break;
        }
        for addr in &peers {
            match fetch_from(node, addr, hash).await {
                Ok(()) => {
                    node.counters.repaired.fetch_add(1, Ordering::Relaxed);
                    left -= 1;
                    node.counters.repair_backlog.store(left, Ordering::Relaxed);
                    tracing::info!(%hash, from = %addr, "repaired blob");
                    break;
                }
                Err(e) => tracing::debug!(%hash, from = %addr, error = %e, "repair fetch failed"),
            }
        }
    }
    left
}

/// One scrub pass at `rate` bytes/s; ends early when the server stops.
pub async fn scrub_pass(node: &Arc<Node>, rate: u64) {
    let list = match node.blobs.list() {
        Ok(l) => l,
        Err(e) => return tracing::warn!(error = %e, "scrub: listing blobs failed"),
    };
    for (hash, size) in list {
        if node.tasks.stopping() {
            return;
        }
        let n = node.clone();
        let r = tokio::task::spawn_blocking(move || n.blobs.verify(&hash)).await;
        if let Ok(Err(crate::blobs::BlobError::Corrupt(_))) = r {
            node.repair_kick.notify_one();
        }
        node.counters.scrubbed.fetch_add(1, Ordering::Relaxed);
        if rate > 0
            && node
                .tasks
                .sleep_or_stop(Duration::from_secs_f64(size as f64 / rate as f64))
                .await
        {
            return;
        }
    }
}

/// One GC pass: deletes unreferenced blobs older than `grace`.
pub fn gc_pass(node: &Node, grace: Duration) {
    let list = match node.blobs.list() {
        Ok(l) => l,
        Err(e) => return tracing::warn!(error = %e, "gc: listing blobs failed"),
    };
    for (hash, _) in list {
        let unreferenced = matches!(node.tables().blobref(&hash), Ok(0));
        if unreferenced && node.blobs.age(&hash).is_some_and(|a| a >= grace) && node.blobs.remove(&hash).is_ok() {
            node.counters.gc_removed.fetch_add(1, Ordering::Relaxed);
            tracing::info!(%hash, "collected unreferenced blob");
        }
    }
}

/// How often GC runs while free space is under twice the watermark.
const PRESSURE_GC_INTERVAL: Duration = Duration::from_secs(5);
/// Refusals wake GC at most this often (a burst of refused puts runs one pass).
const PRESSURE_GC_MIN_GAP: Duration = Duration::from_secs(1);

/// Runs repair, scrub and GC until the server stops.
pub async fn run(node: Arc<Node>) {
    let mut stop = node.tasks.stop_signal();
    if node.cfg.witness {
        return;
    }
    let repair_every = Duration::from_millis(node.cfg.repair_interval_ms.max(50));
    let scrub_every = Duration::from_secs(node.cfg.scrub_interval_s);
    let normal_grace = Duration::from_secs(node.cfg.gc_grace_s);
    let pressure_grace = Duration::from_secs(node.cfg.gc_pressure_grace_s).min(normal_grace);
    let rate = node.cfg.scrub_rate_mib << 20;
    let mut last_scrub = tokio::time::Instant::now();
    let mut last_gc = tokio::time::Instant::now();
    loop {
        let mut refused = false;
        tokio::select! {
            _ = tokio::time::sleep(repair_every) => {}
            _ = node.repair_kick.notified() => {}
            _ = node.space.pressure.notified() => refused = true,
            _ = stop.changed() => {}
        }
        if *stop.borrow() {
            return;
        }
        let pressure = refused || node.space.under_pressure();
        let (grace, gc_every) = if pressure {
            (pressure_grace, PRESSURE_GC_INTERVAL.max(repair_every))
        } else {
            (
                normal_grace,
                normal_grace.min(Duration::from_secs(600)).max(repair_every),
            )
        };
        if refused && last_gc.elapsed() >= PRESSURE_GC_MIN_GAP {
            // A put was just refused: collect now, before repair or scrub.
            let n = node.clone();
            let _ = tokio::task::spawn_blocking(move || gc_pass(&n, grace)).await;
            last_gc = tokio::time::Instant::now();
        }
        repair_pass(&node).await;
        if node.cfg.scrub_interval_s > 0 && last_scrub.elapsed() >= scrub_every {
            scrub_pass(&node, rate).await;
            last_scrub = tokio::time::Instant::now();
        }
        if last_gc.elapsed() >= gc_every {
            let n = node.clone();
            let _ = tokio::task::spawn_blocking(move || gc_pass(&n, grace)).await;
            last_gc = tokio::time::Instant::now();
        }
    }
}
