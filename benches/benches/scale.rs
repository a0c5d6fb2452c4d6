//! One big volume (issue #14, scale): `SCALE_FILES` tiny files (default 200,000; the issue's
//! figure is 1,000,000) in directories of 1,000, published through the client library in
//! commits of 5,000 files, into 2 data servers + 1 witness that build a snapshot every 10 log
//! entries. Reported:
//! - the publish rate;
//! - each server's resident memory now and at its peak (snapshots included), and its directory
//!   on disk, against the content's size;
//! - the size of the last snapshot and how long building it took (from the server's log);
//! - a full `find` through a new mount (empty cache) and again (warm), against `find` of the same
//!   tree on local disk with the kernel's caches dropped and again;
//! - the mount daemon's resident memory after the walks, and how long the servers took to
//!   answer the cold walk's directory pages (from their metrics).
//!
//! With `SCALE_READ_ALL=1`, every file is then read through the mount (`codafs prefetch`) and
//! read again at random by 1 and 4 readers: the mount daemon's memory with everything cached.
//!
//! Run: `cargo build --bin codafs && SCALE_FILES=200000 cargo bench -p codafs-benches --profile dev --bench scale`
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use codafs_benches::{drop_caches, du_mib, publish_files, tree_path, PER_DIR};
use codafs_client::ops;
use codafs_tests::{ClusterOpts, Mount, TestCluster};

/// The content of file `i` (about 100 bytes, all different).
fn content(i: usize) -> Vec<u8> {
    format!("<p>file {i}</p>{}\n", "x".repeat(i % 80)).into_bytes()
}

/// `VmRSS` and `VmHWM` of process `pid`, MiB.
fn rss_mib(pid: u32) -> Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<f64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("no {name} in /proc/{pid}/status"))?;
        let kb: f64 = line.split_whitespace().nth(1).context("a value")?.parse()?;
        Ok(kb / 1024.0)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// Runs `find DIR` and returns (entries, seconds).
fn find(dir: &Path) -> Result<(usize, f64)> {
    let start = Instant::now();
    let out = Command::new("find").arg(dir).output()?;
    if !out.status.success() {
        bail!("find {}: {}", dir.display(), String::from_utf8_lossy(&out.stderr));
    }
    Ok((
        out.stdout.iter().filter(|b| **b == b'\n').count(),
        start.elapsed().as_secs_f64(),
    ))
}

/// The servers' `Meta/ReadDir` RPCs so far: how many, and the seconds they took in all.
#[derive(Clone, Copy)]
struct Listings {
    count: f64,
    seconds: f64,
}

impl Listings {
    fn since(self, before: Listings) -> Listings {
        Listings {
            count: self.count - before.count,
            seconds: self.seconds - before.seconds,
        }
    }

    fn mean_ms(&self) -> f64 {
        if self.count == 0.0 {
            0.0
        } else {
            self.seconds / self.count * 1000.0
        }
    }
}

async fn listing_time(metrics: &[String]) -> Result<Listings> {
    let (count, seconds) = codafs_tests::http::rpc_totals(metrics, "Meta/ReadDir").await?;
    Ok(Listings { count, seconds })
}

/// The last "built snapshot" line of a server log: (bytes, ms).
fn last_snapshot(log: &str) -> Option<(u64, u64)> {
    let line = log.lines().rev().find(|l| l.contains("built snapshot"))?;
    let field = |name: &str| -> Option<u64> {
        let rest = line.split(&format!("{name}=")).nth(1)?;
        rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
    };
    Some((field("bytes")?, field("ms")?))
}

