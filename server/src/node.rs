//! One running server: Raft, the applied tables, the blob store and connections to peers, plus
//! the operations the gRPC services are thin wrappers over.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use codafs_common::token::{self, Claims, Role};
use codafs_common::Hash;
use codafs_proto::pb;
use openraft::error::{ClientWriteError, RaftError};

use crate::blobs::BlobStore;
use crate::config::ServerConfig;
use crate::db::Tables;
use crate::fsm::{AccountRec, Actor, Command, Outcome, StateView};
use crate::peers::Peers;
use crate::raft::state_machine::Applied;
use crate::raft::{NodeId, NodeInfo, Raft};

/// How long a write waits for a leader to exist before failing.
pub const LEADER_WAIT: Duration = Duration::from_secs(10);

/// Errors of node operations, mapped to gRPC status codes in one place (`grpc::status`).
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Refused(#[from] crate::fsm::ApplyError),
    #[error("not authenticated: {0}")]
    Unauthenticated(String),
    #[error("permission denied: {0}")]
    Denied(String),
    #[error("no leader is reachable (is a majority of servers up?)")]
    NoLeader,
    #[error("forward to leader: {0}")]
    ForwardTo(NodeId, String),
    #[error("only {have} of {need} required copies of blob {hash} exist; upload it first")]
    NotEnoughCopies { hash: Hash, have: usize, need: usize },
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("quota exceeded: {0}")]
    Quota(String),
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error(transparent)]
    NoSpace(#[from] crate::blobs::space::SpaceError),
    #[error("internal error: {0}")]
    Internal(String),
}

/// Background-task counters shown by `status`.
#[derive(Default)]
pub struct Counters {
    pub repair_backlog: AtomicU64,
    pub repaired: AtomicU64,
    pub scrubbed: AtomicU64,
    pub gc_removed: AtomicU64,
    pub blob_gets: AtomicU64,
    /// Blob bytes newly stored here by puts (client or forwarded; not repair).
    pub blob_bytes_received: AtomicU64,
    /// Connections closed for leaving a reply unread past the stall timeout.
    pub stalled_connections_closed: AtomicU64,
}

/// A member of the cluster as the membership config records it.
#[derive(Debug, Clone)]
pub struct Member {
    pub id: NodeId,
    pub info: NodeInfo,
    pub voter: bool,
}

/// The server's shared state.
pub struct Node {
    pub id: NodeId,
    pub cfg: ServerConfig,
    pub raft: Raft,
    pub applied: Applied,
    pub blobs: Arc<BlobStore>,
    pub peers: Arc<Peers>,
    pub committed: Arc<AtomicU64>,
    pub counters: Counters,
    /// This server's certificate and the cluster CA; `None` on an `--insecure` server.
    pub tls: Option<crate::tls::ServerTls>,
    /// Bytes stored per account that no volume references yet (quota accounting).
    pub pending: crate::pending::PendingBytes,
    /// Bounds on password work and login attempts (in memory, per server).
    pub logins: crate::auth::LoginGuard,
    /// The free-space watermark of the server directory (disk-full safety).
    pub space: crate::blobs::space::Space,
    /// Background tasks that outlive a request, stopped and awaited together at shutdown.
    pub tasks: crate::tasks::Tasks,
    /// Parsed chunk manifests, bounded (see `blobs::manifests`).
    pub manifests: crate::blobs::manifests::ManifestCache,
    /// Chunks of referenced manifests, and unreferenced blobs reported held to a commit (see
    /// `blobs::asked`).
    pub live_chunks: crate::blobs::asked::LiveChunks,
    pub pins: Arc<crate::blobs::asked::Pins>,
    /// Live change streams, by volume (`codafs volume info` lists them).
    pub subscribers: Arc<crate::subscribers::Subscribers>,
    /// On a witness, the bound on its spool of relayed blobs and hints (`blobs::handoff`).
    pub spool: crate::blobs::handoff::SpoolBudget,
    /// Whether this server is a witness now: `cfg.witness` at start, then what the membership
    /// says (`role::watch`; `codafs cluster role` switches it).
    pub witness: std::sync::atomic::AtomicBool,
    /// Per volume: commits that the leader checks against the state before proposing them
    /// (recursive removes, and commits whose apply could read more than `fsm::cost` allows)
    /// hold it alone from their check to their apply, others shared (see [`Node::commit_lock`]).
    pub commit_locks: CommitLocks,
}

