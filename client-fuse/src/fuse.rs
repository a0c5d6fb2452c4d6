//! The FUSE adaptor: a thin layer that turns kernel requests into [`Core`] calls on the tokio
//! runtime, replies, and maps errors to errno values through [`FsError::errno`].
//!
//! Kernel caching is the point: entries and attributes get long lifetimes and correctness comes
//! from callback invalidations. On a `--read-only` mount (web nodes) `open`, `opendir` and `flush`
//! answer `ENOSYS`, so the kernel stops sending them at all (its no-open mode keeps the page cache
//! and caches directory listings), and a warm open + read + close reaches no daemon code. A
//! writable mount answers them (write handles, read checks for private volumes) and keeps the
//! page cache with `FOPEN_KEEP_CACHE` (see docs/SEMANTICS.md).
use std::ffi::OsStr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, IoctlFlags,
    KernelConfig, LockOwner, Notifier, OpenFlags, PollEvents, PollFlags, PollNotifier, RenameFlags, ReplyAttr,
    ReplyBmap, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyIoctl,
    ReplyLock, ReplyLseek, ReplyOpen, ReplyPoll, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::core::remote::Remote;
use crate::core::write::{Caller, SetAttrs};
use crate::core::{Core, FsError, Invalidation, Invalidator, NodeAttr, NodeKind};

/// How long the kernel may cache entries and attributes. Long, because callbacks invalidate.
pub const KERNEL_TTL: Duration = Duration::from_secs(24 * 3600);

/// Kernel notifications: background invalidations on a thread of their own, and the
/// lock-free switch a change event needs at once.
///
/// A kernel entry invalidation waits for the directory's lock, which the kernel holds while one
/// of our own replies is pending (a `create` in that directory, say). Done on a tokio worker, it
/// can block the very worker that would send that reply (tasks in a worker's LIFO slot are not
/// stolen), and the mount deadlocks. A dedicated thread only waits until the reply is sent.
///
/// The switch instead uses only notifications that take no such lock: attribute-only inode
/// invalidations and, on Linux 6.16 and later, `FUSE_NOTIFY_INC_EPOCH`, which makes every
/// cached name (negative ones too) stale at once, so the next path walk asks the daemon again.
pub struct KernelInvalidator {
    tx: std::sync::Mutex<std::sync::mpsc::Sender<Invalidation>>,
    notifier: Notifier,
    /// A handle on the FUSE device for the notifications fuser does not offer (the epoch).
    dev: Option<std::fs::File>,
    epochs: std::sync::atomic::AtomicBool,
}

/// `FUSE_NOTIFY_INC_EPOCH` (protocol 7.44, Linux 6.16).
const FUSE_NOTIFY_INC_EPOCH: i32 = 8;

/// Whether the running kernel has name epochs (Linux 6.16 or later).
fn kernel_has_epochs() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release.trim().split(['.', '-']).map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (6, 16)
}

impl KernelInvalidator {
    pub fn new<FS: Filesystem>(session: &fuser::Session<FS>) -> std::io::Result<Self> {
        use std::os::fd::AsFd;
        let notifier = session.notifier();
        let background = notifier.clone();
        let (tx, rx) = std::sync::mpsc::channel::<Invalidation>();
        std::thread::Builder::new().name("codafs-inval".into()).spawn(move || {
            // Ends when every sender is gone (the mount is shutting down).
            while let Ok(inv) = rx.recv() {
                invalidate_now(&background, &inv);
            }
        })?;
        let epochs = kernel_has_epochs();
        let dev = if epochs {
            Some(std::fs::File::from(session.as_fd().try_clone_to_owned()?))
        } else {
            tracing::warn!("this kernel has no FUSE name epochs (Linux 6.16+): a publish shows name by name");
            None
        };
        Ok(KernelInvalidator {
            tx: std::sync::Mutex::new(tx),
            notifier,
            dev,
            epochs: std::sync::atomic::AtomicBool::new(epochs),
        })
    }

