//! Background blob maintenance on data replicas:
//! - **repair**: every referenced blob missing here (never received, lost in a crash, or
//!   quarantined as corrupt) is fetched from a peer and verified, and so is every chunk listed by
//!   a referenced chunk manifest (`manifestrefs`). A pass checks what recent commits referenced,
//!   and everything only after a start, a snapshot, corruption, or `full_repair_interval_s`
//!   (see `suspects`);
//! - **scrub**: stored blobs are re-hashed at a bounded rate, a turn of a few seconds at a time
//!   between repair passes (a pass over a large store takes hours); corrupt ones are
//!   quarantined;
//! - **GC**: blobs no volume references, directly or as a chunk of a referenced manifest, are
//!   deleted after a grace period (so a blob uploaded for a commit not yet made survives). Under space pressure (see `space`) the grace period is
//!   `gc_pressure_grace_s` instead and GC runs every few seconds, and at once after a put was
//!   refused for lack of space: overwritten versions cannot pile up until the disk is full.
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use codafs_common::Hash;
use codafs_proto::pb;

use crate::blobs::asked;
use crate::blobs::manifests::Held;
use crate::blobs::replicate::ForwardError;
use crate::blobs::suspects::Scope;
use crate::fsm::StateView;
use crate::node::{Node, NodeError};

/// Fetches `hash` from the server at `addr` into the local store, verifying it. The error
/// carries the kind of the peer's refusal (`NotFound` when it lacks the blob).
pub async fn fetch_from(node: &Node, addr: &str, hash: Hash) -> Result<(), ForwardError> {
    let local = |e: &dyn std::fmt::Display| ForwardError::unreachable(addr, e);
    let refused = |s: tonic::Status| ForwardError::refused(addr, &s);
    let mut client = node.peers.blobs(addr).map_err(|e| local(&e))?;
    let mut req = tonic::Request::new(pb::GetBlobRequest {
        hash: bytes::Bytes::copy_from_slice(&hash.0),
        offset: 0,
        // Peers read by certificate (repair), with no ticket.
        ..Default::default()
    });
    req.set_timeout(Duration::from_secs(300));
    let mut stream = client.get(req).await.map_err(refused)?.into_inner();
    let mut writer = None;
    let mut room = None;
    while let Some(chunk) = stream.message().await.map_err(refused)? {
        if writer.is_none() {
            // Repair too stays above the watermark: a copy missing here is still on a peer.
            let what = format!("repair blob {hash} ({} bytes)", chunk.total_size);
            room = Some(node.space.reserve(chunk.total_size, &what).map_err(|e| local(&e))?);
            writer = Some(node.blobs.writer(hash, chunk.total_size).map_err(|e| local(&e))?);
        }
        if let Some(w) = writer.as_mut() {
            tokio::task::block_in_place(|| w.write(&chunk.data)).map_err(|e| local(&e))?;
        }
    }
    let w = writer.ok_or_else(|| local(&"empty reply"))?;
    tokio::task::block_in_place(|| w.finish()).map_err(|e| local(&e))?;
    drop(room);
    Ok(())
}

/// Most missing chunks one repair pass lists and fetches (the rest wait for the next pass;
/// all of them are counted in the backlog). Bounds the pass's memory when a new replica lacks
/// everything.
const REPAIR_CHUNKS_PER_PASS: usize = 1 << 20;

