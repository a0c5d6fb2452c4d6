//! Background blob maintenance against real servers: scrub finds corruption nobody read, and GC
//! deletes unreferenced blobs after the grace period while keeping referenced ones. Small blobs
//! are packed in each server's RocksDB and larger ones are files: both kinds are covered.
use std::path::Path;
use std::time::Duration;

use anyhow::ensure;
use codafs_client::transport::BlobRef;
use codafs_common::Hash;
use codafs_server::blobs::{BlobStore, PACK_MAX_BYTES};
use codafs_tests::{wait_until, ClusterOpts, TestCluster};

/// Damages the packed copy of `h` in the blob store of a server that is not running (the
/// server holds its pack open), as a bad disk would: the content no longer matches the hash.
fn damage_packed_blob(server_dir: &Path, h: &Hash) -> anyhow::Result<()> {
    let store = BlobStore::open(&server_dir.join("blobs"))?;
    let mut bytes = store.read_verified(h)?;
    ensure!(bytes.len() as u64 <= PACK_MAX_BYTES, "blob {h} is a file, not packed");
    bytes[0] ^= 0x55;
    store.damage_for_tests(h, &bytes)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scrub_detects_unread_corruption_and_gc_collects_unreferenced_blobs() {
    let run = async {
        let opts = ClusterOpts::new(2, 1)
            .arg("--scrub-interval-s", "1")
            .arg("--gc-grace-s", "2");
        let mut tc = TestCluster::start(opts).await?;
        tc.create_volume("www", 2).await?;
        let c = tc.client();
        let kept = b"referenced content".repeat(100);
        TestCluster::write_file(&c, "www", "", "kept.html", &kept).await?;
        let kept_hash = Hash::of(&kept);
        // Uploaded but never committed: garbage once the grace period passes.
        let orphan = bytes::Bytes::from_static(b"an upload whose commit never came");
        c.put_blob(orphan.clone(), 2).await?;
        let orphan_hash = Hash::of(&orphan);
        assert!(tc.has_blobs(&tc.servers[0].addr, &[orphan_hash]).await?);

        // Corrupt server 1's packed copy of the referenced blob (while it is down: it holds
        // the pack open); nobody reads it.
        tc.kill(1);
        damage_packed_blob(&tc.servers[1].dir, &kept_hash)?;
        tc.restart(1)?;
        let addr1 = tc.servers[1].addr.clone();
        wait_until(Duration::from_secs(30), "scrub finds the corrupt copy", || async {
            tc.status_of(&addr1).await.is_ok_and(|s| s.corrupt_found >= 1)
        })
        .await?;
        // Read from server 1 alone, verified there: the refetched copy.
        wait_until(Duration::from_secs(20), "repair restores a good copy", || async {
            tc.read_on(&addr1, "www", "kept.html").await.is_ok_and(|d| d == kept)
        })
        .await?;

        // Watch the servers' blob counts: the kept page is the only other blob they hold.
        for s in tc.servers.iter().filter(|s| !s.witness) {
            wait_until(Duration::from_secs(20), "GC removes the orphan", || async {
                tc.status_of(&s.addr).await.is_ok_and(|st| st.blob_count == 1)
            })
            .await?;
            assert!(
                !tc.has_blobs(&s.addr, &[orphan_hash]).await?,
                "orphan collected on {}",
                s.addr
            );
            assert!(
                tc.has_blobs(&s.addr, &[kept_hash]).await?,
                "referenced blob kept on {}",
                s.addr
            );
        }
        assert_eq!(tc.read_on(&tc.servers[1].addr, "www", "kept.html").await?, kept);
        Ok::<_, anyhow::Error>(())
    };
    codafs_tests::bounded_within(Duration::from_secs(120), run).await;
}

/// A large file's chunks get every blob guarantee: a data replica that was down while the file
/// was written refills its manifest and every chunk by repair (and then serves the file alone);
/// a corrupt chunk is found by scrub and repaired; once the file is replaced, GC removes the
/// old version's chunks and keeps the new one's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_large_files_chunks_are_repaired_scrubbed_and_collected() {
    let run = async {
        let opts = ClusterOpts::new(2, 1)
            .arg("--scrub-interval-s", "1")
            .arg("--gc-grace-s", "2");
        let mut tc = TestCluster::start(opts).await?;
        tc.create_volume("www", 1).await?;
        let c = tc.client();
        let (a0, a1) = (tc.servers[0].addr.clone(), tc.servers[1].addr.clone());

        // Written while data server 1 is down (W=1): only server 0 has it.
        tc.kill(1);
        let v1 = codafs_common::testdata::noise(12 << 20, 31);
        c.put_content(&v1, 1).await?;
        let ops = vec![codafs_client::ops::file("video.mp4", &v1, 0o644)];
        c.commit(codafs_client::ops::commit("www", ops)).await?;
        tc.restart(1)?;
        wait_until(Duration::from_secs(60), "repair refills every chunk", || async {
            tc.status_of(&a1)
                .await
                .is_ok_and(|s| s.blob_bytes >= 12 << 20 && s.repair_backlog == 0)
        })
        .await?;
        tc.kill(0);
        assert_eq!(
            tc.read_on(&a1, "www", "video.mp4").await?,
            v1,
            "served by the repaired replica alone"
        );
        tc.restart(0)?;
        tc.caught_up(&a0).await?;

        // Corrupt one chunk on server 1: scrub finds it, repair restores it.
        let attr = tc.resolve_on(&a0, "www", "video.mp4").await?.attr.expect("attributes");
        // The manifest is small, so packed: read it as a client does.
        let manifest = codafs_common::chunks::Manifest::decode(&c.get_blob(&BlobRef::of(&attr)?).await?)?;
        let chunk = manifest.chunks[manifest.chunks.len() / 2].hash;
        let path = tc.blob_path(1, &chunk);
        let mut bytes = std::fs::read(&path)?;
        bytes[100] ^= 0x55;
        std::fs::write(&path, &bytes)?;
        wait_until(
            Duration::from_secs(30),
            "scrub finds and repair restores the chunk",
            || async {
                std::fs::read(&path).is_ok_and(|d| Hash::of(&d) == chunk)
                    && tc.status_of(&a1).await.is_ok_and(|s| s.corrupt_found >= 1)
            },
        )
        .await?;

        // Replaced: the old version's chunks go, the new version's stay.
        let v2 = codafs_common::testdata::noise(6 << 20, 32);
        TestCluster::write_file(&c, "www", "", "video.mp4", &v2).await?;
        for (i, s) in tc.servers.iter().enumerate().filter(|(_, s)| !s.witness) {
            let old = tc.blob_path(i, &chunk);
            wait_until(Duration::from_secs(30), "GC removes the old version's chunks", || {
                let f = old.clone();
                async move { !f.exists() }
            })
            .await?;
            wait_until(Duration::from_secs(30), "only the new version's blobs stay", || async {
                tc.status_of(&s.addr).await.is_ok_and(|st| st.blob_bytes < 8 << 20)
            })
            .await?;
        }
        assert_eq!(tc.read_on(&a0, "www", "video.mp4").await?, v2);
        assert_eq!(tc.read_on(&a1, "www", "video.mp4").await?, v2);
        Ok::<_, anyhow::Error>(())
    };
    codafs_tests::bounded_within(Duration::from_secs(180), run).await;
}

