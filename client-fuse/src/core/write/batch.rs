//! What a batch of logged changes sends: the operations of one commit, made from the changes in
//! log order. A pure function of the changes and the versions this mount's own commits gave its
//! nodes, so it is tested on its own.
//!
//! - A file's creation and its last content become one create.
//! - A file (or symlink or special node) made in the batch and renamed in it is created under
//!   its final name: the servers never see the temporary name (an editor's or rsync's
//!   save-by-rename). Made and removed in the batch, it is not sent at all.
//! - Content changes and removes expect the node's version: the newer of the one this mount saw
//!   and the one its own last commit gave it. The check goes where the batch first changes the
//!   node: a chmod, link or rename carries no check of its own, so when one of them came first
//!   an [`Op::ExpectNode`] goes in front of it (otherwise the batch would move the version
//!   before anything checked it, and a `chmod` then a write would overwrite another client's
//!   newer content silently). Later operations on a node expect nothing more (nothing can come
//!   between operations of one commit).
//! - A rename is guarded by an [`Op::Expect`] on its target: the target name must still be free,
//!   or still hold the node this mount saw there, so a name someone else took meanwhile is never
//!   replaced silently.
use std::collections::{HashMap, HashSet};

use codafs_common::Hash;

use crate::core::types::{Op, Seen};
use crate::core::NodeKind;
use crate::wblog::Change;

/// The newer of two versions of one node this mount knows: its own last commit of it, and the
/// one it had when this mount looked (either can be the later).
pub(super) fn newest(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.max(y)),
        (x, y) => x.or(y),
    }
}

/// The version a change of `ino` that saw it at `seen` expects: the newer of that and this
/// mount's own last commit of it (in `own`).
pub(super) fn expects(own: &HashMap<u64, u64>, ino: u64, seen: u64) -> u64 {
    own.get(&ino).map_or(seen, |o| (*o).max(seen))
}

/// The operations of one commit for `changes` (see the module doc); `own` holds the version of
/// each node after this mount's last commit touching it.
pub(super) fn batch_ops(changes: &[Change], own: &HashMap<u64, u64>) -> Vec<Op> {
    batch_ops_before(changes, own, &HashMap::new())
}

/// [`batch_ops`] for a batch that later changes follow: `after` holds, per node, the version a
/// change outside the batch will check (a change queued behind it, or the content of a file
/// open for writing here, which expects the version it was opened at). A chmod, link or rename
/// the batch sends with no check of its own is guarded with that version, as one a later
/// change in the batch checks would be. Otherwise the batch would move the node's version
/// before anything checked it, and the later change, taking that version for this mount's own,
/// would overwrite another client's newer content silently.
pub(super) fn batch_ops_before(changes: &[Change], own: &HashMap<u64, u64>, after: &HashMap<u64, u64>) -> Vec<Op> {
    let mut b = Builder {
        own,
        ops: Vec::with_capacity(changes.len()),
        created: HashMap::new(),
        content_at: HashMap::new(),
        movable: HashMap::new(),
        dropped: HashSet::new(),
        touched: HashSet::new(),
        unchecked: HashMap::new(),
        guards: HashMap::new(),
    };
    for c in changes {
        b.add(&c.op);
    }
    let mut guards = b.guards;
    for (ino, at) in b.unchecked {
        if let Some(seen) = after.get(&ino) {
            let version = expects(own, ino, *seen);
            guards.insert(at, Op::ExpectNode { ino, version });
        }
    }
    b.ops
        .into_iter()
        .enumerate()
        .flat_map(|(i, op)| guards.remove(&i).into_iter().chain(op))
        .collect()
}

struct Builder<'a> {
    own: &'a HashMap<u64, u64>,
    /// Operations so far; `None`: taken out (moved later, or cancelled).
    ops: Vec<Option<Op>>,
    /// Files created in the batch: where their create is.
    created: HashMap<u64, usize>,
    /// Content changes of nodes the servers have: where the last one is.
    content_at: HashMap<u64, usize>,
    /// Non-directories created in the batch with no other name: their create and attribute
    /// changes, which can still move to the position (and name) of a later rename.
    movable: HashMap<u64, Vec<usize>>,
    /// Nodes created and removed in the batch: nothing of theirs is sent.
    dropped: HashSet<u64>,
    /// Nodes an operation of the batch changed.
    touched: HashSet<u64>,
    /// Nodes the servers have whose first change in the batch checked no version (a chmod, a
    /// link, a rename): where that change is.
    unchecked: HashMap<u64, usize>,
    /// The version check that goes in front of the operation at an index.
    guards: HashMap<usize, Op>,
}

