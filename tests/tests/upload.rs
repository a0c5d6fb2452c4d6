//! `codafs upload` against real servers: idempotent re-runs, --delete, dry runs, atomic
//! visibility to a concurrent reader, a leader crash during an upload, and large files sent as
//! chunks (a small edit sends only the chunks around it).
use codafs_common::testdata::noise;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use codafs_client::transport::BlobRef;
use codafs_client::upload::{upload, Progress, UploadOptions};
use codafs_client::Cluster;
use codafs_common::chunks::Manifest;
use codafs_common::Hash;
use codafs_proto::pb;
use codafs_tests::{read_file, ClusterOpts, Mount, TestCluster};

fn site(dir: &Path, version: u32, pages: usize) -> Result<()> {
    std::fs::create_dir_all(dir.join("pages"))?;
    for i in 0..pages {
        std::fs::write(
            dir.join("pages").join(format!("p{i}.html")),
            format!("version {version} page {i}"),
        )?;
    }
    std::fs::write(dir.join("index.html"), format!("version {version} index"))?;
    Ok(())
}

fn opts(path: &str) -> UploadOptions {
    UploadOptions {
        volume: "www".into(),
        path: path.into(),
        delete: true,
        dry_run: false,
        parallel: 8,
    }
}

/// Reads every page's content from one server; returns the versions seen and whether every
/// reply came from the same applied state (only then must the pass be uniform).
async fn versions_on(c: &Cluster, pages: usize) -> Result<(std::collections::BTreeSet<String>, bool)> {
    let mut seen = std::collections::BTreeSet::new();
    let mut applied = std::collections::BTreeSet::new();
    for i in 0..pages {
        let path = format!("site/pages/p{i}.html");
        let reply = c
            .call(|ch| {
                let r = c.request(pb::ResolveRequest {
                    volume: "www".into(),
                    path: path.clone(),
                });
                async move { Cluster::meta(ch).resolve(r).await.map(|r| r.into_inner()) }
            })
            .await?;
        applied.insert(reply.applied_index);
        let attr = reply.attr.ok_or_else(|| anyhow::anyhow!("no attr"))?;
        let data = c.get_blob(&codafs_client::transport::BlobRef::of(&attr)?).await?;
        let text = String::from_utf8_lossy(&data).to_string();
        seen.insert(text.split(" page").next().unwrap_or("").to_string());
    }
    Ok((seen, applied.len() == 1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upload_is_idempotent_deletes_and_dry_runs_change_nothing() {
    let run = async {
        let tc = TestCluster::start(ClusterOpts::new(2, 1)).await?;
        tc.create_volume("www", 2).await?;
        let c = tc.client();
        let local = tc.root.path().join("local");
        site(&local, 1, 20)?;
        // Files keep their source's mtime (web servers answer Last-Modified with it); they got
        // the commit's time.
        let set_mtime = |path: &Path, secs: u64| -> Result<i64> {
            let t = std::time::UNIX_EPOCH + Duration::from_secs(secs);
            std::fs::File::options().write(true).open(path)?.set_modified(t)?;
            Ok(secs as i64 * 1_000_000_000)
        };
        let mtime_on = |path: &'static str| {
            let tc = &tc;
            async move {
                let a = tc
                    .resolve_on(&tc.servers[0].addr, "www", path)
                    .await?
                    .attr
                    .context("attr")?;
                anyhow::Ok(a.mtime_ns)
            }
        };
        let old = set_mtime(&local.join("pages/p0.html"), 1_577_836_800)?;
        // Directories too, once the commit has filled them (each file added gave them the
        // commit's time).
        let dir_mtime = |path: &Path| -> Result<i64> {
            use std::os::unix::fs::MetadataExt;
            let m = std::fs::metadata(path)?;
            Ok(m.mtime() * 1_000_000_000 + m.mtime_nsec())
        };
        let pages_at = std::time::UNIX_EPOCH + Duration::from_secs(1_500_000_000);
        std::fs::File::open(local.join("pages"))?.set_modified(pages_at)?;
        let s = upload(&c, &local, &opts("site"), &()).await?;
        assert_eq!((s.files, s.uploaded_blobs), (21, 21));
        assert_eq!(mtime_on("site/pages/p0.html").await?, old);
        assert_eq!(mtime_on("site/pages").await?, 1_500_000_000_000_000_000);
        assert_eq!(mtime_on("site").await?, dir_mtime(&local)?);
        // Re-running sends nothing and commits nothing.
        let again = upload(&c, &local, &opts("site"), &()).await?;
        assert_eq!((again.uploaded_blobs, again.version, again.unchanged), (0, 0, 22));
        // A dry run reports without changing the volume.
        std::fs::remove_file(local.join("pages/p3.html"))?;
        std::fs::write(local.join("index.html"), "version 2 index")?;
        let edited = set_mtime(&local.join("index.html"), 1_600_000_000)?;
        let dry = upload(
            &c,
            &local,
            &UploadOptions {
                dry_run: true,
                ..opts("site")
            },
            &(),
        )
        .await?;
        assert_eq!((dry.updated, dry.removed, dry.version), (1, 1, 0));
        assert!(tc
            .resolve_on(&tc.servers[0].addr, "www", "site/pages/p3.html")
            .await
            .is_ok());
        let s = upload(&c, &local, &opts("site"), &()).await?;
        assert_eq!((s.updated, s.removed, s.uploaded_blobs), (1, 1, 1));
        assert!(tc
            .resolve_on(&tc.servers[0].addr, "www", "site/pages/p3.html")
            .await
            .is_err());
        assert_eq!(
            tc.read_on(&tc.servers[1].addr, "www", "site/index.html").await?,
            b"version 2 index"
        );
        assert_eq!(
            mtime_on("site/index.html").await?,
            edited,
            "new content keeps its mtime"
        );
        assert_eq!(
            mtime_on("site/pages").await?,
            dir_mtime(&local.join("pages"))?,
            "a directory an entry left keeps its local mtime"
        );
        Ok::<_, anyhow::Error>(())
    };
    codafs_tests::bounded_within(Duration::from_secs(120), run).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readers_see_the_old_site_or_the_new_one_never_a_mix() {
    let run = async {
        let tc = TestCluster::start(ClusterOpts::new(2, 1)).await?;
        tc.create_volume("www", 2).await?;
        let c = tc.client();
        let pages = 40;
        let local = tc.root.path().join("local");
        site(&local, 1, pages)?;
        upload(&c, &local, &opts("site"), &()).await?;
        // Follower reads may lag the acknowledged commit: start once server 1 has the site.
        let last = format!("site/pages/p{}.html", pages - 1);
        codafs_tests::wait_until(Duration::from_secs(10), "server 1 applies the first upload", || {
            let (tc, last) = (&tc, last.clone());
            async move { tc.resolve_on(&tc.servers[1].addr, "www", &last).await.is_ok() }
        })
        .await?;
        // A reader on another replica checks, over and over, that one pass sees one version.
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let stop = stop.clone();
            let r = tc.client_on(&tc.servers[1].addr);
            tokio::spawn(async move {
                let (mut passes, mut checked) = (0u32, 0u32);
                while !stop.load(Ordering::Relaxed) && passes < 5000 {
                    let (seen, one_state) = versions_on(&r, pages).await?;
                    if one_state {
                        anyhow::ensure!(seen.len() == 1, "one applied state showed a mix of versions: {seen:?}");
                        checked += 1;
                    }
                    passes += 1;
                }
                Ok::<_, anyhow::Error>(checked)
            })
        };
        for v in 2..=6 {
            site(&local, v, pages)?;
            upload(&c, &local, &opts("site"), &()).await?;
            // Let the reader complete passes between publishes too (uploads can be faster than
            // one pass), so the check runs while versions change.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        stop.store(true, Ordering::Relaxed);
        let checked = reader.await??;
        assert!(checked > 0, "no reader pass completed within one applied state");
        Ok::<_, anyhow::Error>(())
    };
    codafs_tests::bounded_within(Duration::from_secs(120), run).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_crash_during_upload_then_retry_publishes_everything() {
    let run = async {
        let mut tc = TestCluster::start(ClusterOpts::new(3, 0)).await?;
        tc.create_volume("www", 2).await?;
        let local = tc.root.path().join("local");
        site(&local, 1, 300)?;
        let leader = tc.leader().await?;
        let c = tc.client();
        let o = opts("site");
        let up = upload(&c, &local, &o, &());
        let killer = async {
            tokio::time::sleep(Duration::from_millis(30)).await;
            tc.servers[leader].kill();
        };
        let (first, ()) = tokio::join!(up, killer);
        if let Err(e) = &first {
            eprintln!("upload during the crash failed (allowed, must be clear): {e}");
            assert!(!e.to_string().is_empty());
        }
        tc.wait_leader(Duration::from_secs(20)).await?;
        // The retry finishes the job; nothing acknowledged earlier is lost.
        let s = upload(&tc.client(), &local, &opts("site"), &()).await?;
        assert!(s.uploaded_blobs <= 301);
        for other in (0..3).filter(|i| *i != leader) {
            let addr = tc.servers[other].addr.clone();
            codafs_tests::wait_until(Duration::from_secs(10), "replica applies the upload", || {
                let addr = addr.clone();
                let tc = &tc;
                async move { tc.resolve_on(&addr, "www", "site/pages/p299.html").await.is_ok() }
            })
            .await?;
            assert_eq!(
                tc.read_on(&addr, "www", "site/pages/p299.html").await?,
                b"version 1 page 299"
            );
        }
        Ok::<_, anyhow::Error>(())
    };
    codafs_tests::bounded_within(Duration::from_secs(120), run).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quota_overrun_is_refused_with_the_limit_and_changes_nothing() {
    let run = async {
        let tc = TestCluster::start(ClusterOpts::new(1, 0)).await?;
        let c = tc.client();
        let spec = pb::VolumeSpec {
            name: "www".into(),
            quota_files: 10,
            quota_bytes: 2000,
            write_quorum: 1,
            public_read: true,
            ..Default::default()
        };
        let before = c
            .call(|ch| {
                let r = c.request(spec.clone());
                async move { Cluster::admin(ch).create_volume(r).await.map(|r| r.into_inner()) }
            })
            .await?;
        let local = tc.root.path().join("local");
        site(&local, 1, 20)?;
        let e = upload(&c, &local, &opts(""), &()).await.unwrap_err().to_string();
        assert!(
            e.contains("quota exceeded: files would be 22, limit 10 (over by 12)"),
            "{e}"
        );
        // Within the file quota but over the byte quota.
        let small = tc.root.path().join("small");
        std::fs::create_dir_all(&small)?;
        std::fs::write(small.join("big.html"), "x".repeat(2500))?;
        let e = upload(&c, &small, &opts(""), &()).await.unwrap_err().to_string();
        assert!(
            e.contains("quota exceeded: bytes would be 2500, limit 2000 (over by 500)"),
            "{e}"
        );
        let after = tc.volume_info("www").await?;
        assert_eq!(
            (after.version, after.used_files, after.used_bytes),
            (before.version, 0, 0)
        );
        Ok::<_, anyhow::Error>(())
    };
    codafs_tests::bounded_within(Duration::from_secs(120), run).await;
}

/// Counts what an upload reports through its progress callbacks.
#[derive(Default)]
struct Counted {
    planned: AtomicU64,
    sent: AtomicU64,
}

impl Progress for Counted {
    fn planned(&self, _blobs: usize, bytes: u64) {
        self.planned.store(bytes, Ordering::Relaxed);
    }
    fn uploaded(&self, bytes: u64) {
        self.sent.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// The data servers (a witness keeps no blobs): their addresses and stored blob bytes.
async fn data_servers(tc: &TestCluster) -> Result<Vec<(String, u64)>> {
    let mut out = Vec::new();
    for s in &tc.servers {
        let st = tc.status_of(&s.addr).await?;
        if !st.witness {
            out.push((s.addr.clone(), st.blob_bytes));
        }
    }
    Ok(out)
}

/// The content of `volume:path` read from the server at `addr` by blobs: for a chunked file its
/// manifest (checked against the file's size), then every chunk it lists, each verified.
async fn read_chunked_on(tc: &TestCluster, addr: &str, volume: &str, path: &str) -> Result<(Vec<u8>, Manifest)> {
    tc.caught_up(addr).await?;
    let attr = tc.resolve_on(addr, volume, path).await?.attr.context("no attr")?;
    let file = BlobRef::of(&attr)?;
    let c = tc.client_on(addr);
    let manifest = Manifest::decode(&c.get_blob(&file).await?).context("the file's hash names no manifest")?;
    ensure!(
        manifest.size() == attr.size,
        "manifest of {} bytes for a {}-byte file",
        manifest.size(),
        attr.size
    );
    let mut data = Vec::with_capacity(attr.size as usize);
    for chunk in &manifest.chunks {
        data.extend_from_slice(&c.get_blob(&file.chunk(chunk.hash)).await?);
    }
    Ok((data, manifest))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_large_file_goes_in_chunks_and_an_edit_sends_only_the_chunks_around_it() {
    const MIB: u64 = 1 << 20;
    let run = async {
        let tc = TestCluster::start(ClusterOpts::new(2, 1)).await?;
        tc.create_volume("www", 2).await?;
        let c = tc.client();
        let local = tc.root.path().join("local");
        std::fs::create_dir_all(&local)?;
        let mut big = noise(40 << 20, 1);
        std::fs::write(local.join("big.bin"), &big)?;
        std::fs::write(local.join("small.txt"), b"a small file")?;

        // First upload: every chunk, the manifest and the small file, and nothing twice.
        let stored_before = data_servers(&tc).await?;
        ensure!(stored_before.len() == 2, "two data servers: {stored_before:?}");
        let progress = Counted::default();
        let s = upload(&c, &local, &opts("data"), &progress).await?;
        assert_eq!((s.files, s.created, s.bytes), (2, 2, 40 * MIB + 12));
        assert!(
            s.uploaded_bytes > 40 * MIB && s.uploaded_bytes < 40 * MIB + 64 * 1024,
            "first upload sent {} bytes",
            s.uploaded_bytes
        );
        assert!(
            s.uploaded_blobs > 10,
            "40 MiB in chunks of about 1 MiB: {} blobs",
            s.uploaded_blobs
        );
        assert_eq!(progress.planned.load(Ordering::Relaxed), s.uploaded_bytes);
        assert_eq!(progress.sent.load(Ordering::Relaxed), s.uploaded_bytes);
        let stored = data_servers(&tc).await?;
        for ((addr, b), (_, a)) in stored_before.iter().zip(&stored) {
            assert!(a - b >= 40 * MIB, "data server {addr} stored {} bytes", a - b);
            assert_eq!(tc.read_on(addr, "www", "data/small.txt").await?, b"a small file");
        }
        let (got, first) = read_chunked_on(&tc, &stored[1].0, "www", "data/big.bin").await?;
        assert!(
            got == big,
            "the big file reads back different (blake3 {})",
            Hash::of(&got)
        );
        assert!(first.chunks.len() > 10 && first.chunks.iter().all(|c| c.len <= 4 << 20));

        // An unchanged tree sends nothing.
        let again = upload(&c, &local, &opts("data"), &()).await?;
        assert_eq!((again.uploaded_blobs, again.uploaded_bytes, again.version), (0, 0, 0));

        // 64 KiB changed in the middle: the chunks around it and a new manifest, nothing more.
        let mid = 20 << 20;
        big[mid..mid + (64 << 10)].copy_from_slice(&noise(64 << 10, 2));
        std::fs::write(local.join("big.bin"), &big)?;
        // A dry run says what would travel: the new chunks and manifest, not the whole file.
        let dry = UploadOptions {
            dry_run: true,
            ..opts("data")
        };
        let d = upload(&c, &local, &dry, &()).await?;
        assert!(
            d.uploaded_bytes > 0 && d.uploaded_bytes < 12 * MIB,
            "the dry run would send {} bytes",
            d.uploaded_bytes
        );
        let progress = Counted::default();
        let s = upload(&c, &local, &opts("data"), &progress).await?;
        assert_eq!(
            s.uploaded_bytes, d.uploaded_bytes,
            "the dry run told what the upload sent"
        );
        assert_eq!((s.updated, s.unchanged), (1, 1));
        assert!(s.version > 0);
        assert!(s.uploaded_bytes < 12 * MIB, "the edit sent {} bytes", s.uploaded_bytes);
        assert_eq!(progress.sent.load(Ordering::Relaxed), s.uploaded_bytes);
        let after = data_servers(&tc).await?;
        for ((addr, b), (_, a)) in stored.iter().zip(&after) {
            assert!(
                a - b < 12 * MIB,
                "data server {addr} stored {} more bytes for a 64 KiB edit",
                a - b
            );
        }
        let (got, second) = read_chunked_on(&tc, &stored[0].0, "www", "data/big.bin").await?;
        assert!(
            got == big,
            "the edited file reads back different (blake3 {})",
            Hash::of(&got)
        );
        let shared = second.chunks.iter().filter(|c| first.chunks.contains(c)).count();
        assert!(
            shared + 4 >= second.chunks.len(),
            "{shared} of {} chunks kept",
            second.chunks.len()
        );

        // And through a mount, as a web node reads it.
        let web = Mount::start(&tc.client_args(), tc.root.path(), "web", &["--read-only"])?;
        let through = read_file(&web.path.join("www/data/big.bin")).with_context(|| web.log())?;
        assert!(
            through == big,
            "the mount reads the big file differently (blake3 {})",
            Hash::of(&through)
        );
        assert_eq!(read_file(&web.path.join("www/data/small.txt"))?, b"a small file");
        Ok::<_, anyhow::Error>(())
    };
    codafs_tests::bounded_within(Duration::from_secs(180), run).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_large_file_changed_during_the_upload_fails_it_clearly() {
    let run = async {
        let tc = TestCluster::start(ClusterOpts::new(1, 0)).await?;
        tc.create_volume("www", 1).await?;
        let c = tc.client();
        let local = tc.root.path().join("local");
        std::fs::create_dir_all(&local)?;
        let path = local.join("big.bin");
        let big = noise(12 << 20, 3);
        std::fs::write(&path, &big)?;
        // Changed after the scan, before its chunks are read: the progress callback that says
        // what is planned runs between the two.
        struct Overwrite<'a>(&'a Path);
        impl Progress for Overwrite<'_> {
            fn planned(&self, _blobs: usize, _bytes: u64) {
                let _ = std::fs::write(self.0, noise(12 << 20, 4));
            }
        }
        let e = upload(&c, &local, &opts("data"), &Overwrite(&path))
            .await
            .err()
            .context("the upload succeeded")?;
        let msg = e.to_string();
        assert!(msg.contains("big.bin changed during the upload; run it again"), "{msg}");
        assert!(tc.resolve_on(&tc.servers[0].addr, "www", "data/big.bin").await.is_err());
        Ok::<_, anyhow::Error>(())
    };
    codafs_tests::bounded_within(Duration::from_secs(120), run).await;
}