/// Per-volume locks of [`Node::commit_lock`].
#[derive(Default)]
pub struct CommitLocks(std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::RwLock<()>>>>);

impl Node {
    /// The commit lock of `volume` (an existing volume: the map holds one entry per volume
    /// ever committed to on this server while it ran). A commit the leader checks against its
    /// state holds it exclusively from the check until its apply, so no commit of the volume
    /// proposed meanwhile can change what was checked; other commits hold it shared until
    /// theirs, so the check also waits for those in flight.
    pub fn commit_lock(&self, volume: &str) -> Arc<tokio::sync::RwLock<()>> {
        let mut m = self.commit_locks.0.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(volume.to_string()).or_default().clone()
    }

    /// A copy was found corrupt (and quarantined): repair checks everything now. Which file
    /// a quarantined chunk belongs to is not known here, and corruption is rare.
    pub fn repair_now(&self) {
        self.applied.suspects.everything_now();
    }

    pub fn tables(&self) -> &Tables {
        &self.applied.tables
    }

    pub fn applied_index(&self) -> u64 {
        *self.applied.index.borrow()
    }

    /// Waits (at most `limit`) until this replica has applied log entry `index`, so a client
    /// that committed through this server reads its own write here. Returns whether it did.
    pub async fn wait_applied(&self, index: u64, limit: std::time::Duration) -> bool {
        let mut rx = self.applied.index.clone();
        let reached = tokio::time::timeout(limit, rx.wait_for(|i| *i >= index)).await;
        matches!(reached, Ok(Ok(_)))
    }

    /// Whether server `id` is in this server's current Raft membership (voter or learner). A
    /// server that has no membership yet (a joiner before its first log entries) counts every
    /// server of the cluster in: it must take the leader's messages to learn the membership at
    /// all. The one rule for "is a member" (peer checks, removal refusals).
    pub fn is_member(&self, id: NodeId) -> bool {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        let membership = m.membership_config.membership();
        membership.get_node(&id).is_some() || membership.nodes().next().is_none()
    }

    /// Every server in the membership config (voters and learners).
    pub fn members(&self) -> Vec<Member> {
        let m = self.raft.metrics().borrow().membership_config.clone();
        let voters: std::collections::BTreeSet<NodeId> = m.membership().voter_ids().collect();
        m.membership()
            .nodes()
            .map(|(id, info)| Member {
                id: *id,
                info: info.clone(),
                voter: voters.contains(id),
            })
            .collect()
    }

    /// Whether this server is a witness (stores no blobs of its own, keeps hints) now.
    pub fn is_witness(&self) -> bool {
        self.witness.load(Ordering::Acquire)
    }

    /// Servers that store blobs.
    pub fn data_replicas(&self) -> Vec<Member> {
        self.members().into_iter().filter(|m| !m.info.witness).collect()
    }

    /// Servers that vote but store no blobs (they keep hints: see `blobs::handoff`).
    pub fn witnesses(&self) -> Vec<Member> {
        self.members().into_iter().filter(|m| m.info.witness).collect()
    }

    pub fn addr_of(&self, id: NodeId) -> Option<String> {
        self.members().into_iter().find(|m| m.id == id).map(|m| m.info.addr)
    }

