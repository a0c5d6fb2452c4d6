//! Every background task a server starts, so that stopping the server stops them too.
//!
//! Tasks that outlive the request that started them (change streams, blob forwards that go on
//! after the write quorum answered, the join loop, maintenance) are spawned through [`Tasks`]
//! instead of a bare `tokio::spawn`. On shutdown the server signals stop once; every tracked task
//! is dropped at its next await point (or ends by itself), and [`Tasks::wait`] gives them all one
//! deadline together. Nothing a task was doing is lost by dropping it: a forward cut short is
//! redone by repair, a change stream is resumed by the mount on another server.
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};

/// Live-task count and the wake-up for [`Tasks::wait`].
#[derive(Default)]
struct Live {
    count: AtomicUsize,
    idle: Notify,
}

/// Decrements the count when a task ends, however it ends (completion, stop, panic).
struct Guard(Arc<Live>);

impl Drop for Guard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// The background tasks of one server process and its stop signal.
#[derive(Clone)]
pub struct Tasks {
    live: Arc<Live>,
    stop: watch::Receiver<bool>,
}

/// Ends a server's tasks: send `true` once.
pub type StopSender = watch::Sender<bool>;

impl Tasks {
    /// A tracker and the sender that stops every task spawned through it.
    pub fn new() -> (Self, StopSender) {
        let (tx, stop) = watch::channel(false);
        (
            Tasks {
                live: Arc::default(),
                stop,
            },
            tx,
        )
    }

    /// A receiver that turns `true` when the server stops (for loops that end themselves, e.g.
    /// to finish a pass cleanly).
    pub fn stop_signal(&self) -> watch::Receiver<bool> {
        self.stop.clone()
    }

    /// Whether stop has been signalled.
    pub fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// Spawns `fut` as a tracked task; it is dropped at its next await point once stop is
    /// signalled. Returns the task's handle (its output is `None` when stop cut it short).
    pub fn spawn<F>(&self, name: &'static str, fut: F) -> tokio::task::JoinHandle<Option<F::Output>>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.live.count.fetch_add(1, Ordering::AcqRel);
        let guard = Guard(self.live.clone());
        let mut stop = self.stop.clone();
        tokio::spawn(async move {
            let _guard = guard;
            tokio::select! {
                out = fut => Some(out),
                _ = stop.wait_for(|s| *s) => {
                    tracing::debug!(task = name, "stopped");
                    None
                }
            }
        })
    }

    /// How many tracked tasks are running.
    pub fn running(&self) -> usize {
        self.live.count.load(Ordering::Acquire)
    }

    /// Waits until every tracked task has ended, at most `deadline`; returns how many were still
    /// running then (0 when all ended).
    pub async fn wait(&self, deadline: Duration) -> usize {
        let all_done = async {
            loop {
                let idle = self.live.idle.notified();
                if self.running() == 0 {
                    return;
                }
                idle.await;
            }
        };
        let _ = tokio::time::timeout(deadline, all_done).await;
        self.running()
    }

    /// Sleeps for `d`, or less when stop is signalled first; returns whether stop was signalled.
    pub async fn sleep_or_stop(&self, d: Duration) -> bool {
        let mut stop = self.stop.clone();
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = stop.wait_for(|s| *s) => {}
        }
        self.stopping()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stop_ends_every_task_and_wait_sees_them_go() {
        let (tasks, stop) = Tasks::new();
        let forever = tasks.spawn("forever", std::future::pending::<()>());
        let quick = tasks.spawn("quick", async { 7 });
        assert_eq!(quick.await.ok(), Some(Some(7)), "a task that ends returns its output");
        assert_eq!(tasks.running(), 1);
        assert_eq!(tasks.wait(Duration::from_millis(50)).await, 1, "not stopped yet");
        let _ = stop.send(true);
        assert_eq!(tasks.wait(Duration::from_secs(5)).await, 0);
        assert_eq!(forever.await.ok(), Some(None), "stop cut the endless task short");
        // Spawned after stop: ends at once.
        let late = tasks.spawn("late", std::future::pending::<()>());
        assert_eq!(late.await.ok(), Some(None));
        assert_eq!(tasks.running(), 0);
    }

    #[tokio::test]
    async fn sleep_or_stop_wakes_on_stop() {
        let (tasks, stop) = Tasks::new();
        assert!(!tasks.sleep_or_stop(Duration::from_millis(10)).await);
        let t = tasks.clone();
        let sleeper = tokio::spawn(async move { t.sleep_or_stop(Duration::from_secs(3600)).await });
        tokio::task::yield_now().await;
        let _ = stop.send(true);
        assert_eq!(sleeper.await.ok(), Some(true));
    }

    #[tokio::test]
    async fn a_panicking_task_still_counts_down() {
        let (tasks, _stop) = Tasks::new();
        let h = tasks.spawn("panics", async { panic!("on purpose") });
        assert!(h.await.is_err());
        assert_eq!(tasks.running(), 0);
    }
}
