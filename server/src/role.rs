//! A server's role, data replica or witness, follows the membership. `codafs cluster role`
//! changes a server's entry in the membership (`Node::set_role`); each server watches for its
//! own entry and switches when it changes:
//! - the blob store stays where it is and changes meaning: a new witness's blobs become its
//!   spool, which hinted handoff (`blobs::handoff`) hands to the data replicas that lack them
//!   and then drops; a new data replica's spool becomes its store, which repair checks in full
//!   and fills, and GC trims;
//! - `server.toml` records the new role, and the next start moves the store to the directory
//!   of that role (`blobs/` or `spool/`, see [`blob_dir`]): the whole directory, packed small
//!   blobs and files alike.
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::node::Node;

/// The blob directory of a server of this role in `dir`. A store left in the other role's
/// directory by a switch (and no store in this one) is moved here first.
pub fn blob_dir(dir: &Path, witness: bool) -> std::io::Result<PathBuf> {
    let (mine, other) = if witness {
        (dir.join("spool"), dir.join("blobs"))
    } else {
        (dir.join("blobs"), dir.join("spool"))
    };
    if !mine.exists() && other.exists() {
        std::fs::rename(&other, &mine)?;
        tracing::info!(from = %other.display(), to = %mine.display(), "moved the blob store after a role switch");
    }
    Ok(mine)
}

/// Follows this server's entry in the membership until the server stops.
pub async fn watch(node: Arc<Node>, dir: PathBuf) {
    let mut metrics = node.raft.metrics();
    let mut stop = node.tasks.stop_signal();
    let mut seen = None;
    loop {
        let membership = metrics.borrow_and_update().membership_config.clone();
        if seen != Some(*membership.log_id()) {
            seen = Some(*membership.log_id());
            let mine = membership.membership().get_node(&node.id).map(|n| n.witness);
            if let Some(witness) = mine {
                if witness != node.is_witness() {
                    switch(&node, &dir, witness);
                }
            }
        }
        tokio::select! {
            r = metrics.changed() => if r.is_err() { return },
            _ = stop.changed() => return,
        }
    }
}

/// Takes on the role the membership gives this server.
fn switch(node: &Node, dir: &Path, witness: bool) {
    node.witness.store(witness, Ordering::Release);
    let mut cfg = node.cfg.clone();
    cfg.witness = witness;
    if let Err(e) = cfg.save(dir) {
        tracing::warn!(error = %e, "could not record the new role in server.toml; the next start takes the old one until the membership corrects it");
    }
    if witness {
        tracing::info!(
            "this server is now a witness: it hands the blobs it holds to the data servers, then drops them"
        );
    } else {
        node.repair_now();
        tracing::info!("this server is now a data server: repair fills it with every referenced blob");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_moves_to_the_directory_of_the_new_role() {
        let d = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(d.path().join("blobs/data")).expect("mkdir");
        std::fs::write(d.path().join("blobs/data/x"), b"x").expect("write");
        let spool = blob_dir(d.path(), true).expect("moved");
        assert_eq!(spool, d.path().join("spool"));
        assert!(spool.join("data/x").is_file() && !d.path().join("blobs").exists());
        // Where the role's own directory exists, nothing moves.
        std::fs::create_dir_all(d.path().join("blobs")).expect("mkdir");
        assert_eq!(blob_dir(d.path(), true).expect("kept"), spool);
        assert!(spool.join("data/x").is_file());
    }

    #[test]
    fn packed_blobs_move_with_the_store() {
        let d = tempfile::tempdir().expect("tempdir");
        let blobs = blob_dir(d.path(), false).expect("data server's store");
        let (small, large) = (b"a small page".to_vec(), vec![7u8; 100 << 10]);
        {
            let store = crate::blobs::BlobStore::open(&blobs).expect("open");
            store.put_bytes(&small).expect("packed");
            store.put_bytes(&large).expect("a file");
        }
        let spool = blob_dir(d.path(), true).expect("moved");
        let store = crate::blobs::BlobStore::open(&spool).expect("reopen as a spool");
        assert_eq!(store.stats(), (2, (small.len() + large.len()) as u64));
        assert_eq!(
            store.read_verified(&codafs_common::Hash::of(&small)).expect("read"),
            small
        );
        assert_eq!(
            store.read_verified(&codafs_common::Hash::of(&large)).expect("read"),
            large
        );
    }
}
