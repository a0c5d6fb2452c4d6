//! Large files in chunks (the rule is in `codafs_common::chunks`: content over 4 MiB is a
//! manifest of content-defined chunks, each its own blob).
//!
//! - A fetch reads the manifest, then the chunks in order, a few in flight; each chunk is
//!   verified against its own hash before a byte of it reaches the cache file, so memory stays
//!   at [`IN_FLIGHT`] chunks whatever the file's size. Readers drive it (a [`Fill`]): a read
//!   waits only for the chunks up to its range, so a reader starts before the whole file
//!   arrives; chunks already cached in other files (an old version) are copied, not fetched.
//! - A read without the disk cache (its disk is full), or far ahead of a fill, fetches only the
//!   chunks that hold the requested range.
//! - A store cuts a local file into chunks, asks the data replicas which they lack, sends only
//!   those, then the manifest: a small edit to a large file sends one or two chunks.
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use codafs_common::chunks::{chunk_reader, ChunkRef, Manifest, MAX_MANIFEST_LEN};
use codafs_common::Hash;
use futures::StreamExt;

use super::remote::Remote;
use super::{Core, FsError};
use crate::blocking::blocking;
use crate::cache::stream::WindowSink;
use crate::transport::BlobRef;

/// Chunks fetched or sent at once for one file.
const IN_FLIGHT: usize = 8;
/// How far past a read a fill fetches at most while that read waits anyway (it starts at
/// nothing and doubles with what has arrived, as kernel readahead does).
const READ_AHEAD: u64 = 16 << 20;
/// Manifests kept in memory (a large file being read keeps its own).
pub(super) const MANIFESTS_KEPT: usize = 64;

impl<R: Remote> Core<R> {
    /// The manifest of chunked file content `blob` (`size` bytes): fetched, verified against
    /// the file's hash and checked against its size, then kept for the reads that follow.
    pub(super) async fn manifest_of(&self, blob: &BlobRef, size: u64) -> Result<Arc<Manifest>, FsError> {
        if let Some(m) = self.manifests.lock().unwrap_or_else(|p| p.into_inner()).get(&blob.hash) {
            return Ok(m.clone());
        }
        let bytes = fetch_manifest(&self.remote, blob).await?;
        let m = Manifest::decode(&bytes)
            .map_err(|e| FsError::Corrupt(format!("content {} of a {size}-byte file: {e}", blob.hash)))?;
        if m.size() != size {
            return Err(FsError::Corrupt(format!(
                "manifest {} describes {} bytes, the file has {size}",
                blob.hash,
                m.size()
            )));
        }
        let m = Arc::new(m);
        self.manifests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .put(blob.hash, m.clone());
        Ok(m)
    }

    /// Fetches one chunk into memory, verified (at most `CHUNK_MAX` bytes, within one window).
    async fn fetch_chunk(&self, file: &BlobRef, chunk: Hash, len: u32) -> Result<Vec<u8>, FsError> {
        let mut sink = WindowSink::new(chunk, len as u64, 0);
        self.remote.fetch_blob(&file.chunk(chunk), &mut sink).await?;
        sink.into_bytes()
            .ok_or_else(|| FsError::Corrupt(format!("chunk {chunk} of {} failed verification", file.hash)))
    }

    /// Where chunks of `manifest` already are on this machine: in the cached content of other
    /// large files whose manifests were read recently (above all the previous version of the
    /// same file, when a change event brought a new one). A new version then costs only its
    /// new chunks, for reads and `codafs prefetch` alike.
    fn local_chunks(&self, file: &Hash, manifest: &Manifest) -> HashMap<Hash, (Hash, u64)> {
        let wanted: HashSet<Hash> = manifest.chunks.iter().map(|c| c.hash).collect();
        let known: Vec<(Hash, Arc<Manifest>)> = {
            let lru = self.manifests.lock().unwrap_or_else(|p| p.into_inner());
            lru.iter()
                .filter(|(h, _)| *h != file)
                .map(|(h, m)| (*h, m.clone()))
                .collect()
        };
        let mut found = HashMap::new();
        for (other, m) in known {
            if !self.blobs.lookup(&other) {
                continue;
            }
            for (off, c) in m.with_offsets() {
                if wanted.contains(&c.hash) {
                    found.entry(c.hash).or_insert((other, off));
                }
            }
        }
        found
    }

