//! The write-back log: the durable record of changes made on a writable mount that the servers
//! have not confirmed yet (Coda's client modify log).
//!
//! `close` of a changed file returns once its change is in this log and the log is on disk; a
//! background reintegrator sends the logged changes to the servers in batches (see
//! `core/write/back.rs`). A daemon killed with -9, or a machine that lost power, finds the log at
//! the next mount and sends what is left, each batch exactly once: the id of a batch's commit is
//! logged before the batch is sent, and the servers answer a repeated id with its first outcome.
//!
//! On disk, in `CACHE/wblog/`: segments `seg-NNNNNNNNNN` (a magic line, then records, each
//! `[len u32][blake3 of the payload, 8 bytes][bincode payload]`) and `data/` (contents too large to
//! log inline, one fsynced file each). A segment is written full of zeros when it is made, so an
//! append overwrites blocks already allocated and its fsync flushes data alone (no size or extent
//! change to journal): about half the cost of an fsync after a plain append on ext4. The next
//! segment is made ahead by a background thread (`spare`), so a rotation costs a rename, not
//! 16 MiB written under the log's lock. A torn record at the end of the last segment (a crash in
//! the middle of an append) is cut off at replay: it was never acknowledged. A segment is deleted
//! once every change it names is done, so the log's size follows its backlog, and the whole log
//! (segments and data) stays within a configured bound: a change past it fails with ENOSPC.
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::core::remote::RequestId;
use crate::core::types::Op;

mod spare;
use spare::Spare;

/// First bytes of every segment: the format's name and version.
/// v4: a logged content over 4 MiB is named by its chunk manifest (`codafs_common::chunks`).
/// v5: `Record::Own`. A v4 segment holds none and reads as it is; a v4 build refuses a v5 one
/// (it could not read its records) instead of cutting it short.
/// v6: `Record::SendingRuns` and `Record::Settled` (batches sent ahead of changes held back for
/// a token). A v5 build refuses a v6 segment: it would take an unknown record for a torn tail
/// and cut the changes after it, and read a `Sending` of a batch sent ahead as covering the
/// held changes in its range.
/// v7: `Record::Pool` (the reserved node ids, carried past the release of the segments whose
/// `Reserved` records gave them). A v6 build refuses a v7 segment: it would cut the log at the
/// unknown record.
const MAGIC: &[u8] = b"codafs write-back log v7\n";
/// Older magic lines this build still reads (all the same length as [`MAGIC`]).
const READS: &[&[u8]] = &[
    MAGIC,
    b"codafs write-back log v6\n",
    b"codafs write-back log v5\n",
    b"codafs write-back log v4\n",
];
/// A new segment is started past this size (smaller in unit tests, which make many logs).
#[cfg(not(test))]
const SEGMENT_BYTES: u64 = 16 << 20;
#[cfg(test)]
const SEGMENT_BYTES: u64 = 1 << 20;
/// Largest record accepted at replay (contents above `INLINE_MAX` are data files).
const MAX_RECORD: u32 = 8 << 20;
/// Contents up to this size are logged inline; larger ones become data files.
pub const INLINE_MAX: usize = 1 << 20;

/// Log failures.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("write-back log {0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error(
        "the write-back log is full ({used} of {limit} bytes): changes wait for the servers; \
         see `codafs status` and raise --log-limit if this is routine"
    )]
    Full { used: u64, limit: u64 },
    #[error(
        "a file of {size} bytes is larger than the whole write-back log ({limit} bytes, \
         --log-limit), so it can never be logged: raise --log-limit above the file's size, or \
         write it through a --write-through mount (or `codafs upload`)"
    )]
    TooLarge { size: u64, limit: u64 },
    #[error("write-back log {0}: {1}")]
    Corrupt(PathBuf, String),
    #[error(
        "write-back log {0}: a flush to disk failed ({1}); it takes no more changes until the mount \
         restarts and replays what reached the disk"
    )]
    Failed(PathBuf, String),
}

/// The content of a logged file change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Content {
    /// Serialized as one byte string (bincode: its length, then the bytes, as a plain
    /// `Vec<u8>` is too), not byte by byte, which cost more than the log's fsync.
    Inline(#[serde(with = "serde_bytes")] Vec<u8>),
    /// A file in `data/`, by name.
    File(String),
    /// In memory only (never written): an inline content left in the log, by segment and
    /// record offset, so the backlog held in memory does not hold the bytes too.
    At { seg: u64, offset: u64 },
}

impl Content {
    /// This content as kept in memory once its record is at `seg`/`offset`.
    fn logged_at(self, seg: u64, offset: u64) -> Content {
        match self {
            Content::Inline(b) if !b.is_empty() => Content::At { seg, offset },
            other => other,
        }
    }
}

/// Where a record went.
#[derive(Debug, Clone, Copy)]
pub struct Appended {
    /// Log position after it (what [`Log::sync`] takes).
    pub end: u64,
    pub seg: u64,
    pub offset: u64,
}

impl Change {
    /// The change as the backlog keeps it in memory once logged at `seg`/`offset`.
    fn logged_at(mut self, seg: u64, offset: u64) -> Change {
        self.content = self.content.map(|x| x.logged_at(seg, offset));
        self
    }
}

impl Record {
    /// The record as the backlog keeps it in memory: an inline content replaced by where it is.
    fn in_memory(self, seg: u64, offset: u64) -> Record {
        match self {
            Record::Change(c) => Record::Change(c.logged_at(seg, offset)),
            other => other,
        }
    }
}

/// One change made on this mount.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub seq: u64,
    pub volume: String,
    /// The local user who made it: the change is sent with that user's token.
    pub uid: u32,
    pub op: Op,
    /// Content of a `Create` of a file or a `SetContent`.
    pub content: Option<Content>,
}

/// One log record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[allow(clippy::large_enum_variant)] // nearly every record is a Change
pub enum Record {
    Change(Change),
    /// Node ids the servers set aside for this mount: `first..first + count` of volume `volume`.
    Reserved {
        volume: String,
        first: u64,
        count: u32,
    },
    /// A batch about to be sent: exactly the changes `first..=last` (those not yet done), as
    /// the commit with id `request`.
    Sending {
        first: u64,
        last: u64,
        request: RequestId,
    },
    /// Every change up to `last` is settled: on the servers, or kept as a conflict copy.
    Done {
        last: u64,
    },
    /// Versions this mount's own commits gave nodes (`(ino, version)`) that changes logged
    /// before those commits still name: a replay needs them to tell its own earlier change
    /// from someone else's. Kept while any change up to `until` is unsettled.
    Own {
        until: u64,
        versions: Vec<(u64, u64)>,
    },
    /// A batch about to be sent that skips changes held back (their user has no valid token):
    /// exactly the changes in the inclusive ranges `runs` (those not yet done), as the commit
    /// with id `request`.
    SendingRuns {
        runs: Vec<(u64, u64)>,
        request: RequestId,
    },
    /// The changes in the inclusive ranges `runs` are settled, ahead of earlier changes held
    /// back. (`Done` covers them once everything before them is settled too.)
    Settled {
        runs: Vec<(u64, u64)>,
    },
    /// The node ids reserved and not handed out yet, per volume (ranges `next..end`), written
    /// before segments are released: the `Reserved` records that gave them may go with those
    /// segments. Replaces the whole pool at replay; later records change it as usual.
    Pool {
        pools: Vec<(String, Vec<(u64, u64)>)>,
    },
}

