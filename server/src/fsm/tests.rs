//! Unit tests of the apply logic, each command applied to the in-memory reference state and to
//! real RocksDB tables at once ([`Twin`]), which must agree after every command.
use super::mem::MemState;
use super::twin::Twin;
use super::*;

fn admin() -> Actor {
    Actor {
        user: "admin".into(),
        admin: true,
    }
}

/// A bootstrapped state with volume `www` (owned by `alice`, quota 1000 bytes / 10 files).
fn setup() -> Twin {
    let mut s = Twin::default();
    let acct = |n: &str, admin| AccountRec {
        name: n.into(),
        admin,
        password_hash: String::new(),
        created_ns: 0,
    };
    s.apply(
        1,
        &Command::Bootstrap {
            cluster_id: "c".into(),
            key: [1; 32],
            admin: acct("admin", true),
        },
    )
    .unwrap();
    // Same index as the volume below: an index only stamps versions, and tests start at 3.
    s.apply(
        2,
        &Command::PutAccount {
            actor: admin(),
            account: acct("alice", false),
            create: true,
        },
    )
    .unwrap();
    let spec = VolumeSpec {
        name: "www".into(),
        owner: "alice".into(),
        quota_bytes: 1000,
        quota_files: 10,
        write_quorum: 0,
        public_read: true,
    };
    s.apply(
        2,
        &Command::CreateVolume {
            actor: admin(),
            spec,
            now_ns: 5,
        },
    )
    .unwrap();
    s
}

/// Operations without expected versions.
fn ops_of(kinds: Vec<OpKind>) -> Vec<Op> {
    kinds
        .into_iter()
        .map(|kind| Op {
            expect_version: None,
            kind,
        })
        .collect()
}

fn commit(s: &mut Twin, index: u64, user: &str, ops: Vec<OpKind>) -> Response {
    let ops = ops_of(ops);
    s.apply(
        index,
        &Command::Commit {
            actor: Actor {
                user: user.into(),
                admin: false,
            },
            volume: "www".into(),
            ops,
            expect_volume_version: None,
            now_ns: index as i64 * 10,
            request: None,
        },
    )
}

fn file(parent: &str, name: &str, content: &[u8]) -> OpKind {
    OpKind::Create {
        parent: NodeRef::Path(parent.into()),
        name: name.into(),
        kind: Kind::File,
        mode: 0o644,
        hash: Some(Hash::of(content)),
        size: content.len() as u64,
        symlink: String::new(),
        replace: false,
        uid: 0,
        gid: 0,
        mtime_ns: 0,
    }
}

fn dir(parent: &str, name: &str) -> OpKind {
    OpKind::Create {
        parent: NodeRef::Path(parent.into()),
        name: name.into(),
        kind: Kind::Dir,
        mode: 0o755,
        hash: None,
        size: 0,
        symlink: String::new(),
        replace: false,
        uid: 0,
        gid: 0,
        mtime_ns: 0,
    }
}

fn lookup(s: &MemState, path: &str) -> Option<ObjectRec> {
    let vol = s.volumes.get("www")?;
    let mut cur = make_ino(vol.id, VOLUME_ROOT_INODE);
    for p in split_path(path).ok()? {
        cur = *s.dirents.get(&(cur, p.to_string()))?;
    }
    s.objects.get(&cur).cloned()
}

#[test]
fn batch_creates_tree_and_stamps_volume() {
    let mut s = setup();
    let r = commit(
        &mut s,
        3,
        "alice",
        vec![
            dir("", "css"),
            file("css", "site.css", b"body{}"),
            file("", "index.html", b"hi"),
        ],
    );
    let Ok(Outcome::Committed { version, created, .. }) = r else {
        panic!("{r:?}")
    };
    assert_eq!(version, 3);
    assert_eq!(created.len(), 3);
    assert_eq!(lookup(&s, "css/site.css").unwrap().size, 6);
    let v = &s.volumes["www"];
    assert_eq!((v.version, v.used_files, v.used_bytes), (3, 3, 8));
    assert_eq!(s.blobrefs[&Hash::of(b"hi")], 1);
    let ch = &s.changes[&(v.id, 3)];
    assert!(ch.dirs.contains(&make_ino(v.id, VOLUME_ROOT_INODE)));
    assert_eq!(lookup(&s, "").unwrap().nlink, 3, "root gains a link for css/");
}

#[test]
fn failed_commit_changes_nothing() {
    let mut s = setup();
    commit(&mut s, 3, "alice", vec![file("", "a", b"1")]).unwrap();
    let before = s.clone();
    // Second op fails (parent missing): the first must not land either.
    let r = commit(&mut s, 4, "alice", vec![file("", "b", b"2"), file("nope", "c", b"3")]);
    assert!(matches!(r, Err(ApplyError::NotFound(_))), "{r:?}");
    assert_eq!(*s, before);
}

#[test]
fn permissions_quota_and_names() {
    let mut s = setup();
    assert!(matches!(
        commit(&mut s, 3, "mallory", vec![file("", "x", b"1")]),
        Err(ApplyError::Denied(_))
    ));
    let big = vec![0u8; 1001];
    let r = commit(&mut s, 4, "alice", vec![file("", "big", &big)]);
    assert_eq!(
        r,
        Err(ApplyError::Quota {
            what: "bytes".into(),
            limit: 1000,
            would_be: 1001
        })
    );
    assert!(r.unwrap_err().to_string().contains("over by 1"));
    for bad in ["..", ".", "a/b", "a\0b", ""] {
        assert!(
            matches!(
                commit(&mut s, 5, "alice", vec![file("", bad, b"1")]),
                Err(ApplyError::InvalidName(_))
            ),
            "{bad:?}"
        );
    }
    assert!(matches!(
        commit(&mut s, 6, "alice", vec![file("../etc", "x", b"1")]),
        Err(ApplyError::InvalidName(_))
    ));
    let many: Vec<_> = (0..11).map(|i| file("", &format!("f{i}"), b"")).collect();
    assert!(matches!(
        commit(&mut s, 7, "alice", many),
        Err(ApplyError::Quota { .. })
    ));
    assert_eq!(s.volumes["www"].used_files, 0);
}

#[test]
fn expected_versions_detect_conflicts() {
    let mut s = setup();
    commit(&mut s, 3, "alice", vec![file("", "a", b"1")]).unwrap();
    let a = lookup(&s, "a").unwrap();
    let set = |v| Op {
        expect_version: Some(v),
        kind: OpKind::SetContent {
            node: NodeRef::Ino(a.ino),
            hash: Hash::of(b"2"),
            size: 1,
            mtime_ns: 0,
        },
    };
    let cmd = |op| Command::Commit {
        actor: admin(),
        volume: "www".into(),
        ops: vec![op],
        expect_volume_version: None,
        now_ns: 1,
        request: None,
    };
    assert!(matches!(
        s.apply(4, &cmd(set(2))),
        Err(ApplyError::Conflict {
            expected: 2,
            actual: 3,
            ..
        })
    ));
    s.apply(5, &cmd(set(3))).unwrap();
    assert_eq!(lookup(&s, "a").unwrap().hash, Some(Hash::of(b"2")));
    assert!(
        !s.blobrefs.contains_key(&Hash::of(b"1")),
        "old content is no longer referenced"
    );
    // expect_version 0 means "must not exist".
    let create = Op {
        expect_version: Some(0),
        kind: file("", "a", b"3"),
    };
    assert!(matches!(s.apply(6, &cmd(create)), Err(ApplyError::Conflict { .. })));
}

