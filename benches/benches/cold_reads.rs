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
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Result;
use codafs_benches::{open_read_close, publish_web_tree, relpath, zipf_cdf, FILES};
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

/// One pass: `READERS` threads share `order`, each file read once. Returns (files/s, MB/s).
fn pass(root: &Path, order: &[usize], bytes: usize) -> Result<(f64, f64)> {
    codafs_benches::drop_caches()?;
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
    Ok((FILES as f64 / secs, bytes as f64 / secs / 1e6))
}

async fn bench() -> Result<Vec<String>> {
    let tc = TestCluster::start(ClusterOpts::new(2, 1)).await?;
    tc.create_volume("www", 2).await?;
    let local = tempfile::tempdir()?;
    let tree = publish_web_tree(&tc, local.path()).await?;
    let bytes = tree.total_bytes();
    let order = zipf_order();

    let local_1 = pass(local.path(), &order, bytes)?;
    let mut m = Mount::start(&tc.client_args(), tc.root.path(), "cold", &["--read-only"])?;
    let empty = pass(&m.path.join("www"), &order, bytes)?;
    let prefetched = m.status()?.cache.prefetched;
    let local_2 = pass(local.path(), &order, bytes)?;
    // Killed and mounted again over the same cache directory (a restarted web node).
    m.remount()?;
    let remounted = pass(&m.path.join("www"), &order, bytes)?;
    let local_files = (local_1.0 + local_2.0) / 2.0;
    let row =
        |what: &str, (files, mb): (f64, f64)| format!("| {what} | {files:.0} | {mb:.1} | {:.2} |", files / local_files);
    Ok(vec![
        format!(
            "Files: {FILES} in 50 directories, {:.1} MiB, median size {} B; each read once in Zipf(0.9) order by {READERS} readers; kernel caches dropped before every pass.",
            bytes as f64 / 1048576.0,
            tree.median()
        ),
        String::new(),
        "| pass | files/s | MB/s | ratio to cold local disk |".into(),
        "|---|---|---|---|".into(),
        row("local disk, cold (first)", local_1),
        row("local disk, cold (second)", local_2),
        row("/coda, new mount, empty cache", empty),
        row("/coda, remounted, persistent cache warm", remounted),
        String::new(),
        format!("Small files brought with their directory's listing in the empty-cache pass: {prefetched}"),
    ])
}

fn main() -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    for line in rt.block_on(bench())? {
        println!("{line}");
    }
    Ok(())
}
