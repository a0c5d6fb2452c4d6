//! gRPC services: thin adaptors from protocol messages to [`Node`] operations. Error mapping to
//! status codes lives here, in one place, and so does leader forwarding.
pub mod admin;
pub mod blobs;
pub mod convert;
pub mod meta;
pub mod raft;
pub mod write;

use std::future::Future;
use std::time::Duration;

use codafs_proto::limits::TOKEN_HEADER;
use tonic::transport::Channel;
use tonic::Status;

use crate::fsm::ApplyError;
use crate::node::{Node, NodeError, LEADER_WAIT};

/// Header set on requests one server forwards to another, so they are never forwarded twice.
pub const FORWARDED_HEADER: &str = "x-codafs-forwarded";
/// Every refusal is built by [`refuse`] (or [`status`] from a [`NodeError`]): see
/// `codafs_proto::error` for the contract.
pub use codafs_proto::error::{status as refuse, ErrorKind};

/// The caller's token, if any.
pub fn token_of<T>(req: &tonic::Request<T>) -> Option<String> {
    req.metadata()
        .get(TOKEN_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// Whether a request was forwarded by another server. Only servers may say so: a forwarded
/// request is never forwarded again, so the header from anyone else is refused.
pub fn is_forwarded<T>(node: &Node, req: &tonic::Request<T>) -> Result<bool, Status> {
    let forwarded = req.metadata().contains_key(FORWARDED_HEADER);
    if forwarded {
        require_peer(node, req, "forwarded requests")?;
    }
    Ok(forwarded)
}

/// The node id named by the certificate the caller presented, if any. The TLS listener has
/// verified the certificate against the cluster CA, which signs server certificates only, each
/// bound to one node id.
pub fn peer_node_id<T>(req: &tonic::Request<T>) -> Option<u64> {
    cert_node_id(&req.peer_certs()?)
}

/// The node id named by the first of a caller's certificates (see [`peer_node_id`]).
fn cert_node_id(certs: &[tonic::transport::CertificateDer<'static>]) -> Option<u64> {
    crate::tls::node_id_of_der(certs.first()?.as_ref())
}

/// Whether the caller is a current server of this cluster: it presented a certificate signed by
/// the cluster CA that names a node id in the current membership. A removed server's certificate
/// stays signed but names a node that is no longer a member, so it is refused at once. On an
/// `--insecure` cluster nobody can be told apart, so every caller counts.
pub fn is_peer<T>(node: &Node, req: &tonic::Request<T>) -> bool {
    presents_member(node, req.peer_certs().as_deref().map(|c| &c[..]))
}

/// [`is_peer`], from the certificates the caller presented.
fn presents_member(node: &Node, certs: Option<&[tonic::transport::CertificateDer<'static>]>) -> bool {
    node.cfg.insecure || certs.and_then(cert_node_id).is_some_and(|id| node.is_member(id))
}

/// Who sends a request, for the request budget (`crate::body_budget`), from its headers alone
/// (the body has not arrived): an account whose token is valid now (signed, not expired, not
/// revoked; what it may do is the handler's business), a current member by its certificate
/// (any caller without a token on an `--insecure` cluster), or a stranger.
pub fn budget_sender(
    node: &Node,
    headers: &tonic::codegen::http::HeaderMap,
    certs: Option<&[tonic::transport::CertificateDer<'static>]>,
) -> crate::body_budget::Sender {
    use crate::body_budget::Sender;
    let token = headers.get(TOKEN_HEADER).and_then(|v| v.to_str().ok());
    if let Some(claims) = token.and_then(|t| node.authenticate(Some(t)).ok()) {
        return Sender::Account(claims.user);
    }
    if presents_member(node, certs) {
        Sender::Server
    } else {
        Sender::Stranger
    }
}

/// Refuses `what` (Raft messages, forwarded writes and blob copies) unless the caller is a peer.
pub fn require_peer<T>(node: &Node, req: &tonic::Request<T>, what: &str) -> Result<(), Status> {
    if is_peer(node, req) {
        return Ok(());
    }
    match peer_node_id(req) {
        Some(id) => {
            if let Some(removed) = crate::removal::refusal(node, id) {
                tracing::info!(node = id, what, "refused a removed server (it stops when told)");
                return Err(removed);
            }
            tracing::warn!(node = id, what, "refused a server that is not a current member");
            Err(refuse(
                ErrorKind::Denied,
                format!(
                    "only current servers of this cluster may send {what}: the caller's server certificate names node {id}, which is not a member (removed?)"
                ),
            ))
        }
        None => Err(peer_denied(what)),
    }
}

/// The refusal of a peer-only request from a caller that is not a peer.
pub fn peer_denied(what: &str) -> Status {
    refuse(
        ErrorKind::Denied,
        format!(
            "only current servers of this cluster may send {what}: the caller presented no server certificate of a current member signed by the cluster CA"
        ),
    )
}

/// A request to forward to the leader, carrying the caller's token.
pub fn forward_request<T>(body: T, token: Option<&str>, timeout: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(body);
    if let Some(t) = token.and_then(|t| t.parse().ok()) {
        r.metadata_mut().insert(TOKEN_HEADER, t);
    }
    r.metadata_mut()
        .insert(FORWARDED_HEADER, tonic::metadata::MetadataValue::from_static("1"));
    r.set_timeout(timeout);
    r
}

/// The kind of a state machine refusal.
fn apply_kind(e: &ApplyError) -> ErrorKind {
    match e {
        ApplyError::NotFound(_) | ApplyError::NoSuchAccount(_) | ApplyError::NoSuchKey(_) => ErrorKind::NotFound,
        ApplyError::NoSuchVolume(_) => ErrorKind::NoVolume,
        ApplyError::Exists(_) => ErrorKind::Exists,
        ApplyError::NotDir(_) => ErrorKind::NotDir,
        ApplyError::IsDir(_) => ErrorKind::IsDir,
        ApplyError::NotEmpty(_) => ErrorKind::NotEmpty,
        ApplyError::Conflict { .. } => ErrorKind::Conflict,
        ApplyError::Quota { .. } => ErrorKind::Quota,
        ApplyError::InvalidName(_) => ErrorKind::InvalidName,
        ApplyError::NameTooLong(_) => ErrorKind::NameTooLong,
        ApplyError::Invalid(_) => ErrorKind::Invalid,
        ApplyError::Denied(_) => ErrorKind::Denied,
        ApplyError::NotBootstrapped => ErrorKind::Unavailable,
    }
}

/// The one mapping from node errors to gRPC statuses.
pub fn status(e: NodeError) -> Status {
    let kind = match &e {
        NodeError::Refused(a) => apply_kind(a),
        NodeError::Unauthenticated(_) => ErrorKind::Unauthenticated,
        NodeError::Denied(_) => ErrorKind::Denied,
        NodeError::NoLeader | NodeError::ForwardTo(..) | NodeError::Unavailable(_) => ErrorKind::Unavailable,
        NodeError::NotEnoughCopies { .. } => ErrorKind::NotEnoughCopies,
        NodeError::Invalid(_) => ErrorKind::Invalid,
        NodeError::NotFound(_) => ErrorKind::NotFound,
        NodeError::Quota(_) => ErrorKind::Quota,
        NodeError::NoSpace(_) => ErrorKind::NoSpace,
        NodeError::Internal(_) => ErrorKind::Internal,
    };
    refuse(kind, e.to_string())
}

/// The refusal of a put or commit for lack of disk space (kind `no_space`: mounts report it as
/// ENOSPC).
pub fn no_space(e: crate::blobs::space::SpaceError) -> Status {
    status(NodeError::NoSpace(e))
}

/// The refusal of a bad name or path (`name_too_long` for an overlong one).
pub fn bad_name(e: codafs_common::names::NameError) -> Status {
    status(NodeError::Refused(ApplyError::from(e)))
}

/// An internal fault (storage I/O, a broken invariant), as a status.
pub fn internal(e: impl std::fmt::Display) -> Status {
    refuse(ErrorKind::Internal, e.to_string())
}

/// Runs a write on the leader: locally when this node leads, otherwise forwarded once to the
/// leader. Retries (bounded by [`LEADER_WAIT`]) while leadership is changing.
pub async fn on_leader<T, L, LF, R, RF>(node: &Node, forwarded: bool, local: L, remote: R) -> Result<T, Status>
where
    L: Fn() -> LF,
    LF: Future<Output = Result<T, NodeError>>,
    R: Fn(Channel) -> RF,
    RF: Future<Output = Result<T, Status>>,
{
    let deadline = tokio::time::Instant::now() + LEADER_WAIT;
    let mut last = refuse(
        ErrorKind::Unavailable,
        "no leader is reachable (is a majority of servers up?)",
    );
    while tokio::time::Instant::now() < deadline {
        let leader = node.wait_leader().await.map_err(status)?;
        if leader == node.id {
            // A leader cut off from its majority does not step down by itself: bound the wait.
            match tokio::time::timeout_at(deadline, local()).await {
                Err(_) => {
                    return Err(refuse(
                        ErrorKind::Timeout,
                        "no majority answered in time; the change may or may not have been committed",
                    ))
                }
                Ok(Err(NodeError::ForwardTo(..))) | Ok(Err(NodeError::NoLeader)) => {}
                Ok(other) => return other.map_err(status),
            }
        } else if forwarded {
            return Err(refuse(
                ErrorKind::Unavailable,
                "not the leader (leadership is changing)",
            ));
        } else if let Some(addr) = node.addr_of(leader) {
            let ch = node.peers.channel(&addr).map_err(internal)?;
            // A leader that stops (a paused VM, a stalled disk) keeps its connections and
            // answers nothing: the forward would wait out its whole deadline although the
            // others elect a new leader in seconds. Once leadership moves, the caller learns
            // at once that the outcome is unknown, and sends again (a change with a request id
            // applies once, wherever it lands).
            let r = tokio::select! {
                r = remote(ch) => r,
                _ = node.leader_moved_from(leader) => Err(refuse(
                    ErrorKind::Timeout,
                    "leadership moved while the change was with the old leader; it may or may not have been committed",
                )),
            };
            match r {
                Err(s) if codafs_proto::error::kind_of(&s) == ErrorKind::Unavailable => last = s,
                other => return other,
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(last)
}
