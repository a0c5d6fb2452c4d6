//! Failover: what a web node sees when servers die. During continuous reads (through the mount,
//! of files it has not cached, and through the client library) and small writes, the Raft
//! leader is killed with SIGKILL, restarted after recovery, then a data server likewise. The
//! numbers are the time from the kill until each kind of operation succeeds again. Only with
//! --demo: the bench never kills servers it did not start.
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use codafs_client::transport::BlobRef;
use codafs_client::{ops, Cluster};

use super::report::{Report, Row};
use super::Ctx;

/// (started, ended, succeeded) of each operation of one loop.
type Events = Arc<Mutex<Vec<(Instant, Instant, bool)>>>;

fn record(ev: &Events, start: Instant, ok: bool) {
    if let Ok(mut v) = ev.lock() {
        v.push((start, Instant::now(), ok));
    }
}

/// Time from `t0` until an operation that started after the last failure (after `t0`) ended
/// successfully; None if none did yet.
fn recovered(ev: &Events, t0: Instant) -> Option<Duration> {
    let v = ev.lock().ok()?;
    let last_fail = v.iter().filter(|(s, _, ok)| *s >= t0 && !ok).map(|(s, _, _)| *s).max();
    let from = last_fail.unwrap_or(t0);
    v.iter()
        .filter(|(s, _, ok)| *ok && *s >= from && *s >= t0)
        .map(|(_, e, _)| *e - t0)
        .min()
}

const LIMIT: Duration = Duration::from_secs(30);

async fn leader(c: &Cluster, addrs: &[String]) -> Option<usize> {
    for (i, a) in addrs.iter().enumerate() {
        if let Ok(Ok(st)) = tokio::time::timeout(Duration::from_secs(2), c.status_on(a)).await {
            if st.role == "leader" {
                return Some(i);
            }
        }
    }
    None
}

async fn wait_up(c: &Cluster, addr: &str) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < LIMIT {
        if let Ok(Ok(st)) = tokio::time::timeout(Duration::from_secs(2), c.status_on(addr)).await {
            if st.leader_id != 0 {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{addr} did not come back within {LIMIT:?}")
}

pub(crate) async fn run(ctx: &mut Ctx, report: &mut Report) -> Result<()> {
    if ctx.demo.is_none() {
        report.skip("failover", "needs --demo");
        return Ok(());
    }
    // The loops run on tasks of their own; the client comes back to the context at the end.
    let c = Arc::new(ctx.cluster.take().context("no credential to write with")?);
    let vol = ctx.volume.clone();
    // Files no mount has read yet, one per read.
    let n = if ctx.iterations < 60 { 400 } else { 3000 };
    let mut batch = vec![ops::dir("failover", 0o755)];
    for i in 0..n {
        let data = format!("failover file {i}\n").into_bytes();
        c.put_blob(bytes::Bytes::from(data.clone()), 2).await?;
        batch.push(ops::file(&format!("failover/f{i}"), &data, 0o644));
    }
    c.commit(ops::commit(&vol, batch)).await?;
    let dir: PathBuf = ctx.mnt.join(&vol).join("failover");
    let deadline = Instant::now() + LIMIT;
    while !dir.join("f0").exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let (mount_ev, lib_ev, write_ev): (Events, Events, Events) = Default::default();
    // Mount reads on a thread of their own (they block in the kernel).
    let mount_loop = {
        let (stop, ev) = (stop.clone(), mount_ev.clone());
        std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let ok = codafs_client::webtree::open_read_close(&dir.join(format!("f{}", i % n))).is_ok();
                record(&ev, t, ok);
                if ok {
                    i += 1;
                } else {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        })
    };
    let lib_loop = {
        let (stop, ev, c, vol) = (stop.clone(), lib_ev.clone(), c.clone(), vol.clone());
        tokio::spawn(async move {
            let mut i = n / 2;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let read = async {
                    let a = c.resolve(None, &vol, &format!("failover/f{}", i % n)).await?;
                    let attr = a.attr.context("no attributes")?;
                    let b = BlobRef::of(&attr)?;
                    c.get_blob(&b).await?;
                    anyhow::Ok(())
                };
                let ok = matches!(tokio::time::timeout(Duration::from_secs(5), read).await, Ok(Ok(())));
                record(&ev, t, ok);
                i += 1;
                if !ok {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        })
    };
    let write_loop = {
        let (stop, ev, c, vol) = (stop.clone(), write_ev.clone(), c.clone(), vol.clone());
        tokio::spawn(async move {
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let data = format!("write {k}\n").into_bytes();
                let w = async {
                    c.put_blob(bytes::Bytes::from(data.clone()), 2).await?;
                    c.commit(ops::commit(&vol, vec![ops::file("failover/w", &data, 0o644)]))
                        .await?;
                    anyhow::Ok(())
                };
                let ok = matches!(tokio::time::timeout(Duration::from_secs(5), w).await, Ok(Ok(())));
                record(&ev, t, ok);
                k += 1;
                tokio::time::sleep(Duration::from_millis(if ok { 10 } else { 20 })).await;
            }
        })
    };
    let result = kills(ctx, &c, [&mount_ev, &lib_ev, &write_ev]).await;
    stop.store(true, Ordering::Relaxed);
    let _ = lib_loop.await;
    let _ = write_loop.await;
    let _ = tokio::task::spawn_blocking(move || mount_loop.join()).await;
    ctx.cluster = Arc::try_unwrap(c).ok();
    let rows = result?;
    report.section("failover").rows = rows;
    Ok(())
}

/// Kills the leader, then a data server (each restarted after recovery); rows of recovery times.
async fn kills(ctx: &mut Ctx, c: &Cluster, ev: [&Events; 3]) -> Result<Vec<Row>> {
    let d = ctx.demo.as_mut().context("no demo cluster")?;
    let dir = ctx.work.join("cluster");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut rows = Vec::new();
    for what in ["leader", "data server"] {
        let lead = leader(c, &d.addrs).await.context("no leader to start from")?;
        let victim = if what == "leader" {
            lead
        } else {
            // A data server (servers 1 and 2) that is not the leader.
            if lead == 0 {
                1
            } else {
                0
            }
        };
        let addr = d.addrs[victim].clone();
        let (name, child) = d.children.0.get_mut(victim).context("no such server")?;
        tracing::info!(%name, %addr, "kill -9");
        let t0 = Instant::now();
        child.kill().with_context(|| format!("killing {name}"))?;
        let _ = child.wait();
        let mut times = [None; 3];
        while t0.elapsed() < LIMIT && times.iter().any(Option::is_none) {
            tokio::time::sleep(Duration::from_millis(20)).await;
            for (t, e) in times.iter_mut().zip(ev) {
                if t.is_none() {
                    *t = recovered(e, t0);
                }
            }
        }
        for (t, kind) in times.iter().zip([
            "reads through the mount",
            "reads via the client library",
            "writes (commits)",
        ]) {
            let ms = t.map_or(f64::NAN, |t| t.as_secs_f64() * 1000.0);
            if t.is_none() {
                tracing::warn!(%kind, "did not recover within the limit");
            }
            rows.push(Row::single(
                &format!("kill -9 {what}: {kind} succeed again after, ms"),
                ms,
            ));
        }
        let sdir = dir.join(format!("s{}", victim + 1));
        let args = vec![
            "server".to_string(),
            "--dir".into(),
            sdir.display().to_string(),
            "--listen".into(),
            addr.clone(),
        ];
        *child = crate::demo::spawn(&dir, &format!("s{}", victim + 1), &args)?;
        wait_up(c, &addr).await?;
    }
    Ok(rows)
}
