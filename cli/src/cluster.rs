//! `codafs server`, `codafs cluster …` and `codafs status`.
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use codafs_client::transport::{ClientError, Tls};
use codafs_client::{ClientBundle, Cluster};
use codafs_common::join::JoinToken;
use codafs_common::token::{self, Claims, Role};
use codafs_proto::pb;
use codafs_server::config::{Bootstrap, ServerConfig, ADMIN_CREDENTIAL_FILE, BOOTSTRAP_FILE};

use crate::opts::ClientOpts;
use crate::output::bytes;

/// How long the admin credential created at init stays valid: long enough to set the cluster
/// up and give the admin account a password (`codafs user passwd admin`, which also ends this
/// credential), short enough that a copy left lying around soon stops being a master key.
/// After that, `codafs login admin` gives fresh tokens.
pub const ADMIN_TOKEN_DAYS: u64 = 7;

#[derive(Args)]
pub struct ServerArgs {
    /// Server directory (database, blobs, config). Created on first start.
    #[arg(long)]
    dir: PathBuf,
    /// Address to listen on; required on first start unless set by `cluster init`.
    #[arg(long)]
    listen: Option<String>,
    /// Address peers and clients use to reach this server [default: the listen address].
    #[arg(long)]
    advertise: Option<String>,
    /// Join an existing cluster with a token from `codafs cluster join-token` (first start only).
    #[arg(long)]
    join: Option<String>,
    /// Vote in Raft but store no blobs (a tie-breaker beside two data replicas). First start
    /// only: `codafs cluster role` switches a member later.
    #[arg(long)]
    witness: bool,
    /// Before starting, replace this server's TLS key and certificate with new ones for the
    /// same node id (signed here if this server holds the CA key, otherwise by one that does).
    #[arg(long)]
    rotate_cert: bool,
    /// Build a snapshot and compact the log every N entries (default 5000, at least 10).
    #[arg(long, value_name = "N", help_heading = "Tuning")]
    snapshot_every: Option<u64>,
    /// Repair pass interval, milliseconds (default 2000). A pass checks the blobs that commits
    /// referenced since the last one.
    #[arg(long, value_name = "MS", help_heading = "Tuning")]
    repair_interval_ms: Option<u64>,
    /// How often a repair pass checks every referenced blob, seconds (default 600), for blob
    /// files lost behind the server's back. Corruption found by scrub or reads starts one at
    /// once.
    #[arg(long, value_name = "SECS", help_heading = "Tuning")]
    full_repair_interval_s: Option<u64>,
    /// Scrub pass interval, seconds (default 86400, a day; 0 = never).
    #[arg(long, value_name = "SECS", help_heading = "Tuning")]
    scrub_interval_s: Option<u64>,
    /// Most a scrub pass reads, MiB per second (default 64). A pass takes turns of a few
    /// seconds with repair and GC. Saved in server.toml.
    #[arg(long, value_name = "MIB", help_heading = "Tuning")]
    scrub_rate_mib: Option<u64>,
    /// Grace period before unreferenced blobs are deleted, seconds (default 3600).
    #[arg(long, value_name = "SECS", help_heading = "Tuning")]
    gc_grace_s: Option<u64>,
    /// Free space to keep on the server directory's filesystem (e.g. 2G): blob puts that would
    /// leave less, and commits that add data while less is free, are refused. `auto` =
    /// max(1G, 5% of the filesystem). Saved in server.toml.
    #[arg(long, value_name = "SIZE", value_parser = parse_min_free)]
    min_free: Option<MinFree>,
    /// GC grace period while free space is under twice --min-free, seconds (default 60).
    #[arg(long, value_name = "SECS", help_heading = "Tuning")]
    gc_pressure_grace_s: Option<u64>,
    /// On a witness: most its spool may hold (e.g. 4G, the default). The spool keeps blobs for
    /// a data server that is down (hinted handoff), so publishing goes on without it; past this
    /// bound such writes fail. Saved in server.toml.
    #[arg(long, value_name = "SIZE", value_parser = crate::mount::parse_size)]
    spool_max: Option<u64>,
    /// Most request bytes this server holds before its handlers take them (e.g. 1G, the
    /// default): messages still arriving, which tonic reads whole before any token is checked.
    /// Any one account (a request with a valid token) or server may hold a quarter of
    /// it; callers with neither hold an eighth of it together and a sixty-fourth each (per
    /// address, per /64 for IPv6). A request past a bound fails with RESOURCE_EXHAUSTED. Saved
    /// in server.toml.
    #[arg(long, value_name = "SIZE", value_parser = crate::mount::parse_size, help_heading = "Tuning")]
    request_buffer_max: Option<u64>,
    /// Longest a connection may leave a reply unread, seconds (default 120): a caller that
    /// asks for blobs or listings and does not read them holds part of the reply budget (see
    /// --request-buffer-max); past this its connection is closed and the share is free again
    /// (counted in codafs_server_stalled_connections_closed_total). A client whose link is so
    /// slow that a reply waits longer than this behind its earlier ones is closed too: raise it
    /// for such links. Saved in server.toml.
    #[arg(long, value_name = "SECS", help_heading = "Tuning", value_parser = clap::value_parser!(u64).range(1..))]
    reply_stall_timeout: Option<u64>,
    /// Serve Prometheus metrics (GET /metrics) on this address, e.g. 127.0.0.1:9401; `off` to
    /// stop. Plain HTTP without authentication: bind it to loopback or a management network.
    /// Saved in server.toml. See docs/METRICS.md.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<String>,
}

