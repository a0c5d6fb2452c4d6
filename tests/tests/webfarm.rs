//! The classic LVS + Coda web farm, end to end: 2 data servers + 1 witness, three web nodes each
//! mounting `/coda` read-only and serving it over HTTP with nginx, and a webmaster publishing
//! with `codafs upload`.
//! - A publish reaches every web node within a second of its commit, and no node ever serves
//!   an old page after a new one (each publish switches a node whole).
//! - Killing a server (-9) never stops a web node from serving; publishing goes on, also with
//!   a data server down (the witness keeps hints for it), and a restarted server catches up.
//! - Backup, delete and restore bring back the same bytes on every node.
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use codafs_client::webtree::Nginx;
use codafs_tests::{ClusterOpts, Mount, TestCluster};

const PAGES: usize = 20;

/// GET `path` from 127.0.0.1:`port`: (status, body).
fn get(port: u16, path: &str) -> Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: web\r\n\r\n")?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of headers")?;
    let head = String::from_utf8_lossy(&buf[..split]);
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no status")?;
    Ok((status, buf[split + 4..].to_vec()))
}

/// Page `i` of site version `v`: its version first, and big enough to span several packets.
fn page(v: u32, i: usize) -> Vec<u8> {
    let mut body = format!("<html>version {v} page {i}\n").into_bytes();
    body.extend(std::iter::repeat_n(b'a' + (i % 26) as u8, 3000 + i * 50));
    body.extend_from_slice(b"</html>\n");
    body
}

/// The version a served page claims, if it is exactly that version's page `i`.
fn version_of(body: &[u8], i: usize) -> Option<u32> {
    let text = std::str::from_utf8(&body[..body.len().min(40)]).ok()?;
    let v: u32 = text
        .strip_prefix("<html>version ")?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    (page(v, i) == body).then_some(v)
}

fn write_site(dir: &Path, v: u32) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    for i in 0..PAGES {
        std::fs::write(dir.join(format!("p{i}.html")), page(v, i))?;
    }
    Ok(())
}

/// `codafs ARGS` as the admin: (ok, stdout + stderr).
fn cli(tc: &TestCluster, args: &[&str]) -> Result<(bool, String)> {
    let out = tc.codafs_admin(args)?;
    Ok((out.ok, format!("{}{}", out.stdout, out.stderr)))
}

/// The webmaster publishes site version `v` with `codafs upload`.
fn publish(tc: &TestCluster, site: &Path, v: u32) -> Result<(bool, String)> {
    write_site(site, v)?;
    cli(tc, &["upload", &site.display().to_string(), "www", "--delete"])
}

