//! Who may read and store what. Every read RPC asks here, so the rules live in one place:
//!
//! - A **public** volume is readable by anyone, token or not (web nodes read this way).
//! - A **private** volume is readable by its owner, its writers and admins, proven by a token.
//! - A **blob** is served to whoever shows a right to it: a read ticket for its hash (handed out
//!   with the attributes of a readable file), a readable file whose content it is, or a server
//!   certificate of a current member (repair and replication).
//! - A **chunk** of a large file is read by its own hash together with the file's manifest hash:
//!   the ticket or file then shows the right to the manifest, and the manifest must list the
//!   chunk. A chunk shared by several files is readable through any of them.
//! - **Storing** blobs needs a token whose account may write some volume, or a member's
//!   certificate; bytes stored but not yet referenced count against the uploader's quota
//!   (`crate::pending`).
//!
//! Tokens are only verified when a rule needs them, so a stale credential does not break reads
//! of public volumes.
use codafs_common::token::{Claims, Role};
use codafs_common::{split_ino, ticket, Hash};
use tonic::Status;

use crate::fsm::{ClusterRec, StateView, VolumeRec};
use crate::grpc::{internal, refuse, status, ErrorKind};
use crate::node::{Node, NodeError};

/// Who is asking, as far as the request shows it.
pub struct Caller {
    /// The `x-codafs-token` header, not yet verified.
    pub token: Option<String>,
    /// Presented a certificate of a current member of this cluster.
    pub peer: bool,
}

impl Caller {
    pub fn of<T>(node: &Node, req: &tonic::Request<T>) -> Self {
        Caller {
            token: crate::grpc::token_of(req),
            peer: crate::grpc::is_peer(node, req),
        }
    }
}

/// Whether an account (as its verified claims say) may read or write a volume.
pub fn may_write(claims: &Claims, vol: &VolumeRec) -> bool {
    claims.role == Role::Admin || vol.owner == claims.user || vol.writers.contains(&claims.user)
}

/// The refusal of a read of a private volume.
fn private(vol: &str, why: &str) -> Status {
    status(NodeError::Denied(format!(
        "volume {vol} is private: reading it needs a token of its owner, a writer or an admin ({why})"
    )))
}

impl Node {
    /// The volume holding node `ino`.
    pub fn volume_of_ino(&self, ino: u64) -> Result<VolumeRec, Status> {
        let (id, _) = split_ino(ino);
        self.tables()
            .volume_by_id(id)
            .map_err(internal)?
            .ok_or_else(|| refuse(ErrorKind::NotFound, format!("no object {ino:#x}")))
    }

    /// The volume named `name`.
    pub fn volume_named(&self, name: &str) -> Result<VolumeRec, Status> {
        self.tables()
            .volume(name)
            .map_err(internal)?
            .ok_or_else(|| status(NodeError::Refused(crate::fsm::ApplyError::NoSuchVolume(name.into()))))
    }

    /// Refuses metadata reads on a server that is no longer a member of the cluster: its state
    /// stopped with its removal, and a client that still lists it must move to another server
    /// (`Unavailable` makes it fail over) instead of reading an old tree and an idle change
    /// stream from it.
    ///
    /// Two signs, either enough: the replicated record of its removal (`ForgetServer`, committed
    /// before the membership change, so a removed follower has it even though the leader stops
    /// replicating to it before the final membership reaches it), or a membership without it
    /// (a removed leader, which appended that membership itself).
    ///
    /// Also refuses them while this server installs a snapshot of the cluster's state: its
    /// tables are emptied and refilled in batches under the old applied index, so a read
    /// would see part of the tree (a page "not found", a listing cut short) as if current.
    pub fn check_member(&self) -> Result<(), Status> {
        self.check_installing()?;
        if !self.outside_membership() && self.tables().removed_server(self.id).map_err(internal)?.is_none() {
            return Ok(());
        }
        Err(refuse(
            ErrorKind::Unavailable,
            format!("server {} was removed from the cluster; ask another server", self.id),
        ))
    }

    /// Refuses while this server installs a snapshot (see [`Node::check_member`]).
    pub fn check_installing(&self) -> Result<(), Status> {
        if !self.tables().replace_pending().map_err(internal)? {
            return Ok(());
        }
        Err(refuse(
            ErrorKind::Unavailable,
            format!(
                "server {} is installing a snapshot of the cluster's state; ask another server",
                self.id
            ),
        ))
    }

    /// Whether this server has a membership and is not in it (none yet: a joiner before its
    /// first log entries).
    pub fn outside_membership(&self) -> bool {
        let m = self.raft.metrics().borrow().membership_config.clone();
        let mut nodes = m.membership().nodes().map(|(id, _)| *id).peekable();
        nodes.peek().is_some() && !nodes.any(|id| id == self.id)
    }

