//! Bytes each account stored on this server that no volume references yet.
//!
//! They count against the account's quota headroom until a commit references them or
//! [`PENDING_TTL`] passes, so a writer cannot fill the servers' disks with blobs it never
//! commits. Kept in memory per server: a restart forgets it, and garbage collection removes what
//! is never referenced.
//!
//! A store reserves its charge before it writes anything (so concurrent stores cannot all slip
//! under the headroom) and keeps it only once its content is verified and stored: a [`Charge`]
//! dropped without [`Charge::keep`] takes back what it alone held. Stores of one blob running
//! at once share its entry (counted once, held by each until it keeps or fails), so a failing
//! store never takes back a charge another one relies on. Past [`PENDING_PER_USER`] blobs an
//! account's further charges are kept as bytes by the minute, without hashes: they can no
//! longer be told referenced, so they count until they expire. That over-charges a very large
//! upload for up to an hour; it never under-charges, and nothing is pushed out.
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use codafs_common::Hash;

use crate::node::NodeError;

/// How long stored-but-unreferenced bytes count against their uploader at least; longer when
/// the GC grace period is longer ([`PendingBytes::new`]), so that garbage counts for as long as
/// GC keeps it.
pub const PENDING_TTL: Duration = Duration::from_secs(3600);
/// Most uploaders tracked at once (beyond it, the one idle longest is forgotten).
const PENDING_USERS: usize = 4096;
/// Most pending blobs tracked by hash per uploader; beyond, bytes by the minute.
pub const PENDING_PER_USER: usize = 65_536;
/// Overflow charges within this span share one bucket.
const BUCKET: Duration = Duration::from_secs(60);

/// One pending blob.
struct Entry {
    size: u64,
    at: Instant,
    /// Stores of it in progress.
    holds: u32,
    /// Some store of it succeeded.
    kept: bool,
}

/// One account's pending blobs.
#[derive(Default)]
struct Account {
    blobs: HashMap<Hash, Entry>,
    /// Charges past [`PENDING_PER_USER`]: (bucket start, bytes), oldest first.
    overflow: VecDeque<(Instant, u64)>,
    /// Sum of the sizes in `blobs` and `overflow`.
    bytes: u64,
    /// Last store admitted (which account to forget when too many are tracked).
    active: Option<Instant>,
}

impl Account {
    fn remove(&mut self, h: &Hash) -> Option<u64> {
        let e = self.blobs.remove(h)?;
        self.bytes -= e.size;
        Some(e.size)
    }

    /// Drops entries that expired or that a commit references by now (not while a store of
    /// them runs). Each entry costs a lookup, so this runs only when a store would otherwise
    /// be refused.
    fn prune(&mut self, now: Instant, ttl: Duration, referenced: &impl Fn(&Hash) -> bool) {
        let gone: Vec<Hash> = self
            .blobs
            .iter()
            .filter(|(h, e)| e.holds == 0 && (now.duration_since(e.at) >= ttl || referenced(h)))
            .map(|(h, _)| *h)
            .collect();
        for h in &gone {
            self.remove(h);
        }
        while let Some((at, b)) = self.overflow.front().copied() {
            if now.duration_since(at) < ttl {
                break;
            }
            self.overflow.pop_front();
            self.bytes -= b;
        }
    }

    /// Charges `size` bytes past the hash-tracked limit; returns the bucket it went to.
    fn overflow(&mut self, now: Instant, size: u64) -> Instant {
        match self.overflow.back_mut() {
            Some((at, b)) if now.duration_since(*at) < BUCKET => *b += size,
            _ => self.overflow.push_back((now, size)),
        }
        self.bytes += size;
        self.overflow.back().map_or(now, |(at, _)| *at)
    }
}

/// See the module documentation.
pub struct PendingBytes {
    by_user: Mutex<HashMap<String, Account>>,
    /// How long a charge lasts.
    ttl: Duration,
}

