//! The filesystem core: namespace, caches and callback handling, with no FUSE types.
//!
//! `/coda` (node 1) lists the volumes; below that every node id is the server's object id. All
//! metadata comes from the persistent [`MetaStore`] when present and from the servers otherwise;
//! file contents always come from the whole-file [`BlobCache`], fetched in full on first use.
//! Change events drop exactly what they invalidate and return the kernel invalidations to issue
//! (the FUSE adaptor turns them into notifier calls), so everything here is testable without a
//! mount.
//!
//! **One version at a time.** The mount shows each volume as of the last change event it
//! applied (`seen`). Metadata fetched from a replica is cached and shown only once it is that
//! state (see [`Core::settle`]), and an event switches the cache and the kernel's copies while
//! replies that show metadata wait (see [`Core::current`]). So a reader never sees part of a
//! commit and then something older: a published site appears whole.
pub mod error;
pub mod remote;
pub mod write;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use codafs_common::{split_ino, Hash};
use codafs_proto::pb;

pub use error::FsError;
use remote::{Fetched, Remote, RemoteVolume};

use crate::cache::blobs::BlobCache;
use crate::cache::meta::{MetaStore, VolState};

/// Node id of the `/coda` root.
pub const ROOT_INO: u64 = 1;

/// Kinds of node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    File,
    Dir,
    Symlink,
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

/// What a change did to the names the kernel holds (see [`Core::name_changes`]).
#[derive(Debug, Default)]
struct NameChanges {
    /// Names that vanished or lead elsewhere: (directory, name).
    entries: Vec<(u64, String)>,
    /// The nodes those names led to.
    gone: Vec<u64>,
    /// A name now leads elsewhere while its old node is listed elsewhere, or it is unknown.
    moved: bool,
}

/// Vanished names whose nodes are checked one by one; more than this drops every name instead.
const MAX_GONE_CHECKS: usize = 64;

/// Names told to the kernel that are remembered (see [`Core::name_changes`]); past this, all
/// are dropped, in the kernel too, and learnt again.
const MAX_TOLD_NAMES: usize = 1 << 20;

