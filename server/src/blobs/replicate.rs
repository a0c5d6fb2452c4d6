//! Writing a blob to the write quorum: the fan-out from the server that received a put to
//! every other data replica, hints to witnesses when data replicas are down (`handoff`), and
//! sending a stored blob to one server (put forwarding, handoff and repair share that wire
//! format). The commit-time check that W copies exist is in `copies.rs`.
use std::sync::Arc;
use std::time::Duration;

use codafs_common::Hash;
use codafs_proto::limits::BLOB_CHUNK;
use codafs_proto::pb;
use futures::StreamExt;
use tokio::io::AsyncReadExt;

use codafs_proto::error::{kind_of, ErrorKind};

use crate::blobs::quorum::{effective_write_quorum, QuorumState, QuorumTracker};
use crate::blobs::BlobStore;
use crate::node::Node;
use crate::peers::Peers;
use codafs_proto::limits::DEFAULT_WRITE_QUORUM;
use tokio::sync::mpsc;

/// Why a forward to one replica failed, with the kind of the replica's refusal (a replica out
/// of disk space makes the put's answer say so).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{addr}: {message}")]
pub struct ForwardError {
    pub addr: String,
    pub kind: ErrorKind,
    pub message: String,
}

impl ForwardError {
    /// Whether the replica is down or out of reach (rather than refusing): the case a hint on
    /// a witness covers. A replica that refuses (full disk, corrupt data) is up and says why.
    pub fn is_down(&self) -> bool {
        matches!(
            self.kind,
            ErrorKind::Unavailable | ErrorKind::Timeout | ErrorKind::Witness
        )
    }

    /// The replica answered with a refusal.
    pub fn refused(addr: &str, s: &tonic::Status) -> Self {
        ForwardError {
            addr: addr.to_string(),
            kind: kind_of(s),
            message: s.message().to_string(),
        }
    }

    /// The replica did not answer within `limit` (bounded on this side: a request's own
    /// deadline starts only once a connection carries it, and a new connection to a stopped
    /// peer waits for its TLS handshake for ever).
    pub fn no_answer(addr: &str, limit: Duration) -> Self {
        ForwardError {
            addr: addr.to_string(),
            kind: ErrorKind::Timeout,
            message: format!("no answer within {limit:?}"),
        }
    }

    /// The replica could not be asked at all (a bad address, a local file gone).
    pub fn unreachable(addr: &str, e: impl std::fmt::Display) -> Self {
        ForwardError {
            addr: addr.to_string(),
            kind: ErrorKind::Unavailable,
            message: e.to_string(),
        }
    }
}

/// Streams the file at `path` (content `hash`, `size` bytes) to `addr` as a forwarded put.
pub async fn send_blob(
    peers: &Peers,
    addr: &str,
    store: Arc<BlobStore>,
    hash: Hash,
    size: u64,
) -> Result<u32, ForwardError> {
    let reading = |e: &dyn std::fmt::Display| ForwardError::unreachable(addr, format!("reading blob {hash} here: {e}"));
    let (file, _) = tokio::task::spawn_blocking(move || store.open_read(&hash))
        .await
        .map_err(|e| reading(&e))?
        .map_err(|e| reading(&e))?;
    let file = file.into_async();
    let header = pb::PutBlobChunk {
        part: Some(pb::put_blob_chunk::Part::Header(pb::PutBlobHeader {
            hash: bytes::Bytes::copy_from_slice(&hash.0),
            size,
            write_quorum: 1,
            forwarded: true,
        })),
    };
    let body = futures::stream::unfold(Some(file), |state| async move {
        let mut f = state?;
        let mut buf = vec![0u8; BLOB_CHUNK];
        let mut filled = 0;
        // Fill whole chunks so the receiver sees few, large messages.
        while filled < buf.len() {
            match f.read(&mut buf[filled..]).await {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(_) => return None,
            }
        }
        if filled == 0 {
            return None;
        }
        buf.truncate(filled);
        let msg = pb::PutBlobChunk {
            part: Some(pb::put_blob_chunk::Part::Data(buf.into())),
        };
        Some((msg, Some(f)))
    });
    let stream = futures::stream::iter([header]).chain(body);
    let mut client = peers.blobs(addr).map_err(|e| ForwardError::unreachable(addr, e))?;
    let mut req = tonic::Request::new(stream);
    // Generous: at least 30 s, plus a second per 20 MiB; bounded here too (see `no_answer`).
    let limit = Duration::from_secs(30 + size / (20 << 20));
    req.set_timeout(limit);
    let reply = tokio::time::timeout(limit, client.put(req))
        .await
        .map_err(|_| ForwardError::no_answer(addr, limit))?
        .map_err(|s| ForwardError::refused(addr, &s))?;
    Ok(reply.into_inner().copies)
}

