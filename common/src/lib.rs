//! Types shared by codafs servers, clients and the CLI: node ids, name validation, content
//! hashes and chunk manifests, signed tokens, logging setup and file permissions. Only logging (its files) and
//! [`perms`] do I/O beyond reading the clock.

pub mod chunks;
pub mod format;
pub mod hash;
pub mod ids;
pub mod join;
pub mod names;
pub mod perms;
pub mod ports;
pub mod telemetry;
pub mod testdata;
pub mod ticket;
pub mod token;

pub use hash::Hash;
pub use ids::{make_ino, split_ino, VolumeId};

/// Nanoseconds since the Unix epoch, saturating (a clock before 1970 reads as 0).
pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
