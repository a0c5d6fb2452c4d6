//! Tests of the core against an in-memory server (`fake.rs`): the reference model of reads,
//! writes and the switch (`model.rs`), and named cases of the reply protocol, disconnection,
//! restarts and write checks.
use codafs_common::testdata::noise;
use std::sync::Mutex;

use super::types::ChangeEvent;
use super::write::{Caller, WriteState};
use super::*;
use crate::cache::blobs::BlobCache;
use crate::cache::meta::MetaStore;
use crate::tokens::TokenTable;
use fake::{root, CommitFailure, FakeRemote};

mod fake;
mod model;

fn core_with(dir: &std::path::Path, cache_bytes: u64) -> Core<FakeRemote> {
    core_over(dir, cache_bytes, None)
}

/// A core of a write-back mount (its log in `dir/wblog`).
fn core_writing_back(dir: &std::path::Path, cache_bytes: u64) -> Core<FakeRemote> {
    let back = write::WriteBack::open(&dir.join("wblog"), 64 << 20).unwrap();
    core_over(dir, cache_bytes, Some(back))
}

fn core_over(dir: &std::path::Path, cache_bytes: u64, back: Option<write::WriteBack>) -> Core<FakeRemote> {
    let meta = MetaStore::open(&dir.join("meta")).unwrap();
    let blobs = BlobCache::open(dir, cache_bytes).unwrap();
    let cfg = CoreConfig {
        op_timeout: Duration::from_millis(500),
    };
    let writes = WriteState::new(TokenTable::in_memory(), false, dir.join("shadow"), back).unwrap();
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
    // Too large to come with its directory's listing (core/prefetch.rs).
    let large = vec![b'w'; 100 << 10];
    publish(&core, &[], "uncached", &large).await;
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

/// A mount that could not list the volumes at its start, with none cached, does not answer
/// that its volumes are absent (a web node that booted while the servers were slow served
/// 404s for the whole site): a lookup or listing of `/coda` asks for the list then, failing
/// with EIO while no server answers, and finds the volume once one does.
#[tokio::test]
async fn a_mount_that_started_without_a_volume_list_asks_for_it_before_saying_absent() {
    let dir = tempfile::tempdir().unwrap();
    let core = core_with(dir.path(), 1 << 20);
    publish(&core, &[], "index.html", b"home").await;
    core.remote.lock().down = true;
    assert!(core.refresh_volumes().await.is_err(), "the start's list fails");
    assert!(
        matches!(core.lookup(ROOT_INO, "www").await, Err(FsError::Disconnected(_))),
        "unknown, not absent"
    );
    assert!(matches!(core.readdir(ROOT_INO).await, Err(FsError::Disconnected(_))));
    core.remote.lock().down = false;
    assert_eq!(read_path(&core, &[], "index.html").await.unwrap(), b"home");
    let names: Vec<String> = core
        .readdir(ROOT_INO)
        .await
        .unwrap()
        .into_iter()
        .map(|(n, _, _)| n)
        .collect();
    assert_eq!(names, ["www"]);
    // Listed once, a name that is not a volume is absent at once.
    core.remote.lock().down = true;
    assert!(matches!(core.lookup(ROOT_INO, "nope").await, Err(FsError::NotFound)));
}

/// A listing fetched from the servers holds a change whose event does not come within the
/// operation timeout: the change stream that should bring it is behind (it goes through a
/// server that stopped, which keeps its connection open and sends nothing). The listing is
/// shown, and the change streams are opened again (before, the mount waited for the
/// connection's keepalive, about 8 s, and served stale names meanwhile).
#[tokio::test(start_paused = true)]
async fn a_change_whose_event_does_not_come_reopens_the_change_streams() {
    let dir = tempfile::tempdir().unwrap();
    let core = core_with(dir.path(), 1 << 20);
    core.refresh_volumes().await.unwrap();
    publish(&core, &["d"], "a", b"a").await;
    let behind = core.streams_behind();
    // Its event is held back, as a stopped server's stream holds it.
    core.remote.write(&["d"], "b", b"b");
    assert!(!behind.has_changed().unwrap());
    assert_eq!(read_path(&core, &["d"], "b").await.unwrap(), b"b", "shown");
    assert!(behind.has_changed().unwrap(), "the stream is opened again");
    assert_eq!(behind.borrow().1, "www", "that volume's");
}

/// A directory whose attributes a change made the cache forget is served as it was while no
/// server answers, so the cached files below it stay readable; but never with a mode, owner or
/// group a later change replaced (a chmod that closed it would otherwise be undone offline).
#[tokio::test]
async fn a_directory_chmodded_elsewhere_is_not_served_with_its_older_mode_offline() {
    let dir = tempfile::tempdir().unwrap();
    let core = core_with(dir.path(), 1 << 20);
    core.refresh_volumes().await.unwrap();
    publish(&core, &["d"], "a", b"a").await;
    assert_eq!(read_path(&core, &["d"], "a").await.unwrap(), b"a");
    let www = core.lookup(ROOT_INO, "www").await.unwrap().ino;
    let d = core.lookup(www, "d").await.unwrap().ino;
    // A new name in d: its attributes are kept aside and served offline.
    publish(&core, &["d"], "b", b"b").await;
    core.remote.lock().down = true;
    let shown = core.getattr(d).await.expect("served offline after a new name");
    assert_eq!(shown.perm & 0o7777, 0o755);
    core.remote.lock().down = false;
    core.getattr(d).await.unwrap();
    // Closed elsewhere: offline, d has no attributes to serve rather than its older mode.
    let ev = core.remote.chmod(&["d"], 0o700).expect("chmod d");
    assert_eq!(ev.perms, vec![d]);
    core.apply_change("www", &ev, &NoKernel).await.unwrap();
    core.remote.lock().down = true;
    let r = core.getattr(d).await;
    assert!(matches!(r, Err(FsError::Disconnected(_))), "{r:?}");
    core.remote.lock().down = false;
    assert_eq!(core.getattr(d).await.unwrap().perm & 0o7777, 0o700);
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
    let ev = ChangeEvent {
        version: 100,
        inos: vec![],
        dirs: vec![],
        history_gone: true,
        ..Default::default()
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
    signed(user, role, u64::MAX / 2)
}

/// A token for `user` that expires at `expires` (tokens with different expiries differ).
fn signed(user: &str, role: codafs_common::token::Role, expires: u64) -> String {
    codafs_common::token::sign(
        &codafs_common::token::Claims {
            user: user.into(),
            role,
            cluster: "c".into(),
            key_id: 1,
            expires,
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
    // Owner, extra writer and admin may.
    for (c, name) in [(alice, "by-alice"), (bob, "by-bob"), (admin, "by-admin")] {
        let made = core.mkdir(c, root, name, 0o755).await.unwrap();
        assert_eq!(core.lookup(root, name).await.unwrap().ino, made.ino);
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
    // The store fails (the server refuses the commit): close reports it, content stays old.
    core.remote.lock().fail_next_commit = Some(CommitFailure::Refused);
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

/// A change event that carries its names patches the cached listing: a mount does not read a
/// directory again when one entry of it changes, and drops only the names the change touched.
/// Without names (an older server) the listing is read again.
#[tokio::test]
async fn a_change_to_one_entry_patches_the_cached_listing_instead_of_reading_it_again() {
    for names in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let core = core_with(dir.path(), 1 << 20);
        core.refresh_volumes().await.unwrap();
        core.remote.lock().events_without_names = !names;
        for n in ["a", "b", "c"] {
            publish(&core, &[], n, b"1").await;
        }
        let rec = Arc::new(Recorder::default());
        let kernel: replies::Kernel = Some(rec.clone());
        let (b, view) = core.lookup_reply(root(), "b", &kernel).await;
        let b = b.unwrap();
        drop(view);
        let (listed, view) = core.listing_reply(root(), 0, &kernel).await;
        drop(view);
        assert_eq!(listed.unwrap().len(), 5, ". .. a b c");
        rec.take();
        let reads = core.remote.lock().readdirs;

        // Elsewhere: `b` is removed and `d` created, each its own commit.
        let gone = core.remote.remove(&[], "b").expect("b existed");
        assert_eq!(gone.names.is_some(), names);
        let inv = core.apply_change("www", &gone, &*rec).await.unwrap();
        let made = core.remote.write(&[], "d", b"2");
        core.apply_change("www", &made, &*rec).await.unwrap();
        // (The removed file's name comes twice: as a vanished name, and as a changed file's.)
        assert!(
            !inv.entries.is_empty() && inv.entries.iter().all(|e| *e == (root(), "b".to_string())),
            "only the touched name is dropped: {inv:?}"
        );
        let calls = rec.take();
        assert!(
            calls
                .iter()
                .all(|c| matches!(c, KernelCall::Switch { names: false, .. })),
            "no name epoch: {calls:?}"
        );
        let now: Vec<String> = core
            .readdir(root())
            .await
            .unwrap()
            .into_iter()
            .map(|(n, _, _)| n)
            .collect();
        assert_eq!(now, ["a", "c", "d"]);
        assert!(matches!(core.lookup(root(), "b").await, Err(FsError::NotFound)));
        assert_eq!(core.getattr(b.ino).await.err(), Some(FsError::NotFound));
        let read_again = core.remote.lock().readdirs - reads;
        if names {
            assert_eq!(read_again, 0, "the listing was patched, not read again");
        } else {
            assert!(read_again >= 1, "without names the listing is read again");
        }
        assert_eq!(read_path(&core, &[], "d").await.unwrap(), b"2");
    }
}

/// A status counts the cached files of a volume by walking its cached listings, at most up to
/// a bound (a million-file volume must still answer at once); past it the count says so.
#[tokio::test]
async fn cached_files_are_counted_up_to_a_bound() {
    let dir = tempfile::tempdir().unwrap();
    let core = core_with(dir.path(), 1 << 20);
    core.refresh_volumes().await.unwrap();
    for n in ["a", "b", "c"] {
        publish(&core, &[], n, n.as_bytes()).await;
    }
    let v = core.volumes().into_iter().next().unwrap();
    assert_eq!(core.cached_in_at_most(&v, 10).files, 0, "nothing read yet");
    // The lookup brings the directory's small files with its listing: all three are cached.
    read_path(&core, &[], "a").await.unwrap();
    let all = core.cached_in_at_most(&v, 10);
    assert_eq!((all.files, all.bytes, all.complete), (3, 3, true));
    let some = core.cached_in_at_most(&v, 1);
    assert!(!some.complete && some.files <= 1, "{some:?}");
    assert_eq!(core.status().volumes[0].cached, all);
}

/// A mount with alice's token, and the volume known.
async fn writable_core(dir: &std::path::Path) -> Core<FakeRemote> {
    with_alice(core_with(dir, 1 << 20)).await
}

/// `core` with alice's token, and the volume known.
async fn with_alice(core: Core<FakeRemote>) -> Core<FakeRemote> {
    core.writes
        .tokens
        .set(
            model::ALICE.uid,
            &token_for("alice", codafs_common::token::Role::User),
            None,
        )
        .unwrap();
    core.refresh_volumes().await.unwrap();
    core
}

/// Delivers every pending change event, in order, as the change stream would.
async fn deliver_all(core: &Core<FakeRemote>) {
    loop {
        let Some(ev) = core.remote.lock().pending.pop_front() else {
            return;
        };
        core.apply_change("www", &ev, &NoKernel).await.unwrap();
    }
}

/// A replica behind the version the mount shows (a follower after a failover) is asked again,
/// and what it says is never shown or cached.
#[tokio::test(start_paused = true)]
async fn a_lagging_replica_is_asked_again_until_it_has_the_shown_version() {
    let dir = tempfile::tempdir().unwrap();
    let core = writable_core(dir.path()).await;
    core.remote.write(&["a"], "p", b"old");
    deliver_all(&core).await;
    assert_eq!(model::read(&core, "a/p").await.unwrap(), b"old");
    core.remote.lag(3);
    core.remote.write(&["a"], "p", b"new");
    deliver_all(&core).await;
    assert_eq!(model::read(&core, "a/p").await.unwrap(), b"new");
    let left = core.remote.lock().lagging.as_ref().map(|l| l.reads_left);
    assert_eq!(left, Some(0), "the lagging replica answered and was asked again");
    assert_eq!(
        model::read(&core, "a/p").await.unwrap(),
        b"new",
        "and nothing old was cached"
    );
}

/// As on any POSIX filesystem, writes to a file that lost its name while open go nowhere and
/// `close` succeeds; nothing reappears (found by the model: the mount's own write must not
/// revive a file another node removed).
#[tokio::test(start_paused = true)]
async fn a_close_after_the_file_was_removed_elsewhere_succeeds_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let core = writable_core(dir.path()).await;
    model::write(&core, "a/p", b"mine").await.unwrap();
    deliver_all(&core).await;
    let dir_ino = core.lookup(root(), "a").await.unwrap().ino;
    let p = core.lookup(dir_ino, "p").await.unwrap().ino;
    let fh = core.open(model::ALICE, p, libc::O_WRONLY).await.unwrap();
    core.remote.remove(&["a"], "p").unwrap();
    assert_eq!(core.write(fh, 0, b"lost"), Ok(4));
    assert_eq!(core.flush(fh).await, Ok(()));
    core.release(fh).await;
    deliver_all(&core).await;
    assert_eq!(model::read(&core, "a/p").await, Err(FsError::NotFound));
    assert_eq!(core.remote.content("a/p"), None);
}

/// A file larger than the whole cache is read through memory, but opening it for writing
/// without truncating it still brings it in (pinned, over the bound) and the edit is stored.
/// A reads-only version of the cache bound refused that open with ENOSPC (found in review).
#[tokio::test(start_paused = true)]
async fn a_file_larger_than_the_cache_can_be_edited_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let core = writable_core(dir.path()).await;
    let mut data = noise(3 << 20, 7);
    core.remote.write(&[], "big.bin", &data);
    deliver_all(&core).await;
    assert!(read_whole(&core, "big.bin").await == data, "read through memory");
    let p = core.lookup(root(), "big.bin").await.unwrap().ino;
    let fh = core.open(model::ALICE, p, libc::O_RDWR).await.unwrap();
    assert_eq!(core.write(fh, 0, b"EDIT"), Ok(4));
    assert_eq!(core.flush(fh).await, Ok(()));
    core.release(fh).await;
    deliver_all(&core).await;
    data[..4].copy_from_slice(b"EDIT");
    assert!(core.remote.content("big.bin") == Some(data), "the edit is stored");
}

/// A commit whose reply was lost fails `close` (the writer cannot know), but the mount then
/// shows whatever the servers hold, here the applied write, not its old copy.
#[tokio::test(start_paused = true)]
async fn after_a_lost_commit_reply_the_mount_shows_what_the_servers_hold() {
    let dir = tempfile::tempdir().unwrap();
    let core = writable_core(dir.path()).await;
    model::write(&core, "p", b"one").await.unwrap();
    deliver_all(&core).await;
    assert_eq!(model::read(&core, "p").await.unwrap(), b"one");
    core.remote.lock().fail_next_commit = Some(CommitFailure::ReplyLost);
    assert!(matches!(
        model::write(&core, "p", b"two").await,
        Err(FsError::Disconnected(_))
    ));
    assert_eq!(core.remote.content("p"), Some(b"two".to_vec()));
    assert_eq!(model::read(&core, "p").await.unwrap(), b"two", "before the event");
    deliver_all(&core).await;
    assert_eq!(model::read(&core, "p").await.unwrap(), b"two", "after it");
}

/// A refused commit changes nothing, on the servers or in what the mount shows.
#[tokio::test(start_paused = true)]
async fn a_refused_commit_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let core = writable_core(dir.path()).await;
    model::write(&core, "p", b"one").await.unwrap();
    let version = core.remote.version();
    core.remote.lock().fail_next_commit = Some(CommitFailure::Refused);
    assert!(matches!(
        model::write(&core, "p", b"two").await,
        Err(FsError::Denied(_))
    ));
    assert_eq!(core.remote.version(), version);
    assert_eq!(model::read(&core, "p").await.unwrap(), b"one");
}

/// A read-only open of a cached file is answered without waiting, keeps the file readable
/// after another node removes it, and its release is answered without waiting too; anything
/// else takes the full path.
#[tokio::test(start_paused = true)]
async fn read_only_opens_of_cached_files_need_no_wait() {
    let dir = tempfile::tempdir().unwrap();
    let core = writable_core(dir.path()).await;
    core.remote.write(&[], "p", b"page");
    deliver_all(&core).await;
    let ino = core.remote.lock().tree.dirs[&root()]["p"];
    let alice = model::ALICE;
    assert!(core.open_read_cached(alice, ino).is_none(), "attributes not cached yet");
    assert_eq!(model::read(&core, "p").await.unwrap(), b"page");
    let fh = core.open_read_cached(alice, ino).unwrap().unwrap();
    core.remote.remove(&[], "p").unwrap();
    deliver_all(&core).await;
    assert_eq!(
        core.read(ino, fh, 0, 100).await.unwrap(),
        b"page",
        "open handle still reads"
    );
    assert!(core.release_read(fh));
    assert!(!core.release_read(fh), "released once");
    // A writing handle is released the long way (its shadow may need storing).
    model::write(&core, "q", b"x").await.unwrap();
    let q = core.lookup(root(), "q").await.unwrap().ino;
    let wfh = core.open(alice, q, libc::O_WRONLY).await.unwrap();
    assert!(!core.release_read(wfh));
    assert!(!core.release(wfh).await);
}

/// On a mount, where the core runs work in the background, the lookup that fetches a listing
/// answers without waiting for the directory's small files; they arrive all the same.
#[tokio::test(start_paused = true)]
async fn a_lookup_does_not_wait_for_the_small_files_of_its_directory() {
    let dir = tempfile::tempdir().unwrap();
    let core = std::sync::Arc::new(writable_core(dir.path()).await);
    core.run_in_background();
    for n in ["a", "b", "c"] {
        core.remote.write(&["d"], n, n.repeat(100).as_bytes());
    }
    deliver_all(&core).await;
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    core.remote.lock().small_gate = Some(gate.clone());
    let began = tokio::time::Instant::now();
    let www = core.lookup(ROOT_INO, "www").await.unwrap().ino;
    let d = core.lookup(www, "d").await.unwrap().ino;
    core.lookup(d, "a").await.unwrap();
    assert!(
        began.elapsed() < Duration::from_millis(100),
        "the lookup waited for the small files"
    );
    assert_eq!(core.stats.prefetched.load(Ordering::Relaxed), 0);
    gate.add_permits(1);
    for _ in 0..100 {
        if core.stats.prefetched.load(Ordering::Relaxed) == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(core.stats.prefetched.load(Ordering::Relaxed), 3);
    for n in ["a", "b", "c"] {
        assert_eq!(
            model::read(&core, &format!("d/{n}")).await.unwrap(),
            n.repeat(100).as_bytes()
        );
    }
    assert_eq!(core.remote.lock().blob_fetches, 0, "all three came in the batch");
}

/// A lookup that fetches a directory's listing brings that directory's small files into the
/// cache in one call: opening them next fetches nothing. Copies that fail verification are
/// left out (and fetched on open); a listing read for `readdir` brings nothing.
#[tokio::test(start_paused = true)]
async fn a_lookup_brings_the_small_files_of_its_directory() {
    let dir = tempfile::tempdir().unwrap();
    let core = writable_core(dir.path()).await;
    for n in ["a", "b", "c"] {
        core.remote.write(&["d"], n, n.repeat(100).as_bytes());
    }
    core.remote.write(&["big"], "x", &vec![7u8; 100 << 10]);
    core.remote.write(&["big"], "y", b"y");
    core.remote.write(&["e"], "p", b"pp");
    core.remote.write(&["e"], "q", b"qq");
    deliver_all(&core).await;
    assert_eq!(model::read(&core, "d/a").await.unwrap(), "a".repeat(100).as_bytes());
    assert_eq!(core.stats.prefetched.load(Ordering::Relaxed), 3);
    assert_eq!(core.blobs.packs(), 1, "the three cached as one pack");
    assert_eq!(core.remote.lock().blob_fetches, 0, "the lookup brought it");
    for n in ["b", "c"] {
        model::read(&core, &format!("d/{n}")).await.unwrap();
    }
    assert_eq!(core.remote.lock().blob_fetches, 0, "and its neighbours");
    // Only small files come along: the large one is fetched on its own.
    model::read(&core, "big/x").await.unwrap();
    assert_eq!(core.remote.lock().blob_fetches, 1);
    assert_eq!(
        core.stats.prefetched.load(Ordering::Relaxed),
        3,
        "one small file alone stays"
    );
    // A corrupt batch is not cached: its files are fetched (and verified) on open.
    core.remote.lock().corrupt_small = true;
    assert_eq!(model::read(&core, "e/p").await.unwrap(), b"pp");
    assert_eq!(core.stats.bad_small_copies.load(Ordering::Relaxed), 2);
    assert_eq!(core.remote.lock().blob_fetches, 2);
}

/// Write-back: runs the reintegrator until everything logged is on the server, or set aside
/// or kept under another name (which the sync reports).
async fn send_log(core: &Core<FakeRemote>) {
    if let Err(e) = sent_log(core).await {
        let back = core.backlog().unwrap();
        assert!(back.changes == 0 && back.conflicts + back.refused > 0, "{e} ({back:?})");
    }
}

/// [`send_log`], with what the sync answered.
async fn sent_log(core: &Core<FakeRemote>) -> Result<(), FsError> {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let sync = async {
        let r = core.sync_log(Duration::from_secs(60)).await;
        let _ = stop.send(true);
        r
    };
    let ((), r) = tokio::join!(core.reintegrate(stopped), sync);
    r
}

/// Write-back: a save by rename (editors, rsync) reaches the server as its final state, in
/// one commit; a rename or remove whose target another node changed meanwhile keeps that
/// node's change and this mount's bytes (under a conflict name), and says so.
#[tokio::test(start_paused = true)]
async fn write_back_saves_by_rename_arrive_whole_and_conflicting_names_keep_both() {
    let dir = tempfile::tempdir().unwrap();
    let core = with_alice(core_writing_back(dir.path(), 1 << 20)).await;
    for page in ["index.html", "b.html", "c.html"] {
        core.remote.write(&[], page, b"old");
    }
    deliver_all(&core).await;
    let www = core.lookup(ROOT_INO, "www").await.unwrap().ino;
    let save = |name: &'static str, data: &'static [u8]| {
        let core = &core;
        async move {
            let tmp = format!(".{name}.tmp");
            model::write(core, &tmp, data).await.unwrap();
            core.rename(model::ALICE, www, &tmp, www, name, false).await.unwrap();
        }
    };
    save("index.html", b"new").await;
    assert_eq!(model::read(&core, "index.html").await.unwrap(), b"new", "shown at once");
    assert_eq!(core.remote.content("index.html").unwrap(), b"old", "not sent yet");
    let before = core.remote.version();
    send_log(&core).await;
    assert_eq!(core.remote.content("index.html").unwrap(), b"new");
    assert!(
        !core.remote.ever_had(".index.html.tmp"),
        "the temporary name never reached the server"
    );
    assert_eq!(core.remote.version(), before + 1, "one commit");
    deliver_all(&core).await;
    // Another node changes b.html and c.html before this mount's save and remove are sent.
    save("b.html", b"mine").await;
    core.remove(model::ALICE, www, "c.html", false).await.unwrap();
    assert_eq!(model::read(&core, "c.html").await, Err(FsError::NotFound));
    core.remote.write(&[], "b.html", b"theirs");
    core.remote.write(&[], "c.html", b"theirs too");
    send_log(&core).await;
    deliver_all(&core).await;
    assert_eq!(core.remote.content("b.html").unwrap(), b"theirs");
    assert_eq!(
        core.remote.content("c.html").unwrap(),
        b"theirs too",
        "the remove is not applied"
    );
    let names = names_where(&core, www, |n| n.starts_with("b.html.conflict-")).await;
    assert_eq!(names.len(), 1, "{names:?}");
    assert_eq!(model::read(&core, &names[0]).await.unwrap(), b"mine");
    assert_eq!(model::read(&core, "c.html").await.unwrap(), b"theirs too");
    assert_eq!(core.backlog().unwrap().conflicts, 2);
}

/// A write-back core with `p.html` ("old") written by another node and cached here: the core,
/// and the node ids of `/www` and the file.
async fn page_written_back(dir: &std::path::Path) -> (Core<FakeRemote>, u64, u64) {
    let core = with_alice(core_writing_back(dir, 1 << 20)).await;
    core.remote.write(&[], "p.html", b"old");
    deliver_all(&core).await;
    let www = core.lookup(ROOT_INO, "www").await.unwrap().ino;
    let ino = core.lookup(www, "p.html").await.unwrap().ino;
    (core, www, ino)
}

/// The names listed in directory `dir` that `keep` accepts.
async fn names_where(core: &Core<FakeRemote>, dir: u64, keep: impl Fn(&str) -> bool) -> Vec<String> {
    core.readdir(dir)
        .await
        .unwrap()
        .into_iter()
        .map(|(n, _, _)| n)
        .filter(|n| keep(n))
        .collect()
}

/// Writes `data` at the start of open file `fh`, and closes it.
async fn write_and_close(core: &Core<FakeRemote>, fh: u64, data: &[u8]) {
    core.write(fh, 0, data).unwrap();
    core.flush(fh).await.unwrap();
    core.release(fh).await;
}

/// After a conflict on `p.html`: the other node's "theirs" stands, and this mount's "mine" is
/// kept in one conflict copy beside it.
async fn theirs_stand_and_mine_is_kept(core: &Core<FakeRemote>, www: u64) {
    assert_eq!(
        core.remote.content("p.html").unwrap(),
        b"theirs",
        "their content stands"
    );
    let copies = names_where(core, www, |n| n.starts_with("p.html.conflict-")).await;
    assert_eq!(copies.len(), 1, "{copies:?}");
    assert_eq!(model::read(core, &copies[0]).await.unwrap(), b"mine");
}

/// Write-back: content logged and not sent yet, another node's content committed meanwhile
/// (and seen here), then the file written again here. The second content expected the other
/// node's version (the overlay showed this mount's bytes with the servers' newer version), so
/// it replaced theirs without a conflict, and the first, which conflicted, was replaced by it:
/// theirs was lost silently (found by review). Both now expect the version the first was
/// based on.
#[tokio::test(start_paused = true)]
async fn write_back_content_written_over_unsent_content_still_finds_the_conflict() {
    let dir = tempfile::tempdir().unwrap();
    let (core, www, _ino) = page_written_back(dir.path()).await;
    model::write(&core, "p.html", b"first").await.unwrap();
    core.remote.write(&[], "p.html", b"theirs");
    deliver_all(&core).await;
    // The mount still shows its own unsent bytes.
    assert_eq!(model::read(&core, "p.html").await.unwrap(), b"first");
    model::write(&core, "p.html", b"mine").await.unwrap();
    // The sync that waited reports the conflict.
    let conflict = sent_log(&core).await.expect_err("the conflict is reported");
    assert!(conflict.to_string().contains("conflict"), "{conflict}");
    deliver_all(&core).await;
    theirs_stand_and_mine_is_kept(&core, www).await;
}

/// Write-back: a chmod logged before new content goes in the same batch. The chmod checks no
/// version, so the content's check goes in front of it: another node's content sent meanwhile
/// is kept, and this mount's bytes go to a conflict copy (once sent after the chmod, unchecked,
/// the content replaced theirs silently).
#[tokio::test(start_paused = true)]
async fn write_back_a_chmod_before_new_content_still_finds_the_conflict() {
    let dir = tempfile::tempdir().unwrap();
    let (core, www, ino) = page_written_back(dir.path()).await;
    let mode = |m| write::SetAttrs {
        mode: Some(m),
        ..Default::default()
    };
    core.setattr(model::ALICE, ino, mode(0o600)).await.unwrap();
    model::write(&core, "p.html", b"mine").await.unwrap();
    core.remote.write(&[], "p.html", b"theirs");
    send_log(&core).await;
    deliver_all(&core).await;
    theirs_stand_and_mine_is_kept(&core, www).await;
    assert_eq!(core.backlog().unwrap().conflicts, 1);
    // With nobody in between, a chmod and new content go through without a conflict.
    deliver_all(&core).await;
    core.setattr(model::ALICE, ino, mode(0o640)).await.unwrap();
    model::write(&core, "p.html", b"mine again").await.unwrap();
    send_log(&core).await;
    assert_eq!(core.remote.content("p.html").unwrap(), b"mine again");
    assert_eq!(core.backlog().unwrap().conflicts, 1, "no new conflict");
}

/// Write-back: a chmod of a file open for writing is sent on its own, after another node's new
/// content and before the file is closed. The chmod's commit moves the version past theirs, and
/// the content, expecting the version this mount's own commit gave, replaced theirs silently.
/// The chmod now carries the check the open file's content will make; failing it, the chmod
/// goes without it, and the content conflicts.
#[tokio::test(start_paused = true)]
async fn write_back_a_chmod_sent_while_the_file_is_open_still_finds_the_conflict() {
    let dir = tempfile::tempdir().unwrap();
    let (core, www, ino) = page_written_back(dir.path()).await;
    let mode = |m| write::SetAttrs {
        mode: Some(m),
        ..Default::default()
    };
    let flags = libc::O_WRONLY | libc::O_TRUNC;
    let fh = core.open(model::ALICE, ino, flags).await.unwrap();
    core.remote.write(&[], "p.html", b"theirs");
    core.setattr(model::ALICE, ino, mode(0o600)).await.unwrap();
    send_log(&core).await;
    assert_eq!(core.backlog().unwrap().changes, 0, "the chmod is on the servers");
    write_and_close(&core, fh, b"mine").await;
    send_log(&core).await;
    deliver_all(&core).await;
    theirs_stand_and_mine_is_kept(&core, www).await;
    // With nobody in between, the same goes through without a conflict.
    deliver_all(&core).await;
    let fh = core.open(model::ALICE, ino, flags).await.unwrap();
    core.setattr(model::ALICE, ino, mode(0o640)).await.unwrap();
    send_log(&core).await;
    write_and_close(&core, fh, b"mine again").await;
    send_log(&core).await;
    assert_eq!(core.remote.content("p.html").unwrap(), b"mine again");
    assert_eq!(core.backlog().unwrap().conflicts, 1, "no new conflict");
}

/// Write-back: `echo mine > p.html` as the kernel sends it. The open comes without `O_TRUNC`,
/// a setattr truncates, and the shell's first `close` (after its `dup2`) stores the empty file;
/// that batch waits (servers slow or down) while "mine" is written and closed, and another
/// node's content lands first. Each of the two contents conflicted on its own, so two copies
/// were kept, one of them empty (session 31 QA, with every server stopped). The empty content,
/// replaced by a later one of the same file still queued, now makes no copy of its own.
#[tokio::test(start_paused = true)]
async fn write_back_a_truncating_write_that_conflicts_keeps_one_copy() {
    let dir = tempfile::tempdir().unwrap();
    let (core, www, ino) = page_written_back(dir.path()).await;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    core.remote.lock().commit_gate = Some(gate.clone());
    let fh = core.open(model::ALICE, ino, libc::O_WRONLY).await.unwrap();
    let truncate = write::SetAttrs {
        size: Some(0),
        mtime_ns: Some(1_700_000_000_000_000_000),
        ..Default::default()
    };
    core.setattr(model::ALICE, ino, truncate).await.unwrap();
    core.flush(fh).await.unwrap();
    let write_meanwhile = async {
        // The batch with the empty content is built and waits at the gate.
        tokio::time::sleep(Duration::from_millis(500)).await;
        write_and_close(&core, fh, b"mine").await;
        core.remote.write(&[], "p.html", b"theirs");
        gate.add_permits(1000);
    };
    tokio::join!(send_log(&core), write_meanwhile);
    send_log(&core).await;
    deliver_all(&core).await;
    theirs_stand_and_mine_is_kept(&core, www).await;
    assert_eq!(core.backlog().unwrap().conflicts, 1);
    // Theirs keeps its own mtime: the truncation's went with its (refused) content, not in an
    // unchecked attribute change.
    let t = core.remote.lock();
    let p = t.tree.dirs[&root()]["p.html"];
    assert_ne!(t.tree.objects[&p].mtime_ns, 1_700_000_000_000_000_000);
}

/// Write-back: new content of an existing file that the servers refuse is set aside in
/// `lost+found` under the file's name, and the report names the file by its path (both named
/// it by its node id, which says nothing to a webmaster).
#[tokio::test(start_paused = true)]
async fn write_back_a_refused_content_is_kept_and_reported_under_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let (core, _www, _ino) = page_written_back(dir.path()).await;
    model::write(&core, "p.html", b"mine").await.unwrap();
    // A name of 255 bytes: the copy's name must still fit (the log retried for ever).
    let long = "l".repeat(255);
    model::write(&core, &long, b"long").await.unwrap();
    // The batch, then each change alone.
    core.remote.lock().refuse_commits = 3;
    // The sync that waited for them says they did not go as logged, once.
    let refused = sent_log(&core).await.expect_err("the refusal is reported");
    assert!(
        matches!(refused, FsError::Invalid(_) | FsError::Denied(_) | FsError::Quota(_)),
        "{refused:?}"
    );
    sent_log(&core).await.unwrap();
    assert_eq!(core.remote.content("p.html").unwrap(), b"old");
    let back = core.backlog().unwrap();
    assert_eq!((back.changes, back.refused), (0, 2), "{back:?}");
    let mut kept: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir.path().join("wblog/lost+found"))
        .unwrap()
        .flatten()
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    kept.sort_by(|a, b| a.1.cmp(&b.1));
    assert_eq!(kept.len(), 2, "{kept:?}");
    assert!(kept[0].0.contains("-lll") && kept[0].0.len() < 255, "{kept:?}");
    assert_eq!(kept[0].1, b"long");
    assert!(kept[1].0.ends_with("-p.html"), "{kept:?}");
    assert_eq!(kept[1].1, b"mine");
    // The report names the file by its path.
    core.remote.lock().refuse_commits = 2;
    model::write(&core, "p.html", b"mine again").await.unwrap();
    send_log(&core).await;
    let note = core.backlog().unwrap().last_refused.unwrap_or_default();
    assert!(note.contains("new content of www:/p.html refused"), "{note}");
}

/// Write-back: the file is opened for writing after the batch with its chmod was built and
/// before that batch's commit lands, and another node's content lands in between. The chmod
/// checked nothing (nothing needed a check when it was built), and the servers' reply tells
/// a version before it other than the one the open saw, so its commit's version is not taken
/// for this mount's own, and the content, closed later, conflicts.
#[tokio::test(start_paused = true)]
async fn write_back_a_file_opened_while_its_chmod_is_in_flight_still_finds_the_conflict() {
    let (_dir, core, www) = open_while_chmod_in_flight(Some(b"theirs")).await;
    theirs_stand_and_mine_is_kept(&core, www).await;
}

/// Write-back: the same, with nobody's commit in between. The chmod's reply tells the version
/// the file had just before it, the one the open saw, so the chmod's version is this mount's
/// own and the content goes through without a conflict (it conflicted with its own chmod).
#[tokio::test(start_paused = true)]
async fn write_back_a_file_opened_while_its_chmod_is_in_flight_goes_through_alone() {
    let (_dir, core, _www) = open_while_chmod_in_flight(None).await;
    assert_eq!(core.remote.content("p.html").unwrap(), b"mine");
    assert_eq!(core.backlog().unwrap().conflicts, 0);
}

/// `p.html` chmodded; opened for writing while the batch with the chmod waits to be committed
/// (and `theirs`, if any, written by another node then); "mine" written, closed and sent.
async fn open_while_chmod_in_flight(theirs: Option<&[u8]>) -> (tempfile::TempDir, Core<FakeRemote>, u64) {
    let dir = tempfile::tempdir().unwrap();
    let (core, www, ino) = page_written_back(dir.path()).await;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    core.remote.lock().commit_gate = Some(gate.clone());
    let mode = write::SetAttrs {
        mode: Some(0o600),
        ..Default::default()
    };
    core.setattr(model::ALICE, ino, mode).await.unwrap();
    let open_meanwhile = async {
        // The batch is built and waits at the gate.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let fh = core.open(model::ALICE, ino, libc::O_WRONLY | libc::O_TRUNC).await;
        if let Some(t) = theirs {
            core.remote.write(&[], "p.html", t);
        }
        gate.add_permits(1000);
        fh
    };
    let ((), fh) = tokio::join!(send_log(&core), open_meanwhile);
    write_and_close(&core, fh.unwrap(), b"mine").await;
    send_log(&core).await;
    deliver_all(&core).await;
    (dir, core, www)
}

/// Write-back: new content of a file another node removed before it was sent is kept under a
/// conflict name in the file's own directory (not the volume's root), and the report says the
/// file was removed elsewhere.
#[tokio::test(start_paused = true)]
async fn write_back_content_of_a_file_removed_elsewhere_is_kept_beside_it() {
    content_of_a_file_removed_elsewhere_is_kept_beside_it(false).await;
}

/// The same, when the removal's event reaches this mount before the batch is sent: the cache
/// then no longer lists the file, and the place it had is what the mount noted as the event
/// was applied.
#[tokio::test(start_paused = true)]
async fn write_back_content_of_a_file_removed_elsewhere_is_kept_beside_it_after_the_event() {
    content_of_a_file_removed_elsewhere_is_kept_beside_it(true).await;
}

async fn content_of_a_file_removed_elsewhere_is_kept_beside_it(event_first: bool) {
    let dir = tempfile::tempdir().unwrap();
    let core = with_alice(core_writing_back(dir.path(), 1 << 20)).await;
    core.remote.write(&["d"], "p", b"old");
    deliver_all(&core).await;
    assert_eq!(model::read(&core, "d/p").await.unwrap(), b"old");
    model::write(&core, "d/p", b"mine").await.unwrap();
    core.remote.remove(&["d"], "p");
    if event_first {
        deliver_all(&core).await;
    }
    send_log(&core).await;
    deliver_all(&core).await;
    assert_eq!(model::read(&core, "d/p").await, Err(FsError::NotFound));
    let www = core.lookup(ROOT_INO, "www").await.unwrap().ino;
    let d = core.lookup(www, "d").await.unwrap().ino;
    let names = names_where(&core, d, |n| n.starts_with("p.conflict-")).await;
    assert_eq!(names.len(), 1, "{names:?}");
    assert_eq!(model::read(&core, &format!("d/{}", names[0])).await.unwrap(), b"mine");
    let b = core.backlog().unwrap();
    assert_eq!(b.conflicts, 1);
    let note = b.last_conflict.unwrap();
    // Where, too: a site has an index.html in every directory.
    assert!(note.starts_with("in www:/d: p was removed elsewhere"), "{note}");
}

/// Write-back: new content of a file another node removed with its whole directory: kept at
/// the volume's root under the file's own name (it went there as `node-<ino>`, which did not
/// tell the webmaster which page it was).
#[tokio::test(start_paused = true)]
async fn write_back_content_of_a_file_whose_directory_was_removed_elsewhere_keeps_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let core = with_alice(core_writing_back(dir.path(), 1 << 20)).await;
    core.remote.write(&["d"], "page.html", b"old");
    deliver_all(&core).await;
    assert_eq!(model::read(&core, "d/page.html").await.unwrap(), b"old");
    model::write(&core, "d/page.html", b"mine").await.unwrap();
    core.remote.remove(&["d"], "page.html");
    core.remote.remove(&[], "d");
    deliver_all(&core).await;
    send_log(&core).await;
    deliver_all(&core).await;
    let www = core.lookup(ROOT_INO, "www").await.unwrap().ino;
    let names = names_where(&core, www, |n| n.contains(".conflict-") || n.starts_with("node-")).await;
    assert_eq!(names.len(), 1, "{names:?} {:?}", core.backlog().unwrap());
    assert!(names[0].starts_with("page.html.conflict-"), "{names:?}");
    assert_eq!(model::read(&core, &names[0]).await.unwrap(), b"mine");
}