/// A write-back mount guards a logged rename with an expect operation on its target: the
/// whole commit applies only if the name is still free (0) or still at the version it saw.
#[test]
fn an_expect_operation_guards_a_name_and_changes_nothing() {
    let mut s = setup();
    commit(&mut s, 3, "alice", vec![file("", "a", b"1")]).unwrap();
    let cmd = |ops: Vec<Op>| Command::Commit {
        actor: admin(),
        volume: "www".into(),
        ops,
        expect_volume_version: None,
        now_ns: 1,
        request: None,
    };
    let expect = |name: &str, v: Option<u64>| Op {
        expect_version: v,
        kind: OpKind::Expect {
            parent: NodeRef::Path(String::new()),
            name: name.into(),
        },
    };
    let plain = |kind| Op {
        expect_version: None,
        kind,
    };
    // The name taken meanwhile: nothing of the commit applies.
    let r = s.apply(4, &cmd(vec![plain(file("", "b", b"2")), expect("a", Some(0))]));
    assert!(
        matches!(
            r,
            Err(ApplyError::Conflict {
                expected: 0,
                actual: 3,
                ..
            })
        ),
        "{r:?}"
    );
    assert!(lookup(&s, "b").is_none(), "a failed commit changes nothing");
    s.apply(5, &cmd(vec![expect("a", Some(3)), expect("free", Some(0))]))
        .unwrap();
    assert_eq!(lookup(&s, "a").unwrap().version, 3, "an expect changes nothing");
    let r = s.apply(6, &cmd(vec![expect("a", None)]));
    assert!(matches!(r, Err(ApplyError::Invalid(_))), "{r:?}");
    let r = s.apply(7, &cmd(vec![expect("../x", Some(0))]));
    assert!(r.is_err(), "bad names are refused: {r:?}");
}

#[test]
fn remove_and_rename_rules() {
    let mut s = setup();
    commit(
        &mut s,
        3,
        "alice",
        vec![dir("", "d"), file("d", "f", b"12"), dir("", "e")],
    )
    .unwrap();
    let rm = |name: &str, recursive| OpKind::Remove {
        parent: NodeRef::Path(String::new()),
        name: name.into(),
        recursive,
    };
    assert!(matches!(
        commit(&mut s, 4, "alice", vec![rm("d", false)]),
        Err(ApplyError::NotEmpty(_))
    ));
    let mv = |from: &str, to_parent: &str, to: &str| OpKind::Rename {
        from_parent: NodeRef::Path(String::new()),
        from_name: from.into(),
        to_parent: NodeRef::Path(to_parent.into()),
        to_name: to.into(),
    };
    assert!(
        matches!(
            commit(&mut s, 5, "alice", vec![mv("d", "d", "x")]),
            Err(ApplyError::Invalid(_))
        ),
        "into itself"
    );
    commit(&mut s, 6, "alice", vec![mv("e", "d", "e2")]).unwrap();
    assert!(lookup(&s, "d/e2").is_some() && lookup(&s, "e").is_none());
    assert_eq!(lookup(&s, "d").unwrap().nlink, 3);
    commit(&mut s, 7, "alice", vec![rm("d", true)]).unwrap();
    assert!(lookup(&s, "d").is_none());
    assert!(
        s.objects.len() == 1 && s.dirents.is_empty(),
        "only the root remains: {:?}",
        s.objects
    );
    let v = &s.volumes["www"];
    assert_eq!((v.used_files, v.used_bytes), (0, 0));
    assert!(s.blobrefs.is_empty());
}

#[test]
fn change_records_carry_every_name_they_touch_and_the_nodes_they_delete() {
    let mut s = setup();
    commit(
        &mut s,
        3,
        "alice",
        vec![dir("", "d"), file("d", "f", b"12"), file("", "g", b"3")],
    )
    .unwrap();
    let vol = s.volumes["www"].clone();
    let root = make_ino(vol.id, VOLUME_ROOT_INODE);
    let (d, f, g) = (
        lookup(&s, "d").unwrap().ino,
        lookup(&s, "d/f").unwrap().ino,
        lookup(&s, "g").unwrap().ino,
    );
    let names = |s: &Twin, v: u64| s.changes[&(vol.id, v)].names.clone().expect("names kept");
    let rec = |dir, name: &str, target| NameRec {
        dir,
        name: name.into(),
        target,
    };
    assert_eq!(
        names(&s, 3),
        vec![
            rec(root, "d", Some((d, Kind::Dir))),
            rec(root, "g", Some((g, Kind::File))),
            rec(d, "f", Some((f, Kind::File)))
        ]
    );
    // A rename over an existing name: the old name goes, the new one leads to the moved node,
    // and the node it replaced is deleted.
    let mv = OpKind::Rename {
        from_parent: NodeRef::Path("d".into()),
        from_name: "f".into(),
        to_parent: NodeRef::Path(String::new()),
        to_name: "g".into(),
    };
    commit(&mut s, 4, "alice", vec![mv]).unwrap();
    assert_eq!(
        names(&s, 4),
        vec![rec(root, "g", Some((f, Kind::File))), rec(d, "f", None)]
    );
    assert_eq!(s.changes[&(vol.id, 4)].removed, vec![g]);
    commit(&mut s, 5, "alice", vec![remove("", "d", true)]).unwrap();
    assert_eq!(names(&s, 5), vec![rec(root, "d", None)]);
    assert_eq!(s.changes[&(vol.id, 5)].removed, vec![d]);
}

#[test]
fn change_records_written_before_names_were_kept_still_decode() {
    #[derive(serde::Serialize)]
    struct Old {
        inos: Vec<u64>,
        dirs: Vec<u64>,
    }
    let old = bincode::serialize(&Old {
        inos: vec![7, 8],
        dirs: vec![7],
    })
    .unwrap();
    let rec = ChangeRec::decode(&old).unwrap();
    assert_eq!(
        (rec.inos, rec.dirs, rec.names, rec.removed),
        (vec![7, 8], vec![7], None, vec![])
    );
    let new = ChangeRec {
        inos: vec![1],
        dirs: vec![1],
        names: Some(vec![NameRec {
            dir: 1,
            name: "a".into(),
            target: None,
        }]),
        removed: vec![2],
        perms: vec![1],
    };
    assert_eq!(ChangeRec::decode(&bincode::serialize(&new).unwrap()).unwrap(), new);
    // Written before permission changes were kept: the rest stays, no permission changes.
    #[derive(serde::Serialize)]
    struct V2 {
        inos: Vec<u64>,
        dirs: Vec<u64>,
        names: Option<Vec<NameRec>>,
        removed: Vec<u64>,
    }
    let v2 = bincode::serialize(&V2 {
        inos: new.inos.clone(),
        dirs: new.dirs.clone(),
        names: new.names.clone(),
        removed: new.removed.clone(),
    })
    .unwrap();
    let rec = ChangeRec::decode(&v2).unwrap();
    assert_eq!(rec, ChangeRec { perms: vec![], ..new });
    assert!(ChangeRec::decode(&[1, 2, 3]).is_err(), "garbage is an error");
}

