//! `codafs mount`, `codafs status MNT` and `codafs prefetch`.
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use codafs_client::mount::{control_socket, MountConfig};
use codafs_client::status::MountStatus;

use crate::opts::ClientOpts;
use crate::output::bytes;

/// Environment variable telling a foreground mount to report readiness on stdout.
const READY_ENV: &str = "CODAFS_NOTIFY_READY";
const READY_LINE: &str = "codafs-mount-ready";

#[derive(Args)]
pub struct MountArgs {
    /// Where to mount (created if missing), e.g. /coda.
    pub mountpoint: PathBuf,
    /// Cache directory [default: /var/cache/codafs/<mountpoint>].
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Cache size bound, e.g. 512M, 10G.
    #[arg(long, default_value = "4G", value_parser = parse_size)]
    pub cache_size: u64,
    /// Stay in the foreground (logs to stderr) instead of returning once mounted.
    #[arg(long)]
    pub foreground: bool,
    /// Seconds an operation that needs a server may take before it fails with EIO
    /// (uncached files while servers are unreachable).
    #[arg(long, default_value_t = 2.0, value_name = "SECS", value_parser = parse_timeout)]
    pub timeout: f64,
    /// Refuse every change whatever tokens users hand over (what web nodes use). Also gives
    /// the fastest warm reads: open and close of a cached file reach no daemon code.
    #[arg(long)]
    pub read_only: bool,
    /// Make `close` wait until a change is on the servers (two commits and a blob put per new
    /// file). By default a writable mount logs changes durably in the cache directory, `close`
    /// returns once they are on disk there, and a background task sends them in batches;
    /// `fsync` and `codafs sync MNT` wait for the servers.
    #[arg(long, conflicts_with = "read_only")]
    pub write_through: bool,
    /// Bound of the write-back log (changes not yet on the servers), e.g. 2G. Past it, writes
    /// fail with ENOSPC until the servers take the backlog; a file larger than the whole bound
    /// gets EFBIG.
    #[arg(long, default_value = "2G", value_parser = parse_size)]
    pub log_limit: u64,
    /// Log to this file instead of stderr, rotated at 10 MiB with 3 old files kept (what a
    /// mount started without --foreground does with CACHE_DIR/mount.log).
    #[arg(long)]
    pub log_file: Option<PathBuf>,
    /// Serve Prometheus metrics (GET /metrics) on this address, e.g. 127.0.0.1:9402. Plain
    /// HTTP without authentication: bind it to loopback or a management network. See
    /// docs/METRICS.md.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<String>,
    /// Seconds between checkpoints of the cache's index (written only when the cache changed;
    /// 40 bytes per cached file). After a crash or `kill -9` the next start reads the last
    /// checkpoint instead of listing every cached file, serves at once, and reconciles the
    /// files in the background. 0 = never (such a start lists the cache first).
    #[arg(long, default_value_t = 300, value_name = "SECS")]
    pub cache_checkpoint: u64,
    #[command(flatten)]
    pub client: ClientOpts,
}

/// Parses sizes like `4096`, `512K`, `64M`, `10G`, `1T` (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    // The number first, then its unit: "bogus" is not a size, not a size in unit 's'.
    let (num, unit) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&s[..i], Some(c)),
        _ => (s, None),
    };
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 512M or 10G"))?;
    let mult = match unit {
        None => 1u64,
        Some(c) => match c.to_ascii_uppercase() {
            'K' => 1 << 10,
            'M' => 1 << 20,
            'G' => 1 << 30,
            'T' => 1 << 40,
            _ => return Err(format!("unknown size unit {c:?} (use K, M, G or T)")),
        },
    };
    if !n.is_finite() || n < 0.0 {
        return Err(format!("{s:?} is not a size"));
    }
    Ok((n * mult as f64) as u64)
}

/// Longest timeout a mount or `codafs sync` takes, in seconds.
const MAX_TIMEOUT: f64 = 3600.0;

/// Parses a timeout in seconds, fractions allowed, from 0.1 s to an hour. `nan`, `inf` and
/// `1e300` made the conversion to a `Duration` panic; other values out of range were changed
/// without a word.
pub fn parse_timeout(s: &str) -> Result<f64, String> {
    let secs: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds, like 2 or 0.5"))?;
    if !(0.1..=MAX_TIMEOUT).contains(&secs) {
        return Err(format!("{s} s is out of range: give 0.1 to {MAX_TIMEOUT} seconds"));
    }
    Ok(secs)
}

fn default_cache_dir(mnt: &Path) -> PathBuf {
    let name: String = mnt
        .to_string_lossy()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    PathBuf::from("/var/cache/codafs").join(name.trim_matches('_'))
}

