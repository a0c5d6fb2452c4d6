//! `codafs demo`, the README's first command: it comes up with a mounted sample site, its
//! demo.env describes what it started, and SIGTERM stops all of it and unmounts.
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use codafs_tests::{codafs_bin, read_file};

fn alive(pid: i32) -> bool {
    // A zombie still answers kill(0); treat it as gone.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let exists = unsafe { libc::kill(pid, 0) } == 0;
    exists && !stat.contains(") Z ")
}

fn mounted(path: &std::path::Path) -> bool {
    std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .contains(&format!(" {} ", path.display()))
}

#[test]
fn demo_serves_the_sample_site_and_stops_cleanly() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("demo");
    let mnt = root.path().join("coda");
    let mut demo = Command::new(codafs_bin())
        .args(["demo", "--dir"])
        .arg(&dir)
        .arg("--mount")
        .arg(&mnt)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Whatever happens below, leave nothing behind.
    struct Cleanup(std::path::PathBuf, std::path::PathBuf, u32);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            unsafe { libc::kill(self.2 as i32, libc::SIGKILL) };
            let env = std::fs::read_to_string(self.0.join("demo.env")).unwrap_or_default();
            for pid in env
                .lines()
                .filter(|l| l.contains("_PID"))
                .flat_map(|l| l.split('=').nth(1).unwrap_or("").split(','))
            {
                if let Ok(p) = pid.parse::<i32>() {
                    unsafe { libc::kill(p, libc::SIGKILL) };
                }
            }
            if mounted(&self.1) {
                let _ = Command::new("fusermount3").arg("-u").arg("-z").arg(&self.1).status();
            }
        }
    }
    let _cleanup = Cleanup(dir.clone(), mnt.clone(), demo.id());
    let start = Instant::now();
    while !dir.join("demo.env").exists() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "demo did not come up within 60 s"
        );
        if let Ok(Some(st)) = demo.try_wait() {
            let mut err = String::new();
            let _ = std::io::Read::read_to_string(demo.stderr.as_mut().unwrap(), &mut err);
            panic!("demo exited early with {st}: {err}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let env = std::fs::read_to_string(dir.join("demo.env")).unwrap();
    let get = |k: &str| {
        env.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(
        get("CODAFS_MOUNT"),
        std::fs::canonicalize(&mnt).unwrap().display().to_string()
    );
    assert_eq!(get("CODAFS_SERVERS").split(',').count(), 3);
    assert!(std::path::Path::new(&get("CODAFS_CREDENTIAL")).exists());
    let index = read_file(&mnt.join("www/index.html")).unwrap();
    assert!(String::from_utf8_lossy(&index).contains("Served from /coda"));
    assert!(read_file(&mnt.join("www/css/site.css")).is_ok());
    let status = Command::new(codafs_bin()).arg("status").arg(&mnt).output().unwrap();
    assert!(status.status.success() && String::from_utf8_lossy(&status.stdout).contains("connected"));

    let pids: Vec<i32> = [get("CODAFS_SERVER_PIDS"), get("CODAFS_MOUNT_PID")]
        .join(",")
        .split(',')
        .filter_map(|p| p.parse().ok())
        .collect();
    assert_eq!(pids.len(), 4);
    unsafe { libc::kill(demo.id() as i32, libc::SIGTERM) };
    let start = Instant::now();
    let st = loop {
        if let Some(st) = demo.try_wait().unwrap() {
            break st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "demo did not stop within 30 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(st.success(), "demo exit status {st}");
    assert!(!mounted(&mnt), "demo left its mount behind");
    for p in pids {
        assert!(!alive(p), "demo left process {p} running");
    }
}