    /// Makes every name the kernel caches stale (one atomic increment in the kernel).
    fn bump_epoch(&self) -> bool {
        use std::io::Write;
        use std::sync::atomic::Ordering;
        let Some(dev) = &self.dev else { return false };
        if !self.epochs.load(Ordering::Relaxed) {
            return false;
        }
        // struct fuse_out_header { len: u32, error: i32 (the notification code), unique: u64 = 0 }
        let mut msg = [0u8; 16];
        msg[0..4].copy_from_slice(&16u32.to_ne_bytes());
        msg[4..8].copy_from_slice(&FUSE_NOTIFY_INC_EPOCH.to_ne_bytes());
        match (&*dev).write_all(&msg) {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(error = %e, "the kernel refused a name epoch; falling back to name-by-name invalidation");
                self.epochs.store(false, Ordering::Relaxed);
                false
            }
        }
    }
}

fn invalidate_now(n: &Notifier, inv: &Invalidation) {
    // ENOENT just means the kernel does not hold that node or name: nothing to drop.
    for (parent, name) in &inv.entries {
        if let Err(e) = n.inval_entry(INodeNo(*parent), OsStr::new(name)) {
            tracing::trace!(parent, %name, error = %e, "inval_entry");
        }
    }
    for ino in &inv.inodes {
        if let Err(e) = n.inval_inode(INodeNo(*ino), 0, 0) {
            tracing::trace!(ino, error = %e, "inval_inode");
        }
    }
}

impl Invalidator for KernelInvalidator {
    fn invalidate(&self, inv: &Invalidation) {
        if inv.entries.is_empty() && inv.inodes.is_empty() {
            return;
        }
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        if tx.send(inv.clone()).is_err() {
            tracing::debug!("invalidation thread gone (shutting down)");
        }
    }

    fn switch(&self, inodes: &[u64], names: bool) -> bool {
        // A negative offset drops attributes only: no page lock, so no wait on a pending read.
        // With the attributes gone, the next read asks for them, and a changed size or mtime
        // drops the stale pages (auto_inval_data); the background pass drops the rest.
        for ino in inodes {
            if let Err(e) = self.notifier.inval_inode(INodeNo(*ino), -1, 0) {
                tracing::trace!(ino, error = %e, "inval_inode (attributes)");
            }
        }
        names && self.bump_epoch()
    }

    fn drop_pages(&self, ino: u64) {
        if let Err(e) = self.notifier.inval_inode(INodeNo(ino), 0, 0) {
            tracing::trace!(ino, error = %e, "inval_inode (pages)");
        }
    }
}

/// The mounted filesystem.
pub struct CodaFs<R: Remote> {
    pub core: Arc<Core<R>>,
    pub rt: tokio::runtime::Handle,
    /// `--read-only`: keep the no-open fast path (open/flush answer ENOSYS).
    pub read_only: bool,
    /// Kernel invalidations for the daemon's own needs (set once the session exists).
    pub inval: Arc<std::sync::OnceLock<Arc<dyn Invalidator>>>,
}

fn errno(e: &FsError) -> Errno {
    Errno::from_i32(e.errno())
}

/// The errno of an operation on a node the kernel names by inode. A node that is gone answers
/// ESTALE, not ENOENT: the kernel then walks the path again, asking for every name (a change
/// event does not drop names whose nodes vanished; see `Core::name_changes`).
fn by_ino(e: &FsError) -> Errno {
    match e {
        FsError::NotFound => Errno::ESTALE,
        e => errno(e),
    }
}

fn time(ns: i64) -> SystemTime {
    if ns <= 0 {
        UNIX_EPOCH
    } else {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    }
}

fn file_type(k: NodeKind) -> FileType {
    match k {
        NodeKind::File => FileType::RegularFile,
        NodeKind::Dir => FileType::Directory,
        NodeKind::Symlink => FileType::Symlink,
        NodeKind::Fifo => FileType::NamedPipe,
        NodeKind::Socket => FileType::Socket,
        NodeKind::CharDevice => FileType::CharDevice,
        NodeKind::BlockDevice => FileType::BlockDevice,
    }
}