pub fn mount(a: MountArgs) -> Result<()> {
    // The client config first: a bad one must fail before anything is made on disk.
    let (servers, prefer, tls) = (a.client.servers()?, a.client.prefer()?, a.client.tls()?);
    std::fs::create_dir_all(&a.mountpoint).with_context(|| format!("creating {}", a.mountpoint.display()))?;
    let mnt = std::fs::canonicalize(&a.mountpoint)?;
    let cache_dir = a.cache_dir.clone().unwrap_or_else(|| default_cache_dir(&mnt));
    if !a.foreground {
        return spawn_background(&a, &mnt, &cache_dir);
    }
    let cfg = MountConfig {
        mountpoint: mnt.clone(),
        servers,
        prefer,
        tls,
        cache_dir,
        cache_size: a.cache_size,
        op_timeout: Duration::from_secs_f64(a.timeout),
        volume_poll: Duration::from_secs(2),
        read_only: a.read_only,
        write_through: a.write_through,
        log_limit: a.log_limit,
        metrics_listen: a.metrics_listen.clone(),
        cache_checkpoint: (a.cache_checkpoint > 0).then(|| Duration::from_secs(a.cache_checkpoint)),
    };
    let notify = std::env::var_os(READY_ENV).is_some();
    codafs_client::mount::run(cfg, || {
        if notify {
            let mut out = std::io::stdout();
            let _ = writeln!(out, "{READY_LINE}");
            let _ = out.flush();
        }
    })?;
    Ok(())
}

/// Starts `codafs mount --foreground` detached, waits until it reports the mount ready (or
/// fails), and returns.
fn spawn_background(a: &MountArgs, mnt: &Path, cache_dir: &Path) -> Result<()> {
    std::fs::create_dir_all(cache_dir).with_context(|| format!("creating {}", cache_dir.display()))?;
    let log_path = cache_dir.join("mount.log");
    // The daemon's stderr until it has set up its own (rotating) log writer on the same file:
    // what goes wrong before that (a bad argument) still lands in the log.
    let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("mount")
        .arg(mnt)
        .arg("--foreground")
        .arg("--cache-dir")
        .arg(cache_dir)
        .arg("--cache-size")
        .arg(a.cache_size.to_string())
        .arg("--timeout")
        .arg(a.timeout.to_string())
        .arg("--log-file")
        .arg(&log_path);
    if a.read_only {
        cmd.arg("--read-only");
    }
    if a.write_through {
        cmd.arg("--write-through");
    }
    cmd.arg("--log-limit").arg(a.log_limit.to_string());
    cmd.arg("--cache-checkpoint").arg(a.cache_checkpoint.to_string());
    if let Some(m) = &a.metrics_listen {
        cmd.arg("--metrics-listen").arg(m);
    }
    cmd.args(a.client.to_args());
    cmd.env(READY_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log);
    // A new session, so the daemon outlives the shell that started it.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting the mount daemon")?;
    let stdout = child.stdout.take().context("daemon stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(line) if line.trim() == READY_LINE => {
            println!(
                "mounted {} (daemon pid {}, log {})",
                mnt.display(),
                child.id(),
                log_path.display()
            );
            Ok(())
        }
        _ => {
            let _ = child.kill();
            let _ = child.wait();
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let last = log
                .lines()
                .rev()
                .find(|l| l.contains("ERROR") || l.contains("codafs:"))
                .unwrap_or("see the log");
            bail!("mount of {} failed: {last} ({})", mnt.display(), log_path.display())
        }
    }
}

/// Sends one request line to a mount's control socket and returns its JSON answer.
pub fn control_request(sock: &Path, line: &str) -> Result<serde_json::Value> {
    control_request_within(sock, line, Duration::from_secs(5))
}

/// [`control_request`], waiting up to `limit` for the answer.
fn control_request_within(sock: &Path, line: &str, limit: Duration) -> Result<serde_json::Value> {
    let s = std::os::unix::net::UnixStream::connect(sock)?;
    exchange(s, line, limit)
}

/// Sends one request line on a connected control socket and reads the JSON answer.
fn exchange(mut s: std::os::unix::net::UnixStream, line: &str, limit: Duration) -> Result<serde_json::Value> {
    s.set_read_timeout(Some(limit))?;
    s.write_all(line.as_bytes())?;
    s.write_all(b"\n")?;
    let mut reply = String::new();
    std::io::Read::read_to_string(&mut s, &mut reply)?;
    Ok(serde_json::from_str(&reply)?)
}

