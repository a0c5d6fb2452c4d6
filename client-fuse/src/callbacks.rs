//! Callbacks: one change-stream subscription per volume, resumed from the last version applied
//! to the cache, on whichever replica answers. Each event drops the affected cache entries and
//! invalidates the kernel's copies before the version is recorded, so a connected client never
//! serves content a change it received has replaced.
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::watch;

use crate::core::remote::Remote;
use crate::core::{Core, Invalidator, NoKernel};

/// How long a change stream has been open before a fetch that finds it behind the servers
/// opens it again: a new stream first brings what it missed, and opening it again and again
/// would only delay that.
const RESUBSCRIBE_AFTER: Duration = Duration::from_secs(2);

/// Follows `volume` until `stop` turns true or the volume disappears.
pub async fn follow<R: Remote>(
    core: Arc<Core<R>>,
    inval: Arc<dyn Invalidator>,
    volume: String,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        if *stop.borrow() {
            return;
        }
        let Some(from) = core.volumes().into_iter().find(|v| v.name == volume).map(|v| v.seen) else {
            return;
        };
        match core.subscribe(volume.clone(), from).await {
            Ok(mut stream) => {
                core.set_subscribed(&volume, true);
                backoff = Duration::from_millis(100);
                let mut behind = core.streams_behind();
                behind.mark_unchanged();
                let opened = std::time::Instant::now();
                loop {
                    let ev = tokio::select! {
                        ev = stream.next() => ev,
                        _ = stop.changed() => return,
                        _ = behind.changed() => {
                            // This volume's, and not a stream that has only just opened (and
                            // may still be bringing what it missed).
                            let ours = behind.borrow_and_update().1 == volume;
                            if ours && opened.elapsed() >= RESUBSCRIBE_AFTER {
                                tracing::info!(%volume, "change stream behind the servers; resubscribing");
                                break;
                            }
                            continue;
                        }
                    };
                    match ev {
                        Some(Ok(ev)) => {
                            let received = std::time::Instant::now();
                            core.timings().callback_received(&volume);
                            match core.apply_change(&volume, &ev, inval.as_ref()).await {
                                Ok(inv) => {
                                    inval.invalidate(&inv);
                                    core.timings().callback_applied(received);
                                }
                                Err(e) => {
                                    tracing::warn!(%volume, error = %e, "applying a change failed; resubscribing");
                                    break;
                                }
                            }
                        }
                        Some(Err(e)) => {
                            tracing::info!(%volume, error = %e, "change stream broke; resubscribing");
                            // Refused rather than broken: the volume may have been made private
                            // or the reader's token revoked. The volume list says which.
                            if matches!(
                                e,
                                crate::core::FsError::Denied(_) | crate::core::FsError::Unauthenticated(_)
                            ) {
                                core.want_volumes();
                            }
                            break;
                        }
                        None => break,
                    }
                }
                core.set_subscribed(&volume, false);
            }
            Err(e) => {
                tracing::debug!(%volume, error = %e, "subscribe failed");
                if matches!(
                    e,
                    crate::core::FsError::Denied(_) | crate::core::FsError::Unauthenticated(_)
                ) {
                    core.want_volumes();
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Brings a cached volume up to its current version before it is served: replays the changes
/// since the saved version (or drops its metadata if that history is gone). Bounded by `limit`.
/// Runs before the kernel has seen anything, so there is nothing of the kernel's to switch.
pub async fn catch_up<R: Remote>(core: &Core<R>, volume: &str, target: u64, limit: Duration) -> bool {
    let Some(from) = core.volumes().into_iter().find(|v| v.name == volume).map(|v| v.seen) else {
        return false;
    };
    if from >= target {
        return true;
    }
    let run = async {
        let mut stream = core.subscribe(volume.to_string(), from).await.ok()?;
        while let Some(Ok(ev)) = stream.next().await {
            core.apply_change(volume, &ev, &NoKernel).await.ok()?;
            if ev.version >= target {
                return Some(());
            }
        }
        None
    };
    matches!(tokio::time::timeout(limit, run).await, Ok(Some(())))
}