    pub fn leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader
    }

    /// The Raft term in which this server leads now, if it does.
    pub fn leading_term(&self) -> Option<u64> {
        let m = self.raft.metrics();
        let m = m.borrow();
        (m.state == openraft::ServerState::Leader && m.current_leader == Some(self.id)).then_some(m.current_term)
    }

    /// Waits (bounded) until some leader is known; returns its id.
    pub async fn wait_leader(&self) -> Result<NodeId, NodeError> {
        let deadline = tokio::time::Instant::now() + LEADER_WAIT;
        let mut rx = self.raft.metrics();
        loop {
            if let Some(l) = rx.borrow().current_leader {
                return Ok(l);
            }
            if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                return Err(NodeError::NoLeader);
            }
        }
    }

    /// Resolves once this server no longer takes `leader` for the leader: an election began
    /// (the leader went silent) or another server leads. Never, while it does.
    pub async fn leader_moved_from(&self, leader: NodeId) {
        let mut rx = self.raft.metrics();
        loop {
            if rx.borrow_and_update().current_leader != Some(leader) {
                return;
            }
            if rx.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// Verifies a token against the replicated cluster keys and the account as it is now: the
    /// account must still exist and the token must not be older than the account's token
    /// generation (see `Command::RevokeTokens`). The returned claims carry the account's
    /// CURRENT role, not the one the token was issued with, so a demoted admin is a user at once.
    /// Every server checks against its own applied state, which follows the leader within
    /// milliseconds: a revocation takes effect everywhere as soon as it is applied.
    pub fn authenticate(&self, token: Option<&str>) -> Result<Claims, NodeError> {
        let token = token.ok_or_else(|| NodeError::Unauthenticated("no token (log in first)".into()))?;
        let t = self.tables();
        let internal = |e: crate::fsm::StoreError| NodeError::Internal(e.to_string());
        let cluster = t
            .cluster()
            .map_err(internal)?
            .ok_or_else(|| NodeError::Unavailable("cluster is not bootstrapped yet".into()))?;
        let claims = token::verify(token, &cluster.cluster_id, |id| cluster.key(id), token::unix_now())
            .map_err(|e| NodeError::Unauthenticated(e.to_string()))?;
        let account = t.account(&claims.user).map_err(internal)?;
        let generation = t.token_generation(&claims.user).map_err(internal)?;
        current_claims(claims, account.as_ref(), generation)
    }

    /// Verifies a token and requires the account's current admin role.
    pub fn authenticate_admin(&self, token: Option<&str>) -> Result<Actor, NodeError> {
        let c = self.authenticate(token)?;
        if c.role != Role::Admin {
            return Err(NodeError::Denied(format!("{} is not an admin", c.user)));
        }
        Ok(Actor {
            user: c.user,
            admin: true,
        })
    }

    /// Proposes a command on this node, which must be the leader.
    pub async fn propose(&self, cmd: Command) -> Result<Outcome, NodeError> {
        match self.raft.client_write(cmd).await {
            Ok(resp) => Ok(resp.data?),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => match (f.leader_id, f.leader_node) {
                (Some(id), Some(n)) => Err(NodeError::ForwardTo(id, n.addr)),
                _ => Err(NodeError::NoLeader),
            },
            Err(e) => Err(NodeError::Unavailable(e.to_string())),
        }
    }

    /// Status for `codafs status --server`.
    pub fn status(&self) -> pb::ServerStatus {
        let m = self.raft.metrics().borrow().clone();
        let (blob_count, blob_bytes) = if self.is_witness() { (0, 0) } else { self.blobs.stats() };
        let (spool_blobs, spool_bytes, spool_limit_bytes) = if self.is_witness() {
            let (n, b) = self.blobs.stats();
            (n, b, self.spool.limit())
        } else {
            (0, 0, 0)
        };
        let members = self.members();
        let disk = self.space.usage();
        let role = match m.state {
            openraft::ServerState::Leader => "leader",
            openraft::ServerState::Follower => "follower",
            openraft::ServerState::Candidate => "candidate",
            openraft::ServerState::Learner => "learner",
            openraft::ServerState::Shutdown => "shutdown",
        };
        pb::ServerStatus {
            node_id: self.id,
            addr: self.cfg.advertised().to_string(),
            witness: self.is_witness(),
            role: role.into(),
            term: m.current_term,
            leader_id: m.current_leader.unwrap_or(0),
            last_log_index: m.last_log_index.unwrap_or(0),
            commit_index: self
                .committed
                .load(Ordering::Relaxed)
                .max(m.last_applied.map_or(0, |l| l.index)),
            applied_index: m.last_applied.map_or(0, |l| l.index),
            snapshot_index: m.snapshot.map_or(0, |l| l.index),
            blob_count,
            blob_bytes,
            repair_backlog: self.counters.repair_backlog.load(Ordering::Relaxed),
            corrupt_found: self.blobs.corrupt_found(),
            cluster_id: self
                .tables()
                .cluster()
                .ok()
                .flatten()
                .map(|c| c.cluster_id)
                .unwrap_or_default(),
            voters: members.iter().filter(|m| m.voter).count() as u32,
            servers: members.len() as u32,
            blob_gets: self.counters.blob_gets.load(Ordering::Relaxed),
            disk_free_bytes: disk.map_or(0, |u| u.free),
            disk_total_bytes: disk.map_or(0, |u| u.total),
            disk_min_free_bytes: disk.map_or(0, |u| self.space.min_free_of(u.total)),
            space_refusals: self.space.refusals.load(Ordering::Relaxed),
            blob_bytes_received: self.counters.blob_bytes_received.load(Ordering::Relaxed),
            spool_blobs,
            spool_bytes,
            spool_limit_bytes,
            holds_ca_key: self.tls.as_ref().is_some_and(|t| t.ca_key_pem.is_some()),
        }
    }

    /// Adds a server: as a learner first (so it catches up without counting towards quorums),
    /// then as a voter.
    pub async fn add_server(&self, id: NodeId, info: NodeInfo) -> Result<(), NodeError> {
        let map_err = |e: RaftError<NodeId, ClientWriteError<NodeId, NodeInfo>>| match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => match (f.leader_id, f.leader_node) {
                (Some(id), Some(n)) => NodeError::ForwardTo(id, n.addr),
                _ => NodeError::NoLeader,
            },
            other => NodeError::Unavailable(other.to_string()),
        };
        if self.members().iter().any(|m| m.id == id && m.voter) {
            return Ok(());
        }
        self.raft.add_learner(id, info, true).await.map_err(map_err)?;
        // Add just this voter, so two servers joining at once cannot drop each other.
        let add = openraft::ChangeMembers::AddVoterIds([id].into_iter().collect());
        self.raft.change_membership(add, false).await.map_err(map_err)?;
        Ok(())
    }

    /// Makes server `id` a witness or a data replica, by changing its entry in the membership
    /// (its address stays, so this cannot split the cluster). The last data replica cannot
    /// become a witness: nothing would hold the contents.
    pub async fn set_role(&self, id: NodeId, witness: bool) -> Result<(), NodeError> {
        let members = self.members();
        let Some(m) = members.iter().find(|m| m.id == id) else {
            return Err(NodeError::NotFound(format!("server {id}")));
        };
        if m.info.witness == witness {
            return Ok(());
        }
        if witness && !members.iter().any(|o| o.id != id && !o.info.witness) {
            return Err(NodeError::Invalid(format!(
                "server {id} is the only data server: it cannot become a witness until another data server has joined"
            )));
        }
        let info = NodeInfo {
            witness,
            ..m.info.clone()
        };
        self.raft
            .change_membership(
                openraft::ChangeMembers::SetNodes([(id, info)].into_iter().collect()),
                false,
            )
            .await
            .map_err(|e| NodeError::Unavailable(e.to_string()))?;
        Ok(())
    }

    /// Removes a server from the membership.
    /// Refuses the removal of server `id` if it is no member or the last voter; returns the
    /// members. Checked before anything is recorded about the removal.
    pub fn check_removable(&self, id: NodeId) -> Result<Vec<Member>, NodeError> {
        let members = self.members();
        if !members.iter().any(|m| m.id == id) {
            return Err(NodeError::NotFound(format!("server {id}")));
        }
        if !members.iter().any(|m| m.voter && m.id != id) {
            return Err(NodeError::Invalid("cannot remove the last voter".into()));
        }
        Ok(members)
    }

    pub async fn remove_server(&self, id: NodeId) -> Result<(), NodeError> {
        let members = self.check_removable(id)?;
        // One membership change either way: a voter leaves the voters and the node list at
        // once (`retain` false: not kept as a learner), a learner the node list. A second
        // change after a voter's removal would be proposed by a leader that is no longer a
        // voter when it removes itself, which openraft 0.9 does not allow (its core panicked):
        // the leader steps down once this one commits, and the others elect a new one.
        // `RemoveVoters` is computed from the membership as it is then, so a voter added
        // meanwhile stays.
        let change = if members.iter().any(|m| m.id == id && m.voter) {
            openraft::ChangeMembers::RemoveVoters([id].into_iter().collect())
        } else {
            openraft::ChangeMembers::RemoveNodes([id].into_iter().collect())
        };
        self.raft
            .change_membership(change, false)
            .await
            .map_err(|e| NodeError::Unavailable(e.to_string()))?;
        Ok(())
    }
}