/// Sends `line` to the mount at `mnt`, waiting up to `limit`; returns the mountpoint as
/// resolved and the mount's answer.
pub(crate) fn ask_mount(mnt: &Path, line: &str, limit: Duration) -> Result<(PathBuf, serde_json::Value)> {
    let given = std::fs::canonicalize(mnt).with_context(|| format!("{}", mnt.display()))?;
    // A path inside a mount (`codafs sync /coda/www`) names the mount that holds it.
    let mnt = given
        .ancestors()
        .find(|a| control_socket(a).exists())
        .unwrap_or(&given)
        .to_path_buf();
    let sock = control_socket(&mnt);
    let conn = std::os::unix::net::UnixStream::connect(&sock).with_context(|| {
        format!(
            "no codafs mount at {} (no control socket {})",
            mnt.display(),
            sock.display()
        )
    })?;
    let cmd = line.split(' ').next().unwrap_or_default();
    let reply = exchange(conn, line, limit)
        .with_context(|| format!("the mount at {} did not answer `{cmd}` within {limit:?}", mnt.display()))?;
    Ok((mnt, reply))
}

/// Asks a running mount for its status.
pub fn mount_status(mnt: &Path) -> Result<MountStatus> {
    let (mnt, reply) = ask_mount(mnt, "status", Duration::from_secs(5))?;
    if let Some(e) = reply.get("error").and_then(|e| e.as_str()) {
        bail!("the mount at {} could not report its status: {e}", mnt.display());
    }
    serde_json::from_value(reply).with_context(|| {
        format!(
            "the mount at {} sent a status this codafs cannot read (a different version?)",
            mnt.display()
        )
    })
}

