//! The plan of an upload: from the scanned local tree and the remote one, the operations of its
//! one commit (in an order the servers can apply), the blobs those operations reference, and the
//! counts the user is shown. Pure, so every case is unit-tested without a cluster.
use std::collections::BTreeMap;
use std::path::PathBuf;

use codafs_common::Hash;
use codafs_proto::pb;

use super::{join, Local, Remote, Summary};
use crate::ops;

/// What an upload will do.
#[derive(Debug, Default)]
pub(super) struct Plan {
    /// The operations of the commit: replaced entries removed first, then directories (parents
    /// before children), then files and symlinks, then deletions.
    pub ops: Vec<pb::Op>,
    /// Content the operations reference that the remote tree does not already hold, with a local
    /// file that has it.
    pub blobs: BTreeMap<Hash, (PathBuf, u64)>,
    pub summary: Summary,
}

/// Plans publishing `tree` at `base` over `remote` (the remote subtree at `base`).
/// `ancestors` are the directories above `base` that do not exist yet; with `delete`, what is
/// gone locally is removed remotely.
pub(super) fn plan(
    tree: &BTreeMap<String, Local>,
    remote: &BTreeMap<String, Remote>,
    base: &str,
    ancestors: &[String],
    delete: bool,
) -> Plan {
    let mut p = Planner::default();
    p.dirs.extend(ancestors.iter().map(|a| (a.clone(), ops::dir(a, 0o755))));
    for (rel, l) in tree {
        let full = join(base, rel);
        let r = remote.get(rel);
        match l {
            Local::Dir { mode } => p.dir(&full, *mode, r),
            Local::File { path, size, mode, hash } => p.file(&full, path, *size, *mode, *hash, r),
            Local::Symlink { target } => p.symlink(&full, target, r),
        }
    }
    if delete {
        p.deletions(tree, remote, base);
    }
    p.finish()
}

/// The plan under construction, by phase of the commit.
#[derive(Default)]
struct Planner {
    pre: Vec<pb::Op>,
    dirs: Vec<(String, pb::Op)>,
    files: Vec<pb::Op>,
    post: Vec<pb::Op>,
    blobs: BTreeMap<Hash, (PathBuf, u64)>,
    s: Summary,
}

impl Planner {
    /// Whatever of another kind stands at `full` goes first (expecting the version seen).
    fn replace(&mut self, full: &str, r: Option<&Remote>) {
        if let Some(r) = r {
            self.pre.push(ops::expecting(ops::remove(full), r.version));
        }
    }

    fn dir(&mut self, full: &str, mode: u32, r: Option<&Remote>) {
        if r.is_some_and(|r| r.kind == pb::ObjectKind::Directory as i32) {
            self.s.unchanged += 1;
            return;
        }
        self.replace(full, r);
        self.dirs
            .push((full.to_string(), ops::expecting(ops::dir(full, mode), 0)));
        self.s.created += 1;
    }

    fn file(&mut self, full: &str, path: &std::path::Path, size: u64, mode: u32, hash: Hash, r: Option<&Remote>) {
        self.s.files += 1;
        self.s.bytes += size;
        match r {
            Some(r) if r.kind == pb::ObjectKind::File as i32 => {
                if r.hash == hash.0 && r.mode == mode {
                    self.s.unchanged += 1;
                    return;
                }
                if r.hash != hash.0 {
                    self.files.push(set_content(full, hash, size, r.version));
                    self.blobs.insert(hash, (path.to_path_buf(), size));
                }
                if r.mode != mode {
                    self.files.push(set_mode(full, mode));
                }
                self.s.updated += 1;
            }
            other => {
                self.replace(full, other);
                self.files
                    .push(ops::expecting(ops::file_hashed(full, hash, size, mode), 0));
                self.blobs.insert(hash, (path.to_path_buf(), size));
                self.s.created += 1;
            }
        }
    }

    fn symlink(&mut self, full: &str, target: &str, r: Option<&Remote>) {
        if r.is_some_and(|r| r.kind == pb::ObjectKind::Symlink as i32 && r.symlink == target) {
            self.s.unchanged += 1;
            return;
        }
        self.replace(full, r);
        self.files.push(ops::expecting(ops::symlink(full, target), 0));
        self.s.created += 1;
    }

