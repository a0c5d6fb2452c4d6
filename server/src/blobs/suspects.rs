//! Which blobs repair should look at next.
//!
//! A repair pass that checks every referenced blob costs a `stat` per blob: a million files on a
//! server meant a million system calls every two seconds, and after the kernel dropped its
//! caches, as many disk reads, competing with the reads the server exists for. A blob can only
//! go missing here in a few ways, and each of them names it or is rare:
//! - an applied commit references content this server never received (it was down, or not in
//!   the write quorum): the state machine adds the hashes whose reference counts it changed;
//! - a snapshot replaced the whole state, or a copy was found corrupt and quarantined, or this
//!   server just started: a full pass ([`Suspects::everything`]);
//! - a blob file was removed by hand or a disk lost data silently: the periodic full pass
//!   (`full_repair_interval_s`) catches it.
//!
//! So repair checks the named suspects every pass and everything only now and then.
use std::collections::HashSet;
use std::sync::Mutex;

use codafs_common::Hash;
use tokio::sync::Notify;

/// Suspects held at most; past it, the next pass checks everything instead (a replica catching
/// up a long log, say).
const MAX_SUSPECTS: usize = 1 << 20;

/// What the next repair pass should check.
#[derive(Debug, PartialEq, Eq)]
pub enum Scope {
    /// Every referenced blob and every chunk of every referenced manifest.
    Everything,
    /// These hashes (blobs or manifests referenced by commits applied since the last pass).
    Some(HashSet<Hash>),
}

struct Inner {
    set: HashSet<Hash>,
    everything: bool,
}

/// Shared between the state machine (which adds) and the repair task (which takes).
pub struct Suspects {
    inner: Mutex<Inner>,
    kick: Notify,
}

impl Default for Suspects {
    /// Starts with a full pass due: whatever happened while the server was down is unknown.
    fn default() -> Self {
        Suspects {
            inner: Mutex::new(Inner {
                set: HashSet::new(),
                everything: true,
            }),
            kick: Notify::new(),
        }
    }
}

impl Suspects {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hashes an applied entry referenced: checked by the next pass. Does not wake repair (its
    /// regular tick comes soon enough, and a burst of commits then costs one pass).
    pub fn add(&self, hashes: impl IntoIterator<Item = Hash>) {
        let mut g = self.lock();
        if g.everything {
            return;
        }
        g.set.extend(hashes);
        if g.set.len() > MAX_SUSPECTS {
            g.set = HashSet::new();
            g.everything = true;
        }
    }

    /// Makes the next pass check everything.
    pub fn everything(&self) {
        let mut g = self.lock();
        g.set = HashSet::new();
        g.everything = true;
    }

    /// Makes the next pass check everything, and runs it now (a copy found corrupt).
    pub fn everything_now(&self) {
        self.everything();
        self.kick.notify_one();
    }

    /// Takes what the next pass should check, leaving nothing.
    pub fn take(&self) -> Scope {
        let mut g = self.lock();
        let set = std::mem::take(&mut g.set);
        if std::mem::take(&mut g.everything) {
            Scope::Everything
        } else {
            Scope::Some(set)
        }
    }

    /// Resolves when a full pass is wanted at once.
    pub async fn kicked(&self) {
        self.kick.notified().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(n: u8) -> Hash {
        Hash::of(&[n])
    }

    #[test]
    fn a_start_checks_everything_then_only_what_commits_named() {
        let s = Suspects::default();
        s.add([h(1)]);
        assert_eq!(s.take(), Scope::Everything, "first pass after a start");
        assert_eq!(s.take(), Scope::Some(HashSet::new()));
        s.add([h(1), h(2)]);
        s.add([h(2)]);
        assert_eq!(s.take(), Scope::Some([h(1), h(2)].into()));
        assert_eq!(s.take(), Scope::Some(HashSet::new()), "taking empties it");
        s.add([h(3)]);
        s.everything();
        s.add([h(4)]);
        assert_eq!(s.take(), Scope::Everything, "a snapshot or corruption widens it");
    }

    #[test]
    fn too_many_suspects_become_a_full_pass() {
        let s = Suspects::default();
        s.take();
        s.add((0..=MAX_SUSPECTS as u64).map(|i| Hash::of(&i.to_le_bytes())));
        assert_eq!(s.take(), Scope::Everything);
    }
}
