//! What a data server answers when asked whether it holds a blob that a commit is about to
//! reference (a client's `Missing` query, a leader's commit check), and what asking does to the
//! blob's life.
//!
//! Asking used to touch every blob found, restarting its GC grace period. So a client could keep
//! content it uploaded but never committed alive for ever by asking about it, long after its
//! quota charge (`crate::pending`) had expired, and so could commits that failed at apply. Now:
//! - A **live** blob is touched as before: one a commit references (`blobref`), or a chunk of a
//!   referenced manifest (the set the last GC pass found, [`LiveChunks`]). Touching it guards
//!   against its last reference going between the check and the commit; if it dies later, it
//!   gets one grace period.
//! - An **unreferenced** blob (an upload whose commit has not come yet, or garbage) is never
//!   touched. It is reported held only while at least [`margin`] of its grace period is left,
//!   and then pinned in memory ([`Pins`]) until its natural end, for at most [`PIN_MAX`], so
//!   asking again cannot chain pins to keep it. The pin matters only when space pressure
//!   shortens the grace period between a commit's check and its apply: the commit then still
//!   has up to a minute, as a touch used to give it. An older unreferenced
//!   blob is reported missing: the client sends it again, which charges its quota and restarts
//!   its grace period as any store does.
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use codafs_common::Hash;

use crate::fsm::StateView as _;
use crate::node::Node;

/// The most of its grace period an unreferenced blob must have left to be reported held.
pub const MARGIN_MAX: Duration = Duration::from_secs(600);
/// The longest a pin lasts: far longer than a commit takes from its check to its apply.
pub const PIN_MAX: Duration = Duration::from_secs(60);
/// Most pins held at once (about 60 bytes each). Past it, a blob is reported held without a
/// pin: it still has [`margin`] of its grace left, which only space pressure can cut short.
const MAX_PINS: usize = 1 << 20;

/// How much of its grace period an unreferenced blob must have left to be reported held: a
/// quarter of it, at most [`MARGIN_MAX`] (so with the default hour, blobs up to 50 minutes
/// old; under space pressure's 60 s, up to 45 s old).
pub fn margin(grace: Duration) -> Duration {
    (grace / 4).min(MARGIN_MAX)
}

/// What to answer about a blob held here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Live: held, and touched.
    Touch,
    /// Unreferenced with enough grace left: held, and pinned for this long.
    Pin(Duration),
    /// Unreferenced, near the end of its grace period: reported missing.
    Lacking,
}

/// The answer about a blob held here for `age` (since it was stored or last touched) while the
/// grace period is `grace`.
pub fn judge(live: bool, age: Duration, grace: Duration) -> Answer {
    if live {
        return Answer::Touch;
    }
    let margin = margin(grace);
    if age.saturating_add(margin) < grace {
        Answer::Pin((grace - age).min(PIN_MAX))
    } else {
        Answer::Lacking
    }
}

/// The chunks of the manifests referenced when the last GC pass ran, by the first 16 bytes of
/// their hashes (a collision would need 2^64 work and gains one touch). Only answers read it:
/// GC decides what to delete from the manifests themselves.
#[derive(Default)]
pub struct LiveChunks(Mutex<Arc<HashSet<[u8; 16]>>>);

/// The key of `h` in [`LiveChunks`].
pub fn prefix(h: &Hash) -> [u8; 16] {
    let mut p = [0u8; 16];
    p.copy_from_slice(&h.0[..16]);
    p
}

impl LiveChunks {
    pub fn replace(&self, set: HashSet<[u8; 16]>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(set);
    }

    /// The set now (cheap: shared).
    pub fn get(&self) -> Arc<HashSet<[u8; 16]>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Unreferenced blobs reported held to a commit: GC leaves them until their pins end.
#[derive(Default)]
pub struct Pins(Mutex<HashMap<Hash, Instant>>);

impl Pins {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<Hash, Instant>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Pins `h` for `d` (a longer pin already there stays); false when the table is full.
    pub fn pin(&self, h: Hash, d: Duration) -> bool {
        let now = Instant::now();
        let until = now + d;
        let mut m = self.map();
        if m.len() >= MAX_PINS && !m.contains_key(&h) {
            m.retain(|_, u| *u > now);
            if m.len() >= MAX_PINS {
                return false;
            }
        }
        let e = m.entry(h).or_insert(until);
        *e = (*e).max(until);
        true
    }

    /// Whether `h` is pinned now.
    pub fn held(&self, h: &Hash) -> bool {
        self.map().get(h).is_some_and(|u| *u > Instant::now())
    }

    /// Drops the pins that ended (GC passes call it).
    pub fn prune(&self) {
        let now = Instant::now();
        self.map().retain(|_, u| *u > now);
    }
}

/// How a blob asked about is held here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// Held, with the size asked about (or none was given).
    Yes,
    /// Held with another size than the one asked about.
    OtherSize,
    /// Not held, or unreferenced near the end of its grace period (see the module doc).
    No,
}

