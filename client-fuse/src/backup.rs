//! `codafs volume backup` and `codafs volume restore`: a volume as one archive ([`archive`]),
//! consistent at one version, and back.
//!
//! **Backup** walks the namespace first, holding only metadata, and keeps a walk only if the
//! volume's version stamp is the same before and after it, read from states no older than the
//! walk's pages. So the archive shows exactly one version, without locking anything; a volume
//! that changes during every attempt makes the backup fail with that reason. Contents
//! (immutable, named by hash) are fetched and verified afterwards, one blob or chunk at a time.
//! `since` makes an incremental archive: every node, but only the contents of files changed
//! after that version.
//!
//! **Restore** reads and verifies the whole archive before it changes anything: every content's
//! hash, and the archive's checksum. Contents are spooled to a local directory, the ones the
//! data replicas lack are sent as `upload` sends them, and the namespace is created in one
//! atomic commit. An existing volume is replaced only when asked.
pub mod archive;

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use codafs_common::chunks::{content_id, is_chunked, Manifest};
use codafs_common::Hash;
use codafs_proto::error::ErrorKind;
use codafs_proto::pb;

use crate::ops;
use crate::transport::{BlobRef, ClientError, Cluster};
use crate::upload::{Progress, UploadError};
use archive::{ArchiveError, Frame, Node, VolumeMeta};

/// Why a backup or restore failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error(transparent)]
    Server(#[from] ClientError),
    #[error(transparent)]
    Upload(#[from] UploadError),
    #[error("{0}")]
    Refused(String),
}

/// What an archive held.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// The volume version the archive shows (backup), or the restored volume's version.
    pub version: u64,
    pub nodes: u64,
    pub contents: u64,
    pub content_bytes: u64,
}

/// Walks that may be retried because the volume changed during one.
const WALK_ATTEMPTS: usize = 5;
/// Read tickets last 10 minutes; listings older than this are read again for fresh ones.
const TICKET_REFRESH: Duration = Duration::from_secs(5 * 60);

/// One node found by the walk, with what fetching its content needs.
pub(crate) struct Walked {
    pub(crate) node: Node,
    parent_ino: u64,
    pub(crate) blob: Option<BlobRef>,
    version: u64,
}

/// Writes an archive of `volume` to `out`; see the module doc.
pub async fn backup<W: Write>(
    c: &Cluster,
    volume: &str,
    since: Option<u64>,
    out: W,
    progress: &dyn Progress,
) -> Result<(Summary, W), BackupError> {
    let info = c.get_volume(volume).await?;
    let (version, walked) = consistent_walk(c, volume).await?;
    let meta = VolumeMeta {
        name: info.name.clone(),
        owner: info.owner.clone(),
        writers: info.writers.clone(),
        quota_bytes: info.quota_bytes,
        quota_files: info.quota_files,
        write_quorum: info.write_quorum,
        public_read: info.public_read,
    };
    let mut w = archive::Writer::new(out)?;
    w.frame(&Frame::Header {
        volume: meta,
        version,
        since,
        created_ns: codafs_common::now_ns(),
    })?;
    for n in &walked {
        w.frame(&Frame::Node(n.node.clone()))?;
    }
    // Each distinct content once; only those changed after `since` in an incremental archive.
    let mut wanted: BTreeMap<Hash, &Walked> = BTreeMap::new();
    for n in &walked {
        if let (Some(b), true) = (&n.blob, since.is_none_or(|s| n.version > s)) {
            wanted.entry(b.hash).or_insert(n);
        }
    }
    progress.planned(wanted.len(), wanted.values().map(|n| n.node.size).sum());
    let walked_at = Instant::now();
    let mut fresh: HashMap<u64, BTreeMap<u64, BlobRef>> = HashMap::new();
    let mut s = Summary {
        version,
        nodes: walked.len() as u64,
        ..Default::default()
    };
    for (hash, n) in &wanted {
        let size = &n.node.size;
        let mut blob = n
            .blob
            .clone()
            .ok_or_else(|| BackupError::Refused("internal: no blob".into()))?;
        if walked_at.elapsed() > TICKET_REFRESH {
            blob = refreshed(c, &mut fresh, n, *hash).await?;
        }
        w.frame(&Frame::Content {
            hash: hash.0,
            size: *size,
        })?;
        copy_content(c, &blob, *size, &mut w, &n.node.path).await?;
        progress.uploaded(*size);
        s.contents += 1;
        s.content_bytes += size;
    }
    let out = w.finish(s.nodes, s.contents, s.content_bytes)?;
    Ok((s, out))
}