async fn bench() -> Result<Vec<String>> {
    let files: usize = std::env::var("SCALE_FILES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let tc = TestCluster::start(ClusterOpts::new(2, 1).arg("--snapshot-every", "10").metrics()).await?;
    let metrics: Vec<String> = tc.servers.iter().filter_map(|s| s.metrics_addr.clone()).collect();
    tc.create_volume("www", 2).await?;
    let c = tc.client();
    let local = tempfile::tempdir()?;
    let start = Instant::now();
    let content_bytes = publish_files(&c, files, content, |path, data| {
        let p = local.path().join(path);
        if let Some(dir) = p.parent() {
            std::fs::create_dir_all(dir)?;
        }
        Ok(std::fs::write(p, data)?)
    })
    .await?;
    let upload = start.elapsed().as_secs_f64();
    // A few more entries so the last snapshot holds the whole tree.
    for i in 0..12 {
        let op = ops::dir(&format!("extra{i}"), 0o755);
        c.commit(ops::commit("www", vec![op])).await?;
    }
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;

    let mut out = vec![
        format!(
            "{files} files of about 100 B ({:.1} MiB of content) in {} directories; 2 data servers + 1 witness, a snapshot every 10 entries.",
            content_bytes as f64 / 1048576.0,
            files.div_ceil(PER_DIR)
        ),
        format!(
            "Publish through the client library, 5,000 files per commit: {upload:.1} s ({:.0} files/s).",
            files as f64 / upload
        ),
        String::new(),
        "| server | RSS now, MiB | RSS peak, MiB | directory on disk, MiB | last snapshot, MiB | built in, ms |".into(),
        "|---|---|---|---|---|---|".into(),
    ];
    for s in &tc.servers {
        let (rss, peak) = rss_mib(s.pid().context("server pid")?)?;
        let (bytes, ms) = last_snapshot(&s.log()).unwrap_or((0, 0));
        out.push(format!(
            "| {}{} | {rss:.0} | {peak:.0} | {:.0} | {:.1} | {ms} |",
            s.addr,
            if s.witness { " (witness)" } else { "" },
            du_mib(&s.dir)?,
            bytes as f64 / 1048576.0
        ));
    }

    drop_caches()?;
    let (n_local, cold_local) = find(local.path())?;
    let (_, warm_local) = find(local.path())?;
    let dir = tempfile::tempdir()?;
    let m = Mount::start(&tc.client_args(), dir.path(), "web", &["--read-only"])?;
    let www = m.path.join("www");
    let listed = listing_time(&metrics).await?;
    let (n_coda, cold_coda) = find(&www)?;
    let listed = listing_time(&metrics).await?.since(listed);
    let (_, warm_coda) = find(&www)?;
    let (mount_rss, _) = rss_mib(m.pid().context("mount pid")?)?;
    out.push(String::new());
    out.push("| `find` of the whole tree | /coda | local disk | ratio |".into());
    out.push("|---|---|---|---|".into());
    out.push(format!(
        "| cold (new mount, empty cache / caches dropped), s | {cold_coda:.2} | {cold_local:.2} | {:.2} |",
        cold_coda / cold_local
    ));
    out.push(format!(
        "| warm, s | {warm_coda:.2} | {warm_local:.2} | {:.2} |",
        warm_coda / warm_local
    ));
    out.push(format!(
        "Entries found: {n_coda} through /coda, {n_local} locally. Mount daemon RSS after the walks: {mount_rss:.0} MiB."
    ));
    out.push(format!(
        "The cold walk asked the servers for {:.0} directory pages, which took them {:.1} ms each on average ({:.2} s in all).",
        listed.count,
        listed.mean_ms(),
        listed.seconds
    ));
    if std::env::var("SCALE_READ_ALL").is_ok_and(|v| v == "1") {
        let mut m = m;
        out.extend(read_all(&m, files)?);
        out.extend(restarts(&mut m)?);
    }
    Ok(out)
}

/// Every file read through the mount (`codafs prefetch`), then warm reads of random files by
/// 1 and then 4 readers: the mount daemon's memory with everything cached, and whether it grows
/// with the request rate.
fn read_all(m: &Mount, files: usize) -> Result<Vec<String>> {
    let pid = m.pid().context("mount pid")?;
    let www = m.path.join("www");
    let start = Instant::now();
    let st = Command::new(codafs_tests::codafs_bin())
        .arg("prefetch")
        .arg(&www)
        .arg("--parallel")
        .arg("16")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()?;
    if !st.success() {
        bail!("codafs prefetch {} failed: {st}", www.display());
    }
    let read_secs = start.elapsed().as_secs_f64();
    let cached = m.status()?.cache.entries;
    let (rss, _) = rss_mib(pid)?;
    let mut out = vec![
        String::new(),
        format!(
            "Every file read through the mount (`codafs prefetch --parallel 16`): {read_secs:.0} s; \
             {cached} files cached; mount daemon RSS {rss:.0} MiB."
        ),
        String::new(),
        "| warm readers (random files, 5 s) | reads/s | mount RSS after, MiB |".into(),
        "|---|---|---|".into(),
    ];
    for readers in [1usize, 4] {
        let n = std::thread::scope(|s| {
            let handles = (0..readers)
                .map(|r| {
                    let www = &www;
                    s.spawn(move || {
                        let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ r as u64;
                        codafs_benches::count_for(std::time::Duration::from_secs(5), || {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            codafs_benches::open_read_close(&www.join(tree_path(x as usize % files)))
                        })
                    })
                })
                .collect();
            codafs_benches::sum_counts(handles)
        })?;
        let (rss, _) = rss_mib(pid)?;
        out.push(format!("| {readers} | {:.0} | {rss:.0} |", n as f64 / 5.0));
    }
    Ok(out)
}

/// How long the mount takes to start again over its full cache, with the kernel's caches
/// dropped first (as after a reboot): after a clean stop (the saved index); after a kill with a
/// checkpoint of the index on disk (the clean stop's index copied as the checkpoint, which is
/// what a daemon writes every `--cache-checkpoint` seconds), and how long its background sweep
/// took; after a kill with no checkpoint (the cache's files listed); and that with the cache as
/// an older version left it (no marker of a finished permissions pass: that walk too, which
/// every start did before).
fn restarts(m: &mut Mount) -> Result<Vec<String>> {
    let mut out = vec![
        String::new(),
        "| mount start over the full cache, caches dropped | seconds |".into(),
        "|---|---|".into(),
    ];
    type Stop = fn(&mut Mount) -> Result<()>;
    let cases: [(&str, Stop); 4] = [
        ("after a clean stop (saved index)", |m| {
            m.stop();
            // The next case's checkpoint: the index as it is now.
            std::fs::copy(m.cache.join("blobs.index"), m.cache.join("blobs.checkpoint"))?;
            Ok(())
        }),
        (
            "after kill -9, from a checkpoint (files swept in the background)",
            |m| {
                m.kill9();
                Ok(())
            },
        ),
        ("after kill -9, no checkpoint (cache files listed)", |m| {
            m.kill9();
            Ok(no_checkpoint(m)?)
        }),
        (
            "after kill -9, no checkpoint, no permissions marker (as every start before)",
            |m| {
                m.kill9();
                no_checkpoint(m)?;
                Ok(std::fs::remove_file(
                    m.cache.join(codafs_common::perms::RESTRICTED_MARKER),
                )?)
            },
        ),
    ];
    for (what, stop) in cases {
        stop(m)?;
        drop_caches()?;
        let count = |m: &Mount, what: &str| m.log().matches(what).count();
        let (swept_before, from_checkpoint) = (count(m, "cache swept"), count(m, "opened from its checkpoint"));
        let start = Instant::now();
        m.remount()?;
        out.push(format!("| {what} | {:.2} |", start.elapsed().as_secs_f64()));
        if count(m, "opened from its checkpoint") > from_checkpoint {
            // Bounded: a million files take seconds to list.
            let deadline = Instant::now() + std::time::Duration::from_secs(300);
            while m.log().matches("cache swept").count() == swept_before && Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            let log = m.log();
            let fields = log
                .lines()
                .rev()
                .find_map(|l| l.split_once("cache swept").map(|(_, f)| f.trim().to_string()))
                .unwrap_or_else(|| "none within 300 s".into());
            out.push(format!(
                "| ... and its background sweep done (`{fields}`) | {:.2} |",
                start.elapsed().as_secs_f64()
            ));
        }
    }
    Ok(out)
}

/// Removes the cache's checkpoint, so the next start lists the cache.
fn no_checkpoint(m: &Mount) -> std::io::Result<()> {
    match std::fs::remove_file(m.cache.join("blobs.checkpoint")) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn main() -> Result<()> {
    codafs_benches::print_report(bench)
}