/// One repair pass over `scope`; returns how many blobs are still missing. Referenced blobs
/// come first (the chunk manifests among them), then the chunks of the referenced manifests held
/// here, listed again after the first step so one pass refills a whole file. What it could not
/// fetch (no peer had it, or peers were down) stays a suspect for the next pass. Ends early when
/// the server stops.
pub async fn repair_pass(node: &Arc<Node>, scope: Scope) -> u64 {
    let t = node.tables();
    let everything = scope == Scope::Everything;
    let listed = match scope {
        Scope::Everything => t.referenced_blobs().and_then(|r| Ok((r, t.referenced_manifests()?))),
        Scope::Some(set) => referenced_among(t, set),
    };
    let (refs, manifests) = match listed {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "repair: reading references failed");
            node.applied.suspects.everything();
            return node.counters.repair_backlog.load(Ordering::Relaxed);
        }
    };
    let missing: Vec<Hash> = refs.into_iter().filter(|h| !node.blobs.has(h)).collect();
    let (chunks, chunks_missing) = missing_chunks(node, &manifests).await;
    let peers: Vec<String> = node
        .data_replicas()
        .into_iter()
        .filter(|m| m.id != node.id)
        .map(|m| m.info.addr)
        .collect();
    let left_refs = fetch_all(node, &peers, &missing, chunks_missing).await;
    let manifest_fetched = missing
        .iter()
        .any(|h| node.blobs.has(h) && t.manifestref(h).is_ok_and(|n| n > 0));
    let (chunks, chunks_missing) = if manifest_fetched {
        // Manifests fetched just now list chunks that were unknown a moment ago.
        missing_chunks(node, &manifests).await
    } else {
        (chunks, chunks_missing)
    };
    let not_listed = chunks_missing.saturating_sub(chunks.len() as u64);
    let left_chunks = fetch_all(node, &peers, &chunks, left_refs.len() as u64 + not_listed).await;
    let left = left_refs.len() as u64 + not_listed + left_chunks.len() as u64;
    if everything && left > 0 {
        node.applied.suspects.everything();
    } else if left > 0 {
        // A chunk is found again through its manifest, so those are what the next pass checks.
        let again = if left_chunks.is_empty() && not_listed == 0 {
            Vec::new()
        } else {
            manifests
        };
        node.applied.suspects.add(left_refs.into_iter().chain(again));
    }
    left
}

/// The referenced blobs and the referenced manifests among `set`.
fn referenced_among(
    t: &crate::db::Tables,
    set: HashSet<Hash>,
) -> Result<(Vec<Hash>, Vec<Hash>), crate::fsm::StoreError> {
    let (mut refs, mut manifests) = (Vec::new(), Vec::new());
    for h in set {
        if t.blobref(&h)? > 0 {
            refs.push(h);
        }
        if t.manifestref(&h)? > 0 {
            manifests.push(h);
        }
    }
    Ok((refs, manifests))
}

/// Fetches each of `hashes` from the first peer that has it. Keeps `repair_backlog` at what is
/// still missing (`others`: missing blobs not in this list). Returns those not fetched.
async fn fetch_all(node: &Node, peers: &[String], hashes: &[Hash], others: u64) -> Vec<Hash> {
    let mut left = Vec::new();
    let mut to_go = hashes.len() as u64;
    node.counters.repair_backlog.store(to_go + others, Ordering::Relaxed);
    for (i, hash) in hashes.iter().enumerate() {
        if node.tasks.stopping() {
            left.extend_from_slice(&hashes[i..]);
            break;
        }
        let mut fetched = false;
        for addr in peers {
            match fetch_from(node, addr, *hash).await {
                Ok(()) => {
                    node.counters.repaired.fetch_add(1, Ordering::Relaxed);
                    to_go -= 1;
                    node.counters.repair_backlog.store(to_go + others, Ordering::Relaxed);
                    tracing::info!(%hash, from = %addr, "repaired blob");
                    fetched = true;
                    break;
                }
                Err(e) => tracing::debug!(%hash, from = %addr, error = %e, "repair fetch failed"),
            }
        }
        if !fetched {
            left.push(*hash);
        }
    }
    left
}

