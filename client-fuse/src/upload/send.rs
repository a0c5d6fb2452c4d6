//! Sending an upload's content: which blobs a data replica lacks, how they are grouped into
//! requests (small blobs in batches, one request and one sync per batch on each replica; larger
//! ones streamed one by one), and sending those requests a few at a time.
//!
//! A blob is a whole small file, a chunk of a large file (a byte range read when it is sent, so
//! at most `parallel` chunks are in memory), or a manifest (in memory). Manifests travel in a
//! second phase, after every chunk is stored: a server may refuse a manifest whose chunks it
//! cannot find.
use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;

use codafs_common::Hash;
use futures::StreamExt;

use super::plan::Source;
use super::{Progress, UploadError};
use crate::transport::Cluster;

/// Blobs up to this size travel in batches.
const SMALL_BLOB: u64 = 256 << 10;
/// Bytes per small-blob batch (well under the server's MAX_SMALL_BATCH).
const BATCH_BYTES: u64 = 8 << 20;
/// Blobs per small-blob batch.
const BATCH_BLOBS: usize = 250;

/// A blob to send: its hash and where its bytes are.
pub(super) type Item = (Hash, Source);

/// One request's worth of blobs.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Job {
    Small(Vec<Item>),
    Large(Item),
}

/// The requests of an upload, in two phases: everything but manifests first, then the
/// manifests (each phase ends before the next starts).
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Jobs {
    pub content: Vec<Job>,
    pub manifests: Vec<Job>,
}

/// The blobs of `blobs` that some data replica lacks (a blob short of copies is sent again;
/// everything is sent to a replica that cannot be asked, as the put succeeds once W copies exist).
/// Chunks and manifests are asked like any blob: an edited large file sends only new chunks.
pub(super) async fn find_missing(c: &Cluster, blobs: &BTreeMap<Hash, Source>) -> Result<Vec<Item>, UploadError> {
    let wanted: Vec<Hash> = blobs.keys().copied().collect();
    let missing = c.lacking(None, &wanted).await?;
    Ok(blobs
        .iter()
        .filter(|(h, _)| missing.contains(h))
        .map(|(h, src)| (*h, src.clone()))
        .collect())
}

/// Groups `todo` into requests: manifests in a phase of their own after everything else; in
/// each phase small blobs in batches bounded by count and bytes, larger ones alone.
pub(super) fn jobs(todo: Vec<Item>) -> Jobs {
    let (manifests, content): (Vec<_>, Vec<_>) = todo.into_iter().partition(|(_, src)| src.is_manifest());
    Jobs {
        content: group(content),
        manifests: group(manifests),
    }
}

/// Small blobs in batches bounded by count and bytes, larger ones alone. Batches come first
/// (many small files finish early and show progress).
fn group(items: Vec<Item>) -> Vec<Job> {
    let (small, large): (Vec<_>, Vec<_>) = items.into_iter().partition(|(_, src)| src.len() <= SMALL_BLOB);
    let mut jobs = Vec::new();
    let mut batch: Vec<Item> = Vec::new();
    let mut batch_bytes = 0;
    for item in small {
        let n = item.1.len();
        if !batch.is_empty() && (batch.len() >= BATCH_BLOBS || batch_bytes + n > BATCH_BYTES) {
            jobs.push(Job::Small(std::mem::take(&mut batch)));
            batch_bytes = 0;
        }
        batch_bytes += n;
        batch.push(item);
    }
    if !batch.is_empty() {
        jobs.push(Job::Small(batch));
    }
    jobs.extend(large.into_iter().map(Job::Large));
    jobs
}

/// Sends every job, `parallel` at a time, each to `quorum` replicas: the content, then (once
/// all of it is stored) the manifests.
pub(super) async fn send(
    c: &Cluster,
    jobs: Jobs,
    quorum: u32,
    parallel: usize,
    progress: &dyn Progress,
) -> Result<(), UploadError> {
    send_phase(c, jobs.content, quorum, parallel, progress).await?;
    send_phase(c, jobs.manifests, quorum, parallel, progress).await
}

/// Sends `jobs`, `parallel` at a time; returns once every one is stored (or the first fails).
async fn send_phase(
    c: &Cluster,
    jobs: Vec<Job>,
    quorum: u32,
    parallel: usize,
    progress: &dyn Progress,
) -> Result<(), UploadError> {
    let mut puts = futures::stream::iter(jobs.into_iter().map(|job| send_job(c, job, quorum, progress)))
        .buffer_unordered(parallel.max(1));
    while let Some(r) = puts.next().await {
        r?;
    }
    Ok(())
}

