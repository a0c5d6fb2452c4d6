//! Reference-model tests of the core: an in-memory fake server holds the truth; random
//! sequences of local reads, remote changes (delivered as callbacks), server outages and a tiny
//! cache that keeps evicting are checked against it. The invariant: whatever the core serves is
//! the server's current content (or a clean error while disconnected), never content a received
//! change replaced.
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use codafs_common::{make_ino, Hash};
use codafs_proto::pb;
use proptest::prelude::*;

use super::remote::{ChangeStream, ChunkSink, Fetched, Remote, RemoteVolume};
use super::write::{Caller, WriteState};
use super::*;
use crate::cache::blobs::BlobCache;
use crate::cache::meta::MetaStore;
use crate::tokens::TokenTable;

const VOL: u32 = 1;

#[derive(Default)]
struct Truth {
    objects: HashMap<u64, pb::Attr>,
    dirs: HashMap<u64, BTreeMap<String, u64>>,
    blobs: HashMap<Hash, Vec<u8>>,
    version: u64,
    next_ino: u64,
    down: bool,
}

/// An in-memory server with failure injection.
struct FakeRemote(Mutex<Truth>);

fn root() -> u64 {
    make_ino(VOL, 1)
}

fn dir_attr(ino: u64, parent: u64, version: u64) -> pb::Attr {
    pb::Attr {
        ino,
        kind: pb::ObjectKind::Directory as i32,
        mode: 0o755,
        nlink: 2,
        version,
        parent,
        ..Default::default()
    }
}

impl FakeRemote {
    fn new() -> Self {
        let mut t = Truth {
            version: 1,
            next_ino: 2,
            ..Default::default()
        };
        t.objects.insert(root(), dir_attr(root(), root(), 1));
        t.dirs.insert(root(), BTreeMap::new());
        FakeRemote(Mutex::new(t))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Truth> {
        self.0.lock().unwrap()
    }

    fn check_up(&self) -> Result<(), FsError> {
        if self.lock().down {
            Err(FsError::Disconnected("fake server down".into()))
        } else {
            Ok(())
        }
    }

    /// Resolves a directory path, creating missing directories.
    fn dir(t: &mut Truth, path: &[&str]) -> (u64, Vec<u64>) {
        let mut cur = root();
        let mut changed_dirs = Vec::new();
        for p in path {
            let existing = t.dirs.get(&cur).and_then(|d| d.get(*p)).copied();
            cur = match existing {
                Some(i) => i,
                None => {
                    let ino = make_ino(VOL, t.next_ino);
                    t.next_ino += 1;
                    let v = t.version;
                    t.objects.insert(ino, dir_attr(ino, cur, v));
                    t.dirs.insert(ino, BTreeMap::new());
                    t.dirs.entry(cur).or_default().insert(p.to_string(), ino);
                    changed_dirs.push(cur);
                    ino
                }
            };
        }
        (cur, changed_dirs)
    }

    /// Writes a file (in place if it exists) and returns the change event.
    fn write(&self, path: &[&str], name: &str, content: &[u8]) -> pb::ChangeEvent {
        let mut t = self.lock();
        t.version += 1;
        let v = t.version;
        let (d, mut dirs) = Self::dir(&mut t, path);
        let h = Hash::of(content);
        t.blobs.insert(h, content.to_vec());
        let existing = t.dirs.get(&d).and_then(|m| m.get(name)).copied();
        let ino = match existing {
            Some(i) => i,
            None => {
                let i = make_ino(VOL, t.next_ino);
                t.next_ino += 1;
                t.dirs.entry(d).or_default().insert(name.to_string(), i);
                dirs.push(d);
                i
            }
        };
        let attr = pb::Attr {
            ino,
            kind: pb::ObjectKind::File as i32,
            size: content.len() as u64,
            mode: 0o644,
            nlink: 1,
            hash: bytes::Bytes::copy_from_slice(&h.0),
            version: v,
            parent: d,
            ..Default::default()
        };
        t.objects.insert(ino, attr);
        dirs.sort_unstable();
        dirs.dedup();
        pb::ChangeEvent {
            version: v,
            inos: vec![ino],
            dirs,
            history_gone: false,
        }
    }

    /// Removes a file if present and returns the change event.
    fn remove(&self, path: &[&str], name: &str) -> Option<pb::ChangeEvent> {
        let mut t = self.lock();
        let mut d = root();
        for p in path {
            d = *t.dirs.get(&d)?.get(*p)?;
        }
        let ino = t.dirs.get_mut(&d)?.remove(name)?;
        t.objects.remove(&ino);
        t.version += 1;
        Some(pb::ChangeEvent {
            version: t.version,
            inos: vec![ino],
            dirs: vec![d],
            history_gone: false,
        })
    }

    /// The truth for a path: Some(content) or None.
    fn content(&self, path: &[&str], name: &str) -> Option<Vec<u8>> {
        let t = self.lock();
        let mut cur = root();
        for p in path {
            cur = *t.dirs.get(&cur)?.get(*p)?;
        }
        let ino = *t.dirs.get(&cur)?.get(name)?;
        let h = Hash::from_slice(&t.objects.get(&ino)?.hash).ok()?;
        t.blobs.get(&h).cloned()
    }
}

impl Remote for FakeRemote {
    async fn volumes(&self) -> Result<Vec<RemoteVolume>, FsError> {
        self.check_up()?;
        Ok(vec![RemoteVolume {
            name: "www".into(),
            id: VOL,
            root_ino: root(),
            version: self.lock().version,
            public_read: true,
            owner: "alice".into(),
            writers: vec!["bob".into()],
            write_quorum: 2,
        }])
    }