/// Chunks of `manifests` (referenced, held here) that this server lacks: up to
/// [`REPAIR_CHUNKS_PER_PASS`] of them, and how many there are in all.
async fn missing_chunks(node: &Arc<Node>, manifests: &[Hash]) -> (Vec<Hash>, u64) {
    if manifests.is_empty() {
        return (Vec::new(), 0);
    }
    let (n, manifests) = (node.clone(), manifests.to_vec());
    let listed = tokio::task::spawn_blocking(move || {
        let mut found = MissingChunks::new(REPAIR_CHUNKS_PER_PASS);
        for m in &manifests {
            match n.manifest_if_stored(m) {
                Ok(held) => found.add(&held, |h| n.blobs.has(h)),
                Err(e) => tracing::warn!(manifest = %m, error = %e, "repair: reading a manifest failed"),
            }
        }
        (found.listed, found.count)
    })
    .await;
    listed.unwrap_or_else(|e| {
        tracing::warn!(error = %e, "repair: listing missing chunks failed");
        (Vec::new(), 0)
    })
}

/// The missing chunks of a set of manifests, each once: the first `cap` listed, all counted.
struct MissingChunks {
    seen: HashSet<Hash>,
    listed: Vec<Hash>,
    count: u64,
    cap: usize,
}

impl MissingChunks {
    fn new(cap: usize) -> Self {
        MissingChunks {
            seen: HashSet::new(),
            listed: Vec::new(),
            count: 0,
            cap,
        }
    }

    /// Adds the chunks `stored` says are missing from one manifest. A manifest not held here
    /// names no chunks yet (it is repaired as a referenced blob first); a blob that is not a
    /// manifest names none at all.
    fn add(&mut self, manifest: &Held, stored: impl Fn(&Hash) -> bool) {
        let Held::Manifest(m) = manifest else { return };
        for c in &m.manifest.chunks {
            if stored(&c.hash) {
                continue;
            }
            // Past the cap, `seen` stops growing too: a chunk missing from two files may then be
            // counted twice, which only overstates the backlog until the next pass.
            if self.listed.len() < self.cap {
                if !self.seen.insert(c.hash) {
                    continue;
                }
                self.listed.push(c.hash);
            } else if self.seen.contains(&c.hash) {
                continue;
            }
            self.count += 1;
        }
    }
}

/// How long one turn of a scrub pass may run before repair and GC get theirs: a pass over a
/// large store at the bounded rate takes hours, and repair must not wait that long.
const SCRUB_SLICE: Duration = Duration::from_secs(2);

/// The blobs a scrub pass has still to re-hash, listed when it starts.
pub type ScrubPass = std::vec::IntoIter<(Hash, u64)>;

/// Starts a scrub pass: every blob stored now.
fn start_scrub(node: &Node) -> Option<ScrubPass> {
    match node.blobs.list() {
        Ok(l) => Some(l.into_iter()),
        Err(e) => {
            tracing::warn!(error = %e, "scrub: listing blobs failed");
            None
        }
    }
}

/// One turn of a scrub pass at `rate` bytes/s, for about [`SCRUB_SLICE`]; true once the pass
/// is done (or the server stops).
pub async fn scrub_some(node: &Arc<Node>, pass: &mut ScrubPass, rate: u64) -> bool {
    let until = tokio::time::Instant::now() + SCRUB_SLICE;
    while tokio::time::Instant::now() < until {
        let Some((hash, size)) = pass.next() else { return true };
        if node.tasks.stopping() {
            return true;
        }
        let n = node.clone();
        let r = tokio::task::spawn_blocking(move || n.blobs.verify(&hash)).await;
        if let Ok(Err(crate::blobs::BlobError::Corrupt(_))) = r {
            node.repair_now();
        }
        node.counters.scrubbed.fetch_add(1, Ordering::Relaxed);
        if rate > 0
            && node
                .tasks
                .sleep_or_stop(Duration::from_secs_f64(size as f64 / rate as f64))
                .await
        {
            return true;
        }
    }
    false
}

