//! The plan of an upload: from the scanned local tree and the remote one, the operations of its
//! one commit (in an order the servers can apply), the blobs those operations reference, and the
//! counts the user is shown. Pure, so every case is unit-tested without a cluster.
//!
//! The blobs of a file follow `codafs_common::chunks`: a file up to the chunk threshold is one
//! blob (the whole file); a larger one is its chunks (byte ranges of the local file, read only
//! when sent) and its manifest (in memory), and the manifest is sent after the chunks.
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use codafs_common::chunks::Manifest;
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
    /// The blobs of content the remote tree does not already name, each once (identical chunks
    /// of several files, or of one, are one blob), with where its bytes are. A chunk listed here
    /// may already be stored (an edited file keeps most of its chunks): `send::find_missing`
    /// asks the replicas.
    pub blobs: BTreeMap<Hash, Source>,
    pub summary: Summary,
}

/// Where the bytes of a blob to send come from. Only manifests are held in memory: a file's
/// bytes are read when they are sent, so memory does not grow with the files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Source {
    /// A whole file of `size` bytes (one that is not chunked).
    File { path: Arc<Path>, size: u64 },
    /// `len` bytes of a large file from `offset`: one of its chunks.
    Chunk { path: Arc<Path>, offset: u64, len: u32 },
    /// A large file's manifest. Servers may check that the chunks it lists are stored, so it is
    /// sent only after every chunk.
    Manifest(bytes::Bytes),
}

impl Source {
    /// The blob's size in bytes.
    pub(super) fn len(&self) -> u64 {
        match self {
            Source::File { size, .. } => *size,
            Source::Chunk { len, .. } => u64::from(*len),
            Source::Manifest(b) => b.len() as u64,
        }
    }

    /// Whether this is a manifest (sent in the second phase, after every chunk).
    pub(super) fn is_manifest(&self) -> bool {
        matches!(self, Source::Manifest(_))
    }
}

/// The blobs holding the content of the local file at `path` (`size` bytes, named `hash`): the
/// file itself, or, when `chunks` is its manifest, each chunk (as a range of the file) and the
/// manifest's bytes.
pub(crate) fn content_blobs(path: &Path, size: u64, hash: Hash, chunks: Option<&Manifest>) -> Vec<(Hash, Source)> {
    let path: Arc<Path> = Arc::from(path);
    let Some(m) = chunks else {
        return vec![(hash, Source::File { path, size })];
    };
    let mut out: Vec<(Hash, Source)> = m
        .with_offsets()
        .map(|(offset, c)| {
            let path = path.clone();
            (
                c.hash,
                Source::Chunk {
                    path,
                    offset,
                    len: c.len,
                },
            )
        })
        .collect();
    out.push((hash, Source::Manifest(m.encode().into())));
    out
}