    async fn getattr(&self, ino: u64) -> Result<Fetched<pb::Attr>, FsError> {
        self.check_up()?;
        let t = self.lock();
        let a = t.objects.get(&ino).cloned().ok_or(FsError::NotFound)?;
        Ok(Fetched {
            newest: a.version,
            applied: t.version,
            value: a,
        })
    }

    async fn readdir(&self, ino: u64) -> Result<Fetched<Vec<(String, pb::Attr)>>, FsError> {
        self.check_up()?;
        let t = self.lock();
        let d = t.dirs.get(&ino).ok_or(FsError::NotFound)?;
        let value: Vec<(String, pb::Attr)> = d
            .iter()
            .filter_map(|(n, i)| t.objects.get(i).map(|a| (n.clone(), a.clone())))
            .collect();
        Ok(Fetched {
            newest: value
                .iter()
                .map(|(_, a)| a.version)
                .chain(t.objects.get(&ino).map(|a| a.version))
                .max()
                .unwrap_or(0),
            applied: t.version,
            value,
        })
    }

    async fn fetch_blob(&self, blob: &crate::transport::BlobRef, sink: &mut dyn ChunkSink) -> Result<(), FsError> {
        self.check_up()?;
        let data = self.lock().blobs.get(&blob.hash).cloned().ok_or(FsError::NotFound)?;
        // Two chunks, to exercise incremental verification.
        let mid = data.len() / 2;
        sink.write(&data[..mid])?;
        sink.write(&data[mid..])?;
        Ok(())
    }

    async fn stamps(&self, volumes: Vec<String>) -> Result<Vec<pb::VolumeStamp>, FsError> {
        self.check_up()?;
        let v = self.lock().version;
        Ok(volumes
            .into_iter()
            .map(|volume| pb::VolumeStamp {
                exists: volume == "www",
                volume,
                version: v,
            })
            .collect())
    }

    async fn subscribe(&self, _volume: String, _from: u64) -> Result<ChangeStream, FsError> {
        Err(FsError::Disconnected("the model test delivers changes itself".into()))
    }

    async fn check_token(&self, _token: &str) -> Result<(), FsError> {
        self.check_up()
    }

