//! The log's next segment, made ahead of time.
//!
//! A segment is written full of zeros and fsynced when it is made (see the log's module doc):
//! 16 MiB written and flushed. Made at the moment the active segment fills, that work would
//! hold the log, and so every `close` waiting on it, for tens of milliseconds. Instead, once the
//! active segment is half full a background thread makes the next one, and the rotation only
//! renames it and fsyncs the directory.
//! - A rotation that finds the spare still being written waits for it rather than making a
//!   second segment beside it: the log's bound counts one spare, never two.
//! - If making it failed (a full disk, say), no spare is tried again until the next rotation,
//!   which makes its segment itself, as before; a failing disk is not hit by a thread per
//!   append.
//! - Each log instance names its spare `spare-<pid>-<n>`, so a thread still writing for a log
//!   that was dropped never shares a file with the next one; it removes its file when it
//!   finds its log gone. Spares left by a daemon that stopped are removed when the log opens:
//!   they name no records.
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

/// What every spare's file name starts with (never a segment's: those are `seg-*`).
pub(super) const SPARE_PREFIX: &str = "spare";

/// Numbers the log instances of this process, for their spares' names.
static INSTANCE: AtomicU64 = AtomicU64::new(0);

enum State {
    Empty,
    Making,
    Ready(File),
    /// Making one failed: none is tried again until the next rotation.
    Failed,
    /// The log was dropped: a thread still making one removes it.
    Closed,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled when a thread finishes making a spare (or gives up).
    done: Condvar,
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The spare segment of one log.
pub(super) struct Spare {
    dir: PathBuf,
    /// This instance's spare file.
    path: PathBuf,
    shared: Arc<Shared>,
    /// Rotations that took a spare (for tests and diagnostics).
    used: AtomicU64,
}

impl Spare {
    /// No spare yet; those a previous daemon left are removed.
    pub(super) fn new(dir: &Path) -> Spare {
        if let Ok(it) = std::fs::read_dir(dir) {
            for e in it.flatten() {
                if e.file_name().to_str().is_some_and(|n| n.starts_with(SPARE_PREFIX)) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let n = INSTANCE.fetch_add(1, Ordering::Relaxed);
        Spare {
            dir: dir.to_path_buf(),
            path: dir.join(format!("{SPARE_PREFIX}-{}-{n}", std::process::id())),
            shared: Arc::new(Shared {
                state: Mutex::new(State::Empty),
                done: Condvar::new(),
            }),
            used: AtomicU64::new(0),
        }
    }

    /// Whether a spare is on disk or being written (its bytes count toward the log's bound).
    pub(super) fn exists(&self) -> bool {
        matches!(*self.shared.state(), State::Making | State::Ready(_))
    }

    /// Starts making a spare with `make(path)` on a background thread, unless one exists or
    /// making one failed since the last rotation.
    pub(super) fn prepare(&self, make: fn(&Path) -> std::io::Result<File>) {
        {
            let mut st = self.shared.state();
            if !matches!(*st, State::Empty) {
                return;
            }
            *st = State::Making;
        }
        let (shared, path) = (self.shared.clone(), self.path.clone());
        let spawned = std::thread::Builder::new()
            .name("codafs-wblog-spare".into())
            .spawn(move || {
                // A panic counts as a failure: a rotation waiting for this spare must wake.
                let made = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| make(&path)))
                    .unwrap_or_else(|_| Err(std::io::Error::other("making the spare segment panicked")));
                let mut st = shared.state();
                match made {
                    Ok(f) if matches!(*st, State::Making) => *st = State::Ready(f),
                    Ok(_) => {
                        // The log was dropped meanwhile.
                        let _ = std::fs::remove_file(&path);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "making the write-back log's next segment ahead failed; the next rotation makes it instead");
                        let _ = std::fs::remove_file(&path);
                        if matches!(*st, State::Making) {
                            *st = State::Failed;
                        }
                    }
                }
                drop(st);
                shared.done.notify_all();
            });
        if spawned.is_err() {
            *self.shared.state() = State::Failed;
        }
    }

