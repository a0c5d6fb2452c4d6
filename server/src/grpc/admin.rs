//! The `Admin` service: volumes, membership and status. Changes need an admin token and run on
//! the leader; reads are answered locally.
use std::sync::Arc;
use std::time::Duration;

use codafs_common::join::JoinToken;
use codafs_proto::pb;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use super::{convert, forward_request, is_forwarded, on_leader, status, token_of};
use crate::fsm::{Command, Outcome, StateView, VolumeSpec};
use crate::node::{Node, NodeError};
use crate::raft::NodeInfo;

pub struct AdminService(pub Arc<Node>);

fn client(ch: Channel) -> pb::admin_client::AdminClient<Channel> {
    pb::admin_client::AdminClient::new(ch)
}

const FORWARD_TIMEOUT: Duration = Duration::from_secs(30);

impl AdminService {
    fn servers(&self) -> pb::ServerList {
        let servers = self
            .0
            .members()
            .into_iter()
            .map(|m| pb::ServerInfo {
                node_id: m.id,
                addr: m.info.addr,
                witness: m.info.witness,
                voter: m.voter,
            })
            .collect();
        pb::ServerList {
            servers,
            leader_id: self.0.leader().unwrap_or(0),
        }
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().name))]
    async fn create_volume(&self, req: Request<pb::VolumeSpec>) -> Result<Response<pb::VolumeInfo>, Status> {
        let token = token_of(&req);
        let forwarded = is_forwarded(&req);
        let spec = req.into_inner();
        let node = &self.0;
        let actor = node.authenticate_admin(token.as_deref()).map_err(status)?;
        let local = || async {
            let cmd = Command::CreateVolume {
                actor: actor.clone(),
                spec: VolumeSpec {
                    name: spec.name.clone(),
                    owner: if spec.owner.is_empty() {
                        actor.user.clone()
                    } else {
                        spec.owner.clone()
                    },
                    quota_bytes: spec.quota_bytes,
                    quota_files: spec.quota_files,
                    write_quorum: spec.write_quorum,
                    public_read: spec.public_read,
                },
                now_ns: codafs_common::now_ns(),
            };
            match node.propose(cmd).await? {
                Outcome::Volume(v) => Ok(convert::volume_info(&v)),
                other => Err(NodeError::Internal(format!("unexpected outcome {other:?}"))),
            }
        };
        let remote = |ch| {
            let r = forward_request(spec.clone(), token.as_deref(), FORWARD_TIMEOUT);
            async move { client(ch).create_volume(r).await.map(|r| r.into_inner()) }
        };
        Ok(Response::new(on_leader(node, forwarded, local, remote).await?))
    }

    async fn list_volumes(&self, _req: Request<pb::Empty>) -> Result<Response<pb::VolumeList>, Status> {
        let vols = self.0.tables().volumes().map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::VolumeList {
            volumes: vols.iter().map(convert::volume_info).collect(),
        }))
    }

    async fn get_volume(&self, req: Request<pb::VolumeName>) -> Result<Response<pb::VolumeInfo>, Status> {
        let name = &req.get_ref().name;
        let v = self
            .0
            .tables()
            .volume(name)
            .map_err(|e| Status::internal(e.to_string()))?
            .ok_or_else(|| status(NodeError::Refused(crate::fsm::ApplyError::NoSuchVolume(name.clone()))))?;
        Ok(Response::new(convert::volume_info(&v)))
    }

    async fn servers(&self, _req: Request<pb::Empty>) -> Result<Response<pb::ServerList>, Status> {
        Ok(Response::new(self.servers()))
    }

    async fn status(&self, _req: Request<pb::Empty>) -> Result<Response<pb::ServerStatus>, Status> {
        Ok(Response::new(self.0.status()))
    }

    #[tracing::instrument(skip_all, fields(node = req.get_ref().node_id, addr = %req.get_ref().addr))]
    async fn join(&self, req: Request<pb::JoinRequest>) -> Result<Response<pb::JoinReply>, Status> {
        let forwarded = is_forwarded(&req);
        let r = req.into_inner();
        let node = &self.0;
        let cluster = node
            .tables()
            .cluster()
            .map_err(|e| Status::internal(e.to_string()))?
            .ok_or_else(|| Status::unavailable("this server has not caught up with the cluster yet"))?;
        if r.join_key != cluster.join_key() {
            return Err(status(NodeError::Unauthenticated(
                "join key does not match this cluster".into(),
            )));
        }
        if r.node_id == 0 || r.addr.is_empty() {
            return Err(Status::invalid_argument("join needs a node id and an address"));
        }
        let local = || async {
            node.add_server(
                r.node_id,
                NodeInfo {
                    addr: r.addr.clone(),
                    witness: r.witness,
                },
            )
            .await?;
            Ok(pb::JoinReply {
                cluster_id: cluster.cluster_id.clone(),
                leader_id: node.id,
            })
        };
        let remote = |ch| {
            let fr = forward_request(r.clone(), None, Duration::from_secs(120));
            async move { client(ch).join(fr).await.map(|r| r.into_inner()) }
        };
        Ok(Response::new(on_leader(node, forwarded, local, remote).await?))
    }

    async fn join_token(&self, req: Request<pb::Empty>) -> Result<Response<pb::JoinTokenReply>, Status> {
        self.0.authenticate_admin(token_of(&req).as_deref()).map_err(status)?;
        let cluster = self
            .0
            .tables()
            .cluster()
            .map_err(|e| Status::internal(e.to_string()))?
            .ok_or_else(|| Status::unavailable("cluster is not bootstrapped yet"))?;
        let token = JoinToken {
            cluster_id: cluster.cluster_id.clone(),
            join_key: cluster.join_key(),
            servers: self.0.members().into_iter().map(|m| m.info.addr).collect(),
        };
        Ok(Response::new(pb::JoinTokenReply { token: token.encode() }))
    }

    async fn remove_server(&self, req: Request<pb::RemoveServerRequest>) -> Result<Response<pb::ServerList>, Status> {
        let token = token_of(&req);
        let forwarded = is_forwarded(&req);
        let r = req.into_inner();
        let node = &self.0;
        node.authenticate_admin(token.as_deref()).map_err(status)?;
        let local = || async {
            node.remove_server(r.node_id).await?;
            Ok(self.servers())
        };
        let remote = |ch| {
            let fr = forward_request(r, token.as_deref(), FORWARD_TIMEOUT);
            async move { client(ch).remove_server(fr).await.map(|r| r.into_inner()) }
        };
        Ok(Response::new(on_leader(node, forwarded, local, remote).await?))
    }
}