/// How long a write of `bytes` waits for a data replica to store its copy before a witness's
/// hint stands in for it: `base` plus the bytes at 20 MiB/s.
fn patience(base: Duration, bytes: u64) -> Duration {
    base + Duration::from_millis(bytes / (20 << 10))
}

/// When the caller of `req` gives up (see [`replicate`]).
pub fn caller_deadline<T>(req: &tonic::Request<T>) -> Option<tokio::time::Instant> {
    codafs_proto::deadline::grpc_timeout(req.metadata()).map(|t| tokio::time::Instant::now() + t)
}

/// A healthy replica stores a small blob in milliseconds; one that takes seconds is stopped,
/// stalled or overloaded, and a client waits only a few seconds for its put.
const PATIENCE: Duration = Duration::from_secs(2);

/// The patience for replicas that stalled another write lately (see `Peers::stalled`), once
/// every other one has answered: enough for a replica that answers again, far less than a
/// stopped one cost each put.
const STALLED_PATIENCE: Duration = Duration::from_millis(200);

/// How a fan-out to the data replicas went.
pub struct Replicated {
    /// Durable copies, this server's own included when it stores blobs, and hints.
    pub copies: usize,
    /// Of `copies`, those witnesses hold as hints for data replicas that are down (on a witness
    /// relaying a put, its own spool copy among them: it must stay until handed off).
    pub hinted: usize,
    /// Copies the write needs (its quorum, capped at the data replicas).
    pub need: usize,
    /// Forwards still running carry on in the background (repair covers any that fail); each
    /// ends with whether it stored its copy (`None` if the server stopped first).
    pub forwards: Vec<tokio::task::JoinHandle<Option<bool>>>,
    /// The failures seen before the outcome was known.
    pub failures: Vec<ForwardError>,
}

impl Replicated {
    /// Whether the write quorum was reached.
    pub fn met(&self) -> bool {
        self.copies >= self.need
    }

    /// A replica that refused for lack of disk space (so the uploader learns why).
    pub fn no_space(&self) -> Option<&ForwardError> {
        self.failures.iter().find(|f| f.kind == ErrorKind::NoSpace)
    }
}

