//! Logging setup shared by every codafs process: `tracing` to stderr or to a size-bounded,
//! rotating file, filtered by `CODAFS_LOG` (EnvFilter syntax, e.g.
//! `CODAFS_LOG=codafs_server=debug,openraft=warn`).
//!
//! Logs are bounded two ways, so a busy server or web node cannot fill its disk with its own
//! log: each place in the code that logs at INFO or above may write [`BURST`] lines per
//! [`WINDOW`], further lines from it are counted and summarised in one line when it next may
//! write ([`RateLimited`]); and a log file rotates at a size bound, keeping a few old files
//! ([`RotatingFile`]). DEBUG and TRACE lines are not limited: whoever turns them on asked for
//! them.
use std::collections::HashMap;
use std::fs::File;
use std::io::{IsTerminal, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::callsite::Identifier;
use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

/// Environment variable holding the log filter.
pub const LOG_ENV: &str = "CODAFS_LOG";
/// Lines one log statement may write per [`WINDOW`] before further ones are suppressed.
pub const BURST: u32 = 20;
/// The rate limit's window.
pub const WINDOW: Duration = Duration::from_secs(60);
/// A log file rotates when it reaches this size.
pub const LOG_FILE_MAX: u64 = 10 << 20;
/// Rotated log files kept beside the current one (`mount.log.1` … `mount.log.N`).
pub const LOG_FILES_KEPT: usize = 3;

/// Installs the global subscriber writing to stderr. `default` applies when `CODAFS_LOG` is
/// unset. Calling it twice is harmless (the second call is ignored).
pub fn init(default: &str) {
    install(
        default,
        RateLimited::new(std::io::stderr),
        std::io::stderr().is_terminal(),
    );
}

/// Installs the global subscriber writing to `path`, rotated at [`LOG_FILE_MAX`] with
/// [`LOG_FILES_KEPT`] old files. Standard error is pointed at the current file as well (and
/// again after each rotation), so a panic message lands in the log too.
pub fn init_file(default: &str, path: &Path) -> std::io::Result<()> {
    let file = RotatingFile::open(path, LOG_FILE_MAX, LOG_FILES_KEPT)?.redirect_stderr()?;
    install(default, RateLimited::new(file), false);
    Ok(())
}

/// Installs the global subscriber: lines to `writer`, filtered by `CODAFS_LOG` (or `default`)
/// and by [`RaftRetries`].
fn install<W>(default: &str, writer: W, ansi: bool)
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    use tracing_subscriber::filter::FilterExt;
    use tracing_subscriber::layer::{Layer, SubscriberExt};
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = EnvFilter::try_from_env(LOG_ENV).unwrap_or_else(|_| EnvFilter::new(default));
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(ansi)
        .with_target(true)
        .with_filter(filter.and(RaftRetries));
    let _ = tracing_subscriber::registry().with(layer).try_init();
}

/// Drops openraft's WARN and ERROR lines about one failed attempt to reach a peer (any of
/// their fields, the message included, names an unreachable node), about its back-off after
/// one, or about a batch the transport asked to split ("payload too large"). openraft writes
/// several of them at every retry, twice a second per peer that is down; the server reports
/// unreachable peers itself, once when they go, periodically while they stay gone and once
/// when they are back (`codafs_server::raft::reach`). Every other openraft line, and every
/// line at INFO or below, passes: openraft's own timeouts (a peer that drops packets rather
/// than refusing connections) are still logged at each heartbeat, within the rate limit.
pub struct RaftRetries;

/// What the lines [`RaftRetries`] drops contain.
const RAFT_RETRY_TEXTS: [&str; 3] = [
    "Unreachable node: ",
    "payload too large: hint:",
    "backoff mode: drain events",
];

impl<S: tracing::Subscriber> tracing_subscriber::layer::Filter<S> for RaftRetries {
    fn enabled(&self, _: &Metadata<'_>, _: &tracing_subscriber::layer::Context<'_, S>) -> bool {
        true
    }

