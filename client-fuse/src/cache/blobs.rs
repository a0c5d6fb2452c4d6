//! The persistent whole-file cache: one file per blob at `blobs/<2 hex>/<64 hex>`, keyed by
//! content hash, so identical files share an entry and an entry can never be stale. The small
//! files a listing brings are kept together as one entry, a pack (`<64 hex>.pack`, see
//! `pack.rs`): its files are found through `State::members` (about 120 bytes of memory each),
//! and everything below (verification, the saved index, the sweep, eviction) treats the pack
//! as one entry.
//!
//! Crash safety: a fetch writes `blobs/<2 hex>/.tmp-…` while hashing, and only a blob whose hash
//! verified is renamed into place (temp files are deleted at start). The temp file is in the
//! entry's own directory because a rename across directories takes a lock for the whole
//! filesystem in Linux (`s_vfs_rename_mutex`): a cold node writing hundreds of small files at
//! once queued on it. The 256 directories are made once, at start, not checked per entry. Entries are not fsynced; instead, after
//! a machine crash or reboot every entry found at start is *unverified* and is re-hashed on its
//! first use, so a torn file left by the crash is detected and refetched instead of served.
//!
//! Only a reboot can tear an entry: a daemon that is killed or restarted leaves every completed
//! write in the kernel's page cache. So the cache keeps a marker (`verified-boot`) naming the
//! boot during which every entry present was written or verified, and a restart within that
//! boot trusts them all: no re-hashing, which would cost a restarted web node a whole-file read
//! and hash per first read. The marker is removed while any entry is unverified.
//!
//! Eviction: least recently used first, down to the byte budget; pinned entries (reads in
//! progress) and the entry just admitted are skipped, so a blob larger than the whole budget is
//! still readable: a read pins it before it is fetched and admitted, and it stays (over budget)
//! until the next admission evicts it.
//!
//! Start: a clean stop saves the index (`blobs.index`: every entry's hash, size and
//! verified flag in order of use, with a checksum), and the next start reads it instead of
//! listing and `stat`ing every entry, which after a reboot costs a disk read per cached file
//! (about 10 s for a million). The file is removed (durably) as it is read, and any change to
//! the cache after it was written removes it as well, so a saved index is exact or absent.
//! Entries a saved index names but whose files someone deleted are forgotten when a read finds
//! them missing.
//!
//! A daemon that is killed, or a machine that crashes, saves nothing. For those starts the
//! running daemon also writes a *checkpoint* of the index now and then (`blobs.checkpoint`,
//! same format, [`BlobCache::checkpoint`]): a hint, not exact. A start without a saved index
//! reads the checkpoint and serves at once; [`BlobCache::sweep`] then lists the files in the
//! background and adopts those the checkpoint missed (fetched after it was written: without
//! this they would fill the disk past the bound, uncounted) and removes temp files the dead
//! daemon left. Entries the checkpoint names whose files were evicted after it are counted
//! until a read finds them missing or eviction reaches them: the cache errs towards holding
//! less than its bound, never more. A clean stop before the sweep has finished saves no exact
//! index, so the next start sweeps again. Without either file, a start lists, as before.
//!
//! A full cache disk is not an error for readers: a fetch that cannot be written here is
//! reported as [`CacheWriter::failed_locally`] and the core streams it through memory instead
//! (see `stream`).
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use codafs_common::chunks::{content_id, is_chunked};
use codafs_common::Hash;

use super::index::Index;
use super::pack::{self, Member};
use crate::core::remote::ChunkSink;

/// Cache counters.
#[derive(Debug, Default)]
pub struct BlobStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub fetched_bytes: AtomicU64,
    pub evictions: AtomicU64,
    pub corrupt_dropped: AtomicU64,
}

struct State {
    /// Entries, their sizes and order of use, and which are unverified. A pack is one entry.
    index: Index,
    pins: HashMap<Hash, usize>,
    /// Whether the `verified-boot` marker names this boot (no entry is unverified).
    marked: bool,
    /// Packs held (see `pack`), by name: the files each holds.
    packs: HashMap<Hash, Box<[Member]>>,
    /// Where each packed file is: its pack's name, and its place there.
    members: HashMap<Hash, Place>,
}

/// A packed file's place: its pack, offset and length.
#[derive(Debug, Clone, Copy)]
struct Place {
    pack: Hash,
    offset: u64,
    len: u64,
}

impl State {
    /// Whether `h` is cached: an entry of its own, or a file of a pack held.
    fn holds(&self, h: &Hash) -> bool {
        self.index.contains(h) || self.place(h).is_some()
    }

    /// Where packed file `h` is, if a pack held has it.
    fn place(&self, h: &Hash) -> Option<&Place> {
        self.members.get(h).filter(|p| self.index.contains(&p.pack))
    }

    /// The entry that holds `h`'s bytes: its pack (`true`) if packed, else `h` itself.
    fn entry_of(&self, h: &Hash) -> (Hash, bool) {
        match self.place(h) {
            Some(p) => (p.pack, true),
            None => (*h, false),
        }
    }

    /// Records the files of pack `id` (its entry is in the index).
    fn add_pack(&mut self, id: Hash, members: Vec<Member>) {
        for m in &members {
            // Packed already elsewhere (two batches raced): that pack keeps serving it.
            if self
                .members
                .get(&m.hash)
                .is_some_and(|p| self.packs.contains_key(&p.pack))
            {
                continue;
            }
            self.members.insert(
                m.hash,
                Place {
                    pack: id,
                    offset: m.offset,
                    len: m.len,
                },
            );
        }
        self.packs.insert(id, members.into_boxed_slice());
    }

    /// Forgets the files of pack `id`; whether it was one.
    fn drop_pack(&mut self, id: &Hash) -> bool {
        let Some(members) = self.packs.remove(id) else {
            return false;
        };
        for m in members.iter() {
            if self.members.get(&m.hash).is_some_and(|p| p.pack == *id) {
                self.members.remove(&m.hash);
            }
        }
        true
    }
}

/// Whether entry `h` must stay: pinned itself, or a pack with a pinned file.
fn pinned(pins: &HashMap<Hash, usize>, packs: &HashMap<Hash, Box<[Member]>>, h: &Hash) -> bool {
    !pins.is_empty()
        && (pins.contains_key(h)
            || packs
                .get(h)
                .is_some_and(|ms| ms.iter().any(|m| pins.contains_key(&m.hash))))
}

/// Where a cached blob's bytes are: a file, and the offset of its first byte there.
struct Located {
    path: PathBuf,
    offset: u64,
    packed: bool,
    /// Bytes of it there: a packed file's length, or no bound (its own file ends it).
    limit: u64,
}

/// The blob cache directory.
pub struct BlobCache {
    root: PathBuf,
    max_bytes: u64,
    state: Mutex<State>,
    seq: AtomicU64,
    pub stats: BlobStats,
    /// This boot's id, for the `verified-boot` marker.
    boot: String,
    /// Temp files being written (a saved index would not know to remove them).
    live_tmp: AtomicU64,
    /// A saved index (`blobs.index`) is on disk and exact; the next change removes it.
    saved: AtomicBool,
    /// This daemon's mark in temp file names, so a sweep running beside it removes only those
    /// an earlier daemon left.
    run: String,
    /// Counts changes to the index, so a checkpoint is written only when something moved.
    generation: AtomicU64,
    /// The generation the last checkpoint described (also serializes checkpoints).
    checkpointed: Mutex<Option<u64>>,
    /// Opened from a checkpoint: files on disk may be missing from the index until
    /// [`BlobCache::sweep`] has run.
    sweep_pending: AtomicBool,
    /// Whether files a sweep adopts must be re-hashed first (not written during this boot).
    adopt_unverified: bool,
    /// A clean stop began: a running sweep stops at its next directory.
    closing: AtomicBool,
}