impl Builder<'_> {
    fn push(&mut self, op: Op) -> usize {
        self.ops.push(Some(op));
        self.ops.len() - 1
    }

    /// The version a change of `s` expects: none for directories (their version moves with
    /// their entries; the servers check emptiness themselves) and for nodes this batch changed.
    fn expect(&mut self, s: &Seen) -> Option<u64> {
        if s.kind == NodeKind::Dir {
            return None;
        }
        self.check(s.ino, Some(s.version))
    }

    /// The version a change of `ino` that saw it at `seen` expects, if its check goes on the
    /// change itself; a node this batch already changed is checked in front of that first
    /// change instead (if nothing checked it there), and a node checked once expects nothing
    /// more.
    fn check(&mut self, ino: u64, seen: Option<u64>) -> Option<u64> {
        let version = newest(self.own.get(&ino).copied(), seen);
        if !self.touched.contains(&ino) {
            return version;
        }
        if let (Some(at), Some(version)) = (self.unchecked.remove(&ino), version) {
            self.guards.insert(at, Op::ExpectNode { ino, version });
        }
        None
    }

    /// Records a change of `ino` at `at` that checks no version.
    fn touch_unchecked(&mut self, ino: u64, at: usize) {
        if self.touched.insert(ino) && !self.movable.contains_key(&ino) {
            self.unchecked.insert(ino, at);
        }
    }

    /// Takes a movable node's operations out of the batch.
    fn take(&mut self, ino: u64) -> Vec<Op> {
        let at = self.movable.remove(&ino).unwrap_or_default();
        self.created.remove(&ino);
        at.into_iter().filter_map(|i| self.ops[i].take()).collect()
    }

    /// A node made and removed in this batch: none of its operations is sent.
    fn cancel(&mut self, ino: u64) {
        self.take(ino);
        self.dropped.insert(ino);
    }

    fn add(&mut self, op: &Op) {
        match op {
            Op::Create {
                ino: Some(ino), kind, ..
            } => {
                let at = self.push(op.clone());
                if *kind == NodeKind::File {
                    self.created.insert(*ino, at);
                }
                if *kind != NodeKind::Dir {
                    self.movable.insert(*ino, vec![at]);
                }
                self.touched.insert(*ino);
            }
            Op::SetContent {
                ino,
                hash,
                size,
                mtime_ns,
                expect,
            } => self.content(*ino, (*hash, *size, *mtime_ns), *expect),
            Op::SetAttr { ino, .. } => {
                if self.dropped.contains(ino) {
                    return;
                }
                let at = self.push(op.clone());
                if let Some(v) = self.movable.get_mut(ino) {
                    v.push(at);
                }
                self.touch_unchecked(*ino, at);
            }
            Op::Link { ino, .. } => {
                // A second name: the node can no longer move with one of them.
                let created = self.movable.remove(ino).is_some();
                let at = self.push(op.clone());
                if created {
                    self.touched.insert(*ino);
                } else {
                    self.touch_unchecked(*ino, at);
                }
            }
            Op::Remove {
                parent,
                name,
                seen: Some(s),
                ..
            } => {
                if self.movable.contains_key(&s.ino) {
                    // Made and removed in this batch: the servers never hear of it.
                    self.cancel(s.ino);
                    return;
                }
                let expect = self.expect(s);
                self.push(Op::Remove {
                    parent: *parent,
                    name: name.clone(),
                    seen: Some(*s),
                    expect,
                });
                self.touched.insert(s.ino);
            }
            Op::Rename {
                from_parent,
                from_name,
                to_parent,
                to_name,
                seen: Some(s),
                replaces,
            } => {
                // A target made in this batch goes with the rename: the name is free again.
                let mut replaces = *replaces;
                if let Some(t) = replaces.filter(|t| self.movable.contains_key(&t.ino)) {
                    self.cancel(t.ino);
                    replaces = None;
                }
                if self.movable.contains_key(&s.ino) {
                    self.move_created(s.ino, *to_parent, to_name, replaces);
                    return;
                }
                let guard = match replaces {
                    None => Some(0),
                    Some(t) => self.expect(&t),
                };
                if let Some(version) = guard {
                    self.push(Op::Expect {
                        parent: *to_parent,
                        name: to_name.clone(),
                        version,
                    });
                }
                let at = self.push(Op::Rename {
                    from_parent: *from_parent,
                    from_name: from_name.clone(),
                    to_parent: *to_parent,
                    to_name: to_name.clone(),
                    seen: Some(*s),
                    replaces,
                });
                if s.kind != NodeKind::Dir {
                    self.touch_unchecked(s.ino, at);
                } else {
                    self.touched.insert(s.ino);
                }
                self.touched.extend(replaces.map(|t| t.ino));
            }
            op => {
                self.push(op.clone());
            }
        }
    }

    /// A content change: merged into the file's create, or into an earlier content change of
    /// the same file in the batch (only the last content is sent).
    fn content(&mut self, ino: u64, (hash, size, mtime_ns): (Hash, u64, i64), expect: Option<u64>) {
        if self.dropped.contains(&ino) {
            return;
        }
        if let Some(Some(Op::Create {
            hash: h,
            size: s,
            mtime_ns: m,
            ..
        })) = self.created.get(&ino).and_then(|i| self.ops.get_mut(*i))
        {
            (*h, *s, *m) = (Some(hash), size, mtime_ns);
            return;
        }
        if let Some(Some(Op::SetContent {
            hash: h,
            size: s,
            mtime_ns: m,
            ..
        })) = self.content_at.get(&ino).and_then(|i| self.ops.get_mut(*i))
        {
            (*h, *s, *m) = (hash, size, mtime_ns);
            return;
        }
        let expect = self.check(ino, expect);
        let at = self.push(Op::SetContent {
            expect,
            ino,
            hash,
            size,
            mtime_ns,
        });
        self.content_at.insert(ino, at);
        self.touched.insert(ino);
    }

    /// A node made in this batch and renamed: created under its final name, at the rename's
    /// place; a node the target held goes first (if it is still the one this mount saw).
    fn move_created(&mut self, ino: u64, to_parent: u64, to_name: &str, replaces: Option<Seen>) {
        let moved = self.take(ino);
        if let Some(t) = replaces {
            let expect = self.expect(&t);
            self.push(Op::Remove {
                parent: to_parent,
                name: to_name.to_string(),
                seen: Some(t),
                expect,
            });
            self.touched.insert(t.ino);
        }
        let mut at = Vec::with_capacity(moved.len());
        for mut op in moved {
            if let Op::Create { parent, name, kind, .. } = &mut op {
                (*parent, *name) = (to_parent, to_name.to_string());
                let i = self.ops.len();
                if *kind == NodeKind::File {
                    self.created.insert(ino, i);
                }
            }
            at.push(self.push(op));
        }
        // Its create (without a name taken by someone else meanwhile) is the rename's guard.
        self.movable.insert(ino, at);
    }
}

