//! One version at a time: how a mount applies change events so that a published commit
//! appears whole.
//!
//! The mount shows each volume as of the last change event it applied (`seen`). Metadata
//! fetched from a replica is cached and shown only once it is that state (`Core::settle`), and
//! an event switches the cache and the kernel's copies in one step while replies that show
//! metadata wait ([`Core::current`], [`Core::apply_change`]). So a reader never sees part of a
//! commit and then something older. docs/SEMANTICS.md ("Callbacks") has the whole argument,
//! including what the kernel does with each kind of invalidation.
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::remote::{Fetched, Remote};
use super::types::{Attr, ChangeEvent};
use super::{kind_of, Core, FsError, Invalidation, Invalidator, NodeAttr, NodeKind};
use crate::cache::meta::VolState;

/// What a change did to the names the kernel holds (see [`Core::name_changes`]).
#[derive(Debug, Default)]
struct NameChanges {
    /// Names that vanished or lead elsewhere: (directory, name).
    entries: Vec<(u64, String)>,
    /// The nodes those names led to.
    gone: Vec<u64>,
    /// A name now leads elsewhere while its old node is listed elsewhere, or it is unknown.
    moved: bool,
}

/// A changed directory's names after a change, as far as [`Core::name_changes`] needs them.
enum After {
    /// The whole listing (read from a server).
    Listing(HashMap<String, u64>),
    /// Only the names the change touched, with where each leads now (`None`: removed); every
    /// other name is unchanged. From the event itself: nothing is read.
    Touched(HashMap<String, Option<u64>>),
}

impl After {
    /// Where `name` leads after the change, given where it led before.
    fn now(&self, name: &str, before: u64) -> Option<u64> {
        match self {
            After::Listing(l) => l.get(name).copied(),
            After::Touched(t) => t.get(name).copied().unwrap_or(Some(before)),
        }
    }

    /// Nodes this knows a name of after the change.
    fn listed(&self) -> Vec<u64> {
        match self {
            After::Listing(l) => l.values().copied().collect(),
            After::Touched(t) => t.values().flatten().copied().collect(),
        }
    }
}

/// What [`Core::look_ahead`] learnt before a switch.
#[derive(Default)]
struct Ahead {
    /// Names after the change of the changed directories the kernel holds names in
    /// (`None`: unknown).
    fresh: HashMap<u64, Option<After>>,
    /// Nodes that lost a name and are gone from the volume.
    vanished: std::collections::HashSet<u64>,
}

/// Vanished names whose nodes are checked (16 at a time); more than this drops every name
/// instead.
const MAX_GONE_CHECKS: usize = 4096;

/// Names told to the kernel that are remembered (see [`Core::name_changes`]); past this, all
/// are dropped, in the kernel too, and learnt again.
const MAX_TOLD_NAMES: usize = 1 << 20;

/// Asking a lagging replica again: pauses doubling from 2 ms to 50 ms, until a deadline.
struct Retry {
    deadline: tokio::time::Instant,
    pause: Duration,
}

impl Retry {
    fn until(deadline: tokio::time::Instant) -> Self {
        Retry {
            deadline,
            pause: Duration::from_millis(2),
        }
    }

    /// Sleeps before the next try; false, without sleeping, if that would pass the deadline.
    async fn pause(&mut self) -> bool {
        if tokio::time::Instant::now() + self.pause > self.deadline {
            return false;
        }
        tokio::time::sleep(self.pause).await;
        self.pause = (self.pause * 2).min(Duration::from_millis(50));
        true
    }
}

/// What to do with metadata fetched from a replica (see [`Core::settle`]).
enum Settle {
    /// It is the mount's current state, and was cached.
    Cached,
    /// Show it once, do not cache it (its change event did not arrive in time).
    Show,
    /// The replica was behind, or an event switched the state meanwhile: read again.
    Again,
}

impl<R: Remote> Core<R> {
    /// The applied version of the volume holding `ino` (None: not a known volume).
    pub(super) fn seen_of(&self, ino: u64) -> Option<u64> {
        self.volume_of(ino).map(|v| v.seen)
    }

