//! The error contract between servers and clients: every refusal a server sends names an
//! [`ErrorKind`] in the [`ERROR_KIND_HEADER`] header, next to the gRPC code that kind implies.
//! Clients decide what to do by kind, never by the message, which is for people and may change.
//!
//! Servers build every `Status` through [`status`]; clients read one with [`kind_of`], which also
//! classifies statuses no codafs server built (transport failures, timeouts, proxies) by their code.
use tonic::{Code, Status};

/// Response header naming the kind of a refusal.
pub const ERROR_KIND_HEADER: &str = "x-codafs-error";

/// Why a server refused a request (or why a call failed on the way).
///
/// The wire names ([`ErrorKind::name`]) are part of the protocol: never rename one, only add.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The named file, directory, blob or account does not exist.
    NotFound,
    /// The named volume does not exist.
    NoVolume,
    /// The name is taken.
    Exists,
    /// A path component or the target of a directory operation is not a directory.
    NotDir,
    /// A file operation named a directory.
    IsDir,
    /// A directory to remove or replace still has entries.
    NotEmpty,
    /// A commit's expected version no longer holds: someone else changed it first.
    Conflict,
    /// The volume's (or uploader's) quota would be exceeded.
    Quota,
    /// A server is below its free-space watermark.
    NoSpace,
    /// The content is larger than the servers take in one blob or message.
    TooLarge,
    /// Too many attempts or requests: retry later (the message says when).
    Busy,
    /// A name that is not allowed (`.`, `..`, `/`, NUL, empty, a bad volume name).
    InvalidName,
    /// A name longer than the limit.
    NameTooLong,
    /// A malformed or inconsistent request.
    Invalid,
    /// The caller is known but has no right to do this.
    Denied,
    /// The caller's token or certificate is missing, forged, expired or revoked.
    Unauthenticated,
    /// This server cannot answer now (no leader, shutting down, not caught up): try another.
    Unavailable,
    /// The call ended without an answer (its deadline passed, or the connection dropped
    /// mid-call): a write may or may not have taken effect.
    Timeout,
    /// A commit references a blob with fewer copies than the volume's write quorum.
    NotEnoughCopies,
    /// The server is a witness and stores no blobs.
    Witness,
    /// Stored or received content failed verification.
    Corrupt,
    /// A fault inside the server (I/O, a broken invariant).
    Internal,
    /// The calling server was removed from the cluster (sent to a removed server's Raft
    /// messages, so that it stops instead of campaigning for ever).
    Removed,
}

impl ErrorKind {
    /// Every kind, for tests and documentation.
    pub const ALL: [ErrorKind; 23] = [
        ErrorKind::NotFound,
        ErrorKind::NoVolume,
        ErrorKind::Exists,
        ErrorKind::NotDir,
        ErrorKind::IsDir,
        ErrorKind::NotEmpty,
        ErrorKind::Conflict,
        ErrorKind::Quota,
        ErrorKind::NoSpace,
        ErrorKind::TooLarge,
        ErrorKind::Busy,
        ErrorKind::InvalidName,
        ErrorKind::NameTooLong,
        ErrorKind::Invalid,
        ErrorKind::Denied,
        ErrorKind::Unauthenticated,
        ErrorKind::Unavailable,
        ErrorKind::Timeout,
        ErrorKind::NotEnoughCopies,
        ErrorKind::Witness,
        ErrorKind::Corrupt,
        ErrorKind::Internal,
        ErrorKind::Removed,
    ];

