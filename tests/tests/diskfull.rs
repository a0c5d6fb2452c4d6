//! Disk-full safety with real filesystems that fill up: a data server's directory and a mount's
//! cache directory are put on small tmpfs filesystems made here (unmounted by a guard, also when
//! a test fails). Checked: writes are refused (RESOURCE_EXHAUSTED from the servers, ENOSPC
//! through the mount), reads keep working (cached and uncached), nothing acknowledged is lost
//! once space is freed, and a file larger than the mount's whole cache reads back whole.
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use codafs_client::ops;
use codafs_common::Hash;
use codafs_tests::{bounded_within, fs_call, read_file, wait_until, ClusterOpts, Mount, TestCluster, Tmpfs};

/// Filling a test's tmpfs.
trait Filling {
    fn free(&self) -> Result<u64>;
    fn fill_leaving(&self, leave: u64) -> Result<PathBuf>;
}

impl Filling for Tmpfs {
    fn free(&self) -> Result<u64> {
        free_bytes(self.path())
    }

    /// Fills the filesystem until only about `leave` bytes are free; returns the filler's path.
    fn fill_leaving(&self, leave: u64) -> Result<PathBuf> {
        let filler = self.path().join("filler");
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&filler)?;
        let chunk = vec![0xa5u8; 1 << 20];
        for _ in 0..100_000 {
            let free = self.free()?;
            if free <= leave {
                break;
            }
            let n = ((free - leave) as usize).min(chunk.len());
            if let Err(e) = f.write_all(&chunk[..n]) {
                // Full before `leave` was reached: that is as full as it gets.
                if e.raw_os_error() == Some(libc::ENOSPC) {
                    break;
                }
                return Err(e.into());
            }
            f.flush()?;
        }
        Ok(filler)
    }
}

fn free_bytes(path: &Path) -> Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        bail!("statvfs {}: {}", path.display(), std::io::Error::last_os_error());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Deterministic content of `len` bytes, different per `seed`.
fn content(seed: u64, len: usize) -> Vec<u8> {
    codafs_common::testdata::noise(len, seed)
}

/// Moves server `i`'s directory onto a fresh tmpfs of `size_mib` (stopping and restarting it).
async fn server_on_tmpfs(tc: &mut TestCluster, i: usize, size_mib: u64) -> Result<Tmpfs> {
    tc.kill(i);
    let dir = tc.servers[i].dir.clone();
    let old = dir.with_extension("old");
    std::fs::rename(&dir, &old)?;
    let fs = Tmpfs::mount(&dir, size_mib)?;
    let st = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", old.display()))
        .arg(&dir)
        .status()?;
    ensure!(st.success(), "copying the server directory onto the tmpfs failed");
    tc.restart(i)?;
    let addr = tc.servers[i].addr.clone();
    wait_until(Duration::from_secs(20), "the moved server to answer", || {
        let tc = &*tc;
        let addr = addr.clone();
        async move { tc.status_of(&addr).await.is_ok_and(|s| s.applied_index > 0) }
    })
    .await?;
    Ok(fs)
}