/// Write-back: a file opened before its creation was sent and closed after it was. Its new
/// content expects the version this mount's own commit gave it, and a replay after a crash
/// (the daemon's memory of its commits gone) still sends it as this mount's own change, not
/// as a conflict.
#[tokio::test(start_paused = true)]
async fn write_back_a_replay_after_a_crash_knows_this_mounts_own_commits() {
    let dir = tempfile::tempdir().unwrap();
    let truth = {
        let core = with_alice(core_writing_back(dir.path(), 1 << 20)).await;
        model::write(&core, "a", b"one").await.unwrap();
        let www = core.lookup(ROOT_INO, "www").await.unwrap().ino;
        let a = core.lookup(www, "a").await.unwrap().ino;
        let fh = core
            .open(model::ALICE, a, libc::O_WRONLY | libc::O_TRUNC)
            .await
            .unwrap();
        send_log(&core).await;
        assert_eq!(core.remote.content("a").unwrap(), b"one");
        core.write(fh, 0, b"two").unwrap();
        core.flush(fh).await.unwrap();
        core.release(fh).await;
        // The daemon dies here: nothing more is sent.
        let truth = std::mem::take(&mut *core.remote.lock());
        truth
    };
    let core = core_writing_back(dir.path(), 1 << 20);
    *core.remote.lock() = truth;
    let core = with_alice(core).await;
    assert_eq!(core.backlog().unwrap().changes, 1, "the close was logged");
    send_log(&core).await;
    assert_eq!(core.remote.content("a").unwrap(), b"two");
    assert_eq!(core.backlog().unwrap().conflicts, 0, "{:?}", core.backlog());
}

