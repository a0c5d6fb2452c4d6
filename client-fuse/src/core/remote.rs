//! What the filesystem core needs from the servers, as a trait: the gRPC implementation fails
//! over between replicas; tests substitute an in-memory fake with failure injection.
use std::collections::HashMap;
use std::future::Future;
use std::sync::RwLock;

use codafs_common::Hash;
use codafs_proto::pb;
use futures::Stream;

use super::FsError;
use crate::transport::{BlobRef, Cluster};

/// A volume as the client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteVolume {
    pub name: String,
    pub id: u32,
    pub root_ino: u64,
    pub version: u64,
    pub public_read: bool,
    /// Who may write: the owner, extra writers (admins always may).
    pub owner: String,
    pub writers: Vec<String>,
    /// Copies a blob needs before a commit may reference it.
    pub write_quorum: u32,
}

/// Receives a blob's bytes in order; `received` says where a resumed transfer continues.
pub trait ChunkSink: Send {
    fn received(&self) -> u64;
    fn write(&mut self, data: &[u8]) -> std::io::Result<()>;
    /// Discards everything received (a replica sent bad bytes: start over elsewhere).
    fn reset(&mut self) -> std::io::Result<()>;
    /// Whether what was received so far is the whole, verified content.
    fn verified(&self) -> bool;
}

/// A change event stream.
pub type ChangeStream = std::pin::Pin<Box<dyn Stream<Item = Result<pb::ChangeEvent, FsError>> + Send>>;

/// Metadata as one replica read it, with what the core needs to order it against change events.
#[derive(Debug, Clone)]
pub struct Fetched<T> {
    pub value: T,
    /// The replica's applied log index before it read `value` (so `value` is at least that fresh).
    pub applied: u64,
    /// The newest version (log index of the last change) of anything in `value`.
    pub newest: u64,
}

/// Which token reads what: servers answer reads of a private volume only to a token of its
/// owner, a writer or an admin, so a mount sends, for each private volume, the token of a local
/// user who may read it. Public volumes are read without a token.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Readers {
    /// The token that reads each private volume, by volume id.
    pub by_id: HashMap<u32, String>,
    /// The same, by volume name.
    pub by_name: HashMap<String, String>,
    /// Every token the mount holds (each may reveal private volumes in the volume list).
    pub all: Vec<String>,
}

impl Readers {
    fn for_ino(&self, ino: u64) -> Option<&str> {
        self.by_id.get(&codafs_common::split_ino(ino).0).map(String::as_str)
    }
}

/// Server operations the core uses.
pub trait Remote: Send + Sync + 'static {
    fn volumes(&self) -> impl Future<Output = Result<Vec<RemoteVolume>, FsError>> + Send;
    fn getattr(&self, ino: u64) -> impl Future<Output = Result<Fetched<pb::Attr>, FsError>> + Send;
    /// Every entry of a directory, with attributes (all pages).
    fn readdir(&self, ino: u64) -> impl Future<Output = Result<Fetched<Vec<(String, pb::Attr)>>, FsError>> + Send;
    /// Streams a blob into `sink`, resuming on another replica if one fails mid-transfer.
    fn fetch_blob(&self, blob: &BlobRef, sink: &mut dyn ChunkSink) -> impl Future<Output = Result<(), FsError>> + Send;
    /// Which tokens to read private volumes with (called whenever tokens or volumes change).
    fn set_readers(&self, _readers: Readers) {}
    /// Current version stamps of the named volumes (one batched call).
    fn stamps(&self, volumes: Vec<String>) -> impl Future<Output = Result<Vec<pb::VolumeStamp>, FsError>> + Send;
    fn subscribe(&self, volume: String, from: u64) -> impl Future<Output = Result<ChangeStream, FsError>> + Send;
    /// Blob copies that failed verification (server- or client-side) and were refetched elsewhere.
    fn bad_copies(&self) -> u64 {
        0
    }
    /// Checks a token with the servers (a mount cannot verify signatures itself).
    fn check_token(&self, token: &str) -> impl Future<Output = Result<(), FsError>> + Send;
    /// Stores a blob on `write_quorum` replicas, authenticated as `token`'s holder.
    fn put_blob(
        &self,
        token: &str,
        data: bytes::Bytes,
        write_quorum: u32,
    ) -> impl Future<Output = Result<(), FsError>> + Send;
    /// Commits a batch of operations atomically, authenticated as `token`'s holder; retried on
    /// another server after a timeout when it carries a request id (applied at most once).
    fn commit(
        &self,
        token: &str,
        req: pb::CommitRequest,
    ) -> impl Future<Output = Result<pb::CommitReply, FsError>> + Send;
}

