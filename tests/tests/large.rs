//! Large files through real mounts: content over 4 MiB is stored as content-defined chunks
//! (see `codafs_common::chunks`). A 2 GiB file is written through a write-back mount, read back
//! whole on a `--read-only` web node, rewritten in part, and checked by checksum each time; the
//! servers' own counters show that the partial rewrite and a second copy of a file stored only
//! what was new.
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use codafs_tests::{bounded_within, fs_call, wait_until, ClusterOpts, Mount, TestCluster};

/// Deterministic, non-repeating bytes for block `i` of a file (seeded per file).
fn block(seed: u64, i: u64, out: &mut [u8]) {
    codafs_common::testdata::fill_noise(seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15), out);
}

const BLOCK: usize = 1 << 20;

/// Writes `size` bytes of seeded content to `path` (a file in a mount); returns its blake3.
fn write_seeded(path: PathBuf, seed: u64, size: u64) -> Result<blake3::Hash> {
    let r = fs_call(Duration::from_secs(600), move || {
        let mut f = std::io::BufWriter::with_capacity(4 * BLOCK, std::fs::File::create(&path)?);
        let mut h = blake3::Hasher::new();
        let mut buf = vec![0u8; BLOCK];
        for i in 0..size.div_ceil(BLOCK as u64) {
            let n = (size - i * BLOCK as u64).min(BLOCK as u64) as usize;
            block(seed, i, &mut buf[..n]);
            h.update(&buf[..n]);
            f.write_all(&buf[..n])?;
        }
        f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        Ok(h.finalize())
    })?;
    Ok(r?)
}

/// The blake3 of seeded content with `patch` written at `at`.
fn expected(seed: u64, size: u64, patch: Option<(u64, &[u8])>) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; BLOCK];
    for i in 0..size.div_ceil(BLOCK as u64) {
        let start = i * BLOCK as u64;
        let n = (size - start).min(BLOCK as u64) as usize;
        block(seed, i, &mut buf[..n]);
        if let Some((at, p)) = patch {
            let end = at + p.len() as u64;
            if at < start + n as u64 && end > start {
                let lo = at.max(start);
                let hi = end.min(start + n as u64);
                buf[(lo - start) as usize..(hi - start) as usize]
                    .copy_from_slice(&p[(lo - at) as usize..(hi - at) as usize]);
            }
        }
        h.update(&buf[..n]);
    }
    h.finalize()
}

/// The blake3 and length of a file read whole through a mount.
fn checksum(path: &Path) -> Result<(blake3::Hash, u64)> {
    let p = path.to_path_buf();
    let r = fs_call(Duration::from_secs(600), move || {
        let mut f = std::fs::File::open(&p)?;
        let mut h = blake3::Hasher::new();
        let mut buf = vec![0u8; 4 * BLOCK];
        let mut len = 0u64;
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                return Ok((h.finalize(), len));
            }
            len += n as u64;
            h.update(&buf[..n]);
        }
    })?;
    Ok(r?)
}

/// `codafs sync MNT` with room for gigabytes to reach the servers.
fn sync(m: &Mount) -> Result<()> {
    let out = Command::new(codafs_tests::codafs_bin())
        .arg("sync")
        .arg(&m.path)
        .args(["--timeout", "400"])
        .output()?;
    ensure!(
        out.status.success(),
        "codafs sync: {}\n--- mount log ---\n{}",
        String::from_utf8_lossy(&out.stderr),
        m.log()
    );
    Ok(())
}

/// Blob bytes each data server has newly stored since it started, by address.
async fn received(tc: &TestCluster) -> Result<Vec<(String, u64)>> {
    let mut out = Vec::new();
    for s in tc.servers.iter().filter(|s| !s.witness) {
        out.push((s.addr.clone(), tc.status_of(&s.addr).await?.blob_bytes_received));
    }
    Ok(out)
}

