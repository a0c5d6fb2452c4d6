//! `codafs upload`: publish a local tree into a volume as one atomic commit.
//!
//! 1. Scan the local tree and hash its files in parallel.
//! 2. Walk the remote subtree and diff: directories to create, files whose content or mode
//!    changed, symlinks, and (with `--delete`) what is gone locally.
//! 3. Ask every data replica which blobs it lacks (in batches), upload only those, in parallel.
//! 4. Commit every change as one batch: readers see the old tree or the new one. Changed objects
//!    carry the version they were diffed against, so a concurrent change makes the commit fail
//!    (and change nothing) instead of being overwritten. Re-running after an interruption uploads
//!    only what is still missing.
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use codafs_common::names::validate_name;
use codafs_common::Hash;
use codafs_proto::error::ErrorKind;
use codafs_proto::pb;
use futures::StreamExt;

use crate::ops;
use crate::transport::{ClientError, Cluster};

/// Upload failures, one line each.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("{0}: {1}")]
    Local(PathBuf, std::io::Error),
    #[error("{0}: {1}")]
    BadName(PathBuf, String),
    #[error("{0}")]
    Server(#[from] ClientError),
    #[error("the volume changed during the upload ({0}); run the upload again")]
    Conflict(String),
    #[error("{0}")]
    Other(String),
}

/// A local entry.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Local {
    Dir {
        mode: u32,
    },
    File {
        path: PathBuf,
        size: u64,
        mode: u32,
        hash: Hash,
    },
    Symlink {
        target: String,
    },
}

/// A remote entry.
#[derive(Debug, Clone)]
struct Remote {
    kind: i32,
    mode: u32,
    hash: Vec<u8>,
    symlink: String,
    version: u64,
}

/// What an upload would do / did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    pub created: usize,
    pub updated: usize,
    pub removed: usize,
    pub unchanged: usize,
    /// Blobs (and their bytes) that had to be sent.
    pub uploaded_blobs: usize,
    pub uploaded_bytes: u64,
    pub files: usize,
    pub bytes: u64,
    /// The volume's version after the commit (0 for a dry run or when nothing changed).
    pub version: u64,
}

/// Progress callbacks (the CLI draws a bar from them).
pub trait Progress: Send + Sync {
    fn planned(&self, _blobs: usize, _bytes: u64) {}
    fn uploaded(&self, _bytes: u64) {}
}

impl Progress for () {}

/// Options of one upload.
#[derive(Debug, Clone)]
pub struct UploadOptions {
    pub volume: String,
    /// Subtree inside the volume ("" = its root).
    pub path: String,
    pub delete: bool,
    pub dry_run: bool,
    /// Blob uploads in flight at once.
    pub parallel: usize,
}

fn mode_of(m: &std::fs::Metadata) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    m.permissions().mode() & 0o7777
}