/// Kernel attributes of a node.
pub fn file_attr(a: &NodeAttr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: time(a.atime_ns),
        mtime: time(a.mtime_ns),
        ctime: time(a.ctime_ns),
        crtime: time(a.ctime_ns),
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        // The kernel's dev_t as FUSE carries it (new_encode_dev of the stored number).
        rdev: a.rdev as u32,
        blksize: 64 * 1024,
        flags: 0,
    }
}

impl<R: Remote> CodaFs<R> {
    /// Runs a request's work here on the kernel's thread as far as it goes without waiting,
    /// and hands it to the runtime only if it must wait (for a server, a lock, a timer).
    ///
    /// Most requests on a warm mount need nothing but the local cache: a lookup in a cached
    /// listing, a read of a cached file, a create on a write-back mount. Answered here, each
    /// costs no thread switch; handed to a tokio worker first, each cost two (there and back),
    /// which was most of a cached request's time. A future that is not ready registers the
    /// waker of every poll, so the runtime's poll after the hand-off takes over its waits.
    fn spawn<F>(&self, span: tracing::Span, f: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        use std::future::Future as _;
        use tracing::Instrument;
        let mut f = Box::pin(f.instrument(span));
        // Timers and `spawn_blocking` inside the work need the runtime's context.
        let _rt = self.rt.enter();
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let waits = f.as_mut().poll(&mut cx).is_pending();
        self.core.count_answer(!waits);
        if waits {
            self.rt.spawn(f);
        }
    }
}

fn name_str(name: &OsStr) -> Option<String> {
    name.to_str().map(str::to_string)
}

