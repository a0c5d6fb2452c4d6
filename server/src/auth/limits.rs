//! Bounds on login work, kept in memory by each server.
//!
//! A login costs one argon2 verification (tens of milliseconds of CPU and ~19 MiB of memory),
//! which makes logins an easy way to exhaust a server and the natural place to guess passwords.
//! So: at most [`LoginGuard::permits`] verifications (and password hashings) run at once, on the
//! blocking pool, never on the async workers; a request that cannot start one within a short
//! wait is refused. Each client address and each account name (existing or not, so the limits
//! say nothing about which accounts exist) has a token bucket; an attempt takes a token from
//! both, and a successful login gives the account's token back, so the account bucket counts
//! failures. Refusals say when to retry.
//!
//! The tables are bounded: when one is full, buckets that have refilled (which carry no
//! information) are dropped first, then the longest-idle one.
use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

/// How long a login or password change waits for an argon2 slot before it is refused.
pub const ARGON2_WAIT: Duration = Duration::from_secs(2);
/// Failed logins an account name may have in a burst, per server.
pub const ACCOUNT_BURST: u32 = 10;
/// One more failed login per account name is allowed every this often, per server.
pub const ACCOUNT_REFILL: Duration = Duration::from_secs(6);
/// Login attempts one client address may make in a burst, per server.
pub const ADDRESS_BURST: u32 = 30;
/// One more attempt per address is allowed every this often, per server.
pub const ADDRESS_REFILL: Duration = Duration::from_secs(1);
/// Most buckets each table keeps.
pub const MAX_BUCKETS: usize = 10_000;

/// Why a login was not even tried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error("too many login attempts {what}; retry in {} s", whole_secs(*retry_after))]
    TooMany { what: &'static str, retry_after: Duration },
    #[error("this server is busy checking {permits} other passwords; retry in a few seconds (or ask another server)")]
    Busy { permits: usize },
    #[error("password check failed: {0}")]
    Internal(String),
}

/// A wait in whole seconds, rounded up (never "retry in 0 s").
fn whole_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets by key: `burst` tokens at most, one more every `refill`.
pub struct Buckets<K> {
    burst: f64,
    refill: Duration,
    max_keys: usize,
    map: Mutex<HashMap<K, Bucket>>,
}

impl<K: Hash + Eq + Clone> Buckets<K> {
    pub fn new(burst: u32, refill: Duration, max_keys: usize) -> Self {
        Buckets {
            burst: f64::from(burst.max(1)),
            refill: refill.max(Duration::from_millis(1)),
            max_keys: max_keys.max(1),
            map: Mutex::new(HashMap::new()),
        }
    }

    fn refilled(&self, b: Bucket, now: Instant) -> f64 {
        let gained = now.saturating_duration_since(b.at).as_secs_f64() / self.refill.as_secs_f64();
        (b.tokens + gained).min(self.burst)
    }

    /// Takes one token for `key` at `now`, or says how long until one is there.
    pub fn take(&self, key: &K, now: Instant) -> Result<(), Duration> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if !map.contains_key(key) && map.len() >= self.max_keys {
            self.make_room(&mut map, now);
        }
        let b = map.entry(key.clone()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let tokens = self.refilled(*b, now);
        if tokens < 1.0 {
            let missing = 1.0 - tokens;
            return Err(self.refill.mul_f64(missing));
        }
        *b = Bucket {
            tokens: tokens - 1.0,
            at: now,
        };
        Ok(())
    }

    /// Returns a token taken for `key` (an attempt that should not count).
    pub fn give_back(&self, key: &K, now: Instant) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = map.get_mut(key) {
            *b = Bucket {
                tokens: (self.refilled(*b, now) + 1.0).min(self.burst),
                at: now,
            };
        }
    }

    /// Number of keys held (for tests and status).
    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn make_room(&self, map: &mut HashMap<K, Bucket>, now: Instant) {
        // A full bucket is what a new key gets anyway: forgetting it loses nothing.
        map.retain(|_, b| self.refilled(*b, now) < self.burst);
        if map.len() >= self.max_keys {
            if let Some(oldest) = map.iter().min_by_key(|(_, b)| b.at).map(|(k, _)| k.clone()) {
                map.remove(&oldest);
            }
        }
    }
}

