//! A bound on request bytes a server holds before its handlers take them.
//!
//! tonic reads a request's whole message before the handler runs, and so before any token is
//! checked. A connection carries up to [`crate::MAX_STREAMS_PER_CONNECTION`] streams, and each
//! may hold a message of up to its service's limit (16 MiB and more): anyone who can reach a
//! server could make it hold far more than its memory by opening streams and never finishing
//! their messages. The connection bound ([`crate::conn_limit`]) does not help, since one
//! connection can hold gigabytes this way.
//!
//! So every byte of a request body is charged, as it arrives, against a budget per remote
//! address and one for the whole server, and given back once the message it belongs to is
//! complete and the handler asks for more (or the request ends). A byte over either budget
//! fails its request with `RESOURCE_EXHAUSTED`; other requests go on. The bytes of a complete
//! message are the handler's from then on: each handler bounds what it keeps.
use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tonic::codegen::http::Request;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

/// Request bytes a server holds at most by default. Half of it, what one remote address may
/// hold, is room for the largest Raft message and the largest commit at once.
pub const DEFAULT_BUDGET: u64 = 1 << 30;

/// The shared counts.
pub struct Budget {
    total: u64,
    per_address: u64,
    used: Mutex<Used>,
    /// When a refusal was last logged (seconds since the Unix epoch): one line a second at most.
    warned: AtomicU64,
}

#[derive(Default)]
struct Used {
    total: u64,
    per_address: HashMap<IpAddr, u64>,
}

impl Budget {
    /// A budget of `total` bytes, half of it for any one address.
    pub fn new(total: u64) -> Arc<Budget> {
        Arc::new(Budget {
            total,
            per_address: total / 2,
            used: Mutex::new(Used::default()),
            warned: AtomicU64::new(0),
        })
    }

    fn used(&self) -> std::sync::MutexGuard<'_, Used> {
        self.used.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes `n` bytes for `addr`; false (nothing taken) if either budget would be passed.
    fn charge(&self, addr: Option<IpAddr>, n: u64) -> bool {
        let mut u = self.used();
        if u.total + n > self.total {
            return false;
        }
        if let Some(a) = addr {
            let mine = u.per_address.entry(a).or_default();
            if *mine + n > self.per_address {
                if *mine == 0 {
                    u.per_address.remove(&a);
                }
                return false;
            }
            *mine += n;
        }
        u.total += n;
        true
    }

    fn release(&self, addr: Option<IpAddr>, n: u64) {
        if n == 0 {
            return;
        }
        let mut u = self.used();
        u.total = u.total.saturating_sub(n);
        if let Some(a) = addr {
            if let Some(mine) = u.per_address.get_mut(&a) {
                *mine = mine.saturating_sub(n);
                if *mine == 0 {
                    u.per_address.remove(&a);
                }
            }
        }
    }

    /// Bytes held now, in all.
    pub fn held(&self) -> u64 {
        self.used().total
    }

    fn refused(&self, addr: Option<IpAddr>) -> tonic::Status {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if self.warned.swap(now, Ordering::Relaxed) != now {
            tracing::warn!(
                address = ?addr,
                budget = self.total,
                per_address = self.per_address,
                "refused a request: request bytes held before their handlers are at the budget"
            );
        }
        tonic::Status::resource_exhausted(format!(
            "the server holds too many unfinished request bytes ({} in all, {} per address): \
             try again shortly",
            self.total, self.per_address
        ))
    }
}

/// The layer that puts every request body on the budget.
#[derive(Clone)]
pub struct BudgetLayer(pub Arc<Budget>);

impl<S> tower_layer::Layer<S> for BudgetLayer {
    type Service = Budgeted<S>;

    fn layer(&self, inner: S) -> Budgeted<S> {
        Budgeted {
            inner,
            budget: self.0.clone(),
        }
    }
}

/// The service [`BudgetLayer`] wraps around the router.
#[derive(Clone)]
pub struct Budgeted<S> {
    inner: S,
    budget: Arc<Budget>,
}

impl<S, B> tower_service::Service<Request<B>> for Budgeted<S>
where
    S: tower_service::Service<Request<Charged<B>>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let ext = req.extensions();
        let addr = ext
            .get::<TcpConnectInfo>()
            .or_else(|| ext.get::<TlsConnectInfo<TcpConnectInfo>>().map(|t| t.get_ref()))
            .and_then(|c| c.remote_addr())
            .map(|a| a.ip());
        let budget = self.budget.clone();
        self.inner.call(req.map(|inner| Charged {
            inner,
            budget,
            addr,
            charged: 0,
            framing: Framing::default(),
        }))
    }
}

