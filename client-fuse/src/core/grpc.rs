//! The servers as the core sees them: [`Remote`] over [`Cluster`], converting to and from the
//! core's types at this edge (`wire.rs`).
use std::collections::HashMap;
use std::sync::RwLock;

use codafs_common::Hash;
use codafs_proto::pb;

use super::remote::{ChangeStream, ChunkSink, Fetched, Readers, Remote, RemoteVolume, RequestId};
use super::types::{Attr, ChangeEvent, Committed, Op, VolumeStamp};
use super::FsError;
use crate::transport::{BlobRef, Cluster};

/// The real servers, through [`Cluster`].
pub struct GrpcRemote {
    pub cluster: std::sync::Arc<Cluster>,
    pub bad_copies: std::sync::atomic::AtomicU64,
    readers: RwLock<Readers>,
}

impl GrpcRemote {
    pub fn new(cluster: Cluster) -> Self {
        GrpcRemote {
            cluster: std::sync::Arc::new(cluster),
            bad_copies: Default::default(),
            readers: Default::default(),
        }
    }

    fn readers(&self) -> std::sync::RwLockReadGuard<'_, Readers> {
        self.readers.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The token to read node `ino` with (none for public volumes).
    fn token_for_ino(&self, ino: u64) -> Option<String> {
        self.readers().for_ino(ino).map(str::to_string)
    }

    /// The volumes one token (or none) may see.
    async fn list_volumes(&self, token: Option<&str>) -> Result<Vec<pb::VolumeInfo>, FsError> {
        Ok(self.cluster.list_volumes(token).await?)
    }
}

impl Remote for GrpcRemote {
    async fn volumes(&self) -> Result<Vec<RemoteVolume>, FsError> {
        // Public volumes, plus the private ones each held token may read.
        let mut seen: HashMap<String, pb::VolumeInfo> = HashMap::new();
        for v in self.list_volumes(None).await? {
            seen.insert(v.name.clone(), v);
        }
        let tokens = self.readers().all.clone();
        for t in &tokens {
            match self.list_volumes(Some(t)).await {
                Ok(list) => seen.extend(list.into_iter().map(|v| (v.name.clone(), v))),
                // An expired or revoked token shows nothing more; its user is told at login.
                Err(e) => tracing::debug!(error = %e, "a held token could not list volumes"),
            }
        }
        let mut vols: Vec<RemoteVolume> = seen
            .into_values()
            .map(|v| RemoteVolume {
                name: v.name,
                id: v.id,
                root_ino: v.root_ino,
                version: v.version,
                public_read: v.public_read,
                owner: v.owner,
                writers: v.writers,
                write_quorum: v.write_quorum,
            })
            .collect();
        vols.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(vols)
    }

    async fn getattr(&self, ino: u64) -> Result<Fetched<Attr>, FsError> {
        let token = self.token_for_ino(ino);
        let r = self.cluster.get_attr(token.as_deref(), ino).await?;
        let a = r.attr.ok_or_else(|| FsError::Io("server sent no attributes".into()))?;
        Ok(Fetched {
            newest: a.version,
            applied: r.applied_index,
            value: a.into(),
        })
    }

    async fn readdir(&self, ino: u64) -> Result<Fetched<Vec<(String, Attr)>>, FsError> {
        let token = self.token_for_ino(ino);
        let l = self.cluster.read_dir_as(token.as_deref(), ino).await?;
        Ok(Fetched {
            newest: l.entries.iter().map(|(_, a)| a.version).fold(l.dir_version, u64::max),
            applied: l.applied,
            value: l.entries.into_iter().map(|(n, a)| (n, a.into())).collect(),
        })
    }