    async fn put_blob(&self, _token: &str, data: bytes::Bytes, _write_quorum: u32) -> Result<(), FsError> {
        self.check_up()?;
        self.lock().blobs.insert(Hash::of(&data), data.to_vec());
        Ok(())
    }

    async fn commit(&self, _token: &str, _req: pb::CommitRequest) -> Result<pb::CommitReply, FsError> {
        // Commits are exercised end to end against real servers (tests/tests/writes.rs).
        Err(FsError::Io("the fake does not commit".into()))
    }
}

fn core_with(dir: &std::path::Path, cache_bytes: u64) -> Core<FakeRemote> {
    let meta = MetaStore::open(&dir.join("meta")).unwrap();
    let blobs = BlobCache::open(dir, cache_bytes).unwrap();
    let cfg = CoreConfig {
        op_timeout: Duration::from_millis(500),
    };
    let writes = WriteState::new(TokenTable::in_memory(), false, dir.join("shadow")).unwrap();
    Core::new(FakeRemote::new(), meta, blobs, cfg, writes).unwrap()
}

/// Reads a path through the core the way the kernel would: lookups, then a read.
async fn read_path(core: &Core<FakeRemote>, path: &[&str], name: &str) -> Result<Vec<u8>, FsError> {
    let mut cur = core.lookup(ROOT_INO, "www").await?.ino;
    for p in path {
        cur = core.lookup(cur, p).await?.ino;
    }
    let a = core.lookup(cur, name).await?;
    core.read(a.ino, 0, 0, 1 << 20).await
}

#[derive(Debug, Clone)]
enum Op {
    Read(usize),
    RemoteWrite(usize, u8),
    RemoteRemove(usize),
    ServerDown,
    ServerUp,
}

const PATHS: [(&[&str], &str); 6] = [
    (&[], "x"),
    (&[], "y"),
    (&["a"], "x"),
    (&["a"], "z"),
    (&["a", "b"], "y"),
    (&["a", "b"], "w"),
];

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..PATHS.len()).prop_map(Op::Read),
        3 => (0..PATHS.len(), any::<u8>()).prop_map(|(p, c)| Op::RemoteWrite(p, c)),
        1 => (0..PATHS.len()).prop_map(Op::RemoteRemove),
        1 => Just(Op::ServerDown),
        1 => Just(Op::ServerUp),
    ]
}

fn content_for(path: usize, c: u8) -> Vec<u8> {
    // Sizes vary so a 200-byte cache keeps evicting.
    vec![c; 20 + (c as usize % 7) * 15 + path]
}

