//! An in-memory server for the core's tests: one volume, applied commits, change events held
//! until the test delivers them, and faults on purpose (down, a lagging replica, a refused commit
//! or a lost reply). It also keeps the content of every path at every version, so a test can
//! ask which answers were correct at some moment.
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;

use codafs_common::{make_ino, Hash};

use super::super::remote::{ChangeStream, ChunkSink, Fetched, Remote, RemoteVolume, RequestId};
use super::super::types::{Attr, ChangeEvent, Committed, Op, VolumeStamp};
use super::super::{FsError, NodeKind};

pub const VOL: u32 = 1;

pub fn root() -> u64 {
    make_ino(VOL, 1)
}

/// Every file's content by path ("a/b/y"), as of one version.
pub type Contents = BTreeMap<String, Vec<u8>>;

/// The namespace at one version.
#[derive(Clone, Default)]
pub struct Tree {
    pub objects: HashMap<u64, Attr>,
    pub dirs: HashMap<u64, BTreeMap<String, u64>>,
    pub version: u64,
}

/// A replica that answers metadata reads from an older state, for a number of reads.
pub struct Lagging {
    pub tree: Tree,
    pub reads_left: u32,
}

/// How the next commit fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitFailure {
    /// Refused: nothing changes.
    Refused,
    /// Applied, but the reply never arrives (the client cannot tell it from a refusal).
    ReplyLost,
}

#[derive(Default)]
pub struct Truth {
    pub tree: Tree,
    pub blobs: HashMap<Hash, Vec<u8>>,
    next_ino: u64,
    pub down: bool,
    /// Events not yet delivered to the core.
    pub pending: VecDeque<ChangeEvent>,
    pub lagging: Option<Lagging>,
    pub fail_next_commit: Option<CommitFailure>,
    /// Commits still to refuse (each with `Denied`, as a quota or a revoked right would).
    pub refuse_commits: u32,
    /// Contents after each version, oldest first.
    pub history: Vec<(u64, Contents)>,
    /// Single-blob fetches served (`fetch_blob`).
    pub blob_fetches: u64,
    /// `fetch_small` answers with these bytes instead of the stored ones (a corrupt replica).
    pub corrupt_small: bool,
    /// `fetch_small` waits for a permit of this first (a slow server).
    pub small_gate: Option<std::sync::Arc<tokio::sync::Semaphore>>,
    /// `commit` waits for a permit of this first (a commit in flight while other calls run).
    pub commit_gate: Option<std::sync::Arc<tokio::sync::Semaphore>>,
    /// Applied commit requests, answered again to a retry (as the servers do).
    pub requests: HashMap<RequestId, Committed>,
    /// Bytes of blobs stored that were not stored before (what a store sent, deduplicated).
    pub new_blob_bytes: u64,
    /// Events carry no names, as an older server's: mounts read changed directories again.
    pub events_without_names: bool,
    /// Directory listings served (`readdir`).
    pub readdirs: u64,
    /// Tokens refused as revoked (by puts and commits).
    pub refused_tokens: std::collections::HashSet<String>,
    /// The namespace as of the last event (what the next event's names are counted from).
    shown: Tree,
    /// The version of the mount's last commit: a lagging replica's refusal on an older state
    /// is asked again of a current one, as `Cluster::read` asks another server.
    committed: u64,
}

/// The bytes content `h` of `size` bytes stands for: the blob itself, or a chunked file's
/// chunks put together (`None` if any part is missing).
fn assemble(blobs: &HashMap<Hash, Vec<u8>>, h: &Hash, size: u64) -> Option<Vec<u8>> {
    let stored = blobs.get(h)?;
    if !codafs_common::chunks::is_chunked(size) {
        return Some(stored.clone());
    }
    let m = codafs_common::chunks::Manifest::decode(stored).ok()?;
    let mut out = Vec::with_capacity(size as usize);
    for c in &m.chunks {
        out.extend_from_slice(blobs.get(&c.hash)?);
    }
    Some(out)
}