/// Sends one request (a batch, or one blob streamed) and reports its bytes once stored.
async fn send_job(c: &Cluster, job: Job, quorum: u32, progress: &dyn Progress) -> Result<(), UploadError> {
    match job {
        Job::Small(items) => {
            let mut blobs = Vec::with_capacity(items.len());
            let mut n = 0;
            for (h, src) in items {
                n += src.len();
                blobs.push((h, load(h, src).await?));
            }
            c.put_small(&blobs, quorum).await?;
            progress.uploaded(n);
        }
        Job::Large((h, src)) => {
            let n = src.len();
            c.put_blob(load(h, src).await?, quorum).await?;
            progress.uploaded(n);
        }
    }
    Ok(())
}

/// The bytes of blob `h` from `src`. File reads run on the blocking pool, so the reads of
/// several requests go on at once.
async fn load(h: Hash, src: Source) -> Result<bytes::Bytes, UploadError> {
    if let Source::Manifest(b) = src {
        return Ok(b);
    }
    tokio::task::spawn_blocking(move || read_checked(h, &src))
        .await
        .map_err(|e| UploadError::Other(format!("reading a file to send failed: {e}")))?
}

/// Reads blob `h` from `src` and checks it still hashes to `h`: a file that changed since it
/// was scanned fails the upload instead of storing content that no commit names.
fn read_checked(h: Hash, src: &Source) -> Result<bytes::Bytes, UploadError> {
    let (path, data) = match src {
        Source::Manifest(b) => return Ok(b.clone()),
        Source::File { path, size } => (path, read_whole(path, *size)?),
        Source::Chunk { path, offset, len } => (path, read_range(path, *offset, *len)?),
    };
    if Hash::of(&data) != h {
        return Err(UploadError::Changed(path.to_path_buf()));
    }
    Ok(data.into())
}

/// The whole file at `path`, which must still be `size` bytes long (read at most one byte
/// more, so a file that grew since the scan is noticed without reading all of it).
fn read_whole(path: &Path, size: u64) -> Result<Vec<u8>, UploadError> {
    let f = std::fs::File::open(path).map_err(|e| UploadError::Local(path.to_path_buf(), e))?;
    let mut data = Vec::with_capacity(size as usize);
    f.take(size + 1)
        .read_to_end(&mut data)
        .map_err(|e| UploadError::Local(path.to_path_buf(), e))?;
    if data.len() as u64 != size {
        return Err(UploadError::Changed(path.to_path_buf()));
    }
    Ok(data)
}

/// `len` bytes of the file at `path` from `offset` (a chunk); a file now too short changed.
fn read_range(path: &Path, offset: u64, len: u32) -> Result<Vec<u8>, UploadError> {
    let f = std::fs::File::open(path).map_err(|e| UploadError::Local(path.to_path_buf(), e))?;
    let mut data = vec![0u8; len as usize];
    match f.read_exact_at(&mut data, offset) {
        Ok(()) => Ok(data),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(UploadError::Changed(path.to_path_buf())),
        Err(e) => Err(UploadError::Local(path.to_path_buf(), e)),
    }
}

#[cfg(test)]
mod tests {
    use codafs_common::testdata::noise;
    use std::path::PathBuf;
    use std::sync::Arc;

    use codafs_common::chunks::{chunk_reader, CHUNK_MAX};

    use super::super::plan::content_blobs;
    use super::*;

    fn item(i: u32, size: u64) -> Item {
        let path = Arc::from(PathBuf::from(format!("/f{i}")));
        (Hash::of(&i.to_le_bytes()), Source::File { path, size })
    }

    fn chunk(i: u32, len: u32) -> Item {
        let path = Arc::from(PathBuf::from("/big"));
        let offset = u64::from(i) * u64::from(CHUNK_MAX);
        (Hash::of(&i.to_le_bytes()), Source::Chunk { path, offset, len })
    }

    fn manifest(i: u32, len: usize) -> Item {
        (Hash::of(&i.to_le_bytes()), Source::Manifest(vec![7u8; len].into()))
    }

