//! A removed server stops. `cluster remove` takes a server out of the Raft membership, but the
//! process may go on running, or be started again later with its old directory: it still holds
//! a membership that names it, so it would campaign for ever, and its log lines and `status`
//! would say it is a member. It learns of its removal in one of two ways, and then `run` ends
//! with [`ServerError::Removed`](crate::ServerError::Removed):
//! - its own state holds the replicated record of its removal (`ForgetServer`) and its
//!   applied membership no longer names it: it applied the whole removal (a removed leader,
//!   or a follower that received the final membership);
//! - a current member refused its Raft messages as those of a removed server, from that
//!   member's own record and membership ([`refusal`]): it was down or cut off while it was
//!   removed, or the leader stopped replicating to it before the final membership reached it.
//!   It learns so when it campaigns: a removed learner, which never does, must be stopped by
//!   hand.
//!
//! The record alone is not enough: it is committed before the membership change, and the
//! server must still take part in that change (a two-server cluster needs both for it).
use std::sync::Arc;
use std::time::Duration;

use codafs_proto::error::{status as refuse, ErrorKind};
use tokio::sync::watch;
use tonic::Status;

use crate::fsm::StateView;
use crate::node::Node;
use crate::raft::NodeId;

/// How often the server looks at its own state for a completed removal.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Where the Raft transport reports a peer's refusal of this server as removed: the peer's id.
pub type Told = watch::Sender<Option<NodeId>>;

/// A new channel for [`Told`] reports.
pub fn channel() -> (Arc<Told>, watch::Receiver<Option<NodeId>>) {
    let (tx, rx) = watch::channel(None);
    (Arc::new(tx), rx)
}

/// The refusal a member sends to Raft messages from server `id` when its state records `id`'s
/// removal and its membership no longer names `id` (kind `removed`); `None` otherwise. The
/// record alone is not enough: it is committed before the membership change, which may then
/// fail and leave `id` a member that must go on voting.
pub fn refusal(node: &Node, id: NodeId) -> Option<Status> {
    if node.is_member(id) {
        return None;
    }
    let rec = node.tables().removed_server(id).ok().flatten()?;
    Some(refuse(
        ErrorKind::Removed,
        format!(
            "server {id} was removed from the cluster by {} at {} (unix ns); it must stop",
            rec.removed_by, rec.removed_ns
        ),
    ))
}

/// Waits until this server learns it was removed (see the module doc); returns why, for the
/// operator.
pub async fn wait(node: Arc<Node>, mut told: watch::Receiver<Option<NodeId>>) -> String {
    let mut tick = tokio::time::interval(CHECK_EVERY);
    let mut reports = true;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            r = told.changed(), if reports => reports = r.is_ok(),
        }
        let by_peer = *told.borrow();
        if let Some(peer) = by_peer {
            return format!(
                "server {peer} refused this server's Raft messages: this server (node {}) was removed \
                 from the cluster. Its directory holds an old copy of the cluster's state; delete it, \
                 or start afresh in an empty directory with a new join token",
                node.id
            );
        }
        if applied_removal(&node) {
            return format!(
                "this server (node {}) was removed from the cluster and has applied its removal; \
                 its directory can be deleted",
                node.id
            );
        }
    }
}

/// Whether this server's state records its removal and its membership, applied (so
/// committed: a leader that removes itself must still bring the final membership to a quorum
/// of the others), leaves it out.
fn applied_removal(node: &Node) -> bool {
    let m = node.raft.metrics().borrow().clone();
    let applied = match (m.membership_config.log_id(), m.last_applied) {
        (Some(change), Some(last)) => change.index <= last.index,
        _ => false,
    };
    applied && node.outside_membership() && node.tables().removed_server(node.id).ok().flatten().is_some()
}
