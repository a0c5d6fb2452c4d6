//! Where the core's types meet protobuf: `GrpcRemote` converts every request and answer here,
//! and the metadata cache encodes attributes with the wire message (its on-disk format).
use codafs_common::Hash;
use codafs_proto::pb;

use super::types::{Attr, ChangeEvent, Committed, Op, VolumeStamp};
use super::NodeKind;

/// A node kind from its wire code (unknown codes read as files, like the servers' default).
pub(crate) fn kind_of(code: i32) -> NodeKind {
    match pb::ObjectKind::try_from(code) {
        Ok(pb::ObjectKind::Directory) => NodeKind::Dir,
        Ok(pb::ObjectKind::Symlink) => NodeKind::Symlink,
        Ok(pb::ObjectKind::Fifo) => NodeKind::Fifo,
        Ok(pb::ObjectKind::Socket) => NodeKind::Socket,
        Ok(pb::ObjectKind::CharDevice) => NodeKind::CharDevice,
        Ok(pb::ObjectKind::BlockDevice) => NodeKind::BlockDevice,
        _ => NodeKind::File,
    }
}

/// A node kind's wire code.
pub(crate) fn kind_code(kind: NodeKind) -> i32 {
    let k = match kind {
        NodeKind::File => pb::ObjectKind::File,
        NodeKind::Dir => pb::ObjectKind::Directory,
        NodeKind::Symlink => pb::ObjectKind::Symlink,
        NodeKind::Fifo => pb::ObjectKind::Fifo,
        NodeKind::Socket => pb::ObjectKind::Socket,
        NodeKind::CharDevice => pb::ObjectKind::CharDevice,
        NodeKind::BlockDevice => pb::ObjectKind::BlockDevice,
    };
    k as i32
}

fn hash_bytes(h: Option<Hash>) -> bytes::Bytes {
    h.map_or_else(bytes::Bytes::new, |h| bytes::Bytes::copy_from_slice(&h.0))
}

impl From<pb::Attr> for Attr {
    fn from(a: pb::Attr) -> Self {
        Attr {
            ino: a.ino,
            generation: a.generation,
            kind: kind_of(a.kind),
            size: a.size,
            mode: a.mode,
            uid: a.uid,
            gid: a.gid,
            mtime_ns: a.mtime_ns,
            ctime_ns: a.ctime_ns,
            atime_ns: a.atime_ns,
            nlink: a.nlink,
            // Only files carry a hash; a malformed one is no content (reads then fail cleanly).
            hash: Hash::from_slice(&a.hash).ok(),
            symlink_target: a.symlink_target,
            version: a.version,
            parent: a.parent,
            read_ticket: a.read_ticket,
            rdev: a.rdev,
        }
    }
}

impl From<&Attr> for pb::Attr {
    fn from(a: &Attr) -> Self {
        pb::Attr {
            ino: a.ino,
            generation: a.generation,
            kind: kind_code(a.kind),
            size: a.size,
            mode: a.mode,
            uid: a.uid,
            gid: a.gid,
            mtime_ns: a.mtime_ns,
            ctime_ns: a.ctime_ns,
            nlink: a.nlink,
            hash: hash_bytes(a.hash),
            symlink_target: a.symlink_target.clone(),
            version: a.version,
            parent: a.parent,
            atime_ns: a.atime_ns,
            read_ticket: a.read_ticket.clone(),
            rdev: a.rdev,
        }
    }
}

impl From<pb::ChangeEvent> for ChangeEvent {
    fn from(e: pb::ChangeEvent) -> Self {
        ChangeEvent {
            version: e.version,
            inos: e.inos,
            dirs: e.dirs,
            history_gone: e.history_gone,
            names: e.names_complete.then(|| {
                e.names
                    .into_iter()
                    .map(|n| (n.dir, n.name, (n.ino != 0).then_some((n.ino, n.kind))))
                    .collect()
            }),
            removed: if e.names_complete { e.removed } else { Vec::new() },
            perms: e.perms,
        }
    }
}

impl From<pb::VolumeStamp> for VolumeStamp {
    fn from(s: pb::VolumeStamp) -> Self {
        VolumeStamp {
            volume: s.volume,
            version: s.version,
            exists: s.exists,
        }
    }
}

impl From<pb::CommitReply> for Committed {
    fn from(r: pb::CommitReply) -> Self {
        Committed {
            version: r.version,
            created: r.created,
            prior: r.prior,
        }
    }
}

fn node(ino: u64) -> Option<pb::NodeRef> {
    Some(pb::NodeRef {
        target: Some(pb::node_ref::Target::Ino(ino)),
    })
}