    fn sizes(jobs: &[Job]) -> Vec<String> {
        jobs.iter()
            .map(|j| match j {
                Job::Small(b) => format!("batch of {}", b.len()),
                Job::Large(i) => format!("large {}", i.1.len()),
            })
            .collect()
    }

    #[test]
    fn small_blobs_are_batched_by_count_and_bytes_and_large_ones_go_alone() {
        // 600 tiny files: batches of 250, 250, 100.
        let tiny: Vec<Item> = (0..600).map(|i| item(i, 10)).collect();
        assert_eq!(
            sizes(&jobs(tiny).content),
            ["batch of 250", "batch of 250", "batch of 100"]
        );
        // 256 KiB files: 32 fit in 8 MiB, so 40 of them make a batch of 32 and one of 8.
        let mid: Vec<Item> = (0..40).map(|i| item(i, SMALL_BLOB)).collect();
        assert_eq!(sizes(&jobs(mid).content), ["batch of 32", "batch of 8"]);
        // Larger blobs each get a request of their own, after the batches.
        let mixed = vec![item(1, SMALL_BLOB + 1), item(2, 5), item(3, 4 << 20)];
        assert_eq!(
            sizes(&jobs(mixed).content),
            ["batch of 1", "large 262145", "large 4194304"]
        );
        assert_eq!(jobs(Vec::new()), Jobs::default());
    }

    #[test]
    fn chunks_are_grouped_by_their_own_length_and_manifests_go_last() {
        let todo = vec![
            manifest(100, 36 * 40 + 24),
            chunk(0, CHUNK_MAX),
            chunk(1, 300 << 10),
            chunk(2, 100 << 10),
            item(3, 10),
            manifest(101, 1 << 20),
        ];
        let j = jobs(todo);
        // A small last chunk travels in a batch with small files; the others alone.
        assert_eq!(sizes(&j.content), ["batch of 2", "large 4194304", "large 307200"]);
        assert!(j.content.iter().all(|job| match job {
            Job::Small(b) => b.iter().all(|(_, s)| !s.is_manifest()),
            Job::Large((_, s)) => !s.is_manifest(),
        }));
        // Manifests only in the second phase, batched like any blob by size.
        assert_eq!(sizes(&j.manifests), ["batch of 1", "large 1048576"]);
    }

    #[test]
    fn a_chunk_is_read_from_its_range_and_a_changed_file_is_refused() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("big");
        let data = noise(9 << 20, 11);
        std::fs::write(&path, &data)?;
        let m = chunk_reader(&data[..], |_, _, _| Ok(()))?;
        let blobs = content_blobs(&path, data.len() as u64, m.hash(), Some(&m));
        for (h, src) in &blobs {
            let got = read_checked(*h, src)?;
            assert_eq!(Hash::of(&got), *h);
            if let Source::Chunk { offset, len, .. } = src {
                let at = *offset as usize;
                assert_eq!(&got[..], &data[at..at + *len as usize]);
            }
        }
        // One byte changed in the second chunk: that chunk is refused, the first still reads.
        let (first, second) = (&blobs[0], &blobs[1]);
        let Source::Chunk { offset, .. } = &second.1 else {
            return Err("the second blob is a chunk".into());
        };
        let mut edited = data.clone();
        edited[*offset as usize] ^= 0xff;
        std::fs::write(&path, &edited)?;
        assert!(read_checked(first.0, &first.1).is_ok());
        assert!(matches!(
            read_checked(second.0, &second.1),
            Err(UploadError::Changed(_))
        ));
        // A truncated file: its last chunk can no longer be read in full.
        std::fs::write(&path, &data[..1 << 20])?;
        let last = &blobs[blobs.len() - 2];
        assert!(matches!(read_checked(last.0, &last.1), Err(UploadError::Changed(_))));
        Ok(())
    }

    #[test]
    fn a_whole_file_that_grew_or_changed_is_refused() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("small");
        std::fs::write(&path, b"scanned")?;
        let src = Source::File {
            path: Arc::from(path.as_path()),
            size: 7,
        };
        let h = Hash::of(b"scanned");
        assert_eq!(&read_checked(h, &src)?[..], b"scanned");
        std::fs::write(&path, b"scanned and more")?;
        assert!(matches!(read_checked(h, &src), Err(UploadError::Changed(_))));
        std::fs::write(&path, b"SCANNED")?;
        assert!(matches!(read_checked(h, &src), Err(UploadError::Changed(_))));
        Ok(())
    }
}
