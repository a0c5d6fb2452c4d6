//! A bound on reply bytes a server holds for callers that have not read them yet.
//!
//! A blob read (`Get`, `GetSmall`: up to 4 MiB a reply) or a listing page is made in the
//! server's memory and then waits there until its caller grants HTTP/2 window for it: hyper
//! hands a reply's frames to h2 as soon as the stream has a byte of window, and h2 keeps them
//! until they are written. A caller that asks and never reads made a server hold 4 MiB per
//! stream, 256 streams per connection, and a `Get` held a blocking thread for a minute on top.
//!
//! So the handlers that make large replies take the reply's bytes from the reply budget (the
//! size of the request budget, [`crate::body_budget`], shared out the same way: a quarter per
//! account or server, a sixty-fourth per stranger) before they read them from disk. The charge
//! goes with the bytes: each frame of the reply carries its part of it, and gives it back when
//! h2 drops the frame, which is once it is written to the connection, or the stream or
//! connection is gone. A handler that finds no room waits for some, up to [`REPLY_WAIT`]
//! and holding nothing uncharged meanwhile: a caller that reads what it asked for is at most
//! slowed, one that does not gets `RESOURCE_EXHAUSTED`.
//!
//! Nothing in h2 ends a reply that is never read: it keeps the frames while the connection
//! lives. So each charged frame is also registered on its connection's watch
//! ([`crate::conn_watch`]) until h2 drops it, and a connection that leaves one unwritten past
//! the stall timeout (`--reply-stall-timeout`, 120 s by default) while writing next to nothing
//! is closed, which gives its share back. The share bounds how much a caller that does not
//! read holds; the timeout bounds how long.
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tonic::codegen::http::Response;

use crate::body_budget::{Budget, Holder};
use crate::conn_watch::{ConnRef, HeldFrame};

/// How long a handler waits for room for its reply before refusing it.
pub const REPLY_WAIT: Duration = Duration::from_secs(10);

/// What a refusal says is full, and what to do.
const REPLY_BYTES: &str = "reply bytes its callers have not read";
const REPLY_ADVICE: &str = "read the replies already asked for before asking more";

/// The reply bytes one request holds on the budget (none when it is not charged: Raft, and
/// handlers called without the layer).
pub struct ReplyCharge {
    budget: Option<Arc<Budget>>,
    holder: Option<Holder>,
    held: AtomicU64,
    /// The connection the reply goes out on, which watches for frames left unwritten.
    conn: Option<ConnRef>,
}

impl ReplyCharge {
    pub(crate) fn new(budget: Arc<Budget>, holder: Option<Holder>, conn: Option<ConnRef>) -> Arc<ReplyCharge> {
        Arc::new(ReplyCharge {
            budget: Some(budget),
            holder,
            held: AtomicU64::new(0),
            conn,
        })
    }

    /// A charge that takes nothing.
    pub fn none() -> Arc<ReplyCharge> {
        Arc::new(ReplyCharge {
            budget: None,
            holder: None,
            held: AtomicU64::new(0),
            conn: None,
        })
    }

    /// Takes `n` bytes for the reply if there is room now and none of this caller's replies
    /// waits for room (they come first). A reply larger than the caller's whole share takes
    /// the share (it could never be sent otherwise), here and in [`ReplyCharge::take`].
    pub fn try_take(&self, n: u64) -> bool {
        let Some(budget) = &self.budget else { return true };
        let n = budget.capped(self.holder.as_ref(), n);
        self.hold_if(budget.try_charge(self.holder.as_ref(), n), n)
    }

    /// Counts `n` bytes as held by this charge if `charged` (the budget took them); returns
    /// `charged`.
    fn hold_if(&self, charged: bool, n: u64) -> bool {
        if charged {
            self.held.fetch_add(n, Ordering::AcqRel);
        }
        charged
    }

    /// Takes `n` bytes for the reply (capped as in [`ReplyCharge::try_take`]), waiting up to
    /// [`REPLY_WAIT`] for room, behind this caller's earlier waiting replies; returns the bytes
    /// taken.
    pub async fn take(&self, n: u64) -> Result<u64, tonic::Status> {
        let Some(budget) = &self.budget else { return Ok(n) };
        let n = budget.capped(self.holder.as_ref(), n);
        if !self.hold_if(budget.take(self.holder.as_ref(), n, REPLY_WAIT).await, n) {
            return Err(budget.refused_for(self.holder.as_ref(), REPLY_BYTES, REPLY_ADVICE));
        }
        Ok(n)
    }