    /// Every other line is always passed, so its callsite's interest stays cached.
    fn callsite_enabled(&self, meta: &'static Metadata<'static>) -> tracing::subscriber::Interest {
        if Self::may_drop(meta) {
            tracing::subscriber::Interest::sometimes()
        } else {
            tracing::subscriber::Interest::always()
        }
    }

    /// No bound of its own: the level filter it is combined with sets the maximum level (without
    /// a hint, the combination would have none and every level would be asked for).
    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(tracing::level_filters::LevelFilter::TRACE)
    }

    fn event_enabled(&self, event: &tracing::Event<'_>, _: &tracing_subscriber::layer::Context<'_, S>) -> bool {
        if !Self::may_drop(event.metadata()) {
            return true;
        }
        let mut seen = RetryText(false);
        event.record(&mut seen);
        !seen.0
    }
}

impl RaftRetries {
    /// Whether a line may be one this filter drops: openraft's, at WARN or ERROR (levels order
    /// from ERROR, the least verbose, up to TRACE).
    fn may_drop(meta: &Metadata<'_>) -> bool {
        meta.target().starts_with("openraft") && *meta.level() <= Level::WARN
    }
}

/// Whether any of an event's fields holds one of [`RAFT_RETRY_TEXTS`].
struct RetryText(bool);

impl tracing::field::Visit for RetryText {
    fn record_debug(&mut self, _: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if !self.0 {
            let text = format!("{value:?}");
            self.0 = RAFT_RETRY_TEXTS.iter().any(|t| text.contains(t));
        }
    }
}

/// Per-callsite state of the rate limit.
struct Window {
    start: Instant,
    written: u32,
    suppressed: u64,
}

/// A [`MakeWriter`] that lets each log statement (callsite) at INFO or above write [`BURST`]
/// lines per [`WINDOW`]. The first line a statement writes after some were suppressed is
/// preceded by one saying how many.
pub struct RateLimited<M> {
    inner: M,
    burst: u32,
    window: Duration,
    state: Mutex<HashMap<Identifier, Window>>,
}

impl<M> RateLimited<M> {
    pub fn new(inner: M) -> Self {
        Self::with_limit(inner, BURST, WINDOW)
    }

    /// A limit of `burst` lines per `window` for each statement.
    pub fn with_limit(inner: M, burst: u32, window: Duration) -> Self {
        RateLimited {
            inner,
            burst,
            window,
            state: Mutex::default(),
        }
    }

    /// Whether a line from `meta` may be written now, and how many were suppressed before it.
    fn admit(&self, meta: &Metadata<'_>) -> (bool, u64) {
        if *meta.level() > Level::INFO {
            return (true, 0);
        }
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let w = state.entry(meta.callsite()).or_insert(Window {
            start: now,
            written: 0,
            suppressed: 0,
        });
        if now.duration_since(w.start) >= self.window {
            w.start = now;
            w.written = 0;
        }
        if w.written >= self.burst {
            w.suppressed += 1;
            return (false, 0);
        }
        w.written += 1;
        (true, std::mem::take(&mut w.suppressed))
    }
}

/// Where one line goes: to the inner writer, or nowhere (suppressed).
pub enum MaybeWriter<W> {
    Write(W),
    Suppressed,
}

impl<W: Write> Write for MaybeWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            MaybeWriter::Write(w) => w.write(buf),
            MaybeWriter::Suppressed => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            MaybeWriter::Write(w) => w.flush(),
            MaybeWriter::Suppressed => Ok(()),
        }
    }
}

impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for RateLimited<M> {
    type Writer = MaybeWriter<M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        MaybeWriter::Write(self.inner.make_writer())
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Self::Writer {
        let (write, suppressed) = self.admit(meta);
        if !write {
            return MaybeWriter::Suppressed;
        }
        let mut w = self.inner.make_writer_for(meta);
        if suppressed > 0 {
            let _ = writeln!(
                w,
                "{} suppressed {suppressed} more lines from {} ({}:{}): it logs more than {} lines per {} s",
                meta.level(),
                meta.target(),
                meta.file().unwrap_or("?"),
                meta.line().unwrap_or(0),
                self.burst,
                self.window.as_secs()
            );
        }
        MaybeWriter::Write(w)
    }
}