/// Stores `content` as the servers would: one blob, or chunks and a manifest; returns its hash.
fn store(blobs: &mut HashMap<Hash, Vec<u8>>, content: &[u8]) -> Hash {
    if !codafs_common::chunks::is_chunked(content.len() as u64) {
        let h = Hash::of(content);
        blobs.insert(h, content.to_vec());
        return h;
    }
    let m = codafs_common::chunks::chunk_reader(content, |_, c, bytes| {
        blobs.insert(c.hash, bytes.to_vec());
        Ok(())
    })
    .unwrap_or_default();
    let encoded = m.encode();
    let h = Hash::of(&encoded);
    blobs.insert(h, encoded);
    h
}

/// The fake server.
pub struct FakeRemote(Mutex<Truth>);

fn dir_attr(ino: u64, parent: u64, version: u64) -> Attr {
    Attr {
        ino,
        kind: NodeKind::Dir,
        mode: 0o755,
        nlink: 2,
        version,
        parent,
        ..Default::default()
    }
}

impl Tree {
    fn child(&self, dir: u64, name: &str) -> Option<u64> {
        self.dirs.get(&dir)?.get(name).copied()
    }

    /// Every file's content, walking from the root.
    fn contents(&self, blobs: &HashMap<Hash, Vec<u8>>) -> Contents {
        let mut out = Contents::new();
        let mut stack = vec![(root(), String::new())];
        while let Some((dir, prefix)) = stack.pop() {
            for (name, ino) in self.dirs.get(&dir).into_iter().flatten() {
                let path = format!("{prefix}{name}");
                match self.objects.get(ino) {
                    Some(a) if a.kind == NodeKind::Dir => stack.push((*ino, format!("{path}/"))),
                    Some(a) => {
                        let data = a.hash.and_then(|h| assemble(blobs, &h, a.size)).unwrap_or_default();
                        out.insert(path, data);
                    }
                    None => {}
                }
            }
        }
        out
    }
}

impl Truth {
    fn new_ino(&mut self) -> u64 {
        self.next_ino += 1;
        make_ino(VOL, self.next_ino)
    }

    /// The names in `dirs` that differ from the last event's namespace, as a server's event
    /// lists them.
    fn names_changed(&self, dirs: &[u64]) -> Vec<crate::cache::meta::DirPatch> {
        let empty = BTreeMap::new();
        let mut out = Vec::new();
        for d in dirs {
            let before = self.shown.dirs.get(d).unwrap_or(&empty);
            let after = self.tree.dirs.get(d).unwrap_or(&empty);
            for (name, ino) in after {
                if before.get(name) != Some(ino) {
                    let kind = self.tree.objects.get(ino).map_or(NodeKind::File, |a| a.kind);
                    out.push((*d, name.clone(), Some((*ino, super::super::kind_code(kind)))));
                }
            }
            for name in before.keys().filter(|n| !after.contains_key(*n)) {
                out.push((*d, name.clone(), None));
            }
        }
        out
    }

    /// Ends a change at the next version: records its event and the contents after it.
    fn finish(&mut self, mut inos: Vec<u64>, mut dirs: Vec<u64>) -> u64 {
        let v = self.tree.version;
        inos.sort_unstable();
        inos.dedup();
        dirs.sort_unstable();
        dirs.dedup();
        let (names, removed) = if self.events_without_names {
            (None, Vec::new())
        } else {
            let names = self.names_changed(&dirs);
            let removed = inos
                .iter()
                .copied()
                .filter(|i| !self.tree.objects.contains_key(i))
                .collect();
            (Some(names), removed)
        };
        // As a server tells them: nodes whose mode, owner or group differ from before.
        let perms = inos
            .iter()
            .copied()
            .filter(|i| match (self.shown.objects.get(i), self.tree.objects.get(i)) {
                (Some(a), Some(b)) => (a.mode, a.uid, a.gid) != (b.mode, b.uid, b.gid),
                _ => false,
            })
            .collect();
        self.shown = self.tree.clone();
        self.pending.push_back(ChangeEvent {
            version: v,
            inos,
            dirs,
            history_gone: false,
            names,
            removed,
            perms,
        });
        let contents = self.tree.contents(&self.blobs);
        self.history.push((v, contents));
        v
    }

