//! The filesystem core: namespace, caches and callback handling, with no FUSE types.
//!
//! `/coda` (node 1) lists the volumes; below that every node id is the server's object id. All
//! metadata comes from the persistent [`MetaStore`] when present and from the servers otherwise;
//! file contents always come from the whole-file [`BlobCache`], fetched in full on first use.
//! Change events drop exactly what they invalidate and drive the kernel through an
//! [`Invalidator`] (the FUSE adaptor turns that into notifier calls), so everything here is
//! testable without a mount. How an event is applied, and how fetched metadata is kept in step
//! with events, is in [`switch`].
mod chunked;
pub mod error;
mod failfast;
pub mod grpc;
mod prefetch;
pub mod remote;
pub mod replies;
mod runner;
pub mod switch;
pub mod types;
mod wire;
pub mod write;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use codafs_common::chunks::is_chunked;
use codafs_common::{split_ino, Hash};

pub use error::FsError;
use remote::{Remote, RemoteVolume};
use types::Attr;

use crate::cache::blobs::BlobCache;
use crate::cache::meta::{MetaStore, VolState};
use crate::status::{ratio, CacheStatus, CachedFiles, MountStatus, TokenStatus, VolumeStatus, WriteCounters};
use crate::transport::BlobRef;

/// Node id of the `/coda` root.
pub const ROOT_INO: u64 = 1;

/// Kinds of node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum NodeKind {
    #[default]
    File,
    Dir,
    Symlink,
    /// Metadata-only nodes (no content on the servers; the kernel serves their I/O).
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

impl NodeKind {
    /// The kind `mknod` asks for in `mode`'s type bits (0 means a regular file).
    pub fn from_mode(mode: u32) -> Option<NodeKind> {
        match mode & libc::S_IFMT {
            0 | libc::S_IFREG => Some(NodeKind::File),
            libc::S_IFIFO => Some(NodeKind::Fifo),
            libc::S_IFSOCK => Some(NodeKind::Socket),
            libc::S_IFCHR => Some(NodeKind::CharDevice),
            libc::S_IFBLK => Some(NodeKind::BlockDevice),
            _ => None,
        }
    }
}

/// Attributes as shown to the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAttr {
    pub ino: u64,
    pub generation: u64,
    pub kind: NodeKind,
    pub size: u64,
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub atime_ns: i64,
    /// Content hash (files).
    pub hash: Option<Hash>,
    /// Device number (character and block devices).
    pub rdev: u64,
}

/// Kernel cache invalidations a change requires.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Invalidation {
    /// Attributes and page cache of these nodes.
    pub inodes: Vec<u64>,
    /// Directory entries (parent, name).
    pub entries: Vec<(u64, String)>,
}

/// The kernel's caches, as the core drives them.
pub trait Invalidator: Send + Sync + 'static {
    /// Queues invalidations to be issued in the background (an entry invalidation waits for the
    /// directory's lock, which the kernel may hold while it waits for one of our replies).
    fn invalidate(&self, inv: &Invalidation);
    /// At once, and taking no kernel lock a pending request could hold: drops the kernel's
    /// attributes of `inodes` and, if `names` and the kernel can, every cached name (the next
    /// path walk asks again). Returns whether the names were dropped.
    fn switch(&self, inodes: &[u64], names: bool) -> bool;
    /// Drops the kernel's cached pages of `ino`, waiting for reads of them in flight.
    fn drop_pages(&self, ino: u64);
}

/// No kernel at all (unit tests, catching up before the mount exists).
pub struct NoKernel;

impl Invalidator for NoKernel {
    fn invalidate(&self, _inv: &Invalidation) {}
    fn switch(&self, _inodes: &[u64], _names: bool) -> bool {
        false
    }
    fn drop_pages(&self, _ino: u64) {}
}

/// Tunables of the core.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// How long an operation that needs the servers may take before it fails with EIO.
    pub op_timeout: Duration,
}

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig {
            op_timeout: Duration::from_secs(2),
        }
    }
}

/// Kernel requests counted by the FUSE adaptor, by operation.
pub const FUSE_OPS: [&str; 11] = [
    "lookup",
    "getattr",
    "readlink",
    "open",
    "opendir",
    "flush",
    "read",
    "readdir",
    "statfs",
    "write_ops",
    "ioctl",
];

/// Counters shown by `codafs status MNT`.
#[derive(Debug, Default)]
pub struct CoreStats {
    pub meta_hits: AtomicU64,
    pub meta_misses: AtomicU64,
    pub remote_errors: AtomicU64,
    /// Nodes whose kernel pages were dropped before a reply showed them changed.
    pub stale_page_drops: AtomicU64,
    /// Requests the kernel sent the daemon, indexed like [`FUSE_OPS`].
    pub fuse_requests: [AtomicU64; FUSE_OPS.len()],
    /// Blob fetches streamed through memory because the cache disk was full.
    pub streamed_uncached: AtomicU64,
    /// Small files brought into the cache with their directory's listing.
    pub prefetched: AtomicU64,
    /// Of those, copies that failed verification (left out; fetched on open instead).
    pub bad_small_copies: AtomicU64,
    /// Chunk bytes of large files copied from other cached files instead of fetched.
    pub reused_chunk_bytes: AtomicU64,
    /// Requests answered on the kernel's thread, without waiting for anything.
    pub answered_inline: AtomicU64,
    /// Requests that had to wait (a server, a lock, a timer) and went to the runtime.
    pub handed_off: AtomicU64,
}

