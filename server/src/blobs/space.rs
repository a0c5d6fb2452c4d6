//! Disk-full safety: a free-space watermark below which a server refuses new data.
//!
//! A server whose disk fills up cannot append to its Raft log or write RocksDB, so it stops
//! being a replica at all. Blob puts are the bulk of what fills a disk, so they are refused
//! (RESOURCE_EXHAUSTED, saying how much is free and how much is needed) while the space left
//! after them would be under the watermark; the watermark itself is headroom for RocksDB, the
//! Raft log and snapshots. Commits are refused below it too, except commits that only remove
//! (an operator must be able to free space). Puts in progress reserve space as their bytes come
//! (a step ahead of them), so concurrent uploads cannot each pass the check against the same
//! free bytes, and a streamed put re-checks as it goes that all it still has to write fits
//! (another writer on the disk may have used the space meanwhile). A put reserved its whole
//! declared size at once before: a few slow puts declaring 16 GiB each held all free space.
//!
//! Space pressure (free space under twice the watermark) also shortens the GC grace period of
//! unreferenced blobs (see `maintenance`), and every refusal wakes GC at once (with the
//! shorter grace only under real pressure: refusals alone, which reservations can cause, do not
//! make GC take uncommitted uploads sooner).
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::Notify;

/// The automatic watermark: this much at least...
pub const MIN_FREE_FLOOR: u64 = 1 << 30;
/// ...or this percentage of the filesystem, whichever is larger.
pub const MIN_FREE_PERCENT: u64 = 5;

/// Free and total bytes of a filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskUsage {
    /// Bytes available to unprivileged writers (what is left before the disk is "full").
    pub free: u64,
    pub total: u64,
}

/// `statvfs(2)` of the filesystem holding `path`.
pub fn disk_usage(path: &Path) -> std::io::Result<DiskUsage> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "path holds a NUL byte"))?;
    // SAFETY: `c` is a valid NUL-terminated string and `st` a properly sized out-parameter.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let frsize = st.f_frsize as u64;
    Ok(DiskUsage {
        free: (st.f_bavail as u64).saturating_mul(frsize),
        total: (st.f_blocks as u64).saturating_mul(frsize),
    })
}

/// The automatic watermark of a filesystem of `total` bytes: max(1 GiB, 5 %), but never more
/// than half the filesystem (a small test disk would otherwise refuse everything).
pub fn default_min_free(total: u64) -> u64 {
    (total / 100 * MIN_FREE_PERCENT).max(MIN_FREE_FLOOR).min(total / 2)
}

/// Whether a commit only removes names: allowed below the watermark, so space can be freed.
pub fn only_removes(ops: &[codafs_proto::pb::Op]) -> bool {
    use codafs_proto::pb::op::Op;
    !ops.is_empty() && ops.iter().all(|o| matches!(o.op, Some(Op::Remove(_))))
}

/// Why new data was refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SpaceError {
    #[error(
        "not enough disk space on this server to {what}: {free} bytes free ({reserved} reserved by uploads in progress), {need} needed, and {min_free} must stay free (min_free)"
    )]
    Low {
        what: String,
        free: u64,
        reserved: u64,
        need: u64,
        min_free: u64,
    },
}

/// The free-space watermark of one server's data directory.
pub struct Space {
    dir: PathBuf,
    /// Configured watermark; `None` = [`default_min_free`].
    configured: Option<u64>,
    /// Declared bytes of blob writes in progress.
    reserved: AtomicU64,
    /// Refusals since start (shown by `status`).
    pub refusals: AtomicU64,
    /// Woken by every refusal: GC runs at once instead of at its next interval.
    pub pressure: Notify,
}

/// Space reserved for a write in progress; released when dropped.
pub struct Reservation<'a> {
    space: &'a Space,
    bytes: u64,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.space.reserved.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

impl Reservation<'_> {
    /// Bytes reserved.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Reserves `more` bytes on top, checked as [`Space::reserve`] checks them.
    pub fn grow(&mut self, more: u64, what: &str) -> Result<(), SpaceError> {
        let mut extra = self.space.reserve(more, what)?;
        self.bytes += std::mem::take(&mut extra.bytes);
        Ok(())
    }

    /// Gives back `n` bytes that were written: they are out of the free space now, and a
    /// reservation still holding them would count them twice.
    pub fn written(&mut self, n: u64) {
        let n = n.min(self.bytes);
        self.bytes -= n;
        self.space.reserved.fetch_sub(n, Ordering::Relaxed);
    }
}

impl Space {
    pub fn new(dir: &Path, configured: Option<u64>) -> Self {
        Space {
            dir: dir.to_path_buf(),
            configured,
            reserved: AtomicU64::new(0),
            refusals: AtomicU64::new(0),
            pressure: Notify::new(),
        }
    }

