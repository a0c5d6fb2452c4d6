//! Running a mount: caches, core, FUSE session, callback tasks, the control socket, and a clean
//! unmount on SIGINT/SIGTERM.
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::sync::watch;

use crate::cache::blobs::BlobCache;
use crate::cache::meta::MetaStore;
use crate::core::grpc::GrpcRemote;
use crate::core::remote::Remote;
use crate::core::write::{WriteBack, WriteState};
use crate::core::Invalidator;
use crate::core::{Core, CoreConfig};
use crate::fuse::{CodaFs, KernelInvalidator};
use crate::tokens::TokenTable;
use crate::transport::Cluster;

/// Settings of one mount.
#[derive(Debug, Clone)]
pub struct MountConfig {
    pub mountpoint: PathBuf,
    pub servers: Vec<String>,
    /// The server to use first (one of `servers`); `None` = one at random (see `transport`).
    pub prefer: Option<String>,
    /// TLS against the cluster CA, or plaintext for an `--insecure` cluster.
    pub tls: crate::transport::Tls,
    pub cache_dir: PathBuf,
    pub cache_size: u64,
    pub op_timeout: Duration,
    /// How often the volume list is refreshed (new and deleted volumes under `/coda`).
    pub volume_poll: Duration,
    /// Refuse every change whatever tokens exist (web nodes). Also mounts read-only in the
    /// kernel and keeps the zero-request warm read path (no open/flush/release requests).
    pub read_only: bool,
    /// Writable mounts: `close` waits until the change is on the servers, instead of until it
    /// is in the write-back log.
    pub write_through: bool,
    /// Bound of the write-back log in bytes (past it, changes fail with ENOSPC).
    pub log_limit: u64,
    /// Where to serve Prometheus metrics (`GET /metrics`, plain unauthenticated HTTP; see
    /// `crate::metrics`); `None` = nowhere.
    pub metrics_listen: Option<String>,
    /// How often the blob cache's index is checkpointed for a fast start after a crash (see
    /// `cache/blobs.rs`); `None` = never.
    pub cache_checkpoint: Option<Duration>,
}

/// Mount failures.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("{0}")]
    Setup(String),
    #[error("mounting {0}: {1}")]
    Mount(PathBuf, std::io::Error),
    #[error("unmounting {0}: {1}")]
    Unmount(PathBuf, std::io::Error),
}

/// Control-socket connections served at once (more wait in the kernel's backlog).
const CONTROL_CONNECTIONS: usize = 32;

/// Directory holding the control sockets of running mounts.
pub const CONTROL_DIR: &str = "/run/codafs";

/// The control socket of the mount at `mountpoint` (absolute path).
pub fn control_socket(mountpoint: &Path) -> PathBuf {
    let key = blake3::hash(mountpoint.as_os_str().as_encoded_bytes()).to_hex();
    PathBuf::from(CONTROL_DIR).join(format!("{}.sock", &key[..16]))
}

/// Malloc arenas the daemon may use. glibc gives busy threads arenas of their own (up to eight
/// per core); a daemon that cached a million files kept tens of MiB spread over them. Two keep
/// its memory close to what it holds; its threads mostly wait on the kernel and the network.
const MALLOC_ARENAS: libc::c_int = 2;

/// Caps glibc's malloc arenas ([`MALLOC_ARENAS`]); before any thread starts, as glibc asks.
fn limit_malloc_arenas() {
    // SAFETY: mallopt only sets an allocator parameter; called before the daemon's threads.
    if unsafe { libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS) } == 0 {
        tracing::debug!("mallopt(M_ARENA_MAX) refused; keeping glibc's default arenas");
    }
}