/// Scans `root` (without following symlinks) and hashes files on `threads` threads.
fn scan(root: &Path, threads: usize) -> Result<BTreeMap<String, Local>, UploadError> {
    let mut out = BTreeMap::new();
    let mut files = Vec::new();
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        let rd = std::fs::read_dir(&dir).map_err(|e| UploadError::Local(dir.clone(), e))?;
        for e in rd {
            let e = e.map_err(|e| UploadError::Local(dir.clone(), e))?;
            let path = e.path();
            let name = e
                .file_name()
                .into_string()
                .map_err(|_| UploadError::BadName(path.clone(), "not UTF-8".into()))?;
            validate_name(&name).map_err(|err| UploadError::BadName(path.clone(), err.to_string()))?;
            let rel_path = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            let m = std::fs::symlink_metadata(&path).map_err(|e| UploadError::Local(path.clone(), e))?;
            if m.is_dir() {
                out.insert(rel_path.clone(), Local::Dir { mode: mode_of(&m) });
                stack.push((path, rel_path));
            } else if m.file_type().is_symlink() {
                let t = std::fs::read_link(&path).map_err(|e| UploadError::Local(path.clone(), e))?;
                let target = t
                    .into_os_string()
                    .into_string()
                    .map_err(|_| UploadError::BadName(path.clone(), "link target is not UTF-8".into()))?;
                out.insert(rel_path, Local::Symlink { target });
            } else if m.is_file() {
                files.push((rel_path, path, m.len(), mode_of(&m)));
            }
            // Sockets, fifos and devices are not web content: skipped.
        }
    }
    let queue = std::sync::Mutex::new(files);
    let results = std::sync::Mutex::new(Vec::new());
    let first_err = std::sync::Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| loop {
                let Some((rel, path, size, mode)) = queue.lock().unwrap_or_else(|p| p.into_inner()).pop() else {
                    break;
                };
                let hashed = std::fs::File::open(&path).and_then(|mut f| {
                    let mut h = blake3::Hasher::new();
                    std::io::copy(&mut f, &mut h)?;
                    Ok(Hash::from(h.finalize()))
                });
                match hashed {
                    Ok(hash) => results
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((rel, Local::File { path, size, mode, hash })),
                    Err(e) => {
                        first_err
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get_or_insert(UploadError::Local(path, e));
                    }
                }
            });
        }
    });
    if let Some(e) = first_err.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    out.extend(results.into_inner().unwrap_or_else(|p| p.into_inner()));
    Ok(out)
}

/// Walks the remote subtree at `base` (absent = empty).
async fn remote_tree(c: &Cluster, volume: &str, base: &str) -> Result<BTreeMap<String, Remote>, UploadError> {
    let mut out = BTreeMap::new();
    let root = c.resolve(None, volume, base).await;
    let root = match root {
        Ok(r) => r
            .attr
            .ok_or_else(|| UploadError::Other("server sent no attributes".into()))?,
        Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NoVolume) => return Ok(out),
        Err(e) => return Err(e.into()),
    };
    if root.kind != pb::ObjectKind::Directory as i32 {
        return Err(UploadError::Other(format!(
            "{volume}:{base} exists and is not a directory"
        )));
    }
    let mut stack = vec![(root.ino, String::new())];
    while let Some((ino, rel)) = stack.pop() {
        for (name, a) in c.read_dir_all(ino).await? {
            let p = if rel.is_empty() { name } else { format!("{rel}/{name}") };
            if a.kind == pb::ObjectKind::Directory as i32 {
                stack.push((a.ino, p.clone()));
            }
            let r = Remote {
                kind: a.kind,
                mode: a.mode,
                hash: a.hash.to_vec(),
                symlink: a.symlink_target,
                version: a.version,
            };
            out.insert(p, r);
        }
    }
    Ok(out)
}

fn join(base: &str, rel: &str) -> String {
    match (base.is_empty(), rel.is_empty()) {
        (true, _) => rel.to_string(),
        (false, true) => base.to_string(),
        _ => format!("{base}/{rel}"),
    }
}

/// Files up to this size go in batches.
const SMALL_BLOB: u64 = 256 << 10;
/// Bytes per small-blob batch (well under the server's MAX_SMALL_BATCH).
const BATCH_BYTES: u64 = 8 << 20;
/// Blobs per small-blob batch.
const BATCH_BLOBS: usize = 250;

enum Job {
    Small(Vec<(Hash, PathBuf, u64)>),
    Large((Hash, PathBuf, u64)),
}

/// Reads a file and checks it still has the content that was hashed when the tree was scanned.
async fn read_checked(path: &Path, h: Hash) -> Result<bytes::Bytes, UploadError> {
    let data = tokio::fs::read(path)
        .await
        .map_err(|e| UploadError::Local(path.to_path_buf(), e))?;
    if Hash::of(&data) != h {
        return Err(UploadError::Other(format!(
            "{} changed during the upload; run it again",
            path.display()
        )));
    }
    Ok(data.into())
}