    /// Applies one operation to `tree` at version `v`; returns (created ino or 0, inos, dirs).
    fn apply(&mut self, tree: &mut Tree, op: Op, v: u64) -> Result<(u64, Vec<u64>, Vec<u64>), FsError> {
        let is_dir = |t: &Tree, i: u64| t.objects.get(&i).is_some_and(|a| a.kind == NodeKind::Dir);
        match op {
            Op::Create {
                ino: at,
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
                ..
            } => {
                if !is_dir(tree, parent) {
                    return Err(FsError::NotFound);
                }
                if tree.child(parent, &name).is_some() {
                    return Err(FsError::Exists);
                }
                if hash.is_some_and(|h| !self.blobs.contains_key(&h)) {
                    return Err(FsError::Invalid("content not stored".into()));
                }
                let ino = match at {
                    Some(i) if tree.objects.contains_key(&i) || i > make_ino(VOL, self.next_ino) => {
                        return Err(FsError::Invalid("node id not reserved or in use".into()))
                    }
                    Some(i) => i,
                    None => self.new_ino(),
                };
                let attr = if kind == NodeKind::Dir {
                    dir_attr(ino, parent, v)
                } else {
                    Attr {
                        ino,
                        kind,
                        mode,
                        uid,
                        gid,
                        nlink: 1,
                        hash,
                        size,
                        symlink_target,
                        rdev,
                        version: v,
                        parent,
                        ..Default::default()
                    }
                };
                if kind == NodeKind::Dir {
                    tree.dirs.insert(ino, BTreeMap::new());
                }
                tree.objects.insert(ino, attr);
                tree.dirs.entry(parent).or_default().insert(name, ino);
                Ok((ino, vec![ino], vec![parent]))
            }
            Op::SetContent {
                expect,
                ino,
                hash,
                size,
                ..
            } => {
                if !self.blobs.contains_key(&hash) {
                    return Err(FsError::Invalid("content not stored".into()));
                }
                let a = tree.objects.get_mut(&ino).ok_or(FsError::NotFound)?;
                if expect.is_some_and(|e| e != a.version) {
                    return Err(FsError::Conflict(format!("{ino} is at version {}", a.version)));
                }
                if a.kind != NodeKind::File {
                    return Err(FsError::IsDir);
                }
                (a.hash, a.size, a.version) = (Some(hash), size, v);
                Ok((0, vec![ino], vec![]))
            }
            Op::SetAttr {
                ino, mode, mtime_ns, ..
            } => {
                let a = tree.objects.get_mut(&ino).ok_or(FsError::NotFound)?;
                a.mode = mode.unwrap_or(a.mode);
                a.mtime_ns = mtime_ns.unwrap_or(a.mtime_ns);
                a.version = v;
                Ok((0, vec![ino], vec![]))
            }
            Op::Remove {
                parent, name, expect, ..
            } => {
                let ino = tree.child(parent, &name).ok_or(FsError::NotFound)?;
                let version = tree.objects.get(&ino).map_or(0, |a| a.version);
                if expect.is_some_and(|e| e != version) {
                    return Err(FsError::Conflict(format!("{name} is at version {version}")));
                }
                if tree.dirs.get(&ino).is_some_and(|d| !d.is_empty()) {
                    return Err(FsError::NotEmpty);
                }
                tree.dirs.entry(parent).or_default().remove(&name);
                tree.objects.remove(&ino);
                tree.dirs.remove(&ino);
                Ok((0, vec![ino], vec![parent]))
            }
            Op::Rename {
                from_parent,
                from_name,
                to_parent,
                to_name,
                ..
            } => {
                let ino = tree.child(from_parent, &from_name).ok_or(FsError::NotFound)?;
                let mut inos = vec![ino];
                if let Some(old) = tree.child(to_parent, &to_name) {
                    if tree.dirs.get(&old).is_some_and(|d| !d.is_empty()) {
                        return Err(FsError::NotEmpty);
                    }
                    tree.objects.remove(&old);
                    tree.dirs.remove(&old);
                    inos.push(old);
                }
                tree.dirs.entry(from_parent).or_default().remove(&from_name);
                tree.dirs.entry(to_parent).or_default().insert(to_name, ino);
                if let Some(a) = tree.objects.get_mut(&ino) {
                    (a.parent, a.version) = (to_parent, v);
                }
                Ok((0, inos, vec![from_parent, to_parent]))
            }
            Op::Link { ino, parent, name, .. } => {
                if tree.child(parent, &name).is_some() {
                    return Err(FsError::Exists);
                }
                let a = tree.objects.get_mut(&ino).ok_or(FsError::NotFound)?;
                (a.nlink, a.version) = (a.nlink + 1, v);
                tree.dirs.entry(parent).or_default().insert(name, ino);
                Ok((0, vec![ino], vec![parent]))
            }
            Op::Expect { parent, name, version } => {
                let now = tree
                    .child(parent, &name)
                    .map_or(0, |i| tree.objects.get(&i).map_or(0, |a| a.version));
                if now != version {
                    return Err(FsError::Conflict(format!("{name} is at version {now}, not {version}")));
                }
                Ok((0, vec![], vec![]))
            }
            Op::ExpectNode { ino, version } => {
                let a = tree.objects.get_mut(&ino).ok_or(FsError::NotFound)?;
                if a.version != version {
                    return Err(FsError::Conflict(format!("{ino} is at version {}", a.version)));
                }
                a.version = v;
                Ok((0, vec![ino], vec![]))
            }
            Op::Reserve { count } => {
                let first = make_ino(VOL, self.next_ino + 1);
                self.next_ino += u64::from(count);
                Ok((first, vec![], vec![]))
            }
        }
    }

