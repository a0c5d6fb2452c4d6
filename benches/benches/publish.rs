//! Publishing benchmark: `codafs upload` of 5,000 small files into a real cluster (2 data
//! replicas + 1 witness, write quorum 2) beside a local copy of the same tree in the same run.
//! Copying into a writable mount is the `copy_in` bench.
//!
//! Run: `cargo build --bin codafs && cargo bench -p codafs-benches --profile dev --bench publish`
use std::time::Instant;

use anyhow::Result;
use codafs_client::upload::{upload, UploadOptions};
use codafs_tests::{ClusterOpts, TestCluster};

const FILES: usize = 5000;

fn copy_tree(from: &std::path::Path, to: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let dest = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_tree(&e.path(), &dest)?;
        } else {
            std::fs::copy(e.path(), dest)?;
        }
    }
    Ok(())
}

async fn bench() -> Result<()> {
    let tc = TestCluster::start(ClusterOpts::new(2, 1)).await?;
    tc.create_volume("www", 2).await?;
    let root = tempfile::tempdir()?;
    let site = root.path().join("site");
    let mut bytes = 0usize;
    for i in 0..FILES {
        let dir = site.join(format!("d{:02}", i % 50));
        std::fs::create_dir_all(&dir)?;
        let body = format!("<p>page {i}</p>{}", "x".repeat(500 + (i * 7919) % 7000));
        bytes += body.len();
        std::fs::write(dir.join(format!("p{i:05}.html")), body)?;
    }
    std::process::Command::new("sync").status()?;
    let t = Instant::now();
    copy_tree(&site, &root.path().join("copy"))?;
    std::process::Command::new("sync").status()?;
    let local = t.elapsed().as_secs_f64();
    let c = tc.client();
    let opts = UploadOptions {
        volume: "www".into(),
        path: "site".into(),
        delete: false,
        dry_run: false,
        parallel: 16,
    };
    let t = Instant::now();
    let s = upload(&c, &site, &opts, &()).await?;
    let ours = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let again = upload(&c, &site, &opts, &()).await?;
    let rerun = t.elapsed().as_secs_f64();
    assert_eq!(again.uploaded_blobs, 0);
    println!(
        "Files: {FILES} in 50 directories, {:.1} MiB, sizes 0.5-7.5 KiB.",
        bytes as f64 / 1048576.0
    );
    println!();
    println!("| measurement | codafs upload | local copy (cp + sync) | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| files/s | {:.0} | {:.0} | {:.2} |",
        FILES as f64 / ours,
        FILES as f64 / local,
        local / ours
    );
    println!(
        "| MB/s | {:.1} | {:.1} | {:.2} |",
        bytes as f64 / 1e6 / ours,
        bytes as f64 / 1e6 / local,
        local / ours
    );
    println!("| seconds | {ours:.2} | {local:.2} | |");
    println!();
    println!("Uploaded {} blobs in one commit (version {}); re-running the unchanged upload took {rerun:.2} s and sent nothing.", s.uploaded_blobs, s.version);

    Ok(())
}

fn main() -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(bench())
}