/// Mounts and serves until a signal arrives; calls `ready` once the mount is usable.
pub fn run(cfg: MountConfig, ready: impl FnOnce()) -> Result<(), MountError> {
    limit_malloc_arenas();
    let mountpoint = std::fs::canonicalize(&cfg.mountpoint)
        .map_err(|e| MountError::Setup(format!("mountpoint {}: {e}", cfg.mountpoint.display())))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .thread_name("codafs-mount")
        .enable_all()
        .build()
        .map_err(|e| MountError::Setup(e.to_string()))?;
    // Channels are created inside the runtime (tonic's lazy connect spawns on it).
    let _enter = rt.enter();
    // Declared before the core, so it is released after everything else let go of the cache.
    let _cache_lock = take_cache_dir(&cfg)?;
    // Before the mount exists, so a taken or bad address fails it. After the cache directory:
    // a daemon that is still exiting (`umount && codafs mount`) holds the port until then.
    let metrics_listener = match &cfg.metrics_listen {
        Some(addr) => Some(
            rt.block_on(crate::metrics::bind(addr))
                .map_err(|e| MountError::Setup(e.to_string()))?,
        ),
        None => None,
    };
    let core = open_core(&cfg)?;
    let metrics = match metrics_listener {
        Some(l) => Some((
            l,
            crate::metrics::registry(core.clone()).map_err(|e| MountError::Setup(e.to_string()))?,
        )),
        None => None,
    };

    // Bring the persistent cache up to date before serving: one batched stamp check, then the
    // missed changes of each stale volume. Disconnected: serve what is cached.
    rt.block_on(revalidate(&core, cfg.op_timeout));

    let own_inval = Arc::new(std::sync::OnceLock::new());
    let fs = CodaFs {
        core: core.clone(),
        rt: rt.handle().clone(),
        read_only: cfg.read_only,
        inval: own_inval.clone(),
    };
    let mount_err = |e| MountError::Mount(mountpoint.clone(), e);
    let session = fuser::Session::new(fs, &mountpoint, &fuse_config(cfg.read_only)).map_err(mount_err)?;
    let inval: Arc<dyn Invalidator> = Arc::new(KernelInvalidator::new(&session).map_err(mount_err)?);
    let _ = own_inval.set(inval.clone());
    let bg = session.spawn().map_err(mount_err)?;

    let (stop_tx, stop_rx) = watch::channel(false);
    if cfg.prefer.is_none() {
        // Started at a random server: if that is a witness, move to a data server in the
        // background (a mount must start while servers are down, so nothing waits for it).
        let core = core.clone();
        rt.spawn(async move { core.avoid_witness().await });
    }
    {
        // Learn the cluster's id (kept in the cache directory) so a later login can refuse
        // another cluster's token even while the servers are unreachable.
        let core = core.clone();
        rt.spawn(async move { core.learn_cluster_in_background().await });
    }
    if let Some((listener, registry)) = metrics {
        tracing::info!(addr = ?listener.local_addr().ok(), "serving metrics: GET /metrics, plain HTTP, unauthenticated");
        let mut stop = stop_rx.clone();
        rt.spawn(async move {
            tokio::select! {
                _ = crate::metrics::serve(listener, registry) => {}
                _ = stop.wait_for(|s| *s) => {}
            }
        });
    }
    if let Some(b) = core.write_back() {
        b.set_kernel(inval.clone());
        let (core, stop) = (core.clone(), stop_rx.clone());
        rt.spawn(async move { core.reintegrate(stop).await });
    }
    rt.spawn(watch_volumes(
        core.clone(),
        inval.clone(),
        cfg.volume_poll,
        stop_rx.clone(),
    ));
    let socket = control_socket(&mountpoint);
    match bind_control(&socket) {
        Ok(listener) => {
            rt.spawn(control(
                core.clone(),
                inval,
                mountpoint.clone(),
                listener,
                stop_rx.clone(),
            ));
        }
        Err(e) => {
            tracing::warn!(path = %socket.display(), error = %e, "no control socket: status and login unavailable")
        }
    }
    tracing::info!(mountpoint = %mountpoint.display(), "mounted");
    ready();
    // After a start from a checkpoint: adopt the cache files it missed, beside the traffic.
    let sweep = spawn_cache_sweep(&core);
    if let Some(every) = cfg.cache_checkpoint {
        rt.spawn(checkpoint_cache(core.clone(), every, stop_rx.clone()));
    }

    let still_mounted = rt.block_on(until_stopped(&mountpoint));
    tracing::info!("unmounting");
    // Logged changes go to the servers now if they can (within a bound); what is left stays in
    // the log and is sent by the next mount of this cache directory.
    if let Some(left) = core.write_back().map(|b| b.status().changes).filter(|n| *n > 0) {
        tracing::info!(
            changes = left,
            "sending the write-back log before stopping (up to {UNMOUNT_DRAIN:?})"
        );
        if let Err(e) = rt.block_on(core.sync_log(UNMOUNT_DRAIN)) {
            match core.write_back().map(|b| b.status().changes).filter(|n| *n > 0) {
                Some(left) => {
                    tracing::warn!(error = %e, changes = left, "changes stay in the write-back log until the next mount")
                }
                // Drained, with a change refused or in conflict (set aside, counted in status).
                None => tracing::warn!(error = %e, "the write-back log is drained, not all of it as logged"),
            }
        }
    }
    let _ = stop_tx.send(true);
    let _ = std::fs::remove_file(&socket);
    // Unmounted from outside: nothing to unmount (trying fails with EINVAL), only the FUSE
    // threads to join. They hold the core, and so the metadata database's lock: the cache
    // directory is released (when this returns) only after they and the runtime's tasks are
    // gone, or a new daemon over the same cache (`umount && codafs mount`) could find the
    // database still locked.
    let ended = if still_mounted { bg.umount_and_join() } else { bg.join() };
    rt.shutdown_timeout(Duration::from_secs(2));
    // Nothing is fetched any more: the next start reads the cache's index instead of listing it
    // (unless a sweep was still running: it stops at its next directory, and the next start
    // begins from the checkpoint again).
    core.stop_cache_sweep();
    if let Some(t) = sweep {
        let _ = t.join();
    }
    // A copy of sent contents into the cache still running would change it after the save
    // (which would then be removed again): it ends first, or the next start sweeps.
    if !core.stop_keeping(Duration::from_secs(5)) {
        tracing::info!("sent contents were still being kept in the cache; the next start reconciles it");
    }
    core.save_cache_index();
    drop(core);
    ended.map_err(|e| MountError::Unmount(mountpoint, e))?;
    Ok(())
}