#[test]
fn identical_content_is_referenced_once_per_file() {
    let mut s = setup();
    commit(&mut s, 3, "alice", vec![file("", "a", b"same"), file("", "b", b"same")]).unwrap();
    assert_eq!(s.blobrefs[&Hash::of(b"same")], 2);
    let rm = OpKind::Remove {
        parent: NodeRef::Path(String::new()),
        name: "a".into(),
        recursive: false,
    };
    commit(&mut s, 4, "alice", vec![rm]).unwrap();
    assert_eq!(s.blobrefs[&Hash::of(b"same")], 1);
}

#[test]
fn accounts_and_volume_settings_need_admin_and_stay_consistent() {
    let mut s = setup();
    let alice = Actor {
        user: "alice".into(),
        admin: false,
    };
    let acct = |n: &str| AccountRec {
        name: n.into(),
        admin: false,
        password_hash: "h".into(),
        created_ns: 0,
    };
    assert!(matches!(
        s.apply(
            3,
            &Command::PutAccount {
                actor: alice.clone(),
                account: acct("bob"),
                create: true
            }
        ),
        Err(ApplyError::Denied(_))
    ));
    s.apply(
        4,
        &Command::PutAccount {
            actor: admin(),
            account: acct("bob"),
            create: true,
        },
    )
    .unwrap();
    assert!(matches!(
        s.apply(
            5,
            &Command::PutAccount {
                actor: admin(),
                account: acct("bob"),
                create: true
            }
        ),
        Err(ApplyError::Exists(_))
    ));
    assert!(matches!(
        s.apply(
            6,
            &Command::PutAccount {
                actor: admin(),
                account: acct("carol"),
                create: false
            }
        ),
        Err(ApplyError::NoSuchAccount(_))
    ));
    // bob may not write www until he is a writer.
    assert!(matches!(
        commit(&mut s, 7, "bob", vec![file("", "b", b"1")]),
        Err(ApplyError::Denied(_))
    ));
    let add = VolumeChanges {
        add_writers: vec!["bob".into()],
        quota_files: Some(5),
        ..Default::default()
    };
    s.apply(
        8,
        &Command::SetVolume {
            actor: admin(),
            name: "www".into(),
            changes: add,
        },
    )
    .unwrap();
    commit(&mut s, 9, "bob", vec![file("", "b", b"1")]).unwrap();
    assert_eq!(s.volumes["www"].quota_files, 5);
    let bad = VolumeChanges {
        owner: Some("nobody".into()),
        ..Default::default()
    };
    assert!(matches!(
        s.apply(
            10,
            &Command::SetVolume {
                actor: admin(),
                name: "www".into(),
                changes: bad
            }
        ),
        Err(ApplyError::NoSuchAccount(_))
    ));
    // alice owns www: she cannot be removed until it has another owner.
    assert!(matches!(
        s.apply(
            11,
            &Command::RemoveAccount {
                actor: admin(),
                name: "alice".into()
            }
        ),
        Err(ApplyError::Invalid(_))
    ));
    s.apply(
        12,
        &Command::RemoveAccount {
            actor: admin(),
            name: "bob".into(),
        },
    )
    .unwrap();
    assert!(!s.accounts.contains_key("bob"));
}

#[test]
fn key_rotation_keeps_old_tokens_until_retired() {
    let mut s = setup();
    let rot = |new_key, retire| Command::RotateKey {
        actor: admin(),
        new_key,
        retire,
    };
    s.apply(3, &rot(Some([2; 32]), None)).unwrap();
    let c = s.cluster.clone().unwrap();
    assert_eq!(c.current_key(), Some((2, [2; 32])));
    assert_eq!(c.key(1), Some([1; 32]), "the old key still verifies");
    assert!(
        matches!(s.apply(4, &rot(None, Some(2))), Err(ApplyError::Invalid(_))),
        "cannot retire the current key"
    );
    s.apply(5, &rot(None, Some(1))).unwrap();
    assert_eq!(s.cluster.clone().unwrap().key(1), None);
    assert!(matches!(s.apply(6, &rot(None, Some(7))), Err(ApplyError::NoSuchKey(7))));
    let user = Command::RotateKey {
        actor: Actor {
            user: "alice".into(),
            admin: false,
        },
        new_key: Some([3; 32]),
        retire: None,
    };
    assert!(matches!(s.apply(7, &user), Err(ApplyError::Denied(_))));
}

#[test]
fn absurd_sizes_are_refused_not_overflowed() {
    let mut s = setup_unlimited();
    let huge = |name: &str, size: u64| sized_file(name, Hash::of(b"x"), size, false);
    let before = s.clone();
    assert!(matches!(
        commit(&mut s, 3, "alice", vec![huge("a", u64::MAX)]),
        Err(ApplyError::Invalid(_))
    ));
    commit(
        &mut s,
        4,
        "alice",
        vec![huge("a", MAX_FILE_SIZE), huge("b", MAX_FILE_SIZE)],
    )
    .unwrap();
    assert_eq!(s.volumes["www"].used_bytes, 2 * MAX_FILE_SIZE);
    assert_ne!(*s, before);
}

fn link(node: &str, parent: &str, name: &str) -> OpKind {
    OpKind::Link {
        node: NodeRef::Path(node.into()),
        parent: NodeRef::Path(parent.into()),
        name: name.into(),
    }
}

fn remove(parent: &str, name: &str, recursive: bool) -> OpKind {
    OpKind::Remove {
        parent: NodeRef::Path(parent.into()),
        name: name.into(),
        recursive,
    }
}

#[test]
fn hard_links_share_one_object_until_the_last_name_goes() {
    let mut s = setup();
    commit(&mut s, 3, "alice", vec![dir("", "d"), file("", "a", b"hello")]).unwrap();
    commit(&mut s, 4, "alice", vec![link("a", "d", "b")]).unwrap();
    let a = lookup(&s, "a").unwrap();
    let b = lookup(&s, "d/b").unwrap();
    assert_eq!(a.ino, b.ino, "both names reach one object");
    assert_eq!(a.nlink, 2);
    let vol = s.volumes.get("www").unwrap().clone();
    assert_eq!(vol.used_files, 2, "a link is not a new object");
    assert_eq!(vol.used_bytes, 5, "a link adds no bytes");

    // Renaming one name onto the other does nothing (POSIX).
    commit(
        &mut s,
        5,
        "alice",
        vec![OpKind::Rename {
            from_parent: NodeRef::Path(String::new()),
            from_name: "a".into(),
            to_parent: NodeRef::Path("d".into()),
            to_name: "b".into(),
        }],
    )
    .unwrap();
    assert!(lookup(&s, "a").is_some() && lookup(&s, "d/b").is_some());

    // Removing the directory holding one name keeps the object under the other.
    commit(&mut s, 6, "alice", vec![remove("", "d", true)]).unwrap();
    let a = lookup(&s, "a").unwrap();
    assert_eq!(a.nlink, 1);
    assert_eq!(s.blobrefs.get(&Hash::of(b"hello")).copied(), Some(1));
    let vol = s.volumes.get("www").unwrap().clone();
    assert_eq!((vol.used_files, vol.used_bytes), (1, 5));

    commit(&mut s, 7, "alice", vec![remove("", "a", false)]).unwrap();
    assert!(lookup(&s, "a").is_none());
    assert!(!s.objects.contains_key(&a.ino));
    assert_eq!(s.blobrefs.get(&Hash::of(b"hello")).copied().unwrap_or(0), 0);
    let vol = s.volumes.get("www").unwrap().clone();
    assert_eq!((vol.used_files, vol.used_bytes), (0, 0));
}

