//! The cluster PKI end to end: certificates bound to node ids and accepted only from current
//! members, single-use expiring join tokens, joiners without the CA key, and rotation.
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use codafs_client::transport::Tls;
use codafs_client::Cluster;
use codafs_proto::pb;
use codafs_tests::{bounded, codafs_bin, wait_until, ClusterOpts, TestCluster};
use tonic::transport::{Channel, Identity};
use tonic::Code;

/// A server's certificate and key as a client identity.
fn identity_of(dir: &Path) -> Result<Identity> {
    Ok(Identity::from_pem(
        std::fs::read_to_string(dir.join("tls/server.crt"))?,
        std::fs::read_to_string(dir.join("tls/server.key"))?,
    ))
}

/// The node id a server certificate (PEM file) names.
fn node_id_in(cert: &Path) -> Result<Option<u64>> {
    let pem = std::fs::read(cert)?;
    let (_, p) = x509_parser::pem::parse_x509_pem(&pem).context("PEM")?;
    let (_, c) = x509_parser::parse_x509_certificate(&p.contents).context("certificate")?;
    let Some(san) = c.subject_alternative_name()? else {
        return Ok(None);
    };
    Ok(san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => u.strip_prefix("urn:codafs:node:")?.parse().ok(),
        _ => None,
    }))
}

/// A TLS channel to `addr` presenting `identity`.
fn channel(tc: &TestCluster, addr: &str, identity: Identity) -> Result<Channel> {
    let Tls::Ca { ca_pem, .. } = &tc.tls else {
        bail!("cluster is not TLS")
    };
    let tls = Tls::Ca {
        ca_pem: ca_pem.clone(),
        identity: Some(identity),
    };
    Ok(tls
        .endpoint(addr)?
        .connect_timeout(Duration::from_secs(2))
        .connect_lazy())
}