/// The claims of a verified token as the account stands now: refused if the account is gone or
/// its tokens were revoked after this one was issued; otherwise with the current role.
fn current_claims(mut claims: Claims, account: Option<&AccountRec>, generation: u64) -> Result<Claims, NodeError> {
    let Some(account) = account else {
        return Err(NodeError::Unauthenticated(format!(
            "account {} no longer exists",
            claims.user
        )));
    };
    if claims.generation < generation {
        return Err(NodeError::Unauthenticated(format!(
            "token revoked: the tokens of {} were revoked (password, role or write rights changed, or `codafs user revoke`) after this one was issued; log in again",
            claims.user
        )));
    }
    claims.role = if account.admin { Role::Admin } else { Role::User };
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(role: Role, generation: u64) -> Claims {
        Claims {
            user: "web".into(),
            role,
            cluster: "c".into(),
            key_id: 1,
            expires: u64::MAX,
            generation,
        }
    }

    fn account(admin: bool) -> AccountRec {
        AccountRec {
            name: "web".into(),
            admin,
            password_hash: String::new(),
            created_ns: 0,
        }
    }

    #[test]
    fn tokens_are_checked_against_the_current_account() {
        // Never revoked: generation 0 tokens (also those from before the claim existed) pass.
        let c = current_claims(claims(Role::User, 0), Some(&account(false)), 0).unwrap();
        assert_eq!(c.role, Role::User);
        // Issued at the current generation or later: accepted.
        assert!(current_claims(claims(Role::User, 9), Some(&account(false)), 9).is_ok());
        // Issued before the account's tokens were revoked: refused, saying why.
        let e = current_claims(claims(Role::User, 8), Some(&account(false)), 9).unwrap_err();
        assert!(
            matches!(&e, NodeError::Unauthenticated(m) if m.contains("revoked")),
            "{e}"
        );
        // The account is gone.
        let e = current_claims(claims(Role::Admin, 9), None, 9).unwrap_err();
        assert!(
            matches!(&e, NodeError::Unauthenticated(m) if m.contains("no longer exists")),
            "{e}"
        );
        // The role is the account's current one, whatever the token says.
        let demoted = current_claims(claims(Role::Admin, 0), Some(&account(false)), 0).unwrap();
        assert_eq!(demoted.role, Role::User);
        let promoted = current_claims(claims(Role::User, 0), Some(&account(true)), 0).unwrap();
        assert_eq!(promoted.role, Role::Admin);
    }
}
