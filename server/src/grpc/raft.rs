//! The `Raft` service: decodes openraft messages and hands them to the local Raft node. Only
//! peers (callers with a server certificate) may call it.
use std::sync::Arc;

use codafs_proto::pb;
use tonic::{Request, Response, Status};

use super::{internal, refuse, require_peer, ErrorKind};
use crate::node::Node;
use crate::raft::NodeId;

pub struct RaftService(pub Arc<Node>);

fn decode<T: serde::de::DeserializeOwned>(m: &pb::RaftMessage) -> Result<T, Status> {
    bincode::deserialize(&m.payload).map_err(|e| refuse(ErrorKind::Invalid, format!("bad raft message: {e}")))
}

/// Refuses a Raft request from anyone but a current member from its headers, before its
/// message (up to `MAX_RAFT_MESSAGE`) is read: the handlers check again, but only once tonic
/// has buffered and decoded the whole message, which a caller without a certificate could
/// otherwise make every server hold for as long as it keeps sending.
pub fn peers_only(node: Arc<Node>) -> impl tonic::service::Interceptor + Clone {
    move |req: Request<()>| {
        require_peer(&node, &req, "Raft messages")?;
        Ok(req)
    }
}

fn encode<T: serde::Serialize>(v: &T) -> Result<Response<pb::RaftMessage>, Status> {
    let payload = bincode::serialize(v).map_err(internal)?;
    Ok(Response::new(pb::RaftMessage {
        payload: payload.into(),
    }))
}

#[tonic::async_trait]
impl pb::raft_server::Raft for RaftService {
    async fn append_entries(&self, req: Request<pb::RaftMessage>) -> Result<Response<pb::RaftMessage>, Status> {
        require_peer(&self.0, &req, "Raft messages")?;
        let r = self.0.raft.append_entries(decode(req.get_ref())?).await;
        encode(&r)
    }

    async fn vote(&self, req: Request<pb::RaftMessage>) -> Result<Response<pb::RaftMessage>, Status> {
        require_peer(&self.0, &req, "Raft messages")?;
        let vote: openraft::raft::VoteRequest<NodeId> = decode(req.get_ref())?;
        // A removed server campaigns when it stops hearing from the leader. With TLS its
        // certificate already told who it is; on an `--insecure` cluster only its vote does.
        if let Some(removed) = vote
            .vote
            .leader_id()
            .voted_for()
            .and_then(|candidate| crate::removal::refusal(&self.0, candidate))
        {
            return Err(removed);
        }
        let r = self.0.raft.vote(vote).await;
        encode(&r)
    }

    async fn install_snapshot(&self, req: Request<pb::RaftMessage>) -> Result<Response<pb::RaftMessage>, Status> {
        require_peer(&self.0, &req, "Raft messages")?;
        let r = self.0.raft.install_snapshot(decode(req.get_ref())?).await;
        encode(&r)
    }
}