/// What a [`BlobCache::sweep`] found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SweepReport {
    /// Files the index did not name, now entries.
    pub adopted: u64,
    /// Temp files an earlier daemon left, removed.
    pub stale_tmp: u64,
    /// The sweep stopped early (a clean stop began); the next start sweeps again.
    pub interrupted: bool,
}

/// Why a blob could not be cached.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("fetched content does not match hash {0}")]
    Mismatch(Hash),
    #[error("cache I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// Bytes a fetch leaves free on the cache's filesystem at least; with less, blobs are streamed
/// through memory instead of cached (metadata and shadows need room too).
pub const CACHE_DISK_HEADROOM: u64 = 8 << 20;

/// Free bytes of the filesystem holding `path` (`None` if it cannot be asked).
pub fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: `c` is a valid NUL-terminated string and `st` a properly sized out-parameter.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// The running kernel's boot id: it changes at every boot, so a marker holding it says "since
/// this boot began" (empty if the kernel does not tell, which makes every start unverified).
fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

const BOOT_MARKER: &str = "verified-boot";

/// The index a clean stop saves for the next start.
const SAVED_INDEX: &str = "blobs.index";
/// The index a running daemon writes now and then, for a start after a crash.
const CHECKPOINT: &str = "blobs.checkpoint";
/// First bytes of [`SAVED_INDEX`], with its format's version (2: packs).
const SAVED_MAGIC: &[u8; 8] = b"CDFSIDX2";
/// The format before packs, still read: entries only.
const SAVED_MAGIC_1: &[u8; 8] = b"CDFSIDX1";
/// Bytes per entry in [`SAVED_INDEX`]: hash, then size with the flags in its top bits.
const SAVED_ENTRY: usize = 40;
const SAVED_UNVERIFIED: u64 = 1 << 63;
const SAVED_PACK: u64 = 1 << 62;

/// Names of blobs being written, beside the entries they become.
const TMP_PREFIX: &str = ".tmp-";
/// What a pack's file name ends with (`<64 hex>.pack`).
const PACK_SUFFIX: &str = ".pack";
/// A pack is at most this share of the cache's budget (past it, its files are cached one
/// file each): 1/16, so 1 MiB batches are packed from a 16 MiB cache up.
const PACK_SHARE: u64 = 16;

impl BlobCache {
    /// Opens the cache at `root`, bounded to `max_bytes`.
    pub fn open(root: &Path, max_bytes: u64) -> Result<Self, CacheError> {
        Self::open_in_boot(root, max_bytes, &boot_id())
    }

