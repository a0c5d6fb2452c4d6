//! Prometheus metrics (`--metrics-listen`) of real servers and a real mount: scraped over plain
//! HTTP on loopback after reads, writes and callbacks, checked by metric name and value; and a
//! taken address refused at startup with a message naming it.
use std::os::unix::io::AsRawFd;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use codafs_tests::http::{get, scrape, value};
use codafs_tests::{
    bounded, codafs_bin, free_port, read_file, wait_output, wait_until, ClusterOpts, Mount, TestCluster,
};

/// [`value`], failing with the scrape when the series is missing.
fn must(text: &str, series: &str) -> Result<f64> {
    value(text, series).with_context(|| format!("no series {series} in:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn servers_and_mounts_serve_prometheus_metrics() {
    bounded(async {
        let tc = TestCluster::start(ClusterOpts::new(2, 1).metrics()).await?;
        tc.create_volume("www", 2).await?;
        let c = tc.client();
        // Over 64 KiB (not brought with the listing) and under 4 MiB (one blob): fetched on
        // first read, and read in several kernel requests.
        let big: Vec<u8> = (0..3u32 << 20).map(|i| (i % 251) as u8).collect();
        TestCluster::write_file(&c, "www", "", "big.bin", &big).await?;

        let maddr = format!("127.0.0.1:{}", free_port());
        let mut m = Mount::start(&tc.client_args(), tc.root.path(), "m", &["--metrics-listen", &maddr])?;
        let path = m.path.join("www/big.bin");
        assert_eq!(read_file(&path)?, big);
        let first = scrape(&maddr).await?;
        let misses = must(&first, "codafs_mount_cache_misses_total")?;
        let hits = must(&first, "codafs_mount_cache_hits_total")?;
        ensure!(misses >= 1.0, "the first read fetched: {first}");
        ensure!(
            must(&first, "codafs_mount_fetch_duration_seconds_count{result=\"ok\"}")? >= 1.0,
            "{first}"
        );
        ensure!(must(&first, "codafs_mount_cache_bytes")? >= big.len() as f64, "{first}");
        // Read it again from the daemon's cache, not the kernel's: drop the kernel's pages.
        let f = std::fs::File::open(&path)?;
        // SAFETY: a valid descriptor of a file we hold open; POSIX_FADV_DONTNEED only drops
        // clean cached pages.
        let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        ensure!(r == 0, "posix_fadvise: {r}");
        drop(f);
        assert_eq!(read_file(&path)?, big);
        let second = scrape(&maddr).await?;
        ensure!(
            must(&second, "codafs_mount_cache_hits_total")? > hits,
            "the second read hit the cache: {second}"
        );
        ensure!(
            must(&second, "codafs_mount_cache_misses_total")? == misses,
            "the second read fetched nothing: {second}"
        );
        ensure!(must(&second, "codafs_mount_connected")? == 1.0, "{second}");
        ensure!(
            must(&second, "codafs_mount_volume_subscribed{volume=\"www\"}")? == 1.0,
            "{second}"
        );
        ensure!(
            must(&second, "codafs_mount_fuse_requests_total{op=\"read\"}")? >= 2.0,
            "{second}"
        );

        // A change committed elsewhere arrives as a callback.
        TestCluster::write_file(&c, "www", "", "news.html", b"<p>news</p>").await?;
        let news = m.path.join("www/news.html");
        wait_until(Duration::from_secs(10), "the mount sees news.html", || {
            let p = news.clone();
            async move { std::fs::read(p).is_ok_and(|d| d == b"<p>news</p>") }
        })
        .await?;
        // A write through the mount: logged, then sent by the write-back log.
        let reply = m.control(&format!("login {}", tc.token))?;
        ensure!(reply["ok"] == true, "{reply}");
        std::fs::write(m.path.join("www/written.html"), b"through the mount")?;
        m.sync()?;
        let after = scrape(&maddr).await?;
        ensure!(
            must(&after, "codafs_mount_callbacks_total{volume=\"www\"}")? >= 1.0,
            "{after}"
        );
        ensure!(
            must(&after, "codafs_mount_callback_delay_seconds_count")? >= 1.0,
            "{after}"
        );
        ensure!(must(&after, "codafs_mount_commits_total")? >= 1.0, "{after}");
        ensure!(
            must(&after, "codafs_mount_write_back_changes_sent_total")? >= 1.0,
            "{after}"
        );
        ensure!(
            must(&after, "codafs_mount_write_back_changes")? == 0.0,
            "synced: {after}"
        );
        ensure!(
            must(&after, "codafs_mount_write_back_log_limit_bytes")? > 0.0,
            "{after}"
        );
        let packed = must(&after, "codafs_mount_cache_packed_files")?;
        ensure!(
            packed <= must(&after, "codafs_mount_cache_entries")?,
            "packed files are counted among the entries: {after}"
        );
        must(&after, "codafs_mount_cache_packs")?;

        // The servers: Raft state, blobs, RPC timings.
        let mut leaders = 0;
        let mut commits = 0.0;
        for s in &tc.servers {
            let addr = s.metrics_addr.as_deref().context("servers serve metrics")?;
            let text = scrape(addr).await?;
            ensure!(must(&text, "codafs_server_raft_applied_index")? > 0.0, "{addr}: {text}");
            ensure!(must(&text, "codafs_server_raft_commit_index")? > 0.0, "{addr}: {text}");
            ensure!(must(&text, "codafs_server_raft_term")? >= 1.0, "{addr}: {text}");
            ensure!(must(&text, "codafs_server_raft_voters")? == 3.0, "{addr}: {text}");
            let leader = must(&text, "codafs_server_raft_role{role=\"leader\"}")?;
            let follower = must(&text, "codafs_server_raft_role{role=\"follower\"}")?;
            ensure!(leader + follower == 1.0, "one role at a time: {addr}: {text}");
            leaders += leader as u32;
            ensure!(
                must(&text, "codafs_server_repair_backlog_blobs")? == 0.0,
                "{addr}: {text}"
            );
            must(&text, "codafs_server_scrubbed_blobs_total")?;
            if s.witness {
                ensure!(must(&text, "codafs_server_blobs")? == 0.0, "{addr}: {text}");
            } else {
                ensure!(must(&text, "codafs_server_blobs")? >= 1.0, "{addr}: {text}");
                ensure!(
                    must(&text, "codafs_server_blob_bytes")? >= big.len() as f64,
                    "{addr}: {text}"
                );
            }
            ensure!(
                text.lines()
                    .any(|l| l.starts_with("codafs_server_info{") && l.contains(&format!("witness=\"{}\"", s.witness))),
                "{addr}: {text}"
            );
            // Every server answered RPCs: the harness's, the mount's, or the leader's Raft calls.
            let rpcs: f64 = text
                .lines()
                .filter(|l| l.starts_with("codafs_server_rpc_duration_seconds_count{"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
            ensure!(rpcs >= 1.0, "{addr}: {text}");
            commits += value(
                &text,
                "codafs_server_rpc_duration_seconds_count{method=\"Write/Commit\"}",
            )
            .unwrap_or(0.0);
        }
        ensure!(leaders == 1, "exactly one leader, not {leaders}");
        // Two commits from the test's client and at least one from the mount (forwarded ones
        // count on the follower and on the leader).
        ensure!(commits >= 3.0, "Write/Commit timed {commits} times");

        // Only GET /metrics is served.
        let (status, _, _) = get(&maddr, "/").await?;
        ensure!(status == 404, "GET / answered {status}");
        let s0 = tc.servers[0].metrics_addr.clone().context("metrics address")?;
        let (status, _, _) = get(&s0, "/metrics/x").await?;
        ensure!(status == 404, "GET /metrics/x answered {status}");

        // `umount && codafs mount` at once: the new daemon takes the same address.
        m.umount_and_mount_at_once()?;
        let again = scrape(&maddr).await?;
        ensure!(
            must(&again, "codafs_mount_cache_entries")? >= 1.0,
            "the cache persists: {again}"
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_taken_metrics_address_fails_startup_naming_it() {
    bounded(async {
        let mut tc = TestCluster::start(ClusterOpts::new(1, 1).metrics()).await?;
        let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
        let taken_addr = taken.local_addr()?.to_string();

        // A mount: refused before it is made.
        match Mount::start(
            &tc.client_args(),
            tc.root.path(),
            "m",
            &["--metrics-listen", &taken_addr],
        ) {
            Ok(_) => bail!("a mount started with a taken metrics address"),
            Err(e) => {
                let e = format!("{e:#}");
                ensure!(e.contains(&taken_addr) && e.contains("metrics"), "{e}");
            }
        }
        ensure!(
            !std::fs::read_to_string("/proc/mounts")?.contains(&tc.root.path().join("m").display().to_string()),
            "nothing stays mounted"
        );

        // A server (the witness, stopped first): exits with an error naming the address.
        let w = 1;
        tc.servers[w].terminate(Duration::from_secs(10))?;
        let child = std::process::Command::new(codafs_bin())
            .args(["server", "--dir"])
            .arg(&tc.servers[w].dir)
            .args(["--metrics-listen", &taken_addr])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        let out = wait_output(child, Duration::from_secs(30))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success(), "the server started: {stderr}");
        ensure!(
            stderr.contains(&taken_addr) && stderr.contains("metrics"),
            "the error names the address: {stderr}"
        );
        drop(taken);

        // Started again with its own address (which replaces the saved one), it serves.
        tc.restart(w)?;
        let addr = tc.servers[w].metrics_addr.clone().context("metrics address")?;
        wait_until(Duration::from_secs(20), "the restarted server serves metrics", || {
            let addr = addr.clone();
            async move { scrape(&addr).await.is_ok() }
        })
        .await?;
        Ok(())
    })
    .await
}