/// Writes www:a.html, large enough to be a blob file (which a test can delete behind the
/// running server's back; small blobs are packed in the server's RocksDB, which it holds
/// open), and waits until both data servers hold it. Returns its content, hash and the path of
/// server 1's copy.
async fn page_on_both(
    tc: &TestCluster,
    c: &codafs_client::Cluster,
) -> anyhow::Result<(Vec<u8>, Hash, std::path::PathBuf)> {
    let page = b"a page two files share".repeat(1000);
    ensure!(page.len() as u64 > PACK_MAX_BYTES);
    TestCluster::write_file(c, "www", "", "a.html", &page).await?;
    let hash = Hash::of(&page);
    let lost = tc.blob_path(1, &hash);
    wait_until(Duration::from_secs(10), "both data replicas hold the page", || {
        let f = lost.clone();
        async move { f.exists() }
    })
    .await?;
    Ok((page, hash, lost))
}

/// A repair pass checks the blobs that new commits reference, not every blob (a `stat` of each
/// one every two seconds was a million system calls on a million-file server): a referenced
/// blob a replica lacks is fetched within seconds, while a full pass is an hour away.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blob_a_new_commit_references_is_repaired_without_a_full_pass() {
    let run = async {
        let opts = ClusterOpts::new(2, 1).arg("--full-repair-interval-s", "3600");
        let tc = TestCluster::start(opts).await?;
        tc.create_volume("www", 1).await?;
        let c = tc.client();
        let (page, hash, lost) = page_on_both(&tc, &c).await?;
        // Passes run every 200 ms here: let the ones that check the commit's hashes go by.
        tokio::time::sleep(Duration::from_secs(1)).await;
        // Lost behind the server's back, and nothing references it anew: passes do not look
        // for it.
        std::fs::remove_file(&lost)?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(!lost.exists(), "only a full pass looks at every referenced blob");

        // A second file with the same content, committed without an upload (server 0 holds
        // it, and the volume needs one copy): server 1 applies the commit and fetches it.
        let op = codafs_client::ops::file_hashed("b.html", hash, page.len() as u64, 0o644);
        c.commit(codafs_client::ops::commit("www", vec![op])).await?;
        wait_until(Duration::from_secs(20), "the newly referenced blob is repaired", || {
            let f = lost.clone();
            async move { f.exists() }
        })
        .await?;
        assert_eq!(Hash::of(&std::fs::read(&lost)?), hash);
        let st = tc.status_of(&tc.servers[1].addr).await?;
        assert_eq!(st.repair_backlog, 0, "{st:?}");
        Ok::<_, anyhow::Error>(())
    };
    codafs_tests::bounded_within(Duration::from_secs(90), run).await;
}

