//! The core's own vocabulary: attributes, change events and commit operations as the filesystem
//! logic sees them. Protobuf meets these types only in `wire.rs` (for `GrpcRemote` and the
//! metadata cache's on-disk encoding), so the core and its model tests never build gRPC messages.
use codafs_common::Hash;

use super::NodeKind;

/// A node's attributes as a server stored them (before the mount decides what to show).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub generation: u64,
    pub kind: NodeKind,
    pub size: u64,
    /// Permission bits only (07777).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    /// 0 when the server never stored one.
    pub atime_ns: i64,
    pub nlink: u32,
    /// The content's hash (files; `None` for directories and symlinks).
    pub hash: Option<Hash>,
    pub symlink_target: String,
    /// Log index of the last change to this node.
    pub version: u64,
    /// The parent directory (a volume root names itself).
    pub parent: u64,
    /// Files: the short-lived ticket that lets this mount fetch the content from any server.
    pub read_ticket: bytes::Bytes,
    /// Device number (character and block devices).
    pub rdev: u64,
}

/// One committed change of a volume, as its change stream reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChangeEvent {
    /// The change's log index: the volume's new version.
    pub version: u64,
    /// Nodes whose attributes or content changed, or that vanished.
    pub inos: Vec<u64>,
    /// Directories whose entries changed.
    pub dirs: Vec<u64>,
    /// The server no longer holds the history asked for: revalidate the whole volume.
    pub history_gone: bool,
    /// Every name in `dirs` the change added, pointed elsewhere or removed: (directory, name,
    /// new node and kind code; `None`: removed). `None`: not sent (an older server, or too many
    /// names): the changed directories are read again.
    pub names: Option<Vec<crate::cache::meta::DirPatch>>,
    /// Nodes the change deleted (sent with `names`).
    pub removed: Vec<u64>,
    /// Nodes whose mode, owner or group the change set (empty from older servers).
    pub perms: Vec<u64>,
}

/// A volume's current version, as one batched stamp check reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeStamp {
    pub volume: String,
    pub version: u64,
    pub exists: bool,
}

/// The nodes whose mode, owner or group `ops` set (their older attributes must not be served,
/// not even while no server answers).
pub fn perms_set(ops: &[Op]) -> Vec<u64> {
    ops.iter()
        .filter_map(|op| match op {
            Op::SetAttr {
                ino, mode, uid, gid, ..
            } if mode.is_some() || uid.is_some() || gid.is_some() => Some(*ino),
            _ => None,
        })
        .collect()
}

/// One namespace operation of a commit, by node id (also a record of the write-back log, so
/// its encoding is part of that log's format).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Op {
    /// A new file (content `hash` of `size` bytes), directory, symlink or special node under
    /// `parent`; `ino` names it with a reserved node id (write-back), `None` lets the server.
    Create {
        ino: Option<u64>,
        parent: u64,
        name: String,
        kind: NodeKind,
        mode: u32,
        hash: Option<Hash>,
        symlink_target: String,
        /// Device number (character and block devices).
        rdev: u64,
        uid: u32,
        gid: u32,
        size: u64,
        /// 0 = commit time.
        mtime_ns: i64,
    },
    /// New content for a file (`mtime_ns` 0 = commit time); with `expect`, only if the file is
    /// still at that version (otherwise the whole commit fails with a conflict).
    SetContent {
        expect: Option<u64>,
        ino: u64,
        hash: Hash,
        size: u64,
        mtime_ns: i64,
    },
    /// chmod, chown and utimens: only the given fields change.
    SetAttr {
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        mtime_ns: Option<i64>,
        atime_ns: Option<i64>,
    },
    /// unlink or rmdir (a directory must be empty). `seen`: the node a write-back mount removed
    /// (logged, for its overlay); `expect`: only if that node is still at this version.
    Remove {
        parent: u64,
        name: String,
        seen: Option<Seen>,
        expect: Option<u64>,
    },
    /// Rename within a volume, replacing a non-directory or empty directory at the target.
    /// `seen` and `replaces` (write-back) are the moved node and the node the target name held
    /// when the rename was logged; the servers see neither (a logged rename is guarded by an
    /// [`Op::Expect`] on its target instead).
    Rename {
        from_parent: u64,
        from_name: String,
        to_parent: u64,
        to_name: String,
        seen: Option<Seen>,
        replaces: Option<Seen>,
    },
    /// Another name for a file or symlink.
    Link {
        ino: u64,
        parent: u64,
        name: String,
        kind: NodeKind,
    },
    /// Sets `count` node ids aside for this mount's new nodes; the reply's `created` holds the
    /// first.
    Reserve { count: u32 },
    /// A precondition that changes nothing: the node named `name` in `parent` is at `version`
    /// (0: no node has that name), or the commit fails with a conflict.
    Expect { parent: u64, name: String, version: u64 },
    /// A precondition by node id: node `ino` is at `version`, or the commit fails with a
    /// conflict. Sent as an attribute change of no attribute (which only moves the node's
    /// version and ctime, as the change it guards does anyway); never logged. A batch puts
    /// it in front of a chmod, link or rename that carries no check of its own, when a later
    /// change of the same node in the batch does (see `write/batch.rs`).
    ExpectNode { ino: u64, version: u64 },
}

/// A node as a write-back mount saw it when it logged a change of its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Seen {
    pub ino: u64,
    pub version: u64,
    pub kind: NodeKind,
}

/// What a commit did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Committed {
    /// The volume's new version (the commit's log index).
    pub version: u64,
    /// Node ids of created nodes, in operation order (0 for other operations).
    pub created: Vec<u64>,
    /// Per operation, the version the node it changed had just before it (0: not told; empty
    /// from servers that do not tell, and for a repeated request).
    pub prior: Vec<u64>,
}
