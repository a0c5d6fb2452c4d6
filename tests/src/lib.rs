//! Test harness: real `codafs` server processes on loopback ports with temp directories.
//! Clusters run over TLS (as `cluster init` sets them up) unless a test asks for
//! [`ClusterOpts::insecure`].
//!
//! Every process a [`TestCluster`] starts is killed by its PID when the cluster is dropped, also
//! when a test panics (then the servers' logs are printed to help diagnose). Every wait is
//! bounded and fails with a message instead of hanging.
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use codafs_client::status::MountStatus;
use codafs_client::transport::{BlobRef, Tls};
use codafs_client::{ops, Cluster};
use codafs_common::Hash;
use codafs_proto::pb;

pub mod http;
pub mod users;

/// Path of the `codafs` binary built by this workspace (next to the test executable's `deps/`).
pub fn codafs_bin() -> PathBuf {
    if let Ok(p) = std::env::var("CODAFS_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join("codafs");
    assert!(
        bin.exists(),
        "{} not found: build it with `cargo build --bin codafs` (cargo test --workspace does)",
        bin.display()
    );
    bin
}

/// Whole-test deadline: a hung test fails with a message instead of running into CI's limit.
pub const TEST_DEADLINE: Duration = Duration::from_secs(180);

/// Runs a test body under [`TEST_DEADLINE`], failing on error or timeout.
pub async fn bounded<F: Future<Output = Result<()>>>(f: F) {
    bounded_within(TEST_DEADLINE, f).await
}

/// Runs a test body under a deadline of its own, failing on error or timeout.
pub async fn bounded_within<F: Future<Output = Result<()>>>(limit: Duration, f: F) {
    match tokio::time::timeout(limit, f).await {
        Ok(r) => r.unwrap(),
        Err(_) => panic!("test exceeded {limit:?}"),
    }
}

/// A free loopback port (bound and released; the server binds it right after).
pub fn free_port() -> u16 {
    codafs_common::ports::free_loopback_port().expect("a free loopback port")
}

/// Polls `check` every 50 ms until it returns true or `timeout` passes.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < timeout {
        if check().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("timed out after {timeout:?} waiting for {what}")
}

/// One server process.
pub struct Server {
    pub addr: String,
    pub dir: PathBuf,
    pub witness: bool,
    pub extra_args: Vec<String>,
    /// `--metrics-listen` address (a port of its own), when the cluster serves metrics
    /// (`ClusterOpts::metrics()`).
    pub metrics_addr: Option<String>,
    child: Option<Child>,
}

impl Server {
    fn spawn(&mut self, join: Option<&str>) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.with_extension("log"))?;
        let mut cmd = Command::new(codafs_bin());
        cmd.arg("server")
            .arg("--dir")
            .arg(&self.dir)
            .arg("--listen")
            .arg(&self.addr);
        // The role is chosen at the first start; later ones take server.toml's (which
        // `cluster role` may have changed).
        if self.witness && !self.dir.join("server.toml").exists() {
            cmd.arg("--witness");
        }
        if let Some(t) = join {
            cmd.arg("--join").arg(t);
        }
        if let Some(m) = &self.metrics_addr {
            cmd.arg("--metrics-listen").arg(m);
        }
        cmd.args(&self.extra_args);
        cmd.env(
            "CODAFS_LOG",
            std::env::var("CODAFS_TEST_LOG").unwrap_or_else(|_| "info,openraft=warn".into()),
        );
        cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        self.child = Some(cmd.spawn().context("spawning codafs server")?);
        Ok(())
    }

    /// SIGKILL and reap (a crash, as far as the server can tell).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGTERM (a clean stop) and wait at most `within` for the process to exit; returns how long
    /// it took and whether it exited with success. Killed with SIGKILL when it overstays.
    pub fn terminate(&mut self, within: Duration) -> Result<(Duration, bool)> {
        let Some(mut c) = self.child.take() else {
            bail!("server {} is not running", self.addr)
        };
        let start = Instant::now();
        // SAFETY: kill(2) on the PID of a child this harness started and has not reaped yet.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        match exited_within(&mut c, within)? {
            Some(status) => Ok((start.elapsed(), status.success())),
            None => bail!("server {} did not exit within {within:?} of SIGTERM", self.addr),
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Waits at most `within` for the process to exit by itself and returns its exit code
    /// (`None`: killed by a signal). Killed with SIGKILL and an error when it overstays.
    pub fn wait_exit(&mut self, within: Duration) -> Result<Option<i32>> {
        let Some(mut c) = self.child.take() else {
            bail!("server {} is not running", self.addr)
        };
        match exited_within(&mut c, within)? {
            Some(status) => Ok(status.code()),
            None => bail!("server {} did not exit by itself within {within:?}", self.addr),
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.with_extension("log")).unwrap_or_default()
    }
}

