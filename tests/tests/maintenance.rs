//! Background blob maintenance against real servers: scrub finds corruption nobody read, and GC
//! deletes unreferenced blobs after the grace period while keeping referenced ones.
use std::time::Duration;

use codafs_common::Hash;
use codafs_tests::{wait_until, ClusterOpts, TestCluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scrub_detects_unread_corruption_and_gc_collects_unreferenced_blobs() {
    let run = async {
        let opts = ClusterOpts::new(2, 1)
            .arg("--scrub-interval-s", "1")
            .arg("--gc-grace-s", "2");
        let tc = TestCluster::start(opts).await?;
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

        // Corrupt server 1's copy of the referenced blob; nobody reads it.
        let path = tc.blob_path(1, &kept_hash);
        let mut bytes = std::fs::read(&path)?;
        bytes[0] ^= 0x55;
        std::fs::write(&path, &bytes)?;
        let addr1 = tc.servers[1].addr.clone();
        wait_until(Duration::from_secs(20), "scrub finds the corrupt copy", || async {
            tc.status_of(&addr1).await.is_ok_and(|s| s.corrupt_found >= 1)
        })
        .await?;
        wait_until(Duration::from_secs(20), "repair restores a good copy", || async {
            std::fs::read(&path).is_ok_and(|d| Hash::of(&d) == kept_hash)
        })
        .await?;

        // Watch the files, not the Missing RPC: asking a server about a blob restarts its grace
        // period (a commit is presumably about to reference it).
        for (i, s) in tc.servers.iter().enumerate().filter(|(_, s)| !s.witness) {
            let orphan_file = tc.blob_path(i, &orphan_hash);
            wait_until(Duration::from_secs(20), "GC removes the orphan", || {
                let f = orphan_file.clone();
                async move { !f.exists() }
            })
            .await?;
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