/// Consecutive numbers of `seqs` (ascending) as inclusive ranges.
pub fn runs_of(seqs: impl IntoIterator<Item = u64>) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for s in seqs {
        match runs.last_mut() {
            Some((_, end)) if *end + 1 == s => *end = s,
            _ => runs.push((s, s)),
        }
    }
    runs
}

/// Whether `seq` is in one of `runs`.
pub fn in_runs(runs: &[(u64, u64)], seq: u64) -> bool {
    runs.iter().any(|(a, b)| (*a..=*b).contains(&seq))
}

impl Record {
    /// The highest change sequence number this record names (0: none).
    fn names_seq(&self) -> u64 {
        match self {
            Record::Change(c) => c.seq,
            Record::Sending { last, .. } => *last,
            Record::Own { until, .. } => *until,
            // Kept until `Done` passes every change they name.
            Record::SendingRuns { runs, .. } | Record::Settled { runs } => runs.iter().map(|r| r.1).max().unwrap_or(0),
            _ => 0,
        }
    }
}

/// What a log held when it was opened.
#[derive(Debug, Default)]
pub struct Replay {
    /// Records in order, from every segment.
    pub records: Vec<Record>,
    /// Bytes of a torn record cut off the end.
    pub torn: u64,
    /// Damaged stretches skipped (records after them were read), each set aside in
    /// `lost+found`: what the operator is told about.
    pub damaged: Vec<Damage>,
}

/// A stretch of a segment whose records could not be read, with where its bytes were kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    pub offset: u64,
    pub bytes: u64,
    pub kept: PathBuf,
}

struct Segment {
    id: u64,
    /// The highest change seq any record in it names.
    max_seq: u64,
    /// Bytes of records (the next append goes there).
    bytes: u64,
    /// Bytes on disk (preallocated).
    disk: u64,
}

struct Inner {
    active: File,
    segments: Vec<Segment>,
    data_bytes: u64,
    /// Bytes appended (in all) and bytes known durable.
    appended: u64,
}

impl Inner {
    /// Bytes on disk: segments (preallocated, or larger) and data files.
    fn used(&self) -> u64 {
        self.segments.iter().map(|s| s.disk.max(s.bytes)).sum::<u64>() + self.data_bytes
    }
}

/// The write-back log of one cache directory.
pub struct Log {
    dir: PathBuf,
    limit: u64,
    inner: Mutex<Inner>,
    /// The next segment, made ahead of the rotation (see `spare`).
    spare: Spare,
    /// Bytes of the log known to be on disk; a sync covers everything appended before it.
    synced: tokio::sync::watch::Sender<u64>,
    sync_one: tokio::sync::Mutex<()>,
    /// Why a flush of a segment failed, once one has. Linux reports a failed writeback once
    /// per open file and then forgets it: a later fsync of the same segment can succeed
    /// although records it was to cover never reached the disk. So after one failure no
    /// flush is trusted again, and no append or sync succeeds until the next start replays
    /// what is on disk.
    failed: std::sync::OnceLock<String>,
    /// Tests: the next flush fails.
    #[cfg(test)]
    fail_next_flush: std::sync::atomic::AtomicBool,
}

fn io(p: &Path) -> impl FnOnce(std::io::Error) -> LogError + '_ {
    move |e| LogError::Io(p.to_path_buf(), e)
}

/// Makes the names in directory `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

