//! `codafs demo`: a whole local cluster and a mounted `/coda` in one command. Two data servers
//! and a witness on free loopback ports, an admin, a volume `www` with a small sample site, a
//! mount; it stays in the foreground and stops everything it started on Ctrl-C/SIGTERM.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use codafs_client::transport::Tls;
use codafs_client::{ops, Cluster};
use codafs_proto::pb;

#[derive(Args)]
pub struct DemoArgs {
    /// Working directory for the servers, the cache and demo.env: wiped at start, so it must be
    /// new, empty, or an earlier demo's.
    #[arg(long, default_value = "/tmp/codafs-demo")]
    dir: PathBuf,
    /// Where to mount.
    #[arg(long, default_value = "/coda")]
    mount: PathBuf,
}

/// The sample site: (path, content).
const SITE: &[(&str, &str)] = &[
    ("index.html", include_str!("demo_site/index.html")),
    ("about.html", include_str!("demo_site/about.html")),
    ("css/site.css", include_str!("demo_site/css/site.css")),
    (
        "blog/2026-11-first-post.html",
        include_str!("demo_site/blog/2026-11-first-post.html"),
    ),
    ("robots.txt", include_str!("demo_site/robots.txt")),
];

/// Children started by the demo, stopped in reverse order on drop (also on errors); the second
/// field lists the mountpoints to unmount if their daemon died without doing so.
pub(crate) struct Children(pub(crate) Vec<(String, Child)>, pub(crate) Vec<PathBuf>);

impl Drop for Children {
    fn drop(&mut self) {
        for (what, c) in self.0.iter_mut().rev() {
            if let Ok(Some(_)) = c.try_wait() {
                // Exited and reaped already: its PID may be another process's by now.
                continue;
            }
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(8);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if let Ok(None) = c.try_wait() {
                tracing::warn!(%what, "did not stop in time; killing");
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        for m in &self.1 {
            // If the mount daemon died without unmounting, do not leave a dead mount behind.
            let mounted = std::fs::read_to_string("/proc/mounts")
                .unwrap_or_default()
                .contains(&format!(" {} ", m.display()));
            if mounted {
                let _ = Command::new("fusermount3").arg("-u").arg(m).status();
            }
        }
    }
}

/// Sets `path`'s permission bits (every command runs with umask 077, so shared files say so).
fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))
}

fn free_port() -> Result<u16> {
    Ok(codafs_common::ports::free_loopback_port()?)
}

pub(crate) fn spawn(dir: &Path, name: &str, args: &[String]) -> Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{name}.log")))?;
    own_child()?
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {name}"))
}

/// The connection settings a shell may hold from an earlier demo's `demo.env` (or a real
/// cluster's): a demo's servers and mount take theirs from their arguments only. A mount
/// started with an old `CODAFS_SERVERS` in its environment connected to the old demo's
/// (gone) servers and showed an empty `/coda`.
const CONNECTION_ENV: [&str; 6] = [
    "CODAFS_SERVERS",
    "CODAFS_PREFER_SERVER",
    "CODAFS_CONFIG",
    "CODAFS_CREDENTIAL",
    "CODAFS_CA",
    "CODAFS_INSECURE",
];

/// A `codafs` child of the demo, without the caller's connection settings.
fn own_child() -> Result<Command> {
    let mut c = Command::new(std::env::current_exe()?);
    for v in CONNECTION_ENV {
        c.env_remove(v);
    }
    Ok(c)
}

/// The last lines of a child's log, for an error message.
fn log_tail(dir: &Path, name: &str) -> String {
    let text = std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(8)..].join("\n    ");
    format!("{name}.log:\n    {tail}")
}

