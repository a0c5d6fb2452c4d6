//! Local blob storage. Blobs of at most [`PACK_MAX_BYTES`] are packed in RocksDB, in
//! `packed/` (see `pack`): a file each would cost a 4 KiB block and an inode. Larger blobs are
//! one file each at `data/<2 hex>/<2 hex>/<64 hex>`, as every blob was before packing: files a
//! server stored then stay where they are and are read, listed, verified and collected like any
//! other blob.
//!
//! A packed blob is durable (a synced RocksDB write, one for a whole batch) before it is
//! visible. A file blob is written to `tmp/`, hashed while written, checked against the expected
//! hash and size, fsynced, renamed into place and its directory fsynced: a crash leaves either
//! no blob or a complete one (stray temp files are removed at start). Reads re-verify the hash,
//! and a copy that fails is moved to `quarantine/` (a packed one is written there as a file and
//! deleted from the pack) so it is never served again and repair refetches it.
use std::collections::HashSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use codafs_common::Hash;

pub use super::pack::PACK_MAX_BYTES;
use super::pack::{self, Pack};

/// Blob storage failures.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("blob {0} not stored here")]
    NotFound(Hash),
    #[error("content does not match hash {expected}: got {actual} ({size} bytes)")]
    HashMismatch { expected: Hash, actual: Hash, size: u64 },
    #[error("blob is {actual} bytes, header said {expected}")]
    SizeMismatch { expected: u64, actual: u64 },
    #[error("blob of {0} bytes exceeds the limit of {1} bytes")]
    TooLarge(u64, u64),
    #[error("stored copy of {0} is corrupt")]
    Corrupt(Hash),
    #[error("blob storage I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The packed store (RocksDB) failed; `disk_full` when it ran out of space.
    #[error("packed blob store: {message}")]
    Pack { message: String, disk_full: bool },
}

/// A stored blob opened for reading: a file, or a packed blob's content read into memory.
pub enum BlobReader {
    File(std::fs::File),
    Packed(std::io::Cursor<Vec<u8>>),
}

impl Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            BlobReader::File(f) => f.read(buf),
            BlobReader::Packed(c) => c.read(buf),
        }
    }
}

impl std::io::Seek for BlobReader {
    fn seek(&mut self, pos: std::io::SeekFrom) -> std::io::Result<u64> {
        match self {
            BlobReader::File(f) => f.seek(pos),
            BlobReader::Packed(c) => c.seek(pos),
        }
    }
}

impl BlobReader {
    /// The same reader for async code.
    pub fn into_async(self) -> AsyncBlobReader {
        match self {
            BlobReader::File(f) => AsyncBlobReader::File(tokio::fs::File::from_std(f)),
            BlobReader::Packed(c) => AsyncBlobReader::Packed(c),
        }
    }
}

/// A [`BlobReader`] for async code.
pub enum AsyncBlobReader {
    File(tokio::fs::File),
    Packed(std::io::Cursor<Vec<u8>>),
}

impl tokio::io::AsyncRead for AsyncBlobReader {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            AsyncBlobReader::File(f) => std::pin::Pin::new(f).poll_read(cx, buf),
            AsyncBlobReader::Packed(c) => std::pin::Pin::new(c).poll_read(cx, buf),
        }
    }
}

/// The blob directory of one server.
pub struct BlobStore {
    root: PathBuf,
    pack: Pack,
    count: AtomicU64,
    bytes: AtomicU64,
    corrupt_found: AtomicU64,
    tmp_seq: AtomicU64,
}

impl BlobStore {
    /// Opens `root`, removes temp files of interrupted writes and counts what is stored.
    pub fn open(root: &Path) -> Result<Self, BlobError> {
        for sub in ["tmp", "quarantine", "data", pack::PACK_DIR] {
            std::fs::create_dir_all(root.join(sub))?;
        }
        for e in std::fs::read_dir(root.join("tmp"))? {
            let _ = std::fs::remove_file(e?.path());
        }
        let store = BlobStore {
            root: root.to_path_buf(),
            pack: Pack::open(&root.join(pack::PACK_DIR))?,
            count: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            corrupt_found: AtomicU64::new(0),
            tmp_seq: AtomicU64::new(0),
        };
        let (mut n, mut b) = (0, 0);
        for (_, size) in store.list()? {
            n += 1;
            b += size;
        }
        store.count.store(n, Ordering::Relaxed);
        store.bytes.store(b, Ordering::Relaxed);
        Ok(store)
    }