/// What removing server `node_id` would break: a majority that the servers left cannot form
/// (counting only those that answer now), or volumes whose write quorum more data servers than
/// would remain. Empty when the removal is safe.
async fn removal_risks(c: &Cluster, node_id: u64) -> Result<Vec<String>> {
    let list = c.list_servers().await?;
    let Some(target) = list.servers.iter().find(|s| s.node_id == node_id) else {
        bail!("no server {node_id} in the cluster (see `codafs cluster servers`)");
    };
    // One status round over every server serves both checks below: the voters left that
    // answer, and the servers that hold the CA key.
    let all: Vec<String> = list.servers.iter().map(|s| s.addr.clone()).collect();
    let answers = c.status_each(&all).await;
    let mut risks = Vec::new();
    let (mut voters, mut answering) = (0, 0);
    for (s, answer) in list.servers.iter().zip(&answers) {
        if s.voter && s.node_id != node_id {
            voters += 1;
            answering += usize::from(answer.is_ok());
        }
    }
    if answering * 2 <= voters {
        risks.push(format!(
            "only {answering} of the {voters} voters left answer, no majority: nothing could be committed"
        ));
    }
    if !target.witness {
        risks.extend(fewer_data_servers(c, &list, node_id).await?);
    }
    // Joining servers get their certificates signed by a server holding the CA key: without
    // one, no server can join again. (Only servers that answer tell; an unanswering one is
    // not counted as a holder.)
    let holders: Vec<u64> = answers
        .iter()
        .flatten()
        .filter(|s| s.holds_ca_key)
        .map(|s| s.node_id)
        .collect();
    if holders == [node_id] {
        risks.push(format!(
            "server {node_id} is the only server that answers holding the cluster CA key, so no \
             new server could join after it goes: copy its DIR/tls/ca.key into another server's \
             DIR/tls/ and restart that one first (docs/SECURITY.md)"
        ));
    }
    Ok(risks)
}

/// The volumes whose write quorum more data servers than would remain without `node_id`.
async fn fewer_data_servers(c: &Cluster, list: &pb::ServerList, node_id: u64) -> Result<Vec<String>> {
    let data_left = list
        .servers
        .iter()
        .filter(|s| !s.witness && s.node_id != node_id)
        .count() as u32;
    let mut risks = Vec::new();
    for v in c.list_volumes(None).await? {
        if v.write_quorum > data_left {
            risks.push(format!(
                "volume {} needs {} copies of its content and only {data_left} data servers would remain, so its content writes would stop (add a data server first)",
                v.name, v.write_quorum
            ));
        }
    }
    Ok(risks)
}

fn role_name(witness: bool) -> &'static str {
    if witness {
        "witness"
    } else {
        "data server"
    }
}

/// Before `cluster remove`: a server that answers hands off everything it holds (a data server
/// by becoming a witness first). One that does not answer is left as it is.
async fn drain(c: &Cluster, node_id: u64) -> Result<()> {
    let list = c.list_servers().await?;
    let Some(target) = list.servers.iter().find(|s| s.node_id == node_id) else {
        bail!("no server {node_id} in the cluster (see `codafs cluster servers`)");
    };
    if let Err(e) = c.status_on(&target.addr).await {
        eprintln!("server {node_id} does not answer ({e}): removing it without draining");
        return Ok(());
    }
    if !target.witness {
        eprintln!("draining server {node_id}: it becomes a witness and hands its blobs to the other data servers");
        c.set_role(node_id, true).await?;
    }
    wait_handed_off(c, &target.addr, node_id).await.map_err(|e| {
        let undo = if target.witness {
            String::new()
        } else {
            format!(" It is a witness now; `codafs cluster role {node_id} data` undoes that.")
        };
        anyhow::anyhow!("not removing server {node_id}: {e:#}.{undo} Pass --no-drain to remove it anyway")
    })
}

/// What `cluster role` makes a server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ServerRole {
    /// Stores every blob, serves reads, counts toward write quorums.
    Data,
    /// Votes, stores no blobs of its own, keeps hints for data servers that are down.
    Witness,
}

/// How long a drain may go without progress before `cluster remove` or `cluster role` gives up
/// waiting (the server goes on handing off in the background).
const DRAIN_STALL: std::time::Duration = std::time::Duration::from_secs(120);