/// Waits until web node `port` serves version `v` of every page; returns how long that took.
fn until_served(port: u16, v: u32, limit: Duration) -> Result<Duration> {
    let start = Instant::now();
    for _ in 0..10_000 {
        let mut all = true;
        for i in 0..PAGES {
            let (status, body) = get(port, &format!("/p{i}.html"))?;
            if status != 200 || version_of(&body, i) != Some(v) {
                all = false;
                break;
            }
        }
        if all {
            return Ok(start.elapsed());
        }
        if start.elapsed() > limit {
            bail!("web node on port {port} did not serve version {v} within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    bail!("web node on port {port}: too many polls")
}

/// Readers hitting every node while something happens: each response must be a whole page
/// of some version, and a node that served version `new` never serves an older one after.
struct Watch {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<Result<u64>>>,
}

impl Watch {
    fn start(ports: &[u16], new: u32) -> Watch {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = ports
            .iter()
            .map(|&port| {
                let stop = stop.clone();
                std::thread::spawn(move || -> Result<u64> {
                    let (mut n, mut seen_new, started) = (0u64, false, Instant::now());
                    while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(60) {
                        let i = (n as usize * 7) % PAGES;
                        let (status, body) = get(port, &format!("/p{i}.html"))?;
                        ensure!(status == 200, "node {port}: status {status} for p{i}");
                        let v = version_of(&body, i).with_context(|| format!("node {port}: a torn p{i}"))?;
                        ensure!(
                            !(seen_new && v < new),
                            "node {port} served version {v} of p{i} after version {new}"
                        );
                        seen_new |= v == new;
                        n += 1;
                    }
                    Ok(n)
                })
            })
            .collect();
        Watch { stop, threads }
    }

    /// Stops the readers; returns how many responses they checked.
    fn finish(self) -> Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = 0;
        for t in self.threads {
            total += t.join().map_err(|_| anyhow::anyhow!("a reader panicked"))??;
        }
        Ok(total)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_classic_web_farm_serves_publishes_survives_a_server_loss_and_restores() {
    let run = async {
        let mut tc = TestCluster::start(ClusterOpts::new(2, 1)).await?;
        tc.create_volume("www", 2).await?;
        let dir: PathBuf = tc.root.path().to_path_buf();
        let site = dir.join("site");
        let (ok, out) = publish(&tc, &site, 1)?;
        ensure!(ok, "first publish: {out}");

        let mut mounts = Vec::new();
        let mut nginx = Vec::new();
        for n in 0..3 {
            let m = Mount::start(&tc.client_args(), &dir, &format!("web{n}"), &["--read-only"])?;
            nginx.push(Nginx::start(&dir.join(format!("nginx{n}")), &m.path.join("www"), 64)?);
            mounts.push(m);
        }
        let ports: Vec<u16> = nginx.iter().map(|n| n.port).collect();
        for &p in &ports {
            until_served(p, 1, Duration::from_secs(10))?;
        }

        // A publish: every node within a second of the commit, each switching whole.
        let watch = Watch::start(&ports, 2);
        let (ok, out) = publish(&tc, &site, 2)?;
        ensure!(ok, "publish v2: {out}");
        for &p in &ports {
            let took = until_served(p, 2, Duration::from_secs(5))?;
            ensure!(took <= Duration::from_secs(1), "node {p} took {took:?} to serve v2");
        }
        let checked = watch.finish()?;
        ensure!(checked > 0, "the readers checked nothing");

        // Kill -9 the witness: nodes serve, and the webmaster publishes (majority and both data
        // servers stand). Then a data server: nodes still serve, and publishing goes on with
        // W=2 because the witness keeps a hint for the dead one (hinted handoff); restarted,
        // it catches up and the witness hands off everything it held.
        let witness = tc.servers.iter().position(|s| s.witness).context("a witness")?;
        tc.kill(witness);
        let watch = Watch::start(&ports, 3);
        let (ok, out) = publish(&tc, &site, 3)?;
        ensure!(ok, "publish v3 with the witness down: {out}");
        for &p in &ports {
            until_served(p, 3, Duration::from_secs(5))?;
        }
        watch.finish()?;
        tc.restart(witness)?;
        let waddr = tc.servers[witness].addr.clone();
        tc.caught_up(&waddr).await?;

        let data = tc.servers.iter().position(|s| !s.witness).context("a data server")?;
        tc.kill(data);
        for &p in &ports {
            until_served(p, 3, Duration::from_secs(5))?;
        }
        let watch = Watch::start(&ports, 4);
        let (ok, out) = publish(&tc, &site, 4)?;
        ensure!(ok, "publish v4 with one of two data servers down: {out}");
        for &p in &ports {
            let took = until_served(p, 4, Duration::from_secs(5))?;
            ensure!(took <= Duration::from_secs(1), "node {p} took {took:?} to serve v4");
        }
        watch.finish()?;
        ensure!(
            tc.status_of(&waddr).await?.spool_blobs > 0,
            "the witness holds hints for the dead data server"
        );
        tc.restart(data)?;
        let addr = tc.servers[data].addr.clone();
        tc.caught_up(&addr).await?;
        codafs_tests::wait_until(Duration::from_secs(30), "the witness hands off its spool", || async {
            tc.status_of(&waddr).await.is_ok_and(|s| s.spool_blobs == 0)
        })
        .await?;
        for &p in &ports {
            until_served(p, 4, Duration::from_secs(5))?;
        }

        // Backup, delete, restore: the same bytes on every node.
        let archive = dir.join("www.codafs").display().to_string();
        let (ok, out) = cli(&tc, &["volume", "backup", "www", &archive])?;
        ensure!(ok, "backup: {out}");
        let (ok, out) = cli(&tc, &["volume", "delete", "www", "--yes"])?;
        ensure!(ok, "delete: {out}");
        for &p in &ports {
            let start = Instant::now();
            while get(p, "/p0.html")?.0 != 404 {
                ensure!(
                    start.elapsed() < Duration::from_secs(10),
                    "node {p} still serves a deleted volume"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let (ok, out) = cli(&tc, &["volume", "restore", &archive, "www"])?;
        ensure!(ok, "restore: {out}");
        for &p in &ports {
            until_served(p, 4, Duration::from_secs(10))?;
        }
        drop(nginx);
        for mut m in mounts {
            m.stop();
        }
        Ok::<_, anyhow::Error>(())
    };
    codafs_tests::bounded_within(Duration::from_secs(240), run).await;
}