#[test]
fn links_are_refused_for_directories_existing_names_and_bad_names() {
    let mut s = setup();
    commit(&mut s, 3, "alice", vec![dir("", "d"), file("", "a", b"x")]).unwrap();
    let before = s.clone();
    assert!(matches!(
        commit(&mut s, 4, "alice", vec![link("d", "", "d2")]),
        Err(ApplyError::Denied(_))
    ));
    assert!(matches!(
        commit(&mut s, 5, "alice", vec![link("a", "", "d")]),
        Err(ApplyError::Exists(_))
    ));
    assert!(matches!(
        commit(&mut s, 6, "alice", vec![link("a", "", "..")]),
        Err(ApplyError::InvalidName(_))
    ));
    assert!(matches!(
        commit(&mut s, 7, "bob", vec![link("a", "", "b")]),
        Err(ApplyError::Denied(_))
    ));
    assert_eq!(*s, before, "refused links change nothing");
}

/// A commit answers, per operation, the version its node had just before it: what a client
/// that chmods or renames without a version check needs to tell whether anyone else's commit
/// came between its view and its change.
#[test]
fn a_commit_tells_the_version_each_changed_node_had_before_it() {
    let mut s = setup();
    commit(&mut s, 3, "alice", vec![file("", "a", b"x"), file("", "b", b"y")]).unwrap();
    commit(&mut s, 4, "alice", vec![file("", "c", b"z")]).unwrap();
    let chmod = |name: &str| OpKind::SetAttr {
        node: NodeRef::Path(name.into()),
        mode: Some(0o600),
        uid: None,
        gid: None,
        mtime_ns: None,
        atime_ns: None,
    };
    let mv = |from: &str, to: &str| OpKind::Rename {
        from_parent: NodeRef::Path(String::new()),
        from_name: from.into(),
        to_parent: NodeRef::Path(String::new()),
        to_name: to.into(),
    };
    let r = commit(
        &mut s,
        5,
        "alice",
        vec![chmod("a"), chmod("a"), mv("c", "d"), dir("", "e"), mv("b", "b")],
    );
    let Ok(Outcome::Committed { prior, .. }) = r else {
        panic!("{r:?}")
    };
    // The second chmod of a finds the first's version; a created node and a rename onto
    // itself (nothing moved) tell nothing.
    assert_eq!(prior, vec![3, 5, 4, 0, 0]);
    // The change names the node whose mode changed (mounts then drop its older attributes).
    let vol = s.volumes["www"].clone();
    let a = lookup(&s, "a").unwrap().ino;
    assert_eq!(s.changes[&(vol.id, 5)].perms, vec![a]);
    // Times alone, or a mode set to what it was, are no permission change.
    let touch = OpKind::SetAttr {
        node: NodeRef::Path("a".into()),
        mode: Some(0o600),
        uid: None,
        gid: None,
        mtime_ns: Some(7),
        atime_ns: None,
    };
    commit(&mut s, 6, "alice", vec![touch]).unwrap();
    assert!(s.changes[&(vol.id, 6)].perms.is_empty());
    // A directory's owner and group count too.
    let chown = OpKind::SetAttr {
        node: NodeRef::Path("e".into()),
        mode: None,
        uid: Some(7),
        gid: Some(8),
        mtime_ns: None,
        atime_ns: None,
    };
    commit(&mut s, 7, "alice", vec![chown]).unwrap();
    let e = lookup(&s, "e").unwrap().ino;
    assert_eq!(s.changes[&(vol.id, 7)].perms, vec![e]);
}

#[test]
fn set_attr_honours_omitted_times() {
    let mut s = setup();
    commit(&mut s, 3, "alice", vec![file("", "a", b"x")]).unwrap();
    let set = |atime, mtime| OpKind::SetAttr {
        node: NodeRef::Path("a".into()),
        mode: None,
        uid: None,
        gid: None,
        mtime_ns: mtime,
        atime_ns: atime,
    };
    commit(&mut s, 4, "alice", vec![set(Some(111), Some(222))]).unwrap();
    let a = lookup(&s, "a").unwrap();
    assert_eq!((a.atime_ns, a.mtime_ns), (111, 222));
    commit(&mut s, 5, "alice", vec![set(None, Some(333))]).unwrap();
    let a = lookup(&s, "a").unwrap();
    assert_eq!((a.atime_ns, a.mtime_ns), (111, 333), "atime omitted stays");
    commit(&mut s, 6, "alice", vec![set(Some(444), None)]).unwrap();
    let a = lookup(&s, "a").unwrap();
    assert_eq!((a.atime_ns, a.mtime_ns), (444, 333), "mtime omitted stays");
}

#[test]
fn a_commit_request_applies_once_and_its_record_expires() {
    let mut s = setup();
    let id = [9u8; 16];
    let cmd = |now_ns| Command::Commit {
        actor: Actor {
            user: "alice".into(),
            admin: false,
        },
        volume: "www".into(),
        ops: vec![Op {
            expect_version: None,
            kind: file("", "a", b"x"),
        }],
        expect_volume_version: None,
        now_ns,
        request: Some(id),
    };
    let first = s.apply(3, &cmd(30)).unwrap();
    let after_first = s.clone();
    // The same request again (a retry after a lost reply): the first answer (without the
    // versions before each operation, which are not remembered), nothing applied.
    let Outcome::Committed { version, created, .. } = first else {
        panic!("{first:?}")
    };
    let again = s.apply(4, &cmd(40)).unwrap();
    assert_eq!(
        again,
        Outcome::Committed {
            version,
            created,
            prior: Vec::new()
        }
    );
    assert_eq!(*s, after_first);
    // Long after, the record is trimmed by later commits and the id is forgotten.
    let later = 3 + REQUEST_RETAIN + 1;
    commit(&mut s, later, "alice", vec![dir("", "d")]).unwrap();
    assert!(s.requests.is_empty(), "expired request records are trimmed");
}

/// Account `n` (with the admin role if `admin`), password hash "h".
fn acct(n: &str, admin: bool) -> AccountRec {
    AccountRec {
        name: n.into(),
        admin,
        password_hash: "h".into(),
        created_ns: 0,
    }
}

