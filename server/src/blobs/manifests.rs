//! Chunk manifests as the server needs them: parsed, with a set of their chunks, and kept in a
//! bounded in-memory cache.
//!
//! A file over `chunks::CHUNK_THRESHOLD` bytes is named by a manifest blob listing its chunks
//! (see `codafs_common::chunks`). The server reads manifests for four things: the commit-time
//! copies check (every chunk needs W copies), authorizing a chunk read (the manifest the caller
//! may read must list the chunk), repair (the chunks of referenced files) and GC (chunks of
//! referenced files are live). Manifests are content-addressed, so a parsed one never goes stale:
//! the cache is keyed by hash and needs no invalidation, only a bound. It is bounded by the
//! number of chunk entries it holds (not by manifests), since that is what its memory grows with.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use codafs_common::chunks::{Manifest, ManifestError, MAX_MANIFEST_LEN};
use codafs_common::Hash;
use codafs_proto::error::ErrorKind;
use codafs_proto::pb;

use crate::blobs::replicate::ForwardError;
use crate::blobs::{BlobError, BlobStore};
use crate::node::{Node, NodeError};

/// Most chunk entries the cache holds (about 4 TiB of content at the average chunk size; some
/// hundreds of MiB of memory at most).
pub const CACHE_CHUNKS: usize = 4 << 20;

/// The bytes a manifest's header takes: enough to tell a manifest from other content before
/// reading and hashing all of it.
const HEADER_PEEK: usize = 24;

/// A parsed manifest and the set of its chunks (a chunk read asks whether it is listed).
#[derive(Debug)]
pub struct ManifestEntry {
    pub manifest: Manifest,
    pub chunks: HashSet<Hash>,
    /// The manifest blob's own length in bytes (its copies are checked at that size).
    pub len: u64,
    /// The content size the manifest describes.
    pub size: u64,
}

impl ManifestEntry {
    /// Parses a manifest blob's bytes (the caller has verified them against the blob's hash).
    pub fn parse(bytes: &[u8]) -> Result<Self, ManifestError> {
        let manifest = Manifest::decode(bytes)?;
        let chunks = manifest.chunks.iter().map(|c| c.hash).collect();
        Ok(ManifestEntry {
            size: manifest.size(),
            chunks,
            manifest,
            len: bytes.len() as u64,
        })
    }

    /// Whether `chunk` is one of the manifest's chunks.
    pub fn lists(&self, chunk: &Hash) -> bool {
        self.chunks.contains(chunk)
    }

    /// What the entry costs the cache: its chunk entries (at least 1).
    fn weight(&self) -> usize {
        self.manifest.chunks.len().max(1)
    }
}

/// A least-recently-used cache of parsed manifests, bounded by total chunk entries.
pub struct ManifestCache {
    budget: usize,
    inner: Mutex<Lru>,
}

#[derive(Default)]
struct Lru {
    /// Entry and the tick of its last use.
    map: HashMap<Hash, (Arc<ManifestEntry>, u64)>,
    /// Last-use tick -> hash, oldest first (the eviction order).
    order: BTreeMap<u64, Hash>,
    tick: u64,
    weight: usize,
}

impl Default for ManifestCache {
    fn default() -> Self {
        ManifestCache::new(CACHE_CHUNKS)
    }
}

