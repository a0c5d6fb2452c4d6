//! The codafs gRPC protocol: generated messages and services plus the size limits every peer
//! enforces, and [`tls`], how servers and clients open a connection to a server. Conversions to
//! domain types live next to those types (in `codafs-common` and the server), so this crate stays
//! generated code, constants, the error contract ([`error`]) and the transport settings every side
//! shares.

pub mod error;
pub mod tls;

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod pb {
    tonic::include_proto!("codafs.v1");
}

/// Message size limits. Explicit so that a misbehaving peer cannot make us buffer unbounded
/// messages, and so that every sender knows what it may send.
pub mod limits {
    /// Blob contents travel in chunks of at most this size (never as one message).
    pub const BLOB_CHUNK: usize = 1 << 20;
    /// Largest batch of small blobs in one `PutSmall` request.
    pub const MAX_SMALL_BATCH: usize = 16 << 20;
    /// Blobs asked for in one `Blobs.GetSmall` call, at most.
    pub const MAX_SMALL_GET: usize = 256;
    /// Bytes of blobs one `Blobs.GetSmall` reply carries, at most (each blob at most `BLOB_CHUNK`).
    pub const MAX_SMALL_GET_BYTES: usize = 4 << 20;
    /// Largest metadata message (a commit batch, a directory page): 64 MiB.
    pub const MAX_MESSAGE: usize = 64 << 20;
    /// Largest request to the `Meta` and `Admin` services (names, paths and settings): what a
    /// server reads of one before its handler checks the caller.
    pub const MAX_SMALL_REQUEST: usize = 1 << 20;
    /// Largest Raft message: a batch of log entries or a snapshot chunk.
    pub const MAX_RAFT_MESSAGE: usize = 256 << 20;
    /// Entries in one directory page when the client does not say.
    pub const DEFAULT_READDIR_PAGE: u32 = 1024;
    /// Most entries the server returns in one directory page.
    pub const MAX_READDIR_PAGE: u32 = 8192;
    /// Most operations in one commit.
    pub const MAX_COMMIT_OPS: usize = 200_000;
    /// Most files and directories one commit's recursive removes may delete (the state machine
    /// deletes a tree in one step, so a larger one is removed in parts).
    pub const MAX_REMOVE_NODES: usize = 200_000;
    /// Name changes a change event carries (`ChangeEvent.names`); a commit that changes more
    /// sends none, and mounts read the changed directories again. Bounds an event to about
    /// 1 MiB of names.
    pub const MAX_CHANGE_NAMES: usize = 4096;
    /// Most hashes in one `Missing` query.
    pub const MAX_MISSING_QUERY: usize = 100_000;
    /// Copies a blob write waits for when neither the request nor the volume names a quorum.
    pub const DEFAULT_WRITE_QUORUM: u32 = 2;
    /// Request header carrying the caller's token.
    pub const TOKEN_HEADER: &str = "x-codafs-token";
}

/// Heartbeats on the change stream (`SubscribeRequest.tick_ms`, `ChangeEvent.tick`). A stream
/// through a server that stopped (SIGSTOP, a hung host) keeps its connection open and brings
/// nothing, and a mount serves what it cached as current until the connection's keepalive
/// notices, seconds later. A server that ticks while it has nothing else to send lets the
/// mount notice within a few ticks, and subscribe to another server.
pub mod ticks {
    use std::time::Duration;

    /// Response header of `Subscribe`: the interval, in milliseconds, at which this stream
    /// ticks. Absent: the server sends no ticks (an older server, or none were asked for).
    pub const HEADER: &str = "x-codafs-tick-ms";
    /// Shortest interval a server ticks at, whatever is asked.
    pub const MIN: Duration = Duration::from_millis(500);
    /// Longest interval a server ticks at, whatever is asked.
    pub const MAX: Duration = Duration::from_secs(60);

    /// The interval a server ticks at when asked for `ms` (None: 0, no ticks).
    pub fn interval(ms: u32) -> Option<Duration> {
        (ms > 0).then(|| Duration::from_millis(u64::from(ms)).clamp(MIN, MAX))
    }

    /// The interval a `Subscribe` response announced, if it announced a valid one.
    pub fn announced(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
        let ms: u32 = metadata.get(HEADER)?.to_str().ok()?.parse().ok()?;
        interval(ms)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn intervals_are_clamped_and_announced_ones_read_back() {
            assert_eq!(interval(0), None);
            assert_eq!(interval(1), Some(MIN));
            assert_eq!(interval(1000), Some(Duration::from_secs(1)));
            assert_eq!(interval(u32::MAX), Some(MAX));
            let mut m = tonic::metadata::MetadataMap::new();
            assert_eq!(announced(&m), None);
            m.insert(HEADER, tonic::metadata::MetadataValue::from_static("1000"));
            assert_eq!(announced(&m), Some(Duration::from_secs(1)));
            m.insert(HEADER, tonic::metadata::MetadataValue::from_static("soon"));
            assert_eq!(announced(&m), None);
        }
    }
}

/// The deadline a gRPC caller set (the `grpc-timeout` request header), so a server can fit
/// its own waits inside it: a wait that outlasts the caller's deadline is wasted, since the
/// caller has already given up and moved to another server.
pub mod deadline {
    use std::time::Duration;

    /// The caller's timeout from `grpc-timeout` ("<digits><unit>", unit one of H M S m u n;
    /// at most 8 digits, as the gRPC wire spec says), if it names a valid one.
    pub fn grpc_timeout(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
        parse(metadata.get("grpc-timeout")?.to_str().ok()?)
    }

    fn parse(v: &str) -> Option<Duration> {
        let unit = v.chars().last()?;
        let digits = &v[..v.len() - unit.len_utf8()];
        if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let n: u64 = digits.parse().ok()?;
        Some(match unit {
            'H' => Duration::from_secs(n * 3600),
            'M' => Duration::from_secs(n * 60),
            'S' => Duration::from_secs(n),
            'm' => Duration::from_millis(n),
            'u' => Duration::from_micros(n),
            'n' => Duration::from_nanos(n),
            _ => return None,
        })
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn parses_the_wire_forms_and_refuses_the_rest() {
            assert_eq!(parse("2000m"), Some(Duration::from_secs(2)));
            assert_eq!(parse("1999999u"), Some(Duration::from_micros(1_999_999)));
            assert_eq!(parse("3S"), Some(Duration::from_secs(3)));
            assert_eq!(parse("1H"), Some(Duration::from_secs(3600)));
            assert_eq!(parse("5n"), Some(Duration::from_nanos(5)));
            for bad in ["", "m", "123456789m", "12x", "-1S", "1.5S", "S1"] {
                assert_eq!(parse(bad), None, "{bad:?}");
            }
            let mut m = tonic::metadata::MetadataMap::new();
            assert_eq!(grpc_timeout(&m), None);
            m.insert("grpc-timeout", tonic::metadata::MetadataValue::from_static("250m"));
            assert_eq!(grpc_timeout(&m), Some(Duration::from_millis(250)));
        }
    }
}