    /// [`BlobCache::open`] as if running in boot `boot` (tests simulate a reboot with it).
    fn open_in_boot(root: &Path, max_bytes: u64, boot: &str) -> Result<Self, CacheError> {
        let marker = std::fs::read_to_string(root.join(BOOT_MARKER)).unwrap_or_default();
        let same_boot = !boot.is_empty() && marker.trim() == boot;
        std::fs::create_dir_all(root.join("blobs"))?;
        std::fs::create_dir_all(root.join("tmp"))?;
        for i in 0..=255u8 {
            match std::fs::create_dir(root.join("blobs").join(format!("{i:02x}"))) {
                Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e.into()),
                _ => {}
            }
        }
        for e in std::fs::read_dir(root.join("tmp"))? {
            let _ = std::fs::remove_file(e?.path());
        }
        let mut state = State {
            index: Index::default(),
            pins: HashMap::new(),
            marked: same_boot,
            packs: HashMap::new(),
            members: HashMap::new(),
        };
        let started = std::time::Instant::now();
        // Written during this boot: a saved index's verified flags still hold; else none does.
        let load = |state: &mut State, saved: SavedIndex| {
            let trust = same_boot && saved.boot == boot;
            for mut f in saved.entries {
                f.unverified |= !trust;
                Self::index_found(root, state, f);
            }
        };
        let (how, sweep_pending) = match take_saved_index(root)? {
            Some(saved) => {
                load(&mut state, saved);
                ("from the saved index", false)
            }
            None => match read_checkpoint(root) {
                Some(saved) => {
                    load(&mut state, saved);
                    ("from its checkpoint; its files are reconciled in the background", true)
                }
                None => {
                    Self::list_entries(root, &mut state, !same_boot)?;
                    ("by listing its files", false)
                }
            },
        };
        tracing::info!(
            entries = state.index.len(),
            packs = state.packs.len(),
            bytes = state.index.bytes(),
            ms = started.elapsed().as_millis() as u64,
            "blob cache opened {how}"
        );
        let cache = BlobCache {
            root: root.to_path_buf(),
            max_bytes,
            state: Mutex::new(state),
            seq: AtomicU64::new(0),
            stats: BlobStats::default(),
            boot: boot.to_string(),
            live_tmp: AtomicU64::new(0),
            saved: AtomicBool::new(false),
            run: format!("{:x}{:x}", std::process::id(), codafs_common::now_ns()),
            generation: AtomicU64::new(0),
            checkpointed: Mutex::new(None),
            sweep_pending: AtomicBool::new(sweep_pending),
            adopt_unverified: !same_boot,
            closing: AtomicBool::new(false),
        };
        if !same_boot {
            // Written afresh once every entry is verified (or at once, if there is none).
            let _ = std::fs::remove_file(root.join(BOOT_MARKER));
        }
        cache.evict();
        cache.settle_marker(&mut cache.lock());
        Ok(cache)
    }

    /// Rebuilds the index from the files in `blobs/` (no saved index, or an unusable one),
    /// removing temp files a stopped daemon left; recency follows the files' modification times.
    fn list_entries(root: &Path, state: &mut State, unverified: bool) -> Result<(), CacheError> {
        let mut found = Vec::new();
        for sub in std::fs::read_dir(root.join("blobs"))? {
            let sub = sub?.path();
            if !sub.is_dir() {
                continue;
            }
            for f in std::fs::read_dir(&sub)? {
                let f = f?;
                let name = f.file_name();
                let Some((h, packed)) = entry_name(&name) else {
                    if name.as_encoded_bytes().starts_with(TMP_PREFIX.as_bytes()) {
                        let _ = std::fs::remove_file(f.path());
                    }
                    continue;
                };
                let m = f.metadata()?;
                let Some(members) = Self::members_found(&f.path(), packed, m.len()) else {
                    continue;
                };
                found.push((m.modified().ok(), h, m.len(), members));
            }
        }
        // Oldest first, so the most recently written end up most recently used.
        found.sort_by_key(|(t, h, _, _)| (*t, *h));
        for (_, hash, len, members) in found {
            let f = Found {
                hash,
                len,
                unverified,
                members,
            };
            Self::index_found(root, state, f);
        }
        Ok(())
    }

    /// The files of the pack at `path` (`Some(None)` for an entry that is not a pack);
    /// `None`, with the file removed, for a pack that cannot be read.
    fn members_found(path: &Path, packed: bool, len: u64) -> Option<Option<Vec<Member>>> {
        if !packed {
            return Some(None);
        }
        match pack::read_members(path, len) {
            Ok(members) => Some(Some(members)),
            Err(e) => {
                // Only a pack that is not one goes; one that could not be read now stays for
                // the next start (uncounted until then).
                let broken = match &e {
                    pack::PackError::Malformed(_) => true,
                    pack::PackError::Io(io) => io.kind() == std::io::ErrorKind::UnexpectedEof,
                };
                tracing::warn!(path = %path.display(), error = %e, removed = broken, "a cache pack was not read");
                if broken {
                    let _ = std::fs::remove_file(path);
                }
                None
            }
        }
    }

    /// Adds an entry found at start; past what the index can name, its file is removed (the
    /// rest are not cached).
    fn index_found(root: &Path, state: &mut State, f: Found) {
        if state.index.insert(f.hash, f.len, f.unverified).is_err() {
            let _ = std::fs::remove_file(Self::path_in(root, &f.hash, f.members.is_some()));
            return;
        }
        if let Some(members) = f.members {
            state.add_pack(f.hash, members);
        }
    }

    /// Saves the index for the next start (see the module's note); call once nothing more is
    /// being cached (a clean stop). Not saved while a temp file is being written, because the
    /// next start would not look for it. Whether it was saved.
    /// Also not while a sweep still has files to adopt: the next start sweeps again.
    pub fn save_index(&self) -> Result<bool, CacheError> {
        let s = self.lock();
        if self.live_tmp.load(Ordering::SeqCst) > 0 || self.sweep_pending.load(Ordering::SeqCst) {
            return Ok(false);
        }
        let out = self.encode_index(&s);
        self.write_index_file(SAVED_INDEX, &out)?;
        // Under the state lock: a change that follows sees the flag and removes the file.
        self.saved.store(true, Ordering::SeqCst);
        drop(s);
        Ok(true)
    }

    /// Writes a checkpoint of the index (see the module's note) unless nothing changed since
    /// the last one; whether it wrote one. The state lock is held only to copy the entries
    /// (about 40 bytes each), not for the write and its fsync.
    pub fn checkpoint(&self) -> Result<bool, CacheError> {
        let mut last = self.checkpointed.lock().unwrap_or_else(|p| p.into_inner());
        let (out, generation) = {
            let s = self.lock();
            let generation = self.generation.load(Ordering::SeqCst);
            if *last == Some(generation) {
                return Ok(false);
            }
            (self.encode_index(&s), generation)
        };
        self.write_index_file(CHECKPOINT, &out)?;
        *last = Some(generation);
        Ok(true)
    }

    /// The index in the saved-index format: magic, boot id, count, entries oldest first (a
    /// pack flagged), then each pack's files (count, then hash and length each), blake3.
    fn encode_index(&self, s: &State) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + s.index.len() * SAVED_ENTRY + s.members.len() * pack::LINE);
        out.extend_from_slice(SAVED_MAGIC);
        out.extend_from_slice(&(self.boot.len() as u32).to_le_bytes());
        out.extend_from_slice(self.boot.as_bytes());
        out.extend_from_slice(&(s.index.len() as u64).to_le_bytes());
        let mut packs = Vec::new();
        for (h, len, unverified) in s.index.entries() {
            out.extend_from_slice(&h.0);
            let mut flags = if unverified { SAVED_UNVERIFIED } else { 0 };
            if let Some(members) = s.packs.get(&h) {
                flags |= SAVED_PACK;
                packs.push(members);
            }
            out.extend_from_slice(&(len | flags).to_le_bytes());
        }
        for members in packs {
            out.extend_from_slice(&(members.len() as u32).to_le_bytes());
            for m in members.iter() {
                pack::push_line(&mut out, &m.hash, m.len);
            }
        }
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    /// Writes `bytes` to `name` in the cache directory, whole or not at all (temp file, fsync,
    /// rename, directory fsync).
    fn write_index_file(&self, name: &str, bytes: &[u8]) -> Result<(), CacheError> {
        let tmp = self.root.join("tmp").join(name);
        let written = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, self.root.join(name))?;
            std::fs::File::open(&self.root)?.sync_all()
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(e.into());
        }
        Ok(())
    }

    /// After a start from a checkpoint: lists every entry directory, adopts files the index
    /// does not name and removes temp files an earlier daemon left (see the module's note).
    /// Runs beside reads and fetches; does nothing after any other start.
    pub fn sweep(&self) -> SweepReport {
        let mut report = SweepReport::default();
        if !self.sweep_pending.load(Ordering::SeqCst) {
            return report;
        }
        let ours = format!("{TMP_PREFIX}{}-", self.run);
        for i in 0..=255u8 {
            if self.closing.load(Ordering::SeqCst) {
                report.interrupted = true;
                return report;
            }
            let dir = self.root.join("blobs").join(format!("{i:02x}"));
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for f in entries.flatten() {
                let name = f.file_name();
                let Some((h, packed)) = entry_name(&name) else {
                    let n = name.as_encoded_bytes();
                    if n.starts_with(TMP_PREFIX.as_bytes()) && !n.starts_with(ours.as_bytes()) {
                        report.stale_tmp += u64::from(std::fs::remove_file(f.path()).is_ok());
                    }
                    continue;
                };
                let mut s = self.lock();
                if s.index.contains(&h) {
                    continue;
                }
                // Under the lock, with the file checked again: an eviction removes its file
                // under this lock too, so nothing adopted here lacks its file.
                let Ok(m) = std::fs::metadata(f.path()) else {
                    continue;
                };
                let Some(members) = Self::members_found(&f.path(), packed, m.len()) else {
                    continue;
                };
                if s.index.insert(h, m.len(), self.adopt_unverified).is_err() {
                    continue;
                }
                if let Some(members) = members {
                    s.add_pack(h, members);
                }
                report.adopted += 1;
                if self.adopt_unverified {
                    self.settle_marker(&mut s);
                }
                drop(s);
                self.unsave();
            }
        }
        self.sweep_pending.store(false, Ordering::SeqCst);
        self.evict();
        report
    }

    /// Whether a sweep is still to run (see [`BlobCache::sweep`]).
    pub fn sweep_pending(&self) -> bool {
        self.sweep_pending.load(Ordering::SeqCst)
    }

    /// Makes a running sweep stop at its next directory.
    pub fn stop_sweep(&self) {
        self.closing.store(true, Ordering::SeqCst);
    }

    /// The cache changed: a saved index no longer describes it, and the next checkpoint
    /// has something to write.
    fn unsave(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        if self.saved.swap(false, Ordering::SeqCst) {
            let _ = std::fs::remove_file(self.root.join(SAVED_INDEX));
        }
    }

    /// Drops `h` from the index without touching its file: a read found the file missing
    /// (deleted behind the cache's back), so the next read fetches it again.
    pub fn forget_missing(&self, h: &Hash) {
        let mut s = self.lock();
        // A packed file: its pack is what went missing.
        let (h, packed) = s.entry_of(h);
        // Placed again meanwhile (a concurrent fetch): keep it.
        if Self::path_in(&self.root, &h, packed).exists() {
            return;
        }
        s.drop_pack(&h);
        if s.index.remove(&h).is_some() {
            tracing::warn!(hash = %h, "a cached blob's file is missing; fetching it again");
            self.settle_marker(&mut s);
            drop(s);
            self.unsave();
        }
    }

    /// Keeps the boot marker true: present exactly when no entry is unverified. Called after
    /// every change to the unverified set; writing or removing it happens once per change of
    /// state, not per entry.
    fn settle_marker(&self, s: &mut State) {
        let want = s.index.unverified() == 0 && !self.boot.is_empty();
        if want == s.marked {
            return;
        }
        let path = self.root.join(BOOT_MARKER);
        let done = if want {
            // A torn marker cannot match a boot id, so no fsync; the rename makes it whole.
            let tmp = self.root.join("tmp").join(BOOT_MARKER);
            std::fs::write(&tmp, &self.boot).and_then(|()| std::fs::rename(&tmp, &path))
        } else {
            std::fs::remove_file(&path).or_else(|e| match e.kind() {
                std::io::ErrorKind::NotFound => Ok(()),
                _ => Err(e),
            })
        };
        match done {
            Ok(()) => s.marked = want,
            Err(e) => tracing::debug!(error = %e, "blob cache boot marker"),
        }
    }

    /// Packs held.
    #[cfg(test)]
    pub fn packs(&self) -> usize {
        self.lock().packs.len()
    }

    /// (packs, files found through them) held.
    pub fn pack_usage(&self) -> (usize, usize) {
        let s = self.lock();
        (s.packs.len(), s.members.len())
    }

    /// Entries still to be re-hashed before their first use (after a reboot).
    #[cfg(test)]
    fn unverified(&self) -> usize {
        self.lock().index.unverified()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The file of entry `h` when it is a file of its own (not a pack's).
    pub fn path(&self, h: &Hash) -> PathBuf {
        Self::path_in(&self.root, h, false)
    }

    /// The file of entry `h`: a blob's, or a pack's (`<hex>.pack`).
    fn path_in(root: &Path, h: &Hash, pack: bool) -> PathBuf {
        let hex = h.to_hex();
        let dir = root.join("blobs").join(&hex[..2]);
        if pack {
            dir.join(format!("{hex}{PACK_SUFFIX}"))
        } else {
            dir.join(hex)
        }
    }

    /// Where `h`'s bytes are, if cached (a file of its own, or its place in a pack).
    fn locate(&self, h: &Hash) -> Option<Located> {
        let s = self.lock();
        if let Some(p) = s.place(h) {
            return Some(Located {
                path: Self::path_in(&self.root, &p.pack, true),
                offset: p.offset,
                packed: true,
                limit: p.len,
            });
        }
        s.index.contains(h).then(|| Located {
            path: self.path(h),
            offset: 0,
            packed: false,
            limit: u64::MAX,
        })
    }

    /// Up to `n` bytes of cached blob `h` from `offset` (fewer at its end). `NotFound` when it
    /// is not cached, or its file went missing (see [`BlobCache::forget_missing`]).
    pub fn read_at(&self, h: &Hash, offset: u64, n: usize) -> std::io::Result<Vec<u8>> {
        let at = self
            .locate(h)
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))?;
        // Never past a packed file's end, into the next one's bytes.
        let n = n.min(usize::try_from(at.limit.saturating_sub(offset)).unwrap_or(usize::MAX));
        let f = std::fs::File::open(&at.path)?;
        let mut buf = vec![0u8; n];
        let mut done = 0;
        while done < n {
            let r = std::os::unix::fs::FileExt::read_at(&f, &mut buf[done..], at.offset + offset + done as u64)?;
            if r == 0 {
                break;
            }
            done += r;
        }
        buf.truncate(done);
        Ok(buf)
    }

    /// Copies cached blob `h` (`len` bytes) to a new file at `dest` (a shadow to write in).
    pub fn copy_to(&self, h: &Hash, len: u64, dest: &Path) -> std::io::Result<()> {
        let at = self
            .locate(h)
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))?;
        if !at.packed {
            std::fs::copy(&at.path, dest)?;
            return Ok(());
        }
        // A packed file is small (a listing brings files of at most 64 KiB).
        let bytes = self.read_at(h, 0, usize::try_from(len).unwrap_or(usize::MAX))?;
        if bytes.len() as u64 != len {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("cached blob {h} is shorter than its {len} bytes"),
            ));
        }
        std::fs::write(dest, bytes)
    }

    /// (entries, bytes) cached; each file of a pack counts as an entry.
    pub fn usage(&self) -> (usize, u64) {
        let s = self.lock();
        (s.index.len() - s.packs.len() + s.members.len(), s.index.bytes())
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Whether the cache's disk has room for a blob of `size` bytes (and some headroom); when it
    /// cannot tell, it assumes so (a write that fails is handled anyway).
    pub fn has_room(&self, size: u64) -> bool {
        free_bytes(&self.root).is_none_or(|free| free >= size.saturating_add(CACHE_DISK_HEADROOM))
    }

    /// Whether `h` is cached, from memory alone: neither marks it used nor checks it (for
    /// counting what is cached, not for serving it).
    pub fn holds(&self, h: &Hash) -> bool {
        self.lock().holds(h)
    }

    /// Whether `h` is cached (and marks it used). Unverified entries are checked first.
    /// A packed file marks its pack used, and is checked with it.
    pub fn lookup(&self, h: &Hash) -> bool {
        let (entry, packed, needs_check) = {
            let mut s = self.lock();
            let (entry, packed) = s.entry_of(h);
            let Some((len, unverified)) = s.index.touch(&entry) else {
                return false;
            };
            (entry, packed, unverified.then_some(len))
        };
        if let Some(len) = needs_check {
            let path = Self::path_in(&self.root, &entry, packed);
            let ok = crate::blocking::blocking(len, || {
                if packed {
                    pack::matches(&path, &entry)
                } else {
                    content_matches(&path, &entry, len)
                }
            });
            if let Err(e) = &ok {
                if e.kind() == std::io::ErrorKind::NotFound {
                    // Evicted after a checkpoint named it, or deleted by hand: not corrupt.
                    self.forget_missing(h);
                    return false;
                }
            }
            if !matches!(ok, Ok(true)) {
                self.stats.corrupt_dropped.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(hash = %entry, pack = packed, "cached blob failed verification; dropping it");
                self.remove(&entry);
                return false;
            }
            let mut s = self.lock();
            s.index.set_verified(&entry);
            self.settle_marker(&mut s);
        }
        true
    }

    /// Drops entry `h` (a blob, or a pack with its files) and its file.
    fn remove(&self, h: &Hash) {
        let mut s = self.lock();
        s.index.remove(h);
        let packed = s.drop_pack(h);
        self.settle_marker(&mut s);
        // Under the lock, so a sweep cannot adopt the file in between.
        let _ = std::fs::remove_file(Self::path_in(&self.root, h, packed));
        drop(s);
        self.unsave();
    }

    /// Moves file `from` (content `h`, `len` bytes) into the cache instead of copying it: a
    /// large file the write-back log sent. Unless `verified` (its hash was computed from these
    /// bytes in this process), it is re-hashed on first use like an entry found at start.
    pub fn adopt(&self, h: Hash, from: &Path, len: u64, verified: bool) -> Result<(), CacheError> {
        let dest = self.path(&h);
        if let Some(dir) = dest.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::rename(from, &dest)?;
        self.admit(h, len, !verified);
        Ok(())
    }

    /// Pins `h` against eviction until the returned guard drops.
    pub fn pin(&self, h: Hash) -> Pin<'_> {
        self.hold(h);
        Pin { cache: self, hash: h }
    }

    /// A pin without a guard, for holders that outlive a borrow (write-back contents not yet
    /// on the servers); each `hold` needs one [`BlobCache::unhold`].
    pub fn hold(&self, h: Hash) {
        *self.lock().pins.entry(h).or_insert(0) += 1;
    }

    pub fn unhold(&self, h: &Hash) {
        let mut s = self.lock();
        if let Some(n) = s.pins.get_mut(h) {
            *n -= 1;
            if *n == 0 {
                s.pins.remove(h);
            }
        }
    }

    pub fn pinned(&self, h: &Hash) -> bool {
        self.lock().pins.contains_key(h)
    }

    /// A fresh temp file path for content `h` (the cache directory's `tmp/`, emptied at start).
    pub fn tmp_path(&self, h: &Hash) -> PathBuf {
        self.root
            .join("tmp")
            .join(format!("{}-{}", h.to_hex(), self.seq.fetch_add(1, Ordering::Relaxed)))
    }

    /// Where `h` is written before it is verified: beside its entry, so that placing it is a
    /// rename within one directory.
    /// Counted in `live_tmp` until [`BlobCache::tmp_done`].
    fn tmp_beside(&self, h: &Hash) -> PathBuf {
        {
            // Under the state lock, so a save either sees it or is removed by it.
            let _s = self.lock();
            self.live_tmp.fetch_add(1, Ordering::SeqCst);
            self.unsave();
        }
        let hex = h.to_hex();
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        self.root
            .join("blobs")
            .join(&hex[..2])
            .join(format!("{TMP_PREFIX}{}-{hex}-{seq}", self.run))
    }

    /// Caches `data`, whose hash the caller has checked is `h` (a small file that came with its
    /// directory's listing): written and placed without a second hash or a buffer.
    pub fn put_verified(&self, h: Hash, data: &[u8]) -> Result<(), CacheError> {
        self.place_new(h, data, false)?;
        self.admit(h, data.len() as u64, false);
        self.tmp_done();
        Ok(())
    }

    /// Caches files that came together (each checked against its hash by the caller) as one
    /// pack (see `pack`), leaving out those cached already; how many it cached. One file
    /// alone, or a batch past a pack's bounds, is cached a file each.
    pub fn put_pack(&self, files: &[(Hash, &[u8])]) -> Result<usize, CacheError> {
        let fresh: Vec<(Hash, &[u8])> = {
            let s = self.lock();
            let mut seen = std::collections::HashSet::new();
            files
                .iter()
                .filter(|(h, _)| !s.holds(h) && seen.insert(*h))
                .copied()
                .collect()
        };
        // A pack is evicted whole: in a small cache it would crowd out too much at once.
        let encoded = if fresh.len() > 1 { pack::encode(&fresh) } else { None };
        let Some((bytes, members)) = encoded.filter(|(b, _)| b.len() as u64 <= self.max_bytes / PACK_SHARE) else {
            for (h, data) in &fresh {
                self.put_verified(*h, data)?;
            }
            return Ok(fresh.len());
        };
        let id = pack::id_of(&bytes);
        self.place_new(id, &bytes, true)?;
        let len = bytes.len() as u64;
        {
            let mut s = self.lock();
            if s.index.insert(id, len, false).is_err() {
                drop(s);
                tracing::warn!(pack = %id, "blob cache index full; not caching this pack");
                let _ = std::fs::remove_file(Self::path_in(&self.root, &id, true));
                self.tmp_done();
                return Ok(0);
            }
            s.add_pack(id, members);
        }
        // Only now: a save in between would have missed the placed file.
        self.tmp_done();
        self.unsave();
        self.stats.fetched_bytes.fetch_add(len, Ordering::Relaxed);
        self.evict_but(Some(id));
        Ok(fresh.len())
    }

    /// Writes `data` as entry `h`'s file (a pack's if `pack`): in a temp file beside it,
    /// then renamed into place. The caller admits it, then calls [`BlobCache::tmp_done`]
    /// (until then no index is saved, since it would miss the file); on an error, it is done.
    fn place_new(&self, h: Hash, data: &[u8], pack: bool) -> Result<(), CacheError> {
        let tmp = self.tmp_beside(&h);
        let placed = self
            .create_tmp(&tmp)
            .and_then(|mut f| f.write_all(data))
            .and_then(|()| std::fs::rename(&tmp, Self::path_in(&self.root, &h, pack)));
        if let Err(e) = placed {
            let _ = std::fs::remove_file(&tmp);
            self.tmp_done();
            return Err(e.into());
        }
        Ok(())
    }

    /// Creates a temp file from [`BlobCache::tmp_beside`]; its directory is made again if
    /// someone removed it (the 256 are otherwise made only at start).
    fn create_tmp(&self, tmp: &Path) -> std::io::Result<std::fs::File> {
        match std::fs::File::create(tmp) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some(dir) = tmp.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                std::fs::File::create(tmp)
            }
            r => r,
        }
    }

    /// A temp file from [`BlobCache::tmp_beside`] is renamed or removed.
    fn tmp_done(&self) {
        self.live_tmp.fetch_sub(1, Ordering::SeqCst);
    }

    /// A writer for fetching `h` (`size` bytes) into the cache.
    pub fn writer(&self, h: Hash, size: u64) -> Result<CacheWriter<'_>, CacheError> {
        let tmp = self.tmp_beside(&h);
        // A buffer no larger than the blob: most are a few KiB.
        let buf = size.clamp(4 << 10, 1 << 20) as usize;
        let file = match self.create_tmp(&tmp) {
            Ok(f) => std::io::BufWriter::with_capacity(buf, f),
            Err(e) => {
                self.tmp_done();
                return Err(e.into());
            }
        };
        Ok(CacheWriter {
            cache: self,
            hash: h,
            size,
            tmp,
            file: Some(file),
            hasher: (!is_chunked(size)).then(blake3::Hasher::new),
            chunks_verified: false,
            received: 0,
            local_error: None,
        })
    }

    /// Makes the file at `self.path(&h)` an entry, `unverified` if its bytes were not hashed in
    /// this process.
    fn admit(&self, h: Hash, len: u64, unverified: bool) {
        {
            let mut s = self.lock();
            if s.index.insert(h, len, unverified).is_err() {
                drop(s);
                tracing::warn!(hash = %h, "blob cache index full; not caching this blob");
                let _ = std::fs::remove_file(self.path(&h));
                return;
            }
            if unverified {
                self.settle_marker(&mut s);
            }
        }
        self.unsave();
        self.stats.fetched_bytes.fetch_add(len, Ordering::Relaxed);
        self.evict_but(Some(h));
    }

    /// Evicts least recently used, unpinned entries until within budget.
    pub fn evict(&self) {
        self.evict_but(None);
    }

    /// Evicts least recently used entries until within budget, sparing pinned ones and `keep`.
    fn evict_but(&self, keep: Option<Hash>) {
        let victims: Vec<(Hash, bool)> = {
            let mut s = self.lock();
            let State { index, pins, packs, .. } = &mut *s;
            let victims = index.evict_to(self.max_bytes, |h| pinned(pins, packs, h) || keep == Some(*h));
            let victims = victims.into_iter().map(|h| (h, s.drop_pack(&h))).collect();
            self.settle_marker(&mut s);
            victims
        };
        if !victims.is_empty() {
            self.unsave();
        }
        for (h, packed) in victims {
            self.stats.evictions.fetch_add(1, Ordering::Relaxed);
            // Fetched and admitted again since it was chosen: its new file stays.
            let s = self.lock();
            if !s.index.contains(&h) {
                let _ = std::fs::remove_file(Self::path_in(&self.root, &h, packed));
            }
        }
    }
}

