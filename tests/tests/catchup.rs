//! A Raft follower that was down while several maximum-size commits were made catches up once
//! it is back: the leader splits the backlog into batches that fit a Raft message and carries
//! each large entry to completion instead of retrying it forever.
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use codafs_client::ops;
use codafs_proto::limits::{MAX_COMMIT_OPS, MAX_MESSAGE, MAX_RAFT_MESSAGE};
use codafs_proto::pb;
use codafs_tests::{bounded_within, wait_until, ClusterOpts, TestCluster};
use prost::Message;

/// Commits made while the follower is down.
const COMMITS: usize = 5;
/// Bytes of each commit: near the most a commit may be ([`MAX_MESSAGE`]).
const COMMIT_BYTES: usize = MAX_MESSAGE * 15 / 16;
/// How long the follower may take to catch up.
const CATCH_UP: Duration = Duration::from_secs(120);

/// One commit of `COMMIT_BYTES`: symlinks with the longest targets allowed (4096 bytes), which
/// reaches the size limit with far fewer operations (and far less applying) than small ops.
fn big_commit(k: usize) -> pb::CommitRequest {
    let target = "t".repeat(4096);
    let one = ops::symlink(&format!("c{k}-000000"), &target).encoded_len() + 4;
    let n = (COMMIT_BYTES / one).min(MAX_COMMIT_OPS);
    let ops = (0..n).map(|i| ops::symlink(&format!("c{k}-{i:06}"), &target)).collect();
    ops::commit("big", ops)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_behind_by_several_maximum_size_commits_catches_up() {
    bounded_within(Duration::from_secs(420), async {
        let mut tc = TestCluster::start(ClusterOpts::new(2, 1)).await?;
        tc.create_volume("big", 2).await?;
        let leader = tc.wait_leader(Duration::from_secs(30)).await?;
        let behind = (0..2)
            .find(|i| *i != leader)
            .context("a data server that does not lead")?;
        tc.kill(behind);
        let up: Vec<String> = tc
            .servers
            .iter()
            .filter(|s| s.is_running())
            .map(|s| s.addr.clone())
            .collect();
        let mut c = tc.client_for(&up);
        c.policy.call_timeout = Duration::from_secs(120);
        for k in 0..COMMITS {
            let commit = big_commit(k);
            let bytes = commit.encoded_len();
            ensure!(
                bytes > MAX_MESSAGE * 7 / 8 && bytes < MAX_MESSAGE,
                "commit {k} is {bytes} bytes, not near the limit of {MAX_MESSAGE}"
            );
            c.commit(commit)
                .await
                .with_context(|| format!("commit {k} of {bytes} bytes"))?;
        }
        ensure!(
            COMMITS * COMMIT_BYTES > MAX_RAFT_MESSAGE,
            "the backlog must not fit one Raft message"
        );
        let leader = tc.leader().await?;
        let target = tc.status_of(&tc.servers[leader].addr).await?.applied_index;

        tc.restart(behind)?;
        let addr = tc.servers[behind].addr.clone();
        let start = Instant::now();
        wait_until(
            CATCH_UP,
            "the restarted follower to apply the leader's last commit",
            || {
                let (tc, addr) = (&tc, addr.clone());
                async move { tc.status_of(&addr).await.is_ok_and(|s| s.applied_index >= target) }
            },
        )
        .await?;
        ensure!(start.elapsed() < CATCH_UP);
        let last = format!("c{}-000000", COMMITS - 1);
        let attr = tc.resolve_on(&addr, "big", &last).await?;
        ensure!(attr.attr.is_some(), "{last} missing on the follower that caught up");
        Ok(())
    })
    .await
}
