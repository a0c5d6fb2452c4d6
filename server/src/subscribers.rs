//! Who is subscribed to which volume's change stream on this server: the mounts `codafs volume
//! info` lists. An entry lives exactly as long as its stream (a guard removes it), so the list
//! is never stale. Its size is bounded by the connection and stream limits.
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// One change stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscriber {
    pub volume: String,
    /// The subscriber's address as this server sees it.
    pub peer: String,
    pub since_ns: i64,
}

/// Every live change stream of this server.
#[derive(Default)]
pub struct Subscribers {
    streams: Mutex<HashMap<u64, Subscriber>>,
    next: AtomicU64,
}

/// Removes its stream's entry when dropped (the stream's task ends).
pub struct Guard {
    id: u64,
    owner: Arc<Subscribers>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.owner.lock().remove(&self.id);
    }
}

impl Subscribers {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Subscriber>> {
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a stream of `volume` from `peer` until the guard is dropped.
    pub fn register(self: &Arc<Self>, volume: &str, peer: &str) -> Guard {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(
            id,
            Subscriber {
                volume: volume.to_string(),
                peer: peer.to_string(),
                since_ns: codafs_common::now_ns(),
            },
        );
        Guard {
            id,
            owner: self.clone(),
        }
    }

    /// The live streams of `volume`, oldest first.
    pub fn of(&self, volume: &str) -> Vec<Subscriber> {
        let mut v: Vec<Subscriber> = self.lock().values().filter(|s| s.volume == volume).cloned().collect();
        v.sort_by_key(|s| s.since_ns);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_lives_as_long_as_its_guard() {
        let subs = Arc::new(Subscribers::default());
        let a = subs.register("www", "10.0.0.5:40000");
        let b = subs.register("www", "10.0.0.6:40000");
        let _c = subs.register("other", "10.0.0.5:40001");
        assert_eq!(subs.of("www").len(), 2);
        drop(a);
        let left = subs.of("www");
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].peer, "10.0.0.6:40000");
        drop(b);
        assert!(subs.of("www").is_empty());
        assert_eq!(subs.of("other").len(), 1);
    }
}
