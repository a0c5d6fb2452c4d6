//! End-to-end tests of `codafs mount`: real FUSE mounts over real server processes.
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use codafs_client::ops;
use codafs_client::status::MountStatus;
use codafs_common::Hash;
use codafs_proto::pb;
use codafs_tests::{bounded, fs_call, read_file, wait_until, ClusterOpts, Mount, Stopped, TestCluster};

async fn blob_gets(tc: &TestCluster) -> u64 {
    let mut n = 0;
    for s in tc.servers.iter().filter(|s| s.is_running()) {
        n += tc.status_of(&s.addr).await.map(|s| s.blob_gets).unwrap_or(0);
    }
    n
}

fn ino_of(p: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(p)?.ino())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_mounts_share_the_tree_and_see_commits_without_remounting() {
    bounded(async {
        let tc = TestCluster::start(ClusterOpts::new(2, 1)).await?;
        tc.create_volume("www", 2).await?;
        let c = tc.client();
        TestCluster::write_file(&c, "www", "", "index.html", b"version 1").await?;
        TestCluster::write_file(&c, "www", "", "old.html", b"to be removed").await?;
        TestCluster::mkdir(&c, "www", "", "css").await?;
        TestCluster::write_file(&c, "www", "css", "site.css", b"body{}").await?;
        let a = Mount::start(&tc.client_args(), tc.root.path(), "a", &[])?;
        let b = Mount::start(&tc.client_args(), tc.root.path(), "b", &["--read-only"])?;
        for m in [&a, &b] {
            assert_eq!(read_file(&m.path.join("www/index.html"))?, b"version 1");
            assert_eq!(read_file(&m.path.join("www/css/site.css"))?, b"body{}");
            let mut names: Vec<String> = std::fs::read_dir(m.path.join("www"))?
                .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect::<Result<_, _>>()?;
            names.sort();
            assert_eq!(names, ["css", "index.html", "old.html"]);
        }
        // Same object, same inode number, on every client.
        assert_eq!(
            ino_of(&a.path.join("www/index.html"))?,
            ino_of(&b.path.join("www/index.html"))?
        );
        // Stat the name that will appear, so both kernels hold a negative entry for it.
        assert!(std::fs::metadata(a.path.join("www/new.html")).is_err());
        assert!(std::fs::metadata(b.path.join("www/new.html")).is_err());

        // One commit through the server API: replace, add, remove.
        c.put_blob(bytes::Bytes::from_static(b"version 2"), 2).await?;
        c.put_blob(bytes::Bytes::from_static(b"brand new"), 2).await?;
        let batch = vec![
            ops::file("index.html", b"version 2", 0o644),
            ops::file("new.html", b"brand new", 0o644),
            ops::remove("old.html"),
        ];
        c.commit(ops::commit("www", batch)).await?;
        for m in [&a, &b] {
            let p = m.path.clone();
            wait_until(Duration::from_secs(10), "the mount sees the new version", || {
                let p = p.clone();
                async move { std::fs::read(p.join("www/index.html")).is_ok_and(|d| d == b"version 2") }
            })
            .await?;
            assert_eq!(read_file(&m.path.join("www/new.html"))?, b"brand new");
            assert!(!m.path.join("www/old.html").exists(), "removed file is gone");
            let names: Vec<_> = std::fs::read_dir(m.path.join("www"))?
                .filter_map(|e| e.ok())
                .map(|e| e.file_name())
                .collect();
            assert!(
                !names.iter().any(|n| n == "old.html") && names.iter().any(|n| n == "new.html"),
                "{names:?}"
            );
        }
        let st = a.status()?;
        assert_eq!(st.volumes[0].name, "www");
        assert!(st.volumes[0].connected, "{st:?}");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_continue_when_the_server_in_use_is_killed() {
    bounded(async {
        // Three data replicas, so writes (W=2) still work after one is killed.
        let mut tc = TestCluster::start(ClusterOpts::new(3, 0)).await?;
        tc.create_volume("www", 2).await?;
        let c = tc.client();
        let mut files = Vec::new();
        for i in 0..40 {
            let content = format!("page {i} {}", "z".repeat(i * 997)).into_bytes();
            TestCluster::write_file(&c, "www", "", &format!("p{i}.html"), &content).await?;
            files.push((format!("p{i}.html"), content));
        }
        // No preferred server given: the mount picks one at random and says which in its
        // status; the one it names just before the kill is the one we kill.
        let m = Mount::start(&tc.client_args_spread(), tc.root.path(), "m", &["--read-only"])?;
        let (mut in_use, mut killed) = (String::new(), 0);
        for (i, (name, content)) in files.iter().enumerate() {
            if i == 10 {
                in_use = m.status()?.server.context("the mount names the server it uses")?;
                killed = tc
                    .servers
                    .iter()
                    .position(|s| s.addr == in_use)
                    .with_context(|| format!("{in_use} is not one of the cluster's servers"))?;
                tc.kill(killed);
                // Asked at once, before any read failed over, the status names a live server.
                let named = m.status()?.server.context("the mount names the server it uses")?;
                anyhow::ensure!(named != in_use, "status still names the killed server {in_use}");
            }
            assert_eq!(&read_file(&m.path.join("www").join(name))?, content, "{name}");
        }
        // Callbacks fail over too: a change committed now still reaches the mount.
        let c2 = tc.client_on(&tc.servers[(killed + 1) % 3].addr);
        tc.wait_leader(Duration::from_secs(15)).await?;
        TestCluster::write_file(&c2, "www", "", "p0.html", b"after failover").await?;
        let p = m.path.join("www/p0.html");
        wait_until(
            Duration::from_secs(15),
            "change after failover reaches the mount",
            || {
                let p = p.clone();
                async move { std::fs::read(p).is_ok_and(|d| d == b"after failover") }
            },
        )
        .await?;
        let now = m.status()?.server.context("the mount names the server it uses")?;
        anyhow::ensure!(now != in_use, "the mount moved off the killed server {in_use}");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn disconnected_mount_serves_cache_and_fails_fast_on_uncached_files() {
    bounded(async {
        let mut tc = TestCluster::start(ClusterOpts::new(2, 1)).await?;
        tc.create_volume("www", 2).await?;
        let c = tc.client();
        TestCluster::write_file(&c, "www", "", "cached.html", b"i am cached").await?;
        // Larger than what comes with a directory's listing (client-fuse/src/core/prefetch.rs).
        let never_read = vec![b'n'; 100 << 10];
        TestCluster::write_file(&c, "www", "", "uncached.html", &never_read).await?;
        TestCluster::mkdir(&c, "www", "", "d").await?;
        TestCluster::write_file(&c, "www", "d", "page.html", b"cached below").await?;
        TestCluster::mkdir(&c, "www", "", "closed").await?;
        let m = Mount::start(&tc.client_args(), tc.root.path(), "m", &["--read-only"])?;
        assert_eq!(read_file(&m.path.join("www/cached.html"))?, b"i am cached");
        assert_eq!(read_file(&m.path.join("www/d/page.html"))?, b"cached below");
        let closed = m.path.join("www/closed");
        assert_eq!(std::fs::metadata(&closed)?.permissions().mode() & 0o777, 0o755);
        // The listing (and so uncached.html's attributes) is cached; its content is not.
        assert!(m.path.join("www/uncached.html").exists());
        // A publish adds a name to the volume's root and to d/, whose attributes the mount
        // then forgets. Every path through them failed with EIO once the servers went away,
        // the cached files below included.
        TestCluster::write_file(&c, "www", "", "new.html", b"new").await?;
        TestCluster::write_file(&c, "www", "d", "new.html", b"new").await?;
        // A directory closed elsewhere is never served with its older mode, not even offline
        // (the mount kept its attributes aside as it does for d/ above).
        let chmod = pb::Op {
            expect_version: None,
            op: Some(pb::op::Op::SetAttr(pb::SetAttrOp {
                node: ops::at("closed"),
                mode: Some(0o700),
                ..Default::default()
            })),
        };
        c.commit(ops::commit("www", vec![chmod])).await?;
        // Waited for in the mount's status: a look at the paths would fetch what it forgot.
        let published = tc.volume_info("www").await?.version;
        wait_until(Duration::from_secs(10), "the mount applies the publish", || {
            let v = m.status().ok().and_then(|s| Some(s.volume("www")?.version));
            async move { v >= Some(published) }
        })
        .await?;
        for i in 0..3 {
            tc.kill(i);
        }
        assert_eq!(read_file(&m.path.join("www/cached.html"))?, b"i am cached");
        assert_eq!(read_file(&m.path.join("www/d/page.html"))?, b"cached below");
        assert!(std::fs::metadata(m.path.join("www/d"))?.is_dir());
        let shown = fs_call(Duration::from_secs(20), move || std::fs::metadata(closed))?;
        match shown {
            Ok(md) => panic!(
                "a directory chmodded to 0700 shown offline with mode {:o}",
                md.permissions().mode() & 0o777
            ),
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}"),
        }
        let p = m.path.join("www/uncached.html");
        let t = Instant::now();
        let r = fs_call(Duration::from_secs(20), move || std::fs::read(p))?;
        let took = t.elapsed();
        let e = r.expect_err("uncached content cannot be served with every server down");
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
        eprintln!("uncached read failed with EIO after {took:?}");
        let st = m.status()?;
        assert!(!st.connected, "{st:?}");
        // Servers come back: the mount reconnects on its own and catches up.
        for i in 0..3 {
            tc.restart(i)?;
        }
        tc.wait_leader(Duration::from_secs(20)).await?;
        // A write needs both data replicas: wait until every server answers again.
        wait_until(Duration::from_secs(20), "every restarted server answers", || async {
            for a in tc.addrs() {
                if tc.status_of(&a).await.is_err() {
                    return false;
                }
            }
            true
        })
        .await?;
        let c = tc.client();
        TestCluster::write_file(&c, "www", "", "cached.html", b"updated while away").await?;
        let p = m.path.join("www/cached.html");
        wait_until(Duration::from_secs(20), "mount catches up after reconnecting", || {
            let p = p.clone();
            async move { std::fs::read(p).is_ok_and(|d| d == b"updated while away") }
        })
        .await?;
        let back = read_file(&m.path.join("www/uncached.html"))
            .map_err(|e| anyhow::anyhow!("{e:#}\n--- mount ---\n{}", m.log()))?;
        assert_eq!(back, never_read);
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_crash_mid_fetch_leaves_no_corrupt_data_and_cache_is_reused() {
    bounded(async {
        let tc = TestCluster::start(ClusterOpts::new(2, 1)).await?;
        tc.create_volume("www", 2).await?;
        let c = tc.client();
        let big: Vec<u8> = (0..48u32 << 20)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        TestCluster::write_file(&c, "www", "", "big.bin", &big).await?;
        TestCluster::write_file(&c, "www", "", "a.html", b"small a").await?;
        TestCluster::write_file(&c, "www", "", "b.html", b"small b").await?;
        let mut m = Mount::start(&tc.client_args(), tc.root.path(), "m", &["--read-only"])?;
        assert_eq!(read_file(&m.path.join("www/a.html"))?, b"small a");
        assert_eq!(read_file(&m.path.join("www/b.html"))?, b"small b");
        // Start fetching the big file, and kill the daemon while it streams: as soon as the
        // fetch's temp file exists (polled tightly, everything else computed beforehand).
        let h = Hash::of(&big).to_hex();
        let blob = m.cache.join("blobs").join(&h[..2]).join(&h);
        let tmp = m.cache.join("tmp");
        let p = m.path.join("www/big.bin");
        let reader = std::thread::spawn(move || std::fs::read(p));
        let start = std::time::Instant::now();
        while !std::fs::read_dir(&tmp).is_ok_and(|mut d| d.next().is_some()) {
            assert!(start.elapsed() < Duration::from_secs(10), "the fetch never started");
            std::thread::sleep(Duration::from_micros(200));
        }
        m.kill9();
        assert!(!blob.exists(), "killed before the fetch completed");
        let _ = reader.join();
        m.remount()?;
        let before = blob_gets(&tc).await;
        assert_eq!(read_file(&m.path.join("www/a.html"))?, b"small a");
        assert_eq!(read_file(&m.path.join("www/b.html"))?, b"small b");
        assert_eq!(
            blob_gets(&tc).await,
            before,
            "cached files are not fetched again after a restart"
        );
        let got = read_file(&m.path.join("www/big.bin"))?;
        assert!(got == big, "big file content differs after a crash mid-fetch");
        Ok(())
    })
    .await
}

/// A clean stop saves the blob cache's index and the next start reads it instead of listing
/// every cached file; a killed daemon saved nothing, so its next start lists them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_clean_stop_saves_the_cache_index_for_the_next_start() {
    bounded(async {
        let tc = TestCluster::start(ClusterOpts::new(2, 1)).await?;
        tc.create_volume("www", 2).await?;
        let c = tc.client();
        for i in 0..20 {
            TestCluster::write_file(&c, "www", "", &format!("p{i}.html"), format!("page {i}").as_bytes()).await?;
        }
        let mut m = Mount::start(&tc.client_args(), tc.root.path(), "m", &["--read-only"])?;
        let read_all = |m: &Mount| -> Result<()> {
            for i in 0..20 {
                let got = read_file(&m.path.join(format!("www/p{i}.html")))?;
                anyhow::ensure!(got == format!("page {i}").as_bytes(), "p{i}.html: {got:?}");
            }
            Ok(())
        };
        read_all(&m)?;
        let cached = m.status()?.cache.entries;
        anyhow::ensure!(cached >= 20, "{cached} entries cached");
        let saved = m.cache.join("blobs.index");
        anyhow::ensure!(!saved.exists(), "no saved index while running");

        m.stop();
        anyhow::ensure!(saved.exists(), "a clean stop saves the index");
        m.remount()?;
        anyhow::ensure!(!saved.exists(), "the next start consumes it");
        let opened = |m: &Mount, how: &str| m.log().matches(&format!("blob cache opened {how}")).count();
        anyhow::ensure!(opened(&m, "from the saved index") == 1, "log:\n{}", m.log());
        anyhow::ensure!(m.status()?.cache.entries == cached, "every entry is back");
        let before = blob_gets(&tc).await;
        read_all(&m)?;
        anyhow::ensure!(blob_gets(&tc).await == before, "served from the cache, nothing fetched");

        // Killed: nothing saved, so the next start lists the files and finds them all.
        m.kill9();
        anyhow::ensure!(!saved.exists());
        m.remount()?;
        anyhow::ensure!(opened(&m, "by listing its files") == 2, "log:\n{}", m.log());
        anyhow::ensure!(m.status()?.cache.entries == cached);
        read_all(&m)?;
        anyhow::ensure!(blob_gets(&tc).await == before, "served from the cache, nothing fetched");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_kill_9_the_cache_starts_from_its_checkpoint_and_adopts_what_it_missed() {
    bounded(async {
        let tc = TestCluster::start(ClusterOpts::new(2, 1)).await?;
        tc.create_volume("www", 2).await?;
        let c = tc.client();
        // 20 pages at the top, 10 in `later/`, which nothing reads before the checkpoint (a
        // directory's small files come with its listing).
        TestCluster::mkdir(&c, "www", "", "later").await?;
        for i in 0..30 {
            let name = if i < 20 {
                format!("p{i}.html")
            } else {
                format!("later/p{i}.html")
            };
            TestCluster::write_file(&c, "www", "", &name, format!("page {i}").as_bytes()).await?;
        }
        // Checkpoints every 3 s: the test reads more files right after one and kills the
        // daemon long before the next.
        let mut m = Mount::start(
            &tc.client_args(),
            tc.root.path(),
            "m",
            &["--read-only", "--cache-checkpoint", "3"],
        )?;
        let read = |m: &Mount, range: std::ops::Range<usize>| -> Result<()> {
            for i in range {
                let dir = if i < 20 { "www" } else { "www/later" };
                let got = read_file(&m.path.join(format!("{dir}/p{i}.html")))?;
                anyhow::ensure!(got == format!("page {i}").as_bytes(), "p{i}.html: {got:?}");
            }
            Ok(())
        };
        read(&m, 0..20)?;
        // Wait until the 20 are cached (the top directory's small files came with its
        // listing, as a pack, in the background) and a checkpoint written after that, then
        // read 10 more and kill the daemon well before the next one.
        wait_until(Duration::from_secs(10), "the top directory cached", || {
            let n = m.status().map(|s| s.cache.entries).unwrap_or(0);
            async move { n >= 20 }
        })
        .await?;
        let checkpoint = m.cache.join("blobs.checkpoint");
        let cached_at = std::time::SystemTime::now();
        wait_until(Duration::from_secs(10), "a checkpoint after the first 20 reads", || {
            let newer = std::fs::metadata(&checkpoint)
                .and_then(|m| m.modified())
                .is_ok_and(|t| t > cached_at);
            async move { newer }
        })
        .await?;
        read(&m, 20..30)?;
        wait_until(Duration::from_secs(10), "all 30 cached", || {
            let n = m.status().map(|s| s.cache.entries).unwrap_or(0);
            async move { n >= 30 }
        })
        .await?;
        let status = m.status()?.cache;
        let (cached, packs) = (status.entries, status.packs);
        anyhow::ensure!(
            packs >= 2,
            "each directory's small files cached as a pack: {packs} packs"
        );
        m.kill9();
        anyhow::ensure!(!m.cache.join("blobs.index").exists(), "a killed daemon saves no index");

        m.remount()?;
        let log = || m.log();
        anyhow::ensure!(
            log().contains("blob cache opened from its checkpoint"),
            "log:\n{}",
            log()
        );
        // The sweep adopts what the checkpoint missed, in the background: `later/`'s files (a
        // pack, and any file fetched alone before it came).
        wait_until(Duration::from_secs(10), "the cache sweep", || {
            let done = m.log().contains("cache swept");
            async move { done }
        })
        .await?;
        anyhow::ensure!(
            !log().contains("adopted=0"),
            "the sweep adopted nothing; log:\n{}",
            log()
        );
        let status = m.status()?.cache;
        anyhow::ensure!(status.entries == cached, "every cached file is counted");
        anyhow::ensure!(status.packs == packs, "every pack is back: {} of {packs}", status.packs);
        let before = blob_gets(&tc).await;
        read(&m, 0..30)?;
        anyhow::ensure!(blob_gets(&tc).await == before, "served from the cache, nothing fetched");

        // Swept: a clean stop saves an exact index again.
        m.stop();
        anyhow::ensure!(
            m.cache.join("blobs.index").exists(),
            "a clean stop after the sweep saves the index"
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn small_cache_evicts_but_an_open_file_stays_readable() {
    bounded(async {
        let tc = TestCluster::start(ClusterOpts::new(2, 1)).await?;
        tc.create_volume("www", 2).await?;
        let c = tc.client();
        let file = |i: usize| -> Vec<u8> { (0..300_000).map(|j| ((i * 31 + j) % 251) as u8).collect() };
        for i in 0..10 {
            TestCluster::write_file(&c, "www", "", &format!("f{i}"), &file(i)).await?;
        }
        let m = Mount::start(
            &tc.client_args(),
            tc.root.path(),
            "m",
            &["--cache-size", "1M", "--read-only"],
        )?;
        // Open f0, read its first page, then read everything else through the small cache.
        use std::io::Read;
        let mut f0 = std::fs::File::open(m.path.join("www/f0")).context("open f0")?;
        let mut head = vec![0u8; 4096];
        f0.read_exact(&mut head)?;
        for i in 1..10 {
            assert_eq!(read_file(&m.path.join(format!("www/f{i}")))?, file(i));
        }
        let mut rest = Vec::new();
        f0.read_to_end(&mut rest)?;
        head.extend(rest);
        assert!(head == file(0), "open file stays readable and correct");
        let st = m.status()?;
        assert!(st.cache.evictions > 0, "{st:?}");
        assert!(st.cache.bytes <= 1 << 20, "{st:?}");
        // `prefetch` of a tree larger than the cache reads it but does not report success.
        let out = std::process::Command::new(codafs_tests::codafs_bin())
            .arg("prefetch")
            .arg(m.path.join("www"))
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("--cache-size"), "{err}");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn warm_hits_reach_no_daemon_code() {
    bounded(async {
        let tc = TestCluster::start(ClusterOpts::new(2, 1)).await?;
        tc.create_volume("www", 2).await?;
        let c = tc.client();
        TestCluster::write_file(&c, "www", "", "hot.html", &b"<p>hot</p>".repeat(800)).await?;
        let m = Mount::start(&tc.client_args(), tc.root.path(), "m", &["--read-only"])?;
        let path = m.path.join("www/hot.html");
        // Cold: lookups, attributes, the fetch, and the kernel learning the no-open mode.
        assert_eq!(read_file(&path)?.len(), 8000);
        let total = |st: &MountStatus| -> u64 { st.fuse_requests.values().sum() };
        let before = m.status()?;
        use std::io::Read;
        for _ in 0..200 {
            let mut f = std::fs::File::open(&path)?;
            let mut buf = Vec::new();
            f.read_to_end(&mut buf)?;
            assert_eq!(buf.len(), 8000);
            let _ = std::fs::metadata(&path)?;
        }
        let after = m.status()?;
        assert_eq!(
            total(&after) - total(&before),
            0,
            "200 warm open+read+close+stat cycles reached the daemon: before {:?} after {:?}",
            before.fuse_requests,
            after.fuse_requests
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_mutating_syscall_on_a_read_only_mount_is_refused_with_erofs() {
    bounded(async {
        let tc = TestCluster::start(ClusterOpts::new(1, 0)).await?;
        tc.create_volume("www", 1).await?;
        let c = tc.client();
        TestCluster::write_file(&c, "www", "", "f.html", b"keep me").await?;
        let version = TestCluster::mkdir(&c, "www", "", "d").await?;
        let m = Mount::start(&tc.client_args(), tc.root.path(), "m", &["--read-only"])?;
        let w = m.path.join("www");
        type Attempt = (&'static str, Box<dyn FnOnce() -> std::io::Result<()> + Send>);
        let attempts: Vec<Attempt> = vec![
            (
                "create",
                Box::new({
                    let p = w.join("new");
                    move || std::fs::File::create(p).map(drop)
                }),
            ),
            (
                "write existing",
                Box::new({
                    let p = w.join("f.html");
                    move || std::fs::write(p, b"x")
                }),
            ),
            (
                "append",
                Box::new({
                    let p = w.join("f.html");
                    move || std::fs::OpenOptions::new().append(true).open(p).map(drop)
                }),
            ),
            (
                "mkdir",
                Box::new({
                    let p = w.join("nd");
                    move || std::fs::create_dir(p)
                }),
            ),
            (
                "rmdir",
                Box::new({
                    let p = w.join("d");
                    move || std::fs::remove_dir(p)
                }),
            ),
            (
                "unlink",
                Box::new({
                    let p = w.join("f.html");
                    move || std::fs::remove_file(p)
                }),
            ),
            (
                "rename",
                Box::new({
                    let (a, b) = (w.join("f.html"), w.join("g.html"));
                    move || std::fs::rename(a, b)
                }),
            ),
            (
                "symlink",
                Box::new({
                    let p = w.join("s");
                    move || std::os::unix::fs::symlink("f.html", p)
                }),
            ),
            (
                "link",
                Box::new({
                    let (a, b) = (w.join("f.html"), w.join("h"));
                    move || std::fs::hard_link(a, b)
                }),
            ),
            (
                "chmod",
                Box::new({
                    let p = w.join("f.html");
                    move || std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600))
                }),
            ),
            (
                "chown",
                Box::new({
                    let p = w.join("f.html");
                    move || std::os::unix::fs::chown(p, Some(1), Some(1))
                }),
            ),
            (
                "truncate",
                Box::new({
                    let p = w.join("f.html");
                    move || std::fs::OpenOptions::new().write(true).open(p)?.set_len(0)
                }),
            ),
            (
                "utimes",
                Box::new({
                    let p = w.join("f.html");
                    move || std::fs::File::open(p)?.set_modified(std::time::SystemTime::now())
                }),
            ),
        ];
        for (what, f) in attempts {
            let r = fs_call(Duration::from_secs(10), f)?;
            let e = r
                .err()
                .with_context(|| format!("{what} succeeded on a read-only mount"))?;
            assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{what}: {e}");
        }
        assert_eq!(read_file(&w.join("f.html"))?, b"keep me");
        // Nothing reached the servers either.
        let info = tc.volume_info("www").await?;
        assert_eq!((info.used_files, info.version), (2, version));
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fstab_helper_mounts_and_the_daemon_exits_on_unmount() {
    bounded(async {
        let tc = TestCluster::start(ClusterOpts::new(1, 0)).await?;
        tc.create_volume("www", 1).await?;
        TestCluster::write_file(&tc.client(), "www", "", "index.html", b"from fstab").await?;
        let dir = tc.root.path();
        let helper = dir.join("mount.codafs");
        std::os::unix::fs::symlink(codafs_tests::codafs_bin(), &helper)?;
        let config = dir.join("client.toml");
        let bundle = codafs_client::ClientBundle::new(String::new(), vec![tc.servers[0].addr.clone()], &tc.tls);
        std::fs::write(&config, bundle.to_toml())?;
        let mnt = dir.join("fstab-mnt");
        let cache = dir.join("fstab-cache");
        std::fs::create_dir_all(&mnt)?;
        // As mount(8) would call it for: CONFIG MNT codafs cache_dir=…,cache_size=64M,_netdev
        let opts = format!("rw,_netdev,cache_dir={},cache_size=64M", cache.display());
        let out = std::process::Command::new(&helper)
            .arg(&config)
            .arg(&mnt)
            .args(["-o", &opts])
            .output()?;
        assert!(
            out.status.success(),
            "helper failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let cleanup = scopeguard(&mnt);
        assert_eq!(read_file(&mnt.join("www/index.html"))?, b"from fstab");
        // Unmounting from outside ends the detached daemon.
        let st = std::process::Command::new("fusermount3").arg("-u").arg(&mnt).status()?;
        assert!(st.success());
        let cache_arg = cache.display().to_string();
        wait_until(
            Duration::from_secs(10),
            "the daemon to exit after an external unmount",
            || {
                let cache_arg = cache_arg.clone();
                async move { !daemon_running(&cache_arg) }
            },
        )
        .await?;
        drop(cleanup);
        // Bad options get a clear error and mount nothing.
        let out = std::process::Command::new(&helper)
            .arg(&config)
            .arg(&mnt)
            .args(["-o", "bogus=1"])
            .output()?;
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("unknown codafs mount option"));
        Ok(())
    })
    .await
}

/// Whether a process with `needle` in its command line is running.
fn daemon_running(needle: &str) -> bool {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| std::fs::read(e.path().join("cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle)))
}

/// Unmounts `path` when dropped (also on panic), so a failed test leaves no mount behind.
fn scopeguard(path: &Path) -> impl Drop + '_ {
    struct G<'a>(&'a Path);
    impl Drop for G<'_> {
        fn drop(&mut self) {
            let mounted = std::fs::read_to_string("/proc/mounts")
                .unwrap_or_default()
                .contains(&format!(" {} ", self.0.display()));
            if mounted {
                let _ = std::process::Command::new("fusermount3")
                    .arg("-u")
                    .arg("-z")
                    .arg(self.0)
                    .status();
            }
        }
    }
    G(path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_corrupt_replica_copy_is_refetched_from_another_replica() {
    bounded(async {
        let tc = TestCluster::start(ClusterOpts::new(2, 1)).await?;
        tc.create_volume("www", 2).await?;
        let content: Vec<u8> = (0..3u32 << 20).map(|i| (i % 253) as u8).collect();
        TestCluster::write_file(&tc.client(), "www", "", "big.bin", &content).await?;
        // Corrupt the copy on the server the mount prefers (the first it is given).
        let path = tc.blob_path(0, &Hash::of(&content));
        let mut bad = std::fs::read(&path)?;
        bad[10] ^= 1;
        std::fs::write(&path, &bad)?;
        let m = Mount::start(&tc.client_args(), tc.root.path(), "m", &["--read-only"])?;
        assert!(
            read_file(&m.path.join("www/big.bin"))? == content,
            "served the good copy"
        );
        let st = m.status()?;
        assert!(st.cache.bad_copies_refetched >= 1, "{st:?}");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prefetch_warms_a_whole_volume_for_disconnected_serving() {
    bounded(async {
        let mut tc = TestCluster::start(ClusterOpts::new(2, 1)).await?;
        tc.create_volume("www", 2).await?;
        let c = tc.client();
        TestCluster::mkdir(&c, "www", "", "sub").await?;
        for i in 0..30 {
            let dir = if i % 2 == 0 { "" } else { "sub" };
            TestCluster::write_file(&c, "www", dir, &format!("f{i}"), format!("file {i}").as_bytes()).await?;
        }
        let m = Mount::start(&tc.client_args(), tc.root.path(), "m", &["--read-only"])?;
        let out = std::process::Command::new(codafs_tests::codafs_bin())
            .arg("prefetch")
            .arg(m.path.join("www"))
            .output()?;
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).contains("prefetched 30 files"));
        let st = m.status()?;
        assert_eq!(st.volumes[0].cached.files, 30, "{st:?}");
        assert_eq!(st.volumes[0].misses, 30, "{st:?}");
        for i in 0..3 {
            tc.kill(i);
        }
        for i in 0..30 {
            let dir = if i % 2 == 0 { "www" } else { "www/sub" };
            assert_eq!(
                read_file(&m.path.join(dir).join(format!("f{i}")))?,
                format!("file {i}").as_bytes()
            );
        }
        Ok(())
    })
    .await
}

/// `umount` returns before the old daemon has closed its cache: a `codafs mount` right after it
/// waits for that daemon instead of failing on the cache's lock, every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn umount_then_mount_at_once_works_20_times_in_a_row() {
    bounded(async {
        let tc = TestCluster::start(ClusterOpts::new(2, 1)).await?;
        tc.create_volume("www", 2).await?;
        let c = tc.client();
        TestCluster::write_file(&c, "www", "", "index.html", b"still here").await?;
        let mut m = Mount::start(&tc.client_args(), tc.root.path(), "m", &["--read-only"])?;
        assert_eq!(read_file(&m.path.join("www/index.html"))?, b"still here");
        for round in 0..20 {
            m.umount_and_mount_at_once()
                .map_err(|e| anyhow::anyhow!("round {round}: {e:#}"))?;
            assert_eq!(
                read_file(&m.path.join("www/index.html"))?,
                b"still here",
                "round {round}"
            );
        }
        // The race is real: the old daemon was still holding the cache in most rounds (it
        // notices an outside unmount within a quarter of a second, then closes its caches).
        let waited = m.log().matches("waiting for the previous daemon").count();
        eprintln!("a new daemon waited for the old one in {waited} of 20 rounds");
        anyhow::ensure!(
            waited > 0,
            "no round overlapped an exiting daemon: the test proves nothing"
        );
        Ok(())
    })
    .await
}

/// A client that starts at a witness (which stores no blobs) moves to a data server
/// (`Cluster::avoid_witness`, which a mount without `--prefer-server` runs at start); one at a
/// data server stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_starts_at_a_witness_moves_to_a_data_server() {
    bounded(async {
        let tc = TestCluster::start(ClusterOpts::new(2, 1)).await?;
        let witness = tc.servers.iter().find(|s| s.witness).context("a witness")?.addr.clone();
        let data = tc.data_addrs();
        let c = tc.client();
        c.prefer(&witness)?;
        c.avoid_witness().await;
        anyhow::ensure!(
            data.contains(&c.preferred()),
            "moved to a data server, not {}",
            c.preferred()
        );
        c.prefer(&data[1])?;
        c.avoid_witness().await;
        anyhow::ensure!(c.preferred() == data[1], "a data server is kept");

        // Mounts without a preferred server: whichever server each draws, it ends up at a
        // data server. (About a third draw the witness; the move itself is checked
        // deterministically above.)
        let mut mounts = Vec::new();
        for i in 0..3 {
            mounts.push(Mount::start(
                &tc.client_args_spread(),
                tc.root.path(),
                &format!("m{i}"),
                &["--read-only"],
            )?);
        }
        for m in &mounts {
            wait_until(
                Duration::from_secs(10),
                "the mount settles on a data server",
                || async {
                    m.status()
                        .ok()
                        .and_then(|s| s.server)
                        .is_some_and(|s| data.contains(&s))
                },
            )
            .await?;
        }
        Ok(())
    })
    .await;
}

/// A mount started against a server that hangs (stopped: it takes connections and answers
/// nothing). Calls never failed over from it by themselves, each using up the whole
/// `--timeout` there, so the mount came up empty and stayed disconnected while the other
/// servers were fine (found by QA). A call that runs out of time now moves the mount to
/// another server.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mount_started_against_a_hung_server_moves_to_another() {
    bounded(async {
        let tc = TestCluster::start(ClusterOpts::new(2, 1)).await?;
        tc.create_volume("www", 2).await?;
        TestCluster::write_file(&tc.client(), "www", "", "index.html", b"home").await?;
        let hung = tc.data_server_not_leading().await?;
        // Goes on however the test ends.
        let _resume = Stopped::stop([&tc.servers[hung]])?;
        let mut args = tc.client_args_spread();
        args.extend(["--prefer-server".to_string(), tc.servers[hung].addr.clone()]);
        let m = Mount::start(&args, tc.root.path(), "m", &["--read-only"])?;
        let page = m.path.join("www/index.html");
        wait_until(Duration::from_secs(20), "the mount serves from another server", || {
            let p = page.clone();
            async move {
                fs_call(Duration::from_secs(5), move || std::fs::read(p))
                    .ok()
                    .and_then(|r| r.ok())
                    .is_some_and(|d| d == b"home")
            }
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n--- mount ---\n{}", m.log()))?;
        Ok(())
    })
    .await
}

/// A hung server (stopped: its connections stay open and it never answers) must not fail the
/// cache misses whose preferred server it is: a metadata read moves on to another server after
/// a second, and the calls after it do not wait on the hung server again. Each server
/// is stopped in turn, so the mount's preferred server is the stopped one in at least one
/// round; every round's uncached directory and file read within the deadline.
/// With every server hung, an uncached directory's listing fails within the deadline (it took
/// three times `--timeout` before: each server in turn was given all of it). `codafs status`
/// answers within seconds with the data servers hung.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cache_misses_are_served_while_a_server_hangs() {
    bounded(async {
        let tc = TestCluster::start(ClusterOpts::new(2, 1)).await?;
        tc.create_volume("www", 2).await?;
        let c = tc.client();
        let rounds = tc.servers.len();
        for d in 0..=rounds {
            TestCluster::mkdir(&c, "www", "", &format!("d{d}")).await?;
            TestCluster::write_file(&c, "www", &format!("d{d}"), "page.html", format!("page {d}").as_bytes()).await?;
        }
        let m = Mount::start(
            &tc.client_args(),
            tc.root.path(),
            "m",
            &["--read-only", "--timeout", "4"],
        )?;
        ensure!(m.path.join("www/d0").is_dir(), "the volume's root is listed");
        for (round, server) in tc.servers.iter().enumerate() {
            let hung = Stopped::stop([server])?;
            let page = m.path.join(format!("www/d{round}/page.html"));
            let t = Instant::now();
            let r = fs_call(Duration::from_secs(30), move || std::fs::read_to_string(page))?;
            let took = t.elapsed();
            eprintln!(
                "round {round}: an uncached page read in {took:?} with server {} hung",
                server.addr
            );
            match r {
                Ok(text) => ensure!(text == format!("page {round}"), "round {round}: read {text:?}"),
                Err(e) => bail!(
                    "round {round}: an uncached page failed ({e}) after {took:?} with only server {} hung\n{}",
                    server.addr,
                    m.log()
                ),
            }
            // One second on the hung server, then another answers (before, the whole deadline
            // went to the hung server, and the kernel's retry found it again).
            ensure!(
                took < Duration::from_secs(3),
                "round {round}: an uncached page took {took:?} with server {} hung (--timeout 4)\n{}",
                server.addr,
                m.log()
            );
            drop(hung);
        }
        // `codafs status` with both data servers hung answers at once from the witness and
        // names the others (it waited for ever on a new connection's TLS handshake to a hung
        // server, and 30 s per hung server for the membership).
        let data = Stopped::stop(tc.servers.iter().filter(|s| !s.witness))?;
        let t = Instant::now();
        let out = tokio::task::block_in_place(|| tc.codafs_admin(&["status"]))?;
        let took = t.elapsed();
        let (stdout, stderr) = (&out.stdout, &out.stderr);
        ensure!(!out.ok, "status with two servers hung fails\n{stdout}{stderr}");
        let witness = tc.servers.iter().find(|s| s.witness).context("a witness")?;
        ensure!(
            stdout.contains(&format!("server {} (node", witness.addr)),
            "{stdout}{stderr}"
        );
        for s in tc.servers.iter().filter(|s| !s.witness) {
            ensure!(stderr.contains(&format!("{} did not answer", s.addr)), "{stderr}");
        }
        ensure!(took < Duration::from_secs(10), "status took {took:?}\n{stdout}{stderr}");
        // And says what that means: no majority, and no content can be written.
        ensure!(
            stdout.contains("1 of 3 voters answer (no majority")
                && stdout.contains("0 of 2 data servers answer")
                && stdout.contains("no data server answers: content cannot be written"),
            "{stdout}"
        );
        drop(data);
        // An admin change (no request id, so never sent twice) whose first server hangs is
        // sent to another once that one leaves a health probe unanswered (3 s). Before, the
        // change waited for the CLI's 30 s deadline there and failed: its outcome was unknown.
        let first = Stopped::stop([&tc.servers[0]])?;
        let t = Instant::now();
        let out = tokio::task::block_in_place(|| tc.codafs_admin(&["volume", "create", "other"]))?;
        let took = t.elapsed();
        ensure!(
            out.ok,
            "volume create with the first server hung failed after {took:?}\n{}{}",
            out.stdout,
            out.stderr
        );
        ensure!(took < Duration::from_secs(20), "volume create took {took:?}");
        // Listed by the servers that took it (the hung one would answer from before it).
        let out = tokio::task::block_in_place(|| tc.codafs_admin(&["volume", "list"]))?;
        ensure!(
            out.ok && out.stdout.lines().filter(|l| l.starts_with("other ")).count() == 1,
            "the volume exists once\n{}{}",
            out.stdout,
            out.stderr
        );
        drop(first);
        let all = Stopped::stop(tc.servers.iter())?;
        let dir = m.path.join(format!("www/d{rounds}"));
        let t = Instant::now();
        let r = fs_call(Duration::from_secs(30), move || {
            std::fs::read_dir(dir)?
                .map(|e| e.map(|e| e.file_name()))
                .collect::<std::io::Result<Vec<_>>>()
        })?;
        let took = t.elapsed();
        ensure!(
            r.is_err(),
            "an uncached listing cannot be read with every server hung: {r:?}"
        );
        ensure!(
            took < Duration::from_secs(6),
            "the listing failed after {took:?} (--timeout 4)\n{}",
            m.log()
        );
        drop(all);
        Ok(())
    })
    .await
}

/// Reads when every server hangs (stopped: connections stay open, nothing answers). A read of
/// a large file begun before they stopped took 2-3 times (`--timeout` + 8.4 s) to fail: each
/// READ's deadline was sized for its whole read-ahead, the blob stream waited for the
/// connection's keepalive, and the kernel's retries of the failed READ waited as long again.
/// Now the chunks in flight must arrive within their transfer time, a stream a server does not
/// open is asked elsewhere after half the call deadline, and a retry of content whose fetch
/// just failed gets 250 ms: the read ends with EIO within a few `--timeout`s (the bound asserted is four,
/// against at least 20 s before). An uncached small file fails as fast, and once the servers
/// go on, the large file reads back whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_fail_within_their_timeout_when_every_server_hangs() {
    bounded(async {
        let tc = TestCluster::start(ClusterOpts::new(2, 1)).await?;
        tc.create_volume("www", 2).await?;
        let c = tc.client();
        let big: Vec<u8> = (0..40u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        TestCluster::write_file(&c, "www", "", "big.bin", &big).await?;
        TestCluster::write_file(&c, "www", "", "small.bin", &vec![b's'; 3 << 20]).await?;
        let m = Mount::start(
            &tc.client_args(),
            tc.root.path(),
            "m",
            &["--read-only", "--timeout", "2"],
        )?;
        let (bigp, smallp) = (m.path.join("www/big.bin"), m.path.join("www/small.bin"));
        ensure!(std::fs::metadata(&smallp)?.len() == 3 << 20, "listing cached");
        use std::io::Read;
        let mut f = std::fs::File::open(&bigp)?;
        let mut head = vec![0u8; 1 << 20];
        f.read_exact(&mut head)?;
        ensure!(head[..] == big[..1 << 20]);

        let resume = Stopped::stop(tc.servers.iter())?;
        let bound = Duration::from_secs(8);
        let t = Instant::now();
        let r = fs_call(Duration::from_secs(90), move || {
            let mut rest = Vec::new();
            f.read_to_end(&mut rest).map(|_| rest.len())
        })?;
        let took = t.elapsed();
        let e = r.expect_err("the rest of a large file cannot be read with every server hung");
        ensure!(e.raw_os_error() == Some(libc::EIO), "{e}");
        eprintln!("the large file's read failed after {took:?}");
        ensure!(took < bound, "the large file's read failed after {took:?}\n{}", m.log());
        let t = Instant::now();
        let r = fs_call(Duration::from_secs(90), move || std::fs::read(smallp))?;
        let took = t.elapsed();
        ensure!(r.is_err(), "an uncached file cannot be read with every server hung");
        ensure!(took < bound, "the small file's read failed after {took:?}\n{}", m.log());

        drop(resume);
        let want = Hash::of(&big);
        wait_until(Duration::from_secs(30), "the large file reads back whole", || {
            let p = bigp.clone();
            async move {
                fs_call(Duration::from_secs(20), move || std::fs::read(p))
                    .ok()
                    .and_then(|r| r.ok())
                    .is_some_and(|d| Hash::of(&d) == want)
            }
        })
        .await
    })
    .await
}