/// Write-back: a user whose token the servers refuse holds back only their own changes and the
/// changes that need them (a file made in their new directory). Another user's own page reaches
/// the server, and its `fsync` returns; `status` names the user who must log in; `codafs sync`
/// says why it cannot finish. A restart keeps exactly what was held (the page sent ahead is not
/// sent again), and after a new login everything arrives, with no conflict.
#[tokio::test(start_paused = true)]
async fn write_back_a_refused_token_holds_back_only_that_users_changes() {
    use codafs_common::token::Role;
    let bob = Caller { uid: 1001, gid: 1001 };
    let dir = tempfile::tempdir().unwrap();
    let with_bob = |core: Core<FakeRemote>| {
        core.writes
            .tokens
            .set(bob.uid, &token_for("bob", Role::User), None)
            .unwrap();
        core
    };
    let (truth, held) = {
        let core = with_bob(with_alice(core_writing_back(dir.path(), 1 << 20)).await);
        let www = core.lookup(ROOT_INO, "www").await.unwrap().ino;
        let news = core.mkdir(model::ALICE, www, "news", 0o777).await.unwrap().ino;
        model::write_as(&core, model::ALICE, "news/a.html", b"alice")
            .await
            .unwrap();
        // Alice's token is revoked (her password changed elsewhere) before her changes are sent.
        let alice_token = core.writes.tokens.get(model::ALICE.uid).unwrap().0;
        core.remote.lock().refused_tokens.insert(alice_token);
        model::write_as(&core, bob, "b.html", b"bob").await.unwrap();
        model::write_as(&core, bob, "news/b.html", b"bob in news")
            .await
            .unwrap();
        let b_html = core.lookup(www, "b.html").await.unwrap().ino;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let checks = async {
            core.sync_node(b_html, 0, Duration::from_secs(60)).await.unwrap();
            assert_eq!(core.remote.content("b.html").unwrap(), b"bob");
            assert!(!core.remote.ever_had("news/a.html"), "alice's page waits for her token");
            assert!(
                !core.remote.ever_had("news/b.html"),
                "bob's page in alice's new directory waits with it"
            );
            let back = core.backlog().unwrap();
            assert_eq!(back.waiting_for_login, vec![model::ALICE.uid]);
            let why = back.blocked.unwrap_or_default();
            assert!(why.contains("uid 1000") && why.contains("codafs login"), "{why}");
            assert_eq!((back.conflicts, back.refused), (0, 0));
            // `sync` and alice's `fsync` say at once what they wait for (they waited out
            // their whole deadline, although nothing could go before her next login).
            let t = tokio::time::Instant::now();
            let synced = core.sync_log(Duration::from_secs(60)).await;
            assert!(
                matches!(&synced, Err(FsError::Io(m)) if m.contains("uid 1000") && m.contains("wait for a login")),
                "{synced:?}"
            );
            let a_html = core.lookup(news, "a.html").await.unwrap().ino;
            let fsynced = core.sync_node(a_html, 0, Duration::from_secs(60)).await;
            assert!(
                matches!(&fsynced, Err(FsError::Io(m)) if m.contains("uid 1000")),
                "{fsynced:?}"
            );
            assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
            let _ = stop.send(true);
        };
        let ((), ()) = tokio::join!(core.reintegrate(stopped), checks);
        let held = core.backlog().unwrap().changes;
        // The daemon stops here.
        let truth = std::mem::take(&mut *core.remote.lock());
        (truth, held)
    };
    let version = truth.tree.version;
    let core = core_writing_back(dir.path(), 1 << 20);
    *core.remote.lock() = truth;
    let core = with_bob(with_alice(core).await);
    assert_eq!(core.backlog().unwrap().changes, held, "the replay holds what was held");
    // Alice logs in again: a new token, which the servers accept.
    let fresh = signed("alice", Role::User, u64::MAX / 4);
    core.writes.tokens.set(model::ALICE.uid, &fresh, None).unwrap();
    send_log(&core).await;
    for (path, want) in [
        ("news/a.html", b"alice".as_slice()),
        ("news/b.html", b"bob in news"),
        ("b.html", b"bob"),
    ] {
        assert_eq!(core.remote.content(path).unwrap(), want, "{path}");
    }
    let back = core.backlog().unwrap();
    assert_eq!((back.changes, back.conflicts, back.refused), (0, 0, 0), "{back:?}");
    assert!(back.waiting_for_login.is_empty() && back.blocked.is_none(), "{back:?}");
    assert!(core.remote.version() > version);
}