    /// Removes what is gone locally: only the topmost such path (a recursive remove covers the
    /// rest). `remote` is sorted, so a directory comes before everything below it.
    fn deletions(&mut self, tree: &BTreeMap<String, Local>, remote: &BTreeMap<String, Remote>, base: &str) {
        let mut removed: Vec<&String> = Vec::new();
        for (rel, r) in remote {
            if tree.contains_key(rel) || removed.iter().any(|d| rel.starts_with(&format!("{d}/"))) {
                continue;
            }
            self.post.push(ops::expecting(ops::remove(&join(base, rel)), r.version));
            removed.push(rel);
            self.s.removed += 1;
        }
    }

    fn finish(mut self) -> Plan {
        self.dirs.sort_by(|a, b| a.0.cmp(&b.0));
        let mut ops = self.pre;
        ops.extend(self.dirs.into_iter().map(|(_, op)| op));
        ops.extend(self.files);
        ops.extend(self.post);
        Plan {
            ops,
            blobs: self.blobs,
            summary: self.s,
        }
    }
}

/// New content for the file at `full`, valid only if it still has `version`.
fn set_content(full: &str, hash: Hash, size: u64, version: u64) -> pb::Op {
    pb::Op {
        expect_version: Some(version),
        op: Some(pb::op::Op::SetContent(pb::SetContentOp {
            node: ops::at(full),
            hash: bytes::Bytes::copy_from_slice(&hash.0),
            size,
            mtime_ns: 0,
        })),
    }
}

