//! Shadows: the private local copy of a file open for writing. Writes, reads and size changes
//! of the file go to its shadow while it is open; storing a changed shadow sends its content to
//! the write quorum and then commits the file's new content.
use super::*;

/// A shadow started empty lives in memory (a memfd) up to this size: new files then cost no
/// file creation, unlink or metadata journaling in the cache directory. Past it, it moves to a
/// file in `CACHE_DIR/shadow`.
const IN_MEMORY_SHADOW: u64 = 8 << 20;
/// At most this many shadows live in memory at once (so at most 512 MiB).
pub(super) const IN_MEMORY_SHADOWS: usize = 64;

/// A closed file's bytes on their way to the servers or the log: in memory up to the chunk
/// threshold (one blob), or a file read by position (a large file's shadow, cut into chunks;
/// never read into memory whole).
pub(crate) enum Payload {
    Memory(Vec<u8>),
    File { file: std::fs::File, size: u64 },
}

impl Payload {
    /// The first `size` bytes of `file`: read into memory when they are one blob.
    pub(super) fn of_file(file: &std::fs::File, size: u64) -> Result<Self, FsError> {
        if codafs_common::chunks::is_chunked(size) {
            return Ok(Payload::File {
                file: file.try_clone()?,
                size,
            });
        }
        let mut buf = vec![0u8; size as usize];
        blocking(size, || file.read_exact_at(&mut buf, 0))?;
        Ok(Payload::Memory(buf))
    }

    pub(super) fn len(&self) -> u64 {
        match self {
            Payload::Memory(d) => d.len() as u64,
            Payload::File { size, .. } => *size,
        }
    }
}