    /// Whether `caller` may read `vol` (see the module doc).
    pub fn may_read(&self, caller: &Caller, vol: &VolumeRec) -> bool {
        self.check_read(caller, vol).is_ok()
    }

    /// Refuses unless `caller` may read `vol`, saying why.
    pub fn check_read(&self, caller: &Caller, vol: &VolumeRec) -> Result<(), Status> {
        if vol.public_read {
            return Ok(());
        }
        self.check_runs(caller, vol)
    }

    /// Refuses unless `caller` holds a token of `vol`'s owner, one of its writers or an admin
    /// (who may read it even when it is private, and see who follows it).
    pub fn check_runs(&self, caller: &Caller, vol: &VolumeRec) -> Result<(), Status> {
        let Some(token) = caller.token.as_deref() else {
            return Err(private(&vol.name, "no token was sent; log in first"));
        };
        let claims = self.authenticate(Some(token)).map_err(status)?;
        if may_write(&claims, vol) {
            Ok(())
        } else {
            Err(private(&vol.name, &format!("{} is none of them", claims.user)))
        }
    }

    /// Refuses unless `caller` may read the volume of node `ino`; returns that volume.
    pub fn check_read_ino(&self, caller: &Caller, ino: u64) -> Result<VolumeRec, Status> {
        let vol = self
            .volume_of_ino(ino)
            .and_then(|vol| self.check_read(caller, &vol).map(|()| vol));
        vol.map_err(|e| self.unless_installing(e))
    }

    /// Refusal `e`, or "installing a snapshot" if an install began meanwhile (what refused
    /// may have been read from tables being emptied).
    pub fn unless_installing(&self, e: Status) -> Status {
        match self.check_installing() {
            Ok(()) => e,
            Err(installing) => installing,
        }
    }

    /// Makes read tickets for the attributes shown in one reply (one cluster lookup per reply).
    pub fn ticket_maker(&self) -> Result<TicketMaker, Status> {
        let cluster = self
            .tables()
            .cluster()
            .map_err(internal)?
            .ok_or_else(|| refuse(ErrorKind::Unavailable, "cluster is not bootstrapped yet"))?;
        Ok(TicketMaker {
            key: cluster.current_key().map(|(id, k)| (id, ticket::ticket_key(&k))),
            expires: ticket::expiry(codafs_common::token::unix_now()),
        })
    }

    /// Refuses a blob read unless `caller` shows a right to `hash` (see the module doc).
    /// Refused while a snapshot install refills the tables the right is read from, it says
    /// so (unavailable: the client asks another server), not that the right is missing.
    pub fn check_blob_read(&self, caller: &Caller, hash: &Hash, ticket_bytes: &[u8], ino: u64) -> Result<(), Status> {
        self.blob_read_right(caller, hash, ticket_bytes, ino)
            .map_err(|e| self.unless_installing(e))
    }

    fn blob_read_right(&self, caller: &Caller, hash: &Hash, ticket_bytes: &[u8], ino: u64) -> Result<(), Status> {
        if caller.peer {
            return Ok(());
        }
        let cluster = self
            .tables()
            .cluster()
            .map_err(internal)?
            .ok_or_else(|| refuse(ErrorKind::Unavailable, "cluster is not bootstrapped yet"))?;
        let by_ticket = ticket::verify(
            ticket_bytes,
            hash,
            |id| ticket_key_of(&cluster, id),
            codafs_common::token::unix_now(),
        );
        let Err(ticket_err) = by_ticket else {
            return Ok(());
        };
        if ino != 0 {
            let vol = self.check_read_ino(caller, ino)?;
            let obj = self.tables().object(ino).map_err(internal)?;
            if obj.is_some_and(|o| o.hash.as_ref() == Some(hash)) {
                return Ok(());
            }
            return Err(status(NodeError::Denied(format!(
                "file {ino:#x} of volume {} does not hold blob {hash} (any more); read its attributes again",
                vol.name
            ))));
        }
        Err(status(NodeError::Denied(format!(
            "reading blob {hash} needs a read ticket from its file's attributes ({ticket_err})"
        ))))
    }

    /// The manifest a client names to read a chunk (`GetBlobRequest.manifest`), if it names one
    /// and is not a peer: its right is then checked against the manifest, and the manifest must
    /// list the chunk ([`Node::check_chunk_listed`]). Peers read anything by certificate.
    pub fn chunk_read_manifest(&self, caller: &Caller, manifest: &[u8]) -> Result<Option<Hash>, Status> {
        if caller.peer || manifest.is_empty() {
            return Ok(None);
        }
        Hash::from_slice(manifest)
            .map(Some)
            .map_err(|_| refuse(ErrorKind::Invalid, "a manifest hash is 32 bytes"))
    }

