//! The `Blobs` service: quorum puts, verified chunked gets, and "which do you lack" queries.
//! Every call is authorized first (`access`): reads need a ticket or a readable file, stores a
//! token that may write some volume (charged to its quota until referenced) or a member's
//! certificate.
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use codafs_common::Hash;
use codafs_proto::limits::{BLOB_CHUNK, MAX_MISSING_QUERY, MAX_SMALL_BATCH, MAX_SMALL_GET, MAX_SMALL_GET_BYTES};
use codafs_proto::pb;
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::{convert, internal, refuse, ErrorKind};
use crate::access::{self, Caller};
use crate::blobs::asked::Held;
use crate::blobs::handoff::{SpoolFull, SpoolReservation};
use crate::blobs::manifests::ManifestEntry;
use crate::blobs::replicate::{self, replicate, ForwardError, Replicated};
use crate::blobs::{BlobError, BlobReader};
use crate::fsm::StateView;
use crate::node::Node;
use crate::pending::Charge;
use crate::reply_budget::{self, ReplyCharge};

/// How far ahead of the bytes that came a put reserves disk space (see `blobs::space`).
const RESERVE_STEP: u64 = 64 << 20;

pub struct BlobService(pub Arc<Node>);

fn blob_status(e: BlobError) -> Status {
    match e {
        BlobError::NotFound(h) => refuse(ErrorKind::NotFound, format!("blob {h} not stored here")),
        e @ (BlobError::HashMismatch { .. } | BlobError::SizeMismatch { .. }) => {
            refuse(ErrorKind::Corrupt, e.to_string())
        }
        e @ BlobError::TooLarge(..) => refuse(ErrorKind::TooLarge, e.to_string()),
        e @ BlobError::Corrupt(_) => refuse(ErrorKind::Corrupt, e.to_string()),
        BlobError::Io(e) if is_disk_full(&e) => refuse(ErrorKind::NoSpace, format!("blob storage: {e}")),
        BlobError::Io(e) => refuse(ErrorKind::Internal, format!("blob storage: {e}")),
        e @ BlobError::Pack { disk_full: true, .. } => refuse(ErrorKind::NoSpace, e.to_string()),
        e @ BlobError::Pack { .. } => refuse(ErrorKind::Internal, e.to_string()),
    }
}