    /// Orders metadata fetched for node `ino` against the change events this mount applied,
    /// and caches it (`put`) when it is exactly the state the mount shows.
    ///
    /// The mount shows a volume as of its last applied event, `seen`. Data read at replica index
    /// `applied >= seen` whose newest part changed at or before `seen` is that state, unless the
    /// replica has not applied this mount's own newest commit (its event may still be on the
    /// way: the data may predate the mount's own write), which counts as behind. Data with
    /// a newer change waits (at most the operation timeout) for that change's event, so the
    /// kernel is never shown part of a commit before the mount has switched to all of it; if
    /// the event does not come (no change stream), the data is shown but not cached. Data from
    /// a replica behind `seen` is read again.
    async fn settle<T>(
        &self,
        ino: u64,
        f: &Fetched<T>,
        put: impl FnOnce(&T) -> Result<(), FsError>,
    ) -> Result<Settle, FsError> {
        let own = self.writes.own_floor();
        if self.seen_of(ino).is_some_and(|seen| f.applied < seen.max(own)) {
            return Ok(Settle::Again);
        }
        if !self.wait_seen(ino, f.newest).await {
            return Ok(Settle::Show);
        }
        let _g = self.apply_mx.lock().unwrap_or_else(|p| p.into_inner());
        // Not a known volume: there is no version to keep in step with. An own commit recorded
        // while this waited is a newer floor (its listing patch must not be overwritten).
        let own = self.writes.own_floor();
        if self
            .seen_of(ino)
            .is_none_or(|seen| f.applied >= seen.max(own) && f.newest <= seen)
        {
            match put(&f.value) {
                Ok(()) => Ok(Settle::Cached),
                // The metadata cache could not be written (its disk is full, say): show what was
                // fetched without caching it, rather than failing the reader.
                Err(e) => {
                    tracing::warn!(ino, error = %e, "metadata cache write failed; answering uncached");
                    Ok(Settle::Show)
                }
            }
        } else {
            Ok(Settle::Again)
        }
    }

    /// Waits (at most the operation timeout) until the mount has applied the events of the
    /// volume holding `ino` up to `version`; false if they did not come in time.
    async fn wait_seen(&self, ino: u64, version: u64) -> bool {
        let mut rx = self.applied_tx.subscribe();
        let wait = async {
            while self.seen_of(ino).is_some_and(|s| version > s) {
                if rx.changed().await.is_err() {
                    break;
                }
            }
        };
        let came = tokio::time::timeout(self.cfg.op_timeout, wait).await.is_ok();
        if let (false, Some(v)) = (came, self.volume_of(ino)) {
            self.stream_behind(&v.name);
        }
        came
    }

    /// A node the servers no longer have: its removal may be newer than what the mount shows,
    /// so wait for the volume's current version before answering "gone" (the rest of that
    /// commit is then shown with it).
    pub(super) async fn settle_gone(&self, ino: u64) {
        let Some(vol) = self.volume_of(ino) else { return };
        if let Ok(Ok(stamps)) = tokio::time::timeout(self.cfg.op_timeout, self.remote.stamps(vec![vol.name])).await {
            if let Some(s) = stamps.into_iter().find(|s| s.exists) {
                self.wait_seen(ino, s.version).await;
            }
        }
    }

    /// Fetches metadata of `ino` and settles it (see [`Core::settle`]).
    pub(super) async fn fetch_settled<T, Fut>(
        &self,
        ino: u64,
        fetch: impl Fn() -> Fut,
        put: impl Fn(&T) -> Result<(), FsError>,
    ) -> Result<T, FsError>
    where
        Fut: std::future::Future<Output = Result<Fetched<T>, FsError>>,
    {
        // A replica behind the mount (a follower catching up after a failover) is asked again
        // for up to the operation timeout; one that stays behind longer is shown as it is
        // rather than failing the request.
        let mut retry = Retry::until(tokio::time::Instant::now() + self.cfg.op_timeout);
        loop {
            let f = fetch().await?;
            match self.settle(ino, &f, &put).await? {
                Settle::Cached | Settle::Show => return Ok(f.value),
                Settle::Again => {
                    if !retry.pause().await {
                        return Ok(f.value);
                    }
                }
            }
        }
    }