/// A log file that rotates at a size bound: `path` is renamed to `path.1` (`path.1` to
/// `path.2`, and so on; the oldest beyond `keep` is removed) and a new `path` is started.
/// Files are created 0600.
pub struct RotatingFile {
    path: PathBuf,
    max_bytes: u64,
    keep: usize,
    stderr: bool,
    current: Mutex<(File, u64)>,
}

impl RotatingFile {
    /// Opens (appends to) `path`, rotating at `max_bytes` and keeping `keep` old files.
    pub fn open(path: &Path, max_bytes: u64, keep: usize) -> std::io::Result<Self> {
        let file = open_append(path)?;
        let len = file.metadata()?.len();
        let f = RotatingFile {
            path: path.to_path_buf(),
            max_bytes: max_bytes.max(1),
            keep,
            stderr: false,
            current: Mutex::new((file, len)),
        };
        if len >= f.max_bytes {
            let mut cur = f.current.lock().unwrap_or_else(|p| p.into_inner());
            f.rotate(&mut cur)?;
        }
        Ok(f)
    }

    /// Also points standard error at the current file, now and after every rotation.
    pub fn redirect_stderr(mut self) -> std::io::Result<Self> {
        self.stderr = true;
        let cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        dup_to_stderr(&cur.0)?;
        drop(cur);
        Ok(self)
    }