    /// A directory by path, created (with its parents) if missing; returns it and the
    /// directories whose entries changed.
    fn mkdirs(&mut self, path: &[&str]) -> (u64, Vec<u64>) {
        let mut cur = root();
        let mut changed = Vec::new();
        for p in path {
            cur = match self.tree.child(cur, p) {
                Some(i) => i,
                None => {
                    let v = self.tree.version;
                    let ino = self.new_ino();
                    self.tree.objects.insert(ino, dir_attr(ino, cur, v));
                    self.tree.dirs.insert(ino, BTreeMap::new());
                    self.tree.dirs.entry(cur).or_default().insert(p.to_string(), ino);
                    changed.push(cur);
                    ino
                }
            };
        }
        (cur, changed)
    }

    /// A metadata read answered as the transport answers it: from the lagging replica while it
    /// has reads left, but "not found" from a replica that has not applied the mount's own
    /// last commit is not final (another, current server is asked).
    fn read_with<T>(&mut self, f: impl Fn(&Tree) -> Result<T, FsError>) -> Result<T, FsError> {
        let committed = self.committed;
        let tree = self.read_tree();
        let behind = tree.version < committed;
        match f(tree) {
            Err(FsError::NotFound) if behind => f(&self.tree),
            r => r,
        }
    }

    /// Where metadata reads are answered from: the lagging replica while it has reads left.
    fn read_tree(&mut self) -> &Tree {
        match &mut self.lagging {
            Some(l) if l.reads_left > 0 => {
                l.reads_left -= 1;
                &l.tree
            }
            _ => &self.tree,
        }
    }
}

/// The version the node `op` changes has before it, as the servers answer it (0 for
/// operations they do not answer it for).
fn prior_of(tree: &Tree, op: &Op) -> u64 {
    let ino = match op {
        Op::SetAttr { ino, .. } | Op::SetContent { ino, .. } | Op::Link { ino, .. } => Some(*ino),
        Op::Rename {
            from_parent,
            from_name,
            to_parent,
            to_name,
            ..
        } if (from_parent, from_name) != (to_parent, to_name) => tree.child(*from_parent, from_name),
        _ => None,
    };
    ino.and_then(|i| tree.objects.get(&i)).map_or(0, |a| a.version)
}

