//! `codafs upload`: publish a local tree into a volume as one atomic commit.
//!
//! 1. Scan the local tree and hash its files in parallel (here). A file over the chunk threshold
//!    is cut into chunks in the same read, and named by its manifest (`codafs_common::chunks`).
//! 2. Walk the remote subtree and plan the commit (`plan.rs`): directories to create, files whose
//!    content or mode changed, symlinks, and (with `--delete`) what is gone locally.
//! 3. Ask every data replica which blobs (small files, chunks, manifests) it lacks (in
//!    batches), upload only those, in parallel, every manifest after its chunks (`send.rs`): a
//!    small edit to a large file sends the chunks around it and a new manifest.
//! 4. Commit every change as one batch: readers see the old tree or the new one. Changed objects
//!    carry the version they were diffed against, so a concurrent change makes the commit fail
//!    (and change nothing) instead of being overwritten. Re-running after an interruption uploads
//!    only what is still missing.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use codafs_common::chunks::{content_id, is_chunked, Manifest};
use codafs_common::names::validate_name;
use codafs_common::Hash;
use codafs_proto::error::ErrorKind;
use codafs_proto::pb;

mod plan;
mod send;

use crate::transport::{ClientError, Cluster};

/// Upload failures, one line each.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("{0}: {1}")]
    Local(PathBuf, std::io::Error),
    #[error("{0}: {1}")]
    BadName(PathBuf, String),
    #[error("{0} changed during the upload; run it again")]
    Changed(PathBuf),
    #[error(transparent)]
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
        /// Its modification time, which the upload keeps where the commit changes its entries
        /// (see `plan`).
        mtime_ns: i64,
    },
    File {
        path: PathBuf,
        size: u64,
        mode: u32,
        /// What names the content: its blake3, or its manifest's hash when chunked.
        hash: Hash,
        /// The manifest of a chunked file (over the chunk threshold).
        chunks: Option<Arc<Manifest>>,
        /// Its modification time (ns since the epoch), which the upload keeps: web servers
        /// answer `Last-Modified` and conditional requests with it.
        mtime_ns: i64,
    },
    Symlink {
        target: String,
    },
    /// A socket, FIFO or device: not web content, so not published; a remote entry of its
    /// name is left as it is, also by `--delete`.
    Skipped,
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
    /// Sockets, FIFOs and devices found locally: not published, and their remote names kept.
    pub skipped: usize,
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