/// A saved index, read back.
struct SavedIndex {
    /// The boot it was written in.
    boot: String,
    /// Least recently used first.
    entries: Vec<Found>,
}

/// An entry found at start, in an index file or on disk.
struct Found {
    hash: Hash,
    len: u64,
    unverified: bool,
    /// A pack's files.
    members: Option<Vec<Member>>,
}

/// The entry a file in `blobs/<2 hex>/` is, and whether it is a pack (`<hex>.pack`); `None`
/// for anything else.
fn entry_name(name: &std::ffi::OsStr) -> Option<(Hash, bool)> {
    let name = name.to_str()?;
    match name.strip_suffix(PACK_SUFFIX) {
        Some(hex) => Some((Hash::from_hex(hex).ok()?, true)),
        None => Some((Hash::from_hex(name).ok()?, false)),
    }
}

/// Reads and removes the index a clean stop saved. `None` when there is none, or when it is
/// unreadable (torn, another version), which only costs a full listing. The removal is made
/// durable before the cache changes, so a crash after this start cannot bring back a stale
/// index; if it cannot be removed, the cache is not opened.
fn take_saved_index(root: &Path) -> Result<Option<SavedIndex>, CacheError> {
    let path = root.join(SAVED_INDEX);
    let Some(saved) = read_index_file(&path, "the saved cache index") else {
        return Ok(None);
    };
    std::fs::remove_file(&path)?;
    std::fs::File::open(root)?.sync_all()?;
    Ok(saved)
}