impl FakeRemote {
    pub fn new() -> Self {
        let mut t = Truth {
            next_ino: 1,
            ..Default::default()
        };
        t.tree.version = 1;
        t.tree.objects.insert(root(), dir_attr(root(), root(), 1));
        t.tree.dirs.insert(root(), BTreeMap::new());
        t.history.push((1, Contents::new()));
        t.shown = t.tree.clone();
        FakeRemote(Mutex::new(t))
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, Truth> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check_up(&self) -> Result<(), FsError> {
        if self.lock().down {
            Err(FsError::Disconnected("fake server down".into()))
        } else {
            Ok(())
        }
    }

    /// A revoked token, as the servers refuse it.
    fn check_refused(&self, token: &str) -> Result<(), FsError> {
        if self.lock().refused_tokens.contains(token) {
            Err(FsError::Unauthenticated("token revoked".into()))
        } else {
            Ok(())
        }
    }

    /// Another node writes a file (directories created as needed); returns its change event,
    /// which stays pending for delivery too.
    pub fn write(&self, path: &[&str], name: &str, content: &[u8]) -> ChangeEvent {
        let mut t = self.lock();
        t.tree.version += 1;
        let v = t.tree.version;
        let (d, mut dirs) = t.mkdirs(path);
        let h = store(&mut t.blobs, content);
        let ino = match t.tree.child(d, name) {
            Some(i) => i,
            None => {
                let i = t.new_ino();
                t.tree.dirs.entry(d).or_default().insert(name.to_string(), i);
                dirs.push(d);
                i
            }
        };
        let attr = Attr {
            ino,
            kind: NodeKind::File,
            size: content.len() as u64,
            mode: 0o644,
            nlink: 1,
            hash: Some(h),
            version: v,
            parent: d,
            ..Default::default()
        };
        t.tree.objects.insert(ino, attr);
        t.finish(vec![ino], dirs);
        t.pending.back().cloned().unwrap_or_default()
    }

    /// Another node changes the mode of a path ("a/b"), if present; returns the change event
    /// (also pending).
    pub fn chmod(&self, path: &[&str], mode: u32) -> Option<ChangeEvent> {
        let mut t = self.lock();
        let mut ino = root();
        for p in path {
            ino = t.tree.child(ino, p)?;
        }
        t.tree.version += 1;
        let v = t.tree.version;
        let a = t.tree.objects.get_mut(&ino)?;
        a.mode = mode;
        a.version = v;
        t.finish(vec![ino], vec![]);
        t.pending.back().cloned()
    }

    /// Another node removes a file or an empty directory, if present; returns the change event
    /// (also pending).
    pub fn remove(&self, path: &[&str], name: &str) -> Option<ChangeEvent> {
        let mut t = self.lock();
        let mut d = root();
        for p in path {
            d = t.tree.child(d, p)?;
        }
        let ino = t.tree.child(d, name)?;
        if t.tree.objects.get(&ino)?.kind == NodeKind::Dir {
            // Only an empty directory, as the servers remove one.
            if !t.tree.dirs.get(&ino).is_none_or(|e| e.is_empty()) {
                return None;
            }
            t.tree.dirs.remove(&ino);
        }
        t.tree.dirs.get_mut(&d)?.remove(name);
        t.tree.objects.remove(&ino);
        t.tree.version += 1;
        t.finish(vec![ino], vec![d]);
        t.pending.back().cloned()
    }

    /// The current content of a path ("a/b/y"), if it is a file.
    pub fn content(&self, path: &str) -> Option<Vec<u8>> {
        let t = self.lock();
        t.history.last().and_then(|(_, c)| c.get(path).cloned())
    }

    /// The answers a read of `path` may give if it began when the mount showed version `from`
    /// and ended at version `to`: the content at `from`, and every content it had after.
    pub fn contents_between(&self, path: &str, from: u64, to: u64) -> Vec<Option<Vec<u8>>> {
        let t = self.lock();
        let at_from = t.history.iter().rposition(|(v, _)| *v <= from).unwrap_or(0);
        t.history[at_from..]
            .iter()
            .take_while(|(v, _)| *v <= to)
            .map(|(_, c)| c.get(path).cloned())
            .collect()
    }

    /// The first version after `from` at which `path` held `content` (`None`: no file).
    pub fn version_with(&self, path: &str, content: Option<&[u8]>, from: u64) -> Option<u64> {
        let t = self.lock();
        t.history
            .iter()
            .find(|(v, c)| *v > from && c.get(path).map(Vec::as_slice) == content)
            .map(|(v, _)| *v)
    }

    /// The names in directory `path` (`""`: the volume root) now, sorted; `None`: no such
    /// directory.
    pub fn names(&self, path: &str) -> Option<Vec<String>> {
        let t = self.lock();
        let mut cur = root();
        for p in path.split('/').filter(|p| !p.is_empty()) {
            cur = t.tree.child(cur, p)?;
        }
        let mut v: Vec<String> = t.tree.dirs.get(&cur)?.keys().cloned().collect();
        v.sort();
        Some(v)
    }

    /// Whether a file had `path` at any version.
    pub fn ever_had(&self, path: &str) -> bool {
        let t = self.lock();
        t.history.iter().any(|(_, c)| c.contains_key(path))
    }

    /// Whether any file held `content` at any version.
    pub fn ever_held(&self, content: &[u8]) -> bool {
        let t = self.lock();
        t.history.iter().any(|(_, c)| c.values().any(|v| v == content))
    }

    /// The current version.
    pub fn version(&self) -> u64 {
        self.lock().tree.version
    }

    /// Metadata reads come from the state as of now, for the next `reads` reads.
    pub fn lag(&self, reads: u32) {
        let mut t = self.lock();
        let tree = t.tree.clone();
        t.lagging = Some(Lagging {
            tree,
            reads_left: reads,
        });
    }
}

impl Remote for FakeRemote {
    async fn volumes(&self) -> Result<Vec<RemoteVolume>, FsError> {
        self.check_up()?;
        Ok(vec![RemoteVolume {
            name: "www".into(),
            id: VOL,
            root_ino: root(),
            version: self.lock().tree.version,
            public_read: true,
            owner: "alice".into(),
            writers: vec!["bob".into()],
            write_quorum: 2,
        }])
    }

