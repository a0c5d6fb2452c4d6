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
use codafs_proto::pb;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::fsm::{ChangeRec, StateView};
use crate::grpc::{internal, refuse, ErrorKind};
use crate::raft::state_machine::{Applied, Notice};

const BACKLOG_PAGE: usize = 1024;
/// How often a live subscription checks its reader's right even without a `Rights` notice
/// (this is what ends it when its token expires).
pub const RECHECK: std::time::Duration = std::time::Duration::from_secs(30);

/// Checks that the subscriber may still read the volume.
pub type Recheck = Box<dyn Fn() -> Result<(), Status> + Send + Sync>;

/// Starts a subscription task; the stream ends when the client goes away or loses its right.
pub fn subscribe(
    tasks: &crate::tasks::Tasks,
    applied: Applied,
    volume: String,
    from: u64,
    recheck: Recheck,
    listed: crate::subscribers::Guard,
) -> Result<ReceiverStream<Result<pb::ChangeEvent, Status>>, Status> {
    // Subscribe before reading the backlog so nothing applied in between is missed.
    let live = applied.notices.subscribe();
    let vol = applied
        .tables
        .volume(&volume)
        .map_err(internal)?
        .ok_or_else(|| refuse(ErrorKind::NoVolume, format!("no volume {volume}")))?;
    let (tx, rx) = mpsc::channel(256);
    tasks.spawn("change stream", async move {
        if let Err(e) = run(applied, vol.id, volume.clone(), from, live, &tx, &recheck).await {
            let _ = tx.send(Err(e)).await;
        }
        drop(listed);
        tracing::debug!(%volume, "change stream ended");
    });
    Ok(ReceiverStream::new(rx))
}

type Tx = mpsc::Sender<Result<pb::ChangeEvent, Status>>;

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
        if tx.send(Ok(ev)).await.is_err() {
            return Ok(None);
        }
        return Ok(Some(vol.version));
    }
    loop {
        let page = t.changes_after(vol_id, cursor, BACKLOG_PAGE).map_err(internal)?;
        let n = page.len();
        for (version, c) in page {
            if tx.send(Ok(event(version, &c))).await.is_err() {
                return Ok(None);
            }
            cursor = version;
        }
        if n < BACKLOG_PAGE {
            return Ok(Some(cursor));
        }
    }
}

async fn run(
    applied: Applied,
    vol_id: u32,
    volume: String,
    from: u64,
    mut live: broadcast::Receiver<Notice>,
    tx: &Tx,
    recheck: &Recheck,
) -> Result<(), Status> {
    let Some(mut cursor) = catch_up(&applied, vol_id, &volume, from, tx).await? else {
        return Ok(());
    };
    let mut tick = tokio::time::interval(RECHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        let notice = tokio::select! {
            n = live.recv() => n,
            _ = tick.tick() => Ok(Notice::Rights),
            _ = tx.closed() => return Ok(()),
        };
        match notice {
            Ok(Notice::Change {
                volume: v,
                version,
                change,
            }) if v == vol_id && version > cursor => {
                if tx.send(Ok(event(version, &change))).await.is_err() {
                    return Ok(());
                }
                cursor = version;
            }
            Ok(Notice::Change { .. }) => {}
            Ok(Notice::Rights) => recheck()?,
            Ok(Notice::Reset) | Err(broadcast::error::RecvError::Lagged(_)) => {
                recheck()?;
                match catch_up(&applied, vol_id, &volume, cursor, tx).await? {
                    Some(c) => cursor = c,
                    None => return Ok(()),
                }
            }
            Err(broadcast::error::RecvError::Closed) => {
                return Err(refuse(ErrorKind::Unavailable, "server shutting down"))
            }
        }
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

    async fn first(applied: &Applied, from: u64) -> pb::ChangeEvent {
        let (tasks, _stop) = crate::tasks::Tasks::new();
        let listed = std::sync::Arc::new(crate::subscribers::Subscribers::default()).register("www", "test");
        let mut s = subscribe(&tasks, applied.clone(), "www".into(), from, Box::new(|| Ok(())), listed).unwrap();
        let ev = tokio_stream::StreamExt::next(&mut s).await;
        ev.expect("an event").expect("not an error")
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