    /// Whether manifest `manifest` lists `chunk`, as this server can tell: `Ok(false)` when it
    /// does not hold the manifest (the caller answers as for a missing blob, so the client asks
    /// another replica), `Denied` when the manifest does not list the chunk.
    pub async fn check_chunk_listed(&self, manifest: &Hash, chunk: &Hash) -> Result<bool, Status> {
        let m = match self.manifest(manifest).await {
            Ok(m) => m,
            Err(NodeError::NotFound(_)) => return Ok(false),
            Err(e) => return Err(status(e)),
        };
        if m.lists(chunk) {
            return Ok(true);
        }
        Err(status(NodeError::Denied(format!(
            "blob {chunk} is not a chunk of manifest {manifest}"
        ))))
    }

    /// Refuses details meant for operators and clients of this cluster (server list, status)
    /// unless the caller is a member or holds any valid token.
    pub fn check_known(&self, caller: &Caller) -> Result<(), Status> {
        if caller.peer {
            return Ok(());
        }
        match caller.token.as_deref() {
            None => Err(status(NodeError::Unauthenticated(
                "this needs a token (log in, or set CODAFS_CREDENTIAL); without one only Health answers".into(),
            ))),
            Some(t) => self.authenticate(Some(t)).map(drop).map_err(status),
        }
    }

    /// Refuses a blob store (or a "which do you lack" query) unless the caller is a member or
    /// holds a token whose account may write some volume. Returns the account for quota
    /// accounting (`None` for a peer).
    pub fn check_store(&self, caller: &Caller) -> Result<Option<Claims>, Status> {
        if caller.peer {
            return Ok(None);
        }
        let Some(token) = caller.token.as_deref() else {
            return Err(status(NodeError::Unauthenticated(
                "storing blobs needs a token (log in first)".into(),
            )));
        };
        let claims = self.authenticate(Some(token)).map_err(status)?;
        if claims.role == Role::Admin {
            return Ok(Some(claims));
        }
        let vols = self.tables().volumes().map_err(internal)?;
        if vols.iter().any(|v| may_write(&claims, v)) {
            return Ok(Some(claims));
        }
        Err(status(NodeError::Denied(format!(
            "{} may write no volume, so may not store blobs",
            claims.user
        ))))
    }
}

fn ticket_key_of(cluster: &ClusterRec, id: u32) -> Option<[u8; 32]> {
    cluster.key(id).map(|k| ticket::ticket_key(&k))
}

/// Issues read tickets with the cluster's current key.
pub struct TicketMaker {
    key: Option<(u32, [u8; 32])>,
    expires: u64,
}

impl TicketMaker {
    /// A ticket for `hash` (empty when the cluster has no key, which only happens before
    /// bootstrap).
    pub fn ticket(&self, hash: &Hash) -> bytes::Bytes {
        match &self.key {
            Some((id, key)) => ticket::issue(key, *id, hash, self.expires).into(),
            None => bytes::Bytes::new(),
        }
    }
}

/// Quota headroom of an account: the most bytes any volume it may write can still take
/// (`None` = some volume has no byte quota, or the account is an admin).
pub fn headroom(claims: &Claims, vols: &[VolumeRec]) -> Option<u64> {
    if claims.role == Role::Admin {
        return None;
    }
    let mut best = Some(0u64);
    for v in vols.iter().filter(|v| may_write(claims, v)) {
        if v.quota_bytes == 0 {
            return None;
        }
        best = best.map(|b| b.max(v.quota_bytes.saturating_sub(v.used_bytes)));
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(user: &str, role: Role) -> Claims {
        Claims {
            user: user.into(),
            role,
            cluster: "c".into(),
            key_id: 1,
            expires: u64::MAX,
            generation: 0,
        }
    }

    fn vol(owner: &str, quota: u64, used: u64) -> VolumeRec {
        VolumeRec {
            id: 1,
            name: format!("{owner}-vol"),
            owner: owner.into(),
            writers: vec!["helper".into()],
            quota_bytes: quota,
            quota_files: 0,
            write_quorum: 2,
            public_read: false,
            version: 0,
            used_bytes: used,
            used_files: 0,
            next_inode: 2,
            created_ns: 0,
            history_floor: 0,
            change_count: 0,
        }
    }

    #[test]
    fn write_rights_and_headroom() {
        let v = vol("web", 1000, 300);
        assert!(may_write(&claims("web", Role::User), &v));
        assert!(may_write(&claims("helper", Role::User), &v));
        assert!(may_write(&claims("root", Role::Admin), &v));
        assert!(!may_write(&claims("eve", Role::User), &v));
        let vols = [v, vol("other", 5000, 0)];
        assert_eq!(headroom(&claims("web", Role::User), &vols), Some(700));
        // A writer of both volumes gets the larger headroom.
        assert_eq!(headroom(&claims("helper", Role::User), &vols), Some(5000));
        assert_eq!(headroom(&claims("eve", Role::User), &vols), Some(0));
        assert_eq!(headroom(&claims("root", Role::Admin), &vols), None);
        assert_eq!(headroom(&claims("web", Role::User), &[vol("web", 0, 9)]), None);
    }
}
