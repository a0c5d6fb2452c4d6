//! Write-back: a writable mount's changes go to the durable log first ([`crate::wblog`]) and reach
//! the servers in batches, sent by a background reintegrator.
//!
//! What is logged: creations (files, directories, symlinks, special nodes), contents stored by
//! `close`, and chmod/chown/utimens. New nodes are named with node ids the servers set aside for
//! this mount (`Op::Reserve`), so the kernel gets its final inode number at once. Until a change
//! is on the servers, this mount shows it from an overlay (new names, new nodes, changed
//! attributes) over what the servers hold; reads of written content not yet sent are served
//! from the log (copied into the blob cache on first read). Unlink, rmdir, rename and link are
//! logged too (`names.rs`); truncating a file that is not open logs its new content.
//!
//! A batch is consecutive changes of one volume by one local user: its contents are put to the
//! write quorum, then one commit applies all of it, a file's creation and content as one
//! operation. Content changes carry the version the file had when it was opened; if another
//! writer got there first, the batch fails with a conflict and its changes are sent one by one:
//! a change whose name was taken goes under a sibling name (`NAME.conflict-HOST-TIME`), and so
//! does content written over someone else's newer version. Nothing logged is dropped silently:
//! conflicts are counted in `codafs status` and logged.
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::OnceLock;

use tokio::sync::{watch, Notify};

use super::batch::{batch_ops, batch_ops_before, referenced};
use super::*;
use crate::cache::meta::DirPatch;
use crate::core::chunked::read_at;
use crate::core::remote::{new_request_id, RequestId};
use crate::core::types::{perms_set, Attr, Committed};
use crate::core::{Invalidation, Invalidator};
use crate::wblog::{in_runs, runs_of, Change, Content, Log, LogError, Record, INLINE_MAX};
use codafs_common::chunks::chunk_reader;

/// Node ids asked for at a time. New nodes take their ids from a pool the servers set aside
/// for this mount, so creating works while the servers are unreachable, as long as ids remain.
pub(crate) const RESERVE_BATCH: u32 = 4096;
/// Directories (and nodes) read again after the log drains, at most; listings longer than
/// `REWARM_LISTING_MAX` are not read again whole (their directory's attributes are).
const REWARM_MAX: usize = 512;
const REWARM_LISTING_MAX: usize = 10_000;
/// A directory that gained at least this many names since the log last drained has its listing
/// read again (with every entry's attributes, in one call) rather than those nodes' attributes
/// one by one.
const REWARM_LISTING_NAMES: usize = 16;
/// Bytes of sent inline contents read back from the log for the blob cache, at most: per
/// batch, and in memory waiting for or being copied by the keeper's thread (`KeepQueue`).
const KEEP_MAX_BYTES: u64 = 64 << 20;
/// Sent contents up to this size are kept in packs of up to `PACK_BYTES`, as a listing's small
/// files are (`core/prefetch.rs`).
const PACK_FILE_MAX: u64 = 64 << 10;
const PACK_BYTES: u64 = 1 << 20;
/// The reads of `rewarm` take at most this long in all.
const REWARM_TIME: Duration = Duration::from_millis(500);
/// When fewer ids than this remain for a volume, the reintegrator reserves another batch after
/// its next successful send (a mount's first create reserves two): a node that goes offline
/// still has at least this many creations in hand, counted from its last send, and only a
/// mount's first create in a volume waits for a reservation.
const RESERVE_LOW: u64 = RESERVE_BATCH as u64;
/// Volumes a login reserves node ids in ahead, at most (see `Core::reserve_ahead`).
const RESERVE_AHEAD_VOLUMES: usize = 16;
/// A batch holds at most this many changes, and this many content bytes.
const BATCH_CHANGES: usize = 5000;
const BATCH_BYTES: u64 = 64 << 20;
/// The reintegrator gathers changes while they keep coming (checked every `GATHER`), for at most
/// `GATHER_MAX`: a stream of closes goes out in a few large batches instead of many small ones,
/// each of which costs the servers a Raft entry and fsyncs. A caller that starts waiting for the
/// servers (`fsync`, `codafs sync`) ends the gathering at once.
const GATHER: Duration = Duration::from_millis(20);
const GATHER_MAX: Duration = Duration::from_millis(250);
/// `own_versions` entries kept before those no queued change or open file needs are dropped.
const OWN_VERSIONS_KEPT: usize = 16384;
/// Small contents are put in groups of at most this many blobs and bytes.
const PUT_GROUP: usize = 250;
const PUT_GROUP_BYTES: u64 = 8 << 20;
const SMALL_PUT: usize = 256 << 10;

/// Fields a logged change set on a node the servers have.
#[derive(Debug, Clone, Default)]
pub(crate) struct AttrPatch {
    content: Option<(Hash, u64, i64)>,
    /// The version the first unsent content expects: what the shown content is based on. A
    /// change made over it (the file opened and written again, removed, renamed) must expect
    /// that version too, not a newer one another node committed meanwhile, or it would replace
    /// that node's content without a conflict (the unsent content conflicts, but a later one
    /// replaces it, so no copy of it is kept).
    base_version: Option<u64>,
    /// Links added or taken away (a directory gains one per subdirectory made in it, a file
    /// loses one per name removed).
    nlink_delta: i32,
    /// A directory moved: its new parent.
    parent: Option<u64>,
    mode: Option<u32>,
    uid: Option<u32>,
    gid: Option<u32>,
    mtime_ns: Option<i64>,
    atime_ns: Option<i64>,
    ctime_ns: i64,
}

impl AttrPatch {
    pub(crate) fn apply(&self, a: &mut Attr) {
        if let Some((h, size, mtime)) = self.content {
            (a.hash, a.size, a.mtime_ns) = (Some(h), size, mtime);
        }
        if let Some(v) = self.base_version {
            a.version = v;
        }
        a.mode = self.mode.unwrap_or(a.mode);
        a.uid = self.uid.unwrap_or(a.uid);
        a.gid = self.gid.unwrap_or(a.gid);
        a.mtime_ns = self.mtime_ns.unwrap_or(a.mtime_ns);
        a.atime_ns = self.atime_ns.unwrap_or(a.atime_ns);
        a.ctime_ns = a.ctime_ns.max(self.ctime_ns);
        a.nlink = add_links(a.nlink, self.nlink_delta);
        a.parent = self.parent.unwrap_or(a.parent);
    }
}

fn add_links(nlink: u32, delta: i32) -> u32 {
    nlink.saturating_add_signed(delta)
}

/// What a name changed here leads to: a node and its kind, or nothing (removed here).
pub(crate) type NameNow = Option<(u64, NodeKind)>;

/// A node as this mount's unsent changes leave it.
#[derive(Debug, Clone)]
pub(crate) enum Pending {
    /// Created here; the servers do not have it yet.
    Created(Attr),
    /// Changed here: these fields over what the servers hold.
    Changed(AttrPatch),
}

#[derive(Default)]
struct BackState {
    next_seq: u64,
    /// Changes not yet settled, in order.
    queue: VecDeque<Change>,
    /// Batches with a `Sending` record in the log, not yet settled, in the order they were
    /// first sent: each is sent again (with its request id) before anything new of its user.
    sent: Vec<Sent>,
    /// Users whose changes wait for a token (none held, or one the servers refused): their
    /// changes, and every later change that needs one of those (see [`keys`]), are held back
    /// while the rest of the log is sent.
    held: HashMap<u32, Held>,
    /// The queued changes the reintegrator last found held back (see `held_back_seqs`).
    held_seqs: HashSet<u64>,
    /// The sibling name each conflict copy of the batch being sent got, by the request id of
    /// its commit: a retry (after a lost reply) must send the same name, since the servers
    /// answer a repeated request id with the first outcome, and the mount's listing is
    /// patched with the name it sent.
    conflict_names: HashMap<RequestId, String>,
    /// Reserved node ids per volume: ranges `next..end`.
    pool: HashMap<String, VecDeque<(u64, u64)>>,
    /// Volumes whose pool ran below [`RESERVE_LOW`], with the uid whose token reserves more.
    low_pools: HashMap<String, u32>,
    /// Directories and nodes whose cached metadata this mount's commits made it forget (or,
    /// for new directories, never had): read again once the log drains (see `rewarm`), so
    /// what was just sent stays usable while the servers are unreachable. At most
    /// [`REWARM_MAX`] of each, the newest (older ones are dropped first).
    rewarm_dirs: VecDeque<u64>,
    rewarm_nodes: VecDeque<u64>,
    /// Names each of those directories gained since (`usize::MAX`: its listing is to be read
    /// again whatever it gained); at most `4 * REWARM_MAX` directories.
    rewarm_gained: HashMap<u64, usize>,
    /// Names changed per directory: name -> (the node and kind it leads to now, or `None` if
    /// it was removed here; seq of the change).
    names: HashMap<u64, BTreeMap<String, (NameNow, u64)>>,
    /// Nodes changed here, with the seq of their last change.
    nodes: HashMap<u64, (Pending, u64)>,
    /// Nodes whose creation is not on the servers yet, with its seq. (A node created here stays
    /// `Pending::Created` while later changes of it are unsent, also once its creation is sent.)
    unsent_creations: HashMap<u64, u64>,
    /// Version each node had after this mount's last write-back commit touching it.
    own_versions: HashMap<u64, u64>,
    /// Where a node with unsettled changes here was listed when another client's latest change
    /// to it arrived (directory, name): a conflict copy of one removed elsewhere goes there, since
    /// the cache no longer knows it once the event is applied. Only nodes in `nodes`.
    places: HashMap<u64, (u64, String)>,
    conflicts: u64,
    last_conflict: Option<String>,
    refused: u64,
    last_refused: Option<String>,
    /// What the replay at start skipped as damaged (see [`BacklogStatus::damaged`]).
    damaged: Option<String>,
    /// Why the last batch could not be sent (servers unreachable...), until one is.
    failing: Option<String>,
    sent_batches: u64,
    sent_changes: u64,
    /// Changes the servers refused or that conflicted, newest last (at most
    /// [`FAILURES_KEPT`]): an `fsync` or `sync` that waited for one reports it instead of
    /// success (see `WriteBack::settled_through`).
    failures: VecDeque<Failure>,
    /// Failures recorded since the mount started; a failure's `n` is the count before it.
    failed_total: u64,
    /// A failure no whole-log sync reported was forgotten (past [`FAILURES_KEPT`]): the next
    /// one says so.
    forgot_unreported: bool,
}

/// Failed changes remembered for the `fsync`s and `sync`s waiting for them.
const FAILURES_KEPT: usize = 1024;

/// A logged change that did not reach the servers as logged: refused, or kept under another
/// name after a conflict.
struct Failure {
    n: u64,
    seq: u64,
    nodes: Vec<u64>,
    error: FsError,
    /// A whole-log sync (`codafs sync`, `syncfs`) reported it: the next ones do not.
    reported: bool,
}

impl BackState {
    /// Remembers that change `c` failed with `error`, for those waiting for it.
    fn failed(&mut self, c: &Change, error: FsError) {
        let n = self.failed_total;
        self.failed_total += 1;
        self.failures.push_back(Failure {
            n,
            seq: c.seq,
            nodes: touched(&c.op),
            error,
            reported: false,
        });
        if self.failures.len() > FAILURES_KEPT {
            if let Some(f) = self.failures.pop_front() {
                self.forgot_unreported |= !f.reported;
            }
        }
    }

    /// What an `fsync` of `node`, begun when `since` failures were counted and waiting for the
    /// changes up to `seq`, reports: a failure of such a change of `node` recorded since. If
    /// more failed since then than are remembered, one that was forgotten might have been
    /// such a change: that is reported too.
    fn node_failure(&self, since: u64, seq: u64, node: u64) -> Option<FsError> {
        let hit = self
            .failures
            .iter()
            .filter(|f| f.n >= since && f.seq <= seq)
            .find(|f| f.nodes.contains(&node));
        if let Some(f) = hit {
            return Some(f.error.clone());
        }
        let oldest = self.failures.front().map_or(self.failed_total, |f| f.n);
        (oldest > since).then(|| {
            FsError::Io(format!(
                "more than {FAILURES_KEPT} logged changes were refused or conflicted meanwhile; see codafs status"
            ))
        })
    }

    /// What a whole-log sync waiting for the changes up to `seq` reports: the first failure of
    /// such a change that no sync reported yet. Every such failure counts as reported then,
    /// and only those (a change logged after the sync began is left to the next one).
    fn log_failure(&mut self, seq: u64) -> Option<FsError> {
        let mut first = None;
        for f in self.failures.iter_mut().filter(|f| !f.reported && f.seq <= seq) {
            f.reported = true;
            first.get_or_insert_with(|| f.error.clone());
        }
        if std::mem::take(&mut self.forgot_unreported) && first.is_none() {
            first = Some(FsError::Io(format!(
                "more than {FAILURES_KEPT} logged changes were refused or conflicted; see codafs status"
            )));
        }
        first
    }
}

/// What `codafs status` shows of write-back.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BacklogStatus {
    /// Changes logged and not yet on the servers.
    pub changes: u64,
    /// Bytes the log holds, and its bound.
    pub log_bytes: u64,
    pub log_limit: u64,
    pub batches_sent: u64,
    pub changes_sent: u64,
    pub conflicts: u64,
    pub last_conflict: Option<String>,
    /// Changes the servers refused outright (no right, over quota), set aside with their bytes.
    #[serde(default)]
    pub refused: u64,
    #[serde(default)]
    pub last_refused: Option<String>,
    /// Why nothing is being sent, if so.
    pub blocked: Option<String>,
    /// Users whose changes wait for `codafs login` (their token expired, was revoked, or is
    /// missing); the changes of other users are sent meanwhile.
    #[serde(default)]
    pub waiting_for_login: Vec<u32>,
    /// Node ids reserved for new nodes, per volume: how many files and directories this node
    /// can still create while the servers are unreachable.
    #[serde(default)]
    pub ids_reserved: BTreeMap<String, u64>,
    /// Damaged stretches of the log skipped when it was replayed at this mount's start: the
    /// changes in them are lost, their bytes kept in `lost+found`.
    #[serde(default)]
    pub damaged: Option<String>,
}

/// A batch whose `Sending` record is in the log: its changes (ranges of seq) and commit id.
#[derive(Debug, Clone)]
struct Sent {
    uid: u32,
    runs: Vec<(u64, u64)>,
    request: RequestId,
}

/// Why a user's changes are held back: the token the servers refused (`None`: no token was
/// held), since when, and what they said.
#[derive(Debug, Clone)]
struct Held {
    token: Option<String>,
    since: tokio::time::Instant,
    why: String,
}

/// A held user's changes are tried again this long after the refusal even with the same token
/// (a new token, from `codafs login`, is tried at once).
const HELD_RETRY: Duration = Duration::from_secs(30);
/// While every queued change is held back, the reintegrator looks for a new token this often.
const HELD_RECHECK: Duration = Duration::from_secs(1);

/// The write-back side of a writable mount.
pub struct WriteBack {
    log: Log,
    st: Mutex<BackState>,
    /// New changes for the reintegrator.
    work: Notify,
    /// Callers waiting for the servers (`fsync`, `codafs sync`): batches go without gathering.
    waiting: std::sync::atomic::AtomicUsize,
    /// A caller started waiting for the servers: a gathering reintegrator sends at once.
    hurry: Notify,
    /// The one copy of sent contents into the blob cache that may run in the background (see
    /// `Core::keep_in_background`), and what waits for it.
    keeping: Arc<tokio::sync::Semaphore>,
    to_keep: Mutex<KeepQueue>,
    /// Batches settled (and changes of what is held back) so far: waiters for the servers look
    /// again at each.
    settles: watch::Sender<u64>,
    /// Names the kernel must forget when a conflict moves a new node aside.
    kernel: OnceLock<Arc<dyn Invalidator>>,
    host: String,
}

fn log_err(e: LogError) -> FsError {
    match &e {
        LogError::Full { .. } => FsError::NoSpace(e.to_string()),
        // EFBIG, not ENOSPC: waiting for the servers would not make room for it.
        LogError::TooLarge { .. } => FsError::TooLarge(e.to_string()),
        // The cache disk is full: the log cannot grow.
        LogError::Io(_, io) if crate::core::error::is_disk_full(io) => FsError::NoSpace(e.to_string()),
        _ => FsError::Io(e.to_string()),
    }
}

