//! Writes through the mount, with Coda/AFS session semantics.
//!
//! A file opened for writing gets a *shadow*: a private local copy of its current content (empty
//! after a truncate). Writes, reads and size changes of that file go to the shadow while it is
//! open. On `close` (FUSE flush) or `fsync`, a changed shadow is stored: its blob reaches the
//! volume's write quorum, then one commit points the file at it. Other nodes see the new content
//! after their callback; a failed store or commit is returned by that `close`/`fsync` and leaves
//! the old content in place. Namespace operations (create, mkdir, unlink, rename, link, chmod,
//! utimens...) are one commit each, sent at once.
//!
//! Every change is made with the token of the calling local uid (see [`crate::tokens`]): no token
//! (root included) or a `--read-only` mount means `EROFS`; a token whose user may not write the
//! volume means `EACCES`. Servers check again; these checks only give the friendlier errno early.
//!
//! Concurrent writers of one file: last store wins (as in AFS). Each store replaces the whole
//! content, so a reader never sees a mix of two writers' bytes.
//!
//! Here: the write state, who may write, and the namespace operations. Shadows are in
//! `shadow.rs`, open handles (open, flush, release) in `handles.rs`, and the read permission
//! checks of writable mounts in `access.rs`.
use std::collections::{HashMap, HashSet};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use codafs_common::names::{validate_name, NameError};
use codafs_common::token::{Claims, Role};
use codafs_common::{split_ino, Hash};

use super::remote::{ChunkSink, Readers, Remote, RemoteVolume};
use super::types::{Committed, Op};
use super::{kind_code, Core, FsError, NodeAttr, NodeKind, ROOT_INO};
use crate::blocking::blocking;
use crate::tokens::TokenTable;

mod access;
pub mod back;
mod batch;
mod handles;
mod names;
mod shadow;

pub use back::{BacklogStatus, WriteBack};

use handles::Handle;
use shadow::{lock, Payload, Shadow, ShadowInit};

/// Largest file the mount stores (1 TiB): larger contents are stored in chunks, so no buffer
/// grows with the file; the bound keeps a manifest within the servers' limits.
pub const MAX_WRITE_FILE: u64 = codafs_common::chunks::MAX_CONTENT;

/// The process asking: the kernel's uid and gid of the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

/// Who may write a volume, from the last volume list.
#[derive(Debug, Clone)]
struct VolumeAcl {
    owner: String,
    writers: Vec<String>,
    write_quorum: u32,
}

#[derive(Debug, Default)]
pub struct WriteStats {
    pub commits: AtomicU64,
    /// Stores that failed: a commit refused or failed, or its content refused by the servers
    /// (a blob put over the uploader's quota headroom, for one).
    pub failed_commits: AtomicU64,
    pub stored_bytes: AtomicU64,
}

/// The write side of the core.
pub struct WriteState {
    pub tokens: TokenTable,
    read_only: bool,
    shadow_dir: PathBuf,
    acls: RwLock<HashMap<String, VolumeAcl>>,
    shadows: Mutex<HashMap<u64, Arc<Mutex<Shadow>>>>,
    handles: Mutex<HashMap<u64, Handle>>,
    next_fh: AtomicU64,
    /// Shadows living in memory (see `shadow.rs`).
    memory_shadows: std::sync::atomic::AtomicUsize,
    /// Write quorums for which the empty blob (new files' content) is known stored.
    empty_stored: Mutex<HashSet<u32>>,
    /// Per volume: held (shared) by a namespace commit until it has recorded its version and
    /// the names it told the kernel, and patched the cached listings; (exclusively) while a
    /// change event of that volume is applied. The event of our own commit is then known as ours
    /// and drops none of the kernel's names (dropping them would also detach anything mounted
    /// there). Per volume, so a slow commit holds back only its own volume's callbacks.
    inflight: Mutex<HashMap<u32, Arc<tokio::sync::RwLock<()>>>>,
    /// One store of a file at a time, snapshot to commit: a store that started later (with
    /// newer content) must also commit later.
    store_locks: Mutex<HashMap<u64, Arc<tokio::sync::Mutex<()>>>>,
    /// Versions of our own acknowledged commits whose change events have not arrived yet: the
    /// kernel already shows them (bounded; the oldest are dropped).
    own: Mutex<std::collections::BTreeSet<u64>>,
    /// The newest of our own acknowledged commits: a replica that has not applied it may
    /// answer with what that commit replaced (see `Core::settle`).
    own_floor: AtomicU64,
    pub stats: WriteStats,
    /// The write-back log and its overlay (`None`: write-through, or a read-only mount).
    back: Option<WriteBack>,
}