/// The admin creates (`create`) or changes account `a`.
fn put_account(a: AccountRec, create: bool) -> Command {
    Command::PutAccount {
        actor: admin(),
        account: a,
        create,
    }
}

/// An admin cannot take the admin role from their own account (no way to lock every admin
/// out); a removed account leaves the writer lists, so a new account of that name starts with
/// no rights; new account names are from a safe character set.
#[test]
fn accounts_keep_an_admin_and_leave_no_rights_behind() {
    let mut s = setup();
    let r = s.apply(3, &put_account(acct("admin", false), false));
    assert!(
        matches!(&r, Err(ApplyError::Invalid(m)) if m.contains("their own account")),
        "{r:?}"
    );
    assert!(s.accounts["admin"].admin);
    for bad in ["nl\nx", "-x", "z\x1b[31mRED", "a b"] {
        let r = s.apply(4, &put_account(acct(bad, false), true));
        assert!(matches!(r, Err(ApplyError::InvalidName(_))), "{bad:?}: {r:?}");
    }
    s.apply(5, &put_account(acct("carol", false), true)).unwrap();
    s.apply(
        6,
        &Command::SetVolume {
            actor: admin(),
            name: "www".into(),
            changes: VolumeChanges {
                add_writers: vec!["carol".into()],
                ..Default::default()
            },
        },
    )
    .unwrap();
    s.apply(
        7,
        &Command::RemoveAccount {
            actor: admin(),
            name: "carol".into(),
        },
    )
    .unwrap();
    assert!(s.volumes["www"].writers.is_empty(), "{:?}", s.volumes["www"].writers);
    s.apply(8, &put_account(acct("carol", false), true)).unwrap();
    let r = commit(&mut s, 9, "carol", vec![file("", "x", b"x")]);
    assert!(matches!(r, Err(ApplyError::Denied(_))), "{r:?}");
}

/// Two admins who demote each other at the same moment: both commands were proposed while
/// both held the role, but the second applies after its proposer lost it, so it is refused
/// and one admin remains. The same holds for an admin removed while its command was in flight.
#[test]
fn an_admin_demoted_while_a_command_is_in_flight_acts_as_a_user() {
    let mut s = setup();
    s.apply(3, &put_account(acct("bea", true), true)).unwrap();
    let as_admin = |user: &str| Actor {
        user: user.into(),
        admin: true,
    };
    let demote = |by: &str, who: &str| Command::PutAccount {
        actor: as_admin(by),
        account: acct(who, false),
        create: false,
    };
    s.apply(4, &demote("admin", "bea")).unwrap();
    let r = s.apply(5, &demote("bea", "admin"));
    assert!(matches!(r, Err(ApplyError::Denied(_))), "{r:?}");
    assert!(s.accounts["admin"].admin, "the last admin keeps the role");
    assert!(!s.accounts["bea"].admin);

    // Removed while in flight: what the removed admin proposed is refused.
    s.apply(6, &put_account(acct("cy", true), true)).unwrap();
    s.apply(
        7,
        &Command::RemoveAccount {
            actor: admin(),
            name: "cy".into(),
        },
    )
    .unwrap();
    let r = s.apply(
        8,
        &Command::RemoveAccount {
            actor: as_admin("cy"),
            name: "admin".into(),
        },
    );
    assert!(matches!(r, Err(ApplyError::Denied(_))), "{r:?}");
    assert!(s.accounts.contains_key("admin"));
}

#[test]
fn account_changes_and_lost_write_rights_revoke_tokens() {
    let mut s = setup();
    let generation = |s: &MemState, u: &str| s.token_generation(u).unwrap();
    let alice = generation(&s, "alice");
    s.apply(3, &put_account(acct("bob", false), true)).unwrap();
    assert_eq!(generation(&s, "bob"), 3, "creating an account starts a generation");
    // A new password or role: generation = the entry's index.
    s.apply(4, &put_account(acct("bob", false), false)).unwrap();
    assert_eq!(generation(&s, "bob"), 4);
    assert_eq!(generation(&s, "alice"), alice, "other accounts keep theirs");

    // Gaining write rights revokes nothing; losing them does, in the same entry.
    let set = |changes| Command::SetVolume {
        actor: admin(),
        name: "www".into(),
        changes,
    };
    s.apply(
        5,
        &set(VolumeChanges {
            add_writers: vec!["bob".into()],
            ..Default::default()
        }),
    )
    .unwrap();
    assert_eq!(generation(&s, "bob"), 4);
    s.apply(
        6,
        &set(VolumeChanges {
            remove_writers: vec!["bob".into()],
            ..Default::default()
        }),
    )
    .unwrap();
    assert_eq!(generation(&s, "bob"), 6);
    // An owner who stays a writer keeps their tokens; the next owner change takes them.
    s.apply(
        7,
        &set(VolumeChanges {
            owner: Some("bob".into()),
            add_writers: vec!["alice".into()],
            ..Default::default()
        }),
    )
    .unwrap();
    assert_eq!((generation(&s, "alice"), generation(&s, "bob")), (alice, 6));
    s.apply(
        8,
        &set(VolumeChanges {
            owner: Some("admin".into()),
            ..Default::default()
        }),
    )
    .unwrap();
    assert_eq!((generation(&s, "alice"), generation(&s, "bob")), (alice, 8));
    // An admin who stops owning a volume loses no right (admins write every volume): its
    // tokens (the init credential among them) stay valid.
    s.apply(
        9,
        &set(VolumeChanges {
            owner: Some("alice".into()),
            ..Default::default()
        }),
    )
    .unwrap();
    assert_eq!(generation(&s, "admin"), 0);

    // `user revoke`: admins for anyone, users for themselves only.
    let revoke = |user: &str, admin, name: &str| Command::RevokeTokens {
        actor: Actor {
            user: user.into(),
            admin,
        },
        name: name.into(),
    };
    assert!(matches!(
        s.apply(19, &revoke("alice", false, "bob")),
        Err(ApplyError::Denied(_))
    ));
    assert_eq!(generation(&s, "bob"), 8, "a refused revocation changes nothing");
    s.apply(20, &revoke("alice", false, "alice")).unwrap();
    assert_eq!(generation(&s, "alice"), 20);
    s.apply(21, &revoke("admin", true, "bob")).unwrap();
    assert_eq!(generation(&s, "bob"), 21);
    assert!(matches!(
        s.apply(22, &revoke("admin", true, "nobody")),
        Err(ApplyError::NoSuchAccount(_))
    ));

    // Removal revokes, and the generation outlives the account: re-creating the name does not
    // bring old tokens back.
    s.apply(
        23,
        &Command::RemoveAccount {
            actor: admin(),
            name: "bob".into(),
        },
    )
    .unwrap();
    assert_eq!(generation(&s, "bob"), 23);
    s.apply(24, &put_account(acct("bob", false), true)).unwrap();
    assert_eq!(generation(&s, "bob"), 24);
}

