//! Open file handles: `open` (a read-only handle remembers the file; a writing one joins its
//! shadow), `flush` (store on close) and `release` (the last handle drops the shadow).
use super::*;

/// Stores the last opener of a shadow makes before dropping it: one, and one more for each time
/// another opener changed it meanwhile (see [`Core::let_go`]); past them, what is left is
/// dropped and reported.
const LAST_STORES: u32 = 4;

/// One open file handle: whose it is, and whether it may write.
pub(super) struct Handle {
    pub(super) ino: u64,
    pub(super) uid: u32,
    pub(super) write: bool,
    /// Attributes at open: a read-only handle keeps reading this content after an unlink.
    pub(super) attr: Option<NodeAttr>,
}

impl<R: Remote> Core<R> {
    /// `open`: read-only opens need nothing (handle 0); opens for writing get the file's
    /// shadow, shared by every writer of that file on this mount.
    pub async fn open(&self, c: Caller, ino: u64, flags: i32) -> Result<u64, FsError> {
        if flags & libc::O_ACCMODE == libc::O_RDONLY {
            // A handle remembering the file, so it stays readable if unlinked while open.
            return self.open_handle(ino, c.uid, false, ShadowInit::Current).await;
        }
        self.write_ctx(c.uid, ino)?;
        let init = if flags & libc::O_TRUNC != 0 {
            ShadowInit::Empty
        } else {
            ShadowInit::Current
        };
        self.open_handle(ino, c.uid, true, init).await
    }

    pub(super) async fn open_handle(&self, ino: u64, uid: u32, write: bool, init: ShadowInit) -> Result<u64, FsError> {
        let attr = if write {
            self.attach_shadow(ino, init).await?;
            None
        } else {
            Some(self.getattr(ino).await?)
        };
        Ok(self.add_handle(Handle { ino, uid, write, attr }))
    }

    fn add_handle(&self, h: Handle) -> u64 {
        let fh = self.writes.next_fh.fetch_add(1, Ordering::Relaxed);
        self.writes
            .handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(fh, h);
        fh
    }

    /// A read-only open answered from the caches without waiting, so the adaptor can reply on
    /// the kernel's thread: the node's attributes are cached, and it is on a public volume or
    /// opened by root (no directory above needs a search check). `None`: take [`Core::open`]
    /// after [`Core::check_access`], which may ask the servers.
    pub fn open_read_cached(&self, c: Caller, ino: u64) -> Option<Result<u64, FsError>> {
        let public = self.is_public(ino);
        if (!public && c.uid != 0) || self.writes.pending(ino).is_some() {
            return None;
        }
        let raw = self.meta.attr(ino).ok()??;
        self.stats.meta_hits.fetch_add(1, Ordering::Relaxed);
        let a = self.to_node(&raw);
        if !Self::may_access(c, &a, libc::R_OK, public) {
            return Some(Err(FsError::Denied("mode bits".into())));
        }
        Some(Ok(self.add_handle(Handle {
            ino,
            uid: c.uid,
            write: false,
            attr: Some(a),
        })))
    }

    /// `close` (FUSE flush) and `fsync`: stores the file if its shadow changed. The error, if
    /// any, is what `close`/`fsync` returns; the old content then stays in place.
    pub async fn flush(&self, fh: u64) -> Result<(), FsError> {
        let Some((ino, uid, true)) = self.writes.handle(fh) else {
            return Ok(());
        };
        self.store_shadow(ino, uid).await
    }

    /// Whether storing `fh` at close is quick and local: a write-back mount, and a file small
    /// enough to log inline (the adaptor then stores it on the kernel's thread).
    pub fn quick_store(&self, fh: u64) -> bool {
        if !self.writes_back() {
            return false;
        }
        let Some((ino, _, true)) = self.writes.handle(fh) else {
            return true;
        };
        self.writes
            .shadow(ino)
            .is_none_or(|sh| lock(&sh).size <= crate::wblog::INLINE_MAX as u64)
    }

    /// `fsync`: stores the file (as `close` does) and, on a write-back mount, waits until
    /// everything logged so far, this file included, is on the servers (see [`Core::fsyncdir`]).
    pub async fn fsync(&self, ino: u64, fh: u64) -> Result<(), FsError> {
        // Counted before the store: its change may be refused before the wait begins.
        let since = self.failures_seen();
        self.flush(fh).await?;
        self.synced_since(ino, since).await
    }

