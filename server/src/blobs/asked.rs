//! What a data server answers when asked whether it holds a blob that a commit is about to
//! reference (a client's `Missing` query, a leader's commit check), and what asking does to the
//! blob's life.
//!
//! Asking used to touch every blob found, restarting its GC grace period. So a client could keep
//! content it uploaded but never committed alive for ever by asking about it, long after its
//! quota charge (`crate::pending`) had expired, and so could commits that failed at apply. Now:
//! - A **live** blob is touched as before: one a commit references (`blobref`), or a chunk of a
//!   referenced manifest ([`LiveChunks`]). Touching it guards against its last reference going
//!   between the check and the commit; if it dies later, it gets one grace period.
//! - An **unreferenced** blob (an upload whose commit has not come yet, or garbage) is never
//!   touched. It is reported held only while at least [`margin`] of its grace period is left,
//!   and then pinned in memory for [`PIN_MAX`], or the grace period if shorter ([`Pins`]).
//!   Since pins are given only while that margin is left, asking again keeps it at most the
//!   pin less the margin past its natural end (nothing with the default hour; 45 s under space
//!   pressure's 60 s). The pin matters when space pressure shortens the grace period between a
//!   commit's check and its apply: the commit then has a minute, as a touch under pressure
//!   used to give it.
//! - An older unreferenced blob is reported missing: the client sends it again, which charges
//!   its quota and restarts its grace period as any store does.
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
        Answer::Pin(PIN_MAX.min(grace))
    } else {
        Answer::Lacking
    }
}

/// The chunks of the referenced manifests, by the first 16 bytes of their hashes (a collision
/// would need 2^64 work and gains one touch, or keeps one garbage blob). Each GC pass builds
/// it whole ([`LiveChunks::rebuild`]); between passes, commits that reference new manifests
/// add their chunks ([`LiveChunks::catch_up`]), so GC's last look before deleting and answers
/// about old chunks see them at once.
#[derive(Default)]
pub struct LiveChunks {
    state: Mutex<LiveState>,
    /// Held while the set is rebuilt or caught up (manifests are loaded outside `state`).
    refreshing: Mutex<()>,
}

#[derive(Default)]
struct LiveState {
    /// What the last full build found.
    base: Arc<HashSet<[u8; 16]>>,
    /// Chunks of manifests referenced since (small: copied when it grows).
    extra: Arc<HashSet<[u8; 16]>>,
    /// The manifests whose chunks are in the set.
    manifests: HashSet<Hash>,
    /// The applied log index the manifest references were read at.
    index: u64,
    /// When it was last built or caught up.
    at: Option<Instant>,
}

/// The set at one moment (cheap: shared).
pub struct LiveView {
    base: Arc<HashSet<[u8; 16]>>,
    extra: Arc<HashSet<[u8; 16]>>,
}

impl LiveView {
    pub fn contains(&self, h: &Hash) -> bool {
        let p = prefix(h);
        self.base.contains(&p) || self.extra.contains(&p)
    }
}

/// The key of `h` in [`LiveChunks`].
pub fn prefix(h: &Hash) -> [u8; 16] {
    let mut p = [0u8; 16];
    p.copy_from_slice(&h.0[..16]);
    p
}

/// The chunks of `manifests` as [`prefix`]es, loaded by `load` (`None`: a manifest not held
/// here yet, or unreadable, with the reason), and the manifests found.
pub type Loaded = (HashSet<[u8; 16]>, HashSet<Hash>, Option<String>);

impl LiveChunks {
    fn state(&self) -> std::sync::MutexGuard<'_, LiveState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The set now.
    pub fn view(&self) -> LiveView {
        let st = self.state();
        LiveView {
            base: st.base.clone(),
            extra: st.extra.clone(),
        }
    }

    /// Builds the set anew: `index` is the applied index read before the manifest references
    /// were listed, `referenced` those references, `load` what loads them. Returns why the set
    /// is incomplete, if it is.
    pub fn rebuild(&self, index: u64, referenced: &[Hash], load: impl Fn(&[Hash]) -> Loaded) -> Option<String> {
        let _one = self.refreshing.lock().unwrap_or_else(|p| p.into_inner());
        let (chunks, found, unknown) = load(referenced);
        *self.state() = LiveState {
            base: Arc::new(chunks),
            extra: Arc::default(),
            manifests: found,
            index,
            at: Some(Instant::now()),
        };
        unknown
    }