/// One GC pass: deletes blobs older than `grace` that no file references, directly or as a
/// chunk of a referenced manifest, and that no commit check pinned (`blobs::asked`). When the
/// chunks of some referenced manifest cannot be known here (the manifest is not held, or
/// unreadable), nothing is deleted: any old blob could be one of them. The pass builds the set
/// of live chunks anew, and before each batch of deletions catches it up with manifests that
/// commits applied meanwhile referenced: a chunk is neither referenced nor touched by the
/// commit that makes it live again, so only that set can tell.
pub fn gc_pass(node: &Node, grace: Duration) {
    node.pins.prune();
    let unknown = match rebuild_live_chunks(node) {
        Ok(u) => u,
        Err(e) => return tracing::warn!(error = %e, "gc: reading manifest references failed; deleting nothing"),
    };
    let list = match node.blobs.list() {
        Ok(l) => l,
        Err(e) => return tracing::warn!(error = %e, "gc: listing blobs failed"),
    };
    let old_unreferenced = |h: &Hash| {
        matches!(node.tables().blobref(h), Ok(0)) && node.blobs.age(h).is_some_and(|a| a >= grace) && !node.pins.held(h)
    };
    let live = node.live_chunks.view();
    let candidates: Vec<Hash> = list
        .into_iter()
        .map(|(h, _)| h)
        .filter(|h| old_unreferenced(h) && !live.contains(h))
        .collect();
    if candidates.is_empty() {
        return;
    }
    if let Some(why) = unknown {
        return tracing::warn!(reason = %why, "gc: deleting nothing this pass");
    }
    for batch in candidates.chunks(GC_BATCH) {
        if let Some(why) = catch_up_live_chunks(node, Duration::ZERO) {
            return tracing::warn!(reason = %why, "gc: deleting nothing more this pass");
        }
        let live = node.live_chunks.view();
        for hash in batch {
            // Again just before deleting: a commit may have referenced, touched or pinned it,
            // or made it a live chunk, meanwhile.
            if !live.contains(hash) && old_unreferenced(hash) && node.blobs.remove(hash).is_ok() {
                node.counters.gc_removed.fetch_add(1, Ordering::Relaxed);
                tracing::info!(%hash, "collected unreferenced blob");
            }
        }
    }
}

/// Deletions between two looks at newly referenced manifests (see [`gc_pass`]).
const GC_BATCH: usize = 256;

/// Builds [`Node::live_chunks`] anew from the manifests referenced now; `Ok` says why the set
/// is incomplete, if it is (some manifest not held here yet, or unreadable).
pub fn rebuild_live_chunks(node: &Node) -> Result<Option<String>, String> {
    // The index first: commits applied after it are caught up later.
    let index = node.applied_index();
    let referenced = node.tables().referenced_manifests().map_err(|e| e.to_string())?;
    Ok(node
        .live_chunks
        .rebuild(index, &referenced, |m| live_chunks(m, |h| node.manifest_if_stored(h))))
}

/// Adds to [`Node::live_chunks`] the chunks of manifests referenced since it was last built
/// or caught up, if commits were applied since and `gap` has passed; says why some are
/// unknown, if they are.
pub fn catch_up_live_chunks(node: &Node, gap: Duration) -> Option<String> {
    node.live_chunks.catch_up(
        node.applied_index(),
        gap,
        || node.tables().referenced_manifests().ok(),
        |m| live_chunks(m, |h| node.manifest_if_stored(h)),
    )
}

/// The chunks the `manifests` list (by [`asked::prefix`]), the manifests read, and why the set
/// is incomplete when some manifest is not held here yet or cannot be read. GC then deletes
/// nothing, since any old blob could be one of its chunks; answers go by age for those chunks
/// (at worst, they are sent again). A referenced blob that is no manifest (a large blob from
/// before chunking) lists none.
fn live_chunks(manifests: &[Hash], load: impl Fn(&Hash) -> Result<Held, NodeError>) -> asked::Loaded {
    let mut live = HashSet::new();
    let mut found = HashSet::new();
    let mut unknown = None;
    for m in manifests {
        match load(m) {
            Ok(Held::Manifest(entry)) => {
                live.extend(entry.manifest.chunks.iter().map(|c| asked::prefix(&c.hash)));
                found.insert(*m);
            }
            Ok(Held::NotManifest(why)) => {
                tracing::debug!(manifest = %m, %why, "gc: a referenced blob over the chunk threshold is no manifest");
                found.insert(*m);
            }
            Ok(Held::Missing) => {
                unknown.get_or_insert_with(|| {
                    format!(
                        "referenced manifest {m} is not stored here yet (repair fetches it), so its chunks are unknown"
                    )
                });
            }
            Err(e) => {
                unknown.get_or_insert_with(|| {
                    format!("referenced manifest {m} cannot be read ({e}), so its chunks are unknown")
                });
            }
        }
    }
    (live, found, unknown)
}

