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

/// How often a peer that stays unreachable is reported again.
pub const REPORT_EVERY: Duration = Duration::from_secs(300);

/// The peers this server could not reach at its last attempt.
#[derive(Default)]
pub struct Reachability {
    down: Mutex<HashMap<NodeId, Down>>,
    /// How many peers are down: a send that succeeds looks at the map only when some are.
    count: AtomicUsize,
}

/// One unreachable peer.
struct Down {
    since: Instant,
    reported: Instant,
    failures: u64,
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
                "cannot reach Raft peer; retrying twice a second, reported again every {} min while it lasts",
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
        let mut down = self.down.lock().unwrap_or_else(|p| p.into_inner());
        match down.get_mut(&peer) {
            None => {
                down.insert(
                    peer,
                    Down {
                        since: now,
                        reported: now,
                        failures: 1,
                    },
                );
                self.count.store(down.len(), Ordering::Release);
                Change::Lost
            }
            Some(d) => {
                d.failures += 1;
                if now.saturating_duration_since(d.reported) >= REPORT_EVERY {
                    d.reported = now;
                    Change::StillDown { failures: d.failures }
                } else {
                    Change::Quiet
                }
            }
        }
    }

    fn reached_at(&self, peer: NodeId, now: Instant) -> Change {
        let mut down = self.down.lock().unwrap_or_else(|p| p.into_inner());
        let Some(d) = down.remove(&peer) else {
            return Change::Quiet;
        };
        self.count.store(down.len(), Ordering::Release);
        Change::Back {
            after: now.saturating_duration_since(d.since),
            failures: d.failures,
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
        assert_eq!(r.failed_at(2, t0), Change::Lost, "each peer on its own");
        assert_eq!(r.failed_at(1, t0 + REPORT_EVERY), Change::StillDown { failures: 601 });
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
}