/// The real servers, through [`Cluster`].
pub struct GrpcRemote {
    pub cluster: Cluster,
    pub bad_copies: std::sync::atomic::AtomicU64,
    readers: RwLock<Readers>,
}

impl GrpcRemote {
    pub fn new(cluster: Cluster) -> Self {
        GrpcRemote {
            cluster,
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

    async fn getattr(&self, ino: u64) -> Result<Fetched<pb::Attr>, FsError> {
        let token = self.token_for_ino(ino);
        let r = self.cluster.get_attr(token.as_deref(), ino).await?;
        let a = r.attr.ok_or_else(|| FsError::Io("server sent no attributes".into()))?;
        Ok(Fetched {
            newest: a.version,
            applied: r.applied_index,
            value: a,
        })
    }

    async fn readdir(&self, ino: u64) -> Result<Fetched<Vec<(String, pb::Attr)>>, FsError> {
        let token = self.token_for_ino(ino);
        let l = self.cluster.read_dir_as(token.as_deref(), ino).await?;
        Ok(Fetched {
            newest: l.entries.iter().map(|(_, a)| a.version).fold(l.dir_version, u64::max),
            applied: l.applied,
            value: l.entries,
        })
    }

    async fn fetch_blob(&self, blob: &BlobRef, sink: &mut dyn ChunkSink) -> Result<(), FsError> {
        let hash = blob.hash;
        let token = self.token_for_ino(blob.ino);
        let mut last_err = FsError::Disconnected("no servers".into());
        for addr in self.cluster.ordered_servers() {
            let offset = sink.received();
            let result = self
                .cluster
                .open_blob_on(&addr, token.as_deref(), blob.request(offset))
                .await;
            let mut stream = match result {
                Ok(s) => s,
                Err(e) => {
                    last_err = e.into();
                    continue;
                }
            };
            loop {
                match stream.message().await {
                    Ok(Some(chunk)) => sink.write(&chunk.data)?,
                    Ok(None) if sink.verified() => return Ok(()),
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

    async fn stamps(&self, volumes: Vec<String>) -> Result<Vec<pb::VolumeStamp>, FsError> {
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
            out.extend(self.cluster.volume_stamps(token.as_deref(), names).await?);
        }
        Ok(out)
    }

    fn set_readers(&self, readers: Readers) {
        *self.readers.write().unwrap_or_else(|p| p.into_inner()) = readers;
    }

    async fn subscribe(&self, volume: String, from: u64) -> Result<ChangeStream, FsError> {
        let token = self.readers().by_name.get(&volume).cloned();
        let stream = self.cluster.subscribe(token.as_deref(), &volume, from).await?;
        use futures::StreamExt;
        Ok(Box::pin(stream.map(|r| {
            r.map_err(|s| FsError::from(crate::transport::ClientError::Server(s)))
        })))
    }

    fn bad_copies(&self) -> u64 {
        self.bad_copies.load(std::sync::atomic::Ordering::Relaxed)
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

    async fn commit(&self, token: &str, req: pb::CommitRequest) -> Result<pb::CommitReply, FsError> {
        Ok(self.cluster.commit_as(Some(token), req).await?)
    }
}