impl CoreStats {
    /// Counts one kernel request of operation `op` (a name from [`FUSE_OPS`]).
    pub fn fuse_request(&self, op: &str) {
        if let Some(i) = FUSE_OPS.iter().position(|o| *o == op) {
            self.fuse_requests[i].fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Permission bits shown for a node. Public volumes are world-readable (and directories
/// world-searchable) whatever mode the uploader set, so a web server running as an unprivileged
/// user can read every page; private volumes show the stored mode.
pub fn shown_perm(mode: u32, kind: NodeKind, public: bool) -> u16 {
    let mut m = mode & 0o7777;
    if public {
        m |= match kind {
            NodeKind::Dir => 0o555,
            _ => 0o444,
        };
    }
    m as u16
}

pub(crate) use wire::{kind_code, kind_of};

/// The filesystem core. Its fields are private: the FUSE adaptor, the mount runner and the
/// callback followers use its methods (filesystem operations here and in `write.rs`, the
/// switch in `switch.rs`, the rest in `runner.rs`).
///
/// Locks, in the order they are taken when more than one is held (never the other way round):
/// 1. a volume's in-flight lock (`WriteState::inflight`, async): shared by a namespace commit
///    until it has recorded what it told the kernel, exclusive while an event of that volume is
///    applied;
/// 2. `view` (async): exclusive while an event switches the cache and the kernel's copies,
///    shared by replies until they are sent;
/// 3. `apply_mx`: a fetch filling the cache, or an event being applied to it;
/// 4. leaf locks, held for a moment with nothing else taken inside them: `volumes`,
///    `subscribed`, `volume_hits`, `fetches`, and `kernel_names` (which `stale_pages` may
///    hold while it is taken).
///
/// No std lock is held across an await. A file's store lock (`write/shadow.rs`) is taken before
/// any of these and held across its commit.
pub struct Core<R: Remote> {
    remote: R,
    meta: MetaStore,
    blobs: BlobCache,
    cfg: CoreConfig,
    volumes: RwLock<BTreeMap<String, VolState>>,
    fetches: Mutex<HashMap<Hash, Arc<tokio::sync::Mutex<()>>>>,
    connected: AtomicBool,
    /// Volumes whose change stream is currently live.
    subscribed: Mutex<HashMap<String, bool>>,
    /// Content cache (hits, misses) per volume id.
    volume_hits: Mutex<HashMap<u32, (u64, u64)>>,
    stats: CoreStats,
    /// Fetch and callback timings for the metrics endpoint (`crate::metrics`).
    timings: crate::metrics::Timings,
    /// Tokens, shadows and open handles of writes through the mount.
    writes: write::WriteState,
    /// Filling the cache from a fetch and applying a change event exclude each other, so a
    /// fetch that raced an event is never cached over it.
    apply_mx: Mutex<()>,
    /// Taken for writing while an event switches the cache and the kernel's copies; replies that
    /// show metadata are sent under a read guard (see [`Core::current`]).
    view: tokio::sync::RwLock<()>,
    /// Bumped by every switch of `view`.
    view_gen: AtomicU64,
    /// Bumped after every applied event; fetches that are ahead of the mount wait on it.
    applied_tx: tokio::sync::watch::Sender<u64>,
    /// The last volume whose change stream was found behind the servers, with a count (see
    /// `Core::stream_behind`): that volume's stream then opens again.
    streams_behind: tokio::sync::watch::Sender<(u64, String)>,
    /// The names replies told the kernel, by directory: what it may still cache (see
    /// [`Core::name_changes`]). Names are `CompactString`s, which hold names of up to 24 bytes
    /// without a heap allocation: with a million names told, that is 43 bytes per name instead
    /// of 75.
    kernel_names: Mutex<HashMap<u64, HashMap<compact_str::CompactString, u64>>>,
    /// Files a change event replaced whose old pages the kernel may still hold, with the size
    /// and mtime the kernel was shown. The kernel keeps pages when those look
    /// unchanged, so the first reply that shows such a node drops them first (see
    /// [`Core::take_stale_pages`]).
    stale_pages: Mutex<HashMap<u64, (u64, i64)>>,
    /// Asks the volume watcher for a fresh volume list now (tokens changed, or a change stream
    /// was refused: a volume may have been made private).
    volumes_wanted: tokio::sync::Notify,
    /// Whether a volume list came from the servers since this mount started.
    volumes_listed: AtomicBool,
    /// Content streamed through memory while the cache disk is full.
    windows: crate::cache::stream::Windows,
    /// Manifests of large files recently read (see `chunked.rs`).
    manifests: Mutex<lru::LruCache<Hash, Arc<codafs_common::chunks::Manifest>>>,
    /// Large files being brought into the cache by their readers (see `chunked.rs`).
    fills: Mutex<lru::LruCache<Hash, chunked::FillRef>>,
    /// This core, once shared ([`Core::run_in_background`]), for work a request starts and
    /// need not wait for (small files brought with a listing). Unset, that work runs inline.
    me: std::sync::OnceLock<std::sync::Weak<Self>>,
    /// Small-file batches running in the background, at most [`prefetch::BACKGROUND_BATCHES`].
    small_batches: Arc<tokio::sync::Semaphore>,
    /// Content fetches that just failed for want of a server (see `failfast.rs`).
    failed_fetches: failfast::RecentFailures,
}

impl<R: Remote> Core<R> {
    pub fn new(
        remote: R,
        meta: MetaStore,
        blobs: BlobCache,
        cfg: CoreConfig,
        writes: write::WriteState,
    ) -> Result<Self, FsError> {
        let vols = meta.volumes().map_err(|e| FsError::Io(e.to_string()))?;
        Ok(Core {
            remote,
            meta,
            blobs,
            cfg,
            volumes: RwLock::new(vols.into_iter().map(|v| (v.name.clone(), v)).collect()),
            fetches: Mutex::new(HashMap::new()),
            connected: AtomicBool::new(false),
            subscribed: Mutex::new(HashMap::new()),
            volume_hits: Mutex::new(HashMap::new()),
            stats: CoreStats::default(),
            timings: crate::metrics::Timings::new().map_err(Self::io)?,
            writes,
            apply_mx: Mutex::new(()),
            view: tokio::sync::RwLock::new(()),
            view_gen: AtomicU64::new(0),
            applied_tx: tokio::sync::watch::channel(0).0,
            streams_behind: tokio::sync::watch::channel((0, String::new())).0,
            stale_pages: Mutex::new(HashMap::new()),
            volumes_wanted: tokio::sync::Notify::new(),
            volumes_listed: AtomicBool::new(false),
            kernel_names: Mutex::new(HashMap::new()),
            windows: Default::default(),
            manifests: Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(chunked::MANIFESTS_KEPT).unwrap_or(std::num::NonZeroUsize::MIN),
            )),
            fills: Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(chunked::FILLS_KEPT).unwrap_or(std::num::NonZeroUsize::MIN),
            )),
            me: std::sync::OnceLock::new(),
            small_batches: Arc::new(tokio::sync::Semaphore::new(prefetch::BACKGROUND_BATCHES)),
            failed_fetches: Default::default(),
        })
    }

