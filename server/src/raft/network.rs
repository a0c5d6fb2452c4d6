//! Raft transport: openraft's messages, bincode-encoded, inside the `Raft` gRPC service.
//! The remote side's `Result` travels back encoded too, so a remote Raft error stays distinct
//! from a network failure (openraft reacts differently to each).
//!
//! Log entries can be large (one commit is one entry, up to `MAX_MESSAGE` of operations), and
//! a follower that was down has many to catch up on. Two things keep that from stalling:
//! - a batch of entries larger than [`APPEND_BATCH_BYTES`] is refused before it is sent, with
//!   openraft's `PayloadTooLarge` and a hint of how many entries fit, so openraft sends fewer
//!   (one entry at least, which always fits in [`MAX_RAFT_MESSAGE`]);
//! - openraft gives every AppendEntries one heartbeat interval, far too little to carry tens of
//!   MiB to a busy follower and store them there. So a batch travels in a task of its own with
//!   a deadline that grows with its size ([`append_deadline`]); when openraft gives up waiting
//!   and asks again for the same entries, the call waits for that transfer instead of starting
//!   another one. Without this, every attempt was cut off half-way and started over.
use std::sync::Arc;
use std::time::Duration;

use codafs_proto::limits::MAX_RAFT_MESSAGE;
use codafs_proto::pb;
use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::reach::Reachability;
use super::{NodeId, NodeInfo, TypeConfig};
use crate::peers::Peers;
use crate::removal::Told;

/// Most bytes of entries sent in one AppendEntries (a single larger entry goes alone).
pub const APPEND_BATCH_BYTES: u64 = 8 << 20;
/// Every AppendEntries transfer may take this long, plus [`append_deadline`]'s share per byte.
const APPEND_DEADLINE_FLOOR: Duration = Duration::from_secs(10);
/// The slowest transfer rate to a follower allowed for before an AppendEntries is given up.
const APPEND_MIN_RATE: u64 = 4 << 20;

/// How long sending an AppendEntries of `bytes` may take.
pub fn append_deadline(bytes: u64) -> Duration {
    APPEND_DEADLINE_FLOOR + Duration::from_secs(bytes / APPEND_MIN_RATE)
}

/// How many of the leading entries, of the given encoded sizes, to send in one message: as many
/// as fit in `budget` bytes, and at least one.
pub fn entries_that_fit(sizes: &[u64], budget: u64) -> usize {
    let mut total = 0u64;
    let mut n = 0;
    for s in sizes {
        total = total.saturating_add(*s);
        if n > 0 && total > budget {
            break;
        }
        n += 1;
    }
    n
}

type AppendResult = Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, NodeInfo, RaftError<NodeId>>>;

/// Which batch an AppendEntries carries: the same key means the same entries to the same
/// follower under the same leader, so one transfer's answer serves every request for it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct BatchKey {
    vote: openraft::Vote<NodeId>,
    prev: Option<openraft::LogId<NodeId>>,
    last: Option<openraft::LogId<NodeId>>,
    entries: usize,
}

impl BatchKey {
    fn of(rpc: &AppendEntriesRequest<TypeConfig>) -> Self {
        BatchKey {
            vote: rpc.vote,
            prev: rpc.prev_log_id,
            last: rpc.entries.last().map(|e| e.log_id),
            entries: rpc.entries.len(),
        }
    }

    /// Whether `self` (an earlier, shorter batch) is the start of `rpc`'s batch.
    fn is_prefix_of(&self, rpc: &AppendEntriesRequest<TypeConfig>) -> bool {
        self.vote == rpc.vote
            && self.prev == rpc.prev_log_id
            && self.entries > 0
            && self.entries < rpc.entries.len()
            && self.last == Some(rpc.entries[self.entries - 1].log_id)
    }
}

/// A batch being sent in the background.
struct Inflight {
    key: BatchKey,
    task: tokio::task::JoinHandle<AppendResult>,
}

/// Creates per-target connections.
#[derive(Clone)]
pub struct Network {
    pub peers: Arc<Peers>,
    /// Where a peer's refusal of this server as removed is reported (see `crate::removal`).
    pub told: Arc<Told>,
    /// Which peers could not be reached (reported by `super::reach`, not at every attempt).
    pub reach: Arc<Reachability>,
}

