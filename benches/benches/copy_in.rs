//! Publishing by copying into a writable mount: `cp -r` of the web tree (5,000 files, median
//! about 8 KiB, 50 directories), as a webmaster's FTP session or `cp` would, through
//! - a write-back mount (the default): `close` returns once the file is in the fsynced log, and
//!   `codafs sync` then waits until everything is on the servers;
//! - a `--write-through` mount: every `close` waits for the blob put and the commits;
//! - local disk: `cp -r` then `sync`, in the same run (the baseline of the ratios);
//! - a write-back mount whose cache directory (so its log) is on a tmpfs: the copy without the
//!   disk's cache flush behind each `close`, which shows how much of a file's time that flush is;
//!
//! and the same tree published with `rsync -r` (a temporary name per file, then a rename over
//! the real one) into a local directory and into a write-back mount; then an editor's atomic
//! saves into one of the copied directories (write a temporary file, `fsync` it, rename it over
//! the page, `fsync` the directory), where each `fsync` waits for the servers.
//!
//! Run: `cargo build --bin codafs && cargo bench -p codafs-benches --profile dev --bench copy_in`
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use codafs_benches::{write_web_tree, FILES};
use codafs_tests::{ClusterOpts, Mount, TestCluster, Tmpfs};

/// `cp -r from to`; returns the seconds it took.
fn cp(from: &Path, to: &Path) -> Result<f64> {
    let start = Instant::now();
    let st = Command::new("cp").arg("-r").arg(from).arg(to).status()?;
    ensure!(st.success(), "cp -r {} {} failed", from.display(), to.display());
    Ok(start.elapsed().as_secs_f64())
}

/// `rsync -r from/ to`; returns the seconds it took.
fn rsync(from: &Path, to: &Path) -> Result<f64> {
    let start = Instant::now();
    let st = Command::new("rsync")
        .arg("-r")
        .arg(format!("{}/", from.display()))
        .arg(to)
        .status()
        .context("rsync (scripts/install-deps.sh installs it)")?;
    ensure!(st.success(), "rsync {} {} failed", from.display(), to.display());
    Ok(start.elapsed().as_secs_f64())
}

/// Editor saves (see the module doc) of one page in `dir`, `SAVES` times; returns the seconds.
fn saves(dir: &Path) -> Result<f64> {
    let start = Instant::now();
    let tmp = dir.join(".page.html.swp");
    for i in 0..SAVES {
        let mut f = std::fs::File::create(&tmp)?;
        std::io::Write::write_all(
            &mut f,
            format!("<html><body>save {i}</body></html>\n").repeat(40).as_bytes(),
        )?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, dir.join("page.html"))?;
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(start.elapsed().as_secs_f64())
}

/// Saves per run of [`saves`].
const SAVES: usize = 200;

/// The first directory (by name) of the copied tree under `root`.
fn first_dir(root: &Path) -> Result<std::path::PathBuf> {
    let mut dirs: Vec<_> = std::fs::read_dir(root)?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect();
    dirs.sort();
    dirs.into_iter().next().context("the copied tree has no directory")
}

/// Runs `f`, then sync(2); returns the seconds both took.
fn durable(f: impl FnOnce() -> Result<f64>) -> Result<f64> {
    let copied = f()?;
    let start = Instant::now();
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    Ok(copied + start.elapsed().as_secs_f64())
}

/// A writable mount at `dir/name` whose root writes as the cluster's admin.
fn writer(tc: &TestCluster, dir: &Path, name: &str, extra: &[&str]) -> Result<Mount> {
    let m = Mount::start(&tc.client_args(), dir, name, extra)?;
    let reply = m.control(&format!("login {}", tc.token))?;
    ensure!(reply["ok"] == true, "login: {reply}");
    Ok(m)
}