    async fn getattr(&self, ino: u64) -> Result<Fetched<Attr>, FsError> {
        self.check_up()?;
        self.lock().read_with(|tree| {
            let a = tree.objects.get(&ino).cloned().ok_or(FsError::NotFound)?;
            Ok(Fetched {
                newest: a.version,
                applied: tree.version,
                value: a,
            })
        })
    }

    async fn readdir(&self, ino: u64) -> Result<Fetched<Vec<(String, Attr)>>, FsError> {
        self.check_up()?;
        let mut t = self.lock();
        t.readdirs += 1;
        t.read_with(|tree| {
            let d = tree.dirs.get(&ino).ok_or(FsError::NotFound)?;
            let value: Vec<(String, Attr)> = d
                .iter()
                .filter_map(|(n, i)| tree.objects.get(i).map(|a| (n.clone(), a.clone())))
                .collect();
            Ok(Fetched {
                newest: value
                    .iter()
                    .map(|(_, a)| a.version)
                    .chain(tree.objects.get(&ino).map(|a| a.version))
                    .max()
                    .unwrap_or(0),
                applied: tree.version,
                value,
            })
        })
    }

    async fn fetch_blob(&self, blob: &crate::transport::BlobRef, sink: &mut dyn ChunkSink) -> Result<(), FsError> {
        self.check_up()?;
        let data = {
            let mut t = self.lock();
            t.blob_fetches += 1;
            t.blobs.get(&blob.hash).cloned().ok_or(FsError::NotFound)?
        };
        // Two chunks, to exercise incremental verification.
        let mid = data.len() / 2;
        sink.write(&data[..mid])?;
        sink.write(&data[mid..])?;
        Ok(())
    }

