//! The per-volume change stream behind callbacks.
//!
//! A subscriber names the last version it saw. It gets every kept change after that version from
//! the `changes` table, then live changes as they are applied. Versions are global log indices,
//! so a client can resume on any replica after failover. If the history it needs was trimmed (or
//! replaced by a snapshot), it gets one `history_gone` event and must revalidate the volume.
use codafs_proto::pb;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::fsm::StateView;
use crate::raft::state_machine::{Applied, Notice};

const BACKLOG_PAGE: usize = 1024;

/// Starts a subscription task; the stream ends when the client goes away.
pub fn subscribe(
    applied: Applied,
    volume: String,
    from: u64,
) -> Result<ReceiverStream<Result<pb::ChangeEvent, Status>>, Status> {
    // Subscribe before reading the backlog so nothing applied in between is missed.
    let live = applied.notices.subscribe();
    let vol = applied
        .tables
        .volume(&volume)
        .map_err(|e| Status::internal(e.to_string()))?
        .ok_or_else(|| Status::not_found(format!("no volume {volume}")))?;
    let (tx, rx) = mpsc::channel(256);
    tokio::spawn(async move {
        if let Err(e) = run(applied, vol.id, volume.clone(), from, live, &tx).await {
            let _ = tx.send(Err(e)).await;
        }
        tracing::debug!(%volume, "change stream ended");
    });
    Ok(ReceiverStream::new(rx))
}

type Tx = mpsc::Sender<Result<pb::ChangeEvent, Status>>;

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
        .map_err(|e| Status::internal(e.to_string()))?
        .ok_or_else(|| Status::not_found(format!("volume {volume} was deleted")))?;
    if cursor < vol.history_floor && cursor < vol.version {
        let ev = pb::ChangeEvent {
            version: vol.version,
            inos: vec![],
            dirs: vec![],
            history_gone: true,
        };
        if tx.send(Ok(ev)).await.is_err() {
            return Ok(None);
        }
        return Ok(Some(vol.version));
    }
    loop {
        let page = t
            .changes_after(vol_id, cursor, BACKLOG_PAGE)
            .map_err(|e| Status::internal(e.to_string()))?;
        let n = page.len();
        for (version, c) in page {
            let ev = pb::ChangeEvent {
                version,
                inos: c.inos,
                dirs: c.dirs,
                history_gone: false,
            };
            if tx.send(Ok(ev)).await.is_err() {
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
) -> Result<(), Status> {
    let Some(mut cursor) = catch_up(&applied, vol_id, &volume, from, tx).await? else {
        return Ok(());
    };
    loop {
        let notice = tokio::select! {
            n = live.recv() => n,
            _ = tx.closed() => return Ok(()),
        };
        match notice {
            Ok(Notice::Change {
                volume: v,
                version,
                change,
            }) if v == vol_id && version > cursor => {
                let ev = pb::ChangeEvent {
                    version,
                    inos: change.inos.clone(),
                    dirs: change.dirs.clone(),
                    history_gone: false,
                };
                if tx.send(Ok(ev)).await.is_err() {
                    return Ok(());
                }
                cursor = version;
            }
            Ok(Notice::Change { .. }) => {}
            Ok(Notice::Reset) | Err(broadcast::error::RecvError::Lagged(_)) => {
                match catch_up(&applied, vol_id, &volume, cursor, tx).await? {
                    Some(c) => cursor = c,
                    None => return Ok(()),
                }
            }
            Err(broadcast::error::RecvError::Closed) => return Err(Status::unavailable("server shutting down")),
        }
    }
}
