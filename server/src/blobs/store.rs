//! Local blob storage: one file per blob at `blobs/<2 hex>/<2 hex>/<64 hex>`.
//!
//! A blob is written to `tmp/`, hashed while written, checked against the expected hash and
//! size, fsynced, renamed into place and its directory fsynced: a crash leaves either no blob or
//! a complete one (stray temp files are removed at start). Reads re-verify the hash, and a copy
//! that fails is moved to `quarantine/` so it is never served again and repair refetches it.
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use codafs_common::Hash;

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
}

/// The blob directory of one server.
pub struct BlobStore {
    root: PathBuf,
    count: AtomicU64,
    bytes: AtomicU64,
    corrupt_found: AtomicU64,
    tmp_seq: AtomicU64,
}

impl BlobStore {
    /// Opens `root`, removes temp files of interrupted writes and counts what is stored.
    pub fn open(root: &Path) -> Result<Self, BlobError> {
        for sub in ["tmp", "quarantine", "data"] {
            std::fs::create_dir_all(root.join(sub))?;
        }
        for e in std::fs::read_dir(root.join("tmp"))? {
            let _ = std::fs::remove_file(e?.path());
        }
        let store = BlobStore {
            root: root.to_path_buf(),
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

    /// Where a blob lives.
    pub fn path(&self, h: &Hash) -> PathBuf {
        let hex = h.to_hex();
        self.root.join("data").join(&hex[..2]).join(&hex[2..4]).join(hex)
    }

    pub fn has(&self, h: &Hash) -> bool {
        self.path(h).is_file()
    }

    /// (blobs, bytes) stored.
    pub fn stats(&self) -> (u64, u64) {
        (self.count.load(Ordering::Relaxed), self.bytes.load(Ordering::Relaxed))
    }

    /// Corrupt copies found so far (by reads or scrub).
    pub fn corrupt_found(&self) -> u64 {
        self.corrupt_found.load(Ordering::Relaxed)
    }

    /// Starts writing a blob expected to hash to `expected` and be `size` bytes.
    pub fn writer(&self, expected: Hash, size: u64) -> Result<BlobWriter<'_>, BlobError> {
        let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .root
            .join("tmp")
            .join(format!("{}-{}-{seq}", expected.to_hex(), std::process::id()));
        let file = std::fs::File::create(&tmp)?;
        Ok(BlobWriter {
            store: self,
            tmp,
            file: std::io::BufWriter::with_capacity(1 << 20, file),
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

    /// Stores many small verified blobs with two `syncfs` calls for the whole batch instead of
    /// two fsyncs per blob: temp files are written, synced, renamed into place, and the renames
    /// synced. A blob is never visible under its name before its bytes are durable. Returns how
    /// many were new and their bytes.
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
        let mut staged = Vec::new();
        for (h, data) in blobs {
            if self.has(h) {
                self.touch(h);
                continue;
            }
            if staged.iter().any(|(s, _, _)| s == h) {
                continue;
            }
            let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
            let tmp = self
                .root
                .join("tmp")
                .join(format!("{}-{}-{seq}", h.to_hex(), std::process::id()));
            std::fs::write(&tmp, data)?;
            staged.push((*h, tmp, data.len() as u64));
        }
        if staged.is_empty() {
            return Ok((0, 0));
        }
        self.syncfs()?;
        for (h, tmp, len) in &staged {
            let dest = self.path(h);
            if let Some(dir) = dest.parent() {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::rename(tmp, &dest)?;
            self.count.fetch_add(1, Ordering::Relaxed);
            self.bytes.fetch_add(*len, Ordering::Relaxed);
        }
        self.syncfs()?;
        Ok((staged.len(), staged.iter().map(|(_, _, len)| len).sum()))
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

    /// Refreshes a stored blob's mtime: garbage collection measures its grace period from it, so
    /// content uploaded or confirmed again is not collected just before a commit references it.
    pub fn touch(&self, h: &Hash) {
        if let Ok(f) = std::fs::File::options().write(true).open(self.path(h)) {
            let _ = f.set_modified(std::time::SystemTime::now());
        }
    }

    /// Opens a stored blob for reading. The caller verifies while streaming (see `verify_read`).
    pub fn open_read(&self, h: &Hash) -> Result<(std::fs::File, u64), BlobError> {
        match std::fs::File::open(self.path(h)) {
            Ok(f) => {
                let len = f.metadata()?.len();
                Ok((f, len))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(BlobError::NotFound(*h)),
            Err(e) => Err(e.into()),
        }
    }

    /// Reads and verifies a whole blob.
    pub fn read_verified(&self, h: &Hash) -> Result<Vec<u8>, BlobError> {
        let data = match std::fs::read(self.path(h)) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(BlobError::NotFound(*h)),
            Err(e) => return Err(e.into()),
        };
        if Hash::of(&data) != *h {
            self.quarantine(h);
            return Err(BlobError::Corrupt(*h));
        }
        Ok(data)
    }

    /// Re-hashes a stored blob; a corrupt copy is quarantined. Returns bytes read.
    pub fn verify(&self, h: &Hash) -> Result<u64, BlobError> {
        let (mut f, len) = self.open_read(h)?;
        let mut hasher = blake3::Hasher::new();
        std::io::copy(&mut f, &mut hasher)?;
        if Hash::from(hasher.finalize()) != *h {
            self.quarantine(h);
            return Err(BlobError::Corrupt(*h));
        }
        Ok(len)
    }

    /// Moves a corrupt copy aside so it is never served; repair will fetch a good one.
    pub fn quarantine(&self, h: &Hash) {
        let from = self.path(h);
        let len = std::fs::metadata(&from).map(|m| m.len()).unwrap_or(0);
        let to = self
            .root
            .join("quarantine")
            .join(format!("{}-{}", h.to_hex(), codafs_common::now_ns()));
        if std::fs::rename(&from, &to).is_ok() {
            self.count.fetch_sub(1, Ordering::Relaxed);
            self.bytes.fetch_sub(len, Ordering::Relaxed);
            self.corrupt_found.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(hash = %h, "corrupt blob copy quarantined");
        }
    }

    /// Deletes a blob (garbage collection).
    pub fn remove(&self, h: &Hash) -> Result<(), BlobError> {
        let p = self.path(h);
        let len = std::fs::metadata(&p)?.len();
        std::fs::remove_file(&p)?;
        self.count.fetch_sub(1, Ordering::Relaxed);
        self.bytes.fetch_sub(len, Ordering::Relaxed);
        Ok(())
    }

    /// Every stored blob with its size.
    pub fn list(&self) -> Result<Vec<(Hash, u64)>, BlobError> {
        let mut out = Vec::new();
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

    /// Age of a stored blob's file (for the GC grace period).
    pub fn age(&self, h: &Hash) -> Option<std::time::Duration> {
        let m = std::fs::metadata(self.path(h)).ok()?;
        m.modified().ok()?.elapsed().ok()
    }
}

/// An in-progress blob write.
pub struct BlobWriter<'a> {
    store: &'a BlobStore,
    tmp: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
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
        self.file.write_all(data)?;
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
        self.file.flush()?;
        self.file.get_ref().sync_data()?;
        let dest = self.store.path(&self.expected);
        let dir = dest.parent().map(Path::to_path_buf).unwrap_or_default();
        std::fs::create_dir_all(&dir)?;
        self.done = true;
        if dest.exists() {
            let _ = std::fs::remove_file(&self.tmp);
            return Ok(false);
        }
        std::fs::rename(&self.tmp, &dest)?;
        std::fs::File::open(&dir)?.sync_all()?;
        self.store.count.fetch_add(1, Ordering::Relaxed);
        self.store.bytes.fetch_add(self.written, Ordering::Relaxed);
        Ok(true)
    }
}

impl Drop for BlobWriter<'_> {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_verify_corrupt_quarantine() {
        let dir = tempfile::tempdir().unwrap();
        let s = BlobStore::open(dir.path()).unwrap();
        let h = s.put_bytes(b"hello world").unwrap();
        assert!(s.has(&h));
        assert_eq!(s.stats(), (1, 11));
        assert_eq!(s.read_verified(&h).unwrap(), b"hello world");
        // Identical content is stored once.
        s.put_bytes(b"hello world").unwrap();
        assert_eq!(s.stats(), (1, 11));
        // Corrupt the file on disk: it is detected, quarantined and no longer present.
        std::fs::write(s.path(&h), b"hello w0rld").unwrap();
        assert!(matches!(s.read_verified(&h), Err(BlobError::Corrupt(_))));
        assert!(!s.has(&h));
        assert_eq!(s.corrupt_found(), 1);
        assert_eq!(s.stats(), (0, 0));
    }

    #[test]
    fn put_many_stores_verified_batches() {
        let dir = tempfile::tempdir().unwrap();
        let s = BlobStore::open(dir.path()).unwrap();
        let (a, b): (&[u8], &[u8]) = (b"first", b"second");
        let batch = [(Hash::of(a), a), (Hash::of(b), b), (Hash::of(a), a)];
        assert_eq!(s.put_many(&batch).unwrap(), (2, 11));
        assert_eq!(s.read_verified(&Hash::of(b)).unwrap(), b);
        assert_eq!(s.put_many(&batch).unwrap(), (0, 0), "already stored");
        // One bad blob refuses the whole batch before anything is written.
        let c: &[u8] = b"third";
        assert!(matches!(
            s.put_many(&[(Hash::of(c), c), (Hash::of(a), c)]),
            Err(BlobError::HashMismatch { .. })
        ));
        assert!(!s.has(&Hash::of(c)));
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn bad_writes_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = BlobStore::open(dir.path()).unwrap();
        let h = Hash::of(b"abc");
        let mut w = s.writer(h, 3).unwrap();
        w.write(b"abd").unwrap();
        assert!(matches!(w.finish(), Err(BlobError::HashMismatch { .. })));
        let mut w = s.writer(h, 3).unwrap();
        assert!(matches!(w.write(b"abcd"), Err(BlobError::SizeMismatch { .. })));
        drop(w);
        let mut w = s.writer(h, 3).unwrap();
        w.write(b"ab").unwrap();
        assert!(matches!(w.finish(), Err(BlobError::SizeMismatch { .. })));
        assert!(!s.has(&h));
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0,
            "temp files cleaned up"
        );
    }
}