/// One operation as the servers take it. Only write-back changes carry expected versions (a
/// content change, a remove, a rename's guard); every other write applies to whatever is
/// current, like a local filesystem's.
fn op(o: Op) -> pb::Op {
    use pb::op::Op as W;
    let mut expect_version = None;
    let o = match o {
        Op::Create {
            ino,
            parent,
            name,
            kind,
            mode,
            hash,
            symlink_target,
            rdev,
            uid,
            gid,
            size,
            mtime_ns,
        } => W::Create(pb::CreateOp {
            parent: node(parent),
            name,
            kind: kind_code(kind),
            mode,
            hash: hash_bytes(hash),
            size,
            symlink_target,
            replace: false,
            uid,
            gid,
            mtime_ns,
            rdev,
            ino,
        }),
        Op::SetContent {
            expect,
            ino,
            hash,
            size,
            mtime_ns,
        } => {
            expect_version = expect;
            W::SetContent(pb::SetContentOp {
                node: node(ino),
                hash: hash_bytes(Some(hash)),
                size,
                mtime_ns,
            })
        }
        Op::SetAttr {
            ino,
            mode,
            uid,
            gid,
            mtime_ns,
            atime_ns,
        } => W::SetAttr(pb::SetAttrOp {
            node: node(ino),
            mode,
            uid,
            gid,
            mtime_ns,
            atime_ns,
        }),
        Op::Remove {
            parent, name, expect, ..
        } => {
            expect_version = expect;
            W::Remove(pb::RemoveOp {
                parent: node(parent),
                name,
                recursive: false,
            })
        }
        Op::Rename {
            from_parent,
            from_name,
            to_parent,
            to_name,
            ..
        } => W::Rename(pb::RenameOp {
            from_parent: node(from_parent),
            from_name,
            to_parent: node(to_parent),
            to_name,
        }),
        Op::Link { ino, parent, name, .. } => W::Link(pb::LinkOp {
            node: node(ino),
            parent: node(parent),
            name,
        }),
        Op::Reserve { count } => W::Reserve(pb::ReserveOp { count }),
        Op::ExpectNode { ino, version } => {
            expect_version = Some(version);
            W::SetAttr(pb::SetAttrOp {
                node: node(ino),
                ..Default::default()
            })
        }
        Op::Expect { parent, name, version } => {
            expect_version = Some(version);
            W::Expect(pb::ExpectOp {
                parent: node(parent),
                name,
            })
        }
    };
    pb::Op {
        expect_version,
        op: Some(o),
    }
}

/// A commit of `ops` on `volume` with request id `request` (a retry after a lost reply, or a
/// replay, is applied at most once).
pub(crate) fn commit_request(volume: &str, ops: Vec<Op>, request: super::remote::RequestId) -> pb::CommitRequest {
    let mut req = crate::ops::commit(volume, ops.into_iter().map(op).collect());
    req.request_id = bytes::Bytes::copy_from_slice(&request);
    req
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_survive_the_cache_encoding() {
        let a = Attr {
            ino: 7,
            generation: 2,
            kind: NodeKind::Symlink,
            size: 3,
            mode: 0o777,
            uid: 1,
            gid: 2,
            mtime_ns: 4,
            ctime_ns: 5,
            atime_ns: 6,
            nlink: 1,
            hash: Some(Hash::of(b"x")),
            symlink_target: "t".into(),
            version: 9,
            parent: 1,
            read_ticket: bytes::Bytes::from_static(b"ticket"),
            rdev: 0,
        };
        let dev = Attr {
            kind: NodeKind::CharDevice,
            hash: None,
            rdev: 0x0103,
            ..a.clone()
        };
        assert_eq!(Attr::from(pb::Attr::from(&dev)), dev);
        assert_eq!(Attr::from(pb::Attr::from(&a)), a);
        let dir = Attr {
            kind: NodeKind::Dir,
            hash: None,
            ..a
        };
        assert_eq!(Attr::from(pb::Attr::from(&dir)), dir);
    }

    #[test]
    fn every_operation_names_its_nodes_by_id() {
        let req = commit_request(
            "www",
            vec![
                Op::Remove {
                    parent: 5,
                    name: "a".into(),
                    seen: None,
                    expect: None,
                },
                Op::Link {
                    ino: 6,
                    parent: 5,
                    name: "b".into(),
                    kind: NodeKind::File,
                },
            ],
            [7; 16],
        );
        assert_eq!(req.volume, "www");
        assert_eq!(
            &req.request_id[..],
            &[7; 16],
            "the caller's request id, for retries and replays"
        );
        let Some(pb::op::Op::Link(l)) = &req.ops[1].op else {
            panic!("{:?}", req.ops[1]);
        };
        assert_eq!((l.node.clone(), l.parent.clone()), (node(6), node(5)));
        assert!(req.ops.iter().all(|o| o.expect_version.is_none()));
    }
}
