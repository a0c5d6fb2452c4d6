//! A bound on open client connections, in all and per remote address.
//!
//! Each HTTP/2 connection carries up to [`crate::MAX_STREAMS_PER_CONNECTION`] requests, so the
//! number of connections bounds a server's tasks against a caller who simply opens more of
//! them (the bytes their requests hold are bounded by [`crate::body_budget`]). A connection
//! over either limit is closed at once (the kernel's accept backlog is not left to fill up);
//! one from an address that is under its share still gets in, so servers reaching each other
//! are not locked out by a flood from elsewhere.
//!
//! Each admitted connection also has a [`ConnWatch`] (`crate::conn_watch`), found by its remote
//! address, and [`ConnLimiter::cut_stalled`] closes the connections whose watch finds them
//! stalled. A second connection from an address and port whose first is still open here (its
//! socket closed by the peer, its stream not yet dropped) is refused, so the address names one
//! watch.
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crate::conn_watch::ConnWatch;

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

    /// Admits `stream` if both limits allow one more and no connection from its address and
    /// port is still open; otherwise says why (the stream is dropped, which closes it).
    pub fn admit(self: &Arc<Self>, stream: TcpStream) -> Result<LimitedStream, Refused> {
        let peer = stream.peer_addr().map_err(|_| Refused::Gone)?;
        let ip = peer.ip();
        let mut c = self.counts();
        let from_ip = c.per_ip.get(&ip).copied().unwrap_or(0);
        if c.total >= self.max_total || from_ip >= self.max_per_ip {
            return Err(Refused::TooMany);
        }
        if c.watches.contains_key(&peer) {
            return Err(Refused::SamePort(peer));
        }
        c.total += 1;
        c.per_ip.insert(ip, from_ip + 1);
        let watch = Arc::new(ConnWatch::default());
        c.watches.insert(peer, watch.clone());
        Ok(LimitedStream {
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
        self.counts().watches.get(&peer).cloned()
    }

    /// Closes every connection that has held a reply frame unwritten for longer than `stall`
    /// (see [`ConnWatch::stalled`]); returns their remote addresses.
    pub fn cut_stalled(&self, stall: Duration) -> Vec<SocketAddr> {
        let watches: Vec<(SocketAddr, Arc<ConnWatch>)> = {
            let c = self.counts();
            c.watches.iter().map(|(a, w)| (*a, w.clone())).collect()
        };
        let now = Instant::now();
        let mut cut = Vec::new();
        for (peer, w) in watches {
            if !w.is_cut() && w.stalled(now, stall) {
                w.cut();
                cut.push(peer);
            }
        }
        cut
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.counts().total
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Gives back the place of the connection from `peer`, and its watch (the address names
    /// no other connection while this one is open: `admit` refuses a second).
    fn release(&self, peer: SocketAddr) {
        let ip = peer.ip();
        let mut c = self.counts();
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

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Over the limit in all or for its address.
    TooMany,
    /// A connection from the same address and port is still open here.
    SamePort(SocketAddr),
    /// The peer closed it before it was admitted.
    Gone,
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
        if self.watch.poll_cut(cx) {
            return Poll::Ready(Err(crate::conn_watch::cut_error()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for LimitedStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.watch.is_cut() {
            return Poll::Ready(Err(crate::conn_watch::cut_error()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.watch.is_cut() {
            return Poll::Ready(Err(crate::conn_watch::cut_error()));
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
            if let Ok(l) = limiter.admit(s) {
                admitted.push(l);
            }
        }
        assert_eq!(admitted.len(), 8);
        assert_eq!(limiter.open(), 8);
        admitted.pop();
        assert_eq!(limiter.open(), 7);
        clients.push(TcpStream::connect(addr).await.unwrap());
        let (s, _) = listener.accept().await.unwrap();
        assert!(limiter.admit(s).is_ok(), "a freed slot admits the next connection");
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

        let stall = Duration::from_millis(200);
        let frame = watch.hold();
        assert!(limiter.cut_stalled(stall).is_empty(), "a fresh frame is not stalled");
        tokio::time::sleep(Duration::from_millis(250)).await;
        drop(frame);
        assert!(limiter.cut_stalled(stall).is_empty(), "a written frame does not count");

        // A read waiting on the connection ends with an error once a stalled frame cuts it.
        let _frame = watch.hold();
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            conn.read(&mut buf).await
        });
        tokio::time::sleep(Duration::from_millis(250)).await;
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
