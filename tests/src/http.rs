//! Plain HTTP on loopback for tests and benches: one GET, and Prometheus scrapes read by
//! series name (the servers' and mounts' `--metrics-listen`).
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One HTTP/1.1 GET on a fresh connection: the status code, the headers and the body.
pub async fn get(addr: &str, path: &str) -> Result<(u16, String, String)> {
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        anyhow::Ok(String::from_utf8(buf)?)
    };
    let text = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .with_context(|| format!("GET http://{addr}{path} took over 10 s"))??;
    let (head, body) = text.split_once("\r\n\r\n").context("no end of headers")?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    Ok((status, head.to_string(), body.to_string()))
}

/// `GET /metrics` from `addr`, which must answer 200 in the Prometheus text format.
pub async fn scrape(addr: &str) -> Result<String> {
    let (status, head, body) = get(addr, "/metrics").await?;
    ensure!(status == 200, "GET /metrics at {addr}: {head}\n{body}");
    ensure!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    Ok(body)
}

/// The value of one series, written as the text format writes it: `name` or
/// `name{label="value"}`. `None` if the scrape has no such series.
pub fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// How many `method` RPCs (e.g. "Meta/ReadDir") the servers at these metrics addresses have
/// answered in all, and the seconds they took, from one scrape of each (a method never called
/// has no series: 0).
pub async fn rpc_totals(metrics: &[String], method: &str) -> Result<(f64, f64)> {
    let series = |what: &str| format!("codafs_server_rpc_duration_seconds_{what}{{method=\"{method}\"}}");
    let (mut count, mut seconds) = (0.0, 0.0);
    for addr in metrics {
        let text = scrape(addr).await?;
        count += value(&text, &series("count")).unwrap_or(0.0);
        seconds += value(&text, &series("sum")).unwrap_or(0.0);
    }
    Ok((count, seconds))
}

/// How many `method` RPCs the servers at these metrics addresses have answered (see
/// [`rpc_totals`]).
pub async fn rpc_count(metrics: &[String], method: &str) -> Result<f64> {
    Ok(rpc_totals(metrics, method).await?.0)
}