/// A new mode for the file at `full`.
fn set_mode(full: &str, mode: u32) -> pb::Op {
    pb::Op {
        expect_version: None,
        op: Some(pb::op::Op::SetAttr(pb::SetAttrOp {
            node: ops::at(full),
            mode: Some(mode),
            ..Default::default()
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One line per operation: what it does, to which path, and the version it expects.
    fn show(op: &pb::Op) -> String {
        let path = |parent: &Option<pb::NodeRef>, name: &str| {
            let parent = match parent.as_ref().and_then(|p| p.target.clone()) {
                Some(pb::node_ref::Target::Path(p)) => p,
                _ => "?".into(),
            };
            join(&parent, name)
        };
        let node = |n: &Option<pb::NodeRef>| path(n, "");
        let what = match &op.op {
            Some(pb::op::Op::Create(c)) => {
                let kind = match pb::ObjectKind::try_from(c.kind) {
                    Ok(pb::ObjectKind::Directory) => "mkdir",
                    Ok(pb::ObjectKind::Symlink) => "symlink",
                    _ => "create",
                };
                format!("{kind} {}", path(&c.parent, &c.name))
            }
            Some(pb::op::Op::SetContent(c)) => format!("content {}", node(&c.node)),
            Some(pb::op::Op::SetAttr(a)) => format!("mode {} {:o}", node(&a.node), a.mode.unwrap_or(0)),
            Some(pb::op::Op::Remove(r)) => format!("remove {}", path(&r.parent, &r.name)),
            other => format!("{other:?}"),
        };
        match op.expect_version {
            Some(v) => format!("{what} @{v}"),
            None => what,
        }
    }

    fn shown(p: &Plan) -> Vec<String> {
        p.ops.iter().map(show).collect()
    }

    fn file(name: &str, content: &[u8], mode: u32) -> Local {
        Local::File {
            path: PathBuf::from(format!("/local/{name}")),
            size: content.len() as u64,
            mode,
            hash: Hash::of(content),
        }
    }

    fn remote_file(content: &[u8], mode: u32, version: u64) -> Remote {
        Remote {
            kind: pb::ObjectKind::File as i32,
            mode,
            hash: Hash::of(content).0.to_vec(),
            symlink: String::new(),
            version,
        }
    }

    fn remote_dir(version: u64) -> Remote {
        Remote {
            kind: pb::ObjectKind::Directory as i32,
            mode: 0o755,
            hash: Vec::new(),
            symlink: String::new(),
            version,
        }
    }

    fn tree(entries: &[(&str, Local)]) -> BTreeMap<String, Local> {
        entries.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
    }

    fn remote(entries: Vec<(&str, Remote)>) -> BTreeMap<String, Remote> {
        entries.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
    }

    #[test]
    fn a_first_upload_creates_parents_before_children_and_sends_every_blob() {
        let t = tree(&[
            ("a", Local::Dir { mode: 0o755 }),
            ("a/b", Local::Dir { mode: 0o750 }),
            ("a/b/x.html", file("x", b"x", 0o644)),
            ("index.html", file("i", b"i", 0o644)),
            (
                "link",
                Local::Symlink {
                    target: "index.html".into(),
                },
            ),
        ]);
        let p = plan(&t, &BTreeMap::new(), "site", &["site".to_string()], false);
        assert_eq!(
            shown(&p),
            [
                "mkdir site",
                "mkdir site/a @0",
                "mkdir site/a/b @0",
                "create site/a/b/x.html @0",
                "create site/index.html @0",
                "symlink site/link @0",
            ]
        );
        assert_eq!(p.blobs.len(), 2);
        let s = &p.summary;
        assert_eq!((s.created, s.updated, s.unchanged, s.removed), (5, 0, 0, 0));
        assert_eq!((s.files, s.bytes), (2, 2));
    }

    #[test]
    fn an_unchanged_tree_plans_nothing() {
        let t = tree(&[("d", Local::Dir { mode: 0o755 }), ("d/f", file("f", b"f", 0o644))]);
        let r = remote(vec![("d", remote_dir(3)), ("d/f", remote_file(b"f", 0o644, 4))]);
        let p = plan(&t, &r, "", &[], true);
        assert!(p.ops.is_empty() && p.blobs.is_empty(), "{:?}", shown(&p));
        assert_eq!(p.summary.unchanged, 2);
    }

    #[test]
    fn changed_content_and_modes_expect_the_version_seen() {
        let t = tree(&[
            ("new-content", file("c", b"two", 0o644)),
            ("new-mode", file("m", b"same", 0o600)),
            ("both", file("b", b"two", 0o600)),
        ]);
        let r = remote(vec![
            ("new-content", remote_file(b"one", 0o644, 7)),
            ("new-mode", remote_file(b"same", 0o644, 8)),
            ("both", remote_file(b"one", 0o644, 9)),
        ]);
        let p = plan(&t, &r, "", &[], false);
        assert_eq!(
            shown(&p),
            [
                "content both @9",
                "mode both 600",
                "content new-content @7",
                "mode new-mode 600"
            ]
        );
        // Only new content is sent: "two" once, "same" is already there.
        assert_eq!(p.blobs.keys().collect::<Vec<_>>(), [&Hash::of(b"two")]);
        assert_eq!(p.summary.updated, 3);
    }

    #[test]
    fn an_entry_of_another_kind_is_removed_first() {
        let t = tree(&[
            ("was-dir", file("f", b"f", 0o644)),
            ("was-file", Local::Dir { mode: 0o755 }),
        ]);
        let r = remote(vec![
            ("was-dir", remote_dir(5)),
            ("was-file", remote_file(b"x", 0o644, 6)),
        ]);
        let p = plan(&t, &r, "", &[], false);
        assert_eq!(
            shown(&p),
            [
                "remove was-dir @5",
                "remove was-file @6",
                "mkdir was-file @0",
                "create was-dir @0",
            ]
        );
    }

    #[test]
    fn deletions_remove_only_the_topmost_path_and_only_when_asked() {
        let t = tree(&[("keep", file("k", b"k", 0o644))]);
        let r = remote(vec![
            ("gone", remote_dir(2)),
            ("gone/a", remote_file(b"a", 0o644, 3)),
            ("gone/b", remote_dir(4)),
            ("gone2", remote_file(b"g", 0o644, 5)),
            ("keep", remote_file(b"k", 0o644, 6)),
        ]);
        let p = plan(&t, &r, "www", &[], true);
        assert_eq!(shown(&p), ["remove www/gone @2", "remove www/gone2 @5"]);
        assert_eq!(p.summary.removed, 2);
        assert!(plan(&t, &r, "www", &[], false).ops.is_empty());
    }
}
