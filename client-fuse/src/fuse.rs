//! The FUSE adaptor: a thin layer that turns kernel requests into [`Core`] calls on the tokio
//! runtime, replies, and maps errors to errno values through [`FsError::errno`].
//!
//! Kernel caching is the point: entries and attributes get long lifetimes, `open`, `opendir` and
//! `flush` answer `ENOSYS` so the kernel stops sending them at all (its no-open mode keeps the page
//! cache and caches directory listings), and correctness comes from callback invalidations. A warm
//! open + read + close therefore reaches no daemon code (see docs/SEMANTICS.md).
use std::ffi::OsStr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, Generation, INodeNo, KernelConfig, Notifier, OpenFlags,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

use crate::core::remote::Remote;
use crate::core::{Core, FsError, Invalidation, NodeAttr, NodeKind};

/// How long the kernel may cache entries and attributes. Long, because callbacks invalidate.
pub const KERNEL_TTL: Duration = Duration::from_secs(24 * 3600);

/// Turns core invalidations into kernel notifications.
pub trait Invalidator: Send + Sync + 'static {
    fn invalidate(&self, inv: &Invalidation);
}

/// Invalidation through the FUSE notifier.
pub struct KernelInvalidator(pub Notifier);

impl Invalidator for KernelInvalidator {
    fn invalidate(&self, inv: &Invalidation) {
        // ENOENT just means the kernel does not hold that node or name: nothing to drop.
        for (parent, name) in &inv.entries {
            if let Err(e) = self.0.inval_entry(INodeNo(*parent), OsStr::new(name)) {
                tracing::trace!(parent, %name, error = %e, "inval_entry");
            }
        }
        for ino in &inv.inodes {
            if let Err(e) = self.0.inval_inode(INodeNo(*ino), 0, 0) {
                tracing::trace!(ino, error = %e, "inval_inode");
            }
        }
    }
}

/// The mounted filesystem.
pub struct CodaFs<R: Remote> {
    pub core: Arc<Core<R>>,
    pub rt: tokio::runtime::Handle,
}

fn errno(e: &FsError) -> Errno {
    Errno::from_i32(e.errno())
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
    }
}

/// Kernel attributes of a node.
pub fn file_attr(a: &NodeAttr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: time(a.mtime_ns),
        mtime: time(a.mtime_ns),
        ctime: time(a.ctime_ns),
        crtime: time(a.ctime_ns),
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: 0,
        blksize: 64 * 1024,
        flags: 0,
    }
}

impl<R: Remote> CodaFs<R> {
    fn spawn<F>(&self, span: tracing::Span, f: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        use tracing::Instrument;
        self.rt.spawn(f.instrument(span));
    }
}

fn name_str(name: &OsStr) -> Option<String> {
    name.to_str().map(str::to_string)
}

