//! A bound on request bytes a server holds before its handlers take them.
//!
//! tonic reads a request's whole message before the handler runs, and so before any token is
//! checked. A connection carries up to [`crate::MAX_STREAMS_PER_CONNECTION`] streams, and each
//! may hold a message of up to its service's limit (16 MiB and more): anyone who can reach a
//! server could make it hold far more than its memory by opening streams and never finishing
//! their messages. The connection bound ([`crate::conn_limit`]) does not help, since one
//! connection can hold gigabytes this way.
//!
//! So every byte of a request body is charged, as it arrives, against the server's budget and
//! against the share of whoever sends it. Who that is comes from the request's headers, which
//! arrive before its body ([`Sender`]):
//! - an **account**, for a request with a valid token (whether the account may do
//!   what it asks is the handler's business): a quarter of the budget per account. An account
//!   that abuses it is known by name, and its tokens can be revoked;
//! - a **server** of the cluster (a member's certificate; on an `--insecure` cluster, every
//!   caller without a token, since nobody can be told apart there): a quarter per address;
//! - a **stranger**, anyone else: strangers together hold at most an eighth of the budget,
//!   each address (IPv6: each /64) a sixty-fourth. A stranger's legitimate requests are small
//!   reads of public volumes; strangers flooding a server from many addresses can make other
//!   strangers' requests fail, but never an account's or a server's. Web nodes that must keep
//!   reading through such a flood log in (any account will do).
//!
//! The bytes of a complete message are given back when more of the request arrives (a
//! stream's next message: the handler took the one before) or when the request ends; a request
//! of one message stays charged until its stream ends, since tonic holds the message until
//! then. A byte over the budget or the sender's share fails its request with
//! `RESOURCE_EXHAUSTED`, and a request that holds bytes and sends nothing for [`STALL`] fails
//! too, so a caller cannot keep the budget by going quiet. Raft messages are not charged: the
//! Raft service refuses every caller but a member from its headers, before any body is read
//! (`grpc::raft::peers_only`), and Raft must go on while others fill the budget.
//!
//! Replies the callers have not read yet are charged to a budget of the same size, shared out
//! the same way ([`crate::reply_budget`]): the layer gives each request a charge on it, and its
//! response body the means to give it back.
use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tonic::codegen::http::{HeaderMap, Request, Response};
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::transport::CertificateDer;

use crate::conn_limit::ConnLimiter;
use crate::conn_watch::ConnRef;
use crate::reply_budget::{Replied, ReplyCharge, ReplyFuture};

/// Request bytes a server holds at most by default. A quarter of it, what one account or
/// server may hold, is room for the largest commit and a mount's blob uploads at once (Raft
/// messages are not charged).
pub const DEFAULT_BUDGET: u64 = 1 << 30;

/// How long a request holding charged bytes may send nothing before it fails.
pub const STALL: std::time::Duration = std::time::Duration::from_secs(30);

/// Requests under this path are not charged (see the module doc).
const UNCHARGED: &str = "/codafs.v1.Raft/";

/// Who sends a request, as its headers show (see the module doc).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sender {
    /// A valid token of this account (signed, not expired, not revoked).
    Account(String),
    /// A server of the cluster (or, on an `--insecure` cluster, any caller without a token).
    Server,
    /// Anyone else.
    Stranger,
}