/// A connection to one peer.
pub struct Conn {
    peers: Arc<Peers>,
    told: Arc<Told>,
    reach: Arc<Reachability>,
    target: NodeId,
    node: NodeInfo,
    /// The batch of entries on its way to this peer, if one is.
    inflight: Option<Inflight>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Conn;

    async fn new_client(&mut self, target: NodeId, node: &NodeInfo) -> Conn {
        Conn {
            peers: self.peers.clone(),
            told: self.told.clone(),
            reach: self.reach.clone(),
            target,
            node: node.clone(),
            inflight: None,
        }
    }
}

#[derive(Clone, Copy)]
enum Rpc {
    Append,
    Vote,
    Snapshot,
}

impl Conn {
    async fn call<Req, Resp, E>(
        &self,
        rpc: Rpc,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, NodeInfo, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let to = To {
            peers: &self.peers,
            told: &self.told,
            reach: &self.reach,
            target: self.target,
            node: &self.node,
        };
        send(to, rpc, req, option.hard_ttl()).await
    }

    /// Sends a batch of entries (see the module doc): refuses one too large, joins a transfer
    /// of the same batch already under way, or starts one.
    async fn append(&mut self, rpc: AppendEntriesRequest<TypeConfig>) -> AppendResult {
        let sizes: Vec<u64> = rpc
            .entries
            .iter()
            .map(|e| bincode::serialized_size(e).unwrap_or(u64::MAX))
            .collect();
        let fit = entries_that_fit(&sizes, APPEND_BATCH_BYTES);
        if fit < rpc.entries.len() {
            tracing::debug!(
                target_node = self.target,
                entries = rpc.entries.len(),
                fit,
                "splitting a large AppendEntries batch"
            );
            return Err(RPCError::PayloadTooLarge(PayloadTooLarge::new_entries_hint(fit as u64)));
        }
        let bytes: u64 = sizes.iter().fold(0u64, |a, s| a.saturating_add(*s));
        if bytes > MAX_RAFT_MESSAGE as u64 {
            // Cannot happen for commits within MAX_MESSAGE; refuse rather than send in vain.
            let e = std::io::Error::other(format!(
                "a log entry of {bytes} bytes exceeds the Raft message limit of {MAX_RAFT_MESSAGE}"
            ));
            return Err(RPCError::Network(NetworkError::new(&e)));
        }
        let key = BatchKey::of(&rpc);
        if let Some(inflight) = &self.inflight {
            if inflight.key != key {
                if inflight.key.is_prefix_of(&rpc) {
                    // Ask openraft for exactly the batch already sent or on its way.
                    return Err(RPCError::PayloadTooLarge(PayloadTooLarge::new_entries_hint(
                        inflight.key.entries as u64,
                    )));
                }
                if let Some(old) = self.inflight.take() {
                    old.task.abort();
                }
            }
        }
        if self.inflight.is_none() {
            let (peers, told, reach) = (self.peers.clone(), self.told.clone(), self.reach.clone());
            let (target, node) = (self.target, self.node.clone());
            let task = tokio::spawn(async move {
                let to = To {
                    peers: &peers,
                    told: &told,
                    reach: &reach,
                    target,
                    node: &node,
                };
                send(to, Rpc::Append, &rpc, append_deadline(bytes)).await
            });
            self.inflight = Some(Inflight { key, task });
        }
        let Some(inflight) = self.inflight.as_mut() else {
            return Err(RPCError::Network(NetworkError::new(&std::io::Error::other(
                "no AppendEntries in flight",
            ))));
        };
        // If openraft stops waiting (its timeout drops this future), the transfer carries on
        // and its answer waits here for the next request for the same batch.
        let result = (&mut inflight.task).await;
        self.inflight = None;
        result.unwrap_or_else(|e| Err(RPCError::Network(NetworkError::new(&e))))
    }
}

/// The peer a message goes to, and how.
struct To<'a> {
    peers: &'a Peers,
    told: &'a Told,
    reach: &'a Reachability,
    target: NodeId,
    node: &'a NodeInfo,
}