/// Waits at most `within` for `c` to exit and returns its status; kills and reaps it and
/// returns `None` when it overstays.
fn exited_within(c: &mut Child, within: Duration) -> Result<Option<std::process::ExitStatus>> {
    let start = Instant::now();
    while start.elapsed() < within {
        if let Some(status) = c.try_wait()? {
            return Ok(Some(status));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = c.kill();
    let _ = c.wait();
    Ok(None)
}

/// Options for a test cluster.
#[derive(Clone)]
pub struct ClusterOpts {
    pub data: usize,
    pub witnesses: usize,
    pub extra_args: Vec<String>,
    /// `cluster init --insecure`: plaintext everywhere.
    pub insecure: bool,
    /// Every server serves Prometheus metrics on a loopback port of its own
    /// ([`Server::metrics_addr`]).
    pub metrics: bool,
}

impl ClusterOpts {
    pub fn new(data: usize, witnesses: usize) -> Self {
        ClusterOpts {
            data,
            witnesses,
            extra_args: vec!["--repair-interval-ms".into(), "200".into()],
            insecure: false,
            metrics: false,
        }
    }

    /// Every server with `--metrics-listen` on a free loopback port of its own.
    pub fn metrics(mut self) -> Self {
        self.metrics = true;
        self
    }

    /// A plaintext cluster (`cluster init --insecure`).
    pub fn insecure(mut self) -> Self {
        self.insecure = true;
        self
    }

    /// Passes `a v` to every server; a flag given before (such as the default
    /// `--repair-interval-ms`) takes the new value instead.
    pub fn arg(mut self, a: &str, v: &str) -> Self {
        if let Some(i) = self.extra_args.iter().position(|x| x == a) {
            if let Some(old) = self.extra_args.get_mut(i + 1) {
                *old = v.into();
                return self;
            }
        }
        self.extra_args.push(a.into());
        self.extra_args.push(v.into());
        self
    }
}

/// A running cluster of server processes.
pub struct TestCluster {
    pub root: tempfile::TempDir,
    pub servers: Vec<Server>,
    pub token: String,
    /// A join token made after the first server started (unused: each joiner gets its own).
    pub join_token: String,
    /// How clients reach the servers: TLS against the cluster CA, or plaintext.
    pub tls: Tls,
}

impl TestCluster {
    /// Starts `opts.data` data replicas and `opts.witnesses` witnesses; returns when all are
    /// voters and a leader exists.
    pub async fn start(opts: ClusterOpts) -> Result<Self> {
        let root = tempfile::Builder::new().prefix("codafs-test-").tempdir()?;
        let mut tc = TestCluster {
            root,
            servers: Vec::new(),
            token: String::new(),
            join_token: String::new(),
            tls: Tls::Insecure,
        };
        let total = opts.data + opts.witnesses;
        for i in 0..total {
            tc.servers.push(Server {
                addr: format!("127.0.0.1:{}", free_port()),
                dir: tc.root.path().join(format!("s{i}")),
                witness: i >= opts.data,
                extra_args: opts.extra_args.clone(),
                metrics_addr: metrics_addr(opts.metrics),
                child: None,
            });
        }
        let first = &tc.servers[0];
        let mut init = Command::new(codafs_bin());
        init.args(["cluster", "init", "--dir"])
            .arg(&first.dir)
            .args(["--listen", &first.addr]);
        if opts.insecure {
            init.arg("--insecure");
        }
        let out = init.output()?;
        if !out.status.success() {
            bail!("cluster init failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        if !opts.insecure {
            tc.tls = Tls::ca(std::fs::read_to_string(tc.ca_path())?);
        }
        tc.token = std::fs::read_to_string(first.dir.join("admin.token"))?
            .trim()
            .to_string();
        tc.servers[0].spawn(None)?;
        let addr0 = tc.servers[0].addr.clone();
        tc.wait_ready(&addr0, 1).await?;
        tc.join_token = tc.new_join_token(0).await?;
        for i in 1..total {
            let t = tc.new_join_token(0).await?;
            tc.servers[i].spawn(Some(&t))?;
            tc.wait_ready(&addr0, (i + 1) as u32).await?;
        }
        Ok(tc)
    }

    /// A new join token (single use) valid for `ttl_secs` (0: the default hour).
    pub async fn new_join_token(&self, ttl_secs: u64) -> Result<String> {
        let c = self.client_for(std::slice::from_ref(&self.servers[0].addr));
        Ok(c.join_token(ttl_secs).await?)
    }

    /// Starts `n` new data servers at once, all joining with the join token, and waits until
    /// every one is a voter (concurrent joins).
    pub async fn join_new(&mut self, n: usize) -> Result<()> {
        let first = self.servers.len();
        let extra = self.servers[0].extra_args.clone();
        for i in first..first + n {
            self.servers.push(Server {
                addr: format!("127.0.0.1:{}", free_port()),
                dir: self.root.path().join(format!("s{i}")),
                witness: false,
                extra_args: extra.clone(),
                metrics_addr: metrics_addr(self.servers[0].metrics_addr.is_some()),
                child: None,
            });
        }
        for i in first..first + n {
            let t = self.new_join_token(0).await?;
            self.servers[i].spawn(Some(&t))?;
        }
        let addr0 = self.servers[0].addr.clone();
        self.wait_ready(&addr0, (first + n) as u32).await
    }

    /// A new data server's settings (not started), like the first server's; returns its index.
    fn push_data_server(&mut self) -> usize {
        let i = self.servers.len();
        self.servers.push(Server {
            addr: format!("127.0.0.1:{}", free_port()),
            dir: self.root.path().join(format!("s{i}")),
            witness: false,
            extra_args: self.servers[0].extra_args.clone(),
            metrics_addr: metrics_addr(self.servers[0].metrics_addr.is_some()),
            child: None,
        });
        i
    }

    /// Starts one new data server with a fresh join token and waits until it is a voter beside
    /// the current voters (some servers may have been removed); returns its index.
    pub async fn join_replacement(&mut self) -> Result<usize> {
        let voters = self
            .client()
            .list_servers()
            .await?
            .servers
            .iter()
            .filter(|s| s.voter)
            .count() as u32;
        let token = self.new_join_token(0).await?;
        let i = self.push_data_server();
        self.servers[i].spawn(Some(&token))?;
        let joined = self.servers[i].addr.clone();
        self.wait_ready(&joined, voters + 1).await?;
        Ok(i)
    }

    /// Starts one new data server that joins with `token` and waits until it is a voter (with
    /// every server so far); returns its index.
    pub async fn join_with(&mut self, token: &str) -> Result<usize> {
        let i = self.push_data_server();
        self.servers[i].spawn(Some(token))?;
        let addr0 = self.servers[0].addr.clone();
        self.wait_ready(&addr0, (i + 1) as u32).await?;
        // And the joiner itself has the cluster's state (a request to it right after the join
        // could otherwise find it "not bootstrapped yet").
        let joined = self.servers[i].addr.clone();
        self.wait_ready(&joined, (i + 1) as u32).await?;
        Ok(i)
    }

    /// Waits until the server at `addr` reports a leader, a bootstrapped cluster and `voters`
    /// voters.
    async fn wait_ready(&self, addr: &str, voters: u32) -> Result<()> {
        let addr = addr.to_string();
        wait_until(
            Duration::from_secs(30),
            &format!("{voters} voters seen by {addr}"),
            || {
                let addr = addr.clone();
                async move {
                    match self.status_of(&addr).await {
                        Ok(s) => s.leader_id != 0 && !s.cluster_id.is_empty() && s.voters == voters,
                        Err(_) => false,
                    }
                }
            },
        )
        .await
        .map_err(|e| self.with_logs(e))
    }

    fn with_logs(&self, e: anyhow::Error) -> anyhow::Error {
        let logs: String = self
            .servers
            .iter()
            .map(|s| format!("\n--- {} ---\n{}", s.addr, tail(&s.log(), 40)))
            .collect();
        anyhow::anyhow!("{e}{logs}")
    }

    pub fn addrs(&self) -> Vec<String> {
        self.servers.iter().map(|s| s.addr.clone()).collect()
    }

    /// The cluster CA certificate `cluster init` wrote (absent on an insecure cluster).
    pub fn ca_path(&self) -> PathBuf {
        self.servers[0].dir.join("tls/ca.crt")
    }

    /// `codafs` arguments that reach every server the way clients should: `--server-addr …`
    /// plus `--ca FILE`, or `--insecure`; and `--prefer-server` with the first server, so a
    /// test knows which server a mount uses (a mount's default is a random one:
    /// [`TestCluster::client_args_spread`]; other commands start at the first anyway).
    pub fn client_args(&self) -> Vec<String> {
        let mut v = self.client_args_spread();
        v.extend(["--prefer-server".to_string(), self.servers[0].addr.clone()]);
        v
    }

    /// [`TestCluster::client_args`] without a preferred server: a mount picks one at random, as
    /// on a web node.
    pub fn client_args_spread(&self) -> Vec<String> {
        let mut v = Vec::new();
        for a in self.addrs() {
            v.extend(["--server-addr".to_string(), a]);
        }
        match self.tls {
            Tls::Insecure => v.push("--insecure".into()),
            Tls::Ca { .. } => v.extend(["--ca".to_string(), self.ca_path().display().to_string()]),
        }
        v
    }

    /// The same as environment variables (`CODAFS_SERVERS`, `CODAFS_PREFER_SERVER`,
    /// `CODAFS_CA` / `CODAFS_INSECURE`).
    pub fn client_env(&self) -> Vec<(&'static str, String)> {
        let mut v = vec![
            ("CODAFS_SERVERS", self.addrs().join(",")),
            ("CODAFS_PREFER_SERVER", self.servers[0].addr.clone()),
        ];
        match self.tls {
            Tls::Insecure => v.push(("CODAFS_INSECURE", "1".into())),
            Tls::Ca { .. } => v.push(("CODAFS_CA", self.ca_path().display().to_string())),
        }
        v
    }

    /// A client that knows every server and holds the admin token.
    pub fn client(&self) -> Cluster {
        self.client_for(&self.addrs())
    }

    /// A client that talks to one server only.
    pub fn client_on(&self, addr: &str) -> Cluster {
        self.client_for(&[addr.to_string()])
    }

    /// A client that talks to the given servers only, the first one first (`Cluster::new`).
    pub fn client_for(&self, addrs: &[String]) -> Cluster {
        let mut c = Cluster::new(addrs, self.tls.clone(), Some(self.token.clone())).expect("valid addresses");
        c.policy.call_timeout = Duration::from_secs(15);
        c
    }

    /// One server's status, asked with the admin token (status details need a token).
    pub async fn status_of(&self, addr: &str) -> Result<pb::ServerStatus> {
        let mut c = Cluster::new(&[addr.to_string()], self.tls.clone(), Some(self.token.clone()))?;
        c.policy.probe_timeout = Duration::from_secs(2);
        Ok(c.status_on(addr).await?)
    }

    /// Index of the server that currently leads (asked of running servers).
    pub async fn leader(&self) -> Result<usize> {
        for s in self.servers.iter().filter(|s| s.is_running()) {
            if let Ok(st) = self.status_of(&s.addr).await {
                if st.role == "leader" {
                    return Ok(self.servers.iter().position(|x| x.addr == s.addr).unwrap_or(0));
                }
            }
        }
        bail!("no running server is leader")
    }

    /// Index of a data server that does not lead now (one to kill or stop without an election).
    pub async fn data_server_not_leading(&self) -> Result<usize> {
        let leader = self.leader().await?;
        (0..self.servers.len())
            .find(|i| *i != leader && !self.servers[*i].witness)
            .context("a data server that does not lead")
    }

    /// Waits for a leader among the running servers.
    pub async fn wait_leader(&self, timeout: Duration) -> Result<usize> {
        wait_until(timeout, "a leader", || async { self.leader().await.is_ok() })
            .await
            .map_err(|e| self.with_logs(e))?;
        self.leader().await
    }

    /// A volume's settings and usage, as the servers report them.
    pub async fn volume_info(&self, name: &str) -> Result<pb::VolumeInfo> {
        Ok(self.client().get_volume(name).await?)
    }

    /// Where server `i` keeps blob `h` on disk, if it is a file: larger than
    /// `codafs_server::blobs::PACK_MAX_BYTES` (16 KiB). Smaller blobs are packed in the
    /// server's RocksDB (`damage_packed_blob` in `tests/maintenance.rs` damages one).
    pub fn blob_path(&self, i: usize, h: &Hash) -> PathBuf {
        let hex = h.to_hex();
        self.servers[i]
            .dir
            .join("blobs/data")
            .join(&hex[..2])
            .join(&hex[2..4])
            .join(&hex)
    }

    pub fn kill(&mut self, i: usize) {
        self.servers[i].kill();
    }

    /// Restarts a killed server from its directory.
    pub fn restart(&mut self, i: usize) -> Result<()> {
        self.servers[i].spawn(None)
    }

    pub async fn create_volume(&self, name: &str, write_quorum: u32) -> Result<pb::VolumeInfo> {
        let c = self.client();
        let spec = pb::VolumeSpec {
            name: name.into(),
            write_quorum,
            public_read: true,
            ..Default::default()
        };
        Ok(c.create_volume(spec).await?)
    }

    /// Creates account `name` (not an admin; its password is "`name` password") and returns a
    /// token of it, valid for an hour.
    pub async fn add_user(&self, name: &str) -> Result<String> {
        let c = self.client();
        let spec = pb::UserSpec {
            name: name.into(),
            password: format!("{name} password"),
            admin: false,
            create: true,
        };
        c.call(|ch| {
            let r = c.request(spec.clone());
            async move { Cluster::admin(ch).put_user(r).await }
        })
        .await?;
        let login = pb::LoginRequest {
            user: name.into(),
            password: format!("{name} password"),
            ttl_secs: 3600,
        };
        let reply = c
            .call(|ch| {
                let r = c.request(login.clone());
                async move { Cluster::admin(ch).login(r).await.map(|r| r.into_inner()) }
            })
            .await?;
        Ok(reply.token)
    }

    /// Stores `content` at `volume:parent/name` (creating or replacing the file) through `client`.
    pub async fn write_file(client: &Cluster, volume: &str, parent: &str, name: &str, content: &[u8]) -> Result<u64> {
        client.put_content(content, 2).await?;
        let op = ops::file(&join(parent, name), content, 0o644);
        Ok(client.commit(ops::commit(volume, vec![op])).await?.version)
    }

    /// Creates a directory (a metadata-only commit: no blob involved).
    pub async fn mkdir(client: &Cluster, volume: &str, parent: &str, name: &str) -> Result<u64> {
        let op = ops::dir(&join(parent, name), 0o755);
        Ok(client.commit(ops::commit(volume, vec![op])).await?.version)
    }

    /// Reads a file's attributes from one server.
    pub async fn resolve_on(&self, addr: &str, volume: &str, path: &str) -> Result<pb::AttrReply> {
        Ok(self.client_on(addr).resolve(None, volume, path).await?)
    }

    /// Waits (at most 10 s) until the server at `addr` has applied everything any running
    /// server knows to be committed. Follower reads answer from the replica's own applied state,
    /// which may trail the server that acknowledged a write by a moment.
    pub async fn caught_up(&self, addr: &str) -> Result<()> {
        let mut committed = 0;
        for s in self.servers.iter().filter(|s| s.is_running()) {
            if let Ok(st) = self.status_of(&s.addr).await {
                committed = committed.max(st.commit_index);
            }
        }
        wait_until(
            Duration::from_secs(10),
            &format!("{addr} to apply log index {committed}"),
            || async { self.status_of(addr).await.is_ok_and(|s| s.applied_index >= committed) },
        )
        .await
    }

    /// Reads a file's content from one server (metadata and blob both from it), once that
    /// server has applied every acknowledged write ([`Self::caught_up`]).
    pub async fn read_on(&self, addr: &str, volume: &str, path: &str) -> Result<Vec<u8>> {
        self.caught_up(addr).await?;
        let attr = self.resolve_on(addr, volume, path).await?.attr.context("no attr")?;
        let c = self.client_on(addr);
        Ok(c.get_content(&BlobRef::of(&attr)?, attr.size).await?)
    }

    /// Runs `codafs server --join TOKEN` in a new directory `name` under the cluster's root; it
    /// must give up (exit with an error) within 30 s. Returns its stderr and the directory.
    pub async fn failed_join(&self, name: &str, token: &str) -> Result<(String, PathBuf)> {
        let dir = self.root.path().join(name);
        let out = tokio::time::timeout(
            Duration::from_secs(30),
            tokio::process::Command::new(codafs_bin())
                .args(["server", "--dir"])
                .arg(&dir)
                .args(["--listen", &format!("127.0.0.1:{}", free_port())])
                .args(["--join", token])
                .kill_on_drop(true)
                .output(),
        )
        .await
        .context("a joiner with a refused token must give up, not retry forever")??;
        anyhow::ensure!(!out.status.success(), "the joiner {name} started");
        Ok((String::from_utf8_lossy(&out.stderr).into_owned(), dir))
    }

    /// Checks that the server at `addr`, called over `ch`, refuses what only a current server
    /// may send: a forwarded blob put and a forwarded small-blob batch (storing nothing), and a
    /// commit claiming to be forwarded although it carries the admin token. `data` is what the
    /// puts try to store.
    pub async fn refuses_forwarding(
        &self,
        ch: tonic::transport::Channel,
        addr: &str,
        data: &'static [u8],
    ) -> Result<()> {
        let data = bytes::Bytes::from_static(data);
        let hash = Hash::of(&data);
        let msgs = vec![
            pb::PutBlobChunk {
                part: Some(pb::put_blob_chunk::Part::Header(pb::PutBlobHeader {
                    hash: bytes::Bytes::copy_from_slice(&hash.0),
                    size: data.len() as u64,
                    write_quorum: 1,
                    forwarded: true,
                })),
            },
            pb::PutBlobChunk {
                part: Some(pb::put_blob_chunk::Part::Data(data.clone())),
            },
        ];
        let put = Cluster::blobs(ch.clone()).put(futures::stream::iter(msgs)).await;
        let batch = pb::PutSmallRequest {
            blobs: vec![pb::SmallBlob {
                hash: bytes::Bytes::copy_from_slice(&hash.0),
                data,
            }],
            write_quorum: 1,
            forwarded: true,
        };
        let small = Cluster::blobs(ch.clone()).put_small(batch).await.map(drop);
        let mut r = tonic::Request::new(ops::commit("www", vec![ops::dir("forged", 0o755)]));
        r.metadata_mut()
            .insert(codafs_proto::limits::TOKEN_HEADER, self.token.parse()?);
        r.metadata_mut().insert("x-codafs-forwarded", "1".parse()?);
        let commit = Cluster::write(ch).commit(r).await.map(drop);
        for (what, res) in [
            ("forwarded put", put.map(drop)),
            ("forwarded batch", small),
            ("forged forward", commit),
        ] {
            match res {
                Err(s) if s.code() == tonic::Code::PermissionDenied => {}
                other => bail!("{what} at {addr}: expected PERMISSION_DENIED, got {other:?}"),
            }
        }
        if self.has_blobs(addr, &[hash]).await? {
            bail!("a refused put stored its blob at {addr}");
        }
        Ok(())
    }

    /// The addresses of the data servers (not witnesses).
    pub fn data_addrs(&self) -> Vec<String> {
        self.servers
            .iter()
            .filter(|s| !s.witness)
            .map(|s| s.addr.clone())
            .collect()
    }

    /// Whether the server at `addr` stores every one of `hashes`.
    pub async fn has_blobs(&self, addr: &str, hashes: &[Hash]) -> Result<bool> {
        Ok(self.client_on(addr).missing_on(addr, hashes).await?.is_empty())
    }
}

/// A `--metrics-listen` address on a free loopback port, if `wanted`.
fn metrics_addr(wanted: bool) -> Option<String> {
    wanted.then(|| format!("127.0.0.1:{}", free_port()))
}

/// Joins a volume-relative parent path and a name.
fn join(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_string()
    } else {
        format!("{parent}/{name}")
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for s in &self.servers {
                eprintln!("--- log of server {} ---\n{}", s.addr, tail(&s.log(), 60));
            }
        }
        for s in &mut self.servers {
            s.kill();
        }
    }
}

/// Servers stopped with SIGSTOP (hung: their connections stay open and nothing answers); they
/// go on when this is dropped, however the test ends.
pub struct Stopped(Vec<i32>);

impl Stopped {
    pub fn stop<'a>(servers: impl IntoIterator<Item = &'a Server>) -> Result<Stopped> {
        let pids: Vec<i32> = servers.into_iter().filter_map(|s| s.pid()).map(|p| p as i32).collect();
        let stopped = Stopped(pids.clone());
        for pid in &pids {
            // SAFETY: a signal to a server process this test started.
            anyhow::ensure!(unsafe { libc::kill(*pid, libc::SIGSTOP) } == 0, "SIGSTOP {pid}");
        }
        Ok(stopped)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        for pid in &self.0 {
            // SAFETY: as in `stop`.
            unsafe { libc::kill(*pid, libc::SIGCONT) };
        }
    }
}