/// Reads the checkpoint a running daemon wrote (see [`BlobCache::checkpoint`]); `None` when
/// there is none or it is unreadable. It stays on disk: it is a hint, replaced by the next one.
fn read_checkpoint(root: &Path) -> Option<SavedIndex> {
    read_index_file(&root.join(CHECKPOINT), "the cache checkpoint").flatten()
}

/// Reads an index file (`what` names it in warnings): `None` when there is no file,
/// `Some(None)` when there is one that cannot be read or parsed (a listing follows).
fn read_index_file(path: &Path, what: &str) -> Option<Option<SavedIndex>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read {what}; listing the cache");
            return Some(None);
        }
    };
    let saved = parse_saved_index(&bytes);
    if saved.is_none() {
        tracing::warn!(path = %path.display(), "{what} is damaged; listing the cache");
    }
    Some(saved)
}

/// Parses [`SAVED_INDEX`]'s bytes (see [`BlobCache::save_index`]); `None` unless whole.
fn parse_saved_index(bytes: &[u8]) -> Option<SavedIndex> {
    let (body, sum) = bytes.split_at_checked(bytes.len().checked_sub(32)?)?;
    if blake3::hash(body).as_bytes() != sum {
        return None;
    }
    let (with_packs, rest) = match body.strip_prefix(SAVED_MAGIC.as_slice()) {
        Some(rest) => (true, rest),
        None => (false, body.strip_prefix(SAVED_MAGIC_1.as_slice())?),
    };
    let (n, rest) = rest.split_at_checked(4)?;
    let boot_len = u32::from_le_bytes(n.try_into().ok()?) as usize;
    let (boot, rest) = rest.split_at_checked(boot_len)?;
    let (n, rest) = rest.split_at_checked(8)?;
    let count = usize::try_from(u64::from_le_bytes(n.try_into().ok()?)).ok()?;
    let (table, mut rest) = rest.split_at_checked(count.checked_mul(SAVED_ENTRY)?)?;
    let mut entries = Vec::with_capacity(count);
    for e in table.chunks_exact(SAVED_ENTRY) {
        let (mut h, mut len) = ([0u8; 32], [0u8; 8]);
        h.copy_from_slice(&e[..32]);
        len.copy_from_slice(&e[32..]);
        let (hash, len) = (Hash(h), u64::from_le_bytes(len));
        let members = if with_packs && len & SAVED_PACK != 0 {
            let (n, more) = rest.split_at_checked(4)?;
            let n = u32::from_le_bytes(n.try_into().ok()?) as usize;
            let (lines, more) = more.split_at_checked(n.checked_mul(pack::LINE)?)?;
            rest = more;
            // As a pack's own header is checked: its files fill it exactly.
            Some(pack::members_of(lines, len & !(SAVED_UNVERIFIED | SAVED_PACK))?)
        } else {
            None
        };
        entries.push(Found {
            hash,
            len: len & !(SAVED_UNVERIFIED | SAVED_PACK),
            unverified: len & SAVED_UNVERIFIED != 0,
            members,
        });
    }
    if !rest.is_empty() {
        return None;
    }
    Some(SavedIndex {
        boot: String::from_utf8(boot.to_vec()).ok()?,
        entries,
    })
}

