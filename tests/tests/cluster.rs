//! End-to-end tests of the replicated server core with real `codafs server` processes.
use std::time::Duration;

use anyhow::Context;
use codafs_client::transport::BlobRef;
use codafs_common::Hash;
use codafs_proto::error::ErrorKind;
use codafs_proto::pb;
use codafs_tests::{bounded, wait_until, ClusterOpts, TestCluster};

/// Whole-test deadline: a hung test fails with a message instead of running into CI's limit.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn commit_is_readable_from_every_replica_with_witness() {
    bounded(async {
        let tc = TestCluster::start(ClusterOpts::new(2, 1)).await?;
        tc.create_volume("www", 2).await?;
        let c = tc.client();
        let v = TestCluster::write_file(&c, "www", "", "index.html", b"<h1>hello</h1>").await?;
        for s in &tc.servers {
            // Metadata from every server (witness included), once it has applied the commit.
            wait_until(Duration::from_secs(10), "replica applies the commit", || async {
                tc.resolve_on(&s.addr, "www", "index.html")
                    .await
                    .is_ok_and(|r| r.applied_index >= v)
            })
            .await?;
            let r = tc.resolve_on(&s.addr, "www", "index.html").await?;
            let attr = r.attr.context("attr")?;
            assert_eq!(attr.size, 14);
            assert_eq!(attr.version, v);
            if !s.witness {
                assert_eq!(tc.read_on(&s.addr, "www", "index.html").await?, b"<h1>hello</h1>");
            } else {
                let st = tc.status_of(&s.addr).await?;
                assert_eq!(st.blob_count, 0, "a witness stores no blobs");
            }
        }
        // The volume's version stamp is the commit's log index.
        let stamps = c
            .call(|ch| {
                let r = c.request(pb::VolumeStampsRequest {
                    volumes: vec!["www".into(), "nope".into()],
                });
                async move {
                    codafs_client::Cluster::meta(ch)
                        .volume_stamps(r)
                        .await
                        .map(|r| r.into_inner())
                }
            })
            .await?;
        assert_eq!(stamps.stamps[0].version, v);
        assert!(stamps.stamps[0].exists && !stamps.stamps[1].exists);
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_kill_elects_new_leader_and_any_survivor_accepts_commits() {
    bounded(async {
        let mut tc = TestCluster::start(ClusterOpts::new(3, 0)).await?;
        tc.create_volume("www", 2).await?;
        let old = tc.leader().await?;
        tc.kill(old);
        let new = tc.wait_leader(Duration::from_secs(15)).await?;
        assert_ne!(new, old);
        for (i, s) in tc.servers.iter().enumerate().filter(|(i, _)| *i != old) {
            let c = tc.client_on(&s.addr);
            let name = format!("after-failover-{i}.html");
            TestCluster::write_file(&c, "www", "", &name, name.as_bytes())
                .await
                .with_context(|| format!("commit via {}", s.addr))?;
            assert_eq!(tc.read_on(&s.addr, "www", &name).await?, name.as_bytes());
        }
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_commits_survive_a_data_replica_crash() {
    bounded(async {
        let mut tc = TestCluster::start(ClusterOpts::new(3, 0)).await?;
        tc.create_volume("www", 2).await?;
        let c = tc.client();
        let victim = (tc.leader().await? + 1) % 3;
        let mut acked = Vec::new();
        for i in 0..40u32 {
            if i == 15 {
                tc.kill(victim);
            }
            let content = format!("page {i} {}", "x".repeat(i as usize * 100));
            // A commit may fail while the cluster notices the crash; only acknowledged ones count.
            if TestCluster::write_file(&c, "www", "", &format!("p{i}"), content.as_bytes())
                .await
                .is_ok()
            {
                acked.push((format!("p{i}"), content));
            }
        }
        assert!(
            acked.len() >= 30,
            "most commits succeed with 2 of 3 replicas up: {}",
            acked.len()
        );
        tc.restart(victim)?;
        let addr = tc.servers[victim].addr.clone();
        let hashes: Vec<Hash> = acked.iter().map(|(_, c)| Hash::of(c.as_bytes())).collect();
        wait_until(
            Duration::from_secs(30),
            "restarted replica repairs every blob",
            || async { tc.has_blobs(&addr, &hashes).await.unwrap_or(false) },
        )
        .await?;
        for s in &tc.servers {
            for (name, content) in &acked {
                wait_until(Duration::from_secs(10), "replica has the file", || async {
                    tc.resolve_on(&s.addr, "www", name).await.is_ok()
                })
                .await?;
                assert_eq!(
                    tc.read_on(&s.addr, "www", name).await?,
                    content.as_bytes(),
                    "{name} on {}",
                    s.addr
                );
            }
        }
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn long_down_replica_catches_up_by_snapshot_and_fetches_blobs() {
    bounded(async {
        let opts = ClusterOpts::new(3, 0).arg("--snapshot-every", "20");
        let mut tc = TestCluster::start(opts).await?;
        tc.create_volume("www", 2).await?;
        let leader = tc.leader().await?;
        let down = (leader + 1) % 3;
        tc.kill(down);
        let c = tc.client();
        let mut last = 0;
        for i in 0..80u32 {
            last = TestCluster::write_file(&c, "www", "", &format!("f{i}"), format!("content {i}").as_bytes()).await?;
        }
        let st = tc.status_of(&tc.servers[leader].addr).await?;
        assert!(st.snapshot_index > 0, "leader built a snapshot: {st:?}");
        tc.restart(down)?;
        let addr = tc.servers[down].addr.clone();
        wait_until(
            Duration::from_secs(30),
            "restarted replica applies everything",
            || async { tc.status_of(&addr).await.is_ok_and(|s| s.applied_index >= last) },
        )
        .await?;
        let st = tc.status_of(&addr).await?;
        assert!(st.snapshot_index > 0, "caught up by installing a snapshot: {st:?}");
        let hashes: Vec<Hash> = (0..80).map(|i| Hash::of(format!("content {i}").as_bytes())).collect();
        wait_until(
            Duration::from_secs(30),
            "caught-up replica fetches missing blobs",
            || async { tc.has_blobs(&addr, &hashes).await.unwrap_or(false) },
        )
        .await?;
        assert_eq!(tc.read_on(&addr, "www", "f79").await?, b"content 79");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn corrupt_blob_is_never_served_and_is_repaired() {
    bounded(async {
        let tc = TestCluster::start(ClusterOpts::new(2, 1)).await?;
        tc.create_volume("www", 2).await?;
        let c = tc.client();
        let target = &tc.servers[0];
        let only = tc.client_on(&target.addr);
        // Writes `name`, damages its stored copy on `target` with `damage`, and checks that
        // reading from that replica alone fails (never the bad bytes) and that the replica then
        // quarantines the copy and repairs it from its peer.
        let damaged = |name: &'static str, content: Vec<u8>, damage: fn(&mut Vec<u8>)| {
            let (tc, c, only) = (&tc, &c, &only);
            async move {
                TestCluster::write_file(c, "www", "", name, &content).await?;
                let attr = tc
                    .resolve_on(&target.addr, "www", name)
                    .await?
                    .attr
                    .context("no attr")?;
                let blob = BlobRef::of(&attr)?;
                assert_eq!(blob.hash, Hash::of(&content));
                assert_eq!(only.get_blob(&blob).await?, content, "an intact copy is served whole");
                let hex = blob.hash.to_hex();
                let path = target
                    .dir
                    .join("blobs/data")
                    .join(&hex[..2])
                    .join(&hex[2..4])
                    .join(&hex);
                let mut bytes = std::fs::read(&path)?;
                damage(&mut bytes);
                std::fs::write(&path, &bytes)?;
                let r = only.get_blob(&blob).await;
                assert!(r.is_err(), "{name}: a damaged copy must not be served");
                wait_until(Duration::from_secs(20), "the damaged copy repaired", || async {
                    only.get_blob(&blob).await.is_ok_and(|d| d == content)
                })
                .await
            }
        };
        let content = b"precious content that must never be served corrupt".repeat(1000);
        damaged("a.bin", content, |b| b[1000] ^= 0xff).await?;
        let st = tc.status_of(&target.addr).await?;
        assert!(st.corrupt_found >= 1, "{st:?}");
        // A blob of three 1 MiB chunks (all but the last sent before it verified) whose stored
        // copy is one byte longer, then one byte shorter, than it should be.
        let big: Vec<u8> = (0..(5 << 19) + 3).map(|i| (i % 251) as u8).collect();
        damaged("longer.bin", big.clone(), |b| b.push(0)).await?;
        let mut other = big;
        other[0] ^= 1;
        damaged("shorter.bin", other, |b| b.truncate(b.len() - 1)).await?;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn minority_cannot_commit() {
    bounded(async {
        let mut tc = TestCluster::start(ClusterOpts::new(3, 0)).await?;
        tc.create_volume("www", 1).await?;
        let leader = tc.leader().await?;
        let survivor = (leader + 1) % 3;
        for i in 0..3 {
            if i != survivor {
                tc.kill(i);
            }
        }
        let c = tc.client_on(&tc.servers[survivor].addr);
        let t = std::time::Instant::now();
        // Metadata only, so nothing but consensus can refuse it.
        let r = TestCluster::mkdir(&c, "www", "", "nope").await;
        let e = r.expect_err("a single server out of three must not commit");
        eprintln!("minority commit refused after {:?}: {e:#}", t.elapsed());
        let code = e.downcast_ref::<codafs_client::ClientError>().map(|e| e.code());
        assert_eq!(code, Some(tonic::Code::Unavailable), "{e:#}");
        // Reads still work on the survivor (follower reads), and nothing was committed.
        assert!(tc.resolve_on(&tc.servers[survivor].addr, "www", "nope").await.is_err());
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_requests_get_clear_errors_and_change_nothing() {
    bounded(async {
        let tc = TestCluster::start(ClusterOpts::new(1, 0)).await?;
        let vol = tc.create_volume("www", 1).await?;
        let c = tc.client();
        // A commit referencing a blob nobody uploaded is refused.
        let op = |name: &str, hash: &[u8]| pb::Op {
            expect_version: None,
            op: Some(pb::op::Op::Create(pb::CreateOp {
                parent: Some(pb::NodeRef {
                    target: Some(pb::node_ref::Target::Path(String::new())),
                }),
                name: name.into(),
                kind: pb::ObjectKind::File as i32,
                hash: bytes::Bytes::copy_from_slice(hash),
                size: 1,
                ..Default::default()
            })),
        };
        let commit = |ops| pb::CommitRequest {
            volume: "www".into(),
            ops,
            expect_volume_version: None,
            request_id: Default::default(),
        };
        let e = c
            .commit(commit(vec![op("a", &Hash::of(b"never uploaded").0)]))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("copies"), "{e}");
        assert_eq!(e.kind(), ErrorKind::NotEnoughCopies, "{e}");
        // Every refusal names its kind (the error contract), next to the code it implies.
        let long = "x".repeat(256);
        for (bad, kind) in [
            ("..", ErrorKind::InvalidName),
            (".", ErrorKind::InvalidName),
            ("a/b", ErrorKind::InvalidName),
            ("a\0b", ErrorKind::InvalidName),
            (long.as_str(), ErrorKind::NameTooLong),
        ] {
            c.put_blob(bytes::Bytes::from_static(b"1"), 1).await?;
            let e = c.commit(commit(vec![op(bad, &Hash::of(b"1").0)])).await.unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad:?}: {e}");
            assert_eq!(e.kind(), kind, "{bad:?}: {e}");
        }
        let e = c.commit(commit(vec![op("short", &[1, 2, 3])])).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert_eq!(e.kind(), ErrorKind::Invalid);
        // A forged token is refused.
        let forged = codafs_client::Cluster::new(
            &tc.addrs(),
            tc.tls.clone(),
            Some(format!("{}x", &tc.token[..tc.token.len() - 1])),
        )?;
        let e = forged
            .commit(commit(vec![op("f", &Hash::of(b"1").0)]))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e}");
        let anon = codafs_client::Cluster::new(&tc.addrs(), tc.tls.clone(), None)?;
        assert_eq!(
            anon.commit(commit(vec![op("f", &Hash::of(b"1").0)]))
                .await
                .unwrap_err()
                .code(),
            tonic::Code::Unauthenticated
        );
        // Nothing changed.
        let info = tc.volume_info("www").await?;
        assert_eq!((info.version, info.used_files), (vol.version, 0));
        c.commit(commit(vec![op("taken", &Hash::of(b"1").0)])).await?;
        let e = c
            .commit(commit(vec![op("taken", &Hash::of(b"1").0)]))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Exists, "{e}");
        Ok(())
    })
    .await
}

/// A recursive remove of a tree larger than `MAX_REMOVE_NODES` is refused by the leader with a
/// clear error and removes nothing (the state machine would delete it in one step, holding up
/// every volume), and so is deleting its volume; removed in parts, the same tree goes, and then
/// the volume.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_recursive_remove_of_a_huge_tree_is_refused_and_goes_in_parts() {
    use codafs_client::ops;
    use codafs_proto::limits::{MAX_COMMIT_OPS, MAX_REMOVE_NODES};
    codafs_tests::bounded_within(Duration::from_secs(300), async {
        let tc = TestCluster::start(ClusterOpts::new(2, 1)).await?;
        tc.create_volume("big", 2).await?;
        let mut c = tc.client();
        c.policy.call_timeout = Duration::from_secs(120);
        // `top` with MAX_REMOVE_NODES + 1 nodes below it: directories, no blobs involved.
        let names: Vec<String> = (0..=MAX_REMOVE_NODES).map(|i| format!("top/d{i:06}")).collect();
        let mut first = vec![ops::dir("top", 0o755)];
        first.extend(names[..MAX_COMMIT_OPS - 1].iter().map(|n| ops::dir(n, 0o755)));
        c.commit(ops::commit("big", first)).await?;
        let rest = names[MAX_COMMIT_OPS - 1..].iter().map(|n| ops::dir(n, 0o755)).collect();
        c.commit(ops::commit("big", rest)).await?;
        let before = tc.volume_info("big").await?.used_files;
        anyhow::ensure!(before as usize == MAX_REMOVE_NODES + 2, "{before} nodes");
        let e = c
            .commit(ops::commit("big", vec![ops::remove("top")]))
            .await
            .expect_err("too many nodes for one commit");
        anyhow::ensure!(e.code() == tonic::Code::InvalidArgument, "{e}");
        anyhow::ensure!(
            e.to_string()
                .contains(&format!("more than {MAX_REMOVE_NODES} files and directories")),
            "{e}"
        );
        // Deleting the whole volume is refused the same way: it would drop every node in one
        // apply.
        let e = c.delete_volume("big").await.expect_err("too many nodes for one delete");
        anyhow::ensure!(e.to_string().contains("empty it first"), "{e}");
        anyhow::ensure!(tc.volume_info("big").await?.used_files == before, "nothing removed");
        // In parts: two entries first, then the rest of the tree at the limit.
        let two = names[..2].iter().map(|n| ops::remove(n)).collect();
        c.commit(ops::commit("big", two)).await?;
        c.commit(ops::commit("big", vec![ops::remove("top")])).await?;
        anyhow::ensure!(tc.volume_info("big").await?.used_files == 0, "all gone");
        c.delete_volume("big").await?;
        Ok(())
    })
    .await
}

/// A directory rename walks up from its destination to the volume root when applied, so a
/// commit of many renames into a deep tree would hold up every volume on every replica while it
/// applies. The leader measures such a commit on a scratch copy of its state and refuses it
/// past `fsm::cost::APPLY_READS` (4 million) records read, changing nothing; fewer of the same
/// renames go.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_commit_too_costly_to_apply_is_refused_and_smaller_ones_go() {
    use codafs_client::ops;
    codafs_tests::bounded_within(Duration::from_secs(300), async {
        let tc = TestCluster::start(ClusterOpts::new(2, 1)).await?;
        tc.create_volume("deep", 2).await?;
        let mut c = tc.client();
        c.policy.call_timeout = Duration::from_secs(120);
        // A chain of directories 1,000 deep (paths stop at 256 components: each level is
        // created below the one before by its reserved node id), and 5,000 directories at the
        // root.
        let reserve = pb::Op {
            expect_version: None,
            op: Some(pb::op::Op::Reserve(pb::ReserveOp { count: 1000 })),
        };
        let first = c.commit(ops::commit("deep", vec![reserve])).await?.created[0];
        let level = |k: u64| {
            let mut op = ops::dir("d", 0o755);
            if let Some(pb::op::Op::Create(create)) = &mut op.op {
                if k > 0 {
                    create.parent = Some(pb::NodeRef {
                        target: Some(pb::node_ref::Target::Ino(first + k - 1)),
                    });
                }
                create.ino = Some(first + k);
            }
            op
        };
        c.commit(ops::commit("deep", (0..1000).map(level).collect())).await?;
        let beside = (0..5000).map(|i| ops::dir(&format!("m{i}"), 0o755)).collect();
        c.commit(ops::commit("deep", beside)).await?;
        let bottom = first + 999;
        let into_bottom = |i: usize| pb::Op {
            expect_version: None,
            op: Some(pb::op::Op::Rename(pb::RenameOp {
                from_parent: ops::at(""),
                from_name: format!("m{i}"),
                to_parent: Some(pb::NodeRef {
                    target: Some(pb::node_ref::Target::Ino(bottom)),
                }),
                to_name: format!("m{i}"),
            })),
        };
        // 5,000 renames, each walking 1,000 levels: 5 million reads.
        let before = tc.volume_info("deep").await?.version;
        let e = match c
            .commit(ops::commit("deep", (0..5000).map(into_bottom).collect()))
            .await
        {
            Ok(r) => anyhow::bail!("5,000 renames into the deep tree applied as version {}", r.version),
            Err(e) => e,
        };
        anyhow::ensure!(e.code() == tonic::Code::InvalidArgument, "{e}");
        anyhow::ensure!(e.to_string().contains("records when applied"), "{e}");
        anyhow::ensure!(tc.volume_info("deep").await?.version == before, "nothing changed");
        // 1,000 of them: measured too (their bound passes the limit), about a million reads.
        c.commit(ops::commit("deep", (0..1000).map(into_bottom).collect()))
            .await?;
        let addr = tc.servers[0].addr.clone();
        tc.caught_up(&addr).await?;
        let gone = tc.resolve_on(&addr, "deep", "m0").await;
        anyhow::ensure!(gone.is_err(), "m0 moved away from the root");
        tc.resolve_on(&addr, "deep", "m1000").await?;
        Ok(())
    })
    .await
}

/// Node ids set aside by `Reserve` are never given back: a commit of many reservations could
/// use up a volume's ids in a few dozen commits, after which nothing could be created in it.
/// One commit reserves at most `MAX_RESERVE` (65,536) ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_commit_reserves_at_most_one_batch_of_node_ids() {
    use codafs_client::ops;
    bounded(async {
        let tc = TestCluster::start(ClusterOpts::new(2, 0)).await?;
        tc.create_volume("www", 2).await?;
        let c = tc.client();
        let reserve = |count| pb::Op {
            expect_version: None,
            op: Some(pb::op::Op::Reserve(pb::ReserveOp { count })),
        };
        let before = tc.volume_info("www").await?.version;
        let e = match c.commit(ops::commit("www", vec![reserve(65_536), reserve(1)])).await {
            Ok(r) => anyhow::bail!("65,537 ids reserved in one commit (version {})", r.version),
            Err(e) => e,
        };
        anyhow::ensure!(e.code() == tonic::Code::InvalidArgument, "{e}");
        anyhow::ensure!(e.to_string().contains("65537 node ids reserved in one commit"), "{e}");
        anyhow::ensure!(tc.volume_info("www").await?.version == before, "nothing committed");
        let r = c.commit(ops::commit("www", vec![reserve(65_536)])).await?;
        anyhow::ensure!(r.created.first().is_some_and(|f| *f > 0), "{:?}", r.created.first());
        Ok(())
    })
    .await
}