    /// Where a blob stored as a file lives.
    fn file_path(&self, h: &Hash) -> PathBuf {
        let hex = h.to_hex();
        self.root.join("data").join(&hex[..2]).join(&hex[2..4]).join(hex)
    }

    /// Whether a blob of `size` bytes is packed rather than a file.
    pub fn packs(size: u64) -> bool {
        size <= PACK_MAX_BYTES
    }

    /// Whether the pack holds `h` (a pack that cannot be read says no, and logs why).
    fn packed(&self, h: &Hash) -> Option<pack::Meta> {
        match self.pack.meta(h) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(hash = %h, error = %e, "reading the packed blob store failed");
                None
            }
        }
    }

    pub fn has(&self, h: &Hash) -> bool {
        self.packed(h).is_some() || self.file_path(h).is_file()
    }

    /// The size of a stored blob (`None` if it is not stored here or cannot be looked at).
    pub fn size(&self, h: &Hash) -> Option<u64> {
        match self.packed(h) {
            Some(m) => Some(m.size),
            None => std::fs::metadata(self.file_path(h)).ok().map(|m| m.len()),
        }
    }

    /// (blobs, bytes) stored.
    pub fn stats(&self) -> (u64, u64) {
        (self.count.load(Ordering::Relaxed), self.bytes.load(Ordering::Relaxed))
    }

    /// Corrupt copies found so far (by reads or scrub).
    pub fn corrupt_found(&self) -> u64 {
        self.corrupt_found.load(Ordering::Relaxed)
    }

    /// A new temp file's path for a write of `h`.
    fn tmp_path(&self, h: &Hash) -> PathBuf {
        let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        self.root
            .join("tmp")
            .join(format!("{}-{}-{seq}", h.to_hex(), std::process::id()))
    }

    /// Starts writing a blob expected to hash to `expected` and be `size` bytes. A blob the pack
    /// takes is gathered in memory (it is at most [`PACK_MAX_BYTES`]).
    pub fn writer(&self, expected: Hash, size: u64) -> Result<BlobWriter<'_>, BlobError> {
        let sink = if Self::packs(size) {
            Sink::Memory(Vec::with_capacity(size as usize))
        } else {
            let tmp = self.tmp_path(&expected);
            let file = std::fs::File::create(&tmp)?;
            Sink::File {
                tmp,
                file: std::io::BufWriter::with_capacity(1 << 20, file),
            }
        };
        Ok(BlobWriter {
            store: self,
            sink,
            hasher: blake3::Hasher::new(),
            written: 0,
            expected,
            size,
            done: false,
        })
    }

    /// Stores a whole in-memory blob (repair and tests).
    pub fn put_bytes(&self, data: &[u8]) -> Result<Hash, BlobError> {
        let h = Hash::of(data);
        if self.has(&h) {
            return Ok(h);
        }
        let mut w = self.writer(h, data.len() as u64)?;
        w.write(data)?;
        w.finish()?;
        Ok(h)
    }

    /// Packs verified blobs that are not stored as files, in one synced write; counts the new
    /// ones. Returns how many were new and their bytes.
    fn pack_put(&self, blobs: &[(Hash, &[u8])]) -> Result<(usize, u64), BlobError> {
        if blobs.is_empty() {
            return Ok((0, 0));
        }
        let w = self.pack.begin();
        let new = w.put(blobs)?;
        let bytes: u64 = new.iter().sum();
        self.count.fetch_add(new.len() as u64, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        Ok((new.len(), bytes))
    }

    /// Stores many verified blobs durably, sharing the syncs: the small ones in one synced write
    /// to the pack, the others as files with two `syncfs` calls for the whole batch instead of
    /// two fsyncs per blob (temp files are written, synced, renamed into place, and the renames
    /// synced). A blob is never visible under its name before its bytes are durable. One blob
    /// that does not match its hash refuses the whole batch before anything is written. Blobs
    /// already stored are touched. Returns how many were new and their bytes.
    pub fn put_many(&self, blobs: &[(Hash, &[u8])]) -> Result<(usize, u64), BlobError> {
        for (h, data) in blobs {
            let actual = Hash::of(data);
            if actual != *h {
                return Err(BlobError::HashMismatch {
                    expected: *h,
                    actual,
                    size: data.len() as u64,
                });
            }
        }
        let mut seen = HashSet::new();
        let mut small = Vec::new();
        let mut staged = Staged(Vec::new());
        for &(h, data) in blobs {
            if !seen.insert(h) {
                continue;
            }
            let len = data.len() as u64;
            if self.file_path(&h).is_file() {
                self.touch(&h);
            } else if Self::packs(len) {
                small.push((h, data));
            } else if self.has(&h) {
                self.touch(&h);
            } else {
                let tmp = self.tmp_path(&h);
                staged.0.push((h, tmp.clone(), len));
                std::fs::write(&tmp, data)?;
            }
        }
        let (mut new, mut bytes) = self.pack_put(&small)?;
        if staged.0.is_empty() {
            return Ok((new, bytes));
        }
        self.syncfs()?;
        while let Some((h, tmp, len)) = staged.0.pop() {
            let dest = self.file_path(&h);
            if let Some(dir) = dest.parent() {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::rename(&tmp, &dest)?;
            self.count.fetch_add(1, Ordering::Relaxed);
            self.bytes.fetch_add(len, Ordering::Relaxed);
            new += 1;
            bytes += len;
        }
        self.syncfs()?;
        Ok((new, bytes))
    }

    /// Flushes the filesystem holding the store.
    fn syncfs(&self) -> Result<(), BlobError> {
        use std::os::fd::AsRawFd;
        let root = std::fs::File::open(&self.root)?;
        // SAFETY: a plain syscall on a descriptor we own for the duration of the call.
        if unsafe { libc::syncfs(root.as_raw_fd()) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(())
    }

    /// Refreshes when a stored blob was last stored or confirmed (a file's mtime, a packed
    /// blob's time): garbage collection measures its grace period from it, so content uploaded
    /// or confirmed again is not collected just before a commit references it.
    pub fn touch(&self, h: &Hash) {
        match self.pack.begin().touch(h) {
            Ok(true) => return,
            Ok(false) => {}
            Err(e) => tracing::warn!(hash = %h, error = %e, "touching a packed blob failed"),
        }
        if let Ok(f) = std::fs::File::options().write(true).open(self.file_path(h)) {
            let _ = f.set_modified(std::time::SystemTime::now());
        }
    }

    /// Opens a stored blob for reading. The caller verifies while streaming (see `verify`). A
    /// packed blob whose content is gone or unreadable (RocksDB's checksums failed) is
    /// quarantined and `Corrupt`.
    pub fn open_read(&self, h: &Hash) -> Result<(BlobReader, u64), BlobError> {
        if self.pack.meta(h)?.is_some() {
            return match self.pack.data(h) {
                Ok(Some(data)) => {
                    let len = data.len() as u64;
                    Ok((BlobReader::Packed(std::io::Cursor::new(data)), len))
                }
                Ok(None) | Err(BlobError::Corrupt(_)) => {
                    self.quarantine(h);
                    Err(BlobError::Corrupt(*h))
                }
                Err(e) => Err(e),
            };
        }
        match std::fs::File::open(self.file_path(h)) {
            Ok(f) => {
                let len = f.metadata()?.len();
                Ok((BlobReader::File(f), len))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(BlobError::NotFound(*h)),
            Err(e) => Err(e.into()),
        }
    }

    /// Reads and verifies a whole blob.
    pub fn read_verified(&self, h: &Hash) -> Result<Vec<u8>, BlobError> {
        let (r, len) = self.open_read(h)?;
        let mut data = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
        // No more than its size says (and one byte to tell it grew): callers bound memory by it.
        r.take(len.saturating_add(1)).read_to_end(&mut data)?;
        if data.len() as u64 != len || Hash::of(&data) != *h {
            self.quarantine(h);
            return Err(BlobError::Corrupt(*h));
        }
        Ok(data)
    }

    /// Re-hashes a stored blob; a corrupt copy is quarantined. Returns bytes read.
    pub fn verify(&self, h: &Hash) -> Result<u64, BlobError> {
        let (mut r, len) = self.open_read(h)?;
        let mut hasher = blake3::Hasher::new();
        std::io::copy(&mut r, &mut hasher)?;
        if Hash::from(hasher.finalize()) != *h {
            self.quarantine(h);
            return Err(BlobError::Corrupt(*h));
        }
        Ok(len)
    }

    /// Where a quarantined copy of `h` goes.
    fn quarantine_path(&self, h: &Hash) -> PathBuf {
        self.root
            .join("quarantine")
            .join(format!("{}-{}", h.to_hex(), codafs_common::now_ns()))
    }

    /// Moves a corrupt copy aside so it is never served; repair will fetch a good one. A packed
    /// copy is written to `quarantine/` as it was (if it can still be read) and deleted from the
    /// pack.
    pub fn quarantine(&self, h: &Hash) {
        let w = self.pack.begin();
        if self.pack.meta(h).is_ok_and(|m| m.is_some()) {
            if let Ok(Some(bad)) = self.pack.data(h) {
                if let Err(e) = std::fs::write(self.quarantine_path(h), bad) {
                    tracing::warn!(hash = %h, error = %e, "could not keep a corrupt packed blob in quarantine/");
                }
            }
            match w.remove(h) {
                Ok(Some(len)) => self.forget_corrupt(h, len),
                Ok(None) => {}
                Err(e) => tracing::warn!(hash = %h, error = %e, "could not delete a corrupt packed blob"),
            }
            return;
        }
        drop(w);
        let from = self.file_path(h);
        let len = std::fs::metadata(&from).map(|m| m.len()).unwrap_or(0);
        if std::fs::rename(&from, self.quarantine_path(h)).is_ok() {
            self.forget_corrupt(h, len);
        }
    }

    /// Counts a quarantined copy out of the store.
    fn forget_corrupt(&self, h: &Hash, len: u64) {
        self.count.fetch_sub(1, Ordering::Relaxed);
        self.bytes.fetch_sub(len, Ordering::Relaxed);
        self.corrupt_found.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(hash = %h, "corrupt blob copy quarantined");
    }

    /// Deletes a blob (garbage collection, handoff).
    pub fn remove(&self, h: &Hash) -> Result<(), BlobError> {
        {
            let w = self.pack.begin();
            if let Some(len) = w.remove(h)? {
                self.count.fetch_sub(1, Ordering::Relaxed);
                self.bytes.fetch_sub(len, Ordering::Relaxed);
                return Ok(());
            }
        }
        let p = self.file_path(h);
        let len = match std::fs::metadata(&p) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(BlobError::NotFound(*h)),
            Err(e) => return Err(e.into()),
        };
        std::fs::remove_file(&p)?;
        self.count.fetch_sub(1, Ordering::Relaxed);
        self.bytes.fetch_sub(len, Ordering::Relaxed);
        Ok(())
    }

    /// Every stored blob with its size: the packed ones, then the files.
    pub fn list(&self) -> Result<Vec<(Hash, u64)>, BlobError> {
        let mut out = self.pack.list()?;
        let data = self.root.join("data");
        for a in std::fs::read_dir(&data)? {
            let a = a?.path();
            if !a.is_dir() {
                continue;
            }
            for b in std::fs::read_dir(&a)? {
                let b = b?.path();
                if !b.is_dir() {
                    continue;
                }
                for f in std::fs::read_dir(&b)? {
                    let f = f?;
                    if let Some(h) = f.file_name().to_str().and_then(|n| Hash::from_hex(n).ok()) {
                        out.push((h, f.metadata()?.len()));
                    }
                }
            }
        }
        Ok(out)
    }

    /// How long ago a stored blob was stored or last touched (for the GC grace period).
    pub fn age(&self, h: &Hash) -> Option<Duration> {
        if let Some(m) = self.packed(h) {
            return Some(Duration::from_nanos(pack::now_ns().saturating_sub(m.touched_ns)));
        }
        let m = std::fs::metadata(self.file_path(h)).ok()?;
        m.modified().ok()?.elapsed().ok()
    }

    /// Replaces the stored copy of `h` with `bytes`, unverified: how tests simulate a damaged
    /// disk. Not for anything else.
    #[doc(hidden)]
    pub fn damage_for_tests(&self, h: &Hash, bytes: &[u8]) -> Result<(), BlobError> {
        if self.pack.begin().overwrite(h, bytes)? {
            return Ok(());
        }
        let p = self.file_path(h);
        if !p.is_file() {
            return Err(BlobError::NotFound(*h));
        }
        std::fs::write(p, bytes)?;
        Ok(())
    }
}

/// Temp files of a batch not yet renamed into place; removed if the batch fails.
struct Staged(Vec<(Hash, PathBuf, u64)>);

impl Drop for Staged {
    fn drop(&mut self) {
        for (_, tmp, _) in &self.0 {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// Where a blob being written goes until it is finished.
enum Sink {
    /// A blob for the pack.
    Memory(Vec<u8>),
    File {
        tmp: PathBuf,
        file: std::io::BufWriter<std::fs::File>,
    },
}

/// An in-progress blob write.
pub struct BlobWriter<'a> {
    store: &'a BlobStore,
    sink: Sink,
    hasher: blake3::Hasher,
    written: u64,
    expected: Hash,
    size: u64,
    done: bool,
}

impl BlobWriter<'_> {
    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Appends data; refuses to grow past the announced size.
    pub fn write(&mut self, data: &[u8]) -> Result<(), BlobError> {
        let new_len = self.written + data.len() as u64;
        if new_len > self.size {
            return Err(BlobError::SizeMismatch {
                expected: self.size,
                actual: new_len,
            });
        }
        self.hasher.update(data);
        match &mut self.sink {
            Sink::Memory(buf) => buf.extend_from_slice(data),
            Sink::File { file, .. } => file.write_all(data)?,
        }
        self.written = new_len;
        Ok(())
    }

    /// Verifies size and hash, makes the blob durable and visible. Returns false if an identical
    /// blob was already stored (the new copy is discarded).
    pub fn finish(mut self) -> Result<bool, BlobError> {
        if self.written != self.size {
            return Err(BlobError::SizeMismatch {
                expected: self.size,
                actual: self.written,
            });
        }
        let actual = Hash::from(self.hasher.finalize());
        if actual != self.expected {
            return Err(BlobError::HashMismatch {
                expected: self.expected,
                actual,
                size: self.written,
            });
        }
        let store = self.store;
        let h = self.expected;
        let (tmp, file) = match &mut self.sink {
            Sink::Memory(buf) => {
                self.done = true;
                if store.file_path(&h).is_file() {
                    return Ok(false);
                }
                let (new, _) = store.pack_put(&[(h, buf.as_slice())])?;
                return Ok(new == 1);
            }
            Sink::File { tmp, file } => (tmp.clone(), file),
        };
        file.flush()?;
        file.get_ref().sync_data()?;
        let dest = store.file_path(&h);
        let dir = dest.parent().map(Path::to_path_buf).unwrap_or_default();
        std::fs::create_dir_all(&dir)?;
        self.done = true;
        if dest.exists() {
            let _ = std::fs::remove_file(&tmp);
            return Ok(false);
        }
        std::fs::rename(&tmp, &dest)?;
        std::fs::File::open(&dir)?.sync_all()?;
        store.count.fetch_add(1, Ordering::Relaxed);
        store.bytes.fetch_add(self.written, Ordering::Relaxed);
        Ok(true)
    }
}

impl Drop for BlobWriter<'_> {
    fn drop(&mut self) {
        if let (false, Sink::File { tmp, .. }) = (self.done, &self.sink) {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A blob too large for the pack.
    fn large(seed: u8) -> Vec<u8> {
        (0..PACK_MAX_BYTES as usize + 1000)
            .map(|i| (i as u8).wrapping_mul(seed))
            .collect()
    }

    fn tmp_files(dir: &Path) -> usize {
        std::fs::read_dir(dir.join("tmp")).unwrap().count()
    }

    #[test]
    fn small_blobs_are_packed_and_large_ones_are_files() {
        let dir = tempfile::tempdir().unwrap();
        let s = BlobStore::open(dir.path()).unwrap();
        let small = s.put_bytes(b"hello world").unwrap();
        let big = large(7);
        let big_h = s.put_bytes(&big).unwrap();
        assert!(s.has(&small) && s.has(&big_h));
        assert!(s.packed(&small).is_some() && !s.file_path(&small).exists());
        assert!(s.packed(&big_h).is_none() && s.file_path(&big_h).is_file());
        assert_eq!(s.stats(), (2, 11 + big.len() as u64));
        assert_eq!(s.read_verified(&small).unwrap(), b"hello world");
        assert_eq!(s.read_verified(&big_h).unwrap(), big);
        assert_eq!((s.size(&small), s.size(&big_h)), (Some(11), Some(big.len() as u64)));
        assert_eq!(s.verify(&small).unwrap(), 11);
        let (mut r, len) = s.open_read(&small).unwrap();
        let mut read = Vec::new();
        r.read_to_end(&mut read).unwrap();
        assert_eq!((read.as_slice(), len), (&b"hello world"[..], 11));
        // Identical content is stored once.
        s.put_bytes(b"hello world").unwrap();
        s.put_bytes(&big).unwrap();
        assert_eq!(s.stats(), (2, 11 + big.len() as u64));
        let mut w = s.writer(small, 11).unwrap();
        w.write(b"hello world").unwrap();
        assert!(!w.finish().unwrap(), "already stored");
        // The exact threshold is packed, one byte more is a file.
        let edge = vec![3u8; PACK_MAX_BYTES as usize];
        let over = vec![3u8; PACK_MAX_BYTES as usize + 1];
        let (e, o) = (s.put_bytes(&edge).unwrap(), s.put_bytes(&over).unwrap());
        assert!(s.packed(&e).is_some() && s.file_path(&o).is_file());
        let mut listed = s.list().unwrap();
        listed.sort();
        let mut want = vec![
            (small, 11),
            (big_h, big.len() as u64),
            (e, edge.len() as u64),
            (o, over.len() as u64),
        ];
        want.sort();
        assert_eq!(listed, want);
        assert!(matches!(
            s.read_verified(&Hash::of(b"absent")),
            Err(BlobError::NotFound(_))
        ));
        assert!(matches!(s.open_read(&Hash::of(b"absent")), Err(BlobError::NotFound(_))));
        assert_eq!(s.size(&Hash::of(b"absent")), None);
    }

    #[test]
    fn a_small_blob_written_through_the_writer_lands_in_the_pack() {
        let dir = tempfile::tempdir().unwrap();
        let s = BlobStore::open(dir.path()).unwrap();
        let data = vec![9u8; 5000];
        let h = Hash::of(&data);
        let mut w = s.writer(h, data.len() as u64).unwrap();
        w.write(&data[..100]).unwrap();
        w.write(&data[100..]).unwrap();
        assert_eq!(tmp_files(dir.path()), 0, "gathered in memory");
        assert!(w.finish().unwrap());
        assert!(s.packed(&h).is_some());
        assert_eq!(s.stats(), (1, 5000));
        assert_eq!(s.read_verified(&h).unwrap(), data);
    }

    #[test]
    fn a_corrupt_packed_copy_is_detected_quarantined_and_never_served() {
        let dir = tempfile::tempdir().unwrap();
        let s = BlobStore::open(dir.path()).unwrap();
        let h = s.put_bytes(b"hello world").unwrap();
        let other = s.put_bytes(b"another page").unwrap();
        s.damage_for_tests(&h, b"hello w0rld").unwrap();
        assert!(matches!(s.read_verified(&h), Err(BlobError::Corrupt(_))));
        assert!(!s.has(&h));
        assert_eq!(s.corrupt_found(), 1);
        assert_eq!(s.stats(), (1, 12));
        assert!(matches!(s.read_verified(&h), Err(BlobError::NotFound(_))));
        // The bad bytes are kept aside, as a file.
        let kept: Vec<_> = std::fs::read_dir(dir.path().join("quarantine")).unwrap().collect();
        assert_eq!(kept.len(), 1);
        assert_eq!(std::fs::read(kept[0].as_ref().unwrap().path()).unwrap(), b"hello w0rld");
        // Scrub's path finds it too.
        s.damage_for_tests(&other, b"another pag").unwrap();
        assert!(matches!(s.verify(&other), Err(BlobError::Corrupt(_))));
        assert_eq!((s.stats(), s.corrupt_found()), ((0, 0), 2));
        // Repair stores a good copy again.
        s.put_bytes(b"hello world").unwrap();
        assert_eq!(s.read_verified(&h).unwrap(), b"hello world");
        assert!(matches!(
            s.damage_for_tests(&Hash::of(b"absent"), b"x"),
            Err(BlobError::NotFound(_))
        ));
    }

    #[test]
    fn a_corrupt_file_copy_is_detected_and_quarantined() {
        let dir = tempfile::tempdir().unwrap();
        let s = BlobStore::open(dir.path()).unwrap();
        let big = large(3);
        let h = s.put_bytes(&big).unwrap();
        let mut bad = big.clone();
        bad[100] ^= 1;
        s.damage_for_tests(&h, &bad).unwrap();
        assert!(matches!(s.verify(&h), Err(BlobError::Corrupt(_))));
        assert!(!s.has(&h) && !s.file_path(&h).exists());
        assert_eq!((s.stats(), s.corrupt_found()), ((0, 0), 1));
        assert_eq!(std::fs::read_dir(dir.path().join("quarantine")).unwrap().count(), 1);
    }

    #[test]
    fn remove_deletes_packed_and_file_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let s = BlobStore::open(dir.path()).unwrap();
        let small = s.put_bytes(b"small").unwrap();
        let big = large(5);
        let big_h = s.put_bytes(&big).unwrap();
        s.remove(&small).unwrap();
        assert!(!s.has(&small));
        assert_eq!(s.stats(), (1, big.len() as u64));
        s.remove(&big_h).unwrap();
        assert!(!s.has(&big_h));
        assert_eq!(s.stats(), (0, 0));
        assert!(matches!(s.remove(&small), Err(BlobError::NotFound(_))));
        assert!(s.list().unwrap().is_empty());
    }

    #[test]
    fn age_counts_from_the_last_store_or_touch() {
        let dir = tempfile::tempdir().unwrap();
        let s = BlobStore::open(dir.path()).unwrap();
        let small = s.put_bytes(b"small").unwrap();
        let big_h = s.put_bytes(&large(11)).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        for h in [small, big_h] {
            assert!(s.age(&h).is_some_and(|a| a >= Duration::from_millis(300)), "{h}");
            s.touch(&h);
            assert!(s.age(&h).is_some_and(|a| a < Duration::from_millis(300)), "{h}");
        }
        std::thread::sleep(Duration::from_millis(300));
        // Storing it again counts as a touch.
        s.put_many(&[(small, b"small".as_slice())]).unwrap();
        assert!(s.age(&small).is_some_and(|a| a < Duration::from_millis(300)));
        assert_eq!(s.age(&Hash::of(b"absent")), None);
        s.touch(&Hash::of(b"absent"));
        assert!(!s.has(&Hash::of(b"absent")), "a touch stores nothing");
    }

    #[test]
    fn put_many_stores_verified_batches() {
        let dir = tempfile::tempdir().unwrap();
        let s = BlobStore::open(dir.path()).unwrap();
        let big = large(13);
        let (a, b): (&[u8], &[u8]) = (b"first", b"second");
        let batch = [
            (Hash::of(a), a),
            (Hash::of(b), b),
            (Hash::of(a), a),
            (Hash::of(&big), big.as_slice()),
        ];
        assert_eq!(s.put_many(&batch).unwrap(), (3, 11 + big.len() as u64));
        assert_eq!(s.read_verified(&Hash::of(b)).unwrap(), b);
        assert_eq!(s.read_verified(&Hash::of(&big)).unwrap(), big);
        assert_eq!(s.put_many(&batch).unwrap(), (0, 0), "already stored");
        // One bad blob refuses the whole batch before anything is written.
        let c: &[u8] = b"third";
        let big2 = large(17);
        assert!(matches!(
            s.put_many(&[(Hash::of(c), c), (Hash::of(&big2), big2.as_slice()), (Hash::of(a), c)]),
            Err(BlobError::HashMismatch { .. })
        ));
        assert!(!s.has(&Hash::of(c)) && !s.has(&Hash::of(&big2)));
        assert_eq!(s.stats(), (3, 11 + big.len() as u64));
        assert_eq!(tmp_files(dir.path()), 0);
    }

    #[test]
    fn bad_writes_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = BlobStore::open(dir.path()).unwrap();
        let big = large(19);
        for data in [b"abc".to_vec(), big] {
            let (h, n) = (Hash::of(&data), data.len());
            let mut wrong = data.clone();
            wrong[1] ^= 1;
            let mut w = s.writer(h, n as u64).unwrap();
            w.write(&wrong).unwrap();
            assert!(matches!(w.finish(), Err(BlobError::HashMismatch { .. })));
            let mut w = s.writer(h, n as u64).unwrap();
            assert!(matches!(
                w.write(&[data.as_slice(), b"x"].concat()),
                Err(BlobError::SizeMismatch { .. })
            ));
            drop(w);
            let mut w = s.writer(h, n as u64).unwrap();
            w.write(&data[..n - 1]).unwrap();
            assert!(matches!(w.finish(), Err(BlobError::SizeMismatch { .. })));
            assert!(!s.has(&h));
        }
        assert_eq!(s.stats(), (0, 0));
        assert_eq!(tmp_files(dir.path()), 0, "temp files cleaned up");
    }

    #[test]
    fn a_reopened_store_keeps_its_blobs_their_ages_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let big = large(23);
        let (small, big_h) = {
            let s = BlobStore::open(dir.path()).unwrap();
            let small = s.put_bytes(b"kept across restarts").unwrap();
            let gone = s.put_bytes(b"removed before the restart").unwrap();
            s.remove(&gone).unwrap();
            (small, s.put_bytes(&big).unwrap())
        };
        std::thread::sleep(Duration::from_millis(200));
        let s = BlobStore::open(dir.path()).unwrap();
        assert_eq!(s.stats(), (2, 20 + big.len() as u64));
        assert_eq!(s.read_verified(&small).unwrap(), b"kept across restarts");
        assert_eq!(s.read_verified(&big_h).unwrap(), big);
        assert!(s.age(&small).is_some_and(|a| a >= Duration::from_millis(200)));
        assert!(!s.has(&Hash::of(b"removed before the restart")));
    }

    #[test]
    fn small_blobs_an_older_build_stored_as_files_stay_usable() {
        let dir = tempfile::tempdir().unwrap();
        let old = b"a page stored one file per blob";
        let h = Hash::of(old);
        let hex = h.to_hex();
        let path = dir.path().join("data").join(&hex[..2]).join(&hex[2..4]).join(&hex);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, old).unwrap();
        let s = BlobStore::open(dir.path()).unwrap();
        assert!(s.has(&h));
        assert_eq!(s.stats(), (1, old.len() as u64));
        assert_eq!(s.list().unwrap(), vec![(h, old.len() as u64)]);
        assert_eq!(s.read_verified(&h).unwrap(), old);
        assert_eq!(s.verify(&h).unwrap(), old.len() as u64);
        assert!(s.age(&h).is_some());
        // Stored again, it is not packed a second time.
        s.put_bytes(old).unwrap();
        s.put_many(&[(h, old.as_slice())]).unwrap();
        let mut w = s.writer(h, old.len() as u64).unwrap();
        w.write(old).unwrap();
        assert!(!w.finish().unwrap());
        assert!(s.packed(&h).is_none());
        assert_eq!(s.stats(), (1, old.len() as u64));
        s.remove(&h).unwrap();
        assert!(!path.exists() && !s.has(&h));
        assert_eq!(s.stats(), (0, 0));
    }
}