/// Runs the blob cache's sweep on a thread of its own at a lower CPU priority (it lists every
/// cache directory: seconds for a million files); `None` when none is needed or the thread
/// could not start (the next start sweeps then).
fn spawn_cache_sweep(core: &Arc<Core<GrpcRemote>>) -> Option<std::thread::JoinHandle<()>> {
    if !core.cache_sweep_pending() {
        return None;
    }
    let core = core.clone();
    let started = std::thread::Builder::new().name("codafs-sweep".into()).spawn(move || {
        crate::blocking::lower_priority();
        core.sweep_cache();
    });
    match started {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::warn!(error = %e, "cannot start the cache sweep; the next start lists the cache");
            None
        }
    }
}

/// Writes a checkpoint of the blob cache's index every `every`, when it changed.
async fn checkpoint_cache(core: Arc<Core<GrpcRemote>>, every: Duration, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let core = core.clone();
        let _ = tokio::task::spawn_blocking(move || core.checkpoint_cache_index()).await;
    }
}

/// How long an unmount waits for the write-back log to reach the servers.
const UNMOUNT_DRAIN: Duration = Duration::from_secs(5);

/// How long a new daemon waits for a previous one to let go of the same cache directory.
const CACHE_DIR_WAIT: Duration = Duration::from_secs(20);

/// Makes the cache directory and takes it for this daemon (see `cache/lock.rs`).
fn take_cache_dir(cfg: &MountConfig) -> Result<crate::cache::lock::CacheLock, MountError> {
    std::fs::create_dir_all(&cfg.cache_dir)
        .map_err(|e| MountError::Setup(format!("cache dir {}: {e}", cfg.cache_dir.display())))?;
    let lock = crate::cache::lock::lock_cache_dir(&cfg.cache_dir, CACHE_DIR_WAIT)
        .map_err(|e| MountError::Setup(e.to_string()))?;
    codafs_common::format::check_or_stamp(&cfg.cache_dir, CACHE_FORMAT_NAME, CACHE_FORMAT)
        .map_err(|e| MountError::Setup(e.to_string()))?;
    Ok(lock)
}

/// What a mount's cache directory holds (its `FORMAT` file), and the version this build reads:
/// the blob cache layout and the metadata database (the write-back log has its own version).
pub const CACHE_FORMAT_NAME: &str = "codafs-cache";
pub const CACHE_FORMAT: u32 = 1;

