//! The log's next segment, made ahead of time.
//!
//! A segment is written full of zeros and fsynced when it is made (see the log's module doc):
//! 16 MiB written and flushed. Made at the moment the active segment fills, that work would
//! hold the log, and so every `close` waiting on it, for tens of milliseconds. Instead, once the
//! active segment is half full a background thread makes the next one under the name `spare`,
//! and the rotation only renames it and fsyncs the directory. If the spare is not ready (or
//! making it failed: a full disk, say), the rotation makes the segment itself, as before.
//!
//! A spare left by a daemon that stopped is removed when the log opens: it names no records.
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The spare's file name in the log directory (never taken for a segment: those are `seg-*`).
pub(super) const SPARE: &str = "spare";

enum State {
    Empty,
    Making,
    Ready(File),
}

/// The spare segment of one log.
pub(super) struct Spare {
    dir: PathBuf,
    state: Arc<Mutex<State>>,
    /// Rotations that took a spare (for tests and diagnostics).
    used: AtomicU64,
}

impl Spare {
    /// No spare yet; one a previous daemon left is removed.
    pub(super) fn new(dir: &Path) -> Spare {
        let _ = std::fs::remove_file(dir.join(SPARE));
        Spare {
            dir: dir.to_path_buf(),
            state: Arc::new(Mutex::new(State::Empty)),
            used: AtomicU64::new(0),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a spare is on disk or being written (its bytes count toward the log's bound).
    pub(super) fn exists(&self) -> bool {
        !matches!(*self.state(), State::Empty)
    }

    /// Starts making a spare with `make(path)` on a background thread, unless one exists.
    pub(super) fn prepare(&self, make: fn(&Path) -> std::io::Result<File>) {
        {
            let mut st = self.state();
            if !matches!(*st, State::Empty) {
                return;
            }
            *st = State::Making;
        }
        let (state, path) = (self.state.clone(), self.dir.join(SPARE));
        let spawned = std::thread::Builder::new()
            .name("codafs-wblog-spare".into())
            .spawn(move || {
                let made = make(&path);
                let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
                match made {
                    Ok(f) => *st = State::Ready(f),
                    Err(e) => {
                        tracing::warn!(error = %e, "making the write-back log's next segment ahead failed; it is made when needed");
                        let _ = std::fs::remove_file(&path);
                        *st = State::Empty;
                    }
                }
            });
        if spawned.is_err() {
            *self.state() = State::Empty;
        }
    }

    /// The ready spare renamed to `path` (the directory fsynced), or `None` if there is none
    /// ready: the caller makes the segment itself.
    pub(super) fn take_as(&self, path: &Path) -> Option<std::io::Result<File>> {
        let file = {
            let mut st = self.state();
            match std::mem::replace(&mut *st, State::Empty) {
                State::Ready(f) => f,
                other => {
                    *st = other;
                    return None;
                }
            }
        };
        let renamed = std::fs::rename(self.dir.join(SPARE), path)
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
        matches!(*self.state(), State::Ready(_))
    }

    /// Rotations that took a spare.
    pub(super) fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }
}

impl Drop for Spare {
    fn drop(&mut self) {
        if matches!(*self.state(), State::Ready(_)) {
            let _ = std::fs::remove_file(self.dir.join(SPARE));
        }
    }
}