/// Asking whether blobs are held (as a client does before a commit) and checking commits that
/// then fail no longer keep an upload that is never committed: it is collected after its grace
/// period while a client keeps doing both (here an account that did not upload it; its
/// uploader's questions are the same). Before, each question restarted its grace period, so it
/// outlived its quota charge for as long as the asking went on. A committed large file's
/// chunks, older than the grace period by then, are still reported held: rewriting 64 KiB of
/// it sends only the chunks that changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn asking_about_an_upload_does_not_keep_it_and_live_chunks_stay_reusable() {
    use codafs_client::ops;
    use codafs_common::testdata::noise;
    let run = async {
        let opts = ClusterOpts::new(2, 0).arg("--gc-grace-s", "4");
        let tc = TestCluster::start(opts).await?;
        tc.create_volume("www", 2).await?;
        let c = tc.client();
        let v1 = noise(12 << 20, 41);
        c.put_content(&v1, 2).await?;
        c.commit(ops::commit("www", vec![ops::file("video.mp4", &v1, 0o644)]))
            .await?;

        // Uploads never committed: one packed, one stored as a file.
        let small = bytes::Bytes::from_static(b"an upload whose commit never comes");
        let large = bytes::Bytes::from(noise(200 << 10, 42));
        c.put_blob(small.clone(), 2).await?;
        c.put_blob(large.clone(), 2).await?;
        let orphans = [Hash::of(&small), Hash::of(&large)];
        let data = tc.data_addrs();
        // Another account, which may store (it owns a volume) and asks about them.
        let token = tc.add_user("web").await?;
        c.create_volume(codafs_proto::pb::VolumeSpec {
            name: "site".into(),
            owner: "web".into(),
            write_quorum: 2,
            ..Default::default()
        })
        .await?;
        let web = codafs_client::Cluster::new(&tc.addrs(), tc.tls.clone(), Some(token))?;
        let stored_anywhere = || async {
            for addr in &data {
                for h in &orphans {
                    if tc.has_blobs(addr, &[*h]).await? {
                        return Ok::<_, anyhow::Error>(true);
                    }
                }
            }
            Ok(false)
        };
        ensure!(stored_anywhere().await?, "the uploads are stored");
        // Ask about them, and send a commit naming one that fails at apply (it expects a
        // volume version long passed), every 300 ms until GC has removed both everywhere.
        let start = std::time::Instant::now();
        let mut rounds = 0;
        while stored_anywhere().await? {
            ensure!(
                start.elapsed() < Duration::from_secs(40),
                "uploads never committed are still stored after {rounds} rounds of asking about them"
            );
            for addr in &data {
                web.missing_on_as(addr, None, &orphans).await?;
            }
            let mut failing = ops::commit("site", vec![ops::file("never.html", &small, 0o644)]);
            failing.expect_volume_version = Some(1);
            ensure!(
                web.commit(failing).await.is_err(),
                "a commit expecting version 1 went through"
            );
            rounds += 1;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }

        ensure!(
            start.elapsed() >= Duration::from_secs(3),
            "collected after {:?}: sooner than its 4 s grace period",
            start.elapsed()
        );

        // video.mp4's chunks are older than the grace period, but live.
        let mut v2 = v1.clone();
        for b in &mut v2[6 << 20..(6 << 20) + (64 << 10)] {
            *b ^= 0x5a;
        }
        let mut chunks = Vec::new();
        let manifest = codafs_common::chunks::chunk_reader(&v2[..], |off, ch, _| {
            chunks.push((ch.hash, off as usize, ch.len as usize));
            Ok(())
        })?;
        let hashes: Vec<Hash> = chunks.iter().map(|(h, _, _)| *h).collect();
        let lacking = c.lacking(None, &hashes).await?;
        let sent: usize = chunks
            .iter()
            .filter(|(h, _, _)| lacking.contains(h))
            .map(|(_, _, l)| l)
            .sum();
        ensure!(
            sent < 8 << 20,
            "rewriting 64 KiB of a 12 MiB file would send {} of its {} chunks ({sent} bytes)",
            lacking.len(),
            chunks.len()
        );
        for (h, off, len) in &chunks {
            if lacking.contains(h) {
                c.put_blob(bytes::Bytes::copy_from_slice(&v2[*off..off + len]), 2)
                    .await?;
            }
        }
        c.put_blob(manifest.encode().into(), 2).await?;
        c.commit(ops::commit("www", vec![ops::file("video.mp4", &v2, 0o644)]))
            .await?;
        for addr in &data {
            ensure!(
                tc.read_on(addr, "www", "video.mp4").await? == v2,
                "video.mp4 v2 on {addr}"
            );
        }
        Ok::<_, anyhow::Error>(())
    };
    codafs_tests::bounded_within(Duration::from_secs(150), run).await;
}