impl Default for PendingBytes {
    fn default() -> Self {
        Self::new(Duration::ZERO)
    }
}

/// A reserved charge: what it alone held is taken back when dropped, unless [`Charge::keep`]
/// was called.
#[must_use = "a charge is taken back when dropped: keep it once the content is stored"]
pub struct Charge<'a> {
    pending: &'a PendingBytes,
    user: String,
    /// Entries this store holds.
    hashes: Vec<Hash>,
    /// Bytes charged past the limit, and their bucket.
    overflow: Option<(Instant, u64)>,
}

impl Charge<'_> {
    /// The account charged.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The content is stored here: the charge stands (until committed or expired). Returns
    /// the account charged.
    pub fn keep(mut self) -> String {
        let hashes = std::mem::take(&mut self.hashes);
        self.overflow = None;
        let mut map = self.pending.lock();
        if let Some(acct) = map.get_mut(&self.user) {
            for h in &hashes {
                if let Some(e) = acct.blobs.get_mut(h) {
                    e.holds = e.holds.saturating_sub(1);
                    e.kept = true;
                }
            }
        }
        std::mem::take(&mut self.user)
    }
}

impl Drop for Charge<'_> {
    fn drop(&mut self) {
        if self.hashes.is_empty() && self.overflow.is_none() {
            return;
        }
        let mut map = self.pending.lock();
        let Some(acct) = map.get_mut(&self.user) else { return };
        for h in &self.hashes {
            let gone = acct.blobs.get_mut(h).is_some_and(|e| {
                e.holds = e.holds.saturating_sub(1);
                e.holds == 0 && !e.kept
            });
            if gone {
                acct.remove(h);
            }
        }
        if let Some((at, size)) = self.overflow {
            if let Some((_, b)) = acct.overflow.iter_mut().find(|(t, _)| *t == at) {
                let back = size.min(*b);
                *b -= back;
                acct.bytes -= back;
            }
        }
    }
}

