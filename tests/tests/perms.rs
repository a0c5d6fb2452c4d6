//! Files at rest: a cluster and a mount started under the most permissive umask keep their
//! directories 0700 and their files (keys, credentials, snapshots, RocksDB, blobs, cache) free
//! of group and other permissions; a server directory an older version left 0755/0644 is
//! tightened at the next start; the mount's control socket stays reachable by every user.
//!
//! This file holds one test: the umask is per process, and the test sets it to 0.
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Result};
use codafs_tests::{bounded, read_file, wait_until, ClusterOpts, Mount, TestCluster};

/// Every entry under `root` (itself included) whose mode gives group or others anything, or
/// a directory that is not exactly 0700; and how many entries were looked at. The servers keep
/// running while this walks, so an entry that vanishes between its listing and its `lstat` (a
/// RocksDB table replaced by a compaction, say) is skipped; `root` itself must exist.
fn loose_entries(root: &Path) -> Result<(Vec<(PathBuf, u32)>, usize)> {
    let gone = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
    let mut loose = Vec::new();
    let mut seen = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let m = match std::fs::symlink_metadata(&p) {
            Err(e) if gone(&e) && p != root => continue,
            m => m?,
        };
        seen += 1;
        let mode = m.permissions().mode() & 0o7777;
        if m.is_dir() {
            if mode != 0o700 {
                loose.push((p.clone(), mode));
            }
            let entries = match std::fs::read_dir(&p) {
                Err(e) if gone(&e) && p != root => continue,
                r => r?,
            };
            for e in entries {
                stack.push(e?.path());
            }
        } else if !m.file_type().is_symlink() && mode & 0o077 != 0 {
            loose.push((p, mode));
        }
    }
    Ok((loose, seen))
}

fn assert_private(what: &str, root: &Path) -> Result<()> {
    let (loose, seen) = loose_entries(root)?;
    ensure!(seen > 5, "{what}: only {seen} entries under {}", root.display());
    let shown: Vec<String> = loose.iter().map(|(p, m)| format!("{} {m:o}", p.display())).collect();
    ensure!(loose.is_empty(), "{what}: entries open to others: {shown:?}");
    Ok(())
}

/// Makes a tree look like an older version left it: directories 0755, files 0644.
fn loosen(root: &Path) -> Result<()> {
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let m = std::fs::symlink_metadata(&p)?;
        if m.is_dir() {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
            for e in std::fs::read_dir(&p)? {
                stack.push(e?.path());
            }
        } else if m.is_file() {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644))?;
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn server_dirs_and_caches_are_private_whatever_the_umask() {
    // Inherited by every process spawned below: `cluster init`, the servers, the mount.
    unsafe { libc::umask(0) };
    bounded(async {
        let mut tc = TestCluster::start(ClusterOpts::new(2, 1).arg("--snapshot-every", "10")).await?;
        tc.create_volume("www", 2).await?;
        let c = tc.client();
        for i in 0..12 {
            TestCluster::write_file(&c, "www", "", &format!("f{i}.html"), format!("page {i}").as_bytes()).await?;
        }
        // Enough entries for a snapshot on every server (`snapshot.bin` holds the keys).
        for s in &tc.servers {
            let snap = s.dir.join("snapshot.bin");
            wait_until(Duration::from_secs(30), "a snapshot on every server", || {
                let snap = snap.clone();
                async move { snap.exists() }
            })
            .await?;
        }
        let m = Mount::start(&tc.client_args(), tc.root.path(), "m", &["--read-only"])?;
        assert_eq!(read_file(&m.path.join("www/f3.html"))?, b"page 3");

        let s0 = tc.servers[0].dir.clone();
        for f in [
            "admin.token",
            "client.toml",
            "server.toml",
            "tls/server.key",
            "snapshot.bin",
            "db",
        ] {
            ensure!(s0.join(f).exists(), "{f} missing from the first server's directory");
        }
        for s in &tc.servers {
            assert_private(&format!("server {}", s.addr), &s.dir)?;
        }
        assert_private("the mount's cache", &m.cache)?;

        // The control socket is for every local user: its directory 0755, the socket 0666.
        let st = m.status()?;
        ensure!(st.read_only, "status answers over the socket: {st:?}");
        let run = std::fs::metadata("/run/codafs")?.permissions().mode() & 0o777;
        ensure!(run == 0o755, "/run/codafs is {run:o}");

        // A directory left loose by an older version (which left no marker of a finished
        // pass) is tightened at the next start.
        tc.kill(1);
        let dir1 = tc.servers[1].dir.clone();
        let marker = dir1.join(codafs_common::perms::RESTRICTED_MARKER);
        ensure!(
            marker.exists(),
            "a server's first start marks its directory as restricted"
        );
        ensure!(
            m.cache.join(codafs_common::perms::RESTRICTED_MARKER).exists(),
            "a mount's first start marks its cache as restricted"
        );
        loosen(&dir1)?;
        std::fs::remove_file(&marker)?;
        ensure!(!loose_entries(&dir1)?.0.is_empty(), "loosening had no effect");
        tc.restart(1)?;
        let addr1 = tc.servers[1].addr.clone();
        wait_until(Duration::from_secs(30), "the restarted server to answer", || {
            let tc = &tc;
            let addr1 = addr1.clone();
            async move { tc.status_of(&addr1).await.is_ok() }
        })
        .await?;
        assert_private("the restarted server", &dir1)?;
        Ok(())
    })
    .await
}