    /// Attributes of `ino` right after this mount's own change, cached at once without waiting
    /// for the change's event (read-your-writes). A replica that has not applied the change yet
    /// is asked again for up to the operation timeout; if none catches up, the answer is shown
    /// but not cached.
    pub(super) async fn fetch_own(&self, ino: u64) -> Result<Attr, FsError> {
        let floor = self.writes.own_floor();
        let mut retry = Retry::until(tokio::time::Instant::now() + self.cfg.op_timeout);
        loop {
            let f = self.timed(self.cfg.op_timeout, self.remote.getattr(ino)).await?;
            if f.applied >= floor {
                self.meta.put_attr(&f.value).map_err(Self::io)?;
                return Ok(f.value);
            }
            if !retry.pause().await {
                return Ok(f.value);
            }
        }
    }

    /// Whether the reply about to show `a` must first drop the kernel's pages of it: true once
    /// after a change replaced it, if its size and mtime look unchanged to the kernel. When they
    /// differ the kernel drops the pages itself on reading the reply, and dropping them here
    /// would make it discard the reply's attributes.
    pub(super) fn take_stale_pages(&self, a: &NodeAttr) -> bool {
        let Some(shown) = self
            .stale_pages
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&a.ino)
        else {
            return false;
        };
        // Only files are remembered (see `shown_files`).
        let drop = shown == (a.size, a.mtime_ns);
        if drop {
            self.stats.stale_page_drops.fetch_add(1, Ordering::Relaxed);
        }
        drop
    }

    /// Runs `f` and returns its result with a read guard on the view: hold the guard until the
    /// reply is sent. If a change event switched the view while `f` ran, `f` runs again, so a
    /// reply never shows the kernel a state older than one it was already shown.
    pub(super) async fn current<T, Fut>(&self, f: impl Fn() -> Fut) -> (T, tokio::sync::RwLockReadGuard<'_, ()>)
    where
        Fut: std::future::Future<Output = T>,
    {
        let mut attempt = 0;
        loop {
            let gen = self.view_gen.load(Ordering::Acquire);
            let r = f().await;
            let guard = self.view.read().await;
            // Eight switches during one request mean events without pause: answer anyway (the
            // kernel still discards attributes older than an invalidation it received).
            if self.view_gen.load(Ordering::Acquire) == gen || attempt == 7 {
                return (r, guard);
            }
            attempt += 1;
        }
    }

    /// Applies one change event of `volume`: switches the cache and the kernel's copies to the
    /// event's version in one step, and returns the invalidations that may follow in the
    /// background (page caches, and the names that changed on kernels without name epochs).
    ///
    /// The switch happens under the view's write lock, so no reply computed from the old state
    /// goes out after it; the kernel part of it ([`Invalidator::switch`]) takes no lock a pending
    /// request could hold, so it cannot deadlock with requests waiting for that lock.
    pub async fn apply_change(
        &self,
        volume: &str,
        ev: &ChangeEvent,
        kernel: &dyn Invalidator,
    ) -> Result<Invalidation, FsError> {
        let Some(vol) = self
            .volumes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(volume)
            .cloned()
        else {
            return Ok(Invalidation::default());
        };
        if ev.version <= vol.seen && !ev.history_gone {
            return Ok(Invalidation::default());
        }
        let foreign = !ev.history_gone && !self.writes.is_own(ev.version);
        let ahead = self.look_ahead(ev, foreign).await;
        // Wait for our own namespace commits in flight to record what they told the kernel.
        let lock = self.writes.inflight(vol.id);
        let _inflight = lock.write().await;
        // Our own commit: the kernel already shows it (see write::commit).
        let own = !ev.history_gone && self.writes.take_own(ev.version);
        let mut changed: Vec<u64> = ev.inos.iter().chain(&ev.dirs).copied().collect();
        changed.sort_unstable();
        changed.dedup();
        if !own {
            // Before the switch holds every reply back: this may wait on the write-back log's
            // lock, and the cache still shows the state before the event until the switch.
            self.note_places(&ev.inos);
        }
        let inv = {
            let _view = self.view.write().await;
            // No reply goes out now, so the names told to the kernel are all known here. (An own
            // commit's names were told by its own replies; one recorded after `foreign` was
            // decided is handled as anyone's, which is always safe.)
            let names = if own || ev.history_gone {
                NameChanges::default()
            } else if !foreign {
                NameChanges {
                    moved: true,
                    ..NameChanges::default()
                }
            } else {
                self.name_changes(&ev.dirs, &ahead.fresh)
            };
            let drop_all = ev.history_gone || names.moved || names.gone.iter().any(|i| !ahead.vanished.contains(i));
            let (mut inv, late_names) = self.switch_cache(vol, ev, own, &changed)?;
            self.view_gen.fetch_add(1, Ordering::AcqRel);
            inv.inodes.extend(changed.iter().copied());
            inv.inodes.sort_unstable();
            inv.inodes.dedup();
            let dropped = kernel.switch(&inv.inodes, drop_all);
            self.drop_names(dropped, names.entries.into_iter().chain(late_names), &mut inv, kernel);
            inv
        };
        self.applied_tx.send_modify(|n| *n += 1);
        Ok(inv)
    }

    /// What a change did to the names the kernel holds, found before anything is locked
    /// (network reads): the listings after the change, and which nodes that lost a name
    /// vanished. A name of a node that is gone from the volume can wait (ESTALE on its next
    /// use); one of a node that still exists cannot. All of it within one operation timeout:
    /// past that, what is not known is assumed the worst (every name is dropped) rather than
    /// holding the event back.
    async fn look_ahead(&self, ev: &ChangeEvent, foreign: bool) -> Ahead {
        let deadline = tokio::time::Instant::now() + self.cfg.op_timeout;
        let mut ahead = Ahead::default();
        if foreign {
            for dir in &ev.dirs {
                if self.told_names_in(*dir) {
                    let after = match &ev.names {
                        Some(names) => Some(self.touched_in(*dir, names)),
                        None => self.listing_after(*dir, ev.version, deadline).await.map(After::Listing),
                    };
                    ahead.fresh.insert(*dir, after);
                }
            }
        }
        let before = self.name_changes(&ev.dirs, &ahead.fresh);
        if ev.names.is_some() {
            // The event says which nodes it deleted: nothing to ask.
            let removed: std::collections::HashSet<u64> = ev.removed.iter().copied().collect();
            ahead.vanished = before.gone.into_iter().filter(|i| removed.contains(i)).collect();
            return ahead;
        }
        if !before.moved && before.gone.len() <= MAX_GONE_CHECKS {
            use futures::StreamExt;
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let vanished = &mut ahead.vanished;
            let checks = futures::stream::iter(before.gone.iter().copied())
                .map(|ino| async move { (ino, self.remote.getattr(ino).await) })
                .buffer_unordered(16)
                .for_each(|(ino, r)| {
                    if let Err(FsError::NotFound) = r {
                        vanished.insert(ino);
                    }
                    std::future::ready(())
                });
            // Past the deadline, the nodes not checked count as still existing.
            let _ = tokio::time::timeout(left, checks).await;
        }
        ahead
    }

    /// The cache part of a switch (under the view's write lock): forgets what the change
    /// replaced and moves the volume to the event's version. Returns the invalidations of a
    /// whole volume (history gone) and the names of changed files the kernel was told.
    fn switch_cache(
        &self,
        mut vol: VolState,
        ev: &ChangeEvent,
        own: bool,
        changed: &[u64],
    ) -> Result<(Invalidation, Vec<(u64, String)>), FsError> {
        let _g = self.apply_mx.lock().unwrap_or_else(|p| p.into_inner());
        let late_names = if own {
            Vec::new()
        } else {
            self.shown_files(changed, ev.history_gone)
        };
        let mut inv = Invalidation::default();
        if ev.history_gone {
            inv = self.everything_in(vol.id)?;
            self.meta.forget_volume(vol.id).map_err(Self::io)?;
        } else if !own {
            match &ev.names {
                // Cached listings are as of `seen`, so the event's names bring them to its
                // version, unless a newer commit of this mount already patched them (its event
                // still to come): those are read again.
                Some(names) if self.writes.own_floor() <= ev.version => {
                    self.meta.forget_attrs(changed, &ev.perms).map_err(Self::io)?;
                    self.meta.forget(&ev.removed, &[]).map_err(Self::io)?;
                    self.meta.patch_dirs(names).map_err(Self::io)?;
                }
                _ => self.meta.forget(changed, &ev.dirs).map_err(Self::io)?,
            }
        }
        // Our own commit's changes are in the cache already: its listings were patched and its
        // attributes forgotten when the reply came (write.rs `commit`, back.rs `after_commit`),
        // and anything fetched since reflects it (the own-commit floor). Forgetting them again
        // would make the next create in the same directory fetch its whole listing.
        vol.seen = ev.version;
        self.meta.put_volume(&vol).map_err(Self::io)?;
        self.volumes
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(vol.name.clone(), vol);
        self.writes.settled_own(ev.version);
        Ok((inv, late_names))
    }

    /// The kernel-names part of a switch: if the kernel `dropped` every name, each is told
    /// again; otherwise `entries` go one by one in the background. Until then a name of a
    /// vanished node answers ESTALE, which makes the kernel look it up again. (Without name
    /// epochs a moved name can show its old node until then.) A lookup answered just before
    /// the switch may reach the kernel after it, too late for the attribute drop: the changed
    /// files' names are among `entries` too, and the kernel orders their drop after the
    /// lookup (directory lock).
    fn drop_names(
        &self,
        dropped: bool,
        entries: impl Iterator<Item = (u64, String)>,
        inv: &mut Invalidation,
        kernel: &dyn Invalidator,
    ) {
        let mut told = self.kernel_names.lock().unwrap_or_else(|p| p.into_inner());
        if dropped {
            told.clear();
            return;
        }
        for (dir, name) in entries {
            if let Some(d) = told.get_mut(&dir) {
                d.remove(name.as_str());
            }
            inv.entries.push((dir, name));
        }
        if told.values().map(HashMap::len).sum::<usize>() > MAX_TOLD_NAMES {
            // Bounded memory: forget them all, and make the kernel forget them too.
            if kernel.switch(&[], true) {
                told.clear();
            }
        }
    }

    /// The changed files the kernel was told a name of, with those names: each is remembered
    /// with the size and mtime the kernel was shown (see `take_stale_pages`), and its names are
    /// returned to be dropped in the background. Directories are left out: dropping a
    /// directory's name drops everything cached below it. Call before the change is forgotten.
    fn shown_files(&self, changed: &[u64], reset: bool) -> Vec<(u64, String)> {
        let mut stale = self.stale_pages.lock().unwrap_or_else(|p| p.into_inner());
        if reset || stale.len() > MAX_TOLD_NAMES {
            stale.clear();
        }
        let told = self.kernel_names.lock().unwrap_or_else(|p| p.into_inner());
        let mut names = Vec::new();
        for ino in changed {
            let Ok(Some(a)) = self.meta.attr(*ino) else { continue };
            if a.kind == NodeKind::Dir {
                continue;
            }
            let Some(in_parent) = told.get(&a.parent) else { continue };
            let before = names.len();
            names.extend(
                in_parent
                    .iter()
                    .filter(|(_, i)| **i == *ino)
                    .map(|(n, _)| (a.parent, n.to_string())),
            );
            if names.len() > before {
                stale.insert(*ino, (a.size, a.mtime_ns));
            }
        }
        names
    }

    /// A directory's entries as of at least `version` (a lagging replica is asked again until
    /// `deadline`); a directory that is gone has none. `None`: unknown.
    async fn listing_after(
        &self,
        dir: u64,
        version: u64,
        deadline: tokio::time::Instant,
    ) -> Option<HashMap<String, u64>> {
        let mut retry = Retry::until(deadline);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return None;
            }
            match self.timed(left, self.remote.readdir(dir)).await {
                Ok(l) if l.applied >= version => {
                    let mut names: HashMap<String, u64> = l.value.into_iter().map(|(n, a)| (n, a.ino)).collect();
                    // Names this mount made or removed and has not sent yet stay so (write-back).
                    for (n, now) in self.writes.new_names(dir) {
                        match now {
                            Some((ino, _)) => names.insert(n, ino),
                            None => names.remove(&n),
                        };
                    }
                    return Some(names);
                }
                Err(FsError::NotFound) => return Some(HashMap::new()),
                Ok(_) if retry.pause().await => {}
                _ => return None,
            }
        }
    }

    /// The names a change touched in `dir` (from its event), with where each leads now. Names
    /// this mount made or removed and has not sent yet stay so (write-back).
    fn touched_in(&self, dir: u64, names: &[crate::cache::meta::DirPatch]) -> After {
        let mut touched: HashMap<String, Option<u64>> = names
            .iter()
            .filter(|(d, _, _)| *d == dir)
            .map(|(_, name, target)| (name.clone(), target.map(|(ino, _)| ino)))
            .collect();
        for (n, now) in self.writes.new_names(dir) {
            touched.insert(n, now.map(|(ino, _)| ino));
        }
        After::Touched(touched)
    }

    /// Whether the kernel was told any name in `dir`.
    fn told_names_in(&self, dir: u64) -> bool {
        self.kernel_names
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&dir)
            .is_some_and(|d| !d.is_empty())
    }

    /// Records that a reply told the kernel `name` in `parent` leads to `ino`; call it while the
    /// view's read guard is held, before the reply is sent.
    pub(super) fn told_name(&self, parent: u64, name: &str, ino: u64) {
        self.kernel_names
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(parent)
            .or_default()
            .insert(name.into(), ino);
    }

    /// Records that the kernel dropped `name` in `parent` (our own unlink or rename).
    pub fn forgot_name(&self, parent: u64, name: &str) {
        if let Some(d) = self
            .kernel_names
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&parent)
        {
            d.remove(name);
        }
    }

    /// Which names the kernel holds that a change retargeted, given the directories' listings
    /// after it (`None`: unknown). The kernel learns names only from our replies, and keeps them
    /// until it is told to drop them, so those are the names to check.
    ///
    /// Dropping every cached name (the epoch) also evicts every cached page, so it is done only
    /// when needed: when a name the kernel holds now leads elsewhere while its old node still
    /// exists (a rename), since that name would keep showing the old node. A name whose node
    /// vanished needs nothing at once: the switch dropped the node's attributes, the kernel asks
    /// for them on the next use, gets ESTALE and looks the name up again. Added names need
    /// nothing: the kernel does not keep our "not found" answers.
    fn name_changes(&self, dirs: &[u64], fresh: &HashMap<u64, Option<After>>) -> NameChanges {
        let mut out = NameChanges::default();
        let told = self.kernel_names.lock().unwrap_or_else(|p| p.into_inner());
        let mut listed: std::collections::HashSet<u64> = std::collections::HashSet::new();
        for (dir, names) in told.iter() {
            let Some(listing) = fresh.get(dir) else {
                continue;
            };
            let Some(listing) = listing else {
                // The new listing is unknown: assume the worst.
                out.moved = true;
                out.entries.extend(names.keys().map(|n| (*dir, n.to_string())));
                continue;
            };
            for (name, ino) in names {
                if listing.now(name, *ino) != Some(*ino) {
                    out.entries.push((*dir, name.to_string()));
                    out.gone.push(*ino);
                }
            }
            listed.extend(listing.listed());
        }
        // A changed directory the kernel had no name of when the listings were fetched, and was
        // told one since: its new listing is unknown.
        if dirs
            .iter()
            .any(|d| !fresh.contains_key(d) && told.get(d).is_some_and(|n| !n.is_empty()))
        {
            out.moved = true;
        }
        if out.gone.iter().any(|i| listed.contains(i)) {
            out.moved = true;
        }
        out
    }

    /// Invalidations covering everything cached of a volume.
    fn everything_in(&self, id: u32) -> Result<Invalidation, FsError> {
        let mut inv = Invalidation::default();
        let vols = self.volumes.read().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = vols.values().find(|v| v.id == id) {
            let mut stack = vec![v.root_ino];
            while let Some(d) = stack.pop() {
                inv.inodes.push(d);
                if let Some(l) = self.meta.dir(d).map_err(Self::io)? {
                    for e in l {
                        inv.entries.push((d, e.name.clone()));
                        if kind_of(e.kind) == NodeKind::Dir {
                            stack.push(e.ino);
                        } else {
                            inv.inodes.push(e.ino);
                        }
                    }
                }
            }
        }
        Ok(inv)
    }
}