/// How many own commit versions are remembered until their events arrive.
const OWN_RETAIN: usize = 4096;

impl WriteState {
    /// `shadow_dir` holds open files' copies; it is emptied here (leftovers of a crash are
    /// uncommitted writes whose `close` never returned success). With `back`, changes go
    /// through that write-back log.
    pub fn new(
        tokens: TokenTable,
        read_only: bool,
        shadow_dir: PathBuf,
        back: Option<WriteBack>,
    ) -> Result<Self, std::io::Error> {
        let _ = std::fs::remove_dir_all(&shadow_dir);
        std::fs::create_dir_all(&shadow_dir)?;
        Ok(WriteState {
            tokens,
            read_only,
            shadow_dir,
            acls: RwLock::new(HashMap::new()),
            shadows: Mutex::new(HashMap::new()),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            memory_shadows: Default::default(),
            empty_stored: Mutex::new(HashSet::new()),

            inflight: Mutex::new(HashMap::new()),
            store_locks: Mutex::new(HashMap::new()),
            own: Mutex::new(std::collections::BTreeSet::new()),
            own_floor: AtomicU64::new(0),
            stats: WriteStats::default(),
            back,
        })
    }

    /// The in-flight lock of volume `vol` (see the field).
    pub(crate) fn inflight(&self, vol: u32) -> Arc<tokio::sync::RwLock<()>> {
        self.inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(vol)
            .or_default()
            .clone()
    }

    /// Records the version of one of our own acknowledged commits.
    fn record_own(&self, version: u64) {
        self.own_floor.fetch_max(version, Ordering::AcqRel);
        let mut own = self.own.lock().unwrap_or_else(|p| p.into_inner());
        own.insert(version);
        while own.len() > OWN_RETAIN {
            own.pop_first();
        }
    }

    /// The log index every answer must reflect: our newest acknowledged commit.
    pub(crate) fn own_floor(&self) -> u64 {
        self.own_floor.load(Ordering::Acquire)
    }

    /// Whether `version` is one of our own commits.
    pub(crate) fn is_own(&self, version: u64) -> bool {
        self.own.lock().unwrap_or_else(|p| p.into_inner()).contains(&version)
    }

    /// Whether `version` is one of our own commits (forgotten once asked).
    pub(crate) fn take_own(&self, version: u64) -> bool {
        self.own.lock().unwrap_or_else(|p| p.into_inner()).remove(&version)
    }

