//! Filesystem errors and the one place they become errno values.
//!
//! Choices: an unreachable cluster is `EIO` (the page cannot be served, and a web server turns it
//! into a 5xx rather than a 404); a write by a local user without a valid token (root included),
//! or on a `--read-only` mount, is `EROFS`; a user whose token grants no right on the volume gets
//! `EACCES`; a blob that fails verification on every replica is `EIO` too, never its bytes.

/// What a filesystem operation can fail with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FsError {
    #[error("not found")]
    NotFound,
    /// The node a request names by inode is gone (the kernel then walks the path again).
    #[error("stale node")]
    Stale,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("not a symlink")]
    NotSymlink,
    #[error("read-only file system")]
    ReadOnly,
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("no server reachable: {0}")]
    Disconnected(String),
    #[error("content failed verification: {0}")]
    Corrupt(String),
    #[error("I/O error: {0}")]
    Io(String),
    #[error("already exists")]
    Exists,
    #[error("directory not empty")]
    NotEmpty,
    #[error("permission denied: {0}")]
    Denied(String),
    #[error("operation not permitted: {0}")]
    NotPermitted(String),
    #[error("quota exceeded: {0}")]
    Quota(String),
    #[error("name too long")]
    NameTooLong,
    #[error("cross-volume link or rename")]
    CrossVolume,
    #[error("file handle not open for writing")]
    BadHandle,
    #[error("file too large: {0}")]
    TooLarge(String),
    /// The servers refused the caller's token (forged, expired, retired key): as good as none.
    #[error("{0}")]
    Unauthenticated(String),
    /// No space: the mount's cache disk is full (a shadow cannot grow), or the servers refused
    /// a store below their free-space watermark.
    #[error("no space left: {0}")]
    NoSpace(String),
}

impl FsError {
    /// The errno reported to the kernel.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::NotDir => libc::ENOTDIR,
            FsError::IsDir => libc::EISDIR,
            FsError::NotSymlink => libc::EINVAL,
            FsError::ReadOnly | FsError::Unauthenticated(_) => libc::EROFS,
            FsError::Invalid(_) => libc::EINVAL,
            FsError::Disconnected(_) | FsError::Corrupt(_) | FsError::Io(_) => libc::EIO,
            FsError::Exists => libc::EEXIST,
            FsError::NotEmpty => libc::ENOTEMPTY,
            FsError::Denied(_) => libc::EACCES,
            FsError::NotPermitted(_) => libc::EPERM,
            FsError::Quota(_) => libc::EDQUOT,
            FsError::NameTooLong => libc::ENAMETOOLONG,
            FsError::Stale => libc::ESTALE,
            FsError::CrossVolume => libc::EXDEV,
            FsError::BadHandle => libc::EBADF,
            FsError::TooLarge(_) => libc::EFBIG,
            FsError::NoSpace(_) => libc::ENOSPC,
        }
    }
}

/// Header the servers use to name the kind of a refusal (see the server's grpc module).
const ERROR_KIND_HEADER: &str = "x-codafs-error";

impl From<std::io::Error> for FsError {
    fn from(e: std::io::Error) -> Self {
        if is_disk_full(&e) {
            return FsError::NoSpace(e.to_string());
        }
        FsError::Io(e.to_string())
    }
}

/// Whether a local I/O error means the disk (or a quota on it) is full.
pub fn is_disk_full(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

impl From<crate::transport::ClientError> for FsError {
    fn from(e: crate::transport::ClientError) -> Self {
        use tonic::Code;
        // Refusals of the state machine name their kind in a header; map those exactly.
        let kind = e
            .status()
            .and_then(|s| s.metadata().get(ERROR_KIND_HEADER))
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let msg = e.to_string();
        match kind.as_deref() {
            Some("exists") => return FsError::Exists,
            Some("not_empty") => return FsError::NotEmpty,
            Some("is_dir") => return FsError::IsDir,
            Some("not_dir") => return FsError::NotDir,
            Some("quota") => return FsError::Quota(msg),
            Some("no_space") => return FsError::NoSpace(msg),
            Some("denied") => return FsError::Denied(msg),
            Some("invalid_name") if msg.contains("the limit is") => return FsError::NameTooLong,
            // A token the servers do not accept (expired, retired key) is no token at all.
            Some("unauthenticated") => return FsError::Unauthenticated(msg),
            _ => {}
        }
        match e.code() {
            Code::NotFound => FsError::NotFound,
            Code::FailedPrecondition if e.to_string().contains("not a directory") => FsError::NotDir,
            Code::InvalidArgument => FsError::Invalid(e.to_string()),
            Code::DataLoss => FsError::Corrupt(e.to_string()),
            Code::Unavailable | Code::DeadlineExceeded => FsError::Disconnected(e.to_string()),
            Code::PermissionDenied => FsError::Denied(msg),
            Code::Unauthenticated => FsError::Unauthenticated(msg),
            Code::ResourceExhausted => FsError::Quota(msg),
            _ => FsError::Io(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_mapping() {
        assert_eq!(FsError::NotFound.errno(), libc::ENOENT);
        assert_eq!(FsError::ReadOnly.errno(), libc::EROFS);
        assert_eq!(FsError::Disconnected("x".into()).errno(), libc::EIO);
        assert_eq!(FsError::Corrupt("x".into()).errno(), libc::EIO);
        let full = std::io::Error::from_raw_os_error(libc::ENOSPC);
        assert_eq!(FsError::from(full).errno(), libc::ENOSPC);
    }
}
