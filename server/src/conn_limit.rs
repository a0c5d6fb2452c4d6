//! A bound on open client connections, in all and per remote address.
//!
//! Each HTTP/2 connection carries up to [`crate::MAX_STREAMS_PER_CONNECTION`] requests, so the
//! number of connections bounds a server's tasks against a caller who simply opens more of
//! them (the bytes their requests hold are bounded by [`crate::body_budget`]). A connection
//! over either limit is closed at once (the kernel's accept backlog is not left to fill up);
//! one from an address that is under its share still gets in, so servers reaching each other
//! are not locked out by a flood from elsewhere.
//!
//! Each admitted connection also has a [`ConnWatch`], found by its remote address: reply frames
//! charged to the reply budget (`crate::reply_budget`) are registered on it while h2 holds them,
//! and [`ConnLimiter::cut_stalled`] closes a connection that has left one unwritten for longer
//! than the stall timeout. Nothing else can end such a reply: h2 keeps a frame its caller grants
//! no window for as long as the connection lives, and with it that caller's share of the budget.
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::task::AtomicWaker;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Most connections open at once.
pub const MAX_CONNECTIONS: usize = 4096;
/// Most connections open at once from one IP address.
pub const MAX_CONNECTIONS_PER_ADDRESS: usize = 512;

/// Counts open connections.
pub struct ConnLimiter {
    max_total: usize,
    max_per_ip: usize,
    open: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
    /// Each open connection's watch, by its remote address.
    watches: HashMap<SocketAddr, Arc<ConnWatch>>,
}

/// What a server knows of one connection's unwritten reply frames, and the switch that closes
/// the connection.
#[derive(Default)]
pub struct ConnWatch {
    cut: AtomicBool,
    /// The connection's reader, woken to find the connection cut (h2 always has a read
    /// pending, so this reaches the connection's task even while it writes nothing).
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
        let mut f = self.frames.lock().unwrap_or_else(|p| p.into_inner());
        let n = f.next;
        f.next += 1;
        f.held.insert(n, Instant::now());
        HeldFrame { watch: self.clone(), n }
    }

    /// How long the oldest frame still held has waited, at `now`.
    fn oldest(&self, now: Instant) -> Option<Duration> {
        let f = self.frames.lock().unwrap_or_else(|p| p.into_inner());
        f.held.values().next().map(|t| now.saturating_duration_since(*t))
    }

    /// Closes the connection: its next read or write fails, which ends it in hyper, and h2
    /// drops every frame it held.
    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.reader.wake();
    }

    fn is_cut(&self) -> bool {
        self.cut.load(Ordering::SeqCst)
    }
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

impl Default for ConnLimiter {
    fn default() -> Self {
        Self::new(MAX_CONNECTIONS, MAX_CONNECTIONS_PER_ADDRESS)
    }
}

impl ConnLimiter {
    /// A limiter admitting `max_total` connections, at most `max_per_ip` from one address.
    pub fn new(max_total: usize, max_per_ip: usize) -> Self {
        ConnLimiter {
            max_total,
            max_per_ip,
            open: Mutex::default(),
        }
    }

    /// Admits `stream` if both limits allow one more; `None` (and the stream is dropped, which
    /// closes it) otherwise.
    pub fn admit(self: &Arc<Self>, stream: TcpStream) -> Option<LimitedStream> {
        let peer = stream.peer_addr().ok()?;
        let ip = peer.ip();
        let mut c = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let from_ip = c.per_ip.get(&ip).copied().unwrap_or(0);
        if c.total >= self.max_total || from_ip >= self.max_per_ip {
            return None;
        }
        c.total += 1;
        c.per_ip.insert(ip, from_ip + 1);
        let watch = Arc::new(ConnWatch::default());
        c.watches.insert(peer, watch.clone());
        Some(LimitedStream {
            inner: stream,
            watch,
            _slot: Slot {
                limiter: self.clone(),
                peer,
            },
        })
    }

    /// The watch of the open connection from `peer`.
    pub fn watch(&self, peer: SocketAddr) -> Option<Arc<ConnWatch>> {
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .watches
            .get(&peer)
            .cloned()
    }

