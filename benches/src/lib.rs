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

/// Files per directory of [`publish_files`].
pub const PER_DIR: usize = 1000;
/// Files per commit of [`publish_files`].
pub const PER_COMMIT: usize = 5000;

/// The path of file `i` of [`publish_files`]: `dNNNN/fNNNNNNN.html`, [`PER_DIR`] a directory.
pub fn tree_path(i: usize) -> String {
    format!("d{:04}/f{i:07}.html", i / PER_DIR)
}

/// Publishes `files` files to volume `www` (file `i` holds `content(i)`, at [`tree_path`]) in
/// commits of [`PER_COMMIT`] files, each commit's blobs uploaded first in batches of 200 small
/// blobs, 8 batches at once, with write quorum 2. Calls `each` with every file's path and
/// content (for a local copy). Returns the bytes of content published.
pub async fn publish_files(
    c: &codafs_client::Cluster,
    files: usize,
    content: impl Fn(usize) -> Vec<u8>,
    mut each: impl FnMut(&str, &[u8]) -> Result<()>,
) -> Result<usize> {
    use futures::StreamExt;
    let mut content_bytes = 0usize;
    for first in (0..files).step_by(PER_COMMIT) {
        let last = (first + PER_COMMIT).min(files);
        let mut batch = Vec::new();
        for d in (first / PER_DIR)..last.div_ceil(PER_DIR) {
            if d * PER_DIR >= first {
                batch.push(ops::dir(&format!("d{d:04}"), 0o755));
            }
        }
        let mut blobs = Vec::new();
        for i in first..last {
            let data = content(i);
            content_bytes += data.len();
            each(&tree_path(i), &data)?;
            batch.push(ops::file(&tree_path(i), &data, 0o644));
            blobs.push((codafs_common::Hash::of(&data), bytes::Bytes::from(data)));
        }
        let mut puts = futures::stream::iter(blobs.chunks(200).map(|b| c.put_small(b, 2))).buffer_unordered(8);
        while let Some(r) = puts.next().await {
            r?;
        }
        c.commit(ops::commit("www", batch)).await?;
    }
    Ok(content_bytes)
}

/// Disk used under `dir`, MiB (`du`, as an operator would look).
pub fn du_mib(dir: &Path) -> Result<f64> {
    let out = std::process::Command::new("du").arg("-sk").arg(dir).output()?;
    let kb: f64 = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .context("du output")?
        .parse()?;
    Ok(kb / 1024.0)
}