    /// One chunk's bytes: from a cached file that holds it (`local`: that file and the offset),
    /// verified, or else fetched.
    async fn chunk_bytes(
        &self,
        file: &BlobRef,
        chunk: Hash,
        len: u32,
        local: Option<(Hash, u64)>,
    ) -> Result<Vec<u8>, FsError> {
        if let Some((other, off)) = local {
            let _pin = self.blobs.pin(other);
            let c = ChunkRef { hash: chunk, len };
            let read = blocking(len as u64, || {
                std::fs::File::open(self.blobs.path(&other)).and_then(|f| read_chunk(&f, off, &c))
            });
            if let Ok(Some(buf)) = read {
                self.stats
                    .reused_chunk_bytes
                    .fetch_add(len as u64, std::sync::atomic::Ordering::Relaxed);
                return Ok(buf);
            }
        }
        self.fetch_chunk(file, chunk, len).await
    }

    /// `size` bytes at `offset` of chunked content `blob` (`len` bytes in all), through memory:
    /// the chunk holding `offset` is fetched and kept as a window for the reads that follow.
    pub(super) async fn read_chunked_uncached(
        &self,
        blob: &BlobRef,
        len: u64,
        offset: u64,
        size: u32,
    ) -> Result<Vec<u8>, FsError> {
        let manifest = self.manifest_of(blob, len).await?;
        let end = offset.saturating_add(size as u64).min(len);
        let mut out = Vec::with_capacity(end.saturating_sub(offset) as usize);
        // The chunks the range covers (a read may straddle a boundary): each is fetched whole,
        // verified, and kept as a window for the reads that follow.
        for (start, c) in manifest.with_offsets() {
            let stop = start + c.len as u64;
            if stop <= offset || start >= end {
                continue;
            }
            let from = offset.max(start);
            let to = end.min(stop);
            let data = match self.windows.get(&blob.hash, start, c.len as u64, len) {
                Some(d) => d,
                None => {
                    let d = self.fetch_chunk(blob, c.hash, c.len).await?;
                    self.windows.insert_range(blob.hash, start, d.clone().into());
                    d
                }
            };
            out.extend_from_slice(&data[(from - start) as usize..(to - start) as usize]);
        }
        Ok(out)
    }

    /// Stores the `size` bytes of `file` (a chunked size) on `quorum` replicas as `token`'s
    /// holder: only the chunks some data replica lacks, then the manifest. Returns the content's
    /// hash (the manifest's). The file is read twice (to cut it, then each missing chunk), never
    /// held in memory.
    pub(super) async fn put_chunked(
        &self,
        token: &str,
        file: &std::fs::File,
        size: u64,
        quorum: u32,
        known: Option<Arc<Manifest>>,
    ) -> Result<(Hash, Arc<Manifest>), FsError> {
        let manifest = match known.filter(|m| m.size() == size) {
            // Cut when the file was logged: every chunk sent is checked against it below.
            Some(m) => m,
            None => Arc::new(blocking(size, || {
                let reader = std::io::BufReader::with_capacity(1 << 20, read_at(file, size));
                chunk_reader(reader, |_, _, _| Ok(()))
            })?),
        };
        if manifest.size() != size {
            return Err(FsError::Changed(format!("{} of {size} bytes read", manifest.size())));
        }
        let mut offsets = std::collections::HashMap::new();
        for (off, c) in manifest.with_offsets() {
            offsets.entry(c.hash).or_insert((off, c.len));
        }
        let hashes: Vec<Hash> = offsets.keys().copied().collect();
        let wanted = self.remote.missing(token, hashes).await?;
        let sent: u64 = wanted
            .iter()
            .filter_map(|h| offsets.get(h))
            .map(|(_, l)| *l as u64)
            .sum();
        tracing::debug!(
            chunks = manifest.chunks.len(),
            missing = wanted.len(),
            bytes = sent,
            "storing a chunked file"
        );
        let mut pending = futures::stream::FuturesUnordered::new();
        let mut next = wanted.into_iter();
        loop {
            while pending.len() < IN_FLIGHT {
                let Some(h) = next.next() else { break };
                let (off, len) = offsets[&h];
                pending.push(self.put_chunk(token, file, h, off, len, quorum));
            }
            match pending.next().await {
                Some(r) => r?,
                None => break,
            }
        }
        let encoded = manifest.encode();
        let hash = Hash::of(&encoded);
        self.remote.put_blob(token, encoded.into(), quorum).await?;
        Ok((hash, manifest))
    }