/// Writes a new file in `DIR/lost+found` under `name` or the first free `name.N`, and makes it
/// and its name durable.
fn set_aside_in(
    log_dir: &Path,
    name: &str,
    fill: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> Result<PathBuf, LogError> {
    let dir = log_dir.join("lost+found");
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let mut made = None;
    for n in 0..10_000u32 {
        let path = if n == 0 {
            dir.join(name)
        } else {
            dir.join(format!("{name}.{n}"))
        };
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(f) => {
                made = Some((path, f));
                break;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(LogError::Io(path, e)),
        }
    }
    let (path, mut f) =
        made.ok_or_else(|| LogError::Corrupt(dir.clone(), format!("10,000 files named {name} are set aside already")))?;
    fill(&mut f).and_then(|()| f.sync_all()).map_err(io(&path))?;
    sync_dir(&dir)?;
    Ok(path)
}

/// Keeps `bytes` bytes of segment `path` (number `id`) from `offset` in `lost+found`, once:
/// a later replay finds the same damage and the copy already made.
/// A copy that cannot be made (the cache disk full, say) is logged and does not stop the mount.
fn keep_damaged(dir: &Path, path: &Path, id: u64, offset: u64, bytes: u64) -> Damage {
    let name = format!("damaged-{}-at-{offset}", seg_name(id));
    let kept = dir.join("lost+found").join(&name);
    if !kept.exists() {
        let copied = File::open(path).map_err(io(path)).and_then(|mut src| {
            std::io::Seek::seek(&mut src, std::io::SeekFrom::Start(offset)).map_err(io(path))?;
            set_aside_in(dir, &name, |f| std::io::copy(&mut src.take(bytes), f).map(drop))
        });
        match copied {
            Ok(_) => tracing::error!(
                segment = %path.display(),
                offset,
                bytes,
                kept = %kept.display(),
                "the write-back log has damaged bytes: the changes in them are lost, the bytes are kept"
            ),
            Err(e) => tracing::error!(
                segment = %path.display(),
                offset,
                bytes,
                error = %e,
                "the write-back log has damaged bytes: the changes in them are lost, and keeping a copy failed"
            ),
        }
    }
    Damage { offset, bytes, kept }
}

fn seg_name(id: u64) -> String {
    format!("seg-{id:010}")
}

impl Log {
    /// Opens (or creates) the log in `dir`, returning what it holds. `limit` bounds its bytes.
    pub fn open(dir: &Path, limit: u64) -> Result<(Log, Replay), LogError> {
        let data = dir.join("data");
        std::fs::create_dir_all(&data).map_err(io(&data))?;
        let mut ids: Vec<u64> = std::fs::read_dir(dir)
            .map_err(io(dir))?
            .filter_map(|e| e.ok()?.file_name().to_str()?.strip_prefix("seg-")?.parse().ok())
            .collect();
        ids.sort_unstable();
        let mut replay = Replay::default();
        let mut segments = Vec::new();
        let last_id = ids.last().copied();
        for id in ids {
            let path = dir.join(seg_name(id));
            let read = read_segment(&path)?;
            let records: Vec<Record> = read.records.into_iter().map(|(at, r)| r.in_memory(id, at)).collect();
            let (good, torn) = (read.good, read.torn);
            // A damaged record with a readable one after it is no torn append: the records after
            // it were acknowledged, so they are replayed, and the unreadable bytes are kept.
            for (offset, bytes) in read.damaged {
                replay.damaged.push(keep_damaged(dir, &path, id, offset, bytes));
            }
            if torn > 0 && Some(id) != last_id {
                // Its records end early, and later segments hold records that may need them.
                keep_damaged(dir, &path, id, good, torn);
                return Err(LogError::Corrupt(path, format!("a bad record at byte {good}")));
            } else if torn > 0 {
                tracing::warn!(segment = %path.display(), bytes = torn, "cut a torn record off the write-back log");
                // A torn append was never acknowledged; a damaged last record was. Which it was
                // cannot be told, so the bytes are kept before they are cut.
                keep_damaged(dir, &path, id, good, torn);
                let f = OpenOptions::new().write(true).open(&path).map_err(io(&path))?;
                f.set_len(good).map_err(io(&path))?;
                f.sync_all().map_err(io(&path))?;
                replay.torn = torn;
            }
            let max_seq = records.iter().map(Record::names_seq).max().unwrap_or(0);
            let disk = std::fs::metadata(&path).map_or(good, |m| m.len());
            segments.push(Segment {
                id,
                max_seq,
                bytes: good,
                disk,
            });
            replay.records.extend(records);
        }
        let data_bytes = dir_bytes(&data);
        let next = segments.last().map_or(1, |s| s.id + 1);
        let active = new_segment(dir, next)?;
        segments.push(Segment {
            id: next,
            max_seq: 0,
            bytes: MAGIC.len() as u64,
            disk: SEGMENT_BYTES,
        });
        let log = Log {
            dir: dir.to_path_buf(),
            limit,
            inner: Mutex::new(Inner {
                active,
                segments,
                data_bytes,
                appended: 0,
            }),
            synced: tokio::sync::watch::channel(0).0,
            sync_one: tokio::sync::Mutex::new(()),
            spare: Spare::new(dir),
            failed: std::sync::OnceLock::new(),
            #[cfg(test)]
            fail_next_flush: std::sync::atomic::AtomicBool::new(false),
        };
        Ok((log, replay))
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes the log holds (segments, the spare segment and data files).
    pub fn used(&self) -> u64 {
        self.used_with(&self.inner())
    }

    fn used_with(&self, g: &Inner) -> u64 {
        g.used() + if self.spare.exists() { SEGMENT_BYTES } else { 0 }
    }

    /// Rotations that took a segment made ahead (see `spare`).
    pub fn spares_used(&self) -> u64 {
        self.spare.used()
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Counts `size` bytes of a data file about to be written, if they fit within the bound:
    /// checked and counted under one lock, so closes writing at once cannot each pass the
    /// check and together pass the bound. [`Log::write_data_with`] settles the count when the
    /// file is written (or not).
    fn reserve(&self, size: u64) -> Result<(), LogError> {
        if size > self.limit {
            return Err(LogError::TooLarge {
                size,
                limit: self.limit,
            });
        }
        let mut g = self.inner();
        let used = self.used_with(&g);
        if used + size > self.limit {
            return Err(LogError::Full {
                used,
                limit: self.limit,
            });
        }
        g.data_bytes += size;
        Ok(())
    }

    /// Appends `rec` (not yet durable: see [`Log::sync`]). Changes must fit within the bound;
    /// bookkeeping records always go in.
    pub fn append(&self, rec: &Record) -> Result<Appended, LogError> {
        self.healthy()?;
        let payload = bincode::serialize(rec).map_err(|e| LogError::Corrupt(self.dir.clone(), e.to_string()))?;
        let mut frame = Vec::with_capacity(payload.len() + 12);
        frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        frame.extend_from_slice(&blake3::hash(&payload).as_bytes()[..8]);
        frame.extend_from_slice(&payload);
        let mut g = self.inner();
        if matches!(rec, Record::Change(_)) {
            // Disk the append adds: past the active segment's preallocation, or a new segment.
            // (A spare segment's bytes are counted already.)
            let growth = match g.segments.last() {
                Some(s) if s.bytes >= SEGMENT_BYTES && self.spare.exists() => 0,
                Some(s) if s.bytes >= SEGMENT_BYTES => SEGMENT_BYTES.max(frame.len() as u64),
                Some(s) => (s.bytes + frame.len() as u64).saturating_sub(s.disk),
                None => 0,
            };
            let used = self.used_with(&g);
            if used + growth > self.limit {
                return Err(LogError::Full {
                    used,
                    limit: self.limit,
                });
            }
        }
        let full = g.segments.last().is_some_and(|s| s.bytes >= SEGMENT_BYTES);
        if full {
            let id = g.segments.last().map_or(1, |s| s.id + 1);
            // What is written so far must be durable before records go elsewhere.
            self.flush(&g.active)?;
            let path = self.dir.join(seg_name(id));
            g.active = match self.spare.take_as(&path) {
                Some(made) => made.map_err(io(&path))?,
                None => new_segment(&self.dir, id)?,
            };
            g.segments.push(Segment {
                id,
                max_seq: 0,
                bytes: MAGIC.len() as u64,
                disk: SEGMENT_BYTES,
            });
        }
        let (seg, at) = g.segments.last().map_or((0, MAGIC.len() as u64), |s| (s.id, s.bytes));
        if let Err(e) = std::os::unix::fs::FileExt::write_all_at(&g.active, &frame, at) {
            let disk = g.segments.last().map_or(0, |s| s.disk);
            self.undo_partial(&g.active, at, frame.len() as u64, disk);
            return Err(io(&self.dir)(e));
        }
        g.appended += frame.len() as u64;
        let names = rec.names_seq();
        if let Some(s) = g.segments.last_mut() {
            s.bytes += frame.len() as u64;
            s.max_seq = s.max_seq.max(names);
        }
        // Half full: the next segment is made ahead, if the bound has room for it.
        let half = g.segments.last().is_some_and(|s| s.bytes > SEGMENT_BYTES / 2);
        if half && !self.spare.exists() && self.used_with(&g) + SEGMENT_BYTES <= self.limit {
            self.spare.prepare(segment_file);
        }
        Ok(Appended {
            end: g.appended,
            seg,
            offset: at,
        })
    }

    /// Takes back what a failed write of `len` bytes at `at` may have left (a cache disk full
    /// partway through): zeros over the segment's preallocated part, the file cut back to it
    /// past that. Left there, the bytes would read as a damaged record once later records moved
    /// past them, and a start refuses a segment with damage before its end. If that fails too,
    /// the log takes no more changes (as after a failed flush).
    fn undo_partial(&self, file: &std::fs::File, at: u64, len: u64, disk: u64) {
        let end = at.saturating_add(len);
        let zero_to = end.min(disk);
        let mut undone = Ok(());
        if zero_to > at {
            let zeros = vec![0u8; (zero_to - at) as usize];
            undone = std::os::unix::fs::FileExt::write_all_at(file, &zeros, at);
        }
        if undone.is_ok() && end > disk {
            undone = file.set_len(disk.max(at));
        }
        if let Err(e) = undone {
            tracing::error!(dir = %self.dir.display(), error = %e, "a failed append to the write-back log could not be taken back; it takes no more changes until the mount restarts");
            let _ = self.failed.set(format!("a failed append could not be taken back: {e}"));
        }
    }

    /// Appends `rec` and makes it durable at once (the fsync outside the log's lock, so
    /// appends go on meanwhile); returns the segment it went to. For bookkeeping that must be
    /// on disk before something else happens, rarely.
    fn append_durably(&self, rec: &Record) -> Result<u64, LogError> {
        let at = self.append(rec)?;
        // A rotation after the append synced the segment it went to already.
        let active = self.inner().active.try_clone().map_err(io(&self.dir))?;
        self.flush(&active)?;
        Ok(at.seg)
    }

    /// Fails once a flush has failed (see `failed`).
    fn healthy(&self) -> Result<(), LogError> {
        match self.failed.get() {
            Some(why) => Err(LogError::Failed(self.dir.clone(), why.clone())),
            None => Ok(()),
        }
    }

    /// `fdatasync` of a segment; a failure is remembered for good (see `failed`).
    fn flush(&self, segment: &File) -> Result<(), LogError> {
        self.healthy()?;
        #[cfg(test)]
        let injected = self.fail_next_flush.swap(false, std::sync::atomic::Ordering::SeqCst);
        #[cfg(not(test))]
        let injected = false;
        let r = if injected {
            Err(std::io::Error::other("injected flush failure"))
        } else {
            segment.sync_data()
        };
        r.map_err(|e| {
            tracing::error!(dir = %self.dir.display(), error = %e, "a flush of the write-back log failed; it takes no more changes until the mount restarts");
            let _ = self.failed.set(e.to_string());
            LogError::Io(self.dir.clone(), e)
        })
    }

    /// Appends a change; returns where it went and the change as the backlog keeps it in memory
    /// (its inline content left in the log).
    pub fn append_change(&self, c: Change) -> Result<(Appended, Change), LogError> {
        let rec = Record::Change(c);
        let at = self.append(&rec)?;
        match rec {
            Record::Change(c) => Ok((at, c.logged_at(at.seg, at.offset))),
            _ => Err(LogError::Corrupt(
                self.dir.clone(),
                "internal: a change changed kind".into(),
            )),
        }
    }

    /// Makes everything appended up to position `upto` durable. Concurrent callers share one
    /// fsync: whoever syncs covers everything appended before it started.
    pub async fn sync(&self, upto: u64) -> Result<(), LogError> {
        if *self.synced.borrow() >= upto {
            return Ok(());
        }
        let _one = self.sync_one.lock().await;
        if *self.synced.borrow() >= upto {
            return Ok(());
        }
        let (file, pos) = {
            let g = self.inner();
            (g.active.try_clone().map_err(io(&self.dir))?, g.appended)
        };
        // In place on the mount's multi-thread runtime (tokio moves the worker's other tasks
        // away meanwhile), not handed to a blocking thread and back: two thread switches less
        // per close.
        crate::blocking::blocking(u64::MAX, || self.flush(&file))?;
        self.synced.send_modify(|s| *s = (*s).max(pos));
        Ok(())
    }

    /// Writes a content too large to log inline as a durable data file; returns its name.
    pub fn write_data(&self, name: &str, bytes: &[u8]) -> Result<String, LogError> {
        self.write_data_with(name, bytes.len() as u64, |f| f.write_all(bytes))
    }

    /// Writes data file `name` (`size` bytes) with `fill`, durably; returns the name. For a
    /// large file's content, which is cut into chunks as it is copied in.
    pub fn write_data_with(
        &self,
        name: &str,
        size: u64,
        fill: impl FnOnce(&mut File) -> std::io::Result<()>,
    ) -> Result<String, LogError> {
        self.reserve(size)?;
        let dir = self.dir.join("data");
        let path = dir.join(name);
        let written = File::create(&path)
            .and_then(|mut f| {
                fill(&mut f)?;
                f.sync_all()?;
                f.metadata().map(|m| m.len())
            })
            .map_err(|e| LogError::Io(path.clone(), e))
            .and_then(|len| sync_dir(&dir).map(|()| len));
        // The reserved bytes become the file's real length (releasing it subtracts that), or
        // nothing when it was not made.
        {
            let mut g = self.inner();
            g.data_bytes = g.data_bytes.saturating_sub(size) + written.as_ref().map_or(0, |len| *len);
        }
        if written.is_err() {
            let _ = std::fs::remove_file(&path);
        }
        written.map(|_| name.to_string())
    }

    /// Renames data file `from` to `to` (a copy named once its content hash is known).
    pub fn rename_data(&self, from: &str, to: &str) -> Result<(), LogError> {
        let dir = self.dir.join("data");
        let dest = dir.join(to);
        std::fs::rename(dir.join(from), &dest).map_err(io(&dest))?;
        sync_dir(&dir)
    }

    /// The data file holding a logged content, when it is one (contents over 1 MiB): large
    /// contents are read from it piece by piece, never whole.
    pub fn data_path(&self, c: &Content) -> Option<PathBuf> {
        match c {
            Content::File(name) => Some(self.dir.join("data").join(name)),
            _ => None,
        }
    }

    /// Reads a logged content.
    pub fn read_content(&self, c: &Content) -> Result<Vec<u8>, LogError> {
        match c {
            Content::Inline(b) => Ok(b.clone()),
            Content::File(name) => {
                let path = self.dir.join("data").join(name);
                std::fs::read(&path).map_err(io(&path))
            }
            Content::At { seg, offset } => self.read_inline(*seg, *offset),
        }
    }

    /// The inline content of the change record at `offset` of segment `seg`.
    fn read_inline(&self, seg: u64, offset: u64) -> Result<Vec<u8>, LogError> {
        use std::os::unix::fs::FileExt;
        let path = self.dir.join(seg_name(seg));
        let f = File::open(&path).map_err(io(&path))?;
        let mut head = [0u8; 12];
        f.read_exact_at(&mut head, offset).map_err(io(&path))?;
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        let bad = |what: &str| LogError::Corrupt(path.clone(), format!("record at {offset}: {what}"));
        if len > MAX_RECORD {
            return Err(bad("too long"));
        }
        let mut payload = vec![0u8; len as usize];
        f.read_exact_at(&mut payload, offset + 12).map_err(io(&path))?;
        if blake3::hash(&payload).as_bytes()[..8] != head[4..12] {
            return Err(bad("checksum mismatch"));
        }
        match bincode::deserialize::<Record>(&payload) {
            Ok(Record::Change(Change {
                content: Some(Content::Inline(b)),
                ..
            })) => Ok(b),
            _ => Err(bad("not a change with inline content")),
        }
    }

    /// Keeps the content of a change the servers would not take at all in `lost+found/NAME`
    /// (next to the log, in the cache directory): a copy of logged data file `from`. Returns
    /// its path (see [`Log::keep_aside`]).
    pub fn keep_aside_file(&self, name: &str, from: &Path) -> Result<PathBuf, LogError> {
        let mut src = File::open(from).map_err(io(from))?;
        self.set_aside(name, |f| std::io::copy(&mut src, f).map(drop))
    }

    /// Keeps `bytes` in `lost+found/NAME`; returns its path. A name taken already gets `.1`,
    /// `.2`, … appended: a change's sequence number (part of the names callers give) starts
    /// again at 1 once the log has drained, and a copy kept earlier is never replaced.
    pub fn keep_aside(&self, name: &str, bytes: &[u8]) -> Result<PathBuf, LogError> {
        self.set_aside(name, |f| f.write_all(bytes))
    }

    /// Writes a new file in `lost+found` under `name` or the first free `name.N`, and makes it
    /// and its name durable.
    fn set_aside(&self, name: &str, fill: impl FnOnce(&mut File) -> std::io::Result<()>) -> Result<PathBuf, LogError> {
        set_aside_in(&self.dir, name, fill)
    }

    /// Deletes data files no change in `keep` names (leftovers of changes settled just before a
    /// crash). With `damaged` (the replay skipped damaged records), such a file may be the
    /// intact content of a change whose record was lost: it is moved to `lost+found` (as
    /// `unlogged-NAME`) instead, except half-written `incoming-*` copies. Returns how many were.
    pub fn keep_only_data(&self, keep: &std::collections::HashSet<String>, damaged: bool) -> usize {
        let dir = self.dir.join("data");
        let Ok(it) = std::fs::read_dir(&dir) else { return 0 };
        let mut kept = 0;
        let mut g = self.inner();
        for e in it.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if keep.contains(&name) {
                continue;
            }
            if damaged && !name.starts_with("incoming-") {
                match self.keep_aside_file(&format!("unlogged-{name}"), &e.path()) {
                    Ok(_) => kept += 1,
                    Err(err) => {
                        // Not deleted either: it stays counted, and is looked at again next start.
                        tracing::error!(file = %e.path().display(), error = %err, "a data file of the damaged write-back log could not be set aside");
                        continue;
                    }
                }
            }
            let len = e.metadata().map_or(0, |m| m.len());
            if std::fs::remove_file(e.path()).is_ok() {
                g.data_bytes = g.data_bytes.saturating_sub(len);
            }
        }
        kept
    }

    /// Forgets what changes up to `done` needed: segments naming nothing newer, and the data
    /// files `data` (contents of those changes). For tests: the mount releases through
    /// [`Log::release_keeping`], which carries the id pool, and [`Log::release_data`].
    #[cfg(test)]
    pub fn release(&self, done: u64, data: &[String]) {
        self.release_keeping(done, data, || None, |_, _, _| false);
    }

    /// [`Log::release`], offering each data file to `moved(name, path, len)` first: a `true`
    /// answer means it moved the file away (into the blob cache) and the log no longer counts it.
    /// Before any segment goes, the record `carry()` gives (state that records in those
    /// segments built up, such as the pool of node ids) is appended and made durable; if that
    /// fails, the segments stay.
    pub fn release_keeping(
        &self,
        done: u64,
        data: &[String],
        carry: impl FnOnce() -> Option<Record>,
        moved: impl FnMut(&str, &Path, u64) -> bool,
    ) {
        // `carry` is called without the log's lock: it takes the caller's state lock, under
        // which changes are appended (the other order would deadlock). The segment the carried
        // record went to, and every newer one, stay (a rotation may follow the check).
        let mut upto = 0;
        if releasable(&self.inner(), done, u64::MAX) > 0 {
            upto = match carry() {
                Some(rec) => match self.append_durably(&rec) {
                    Ok(seg) => seg,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot carry state past old write-back log segments; they stay");
                        0
                    }
                },
                None => u64::MAX,
            };
        }
        let mut g = self.inner();
        let n = releasable(&g, done, upto);
        let gone: Vec<Segment> = g.segments.drain(..n).collect();
        for s in gone {
            let _ = std::fs::remove_file(self.dir.join(seg_name(s.id)));
        }
        self.release_data_locked(&mut g, data, moved);
    }

    /// Deletes the data files `data` (a content that never made it into a change), and no
    /// segment.
    pub fn release_data(&self, data: &[String]) {
        self.release_data_locked(&mut self.inner(), data, |_, _, _| false);
    }

    fn release_data_locked(&self, g: &mut Inner, data: &[String], mut moved: impl FnMut(&str, &Path, u64) -> bool) {
        for name in data {
            let path = self.dir.join("data").join(name);
            let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            if moved(name, &path, len) || std::fs::remove_file(&path).is_ok() {
                g.data_bytes = g.data_bytes.saturating_sub(len);
            }
        }
    }
}

/// How many segments, oldest first, [`Log::release_keeping`] may delete once changes up to
/// `done` are settled: only while every older one goes too (the records that settle a
/// segment's changes, `Done` and `Settled`, are in it or in newer segments, which must outlive
/// it; a newer segment holding only such records names no change itself), never the active one.
/// Only segments older than `before` count.
fn releasable(g: &Inner, done: u64, before: u64) -> usize {
    let active = g.segments.last().map(|s| s.id);
    g.segments
        .iter()
        .take_while(|s| Some(s.id) != active && s.id < before && s.max_seq <= done)
        .count()
}

fn new_segment(dir: &Path, id: u64) -> Result<File, LogError> {
    let path = dir.join(seg_name(id));
    let f = segment_file(&path).map_err(io(&path))?;
    sync_dir(dir)?;
    Ok(f)
}

/// Writes an empty segment at `path`, durably: the magic line, then zeros to the segment's
/// size (see the module doc; a zero tail reads as the end of records).
fn segment_file(path: &Path) -> std::io::Result<File> {
    let mut f = OpenOptions::new().create(true).truncate(true).write(true).open(path)?;
    f.write_all(MAGIC)?;
    let zeros = vec![0u8; 1 << 20];
    let mut left = SEGMENT_BYTES - MAGIC.len() as u64;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        f.write_all(&zeros[..n])?;
        left -= n as u64;
    }
    f.sync_all()?;
    Ok(f)
}

