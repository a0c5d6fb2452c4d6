//! The reply protocol: what a reply that shows metadata to the kernel must do, and in what
//! order. The FUSE adaptor only sends what these methods return, while holding the view guard
//! they return with it, so no reply computed before a change event goes out after it.
//!
//! For each node shown: first drop the kernel's stale pages of it if a change replaced its
//! content without changing its size or mtime ([`Core::take_stale_pages`]); then the answer is
//! recomputed if an event switched the view meanwhile ([`Core::current`]); last, every name the
//! kernel is told is recorded ([`Core::told_name`]) before the reply goes out, so a later change
//! event knows to drop it.
use std::sync::Arc;

use super::remote::Remote;
use super::{Core, FsError, Invalidator, NodeAttr, NodeKind};

/// Held until the reply is sent: no change event switches the view meanwhile.
pub type ViewGuard<'a> = tokio::sync::RwLockReadGuard<'a, ()>;

/// The kernel, once the mount exists (`None` before, and in tests without one).
pub type Kernel = Option<Arc<dyn Invalidator>>;

/// Most entries a plain readdir reply is built from (names only: more than a kernel buffer
/// of the smallest entries holds, so a reply is never short for want of entries).
pub const NAMES_PER_REPLY: usize = 4096;

/// Most entries a readdirplus reply is built from, each with its attributes. Entries the
/// reply buffer has no room for are asked for again by the kernel.
pub const ENTRIES_PER_REPLY: usize = 1024;

impl<R: Remote> Core<R> {
    /// The attributes of `parent`/`name`, for a lookup reply.
    pub async fn lookup_reply(
        &self,
        parent: u64,
        name: &str,
        kernel: &Kernel,
    ) -> (Result<NodeAttr, FsError>, ViewGuard<'_>) {
        let (r, view) = self.current(|| self.shown(self.lookup(parent, name), kernel)).await;
        if let Ok(a) = &r {
            self.told_name(parent, name, a.ino);
        }
        (r, view)
    }

    /// The attributes of `ino`, for a getattr reply.
    pub async fn getattr_reply(&self, ino: u64, kernel: &Kernel) -> (Result<NodeAttr, FsError>, ViewGuard<'_>) {
        self.current(|| self.shown(self.getattr(ino), kernel)).await
    }

    /// A symlink's target, for a readlink reply.
    pub async fn readlink_reply(&self, ino: u64) -> (Result<String, FsError>, ViewGuard<'_>) {
        self.current(|| self.readlink(ino)).await
    }

    /// Directory `ino`'s names (no attributes) from entry `skip` on (`.` and `..` not
    /// counted), at most [`NAMES_PER_REPLY`], for a plain readdir reply. The kernel makes no
    /// names from these.
    pub async fn names_reply(
        &self,
        ino: u64,
        skip: usize,
    ) -> (Result<Vec<(String, u64, NodeKind)>, FsError>, ViewGuard<'_>) {
        self.current(|| self.readdir_page(ino, skip, NAMES_PER_REPLY)).await
    }

    /// Directory `ino`'s entries from position `offset` on (0 and 1 are `.` and `..`), at most
    /// [`ENTRIES_PER_REPLY`] with their attributes, for a readdirplus reply. Every entry's name is recorded as told: the
    /// kernel makes a name of each one it takes, and recording one it did not take (the reply
    /// buffer filled first) only costs a needless invalidation later.
    pub async fn listing_reply(
        &self,
        ino: u64,
        offset: u64,
        kernel: &Kernel,
    ) -> (Result<Vec<(String, NodeAttr)>, FsError>, ViewGuard<'_>) {
        let (r, view) = self.current(|| self.listing_from(ino, offset, kernel)).await;
        if let Ok(all) = &r {
            for (name, a) in all.iter().skip(2) {
                self.told_name(ino, name, a.ino);
            }
        }
        (r, view)
    }

    /// `.` and `..` (both `ino` itself), then the entries from `offset`.
    async fn listing_from(&self, ino: u64, offset: u64, kernel: &Kernel) -> Result<Vec<(String, NodeAttr)>, FsError> {
        let entries = self
            .readdir_page(ino, (offset as usize).saturating_sub(2), ENTRIES_PER_REPLY)
            .await?;
        let me = self.getattr(ino).await?;
        let mut all = vec![(".".to_string(), me.clone()), ("..".to_string(), me)];
        for (name, child, _) in entries {
            let a = self.shown(self.getattr(child), kernel).await?;
            all.push((name, a));
        }
        Ok(all)
    }

    /// Runs `fetch`, then drops the kernel's stale pages of the node it returns.
    async fn shown(
        &self,
        fetch: impl std::future::Future<Output = Result<NodeAttr, FsError>>,
        kernel: &Kernel,
    ) -> Result<NodeAttr, FsError> {
        let a = fetch.await?;
        self.drop_stale_pages(&a, kernel).await;
        Ok(a)
    }

    /// Drops the kernel's pages of `a` if a change event replaced it since they were read and
    /// the kernel would keep them. The kernel waits for page locks here, which only reads in
    /// flight hold; their replies need no lock of ours, so this cannot deadlock. It runs on the
    /// blocking pool so that a wait never holds up a runtime worker those reads need.
    async fn drop_stale_pages(&self, a: &NodeAttr, kernel: &Kernel) {
        if !self.take_stale_pages(a) {
            return;
        }
        let ino = a.ino;
        if let Some(k) = kernel.clone() {
            if let Err(e) = tokio::task::spawn_blocking(move || k.drop_pages(ino)).await {
                tracing::debug!(ino, error = %e, "dropping stale pages");
            }
        }
    }
}
