//! Accounts, login and tokens through the real `codafs` CLI and servers.
use std::time::Duration;

use anyhow::Result;
use codafs_client::Cluster;
use codafs_proto::pb;
use codafs_tests::{ClusterOpts, TestCluster};

/// Runs `codafs ARGS` against the cluster with `stdin` as input; returns (ok, stdout, stderr).
fn cli(tc: &TestCluster, env: &[(&str, String)], args: &[&str], stdin: &str) -> Result<(bool, String, String)> {
    let out = tc.codafs_as_with(None, env, args, stdin)?;
    Ok((out.ok, out.stdout, out.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn webmaster_logs_in_and_writes_only_their_own_volume() {
    let run = async {
        let tc = TestCluster::start(ClusterOpts::new(1, 0)).await?;
        let dir = tc.root.path();
        let admin_cred = tc.servers[0].dir.join("admin.token").display().to_string();
        let admin = [
            ("CODAFS_CREDENTIAL", admin_cred),
            ("CODAFS_TOKEN_FILE", dir.join("none").display().to_string()),
        ];
        let (ok, _, err) = cli(
            &tc,
            &admin,
            &["user", "add", "webmaster", "--password-stdin"],
            "s3cret-pass\n",
        )?;
        assert!(ok, "{err}");
        let (ok, _, err) = cli(
            &tc,
            &admin,
            &["user", "add", "webmaster", "--password-stdin"],
            "s3cret-pass\n",
        )?;
        assert!(!ok && err.contains("already exists"), "{err}");
        let (ok, _, err) = cli(&tc, &admin, &["user", "add", "shorty", "--password-stdin"], "short\n")?;
        assert!(!ok && err.contains("password must be"), "{err}");
        let (ok, _, err) = cli(&tc, &admin, &["volume", "create", "site", "--owner", "webmaster"], "")?;
        assert!(ok, "{err}");
        tc.create_volume("other", 1).await?;

        // Log in as the webmaster: the token lands in a 0600 file.
        let token_file = dir.join("wm-token");
        let wm = [("CODAFS_TOKEN_FILE", token_file.display().to_string())];
        let (ok, _, err) = cli(
            &tc,
            &wm,
            &["login", "webmaster", "--password-stdin"],
            "wrong-password\n",
        )?;
        assert!(!ok && err.contains("wrong user name or password"), "{err}");
        assert!(!token_file.exists());
        let (ok, out, err) = cli(&tc, &wm, &["login", "webmaster", "--password-stdin"], "s3cret-pass\n")?;
        assert!(ok && out.contains("logged in as webmaster"), "{err}");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&token_file)?.permissions().mode() & 0o777, 0o600);
        let token = std::fs::read_to_string(&token_file)?;

        // The token writes "site" but not "other"; admin commands are refused.
        let c = Cluster::new(&tc.addrs(), tc.tls.clone(), Some(token.clone()))?;
        c.put_blob(bytes::Bytes::from_static(b"<h1>mine</h1>"), 1).await?;
        TestCluster::write_file(&c, "site", "", "index.html", b"<h1>mine</h1>").await?;
        let e = TestCluster::write_file(&c, "other", "", "index.html", b"<h1>mine</h1>")
            .await
            .unwrap_err();
        let code = e.downcast_ref::<codafs_client::ClientError>().map(|e| e.code());
        assert_eq!(code, Some(tonic::Code::PermissionDenied), "{e:#}");
        let (ok, _, err) = cli(&tc, &wm, &["user", "list"], "")?;
        assert!(!ok && err.contains("not an admin"), "{err}");

        // Expired and foreign tokens are refused with a reason.
        let short = c
            .call(|ch| {
                let r = c.request(pb::LoginRequest {
                    user: "webmaster".into(),
                    password: "s3cret-pass".into(),
                    ttl_secs: 1,
                });
                async move { Cluster::admin(ch).login(r).await.map(|r| r.into_inner().token) }
            })
            .await?;
        tokio::time::sleep(Duration::from_millis(2100)).await;
        let expired = Cluster::new(&tc.addrs(), tc.tls.clone(), Some(short))?;
        let e = TestCluster::mkdir(&expired, "site", "", "late").await.unwrap_err();
        assert!(e.to_string().contains("expired"), "{e:#}");
        let other = TestCluster::start(ClusterOpts::new(1, 0)).await?;
        let foreign = Cluster::new(&tc.addrs(), tc.tls.clone(), Some(other.token.clone()))?;
        let e = TestCluster::mkdir(&foreign, "site", "", "x").await.unwrap_err();
        assert!(
            e.to_string().contains("another cluster") || e.to_string().contains("no longer knows"),
            "{e:#}"
        );

        // Ownership blocks removal until the volume has another owner.
        let (ok, _, err) = cli(&tc, &admin, &["user", "remove", "webmaster"], "")?;
        assert!(!ok && err.contains("still owns volume site"), "{err}");
        let (ok, out, err) = cli(
            &tc,
            &admin,
            &["volume", "set", "site", "--owner", "admin", "--add-writer", "webmaster"],
            "",
        )?;
        assert!(ok && out.contains("writers     webmaster"), "{err}");
        TestCluster::mkdir(&c, "site", "", "still-a-writer").await?;
        let (ok, out, _) = cli(&tc, &wm, &["logout"], "")?;
        assert!(ok && out.contains("logged out") && !token_file.exists());
        Ok::<_, anyhow::Error>(())
    };
    codafs_tests::bounded_within(Duration::from_secs(120), run).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rotating_keys_keeps_old_tokens_until_the_old_key_is_retired() {
    let run = async {
        let tc = TestCluster::start(ClusterOpts::new(1, 0)).await?;
        let dir = tc.root.path();
        let admin = [
            (
                "CODAFS_CREDENTIAL",
                tc.servers[0].dir.join("admin.token").display().to_string(),
            ),
            ("CODAFS_TOKEN_FILE", dir.join("none").display().to_string()),
        ];
        let (ok, _, err) = cli(
            &tc,
            &admin,
            &["user", "add", "ops", "--admin", "--password-stdin"],
            "long-enough-pw\n",
        )?;
        assert!(ok, "{err}");
        tc.create_volume("www", 1).await?;
        let old = Cluster::new(&tc.addrs(), tc.tls.clone(), Some(tc.token.clone()))?;
        let (ok, out, err) = cli(&tc, &admin, &["cluster", "rotate-key"], "")?;
        assert!(ok && out.contains("signing keys: 1, 2 (current: 2)"), "{out}{err}");
        // Tokens signed with key 1 still work; new logins are signed with key 2.
        TestCluster::mkdir(&old, "www", "", "before-retire").await?;
        let ops_token = dir.join("ops-token").display().to_string();
        let (ok, _, err) = cli(
            &tc,
            &[("CODAFS_TOKEN_FILE", ops_token.clone())],
            &["login", "ops", "--password-stdin"],
            "long-enough-pw\n",
        )?;
        assert!(ok, "{err}");
        let new_admin = [("CODAFS_TOKEN_FILE", ops_token)];
        let (ok, out, err) = cli(
            &tc,
            &new_admin,
            &["cluster", "rotate-key", "--retire", "1", "--no-new-key"],
            "",
        )?;
        assert!(ok && out.contains("signing keys: 2 (current: 2)"), "{out}{err}");
        let e = TestCluster::mkdir(&old, "www", "", "after-retire").await.unwrap_err();
        assert!(e.to_string().contains("no longer knows"), "{e:#}");
        let (ok, _, err) = cli(
            &tc,
            &new_admin,
            &["cluster", "rotate-key", "--retire", "2", "--no-new-key"],
            "",
        )?;
        assert!(!ok && err.contains("current signing key"), "{err}");
        Ok::<_, anyhow::Error>(())
    };
    codafs_tests::bounded_within(Duration::from_secs(120), run).await;
}