/// Whether an I/O error means the disk (or a quota on it) is full.
fn is_disk_full(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// How long an upload may wait for its next chunk before it is abandoned. A client that stops
/// sending mid-blob would otherwise hold a temp file, a stream and a task forever.
pub const UPLOAD_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Every upload may take at least this long in all, whatever its size.
pub const UPLOAD_TIME_FLOOR: Duration = Duration::from_secs(60);
/// The slowest sustained upload rate allowed (bytes per second): a blob of `size` bytes may
/// take [`UPLOAD_TIME_FLOOR`] plus `size` at this rate. A trickle (one byte every few seconds
/// keeps the idle timer happy) still ends within a bound proportional to the blob's size.
pub const UPLOAD_MIN_RATE: u64 = 256 << 10;

/// The longest an upload of `size` bytes may take.
pub fn upload_time_limit(size: u64) -> Duration {
    UPLOAD_TIME_FLOOR + Duration::from_secs(size / UPLOAD_MIN_RATE)
}

impl BlobService {
    /// Authorizes a store of `blobs` by `caller` and reserves their charge to its account
    /// until a commit references them (kept once the store succeeds: see
    /// [`crate::pending::Charge`]). Peers are not charged: the server they came from was.
    fn admit_store(&self, caller: &Caller, blobs: &[(Hash, u64)]) -> Result<Option<Charge<'_>>, Status> {
        let Some(claims) = self.0.check_store(caller)? else {
            return Ok(None);
        };
        let t = self.0.tables();
        let vols = t.volumes().map_err(internal)?;
        let room = access::headroom(&claims, &vols);
        let charge = self
            .0
            .pending
            .admit(&claims.user, blobs, room, |h| t.blobref(h).is_ok_and(|n| n > 0))
            .map_err(super::status)?;
        Ok(Some(charge))
    }

    /// After `user` stored blob `hash`: if it is a manifest, the charges of its chunks move
    /// onto it (see [`crate::pending::PendingBytes::fold`]). `data` is the blob when in memory;
    /// otherwise it is loaded as a manifest from the store (`Node::manifest` looks at its
    /// header first, so another blob costs one small read).
    async fn fold_chunk_charges(&self, user: Option<&str>, hash: Hash, data: Option<&[u8]>) {
        let Some(user) = user else { return };
        let entry = match data {
            Some(d) => ManifestEntry::parse(d).ok().map(Arc::new),
            None => self.0.manifest(&hash).await.ok(),
        };
        if let Some(e) = entry {
            self.0.pending.fold(user, hash, &e.chunks);
        }
    }

    /// Receives the data part of a put into the local store (the spool, on a witness, within
    /// its budget: see [`spool_room`]; `forwarded` says whether a server sent it). Bounded
    /// by [`UPLOAD_IDLE_TIMEOUT`] between chunks and [`upload_time_limit`] in all; an upload
    /// that runs out of either ends with DEADLINE_EXCEEDED, and dropping the writer removes its
    /// partial temp file.
    async fn receive(
        &self,
        hash: Hash,
        size: u64,
        stream: &mut Streaming<pb::PutBlobChunk>,
        forwarded: bool,
    ) -> Result<(), Status> {
        let what = format!("store blob {hash} ({size} bytes)");
        // The spool (on a witness) and the disk are reserved a step ahead of the bytes that
        // come, not for the declared size at once (a few slow puts declaring large sizes held
        // all the room); the disk's reservation is given back as the bytes are written (see
        // `blobs::space`), the spool's when the write ends (the store counts them then).
        let mut spool = spool_room(&self.0, size.min(RESERVE_STEP), forwarded)?;
        let mut room = self
            .0
            .space
            .reserve(size.min(RESERVE_STEP), &what)
            .map_err(super::no_space)?;
        let mut w = self.0.blobs.writer(hash, size).map_err(blob_status)?;
        let limit = upload_time_limit(size);
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let idle = tokio::time::Instant::now() + UPLOAD_IDLE_TIMEOUT;
            let next = match tokio::time::timeout_at(idle.min(deadline), stream.message()).await {
                Ok(next) => next?,
                Err(_) if idle < deadline => {
                    return Err(refuse(
                        ErrorKind::Timeout,
                        format!(
                            "upload of blob {hash} abandoned: no data for {} s after {} of {size} bytes",
                            UPLOAD_IDLE_TIMEOUT.as_secs(),
                            w.written()
                        ),
                    ))
                }
                Err(_) => {
                    return Err(refuse(
                        ErrorKind::Timeout,
                        format!(
                            "upload of blob {hash} abandoned: {size} bytes may take at most {} s, and {} had arrived",
                            limit.as_secs(),
                            w.written()
                        ),
                    ))
                }
            };
            let Some(msg) = next else { break };
            match msg.part {
                Some(pb::put_blob_chunk::Part::Data(d)) => {
                    if d.len() > BLOB_CHUNK {
                        return Err(refuse(
                            ErrorKind::Invalid,
                            format!("chunk of {} bytes exceeds {BLOB_CHUNK}", d.len()),
                        ));
                    }
                    // The reservation covers what is still to be written, a step at a time.
                    let n = d.len() as u64;
                    let step = size.saturating_sub(w.written()).min(RESERVE_STEP).max(n);
                    if let Some(sp) = spool.as_mut().filter(|sp| w.written() + n > sp.bytes()) {
                        spool_grow(&self.0, sp, step, forwarded)?;
                    }
                    if n > room.bytes() {
                        room.grow(step - room.bytes(), &what).map_err(super::no_space)?;
                    }
                    tokio::task::block_in_place(|| w.write(&d)).map_err(blob_status)?;
                    room.written(n);
                    // Another writer may have used the space meanwhile: stop (dropping the writer
                    // removes the partial file) rather than fill the disk.
                    self.0
                        .space
                        .check_remaining(size - w.written(), &what)
                        .map_err(super::no_space)?;
                }
                _ => return Err(refuse(ErrorKind::Invalid, "a put carries one header, then data only")),
            }
        }
        let new = tokio::task::block_in_place(|| w.finish()).map_err(blob_status)?;
        if new && !self.0.is_witness() {
            self.0.counters.blob_bytes_received.fetch_add(size, Ordering::Relaxed);
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl pb::blobs_server::Blobs for BlobService {
    #[tracing::instrument(skip_all)]
    async fn put(&self, req: Request<Streaming<pb::PutBlobChunk>>) -> Result<Response<pb::PutBlobReply>, Status> {
        let node = self.0.clone();
        let caller = Caller::of(&node, &req);
        let peer = caller.peer;
        let deadline = replicate::caller_deadline(&req);
        let mut stream = req.into_inner();
        let header = match stream.message().await?.and_then(|m| m.part) {
            Some(pb::put_blob_chunk::Part::Header(h)) => h,
            _ => return Err(refuse(ErrorKind::Invalid, "a put starts with its header")),
        };
        let hash = convert::hash(&header.hash)?;
        if header.size > node.cfg.max_blob_bytes {
            return Err(blob_status(BlobError::TooLarge(header.size, node.cfg.max_blob_bytes)));
        }
        if header.forwarded && !peer {
            return Err(super::peer_denied("forwarded blob puts"));
        }
        // Before anything is stored or touched: an unauthorized put must not even extend a
        // blob's GC grace.
        let charge = self.admit_store(&caller, &[(hash, header.size)])?;
        let witness = node.is_witness();
        let already = !witness && node.blobs.has(&hash);
        if already {
            node.blobs.touch(&hash);
        }
        if header.forwarded {
            // On a witness, a forwarded put is a hint: a copy kept for data replicas that are
            // down (see `blobs::handoff`).
            if !already {
                self.receive(hash, header.size, &mut stream, true).await?;
            }
            return Ok(Response::new(pb::PutBlobReply {
                copies: 1,
                already_present: already,
            }));
        }
        if !already {
            self.receive(hash, header.size, &mut stream, false).await?;
        }
        drop(stream);
        // Stored and verified here: the charge stands, whatever the other replicas answer.
        let charged = charge.map(Charge::keep);
        // Forward to the other data replicas; answer once the write quorum is durable.
        let size = header.size;
        let (peers, store) = (node.peers.clone(), node.blobs.clone());
        let mut r = replicate(&node, header.write_quorum, size, deadline, move |addr| {
            let (peers, store) = (peers.clone(), store.clone());
            async move { replicate::send_blob(&peers, &addr, store, hash, size).await.map(drop) }
        })
        .await;
        if witness {
            drop_relay_copy(&node, &mut r, vec![hash]);
        }
        if !r.met() {
            return Err(quorum_missed(
                format!(
                    "only {} of {} required copies of blob {hash} could be stored",
                    r.copies, r.need
                ),
                &r,
            ));
        }
        self.fold_chunk_charges(charged.as_deref(), hash, None).await;
        Ok(Response::new(pb::PutBlobReply {
            copies: r.copies as u32,
            already_present: already,
        }))
    }

    #[tracing::instrument(skip_all, fields(blobs = req.get_ref().blobs.len()))]
    async fn put_small(&self, req: Request<pb::PutSmallRequest>) -> Result<Response<pb::PutSmallReply>, Status> {
        let node = self.0.clone();
        let caller = Caller::of(&node, &req);
        let deadline = replicate::caller_deadline(&req);
        let r = req.into_inner();
        if r.forwarded && !caller.peer {
            return Err(super::peer_denied("forwarded blob batches"));
        }
        let total: usize = r.blobs.iter().map(|b| b.data.len()).sum();
        if total > MAX_SMALL_BATCH || r.blobs.iter().any(|b| b.data.len() > BLOB_CHUNK) {
            return Err(refuse(
                ErrorKind::Invalid,
                format!("a small-blob batch holds blobs of at most {BLOB_CHUNK} bytes, {MAX_SMALL_BATCH} in all"),
            ));
        }
        let parsed: Vec<(codafs_common::Hash, bytes::Bytes)> = r
            .blobs
            .iter()
            .map(|b| Ok((convert::hash(&b.hash)?, b.data.clone())))
            .collect::<Result<_, Status>>()?;
        let sizes: Vec<(Hash, u64)> = parsed.iter().map(|(h, d)| (*h, d.len() as u64)).collect();
        let charge = self.admit_store(&caller, &sizes)?;
        let witness = node.is_witness();
        // Up front, before anything is stored here or forwarded: room for what is new here
        // (a witness spools the batch: it relays it, and keeps it as a hint if a data replica
        // is down).
        let need: u64 = parsed
            .iter()
            .filter(|(h, _)| !node.blobs.has(h))
            .map(|(_, d)| d.len() as u64)
            .sum();
        let _spool = spool_room(&node, need, r.forwarded)?;
        let what = format!("store a batch of {} small blobs ({need} bytes)", parsed.len());
        let _room = node.space.reserve(need, &what).map_err(super::no_space)?;
        if r.forwarded {
            store_batch(&node, parsed).await?;
            return Ok(Response::new(pb::PutSmallReply { copies: 1 }));
        }
        let batch = pb::PutSmallRequest {
            blobs: r.blobs,
            write_quorum: 1,
            forwarded: true,
        };
        // Store here and forward to the other replicas at the same time, so the replicas'
        // filesystem syncs overlap instead of following one another. The reply waits for both.
        let local = store_batch(&node, parsed.clone());
        let peers = node.peers.clone();
        let forward = replicate(&node, r.write_quorum, total as u64, deadline, move |addr| {
            let (peers, batch) = (peers.clone(), batch.clone());
            async move {
                let mut c = peers.blobs(&addr).map_err(|e| ForwardError::unreachable(&addr, e))?;
                let limit = std::time::Duration::from_secs(60);
                let mut req = tonic::Request::new(batch);
                req.set_timeout(limit);
                // Bounded here too (see `ForwardError::no_answer`).
                match tokio::time::timeout(limit, c.put_small(req)).await {
                    Ok(r) => r.map(drop).map_err(|s| ForwardError::refused(&addr, &s)),
                    Err(_) => Err(ForwardError::no_answer(&addr, limit)),
                }
            }
        });
        let (local, mut r) = tokio::join!(local, forward);
        if witness {
            drop_relay_copy(&node, &mut r, parsed.iter().map(|(h, _)| *h).collect());
        }
        local?;
        let charged = charge.map(Charge::keep);
        if !r.met() {
            return Err(quorum_missed(
                format!(
                    "only {} of {} required copies of a {}-blob batch could be stored",
                    r.copies,
                    r.need,
                    parsed.len()
                ),
                &r,
            ));
        }
        for (h, d) in &parsed {
            self.fold_chunk_charges(charged.as_deref(), *h, Some(d)).await;
        }
        Ok(Response::new(pb::PutSmallReply {
            copies: r.copies as u32,
        }))
    }

    type GetStream = Pin<Box<dyn Stream<Item = Result<pb::BlobChunk, Status>> + Send>>;

    #[tracing::instrument(skip_all)]
    async fn get(&self, req: Request<pb::GetBlobRequest>) -> Result<Response<Self::GetStream>, Status> {
        let node = self.0.clone();
        let caller = Caller::of(&node, &req);
        let charge = reply_budget::of(&req);
        let r = req.into_inner();
        let hash = convert::hash(&r.hash)?;
        // A chunk is read with the right to its file's manifest (see `access`).
        let manifest = node.chunk_read_manifest(&caller, &r.manifest)?;
        node.check_blob_read(&caller, manifest.as_ref().unwrap_or(&hash), &r.ticket, r.ino)?;
        if node.is_witness() {
            return Err(refuse(
                ErrorKind::Unavailable,
                "a witness stores no blobs; ask a data replica",
            ));
        }
        if let Some(m) = &manifest {
            if !node.check_chunk_listed(m, &hash).await? {
                return Err(blob_status(BlobError::NotFound(*m)));
            }
        }
        let (file, len) = match node.blobs.open_read(&hash) {
            Ok(opened) => opened,
            Err(e) => {
                if matches!(e, BlobError::Corrupt(_)) {
                    node.repair_now();
                }
                return Err(blob_status(e));
            }
        };
        node.counters.blob_gets.fetch_add(1, Ordering::Relaxed);
        let offset = r.offset;
        // One chunk ahead: with the one HTTP/2 writes and the one hyper holds for it, a stream
        // has about 4 MiB charged while its client reads slower than the disk.
        let (tx, rx) = mpsc::channel::<Result<pb::BlobChunk, Status>>(1);
        let reading = Reading { file, hasher: None };
        tokio::spawn(async move {
            let out = Out { tx, charge };
            // An early stop has nothing more to tell: its failure was sent, or the client went.
            let _ = if offset == 0 {
                stream_whole_verified(&node, reading, len, hash, &out).await
            } else {
                stream_from(reading, len, hash, offset, &out).await
            };
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    #[tracing::instrument(skip_all, fields(blobs = req.get_ref().blobs.len()))]
    async fn get_small(&self, req: Request<pb::GetSmallRequest>) -> Result<Response<pb::GetSmallReply>, Status> {
        let node = self.0.clone();
        let caller = Caller::of(&node, &req);
        let charge = reply_budget::of(&req);
        let r = req.into_inner();
        if r.blobs.len() > MAX_SMALL_GET {
            return Err(refuse(
                ErrorKind::Invalid,
                format!("at most {MAX_SMALL_GET} blobs per GetSmall"),
            ));
        }
        let mut asked = Vec::with_capacity(r.blobs.len());
        for b in &r.blobs {
            let hash = convert::hash(&b.hash)?;
            let manifest = node.chunk_read_manifest(&caller, &b.manifest)?;
            node.check_blob_read(&caller, manifest.as_ref().unwrap_or(&hash), &b.ticket, b.ino)?;
            asked.push((hash, manifest));
        }
        if node.is_witness() {
            return Err(refuse(
                ErrorKind::Unavailable,
                "a witness stores no blobs; ask a data replica",
            ));
        }
        let mut wanted = Vec::with_capacity(asked.len());
        // Each blob once: a reply named one public file 256 times was read, verified and held
        // 256 times over (the caller finds blobs by hash).
        let mut seen = std::collections::HashSet::new();
        for (hash, manifest) in asked {
            // A chunk whose manifest is not held here is left out, like a missing blob.
            match &manifest {
                Some(m) if !node.check_chunk_listed(m, &hash).await? => {}
                _ if seen.insert(hash) => wanted.push(hash),
                _ => {}
            }
        }
        // Room for the reply before it is read: a caller that never reads its replies holds
        // at most its share of them. Taken on the reading thread when there is room at once;
        // otherwise waited for here, off the blocking threads.
        let (n, c) = (node.clone(), charge.clone());
        let read = tokio::task::spawn_blocking(move || {
            let (chosen, bytes) = choose_small_blobs(&n, &wanted);
            if c.try_take(bytes) {
                Ok(read_small_blobs(&n, &chosen))
            } else {
                Err((chosen, bytes))
            }
        })
        .await
        .map_err(internal)?;
        let blobs = match read {
            Ok(blobs) => blobs,
            Err((chosen, bytes)) => {
                charge.take(bytes).await?;
                let n = node.clone();
                tokio::task::spawn_blocking(move || read_small_blobs(&n, &chosen))
                    .await
                    .map_err(internal)?
            }
        };
        node.counters.blob_gets.fetch_add(blobs.len() as u64, Ordering::Relaxed);
        Ok(Response::new(pb::GetSmallReply { blobs }))
    }

    async fn missing(&self, req: Request<pb::MissingBlobsRequest>) -> Result<Response<pb::MissingBlobsReply>, Status> {
        // Asking may restart GC grace periods of live blobs and pin unreferenced ones
        // (`blobs::asked`), so it needs the right to store.
        self.0.check_store(&Caller::of(&self.0, &req))?;
        let pb::MissingBlobsRequest {
            hashes,
            sizes,
            exists_only,
        } = req.into_inner();
        if hashes.len() > MAX_MISSING_QUERY {
            return Err(refuse(
                ErrorKind::Invalid,
                format!("at most {MAX_MISSING_QUERY} hashes per query"),
            ));
        }
        if !sizes.is_empty() && sizes.len() != hashes.len() {
            return Err(refuse(
                ErrorKind::Invalid,
                format!(
                    "{} sizes for {} hashes: give one per hash, or none",
                    sizes.len(),
                    hashes.len()
                ),
            ));
        }
        let parsed = hashes
            .iter()
            .map(|h| convert::hash(h))
            .collect::<Result<Vec<_>, Status>>()?;
        // Up to MAX_MISSING_QUERY files looked at: off the async workers. A witness answers
        // from its spool (the commit check counts hints).
        let node = self.0.clone();
        let (missing, wrong_size) = tokio::task::spawn_blocking(move || {
            let asked: Vec<(Hash, Option<u64>)> = parsed
                .iter()
                .enumerate()
                .map(|(i, h)| (*h, sizes.get(i).copied()))
                .collect();
            let (mut missing, mut wrong_size) = (Vec::new(), Vec::new());
            let answers = if exists_only {
                node.stored(&asked)
            } else {
                node.held_for_commit(&asked)
            };
            for (held, wire) in answers.into_iter().zip(hashes) {
                match held {
                    Held::Yes => {}
                    Held::OtherSize => {
                        wrong_size.push(wire.clone());
                        missing.push(wire);
                    }
                    Held::No => missing.push(wire),
                }
            }
            (missing, wrong_size)
        })
        .await
        .map_err(internal)?;
        Ok(Response::new(pb::MissingBlobsReply { missing, wrong_size }))
    }
}

/// The blobs of `wanted` this replica holds that one `GetSmall` reply sends, each at most
/// `BLOB_CHUNK`, up to `MAX_SMALL_GET_BYTES` in all, and their bytes: sizes first, so that no
/// more than that is ever read into memory. Anything missing or too large is left out: the
/// caller fetches those one by one.
fn choose_small_blobs(node: &Node, wanted: &[Hash]) -> (Vec<Hash>, u64) {
    let sizes = par_map(wanted, |h| node.blobs.size(h));
    let mut chosen = Vec::with_capacity(wanted.len());
    let mut total = 0usize;
    for (hash, len) in wanted.iter().zip(sizes) {
        let Some(len) = len else { continue };
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len > BLOB_CHUNK || total + len > MAX_SMALL_GET_BYTES {
            continue;
        }
        total += len;
        chosen.push(*hash);
    }
    (chosen, total as u64)
}

/// Reads and verifies the `chosen` blobs. A corrupt copy is quarantined
/// (`BlobStore::read_verified`; repair is woken) and left out, as is anything unreadable.
fn read_small_blobs(node: &Node, chosen: &[Hash]) -> Vec<pb::SmallBlob> {
    let read = par_map(chosen, |h| node.blobs.read_verified(h));
    let mut out = Vec::with_capacity(chosen.len());
    for (hash, data) in chosen.iter().zip(read) {
        match data {
            Ok(data) => out.push(pb::SmallBlob {
                hash: bytes::Bytes::copy_from_slice(&hash.0),
                data: data.into(),
            }),
            Err(BlobError::Corrupt(_)) => node.repair_now(),
            Err(_) => {}
        }
    }
    out
}

/// Threads one `GetSmall` reads on. A cold web node asks for a directory's small files at
/// once, and from a cold disk each is a random read: one after another, a hundred of them kept
/// the node waiting about 25 ms per directory; several in flight let the disk overlap them.
const SMALL_READERS: usize = 8;

/// Reader threads all `GetSmall`s together may run beside their callers: a burst of cold web
/// nodes must not become thousands of threads. Past it, a request reads on its own thread.
const SMALL_READERS_TOTAL: usize = 32;

/// Reader threads running now (see [`SMALL_READERS_TOTAL`]).
static SMALL_READERS_NOW: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// One of [`SMALL_READERS_TOTAL`], given back when dropped.
struct ReaderSlot;

impl ReaderSlot {
    fn take() -> Option<ReaderSlot> {
        use std::sync::atomic::Ordering;
        SMALL_READERS_NOW
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < SMALL_READERS_TOTAL).then_some(n + 1)
            })
            .ok()
            .map(|_| ReaderSlot)
    }
}

impl Drop for ReaderSlot {
    fn drop(&mut self) {
        SMALL_READERS_NOW.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// `f` over `items` on up to [`SMALL_READERS`] threads, results in order. Where a thread
/// cannot be started, or all [`SMALL_READERS_TOTAL`] are busy, its share runs here.
fn par_map<T: Sync, U: Send>(items: &[T], f: impl Fn(&T) -> U + Sync) -> Vec<U> {
    let per = items.len().div_ceil(SMALL_READERS).max(1);
    if items.len() <= per {
        return items.iter().map(&f).collect();
    }
    let f = &f;
    std::thread::scope(|s| {
        let parts: Vec<_> = items
            .chunks(per)
            .map(|part| {
                let t = match ReaderSlot::take() {
                    Some(slot) => std::thread::Builder::new()
                        .name("small-get".into())
                        .spawn_scoped(s, move || {
                            let _slot = slot;
                            part.iter().map(f).collect::<Vec<U>>()
                        }),
                    None => Err(std::io::Error::other("every small-get reader is busy")),
                };
                (part, t)
            })
            .collect();
        let mut out = Vec::with_capacity(items.len());
        for (part, t) in parts {
            match t {
                Ok(t) => match t.join() {
                    Ok(done) => out.extend(done),
                    Err(panic) => std::panic::resume_unwind(panic),
                },
                Err(_) => out.extend(part.iter().map(f)),
            }
        }
        out
    })
}

/// On a witness, the spool's room for `size` more bytes (nothing to reserve elsewhere). A full
/// spool refuses a hint (`forwarded`) for lack of space, so the put it belongs to says why, and
/// a client's put as unavailable here, so the client takes it to a data replica instead.
fn spool_room(node: &Node, size: u64, forwarded: bool) -> Result<Option<SpoolReservation<'_>>, Status> {
    if !node.is_witness() {
        return Ok(None);
    }
    let (_, held) = node.blobs.stats();
    match node.spool.reserve(held, size) {
        Ok(r) => Ok(Some(r)),
        Err(e) => Err(spool_refusal(e, forwarded)),
    }
}

/// Grows a put's spool reservation by `more` bytes (see [`spool_room`]).
fn spool_grow(node: &Node, r: &mut SpoolReservation<'_>, more: u64, forwarded: bool) -> Result<(), Status> {
    let (_, held) = node.blobs.stats();
    r.grow(held, more).map_err(|e| spool_refusal(e, forwarded))
}

/// A full spool's refusal: of a hint (`forwarded`) for lack of space; of a client's put as
/// unavailable here, so the client takes it to a data replica.
fn spool_refusal(e: SpoolFull, forwarded: bool) -> Status {
    if forwarded {
        refuse(ErrorKind::NoSpace, e.to_string())
    } else {
        refuse(
            ErrorKind::Unavailable,
            format!("this witness cannot relay the put: {e}; ask a data replica"),
        )
    }
}

/// On a witness that relayed a put: drops its spool copies of `hashes` once every forward
/// stored its copy, unless the put counted them as hints; otherwise the handoff loop keeps
/// them until every data replica holds them.
fn drop_relay_copy(node: &Arc<Node>, r: &mut Replicated, hashes: Vec<Hash>) {
    let forwards = std::mem::take(&mut r.forwards);
    let hinted = r.hinted > 0;
    let n = node.clone();
    node.tasks.spawn("witness spool cleanup", async move {
        let all_stored = futures::future::join_all(forwards)
            .await
            .into_iter()
            .all(|f| matches!(f, Ok(Some(true))));
        if all_stored && !hinted {
            for h in hashes {
                let _ = n.blobs.remove(&h);
            }
        }
    });
}

/// Stores a verified batch of small blobs durably on this replica, off the async workers, and
/// counts the bytes that were new here (`blob_bytes_received`: what dedup did not save).
async fn store_batch(node: &Arc<Node>, batch: Vec<(codafs_common::Hash, bytes::Bytes)>) -> Result<(), Status> {
    let n = node.clone();
    let (_, bytes) = tokio::task::spawn_blocking(move || {
        let refs: Vec<(codafs_common::Hash, &[u8])> = batch.iter().map(|(h, d)| (*h, d.as_ref())).collect();
        n.blobs.put_many(&refs)
    })
    .await
    .map_err(|e| refuse(ErrorKind::Internal, format!("storing a blob batch: {e}")))?
    .map_err(blob_status)?;
    node.counters.blob_bytes_received.fetch_add(bytes, Ordering::Relaxed);
    Ok(())
}

/// The answer to a put that missed its write quorum: `no_space` if a replica refused for lack
/// of disk space, so the uploader learns why; `unavailable` otherwise.
fn quorum_missed(what: String, r: &Replicated) -> Status {
    match r.no_space() {
        Some(f) => refuse(ErrorKind::NoSpace, format!("{what}: {f}")),
        None => refuse(ErrorKind::Unavailable, what),
    }
}

/// Where a `Get` stream's chunks go: the reply's channel, each chunk's bytes taken from the
/// reply budget before it is read (see `crate::reply_budget`).
struct Out {
    tx: mpsc::Sender<Result<pb::BlobChunk, Status>>,
    charge: Arc<ReplyCharge>,
}

impl Out {
    /// Sends `msg`, giving up after a minute if the client stopped reading (so a stalled
    /// reader cannot keep the blob open forever). `Err`: stop.
    async fn send(&self, msg: Result<pb::BlobChunk, Status>) -> Result<(), ()> {
        match tokio::time::timeout(Duration::from_secs(60), self.tx.send(msg)).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(()),
        }
    }

    /// Takes room for `n` more bytes of the reply, waiting (off the blocking threads) while a
    /// caller has not read what it asked for; sends the refusal if none comes. `Err`: stop.
    async fn room(&self, n: usize) -> Result<(), ()> {
        match self.charge.take(n as u64).await {
            Ok(_) => Ok(()),
            Err(s) => self.fail(s).await,
        }
    }

    /// Sends a failure and stops.
    async fn fail(&self, s: Status) -> Result<(), ()> {
        let _ = self.send(Err(s)).await;
        Err(())
    }
}

/// A blob being read, hashed as it goes when `hasher` is set.
struct Reading {
    file: BlobReader,
    hasher: Option<blake3::Hasher>,
}

impl Reading {
    /// The next chunk of at most `max` bytes (empty at the end), read on a blocking thread.
    async fn next(self, max: usize) -> Result<(Self, Vec<u8>), Status> {
        let read = tokio::task::spawn_blocking(move || {
            let mut me = self;
            let mut buf = vec![0u8; max];
            let r = read_full(&mut me.file, &mut buf).map(|n| {
                buf.truncate(n);
                if let Some(h) = &mut me.hasher {
                    h.update(&buf);
                }
                buf
            });
            (me, r)
        })
        .await;
        match read {
            Ok((me, Ok(buf))) => Ok((me, buf)),
            Ok((_, Err(e))) => Err(refuse(ErrorKind::Internal, format!("reading blob: {e}"))),
            Err(e) => Err(internal(e)),
        }
    }
}

/// Fills `buf` from `file` as far as it goes; returns how much was read.
fn read_full(file: &mut BlobReader, buf: &mut [u8]) -> std::io::Result<usize> {
    use std::io::Read;
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// Streams the rest of a blob from `offset` (a client resuming a fetch that broke off). The
/// bytes before `offset` are neither read nor hashed, so a resume costs what it sends, not the
/// whole blob again; nothing here verifies the hash. That is safe because the client hashes
/// every byte it received, from whichever replicas, and uses the blob only if the whole of it
/// matches (`fetch_blob` in client-fuse): a corrupt copy here is caught there, and the client
/// then starts over from 0 elsewhere, where this server's verified path applies.
/// `Err`: stopped early (a failure was sent, or the client went).
async fn stream_from(mut r: Reading, len: u64, hash: Hash, offset: u64, out: &Out) -> Result<(), ()> {
    use std::io::{Seek, SeekFrom};
    let mut first = true;
    if offset < len {
        if let Err(e) = r.file.seek(SeekFrom::Start(offset)) {
            return out
                .fail(refuse(ErrorKind::Internal, format!("seeking in blob {hash}: {e}")))
                .await;
        }
        let mut pos = offset;
        while pos < len {
            let want = BLOB_CHUNK.min(usize::try_from(len - pos).unwrap_or(BLOB_CHUNK));
            out.room(want).await?;
            let buf;
            (r, buf) = match r.next(want).await {
                Ok(x) => x,
                Err(s) => return out.fail(s).await,
            };
            if buf.is_empty() {
                break;
            }
            pos += buf.len() as u64;
            let msg = pb::BlobChunk {
                data: buf.into(),
                total_size: if first { len } else { 0 },
            };
            first = false;
            out.send(Ok(msg)).await?;
        }
        if pos != len {
            return out
                .fail(refuse(
                    ErrorKind::Corrupt,
                    format!("stored copy of blob {hash} is shorter than its {len} bytes; try another replica"),
                ))
                .await;
        }
    }
    if first {
        // Nothing after the offset: still tell the client the blob's size.
        out.send(Ok(pb::BlobChunk {
            data: bytes::Bytes::new(),
            total_size: len,
        }))
        .await?;
    }
    Ok(())
}

/// Streams a whole blob in chunks while hashing it, holding back the last chunk until the
/// whole blob verified: a corrupt copy ends in an error before the receiver has all of it, so
/// it is never served as complete. Corrupt copies are quarantined and repair is woken. The
/// last read asks for one byte more than is left, to find a stored copy longer than it should
/// be; no room is waited for while the last chunk is held (only bytes on their way to the
/// client are held then, so a caller's streams cannot all wait on each other's held chunks).
/// `Err`: stopped early (a failure was sent, or the client went).
async fn stream_whole_verified(node: &Arc<Node>, mut r: Reading, len: u64, hash: Hash, out: &Out) -> Result<(), ()> {
    r.hasher = Some(blake3::Hasher::new());
    let mut pos = 0u64;
    let mut first = true;
    let last = loop {
        // A buffer no larger than what is left (zeroing 1 MiB for each small blob was a tenth
        // of a server's time serving a cold node).
        let want = BLOB_CHUNK.min(usize::try_from(len - pos).unwrap_or(BLOB_CHUNK));
        let is_last = pos + want as u64 == len;
        out.room(want).await?;
        let buf;
        (r, buf) = match r.next(want + usize::from(is_last)).await {
            Ok(x) => x,
            Err(s) => return out.fail(s).await,
        };
        pos += buf.len() as u64;
        if is_last || buf.len() < want {
            // The end, or a stored copy shorter than it should be (checked below).
            break buf;
        }
        let msg = pb::BlobChunk {
            data: buf.into(),
            total_size: if first { len } else { 0 },
        };
        first = false;
        out.send(Ok(msg)).await?;
    };
    let whole = r.hasher.take().map(|h| codafs_common::Hash::from(h.finalize()));
    if whole != Some(hash) || pos != len {
        let n = node.clone();
        let _ = tokio::task::spawn_blocking(move || {
            n.blobs.quarantine(&hash);
            n.repair_now();
        })
        .await;
        return out
            .fail(refuse(
                ErrorKind::Corrupt,
                format!("stored copy of blob {hash} is corrupt; try another replica"),
            ))
            .await;
    }
    if !last.is_empty() || first {
        out.send(Ok(pb::BlobChunk {
            data: last.into(),
            total_size: if first { len } else { 0 },
        }))
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn par_map_keeps_the_order_for_every_size() {
        for n in [0usize, 1, 7, 8, 9, 100, 256] {
            let items: Vec<usize> = (0..n).collect();
            let threads = std::sync::Mutex::new(std::collections::HashSet::new());
            let out = par_map(&items, |i| {
                threads.lock().unwrap().insert(std::thread::current().id());
                i * 3
            });
            assert_eq!(out, items.iter().map(|i| i * 3).collect::<Vec<_>>());
            let used = threads.lock().unwrap().len();
            assert!(used <= SMALL_READERS, "{n} items on {used} threads");
            if n >= 2 * SMALL_READERS {
                assert!(used > 1, "{n} items read on one thread");
            }
        }
        // With every reader thread of the process busy, a request reads on its own thread.
        let held: Vec<ReaderSlot> = std::iter::from_fn(ReaderSlot::take)
            .take(SMALL_READERS_TOTAL + 1)
            .collect();
        assert!(held.len() <= SMALL_READERS_TOTAL);
        let items: Vec<usize> = (0..100).collect();
        let me = std::thread::current().id();
        let out = par_map(&items, |i| {
            assert_eq!(std::thread::current().id(), me, "no thread past the bound");
            i + 1
        });
        assert_eq!(out, items.iter().map(|i| i + 1).collect::<Vec<_>>());
        drop(held);
    }

    /// Runs [`stream_from`] on a file holding `stored` and collects what it sends.
    async fn read_from(stored: &[u8], hash: Hash, offset: u64) -> Vec<Result<pb::BlobChunk, Status>> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        std::fs::write(&path, stored).unwrap();
        let file = BlobReader::File(std::fs::File::open(&path).unwrap());
        let len = stored.len() as u64;
        let (tx, mut rx) = mpsc::channel(4);
        let out = Out {
            tx,
            charge: ReplyCharge::none(),
        };
        let reading = Reading { file, hasher: None };
        let task = tokio::spawn(async move {
            let _ = stream_from(reading, len, hash, offset, &out).await;
        });
        let mut out = Vec::new();
        while let Some(m) = rx.recv().await {
            out.push(m);
        }
        task.await.unwrap();
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_at_an_offset_sends_the_rest_without_reading_what_lies_before() {
        let content: Vec<u8> = (0..3 * BLOB_CHUNK + 123).map(|i| (i % 251) as u8).collect();
        let hash = Hash::of(&content);
        let offset = (2 * BLOB_CHUNK + 7) as u64;
        // The bytes before the offset are damaged on disk: a read from 0 would find the copy
        // corrupt; a read from the offset neither reads nor hashes them (the client verifies).
        let mut stored = content.clone();
        stored[10] ^= 0xff;
        let chunks = read_from(&stored, hash, offset).await;
        let chunks: Vec<pb::BlobChunk> = chunks.into_iter().map(|c| c.unwrap()).collect();
        assert_eq!(chunks[0].total_size, content.len() as u64);
        assert!(chunks[1..].iter().all(|c| c.total_size == 0));
        let got: Vec<u8> = chunks.iter().flat_map(|c| c.data.to_vec()).collect();
        assert_eq!(got, content[offset as usize..]);

        let end = read_from(&content, hash, content.len() as u64 + 5).await;
        assert_eq!(end.len(), 1);
        let only = end.into_iter().next().unwrap().unwrap();
        assert!(only.data.is_empty());
        assert_eq!(only.total_size, content.len() as u64);
    }
}