async fn run_model(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let core = core_with(dir.path(), 200);
    core.refresh_volumes().await.unwrap();
    for op in ops {
        match op {
            Op::Read(i) => {
                let (path, name) = PATHS[i];
                let truth = core.remote.content(path, name);
                let down = core.remote.lock().down;
                match (read_path(&core, path, name).await, truth) {
                    (Ok(got), Some(want)) => prop_assert_eq!(got, want, "served stale or wrong content"),
                    (Ok(got), None) => prop_assert!(false, "served {:?} for a file the server does not have", got),
                    (Err(FsError::NotFound), None) => {}
                    (Err(FsError::NotFound), Some(_)) => prop_assert!(false, "existing file reported missing"),
                    (Err(FsError::Disconnected(_)), _) if down => {}
                    (Err(e), _) => prop_assert!(false, "unexpected error {e:?} (server down: {down})"),
                }
            }
            Op::RemoteWrite(i, c) if !core.remote.lock().down => {
                let (path, name) = PATHS[i];
                let ev = core.remote.write(path, name, &content_for(i, c));
                core.apply_change("www", &ev, &NoKernel).await.unwrap();
            }
            Op::RemoteRemove(i) if !core.remote.lock().down => {
                let (path, name) = PATHS[i];
                if let Some(ev) = core.remote.remove(path, name) {
                    core.apply_change("www", &ev, &NoKernel).await.unwrap();
                }
            }
            Op::ServerDown => core.remote.lock().down = true,
            Op::ServerUp => core.remote.lock().down = false,
            // Changes only happen while the server is up (a down server commits nothing).
            Op::RemoteWrite(..) | Op::RemoteRemove(_) => {}
        }
        let (_, bytes) = core.blobs.usage();
        prop_assert!(bytes <= 200, "cache over budget: {bytes}");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn core_matches_the_server_through_changes_outages_and_eviction(ops in proptest::collection::vec(op(), 1..60)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(run_model(ops))?;
    }
}

/// Writes on the fake server and applies the change event, as the change stream would.
async fn publish(core: &Core<FakeRemote>, path: &[&str], name: &str, content: &[u8]) {
    let ev = core.remote.write(path, name, content);
    core.apply_change("www", &ev, &NoKernel).await.unwrap();
}

#[tokio::test]
async fn cached_content_is_served_while_disconnected_and_uncached_fails_fast() {
    let dir = tempfile::tempdir().unwrap();
    let core = core_with(dir.path(), 1 << 20);
    core.refresh_volumes().await.unwrap();
    publish(&core, &[], "cached", b"hello").await;
    publish(&core, &[], "uncached", b"world").await;
    assert_eq!(read_path(&core, &[], "cached").await.unwrap(), b"hello");
    // Listing cached (so "uncached" resolves), content not.
    core.remote.lock().down = true;
    assert_eq!(read_path(&core, &[], "cached").await.unwrap(), b"hello");
    let t = std::time::Instant::now();
    assert!(matches!(
        read_path(&core, &[], "uncached").await,
        Err(FsError::Disconnected(_))
    ));
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(!core.is_connected());
}

#[tokio::test]
async fn a_restart_reuses_cached_metadata_and_content() {
    let dir = tempfile::tempdir().unwrap();
    {
        let core = core_with(dir.path(), 1 << 20);
        core.refresh_volumes().await.unwrap();
        publish(&core, &["a"], "page", b"persisted").await;
        assert_eq!(read_path(&core, &["a"], "page").await.unwrap(), b"persisted");
    }
    // A new core over the same directories, with the server down: everything comes from disk.
    let core = core_with(dir.path(), 1 << 20);
    core.remote.lock().down = true;
    // The fake server starts empty, so any server call would fail: this read is cache-only.
    let got = read_path(&core, &["a"], "page").await.unwrap();
    assert_eq!(got, b"persisted");
    assert_eq!(
        core.stats.meta_misses.load(Ordering::Relaxed),
        0,
        "no metadata was refetched"
    );
}

#[tokio::test]
async fn history_gone_drops_the_volume_metadata_and_invalidates_what_was_known() {
    let dir = tempfile::tempdir().unwrap();
    let core = core_with(dir.path(), 1 << 20);
    core.refresh_volumes().await.unwrap();
    publish(&core, &[], "p", b"1").await;
    assert_eq!(read_path(&core, &[], "p").await.unwrap(), b"1");
    let ev = pb::ChangeEvent {
        version: 100,
        inos: vec![],
        dirs: vec![],
        history_gone: true,
    };
    let inv = core.apply_change("www", &ev, &NoKernel).await.unwrap();
    assert!(
        inv.inodes.contains(&root()) && inv.entries.iter().any(|(_, n)| n == "p"),
        "{inv:?}"
    );
    assert!(core.meta.dir(root()).unwrap().is_none(), "listing forgotten");
    assert_eq!(core.volumes()[0].seen, 100);
}

fn token_for(user: &str, role: codafs_common::token::Role) -> String {
    codafs_common::token::sign(
        &codafs_common::token::Claims {
            user: user.into(),
            role,
            cluster: "c".into(),
            key_id: 1,
            expires: u64::MAX / 2,
            generation: 0,
        },
        &[1; 32],
    )
}

#[tokio::test]
async fn writes_need_a_token_and_a_right_on_the_volume() {
    use codafs_common::token::Role;
    let dir = tempfile::tempdir().unwrap();
    let core = core_with(dir.path(), 1 << 20);
    publish(&core, &[], "a.html", b"old").await;
    core.refresh_volumes().await.unwrap();
    let root = core.lookup(ROOT_INO, "www").await.unwrap().ino;
    let file = core.lookup(root, "a.html").await.unwrap().ino;
    let (root_user, alice, bob, mallory, admin) = (
        Caller { uid: 0, gid: 0 },
        Caller { uid: 1000, gid: 1000 },
        Caller { uid: 1001, gid: 1001 },
        Caller { uid: 1002, gid: 1002 },
        Caller { uid: 1003, gid: 1003 },
    );
    // No token, root included: read-only.
    for c in [root_user, alice] {
        assert_eq!(core.mkdir(c, root, "d", 0o755).await, Err(FsError::ReadOnly));
        assert_eq!(core.open(c, file, libc::O_WRONLY).await, Err(FsError::ReadOnly));
        assert_eq!(core.remove(c, root, "a.html", false).await, Err(FsError::ReadOnly));
    }
    // Reading needs no token.
    assert!(core.open(root_user, file, libc::O_RDONLY).await.is_ok());
    core.writes
        .tokens
        .set(1000, &token_for("alice", Role::User), None)
        .unwrap();
    core.writes
        .tokens
        .set(1001, &token_for("bob", Role::User), None)
        .unwrap();
    core.writes
        .tokens
        .set(1002, &token_for("mallory", Role::User), None)
        .unwrap();
    core.writes
        .tokens
        .set(1003, &token_for("root", Role::Admin), None)
        .unwrap();
    // A token without a right on the volume: permission denied, not read-only.
    assert!(matches!(
        core.mkdir(mallory, root, "d", 0o755).await,
        Err(FsError::Denied(_))
    ));
    assert!(matches!(
        core.open(mallory, file, libc::O_RDWR).await,
        Err(FsError::Denied(_))
    ));
    // Owner, extra writer and admin get as far as the server (which the fake refuses).
    for c in [alice, bob, admin] {
        assert_eq!(
            core.mkdir(c, root, "d", 0o755).await,
            Err(FsError::Io("the fake does not commit".into()))
        );
    }
    // /coda itself holds volumes only.
    assert!(matches!(
        core.mkdir(alice, ROOT_INO, "x", 0o755).await,
        Err(FsError::NotPermitted(_))
    ));
    // The uid's own token only: root does not borrow alice's.
    assert_eq!(core.mkdir(root_user, root, "d", 0o755).await, Err(FsError::ReadOnly));
}

#[tokio::test]
async fn a_shadow_serves_reads_and_size_until_released() {
    use codafs_common::token::Role;
    let dir = tempfile::tempdir().unwrap();
    let core = core_with(dir.path(), 1 << 20);
    publish(&core, &[], "a.html", b"0123456789").await;
    core.refresh_volumes().await.unwrap();
    let root = core.lookup(ROOT_INO, "www").await.unwrap().ino;
    let file = core.lookup(root, "a.html").await.unwrap().ino;
    let alice = Caller { uid: 1000, gid: 1000 };
    core.writes
        .tokens
        .set(1000, &token_for("alice", Role::User), None)
        .unwrap();
    let fh = core.open(alice, file, libc::O_RDWR).await.unwrap();
    assert_ne!(fh, 0);
    assert_eq!(core.write(fh, 10, b"abc"), Ok(3));
    assert_eq!(core.read(file, fh, 8, 100).await.unwrap(), b"89abc");
    assert_eq!(core.getattr(file).await.unwrap().size, 13);
    // A read-only handle cannot write; an unknown one neither.
    assert_eq!(core.write(0, 0, b"x"), Err(FsError::BadHandle));
    assert_eq!(core.write(fh + 100, 0, b"x"), Err(FsError::BadHandle));
    // The store fails (the fake refuses commits): close reports it, content stays old.
    assert!(core.flush(fh).await.is_err());
    assert!(core.release(fh).await, "dropped changes need a kernel invalidation");
    assert_eq!(core.read(file, 0, 0, 100).await.unwrap(), b"0123456789");
    assert_eq!(core.getattr(file).await.unwrap().size, 10);
    assert_eq!(
        std::fs::read_dir(dir.path().join("shadow")).unwrap().count(),
        0,
        "shadow removed"
    );
}

/// What the core asked of the kernel, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum KernelCall {
    Switch { inodes: Vec<u64>, names: bool },
    Invalidate(Invalidation),
    DropPages(u64),
}