async fn bench() -> Result<Vec<String>> {
    let tc = TestCluster::start(ClusterOpts::new(2, 1)).await?;
    tc.create_volume("www", 2).await?;
    let local = tempfile::tempdir()?;
    let src = local.path().join("src");
    let tree = write_web_tree(&src)?;

    // Local disk: the copy, and the copy made durable.
    let local_cp = cp(&src, &local.path().join("copy"))?;
    let local_durable = durable(|| Ok(local_cp))?;
    let local_rsync = durable(|| rsync(&src, &local.path().join("rsynced")))?;

    let wb = writer(&tc, tc.root.path(), "wb", &[])?;
    let before = wb.status()?;
    let wb_cp = cp(&src, &wb.path.join("www/wb")).context("cp into the write-back mount")?;
    let during = wb.status()?;
    let start = Instant::now();
    wb.sync()?;
    let wb_servers = wb_cp + start.elapsed().as_secs_f64();
    let backlog = wb.status()?.writes.write_back.context("a write-back mount")?;
    let wb_rsync = rsync(&src, &wb.path.join("www/rsynced")).context("rsync into the write-back mount")?;
    let start = Instant::now();
    wb.sync()?;
    let wb_rsync_servers = wb_rsync + start.elapsed().as_secs_f64();
    let after = wb.status()?.writes.write_back.context("a write-back mount")?;

    let wt = writer(&tc, tc.root.path(), "wt", &["--write-through"])?;
    let wt_cp = cp(&src, &wt.path.join("www/wt")).context("cp into the write-through mount")?;

    // The same copy with the mount's cache, and so its log, in memory: what the copy costs
    // without the disk's cache flush behind each `close` (not durable; the ceiling of this
    // machine's FUSE round trips).
    let ram = Tmpfs::mount(&tc.root.path().join("ram"), 2048)?;
    let rb = writer(&tc, ram.path(), "rb", &[])?;
    let rb_cp = cp(&src, &rb.path.join("www/rb")).context("cp into the write-back mount on tmpfs")?;
    rb.sync()?;
    drop(rb);
    drop(ram);

    let local_saves = saves(&first_dir(&local.path().join("copy"))?)?;
    let wb_saves = saves(&first_dir(&wb.path.join("www/wb"))?).context("saves on the write-back mount")?;
    let wt_saves = saves(&first_dir(&wt.path.join("www/wt"))?).context("saves on the write-through mount")?;
    let save_row = |what: &str, secs: f64| {
        format!(
            "| {what} | {:.2} | {:.0} | {:.2} |",
            secs * 1000.0 / SAVES as f64,
            SAVES as f64 / secs,
            local_saves / secs
        )
    };

    let rate = |secs: f64| FILES as f64 / secs;
    let row = |what: &str, secs: f64| {
        format!(
            "| {what} | {secs:.2} | {:.0} | {:.2} |",
            rate(secs),
            rate(secs) / rate(local_durable)
        )
    };
    Ok(vec![
        format!(
            "Files: {FILES} in 50 directories, {:.1} MiB, median size {} B, copied with `cp -r` as root (the admin token).",
            tree.total_bytes() as f64 / 1048576.0,
            tree.median()
        ),
        String::new(),
        "| copy | seconds | files/s | ratio to local cp + sync |".into(),
        "|---|---|---|---|".into(),
        row("local disk, cp -r", local_cp),
        row("local disk, cp -r + sync", local_durable),
        row("write-back mount, cp -r (every close in the fsynced log)", wb_cp),
        row("write-back mount, until every file is on the servers (codafs sync)", wb_servers),
        row("--write-through mount, cp -r", wt_cp),
        row(
            "write-back mount with its cache and log on tmpfs, cp -r (no disk flush: not durable, the ceiling)",
            rb_cp,
        ),
        row("local disk, rsync -r + sync", local_rsync),
        row("write-back mount, rsync -r", wb_rsync),
        row("write-back mount, rsync -r, until on the servers (codafs sync)", wb_rsync_servers),
        String::new(),
        format!("Editor saves ({SAVES}; temporary file, fsync, rename, fsync of the directory) in one copied directory:"),
        String::new(),
        "| save | ms per save | saves/s | ratio to local |".into(),
        "|---|---|---|---|".into(),
        save_row("local disk", local_saves),
        save_row("write-back mount (each fsync waits for the servers)", wb_saves),
        save_row("--write-through mount", wt_saves),
        String::new(),
        format!(
            "Write-back batches: cp sent {} changes in {} commits, {} conflicts; rsync {} changes in {} commits, {} conflicts.",
            backlog.changes_sent,
            backlog.batches_sent,
            backlog.conflicts,
            after.changes_sent - backlog.changes_sent,
            after.batches_sent - backlog.batches_sent,
            after.conflicts - backlog.conflicts
        ),
        format!(
            "Kernel requests during the write-back cp -r: {} answered at once on the FUSE thread, {} waited on the runtime.",
            during.answered_inline - before.answered_inline,
            during.handed_off - before.handed_off
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