    /// `fsync` of a directory, and the wait of `fsync` of a file: on a write-back mount, waits
    /// until every change logged before it (the renames and creations in a directory among
    /// them) is on the servers, except changes held back for another user's token that do not
    /// touch node `ino`; elsewhere a change is committed before its call returns.
    pub async fn fsyncdir(&self, ino: u64) -> Result<(), FsError> {
        self.synced_since(ino, self.failures_seen()).await
    }

    /// The wait of [`Core::fsyncdir`], reporting failures of `ino`'s changes counted after
    /// `since`.
    async fn synced_since(&self, ino: u64, since: u64) -> Result<(), FsError> {
        // Time for what is waiting in the log to travel, on top of a commit's.
        let waiting = self.backlog().map_or(0, |b| b.log_bytes);
        let r = self.sync_node(ino, since, self.write_timeout(waiting)).await;
        if let Err(e) = &r {
            tracing::info!(error = %e, waiting, "fsync: the log did not reach the servers in time");
        }
        r
    }

    /// `release` of a read-only handle, done without waiting (the adaptor replies on the
    /// kernel's thread): true if `fh` was one and is gone; false leaves it to [`Core::release`].
    pub fn release_read(&self, fh: u64) -> bool {
        let mut handles = self.writes.handles.lock().unwrap_or_else(|p| p.into_inner());
        match handles.get(&fh) {
            Some(h) if !h.write => handles.remove(&fh).is_some(),
            _ => false,
        }
    }

    /// `release`: the last handle of a file drops its shadow. Changes never stored (no flush
    /// arrived, as after `munmap`) are stored now, unless a store already failed and said so.
    /// Returns true when unstored changes were dropped: the kernel's page cache and attributes
    /// of that file still hold them and must be invalidated.
    pub async fn release(&self, fh: u64) -> bool {
        let Some(h) = self
            .writes
            .handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&fh)
        else {
            return false;
        };
        if !h.write {
            return false;
        }
        let Some(sh) = self.writes.shadow(h.ino) else {
            return false;
        };
        let (stored, dropped) = self.let_go(h.ino, h.uid, &sh, true).await;
        if let Err(e) = stored {
            tracing::warn!(ino = h.ino, error = %e, "changes of a released file could not be stored");
        }
        dropped
    }

    /// One opener of `ino`'s shadow lets go of it (a handle's release, or a truncate by path
    /// that pinned it). Changes not stored yet are stored: by any opener if `any`, and always
    /// by the last (unless a store already failed and said so). The last opener drops the
    /// shadow, once it is clean: another opener may pin it while this one stores (a truncate
    /// by path during a release's store), and what it changed is stored again before the
    /// shadow goes. Returns the store's outcome, and whether unstored changes were dropped:
    /// the kernel's page cache and attributes of that file still hold them and must be
    /// invalidated.
    pub(super) async fn let_go(
        &self,
        ino: u64,
        uid: u32,
        sh: &Mutex<Shadow>,
        any: bool,
    ) -> (Result<(), FsError>, bool) {
        let (store, last) = {
            let mut g = lock(sh);
            g.opens = g.opens.saturating_sub(1);
            let last = g.opens == 0;
            (g.dirty && !g.failed && any && !last, last)
        };
        let mut stored = if store {
            self.store_shadow(ino, uid).await
        } else {
            Ok(())
        };
        if !last {
            return (stored, false);
        }
        let mut dropped_changes = false;
        for attempt in 0..=LAST_STORES {
            let again = {
                let mut shadows = self.writes.shadows.lock().unwrap_or_else(|p| p.into_inner());
                // Still this shadow, and nobody holds it now (a newer opener lets go itself).
                let ours = shadows.get(&ino).filter(|s| std::ptr::eq(s.as_ref(), sh)).cloned();
                match ours {
                    Some(s) => {
                        let mut g = lock(&s);
                        if g.opens != 0 {
                            false
                        } else if g.dirty && !g.failed && attempt < LAST_STORES {
                            true
                        } else {
                            dropped_changes = g.dirty;
                            g.dropped_dirty = g.dirty;
                            self.drop_shadow_file(g.path.as_deref());
                            shadows.remove(&ino);
                            self.writes
                                .store_locks
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .remove(&ino);
                            false
                        }
                    }
                    // Gone: another last opener dropped it, with this one's change if dirty.
                    None => {
                        dropped_changes = lock(sh).dropped_dirty;
                        false
                    }
                }
            };
            if !again {
                break;
            }
            stored = self.store_shadow(ino, uid).await;
        }
        if dropped_changes {
            tracing::info!(ino, "unstored changes dropped; the file shows its committed content");
            let _ = self.meta.forget(&[ino], &[]);
        }
        (stored, dropped_changes)
    }
}
