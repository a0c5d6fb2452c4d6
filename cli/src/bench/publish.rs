//! Publishing: how fast a tree gets into the volume, against copying it on local disk. `upload`
//! is the library's own machinery (the same as `codafs upload`); with --demo also a plain copy
//! into a writable mount (what a webmaster's node does).
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use codafs_client::upload::{upload, UploadOptions};
use codafs_client::Cluster;

use super::report::{Report, Row};
use super::Ctx;

/// Publishes `local` into `volume:path` as one commit, removing what else is there (a tree
/// left by a run of another size becomes this run's).
pub(crate) async fn upload_tree(c: &Cluster, local: &Path, volume: &str, path: &str) -> Result<usize> {
    let opts = UploadOptions {
        volume: volume.into(),
        path: path.into(),
        delete: true,
        dry_run: false,
        parallel: 16,
    };
    Ok(upload(c, local, &opts, &()).await.context("uploading the tree")?.files)
}

/// Removes `volume:path` and everything under it: an upload of an empty directory with
/// `delete` empties it, then one commit removes it. So a run against an operator's volume
/// leaves only the reusable `bench-tree` behind.
pub(crate) async fn remove_tree(c: &Cluster, work: &Path, volume: &str, path: &str) -> Result<()> {
    let empty = work.join("empty");
    std::fs::create_dir_all(&empty)?;
    upload_tree(c, &empty, volume, path)
        .await
        .context("emptying the published copy")?;
    c.commit(codafs_client::ops::commit(
        volume,
        vec![codafs_client::ops::remove(path)],
    ))
    .await
    .with_context(|| format!("removing {volume}:{path}"))?;
    Ok(())
}

/// Recursive copy of files and directories (what `cp -r` does for this tree): files copied.
pub(crate) fn copy_tree(from: &Path, to: &Path) -> std::io::Result<usize> {
    std::fs::create_dir_all(to)?;
    let mut n = 0;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let dst = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            n += copy_tree(&e.path(), &dst)?;
        } else {
            std::fs::copy(e.path(), dst)?;
            n += 1;
        }
    }
    Ok(n)
}

fn timed_local_copy(ctx: &Ctx, name: &str) -> Result<f64> {
    let dst = ctx.work.join(name);
    let _ = std::fs::remove_dir_all(&dst);
    let t = Instant::now();
    let n = copy_tree(&ctx.local, &dst)?;
    // SAFETY: sync(2) takes no arguments and cannot fail; the copy counts once it is on disk.
    unsafe { libc::sync() };
    let rate = n as f64 / t.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&dst);
    Ok(rate)
}

pub(crate) async fn run(ctx: &Ctx, report: &mut Report) -> Result<()> {
    let Some(c) = ctx.cluster.as_ref() else {
        report.skip("publish", "needs --demo or a credential that may write to the volume");
        return Ok(());
    };
    let mut rows = Vec::new();
    let local = timed_local_copy(ctx, "copy-1")?;
    let sub = format!("bench-publish-{}", std::process::id());
    let t = Instant::now();
    let n = upload_tree(c, &ctx.local, &ctx.volume, &sub).await?;
    let up = n as f64 / t.elapsed().as_secs_f64();
    remove_tree(c, &ctx.work, &ctx.volume, &sub).await?;
    rows.push(Row::paired(
        "upload of a fresh copy, files/s (local: recursive copy + sync)",
        &[up],
        &[local],
    ));
    let mut notes = Vec::new();
    match ctx.demo.as_ref() {
        Some(d) => {
            let target = d.mnt.join(&ctx.volume).join(format!("{sub}-cp"));
            let local = timed_local_copy(ctx, "copy-2")?;
            let src = ctx.local.clone();
            let mnt = d.mnt.clone();
            let (n, secs) = tokio::task::spawn_blocking(move || -> Result<(usize, f64)> {
                let t = Instant::now();
                let n = copy_tree(&src, &target).with_context(|| format!("copying into {}", target.display()))?;
                crate::mount::sync(&mnt, 120.0)?;
                Ok((n, t.elapsed().as_secs_f64()))
            })
            .await??;
            remove_tree(c, &ctx.work, &ctx.volume, &format!("{sub}-cp")).await?;
            rows.push(Row::paired(
                "copy into the writable mount + codafs sync, files/s",
                &[n as f64 / secs],
                &[local],
            ));
        }
        None => notes.push("copy into a writable mount: needs --demo".to_string()),
    }
    let s = report.section("publish");
    s.rows = rows;
    s.notes = notes;
    Ok(())
}