#[test]
fn join_tokens_admit_one_server_until_they_expire() {
    let mut s = setup();
    let alice = Actor {
        user: "alice".into(),
        admin: false,
    };
    let issue = |actor: Actor, h: u8, expires_ns: i64, now_ns: i64| Command::IssueJoinToken {
        actor,
        secret_hash: [h; 32],
        expires_ns,
        now_ns,
    };
    let spend = |h: u8, node_id: u64, now_ns: i64| Command::UseJoinToken {
        secret_hash: [h; 32],
        node_id,
        now_ns,
    };
    assert!(matches!(
        s.apply(3, &issue(alice, 1, 100, 10)),
        Err(ApplyError::Denied(_))
    ));
    s.apply(4, &issue(admin(), 1, 100, 10)).unwrap();
    assert!(matches!(
        s.apply(5, &issue(admin(), 1, 100, 10)),
        Err(ApplyError::Exists(_))
    ));
    // Unknown token, then the first server spends it; a retry by the same server is fine.
    let denied = |r: Response, what: &str| match r {
        Err(ApplyError::Denied(m)) => assert!(m.contains(what), "{m}"),
        other => panic!("expected a refusal containing {what:?}, got {other:?}"),
    };
    denied(s.apply(6, &spend(9, 7, 20)), "unknown");
    s.apply(7, &spend(1, 7, 20)).unwrap();
    s.apply(8, &spend(1, 7, 30)).unwrap();
    assert_eq!(s.join_tokens[&[1; 32]].used_by, Some(7));
    denied(s.apply(9, &spend(1, 8, 30)), "already used by server 7");
    // An unused token stops working at its expiry time.
    s.apply(10, &issue(admin(), 2, 100, 10)).unwrap();
    denied(s.apply(11, &spend(2, 8, 100)), "expired");
    // A removed server can never join again under its node id.
    s.apply(
        12,
        &Command::ForgetServer {
            actor: admin(),
            node_id: 8,
            now_ns: 50,
        },
    )
    .unwrap();
    s.apply(13, &issue(admin(), 3, i64::MAX / 2, 60)).unwrap();
    denied(s.apply(14, &spend(3, 8, 70)), "removed");
    // Expired tokens are trimmed a day after they expire, when a new one is made.
    s.apply(15, &issue(admin(), 4, i64::MAX, 100 + JOIN_TOKEN_KEEP_NS + 1))
        .unwrap();
    assert!(!s.join_tokens.contains_key(&[1; 32]) && !s.join_tokens.contains_key(&[2; 32]));
    assert!(s.join_tokens.contains_key(&[3; 32]) && s.join_tokens.contains_key(&[4; 32]));
}

fn special(name: &str, kind: Kind) -> OpKind {
    OpKind::Create {
        parent: NodeRef::Path(String::new()),
        name: name.into(),
        kind,
        mode: 0o620,
        hash: None,
        size: 0,
        symlink: String::new(),
        replace: false,
        uid: 7,
        gid: 8,
        mtime_ns: 0,
    }
}

#[test]
fn special_nodes_are_metadata_with_their_device_numbers_and_no_bytes() {
    let mut s = setup();
    let kinds = [
        ("pipe", Kind::Fifo),
        ("sock", Kind::Socket),
        ("null", Kind::CharDevice(0x103)),
        ("loop", Kind::BlockDevice(0x700)),
    ];
    commit(&mut s, 3, "alice", kinds.iter().map(|(n, k)| special(n, *k)).collect()).unwrap();
    for (name, kind) in kinds {
        let o = lookup(&s, name).unwrap();
        assert_eq!(
            (o.kind, o.mode, o.uid, o.gid, o.size, o.hash),
            (kind, 0o620, 7, 8, 0, None)
        );
        assert!(o.kind.is_special());
    }
    let v = &s.volumes["www"];
    assert_eq!((v.used_files, v.used_bytes), (4, 0));
    // They rename, link and go like files; a file may replace one.
    commit(
        &mut s,
        4,
        "alice",
        vec![
            OpKind::Rename {
                from_parent: NodeRef::Path(String::new()),
                from_name: "null".into(),
                to_parent: NodeRef::Path(String::new()),
                to_name: "null2".into(),
            },
            OpKind::Remove {
                parent: NodeRef::Path(String::new()),
                name: "sock".into(),
                recursive: false,
            },
        ],
    )
    .unwrap();
    assert_eq!(lookup(&s, "null2").unwrap().kind, Kind::CharDevice(0x103));
    let mut over = file("", "pipe", b"x");
    if let OpKind::Create { replace, .. } = &mut over {
        *replace = true;
    }
    commit(&mut s, 5, "alice", vec![over]).unwrap();
    assert_eq!(lookup(&s, "pipe").unwrap().kind, Kind::File);
    assert_eq!(s.volumes["www"].used_files, 3);
}

#[test]
fn reserved_node_ids_name_new_nodes_once_and_only_in_their_volume() {
    let mut s = setup();
    let r = commit(&mut s, 3, "alice", vec![OpKind::Reserve { count: 100 }]);
    let Ok(Outcome::Committed { created, .. }) = r else {
        panic!("{r:?}")
    };
    let first = created[0];
    let vol = s.volumes["www"].clone();
    assert_eq!(codafs_common::split_ino(first), (vol.id, VOLUME_ROOT_INODE + 1));
    assert_eq!(vol.next_inode, VOLUME_ROOT_INODE + 101, "the ids are set aside");
    let at = |ino: u64, op: OpKind| OpKind::CreateAt {
        ino,
        create: Box::new(op),
    };
    // A directory and a file in it, named by the client, in one commit.
    let r = commit(
        &mut s,
        4,
        "alice",
        vec![at(first + 5, dir("", "d")), at(first + 6, file("d", "f", b"x"))],
    );
    let Ok(Outcome::Committed { created, .. }) = r else {
        panic!("{r:?}")
    };
    assert_eq!(created, vec![first + 5, first + 6]);
    assert_eq!(lookup(&s, "d/f").unwrap().ino, first + 6);
    // Plain creates keep allocating past the reservation.
    let r = commit(&mut s, 5, "alice", vec![file("", "g", b"y")]);
    let Ok(Outcome::Committed { created, .. }) = r else {
        panic!("{r:?}")
    };
    assert_eq!(codafs_common::split_ino(created[0]).1, VOLUME_ROOT_INODE + 101);
    let before = s.clone();
    let refused = [
        (at(first + 6, file("", "again", b"z")), "an id in use"),
        (at(first + 500, file("", "h", b"z")), "an id never reserved"),
        (at(make_ino(vol.id + 1, 3), file("", "h", b"z")), "another volume's id"),
        (at(first + 7, link("g", "", "h")), "not a create"),
        (OpKind::Reserve { count: 0 }, "nothing to reserve"),
        (OpKind::Reserve { count: (1 << 16) + 1 }, "too many at once"),
    ];
    for (i, (op, why)) in refused.into_iter().enumerate() {
        let r = commit(&mut s, 6 + i as u64, "alice", vec![op]);
        assert!(r.is_err(), "{why}: {r:?}");
        assert_eq!(*s, before, "{why}: a refused commit changes nothing");
    }
    let mut replace = file("", "g", b"new");
    if let OpKind::Create { replace: r, .. } = &mut replace {
        *r = true;
    }
    assert!(commit(&mut s, 20, "alice", vec![at(first + 8, replace)]).is_err());
    // Only writers of the volume may reserve.
    assert!(commit(&mut s, 21, "mallory", vec![OpKind::Reserve { count: 1 }]).is_err());
}