impl WriteBack {
    /// Opens the log in `dir` (bounded by `limit` bytes) and takes up what it holds.
    pub fn open(dir: &std::path::Path, limit: u64) -> Result<Self, FsError> {
        let (log, replay) = Log::open(dir, limit).map_err(log_err)?;
        let mut st = BackState::default();
        if let Some(first) = replay.damaged.first() {
            let bytes: u64 = replay.damaged.iter().map(|d| d.bytes).sum();
            st.damaged = Some(format!(
                "{} damaged stretch(es) of the log ({bytes} bytes) skipped at replay: the changes in \
                 them are lost; their bytes are kept in {} (and beside it)",
                replay.damaged.len(),
                first.kept.display()
            ));
        }
        let done = replay
            .records
            .iter()
            .filter_map(|r| match r {
                Record::Done { last } => Some(*last),
                _ => None,
            })
            .max()
            .unwrap_or(0);
        // Changes settled ahead of earlier ones held back.
        let early: Vec<(u64, u64)> = replay
            .records
            .iter()
            .filter_map(|r| match r {
                Record::Settled { runs } => Some(runs.iter().copied()),
                _ => None,
            })
            .flatten()
            .filter(|r| r.1 > done)
            .collect();
        let mut max_seq = done;
        // Creations' ids leave the pool once every record is read: a `Pool` snapshot may
        // follow the creation of an id it still held (taken while the snapshot was written).
        let mut used = Vec::new();
        for r in replay.records {
            match r {
                Record::Change(c) => {
                    max_seq = max_seq.max(c.seq);
                    if let Op::Create { ino: Some(ino), .. } = &c.op {
                        used.push((c.volume.clone(), *ino));
                    }
                    if c.seq > done && !in_runs(&early, c.seq) {
                        st.overlay(&c);
                        st.queue.push_back(c);
                    }
                }
                Record::Reserved { volume, first, count } => {
                    st.pool
                        .entry(volume)
                        .or_default()
                        .push_back((first, first + u64::from(count)));
                }
                // The pool as it was when older segments went: what their records built up.
                Record::Pool { pools } => {
                    st.pool = pools.into_iter().map(|(v, r)| (v, r.into_iter().collect())).collect();
                }
                Record::Sending { first, last, request } => {
                    // New changes never reuse a sent batch's numbers.
                    max_seq = max_seq.max(last);
                    if last > done {
                        st.sent.push(Sent {
                            uid: 0,
                            runs: vec![(first, last)],
                            request,
                        });
                    }
                }
                Record::SendingRuns { runs, request } => {
                    let last = runs.iter().map(|r| r.1).max().unwrap_or(0);
                    max_seq = max_seq.max(last);
                    if last > done {
                        st.sent.push(Sent { uid: 0, runs, request });
                    }
                }
                Record::Own { until, versions } if until > done => {
                    for (ino, v) in versions {
                        let e = st.own_versions.entry(ino).or_insert(v);
                        *e = (*e).max(v);
                    }
                }
                _ => {}
            }
        }
        for (volume, ino) in used {
            st.take_id_used(&volume, ino);
        }
        st.next_seq = max_seq + 1;
        // A sent batch whose changes all settled is done. (One whose changes are gone from the
        // log, which only an older version's release order could do, is not resent: its request
        // id would settle whatever comes next unsent.)
        let mut sent = std::mem::take(&mut st.sent);
        sent.retain_mut(|s| match st.queue.iter().find(|c| in_runs(&s.runs, c.seq)) {
            Some(c) => {
                s.uid = c.uid;
                true
            }
            None => false,
        });
        st.sent = sent;
        // Segments and data files that only settled changes need (a crash came before their
        // release) go now. (Up to `done` only: a segment is kept while its changes may need the
        // `Settled` records of others, until a `Done` covers them.)
        log.release_keeping(done, &[], || Some(st.pool_record()), |_, _, _| false);
        let keep = st
            .queue
            .iter()
            .filter_map(|c| match &c.content {
                Some(Content::File(name)) => Some(name.clone()),
                _ => None,
            })
            .collect();
        let unlogged = log.keep_only_data(&keep, !replay.damaged.is_empty());
        if unlogged > 0 {
            if let Some(d) = &mut st.damaged {
                d.push_str(&format!(
                    "; {unlogged} content file(s) no record names any more are kept in lost+found as unlogged-*"
                ));
            }
        }
        if !st.queue.is_empty() {
            tracing::info!(
                changes = st.queue.len(),
                "write-back log replayed: sending what the last daemon left"
            );
        }
        Ok(WriteBack {
            log,
            st: Mutex::new(st),
            work: Notify::new(),
            waiting: Default::default(),
            hurry: Notify::new(),
            keeping: Arc::new(tokio::sync::Semaphore::new(1)),
            to_keep: Mutex::new(KeepQueue::default()),
            settles: watch::channel(0).0,
            kernel: OnceLock::new(),
            host: hostname(),
        })
    }

    /// Sent contents waiting for the keeper (see `Core::keep_in_background`).
    fn keep_queue(&self) -> std::sync::MutexGuard<'_, KeepQueue> {
        self.to_keep.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn st(&self) -> std::sync::MutexGuard<'_, BackState> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The kernel's caches, for names a conflict moves aside.
    pub fn set_kernel(&self, k: Arc<dyn Invalidator>) {
        let _ = self.kernel.set(k);
    }

    /// Makes the kernel forget these nodes and names (a conflict or refusal changed what this
    /// mount showed of them).
    fn invalidate(&self, inodes: Vec<u64>, entries: Vec<(u64, String)>) {
        if let Some(k) = self.kernel.get() {
            k.invalidate(&Invalidation { inodes, entries });
        }
    }

    pub(crate) fn pending(&self, ino: u64) -> Option<Pending> {
        self.st().nodes.get(&ino).map(|(p, _)| p.clone())
    }

    /// Whether `ino` is a directory created here and not on the servers yet.
    pub(crate) fn new_dir(&self, ino: u64) -> bool {
        let st = self.st();
        st.unsent_creations.contains_key(&ino)
            && matches!(st.nodes.get(&ino), Some((Pending::Created(a), _)) if a.kind == NodeKind::Dir)
    }

    /// What `name` in `dir` leads to, if a change logged here and not yet sent made or removed it
    /// (`Some(None)`: removed here).
    pub(crate) fn new_name(&self, dir: u64, name: &str) -> Option<Option<u64>> {
        self.st().names.get(&dir)?.get(name).map(|(now, _)| now.map(|(i, _)| i))
    }

    /// Names in `dir` that unsent changes made or removed: (name, what it leads to now).
    pub(crate) fn names_in(&self, dir: u64) -> Vec<(String, NameNow)> {
        self.st()
            .names
            .get(&dir)
            .map_or_else(Vec::new, |m| m.iter().map(|(n, (now, _))| (n.clone(), *now)).collect())
    }

    /// Waits while changes keep arriving (see `GATHER`), unless someone waits for the servers,
    /// a full batch is queued, or a previous daemon's batch is to be sent again.
    async fn gather(&self) {
        let start = tokio::time::Instant::now();
        let mut len = self.st().queue.len();
        while start.elapsed() < GATHER_MAX
            && len < BATCH_CHANGES
            && self.waiting.load(Ordering::Acquire) == 0
            && !self.st().resends()
        {
            tokio::select! {
                _ = tokio::time::sleep(GATHER) => {}
                _ = self.hurry.notified() => {}
            }
            let now = self.st().queue.len();
            if now == len {
                break;
            }
            len = now;
        }
    }

    /// Where the newest logged content `hash` of a change waiting for the servers is.
    fn content_of(&self, hash: &Hash) -> Option<Content> {
        let st = self.st();
        st.queue
            .iter()
            .rev()
            .find(|c| content_hash(&c.op) == Some(*hash) && c.content.is_some())
            .and_then(|c| c.content.clone())
    }

    /// The last change seq logged (0: none).
    fn last_seq(&self) -> u64 {
        self.st().next_seq - 1
    }

    pub fn status(&self) -> BacklogStatus {
        let st = self.st();
        BacklogStatus {
            changes: st.queue.len() as u64,
            log_bytes: self.log.used(),
            log_limit: self.log.limit(),
            batches_sent: st.sent_batches,
            changes_sent: st.sent_changes,
            conflicts: st.conflicts,
            last_conflict: st.last_conflict.clone(),
            refused: st.refused,
            last_refused: st.last_refused.clone(),
            blocked: st.blocked(),
            waiting_for_login: {
                let mut uids: Vec<u32> = st.held.keys().copied().collect();
                uids.sort_unstable();
                uids
            },
            ids_reserved: st.pool.keys().map(|v| (v.clone(), st.ids_left(v))).collect(),
            damaged: st.damaged.clone(),
        }
    }

    /// Logs one change and shows it in the overlay; with `durable`, returns once it is on disk.
    pub(super) async fn log_change(
        &self,
        volume: &str,
        uid: u32,
        op: Op,
        content: Option<Content>,
        durable: bool,
    ) -> Result<u64, FsError> {
        let (seq, pos) = {
            let mut st = self.st();
            let mut c = Change {
                seq: st.next_seq,
                volume: volume.to_string(),
                uid,
                op,
                content,
            };
            // A data file written for this change alone is taken back if it is not logged:
            // it would count against the log's bound until the next mount.
            let data = match &c.content {
                Some(Content::File(name)) => Some(name.clone()),
                _ => None,
            };
            let unlogged = |e: FsError| {
                if let Some(name) = &data {
                    self.log.release_data(std::slice::from_ref(name));
                }
                e
            };
            // Checked and appended under the state lock, so the log's order is the order of
            // the changes, and two racing changes of one name cannot both pass their checks.
            st.admits(&c.op).map_err(unlogged)?;
            if let Op::SetContent { expect, ino, .. } = &mut c.op {
                *expect = st.expect_of(*ino, *expect);
            }
            let (at, c) = self.log.append_change(c).map_err(|e| unlogged(log_err(e)))?;
            st.next_seq += 1;
            st.overlay(&c);
            st.queue.push_back(c);
            (st.next_seq - 1, at.end)
        };
        if durable {
            self.log.sync(pos).await.map_err(log_err)?;
        }
        self.work.notify_one();
        Ok(seq)
    }

    /// Waits until every change logged up to `seq` is settled, or `limit` passes. With `node`
    /// (`fsync`), changes held back for another user's token are not waited for, unless they
    /// touch that node: a change is sent only after the earlier changes it may depend on (see
    /// `BackState::next_batch`), so once the node's own changes are settled, so is everything
    /// they need.
    /// `held(st, uid)`: whether `uid`'s changes are held back now (no login since its token
    /// was refused: see `Core::held_back`).
    /// `since` (with `node`): failures (see [`BackState::failed`]) counted from here on that
    /// this waits for are reported instead of success. Without `node`, every failure of a
    /// change up to `seq` that no whole-log sync reported yet is.
    async fn settled_through(
        &self,
        seq: u64,
        node: Option<u64>,
        since: u64,
        limit: Duration,
        held: impl Fn(&BackState, u32) -> bool,
    ) -> Result<(), FsError> {
        /// Counts the caller among those the reintegrator must not make wait (see `gather`).
        struct Waiting<'a>(&'a std::sync::atomic::AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::AcqRel);
            }
        }
        self.waiting.fetch_add(1, Ordering::AcqRel);
        let _waiting = Waiting(&self.waiting);
        self.hurry.notify_one();
        let mut rx = self.settles.subscribe();
        // The changes this waits for: all of them up to `seq`, or those that change `node`
        // (the others held back for a login do not hold an `fsync` back).
        let waits_for = |st: &BackState, c: &Change| match node {
            None => true,
            Some(n) => !st.held_seqs.contains(&c.seq) || touched(&c.op).contains(&n),
        };
        // (The reintegrator never holds the state lock while it announces a settle, nor when
        // the set of held-back changes changes.)
        let settled_or_held = |_: &u64| {
            let st = self.st();
            let mut waiting = st
                .queue
                .iter()
                .take_while(|c| c.seq <= seq)
                .filter(|c| waits_for(&st, c));
            let settled = waiting.clone().next().is_none();
            // Held back until a login: every change waited for is, and no held user has
            // logged in since (the reintegrator's view of who is held lags a login by up to a
            // second).
            settled || waiting.all(|c| st.held_seqs.contains(&c.seq)) && st.held.keys().all(|uid| held(&st, *uid))
        };
        let r = tokio::time::timeout(limit, rx.wait_for(settled_or_held))
            .await
            .map(|r| r.map(drop));
        if let Ok(Ok(())) = r {
            // Held back, not settled: say so now rather than after the whole deadline (the
            // changes cannot go before that user's next `codafs login`).
            let st = self.st();
            let held = st.queue.iter().take_while(|c| c.seq <= seq).any(|c| waits_for(&st, c));
            if held {
                let why = st.held_reason().unwrap_or_else(|| "held back".into());
                return Err(FsError::Io(format!(
                    "logged changes wait for a login: {why}; they stay logged"
                )));
            }
        }
        match r {
            Ok(Ok(_)) => {
                let mut st = self.st();
                let failure = match node {
                    Some(n) => st.node_failure(since, seq, n),
                    // Each failure to one whole-log sync: the first that waited for its change.
                    None => st.log_failure(seq),
                };
                failure.map_or(Ok(()), Err)
            }
            Ok(Err(_)) => Err(FsError::Io("the write-back reintegrator stopped".into())),
            Err(_) => {
                // Why it waits may be a missing token rather than the servers: an I/O error
                // (EIO all the same) whose text says which, not "no server reachable".
                let why = self.st().blocked().unwrap_or_else(|| "still sending".into());
                Err(FsError::Io(format!(
                    "logged changes are not on the servers after {limit:?} ({why}); they stay logged"
                )))
            }
        }
    }
}

impl BackState {
    /// The highest seq up to which every change is settled.
    #[cfg(test)]
    fn watermark(&self) -> u64 {
        self.watermark_past(&HashSet::new())
    }

    /// The highest seq up to which every change will be settled once the changes `settling`
    /// are.
    fn watermark_past(&self, settling: &HashSet<u64>) -> u64 {
        self.queue
            .iter()
            .find(|c| !settling.contains(&c.seq))
            .map_or(self.next_seq.saturating_sub(1), |c| c.seq - 1)
    }

    /// Whether a batch sent before (by a previous daemon, or refused for its token) is to be
    /// sent again now: its user is not held back.
    fn resends(&self) -> bool {
        self.sent.iter().any(|s| !self.held.contains_key(&s.uid))
    }

    /// Why changes wait: the last failed send, and the users held back for a token.
    fn blocked(&self) -> Option<String> {
        match (self.failing.clone(), self.held_reason()) {
            (Some(f), Some(h)) => Some(format!("{f}; {h}")),
            (f, h) => f.or(h),
        }
    }

    /// What `status` and a timed-out `sync` say of held-back users.
    fn held_reason(&self) -> Option<String> {
        let mut held: Vec<(&u32, &Held)> = self.held.iter().collect();
        held.sort_by_key(|(uid, _)| **uid);
        let uids: Vec<String> = held.iter().map(|(uid, _)| uid.to_string()).collect();
        let (_, first) = held.first()?;
        Some(format!(
            "changes of uid {} wait for a token: run `codafs login` as that user ({}); other users' changes are sent meanwhile",
            uids.join(", "),
            first.why
        ))
    }

    /// The next batch to send. A batch sent before whose user is not held back goes first, with
    /// its request id (the servers may have applied it already). Otherwise: consecutive
    /// changes of one volume by one user, skipping the changes held back (see
    /// [`BackState::held_back_seqs`], passed in as `skip`).
    fn next_batch(&self, held: impl Fn(u32) -> bool, skip: &HashSet<u64>) -> Option<Batch> {
        for s in &self.sent {
            if held(s.uid) {
                continue;
            }
            let changes: Vec<Change> = self.queue.iter().filter(|c| in_runs(&s.runs, c.seq)).cloned().collect();
            let Some(first) = changes.first() else { continue };
            return Some(Batch {
                last: changes.last()?.seq,
                volume: first.volume.clone(),
                uid: first.uid,
                request: Some(s.request),
                changes,
            });
        }
        let mut changes: Vec<Change> = Vec::new();
        let mut bytes = 0u64;
        for c in &self.queue {
            if skip.contains(&c.seq) {
                continue;
            }
            if let Some(head) = changes.first() {
                if c.volume != head.volume || c.uid != head.uid || changes.len() >= BATCH_CHANGES || bytes > BATCH_BYTES
                {
                    break;
                }
            }
            bytes += content_size(&c.op);
            changes.push(c.clone());
        }
        let first = changes.first()?;
        Some(Batch {
            last: changes.last()?.seq,
            volume: first.volume.clone(),
            uid: first.uid,
            request: None,
            changes,
        })
    }

    /// The queued changes held back: those of users `held` back (their batches sent before
    /// included), and every change that uses a key one of those defines (see [`keys`]). `held`
    /// answers true only for users in `self.held`.
    fn held_back_seqs(&self, held: impl Fn(u32) -> bool) -> HashSet<u64> {
        let mut seqs = HashSet::new();
        if self.held.is_empty() {
            return seqs;
        }
        let mut skipped: HashSet<Key> = HashSet::new();
        for c in &self.queue {
            let dependent = !skipped.is_empty() && keys(&c.op).0.iter().any(|k| skipped.contains(k));
            if held(c.uid) || dependent {
                skipped.extend(keys(&c.op).1);
                seqs.insert(c.seq);
            }
        }
        seqs
    }

    /// The version a new content of `ino` expects, given the one the file had when opened
    /// (`opened`): none while the file's creation is unsent (the creation carries the content),
    /// else the newer of `opened` and this mount's own last commit of it. Taken under the state
    /// lock in the same step as the append: a batch settled just before is seen here, and one
    /// settled just after finds the change queued and records the version in its `Own` record,
    /// so a replay after a crash expects the right version either way.
    fn expect_of(&self, ino: u64, opened: Option<u64>) -> Option<u64> {
        if self.unsent_creations.contains_key(&ino) {
            return None;
        }
        let opened = opened?;
        Some(super::batch::expects(&self.own_versions, ino, opened))
    }

