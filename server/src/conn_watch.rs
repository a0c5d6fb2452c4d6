//! What a server knows of one connection's unwritten reply frames, and the switch that closes
//! the connection when they stall.
//!
//! HTTP/2 never ends a reply its caller does not read: h2 keeps the frames while the connection
//! lives, and with them the caller's share of the reply budget (`crate::reply_budget`). So each
//! charged frame registers on its connection's watch from the moment hyper hands it to h2 until
//! h2 drops it (written, or its stream or connection gone). A connection is *stalled* when its
//! oldest such frame has waited longer than the stall timeout, and `crate::conn_limit` closes
//! it.
//!
//! Only the frame's age counts. A rule that also let a connection stay open while it wrote
//! some minimum rate could be met without reading the held replies at all (h2 answers every
//! PING, and small replies are not charged), so it would not bound anything. The cost is that
//! a reader whose link is so slow that a reply waits longer than the timeout behind the ones
//! it asked for earlier is cut too (and its mount reconnects): the clock starts when hyper
//! produces a frame, which is before the caller's window runs out.
use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::Context;
use std::time::{Duration, Instant};

use futures::task::AtomicWaker;

use crate::conn_limit::ConnLimiter;

/// One connection's watch.
#[derive(Default)]
pub struct ConnWatch {
    cut: AtomicBool,
    /// The connection task's waker, taken at each read: waking it makes the task poll again,
    /// and the read (or, while h2 waits for a flush, the write) then finds the connection cut.
    reader: AtomicWaker,
    /// Frames h2 holds, by a number given in order, with when each was handed over.
    frames: Mutex<Frames>,
}

#[derive(Default)]
struct Frames {
    next: u64,
    held: BTreeMap<u64, Instant>,
}

impl ConnWatch {
    /// Registers a frame handed to h2 now; it counts until the returned guard is dropped.
    pub fn hold(self: &Arc<Self>) -> HeldFrame {
        self.hold_at(Instant::now())
    }

    /// Registers a frame handed to h2 at `at` (numbers are given in call order, so callers
    /// other than tests pass the time of the call).
    fn hold_at(self: &Arc<Self>, at: Instant) -> HeldFrame {
        let mut f = self.frames();
        let n = f.next;
        f.next += 1;
        f.held.insert(n, at);
        HeldFrame { watch: self.clone(), n }
    }

    fn frames(&self) -> std::sync::MutexGuard<'_, Frames> {
        self.frames.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether, at `now`, the oldest frame still held has waited longer than `stall`.
    pub(crate) fn stalled(&self, now: Instant, stall: Duration) -> bool {
        self.frames()
            .held
            .values()
            .next()
            .is_some_and(|t| now.saturating_duration_since(*t) > stall)
    }

    /// Closes the connection: its next read or write fails, which ends it in hyper, and h2
    /// drops every frame it held.
    pub(crate) fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.reader.wake();
    }

    /// Whether the connection is cut, keeping `cx`'s waker to be woken when it is.
    pub(crate) fn poll_cut(&self, cx: &Context<'_>) -> bool {
        self.reader.register(cx.waker());
        self.is_cut()
    }

    pub(crate) fn is_cut(&self) -> bool {
        self.cut.load(Ordering::SeqCst)
    }
}

/// The error a cut connection's reads and writes fail with.
pub(crate) fn cut_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "connection closed: it left a reply unread past the stall timeout",
    )
}

/// A reply frame registered on its connection's [`ConnWatch`] while h2 holds it.
pub struct HeldFrame {
    watch: Arc<ConnWatch>,
    n: u64,
}

impl Drop for HeldFrame {
    fn drop(&mut self) {
        self.watch.frames().held.remove(&self.n);
    }
}

/// The connection a request came on, its watch looked up only when a reply frame is charged
/// (most requests never are: attributes, lookups).
pub struct ConnRef {
    conns: Arc<ConnLimiter>,
    peer: SocketAddr,
    watch: OnceLock<Option<Arc<ConnWatch>>>,
}

impl ConnRef {
    pub fn new(conns: Arc<ConnLimiter>, peer: SocketAddr) -> Self {
        ConnRef {
            conns,
            peer,
            watch: OnceLock::new(),
        }
    }

    /// Registers a frame on the connection's watch (none if the connection is gone already).
    pub fn hold(&self) -> Option<HeldFrame> {
        self.watch
            .get_or_init(|| self.conns.watch(self.peer))
            .as_ref()
            .map(|w| w.hold())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_frame_held_decides_and_a_dropped_frame_no_longer_counts() {
        let w = Arc::new(ConnWatch::default());
        let stall = Duration::from_secs(120);
        let t0 = Instant::now();
        assert!(!w.stalled(t0 + Duration::from_secs(600), stall), "no frame, no stall");
        let first = w.hold_at(t0);
        let second = w.hold_at(t0 + Duration::from_secs(100));
        assert!(!w.stalled(t0 + Duration::from_secs(120), stall), "within the timeout");
        assert!(
            w.stalled(t0 + Duration::from_secs(121), stall),
            "the first frame is past it"
        );
        drop(first);
        assert!(
            !w.stalled(t0 + Duration::from_secs(200), stall),
            "the second frame is judged from its own time"
        );
        assert!(w.stalled(t0 + Duration::from_secs(221), stall));
        drop(second);
        assert!(!w.stalled(t0 + Duration::from_secs(600), stall), "nothing held");
    }
}