    /// Sends chunk `h` (`len` bytes at `off` of `file`), checking the bytes still are that chunk.
    async fn put_chunk(
        &self,
        token: &str,
        file: &std::fs::File,
        h: Hash,
        off: u64,
        len: u32,
        quorum: u32,
    ) -> Result<(), FsError> {
        let c = ChunkRef { hash: h, len };
        let Some(buf) = blocking(len as u64, || read_chunk(file, off, &c))? else {
            return Err(FsError::Changed(format!("chunk {h} at {off} reads differently")));
        };
        self.remote.put_blob(token, buf.into(), quorum).await
    }
}

/// Chunk `c` read from `file` at `off`, if the bytes there still are that chunk (`None`: the
/// file changed since it was cut).
pub(super) fn read_chunk(file: &std::fs::File, off: u64, c: &ChunkRef) -> std::io::Result<Option<Vec<u8>>> {
    let mut buf = vec![0u8; c.len as usize];
    std::os::unix::fs::FileExt::read_exact_at(file, &mut buf, off)?;
    Ok((Hash::of(&buf) == c.hash).then_some(buf))
}

/// The first `size` bytes of `file`, read by position (`pread`): the shared descriptor's
/// offset is left alone (a shadow file's descriptor is shared with writers).
pub(crate) fn read_at(file: &std::fs::File, size: u64) -> impl std::io::Read + '_ {
    struct At<'a>(&'a std::fs::File, u64, u64);
    impl std::io::Read for At<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let want = buf.len().min((self.2 - self.1) as usize);
            let n = std::os::unix::fs::FileExt::read_at(self.0, &mut buf[..want], self.1)?;
            self.1 += n as u64;
            Ok(n)
        }
    }
    At(file, 0, size)
}

/// Reads a manifest whole, verified. Its length is not in the file's attributes, so it is
/// bounded by the longest a manifest can be ([`MAX_MANIFEST_LEN`]).
async fn fetch_manifest<R: Remote>(remote: &R, blob: &BlobRef) -> Result<Vec<u8>, FsError> {
    struct Whole {
        hash: Hash,
        data: Vec<u8>,
    }
    impl super::remote::ChunkSink for Whole {
        fn received(&self) -> u64 {
            self.data.len() as u64
        }
        fn write(&mut self, d: &[u8]) -> std::io::Result<()> {
            if (self.data.len() + d.len()) as u64 > MAX_MANIFEST_LEN {
                return Err(std::io::Error::other(format!("manifest {} is too long", self.hash)));
            }
            self.data.extend_from_slice(d);
            Ok(())
        }
        fn reset(&mut self) -> std::io::Result<()> {
            self.data.clear();
            Ok(())
        }
        fn verified(&self) -> bool {
            Hash::of(&self.data) == self.hash
        }
    }
    let mut sink = Whole {
        hash: blob.hash,
        data: Vec::new(),
    };
    remote.fetch_blob(blob, &mut sink).await?;
    if !super::remote::ChunkSink::verified(&sink) {
        return Err(FsError::Corrupt(format!("manifest {} failed verification", blob.hash)));
    }
    Ok(sink.data)
}

/// Fills in progress kept at once (each holds a temp file of a partly fetched large file).
pub(super) const FILLS_KEPT: usize = 16;
/// The most a single read may wait to have fetched: its distance ahead plus one round of
/// chunks (what its deadline is sized for).
pub(super) const READ_AHEAD_BYTES: u64 =
    FAR_AHEAD + READ_AHEAD + IN_FLIGHT as u64 * codafs_common::chunks::CHUNK_MAX as u64;