impl<R: Remote> Filesystem for CodaFs<R> {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Large readahead: whole small files arrive in one request.
        let _ = config.set_max_readahead(1 << 20);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.core.stats.fuse_request("lookup");
        let Some(name) = name_str(name) else {
            return reply.error(Errno::ENOENT);
        };
        let core = self.core.clone();
        self.spawn(tracing::debug_span!("lookup", parent = parent.0, %name), async move {
            match core.lookup(parent.0, &name).await {
                Ok(a) => reply.entry(&KERNEL_TTL, &file_attr(&a), Generation(a.generation)),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.core.stats.fuse_request("getattr");
        let core = self.core.clone();
        self.spawn(tracing::debug_span!("getattr", ino = ino.0), async move {
            match core.getattr(ino.0).await {
                Ok(a) => reply.attr(&KERNEL_TTL, &file_attr(&a)),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.core.stats.fuse_request("readlink");
        let core = self.core.clone();
        self.spawn(tracing::debug_span!("readlink", ino = ino.0), async move {
            match core.readlink(ino.0).await {
                Ok(t) => reply.data(t.as_bytes()),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.core.stats.fuse_request("open");
        // No-open mode: the kernel keeps the page cache and never asks again.
        reply.error(Errno::ENOSYS);
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.core.stats.fuse_request("opendir");
        // No-opendir mode: the kernel caches directory listings (FOPEN_CACHE_DIR).
        reply.error(Errno::ENOSYS);
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lo: fuser::LockOwner, reply: ReplyEmpty) {
        self.core.stats.fuse_request("flush");
        reply.error(Errno::ENOSYS);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        self.core.stats.fuse_request("read");
        let core = self.core.clone();
        self.spawn(tracing::debug_span!("read", ino = ino.0, offset, size), async move {
            match core.read(ino.0, offset, size).await {
                Ok(d) => reply.data(&d),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        self.core.stats.fuse_request("readdir");
        let core = self.core.clone();
        self.spawn(tracing::debug_span!("readdir", ino = ino.0, offset), async move {
            let entries = match core.readdir(ino.0).await {
                Ok(e) => e,
                Err(e) => return reply.error(errno(&e)),
            };
            let dots = [
                (".".to_string(), ino.0, NodeKind::Dir),
                ("..".to_string(), ino.0, NodeKind::Dir),
            ];
            for (i, (name, child, kind)) in dots.into_iter().chain(entries).enumerate().skip(offset as usize) {
                if reply.add(INodeNo(child), (i + 1) as u64, file_type(kind), name) {
                    break;
                }
            }
            reply.ok();
        });
    }

    fn readdirplus(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        self.core.stats.fuse_request("readdir");
        let core = self.core.clone();
        self.spawn(tracing::debug_span!("readdirplus", ino = ino.0, offset), async move {
            let entries = match core.readdir(ino.0).await {
                Ok(e) => e,
                Err(e) => return reply.error(errno(&e)),
            };
            let me = match core.getattr(ino.0).await {
                Ok(a) => a,
                Err(e) => return reply.error(errno(&e)),
            };
            let mut all = vec![(".".to_string(), me.clone()), ("..".to_string(), me)];
            for (name, child, _) in entries.into_iter().skip((offset as usize).saturating_sub(2)) {
                match core.getattr(child).await {
                    Ok(a) => all.push((name, a)),
                    Err(e) => return reply.error(errno(&e)),
                }
            }
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
        self.core.stats.fuse_request("statfs");
        let (files, bytes) = self.core.blobs.usage();
        let bsize = 4096u64;
        let blocks = self.core.blobs.max_bytes() / bsize;
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

    // ---- everything that would change the tree: the mount is read-only (EROFS)

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        self.core.stats.fuse_request("write_ops");
        reply.error(Errno::EROFS);
    }

    fn mknod(&self, _req: &Request, _p: INodeNo, _n: &OsStr, _m: u32, _u: u32, _r: u32, reply: ReplyEntry) {
        self.core.stats.fuse_request("write_ops");
        reply.error(Errno::EROFS);
    }

    fn mkdir(&self, _req: &Request, _p: INodeNo, _n: &OsStr, _m: u32, _u: u32, reply: ReplyEntry) {
        self.core.stats.fuse_request("write_ops");
        reply.error(Errno::EROFS);
    }

    fn unlink(&self, _req: &Request, _p: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        self.core.stats.fuse_request("write_ops");
        reply.error(Errno::EROFS);
    }

    fn rmdir(&self, _req: &Request, _p: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        self.core.stats.fuse_request("write_ops");
        reply.error(Errno::EROFS);
    }

    fn symlink(&self, _req: &Request, _p: INodeNo, _n: &OsStr, _t: &Path, reply: ReplyEntry) {
        self.core.stats.fuse_request("write_ops");
        reply.error(Errno::EROFS);
    }

    fn rename(
        &self,
        _req: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _np: INodeNo,
        _nn: &OsStr,
        _f: RenameFlags,
        reply: ReplyEmpty,
    ) {
        self.core.stats.fuse_request("write_ops");
        reply.error(Errno::EROFS);
    }

    fn link(&self, _req: &Request, _i: INodeNo, _np: INodeNo, _nn: &OsStr, reply: ReplyEntry) {
        self.core.stats.fuse_request("write_ops");
        reply.error(Errno::EROFS);
    }

    fn create(&self, _req: &Request, _p: INodeNo, _n: &OsStr, _m: u32, _u: u32, _f: i32, reply: ReplyCreate) {
        self.core.stats.fuse_request("write_ops");
        reply.error(Errno::EROFS);
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _wf: WriteFlags,
        _flags: OpenFlags,
        _lo: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        self.core.stats.fuse_request("write_ops");
        reply.error(Errno::EROFS);
    }

    fn setxattr(&self, _req: &Request, _i: INodeNo, _n: &OsStr, _v: &[u8], _f: i32, _p: u32, reply: ReplyEmpty) {
        self.core.stats.fuse_request("write_ops");
        reply.error(Errno::EROFS);
    }

    fn removexattr(&self, _req: &Request, _i: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        self.core.stats.fuse_request("write_ops");
        reply.error(Errno::EROFS);
    }

    fn fallocate(&self, _req: &Request, _i: INodeNo, _fh: FileHandle, _o: u64, _l: u64, _m: i32, reply: ReplyEmpty) {
        self.core.stats.fuse_request("write_ops");
        reply.error(Errno::EROFS);
    }
}