    /// Refuses a change whose check (made before the state lock was taken) another change
    /// logged meanwhile made wrong: a name taken, or a name that no longer leads to the node.
    fn admits(&self, op: &Op) -> Result<(), FsError> {
        let now = |dir: &u64, name: &str| self.names.get(dir).and_then(|m| m.get(name)).map(|(n, _)| *n);
        match op {
            Op::Create { parent, name, .. } | Op::Link { parent, name, .. } => match now(parent, name) {
                Some(Some(_)) => Err(FsError::Exists),
                _ => Ok(()),
            },
            Op::Remove {
                parent,
                name,
                seen: Some(s),
                ..
            }
            | Op::Rename {
                from_parent: parent,
                from_name: name,
                seen: Some(s),
                ..
            } => match now(parent, name) {
                Some(None) => Err(FsError::NotFound),
                Some(Some((ino, _))) if ino != s.ino => Err(FsError::Stale),
                _ => self.admits_target(op),
            },
            _ => Ok(()),
        }
    }

    /// A rename's target as checked must still be what this mount shows: a racing change
    /// logged meanwhile (another save renamed over the same name) makes the check stale, and
    /// the rename is checked again (`Stale`). Sent as logged, the later rename would expect the
    /// name free and be kept as a conflict copy of this mount's own change.
    fn admits_target(&self, op: &Op) -> Result<(), FsError> {
        let Op::Rename {
            to_parent,
            to_name,
            replaces,
            ..
        } = op
        else {
            return Ok(());
        };
        let Some(now) = self.names.get(to_parent).and_then(|m| m.get(to_name)).map(|(n, _)| *n) else {
            return Ok(());
        };
        if now.map(|(ino, _)| ino) == replaces.map(|r| r.ino) {
            Ok(())
        } else {
            Err(FsError::Stale)
        }
    }

    /// Shows a change in the overlay.
    fn overlay(&mut self, c: &Change) {
        let seq = c.seq;
        match &c.op {
            Op::Create {
                ino: Some(ino),
                parent,
                name,
                kind,
                mode,
                hash,
                symlink_target,
                rdev,
                uid,
                gid,
                size,
                mtime_ns,
            } => {
                let a = Attr {
                    ino: *ino,
                    generation: 0,
                    kind: *kind,
                    size: if *kind == NodeKind::Symlink {
                        symlink_target.len() as u64
                    } else {
                        *size
                    },
                    mode: *mode,
                    uid: *uid,
                    gid: *gid,
                    mtime_ns: *mtime_ns,
                    ctime_ns: *mtime_ns,
                    atime_ns: *mtime_ns,
                    nlink: if *kind == NodeKind::Dir { 2 } else { 1 },
                    hash: *hash,
                    symlink_target: symlink_target.clone(),
                    version: 0,
                    parent: *parent,
                    read_ticket: Default::default(),
                    rdev: *rdev,
                };
                self.name(*parent, name, Some((*ino, *kind)), seq);
                self.nodes.insert(*ino, (Pending::Created(a), seq));
                self.unsent_creations.insert(*ino, seq);
                // The directory changed too: new times, and a link more for a subdirectory.
                self.dir_changed(*parent, seq, *mtime_ns, i32::from(*kind == NodeKind::Dir));
            }
            Op::Remove {
                parent,
                name,
                seen: Some(s),
                ..
            } => {
                let now = codafs_common::now_ns();
                self.name(*parent, name, None, seq);
                self.links(s.ino, seq, now, -1);
                self.dir_changed(*parent, seq, now, -i32::from(s.kind == NodeKind::Dir));
            }
            Op::Rename {
                from_parent,
                from_name,
                to_parent,
                to_name,
                seen: Some(s),
                replaces,
            } => {
                let now = codafs_common::now_ns();
                self.name(*from_parent, from_name, None, seq);
                self.name(*to_parent, to_name, Some((s.ino, s.kind)), seq);
                let to = *to_parent;
                self.patch(
                    s.ino,
                    seq,
                    |a| (a.parent, a.ctime_ns) = (to, now),
                    |p| (p.parent, p.ctime_ns) = (Some(to), now),
                );
                if let Some(t) = replaces {
                    self.links(t.ino, seq, now, -1);
                }
                let moved_dir = i32::from(s.kind == NodeKind::Dir && from_parent != to_parent);
                let replaced_dir = i32::from(replaces.is_some_and(|t| t.kind == NodeKind::Dir));
                self.dir_changed(*from_parent, seq, now, -moved_dir);
                self.dir_changed(*to_parent, seq, now, moved_dir - replaced_dir);
            }
            Op::Link {
                ino,
                parent,
                name,
                kind,
            } => {
                let now = codafs_common::now_ns();
                self.name(*parent, name, Some((*ino, *kind)), seq);
                self.links(*ino, seq, now, 1);
                self.dir_changed(*parent, seq, now, 0);
            }
            Op::SetContent {
                ino,
                hash,
                size,
                mtime_ns,
                expect,
            } => self.patch(
                *ino,
                seq,
                |a| (a.hash, a.size, a.mtime_ns, a.ctime_ns) = (Some(*hash), *size, *mtime_ns, *mtime_ns),
                |p| {
                    p.content = Some((*hash, *size, *mtime_ns));
                    p.base_version = p.base_version.or(*expect);
                    p.ctime_ns = *mtime_ns;
                },
            ),
            Op::SetAttr {
                ino,
                mode,
                uid,
                gid,
                mtime_ns,
                atime_ns,
            } => {
                let now = codafs_common::now_ns();
                let set = |a: &mut Attr| {
                    a.mode = mode.unwrap_or(a.mode);
                    a.uid = uid.unwrap_or(a.uid);
                    a.gid = gid.unwrap_or(a.gid);
                    a.mtime_ns = mtime_ns.unwrap_or(a.mtime_ns);
                    a.atime_ns = atime_ns.unwrap_or(a.atime_ns);
                    a.ctime_ns = now;
                };
                self.patch(*ino, seq, set, |p| {
                    p.mode = mode.or(p.mode);
                    p.uid = uid.or(p.uid);
                    p.gid = gid.or(p.gid);
                    p.mtime_ns = mtime_ns.or(p.mtime_ns);
                    p.atime_ns = atime_ns.or(p.atime_ns);
                    p.ctime_ns = now;
                });
            }
            _ => {}
        }
    }

    fn name(&mut self, dir: u64, name: &str, now: NameNow, seq: u64) {
        self.names.entry(dir).or_default().insert(name.to_string(), (now, seq));
    }

    /// A directory's entries changed at `t`: new times, and `links` more (subdirectories).
    fn dir_changed(&mut self, dir: u64, seq: u64, t: i64, links: i32) {
        self.patch(
            dir,
            seq,
            |a| {
                (a.mtime_ns, a.ctime_ns) = (t, t);
                a.nlink = add_links(a.nlink, links);
            },
            |p| {
                (p.mtime_ns, p.ctime_ns) = (Some(t), t);
                p.nlink_delta += links;
            },
        );
    }

    /// A node gained or lost names at `t`.
    fn links(&mut self, ino: u64, seq: u64, t: i64, links: i32) {
        self.patch(
            ino,
            seq,
            |a| {
                a.ctime_ns = t;
                a.nlink = add_links(a.nlink, links);
            },
            |p| {
                p.ctime_ns = t;
                p.nlink_delta += links;
            },
        );
    }

    fn patch(&mut self, ino: u64, seq: u64, created: impl FnOnce(&mut Attr), changed: impl FnOnce(&mut AttrPatch)) {
        let e = self
            .nodes
            .entry(ino)
            .or_insert_with(|| (Pending::Changed(AttrPatch::default()), seq));
        e.1 = seq;
        match &mut e.0 {
            Pending::Created(a) => created(a),
            Pending::Changed(p) => changed(p),
        }
    }

    /// Drops the overlay of the changes `settled` says are (later changes of the same names
    /// stay). An entry carries the seq of the last change of its node or name, and a node's
    /// changes settle in order, so that change settled means all of them did.
    fn settle_overlay(&mut self, settled: impl Fn(u64) -> bool) {
        self.nodes.retain(|_, (_, seq)| !settled(*seq));
        let nodes = &self.nodes;
        self.places.retain(|ino, _| nodes.contains_key(ino));
        self.unsent_creations.retain(|_, seq| !settled(*seq));
        for m in self.names.values_mut() {
            m.retain(|_, (_, seq)| !settled(*seq));
        }
        self.names.retain(|_, m| !m.is_empty());
    }

    /// Keeps `own_versions` bounded: past [`OWN_VERSIONS_KEPT`] entries, only nodes that a queued
    /// change or an open file (`open`) may still send content for keep theirs. Any other node's
    /// next content change starts from attributes read after our commit, which carry its version.
    fn bound_own_versions(&mut self, open: &HashSet<u64>) {
        if self.own_versions.len() <= OWN_VERSIONS_KEPT {
            return;
        }
        let queued: HashSet<u64> = self.queue.iter().flat_map(|c| touched(&c.op)).collect();
        self.own_versions
            .retain(|ino, _| queued.contains(ino) || open.contains(ino));
    }

    /// The `Own` record of a batch just committed: the versions it gave nodes that changes
    /// logged after it still touch (their seq is past the batch's), with the last such seq.
    /// Changes logged from now on carry these versions themselves (see `store_logged`), so only
    /// those already logged need the record.
    fn own_record(&self, batch: &Batch) -> Option<Record> {
        let mut until = 0;
        let mut versions: Vec<(u64, u64)> = Vec::new();
        for ino in batch.changes.iter().flat_map(|c| touched(&c.op)) {
            let later = self.nodes.get(&ino).map(|(_, seq)| *seq).filter(|s| *s > batch.last);
            if let (Some(seq), Some(v)) = (later, self.own_versions.get(&ino)) {
                until = until.max(seq);
                versions.push((ino, *v));
            }
        }
        versions.sort_unstable();
        versions.dedup();
        (!versions.is_empty()).then_some(Record::Own { until, versions })
    }

    /// Takes node id `ino`, which a logged create used, out of the reserved pool (replay).
    fn take_id_used(&mut self, volume: &str, ino: u64) {
        if let Some(ranges) = self.pool.get_mut(volume) {
            for r in ranges.iter_mut() {
                if (r.0..r.1).contains(&ino) {
                    r.0 = r.0.max(ino + 1);
                }
            }
            ranges.retain(|r| r.0 < r.1);
        }
    }

    /// A node id for a new node of `volume` made by `uid`, if any is reserved; notes the pool
    /// for a top-up when it runs low.
    fn take_id(&mut self, volume: &str, uid: u32) -> Option<u64> {
        let ranges = self.pool.get_mut(volume)?;
        let r = ranges.front_mut()?;
        let ino = r.0;
        r.0 += 1;
        if r.0 >= r.1 {
            ranges.pop_front();
        }
        if self.ids_left(volume) < RESERVE_LOW {
            self.low_pools.insert(volume.to_string(), uid);
        }
        Some(ino)
    }

    /// The pool of reserved node ids as a log record, to outlive the segments whose `Reserved`
    /// records filled it (see [`Log::release_keeping`]). Ids taken before it, whatever record
    /// logs their use, are not in it; a range reserved while it is written may be left out,
    /// which only loses those ids. No id is ever in it twice.
    fn pool_record(&self) -> Record {
        let mut pools: Vec<(String, Vec<(u64, u64)>)> = self
            .pool
            .iter()
            .map(|(v, r)| (v.clone(), r.iter().copied().collect()))
            .collect();
        pools.sort();
        Record::Pool { pools }
    }

    /// Node ids still reserved for `volume`.
    fn ids_left(&self, volume: &str) -> u64 {
        self.pool.get(volume).map_or(0, |rs| rs.iter().map(|r| r.1 - r.0).sum())
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
        .replace('/', "_")
}

/// The sibling name a conflicting change is kept under.
fn conflict_name(name: &str, host: &str) -> String {
    let t = codafs_common::now_ns() / 1_000_000;
    let suffix = format!(".conflict-{host}-{t}");
    let max = codafs_common::names::MAX_NAME_BYTES - suffix.len();
    let mut base = name.to_string();
    while base.len() > max {
        base.pop();
    }
    format!("{base}{suffix}")
}

/// One batch ready to send.
struct Batch {
    last: u64,
    volume: String,
    uid: u32,
    /// The request id it was sent with before, if it was.
    request: Option<RequestId>,
    changes: Vec<Change>,
}

/// Whether `op` sets a file's content that a change queued after `batch` sets again: in one
/// batch such a content is never sent (see `Builder::content`); across batches the earlier
/// one may have been sent already, and only its conflict is left out.
fn replaced_later(b: &WriteBack, batch: &Batch, op: &Op) -> bool {
    let Op::SetContent { ino, .. } = op else {
        return false;
    };
    b.st().queue.iter().any(|l| {
        l.seq > batch.last && l.volume == batch.volume && matches!(&l.op, Op::SetContent { ino: j, .. } if j == ino)
    })
}

/// Node ids an operation touches (their cached attributes are stale after it).
fn touched(op: &Op) -> Vec<u64> {
    match op {
        Op::Create { ino, parent, .. } => ino.iter().copied().chain([*parent]).collect(),
        Op::SetContent { ino, .. } | Op::SetAttr { ino, .. } => vec![*ino],
        Op::Remove { parent, seen, .. } => [*parent].into_iter().chain(seen.map(|s| s.ino)).collect(),
        Op::Rename {
            from_parent,
            to_parent,
            seen,
            replaces,
            ..
        } => [*from_parent, *to_parent]
            .into_iter()
            .chain(seen.map(|s| s.ino))
            .chain(replaces.map(|s| s.ino))
            .collect(),
        Op::Link { ino, parent, .. } => vec![*ino, *parent],
        Op::Reserve { .. } | Op::Expect { .. } | Op::ExpectNode { .. } => vec![],
    }
}

/// What a change's order depends on: a node, a name in a directory, or the set of names in a
/// directory (whether it is empty).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Node(u64),
    Name(u64, String),
    Entries(u64),
}

/// The keys a change needs as the changes before it left them (`uses`), and those it changes
/// (`defines`). A change held back makes every later change that uses a key it defines wait
/// too: a file made in a directory it made, a later content of a file it wrote, a name it
/// freed, the removal of a directory it put a name in. Changes that only share a directory
/// (two new names in one) do not wait for each other.
fn keys(op: &Op) -> (Vec<Key>, Vec<Key>) {
    use Key::*;
    let name = |d: &u64, n: &str| Name(*d, n.to_string());
    match op {
        Op::Create {
            ino, parent, name: n, ..
        } => (
            vec![Node(*parent), name(parent, n)],
            ino.iter()
                .map(|i| Node(*i))
                .chain([name(parent, n), Entries(*parent)])
                .collect(),
        ),
        Op::Link {
            ino, parent, name: n, ..
        } => (
            vec![Node(*ino), Node(*parent), name(parent, n)],
            vec![Node(*ino), name(parent, n), Entries(*parent)],
        ),
        Op::Remove {
            parent, name: n, seen, ..
        } => {
            let seen = seen.iter().flat_map(|s| [Node(s.ino), Entries(s.ino)]);
            (
                [Node(*parent), name(parent, n)]
                    .into_iter()
                    .chain(seen.clone())
                    .collect(),
                [name(parent, n), Entries(*parent)].into_iter().chain(seen).collect(),
            )
        }
        Op::Rename {
            from_parent,
            from_name,
            to_parent,
            to_name,
            seen,
            replaces,
            ..
        } => {
            let nodes = seen
                .iter()
                .map(|s| Node(s.ino))
                .chain(replaces.iter().flat_map(|s| [Node(s.ino), Entries(s.ino)]));
            let names = [name(from_parent, from_name), name(to_parent, to_name)];
            (
                names
                    .iter()
                    .cloned()
                    .chain([Node(*from_parent), Node(*to_parent)])
                    .chain(nodes.clone())
                    .collect(),
                names
                    .into_iter()
                    .chain([Entries(*from_parent), Entries(*to_parent)])
                    .chain(nodes)
                    .collect(),
            )
        }
        Op::SetContent { ino, .. } | Op::SetAttr { ino, .. } => (vec![Node(*ino)], vec![Node(*ino)]),
        Op::Reserve { .. } | Op::Expect { .. } | Op::ExpectNode { .. } => (vec![], vec![]),
    }
}

/// Whether a refusal means the change cannot apply as logged (someone else's change is in the
/// way), as opposed to a reason to wait and send it again.
fn is_conflict(e: &FsError) -> bool {
    matches!(
        e,
        FsError::Conflict(_)
            | FsError::Exists
            | FsError::NotFound
            | FsError::NotDir
            | FsError::IsDir
            | FsError::NotEmpty
            | FsError::Invalid(_)
            | FsError::NameTooLong
    )
}

/// Whether the servers refused a change itself, so that sending it again soon would change
/// nothing: no right on the volume, over its quota, too large. Such changes are set aside one
/// by one (their bytes kept in `wblog/lost+found`) rather than holding up everything logged
/// after them. (A missing or expired token is not one: it waits for `codafs login`.)
fn is_refusal(e: &FsError) -> bool {
    matches!(
        e,
        FsError::Denied(_)
            | FsError::NotPermitted(_)
            | FsError::Quota(_)
            | FsError::TooLarge(_)
            | FsError::ReadOnly
            | FsError::CrossVolume
    )
}

