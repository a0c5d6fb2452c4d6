//! Sending an upload's content: which blobs a data replica lacks, how they are grouped into
//! requests (small files in batches, one request and one sync per batch on each replica; large
//! ones streamed one by one), and sending those requests a few at a time.
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use codafs_common::Hash;
use futures::StreamExt;

use super::{Progress, UploadError};
use crate::transport::Cluster;

/// Files up to this size travel in batches.
const SMALL_BLOB: u64 = 256 << 10;
/// Bytes per small-blob batch (well under the server's MAX_SMALL_BATCH).
const BATCH_BYTES: u64 = 8 << 20;
/// Blobs per small-blob batch.
const BATCH_BLOBS: usize = 250;
/// Hashes per `Missing` query (the servers take at most `MAX_MISSING_QUERY`).
const MISSING_QUERY: usize = 10_000;

/// A blob to send: its hash, a local file that holds it, and its size.
pub(super) type Item = (Hash, PathBuf, u64);

/// One request's worth of blobs.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Job {
    Small(Vec<Item>),
    Large(Item),
}

/// The blobs of `blobs` that some data replica lacks (a blob short of copies is sent again;
/// everything is sent to a replica that cannot be asked, as the put succeeds once W copies exist).
pub(super) async fn find_missing(c: &Cluster, blobs: BTreeMap<Hash, (PathBuf, u64)>) -> Result<Vec<Item>, UploadError> {
    let data: Vec<String> = c
        .list_servers()
        .await?
        .servers
        .into_iter()
        .filter(|s| !s.witness)
        .map(|s| s.addr)
        .collect();
    let wanted: Vec<Hash> = blobs.keys().copied().collect();
    let mut missing: HashSet<Hash> = HashSet::new();
    for chunk in wanted.chunks(MISSING_QUERY) {
        for addr in &data {
            match c.missing_on(addr, chunk).await {
                Ok(m) => missing.extend(m),
                Err(_) => missing.extend(chunk.iter().copied()),
            }
        }
    }
    Ok(blobs
        .into_iter()
        .filter(|(h, _)| missing.contains(h))
        .map(|(h, (p, n))| (h, p, n))
        .collect())
}

/// Groups `todo` into requests: small blobs in batches bounded by count and bytes, large ones
/// alone. Batches come first (many small files finish early and show progress).
pub(super) fn jobs(todo: Vec<Item>) -> Vec<Job> {
    let (small, large): (Vec<_>, Vec<_>) = todo.into_iter().partition(|(_, _, n)| *n <= SMALL_BLOB);
    let mut jobs = Vec::new();
    let mut batch: Vec<Item> = Vec::new();
    let mut batch_bytes = 0;
    for item in small {
        if !batch.is_empty() && (batch.len() >= BATCH_BLOBS || batch_bytes + item.2 > BATCH_BYTES) {
            jobs.push(Job::Small(std::mem::take(&mut batch)));
            batch_bytes = 0;
        }
        batch_bytes += item.2;
        batch.push(item);
    }
    if !batch.is_empty() {
        jobs.push(Job::Small(batch));
    }
    jobs.extend(large.into_iter().map(Job::Large));
    jobs
}

/// Sends every job, `parallel` at a time, each to `quorum` replicas.
pub(super) async fn send(
    c: &Cluster,
    jobs: Vec<Job>,
    quorum: u32,
    parallel: usize,
    progress: &dyn Progress,
) -> Result<(), UploadError> {
    let mut puts = futures::stream::iter(jobs.into_iter().map(|job| async move {
        match job {
            Job::Small(items) => {
                let mut blobs = Vec::with_capacity(items.len());
                let mut n = 0;
                for (h, path, size) in items {
                    blobs.push((h, read_checked(&path, h).await?));
                    n += size;
                }
                c.put_small(&blobs, quorum).await?;
                progress.uploaded(n);
            }
            Job::Large((h, path, size)) => {
                c.put_blob(read_checked(&path, h).await?, quorum).await?;
                progress.uploaded(size);
            }
        }
        Ok::<_, UploadError>(())
    }))
    .buffer_unordered(parallel.max(1));
    while let Some(r) = puts.next().await {
        r?;
    }
    Ok(())
}

/// Reads a file and checks it still has the content that was hashed when the tree was scanned.
async fn read_checked(path: &Path, h: Hash) -> Result<bytes::Bytes, UploadError> {
    let data = tokio::fs::read(path)
        .await
        .map_err(|e| UploadError::Local(path.to_path_buf(), e))?;
    if Hash::of(&data) != h {
        return Err(UploadError::Other(format!(
            "{} changed during the upload; run it again",
            path.display()
        )));
    }
    Ok(data.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(i: u32, size: u64) -> Item {
        (Hash::of(&i.to_le_bytes()), PathBuf::from(format!("/f{i}")), size)
    }

    fn sizes(jobs: &[Job]) -> Vec<String> {
        jobs.iter()
            .map(|j| match j {
                Job::Small(b) => format!("batch of {}", b.len()),
                Job::Large(i) => format!("large {}", i.2),
            })
            .collect()
    }

    #[test]
    fn small_blobs_are_batched_by_count_and_bytes_and_large_ones_go_alone() {
        // 600 tiny files: batches of 250, 250, 100.
        let tiny: Vec<Item> = (0..600).map(|i| item(i, 10)).collect();
        assert_eq!(sizes(&jobs(tiny)), ["batch of 250", "batch of 250", "batch of 100"]);
        // 256 KiB files: 32 fit in 8 MiB, so 40 of them make a batch of 32 and one of 8.
        let mid: Vec<Item> = (0..40).map(|i| item(i, SMALL_BLOB)).collect();
        assert_eq!(sizes(&jobs(mid)), ["batch of 32", "batch of 8"]);
        // Large files each get a request of their own, after the batches.
        let mixed = vec![item(1, SMALL_BLOB + 1), item(2, 5), item(3, 1 << 30)];
        assert_eq!(sizes(&jobs(mixed)), ["batch of 1", "large 262145", "large 1073741824"]);
        assert!(jobs(Vec::new()).is_empty());
    }
}