/// Hands `line` (`login TOKEN` or `logout`) to every running mount; returns each mount's
/// answer. Stale sockets of mounts that are gone are skipped.
pub fn tell_mounts(line: &str) -> Vec<(String, serde_json::Value)> {
    let Ok(dir) = std::fs::read_dir(codafs_client::mount::CONTROL_DIR) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in dir.flatten() {
        let p = e.path();
        if p.extension().is_none_or(|x| x != "sock") {
            continue;
        }
        if let Ok(v) = control_request(&p, line) {
            let mnt = v["mountpoint"].as_str().unwrap_or("?").to_string();
            out.push((mnt, v));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// `codafs sync MNT`: waits until every change the mount logged before the call is on the
/// servers.
pub fn sync(mnt: &Path, timeout: f64) -> Result<()> {
    let limit = timeout.clamp(0.1, MAX_TIMEOUT);
    let (mnt, reply) = ask_mount(mnt, &format!("sync {limit}"), Duration::from_secs_f64(limit + 5.0))?;
    if let Some(e) = reply.get("error").and_then(|e| e.as_str()) {
        bail!("{}: {e}", mnt.display());
    }
    Ok(())
}

pub fn print_mount_status(mnt: &Path, json: bool) -> Result<()> {
    let st = mount_status(mnt)?;
    if json {
        println!("{}", serde_json::to_string(&st)?);
        return Ok(());
    }
    let c = &st.cache;
    println!(
        "mount {}  ({}{})",
        mnt.display(),
        if st.connected { "connected" } else { "DISCONNECTED" },
        st.server
            .as_deref()
            .map(|s| format!(", reads from {s} first"))
            .unwrap_or_default()
    );
    println!(
        "cache  {} of {} in {} blobs, hit ratio {:.1}% ({} hits, {} misses), {} evictions",
        bytes(c.bytes),
        bytes(c.max_bytes),
        c.entries,
        c.hit_ratio * 100.0,
        c.hits,
        c.misses,
        c.evictions,
    );
    if c.prefetched > 0 || c.bad_small_copies > 0 {
        println!(
            "       {} small files brought with their directory's listing ({} bad copies left out)",
            c.prefetched, c.bad_small_copies
        );
    }
    if c.packs > 0 {
        println!(
            "       {} of the cached files kept together in {} packs",
            c.packed_files, c.packs
        );
    }
    println!(
        "kernel requests: {} answered at once from this node, {} waited for a server or a lock",
        st.answered_inline, st.handed_off
    );
    if c.reused_chunk_bytes > 0 {
        println!(
            "       {} of large files' new versions taken from chunks already cached",
            bytes(c.reused_chunk_bytes)
        );
    }
    if st.read_only {
        println!("writes refused for everyone (--read-only)");
    } else {
        let tokens: Vec<String> = st
            .tokens
            .iter()
            .map(|t| format!("uid {} as {}", t.uid, t.user))
            .collect();
        let w = &st.writes;
        println!(
            "writes by {} ({} commits, {} refused or failed, {} stored); other uids read only",
            if tokens.is_empty() {
                "nobody: no tokens handed over".to_string()
            } else {
                tokens.join(", ")
            },
            w.commits,
            w.failed_commits,
            bytes(w.stored_bytes),
        );
        match &w.write_back {
            None => println!("write-through: close returns once a change is on the servers"),
            Some(b) => {
                println!(
                    "write-back log: {} changes waiting ({} of {}), {} sent in {} batches, {} conflicts, {} refused{}",
                    b.changes,
                    bytes(b.log_bytes),
                    bytes(b.log_limit),
                    b.changes_sent,
                    b.batches_sent,
                    b.conflicts,
                    b.refused,
                    b.blocked
                        .as_deref()
                        .map(|w| format!("; waiting: {w}"))
                        .unwrap_or_default(),
                );
                if let Some(c) = &b.last_conflict {
                    println!("       last conflict: {c}");
                }
                if let Some(r) = &b.last_refused {
                    println!("       last refused: {r}");
                }
                if let Some(d) = &b.damaged {
                    println!("       DAMAGED LOG: {d}");
                }
                if !b.ids_reserved.is_empty() {
                    let ids: Vec<String> = b.ids_reserved.iter().map(|(v, n)| format!("{v} {n}")).collect();
                    println!(
                        "       node ids in reserve (creations possible offline): {}",
                        ids.join(", ")
                    );
                }
            }
        }
    }
    println!(
        "{:<32} {:<14} {:>10} {:>10} {:>10} {:>9}",
        "VOLUME", "STATE", "VERSION", "FILES", "BYTES", "HIT RATIO"
    );
    for v in &st.volumes {
        println!(
            "{:<32} {:<14} {:>10} {:>10} {:>10} {:>8.1}%",
            v.name,
            if v.connected { "connected" } else { "disconnected" },
            v.version,
            // A lower bound for volumes with more files than a status counts.
            format!("{}{}", if v.cached.complete { "" } else { ">=" }, v.cached.files),
            bytes(v.cached.bytes),
            v.hit_ratio * 100.0,
        );
    }
    Ok(())
}

#[derive(Args)]
pub struct PrefetchArgs {
    /// A volume or subtree under a codafs mount, e.g. /coda/www.
    pub path: PathBuf,
    /// Files fetched in parallel.
    #[arg(long, default_value_t = 16)]
    pub parallel: usize,
}

/// Reads every file under `path` through the mount, so each lands in the cache.
pub fn prefetch(a: PrefetchArgs) -> Result<()> {
    // Before reading anything: a path that is not (yet) on a codafs mount must fail, not report
    // a local tree as prefetched (a node would then join the load balancer cold).
    let st = mount_status(&a.path)?;
    let mut files = Vec::new();
    let mut dirs = vec![a.path.clone()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("listing {}", d.display()))? {
            let e = e?;
            let ft = e.file_type()?;
            if ft.is_dir() {
                dirs.push(e.path());
            } else if ft.is_file() {
                files.push((e.path(), e.metadata()?.len()));
            }
        }
    }
    let total: u64 = files.iter().map(|(_, n)| n).sum();
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let queue = std::sync::Mutex::new(files.clone());
    let failed = std::sync::Mutex::new(Vec::new());
    let done = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| {
        for _ in 0..a.parallel.max(1) {
            s.spawn(|| loop {
                let Some((path, _)) = queue.lock().unwrap_or_else(|p| p.into_inner()).pop() else {
                    break;
                };
                match std::fs::File::open(&path).and_then(|mut f| std::io::copy(&mut f, &mut std::io::sink())) {
                    Ok(n) => bar.inc(n),
                    Err(e) => failed
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(format!("{}: {e}", path.display())),
                }
                let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                bar.set_message(format!("{n}/{} files", files.len()));
            });
        }
    });
    bar.finish();
    let failed = failed.into_inner().unwrap_or_default();
    if !failed.is_empty() {
        bail!(
            "{} of {} files could not be fetched; first: {}",
            failed.len(),
            files.len(),
            failed[0]
        );
    }
    // Through a cache too small for the tree, the files read first were evicted again by the
    // last ones: that is not a prefetched tree, so it is not reported as one.
    if total > st.cache.max_bytes {
        bail!(
            "read {} files ({}), but the mount's cache holds at most {} (--cache-size): only part \
             of the tree stays cached; mount with a larger --cache-size",
            files.len(),
            bytes(total),
            bytes(st.cache.max_bytes)
        );
    }
    println!("prefetched {} files ({})", files.len(), bytes(total));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_timeouts_parse_or_say_why() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("1.5g"), Ok(3 << 29));
        for bad in ["bogus", "10Q", "-1G", "nan", ""] {
            assert!(parse_size(bad).is_err(), "{bad:?} taken");
        }
        assert!(parse_size("bogus").unwrap_err().contains("not a size"));
        assert_eq!(parse_timeout("2"), Ok(2.0));
        assert_eq!(parse_timeout("0.5"), Ok(0.5));
        // Each of these made Duration::from_secs_f64 panic, or was changed without a word.
        for bad in ["nan", "inf", "1e300", "-1", "0", "0.05", "3601", "two"] {
            assert!(parse_timeout(bad).is_err(), "{bad:?} taken");
        }
    }
}