/// A local file's modification time in ns since the epoch (0, "the commit's time", for one
/// at the epoch exactly, which the servers read that way anyway).
fn mtime_of(m: &std::fs::Metadata) -> i64 {
    use std::os::unix::fs::MetadataExt;
    m.mtime().saturating_mul(1_000_000_000).saturating_add(m.mtime_nsec())
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
                let dir = Local::Dir {
                    mode: mode_of(&m),
                    mtime_ns: mtime_of(&m),
                };
                out.insert(rel_path.clone(), dir);
                stack.push((path, rel_path));
            } else if m.file_type().is_symlink() {
                let t = std::fs::read_link(&path).map_err(|e| UploadError::Local(path.clone(), e))?;
                let target = t
                    .into_os_string()
                    .into_string()
                    .map_err(|_| UploadError::BadName(path.clone(), "link target is not UTF-8".into()))?;
                out.insert(rel_path, Local::Symlink { target });
            } else if m.is_file() {
                files.push((rel_path, path, m.len(), mode_of(&m), mtime_of(&m)));
            } else {
                // Sockets, fifos and devices are not web content: skipped, and counted.
                out.insert(rel_path, Local::Skipped);
            }
        }
    }
    let queue = std::sync::Mutex::new(files);
    let results = std::sync::Mutex::new(Vec::new());
    let first_err = std::sync::Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| loop {
                let Some((rel, path, size, mode, mtime_ns)) = queue.lock().unwrap_or_else(|p| p.into_inner()).pop()
                else {
                    break;
                };
                match identify(&path, size) {
                    Ok((hash, chunks)) => results.lock().unwrap_or_else(|p| p.into_inner()).push((
                        rel,
                        Local::File {
                            path,
                            size,
                            mode,
                            hash,
                            chunks: chunks.map(Arc::new),
                            mtime_ns,
                        },
                    )),
                    Err(e) => {
                        first_err.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
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

/// Reads the file at `path` once and names its content (`size` bytes, as scanned): its blake3,
/// or for a large file its manifest's hash and the manifest. A file whose length no longer
/// matches the scan changed meanwhile and is an error (it would name content of another size).
fn identify(path: &Path, size: u64) -> Result<(Hash, Option<Manifest>), UploadError> {
    let f = std::fs::File::open(path).map_err(|e| UploadError::Local(path.to_path_buf(), e))?;
    // The chunker reads into a buffer of its own (the largest chunk); a small file is hashed
    // through a read buffer.
    let id = if is_chunked(size) {
        content_id(f, size)
    } else {
        content_id(std::io::BufReader::with_capacity(READ_BUF, f), size)
    };
    match id {
        Ok(id) => Ok(id),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(UploadError::Changed(path.to_path_buf())),
        Err(e) => Err(UploadError::Local(path.to_path_buf(), e)),
    }
}

/// The read buffer for hashing (larger reads, fewer system calls, bounded memory per thread).
const READ_BUF: usize = 1 << 20;

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

pub(crate) use plan::content_blobs;

/// Sends the blobs of `blobs` that some data replica lacks, as an upload does (small ones in
/// batches, chunks before manifests). `codafs volume restore` sends an archive's contents so.
pub(crate) async fn send_blobs(
    c: &Cluster,
    blobs: BTreeMap<Hash, plan::Source>,
    quorum: u32,
    parallel: usize,
    progress: &dyn Progress,
) -> Result<(), UploadError> {
    let todo = send::find_missing(c, &blobs).await?;
    progress.planned(todo.len(), todo.iter().map(|(_, src)| src.len()).sum());
    send::send(c, send::jobs(todo), quorum, parallel, progress).await
}

fn join(base: &str, rel: &str) -> String {
    match (base.is_empty(), rel.is_empty()) {
        (true, _) => rel.to_string(),
        (false, true) => base.to_string(),
        _ => format!("{base}/{rel}"),
    }
}

/// Publishes `local` into `opts.volume:opts.path`: scan and hash the local tree, read the remote
/// one, [`plan::plan`] the commit, send the blobs some data replica lacks ([`send`]), then commit
/// everything at once, expecting the versions seen.
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
    let root_mtime = std::fs::metadata(local)
        .map(|m| mtime_of(&m))
        .map_err(|e| UploadError::Local(local.to_path_buf(), e))?;
    let tree = tokio::task::spawn_blocking(move || scan(&local_root, threads))
        .await
        .map_err(|e| UploadError::Other(e.to_string()))??;
    let remote = remote_tree(c, &opts.volume, &base).await?;
    let ancestors = if remote.is_empty() {
        missing_ancestors(c, &opts.volume, &base).await?
    } else {
        Vec::new()
    };
    let plan = plan::plan(&tree, &remote, (&base, root_mtime), &ancestors, opts.delete);
    let mut s = plan.summary;
    if plan.ops.is_empty() {
        return Ok(s);
    }
    if opts.dry_run {
        // What would travel: the blobs some data replica lacks (an edited large file's new
        // chunks, not the whole file), or all of them if the replicas cannot be asked.
        let all = (plan.blobs.len(), plan.blobs.values().map(|src| src.len()).sum());
        (s.uploaded_blobs, s.uploaded_bytes) = match send::find_missing(c, &plan.blobs).await {
            Ok(todo) => (todo.len(), todo.iter().map(|(_, src)| src.len()).sum()),
            Err(e) => {
                tracing::debug!(error = %e, "dry run: could not ask which blobs the replicas lack");
                all
            }
        };
        return Ok(s);
    }
    let todo = send::find_missing(c, &plan.blobs).await?;
    s.uploaded_blobs = todo.len();
    s.uploaded_bytes = todo.iter().map(|(_, src)| src.len()).sum();
    tracing::debug!(
        blobs = s.uploaded_blobs,
        bytes = s.uploaded_bytes,
        "blobs some data replica lacks"
    );
    progress.planned(todo.len(), s.uploaded_bytes);
    let quorum = c.get_volume(&opts.volume).await?.write_quorum;
    send::send(c, send::jobs(todo), quorum, opts.parallel, progress).await?;
    let commit = crate::ops::commit(&opts.volume, plan.ops);
    let mut resent = 0;
    let reply = loop {
        match c.commit(commit.clone()).await {
            // A blob found held when asked can be short of copies at the commit: an
            // unreferenced one near the end of its GC grace period is no longer counted (the
            // servers' `blobs::asked`), or a replica lost it. Send what is lacking now, and
            // commit again (same request id: applied at most once).
            Err(e) if e.kind() == ErrorKind::NotEnoughCopies && resent < COMMIT_RESENDS => {
                resent += 1;
                tracing::info!(error = %e, "the commit found blobs short of copies; sending them again");
                let todo = send::find_missing(c, &plan.blobs).await?;
                send::send(c, send::jobs(todo), quorum, opts.parallel, &()).await?;
            }
            Err(e) if e.kind() == ErrorKind::Conflict => return Err(UploadError::Conflict(e.to_string())),
            Err(e) => return Err(UploadError::Server(e)),
            Ok(reply) => break reply,
        }
    };
    s.version = reply.version;
    Ok(s)
}

/// How often an upload sends lacking blobs again when its commit finds some short of copies.
const COMMIT_RESENDS: usize = 2;

/// The directories above `base` (and `base` itself) that do not exist yet, parents first.
async fn missing_ancestors(c: &Cluster, volume: &str, base: &str) -> Result<Vec<String>, UploadError> {
    let mut out = Vec::new();
    let mut acc = String::new();
    for part in base.split('/').filter(|p| !p.is_empty()) {
        acc = join(&acc, part);
        match c.resolve(None, volume, &acc).await {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => out.push(acc.clone()),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scan_names_a_large_file_by_its_manifest_and_a_small_one_by_its_blake3(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let big: Vec<u8> = (0..(6u32 << 20))
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        std::fs::write(dir.path().join("big"), &big)?;
        std::fs::write(dir.path().join("small"), b"small")?;
        let fifo = std::ffi::CString::new(dir.path().join("pipe").into_os_string().into_encoded_bytes())?;
        // SAFETY: a NUL-terminated path in a directory this test owns.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0, "mkfifo");
        let tree = scan(dir.path(), 2)?;
        assert!(
            matches!(tree.get("pipe"), Some(Local::Skipped)),
            "a FIFO is skipped, and said so"
        );
        let (want, manifest) = content_id(&big[..], big.len() as u64)?;
        match tree.get("big") {
            Some(Local::File {
                hash,
                chunks: Some(m),
                size,
                ..
            }) => {
                assert_eq!((*hash, *size), (want, big.len() as u64));
                assert_eq!(Some(&**m), manifest.as_ref());
            }
            other => panic!("big scanned as {other:?}"),
        }
        match tree.get("small") {
            Some(Local::File { hash, chunks: None, .. }) => assert_eq!(*hash, Hash::of(b"small")),
            other => panic!("small scanned as {other:?}"),
        }
        Ok(())
    }
}
