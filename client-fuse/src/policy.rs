//! The request policy every client call follows, in one place: how long a call may take
//! (scaled with the bytes it carries), when a failed call moves on to the next server, and how
//! many copies a write waits for when the volume does not say. Call sites name an RPC
//! ([`crate::rpc`]); they never pick a deadline or a retry rule of their own.
use std::time::Duration;

use codafs_proto::error::{kind_of, ErrorKind};
use tonic::Status;

/// Copies a blob write waits for when neither the request nor the volume names a quorum (the
/// servers apply the same default).
pub const DEFAULT_WRITE_QUORUM: u32 = codafs_proto::limits::DEFAULT_WRITE_QUORUM;

/// The slowest transfer a call is given time for: 10 MB/s (10,000 bytes per millisecond).
const MIN_BYTES_PER_MS: u64 = 10_000;

/// Time for a call that moves `bytes` (a blob put, a fetch, a commit of a large file): `base`
/// plus the bytes at [`MIN_BYTES_PER_MS`].
pub fn transfer_timeout(base: Duration, bytes: u64) -> Duration {
    base + Duration::from_millis(bytes / MIN_BYTES_PER_MS)
}

/// When a failed call is tried on the next server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// After any failure that another server or a moment may cure (`unavailable`, `timeout`):
    /// for reads, and for writes that carry a request id (the servers apply those at most once).
    Elsewhere,
    /// Only when the server was unavailable, so the request never ran: for writes without a
    /// request id, whose outcome a timeout leaves unknown.
    IfNotRun,
}

impl Retry {
    /// Whether `s` sends the call on to the next server.
    pub fn moves_on(self, s: &Status) -> bool {
        match self {
            Retry::Elsewhere => kind_of(s).is_retryable(),
            Retry::IfNotRun => kind_of(s) == ErrorKind::Unavailable,
        }
    }
}

/// Deadlines of one client.
#[derive(Debug, Clone, Copy)]
pub struct RequestPolicy {
    /// Deadline of one call to one server (metadata calls, small blobs).
    pub call_timeout: Duration,
    /// Deadline of a status or health probe, which should answer at once or be reported down.
    pub probe_timeout: Duration,
}

impl Default for RequestPolicy {
    fn default() -> Self {
        RequestPolicy {
            call_timeout: Duration::from_secs(30),
            probe_timeout: Duration::from_secs(3),
        }
    }
}

impl RequestPolicy {
    /// Deadline of a call that carries `bytes`.
    pub fn for_bytes(&self, bytes: u64) -> Duration {
        transfer_timeout(self.call_timeout, bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_grows_with_the_bytes_moved() {
        let p = RequestPolicy::default();
        assert_eq!(p.for_bytes(0), p.call_timeout);
        assert_eq!(p.for_bytes(100 << 20), p.call_timeout + Duration::from_millis(10_485));
    }

    #[test]
    fn writes_without_a_request_id_move_on_only_when_nothing_ran() {
        let unavailable = codafs_proto::error::status(ErrorKind::Unavailable, "down");
        let timeout = Status::deadline_exceeded("slow");
        let refused = codafs_proto::error::status(ErrorKind::Exists, "taken");
        assert!(Retry::Elsewhere.moves_on(&unavailable) && Retry::Elsewhere.moves_on(&timeout));
        assert!(Retry::IfNotRun.moves_on(&unavailable) && !Retry::IfNotRun.moves_on(&timeout));
        assert!(!Retry::Elsewhere.moves_on(&refused) && !Retry::IfNotRun.moves_on(&refused));
    }
}
