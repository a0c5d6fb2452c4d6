//! Filesystem errors and the one place they become errno values.
//!
//! Choices: an unreachable cluster is `EIO` (the page cannot be served, and a web server turns it
//! into a 5xx rather than a 404); a write on the read-only mount is `EROFS`; a blob that fails
//! verification on every replica is `EIO` too, never its bytes.

/// What a filesystem operation can fail with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FsError {
    #[error("not found")]
    NotFound,
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
}

impl FsError {
    /// The errno reported to the kernel.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::NotDir => libc::ENOTDIR,
            FsError::IsDir => libc::EISDIR,
            FsError::NotSymlink => libc::EINVAL,
            FsError::ReadOnly => libc::EROFS,
            FsError::Invalid(_) => libc::EINVAL,
            FsError::Disconnected(_) | FsError::Corrupt(_) | FsError::Io(_) => libc::EIO,
        }
    }
}

impl From<std::io::Error> for FsError {
    fn from(e: std::io::Error) -> Self {
        FsError::Io(e.to_string())
    }
}

impl From<crate::transport::ClientError> for FsError {
    fn from(e: crate::transport::ClientError) -> Self {
        use tonic::Code;
        match e.code() {
            Code::NotFound => FsError::NotFound,
            Code::FailedPrecondition if e.to_string().contains("not a directory") => FsError::NotDir,
            Code::InvalidArgument => FsError::Invalid(e.to_string()),
            Code::DataLoss => FsError::Corrupt(e.to_string()),
            Code::Unavailable | Code::DeadlineExceeded => FsError::Disconnected(e.to_string()),
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
    }
}