    /// Forgets own commits at or below an applied event's version: their events came first
    /// (they are then handled as anyone's, which is always safe).
    pub(crate) fn settled_own(&self, version: u64) {
        let mut own = self.own.lock().unwrap_or_else(|p| p.into_inner());
        *own = own.split_off(&(version + 1));
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Takes one of the in-memory shadow slots, if one is free.
    fn take_memory_shadow(&self) -> bool {
        self.memory_shadows
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < shadow::IN_MEMORY_SHADOWS).then_some(n + 1)
            })
            .is_ok()
    }

    fn put_memory_shadow(&self) {
        let _ = self
            .memory_shadows
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// A node as this mount's unsent changes leave it, if they touch it.
    pub(crate) fn pending(&self, ino: u64) -> Option<back::Pending> {
        self.back.as_ref()?.pending(ino)
    }

    /// Whether `ino` is a directory created here that the servers do not have yet.
    pub(crate) fn new_dir(&self, ino: u64) -> bool {
        self.back.as_ref().is_some_and(|b| b.new_dir(ino))
    }

    /// Applies the names this mount made or removed in `dir` and has not sent yet to a listing
    /// of it.
    pub(crate) fn add_new_names(&self, dir: u64, l: &mut Vec<crate::cache::meta::DirEnt>) {
        let new = self.new_names(dir);
        if new.is_empty() {
            return;
        }
        let names: HashSet<&str> = new.iter().map(|(n, _)| n.as_str()).collect();
        l.retain(|e| !names.contains(e.name.as_str()));
        l.extend(new.iter().filter_map(|(name, now)| {
            now.map(|(ino, kind)| crate::cache::meta::DirEnt {
                name: name.clone(),
                ino,
                kind: kind_code(kind),
            })
        }));
        l.sort_unstable_by(|a, b| a.name.cmp(&b.name));
    }

    /// The names this mount made or removed in `dir` and has not sent yet.
    pub(crate) fn new_names(&self, dir: u64) -> Vec<(String, back::NameNow)> {
        self.back.as_ref().map_or_else(Vec::new, |b| b.names_in(dir))
    }

    /// What a name this mount made or removed in `dir` (not sent yet) leads to: `Some(None)`
    /// if it was removed here.
    pub(crate) fn new_name(&self, dir: u64, name: &str) -> Option<Option<u64>> {
        self.back.as_ref()?.new_name(dir, name)
    }

    /// Files open for writing here (they have a shadow).
    pub(crate) fn open_shadows(&self) -> HashSet<u64> {
        self.shadows
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .copied()
            .collect()
    }

    /// The version the file open for writing as `ino` was opened at (what its content expects
    /// when closed), if it is open and still has a name.
    pub(crate) fn open_base(&self, ino: u64) -> Option<u64> {
        let sh = self.shadow(ino)?;
        let g = shadow::lock(&sh);
        (!g.unlinked).then_some(g.base_version)
    }

    fn shadow(&self, ino: u64) -> Option<Arc<Mutex<Shadow>>> {
        self.shadows
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&ino)
            .cloned()
    }

    fn handle(&self, fh: u64) -> Option<(u64, u32, bool)> {
        self.handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&fh)
            .map(|h| (h.ino, h.uid, h.write))
    }
}

fn may_write(claims: &Claims, acl: &VolumeAcl) -> bool {
    claims.role == Role::Admin || acl.owner == claims.user || acl.writers.contains(&claims.user)
}

fn check_name(name: &str) -> Result<(), FsError> {
    validate_name(name).map_err(|e| match e {
        NameError::TooLong(_) => FsError::NameTooLong,
        NameError::Reserved(_) => FsError::Exists,
        other => FsError::Invalid(other.to_string()),
    })
}

/// What a change needs: the caller's token and the volume's name and write quorum.
struct WriteCtx {
    token: String,
    volume: String,
    write_quorum: u32,
}

/// Attribute changes of one `setattr`.
#[derive(Debug, Default, Clone)]
pub struct SetAttrs {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime_ns: Option<i64>,
    pub mtime_ns: Option<i64>,
}

impl<R: Remote> Core<R> {
    /// Records who may write each volume (called with every fresh volume list).
    pub(crate) fn set_acls(&self, vols: &[RemoteVolume]) {
        let mut acls = self.writes.acls.write().unwrap_or_else(|p| p.into_inner());
        acls.clear();
        for v in vols {
            acls.insert(
                v.name.clone(),
                VolumeAcl {
                    owner: v.owner.clone(),
                    writers: v.writers.clone(),
                    write_quorum: v.write_quorum.max(1),
                },
            );
        }
    }

