//! `codafs cluster servers` against real servers: every server's kind, role, state, lag, blobs
//! and free disk, and a killed one shown as unreachable rather than hiding the rest.
use std::time::Duration;

use anyhow::{ensure, Context};
use codafs_tests::{bounded, ClusterOpts, TestCluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_servers_shows_each_servers_state_and_an_unreachable_one() {
    bounded(async {
        let mut tc = TestCluster::start(ClusterOpts::new(2, 1)).await?;
        tc.create_volume("www", 2).await?;
        TestCluster::write_file(&tc.client(), "www", "", "a.html", b"a page").await?;
        let out = tc.codafs_admin(&["cluster", "servers", "--json"])?;
        ensure!(out.ok, "{}", out.stderr);
        let rows: Vec<serde_json::Value> = serde_json::from_str(&out.stdout)?;
        ensure!(rows.len() == 3, "{rows:?}");
        ensure!(rows.iter().filter(|r| r["leader"] == true).count() == 1, "{rows:?}");
        ensure!(rows.iter().all(|r| r["state"] == "up"), "{rows:?}");
        let data_blobs: Vec<u64> = rows
            .iter()
            .filter(|r| r["witness"] == false)
            .map(|r| r["blob_count"].as_u64().unwrap_or(0))
            .collect();
        ensure!(
            data_blobs.iter().all(|n| *n >= 1),
            "both data servers hold the page: {rows:?}"
        );
        ensure!(
            rows.iter().all(|r| r["disk_free_bytes"].as_u64().unwrap_or(0) > 0),
            "{rows:?}"
        );

        let witness = tc.servers.iter().position(|s| s.witness).context("a witness")?;
        tc.kill(witness);
        let out = tc.codafs_admin(&["cluster", "servers"])?;
        ensure!(out.ok, "{}", out.stderr);
        let line = out
            .stdout
            .lines()
            .find(|l| l.contains(&tc.servers[witness].addr))
            .context("the killed server is still listed")?;
        ensure!(line.contains("unreachable"), "{}", out.stdout);
        ensure!(out.stdout.matches(" up ").count() == 2, "{}", out.stdout);
        tokio::time::sleep(Duration::from_millis(10)).await;
        Ok(())
    })
    .await
}
