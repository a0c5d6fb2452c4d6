//! What a server knows of one connection's unwritten reply frames, and the switch that closes
//! the connection when they stall.
//!
//! HTTP/2 never ends a reply its caller does not read: h2 keeps the frames while the connection
//! lives, and with them the caller's share of the reply budget (`crate::reply_budget`). So each
//! charged frame registers on its connection's watch from the moment hyper hands it to h2 until
//! h2 drops it, with the bytes the connection had written then. A connection is *stalled* when
//! its oldest such frame has waited longer than the stall timeout and the connection has
//! written less than [`MIN_DRAIN_RATE`] on average since: a client that reads, however
//! slowly its link, keeps up that rate, while one that holds its replies without reading
//! writes next to nothing. `crate::conn_limit` closes stalled connections.
//!
//! The clock starts when a frame is produced, not when the caller's window runs out (hyper
//! asks the body for a frame before h2 has room for it), so the written bytes, not the
//! frame's age alone, are what tell a slow reader from one that does not read.
use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::task::AtomicWaker;

use crate::conn_limit::ConnLimiter;

/// The least a connection with a stalled frame must have written per second, on average
/// since that frame was handed to h2, to be left open.
pub const MIN_DRAIN_RATE: u64 = 64 << 10;

/// One connection's watch.
#[derive(Default)]
pub struct ConnWatch {
    cut: AtomicBool,
    /// The connection task's waker, taken at each read: waking it makes the task poll again,
    /// and the read (or, while h2 waits for a flush, the write) then finds the connection cut.
    reader: AtomicWaker,
    /// Bytes written to the connection so far.
    written: AtomicU64,
    /// Frames h2 holds, by a number given in order, with when each was handed over and the
    /// bytes written then.
    frames: Mutex<Frames>,
}

#[derive(Default)]
struct Frames {
    next: u64,
    held: BTreeMap<u64, (Instant, u64)>,
}

impl ConnWatch {
    /// Registers a frame handed to h2 now; it counts until the returned guard is dropped.
    pub fn hold(self: &Arc<Self>) -> HeldFrame {
        let written = self.written.load(Ordering::Acquire);
        let mut f = self.frames.lock().unwrap_or_else(|p| p.into_inner());
        let n = f.next;
        f.next += 1;
        f.held.insert(n, (Instant::now(), written));
        HeldFrame { watch: self.clone(), n }
    }

    /// Counts what a write to the connection wrote.
    pub(crate) fn wrote(&self, r: &Poll<io::Result<usize>>) {
        if let Poll::Ready(Ok(n)) = r {
            self.written.fetch_add(*n as u64, Ordering::AcqRel);
        }
    }

    /// Whether, at `now`, the oldest frame has waited longer than `stall` while the connection
    /// wrote less than [`MIN_DRAIN_RATE`] on average.
    pub(crate) fn stalled(&self, now: Instant, stall: Duration) -> bool {
        let oldest = {
            let f = self.frames.lock().unwrap_or_else(|p| p.into_inner());
            f.held.values().next().copied()
        };
        let Some((since, written_then)) = oldest else {
            return false;
        };
        let age = now.saturating_duration_since(since);
        if age <= stall {
            return false;
        }
        let drained = self.written.load(Ordering::Acquire).saturating_sub(written_then);
        (drained as f64) < MIN_DRAIN_RATE as f64 * age.as_secs_f64()
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
        let mut f = self.watch.frames.lock().unwrap_or_else(|p| p.into_inner());
        f.held.remove(&self.n);
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
    fn a_frame_stalls_only_past_the_timeout_and_without_the_drain_rate() {
        let w = Arc::new(ConnWatch::default());
        let stall = Duration::from_secs(120);
        let t0 = Instant::now();
        assert!(!w.stalled(t0 + Duration::from_secs(600), stall), "no frame, no stall");
        let _frame = w.hold();
        let later = t0 + Duration::from_secs(200);
        assert!(!w.stalled(t0 + Duration::from_secs(100), stall), "within the timeout");
        assert!(w.stalled(later, stall), "past it, nothing written");
        // A slow reader: 100 KiB/s since the frame was handed over.
        w.wrote(&Poll::Ready(Ok((200 * 100) << 10)));
        assert!(
            !w.stalled(later, stall),
            "a connection draining faster than the floor stays"
        );
        assert!(w.stalled(t0 + Duration::from_secs(400), stall), "but not if it stops");
        w.wrote(&Poll::Ready(Err(cut_error())));
        w.wrote(&Poll::Pending);
        assert_eq!(
            w.written.load(Ordering::Acquire),
            (200 * 100) << 10,
            "only written bytes count"
        );
    }

    #[test]
    fn the_oldest_frame_decides_and_a_dropped_frame_no_longer_counts() {
        let w = Arc::new(ConnWatch::default());
        let stall = Duration::from_secs(1);
        let first = w.hold();
        let t0 = Instant::now();
        let _second = w.hold();
        assert!(w.stalled(t0 + Duration::from_secs(5), stall));
        drop(first);
        // The second frame was handed over after `first`, so it is judged from its own time.
        assert!(w.stalled(t0 + Duration::from_secs(5), stall));
        assert!(!w.stalled(t0, stall));
    }
}
