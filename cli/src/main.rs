//! The `codafs` command: one binary for servers, cluster and volume administration and status.
//! Errors print one line (`codafs: …`) and exit 1; nothing here panics on bad input.
mod bench;
mod cluster;
mod demo;
mod fstab;
mod mount;
mod opts;
mod output;
mod upload;
mod user;
mod volume;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use opts::ClientOpts;

/// codafs: a replicated, caching distributed filesystem for web content.
///
/// Replica servers keep volumes under read/write quorum (metadata by Raft consensus, contents as
/// content-addressed blobs); web nodes mount one uniform /coda tree. See README.md and docs/ for
/// the full picture.
#[derive(Parser)]
#[command(name = "codafs", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a replica server (foreground; stops cleanly on SIGINT/SIGTERM). Every setting
    /// given is saved in DIR/server.toml and kept on later starts.
    Server(cluster::ServerArgs),
    /// Create and manage the cluster: init, join tokens, membership, client config.
    #[command(subcommand)]
    Cluster(cluster::ClusterCmd),
    /// Manage accounts: add, list, passwd, remove, revoke (admins; any user may revoke their own tokens).
    #[command(subcommand)]
    User(user::UserCmd),
    /// Log in: exchange a password for a token, stored for later commands and handed to every
    /// running mount, which then accepts writes from your uid.
    Login(user::LoginArgs),
    /// Forget the stored token and drop it from every running mount of its cluster.
    Logout(user::LogoutArgs),
    /// Publish a local directory into VOLUME[:PATH] as one atomic commit.
    Upload(upload::UploadArgs),
    /// Create, list and inspect volumes.
    #[command(subcommand)]
    Volume(volume::VolumeCmd),
    /// Start a local demo: 2 data servers + 1 witness on loopback, volume `www` with a sample
    /// site, mounted at /coda. Stays in the foreground; Ctrl-C stops everything.
    Demo(demo::DemoArgs),
    /// Benchmark codafs against local disk on this machine (web reads, nginx, publish,
    /// callbacks, failover), each as a ratio to the local baseline measured in the same run.
    Bench(Box<bench::BenchArgs>),
    /// Mount the cluster's volumes (one directory per volume) at MOUNTPOINT.
    Mount(mount::MountArgs),
    /// Pull a volume or subtree of a mount into the cache (warm a node before it serves).
    /// Fails when the tree is larger than the mount's cache (--cache-size).
    Prefetch(mount::PrefetchArgs),
    /// Health of a mount (MNT: connectivity, versions, cache) or of servers (role, term, log
    /// indices, blobs, repair backlog).
    Status {
        /// A codafs mountpoint to report on (or any path inside one).
        #[arg(value_name = "MNT")]
        mountpoint: Option<std::path::PathBuf>,
        /// Ask only this server (host:port). Without it (and without MNT), every server of
        /// --server-addr or the client config is asked, and every member they know of.
        #[arg(long, value_name = "HOST:PORT")]
        server: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Wait until every change a writable mount logged before now is on the servers (the
    /// write-back log drained that far).
    Sync {
        /// A codafs mountpoint (or any path inside one, e.g. /coda/www).
        mountpoint: std::path::PathBuf,
        /// Give up (exit 1, changes stay logged) after this many seconds.
        #[arg(long, default_value_t = 60.0, value_name = "SECS", value_parser = mount::parse_timeout)]
        timeout: f64,
    },
    /// Print a shell completion script for SHELL to stdout, e.g.
    /// `codafs completions bash > /etc/bash_completion.d/codafs`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

fn main() -> ExitCode {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let cli = match argv.first() {
        Some(argv0) if fstab::is_helper(argv0) => match fstab::translate(&argv) {
            Ok(args) => Cli::parse_from(args),
            Err(e) => return finish(Err(anyhow::anyhow!(e))),
        },
        _ => Cli::parse(),
    };
    if !matches!(cli.cmd, Cmd::Server(_) | Cmd::Mount(_) | Cmd::Demo(_) | Cmd::Bench(_)) {
        quiet_on_closed_stdout();
    }
    let default_log = match cli.cmd {
        Cmd::Server(_) | Cmd::Mount(_) => "info,openraft=warn",
        _ => "warn,openraft=error",
    };
    // Everything a codafs command creates (server directories, keys, databases, credentials,
    // caches, logs) is its owner's alone, whatever umask it was started with; the few things
    // meant for others (a mount's control socket) set their modes explicitly.
    codafs_common::perms::private_umask();
    let log_file = match &cli.cmd {
        Cmd::Mount(a) => a.log_file.clone(),
        _ => None,
    };
    match log_file {
        Some(path) => {
            if let Err(e) = codafs_common::telemetry::init_file(default_log, &path) {
                codafs_common::telemetry::init(default_log);
                tracing::warn!(path = %path.display(), error = %e, "cannot log to the file; logging to stderr");
            }
        }
        None => codafs_common::telemetry::init(default_log),
    }
    // The mount runs its own runtime (and may detach); prefetch is plain threads.
    let result = match cli.cmd {
        Cmd::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "codafs", &mut std::io::stdout());
            Ok(())
        }
        Cmd::Mount(a) => mount::mount(a),
        Cmd::Prefetch(a) => mount::prefetch(a),
        Cmd::Sync { mountpoint, timeout } => mount::sync(&mountpoint, timeout),
        other => run_async(other),
    };
    finish(result)
}

fn run_async(cmd: Cmd) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))?;
    rt.block_on(async move {
        match cmd {
            Cmd::Server(a) => cluster::server(a).await,
            Cmd::Cluster(c) => cluster::run(c).await,
            Cmd::Volume(v) => volume::run(v).await,
            Cmd::User(u) => user::run(u).await,
            Cmd::Login(a) => user::login(a).await,
            Cmd::Logout(a) => user::logout(&a),
            Cmd::Upload(a) => upload::run(a).await,
            Cmd::Demo(a) => demo::run(a).await,
            Cmd::Bench(a) => bench::run(*a).await,
            Cmd::Mount(_) | Cmd::Prefetch(_) | Cmd::Completions { .. } | Cmd::Sync { .. } => {
                anyhow::bail!("internal error: mount, prefetch and completions run outside the runtime")
            }
            Cmd::Status {
                mountpoint: Some(m),
                json,
                ..
            } => mount::print_mount_status(&m, json),
            Cmd::Status {
                mountpoint: None,
                server,
                json,
                client,
            } => cluster::status(server, json, client).await,
        }
    })
}

/// A command whose output goes to a pipe that closes (`codafs status | head -1`) ends quietly
/// with status 141, as one killed by SIGPIPE does, instead of panicking in `println!`.
/// SIGPIPE itself stays ignored (Rust's default): its default action would also kill a
/// command whose connection to a server broke mid-write (TLS writes with `writev`, which
/// raises it), with no message and no failover to another server.
fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or_default();
        // `println!`'s panic, or a library's that wrote to stdout (completions).
        if msg.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info);
    }));
}

fn finish(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("codafs: {e:#}");
            match e.downcast_ref::<codafs_server::ServerError>() {
                // Not worth restarting (the systemd unit says so with this status).
                Some(codafs_server::ServerError::Removed(_)) => ExitCode::from(codafs_server::REMOVED_EXIT_STATUS),
                _ => ExitCode::FAILURE,
            }
        }
    }
}