    /// Adds the chunks of manifests referenced since the set was last built or caught up, if
    /// commits were applied since (`index` now) and the last look was at least `gap` ago.
    /// `referenced` lists the references now, `load` loads manifests. Returns why some new
    /// manifest's chunks are unknown, if one is.
    pub fn catch_up(
        &self,
        index: u64,
        gap: Duration,
        referenced: impl FnOnce() -> Option<Vec<Hash>>,
        load: impl Fn(&[Hash]) -> Loaded,
    ) -> Option<String> {
        let _one = self.refreshing.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = {
            let st = self.state();
            st.index == index || st.at.is_some_and(|a| a.elapsed() < gap)
        };
        if fresh {
            return None;
        }
        let Some(now) = referenced() else {
            return Some("reading manifest references failed".into());
        };
        let new: Vec<Hash> = {
            let st = self.state();
            now.into_iter().filter(|m| !st.manifests.contains(m)).collect()
        };
        let (chunks, found, unknown) = load(&new);
        let mut st = self.state();
        if !chunks.is_empty() {
            let mut extra = (*st.extra).clone();
            extra.extend(chunks);
            st.extra = Arc::new(extra);
        }
        st.manifests.extend(found);
        st.index = index;
        st.at = Some(Instant::now());
        unknown
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

impl Node {
    /// The grace period GC uses, under space pressure or not (the pressure one is never the
    /// longer).
    pub fn gc_grace(&self, pressure: bool) -> Duration {
        let normal = Duration::from_secs(self.cfg.gc_grace_s);
        if pressure {
            Duration::from_secs(self.cfg.gc_pressure_grace_s).min(normal)
        } else {
            normal
        }
    }

    /// The grace period GC uses now.
    pub fn gc_grace_now(&self) -> Duration {
        self.gc_grace(self.space.under_pressure())
    }

    /// Whether each of `asked` is stored here (with the size asked about, if any), touching
    /// nothing: what health checks ask. Blocking: a stat per blob.
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
    /// a stat and a table read per blob; when an old unreferenced blob is found, the live
    /// chunks catch up with commits applied since they were last looked at (at most once a
    /// second), so a chunk that just became live is not sent again.
    pub fn held_for_commit(&self, asked: &[(Hash, Option<u64>)]) -> Vec<Held> {
        let (witness, grace) = (self.is_witness(), self.gc_grace_now());
        let mut live = self.live_chunks.view();
        let mut caught_up = false;
        let mut unpinned = 0usize;
        let out = asked
            .iter()
            .zip(self.stored(asked))
            .map(|((h, _), stored)| {
                if stored != Held::Yes {
                    return stored;
                }
                let age = self.blobs.age(h).unwrap_or(Duration::ZERO);
                let referenced = !matches!(self.tables().blobref(h), Ok(0));
                let mut is_live = witness || referenced || live.contains(h);
                if !is_live && !caught_up && judge(false, age, grace) == Answer::Lacking {
                    caught_up = true;
                    crate::blobs::maintenance::catch_up_live_chunks(self, Duration::from_secs(1));
                    live = self.live_chunks.view();
                    is_live = live.contains(h);
                }
                match judge(is_live, age, grace) {
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
        // Under space pressure (60 s): held for its first 45 s.
        let pressure = Duration::from_secs(60);
        assert_eq!(judge(false, Duration::from_secs(44), pressure), Answer::Pin(PIN_MAX));
        assert_eq!(judge(false, Duration::from_secs(45), pressure), Answer::Lacking);
        // Asking again cannot keep a blob past its natural end by more than PIN_MAX - margin.
        for grace_s in [2u64, 60, 600, 3600, 86_400] {
            let grace = Duration::from_secs(grace_s);
            let most = grace + PIN_MAX.min(grace).saturating_sub(margin(grace));
            for age_s in 0..grace_s.min(10_000) {
                let age = Duration::from_secs(age_s);
                if let Answer::Pin(d) = judge(false, age, grace) {
                    assert!(age + d <= most, "grace {grace_s} s, age {age_s} s: pinned {d:?}");
                }
            }
        }
    }

    /// Between full builds, the set catches up with manifests referenced since, loading only
    /// the new ones, and only when commits were applied since the last look.
    #[test]
    fn live_chunks_catch_up_with_new_manifests_only() {
        let (m1, m2, gone) = (Hash::of(b"m1"), Hash::of(b"m2"), Hash::of(b"not here"));
        let chunks_of = |m: &Hash| Hash::of(&[m.0.as_slice(), b"chunk"].concat());
        let asked_for = Mutex::new(Vec::new());
        let load = |ms: &[Hash]| -> Loaded {
            asked_for.lock().unwrap().push(ms.to_vec());
            let found: HashSet<Hash> = ms.iter().copied().filter(|m| *m != gone).collect();
            let chunks = found.iter().map(|m| prefix(&chunks_of(m))).collect();
            let unknown = ms.contains(&gone).then(|| "not held".to_string());
            (chunks, found, unknown)
        };
        let live = LiveChunks::default();
        assert_eq!(live.rebuild(5, &[m1], load), None);
        assert!(live.view().contains(&chunks_of(&m1)));
        assert_eq!(live.catch_up(5, Duration::ZERO, || Some(vec![m1, m2]), load), None);
        assert!(
            !live.view().contains(&chunks_of(&m2)),
            "no commit applied since: not looked at"
        );
        assert_eq!(
            live.catch_up(6, Duration::ZERO, || Some(vec![m1, m2, gone]), load)
                .as_deref(),
            Some("not held")
        );
        assert!(live.view().contains(&chunks_of(&m2)) && live.view().contains(&chunks_of(&m1)));
        assert_eq!(
            live.catch_up(7, Duration::from_secs(60), || Some(vec![m1, m2, gone]), load),
            None,
            "too soon"
        );
        assert_eq!(
            live.catch_up(7, Duration::ZERO, || Some(vec![m1, m2, gone]), load)
                .as_deref(),
            Some("not held")
        );
        let asked_for = asked_for.into_inner().unwrap();
        assert_eq!(
            asked_for,
            vec![vec![m1], vec![m2, gone], vec![gone]],
            "only new manifests loaded"
        );
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
