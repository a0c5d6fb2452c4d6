//! Connections to other servers, shared by Raft traffic, blob forwarding and write forwarding.
//! Channels connect lazily and reconnect on their own, so a dead peer costs a failed call, not a
//! stuck task; every call site sets its own deadline. Over TLS every channel verifies the peer
//! against the cluster CA and presents this server's certificate, which is what lets the peer
//! accept Raft messages and forwarded requests from it.
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use codafs_proto::limits::{MAX_MESSAGE, MAX_RAFT_MESSAGE};
use codafs_proto::pb;
use codafs_proto::tls::{Tls, TlsError};
use tonic::transport::Channel;

pub use codafs_proto::tls::describe;

/// How long establishing a TCP connection to a peer may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// How often failed blob forwards to one peer are logged at WARN while it stays down.
pub const FORWARD_WARN_EVERY: Duration = Duration::from_secs(60);

/// How long a peer that stalled a forward counts as stalled (unless a forward to it works).
pub const STALLED_FOR: Duration = Duration::from_secs(10);

/// A pool of channels keyed by address.
pub struct Peers {
    tls: Tls,
    channels: Mutex<HashMap<String, Channel>>,
    failing: Mutex<FailureLog>,
    /// Peers that left a blob forward unanswered past a write's patience, and when (see
    /// [`Peers::stalled`]).
    stalled: Mutex<HashMap<String, std::time::Instant>>,
}

/// Which peers blob forwards are failing to, so a down peer costs one WARN line a minute rather
/// than one per blob (an upload of thousands of files with a data server down).
#[derive(Default)]
pub struct FailureLog {
    /// Per peer: when the last WARN went out, and failures since that were not logged.
    peers: HashMap<String, (std::time::Instant, u64)>,
}

impl FailureLog {
    /// A forward to `addr` failed at `now`: `Some(n)` to log it at WARN now, `n` failures
    /// having gone unlogged since the last line; `None` to stay quiet.
    pub fn failed(&mut self, addr: &str, now: std::time::Instant) -> Option<u64> {
        match self.peers.get_mut(addr) {
            Some((last, quiet)) if now.duration_since(*last) < FORWARD_WARN_EVERY => {
                *quiet += 1;
                None
            }
            Some((last, quiet)) => {
                let n = std::mem::take(quiet);
                *last = now;
                Some(n)
            }
            None => {
                self.peers.insert(addr.to_string(), (now, 0));
                Some(0)
            }
        }
    }

    /// A forward to `addr` worked: whether it had been failing.
    pub fn worked(&mut self, addr: &str) -> bool {
        self.peers.remove(addr).is_some()
    }
}

impl Peers {
    /// A pool whose channels use `tls` (the server's own certificate as client identity).
    pub fn new(tls: Tls) -> Self {
        Peers {
            tls,
            channels: Mutex::default(),
            failing: Mutex::default(),
            stalled: Mutex::default(),
        }
    }

    /// Logs a failed blob forward to `addr`: at WARN for the first failure and then once a
    /// minute while the peer stays down, at DEBUG otherwise.
    pub fn forward_failed(&self, addr: &str, error: &dyn std::fmt::Display) {
        let warn = self
            .failing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .failed(addr, std::time::Instant::now());
        match warn {
            Some(0) => tracing::warn!(peer = %addr, %error, "forwarding to a replica failed; repair will retry"),
            Some(quiet) => {
                tracing::warn!(peer = %addr, %error, not_logged = quiet, "forwards to this replica still fail; repair will retry")
            }
            None => tracing::debug!(peer = %addr, %error, "forwarding to a replica failed"),
        }
    }

    /// Notes that `addr` left a blob forward unanswered past a write's patience (stopped, or
    /// its disk stalled).
    pub fn forward_stalled(&self, addr: &str) {
        self.stalled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(addr.to_string(), std::time::Instant::now());
    }

    /// Whether `addr` stalled a forward within the last [`STALLED_FOR`] and has not stored a
    /// forwarded blob since: the writes after the first need not wait out their patience on
    /// it again (each put waited 2 s while a data server was stopped).
    pub fn stalled(&self, addr: &str) -> bool {
        self.stalled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(addr)
            .is_some_and(|t| t.elapsed() < STALLED_FOR)
    }

    /// Notes that a blob forward to `addr` worked (logged once, if it had been failing).
    pub fn forward_worked(&self, addr: &str) {
        self.stalled.lock().unwrap_or_else(|p| p.into_inner()).remove(addr);
        if self.failing.lock().unwrap_or_else(|p| p.into_inner()).worked(addr) {
            tracing::info!(peer = %addr, "forwards to this replica work again");
        }
    }

    /// The channel to `addr`, created on first use.
    pub fn channel(&self, addr: &str) -> Result<Channel, TlsError> {
        let mut map = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = map.get(addr) {
            return Ok(c.clone());
        }
        let ch = self
            .tls
            .endpoint(addr)?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .initial_stream_window_size(Some(4 << 20))
            .initial_connection_window_size(Some(8 << 20))
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .connect_lazy();
        map.insert(addr.to_string(), ch.clone());
        Ok(ch)
    }

    pub fn raft(&self, addr: &str) -> Result<pb::raft_client::RaftClient<Channel>, TlsError> {
        Ok(pb::raft_client::RaftClient::new(self.channel(addr)?)
            .max_decoding_message_size(MAX_RAFT_MESSAGE)
            .max_encoding_message_size(MAX_RAFT_MESSAGE))
    }

    pub fn blobs(&self, addr: &str) -> Result<pb::blobs_client::BlobsClient<Channel>, TlsError> {
        Ok(pb::blobs_client::BlobsClient::new(self.channel(addr)?)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE))
    }

    pub fn write(&self, addr: &str) -> Result<pb::write_client::WriteClient<Channel>, TlsError> {
        Ok(pb::write_client::WriteClient::new(self.channel(addr)?)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE))
    }

    pub fn admin(&self, addr: &str) -> Result<pb::admin_client::AdminClient<Channel>, TlsError> {
        Ok(pb::admin_client::AdminClient::new(self.channel(addr)?)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stalled_peer_counts_as_stalled_until_a_forward_to_it_works() {
        let peers = Peers::new(Tls::Insecure);
        assert!(!peers.stalled("a:1"));
        peers.forward_stalled("a:1");
        assert!(peers.stalled("a:1") && !peers.stalled("b:2"), "each peer on its own");
        peers.forward_worked("a:1");
        assert!(!peers.stalled("a:1"), "a forward that worked clears it");
    }

    #[test]
    fn a_down_peer_is_logged_once_a_minute_with_what_was_left_out() {
        let mut log = FailureLog::default();
        let t0 = std::time::Instant::now();
        assert_eq!(log.failed("a:1", t0), Some(0), "the first failure is logged");
        for s in 1..=5 {
            assert_eq!(log.failed("a:1", t0 + Duration::from_secs(s)), None);
        }
        assert_eq!(log.failed("b:2", t0), Some(0), "each peer on its own");
        assert_eq!(
            log.failed("a:1", t0 + FORWARD_WARN_EVERY),
            Some(5),
            "a minute later, with the count"
        );
        assert!(log.worked("a:1"));
        assert!(!log.worked("a:1"), "only once");
        assert_eq!(
            log.failed("a:1", t0 + FORWARD_WARN_EVERY),
            Some(0),
            "down again: logged at once"
        );
    }
}
