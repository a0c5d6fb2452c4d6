//! `codafs cluster servers` against real servers: every server's kind, role, state, lag, blobs
//! and free disk, and a killed one shown as unreachable rather than hiding the rest.
use std::time::Duration;

use anyhow::{ensure, Context};
use codafs_tests::{bounded, wait_until, ClusterOpts, TestCluster};

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

/// Replacing a dead data server: `cluster remove` refuses while the volume's write quorum
/// needs it (and says why), removes it with --force, and a new server joined in its place is
/// filled by repair until it serves every file alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_data_server_is_replaced_and_the_new_one_refilled() {
    bounded(async {
        let mut tc = TestCluster::start(ClusterOpts::new(2, 1)).await?;
        tc.create_volume("www", 2).await?;
        let c = tc.client();
        let mut hashes = Vec::new();
        for i in 0..20 {
            let page = format!("page {i} ").repeat(100 + i);
            TestCluster::write_file(&c, "www", "", &format!("p{i}.html"), page.as_bytes()).await?;
            hashes.push(codafs_common::Hash::of(page.as_bytes()));
        }
        let leader = tc.leader().await?;
        let dead = tc
            .servers
            .iter()
            .enumerate()
            .position(|(i, s)| !s.witness && i != leader)
            .context("a data server that does not lead")?;
        let dead_id = tc.status_of(&tc.servers[dead].addr).await?.node_id.to_string();
        tc.kill(dead);

        let out = tc.codafs_admin(&["cluster", "remove", &dead_id])?;
        ensure!(!out.ok, "removal refused: {}", out.stdout);
        ensure!(
            out.stderr.contains("volume www needs 2 copies") && out.stderr.contains("--force"),
            "{}",
            out.stderr
        );
        ensure!(tc.client().list_servers().await?.servers.len() == 3, "nothing removed");

        let out = tc.codafs_admin(&["cluster", "remove", &dead_id, "--force"])?;
        ensure!(out.ok && out.stderr.contains("WARNING"), "{}", out.stderr);
        let new = tc.join_replacement().await?;
        let addr = tc.servers[new].addr.clone();
        wait_until(
            Duration::from_secs(60),
            "repair refills the new data server",
            || async { tc.has_blobs(&addr, &hashes).await.unwrap_or(false) },
        )
        .await?;
        // The other data server goes too: the new one serves every page alone.
        let other = tc
            .servers
            .iter()
            .enumerate()
            .position(|(i, s)| !s.witness && i != dead && i != new)
            .context("the other data server")?;
        tc.caught_up(&addr).await?;
        tc.kill(other);
        for i in [0, 7, 19] {
            let page = format!("page {i} ").repeat(100 + i);
            ensure!(tc.read_on(&addr, "www", &format!("p{i}.html")).await? == page.as_bytes());
        }
        Ok(())
    })
    .await
}