/// Tells a request's [`Sender`] from its headers and the certificates its caller presented.
pub type Classify = Arc<dyn Fn(&HeaderMap, Option<&[CertificateDer<'static>]>) -> Sender + Send + Sync>;

/// Whose share a request's bytes count against.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Holder {
    Account(Arc<str>),
    Server(IpAddr),
    /// A stranger's address (an IPv6 address's /64: one host commonly holds all of it).
    Stranger(IpAddr),
}

impl Holder {
    pub(crate) fn of(sender: Sender, addr: Option<IpAddr>) -> Option<Holder> {
        match sender {
            Sender::Account(user) => Some(Holder::Account(user.into())),
            Sender::Server => addr.map(Holder::Server),
            Sender::Stranger => Some(Holder::Stranger(addr.map_or(IpAddr::from([0, 0, 0, 0]), network_of))),
        }
    }
}

/// `addr` itself for IPv4, its /64 for IPv6.
fn network_of(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(_) => addr,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

/// The shared counts.
pub struct Budget {
    total: u64,
    /// What one account or one server may hold.
    per_holder: u64,
    /// What all strangers together may hold, and each of them.
    strangers: u64,
    per_stranger: u64,
    used: Mutex<Used>,
    /// When a refusal was last logged (seconds since the Unix epoch): one line a second at most.
    warned: AtomicU64,
    /// Who waits for room ([`Budget::take`]), by holder: a release wakes its own holder's
    /// waiters only, unless it may also have made room under the total or the strangers' part.
    waiters: Mutex<HashMap<Option<Holder>, Waiters>>,
    /// How many wait for room now (releases wake no one when none does).
    waiting: AtomicUsize,
    /// Numbers waiters.
    tickets: AtomicU64,
}

/// One holder's waiters for room, in arrival order: each a ticket and its own wake-up. Only
/// the first may take room (first come, first served: a large reply is not passed over by
/// smaller ones taking each byte that goes back), and only it is woken by a release; when it
/// is done, the next is woken.
#[derive(Default)]
struct Waiters {
    queue: std::collections::VecDeque<(u64, Arc<tokio::sync::Notify>)>,
}

/// Most waiters for room one holder may have; past it, a request is refused at once.
pub const MAX_WAITERS_PER_HOLDER: usize = 1024;

#[derive(Default)]
struct Used {
    total: u64,
    strangers: u64,
    by_holder: HashMap<Holder, u64>,
}

impl Budget {
    /// A budget of `total` bytes: a quarter of it for any one account or server, an eighth for
    /// all strangers together and a sixty-fourth for each.
    pub fn new(total: u64) -> Arc<Budget> {
        Arc::new(Budget {
            total,
            per_holder: total / 4,
            strangers: total / 8,
            per_stranger: total / 64,
            used: Mutex::new(Used::default()),
            warned: AtomicU64::new(0),
            waiters: Mutex::new(HashMap::new()),
            waiting: AtomicUsize::new(0),
            tickets: AtomicU64::new(0),
        })
    }

    fn used(&self) -> std::sync::MutexGuard<'_, Used> {
        self.used.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What `holder` may hold.
    fn share(&self, holder: &Holder) -> u64 {
        match holder {
            Holder::Stranger(_) => self.per_stranger,
            _ => self.per_holder,
        }
    }

    /// [`Budget::charge`], waiting up to `limit` for bytes to go back while there is no room,
    /// behind the holder's earlier waiters (false at once if it already has
    /// [`MAX_WAITERS_PER_HOLDER`] waiting).
    pub(crate) async fn take(&self, holder: Option<&Holder>, n: u64, limit: std::time::Duration) -> bool {
        if self.try_charge(holder, n) {
            return true;
        }
        let deadline = tokio::time::Instant::now() + limit;
        let ticket = self.tickets.fetch_add(1, Ordering::Relaxed);
        let me = Arc::new(tokio::sync::Notify::new());
        {
            let mut w = self.waiters();
            let e = w.entry(holder.cloned()).or_default();
            if e.queue.len() >= MAX_WAITERS_PER_HOLDER {
                return false;
            }
            e.queue.push_back((ticket, me.clone()));
        }
        // Counted before the next attempt: a release after a failed attempt then wakes it.
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let _queued = Waiting {
            budget: self,
            holder,
            ticket,
        };
        loop {
            if self.first(holder, ticket) && self.charge(holder, n) {
                return true;
            }
            // A wake-up given meanwhile is kept (`notify_one`), so none is lost.
            if tokio::time::timeout_at(deadline, me.notified()).await.is_err() {
                return false;
            }
        }
    }

    fn waiters(&self) -> std::sync::MutexGuard<'_, HashMap<Option<Holder>, Waiters>> {
        self.waiters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// [`Budget::charge`] unless `holder` has waiters (room goes to them first).
    pub(crate) fn try_charge(&self, holder: Option<&Holder>, n: u64) -> bool {
        !self.queued(holder) && self.charge(holder, n)
    }

    /// `n`, or `holder`'s whole share if less (a caller without a holder: an account's).
    pub(crate) fn capped(&self, holder: Option<&Holder>, n: u64) -> u64 {
        n.min(holder.map_or(self.per_holder, |h| self.share(h)))
    }

    /// Whether `holder` has waiters (a new take then waits behind them).
    fn queued(&self, holder: Option<&Holder>) -> bool {
        self.waiting.load(Ordering::SeqCst) > 0 && self.waiters().contains_key(&holder.cloned())
    }

    /// Whether `ticket` is the first of `holder`'s waiters.
    fn first(&self, holder: Option<&Holder>, ticket: u64) -> bool {
        let w = self.waiters();
        w.get(&holder.cloned())
            .and_then(|e| e.queue.front())
            .is_some_and(|(t, _)| *t == ticket)
    }

    /// Wakes the waiters a release of `holder`'s bytes may have made room for: the first of
    /// its own; and the first of everyone's if the total was within a share of its bound
    /// before (a waiter may have waited on it), or of the strangers' if their part was within
    /// a stranger's share of its.
    fn wake(&self, holder: Option<&Holder>, (total_before, strangers_before): (u64, u64)) {
        if self.waiting.load(Ordering::SeqCst) == 0 {
            return;
        }
        // A share is at most `per_holder` (a stranger's is smaller).
        let all = total_before + self.per_holder > self.total;
        let strangers =
            matches!(holder, Some(Holder::Stranger(_))) && strangers_before + self.per_stranger > self.strangers;
        let w = self.waiters();
        let wake_first = |e: &Waiters| {
            if let Some((_, n)) = e.queue.front() {
                n.notify_one();
            }
        };
        if all || strangers {
            for (h, e) in w.iter() {
                if all || matches!(h, Some(Holder::Stranger(_))) {
                    wake_first(e);
                }
            }
        } else if let Some(e) = w.get(&holder.cloned()) {
            wake_first(e);
        }
    }

    /// Takes `n` bytes for `holder`; false (nothing taken) if the budget or a share would be
    /// passed.
    pub(crate) fn charge(&self, holder: Option<&Holder>, n: u64) -> bool {
        if n == 0 {
            return true;
        }
        let mut u = self.used();
        if u.total + n > self.total {
            return false;
        }
        let stranger = matches!(holder, Some(Holder::Stranger(_)));
        if stranger && u.strangers + n > self.strangers {
            return false;
        }
        if let Some(h) = holder {
            let mine = u.by_holder.get(h).copied().unwrap_or(0);
            if mine + n > self.share(h) {
                return false;
            }
            u.by_holder.insert(h.clone(), mine + n);
        }
        if stranger {
            u.strangers += n;
        }
        u.total += n;
        true
    }

    pub(crate) fn release(&self, holder: Option<&Holder>, n: u64) {
        if n == 0 {
            return;
        }
        let before = self.give_back(holder, n);
        self.wake(holder, before);
    }

    /// Gives back `n` bytes of `holder`'s; returns the total and the strangers' part before.
    fn give_back(&self, holder: Option<&Holder>, n: u64) -> (u64, u64) {
        let mut u = self.used();
        let before = (u.total, u.strangers);
        u.total = u.total.saturating_sub(n);
        if let Some(h) = holder {
            if matches!(h, Holder::Stranger(_)) {
                u.strangers = u.strangers.saturating_sub(n);
            }
            if let Some(mine) = u.by_holder.get_mut(h) {
                *mine = mine.saturating_sub(n);
                if *mine == 0 {
                    u.by_holder.remove(h);
                }
            }
        }
        before
    }

    /// Bytes held now, in all.
    pub fn held(&self) -> u64 {
        self.used().total
    }

    /// The refusal of a request whose bytes found no room.
    fn refused(&self, holder: Option<&Holder>) -> tonic::Status {
        self.refused_for(holder, "unfinished request bytes", "try again shortly")
    }

    /// The refusal of bytes (`what`) past the budget or `holder`'s share, with advice.
    pub(crate) fn refused_for(&self, holder: Option<&Holder>, what: &str, advice: &str) -> tonic::Status {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if self.warned.swap(now, Ordering::Relaxed) != now {
            tracing::warn!(
                sender = ?holder,
                budget = self.total,
                what,
                "refused a request: bytes held for callers are at the budget"
            );
        }
        let share = match holder {
            Some(Holder::Stranger(_)) => format!(
                "{} for each caller without a token, {} for all of them",
                self.per_stranger, self.strangers
            ),
            _ => format!("{} for each account or server", self.per_holder),
        };
        tonic::Status::resource_exhausted(format!(
            "the server holds too many {what} ({} in all, {share}): {advice}",
            self.total
        ))
    }
}

/// One waiter of [`Budget::take`] while it lives (the wait can be cancelled): when it goes,
/// it leaves the queue, and the next waiter is woken (there may be room for it too).
struct Waiting<'a> {
    budget: &'a Budget,
    holder: Option<&'a Holder>,
    ticket: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut w = self.budget.waiters();
        let key = self.holder.cloned();
        if let Some(e) = w.get_mut(&key) {
            e.queue.retain(|(t, _)| *t != self.ticket);
            match e.queue.front() {
                Some((_, next)) => next.notify_one(),
                None => {
                    w.remove(&key);
                }
            }
        }
        self.budget.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The layer that puts every request body on the budget, and gives each request a charge
/// on the reply budget (`crate::reply_budget`).
#[derive(Clone)]
pub struct BudgetLayer {
    pub budget: Arc<Budget>,
    /// Reply bytes callers have not read yet: a budget of its own, shared out the same way.
    pub replies: Arc<Budget>,
    pub classify: Classify,
    /// The open connections, whose watches a reply's frames register on (see
    /// `crate::conn_watch`).
    pub conns: Arc<ConnLimiter>,
}

impl<S> tower_layer::Layer<S> for BudgetLayer {
    type Service = Budgeted<S>;

    fn layer(&self, inner: S) -> Budgeted<S> {
        Budgeted {
            inner,
            budget: self.budget.clone(),
            replies: self.replies.clone(),
            classify: self.classify.clone(),
            conns: self.conns.clone(),
        }
    }
}

/// The service [`BudgetLayer`] wraps around the router.
#[derive(Clone)]
pub struct Budgeted<S> {
    inner: S,
    budget: Arc<Budget>,
    replies: Arc<Budget>,
    classify: Classify,
    conns: Arc<ConnLimiter>,
}

impl<S, B, RB> tower_service::Service<Request<B>> for Budgeted<S>
where
    S: tower_service::Service<Request<Charged<B>>, Response = Response<RB>>,
{
    type Response = Response<Replied<RB>>;
    type Error = S::Error;
    type Future = ReplyFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let charged = !req.uri().path().starts_with(UNCHARGED);
        let (holder, peer) = if charged {
            let ext = req.extensions();
            let tls = ext.get::<TlsConnectInfo<TcpConnectInfo>>();
            let peer = ext
                .get::<TcpConnectInfo>()
                .or_else(|| tls.map(|t| t.get_ref()))
                .and_then(|c| c.remote_addr());
            let certs = tls.and_then(|t| t.peer_certs());
            let sender = (self.classify)(req.headers(), certs.as_deref().map(|c| &c[..]));
            (Holder::of(sender, peer.map(|a| a.ip())), peer)
        } else {
            (None, None)
        };
        let budget = charged.then(|| self.budget.clone());
        // The handler finds the reply's charge in the request (`reply_budget::of`); the reply's
        // body holds it until the reply is sent.
        let reply = charged.then(|| {
            let conn = peer.map(|p| ConnRef::new(self.conns.clone(), p));
            ReplyCharge::new(self.replies.clone(), holder.clone(), conn)
        });
        if let Some(r) = &reply {
            req.extensions_mut().insert(r.clone());
        }
        ReplyFuture::new(
            self.inner.call(req.map(|inner| Charged {
                inner,
                budget,
                holder,
                charged: 0,
                framing: Framing::default(),
                idle: None,
            })),
            reply,
        )
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
    holder: Option<Holder>,
    /// Bytes on the budget now.
    charged: u64,
    framing: Framing,
    /// Running while bytes are charged and nothing arrives.
    idle: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<B> Charged<B> {
    fn release(&mut self, n: u64) {
        if let Some(b) = &self.budget {
            b.release(self.holder.as_ref(), n);
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
        if !budget.charge(this.holder.as_ref(), n) {
            return Poll::Ready(Some(Err(Box::new(budget.refused(this.holder.as_ref())))));
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
            holder: Some(Holder::Server(IpAddr::from([127, 0, 0, 9]))),
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
        other.holder = Some(Holder::Server(IpAddr::from([127, 0, 0, 10])));
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

    /// Strangers share an eighth of the budget, each address (each IPv6 /64) a sixty-fourth;
    /// accounts and servers a quarter each, whatever strangers hold.
    #[test]
    fn strangers_share_a_small_part_and_cannot_crowd_out_accounts() {
        let b = Budget::new(6400);
        let stranger = |last: u8| Holder::of(Sender::Stranger, Some(IpAddr::from([10, 0, 0, last])));
        // Each stranger 100 bytes, all of them 800.
        assert!(b.charge(stranger(1).as_ref(), 100));
        assert!(!b.charge(stranger(1).as_ref(), 1), "one stranger's share is full");
        for last in 2..=8 {
            assert!(b.charge(stranger(last).as_ref(), 100), "stranger {last}");
        }
        assert!(!b.charge(stranger(9).as_ref(), 1), "all strangers' part is full");
        // Two addresses of one IPv6 /64 are one stranger.
        let v6 = |s: &str| Holder::of(Sender::Stranger, Some(s.parse().unwrap()));
        b.release(stranger(8).as_ref(), 100);
        assert!(b.charge(v6("2001:db8::1").as_ref(), 60));
        assert!(!b.charge(v6("2001:db8::2").as_ref(), 60), "same /64");
        assert!(b.charge(v6("2001:db8:0:1::2").as_ref(), 40), "another /64");
        // Accounts and servers still have their quarters.
        let alice = Holder::of(Sender::Account("alice".into()), Some(IpAddr::from([10, 0, 0, 1])));
        let server = Holder::of(Sender::Server, Some(IpAddr::from([10, 0, 0, 2])));
        assert!(b.charge(alice.as_ref(), 1600));
        assert!(!b.charge(alice.as_ref(), 1), "an account's quarter is full");
        assert!(b.charge(server.as_ref(), 1600));
        assert_eq!(b.held(), 800 + 3200);
        // Given back, the part strangers hold is free again.
        for last in 1..=7 {
            b.release(stranger(last).as_ref(), 100);
        }
        b.release(v6("2001:db8::1").as_ref(), 60);
        b.release(v6("2001:db8:0:1::").as_ref(), 40);
        assert!(b.charge(stranger(9).as_ref(), 100));
        assert_eq!(b.held(), 100 + 3200);
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
