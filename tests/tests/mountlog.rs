//! The mount's log stays bounded: a mount started the way web nodes start it (in the
//! background, logging to CACHE_DIR/mount.log) writes no line per request. Python's `open()`
//! asks `isatty` (an ioctl) on every open; thousands of them must leave the log small.
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use codafs_tests::{bounded, codafs_bin, wait_output, ClusterOpts, TestCluster};

/// Python `open()` calls made through the mount.
const OPENS: usize = 3000;

/// A background mount (`codafs mount` without `--foreground`): unmounted and its daemon
/// stopped by PID when dropped, also when the test fails.
struct BackgroundMount {
    path: PathBuf,
    cache: PathBuf,
    pid: i32,
}

impl BackgroundMount {
    fn start(tc: &TestCluster, name: &str) -> Result<Self> {
        let path = tc.root.path().join(name);
        let cache = tc.root.path().join(format!("{name}.cache"));
        std::fs::create_dir_all(&path)?;
        let child = Command::new(codafs_bin())
            .arg("mount")
            .arg(&path)
            .arg("--read-only")
            .arg("--cache-dir")
            .arg(&cache)
            .args(tc.client_args())
            // The production default filter, whatever the test run sets.
            .env_remove("CODAFS_LOG")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("starting codafs mount")?;
        let out = wait_output(child, Duration::from_secs(60))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success(),
            "codafs mount failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // "mounted PATH (daemon pid N, log FILE)"
        let pid = stdout
            .split("daemon pid ")
            .nth(1)
            .and_then(|s| s.split(',').next())
            .and_then(|s| s.trim().parse().ok())
            .with_context(|| format!("no daemon pid in {stdout:?}"))?;
        Ok(BackgroundMount { path, cache, pid })
    }

    fn log(&self) -> PathBuf {
        self.cache.join("mount.log")
    }

    fn status(&self) -> Result<codafs_client::status::MountStatus> {
        codafs_tests::mount_status(&self.path)
    }
}

impl Drop for BackgroundMount {
    fn drop(&mut self) {
        unsafe { libc::kill(self.pid, libc::SIGTERM) };
        let start = Instant::now();
        // kill(pid, 0) fails once the daemon is gone (it is not our child: init reaps it).
        while start.elapsed() < Duration::from_secs(10) && unsafe { libc::kill(self.pid, 0) } == 0 {
            std::thread::sleep(Duration::from_millis(50));
        }
        if unsafe { libc::kill(self.pid, 0) } == 0 {
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
        }
        let mounted = std::fs::read_to_string("/proc/mounts")
            .unwrap_or_default()
            .contains(&format!(" {} ", self.path.display()));
        if mounted {
            let _ = Command::new("fusermount3").arg("-u").arg("-z").arg(&self.path).status();
        }
    }
}

/// Opens `file` `n` times with Python's `open()` and reads it each time.
fn python_opens(file: &Path, n: usize) -> Result<()> {
    let script = "import sys\nfor _ in range(int(sys.argv[2])):\n    with open(sys.argv[1]) as f:\n        f.read()\n";
    let child = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(file)
        .arg(n.to_string())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running python3")?;
    let out = wait_output(child, Duration::from_secs(120))?;
    if !out.status.success() {
        bail!("python3 failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn python_opens_leave_no_log_line_per_request() {
    bounded(async {
        let tc = TestCluster::start(ClusterOpts::new(1, 0)).await?;
        tc.create_volume("www", 1).await?;
        TestCluster::write_file(&tc.client(), "www", "", "index.html", b"<p>hello</p>").await?;
        let m = BackgroundMount::start(&tc, "m")?;
        let file = m.path.join("www/index.html");
        python_opens(&file, 10)?;
        let before = std::fs::metadata(m.log())?.len();
        let ioctls_before = m.status()?.requests("ioctl");

        python_opens(&file, OPENS)?;

        let st = m.status()?;
        let ioctls = st.requests("ioctl") - ioctls_before;
        ensure!(
            ioctls >= OPENS as u64,
            "{OPENS} Python opens made only {ioctls} ioctl requests: the test does not exercise what it should"
        );
        let log = std::fs::read_to_string(m.log())?;
        let grown = log.len() as u64 - before;
        ensure!(
            grown < 4096,
            "{ioctls} ioctls grew the mount log by {grown} bytes:\n{}",
            &log[log.len().saturating_sub(2000)..]
        );
        ensure!(
            !log.contains("Not Implemented") && !log.contains("ioctl"),
            "the log names requests:\n{}",
            &log[log.len().saturating_sub(2000)..]
        );
        ensure!(
            log.lines().count() < 50,
            "{} lines in the mount log:\n{log}",
            log.lines().count()
        );
        let mode = std::fs::metadata(m.log())?.permissions().mode() & 0o777;
        ensure!(mode == 0o600, "mount.log is {mode:o}");
        Ok(())
    })
    .await
}