/// What to do with metadata fetched from a replica (see [`Core::settle`]).
enum Settle {
    /// It is the mount's current state, and was cached.
    Cached,
    /// Show it once, do not cache it (its change event did not arrive in time).
    Show,
    /// The replica was behind, or an event switched the state meanwhile: read again.
    Again,
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
pub const FUSE_OPS: [&str; 10] = [
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

fn kind_of(k: i32) -> NodeKind {
    match pb::ObjectKind::try_from(k) {
        Ok(pb::ObjectKind::Directory) => NodeKind::Dir,
        Ok(pb::ObjectKind::Symlink) => NodeKind::Symlink,
        _ => NodeKind::File,
    }
}

/// The filesystem core.
pub struct Core<R: Remote> {
    pub remote: R,
    pub meta: MetaStore,
    pub blobs: BlobCache,
    cfg: CoreConfig,
    volumes: RwLock<BTreeMap<String, VolState>>,
    fetches: Mutex<HashMap<Hash, Arc<tokio::sync::Mutex<()>>>>,
    connected: AtomicBool,
    /// Volumes whose change stream is currently live.
    subscribed: Mutex<HashMap<String, bool>>,
    /// Content cache (hits, misses) per volume id.
    volume_hits: Mutex<HashMap<u32, (u64, u64)>>,
    pub stats: CoreStats,
    /// Tokens, shadows and open handles of writes through the mount.
    pub writes: write::WriteState,
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
    /// The names replies told the kernel, by directory: what it may still cache (see
    /// [`Core::name_changes`]).
    kernel_names: Mutex<HashMap<u64, HashMap<String, u64>>>,
    /// Nodes a change event replaced whose old pages the kernel may still hold, with the size
    /// and mtime the kernel was shown (if known). The kernel keeps pages when those look
    /// unchanged, so the first reply that shows such a node drops them first (see
    /// [`Core::take_stale_pages`]).
    stale_pages: Mutex<HashMap<u64, Option<(u64, i64)>>>,
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
            writes,
            apply_mx: Mutex::new(()),
            view: tokio::sync::RwLock::new(()),
            view_gen: AtomicU64::new(0),
            applied_tx: tokio::sync::watch::channel(0).0,
            stale_pages: Mutex::new(HashMap::new()),
            kernel_names: Mutex::new(HashMap::new()),
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
        let r = match tokio::time::timeout(limit, f).await {
            Ok(r) => r,
            Err(_) => Err(FsError::Disconnected(format!("no answer within {limit:?}"))),
        };
        match &r {
            Ok(_) => self.connected.store(true, Ordering::Relaxed),
            Err(FsError::Disconnected(_)) => {
                self.connected.store(false, Ordering::Relaxed);
                self.stats.remote_errors.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {}
        }
        r
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    pub fn set_subscribed(&self, volume: &str, live: bool) {
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
        let remote: Vec<RemoteVolume> = self.timed(self.cfg.op_timeout, self.remote.volumes()).await?;
        self.set_acls(&remote);
        let mut inv = Invalidation::default();
        let mut vols = self.volumes.write().unwrap_or_else(|p| p.into_inner());
        for rv in &remote {
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
            hash: None,
        }
    }

    fn to_node(&self, a: &pb::Attr) -> NodeAttr {
        let kind = kind_of(a.kind);
        // A writable mount shows the stored mode (what chmod set); its daemon lets everyone read
        // public volumes whatever the mode (core::write::may_access).
        let public = self.writes.read_only() && self.volume_of(a.ino).is_none_or(|v| v.public_read);
        NodeAttr {
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
            hash: Hash::from_slice(&a.hash).ok(),
        }
    }

    /// Raw cached-or-fetched attributes.
    async fn attr(&self, ino: u64) -> Result<pb::Attr, FsError> {
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
        if let Err(FsError::NotFound) = r {
            self.settle_gone(ino).await;
        }
        r
    }

    /// The applied version of the volume holding `ino` (None: not a known volume).
    fn seen_of(&self, ino: u64) -> Option<u64> {
        self.volume_of(ino).map(|v| v.seen)
    }

    /// Orders metadata fetched for node `ino` against the change events this mount applied,
    /// and caches it (`put`) when it is exactly the state the mount shows.
    ///
    /// The mount shows a volume as of its last applied event, `seen`. Data read at replica index
    /// `applied >= seen` whose newest part changed at or before `seen` is that state. Data with
    /// a newer change waits (at most the operation timeout) for that change's event, so the
    /// kernel is never shown part of a commit before the mount has switched to all of it; if
    /// the event does not come (no change stream), the data is shown but not cached. Data from
    /// a replica behind `seen` is read again.
    async fn settle<T>(
        &self,
        ino: u64,
        f: &Fetched<T>,
        put: impl FnOnce(&T) -> Result<(), FsError>,
    ) -> Result<Settle, FsError> {
        if !self.wait_seen(ino, f.newest).await {
            return Ok(Settle::Show);
        }
        let _g = self.apply_mx.lock().unwrap_or_else(|p| p.into_inner());
        match self.seen_of(ino) {
            // Not a known volume: there is no version to keep in step with.
            None => {
                put(&f.value)?;
                Ok(Settle::Cached)
            }
            Some(seen) if f.applied >= seen && f.newest <= seen => {
                put(&f.value)?;
                Ok(Settle::Cached)
            }
            Some(_) => Ok(Settle::Again),
        }
    }

    /// Waits (at most the operation timeout) until the mount has applied the events of the
    /// volume holding `ino` up to `version`; false if they did not come in time.
    async fn wait_seen(&self, ino: u64, version: u64) -> bool {
        let mut rx = self.applied_tx.subscribe();
        let wait = async {
            while self.seen_of(ino).is_some_and(|s| version > s) {
                if rx.changed().await.is_err() {
                    break;
                }
            }
        };
        tokio::time::timeout(self.cfg.op_timeout, wait).await.is_ok()
    }

    /// A node the servers no longer have: its removal may be newer than what the mount shows,
    /// so wait for the volume's current version before answering "gone" (the rest of that
    /// commit is then shown with it).
    async fn settle_gone(&self, ino: u64) {
        let Some(vol) = self.volume_of(ino) else { return };
        if let Ok(Ok(stamps)) = tokio::time::timeout(self.cfg.op_timeout, self.remote.stamps(vec![vol.name])).await {
            if let Some(s) = stamps.into_iter().find(|s| s.exists) {
                self.wait_seen(ino, s.version).await;
            }
        }
    }

    /// Fetches metadata of `ino` and settles it (see [`Core::settle`]).
    async fn fetch_settled<T, Fut>(
        &self,
        ino: u64,
        fetch: impl Fn() -> Fut,
        put: impl Fn(&T) -> Result<(), FsError>,
    ) -> Result<T, FsError>
    where
        Fut: std::future::Future<Output = Result<Fetched<T>, FsError>>,
    {
        // A replica behind the mount (a follower catching up after a failover) is asked again
        // for up to the operation timeout; one that stays behind longer is shown as it is
        // rather than failing the request.
        let deadline = tokio::time::Instant::now() + self.cfg.op_timeout;
        let mut pause = Duration::from_millis(2);
        loop {
            let f = fetch().await?;
            match self.settle(ino, &f, &put).await? {
                Settle::Cached | Settle::Show => return Ok(f.value),
                Settle::Again if tokio::time::Instant::now() + pause > deadline => return Ok(f.value),
                Settle::Again => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(50));
                }
            }
        }
    }

    /// Whether the reply about to show `a` must first drop the kernel's pages of it: true once
    /// after a change replaced it, if its size and mtime look unchanged to the kernel (or the
    /// kernel's view is unknown). When they differ the kernel drops the pages itself on reading
    /// the reply, and dropping them here would make it discard the reply's attributes.
    pub fn take_stale_pages(&self, a: &NodeAttr) -> bool {
        let Some(shown) = self
            .stale_pages
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&a.ino)
        else {
            return false;
        };
        let drop = a.kind != NodeKind::Dir && shown.is_none_or(|s| s == (a.size, a.mtime_ns));
        if drop {
            self.stats.stale_page_drops.fetch_add(1, Ordering::Relaxed);
        }
        drop
    }

