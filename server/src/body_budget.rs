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
//! address and one for the whole server. The bytes of a complete message are given back when
//! more of the request arrives (a stream's next message: the handler took the one before) or
//! when the request ends; a request of one message stays charged until its stream ends, since
//! tonic holds the message until then. A byte over either budget fails its request with
//! `RESOURCE_EXHAUSTED`, and a request that holds bytes and sends nothing for [`STALL`] fails
//! too, so a caller cannot keep the budget by going quiet. Raft messages are not charged: the
//! Raft service refuses every caller but a member from its headers, before any body is read
//! (`grpc::raft::peers_only`), and Raft must go on while others fill the budget.
use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tonic::codegen::http::Request;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

/// Request bytes a server holds at most by default. A quarter of it, what one remote address
/// may hold, is room for the largest commit and a mount's blob uploads at once (Raft messages
/// are not charged), and no fewer than four addresses can fill it.
pub const DEFAULT_BUDGET: u64 = 1 << 30;

/// How long a request holding charged bytes may send nothing before it fails.
pub const STALL: std::time::Duration = std::time::Duration::from_secs(30);

/// Requests under this path are not charged (see the module doc).
const UNCHARGED: &str = "/codafs.v1.Raft/";

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
    /// A budget of `total` bytes, a quarter of it for any one address.
    pub fn new(total: u64) -> Arc<Budget> {
        Arc::new(Budget {
            total,
            per_address: total / 4,
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
        let budget = (!req.uri().path().starts_with(UNCHARGED)).then(|| self.budget.clone());
        self.inner.call(req.map(|inner| Charged {
            inner,
            budget,
            addr,
            charged: 0,
            framing: Framing::default(),
            idle: None,
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
    /// `None`: not charged.
    budget: Option<Arc<Budget>>,
    addr: Option<IpAddr>,
    /// Bytes on the budget now.
    charged: u64,
    framing: Framing,
    /// Running while bytes are charged and nothing arrives.
    idle: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<B> Charged<B> {
    fn release(&mut self, n: u64) {
        if let Some(b) = &self.budget {
            b.release(self.addr, n);
        }
        self.charged -= n;
    }
}

impl<B> Drop for Charged<B> {
    fn drop(&mut self) {
        self.release(self.charged);
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
        let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(f))) => f,
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => {
                this.release(this.charged);
                return Poll::Ready(None);
            }
            Poll::Pending => {
                if this.charged == 0 {
                    return Poll::Pending;
                }
                let idle = this.idle.get_or_insert_with(|| Box::pin(tokio::time::sleep(STALL)));
                if idle.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                let held = this.charged;
                this.release(held);
                return Poll::Ready(Some(Err(Box::new(tonic::Status::resource_exhausted(format!(
                    "the request held {held} bytes and sent nothing for {} s",
                    STALL.as_secs()
                ))))));
            }
        };
        this.idle = None;
        let (Some(data), Some(budget)) = (frame.data_ref(), this.budget.clone()) else {
            return Poll::Ready(Some(Ok(frame)));
        };
        // More of the request: the messages complete before it are the handler's now.
        let done = std::mem::take(&mut this.framing.complete);
        this.release(done);
        let n = data.len() as u64;
        if !budget.charge(this.addr, n) {
            return Poll::Ready(Some(Err(Box::new(budget.refused(this.addr)))));
        }
        this.charged += n;
        this.framing.advance(data);
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

    type Frames = Vec<Result<Frame<Bytes>, std::convert::Infallible>>;
    type FrameStream = futures::stream::Chain<
        futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, std::convert::Infallible>>>,
        futures::stream::BoxStream<'static, Result<Frame<Bytes>, std::convert::Infallible>>,
    >;

    /// A body of `frames`, each a data frame, that ends after them or (`open`) stays open.
    fn body(
        frames: Vec<Vec<u8>>,
        budget: &Arc<Budget>,
        open: bool,
    ) -> Charged<http_body_util::StreamBody<FrameStream>> {
        use futures::StreamExt;
        let frames: Frames = frames.into_iter().map(|f| Ok(Frame::data(Bytes::from(f)))).collect();
        let rest = if open {
            futures::stream::pending().boxed()
        } else {
            futures::stream::empty().boxed()
        };
        Charged {
            inner: http_body_util::StreamBody::new(futures::stream::iter(frames).chain(rest)),
            budget: Some(budget.clone()),
            addr: Some(IpAddr::from([127, 0, 0, 9])),
            charged: 0,
            framing: Framing::default(),
            idle: None,
        }
    }

    #[tokio::test]
    async fn bytes_are_held_until_their_message_is_taken_and_past_the_budget_refused() {
        let budget = Budget::new(400);
        // Two messages of 60 bytes in three frames: the first message's bytes go back when more
        // of the stream arrives; the budget (100 per address) is never passed.
        let two = [message(60), message(60)].concat();
        let frames = vec![two[..40].to_vec(), two[40..100].to_vec(), two[100..].to_vec()];
        let mut b = body(frames, &budget, false);
        b.frame().await.unwrap().unwrap();
        assert_eq!(budget.held(), 40);
        b.frame().await.unwrap().unwrap();
        assert_eq!(budget.held(), 100, "65 bytes of the first message and 35 of the second");
        b.frame().await.unwrap().unwrap();
        assert_eq!(budget.held(), 35 + 30, "the first message went back");
        assert!(b.frame().await.is_none());
        assert_eq!(budget.held(), 0, "all back at the end");
        drop(b);
        assert_eq!(budget.held(), 0);

        // A message of 150 bytes passes the 100 an address may hold: refused, nothing kept.
        let big = message(150);
        let mut big = body(vec![big[..90].to_vec(), big[90..].to_vec()], &budget, false);
        big.frame().await.unwrap().unwrap();
        let err = big.frame().await.unwrap().expect_err("over the budget");
        let status = tonic::Status::from_error(err);
        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
        // Another address still has room while that one holds 90.
        let mut other = body(vec![message(10)], &budget, false);
        other.addr = Some(IpAddr::from([127, 0, 0, 10]));
        other.frame().await.unwrap().unwrap();
        assert_eq!(budget.held(), 90 + 15);
        drop((big, other));
        assert_eq!(budget.held(), 0);
    }

    /// A whole message whose stream stays open stays charged (tonic holds it until the stream
    /// ends), and a request that holds bytes and sends nothing fails after `STALL`.
    #[tokio::test(start_paused = true)]
    async fn a_quiet_request_keeps_its_charge_only_until_it_stalls() {
        let budget = Budget::new(400);
        let mut b = body(vec![message(50)], &budget, true);
        b.frame().await.unwrap().unwrap();
        let next = tokio::time::timeout(STALL / 2, b.frame()).await;
        assert!(next.is_err(), "nothing more arrives");
        assert_eq!(budget.held(), 55, "the whole message stays charged");
        let err = b.frame().await.unwrap().expect_err("stalled");
        let status = tonic::Status::from_error(err);
        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
        assert!(status.message().contains("sent nothing"), "{status:?}");
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
