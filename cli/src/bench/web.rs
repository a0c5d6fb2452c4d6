//! The web workload: Zipf-chosen open+read+close and stat from several threads, through the
//! mount and on the local copy in alternating rounds (so drift of the machine hits both sides
//! alike), plus a first read of every file with empty kernel caches and the mount's hit ratio.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Result;
use codafs_client::webtree::{open_read_close, relpath, zipf_cdf, zipf_pick};
use rand::SeedableRng;

use super::report::{percentile, Report, Row};
use super::Ctx;

/// The section's rows, notes, and warm latency samples (mount, local) for the chart.
type Outcome = (Vec<Row>, Vec<String>, (Vec<f64>, Vec<f64>));

/// One timed run: ops/s, bytes/s, per-op latencies in ms.
pub(crate) struct Run {
    pub(crate) ops: f64,
    pub(crate) bytes: f64,
    pub(crate) lat_ms: Vec<f64>,
}

/// `readers` threads doing `op` on Zipf-chosen files under `root` for `dur`.
pub(crate) fn drive(
    root: &Path,
    files: usize,
    cdf: &[f64],
    readers: usize,
    dur: Duration,
    op: fn(&Path) -> std::io::Result<u64>,
) -> Result<Run> {
    let paths: Vec<PathBuf> = (0..files).map(|i| root.join(relpath(i))).collect();
    let per: Vec<std::io::Result<(u64, Vec<f64>)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..readers)
            .map(|t| {
                let paths = &paths;
                s.spawn(move || -> std::io::Result<(u64, Vec<f64>)> {
                    let mut rng = rand::rngs::StdRng::seed_from_u64(t as u64);
                    let start = Instant::now();
                    let (mut bytes, mut lat) = (0u64, Vec::new());
                    while start.elapsed() < dur {
                        let p = &paths[zipf_pick(cdf, &mut rng)];
                        let t0 = Instant::now();
                        bytes += op(p)?;
                        lat.push(t0.elapsed().as_secs_f64() * 1000.0);
                    }
                    Ok((bytes, lat))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("reader panicked")))
            })
            .collect()
    });
    let mut run = Run {
        ops: 0.0,
        bytes: 0.0,
        lat_ms: Vec::new(),
    };
    for r in per {
        let (b, l) = r?;
        run.bytes += b as f64;
        run.lat_ms.extend(l);
    }
    run.ops = run.lat_ms.len() as f64 / dur.as_secs_f64();
    run.bytes /= dur.as_secs_f64();
    Ok(run)
}

fn stat(p: &Path) -> std::io::Result<u64> {
    std::fs::metadata(p).map(|_| 0)
}

/// Writes back dirty pages and drops the kernel's page, dentry and inode caches (needs root).
pub(crate) fn drop_caches() -> Result<()> {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3\n")
        .map_err(|e| anyhow::anyhow!("cannot drop the kernel's caches (needs root): {e}"))
}

/// Reads every file once: MB/s.
fn read_all(root: &Path, files: usize) -> Result<f64> {
    let t = Instant::now();
    let mut bytes = 0u64;
    for i in 0..files {
        bytes += open_read_close(&root.join(relpath(i)))?;
    }
    Ok(bytes as f64 / 1e6 / t.elapsed().as_secs_f64())
}

pub(crate) async fn run(ctx: &Ctx, report: &mut Report) -> Result<()> {
    let (mnt, local) = (ctx.mounted_tree(), ctx.local.clone());
    let (files, readers, dur, rounds, zipf, mountpoint) = (
        ctx.files,
        ctx.readers,
        ctx.duration,
        ctx.rounds,
        ctx.zipf,
        ctx.mnt.clone(),
    );
    let before = crate::mount::mount_status(&mountpoint).ok();
    let (rows, notes, cdf) = tokio::task::spawn_blocking(move || -> Result<Outcome> {
        let mut rows = Vec::new();
        let mut notes = Vec::new();
        // First reads: local from disk, mount from the servers (the mount's cache is cold for
        // files it has not read yet).
        match drop_caches() {
            Ok(()) => {
                let l = read_all(&local, files)?;
                drop_caches()?;
                let m = read_all(&mnt, files)?;
                rows.push(Row::paired("first read, empty kernel caches, MB/s", &[m], &[l]));
            }
            Err(e) => notes.push(format!("first read not measured: {e}")),
        }
        // Warm both sides equally.
        read_all(&local, files)?;
        read_all(&mnt, files)?;
        let cdf = zipf_cdf(files, zipf);
        let (mut ops, mut mbs, mut p50, mut p99, mut st) = (
            [Vec::new(), Vec::new()],
            [Vec::new(), Vec::new()],
            [Vec::new(), Vec::new()],
            [Vec::new(), Vec::new()],
            [Vec::new(), Vec::new()],
        );
        let mut lat: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        for _ in 0..rounds {
            // A then B: local (1), mount (0).
            for (side, root) in [(1, &local), (0, &mnt)] {
                let r = drive(root, files, &cdf, readers, dur, open_read_close)?;
                ops[side].push(r.ops);
                mbs[side].push(r.bytes / 1e6);
                p50[side].push(percentile(&r.lat_ms, 0.5).unwrap_or(0.0));
                p99[side].push(percentile(&r.lat_ms, 0.99).unwrap_or(0.0));
                lat[side].extend(r.lat_ms);
                st[side].push(drive(root, files, &cdf, readers, dur, stat)?.ops);
            }
        }
        rows.push(Row::paired("warm open+read+close, ops/s", &ops[0], &ops[1]));
        rows.push(Row::paired("warm open+read+close, MB/s", &mbs[0], &mbs[1]));
        rows.push(Row::paired("warm read latency p50, ms", &p50[0], &p50[1]));
        rows.push(Row::paired("warm read latency p99, ms", &p99[0], &p99[1]));
        rows.push(Row::paired("warm stat, ops/s", &st[0], &st[1]));
        let [m, l] = lat;
        Ok((rows, notes, (sample(m), sample(l))))
    })
    .await??;
    let after = crate::mount::mount_status(&ctx.mnt)?;
    let (h0, m0) = before.map_or((0, 0), |b| (b.cache.hits, b.cache.misses));
    let (hits, misses) = (
        after.cache.hits.saturating_sub(h0),
        after.cache.misses.saturating_sub(m0),
    );
    let s = report.section("web");
    s.rows = rows;
    s.rows.push(Row::single(
        "cache hit ratio during the section (mount's counters)",
        codafs_client::status::ratio(hits, misses),
    ));
    s.notes = notes;
    s.extra.insert("cache_hits".into(), hits.into());
    s.extra.insert("cache_misses".into(), misses.into());
    report.cdf = Some(cdf);
    Ok(())
}

/// Sorted, thinned to at most 200 points (for the chart).
fn sample(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.len() <= 200 {
        return v;
    }
    (0..200).map(|i| v[i * (v.len() - 1) / 199]).collect()
}