    /// Tells the remote which held token reads each private volume (see [`Readers`]): the
    /// first, by uid, whose account may write it. Called when tokens or the volume list change.
    pub fn sync_readers(&self) {
        let tokens = self.writes.tokens.all();
        let acls = self.writes.acls.read().unwrap_or_else(|p| p.into_inner()).clone();
        let mut readers = Readers {
            all: tokens.iter().map(|(t, _)| t.clone()).collect(),
            ..Default::default()
        };
        readers.all.dedup();
        for v in self.volumes().into_iter().filter(|v| !v.public_read) {
            let Some(acl) = acls.get(&v.name) else { continue };
            if let Some((t, _)) = tokens.iter().find(|(_, c)| may_write(c, acl)) {
                readers.by_id.insert(v.id, t.clone());
                readers.by_name.insert(v.name.clone(), t.clone());
            }
        }
        self.remote.set_readers(readers);
    }

    /// Checks that `uid` may change the volume holding `ino`, and returns what the change needs.
    fn write_ctx(&self, uid: u32, ino: u64) -> Result<WriteCtx, FsError> {
        if self.writes.read_only {
            return Err(FsError::ReadOnly);
        }
        let (token, claims) = self.writes.tokens.get(uid).ok_or(FsError::ReadOnly)?;
        if ino == ROOT_INO {
            return Err(FsError::NotPermitted(
                "volumes are created with `codafs volume create`".into(),
            ));
        }
        let vol = self.volume_of(ino).ok_or(FsError::NotFound)?;
        let acl = self
            .writes
            .acls
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&vol.name)
            .cloned();
        if let Some(a) = &acl {
            if !may_write(&claims, a) {
                return Err(FsError::Denied(format!(
                    "{} may not write volume {}",
                    claims.user, vol.name
                )));
            }
        }
        Ok(WriteCtx {
            token,
            volume: vol.name,
            write_quorum: acl.map_or(crate::policy::DEFAULT_WRITE_QUORUM, |a| a.write_quorum),
        })
    }

    fn write_timeout(&self, bytes: u64) -> Duration {
        // Commits may wait out a leader election; large blobs get time for their size on top.
        crate::policy::transfer_timeout((self.cfg.op_timeout * 5).max(Duration::from_secs(10)), bytes)
    }

    /// Commits `ops`; afterwards forgets cached metadata of `inos` (attributes and listings)
    /// whatever the outcome, since a broken call may still have committed.
    async fn commit(&self, ctx: &WriteCtx, ops: Vec<Op>, inos: &[u64]) -> Result<Committed, FsError> {
        let perms = super::types::perms_set(&ops);
        let r = self
            .timed(
                self.write_timeout(0),
                self.remote
                    .commit(&ctx.token, &ctx.volume, ops, super::remote::new_request_id()),
            )
            .await;
        if let Ok(reply) = &r {
            // Attributes changed; listings are patched by the caller (see `inflight`). The floor
            // first: a fetch older than this commit settling meanwhile is then not cached, or
            // was cached before the attributes are forgotten here.
            self.own_commit(reply.version);
            self.meta.forget_attrs(inos, &perms).map_err(Self::io)?;
        } else {
            // Outcome unknown or refused: drop what we know of these nodes, listings included.
            self.meta.forget(inos, &[]).map_err(Self::io)?;
        }
        let counter = match &r {
            Ok(_) => &self.writes.stats.commits,
            Err(e) => {
                tracing::info!(volume = %ctx.volume, error = %e, "commit refused or failed");
                &self.writes.stats.failed_commits
            }
        };
        counter.fetch_add(1, Ordering::Relaxed);
        r
    }

    /// Records our own commit `version`: the floor every cached answer must reach. Taken under
    /// `apply_mx`, so a fetch cannot check the old floor, let this commit's listing patch run,
    /// and then be cached over that patch (the patch always follows this call).
    pub(super) fn own_commit(&self, version: u64) {
        let _g = self.apply_mx.lock().unwrap_or_else(|p| p.into_inner());
        self.writes.record_own(version);
    }

    /// Stores a blob on the volume's write quorum and keeps a copy in the local cache.
    async fn store_blob(&self, ctx: &WriteCtx, data: bytes::Bytes) -> Result<Hash, FsError> {
        let len = data.len() as u64;
        let hash = blocking(len, || Hash::of(&data));
        let put = self
            .timed(
                self.write_timeout(len),
                self.remote.put_blob(&ctx.token, data.clone(), ctx.write_quorum),
            )
            .await;
        if let Err(e) = put {
            tracing::info!(volume = %ctx.volume, error = %e, "content store refused or failed");
            self.writes.stats.failed_commits.fetch_add(1, Ordering::Relaxed);
            return Err(e);
        }
        self.writes.stats.stored_bytes.fetch_add(len, Ordering::Relaxed);
        if !self.blobs.lookup(&hash) {
            // The writer reads its own file next: keep it cached instead of fetching it back.
            blocking(len, || {
                if let Ok(mut w) = self.blobs.writer(hash, len) {
                    if w.write(&data).is_ok() {
                        let _ = w.finish();
                    }
                }
            });
        }
        Ok(hash)
    }

    /// Stores a large file (`size` bytes of `file`, a chunked size) on the volume's write
    /// quorum, only the chunks the replicas lack, and keeps a copy in the local cache.
    async fn store_chunked(&self, ctx: &WriteCtx, file: &std::fs::File, size: u64) -> Result<Hash, FsError> {
        let put = self
            .timed(
                self.write_timeout(size),
                self.put_chunked(&ctx.token, file, size, ctx.write_quorum, None),
            )
            .await;
        let (hash, manifest) = match put {
            Ok(r) => r,
            Err(e) => {
                tracing::info!(volume = %ctx.volume, error = %e, "content store refused or failed");
                self.writes.stats.failed_commits.fetch_add(1, Ordering::Relaxed);
                return Err(e);
            }
        };
        // Counted here, not in `put_chunked`: the write-back log counts a file when it logs it,
        // and its reintegrator's put counted it again.
        self.writes.stats.stored_bytes.fetch_add(size, Ordering::Relaxed);
        if !self.blobs.lookup(&hash) {
            // The writer reads its own file next: keep it cached instead of fetching it back.
            if let Err(e) = blocking(size, || self.cache_chunks(hash, &manifest, file)) {
                tracing::debug!(%hash, error = %e, "a stored large file was not kept in the cache");
            }
        }
        Ok(hash)
    }

    /// Copies a large file's chunks from `file` into the cache as content `hash`, checking
    /// each against `manifest` (the file may have changed since it was cut).
    fn cache_chunks(
        &self,
        hash: Hash,
        manifest: &codafs_common::chunks::Manifest,
        file: &std::fs::File,
    ) -> Result<(), FsError> {
        let mut w = self
            .blobs
            .writer(hash, manifest.size())
            .map_err(|e| FsError::NoSpace(format!("caching written content: {e}")))?;
        for (off, c) in manifest.with_offsets() {
            let Some(buf) = super::chunked::read_chunk(file, off, c)? else {
                return Err(FsError::Changed(format!("chunk {} at {off} reads differently", c.hash)));
            };
            w.write(&buf)?;
        }
        w.chunks_verified();
        w.finish().map(drop).map_err(|e| FsError::Io(e.to_string()))
    }

    async fn ensure_empty_blob(&self, ctx: &WriteCtx) -> Result<Hash, FsError> {
        let empty = Hash::of(b"");
        let known = self
            .writes
            .empty_stored
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&ctx.write_quorum);
        if !known {
            self.store_blob(ctx, bytes::Bytes::new()).await?;
            self.writes
                .empty_stored
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(ctx.write_quorum);
        }
        Ok(empty)
    }

    /// Attributes right after our own change (read-your-writes; see `Core::fetch_own`).
    async fn fresh_attr(&self, ino: u64) -> Result<NodeAttr, FsError> {
        let attr = self.fetch_own(ino).await?;
        Ok(self.to_node(&attr))
    }

    /// Creates a file, directory or symlink; returns its attributes.
    #[allow(clippy::too_many_arguments)]
    async fn create_node(
        &self,
        c: Caller,
        ctx: &WriteCtx,
        parent: u64,
        name: &str,
        (kind, rdev): (NodeKind, u64),
        mode: u32,
        target: &str,
    ) -> Result<NodeAttr, FsError> {
        check_name(name)?;
        if self.writes_back() {
            return self
                .create_logged(c, ctx, parent, name, (kind, rdev), mode, target)
                .await;
        }
        let hash = match kind {
            NodeKind::File => Some(self.ensure_empty_blob(ctx).await?),
            _ => None,
        };
        let create = Op::Create {
            ino: None,
            parent,
            name: name.to_string(),
            kind,
            mode: mode & 0o7777,
            hash,
            symlink_target: target.to_string(),
            rdev,
            uid: c.uid,
            gid: c.gid,
            size: 0,
            mtime_ns: 0,
        };
        let lock = self.writes.inflight(split_ino(parent).0);
        let inflight = lock.read().await;
        let reply = self.commit(ctx, vec![create], &[parent]).await?;
        let ino = reply
            .created
            .first()
            .copied()
            .filter(|i| *i != 0)
            .ok_or_else(|| FsError::Io("the server did not name the new node".into()))?;
        self.meta
            .patch_dir(parent, name, Some((ino, kind_code(kind))))
            .map_err(Self::io)?;
        self.told_name(parent, name, ino);
        drop(inflight);
        self.fresh_attr(ino).await
    }

    /// `creat`/`open(O_CREAT)`: a new empty file, open for writing.
    pub async fn create(&self, c: Caller, parent: u64, name: &str, mode: u32) -> Result<(NodeAttr, u64), FsError> {
        let ctx = self.write_ctx(c.uid, parent)?;
        let attr = self
            .create_node(c, &ctx, parent, name, (NodeKind::File, 0), mode, "")
            .await?;
        let fh = self.open_handle(attr.ino, c.uid, true, ShadowInit::Empty).await?;
        Ok((attr, fh))
    }

    /// `mknod`: a regular file (as `creat` makes), or a FIFO, socket or device node (stored as
    /// metadata only; the kernel serves their I/O on each node by itself).
    pub async fn mknod(&self, c: Caller, parent: u64, name: &str, mode: u32, rdev: u64) -> Result<NodeAttr, FsError> {
        let ctx = self.write_ctx(c.uid, parent)?;
        let kind = NodeKind::from_mode(mode)
            .ok_or_else(|| FsError::Invalid(format!("mknod of file type {:o}", mode & libc::S_IFMT)))?;
        let rdev = if matches!(kind, NodeKind::CharDevice | NodeKind::BlockDevice) {
            rdev
        } else {
            0
        };
        self.create_node(c, &ctx, parent, name, (kind, rdev), mode, "").await
    }

    pub async fn mkdir(&self, c: Caller, parent: u64, name: &str, mode: u32) -> Result<NodeAttr, FsError> {
        let ctx = self.write_ctx(c.uid, parent)?;
        self.create_node(c, &ctx, parent, name, (NodeKind::Dir, 0), mode, "")
            .await
    }

    pub async fn symlink(&self, c: Caller, parent: u64, name: &str, target: &str) -> Result<NodeAttr, FsError> {
        let ctx = self.write_ctx(c.uid, parent)?;
        if target.is_empty() || target.len() > 4096 {
            return Err(FsError::NameTooLong);
        }
        self.create_node(c, &ctx, parent, name, (NodeKind::Symlink, 0), 0o777, target)
            .await
    }

    /// `unlink` (`dir` false) or `rmdir` (`dir` true).
    pub async fn remove(&self, c: Caller, parent: u64, name: &str, dir: bool) -> Result<(), FsError> {
        let ctx = self.write_ctx(c.uid, parent)?;
        if self.writes_back() {
            return self.remove_logged(c, &ctx, parent, name, dir).await;
        }
        let child = self.lookup(parent, name).await?;
        match (dir, child.kind == NodeKind::Dir) {
            (false, true) => return Err(FsError::IsDir),
            (true, false) => return Err(FsError::NotDir),
            _ => {}
        }
        let rm = Op::Remove {
            parent,
            name: name.to_string(),
            seen: None,
            expect: None,
        };
        let lock = self.writes.inflight(split_ino(parent).0);
        let _inflight = lock.read().await;
        self.commit(&ctx, vec![rm], &[parent, child.ino]).await?;
        self.meta.patch_dir(parent, name, None).map_err(Self::io)?;
        self.forgot_name(parent, name);
        if dir {
            self.meta.forget(&[child.ino], &[]).map_err(Self::io)?;
        }
        Ok(())
    }

    /// `rename`, atomic inside a volume. `noreplace` is RENAME_NOREPLACE; RENAME_EXCHANGE is
    /// refused by the adaptor.
    pub async fn rename(
        &self,
        c: Caller,
        parent: u64,
        name: &str,
        new_parent: u64,
        new_name: &str,
        noreplace: bool,
    ) -> Result<(), FsError> {
        let ctx = self.write_ctx(c.uid, parent)?;
        if new_parent == ROOT_INO || split_ino(parent).0 != split_ino(new_parent).0 {
            return Err(FsError::CrossVolume);
        }
        self.write_ctx(c.uid, new_parent)?;
        check_name(new_name)?;
        if self.writes_back() {
            return self
                .rename_logged(c, &ctx, (parent, name), (new_parent, new_name), noreplace)
                .await;
        }
        let src = self.lookup(parent, name).await?;
        let dst = match self.lookup(new_parent, new_name).await {
            Ok(a) => Some(a.ino),
            Err(FsError::NotFound) => None,
            Err(e) => return Err(e),
        };
        if noreplace && dst.is_some() {
            return Err(FsError::Exists);
        }
        let mv = Op::Rename {
            from_parent: parent,
            from_name: name.to_string(),
            to_parent: new_parent,
            to_name: new_name.to_string(),
            seen: None,
            replaces: None,
        };
        let mut inos = vec![parent, new_parent, src.ino];
        inos.extend(dst);
        let lock = self.writes.inflight(split_ino(parent).0);
        let _inflight = lock.read().await;
        self.commit(&ctx, vec![mv], &inos).await?;
        self.meta.patch_dir(parent, name, None).map_err(Self::io)?;
        self.meta
            .patch_dir(new_parent, new_name, Some((src.ino, kind_code(src.kind))))
            .map_err(Self::io)?;
        self.forgot_name(parent, name);
        self.told_name(new_parent, new_name, src.ino);
        Ok(())
    }

    /// `link`: another name for a file or symlink of the same volume.
    pub async fn link(&self, c: Caller, ino: u64, new_parent: u64, new_name: &str) -> Result<NodeAttr, FsError> {
        let ctx = self.write_ctx(c.uid, new_parent)?;
        if split_ino(ino).0 != split_ino(new_parent).0 {
            return Err(FsError::CrossVolume);
        }
        check_name(new_name)?;
        let node = self.getattr(ino).await?;
        if node.kind == NodeKind::Dir {
            return Err(FsError::NotPermitted("directories cannot be hard-linked".into()));
        }
        let l = Op::Link {
            ino,
            parent: new_parent,
            name: new_name.to_string(),
            kind: node.kind,
        };
        if self.writes_back() {
            return self.link_logged(c, &ctx, l).await;
        }
        let lock = self.writes.inflight(split_ino(new_parent).0);
        let inflight = lock.read().await;
        self.commit(&ctx, vec![l], &[new_parent, ino]).await?;
        self.meta
            .patch_dir(new_parent, new_name, Some((ino, kind_code(node.kind))))
            .map_err(Self::io)?;
        self.told_name(new_parent, new_name, ino);
        drop(inflight);
        self.fresh_attr(ino).await
    }

    /// `setattr`: mode, owner, times, and size (truncate). A size change of a file open for
    /// writing goes to its shadow (stored on close, or at once if its last handle was released
    /// meanwhile); otherwise it is stored at once.
    pub async fn setattr(&self, c: Caller, ino: u64, s: SetAttrs) -> Result<NodeAttr, FsError> {
        let ctx = self.write_ctx(c.uid, ino)?;
        // Whether the size change stores content, which carries the new mtime with its
        // version check: the mtime then goes in no separate attribute change, which checks no
        // version and so, with the content refused as a conflict, set this node's mtime on the
        // other node's content.
        let mut content_has_mtime = false;
        if let Some(size) = s.size {
            if size > MAX_WRITE_FILE {
                return Err(FsError::TooLarge(format!(
                    "the mount stores files up to {MAX_WRITE_FILE} bytes"
                )));
            }
            self.check_loggable(size)?;
            // Pinned: a file just closed keeps its shadow until its release, which may run
            // meanwhile; the last of the two stores the truncated shadow.
            match self.pin_shadow(ino) {
                Some(sh) => {
                    let cut = {
                        let mut g = lock(&sh);
                        g.file.set_len(size).map(|()| {
                            g.writers.insert(c.uid);
                            g.size = size;
                            g.dirty = true;
                            g.failed = false;
                            g.generation += 1;
                            g.mtime_ns = s.mtime_ns.unwrap_or_else(codafs_common::now_ns);
                            g.ctime_ns = codafs_common::now_ns();
                        })
                    };
                    content_has_mtime = true;
                    let (stored, dropped) = self.let_go(ino, c.uid, &sh, false).await;
                    cut?;
                    stored?;
                    if dropped {
                        return Err(FsError::Io(
                            "the file's changes could not be stored; it shows its committed content".into(),
                        ));
                    }
                }
                None => {
                    let a = self.getattr(ino).await?;
                    match a.kind {
                        NodeKind::Dir => return Err(FsError::IsDir),
                        NodeKind::File => {}
                        _ => return Err(FsError::Invalid("only regular files can be truncated".into())),
                    }
                    if size != a.size {
                        if size != 0 && a.size > MAX_WRITE_FILE {
                            return Err(FsError::TooLarge(format!(
                                "the mount stores files up to {MAX_WRITE_FILE} bytes"
                            )));
                        }
                        let data = if size == 0 {
                            Payload::Memory(Vec::new())
                        } else {
                            let (hash, len) = self.ensure_cached(ino).await?;
                            let _pin = self.blobs.pin(hash);
                            self.truncated(ino, &hash, len, size)?
                        };
                        let mtime = s.mtime_ns.unwrap_or(0);
                        content_has_mtime = true;
                        if self.writes_back() {
                            // Logged like a close's content, expecting the version shown now.
                            let base = self.attr(ino).await?.version;
                            self.store_logged(&ctx, c.uid, ino, data, mtime, base).await?;
                        } else {
                            self.store_content(&ctx, ino, data, mtime).await?;
                        }
                    }
                }
            }
        }
        let mtime_ns = s.mtime_ns.filter(|_| !content_has_mtime);
        let changes_attrs = s.mode.is_some() || s.uid.is_some() || s.gid.is_some();
        let changes_times = s.atime_ns.is_some() || mtime_ns.is_some();
        if changes_attrs || changes_times {
            let set = Op::SetAttr {
                ino,
                mode: s.mode.map(|m| m & 0o7777),
                uid: s.uid,
                gid: s.gid,
                mtime_ns,
                atime_ns: s.atime_ns,
            };
            if self.writes_back() {
                self.getattr(ino).await?;
                self.set_attr_logged(&ctx, c.uid, set).await?;
            } else {
                self.commit(&ctx, vec![set], &[ino]).await?;
            }
            if let (Some(t), Some(sh)) = (s.mtime_ns, self.writes.shadow(ino)) {
                // An explicit mtime on a file being written is what its store should keep.
                lock(&sh).mtime_ns = t;
            }
        }
        if self.writes_back() {
            return self.getattr(ino).await;
        }
        self.fresh_attr(ino).await
    }
}