/// Write-back: [`send_log`], while the change stream delivers each commit's event as it does
/// live (reads after a commit wait for its event).
async fn send_log_with_events(core: &Core<FakeRemote>) {
    let done = std::sync::atomic::AtomicBool::new(false);
    let events = async {
        while !done.load(std::sync::atomic::Ordering::Relaxed) {
            deliver_all(core).await;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    let sent = async {
        send_log(core).await;
        done.store(true, std::sync::atomic::Ordering::Relaxed);
    };
    tokio::join!(events, sent);
}

/// Write-back: a node that goes offline keeps creating past one reservation of node ids. The
/// first create reserves two batches (it must wait for the servers); once creations bring the
/// pool below one batch, the reintegrator reserves another after its next send, so more
/// creations than remained before it succeed while every server is down, and all of them reach
/// the servers when they are back.
#[tokio::test(start_paused = true)]
async fn write_back_creates_go_on_offline_past_one_reservation() {
    use crate::core::write::back::RESERVE_BATCH;
    let dir = tempfile::tempdir().unwrap();
    let core = with_alice(core_writing_back(dir.path(), 1 << 20)).await;
    let www = core.lookup(ROOT_INO, "www").await.unwrap().ino;
    let online = RESERVE_BATCH as usize + 10;
    for i in 0..online {
        core.mkdir(model::ALICE, www, &format!("on{i}"), 0o755).await.unwrap();
    }
    let left = core.backlog().unwrap().ids_reserved.get("www").copied().unwrap_or(0);
    assert!(left < u64::from(RESERVE_BATCH), "below one batch: {left}");
    send_log(&core).await;
    let reserved = core.backlog().unwrap().ids_reserved.get("www").copied().unwrap_or(0);
    assert_eq!(
        reserved,
        left + u64::from(RESERVE_BATCH),
        "a batch is reserved ahead once the servers answer"
    );
    core.remote.lock().down = true;
    let offline = RESERVE_BATCH as usize + 100;
    for i in 0..offline {
        core.mkdir(model::ALICE, www, &format!("d{i}"), 0o755)
            .await
            .unwrap_or_else(|e| panic!("offline mkdir {i}: {e:?}"));
    }
    assert_eq!(core.backlog().unwrap().changes, offline as u64);
    core.remote.lock().down = false;
    send_log(&core).await;
    let names = core.remote.names("").unwrap();
    assert_eq!(names.len(), online + offline, "every directory reached the servers");
    let back = core.backlog().unwrap();
    assert_eq!((back.changes, back.conflicts), (0, 0), "{back:?}");
}

/// Write-back: a save in a large directory is not followed by a read of that directory's
/// listing (its cached listing is patched; the few nodes touched are read one by one), and a
/// directory made here gets its listing from what was sent; both stay usable offline.
#[tokio::test(start_paused = true)]
async fn write_back_a_few_changes_in_a_large_directory_do_not_read_it_again() {
    let dir = tempfile::tempdir().unwrap();
    let core = with_alice(core_writing_back(dir.path(), 1 << 20)).await;
    for i in 0..200 {
        core.remote.write(&["big"], &format!("f{i}"), b"old");
    }
    deliver_all(&core).await;
    let www = core.lookup(ROOT_INO, "www").await.unwrap().ino;
    let big = core.lookup(www, "big").await.unwrap().ino;
    assert_eq!(core.readdir(big).await.unwrap().len(), 200);
    let readdirs = core.remote.lock().readdirs;
    model::write(&core, "big/f7", b"new").await.unwrap();
    model::write(&core, "big/g", b"new").await.unwrap();
    core.mkdir(model::ALICE, www, "fresh", 0o755).await.unwrap();
    model::write(&core, "fresh/a", b"a").await.unwrap();
    send_log_with_events(&core).await;
    assert_eq!(core.remote.lock().readdirs, readdirs, "no listing was read again");
    core.remote.lock().down = true;
    let fresh = core.lookup(www, "fresh").await.expect("the new directory, offline").ino;
    core.lookup(fresh, "a").await.expect("its file, offline");
    assert_eq!(core.lookup(fresh, "b").await, Err(FsError::NotFound));
    core.lookup(big, "g").await.expect("the new file, offline");
    core.getattr(core.lookup(big, "f7").await.unwrap().ino)
        .await
        .expect("the rewritten file's attributes, offline");
    assert_eq!(core.readdir(big).await.unwrap().len(), 201, "the listing, offline");
}

/// Write-back: two writers and the reintegrator, on their own threads, while old log segments
/// are deleted (1 MiB each in unit tests): every write arrives. The release of a segment, which
/// first records the node ids in reserve, once took the log's lock and then the state lock while
/// a close took them the other way round, and a 70 MiB `cp -r` hung; this runs that mix, and
/// `wblog`'s `a_carried_record_outlives_the_segments_released_and_carry_runs_unlocked` checks
/// the lock order itself. Bounded in time: a deadlock fails the test.
#[test]
fn write_back_writes_go_on_while_old_segments_are_released() {
    // A deadlock blocks the runtime's workers, timers included: the bound is kept by this
    // thread, which waits for the runtime's thread to report.
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let names = rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let core = Arc::new(with_alice(core_writing_back(dir.path(), 1 << 20)).await);
            let (stop, stopped) = tokio::sync::watch::channel(false);
            let sender = tokio::spawn({
                let core = core.clone();
                async move { core.reintegrate(stopped).await }
            });
            let page = vec![b'x'; 32 << 10];
            let writers: Vec<_> = (0..2)
                .map(|w| {
                    let (core, page) = (core.clone(), page.clone());
                    tokio::spawn(async move {
                        for i in 0..300 {
                            model::write(&core, &format!("w{w}p{i}"), &page).await.unwrap();
                        }
                    })
                })
                .collect();
            for w in writers {
                w.await.unwrap();
            }
            core.sync_log(Duration::from_secs(30)).await.unwrap();
            let _ = stop.send(true);
            sender.await.unwrap();
            core.remote.names("").unwrap().len()
        });
        let _ = done.send(names);
    });
    let names = finished
        .recv_timeout(Duration::from_secs(60))
        .expect("writing and sending finished within 60 s (no deadlock, no panic)");
    assert_eq!(names, 600);
}

