//! Which Raft peers this server cannot reach, reported once when a peer goes, every
//! [`REPORT_EVERY`] while it stays gone, and once when it is back.
//!
//! openraft logs an ERROR line at every failed attempt: twice a second per unreachable peer
//! for a leader's replication, and once per election round for votes. A server down for
//! maintenance so filled its peers' logs with errors about an expected state. Those lines
//! are filtered out (`codafs_common::telemetry::RaftRetries`) and this module says what an
//! operator needs instead: which peer, since when, why, and when it answers again.
use std::collections::HashMap;
use std::fmt::Display;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::NodeId;

/// How often a peer that stays unreachable is reported again; a peer with no attempt for this
/// long is forgotten (removed, or no longer sent to after a change of leader).
pub const REPORT_EVERY: Duration = Duration::from_secs(300);
/// A peer lost again this soon after it was back is not reported at once (a slow peer whose
/// large batches time out while heartbeats pass would otherwise flap in the log).
pub const FLAP_QUIET: Duration = Duration::from_secs(60);

/// The peers this server could not reach at its last attempt.
#[derive(Default)]
pub struct Reachability {
    down: Mutex<Peers>,
    /// How many peers are down: a send that succeeds looks at the map only when some are.
    count: AtomicUsize,
}

#[derive(Default)]
struct Peers {
    down: HashMap<NodeId, Down>,
    /// When each peer was last reported back.
    back: HashMap<NodeId, Instant>,
}

/// One unreachable peer.
struct Down {
    since: Instant,
    reported: Instant,
    last: Instant,
    failures: u64,
    /// Whether its loss was reported (its return is reported only then).
    announced: bool,
}

impl Peers {
    /// Forgets peers with no attempt for [`REPORT_EVERY`].
    fn prune(&mut self, now: Instant) {
        self.down
            .retain(|_, d| now.saturating_duration_since(d.last) < REPORT_EVERY);
        self.back.retain(|_, t| now.saturating_duration_since(*t) < FLAP_QUIET);
    }
}

/// What a failed or successful attempt changed, for the caller's log line (and tests).
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    /// Nothing to report.
    Quiet,
    /// The peer was reachable before this failure.
    Lost,
    /// Still unreachable, and [`REPORT_EVERY`] has passed since the last report.
    StillDown { failures: u64 },
    /// Reachable again after this long and this many failed attempts.
    Back { after: Duration, failures: u64 },
}

impl Reachability {
    /// Records a failed attempt to reach `peer` at `addr`, logging what changed.
    pub fn failed(&self, peer: NodeId, addr: &str, error: &dyn Display) -> Change {
        let change = self.failed_at(peer, Instant::now());
        match change {
            Change::Lost => tracing::warn!(
                peer,
                addr,
                %error,
                "cannot reach Raft peer; Raft keeps retrying, reported again every {} min while it lasts",
                REPORT_EVERY.as_secs() / 60
            ),
            Change::StillDown { failures } => {
                tracing::warn!(peer, addr, failures, %error, "Raft peer still unreachable")
            }
            _ => {}
        }
        change
    }

    /// Records a successful exchange with `peer` at `addr`, logging if it was unreachable.
    pub fn reached(&self, peer: NodeId, addr: &str) -> Change {
        if self.count.load(Ordering::Acquire) == 0 {
            return Change::Quiet;
        }
        let change = self.reached_at(peer, Instant::now());
        if let Change::Back { after, failures } = change {
            tracing::info!(
                peer,
                addr,
                down_s = after.as_secs(),
                failures,
                "Raft peer reachable again"
            );
        }
        change
    }