/// Publishes `local` into `opts.volume:opts.path`.
pub async fn upload(
    c: &Cluster,
    local: &Path,
    opts: &UploadOptions,
    progress: &dyn Progress,
) -> Result<Summary, UploadError> {
    let base = codafs_common::names::split_path(&opts.path)
        .map_err(|e| UploadError::BadName(PathBuf::from(&opts.path), e.to_string()))?
        .join("/");
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()) * 2;
    let local_root = local.to_path_buf();
    let tree = tokio::task::spawn_blocking(move || scan(&local_root, threads))
        .await
        .map_err(|e| UploadError::Other(e.to_string()))??;
    let remote = remote_tree(c, &opts.volume, &base).await?;
    let mut s = Summary::default();
    let (mut pre, mut dirs, mut files, mut post) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    // The base directory and any missing ancestors (existing ones must not be created again).
    if !base.is_empty() && remote.is_empty() {
        let mut acc = String::new();
        for part in base.split('/') {
            acc = join(&acc, part);
            match c.resolve(None, &opts.volume, &acc).await {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => dirs.push((acc.clone(), ops::dir(&acc, 0o755))),
                Err(e) => return Err(e.into()),
            }
        }
    }
    let mut blobs: BTreeMap<Hash, (PathBuf, u64)> = BTreeMap::new();
    for (rel, l) in &tree {
        let full = join(&base, rel);
        let r = remote.get(rel);
        let same_kind = |k: pb::ObjectKind| r.is_some_and(|r| r.kind == k as i32);
        match l {
            Local::Dir { mode } => {
                if same_kind(pb::ObjectKind::Directory) {
                    s.unchanged += 1;
                    continue;
                }
                if let Some(r) = r {
                    pre.push(ops::expecting(ops::remove(&full), r.version));
                }
                dirs.push((full.clone(), ops::expecting(ops::dir(&full, *mode), 0)));
                s.created += 1;
            }
            Local::File { path, size, mode, hash } => {
                s.files += 1;
                s.bytes += size;
                match r {
                    Some(r) if r.kind == pb::ObjectKind::File as i32 => {
                        if r.hash == hash.0 && r.mode == *mode {
                            s.unchanged += 1;
                            continue;
                        }
                        let node = ops::at(&full);
                        if r.hash != hash.0 {
                            files.push(pb::Op {
                                expect_version: Some(r.version),
                                op: Some(pb::op::Op::SetContent(pb::SetContentOp {
                                    node: node.clone(),
                                    hash: bytes::Bytes::copy_from_slice(&hash.0),
                                    size: *size,
                                    mtime_ns: 0,
                                })),
                            });
                        }
                        if r.mode != *mode {
                            files.push(pb::Op {
                                expect_version: None,
                                op: Some(pb::op::Op::SetAttr(pb::SetAttrOp {
                                    node,
                                    mode: Some(*mode),
                                    ..Default::default()
                                })),
                            });
                        }
                        s.updated += 1;
                    }
                    other => {
                        if let Some(r) = other {
                            pre.push(ops::expecting(ops::remove(&full), r.version));
                        }
                        files.push(ops::expecting(ops::file_hashed(&full, *hash, *size, *mode), 0));
                        s.created += 1;
                    }
                }
                if r.is_none_or(|r| r.hash != hash.0) {
                    blobs.insert(*hash, (path.clone(), *size));
                }
            }
            Local::Symlink { target } => {
                if same_kind(pb::ObjectKind::Symlink) && r.is_some_and(|r| &r.symlink == target) {
                    s.unchanged += 1;
                    continue;
                }
                if let Some(r) = r {
                    pre.push(ops::expecting(ops::remove(&full), r.version));
                }
                files.push(ops::expecting(ops::symlink(&full, target), 0));
                s.created += 1;
            }
        }
    }
    if opts.delete {
        // Remove what is gone locally: only the topmost such path (a recursive remove covers the rest).
        let mut removed: Vec<&String> = Vec::new();
        for (rel, r) in &remote {
            if tree.contains_key(rel) || removed.iter().any(|d| rel.starts_with(&format!("{d}/"))) {
                continue;
            }
            post.push(ops::expecting(ops::remove(&join(&base, rel)), r.version));
            removed.push(rel);
            s.removed += 1;
        }
    }
    dirs.sort_by(|a, b| a.0.cmp(&b.0));
    let mut ops: Vec<pb::Op> = pre;
    ops.extend(dirs.into_iter().map(|(_, op)| op));
    ops.extend(files);
    ops.extend(post);
    if opts.dry_run || ops.is_empty() {
        s.uploaded_blobs = blobs.len();
        s.uploaded_bytes = blobs.values().map(|(_, n)| n).sum();
        return Ok(s);
    }

    // Which blobs does any data replica lack? (A blob short of copies is sent again.)
    let servers = c.list_servers().await?;
    let data: Vec<String> = servers
        .servers
        .iter()
        .filter(|s| !s.witness)
        .map(|s| s.addr.clone())
        .collect();
    let wanted: Vec<Hash> = blobs.keys().copied().collect();
    let mut missing: HashSet<Hash> = HashSet::new();
    for chunk in wanted.chunks(10_000) {
        for addr in &data {
            match c.missing_on(addr, chunk).await {
                Ok(m) => missing.extend(m),
                // An unreachable replica: send everything (the put succeeds once W copies exist).
                Err(_) => missing.extend(chunk.iter().copied()),
            }
        }
    }
    let todo: Vec<(Hash, PathBuf, u64)> = blobs
        .into_iter()
        .filter(|(h, _)| missing.contains(h))
        .map(|(h, (p, n))| (h, p, n))
        .collect();
    s.uploaded_blobs = todo.len();
    s.uploaded_bytes = todo.iter().map(|(_, _, n)| n).sum();
    progress.planned(todo.len(), s.uploaded_bytes);
    let volume_info = c.get_volume(&opts.volume).await?;
    let quorum = volume_info.write_quorum;
    // Small files travel in batches (one request and one sync per batch on each replica);
    // large ones are streamed one by one.
    let (small, large): (Vec<_>, Vec<_>) = todo.into_iter().partition(|(_, _, n)| *n <= SMALL_BLOB);
    let mut batches: Vec<Vec<(Hash, PathBuf, u64)>> = vec![Vec::new()];
    let mut batch_bytes = 0;
    for item in small {
        let full = batches
            .last()
            .is_some_and(|b| b.len() >= BATCH_BLOBS || batch_bytes + item.2 > BATCH_BYTES);
        if full {
            batches.push(Vec::new());
            batch_bytes = 0;
        }
        batch_bytes += item.2;
        if let Some(b) = batches.last_mut() {
            b.push(item);
        }
    }
    batches.retain(|b| !b.is_empty());
    let jobs = batches
        .into_iter()
        .map(Job::Small)
        .chain(large.into_iter().map(Job::Large));
    let mut puts = futures::stream::iter(jobs.map(|job| async move {
        match job {
            Job::Small(items) => {
                let mut blobs = Vec::with_capacity(items.len());
                let mut n = 0;
                for (h, path, size) in items {
                    blobs.push((h, read_checked(&path, h).await?));
                    n += size;
                }
                c.put_small(&blobs, quorum).await?;
                progress.uploaded(n);
            }
            Job::Large((h, path, size)) => {
                c.put_blob(read_checked(&path, h).await?, quorum).await?;
                progress.uploaded(size);
            }
        }
        Ok::<_, UploadError>(())
    }))
    .buffer_unordered(opts.parallel.max(1));
    while let Some(r) = puts.next().await {
        r?;
    }
    let reply = c
        .commit(crate::ops::commit(&opts.volume, ops))
        .await
        .map_err(|e| match e.kind() {
            ErrorKind::Conflict => UploadError::Conflict(e.to_string()),
            _ => UploadError::Server(e),
        })?;
    s.version = reply.version;
    Ok(s)
}
