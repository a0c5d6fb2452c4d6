//! Content fetches that just failed for want of a server, so the kernel's retries fail at once.
//!
//! When a READ fails with EIO, the kernel reads the page the reader needs once more by itself,
//! and a reader whose `read` had already copied some bytes calls `read` again; READs of the
//! same file queued behind the failed one try in turn. One failed read of an uncached file so
//! became three or more READs, each waiting the whole `--timeout` on servers that had just not
//! answered. A fetch of the same content within [`WINDOW`] of a failure now gets only
//! [`PROBE`] to succeed: enough for servers that are back (refusing at once failed reads right
//! after they returned), short against servers that still answer nothing. A read after the
//! window, or once a server has answered (a fetch succeeded, or a change stream came up), gets
//! its whole time again.
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use codafs_common::Hash;

/// Failures remembered at most; past it, older ones are forgotten first.
const KEPT: usize = 256;
/// How long a failure answers for its content: the kernel's retries come within
/// milliseconds, a reader's next `read` at once.
pub(super) const WINDOW: Duration = Duration::from_secs(1);
/// The time a fetch gets within [`WINDOW`] of a failure of the same content.
pub(super) const PROBE: Duration = Duration::from_millis(250);

/// Recent fetch failures by content hash (see the module doc).
#[derive(Default)]
pub(super) struct RecentFailures {
    failed: Mutex<HashMap<Hash, Instant>>,
}

impl RecentFailures {
    /// Whether a fetch of `hash` failed within `window`.
    pub(super) fn check(&self, hash: &Hash, window: Duration) -> bool {
        let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        let Some(at) = failed.get(hash) else {
            return false;
        };
        if at.elapsed() >= window {
            failed.remove(hash);
            return false;
        }
        true
    }

    /// Forgets every failure: a server answered.
    pub(super) fn clear(&self) {
        let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        if !failed.is_empty() {
            failed.clear();
        }
    }

    /// Remembers that a fetch of `hash` failed for want of a server.
    pub(super) fn note(&self, hash: Hash, window: Duration) {
        let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        if failed.len() >= KEPT {
            failed.retain(|_, at| at.elapsed() < window);
            if failed.len() >= KEPT {
                failed.clear();
            }
        }
        failed.insert(hash, Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_holds_only_for_its_content_and_within_its_window() {
        let r = RecentFailures::default();
        let (h, other) = (Hash::of(b"a"), Hash::of(b"b"));
        let w = Duration::from_secs(60);
        assert!(!r.check(&h, w), "nothing failed yet");
        r.note(h, w);
        assert!(r.check(&h, w));
        assert!(!r.check(&other, w), "only that content");
        assert!(!r.check(&h, Duration::ZERO), "past its window");
        assert!(!r.check(&h, w), "and then forgotten");
        r.note(h, w);
        r.clear();
        assert!(!r.check(&h, w), "a server answered");
        for i in 0..(KEPT as u32 + 10) {
            r.note(Hash::of(&i.to_le_bytes()), w);
        }
        assert!(r.failed.lock().unwrap_or_else(|p| p.into_inner()).len() <= KEPT);
    }
}
