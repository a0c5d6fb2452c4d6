//! Callback delay: how long after a writer's commit is acknowledged every watching mount serves
//! the new content. This is the staleness window of a web farm.
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use codafs_client::ops;
use codafs_client::webtree::relpath;

use super::report::{percentile, Report, Row};
use super::Ctx;

pub(crate) async fn run(ctx: &mut Ctx, report: &mut Report) -> Result<()> {
    if ctx.cluster.is_none() {
        report.skip("callbacks", "needs --demo or a credential that may write to the volume");
        return Ok(());
    }
    let mut mounts = vec![ctx.mnt.clone()];
    if let Some(d) = ctx.demo.as_mut() {
        let dir = ctx.work.join("cluster");
        for k in 1..ctx.observers {
            let m = ctx.work.join(format!("observer{k}"));
            crate::demo::start_mount(&dir, &format!("observer{k}"), &m, &["--read-only"], &mut d.children).await?;
            mounts.push(std::fs::canonicalize(&m)?);
        }
    }
    let c = ctx.writer()?;
    let rel = format!("{}/{}", ctx.subdir, relpath(7 % ctx.files));
    let targets: Vec<_> = mounts.iter().map(|m| m.join(&ctx.volume).join(&rel)).collect();
    for t in &targets {
        let _ = std::fs::read(t);
    }
    let mut delays = Vec::new();
    for round in 0..ctx.iterations {
        let content = format!("version {round} {}", std::process::id()).into_bytes();
        c.put_blob(bytes::Bytes::from(content.clone()), 2).await?;
        c.commit(ops::commit(&ctx.volume, vec![ops::file(&rel, &content, 0o644)]))
            .await?;
        let acked = Instant::now();
        let deadline = acked + Duration::from_secs(10);
        let mut pending: Vec<_> = targets.clone();
        while !pending.is_empty() {
            pending.retain(|t| std::fs::read(t).map_or(true, |d| d != content));
            if pending.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                bail!("change {round} not visible on {} mount(s) within 10 s", pending.len());
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        delays.push(acked.elapsed().as_secs_f64() * 1000.0);
    }
    let s = report.section("callbacks");
    s.rows.push(Row::single(
        &format!("commit acked -> visible on all {} mounts, p50 ms", mounts.len()),
        percentile(&delays, 0.5).unwrap_or(0.0),
    ));
    s.rows.push(Row::single(
        &format!("commit acked -> visible on all {} mounts, p99 ms", mounts.len()),
        percentile(&delays, 0.99).unwrap_or(0.0),
    ));
    s.extra.insert("observers".into(), mounts.len().into());
    s.extra.insert("p50_ms".into(), percentile(&delays, 0.5).into());
    s.extra.insert("p99_ms".into(), percentile(&delays, 0.99).into());
    Ok(())
}