/// The content hashes a batch's operations reference.
pub(super) fn referenced(ops: &[Op]) -> Vec<Hash> {
    let mut v: Vec<Hash> = ops
        .iter()
        .filter_map(|o| match o {
            Op::Create { hash, .. } => *hash,
            Op::SetContent { hash, .. } => Some(*hash),
            _ => None,
        })
        .collect();
    v.sort();
    v.dedup();
    v
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(in crate::core::write) fn change(seq: u64, op: Op) -> Change {
        Change {
            seq,
            volume: "www".into(),
            uid: 1,
            op,
            content: None,
        }
    }

    pub(in crate::core::write) fn create(ino: u64, name: &str) -> Op {
        Op::Create {
            ino: Some(ino),
            parent: 1,
            name: name.into(),
            kind: NodeKind::File,
            mode: 0o644,
            hash: Some(Hash::of(b"")),
            symlink_target: String::new(),
            rdev: 0,
            uid: 1,
            gid: 1,
            size: 0,
            mtime_ns: 1,
        }
    }

    pub(in crate::core::write) fn content(ino: u64, data: &[u8], expect: Option<u64>) -> Op {
        Op::SetContent {
            expect,
            ino,
            hash: Hash::of(data),
            size: data.len() as u64,
            mtime_ns: 2,
        }
    }

    fn seen(ino: u64, version: u64) -> Seen {
        Seen {
            ino,
            version,
            kind: NodeKind::File,
        }
    }

    fn rename(from: &str, to: &str, s: Seen, replaces: Option<Seen>) -> Op {
        Op::Rename {
            from_parent: 1,
            from_name: from.into(),
            to_parent: 1,
            to_name: to.into(),
            seen: Some(s),
            replaces,
        }
    }

    fn remove(name: &str, s: Seen) -> Op {
        Op::Remove {
            parent: 1,
            name: name.into(),
            seen: Some(s),
            expect: None,
        }
    }

    fn names(ops: &[Op]) -> Vec<String> {
        ops.iter()
            .map(|o| match o {
                Op::Create { name, .. } => format!("create {name}"),
                Op::SetContent { ino, expect, .. } => format!("content {ino} {expect:?}"),
                Op::SetAttr { ino, .. } => format!("attr {ino}"),
                Op::Remove { name, expect, .. } => format!("remove {name} {expect:?}"),
                Op::Rename { from_name, to_name, .. } => format!("rename {from_name} {to_name}"),
                Op::Expect { name, version, .. } => format!("expect {name} {version}"),
                Op::ExpectNode { ino, version } => format!("check {ino} {version}"),
                o => format!("{o:?}"),
            })
            .collect()
    }

    #[test]
    fn a_files_creation_and_last_content_become_one_create() {
        let changes = vec![
            change(1, create(10, "a")),
            change(2, content(10, b"first", None)),
            change(3, content(10, b"second", None)),
            change(4, content(20, b"old file", Some(7))),
            change(5, content(20, b"old file again", Some(7))),
            change(6, content(30, b"touched before", Some(4))),
        ];
        let own = HashMap::from([(30, 9)]);
        let ops = batch_ops(&changes, &own);
        assert_eq!(ops.len(), 3, "{ops:?}");
        let Op::Create { hash, size, .. } = &ops[0] else {
            panic!()
        };
        assert_eq!((*hash, *size), (Some(Hash::of(b"second")), 6));
        assert_eq!(ops[1], content(20, b"old file again", Some(7)));
        assert_eq!(
            ops[2],
            content(30, b"touched before", Some(9)),
            "our own later commit's version"
        );
        let own = HashMap::from([(30, 2)]);
        let later = batch_ops(&changes[5..], &own);
        assert_eq!(
            later[0],
            content(30, b"touched before", Some(4)),
            "a later version seen at open"
        );
        assert_eq!(referenced(&ops), {
            let mut v = vec![
                Hash::of(b"second"),
                Hash::of(b"old file again"),
                Hash::of(b"touched before"),
            ];
            v.sort();
            v
        });
    }

    #[test]
    fn a_file_saved_by_rename_reaches_the_servers_under_its_final_name_only() {
        let attr = Op::SetAttr {
            ino: 10,
            mode: Some(0o600),
            uid: None,
            gid: None,
            mtime_ns: None,
            atime_ns: Some(5),
        };
        // rsync: write .index.html.XXXX, set its mode and times, rename it over index.html.
        let changes = vec![
            change(1, create(10, ".index.html.tmp")),
            change(2, content(10, b"new page", None)),
            change(3, attr.clone()),
            change(
                4,
                rename(".index.html.tmp", "index.html", seen(10, 0), Some(seen(20, 7))),
            ),
            change(5, content(10, b"newer page", None)),
        ];
        let ops = batch_ops(&changes, &HashMap::from([(20, 8)]));
        assert_eq!(
            names(&ops),
            ["remove index.html Some(8)", "create index.html", "attr 10"],
            "{ops:?}"
        );
        let Op::Create { hash, .. } = &ops[1] else { panic!() };
        assert_eq!(
            *hash,
            Some(Hash::of(b"newer page")),
            "the last content goes with the create"
        );
        // Onto a free name: the create alone (its own check refuses a name taken meanwhile).
        let ops = batch_ops(&changes[..2], &HashMap::new());
        let mut free = changes[..2].to_vec();
        free.push(change(3, rename(".index.html.tmp", "index.html", seen(10, 0), None)));
        let moved = batch_ops(&free, &HashMap::new());
        assert_eq!(names(&moved), ["create index.html"]);
        assert_eq!(names(&ops), ["create .index.html.tmp"]);
    }

    #[test]
    fn made_and_removed_in_one_batch_is_never_sent_and_renames_are_guarded() {
        let changes = vec![
            change(1, create(10, "tmp")),
            change(2, content(10, b"scratch", None)),
            change(3, remove("tmp", seen(10, 0))),
            change(4, rename("old", "new", seen(30, 4), None)),
            change(5, rename("a", "b", seen(40, 4), Some(seen(50, 6)))),
            change(6, remove("gone", seen(60, 3))),
            change(7, content(40, b"after the rename", Some(4))),
        ];
        let ops = batch_ops(&changes, &HashMap::from([(60, 9)]));
        assert_eq!(
            names(&ops),
            [
                "expect new 0",
                "rename old new",
                "expect b 6",
                "check 40 4",
                "rename a b",
                "remove gone Some(9)",
                "content 40 None",
            ],
            "{ops:?}"
        );
        assert!(referenced(&ops) == vec![Hash::of(b"after the rename")]);
        // A node made here and renamed over another made here: only the survivor is sent.
        let changes = vec![
            change(1, create(10, "a")),
            change(2, create(11, "b")),
            change(3, rename("a", "b", seen(10, 0), Some(seen(11, 0)))),
        ];
        assert_eq!(names(&batch_ops(&changes, &HashMap::new())), ["create b"]);
    }

    fn attr(ino: u64) -> Op {
        Op::SetAttr {
            ino,
            mode: Some(0o600),
            uid: None,
            gid: None,
            mtime_ns: None,
            atime_ns: None,
        }
    }

    fn link(ino: u64, name: &str) -> Op {
        Op::Link {
            ino,
            parent: 1,
            name: name.into(),
            kind: NodeKind::File,
        }
    }

    #[test]
    fn a_node_changed_first_by_a_chmod_link_or_rename_is_checked_in_front_of_that_change() {
        // chmod, then new content: the content's check goes in front of the chmod, which would
        // otherwise move the version first and let the content replace a newer one unchecked.
        let changes = vec![
            change(1, attr(20)),
            change(2, content(20, b"mine", Some(7))),
            change(3, content(20, b"mine again", Some(7))),
        ];
        assert_eq!(
            names(&batch_ops(&changes, &HashMap::new())),
            ["check 20 7", "attr 20", "content 20 None"]
        );
        // This mount's own later commit of the node is the one to expect.
        assert_eq!(
            names(&batch_ops(&changes, &HashMap::from([(20, 9)]))),
            ["check 20 9", "attr 20", "content 20 None"]
        );
        // A link, then a remove of the other name: the remove's check goes first.
        let changes = vec![change(1, link(30, "second")), change(2, remove("first", seen(30, 5)))];
        assert_eq!(
            names(&batch_ops(&changes, &HashMap::new())),
            [
                "check 30 5",
                "Link { ino: 30, parent: 1, name: \"second\", kind: File }",
                "remove first None"
            ]
        );
        // Checked once is enough: two chmods and two contents make one check.
        let changes = vec![
            change(1, attr(40)),
            change(2, attr(40)),
            change(3, content(40, b"x", Some(3))),
            change(4, remove("f", seen(40, 3))),
        ];
        assert_eq!(
            names(&batch_ops(&changes, &HashMap::new())),
            ["check 40 3", "attr 40", "attr 40", "content 40 None", "remove f None"]
        );
        // A chmod alone checks nothing (chmod and another client's content both stand), nor does
        // a change of a node made in the batch, nor a content whose version is unknown.
        let changes = vec![
            change(1, attr(50)),
            change(2, create(60, "new")),
            change(3, attr(60)),
            change(4, content(60, b"y", None)),
            change(5, attr(70)),
            change(6, content(70, b"z", None)),
        ];
        assert_eq!(
            names(&batch_ops(&changes, &HashMap::new())),
            ["attr 50", "create new", "attr 60", "attr 70", "content 70 None"]
        );
    }

    #[test]
    fn a_chmod_that_a_change_outside_the_batch_will_check_carries_that_check() {
        // Node 20 is open for writing (opened at version 7), node 30 has a content queued
        // behind the batch (seen at 4, this mount's own commit since gave it 6); node 40 is not
        // named outside; node 50's chmod follows its content in the batch, which checks it.
        let changes = vec![
            change(1, attr(20)),
            change(2, rename("a", "b", seen(30, 4), None)),
            change(3, attr(40)),
            change(4, content(50, b"x", Some(2))),
            change(5, attr(50)),
            change(6, create(60, "new")),
            change(7, attr(60)),
        ];
        let after = HashMap::from([(20, 7), (30, 4), (50, 9), (60, 1)]);
        assert_eq!(
            names(&batch_ops_before(&changes, &HashMap::from([(30, 6)]), &after)),
            [
                "check 20 7",
                "attr 20",
                "expect b 0",
                "check 30 6",
                "rename a b",
                "attr 40",
                "content 50 Some(2)",
                "attr 50",
                "create new",
                "attr 60"
            ]
        );
        // Nothing outside: no check.
        assert_eq!(
            names(&batch_ops_before(&changes[..1], &HashMap::new(), &HashMap::new())),
            ["attr 20"]
        );
    }
}
