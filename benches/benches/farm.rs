//! Many web nodes against one cluster (issue #14, scale), on this one machine:
//! 1. **Callback fan-out.** S change-stream subscribers of one volume, held by the client
//!    library without FUSE (a farm's mounts each hold one stream per volume). Subscribers share
//!    a few connections per client (HTTP/2 streams, at most 100 per connection here), as a
//!    process cannot open a thousand loopback connections to one server (the server admits
//!    512 per address). Reported: delay from the moment a commit is sent to each subscriber's
//!    receipt of its event (so the Raft commit is included), p50/p99/max over every (commit,
//!    subscriber) pair, for 100 and 1,000 subscribers; and how many events arrived before the
//!    writer had its acknowledgement.
//! 2. **What a warm farm costs the servers.** M real `--read-only` mounts with every page
//!    cached; readers hit them as fast as they can, with 1, 2 and 4 mounts' worth of readers
//!    (the farm's request rate grows). Reported: page reads, the servers' RPCs (from their
//!    Prometheus counters, Raft's own included) and CPU time (from /proc) over the same window,
//!    beside a window with the mounts idle.
//! 3. **A cold farm start.** N mounts started at once, each reading every page once from an
//!    empty cache (small files come with their directory's listing: `prefetch`), with each
//!    server limited to a share of a CPU (cgroups), as if each ran on a machine of its own.
//!    Run with every mount on the first listed server, then with each at a random one (the
//!    default), twice. Reported: the time until every node has read every page, server RPCs
//!    per node, and how the RPCs split over the servers.
//!
//! Run: `cargo build --bin codafs && cargo bench -p codafs-benches --profile dev --bench farm`
//! (`FARM_COLD_NODES`, default 20, sets N; `FARM_SERVER_CPU`, default 0.15, the share of a CPU
//! each server gets during the cold starts, 0 for no limit: at 0.15 the servers, not the N
//! mounts sharing this machine's two cores, bound the start, as they would on a real farm).
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use codafs_benches::{count_for, open_read_close, relpath, sum_counts};
use codafs_client::ops;
use codafs_tests::{ClusterOpts, Mount, TestCluster};
use futures::StreamExt;

/// Pages in the farm's site (small, as a page of HTML is).
const PAGES: usize = 1000;
/// Change streams one client (one set of connections) carries.
const STREAMS_PER_CLIENT: usize = 100;
/// Commits timed per fan-out size.
const COMMITS: u32 = 20;
/// Length of each warm-read window.
const WINDOW: Duration = Duration::from_secs(3);

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// Publishes the site: `PAGES` pages of about 2 KiB in 50 directories, one commit.
async fn publish_site(tc: &TestCluster) -> Result<()> {
    let c = tc.client();
    let mut batch: Vec<_> = (0..50).map(|d| ops::dir(&format!("d{d:02}"), 0o755)).collect();
    let mut blobs = Vec::new();
    for i in 0..PAGES {
        let page = format!("<html><p>page {i}</p>{}</html>", "lorem ipsum ".repeat(170)).into_bytes();
        batch.push(ops::file(&relpath(i), &page, 0o644));
        blobs.push(bytes::Bytes::from(page));
    }
    let mut puts = futures::stream::iter(blobs.into_iter().map(|b| c.put_blob(b, 2))).buffer_unordered(16);
    while let Some(r) = puts.next().await {
        r?;
    }
    c.commit(ops::commit("www", batch)).await?;
    Ok(())
}

/// The versions one subscriber received, with when.
type Receipts = Vec<(u64, Instant)>;