/// A read this far past what a fill has verified is served from its own chunk instead of
/// fetching everything before it (a reader seeking into a large file).
const FAR_AHEAD: u64 = 32 << 20;

/// A large file being brought into the cache by its readers, chunk by chunk in order: a read
/// waits only for the chunks up to its range (and a few ahead), so a reader starts before the
/// whole file arrives. Readers drive it (no background task); once the last chunk is in, the
/// file becomes a cache entry. A fill dropped unfinished (evicted, or the mount stopping)
/// removes its temp file.
pub(super) struct Fill {
    file: std::fs::File,
    path: std::path::PathBuf,
    manifest: Arc<Manifest>,
    /// Where its chunks already are locally (see `Core::local_chunks`), found once when the
    /// fill starts; a copy that has gone since is fetched instead.
    local: HashMap<Hash, (Hash, u64)>,
    /// Chunks written and verified: the first `next`, covering `verified` bytes.
    next: usize,
    verified: u64,
    /// Moved into the cache: nothing to remove.
    adopted: bool,
}

impl Drop for Fill {
    fn drop(&mut self) {
        if !self.adopted {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A shared fill.
pub(super) type FillRef = Arc<tokio::sync::Mutex<Fill>>;

impl<R: Remote> Core<R> {
    /// Whether chunked content `hash` is being brought in by its readers (then it is neither
    /// cached nor in the write-back log: the next read goes straight to the fill).
    pub(super) fn filling(&self, hash: &Hash) -> bool {
        self.fills.lock().unwrap_or_else(|p| p.into_inner()).contains(hash)
    }

    /// The fill of chunked content `blob` (`len` bytes), started if there is none. `None` when
    /// the cache disk has no room for the whole file (readers then go through memory).
    async fn fill_of(&self, blob: &BlobRef, len: u64) -> Result<Option<FillRef>, FsError> {
        if let Some(f) = self.fills.lock().unwrap_or_else(|p| p.into_inner()).get(&blob.hash) {
            return Ok(Some(f.clone()));
        }
        if !self.blobs.has_room(len) {
            return Ok(None);
        }
        let manifest = self.manifest_of(blob, len).await?;
        self.count_hit(blob.ino, false);
        let path = self.blobs.tmp_path(&blob.hash);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        let local = self.local_chunks(&blob.hash, &manifest);
        let fill = Arc::new(tokio::sync::Mutex::new(Fill {
            file,
            path,
            manifest,
            local,
            next: 0,
            verified: 0,
            adopted: false,
        }));
        let mut fills = self.fills.lock().unwrap_or_else(|p| p.into_inner());
        // Another reader may have started one meanwhile: use theirs (ours is dropped unused).
        if let Some(f) = fills.get(&blob.hash) {
            return Ok(Some(f.clone()));
        }
        fills.put(blob.hash, fill.clone());
        Ok(Some(fill))
    }

    /// Fetches chunks of `fill` in order until `upto` bytes are verified (and up to
    /// [`IN_FLIGHT`] chunks in one go); makes it a cache entry once complete. Returns whether
    /// it asked the servers for any chunk (others are copied from cached files).
    async fn drive(&self, blob: &BlobRef, fill: &mut Fill, upto: u64) -> Result<bool, FsError> {
        let manifest = fill.manifest.clone();
        // A window of chunks in flight, refilled as each arrives, until `upto` is covered and
        // what was started has landed (a read that stops there leaves nothing half-fetched).
        let mut pending = futures::stream::FuturesOrdered::new();
        let mut started = fill.next;
        let mut covered = fill.verified;
        let mut asked = false;
        // Bytes of the chunks in flight, which share the connection.
        let mut in_flight = 0u64;
        loop {
            while pending.len() < IN_FLIGHT && started < manifest.chunks.len() && covered < upto {
                let c = &manifest.chunks[started];
                let local = fill.local.get(&c.hash).copied();
                asked |= local.is_none();
                pending.push_back(self.chunk_bytes(blob, c.hash, c.len, local));
                covered += c.len as u64;
                in_flight += c.len as u64;
                started += 1;
            }
            // Chunks arrive in order: the next one must within the transfer time of what is in
            // flight, so servers that stopped answering fail the read after about `--timeout`
            // plus that, not after the time the whole read-ahead would take (what the read's
            // own deadline is sized for).
            let wait = crate::policy::transfer_timeout(self.cfg.op_timeout, in_flight);
            let Ok(next) = tokio::time::timeout(wait, pending.next()).await else {
                return Err(FsError::Disconnected(format!(
                    "no chunk of {} arrived within {wait:?}",
                    blob.hash
                )));
            };
            let Some(data) = next else { break };
            let data = data?;
            in_flight = in_flight.saturating_sub(data.len() as u64);
            let at = fill.verified;
            blocking(data.len() as u64, || {
                std::os::unix::fs::FileExt::write_all_at(&fill.file, &data, at)
            })?;
            fill.verified += data.len() as u64;
            fill.next += 1;
        }
        if fill.next == manifest.chunks.len() && !fill.adopted {
            self.fills.lock().unwrap_or_else(|p| p.into_inner()).pop(&blob.hash);
            if !self.blobs.lookup(&blob.hash) {
                self.blobs
                    .adopt(blob.hash, &fill.path, fill.verified, true)
                    .map_err(|e| FsError::NoSpace(format!("caching {}: {e}", blob.hash)))?;
            }
            fill.adopted = true;
        }
        Ok(asked)
    }

    /// Brings all of chunked content `blob` into the cache through its fill (what opening a
    /// large file for writing, or any whole-file need, waits for).
    pub(super) async fn fill_whole(&self, blob: &BlobRef, len: u64) -> Result<bool, FsError> {
        let Some(fill) = self.fill_of(blob, len).await? else {
            return Ok(false);
        };
        let mut f = fill.lock().await;
        self.drive(blob, &mut f, len).await?;
        Ok(true)
    }

    /// `size` bytes at `offset` of chunked content `blob` (`len` bytes) not yet cached: served
    /// from its fill once the chunks up to there are in (a far seek is served from its own
    /// chunk instead). `None` when the cache disk has no room for the file.
    pub(super) async fn read_filling(
        &self,
        blob: &BlobRef,
        len: u64,
        offset: u64,
        size: u32,
    ) -> Result<Option<Vec<u8>>, FsError> {
        let Some(fill) = self.fill_of(blob, len).await? else {
            return Ok(None);
        };
        let end = offset.saturating_add(size as u64).min(len);
        let mut f = fill.lock().await;
        // Its own bytes are in already: fetching ahead is a favour, never this read's failure,
        // and not tried while fetching this file just failed.
        let own = end <= f.verified;
        let ahead_wanted = !(own && self.failed_lately(&blob.hash));
        if offset > f.verified.saturating_add(FAR_AHEAD) {
            drop(f);
            let r = self.read_chunked_uncached(blob, len, offset, size).await;
            if r.is_ok() {
                self.server_answered();
            }
            return r.map(Some);
        }
        // Ahead of the reader too, ramping up as it goes (the first read waits for one chunk):
        // a sequential reader's next reads find their chunks in.
        let ahead = f.verified.min(READ_AHEAD);
        if ahead_wanted {
            let driven = self.drive(blob, &mut f, end.saturating_add(ahead).min(len)).await;
            match self.noted(&blob.hash, driven) {
                Ok(true) => self.server_answered(),
                Ok(false) => {}
                Err(e) if !own => return Err(e),
                Err(e) => tracing::debug!(error = %e, "fetching ahead failed; the read is served"),
            }
        }
        let mut buf = vec![0u8; end.saturating_sub(offset) as usize];
        let file = &f.file;
        blocking(buf.len() as u64, || {
            std::os::unix::fs::FileExt::read_exact_at(file, &mut buf, offset)
        })?;
        Ok(Some(buf))
    }
}