/// Keeps a blob from being evicted.
pub struct Pin<'a> {
    cache: &'a BlobCache,
    hash: Hash,
}

impl Drop for Pin<'_> {
    fn drop(&mut self) {
        self.cache.unhold(&self.hash);
    }
}

/// Whether the file at `path` holds the content `h` names (a blob's blake3, or a chunked
/// file's manifest hash, computed again from its bytes).
fn content_matches(path: &Path, h: &Hash, len: u64) -> std::io::Result<bool> {
    let f = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(path)?);
    Ok(content_id(f, len)?.0 == *h)
}

/// An in-progress fetch into the cache.
pub struct CacheWriter<'a> {
    cache: &'a BlobCache,
    hash: Hash,
    size: u64,
    tmp: PathBuf,
    file: Option<std::io::BufWriter<std::fs::File>>,
    /// The whole-content hash of a single-blob file; `None` for a chunked one, which is
    /// verified chunk by chunk (see [`CacheWriter::chunks_verified`]) or re-chunked at the end.
    hasher: Option<blake3::Hasher>,
    /// The fetcher verified every chunk of a chunked file before writing it here, in order.
    chunks_verified: bool,
    received: u64,
    /// Writing the temp file failed (a full disk): the fetch is of no use to the cache.
    local_error: Option<std::io::Error>,
}

impl ChunkSink for CacheWriter<'_> {
    fn received(&self) -> u64 {
        self.received
    }

    fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        if self.received + data.len() as u64 > self.size {
            return Err(std::io::Error::other(format!(
                "blob {} is longer than its {} bytes",
                self.hash, self.size
            )));
        }
        if let Some(h) = self.hasher.as_mut() {
            h.update(data);
        }
        if let Some(f) = self.file.as_mut() {
            if let Err(e) = f.write_all(data) {
                let kind = e.kind();
                let msg = e.to_string();
                self.local_error = Some(e);
                return Err(std::io::Error::new(kind, msg));
            }
        }
        self.received += data.len() as u64;
        Ok(())
    }

    fn reset(&mut self) -> std::io::Result<()> {
        use std::io::Seek;
        if let Some(f) = self.file.as_mut() {
            f.flush()?;
            f.get_mut().set_len(0)?;
            f.get_mut().seek(std::io::SeekFrom::Start(0))?;
        }
        if self.hasher.is_some() {
            self.hasher = Some(blake3::Hasher::new());
        }
        self.chunks_verified = false;
        self.received = 0;
        Ok(())
    }

    fn verified(&self) -> bool {
        self.received == self.size
            && match &self.hasher {
                Some(h) => Hash::from(h.finalize()) == self.hash,
                None => self.chunks_verified,
            }
    }
}

impl CacheWriter<'_> {
    /// The local write error that ended this fetch, if one did (the cache disk is full, say).
    pub fn failed_locally(&self) -> Option<&std::io::Error> {
        self.local_error.as_ref()
    }

    /// Records that every byte written was a chunk of this file's manifest, verified against
    /// its hash and written in order, so [`CacheWriter::finish`] need not read it all again.
    pub fn chunks_verified(&mut self) {
        self.chunks_verified = true;
    }

    /// Verifies the whole content and makes it a cache entry.
    pub fn finish(mut self) -> Result<PathBuf, CacheError> {
        let Some(mut f) = self.file.take() else {
            return Err(CacheError::Mismatch(self.hash));
        };
        if let Err(e) = f.flush() {
            let _ = std::fs::remove_file(&self.tmp);
            return Err(e.into());
        }
        drop(f);
        let good = self.received == self.size
            && match &self.hasher {
                Some(h) => Hash::from(h.finalize()) == self.hash,
                None => self.chunks_verified || matches!(content_matches(&self.tmp, &self.hash, self.size), Ok(true)),
            };
        if !good {
            let _ = std::fs::remove_file(&self.tmp);
            return Err(CacheError::Mismatch(self.hash));
        }
        let dest = self.cache.path(&self.hash);
        if let Err(e) = std::fs::rename(&self.tmp, &dest) {
            let _ = std::fs::remove_file(&self.tmp);
            return Err(e.into());
        }
        self.cache.admit(self.hash, self.size, false);
        Ok(dest)
    }
}