/// The core over the cache directory (made private first) and the configured servers. Call
/// inside the mount's runtime, after `take_cache_dir`.
fn open_core(cfg: &MountConfig) -> Result<Arc<Core<GrpcRemote>>, MountError> {
    let setup = |e: &dyn std::fmt::Display| MountError::Setup(e.to_string());
    // The directory exists: `take_cache_dir` made it. Cached content of private volumes, files open for writing and users' tokens live here:
    // directories 0700 and files 0600, also in a cache an older version or a looser umask left.
    let changed = codafs_common::perms::restrict_tree_once(&cfg.cache_dir)
        .map_err(|e| setup(&format!("cache dir {}: {e}", cfg.cache_dir.display())))?;
    if changed > 0 {
        tracing::info!(dir = %cfg.cache_dir.display(), changed, "took group and other permissions off the cache");
    }
    let meta = MetaStore::open(&cfg.cache_dir.join("meta")).map_err(|e| setup(&e))?;
    let blobs = BlobCache::open(&cfg.cache_dir, cfg.cache_size).map_err(|e| setup(&e))?;
    let mut cluster = Cluster::new(&cfg.servers, cfg.tls.clone(), None).map_err(|e| setup(&e))?;
    cluster.policy.call_timeout = cfg.op_timeout;
    // A farm's nodes share one server list: each starts at a random server (see `transport`).
    match &cfg.prefer {
        Some(p) => cluster.prefer(p).map_err(|e| setup(&e))?,
        None => cluster.spread(),
    }
    let tokens = TokenTable::load(&cfg.cache_dir.join("tokens")).map_err(|e| setup(&format!("token store: {e}")))?;
    let back = if cfg.read_only || cfg.write_through {
        None
    } else {
        let dir = cfg.cache_dir.join("wblog");
        Some(
            WriteBack::open(&dir, cfg.log_limit)
                .map_err(|e| setup(&format!("write-back log {}: {e}", dir.display())))?,
        )
    };
    let writes = WriteState::new(tokens, cfg.read_only, cfg.cache_dir.join("shadow"), back)
        .map_err(|e| setup(&format!("shadow directory: {e}")))?;
    let core_cfg = CoreConfig {
        op_timeout: cfg.op_timeout,
    };
    let core = Arc::new(Core::new(GrpcRemote::new(cluster), meta, blobs, core_cfg, writes).map_err(|e| setup(&e))?);
    core.run_in_background();
    Ok(core)
}

/// FUSE session options for a read-only or writable mount.
fn fuse_config(read_only: bool) -> fuser::Config {
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName("codafs".into()),
        fuser::MountOption::Subtype("codafs".into()),
        fuser::MountOption::NoAtime,
        fuser::MountOption::NoDev,
        fuser::MountOption::NoSuid,
    ];
    if read_only {
        // Read-only at the kernel level too: writes fail with EROFS before reaching us, and the
        // kernel skips the atime invalidation after reads that would cost a getattr.
        config.mount_options.push(fuser::MountOption::RO);
        // The kernel checks modes itself, so reads never need to ask the daemon.
        config.mount_options.push(fuser::MountOption::DefaultPermissions);
    }
    // A writable mount checks permissions in the daemon: changes are authorized by the
    // caller's token and the volume's writers (as in AFS), reads by mode bits (core::write).
    // Web servers run as unprivileged users: let every user read (the kernel checks modes).
    config.acl = fuser::SessionACL::All;
    // Requests answered from the cache run on these threads (see `CodaFs::spawn`); reads of a
    // cache on a cold disk wait for it there, so several threads keep several reads in flight.
    config.n_threads = Some(4);
    config
}

/// Returns on SIGTERM or SIGINT (`true`: still mounted), or once someone unmounted us
/// (`fusermount3 -u`, `umount`; `false`).
async fn until_stopped(mountpoint: &Path) -> bool {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return true;
    };
    // Checked often, so a restart (`umount && codafs mount`) finds the cache directory free
    // quickly; reading /proc/mounts four times a second costs nothing measurable.
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = term.recv() => return true,
            _ = int.recv() => return true,
            _ = tick.tick() => {
                if !is_mounted(mountpoint) {
                    tracing::info!("unmounted from outside; exiting");
                    return false;
                }
            }
        }
    }
}

/// Whether `/proc/self/mountinfo` lists a mount at `path`.
fn is_mounted(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return true;
    };
    let want = path.to_string_lossy();
    // Field 5 is the mount point (spaces are escaped as \040, which canonical paths rarely have).
    info.lines().any(|l| l.split(' ').nth(4) == Some(want.as_ref()))
}

