//! Hinted handoff through the witness, with real servers: 2 data servers + 1 witness and a
//! volume of write quorum 2. With one data server killed, publishing goes on (through the
//! surviving data server, and through the witness), because the witness keeps a durable hint
//! that counts toward W. The spool is bounded: past it, a put is refused and says why, and
//! nothing is committed. Restarted, the data server ends up holding every blob and the witness
//! spool drains.
use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use codafs_common::Hash;
use codafs_tests::{bounded, wait_until, ClusterOpts, Mount, Stopped, TestCluster};

/// Writes `files` (name, content) under `dir`, returning their hashes.
fn write_tree(dir: &Path, files: &[(String, Vec<u8>)]) -> Result<Vec<Hash>> {
    std::fs::create_dir_all(dir)?;
    let mut hashes = Vec::new();
    for (name, data) in files {
        std::fs::write(dir.join(name), data)?;
        hashes.push(Hash::of(data));
    }
    Ok(hashes)
}

/// Waits (at most `within`) until the server at `addr` holds every blob of `hashes`.
async fn holds_every_blob(tc: &TestCluster, addr: &str, hashes: &[Hash], within: Duration) -> Result<()> {
    wait_until(within, &format!("{addr} holds every blob"), || async {
        tc.has_blobs(addr, hashes).await.unwrap_or(false)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn publishing_goes_on_with_a_data_server_down_and_the_witness_hands_off_its_hints() {
    bounded(async {
        let mut tc = TestCluster::start(ClusterOpts::new(2, 1).arg("--spool-max", "1M")).await?;
        tc.create_volume("www", 2).await?;
        let down = tc.data_server_not_leading().await?;
        let up = tc
            .servers
            .iter()
            .enumerate()
            .position(|(i, s)| !s.witness && i != down)
            .context("the other data server")?;
        let witness = tc.servers.iter().position(|s| s.witness).context("a witness")?;
        let (down_addr, up_addr, w_addr) = (
            tc.servers[down].addr.clone(),
            tc.servers[up].addr.clone(),
            tc.servers[witness].addr.clone(),
        );
        tc.kill(down);

        // A site of small pages (sent in batches) and an image above the batch limit (streamed).
        let site = tc.root.path().join("site");
        let mut files: Vec<(String, Vec<u8>)> = (0..30)
            .map(|i| (format!("p{i}.html"), format!("page {i} ").repeat(200).into_bytes()))
            .collect();
        files.push(("logo.png".into(), (0..600_000u32).map(|i| (i % 251) as u8).collect()));
        let mut hashes = write_tree(&site, &files)?;
        let out = tc.codafs_admin(&["upload", &site.display().to_string(), "www"])?;
        ensure!(out.ok, "upload with a data server down: {}{}", out.stdout, out.stderr);

        // Both ways into the cluster: a put the surviving data server forwards (it hints the
        // witness), and one the witness relays (it keeps its own copy as the hint).
        for (via, name) in [(&up_addr, "via-data.html"), (&w_addr, "via-witness.html")] {
            let content = format!("published through {via}").repeat(50);
            TestCluster::write_file(&tc.client_on(via), "www", "", name, content.as_bytes())
                .await
                .with_context(|| format!("write through {via}"))?;
            hashes.push(Hash::of(content.as_bytes()));
        }
        ensure!(
            tc.has_blobs(&up_addr, &hashes).await?,
            "the surviving data server holds every blob"
        );
        let st = tc.status_of(&w_addr).await?;
        ensure!(
            st.spool_blobs >= hashes.len() as u64 && st.spool_limit_bytes == 1 << 20,
            "the witness holds a hint of every blob: {st:?}"
        );
        let out = tc.codafs_admin(&["cluster", "servers"])?;
        ensure!(
            out.ok && out.stdout.contains("held for data servers that are down"),
            "cluster servers shows the spool: {}{}",
            out.stdout,
            out.stderr
        );

        // The spool is bounded: a file that does not fit is refused, saying why, and not
        // committed. Pages that fit still go.
        let big = tc.root.path().join("big");
        write_tree(&big, &[("video.bin".into(), vec![7u8; 2 << 20])])?;
        let out = tc.codafs_admin(&["upload", &big.display().to_string(), "www:media"])?;
        ensure!(!out.ok, "a put past the spool's bound is refused: {}", out.stdout);
        ensure!(
            out.stderr.contains("spool is full"),
            "the refusal says why: {}",
            out.stderr
        );
        ensure!(
            tc.client().resolve(None, "www", "media/video.bin").await.is_err(),
            "nothing was committed"
        );

        // Back: the restarted data server holds every blob, and the witness has handed off and
        // dropped everything it held.
        tc.restart(down)?;
        tc.caught_up(&down_addr).await?;
        holds_every_blob(&tc, &down_addr, &hashes, Duration::from_secs(30)).await?;
        wait_until(Duration::from_secs(30), "the witness spool drains", || async {
            tc.status_of(&w_addr)
                .await
                .is_ok_and(|s| s.spool_blobs == 0 && s.spool_bytes == 0)
        })
        .await?;
        // Each data server alone serves what was published while the other was down.
        tc.kill(up);
        let logo = tc.read_on(&down_addr, "www", "logo.png").await?;
        ensure!(
            Hash::of(&logo) == hashes[30],
            "the image, from the returned server alone"
        );
        let page = tc.read_on(&down_addr, "www", "via-witness.html").await?;
        ensure!(page == format!("published through {w_addr}").repeat(50).as_bytes());
        Ok(())
    })
    .await
}

/// Without any data copy, hints do not count: with both data servers down, a put through a
/// witness fails, although two witnesses could hold two hints (the spool keeps the relayed
/// copy, to hand off later).
/// A data server that is stopped (SIGSTOP: a paused VM, a stalled disk) keeps its connections
/// and answers nothing. Publishing goes on as with a dead one: a forward it leaves unanswered
/// for a couple of seconds is stood in for by a witness's hint, and the commit check does not
/// wait on it once the other copies are counted. Before, every commit that named content
/// failed (the forward and the check each waited out their whole deadline on it, longer than
/// any client waits), and `upload` waited 30 s on it per query.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn publishing_goes_on_with_a_data_server_stopped() {
    bounded(async {
        let tc = TestCluster::start(ClusterOpts::new(2, 1)).await?;
        tc.create_volume("www", 2).await?;
        let stopped = tc.data_server_not_leading().await?;
        let up = tc
            .servers
            .iter()
            .position(|s| !s.witness && s.addr != tc.servers[stopped].addr)
            .context("the other data server")?;
        let witness = tc.servers.iter().position(|s| s.witness).context("a witness")?;
        // Both data servers hold this one before the stop: a later commit naming it again
        // needs the other copy counted without the stopped server's answer.
        TestCluster::write_file(&tc.client_on(&tc.servers[up].addr), "www", "", "old.html", b"old page").await?;
        let resume = Stopped::stop([&tc.servers[stopped]])?;
        let site = tc.root.path().join("site");
        let files: Vec<(String, Vec<u8>)> = (0..20)
            .map(|i| (format!("p{i}.html"), format!("page {i} ").repeat(100).into_bytes()))
            .chain([("old.html".to_string(), b"old page".to_vec())])
            .collect();
        let hashes = write_tree(&site, &files)?;
        let t = std::time::Instant::now();
        let out =
            tokio::task::block_in_place(|| tc.codafs_admin(&["upload", &site.display().to_string(), "www:site"]))?;
        let took = t.elapsed();
        ensure!(
            out.ok,
            "upload with a data server stopped failed after {took:?}: {}{}",
            out.stdout,
            out.stderr
        );
        // A command probes a server it has not heard from before its first put (3 s); when
        // the stopped server was the first listed, the first put waited out its 30 s deadline
        // there before.
        ensure!(took < Duration::from_secs(20), "upload took {took:?}");
        let t = std::time::Instant::now();
        TestCluster::write_file(
            &tc.client_on(&tc.servers[up].addr),
            "www",
            "",
            "new.html",
            b"a new page",
        )
        .await
        .context("a put and commit with a data server stopped")?;
        ensure!(
            t.elapsed() < Duration::from_secs(15),
            "the write took {:?}",
            t.elapsed()
        );
        let st = tc.status_of(&tc.servers[witness].addr).await?;
        ensure!(
            st.spool_blobs >= 1,
            "the witness holds hints for the stopped server: {st:?}"
        );
        drop(resume);
        // Resumed, the stopped server ends up with every blob (its forwards complete, or the
        // witness hands its hints off).
        let mut all = hashes;
        all.push(Hash::of(b"a new page"));
        holds_every_blob(&tc, &tc.servers[stopped].addr, &all, Duration::from_secs(60)).await?;
        Ok(())
    })
    .await
}

/// The Raft leader stopped (a paused VM): the others elect a new leader in seconds, and
/// publishing must go on at that pace. Before, an upload took 38 s (a hedged lookup's
/// "not found" from a follower waited out the whole deadline for the stopped server's
/// answer), and a write-back mount never got its log onto the servers (each put waited 2 s
/// for the stopped replica's copy, as long as the mount's whole deadline for the call).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn publishing_goes_on_with_the_leader_stopped() {
    bounded(async {
        let tc = TestCluster::start(ClusterOpts::new(2, 1)).await?;
        tc.create_volume("www", 2).await?;
        let leader = tc.leader().await?;
        // Both clients prefer the server that will stop: the worst case.
        let leader_addr = tc.servers[leader].addr.clone();
        let m = Mount::start(
            &tc.client_args_spread(),
            tc.root.path(),
            "node",
            &["--prefer-server", &leader_addr],
        )?;
        let reply = m.control(&format!("login {}", tc.token))?;
        ensure!(reply["ok"] == true, "{reply}");
        // The mount has talked to every server before the stop, as a running web node has.
        std::fs::write(m.path.join("www/before.html"), b"before")?;
        m.sync()?;
        let resume = Stopped::stop([&tc.servers[leader]])?;
        let site = tc.root.path().join("site");
        let files: Vec<(String, Vec<u8>)> = (0..20)
            .map(|i| {
                (
                    format!("p{i}.html"),
                    format!("leader stopped {i} ").repeat(50).into_bytes(),
                )
            })
            .collect();
        let hashes = write_tree(&site, &files)?;
        let t = std::time::Instant::now();
        let out = tokio::task::block_in_place(|| {
            tc.codafs_admin(&[
                "upload",
                "--prefer-server",
                &leader_addr,
                &site.display().to_string(),
                "www:site",
            ])
        })?;
        let took = t.elapsed();
        ensure!(
            out.ok,
            "upload with the leader stopped failed after {took:?}: {}{}",
            out.stdout,
            out.stderr
        );
        ensure!(took < Duration::from_secs(15), "upload took {took:?}");
        // Through the write-back mount: written, then on the servers.
        let page = m.path.join("www/during.html");
        std::fs::write(&page, b"written while the leader was stopped")?;
        let t = std::time::Instant::now();
        tokio::task::block_in_place(|| m.sync()).map_err(|e| anyhow::anyhow!("{e}\n{}", m.log()))?;
        ensure!(t.elapsed() < Duration::from_secs(15), "sync took {:?}", t.elapsed());
        let up = tc
            .servers
            .iter()
            .enumerate()
            .position(|(i, s)| !s.witness && i != leader)
            .context("the data server that was not stopped")?;
        let addr = tc.servers[up].addr.clone();
        ensure!(
            tc.read_on(&addr, "www", "during.html").await? == b"written while the leader was stopped",
            "the mount's change is on the servers"
        );
        ensure!(
            tc.read_on(&addr, "www", "site/p3.html").await? == files[3].1,
            "the upload is on the servers"
        );
        drop(resume);
        holds_every_blob(&tc, &leader_addr, &hashes, Duration::from_secs(60)).await?;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hints_alone_do_not_make_a_quorum() {
    bounded(async {
        let mut tc = TestCluster::start(ClusterOpts::new(2, 2)).await?;
        tc.create_volume("www", 2).await?;
        let witness = tc.servers.iter().position(|s| s.witness).context("a witness")?;
        let w_addr = tc.servers[witness].addr.clone();
        for i in 0..tc.servers.len() {
            if !tc.servers[i].witness {
                tc.kill(i);
            }
        }
        let r = tc
            .client_on(&w_addr)
            .put_content(b"no data server to hold this", 2)
            .await;
        let err = r.err().context("a put with no data server up must fail")?;
        ensure!(err.to_string().contains("copies"), "{err}");
        Ok(())
    })
    .await
}

/// A mount's change stream goes through a server that then stops (SIGSTOP: its connection
/// stays open and brings nothing). The stream's ticks stop, the mount subscribes to another
/// server, and a change committed meanwhile reaches the mount's cache hits, which need no
/// server, within a few seconds: not when (or if) the connection's keepalive notices, which
/// the log line tells apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cache_hits_see_changes_with_the_stream_server_stopped() {
    bounded(async {
        let tc = TestCluster::start(ClusterOpts::new(2, 1)).await?;
        tc.create_volume("www", 2).await?;
        let leader = tc.leader().await?;
        let writer = tc.client_on(&tc.servers[leader].addr);
        TestCluster::write_file(&writer, "www", "", "page.html", b"one").await?;
        let follower = tc.data_server_not_leading().await?;
        let m = Mount::start(
            &tc.client_args_spread(),
            tc.root.path(),
            "web",
            &["--read-only", "--prefer-server", &tc.servers[follower].addr],
        )?;
        let page = m.path.join("www/page.html");
        ensure!(std::fs::read(&page)? == b"one");
        // The stream is open on the follower (it carried nothing yet) when that server stops.
        let follower_addr = tc.servers[follower].addr.clone();
        let admin = tc.client_on(&follower_addr);
        wait_until(
            Duration::from_secs(20),
            "the mount's stream on the follower",
            || async {
                admin
                    .get_volume_on(&follower_addr, "www")
                    .await
                    .is_ok_and(|v| !v.subscribers.is_empty())
            },
        )
        .await?;
        let resume = Stopped::stop([&tc.servers[follower]])?;
        TestCluster::write_file(&writer, "www", "", "page.html", b"two").await?;
        let committed = std::time::Instant::now();
        wait_until(Duration::from_secs(30), "the mount serves the new content", || async {
            std::fs::read(&page).is_ok_and(|b| b == b"two")
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", m.log()))?;
        let took = committed.elapsed();
        ensure!(
            m.log().contains("change stream silent; subscribing elsewhere"),
            "the mount noticed the silence (after {took:?}):\n{}",
            m.log()
        );
        ensure!(
            // Silence (3 s) and a probe of the server (1 s), then a new stream elsewhere.
            took < Duration::from_secs(10),
            "the change took {took:?} to reach the mount"
        );
        drop(resume);
        Ok(())
    })
    .await
}