/// Write-back: a caller that starts waiting for the servers (`fsync`, `codafs sync`) ends the
/// reintegrator's gathering at once, instead of when its 20 ms wait runs out. An editor's save
/// (an `fsync` of the file, a rename, an `fsync` of the directory) took 53 ms before, almost
/// all of it those waits. (Virtual time: the test's clock moves only when every task waits.)
#[tokio::test(start_paused = true)]
async fn write_back_an_fsync_ends_the_gathering_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let core = with_alice(core_writing_back(dir.path(), 1 << 20)).await;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    // The change stream delivers each commit's event, as it does live (reads after a commit
    // wait for it).
    let events = async {
        while !*stop.borrow() {
            deliver_all(&core).await;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    let saves = async {
        for i in 0..5 {
            model::write(&core, &format!("p{i}"), b"page").await.unwrap();
            // The reintegrator is gathering now.
            tokio::time::sleep(Duration::from_millis(2)).await;
            let started = tokio::time::Instant::now();
            core.sync_log(Duration::from_secs(10)).await.unwrap();
            let waited = started.elapsed();
            assert!(waited < Duration::from_millis(10), "sync {i} waited {waited:?}");
            assert_eq!(core.remote.content(&format!("p{i}")).unwrap(), b"page");
        }
        let _ = stop.send(true);
    };
    tokio::join!(core.reintegrate(stopped), saves, events);
}

/// Write-back: the node ids reserved ahead outlive the log segments whose records reserved
/// them. Once enough was sent for the oldest segments to be deleted, a daemon restarted while
/// every server is down still has its ids, creates with them, and hands none out twice.
#[tokio::test(start_paused = true)]
async fn write_back_reserved_ids_survive_a_restart_after_old_segments_go() {
    let dir = tempfile::tempdir().unwrap();
    let segments = |dir: &std::path::Path| {
        std::fs::read_dir(dir.join("wblog"))
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("seg-"))
            .count()
    };
    let (truth, reserved) = {
        let core = with_alice(core_writing_back(dir.path(), 1 << 20)).await;
        // Inline contents over two segments (1 MiB each in unit tests), all sent.
        let page = vec![b'x'; 64 << 10];
        for i in 0..40 {
            model::write(&core, &format!("p{i}"), &page).await.unwrap();
        }
        let before = segments(dir.path());
        send_log(&core).await;
        assert!(segments(dir.path()) < before, "old segments were deleted");
        let reserved = core.backlog().unwrap().ids_reserved.get("www").copied().unwrap_or(0);
        assert!(reserved > 0);
        // The daemon stops here.
        let truth = std::mem::take(&mut *core.remote.lock());
        (truth, reserved)
    };
    let core = core_writing_back(dir.path(), 1 << 20);
    *core.remote.lock() = truth;
    let core = with_alice(core).await;
    assert_eq!(
        core.backlog().unwrap().ids_reserved.get("www").copied(),
        Some(reserved),
        "the pool was replayed"
    );
    core.remote.lock().down = true;
    let www = core.lookup(ROOT_INO, "www").await.unwrap().ino;
    for i in 0..10 {
        core.mkdir(model::ALICE, www, &format!("off{i}"), 0o755)
            .await
            .unwrap_or_else(|e| panic!("offline mkdir {i} after the restart: {e:?}"));
    }
    core.remote.lock().down = false;
    send_log(&core).await;
    assert_eq!(
        core.remote.names("").unwrap().len(),
        50,
        "every node reached the servers"
    );
    let back = core.backlog().unwrap();
    assert_eq!((back.changes, back.conflicts, back.refused), (0, 0, 0), "{back:?}");
}