    async fn fetch_small(&self, blobs: Vec<crate::transport::BlobRef>) -> Result<Vec<(Hash, bytes::Bytes)>, FsError> {
        self.check_up()?;
        let gate = self.lock().small_gate.clone();
        if let Some(gate) = gate {
            let _ = gate.acquire().await;
        }
        let t = self.lock();
        Ok(blobs
            .iter()
            .filter_map(|b| {
                let data = t.blobs.get(&b.hash)?;
                let data = if t.corrupt_small {
                    vec![0xee; data.len()]
                } else {
                    data.clone()
                };
                Some((b.hash, bytes::Bytes::from(data)))
            })
            .collect())
    }

    async fn stamps(&self, volumes: Vec<String>) -> Result<Vec<VolumeStamp>, FsError> {
        self.check_up()?;
        let v = self.lock().tree.version;
        Ok(volumes
            .into_iter()
            .map(|volume| VolumeStamp {
                exists: volume == "www",
                volume,
                version: v,
            })
            .collect())
    }

    async fn subscribe(&self, _volume: String, _from: u64) -> Result<ChangeStream, FsError> {
        Err(FsError::Disconnected("the tests deliver changes themselves".into()))
    }

    async fn check_token(&self, _token: &str) -> Result<(), FsError> {
        self.check_up()
    }

    async fn put_blob(&self, token: &str, data: bytes::Bytes, _write_quorum: u32) -> Result<(), FsError> {
        self.check_up()?;
        self.check_refused(token)?;
        let mut t = self.lock();
        if t.blobs.insert(Hash::of(&data), data.to_vec()).is_none() {
            t.new_blob_bytes += data.len() as u64;
        }
        Ok(())
    }

    async fn missing(&self, token: &str, hashes: Vec<Hash>) -> Result<Vec<Hash>, FsError> {
        self.check_up()?;
        self.check_refused(token)?;
        let t = self.lock();
        Ok(hashes.into_iter().filter(|h| !t.blobs.contains_key(h)).collect())
    }

    async fn commit(&self, token: &str, volume: &str, ops: Vec<Op>, request: RequestId) -> Result<Committed, FsError> {
        self.check_up()?;
        let gate = self.lock().commit_gate.clone();
        if let Some(gate) = gate {
            let _ = gate.acquire().await;
        }
        self.check_refused(token)?;
        if volume != "www" {
            return Err(FsError::NotFound);
        }
        let mut t = self.lock();
        if let Some(done) = t.requests.get(&request) {
            return Ok(done.clone());
        }
        let failure = t.fail_next_commit.take();
        if t.refuse_commits > 0 {
            t.refuse_commits -= 1;
            return Err(FsError::Denied("the fake refuses this commit".into()));
        }
        if failure == Some(CommitFailure::Refused) {
            return Err(FsError::Denied("the fake refuses this commit".into()));
        }
        // All or nothing: apply to a copy, keep it only if every operation succeeds.
        let v = t.tree.version + 1;
        let mut tree = t.tree.clone();
        let next_ino = t.next_ino;
        let (mut created, mut inos, mut dirs) = (Vec::new(), Vec::new(), Vec::new());
        let mut prior = Vec::new();
        for op in ops {
            prior.push(prior_of(&tree, &op));
            match t.apply(&mut tree, op, v) {
                Ok((c, i, d)) => {
                    created.push(c);
                    inos.extend(i);
                    dirs.extend(d);
                }
                Err(e) => {
                    t.next_ino = next_ino;
                    return Err(e);
                }
            }
        }
        tree.version = v;
        t.tree = tree;
        t.committed = v;
        t.finish(inos, dirs);
        // As the servers do, a repeated request is answered without the versions before it.
        t.requests.insert(
            request,
            Committed {
                version: v,
                created: created.clone(),
                prior: Vec::new(),
            },
        );
        match failure {
            Some(_) => Err(FsError::Disconnected("the fake lost the commit's reply".into())),
            None => Ok(Committed {
                version: v,
                created,
                prior,
            }),
        }
    }
}