/// Sends a write to every other data replica with `send` and waits until `quorum` copies
/// (capped at the data replicas; this server's own counts when it stores blobs) are durable, or
/// until that is impossible. When data replicas are down and at least one copy is on a data
/// replica, witnesses make up the difference with hints (see `handoff`). Forwards are tasks of
/// the server (`node.tasks`), so they stop with it.
///
/// A replica that has not stored its copy of the `bytes` after [`PATIENCE`] (plus the bytes
/// at 20 MiB/s) counts as down; one that did so lately (`Peers::stalled`) after
/// [`STALLED_PATIENCE`] (plus the same), once every other replica has answered. Either wait is
/// at most half of what is left of the caller's `deadline`, so the hint still lands in time (a
/// mount asks with a 2 s deadline, and a patience as long as that failed every put while a
/// data replica was stopped).
pub async fn replicate<F, Fut>(
    node: &Arc<Node>,
    quorum: u32,
    bytes: u64,
    deadline: Option<tokio::time::Instant>,
    send: F,
) -> Replicated
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = Result<(), ForwardError>> + Send + 'static,
{
    let replicas = node.data_replicas();
    let quorum = if quorum == 0 { DEFAULT_WRITE_QUORUM } else { quorum };
    let need = effective_write_quorum(quorum, replicas.len());
    let mut tracker = QuorumTracker::new(need, replicas.len().max(1));
    if !node.is_witness() {
        tracker.ok();
    }
    let (tx, mut rx) = mpsc::channel(replicas.len().max(1));
    let mut forwards = Vec::new();
    let mut unanswered: Vec<String> = Vec::new();
    for m in replicas.into_iter().filter(|m| m.id != node.id) {
        let tx = tx.clone();
        let fut = send(m.info.addr.clone());
        let peers = node.peers.clone();
        unanswered.push(m.info.addr.clone());
        forwards.push(node.tasks.spawn("blob forward", async move {
            let r = fut.await;
            match &r {
                Ok(()) => peers.forward_worked(&m.info.addr),
                Err(e) => peers.forward_failed(&m.info.addr, e),
            }
            let ok = r.is_ok();
            let _ = tx.send((m.info.addr, r)).await;
            ok
        }));
    }
    let start = tokio::time::Instant::now();
    let full = patience(PATIENCE, bytes);
    let cap = deadline.map(|d| d.saturating_duration_since(start) / 2);
    let short = patience(STALLED_PATIENCE, bytes);
    let marked: std::collections::HashSet<String> =
        unanswered.iter().filter(|a| node.peers.stalled(a)).cloned().collect();
    drop(tx);
    let mut failures: Vec<ForwardError> = Vec::new();
    // Out of reach for data copies alone, a write can still make it with hints when the
    // replicas that failed are down: then the forwards still running are waited for, since
    // the hints only count beside a data copy. A replica that has not stored its copy after
    // `patience` (stopped, its disk stalled) counts as down too, its forward going on in the
    // background: a forward's own deadline is far longer than a client waits for a put.
    let can_hint = !node.witnesses().is_empty();
    let mut answered = 0;
    let mut waited = full;
    let mut stalled = 0usize;
    loop {
        match tracker.state() {
            QuorumState::Reached => break,
            QuorumState::Failed if !can_hint || !failures.iter().all(ForwardError::is_down) => break,
            _ => {}
        }
        let can_wait_out = can_hint && tracker.successes() >= 1 && failures.iter().all(ForwardError::is_down);
        // The short wait only once the replicas still out all stalled lately: a healthy one
        // storing a large blob beside a stopped one gets its full time.
        let wait = if unanswered.iter().all(|a| marked.contains(a)) {
            short
        } else {
            full
        };
        let wait = cap.map_or(wait, |c| wait.min(c));
        let hint_at = start + wait;
        tokio::select! {
            r = rx.recv() => match r {
                Some((addr, r)) => {
                    answered += 1;
                    unanswered.retain(|a| *a != addr);
                    match r {
                        Ok(()) => {
                            tracker.ok();
                        }
                        Err(e) => {
                            failures.push(e);
                            tracker.fail();
                        }
                    }
                }
                None => break,
            },
            _ = tokio::time::sleep_until(hint_at), if can_wait_out => {
                stalled = forwards.len() - answered;
                waited = wait;
                // Only a replica that outlasted the whole patience counts as stalled for the
                // writes after this one (not one a short caller deadline cut off).
                if wait >= full {
                    for a in &unanswered {
                        node.peers.forward_stalled(a);
                    }
                }
                break;
            }
        }
    }
    let data = tracker.successes();
    let mut hinted = 0;
    // Hints stand in only for replicas that are down or stalled, never for one that refused.
    let missing_down = (!failures.is_empty() || stalled > 0) && failures.iter().all(ForwardError::is_down);
    if can_hint && data >= 1 && data < need && missing_down {
        if stalled > 0 {
            tracing::info!(stalled, after = ?waited, "data replicas did not answer a forward in time: witnesses take hints");
        }
        hinted = hint(node, need - data, &send, &mut failures).await;
    }
    Replicated {
        copies: data + hinted,
        hinted,
        need,
        forwards,
        failures,
    }
}

/// Places up to `wanted` hints on witnesses, this server's own spool copy first when it is a
/// witness; returns how many are durable.
async fn hint<F, Fut>(node: &Arc<Node>, wanted: usize, send: &F, failures: &mut Vec<ForwardError>) -> usize
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = Result<(), ForwardError>> + Send + 'static,
{
    let mut hinted = 0;
    if node.is_witness() {
        hinted += 1;
    }
    for w in node.witnesses().into_iter().filter(|m| m.id != node.id) {
        if hinted >= wanted {
            break;
        }
        match send(w.info.addr.clone()).await {
            Ok(()) => hinted += 1,
            Err(e) => {
                tracing::warn!(witness = %w.info.addr, error = %e, "a witness refused a hint");
                failures.push(e);
            }
        }
    }
    if hinted > 0 {
        tracing::info!(
            hints = hinted,
            "data replicas are down: witnesses hold hints until they return"
        );
    }
    hinted.min(wanted)
}