/// Where a body is in its gRPC messages (each a 5-byte header with the length, then that
/// many bytes).
#[derive(Default)]
struct Framing {
    header: [u8; 5],
    /// Header bytes seen of the current message.
    have: usize,
    /// Message bytes still to come once the header is complete.
    left: usize,
    /// Bytes of the current message so far (header included).
    current: u64,
    /// Bytes of messages complete but not yet given back.
    complete: u64,
}

impl Framing {
    fn advance(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let take = if self.have < 5 {
                let take = (5 - self.have).min(data.len());
                self.header[self.have..self.have + take].copy_from_slice(&data[..take]);
                self.have += take;
                if self.have == 5 {
                    let len = [self.header[1], self.header[2], self.header[3], self.header[4]];
                    self.left = u32::from_be_bytes(len) as usize;
                }
                take
            } else {
                let take = self.left.min(data.len());
                self.left -= take;
                take
            };
            self.current += take as u64;
            data = &data[take..];
            if self.have == 5 && self.left == 0 {
                self.complete += std::mem::take(&mut self.current);
                self.have = 0;
            }
        }
    }
}

/// A request body whose bytes are on the budget until their message is taken.
pub struct Charged<B> {
    inner: B,
    budget: Arc<Budget>,
    addr: Option<IpAddr>,
    /// Bytes on the budget now.
    charged: u64,
    framing: Framing,
}

impl<B> Drop for Charged<B> {
    fn drop(&mut self) {
        self.budget.release(self.addr, self.charged);
    }
}

impl<B> Body for Charged<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        // Asked for more: the messages complete before are the handler's now.
        let done = std::mem::take(&mut this.framing.complete);
        this.budget.release(this.addr, done);
        this.charged -= done;
        let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(f))) => f,
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => return Poll::Pending,
        };
        if let Some(data) = frame.data_ref() {
            let n = data.len() as u64;
            if !this.budget.charge(this.addr, n) {
                return Poll::Ready(Some(Err(Box::new(this.budget.refused(this.addr)))));
            }
            this.charged += n;
            this.framing.advance(data);
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn message(len: usize) -> Vec<u8> {
        let mut m = vec![0u8];
        m.extend_from_slice(&(len as u32).to_be_bytes());
        m.extend(std::iter::repeat_n(7u8, len));
        m
    }

    /// A body of `frames`, each a data frame.
    fn body(frames: Vec<Vec<u8>>, budget: &Arc<Budget>) -> Charged<http_body_util::StreamBody<FrameStream>> {
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> =
            frames.into_iter().map(|f| Ok(Frame::data(Bytes::from(f)))).collect();
        Charged {
            inner: http_body_util::StreamBody::new(futures::stream::iter(frames)),
            budget: budget.clone(),
            addr: Some(IpAddr::from([127, 0, 0, 9])),
            charged: 0,
            framing: Framing::default(),
        }
    }

    type FrameStream = futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, std::convert::Infallible>>>;

    #[tokio::test]
    async fn bytes_are_held_until_their_message_is_taken_and_past_the_budget_refused() {
        let budget = Budget::new(200);
        // Two messages of 60 bytes in three frames: the first message's bytes go back when the
        // second is asked for; the budget (100 per address) is never passed.
        let two = [message(60), message(60)].concat();
        let mut b = body(
            vec![two[..40].to_vec(), two[40..100].to_vec(), two[100..].to_vec()],
            &budget,
        );
        b.frame().await.unwrap().unwrap();
        assert_eq!(budget.held(), 40);
        b.frame().await.unwrap().unwrap();
        assert_eq!(budget.held(), 100, "65 bytes of the first message and 35 of the second");
        b.frame().await.unwrap().unwrap();
        assert_eq!(budget.held(), 35 + 30, "the first message went back");
        assert!(b.frame().await.is_none());
        drop(b);
        assert_eq!(budget.held(), 0, "all back at the end");

        // A message of 150 bytes passes the 100 an address may hold: refused, nothing kept.
        let mut big = body(vec![message(150)[..90].to_vec(), message(150)[90..].to_vec()], &budget);
        big.frame().await.unwrap().unwrap();
        let err = big.frame().await.unwrap().expect_err("over the budget");
        let status = tonic::Status::from_error(err);
        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
        // Another address still has room while that one holds 90.
        let mut other = body(vec![message(10)], &budget);
        other.addr = Some(IpAddr::from([127, 0, 0, 10]));
        other.frame().await.unwrap().unwrap();
        assert_eq!(budget.held(), 90 + 15);
        drop((big, other));
        assert_eq!(budget.held(), 0);
    }

    #[test]
    fn framing_counts_messages_split_anywhere() {
        let data = [message(0), message(3), message(300)].concat();
        for cut in 0..data.len() {
            let mut f = Framing::default();
            f.advance(&data[..cut]);
            f.advance(&data[cut..]);
            assert_eq!(f.complete, data.len() as u64, "cut at {cut}");
            assert_eq!((f.have, f.current), (0, 0));
        }
    }
}
