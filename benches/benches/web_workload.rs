//! Web workload through a real mount: 5,000 files with web-like sizes (median about 8 KiB),
//! Zipf(0.9) requests from several concurrent readers. Warm open+read+close and stat throughput
//! through `/coda` against the same files on local disk in the same run, plus callback delay
//! (commit acknowledged → new content visible on a mount) p50/p99.
//!
//! Run: `cargo build --bin codafs && cargo bench -p codafs-benches --profile dev --bench web_workload`
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Result;
use codafs_benches::{count_for, open_read_close, publish_web_tree, relpath, sum_counts, zipf_cdf, FILES};
use codafs_client::ops;
use codafs_tests::{ClusterOpts, Mount, TestCluster};
use rand::{Rng, SeedableRng};

const READERS: usize = 4;
const RUN: Duration = Duration::from_secs(4);

/// Runs `READERS` threads doing `op` on Zipf-chosen files for `RUN`; returns ops/s.
fn drive(root: &Path, cdf: &[f64], op: fn(&Path) -> std::io::Result<()>) -> Result<f64> {
    let paths: Vec<PathBuf> = (0..FILES).map(|i| root.join(relpath(i))).collect();
    let total = std::thread::scope(|s| {
        let handles: Vec<_> = (0..READERS)
            .map(|t| {
                let paths = &paths;
                s.spawn(move || {
                    let mut rng = rand::rngs::StdRng::seed_from_u64(t as u64);
                    count_for(RUN, || {
                        let u: f64 = rng.gen();
                        op(&paths[cdf.partition_point(|c| *c < u).min(FILES - 1)])
                    })
                })
            })
            .collect();
        sum_counts(handles)
    })?;
    Ok(total as f64 / RUN.as_secs_f64())
}

fn stat(p: &Path) -> std::io::Result<()> {
    std::fs::metadata(p).map(drop)
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

async fn bench() -> Result<Vec<String>> {
    let tc = TestCluster::start(ClusterOpts::new(2, 1)).await?;
    tc.create_volume("www", 2).await?;
    let c = tc.client();
    let local = tempfile::tempdir()?;
    let tree = publish_web_tree(&tc, local.path()).await?;
    let median = tree.median();
    let total_bytes = tree.total_bytes();

    let a = Mount::start(&tc.client_args(), tc.root.path(), "a", &["--read-only"])?;
    let b = Mount::start(&tc.client_args(), tc.root.path(), "b", &["--read-only"])?;
    // A writable mount of the same cluster (a webmaster's node), read side by side with `a`.
    let w = Mount::start(&tc.client_args(), tc.root.path(), "w", &[])?;
    let coda = a.path.join("www");
    let writable = w.path.join("www");
    // Warm both the codafs cache and the kernel caches, and the local page cache, equally.
    let t = Instant::now();
    for i in 0..FILES {
        open_read_close(&coda.join(relpath(i)))?;
        open_read_close(&local.path().join(relpath(i)))?;
    }
    let cold = t.elapsed();
    for i in 0..FILES {
        open_read_close(&writable.join(relpath(i)))?;
    }
    let cdf = zipf_cdf(FILES, 0.9);
    let local_reads = drive(local.path(), &cdf, open_read_close)?;
    let coda_reads = drive(&coda, &cdf, open_read_close)?;
    let writable_reads = drive(&writable, &cdf, open_read_close)?;
    let coda_reads_again = drive(&coda, &cdf, open_read_close)?;
    let local_stats = drive(local.path(), &cdf, stat)?;
    let coda_stats = drive(&coda, &cdf, stat)?;

    // Callback delay: commit a new version of a file, time until mount b serves it.
    let target = b.path.join("www").join(relpath(7));
    open_read_close(&target)?;
    let mut delays = Vec::new();
    for round in 0..60u32 {
        let content = format!("version {round}").into_bytes();
        c.put_blob(bytes::Bytes::from(content.clone()), 2).await?;
        c.commit(ops::commit("www", vec![ops::file(&relpath(7), &content, 0o644)]))
            .await?;
        let acked = Instant::now();
        let deadline = acked + Duration::from_secs(5);
        loop {
            if std::fs::read(&target).is_ok_and(|d| d == content) {
                delays.push(acked.elapsed().as_secs_f64() * 1000.0);
                break;
            }
            if Instant::now() > deadline {
                anyhow::bail!("change {round} not visible within 5 s");
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    let p50 = percentile(&mut delays, 0.5);
    let p99 = percentile(&mut delays, 0.99);
    let warm = a.status()?;
    let warm_w = w.status()?;
    Ok(vec![
        format!("Files: {FILES} in 50 directories, {:.1} MiB, median size {median} B; Zipf 0.9; {READERS} readers; {RUN:?} per measurement.", total_bytes as f64 / 1048576.0),
        format!("Cold pass (fetch every file once through /coda, and read it locally): {:.2} s", cold.as_secs_f64()),
        String::new(),
        "| measurement | /coda | local disk | ratio |".into(),
        "|---|---|---|---|".into(),
        format!("| warm open+read+close, ops/s | {coda_reads:.0} | {local_reads:.0} | {:.2} |", coda_reads / local_reads),
        format!("| warm stat, ops/s | {coda_stats:.0} | {local_stats:.0} | {:.2} |", coda_stats / local_stats),
        format!(
            "| warm open+read+close on a writable mount, ops/s (against the `--read-only` mount: mean of the passes before and after) | {writable_reads:.0} | {:.0} | {:.2} |",
            (coda_reads + coda_reads_again) / 2.0,
            2.0 * writable_reads / (coda_reads + coda_reads_again)
        ),
        format!("| callback delay (commit acked → visible on another mount), ms | p50 {p50:.1}, p99 {p99:.1} | – | – |"),
        String::new(),
        format!("FUSE requests seen by the daemon during the whole run: {}", format!("{:?}", warm.fuse_requests)),
        format!(
            "Small files brought with their directory's listing (cold pass): {} of {FILES}",
            warm.cache.prefetched
        ),
        format!("FUSE requests seen by the writable mount's daemon: {}", format!("{:?}", warm_w.fuse_requests)),
    ])
}

fn main() -> Result<()> {
    codafs_benches::print_report(bench)
}