/// Waits until the server at `addr` sees `voters` voters (status needs the admin token). A
/// server that exits meanwhile (its port taken, say) ends the wait at once, with its log.
async fn wait_voters(
    addr: &str,
    tls: &Tls,
    token: &str,
    voters: u32,
    children: &mut Children,
    dir: &Path,
) -> Result<()> {
    let c = Cluster::new(&[addr.to_string()], tls.clone(), Some(token.to_string()))?;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        let st = c.status_on(addr).await;
        if let Ok(s) = st {
            if s.leader_id != 0 && !s.cluster_id.is_empty() && s.voters >= voters {
                return Ok(());
            }
        }
        for (i, (what, child)) in children.0.iter_mut().enumerate() {
            if let Ok(Some(status)) = child.try_wait() {
                bail!("{what} exited ({status}); {}", log_tail(dir, &format!("s{}", i + 1)));
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let logs: Vec<String> = (1..=children.0.len())
        .map(|i| log_tail(dir, &format!("s{i}")))
        .collect();
    bail!("the cluster did not come up within 30 s; {}", logs.join("\n"))
}

/// Publishes the sample site into `www` as one atomic commit.
async fn publish_site(c: &Cluster) -> Result<u64> {
    let mut ops = Vec::new();
    let mut dirs: Vec<&str> = SITE
        .iter()
        .filter_map(|(p, _)| p.rsplit_once('/').map(|(d, _)| d))
        .collect();
    dirs.sort();
    dirs.dedup();
    ops.extend(dirs.into_iter().map(|d| ops::dir(d, 0o755)));
    for (path, content) in SITE {
        c.put_blob(bytes::Bytes::from_static(content.as_bytes()), 2).await?;
        ops.push(ops::file(path, content.as_bytes(), 0o644));
    }
    Ok(c.commit(pb::CommitRequest {
        volume: "www".into(),
        ops,
        expect_volume_version: None,
        request_id: Default::default(),
    })
    .await?
    .version)
}

/// A running demo cluster and its first mount; everything stops when it is dropped.
pub(crate) struct Demo {
    pub(crate) children: Children,
    /// Servers 1 and 2 (data) and 3 (witness), in the order of `children`.
    pub(crate) addrs: Vec<String>,
    pub(crate) tls: Tls,
    /// The admin token.
    pub(crate) token: String,
    pub(crate) mnt: PathBuf,
    /// `www`'s version after the sample site was published.
    pub(crate) version: u64,
}

/// Starts the demo cluster in `dir` (which must exist and be empty): two data servers and a
/// witness (server directories `dir/s1..s3`, logs `dir/s1.log..`), volume `www` with the sample
/// site, and a mount at `mount`. `codafs demo` and `codafs bench --demo` share it.
pub(crate) async fn start(dir: &Path, mount: &Path, tell: bool) -> Result<Demo> {
    std::fs::create_dir_all(mount).with_context(|| format!("creating {}", mount.display()))?;
    let mnt = &std::fs::canonicalize(mount)?;
    let dir = dir.to_path_buf();
    let mut children = Children(Vec::new(), Vec::new());

    let addrs: Vec<String> = (0..3)
        .map(|_| free_port().map(|p| format!("127.0.0.1:{p}")))
        .collect::<Result<_>>()?;
    let sdir = |i: usize| dir.join(format!("s{}", i + 1));
    crate::cluster::init_server(&sdir(0), addrs[0].clone(), None, "admin", false, tell)?;
    let tls = Tls::ca(codafs_server::tls::ca_cert_of(&sdir(0))?);
    let s = |i: usize, extra: &[&str]| {
        let mut v = vec![
            "server".to_string(),
            "--dir".into(),
            sdir(i).display().to_string(),
            "--listen".into(),
            addrs[i].clone(),
        ];
        v.extend(extra.iter().map(|x| x.to_string()));
        v
    };
    children.0.push(("server 1".into(), spawn(&dir, "s1", &s(0, &[]))?));
    let token = std::fs::read_to_string(sdir(0).join("admin.token"))?.trim().to_string();
    wait_voters(&addrs[0], &tls, &token, 1, &mut children, &dir).await?;
    let admin = Cluster::new(&addrs[..1], tls.clone(), Some(token.clone()))?;
    // A join token admits one server: one each.
    let join_token = || admin.join_token(0);
    let join = join_token().await?;
    children
        .0
        .push(("server 2".into(), spawn(&dir, "s2", &s(1, &["--join", &join]))?));
    wait_voters(&addrs[0], &tls, &token, 2, &mut children, &dir).await?;
    let join = join_token().await?;
    children.0.push((
        "witness".into(),
        spawn(&dir, "s3", &s(2, &["--join", &join, "--witness"]))?,
    ));
    wait_voters(&addrs[0], &tls, &token, 3, &mut children, &dir).await?;

    let c = Cluster::new(&addrs, tls.clone(), Some(token.clone()))?;
    let spec = pb::VolumeSpec {
        name: "www".into(),
        public_read: true,
        write_quorum: 2,
        ..Default::default()
    };
    c.create_volume(spec).await?;
    let version = publish_site(&c).await?;

    let bundle = codafs_client::ClientBundle::new(String::new(), addrs.clone(), &tls);
    std::fs::write(dir.join("client.toml"), bundle.to_toml())?;
    // Addresses and the CA certificate only: public, like any client config.
    set_mode(&dir.join("client.toml"), 0o644)?;
    start_mount(&dir, "mount", mnt, &[], &mut children).await?;
    Ok(Demo {
        children,
        addrs,
        tls,
        token,
        mnt: mnt.to_path_buf(),
        version,
    })
}

/// Starts a mount of the demo cluster (client.toml in `dir`, cache `dir/cache-NAME`, log
/// `dir/NAME.log`) at `mnt`, added to `children`; returns when it is ready.
pub(crate) async fn start_mount(
    dir: &Path,
    name: &str,
    mnt: &Path,
    extra: &[&str],
    children: &mut Children,
) -> Result<()> {
    let cache = if name == "mount" {
        "cache".to_string()
    } else {
        format!("cache-{name}")
    };
    let mut mount_args = vec![
        "mount".to_string(),
        mnt.display().to_string(),
        "--foreground".into(),
        "--cache-dir".into(),
        dir.join(cache).display().to_string(),
        "--config".into(),
        dir.join("client.toml").display().to_string(),
    ];
    mount_args.push("--cache-size".into());
    mount_args.push("1G".into());
    mount_args.extend(extra.iter().map(|x| x.to_string()));
    let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
    let mut mount = own_child()?
        .args(&mount_args)
        .env("CODAFS_NOTIFY_READY", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .context("starting the mount")?;
    let stdout = mount.stdout.take().context("mount stdout")?;
    children.0.push((name.to_string(), mount));
    children.1.push(mnt.to_path_buf());
    let ready = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line);
        line
    });
    match tokio::time::timeout(Duration::from_secs(30), ready).await {
        Ok(Ok(l)) if l.trim() == "codafs-mount-ready" => {}
        _ => bail!(
            "the mount did not come up (see {})",
            dir.join(format!("{name}.log")).display()
        ),
    }

    Ok(())
}