/// Scrub takes turns with repair: a scrub pass that takes far longer than a repair (here 30 MiB
/// at 1 MiB/s, passes back to back) no longer holds repair up until it ends. A blob lost behind
/// a data server's back and then referenced anew is fetched within seconds, in the middle of a
/// pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn repair_does_not_wait_for_a_long_scrub_pass() {
    use codafs_common::testdata::noise;
    let run = async {
        let opts = ClusterOpts::new(2, 0)
            .arg("--scrub-interval-s", "1")
            .arg("--scrub-rate-mib", "1")
            .arg("--full-repair-interval-s", "3600");
        let tc = TestCluster::start(opts).await?;
        tc.create_volume("www", 1).await?;
        let c = tc.client();
        for i in 0..3u64 {
            TestCluster::write_file(&c, "www", "", &format!("bulk{i}.bin"), &noise(10 << 20, 50 + i)).await?;
        }
        let (page, hash, lost) = page_on_both(&tc, &c).await?;
        // Lost behind server 1's back while it scrubs (a pass of about 30 s, started within a
        // second of the last one's end); nothing references it anew yet.
        tokio::time::sleep(Duration::from_secs(3)).await;
        std::fs::remove_file(&lost)?;
        let op = codafs_client::ops::file_hashed("b.html", hash, page.len() as u64, 0o644);
        c.commit(codafs_client::ops::commit("www", vec![op])).await?;
        wait_until(
            Duration::from_secs(10),
            "the newly referenced blob is repaired mid-scrub",
            || {
                let f = lost.clone();
                async move { f.exists() }
            },
        )
        .await?;
        assert_eq!(Hash::of(&std::fs::read(&lost)?), hash);
        Ok::<_, anyhow::Error>(())
    };
    codafs_tests::bounded_within(Duration::from_secs(150), run).await;
}
