//! One directory of `BIGDIR_FILES` entries (default 100,000; issue #14, scale) in a volume of
//! 2 data servers + 1 witness, listed with `ls -f` through a `--read-only` mount and on local
//! disk in the same run. Reported:
//! - `ls -f` on local disk with the kernel's caches dropped, and again (warm);
//! - through /coda: a new mount with an empty cache (the listing comes from a server), the same
//!   mount remounted on its persistent cache with the kernel's caches dropped (cold), and again
//!   (warm: the kernel's own cache of the listing);
//! - another client then changes one entry (removes one name, adds one): how long until the
//!   mount shows it, how many directory listings the servers served for it (`Meta/ReadDir`
//!   RPCs, from their metrics), and the next `ls -f`.
//!
//! Run: `cargo build --bin codafs && cargo bench -p codafs-benches --profile dev --bench bigdir`
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use codafs_benches::drop_caches;
use codafs_client::ops;
use codafs_tests::http::rpc_count;
use codafs_tests::{ClusterOpts, Mount, TestCluster};
use futures::StreamExt;

/// Files per commit while publishing.
const PER_COMMIT: usize = 5000;

fn name_of(i: usize) -> String {
    format!("page-{i:07}.html")
}

fn content(i: usize) -> Vec<u8> {
    format!("<p>page {i}</p>\n").into_bytes()
}

/// Runs `ls -f DIR` and returns (names listed, seconds).
fn ls_f(dir: &Path) -> Result<(usize, f64)> {
    let start = Instant::now();
    let out = Command::new("ls").arg("-f").arg(dir).output()?;
    if !out.status.success() {
        bail!("ls -f {}: {}", dir.display(), String::from_utf8_lossy(&out.stderr));
    }
    let n = out.stdout.iter().filter(|b| **b == b'\n').count();
    Ok((n, start.elapsed().as_secs_f64()))
}

/// The fastest of three `ls -f` runs (warm caches: the spread is the machine's noise).
fn ls_f_best(dir: &Path) -> Result<(usize, f64)> {
    let mut best = ls_f(dir)?;
    for _ in 0..2 {
        let r = ls_f(dir)?;
        if r.1 < best.1 {
            best = r;
        }
    }
    Ok(best)
}

/// Publishes `files` entries into `big/` (and the same files into `local`).
async fn publish(c: &codafs_client::Cluster, local: &Path, files: usize) -> Result<f64> {
    let start = Instant::now();
    c.commit(ops::commit("www", vec![ops::dir("big", 0o755)])).await?;
    for first in (0..files).step_by(PER_COMMIT) {
        let last = (first + PER_COMMIT).min(files);
        let mut batch = Vec::new();
        let mut blobs = Vec::new();
        for i in first..last {
            let data = content(i);
            std::fs::write(local.join(name_of(i)), &data)?;
            batch.push(ops::file(&format!("big/{}", name_of(i)), &data, 0o644));
            blobs.push((codafs_common::Hash::of(&data), bytes::Bytes::from(data)));
        }
        let mut puts = futures::stream::iter(blobs.chunks(200).map(|b| c.put_small(b, 2))).buffer_unordered(8);
        while let Some(r) = puts.next().await {
            r?;
        }
        c.commit(ops::commit("www", batch)).await?;
    }
    Ok(start.elapsed().as_secs_f64())
}

async fn bench() -> Result<Vec<String>> {
    let files: usize = std::env::var("BIGDIR_FILES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let tc = TestCluster::start(ClusterOpts::new(2, 1).metrics()).await?;
    let metrics: Vec<String> = tc.servers.iter().filter_map(|s| s.metrics_addr.clone()).collect();
    tc.create_volume("www", 2).await?;
    let c = tc.client();
    let local_root = tempfile::tempdir()?;
    let local = local_root.path().join("big");
    std::fs::create_dir(&local)?;
    let upload = publish(&c, &local, files).await?;

    drop_caches()?;
    let (n_local, cold_local) = ls_f(&local)?;
    let (_, warm_local) = ls_f_best(&local)?;

    let mdir = tempfile::tempdir()?;
    let mut m = Mount::start(&tc.client_args(), mdir.path(), "web", &["--read-only"])?;
    let big = m.path.join("www/big");
    let before = rpc_count(&metrics, "Meta/ReadDir").await?;
    let (n_coda, first_coda) = ls_f(&big)?;
    let first_listings = rpc_count(&metrics, "Meta/ReadDir").await? - before;
    m.remount()?;
    drop_caches()?;
    let (_, cold_coda) = ls_f(&big)?;
    let (_, warm_coda) = ls_f_best(&big)?;
    if n_coda != n_local {
        bail!("ls -f listed {n_coda} names through /coda and {n_local} locally");
    }

    // Another client changes one entry.
    let before = rpc_count(&metrics, "Meta/ReadDir").await?;
    c.put_content(b"<p>new</p>\n", 2).await?;
    let change = vec![
        ops::remove(&format!("big/{}", name_of(1))),
        ops::file("big/new.html", b"<p>new</p>\n", 0o644),
    ];
    let committed = Instant::now();
    c.commit(ops::commit("www", change)).await?;
    let added = big.join("new.html");
    while !added.exists() {
        if committed.elapsed() > Duration::from_secs(30) {
            bail!("the mount did not show the change within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let shown_ms = committed.elapsed().as_secs_f64() * 1000.0;
    let (n_after, after_change) = ls_f(&big)?;
    let change_listings = rpc_count(&metrics, "Meta/ReadDir").await? - before;
    if n_after != n_coda {
        bail!("after removing one name and adding one, ls -f listed {n_after} names, not {n_coda}");
    }
    let (_, warm_after) = ls_f_best(&big)?;
    let mount_rss = std::fs::read_to_string(format!("/proc/{}/status", m.pid().context("mount pid")?))?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:").map(|v| v.trim().to_string()))
        .unwrap_or_default();

    let ratio = |a: f64, b: f64| a / b;
    Ok(vec![
        format!("One directory of {files} files; 2 data servers + 1 witness; a `--read-only` mount."),
        format!(
            "Publish through the client library, {PER_COMMIT} files per commit: {upload:.1} s ({:.0} files/s).",
            files as f64 / upload
        ),
        String::new(),
        "| `ls -f` of the directory | /coda, s | local disk, s | ratio |".into(),
        "|---|---|---|---|".into(),
        format!(
            "| first listing (new mount, empty cache; {first_listings:.0} server listings) | {first_coda:.3} | {cold_local:.3} | {:.2} |",
            ratio(first_coda, cold_local)
        ),
        format!(
            "| cold (remounted on its cache / local: kernel caches dropped) | {cold_coda:.3} | {cold_local:.3} | {:.2} |",
            ratio(cold_coda, cold_local)
        ),
        format!(
            "| warm (best of 3) | {warm_coda:.3} | {warm_local:.3} | {:.2} |",
            ratio(warm_coda, warm_local)
        ),
        format!(
            "| just after another client changed one entry | {after_change:.3} | {warm_local:.3} | {:.2} |",
            ratio(after_change, warm_local)
        ),
        format!(
            "| warm again (best of 3) | {warm_after:.3} | {warm_local:.3} | {:.2} |",
            ratio(warm_after, warm_local)
        ),
        String::new(),
        format!(
            "The change (one name removed, one added) showed on the mount {shown_ms:.1} ms after its commit \
             returned; the servers served {change_listings:.0} directory listings for it. \
             Mount daemon RSS at the end: {mount_rss}."
        ),
    ])
}

fn main() -> Result<()> {
    codafs_benches::print_report(bench)
}