/// Send-to-receipt delays (ms) of `COMMITS` commits seen by `subscribers` streams, and the
/// share of events received before the writer's acknowledgement.
async fn fan_out(tc: &TestCluster, subscribers: usize) -> Result<(Vec<f64>, f64)> {
    let clients: Vec<_> = (0..subscribers.div_ceil(STREAMS_PER_CLIENT))
        .map(|_| tc.client())
        .collect();
    let from = tc.client().get_volume("www").await?.version;
    // Receipt times by version, one list per subscriber.
    let seen: Arc<Mutex<Vec<Receipts>>> = Arc::new(Mutex::new(vec![Vec::new(); subscribers]));
    let mut tasks = Vec::new();
    for s in 0..subscribers {
        let c = &clients[s / STREAMS_PER_CLIENT];
        let mut stream = c.subscribe(None, "www", from).await?.events;
        let seen = seen.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(Ok(ev)) = stream.next().await {
                if ev.tick {
                    continue;
                }
                let now = Instant::now();
                if let Ok(mut v) = seen.lock() {
                    v[s].push((ev.version, now));
                }
            }
        }));
    }
    let writer = tc.client();
    let mut acked = Vec::new();
    for round in 0..COMMITS {
        let content = format!("<p>news {round}</p>").into_bytes();
        writer.put_blob(bytes::Bytes::from(content.clone()), 2).await?;
        let sent = Instant::now();
        let v = writer
            .commit(ops::commit("www", vec![ops::file("news.html", &content, 0o644)]))
            .await?
            .version;
        acked.push((v, sent, Instant::now()));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Every subscriber must have every event (bounded wait).
    let last = acked.last().map(|(v, _, _)| *v).unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let done = seen
            .lock()
            .map(|v| v.iter().all(|s| s.iter().any(|(ver, _)| *ver >= last)))
            .unwrap_or(false);
        if done {
            break;
        }
        if Instant::now() > deadline {
            bail!("not every subscriber saw version {last} within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for t in &tasks {
        t.abort();
    }
    let seen = seen.lock().map_err(|_| anyhow::anyhow!("a subscriber panicked"))?;
    let mut delays = Vec::new();
    let mut early = 0usize;
    for (v, sent, ack) in &acked {
        for s in seen.iter() {
            let (_, got) = s.iter().find(|(ver, _)| ver == v).context("an event was skipped")?;
            delays.push(got.saturating_duration_since(*sent).as_secs_f64() * 1000.0);
            early += usize::from(got < ack);
        }
    }
    let share = early as f64 / delays.len().max(1) as f64;
    Ok((delays, share))
}

/// Servers' RPCs so far (sum of every method's count) and CPU time (ms), over all servers.
async fn server_cost(tc: &TestCluster) -> Result<(f64, f64)> {
    let mut cpu = 0.0;
    for s in &tc.servers {
        cpu += cpu_ms(s.pid().context("server pid")?)?;
    }
    Ok((rpcs_by_server(tc).await?.iter().sum(), cpu))
}

/// Each server's RPCs so far (sum of every method's count), in the cluster's order.
async fn rpcs_by_server(tc: &TestCluster) -> Result<Vec<f64>> {
    let mut out = Vec::new();
    for s in &tc.servers {
        let addr = s.metrics_addr.as_deref().context("servers serve metrics")?;
        let text = scrape(addr).await?;
        out.push(
            text.lines()
                .filter(|l| l.starts_with("codafs_server_rpc_duration_seconds_count"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>(),
        );
    }
    Ok(out)
}

/// User + system CPU time of process `pid`, ms.
fn cpu_ms(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at ") ".
    let rest = stat.rsplit_once(") ").context("malformed /proc stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).context("utime")?.parse::<f64>()? + f.get(12).context("stime")?.parse::<f64>()?;
    // SAFETY: sysconf takes a constant and has no side effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks * 1000.0 / hz)
}

/// `GET /metrics` over plain HTTP/1.0.
async fn scrape(addr: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").await?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out)).await??;
    Ok(out)
}

/// Readers (two per mount of `roots`) opening warm pages for `WINDOW`; total reads.
fn warm_reads(roots: &[PathBuf]) -> Result<u64> {
    std::thread::scope(|s| {
        let handles: Vec<_> = roots
            .iter()
            .flat_map(|r| [r, r])
            .enumerate()
            .map(|(t, root)| {
                s.spawn(move || {
                    let mut i = t * 97;
                    count_for(WINDOW, || {
                        i = (i + 7919) % PAGES;
                        open_read_close(&root.join(relpath(i)))
                    })
                })
            })
            .collect();
        sum_counts(handles)
    })
}

async fn bench() -> Result<Vec<String>> {
    let tc = TestCluster::start(ClusterOpts::new(2, 1).metrics()).await?;
    tc.create_volume("www", 2).await?;
    publish_site(&tc).await?;
    let mut out = vec![
        format!("Site: {PAGES} pages of about 2 KiB in 50 directories; 2 data servers + 1 witness on loopback."),
        String::new(),
        "| subscribers | commit sent → event received, ms: p50 | p99 | max | events before the writer's ack |".into(),
        "|---|---|---|---|---|".into(),
    ];
    for subscribers in [100, 1000] {
        let (mut d, early) = fan_out(&tc, subscribers).await?;
        let max = d.iter().copied().fold(0.0, f64::max);
        out.push(format!(
            "| {subscribers} | {:.1} | {:.1} | {max:.1} | {:.0} % |",
            percentile(&mut d, 0.5),
            percentile(&mut d, 0.99),
            early * 100.0
        ));
    }

    let dir = tempfile::tempdir()?;
    let mut mounts = Vec::new();
    for i in 0..4 {
        mounts.push(Mount::start(
            &tc.client_args(),
            dir.path(),
            &format!("web{i}"),
            &["--read-only"],
        )?);
    }
    let roots: Vec<PathBuf> = mounts.iter().map(|m| m.path.join("www")).collect();
    for r in &roots {
        for i in 0..PAGES {
            open_read_close(&r.join(relpath(i)))?;
        }
    }
    out.push(String::new());
    out.push("| warm web nodes reading | page reads/s | server RPCs in the window | server CPU ms in the window | RPCs per 1,000 reads |".into());
    out.push("|---|---|---|---|---|".into());
    // The 4 mounts idle: what the servers do on their own (Raft heartbeats, the mounts'
    // keepalives), the baseline for the windows with readers.
    let (rpcs0, cpu0) = server_cost(&tc).await?;
    tokio::time::sleep(WINDOW).await;
    let (rpcs1, cpu1) = server_cost(&tc).await?;
    out.push(format!(
        "| 0 (4 mounted, idle) | 0 | {:.0} | {:.0} | – |",
        rpcs1 - rpcs0,
        cpu1 - cpu0
    ));
    for n in [1, 2, 4] {
        let (rpcs0, cpu0) = server_cost(&tc).await?;
        let reads = warm_reads(&roots[..n])?;
        let (rpcs1, cpu1) = server_cost(&tc).await?;
        let rpcs = rpcs1 - rpcs0;
        out.push(format!(
            "| {n} | {:.0} | {rpcs:.0} | {:.0} | {:.3} |",
            reads as f64 / WINDOW.as_secs_f64(),
            cpu1 - cpu0,
            rpcs * 1000.0 / reads.max(1) as f64
        ));
    }
    for m in &mut mounts {
        m.stop();
    }

    let nodes: usize = std::env::var("FARM_COLD_NODES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let share: f64 = std::env::var("FARM_SERVER_CPU")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.15);
    out.push(String::new());
    out.push(format!(
        "Cold start: {nodes} mounts started at once, each reading all {PAGES} pages from an empty cache, with each server limited to {} (FARM_SERVER_CPU); two rounds, alternating:",
        if share > 0.0 { format!("{share} of a CPU, as on a small machine of its own") } else { "nothing".to_string() }
    ));
    out.push(String::new());
    out.push("| mounts' server | seconds until every node had read every page | server RPCs per node | pages that came with their listing | RPCs by server |".into());
    out.push("|---|---|---|---|---|".into());
    let _limits = tc
        .servers
        .iter()
        .filter(|_| share > 0.0)
        .map(|s| CpuLimit::new(s.pid().context("server pid")?, share))
        .collect::<Result<Vec<_>>>()?;
    for _round in 0..2 {
        for (what, args) in [
            ("the first listed (`--prefer-server`)", tc.client_args()),
            ("one at random (the default)", tc.client_args_spread()),
        ] {
            let c = cold_start(&tc, nodes, &args).await?;
            out.push(format!(
                "| {what} | {:.2} | {:.0} | {:.0} % | {} |",
                c.took.as_secs_f64(),
                c.rpcs_per_node,
                c.prefetched_pct,
                c.by_server
            ));
        }
    }
    Ok(out)
}

/// What one cold farm start cost.
struct ColdStart {
    took: Duration,
    rpcs_per_node: f64,
    prefetched_pct: f64,
    /// Each server's share of the RPCs, as a table cell.
    by_server: String,
}

/// `nodes` mounts (connected with `args`) started at once, each reading every page once from
/// an empty cache.
async fn cold_start(tc: &TestCluster, nodes: usize, args: &[String]) -> Result<ColdStart> {
    let cold = tempfile::tempdir()?;
    let before = rpcs_by_server(tc).await?;
    let start = Instant::now();
    let handles: Vec<_> = (0..nodes)
        .map(|i| {
            let (args, root) = (args.to_vec(), cold.path().to_path_buf());
            std::thread::spawn(move || -> Result<Mount> {
                let m = Mount::start(&args, &root, &format!("cold{i}"), &["--read-only"])?;
                let www = m.path.join("www");
                for p in 0..PAGES {
                    open_read_close(&www.join(relpath((p + i * 37) % PAGES)))?;
                }
                Ok(m)
            })
        })
        .collect();
    let mut mounts = Vec::new();
    for h in handles {
        mounts.push(h.join().map_err(|_| anyhow::anyhow!("a cold node panicked"))??);
    }
    let took = start.elapsed();
    let by_server: Vec<f64> = rpcs_by_server(tc)
        .await?
        .iter()
        .zip(&before)
        .map(|(after, before)| after - before)
        .collect();
    let rpcs: f64 = by_server.iter().sum();
    let prefetched: u64 = mounts
        .iter()
        .map(|m| m.status().map(|s| s.cache.prefetched).unwrap_or(0))
        .sum();
    for m in &mut mounts {
        m.stop();
    }
    Ok(ColdStart {
        took,
        rpcs_per_node: rpcs / nodes as f64,
        prefetched_pct: 100.0 * prefetched as f64 / (nodes * PAGES) as f64,
        by_server: tc
            .servers
            .iter()
            .zip(&by_server)
            .map(|(s, n)| {
                let role = if s.witness { "witness" } else { "data" };
                format!("{role} {:.0} %", 100.0 * n / rpcs.max(1.0))
            })
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// A CPU limit on one process, removed when dropped: the servers of this one machine then
/// behave like machines of their own, each with `share` of a CPU, so that how a farm spreads
/// over them shows. Uses the cgroup `cpu` controller (v1 at `/sys/fs/cgroup/cpu`, else v2);
/// needs root.
struct CpuLimit {
    dir: std::path::PathBuf,
    /// Where the process goes back to.
    root: std::path::PathBuf,
}

impl CpuLimit {
    fn new(pid: u32, share: f64) -> Result<CpuLimit> {
        const PERIOD_US: u64 = 100_000;
        let quota = ((share * PERIOD_US as f64) as u64).max(1_000);
        let v1 = std::path::Path::new("/sys/fs/cgroup/cpu");
        let (root, limit) = if v1.join("cpu.cfs_quota_us").exists() {
            (v1.to_path_buf(), None)
        } else {
            let v2 = std::path::PathBuf::from("/sys/fs/cgroup");
            let controllers = std::fs::read_to_string(v2.join("cgroup.controllers")).unwrap_or_default();
            if !controllers.split_whitespace().any(|c| c == "cpu") {
                bail!("no cgroup cpu controller (v1 /sys/fs/cgroup/cpu or v2): cannot limit the servers' CPU (FARM_SERVER_CPU)");
            }
            std::fs::write(v2.join("cgroup.subtree_control"), "+cpu")
                .context("enabling the cgroup v2 cpu controller")?;
            (v2, Some(format!("{quota} {PERIOD_US}")))
        };
        let dir = root.join(format!("codafs-farm-{pid}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let set = match &limit {
            None => std::fs::write(dir.join("cpu.cfs_period_us"), PERIOD_US.to_string())
                .and_then(|()| std::fs::write(dir.join("cpu.cfs_quota_us"), quota.to_string())),
            Some(max) => std::fs::write(dir.join("cpu.max"), max),
        };
        let guard = CpuLimit { dir, root };
        set.context("setting a CPU quota")?;
        std::fs::write(guard.dir.join("cgroup.procs"), pid.to_string())
            .context("moving a server into its CPU cgroup")?;
        Ok(guard)
    }
}

impl Drop for CpuLimit {
    fn drop(&mut self) {
        if let Ok(procs) = std::fs::read_to_string(self.dir.join("cgroup.procs")) {
            for pid in procs.split_whitespace() {
                let _ = std::fs::write(self.root.join("cgroup.procs"), pid);
            }
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

fn main() -> Result<()> {
    codafs_benches::print_report(bench)
}
