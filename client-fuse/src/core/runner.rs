//! What the mount runner, the FUSE adaptor and the callback followers ask of the core beyond
//! filesystem operations: counters, the cache's size, token hand-over, volume stamps and change
//! streams. They go through these methods, so the core's fields stay private to it.
use codafs_common::token::Claims;

use super::remote::{ChangeStream, Remote};
use super::{Core, FsError};
use crate::tokens::TokenStoreError;

impl<R: Remote> Core<R> {
    /// Counts one kernel request of operation `op` (see `FUSE_OPS`).
    pub fn count_request(&self, op: &str) {
        self.stats.fuse_request(op);
    }

    /// Counts a request answered on the kernel's thread (`inline`) or handed to the runtime.
    pub fn count_answer(&self, inline: bool) {
        let c = if inline {
            &self.stats.answered_inline
        } else {
            &self.stats.handed_off
        };
        c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// The whole-file cache: (cached blobs, bytes used, byte budget).
    pub fn cache_usage(&self) -> (usize, u64, u64) {
        let (entries, bytes) = self.blobs.usage();
        (entries, bytes, self.blobs.max_bytes())
    }

    /// The current version of each of `volumes`, as the servers have it.
    pub async fn volume_stamps(&self, volumes: Vec<String>) -> Result<Vec<super::types::VolumeStamp>, FsError> {
        self.remote.stamps(volumes).await
    }

    /// Drops the cached metadata of volume `id` (it is fetched again as needed).
    pub fn forget_volume(&self, id: u32) -> Result<(), FsError> {
        self.meta.forget_volume(id).map_err(Self::io)
    }

    /// `volume`'s change events after version `from`, then live ones.
    pub async fn subscribe(&self, volume: String, from: u64) -> Result<ChangeStream, FsError> {
        self.remote.subscribe(volume, from).await
    }

    /// Whether the servers accept `token`.
    pub async fn check_token(&self, token: &str) -> Result<(), FsError> {
        self.remote.check_token(token).await
    }

    /// Whether this mount refuses every change (`--read-only`): a token there only reads.
    pub fn read_only(&self) -> bool {
        self.writes.read_only()
    }

    /// The id of this mount's cluster, if learned (see `tokens`).
    pub fn cluster(&self) -> Option<String> {
        self.writes.tokens.cluster()
    }

    /// Asks the servers for the cluster's id and keeps it; returns it (`None`: the servers do
    /// not tell it).
    pub async fn learn_cluster(&self) -> Result<Option<String>, FsError> {
        let id = self.remote.cluster_id().await?;
        if let Some(id) = &id {
            if let Err(e) = self.writes.tokens.learn_cluster(id) {
                tracing::warn!(error = %e, "could not keep the cluster id in the cache directory");
            }
            self.sync_readers();
        }
        Ok(id)
    }

    /// [`Core::learn_cluster`] until a server answers: at once, then after 1 s doubling to a
    /// minute between tries.
    pub async fn learn_cluster_in_background(&self) {
        let mut wait = std::time::Duration::from_secs(1);
        loop {
            match self.learn_cluster().await {
                Ok(_) => return,
                Err(e) => tracing::debug!(error = %e, "cluster id not learned yet"),
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(std::time::Duration::from_secs(60));
        }
    }

    /// Makes `token` the one local user `uid` writes (and reads private volumes) with.
    pub fn set_token(&self, uid: u32, token: &str) -> Result<Claims, TokenStoreError> {
        let claims = self.writes.tokens.set(uid, token, None)?;
        self.sync_readers();
        Ok(claims)
    }

    /// The cluster `uid`'s token is for, if it holds an unexpired one.
    pub fn token_cluster(&self, uid: u32) -> Option<String> {
        self.writes.tokens.get(uid).map(|(_, c)| c.cluster)
    }

    /// Forgets `uid`'s token (only one for cluster `of_cluster`, if given); returns whether it
    /// dropped one.
    pub fn drop_token_of(&self, uid: u32, of_cluster: Option<&str>) -> bool {
        let had = self.writes.tokens.remove_of(uid, of_cluster);
        self.sync_readers();
        had
    }

    /// Asks the volume watcher to refresh the volume list now (a token changed, a volume
    /// appeared or went away).
    pub fn want_volumes(&self) {
        self.volumes_wanted.notify_one();
    }

    /// A receiver that changes when a volume's change stream is found behind the servers (see
    /// `Core::wait_seen`), naming the volume; its follower then opens it again.
    pub fn streams_behind(&self) -> tokio::sync::watch::Receiver<(u64, String)> {
        self.streams_behind.subscribe()
    }

    /// Notes that the servers hold a change whose event this mount did not get in time: the
    /// stream that should bring it goes through a server that stopped (it keeps its connection
    /// and sends nothing, and the connection's keepalive notices only after about 8 s, while
    /// the mount served stale names and content).
    pub(super) fn stream_behind(&self, volume: &str) {
        tracing::info!(%volume, "a change the servers hold did not reach this mount in time; opening its change stream again");
        self.streams_behind.send_modify(|(n, v)| {
            *n += 1;
            volume.clone_into(v);
        });
    }

    /// Resolves when [`Core::want_volumes`] was called.
    pub async fn volumes_wanted(&self) {
        self.volumes_wanted.notified().await
    }
}