impl Drop for CacheWriter<'_> {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
        // `finish` has renamed or removed it by now.
        self.cache.tmp_done();
    }
}

#[cfg(test)]
#[path = "packed_tests.rs"]
mod packed_tests;

#[cfg(test)]
mod tests {
    use super::*;

    fn put(c: &BlobCache, data: &[u8]) -> Hash {
        let h = Hash::of(data);
        let mut w = c.writer(h, data.len() as u64).unwrap();
        w.write(data).unwrap();
        w.finish().unwrap();
        h
    }

    #[test]
    fn evicts_lru_but_never_pinned() {
        let dir = tempfile::tempdir().unwrap();
        let c = BlobCache::open(dir.path(), 25).unwrap();
        let a = put(&c, &[1; 10]);
        let _pin = c.pin(a);
        let b = put(&c, &[2; 10]);
        let d = put(&c, &[3; 10]);
        // Over budget: b (least recent, unpinned) goes; a is pinned and stays.
        assert!(c.lookup(&a), "pinned entry kept");
        assert!(!c.lookup(&b), "LRU entry evicted");
        assert!(c.lookup(&d));
        assert_eq!(c.usage(), (2, 20));
    }

    #[test]
    fn a_blob_larger_than_the_whole_cache_stays_until_the_next_admission() {
        let dir = tempfile::tempdir().unwrap();
        let c = BlobCache::open(dir.path(), 25).unwrap();
        let small = put(&c, &[1; 10]);
        let big = put(&c, &[7; 100]);
        assert!(c.lookup(&big), "just admitted: readable although over budget");
        assert!(!c.lookup(&small), "older entries made room");
        // Pinned (a read in progress), it survives the next admission too.
        let pin = c.pin(big);
        let other = put(&c, &[2; 10]);
        assert!(c.lookup(&big) && c.lookup(&other));
        drop(pin);
        put(&c, &[3; 10]);
        assert!(!c.lookup(&big), "unpinned and no longer the newest: evicted");
    }

    #[test]
    fn bad_content_never_becomes_an_entry_and_torn_files_are_caught() {
        let dir = tempfile::tempdir().unwrap();
        let c = BlobCache::open(dir.path(), 1 << 20).unwrap();
        let h = Hash::of(b"good");
        let mut w = c.writer(h, 4).unwrap();
        w.write(b"evil").unwrap();
        assert!(matches!(w.finish(), Err(CacheError::Mismatch(_))));
        assert!(!c.lookup(&h));
        let h = put(&c, b"good data");
        drop(c);
        // A crash left a torn entry: reopen after the reboot finds it unverified and refuses to
        // serve it.
        std::fs::write(
            dir.path().join("blobs").join(&h.to_hex()[..2]).join(h.to_hex()),
            b"good d",
        )
        .unwrap();
        let c = BlobCache::open_in_boot(dir.path(), 1 << 20, "another boot").unwrap();
        assert!(!c.lookup(&h));
        assert_eq!(c.stats.corrupt_dropped.load(Ordering::Relaxed), 1);
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn a_write_cut_short_leaves_nothing_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let c = BlobCache::open(dir.path(), 1 << 20).unwrap();
        let h = Hash::of(b"never finished");
        let mut w = c.writer(h, 14).unwrap();
        w.write(b"never").unwrap();
        // The daemon dies here: the writer's temp file stays beside where the entry would be.
        std::mem::forget(w);
        let small = Hash::of(b"small");
        c.put_verified(small, b"small").unwrap();
        drop(c);
        let sub = dir.path().join("blobs").join(&h.to_hex()[..2]);
        let leftovers = |d: &Path| {
            std::fs::read_dir(d)
                .unwrap()
                .filter(|e| {
                    e.as_ref()
                        .unwrap()
                        .file_name()
                        .to_string_lossy()
                        .starts_with(TMP_PREFIX)
                })
                .count()
        };
        assert_eq!(leftovers(&sub), 1);
        let c = BlobCache::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(leftovers(&sub), 0, "removed at start");
        assert!(!c.lookup(&h));
        assert!(c.lookup(&small));
        assert_eq!(c.usage(), (1, 5));
    }

    #[test]
    fn entries_are_rehashed_after_a_reboot_and_trusted_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join(BOOT_MARKER);
        let c = BlobCache::open_in_boot(dir.path(), 1 << 20, "boot-a").unwrap();
        let hashes: Vec<Hash> = (0u8..3).map(|i| put(&c, &[i; 100])).collect();
        assert_eq!(std::fs::read_to_string(&marker).unwrap(), "boot-a");
        drop(c);

        // A restart in the same boot (a killed or upgraded daemon): nothing to re-hash.
        let c = BlobCache::open_in_boot(dir.path(), 1 << 20, "boot-a").unwrap();
        assert_eq!(c.unverified(), 0);
        assert!(hashes.iter().all(|h| c.lookup(h)));
        drop(c);