/// Plans publishing `tree` at `base` over `remote` (the remote subtree at `base`); `root` is
/// `base` and the local root's mtime. `ancestors` are the directories above `base` that do not
/// exist yet; with `delete`, what is gone locally is removed remotely.
///
/// A directory the commit creates, or whose entries it changes, would get the commit's time as
/// its mtime: it gets its local mtime instead, as its files do (`rsync -a` does the same). One
/// whose entries stay as they are keeps its remote mtime.
pub(super) fn plan(
    tree: &BTreeMap<String, Local>,
    remote: &BTreeMap<String, Remote>,
    root: (&str, i64),
    ancestors: &[String],
    delete: bool,
) -> Plan {
    let (base, root_mtime) = root;
    let mut p = Planner::default();
    p.dirs.extend(ancestors.iter().map(|a| (a.clone(), ops::dir(a, 0o755))));
    p.dir_mtimes.push((base.to_string(), root_mtime));
    for (rel, l) in tree {
        let full = join(base, rel);
        let r = remote.get(rel);
        match l {
            Local::Dir { mode, mtime_ns } => {
                p.dir_mtimes.push((full.clone(), *mtime_ns));
                p.dir(&full, *mode, r)
            }
            Local::File {
                path,
                size,
                mode,
                hash,
                chunks,
                mtime_ns,
            } => p.file(&full, path, (*size, *mode, *mtime_ns), (*hash, chunks.as_deref()), r),
            Local::Symlink { target } => p.symlink(&full, target, r),
            Local::Skipped => p.s.skipped += 1,
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
    blobs: BTreeMap<Hash, Source>,
    s: Summary,
    /// Every local directory (the root included) and its mtime.
    dir_mtimes: Vec<(String, i64)>,
    /// Directories this commit creates or changes the entries of (whose mtime it would set).
    touched: std::collections::BTreeSet<String>,
}

impl Planner {
    /// Whatever of another kind stands at `full` goes first (expecting the version seen).
    fn replace(&mut self, full: &str, r: Option<&Remote>) {
        if let Some(r) = r {
            self.pre.push(ops::expecting(ops::remove(full), r.version));
        }
    }

    /// Notes that the commit adds or removes the entry `full` (its directory's mtime changes).
    fn entry_changed(&mut self, full: &str) {
        let parent = full.rsplit_once('/').map_or("", |(p, _)| p);
        self.touched.insert(parent.to_string());
    }

    fn dir(&mut self, full: &str, mode: u32, r: Option<&Remote>) {
        if let Some(r) = r.filter(|r| r.kind == pb::ObjectKind::Directory as i32) {
            if r.mode == mode {
                self.s.unchanged += 1;
            } else {
                self.files.push(set_mode(full, mode));
                self.s.updated += 1;
            }
            return;
        }
        self.replace(full, r);
        self.entry_changed(full);
        self.touched.insert(full.to_string());
        self.dirs
            .push((full.to_string(), ops::expecting(ops::dir(full, mode), 0)));
        self.s.created += 1;
    }

    /// Adds the blobs of a file's content, each hash once. A manifest wins over another source
    /// of the same bytes (a small file that happens to hold them), so it keeps its place after
    /// the chunks.
    fn content(&mut self, path: &Path, size: u64, hash: Hash, chunks: Option<&Manifest>) {
        for (h, src) in content_blobs(path, size, hash, chunks) {
            match self.blobs.entry(h) {
                std::collections::btree_map::Entry::Vacant(v) => {
                    v.insert(src);
                }
                std::collections::btree_map::Entry::Occupied(mut o) => {
                    if src.is_manifest() {
                        o.insert(src);
                    }
                }
            }
        }
    }

    /// A local file: unchanged, new content and/or mode for a remote file, or created (after
    /// removing whatever else stands there). `stat` is its size, mode and mtime (which new
    /// content keeps); `content` is its hash and, when chunked, manifest. Content that is the
    /// same keeps its remote mtime: a re-upload changes no `Last-Modified`.
    fn file(
        &mut self,
        full: &str,
        path: &Path,
        stat: (u64, u32, i64),
        content: (Hash, Option<&Manifest>),
        r: Option<&Remote>,
    ) {
        let (size, mode, mtime_ns) = stat;
        let (hash, chunks) = content;
        self.s.files += 1;
        self.s.bytes += size;
        match r {
            Some(r) if r.kind == pb::ObjectKind::File as i32 => {
                if r.hash == hash.0 && r.mode == mode {
                    self.s.unchanged += 1;
                    return;
                }
                if r.hash != hash.0 {
                    self.files.push(set_content(full, (hash, size, mtime_ns), r.version));
                    self.content(path, size, hash, chunks);
                }
                if r.mode != mode {
                    self.files.push(set_mode(full, mode));
                }
                self.s.updated += 1;
            }
            other => {
                self.replace(full, other);
                self.entry_changed(full);
                let mut create = ops::file_hashed(full, hash, size, mode);
                if let Some(pb::op::Op::Create(c)) = &mut create.op {
                    c.mtime_ns = mtime_ns;
                }
                self.files.push(ops::expecting(create, 0));
                self.content(path, size, hash, chunks);
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
        self.entry_changed(full);
        self.files.push(ops::expecting(ops::symlink(full, target), 0));
        self.s.created += 1;
    }

    /// Removes what is gone locally: only the topmost such path (a recursive remove covers the
    /// rest). `remote` is sorted, so a directory comes before everything below it.
    fn deletions(&mut self, tree: &BTreeMap<String, Local>, remote: &BTreeMap<String, Remote>, base: &str) {
        let mut removed: Vec<&String> = Vec::new();
        for (rel, r) in remote {
            // Below a remote directory that a local file or symlink replaces, everything went
            // with the directory's removal (`replace`).
            let replaced = rel
                .match_indices('/')
                .any(|(at, _)| tree.get(&rel[..at]).is_some_and(|l| !matches!(l, Local::Dir { .. })));
            if tree.contains_key(rel) || replaced || removed.iter().any(|d| rel.starts_with(&format!("{d}/"))) {
                continue;
            }
            let full = join(base, rel);
            self.entry_changed(&full);
            self.post.push(ops::expecting(ops::remove(&full), r.version));
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
        // Last: every earlier op that changed a directory's entries set its mtime.
        for (full, mtime_ns) in &self.dir_mtimes {
            if self.touched.contains(full) {
                ops.push(set_mtime(full, *mtime_ns));
            }
        }
        Plan {
            ops,
            blobs: self.blobs,
            summary: self.s,
        }
    }
}

/// New content (hash, size, mtime) for the file at `full`, valid only if it still has
/// `version`.
fn set_content(full: &str, content: (Hash, u64, i64), version: u64) -> pb::Op {
    let (hash, size, mtime_ns) = content;
    pb::Op {
        expect_version: Some(version),
        op: Some(pb::op::Op::SetContent(pb::SetContentOp {
            node: ops::at(full),
            hash: bytes::Bytes::copy_from_slice(&hash.0),
            size,
            mtime_ns,
        })),
    }
}

/// A new mtime for the directory at `full`.
fn set_mtime(full: &str, mtime_ns: i64) -> pb::Op {
    set_attr(pb::SetAttrOp {
        node: ops::at(full),
        mtime_ns: Some(mtime_ns),
        ..Default::default()
    })
}

/// A new mode for the entry at `full`.
fn set_mode(full: &str, mode: u32) -> pb::Op {
    set_attr(pb::SetAttrOp {
        node: ops::at(full),
        mode: Some(mode),
        ..Default::default()
    })
}

/// An attribute change, whatever version the entry has.
fn set_attr(a: pb::SetAttrOp) -> pb::Op {
    pb::Op {
        expect_version: None,
        op: Some(pb::op::Op::SetAttr(a)),
    }
}

#[cfg(test)]
mod tests {
    use codafs_common::testdata::noise;
    use std::path::PathBuf;

    use codafs_common::chunks::{content_id, CHUNK_THRESHOLD};

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
            Some(pb::op::Op::SetAttr(a)) => match (a.mode, a.mtime_ns) {
                (Some(m), _) => format!("mode {} {m:o}", node(&a.node)),
                (None, Some(t)) => format!("mtime {} {t}", node(&a.node)),
                (None, None) => format!("setattr {}", node(&a.node)),
            },
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
            chunks: None,
            mtime_ns: 1_700_000_000_000_000_000,
        }
    }

    /// A local file as the scan names it: over the threshold, by its manifest.
    fn big_file(name: &str, content: &[u8]) -> Local {
        let (hash, chunks) = content_id(content, content.len() as u64).expect("a slice reads in full");
        Local::File {
            path: PathBuf::from(format!("/local/{name}")),
            size: content.len() as u64,
            mode: 0o644,
            hash,
            chunks: chunks.map(Arc::new),
            mtime_ns: 1_700_000_000_000_000_000,
        }
    }

    fn manifest_of(l: &Local) -> Arc<Manifest> {
        match l {
            Local::File { chunks: Some(m), .. } => m.clone(),
            other => panic!("not a chunked file: {other:?}"),
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
            (
                "a",
                Local::Dir {
                    mode: 0o755,
                    mtime_ns: 1,
                },
            ),
            (
                "a/b",
                Local::Dir {
                    mode: 0o750,
                    mtime_ns: 2,
                },
            ),
            ("a/b/x.html", file("x", b"x", 0o644)),
            ("index.html", file("i", b"i", 0o644)),
            (
                "link",
                Local::Symlink {
                    target: "index.html".into(),
                },
            ),
        ]);
        let p = plan(&t, &BTreeMap::new(), ("site", 7), &["site".to_string()], false);
        assert_eq!(
            shown(&p),
            [
                "mkdir site",
                "mkdir site/a @0",
                "mkdir site/a/b @0",
                "create site/a/b/x.html @0",
                "create site/index.html @0",
                "symlink site/link @0",
                // Each directory the commit fills gets its local mtime, after everything in it.
                "mtime site 7",
                "mtime site/a 1",
                "mtime site/a/b 2",
            ]
        );
        assert_eq!(p.blobs.len(), 2);
        let s = &p.summary;
        assert_eq!((s.created, s.updated, s.unchanged, s.removed), (5, 0, 0, 0));
        assert_eq!((s.files, s.bytes), (2, 2));
    }

    #[test]
    fn an_unchanged_tree_plans_nothing() {
        let t = tree(&[
            (
                "d",
                Local::Dir {
                    mode: 0o755,
                    mtime_ns: 0,
                },
            ),
            ("d/f", file("f", b"f", 0o644)),
        ]);
        let r = remote(vec![("d", remote_dir(3)), ("d/f", remote_file(b"f", 0o644, 4))]);
        let p = plan(&t, &r, ("", 0), &[], true);
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
        let p = plan(&t, &r, ("", 0), &[], false);
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
    fn a_directory_gets_its_mode_and_keeps_its_mtime_unless_its_entries_change() {
        let dir = |mode, mtime_ns| Local::Dir { mode, mtime_ns };
        let t = tree(&[
            ("private", dir(0o700, 10)),
            ("same", dir(0o755, 20)),
            ("same/f", file("f", b"f", 0o644)),
            ("grows", dir(0o755, 30)),
            ("grows/new", file("n", b"n", 0o644)),
        ]);
        let r = remote(vec![
            ("private", remote_dir(2)),
            ("same", remote_dir(3)),
            ("same/f", remote_file(b"f", 0o644, 4)),
            ("grows", remote_dir(5)),
        ]);
        let p = plan(&t, &r, ("", 9), &[], false);
        // `same` keeps its remote mtime although the local one differs, as unchanged files do.
        assert_eq!(shown(&p), ["create grows/new @0", "mode private 700", "mtime grows 30"]);
        assert_eq!((p.summary.updated, p.summary.created, p.summary.unchanged), (1, 1, 3));
    }

    #[test]
    fn a_directory_replaced_by_a_file_takes_its_entries_with_it_under_delete() {
        let t = tree(&[("x", file("x", b"x", 0o644))]);
        let r = remote(vec![("x", remote_dir(2)), ("x/child", remote_file(b"c", 0o644, 3))]);
        let p = plan(&t, &r, ("", 0), &[], true);
        assert_eq!(shown(&p), ["remove x @2", "create x @0", "mtime  0"]);
    }

    #[test]
    fn an_entry_of_another_kind_is_removed_first() {
        let t = tree(&[
            ("was-dir", file("f", b"f", 0o644)),
            (
                "was-file",
                Local::Dir {
                    mode: 0o755,
                    mtime_ns: 0,
                },
            ),
        ]);
        let r = remote(vec![
            ("was-dir", remote_dir(5)),
            ("was-file", remote_file(b"x", 0o644, 6)),
        ]);
        let p = plan(&t, &r, ("", 0), &[], false);
        assert_eq!(
            shown(&p),
            [
                "remove was-dir @5",
                "remove was-file @6",
                "mkdir was-file @0",
                "create was-dir @0",
                "mtime  0",
                "mtime was-file 0",
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
        let p = plan(&t, &r, ("www", 0), &[], true);
        assert_eq!(shown(&p), ["remove www/gone @2", "remove www/gone2 @5", "mtime www 0"]);
        assert_eq!(p.summary.removed, 2);
        assert!(plan(&t, &r, ("www", 0), &[], false).ops.is_empty());
    }

    /// A local socket or FIFO is not published, counted, and its remote name is left alone
    /// by `--delete` (found by QA: a FIFO made through a mount was removed by an upload whose
    /// tree held one of the same name).
    #[test]
    fn a_skipped_special_file_is_counted_and_its_remote_name_kept_under_delete() {
        let t = tree(&[("keep", file("k", b"k", 0o644)), ("pipe", Local::Skipped)]);
        let r = remote(vec![
            ("keep", remote_file(b"k", 0o644, 6)),
            ("pipe", remote_file(b"", 0o640, 7)),
        ]);
        let p = plan(&t, &r, ("www", 0), &[], true);
        assert!(p.ops.is_empty(), "{:?}", shown(&p));
        assert_eq!((p.summary.skipped, p.summary.removed), (1, 0));
    }

    #[test]
    fn a_large_file_is_sent_as_its_chunks_and_its_manifest() {
        let data = noise(12 << 20, 1);
        let big = big_file("big", &data);
        let m = manifest_of(&big);
        let t = tree(&[("big", big.clone()), ("small", file("s", b"s", 0o644))]);
        let p = plan(&t, &BTreeMap::new(), ("", 0), &[], false);
        assert_eq!(shown(&p), ["create big @0", "create small @0", "mtime  0"]);
        assert_eq!(p.blobs.len(), m.chunks.len() + 2);
        // The file is named by its manifest, which is sent as its encoded bytes.
        let Local::File { hash, .. } = &big else { unreachable!() };
        assert_eq!(*hash, m.hash());
        assert_eq!(p.blobs.get(hash), Some(&Source::Manifest(m.encode().into())));
        // Each chunk is a range of the local file: in order, back to back, covering all of it.
        let mut at = 0u64;
        for c in &m.chunks {
            match p.blobs.get(&c.hash) {
                Some(Source::Chunk { path, offset, len }) => {
                    assert_eq!(
                        (&**path, *offset, *len),
                        (std::path::Path::new("/local/big"), at, c.len)
                    );
                    let bytes = &data[at as usize..(at + u64::from(c.len)) as usize];
                    assert_eq!(Hash::of(bytes), c.hash);
                }
                other => panic!("chunk {} planned as {other:?}", c.hash),
            }
            at += u64::from(c.len);
        }
        assert_eq!(at, data.len() as u64);
        // Bytes to send: every chunk, the manifest and the small file.
        let total: u64 = p.blobs.values().map(Source::len).sum();
        assert_eq!(total, data.len() as u64 + m.encode().len() as u64 + 1);
        assert_eq!(p.summary.bytes, data.len() as u64 + 1);
    }

    #[test]
    fn a_file_at_the_threshold_is_one_blob_and_one_byte_more_is_chunked() {
        let at = noise(CHUNK_THRESHOLD as usize, 2);
        let over = noise(CHUNK_THRESHOLD as usize + 1, 3);
        let (h, none) = content_id(&at[..], at.len() as u64).expect("a slice reads in full");
        assert!(none.is_none());
        assert_eq!(h, Hash::of(&at));
        let p = plan(
            &tree(&[("at", file("at", &at, 0o644))]),
            &BTreeMap::new(),
            ("", 0),
            &[],
            false,
        );
        assert!(matches!(p.blobs.get(&h), Some(Source::File { size, .. }) if *size == CHUNK_THRESHOLD));
        assert_eq!(p.blobs.len(), 1);
        let p = plan(
            &tree(&[("over", big_file("over", &over))]),
            &BTreeMap::new(),
            ("", 0),
            &[],
            false,
        );
        assert!(p.blobs.values().any(Source::is_manifest));
        assert!(p.blobs.values().all(|s| !matches!(s, Source::File { .. })));
    }

    #[test]
    fn identical_chunks_within_and_across_files_are_planned_once() {
        // Two copies of the same 6 MiB in one file, and a second file with the same bytes.
        let half = noise(6 << 20, 4);
        let twice = [half.clone(), half.clone()].concat();
        let (a, b) = (big_file("a", &twice), big_file("b", &half));
        let (ma, mb) = (manifest_of(&a), manifest_of(&b));
        let t = tree(&[("a", a), ("b", b)]);
        let p = plan(&t, &BTreeMap::new(), ("", 0), &[], false);
        let distinct: std::collections::HashSet<Hash> = ma.chunks.iter().chain(&mb.chunks).map(|c| c.hash).collect();
        assert!(distinct.len() < ma.chunks.len(), "the repeated half repeats chunks");
        assert_eq!(p.blobs.len(), distinct.len() + 2);
        let chunk_bytes: u64 = p.blobs.values().filter(|s| !s.is_manifest()).map(Source::len).sum();
        assert!(chunk_bytes < twice.len() as u64, "{chunk_bytes} bytes of chunks");
    }

    #[test]
    fn an_edited_large_file_plans_new_content_with_all_its_chunks() {
        // The plan lists every chunk; which of them a replica lacks is asked later (send.rs),
        // so an unchanged chunk costs a hash in a query, not its bytes.
        let mut data = noise(10 << 20, 5);
        let old = manifest_of(&big_file("f", &data));
        data[5 << 20..(5 << 20) + 4096].fill(0);
        let new = big_file("f", &data);
        let mut remote_big = remote_file(b"", 0o644, 3);
        remote_big.hash = old.hash().0.to_vec();
        let p = plan(
            &tree(&[("f", new.clone())]),
            &remote(vec![("f", remote_big)]),
            ("", 0),
            &[],
            false,
        );
        assert_eq!(shown(&p), ["content f @3"]);
        let m = manifest_of(&new);
        assert!(p.blobs.contains_key(&m.hash()));
        let kept = old.chunks.iter().filter(|c| p.blobs.contains_key(&c.hash)).count();
        assert!(kept > 0, "unchanged chunks are still planned (and then found present)");
        // An unchanged large file plans nothing.
        let mut same = remote_file(b"", 0o644, 4);
        same.hash = m.hash().0.to_vec();
        let p = plan(&tree(&[("f", new)]), &remote(vec![("f", same)]), ("", 0), &[], false);
        assert!(p.ops.is_empty() && p.blobs.is_empty());
    }

    #[test]
    fn a_manifest_keeps_its_place_after_the_chunks_when_a_small_file_has_its_bytes() {
        let data = noise(5 << 20, 6);
        let big = big_file("big", &data);
        let bytes = manifest_of(&big).encode();
        // A small file whose content is exactly the manifest's bytes (same hash).
        let t = tree(&[("a-copy", file("copy", &bytes, 0o644)), ("big", big)]);
        let p = plan(&t, &BTreeMap::new(), ("", 0), &[], false);
        assert!(p.blobs.get(&Hash::of(&bytes)).is_some_and(Source::is_manifest));
    }
}