/// The part of a client address that identifies it: an IPv4 address, or an IPv6 /64 (one
/// host usually holds a whole /64, so counting single IPv6 addresses would bound nothing).
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        },
    }
}

/// A login that passed the rate limits; say how it ended with [`LoginGuard::succeeded`].
pub struct Attempt {
    account: String,
}

/// One server's login limits.
pub struct LoginGuard {
    argon2: Arc<Semaphore>,
    permits: usize,
    wait: Duration,
    accounts: Buckets<String>,
    addresses: Buckets<IpAddr>,
}

impl Default for LoginGuard {
    fn default() -> Self {
        // One verification per core: more only queue for the CPU, and each holds ~19 MiB.
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        LoginGuard::new(cores.clamp(1, 16), ARGON2_WAIT)
    }
}

impl LoginGuard {
    /// At most `permits` argon2 computations at once; a caller waits at most `wait` for one.
    pub fn new(permits: usize, wait: Duration) -> Self {
        let permits = permits.max(1);
        LoginGuard {
            argon2: Arc::new(Semaphore::new(permits)),
            permits,
            wait,
            accounts: Buckets::new(ACCOUNT_BURST, ACCOUNT_REFILL, MAX_BUCKETS),
            addresses: Buckets::new(ADDRESS_BURST, ADDRESS_REFILL, MAX_BUCKETS),
        }
    }

    /// How many argon2 computations may run at once.
    pub fn permits(&self) -> usize {
        self.permits
    }

    /// Charges a login attempt for `account` from `addr` (None: address unknown, not limited
    /// by address) to both buckets.
    pub fn admit(&self, account: &str, addr: Option<IpAddr>) -> Result<Attempt, LimitError> {
        let now = Instant::now();
        if let Some(ip) = addr {
            self.addresses
                .take(&address_key(ip), now)
                .map_err(|retry_after| LimitError::TooMany {
                    what: "from this address",
                    retry_after,
                })?;
        }
        // Names are bounded by the request size limit; a long one is refused by the caller
        // before it gets here, and this keeps what the table holds small anyway.
        let account: String = account.chars().take(256).collect();
        self.accounts
            .take(&account, now)
            .map_err(|retry_after| LimitError::TooMany {
                what: "for this account",
                retry_after,
            })?;
        Ok(Attempt { account })
    }

    /// A correct password: the attempt does not count against the account.
    pub fn succeeded(&self, attempt: Attempt) {
        self.accounts.give_back(&attempt.account, Instant::now());
    }

