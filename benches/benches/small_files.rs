//! Server disk for a tree of small files (issue #14, small-file storage): `SMALL_FILES` files
//! (default 20,000) of `SMALL_SIZE` bytes each (default 1,024) in directories of 1,000,
//! published through the client library in commits of 5,000 files, into 2 data servers + 1
//! witness. Reported, for each server, its whole directory on disk (`du`) against the content,
//! split into the blob store (`blobs/`, or a witness's `spool/`), its packed small blobs
//! (`packed/`), the metadata database (`db/`) and the rest, and how many files the directory
//! holds.
//!
//! Run: `cargo build --bin codafs && SMALL_FILES=20000 SMALL_SIZE=1024 cargo bench -p codafs-benches --profile dev --bench small_files`
use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use codafs_benches::{du_mib, publish_files, PER_DIR};
use codafs_tests::{ClusterOpts, TestCluster};

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Files (and directories) under `dir`: the inodes it takes.
fn inodes(dir: &Path) -> Result<u64> {
    let mut n = 0;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        n += 1;
        if e.file_type()?.is_dir() {
            n += inodes(&e.path())?;
        }
    }
    Ok(n)
}

/// `du` of `dir` in MiB, 0 if it does not exist.
fn du_or_zero(dir: &Path) -> Result<f64> {
    if dir.exists() {
        du_mib(dir)
    } else {
        Ok(0.0)
    }
}

async fn bench() -> Result<Vec<String>> {
    let files = env_or("SMALL_FILES", 20_000);
    let size = env_or("SMALL_SIZE", 1024);
    let tc = TestCluster::start(ClusterOpts::new(2, 1)).await?;
    tc.create_volume("www", 2).await?;
    let c = tc.client();
    let start = Instant::now();
    // All different: noise seeded by the file's number.
    let content = |i: usize| codafs_common::testdata::noise(size, i as u64 + 1);
    let content_bytes = publish_files(&c, files, content, |_, _| Ok(())).await?;
    let upload = start.elapsed().as_secs_f64();
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let content_mib = content_bytes as f64 / 1048576.0;
    let mut out = vec![
        format!(
            "{files} files of {size} B ({content_mib:.1} MiB of content) in {} directories; 2 data servers + 1 witness.",
            files.div_ceil(PER_DIR)
        ),
        format!(
            "Publish through the client library, 5,000 files per commit: {upload:.1} s ({:.0} files/s).",
            files as f64 / upload
        ),
        String::new(),
        "| server | directory on disk, MiB | x content | blob store, MiB | of it packed/, MiB | db/, MiB | other, MiB | files in the directory |".into(),
        "|---|---|---|---|---|---|---|---|".into(),
    ];
    for s in &tc.servers {
        let total = du_mib(&s.dir)?;
        let store = s.dir.join(if s.witness { "spool" } else { "blobs" });
        let (blobs, packed, db) = (
            du_or_zero(&store)?,
            du_or_zero(&store.join("packed"))?,
            du_or_zero(&s.dir.join("db"))?,
        );
        out.push(format!(
            "| {}{} | {total:.1} | {:.2} | {blobs:.1} | {packed:.1} | {db:.1} | {:.1} | {} |",
            s.addr,
            if s.witness { " (witness)" } else { "" },
            total / content_mib,
            total - blobs - db,
            inodes(&s.dir)?
        ));
    }
    Ok(out)
}

fn main() -> Result<()> {
    codafs_benches::print_report(bench)
}