    async fn fetch_blob(&self, blob: &BlobRef, sink: &mut dyn ChunkSink) -> Result<(), FsError> {
        let hash = blob.hash;
        let token = self.token_for_ino(blob.ino);
        let mut last_err = FsError::Disconnected("no servers".into());
        let servers = self.cluster.ordered_servers();
        // The preference to move off, which a quiet server that it names does not lead the
        // order any more.
        let first = self.cluster.preferred();
        // A server that does not even open the stream (hung, or cut off without a reset) is
        // left after half the call deadline, so the rest of the operation's time can go to
        // another replica; the connection's keepalive would notice only after 8 s. (Only the
        // opening: a stream's messages are 1 MiB each, which a shared or slow link may take
        // longer than that to bring; a stream that stops mid-way runs into the operation's
        // deadline instead.)
        let idle = self.cluster.policy.call_timeout / 2;
        for (i, addr) in servers.into_iter().enumerate() {
            let offset = sink.received();
            let opened = self.cluster.open_blob_on(&addr, token.as_deref(), blob.request(offset));
            let mut stream = match tokio::time::timeout(idle, opened).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    last_err = e.into();
                    continue;
                }
                Err(_) => {
                    self.cluster.quiet(&addr);
                    tracing::debug!(server = %addr, "blob stream did not open in time; trying elsewhere");
                    last_err = FsError::Disconnected(format!("{addr} did not answer within {idle:?}"));
                    continue;
                }
            };
            loop {
                match stream.message().await {
                    Ok(Some(chunk)) => sink.write(&chunk.data)?,
                    Ok(None) if sink.verified() => {
                        // Another server answered: it becomes the preferred one, as in
                        // `Cluster::call` (unless the preference moved meanwhile).
                        if i > 0 {
                            self.cluster.moved_to(&first, &addr);
                        }
                        return Ok(());
                    }
                    Ok(None) => {
                        // Complete but wrong: this replica's copy is bad. Start over elsewhere.
                        tracing::warn!(server = %addr, %hash, "blob failed verification; fetching from another replica");
                        self.bad_copies.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        sink.reset()?;
                        last_err = FsError::Corrupt(format!("{addr} sent a copy of {hash} that failed verification"));
                        break;
                    }
                    Err(s) if codafs_proto::error::kind_of(&s) == codafs_proto::error::ErrorKind::Corrupt => {
                        // The server found its own copy corrupt; bytes already sent may be bad.
                        tracing::warn!(server = %addr, %hash, "replica reports a corrupt copy; fetching from another");
                        self.bad_copies.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        sink.reset()?;
                        last_err = FsError::Corrupt(s.message().to_string());
                        break;
                    }
                    Err(s) => {
                        tracing::debug!(server = %addr, error = %s.message(), "blob stream broke; resuming elsewhere");
                        last_err = FsError::from(crate::transport::ClientError::Server(s));
                        break;
                    }
                }
            }
        }
        Err(last_err)
    }

    async fn stamps(&self, volumes: Vec<String>) -> Result<Vec<VolumeStamp>, FsError> {
        // One call per token: volumes of the same reader go together.
        let mut groups: HashMap<Option<String>, Vec<String>> = HashMap::new();
        {
            let readers = self.readers();
            for v in volumes {
                groups.entry(readers.by_name.get(&v).cloned()).or_default().push(v);
            }
        }
        let mut out = Vec::new();
        for (token, names) in groups {
            out.extend(
                self.cluster
                    .volume_stamps(token.as_deref(), names)
                    .await?
                    .into_iter()
                    .map(Into::into),
            );
        }
        Ok(out)
    }

    fn set_readers(&self, readers: Readers) {
        *self.readers.write().unwrap_or_else(|p| p.into_inner()) = readers;
    }

    async fn subscribe(&self, volume: String, from: u64) -> Result<ChangeStream, FsError> {
        let token = self.readers().by_name.get(&volume).cloned();
        let sub = self.cluster.subscribe(token.as_deref(), &volume, from).await?;
        let (cluster, server) = (self.cluster.clone(), sub.server);
        let (probe, probed) = (cluster.clone(), server.clone());
        let alive = move || {
            let (probe, probed) = (probe.clone(), probed.clone());
            // As long as one tick: a server that is up answers in milliseconds.
            let asked = tokio::time::timeout(
                crate::heartbeat::TICK_EVERY,
                async move { probe.health_on(&probed).await },
            );
            async move { matches!(asked.await, Ok(Ok(_))) }
        };
        let stream = crate::heartbeat::watched(sub.events, sub.ticks, alive, move || {
            tracing::info!(%server, %volume, "change stream silent; subscribing elsewhere");
            cluster.quiet(&server);
            cluster.skip_preferred(Some(&server));
        });
        use futures::StreamExt;
        Ok(Box::pin(stream.map(|r| {
            r.map(ChangeEvent::from)
                .map_err(|s| FsError::from(crate::transport::ClientError::Server(s)))
        })))
    }

    async fn fetch_small(&self, blobs: Vec<BlobRef>) -> Result<Vec<(Hash, bytes::Bytes)>, FsError> {
        // One listing's files: one volume, so one reader's token.
        let Some(first) = blobs.first() else {
            return Ok(Vec::new());
        };
        let token = self.token_for_ino(first.ino);
        let reqs = blobs.iter().map(|b| b.request(0)).collect();
        let got = self.cluster.get_small(token.as_deref(), reqs).await?;
        Ok(got
            .into_iter()
            .filter_map(|b| Some((Hash::from_slice(&b.hash).ok()?, b.data)))
            .collect())
    }

    fn bad_copies(&self) -> u64 {
        self.bad_copies.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn preferred_server(&self) -> Option<String> {
        Some(self.cluster.preferred())
    }

    fn skip_preferred(&self, from: Option<&str>) {
        self.cluster.skip_preferred(from)
    }

    async fn recheck_preferred(&self) {
        self.cluster.recheck_preferred().await
    }

    async fn avoid_witness(&self) {
        self.cluster.avoid_witness().await
    }

    async fn cluster_id(&self) -> Result<Option<String>, FsError> {
        Ok(self.cluster.cluster_id().await?)
    }

    async fn check_token(&self, token: &str) -> Result<(), FsError> {
        self.cluster.who_am_i(Some(token)).await?;
        Ok(())
    }

    async fn put_blob(&self, token: &str, data: bytes::Bytes, write_quorum: u32) -> Result<(), FsError> {
        if data.len() <= codafs_proto::limits::BLOB_CHUNK {
            // One small request, made durable with one sync per replica.
            let blob = [(Hash::of(&data), data)];
            self.cluster.put_small_as(Some(token), &blob, write_quorum).await?;
        } else {
            self.cluster.put_blob_as(Some(token), data, write_quorum).await?;
        }
        Ok(())
    }

    async fn put_blobs(&self, token: &str, blobs: Vec<bytes::Bytes>, write_quorum: u32) -> Result<(), FsError> {
        let blobs: Vec<(Hash, bytes::Bytes)> = blobs.into_iter().map(|b| (Hash::of(&b), b)).collect();
        self.cluster.put_small_as(Some(token), &blobs, write_quorum).await?;
        Ok(())
    }

    async fn missing(&self, token: &str, hashes: Vec<Hash>) -> Result<Vec<Hash>, FsError> {
        let lacking = self.cluster.lacking(Some(token), &hashes).await?;
        Ok(hashes.into_iter().filter(|h| lacking.contains(h)).collect())
    }

    async fn commit(&self, token: &str, volume: &str, ops: Vec<Op>, request: RequestId) -> Result<Committed, FsError> {
        let req = super::wire::commit_request(volume, ops, request);
        Ok(self.cluster.commit_as(Some(token), req).await?.into())
    }
}