/// The gRPC code and message of a failed call, or an error if it succeeded.
fn refusal<T: std::fmt::Debug>(r: Result<T, codafs_client::transport::ClientError>) -> Result<(tonic::Code, String)> {
    match r {
        Ok(v) => bail!("expected a refusal, got {v:?}"),
        Err(e) => Ok((e.code(), e.to_string())),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_server_refuses_writes_keeps_serving_reads_and_loses_nothing_acknowledged() {
    bounded_within(Duration::from_secs(240), async {
        let mut tc = TestCluster::start(ClusterOpts::new(2, 1).arg("--min-free", "40M")).await?;
        tc.create_volume("v", 2).await?;
        let c = tc.client();
        // Acknowledged before the disk fills: small and multi-chunk files.
        let mut acked: Vec<(String, Vec<u8>)> = Vec::new();
        for i in 0..4u64 {
            let data = content(i, if i % 2 == 0 { 3000 } else { 3 << 20 });
            let name = format!("before-{i}");
            TestCluster::write_file(&c, "v", "", &name, &data).await?;
            acked.push((name, data));
        }
        TestCluster::write_file(&c, "v", "", "doomed", b"to be removed while full").await?;

        let fs = server_on_tmpfs(&mut tc, 1, 160).await?;
        let full_addr = tc.servers[1].addr.clone();
        let st = tc.status_of(&full_addr).await?;
        ensure!(
            st.disk_min_free_bytes == 40 << 20 && st.disk_total_bytes > 0,
            "status shows the watermark: {st:?}"
        );
        // Under the watermark, with room left for RocksDB and Raft.
        let filler = fs.fill_leaving(30 << 20)?;
        let full = tc.client_on(&full_addr);

        // Puts are refused up front, saying what is free and what is needed: on the full server
        // itself, and through the other data server (its forwarded copy is refused).
        let big = content(100, 4 << 20);
        let (code, msg) = refusal(full.put_blob(bytes::Bytes::from(big.clone()), 2).await)?;
        ensure!(code == tonic::Code::ResourceExhausted, "{code:?}: {msg}");
        ensure!(
            msg.contains("bytes free") && msg.contains("needed") && msg.contains("must stay free"),
            "{msg}"
        );
        let other = tc.client_on(&tc.servers[0].addr);
        let (code, msg) = refusal(other.put_blob(bytes::Bytes::from(big.clone()), 2).await)?;
        ensure!(
            code == tonic::Code::ResourceExhausted,
            "through a peer: {code:?}: {msg}"
        );
        let small = bytes::Bytes::from_static(b"small blob while full");
        let (code, msg) = refusal(full.put_small(&[(Hash::of(&small), small.clone())], 2).await)?;
        ensure!(code == tonic::Code::ResourceExhausted, "small puts: {code:?}: {msg}");
        // No partial file is left behind by a refused put.
        let tmp = tc.servers[1].dir.join("blobs/tmp");
        ensure!(
            std::fs::read_dir(&tmp)?.count() == 0,
            "temp files left in {}",
            tmp.display()
        );

        // Commits that add data are refused; a commit that only removes is accepted.
        let (code, msg) = refusal(full.commit(ops::commit("v", vec![ops::dir("newdir", 0o755)])).await)?;
        ensure!(code == tonic::Code::ResourceExhausted, "commit: {code:?}: {msg}");
        full.commit(ops::commit("v", vec![ops::remove("doomed")]))
            .await
            .context("a removal must pass below the watermark")?;

        // Reads keep working on the full server.
        for (name, data) in &acked {
            ensure!(
                &tc.read_on(&full_addr, "v", name).await? == data,
                "{name} read back wrong"
            );
        }
        let st = tc.status_of(&full_addr).await?;
        ensure!(
            st.disk_free_bytes < st.disk_min_free_bytes && st.space_refusals >= 4,
            "status shows the low disk and the refusals: {st:?}"
        );

        // Space freed: writes pass again, and everything acknowledged is intact on both replicas.
        std::fs::remove_file(&filler)?;
        TestCluster::write_file(&c, "v", "", "after", &big).await?;
        acked.push(("after".into(), big));
        for s in 0..2 {
            let addr = tc.servers[s].addr.clone();
            for (name, data) in &acked {
                ensure!(&tc.read_on(&addr, "v", name).await? == data, "{name} on server {s}");
            }
        }
        ensure!(
            tc.resolve_on(&full_addr, "v", "doomed").await.is_err(),
            "the removal applied"
        );
        drop(fs);
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rewriting_a_large_file_many_times_does_not_fill_a_server() {
    bounded_within(Duration::from_secs(300), async {
        let mut tc = TestCluster::start(
            ClusterOpts::new(2, 1)
                .arg("--min-free", "24M")
                .arg("--gc-pressure-grace-s", "1"),
        )
        .await?;
        tc.create_volume("v", 2).await?;
        let fs = server_on_tmpfs(&mut tc, 1, 128).await?;
        let c = tc.client();
        // 24 versions of 8 MiB: far more than the 128 MiB filesystem holds at once.
        let mut last = Vec::new();
        for i in 0..24u64 {
            let data = content(1000 + i, 8 << 20);
            let mut tries = 0;
            loop {
                tries += 1;
                match TestCluster::write_file(&c, "v", "", "big.bin", &data).await {
                    Ok(_) => break,
                    // Refused while GC catches up: it runs at once after a refusal.
                    Err(e) if tries < 40 && e.to_string().contains("disk space") => {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    Err(e) => return Err(e.context(format!("version {i}, try {tries}"))),
                }
            }
            // The disk never fills. (Blob puts stop at the 24 MiB watermark; RocksDB and the
            // Raft log may use part of that headroom, which is what it is for: once, under CI
            // load, free space fell to 5.4 MiB here.)
            ensure!(
                fs.free()? > 1 << 20,
                "free space fell to {} after version {i}",
                fs.free()?
            );
            last = data;
        }
        let addr = tc.servers[1].addr.clone();
        ensure!(
            tc.read_on(&addr, "v", "big.bin").await? == last,
            "the last version reads back"
        );
        let st = tc.status_of(&addr).await?;
        ensure!(st.blob_bytes < 100 << 20, "old versions were collected: {st:?}");
        drop(fs);
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mount_with_a_full_cache_disk_serves_reads_and_refuses_writes_with_enospc() {
    bounded_within(Duration::from_secs(180), async {
        let tc = TestCluster::start(ClusterOpts::new(2, 1)).await?;
        tc.create_volume("www", 2).await?;
        let c = tc.client();
        let cached = content(1, 200_000);
        let uncached = content(2, 5 << 20);
        TestCluster::write_file(&c, "www", "", "cached.html", &cached).await?;
        TestCluster::write_file(&c, "www", "", "uncached.bin", &uncached).await?;
        let dir = tc.root.path();
        let fs = Tmpfs::mount(&dir.join("m.cache"), 48)?;
        let m = Mount::start(&tc.client_args(), dir, "m", &["--cache-size", "1G"])?;
        let reply = m.control(&format!("login {}", tc.token))?;
        ensure!(reply["ok"] == true, "{reply}");
        let www = m.path.join("www");
        ensure!(read_file(&www.join("cached.html"))? == cached);
        std::fs::write(www.join("written-before.txt"), b"acknowledged before the disk filled")?;

        let filler = fs.fill_leaving(0)?;
        ensure!(fs.free()? < 1 << 20, "the cache disk is full: {} free", fs.free()?);

        // Reads keep working: the cached file, and a file never cached (streamed through memory).
        ensure!(read_file(&www.join("cached.html"))? == cached, "cached read");
        ensure!(read_file(&www.join("uncached.bin"))? == uncached, "uncached read");
        let st = m.status()?;
        ensure!(st.cache.streamed_uncached > 0, "{st:?}");

        // Writes fail with ENOSPC (the shadow copy cannot grow), at write or at close.
        let p = www.join("while-full.bin");
        let r = fs_call(Duration::from_secs(30), move || {
            let mut f = std::fs::File::create(&p)?;
            f.write_all(&vec![7u8; 4 << 20])?;
            f.sync_all()
        })?;
        match r {
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {}
            other => bail!("a write to a full cache disk gave {other:?}, not ENOSPC"),
        }
        ensure!(m.is_mounted(), "the daemon survived the full disk");
        ensure!(
            read_file(&www.join("cached.html"))? == cached,
            "still reading after the failed write"
        );

        // Space freed: writes work again and nothing acknowledged is lost.
        std::fs::remove_file(&filler)?;
        std::fs::write(www.join("written-after.txt"), b"after")?;
        ensure!(read_file(&www.join("written-before.txt"))? == b"acknowledged before the disk filled");
        ensure!(read_file(&www.join("written-after.txt"))? == b"after");
        ensure!(read_file(&www.join("uncached.bin"))? == uncached);
        // Write-back: on the servers once the log has drained.
        m.sync().map_err(|e| anyhow::anyhow!("{e}\n{}", m.log()))?;
        let seen = tc.read_on(&tc.servers[0].addr, "www", "written-before.txt").await?;
        ensure!(seen == b"acknowledged before the disk filled", "on the servers too");
        drop(m);
        drop(fs);
        Ok(())
    })
    .await;
}

/// A file larger than the whole cache (`--cache-size`) reads back whole, also interleaved with
/// other reads, and is never cached over the bound (it was, until something else evicted it).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_file_larger_than_the_whole_cache_reads_back_whole() {
    bounded_within(Duration::from_secs(180), async {
        let tc = TestCluster::start(ClusterOpts::new(2, 1)).await?;
        tc.create_volume("www", 2).await?;
        let c = tc.client();
        let big = content(7, 12 << 20);
        let other = content(8, 3 << 20);
        TestCluster::write_file(&c, "www", "", "big.bin", &big).await?;
        TestCluster::write_file(&c, "www", "", "other.bin", &other).await?;
        let m = Mount::start(
            &tc.client_args(),
            tc.root.path(),
            "m",
            &["--read-only", "--cache-size", "4M"],
        )?;
        let www = m.path.join("www");
        ensure!(
            read_file(&www.join("big.bin"))? == big,
            "12 MiB file through a 4 MiB cache"
        );
        // Larger than the whole cache: read through memory, never cached over the bound.
        let st = m.status()?;
        ensure!(st.cache.bytes <= 4 << 20, "the cache stays within its bound: {st:?}");
        ensure!(read_file(&www.join("other.bin"))? == other);
        // Interleaved with other reads, it still reads whole (refetched as needed).
        let (p, q) = (www.join("big.bin"), www.join("other.bin"));
        let r = fs_call(Duration::from_secs(60), move || {
            use std::io::Read;
            let mut a = std::fs::File::open(&p)?;
            let mut b = std::fs::File::open(&q)?;
            let (mut got, mut buf) = (Vec::new(), vec![0u8; 1 << 20]);
            loop {
                let n = a.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
                let _ = b.read(&mut buf[..4096])?;
            }
            Ok(got)
        })??;
        ensure!(Hash::of(&r) == Hash::of(&big), "interleaved read of the large file");
        let st = m.status()?;
        ensure!(st.cache.bytes <= 4 << 20, "and after the interleaved reads: {st:?}");
        Ok(())
    })
    .await;
}