/// A request id derived from a batch's, for its changes sent one by one (replays repeat them).
fn sub_request(request: &RequestId, i: usize) -> RequestId {
    let mut h = blake3::Hasher::new();
    h.update(request);
    h.update(&(i as u64).to_le_bytes());
    let mut id = [0u8; 16];
    id.copy_from_slice(&h.finalize().as_bytes()[..16]);
    id
}

impl<R: Remote> Core<R> {
    /// The write-back log, if this mount has one.
    pub fn write_back(&self) -> Option<&WriteBack> {
        self.writes.back.as_ref()
    }

    /// The write-back log, for the paths only a write-back mount takes.
    pub(super) fn logging(&self) -> Result<&WriteBack, FsError> {
        self.write_back()
            .ok_or_else(|| FsError::Io("internal: not a write-back mount".into()))
    }

    /// Refuses a file growing to `size` bytes that the write-back log could never take (see
    /// `LogError::TooLarge`): the write that crosses the bound fails, not the close after it.
    pub(super) fn check_loggable(&self, size: u64) -> Result<(), FsError> {
        match self.write_back() {
            Some(b) if size > b.log.limit() => {
                let e = LogError::TooLarge {
                    size,
                    limit: b.log.limit(),
                };
                // The writer sees only EFBIG: the log says why.
                tracing::warn!("refused a write (EFBIG): {e}");
                Err(log_err(e))
            }
            _ => Ok(()),
        }
    }

    /// Whether this mount logs its changes (write-back) rather than sending each at once.
    pub(crate) fn writes_back(&self) -> bool {
        self.writes.back.is_some()
    }

    /// Whether a change waiting for the servers holds content `hash`.
    pub(crate) fn logged(&self, hash: &Hash) -> bool {
        self.write_back().is_some_and(|b| b.content_of(hash).is_some())
    }

    /// Puts logged content `hash` into the blob cache, if a change waiting for the servers has
    /// it (a read of a file written here and not sent yet). Returns whether it did.
    pub(crate) fn cache_from_log(&self, hash: &Hash) -> Result<bool, FsError> {
        let Some(b) = self.write_back() else { return Ok(false) };
        let Some(content) = b.content_of(hash) else {
            return Ok(false);
        };
        if let Some(path) = b.log.data_path(&content) {
            self.cache_file(*hash, &path)?;
            return Ok(true);
        }
        let bytes = b.log.read_content(&content).map_err(log_err)?;
        self.cache_copy(*hash, &bytes)?;
        Ok(true)
    }

