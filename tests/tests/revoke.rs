//! Revocable accounts, through the real CLI and servers: after each way of taking an account's
//! rights away, the tokens it held stop working on EVERY server within seconds; a demoted admin
//! can no longer make admin calls; logins are rate-limited.
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use codafs_client::{ClientError, Cluster};
use codafs_proto::pb;
use codafs_tests::{ClusterOpts, TestCluster};
use tonic::Code;

/// How soon a revocation must be in force on every server.
const WITHIN: Duration = Duration::from_secs(5);

/// The admin credential from `cluster init`, for CLI calls.
fn admin_env(tc: &TestCluster) -> Vec<(&'static str, String)> {
    vec![
        (
            "CODAFS_CREDENTIAL",
            tc.servers[0].dir.join("admin.token").display().to_string(),
        ),
        ("CODAFS_TOKEN_FILE", tc.root.path().join("none").display().to_string()),
    ]
}

/// Runs `codafs ARGS` as root with `env`; fails with its stderr unless it succeeds.
fn cli(tc: &TestCluster, env: &[(&str, String)], args: &[&str], stdin: &str) -> Result<String> {
    let out = tc.codafs_as_with(None, env, args, stdin)?;
    ensure!(out.ok, "codafs {args:?} failed: {}{}", out.stdout, out.stderr);
    Ok(out.stdout)
}

/// Creates an account through the CLI.
fn add_user(tc: &TestCluster, name: &str, password: &str, admin: bool) -> Result<()> {
    let mut args = vec!["user", "add", name, "--password-stdin"];
    if admin {
        args.push("--admin");
    }
    cli(tc, &admin_env(tc), &args, &format!("{password}\n"))?;
    Ok(())
}

/// Logs in on server `addr` (RPC, as `codafs login` does); returns the token.
async fn login_on(tc: &TestCluster, addr: &str, user: &str, password: &str) -> Result<String, ClientError> {
    let c = Cluster::new(&tc.addrs(), tc.tls.clone(), None).expect("valid addresses");
    let req = pb::LoginRequest {
        user: user.into(),
        password: password.into(),
        ttl_secs: 600,
    };
    c.call_on(addr, |ch| {
        let r = c.request(req.clone());
        async move { Cluster::admin(ch).login(r).await.map(|r| r.into_inner().token) }
    })
    .await
}

/// Logs in on the first server at which the account exists yet (creation reaches followers a
/// moment after the CLI returns).
async fn login(tc: &TestCluster, user: &str, password: &str) -> Result<String> {
    let deadline = Instant::now() + WITHIN;
    loop {
        match login_on(tc, &tc.servers[0].addr, user, password).await {
            Ok(t) => return Ok(t),
            Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => bail!("login as {user}: {e}"),
        }
    }
}

/// Asks server `addr` who `token` speaks for (answered by that server alone).
async fn who_on(tc: &TestCluster, addr: &str, token: &str) -> Result<pb::WhoAmIReply, ClientError> {
    let c = Cluster::new(&tc.addrs(), tc.tls.clone(), Some(token.to_string())).expect("valid addresses");
    c.call_on(addr, |ch| {
        let r = c.request(pb::Empty {});
        async move { Cluster::admin(ch).who_am_i(r).await.map(|r| r.into_inner()) }
    })
    .await
}

/// An admin-only call (listing accounts) on server `addr` with `token`.
async fn admin_call_on(tc: &TestCluster, addr: &str, token: &str) -> Result<pb::UserList, ClientError> {
    let c = Cluster::new(&tc.addrs(), tc.tls.clone(), Some(token.to_string())).expect("valid addresses");
    c.call_on(addr, |ch| {
        let r = c.request(pb::Empty {});
        async move { Cluster::admin(ch).list_users(r).await.map(|r| r.into_inner()) }
    })
    .await
}

/// Waits (bounded) until `token` is accepted by every server, as the named account.
async fn works_everywhere(tc: &TestCluster, token: &str, user: &str) -> Result<()> {
    for addr in tc.addrs() {
        let deadline = Instant::now() + WITHIN;
        loop {
            match who_on(tc, &addr, token).await {
                Ok(w) if w.user == user => break,
                Ok(w) => bail!("{addr} says the token of {user} is {}'s", w.user),
                Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(e) => bail!("{addr} refuses the token of {user}: {e}"),
            }
        }
    }
    Ok(())
}

