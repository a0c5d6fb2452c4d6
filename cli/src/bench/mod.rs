//! `codafs bench`: cache-hit benchmarks an operator runs on their own hardware with the installed
//! binary only, before a web node joins the load balancer. Every measurement runs beside the same
//! workload on a local copy of the tree in the same run (alternating rounds), because a codafs
//! number on its own says little: the ratio to local disk is what tells whether the node is fit.
//! This file holds the arguments and the orchestration; each section has its own module.
mod callbacks;
mod failover;
mod http;
mod publish;
mod report;
mod svg;
mod web;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use codafs_client::Cluster;

use crate::opts::ClientOpts;
use report::Report;

/// The sections, in the order they run.
const SECTIONS: &[&str] = &["web", "http", "publish", "callbacks", "failover"];

/// What each section measures, shown by `codafs bench --help` after the flags.
const SECTIONS_HELP: &str = "Sections (all by default; choose with --only):\n  web        warm open+read+close ops/s, MB/s and latency p50/p99, stat ops/s, first-read\n             MB/s with empty kernel caches, and the mount's cache hit ratio; the same\n             Zipf workload on a local copy of the tree in alternating rounds, with the\n             paired ratios (mount/local) per round and their median.\n  http       two nginx instances (one serving the mount, one the local copy) driven by a\n             built-in keep-alive HTTP/1.1 load generator: req/s, latency p50/p99, ratios.\n  publish    `upload` files/s of a fresh copy of the tree against a local recursive copy;\n             with --demo also copying the tree into a writable mount.\n  callbacks  a writer commits a new version of a file; time until M mounts see it (p50/p99).\n  failover   (--demo only) kill -9 the Raft leader, then a data server, during continuous\n             reads and writes: time until reads and writes succeed again.\n\nOutput: a table on stdout (--json: JSON instead); --out DIR also writes bench.json and\nbench.svg (latency CDF of warm reads, bars of the paired ratios).";

/// `codafs bench`'s flags.
#[derive(Args, Clone)]
#[command(after_help = SECTIONS_HELP)]
pub struct BenchArgs {
    /// Start a throw-away loopback cluster (2 data servers + 1 witness), a volume and mounts in a
    /// temporary directory, and stop everything at the end (also on errors and Ctrl-C).
    #[arg(long)]
    demo: bool,
    /// An existing codafs mount to measure (instead of --demo).
    #[arg(long, conflicts_with = "demo")]
    mount: Option<PathBuf>,
    /// The volume to use under --mount (the tree is published into VOLUME/bench-tree, which
    /// needs an admin or writer credential: see --credential).
    #[arg(long, requires = "mount")]
    volume: Option<String>,
    /// With --demo: where to put the writable mount (default: a directory inside the work
    /// directory). The reads are measured on a `--read-only` mount in the work directory.
    #[arg(long)]
    mount_dir: Option<PathBuf>,
    /// Work directory for the local copy, servers and caches (default: a new temporary
    /// directory, removed at the end). Put it on the filesystem that holds the cache. It is
    /// made readable by all (0755): nginx's workers read the local copy in it.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Sections to run, comma-separated: web,http,publish,callbacks,failover.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Files in the web tree (web-like sizes: log-normal, median about 8 KiB, 200 B..1 MiB).
    #[arg(long, default_value_t = 5000)]
    files: usize,
    /// Zipf exponent of the request distribution over the files.
    #[arg(long, default_value_t = 0.9)]
    zipf: f64,
    /// Concurrent reader threads (and HTTP connections).
    #[arg(long, default_value_t = 4)]
    readers: usize,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 4.0)]
    duration: f64,
    /// A/B rounds (local, then mount) per measurement.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Mounts that watch for a change in the callbacks section (--demo; otherwise the given
    /// mount is the one observer).
    #[arg(long, default_value_t = 2)]
    observers: usize,
    /// Tiny sizes and durations (200 files, 0.3 s measurements, few iterations): a quick check
    /// that everything works, not a measurement.
    #[arg(long)]
    smoke: bool,
    /// Print JSON instead of the table.
    #[arg(long)]
    json: bool,
    /// Also write bench.json and bench.svg into this directory.
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    client: ClientOpts,
}

