//! Conversions between protocol messages and state-machine records.
use codafs_common::Hash;
use codafs_proto::pb;
use tonic::Status;

use super::{refuse, ErrorKind};
use crate::fsm::{Kind, NodeRef, ObjectRec, Op, OpKind, VolumeRec};

/// A node kind on the wire (a device's number travels separately, as `rdev`).
pub fn wire_kind(k: Kind) -> pb::ObjectKind {
    match k {
        Kind::File => pb::ObjectKind::File,
        Kind::Dir => pb::ObjectKind::Directory,
        Kind::Symlink => pb::ObjectKind::Symlink,
        Kind::Fifo => pb::ObjectKind::Fifo,
        Kind::Socket => pb::ObjectKind::Socket,
        Kind::CharDevice(_) => pb::ObjectKind::CharDevice,
        Kind::BlockDevice(_) => pb::ObjectKind::BlockDevice,
    }
}

pub fn attr(o: &ObjectRec) -> pb::Attr {
    pb::Attr {
        ino: o.ino,
        generation: o.generation,
        kind: wire_kind(o.kind) as i32,
        rdev: match o.kind {
            Kind::CharDevice(d) | Kind::BlockDevice(d) => d,
            _ => 0,
        },
        size: o.size,
        mode: o.mode,
        uid: o.uid,
        gid: o.gid,
        mtime_ns: o.mtime_ns,
        ctime_ns: o.ctime_ns,
        nlink: o.nlink,
        hash: o.hash.map(|h| bytes::Bytes::copy_from_slice(&h.0)).unwrap_or_default(),
        symlink_target: o.symlink.clone(),
        version: o.version,
        parent: o.parent,
        atime_ns: o.atime_ns,
        // Only replies to a reader carry a ticket (grpc::meta adds it).
        read_ticket: Default::default(),
    }
}

pub fn volume_info(v: &VolumeRec) -> pb::VolumeInfo {
    pb::VolumeInfo {
        id: v.id,
        name: v.name.clone(),
        owner: v.owner.clone(),
        quota_bytes: v.quota_bytes,
        quota_files: v.quota_files,
        write_quorum: v.write_quorum,
        public_read: v.public_read,
        version: v.version,
        used_bytes: v.used_bytes,
        used_files: v.used_files,
        root_ino: codafs_common::make_ino(v.id, codafs_common::ids::VOLUME_ROOT_INODE),
        created_ns: v.created_ns,
        writers: v.writers.clone(),
        // Filled by `GetVolume` from the answering server's live streams.
        subscribers: Vec::new(),
    }
}

pub fn hash(b: &[u8]) -> Result<Hash, Status> {
    Hash::from_slice(b).map_err(|e| refuse(ErrorKind::Invalid, e.to_string()))
}

fn node_ref(r: Option<pb::NodeRef>, what: &str) -> Result<NodeRef, Status> {
    match r.and_then(|r| r.target) {
        Some(pb::node_ref::Target::Ino(i)) => Ok(NodeRef::Ino(i)),
        Some(pb::node_ref::Target::Path(p)) => Ok(NodeRef::Path(p)),
        None => Err(refuse(ErrorKind::Invalid, format!("{what} is missing"))),
    }
}

fn kind(k: i32, rdev: u64) -> Result<Kind, Status> {
    match pb::ObjectKind::try_from(k) {
        Ok(pb::ObjectKind::File) => Ok(Kind::File),
        Ok(pb::ObjectKind::Directory) => Ok(Kind::Dir),
        Ok(pb::ObjectKind::Symlink) => Ok(Kind::Symlink),
        Ok(pb::ObjectKind::Fifo) => Ok(Kind::Fifo),
        Ok(pb::ObjectKind::Socket) => Ok(Kind::Socket),
        Ok(pb::ObjectKind::CharDevice) => Ok(Kind::CharDevice(rdev)),
        Ok(pb::ObjectKind::BlockDevice) => Ok(Kind::BlockDevice(rdev)),
        _ => Err(refuse(ErrorKind::Invalid, format!("unknown object kind {k}"))),
    }
}

/// Converts a protocol operation; malformed ones are refused before anything is proposed.
pub fn op(o: pb::Op) -> Result<Op, Status> {
    use pb::op::Op as P;
    let kind = match o.op.ok_or_else(|| refuse(ErrorKind::Invalid, "operation is empty"))? {
        P::Create(c) => {
            let k = kind(c.kind, c.rdev)?;
            let create = OpKind::Create {
                parent: node_ref(c.parent, "create.parent")?,
                name: c.name,
                kind: k,
                mode: c.mode,
                hash: if k == Kind::File { Some(hash(&c.hash)?) } else { None },
                size: c.size,
                symlink: c.symlink_target,
                replace: c.replace,
                uid: c.uid,
                gid: c.gid,
                mtime_ns: c.mtime_ns,
            };
            match c.ino {
                Some(ino) => OpKind::CreateAt {
                    ino,
                    create: Box::new(create),
                },
                None => create,
            }
        }
        P::Reserve(r) => OpKind::Reserve { count: r.count },
        P::Expect(e) => OpKind::Expect {
            parent: node_ref(e.parent, "expect.parent")?,
            name: e.name,
        },
        P::SetContent(c) => OpKind::SetContent {
            node: node_ref(c.node, "set_content.node")?,
            hash: hash(&c.hash)?,
            size: c.size,
            mtime_ns: c.mtime_ns,
        },
        P::SetAttr(c) => OpKind::SetAttr {
            node: node_ref(c.node, "set_attr.node")?,
            mode: c.mode,
            uid: c.uid,
            gid: c.gid,
            mtime_ns: c.mtime_ns,
            atime_ns: c.atime_ns,
        },
        P::Remove(c) => OpKind::Remove {
            parent: node_ref(c.parent, "remove.parent")?,
            name: c.name,
            recursive: c.recursive,
        },
        P::Rename(c) => OpKind::Rename {
            from_parent: node_ref(c.from_parent, "rename.from_parent")?,
            from_name: c.from_name,
            to_parent: node_ref(c.to_parent, "rename.to_parent")?,
            to_name: c.to_name,
        },
        P::Link(c) => OpKind::Link {
            node: node_ref(c.node, "link.node")?,
            parent: node_ref(c.parent, "link.parent")?,
            name: c.name,
        },
    };
    Ok(Op {
        expect_version: o.expect_version,
        kind,
    })
}