        // After a reboot every entry is re-hashed once, and the marker stays away until the
        // last one is: a restart before then must not trust the rest.
        let c = BlobCache::open_in_boot(dir.path(), 1 << 20, "boot-b").unwrap();
        assert_eq!(c.unverified(), 3);
        assert!(!marker.exists());
        assert!(c.lookup(&hashes[0]));
        drop(c);
        let c = BlobCache::open_in_boot(dir.path(), 1 << 20, "boot-b").unwrap();
        assert_eq!(
            c.unverified(),
            3,
            "a restart before every entry was checked checks them all"
        );
        assert!(hashes.iter().all(|h| c.lookup(h)));
        assert_eq!(c.unverified(), 0);
        assert_eq!(std::fs::read_to_string(&marker).unwrap(), "boot-b");
        // A log file adopted unchecked makes the marker go until it is checked.
        let h = Hash::of(b"from the log");
        let from = dir.path().join("from-log");
        std::fs::write(&from, b"from the log").unwrap();
        c.adopt(h, &from, 12, false).unwrap();
        assert!(!marker.exists());
        assert!(c.lookup(&h));
        assert!(marker.exists());
    }
    #[test]
    fn a_clean_stop_saves_the_index_and_the_next_start_reads_it_in_order_of_use() {
        let dir = tempfile::tempdir().unwrap();
        let saved = dir.path().join(SAVED_INDEX);
        let c = BlobCache::open_in_boot(dir.path(), 1 << 20, "boot-a").unwrap();
        let hashes: Vec<Hash> = (0u8..3).map(|i| put(&c, &[i; 100])).collect();
        assert!(c.lookup(&hashes[0]), "used last: order 1, 2, 0");
        assert!(c.save_index().unwrap());
        drop(c);
        assert!(saved.exists());
        // Listing the files would put entry 0 first to go (oldest modification time).
        let old = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        std::fs::File::options()
            .write(true)
            .open(
                dir.path()
                    .join("blobs")
                    .join(&hashes[0].to_hex()[..2])
                    .join(hashes[0].to_hex()),
            )
            .unwrap()
            .set_modified(old)
            .unwrap();

        let c = BlobCache::open_in_boot(dir.path(), 250, "boot-a").unwrap();
        assert!(!saved.exists(), "a saved index is used once");
        assert_eq!(c.unverified(), 0, "saved in this boot: still verified");
        assert_eq!(c.usage(), (2, 200), "one entry evicted to fit 250 bytes");
        assert!(!c.holds(&hashes[1]), "the least recently used went, as saved");
        assert!(c.holds(&hashes[0]) && c.holds(&hashes[2]));
        assert!(c.save_index().unwrap());
        drop(c);

        // After a reboot the saved flags do not hold: every entry is checked again.
        let c = BlobCache::open_in_boot(dir.path(), 1 << 20, "boot-b").unwrap();
        assert_eq!((c.unverified(), c.usage()), (2, (2, 200)));
        assert!(c.lookup(&hashes[0]) && c.lookup(&hashes[2]));
        assert_eq!(c.unverified(), 0);
    }

    #[test]
    fn a_start_after_a_crash_uses_the_checkpoint_and_the_sweep_adopts_what_it_missed() {
        let dir = tempfile::tempdir().unwrap();
        let c = BlobCache::open_in_boot(dir.path(), 1 << 20, "boot-a").unwrap();
        let before: Vec<Hash> = (0u8..3).map(|i| put(&c, &[i; 100])).collect();
        assert!(c.checkpoint().unwrap());
        assert!(!c.checkpoint().unwrap(), "nothing changed: not written again");
        // After the checkpoint: one new entry (the checkpoint misses it), one evicted (the
        // checkpoint still names it), and a fetch still writing when the daemon dies.
        let after = put(&c, &[9; 50]);
        c.remove(&before[1]);
        let mut w = c.writer(Hash::of(b"half"), 4).unwrap();
        w.write(b"ha").unwrap();
        std::mem::forget(w); // killed: nothing removes its temp file
        drop(c);

        let c = BlobCache::open_in_boot(dir.path(), 1 << 20, "boot-a").unwrap();
        assert!(dir.path().join(CHECKPOINT).exists(), "a checkpoint stays: it is a hint");
        assert!(c.holds(&before[0]) && c.holds(&before[2]));
        assert!(!c.holds(&after), "not adopted before the sweep");
        assert!(!c.save_index().unwrap(), "no exact index while the sweep is pending");
        let report = c.sweep();
        assert_eq!(
            report,
            SweepReport {
                adopted: 1,
                stale_tmp: 1,
                interrupted: false
            }
        );
        assert!(c.holds(&after));
        assert_eq!(c.unverified(), 0, "the same boot: adopted files are trusted");
        assert_eq!(c.sweep(), SweepReport::default(), "once only");
        // The evicted entry the checkpoint named is counted until a read finds its file
        // missing (the core's read then forgets it and fetches again).
        assert!(c.holds(&before[1]) && c.lookup(&before[1]));
        c.forget_missing(&before[1]);
        assert!(!c.holds(&before[1]));
        assert_eq!(c.stats.corrupt_dropped.load(Ordering::Relaxed), 0);
        assert_eq!(c.usage(), (3, 250));
        assert!(c.save_index().unwrap(), "swept: a clean stop saves an exact index");
        drop(c);

        // After a reboot, a checkpoint's entries and the adopted files are all checked first.
        std::fs::remove_file(dir.path().join(SAVED_INDEX)).unwrap();
        let c = BlobCache::open_in_boot(dir.path(), 1 << 20, "boot-b").unwrap();
        assert_eq!(c.usage(), (3, 300), "the checkpoint's three, one of them missing");
        assert_eq!(c.sweep().adopted, 1);
        assert_eq!(c.unverified(), 4);
        // An unverified one is checked before use: missing is not corruption either.
        assert!(!c.lookup(&before[1]));
        assert_eq!(c.stats.corrupt_dropped.load(Ordering::Relaxed), 0);
        assert!(c.lookup(&before[0]) && c.lookup(&before[2]) && c.lookup(&after));
        assert_eq!(c.unverified(), 0);

        // A sweep stops when a clean stop begins; the next start sweeps again.
        drop(c);
        let c = BlobCache::open_in_boot(dir.path(), 1 << 20, "boot-b").unwrap();
        c.stop_sweep();
        assert!(!c.save_index().unwrap());
        assert!(c.sweep().interrupted);

        // A damaged checkpoint is ignored: the cache is listed.
        drop(c);
        let cp = dir.path().join(CHECKPOINT);
        let mut bytes = std::fs::read(&cp).unwrap();
        bytes[20] ^= 1;
        std::fs::write(&cp, &bytes).unwrap();
        let c = BlobCache::open_in_boot(dir.path(), 1 << 20, "boot-b").unwrap();
        assert_eq!(c.usage(), (3, 250), "listed: the files that exist");
        assert_eq!(
            c.sweep(),
            SweepReport::default(),
            "nothing to reconcile after a listing"
        );
    }

    #[test]
    fn a_saved_index_goes_with_the_first_change_or_damage_and_the_cache_is_listed() {
        let dir = tempfile::tempdir().unwrap();
        let saved = dir.path().join(SAVED_INDEX);
        let c = BlobCache::open(dir.path(), 1 << 20).unwrap();
        let a = put(&c, b"a");
        assert!(c.save_index().unwrap());
        let b = put(&c, b"bb");
        assert!(!saved.exists(), "a change after the save removes it");
        drop(c);
        let c = BlobCache::open(dir.path(), 1 << 20).unwrap();
        assert!(c.holds(&a) && c.holds(&b), "listed: both found");

        // A save is refused while a fetch is writing a temp file the next start would not see.
        let w = c.writer(Hash::of(b"ccc"), 3).unwrap();
        assert!(!c.save_index().unwrap());
        drop(w);
        assert!(c.save_index().unwrap());
        drop(c);

        // A damaged saved index is ignored (and removed); the cache is listed instead.
        let mut bytes = std::fs::read(&saved).unwrap();
        bytes[20] ^= 1;
        std::fs::write(&saved, &bytes).unwrap();
        let c = BlobCache::open(dir.path(), 1 << 20).unwrap();
        assert!(!saved.exists());
        assert_eq!(c.usage(), (2, 3));
        assert!(parse_saved_index(&bytes[..10]).is_none() && parse_saved_index(&[]).is_none());

        // An entry whose file was deleted behind the cache's back is forgotten by the read
        // that finds it missing, so the next one fetches it.
        std::fs::remove_file(c.path(&a)).unwrap();
        c.forget_missing(&b);
        assert!(c.holds(&b), "its file is there: kept");
        c.forget_missing(&a);
        assert!(!c.lookup(&a));
        assert_eq!(c.usage(), (1, 2));
    }
    #[test]
    fn a_removed_entry_directory_is_made_again_by_the_next_write() {
        let dir = tempfile::tempdir().unwrap();
        let c = BlobCache::open(dir.path(), 1 << 20).unwrap();
        let (a, b) = (Hash::of(b"by put"), Hash::of(b"by writer"));
        for h in [a, b] {
            let _ = std::fs::remove_dir_all(dir.path().join("blobs").join(&h.to_hex()[..2]));
        }
        c.put_verified(a, b"by put").unwrap();
        let mut w = c.writer(b, 9).unwrap();
        w.write(b"by writer").unwrap();
        w.finish().unwrap();
        assert!(c.lookup(&a) && c.lookup(&b));
        assert_eq!(std::fs::read(c.path(&b)).unwrap(), b"by writer");
    }
}