/// The namespace at one version: every node in pre-order, and that version.
async fn consistent_walk(c: &Cluster, volume: &str) -> Result<(u64, Vec<Walked>), BackupError> {
    for attempt in 0..WALK_ATTEMPTS {
        let before = stamp(c, volume).await?;
        let (walked, newest) = walk(c, volume, before.0).await?;
        let after = stamp(c, volume).await?;
        // The stamp after was read from a state at least as new as every page: if the volume
        // is still at `before` there, every page showed exactly that version.
        if after.0 == before.0 && after.1 >= newest {
            return Ok((before.0, walked));
        }
        tracing::info!(attempt, "the volume changed during the walk; walking again");
    }
    Err(BackupError::Refused(format!(
        "volume {volume} changed during each of {WALK_ATTEMPTS} attempts to read it at one version; back it up at a quieter moment"
    )))
}

/// The volume's version and the applied index of the state it was read from.
async fn stamp(c: &Cluster, volume: &str) -> Result<(u64, u64), BackupError> {
    let reply = c.volume_stamps_applied(None, vec![volume.to_string()]).await?;
    match reply.stamps.first() {
        Some(s) if s.exists => Ok((s.version, reply.applied_index)),
        _ => Err(BackupError::Refused(format!("volume {volume} does not exist"))),
    }
}

/// Every node under the volume root, parents first; and the newest applied index a listing
/// came from. A listing older than `min_version` is read again.
pub(crate) async fn walk(c: &Cluster, volume: &str, min_version: u64) -> Result<(Vec<Walked>, u64), BackupError> {
    let root = c
        .resolve(None, volume, "")
        .await?
        .attr
        .ok_or_else(|| BackupError::Refused("the server sent no attributes for the volume root".into()))?;
    let mut out = vec![walked("", &root, 0, None)];
    let mut newest = 0;
    let mut first_path: HashMap<u64, String> = HashMap::new();
    let mut stack = vec![(root.ino, String::new())];
    while let Some((ino, path)) = stack.pop() {
        let listing = listing_at_least(c, ino, min_version).await?;
        newest = newest.max(listing.applied);
        for (name, a) in listing.entries {
            let p = if path.is_empty() {
                name
            } else {
                format!("{path}/{name}")
            };
            let link_to = if a.kind != pb::ObjectKind::Directory as i32 && a.nlink > 1 {
                match first_path.get(&a.ino) {
                    Some(first) => Some(first.clone()),
                    None => {
                        first_path.insert(a.ino, p.clone());
                        None
                    }
                }
            } else {
                None
            };
            if a.kind == pb::ObjectKind::Directory as i32 {
                stack.push((a.ino, p.clone()));
            }
            out.push(walked(&p, &a, ino, link_to));
        }
    }
    Ok((out, newest))
}

