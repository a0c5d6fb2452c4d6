//! Who is subscribed to which volume's change stream on this server: the mounts `codafs volume
//! info` lists. An entry lives exactly as long as its stream (a guard removes it), so the list
//! is never stale. One host holds at most [`MAX_PER_HOST`] streams at once.
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Change streams one host (one address) may hold open at once on this server. A mount holds
/// one per volume it follows. Without a bound one host could hold 131,072 (512 connections of
/// 256 streams each), each with its task and queue.
pub const MAX_PER_HOST: usize = 4096;

/// A host holds [`MAX_PER_HOST`] streams already.
#[derive(Debug, thiserror::Error)]
#[error("{host} holds {MAX_PER_HOST} change streams on this server already, the most one host may")]
pub struct TooMany {
    host: IpAddr,
}

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
    streams: Mutex<Streams>,
    next: AtomicU64,
}

#[derive(Default)]
struct Streams {
    by_id: HashMap<u64, (Subscriber, Option<IpAddr>)>,
    per_host: HashMap<IpAddr, usize>,
}

/// Removes its stream's entry when dropped (the stream's task ends).
pub struct Guard {
    id: u64,
    owner: Arc<Subscribers>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let mut g = self.owner.lock();
        if let Some((_, Some(host))) = g.by_id.remove(&self.id) {
            if let Some(n) = g.per_host.get_mut(&host) {
                *n -= 1;
                if *n == 0 {
                    g.per_host.remove(&host);
                }
            }
        }
    }
}

impl Subscribers {
    fn lock(&self) -> std::sync::MutexGuard<'_, Streams> {
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a stream of `volume` from `peer` until the guard is dropped, unless that host
    /// holds [`MAX_PER_HOST`] already.
    pub fn register(self: &Arc<Self>, volume: &str, peer: Option<SocketAddr>) -> Result<Guard, TooMany> {
        // The address itself (an IPv6 /64 is often a whole subnet of web nodes).
        let host = peer.map(|a| a.ip().to_canonical());
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let mut g = self.lock();
        if let Some(h) = host {
            let n = g.per_host.entry(h).or_default();
            if *n >= MAX_PER_HOST {
                return Err(TooMany { host: h });
            }
            *n += 1;
        }
        let sub = Subscriber {
            volume: volume.to_string(),
            peer: peer.map_or_else(|| "unknown".to_string(), |a| a.to_string()),
            since_ns: codafs_common::now_ns(),
        };
        g.by_id.insert(id, (sub, host));
        Ok(Guard {
            id,
            owner: self.clone(),
        })
    }

    /// The live streams of `volume`, oldest first.
    pub fn of(&self, volume: &str) -> Vec<Subscriber> {
        let mut v: Vec<Subscriber> = self
            .lock()
            .by_id
            .values()
            .map(|(s, _)| s)
            .filter(|s| s.volume == volume)
            .cloned()
            .collect();
        v.sort_by_key(|s| s.since_ns);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(a: &str) -> Option<SocketAddr> {
        a.parse().ok()
    }

    #[test]
    fn an_entry_lives_as_long_as_its_guard() {
        let subs = Arc::new(Subscribers::default());
        let a = subs.register("www", at("10.0.0.5:40000")).unwrap();
        let b = subs.register("www", at("10.0.0.6:40000")).unwrap();
        let _c = subs.register("other", at("10.0.0.5:40001")).unwrap();
        assert_eq!(subs.of("www").len(), 2);
        drop(a);
        let left = subs.of("www");
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].peer, "10.0.0.6:40000");
        drop(b);
        assert!(subs.of("www").is_empty());
        assert_eq!(subs.of("other").len(), 1);
    }

    /// One host holds at most MAX_PER_HOST streams; a stream that ends makes room again, and
    /// other hosts (another address of the same IPv6 /64 too) are not affected.
    #[test]
    fn one_host_holds_a_bounded_number_of_streams() {
        let subs = Arc::new(Subscribers::default());
        let mut held: Vec<Guard> = (0..MAX_PER_HOST)
            .map(|i| subs.register("www", at(&format!("[2001:db8::1]:{}", i + 1))).unwrap())
            .collect();
        let over = subs.register("www", at("[2001:db8::1]:9"));
        assert!(over.is_err_and(|e| e.to_string().contains("2001:db8::1")));
        assert!(
            subs.register("www", at("[2001:db8::2]:1")).is_ok(),
            "another host of the /64"
        );
        assert!(subs.register("www", at("10.0.0.7:1")).is_ok(), "another host");
        held.pop();
        assert!(subs.register("www", at("[2001:db8::1]:3")).is_ok(), "room again");
    }
}
