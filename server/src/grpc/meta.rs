//! The `Meta` service: follower reads from this replica's applied state (each reply carries the
//! applied index), and the per-volume change stream. Every call is authorized per volume first
//! (`access`): private volumes need a token of a reader; files come with blob read tickets.
use std::pin::Pin;
use std::sync::Arc;

use codafs_common::ids::VOLUME_ROOT_INODE;
use codafs_common::names::{split_path, validate_name};
use codafs_proto::limits::{DEFAULT_READDIR_PAGE, MAX_READDIR_PAGE};
use codafs_proto::pb;
use futures::Stream;
use tonic::{Request, Response, Status};

use super::{bad_name, convert, internal, refuse, ErrorKind};
use crate::access::{Caller, TicketMaker};
use crate::changes;
use crate::fsm::{ObjectRec, StateView};
use crate::node::Node;
use codafs_proto::error::as_of;

/// Volumes one `VolumeStamps` request may name.
const MAX_STAMPS: usize = 10_000;

pub struct MetaService(pub Arc<Node>);

impl MetaService {
    /// Object `ino`, read after `applied` was: its absence is marked as of that index.
    fn object(&self, ino: u64, applied: u64) -> Result<ObjectRec, Status> {
        self.0
            .tables()
            .object(ino)
            .map_err(internal)?
            .ok_or_else(|| self.absent(format!("no object {ino:#x}"), applied))
    }

    /// A page of directory `ino`'s entries after `after`, at most `limit` of them.
    fn dir_page(&self, ino: u64, after: &str, limit: usize) -> Result<pb::ReadDirReply, Status> {
        let tickets = self.0.ticket_maker()?;
        // Read before the page: the page is at least this fresh.
        let applied_index = self.0.applied_index();
        let (dir, page, more) = self
            .0
            .tables()
            .dir_page(ino, after, limit)
            .map_err(internal)?
            .ok_or_else(|| self.absent(format!("no node {ino:#x}"), applied_index))?;
        if dir.kind != crate::fsm::Kind::Dir {
            return Err(refuse(ErrorKind::NotDir, format!("{ino:#x} is not a directory")));
        }
        // A page read from tables being emptied would be cut short, and mounts cache listings.
        self.0.check_installing()?;
        let entries = page
            .into_iter()
            .map(|(name, o)| pb::DirEntry {
                name,
                attr: Some(shown(&o, &tickets)),
            })
            .collect();
        Ok(pb::ReadDirReply {
            entries,
            more,
            applied_index,
            dir_version: dir.version,
        })
    }

    /// A "not found" decided on state at least as fresh as `applied`: a client that asked
    /// several servers takes it from any whose state covers its own commits (see `as_of`).
    fn absent(&self, what: String, applied: u64) -> Status {
        self.refused_as_of(refuse(ErrorKind::NotFound, what), applied)
    }

    /// Refusal `s` of a read, marked as of `applied`; but if a snapshot install began since the
    /// read passed `check_member`, the read may have met tables being emptied: it is refused
    /// as unavailable instead (the client asks another server).
    fn refused_as_of(&self, s: Status, applied: u64) -> Status {
        self.0.unless_installing(as_of(s, applied))
    }

    /// An attribute reply. `applied_index` must be read before the object: the object is then
    /// at least that fresh, which is what mounts rely on to order it against change events.
    fn reply(&self, o: &ObjectRec, applied_index: u64) -> Result<Response<pb::AttrReply>, Status> {
        let tickets = self.0.ticket_maker()?;
        Ok(Response::new(pb::AttrReply {
            attr: Some(shown(o, &tickets)),
            applied_index,
        }))
    }
}

/// Attributes as a reader sees them: with a read ticket for a file's content.
fn shown(o: &ObjectRec, tickets: &TicketMaker) -> pb::Attr {
    let mut a = convert::attr(o);
    if let Some(h) = &o.hash {
        a.read_ticket = tickets.ticket(h);
    }
    a
}

#[tonic::async_trait]
impl pb::meta_server::Meta for MetaService {
    async fn lookup(&self, req: Request<pb::LookupRequest>) -> Result<Response<pb::AttrReply>, Status> {
        self.0.check_member()?;
        let caller = Caller::of(&self.0, &req);
        let r = req.into_inner();
        validate_name(&r.name).map_err(bad_name)?;
        self.0.check_read_ino(&caller, r.parent)?;
        let applied_index = self.0.applied_index();
        let ino = self
            .0
            .tables()
            .dirent(r.parent, &r.name)
            .map_err(internal)?
            .ok_or_else(|| self.absent(format!("{} not found", r.name), applied_index))?;
        self.reply(&self.object(ino, applied_index)?, applied_index)
    }

    async fn get_attr(&self, req: Request<pb::GetAttrRequest>) -> Result<Response<pb::AttrReply>, Status> {
        self.0.check_member()?;
        let caller = Caller::of(&self.0, &req);
        let ino = req.get_ref().ino;
        self.0.check_read_ino(&caller, ino)?;
        let applied_index = self.0.applied_index();
        self.reply(&self.object(ino, applied_index)?, applied_index)
    }

