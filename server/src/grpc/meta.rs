//! The `Meta` service: follower reads from this replica's applied state (each reply carries the
//! applied index), and the per-volume change stream.
use std::pin::Pin;
use std::sync::Arc;

use codafs_common::ids::VOLUME_ROOT_INODE;
use codafs_common::names::{split_path, validate_name};
use codafs_proto::limits::{DEFAULT_READDIR_PAGE, MAX_READDIR_PAGE};
use codafs_proto::pb;
use futures::Stream;
use tonic::{Request, Response, Status};

use super::convert;
use crate::changes;
use crate::fsm::{ObjectRec, StateView};
use crate::node::Node;

pub struct MetaService(pub Arc<Node>);

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

impl MetaService {
    fn object(&self, ino: u64) -> Result<ObjectRec, Status> {
        self.0
            .tables()
            .object(ino)
            .map_err(internal)?
            .ok_or_else(|| Status::not_found(format!("no object {ino:#x}")))
    }

    /// An attribute reply. `applied_index` must be read before the object: the object is then
    /// at least that fresh, which is what mounts rely on to order it against change events.
    fn reply(o: &ObjectRec, applied_index: u64) -> Response<pb::AttrReply> {
        Response::new(pb::AttrReply {
            attr: Some(convert::attr(o)),
            applied_index,
        })
    }
}

#[tonic::async_trait]
impl pb::meta_server::Meta for MetaService {
    async fn lookup(&self, req: Request<pb::LookupRequest>) -> Result<Response<pb::AttrReply>, Status> {
        let r = req.into_inner();
        validate_name(&r.name).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let applied_index = self.0.applied_index();
        let ino = self
            .0
            .tables()
            .dirent(r.parent, &r.name)
            .map_err(internal)?
            .ok_or_else(|| Status::not_found(format!("{} not found", r.name)))?;
        Ok(Self::reply(&self.object(ino)?, applied_index))
    }

    async fn get_attr(&self, req: Request<pb::GetAttrRequest>) -> Result<Response<pb::AttrReply>, Status> {
        let applied_index = self.0.applied_index();
        Ok(Self::reply(&self.object(req.get_ref().ino)?, applied_index))
    }

    async fn resolve(&self, req: Request<pb::ResolveRequest>) -> Result<Response<pb::AttrReply>, Status> {
        let r = req.into_inner();
        let applied_index = self.0.applied_index();
        let t = self.0.tables();
        let vol = t
            .volume(&r.volume)
            .map_err(internal)?
            .ok_or_else(|| Status::not_found(format!("no volume {}", r.volume)))?;
        let mut cur = codafs_common::make_ino(vol.id, VOLUME_ROOT_INODE);
        for part in split_path(&r.path).map_err(|e| Status::invalid_argument(e.to_string()))? {
            cur = t
                .dirent(cur, part)
                .map_err(internal)?
                .ok_or_else(|| Status::not_found(format!("{} not found", r.path)))?;
        }
        Ok(Self::reply(&self.object(cur)?, applied_index))
    }

    async fn read_dir(&self, req: Request<pb::ReadDirRequest>) -> Result<Response<pb::ReadDirReply>, Status> {
        let r = req.into_inner();
        let limit = if r.limit == 0 {
            DEFAULT_READDIR_PAGE
        } else {
            r.limit.min(MAX_READDIR_PAGE)
        } as usize;
        // Read before the page: the page is at least this fresh.
        let applied_index = self.0.applied_index();
        let (dir, page, more) = self
            .0
            .tables()
            .dir_page(r.ino, &r.after, limit)
            .map_err(internal)?
            .ok_or_else(|| Status::not_found(format!("no node {:#x}", r.ino)))?;
        if dir.kind != crate::fsm::Kind::Dir {
            return Err(Status::failed_precondition(format!("{:#x} is not a directory", r.ino)));
        }
        let entries = page
            .into_iter()
            .map(|(name, o)| pb::DirEntry {
                name,
                attr: Some(convert::attr(&o)),
            })
            .collect();
        Ok(Response::new(pb::ReadDirReply {
            entries,
            more,
            applied_index,
            dir_version: dir.version,
        }))
    }

    async fn volume_stamps(
        &self,
        req: Request<pb::VolumeStampsRequest>,
    ) -> Result<Response<pb::VolumeStampsReply>, Status> {
        let t = self.0.tables();
        let mut stamps = Vec::new();
        let names: Vec<String> = if req.get_ref().volumes.is_empty() {
            t.volumes().map_err(internal)?.into_iter().map(|v| v.name).collect()
        } else {
            req.into_inner().volumes
        };
        for name in names {
            let v = t.volume(&name).map_err(internal)?;
            stamps.push(pb::VolumeStamp {
                version: v.as_ref().map_or(0, |v| v.version),
                exists: v.is_some(),
                volume: name,
            });
        }
        Ok(Response::new(pb::VolumeStampsReply {
            stamps,
            applied_index: self.0.applied_index(),
        }))
    }

    type SubscribeStream = Pin<Box<dyn Stream<Item = Result<pb::ChangeEvent, Status>> + Send>>;

    async fn subscribe(&self, req: Request<pb::SubscribeRequest>) -> Result<Response<Self::SubscribeStream>, Status> {
        let r = req.into_inner();
        let stream = changes::subscribe(self.0.applied.clone(), r.volume, r.from_version)?;
        Ok(Response::new(Box::pin(stream)))
    }
}
