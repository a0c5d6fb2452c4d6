//! Server-core benchmark: commit throughput and blob transfer through a real 3-server cluster
//! (2 data replicas + 1 witness) on loopback, each beside a local-disk baseline measured in the
//! same run. Prints a Markdown table for docs/benchmarks.md.
//!
//! Run: `cargo build --bin codafs && cargo bench -p codafs-benches --profile dev --bench server_core`
//! (`--profile dev` shares the test build; dependencies are optimised in that profile.)
use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::Result;
use codafs_common::Hash;
use codafs_proto::pb;
use codafs_tests::{ClusterOpts, TestCluster};

struct Row {
    what: String,
    codafs: String,
    local: String,
    ratio: f64,
}

fn rate(n: f64, d: Duration) -> f64 {
    n / d.as_secs_f64()
}

/// Local baseline for a durable small-file write: temp file, fsync, rename (what a blob put does).
fn local_durable_write(dir: &std::path::Path, name: &str, data: &[u8]) -> Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_data()?;
    std::fs::rename(&tmp, dir.join(name))?;
    Ok(())
}

async fn bench() -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    let tc = TestCluster::start(ClusterOpts::new(2, 1)).await?;
    tc.create_volume("bench", 2).await?;
    let c = tc.client();
    let local = tempfile::tempdir()?;

    // 1. Single small-file commits, one after another (blob put + commit each).
    let n = 200;
    let t = Instant::now();
    for i in 0..n {
        let content = format!("small file {i} {}", "x".repeat(1000));
        TestCluster::write_file(&c, "bench", "", &format!("s{i}"), content.as_bytes()).await?;
    }
    let ours = rate(n as f64, t.elapsed());
    let t = Instant::now();
    for i in 0..n {
        let content = format!("small file {i} {}", "x".repeat(1000));
        local_durable_write(local.path(), &format!("s{i}"), content.as_bytes())?;
    }
    let base = rate(n as f64, t.elapsed());
    rows.push(Row {
        what: "single small-file commits (1 KiB, put + commit), files/s".into(),
        codafs: format!("{ours:.0}"),
        local: format!("{base:.0} (write+fsync+rename)"),
        ratio: ours / base,
    });

    // 2. One batch of 5,000 small files: blobs first (parallel), then one commit.
    let files: Vec<(String, Vec<u8>)> = (0..5000)
        .map(|i| {
            (
                format!("b{i}.html"),
                format!("<p>page {i}</p>{}", "y".repeat(i % 4000)).into_bytes(),
            )
        })
        .collect();
    let t = Instant::now();
    let mut puts = futures::stream::FuturesUnordered::new();
    for chunk in files.chunks(250) {
        let c = &c;
        puts.push(async move {
            for (_, data) in chunk {
                c.put_blob(bytes::Bytes::copy_from_slice(data), 2).await?;
            }
            anyhow::Ok(())
        });
    }
    use futures::StreamExt;
    while let Some(r) = puts.next().await {
        r?;
    }
    let put_time = t.elapsed();
    let ops: Vec<pb::Op> = files
        .iter()
        .map(|(n, d)| codafs_client::ops::file(n, d, 0o644))
        .collect();
    let t = Instant::now();
    c.commit(pb::CommitRequest {
        volume: "bench".into(),
        ops,
        expect_volume_version: None,
        request_id: Default::default(),
    })
    .await?;
    let commit_time = t.elapsed();
    let bdir = local.path().join("batch");
    std::fs::create_dir_all(&bdir)?;
    // Flush what the servers wrote so the baseline's sync only pays for its own files.
    std::process::Command::new("sync").status()?;
    let t = Instant::now();
    for (name, data) in &files {
        std::fs::write(bdir.join(name), data)?;
    }
    std::process::Command::new("sync").status()?;
    let base = t.elapsed();
    rows.push(Row {
        what: "5,000-file batch: the one commit, seconds".into(),
        codafs: format!("{:.3}", commit_time.as_secs_f64()),
        local: format!("{:.3} (write 5,000 files + sync)", base.as_secs_f64()),
        ratio: base.as_secs_f64() / commit_time.as_secs_f64(),
    });
    rows.push(Row {
        what: "5,000-file batch: blob puts first (8 streams), files/s".into(),
        codafs: format!("{:.0}", rate(5000.0, put_time)),
        local: format!("{:.0}", rate(5000.0, base)),
        ratio: base.as_secs_f64() / put_time.as_secs_f64(),
    });

    // 3. Large blob put and get, one stream.
    let size = 256usize << 20;
    let data: bytes::Bytes = (0..size).map(|i| (i * 7 % 251) as u8).collect::<Vec<u8>>().into();
    let h = Hash::of(&data);
    let t = Instant::now();
    c.put_blob(data.clone(), 2).await?;
    let put = rate(size as f64 / 1e6, t.elapsed());
    std::process::Command::new("sync").status()?;
    let t = Instant::now();
    local_durable_write(local.path(), "big", &data)?;
    let base_put = rate(size as f64 / 1e6, t.elapsed());
    rows.push(Row {
        what: "blob put, 256 MiB, one stream, 2 copies, MB/s".into(),
        codafs: format!("{put:.0}"),
        local: format!("{base_put:.0} (write+fsync)"),
        ratio: put / base_put,
    });
    // Reading a blob needs a right to it: reference it from a file, and read with that file's
    // ticket (the way mounts read).
    c.commit(pb::CommitRequest {
        volume: "bench".into(),
        ops: vec![codafs_client::ops::file_hashed("big.bin", h, size as u64, 0o644)],
        expect_volume_version: None,
        request_id: Default::default(),
    })
    .await?;
    let attr = tc
        .resolve_on(&tc.servers[0].addr, "bench", "big.bin")
        .await?
        .attr
        .ok_or_else(|| anyhow::anyhow!("no attributes for big.bin"))?;
    let blob = codafs_client::transport::BlobRef::of(&attr)?;
    let data_server = tc.client_on(&tc.servers[0].addr);
    let _ = data_server.get_blob(&blob).await?; // warm the server's page cache, as a hot blob would be
    let t = Instant::now();
    let got = data_server.get_blob(&blob).await?;
    let get = rate(size as f64 / 1e6, t.elapsed());
    assert_eq!(got.len(), size);
    let t = Instant::now();
    let local_read = std::fs::read(local.path().join("big"))?;
    let _ = blake3::hash(&local_read);
    let base_get = rate(size as f64 / 1e6, t.elapsed());
    rows.push(Row {
        what: "blob get, 256 MiB, one stream (verified), MB/s".into(),
        codafs: format!("{get:.0}"),
        local: format!("{base_get:.0} (read + blake3, page cache)"),
        ratio: get / base_get,
    });
    Ok(rows)
}

fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let rows = rt.block_on(bench())?;
    println!("| measurement | codafs | local disk | ratio |");
    println!("|---|---|---|---|");
    for r in rows {
        println!("| {} | {} | {} | {:.2} |", r.what, r.codafs, r.local, r.ratio);
    }
    Ok(())
}