/// Write-back: once the log drains, what its commits made the cache forget is read again
/// before `codafs sync` returns, and the contents just sent stay in the blob cache: with every
/// server gone right after, the directories just written (one of them new) still answer
/// lookups, stats and new creations, and the files read and reopen for writing.
#[tokio::test(start_paused = true)]
async fn write_back_what_was_just_sent_stays_usable_offline() {
    let dir = tempfile::tempdir().unwrap();
    let core = with_alice(core_writing_back(dir.path(), 1 << 20)).await;
    let www = core.lookup(ROOT_INO, "www").await.unwrap().ino;
    core.mkdir(model::ALICE, www, "news", 0o755).await.unwrap();
    model::write(&core, "news/a.html", b"a").await.unwrap();
    model::write(&core, "top.html", b"top").await.unwrap();
    send_log_with_events(&core).await;
    assert_eq!(core.remote.content("news/a.html").unwrap(), b"a");
    core.remote.lock().down = true;
    let news = core.lookup(www, "news").await.expect("the new directory, offline").ino;
    core.getattr(news).await.expect("its attributes, offline");
    core.lookup(news, "a.html").await.expect("a file in it, offline");
    core.lookup(www, "top.html")
        .await
        .expect("a file in its parent, offline");
    assert_eq!(core.lookup(news, "absent").await, Err(FsError::NotFound));
    core.mkdir(model::ALICE, news, "more", 0o755)
        .await
        .expect("a creation in it, offline");
    assert_eq!(
        model::read(&core, "news/a.html").await.expect("its content, offline"),
        b"a"
    );
    let top = core.lookup(www, "top.html").await.unwrap().ino;
    let fh = core
        .open(model::ALICE, top, libc::O_WRONLY)
        .await
        .expect("open for writing, offline");
    core.write(fh, 3, b"!").unwrap();
    core.flush(fh).await.unwrap();
    core.release(fh).await;
    core.remote.lock().down = false;
    send_log(&core).await;
    assert!(core.remote.names("news").unwrap().contains(&"more".to_string()));
    assert_eq!(core.remote.content("top.html").unwrap(), b"top!");
}