    /// Copies file `path` into the blob cache as `hash` (verified there, chunked or not).
    fn cache_file(&self, hash: Hash, path: &std::path::Path) -> Result<(), FsError> {
        let mut f = std::fs::File::open(path)?;
        let len = f.metadata()?.len();
        let mut w = self
            .blobs
            .writer(hash, len)
            .map_err(|e| FsError::NoSpace(format!("caching written content: {e}")))?;
        blocking(len, || -> Result<(), FsError> {
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = std::io::Read::read(&mut f, &mut buf)?;
                if n == 0 {
                    return Ok(());
                }
                w.write(&buf[..n])?;
            }
        })?;
        w.finish().map(drop).map_err(|e| FsError::Io(e.to_string()))
    }

    /// Copies sent contents into the blob cache: small ones in packs of a listing's size
    /// (checked against their hashes first, as a copy through a cache writer would be), the
    /// rest a file each. Best effort: it stops at the first the cache refuses (full).
    fn cache_contents(&self, contents: Vec<(Hash, Vec<u8>)>) {
        let (small, large): (Vec<_>, Vec<_>) = contents
            .into_iter()
            .filter(|(h, d)| d.len() as u64 > PACK_FILE_MAX || Hash::of(d) == *h)
            .partition(|(_, d)| d.len() as u64 <= PACK_FILE_MAX);
        let mut pack: Vec<(Hash, &[u8])> = Vec::new();
        let mut bytes = 0u64;
        for (i, (h, d)) in small.iter().enumerate() {
            pack.push((*h, d));
            bytes += d.len() as u64;
            let last = i + 1 == small.len();
            if last || bytes >= PACK_BYTES || pack.len() >= crate::cache::pack::MAX_FILES {
                if let Err(e) = self.blobs.put_pack(&pack) {
                    tracing::debug!(error = %e, "sent contents not kept in the cache");
                    return;
                }
                pack.clear();
                bytes = 0;
            }
        }
        for (h, d) in large {
            if self.cache_copy(h, &d).is_err() {
                return;
            }
        }
    }

    /// Writes `bytes` into the blob cache as `hash`.
    fn cache_copy(&self, hash: Hash, bytes: &[u8]) -> Result<(), FsError> {
        let mut w = self
            .blobs
            .writer(hash, bytes.len() as u64)
            .map_err(|e| FsError::NoSpace(format!("caching written content: {e}")))?;
        w.write(bytes)?;
        w.finish().map(drop).map_err(|e| FsError::Io(e.to_string()))
    }

    /// A node id for a new node of `volume` made by `uid`: from the reserved pool, reserving
    /// more first if it is empty (that needs the servers; the reintegrator keeps the pool
    /// topped up, so only a mount's first create in a volume, or one past the reserve while the
    /// servers are unreachable, gets here).
    async fn new_ino(&self, ctx: &WriteCtx, uid: u32) -> Result<u64, FsError> {
        let b = self.logging()?;
        if let Some(i) = b.st().take_id(&ctx.volume, uid) {
            return Ok(i);
        }
        // Twice a batch: the pool starts above its low mark, so no top-up follows at once.
        if let Err(e) = self.reserve_ids(b, &ctx.token, &ctx.volume, 2 * RESERVE_BATCH).await {
            tracing::warn!(volume = %ctx.volume, error = %e, "no node ids left for new files here, and reserving more failed: creating fails until the servers answer");
            return Err(e);
        }
        b.st()
            .take_id(&ctx.volume, uid)
            .ok_or_else(|| FsError::Io("reserved node ids vanished".into()))
    }

    /// Asks the servers for `count` node ids of `volume` and adds them to the pool, durably
    /// logged (a replay must not hand them out again, nor lose them).
    async fn reserve_ids(&self, b: &WriteBack, token: &str, volume: &str, count: u32) -> Result<(), FsError> {
        let reserve = Op::Reserve { count };
        let r = self.commit_ops(token, volume, vec![reserve], new_request_id()).await?;
        let first = r
            .created
            .first()
            .copied()
            .filter(|i| *i != 0)
            .ok_or_else(|| FsError::Io("the servers reserved no node ids".into()))?;
        // Our own commit: its event is known as ours.
        self.own_commit(r.version);
        let rec = Record::Reserved {
            volume: volume.to_string(),
            first,
            count,
        };
        let at = b.log.append(&rec).map_err(log_err)?;
        b.log.sync(at.end).await.map_err(log_err)?;
        let mut st = b.st();
        st.pool
            .entry(volume.to_string())
            .or_default()
            .push_back((first, first + u64::from(count)));
        if st.ids_left(volume) >= RESERVE_LOW {
            st.low_pools.remove(volume);
        }
        Ok(())
    }

    /// Reserves node ids, with `uid`'s token, in the volumes (at most [`RESERVE_AHEAD_VOLUMES`])
    /// whose pool is empty: a write-back mount then creates files while no server answers from
    /// its first create on. Without a pool, a create asked the servers for ids, and with none
    /// answering it failed with EIO. Best effort, when a login's token is set: a volume the
    /// user may not write refuses it (before any commit), and a failure is only logged.
    pub async fn reserve_ahead(&self, uid: u32) {
        let Some(b) = self.write_back() else { return };
        let Some((token, _)) = self.writes.tokens.get(uid) else {
            return;
        };
        for v in self.volumes().into_iter().take(RESERVE_AHEAD_VOLUMES) {
            if b.st().ids_left(&v.name) > 0 {
                continue;
            }
            match self.reserve_ids(b, &token, &v.name, 2 * RESERVE_BATCH).await {
                Ok(()) => tracing::debug!(volume = %v.name, uid, "node ids reserved ahead"),
                Err(e) => tracing::debug!(volume = %v.name, uid, error = %e, "no node ids reserved ahead"),
            }
        }
    }

    /// Reserves more node ids for the volumes whose pool ran low, with the token of the user
    /// who last took one there. Called after a successful send, when the servers answer; a
    /// failure is only logged, and the next create there asks again.
    async fn top_up_ids(&self, b: &WriteBack, sender: u32) {
        let low = std::mem::take(&mut b.st().low_pools);
        for (volume, uid) in low {
            // That user's token, or else the one the batch just went with.
            let Some((token, _)) = self.writes.tokens.get(uid).or_else(|| self.writes.tokens.get(sender)) else {
                continue;
            };
            if let Err(e) = self.reserve_ids(b, &token, &volume, RESERVE_BATCH).await {
                tracing::info!(%volume, uid, error = %e, "reserving node ids ahead failed; the next create here asks again");
            }
        }
    }

    /// A create, logged: the new node exists here at once and on the servers after its batch.
    #[allow(clippy::too_many_arguments)] // create_node's arguments, passed on
    pub(super) async fn create_logged(
        &self,
        c: Caller,
        ctx: &WriteCtx,
        parent: u64,
        name: &str,
        (kind, rdev): (NodeKind, u64),
        mode: u32,
        target: &str,
    ) -> Result<NodeAttr, FsError> {
        let b = self.logging()?;
        match self.lookup(parent, name).await {
            Ok(_) => return Err(FsError::Exists),
            Err(FsError::NotFound) => {}
            Err(e) => return Err(e),
        }
        let ino = self.new_ino(ctx, c.uid).await?;
        let empty = Hash::of(b"");
        let op = Op::Create {
            ino: Some(ino),
            parent,
            name: name.to_string(),
            kind,
            mode: mode & 0o7777,
            hash: (kind == NodeKind::File).then_some(empty),
            symlink_target: target.to_string(),
            rdev,
            uid: c.uid,
            gid: c.gid,
            size: 0,
            mtime_ns: codafs_common::now_ns(),
        };
        let content = (kind == NodeKind::File).then(|| Content::Inline(Vec::new()));
        b.log_change(&ctx.volume, c.uid, op, content, false).await?;
        self.told_name(parent, name, ino);
        self.getattr(ino).await
    }

    /// `close` of a changed file, logged: returns once the content is in the log on disk.
    pub(super) async fn store_logged(
        &self,
        ctx: &WriteCtx,
        uid: u32,
        ino: u64,
        data: Payload,
        mtime_ns: i64,
        base_version: u64,
    ) -> Result<(), FsError> {
        let b = self.logging()?;
        let size = data.len();
        let (hash, content) = match data {
            Payload::Memory(data) => {
                let hash = blocking(size, || Hash::of(&data));
                if data.len() <= INLINE_MAX {
                    (hash, Content::Inline(data))
                } else {
                    let name = data_file_name(&hash, ino);
                    blocking(size, || b.log.write_data(&name, &data)).map_err(log_err)?;
                    (hash, Content::File(name))
                }
            }
            Payload::File { file, size } => {
                // One pass: the shadow is cut into chunks as it is copied into the log, so the
                // copy is named by its own bytes (a file changing meanwhile cannot mismatch).
                let tmp = format!("incoming-{ino:016x}-{}", codafs_common::now_ns());
                let mut cut = None;
                blocking(size, || {
                    b.log.write_data_with(&tmp, size, |out| {
                        let reader = std::io::BufReader::with_capacity(1 << 20, read_at(&file, size));
                        let m = chunk_reader(reader, |_, _, bytes| std::io::Write::write_all(out, bytes))?;
                        cut = Some(m);
                        Ok(())
                    })
                })
                .map_err(log_err)?;
                let Some(m) = cut.filter(|m| m.size() == size) else {
                    b.log.release_data(std::slice::from_ref(&tmp));
                    return Err(FsError::Changed(format!("{size} bytes expected in the log copy")));
                };
                let hash = m.hash();
                let name = data_file_name(&hash, ino);
                if let Err(e) = b.log.rename_data(&tmp, &name) {
                    b.log.release_data(std::slice::from_ref(&tmp));
                    return Err(log_err(e));
                }
                self.manifests
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .put(hash, std::sync::Arc::new(m));
                (hash, Content::File(name))
            }
        };
        // `log_change` folds in this mount's own later commit of the file (see
        // `BackState::expect_of`).
        let op = Op::SetContent {
            expect: Some(base_version),
            ino,
            hash,
            size,
            mtime_ns: if mtime_ns == 0 {
                codafs_common::now_ns()
            } else {
                mtime_ns
            },
        };
        b.log_change(&ctx.volume, uid, op, Some(content), true).await?;
        self.writes.stats.stored_bytes.fetch_add(size, Ordering::Relaxed);
        Ok(())
    }

    /// chmod, chown and utimens, logged.
    pub(super) async fn set_attr_logged(&self, ctx: &WriteCtx, uid: u32, op: Op) -> Result<(), FsError> {
        let b = self.logging()?;
        b.log_change(&ctx.volume, uid, op, None, false).await?;
        Ok(())
    }

    /// `codafs sync`, `syncfs`: waits until everything logged before the call is on the
    /// servers, at most `limit`. A logged change that the servers refused, or that conflicted,
    /// and that no earlier sync reported, fails it (the change was set aside or kept under
    /// another name: see `codafs status`).
    pub async fn sync_log(&self, limit: Duration) -> Result<(), FsError> {
        let Some(b) = self.write_back() else { return Ok(()) };
        b.settled_through(b.last_seq(), None, 0, limit, |st, uid| self.held_back(st, uid))
            .await
    }

    /// Failures counted so far: an `fsync` reports those of its node counted from here on.
    pub(crate) fn failures_seen(&self) -> u64 {
        self.write_back().map_or(0, |b| b.st().failed_total)
    }

    /// `fsync` of a file or directory: waits until every change logged before the call is on
    /// the servers, at most `limit`, except changes held back for a user's token that do not
    /// touch node `ino` (another user's expired token does not fail this user's `fsync`). A
    /// change of `ino` refused or in conflict, counted after `since` ([`Core::failures_seen`]
    /// when the `fsync` began), fails it.
    pub async fn sync_node(&self, ino: u64, since: u64, limit: Duration) -> Result<(), FsError> {
        let Some(b) = self.write_back() else { return Ok(()) };
        b.settled_through(b.last_seq(), Some(ino), since, limit, |st, uid| self.held_back(st, uid))
            .await
    }

    /// The write-back part of `codafs status`.
    pub(crate) fn backlog(&self) -> Option<BacklogStatus> {
        self.write_back().map(WriteBack::status)
    }

    /// Sends logged changes until `stop`: the reintegrator.
    pub async fn reintegrate(&self, mut stop: watch::Receiver<bool>) {
        let Some(b) = self.write_back() else { return };
        let mut pause = Duration::from_millis(100);
        loop {
            if *stop.borrow() {
                return;
            }
            if b.st().queue.is_empty() {
                tokio::select! {
                    _ = b.work.notified() => {}
                    _ = stop.changed() => return,
                }
            }
            b.gather().await;
            let (batch, newly_held) = {
                let mut st = b.st();
                let held = st.held_back_seqs(|uid| self.held_back(&st, uid));
                let batch = st.next_batch(|uid| self.held_back(&st, uid), &held);
                let changed = st.held_seqs != held;
                st.held_seqs = held;
                (batch, changed)
            };
            if newly_held {
                // `fsync` callers look again: what they wait for may now be held back.
                b.settles.send_modify(|n| *n += 1);
            }
            let Some(batch) = batch else {
                // Everything queued waits for a login, which needs no notice: look again soon.
                tokio::select! {
                    _ = b.work.notified() => {}
                    _ = tokio::time::sleep(HELD_RECHECK) => {}
                    _ = stop.changed() => return,
                }
                continue;
            };
            // The token this batch goes with: a login during the send brings a new one, which
            // a refusal of this one must not hold back.
            let token = self.writes.tokens.get(batch.uid).map(|(t, _)| t);
            match self.send_batch(b, &batch).await {
                Ok(()) => {
                    pause = Duration::from_millis(100);
                    {
                        let mut st = b.st();
                        st.failing = None;
                        st.held.remove(&batch.uid);
                    }
                    self.top_up_ids(b, batch.uid).await;
                }
                Err(FsError::Unauthenticated(why)) => {
                    // Only this user's changes (and those that need them) wait; the rest go on.
                    tracing::warn!(uid = batch.uid, reason = %why, changes = batch.changes.len(), "write-back: changes wait for that user's next login");
                    let mut st = b.st();
                    st.failing = None;
                    st.held.insert(
                        batch.uid,
                        Held {
                            token,
                            since: tokio::time::Instant::now(),
                            why,
                        },
                    );
                }
                Err(e) => {
                    tracing::info!(error = %e, changes = batch.changes.len(), "write-back batch not sent; trying again");
                    b.st().failing = Some(e.to_string());
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = stop.changed() => return,
                    }
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Whether `uid`'s changes are held back: its token was refused (or missing), no new one
    /// has come since, and the refusal is recent (see [`HELD_RETRY`]).
    fn held_back(&self, st: &BackState, uid: u32) -> bool {
        let Some(h) = st.held.get(&uid) else { return false };
        h.since.elapsed() < HELD_RETRY && self.writes.tokens.get(uid).map(|(t, _)| t) == h.token
    }

    /// Sends one batch: contents, then one commit; a conflict sends its changes one by one.
    /// `Err` means try again later (nothing settled).
    async fn send_batch(&self, b: &WriteBack, batch: &Batch) -> Result<(), FsError> {
        let (token, _) = self.writes.tokens.get(batch.uid).ok_or_else(|| {
            FsError::Unauthenticated(format!(
                "changes of uid {} wait for a token: that user must run `codafs login` again",
                batch.uid
            ))
        })?;
        let request = match batch.request {
            Some(request) => request,
            None => {
                let request = new_request_id();
                let runs = runs_of(batch.changes.iter().map(|c| c.seq));
                // The format older versions read, unless the batch skips held-back changes.
                let rec = match runs.as_slice() {
                    [(first, last)] => Record::Sending {
                        first: *first,
                        last: *last,
                        request,
                    },
                    _ => Record::SendingRuns {
                        runs: runs.clone(),
                        request,
                    },
                };
                let pos = b.log.append(&rec).map_err(log_err)?;
                b.log.sync(pos.end).await.map_err(log_err)?;
                b.st().sent.push(Sent {
                    uid: batch.uid,
                    runs,
                    request,
                });
                request
            }
        };
        let after = self.checks_after(b, batch);
        let own = b.st().own_versions.clone();
        let ops = batch_ops_before(&batch.changes, &own, &after);
        let quorum = self.quorum_of(&batch.volume);
        let sent = match self
            .put_contents(b, &token, &batch.changes, &referenced(&ops), quorum)
            .await
        {
            Ok(()) => self.commit_batch(b, &token, batch, &ops, request).await,
            Err(e) if is_refusal(&e) => Err(e),
            Err(e) => return Err(e),
        };
        match sent {
            Ok(()) => {}
            Err(e) if is_conflict(&e) || is_refusal(&e) => {
                tracing::info!(error = %e, "write-back batch conflicts or is refused; sending its changes one by one");
                self.one_by_one(b, &token, batch, &request, &after).await?;
            }
            Err(e) => return Err(e),
        }
        // The log drains with this batch: what its commits made the cache forget is read again
        // before the batch settles, so `codafs sync` returns with it cached for offline use.
        let drained = {
            let st = b.st();
            st.queue.len() <= batch.changes.len() + st.held_seqs.len()
        };
        if drained {
            // Bounded tighter than a request: with the change stream down, each read would
            // wait for this commit's event.
            let _ = tokio::time::timeout(self.cfg.op_timeout.min(REWARM_TIME), self.rewarm(b)).await;
        }
        // What was sent stays readable offline. The batch that drains the log has its newest
        // files in the cache when `codafs sync` returns; the rest, and every earlier batch's,
        // follow on the keeper's thread. Small files go in packs (`cache/pack.rs`): copied a
        // file each, keeping every batch slowed a 5,000-file `cp -r` by about a fifth
        // (docs/benchmarks.md, "Session 22").
        let room = if self.me.get().is_some() {
            KEEP_MAX_BYTES.saturating_sub(b.keep_queue().bytes)
        } else {
            0
        };
        if drained || room > 0 {
            let (mut now, mut rest, mut queued) = (Vec::new(), Vec::new(), 0);
            crate::blocking::blocking(u64::MAX, || {
                self.each_sent_content(b, batch, |h, data| {
                    if drained && now.len() < REWARM_MAX {
                        now.push((h, data));
                        return true;
                    }
                    queued += data.len() as u64;
                    if queued > room {
                        return false;
                    }
                    rest.push((h, data));
                    true
                });
                self.cache_contents(now);
            });
            self.keep_in_background(b, rest);
        }
        self.settle_batch(b, batch, drained).await;
        Ok(())
    }

    /// Hands each inline content of a sent batch to `keep`, newest first, each file's last one
    /// only (the one sent), skipping what the blob cache holds, until `keep` says no or
    /// [`KEEP_MAX_BYTES`] were handed over. The contents are read from the log, so this runs
    /// before the batch settles (its segments may go then). Data files (contents over 1 MiB)
    /// are moved into the cache when the batch settles.
    fn each_sent_content(&self, b: &WriteBack, batch: &Batch, mut keep: impl FnMut(Hash, Vec<u8>) -> bool) {
        let mut bytes = 0u64;
        let mut newer: HashSet<u64> = HashSet::new();
        for c in batch.changes.iter().rev() {
            let (Some(content), Some(h)) = (&c.content, content_hash(&c.op)) else {
                continue;
            };
            if !newer.insert(op_target(&c.op)) {
                continue;
            }
            if matches!(content, Content::File(_)) || self.blobs.lookup(&h) {
                continue;
            }
            if bytes >= KEEP_MAX_BYTES {
                return;
            }
            let Ok(data) = b.log.read_content(content) else {
                return;
            };
            bytes += data.len() as u64;
            if !keep(h, data) {
                return;
            }
        }
    }

    /// Queues sent contents for the keeper's thread, and starts it unless it runs: what a
    /// batch sent (beyond the newest [`REWARM_MAX`] files of the batch that drains the log,
    /// kept before `codafs sync` returns) stays readable, and open for writing, while the
    /// servers are unreachable, without holding up the copy or `codafs sync`. The queue holds
    /// at most [`KEEP_MAX_BYTES`]; what does not fit is not kept (a file of it is read from the
    /// servers when next needed). Nothing starts on a core without background work (unit
    /// tests of other things).
    fn keep_in_background(&self, b: &WriteBack, contents: Vec<(Hash, Vec<u8>)>) {
        {
            let mut q = b.keep_queue();
            for (h, d) in contents {
                if q.bytes + d.len() as u64 > KEEP_MAX_BYTES {
                    tracing::debug!("the keeper's queue is full; later sent contents are not kept");
                    break;
                }
                q.bytes += d.len() as u64;
                q.items.push((h, d));
            }
            // Also with nothing new: a keeper that could not start last time starts now.
            if q.items.is_empty() {
                return;
            }
        }
        let Some(me) = self.me.get().and_then(std::sync::Weak::upgrade) else {
            return;
        };
        let Ok(slot) = b.keeping.clone().try_acquire_owned() else {
            // The running keeper takes these too.
            return;
        };
        let started = std::thread::Builder::new()
            .name("codafs-keep".into())
            .spawn(move || Keeper { me, slot }.run());
        if let Err(e) = started {
            tracing::debug!(error = %e, "no thread to keep sent contents in the cache");
        }
    }

    /// At unmount: drops what still waits for the keeper (it is on the servers, and read from
    /// them when next needed) and waits, at most `limit`, for the copy that runs to end, so
    /// the cache's index is saved with it. Whether none runs now.
    pub fn stop_keeping(&self, limit: Duration) -> bool {
        let Some(b) = self.write_back() else { return true };
        let (_, bytes) = b.keep_queue().take();
        b.keep_queue().done(bytes);
        let deadline = std::time::Instant::now() + limit;
        loop {
            if b.keeping.try_acquire().is_ok() {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until no copy of sent contents into the cache runs in the background.
    #[cfg(test)]
    pub(crate) async fn kept_in_background(&self) {
        if let Some(b) = self.write_back() {
            let _slot = b.keeping.acquire().await;
            // Queued just as a keeper stopped (it found the slot held here): kept here.
            let (items, bytes) = b.keep_queue().take();
            self.cache_contents(items);
            b.keep_queue().done(bytes);
        }
    }

    /// Reads again, while the servers answer, the listings (with their entries' attributes)
    /// and attributes that this mount's commits made the cache forget, and the listings of
    /// the directories it created. Without this, a node that loses the servers right after
    /// sending could no longer look up, stat or create in the directories it just wrote to.
    /// Best effort: the first failure ends it (what is left is fetched when next needed).
    async fn rewarm(&self, b: &WriteBack) {
        let (dirs, nodes, gained) = {
            let mut st = b.st();
            (
                std::mem::take(&mut st.rewarm_dirs),
                std::mem::take(&mut st.rewarm_nodes),
                std::mem::take(&mut st.rewarm_gained),
            )
        };
        let mut seen = HashSet::new();
        for dir in dirs.into_iter().rev() {
            if !seen.insert(dir) {
                continue;
            }
            // A listing read again brings all its entries' attributes in one call: worth it for
            // a directory that gained many names (a copy), not for one with a few (an editor's
            // save in a large directory), whose nodes are read one by one below. Either way the
            // directory's own attributes are read (its times changed): without them every
            // path through it fails offline.
            let listing = self.meta.listing(dir);
            let long = matches!(&listing, Ok(Some(l)) if l.len() > REWARM_LISTING_MAX);
            let many = gained.get(&dir).is_some_and(|n| *n >= REWARM_LISTING_NAMES);
            let whole = !long && (many || matches!(listing, Ok(None)));
            let r = if whole {
                self.fetch_listing(dir, self.cfg.op_timeout).await.map(drop)
            } else {
                Ok(())
            };
            let r = match r {
                Ok(()) if !matches!(self.meta.attr(dir), Ok(Some(_))) => self.stored_attr(dir).await.map(drop),
                r => r,
            };
            match r {
                Ok(()) | Err(FsError::NotFound) | Err(FsError::NotDir) => {}
                Err(e) => {
                    tracing::debug!(dir, error = %e, "reading a written directory again failed");
                    return;
                }
            }
        }
        // A directory read again above still needs its own attributes.
        let mut seen = HashSet::new();
        for ino in nodes.into_iter().rev() {
            if !seen.insert(ino) || matches!(self.meta.attr(ino), Ok(Some(_))) {
                continue;
            }
            match self.stored_attr(ino).await {
                Ok(_) | Err(FsError::NotFound) => {}
                Err(e) => {
                    tracing::debug!(ino, error = %e, "reading a written node again failed");
                    return;
                }
            }
        }
    }

    /// The one commit of a batch whose contents are on the servers.
    async fn commit_batch(
        &self,
        b: &WriteBack,
        token: &str,
        batch: &Batch,
        ops: &[Op],
        request: RequestId,
    ) -> Result<(), FsError> {
        let lock = self
            .writes
            .inflight(batch.changes.first().map_or(0, |c| split_ino(op_ino(&c.op)).0));
        let _inflight = lock.read().await;
        let done = self.commit_ops(token, &batch.volume, ops.to_vec(), request).await?;
        self.after_commit(b, ops, &done, &self.late_checks(b, batch, ops, &done));
        Ok(())
    }

    /// Commits `ops` on `volume` as request `request`, within the write timeout.
    async fn commit_ops(
        &self,
        token: &str,
        volume: &str,
        ops: Vec<Op>,
        request: RequestId,
    ) -> Result<Committed, FsError> {
        self.timed(self.write_timeout(0), self.remote.commit(token, volume, ops, request))
            .await
    }

    /// Puts the contents `wanted` of `changes` to the write quorum.
    async fn put_contents(
        &self,
        b: &WriteBack,
        token: &str,
        changes: &[Change],
        wanted: &[Hash],
        quorum: u32,
    ) -> Result<(), FsError> {
        let mut by_hash: HashMap<Hash, &Content> = HashMap::new();
        for c in changes {
            if let (Some(h), Some(content)) = (content_hash(&c.op), &c.content) {
                by_hash.insert(h, content);
            }
        }
        let mut group: Vec<bytes::Bytes> = Vec::new();
        let mut group_bytes = 0u64;
        for h in wanted {
            let Some(content) = by_hash.get(h) else { continue };
            if let Some(path) = b.log.data_path(content) {
                let file = std::fs::File::open(&path)?;
                let len = file.metadata()?.len();
                if codafs_common::chunks::is_chunked(len) {
                    let known = self.manifests.lock().unwrap_or_else(|p| p.into_inner()).get(h).cloned();
                    let (stored, _) = self
                        .timed(
                            self.write_timeout(len),
                            self.put_chunked(token, &file, len, quorum, known),
                        )
                        .await?;
                    if stored != *h {
                        return Err(FsError::Corrupt(format!(
                            "logged content {h} now reads as {stored}: {} was changed",
                            path.display()
                        )));
                    }
                    continue;
                }
            }
            let data = bytes::Bytes::from(b.log.read_content(content).map_err(log_err)?);
            let len = data.len() as u64;
            if data.len() > SMALL_PUT {
                self.timed(self.write_timeout(len), self.remote.put_blob(token, data, quorum))
                    .await?;
                continue;
            }
            if group.len() >= PUT_GROUP || group_bytes + len > PUT_GROUP_BYTES {
                let g = std::mem::take(&mut group);
                self.timed(self.write_timeout(group_bytes), self.remote.put_blobs(token, g, quorum))
                    .await?;
                group_bytes = 0;
            }
            group_bytes += len;
            group.push(data);
        }
        if !group.is_empty() {
            self.timed(
                self.write_timeout(group_bytes),
                self.remote.put_blobs(token, group, quorum),
            )
            .await?;
        }
        Ok(())
    }

    fn quorum_of(&self, volume: &str) -> u32 {
        self.writes
            .acls
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(volume)
            .map_or(crate::policy::DEFAULT_WRITE_QUORUM, |a| a.write_quorum)
    }

    /// The versions changes outside `batch` will check of the nodes it chmods, links or renames
    /// (see [`batch_ops_before`]): the first change queued behind the batch that checks the
    /// node, else the version the file was opened at if it is open for writing here. (A file
    /// opened after this is read expects the version it saw at its open; only someone else's
    /// commit landing between that open and this batch's commit can go unnoticed.)
    fn checks_after(&self, b: &WriteBack, batch: &Batch) -> HashMap<u64, u64> {
        let targets = batch.changes.iter().filter_map(|c| unchecked_target(&c.op)).collect();
        self.checks_of(b, batch, &targets)
    }

    /// [`Core::checks_after`] for the nodes `targets`.
    fn checks_of(&self, b: &WriteBack, batch: &Batch, targets: &HashSet<u64>) -> HashMap<u64, u64> {
        if targets.is_empty() {
            return HashMap::new();
        }
        // Open files first: their locks are never held with the state's.
        let mut after: HashMap<u64, u64> = targets
            .iter()
            .filter_map(|ino| Some((*ino, self.writes.open_base(*ino)?)))
            .collect();
        let in_batch: HashSet<u64> = batch.changes.iter().map(|c| c.seq).collect();
        let mut queued: HashSet<u64> = HashSet::new();
        let st = b.st();
        for c in st.queue.iter().filter(|c| !in_batch.contains(&c.seq)) {
            let Some((ino, seen)) = checked_by(&c.op).filter(|(i, _)| targets.contains(i)) else {
                continue;
            };
            // The first queued change of the node is the one that checks it (and comes before
            // the open file's close).
            if queued.insert(ino) {
                match seen {
                    Some(v) => after.insert(ino, v),
                    None => after.remove(&ino),
                };
            }
            if queued.len() == targets.len() {
                break;
            }
        }
        after
    }

    /// Nodes `ops` (committed for `batch`) chmodded, linked or renamed whose commit's version
    /// cannot be taken for this mount's own (see [`Core::after_commit`]): a later change of the
    /// node (a file open for writing here, or a change logged behind the batch, perhaps begun
    /// after the batch was built) would have expected a version other than the one the commit
    /// checked, or the commit checked none. Another node's commit may then have come between
    /// the version that change saw and this commit, and the change, expecting this commit's
    /// version, would replace it unchecked. It conflicts instead, if need be with this mount's
    /// own commit (both versions are kept either way). Unless the servers' reply tells that
    /// the node was, just before the commit, at the version the later change expects: then
    /// nobody came between, and the commit's version is this mount's own.
    fn late_checks(&self, b: &WriteBack, batch: &Batch, ops: &[Op], done: &Committed) -> HashSet<u64> {
        let pending = self.checks_of(b, batch, &targets_of(ops));
        if pending.is_empty() {
            return HashSet::new();
        }
        let checked: HashMap<u64, u64> = ops
            .iter()
            .filter_map(|o| match o {
                Op::ExpectNode { ino, version } => Some((*ino, *version)),
                _ => None,
            })
            .collect();
        let mut before = versions_before(ops, &done.prior);
        let st = b.st();
        own_renames_before(ops, &done.prior, &st.own_versions, &mut before);
        pending
            .into_iter()
            .filter(|(ino, seen)| {
                let expected = Some(super::batch::expects(&st.own_versions, *ino, *seen));
                checked.get(ino).copied() != expected && before.get(ino).copied() != expected
            })
            .map(|(ino, _)| ino)
            .collect()
    }

    /// What a committed batch changes here: the version is our own, cached listings gain the
    /// new names, and attributes of what it touched are read again when next needed.
    ///
    /// `distrust`: nodes whose chmod, link or rename in `ops` went without the check a later
    /// change of them makes, because that check failed (see `one_by_one`) or the later change
    /// began after the batch was built ([`Core::late_checks`]). Another node's content may
    /// have come between the version this mount saw and this commit; the commit's version
    /// then stands for content this mount never saw, and the later change, expecting it,
    /// would replace that content unchecked. So the node keeps the version it had here, and
    /// the later change conflicts (both versions are kept).
    fn after_commit(&self, b: &WriteBack, ops: &[Op], done: &Committed, distrust: &HashSet<u64>) {
        let version = done.version;
        self.own_commit(version);
        let mut inos = Vec::new();
        {
            let mut st = b.st();
            st.sent_batches += 1;
            for op in ops {
                match op {
                    Op::Create { ino: Some(i), .. } | Op::SetContent { ino: i, .. } => {
                        st.own_versions.insert(*i, version);
                    }
                    Op::SetAttr { ino: i, .. } | Op::Link { ino: i, .. } if !distrust.contains(i) => {
                        st.own_versions.insert(*i, version);
                    }
                    // A node that keeps other names after a remove, and a moved node, changed.
                    Op::Remove { seen: Some(s), .. } => {
                        st.own_versions.insert(s.ino, version);
                    }
                    Op::Rename { seen: Some(s), .. } if !distrust.contains(&s.ino) => {
                        st.own_versions.insert(s.ino, version);
                    }
                    _ => {}
                }
            }
        }
        // The cached listings learn the batch's names here (our own event does not drop them),
        // each listing read and written once however many names the batch changed in it.
        let (mut patches, mut unknown, mut new_dirs) = (Vec::new(), Vec::new(), Vec::new());
        let mut warm = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            // A conflict copy is created without a reserved id: the reply names it.
            let made = done.created.get(i).copied().filter(|c| *c != 0);
            listing_patches(op, made, &mut patches, &mut unknown);
            for ino in touched(op) {
                // Not the nodes a remove or a rename took away: they may be gone.
                let gone = matches!(op, Op::Remove { seen: Some(s), .. } | Op::Rename { replaces: Some(s), .. } if s.ino == ino);
                if !gone {
                    warm.push(ino);
                }
                inos.push(ino);
            }
            if let Op::Create {
                ino,
                kind: NodeKind::Dir,
                ..
            } = op
            {
                new_dirs.extend(ino.or(made));
            }
        }
        let mut reread = Vec::new();
        {
            // A listing is patched only while the mount shows the volume from before this
            // commit (under `apply_mx`, so no event lands in between). Once an event at or past
            // the commit was applied (a reply lost and the commit sent again, say), a cached
            // listing may hold later changes the patch would undo: it is read again instead.
            let _g = self.apply_mx.lock().unwrap_or_else(|p| p.into_inner());
            let past = patches
                .first()
                .and_then(|p| self.seen_of(p.0))
                .is_some_and(|seen| seen >= version);
            if past {
                unknown.extend(patches.drain(..).map(|p| p.0));
                reread.extend(new_dirs);
            } else {
                // A directory this batch made starts with an empty listing, which then takes the
                // batch's names in it (it would otherwise be read from the servers when next
                // listed, which fails offline).
                for d in new_dirs {
                    if matches!(self.meta.listing(d), Ok(None)) {
                        let _ = self.meta.put_dir(d, &[]);
                    }
                }
            }
            let _ = self.meta.patch_dirs(&patches);
        }
        // A directory whose listing is not cached was not patched: it is read (to be usable
        // offline) however few names it gained. Whether a patched one is read again whole or
        // only its own attributes is decided when the log drains, by the names it gained since
        // (see `rewarm`).
        let patched: HashSet<u64> = patches.iter().map(|p| p.0).collect();
        reread.extend(
            patched
                .into_iter()
                .filter(|d| matches!(self.meta.listing(*d), Ok(None))),
        );
        {
            let mut st = b.st();
            for p in &patches {
                if p.2.is_some() {
                    add_gained(&mut st.rewarm_gained, p.0, 1);
                }
                bounded_push(&mut st.rewarm_dirs, p.0);
            }
            for d in reread.into_iter().chain(unknown.iter().copied()) {
                add_gained(&mut st.rewarm_gained, d, usize::MAX);
                bounded_push(&mut st.rewarm_dirs, d);
            }
            for i in warm {
                bounded_push(&mut st.rewarm_nodes, i);
            }
        }
        let _ = self.meta.forget(&[], &unknown);
        let _ = self.meta.forget_attrs(&inos, &perms_set(ops));
        self.writes.stats.commits.fetch_add(1, Ordering::Relaxed);
    }

    /// A batch that conflicts: each change alone (with ids derived from the batch's, so a replay
    /// repeats none), conflicting ones kept under a sibling name.
    async fn one_by_one(
        &self,
        b: &WriteBack,
        token: &str,
        batch: &Batch,
        request: &RequestId,
        after: &HashMap<u64, u64>,
    ) -> Result<(), FsError> {
        let quorum = self.quorum_of(&batch.volume);
        let mut merged_away: HashSet<usize> = HashSet::new();
        for (i, c) in batch.changes.iter().enumerate() {
            if merged_away.contains(&i) {
                continue;
            }
            // A content a later change of the batch replaces is never sent (as in the batch).
            if let Op::SetContent { ino, .. } = &c.op {
                let later = batch.changes[i + 1..]
                    .iter()
                    .any(|l| matches!(&l.op, Op::SetContent { ino: j, .. } if j == ino));
                if later {
                    continue;
                }
            }
            // A new file goes with its last content, as in the batch: a conflict or refusal
            // then keeps (or sets aside) the file whole, under its own name.
            let merged = merge_creation(&batch.changes, i, &mut merged_away);
            let c = merged.as_ref().unwrap_or(c);
            // The versions as the changes before this one left them.
            let own = b.st().own_versions.clone();
            let ops = batch_ops(std::slice::from_ref(c), &own);
            // Its content may not have been put with the batch's (a content the batch merged
            // away is sent here on its own).
            match self
                .put_contents(b, token, std::slice::from_ref(c), &referenced(&ops), quorum)
                .await
            {
                Ok(()) => {}
                Err(e) if is_refusal(&e) => {
                    self.keep_refused(b, c, &e).await?;
                    continue;
                }
                Err(e) => return Err(e),
            }
            // A chmod, link or rename of a node a later change checks (in the batch, queued
            // behind it, or an open file's content) carries that check (see `batch.rs`).
            // Refused, it goes without it, and the node keeps the version it had here, so the
            // later change conflicts as in the batch.
            let mut distrust = HashSet::new();
            let r = match later_check(&batch.changes[i + 1..], &c.op, &own, after) {
                None => {
                    self.commit_ops(token, &batch.volume, ops.clone(), sub_request(request, i))
                        .await
                }
                Some(guard) => {
                    let guarded: Vec<Op> = std::iter::once(guard).chain(ops.iter().cloned()).collect();
                    match self
                        .commit_ops(token, &batch.volume, guarded.clone(), sub_request(request, i))
                        .await
                    {
                        Ok(done) => {
                            self.after_commit(b, &guarded, &done, &self.late_checks(b, batch, &guarded, &done));
                            continue;
                        }
                        Err(e) if is_conflict(&e) => {
                            distrust = targets_of(&ops);
                            let again = sub_request(request, i + 2 * batch.changes.len());
                            self.commit_ops(token, &batch.volume, ops.clone(), again).await
                        }
                        Err(e) => Err(e),
                    }
                }
            };
            match r {
                Ok(done) => {
                    if distrust.is_empty() {
                        distrust = self.late_checks(b, batch, &ops, &done);
                    }
                    self.after_commit(b, &ops, &done, &distrust)
                }
                Err(e) if is_conflict(&e) && replaced_later(b, batch, &c.op) => {
                    // Its own later content conflicts too (it expects the same version) and
                    // is kept, with the bytes this mount ended with: a copy of this one would
                    // be a second, stale copy (the empty file a shell's `> FILE` closes first).
                    tracing::debug!(op = ?c.op, "conflicting content replaced by a later one queued; no copy of it");
                }
                Err(e) if is_conflict(&e) => {
                    self.keep_conflict(b, token, c, &e, sub_request(request, i + batch.changes.len()))
                        .await?
                }
                Err(e) if is_refusal(&e) => self.keep_refused(b, c, &e).await?,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Keeps a change that cannot apply: a creation or content under a sibling name next to
    /// the original; anything else (an attribute change) is dropped. Either way it is reported.
    async fn keep_conflict(
        &self,
        b: &WriteBack,
        token: &str,
        c: &Change,
        why: &FsError,
        request: RequestId,
    ) -> Result<(), FsError> {
        // Attempts derive their ids from this one (see the loop below).
        let conflict_name = |name: &str, host: &str| {
            b.st()
                .conflict_names
                .entry(request)
                .or_insert_with(|| conflict_name(name, host))
                .clone()
        };
        let again = b.st().conflict_names.contains_key(&request);
        let (op, note) = match &c.op {
            Op::Create { parent, name, .. } | Op::Link { parent, name, .. } => {
                let mut op = c.op.clone();
                let new = conflict_name(name, &b.host);
                if let Some(n) = new_name_of(&mut op) {
                    n.clone_from(&new);
                }
                b.invalidate(vec![*parent], vec![(*parent, name.clone())]);
                self.forgot_name(*parent, name);
                let what = if matches!(c.op, Op::Link { .. }) {
                    "link"
                } else {
                    "node"
                };
                (
                    Some(op),
                    format!("{name} was created elsewhere too; this mount's {what} is kept as {new}"),
                )
            }
            Op::SetContent {
                ino,
                hash,
                size,
                mtime_ns,
                ..
            } => {
                let (parent, name, listed) = self.name_of(*ino).await;
                let new = conflict_name(&name, &b.host);
                let op = Op::Create {
                    ino: None,
                    parent,
                    name: new.clone(),
                    kind: NodeKind::File,
                    mode: 0o644,
                    hash: Some(*hash),
                    symlink_target: String::new(),
                    rdev: 0,
                    uid: c.uid,
                    gid: 0,
                    size: *size,
                    mtime_ns: *mtime_ns,
                };
                b.invalidate(vec![*ino], Vec::new());
                let elsewhere = if listed {
                    "changed elsewhere too"
                } else {
                    "removed elsewhere"
                };
                (
                    Some(op),
                    format!("{name} was {elsewhere}; this mount's content is kept as {new}"),
                )
            }
            Op::Rename {
                from_parent,
                from_name,
                to_parent,
                to_name,
                ..
            } => {
                let new = conflict_name(to_name, &b.host);
                let mut op = c.op.clone();
                if let Op::Rename {
                    to_name: n, replaces, ..
                } = &mut op
                {
                    (*n, *replaces) = (new.clone(), None);
                }
                b.invalidate(
                    vec![*from_parent, *to_parent],
                    vec![(*from_parent, from_name.clone()), (*to_parent, to_name.clone())],
                );
                self.forgot_name(*to_parent, to_name);
                (
                    Some(op),
                    format!(
                        "{to_name} was changed elsewhere while this mount renamed {from_name} to it; \
                         this mount's is kept as {new}"
                    ),
                )
            }
            Op::Remove { parent, name, .. } => {
                // The other change wins: the name shows what it holds now.
                b.invalidate(vec![*parent], vec![(*parent, name.clone())]);
                let _ = self.meta.forget(&[], &[*parent]);
                (
                    None,
                    format!("{name} was changed elsewhere; this mount's removal of it is not applied ({why})"),
                )
            }
            other => (None, format!("dropped {other:?}: {why}")),
        };
        b.st().conflict_names.entry(request).or_default();
        // Recorded for the syncs waiting for it once the outcome is known (a step below that
        // fails makes the batch go again, and the conflict may be gone by then).
        let failure = FsError::Io(format!("write-back conflict: {note}"));
        if !again {
            // Where, as `status` shows it: a site has an index.html in every directory.
            let dir = match (&op, &c.op) {
                (Some(Op::Create { parent, .. } | Op::Link { parent, .. }), _) => Some(*parent),
                (Some(Op::Rename { to_parent, .. }), _) => Some(*to_parent),
                (None, Op::Remove { parent, .. }) => Some(*parent),
                _ => None,
            };
            let note = match dir {
                Some(d) => format!("in {}: {note}", self.place_of(&c.volume, d).await),
                None => note.clone(),
            };
            tracing::warn!(volume = %c.volume, error = %why, "write-back conflict: {note}");
            let mut st = b.st();
            st.conflicts += 1;
            st.last_conflict = Some(note);
        }
        let Some(mut op) = op else {
            b.st().failed(c, failure);
            return Ok(());
        };
        let base = new_name_of(&mut op).map(|n| n.clone()).unwrap_or_default();
        // Two conflicts of one file within a millisecond would pick one name: number them.
        for attempt in 0..8u64 {
            if let Some(name) = new_name_of(&mut op) {
                *name = if attempt == 0 {
                    base.clone()
                } else {
                    format!("{base}-{attempt}")
                };
            }
            let r = self
                .commit_ops(
                    token,
                    &c.volume,
                    vec![op.clone()],
                    sub_request(&request, attempt as usize),
                )
                .await;
            match r {
                Ok(done) => {
                    self.after_commit(b, &[op], &done, &HashSet::new());
                    b.st().failed(c, failure);
                    return Ok(());
                }
                Err(FsError::Exists) => continue,
                Err(e) if is_conflict(&e) || is_refusal(&e) => break,
                Err(e) => return Err(e),
            }
        }
        // Even a sibling cannot be made (its directory is gone, say): keep the bytes in the
        // cache directory and say where, loudly.
        match keep_bytes(b, c, Some(&base)) {
            Ok(Some(path)) => {
                tracing::error!(
                    volume = %c.volume,
                    path = %path.display(),
                    "a conflicting change could not be kept on the servers; its content is kept here"
                );
                // What `status` shows says where the bytes are, not the sibling that failed.
                b.st().last_conflict = Some(format!(
                    "{} could not be kept on the servers (its directory was removed elsewhere?); \
                     this mount's content is kept in {}",
                    describe(&c.op),
                    path.display()
                ));
            }
            Ok(None) => {}
            Err(e) => {
                // Never dropped: the batch stays logged and is tried again.
                tracing::error!(volume = %c.volume, error = %e, "a conflicting change cannot be kept anywhere yet; it stays in the log");
                return Err(FsError::Io(format!("keeping a conflicting change: {e}")));
            }
        }
        b.st().failed(c, failure);
        Ok(())
    }

    /// Sets aside a change the servers refused outright (see [`is_refusal`]): its bytes go to
    /// `wblog/lost+found`, this mount stops showing it, and it is counted and reported.
    /// If its bytes cannot be set aside (the cache disk failing), nothing is dropped: the
    /// error keeps the batch in the log, to be tried again.
    async fn keep_refused(&self, b: &WriteBack, c: &Change, why: &FsError) -> Result<(), FsError> {
        // A change of an existing node is named by where the node is (it carries only its id).
        let place = match &c.op {
            Op::SetContent { ino, .. } | Op::SetAttr { ino, .. } => {
                let (parent, name, _) = self.name_of(*ino).await;
                let dir = self.place_of(&c.volume, parent).await;
                let path = format!("{}/{name}", dir.trim_end_matches('/'));
                Some((name, path))
            }
            _ => None,
        };
        let kept = match keep_bytes(b, c, place.as_ref().map(|(name, _)| name.as_str())) {
            Ok(Some(path)) => format!("; its content is kept in {}", path.display()),
            Ok(None) => String::new(),
            Err(e) => {
                tracing::error!(volume = %c.volume, error = %e, "a refused change cannot be set aside yet; it stays in the log");
                return Err(FsError::Io(format!("setting aside a refused change: {e}")));
            }
        };
        let what = match (&c.op, &place) {
            (Op::SetContent { .. }, Some((_, path))) => format!("new content of {path}"),
            (Op::SetAttr { .. }, Some((_, path))) => format!("an attribute change of {path}"),
            (op, _) => describe(op),
        };
        let note = format!("{what} refused by the servers: {why}{kept}");
        tracing::warn!(volume = %c.volume, uid = c.uid, "write-back: {note}");
        let mut inodes = touched(&c.op);
        let mut entries = Vec::new();
        match &c.op {
            Op::Create { parent, name, .. } | Op::Link { parent, name, .. } | Op::Remove { parent, name, .. } => {
                entries.push((*parent, name.clone()));
            }
            Op::Rename {
                from_parent,
                from_name,
                to_parent,
                to_name,
                ..
            } => entries.extend([(*from_parent, from_name.clone()), (*to_parent, to_name.clone())]),
            _ => {}
        }
        for (dir, name) in &entries {
            self.forgot_name(*dir, name);
        }
        let dirs: Vec<u64> = entries.iter().map(|(d, _)| *d).collect();
        let _ = self.meta.forget(&inodes, &dirs);
        inodes.sort_unstable();
        inodes.dedup();
        b.invalidate(inodes, entries);
        let mut st = b.st();
        st.refused += 1;
        st.failed(c, why.clone());
        st.last_refused = Some(note);
        Ok(())
    }

    /// Where a conflict copy of file `ino` goes: its parent and name on the servers, and
    /// whether the servers still list it there (`false`: removed elsewhere). A node removed
    /// elsewhere keeps the name this mount last listed it under (from the cache, or noted when
    /// the removal's event was applied), in its directory if that still exists, else at the
    /// volume's root; a node the mount cannot place at all goes to the volume's root as
    /// `node-<ino>`.
    async fn name_of(&self, ino: u64) -> (u64, String, bool) {
        if let Some(known) = self.place_known(ino).await {
            return known;
        }
        match self.place_noted(ino).await {
            Some(noted) => noted,
            None => {
                let root = self.volume_of(ino).map_or(0, |v| v.root_ino);
                (root, format!("node-{ino:x}"), false)
            }
        }
    }

    /// Directory `dir` of `volume` as a path, `VOLUME:/a/b` (names as [`Core::name_of`] finds
    /// them, at most 32 levels up; a directory it cannot place shows as `node-<ino>`).
    async fn place_of(&self, volume: &str, dir: u64) -> String {
        let root = self.volume_of(dir).map_or(0, |v| v.root_ino);
        let mut parts = Vec::new();
        let mut at = dir;
        for _ in 0..32 {
            if at == root {
                break;
            }
            let (parent, name, _) = self.name_of(at).await;
            let lost = name.starts_with("node-");
            parts.push(name);
            if lost || parent == at {
                break;
            }
            at = parent;
        }
        parts.reverse();
        format!("{volume}:/{}", parts.join("/"))
    }

    /// Where the servers list `ino`, or the name the cached listing of its directory last
    /// had for it (`false`: removed elsewhere); `None` if its attributes or that listing are
    /// gone.
    async fn place_known(&self, ino: u64) -> Option<(u64, String, bool)> {
        let a = self.stored_attr(ino).await.ok()?;
        let listing = self.remote.readdir(a.parent).await.ok()?;
        if let Some((n, _)) = listing.value.into_iter().find(|(_, e)| e.ino == ino) {
            return Some((a.parent, n, true));
        }
        let name = self.cached_name(a.parent, ino)?;
        Some((a.parent, name, false))
    }

    /// The name `ino` has in the cached listing of `dir`, if the cache holds one.
    fn cached_name(&self, dir: u64, ino: u64) -> Option<String> {
        let listing = self.meta.dir(dir).ok().flatten()?;
        listing.into_iter().find(|e| e.ino == ino).map(|e| e.name)
    }

    /// Where `ino` was listed when another client's change to it was applied here (see
    /// `BackState::places`). If that directory is gone from the servers too, the volume's root
    /// under the same name: a copy made in a removed directory would be refused and stay on
    /// this node only, and a made-up name would not tell the webmaster which page it is.
    async fn place_noted(&self, ino: u64) -> Option<(u64, String, bool)> {
        let b = self.write_back()?;
        let (parent, name) = b.st().places.get(&ino).cloned()?;
        match self.remote.getattr(parent).await {
            Err(FsError::NotFound) => Some((self.volume_of(ino)?.root_ino, name, false)),
            r => {
                r.ok()?;
                Some((parent, name, false))
            }
        }
    }

    /// Before another client's change is applied to the cache: notes where the nodes it
    /// touches that have unsettled changes here are listed, while the cache still knows (a
    /// removal makes them unknown). Rare, so the cached listing is read only then.
    pub(in crate::core) fn note_places(&self, inos: &[u64]) {
        let Some(b) = self.write_back() else { return };
        let pending: Vec<u64> = {
            let st = b.st();
            inos.iter().copied().filter(|i| st.nodes.contains_key(i)).collect()
        };
        for ino in pending {
            let Ok(Some(a)) = self.meta.attr(ino) else { continue };
            if let Some(name) = self.cached_name(a.parent, ino) {
                let mut st = b.st();
                if st.nodes.contains_key(&ino) {
                    st.places.insert(ino, (a.parent, name));
                }
            }
        }
    }

    /// Marks a sent batch settled: logged as done, overlay and held contents released.
    ///
    /// The `Done` record is made durable before any segment or data file goes: a start that
    /// found the batch's `Sending` record without its changes or contents could never resend
    /// it. If it cannot be written (the cache disk failing), nothing is released: the next
    /// start resends the batch, which the servers answer from their record of its request id.
    /// `drained`: the batch emptied the log, so its data files all move into the blob cache
    /// (otherwise only chunked ones do, which a reader usually opens next).
    async fn settle_batch(&self, b: &WriteBack, batch: &Batch, drained: bool) {
        // Own versions that changes still logged will need after a crash, made durable by the
        // same sync as `Done` (an `Own` record that cannot be written costs only a false
        // conflict after a crash, kept as a sibling).
        if let Some(own) = b.st().own_record(batch) {
            let _ = b.log.append(&own);
        }
        let seqs: HashSet<u64> = batch.changes.iter().map(|c| c.seq).collect();
        // Everything up to `watermark` is settled once this batch is: `Done` says so. A batch
        // sent ahead of changes held back is recorded by its own numbers instead.
        let watermark = b.st().watermark_past(&seqs);
        // Segments go only under a `Done` (a `Settled` record must outlive the changes it
        // names); the batch's data files go either way.
        let (rec, release_upto) = if watermark >= batch.last {
            (Record::Done { last: watermark }, watermark)
        } else {
            let runs = runs_of(batch.changes.iter().map(|c| c.seq));
            (Record::Settled { runs }, 0)
        };
        let recorded = match b.log.append(&rec) {
            Ok(at) => b.log.sync(at.end).await,
            Err(e) => Err(e),
        };
        let mut data = Vec::new();
        // Collected before the state lock (never both at once), and only when it will be used.
        let over = b.st().own_versions.len() > OWN_VERSIONS_KEPT;
        let open = if over {
            self.writes.open_shadows()
        } else {
            HashSet::new()
        };
        {
            let mut st = b.st();
            st.sent.retain(|s| !seqs.iter().any(|q| in_runs(&s.runs, *q)));
            // No batch awaits a resend: no conflict copy is sent again. (A batch held back for
            // its user's token keeps the names its copies got.)
            if st.sent.is_empty() {
                st.conflict_names.clear();
            }
            st.sent_changes += batch.changes.len() as u64;
            st.queue.retain(|c| !seqs.contains(&c.seq));
            st.settle_overlay(|seq| seq <= watermark || seqs.contains(&seq));
            st.bound_own_versions(&open);
        }
        let mut hashes = HashMap::new();
        for c in &batch.changes {
            if let Some(Content::File(name)) = &c.content {
                data.push(name.clone());
                if let Some(h) = content_hash(&c.op) {
                    hashes.insert(name.as_str(), h);
                }
            }
        }
        match recorded {
            // A large file just sent is read next (reopened, rewritten): its log copy becomes
            // the cache entry instead of being deleted and fetched back.
            Ok(()) => b.log.release_keeping(
                release_upto,
                &data,
                || Some(b.st().pool_record()),
                |name, path, len| {
                    let Some(h) = hashes.get(name) else { return false };
                    let chunked = codafs_common::chunks::is_chunked(len);
                    if !(chunked || drained) || self.blobs.lookup(h) {
                        return false;
                    }
                    // A whole-file entry is hashed again on first use (it may come from a replay).
                    let known = chunked && self.manifests.lock().unwrap_or_else(|p| p.into_inner()).contains(h);
                    self.blobs.adopt(*h, path, len, known).is_ok()
                },
            ),
            Err(e) => {
                tracing::warn!(error = %e, last = batch.last, "cannot record a sent write-back batch; its log files stay until the next start resends it")
            }
        }
        b.settles.send_modify(|n| *n += 1);
    }
}

/// Sent contents waiting for the keeper's thread (see `Core::keep_in_background`).
#[derive(Default)]
pub(crate) struct KeepQueue {
    items: Vec<(Hash, Vec<u8>)>,
    bytes: u64,
}

impl KeepQueue {
    /// The queued contents, still counted in `bytes` until [`KeepQueue::done`]: the bound is
    /// on what is held in memory, queued or being copied.
    fn take(&mut self) -> (Vec<(Hash, Vec<u8>)>, u64) {
        let items = std::mem::take(&mut self.items);
        let bytes = items.iter().map(|(_, d)| d.len() as u64).sum();
        (items, bytes)
    }

    fn done(&mut self, bytes: u64) {
        self.bytes = self.bytes.saturating_sub(bytes);
    }
}

/// Copies queued sent contents into the blob cache on a thread of its own (see
/// `Core::keep_in_background`), holding the one slot for it while it runs.
struct Keeper<R: Remote> {
    me: Arc<Core<R>>,
    slot: tokio::sync::OwnedSemaphorePermit,
}

impl<R: Remote> Keeper<R> {
    /// At a lower CPU priority, so a copy still running into the mount gets the CPU first;
    /// until the queue is empty. Best effort: contents the blob cache refuses (full) are
    /// dropped.
    fn run(self) {
        crate::blocking::lower_priority();
        let Keeper { me, mut slot } = self;
        let Some(b) = me.write_back() else { return };
        loop {
            let (items, bytes) = b.keep_queue().take();
            if !items.is_empty() {
                me.cache_contents(items);
                b.keep_queue().done(bytes);
                continue;
            }
            drop(slot);
            // Queued after the queue was found empty, while the slot was still held: take it
            // again, unless someone else holds it now (and so takes them).
            if b.keep_queue().items.is_empty() {
                return;
            }
            match b.keeping.clone().try_acquire_owned() {
                Ok(s) => slot = s,
                Err(_) => return,
            }
        }
    }
}

/// Counts `n` more names gained by directory `dir` since the log last drained (saturating:
/// `usize::MAX` marks a listing to read again whole); a directory past the map's bound is not
/// counted, and is read again whole only if its listing is not cached.
fn add_gained(gained: &mut HashMap<u64, usize>, dir: u64, n: usize) {
    if gained.len() >= 4 * REWARM_MAX && !gained.contains_key(&dir) {
        return;
    }
    let e = gained.entry(dir).or_default();
    *e = e.saturating_add(n);
}

/// Appends `v` to a bounded queue of [`REWARM_MAX`], dropping the oldest entry when full.
fn bounded_push(q: &mut VecDeque<u64>, v: u64) {
    if q.back() == Some(&v) {
        return;
    }
    if q.len() >= REWARM_MAX {
        q.pop_front();
    }
    q.push_back(v);
}

/// The name changes a committed operation made, as patches of cached listings (`patches`), or
/// directories whose listing must be read again (`unknown`). `made`: the node the commit's
/// reply says the operation created.
fn listing_patches(op: &Op, made: Option<u64>, patches: &mut Vec<DirPatch>, unknown: &mut Vec<u64>) {
    match op {
        Op::Create {
            ino,
            parent,
            name,
            kind,
            ..
        } => match ino.or(made) {
            Some(i) => patches.push((*parent, name.clone(), Some((i, kind_code(*kind))))),
            None => unknown.push(*parent),
        },
        Op::Remove { parent, name, .. } => patches.push((*parent, name.clone(), None)),
        Op::Rename {
            from_parent,
            from_name,
            to_parent,
            to_name,
            seen,
            ..
        } => {
            patches.push((*from_parent, from_name.clone(), None));
            match seen {
                Some(s) => patches.push((*to_parent, to_name.clone(), Some((s.ino, kind_code(s.kind))))),
                None => unknown.push(*to_parent),
            }
        }
        Op::Link {
            ino,
            parent,
            name,
            kind,
        } => patches.push((*parent, name.clone(), Some((*ino, kind_code(*kind))))),
        _ => {}
    }
}

/// The node a chmod, link or rename changes without checking its version (none for other
/// changes, and for a directory's rename: a directory's version moves with its entries).
fn unchecked_target(op: &Op) -> Option<u64> {
    match op {
        Op::SetAttr { ino, .. } | Op::Link { ino, .. } => Some(*ino),
        Op::Rename { seen: Some(s), .. } if s.kind != NodeKind::Dir => Some(s.ino),
        _ => None,
    }
}

/// The version each node had just before a commit of `ops`, where the reply told it
/// (`prior`, in operation order): what the first operation changing the node found. A node
/// an earlier operation of the commit changed untold is told at the commit's own version, which
/// no change expects, so that stays on the safe side. A rename tells nothing: the servers move
/// whatever node has the name then, which may not be the one this mount saw there, so the
/// version told may be another node's (its node counts as changed untold).
fn versions_before(ops: &[Op], prior: &[u64]) -> HashMap<u64, u64> {
    let mut before = HashMap::new();
    let mut seen = HashSet::new();
    for (i, op) in ops.iter().enumerate() {
        let ino = match op {
            Op::SetAttr { ino, .. }
            | Op::SetContent { ino, .. }
            | Op::Link { ino, .. }
            | Op::ExpectNode { ino, .. } => *ino,
            Op::Rename { seen: Some(s), .. } => {
                seen.insert(s.ino);
                continue;
            }
            _ => continue,
        };
        if !seen.insert(ino) {
            continue;
        }
        if let Some(p) = prior.get(i).copied().filter(|p| *p != 0) {
            before.insert(ino, p);
        }
    }
    before
}

/// Adds to `before` the version a rename in `ops` found its node at, when that is the version
/// this mount's own last commit of the node it saw gave it (`own`). A rename's reply tells the
/// version of whatever node held the name (see [`versions_before`]); but every change moves
/// the changed node's version, a rename included, so a node at this mount's own version of
/// the node it saw is that node, as this mount left it. (A file saved as a new temporary file
/// renamed over the name and then removed: the rename's version is this mount's own, and the
/// removal, expecting it, goes through instead of conflicting with this mount's own rename.)
fn own_renames_before(ops: &[Op], prior: &[u64], own: &HashMap<u64, u64>, before: &mut HashMap<u64, u64>) {
    for (op, p) in ops.iter().zip(prior) {
        if let Op::Rename { seen: Some(s), .. } = op {
            if *p != 0 && own.get(&s.ino) == Some(p) {
                before.entry(s.ino).or_insert(*p);
            }
        }
    }
}

/// The nodes `ops` chmod, link or rename without checking their version.
fn targets_of(ops: &[Op]) -> HashSet<u64> {
    ops.iter().filter_map(unchecked_target).collect()
}

/// The node a change checks and the version it saw (`None`: unknown), if it checks one: new
/// content, or the remove of a node other than a directory.
fn checked_by(op: &Op) -> Option<(u64, Option<u64>)> {
    match op {
        Op::SetContent { ino, expect, .. } => Some((*ino, *expect)),
        Op::Remove { seen: Some(s), .. } if s.kind != NodeKind::Dir => Some((s.ino, Some(s.version))),
        _ => None,
    }
}

/// The check a chmod, link or rename `op` of a node the servers have carries when sent alone:
/// the one the first later change of the node in `later` makes, else the one a change outside
/// the batch makes (`after`, see [`Core::checks_after`]).
fn later_check(later: &[Change], op: &Op, own: &HashMap<u64, u64>, after: &HashMap<u64, u64>) -> Option<Op> {
    let ino = unchecked_target(op)?;
    let seen = later
        .iter()
        .find_map(|c| checked_by(&c.op).filter(|(i, _)| *i == ino).map(|(_, v)| v))
        .or_else(|| after.get(&ino).map(|v| Some(*v)))?;
    let version = super::batch::newest(own.get(&ino).copied(), seen)?;
    Some(Op::ExpectNode { ino, version })
}

/// Change `i` of `changes` merged with the last content change of the same file, if `i` creates
/// a file whose content a later change sets; the content changes go into `merged_away`.
fn merge_creation(changes: &[Change], i: usize, merged_away: &mut HashSet<usize>) -> Option<Change> {
    let c = &changes[i];
    let Op::Create {
        ino: Some(ino),
        kind: NodeKind::File,
        ..
    } = &c.op
    else {
        return None;
    };
    let contents: Vec<usize> = (i + 1..changes.len())
        .filter(|j| matches!(&changes[*j].op, Op::SetContent { ino: k, .. } if k == ino))
        .collect();
    let last = &changes[*contents.last()?];
    let [op] = batch_ops(&[c.clone(), last.clone()], &HashMap::new()).try_into().ok()?;
    merged_away.extend(contents);
    Some(Change {
        op,
        content: last.content.clone(),
        ..c.clone()
    })
}

/// Keeps the content of change `c` (if it has one) in `wblog/lost+found`; returns where.
fn keep_bytes(b: &WriteBack, c: &Change, name: Option<&str>) -> Result<Option<std::path::PathBuf>, FsError> {
    let Some(content) = &c.content else { return Ok(None) };
    let label = match (&c.op, name) {
        (Op::Create { name, .. }, _) => name.clone(),
        (_, Some(name)) => name.to_string(),
        (op, None) => format!("{:016x}", op_target(op)),
    };
    // A file name of up to 255 bytes with the volume and number in front would not fit:
    // the log would retry setting it aside for ever. Its head is enough to tell it.
    let mut end = label.len().min(KEPT_NAME_BYTES);
    while !label.is_char_boundary(end) {
        end -= 1;
    }
    let name = format!("{}-{}-{}", c.volume, c.seq, &label[..end]);
    if let Some(from) = b.log.data_path(content) {
        return Ok(Some(b.log.keep_aside_file(&name, &from).map_err(log_err)?));
    }
    let bytes = b.log.read_content(content).map_err(log_err)?;
    if bytes.is_empty() {
        return Ok(None);
    }
    let path = b.log.keep_aside(&name, &bytes).map_err(log_err)?;
    Ok(Some(path))
}

/// The most bytes of a file's name a copy kept in `lost+found` carries.
const KEPT_NAME_BYTES: usize = 120;

/// A change as the log and `codafs status` name it.
fn describe(op: &Op) -> String {
    match op {
        Op::Create { name, .. } => format!("the creation of {name}"),
        Op::SetContent { ino, .. } => format!("new content of node {ino:#x}"),
        Op::SetAttr { ino, .. } => format!("an attribute change of node {ino:#x}"),
        Op::Remove { name, .. } => format!("the removal of {name}"),
        Op::Rename { from_name, to_name, .. } => format!("the rename of {from_name} to {to_name}"),
        Op::Link { name, .. } => format!("the link {name}"),
        Op::Reserve { .. } | Op::Expect { .. } | Op::ExpectNode { .. } => format!("{op:?}"),
    }
}

/// The name an operation gives a node (a conflict copy's, to number).
fn new_name_of(op: &mut Op) -> Option<&mut String> {
    match op {
        Op::Create { name, .. } | Op::Link { name, .. } | Op::Rename { to_name: name, .. } => Some(name),
        _ => None,
    }
}

fn content_hash(op: &Op) -> Option<Hash> {
    match op {
        Op::Create {
            hash: Some(h),
            kind: NodeKind::File,
            ..
        } => Some(*h),
        Op::SetContent { hash, .. } => Some(*hash),
        _ => None,
    }
}

fn content_size(op: &Op) -> u64 {
    match op {
        Op::Create { size, .. } | Op::SetContent { size, .. } => *size,
        _ => 0,
    }
}

/// The node a content change is about (0: none).
fn op_target(op: &Op) -> u64 {
    match op {
        Op::Create { ino, .. } => ino.unwrap_or(0),
        Op::SetContent { ino, .. } | Op::SetAttr { ino, .. } => *ino,
        _ => 0,
    }
}

/// A node id an operation is about (its volume is the batch's).
fn op_ino(op: &Op) -> u64 {
    touched(op).first().copied().unwrap_or(0)
}

/// A new name for a logged content's data file. Unique per close, not only per content and
/// node: the same bytes closed twice while the first change is still queued are two changes,
/// and settling the first must not delete (or move into the cache) the file the second needs.
fn data_file_name(hash: &Hash, ino: u64) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{}-{ino:016x}-{:x}-{n:x}", hash.to_hex(), codafs_common::now_ns())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::write::batch::tests::{change, content, create};

    /// A whole-log sync reports a failure of a change it waited for, once; a failure of a
    /// change logged after it began is left to the next sync (it was marked reported without
    /// being reported). An `fsync` reports its own node's failures since it began.
    #[test]
    fn each_failure_goes_to_the_first_sync_that_waited_for_it() {
        let mut st = BackState::default();
        let refused = |why: &str| FsError::Denied(why.into());
        let since = st.failed_total;
        st.failed(&change(12, content(7, b"late", Some(1))), refused("late"));
        // A sync that waited up to change 10: nothing of its own failed.
        assert_eq!(st.log_failure(10), None);
        // The next one, up to 12, gets it; the one after, nothing.
        assert_eq!(st.log_failure(12), Some(refused("late")));
        assert_eq!(st.log_failure(20), None);
        // An fsync of node 7 begun before the failure reports it, of another node not, and one
        // begun after it not either.
        assert_eq!(st.node_failure(since, 12, 7), Some(refused("late")));
        assert_eq!(st.node_failure(since, 12, 8), None);
        assert_eq!(st.node_failure(st.failed_total, 12, 7), None);
        // Past what is remembered, an unreported failure is not passed over silently.
        for seq in 0..=FAILURES_KEPT as u64 {
            st.failed(&change(100 + seq, content(9, b"x", Some(1))), refused("many"));
        }
        assert!(st.log_failure(50).is_some_and(|e| e.to_string().contains("more than")));
        assert_eq!(st.log_failure(50), None);
    }

    #[test]
    fn the_overlay_shows_new_nodes_and_patches_until_settled() {
        let mut st = BackState::default();
        st.overlay(&change(1, create(10, "a")));
        st.overlay(&change(2, content(10, b"abc", None)));
        st.overlay(&change(3, content(20, b"xy", Some(3))));
        let Some((Pending::Created(a), 2)) = st.nodes.get(&10).cloned() else {
            panic!()
        };
        assert_eq!((a.size, a.hash), (3, Some(Hash::of(b"abc"))));
        assert_eq!(st.names[&1]["a"], (Some((10, NodeKind::File)), 1));
        let mut base = Attr {
            ino: 20,
            size: 100,
            mode: 0o600,
            ..Default::default()
        };
        let Some((Pending::Changed(p), 3)) = st.nodes.get(&20).cloned() else {
            panic!()
        };
        p.apply(&mut base);
        assert_eq!((base.size, base.mode), (2, 0o600));
        // Settling change 2 keeps what change 3 did.
        st.settle_overlay(|s| s <= 2);
        assert!(!st.nodes.contains_key(&10) && st.names.is_empty());
        assert!(st.nodes.contains_key(&20));
        // A directory made here, and a file made in it after the directory's batch was taken:
        // once that batch settles the directory is on the servers (its listing is theirs plus
        // the overlay), although it still shows the overlay's attributes.
        let mut dir = create(40, "d");
        if let Op::Create { kind, .. } = &mut dir {
            *kind = NodeKind::Dir;
        }
        st.overlay(&change(4, dir));
        let mut inner = create(41, "f");
        if let Op::Create { parent, .. } = &mut inner {
            *parent = 40;
        }
        st.overlay(&change(5, inner));
        assert!(st.unsent_creations.contains_key(&40));
        st.settle_overlay(|s| s <= 4);
        assert!(
            matches!(st.nodes.get(&40), Some((Pending::Created(_), 5))) && !st.unsent_creations.contains_key(&40),
            "patched by change 5, but created on the servers"
        );
    }

    #[test]
    fn the_overlay_shows_removes_renames_and_links_until_settled() {
        use crate::core::types::Seen;
        let file = |ino| Seen {
            ino,
            version: 3,
            kind: NodeKind::File,
        };
        let mut st = BackState::default();
        st.overlay(&change(1, create(10, "a")));
        st.overlay(&change(
            2,
            Op::Rename {
                from_parent: 1,
                from_name: "a".into(),
                to_parent: 1,
                to_name: "b".into(),
                seen: Some(file(10)),
                replaces: Some(file(20)),
            },
        ));
        st.overlay(&change(
            3,
            Op::Link {
                ino: 30,
                parent: 1,
                name: "l".into(),
                kind: NodeKind::File,
            },
        ));
        st.overlay(&change(
            4,
            Op::Remove {
                parent: 1,
                name: "c".into(),
                seen: Some(file(30)),
                expect: None,
            },
        ));
        let names = &st.names[&1];
        assert_eq!(names["a"].0, None, "renamed away");
        assert_eq!(names["b"].0, Some((10, NodeKind::File)));
        assert_eq!(names["c"].0, None, "removed");
        assert_eq!(names["l"].0, Some((30, NodeKind::File)));
        let links = |st: &BackState, ino| match st.nodes.get(&ino) {
            Some((Pending::Changed(p), _)) => p.nlink_delta,
            other => panic!("{other:?}"),
        };
        assert_eq!(links(&st, 20), -1, "the replaced node lost its name");
        assert_eq!(links(&st, 30), 0, "one link made, one name removed");
        st.settle_overlay(|s| s <= 3);
        assert_eq!(st.names[&1].len(), 1, "only the remove's name is unsent");
    }

    #[test]
    fn own_versions_stay_bounded_but_keep_what_queued_changes_and_open_files_need() {
        let mut st = BackState::default();
        for ino in 0..(OWN_VERSIONS_KEPT as u64) {
            st.own_versions.insert(ino, 7);
        }
        st.bound_own_versions(&HashSet::new());
        assert_eq!(
            st.own_versions.len(),
            OWN_VERSIONS_KEPT,
            "nothing dropped up to the bound"
        );
        st.own_versions.insert(1 << 40, 7);
        st.queue.push_back(change(9, content(3, b"queued", Some(1))));
        st.bound_own_versions(&HashSet::from([5]));
        let mut kept: Vec<u64> = st.own_versions.keys().copied().collect();
        kept.sort_unstable();
        assert_eq!(kept, vec![3, 5], "a queued change's node and an open file's");
    }

    /// After a batch commits, the versions it gave nodes that later logged changes still touch
    /// are logged (`Own`) and taken up again by a replay, until those changes settle.
    #[test]
    fn own_versions_that_logged_changes_need_survive_a_replay() {
        let dir = tempfile::tempdir().unwrap();
        let batch = Batch {
            last: 2,
            volume: "www".into(),
            uid: 1,
            request: None,
            changes: vec![change(1, create(10, "a")), change(2, create(11, "b"))],
        };
        {
            let b = WriteBack::open(dir.path(), 64 << 20).unwrap();
            let mut st = b.st();
            for c in &batch.changes {
                st.overlay(c);
            }
            // Logged before the batch was sent: new content of `a` (not of `b`).
            st.overlay(&change(3, content(10, b"new", Some(0))));
            st.own_versions.extend([(10, 42), (11, 43)]);
            let own = st.own_record(&batch);
            let Some(Record::Own { until, versions }) = &own else {
                panic!("{own:?}")
            };
            assert_eq!((*until, versions.as_slice()), (3, &[(10, 42)][..]));
            drop(st);
            b.log.append(&own.unwrap()).unwrap();
            b.log.append(&Record::Done { last: 2 }).unwrap();
        }
        let b = WriteBack::open(dir.path(), 64 << 20).unwrap();
        assert_eq!(b.st().own_versions.get(&10), Some(&42), "taken up by the replay");
        assert_eq!(b.st().own_versions.get(&11), None);
        b.log.append(&Record::Done { last: 3 }).unwrap();
        drop(b);
        let b = WriteBack::open(dir.path(), 64 << 20).unwrap();
        assert!(b.st().own_versions.is_empty(), "no longer needed once change 3 settled");
    }

    /// A change by `uid` of `op` (in volume www).
    fn by(uid: u32, seq: u64, op: Op) -> Change {
        Change { uid, ..change(seq, op) }
    }

    /// A new node `ino` named `name` in directory `parent`.
    fn create_in(parent: u64, ino: u64, name: &str, kind: NodeKind) -> Op {
        let mut op = create(ino, name);
        if let Op::Create { parent: p, kind: k, .. } = &mut op {
            (*p, *k) = (parent, kind);
        }
        op
    }

    /// The next batch with the users `held` back, as the reintegrator picks it.
    fn pick(st: &BackState, held: impl Fn(u32) -> bool) -> Option<Batch> {
        st.next_batch(&held, &st.held_back_seqs(&held))
    }

    fn seqs(b: &Batch) -> Vec<u64> {
        b.changes.iter().map(|c| c.seq).collect()
    }

    /// Held-back users' changes are skipped, and so is every change touching a node one of
    /// them touches (transitively); batches sent before go first unless their user is held.
    #[test]
    fn a_held_users_changes_and_what_needs_them_are_skipped() {
        const A: u32 = 1000;
        const B: u32 = 1001;
        let mut st = BackState::default();
        st.queue.extend([
            by(A, 1, create_in(1, 40, "news", NodeKind::Dir)),
            by(B, 2, create_in(1, 50, "b.html", NodeKind::File)),
            by(B, 3, create_in(40, 51, "in-news.html", NodeKind::File)),
            by(B, 4, content(50, b"b", None)),
            by(B, 5, content(51, b"c", None)),
            by(A, 6, content(60, b"a", Some(2))),
            by(B, 7, content(61, b"d", Some(2))),
        ]);
        st.next_seq = 8;
        st.held.insert(
            A,
            Held {
                token: None,
                since: tokio::time::Instant::now(),
                why: "no token".into(),
            },
        );
        let none = |_: u32| false;
        let only_a = |uid: u32| uid == A;
        // Nobody held: in order, one user at a time.
        assert_eq!(seqs(&pick(&st, none).unwrap()), [1]);
        // A held: B's changes that need none of A's, across the skipped ones.
        let b = pick(&st, only_a).unwrap();
        assert_eq!((seqs(&b), b.uid, b.request), (vec![2, 4, 7], B, None));
        // A batch of A sent before is skipped while A is held, sent first once A is not.
        st.sent.push(Sent {
            uid: A,
            runs: vec![(1, 1)],
            request: [7; 16],
        });
        assert_eq!(seqs(&pick(&st, only_a).unwrap()), [2, 4, 7]);
        let again = pick(&st, none).unwrap();
        assert_eq!((seqs(&again), again.request), (vec![1], Some([7; 16])));
        // A batch of B sent before (ahead of A's) goes again first, with its request id.
        st.sent.push(Sent {
            uid: B,
            runs: runs_of([2, 4]),
            request: [8; 16],
        });
        let resent = pick(&st, only_a).unwrap();
        assert_eq!((seqs(&resent), resent.request), (vec![2, 4], Some([8; 16])));
        // Names: B taking a name A freed, or removing a directory A put a name in, waits;
        // B's new name in a directory where A made one does not.
        let remove = |name: &str, dir: u64| Op::Remove {
            parent: 1,
            name: name.into(),
            seen: Some(crate::core::types::Seen {
                ino: dir,
                version: 1,
                kind: NodeKind::Dir,
            }),
            expect: None,
        };
        let mut names = BackState::default();
        names.queue.extend([
            by(A, 1, remove("old", 70)),
            by(A, 2, create_in(80, 81, "x", NodeKind::File)),
            by(A, 3, create_in(85, 86, "x", NodeKind::File)),
            by(B, 4, create_in(1, 90, "old", NodeKind::File)),
            by(B, 5, remove("d", 80)),
            by(B, 6, create_in(85, 91, "y", NodeKind::File)),
        ]);
        names.next_seq = 7;
        names.held = st.held.clone();
        assert_eq!(seqs(&pick(&names, only_a).unwrap()), [6]);
        // Nothing left but held changes: no batch.
        st.sent.clear();
        st.queue.retain(|c| c.uid == A || c.seq == 3);
        assert!(pick(&st, only_a).is_none());
        assert_eq!(st.watermark(), 0);
    }

    /// The log's records of batches sent and settled ahead of held changes replay as they were:
    /// settled changes stay settled, a batch sent and not settled is sent again with its id.
    #[tokio::test]
    async fn batches_settled_ahead_of_held_changes_survive_a_replay() {
        let dir = tempfile::tempdir().unwrap();
        {
            let b = WriteBack::open(dir.path(), 64 << 20).unwrap();
            for c in [
                by(1000, 1, create(10, "a")),
                by(1001, 2, create(11, "b")),
                by(1000, 3, create(12, "c")),
                by(1001, 4, create(13, "d")),
                by(1001, 5, create(14, "e")),
            ] {
                b.log.append(&Record::Change(c)).unwrap();
            }
            for rec in [
                Record::Sending {
                    first: 1,
                    last: 1,
                    request: [1; 16],
                },
                Record::SendingRuns {
                    runs: runs_of([2, 4]),
                    request: [2; 16],
                },
                Record::Settled { runs: runs_of([2, 4]) },
                Record::SendingRuns {
                    runs: runs_of([5]),
                    request: [3; 16],
                },
            ] {
                b.log.append(&rec).unwrap();
            }
            let end = b.log.append(&Record::Done { last: 0 }).unwrap().end;
            b.log.sync(end).await.unwrap();
        }
        let b = WriteBack::open(dir.path(), 64 << 20).unwrap();
        {
            let st = b.st();
            let queued: Vec<u64> = st.queue.iter().map(|c| c.seq).collect();
            assert_eq!(queued, [1, 3, 5]);
            let sent: Vec<_> = st.sent.iter().map(|s| (s.uid, s.runs.clone(), s.request)).collect();
            assert_eq!(sent, [(1000, vec![(1, 1)], [1; 16]), (1001, vec![(5, 5)], [3; 16])]);
            assert_eq!((st.watermark(), st.next_seq), (0, 6));
            assert!(st.nodes.contains_key(&12) && !st.nodes.contains_key(&11));
        }
        // Once everything before is settled, `Done` covers the changes settled ahead too.
        b.log.append(&Record::Done { last: 5 }).unwrap();
        drop(b);
        let b = WriteBack::open(dir.path(), 64 << 20).unwrap();
        assert!(b.st().queue.is_empty() && b.st().sent.is_empty());
    }

    /// The version a logged content expects is settled in the same locked step as the append:
    /// a commit of the file by this mount that lands after `close` read the opened version but
    /// before the append is in the logged record, so a replay after a crash expects it too.
    #[tokio::test]
    async fn a_logged_content_expects_this_mounts_latest_commit_taken_at_the_append() {
        let dir = tempfile::tempdir().unwrap();
        {
            let b = WriteBack::open(dir.path(), 64 << 20).unwrap();
            b.st().own_versions.insert(10, 42);
            b.log_change("www", 1, content(10, b"new", Some(7)), None, false)
                .await
                .unwrap();
            b.log_change("www", 1, create(11, "b"), None, false).await.unwrap();
            b.log_change("www", 1, content(11, b"b", Some(3)), None, true)
                .await
                .unwrap();
        }
        let b = WriteBack::open(dir.path(), 64 << 20).unwrap();
        let expects: Vec<Option<u64>> = b
            .st()
            .queue
            .iter()
            .filter_map(|c| match &c.op {
                Op::SetContent { expect, .. } => Some(*expect),
                _ => None,
            })
            .collect();
        assert_eq!(
            expects,
            vec![Some(42), None],
            "own commit folded in; a file whose creation is unsent expects nothing"
        );
    }

    #[test]
    fn reserved_ids_are_handed_out_once_even_across_a_replay() {
        let mut st = BackState::default();
        st.pool.entry("www".into()).or_default().push_back((100, 103));
        st.take_id_used("www", 101);
        assert_eq!(st.take_id("www", 0), Some(102));
        assert_eq!(st.take_id("www", 0), None);
        assert!(conflict_name(&"x".repeat(255), "host").len() <= 255);
        assert!(conflict_name("index.html", "web1").starts_with("index.html.conflict-web1-"));
    }
}