/// A directory's listing from a replica that has applied `min_version` at least.
async fn listing_at_least(
    c: &Cluster,
    ino: u64,
    min_version: u64,
) -> Result<crate::transport::DirListing, BackupError> {
    for _ in 0..50 {
        let l = c.read_dir_fresh(ino).await?;
        if l.applied >= min_version {
            return Ok(l);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(BackupError::Refused(format!(
        "no server caught up to version {min_version} within 5 s"
    )))
}

fn walked(path: &str, a: &pb::Attr, parent_ino: u64, link_to: Option<String>) -> Walked {
    let is_file = a.kind == pb::ObjectKind::File as i32;
    let hash = if is_file { Hash::from_slice(&a.hash).ok() } else { None };
    Walked {
        node: Node {
            path: path.to_string(),
            kind: a.kind,
            mode: a.mode,
            uid: a.uid,
            gid: a.gid,
            mtime_ns: a.mtime_ns,
            atime_ns: a.atime_ns,
            size: a.size,
            hash: hash.map(|h| h.0),
            symlink: a.symlink_target.clone(),
            rdev: a.rdev,
            link_to,
        },
        parent_ino,
        blob: if is_file { BlobRef::of(a).ok() } else { None },
        version: a.version,
    }
}

/// A fresh read ticket for content `hash` of walked file `n`, from its directory read again
/// (once per directory). Fails if no file of that directory holds the content any more.
async fn refreshed(
    c: &Cluster,
    fresh: &mut HashMap<u64, BTreeMap<u64, BlobRef>>,
    n: &Walked,
    hash: Hash,
) -> Result<BlobRef, BackupError> {
    if let std::collections::hash_map::Entry::Vacant(slot) = fresh.entry(n.parent_ino) {
        let mut by_ino = BTreeMap::new();
        for (_, a) in c.read_dir_all(n.parent_ino).await? {
            if let Ok(b) = BlobRef::of(&a) {
                by_ino.insert(a.ino, b);
            }
        }
        slot.insert(by_ino);
    }
    fresh
        .get(&n.parent_ino)
        .and_then(|m| m.values().find(|b| b.hash == hash).cloned())
        .ok_or_else(|| {
            BackupError::Refused(format!(
                "{} changed after the backup's walk and its old content can no longer be read; run the backup again",
                n.node.path
            ))
        })
}

/// Fetches a content (chunk by chunk when chunked, each verified) into the archive.
async fn copy_content<W: Write>(
    c: &Cluster,
    blob: &BlobRef,
    size: u64,
    w: &mut archive::Writer<W>,
    path: &str,
) -> Result<(), BackupError> {
    let first = c.get_blob(blob).await?;
    if !is_chunked(size) {
        if first.len() as u64 != size {
            return Err(BackupError::Refused(format!(
                "{path}: the servers hold {} bytes for a {size}-byte file",
                first.len()
            )));
        }
        return Ok(w.content_bytes(&first)?);
    }
    let m = Manifest::decode(&first).map_err(|e| BackupError::Refused(format!("{path}: {e}")))?;
    for chunk in &m.chunks {
        let bytes = c.get_blob(&blob.chunk(chunk.hash)).await?;
        w.content_bytes(&bytes)?;
    }
    Ok(())
}

/// How a restore treats the target volume.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// Delete an existing volume of that name first.
    pub replace: bool,
    /// The new volume's owner, instead of the archive's.
    pub owner: Option<String>,
    /// Where contents wait between reading and sending (removed afterwards by the caller).
    pub spool: PathBuf,
    /// Blob uploads in flight at once.
    pub parallel: usize,
}

/// A verified archive, read whole: its header, nodes, and spooled contents.
struct Archived {
    volume: VolumeMeta,
    /// The version the archive shows.
    version: u64,
    since: Option<u64>,
    nodes: Vec<Node>,
    /// Content hash -> (spooled file, size, manifest when chunked).
    contents: BTreeMap<Hash, (PathBuf, u64, Option<Manifest>)>,
}

/// Restores the archive read from `input` as volume `target`; see the module doc.
pub async fn restore<R: Read + Send + 'static>(
    c: &Cluster,
    input: R,
    target: &str,
    opts: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<Summary, BackupError> {
    codafs_common::names::validate_volume_name(target).map_err(|e| BackupError::Refused(e.to_string()))?;
    let spool = opts.spool.clone();
    let a = tokio::task::spawn_blocking(move || read_archive(input, &spool))
        .await
        .map_err(|e| BackupError::Refused(format!("reading the archive: {e}")))??;
    // Everything is checked before anything changes: the target, and contents that are only
    // on the servers (an incremental archive).
    let existing = match c.get_volume(target).await {
        Ok(v) => Some(v),
        Err(e) if e.kind() == ErrorKind::NoVolume || e.kind() == ErrorKind::NotFound => None,
        Err(e) => return Err(e.into()),
    };
    if existing.is_some() && !opts.replace {
        return Err(BackupError::Refused(format!(
            "volume {target} exists; pass --replace to delete it and restore the archive in its place"
        )));
    }
    let elsewhere: Vec<Hash> = a
        .nodes
        .iter()
        .filter_map(|n| n.hash.map(Hash))
        .filter(|h| !a.contents.contains_key(h))
        .collect();
    if !elsewhere.is_empty() {
        let lacking = c.lacking(None, &elsewhere).await?;
        if let Some(h) = elsewhere.iter().find(|h| lacking.contains(h)) {
            let path = a.nodes.iter().find(|n| n.hash == Some(h.0)).map_or("?", |n| &n.path);
            return Err(BackupError::Refused(format!(
                "{path}: its content is not in this {} and not on every data replica; restore the full backup first",
                match a.since {
                    Some(s) => format!("incremental archive (changes after version {s})"),
                    None => "archive".to_string(),
                }
            )));
        }
    }
    if existing.is_some() {
        c.delete_volume(target).await?;
    }
    let spec = pb::VolumeSpec {
        name: target.to_string(),
        owner: opts.owner.clone().unwrap_or_else(|| a.volume.owner.clone()),
        quota_bytes: a.volume.quota_bytes,
        quota_files: a.volume.quota_files,
        write_quorum: a.volume.write_quorum,
        public_read: a.volume.public_read,
    };
    let created = c.create_volume(spec).await?;
    if !a.volume.writers.is_empty() {
        let writers = pb::VolumeChanges {
            name: target.to_string(),
            add_writers: a.volume.writers.clone(),
            ..Default::default()
        };
        if let Err(e) = c.set_volume(writers).await {
            tracing::warn!(error = %e, "the archive's writers could not be added");
        }
    }
    let mut blobs = BTreeMap::new();
    for (hash, (path, size, m)) in &a.contents {
        blobs.extend(crate::upload::content_blobs(path, *size, *hash, m.as_ref()));
    }
    crate::upload::send_blobs(c, blobs, created.write_quorum, opts.parallel, progress).await?;
    let reply = c.commit(ops::commit(target, namespace_ops(&a.nodes))).await?;
    tracing::info!(
        volume = target,
        archived_version = a.version,
        version = reply.version,
        "restored"
    );
    Ok(Summary {
        version: reply.version,
        nodes: a.nodes.len() as u64,
        contents: a.contents.len() as u64,
        content_bytes: a.contents.values().map(|(_, s, _)| *s).sum(),
    })
}

/// Reads and verifies the whole archive, spooling contents under `spool`.
fn read_archive<R: Read>(input: R, spool: &Path) -> Result<Archived, BackupError> {
    std::fs::create_dir_all(spool).map_err(ArchiveError::from)?;
    let mut r = archive::Reader::new(input)?;
    let Some(Frame::Header {
        volume, version, since, ..
    }) = r.next_frame()?
    else {
        return Err(ArchiveError::Damaged("it does not start with a header".into()).into());
    };
    let mut nodes = Vec::new();
    let mut contents = BTreeMap::new();
    let mut end = None;
    while let Some(f) = r.next_frame()? {
        match f {
            Frame::Node(n) => nodes.push(n),
            Frame::Content { hash, size } => {
                let hash = Hash(hash);
                let path = spool.join(hash.to_hex());
                let mut file = std::fs::File::create(&path).map_err(ArchiveError::from)?;
                let mut hasher = blake3::Hasher::new();
                r.content_into(size, |b| {
                    hasher.update(b);
                    file.write_all(b)
                })?;
                let manifest = if is_chunked(size) {
                    let f = std::fs::File::open(&path).map_err(ArchiveError::from)?;
                    let (id, m) = content_id(std::io::BufReader::new(f), size).map_err(ArchiveError::from)?;
                    if id != hash {
                        return Err(damaged_content(&hash));
                    }
                    m
                } else {
                    if Hash::from(hasher.finalize()) != hash {
                        return Err(damaged_content(&hash));
                    }
                    None
                };
                contents.insert(hash, (path, size, manifest));
            }
            Frame::End {
                nodes: n, contents: k, ..
            } => end = Some((n, k)),
            Frame::Header { .. } => return Err(ArchiveError::Damaged("a second header".into()).into()),
        }
    }
    match end {
        Some((n, k)) if n == nodes.len() as u64 && k == contents.len() as u64 => {}
        Some(_) => return Err(ArchiveError::Damaged("its counts do not match what it holds".into()).into()),
        None => return Err(ArchiveError::Damaged("it has no end".into()).into()),
    }
    if nodes.first().is_none_or(|n| !n.path.is_empty()) {
        return Err(ArchiveError::Damaged("its first node is not the volume root".into()).into());
    }
    Ok(Archived {
        volume,
        version,
        since,
        nodes,
        contents,
    })
}

fn damaged_content(h: &Hash) -> BackupError {
    ArchiveError::Damaged(format!("content {h} does not match its hash")).into()
}

/// The one commit that recreates `nodes` (pre-order, root first) in an empty volume: every
/// node with its mode, owner, times and content; hard links as links; directories' times set
/// last (creating their entries touched them).
fn namespace_ops(nodes: &[Node]) -> Vec<pb::Op> {
    let mut out = Vec::with_capacity(nodes.len() + nodes.len() / 8);
    let mut dir_times = Vec::new();
    for n in nodes {
        let is_dir = n.kind == pb::ObjectKind::Directory as i32;
        if is_dir {
            dir_times.push(set_attr(n));
        }
        if n.path.is_empty() {
            continue;
        }
        let (parent, name) = ops::split(&n.path);
        let op = match &n.link_to {
            Some(first) => pb::op::Op::Link(pb::LinkOp {
                node: ops::at(first),
                parent: ops::at(parent),
                name: name.to_string(),
            }),
            None => pb::op::Op::Create(pb::CreateOp {
                parent: ops::at(parent),
                name: name.to_string(),
                kind: n.kind,
                mode: n.mode,
                hash: n.hash.map(|h| bytes::Bytes::copy_from_slice(&h)).unwrap_or_default(),
                size: n.size,
                symlink_target: n.symlink.clone(),
                replace: false,
                uid: n.uid,
                gid: n.gid,
                mtime_ns: n.mtime_ns,
                rdev: n.rdev,
                ino: None,
            }),
        };
        out.push(pb::Op {
            expect_version: None,
            op: Some(op),
        });
    }
    out.extend(dir_times);
    out
}

fn set_attr(n: &Node) -> pb::Op {
    pb::Op {
        expect_version: None,
        op: Some(pb::op::Op::SetAttr(pb::SetAttrOp {
            node: ops::at(&n.path),
            mode: Some(n.mode),
            uid: Some(n.uid),
            gid: Some(n.gid),
            mtime_ns: Some(n.mtime_ns),
            atime_ns: Some(n.atime_ns),
        })),
    }
}
