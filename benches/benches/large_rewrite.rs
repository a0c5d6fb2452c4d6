//! Large files: a 1 GiB file written through a write-back mount, then rewritten in place 64 KiB
//! at a time (a database file, a video being re-tagged, a log), each rewrite closed and synced
//! to the servers; beside the same writes to local disk with fsync, in the same run.
//!
//! Reports, per rewrite: the seconds until the change is on the servers, and the blob bytes each
//! data server newly stored (its `blob_bytes_received` counter); then, once garbage collection
//! has run, each data server's blob bytes against the file's size; then a first read on a web
//! node with an empty cache (time to the first 4 KiB, and the whole file) against the local copy
//! read cold. Needs root (it drops the kernel's caches).
//!
//! Run: `cargo build --bin codafs && cargo bench -p codafs-benches --profile dev --bench large_rewrite`
//! (`REWRITES=100` for the full run; the default is 20).
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use codafs_tests::{ClusterOpts, Mount, TestCluster};

const SIZE: u64 = 1 << 30;
const EDIT: usize = 64 << 10;
/// The servers' GC grace in seconds: longer than storing the whole file takes (a chunk put
/// before its commit must outlive it), short enough to see collection in the run.
const GRACE: u64 = 30;

/// Writes SIZE bytes of non-repeating data to `path` and fsyncs it; returns the seconds taken.
fn write_big(path: &Path) -> Result<f64> {
    let start = Instant::now();
    let mut f = std::io::BufWriter::with_capacity(4 << 20, std::fs::File::create(path)?);
    let mut buf = vec![0u8; 1 << 20];
    for i in 0..SIZE >> 20 {
        codafs_common::testdata::fill_noise(i + 1, &mut buf);
        f.write_all(&buf)?;
    }
    f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(start.elapsed().as_secs_f64())
}

/// Rewrites EDIT bytes at `at` of `path` and fsyncs it; returns the seconds taken.
fn rewrite(path: &Path, at: u64, seed: u8) -> Result<f64> {
    let start = Instant::now();
    let data: Vec<u8> = (0..EDIT)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    f.write_all_at(&data, at)?;
    f.sync_all()?;
    Ok(start.elapsed().as_secs_f64())
}

/// `codafs sync MNT` with room for a gigabyte.
fn sync(m: &Mount) -> Result<()> {
    let out = Command::new(codafs_tests::codafs_bin())
        .arg("sync")
        .arg(&m.path)
        .args(["--timeout", "600"])
        .output()?;
    ensure!(
        out.status.success(),
        "codafs sync: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// (blob bytes newly received, blob bytes stored) of each data server.
async fn counters(tc: &TestCluster) -> Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    for s in tc.servers.iter().filter(|s| !s.witness) {
        let st = tc.status_of(&s.addr).await?;
        out.push((st.blob_bytes_received, st.blob_bytes));
    }
    Ok(out)
}

/// Seconds to open `path` and read its first 4 KiB, and then to read it to the end (from the
/// open, so the whole read includes the first).
fn timed_reads(path: &Path) -> Result<(f64, f64)> {
    let start = Instant::now();
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 4096];
    std::io::Read::read_exact(&mut f, &mut buf)?;
    let first = start.elapsed().as_secs_f64();
    std::io::copy(&mut f, &mut std::io::sink())?;
    Ok((first, start.elapsed().as_secs_f64()))
}

fn mib(b: u64) -> f64 {
    b as f64 / 1048576.0
}