impl<R: Remote> Filesystem for CodaFs<R> {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Large readahead: whole small files arrive in one request.
        let _ = config.set_max_readahead(1 << 20);
        // A read after a change event dropped a file's attributes asks for them again, and the
        // kernel drops pages whose file changed size or mtime (see KernelInvalidator::switch).
        if let Err(e) = config.add_capabilities(fuser::InitFlags::FUSE_AUTO_INVAL_DATA) {
            tracing::warn!(?e, "the kernel does not offer auto_inval_data");
        }
        // Lookups in one directory run in parallel (the kernel otherwise serializes them per
        // directory, so one slow miss held up every reader there), and a listing carries its
        // entries' attributes (`ls -l`, `find`, rsync: no lookup per entry afterwards).
        let wanted = [
            fuser::InitFlags::FUSE_PARALLEL_DIROPS,
            fuser::InitFlags::FUSE_DO_READDIRPLUS,
            fuser::InitFlags::FUSE_READDIRPLUS_AUTO,
        ];
        for flag in wanted {
            if let Err(e) = config.add_capabilities(flag) {
                tracing::info!(?e, "the kernel does not offer this FUSE capability");
            }
        }
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.core.count_request("lookup");
        let Some(name) = name_str(name) else {
            return reply.error(Errno::ENOENT);
        };
        let (core, inval) = (self.core.clone(), self.inval.clone());
        let check = (!self.read_only).then(|| caller(req));
        self.spawn(tracing::debug_span!("lookup", parent = parent.0, %name), async move {
            if let Some(c) = check {
                if let Err(e) = core.check_access(c, parent.0, libc::X_OK).await {
                    return reply.error(by_ino(&e));
                }
            }
            let (r, _view) = core.lookup_reply(parent.0, &name, &inval.get().cloned()).await;
            match r {
                Ok(a) => reply.entry(&KERNEL_TTL, &file_attr(&a), Generation(a.generation)),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.core.count_request("getattr");
        let (core, inval) = (self.core.clone(), self.inval.clone());
        self.spawn(tracing::debug_span!("getattr", ino = ino.0), async move {
            let (r, _view) = core.getattr_reply(ino.0, &inval.get().cloned()).await;
            match r {
                Ok(a) => reply.attr(&KERNEL_TTL, &file_attr(&a)),
                Err(e) => reply.error(by_ino(&e)),
            }
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.core.count_request("readlink");
        let core = self.core.clone();
        self.spawn(tracing::debug_span!("readlink", ino = ino.0), async move {
            let (r, _view) = core.readlink_reply(ino.0).await;
            match r {
                Ok(t) => reply.data(t.as_bytes()),
                Err(e) => reply.error(by_ino(&e)),
            }
        });
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.core.count_request("open");
        if self.read_only {
            // No-open mode: the kernel keeps the page cache and never asks again.
            return reply.error(Errno::ENOSYS);
        }
        let c = caller(req);
        let read_only_open = flags.0 & libc::O_ACCMODE == libc::O_RDONLY && flags.0 & libc::O_TRUNC == 0;
        // A read-only handle stores nothing on close: no FLUSH round trip for it.
        let read_flags = FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_NOFLUSH;
        if read_only_open {
            match self.core.open_read_cached(c, ino.0) {
                Some(Ok(fh)) => return reply.opened(FileHandle(fh), read_flags),
                Some(Err(e)) => return reply.error(by_ino(&e)),
                None => {}
            }
        }
        let core = self.core.clone();
        self.spawn(tracing::debug_span!("open", ino = ino.0), async move {
            if flags.0 & libc::O_ACCMODE != libc::O_WRONLY {
                if let Err(e) = core.check_access(c, ino.0, libc::R_OK).await {
                    return reply.error(by_ino(&e));
                }
            }
            match core.open(c, ino.0, flags.0).await {
                // Keep the page cache: callbacks invalidate it when the content changes.
                Ok(fh) if read_only_open => reply.opened(FileHandle(fh), read_flags),
                Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE),
                Err(e) => reply.error(by_ino(&e)),
            }
        });
    }

    fn opendir(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.core.count_request("opendir");
        if self.read_only {
            // No-opendir mode: the kernel caches directory listings (FOPEN_CACHE_DIR) and checks
            // modes itself.
            return reply.error(Errno::ENOSYS);
        }
        // A writable mount checks each opener; listings of public volumes stay cached in the
        // kernel, those of private ones are asked for each time (the kernel's cache would serve
        // one user's listing to another).
        let (core, c) = (self.core.clone(), caller(req));
        self.spawn(tracing::debug_span!("opendir", ino = ino.0), async move {
            if let Err(e) = core.check_access(c, ino.0, libc::R_OK).await {
                return reply.error(by_ino(&e));
            }
            let flags = if core.is_public(ino.0) {
                FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE
            } else {
                FopenFlags::empty()
            };
            reply.opened(FileHandle(0), flags);
        });
    }

    fn flush(&self, _req: &Request, ino: INodeNo, fh: FileHandle, _lo: fuser::LockOwner, reply: ReplyEmpty) {
        self.core.count_request("flush");
        if self.read_only {
            return reply.error(Errno::ENOSYS);
        }
        if fh.0 == 0 {
            // A read-only handle: nothing to store.
            return reply.ok();
        }
        // close(2): store a changed file; a failure is close's error.
        self.store(tracing::debug_span!("flush", ino = ino.0), fh, reply);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        self.core.count_request("read");
        let core = self.core.clone();
        self.spawn(tracing::debug_span!("read", ino = ino.0, offset, size), async move {
            match core.read(ino.0, fh.0, offset, size).await {
                Ok(d) => reply.data(&d),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        self.core.count_request("readdir");
        // Read permission was checked when the directory was opened (opendir), as POSIX does.
        let core = self.core.clone();
        self.spawn(tracing::debug_span!("readdir", ino = ino.0, offset), async move {
            // Positions 0 and 1 are `.` and `..`; entry k of the listing is position k + 2.
            let (r, _view) = core.names_reply(ino.0, (offset as usize).saturating_sub(2)).await;
            let entries = match r {
                Ok(e) => e,
                Err(e) => return reply.error(errno(&e)),
            };
            let dots = [
                (".".to_string(), ino.0, NodeKind::Dir),
                ("..".to_string(), ino.0, NodeKind::Dir),
            ];
            let first = offset.max(2);
            let numbered = dots
                .into_iter()
                .enumerate()
                .map(|(i, d)| (i as u64, d))
                .skip(offset as usize)
                .chain(entries.into_iter().enumerate().map(|(i, e)| (first + i as u64, e)));
            for (pos, (name, child, kind)) in numbered {
                if reply.add(INodeNo(child), pos + 1, file_type(kind), name) {
                    break;
                }
            }
            reply.ok();
        });
    }

    fn readdirplus(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        self.core.count_request("readdir");
        // Read permission was checked when the directory was opened (opendir), as POSIX does.
        let (core, inval) = (self.core.clone(), self.inval.clone());
        self.spawn(tracing::debug_span!("readdirplus", ino = ino.0, offset), async move {
            let (r, _view) = core.listing_reply(ino.0, offset, &inval.get().cloned()).await;
            let all = match r {
                Ok(all) => all,
                Err(e) => return reply.error(errno(&e)),
            };
            let start = offset.min(2) as usize;
            for (i, (name, a)) in all.into_iter().enumerate().skip(start) {
                let next = if i < 2 {
                    i as u64 + 1
                } else {
                    offset.max(2) + (i as u64 - 2) + 1
                };
                if reply.add(
                    INodeNo(a.ino),
                    next,
                    name,
                    &KERNEL_TTL,
                    &file_attr(&a),
                    Generation(a.generation),
                ) {
                    break;
                }
            }
            reply.ok();
        });
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.core.count_request("statfs");
        let (files, bytes, max_bytes) = self.core.cache_usage();
        let bsize = 4096u64;
        let blocks = max_bytes / bsize;
        let used = bytes / bsize;
        reply.statfs(
            blocks,
            blocks.saturating_sub(used),
            0,
            files as u64,
            0,
            bsize as u32,
            255,
            bsize as u32,
        );
    }

    // ---- changes: each needs the caller's token (EROFS without one, or on a --read-only mount)

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        self.core.count_request("write_ops");
        let (core, c) = (self.core.clone(), caller(req));
        let s = SetAttrs {
            mode,
            uid,
            gid,
            size,
            atime_ns: atime.map(time_ns),
            mtime_ns: mtime.map(time_ns),
        };
        let inval = self.inval.clone();
        self.spawn(tracing::debug_span!("setattr", ino = ino.0), async move {
            match core.setattr(c, ino.0, s).await {
                Ok(a) => reply.attr(&KERNEL_TTL, &file_attr(&a)),
                Err(e) => {
                    reply.error(errno(&e));
                    // A failed truncate of an open file may have dropped its unstored changes:
                    // the page cache must not keep showing them.
                    if let (Some(_), Some(i)) = (size, inval.get()) {
                        i.invalidate(&Invalidation {
                            inodes: vec![ino.0],
                            entries: Vec::new(),
                        });
                    }
                }
            }
        });
    }

    fn mknod(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, rdev: u32, reply: ReplyEntry) {
        self.core.count_request("write_ops");
        let Some(name) = name_str(name) else {
            return reply.error(Errno::EINVAL);
        };
        let (core, c) = (self.core.clone(), caller(req));
        self.spawn(tracing::debug_span!("mknod", parent = parent.0, %name), async move {
            entry(
                reply,
                core.mknod(c, parent.0, &name, mode & !umask, u64::from(rdev)).await,
            );
        });
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        self.core.count_request("write_ops");
        let Some(name) = name_str(name) else {
            return reply.error(Errno::EINVAL);
        };
        let (core, c) = (self.core.clone(), caller(req));
        self.spawn(tracing::debug_span!("mkdir", parent = parent.0, %name), async move {
            entry(reply, core.mkdir(c, parent.0, &name, mode & !umask).await);
        });
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove(req, parent, name, false, reply);
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove(req, parent, name, true, reply);
    }

    fn symlink(&self, req: &Request, parent: INodeNo, name: &OsStr, target: &Path, reply: ReplyEntry) {
        self.core.count_request("write_ops");
        let (Some(name), Some(target)) = (name_str(name), target.to_str().map(str::to_string)) else {
            return reply.error(Errno::EINVAL);
        };
        let (core, c) = (self.core.clone(), caller(req));
        self.spawn(tracing::debug_span!("symlink", parent = parent.0, %name), async move {
            entry(reply, core.symlink(c, parent.0, &name, &target).await);
        });
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        new_parent: INodeNo,
        new_name: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        self.core.count_request("write_ops");
        let (Some(name), Some(new_name)) = (name_str(name), name_str(new_name)) else {
            return reply.error(Errno::EINVAL);
        };
        if flags.intersects(RenameFlags::RENAME_EXCHANGE | RenameFlags::RENAME_WHITEOUT) {
            return reply.error(Errno::EINVAL);
        }
        let noreplace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        let (core, c) = (self.core.clone(), caller(req));
        self.spawn(tracing::debug_span!("rename", parent = parent.0, %name), async move {
            let r = core
                .rename(c, parent.0, &name, new_parent.0, &new_name, noreplace)
                .await;
            done(reply, r);
        });
    }

    fn link(&self, req: &Request, ino: INodeNo, new_parent: INodeNo, new_name: &OsStr, reply: ReplyEntry) {
        self.core.count_request("write_ops");
        let Some(new_name) = name_str(new_name) else {
            return reply.error(Errno::EINVAL);
        };
        let (core, c) = (self.core.clone(), caller(req));
        self.spawn(tracing::debug_span!("link", ino = ino.0, %new_name), async move {
            entry(reply, core.link(c, ino.0, new_parent.0, &new_name).await);
        });
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        self.core.count_request("write_ops");
        let Some(name) = name_str(name) else {
            return reply.error(Errno::EINVAL);
        };
        let (core, c) = (self.core.clone(), caller(req));
        self.spawn(tracing::debug_span!("create", parent = parent.0, %name), async move {
            match core.create(c, parent.0, &name, mode & !umask).await {
                Ok((a, fh)) => reply.created(
                    &KERNEL_TTL,
                    &file_attr(&a),
                    Generation(a.generation),
                    FileHandle(fh),
                    FopenFlags::FOPEN_KEEP_CACHE,
                ),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _wf: WriteFlags,
        _flags: OpenFlags,
        _lo: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        self.core.count_request("write_ops");
        let _span = tracing::trace_span!("write", ino = ino.0, offset, len = data.len()).entered();
        // A local pwrite to the shadow: done inline, no server involved.
        match self.core.write(fh.0, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        self.core.count_request("flush");
        // close's store, and on a write-back mount also the wait until it is on the servers.
        let core = self.core.clone();
        self.spawn(tracing::debug_span!("fsync", ino = ino.0), async move {
            done(reply, core.fsync(ino.0, fh.0).await)
        });
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if self.core.release_read(fh.0) {
            return reply.ok();
        }
        let (core, inval) = (self.core.clone(), self.inval.clone());
        let released = async move {
            let dropped = core.release(fh.0).await;
            reply.ok();
            if dropped {
                // The page cache still holds the bytes that were never committed.
                if let Some(i) = inval.get() {
                    i.invalidate(&Invalidation {
                        inodes: vec![ino.0],
                        entries: Vec::new(),
                    });
                }
            }
        };
        let span = tracing::debug_span!("release", ino = ino.0);
        if self.core.quick_store(fh.0) {
            // As `flush` (see `store`): nothing here needs a server, and it is quick.
            let _g = span.entered();
            return self.rt.block_on(released);
        }
        self.spawn(span, released);
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: fuser::AccessFlags, reply: ReplyEmpty) {
        let (core, c) = (self.core.clone(), caller(req));
        let read_only = self.read_only;
        self.spawn(tracing::debug_span!("access", ino = ino.0), async move {
            let mask = mask.bits();
            if read_only && mask & libc::W_OK != 0 {
                return reply.error(Errno::EROFS);
            }
            match core.access(c, ino.0, mask).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(by_ino(&e)),
            }
        });
    }

    fn setxattr(&self, _req: &Request, _i: INodeNo, _n: &OsStr, _v: &[u8], _f: i32, _p: u32, reply: ReplyEmpty) {
        self.core.count_request("write_ops");
        reply.error(if self.read_only { Errno::EROFS } else { Errno::ENOTSUP });
    }

    fn removexattr(&self, _req: &Request, _i: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        self.core.count_request("write_ops");
        reply.error(if self.read_only { Errno::EROFS } else { Errno::ENOTSUP });
    }

    fn fallocate(&self, _req: &Request, _i: INodeNo, _fh: FileHandle, _o: u64, _l: u64, _m: i32, reply: ReplyEmpty) {
        self.core.count_request("write_ops");
        reply.error(if self.read_only {
            Errno::EROFS
        } else {
            Errno::EOPNOTSUPP
        });
    }

    // The operations below are not supported. fuser's defaults answer them too, but log a WARN
    // line for every request, and some come per file open: Python's `open()` asks `isatty`,
    // an ioctl, every time. Those lines filled web nodes' disks, so each is answered here, with
    // the same errno as before (ENOTTY for ioctl, what a regular file says to `isatty`), and
    // no log line. ENOSYS makes the kernel stop sending most of them for the mount's lifetime.

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        self.core.count_request("ioctl");
        reply.error(Errno::ENOTTY);
    }

    fn getxattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        if self.read_only {
            // Nothing to make durable: the kernel stops asking.
            return reply.error(Errno::ENOSYS);
        }
        // Write-back: a rename or creation in it is in the log until the servers have it (the
        // atomic-save pattern ends with fsync of the directory). Write-through: already there.
        let core = self.core.clone();
        self.spawn(tracing::debug_span!("fsyncdir", ino = ino.0), async move {
            done(reply, core.fsyncdir(ino.0).await)
        });
    }

    fn getlk(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        _start: u64,
        _end: u64,
        _typ: i32,
        _pid: u32,
        reply: ReplyLock,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn setlk(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        _start: u64,
        _end: u64,
        _typ: i32,
        _pid: u32,
        _sleep: bool,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn bmap(&self, _req: &Request, _ino: INodeNo, _blocksize: u32, _idx: u64, reply: ReplyBmap) {
        reply.error(Errno::ENOSYS);
    }

    fn poll(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _ph: PollNotifier,
        _events: PollEvents,
        _flags: PollFlags,
        reply: ReplyPoll,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn lseek(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _offset: i64, _whence: i32, reply: ReplyLseek) {
        reply.error(Errno::ENOSYS);
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        _fh_in: FileHandle,
        _offset_in: u64,
        _ino_out: INodeNo,
        _fh_out: FileHandle,
        _offset_out: u64,
        _len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        // The kernel falls back to reads and writes.
        reply.error(Errno::ENOSYS);
    }
}

impl<R: Remote> CodaFs<R> {
    /// Stores the file behind `fh` if it changed; the error is what close/fsync return.
    fn store(&self, span: tracing::Span, fh: FileHandle, reply: ReplyEmpty) {
        let core = self.core.clone();
        if core.quick_store(fh.0) {
            // Write-back, a small file: the store goes to the local log, never to a server, so
            // it runs here on the FUSE thread (two thread switches less per close; its fsync is
            // the wait). A large file's store is not: it would hold this thread for long.
            let _g = span.entered();
            return done(reply, self.rt.block_on(core.flush(fh.0)));
        }
        self.spawn(span, async move { done(reply, core.flush(fh.0).await) });
    }

    fn remove(&self, req: &Request, parent: INodeNo, name: &OsStr, dir: bool, reply: ReplyEmpty) {
        self.core.count_request("write_ops");
        let Some(name) = name_str(name) else {
            return reply.error(Errno::ENOENT);
        };
        let (core, c) = (self.core.clone(), caller(req));
        self.spawn(
            tracing::debug_span!("remove", parent = parent.0, %name, dir),
            async move {
                done(reply, core.remove(c, parent.0, &name, dir).await);
            },
        );
    }
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
    }
}

fn done(reply: ReplyEmpty, r: Result<(), FsError>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(&e)),
    }
}

fn entry(reply: ReplyEntry, r: Result<NodeAttr, FsError>) {
    match r {
        Ok(a) => reply.entry(&KERNEL_TTL, &file_attr(&a), Generation(a.generation)),
        Err(e) => reply.error(errno(&e)),
    }
}

fn time_ns(t: TimeOrNow) -> i64 {
    let t = match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    };
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_nanos()).unwrap_or(i64::MAX),
    }
}