/// What answering needs of a server, taken on the async side and moved to a blocking thread.
pub struct Asker {
    blobs: Arc<crate::blobs::BlobStore>,
    tables: crate::db::Tables,
    live: Arc<HashSet<[u8; 16]>>,
    pins: Arc<Pins>,
    grace: Duration,
    witness: bool,
}

impl Node {
    /// The grace period GC uses now: the shorter one under space pressure.
    pub fn gc_grace_now(&self) -> Duration {
        let normal = Duration::from_secs(self.cfg.gc_grace_s);
        if self.space.under_pressure() {
            Duration::from_secs(self.cfg.gc_pressure_grace_s).min(normal)
        } else {
            normal
        }
    }

    /// What [`Asker::held_for_commit`] needs, now.
    pub fn asker(&self) -> Asker {
        Asker {
            blobs: self.blobs.clone(),
            tables: self.tables().clone(),
            live: self.live_chunks.get(),
            pins: self.pins.clone(),
            grace: self.gc_grace_now(),
            witness: self.is_witness(),
        }
    }
}

impl Asker {
    /// Whether each of `asked` is stored here (with the size asked about, if any), touching
    /// nothing: what health checks and hinted handoff ask.
    pub fn stored(&self, asked: &[(Hash, Option<u64>)]) -> Vec<Held> {
        asked
            .iter()
            .map(|(h, want)| match self.blobs.size(h) {
                None => Held::No,
                Some(len) if want.is_some_and(|w| w != len) => Held::OtherSize,
                Some(_) => Held::Yes,
            })
            .collect()
    }

    /// Answers whether each of `asked` (a hash and, optionally, the size it must have) is held
    /// here for a commit about to reference it, touching or pinning what is reported held (see
    /// the module doc). A witness answers from its spool and touches what it holds. Blocking:
    /// a stat and a table read per blob.
    pub fn held_for_commit(&self, asked: &[(Hash, Option<u64>)]) -> Vec<Held> {
        let mut unpinned = 0usize;
        let out = asked
            .iter()
            .zip(self.stored(asked))
            .map(|((h, _), stored)| {
                if stored != Held::Yes {
                    return stored;
                }
                let live = self.witness || self.live.contains(&prefix(h)) || !matches!(self.tables.blobref(h), Ok(0));
                let age = self.blobs.age(h).unwrap_or(Duration::ZERO);
                match judge(live, age, self.grace) {
                    Answer::Touch => self.blobs.touch(h),
                    Answer::Pin(d) => unpinned += usize::from(!self.pins.pin(*h, d)),
                    Answer::Lacking => return Held::No,
                }
                Held::Yes
            })
            .collect();
        if unpinned > 0 {
            tracing::warn!(unpinned, "the pin table is full: blobs reported held without a pin");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreferenced_blobs_are_held_only_with_a_margin_of_grace_left_and_never_pinned_past_it() {
        let hour = Duration::from_secs(3600);
        let min = |m: u64| Duration::from_secs(60 * m);
        assert_eq!(
            judge(true, min(500), hour),
            Answer::Touch,
            "live: touched, whatever its age"
        );
        assert_eq!(judge(false, min(1), hour), Answer::Pin(PIN_MAX));
        assert_eq!(judge(false, min(49), hour), Answer::Pin(PIN_MAX));
        assert_eq!(judge(false, min(50), hour), Answer::Lacking, "less than 10 min left");
        assert_eq!(judge(false, min(90), hour), Answer::Lacking);
        // Under space pressure (60 s): held for its first 45 s, pinned until its natural end.
        let pressure = Duration::from_secs(60);
        assert_eq!(
            judge(false, Duration::from_secs(5), pressure),
            Answer::Pin(Duration::from_secs(55))
        );
        assert_eq!(
            judge(false, Duration::from_secs(44), pressure),
            Answer::Pin(Duration::from_secs(16))
        );
        assert_eq!(judge(false, Duration::from_secs(45), pressure), Answer::Lacking);
        // A pin never reaches past the blob's natural end.
        for grace_s in [2u64, 60, 600, 3600, 86_400] {
            let grace = Duration::from_secs(grace_s);
            for age_s in 0..grace_s {
                let age = Duration::from_secs(age_s);
                if let Answer::Pin(d) = judge(false, age, grace) {
                    assert!(age + d <= grace, "grace {grace_s} s, age {age_s} s: pinned {d:?}");
                    assert!(
                        d >= margin(grace).min(PIN_MAX),
                        "grace {grace_s} s, age {age_s} s: pinned only {d:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn pins_end_and_a_longer_one_stays() {
        let p = Pins::default();
        let h = Hash::of(b"x");
        assert!(p.pin(h, Duration::from_secs(60)));
        assert!(p.pin(h, Duration::ZERO), "a shorter pin leaves the longer one");
        assert!(p.held(&h));
        let g = Hash::of(b"y");
        assert!(p.pin(g, Duration::ZERO));
        assert!(!p.held(&g), "ended at once");
        p.prune();
        assert_eq!(p.map().len(), 1);
    }
}