/// Waits until every server refuses `token` as unauthenticated with a message containing
/// `reason`, all within [`WITHIN`] of `since`; returns how long the slowest server took.
async fn refused_everywhere(tc: &TestCluster, token: &str, reason: &str, since: Instant) -> Result<Duration> {
    let deadline = since + WITHIN;
    for addr in tc.addrs() {
        loop {
            match who_on(tc, &addr, token).await {
                Err(e) if e.code() == Code::Unauthenticated => {
                    ensure!(
                        e.to_string().contains(reason),
                        "{addr}: refused, but not for {reason:?}: {e}"
                    );
                    break;
                }
                r if Instant::now() >= deadline => {
                    bail!("{addr} still answers a revoked token {WITHIN:?} after the revocation: {r:?}")
                }
                _ => tokio::time::sleep(Duration::from_millis(25)).await,
            }
        }
    }
    Ok(since.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revoked_tokens_stop_working_on_every_server_within_seconds() {
    let run = async {
        // Two data replicas and a witness: three servers that each check tokens themselves.
        let tc = TestCluster::start(ClusterOpts::new(2, 1)).await?;
        let admin = admin_env(&tc);
        for (name, is_admin) in [
            ("alice", false),
            ("bob", true),
            ("carol", false),
            ("dave", false),
            ("erin", false),
        ] {
            add_user(&tc, name, &format!("{name}-first-pw"), is_admin)?;
        }
        cli(&tc, &admin, &["volume", "create", "site", "--write-quorum", "1"], "")?;
        cli(&tc, &admin, &["volume", "set", "site", "--add-writer", "carol"], "")?;

        // 1. A new password ends the old tokens; the new password gives a working one.
        let a1 = login(&tc, "alice", "alice-first-pw").await?;
        works_everywhere(&tc, &a1, "alice").await?;
        let t = Instant::now();
        cli(
            &tc,
            &admin,
            &["user", "passwd", "alice", "--password-stdin"],
            "alice-second-pw\n",
        )?;
        let took = refused_everywhere(&tc, &a1, "revoked", t).await?;
        eprintln!("passwd: every server refused the old token after {took:?}");
        let e = login_on(&tc, &tc.servers[0].addr, "alice", "alice-first-pw")
            .await
            .unwrap_err();
        ensure!(e.code() == Code::Unauthenticated, "old password: {e}");
        let a2 = login(&tc, "alice", "alice-second-pw").await?;
        works_everywhere(&tc, &a2, "alice").await?;

        // 2. Demoting an admin: the admin token stops working, and a fresh login is a user's,
        //    refused by every admin call on every server.
        let b1 = login(&tc, "bob", "bob-first-pw").await?;
        works_everywhere(&tc, &b1, "bob").await?;
        for addr in tc.addrs() {
            admin_call_on(&tc, &addr, &b1)
                .await
                .with_context(|| format!("bob is an admin on {addr}"))?;
        }
        let t = Instant::now();
        cli(
            &tc,
            &admin,
            &["user", "passwd", "bob", "--no-admin", "--password-stdin"],
            "bob-second-pw\n",
        )?;
        refused_everywhere(&tc, &b1, "revoked", t).await?;
        for addr in tc.addrs() {
            let e = admin_call_on(&tc, &addr, &b1).await.unwrap_err();
            ensure!(e.code() == Code::Unauthenticated, "{addr}: old admin token: {e}");
        }
        let b2 = login(&tc, "bob", "bob-second-pw").await?;
        works_everywhere(&tc, &b2, "bob").await?;
        for addr in tc.addrs() {
            let w = who_on(&tc, &addr, &b2).await?;
            ensure!(!w.admin, "{addr} still calls bob an admin");
            let e = admin_call_on(&tc, &addr, &b2).await.unwrap_err();
            ensure!(
                e.code() == Code::PermissionDenied && e.to_string().contains("not an admin"),
                "{addr}: demoted admin's call: {e}"
            );
        }
        let bob_file = tc.root.path().join("bob.token");
        std::fs::write(&bob_file, &b2)?;
        let bob_env = [("CODAFS_CREDENTIAL", bob_file.display().to_string())];
        let out = tc.codafs_as_with(
            None,
            &bob_env,
            &["user", "add", "mallory", "--password-stdin"],
            "mallory-pw-1\n",
        )?;
        ensure!(!out.ok && out.stderr.contains("not an admin"), "{}", out.stderr);

        // 3. Losing write rights on a volume ends the tokens; the writes they allowed too.
        let c1 = login(&tc, "carol", "carol-first-pw").await?;
        let carol = Cluster::new(&tc.addrs(), tc.tls.clone(), Some(c1.clone()))?;
        TestCluster::mkdir(&carol, "site", "", "by-carol").await?;
        works_everywhere(&tc, &c1, "carol").await?;
        let t = Instant::now();
        cli(&tc, &admin, &["volume", "set", "site", "--remove-writer", "carol"], "")?;
        refused_everywhere(&tc, &c1, "revoked", t).await?;
        let e = TestCluster::mkdir(&carol, "site", "", "after-removal")
            .await
            .unwrap_err();
        let code = e.downcast_ref::<ClientError>().map(ClientError::code);
        ensure!(code == Some(Code::Unauthenticated), "write with a revoked token: {e:#}");
        // A fresh login still works (the password did not change), but may not write.
        let c2 = login(&tc, "carol", "carol-first-pw").await?;
        let carol = Cluster::new(&tc.addrs(), tc.tls.clone(), Some(c2))?;
        let e = TestCluster::mkdir(&carol, "site", "", "no-rights").await.unwrap_err();
        let code = e.downcast_ref::<ClientError>().map(ClientError::code);
        ensure!(code == Some(Code::PermissionDenied), "write without rights: {e:#}");

        // 4. `codafs user revoke`: by an admin for anyone, every token at once; by a user for
        //    their own tokens only.
        let d1 = login(&tc, "dave", "dave-first-pw").await?;
        let d2 = login_on(&tc, &tc.servers[1].addr, "dave", "dave-first-pw").await?;
        works_everywhere(&tc, &d1, "dave").await?;
        works_everywhere(&tc, &d2, "dave").await?;
        let t = Instant::now();
        let out = cli(&tc, &admin, &["user", "revoke", "dave"], "")?;
        ensure!(out.contains("revoked every token of dave"), "{out}");
        refused_everywhere(&tc, &d1, "revoked", t).await?;
        refused_everywhere(&tc, &d2, "revoked", t).await?;
        works_everywhere(&tc, &a2, "alice")
            .await
            .context("other accounts keep their tokens")?;
        let d3 = login(&tc, "dave", "dave-first-pw").await?;
        works_everywhere(&tc, &d3, "dave").await?;
        let dave_file = tc.root.path().join("dave.token");
        std::fs::write(&dave_file, &d3)?;
        let dave_env = [
            ("CODAFS_CREDENTIAL", dave_file.display().to_string()),
            ("CODAFS_TOKEN_FILE", tc.root.path().join("none").display().to_string()),
        ];
        let out = tc.codafs_as_with(None, &dave_env, &["user", "revoke", "alice"], "")?;
        ensure!(
            !out.ok && out.stderr.contains("may not revoke the tokens of alice"),
            "{}",
            out.stderr
        );
        works_everywhere(&tc, &a2, "alice").await?;
        let t = Instant::now();
        cli(&tc, &dave_env, &["user", "revoke", "dave"], "")?;
        refused_everywhere(&tc, &d3, "revoked", t).await?;

        // 5. Removing an account: its tokens stop everywhere, and re-creating the name does not
        //    bring them back.
        let e1 = login(&tc, "erin", "erin-first-pw").await?;
        works_everywhere(&tc, &e1, "erin").await?;
        let t = Instant::now();
        cli(&tc, &admin, &["user", "remove", "erin"], "")?;
        refused_everywhere(&tc, &e1, "no longer exists", t).await?;
        add_user(&tc, "erin", "erin-first-pw", false)?;
        let e2 = login(&tc, "erin", "erin-first-pw").await?;
        works_everywhere(&tc, &e2, "erin").await?;
        for addr in tc.addrs() {
            let e = who_on(&tc, &addr, &e1).await.unwrap_err();
            ensure!(
                e.code() == Code::Unauthenticated && e.to_string().contains("revoked"),
                "{addr}: a removed account's token came back with the name: {e}"
            );
        }
        Ok::<_, anyhow::Error>(())
    };
    codafs_tests::bounded_within(Duration::from_secs(150), run).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn password_guessing_is_rate_limited_for_known_and_unknown_accounts_alike() {
    let run = async {
        let tc = TestCluster::start(ClusterOpts::new(1, 0)).await?;
        add_user(&tc, "web", "web-password", false)?;
        let addr = tc.servers[0].addr.clone();
        // Each account name has its own budget of failures, whether the account exists or not:
        // the answers do not tell them apart.
        for user in ["web", "nobody"] {
            let mut refusals = Vec::new();
            for _ in 0..11 {
                refusals.push(login_on(&tc, &addr, user, "guess-guess").await.unwrap_err());
            }
            let (last, earlier) = refusals.split_last().context("no attempts")?;
            for e in earlier {
                ensure!(
                    e.code() == Code::Unauthenticated && e.to_string().contains("wrong user name or password"),
                    "{user}: {e}"
                );
            }
            ensure!(
                last.code() == Code::ResourceExhausted
                    && last
                        .to_string()
                        .contains("too many login attempts for this account; retry in"),
                "{user}: 11th guess: {last}"
            );
        }
        // The right password is refused too while the account's budget is spent ...
        let e = login_on(&tc, &addr, "web", "web-password").await.unwrap_err();
        ensure!(e.code() == Code::ResourceExhausted, "{e}");
        // ... and works again once a failure has been forgiven (one every 6 s).
        tokio::time::sleep(Duration::from_millis(6100)).await;
        let token = login_on(&tc, &addr, "web", "web-password").await?;
        ensure!(who_on(&tc, &addr, &token).await?.user == "web");
        Ok::<_, anyhow::Error>(())
    };
    codafs_tests::bounded_within(Duration::from_secs(120), run).await;
}