    /// Current free and total bytes; `None` if the filesystem cannot be asked (then nothing is
    /// refused: a failing `statvfs` says nothing about space).
    pub fn usage(&self) -> Option<DiskUsage> {
        match disk_usage(&self.dir) {
            Ok(u) => Some(u),
            Err(e) => {
                tracing::debug!(dir = %self.dir.display(), error = %e, "statvfs failed");
                None
            }
        }
    }

    /// The watermark in bytes (for a filesystem of `total` bytes when automatic).
    pub fn min_free_of(&self, total: u64) -> u64 {
        self.configured.unwrap_or_else(|| default_min_free(total))
    }

    /// The watermark of this server's filesystem (0 if it cannot be asked).
    pub fn min_free(&self) -> u64 {
        self.usage().map_or(0, |u| self.min_free_of(u.total))
    }

    fn refuse(&self, what: &str, free: u64, need: u64, min_free: u64) -> SpaceError {
        self.refusals.fetch_add(1, Ordering::Relaxed);
        self.pressure.notify_one();
        let e = SpaceError::Low {
            what: what.to_string(),
            free,
            reserved: self.reserved.load(Ordering::Relaxed),
            need,
            min_free,
        };
        tracing::warn!(error = %e, "refused: disk space low");
        e
    }

    /// Reserves `need` bytes for a write, or refuses it if what would be left (after the writes
    /// already in progress) is below the watermark.
    pub fn reserve(&self, need: u64, what: &str) -> Result<Reservation<'_>, SpaceError> {
        let before = self.reserved.fetch_add(need, Ordering::Relaxed);
        let r = Reservation {
            space: self,
            bytes: need,
        };
        if need == 0 {
            return Ok(r);
        }
        let Some(u) = self.usage() else { return Ok(r) };
        let min_free = self.min_free_of(u.total);
        if u.free.saturating_sub(before).saturating_sub(need) < min_free {
            drop(r);
            return Err(self.refuse(what, u.free, need, min_free));
        }
        Ok(r)
    }

    /// Midway through a streamed write that still has `remaining` bytes to write: refuses to go
    /// on if they would no longer fit above the watermark (something else used the space).
    pub fn check_remaining(&self, remaining: u64, what: &str) -> Result<(), SpaceError> {
        let Some(u) = self.usage() else { return Ok(()) };
        let min_free = self.min_free_of(u.total);
        if u.free.saturating_sub(remaining) < min_free {
            return Err(self.refuse(what, u.free, remaining, min_free));
        }
        Ok(())
    }

    /// Refuses a commit that adds metadata while free space is below the watermark.
    pub fn check_commit(&self) -> Result<(), SpaceError> {
        let Some(u) = self.usage() else { return Ok(()) };
        let min_free = self.min_free_of(u.total);
        if u.free < min_free {
            return Err(self.refuse(
                "commit a change that adds data (commits that only remove are allowed)",
                u.free,
                0,
                min_free,
            ));
        }
        Ok(())
    }

    /// Whether free space is under twice the watermark: GC then collects sooner.
    pub fn under_pressure(&self) -> bool {
        self.usage()
            .is_some_and(|u| u.free < self.min_free_of(u.total).saturating_mul(2))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_watermark_is_a_floor_or_a_share_but_at_most_half() {
        assert_eq!(default_min_free(100 << 30), 5 << 30);
        assert_eq!(default_min_free(10 << 30), 1 << 30);
        assert_eq!(default_min_free(1 << 30), 512 << 20);
    }

    #[test]
    fn puts_reserve_and_refuse_below_the_watermark() {
        let dir = tempfile::tempdir().unwrap();
        let free = disk_usage(dir.path()).unwrap().free;
        // A watermark just under what is free: a small put fits, a large one does not.
        let s = Space::new(dir.path(), Some(free.saturating_sub(64 << 20)));
        let mut r = s.reserve(1 << 20, "store a test blob").unwrap();
        let Err(err) = s.reserve(128 << 20, "store a test blob") else {
            panic!("a put past the watermark was accepted");
        };
        let err = err.to_string();
        assert!(err.contains("bytes free") && err.contains("needed"), "{err}");
        assert_eq!(s.refusals.load(Ordering::Relaxed), 1);
        r.grow(1 << 20, "store a test blob").unwrap();
        assert_eq!((r.bytes(), s.reserved.load(Ordering::Relaxed)), (2 << 20, 2 << 20));
        assert!(
            r.grow(128 << 20, "store a test blob").is_err(),
            "a step past the watermark"
        );
        assert_eq!(r.bytes(), 2 << 20, "a refused step reserves nothing");
        drop(r);
        assert_eq!(s.reserved.load(Ordering::Relaxed), 0, "reservations are released");
        // Under a watermark larger than the disk, commits are refused too.
        let full = Space::new(dir.path(), Some(u64::MAX));
        assert!(full.check_commit().is_err());
        assert!(full.under_pressure());
        assert!(s.check_commit().is_ok());
    }
}
