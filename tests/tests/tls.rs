//! Transport security end to end: TLS by default, peer-only RPCs refused to callers without a
//! server certificate, joins over TLS, and `--insecure` clusters with clear errors on mismatches.
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use codafs_client::transport::Tls;
use codafs_client::Cluster;
use codafs_common::join::JoinToken;
use codafs_proto::pb;
use codafs_tests::{bounded, codafs_bin, read_file, wait_until, ClusterOpts, Mount, TestCluster};
use tonic::transport::{Channel, Identity};
use tonic::Code;

/// The CA certificate of a fresh, unrelated cluster (`cluster init` in `dir`; nothing started).
fn foreign_ca(dir: &std::path::Path) -> Result<String> {
    let out = Command::new(codafs_bin())
        .args(["cluster", "init", "--dir"])
        .arg(dir)
        .args(["--listen", "127.0.0.1:1"])
        .output()?;
    if !out.status.success() {
        bail!("cluster init failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(std::fs::read_to_string(dir.join("tls/ca.crt"))?)
}

/// Runs `codafs ARGS` with the cluster's connection settings replaced by `env`; returns
/// (success, stderr).
fn cli(args: &[&str], env: &[(&str, String)]) -> Result<(bool, String)> {
    let out = Command::new(codafs_bin())
        .args(args)
        .env_remove("CODAFS_CA")
        .env_remove("CODAFS_INSECURE")
        .env_remove("CODAFS_CONFIG")
        // Never a token the machine's root saved with `codafs login` (another cluster's).
        .env("CODAFS_TOKEN_FILE", "/nonexistent/codafs-test-token")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()?;
    Ok((out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned()))
}

/// The error `status` through `c` fails with; a TLS mismatch must fail within 20 s, not hang.
async fn status_refused(c: &Cluster, what: &str) -> Result<String> {
    match tokio::time::timeout(Duration::from_secs(20), status(c)).await {
        Err(_) => anyhow::bail!("{what}: hung instead of failing fast"),
        Ok(Ok(_)) => anyhow::bail!("{what}: succeeded"),
        Ok(Err(e)) => Ok(e.to_string()),
    }
}

/// Stderr of `codafs status FLAG FILE` against `servers`, which must fail.
fn cli_status_refused(flag: &str, file: &std::path::Path, servers: &[String]) -> Result<String> {
    let (ok, err) = cli(
        &["status", flag, &file.display().to_string()],
        &[("CODAFS_SERVERS", servers.join(","))],
    )?;
    anyhow::ensure!(!ok, "codafs status {flag} {} succeeded: {err}", file.display());
    Ok(err)
}

/// A server's status through `c` (with `c`'s token: status details need one).
async fn status(c: &Cluster) -> Result<pb::ServerStatus, codafs_client::ClientError> {
    c.call(|ch| {
        let mut r = c.request(pb::Empty {});
        r.set_timeout(Duration::from_secs(3));
        async move { Cluster::admin(ch).status(r).await.map(|r| r.into_inner()) }
    })
    .await
}

/// A TLS channel to `addr` that verifies the server but presents `identity` (or nothing).
fn channel(tc: &TestCluster, addr: &str, identity: Option<Identity>) -> Result<Channel> {
    let Tls::Ca { ca_pem, .. } = &tc.tls else {
        bail!("cluster is not TLS")
    };
    let tls = Tls::Ca {
        ca_pem: ca_pem.clone(),
        identity,
    };
    Ok(tls
        .endpoint(addr)?
        .connect_timeout(Duration::from_secs(2))
        .connect_lazy())
}

/// What `f` returns, and how far process `pid`'s peak resident memory rose while it ran (in
/// KiB): the peak is reset first (`clear_refs`).
async fn peak_growth<T>(pid: u32, f: impl std::future::Future<Output = T>) -> Result<(T, u64)> {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5")?;
    let before = peak_kib(pid)?;
    let r = f.await;
    Ok((r, peak_kib(pid)?.saturating_sub(before)))
}

/// A process's peak resident memory (`VmHWM`), in KiB.
fn peak_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM in /proc/PID/status")
}

fn raft_message() -> tonic::Request<pb::RaftMessage> {
    let mut r = tonic::Request::new(pb::RaftMessage {
        payload: bytes::Bytes::from_static(b"not a raft message"),
    });
    r.set_timeout(Duration::from_secs(5));
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_trusting_another_clusters_ca_is_refused_clearly() {
    bounded(async {
        let tc = TestCluster::start(ClusterOpts::new(1, 0)).await?;
        let other = foreign_ca(&tc.root.path().join("other"))?;
        let c = Cluster::new(&tc.addrs(), Tls::ca(other), None)?;
        let msg = status_refused(&c, "a server signed by another CA").await?;
        assert!(msg.contains("UnknownIssuer"), "{msg}");
        assert!(msg.contains("not signed by the cluster CA"), "{msg}");
        // The same through the CLI: one line, non-zero exit.
        let err = cli_status_refused("--ca", &tc.root.path().join("other/tls/ca.crt"), &tc.addrs())?;
        assert!(err.contains("not signed by the cluster CA"), "{err}");
        // The right CA works, and the client config `cluster init` wrote carries it.
        let good = Cluster::new(&tc.addrs(), tc.tls.clone(), Some(tc.token.clone()))?;
        assert!(!status(&good).await?.cluster_id.is_empty());
        let bundle = codafs_client::ClientBundle::load(&tc.servers[0].dir.join("client.toml"))?;
        assert_eq!(bundle.ca_cert.trim(), std::fs::read_to_string(tc.ca_path())?.trim());
        let (ok, err) = cli(
            &[
                "status",
                "--config",
                &tc.servers[0].dir.join("client.toml").display().to_string(),
            ],
            &[],
        )?;
        assert!(ok, "{err}");
        assert!(!err.contains("WARNING"), "TLS must not warn: {err}");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn callers_without_a_server_certificate_cannot_send_peer_rpcs_but_can_read() {
    bounded(async {
        let tc = TestCluster::start(ClusterOpts::new(2, 0)).await?;
        tc.create_volume("www", 2).await?;
        let writer = tc.client();
        TestCluster::write_file(&writer, "www", "", "index.html", b"hello over TLS").await?;
        let addr = tc.servers[1].addr.clone();

        // Normal reads work for a client without a certificate.
        assert_eq!(tc.read_on(&addr, "www", "index.html").await?, b"hello over TLS");

        // Raft RPCs are refused before they are even decoded.
        let anon = channel(&tc, &addr, None)?;
        let mut raft = pb::raft_client::RaftClient::new(anon.clone());
        for (name, r) in [
            ("append_entries", raft.append_entries(raft_message()).await),
            ("vote", raft.clone().vote(raft_message()).await),
            ("install_snapshot", raft.clone().install_snapshot(raft_message()).await),
        ] {
            let s = r.expect_err(name);
            assert_eq!(s.code(), Code::PermissionDenied, "{name}: {s:?}");
            assert!(s.message().contains("server certificate"), "{name}: {}", s.message());
        }
        // Refused from its headers: a large message is never buffered (tonic reads a whole
        // message before a handler runs). The server's peak memory is reset, then measured.
        let pid = tc.servers[1].pid().context("the probed server's pid")?;
        let mut big = tonic::Request::new(pb::RaftMessage {
            payload: bytes::Bytes::from(vec![7u8; 200 << 20]),
        });
        big.set_timeout(Duration::from_secs(30));
        let (r, grew) = peak_growth(pid, raft.append_entries(big)).await?;
        let s = r.expect_err("a large anonymous append_entries");
        assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
        assert!(
            grew < 64 << 10,
            "the server's peak memory grew by {grew} KiB for a refused 200 MiB message"
        );
        // The same for a commit without a token (messages up to 64 MiB).
        let mut commit = tonic::Request::new(pb::CommitRequest {
            volume: "www".into(),
            request_id: bytes::Bytes::from(vec![7u8; 60 << 20]),
            ..Default::default()
        });
        commit.set_timeout(Duration::from_secs(30));
        let mut write = pb::write_client::WriteClient::new(anon.clone());
        let (r, grew) = peak_growth(pid, write.commit(commit)).await?;
        let s = r.expect_err("a large commit without a token");
        assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
        assert!(
            grew < 32 << 10,
            "the server's peak memory grew by {grew} KiB for a refused 60 MiB commit"
        );

        // Forwarded blob puts (stored without replication) are refused and store nothing, and a
        // commit claiming to be forwarded by a server is refused too, even with a valid token.
        tc.refuses_forwarding(anon.clone(), &addr, b"smuggled without replication")
            .await?;

        // With a server certificate the same garbage gets past the check (and fails decoding):
        // the certificate is what decides.
        let dir = &tc.servers[0].dir;
        let id = Identity::from_pem(
            std::fs::read_to_string(dir.join("tls/server.crt"))?,
            std::fs::read_to_string(dir.join("tls/server.key"))?,
        );
        let mut peer = pb::raft_client::RaftClient::new(channel(&tc, &addr, Some(id))?);
        let s = peer.vote(raft_message()).await.expect_err("garbage vote");
        assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
        // And the cluster still works.
        TestCluster::write_file(&writer, "www", "", "after.html", b"still fine").await?;
        // Read from `addr`, which may apply the commit a moment after the server that answered.
        wait_until(
            Duration::from_secs(10),
            "after.html readable on the probed server",
            || async {
                tc.read_on(&addr, "www", "after.html")
                    .await
                    .is_ok_and(|d| d == b"still fine")
            },
        )
        .await?;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn servers_join_over_tls_concurrently_with_their_own_certificates() {
    bounded(async {
        let mut tc = TestCluster::start(ClusterOpts::new(1, 0)).await?;
        let token = JoinToken::decode(&tc.join_token)?;
        assert!(!token.insecure);
        assert_eq!(token.ca_cert.trim(), std::fs::read_to_string(tc.ca_path())?.trim());
        // Two servers join at once, each fetching the CA and issuing its own certificate.
        tc.join_new(2).await?;
        let ca = std::fs::read_to_string(tc.ca_path())?;
        let mut certs = Vec::new();
        for s in &tc.servers[1..] {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::read_to_string(s.dir.join("tls/ca.crt"))?.trim(), ca.trim());
            let key = std::fs::metadata(s.dir.join("tls/server.key"))?;
            assert_eq!(key.permissions().mode() & 0o777, 0o600);
            certs.push(std::fs::read_to_string(s.dir.join("tls/server.crt"))?);
        }
        assert_ne!(certs[0], certs[1], "every server has its own certificate");
        // Replication between the servers runs over mutual TLS: a write reaches all three.
        tc.create_volume("www", 3).await?;
        // Stored on all three before the commit asks for three copies (write_file's own put is
        // answered at two, and the third could still be in flight).
        tc.client()
            .put_blob(bytes::Bytes::from_static(b"three copies"), 3)
            .await?;
        TestCluster::write_file(&tc.client(), "www", "", "a.html", b"three copies").await?;
        for addr in tc.addrs() {
            assert_eq!(tc.read_on(&addr, "www", "a.html").await?, b"three copies");
        }
        // A join token whose CA is another cluster's is refused at once, with a clear reason.
        let bad = JoinToken {
            ca_cert: foreign_ca(&tc.root.path().join("other"))?,
            ..token
        };
        let (err, dir) = tc.failed_join("intruder", &bad.encode()).await?;
        assert!(err.contains("UnknownIssuer") && err.contains("join token"), "{err}");
        assert!(!dir.join("tls/server.crt").exists());
        assert_eq!(status(&tc.client()).await?.voters, 3);
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn insecure_cluster_works_in_plaintext_and_mismatches_fail_clearly() {
    bounded(async {
        let tc = TestCluster::start(ClusterOpts::new(2, 1).insecure()).await?;
        assert!(tc.tls.is_insecure());
        assert!(!tc.ca_path().exists(), "an insecure cluster has no certificates");
        assert!(JoinToken::decode(&tc.join_token)?.insecure);
        for s in &tc.servers {
            assert!(std::fs::read_to_string(s.dir.join("server.toml"))?.contains("insecure = true"));
            assert!(s.log().contains("TLS is OFF"), "every start warns");
        }
        // End to end: through the witness (which forwards the blob), read from every replica.
        tc.create_volume("www", 2).await?;
        let c = tc.client_on(&tc.servers[2].addr);
        TestCluster::write_file(&c, "www", "", "plain.html", b"no TLS here").await?;
        for s in &tc.servers[..2] {
            assert_eq!(tc.read_on(&s.addr, "www", "plain.html").await?, b"no TLS here");
        }
        // Through a FUSE mount started with --insecure, which warns on stderr (its log).
        let m = Mount::start(&tc.client_args(), tc.root.path(), "m", &[])?;
        assert_eq!(read_file(&m.path.join("www/plain.html"))?, b"no TLS here");
        assert!(m.log().contains("WITHOUT TLS"), "the mount warns: {}", m.log());
        drop(m);
        // The CLI connects with a loud warning.
        let (ok, err) = cli(&["status"], &tc.client_env())?;
        assert!(ok, "{err}");
        assert!(err.contains("WARNING") && err.contains("WITHOUT TLS"), "{err}");
        let bundle = codafs_client::ClientBundle::load(&tc.servers[0].dir.join("client.toml"))?;
        assert!(bundle.insecure && bundle.ca_cert.is_empty());
        // A TLS client never falls back to plaintext: it fails fast and says why.
        let ca = foreign_ca(&tc.root.path().join("other"))?;
        let tls = Cluster::new(&tc.addrs(), Tls::ca(ca), None)?;
        let e = status_refused(&tls, "a TLS client against a plaintext server").await?;
        assert!(e.contains("does not speak TLS"), "{e}");
        let err = cli_status_refused("--ca", &tc.root.path().join("other/tls/ca.crt"), &tc.addrs())?;
        assert!(err.contains("does not speak TLS"), "{err}");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_plaintext_client_against_a_tls_server_fails_clearly() {
    bounded(async {
        let tc = TestCluster::start(ClusterOpts::new(1, 0)).await?;
        let plain = Cluster::new(&tc.addrs(), Tls::Insecure, None)?;
        let e = status_refused(&plain, "a plaintext client against a TLS server").await?;
        assert!(e.contains("may require TLS"), "{e}");
        // No credentials of any kind: the CLI refuses to guess plaintext.
        let err = cli_status_refused("--config", &tc.root.path().join("none.toml"), &tc.addrs())?;
        assert!(err.contains("no cluster CA"), "{err}");
        Ok(())
    })
    .await
}

/// Anyone who can reach a server can open HTTP/2 streams whose requests never finish: tonic
/// reads a whole message before the handler (and its token check) runs, and holds a request's
/// one message until its stream ends, so each stream held what it had received, up to the
/// service's message limit, 256 streams per connection. A server now holds at most its request
/// budget (`--request-buffer-max`, a quarter per address): past it, a stream fails with
/// `RESOURCE_EXHAUSTED`, and the memory is not taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unfinished_request_messages_are_held_within_the_servers_budget() {
    bounded(async {
        let opts = ClusterOpts::new(2, 0).insecure().arg("--request-buffer-max", "64M");
        let tc = TestCluster::start(opts).await?;
        tc.create_volume("www", 2).await?;
        let addr = tc.servers[1].addr.clone();
        let pid = tc.servers[1].pid().context("the probed server's pid")?;
        let tcp = tokio::net::TcpStream::connect(&addr).await?;
        let (client, conn) = h2::client::handshake(tcp).await?;
        let driver = tokio::spawn(conn);
        // 32 anonymous blob batches of 4 MiB: half of them send the whole message and leave
        // their stream open (tonic holds a whole message until the stream ends), half declare
        // 16 MiB and send 4 MiB of it. 128 MiB held without the budget, at most 16 MiB (this
        // address's quarter) with it.
        const STREAMS: usize = 32;
        let (held, grew) = peak_growth(pid, async {
            let mut answers = futures::stream::FuturesUnordered::new();
            let mut open = Vec::new();
            let mut client = client.clone();
            for i in 0..STREAMS {
                client = client.ready().await?;
                let req = http::Request::post(format!("http://{addr}/codafs.v1.Blobs/PutSmall"))
                    .header("content-type", "application/grpc")
                    .header("te", "trailers")
                    .body(())?;
                let (answer, mut send) = client.send_request(req, false)?;
                let mut data = vec![0u8; 5 + (4 << 20)];
                let declared: u32 = if i % 2 == 0 { 4 << 20 } else { 16 << 20 };
                data[1..5].copy_from_slice(&declared.to_be_bytes());
                // A message that decodes: one unknown bytes field (number 15) filling it.
                let inner = (4u32 << 20) - 5;
                data[5] = (15 << 3) | 2;
                let mut v = inner;
                for b in &mut data[6..10] {
                    *b = (v & 0x7f) as u8 | if v >= 0x80 { 0x80 } else { 0 };
                    v >>= 7;
                }
                send.send_data(bytes::Bytes::from(data), false)?;
                answers.push(answer);
                open.push(send);
            }
            // Refused streams answer at once; the others wait for the rest of their message
            // (so answers stop coming: 3 s without one ends the wait).
            let mut refused = 0;
            let wait = Duration::from_secs(3);
            while let Ok(Some(answer)) = tokio::time::timeout(wait, futures::StreamExt::next(&mut answers)).await {
                let answer: http::Response<h2::RecvStream> = answer?;
                let status = answer.headers().get("grpc-status").map(|v| v.as_bytes().to_vec());
                anyhow::ensure!(
                    status.as_deref() == Some(b"8"),
                    "an answer other than RESOURCE_EXHAUSTED: {status:?} {:?}",
                    answer.headers()
                );
                refused += 1;
            }
            Ok::<_, anyhow::Error>((refused, open))
        })
        .await?;
        let (refused, _open) = held?;
        assert!(
            refused >= STREAMS - 8,
            "{refused} of {STREAMS} streams refused: the server held more than its budget"
        );
        assert!(
            grew < 64 << 10,
            "the server's peak memory grew by {grew} KiB for 32 unfinished 4 MiB requests"
        );
        driver.abort();
        // With the connection gone, the budget is free again: writes work.
        let writer = tc.client();
        TestCluster::write_file(&writer, "www", "", "after.html", b"still fine").await?;
        Ok(())
    })
    .await
}

/// A caller that asks for blobs and never reads the replies (it grants one byte of HTTP/2
/// window) made a server hold each whole reply: 4 MiB per `GetSmall`, 256 streams per
/// connection. Reply bytes now come out of a reply budget before they are read from disk, and
/// stay charged until written: at a 64 MiB budget this caller's address holds four 4 MiB
/// replies (its quarter), the next replies wait for room and are refused with
/// `RESOURCE_EXHAUSTED`, an account still reads meanwhile, and the room is back once the
/// connection goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unread_replies_are_held_within_the_servers_budget() {
    bounded(async {
        let opts = ClusterOpts::new(2, 0).insecure().arg("--request-buffer-max", "64M");
        let tc = TestCluster::start(opts).await?;
        let addr = tc.servers[1].addr.clone();
        let (asked, framed) = four_mib_get_small(&tc, &addr).await?;

        let pid = tc.servers[1].pid().context("the probed server's pid")?;
        let (client, driver) = unread_h2(&addr).await?;
        const STREAMS: usize = 24;
        let (counts, grew) = peak_growth(pid, async {
            let mut answers = futures::stream::FuturesUnordered::new();
            for _ in 0..STREAMS {
                answers.push(ask_get_small(&client, &addr, &framed).await?);
            }
            // Held replies answer with their headers at once, refused ones after waiting for
            // room (10 s); 20 s without an answer ends the wait.
            let (mut held, mut refused, mut kept) = (0, 0, Vec::new());
            let wait = Duration::from_secs(20);
            while let Ok(Some(answer)) = tokio::time::timeout(wait, futures::StreamExt::next(&mut answers)).await {
                let answer: http::Response<h2::RecvStream> = answer?;
                match answer.headers().get("grpc-status").map(|v| v.as_bytes().to_vec()) {
                    None => {
                        held += 1;
                        kept.push(answer);
                    }
                    Some(s) if s == b"8" => refused += 1,
                    other => bail!(
                        "an answer other than RESOURCE_EXHAUSTED: {other:?} {:?}",
                        answer.headers()
                    ),
                }
            }
            Ok::<_, anyhow::Error>((held, refused, kept))
        })
        .await?;
        let (held, refused, _kept) = counts?;
        assert_eq!(held + refused, STREAMS, "every request answered");
        assert!(
            held <= 4,
            "{held} unread 4 MiB replies held: more than this address's 16 MiB"
        );
        assert!(held >= 3, "only {held} held: an address may hold four");
        // Four held replies (16 MiB), each briefly with its read and its encoded copy at once.
        assert!(
            grew < 48 << 10,
            "the server's peak memory grew by {grew} KiB for {STREAMS} unread 4 MiB replies"
        );
        // An account is not this caller: it reads while the replies are held.
        assert_eq!(tc.read_on(&addr, "www", "f1.bin").await?, vec![1u8; 1 << 20]);
        // With the connection gone, this address has room again.
        driver.abort();
        drop(client);
        let anonymous = Cluster::new(std::slice::from_ref(&addr), Tls::Insecure, None)?;
        let got = tokio::time::timeout(Duration::from_secs(5), anonymous.get_small(None, asked))
            .await
            .context("the address still waits for room after its connection went")??;
        assert_eq!(got.len(), 4, "all four blobs in one reply");
        Ok(())
    })
    .await
}

/// Writes four files of 1 MiB to a new volume `www` and returns a `GetSmall` of all four (a
/// 4 MiB reply), as blob requests and as one framed gRPC message, with tickets from `addr`.
async fn four_mib_get_small(tc: &TestCluster, addr: &str) -> Result<(Vec<pb::GetBlobRequest>, bytes::Bytes)> {
    tc.create_volume("www", 2).await?;
    let writer = tc.client();
    let mut asked = Vec::new();
    for i in 0..4u8 {
        let name = format!("f{i}.bin");
        TestCluster::write_file(&writer, "www", "", &name, &vec![i; 1 << 20]).await?;
        tc.caught_up(addr).await?;
        let attr = tc.resolve_on(addr, "www", &name).await?.attr.context("no attr")?;
        asked.push(pb::GetBlobRequest {
            hash: attr.hash.clone(),
            offset: 0,
            ticket: attr.read_ticket.clone(),
            ino: attr.ino,
            manifest: Default::default(),
        });
    }
    let message = prost::Message::encode_to_vec(&pb::GetSmallRequest { blobs: asked.clone() });
    let mut framed = vec![0u8; 5];
    framed[1..5].copy_from_slice(&u32::try_from(message.len())?.to_be_bytes());
    framed.extend_from_slice(&message);
    Ok((asked, bytes::Bytes::from(framed)))
}

/// A raw HTTP/2 connection to `addr` that never reads: a window of one byte per stream and a
/// wide one for the connection, so the server's HTTP/2 layer takes each whole reply into its
/// send buffer and sends one byte of it. Returns the client and the connection's task, which
/// ends when the connection does.
async fn unread_h2(
    addr: &str,
) -> Result<(
    h2::client::SendRequest<bytes::Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
)> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let (client, conn) = h2::client::Builder::new()
        .initial_window_size(1)
        .initial_connection_window_size(1 << 30)
        .handshake(tcp)
        .await?;
    Ok((client, tokio::spawn(conn)))
}

/// Sends the framed `GetSmall` on a new stream of `client`; resolves to the answer's headers.
async fn ask_get_small(
    client: &h2::client::SendRequest<bytes::Bytes>,
    addr: &str,
    framed: &bytes::Bytes,
) -> Result<h2::client::ResponseFuture> {
    let mut client = client.clone().ready().await?;
    let req = http::Request::post(format!("http://{addr}/codafs.v1.Blobs/GetSmall"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())?;
    let (answer, mut send) = client.send_request(req, false)?;
    send.send_data(framed.clone(), true)?;
    Ok(answer)
}

/// A caller that leaves its replies unread holds its share of the reply budget, but not for
/// ever: a server closes a connection that has left a reply frame unwritten past the stall
/// timeout (`--reply-stall-timeout`, 2 s here), and the share is free again while the caller
/// still holds its end. Before, the share stayed taken for as long as the caller kept the
/// connection open, and this address's next reads waited 10 s and were refused. A connection
/// that has nothing unwritten is left alone however long it idles.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_connection_that_leaves_replies_unread_is_closed_after_the_stall_timeout() {
    bounded(async {
        let opts = ClusterOpts::new(2, 0)
            .insecure()
            .arg("--request-buffer-max", "64M")
            .arg("--reply-stall-timeout", "2");
        let tc = TestCluster::start(opts).await?;
        let addr = tc.servers[1].addr.clone();
        let (asked, framed) = four_mib_get_small(&tc, &addr).await?;

        // An idle connection that reads what it asks for, opened first.
        let tcp = tokio::net::TcpStream::connect(&addr).await?;
        let (idle, idle_conn) = h2::client::handshake(tcp).await?;
        let idle_driver = tokio::spawn(idle_conn);

        let (client, mut driver) = unread_h2(&addr).await?;
        let started = std::time::Instant::now();
        let mut held = Vec::new();
        for _ in 0..4 {
            let answer = ask_get_small(&client, &addr, &framed).await?;
            let answer = tokio::time::timeout(Duration::from_secs(5), answer)
                .await
                .context("a reply that fits the address's share was not started")??;
            assert!(
                answer.headers().get("grpc-status").is_none(),
                "a reply within the share was refused: {:?}",
                answer.headers()
            );
            held.push(answer);
        }
        // The address's 16 MiB share is held now: the server closes the connection once the
        // oldest frame has waited 2 s (checked every half second).
        tokio::time::timeout(Duration::from_secs(15), &mut driver)
            .await
            .context("the server kept a connection with unread replies open 15 s")??
            .ok();
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(2),
            "the connection was closed after {waited:?}, before the 2 s stall timeout"
        );
        // The caller still holds its stream handles; its share is free all the same.
        let anonymous = Cluster::new(std::slice::from_ref(&addr), Tls::Insecure, None)?;
        let got = tokio::time::timeout(Duration::from_secs(5), anonymous.get_small(None, asked))
            .await
            .context("the address still waits for room after its connection was closed")??;
        assert_eq!(got.len(), 4, "all four blobs in one reply");
        drop(held);

        // The idle connection, open all along with nothing unwritten, still answers.
        assert!(!idle_driver.is_finished(), "an idle connection was closed");
        let answer = ask_get_small(&idle, &addr, &framed).await?.await?;
        assert!(answer.headers().get("grpc-status").is_none(), "{:?}", answer.headers());
        let mut body = answer.into_body();
        let mut read = 0usize;
        while let Some(chunk) = body.data().await {
            let chunk = chunk?;
            read += chunk.len();
            body.flow_control().release_capacity(chunk.len())?;
        }
        assert!(
            read > 4 << 20,
            "the idle connection's reply had {read} bytes, not the four blobs"
        );
        idle_driver.abort();
        Ok(())
    })
    .await
}

/// The stall timeout over TLS, where the cut connection is the TLS stream's: a caller without a
/// token or certificate (a stranger: a sixty-fourth of a 64 MiB budget, 1 MiB) asks for 4 MiB
/// through a channel with one byte of stream window and never reads. The reply takes the
/// address's whole share, so the same address's next read waits for room; it gets it once the
/// server closes the first connection (2 s stall timeout), well before its 10 s wait ends in
/// `RESOURCE_EXHAUSTED` as it did before.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn over_tls_a_connection_that_leaves_a_reply_unread_is_closed_too() {
    bounded(async {
        let opts = ClusterOpts::new(2, 0)
            .arg("--request-buffer-max", "64M")
            .arg("--reply-stall-timeout", "2");
        let tc = TestCluster::start(opts).await?;
        let addr = tc.servers[1].addr.clone();
        let (asked, framed) = four_mib_get_small(&tc, &addr).await?;
        let Tls::Ca { ca_pem, .. } = &tc.tls else {
            bail!("cluster is not TLS")
        };
        let stranger = || Tls::Ca {
            ca_pem: ca_pem.clone(),
            identity: None,
        };
        let mut unread = stranger()
            .endpoint(&addr)?
            .initial_stream_window_size(Some(1))
            .connect_timeout(Duration::from_secs(2))
            .connect_lazy();
        let req = http::Request::post(format!("https://{addr}/codafs.v1.Blobs/GetSmall"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(tonic::body::Body::new(http_body_util::Full::new(framed)))?;
        futures::future::poll_fn(|cx| tower_service::Service::poll_ready(&mut unread, cx)).await?;
        let held = tower_service::Service::call(&mut unread, req).await?;
        assert!(
            held.headers().get("grpc-status").is_none(),
            "the first reply was refused: {:?}",
            held.headers()
        );
        let started = std::time::Instant::now();
        let reader = Cluster::new(std::slice::from_ref(&addr), stranger(), None)?;
        let got = tokio::time::timeout(Duration::from_secs(9), reader.get_small(None, asked))
            .await
            .context("the address's next read still waited 9 s: the unread connection was not closed")??;
        assert_eq!(got.len(), 4, "all four blobs in one reply");
        assert!(
            started.elapsed() >= Duration::from_secs(1),
            "the next read had room after {:?}: the first reply did not hold the share",
            started.elapsed()
        );
        drop(held);
        Ok(())
    })
    .await
}

/// A request to `path` through `ch` that sends the first `sent` bytes of a message declared
/// `declared` bytes long and then stays open. Resolves to its `grpc-status` when the server
/// answers (a refusal answers at once; a held request only when it fails for its stall).
async fn unfinished(mut ch: Channel, path: &str, declared: u32, sent: usize) -> Result<Option<Vec<u8>>> {
    use futures::StreamExt;
    use http_body::Frame;
    let mut data = vec![0u8; sent];
    data[1..5].copy_from_slice(&declared.to_be_bytes());
    let first = futures::stream::iter([Ok::<_, std::convert::Infallible>(Frame::data(bytes::Bytes::from(data)))]);
    let body = http_body_util::StreamBody::new(first.chain(futures::stream::pending()));
    let req = http::Request::post(format!("https://127.0.0.1{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(tonic::body::Body::new(body))?;
    futures::future::poll_fn(|cx| tower_service::Service::poll_ready(&mut ch, cx)).await?;
    let answer = tower_service::Service::call(&mut ch, req).await?;
    Ok(answer.headers().get("grpc-status").map(|v| v.as_bytes().to_vec()))
}

/// Callers with neither a token nor a server certificate ("strangers") share an eighth of the
/// request budget, each address a sixty-fourth. Before, each address could hold a quarter, so
/// four of them filling it made every other caller's large requests fail, a webmaster's upload
/// included. Eight stranger addresses now hold at most 8 MiB of a 64 MiB budget, a ninth is
/// refused, and an account's 6 MiB upload goes through while they hold it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn strangers_cannot_take_the_request_budget_from_accounts() {
    bounded(async {
        let opts = ClusterOpts::new(2, 0).arg("--request-buffer-max", "64M");
        let tc = TestCluster::start(opts).await?;
        tc.create_volume("www", 2).await?;
        let addr = tc.servers[1].addr.clone();
        let Tls::Ca { ca_pem, .. } = &tc.tls else {
            bail!("cluster is not TLS")
        };
        let from = |last: u8| -> Result<Channel> {
            let tls = Tls::Ca {
                ca_pem: ca_pem.clone(),
                identity: None,
            };
            Ok(tls
                .endpoint(&addr)?
                .local_address(Some(std::net::IpAddr::from([127, 0, 0, last])))
                .connect_timeout(Duration::from_secs(2))
                .connect_lazy())
        };
        // 8 addresses, 32 streams each, 512 KiB sent of a 4 MiB message: 128 MiB offered. At a
        // quarter per address, four addresses held all 64 MiB; now 8 MiB in all.
        const ADDRESSES: u8 = 8;
        const STREAMS: usize = 32;
        let mut answers = futures::stream::FuturesUnordered::new();
        for a in 0..ADDRESSES {
            let ch = from(20 + a)?;
            for _ in 0..STREAMS {
                answers.push(unfinished(ch.clone(), "/codafs.v1.Blobs/PutSmall", 4 << 20, 512 << 10));
            }
        }
        // Refusals answer at once; held streams do not answer (3 s without one ends the wait).
        let mut refused = 0;
        let wait = Duration::from_secs(3);
        while let Ok(Some(status)) = tokio::time::timeout(wait, futures::StreamExt::next(&mut answers)).await {
            let status = status?;
            anyhow::ensure!(
                status.as_deref() == Some(b"8"),
                "an answer other than RESOURCE_EXHAUSTED: {status:?}"
            );
            refused += 1;
        }
        // An account is not a stranger: its upload goes through while they hold their part.
        let writer = tc.client();
        let content = vec![7u8; 6 << 20];
        TestCluster::write_file(&writer, "www", "", "big.bin", &content)
            .await
            .context("an account's upload while strangers hold unfinished requests")?;
        let held = usize::from(ADDRESSES) * STREAMS - refused;
        assert!(
            held <= 16,
            "{held} unfinished 512 KiB requests of strangers held: more than their 8 MiB"
        );
        assert!(held >= 8, "only {held} held: each stranger address may hold 1 MiB");
        // A ninth address finds the strangers' part full.
        let ninth = unfinished(from(20 + ADDRESSES)?, "/codafs.v1.Blobs/PutSmall", 4 << 20, 64 << 10);
        let status = tokio::time::timeout(Duration::from_secs(10), ninth)
            .await
            .context("a ninth stranger's request was held, not refused")??;
        assert_eq!(status.as_deref(), Some(&b"8"[..]), "the ninth stranger's answer");
        drop(answers);
        Ok(())
    })
    .await
}