    async fn resolve(&self, req: Request<pb::ResolveRequest>) -> Result<Response<pb::AttrReply>, Status> {
        self.0.check_member()?;
        let caller = Caller::of(&self.0, &req);
        let r = req.into_inner();
        let applied_index = self.0.applied_index();
        let t = self.0.tables();
        let vol = t.volume(&r.volume).map_err(internal)?.ok_or_else(|| {
            self.refused_as_of(
                refuse(ErrorKind::NoVolume, format!("no volume {}", r.volume)),
                applied_index,
            )
        })?;
        self.0.check_read(&caller, &vol)?;
        let mut cur = codafs_common::make_ino(vol.id, VOLUME_ROOT_INODE);
        for part in split_path(&r.path).map_err(bad_name)? {
            cur = t
                .dirent(cur, part)
                .map_err(internal)?
                .ok_or_else(|| self.absent(format!("{} not found", r.path), applied_index))?;
        }
        self.reply(&self.object(cur, applied_index)?, applied_index)
    }

    async fn read_dir(&self, req: Request<pb::ReadDirRequest>) -> Result<Response<pb::ReadDirReply>, Status> {
        self.0.check_member()?;
        let caller = Caller::of(&self.0, &req);
        let charge = crate::reply_budget::of(&req);
        let r = req.into_inner();
        self.0.check_read_ino(&caller, r.ino)?;
        let limit = if r.limit == 0 {
            DEFAULT_READDIR_PAGE
        } else {
            r.limit.min(MAX_READDIR_PAGE)
        } as usize;
        // A page waits in memory until its caller reads it (see `crate::reply_budget`): its bytes
        // are taken if there is room now; otherwise the page is dropped, room waited for, and
        // the page read again (never held uncharged while waiting).
        let reply = self.dir_page(r.ino, &r.after, limit)?;
        let len = prost::Message::encoded_len(&reply) as u64;
        if charge.try_take(len) {
            return Ok(Response::new(reply));
        }
        drop(reply);
        // With a margin: the page may have grown meanwhile.
        let taken = charge.take(len + len / 8 + 4096).await?;
        let reply = self.dir_page(r.ino, &r.after, limit)?;
        charge.settle(taken, prost::Message::encoded_len(&reply) as u64)?;
        Ok(Response::new(reply))
    }

    async fn volume_stamps(
        &self,
        req: Request<pb::VolumeStampsRequest>,
    ) -> Result<Response<pb::VolumeStampsReply>, Status> {
        self.0.check_member()?;
        let caller = Caller::of(&self.0, &req);
        let t = self.0.tables();
        let mut stamps = Vec::new();
        if req.get_ref().volumes.len() > MAX_STAMPS {
            return Err(refuse(
                ErrorKind::Invalid,
                format!(
                    "{} volumes asked at once; the limit is {MAX_STAMPS}",
                    req.get_ref().volumes.len()
                ),
            ));
        }
        let names: Vec<String> = if req.get_ref().volumes.is_empty() {
            // "Every volume": those the caller may read, so private names are not listed.
            t.volumes()
                .map_err(internal)?
                .into_iter()
                .filter(|v| self.0.may_read(&caller, v))
                .map(|v| v.name)
                .collect()
        } else {
            req.into_inner().volumes
        };
        for name in names {
            // A volume the caller may not read is answered as absent: stamps never reveal it.
            let v = t
                .volume(&name)
                .map_err(internal)?
                .filter(|v| self.0.may_read(&caller, v));
            stamps.push(pb::VolumeStamp {
                version: v.as_ref().map_or(0, |v| v.version),
                exists: v.is_some(),
                volume: name,
            });
        }
        // The list (or an absent volume) may have been read from tables being emptied.
        self.0.check_installing()?;
        Ok(Response::new(pb::VolumeStampsReply {
            stamps,
            applied_index: self.0.applied_index(),
        }))
    }

    type SubscribeStream = Pin<Box<dyn Stream<Item = Result<pb::ChangeEvent, Status>> + Send>>;

    async fn subscribe(&self, req: Request<pb::SubscribeRequest>) -> Result<Response<Self::SubscribeStream>, Status> {
        self.0.check_member()?;
        let caller = Caller::of(&self.0, &req);
        let peer = req.remote_addr();
        let r = req.into_inner();
        let vol = self.0.volume_named(&r.volume)?;
        self.0.check_read(&caller, &vol)?;
        let listed = self
            .0
            .subscribers
            .register(&vol.name, peer)
            .map_err(|e| refuse(ErrorKind::Busy, e.to_string()))?;
        // The right is checked again whenever settings or accounts change, and when the token
        // expires: a volume made private, or a revoked reader, ends the stream. So does this
        // server's removal from the cluster (no change comes to it any more).
        let node = self.0.clone();
        let recheck = move || {
            node.check_member()?;
            node.volume_named(&vol.name).and_then(|v| node.check_read(&caller, &v))
        };
        let ticks = codafs_proto::ticks::interval(r.tick_ms);
        let stream = changes::subscribe(
            &self.0.tasks,
            self.0.applied.clone(),
            changes::Want {
                volume: r.volume,
                from: r.from_version,
                ticks,
            },
            Box::new(recheck),
            listed,
        )?;
        let mut reply = Response::new(Box::pin(stream) as Self::SubscribeStream);
        if let Some(every) = ticks {
            if let Ok(v) = every.as_millis().to_string().parse() {
                reply.metadata_mut().insert(codafs_proto::ticks::HEADER, v);
            }
        }
        Ok(reply)
    }
}