impl ManifestCache {
    /// A cache holding at most `budget` chunk entries.
    pub fn new(budget: usize) -> Self {
        ManifestCache {
            budget,
            inner: Mutex::new(Lru::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lru> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cached entry of `hash`, marked as just used.
    pub fn get(&self, hash: &Hash) -> Option<Arc<ManifestEntry>> {
        let mut lru = self.lock();
        lru.tick += 1;
        let tick = lru.tick;
        let (entry, old) = {
            let slot = lru.map.get_mut(hash)?;
            let old = std::mem::replace(&mut slot.1, tick);
            (slot.0.clone(), old)
        };
        lru.order.remove(&old);
        lru.order.insert(tick, *hash);
        Some(entry)
    }

    /// Caches `entry` as `hash`, evicting the least recently used entries beyond the budget. An
    /// entry larger than the whole budget is not cached (its user still holds it).
    pub fn insert(&self, hash: Hash, entry: Arc<ManifestEntry>) {
        let weight = entry.weight();
        if weight > self.budget {
            return;
        }
        let mut lru = self.lock();
        lru.tick += 1;
        let tick = lru.tick;
        if let Some((old, at)) = lru.map.insert(hash, (entry, tick)) {
            lru.order.remove(&at);
            lru.weight -= old.weight();
        }
        lru.order.insert(tick, hash);
        lru.weight += weight;
        while lru.weight > self.budget {
            let Some((_, oldest)) = lru.order.pop_first() else {
                break;
            };
            if let Some((gone, _)) = lru.map.remove(&oldest) {
                lru.weight -= gone.weight();
            }
        }
    }

    /// (entries, chunk entries) held.
    pub fn usage(&self) -> (usize, usize) {
        let lru = self.lock();
        (lru.map.len(), lru.weight)
    }
}

/// Reads and parses manifest `hash` from `store`: the length and header are checked before the
/// whole blob is read (a large blob that is no manifest is refused without reading it), then it
/// is read in full and verified (`read_verified`, which quarantines a corrupt copy).
fn load_local(store: &BlobStore, hash: &Hash) -> Result<ManifestEntry, LoadError> {
    let (mut file, len) = store.open_read(hash)?;
    if len > MAX_MANIFEST_LEN {
        return Err(LoadError::NotManifest(format!(
            "its {len} bytes exceed the largest manifest ({MAX_MANIFEST_LEN} bytes)"
        )));
    }
    let mut head = Vec::with_capacity(HEADER_PEEK);
    (&mut file)
        .take(HEADER_PEEK as u64)
        .read_to_end(&mut head)
        .map_err(BlobError::from)?;
    if let Err(e @ ManifestError::NotManifest) = Manifest::decode(&head) {
        return Err(LoadError::NotManifest(e.to_string()));
    }
    drop(file);
    let bytes = store.read_verified(hash)?;
    ManifestEntry::parse(&bytes).map_err(|e| LoadError::NotManifest(e.to_string()))
}

/// Why a manifest could not be loaded from the local store.
#[derive(Debug, thiserror::Error)]
enum LoadError {
    #[error(transparent)]
    Blob(#[from] BlobError),
    #[error("{0}")]
    NotManifest(String),
}

/// What [`Node::manifest_if_stored`] found.
pub enum Held {
    Manifest(Arc<ManifestEntry>),
    /// Blob not stored here (or its copy was corrupt and is quarantined).
    Missing,
    /// Stored and intact, but not a manifest: it names no chunks.
    NotManifest(String),
}

impl Node {
    /// Manifest `hash` from the cache or this server's blob store, off the async workers. A
    /// blob not stored here (or a witness, which keeps none) is `NotFound`; a blob that is no
    /// valid manifest is `Invalid`, naming it.
    pub async fn manifest(&self, hash: &Hash) -> Result<Arc<ManifestEntry>, NodeError> {
        if let Some(e) = self.manifests.get(hash) {
            return Ok(e);
        }
        if self.is_witness() {
            return Err(not_here(hash));
        }
        let (store, h) = (self.blobs.clone(), *hash);
        let loaded = tokio::task::spawn_blocking(move || load_local(&store, &h))
            .await
            .map_err(|e| NodeError::Internal(format!("loading manifest {hash}: {e}")))?;
        self.cache_loaded(hash, loaded)
    }

    /// [`Node::manifest`] for callers already on a blocking thread (GC, repair's listing).
    pub fn manifest_blocking(&self, hash: &Hash) -> Result<Arc<ManifestEntry>, NodeError> {
        if let Some(e) = self.manifests.get(hash) {
            return Ok(e);
        }
        if self.is_witness() {
            return Err(not_here(hash));
        }
        self.cache_loaded(hash, load_local(&self.blobs, hash))
    }

    /// Manifest `hash` as far as this server can tell from its cache and store (blocking): held,
    /// missing, or a blob that is no manifest. `Err` only for a store that cannot be read.
    pub fn manifest_if_stored(&self, hash: &Hash) -> Result<Held, NodeError> {
        match self.manifest_blocking(hash) {
            Ok(m) => Ok(Held::Manifest(m)),
            Err(NodeError::NotFound(_)) => Ok(Held::Missing),
            Err(NodeError::Invalid(why)) => Ok(Held::NotManifest(why)),
            Err(e) => Err(e),
        }
    }

    /// Caches a loaded manifest, or turns the failure into the node's error.
    fn cache_loaded(
        &self,
        hash: &Hash,
        loaded: Result<ManifestEntry, LoadError>,
    ) -> Result<Arc<ManifestEntry>, NodeError> {
        match loaded {
            Ok(e) => {
                let e = Arc::new(e);
                self.manifests.insert(*hash, e.clone());
                Ok(e)
            }
            Err(LoadError::Blob(BlobError::NotFound(_))) => Err(not_here(hash)),
            Err(LoadError::Blob(BlobError::Corrupt(_))) => {
                // Quarantined by the read: repair fetches a good copy.
                self.repair_now();
                Err(not_here(hash))
            }
            Err(LoadError::Blob(e)) => Err(NodeError::Internal(format!("reading manifest {hash}: {e}"))),
            Err(LoadError::NotManifest(why)) => Err(not_a_manifest(hash, &why)),
        }
    }

    /// Manifest `hash` for a commit that names it: from here, else fetched from a data replica
    /// that has it (at most [`MAX_MANIFEST_LEN`] bytes, verified). A data replica keeps a copy
    /// of what it fetched (it is referenced from now on); a witness keeps the parsed manifest in
    /// memory only. `NotFound` when no replica has it, `Invalid` when it is no manifest.
    pub async fn manifest_anywhere(&self, hash: &Hash) -> Result<Arc<ManifestEntry>, NodeError> {
        match self.manifest(hash).await {
            Err(NodeError::NotFound(_)) => {}
            other => return other,
        }
        let mut failures = Vec::new();
        let mut asked = 0;
        for m in self.data_replicas().into_iter().filter(|m| m.id != self.id) {
            asked += 1;
            match self.fetch_bytes(&m.info.addr, hash).await {
                Ok(bytes) => return self.adopt_fetched(hash, bytes).await,
                Err(e) if e.kind == ErrorKind::Invalid => return Err(not_a_manifest(hash, &e.message)),
                Err(e) => failures.push(e),
            }
        }
        if failures.iter().all(|e| e.kind == ErrorKind::NotFound) {
            return Err(NodeError::NotFound(format!(
                "manifest {hash} is stored on none of the {asked} other data replicas"
            )));
        }
        let why: Vec<String> = failures.iter().map(ToString::to_string).collect();
        Err(NodeError::Unavailable(format!(
            "manifest {hash} is not stored here and could not be fetched: {}",
            why.join("; ")
        )))
    }

    /// Reads blob `hash` from peer `addr` into memory and verifies it. Refused (kind `Invalid`)
    /// as soon as its size shows it cannot be a manifest, so nothing large is ever read.
    async fn fetch_bytes(&self, addr: &str, hash: &Hash) -> Result<Vec<u8>, ForwardError> {
        let mut client = self.peers.blobs(addr).map_err(|e| ForwardError::unreachable(addr, e))?;
        let mut req = tonic::Request::new(pb::GetBlobRequest {
            hash: bytes::Bytes::copy_from_slice(&hash.0),
            // Peers read by certificate, with no ticket.
            ..Default::default()
        });
        req.set_timeout(Duration::from_secs(300));
        let refused = |s: tonic::Status| ForwardError::refused(addr, &s);
        let failed = |kind, message: String| ForwardError {
            addr: addr.to_string(),
            kind,
            message,
        };
        let mut stream = client.get(req).await.map_err(refused)?.into_inner();
        let mut data: Vec<u8> = Vec::new();
        let mut total = None;
        while let Some(chunk) = stream.message().await.map_err(refused)? {
            let size = *total.get_or_insert(chunk.total_size);
            if size > MAX_MANIFEST_LEN {
                let why = format!("its {size} bytes exceed the largest manifest ({MAX_MANIFEST_LEN} bytes)");
                return Err(failed(ErrorKind::Invalid, why));
            }
            if (data.len() + chunk.data.len()) as u64 > size {
                return Err(failed(
                    ErrorKind::Corrupt,
                    format!("{addr} sent more than the {size} bytes of {hash}"),
                ));
            }
            data.extend_from_slice(&chunk.data);
        }
        if Hash::of(&data) != *hash {
            let why = format!("the copy of {hash} received does not match its hash");
            return Err(failed(ErrorKind::Corrupt, why));
        }
        Ok(data)
    }

    /// Parses a fetched manifest and caches it; a data replica also stores the blob, best
    /// effort (repair would fetch it anyway once it is referenced).
    async fn adopt_fetched(&self, hash: &Hash, bytes: Vec<u8>) -> Result<Arc<ManifestEntry>, NodeError> {
        let entry = Arc::new(ManifestEntry::parse(&bytes).map_err(|e| not_a_manifest(hash, &e.to_string()))?);
        self.manifests.insert(*hash, entry.clone());
        if self.is_witness() {
            return Ok(entry);
        }
        let what = format!("store manifest {hash} ({} bytes)", bytes.len());
        let room = match self.space.reserve(bytes.len() as u64, &what) {
            Ok(room) => room,
            Err(e) => {
                tracing::warn!(%hash, error = %e, "not keeping a copy of a fetched manifest");
                return Ok(entry);
            }
        };
        let store = self.blobs.clone();
        match tokio::task::spawn_blocking(move || store.put_bytes(&bytes)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(%hash, error = %e, "storing a fetched manifest failed"),
            Err(e) => tracing::warn!(%hash, error = %e, "storing a fetched manifest failed"),
        }
        drop(room);
        Ok(entry)
    }
}

fn not_here(hash: &Hash) -> NodeError {
    NodeError::NotFound(format!("blob {hash} not stored here"))
}

fn not_a_manifest(hash: &Hash, why: &str) -> NodeError {
    NodeError::Invalid(format!("blob {hash} is not a valid chunk manifest: {why}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use codafs_common::chunks::{ChunkRef, CHUNK_MAX};

    /// A manifest of `n` chunks (a valid one: over the threshold in all).
    fn manifest(n: u32, seed: u8) -> Manifest {
        Manifest {
            chunks: (0..n)
                .map(|i| ChunkRef {
                    hash: Hash::of(&[seed, i as u8, (i >> 8) as u8]),
                    len: CHUNK_MAX,
                })
                .collect(),
        }
    }

    fn entry(n: u32, seed: u8) -> (Hash, Arc<ManifestEntry>) {
        let m = manifest(n, seed);
        let bytes = m.encode();
        (Hash::of(&bytes), Arc::new(ManifestEntry::parse(&bytes).unwrap()))
    }

    #[test]
    fn the_cache_is_bounded_by_chunk_entries_and_evicts_the_least_recently_used() {
        let cache = ManifestCache::new(10);
        let (a, ea) = entry(4, 1);
        let (b, eb) = entry(4, 2);
        let (c, ec) = entry(4, 3);
        cache.insert(a, ea);
        cache.insert(b, eb.clone());
        assert_eq!(cache.usage(), (2, 8));
        // `a` used last: `b` is the one evicted to make room for `c`.
        assert!(cache.get(&a).is_some());
        cache.insert(c, ec);
        assert_eq!(cache.usage(), (2, 8));
        assert!(cache.get(&b).is_none() && cache.get(&a).is_some() && cache.get(&c).is_some());
        // Inserting again replaces, without counting twice.
        cache.insert(c, entry(4, 3).1);
        assert_eq!(cache.usage(), (2, 8));
        // An entry larger than the whole budget is never cached.
        let (d, ed) = entry(11, 4);
        cache.insert(d, ed);
        assert!(cache.get(&d).is_none());
        assert_eq!(cache.usage(), (2, 8));
        drop(eb);
    }

    #[test]
    fn manifests_load_verified_and_other_blobs_are_refused_naming_why() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let m = manifest(3, 7);
        let h = store.put_bytes(&m.encode()).unwrap();
        let e = load_local(&store, &h).unwrap();
        assert_eq!((e.size, e.len), (3 * CHUNK_MAX as u64, m.encode().len() as u64));
        assert!(e.lists(&m.chunks[1].hash) && !e.lists(&Hash::of(b"other")));
        // Not a manifest: refused by its header, without reading it all.
        let plain = store.put_bytes(&[7u8; 100]).unwrap();
        assert!(matches!(load_local(&store, &plain), Err(LoadError::NotManifest(_))));
        // Not stored.
        assert!(matches!(
            load_local(&store, &Hash::of(b"absent")),
            Err(LoadError::Blob(BlobError::NotFound(_)))
        ));
        // A corrupt copy is found and quarantined.
        let mut bad = m.encode();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        store.damage_for_tests(&h, &bad).unwrap();
        assert!(matches!(
            load_local(&store, &h),
            Err(LoadError::Blob(BlobError::Corrupt(_)))
        ));
        assert!(!store.has(&h));
    }
}