async fn revalidate<R: Remote>(core: &Core<R>, limit: Duration) {
    let cached = core.volumes();
    if let Err(e) = core.refresh_volumes().await {
        tracing::warn!(error = %e, cached = cached.len(), "servers unreachable; serving the cache disconnected");
        return;
    }
    let names: Vec<String> = cached.iter().map(|v| v.name.clone()).collect();
    if names.is_empty() {
        return;
    }
    let Ok(stamps) = core.volume_stamps(names).await else {
        return;
    };
    for s in stamps.into_iter().filter(|s| s.exists) {
        let seen = cached.iter().find(|v| v.name == s.volume).map_or(0, |v| v.seen);
        if s.version == seen {
            tracing::info!(volume = %s.volume, version = seen, "cached volume is current");
        } else if !crate::callbacks::catch_up(core, &s.volume, s.version, limit * 5).await {
            tracing::warn!(volume = %s.volume, "could not catch up; dropping its cached metadata");
            if let Some(v) = core.volumes().into_iter().find(|v| v.name == s.volume) {
                let _ = core.forget_volume(v.id);
            }
        }
    }
}

/// Follows every volume, and refreshes the volume list so new volumes appear under `/coda`.
async fn watch_volumes<R: Remote>(
    core: Arc<Core<R>>,
    inval: Arc<dyn Invalidator>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut followed = std::collections::HashSet::new();
    loop {
        if let Ok(inv) = core.refresh_volumes().await {
            inval.invalidate(&inv);
        }
        for v in core.volumes() {
            if followed.insert(v.name.clone()) {
                tokio::spawn(crate::callbacks::follow(
                    core.clone(),
                    inval.clone(),
                    v.name,
                    stop.clone(),
                ));
            }
        }
        followed.retain(|n| core.volumes().iter().any(|v| &v.name == n));
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = core.volumes_wanted() => {}
            _ = stop.changed() => return,
        }
    }
}