/// Volume `www` without a byte quota, so files over the chunk threshold fit.
fn setup_unlimited() -> Twin {
    let mut s = setup();
    let unlimited = VolumeChanges {
        quota_bytes: Some(0),
        ..Default::default()
    };
    s.apply(
        2,
        &Command::SetVolume {
            actor: admin(),
            name: "www".into(),
            changes: unlimited,
        },
    )
    .unwrap();
    s
}

/// A file in the root whose content is named by `hash` and is `size` bytes (a manifest when
/// chunked).
fn sized_file(name: &str, hash: Hash, size: u64, replace: bool) -> OpKind {
    sized_file_in("", name, hash, size, replace)
}

fn sized_file_in(parent: &str, name: &str, hash: Hash, size: u64, replace: bool) -> OpKind {
    OpKind::Create {
        parent: NodeRef::Path(parent.into()),
        name: name.into(),
        kind: Kind::File,
        mode: 0o644,
        hash: Some(hash),
        size,
        symlink: String::new(),
        replace,
        uid: 0,
        gid: 0,
        mtime_ns: 0,
    }
}

fn set_content(name: &str, hash: Hash, size: u64) -> OpKind {
    OpKind::SetContent {
        node: NodeRef::Path(name.into()),
        hash,
        size,
        mtime_ns: 0,
    }
}

/// (blob references, manifest references) of `h`.
fn counts(s: &MemState, h: &Hash) -> (u64, u64) {
    (
        s.blobrefs.get(h).copied().unwrap_or(0),
        s.manifestrefs.get(h).copied().unwrap_or(0),
    )
}

#[test]
fn chunked_contents_are_counted_as_blobs_and_as_manifests() {
    use codafs_common::chunks::CHUNK_THRESHOLD;
    let mut s = setup_unlimited();
    let (m1, m2, small) = (Hash::of(b"manifest 1"), Hash::of(b"manifest 2"), Hash::of(b"small"));
    let (big, bigger) = (CHUNK_THRESHOLD + 1, 3 * CHUNK_THRESHOLD);
    // Two files with the same chunked content: two references of each kind.
    commit(
        &mut s,
        3,
        "alice",
        vec![sized_file("a", m1, big, false), sized_file("b", m1, big, false)],
    )
    .unwrap();
    assert_eq!(counts(&s, &m1), (2, 2));
    // New chunked content for one: the old manifest loses a reference, the new one gains one.
    commit(&mut s, 4, "alice", vec![set_content("a", m2, bigger)]).unwrap();
    assert_eq!((counts(&s, &m1), counts(&s, &m2)), ((1, 1), (1, 1)));
    // Content that is not chunked: the manifest goes, the small blob is no manifest.
    commit(&mut s, 5, "alice", vec![set_content("a", small, 5)]).unwrap();
    assert_eq!((counts(&s, &m2), counts(&s, &small)), ((0, 0), (1, 0)));
    // And back to chunked content by replacing the name.
    commit(&mut s, 6, "alice", vec![sized_file("a", m2, bigger, true)]).unwrap();
    assert_eq!((counts(&s, &m2), counts(&s, &small)), ((1, 1), (0, 0)));
    // A hard link adds no reference; removing both names drops them all.
    commit(&mut s, 7, "alice", vec![link("b", "", "b2")]).unwrap();
    assert_eq!(counts(&s, &m1), (1, 1));
    commit(
        &mut s,
        8,
        "alice",
        vec![remove("", "a", false), remove("", "b", false), remove("", "b2", false)],
    )
    .unwrap();
    assert!(
        s.blobrefs.is_empty() && s.manifestrefs.is_empty(),
        "{:?}",
        s.manifestrefs
    );
    // A refused commit leaves both counts as they were.
    commit(&mut s, 9, "alice", vec![sized_file("c", m1, big, false)]).unwrap();
    let before = s.clone();
    let r = commit(
        &mut s,
        10,
        "alice",
        vec![set_content("c", m2, bigger), sized_file("c", m1, big, false)],
    );
    assert!(matches!(r, Err(ApplyError::Exists(_))), "{r:?}");
    assert_eq!(*s, before);
}

#[test]
fn chunked_contents_in_a_removed_tree_are_released() {
    let mut s = setup_unlimited();
    let m = Hash::of(b"manifest");
    let size = codafs_common::chunks::CHUNK_THRESHOLD * 2;
    let in_dir = |name: &str| sized_file_in("d", name, m, size, false);
    commit(&mut s, 3, "alice", vec![dir("", "d"), in_dir("x"), in_dir("y")]).unwrap();
    assert_eq!(counts(&s, &m), (2, 2));
    commit(&mut s, 4, "alice", vec![remove("", "d", true)]).unwrap();
    assert_eq!(counts(&s, &m), (0, 0));
    assert!(s.manifestrefs.is_empty());
}

#[test]
fn contents_up_to_the_threshold_never_count_as_manifests() {
    use codafs_common::chunks::CHUNK_THRESHOLD;
    let mut s = setup_unlimited();
    let (h, e) = (Hash::of(b"four mebibytes"), Hash::of(b""));
    commit(
        &mut s,
        3,
        "alice",
        vec![sized_file("a", h, CHUNK_THRESHOLD, false), sized_file("e", e, 0, false)],
    )
    .unwrap();
    commit(&mut s, 4, "alice", vec![set_content("e", h, CHUNK_THRESHOLD)]).unwrap();
    assert_eq!(counts(&s, &h), (2, 0));
    assert!(s.manifestrefs.is_empty());
    commit(&mut s, 5, "alice", vec![remove("", "a", false), remove("", "e", false)]).unwrap();
    assert!(s.blobrefs.is_empty() && s.manifestrefs.is_empty());
}