/// A garbage vote: past the peer check it fails decoding (INVALID_ARGUMENT).
async fn vote(ch: Channel) -> tonic::Status {
    let mut r = tonic::Request::new(pb::RaftMessage {
        payload: bytes::Bytes::from_static(b"not a raft message"),
    });
    r.set_timeout(Duration::from_secs(5));
    match pb::raft_client::RaftClient::new(ch).vote(r).await {
        Ok(_) => tonic::Status::ok("a garbage vote was decoded"),
        Err(s) => s,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_removed_servers_certificate_is_refused_at_once() {
    bounded(async {
        let mut tc = TestCluster::start(ClusterOpts::new(3, 0)).await?;
        tc.create_volume("www", 2).await?;
        TestCluster::write_file(&tc.client(), "www", "", "a.html", b"before").await?;
        let victim = 2;
        let victim_id = tc.status_of(&tc.servers[victim].addr).await?.node_id;
        let cert = tc.servers[victim].dir.join("tls/server.crt");
        assert_eq!(node_id_in(&cert)?, Some(victim_id), "the certificate names the node id");
        let id = identity_of(&tc.servers[victim].dir)?;
        // A member's certificate gets past the peer check.
        let s = vote(channel(&tc, &tc.servers[0].addr, id.clone())?).await;
        assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");

        let admin = tc.client();
        admin
            .call(|ch| {
                let r = admin.request(pb::RemoveServerRequest { node_id: victim_id });
                async move { Cluster::admin(ch).remove_server(r).await.map(|r| r.into_inner()) }
            })
            .await?;
        tc.kill(victim);
        // Every remaining server refuses its Raft messages as soon as it has the membership change.
        for s in &tc.servers[..victim] {
            let ch = channel(&tc, &s.addr, id.clone())?;
            wait_until(Duration::from_secs(5), "the removed server's vote refused", || {
                let ch = ch.clone();
                async move { vote(ch).await.code() == Code::PermissionDenied }
            })
            .await?;
            let refused = vote(ch.clone()).await;
            // The removal's record says more than "not a member": the removed server stops.
            assert!(
                refused.message().contains("was removed from the cluster"),
                "{}",
                refused.message()
            );
            assert_eq!(
                codafs_proto::error::kind_of(&refused),
                codafs_proto::error::ErrorKind::Removed
            );

            // Blob copies (forwarded puts, single and batched) are refused and store nothing, and
            // so are forwarded writes, even with a valid admin token.
            tc.refuses_forwarding(ch.clone(), &s.addr, b"copied by a removed server")
                .await?;
        }

        // Nor can it come back under its node id, even with a fresh join token.
        let fresh = codafs_common::join::JoinToken::decode(&tc.new_join_token(0).await?)?;
        let mut r = tonic::Request::new(pb::JoinRequest {
            node_id: victim_id,
            addr: tc.servers[victim].addr.clone(),
            witness: false,
            join_key: fresh.join_key,
            csr_pem: String::new(),
        });
        r.set_timeout(Duration::from_secs(10));
        let st = pb::admin_client::AdminClient::new(channel(&tc, &tc.servers[0].addr, id)?)
            .join(r)
            .await
            .expect_err("a removed server joining again");
        assert_eq!(st.code(), Code::PermissionDenied, "{st:?}");
        assert!(st.message().contains("removed"), "{}", st.message());

        // The remaining servers work on.
        let c = tc.client_for(&tc.addrs()[..victim]);
        TestCluster::write_file(&c, "www", "", "b.html", b"after").await?;
        for s in &tc.servers[..victim] {
            assert_eq!(tc.read_on(&s.addr, "www", "b.html").await?, b"after");
        }
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn join_tokens_admit_one_server_expire_and_never_carry_the_ca_key() {
    bounded(async {
        let mut tc = TestCluster::start(ClusterOpts::new(1, 0)).await?;
        let token = tc.new_join_token(0).await?;
        let joiner = tc.join_with(&token).await?;
        let dir = tc.servers[joiner].dir.clone();
        // The joiner made its own key and got a certificate for its node id; no CA key.
        assert!(!dir.join("tls/ca.key").exists(), "a joiner holds no CA key");
        assert!(
            tc.servers[0].dir.join("tls/ca.key").exists(),
            "the init server keeps it"
        );
        let id = tc.status_of(&tc.servers[joiner].addr).await?.node_id;
        assert_eq!(node_id_in(&dir.join("tls/server.crt"))?, Some(id));
        assert!(
            !tc.servers[joiner].log().contains("CA key ("),
            "the joiner does not sign"
        );

        // The same token again: refused, clearly, before any certificate is made.
        let (err, used_dir) = tc.failed_join("second", &token).await?;
        assert!(err.contains("already used by server"), "{err}");
        assert!(!used_dir.join("tls/server.crt").exists());

        // An expired token.
        let short = tc.new_join_token(1).await?;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let (err, _) = tc.failed_join("late", &short).await?;
        assert!(err.contains("expired"), "{err}");

        // A token made up by someone else.
        let mut forged = codafs_common::join::JoinToken::decode(&token)?;
        forged.join_key = "00".repeat(32);
        let (err, _) = tc.failed_join("forged", &forged.encode()).await?;
        assert!(err.contains("unknown"), "{err}");

        // The CLI makes tokens with --ttl and says they are single use.
        let mut env = tc.client_env();
        env.push((
            "CODAFS_CREDENTIAL",
            tc.servers[0].dir.join("admin.token").display().to_string(),
        ));
        let out = std::process::Command::new(codafs_bin())
            .args(["cluster", "join-token", "--ttl", "10m"])
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        assert!(stderr.contains("ONE server") && stderr.contains("10 min"), "{stderr}");
        let t = codafs_common::join::JoinToken::decode(String::from_utf8_lossy(&out.stdout).trim())?;
        let left = t.expires.saturating_sub(codafs_common::token::unix_now());
        assert!((500..=600).contains(&left), "expires in {left} s");
        assert_eq!(tc.status_of(&tc.servers[0].addr).await?.voters, 2);
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn certificates_rotate_and_the_cluster_keeps_running() {
    bounded(async {
        let mut tc = TestCluster::start(ClusterOpts::new(2, 1)).await?;
        tc.create_volume("www", 2).await?;
        TestCluster::write_file(&tc.client(), "www", "", "a.html", b"before").await?;
        // Server 1 has no CA key (a server holding it signs); server 0 signs its own.
        for i in [1, 0] {
            let dir = tc.servers[i].dir.clone();
            let id = tc.status_of(&tc.servers[i].addr).await?.node_id;
            let old_cert = std::fs::read_to_string(dir.join("tls/server.crt"))?;
            let old_key = std::fs::read_to_string(dir.join("tls/server.key"))?;
            tc.kill(i);
            tc.servers[i].extra_args.push("--rotate-cert".into());
            tc.restart(i)?;
            tc.servers[i].extra_args.pop();
            let addr = tc.servers[i].addr.clone();
            wait_until(Duration::from_secs(30), "the rotated server is back", || async {
                tc.status_of(&addr)
                    .await
                    .is_ok_and(|s| s.leader_id != 0 && s.voters == 3)
            })
            .await?;
            assert!(tc.servers[i].log().contains("rotated this server's certificate"));
            let new_cert = std::fs::read_to_string(dir.join("tls/server.crt"))?;
            assert_ne!(new_cert, old_cert, "server {i}: a new certificate");
            assert_ne!(
                std::fs::read_to_string(dir.join("tls/server.key"))?,
                old_key,
                "and a new key"
            );
            assert_eq!(
                node_id_in(&dir.join("tls/server.crt"))?,
                Some(id),
                "for the same node id"
            );
            assert!(!dir.join("tls/server.crt.new").exists());
            // Writes through the rotated server replicate (it forwards blobs as a peer) and every
            // data replica serves them; Raft runs over the new certificate.
            let name = format!("after-{i}.html");
            TestCluster::write_file(&tc.client_on(&addr), "www", "", &name, name.as_bytes()).await?;
            for s in &tc.servers[..2] {
                assert_eq!(tc.read_on(&s.addr, "www", &name).await?, name.as_bytes());
            }
        }
        // Restarts without the flag keep the rotated certificate.
        let kept = std::fs::read_to_string(tc.servers[1].dir.join("tls/server.crt"))?;
        tc.kill(1);
        tc.restart(1)?;
        let addr = tc.servers[1].addr.clone();
        wait_until(Duration::from_secs(30), "server 1 is back", || async {
            tc.status_of(&addr).await.is_ok()
        })
        .await?;
        assert_eq!(std::fs::read_to_string(tc.servers[1].dir.join("tls/server.crt"))?, kept);
        assert_eq!(tc.read_on(&addr, "www", "a.html").await?, b"before");
        Ok(())
    })
    .await
}

/// Removing the only server that holds the cluster CA key: `cluster remove` refuses without
/// `--force` and says why (it removed it without a word), and a server joining afterwards
/// gives up with a clear message instead of asking the servers for a signature for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn removing_the_only_ca_key_holder_is_refused_and_later_joins_give_up_clearly() {
    bounded(async {
        let tc = TestCluster::start(ClusterOpts::new(3, 0)).await?;
        tc.create_volume("www", 2).await?;
        let holder = tc
            .servers
            .iter()
            .position(|s| s.dir.join("tls/ca.key").exists())
            .context("the CA key holder")?;
        let id = tc.status_of(&tc.servers[holder].addr).await?.node_id.to_string();
        let out = tc.codafs_admin(&["status"])?;
        anyhow::ensure!(out.stdout.matches("CA key").count() == 1, "one holder: {}", out.stdout);
        let out = tc.codafs_admin(&["cluster", "remove", &id])?;
        anyhow::ensure!(!out.ok && out.stderr.contains("CA key"), "{}", out.stderr);
        let out = tc.codafs_admin(&["cluster", "remove", &id, "--force"])?;
        anyhow::ensure!(out.ok && out.stderr.contains("WARNING"), "{}{}", out.stdout, out.stderr);
        tc.wait_leader(Duration::from_secs(20)).await?;
        let token = tc.client().join_token(3600).await?;
        let (err, _) = tc.failed_join("late", &token).await?;
        anyhow::ensure!(err.contains("could sign") && err.contains("SECURITY.md"), "{err}");
        Ok(())
    })
    .await
}
