//! A cold web node's first reads: when a name lookup fetches a directory's listing, the small
//! files of that directory come with it in one `GetSmall` call, so opening them next needs no
//! fetch each (a miss cost a round trip per file). Bounded per listing, best effort: whatever
//! is not brought here is fetched on open as before.
//!
//! A batch is cached as one pack, not a file each (see `cache/pack.rs`).
//!
//! The lookup does not wait for them: it answers once the listing is in, and the batch runs in
//! the background (at most [`BACKGROUND_BATCHES`] at once; past that, inline). On a cold node
//! a batch took about 33 ms against 4 ms for the listing, and readers waited for both. The file
//! the lookup was for is then usually fetched on its own by the read that follows, at the cost
//! of one file fetched twice per directory.
use std::collections::HashSet;
use std::sync::atomic::Ordering;

use codafs_common::Hash;
use codafs_proto::limits::MAX_SMALL_GET;

use super::remote::Remote;
use super::types::Attr;
use super::{Core, NodeKind};
use crate::transport::BlobRef;

/// Files up to this size are brought with their directory's listing.
const MAX_FILE: u64 = 64 << 10;
/// Bytes brought with one listing, at most.
const MAX_BYTES: u64 = 1 << 20;

/// Small-file batches that run in the background at once.
pub(super) const BACKGROUND_BATCHES: usize = 4;

impl<R: Remote> Core<R> {
    /// Brings the small files of a just-fetched listing into the cache, in the background when
    /// the core runs work there and a batch slot is free, inline otherwise.
    pub(super) async fn bring_small(&self, entries: &[(String, Attr)]) {
        let want = self.small_wanted(entries);
        // One file costs the same either way.
        if want.len() < 2 {
            return;
        }
        let me = self.me.get().and_then(std::sync::Weak::upgrade);
        if let Some(me) = me {
            if let Ok(slot) = self.small_batches.clone().try_acquire_owned() {
                tokio::spawn(async move {
                    let started = std::time::Instant::now();
                    if let Some((asked, got)) = me.fetch_small(want).await {
                        // Up to a few hundred file writes: on a blocking thread, not a worker.
                        let cache = me.clone();
                        if let Err(e) = tokio::task::spawn_blocking(move || cache.cache_small(&asked, got)).await {
                            tracing::debug!(error = %e, "caching a small-file batch ended early");
                        }
                    }
                    me.timings.small_files_fetched(started);
                    drop(slot);
                });
                return;
            }
        }
        let started = std::time::Instant::now();
        if let Some((asked, got)) = self.fetch_small(want).await {
            // Each file is at most MAX_FILE, small enough to write in place.
            self.cache_small(&asked, got);
        }
        self.timings.small_files_fetched(started);
    }

    /// The small files of `entries` worth bringing: not cached, each blob once, within the
    /// batch's bounds.
    fn small_wanted(&self, entries: &[(String, Attr)]) -> Vec<BlobRef> {
        let mut want: Vec<BlobRef> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut bytes = 0u64;
        for (_, a) in entries {
            if want.len() >= MAX_SMALL_GET {
                break;
            }
            let (NodeKind::File, Some(hash)) = (a.kind, a.hash) else {
                continue;
            };
            // `holds`, not `lookup`: choosing must not re-hash an unverified entry.
            if a.size > MAX_FILE || bytes + a.size > MAX_BYTES || self.blobs.holds(&hash) || !seen.insert(hash) {
                continue;
            }
            bytes += a.size;
            want.push(BlobRef {
                hash,
                ticket: a.read_ticket.clone(),
                ino: a.ino,
                manifest: None,
            });
        }
        want
    }

    /// Fetches `want` in one call: the hashes asked for and what came back.
    async fn fetch_small(&self, want: Vec<BlobRef>) -> Option<(HashSet<Hash>, Vec<(Hash, bytes::Bytes)>)> {
        let asked: HashSet<Hash> = want.iter().map(|b| b.hash).collect();
        match tokio::time::timeout(self.cfg.op_timeout, self.remote.fetch_small(want)).await {
            Ok(Ok(got)) => Some((asked, got)),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "small files not brought with their listing");
                None
            }
            Err(_) => None,
        }
    }

    /// Caches what came back of a batch, as one pack (`cache/pack.rs`): the files that
    /// were asked for and match their hashes.
    fn cache_small(&self, asked: &HashSet<Hash>, got: Vec<(Hash, bytes::Bytes)>) {
        let mut good: Vec<(Hash, &[u8])> = Vec::with_capacity(got.len());
        for (hash, data) in &got {
            if !asked.contains(hash) {
                continue;
            }
            if Hash::of(data) != *hash {
                self.stats.bad_small_copies.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            good.push((*hash, data));
        }
        match self.blobs.put_pack(&good) {
            Ok(n) => {
                self.stats.prefetched.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) => tracing::debug!(error = %e, "the small files brought with a listing were not cached"),
        }
    }
}