/// What every section works with.
pub(crate) struct Ctx {
    pub(crate) files: usize,
    pub(crate) zipf: f64,
    pub(crate) readers: usize,
    pub(crate) duration: Duration,
    pub(crate) rounds: usize,
    pub(crate) iterations: usize,
    pub(crate) work: PathBuf,
    /// The local copy of the tree (the baseline).
    pub(crate) local: PathBuf,
    /// The mount's root (volumes below it).
    pub(crate) mnt: PathBuf,
    pub(crate) volume: String,
    /// The tree inside the volume.
    pub(crate) subdir: String,
    /// A client with write rights, if there is one.
    pub(crate) cluster: Option<Cluster>,
    pub(crate) demo: Option<crate::demo::Demo>,
    pub(crate) observers: usize,
}

impl Ctx {
    /// The tree as the mount shows it.
    pub(crate) fn mounted_tree(&self) -> PathBuf {
        self.mnt.join(&self.volume).join(&self.subdir)
    }

    pub(crate) fn writer(&self) -> Result<&Cluster> {
        self.cluster.as_ref().context("no credential to write with")
    }
}

fn validate(a: &BenchArgs) -> Result<Vec<String>> {
    if !a.demo && a.mount.is_none() {
        bail!("say where to measure: --demo (a throw-away cluster) or --mount MNT --volume VOL");
    }
    if a.mount.is_some() && a.volume.is_none() {
        bail!("--mount needs --volume VOL");
    }
    if a.files == 0 {
        bail!("--files must be at least 1");
    }
    if a.readers == 0 || a.rounds == 0 {
        bail!("--readers and --rounds must be at least 1");
    }
    if !(a.duration > 0.0 && a.duration.is_finite()) {
        bail!("--duration must be a positive number of seconds");
    }
    if !(a.zipf >= 0.0 && a.zipf.is_finite()) {
        bail!("--zipf must be a non-negative number");
    }
    let only: Vec<String> = if a.only.is_empty() {
        SECTIONS.iter().map(|s| s.to_string()).collect()
    } else {
        a.only.iter().map(|s| s.trim().to_string()).collect()
    };
    for s in &only {
        if !SECTIONS.contains(&s.as_str()) {
            bail!("unknown section {s:?} in --only (known: {})", SECTIONS.join(","));
        }
    }
    if !a.demo && !a.only.is_empty() && only.iter().any(|s| s == "failover") {
        bail!("the failover section kills servers: it needs --demo");
    }
    // Before anything is published: a mistyped --mount or --volume fails here, not after the
    // tree went into a volume.
    if let (Some(m), Some(v)) = (&a.mount, &a.volume) {
        crate::mount::mount_status(m).with_context(|| format!("--mount {}", m.display()))?;
        if !m.join(v).is_dir() {
            bail!("--volume {v}: {} is not a volume of that mount", m.join(v).display());
        }
    }
    Ok(only)
}