    fn rotate(&self, cur: &mut (File, u64)) -> std::io::Result<()> {
        let numbered = |i: usize| {
            let mut p = self.path.clone().into_os_string();
            p.push(format!(".{i}"));
            PathBuf::from(p)
        };
        if self.keep == 0 {
            std::fs::remove_file(&self.path)?;
        } else {
            let _ = std::fs::remove_file(numbered(self.keep));
            for i in (1..self.keep).rev() {
                match std::fs::rename(numbered(i), numbered(i + 1)) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            std::fs::rename(&self.path, numbered(1))?;
        }
        let file = open_append(&self.path)?;
        if self.stderr {
            dup_to_stderr(&file)?;
        }
        *cur = (file, 0);
        Ok(())
    }

    fn write_line(&self, buf: &[u8]) -> std::io::Result<usize> {
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        // Whatever else wrote to standard error (a panic) also counts: size from the file.
        if cur.1 >= self.max_bytes || cur.0.metadata().map(|m| m.len()).unwrap_or(cur.1) >= self.max_bytes {
            // A failed rotation must not stop logging: keep writing to the current file.
            let _ = self.rotate(&mut cur);
        }
        cur.0.write_all(buf)?;
        cur.1 += buf.len() as u64;
        Ok(buf.len())
    }
}

fn open_append(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

fn dup_to_stderr(file: &File) -> std::io::Result<()> {
    // SAFETY: dup2 onto fd 2 of a descriptor we own; fd 2 stays open, now on the new file.
    if unsafe { libc::dup2(file.as_raw_fd(), 2) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// One line's writer into a [`RotatingFile`]: the formatter hands over each line in one
/// `write`, so a line is never split across two files.
pub struct RotatingWriter<'a>(&'a RotatingFile);

impl Write for RotatingWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write_line(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for RotatingFile {
    type Writer = RotatingWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        RotatingWriter(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir() -> PathBuf {
        let p = std::env::temp_dir().join(format!("codafs-log-{}-{}", std::process::id(), rand::random::<u64>()));
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    #[test]
    fn rotating_file_stays_within_its_bound() {
        use std::os::unix::fs::PermissionsExt;
        let dir = temp_dir();
        let path = dir.join("mount.log");
        let f = RotatingFile::open(&path, 1000, 2).unwrap();
        let line = [b'x'; 99].iter().chain(b"\n").copied().collect::<Vec<u8>>();
        for _ in 0..100 {
            f.make_writer().write_all(&line).unwrap();
        }
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["mount.log", "mount.log.1", "mount.log.2"]);
        for n in &names {
            let m = std::fs::metadata(dir.join(n)).unwrap();
            assert!(m.len() <= 1000, "{n} is {} bytes", m.len());
            assert_eq!(m.permissions().mode() & 0o777, 0o600, "{n}");
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.lines().all(|l| l.len() == 99), "lines are whole");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// What `body` logged through the subscriber `make` builds over a fresh log file.
    fn logged<S>(make: impl FnOnce(RotatingFile) -> S, body: impl FnOnce()) -> String
    where
        S: tracing::Subscriber + Send + Sync + 'static,
    {
        let dir = temp_dir();
        let path = dir.join("log");
        let file = RotatingFile::open(&path, 1 << 20, 1).unwrap();
        tracing::subscriber::with_default(make(file), body);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        text
    }

    #[test]
    fn repeated_lines_are_suppressed_and_counted() {
        use tracing_subscriber::layer::SubscriberExt;
        let subscriber = |file| {
            tracing_subscriber::registry().with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_writer(RateLimited::with_limit(file, 3, Duration::from_millis(300))),
            )
        };
        // One statement (callsite), called from two places.
        let warn = |i: u32| tracing::warn!(i, "the same warning");
        let text = logged(subscriber, || {
            for i in 0..50 {
                warn(i);
                tracing::debug!(i, "a debug line");
            }
            tracing::info!("another statement");
            std::thread::sleep(Duration::from_millis(350));
            warn(99);
        });
        let warnings = text.lines().filter(|l| l.contains("the same warning")).count();
        assert_eq!(warnings, 4, "three, then one after the window: {text}");
        assert_eq!(
            text.lines().filter(|l| l.contains("a debug line")).count(),
            50,
            "debug lines are not limited"
        );
        assert!(
            text.contains("another statement"),
            "other statements have their own budget"
        );
        assert!(text.contains("suppressed 47 more lines"), "{text}");
    }

    #[test]
    fn combined_with_a_level_filter_the_level_filter_sets_the_maximum_level() {
        use tracing_subscriber::filter::FilterExt;
        use tracing_subscriber::layer::Filter;
        let combined = EnvFilter::new("info").and(RaftRetries);
        let hint = <_ as Filter<tracing_subscriber::Registry>>::max_level_hint(&combined);
        assert_eq!(hint, Some(tracing::level_filters::LevelFilter::INFO));
    }

    #[test]
    fn openraft_retries_are_dropped_and_other_lines_kept() {
        use tracing_subscriber::layer::{Layer, SubscriberExt};
        let subscriber = |file| {
            tracing_subscriber::registry().with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_writer(file)
                    .with_filter(RaftRetries),
            )
        };
        let text = logged(subscriber, || {
            let unreachable = "Unreachable node: tcp connect error";
            tracing::error!(target: "openraft::replication", err = %unreachable, "RPCError");
            tracing::warn!(
                target: "openraft::replication",
                error = %format!("RPCError: {unreachable}"),
                "error replication to target=2"
            );
            tracing::error!(target: "openraft::core::raft_core", error = %unreachable, "while requesting vote");
            tracing::error!(
                target: "openraft::replication",
                err = %"RPC(AppendEntries) payload too large: hint:(entries:3)",
                "RPCError"
            );
            tracing::warn!(target: "openraft::engine", "heartbeat error: {unreachable}");
            tracing::warn!(target: "openraft::replication", interval = ?Duration::from_millis(500), "backoff mode: drain events");
            tracing::error!(target: "openraft::replication", error = %"disk full", "storage error kept");
            tracing::info!(target: "openraft::core", err = %unreachable, "info kept");
            tracing::error!(error = %unreachable, "codafs line kept");
        });
        assert_eq!(text.lines().count(), 3, "{text}");
        for kept in ["storage error kept", "info kept", "codafs line kept"] {
            assert!(text.contains(kept), "{kept}: {text}");
        }
    }
}
