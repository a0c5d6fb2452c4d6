//! A change stream watched for silence. A stream through a server that stopped (SIGSTOP, a
//! hung host) keeps its connection and brings nothing: the mount would serve its cache as
//! current, without a round trip, until the connection's keepalive noticed (about 8 s). A
//! server that announces ticks (`codafs_proto::ticks`) sends one whenever it has sent nothing
//! for an interval; a stream that then stays silent for [`SILENT_TICKS`] intervals is ended
//! with an error, so its reader subscribes again (elsewhere: the silent server is marked
//! quiet), unless the server still answers a probe (it is then slow, not stopped). A server
//! that announces no ticks (an older one) is left to the keepalive.
use std::time::Duration;

use codafs_proto::pb;
use futures::{Stream, StreamExt};
use tonic::Status;

/// The interval a mount asks its change streams to tick at.
pub const TICK_EVERY: Duration = Duration::from_secs(1);
/// Intervals without an event or a tick after which a ticking stream counts as silent.
pub const SILENT_TICKS: u32 = 3;
/// Silences in a row a stream is waited on while its server answers probes; then it is opened
/// again anyway (on the same server: a stream stuck on the way, behind a proxy say).
pub const PATIENT_SILENCES: u32 = 10;

/// A change stream as it was opened.
pub struct Subscription {
    pub events: tonic::Streaming<pb::ChangeEvent>,
    /// The interval the server said it ticks at (None: it sends no ticks).
    pub ticks: Option<Duration>,
    /// The server that carries it.
    pub server: String,
}

/// `events` without their ticks. If `ticks` is known and nothing comes (not even a tick) for
/// [`SILENT_TICKS`] of them, `alive` asks the server whether it answers at all: one that does
/// is only slow to bring a large event (a slow link, a busy connection), and the stream is
/// given as long again; one that does not makes `on_silence` run and the stream end with an
/// `Unavailable` error.
pub fn watched<S, P, PF, F>(
    events: S,
    ticks: Option<Duration>,
    alive: P,
    on_silence: F,
) -> impl Stream<Item = Result<pb::ChangeEvent, Status>> + Send
where
    S: Stream<Item = Result<pb::ChangeEvent, Status>> + Unpin + Send,
    P: Fn() -> PF + Send,
    PF: std::future::Future<Output = bool> + Send,
    F: FnOnce() + Send,
{
    let limit = ticks.map(|t| t * SILENT_TICKS);
    let state = Some((events, alive, Some(on_silence)));
    futures::stream::unfold(state, move |state| async move {
        let (mut events, alive, mut on_silence) = state?;
        let mut patient = 0;
        loop {
            let next = match limit {
                None => events.next().await,
                Some(limit) => match tokio::time::timeout(limit, events.next()).await {
                    Ok(next) => next,
                    Err(_) if alive().await => {
                        patient += 1;
                        if patient >= PATIENT_SILENCES {
                            let e = Status::unavailable(format!(
                                "the change stream brought nothing for {:?} although its server answers",
                                limit * patient
                            ));
                            return Some((Err(e), None));
                        }
                        tracing::debug!("change stream silent, but its server answers: waiting on");
                        continue;
                    }
                    Err(_) => {
                        if let Some(f) = on_silence.take() {
                            f();
                        }
                        let e = Status::unavailable(format!(
                            "the change stream brought nothing, not even a tick, for {limit:?}, and its server \
                             does not answer: it may have stopped"
                        ));
                        return Some((Err(e), None));
                    }
                },
            };
            patient = 0;
            match next {
                Some(Ok(ev)) if ev.tick => continue,
                Some(item) => return Some((item, Some((events, alive, on_silence)))),
                None => return None,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    fn change(version: u64) -> Result<pb::ChangeEvent, Status> {
        Ok(pb::ChangeEvent {
            version,
            ..Default::default()
        })
    }

    fn tick() -> Result<pb::ChangeEvent, Status> {
        Ok(pb::ChangeEvent {
            tick: true,
            ..Default::default()
        })
    }

    #[tokio::test(start_paused = true)]
    async fn ticks_are_dropped_and_silence_ends_the_stream() {
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let silent = Arc::new(AtomicBool::new(false));
        let noted = silent.clone();
        // The server answers probes until the last phase.
        let answers = Arc::new(AtomicBool::new(true));
        let probed = answers.clone();
        let mut s = Box::pin(watched(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            Some(TICK_EVERY),
            move || {
                let a = probed.load(Ordering::SeqCst);
                async move { a }
            },
            move || noted.store(true, Ordering::SeqCst),
        ));
        // Ticks keep it going well past the silence limit, and never reach the reader.
        tx.send(change(5)).await.unwrap();
        assert_eq!(s.next().await.unwrap().unwrap().version, 5);
        let sender = tx.clone();
        let ticking = tokio::spawn(async move {
            for _ in 0..6 {
                tokio::time::sleep(TICK_EVERY).await;
                sender.send(tick()).await.unwrap();
            }
            sender.send(change(6)).await.unwrap();
        });
        let start = tokio::time::Instant::now();
        assert_eq!(s.next().await.unwrap().unwrap().version, 6);
        assert!(start.elapsed() >= TICK_EVERY * 6, "{:?}", start.elapsed());
        ticking.await.unwrap();
        assert!(!silent.load(Ordering::SeqCst));
        // A silence while the server answers (a large event on a slow link) is waited out.
        let sender = tx.clone();
        let slow = tokio::spawn(async move {
            tokio::time::sleep(TICK_EVERY * SILENT_TICKS * 3).await;
            sender.send(change(7)).await.unwrap();
        });
        assert_eq!(s.next().await.unwrap().unwrap().version, 7);
        slow.await.unwrap();
        assert!(!silent.load(Ordering::SeqCst));
        // Then nothing, and the server does not answer: one error after SILENT_TICKS
        // intervals, and the end.
        answers.store(false, Ordering::SeqCst);
        let start = tokio::time::Instant::now();
        let e = s.next().await.unwrap().unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable);
        assert_eq!(start.elapsed(), TICK_EVERY * SILENT_TICKS);
        assert!(silent.load(Ordering::SeqCst));
        assert!(s.next().await.is_none());
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_that_announced_no_ticks_is_not_timed() {
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let mut s = Box::pin(watched(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            None,
            || async { panic!("no probe without ticks") },
            || panic!("no silence without ticks"),
        ));
        let late = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(600)).await;
            tx.send(change(9)).await.unwrap();
        });
        assert_eq!(s.next().await.unwrap().unwrap().version, 9);
        late.await.unwrap();
        assert!(s.next().await.is_none(), "ends when the server ends it");
    }

    /// A stream that stays silent while its server answers every probe (stuck on the way) is
    /// opened again after PATIENT_SILENCES silences, without marking the server.
    #[tokio::test(start_paused = true)]
    async fn a_stream_silent_beside_a_healthy_server_ends_in_time() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<pb::ChangeEvent, Status>>(8);
        let mut s = Box::pin(watched(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            Some(TICK_EVERY),
            || async { true },
            || panic!("the server answers: not silent"),
        ));
        let start = tokio::time::Instant::now();
        let e = s.next().await.unwrap().unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable);
        assert_eq!(start.elapsed(), TICK_EVERY * SILENT_TICKS * PATIENT_SILENCES);
        assert!(s.next().await.is_none());
        drop(tx);
    }
}
