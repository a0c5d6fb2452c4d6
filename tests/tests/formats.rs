//! On-disk format versions: a server directory or a mount's cache directory written in a format
//! this build does not read is refused at start, with what it holds and the way forward, and
//! nothing in it is touched.
use std::time::Duration;

use anyhow::ensure;
use codafs_tests::{bounded, wait_until, ClusterOpts, Mount, TestCluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_server_or_cache_directory_of_another_format_is_refused_clearly() {
    bounded(async {
        let mut tc = TestCluster::start(ClusterOpts::new(1, 0)).await?;
        tc.create_volume("www", 1).await?;
        let format = tc.servers[0].dir.join("FORMAT");
        ensure!(
            std::fs::read_to_string(&format)? == "codafs-server 2\n",
            "stamped at start"
        );

        // A directory a newer build wrote: this one refuses it and says why.
        tc.servers[0].terminate(Duration::from_secs(10))?;
        std::fs::write(&format, "codafs-server 9\n")?;
        tc.restart(0)?;
        wait_until(Duration::from_secs(20), "the refusal in the server's log", || {
            let log = tc.servers[0].log();
            async move { log.contains("format 9") && log.contains("reads format 2") }
        })
        .await?;
        let (_, clean) = tc.servers[0].terminate(Duration::from_secs(10))?;
        ensure!(!clean, "the server exited with an error");
        ensure!(
            std::fs::read_to_string(&format)? == "codafs-server 9\n",
            "left as it was"
        );

        // Back to format 1 (one file per blob), which this build reads as it is: it starts,
        // serves again, and stamps the directory as its own format, which older builds refuse.
        std::fs::write(&format, "codafs-server 1\n")?;
        tc.restart(0)?;
        tc.wait_leader(Duration::from_secs(20)).await?;
        ensure!(tc.volume_info("www").await?.name == "www");
        ensure!(
            std::fs::read_to_string(&format)? == "codafs-server 2\n",
            "upgraded at start"
        );
        ensure!(tc.servers[0].log().contains("upgraded the server directory's format"));

        // A cache directory of another format: the mount refuses to start.
        let cache = tc.root.path().join("m.cache");
        std::fs::create_dir_all(&cache)?;
        std::fs::write(cache.join("FORMAT"), "codafs-cache 9\n")?;
        let e = match Mount::start(&tc.client_args(), tc.root.path(), "m", &["--read-only"]) {
            Ok(_) => anyhow::bail!("a mount over a cache of format 9 started"),
            Err(e) => e.to_string(),
        };
        ensure!(e.contains("codafs-cache format 9"), "{e}");
        std::fs::remove_file(cache.join("FORMAT"))?;
        let m = Mount::start(&tc.client_args(), tc.root.path(), "m", &["--read-only"])?;
        ensure!(std::fs::read_to_string(cache.join("FORMAT"))? == "codafs-cache 1\n");
        drop(m);
        Ok(())
    })
    .await
}