/// A private local copy of an open file's content.
pub(super) struct Shadow {
    pub(super) file: std::fs::File,
    /// Its file in the shadow directory (`None`: in memory).
    pub(super) path: Option<PathBuf>,
    pub(super) size: u64,
    pub(super) dirty: bool,
    /// Bumped by every change, so a store racing with a write does not mark it clean.
    pub(super) generation: u64,
    pub(super) mtime_ns: i64,
    /// Change time of the last local change (size or content).
    pub(super) ctime_ns: i64,
    /// The file's attributes when the shadow was made: what an open file shows once its name
    /// is gone (unlinked while open).
    pub(super) attr: NodeAttr,
    /// The version of the content the shadow started from (what a write-back store expects).
    pub(super) base_version: u64,
    pub(super) opens: u32,
    /// The last store failed and its error was reported; release does not retry it.
    pub(super) failed: bool,
    /// Its last name was removed here (write-back): as on any POSIX filesystem, what is
    /// written to it now goes nowhere (and is not sent as a conflict copy).
    pub(super) unlinked: bool,
    /// It was taken out of the map with changes not stored (see [`Core::let_go`]): an opener
    /// that changed it and finds it gone reports that its change was dropped.
    pub(super) dropped_dirty: bool,
    /// Local uids whose changes are not stored yet: each must still be allowed to write when
    /// the file is stored, whoever closes it (the commit uses the closer's token).
    pub(super) writers: std::collections::BTreeSet<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ShadowInit {
    Empty,
    Current,
}

pub(super) fn lock(s: &Mutex<Shadow>) -> std::sync::MutexGuard<'_, Shadow> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// An anonymous in-memory file.
fn memfd() -> std::io::Result<std::fs::File> {
    use std::os::fd::FromRawFd;
    // SAFETY: memfd_create takes a NUL-terminated name and flags; a non-negative result is a new
    // descriptor that nothing else owns.
    let fd = unsafe { libc::memfd_create(c"codafs-shadow".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor owned by nothing else.
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}

impl<R: Remote> Core<R> {
    fn shadow_path(&self, ino: u64) -> PathBuf {
        self.writes.shadow_dir.join(format!(
            "{ino:016x}-{}",
            self.writes.next_fh.fetch_add(1, Ordering::Relaxed)
        ))
    }

    /// The content of cached file `from` cut or zero-extended to `size` bytes (a truncate of a
    /// file that is not open): a large one goes through an unlinked file in the shadow
    /// directory, never through memory.
    pub(super) fn truncated(&self, ino: u64, from: &Hash, len: u64, size: u64) -> Result<Payload, FsError> {
        let path = self.shadow_path(ino);
        let file = blocking(size, || -> std::io::Result<std::fs::File> {
            self.blobs.copy_to(from, len, &path)?;
            let f = std::fs::OpenOptions::new().read(true).write(true).open(&path);
            let _ = std::fs::remove_file(&path);
            let f = f?;
            f.set_len(size)?;
            Ok(f)
        })?;
        Payload::of_file(&file, size)
    }

    /// Removes a shadow's file, or gives back its in-memory slot.
    pub(super) fn drop_shadow_file(&self, path: Option<&std::path::Path>) {
        match path {
            Some(p) => {
                let _ = std::fs::remove_file(p);
            }
            None => self.writes.put_memory_shadow(),
        }
    }

    /// Moves an in-memory shadow that outgrew [`IN_MEMORY_SHADOW`] to a file.
    fn spill(&self, ino: u64, g: &mut Shadow) -> Result<(), FsError> {
        let path = self.shadow_path(ino);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        let mut from = g.file.try_clone()?;
        std::io::Seek::rewind(&mut from)?;
        std::io::copy(&mut std::io::Read::take(from, g.size), &mut file)?;
        g.file = file;
        g.path = Some(path);
        self.writes.put_memory_shadow();
        Ok(())
    }

    /// Stores `data` as the content of file `ino` (mtime 0 = commit time).
    pub(super) async fn store_content(
        &self,
        ctx: &WriteCtx,
        ino: u64,
        data: Payload,
        mtime_ns: i64,
    ) -> Result<(), FsError> {
        let size = data.len();
        let hash = match data {
            Payload::Memory(d) => self.store_blob(ctx, bytes::Bytes::from(d)).await?,
            Payload::File { file, size } => self.store_chunked(ctx, &file, size).await?,
        };
        let set = Op::SetContent {
            expect: None,
            ino,
            hash,
            size,
            mtime_ns,
        };
        self.commit(ctx, vec![set], &[ino]).await?;
        Ok(())
    }

    /// Joins the file's shadow, creating it from the current content (or empty) if needed.
    pub(super) async fn attach_shadow(&self, ino: u64, init: ShadowInit) -> Result<(), FsError> {
        if self.join_shadow(ino, init)? {
            return Ok(());
        }
        let raw = self.attr(ino).await?;
        let attr = self.to_node(&raw);
        if attr.kind != NodeKind::File {
            return Err(FsError::IsDir);
        }
        if init == ShadowInit::Current && attr.size > MAX_WRITE_FILE {
            return Err(FsError::TooLarge(format!(
                "the mount stores files up to {MAX_WRITE_FILE} bytes; publish larger ones with codafs upload"
            )));
        }
        let in_memory = init == ShadowInit::Empty && self.writes.take_memory_shadow();
        let (file, path, size) = if in_memory {
            match memfd() {
                Ok(f) => (f, None, 0),
                Err(e) => {
                    self.writes.put_memory_shadow();
                    return Err(e.into());
                }
            }
        } else {
            let path = self.shadow_path(ino);
            let size = match init {
                ShadowInit::Empty => {
                    std::fs::File::create(&path)?;
                    0
                }
                ShadowInit::Current => {
                    let (hash, size) = self.ensure_cached(ino).await?;
                    let _pin = self.blobs.pin(hash);
                    blocking(size, || self.blobs.copy_to(&hash, size, &path))?;
                    size
                }
            };
            let file = std::fs::OpenOptions::new().read(true).write(true).open(&path)?;
            (file, Some(path), size)
        };
        let mut shadows = self.writes.shadows.lock().unwrap_or_else(|p| p.into_inner());
        if shadows.contains_key(&ino) {
            // Another opener won the race: join theirs.
            drop(shadows);
            self.drop_shadow_file(path.as_deref());
            if self.join_shadow(ino, init)? {
                return Ok(());
            }
            return Err(FsError::Io("a file's shadow vanished while it was being opened".into()));
        }
        shadows.insert(
            ino,
            Arc::new(Mutex::new(Shadow {
                file,
                path,
                size,
                dirty: init == ShadowInit::Empty && attr.size != 0,
                generation: 0,
                mtime_ns: attr.mtime_ns,
                ctime_ns: attr.ctime_ns,
                attr: attr.clone(),
                base_version: raw.version,
                opens: 1,
                failed: false,
                unlinked: false,
                dropped_dirty: false,
                writers: Default::default(),
            })),
        );
        Ok(())
    }

    /// The file's shadow, if it has one, held as one more open. The open is counted under the
    /// map lock, so a release racing with the caller cannot drop the shadow (and with it the
    /// caller's change) in between. Given back with [`Core::let_go`].
    pub(super) fn pin_shadow(&self, ino: u64) -> Option<Arc<Mutex<Shadow>>> {
        let shadows = self.writes.shadows.lock().unwrap_or_else(|p| p.into_inner());
        let sh = shadows.get(&ino)?.clone();
        lock(&sh).opens += 1;
        Some(sh)
    }

    /// Joins the file's existing shadow, if any (see [`Core::pin_shadow`]); truncates it for an
    /// `Empty` open.
    pub(super) fn join_shadow(&self, ino: u64, init: ShadowInit) -> Result<bool, FsError> {
        let Some(sh) = self.pin_shadow(ino) else {
            return Ok(false);
        };
        let mut g = lock(&sh);
        if init == ShadowInit::Empty && g.size != 0 {
            g.file.set_len(0)?;
            g.size = 0;
            g.dirty = true;
            g.generation += 1;
            g.mtime_ns = codafs_common::now_ns();
            g.ctime_ns = g.mtime_ns;
        }
        Ok(true)
    }

    /// `write` through a handle opened for writing.
    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<u32, FsError> {
        let (ino, uid, write) = self.writes.handle(fh).ok_or(FsError::BadHandle)?;
        if !write {
            return Err(FsError::BadHandle);
        }
        let end = offset.saturating_add(data.len() as u64);
        if end > MAX_WRITE_FILE {
            return Err(FsError::TooLarge(format!(
                "the mount stores files up to {MAX_WRITE_FILE} bytes"
            )));
        }
        let sh = self.writes.shadow(ino).ok_or(FsError::BadHandle)?;
        let mut g = lock(&sh);
        // The log keeps whole files: an edit of a file already past the bound fails too.
        self.check_loggable(g.size.max(end))?;
        if g.path.is_none() && end > IN_MEMORY_SHADOW {
            self.spill(ino, &mut g)?;
        }
        g.file.write_all_at(data, offset)?;
        g.writers.insert(uid);
        g.size = g.size.max(end);
        g.dirty = true;
        g.failed = false;
        g.generation += 1;
        g.mtime_ns = codafs_common::now_ns();
        g.ctime_ns = g.mtime_ns;
        Ok(data.len() as u32)
    }

    /// Reads from the shadow of a file open for writing, if it has one.
    pub(crate) fn read_shadow(&self, ino: u64, offset: u64, size: u32) -> Option<Result<Vec<u8>, FsError>> {
        let sh = self.writes.shadow(ino)?;
        let g = lock(&sh);
        if offset >= g.size {
            return Some(Ok(Vec::new()));
        }
        let n = (size as u64).min(g.size - offset) as usize;
        let mut buf = vec![0u8; n];
        Some(match g.file.read_exact_at(&mut buf, offset) {
            Ok(()) => Ok(buf),
            Err(e) => Err(e.into()),
        })
    }

    /// What an open file whose name is gone shows: its attributes at open with no links, and
    /// the shadow's size if it is being written.
    pub(crate) fn orphan_attr(&self, ino: u64) -> Option<NodeAttr> {
        if let Some(sh) = self.writes.shadow(ino) {
            let g = lock(&sh);
            let mut a = g.attr.clone();
            a.nlink = 0;
            a.size = g.size;
            a.mtime_ns = g.mtime_ns;
            a.ctime_ns = a.ctime_ns.max(g.ctime_ns);
            return Some(a);
        }
        let handles = self.writes.handles.lock().unwrap_or_else(|p| p.into_inner());
        let mut a = handles.values().find(|h| h.ino == ino).and_then(|h| h.attr.clone())?;
        a.nlink = 0;
        Some(a)
    }

    /// The content hash a read-only handle opened, for reading after an unlink.
    pub(crate) fn handle_content(&self, fh: u64) -> Option<(Hash, u64)> {
        let handles = self.writes.handles.lock().unwrap_or_else(|p| p.into_inner());
        let a = handles.get(&fh)?.attr.as_ref()?;
        Some((a.hash?, a.size))
    }

    /// Size and mtime a file open for writing shows (its shadow's).
    pub(crate) fn shadow_attr(&self, a: &mut NodeAttr) {
        if let Some(sh) = self.writes.shadow(a.ino) {
            let g = lock(&sh);
            a.size = g.size;
            if g.dirty {
                a.mtime_ns = g.mtime_ns;
                a.ctime_ns = a.ctime_ns.max(g.ctime_ns);
            }
        }
    }

    pub(super) async fn store_shadow(&self, ino: u64, uid: u32) -> Result<(), FsError> {
        let Some(sh) = self.writes.shadow(ino) else {
            return Ok(());
        };
        let store_lock = self
            .writes
            .store_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(ino)
            .or_default()
            .clone();
        let _one_store = store_lock.lock().await;
        let (data, generation, mtime, writers, base) = {
            let mut g = lock(&sh);
            if g.unlinked {
                g.dirty = false;
                g.writers.clear();
            }
            if !g.dirty {
                return Ok(());
            }
            let data = Payload::of_file(&g.file, g.size)?;
            (data, g.generation, g.mtime_ns, g.writers.clone(), g.base_version)
        };
        // Everyone whose bytes are in it must still be allowed to write this file.
        let allowed = writers
            .iter()
            .filter(|w| **w != uid)
            .try_for_each(|w| self.write_ctx(*w, ino).map(drop));
        let result = match allowed.and_then(|()| self.write_ctx(uid, ino)) {
            Ok(ctx) if self.writes_back() => self.store_logged(&ctx, uid, ino, data, mtime, base).await,
            Ok(ctx) => self.store_content(&ctx, ino, data, mtime).await,
            Err(e) => Err(e),
        };
        let mut g = lock(&sh);
        let result = match result {
            // Written or truncated again while this store read it: the shadow is still dirty,
            // and the store that follows (this file's next close or release) sends the newer
            // content, so this close has nothing to report.
            Err(FsError::Changed(why)) if g.generation != generation => {
                tracing::debug!(ino, %why, "a store superseded by a newer change");
                Ok(())
            }
            r => r,
        };
        match result {
            // Unlinked (here or elsewhere) while open: as on any POSIX filesystem, the last
            // writes to a file without a name go nowhere, and close succeeds.
            Ok(()) | Err(FsError::NotFound) => {
                if g.generation == generation {
                    g.dirty = false;
                    g.writers.clear();
                }
                g.failed = false;
                Ok(())
            }
            Err(e) => {
                // A store of an older generation failed: the newer one is still to be stored
                // (by the next close, or the last opener), so the shadow is not marked failed.
                if g.generation == generation {
                    g.failed = true;
                }
                Err(e)
            }
        }
    }
}