/// What [`read_segment`] found.
struct SegmentRead {
    /// Records with their offsets.
    records: Vec<(u64, Record)>,
    /// Where the last readable record ends.
    good: u64,
    /// Bytes after `good` that are not the zeroed rest (a torn or damaged end).
    torn: u64,
    /// Unreadable stretches with readable records after them: (offset, length).
    damaged: Vec<(u64, u64)>,
}

/// Reads one segment. Past an unreadable record whose length field still holds (a damaged
/// payload or hash), reading goes on at the record that length points at, if that one checks
/// out and the damaged record shows no page that never reached the disk (see [`next_record`]).
/// Anything else ends the segment's readable records: no search for a later record, since a
/// file's content logged inline could hold bytes that read as one.
fn read_segment(path: &Path) -> Result<SegmentRead, LogError> {
    let mut buf = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut buf))
        .map_err(io(path))?;
    if buf.len() < MAGIC.len() {
        // Created but its magic never reached the disk: an empty segment.
        return Ok(SegmentRead {
            records: Vec::new(),
            good: 0,
            torn: buf.len() as u64,
            damaged: Vec::new(),
        });
    }
    if !READS.contains(&&buf[..MAGIC.len()]) {
        let why = if buf.starts_with(b"codafs write-back log v") {
            "written by another version of codafs: mount with that version until `codafs sync` \
             has sent its changes, then upgrade (remove the cache directory only if its changes \
             may be lost)"
        } else {
            "not a codafs write-back log (remove the cache directory only if its changes may be lost)"
        };
        return Err(LogError::Corrupt(path.to_path_buf(), why.into()));
    }
    let mut records = Vec::new();
    let mut damaged = Vec::new();
    let mut at = MAGIC.len();
    let mut good = at;
    while at + 12 <= buf.len() {
        let (start, rec, end) = match record_at(&buf, at) {
            Some((rec, end)) => (at, rec, end),
            None => {
                let Some((next, rec, end)) = next_record(&buf, at) else {
                    break;
                };
                damaged.push((at as u64, (next - at) as u64));
                (next, rec, end)
            }
        };
        records.push((start as u64, rec));
        at = end;
        good = at;
    }
    // The unused, zeroed rest of a preallocated segment is no torn record.
    let rest = &buf[good..];
    let torn = if rest.iter().all(|b| *b == 0) {
        0
    } else {
        rest.len() as u64
    };
    Ok(SegmentRead {
        records,
        good: good as u64,
        torn,
        damaged,
    })
}