    fn failed_at(&self, peer: NodeId, now: Instant) -> Change {
        let mut p = self.down.lock().unwrap_or_else(|p| p.into_inner());
        p.prune(now);
        let change = match p.down.get_mut(&peer) {
            None => {
                let announced = !p.back.contains_key(&peer);
                p.down.insert(
                    peer,
                    Down {
                        since: now,
                        reported: now,
                        last: now,
                        failures: 1,
                        announced,
                    },
                );
                if announced {
                    Change::Lost
                } else {
                    Change::Quiet
                }
            }
            Some(d) => {
                d.failures += 1;
                d.last = now;
                if now.saturating_duration_since(d.reported) >= REPORT_EVERY {
                    d.reported = now;
                    d.announced = true;
                    Change::StillDown { failures: d.failures }
                } else {
                    Change::Quiet
                }
            }
        };
        self.count.store(p.down.len(), Ordering::Release);
        change
    }

    fn reached_at(&self, peer: NodeId, now: Instant) -> Change {
        let mut p = self.down.lock().unwrap_or_else(|p| p.into_inner());
        p.prune(now);
        let gone = p.down.remove(&peer);
        self.count.store(p.down.len(), Ordering::Release);
        match gone {
            Some(d) if d.announced => {
                p.back.insert(peer, now);
                Change::Back {
                    after: now.saturating_duration_since(d.since),
                    failures: d.failures,
                }
            }
            _ => Change::Quiet,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_is_reported_when_lost_then_every_period_then_when_back() {
        let r = Reachability::default();
        let t0 = Instant::now();
        assert_eq!(r.reached_at(1, t0), Change::Quiet, "a reachable peer is not news");
        assert_eq!(r.failed_at(1, t0), Change::Lost);
        // Twice a second for almost the whole period: nothing more to say.
        for i in 1..600u64 {
            assert_eq!(r.failed_at(1, t0 + Duration::from_millis(i * 499)), Change::Quiet);
        }
        assert_eq!(r.failed_at(1, t0 + REPORT_EVERY), Change::StillDown { failures: 601 });
        assert_eq!(r.failed_at(2, t0 + REPORT_EVERY), Change::Lost, "each peer on its own");
        assert_eq!(
            r.failed_at(1, t0 + REPORT_EVERY + Duration::from_secs(1)),
            Change::Quiet
        );
        assert_eq!(
            r.reached_at(1, t0 + REPORT_EVERY + Duration::from_secs(2)),
            Change::Back {
                after: REPORT_EVERY + Duration::from_secs(2),
                failures: 602
            }
        );
        assert_eq!(r.count.load(Ordering::Acquire), 1, "peer 2 is still down");
        assert!(matches!(
            r.reached(2, "127.0.0.1:7402"),
            Change::Back { failures: 1, .. }
        ));
        assert_eq!(r.count.load(Ordering::Acquire), 0);
        assert_eq!(r.reached(2, "127.0.0.1:7402"), Change::Quiet, "reported back once");
    }

    #[test]
    fn a_flapping_peer_is_quiet_and_a_forgotten_one_is_not_reported_back() {
        let r = Reachability::default();
        let t0 = Instant::now();
        assert_eq!(r.failed_at(1, t0), Change::Lost);
        assert!(matches!(
            r.reached_at(1, t0 + Duration::from_secs(1)),
            Change::Back { .. }
        ));
        // Lost again within a minute of coming back: quiet, and so is its return.
        assert_eq!(r.failed_at(1, t0 + Duration::from_secs(2)), Change::Quiet);
        assert_eq!(r.reached_at(1, t0 + Duration::from_secs(3)), Change::Quiet);
        // Later, a loss is news again.
        let t1 = t0 + FLAP_QUIET + Duration::from_secs(5);
        assert_eq!(r.failed_at(1, t1), Change::Lost);
        // No attempt for REPORT_EVERY (a removed peer): forgotten, not "back" days later.
        let t2 = t1 + REPORT_EVERY + Duration::from_secs(1);
        assert_eq!(r.reached_at(1, t2), Change::Quiet);
        assert_eq!(r.count.load(Ordering::Acquire), 0);
    }
}