/// Waits until the server at `addr` (node `node_id`), a witness now or soon, holds nothing:
/// every blob it had is on every data server. Shows how many are left; gives up when nothing
/// moved for [`DRAIN_STALL`] (a data server down, say) and says so.
async fn wait_handed_off(c: &Cluster, addr: &str, node_id: u64) -> Result<()> {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    let mut least = u64::MAX;
    let mut last_progress = std::time::Instant::now();
    loop {
        let st = c
            .status_on(addr)
            .await
            .with_context(|| format!("server {node_id} stopped answering while it handed off its blobs"))?;
        if st.witness {
            if st.spool_blobs == 0 {
                bar.finish_and_clear();
                return Ok(());
            }
            if st.spool_blobs < least {
                least = st.spool_blobs;
                last_progress = std::time::Instant::now();
            }
            bar.set_message(format!(
                "server {node_id}: {} blobs ({}) left to hand to the data servers",
                st.spool_blobs,
                bytes(st.spool_bytes)
            ));
        } else {
            bar.set_message(format!("server {node_id}: waiting for it to take its new role"));
        }
        bar.tick();
        if last_progress.elapsed() > DRAIN_STALL {
            bar.finish_and_clear();
            bail!(
                "server {node_id} still holds {} blobs that some data server lacks, and none moved for {} s: is a data server down? `codafs cluster servers` shows; the server keeps handing them off in the background",
                st.spool_blobs,
                DRAIN_STALL.as_secs()
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

/// `--min-free`: a size, or `auto`.
#[derive(Clone, Copy, Debug)]
enum MinFree {
    Auto,
    Bytes(u64),
}

fn parse_min_free(s: &str) -> Result<MinFree, String> {
    if s.eq_ignore_ascii_case("auto") {
        return Ok(MinFree::Auto);
    }
    crate::mount::parse_size(s).map(MinFree::Bytes)
}

#[derive(Subcommand)]
pub enum ClusterCmd {
    /// Initialise the first server of a new cluster: cluster identity, signing key, TLS
    /// certificates (DIR/tls/: cluster CA and this server's certificate), admin credential
    /// (DIR/admin.token, valid 7 days) and client config (DIR/client.toml). Then run `codafs
    /// server --dir DIR`, give the admin account a password (`codafs user passwd admin`) and use
    /// `codafs login admin` from then on.
    Init {
        /// The first server's directory (database, blobs, keys, config): must not hold a
        /// cluster already.
        #[arg(long)]
        dir: PathBuf,
        /// Address this server will listen on (host:port).
        #[arg(long)]
        listen: String,
        /// Address peers and clients use [default: the listen address].
        #[arg(long)]
        advertise: Option<String>,
        /// Name of the admin account.
        #[arg(long, default_value = "admin")]
        admin: String,
        /// Create a cluster WITHOUT TLS: traffic unencrypted, servers unauthenticated, and anyone
        /// who can reach a server can send it Raft messages. Only for isolated test networks.
        #[arg(long)]
        insecure: bool,
    },
    /// Print a token that lets one new server join (`codafs server --join TOKEN`). Admin only.
    /// A token admits a single server and expires (default after one hour).
    JoinToken {
        /// How long the token stays valid: seconds, or with a unit (90s, 30m, 2h, 1d; at most 7d).
        #[arg(long, default_value = "1h", value_parser = parse_ttl)]
        ttl: u64,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// List the servers: kind, role, state (up or unreachable), lag (log entries behind the
    /// newest commit), blobs, blob data and free disk.
    Servers {
        /// Print JSON instead of text (for scripts and monitoring).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Remove a server from the membership (admin). It stops by itself (exit status 78) once
    /// removed. Refused, unless --force, when the servers left that answer would be no
    /// majority, when fewer data servers would remain than a volume's write quorum (its
    /// content writes would stop), or when it is the only server holding the cluster CA key
    /// (no server could join after it).
    /// A server that answers is drained first: a data server becomes a witness and hands every
    /// blob it holds to the other data servers, and a witness hands off what it keeps for them;
    /// it is removed once it holds nothing. A server that does not answer is removed at once.
    Remove {
        /// Node id as shown by `codafs cluster servers`.
        node_id: u64,
        /// Remove it even so (printing what breaks): for a dead server that must go.
        #[arg(long)]
        force: bool,
        /// Remove it without draining it first.
        #[arg(long)]
        no_drain: bool,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Make a server a data server or a witness (admin). A new witness hands every blob it
    /// holds to the data servers (this waits until it has, unless --no-wait), then keeps only
    /// hints; a new data server is filled by repair. Refused, unless --force, when fewer data
    /// servers would remain than a volume's write quorum.
    Role {
        /// Node id as shown by `codafs cluster servers`.
        node_id: u64,
        /// The new role.
        #[arg(value_enum)]
        role: ServerRole,
        /// Switch even so (printing what breaks).
        #[arg(long)]
        force: bool,
        /// Return at once instead of waiting for a new witness to hand off its blobs.
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Add a new token-signing key (admin). Tokens signed with older keys keep working until
    /// those keys are retired; retiring a key revokes every token it signed, the admin token
    /// from `cluster init` included (log in with a password first).
    RotateKey {
        /// Also retire this key id (see the ids printed by this command).
        #[arg(long)]
        retire: Option<u32>,
        /// Only retire; do not add a new key.
        #[arg(long, requires = "retire")]
        no_new_key: bool,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Print the client-config bundle (server addresses) that mounts and CLIs need.
    ClientConfig {
        #[command(flatten)]
        client: ClientOpts,
    },
}

/// A duration for `--ttl`: seconds, or a number with s, m, h or d; returned in seconds.
fn parse_ttl(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 90s, 30m, 2h, 1d)"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("unknown unit {unit:?} in {s:?} (use s, m, h or d)")),
    };
    match n.checked_mul(mult) {
        Some(0) | None => Err(format!("{s:?} is not a usable duration")),
        Some(v) => Ok(v),
    }
}

/// A `--ttl` in the largest unit that divides it.
fn show_ttl(secs: u64) -> String {
    match secs {
        s if s % 86400 == 0 => format!("{} d", s / 86400),
        s if s % 3600 == 0 => format!("{} h", s / 3600),
        s if s % 60 == 0 => format!("{} min", s / 60),
        s => format!("{s} s"),
    }
}

fn write_private(path: &Path, data: &str) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    std::io::Write::write_all(&mut f, data.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

pub async fn server(a: ServerArgs) -> Result<()> {
    let join = a.join.as_deref().map(JoinToken::decode).transpose()?;
    if a.dir.exists() && !a.dir.is_dir() {
        bail!("--dir {}: not a directory", a.dir.display());
    }
    let mut cfg = match ServerConfig::load(&a.dir)? {
        Some(c) => {
            if a.witness && !c.witness {
                bail!(
                    "{} is a data server (server.toml); --witness applies to a new directory only. To make a cluster member a witness, run `codafs cluster role {} witness`",
                    a.dir.display(),
                    c.node_id
                );
            }
            c
        }
        None => {
            let listen = a
                .listen
                .clone()
                .context("first start of a server needs --listen HOST:PORT")?;
            if a.join.is_none() && !a.dir.join(BOOTSTRAP_FILE).exists() {
                bail!(
                    "{} is not part of a cluster: run `codafs cluster init` for the first server, or pass --join TOKEN",
                    a.dir.display()
                );
            }
            check_addresses(&listen, a.advertise.as_deref())?;
            let mut c = ServerConfig::new(listen, a.witness);
            // A joining server speaks whatever its cluster speaks; the token says which.
            c.insecure = join.as_ref().is_some_and(|t| t.insecure);
            c
        }
    };
    // Only once the arguments hold: a refused first start leaves no empty directory behind.
    std::fs::create_dir_all(&a.dir).with_context(|| format!("creating {}", a.dir.display()))?;
    if let Some(l) = a.listen {
        cfg.listen = l;
    }
    if let Some(ad) = a.advertise {
        cfg.advertise = ad;
    }
    if cfg.advertise.is_empty() {
        cfg.advertise = cfg.listen.clone();
    }
    if let Some(v) = a.snapshot_every {
        cfg.snapshot_every = v.max(10);
    }
    if let Some(v) = a.full_repair_interval_s {
        cfg.full_repair_interval_s = v;
    }
    if let Some(v) = a.repair_interval_ms {
        cfg.repair_interval_ms = v;
    }
    if let Some(v) = a.scrub_interval_s {
        cfg.scrub_interval_s = v;
    }
    if let Some(v) = a.scrub_rate_mib {
        cfg.scrub_rate_mib = v;
    }
    if let Some(v) = a.gc_grace_s {
        cfg.gc_grace_s = v;
    }
    if let Some(v) = a.gc_pressure_grace_s {
        cfg.gc_pressure_grace_s = v;
    }
    if let Some(v) = a.spool_max {
        cfg.spool_max_bytes = Some(v);
    }
    if let Some(v) = a.request_buffer_max {
        cfg.request_buffer_bytes = Some(v);
    }
    if let Some(v) = a.reply_stall_timeout {
        cfg.reply_stall_s = Some(v);
    }
    match a.min_free {
        Some(MinFree::Auto) => cfg.min_free_bytes = None,
        Some(MinFree::Bytes(b)) => cfg.min_free_bytes = Some(b),
        None => {}
    }
    match a.metrics_listen {
        Some(m) if m.eq_ignore_ascii_case("off") => cfg.metrics_listen = None,
        Some(m) => cfg.metrics_listen = Some(m),
        None => {}
    }
    cfg.save(&a.dir)?;
    codafs_server::run(&a.dir, cfg, join, a.rotate_cert, shutdown_signal()).await?;
    Ok(())
}

pub async fn run(cmd: ClusterCmd) -> Result<()> {
    match cmd {
        ClusterCmd::Init {
            dir,
            listen,
            advertise,
            admin,
            insecure,
        } => init(&dir, listen, advertise, &admin, insecure),
        ClusterCmd::JoinToken { ttl, client } => {
            client.required_token()?;
            let c = client.cluster()?;
            println!("{}", c.join_token(ttl).await?);
            eprintln!("codafs: this token admits ONE server and expires in {}", show_ttl(ttl));
            Ok(())
        }
        ClusterCmd::Servers { json, client } => {
            let list = servers(&client).await?;
            let c = client.cluster()?;
            // Each server's own view: state, how far behind the leader's commit it has
            // applied, and its blobs and disk. An unreachable server says so.
            let addrs: Vec<String> = list.servers.iter().map(|s| s.addr.clone()).collect();
            let rows: Vec<_> = list.servers.iter().zip(c.status_each(&addrs).await).collect();
            let committed = rows
                .iter()
                .filter_map(|(_, st)| st.as_ref().ok())
                .map(|st| st.commit_index)
                .max()
                .unwrap_or(0);
            let role = |s: &pb::ServerInfo| {
                if s.node_id == list.leader_id {
                    "leader"
                } else if s.voter {
                    "voter"
                } else {
                    "learner"
                }
            };
            if json {
                let v: Vec<_> = rows
                    .iter()
                    .map(|(s, st)| {
                        let mut j = serde_json::json!({"node_id": s.node_id, "addr": s.addr, "witness": s.witness, "voter": s.voter, "leader": s.node_id == list.leader_id});
                        match st {
                            Ok(st) => {
                                j["state"] = "up".into();
                                j["lag"] = committed.saturating_sub(st.applied_index).into();
                                j["blob_count"] = st.blob_count.into();
                                j["blob_bytes"] = st.blob_bytes.into();
                                j["disk_free_bytes"] = st.disk_free_bytes.into();
                                j["disk_total_bytes"] = st.disk_total_bytes.into();
                                if s.witness {
                                    j["spool_blobs"] = st.spool_blobs.into();
                                    j["spool_bytes"] = st.spool_bytes.into();
                                    j["spool_limit_bytes"] = st.spool_limit_bytes.into();
                                }
                            }
                            Err(e) => {
                                j["state"] = "unreachable".into();
                                j["error"] = e.to_string().into();
                            }
                        }
                        j
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                println!(
                    "{:<20} {:<22} {:<8} {:<8} {:<11} {:>6} {:>8} {:>10} {:>10}",
                    "NODE", "ADDRESS", "KIND", "ROLE", "STATE", "LAG", "BLOBS", "BLOB DATA", "DISK FREE"
                );
                for (s, st) in &rows {
                    let kind = if s.witness { "witness" } else { "data" };
                    match st {
                        Ok(st) => println!(
                            "{:<20} {:<22} {:<8} {:<8} {:<11} {:>6} {:>8} {:>10} {:>10}",
                            s.node_id,
                            s.addr,
                            kind,
                            role(s),
                            "up",
                            committed.saturating_sub(st.applied_index),
                            st.blob_count,
                            crate::output::bytes(st.blob_bytes),
                            crate::output::bytes(st.disk_free_bytes)
                        ),
                        Err(e) => println!(
                            "{:<20} {:<22} {:<8} {:<8} unreachable: {e}",
                            s.node_id,
                            s.addr,
                            kind,
                            role(s)
                        ),
                    }
                }
                for (s, st) in &rows {
                    if let Ok(st) = st {
                        if s.witness && st.spool_blobs > 0 {
                            println!("witness {}: {}", s.node_id, spool_line(st));
                        }
                    }
                }
            }
            Ok(())
        }
        ClusterCmd::Remove {
            node_id,
            force,
            no_drain,
            client,
        } => {
            client.required_token()?;
            let c = client.cluster()?;
            let risks = removal_risks(&c, node_id).await?;
            if !risks.is_empty() {
                if !force {
                    bail!(
                        "not removing server {node_id}: {}. Pass --force to remove it anyway",
                        risks.join("; ")
                    );
                }
                eprintln!(
                    "codafs: WARNING: removing server {node_id} although {}",
                    risks.join("; ")
                );
            }
            if !no_drain {
                drain(&c, node_id).await?;
            }
            c.remove_server(node_id).await?;
            println!("removed server {node_id}");
            Ok(())
        }
        ClusterCmd::Role {
            node_id,
            role,
            force,
            no_wait,
            client,
        } => {
            client.required_token()?;
            let c = client.cluster()?;
            let list = c.list_servers().await?;
            let Some(target) = list.servers.iter().find(|s| s.node_id == node_id) else {
                bail!("no server {node_id} in the cluster (see `codafs cluster servers`)");
            };
            let witness = role == ServerRole::Witness;
            if target.witness == witness {
                println!("server {node_id} is already a {}", role_name(witness));
                return Ok(());
            }
            if witness {
                let risks = fewer_data_servers(&c, &list, node_id).await?;
                if !risks.is_empty() {
                    if !force {
                        bail!(
                            "not making server {node_id} a witness: {}. Pass --force to switch it anyway",
                            risks.join("; ")
                        );
                    }
                    eprintln!(
                        "codafs: WARNING: making server {node_id} a witness although {}",
                        risks.join("; ")
                    );
                }
            }
            c.set_role(node_id, witness).await?;
            println!("server {node_id} is now a {}", role_name(witness));
            if witness && !no_wait {
                wait_handed_off(&c, &target.addr, node_id).await?;
                println!("server {node_id} has handed every blob it held to the data servers");
            } else if !witness {
                println!("repair fills it with every referenced blob (`codafs cluster servers` shows its blob count)");
            }
            Ok(())
        }
        ClusterCmd::RotateKey {
            retire,
            no_new_key,
            client,
        } => {
            client.required_token()?;
            let c = client.cluster()?;
            let req = pb::RotateKeyRequest {
                add: !no_new_key,
                retire,
            };
            let keys = c.rotate_key(req).await?;
            let ids: Vec<String> = keys.key_ids.iter().map(u32::to_string).collect();
            println!("signing keys: {} (current: {})", ids.join(", "), keys.current);
            Ok(())
        }
        ClusterCmd::ClientConfig { client } => {
            let list = servers(&client).await?;
            let c = client.cluster()?;
            let st = c.status().await?;
            // The CA that just verified the servers is the one clients should trust.
            let bundle = ClientBundle::new(
                st.cluster_id,
                list.servers.into_iter().map(|s| s.addr).collect(),
                c.tls(),
            );
            print!("{}", bundle.to_toml());
            Ok(())
        }
    }
}

async fn servers(client: &ClientOpts) -> Result<pb::ServerList> {
    Ok(client.cluster()?.list_servers().await?)
}

/// Refuses a listen address that cannot be bound (no port, a host that does not resolve) or
/// advertised: one that names every interface (`0.0.0.0`, `[::]`) needs `--advertise`, since
/// peers, join tokens and client configs are given the advertised address. Checked before
/// anything is written: a cluster made with an address it can never use had to be deleted
/// and made again.
fn check_addresses(listen: &str, advertise: Option<&str>) -> Result<()> {
    use std::net::ToSocketAddrs;
    let resolved: Vec<std::net::SocketAddr> = listen
        .to_socket_addrs()
        .with_context(|| format!("--listen {listen}: not a HOST:PORT this machine can listen on"))?
        .collect();
    match advertise {
        Some(a) => {
            a.to_socket_addrs()
                .with_context(|| format!("--advertise {a}: not a HOST:PORT that resolves"))?;
        }
        None if resolved.iter().any(|r| r.ip().is_unspecified()) => bail!(
            "--listen {listen} names every interface, which other machines cannot connect to: \
             pass --advertise HOST:PORT, the address peers and clients reach this server at"
        ),
        None => {}
    }
    Ok(())
}

pub fn init(dir: &Path, listen: String, advertise: Option<String>, admin: &str, insecure: bool) -> Result<()> {
    init_server(dir, listen, advertise, admin, insecure, true)
}

/// [`init`], printing what it made only if `tell` (`codafs bench --json` keeps stdout for its
/// report).
pub fn init_server(
    dir: &Path,
    listen: String,
    advertise: Option<String>,
    admin: &str,
    insecure: bool,
    tell: bool,
) -> Result<()> {
    macro_rules! say {
        ($($t:tt)*) => {
            if tell {
                println!($($t)*)
            }
        };
    }
    if ServerConfig::load(dir)?.is_some() {
        bail!(
            "{} already holds a server; refusing to initialise over it",
            dir.display()
        );
    }
    codafs_common::names::validate_account_name(admin).context("admin account name")?;
    check_addresses(&listen, advertise.as_deref())?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // A CA's cluster id is its key's (clients trust it from the CA alone); a plaintext
    // cluster's is random.
    let ca = if insecure {
        None
    } else {
        Some(codafs_server::tls::new_cluster_ca()?)
    };
    let cluster_id = match &ca {
        Some((id, _)) => id.clone(),
        None => hex::encode(rand::random::<[u8; 12]>()),
    };
    let key: [u8; 32] = rand::random();
    let mut cfg = ServerConfig::new(listen, false);
    if let Some(a) = advertise {
        cfg.advertise = a;
    }
    cfg.insecure = insecure;
    let tls = match ca {
        None => Tls::Insecure,
        Some((_, ca)) => {
            codafs_server::tls::install_with_ca(dir, &ca, cfg.node_id, cfg.advertised())?;
            Tls::ca(ca.cert_pem)
        }
    };
    let bootstrap = Bootstrap {
        cluster_id: cluster_id.clone(),
        key,
        admin_user: admin.to_string(),
    };
    write_private(&dir.join(BOOTSTRAP_FILE), &serde_json::to_string(&bootstrap)?)?;
    let claims = Claims {
        user: admin.to_string(),
        role: Role::Admin,
        cluster: cluster_id.clone(),
        key_id: 1,
        expires: token::unix_now() + ADMIN_TOKEN_DAYS * 86400,
        generation: 0,
    };
    write_private(&dir.join(ADMIN_CREDENTIAL_FILE), &token::sign(&claims, &key))?;
    let bundle = ClientBundle::new(cluster_id.clone(), vec![cfg.advertised().to_string()], &tls);
    std::fs::write(dir.join("client.toml"), bundle.to_toml())?;
    cfg.save(dir)?;
    say!("initialised cluster {cluster_id} in {}", dir.display());
    say!("  start it:          codafs server --dir {}", dir.display());
    say!(
        "  admin credential:  {} (valid {ADMIN_TOKEN_DAYS} days: give {admin} a password with `codafs user passwd {admin}`, then `codafs login {admin}`)",
        dir.join(ADMIN_CREDENTIAL_FILE).display()
    );
    say!("  client config:     {}", dir.join("client.toml").display());
    if insecure {
        eprintln!(
            "codafs: WARNING: this cluster runs WITHOUT TLS (--insecure): traffic is unencrypted and unauthenticated"
        );
    } else {
        let tls_dir = dir.join(codafs_server::tls::TLS_DIR);
        say!(
            "  TLS:               cluster CA and server certificate in {}",
            tls_dir.display()
        );
        say!(
            "  CA key:            {} (only this server has it; keep an offline copy, see docs/SECURITY.md)",
            tls_dir.join(codafs_server::tls::CA_KEY_FILE).display()
        );
    }
    Ok(())
}

pub async fn status(server: Option<String>, json: bool, client: ClientOpts) -> Result<()> {
    let one_server = server.is_some();
    let targets = match server {
        Some(s) => vec![s],
        None => client.servers()?,
    };
    // Status details need a token; without one, servers only answer whether they are ready.
    let Some(token) = client.token()? else {
        return health(&targets, json, &client).await;
    };
    let c = Cluster::new(&targets, client.tls()?, Some(token))?;
    let mut targets = targets;
    // A client config made before servers joined lists fewer than there are: the membership
    // names the others, which are shown too (and the config's staleness said).
    let mut unlisted = Vec::new();
    let mut membership = None;
    if !one_server {
        if let Ok(list) = c.list_servers().await {
            for s in &list.servers {
                if !targets.contains(&s.addr) {
                    unlisted.push(s.addr.clone());
                    targets.push(s.addr.clone());
                }
            }
            membership = Some(list);
        }
    }
    let mut rows = Vec::new();
    let mut failed = 0;
    for (addr, r) in targets.iter().zip(c.status_each(&targets).await) {
        match r {
            Ok(st) => rows.push((addr.clone(), Some(st))),
            Err(e) => {
                failed += 1;
                rows.push((addr.clone(), None));
                if !json {
                    eprintln!("{}", unreachable(addr, &e));
                }
            }
        }
    }
    if json {
        let v: Vec<_> = rows
            .iter()
            .map(|(addr, st)| match st {
                Some(s) => serde_json::json!({
                    "addr": addr, "reachable": true, "node_id": s.node_id, "role": s.role, "term": s.term,
                    "leader_id": s.leader_id, "last_log_index": s.last_log_index, "commit_index": s.commit_index,
                    "applied_index": s.applied_index, "snapshot_index": s.snapshot_index, "witness": s.witness,
                    "blob_count": s.blob_count, "blob_bytes": s.blob_bytes, "blob_bytes_received": s.blob_bytes_received,
                    "repair_backlog": s.repair_backlog,
                    "corrupt_found": s.corrupt_found, "cluster_id": s.cluster_id, "voters": s.voters, "servers": s.servers,
                    "disk_free_bytes": s.disk_free_bytes, "disk_total_bytes": s.disk_total_bytes,
                    "disk_min_free_bytes": s.disk_min_free_bytes, "space_refusals": s.space_refusals,
                    "spool_blobs": s.spool_blobs, "spool_bytes": s.spool_bytes, "spool_limit_bytes": s.spool_limit_bytes,
                    "holds_ca_key": s.holds_ca_key,
                }),
                None => serde_json::json!({"addr": addr, "reachable": false}),
            })
            .collect();
        println!("{}", serde_json::Value::Array(v));
    } else {
        for (addr, st) in &rows {
            let Some(s) = st else { continue };
            println!(
                "server {addr} (node {}{})",
                s.node_id,
                if s.witness { ", witness" } else { "" }
            );
            println!("  role        {} (term {}, leader {})", s.role, s.term, s.leader_id);
            println!(
                "  log         last {}  committed {}  applied {}  snapshot {}",
                s.last_log_index, s.commit_index, s.applied_index, s.snapshot_index
            );
            println!(
                "  cluster     {} ({} servers, {} voters)",
                s.cluster_id, s.servers, s.voters
            );
            if !s.witness {
                println!(
                    "  blobs       {} ({}), repair backlog {}, corrupt found {}, {} newly stored since start",
                    s.blob_count,
                    bytes(s.blob_bytes),
                    s.repair_backlog,
                    s.corrupt_found,
                    bytes(s.blob_bytes_received)
                );
            }
            if s.witness {
                println!("  spool       {}", spool_line(s));
            }
            println!("  disk        {}", disk_line(s));
            if s.holds_ca_key {
                println!("  CA key      held here: signs the certificates of joining servers");
            }
        }
        if let Some(list) = &membership {
            for line in what_answers(list, &rows) {
                println!("{line}");
            }
        }
        if !unlisted.is_empty() {
            eprintln!(
                "note: {} not in the client config (it predates them); mounts and commands given it \
                 do not use them: refresh it with `codafs cluster client-config`",
                unlisted.join(", ")
            );
        }
    }
    if failed > 0 {
        bail!("{failed} of {} servers unreachable", targets.len());
    }
    Ok(())
}

/// What the servers that answer can do together: whether commits can reach a majority of the
/// voters, and whether content can be written and read (at least one data server; a witness
/// holds hints for a missing one, see docs/SEMANTICS.md). `rows`: each server's status, `None`
/// if it did not answer.
fn what_answers(list: &pb::ServerList, rows: &[(String, Option<pb::ServerStatus>)]) -> Vec<String> {
    let answers = |addr: &str| rows.iter().any(|(a, st)| a == addr && st.is_some());
    let count = |f: &dyn Fn(&pb::ServerInfo) -> bool| {
        let all: Vec<&pb::ServerInfo> = list.servers.iter().filter(|s| f(s)).collect();
        (all.iter().filter(|s| answers(&s.addr)).count(), all.len())
    };
    let (voters_up, voters) = count(&|s| s.voter);
    let (data_up, data) = count(&|s| !s.witness);
    let (witnesses_up, witnesses) = count(&|s| s.witness);
    let mut out = vec![format!(
        "summary: {voters_up} of {voters} voters answer ({}); {data_up} of {data} data servers answer{}",
        if voters_up * 2 > voters {
            "a majority: changes commit"
        } else {
            "no majority: no change can commit until more are back"
        },
        if witnesses > 0 {
            format!(", {witnesses_up} of {witnesses} witnesses")
        } else {
            String::new()
        }
    )];
    if data_up == 0 && data > 0 {
        out.push(
            "  no data server answers: content cannot be written (each write needs a copy on a data \
             server), and only content already cached on a mount can be read"
                .into(),
        );
    } else if data_up < data {
        out.push(format!(
            "  {} data server(s) down: content writes go on only while the copies that answer (with a \
             witness's hints for the missing ones) reach each volume's write quorum",
            data - data_up
        ));
    }
    out
}

/// A witness's spool, e.g. `3 blobs (1.2 MiB of 4.0 GiB) held for data servers that are down`.
fn spool_line(s: &pb::ServerStatus) -> String {
    if s.spool_blobs == 0 {
        return format!("empty (bound {})", bytes(s.spool_limit_bytes));
    }
    format!(
        "{} blobs ({} of {}) relayed or held for data servers that are down; handed off when they are back",
        s.spool_blobs,
        bytes(s.spool_bytes),
        bytes(s.spool_limit_bytes)
    )
}

/// Free space against the watermark, e.g. `12.0 GiB free of 100.0 GiB, min free 5.0 GiB (ok)`.
fn disk_line(s: &pb::ServerStatus) -> String {
    if s.disk_total_bytes == 0 {
        return "unknown (the server did not report it)".into();
    }
    let state = if s.disk_free_bytes < s.disk_min_free_bytes {
        "LOW: refusing puts and commits that add data"
    } else if s.disk_free_bytes < s.disk_min_free_bytes.saturating_mul(2) {
        "pressure: GC collects sooner"
    } else {
        "ok"
    };
    let mut line = format!(
        "{} free of {}, min free {} ({state})",
        bytes(s.disk_free_bytes),
        bytes(s.disk_total_bytes),
        bytes(s.disk_min_free_bytes)
    );
    if s.space_refusals > 0 {
        line.push_str(&format!(", {} refused for space", s.space_refusals));
    }
    line
}

/// Why server `addr` gave no status, naming it once (see [`ClientError::about`]).
fn unreachable(addr: &str, e: &ClientError) -> String {
    format!("unreachable: {}", e.about(addr))
}

/// `codafs status` without credentials: each server's unauthenticated health answer.
async fn health(targets: &[String], json: bool, client: &ClientOpts) -> Result<()> {
    let c = Cluster::new(targets, client.tls()?, None)?;
    let mut rows = Vec::new();
    for addr in targets {
        let r = c.health_on(addr).await;
        if let Err(e) = &r {
            if !json {
                eprintln!("{}", unreachable(addr, e));
            }
        }
        rows.push((addr.clone(), r.ok().map(|h| h.ready)));
    }
    if json {
        let v: Vec<_> = rows
            .iter()
            .map(|(addr, ready)| serde_json::json!({"addr": addr, "reachable": ready.is_some(), "ready": ready.unwrap_or(false)}))
            .collect();
        println!("{}", serde_json::Value::Array(v));
    } else {
        for (addr, ready) in &rows {
            if let Some(r) = ready {
                println!(
                    "server {addr}: {}",
                    if *r {
                        "ready"
                    } else {
                        "not ready (no leader or not caught up)"
                    }
                );
            }
        }
        eprintln!("(no credential: only health is shown; log in or set CODAFS_CREDENTIAL for details)");
    }
    let failed = rows.iter().filter(|(_, r)| r.is_none()).count();
    if failed > 0 {
        bail!("{failed} of {} servers unreachable", targets.len());
    }
    Ok(())
}