/// The record at `at` and where it ends, if it checks out.
fn record_at(buf: &[u8], at: usize) -> Option<(Record, usize)> {
    let head = buf.get(at..at + 12)?;
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    if len == 0 || len > MAX_RECORD {
        return None;
    }
    let payload = buf.get(at + 12..at + 12 + len as usize)?;
    if blake3::hash(payload).as_bytes()[..8] != head[4..12] {
        return None;
    }
    let rec = bincode::deserialize::<Record>(payload).ok()?;
    Some((rec, at + 12 + len as usize))
}

/// The record after the unreadable one at `bad` (where it starts, it, and where it ends), if
/// the damaged record's length field holds and the damage is no write lost in a crash. Appends are made durable in batches, and a crash can
/// leave a later page of the segment written and an earlier one not (it reads as zeros, the
/// segment being preallocated): a record after such a page was never acknowledged, and
/// replaying it without the ones before would apply changes out of order. So a damaged record
/// that spans an all-zero page ends the segment instead.
fn next_record(buf: &[u8], bad: usize) -> Option<(usize, Record, usize)> {
    const PAGE: usize = 4096;
    let len = u32::from_le_bytes(buf.get(bad..bad + 4)?.try_into().ok()?) as usize;
    let after = bad + 12 + len;
    if len == 0 || len > MAX_RECORD as usize || after >= buf.len() {
        return None;
    }
    let lost_page = (bad / PAGE..after.div_ceil(PAGE))
        .any(|p| buf[p * PAGE..((p + 1) * PAGE).min(buf.len())].iter().all(|b| *b == 0));
    if lost_page {
        return None;
    }
    record_at(buf, after).map(|(rec, end)| (after, rec, end))
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|it| it.filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.len()).sum())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use codafs_common::Hash;

    fn change(seq: u64, bytes: &[u8]) -> Record {
        Record::Change(Change {
            seq,
            volume: "www".into(),
            uid: 1000,
            op: Op::SetContent {
                expect: Some(3),
                ino: 7,
                hash: Hash::of(bytes),
                size: bytes.len() as u64,
                mtime_ns: 5,
            },
            content: Some(Content::Inline(bytes.to_vec())),
        })
    }

    #[test]
    fn inline_content_keeps_the_log_format() {
        // The variant's index, the length as a u64, the bytes: what logs written before
        // `Inline` was a byte string hold, so they replay unchanged.
        let bytes = bincode::serialize(&Content::Inline(vec![7, 8, 9])).unwrap();
        assert_eq!(bytes, [0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 7, 8, 9]);
        let back: Content = bincode::deserialize(&bytes).unwrap();
        assert_eq!(back, Content::Inline(vec![7, 8, 9]));
    }

    /// Replayed records with their contents read back from the log.
    fn inline(log: &Log, records: Vec<Record>) -> Vec<Record> {
        records
            .into_iter()
            .map(|r| match r {
                Record::Change(mut c) => {
                    if let Some(x) = &c.content {
                        c.content = Some(Content::Inline(log.read_content(x).unwrap()));
                    }
                    Record::Change(c)
                }
                other => other,
            })
            .collect()
    }

    #[tokio::test]
    async fn records_survive_a_reopen_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let (log, replay) = Log::open(dir.path(), 1 << 30).unwrap();
        assert!(replay.records.is_empty());
        let recs = vec![
            change(1, b"one"),
            Record::Reserved {
                volume: "www".into(),
                first: 100,
                count: 64,
            },
            Record::Sending {
                first: 1,
                last: 1,
                request: [9; 16],
            },
            Record::Done { last: 1 },
            change(2, b"two"),
        ];
        let mut pos = 0;
        for r in &recs {
            pos = log.append(r).unwrap().end;
        }
        log.sync(pos).await.unwrap();
        drop(log);
        // A crash in the middle of the next append: half a record after the last one.
        let seg = dir.path().join(seg_name(1));
        let bytes = std::fs::read(&seg).unwrap();
        let end = bytes.iter().rposition(|b| *b != 0).unwrap() + 1;
        let f = OpenOptions::new().write(true).open(&seg).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[40, 0, 0, 0, 1, 2, 3], end as u64).unwrap();
        let (log, replay) = Log::open(dir.path(), 1 << 30).unwrap();
        assert!(
            matches!(
                &replay.records[0],
                Record::Change(Change {
                    content: Some(Content::At { .. }),
                    ..
                })
            ),
            "the backlog in memory does not hold the bytes"
        );
        assert_eq!(inline(&log, replay.records), recs);
        assert!(replay.torn >= 7);
        // The cut is durable: the next open finds the same records and nothing torn.
        drop(log);
        let (log, replay) = Log::open(dir.path(), 1 << 30).unwrap();
        assert_eq!(inline(&log, replay.records), recs);
        assert_eq!(replay.torn, 0);
    }

    #[tokio::test]
    async fn a_flipped_byte_ends_the_replay_there() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = Log::open(dir.path(), 1 << 30).unwrap();
        log.append(&change(1, b"kept")).unwrap();
        let pos = log.append(&change(2, b"damaged")).unwrap().end;
        log.sync(pos).await.unwrap();
        drop(log);
        let seg = dir.path().join(seg_name(1));
        let mut bytes = std::fs::read(&seg).unwrap();
        let n = bytes.iter().rposition(|b| *b != 0).unwrap() + 1;
        bytes[n - 2] ^= 0xff;
        std::fs::write(&seg, bytes).unwrap();
        let (log, replay) = Log::open(dir.path(), 1 << 30).unwrap();
        assert_eq!(inline(&log, replay.records), vec![change(1, b"kept")]);
        assert!(replay.torn > 0);
    }

    /// Writes `recs` to a new log in `dir` (synced) and returns where each record starts in
    /// its segment.
    async fn written(dir: &Path, recs: &[Record]) -> Vec<usize> {
        let (log, _) = Log::open(dir, 1 << 30).unwrap();
        let mut starts = Vec::new();
        let mut pos = 0;
        for r in recs {
            let at = log.append(r).unwrap();
            starts.push(at.offset as usize);
            pos = at.end;
        }
        log.sync(pos).await.unwrap();
        starts
    }

    #[tokio::test]
    async fn records_after_a_damaged_one_are_replayed_and_its_bytes_kept() {
        for damage_length in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let recs = vec![change(1, b"one"), change(2, b"two, damaged"), change(3, b"three")];
            let starts = written(dir.path(), &recs).await;
            let seg = dir.path().join(seg_name(1));
            let mut bytes = std::fs::read(&seg).unwrap();
            // A flipped byte in the second record's payload: its length still leads to the
            // third. In its length field: nothing can be trusted after it (a search could take
            // a file's logged content for records), so the log is cut there.
            let at = if damage_length { starts[1] + 1 } else { starts[1] + 20 };
            bytes[at] ^= 0x5a;
            std::fs::write(&seg, &bytes).unwrap();
            let (log, replay) = Log::open(dir.path(), 1 << 30).unwrap();
            let records = inline(&log, replay.records);
            if damage_length {
                assert_eq!(records, vec![change(1, b"one")]);
                assert!(replay.torn > 0 && replay.damaged.is_empty());
                let kept = std::fs::read_dir(dir.path().join("lost+found")).unwrap().count();
                assert_eq!(kept, 1, "the cut bytes are kept");
                continue;
            }
            assert_eq!(records, vec![change(1, b"one"), change(3, b"three")]);
            assert_eq!(replay.torn, 0, "nothing cut");
            let [d] = replay.damaged.as_slice() else {
                panic!("{:?}", replay.damaged)
            };
            assert_eq!((d.offset, d.bytes), (starts[1] as u64, (starts[2] - starts[1]) as u64));
            assert_eq!(std::fs::read(&d.kept).unwrap(), bytes[starts[1]..starts[2]]);
            // The next start finds the same, and keeps no second copy.
            drop(log);
            let (log, replay) = Log::open(dir.path(), 1 << 30).unwrap();
            assert_eq!(inline(&log, replay.records).len(), 2);
            assert_eq!(replay.damaged.len(), 1);
            let kept = std::fs::read_dir(dir.path().join("lost+found")).unwrap().count();
            assert_eq!(kept, 1);
        }
    }

    #[tokio::test]
    async fn damage_in_an_older_segment_skips_one_record_but_a_lost_page_ends_the_log() {
        // Records of 300 KiB: the fourth starts the second segment (1 MiB in tests).
        let big = |seq, fill| change(seq, &vec![fill; 300 << 10]);
        let recs: Vec<Record> = (1..=5).map(|i| big(i, i as u8)).collect();
        let seqs = |log: &Log, replay: Replay| -> Vec<u64> {
            inline(log, replay.records)
                .iter()
                .map(|r| match r {
                    Record::Change(c) => c.seq,
                    other => panic!("{other:?}"),
                })
                .collect()
        };
        for lost_page in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let starts = written(dir.path(), &recs).await;
            assert!(dir.path().join(seg_name(2)).exists(), "the log rotated");
            let seg = dir.path().join(seg_name(1));
            let mut bytes = std::fs::read(&seg).unwrap();
            if lost_page {
                // A page of the second record that never reached the disk (a crash): the records
                // after it were not acknowledged either, and are not replayed out of order.
                let page = (starts[1] / 4096 + 2) * 4096;
                bytes[page..page + 4096].fill(0);
            } else {
                bytes[starts[1] + 100] ^= 1;
            }
            std::fs::write(&seg, &bytes).unwrap();
            if lost_page {
                let Err(e) = Log::open(dir.path(), 1 << 30) else {
                    panic!("an older segment ending early opened")
                };
                assert!(e.to_string().contains("bad record"), "{e}");
                continue;
            }
            let (log, replay) = Log::open(dir.path(), 1 << 30).unwrap();
            assert_eq!(replay.damaged.len(), 1);
            assert!(replay.damaged[0].kept.exists());
            assert_eq!(
                seqs(&log, replay),
                [1, 3, 4, 5],
                "the second is lost, the rest replayed"
            );
        }
    }

    /// A write that failed partway (the cache disk full) is taken back: zeros where the
    /// segment was preallocated, nothing past it. Left there, its bytes read as damage once
    /// later records moved past them, and the next start refused the log.
    #[test]
    fn a_failed_append_leaves_no_bytes_behind() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = Log::open(dir.path(), 1 << 30).unwrap();
        let path = dir.path().join("segment");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.set_len(100).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[7u8; 30], 90).unwrap();
        log.undo_partial(&f, 90, 40, 100);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 100, "cut back to the preallocated length");
        assert!(bytes.iter().all(|b| *b == 0), "{bytes:?}");
        // Past the preallocation already: cut back to where the write began.
        std::os::unix::fs::FileExt::write_all_at(&f, &[7u8; 30], 120).unwrap();
        log.undo_partial(&f, 110, 60, 100);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 110);
        assert!(log.healthy().is_ok(), "taken back: the log goes on");
    }

    /// Data files no change names are deleted at start, but after a replay that skipped
    /// damaged records such a file may be the intact content of a lost record: it is kept.
    #[test]
    fn unnamed_data_files_are_kept_aside_only_after_damage() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = Log::open(dir.path(), 1 << 30).unwrap();
        for name in ["named", "settled", "incoming-1"] {
            log.write_data(name, name.as_bytes()).unwrap();
        }
        let keep: std::collections::HashSet<String> = ["named".to_string()].into();
        let lost = dir.path().join("lost+found");
        assert_eq!(log.keep_only_data(&keep, true), 1);
        assert_eq!(std::fs::read(lost.join("unlogged-settled")).unwrap(), b"settled");
        assert!(
            !lost.join("unlogged-incoming-1").exists(),
            "half-written copies are not kept"
        );
        let data: Vec<String> = std::fs::read_dir(dir.path().join("data"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(data, ["named"]);
        log.write_data("settled-2", b"x").unwrap();
        assert_eq!(log.keep_only_data(&keep, false), 0);
        assert!(!dir.path().join("data/settled-2").exists());
        assert!(!lost.join("unlogged-settled-2").exists());
    }

    #[test]
    fn a_name_set_aside_twice_keeps_both_copies() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = Log::open(dir.path(), 1 << 30).unwrap();
        let first = log.keep_aside("www-1-index.html", b"first").unwrap();
        let data = dir.path().join("data").join("big");
        std::fs::write(&data, b"second").unwrap();
        let second = log.keep_aside_file("www-1-index.html", &data).unwrap();
        let third = log.keep_aside("www-1-index.html", b"third").unwrap();
        assert_eq!(std::fs::read(&first).unwrap(), b"first");
        assert_eq!(std::fs::read(&second).unwrap(), b"second");
        assert_eq!(std::fs::read(&third).unwrap(), b"third");
        assert!(second.ends_with("lost+found/www-1-index.html.1"), "{second:?}");
        assert!(third.ends_with("lost+found/www-1-index.html.2"), "{third:?}");
    }

    #[tokio::test]
    async fn after_a_failed_flush_no_sync_or_append_succeeds_until_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = Log::open(dir.path(), 1 << 30).unwrap();
        let first = log.append(&change(1, b"durable")).unwrap().end;
        log.sync(first).await.unwrap();
        let pos = log.append(&change(2, b"lost in the failed flush")).unwrap().end;
        log.fail_next_flush.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(matches!(log.sync(pos).await, Err(LogError::Io(..))));
        // The kernel would now report success for the same file: the log does not.
        let err = log.sync(pos).await.unwrap_err();
        assert!(matches!(err, LogError::Failed(..)), "{err}");
        assert!(err.to_string().contains("restarts"), "{err}");
        assert!(matches!(log.append(&change(3, b"later")), Err(LogError::Failed(..))));
        assert!(matches!(
            log.append_durably(&Record::Done { last: 1 }),
            Err(LogError::Failed(..))
        ));
        // What was synced before stays synced.
        log.sync(first).await.unwrap();
        drop(log);
        // The next start replays what reached the disk and takes changes again.
        let (log, replay) = Log::open(dir.path(), 1 << 30).unwrap();
        assert_eq!(inline(&log, replay.records)[0], change(1, b"durable"));
        let pos = log.append(&change(4, b"after the restart")).unwrap().end;
        log.sync(pos).await.unwrap();
    }

    #[test]
    fn the_bound_refuses_changes_but_not_bookkeeping() {
        let dir = tempfile::tempdir().unwrap();
        // One preallocated segment: changes fill it, the next needs another and is refused.
        let (log, _) = Log::open(dir.path(), SEGMENT_BYTES).unwrap();
        let mb = vec![1u8; (SEGMENT_BYTES / 16) as usize];
        for seq in 1..=15 {
            log.append(&change(seq, &mb)).unwrap();
        }
        let err = (16..=17)
            .try_for_each(|seq| log.append(&change(seq, &mb)).map(drop))
            .unwrap_err();
        assert!(matches!(err, LogError::Full { .. }), "{err}");
        assert!(err.to_string().contains("--log-limit"));
        log.append(&Record::Done { last: 1 }).unwrap();
        assert!(log.write_data("big", &[0; 300]).is_err(), "data files count too");
    }

    /// A segment an older build wrote (v5: no `SendingRuns` or `Settled`; v4: no `Own`
    /// records either) is read as it is.
    #[test]
    fn a_segment_of_the_previous_format_is_read() {
        for old in &READS[1..] {
            let dir = tempfile::tempdir().unwrap();
            {
                let (log, _) = Log::open(dir.path(), 1 << 30).unwrap();
                log.append(&change(1, b"old")).unwrap();
                log.inner().active.sync_all().unwrap();
            }
            let seg = dir.path().join(seg_name(1));
            let mut bytes = std::fs::read(&seg).unwrap();
            bytes[..MAGIC.len()].copy_from_slice(old);
            std::fs::write(&seg, bytes).unwrap();
            let (_, replay) = Log::open(dir.path(), 1 << 30).unwrap();
            assert_eq!(
                replay.records.iter().map(Record::names_seq).collect::<Vec<_>>(),
                vec![1]
            );
        }
    }

    /// Past half a segment, the next one is made ahead and the rotation takes it; the records
    /// replay in order across both. A spare left by a stopped daemon is removed at open.
    #[test]
    fn a_rotation_takes_the_segment_made_ahead_and_an_open_removes_a_leftover() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path()).unwrap();
        std::fs::write(dir.path().join("spare-1-0"), b"left by a daemon that stopped").unwrap();
        let (log, _) = Log::open(dir.path(), 1 << 40).unwrap();
        assert!(!dir.path().join("spare-1-0").exists(), "a leftover spare is removed");
        let big = vec![7u8; (SEGMENT_BYTES / 16) as usize];
        for seq in 1..=9 {
            log.append(&change(seq, &big)).unwrap();
        }
        for _ in 0..1000 {
            if log.spare.is_ready() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(log.spare.is_ready(), "made ahead past half a segment");
        assert!(log.used() >= 2 * SEGMENT_BYTES, "the spare counts toward the bound");
        for seq in 10..=20 {
            log.append(&change(seq, &big)).unwrap();
        }
        assert_eq!(log.spares_used(), 1);
        drop(log);
        let (log, replay) = Log::open(dir.path(), 1 << 40).unwrap();
        let seqs: Vec<u64> = replay.records.iter().map(Record::names_seq).collect();
        assert_eq!(seqs, (1..=20).collect::<Vec<u64>>());
        assert_eq!(log.spares_used(), 0);
    }

    /// The record `carry` gives is written before old segments go and outlives them, and
    /// `carry` runs without the log's lock: the caller's carry takes its state lock, under which
    /// changes are appended, so calling it under the log's lock deadlocked a busy mount (here
    /// the carry touches the log itself, which then deadlocked at once). Bounded in time.
    #[test]
    fn a_carried_record_outlives_the_segments_released_and_carry_runs_unlocked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let (log, _) = Log::open(&path, 1 << 40).unwrap();
            let big = vec![7u8; (SEGMENT_BYTES / 16) as usize];
            for seq in 1..=20 {
                log.append(&change(seq, &big)).unwrap();
            }
            let pool = Record::Pool {
                pools: vec![("www".into(), vec![(100, 200)])],
            };
            log.release_keeping(
                20,
                &[],
                || {
                    let _ = log.used();
                    Some(pool.clone())
                },
                |_, _, _| false,
            );
            // Nothing to release now: no carry is written.
            log.release_keeping(20, &[], || panic!("no segment goes"), |_, _, _| false);
            drop(log);
            let (_, replay) = Log::open(&path, 1 << 40).unwrap();
            let _ = done.send(replay.records);
        });
        let records = finished
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("release_keeping returned (no deadlock, no panic)");
        let changes = records.iter().filter(|r| matches!(r, Record::Change(_))).count();
        assert!(changes < 20, "the first segment went ({changes} changes left)");
        assert!(
            records
                .iter()
                .any(|r| matches!(r, Record::Pool { pools } if pools[0].1 == [(100, 200)])),
            "the carried pool is kept: {records:?}"
        );
    }

    #[test]
    fn segments_go_once_every_change_they_name_is_done() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = Log::open(dir.path(), 1 << 40).unwrap();
        let big = vec![7u8; (SEGMENT_BYTES / 16) as usize];
        for seq in 1..=20 {
            log.append(&change(seq, &big)).unwrap();
        }
        let segs = |d: &Path| {
            std::fs::read_dir(d)
                .unwrap()
                .filter(|e| e.as_ref().unwrap().file_name().to_str().unwrap().starts_with("seg-"))
                .count()
        };
        assert_eq!(segs(dir.path()), 2, "rotated past SEGMENT_BYTES");
        let before = log.used();
        log.release(10, &[]);
        assert_eq!(segs(dir.path()), 2, "the first segment still names changes 11..=16");
        log.release(20, &[]);
        assert_eq!(segs(dir.path()), 1, "only the active segment is left");
        assert!(log.used() < before);
        let name = log.write_data("c1", b"large content").unwrap();
        assert_eq!(
            log.read_content(&Content::File(name.clone())).unwrap(),
            b"large content"
        );
        log.release(20, &[name]);
        assert!(!dir.path().join("data/c1").exists());
        // A segment holding only the `Done` of changes in an older segment that must stay (it
        // names an unsettled change too) stays with it.
        let (log, _) = {
            drop(log);
            Log::open(dir.path(), 1 << 40).unwrap()
        };
        // Sixteen changes fill a segment: the done record goes to a segment of its own.
        for seq in 21..=36 {
            log.append(&change(seq, &big)).unwrap();
        }
        log.append(&Record::Done { last: 35 }).unwrap();
        let (log, replay) = {
            drop(log);
            Log::open(dir.path(), 1 << 40).unwrap()
        };
        assert!(replay.records.contains(&Record::Done { last: 35 }));
        log.release(35, &[]);
        let (_log, replay) = {
            drop(log);
            Log::open(dir.path(), 1 << 40).unwrap()
        };
        assert!(
            replay.records.contains(&Record::Done { last: 35 }),
            "the record settling changes 21..=35 outlives the segment holding them"
        );
    }
}
