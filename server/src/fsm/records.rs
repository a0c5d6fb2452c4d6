//! Records of the replicated state and the commands that change it. Everything here is
//! serialized into the Raft log and snapshots (bincode), so fields are only ever appended.
use codafs_common::{Hash, VolumeId};
use serde::{Deserialize, Serialize};

/// Kind of a namespace object. Variants are only appended (the log stores them by position);
/// the last four are metadata-only nodes, with the device number in the variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDevice(u64),
    BlockDevice(u64),
}

impl Kind {
    /// A FIFO, socket or device node: no content, nothing to replicate.
    pub fn is_special(self) -> bool {
        matches!(
            self,
            Kind::Fifo | Kind::Socket | Kind::CharDevice(_) | Kind::BlockDevice(_)
        )
    }
}

/// One file, directory, symlink or special node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectRec {
    pub ino: u64,
    pub generation: u64,
    pub kind: Kind,
    pub size: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub nlink: u32,
    pub hash: Option<Hash>,
    pub symlink: String,
    /// Log index of the last change to this object.
    pub version: u64,
    /// Parent directory (a volume root names itself). For a file with several hard links, the
    /// directory of the first name; only directories' parents are relied on (cycle checks).
    pub parent: u64,
    /// Access time as last set explicitly (utimensat); reads never update it.
    pub atime_ns: i64,
}

/// A volume: a named tree with an owner, quota and version stamp.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRec {
    pub id: VolumeId,
    pub name: String,
    pub owner: String,
    pub writers: Vec<String>,
    pub quota_bytes: u64,
    pub quota_files: u64,
    pub write_quorum: u32,
    pub public_read: bool,
    /// Log index of the volume's last committed change.
    pub version: u64,
    pub used_bytes: u64,
    pub used_files: u64,
    pub next_inode: u64,
    pub created_ns: i64,
    /// Change history is kept for versions after this one; older subscribers must revalidate.
    pub history_floor: u64,
    /// Number of change records currently kept.
    pub change_count: u64,
}

/// Cluster-wide settings created at bootstrap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterRec {
    pub cluster_id: String,
    /// Token signing keys by key id; the newest signs, all verify (rotation).
    pub keys: Vec<(u32, [u8; 32])>,
    pub next_volume_id: VolumeId,
}

impl ClusterRec {
    /// The key new tokens are signed with.
    pub fn current_key(&self) -> Option<(u32, [u8; 32])> {
        self.keys.iter().max_by_key(|(id, _)| *id).copied()
    }

    /// Key for a key id.
    pub fn key(&self, id: u32) -> Option<[u8; 32]> {
        self.keys.iter().find(|(k, _)| *k == id).map(|(_, v)| *v)
    }
}

/// An account. Password hashes arrive with full authentication; admin tokens work without them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountRec {
    pub name: String,
    pub admin: bool,
    pub password_hash: String,
    pub created_ns: i64,
}

/// What one committed entry changed in one volume: the change stream's unit.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ChangeRec {
    pub inos: Vec<u64>,
    pub dirs: Vec<u64>,
    /// Every name in `dirs` the change added, pointed elsewhere or removed, so mounts patch
    /// their listings instead of reading them again. `None`: not kept (more than
    /// `MAX_CHANGE_NAMES`, or a record written before names were kept).
    pub names: Option<Vec<NameRec>>,
    /// Nodes the change deleted (kept with `names`, empty without).
    pub removed: Vec<u64>,
    /// Nodes whose mode, owner or group the change set.
    pub perms: Vec<u64>,
}

/// One name a change touched: `name` in `dir` now leads to `target` (`None`: removed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameRec {
    pub dir: u64,
    pub name: String,
    pub target: Option<(u64, Kind)>,
}

/// A change record as written before names were kept (bincode has no optional trailing
/// fields, so such a record decodes as this and is converted).
#[derive(Deserialize)]
struct ChangeRecV1 {
    inos: Vec<u64>,
    dirs: Vec<u64>,
}

/// A change record as written before permission changes were kept.
#[derive(Deserialize)]
struct ChangeRecV2 {
    inos: Vec<u64>,
    dirs: Vec<u64>,
    names: Option<Vec<NameRec>>,
    removed: Vec<u64>,
}

impl ChangeRec {
    /// Decodes a stored record of any layout. The newest is tried first: an older, shorter
    /// record fails it (it ends before the newer fields), while reading a newer record as an
    /// older one would succeed and drop its newer fields. An older record tells no permission
    /// changes (mounts then act as before they were sent).
    pub fn decode(b: &[u8]) -> Result<Self, bincode::Error> {
        bincode::deserialize::<ChangeRec>(b).or_else(|e| {
            if let Ok(old) = bincode::deserialize::<ChangeRecV2>(b) {
                return Ok(ChangeRec {
                    inos: old.inos,
                    dirs: old.dirs,
                    names: old.names,
                    removed: old.removed,
                    perms: Vec::new(),
                });
            }
            match bincode::deserialize::<ChangeRecV1>(b) {
                Ok(old) => Ok(ChangeRec {
                    inos: old.inos,
                    dirs: old.dirs,
                    names: None,
                    removed: Vec::new(),
                    perms: Vec::new(),
                }),
                Err(_) => Err(e),
            }
        })
    }
}

