//! codafs replica server.
//!
//! Layout: [`fsm`] is the deterministic metadata state machine (no I/O); [`db`] stores its
//! tables and the Raft log in RocksDB; [`raft`] wires openraft to both and to the gRPC
//! transport; [`blobs`] stores file contents and keeps them replicated; [`grpc`] holds the thin
//! services; [`node`] is the running server they share. [`run`] starts all of it.
pub mod access;
pub mod auth;
pub mod blobs;
pub mod body_budget;
pub mod changes;
pub mod config;
pub mod conn_limit;
pub mod conn_watch;
pub mod db;
pub mod fsm;
pub mod grpc;
pub mod join;
pub mod metrics;
pub mod node;
pub mod peers;
pub mod pending;
pub mod raft;
pub mod removal;
pub mod reply_budget;
pub mod role;
pub mod rotate;
pub mod subscribers;
pub mod tasks;
pub mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use codafs_common::join::JoinToken;
use codafs_proto::limits::{MAX_MESSAGE, MAX_RAFT_MESSAGE, MAX_SMALL_REQUEST};
use codafs_proto::pb;
use futures::StreamExt;
use tokio::sync::watch;

use crate::config::{Bootstrap, ServerConfig, BOOTSTRAP_FILE};
use crate::fsm::{AccountRec, Command, StateView};
use crate::node::{Counters, Node};
use crate::raft::NodeInfo;

/// Why a server could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("opening database in {0}: {1}")]
    Db(PathBuf, rocksdb::Error),
    #[error("opening blob store: {0}")]
    Blobs(#[from] blobs::BlobError),
    #[error("raft: {0}")]
    Raft(String),
    #[error("cannot listen on {0}: {1}")]
    Listen(String, std::io::Error),
    #[error("{0}")]
    Bootstrap(String),
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("TLS listener: {0}")]
    TlsListener(String),
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// This server was removed from the cluster (see `removal`); it stopped.
    #[error("{0}")]
    Removed(String),
}

/// The TLS material of this server: loaded from `dir/tls/`, or (first start of a joining
/// server) a new key with a certificate signed by a server holding the CA key. `None` on an
/// `--insecure` server.
async fn server_tls(
    dir: &Path,
    cfg: &ServerConfig,
    join: Option<&JoinToken>,
) -> Result<Option<tls::ServerTls>, ServerError> {
    if cfg.insecure {
        tracing::warn!(
            listen = %cfg.listen,
            "TLS is OFF (--insecure): all traffic to and from this server is unencrypted and unauthenticated, and anyone who can reach it can send Raft messages"
        );
        return Ok(None);
    }
    let loaded = match join {
        Some(token) if !tls::installed(dir) => join::fetch_certificate(dir, cfg, token).await?,
        _ => tls::load(dir)?,
    };
    let bound = bind_to_node(dir, cfg, loaded)?;
    if bound.signer().is_some() {
        tracing::info!(
            "this server holds the cluster CA key ({}/{}) and signs joining servers' certificates",
            tls::TLS_DIR,
            tls::CA_KEY_FILE
        );
    }
    Ok(Some(bound))
}

/// Checks that this server's certificate names its node id. A certificate from before
/// certificates were bound to node ids is re-issued when this server holds the CA key (every
/// server of such a cluster does).
fn bind_to_node(dir: &Path, cfg: &ServerConfig, t: tls::ServerTls) -> Result<tls::ServerTls, ServerError> {
    let path = dir.join(tls::TLS_DIR).join(tls::SERVER_CERT_FILE);
    match tls::node_id_of_pem(&t.cert_pem)? {
        Some(id) if id == cfg.node_id => Ok(t),
        Some(id) => Err(ServerError::Bootstrap(format!(
            "{}: the certificate names node {id}, but this server is node {}",
            path.display(),
            cfg.node_id
        ))),
        None => {
            let Some(ca) = t.signer() else {
                return Err(ServerError::Bootstrap(format!(
                    "{}: the certificate names no node id (made by an older version) and this server has no CA key to re-issue it",
                    path.display()
                )));
            };
            let (cert_pem, key_pem) = tls::issue_locally(&ca, cfg.node_id, cfg.advertised())?;
            tls::replace_server_cert(dir, &cert_pem, &key_pem)?;
            tracing::warn!(
                node = cfg.node_id,
                "re-issued this server's certificate to name its node id (it was made by an older version)"
            );
            Ok(tls::ServerTls { cert_pem, key_pem, ..t })
        }
    }
}