async fn bench() -> Result<Vec<String>> {
    let rewrites: usize = std::env::var("REWRITES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let tc = TestCluster::start(ClusterOpts::new(2, 1).arg("--gc-grace-s", &GRACE.to_string())).await?;
    tc.create_volume("www", 2).await?;
    let m = Mount::start(
        &tc.client_args(),
        tc.root.path(),
        "a",
        &["--cache-size", "8G", "--log-limit", "4G"],
    )?;
    let reply = m.control(&format!("login {}", tc.token))?;
    ensure!(reply["ok"] == true, "login: {reply}");
    let local_dir = tempfile::tempdir()?;
    let local: PathBuf = local_dir.path().join("big.bin");
    let remote: PathBuf = m.path.join("www/big.bin");

    let local_write = write_big(&local)?;
    let start = Instant::now();
    write_big(&remote).context("writing 1 GiB through the mount")?;
    sync(&m)?;
    let remote_write = start.elapsed().as_secs_f64();

    let mut local_secs = Vec::new();
    let mut remote_secs = Vec::new();
    let mut sent = Vec::new();
    for i in 0..rewrites {
        // Spread over the file, never on a chunk boundary by design.
        let at = (i as u64 * 104_729 * 1021) % (SIZE - EDIT as u64);
        local_secs.push(rewrite(&local, at, i as u8)?);
        let before = counters(&tc).await?;
        let start = Instant::now();
        rewrite(&remote, at, i as u8).context("rewriting through the mount")?;
        sync(&m)?;
        remote_secs.push(start.elapsed().as_secs_f64());
        let after = counters(&tc).await?;
        sent.push(after.iter().zip(&before).map(|(a, b)| a.0 - b.0).max().unwrap_or(0));
    }
    // Garbage collection: old versions' chunks become collectable GRACE after the rewrite that
    // replaced them, and GC runs every GRACE; two periods and a margin see every pass through.
    tokio::time::sleep(Duration::from_secs(2 * GRACE + 10)).await;
    let last = counters(&tc).await?;
    let stored_max = last.iter().map(|c| c.1).max().unwrap_or(0);

    // A web node with an empty cache: the first 4 KiB, then the whole file, against the local
    // copy read with the kernel's caches dropped.
    let web = Mount::start(
        &tc.client_args(),
        tc.root.path(),
        "web",
        &["--read-only", "--cache-size", "4G"],
    )?;
    let seen = web.path.join("www/big.bin");
    let (web_first, web_all) = timed_reads(&seen)?;
    codafs_benches::drop_caches()?;
    let (local_first, _) = timed_reads(&local)?;
    codafs_benches::drop_caches()?;
    let (_, local_all) = timed_reads(&local)?;

    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let mut sorted = sent.clone();
    sorted.sort_unstable();
    let med = sorted.get(sorted.len() / 2).copied().unwrap_or(0);
    let max = sorted.last().copied().unwrap_or(0);
    Ok(vec![
        format!("A 1 GiB file, then {rewrites} rewrites of 64 KiB at offsets spread over it, each closed, fsynced and (through the mount) synced to the servers."),
        String::new(),
        "| | local disk | codafs write-back mount | ratio |".into(),
        "|---|---|---|---|".into(),
        format!(
            "| write 1 GiB (+ fsync; mount: until on the servers) | {local_write:.2} s | {remote_write:.2} s | {:.2}x |",
            local_write / remote_write
        ),
        format!(
            "| one 64 KiB rewrite (+ fsync; mount: until on the servers), mean | {:.3} s | {:.3} s | {:.2}x |",
            mean(&local_secs),
            mean(&remote_secs),
            mean(&local_secs) / mean(&remote_secs)
        ),
        String::new(),
        format!(
            "Blob bytes a data server newly stored per rewrite: median {:.2} MiB, largest {:.2} MiB (aim: under 8 MiB).",
            mib(med),
            mib(max)
        ),
        format!(
            "After {rewrites} rewrites and garbage collection: {:.0} MiB of blobs on the fullest data server, {:.2}x the file's size (aim: under 2x).",
            mib(stored_max),
            stored_max as f64 / SIZE as f64
        ),
        String::new(),
        "| first read of the 1 GiB file | local disk, caches dropped | codafs web node, empty cache | ratio |".into(),
        "|---|---|---|---|".into(),
        format!(
            "| open + first 4 KiB | {:.1} ms | {:.1} ms | {:.2}x |",
            local_first * 1e3,
            web_first * 1e3,
            local_first / web_first
        ),
        format!(
            "| the whole file, MB/s | {:.0} | {:.0} | {:.2}x |",
            SIZE as f64 / 1e6 / local_all,
            SIZE as f64 / 1e6 / web_all,
            local_all / web_all
        ),
    ])
}

fn main() -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    for line in rt.block_on(bench())? {
        println!("{line}");
    }
    Ok(())
}