/// Addresses an object by node id or by volume-relative path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeRef {
    Ino(u64),
    Path(String),
}

/// One namespace operation of a commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpKind {
    Create {
        parent: NodeRef,
        name: String,
        kind: Kind,
        mode: u32,
        hash: Option<Hash>,
        size: u64,
        symlink: String,
        replace: bool,
        uid: u32,
        gid: u32,
        mtime_ns: i64,
    },
    SetContent {
        node: NodeRef,
        hash: Hash,
        size: u64,
        mtime_ns: i64,
    },
    SetAttr {
        node: NodeRef,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        mtime_ns: Option<i64>,
        atime_ns: Option<i64>,
    },
    Remove {
        parent: NodeRef,
        name: String,
        recursive: bool,
    },
    Rename {
        from_parent: NodeRef,
        from_name: String,
        to_parent: NodeRef,
        to_name: String,
    },
    /// Another name for an existing non-directory.
    Link {
        node: NodeRef,
        parent: NodeRef,
        name: String,
    },
    // Appended variants keep the encoding of the ones above (log entries, snapshots).
    /// Sets `count` node ids of the volume aside for one client, which names its new nodes
    /// with them before the servers hear of them (write-back mounts). The commit's `created`
    /// answer holds the first reserved id.
    Reserve { count: u32 },
    /// `create` (a [`OpKind::Create`] without `replace`) with the node id `ino`, which an earlier
    /// `Reserve` set aside and no node has.
    CreateAt { ino: u64, create: Box<OpKind> },
    /// A precondition that changes nothing: the node at `parent`/`name` is at the operation's
    /// `expect_version` (0: the name is free). Write-back mounts guard logged renames with it.
    Expect { parent: NodeRef, name: String },
}

/// An operation plus the version its target is expected to have.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Op {
    pub expect_version: Option<u64>,
    pub kind: OpKind,
}

impl Op {
    /// Content hashes this operation makes the volume reference.
    pub fn referenced_hash(&self) -> Option<Hash> {
        self.referenced_blob().map(|(h, _)| h)
    }

    /// Content hash and declared size this operation makes the volume reference.
    pub fn referenced_blob(&self) -> Option<(Hash, u64)> {
        match &self.kind {
            OpKind::Create {
                hash,
                size,
                kind: Kind::File,
                ..
            } => hash.map(|h| (h, *size)),
            OpKind::SetContent { hash, size, .. } => Some((*hash, *size)),
            OpKind::CreateAt { create, .. } => Op {
                expect_version: None,
                kind: (**create).clone(),
            }
            .referenced_blob(),
            _ => None,
        }
    }
}

/// Settings of a new volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeSpec {
    pub name: String,
    pub owner: String,
    pub quota_bytes: u64,
    pub quota_files: u64,
    pub write_quorum: u32,
    pub public_read: bool,
}

/// Changes to a volume's settings (`codafs volume set`); `None` leaves a setting as it is.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct VolumeChanges {
    pub owner: Option<String>,
    pub add_writers: Vec<String>,
    pub remove_writers: Vec<String>,
    pub quota_bytes: Option<u64>,
    pub quota_files: Option<u64>,
    pub write_quorum: Option<u32>,
    pub public_read: Option<bool>,
}

/// A client-chosen random id of one commit request.
pub type RequestId = [u8; 16];

/// What the state machine remembers of an applied commit request, to answer its duplicates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestRec {
    /// Log index of the entry that applied it (also the volume version it produced).
    pub index: u64,
    pub created: Vec<u64>,
}

/// Who proposed a command, as established from a verified token by the server that accepted it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    pub user: String,
    pub admin: bool,
}