    /// Takes the bytes of a reply that came out at `actual` bytes where `taken` were taken for
    /// it: the rest if there is room now (refused otherwise: it is not waited for while the reply
    /// is in memory; take a margin), or gives back the difference.
    /// The rest is taken ahead of any waiting reply: this one is already in memory, and is not
    /// held uncharged behind them.
    pub fn settle(&self, taken: u64, actual: u64) -> Result<(), tonic::Status> {
        let Some(budget) = &self.budget else { return Ok(()) };
        match actual.checked_sub(taken) {
            Some(more) if !self.hold_if(budget.charge(self.holder.as_ref(), more), more) => {
                Err(budget.refused_for(self.holder.as_ref(), REPLY_BYTES, REPLY_ADVICE))
            }
            Some(_) => Ok(()),
            None => {
                let n = self.detach(taken - actual);
                self.release(n);
                Ok(())
            }
        }
    }

    /// Takes up to `n` of the bytes held off this charge, for a frame to carry.
    fn detach(&self, n: u64) -> u64 {
        let mut cur = self.held.load(Ordering::Acquire);
        loop {
            let k = n.min(cur);
            if k == 0 {
                return 0;
            }
            match self
                .held
                .compare_exchange(cur, cur - k, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return k,
                Err(now) => cur = now,
            }
        }
    }

    /// Gives back `n` bytes detached from this charge.
    fn release(&self, n: u64) {
        if let Some(b) = &self.budget {
            b.release(self.holder.as_ref(), n);
        }
    }

    /// Bytes held now.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Acquire)
    }
}

impl Drop for ReplyCharge {
    fn drop(&mut self) {
        let rest = *self.held.get_mut();
        self.release(rest);
    }
}

/// The reply charge of request `req` (one that takes nothing if the request has none).
pub fn of<T>(req: &tonic::Request<T>) -> Arc<ReplyCharge> {
    req.extensions()
        .get::<Arc<ReplyCharge>>()
        .cloned()
        .unwrap_or_else(ReplyCharge::none)
}

/// The response future of [`crate::body_budget::Budgeted`]: the response, with its body holding
/// the reply's charge.
pub struct ReplyFuture<F> {
    inner: Pin<Box<F>>,
    charge: Option<Arc<ReplyCharge>>,
}

impl<F> ReplyFuture<F> {
    pub(crate) fn new(inner: F, charge: Option<Arc<ReplyCharge>>) -> Self {
        ReplyFuture {
            inner: Box::pin(inner),
            charge,
        }
    }
}

impl<F, B, E> Future for ReplyFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<Replied<B>>, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let r = std::task::ready!(this.inner.as_mut().poll(cx));
        let charge = this.charge.take();
        Poll::Ready(r.map(|resp| resp.map(|inner| Replied { inner, charge })))
    }
}

/// A reply body whose data frames carry the reply's charge (see the module doc).
pub struct Replied<B> {
    inner: B,
    charge: Option<Arc<ReplyCharge>>,
}

/// The bytes of one frame with their part of the charge, given back when h2 drops them; until
/// then the frame counts as unwritten on its connection's watch.
struct FrameBytes {
    data: Bytes,
    charge: Arc<ReplyCharge>,
    n: u64,
    _watched: Option<HeldFrame>,
}