/// A size-limited tmpfs mounted on a directory (made if missing); lazily unmounted when
/// dropped, also when a test fails. Needs root.
pub struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    pub fn mount(path: &Path, size_mib: u64) -> Result<Tmpfs> {
        std::fs::create_dir_all(path)?;
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m,mode=0700"), "tmpfs"])
            .arg(path)
            .status()?;
        anyhow::ensure!(st.success(), "mounting a tmpfs on {} failed", path.display());
        Ok(Tmpfs {
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// A `codafs mount` process. Stopped (SIGTERM, then unmounted with `fusermount3 -u` and killed
/// if needed) when dropped, also when a test panics.
pub struct Mount {
    pub path: PathBuf,
    pub cache: PathBuf,
    conn: Vec<String>,
    extra: Vec<String>,
    child: Option<Child>,
    log: PathBuf,
}

impl Mount {
    /// Mounts the cluster at `dir/<name>` with its cache in `dir/<name>.cache`; `conn` are the
    /// connection arguments ([`TestCluster::client_args`]).
    pub fn start(conn: &[String], dir: &Path, name: &str, extra: &[&str]) -> Result<Mount> {
        let mut m = Mount {
            path: dir.join(name),
            cache: dir.join(format!("{name}.cache")),
            conn: conn.to_vec(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
            log: dir.join(format!("{name}.log")),
        };
        std::fs::create_dir_all(&m.path)?;
        m.spawn()?;
        Ok(m)
    }

    fn spawn(&mut self) -> Result<()> {
        use std::io::BufRead;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let mut cmd = Command::new(codafs_bin());
        cmd.arg("mount")
            .arg(&self.path)
            .arg("--foreground")
            .arg("--cache-dir")
            .arg(&self.cache);
        cmd.args(&self.conn);
        cmd.args(&self.extra);
        cmd.env("CODAFS_NOTIFY_READY", "1")
            .env(
                "CODAFS_LOG",
                std::env::var("CODAFS_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log);
        let mut child = cmd.spawn().context("spawning codafs mount")?;
        let stdout = child.stdout.take().context("mount stdout")?;
        self.child = Some(child);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = std::io::BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(l) if l.trim() == "codafs-mount-ready" => Ok(()),
            other => bail!(
                "mount did not become ready ({other:?}); log:\n{}",
                tail(&self.log(), 30)
            ),
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the kernel still lists the mount.
    pub fn is_mounted(&self) -> bool {
        let needle = format!(" {} ", self.path.display());
        std::fs::read_to_string("/proc/mounts")
            .unwrap_or_default()
            .contains(&needle)
    }

    /// SIGKILL the daemon (a crash) and lazily detach the dead mount.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if self.is_mounted() {
            let _ = Command::new("fusermount3").arg("-u").arg("-z").arg(&self.path).status();
        }
    }

    /// `fusermount3 -u`, then at once a new daemon over the same cache directory, while the
    /// old one may still be exiting (what `umount /coda && codafs mount /coda` does). The old
    /// process is waited for afterwards (10 s, then killed).
    pub fn umount_and_mount_at_once(&mut self) -> Result<()> {
        let st = Command::new("fusermount3").arg("-u").arg(&self.path).status()?;
        anyhow::ensure!(st.success(), "fusermount3 -u {} failed", self.path.display());
        let old = self.child.take();
        let started = self.spawn();
        if let Some(mut c) = old {
            let t = Instant::now();
            while !matches!(c.try_wait(), Ok(Some(_))) && t.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        started
    }

    /// Mounts again with the same cache directory.
    pub fn remount(&mut self) -> Result<()> {
        self.kill9();
        self.spawn()
    }

    /// SIGTERM and wait; the daemon unmounts. Falls back to aborting the FUSE connection (so
    /// a hung request fails instead of hanging the test run), fusermount3 and SIGKILL.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let dev = std::fs::metadata(&self.path).map(|m| std::os::unix::fs::MetadataExt::dev(&m));
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let start = Instant::now();
            let mut exited = false;
            while start.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = c.try_wait() {
                    exited = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if !exited {
                if let Ok(dev) = dev {
                    eprintln!(
                        "mount {} did not stop; aborting its FUSE connection",
                        self.path.display()
                    );
                    abort_fuse_connection(dev);
                }
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        if self.is_mounted() {
            let _ = Command::new("fusermount3").arg("-u").arg("-z").arg(&self.path).status();
        }
    }

    /// `codafs sync MNT`: waits until everything the mount logged is on the servers.
    pub fn sync(&self) -> Result<()> {
        let out = Command::new(codafs_bin())
            .arg("sync")
            .arg(&self.path)
            .arg("--timeout")
            .arg("30")
            .output()?;
        if !out.status.success() {
            bail!(
                "codafs sync {}: {}",
                self.path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// The mount's status, from `codafs status --json`.
    pub fn status(&self) -> Result<MountStatus> {
        mount_status(&self.path)
    }

    /// How many kernel requests of each operation in `ops` (e.g. "read", "lookup") the daemon
    /// has seen, from one `codafs status`.
    pub fn fuse_requests(&self, ops: &[&str]) -> Result<Vec<u64>> {
        let st = self.status()?;
        ops.iter()
            .map(|op| {
                st.fuse_requests
                    .get(*op)
                    .copied()
                    .with_context(|| format!("no {op} counter in the mount's status"))
            })
            .collect()
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- log of mount {} ---\n{}",
                self.path.display(),
                tail(&self.log(), 60)
            );
        }
        self.stop();
    }
}

/// The status of the mount at `path`, from `codafs status --json` (as a user would ask it).
pub fn mount_status(path: &Path) -> Result<MountStatus> {
    let out = Command::new(codafs_bin())
        .arg("status")
        .arg(path)
        .arg("--json")
        .output()?;
    if !out.status.success() {
        bail!("codafs status failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    serde_json::from_slice(&out.stdout).context("codafs status --json printed an unreadable status")
}

/// Runs a blocking filesystem call on its own thread and gives up after `limit`, so a hung
/// syscall fails the test with a message instead of hanging it.
pub fn fs_call<T: Send + 'static>(
    limit: Duration,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<std::io::Result<T>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .map_err(|_| anyhow::anyhow!("filesystem call did not return within {limit:?}"))
}

/// Reads a whole file through a mount, bounded in time.
pub fn read_file(path: &Path) -> Result<Vec<u8>> {
    let p = path.to_path_buf();
    fs_call(Duration::from_secs(30), move || std::fs::read(p))?.with_context(|| format!("reading {}", path.display()))
}

/// Aborts the FUSE connection of the filesystem with device number `dev`: every request
/// waiting on it fails with ENOTCONN instead of blocking forever.
fn abort_fuse_connection(dev: u64) {
    let dir = Path::new("/sys/fs/fuse/connections");
    if std::fs::read_dir(dir).map(|mut d| d.next().is_none()).unwrap_or(true) {
        let _ = Command::new("mount").args(["-t", "fusectl", "none"]).arg(dir).status();
    }
    let _ = std::fs::write(dir.join(dev.to_string()).join("abort"), "1");
}

/// Waits for a child's exit and output, killing it (by its PID) if it takes longer than `limit`.
pub fn wait_output(child: Child, limit: Duration) -> Result<std::process::Output> {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => Ok(out?),
        Err(_) => {
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            bail!("process {pid} did not finish within {limit:?} and was killed")
        }
    }
}