/// The Raft log's application payload: one command per entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// First entry of a cluster: its identity, signing key and the admin account.
    Bootstrap {
        cluster_id: String,
        key: [u8; 32],
        admin: AccountRec,
    },
    CreateVolume {
        actor: Actor,
        spec: VolumeSpec,
        now_ns: i64,
    },
    /// An atomic batch of namespace operations on one volume. `request` is the client's id for
    /// this commit: a commit whose id was already applied (a retry after a lost reply, or a
    /// forward repeated by a server) is answered with the first outcome and applied once.
    Commit {
        actor: Actor,
        volume: String,
        ops: Vec<Op>,
        expect_volume_version: Option<u64>,
        now_ns: i64,
        request: Option<RequestId>,
    },
    /// Creates an account (`create`) or replaces an existing one's password and role.
    PutAccount {
        actor: Actor,
        account: AccountRec,
        create: bool,
    },
    RemoveAccount {
        actor: Actor,
        name: String,
    },
    SetVolume {
        actor: Actor,
        name: String,
        changes: VolumeChanges,
    },
    /// Adds a signing key (it signs from now on; older keys still verify until retired), or
    /// retires the key with id `retire` (tokens it signed stop working).
    RotateKey {
        actor: Actor,
        new_key: Option<[u8; 32]>,
        retire: Option<u32>,
    },
    /// Ends every token of account `name` issued so far (`codafs user revoke`): its token
    /// generation becomes this entry's log index. Allowed to admins and to the account itself.
    RevokeTokens {
        actor: Actor,
        name: String,
    },
    /// Records a new join token (by the hash of its secret; the secret itself is never logged)
    /// that is valid until `expires_ns` for one server to join.
    IssueJoinToken {
        actor: Actor,
        secret_hash: [u8; 32],
        expires_ns: i64,
        now_ns: i64,
    },
    /// Spends a join token on server `node_id`: refused when the token is unknown, expired, or
    /// already used by another server. Repeating it for the same server is accepted (a retried
    /// join). The token is the credential, so there is no actor.
    UseJoinToken {
        secret_hash: [u8; 32],
        node_id: u64,
        now_ns: i64,
    },
    /// Remembers that server `node_id` was removed: it can never join again under that id.
    ForgetServer {
        actor: Actor,
        node_id: u64,
        now_ns: i64,
    },
    /// Deletes volume `name` and everything in it (admin only). Its contents lose their
    /// references, so GC collects them; its id is never given to another volume.
    DeleteVolume {
        actor: Actor,
        name: String,
        now_ns: i64,
    },
}

/// The proposer of a command (`None` for those without one), by shared or mutable reference.
macro_rules! actor_of {
    ($cmd:expr) => {
        match $cmd {
            Command::Bootstrap { .. } | Command::UseJoinToken { .. } => None,
            Command::CreateVolume { actor, .. }
            | Command::Commit { actor, .. }
            | Command::PutAccount { actor, .. }
            | Command::RemoveAccount { actor, .. }
            | Command::SetVolume { actor, .. }
            | Command::RotateKey { actor, .. }
            | Command::RevokeTokens { actor, .. }
            | Command::IssueJoinToken { actor, .. }
            | Command::ForgetServer { actor, .. }
            | Command::DeleteVolume { actor, .. } => Some(actor),
        }
    };
}

impl Command {
    /// The proposer, for every command that has one.
    pub fn actor(&self) -> Option<&Actor> {
        actor_of!(self)
    }

    /// The proposer, to correct its role at apply time.
    pub fn actor_mut(&mut self) -> Option<&mut Actor> {
        actor_of!(self)
    }
}

/// A join token, by the hash of its secret (table `pki`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinTokenRec {
    pub created_ns: i64,
    pub created_by: String,
    pub expires_ns: i64,
    /// The server that joined with it; a used token is refused to every other server.
    pub used_by: Option<u64>,
    pub used_ns: i64,
}

/// A server removed from the cluster (table `pki`): its node id may not join again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemovedServerRec {
    pub removed_ns: i64,
    pub removed_by: String,
}

/// Deterministic refusals: every replica reaches the same one, and a refused command changes
/// nothing but the applied index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ApplyError {
    #[error("no such file or directory: {0}")]
    NotFound(String),
    #[error("no such account: {0}")]
    NoSuchAccount(String),
    #[error("no such signing key: {0}")]
    NoSuchKey(u32),
    #[error("already exists: {0}")]
    Exists(String),
    #[error("not a directory: {0}")]
    NotDir(String),
    #[error("is a directory: {0}")]
    IsDir(String),
    #[error("directory not empty: {0}")]
    NotEmpty(String),
    #[error("conflict on {what}: expected version {expected}, found {actual}")]
    Conflict { what: String, expected: u64, actual: u64 },
    #[error("quota exceeded: {what} would be {would_be}, limit {limit} (over by {})", would_be - limit)]
    Quota { what: String, limit: u64, would_be: u64 },
    #[error("invalid name: {0}")]
    InvalidName(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("permission denied: {0}")]
    Denied(String),
    #[error("no such volume: {0}")]
    NoSuchVolume(String),
    #[error("cluster not bootstrapped")]
    NotBootstrapped,
    #[error("invalid name: {0}")]
    NameTooLong(String),
}

impl From<codafs_common::names::NameError> for ApplyError {
    fn from(e: codafs_common::names::NameError) -> Self {
        match e {
            e @ codafs_common::names::NameError::TooLong(_) => ApplyError::NameTooLong(e.to_string()),
            e => ApplyError::InvalidName(e.to_string()),
        }
    }
}

/// Result of applying one command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Done,
    Volume(VolumeRec),
    /// `prior`: per operation, the version its node had just before it (see `CommitReply`);
    /// empty in the answer to a repeated request id (not remembered).
    Committed {
        version: u64,
        created: Vec<u64>,
        prior: Vec<u64>,
    },
}

/// What the state machine answers for one entry.
pub type Response = Result<Outcome, ApplyError>;
