//! A cold web node's first reads: when a name lookup fetches a directory's listing, the small
//! files of that directory come with it in one `GetSmall` call, so opening them next needs no
//! fetch each (a miss cost a round trip per file). Bounded per listing, best effort: whatever
//! is not brought here is fetched on open as before.
//!
//! The lookup does not wait for them: it answers once the listing is in, and the batch runs in
//! the background (at most [`BACKGROUND_BATCHES`] at once; past that, inline). On a cold node
//! a batch took about 33 ms against 4 ms for the listing, and readers waited for both. The file
//! the lookup was for is then usually fetched on its own by the read that follows, at the cost
//! of one file fetched twice per directory.
use std::sync::atomic::Ordering;

use codafs_common::Hash;
use codafs_proto::limits::MAX_SMALL_GET;

use super::remote::Remote;
use super::types::Attr;
use super::{Core, NodeKind};
use crate::blocking::blocking;
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
        let me = self.me.get().and_then(std::sync::Weak::upgrade);
        if let Some(me) = me {
            if let Ok(slot) = self.small_batches.clone().try_acquire_owned() {
                let entries = entries.to_vec();
                tokio::spawn(async move {
                    me.prefetch_small(&entries).await;
                    drop(slot);
                });
                return;
            }
        }
        self.prefetch_small(entries).await;
    }

    /// Brings the small files of a just-fetched listing into the cache (those not cached yet).
    pub(super) async fn prefetch_small(&self, entries: &[(String, Attr)]) {
        let mut want: Vec<BlobRef> = Vec::new();
        let mut bytes = 0u64;
        for (_, a) in entries {
            if want.len() >= MAX_SMALL_GET {
                break;
            }
            let (NodeKind::File, Some(hash)) = (a.kind, a.hash) else {
                continue;
            };
            if a.size > MAX_FILE || bytes + a.size > MAX_BYTES || self.blobs.lookup(&hash) {
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
        // One file costs the same either way.
        if want.len() < 2 {
            return;
        }
        let started = std::time::Instant::now();
        self.fetch_small_into_cache(want).await;
        self.timings.small_files_fetched(started);
    }

    /// Fetches `want` in one call and caches what verifies.
    async fn fetch_small_into_cache(&self, want: Vec<BlobRef>) {
        let asked: std::collections::HashSet<Hash> = want.iter().map(|b| b.hash).collect();
        let got = match tokio::time::timeout(self.cfg.op_timeout, self.remote.fetch_small(want)).await {
            Ok(Ok(got)) => got,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "small files not brought with their listing");
                return;
            }
            Err(_) => return,
        };
        for (hash, data) in got {
            let len = data.len() as u64;
            if !asked.contains(&hash) || self.blobs.lookup(&hash) {
                continue;
            }
            if blocking(len, || Hash::of(&data)) != hash {
                self.stats.bad_small_copies.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if let Err(e) = blocking(len, || self.blobs.put_verified(hash, &data)) {
                tracing::debug!(%hash, error = %e, "a small file brought with its listing was not cached");
                continue;
            }
            self.stats.prefetched.fetch_add(1, Ordering::Relaxed);
        }
    }
}
