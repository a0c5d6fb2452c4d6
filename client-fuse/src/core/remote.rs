//! What the filesystem core needs from the servers, as a trait over the core's own types: the
//! gRPC implementation (`grpc.rs`) fails over between replicas; tests substitute an in-memory
//! fake with failure injection.
use std::collections::HashMap;
use std::future::Future;

use futures::Stream;

use super::types::{Attr, ChangeEvent, Committed, Op, VolumeStamp};
use super::FsError;
use crate::transport::BlobRef;

/// A commit request's id: chosen by the client, remembered by the servers.
pub type RequestId = [u8; 16];

/// A fresh random request id.
pub fn new_request_id() -> RequestId {
    rand::random()
}

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
pub type ChangeStream = std::pin::Pin<Box<dyn Stream<Item = Result<ChangeEvent, FsError>> + Send>>;

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
    pub(super) fn for_ino(&self, ino: u64) -> Option<&str> {
        self.by_id.get(&codafs_common::split_ino(ino).0).map(String::as_str)
    }
}

/// Server operations the core uses.
pub trait Remote: Send + Sync + 'static {
    fn volumes(&self) -> impl Future<Output = Result<Vec<RemoteVolume>, FsError>> + Send;
    fn getattr(&self, ino: u64) -> impl Future<Output = Result<Fetched<Attr>, FsError>> + Send;
    /// Every entry of a directory, with attributes (all pages).
    fn readdir(&self, ino: u64) -> impl Future<Output = Result<Fetched<Vec<(String, Attr)>>, FsError>> + Send;
    /// Streams a blob into `sink`, resuming on another replica if one fails mid-transfer.
    fn fetch_blob(&self, blob: &BlobRef, sink: &mut dyn ChunkSink) -> impl Future<Output = Result<(), FsError>> + Send;
    /// Which tokens to read private volumes with (called whenever tokens or volumes change).
    fn set_readers(&self, _readers: Readers) {}
    /// Current version stamps of the named volumes (one batched call).
    fn stamps(&self, volumes: Vec<String>) -> impl Future<Output = Result<Vec<VolumeStamp>, FsError>> + Send;
    fn subscribe(&self, volume: String, from: u64) -> impl Future<Output = Result<ChangeStream, FsError>> + Send;
    /// Several small blobs in one call, best effort: those the answering server had, not yet
    /// verified (the caller hashes each). The default fetches none.
    fn fetch_small(
        &self,
        _blobs: Vec<BlobRef>,
    ) -> impl Future<Output = Result<Vec<(codafs_common::Hash, bytes::Bytes)>, FsError>> + Send {
        async { Ok(Vec::new()) }
    }
    /// Blob copies that failed verification (server- or client-side) and were refetched elsewhere.
    fn bad_copies(&self) -> u64 {
        0
    }
    /// The server calls go to first now, if there is one.
    fn preferred_server(&self) -> Option<String> {
        None
    }
    /// Moves the preferred server to another one if it is still `from`: it did not answer in
    /// time (see `Cluster::skip_preferred`).
    fn skip_preferred(&self, _from: Option<&str>) {}
    /// Moves the preferred server to one that answers, if it has not answered lately (see
    /// `Cluster::recheck_preferred`).
    fn recheck_preferred(&self) -> impl Future<Output = ()> + Send {
        async {}
    }
    /// Moves the preferred server off a witness (see `Cluster::avoid_witness`).
    fn avoid_witness(&self) -> impl Future<Output = ()> + Send {
        async {}
    }
    /// The id of the servers' cluster (`None`: they do not tell it).
    fn cluster_id(&self) -> impl Future<Output = Result<Option<String>, FsError>> + Send {
        async { Ok(None) }
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
    /// Stores several blobs (each small) on `write_quorum` replicas in one request where the
    /// transport can. The default stores them one by one.
    fn put_blobs(
        &self,
        token: &str,
        blobs: Vec<bytes::Bytes>,
        write_quorum: u32,
    ) -> impl Future<Output = Result<(), FsError>> + Send {
        async move {
            for b in blobs {
                self.put_blob(token, b, write_quorum).await?;
            }
            Ok(())
        }
    }
    /// Which of `hashes` some data replica lacks, asked as `token`'s holder (a large file's
    /// store sends only those chunks). The default answers all of them: always safe, as a put
    /// of a blob already stored changes nothing.
    fn missing(
        &self,
        _token: &str,
        hashes: Vec<codafs_common::Hash>,
    ) -> impl Future<Output = Result<Vec<codafs_common::Hash>, FsError>> + Send {
        async move { Ok(hashes) }
    }
    /// Commits a batch of operations on `volume` atomically, authenticated as `token`'s holder.
    /// A commit with a `request` id already applied is answered as the first time and not
    /// applied again (retries on another server, replays of a write-back log).
    fn commit(
        &self,
        token: &str,
        volume: &str,
        ops: Vec<Op>,
        request: RequestId,
    ) -> impl Future<Output = Result<Committed, FsError>> + Send;
}
