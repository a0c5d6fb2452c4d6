//! Volume administration through the real `codafs` CLI and servers: backup (whole, to stdout,
//! incremental), delete and restore, with the restored namespace and contents compared to the
//! original node by node, and bad archives and unconfirmed deletes refused without change.
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use codafs_client::ops;
use codafs_client::transport::BlobRef;
use codafs_client::Cluster;
use codafs_proto::pb;
use codafs_tests::{ClusterOpts, TestCluster};

/// What a node looks like from outside: everything a restore must bring back.
#[derive(Debug, PartialEq, Eq)]
struct Shown {
    kind: i32,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime_ns: i64,
    size: u64,
    hash: Vec<u8>,
    symlink: String,
    nlink: u32,
    rdev: u64,
}

/// Every node of `volume` by path, and for each hard-linked node the paths sharing it.
async fn tree(c: &Cluster, volume: &str) -> Result<(BTreeMap<String, Shown>, Vec<Vec<String>>)> {
    let root = c.resolve(None, volume, "").await?.attr.context("root attributes")?;
    let mut out = BTreeMap::new();
    let mut by_ino: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    let show = |a: &pb::Attr| Shown {
        kind: a.kind,
        mode: a.mode,
        uid: a.uid,
        gid: a.gid,
        mtime_ns: a.mtime_ns,
        size: a.size,
        hash: a.hash.to_vec(),
        symlink: a.symlink_target.clone(),
        nlink: a.nlink,
        rdev: a.rdev,
    };
    out.insert(String::new(), show(&root));
    let mut stack = vec![(root.ino, String::new())];
    while let Some((ino, path)) = stack.pop() {
        for (name, a) in c.read_dir_all(ino).await? {
            let p = if path.is_empty() {
                name
            } else {
                format!("{path}/{name}")
            };
            if a.kind == pb::ObjectKind::Directory as i32 {
                stack.push((a.ino, p.clone()));
            } else if a.nlink > 1 {
                by_ino.entry(a.ino).or_default().push(p.clone());
            }
            out.insert(p, show(&a));
        }
    }
    Ok((out, by_ino.into_values().collect()))
}

/// The content of file `path` of `volume`, read back through the servers.
async fn content(c: &Cluster, volume: &str, path: &str) -> Result<Vec<u8>> {
    let a = c.resolve(None, volume, path).await?.attr.context("attributes")?;
    Ok(c.get_content(&BlobRef::of(&a)?, a.size).await?)
}

/// `codafs ARGS` as the admin; returns (ok, stdout, stderr).
fn cli(tc: &TestCluster, args: &[&str]) -> Result<(bool, String, String)> {
    let out = tc.codafs_admin(args)?;
    Ok((out.ok, out.stdout, out.stderr))
}

