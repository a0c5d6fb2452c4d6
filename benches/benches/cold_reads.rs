//! First reads: the web tree (5,000 files, median about 8 KiB) read once each by 4 readers in
//! Zipf(0.9) order, with the kernel's caches dropped before every pass. Three passes against
//! the same files on local disk, cold, measured in the same run:
//! - through a new mount with an empty cache (a web node joining the farm);
//! - through the same mount after a remount, its persistent cache warm (a restarted node);
//! - local disk, cold, before each of those (the ratio uses their mean).
//!
//! Dropping the kernel's caches needs root (`/proc/sys/vm/drop_caches`).
//!
//! Run: `cargo build --bin codafs && cargo bench -p codafs-benches --profile dev --bench cold_reads`
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Result;
use codafs_benches::{open_read_close, publish_web_tree, relpath, zipf_cdf, FILES};
use codafs_tests::http::value;
use codafs_tests::{ClusterOpts, Mount, TestCluster};
use rand::{Rng, SeedableRng};

const READERS: usize = 4;

/// Every file once, the popular ones first: Zipf draws without repeats, then the rest.
fn zipf_order() -> Vec<usize> {
    let cdf = zipf_cdf(FILES, 0.9);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut seen = vec![false; FILES];
    let mut order = Vec::with_capacity(FILES);
    for _ in 0..4 * FILES {
        let u: f64 = rng.gen();
        let i = cdf.partition_point(|c| *c < u).min(FILES - 1);
        if !seen[i] {
            seen[i] = true;
            order.push(i);
        }
    }
    order.extend((0..FILES).filter(|i| !seen[*i]));
    order
}

/// Block-device reads completed so far, over every whole disk (`/proc/diskstats`): what a
/// pass cost the disk, beside what it cost in time.
fn disk_reads() -> u64 {
    let stats = std::fs::read_to_string("/proc/diskstats").unwrap_or_default();
    stats
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // Whole disks only (partitions repeat their disk's counts): vda, sda, nvme0n1.
            let name = *f.get(2)?;
            let whole = std::path::Path::new("/sys/block").join(name).exists();
            (whole && !name.starts_with("loop") && !name.starts_with("ram")).then(|| f.get(3)?.parse::<u64>().ok())?
        })
        .sum()
}

/// CPU seconds process `pid` has used (user + system), from `/proc/PID/stat`.
fn cpu_seconds(pid: Option<u32>) -> f64 {
    let Some(stat) = pid.and_then(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok()) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) start at state; utime and stime
    // are the 14th and 15th fields overall.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = [11, 12].iter().filter_map(|i| f.get(*i)?.parse::<f64>().ok()).sum();
    // SAFETY: sysconf only reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks / hz
}

/// One pass's figures.
struct Pass {
    files_per_s: f64,
    mb_per_s: f64,
    disk_reads: u64,
    seconds: f64,
}

