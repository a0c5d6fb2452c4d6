//! The `codafs` command: one binary for servers, cluster and volume administration and status.
//! Errors print one line (`codafs: …`) and exit 1; nothing here panics on bad input.
mod cluster;
mod opts;
mod output;
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
    /// Run a replica server (foreground; stops cleanly on SIGINT/SIGTERM).
    Server(cluster::ServerArgs),
    /// Create and manage the cluster: init, join tokens, membership, client config.
    #[command(subcommand)]
    Cluster(cluster::ClusterCmd),
    /// Create, list and inspect volumes.
    #[command(subcommand)]
    Volume(volume::VolumeCmd),
    /// Show the health of a server (role, term, log indices, blobs, repair backlog).
    Status {
        /// Server to ask (host:port). Without it, every server of the client config is asked.
        #[arg(long)]
        server: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientOpts,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_log = match cli.cmd {
        Cmd::Server(_) => "info,openraft=warn",
        _ => "warn,openraft=error",
    };
    codafs_common::telemetry::init(default_log);
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("codafs: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match cli.cmd {
            Cmd::Server(a) => cluster::server(a).await,
            Cmd::Cluster(c) => cluster::run(c).await,
            Cmd::Volume(v) => volume::run(v).await,
            Cmd::Status { server, json, client } => cluster::status(server, json, client).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("codafs: {e:#}");
            ExitCode::FAILURE
        }
    }
}