pub async fn run(mut a: BenchArgs) -> Result<()> {
    let only = validate(&a)?;
    if a.smoke {
        a.files = a.files.min(200);
        a.duration = a.duration.min(0.3);
        a.rounds = a.rounds.min(2);
    }
    let tmp;
    let work = match &a.work_dir {
        Some(w) => {
            std::fs::create_dir_all(w).with_context(|| format!("creating {}", w.display()))?;
            w.clone()
        }
        None => {
            tmp = tempfile::Builder::new().prefix("codafs-bench").tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let run = async {
        let ctx = setup(&a, &work).await?;
        run_sections(&a, &only, ctx).await
    };
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    // On a signal the future (and with it the cluster, mounts and nginx) is dropped: everything
    // the bench started is stopped by the owners' Drop.
    let report = tokio::select! {
        r = run => r?,
        _ = term.recv() => bail!("interrupted; stopped everything"),
        _ = int.recv() => bail!("interrupted; stopped everything"),
    };
    report.print(a.json)?;
    if let Some(out) = &a.out {
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        std::fs::write(out.join("bench.json"), serde_json::to_string_pretty(&report.to_json())?)?;
        std::fs::write(out.join("bench.svg"), svg::chart(&report))?;
    }
    Ok(())
}

async fn setup(a: &BenchArgs, work: &Path) -> Result<Ctx> {
    let local = work.join("local");
    let _ = std::fs::remove_dir_all(&local);
    // nginx's workers (another user) read the local copy, as they read the mount: the tree is
    // world-readable like a web root (every command otherwise runs with umask 077).
    // SAFETY: umask(2) cannot fail.
    let old = unsafe { libc::umask(0o022) };
    let written =
        std::fs::create_dir_all(&local).and_then(|()| codafs_client::webtree::write_web_tree(&local, a.files));
    unsafe { libc::umask(old) };
    let tree = written.context("writing the local tree")?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(work, std::fs::Permissions::from_mode(0o755))?;
    tracing::info!(
        files = a.files,
        bytes = tree.total_bytes(),
        median = tree.median(),
        "local tree written"
    );
    let iterations = if a.smoke { 8 } else { 60 };
    let (mnt, volume, cluster, demo) = if a.demo {
        let dir = work.join("cluster");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let mount = a.mount_dir.clone().unwrap_or_else(|| work.join("mnt"));
        let mut d = crate::demo::start(&dir, &mount, false).await?;
        // Reads are measured on a `--read-only` mount, what a web node runs; the demo's own
        // (writable) mount is used for the copy-in of the publish section.
        // Both read from the first server (the library client does unless told otherwise), so
        // the failover section's kill of the leader (the first server, unless an election
        // moved it) hits the server they use.
        let reader = work.join("reader");
        let first = d.addrs.first().context("the demo started no server")?.clone();
        let args = ["--read-only", "--prefer-server", first.as_str()];
        crate::demo::start_mount(&dir, "reader", &reader, &args, &mut d.children).await?;
        let reader = std::fs::canonicalize(&reader)?;
        let c = Cluster::new(&d.addrs, d.tls.clone(), Some(d.token.clone()))?;
        // Our uid writes through this mount (and only this one) with the admin token.
        let (_, v) = crate::mount::ask_mount(&d.mnt, &format!("login {}", d.token), Duration::from_secs(10))?;
        if let Some(e) = v["error"].as_str() {
            bail!("the bench's mount refused the admin token: {e}");
        }
        (reader, "www".to_string(), Some(c), Some(d))
    } else {
        let mnt = a.mount.clone().context("--mount")?;
        let vol = a.volume.clone().context("--volume")?;
        let c = match a.client.token() {
            Ok(Some(_)) => a.client.cluster().ok(),
            _ => None,
        };
        (mnt, vol, c, None)
    };
    let subdir = "bench-tree".to_string();
    let ctx = Ctx {
        files: a.files,
        zipf: a.zipf,
        readers: a.readers,
        duration: Duration::from_secs_f64(a.duration),
        rounds: a.rounds,
        iterations,
        work: work.to_path_buf(),
        local,
        mnt,
        volume,
        subdir,
        cluster,
        demo,
        observers: if a.demo { a.observers.max(1) } else { 1 },
    };
    // A tree left by an earlier run is reused when it has as many files as this run wants.
    let last = codafs_client::webtree::relpath(ctx.files.saturating_sub(1));
    if ctx.mounted_tree().join(&last).is_file()
        && !ctx
            .mounted_tree()
            .join(codafs_client::webtree::relpath(ctx.files))
            .exists()
    {
        return Ok(ctx);
    }
    let c = ctx
        .writer()
        .context("the tree is not in the volume and there is no credential to publish it (--credential)")?;
    let t = Instant::now();
    publish::upload_tree(c, &ctx.local, &ctx.volume, &ctx.subdir).await?;
    tracing::info!(secs = t.elapsed().as_secs_f64(), "tree published");
    // The mount learns of the commit through its change stream.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ctx.mounted_tree().join(codafs_client::webtree::relpath(0)).exists() {
        if Instant::now() > deadline {
            bail!(
                "the published tree did not appear under {} within 30 s",
                ctx.mounted_tree().display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(ctx)
}

async fn run_sections(a: &BenchArgs, only: &[String], mut ctx: Ctx) -> Result<Report> {
    let mut report = Report::new(serde_json::json!({
        "mode": if a.demo { "demo" } else { "mount" },
        "files": ctx.files,
        "zipf": ctx.zipf,
        "readers": ctx.readers,
        "duration_s": ctx.duration.as_secs_f64(),
        "rounds": ctx.rounds,
        "smoke": a.smoke,
    }));
    for s in SECTIONS {
        if !only.iter().any(|o| o == s) {
            continue;
        }
        tracing::info!(section = s, "running");
        let r = match *s {
            "web" => web::run(&ctx, &mut report).await,
            "http" => http::run(&ctx, &mut report).await,
            "publish" => publish::run(&ctx, &mut report).await,
            "callbacks" => callbacks::run(&mut ctx, &mut report).await,
            _ => failover::run(&mut ctx, &mut report).await,
        };
        r.with_context(|| format!("section {s}"))?;
    }
    Ok(report)
}