/// `codafs volume backup VOLUME - [extra]` with stdout into `file` (binary, so not through
/// the string-capturing helper).
fn backup_to_stdout(tc: &TestCluster, volume: &str, file: &Path, extra: &[&str]) -> Result<()> {
    let out = std::fs::File::create(file)?;
    let mut cmd = Command::new(codafs_tests::codafs_bin());
    cmd.args(["volume", "backup", volume, "-"])
        .args(extra)
        .envs(tc.client_env())
        .envs(tc.admin_env())
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(Stdio::piped());
    let child = cmd.spawn()?;
    let o = codafs_tests::wait_output(child, Duration::from_secs(60))?;
    ensure!(
        o.status.success(),
        "backup to stdout: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(())
}

/// A volume with a bit of everything: directories with their own modes and times, small and
/// chunked files, a symlink, a hard link and a FIFO.
async fn populate(tc: &TestCluster, c: &Cluster) -> Result<Vec<u8>> {
    tc.create_volume("www", 2).await?;
    let big = codafs_common::testdata::noise(6 << 20, 11);
    c.put_content(b"<html>home</html>", 2).await?;
    c.put_content(b"body { color: red }", 2).await?;
    c.put_content(&big, 2).await?;
    let create = |path: &str, kind: pb::ObjectKind, mode: u32, mtime_ns: i64| {
        let (parent, name) = ops::split(path);
        pb::Op {
            expect_version: None,
            op: Some(pb::op::Op::Create(pb::CreateOp {
                parent: ops::at(parent),
                name: name.into(),
                kind: kind as i32,
                mode,
                uid: 1000,
                gid: 1000,
                mtime_ns,
                ..Default::default()
            })),
        }
    };
    let mut with_time = ops::file("index.html", b"<html>home</html>", 0o644);
    if let Some(pb::op::Op::Create(cr)) = with_time.op.as_mut() {
        cr.mtime_ns = 1_600_000_000_000_000_000;
        cr.uid = 33;
        cr.gid = 33;
    }
    let link = pb::Op {
        expect_version: None,
        op: Some(pb::op::Op::Link(pb::LinkOp {
            node: ops::at("index.html"),
            parent: ops::at("css"),
            name: "home-again.html".into(),
        })),
    };
    let ops = vec![
        create("css", pb::ObjectKind::Directory, 0o750, 1_500_000_000_000_000_000),
        create("empty", pb::ObjectKind::Directory, 0o700, 0),
        with_time,
        ops::file("css/site.css", b"body { color: red }", 0o600),
        ops::file("css/big.bin", &big, 0o644),
        ops::symlink("start", "index.html"),
        link,
        create("pipe", pb::ObjectKind::Fifo, 0o640, 0),
    ];
    c.commit(ops::commit("www", ops)).await?;
    // Directory times last: creating entries touched them.
    let when = pb::Op {
        expect_version: None,
        op: Some(pb::op::Op::SetAttr(pb::SetAttrOp {
            node: ops::at("css"),
            mtime_ns: Some(1_500_000_000_000_000_000),
            ..Default::default()
        })),
    };
    c.commit(ops::commit("www", vec![when])).await?;
    Ok(big)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_volume_backed_up_deleted_and_restored_is_the_same_volume() {
    let run = async {
        let tc = TestCluster::start(ClusterOpts::new(2, 1)).await?;
        let c = tc.client();
        let big = populate(&tc, &c).await?;
        let (before, links) = tree(&c, "www").await?;
        assert_eq!(links.len(), 1, "one hard-linked file: {links:?}");
        let dir = tc.root.path();
        let archive = dir.join("www.codafs");
        let archive_s = archive.display().to_string();

        let (ok, _, err) = cli(&tc, &["volume", "backup", "www", &archive_s])?;
        assert!(ok, "{err}");
        assert!(err.contains("backed up volume www"), "{err}");
        assert!(!dir.join("www.partial").exists(), "no partial archive left behind");
        assert!(
            std::fs::metadata(&archive)?.len() > 6 << 20,
            "the archive holds the contents"
        );

        // Without --yes and without a terminal, delete refuses and changes nothing.
        let (ok, _, err) = cli(&tc, &["volume", "delete", "www"])?;
        assert!(!ok && err.contains("--yes"), "{err}");
        assert!(c.get_volume("www").await.is_ok());
        let (ok, out, err) = cli(&tc, &["volume", "delete", "www", "--yes"])?;
        assert!(ok, "{err}");
        assert!(out.contains("deleted volume www"), "{out}");
        let gone = c.get_volume("www").await;
        assert!(gone.is_err(), "deleted: {gone:?}");

        let (ok, out, err) = cli(&tc, &["volume", "restore", &archive_s, "www"])?;
        assert!(ok, "{err}");
        assert!(out.contains("restored volume www"), "{out}");
        let (after, links_after) = tree(&c, "www").await?;
        assert_eq!(after, before, "the restored namespace");
        assert_eq!(links_after, links, "the hard link is one node again");
        assert_eq!(content(&c, "www", "css/big.bin").await?, big);
        assert_eq!(content(&c, "www", "css/home-again.html").await?, b"<html>home</html>");

        // An existing volume is not overwritten unless asked.
        let version = c.get_volume("www").await?.version;
        let (ok, _, err) = cli(&tc, &["volume", "restore", &archive_s, "www"])?;
        assert!(!ok && err.contains("--replace"), "{err}");
        // A damaged archive is refused before anything changes, even with --replace.
        let mut bytes = std::fs::read(&archive)?;
        let at = bytes.len() / 2;
        bytes[at] ^= 0x40;
        let damaged = dir.join("damaged.codafs");
        std::fs::write(&damaged, &bytes)?;
        let damaged_s = damaged.display().to_string();
        let (ok, _, err) = cli(&tc, &["volume", "restore", &damaged_s, "www", "--replace"])?;
        assert!(
            !ok && (err.contains("damaged") || err.contains("does not match")),
            "{err}"
        );
        assert_eq!(c.get_volume("www").await?.version, version, "left as it was");

        // Through a pipe: stdout, then stdin, under another name.
        let piped = dir.join("piped.codafs");
        backup_to_stdout(&tc, "www", &piped, &[])?;
        let out = tc.codafs_admin(&["volume", "restore", "-", "copy"]);
        assert!(out.is_ok_and(|o| !o.ok), "an empty stdin is no archive");
        let status = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "{} volume restore - copy < {}",
                codafs_tests::codafs_bin().display(),
                piped.display()
            ))
            .envs(tc.client_env())
            .envs(tc.admin_env())
            .output()?;
        assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
        assert_eq!(tree(&c, "copy").await?.0, before);

        // Incremental: a change after a full backup's version; the incremental archive holds
        // only the new content, and restores (the rest is on the servers) to the current state.
        let full_version = c.get_volume("www").await?.version;
        c.put_content(b"body { color: blue }", 2).await?;
        let edit = ops::file("css/site.css", b"body { color: blue }", 0o600);
        c.commit(ops::commit("www", vec![edit])).await?;
        let incremental = dir.join("incr.codafs");
        let since = full_version.to_string();
        let (ok, _, err) = cli(
            &tc,
            &[
                "volume",
                "backup",
                "www",
                &incremental.display().to_string(),
                "--since",
                &since,
            ],
        )?;
        assert!(ok, "{err}");
        assert!(err.contains("1 contents"), "only the edited file's content: {err}");
        assert!(
            std::fs::metadata(&incremental)?.len() < 64 << 10,
            "the 6 MiB file is not in it"
        );
        let (ok, _, err) = cli(&tc, &["volume", "restore", &incremental.display().to_string(), "later"])?;
        assert!(ok, "{err}");
        assert_eq!(tree(&c, "later").await?.0, tree(&c, "www").await?.0);
        assert_eq!(content(&c, "later", "css/site.css").await?, b"body { color: blue }");
        assert_eq!(content(&c, "later", "css/big.bin").await?, big, "from the servers");
        Ok::<_, anyhow::Error>(())
    };
    codafs_tests::bounded_within(Duration::from_secs(180), run).await;
}