/// A file every demo directory holds from its start: what lets the next demo wipe it.
const MARKER: &str = ".codafs-demo";

/// The demo wipes its directory at start, so it refuses one that holds anything it did not make
/// itself (`--dir .` or `--dir /var/lib/codafs` by mistake).
fn refuse_foreign_dir(dir: &Path) -> Result<()> {
    let mut entries = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    let ours = dir.join(MARKER).exists() || dir.join("demo.env").exists();
    if !ours && entries.next().is_some() {
        bail!(
            "{} is not empty and was not made by codafs demo; the demo wipes its --dir, so give \
             it a new or empty directory",
            dir.display()
        );
    }
    Ok(())
}

pub async fn run(a: DemoArgs) -> Result<()> {
    let dir = a.dir.clone();
    if dir.join("demo.env").exists() {
        let env = std::fs::read_to_string(dir.join("demo.env")).unwrap_or_default();
        if let Some(pid) = env
            .lines()
            .find_map(|l| l.strip_prefix("CODAFS_DEMO_PID="))
            .and_then(|p| p.parse::<i32>().ok())
        {
            if unsafe { libc::kill(pid, 0) } == 0 {
                bail!(
                    "a demo is already running from {} (pid {pid}); stop it first",
                    dir.display()
                );
            }
        }
    }
    if dir.exists() {
        refuse_foreign_dir(&dir)?;
        std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join(MARKER), "made by codafs demo; wiped by the next one\n")?;
    // Other local users (webmasters trying the demo, pjdfstest's dummy users) read the client
    // config and demo.env here; what is secret (server dirs, the admin credential, the cache)
    // sits in 0700 directories below, made so by the servers and the mount themselves.
    set_mode(&dir, 0o755)?;
    let d = start(&dir, &a.mount, true).await?;
    let (children, addrs, mnt, version) = (d.children, d.addrs, d.mnt, d.version);
    let sdir = |i: usize| dir.join(format!("s{}", i + 1));
    let pids: Vec<String> = children.0.iter().map(|(_, c)| c.id().to_string()).collect();
    let env = format!(
        "CODAFS_DEMO_PID={}\nCODAFS_SERVERS={}\nCODAFS_CONFIG={}\nCODAFS_CREDENTIAL={}\nCODAFS_MOUNT={}\nCODAFS_SERVER_PIDS={}\nCODAFS_MOUNT_PID={}\nCODAFS_SERVER_DIRS={}\n",
        std::process::id(),
        addrs.join(","),
        dir.join("client.toml").display(),
        sdir(0).join("admin.token").display(),
        mnt.display(),
        pids[..3].join(","),
        pids[3],
        (0..3).map(|i| sdir(i).display().to_string()).collect::<Vec<_>>().join(","),
    );
    std::fs::write(dir.join("demo.env"), env)?;
    // Paths and PIDs only (the credential is named, not included).
    set_mode(&dir.join("demo.env"), 0o644)?;
    println!("codafs demo is running (www at version {version}).");
    println!(
        "  servers     {} (data), {} (data), {} (witness)",
        addrs[0], addrs[1], addrs[2]
    );
    println!("  mounted at  {}", mnt.display());
    println!(
        "  settings    {}  (source it: set -a; . {0}; set +a)",
        dir.join("demo.env").display()
    );
    println!();
    println!("Try:");
    println!("  ls -R {}/www && cat {}/www/index.html", mnt.display(), mnt.display());
    println!("  codafs status {}          # cache and callbacks", mnt.display());
    println!(
        "  codafs status --config {} # the servers",
        dir.join("client.toml").display()
    );
    println!(
        "  echo hi > {}/www/hi.html     # refused: Read-only file system (no token for your uid)",
        mnt.display()
    );
    println!(
        "  codafs login --credential {} --config {}   # hand your uid the admin token; then it works",
        sdir(0).join("admin.token").display(),
        dir.join("client.toml").display()
    );
    println!("Ctrl-C stops the demo, unmounts and stops the servers.");

    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut children = children;
    let mut gone = vec![false; children.0.len()];
    let mut check = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = check.tick() => report_exits(&dir, &mut children, &mut gone),
        }
    }
    println!("stopping the demo...");
    drop(children);
    let _ = std::fs::remove_file(dir.join("demo.env"));
    println!("stopped.");
    Ok(())
}

/// Says once, on stderr, which of the demo's processes exited (a server killed to try a
/// failover, one that crashed), with the end of its log: the demo goes on without it.
fn report_exits(dir: &Path, children: &mut Children, gone: &mut [bool]) {
    for ((what, c), gone) in children.0.iter_mut().zip(gone.iter_mut()) {
        if *gone {
            continue;
        }
        if let Ok(Some(status)) = c.try_wait() {
            *gone = true;
            // Servers log to s1-s3.log, a mount to NAME.log.
            let log = match what.as_str() {
                "server 1" => "s1",
                "server 2" => "s2",
                "witness" => "s3",
                mount => mount,
            };
            eprintln!(
                "codafs demo: {what} exited ({status}); the demo goes on without it (Ctrl-C stops it). {}",
                log_tail(dir, log)
            );
        }
    }
}
