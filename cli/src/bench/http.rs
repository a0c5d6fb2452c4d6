//! HTTP through nginx: what a web node actually does with the mount. Two nginx instances (the
//! mount's tree, the local copy) on free loopback ports, driven by a built-in keep-alive
//! HTTP/1.1 load generator so the bench needs no other tool.
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use codafs_client::webtree::{relpath, zipf_cdf, zipf_pick, Nginx};
use rand::SeedableRng;

use super::report::{percentile, Report, Row};
use super::Ctx;

/// Whether `nginx` is on PATH.
fn nginx_installed() -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("nginx").is_file()))
}

/// One keep-alive GET on `s`: reads the response whole; Err on anything but 200.
fn get(s: &mut BufReader<TcpStream>, path: &str) -> Result<()> {
    write!(s.get_mut(), "GET /{path} HTTP/1.1\r\nHost: bench\r\n\r\n")?;
    let mut line = String::new();
    s.read_line(&mut line)?;
    if !line.starts_with("HTTP/1.1 200") {
        bail!("GET /{path}: {}", line.trim());
    }
    let mut len = None;
    loop {
        line.clear();
        if s.read_line(&mut line)? == 0 {
            bail!("connection closed in the headers");
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse::<u64>().ok();
            }
        }
    }
    let len = len.context("no Content-Length")?;
    std::io::copy(&mut s.by_ref().take(len), &mut std::io::sink())?;
    Ok(())
}

/// `conns` threads, one keep-alive connection each, for `dur`: (req/s, latencies in ms).
fn load(port: u16, files: usize, cdf: &[f64], conns: usize, dur: Duration) -> Result<(f64, Vec<f64>)> {
    let results: Vec<Result<Vec<f64>>> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..conns)
            .map(|t| {
                sc.spawn(move || -> Result<Vec<f64>> {
                    let mut rng = rand::rngs::StdRng::seed_from_u64(t as u64);
                    let tcp = TcpStream::connect(("127.0.0.1", port))?;
                    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
                    tcp.set_nodelay(true)?;
                    let mut s = BufReader::new(tcp);
                    let mut lat = Vec::new();
                    let start = Instant::now();
                    while start.elapsed() < dur {
                        let i = zipf_pick(cdf, &mut rng).min(files - 1);
                        let t0 = Instant::now();
                        get(&mut s, &relpath(i))?;
                        lat.push(t0.elapsed().as_secs_f64() * 1000.0);
                    }
                    Ok(lat)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("load thread panicked")))
            })
            .collect()
    });
    let mut lat = Vec::new();
    for r in results {
        lat.extend(r?);
    }
    Ok((lat.len() as f64 / dur.as_secs_f64(), lat))
}

pub(crate) async fn run(ctx: &Ctx, report: &mut Report) -> Result<()> {
    if !nginx_installed() {
        report.skip("http", "nginx not installed");
        return Ok(());
    }
    let (mnt, local, work) = (ctx.mounted_tree(), ctx.local.clone(), ctx.work.clone());
    let (files, readers, dur, rounds, zipf) = (ctx.files, ctx.readers, ctx.duration, ctx.rounds, ctx.zipf);
    let rows = tokio::task::spawn_blocking(move || -> Result<Vec<Row>> {
        let m = Nginx::start(&work.join("nginx-mount"), &mnt, 256)?;
        let l = Nginx::start(&work.join("nginx-local"), &local, 256)?;
        let cdf = zipf_cdf(files, zipf);
        let (mut rps, mut p50, mut p99) = ([vec![], vec![]], [vec![], vec![]], [vec![], vec![]]);
        for _ in 0..rounds {
            for (side, port) in [(1, l.port), (0, m.port)] {
                let (r, lat) = load(port, files, &cdf, readers, dur)?;
                rps[side].push(r);
                p50[side].push(percentile(&lat, 0.5).unwrap_or(0.0));
                p99[side].push(percentile(&lat, 0.99).unwrap_or(0.0));
            }
        }
        Ok(vec![
            Row::paired("nginx GET, req/s", &rps[0], &rps[1]),
            Row::paired("nginx GET latency p50, ms", &p50[0], &p50[1]),
            Row::paired("nginx GET latency p99, ms", &p99[0], &p99[1]),
        ])
    })
    .await??;
    report.section("http").rows = rows;
    Ok(())
}