impl PendingBytes {
    /// Charges that last [`PENDING_TTL`], or `gc_grace` if that is longer.
    pub fn new(gc_grace: Duration) -> Self {
        PendingBytes {
            by_user: Mutex::default(),
            ttl: PENDING_TTL.max(gc_grace),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Account>> {
        self.by_user.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reserves the charge of `blobs` to be stored by `user`, if its pending bytes plus theirs
    /// fit `headroom` (`None` = unlimited). `referenced` says whether a hash is referenced by a
    /// commit by now (those cost nothing). A blob already charged, or named twice, is charged
    /// once.
    pub fn admit(
        &self,
        user: &str,
        blobs: &[(Hash, u64)],
        headroom: Option<u64>,
        referenced: impl Fn(&Hash) -> bool,
    ) -> Result<Charge<'_>, NodeError> {
        let mut map = self.lock();
        let now = Instant::now();
        if !map.contains_key(user) && map.len() >= PENDING_USERS {
            // Forget the account idle longest (bounded memory; GC still applies).
            let idle = map.iter().min_by_key(|(_, a)| a.active).map(|(k, _)| k.clone());
            if let Some(k) = idle {
                map.remove(&k);
            }
        }
        let acct = map.entry(user.to_string()).or_default();
        let mut seen = HashSet::new();
        let (mut shared, mut new) = (Vec::new(), Vec::new());
        for (h, size) in blobs {
            if !seen.insert(*h) {
                continue;
            }
            match acct.blobs.get_mut(h) {
                // Being stored by another request right now: shared, so a failure of that
                // one cannot take back the charge this one relies on.
                Some(e) if !e.kept => shared.push(*h),
                // Stored again: that restarts its GC grace period, so its charge restarts too.
                Some(e) => e.at = now,
                None if !referenced(h) => new.push((*h, *size)),
                None => {}
            }
        }
        let adding: u64 = new.iter().map(|(_, s)| *s).sum();
        let fits = |a: &Account| headroom.is_none_or(|room| a.bytes.saturating_add(adding) <= room);
        if !fits(acct) {
            acct.prune(now, self.ttl, &referenced);
        }
        if !fits(acct) {
            let minutes = self.ttl.as_secs().div_ceil(60);
            return Err(NodeError::Quota(format!(
                "{user} has {} bytes uploaded but not yet committed; {adding} more would exceed the {} bytes left \
                 in its volumes' quotas (commit or wait {minutes} min)",
                acct.bytes,
                headroom.unwrap_or(0)
            )));
        }
        let mut hashes = shared;
        let mut over = 0u64;
        for (h, size) in new {
            if acct.blobs.len() < PENDING_PER_USER {
                acct.blobs.insert(
                    h,
                    Entry {
                        size,
                        at: now,
                        holds: 0,
                        kept: false,
                    },
                );
                acct.bytes += size;
                hashes.push(h);
            } else {
                over += size;
            }
        }
        for h in &hashes {
            if let Some(e) = acct.blobs.get_mut(h) {
                e.holds += 1;
            }
        }
        let overflow = (over > 0).then(|| (acct.overflow(now, over), over));
        acct.active = Some(now);
        Ok(Charge {
            pending: self,
            user: user.to_string(),
            hashes,
            overflow,
        })
    }

    /// Moves `user`'s pending charges of `chunks` onto `manifest`: a large file's chunks are
    /// referenced only through its manifest, so their bytes stop counting once a commit
    /// references the manifest (or expire with it). Chunks still being stored stay as they are.
    pub fn fold(&self, user: &str, manifest: Hash, chunks: &HashSet<Hash>) {
        let mut map = self.lock();
        let Some(acct) = map.get_mut(user) else { return };
        let settled: Vec<Hash> = chunks
            .iter()
            .filter(|h| **h != manifest && acct.blobs.get(h).is_some_and(|e| e.holds == 0))
            .copied()
            .collect();
        let moved: u64 = settled.iter().filter_map(|h| acct.remove(h)).sum();
        if moved == 0 {
            return;
        }
        let now = Instant::now();
        let e = acct.blobs.entry(manifest).or_insert(Entry {
            size: 0,
            at: now,
            holds: 0,
            kept: true,
        });
        e.size += moved;
        acct.bytes += moved;
    }

    /// Bytes and blobs `user` has pending (for tests and diagnostics).
    pub fn of(&self, user: &str) -> (u64, usize) {
        self.lock().get(user).map_or((0, 0), |a| (a.bytes, a.blobs.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_bytes_count_until_referenced() {
        let p = PendingBytes::default();
        let (a, b, c) = (Hash::of(b"a"), Hash::of(b"b"), Hash::of(b"c"));
        p.admit("web", &[(a, 600)], Some(1000), |_| false).unwrap().keep();
        // The same blob again costs nothing more.
        p.admit("web", &[(a, 600)], Some(1000), |_| false).unwrap().keep();
        let err = p.admit("web", &[(b, 500)], Some(1000), |_| false).err().unwrap();
        assert!(matches!(err, NodeError::Quota(_)), "{err}");
        // Another account has its own allowance.
        p.admit("other", &[(b, 500)], Some(1000), |_| false).unwrap().keep();
        // Once `a` is referenced by a commit, it no longer counts.
        p.admit("web", &[(b, 500)], Some(1000), |h| *h == a).unwrap().keep();
        p.admit("web", &[(c, 1)], None, |_| false).unwrap().keep();
        assert_eq!(p.of("web"), (501, 2));
    }

    /// A large file's chunks stop counting when a commit references its manifest.
    #[test]
    fn chunk_charges_move_onto_their_manifest() {
        let p = PendingBytes::default();
        let (c1, c2, m) = (Hash::of(b"c1"), Hash::of(b"c2"), Hash::of(b"m"));
        p.admit("web", &[(c1, 400), (c2, 400)], Some(1000), |_| false)
            .unwrap()
            .keep();
        p.admit("web", &[(m, 100)], Some(1000), |_| false).unwrap().keep();
        p.fold("web", m, &[c1, c2].into_iter().collect());
        assert_eq!(p.of("web"), (900, 1));
        // Still charged (900 of 1000) until the manifest is referenced...
        let err = p
            .admit("web", &[(Hash::of(b"x"), 200)], Some(1000), |_| false)
            .err()
            .unwrap();
        assert!(matches!(err, NodeError::Quota(_)), "{err}");
        // ...then nothing of it counts.
        p.admit("web", &[(Hash::of(b"x"), 900)], Some(1000), |h| *h == m)
            .unwrap()
            .keep();
    }

    /// A store that fails (its content did not verify, say) takes its charge back; one named
    /// twice in a batch is charged once.
    #[test]
    fn a_failed_store_leaves_no_charge_and_a_batch_charges_each_blob_once() {
        let p = PendingBytes::default();
        let (a, b) = (Hash::of(b"a"), Hash::of(b"b"));
        let charge = p.admit("web", &[(a, 600), (a, 600)], Some(1000), |_| false).unwrap();
        assert_eq!(charge.user(), "web");
        assert_eq!(p.of("web"), (600, 1), "reserved while the store runs");
        drop(charge);
        assert_eq!(p.of("web"), (0, 0), "taken back");
        p.admit("web", &[(b, 1000)], Some(1000), |_| false).unwrap().keep();
        assert_eq!(p.of("web"), (1000, 1));
    }

    /// Past the hash-tracked limit, charges are kept as bytes until they expire: nothing is
    /// refused for the count, and nothing already charged is pushed out.
    #[test]
    fn past_the_tracked_limit_charges_are_kept_as_bytes() {
        let p = PendingBytes::default();
        let hashes: Vec<(Hash, u64)> = (0..PENDING_PER_USER as u64)
            .map(|i| (Hash::of(&i.to_le_bytes()), 1))
            .collect();
        let _ = p.admit("web", &hashes, None, |_| false).unwrap().keep();
        let extra = Hash::of(b"one more");
        let _ = p.admit("web", &[(extra, 10)], None, |_| false).unwrap().keep();
        assert_eq!(p.of("web"), (PENDING_PER_USER as u64 + 10, PENDING_PER_USER));
        // The overflow counts against the headroom like any charge...
        let room = Some(PENDING_PER_USER as u64 + 15);
        assert!(p.admit("web", &[(Hash::of(b"x"), 6)], room, |_| false).is_err());
        // ...and a failed overflow store takes its bytes back.
        drop(p.admit("web", &[(Hash::of(b"y"), 5)], None, |_| false).unwrap());
        assert_eq!(p.of("web").0, PENDING_PER_USER as u64 + 10);
    }

    /// Two stores of one blob at once: the first fails, the second succeeds; the blob stays
    /// charged (a failing store never takes back a charge another relies on).
    #[test]
    fn a_failing_store_never_takes_back_a_charge_another_relies_on() {
        let p = PendingBytes::default();
        let h = Hash::of(b"h");
        let first = p.admit("web", &[(h, 700)], Some(1000), |_| false).unwrap();
        let second = p.admit("web", &[(h, 700)], Some(1000), |_| false).unwrap();
        assert_eq!(p.of("web"), (700, 1), "charged once");
        drop(first);
        assert_eq!(p.of("web"), (700, 1), "still held by the second");
        let _ = second.keep();
        assert_eq!(p.of("web"), (700, 1));
        // The other order: kept first, then a failing one changes nothing.
        let third = p.admit("web", &[(h, 700)], Some(1000), |_| false).unwrap();
        drop(third);
        assert_eq!(p.of("web"), (700, 1));
    }
}