    /// Closes every connection holding a reply frame unwritten for longer than `stall`;
    /// returns their remote addresses.
    pub fn cut_stalled(&self, stall: Duration) -> Vec<SocketAddr> {
        let watches: Vec<(SocketAddr, Arc<ConnWatch>)> = {
            let c = self.open.lock().unwrap_or_else(|p| p.into_inner());
            c.watches.iter().map(|(a, w)| (*a, w.clone())).collect()
        };
        let now = Instant::now();
        let mut cut = Vec::new();
        for (peer, w) in watches {
            if !w.is_cut() && w.oldest(now).is_some_and(|age| age > stall) {
                w.cut();
                cut.push(peer);
            }
        }
        cut
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).total
    }

    fn release(&self, peer: SocketAddr) {
        let ip = peer.ip();
        let mut c = self.open.lock().unwrap_or_else(|p| p.into_inner());
        c.watches.remove(&peer);
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                c.per_ip.remove(&ip);
            }
        }
    }
}

/// Gives a connection's place back when the connection is dropped.
struct Slot {
    limiter: Arc<ConnLimiter>,
    peer: SocketAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.limiter.release(self.peer);
    }
}

/// An admitted TCP connection; counts against the limits until dropped, and fails every read
/// and write once its watch cuts it.
pub struct LimitedStream {
    inner: TcpStream,
    watch: Arc<ConnWatch>,
    _slot: Slot,
}

/// The error a cut connection's reads and writes fail with.
fn cut_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "connection closed: it left a reply unread past the stall timeout",
    )
}

impl Connected for LimitedStream {
    // The plain TCP info, so `remote_addr` and (under TLS) `peer_certs` find it as usual.
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.inner.connect_info()
    }
}

impl AsyncRead for LimitedStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        self.watch.reader.register(cx.waker());
        if self.watch.is_cut() {
            return Poll::Ready(Err(cut_error()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for LimitedStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.watch.is_cut() {
            return Poll::Ready(Err(cut_error()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.watch.is_cut() {
            return Poll::Ready(Err(cut_error()));
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connections_over_the_per_address_limit_are_refused_and_slots_come_back() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limiter = Arc::new(ConnLimiter::new(100, 8));
        let mut admitted = Vec::new();
        let mut clients = Vec::new();
        for _ in 0..9 {
            clients.push(TcpStream::connect(addr).await.unwrap());
            let (s, _) = listener.accept().await.unwrap();
            if let Some(l) = limiter.admit(s) {
                admitted.push(l);
            }
        }
        assert_eq!(admitted.len(), 8);
        assert_eq!(limiter.open(), 8);
        admitted.pop();
        assert_eq!(limiter.open(), 7);
        clients.push(TcpStream::connect(addr).await.unwrap());
        let (s, _) = listener.accept().await.unwrap();
        assert!(limiter.admit(s).is_some(), "a freed slot admits the next connection");
    }

    #[tokio::test]
    async fn a_connection_holding_a_frame_past_the_stall_timeout_is_cut_and_fails_its_reads() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limiter = Arc::new(ConnLimiter::new(100, 8));
        let _client = TcpStream::connect(addr).await.unwrap();
        let (s, peer) = listener.accept().await.unwrap();
        let mut conn = limiter.admit(s).unwrap();
        let watch = limiter.watch(peer).expect("an admitted connection has a watch");

        let stall = Duration::from_millis(50);
        let frame = watch.hold();
        assert!(limiter.cut_stalled(stall).is_empty(), "a fresh frame is not stalled");
        tokio::time::sleep(Duration::from_millis(80)).await;
        drop(frame);
        assert!(limiter.cut_stalled(stall).is_empty(), "a written frame does not count");

        // A read waiting on the connection ends with an error once a stalled frame cuts it.
        let _frame = watch.hold();
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            conn.read(&mut buf).await
        });
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert_eq!(limiter.cut_stalled(stall), vec![peer]);
        let read = tokio::time::timeout(Duration::from_secs(5), reader)
            .await
            .expect("the pending read was woken")
            .unwrap();
        assert_eq!(read.unwrap_err().kind(), io::ErrorKind::ConnectionAborted);
        assert!(limiter.cut_stalled(stall).is_empty(), "a connection is cut once");
        assert!(limiter.watch(peer).is_none(), "a closed connection's watch is gone");
    }
}