/// Write-back: after a copy that touches more nodes than the reintegrator reads again one by
/// one (512), with every server gone, every directory of the copy still looks up, stats and
/// lists, and every file stats and reads (what each batch sent is kept in the cache: the
/// newest 512 files of the batch that drained the log before `codafs sync` returns, the rest
/// on the keeper's thread). Before, the directories'
/// attributes were forgotten by the commits and not read again (only the newest 512 nodes
/// were), so paths into the copy failed offline, and only 512 of the files kept their
/// contents.
#[tokio::test(start_paused = true)]
async fn write_back_a_long_copy_stays_usable_offline() {
    let dir = tempfile::tempdir().unwrap();
    let core = Arc::new(with_alice(core_writing_back(dir.path(), 1 << 20)).await);
    core.run_in_background();
    let subdirs = ["a", "b", "c"];
    // Each directory gets a few names in a batch of its own, then many.
    model::write(&core, "site/a/first.html", b"first").await.unwrap();
    send_log_with_events(&core).await;
    for d in subdirs {
        for i in 0..250 {
            model::write(&core, &format!("site/{d}/f{i:03}.html"), format!("{d}{i}").as_bytes())
                .await
                .unwrap();
        }
    }
    send_log_with_events(&core).await;
    core.kept_in_background().await;
    core.remote.lock().down = true;
    let www = core.lookup(ROOT_INO, "www").await.expect("the volume, offline").ino;
    core.getattr(www).await.expect("its attributes, offline");
    let site = core.lookup(www, "site").await.expect("the copy's top, offline").ino;
    core.getattr(site).await.expect("its attributes, offline");
    for d in subdirs {
        let sub = core
            .lookup(site, d)
            .await
            .expect("a directory of the copy, offline")
            .ino;
        let (names, _view) = core.names_reply(sub, 0).await;
        let names = names.expect("its listing, offline");
        assert_eq!(names.len(), if d == "a" { 251 } else { 250 });
        for (name, ino, _) in names {
            core.getattr(ino)
                .await
                .unwrap_or_else(|e| panic!("{d}/{name} stats offline: {e}"));
        }
        for i in 0..250 {
            let path = format!("site/{d}/f{i:03}.html");
            let got = model::read(&core, &path)
                .await
                .unwrap_or_else(|e| panic!("{path} reads offline: {e}"));
            assert_eq!(got, format!("{d}{i}").as_bytes());
        }
    }
}

/// Write-back: truncating a file that is not open is logged like a close's content (it does
/// not wait for the servers), shown at once, and sent with the next batch.
#[tokio::test(start_paused = true)]
async fn write_back_truncate_of_a_closed_file_is_logged() {
    let dir = tempfile::tempdir().unwrap();
    let core = with_alice(core_writing_back(dir.path(), 1 << 20)).await;
    core.remote.write(&[], "p", b"hello world");
    deliver_all(&core).await;
    let www = core.lookup(ROOT_INO, "www").await.unwrap().ino;
    let p = core.lookup(www, "p").await.unwrap().ino;
    assert_eq!(model::read(&core, "p").await.unwrap(), b"hello world", "now cached");
    core.remote.lock().down = true;
    let s = write::SetAttrs {
        size: Some(5),
        ..Default::default()
    };
    let a = core.setattr(model::ALICE, p, s).await.unwrap();
    assert_eq!(a.size, 5, "shown at once, with every server down");
    assert_eq!(model::read(&core, "p").await.unwrap(), b"hello");
    core.remote.lock().down = false;
    send_log(&core).await;
    assert_eq!(core.remote.content("p").unwrap(), b"hello");
}

/// A truncate by path that arrives while the file's last handle is being released is kept.
/// The kernel sends the release after `close` has returned, so a `truncate(path)` right after a
/// close runs at the same time as the release. Here the release has a store to make (a file
/// written through `mmap` gets no flush), and the truncate comes while its commit is in flight.
/// Before the truncate pinned the shadow and the last opener stored again, the release
/// dropped the shadow with the new size in it: pjdfstest's `truncate::extend_file_shrink_sparse`
/// saw size 0 once on a write-back mount, where the two run on different threads.
#[tokio::test(start_paused = true)]
async fn a_truncate_during_the_release_is_kept() {
    truncate_during_the_release(false).await;
}

/// The same, when the release's store fails: that failure is of the content before the
/// truncate, so the shadow is not marked failed, and the truncated content is stored (before,
/// the release dropped the shadow with the truncate's change, and the truncate reported
/// success).
#[tokio::test(start_paused = true)]
async fn a_truncate_during_a_failing_release_is_still_stored() {
    truncate_during_the_release(true).await;
}

/// A file written and not flushed; its release stores it with the server's commit held back
/// (and failing, with `fail_release`) while a truncate by path runs. The truncate's size is
/// what ends up stored.
async fn truncate_during_the_release(fail_release: bool) {
    let dir = tempfile::tempdir().unwrap();
    let core = with_alice(core_with(dir.path(), 1 << 20)).await;
    let www = core.lookup(ROOT_INO, "www").await.unwrap().ino;
    let (a, fh) = core.create(model::ALICE, www, "f", 0o644).await.unwrap();
    core.write(fh, 0, b"x").unwrap();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    {
        let mut t = core.remote.lock();
        t.commit_gate = Some(gate.clone());
        t.fail_next_commit = fail_release.then_some(CommitFailure::Refused);
    }
    let size = 1_234_567;
    let cut = async {
        let s = write::SetAttrs {
            size: Some(size),
            ..Default::default()
        };
        core.setattr(model::ALICE, a.ino, s).await
    };
    let open_gate = async {
        tokio::time::sleep(Duration::from_millis(10)).await;
        gate.add_permits(100);
    };
    let (dropped, cut, ()) = tokio::join!(core.release(fh), cut, open_gate);
    assert!(!dropped, "no change was dropped");
    assert_eq!(cut.expect("the truncate is stored").size, size, "the truncate's reply");
    assert_eq!(core.getattr(a.ino).await.unwrap().size, size, "shown after both");
    let stored = core.remote.content("f").unwrap();
    assert_eq!((stored.len() as u64, stored[0]), (size, b'x'), "as stored");
}