/// What a server directory holds (its `FORMAT` file), and the version this build reads:
/// the state tables, Raft log and snapshots, blob store layout and chunk manifests. Format 2
/// packs small blobs (`blobs::pack`); builds of format 1 would not see them.
pub const SERVER_FORMAT_NAME: &str = "codafs-server";
pub const SERVER_FORMAT: u32 = 2;
/// Older formats this build reads as they are, and upgrades by stamping: format 1 kept every
/// blob as a file, which format 2 still reads.
pub const SERVER_FORMATS_UPGRADED: &[u32] = &[1];

/// Starts a server in `dir` and runs it until `shutdown` completes. With `rotate_cert`, the
/// server first gets a new key and certificate for its node id (see [`rotate`]).
pub async fn run(
    dir: &Path,
    cfg: ServerConfig,
    join: Option<JoinToken>,
    rotate_cert: bool,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    tokio::pin!(shutdown);
    if let Some(t) = &join {
        if t.servers.is_empty() {
            return Err(ServerError::Bootstrap("the join token names no servers".into()));
        }
        if t.insecure != cfg.insecure {
            return Err(ServerError::Bootstrap(format!(
                "the join token is for a cluster {} TLS, but this server was set up {} it",
                if t.insecure { "without" } else { "with" },
                if cfg.insecure { "without" } else { "with" },
            )));
        }
    }
    // Directories 0700, files 0600, also what an older version or a looser umask left behind.
    let changed = codafs_common::perms::restrict_tree_once(dir)?;
    if changed > 0 {
        tracing::info!(dir = %dir.display(), changed, "took group and other permissions off the server directory");
    }
    let upgraded =
        codafs_common::format::check_or_upgrade(dir, SERVER_FORMAT_NAME, SERVER_FORMAT, SERVER_FORMATS_UPGRADED)
            .map_err(|e| ServerError::Bootstrap(e.to_string()))?;
    if let Some(from) = upgraded {
        tracing::info!(
            from,
            to = SERVER_FORMAT,
            "upgraded the server directory's format: small blobs are packed from now on, blobs stored as files stay as they are, and older builds refuse this directory"
        );
    }
    let mut tls = tokio::select! {
        r = server_tls(dir, &cfg, join.as_ref()) => r?,
        _ = &mut shutdown => return Ok(()),
    };
    let db = db::open(&dir.join("db")).map_err(|e| ServerError::Db(dir.join("db"), e))?;
    if rotate_cert {
        let Some(current) = &tls else {
            return Err(ServerError::Bootstrap(
                "--rotate-cert: this server runs without TLS (--insecure)".into(),
            ));
        };
        let tables = db::Tables::new(db.clone());
        tls = tokio::select! {
            r = rotate::rotate(dir, &cfg, current, &tables) => Some(r?),
            _ = &mut shutdown => return Ok(()),
        };
    }
    let mut builder = tonic::transport::Server::builder();
    if let Some(t) = &tls {
        builder = builder
            .tls_config(t.server_config())
            .map_err(|e| ServerError::TlsListener(codafs_proto::tls::error_chain(&e)))?;
    }
    let peer_transport = tls
        .as_ref()
        .map_or(codafs_proto::tls::Tls::Insecure, tls::ServerTls::peer_transport);
    if let Ok(u) = blobs::space::disk_usage(dir) {
        let min_free = cfg
            .min_free_bytes
            .unwrap_or_else(|| blobs::space::default_min_free(u.total));
        tracing::info!(
            free = u.free,
            total = u.total,
            min_free,
            "disk space of the server directory"
        );
    }
    let blob_dir = role::blob_dir(dir, cfg.witness)?;
    let blob_store = Arc::new(blobs::BlobStore::open(&blob_dir)?);
    if cfg.witness {
        let (n, bytes) = blob_store.stats();
        if n > 0 {
            tracing::info!(
                blobs = n,
                bytes,
                "the spool holds blobs from the last run; handoff delivers them to the data replicas that lack them"
            );
        }
    }
    let log = raft::log_store::LogStore::new(db.clone());
    let committed = log.committed_index();
    let (sm, applied) = raft::state_machine::StateMachine::new(db::Tables::new(db.clone()), dir.join("snapshot.bin"))
        .map_err(|e| ServerError::Raft(e.to_string()))?;
    let peers = Arc::new(peers::Peers::new(peer_transport));
    let rcfg = raft::raft_config(cfg.snapshot_every)
        .validate()
        .map_err(|e| ServerError::Raft(e.to_string()))?;
    let (told, told_rx) = removal::channel();
    let network = raft::network::Network {
        peers: peers.clone(),
        told,
        reach: Arc::default(),
    };
    let raft = raft::Raft::new(cfg.node_id, Arc::new(rcfg), network, log, sm)
        .await
        .map_err(|e| ServerError::Raft(e.to_string()))?;
    let (tasks, stop_tx) = tasks::Tasks::new();
    let node = Arc::new(Node {
        id: cfg.node_id,
        cfg: cfg.clone(),
        raft,
        applied,
        blobs: blob_store,
        peers,
        committed,
        counters: Counters::default(),
        tls,
        pending: pending::PendingBytes::new(Duration::from_secs(cfg.gc_grace_s)),
        live_chunks: Default::default(),
        pins: Default::default(),
        logins: auth::LoginGuard::default(),
        space: blobs::space::Space::new(dir, cfg.min_free_bytes),
        tasks: tasks.clone(),
        manifests: Default::default(),
        subscribers: Default::default(),
        spool: blobs::handoff::SpoolBudget::new(cfg.spool_max()),
        witness: std::sync::atomic::AtomicBool::new(cfg.witness),
        commit_locks: Default::default(),
    });
    // Off the async workers: one argon2 hash.
    tokio::task::spawn_blocking(auth::prepare);

    let rpc_timing = match &cfg.metrics_listen {
        Some(addr) => {
            let listener = metrics::bind(addr).await?;
            let m = metrics::Metrics::new(node.clone())?;
            tracing::info!(addr = %listener.local_addr()?, "serving metrics: GET /metrics, plain HTTP, unauthenticated");
            tasks.spawn("metrics", metrics::serve(listener, m.registry.clone()));
            m.rpc_layer()
        }
        None => metrics::RpcTimingLayer::default(),
    };
    let listener = tokio::net::TcpListener::bind(&cfg.listen)
        .await
        .map_err(|e| ServerError::Listen(cfg.listen.clone(), e))?;
    let local: SocketAddr = listener.local_addr()?;
    tracing::info!(node = cfg.node_id, %local, witness = cfg.witness, tls = !cfg.insecure, "server listening");
    let server = tokio::spawn(serve(node.clone(), listener, builder, rpc_timing, tasks.stop_signal()));

    let bootstrap_path = dir.join(BOOTSTRAP_FILE);
    if bootstrap_path.exists() {
        bootstrap(&node, &bootstrap_path).await?;
    }
    if let Some(token) = join {
        let n = node.clone();
        let stop = tasks.stop_signal();
        tasks.spawn("join", async move { join::join_cluster(&n, &token, stop).await });
    }
    tasks.spawn("maintenance", blobs::maintenance::run(node.clone()));
    tasks.spawn("role", role::watch(node.clone(), dir.to_path_buf()));

    let removed = tokio::select! {
        _ = &mut shutdown => None,
        why = removal::wait(node.clone(), told_rx) => Some(why),
    };
    match &removed {
        Some(why) => tracing::error!("{why}; stopping"),
        None => tracing::info!("shutting down"),
    }
    let _ = stop_tx.send(true);
    let _ = node.raft.shutdown().await;
    // One deadline for everything: the listener's connections and every tracked task.
    let deadline = tokio::time::Instant::now() + SHUTDOWN_DEADLINE;
    let _ = tokio::time::timeout_at(deadline, server).await;
    let left = tasks
        .wait(deadline.saturating_duration_since(tokio::time::Instant::now()))
        .await;
    if left > 0 {
        tracing::warn!(
            tasks = left,
            "some background tasks had not ended by the shutdown deadline"
        );
    } else {
        tracing::info!("stopped: every background task ended");
    }
    match removed {
        Some(why) => Err(ServerError::Removed(why)),
        None => Ok(()),
    }
}

