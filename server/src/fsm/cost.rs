//! The leader's bound on what one commit's apply may read.
//!
//! Every replica applies a commit in one step, while no other commit applies. Most operations
//! read a handful of records, but two can read far more: a directory rename walks up from its
//! destination to the volume root (to refuse moving a directory into itself; up to
//! [`MAX_DIR_DEPTH`](super::MAX_DIR_DEPTH) levels), and a path reference walks its components.
//! 200,000 directory renames into a tree 4,000 levels deep would read 800 million records and
//! stall every volume of every replica for many minutes.
//!
//! So the leader, before it proposes a commit that could read more than [`APPLY_READS`]
//! records, applies it once to a scratch overlay of its own state ([`super::apply`] writes
//! nothing), counting the records read, and refuses the commit past the bound. The rule is the
//! leader's, like [`super::bounds`], and no part of what every replica must decide alike. Such a
//! commit is checked and applied while no other commit of its volume is in flight (see
//! `Node::commit_lock`), so the apply reads what the check read.
use std::cell::Cell;

use codafs_common::Hash;

use super::records::*;
use super::{Command, StateView, StoreError, MAX_DIR_DEPTH};

/// Records one commit's apply may read.
pub const APPLY_READS: u64 = 4_000_000;

/// An upper bound of the records the apply of `ops` reads, from the operations alone: a few per
/// operation, plus each path reference's components, plus a full ancestor walk per rename (of
/// a directory or not: which it is shows only at the apply). Recursive removes are bounded by
/// [`super::bounds`] and count as one.
pub fn reads_bound(ops: &[Op]) -> u64 {
    ops.iter().map(|op| 16 + kind_bound(&op.kind)).sum()
}

fn kind_bound(kind: &OpKind) -> u64 {
    let path = |r: &NodeRef| match r {
        NodeRef::Ino(_) => 0,
        NodeRef::Path(p) => 2 * p.split('/').count() as u64,
    };
    match kind {
        OpKind::Rename {
            from_parent, to_parent, ..
        } => path(from_parent) + path(to_parent) + MAX_DIR_DEPTH as u64,
        OpKind::CreateAt { create, .. } => kind_bound(create),
        OpKind::Create { parent, .. } | OpKind::Remove { parent, .. } | OpKind::Expect { parent, .. } => path(parent),
        OpKind::SetContent { node, .. } | OpKind::SetAttr { node, .. } => path(node),
        OpKind::Link { node, parent, .. } => path(node) + path(parent),
        OpKind::Reserve { .. } => 0,
    }
}

/// Whether `cmd`, applied to `view` as entry `index`, reads at most `limit` records (the
/// outcome is the real apply's to decide).
pub fn within(view: &dyn StateView, index: u64, cmd: &Command, limit: u64) -> Result<bool, StoreError> {
    let metered = Metered {
        inner: view,
        reads: Cell::new(0),
        limit,
    };
    match super::apply(&metered, index, cmd) {
        Ok(_) => Ok(metered.reads.get() <= limit),
        Err(_) if metered.reads.get() > limit => Ok(false),
        Err(e) => Err(e),
    }
}

/// A view that counts what it reads and fails every read past its limit.
struct Metered<'a> {
    inner: &'a dyn StateView,
    reads: Cell<u64>,
    limit: u64,
}

impl Metered<'_> {
    fn count(&self, n: u64) -> Result<(), StoreError> {
        let reads = self.reads.get() + n;
        self.reads.set(reads);
        if reads > self.limit {
            return Err(StoreError(format!("more than {} records read", self.limit)));
        }
        Ok(())
    }
}

impl StateView for Metered<'_> {
    fn object(&self, ino: u64) -> Result<Option<ObjectRec>, StoreError> {
        self.count(1)?;
        self.inner.object(ino)
    }
    fn dirent(&self, parent: u64, name: &str) -> Result<Option<u64>, StoreError> {
        self.count(1)?;
        self.inner.dirent(parent, name)
    }
    fn dirents(&self, parent: u64, after: &str, limit: usize) -> Result<Vec<(String, u64)>, StoreError> {
        let page = self.inner.dirents(parent, after, limit)?;
        self.count(1 + page.len() as u64)?;
        Ok(page)
    }
    fn volume(&self, name: &str) -> Result<Option<VolumeRec>, StoreError> {
        self.count(1)?;
        self.inner.volume(name)
    }
    fn volume_name(&self, id: u32) -> Result<Option<String>, StoreError> {
        self.count(1)?;
        self.inner.volume_name(id)
    }
    fn cluster(&self) -> Result<Option<ClusterRec>, StoreError> {
        self.inner.cluster()
    }
    fn account(&self, name: &str) -> Result<Option<AccountRec>, StoreError> {
        self.count(1)?;
        self.inner.account(name)
    }
    fn token_generation(&self, user: &str) -> Result<u64, StoreError> {
        self.inner.token_generation(user)
    }
    fn blobref(&self, hash: &Hash) -> Result<u64, StoreError> {
        self.count(1)?;
        self.inner.blobref(hash)
    }
    fn manifestref(&self, hash: &Hash) -> Result<u64, StoreError> {
        self.count(1)?;
        self.inner.manifestref(hash)
    }
    fn oldest_change(&self, volume: u32) -> Result<Option<u64>, StoreError> {
        self.inner.oldest_change(volume)
    }
    fn volume_owned_by(&self, user: &str) -> Result<Option<String>, StoreError> {
        self.inner.volume_owned_by(user)
    }
    fn volumes_written_by(&self, user: &str) -> Result<Vec<String>, StoreError> {
        self.inner.volumes_written_by(user)
    }
    fn request(&self, id: &RequestId) -> Result<Option<RequestRec>, StoreError> {
        self.inner.request(id)
    }
    fn requests_before(&self, before: u64, limit: usize) -> Result<Vec<(u64, RequestId)>, StoreError> {
        self.inner.requests_before(before, limit)
    }
    fn join_token(&self, secret_hash: &[u8; 32]) -> Result<Option<JoinTokenRec>, StoreError> {
        self.inner.join_token(secret_hash)
    }
    fn join_tokens(&self) -> Result<Vec<([u8; 32], JoinTokenRec)>, StoreError> {
        self.inner.join_tokens()
    }
    fn removed_server(&self, node_id: u64) -> Result<Option<RemovedServerRec>, StoreError> {
        self.inner.removed_server(node_id)
    }
}