/// Sends one Raft message to `to` and decodes its answer, giving up after `ttl`. A refusal of
/// this server as removed is reported to `to.told` as well.
async fn send<Req, Resp, E>(
    to: To<'_>,
    rpc: Rpc,
    req: &Req,
    ttl: Duration,
) -> Result<Resp, RPCError<NodeId, NodeInfo, RaftError<NodeId, E>>>
where
    Req: Serialize,
    Resp: DeserializeOwned,
    E: std::error::Error + DeserializeOwned,
{
    let payload = bincode::serialize(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
    let To {
        peers,
        told,
        reach,
        target,
        node,
    } = to;
    let mut client = peers.raft(&node.addr).map_err(|e| {
        reach.failed(target, &node.addr, &e);
        RPCError::Unreachable(Unreachable::new(&e))
    })?;
    let mut request = tonic::Request::new(pb::RaftMessage {
        payload: payload.into(),
    });
    request.set_timeout(ttl);
    let reply = match rpc {
        Rpc::Append => client.append_entries(request).await,
        Rpc::Vote => client.vote(request).await,
        Rpc::Snapshot => client.install_snapshot(request).await,
    };
    let reply = reply.map_err(|s| {
        let kind = codafs_proto::error::kind_of(&s);
        if kind == codafs_proto::error::ErrorKind::Removed {
            tracing::error!(peer = target, "{}", s.message());
            told.send_replace(Some(target));
        }
        if kind.is_retryable() {
            reach.failed(target, &node.addr, &why(&s));
            RPCError::Unreachable(Unreachable::new(&s))
        } else {
            reach.reached(target, &node.addr);
            RPCError::Network(NetworkError::new(&s))
        }
    })?;
    reach.reached(target, &node.addr);
    let result: Result<Resp, RaftError<NodeId, E>> =
        bincode::deserialize(&reply.into_inner().payload).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
    result.map_err(|e| RPCError::RemoteError(RemoteError::new_with_node(target, node.clone(), e)))
}

/// A refusal's message with its innermost cause ("tcp connect error: Connection refused (os
/// error 111)"): what an operator needs of the chain tonic wraps around a failed connection.
fn why(s: &tonic::Status) -> String {
    let mut cause: Option<&dyn std::error::Error> = std::error::Error::source(s);
    let mut last = None;
    for _ in 0..16 {
        let Some(c) = cause else { break };
        last = Some(c);
        cause = c.source();
    }
    match last {
        Some(c) => format!("{}: {c}", s.message()),
        None => s.message().to_string(),
    }
}

impl RaftNetwork<TypeConfig> for Conn {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, NodeInfo, RaftError<NodeId>>> {
        if rpc.entries.is_empty() {
            // A heartbeat: answered at once, also while a batch is on its way.
            return self.call(Rpc::Append, &rpc, &option).await;
        }
        self.append(rpc).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, NodeInfo, RaftError<NodeId, InstallSnapshotError>>>
    {
        self.call(Rpc::Snapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, NodeInfo, RaftError<NodeId>>> {
        self.call(Rpc::Vote, &rpc, &option).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use codafs_proto::limits::MAX_MESSAGE;

    #[test]
    fn batches_are_cut_at_the_byte_budget_but_never_empty() {
        assert_eq!(entries_that_fit(&[], 10), 0);
        assert_eq!(entries_that_fit(&[4, 4, 4], 10), 2);
        assert_eq!(entries_that_fit(&[4, 6, 1], 10), 2);
        assert_eq!(
            entries_that_fit(&[40, 1], 10),
            1,
            "one entry over the budget goes alone"
        );
        assert_eq!(entries_that_fit(&[1, 40], 10), 1);
        assert_eq!(entries_that_fit(&[1; 5], 10), 5);
        assert_eq!(entries_that_fit(&[u64::MAX, u64::MAX], 10), 1);
    }

    #[test]
    fn the_deadline_grows_with_the_batch() {
        assert_eq!(append_deadline(0), APPEND_DEADLINE_FLOOR);
        assert!(append_deadline(MAX_MESSAGE as u64) > append_deadline(APPEND_BATCH_BYTES));
        assert!(append_deadline(MAX_RAFT_MESSAGE as u64) < Duration::from_secs(120));
    }
}
