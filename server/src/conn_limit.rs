//! A bound on open client connections, in all and per remote address.
//!
//! Each HTTP/2 connection carries up to [`crate::MAX_STREAMS_PER_CONNECTION`] requests, so the
//! number of connections bounds a server's tasks against a caller who simply opens more of
//! them (the bytes their requests hold are bounded by [`crate::body_budget`]). A connection
//! over either limit is closed at once (the kernel's accept backlog is not left to fill up);
//! one from an address that is under its share still gets in, so servers reaching each other
//! are not locked out by a flood from elsewhere.
use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

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
        let ip = stream.peer_addr().ok()?.ip();
        let mut c = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let from_ip = c.per_ip.get(&ip).copied().unwrap_or(0);
        if c.total >= self.max_total || from_ip >= self.max_per_ip {
            return None;
        }
        c.total += 1;
        c.per_ip.insert(ip, from_ip + 1);
        Some(LimitedStream {
            inner: stream,
            _slot: Slot {
                limiter: self.clone(),
                ip,
            },
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).total
    }

    fn release(&self, ip: IpAddr) {
        let mut c = self.open.lock().unwrap_or_else(|p| p.into_inner());
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
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.limiter.release(self.ip);
    }
}

/// An admitted TCP connection; counts against the limits until dropped.
pub struct LimitedStream {
    inner: TcpStream,
    _slot: Slot,
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
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for LimitedStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
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
}