/// The same race run in parallel, many times: whichever of the release and the truncate comes
/// first, the new size is kept. Bounded in count and time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_back_a_truncate_racing_the_release_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let core = Arc::new(with_alice(core_writing_back(dir.path(), 1 << 20)).await);
    let www = core.lookup(ROOT_INO, "www").await.unwrap().ino;
    let started = std::time::Instant::now();
    let mut files = Vec::new();
    for i in 0..1_000u64 {
        if started.elapsed() > Duration::from_secs(2) {
            break;
        }
        let (a, fh) = core.create(model::ALICE, www, &format!("f{i}"), 0o644).await.unwrap();
        core.write(fh, 0, b"x").unwrap();
        core.flush(fh).await.unwrap();
        let size = 1_000 + i;
        let released = tokio::spawn({
            let core = core.clone();
            async move { core.release(fh).await }
        });
        let cut = tokio::spawn({
            let core = core.clone();
            async move {
                let s = write::SetAttrs {
                    size: Some(size),
                    ..Default::default()
                };
                core.setattr(model::ALICE, a.ino, s).await
            }
        });
        assert!(!released.await.unwrap(), "file {i}: no change was dropped");
        assert_eq!(cut.await.unwrap().unwrap().size, size, "file {i}: the truncate's reply");
        assert_eq!(core.getattr(a.ino).await.unwrap().size, size, "file {i}: shown after");
        files.push((i, size));
    }
    assert!(files.len() >= 50, "only {} rounds ran", files.len());
    send_log(&core).await;
    for (i, size) in files {
        let stored = core.remote.content(&format!("f{i}")).unwrap();
        assert_eq!(stored.len() as u64, size, "file {i} as sent");
        assert_eq!(stored[0], b'x');
    }
}

/// A whole file read through the core in the kernel's 1 MiB pieces.
async fn read_whole(core: &Core<FakeRemote>, name: &str) -> Vec<u8> {
    let www = core.lookup(ROOT_INO, "www").await.unwrap().ino;
    let a = core.lookup(www, name).await.unwrap();
    let mut out = Vec::new();
    loop {
        let part = core.read(a.ino, 0, out.len() as u64, 1 << 20).await.unwrap();
        if part.is_empty() {
            return out;
        }
        out.extend_from_slice(&part);
    }
}

/// Rewrites `data` at `offset` of an existing file through the core, and closes it.
async fn patch(core: &Core<FakeRemote>, name: &str, offset: u64, data: &[u8]) {
    let www = core.lookup(ROOT_INO, "www").await.unwrap().ino;
    let a = core.lookup(www, name).await.unwrap();
    let fh = core.open(model::ALICE, a.ino, libc::O_WRONLY).await.unwrap();
    core.write(fh, offset, data).unwrap();
    core.flush(fh).await.unwrap();
    core.release(fh).await;
}

/// A large file is stored as chunks and a manifest; rewriting 64 KiB of it sends one or two
/// chunks and a new manifest, not the file; both versions read back whole. Write-through and
/// write-back mounts alike.
#[tokio::test(start_paused = true)]
async fn a_large_file_is_stored_in_chunks_and_a_small_edit_sends_only_its_chunks() {
    for back in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let core = if back {
            with_alice(core_writing_back(dir.path(), 256 << 20)).await
        } else {
            writable_core(dir.path()).await
        };
        let mut data = noise(24 << 20, 11);
        model::write(&core, "big.iso", &data).await.unwrap();
        if back {
            send_log(&core).await;
        }
        assert_eq!(core.remote.content("big.iso").unwrap(), data, "write-back {back}");
        // The mount's "stored" counter counts the file once (the write-back log counted it
        // when it logged it, and its put counted it again).
        let stored = core.status().writes.stored_bytes;
        assert_eq!(stored, 24 << 20, "write-back {back}");
        let first = core.remote.lock().new_blob_bytes;
        assert!((24 << 20..25 << 20).contains(&first), "stored {first} bytes");
        core.remote.lock().new_blob_bytes = 0;
        let edit = noise(64 << 10, 12);
        data[(9 << 20)..(9 << 20) + edit.len()].copy_from_slice(&edit);
        patch(&core, "big.iso", 9 << 20, &edit).await;
        if back {
            send_log(&core).await;
        }
        assert_eq!(core.remote.content("big.iso").unwrap(), data);
        let sent = core.remote.lock().new_blob_bytes;
        assert!(
            sent > 0 && sent <= 2 * codafs_common::chunks::CHUNK_MAX as u64 + (64 << 10),
            "a 64 KiB edit stored {sent} new bytes"
        );
        assert_eq!(read_whole(&core, "big.iso").await, data, "read back here");
    }
}

/// A large file written elsewhere is fetched chunk by chunk, each chunk verified; through
/// memory too when the cache has no room.
#[tokio::test(start_paused = true)]
async fn a_large_file_from_elsewhere_is_fetched_in_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let core = writable_core(dir.path()).await;
    let data = noise(10 << 20, 13);
    core.remote.write(&[], "video.mp4", &data);
    deliver_all(&core).await;
    assert_eq!(read_whole(&core, "video.mp4").await, data);
    let fetches = core.remote.lock().blob_fetches;
    assert!(fetches >= 4, "a manifest and its chunks: {fetches} fetches");
    // A copy that fails verification is refused, not served.
    let dir2 = tempfile::tempdir().unwrap();
    let other = writable_core(dir2.path()).await;
    other.remote.write(&[], "video.mp4", &data);
    deliver_all(&other).await;
    {
        let mut t = other.remote.lock();
        let chunk = t
            .blobs
            .iter()
            .find(|(_, b)| b.len() <= codafs_common::chunks::CHUNK_MAX as usize && b.len() > 100_000)
            .map(|(h, _)| *h)
            .unwrap();
        if let Some(b) = t.blobs.get_mut(&chunk) {
            b[0] ^= 1;
        }
    }
    let www = other.lookup(ROOT_INO, "www").await.unwrap().ino;
    let a = other.lookup(www, "video.mp4").await.unwrap();
    let mut failed = false;
    for at in (0..10u64 << 20).step_by(1 << 20) {
        failed |= other.read(a.ino, 0, at, 1 << 20).await.is_err();
    }
    assert!(failed, "a corrupt chunk must fail the read");
}

/// A new version of a large file, announced by a change event, costs only its new chunks: the
/// rest are copied from the cached old version (what a web node pays when a webmaster edits a
/// large file, and what `codafs prefetch` moves).
#[tokio::test(start_paused = true)]
async fn a_new_version_of_a_large_file_fetches_only_its_new_chunks() {
    let dir = tempfile::tempdir().unwrap();
    // A cache larger than the file: one larger than the whole cache is read through memory.
    let core = with_alice(core_with(dir.path(), 1 << 30)).await;
    let mut data = noise(24 << 20, 21);
    core.remote.write(&[], "db.sqlite", &data);
    deliver_all(&core).await;
    assert_eq!(read_whole(&core, "db.sqlite").await, data);
    let first = core.remote.lock().blob_fetches;
    data[(15 << 20)..(15 << 20) + 4096].copy_from_slice(&noise(4096, 22));
    core.remote.write(&[], "db.sqlite", &data);
    deliver_all(&core).await;
    assert_eq!(read_whole(&core, "db.sqlite").await, data);
    let fetched = core.remote.lock().blob_fetches - first;
    assert!(fetched <= 4, "the manifest and one or two chunks, not {fetched} blobs");
    let reused = core.stats.reused_chunk_bytes.load(Ordering::Relaxed);
    assert!(reused >= 16 << 20, "only {reused} bytes came from the old version");
}

/// A reader of a large file starts before the whole file arrives: the first read waits for the
/// first few chunks only, a far seek fetches only its own chunk, and reading on brings the rest
/// into the cache (then a cache hit like any file).
#[tokio::test(start_paused = true)]
async fn a_large_file_is_read_before_it_has_all_arrived() {
    let dir = tempfile::tempdir().unwrap();
    // A cache larger than the file: one larger than the whole cache is read through memory.
    let core = with_alice(core_with(dir.path(), 1 << 30)).await;
    let data = noise(96 << 20, 41);
    core.remote.write(&[], "movie.mp4", &data);
    deliver_all(&core).await;
    let www = core.lookup(ROOT_INO, "www").await.unwrap().ino;
    let a = core.lookup(www, "movie.mp4").await.unwrap();
    let chunks = (data.len() >> 20) as u64;
    assert_eq!(core.read(a.ino, 0, 0, 4096).await.unwrap(), &data[..4096]);
    let first = core.remote.lock().blob_fetches;
    assert!(
        first <= 6,
        "the first read fetched {first} blobs (the manifest and a few chunks)"
    );
    let far = 80 << 20;
    assert_eq!(
        core.read(a.ino, 0, far, 4096).await.unwrap(),
        &data[far as usize..far as usize + 4096]
    );
    assert!(
        core.remote.lock().blob_fetches <= first + 2,
        "a far seek fetches its own chunk"
    );
    assert_eq!(read_whole(&core, "movie.mp4").await, data);
    let all = core.remote.lock().blob_fetches;
    assert!(all > chunks / 4, "{all} fetches for the whole file");
    assert_eq!(read_whole(&core, "movie.mp4").await, data);
    assert_eq!(core.remote.lock().blob_fetches, all, "now a cache hit");
}