#[test]
fn deleting_a_volume_drops_its_tree_history_and_references_and_only_an_admin_may() {
    let mut s = setup();
    let shared = b"shared page";
    let ok = commit(
        &mut s,
        3,
        "alice",
        vec![dir("", "d"), file("d", "a", shared), file("", "b", b"only here")],
    );
    assert!(ok.is_ok(), "{ok:?}");
    // A second volume holds the same content: its reference must survive.
    let spec = VolumeSpec {
        name: "other".into(),
        owner: "alice".into(),
        quota_bytes: 0,
        quota_files: 0,
        write_quorum: 0,
        public_read: true,
    };
    s.apply(
        4,
        &Command::CreateVolume {
            actor: admin(),
            spec: spec.clone(),
            now_ns: 5,
        },
    )
    .unwrap();
    let other = Command::Commit {
        actor: admin(),
        volume: "other".into(),
        ops: vec![Op {
            expect_version: None,
            kind: file("", "copy", shared),
        }],
        expect_volume_version: None,
        now_ns: 50,
        request: None,
    };
    s.apply(5, &other).unwrap();
    let www_id = s.volumes["www"].id;
    assert!(s.changes.keys().any(|(v, _)| *v == www_id));

    let by = |actor: Actor| Command::DeleteVolume {
        actor,
        name: "www".into(),
        now_ns: 60,
    };
    let alice = Actor {
        user: "alice".into(),
        admin: false,
    };
    assert!(
        matches!(s.apply(6, &by(alice)), Err(ApplyError::Denied(_))),
        "the owner is no admin"
    );
    assert!(s.volumes.contains_key("www"));
    s.apply(7, &by(admin())).unwrap();

    assert!(!s.volumes.contains_key("www"));
    assert!(
        s.objects.keys().all(|ino| split_ino(*ino).0 != www_id),
        "every node of the volume is gone"
    );
    assert!(!s.changes.keys().any(|(v, _)| *v == www_id), "its history too");
    assert_eq!(
        s.blobrefs.get(&Hash::of(shared)),
        Some(&1),
        "still held by the other volume"
    );
    assert_eq!(s.blobrefs.get(&Hash::of(b"only here")), None, "left for GC");
    assert!(matches!(s.apply(8, &by(admin())), Err(ApplyError::NoSuchVolume(_))));
    // The name is free again; the id is not reused.
    let again = VolumeSpec {
        name: "www".into(),
        ..spec
    };
    s.apply(
        9,
        &Command::CreateVolume {
            actor: admin(),
            spec: again,
            now_ns: 90,
        },
    )
    .unwrap();
    assert_ne!(s.volumes["www"].id, www_id);
    assert!(lookup(&s, "b").is_none());
}

/// The leader's bound on what one commit's recursive removes delete: nodes are counted through
/// the whole tree and summed over the commit's removes; a plain file counts one, a missing
/// target nothing (the apply reports it).
#[test]
fn recursive_removes_are_bounded_per_commit() {
    let mut s = setup();
    commit(
        &mut s,
        3,
        "alice",
        vec![
            dir("", "d"),
            file("d", "a", b"1"),
            file("d", "b", b"2"),
            dir("d", "e"),
            file("d/e", "f", b"3"),
            file("", "g", b"4"),
        ],
    )
    .unwrap();
    let vol = s.volumes.get("www").unwrap().clone();
    let check = |kinds, limit| bounds::check_remove_bound(&*s, &vol, &ops_of(kinds), limit);
    // d holds 5 nodes with itself.
    assert!(check(vec![remove("", "d", true)], 5).is_ok());
    let e = check(vec![remove("", "d", true)], 4).unwrap_err();
    assert!(e.to_string().contains("more than 4 files and directories"), "{e}");
    // Summed over the commit: d (5) and g (1).
    assert!(check(vec![remove("", "d", true), remove("", "g", true)], 6).is_ok());
    assert!(check(vec![remove("", "d", true), remove("", "g", true)], 5).is_err());
    // Non-recursive removes and missing targets are not counted here.
    assert!(check(vec![remove("", "d", false), remove("", "nothing", true)], 0).is_ok());
    // Through an ino reference too.
    let d = lookup(&s, "d").unwrap().ino;
    let by_ino = OpKind::Remove {
        parent: NodeRef::Ino(d),
        name: "e".into(),
        recursive: true,
    };
    assert!(check(vec![by_ino.clone()], 2).is_ok());
    assert!(check(vec![by_ino], 1).is_err());
    // A tree renamed first and removed under its new name is counted too.
    let mv = OpKind::Rename {
        from_parent: NodeRef::Path(String::new()),
        from_name: "d".into(),
        to_parent: NodeRef::Path(String::new()),
        to_name: "x".into(),
    };
    assert!(check(vec![mv.clone(), remove("", "x", true)], 4).is_err());
    assert!(check(vec![mv, remove("", "x", true)], 5).is_ok());
}

/// An rmdir sees the names its own commit removed or added before it: emptied in the same
/// commit, a directory goes; given a name in the same commit, it stays.
#[test]
fn an_rmdir_counts_the_names_its_own_commit_changed() {
    let mut s = setup();
    commit(
        &mut s,
        3,
        "alice",
        vec![dir("", "d"), file("d", "a", b"1"), file("d", "b", b"2"), dir("", "e")],
    )
    .unwrap();
    assert!(matches!(
        commit(
            &mut s,
            4,
            "alice",
            vec![remove("d", "a", false), remove("", "d", false)]
        ),
        Err(ApplyError::NotEmpty(_))
    ));
    assert!(matches!(
        commit(&mut s, 5, "alice", vec![file("e", "x", b"3"), remove("", "e", false)]),
        Err(ApplyError::NotEmpty(_))
    ));
    commit(
        &mut s,
        6,
        "alice",
        vec![remove("d", "a", false), remove("d", "b", false), remove("", "d", false)],
    )
    .unwrap();
    commit(&mut s, 7, "alice", vec![remove("", "e", false)]).unwrap();
    assert!(lookup(&s, "d").is_none() && lookup(&s, "e").is_none());
}

/// The leader's measure of a commit's apply: directory renames into a deep tree read an
/// ancestor walk each, counted on a scratch overlay that changes nothing; the bound from the
/// operations alone is above what is read.
#[test]
fn a_commits_apply_is_measured_without_changing_anything() {
    let mut s = setup();
    let room = VolumeChanges {
        quota_files: Some(0),
        ..Default::default()
    };
    let set = Command::SetVolume {
        actor: admin(),
        name: "www".into(),
        changes: room,
    };
    s.apply(2, &set).unwrap();
    let chain: Vec<OpKind> = (0..50).map(|d| dir(&vec!["d"; d].join("/"), "d")).collect();
    commit(&mut s, 3, "alice", chain).unwrap();
    let beside: Vec<OpKind> = (0..20).map(|i| dir("", &format!("m{i}"))).collect();
    commit(&mut s, 4, "alice", beside).unwrap();
    let bottom = lookup(&s, &vec!["d"; 50].join("/")).unwrap().ino;
    let renames = ops_of(
        (0..20)
            .map(|i| OpKind::Rename {
                from_parent: NodeRef::Path(String::new()),
                from_name: format!("m{i}"),
                to_parent: NodeRef::Ino(bottom),
                to_name: format!("m{i}"),
            })
            .collect(),
    );
    let cmd = Command::Commit {
        actor: admin(),
        volume: "www".into(),
        ops: renames.clone(),
        expect_volume_version: None,
        now_ns: 50,
        request: None,
    };
    // 20 walks of 50 levels: over 1,000 reads, under 2,000.
    assert!(!cost::within(&*s, 5, &cmd, 1000).unwrap());
    assert!(cost::within(&*s, 5, &cmd, 2000).unwrap());
    assert!(cost::reads_bound(&renames) > 20 * MAX_DIR_DEPTH as u64);
    assert!(lookup(&s, "m0").is_some(), "nothing was applied");
    // Path references count their components in the bound.
    let deep = ops_of(vec![file(&vec!["d"; 50].join("/"), "f", b"x")]);
    assert_eq!(cost::reads_bound(&deep), 16 + 100);
}