/// Per server, how many more blob bytes were stored than at `before`.
fn grown(before: &[(String, u64)], after: &[(String, u64)]) -> Vec<u64> {
    before
        .iter()
        .zip(after)
        .map(|((_, b), (_, a))| a.saturating_sub(*b))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_2_gib_file_is_written_read_back_and_rewritten_in_part_by_its_chunks() {
    bounded_within(Duration::from_secs(900), async {
        let tc = TestCluster::start(ClusterOpts::new(2, 1)).await?;
        tc.create_volume("www", 2).await?;
        let dir = tc.root.path();
        let sizes = ["--cache-size", "8G", "--log-limit", "6G"];
        let a = Mount::start(&tc.client_args(), dir, "a", &sizes)?;
        let web = Mount::start(&tc.client_args(), dir, "web", &["--read-only", "--cache-size", "8G"])?;
        let reply = a.control(&format!("login {}", tc.token))?;
        ensure!(reply["ok"] == true, "{reply}");

        const SIZE: u64 = 2 << 30;
        const SEED: u64 = 0x5eed;
        let big = a.path.join("www/big.bin");
        let logs = |e: anyhow::Error| anyhow::anyhow!("{e:#}\n--- a ---\n{}", a.log());
        let written = write_seeded(big.clone(), SEED, SIZE)
            .context("writing 2 GiB through the mount")
            .map_err(logs)?;
        ensure!(written == expected(SEED, SIZE, None), "the generator is deterministic");
        sync(&a)?;
        let seen = web.path.join("www/big.bin");
        wait_until(Duration::from_secs(30), "the web node sees the whole file", || async {
            std::fs::metadata(&seen).is_ok_and(|m| m.len() == SIZE)
        })
        .await?;
        let (sum, len) = checksum(&seen)?;
        ensure!(
            len == SIZE && sum == written,
            "the web node read {len} bytes, checksum {sum}"
        );

        // Rewrite 64 KiB in the middle: only the chunks around it are new.
        let before = received(&tc).await?;
        let patch: Vec<u8> = (0..64 << 10).map(|i: u32| (i * 7 + 3) as u8).collect();
        let at = (1u64 << 30) + 12_345;
        let (p, b) = (patch.clone(), big.clone());
        fs_call(Duration::from_secs(600), move || {
            let f = std::fs::OpenOptions::new().write(true).open(&b)?;
            f.write_all_at(&p, at)?;
            f.sync_all()
        })?
        .context("rewriting 64 KiB")?;
        sync(&a)?;
        let grew = grown(&before, &received(&tc).await?);
        ensure!(
            grew.iter().all(|g| *g > 0 && *g < 8 << 20),
            "a 64 KiB rewrite of a 2 GiB file stored {grew:?} bytes per data server"
        );
        let want = expected(SEED, SIZE, Some((at, &patch)));
        let mut last = None;
        wait_until(Duration::from_secs(120), "the web node reads the new version", || {
            let got = checksum(&seen).ok();
            last = got;
            async move { got.is_some_and(|(s, l)| s == want && l == SIZE) }
        })
        .await
        .with_context(|| format!("last read: {last:?}"))?;
        // The web node took the unchanged chunks from the old version it had cached.
        let reused = web.status()?.cache.reused_chunk_bytes;
        ensure!(
            reused > SIZE / 2,
            "the web node reused only {reused} bytes of the old version"
        );
        // The writer reads its own version back too.
        let (mine, _) = checksum(&big)?;
        ensure!(mine == want, "the writer reads back what it wrote");

        // A second copy of a 40 MiB file stores nothing but its manifest.
        let copy_size = 40 << 20;
        write_seeded(a.path.join("www/one.bin"), 77, copy_size)?;
        sync(&a)?;
        let before = received(&tc).await?;
        write_seeded(a.path.join("www/two.bin"), 77, copy_size)?;
        sync(&a)?;
        let grew = grown(&before, &received(&tc).await?);
        ensure!(
            grew.iter().all(|g| *g < 64 << 10),
            "an identical 40 MiB file stored {grew:?} new bytes per data server"
        );
        let two_path = web.path.join("www/two.bin");
        wait_until(Duration::from_secs(30), "the web node sees the copy", || async {
            std::fs::metadata(&two_path).is_ok_and(|m| m.len() == copy_size)
        })
        .await?;
        let (two, _) = checksum(&two_path)?;
        ensure!(two == expected(77, copy_size, None), "the copy reads back");
        Ok(())
    })
    .await;
}
