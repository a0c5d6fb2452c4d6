//! Filesystem errors and the one place they become errno values: a server's refusal is mapped
//! by its [`ErrorKind`] (the error contract in `codafs_proto::error`), never by its message.
//!
//! Choices: an unreachable cluster is `EIO` (the page cannot be served, and a web server turns it
//! into a 5xx rather than a 404); a write by a local user without a valid token (root included),
//! or on a `--read-only` mount, is `EROFS`; a user whose token grants no right on the volume gets
//! `EACCES`; a blob that fails verification on every replica is `EIO` too, never its bytes.

use codafs_proto::error::ErrorKind;

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
    /// No server could take the call: down, unreachable, out of time, or unable to (too few
    /// data servers for the write quorum); the message says which, per server.
    #[error("servers unavailable: {0}")]
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
    /// The servers' message, which names the quota ("quota exceeded: ...").
    #[error("{0}")]
    Quota(String),
    #[error("name too long")]
    NameTooLong,
    #[error("cross-volume link or rename")]
    CrossVolume,
    #[error("file handle not open for writing")]
    BadHandle,
    #[error("file too large: {0}")]
    TooLarge(String),
    /// A large file's bytes changed while they were being stored (another write or truncate
    /// on the same open file): that store is superseded by the next one.
    #[error("the file changed while it was stored: {0}")]
    Changed(String),
    /// The servers refused the caller's token (forged, expired, retired key): as good as none.
    #[error("{0}")]
    Unauthenticated(String),
    /// No space: the mount's cache disk is full (a shadow cannot grow), or the servers refused
    /// a store below their free-space watermark.
    #[error("no space left: {0}")]
    NoSpace(String),
    /// Someone else's change came first: an expected version no longer holds.
    #[error("conflict: {0}")]
    Conflict(String),
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
            FsError::Disconnected(_)
            | FsError::Corrupt(_)
            | FsError::Io(_)
            | FsError::Conflict(_)
            | FsError::Changed(_) => libc::EIO,
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
    /// Decided by the error's kind alone (the message is only carried along, for logs): with
    /// [`FsError::errno`] this is the one table from the error contract to errno values.
    fn from(e: crate::transport::ClientError) -> Self {
        let msg = e.to_string();
        match e.kind() {
            ErrorKind::NotFound | ErrorKind::NoVolume => FsError::NotFound,
            ErrorKind::Exists => FsError::Exists,
            ErrorKind::NotDir => FsError::NotDir,
            ErrorKind::IsDir => FsError::IsDir,
            ErrorKind::NotEmpty => FsError::NotEmpty,
            ErrorKind::Quota => FsError::Quota(msg),
            ErrorKind::NoSpace => FsError::NoSpace(msg),
            ErrorKind::TooLarge => FsError::TooLarge(msg),
            ErrorKind::NameTooLong => FsError::NameTooLong,
            ErrorKind::InvalidName | ErrorKind::Invalid => FsError::Invalid(msg),
            ErrorKind::Denied => FsError::Denied(msg),
            // A token the servers do not accept (expired, retired key) is no token at all.
            ErrorKind::Unauthenticated => FsError::Unauthenticated(msg),
            ErrorKind::Unavailable | ErrorKind::Timeout => FsError::Disconnected(msg),
            ErrorKind::Corrupt => FsError::Corrupt(msg),
            ErrorKind::Conflict => FsError::Conflict(msg),
            // Too few copies, a witness asked for blobs, too many requests, a server fault: the
            // operation failed, and retrying it is the caller's call.
            // (`Removed` is sent to servers only.)
            ErrorKind::NotEnoughCopies
            | ErrorKind::Witness
            | ErrorKind::Busy
            | ErrorKind::Internal
            | ErrorKind::Removed => FsError::Io(msg),
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

    /// Every kind a server can send maps to one errno, whatever the message says.
    #[test]
    fn server_refusals_map_by_kind_only() {
        use crate::transport::ClientError;
        let errno =
            |k: ErrorKind, msg: &str| FsError::from(ClientError::Server(codafs_proto::error::status(k, msg))).errno();
        let want = [
            (ErrorKind::NotFound, libc::ENOENT),
            (ErrorKind::NoVolume, libc::ENOENT),
            (ErrorKind::Exists, libc::EEXIST),
            (ErrorKind::NotDir, libc::ENOTDIR),
            (ErrorKind::IsDir, libc::EISDIR),
            (ErrorKind::NotEmpty, libc::ENOTEMPTY),
            (ErrorKind::Conflict, libc::EIO),
            (ErrorKind::Quota, libc::EDQUOT),
            (ErrorKind::NoSpace, libc::ENOSPC),
            (ErrorKind::TooLarge, libc::EFBIG),
            (ErrorKind::Busy, libc::EIO),
            (ErrorKind::InvalidName, libc::EINVAL),
            (ErrorKind::NameTooLong, libc::ENAMETOOLONG),
            (ErrorKind::Invalid, libc::EINVAL),
            (ErrorKind::Denied, libc::EACCES),
            (ErrorKind::Unauthenticated, libc::EROFS),
            (ErrorKind::Unavailable, libc::EIO),
            (ErrorKind::Timeout, libc::EIO),
            (ErrorKind::NotEnoughCopies, libc::EIO),
            (ErrorKind::Witness, libc::EIO),
            (ErrorKind::Corrupt, libc::EIO),
            (ErrorKind::Internal, libc::EIO),
            (ErrorKind::Removed, libc::EIO),
        ];
        assert_eq!(want.len(), ErrorKind::ALL.len(), "every kind has an errno");
        for (k, e) in want {
            assert_eq!(errno(k, "some text"), e, "{k}");
            // Messages that once decided the errno no longer do.
            assert_eq!(errno(k, "not a directory; the limit is 255"), e, "{k}");
        }
        // A status from no codafs server (a transport failure) is classified by its code.
        let dropped = ClientError::Server(tonic::Status::unavailable("connection refused"));
        assert_eq!(FsError::from(dropped).errno(), libc::EIO);
    }
}