    /// Runs CPU-heavy password work `f` on the blocking pool once one of the argon2 slots is
    /// free, waiting at most the configured time for it. The slot is held until `f` returns,
    /// even if the caller stops waiting (a cancelled request cannot overcommit the CPU).
    pub async fn argon2<T, F>(&self, f: F) -> Result<T, LimitError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let permit = match tokio::time::timeout(self.wait, self.argon2.clone().acquire_owned()).await {
            Ok(Ok(p)) => p,
            Ok(Err(closed)) => return Err(LimitError::Internal(closed.to_string())),
            Err(_) => {
                tracing::warn!(permits = self.permits, "password check refused: argon2 slots busy");
                return Err(LimitError::Busy { permits: self.permits });
            }
        };
        tokio::task::spawn_blocking(move || {
            let r = f();
            drop(permit);
            r
        })
        .await
        .map_err(|e| LimitError::Internal(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_refuse_after_the_burst_and_refill_over_time() {
        let b = Buckets::new(3, Duration::from_secs(2), 100);
        let t0 = Instant::now();
        for _ in 0..3 {
            b.take(&"k", t0).unwrap();
        }
        let wait = b.take(&"k", t0).unwrap_err();
        assert_eq!(wait, Duration::from_secs(2), "one whole refill until the next token");
        // Another key has its own bucket.
        b.take(&"other", t0).unwrap();
        // Half a refill later: still refused, and the wait says how much is left.
        let wait = b.take(&"k", t0 + Duration::from_secs(1)).unwrap_err();
        assert!(
            wait > Duration::from_millis(900) && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        b.take(&"k", t0 + Duration::from_secs(2)).unwrap();
        assert!(b.take(&"k", t0 + Duration::from_secs(2)).is_err());
        // A long pause refills up to the burst, not beyond.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..3 {
            b.take(&"k", later).unwrap();
        }
        assert!(b.take(&"k", later).is_err());
        // Giving a token back allows one more attempt.
        b.give_back(&"k", later);
        b.take(&"k", later).unwrap();
        assert!(b.take(&"k", later).is_err());
    }

    #[test]
    fn bucket_tables_stay_bounded_and_forget_refilled_keys_first() {
        let b = Buckets::new(2, Duration::from_secs(10), 3);
        let t0 = Instant::now();
        b.take(&1, t0).unwrap();
        b.take(&1, t0).unwrap(); // key 1 is empty
        b.take(&2, t0 + Duration::from_secs(1)).unwrap();
        b.take(&3, t0 + Duration::from_secs(2)).unwrap();
        // Full table, nothing refilled: the longest-idle key (1) goes, so the table stays at 3.
        b.take(&4, t0 + Duration::from_secs(3)).unwrap();
        assert_eq!(b.len(), 3);
        // Much later every bucket has refilled: they all make room at once.
        b.take(&5, t0 + Duration::from_secs(3600)).unwrap();
        assert_eq!(b.len(), 1);
        // A key kept while others were evicted still remembers its use.
        let b = Buckets::new(1, Duration::from_secs(10), 2);
        b.take(&"busy", t0).unwrap();
        b.take(&"a", t0).unwrap();
        b.take(&"b", t0 + Duration::from_secs(1)).unwrap();
        assert_eq!(b.len(), 2);
        assert!(b.take(&"b", t0 + Duration::from_secs(1)).is_err());
    }

    #[test]
    fn ipv6_clients_are_counted_per_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::7".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(address_key(a), address_key(b));
        assert_ne!(address_key(a), address_key(c));
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(address_key(mapped), "192.0.2.1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn failed_logins_count_against_the_account_and_any_login_against_the_address() {
        let g = LoginGuard::new(1, Duration::from_millis(10));
        let ip: IpAddr = "192.0.2.9".parse().unwrap();
        // Successful logins give the account's token back: never limited by account.
        for _ in 0..ACCOUNT_BURST * 2 {
            let a = g.admit("web", None).unwrap();
            g.succeeded(a);
        }
        for _ in 0..ACCOUNT_BURST {
            g.admit("guessed", None).unwrap();
        }
        let e = g.admit("guessed", None).err().unwrap();
        assert!(
            matches!(
                e,
                LimitError::TooMany {
                    what: "for this account",
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("retry in 6 s"), "{e}");
        // Addresses count every attempt, whatever the account.
        for i in 0..ADDRESS_BURST {
            let a = g.admit(&format!("user{i}"), Some(ip)).unwrap();
            g.succeeded(a);
        }
        let e = g.admit("web", Some(ip)).err().unwrap();
        assert!(
            matches!(
                e,
                LimitError::TooMany {
                    what: "from this address",
                    ..
                }
            ),
            "{e}"
        );
        g.admit("web", Some("192.0.2.10".parse().unwrap())).unwrap();
    }

    /// The test runtime has one thread for all async work: if the password work ran on it, the
    /// waits below could not happen while it blocks, and it would time out instead of being
    /// released.
    #[tokio::test(flavor = "current_thread")]
    async fn argon2_work_is_bounded_and_runs_off_the_async_workers() {
        let g = Arc::new(LoginGuard::new(1, Duration::from_millis(200)));
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let g2 = g.clone();
        let busy = tokio::spawn(async move {
            g2.argon2(move || {
                let _ = started_tx.send(());
                release_rx.recv_timeout(Duration::from_secs(10)).is_ok()
            })
            .await
        });
        tokio::time::timeout(Duration::from_secs(10), started_rx)
            .await
            .expect("the password work started")
            .unwrap();
        // The only slot is taken: the next caller waits briefly, then is refused.
        let t = Instant::now();
        let e = g.argon2(|| 1).await.unwrap_err();
        assert_eq!(e, LimitError::Busy { permits: 1 });
        assert!(t.elapsed() >= Duration::from_millis(200));
        assert!(e.to_string().contains("retry in a few seconds"), "{e}");
        release_tx.send(()).unwrap();
        assert!(
            busy.await.unwrap().unwrap(),
            "the password work blocked the async thread"
        );
        assert_eq!(g.argon2(|| 2).await.unwrap(), 2, "the slot is free again");
    }
}
