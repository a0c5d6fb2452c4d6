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
