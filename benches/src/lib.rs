//! Shared pieces of the web benchmarks: the web-like tree (published to a cluster and written
//! to a local directory, the baseline), Zipf request choice, and the reads they time. Cluster and
//! mount helpers live in `codafs-tests`.
use std::path::Path;

use anyhow::{Context, Result};
use codafs_client::ops;
use codafs_tests::TestCluster;
use rand::{Rng, SeedableRng};

/// Files in the web tree, spread over 50 directories.
pub const FILES: usize = 5000;

/// Web-like sizes: log-normal around 8 KiB, from 200 B to 1 MiB.
fn size_of(rng: &mut rand::rngs::StdRng) -> usize {
    // Box-Muller normal sample.
    let (u1, u2): (f64, f64) = (rng.gen_range(1e-9..1.0), rng.gen());
    let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
    ((8192.0 * (1.1 * z).exp()) as usize).clamp(200, 1 << 20)
}

/// Cumulative Zipf(s) distribution over `n` ranks.
pub fn zipf_cdf(n: usize, s: f64) -> Vec<f64> {
    let mut acc = 0.0;
    let mut cdf: Vec<f64> = (1..=n)
        .map(|k| {
            acc += 1.0 / (k as f64).powf(s);
            acc
        })
        .collect();
    for v in &mut cdf {
        *v /= acc;
    }
    cdf
}

/// The path of file `i` inside the tree.
pub fn relpath(i: usize) -> String {
    format!("d{:02}/page{i:05}.html", i % 50)
}

/// Runs a bench's async body on a multi-threaded runtime and prints the report lines it returns.
pub fn print_report<F: std::future::Future<Output = Result<Vec<String>>>>(bench: impl FnOnce() -> F) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    for line in rt.block_on(bench())? {
        println!("{line}");
    }
    Ok(())
}

/// Calls `op` in batches of 64 until `run` has passed; returns how many calls were made.
pub fn count_for(run: std::time::Duration, mut op: impl FnMut() -> std::io::Result<()>) -> std::io::Result<u64> {
    let start = std::time::Instant::now();
    let mut n = 0u64;
    while start.elapsed() < run {
        for _ in 0..64 {
            op()?;
            n += 1;
        }
    }
    Ok(n)
}

/// Joins reader threads and adds up their counts; a reader's error or panic is the result.
pub fn sum_counts(handles: Vec<std::thread::ScopedJoinHandle<'_, std::io::Result<u64>>>) -> Result<u64> {
    handles
        .into_iter()
        .map(|h| {
            h.join()
                .map_err(|_| anyhow::anyhow!("a reader panicked"))?
                .map_err(Into::into)
        })
        .sum()
}

/// Opens, reads whole and closes a file.
pub fn open_read_close(p: &Path) -> std::io::Result<()> {
    use std::io::Read;
    let mut f = std::fs::File::open(p)?;
    let mut buf = [0u8; 64 * 1024];
    while f.read(&mut buf)? > 0 {}
    Ok(())
}

/// The published tree's sizes.
pub struct WebTree {
    pub sizes: Vec<usize>,
}

impl WebTree {
    pub fn median(&self) -> usize {
        let mut sorted = self.sizes.clone();
        sorted.sort_unstable();
        sorted[sorted.len() / 2]
    }

    pub fn total_bytes(&self) -> usize {
        self.sizes.iter().sum()
    }
}

/// The web tree's files in order: (relative path, content).
fn web_files() -> impl Iterator<Item = (String, Vec<u8>)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    (0..FILES).map(move |i| {
        let n = size_of(&mut rng);
        let data: Vec<u8> = (0..n).map(|j| b"abcdefghij<>/ \n"[(i + j) % 15]).collect();
        (relpath(i), data)
    })
}

/// Writes the web tree to `local` (50 directories of files).
pub fn write_web_tree(local: &Path) -> Result<WebTree> {
    for d in 0..50 {
        std::fs::create_dir_all(local.join(format!("d{d:02}")))?;
    }
    let mut sizes = Vec::new();
    for (path, data) in web_files() {
        sizes.push(data.len());
        std::fs::write(local.join(path), &data)?;
    }
    Ok(WebTree { sizes })
}

/// Writes the web tree to `local` and publishes the same files to volume `www` in one commit.
pub async fn publish_web_tree(tc: &TestCluster, local: &Path) -> Result<WebTree> {
    let c = tc.client();
    let tree = write_web_tree(local)?;
    let mut batch: Vec<_> = (0..50).map(|d| ops::dir(&format!("d{d:02}"), 0o755)).collect();
    let mut blobs = Vec::new();
    for (path, data) in web_files() {
        batch.push(ops::file(&path, &data, 0o644));
        blobs.push(bytes::Bytes::from(data));
    }
    use futures::StreamExt;
    let mut puts = futures::stream::iter(blobs.into_iter().map(|b| c.put_blob(b, 2))).buffer_unordered(16);
    while let Some(r) = puts.next().await {
        r?;
    }
    c.commit(ops::commit("www", batch)).await?;
    Ok(tree)
}

/// Writes back dirty pages and drops the kernel's page, dentry and inode caches (needs root):
/// the local-disk side of a cold-read comparison.
pub fn drop_caches() -> Result<()> {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3\n").context("dropping the kernel's caches needs root")
}