/// `volume info` shows each server's blob health and the mounts subscribed to the volume's
/// changes, which come and go with the mounts. A write quorum the data servers could never
/// meet (3 on two data servers and a witness) is refused by `volume create` and `volume set`,
/// and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn volume_info_lists_servers_and_subscribed_mounts() {
    let run = async {
        let tc = TestCluster::start(ClusterOpts::new(2, 1)).await?;
        let (ok, _, err) = cli(&tc, &["volume", "create", "www", "--write-quorum", "3"])?;
        assert!(!ok && err.contains("the cluster has 2"), "{err}");
        let (ok, _, err) = cli(&tc, &["volume", "create", "www"])?;
        assert!(ok, "the default quorum: {err}");
        let (ok, _, err) = cli(&tc, &["volume", "set", "www", "--write-quorum", "3"])?;
        assert!(!ok && err.contains("the cluster has 2"), "{err}");
        let (ok, out, err) = cli(&tc, &["volume", "info", "www"])?;
        assert!(ok && out.contains("write quorum 2"), "{out}{err}");
        let subscribed = |out: &str| -> Option<usize> {
            let line = out.lines().find(|l| l.starts_with("mounts"))?;
            line.split_whitespace().nth(1)?.parse().ok()
        };
        let (ok, out, err) = cli(&tc, &["volume", "info", "www"])?;
        assert!(ok, "{err}");
        assert_eq!(subscribed(&out), Some(0), "{out}");
        assert_eq!(out.matches("127.0.0.1:").count(), 3, "one line per server: {out}");
        assert!(out.contains("witness") && out.contains("leader"), "{out}");

        let mut mounts = Vec::new();
        for name in ["web1", "web2"] {
            let m = codafs_tests::Mount::start(&tc.client_args(), tc.root.path(), name, &["--read-only"])?;
            std::fs::read_dir(m.path.join("www")).context("the mount shows the volume")?;
            mounts.push(m);
        }
        let mut seen = None;
        for _ in 0..100 {
            let (_, out, _) = cli(&tc, &["volume", "info", "www"])?;
            seen = subscribed(&out);
            if seen == Some(2) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(seen, Some(2), "both mounts listed");
        let (ok, out, err) = cli(&tc, &["volume", "info", "www", "--json"])?;
        assert!(ok, "{err}");
        let j: serde_json::Value = serde_json::from_str(&out)?;
        let streams: usize = j["replicas"]
            .as_array()
            .context("replicas")?
            .iter()
            .map(|r| r["subscribers"].as_array().map_or(0, |s| s.len()))
            .sum();
        assert_eq!(streams, 2, "{j}");

        for mut m in mounts {
            m.stop();
        }
        let mut seen = None;
        for _ in 0..100 {
            let (_, out, _) = cli(&tc, &["volume", "info", "www"])?;
            seen = subscribed(&out);
            if seen == Some(0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(seen, Some(0), "a stopped mount is no longer listed");
        Ok::<_, anyhow::Error>(())
    };
    codafs_tests::bounded_within(Duration::from_secs(120), run).await;
}

/// `volume info` counts the copies of every blob the volume names (a large file's manifest and
/// chunks included) on every data server: a copy lost behind a server's back shows as
/// under-replicated, and a server that does not answer is named.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn volume_info_counts_the_copies_of_the_volumes_blobs() {
    let run = async {
        // Repair off: it fetches the blobs a commit names on its next pass, so a copy deleted
        // before that pass would come back before it is counted.
        let opts = ClusterOpts::new(2, 1)
            .arg("--repair-interval-ms", "3600000")
            .arg("--full-repair-interval-s", "3600");
        let mut tc = TestCluster::start(opts).await?;
        tc.create_volume("www", 2).await?;
        let c = tc.client();
        // Page a is large enough to be a file, which the test deletes behind the running
        // server's back (smaller blobs are packed in the server's RocksDB).
        let page_a = b"page a".repeat(4000);
        TestCluster::write_file(&c, "www", "", "a.html", &page_a).await?;
        TestCluster::write_file(&c, "www", "", "b.html", b"page b").await?;
        let big: Vec<u8> = (0..(6u32 << 20))
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        TestCluster::write_file(&c, "www", "", "big.bin", &big).await?;
        let copies = |tc: &TestCluster| -> Result<serde_json::Value> {
            let (ok, out, err) = cli(tc, &["volume", "info", "www", "--json"])?;
            anyhow::ensure!(ok, "{err}");
            let j: serde_json::Value = serde_json::from_str(&out)?;
            Ok(j["copies"].clone())
        };
        let h = copies(&tc)?;
        let blobs = h["blobs"].as_u64().context("blobs")?;
        assert!(blobs >= 5, "two pages, a manifest and its chunks: {h}");
        assert_eq!(
            (h["under_replicated"].as_u64(), h["data_servers"].as_u64()),
            (Some(0), Some(2)),
            "{h}"
        );
        let (_, out, _) = cli(&tc, &["volume", "info", "www"])?;
        assert!(
            out.contains(&format!("{blobs} blobs, each on all 2 data servers")),
            "{out}"
        );

        let data = tc.servers.iter().position(|s| !s.witness).context("a data server")?;
        std::fs::remove_file(tc.blob_path(data, &codafs_common::Hash::of(&page_a)))?;
        let h = copies(&tc)?;
        assert_eq!(
            (
                h["under_replicated"].as_u64(),
                h["below_quorum"].as_u64(),
                h["lost"].as_u64()
            ),
            (Some(1), Some(1), Some(0)),
            "{h}"
        );
        let (_, out, _) = cli(&tc, &["volume", "info", "www"])?;
        assert!(out.contains("1 missing from some data server"), "{out}");

        tc.kill(data);
        let h = copies(&tc)?;
        assert_eq!(h["under_replicated"].as_u64(), Some(blobs), "{h}");
        assert_eq!(h["unreachable"].as_array().map(Vec::len), Some(1), "{h}");
        let (ok, out, _) = cli(&tc, &["volume", "info", "www", "--no-copies"])?;
        assert!(ok && !out.lines().any(|l| l.starts_with("copies")), "{out}");
        Ok::<_, anyhow::Error>(())
    };
    codafs_tests::bounded_within(Duration::from_secs(120), run).await;
}

/// With the majority lost, a surviving data server still answers reads: a backup taken from it
/// alone holds the whole volume (docs/OPERATIONS.md, "When a majority is lost").
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_from_the_last_data_server_works_without_a_majority() {
    let run = async {
        let mut tc = TestCluster::start(ClusterOpts::new(2, 1)).await?;
        let c = tc.client();
        let big = populate(&tc, &c).await?;
        let survivor = tc.servers.iter().position(|s| !s.witness).context("a data server")?;
        let addr = tc.servers[survivor].addr.clone();
        tc.caught_up(&addr).await?;
        for i in 0..tc.servers.len() {
            if i != survivor {
                tc.kill(i);
            }
        }
        let archive = tc.root.path().join("survivor.codafs");
        let archive_s = archive.display().to_string();
        let (ok, _, err) = cli(&tc, &["volume", "backup", "www", &archive_s, "--server-addr", &addr])?;
        assert!(ok, "{err}");
        assert!(err.contains("3 contents"), "every distinct content: {err}");
        assert!(std::fs::metadata(&archive)?.len() > big.len() as u64);
        Ok::<_, anyhow::Error>(())
    };
    codafs_tests::bounded_within(Duration::from_secs(120), run).await;
}