    /// The spare renamed to `path` (the directory fsynced), waiting for it if it is still
    /// being made; `None` if there is none: the caller makes the segment itself.
    pub(super) fn take_as(&self, path: &Path) -> Option<std::io::Result<File>> {
        let file = {
            let mut st = self.shared.state();
            while matches!(*st, State::Making) {
                st = self.shared.done.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            match std::mem::replace(&mut *st, State::Empty) {
                State::Ready(f) => f,
                // A failure is forgotten at a rotation: the next half-full segment tries again.
                State::Failed | State::Empty => return None,
                other => {
                    *st = other;
                    return None;
                }
            }
        };
        let renamed = std::fs::rename(&self.path, path)
            .and_then(|()| File::open(&self.dir).and_then(|d| d.sync_all()))
            .map(|()| file);
        if renamed.is_ok() {
            self.used.fetch_add(1, Ordering::Relaxed);
        }
        Some(renamed)
    }

    /// Whether a spare is ready to be taken.
    #[cfg(test)]
    pub(super) fn is_ready(&self) -> bool {
        matches!(*self.shared.state(), State::Ready(_))
    }

    /// Whether making one failed since the last rotation.
    #[cfg(test)]
    pub(super) fn has_failed(&self) -> bool {
        matches!(*self.shared.state(), State::Failed)
    }

    /// This instance's spare file.
    #[cfg(test)]
    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Rotations that took a spare.
    pub(super) fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }
}

impl Drop for Spare {
    /// A ready spare is removed; one being made is removed by its thread when it finishes.
    fn drop(&mut self) {
        let was = std::mem::replace(&mut *self.shared.state(), State::Closed);
        if matches!(was, State::Ready(_)) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    static CALLS: AtomicUsize = AtomicUsize::new(0);

    fn failing(_: &Path) -> std::io::Result<File> {
        CALLS.fetch_add(1, Ordering::SeqCst);
        Err(std::io::Error::other("no space left (simulated)"))
    }

    fn slow(path: &Path) -> std::io::Result<File> {
        std::thread::sleep(std::time::Duration::from_millis(300));
        std::fs::write(path, b"segment")?;
        File::open(path)
    }

    fn wait_until(f: impl Fn() -> bool) {
        for _ in 0..500 {
            if f() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("not reached within 5 s");
    }

    /// A failure is not retried on every append: only after the next rotation.
    #[test]
    fn a_failed_spare_is_not_tried_again_until_a_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spare::new(dir.path());
        s.prepare(failing);
        wait_until(|| s.has_failed());
        let calls = CALLS.load(Ordering::SeqCst);
        for _ in 0..10 {
            s.prepare(failing);
        }
        assert_eq!(CALLS.load(Ordering::SeqCst), calls, "no retry before a rotation");
        assert!(!s.exists(), "a failed spare takes no room");
        assert!(s.take_as(&dir.path().join("seg")).is_none());
        s.prepare(failing);
        wait_until(|| s.has_failed());
        assert_eq!(CALLS.load(Ordering::SeqCst), calls + 1, "tried again after it");
    }

    fn panicking(_: &Path) -> std::io::Result<File> {
        panic!("simulated")
    }

    /// A spare whose making panicked does not leave a rotation waiting for it.
    #[test]
    fn a_panic_while_making_a_spare_does_not_hang_the_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spare::new(dir.path());
        s.prepare(panicking);
        assert!(s.take_as(&dir.path().join("seg")).is_none());
    }

    /// A rotation waits for a spare being made instead of making a second segment beside it.
    #[test]
    fn a_rotation_waits_for_the_spare_being_made() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spare::new(dir.path());
        s.prepare(slow);
        assert!(s.exists());
        let seg = dir.path().join("seg-1");
        let f = s.take_as(&seg).expect("waited for the spare").unwrap();
        drop(f);
        assert_eq!(std::fs::read(&seg).unwrap(), b"segment");
        assert_eq!(s.used(), 1);
    }

    /// A log dropped while its spare is being made leaves no file behind, and the next
    /// instance has a name of its own.
    #[test]
    fn a_spare_made_for_a_dropped_log_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spare::new(dir.path());
        s.prepare(slow);
        let old = s.path().to_path_buf();
        drop(s);
        let next = Spare::new(dir.path());
        assert_ne!(next.path(), old.as_path());
        wait_until(|| !old.exists() && std::fs::read_dir(dir.path()).unwrap().count() == 0);
    }
}