/// Exit status of a server that stopped because it was removed from the cluster (sysexits'
/// `EX_CONFIG`): starting it again with the same directory cannot help, and the systemd unit
/// does not restart it.
pub const REMOVED_EXIT_STATUS: u8 = 78;

/// How long a stopping server waits for open requests and background tasks to end.
pub const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(5);

/// Most requests (HTTP/2 streams) one connection may have open at once. Clients queue further
/// requests themselves (HTTP/2 says so in its settings), so this bounds a server's work per
/// connection without failing a busy web node: its mount multiplexes everything on one
/// connection per server, and a few hundred concurrent reads are far more than it issues.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 256;
/// Largest header block of one request (tokens and tickets are far smaller).
pub const MAX_HEADER_LIST: u32 = 64 << 10;
/// Streams a peer may open and reset at once before the connection is closed ("rapid reset").
pub const MAX_PENDING_RESETS: usize = 32;

/// Serves every service on `listener` with `builder` (which carries the TLS settings: tonic
/// applies them to incoming connections in `serve_with_incoming*` too), timing every RPC with
/// `rpc_timing`.
async fn serve(
    node: Arc<Node>,
    listener: tokio::net::TcpListener,
    builder: tonic::transport::Server,
    rpc_timing: metrics::RpcTimingLayer,
    mut stop: watch::Receiver<bool>,
) {
    use grpc::{admin::AdminService, blobs::BlobService, meta::MetaService, raft::RaftService, write::WriteService};
    // `Server::tcp_nodelay` only applies to sockets tonic binds itself; ours come from our own
    // listener, so set it here. Without it, small HTTP/2 frames (replies, WINDOW_UPDATEs) wait
    // for Nagle's algorithm and a put crawls at tens of MB/s.
    let limiter = Arc::new(conn_limit::ConnLimiter::default());
    // Stopped when this function returns or its future is dropped (a shutdown past its deadline).
    let _sweeper = AbortOnDrop(tokio::spawn(cut_stalled_connections(node.clone(), limiter.clone())));
    let admitting = limiter.clone();
    let incoming = tonic::transport::server::TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(30)))
        .filter_map(move |conn| {
            let admitted = match conn {
                Ok(stream) => match admitting.admit(stream) {
                    Ok(s) => Some(Ok(s)),
                    Err(conn_limit::Refused::Gone) => None,
                    Err(conn_limit::Refused::SamePort(peer)) => {
                        tracing::warn!(%peer, "refused a connection: one from the same address and port is still open");
                        None
                    }
                    Err(conn_limit::Refused::TooMany) => {
                        tracing::warn!(
                            open = admitting.open(),
                            max = conn_limit::MAX_CONNECTIONS,
                            max_per_address = conn_limit::MAX_CONNECTIONS_PER_ADDRESS,
                            "refused a connection: too many open"
                        );
                        None
                    }
                },
                Err(e) => Some(Err(e)),
            };
            std::future::ready(admitted)
        });
    let result = builder
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .http2_max_header_list_size(Some(MAX_HEADER_LIST))
        .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_RESETS))
        .initial_stream_window_size(Some(4 << 20))
        .initial_connection_window_size(Some(8 << 20))
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .layer(rpc_timing)
        .layer(body_budget::BudgetLayer {
            budget: body_budget::Budget::new(node.cfg.request_buffer_bytes.unwrap_or(body_budget::DEFAULT_BUDGET)),
            replies: body_budget::Budget::new(node.cfg.request_buffer_bytes.unwrap_or(body_budget::DEFAULT_BUDGET)),
            classify: {
                let node = node.clone();
                Arc::new(move |headers, certs| grpc::budget_sender(&node, headers, certs))
            },
            conns: limiter.clone(),
        })
        .add_service(
            pb::meta_server::MetaServer::new(MetaService(node.clone()))
                .max_decoding_message_size(MAX_SMALL_REQUEST)
                .max_encoding_message_size(MAX_MESSAGE),
        )
        .add_service(
            pb::blobs_server::BlobsServer::new(BlobService(node.clone()))
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        )
        .add_service(tonic::service::interceptor::InterceptedService::new(
            pb::write_server::WriteServer::new(WriteService(node.clone()))
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
            grpc::write::signed_only(node.clone()),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            pb::raft_server::RaftServer::new(RaftService(node.clone()))
                .max_decoding_message_size(MAX_RAFT_MESSAGE)
                .max_encoding_message_size(MAX_RAFT_MESSAGE),
            grpc::raft::peers_only(node.clone()),
        ))
        .add_service(
            pb::admin_server::AdminServer::new(AdminService(node.clone()))
                .max_decoding_message_size(MAX_SMALL_REQUEST)
                .max_encoding_message_size(MAX_MESSAGE),
        )
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "gRPC server failed");
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Closes, every quarter of the stall timeout (at most every 5 s), the connections that have
/// left a reply frame unwritten for longer than it (see `conn_watch`).
async fn cut_stalled_connections(node: Arc<Node>, limiter: Arc<conn_limit::ConnLimiter>) {
    let stall = node.cfg.reply_stall();
    let every = (stall / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for peer in limiter.cut_stalled(stall) {
            node.counters
                .stalled_connections_closed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(
                %peer,
                stall_s = stall.as_secs_f64(),
                "closed a connection that left a reply unread past the stall timeout \
                 (--reply-stall-timeout); its share of the reply budget is free again"
            );
        }
    }
}