    /// The kind's name on the wire (the header's value).
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not_found",
            ErrorKind::NoVolume => "no_volume",
            ErrorKind::Exists => "exists",
            ErrorKind::NotDir => "not_dir",
            ErrorKind::IsDir => "is_dir",
            ErrorKind::NotEmpty => "not_empty",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Quota => "quota",
            ErrorKind::NoSpace => "no_space",
            ErrorKind::TooLarge => "too_large",
            ErrorKind::Busy => "busy",
            ErrorKind::InvalidName => "invalid_name",
            ErrorKind::NameTooLong => "name_too_long",
            ErrorKind::Invalid => "invalid",
            ErrorKind::Denied => "denied",
            ErrorKind::Unauthenticated => "unauthenticated",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Timeout => "timeout",
            ErrorKind::NotEnoughCopies => "copies",
            ErrorKind::Witness => "witness",
            ErrorKind::Corrupt => "corrupt",
            ErrorKind::Internal => "internal",
            ErrorKind::Removed => "removed",
        }
    }

    /// The kind a wire name stands for; `None` for a name this build does not know (a newer
    /// server), which [`kind_of`] then classifies by code.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    /// The gRPC code a refusal of this kind carries, for clients that read codes only.
    pub fn code(self) -> Code {
        match self {
            ErrorKind::NotFound | ErrorKind::NoVolume => Code::NotFound,
            ErrorKind::Exists => Code::AlreadyExists,
            ErrorKind::NotDir
            | ErrorKind::IsDir
            | ErrorKind::NotEmpty
            | ErrorKind::NotEnoughCopies
            | ErrorKind::Witness => Code::FailedPrecondition,
            ErrorKind::Conflict => Code::Aborted,
            ErrorKind::Quota | ErrorKind::NoSpace | ErrorKind::TooLarge | ErrorKind::Busy => Code::ResourceExhausted,
            ErrorKind::InvalidName | ErrorKind::NameTooLong | ErrorKind::Invalid => Code::InvalidArgument,
            ErrorKind::Denied | ErrorKind::Removed => Code::PermissionDenied,
            ErrorKind::Unauthenticated => Code::Unauthenticated,
            ErrorKind::Unavailable => Code::Unavailable,
            ErrorKind::Timeout => Code::DeadlineExceeded,
            ErrorKind::Corrupt => Code::DataLoss,
            ErrorKind::Internal => Code::Internal,
        }
    }

    /// The kind of a status that names none (it did not come from a codafs server's handler).
    /// `Unknown` and `Cancelled` are what a connection dropped mid-call looks like: the outcome
    /// is unknown, as after a deadline.
    pub fn from_code(code: Code) -> Self {
        match code {
            Code::NotFound => ErrorKind::NotFound,
            Code::AlreadyExists => ErrorKind::Exists,
            Code::Aborted => ErrorKind::Conflict,
            Code::ResourceExhausted => ErrorKind::Busy,
            Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => ErrorKind::Invalid,
            Code::PermissionDenied => ErrorKind::Denied,
            Code::Unauthenticated => ErrorKind::Unauthenticated,
            Code::Unavailable => ErrorKind::Unavailable,
            Code::DeadlineExceeded | Code::Unknown | Code::Cancelled => ErrorKind::Timeout,
            Code::DataLoss => ErrorKind::Corrupt,
            Code::Ok | Code::Unimplemented | Code::Internal => ErrorKind::Internal,
        }
    }

    /// Whether the same request may succeed at another server or a moment later.
    pub fn is_retryable(self) -> bool {
        matches!(self, ErrorKind::Unavailable | ErrorKind::Timeout)
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The one way to build a refusal: the kind's code, the message, and the kind in its header.
pub fn status(kind: ErrorKind, message: impl Into<String>) -> Status {
    let mut s = Status::new(kind.code(), message);
    s.metadata_mut().insert(
        ERROR_KIND_HEADER,
        tonic::metadata::MetadataValue::from_static(kind.name()),
    );
    s
}

/// Header of a read's refusal ("not found") naming the applied index of the state it was
/// decided on. A client that asked several servers at once takes such a refusal from any of
/// them as soon as the index covers its own last commit (read-your-writes holds), instead of
/// waiting on the server it prefers, which may be the one that stopped.
pub const APPLIED_INDEX_HEADER: &str = "x-codafs-applied-index";

/// `s`, marked as decided on state at least as fresh as log index `applied`.
pub fn as_of(mut s: Status, applied: u64) -> Status {
    if let Ok(v) = applied.to_string().parse() {
        s.metadata_mut().insert(APPLIED_INDEX_HEADER, v);
    }
    s
}

/// The applied index a refusal was decided on (see [`as_of`]), if it names one.
pub fn applied_of(s: &Status) -> Option<u64> {
    s.metadata().get(APPLIED_INDEX_HEADER)?.to_str().ok()?.parse().ok()
}

/// The kind of a failed call: the one its header names, or else the one its code implies.
pub fn kind_of(s: &Status) -> ErrorKind {
    s.metadata()
        .get(ERROR_KIND_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(ErrorKind::from_name)
        .unwrap_or_else(|| ErrorKind::from_code(s.code()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_survives_the_header_whatever_the_message() {
        for k in ErrorKind::ALL {
            assert_eq!(ErrorKind::from_name(k.name()), Some(k));
            let s = status(k, "any text at all, even 'not a directory' or 'the limit is'");
            assert_eq!(kind_of(&s), k);
            assert_eq!(s.code(), k.code());
        }
        let mut names: Vec<_> = ErrorKind::ALL.iter().map(|k| k.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ErrorKind::ALL.len(), "wire names are unique");
    }

    #[test]
    fn statuses_without_a_kind_are_classified_by_code() {
        assert_eq!(
            kind_of(&Status::unavailable("connection refused")),
            ErrorKind::Unavailable
        );
        assert_eq!(kind_of(&Status::unknown("h2 protocol error")), ErrorKind::Timeout);
        assert_eq!(kind_of(&Status::deadline_exceeded("timeout")), ErrorKind::Timeout);
        assert_eq!(kind_of(&Status::not_found("x")), ErrorKind::NotFound);
        assert_eq!(kind_of(&Status::internal("x")), ErrorKind::Internal);
        // A kind from a newer server that this build does not know falls back to the code.
        let mut s = Status::permission_denied("x");
        s.metadata_mut().insert(
            ERROR_KIND_HEADER,
            tonic::metadata::MetadataValue::from_static("brand_new"),
        );
        assert_eq!(kind_of(&s), ErrorKind::Denied);
    }

    #[test]
    fn only_unavailability_and_timeouts_are_retried() {
        let retried: Vec<_> = ErrorKind::ALL.into_iter().filter(|k| k.is_retryable()).collect();
        assert_eq!(retried, [ErrorKind::Unavailable, ErrorKind::Timeout]);
    }
}