    fn io(e: impl std::fmt::Display) -> FsError {
        FsError::Io(e.to_string())
    }

    /// Runs a server operation under the operation deadline, tracking connectivity.
    async fn timed<T>(
        &self,
        limit: Duration,
        f: impl std::future::Future<Output = Result<T, FsError>>,
    ) -> Result<T, FsError> {
        let r = self.timed_local(limit, f).await;
        if r.is_ok() {
            self.server_answered();
        }
        r
    }

    /// A server answered: the mount is connected, and content whose fetch just failed may be
    /// asked for again (see `failfast.rs`).
    fn server_answered(&self) {
        self.connected.store(true, Ordering::Relaxed);
        self.failed_fetches.clear();
    }

    /// [`Core::timed`] for an operation that may succeed without asking a server (a read that
    /// a large file's fill already holds): its success says nothing of the servers, so it is
    /// for the operation to call [`Core::server_answered`] when one answered.
    async fn timed_local<T>(
        &self,
        limit: Duration,
        f: impl std::future::Future<Output = Result<T, FsError>>,
    ) -> Result<T, FsError> {
        let asked = self.remote.preferred_server();
        let r = match tokio::time::timeout(limit, f).await {
            Ok(r) => r,
            Err(_) => {
                // The next operation starts at another server (a hung one never fails over).
                self.remote.skip_preferred(asked.as_deref());
                Err(FsError::Disconnected(format!("no answer within {limit:?}")))
            }
        };
        if let Err(FsError::Disconnected(_)) = &r {
            self.connected.store(false, Ordering::Relaxed);
            self.stats.remote_errors.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    pub fn set_subscribed(&self, volume: &str, live: bool) {
        if live {
            // A server answered: content that just failed may be fetched again.
            self.failed_fetches.clear();
        }
        self.subscribed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(volume.to_string(), live);
    }

    /// Volumes known (cached or fetched).
    pub fn volumes(&self) -> Vec<VolState> {
        self.volumes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    fn volume_of(&self, ino: u64) -> Option<VolState> {
        let (id, _) = split_ino(ino);
        self.volumes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .find(|v| v.id == id)
            .cloned()
    }

    /// Fetches the volume list and records new and vanished volumes. Returns the invalidations
    /// `/coda` itself needs.
    pub async fn refresh_volumes(&self) -> Result<Invalidation, FsError> {
        // Tokens may have come or gone since the last list: they decide what it shows.
        self.sync_readers();
        let remote: Vec<RemoteVolume> = self.timed(self.cfg.op_timeout, self.remote.volumes()).await?;
        self.set_acls(&remote);
        let inv = self.apply_volume_list(&remote)?;
        self.volumes_listed.store(true, Ordering::Relaxed);
        self.sync_readers();
        Ok(inv)
    }

    /// Records new and vanished volumes and changed read settings from a fresh volume list. A
    /// volume this mount may no longer read is absent from the list, so it is dropped like a
    /// deleted one: its cached metadata goes, and its name leaves `/coda`.
    fn apply_volume_list(&self, remote: &[RemoteVolume]) -> Result<Invalidation, FsError> {
        let mut inv = Invalidation::default();
        let mut vols = self.volumes.write().unwrap_or_else(|p| p.into_inner());
        for rv in remote {
            if let Some(v) = vols
                .get_mut(&rv.name)
                .filter(|v| v.id == rv.id && v.public_read != rv.public_read)
            {
                // Made private or public: the permissions shown change with it.
                tracing::info!(volume = %rv.name, public = rv.public_read, "volume read setting changed");
                v.public_read = rv.public_read;
                self.meta.put_volume(v).map_err(Self::io)?;
                inv.inodes.push(v.root_ino);
            }
            let known = vols.get(&rv.name).is_some_and(|v| v.id == rv.id);
            if !known {
                if let Some(old) = vols.get(&rv.name) {
                    // Same name, new volume: everything cached under the old id is gone.
                    self.meta.forget_volume(old.id).map_err(Self::io)?;
                }
                let st = VolState {
                    name: rv.name.clone(),
                    id: rv.id,
                    root_ino: rv.root_ino,
                    public_read: rv.public_read,
                    seen: rv.version,
                };
                self.meta.put_volume(&st).map_err(Self::io)?;
                vols.insert(rv.name.clone(), st);
                inv.entries.push((ROOT_INO, rv.name.clone()));
            }
        }
        let gone: Vec<String> = vols
            .keys()
            .filter(|n| !remote.iter().any(|r| &r.name == *n))
            .cloned()
            .collect();
        for name in gone {
            if let Some(v) = vols.remove(&name) {
                self.meta.forget_volume(v.id).map_err(Self::io)?;
                self.meta.delete_volume(&name).map_err(Self::io)?;
                inv.entries.push((ROOT_INO, name));
            }
        }
        if !inv.entries.is_empty() {
            inv.inodes.push(ROOT_INO);
        }
        Ok(inv)
    }

    fn root_attr(&self) -> NodeAttr {
        let n = self.volumes.read().unwrap_or_else(|p| p.into_inner()).len() as u32;
        NodeAttr {
            ino: ROOT_INO,
            generation: 0,
            kind: NodeKind::Dir,
            size: 0,
            perm: 0o555,
            nlink: 2 + n,
            uid: 0,
            gid: 0,
            mtime_ns: 0,
            ctime_ns: 0,
            atime_ns: 0,
            rdev: 0,
            hash: None,
        }
    }

    /// Attributes as this mount shows them: the mode as the mount's kind allows, and the size
    /// and times of a file being written here (its shadow) over the stored ones.
    fn to_node(&self, a: &Attr) -> NodeAttr {
        let kind = a.kind;
        // A writable mount shows the stored mode (what chmod set); its daemon lets everyone read
        // public volumes whatever the mode (core::write::may_access).
        let public = self.writes.read_only() && self.volume_of(a.ino).is_none_or(|v| v.public_read);
        let mut shown = NodeAttr {
            ino: a.ino,
            generation: a.generation,
            kind,
            size: a.size,
            perm: shown_perm(a.mode, kind, public),
            nlink: a.nlink.max(1),
            uid: a.uid,
            gid: a.gid,
            mtime_ns: a.mtime_ns,
            ctime_ns: a.ctime_ns,
            // Older servers send no atime: show mtime rather than 1970.
            atime_ns: if a.atime_ns == 0 { a.mtime_ns } else { a.atime_ns },
            hash: a.hash,
            rdev: a.rdev,
        };
        self.shadow_attr(&mut shown);
        shown
    }

    /// Raw attributes: this mount's unsent changes (write-back) over what the servers hold.
    async fn attr(&self, ino: u64) -> Result<Attr, FsError> {
        match self.writes.pending(ino) {
            Some(write::back::Pending::Created(a)) => Ok(a),
            Some(write::back::Pending::Changed(p)) => {
                let mut a = self.stored_attr(ino).await?;
                p.apply(&mut a);
                Ok(a)
            }
            None => self.stored_attr(ino).await,
        }
    }

    /// Raw cached-or-fetched attributes, as the servers hold them.
    async fn stored_attr(&self, ino: u64) -> Result<Attr, FsError> {
        if let Some(a) = self.meta.attr(ino).map_err(Self::io)? {
            self.stats.meta_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(a);
        }
        self.stats.meta_misses.fetch_add(1, Ordering::Relaxed);
        let r = self
            .fetch_settled(
                ino,
                || self.timed(self.cfg.op_timeout, self.remote.getattr(ino)),
                |a| self.meta.put_attr(a).map_err(Self::io),
            )
            .await;
        match r {
            Err(FsError::NotFound) => {
                self.settle_gone(ino).await;
                r
            }
            // No server answers: a directory a change made the cache forget is served as it
            // was, so the cached files below it stay readable (its listing was patched).
            Err(FsError::Disconnected(e)) => match self.meta.stale_attr(ino).map_err(Self::io)? {
                Some(a) => {
                    tracing::debug!(ino, error = %e, "no server: serving a directory's last attributes");
                    Ok(a)
                }
                None => Err(FsError::Disconnected(e)),
            },
            r => r,
        }
    }

    pub async fn getattr(&self, ino: u64) -> Result<NodeAttr, FsError> {
        if ino == ROOT_INO {
            return Ok(self.root_attr());
        }
        let raw = match self.attr(ino).await {
            Ok(a) => a,
            // Unlinked while this mount holds it open: it still exists for its opener.
            Err(FsError::NotFound) => return self.orphan_attr(ino).ok_or(FsError::NotFound),
            Err(e) => return Err(e),
        };
        let mut shown = self.to_node(&raw);
        // Unlinked here, still open, not sent yet (write-back): no names left.
        if raw.nlink == 0 && self.writes.pending(ino).is_some() {
            shown.nlink = 0;
        }
        Ok(shown)
    }

    /// A directory's complete listing, cached or fetched. With `prefetch` (a name lookup, which
    /// an open usually follows), a fetched listing also brings its small files' content.
    async fn listing(&self, ino: u64, prefetch: bool) -> Result<Vec<crate::cache::meta::DirEnt>, FsError> {
        let mut l = self.stored_listing(ino, prefetch).await?;
        self.writes.add_new_names(ino, &mut l);
        Ok(l)
    }

    /// A directory's listing as the servers hold it (empty for one created here and not sent).
    async fn stored_listing(&self, ino: u64, prefetch: bool) -> Result<Vec<crate::cache::meta::DirEnt>, FsError> {
        if self.writes.new_dir(ino) {
            return Ok(Vec::new());
        }
        if let Some(l) = self.meta.dir(ino).map_err(Self::io)? {
            self.stats.meta_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(l);
        }
        self.stats.meta_misses.fetch_add(1, Ordering::Relaxed);
        let attr = self.attr(ino).await?;
        if attr.kind != NodeKind::Dir {
            return Err(FsError::NotDir);
        }
        let started = std::time::Instant::now();
        let entries = self.fetch_listing(ino, self.cfg.op_timeout * 5).await?;
        self.timings.listed(started);
        if prefetch {
            self.bring_small(&entries).await;
        }
        Ok(entries
            .into_iter()
            .map(|(name, a)| crate::cache::meta::DirEnt {
                name,
                ino: a.ino,
                kind: kind_code(a.kind),
            })
            .collect())
    }

    /// Reads directory `ino`'s listing with its entries' attributes from the servers (each
    /// try within `limit`) and caches both once they are the state the mount shows.
    async fn fetch_listing(&self, ino: u64, limit: std::time::Duration) -> Result<Vec<(String, Attr)>, FsError> {
        self.fetch_settled(
            ino,
            || self.timed(limit, self.remote.readdir(ino)),
            |e| self.meta.put_dir(ino, e).map_err(Self::io),
        )
        .await
    }

    pub async fn lookup(&self, parent: u64, name: &str) -> Result<NodeAttr, FsError> {
        if name.len() > codafs_common::names::MAX_NAME_BYTES {
            return Err(FsError::NameTooLong);
        }
        if parent == ROOT_INO {
            self.know_volumes().await?;
            let v = self
                .volumes
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(name)
                .cloned();
            let v = v.ok_or(FsError::NotFound)?;
            return self.getattr(v.root_ino).await;
        }
        let Some(ino) = self.resolve(parent, name).await? else {
            return Err(FsError::NotFound);
        };
        match self.getattr(ino).await {
            // The listed node is gone: a change committed while this looked may have given the
            // name to another node (a rename over it, whose listing patch follows its commit).
            // The name is resolved once more.
            Err(FsError::NotFound) => match self.resolve(parent, name).await? {
                Some(again) if again != ino => self.getattr(again).await,
                _ => Err(FsError::NotFound),
            },
            r => r,
        }
    }

    /// The node `name` in `parent` leads to (`None`: no such name), from this mount's unsent
    /// changes, else the cached listing (a binary search), else a fetched one.
    async fn resolve(&self, parent: u64, name: &str) -> Result<Option<u64>, FsError> {
        // A name made or removed here and not sent yet (write-back).
        if let Some(now) = self.writes.new_name(parent, name) {
            return Ok(now);
        }
        if self.writes.new_dir(parent) {
            return Ok(None);
        }
        if let Some(hit) = self.meta.dir_entry(parent, name).map_err(Self::io)? {
            self.stats.meta_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(hit.map(|e| e.ino));
        }
        let listing = match self.stored_listing(parent, true).await {
            // The directory itself is gone: the kernel walks the path again.
            Err(FsError::NotFound) => return Err(FsError::Stale),
            r => r?,
        };
        Ok(listing.iter().find(|e| e.name == name).map(|e| e.ino))
    }

    /// Makes sure some volume list is known. A mount that could not list the volumes at its
    /// start (servers slow or down) and has none cached knows no volume: its `/coda` is
    /// empty, and every path in it failed with `ENOENT`, as if the site were gone, until the
    /// next list. It asks now (within `--timeout`: `EIO` if no server answers) and wakes the
    /// volume watcher, which follows the volumes and tells the kernel.
    async fn know_volumes(&self) -> Result<(), FsError> {
        if self.volumes_listed.load(Ordering::Relaxed)
            || !self.volumes.read().unwrap_or_else(|p| p.into_inner()).is_empty()
        {
            return Ok(());
        }
        self.refresh_volumes().await?;
        self.want_volumes();
        Ok(())
    }

    /// Entries of a directory (without `.` and `..`).
    pub async fn readdir(&self, ino: u64) -> Result<Vec<(String, u64, NodeKind)>, FsError> {
        if ino == ROOT_INO {
            self.know_volumes().await?;
            let vols = self.volumes.read().unwrap_or_else(|p| p.into_inner());
            return Ok(vols
                .values()
                .map(|v| (v.name.clone(), v.root_ino, NodeKind::Dir))
                .collect());
        }
        Ok(self
            .listing(ino, false)
            .await?
            .into_iter()
            .map(|e| (e.name, e.ino, kind_of(e.kind)))
            .collect())
    }

    /// At most `max` entries of a directory from position `skip` on (without `.` and `..`).
    /// A reply holds what fits the kernel's buffer, and the kernel asks again from where it
    /// stopped; so each reply is built from a bounded slice of a shared listing, and listing a
    /// huge directory costs in proportion to its size, not its size times the replies.
    pub async fn readdir_page(
        &self,
        ino: u64,
        skip: usize,
        max: usize,
    ) -> Result<Vec<(String, u64, NodeKind)>, FsError> {
        if ino == ROOT_INO {
            return Ok(self.readdir(ino).await?.into_iter().skip(skip).take(max).collect());
        }
        let shared = if self.writes.new_dir(ino) || !self.writes.new_names(ino).is_empty() {
            None
        } else {
            self.meta.listing(ino).map_err(Self::io)?
        };
        let l = match shared {
            Some(l) => {
                self.stats.meta_hits.fetch_add(1, Ordering::Relaxed);
                l
            }
            None => Arc::new(self.listing(ino, false).await?),
        };
        Ok(l.iter()
            .skip(skip)
            .take(max)
            .map(|e| (e.name.clone(), e.ino, kind_of(e.kind)))
            .collect())
    }

    pub async fn readlink(&self, ino: u64) -> Result<String, FsError> {
        let a = self.attr(ino).await?;
        if a.kind != NodeKind::Symlink {
            return Err(FsError::NotSymlink);
        }
        Ok(a.symlink_target)
    }

    /// A file's content: which blob, and its size.
    async fn content_of(&self, ino: u64) -> Result<(BlobRef, u64), FsError> {
        let a = self.attr(ino).await?;
        match a.kind {
            NodeKind::File => {}
            NodeKind::Dir => return Err(FsError::IsDir),
            NodeKind::Symlink => return Err(FsError::Invalid("symlink".into())),
            _ => return Err(FsError::Invalid("a special node has no content here".into())),
        }
        let hash = a
            .hash
            .ok_or_else(|| FsError::Io(format!("file {ino} has no content hash")))?;
        let blob = BlobRef {
            hash,
            ticket: a.read_ticket,
            ino,
            manifest: None,
        };
        Ok((blob, a.size))
    }

    /// Makes sure a file's content is in the cache; returns its hash and size.
    pub async fn ensure_cached(&self, ino: u64) -> Result<(Hash, u64), FsError> {
        let (blob, size) = self.content_of(ino).await?;
        let _pin = self.blobs.pin(blob.hash);
        self.ensure_blob(&blob, size).await?;
        Ok((blob.hash, size))
    }

    /// Makes sure a blob is in the cache (`blob.ino` also counts the hit for its volume). When
    /// the cache disk has no room for it, fails with [`FsError::NoSpace`] before or after
    /// fetching: readers then stream it through memory ([`Core::read_uncached`]).
    async fn ensure_blob(&self, blob: &BlobRef, size: u64) -> Result<(), FsError> {
        let (ino, hash) = (blob.ino, blob.hash);
        if self.blobs.lookup(&hash) {
            self.count_hit(ino, true);
            return Ok(());
        }
        // One fetch per blob at a time; others wait for it.
        let lock = {
            let mut f = self.fetches.lock().unwrap_or_else(|p| p.into_inner());
            f.entry(hash).or_default().clone()
        };
        let _guard = lock.lock().await;
        if self.blobs.lookup(&hash) {
            self.count_hit(ino, true);
            return Ok(());
        }
        if !self.blobs.has_room(size) {
            return Err(FsError::NoSpace(format!("the cache disk has no room for {size} bytes")));
        }
        // Written here and not on the servers yet: the write-back log has it.
        if self.cache_from_log(&hash)? {
            self.fetches.lock().unwrap_or_else(|p| p.into_inner()).remove(&hash);
            self.count_hit(ino, true);
            return Ok(());
        }
        // Large files get time in proportion to their size on top of the deadline.
        let limit = self.probe_limit(&hash, crate::policy::transfer_timeout(self.cfg.op_timeout, size));
        if is_chunked(size) {
            // Through the file's fill, which readers may have begun (and which counts the miss).
            let filled = self.noted(&hash, self.timed(limit, self.fill_whole(blob, size)).await);
            self.fetches.lock().unwrap_or_else(|p| p.into_inner()).remove(&hash);
            return match filled? {
                true => Ok(()),
                false => Err(FsError::NoSpace(format!("the cache disk has no room for {size} bytes"))),
            };
        }
        self.count_hit(ino, false);
        let started = std::time::Instant::now();
        let result = self
            .timed(limit, async {
                let mut w = self
                    .blobs
                    .writer(hash, size)
                    .map_err(|e| FsError::NoSpace(format!("caching blob {hash}: {e}")))?;
                let fetched = self.remote.fetch_blob(blob, &mut w).await;
                if let Some(e) = w.failed_locally() {
                    return Err(FsError::NoSpace(format!("caching blob {hash}: {e}")));
                }
                fetched?;
                w.finish().map_err(|e| match e {
                    e @ crate::cache::blobs::CacheError::Mismatch(_) => FsError::Corrupt(e.to_string()),
                    e => cache_error(e),
                })?;
                Ok(())
            })
            .await;
        self.timings.fetched(started, result.is_ok());
        let result = self.noted(&hash, result);
        self.fetches.lock().unwrap_or_else(|p| p.into_inner()).remove(&hash);
        result
    }

    /// Reads `size` bytes at `offset` of a blob without the disk cache (its disk is full): the
    /// whole blob is fetched and verified, and the window around `offset` is kept in memory for
    /// the reads that follow.
    async fn read_uncached(&self, blob: &BlobRef, len: u64, offset: u64, size: u32) -> Result<Vec<u8>, FsError> {
        let hash = blob.hash;
        if let Some(d) = self.windows.get(&hash, offset, size as u64, len) {
            return Ok(d);
        }
        let lock = {
            let mut f = self.fetches.lock().unwrap_or_else(|p| p.into_inner());
            f.entry(hash).or_default().clone()
        };
        let _guard = lock.lock().await;
        if let Some(d) = self.windows.get(&hash, offset, size as u64, len) {
            return Ok(d);
        }
        self.count_hit(blob.ino, false);
        self.stats.streamed_uncached.fetch_add(1, Ordering::Relaxed);
        if is_chunked(len) {
            let limit = crate::policy::transfer_timeout(self.cfg.op_timeout, codafs_common::chunks::CHUNK_MAX as u64);
            let limit = self.probe_limit(&hash, limit);
            let r = self
                .timed(limit, self.read_chunked_uncached(blob, len, offset, size))
                .await;
            let r = self.noted(&hash, r);
            self.fetches.lock().unwrap_or_else(|p| p.into_inner()).remove(&hash);
            return r;
        }
        let limit = self.probe_limit(&hash, crate::policy::transfer_timeout(self.cfg.op_timeout, len));
        let mut sink = crate::cache::stream::WindowSink::new(hash, len, offset);
        let result = self.timed(limit, self.remote.fetch_blob(blob, &mut sink)).await;
        let result = self.noted(&hash, result);
        self.fetches.lock().unwrap_or_else(|p| p.into_inner()).remove(&hash);
        result?;
        if !sink.finish(&self.windows) {
            return Err(FsError::Corrupt(format!("blob {hash} failed verification")));
        }
        self.windows
            .get(&hash, offset, size as u64, len)
            .ok_or_else(|| FsError::Io(format!("blob {hash}: the streamed window misses offset {offset}")))
    }

    fn count_hit(&self, ino: u64, hit: bool) {
        let c = if hit {
            &self.blobs.stats.hits
        } else {
            &self.blobs.stats.misses
        };
        c.fetch_add(1, Ordering::Relaxed);
        let mut m = self.volume_hits.lock().unwrap_or_else(|p| p.into_inner());
        let e = m.entry(split_ino(ino).0).or_default();
        if hit {
            e.0 += 1;
        } else {
            e.1 += 1;
        }
    }

    /// Reads `size` bytes at `offset` of a file through handle `fh` (0 = none), from the cache,
    /// or through memory when the cache disk is full.
    pub async fn read(&self, ino: u64, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, FsError> {
        if let Some(r) = self.read_shadow(ino, offset, size) {
            return r;
        }
        let (blob, len) = match self.content_of(ino).await {
            // Unlinked while open: the handle still reads what it opened.
            Err(FsError::NotFound) => {
                let (hash, len) = self.handle_content(fh).ok_or(FsError::NotFound)?;
                // No ticket: this works while the content is cached (or the file is readable).
                let blob = BlobRef {
                    hash,
                    ticket: Default::default(),
                    ino,
                    manifest: None,
                };
                (blob, len)
            }
            r => r?,
        };
        // Pinned before it is fetched, so admitting it cannot evict it (it may be larger than the
        // whole cache), and until it is read.
        let _pin = self.blobs.pin(blob.hash);
        self.read_blob(&blob, len, offset, size).await
    }

    /// Passes on the result of fetching `hash`, remembering a failure for want of a server (see
    /// `failfast.rs`). Called while the fetch's lock is still held, so the reads queued on it
    /// find the failure.
    fn noted<T>(&self, hash: &Hash, r: Result<T, FsError>) -> Result<T, FsError> {
        if let Err(FsError::Disconnected(_)) = &r {
            self.failed_fetches.note(*hash, failfast::WINDOW);
        }
        r
    }

    /// The time a fetch of `hash` gets: `limit`, or only [`failfast::PROBE`] when a fetch of it
    /// just failed for want of a server (see `failfast.rs`).
    fn probe_limit(&self, hash: &Hash, limit: Duration) -> Duration {
        if self.failed_lately(hash) {
            limit.min(failfast::PROBE)
        } else {
            limit
        }
    }

    /// Whether a fetch of `hash` just failed for want of a server.
    fn failed_lately(&self, hash: &Hash) -> bool {
        self.failed_fetches.check(hash, failfast::WINDOW)
    }

    /// [`Core::read`] of pinned content `blob` (`len` bytes).
    async fn read_blob(&self, blob: &BlobRef, len: u64, offset: u64, size: u32) -> Result<Vec<u8>, FsError> {
        // Larger than the whole cache (`--cache-size`): read through memory, not cached over
        // the bound (it was, until something else evicted it). Opening it for writing still
        // caches it, pinned, as does content this mount wrote and has not sent yet (only its
        // log has it).
        if len > self.blobs.max_bytes() && !self.blobs.lookup(&blob.hash) && !self.logged(&blob.hash) {
            return self.read_uncached(blob, len, offset, size).await;
        }
        if is_chunked(len)
            && !self.blobs.lookup(&blob.hash)
            && (self.filling(&blob.hash) || !self.cache_from_log(&blob.hash)?)
        {
            // A large file not cached yet: this read waits only for the chunks up to its range.
            let limit = crate::policy::transfer_timeout(self.cfg.op_timeout, chunked::READ_AHEAD_BYTES);
            let limit = self.probe_limit(&blob.hash, limit);
            if let Some(d) = self
                .timed_local(limit, self.read_filling(blob, len, offset, size))
                .await?
            {
                return Ok(d);
            }
        }
        for _ in 0..3 {
            match self.ensure_blob(blob, len).await {
                Ok(()) => {}
                Err(FsError::NoSpace(why)) => {
                    tracing::debug!(hash = %blob.hash, %why, "streaming a read through memory");
                    return self.read_uncached(blob, len, offset, size).await;
                }
                Err(e) => return Err(e),
            }
            if offset >= len {
                return Ok(Vec::new());
            }
            match self.read_cached(&blob.hash, len, offset, size) {
                // Dropped between the fetch and the read (found corrupt, say), or deleted
                // behind the cache's back: fetch again.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    self.blobs.forget_missing(&blob.hash);
                    continue;
                }
                r => return Ok(r?),
            }
        }
        Err(FsError::Io(format!("blob {} kept vanishing from the cache", blob.hash)))
    }

    /// Saves the blob cache's index for a fast next start (a clean stop; see `cache/blobs.rs`).
    pub fn save_cache_index(&self) {
        match self.blobs.save_index() {
            Ok(true) => tracing::debug!("saved the blob cache index"),
            Ok(false) => {
                tracing::info!("blob cache index not saved (a fetch was still writing); the next start lists the cache")
            }
            Err(e) => tracing::warn!(error = %e, "could not save the blob cache index; the next start lists the cache"),
        }
    }

    /// Writes a checkpoint of the blob cache's index if it changed (see `cache/blobs.rs`).
    pub fn checkpoint_cache_index(&self) {
        let started = std::time::Instant::now();
        match self.blobs.checkpoint() {
            Ok(true) => tracing::debug!(
                ms = started.elapsed().as_millis() as u64,
                "checkpointed the blob cache index"
            ),
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "could not checkpoint the blob cache index"),
        }
    }

    /// Whether the blob cache started from a checkpoint and still has to be swept.
    pub fn cache_sweep_pending(&self) -> bool {
        self.blobs.sweep_pending()
    }

    /// Adopts cache files a checkpoint missed (see `BlobCache::sweep`); blocks for as long as
    /// listing the cache takes.
    pub fn sweep_cache(&self) {
        let started = std::time::Instant::now();
        let r = self.blobs.sweep();
        let ms = started.elapsed().as_millis() as u64;
        if r.interrupted {
            tracing::info!(ms, "cache sweep stopped by the unmount; the next start sweeps again");
        } else {
            tracing::info!(ms, adopted = r.adopted, stale_tmp = r.stale_tmp, "cache swept");
        }
    }

    /// Makes a running sweep stop at its next directory (a clean stop).
    pub fn stop_cache_sweep(&self) {
        self.blobs.stop_sweep();
    }

    /// Reads from a cached blob (its own file, or its pack's).
    fn read_cached(&self, hash: &Hash, len: u64, offset: u64, size: u32) -> std::io::Result<Vec<u8>> {
        let n = (size as u64).min(len - offset) as usize;
        self.blobs.read_at(hash, offset, n)
    }

    /// Lets requests start work they need not wait for on the runtime (small files brought
    /// with a listing): call once the core is shared. Without it, that work runs inline.
    pub fn run_in_background(self: &Arc<Self>) {
        let _ = self.me.set(Arc::downgrade(self));
    }

    /// Moves the servers this mount talks to first off a witness, if it started at one.
    pub async fn avoid_witness(&self) {
        self.remote.avoid_witness().await
    }

    /// Makes sure the server [`Core::status`] names as the one reads go to first answers (see
    /// `Cluster::recheck_preferred`).
    pub async fn recheck_preferred(&self) {
        self.remote.recheck_preferred().await
    }

    /// Status for `codafs status MNT`.
    pub fn status(&self) -> MountStatus {
        self.status_of(true)
    }

    /// [`Core::status`] without the cached files of each volume (counting them walks every
    /// cached listing): what the metrics endpoint reads at each scrape.
    pub fn status_counters(&self) -> MountStatus {
        self.status_of(false)
    }

    /// Fetch and callback timings (see `crate::metrics`).
    pub fn timings(&self) -> &crate::metrics::Timings {
        &self.timings
    }

    fn status_of(&self, cached_files: bool) -> MountStatus {
        let subs = self.subscribed.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let volumes = self
            .volumes()
            .into_iter()
            .map(|v| {
                let (hits, misses) = self
                    .volume_hits
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&v.id)
                    .copied()
                    .unwrap_or_default();
                VolumeStatus {
                    connected: subs.get(&v.name).copied().unwrap_or(false),
                    cached: if cached_files {
                        self.cached_in(&v)
                    } else {
                        CachedFiles::default()
                    },
                    name: v.name,
                    version: v.seen,
                    hits,
                    misses,
                    hit_ratio: ratio(hits, misses),
                }
            })
            .collect();
        let w = &self.writes.stats;
        let tokens = self
            .writes
            .tokens
            .list()
            .into_iter()
            .map(|(uid, user, expires)| TokenStatus { uid, user, expires })
            .collect();
        MountStatus {
            mountpoint: String::new(),
            connected: self.is_connected(),
            server: self.remote.preferred_server(),
            read_only: self.writes.read_only(),
            tokens,
            writes: WriteCounters {
                commits: w.commits.load(Ordering::Relaxed),
                failed_commits: w.failed_commits.load(Ordering::Relaxed),
                stored_bytes: w.stored_bytes.load(Ordering::Relaxed),
                write_back: self.backlog(),
            },
            fuse_requests: FUSE_OPS
                .iter()
                .zip(&self.stats.fuse_requests)
                .map(|(n, c)| (n.to_string(), c.load(Ordering::Relaxed)))
                .collect(),
            stale_page_drops: self.stats.stale_page_drops.load(Ordering::Relaxed),
            answered_inline: self.stats.answered_inline.load(Ordering::Relaxed),
            handed_off: self.stats.handed_off.load(Ordering::Relaxed),
            volumes,
            cache: self.cache_status(),
        }
    }

    fn cache_status(&self) -> CacheStatus {
        let (entries, bytes) = self.blobs.usage();
        let (packs, packed_files) = self.blobs.pack_usage();
        let s = &self.blobs.stats;
        let hits = s.hits.load(Ordering::Relaxed);
        let misses = s.misses.load(Ordering::Relaxed);
        CacheStatus {
            entries: entries as u64,
            bytes,
            max_bytes: self.blobs.max_bytes(),
            hits,
            misses,
            hit_ratio: ratio(hits, misses),
            fetched_bytes: s.fetched_bytes.load(Ordering::Relaxed),
            evictions: s.evictions.load(Ordering::Relaxed),
            corrupt_dropped: s.corrupt_dropped.load(Ordering::Relaxed),
            bad_copies_refetched: self.remote.bad_copies(),
            streamed_uncached: self.stats.streamed_uncached.load(Ordering::Relaxed),
            prefetched: self.stats.prefetched.load(Ordering::Relaxed),
            bad_small_copies: self.stats.bad_small_copies.load(Ordering::Relaxed),
            reused_chunk_bytes: self.stats.reused_chunk_bytes.load(Ordering::Relaxed),
            packs: packs as u64,
            packed_files: packed_files as u64,
        }
    }

    /// Files of a volume whose content is cached. Walks the cached listings.
    /// The files of volume `v` whose content is cached, found by walking its cached listings.
    /// The walk looks at most at [`MAX_STATUS_FILES`] files (a status must answer at once,
    /// also for a million-file volume); past that the count is a lower bound.
    fn cached_in(&self, v: &VolState) -> CachedFiles {
        self.cached_in_at_most(v, MAX_STATUS_FILES)
    }

    /// [`Core::cached_in`], looking at most at `max` files.
    fn cached_in_at_most(&self, v: &VolState, max: u64) -> CachedFiles {
        let mut out = CachedFiles {
            complete: true,
            ..CachedFiles::default()
        };
        let mut seen = 0u64;
        let mut stack = vec![v.root_ino];
        while let Some(d) = stack.pop() {
            let Ok(Some(l)) = self.meta.listing(d) else { continue };
            for e in l.iter() {
                match kind_of(e.kind) {
                    NodeKind::Dir => stack.push(e.ino),
                    NodeKind::File => {
                        if seen == max {
                            out.complete = false;
                            return out;
                        }
                        seen += 1;
                        if let Ok(Some(a)) = self.meta.attr(e.ino) {
                            if a.hash.is_some_and(|h| self.blobs.holds(&h)) {
                                out.files += 1;
                                out.bytes += a.size;
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        out
    }
}

/// Most files [`Core::status`] looks at per volume when it counts the cached ones.
pub const MAX_STATUS_FILES: u64 = 200_000;

/// A cache failure as a filesystem error: a full cache disk is [`FsError::NoSpace`].
fn cache_error(e: crate::cache::blobs::CacheError) -> FsError {
    match e {
        crate::cache::blobs::CacheError::Io(e) => FsError::from(e),
        e => FsError::Io(e.to_string()),
    }
}

#[cfg(test)]
mod tests;
