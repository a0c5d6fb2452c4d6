//! The per-volume change stream (what client callbacks are built on), against real servers:
//! live delivery, resuming from a saved version on a different replica, and a real mount
//! applying a change to one entry of a big directory without listing it again.
use std::time::Duration;

use anyhow::{Context, Result};
use codafs_client::ops;
use codafs_client::Cluster;
use codafs_proto::pb;
use codafs_tests::{fs_call, wait_until, ClusterOpts, Mount, TestCluster};

async fn subscribe(c: &Cluster, volume: &str, from: u64) -> Result<tonic::Streaming<pb::ChangeEvent>> {
    Ok(c.call(|ch| {
        let mut r = tonic::Request::new(pb::SubscribeRequest {
            volume: volume.into(),
            from_version: from,
            tick_ms: 0,
        });
        r.set_timeout(Duration::from_secs(60));
        async move { Cluster::meta(ch).subscribe(r).await.map(|r| r.into_inner()) }
    })
    .await?)
}

async fn next(s: &mut tonic::Streaming<pb::ChangeEvent>) -> Result<pb::ChangeEvent> {
    tokio::time::timeout(Duration::from_secs(10), s.message())
        .await
        .context("no change event within 10 s")??
        .context("stream ended")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn changes_stream_live_and_resume_on_another_replica() {
    let run = async {
        let tc = TestCluster::start(ClusterOpts::new(2, 1)).await?;
        let vol = tc.create_volume("www", 2).await?;
        // Live: subscribe on server 0, commit through server 1.
        let mut live = subscribe(&tc.client_on(&tc.servers[0].addr), "www", vol.version).await?;
        let writer = tc.client_on(&tc.servers[1].addr);
        let v1 = TestCluster::write_file(&writer, "www", "", "a.html", b"a").await?;
        let ev = next(&mut live).await?;
        assert_eq!(ev.version, v1);
        assert!(!ev.history_gone);
        assert!(ev.dirs.contains(&vol.root_ino), "root directory changed: {ev:?}");
        let a = tc
            .resolve_on(&tc.servers[0].addr, "www", "a.html")
            .await?
            .attr
            .context("attr")?;
        assert!(ev.inos.contains(&a.ino), "{ev:?}");
        // The event names the one name the commit made, so mounts patch their listings.
        assert!(ev.names_complete, "{ev:?}");
        assert_eq!(
            ev.names,
            [pb::NameChange {
                dir: vol.root_ino,
                name: "a.html".into(),
                ino: a.ino,
                kind: pb::ObjectKind::File as i32,
            }]
        );
        // Replacing the content reports the same node id under a new version.
        let v2 = TestCluster::write_file(&writer, "www", "", "a.html", b"a2").await?;
        let ev = next(&mut live).await?;
        assert_eq!(ev.version, v2);
        // Resume: three more commits, then subscribe on the witness from v2; all three arrive, in order.
        let mut expect = Vec::new();
        for i in 0..3 {
            expect.push(TestCluster::write_file(&writer, "www", "", &format!("r{i}"), b"r").await?);
        }
        let mut resumed = subscribe(&tc.client_on(&tc.servers[2].addr), "www", v2).await?;
        for v in &expect {
            assert_eq!(next(&mut resumed).await?.version, *v);
        }
        // Unknown volumes are refused, not streamed.
        assert!(subscribe(&tc.client(), "nope", 0).await.is_err());
        Ok::<_, anyhow::Error>(())
    };
    codafs_tests::bounded_within(Duration::from_secs(120), run).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopping_server_ends_its_change_streams_and_every_task() {
    codafs_tests::bounded(async {
        let mut tc = TestCluster::start(ClusterOpts::new(2, 1)).await?;
        tc.create_volume("www", 2).await?;
        let written = TestCluster::write_file(&tc.client(), "www", "", "a.html", b"one").await?;
        // Two open change streams on server 1, as two mounts would hold them.
        let c1 = tc.client_for(&tc.addrs()[1..2]);
        let mut streams = vec![subscribe(&c1, "www", 0).await?, subscribe(&c1, "www", 0).await?];
        for s in &mut streams {
            next(s).await?;
        }
        // A clean stop ends the streams (their tasks stop with the server) and every other
        // background task, within the shutdown deadline (5 s), and exits with success.
        let (took, ok) = tc.servers[1].terminate(Duration::from_secs(10))?;
        assert!(
            ok,
            "server 1 exited with an error after SIGTERM:\n{}",
            tc.servers[1].log()
        );
        let log = tc.servers[1].log();
        assert!(
            log.contains("every background task ended"),
            "after {took:?}, the log does not say every task ended:\n{log}"
        );
        // Each stream ends. What it delivers first is only the backlog it was sent before the
        // stop (up to the last write), which may still sit in the client's buffers.
        for s in &mut streams {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                let end = tokio::time::timeout_at(deadline, s.message())
                    .await
                    .context("a change stream outlived its server")?;
                match end {
                    Ok(Some(ev)) => assert!(
                        ev.version <= written,
                        "a new event from a stopped server: {ev:?} (last write {written})"
                    ),
                    Ok(None) | Err(_) => break,
                }
            }
        }
        // The others serve on.
        assert_eq!(tc.read_on(&tc.servers[0].addr, "www", "a.html").await?, b"one");
        Ok(())
    })
    .await
}

/// The names in a directory of a mount, sorted (bounded in time).
fn names_in(dir: &std::path::Path) -> Result<Vec<String>> {
    let dir = dir.to_path_buf();
    let mut names = fs_call(Duration::from_secs(30), move || {
        std::fs::read_dir(dir)?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<std::io::Result<Vec<String>>>()
    })??;
    names.sort();
    Ok(names)
}

/// A change to one entry of a 3,000-entry directory reaches a mount that listed it, and the
/// mount shows the new listing without any server listing the directory again: the event
/// carries the names it changed, and the mount patches its cached listing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mount_applies_a_change_to_one_entry_without_listing_the_directory_again() {
    let run = async {
        let tc = TestCluster::start(ClusterOpts::new(2, 1).metrics()).await?;
        tc.create_volume("www", 2).await?;
        let c = tc.client();
        c.put_content(b"page", 2).await?;
        let mut batch = vec![ops::dir("big", 0o755)];
        let mut expect: Vec<String> = (0..3000).map(|i| format!("p{i:04}.html")).collect();
        batch.extend(expect.iter().map(|n| ops::file(&format!("big/{n}"), b"page", 0o644)));
        c.commit(ops::commit("www", batch)).await?;

        let mdir = tempfile::tempdir()?;
        let m = Mount::start(&tc.client_args(), mdir.path(), "web", &["--read-only"])?;
        let big = m.path.join("www/big");
        assert_eq!(names_in(&big)?, expect);
        let metrics: Vec<String> = tc.servers.iter().filter_map(|s| s.metrics_addr.clone()).collect();
        assert_eq!(metrics.len(), 3);
        let listed = codafs_tests::http::rpc_count(&metrics, "Meta/ReadDir").await?;
        assert!(listed >= 1.0, "the first listing came from a server");

        // Elsewhere: one page removed, one added, in one commit.
        c.put_content(b"new", 2).await?;
        let change = vec![ops::remove("big/p0001.html"), ops::file("big/new.html", b"new", 0o644)];
        c.commit(ops::commit("www", change)).await?;
        expect.retain(|n| n != "p0001.html");
        expect.push("new.html".into());
        expect.sort();
        wait_until(Duration::from_secs(10), "the mount shows the change", || {
            let (gone, added) = (big.join("p0001.html"), big.join("new.html"));
            async move { !gone.exists() && added.exists() }
        })
        .await?;
        assert_eq!(names_in(&big)?, expect);
        assert_eq!(codafs_tests::read_file(&big.join("new.html"))?, b"new");
        let again = codafs_tests::http::rpc_count(&metrics, "Meta/ReadDir").await?;
        assert_eq!(again, listed, "no server listed the directory again");
        Ok::<_, anyhow::Error>(())
    };
    codafs_tests::bounded_within(Duration::from_secs(120), run).await;
}