/// One pass: `READERS` threads share `order`, each file read once.
fn pass(root: &Path, order: &[usize], bytes: usize) -> Result<Pass> {
    codafs_benches::drop_caches()?;
    let reads_before = disk_reads();
    let paths: Vec<PathBuf> = order.iter().map(|i| root.join(relpath(*i))).collect();
    let start = Instant::now();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..READERS)
            .map(|t| {
                let paths = &paths;
                s.spawn(move || -> std::io::Result<()> {
                    for p in paths.iter().skip(t).step_by(READERS) {
                        open_read_close(p)?;
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().map_err(|_| std::io::Error::other("reader panicked"))?)
    })?;
    let secs = start.elapsed().as_secs_f64();
    Ok(Pass {
        files_per_s: FILES as f64 / secs,
        mb_per_s: bytes as f64 / secs / 1e6,
        disk_reads: disk_reads().saturating_sub(reads_before),
        seconds: secs,
    })
}

/// What the mount daemon did in a pass: its CPU time, then the kernel requests it answered
/// between two of its status reports ("op n, ...").
fn daemon_work(cpu: f64, before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> String {
    let shown: Vec<String> = after
        .iter()
        .filter_map(|(op, n)| {
            let d = n.saturating_sub(before.get(op).copied().unwrap_or(0));
            (d > 0).then(|| format!("{op} {d}"))
        })
        .collect();
    format!("{cpu:.2} s; {}", shown.join(", "))
}

async fn bench() -> Result<Vec<String>> {
    let tc = TestCluster::start(ClusterOpts::new(2, 1)).await?;
    tc.create_volume("www", 2).await?;
    let local = tempfile::tempdir()?;
    let tree = publish_web_tree(&tc, local.path()).await?;
    let bytes = tree.total_bytes();
    let order = zipf_order();

    let local_1 = pass(local.path(), &order, bytes)?;
    let metrics = format!("127.0.0.1:{}", codafs_tests::free_port());
    let mut m = Mount::start(
        &tc.client_args(),
        tc.root.path(),
        "cold",
        &["--read-only", "--metrics-listen", &metrics],
    )?;
    let (before, cpu) = (m.status()?.fuse_requests, cpu_seconds(m.pid()));
    let servers_cpu = || tc.servers.iter().map(|s| cpu_seconds(s.pid())).sum::<f64>();
    let servers_before = servers_cpu();
    let waits_before = Waits::read(&metrics).await?;
    let empty = pass(&m.path.join("www"), &order, bytes)?;
    let servers_used = servers_cpu() - servers_before;
    let waits = Waits::read(&metrics).await?.since(&waits_before);
    let status = m.status()?;
    let empty_requests = daemon_work(cpu_seconds(m.pid()) - cpu, &before, &status.fuse_requests);
    let prefetched = status.cache.prefetched;
    let local_2 = pass(local.path(), &order, bytes)?;
    // Killed and mounted again over the same cache directory (a restarted web node).
    m.remount()?;
    let (before, cpu) = (m.status()?.fuse_requests, cpu_seconds(m.pid()));
    let remounted = pass(&m.path.join("www"), &order, bytes)?;
    let remounted_requests = daemon_work(cpu_seconds(m.pid()) - cpu, &before, &m.status()?.fuse_requests);
    let local_files = (local_1.files_per_s + local_2.files_per_s) / 2.0;
    let row = |what: &str, p: &Pass, requests: &str| {
        format!(
            "| {what} | {:.0} | {:.1} | {:.2} | {} | {requests} |",
            p.files_per_s,
            p.mb_per_s,
            p.files_per_s / local_files,
            p.disk_reads
        )
    };
    Ok(vec![
        format!(
            "Files: {FILES} in 50 directories, {:.1} MiB, median size {} B; each read once in Zipf(0.9) order by {READERS} readers; kernel caches dropped before every pass.",
            bytes as f64 / 1048576.0,
            tree.median()
        ),
        String::new(),
        "| pass | files/s | MB/s | ratio to cold local disk | disk reads | mount daemon: CPU; FUSE requests |".into(),
        "|---|---|---|---|---|---|".into(),
        row("local disk, cold (first)", &local_1, "–"),
        row("local disk, cold (second)", &local_2, "–"),
        row("/coda, new mount, empty cache", &empty, &empty_requests),
        row("/coda, remounted, persistent cache warm", &remounted, &remounted_requests),
        String::new(),
        format!("Small files brought with their directory's listing in the empty-cache pass: {prefetched}"),
        format!("What the empty-cache pass waited for (the mount's metrics): {waits}"),
        format!(
            "Servers' CPU in the empty-cache pass: {servers_used:.2} s in {:.2} s (2 data servers and a witness)",
            empty.seconds
        ),
    ])
}

/// Counts and total seconds of the mount's fetch histograms: listings, small-file batches and
/// single blobs.
#[derive(Default)]
struct Waits([(f64, f64); 3]);

const WAITED_FOR: [(&str, &str); 3] = [
    (
        "listings",
        "codafs_mount_listing_fetch_duration_seconds_{}{part=\"listing\"}",
    ),
    (
        "small-file batches",
        "codafs_mount_listing_fetch_duration_seconds_{}{part=\"small_files\"}",
    ),
    ("single files", "codafs_mount_fetch_duration_seconds_{}{result=\"ok\"}"),
];

impl Waits {
    async fn read(metrics: &str) -> Result<Waits> {
        let text = codafs_tests::http::scrape(metrics).await?;
        let mut w = Waits::default();
        for (i, (_, series)) in WAITED_FOR.iter().enumerate() {
            let get = |what: &str| value(&text, &series.replace("{}", what)).unwrap_or(0.0);
            w.0[i] = (get("count"), get("sum"));
        }
        Ok(w)
    }

    fn since(&self, before: &Waits) -> Waits {
        let mut w = Waits::default();
        for i in 0..3 {
            w.0[i] = (self.0[i].0 - before.0[i].0, self.0[i].1 - before.0[i].1);
        }
        w
    }
}

impl std::fmt::Display for Waits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, ((what, _), (n, secs))) in WAITED_FOR.iter().zip(self.0).enumerate() {
            let mean = if n > 0.0 { secs / n * 1000.0 } else { 0.0 };
            let sep = if i == 0 { "" } else { "; " };
            write!(
                f,
                "{sep}{n:.0} {what}, {mean:.1} ms each on average, {secs:.2} s in all"
            )?;
        }
        Ok(())
    }
}

fn main() -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    for line in rt.block_on(bench())? {
        println!("{line}");
    }
    Ok(())
}