/// How often GC runs while free space is under twice the watermark.
const PRESSURE_GC_INTERVAL: Duration = Duration::from_secs(5);
/// Refusals wake GC at most this often (a burst of refused puts runs one pass).
const PRESSURE_GC_MIN_GAP: Duration = Duration::from_secs(1);

/// Runs repair, scrub and GC until the server stops; hinted handoff instead while it is a
/// witness (which stores no blobs of its own: it only hands off what it keeps for others).
pub async fn run(node: Arc<Node>) {
    let stop = node.tasks.stop_signal();
    while !*stop.borrow() {
        if node.is_witness() {
            crate::blobs::handoff::run(node.clone()).await;
        } else {
            data_maintenance(node.clone()).await;
        }
    }
}

/// Repair, scrub and GC until the server stops or becomes a witness.
async fn data_maintenance(node: Arc<Node>) {
    let mut stop = node.tasks.stop_signal();
    // Answers about blobs need the live chunks before the first GC pass (`blobs::asked`).
    let n = node.clone();
    let _ = tokio::task::spawn_blocking(move || {
        if let Err(e) = rebuild_live_chunks(&n) {
            tracing::warn!(error = %e, "reading manifest references failed");
        }
    })
    .await;
    let repair_every = Duration::from_millis(node.cfg.repair_interval_ms.max(50));
    let full_every = Duration::from_secs(node.cfg.full_repair_interval_s.max(1));
    let mut last_full = tokio::time::Instant::now();
    let scrub_every = Duration::from_secs(node.cfg.scrub_interval_s);
    let rate = node.cfg.scrub_rate_mib << 20;
    let mut last_scrub = tokio::time::Instant::now();
    let mut scrub: Option<ScrubPass> = None;
    let mut last_gc = tokio::time::Instant::now();
    loop {
        let mut refused = false;
        tokio::select! {
            _ = tokio::time::sleep(repair_every) => {}
            _ = node.applied.suspects.kicked() => {}
            _ = node.space.pressure.notified() => refused = true,
            _ = stop.changed() => {}
        }
        if *stop.borrow() || node.is_witness() {
            return;
        }
        // Real pressure only: a refusal can come from reservations of uploads in progress,
        // and a shorter grace then would take those uploads' blobs before they commit.
        let pressure = node.space.under_pressure();
        let grace = node.gc_grace(pressure);
        let gc_every = if pressure {
            PRESSURE_GC_INTERVAL.max(repair_every)
        } else {
            grace.min(Duration::from_secs(600)).max(repair_every)
        };
        if refused && last_gc.elapsed() >= PRESSURE_GC_MIN_GAP {
            // A put was just refused: collect now, before repair or scrub.
            let n = node.clone();
            let _ = tokio::task::spawn_blocking(move || gc_pass(&n, grace)).await;
            last_gc = tokio::time::Instant::now();
        }
        if last_full.elapsed() >= full_every {
            node.applied.suspects.everything();
        }
        let scope = node.applied.suspects.take();
        if scope == Scope::Everything {
            last_full = tokio::time::Instant::now();
        }
        repair_pass(&node, scope).await;
        if node.cfg.scrub_interval_s > 0 {
            if scrub.is_none() && last_scrub.elapsed() >= scrub_every {
                scrub = start_scrub(&node);
            }
            // A turn at a time: repair and GC run between turns.
            if let Some(pass) = scrub.as_mut() {
                if scrub_some(&node, pass, rate).await {
                    scrub = None;
                    last_scrub = tokio::time::Instant::now();
                }
            }
        }
        if last_gc.elapsed() >= gc_every {
            let n = node.clone();
            let _ = tokio::task::spawn_blocking(move || gc_pass(&n, grace)).await;
            last_gc = tokio::time::Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blobs::manifests::ManifestEntry;
    use codafs_common::chunks::{ChunkRef, Manifest, CHUNK_MAX};

    /// A held manifest listing chunks named by `names` (each of the largest size, so two or more
    /// are over the chunk threshold).
    fn held(names: &[&str]) -> (Hash, Held) {
        let m = Manifest {
            chunks: names
                .iter()
                .map(|n| ChunkRef {
                    hash: Hash::of(n.as_bytes()),
                    len: CHUNK_MAX,
                })
                .collect(),
        };
        let bytes = m.encode();
        let entry = ManifestEntry::parse(&bytes).expect("a valid manifest");
        (Hash::of(&bytes), Held::Manifest(Arc::new(entry)))
    }

    fn hashes(names: &[&str]) -> HashSet<Hash> {
        names.iter().map(|n| Hash::of(n.as_bytes())).collect()
    }

    fn prefixes(names: &[&str]) -> HashSet<[u8; 16]> {
        hashes(names).iter().map(asked::prefix).collect()
    }

    #[test]
    fn chunks_of_referenced_manifests_are_live() {
        let (m1, _) = held(&["a", "b"]);
        let (m2, _) = held(&["b", "c"]);
        let load = |h: &Hash| -> Result<Held, NodeError> {
            Ok(if *h == m1 {
                held(&["a", "b"]).1
            } else if *h == m2 {
                held(&["b", "c"]).1
            } else {
                Held::NotManifest("plain content".into())
            })
        };
        let legacy = Hash::of(b"a large blob from before chunking");
        let (live, found, unknown) = live_chunks(&[m1, legacy, m2], load);
        assert_eq!(unknown, None);
        assert_eq!(live, prefixes(&["a", "b", "c"]));
        assert_eq!(found, [m1, legacy, m2].into_iter().collect(), "all read");
    }

    #[test]
    fn a_referenced_manifest_not_held_here_leaves_the_set_incomplete() {
        let (m1, _) = held(&["a", "a2"]);
        let absent = Hash::of(b"not fetched yet");
        let load =
            |h: &Hash| -> Result<Held, NodeError> { Ok(if *h == m1 { held(&["a", "a2"]).1 } else { Held::Missing }) };
        let (live, found, why) = live_chunks(&[m1, absent], load);
        assert_eq!(
            found,
            [m1].into_iter().collect(),
            "the absent one is read again next time"
        );
        let why = why.expect("incomplete");
        assert!(
            why.contains(&absent.to_string()) && why.contains("not stored here"),
            "{why}"
        );
        assert_eq!(live, prefixes(&["a", "a2"]), "what is known is kept");
        let unreadable = |_: &Hash| -> Result<Held, NodeError> { Err(NodeError::Internal("disk error".into())) };
        let (_, _, why) = live_chunks(&[m1], unreadable);
        assert!(why.is_some_and(|w| w.contains("disk error")));
    }

    #[test]
    fn missing_chunks_are_listed_once_up_to_the_cap_and_all_counted() {
        let stored = hashes(&["b"]);
        let has = |h: &Hash| stored.contains(h);
        let mut found = MissingChunks::new(2);
        found.add(&held(&["a", "b", "c"]).1, has);
        found.add(&held(&["c", "a", "d", "e"]).1, has);
        found.add(&Held::Missing, has);
        found.add(&Held::NotManifest("plain".into()), has);
        assert_eq!(found.listed, vec![Hash::of(b"a"), Hash::of(b"c")]);
        assert_eq!(found.count, 4, "a, c, d, e");
    }
}