    /// Runs `f` and returns its result with a read guard on the view: hold the guard until the
    /// reply is sent. If a change event switched the view while `f` ran, `f` runs again, so a
    /// reply never shows the kernel a state older than one it was already shown.
    pub async fn current<T, Fut>(&self, f: impl Fn() -> Fut) -> (T, tokio::sync::RwLockReadGuard<'_, ()>)
    where
        Fut: std::future::Future<Output = T>,
    {
        for _ in 0..3 {
            let gen = self.view_gen.load(Ordering::Acquire);
            let r = f().await;
            let guard = self.view.read().await;
            if self.view_gen.load(Ordering::Acquire) == gen {
                return (r, guard);
            }
        }
        // Events keep switching the view: run once more holding the guard, which holds the
        // next switch back (a wait inside for an event gives up after the operation timeout).
        let guard = self.view.read().await;
        (f().await, guard)
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
        let mut a = self.to_node(&raw);
        self.shadow_attr(&mut a);
        Ok(a)
    }

    /// A directory's complete listing, cached or fetched.
    async fn listing(&self, ino: u64) -> Result<Vec<crate::cache::meta::DirEnt>, FsError> {
        if let Some(l) = self.meta.dir(ino).map_err(Self::io)? {
            self.stats.meta_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(l);
        }
        self.stats.meta_misses.fetch_add(1, Ordering::Relaxed);
        let attr = self.attr(ino).await?;
        if kind_of(attr.kind) != NodeKind::Dir {
            return Err(FsError::NotDir);
        }
        let entries = self
            .fetch_settled(
                ino,
                || self.timed(self.cfg.op_timeout * 5, self.remote.readdir(ino)),
                |e| self.meta.put_dir(ino, e).map_err(Self::io),
            )
            .await?;
        Ok(entries
            .into_iter()
            .map(|(name, a)| crate::cache::meta::DirEnt {
                name,
                ino: a.ino,
                kind: a.kind,
            })
            .collect())
    }

    pub async fn lookup(&self, parent: u64, name: &str) -> Result<NodeAttr, FsError> {
        if name.len() > codafs_common::names::MAX_NAME_BYTES {
            return Err(FsError::NameTooLong);
        }
        if parent == ROOT_INO {
            let v = self
                .volumes
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(name)
                .cloned();
            let v = v.ok_or(FsError::NotFound)?;
            return self.getattr(v.root_ino).await;
        }
        let listing = match self.listing(parent).await {
            // The directory itself is gone: the kernel walks the path again.
            Err(FsError::NotFound) => return Err(FsError::Stale),
            r => r?,
        };
        let e = listing.iter().find(|e| e.name == name).ok_or(FsError::NotFound)?;
        self.getattr(e.ino).await
    }

    /// Entries of a directory (without `.` and `..`).
    pub async fn readdir(&self, ino: u64) -> Result<Vec<(String, u64, NodeKind)>, FsError> {
        if ino == ROOT_INO {
            let vols = self.volumes.read().unwrap_or_else(|p| p.into_inner());
            return Ok(vols
                .values()
                .map(|v| (v.name.clone(), v.root_ino, NodeKind::Dir))
                .collect());
        }
        Ok(self
            .listing(ino)
            .await?
            .into_iter()
            .map(|e| (e.name, e.ino, kind_of(e.kind)))
            .collect())
    }

    pub async fn readlink(&self, ino: u64) -> Result<String, FsError> {
        let a = self.attr(ino).await?;
        if kind_of(a.kind) != NodeKind::Symlink {
            return Err(FsError::NotSymlink);
        }
        Ok(a.symlink_target)
    }

    /// Makes sure a file's content is in the cache; returns its hash and size.
    pub async fn ensure_cached(&self, ino: u64) -> Result<(Hash, u64), FsError> {
        let a = self.attr(ino).await?;
        match kind_of(a.kind) {
            NodeKind::File => {}
            NodeKind::Dir => return Err(FsError::IsDir),
            NodeKind::Symlink => return Err(FsError::Invalid("symlink".into())),
        }
        let hash = Hash::from_slice(&a.hash).map_err(|e| FsError::Io(e.to_string()))?;
        self.ensure_blob(ino, hash, a.size).await?;
        Ok((hash, a.size))
    }

    /// Makes sure a blob is in the cache (`ino` is only for per-volume hit counting).
    async fn ensure_blob(&self, ino: u64, hash: Hash, size: u64) -> Result<(), FsError> {
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
        self.count_hit(ino, false);
        // Large files get time in proportion to their size (10 MB/s floor) on top of the deadline.
        let limit = self.cfg.op_timeout + Duration::from_millis(size / 10_000);
        let result = self
            .timed(limit, async {
                let mut w = self.blobs.writer(hash, size).map_err(Self::io)?;
                self.remote.fetch_blob(hash, &mut w).await?;
                w.finish().map_err(|e| FsError::Corrupt(e.to_string()))?;
                Ok(())
            })
            .await;
        self.fetches.lock().unwrap_or_else(|p| p.into_inner()).remove(&hash);
        result
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

    /// Reads `size` bytes at `offset` of a file through handle `fh` (0 = none), from the cache.
    pub async fn read(&self, ino: u64, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, FsError> {
        if let Some(r) = self.read_shadow(ino, offset, size) {
            return r;
        }
        let (hash, len) = match self.ensure_cached(ino).await {
            // Unlinked while open: the handle still reads what it opened.
            Err(FsError::NotFound) => {
                let (hash, len) = self.handle_content(fh).ok_or(FsError::NotFound)?;
                self.ensure_blob(ino, hash, len).await?;
                (hash, len)
            }
            r => r?,
        };
        let _pin = self.blobs.pin(hash);
        if offset >= len {
            return Ok(Vec::new());
        }
        let n = (size as u64).min(len - offset) as usize;
        let path = self.blobs.path(&hash);
        let mut buf = vec![0u8; n];
        let f = std::fs::File::open(&path)?;
        let mut done = 0;
        while done < n {
            let r = std::os::unix::fs::FileExt::read_at(&f, &mut buf[done..], offset + done as u64)?;
            if r == 0 {
                break;
            }
            done += r;
        }
        buf.truncate(done);
        Ok(buf)
    }

    /// Applies one change event of `volume`: switches the cache and the kernel's copies to the
    /// event's version in one step, and returns the invalidations that may follow in the
    /// background (page caches, and the names that changed on kernels without name epochs).
    ///
    /// The switch happens under the view's write lock, so no reply computed from the old state
    /// goes out after it; the kernel part of it ([`Invalidator::switch`]) takes no lock a pending
    /// request could hold, so it cannot deadlock with requests waiting for that lock.
    pub async fn apply_change(
        &self,
        volume: &str,
        ev: &pb::ChangeEvent,
        kernel: &dyn Invalidator,
    ) -> Result<Invalidation, FsError> {
        let Some(mut vol) = self
            .volumes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(volume)
            .cloned()
        else {
            return Ok(Invalidation::default());
        };
        if ev.version <= vol.seen && !ev.history_gone {
            return Ok(Invalidation::default());
        }
        // What the change did to the names the kernel holds, found before anything is locked
        // (network reads): the listings after the change, and which nodes that lost a name
        // vanished. A name of a node that is gone from the volume can wait (ESTALE on its next
        // use); one of a node that still exists cannot.
        // All of it within one operation timeout: past that, what is not known is assumed the
        // worst (every name is dropped) rather than holding the event back.
        let deadline = tokio::time::Instant::now() + self.cfg.op_timeout;
        let foreign = !ev.history_gone && !self.writes.is_own(ev.version);
        let mut fresh: HashMap<u64, Option<HashMap<String, u64>>> = HashMap::new();
        if foreign {
            for dir in &ev.dirs {
                if self.told_names_in(*dir) {
                    fresh.insert(*dir, self.listing_after(*dir, ev.version, deadline).await);
                }
            }
        }
        let before = self.name_changes(&ev.dirs, &fresh);
        let mut vanished: std::collections::HashSet<u64> = std::collections::HashSet::new();
        if !before.moved && before.gone.len() <= MAX_GONE_CHECKS {
            for ino in &before.gone {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                if left.is_zero() {
                    break;
                }
                if let Err(FsError::NotFound) = self.timed(left, self.remote.getattr(*ino)).await {
                    vanished.insert(*ino);
                }
            }
        }
        // Wait for our own namespace commits in flight to record what they told the kernel.
        let _inflight = self.writes.inflight.write().await;
        // Our own commit: the kernel already shows it (see write::commit).
        let own = !ev.history_gone && self.writes.take_own(ev.version);
        let mut changed: Vec<u64> = ev.inos.iter().chain(&ev.dirs).copied().collect();
        changed.sort_unstable();
        changed.dedup();
        let mut inv = Invalidation::default();
        {
            let _view = self.view.write().await;
            // No reply goes out now, so the names told to the kernel are all known here. (An own
            // commit's names were told by its own replies; one recorded after `foreign` was
            // decided is handled as anyone's, which is always safe.)
            let names = if own || ev.history_gone {
                NameChanges::default()
            } else if !foreign {
                NameChanges {
                    moved: true,
                    ..NameChanges::default()
                }
            } else {
                self.name_changes(&ev.dirs, &fresh)
            };
            let drop_all = ev.history_gone || names.moved || names.gone.iter().any(|i| !vanished.contains(i));
            {
                let _g = self.apply_mx.lock().unwrap_or_else(|p| p.into_inner());
                if !own {
                    // Our own stores left the new bytes in the kernel's pages; others' did not.
                    // Remember what the kernel was shown of each node (see `take_stale_pages`).
                    let mut stale = self.stale_pages.lock().unwrap_or_else(|p| p.into_inner());
                    if ev.history_gone {
                        stale.clear();
                    }
                    for ino in &changed {
                        let shown = self.meta.attr(*ino).ok().flatten().map(|a| (a.size, a.mtime_ns));
                        stale.insert(*ino, shown);
                    }
                }
                if ev.history_gone {
                    inv = self.everything_in(vol.id)?;
                    self.meta.forget_volume(vol.id).map_err(Self::io)?;
                } else {
                    self.meta.forget(&changed, &ev.dirs).map_err(Self::io)?;
                }
                vol.seen = ev.version;
                self.meta.put_volume(&vol).map_err(Self::io)?;
                self.volumes
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(volume.to_string(), vol);
                self.writes.settled_own(ev.version);
            }
            self.view_gen.fetch_add(1, Ordering::AcqRel);
            inv.inodes.extend(changed.iter().copied());
            inv.inodes.sort_unstable();
            inv.inodes.dedup();
            let dropped = kernel.switch(&inv.inodes, drop_all);
            let mut told = self.kernel_names.lock().unwrap_or_else(|p| p.into_inner());
            if dropped {
                // Every name is looked up again, and told again.
                told.clear();
            } else {
                // Names go one by one, in the background: the kernel frees them, and until then
                // a name of a vanished node answers ESTALE, which makes the kernel look it up
                // again. (Without name epochs a moved name can show its old node until then.)
                for (dir, name) in &names.entries {
                    if let Some(d) = told.get_mut(dir) {
                        d.remove(name);
                    }
                }
                inv.entries.extend(names.entries);
                if !own {
                    // A lookup answered just before the switch may reach the kernel after it,
                    // too late for the attribute drop above: drop the changed files' names too.
                    // The kernel orders that after the lookup (directory lock). Directories keep
                    // theirs (dropping one drops everything cached below it).
                    for (dir, names) in told.iter_mut() {
                        names.retain(|name, ino| {
                            let file = changed.binary_search(ino).is_ok() && !ev.dirs.contains(ino);
                            if file {
                                inv.entries.push((*dir, name.clone()));
                            }
                            !file
                        });
                    }
                }
                if told.values().map(HashMap::len).sum::<usize>() > MAX_TOLD_NAMES {
                    // Bounded memory: forget them all, and make the kernel forget them too.
                    if kernel.switch(&[], true) {
                        told.clear();
                    }
                }
            }
        }
        self.applied_tx.send_modify(|n| *n += 1);
        Ok(inv)
    }

    /// A directory's entries as of at least `version` (a lagging replica is asked again until
    /// `deadline`); a directory that is gone has none. `None`: unknown.
    async fn listing_after(
        &self,
        dir: u64,
        version: u64,
        deadline: tokio::time::Instant,
    ) -> Option<HashMap<String, u64>> {
        let mut pause = Duration::from_millis(2);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return None;
            }
            match self.timed(left, self.remote.readdir(dir)).await {
                Ok(l) if l.applied >= version => {
                    return Some(l.value.into_iter().map(|(n, a)| (n, a.ino)).collect());
                }
                Err(FsError::NotFound) => return Some(HashMap::new()),
                Ok(_) if tokio::time::Instant::now() + pause < deadline => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(50));
                }
                _ => return None,
            }
        }
    }

    /// Whether the kernel was told any name in `dir`.
    fn told_names_in(&self, dir: u64) -> bool {
        self.kernel_names
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&dir)
            .is_some_and(|d| !d.is_empty())
    }

    /// Records that a reply told the kernel `name` in `parent` leads to `ino`; call it while the
    /// view's read guard is held, before the reply is sent.
    pub fn told_name(&self, parent: u64, name: &str, ino: u64) {
        self.kernel_names
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(parent)
            .or_default()
            .insert(name.to_string(), ino);
    }

    /// Records that the kernel dropped `name` in `parent` (our own unlink or rename).
    pub fn forgot_name(&self, parent: u64, name: &str) {
        if let Some(d) = self
            .kernel_names
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&parent)
        {
            d.remove(name);
        }
    }

    /// Which names the kernel holds that a change retargeted, given the directories' listings
    /// after it (`None`: unknown). The kernel learns names only from our replies, and keeps them
    /// until it is told to drop them, so those are the names to check.
    ///
    /// Dropping every cached name (the epoch) also evicts every cached page, so it is done only
    /// when needed: when a name the kernel holds now leads elsewhere while its old node still
    /// exists (a rename), since that name would keep showing the old node. A name whose node
    /// vanished needs nothing at once: the switch dropped the node's attributes, the kernel asks
    /// for them on the next use, gets ESTALE and looks the name up again. Added names need
    /// nothing: the kernel does not keep our "not found" answers.
    fn name_changes(&self, dirs: &[u64], fresh: &HashMap<u64, Option<HashMap<String, u64>>>) -> NameChanges {
        let mut out = NameChanges::default();
        let told = self.kernel_names.lock().unwrap_or_else(|p| p.into_inner());
        let mut listed: std::collections::HashSet<u64> = std::collections::HashSet::new();
        for (dir, names) in told.iter() {
            let Some(listing) = fresh.get(dir) else {
                continue;
            };
            let Some(listing) = listing else {
                // The new listing is unknown: assume the worst.
                out.moved = true;
                out.entries.extend(names.keys().map(|n| (*dir, n.clone())));
                continue;
            };
            for (name, ino) in names {
                if listing.get(name) != Some(ino) {
                    out.entries.push((*dir, name.clone()));
                    out.gone.push(*ino);
                }
            }
            listed.extend(listing.values().copied());
        }
        // A changed directory the kernel had no name of when the listings were fetched, and was
        // told one since: its new listing is unknown.
        if dirs
            .iter()
            .any(|d| !fresh.contains_key(d) && told.get(d).is_some_and(|n| !n.is_empty()))
        {
            out.moved = true;
        }
        if out.gone.iter().any(|i| listed.contains(i)) {
            out.moved = true;
        }
        out
    }

    /// Invalidations covering everything cached of a volume.
    fn everything_in(&self, id: u32) -> Result<Invalidation, FsError> {
        let mut inv = Invalidation::default();
        let vols = self.volumes.read().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = vols.values().find(|v| v.id == id) {
            let mut stack = vec![v.root_ino];
            while let Some(d) = stack.pop() {
                inv.inodes.push(d);
                if let Some(l) = self.meta.dir(d).map_err(Self::io)? {
                    for e in l {
                        inv.entries.push((d, e.name.clone()));
                        if kind_of(e.kind) == NodeKind::Dir {
                            stack.push(e.ino);
                        } else {
                            inv.inodes.push(e.ino);
                        }
                    }
                }
            }
        }
        Ok(inv)
    }

    /// Status for `codafs status MNT`.
    pub fn status(&self) -> serde_json::Value {
        let subs = self.subscribed.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let (entries, bytes) = self.blobs.usage();
        let s = &self.blobs.stats;
        let hits = s.hits.load(Ordering::Relaxed);
        let misses = s.misses.load(Ordering::Relaxed);
        let vols: Vec<_> = self
            .volumes()
            .into_iter()
            .map(|v| {
                let (h, m) = self
                    .volume_hits
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&v.id)
                    .copied()
                    .unwrap_or_default();
                serde_json::json!({
                    "name": v.name,
                    "version": v.seen,
                    "connected": subs.get(&v.name).copied().unwrap_or(false),
                    "cached": self.cached_in(&v),
                    "hits": h,
                    "misses": m,
                    "hit_ratio": if h + m == 0 { 0.0 } else { h as f64 / (h + m) as f64 },
                })
            })
            .collect();
        let fuse: serde_json::Map<String, serde_json::Value> = FUSE_OPS
            .iter()
            .zip(&self.stats.fuse_requests)
            .map(|(n, c)| (n.to_string(), c.load(Ordering::Relaxed).into()))
            .collect();
        let w = &self.writes.stats;
        let tokens: Vec<_> = self
            .writes
            .tokens
            .list()
            .into_iter()
            .map(|(uid, user, expires)| serde_json::json!({ "uid": uid, "user": user, "expires": expires }))
            .collect();
        serde_json::json!({
            "connected": self.is_connected(),
            "read_only": self.writes.read_only(),
            "tokens": tokens,
            "writes": {
                "commits": w.commits.load(Ordering::Relaxed),
                "failed_commits": w.failed_commits.load(Ordering::Relaxed),
                "stored_bytes": w.stored_bytes.load(Ordering::Relaxed),
            },
            "fuse_requests": fuse,
            "stale_page_drops": self.stats.stale_page_drops.load(Ordering::Relaxed),
            "volumes": vols,
            "cache": {
                "entries": entries, "bytes": bytes, "max_bytes": self.blobs.max_bytes(),
                "hits": hits, "misses": misses,
                "hit_ratio": if hits + misses == 0 { 0.0 } else { hits as f64 / (hits + misses) as f64 },
                "fetched_bytes": s.fetched_bytes.load(Ordering::Relaxed),
                "evictions": s.evictions.load(Ordering::Relaxed),
                "corrupt_dropped": s.corrupt_dropped.load(Ordering::Relaxed),
                "bad_copies_refetched": self.remote.bad_copies(),
            },
        })
    }

    /// Files of a volume whose content is cached: (files, bytes). Walks the cached listings.
    fn cached_in(&self, v: &VolState) -> serde_json::Value {
        let (mut files, mut bytes) = (0u64, 0u64);
        let mut stack = vec![v.root_ino];
        while let Some(d) = stack.pop() {
            let Ok(Some(l)) = self.meta.dir(d) else { continue };
            for e in l {
                match kind_of(e.kind) {
                    NodeKind::Dir => stack.push(e.ino),
                    NodeKind::File => {
                        if let Ok(Some(a)) = self.meta.attr(e.ino) {
                            if Hash::from_slice(&a.hash).is_ok_and(|h| self.blobs.path(&h).exists()) {
                                files += 1;
                                bytes += a.size;
                            }
                        }
                    }
                    NodeKind::Symlink => {}
                }
            }
        }
        serde_json::json!({ "files": files, "bytes": bytes })
    }
}

#[cfg(test)]
mod tests;
