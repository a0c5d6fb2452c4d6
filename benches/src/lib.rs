//! Shared pieces of the web benchmarks: the web-like tree (published to a cluster and written
//! to a local directory, the baseline), Zipf request choice, and the reads they time. Cluster and
//! mount helpers live in `codafs-tests`.
use std::path::Path;

use anyhow::{Context, Result};
use codafs_client::ops;
use codafs_tests::TestCluster;

/// Files in the web tree, spread over 50 directories.
pub const FILES: usize = 5000;

pub use codafs_client::webtree::{relpath, zipf_cdf, WebTree};

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
    codafs_client::webtree::open_read_close(p).map(drop)
}

/// Writes the web tree to `local` (50 directories of files).
pub fn write_web_tree(local: &Path) -> Result<WebTree> {
    Ok(codafs_client::webtree::write_web_tree(local, FILES)?)
}

/// Writes the web tree to `local` and publishes the same files to volume `www` in one commit.
pub async fn publish_web_tree(tc: &TestCluster, local: &Path) -> Result<WebTree> {
    let c = tc.client();
    let tree = write_web_tree(local)?;
    let mut batch: Vec<_> = (0..50).map(|d| ops::dir(&format!("d{d:02}"), 0o755)).collect();
    let mut blobs = Vec::new();
    for (path, data) in codafs_client::webtree::web_files(FILES) {
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