/// Takes `uid`'s token after the servers accepted it (a forged or retired token is refused
/// here, with the reason, rather than at the first write). With no server reachable the token
/// is kept unverified: the servers check every write anyway.
async fn login<R: Remote>(core: &Core<R>, uid: u32, token: &str) -> serde_json::Value {
    let token = token.trim();
    // The token goes to no server unless it is for this mount's cluster: `codafs login` hands
    // it to every mount on the host, other clusters' included.
    if core.cluster().is_none() {
        // Asked again while servers are starting (they tell no id until they hold the
        // cluster's state): a login right after a cluster's start was refused.
        let learned = async {
            loop {
                match core.learn_cluster().await {
                    Ok(id) => return id,
                    Err(e) => tracing::debug!(error = %e, "cluster id not learned yet"),
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        };
        match tokio::time::timeout(Duration::from_secs(10), learned).await {
            Ok(Some(_)) => {}
            // Servers older than the cluster id in health answers: only they can check.
            Ok(None) => return login_checked(core, uid, token, None).await,
            Err(_) => tracing::debug!("cluster id not learned in 10 s"),
        }
    }
    let Some(cluster) = core.cluster() else {
        return serde_json::json!({ "error":
            "this mount does not know its cluster's id yet (no server has answered since it was first \
             started), so it cannot tell whether this token is for its cluster; log in again once a server answers" });
    };
    login_checked(core, uid, token, Some(&cluster)).await
}

/// [`login`] once the token's cluster can be checked (against `cluster`, if known).
async fn login_checked<R: Remote>(core: &Core<R>, uid: u32, token: &str, cluster: Option<&str>) -> serde_json::Value {
    // Refuse what can be refused locally before asking the servers.
    match TokenTable::check(token, cluster) {
        Err(crate::tokens::TokenStoreError::Expired) => {
            return serde_json::json!({ "error": "token expired; run codafs login again" })
        }
        Err(e) => return serde_json::json!({ "error": e.to_string() }),
        Ok(_) => {}
    }
    let verified = match tokio::time::timeout(Duration::from_secs(10), core.check_token(token)).await {
        Ok(Ok(())) => true,
        Ok(Err(crate::core::FsError::Disconnected(_))) | Err(_) => false,
        Ok(Err(e)) => return serde_json::json!({ "error": format!("the servers refuse this token: {e}") }),
    };
    match core.set_token(uid, token) {
        Ok(c) => {
            tracing::info!(uid, user = %c.user, verified, "token set");
            if verified && !core.read_only() {
                // Node ids in hand before the servers may go away (bounded: the reply waits).
                let _ = tokio::time::timeout(Duration::from_secs(10), core.reserve_ahead(uid)).await;
            }
            serde_json::json!({ "ok": true, "uid": uid, "user": c.user, "expires": c.expires, "verified": verified, "read_only": core.read_only() })
        }
        Err(e) => serde_json::json!({ "error": e.to_string() }),
    }
}

/// Binds the control socket (before the mount reports ready, so `login` works at once).
fn bind_control(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
        // Every local user must reach the socket (whatever umask made the directory).
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    }
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    Ok(listener)
}

/// The control socket, one JSON line per request:
/// - `status`: the mount's status;
/// - `login TOKEN`: sets the *caller's* token (the uid comes from SO_PEERCRED, never from the
///   request, so a user can only set their own);
/// - `logout [CLUSTER]`: forgets the caller's token; with a cluster id, only a token for that
///   cluster (`codafs logout` names the cluster of the token it removed: a mount of another
///   cluster on the same host keeps its token).
///
/// Every local user may connect (mode 0666): what a connection can do depends on its uid alone.
async fn control<R: Remote>(
    core: Arc<Core<R>>,
    inval: Arc<dyn Invalidator>,
    mountpoint: PathBuf,
    listener: tokio::net::UnixListener,
    mut stop: watch::Receiver<bool>,
) {
    let mnt = mountpoint.display().to_string();
    // Every local user may connect: bound how many connections (and so descriptors) they can
    // hold, so the mount's own work never runs out of them.
    let slots = Arc::new(tokio::sync::Semaphore::new(CONTROL_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p,
            _ = stop.changed() => return,
        };
        let Ok(permit) = permit else { return };
        let conn = tokio::select! {
            c = listener.accept() => c,
            _ = stop.changed() => return,
        };
        let stream = match conn {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of descriptors, say: back off instead of spinning.
                tracing::warn!(error = %e, "control socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(uid) = stream.peer_cred().map(|c| c.uid()) else {
            continue;
        };
        let (core, inval, mnt) = (core.clone(), inval.clone(), mnt.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let (r, mut w) = stream.into_split();
            let mut line = String::new();
            // A request is one short line; bound what a local user can make us buffer.
            let mut r = tokio::io::BufReader::new(tokio::io::AsyncReadExt::take(r, 64 * 1024));
            if tokio::time::timeout(Duration::from_secs(2), r.read_line(&mut line))
                .await
                .is_err()
            {
                return;
            }
            let line = line.trim();
            let (cmd, arg) = line.split_once(' ').unwrap_or((line, ""));
            let mut reply = match cmd {
                // Counting a big volume's cached files reads many cache rows: off the runtime.
                "status" => {
                    // The server it names as the one reads go to first must answer.
                    core.recheck_preferred().await;
                    let c = core.clone();
                    match tokio::task::spawn_blocking(move || c.status()).await {
                        Ok(st) => serde_json::to_value(st)
                            .unwrap_or_else(|e| serde_json::json!({ "error": format!("status: {e}") })),
                        Err(e) => serde_json::json!({ "error": format!("status: {e}") }),
                    }
                }
                "login" => {
                    let reply = login(&*core, uid, arg).await;
                    // A token may open private volumes: show them before answering, so what
                    // the user does next after `codafs login` finds them.
                    if reply["ok"] == true {
                        if let Ok(inv) = core.refresh_volumes().await {
                            inval.invalidate(&inv);
                        }
                    }
                    reply
                }
                "sync" => {
                    // `codafs sync MNT`: everything logged so far on the servers.
                    let limit = Duration::from_secs_f64(arg.parse::<f64>().unwrap_or(60.0).clamp(0.1, 3600.0));
                    match core.sync_log(limit).await {
                        Ok(()) => serde_json::json!({ "ok": true }),
                        Err(e) => serde_json::json!({ "error": e.to_string() }),
                    }
                }
                "logout" => {
                    let of_cluster = Some(arg).filter(|c| !c.is_empty());
                    let had = core.drop_token_of(uid, of_cluster);
                    if had {
                        tracing::info!(uid, "token dropped");
                        core.want_volumes();
                    }
                    let mut reply = serde_json::json!({ "ok": true, "uid": uid, "had_token": had });
                    // A token of another cluster this uid still holds here (a login to it
                    // before the stored token's): the user is told it stays.
                    if let Some(kept) = core.token_cluster(uid).filter(|_| !had) {
                        reply["kept_cluster"] = kept.into();
                    }
                    reply
                }
                other => serde_json::json!({ "error": format!("unknown command {other:?}") }),
            };
            reply["mountpoint"] = mnt.into();
            let reply = reply.to_string();
            let _ = w.write_all(reply.as_bytes()).await;
            let _ = w.shutdown().await;
        });
    }
}