/// First start after `cluster init`: create the single-member cluster and commit its identity.
async fn bootstrap(node: &Node, path: &Path) -> Result<(), ServerError> {
    let text = std::fs::read_to_string(path)?;
    let b: Bootstrap =
        serde_json::from_str(&text).map_err(|e| ServerError::Bootstrap(format!("{}: {e}", path.display())))?;
    let initialized = node
        .raft
        .is_initialized()
        .await
        .map_err(|e| ServerError::Raft(e.to_string()))?;
    if !initialized {
        let info = NodeInfo {
            addr: node.cfg.advertised().to_string(),
            witness: node.cfg.witness,
        };
        node.raft
            .initialize(
                [(node.id, info)]
                    .into_iter()
                    .collect::<std::collections::BTreeMap<_, _>>(),
            )
            .await
            .map_err(|e| ServerError::Raft(e.to_string()))?;
    }
    let already = node
        .tables()
        .cluster()
        .map_err(|e| ServerError::Bootstrap(e.to_string()))?
        .is_some();
    if !already {
        node.wait_leader()
            .await
            .map_err(|e| ServerError::Bootstrap(e.to_string()))?;
        let admin = AccountRec {
            name: b.admin_user.clone(),
            admin: true,
            password_hash: String::new(),
            created_ns: codafs_common::now_ns(),
        };
        node.propose(Command::Bootstrap {
            cluster_id: b.cluster_id.clone(),
            key: b.key,
            admin,
        })
        .await
        .map_err(|e| ServerError::Bootstrap(format!("committing the cluster identity: {e}")))?;
    }
    std::fs::remove_file(path)?;
    tracing::info!(cluster = %b.cluster_id, "cluster bootstrapped");
    Ok(())
}