impl AsRef<[u8]> for FrameBytes {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl Drop for FrameBytes {
    fn drop(&mut self) {
        self.charge.release(self.n);
    }
}

impl<B> Body for Replied<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let r = std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx));
        let (Some(Ok(frame)), Some(charge)) = (r.as_ref(), &this.charge) else {
            return Poll::Ready(r);
        };
        let Some(data) = frame.data_ref() else {
            return Poll::Ready(r);
        };
        let n = charge.detach(data.len() as u64);
        if n == 0 {
            return Poll::Ready(r);
        }
        let owned = FrameBytes {
            data: data.clone(),
            charge: charge.clone(),
            n,
            _watched: charge.conn.as_ref().and_then(|c| c.hold()),
        };
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_owner(owned)))))
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
    use crate::body_budget::Sender;
    use http_body_util::BodyExt;

    fn holder(last: u8) -> Option<Holder> {
        Holder::of(Sender::Server, Some(std::net::IpAddr::from([127, 0, 0, last])))
    }

    /// A reply's bytes stay charged while any part of them is held, by the handler or by a
    /// frame h2 has not written yet; a caller past its share waits for room, and is refused if
    /// none comes; other callers keep theirs.
    #[tokio::test(start_paused = true)]
    async fn reply_bytes_are_held_until_written_and_a_full_share_waits_then_refuses() {
        let budget = Budget::new(400);
        let c = ReplyCharge::new(budget.clone(), holder(9), None);
        c.take(60).await.expect("room");
        c.take(40).await.expect("room for the whole share");
        assert_eq!((budget.held(), c.held()), (100, 100));
        // The share (100) is full: a third take waits, and gets room when bytes go back.
        let waiter = {
            let c = c.clone();
            tokio::spawn(async move { c.take(50).await })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!waiter.is_finished(), "waits for room");
        let frames = vec![Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(vec![
            1u8;
            60
        ])))];
        let mut body = Replied {
            inner: http_body_util::StreamBody::new(futures::stream::iter(frames)),
            charge: Some(c.clone()),
        };
        let frame = body.frame().await.expect("a frame").expect("data");
        assert!(body.frame().await.is_none(), "the reply ended");
        drop(body);
        assert_eq!(budget.held(), 100, "the frame is not written yet: still charged");
        assert_eq!(frame.data_ref().map(|d| d.len()), Some(60));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!waiter.is_finished(), "still no room");
        drop(frame);
        waiter
            .await
            .expect("joins")
            .expect("the waiter got the room the frame gave back");
        assert_eq!(budget.held(), 90);
        // Another caller is not held up by this one's share.
        let other = ReplyCharge::new(budget.clone(), holder(10), None);
        other.take(100).await.expect("its own share");
        // No room within REPLY_WAIT: refused, nothing taken.
        let err = c.take(20).await.expect_err("the share stays full");
        assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
        assert!(err.message().contains("not read"), "{err:?}");
        assert_eq!(budget.held(), 190);
        // A reply larger than the share takes the share; everything goes back with the charges.
        drop(c);
        let big = ReplyCharge::new(budget.clone(), holder(11), None);
        big.take(1000).await.expect("a whole share");
        assert_eq!(big.held(), 100);
        // A reply that came out smaller gives the difference back; larger, takes it if it can.
        big.settle(100, 30).expect("smaller");
        assert_eq!(big.held(), 30);
        big.settle(30, 100).expect("room for 70 more");
        assert!(big.settle(100, 101).is_err(), "no room for one more byte");
        drop((other, big));
        assert_eq!(budget.held(), 0);
        // Without waiting: room now, or nothing taken.
        let quick = ReplyCharge::new(budget.clone(), holder(12), None);
        assert!(quick.try_take(70) && !quick.try_take(40), "its share is 100");
        assert_eq!(budget.held(), 70);
        drop(quick);
        // An uncharged request takes nothing.
        ReplyCharge::none().take(1 << 40).await.expect("no budget");
        assert!(ReplyCharge::none().try_take(1 << 40));
        assert_eq!(budget.held(), 0);
    }

    /// Waiting replies of one caller get room in the order they came: a large one is not
    /// passed over by smaller ones taking each byte that goes back.
    #[tokio::test(start_paused = true)]
    async fn a_callers_waiting_replies_get_room_first_come_first_served() {
        let budget = Budget::new(400);
        let c = ReplyCharge::new(budget.clone(), holder(3), None);
        c.take(100).await.expect("the whole share");
        let spawn = |n: u64| {
            let c = c.clone();
            tokio::spawn(async move { c.take(n).await })
        };
        let large = spawn(80);
        tokio::time::sleep(Duration::from_millis(10)).await;
        let small = spawn(10);
        tokio::time::sleep(Duration::from_millis(10)).await;
        // 10 bytes go back: room for the small one, but the large one came first.
        let n = c.detach(10);
        c.release(n);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(
            !small.is_finished() && !large.is_finished(),
            "the small one waits its turn"
        );
        // A new reply waits behind them too, even for a byte, and takes nothing at once.
        assert!(!c.try_take(1), "room goes to the waiting replies first");
        let newcomer = spawn(1);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!newcomer.is_finished());
        // 80 more: the large one, then the small one, then the newcomer.
        let n = c.detach(80);
        c.release(n);
        assert_eq!(large.await.expect("joins").expect("room"), 80);
        assert_eq!(small.await.expect("joins").expect("room"), 10);
        assert!(newcomer.await.expect("joins").is_err(), "100 held: no room for it");
    }

    /// A release wakes its own holder's waiters, not others' (unless the total was near its
    /// bound); a holder with too many waiters is refused at once.
    #[tokio::test(start_paused = true)]
    async fn waiters_are_woken_by_their_own_holders_room_and_bounded() {
        let budget = Budget::new(4000);
        let a = ReplyCharge::new(budget.clone(), holder(1), None);
        let b = ReplyCharge::new(budget.clone(), holder(2), None);
        a.take(1000).await.expect("a's share");
        b.take(1000).await.expect("b's share");
        let wait_a = {
            let a = a.clone();
            tokio::spawn(async move { a.take(10).await })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        // b's bytes going back make no room for a.
        let n = b.detach(500);
        b.release(n);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!wait_a.is_finished(), "b's room is not a's");
        let n = a.detach(10);
        a.release(n);
        wait_a.await.expect("joins").expect("woken by a's own room");
        // Past MAX_WAITERS_PER_HOLDER waiting, refused without waiting.
        let waiters: Vec<_> = (0..crate::body_budget::MAX_WAITERS_PER_HOLDER)
            .map(|_| {
                let a = a.clone();
                tokio::spawn(async move { a.take(10).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(10)).await;
        let started = tokio::time::Instant::now();
        assert!(a.take(10).await.is_err(), "one waiter too many");
        assert!(started.elapsed() < Duration::from_secs(1), "refused at once");
        for w in waiters {
            assert!(w.await.expect("joins").is_err(), "no room came");
        }
    }
}
