//! `codafs bench`: the real binary runs every section against its own throw-away cluster with
//! tiny sizes (`--smoke`), prints JSON with a number for each measurement, writes bench.json and
//! bench.svg, and leaves no mount or server behind. No timing is asserted: only that each
//! measurement ran and is sane. Bad arguments get a clear error.
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use codafs_tests::codafs_bin;

/// Runs `codafs ARGS`, killed after `limit`: (success, stdout, stderr).
fn run(args: &[&str], limit: Duration) -> (bool, String, String) {
    let mut child = Command::new(codafs_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start codafs");
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if let Ok(None) = child.try_wait() {
        // SIGINT: the bench stops what it started.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        std::thread::sleep(Duration::from_secs(10));
        let _ = child.kill();
    }
    let out = child.wait_with_output().expect("codafs output");
    (
        out.status.success() && start.elapsed() < limit,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn num(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

#[test]
fn bench_demo_smoke_measures_every_section_and_cleans_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    // nginx's workers run as another user and must reach the local copy inside.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let work = dir.path().join("work");
    let out = dir.path().join("out");
    let mnt = dir.path().join("mnt");
    let (ok, stdout, stderr) = run(
        &[
            "bench",
            "--demo",
            "--smoke",
            "--json",
            "--out",
            out.to_str().expect("utf-8 path"),
            "--work-dir",
            work.to_str().expect("utf-8 path"),
            "--mount-dir",
            mnt.to_str().expect("utf-8 path"),
        ],
        Duration::from_secs(240),
    );
    // Nothing left behind: no fuse mount under the temp dir, no server of ours.
    let mounts = std::fs::read_to_string("/proc/mounts").expect("/proc/mounts");
    let root = dir.path().display().to_string();
    assert!(
        !mounts.lines().any(|l| l.contains(&root)),
        "a mount was left under {root}:\n{mounts}"
    );
    let procs = Command::new("pgrep").args(["-f", &root]).output().expect("pgrep");
    assert!(
        String::from_utf8_lossy(&procs.stdout).trim().is_empty(),
        "processes left running under {root}"
    );
    assert!(ok, "codafs bench failed:\n{stderr}\n{stdout}");
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("JSON on stdout");
    let s = &v["sections"];
    for name in ["web", "http", "publish", "callbacks", "failover"] {
        assert_eq!(s[name]["status"], "ran", "section {name}: {}", s[name]);
        let rows = s[name]["rows"].as_array().expect("rows");
        assert!(!rows.is_empty(), "section {name} has no rows");
        for r in rows {
            assert!(num(&r["mount"]) > 0.0, "{name}: {r}");
            if !r["local"].is_null() {
                assert!(num(&r["local"]) > 0.0, "{name}: {r}");
                assert!(num(&r["ratio"]) > 0.0, "{name}: {r}");
            }
        }
    }
    let row = |sec: &str, prefix: &str| {
        s[sec]["rows"]
            .as_array()
            .and_then(|rows| {
                rows.iter()
                    .find(|r| r["name"].as_str().is_some_and(|n| n.starts_with(prefix)))
            })
            .cloned()
            .unwrap_or_else(|| panic!("no row {prefix} in {sec}"))
    };
    for side in ["mount", "local"] {
        let (p50, p99) = (row("web", "warm read latency p50"), row("web", "warm read latency p99"));
        assert!(num(&p99[side]) >= num(&p50[side]), "web p99 < p50 ({side})");
        let (p50, p99) = (
            row("http", "nginx GET latency p50"),
            row("http", "nginx GET latency p99"),
        );
        assert!(num(&p99[side]) >= num(&p50[side]), "http p99 < p50 ({side})");
    }
    assert!(num(&s["callbacks"]["p99_ms"]) >= num(&s["callbacks"]["p50_ms"]));
    assert_eq!(s["failover"]["rows"].as_array().map(Vec::len), Some(6));
    assert!(out.join("bench.json").is_file());
    let svg = std::fs::read_to_string(out.join("bench.svg")).expect("bench.svg");
    assert!(svg.starts_with("<svg") || svg.starts_with("<?xml"));
}

#[test]
fn bench_refuses_bad_arguments_clearly() {
    let (ok, _, err) = run(
        &[
            "bench",
            "--mount",
            "/nonexistent",
            "--volume",
            "www",
            "--only",
            "failover",
        ],
        Duration::from_secs(30),
    );
    assert!(!ok);
    assert!(err.contains("needs --demo"), "{err}");
    // A path that is not a mount fails before anything is published.
    let (ok, _, err) = run(
        &["bench", "--mount", "/nonexistent", "--volume", "www", "--only", "web"],
        Duration::from_secs(30),
    );
    assert!(!ok);
    assert!(err.contains("--mount /nonexistent"), "{err}");
    let (ok, _, err) = run(&["bench", "--demo", "--files", "0"], Duration::from_secs(30));
    assert!(!ok);
    assert!(err.contains("--files must be at least 1"), "{err}");
}