/// An [`Invalidator`] that records every call (and has no name epochs, like older kernels).
#[derive(Default)]
struct Recorder(Mutex<Vec<KernelCall>>);

impl Recorder {
    fn take(&self) -> Vec<KernelCall> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

impl Invalidator for Recorder {
    fn invalidate(&self, inv: &Invalidation) {
        self.0.lock().unwrap().push(KernelCall::Invalidate(inv.clone()));
    }
    fn switch(&self, inodes: &[u64], names: bool) -> bool {
        self.0.lock().unwrap().push(KernelCall::Switch {
            inodes: inodes.to_vec(),
            names,
        });
        false
    }
    fn drop_pages(&self, ino: u64) {
        self.0.lock().unwrap().push(KernelCall::DropPages(ino));
    }
}

/// The reply protocol and the switch together: a change drops exactly the attributes and names
/// the kernel was shown, and the next reply that shows the changed file first drops its pages
/// (same size and mtime, so the kernel would keep them).
#[tokio::test]
async fn a_change_drops_what_the_kernel_was_shown_and_the_next_reply_its_stale_pages() {
    let dir = tempfile::tempdir().unwrap();
    let core = core_with(dir.path(), 1 << 20);
    core.refresh_volumes().await.unwrap();
    publish(&core, &[], "shown", b"1").await;
    publish(&core, &[], "never-shown", b"1").await;
    let rec = Arc::new(Recorder::default());
    let kernel: replies::Kernel = Some(rec.clone());
    let (shown, view) = core.lookup_reply(root(), "shown", &kernel).await;
    let shown = shown.unwrap();
    drop(view);
    let other = core.lookup(root(), "never-shown").await.unwrap();
    assert!(rec.take().is_empty(), "a first lookup drops nothing");

    // Another node rewrites both files (same sizes): the switch drops both nodes' attributes
    // at once, and the name the kernel holds goes in the background; the other is not named.
    let ev = core.remote.write(&[], "shown", b"2");
    let inv = core.apply_change("www", &ev, &*rec).await.unwrap();
    let ev2 = core.remote.write(&[], "never-shown", b"2");
    let inv2 = core.apply_change("www", &ev2, &*rec).await.unwrap();
    assert_eq!(
        rec.take(),
        [
            KernelCall::Switch {
                inodes: vec![shown.ino],
                names: false
            },
            KernelCall::Switch {
                inodes: vec![other.ino],
                names: false
            },
        ]
    );
    assert_eq!(inv.entries, [(root(), "shown".to_string())], "{inv:?}");
    assert!(inv2.entries.is_empty(), "a name never told is not dropped: {inv2:?}");

    // The next reply showing the file drops its pages first, once.
    let (again, view) = core.lookup_reply(root(), "shown", &kernel).await;
    assert_eq!(again.unwrap().ino, shown.ino);
    drop(view);
    assert_eq!(rec.take(), [KernelCall::DropPages(shown.ino)]);
    let (_, view) = core.getattr_reply(shown.ino, &kernel).await;
    drop(view);
    assert!(rec.take().is_empty(), "pages are dropped once per change");
    assert_eq!(read_path(&core, &[], "shown").await.unwrap(), b"2");
}
