//! The per-volume change stream behind callbacks.
//!
//! A subscriber names the last version it saw. It gets every kept change after that version from
//! the `changes` table, then live changes as they are applied. Versions are global log indices,
//! so a client can resume on any replica after failover. If the history it needs was trimmed (or
//! replaced by a snapshot), it gets one `history_gone` event and must revalidate the volume.
//!
//! The subscriber's right to read the volume is checked again whenever something that decides
//! it changes (a `Rights` notice) and every [`RECHECK`]: a volume made private, a revoked
//! account or an expired token ends the stream with the refusal.
//!
//! Memory is bounded: a change record can name hundreds of thousands of nodes (a big publish),
//! and a subscriber that reads nothing would otherwise make the server hold a page of 1,024 of
//! them, and its queue of events, for as long as its connection stays open. History is read
//! in pages of at most [`PAGE_BYTES`], a stream's queue holds at most [`STREAM_BYTES`] of
//! encoded events, and all streams together at most [`ALL_STREAMS_BYTES`], and history pages
//! being sent at most [`ALL_PAGES_BYTES`]; one host holds at most `subscribers::MAX_PER_HOST`
//! streams; a subscriber that
//! takes nothing for [`STALL`] is dropped (its mount resubscribes from the version it has).
//!
//! A subscriber that asks for ticks gets a `tick` event whenever its live stream has sent
//! nothing for the interval it asked (see `codafs_proto::ticks`): that is how a mount tells a
//! quiet volume from a server that stopped.
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use codafs_proto::pb;
use prost::Message;
use tokio::sync::{broadcast, mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::Status;

use crate::fsm::{ChangeRec, StateView};
use crate::grpc::{internal, refuse, ErrorKind};
use crate::raft::state_machine::{Applied, Notice};

const BACKLOG_PAGE: usize = 1024;
/// Bytes of change records read from the history at once, per stream (at least one record).
pub const PAGE_BYTES: usize = 256 << 10;
/// Encoded events a stream holds for its subscriber, at most (a larger event waits for the
/// queue to empty, then goes alone).
pub const STREAM_BYTES: usize = 1 << 20;
/// Encoded events all streams of this server hold, at most.
pub const ALL_STREAMS_BYTES: usize = 128 << 20;
/// A subscriber that takes no event for this long is dropped.
pub const STALL: Duration = Duration::from_secs(60);

/// The server-wide budget of queued event bytes, in KiB.
fn all_streams() -> Arc<Semaphore> {
    static ALL: OnceLock<Arc<Semaphore>> = OnceLock::new();
    ALL.get_or_init(|| Arc::new(Semaphore::new(ALL_STREAMS_BYTES >> 10)))
        .clone()
}
/// History pages all streams hold at once, at most (see [`catch_up`]).
pub const ALL_PAGES_BYTES: usize = 64 << 20;

/// The server-wide budget of history pages being sent, in KiB.
fn all_pages() -> Arc<Semaphore> {
    static ALL: OnceLock<Arc<Semaphore>> = OnceLock::new();
    ALL.get_or_init(|| Arc::new(Semaphore::new(ALL_PAGES_BYTES >> 10)))
        .clone()
}

/// How often a live subscription checks its reader's right even without a `Rights` notice
/// (this is what ends it when its token expires).
pub const RECHECK: std::time::Duration = std::time::Duration::from_secs(30);

/// Checks that the subscriber may still read the volume.
pub type Recheck = Box<dyn Fn() -> Result<(), Status> + Send + Sync>;

/// What a subscriber asked for.
#[derive(Debug, Clone)]
pub struct Want {
    pub volume: String,
    /// The last version it has: it gets every change after it.
    pub from: u64,
    /// Tick after this long without an event (None: never).
    pub ticks: Option<Duration>,
}

/// Starts a subscription task; the stream ends when the client goes away or loses its right.
pub fn subscribe(
    tasks: &crate::tasks::Tasks,
    applied: Applied,
    want: Want,
    recheck: Recheck,
    listed: crate::subscribers::Guard,
) -> Result<impl Stream<Item = Result<pb::ChangeEvent, Status>> + Send, Status> {
    let volume = want.volume.clone();
    // Subscribe before reading the backlog so nothing applied in between is missed.
    let live = applied.notices.subscribe();
    let vol = applied
        .tables
        .volume(&volume)
        .map_err(internal)?
        .ok_or_else(|| refuse(ErrorKind::NoVolume, format!("no volume {volume}")))?;
    let (tx, rx) = mpsc::channel(256);
    let tx = Tx {
        tx,
        own: Arc::new(Semaphore::new(STREAM_BYTES >> 10)),
        all: all_streams(),
    };
    tasks.spawn("change stream", async move {
        if let Err(e) = run(applied, vol.id, want, live, &tx, &recheck).await {
            let _ = tx.send(Err(e)).await;
        }
        drop(listed);
        tracing::debug!(%volume, "change stream ended");
    });
    // An event's room is given back as the connection takes it.
    Ok(ReceiverStream::new(rx).map(|(event, _room)| event))
}

type Item = (Result<pb::ChangeEvent, Status>, Room);

/// Queue room an event holds, in its stream's budget and in the server's, until dropped.
struct Room {
    _own: OwnedSemaphorePermit,
    /// None for a tick (see [`Tx::tick`]).
    _all: Option<OwnedSemaphorePermit>,
}

/// A stream's sending end, bounded in bytes (see the module doc).
struct Tx {
    tx: mpsc::Sender<Item>,
    own: Arc<Semaphore>,
    all: Arc<Semaphore>,
}

/// Why an event was not queued.
#[derive(Debug)]
enum Gone {
    /// The subscriber went away.
    Closed,
    /// It took nothing for [`STALL`].
    Stalled,
    /// The server's budget for all streams stayed taken for [`STALL`].
    Full,
}

impl Tx {
    /// Queues `item` once there is room for it; fails if the subscriber went away or takes
    /// nothing for [`STALL`], or if the server's budget stays taken that long.
    async fn send(&self, item: Result<pb::ChangeEvent, Status>) -> Result<(), Gone> {
        let kib = item.as_ref().map_or(1, |e| e.encoded_len().div_ceil(1024).max(1));
        let kib = u32::try_from(kib.min(STREAM_BYTES >> 10)).unwrap_or(1);
        let own = self
            .wait(Gone::Stalled, self.own.clone().acquire_many_owned(kib))
            .await?;
        let all = self.wait(Gone::Full, self.all.clone().acquire_many_owned(kib)).await?;
        let room = Room {
            _own: own,
            _all: Some(all),
        };
        self.wait(Gone::Stalled, async { self.tx.send((item, room)).await.map_err(drop) })
            .await
    }

    /// Queues a tick if nothing else is queued: a stream with events on their way needs none,
    /// and a tick must neither wait behind them nor take the server's budget for all streams
    /// (once that is spent, every stream's ticks would stop at once and every mount would
    /// leave this server together). `Err`: the subscriber went away.
    fn tick(&self) -> Result<(), Gone> {
        if self.tx.capacity() < self.tx.max_capacity() {
            return Ok(());
        }
        let Ok(own) = self.own.clone().try_acquire_owned() else {
            return Ok(());
        };
        let tick = pb::ChangeEvent {
            tick: true,
            ..Default::default()
        };
        let room = Room { _own: own, _all: None };
        match self.tx.try_send((Ok(tick), room)) {
            Err(mpsc::error::TrySendError::Closed(_)) => Err(Gone::Closed),
            _ => Ok(()),
        }
    }

    /// `f`, unless the subscriber goes away first or it takes [`STALL`] (then `late`).
    async fn wait<T, E>(&self, late: Gone, f: impl std::future::Future<Output = Result<T, E>>) -> Result<T, Gone> {
        tokio::select! {
            r = f => r.map_err(|_| Gone::Closed),
            _ = self.tx.closed() => Err(Gone::Closed),
            _ = tokio::time::sleep(STALL) => Err(late),
        }
    }

    async fn closed(&self) {
        self.tx.closed().await
    }
}

/// The event a subscriber gets for change record `c` at `version`.
fn event(version: u64, c: &ChangeRec) -> pb::ChangeEvent {
    let names = c.names.as_deref().unwrap_or_default();
    pb::ChangeEvent {
        version,
        inos: c.inos.clone(),
        dirs: c.dirs.clone(),
        history_gone: false,
        names_complete: c.names.is_some(),
        names: names
            .iter()
            .map(|n| pb::NameChange {
                dir: n.dir,
                name: n.name.clone(),
                ino: n.target.map_or(0, |(ino, _)| ino),
                kind: n.target.map_or(0, |(_, k)| crate::grpc::convert::wire_kind(k) as i32),
            })
            .collect(),
        removed: c.removed.clone(),
        perms: c.perms.clone(),
        tick: false,
    }
}

/// Sends the kept history after `cursor` (or `history_gone`); returns the new cursor, or None
/// when the client has gone.
async fn catch_up(
    applied: &Applied,
    vol_id: u32,
    volume: &str,
    mut cursor: u64,
    tx: &Tx,
) -> Result<Option<u64>, Status> {
    let t = &applied.tables;
    let vol = t
        .volume(volume)
        .map_err(internal)?
        .ok_or_else(|| refuse(ErrorKind::NoVolume, format!("volume {volume} was deleted")))?;
    if cursor < vol.history_floor && cursor < vol.version {
        let ev = pb::ChangeEvent {
            version: vol.version,
            history_gone: true,
            ..Default::default()
        };
        return Ok(sent(tx.send(Ok(ev)).await, volume)?.then_some(vol.version));
    }
    // Nothing to catch up: no page to read (nor room to wait for).
    if cursor >= vol.version {
        return Ok(Some(cursor));
    }
    loop {
        // The page stays in memory until its events are queued, so the pages of all streams
        // have a bound of their own: many subscribers catching up from far back, reading
        // nothing, held a page each outside any. (Not the queues' budget: a page waiting for
        // it while its events wait for it too could take all of it and hold every stream.)
        let kib = u32::try_from(PAGE_BYTES >> 10).unwrap_or(u32::MAX);
        let room = tx.wait(Gone::Full, all_pages().acquire_many_owned(kib)).await;
        let _page_room = match room {
            Ok(r) => r,
            Err(gone) => {
                sent(Err(gone), volume)?;
                return Ok(None);
            }
        };
        // A RocksDB scan of up to a page: off the async workers.
        let tables = t.clone();
        let (page, more) =
            tokio::task::spawn_blocking(move || tables.changes_page(vol_id, cursor, BACKLOG_PAGE, PAGE_BYTES))
                .await
                .map_err(internal)?
                .map_err(internal)?;
        for (version, c) in page {
            if !sent(tx.send(Ok(event(version, &c))).await, volume)? {
                return Ok(None);
            }
            cursor = version;
        }
        if !more {
            return Ok(Some(cursor));
        }
    }
}

/// Whether an event was queued; a stalled subscriber ends its stream with an error it may see
/// when it reads again.
fn sent(r: Result<(), Gone>, volume: &str) -> Result<bool, Status> {
    match r {
        Ok(()) => Ok(true),
        Err(Gone::Closed) => Ok(false),
        Err(Gone::Stalled) => {
            tracing::info!(%volume, "dropped a change stream whose subscriber took nothing for {}s", STALL.as_secs());
            Err(refuse(
                ErrorKind::Unavailable,
                format!("the subscriber took no event for {}s; subscribe again", STALL.as_secs()),
            ))
        }
        Err(Gone::Full) => {
            tracing::warn!(%volume, "dropped a change stream: subscribers that read slowly hold all {} MiB this server queues for change streams", ALL_STREAMS_BYTES >> 20);
            Err(refuse(
                ErrorKind::Unavailable,
                format!(
                    "this server holds its limit of queued change events ({} MiB) for subscribers that read slowly; subscribe again",
                    ALL_STREAMS_BYTES >> 20
                ),
            ))
        }
    }
}

async fn run(
    applied: Applied,
    vol_id: u32,
    want: Want,
    mut live: broadcast::Receiver<Notice>,
    tx: &Tx,
    recheck: &Recheck,
) -> Result<(), Status> {
    let Want { volume, from, ticks } = want;
    let Some(mut cursor) = catch_up(&applied, vol_id, &volume, from, tx).await? else {
        return Ok(());
    };
    let mut rights = tokio::time::interval(RECHECK);
    rights.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    rights.tick().await;
    let mut beat = ticks.map(|every| {
        let mut b = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        b.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        b
    });
    loop {
        let notice = tokio::select! {
            n = live.recv() => n,
            _ = rights.tick() => Ok(Notice::Rights),
            _ = next_beat(&mut beat) => {
                if tx.tick().is_err() {
                    return Ok(());
                }
                continue;
            }
            _ = tx.closed() => return Ok(()),
        };
        match notice {
            Ok(Notice::Change {
                volume: v,
                version,
                change,
            }) if v == vol_id && version > cursor => {
                if !sent(tx.send(Ok(event(version, &change))).await, &volume)? {
                    return Ok(());
                }
                cursor = version;
                // A tick is due only after a whole interval without an event.
                beat.as_mut().map(tokio::time::Interval::reset);
            }
            Ok(Notice::Change { .. }) => {}
            Ok(Notice::Rights) => recheck()?,
            Ok(Notice::Reset) | Err(broadcast::error::RecvError::Lagged(_)) => {
                recheck()?;
                match catch_up(&applied, vol_id, &volume, cursor, tx).await? {
                    Some(c) => cursor = c,
                    None => return Ok(()),
                }
                beat.as_mut().map(tokio::time::Interval::reset);
            }
            Err(broadcast::error::RecvError::Closed) => {
                return Err(refuse(ErrorKind::Unavailable, "server shutting down"))
            }
        }
    }
}

/// When a tick is due (never, without ticks).
async fn next_beat(beat: &mut Option<tokio::time::Interval>) {
    match beat {
        Some(b) => drop(b.tick().await),
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db;
    use crate::fsm::*;
    use codafs_common::Hash;
    use tokio::sync::watch;

    /// A volume with more commits than the kept history, applied to real RocksDB tables.
    fn tables_with_history(commits: u64) -> (tempfile::TempDir, Applied) {
        let (dir, tables, mut mem, actor) = db::www_fixture();
        for i in 0..commits {
            let op = Op {
                expect_version: None,
                kind: OpKind::Create {
                    parent: NodeRef::Path(String::new()),
                    name: "f".into(),
                    kind: Kind::File,
                    mode: 0o644,
                    hash: Some(Hash::of(&i.to_le_bytes())),
                    size: 8,
                    symlink: String::new(),
                    replace: true,
                    uid: 0,
                    gid: 0,
                    mtime_ns: 0,
                },
            };
            let cmd = Command::Commit {
                actor: actor.clone(),
                volume: "www".into(),
                ops: vec![op],
                expect_volume_version: None,
                now_ns: 0,
                request: None,
            };
            db::apply_to_both(&tables, &mut mem, 3 + i, &cmd).unwrap();
        }
        let (notices, _) = broadcast::channel(16);
        let (_tx, index) = watch::channel(2 + commits);
        (
            dir,
            Applied {
                tables,
                notices,
                index,
                suspects: Default::default(),
            },
        )
    }

    fn want(from: u64, ticks: Option<Duration>) -> Want {
        Want {
            volume: "www".into(),
            from,
            ticks,
        }
    }

    /// A subscriber that asked for ticks gets one after each second without an event, and
    /// none while changes come; one that did not ask gets none.
    #[tokio::test(start_paused = true)]
    async fn a_quiet_stream_ticks_when_asked_to() {
        let (_dir, applied) = tables_with_history(3);
        let last = 2 + 3;
        let (tasks, _stop) = crate::tasks::Tasks::new();
        let subs = std::sync::Arc::new(crate::subscribers::Subscribers::default());
        let every = Duration::from_secs(1);
        let mut ticking = subscribe(
            &tasks,
            applied.clone(),
            want(last, Some(every)),
            Box::new(|| Ok(())),
            subs.register("www", None).expect("no host, no bound"),
        )
        .unwrap();
        let mut silent = subscribe(
            &tasks,
            applied.clone(),
            want(last, None),
            Box::new(|| Ok(())),
            subs.register("www", None).expect("no host, no bound"),
        )
        .unwrap();
        let start = tokio::time::Instant::now();
        let ev = ticking.next().await.expect("a tick").expect("not an error");
        assert!(ev.tick && ev.version == 0 && ev.inos.is_empty(), "{ev:?}");
        assert!(
            start.elapsed() >= every && start.elapsed() < every * 2,
            "{:?}",
            start.elapsed()
        );
        // A change in between puts the next tick off by a whole interval.
        tokio::time::sleep(every / 2).await;
        let vol = applied.tables.volume("www").unwrap().unwrap();
        let change = ChangeRec {
            inos: vec![7],
            ..Default::default()
        };
        applied
            .notices
            .send(Notice::Change {
                volume: vol.id,
                version: last + 1,
                change: std::sync::Arc::new(change),
            })
            .unwrap();
        let ev = ticking.next().await.expect("the change").expect("not an error");
        assert!(!ev.tick && ev.version == last + 1, "{ev:?}");
        let changed = tokio::time::Instant::now();
        let ev = ticking.next().await.expect("a tick").expect("not an error");
        assert!(ev.tick, "{ev:?}");
        assert!(changed.elapsed() >= every, "{:?}", changed.elapsed());
        // The other subscriber got the change and nothing else.
        let ev = silent.next().await.expect("the change").expect("not an error");
        assert_eq!(ev.version, last + 1);
        assert!(
            tokio::time::timeout(every * 10, silent.next()).await.is_err(),
            "no ticks unless asked for"
        );
    }

    async fn first(applied: &Applied, from: u64) -> pb::ChangeEvent {
        let (tasks, _stop) = crate::tasks::Tasks::new();
        let listed = std::sync::Arc::new(crate::subscribers::Subscribers::default())
            .register("www", None)
            .expect("no host, no bound");
        let mut s = subscribe(&tasks, applied.clone(), want(from, None), Box::new(|| Ok(())), listed).unwrap();
        let ev = tokio_stream::StreamExt::next(&mut s).await;
        ev.expect("an event").expect("not an error")
    }

    #[test]
    fn history_pages_stop_at_their_byte_bound() {
        let (_dir, applied) = tables_with_history(20);
        let vol = applied.tables.volume("www").unwrap().unwrap();
        let (one, more) = applied.tables.changes_page(vol.id, 2, BACKLOG_PAGE, 1).unwrap();
        assert_eq!((one.len(), more), (1, true), "at least one record, then the bound");
        let (all, more) = applied
            .tables
            .changes_page(vol.id, 2, BACKLOG_PAGE, PAGE_BYTES)
            .unwrap();
        assert_eq!((all.len(), more), (20, false));
        let (some, more) = applied.tables.changes_page(vol.id, 2, 5, PAGE_BYTES).unwrap();
        assert_eq!((some.len(), more), (5, true));
    }

    /// A subscriber that reads nothing does not hold its stream's task (and what it read)
    /// for as long as its connection stays open: after STALL the task gives up, and the
    /// stream ends once what was queued is taken.
    #[tokio::test(start_paused = true)]
    async fn a_subscriber_that_reads_nothing_is_dropped_after_the_stall_time() {
        let (_dir, applied) = tables_with_history(400);
        let (tasks, _stop) = crate::tasks::Tasks::new();
        let listed = std::sync::Arc::new(crate::subscribers::Subscribers::default())
            .register("www", None)
            .expect("no host, no bound");
        let mut s = subscribe(&tasks, applied, want(2, None), Box::new(|| Ok(())), listed).unwrap();
        tokio::time::sleep(STALL * 3).await;
        let mut events = 0;
        while let Some(ev) = tokio::time::timeout(Duration::from_secs(1), s.next())
            .await
            .expect("the stream ends instead of waiting")
        {
            ev.expect("no error could be queued");
            events += 1;
        }
        assert_eq!(events, 256, "what the queue held when the subscriber stopped reading");
    }

    #[tokio::test]
    async fn trimmed_history_says_so_and_kept_history_resumes() {
        let extra = 10;
        let (_dir, applied) = tables_with_history(CHANGE_RETAIN + extra);
        let last = 2 + CHANGE_RETAIN + extra;
        let vol = applied.tables.volume("www").unwrap().unwrap();
        assert_eq!(vol.change_count, CHANGE_RETAIN);
        assert_eq!(vol.history_floor, 2 + extra, "the oldest {extra} changes were trimmed");
        // From before the floor: one history_gone event carrying the current version.
        let ev = first(&applied, 3).await;
        assert!(ev.history_gone);
        assert_eq!(ev.version, last);
        // From inside the kept history: the next change, normally.
        let ev = first(&applied, last - 5).await;
        assert!(!ev.history_gone);
        assert_eq!(ev.version, last - 4);
    }
}
