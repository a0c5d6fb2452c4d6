//! The leader's check that a commit's recursive removes stay within
//! [`MAX_REMOVE_NODES`](codafs_proto::limits::MAX_REMOVE_NODES).
//!
//! A recursive remove is one operation, but the state machine deletes every node below it in
//! one apply: in memory, in one write batch, while no other commit applies. A tree of millions of
//! nodes would stall every volume for minutes or exhaust a replica's memory. So the leader
//! counts what a commit's recursive removes would delete, before it proposes the commit, and
//! refuses one that would delete more than the limit.
//!
//! The count is taken here rather than in the state machine so that the rule is no part of what
//! every replica must decide alike (replicas of different builds apply the same log the same
//! way). It reads the state as of the check, so a tree renamed earlier in the same commit is
//! counted too (it may be removed under its new name). The leader checks such a commit while
//! it holds its volume's commit lock alone, after every earlier entry is applied, and keeps the
//! lock until this one is applied (`Node::commit_lock`): no other commit of the volume, a
//! rename moving a large tree under the removed directory for one, can come in between.
use codafs_common::names::split_path;

use super::{ApplyError, Kind, NodeRef, Op, OpKind, StateView, StoreError, VolumeRec};

/// Entries read per directory page while counting.
const PAGE: usize = 4096;

/// Refuses `ops` if their recursive removes would delete more than `limit` nodes in `vol`.
/// Targets that cannot be found are left to the state machine, which reports them.
pub fn check_remove_bound(view: &impl StateView, vol: &VolumeRec, ops: &[Op], limit: usize) -> Result<(), CheckError> {
    let mut total = 0usize;
    // Trees renamed earlier in the commit: a later remove may delete them under their new
    // names, which the state before the commit does not show. Each is counted (once) as soon
    // as a recursive remove follows it.
    let mut moved: Vec<(&NodeRef, &str)> = Vec::new();
    for op in ops {
        let (parent, name) = match &op.kind {
            OpKind::Rename {
                from_parent, from_name, ..
            } => {
                moved.push((from_parent, from_name));
                continue;
            }
            OpKind::Remove {
                parent,
                name,
                recursive: true,
            } => (parent, name),
            _ => continue,
        };
        for (p, n) in moved.drain(..).chain([(parent, name.as_str())]) {
            total += count_target(view, vol, p, n, limit.saturating_sub(total).saturating_add(1))?;
        }
        if total > limit {
            return Err(CheckError::Refused(ApplyError::Invalid(format!(
                "removing {name} would delete more than {limit} files and directories in one commit; \
                 remove what is inside it in several commits first (removing through a mount does so)"
            ))));
        }
    }
    Ok(())
}

/// Nodes in the tree at `parent`/`name` as the state holds it (0 if there is none), counted
/// up to `budget`.
fn count_target(
    view: &impl StateView,
    vol: &VolumeRec,
    parent: &NodeRef,
    name: &str,
    budget: usize,
) -> Result<usize, StoreError> {
    let Some(dir) = resolve(view, vol, parent)? else {
        return Ok(0);
    };
    let Some(ino) = view.dirent(dir, name)? else {
        return Ok(0);
    };
    if view.object(ino)?.is_some_and(|o| o.kind == Kind::Dir) {
        count_subtree(view, ino, budget)
    } else {
        Ok(1)
    }
}

/// Why a commit does not pass the check.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Refused(ApplyError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The directory a reference names, if it exists in `vol`.
fn resolve(view: &impl StateView, vol: &VolumeRec, node: &NodeRef) -> Result<Option<u64>, StoreError> {
    match node {
        NodeRef::Ino(ino) => Ok(Some(*ino)),
        NodeRef::Path(p) => {
            let Ok(parts) = split_path(p) else { return Ok(None) };
            super::walk_path(vol, &parts, |dir, name| view.dirent(dir, name))
        }
    }
}

/// Nodes in the tree at directory `root` (itself included), counted up to `budget`: the walk
/// stops as soon as the count passes it.
fn count_subtree(view: &impl StateView, root: u64, budget: usize) -> Result<usize, StoreError> {
    let mut count = 1usize;
    let mut dirs = vec![root];
    while let Some(dir) = dirs.pop() {
        let mut after = String::new();
        loop {
            let page = view.dirents(dir, &after, PAGE)?;
            for (_, ino) in &page {
                count += 1;
                if count > budget {
                    return Ok(count);
                }
                if view.object(*ino)?.is_some_and(|o| o.kind == Kind::Dir) {
                    dirs.push(*ino);
                }
            }
            match page.last() {
                Some((last, _)) if page.len() == PAGE => after.clone_from(last),
                _ => break,
            }
        }
    }
    Ok(count)
}
