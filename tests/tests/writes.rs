//! Writes through real mounts: per-uid tokens handed over the control socket, EROFS without a
//! token (root included), EACCES without a right on the volume, store-on-close round trips seen
//! from a second mount, failed commits that keep the old content, and the concurrent-writer
//! policy. Everything runs against real server processes and real FUSE mounts.
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use codafs_tests::users::{sh_as, User};
use codafs_tests::{bounded, read_file, wait_until, ClusterOpts, Mount, TestCluster};

const WEBMASTER_UID: u32 = 1000;
const STRANGER_UID: u32 = 1001;
const PASSWORD: &str = "webmaster-pass\n";

/// Runs `codafs` as root with the admin credential; fails on error.
fn admin(tc: &TestCluster, args: &[&str], stdin: &str) -> Result<String> {
    let cred = tc.servers[0].dir.join("admin.token").display().to_string();
    let out = tc.codafs_as_with(None, &[("CODAFS_CREDENTIAL", cred)], args, stdin)?;
    ensure!(out.ok, "codafs {args:?} failed: {}", out.stderr);
    Ok(out.stdout)
}

/// A cluster with volume `www` owned by `webmaster` and volume `other` owned by the admin.
async fn setup() -> Result<TestCluster> {
    let tc = TestCluster::start(ClusterOpts::new(2, 1)).await?;
    tc.create_volume("www", 2).await?;
    tc.create_volume("other", 2).await?;
    admin(&tc, &["user", "add", "webmaster", "--password-stdin"], PASSWORD)?;
    admin(&tc, &["volume", "set", "www", "--owner", "webmaster"], "")?;
    tc.shared_bin()?;
    Ok(tc)
}

/// `codafs login webmaster` run by `user`: stores the token and hands it to every mount.
fn login(tc: &TestCluster, user: &User) -> Result<String> {
    let out = tc.codafs_as(Some(user), &["login", "webmaster", "--password-stdin"], PASSWORD)?;
    ensure!(out.ok, "login failed: {}", out.stderr);
    Ok(out.stdout)
}

/// `codafs login` hands a token to every mount on the host. A mount of another cluster sent it
/// to its own servers to check (which then held a token valid on the first cluster) and kept
/// it while they were unreachable. It now refuses a token that is not for its own cluster
/// without any server seeing it, also when it has just started.
///
/// `codafs logout` leaves the token a mount of another cluster holds (it dropped root's token
/// from every mount on the host, of any cluster: also other tests' mounts, in CI).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mount_takes_and_drops_only_its_own_clusters_tokens() {
    bounded(async {
        let tc = setup().await?;
        let other = TestCluster::start(ClusterOpts::new(1, 0)).await?;
        let dir = tc.root.path();
        let theirs = Mount::start(&other.client_args(), dir, "theirs", &[])?;
        let reply = theirs.control(&format!("login {}", tc.token))?;
        let err = reply["error"].as_str().unwrap_or_default();
        ensure!(
            err.contains("token is for cluster") && err.contains("this mount talks to"),
            "refused by the mount itself: {reply}"
        );
        // Its own cluster's token is taken as before, and ours still works on our mount.
        let reply = theirs.control(&format!("login {}", other.token))?;
        ensure!(reply["ok"] == true, "{reply}");
        let ours = Mount::start(&tc.client_args(), dir, "ours", &[])?;
        let reply = ours.control(&format!("login {}", tc.token))?;
        ensure!(reply["ok"] == true, "{reply}");
        // `codafs logout` drops the stored token's cluster's tokens only: the other cluster's
        // mount on this host keeps root's token for it (and so do other tests' mounts).
        let token_file = dir.join("root-token");
        std::fs::write(&token_file, &tc.token)?;
        let out = tc.codafs_as_with(
            None,
            &[("CODAFS_TOKEN_FILE", token_file.display().to_string())],
            &["logout"],
            "",
        )?;
        ensure!(out.ok && !token_file.exists(), "{}{}", out.stdout, out.stderr);
        let holds = |m: &Mount| m.status().map(|s| s.tokens.iter().any(|t| t.uid == 0));
        ensure!(!holds(&ours)?, "our mount still holds root's token: {}", out.stdout);
        ensure!(
            holds(&theirs)?,
            "the other cluster's mount lost root's token: {}",
            out.stdout
        );
        ensure!(
            out.stdout
                .contains(&format!("mount {}: token of uid 0 dropped", ours.path.display()))
                && out.stdout.contains(&format!(
                    "mount {}: still holds your token for cluster",
                    theirs.path.display()
                )),
            "{}",
            out.stdout
        );
        Ok(())
    })
    .await
}

/// A writable mount "a" whose root holds the admin token, and a `--read-only` mount "web".
fn writer_and_web_node(tc: &TestCluster) -> Result<(Mount, Mount)> {
    let dir = tc.root.path();
    let a = Mount::start(&tc.client_args(), dir, "a", &[])?;
    let web = Mount::start(&tc.client_args(), dir, "web", &["--read-only"])?;
    let reply = a.control(&format!("login {}", tc.token))?;
    ensure!(reply["ok"] == true, "{reply}");
    Ok((a, web))
}

/// The version of volume `www` a mount has applied (from `codafs status`).
fn www_version(m: &Mount) -> Option<u64> {
    Some(m.status().ok()?.volume("www")?.version)
}

/// Waits until `path` reads as `want` (through a mount, after callbacks).
async fn wait_content(path: &Path, want: &[u8]) -> Result<()> {
    let p = path.to_path_buf();
    wait_until(
        Duration::from_secs(10),
        &format!("{} to read {:?}", p.display(), String::from_utf8_lossy(want)),
        || {
            let p = p.clone();
            async move { read_file(&p).map(|d| d == want).unwrap_or(false) }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn webmaster_writes_through_the_mount_and_another_node_sees_each_change() {
    bounded(async {
        let tc = setup().await?;
        let dir = tc.root.path();
        let a = Mount::start(&tc.client_args(), dir, "a", &[])?;
        let web = Mount::start(&tc.client_args(), dir, "web", &["--read-only"])?;
        let wm = tc.user(WEBMASTER_UID)?;
        let said = login(&tc, &wm)?;
        ensure!(
            said.contains(&format!("uid {WEBMASTER_UID}")),
            "login did not reach the mount: {said}"
        );

        let w = a.path.join("www");
        let script = format!(
            r#"set -e
cd {w}
printf 'version one' > index.html
mkdir -p css/old
printf 'body {{}}' > css/old/site.css
mv css/old/site.css css/site.css
rmdir css/old
ln -s index.html home.html
ln index.html same.html
chmod 640 css/site.css
printf 'version two, longer' > index.html
truncate -s 11 index.html
touch -m -d '2001-02-03 04:05:06 UTC' css/site.css
"#,
            w = w.display()
        );
        let out = sh_as(&wm, &script)?;
        ensure!(out.ok, "webmaster's writes failed: {}", out.stderr);

        // The web node sees every change without remounting.
        let r = web.path.join("www");
        wait_content(&r.join("index.html"), b"version two").await?;
        wait_content(&r.join("css/site.css"), b"body {}").await?;
        ensure!(!r.join("css/old").exists(), "rmdir not seen");
        ensure!(std::fs::read_link(r.join("home.html"))? == Path::new("index.html"));
        let (m1, m2) = (
            std::fs::metadata(r.join("index.html"))?,
            std::fs::metadata(r.join("same.html"))?,
        );
        ensure!(
            m1.ino() == m2.ino() && m1.nlink() == 2,
            "hard link: {} {} nlink {}",
            m1.ino(),
            m2.ino(),
            m1.nlink()
        );
        ensure!(read_file(&r.join("same.html"))? == b"version two");
        let css_path = r.join("css/site.css");
        wait_until(
            Duration::from_secs(10),
            "utimens mtime seen by the web node",
            || async { std::fs::metadata(&css_path).is_ok_and(|m| m.mtime() == 981_173_106) },
        )
        .await?;
        let css = std::fs::metadata(&css_path)?;
        ensure!(
            css.uid() == WEBMASTER_UID,
            "new files belong to their creator: {}",
            css.uid()
        );
        // The writer's own mount shows the same.
        ensure!(read_file(&w.join("index.html"))? == b"version two");
        ensure!(std::fs::metadata(w.join("css/site.css"))?.mode() & 0o777 == 0o640);

        // Unlink of one name keeps the other.
        let out = sh_as(&wm, &format!("rm {}", w.join("index.html").display()))?;
        ensure!(out.ok, "{}", out.stderr);
        wait_until(Duration::from_secs(10), "unlink seen by the web node", || async {
            !r.join("index.html").exists()
        })
        .await?;
        ensure!(read_file(&r.join("same.html"))? == b"version two");
        ensure!(std::fs::metadata(r.join("same.html"))?.nlink() == 1);

        // A token for `www` is no right on `other`: EACCES, not EROFS.
        let o = a.path.join("other");
        let out = sh_as(&wm, &format!("mkdir {}/x", o.display()))?;
        ensure!(
            !out.ok && out.stderr.contains("Permission denied"),
            "mkdir in other: {}",
            out.stderr
        );
        let out = sh_as(&wm, &format!("printf x > {}/x.html", o.display()))?;
        ensure!(
            !out.ok && out.stderr.contains("Permission denied"),
            "create in other: {}",
            out.stderr
        );
        ensure!(
            tc.volume_info("other").await?.used_files == 0,
            "nothing reached volume other"
        );

        // Rename and link never cross volumes (root with an admin token may write both).
        let reply = a.control(&format!("login {}", tc.token))?;
        ensure!(reply["ok"] == true, "admin token refused: {reply}");
        let err = std::fs::rename(w.join("same.html"), o.join("same.html"))
            .err()
            .context("rename across volumes")?;
        ensure!(err.raw_os_error() == Some(libc::EXDEV), "rename across volumes: {err}");
        let err = std::fs::hard_link(w.join("same.html"), o.join("l.html"))
            .err()
            .context("link across volumes")?;
        ensure!(err.raw_os_error() == Some(libc::EXDEV), "link across volumes: {err}");

        // The read-only web node refuses changes even for root with a token.
        let reply = web.control(&format!("login {}", tc.token))?;
        ensure!(reply["ok"] == true);
        let err = std::fs::write(r.join("same.html"), b"x")
            .err()
            .context("write on a --read-only mount")?;
        ensure!(err.raw_os_error() == Some(libc::EROFS), "{err}");
        Ok(())
    })
    .await
}

/// Every mutating syscall by `user` under `dir` fails with "Read-only file system".
fn expect_read_only(user: &User, dir: &Path) -> Result<()> {
    let attempts = [
        ("create", ": > new.html"),
        ("overwrite", "printf x > f.html"),
        ("append", "printf x >> f.html"),
        ("truncate", "truncate -s 0 f.html"),
        ("touch", "touch f.html"),
        ("utimens", "touch -d 2001-01-01 -c f.html"),
        ("mkdir", "mkdir nd"),
        ("rmdir", "rmdir d"),
        ("unlink", "rm -f f.html"),
        ("rename", "mv f.html g.html"),
        ("symlink", "ln -s f.html s.html"),
        ("link", "ln f.html h.html"),
        ("chmod", "chmod 600 f.html"),
        ("chown", "chown 1:1 f.html"),
        ("mkfifo", "mkfifo p"),
    ];
    for (what, cmd) in attempts {
        let out = sh_as(user, &format!("cd {} && {cmd}", dir.display()))?;
        ensure!(
            !out.ok && out.stderr.contains("Read-only file system"),
            "{what} by uid {}: ok={} stderr={}",
            user.uid,
            out.ok,
            out.stderr
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_a_valid_token_root_and_users_get_erofs_and_nothing_changes() {
    bounded(async {
        let tc = setup().await?;
        let c = tc.client();
        TestCluster::write_file(&c, "www", "", "f.html", b"keep me").await?;
        TestCluster::mkdir(&c, "www", "", "d").await?;
        let before = tc.volume_info("www").await?;
        let m = Mount::start(&tc.client_args(), tc.root.path(), "m", &[])?;
        let w = m.path.join("www");
        let root = User {
            uid: 0,
            gid: 0,
            home: tc.root.path().to_path_buf(),
        };
        let stranger = tc.user(STRANGER_UID)?;
        let with_log = |e: anyhow::Error| anyhow::anyhow!("{e}\n--- mount log ---\n{}", m.log());
        expect_read_only(&root, &w).map_err(with_log)?;
        expect_read_only(&stranger, &w).map_err(with_log)?;

        // Expired and forged tokens are refused when handed over, with the reason.
        let expired = codafs_common::token::sign(
            &codafs_common::token::Claims {
                user: "admin".into(),
                role: codafs_common::token::Role::Admin,
                cluster: "x".into(),
                key_id: 1,
                expires: 1,
                generation: 0,
            },
            &[0; 32],
        );
        let reply = m.control(&format!("login {expired}"))?;
        ensure!(
            reply["error"].as_str().is_some_and(|e| e.contains("expired")),
            "{reply}"
        );
        let mut forged = tc.token.clone();
        let last = forged.pop().context("empty token")?;
        forged.push(if last == '0' { '1' } else { '0' });
        let reply = m.control(&format!("login {forged}"))?;
        ensure!(reply["error"].as_str().is_some_and(|e| e.contains("forged")), "{reply}");
        expect_read_only(&root, &w).map_err(with_log)?;
        let reply = m.control("logout")?;
        ensure!(reply["had_token"] == false, "{reply}");

        ensure!(read_file(&w.join("f.html"))? == b"keep me");
        let after = tc.volume_info("www").await?;
        ensure!(
            (after.version, after.used_files) == (before.version, before.used_files),
            "servers changed: {before:?} -> {after:?}"
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokens_survive_a_mount_restart_and_a_refused_store_keeps_the_old_content() {
    bounded(async {
        let tc = setup().await?;
        let dir = tc.root.path();
        // Write-through: the refusal is close's own error.
        let mut a = Mount::start(&tc.client_args(), dir, "a", &["--write-through"])?;
        let b = Mount::start(&tc.client_args(), dir, "b", &["--read-only"])?;
        let wm = tc.user(WEBMASTER_UID)?;
        login(&tc, &wm)?;
        // The token is kept 0600 in the cache directory and survives a crash of the daemon.
        let saved = a.cache.join("tokens").join(WEBMASTER_UID.to_string());
        ensure!(std::fs::metadata(&saved)?.mode() & 0o777 == 0o600);
        a.remount()?;
        let w = a.path.join("www");
        let out = sh_as(&wm, &format!("printf 'small' > {}/q.html", w.display()))?;
        ensure!(out.ok, "write after restart: {}", out.stderr);
        wait_content(&b.path.join("www/q.html"), b"small").await?;

        // Over quota: fsync and close fail with EDQUOT, and every node keeps the old content.
        admin(&tc, &["volume", "set", "www", "--quota-bytes", "100"], "")?;
        let version = tc.volume_info("www").await?.version;
        let out = sh_as(
            &wm,
            &format!(
                "dd if=/dev/zero of={}/q.html bs=1000 count=1 conv=fsync,notrunc",
                w.display()
            ),
        )?;
        ensure!(
            !out.ok && out.stderr.contains("quota"),
            "over-quota store: {}",
            out.stderr
        );
        ensure!(
            tc.volume_info("www").await?.version == version,
            "a refused store changed the volume"
        );
        // The writer's node drops the uncommitted bytes from the kernel's cache on release.
        wait_content(&w.join("q.html"), b"small").await?;
        ensure!(read_file(&b.path.join("www/q.html"))? == b"small");
        let st = a.status()?;
        ensure!(st.writes.failed_commits >= 1, "{st:?}");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_on_two_write_through_nodes_last_close_wins_whole() {
    bounded(async {
        let tc = setup().await?;
        let dir = tc.root.path();
        let a = Mount::start(&tc.client_args(), dir, "a", &["--write-through"])?;
        let c = Mount::start(&tc.client_args(), dir, "c", &["--write-through"])?;
        let (fa, fc) = race(&tc, &a, &c).await?;
        wait_content(&fa, b"node c").await?;
        wait_content(&fc, b"node c").await?;
        Ok(())
    })
    .await
}

/// Write-back mounts on nodes a and c.
fn two_nodes(tc: &TestCluster) -> Result<(Mount, Mount)> {
    let dir = tc.root.path();
    Ok((
        Mount::start(&tc.client_args(), dir, "a", &[])?,
        Mount::start(&tc.client_args(), dir, "c", &[])?,
    ))
}

/// The webmaster, logged in, writes `race.txt` through node a; returns them and the file's
/// path on each node once both show it.
async fn race_base(tc: &TestCluster, a: &Mount, c: &Mount) -> Result<(User, PathBuf, PathBuf)> {
    let wm = tc.user(WEBMASTER_UID)?;
    login(tc, &wm)?;
    let (fa, fc) = (a.path.join("www/race.txt"), c.path.join("www/race.txt"));
    let out = sh_as(&wm, &format!("printf base > {}", fa.display()))?;
    ensure!(out.ok, "{}", out.stderr);
    let logs = |e: anyhow::Error| anyhow::anyhow!("{e}\n--- a ---\n{}\n--- c ---\n{}", a.log(), c.log());
    wait_content(&fa, b"base").await.map_err(logs)?;
    wait_content(&fc, b"base").await.map_err(logs)?;
    Ok((wm, fa, fc))
}

/// Both nodes open `race.txt` before either closes; a's close comes first.
async fn race(tc: &TestCluster, a: &Mount, c: &Mount) -> Result<(PathBuf, PathBuf)> {
    let (wm, fa, fc) = race_base(tc, a, c).await?;
    let script = format!(
        "set -e\nexec 3>{fa}\nexec 4>{fc}\nprintf 'from node a' >&3\nprintf 'node c' >&4\nexec 3>&-\nexec 4>&-\n",
        fa = fa.display(),
        fc = fc.display()
    );
    let out = sh_as(&wm, &script)?;
    ensure!(out.ok, "{}", out.stderr);
    Ok((fa, fc))
}

/// Write-back: the change that reaches the servers second conflicts with the first. Neither is
/// lost: one is `race.txt`, the other a `race.txt.conflict-*` sibling, every node sees both,
/// and the mount that kept a copy says so in its status.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_on_two_write_back_nodes_keep_both_versions() {
    bounded(async {
        let tc = setup().await?;
        let (a, c) = two_nodes(&tc)?;
        race(&tc, &a, &c).await?;
        both_versions_kept(&a, &c, false).await
    })
    .await
}

/// Node c changes the file's mode and then its content, and both wait in its log (its daemon
/// stopped) while node a's content reaches the servers. Node c's batch then carries a chmod,
/// which checks no version, before the content: nothing checked the file before the batch
/// moved its version, and node a's content was replaced without a conflict copy. The content's
/// check now goes in front of the chmod, and both versions are kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_chmod_before_a_conflicting_write_keeps_both_versions() {
    bounded(async {
        let tc = setup().await?;
        let (a, c) = two_nodes(&tc)?;
        let (wm, fa, fc) = race_base(&tc, &a, &c).await?;
        let out = sh_as(
            &wm,
            &format!("set -e\nchmod 600 {f}\nprintf 'node c' > {f}\n", f = fc.display()),
        )?;
        ensure!(out.ok, "{}", out.stderr);
        // Within the 20 ms node c gathers changes before it sends them.
        let (wrote, a_synced) = while_stopped(&c, || {
            (
                sh_as(&wm, &format!("printf 'from node a' > {}", fa.display())),
                a.sync(),
            )
        })?;
        ensure!(wrote?.ok, "node a's write");
        a_synced?;
        ensure!(synced(&c)?, "node c's sync reports its conflict");
        both_versions_kept(&a, &c, true).await
    })
    .await
}

/// Node c opens the file for writing, node a's content reaches the servers, and node c's chmod
/// of the still-open file goes out on its own. The chmod's commit took the version past node
/// a's, and node c's content, closed afterwards, expected the version of its own chmod and
/// replaced node a's without a conflict copy. The chmod now carries the check the open file's
/// content will make, and both versions are kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_chmod_sent_while_the_file_is_open_keeps_both_versions() {
    bounded(async {
        let tc = setup().await?;
        let (a, c) = two_nodes(&tc)?;
        let (wm, fa, fc) = race_base(&tc, &a, &c).await?;
        let bin = tc.shared_bin()?;
        // One shell holds the file open on node c across the steps; `codafs sync` returns once
        // what the mount logged before it is on the servers.
        let script = format!(
            "set -e\nexec 4<>{fc}\nprintf 'from node a' > {fa}\n{bin} sync {ma} --timeout 30\n\
             chmod 600 {fc}\n{bin} sync {mc} --timeout 30\nprintf 'node c' >&4\nexec 4>&-\n",
            fa = fa.display(),
            fc = fc.display(),
            bin = bin.display(),
            ma = a.path.display(),
            mc = c.path.display(),
        );
        let out = sh_as(&wm, &script)?;
        ensure!(out.ok, "{}\n--- a ---\n{}\n--- c ---\n{}", out.stderr, a.log(), c.log());
        both_versions_kept(&a, &c, false).await
    })
    .await
}

/// One node alone chmods files and opens each for writing 0-39 ms later, so some opens come
/// while the batch with the chmod is on its way. The chmod checks no version; its commit's
/// version was not taken for this mount's own then, and the content, closed later, conflicted
/// with the mount's own chmod (a conflict copy with nobody else writing: 9 of 100 files by
/// hand on the old code). The servers now tell the version each file had just before the
/// chmod, and no conflict is made.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn files_opened_as_their_chmod_goes_out_make_no_conflict() {
    bounded(async {
        let tc = setup().await?;
        let a = Mount::start(&tc.client_args(), tc.root.path(), "a", &[])?;
        let wm = tc.user(WEBMASTER_UID)?;
        login(&tc, &wm)?;
        let d = a.path.join("www/modes");
        let n = 60;
        let out = sh_as(
            &wm,
            &format!(
                "set -e\nmkdir {d}\ni=0\nwhile [ $i -lt {n} ]; do printf start > {d}/f$i; i=$((i + 1)); done\n",
                d = d.display()
            ),
        )?;
        ensure!(out.ok, "{}", out.stderr);
        // On the servers, and no file open: nothing the chmods' batches would check.
        a.sync()?;
        let out = sh_as(
            &wm,
            &format!(
                "set -e\ni=0\nwhile [ $i -lt {n} ]; do\nchmod 600 {d}/f$i\n\
                 sleep 0.$(printf %03d $((i * 7 % 40)))\nexec 4<>{d}/f$i\nprintf \"round $i\" >&4\n\
                 exec 4>&-\ni=$((i + 1))\ndone\n",
                d = d.display()
            ),
        )?;
        ensure!(out.ok, "{}\n--- a ---\n{}", out.stderr, a.log());
        // `codafs sync` given a directory inside the mount syncs that mount.
        let out = std::process::Command::new(codafs_tests::codafs_bin())
            .arg("sync")
            .arg(&d)
            .args(["--timeout", "30"])
            .output()?;
        ensure!(
            out.status.success(),
            "codafs sync {}: {}",
            d.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let conflicts: Vec<String> = std::fs::read_dir(&d)?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".conflict-"))
            .collect();
        ensure!(conflicts.is_empty(), "no conflict copy: {conflicts:?}");
        let back = a.status()?.writes.write_back.context("write-back status")?;
        ensure!(
            back.conflicts == 0,
            "{} conflicts: {:?}",
            back.conflicts,
            back.last_conflict
        );
        for i in 0..n {
            let f = d.join(format!("f{i}"));
            ensure!(read_file(&f)? == format!("round {i}").as_bytes(), "{}", f.display());
        }
        Ok(())
    })
    .await
}

/// Node c truncates and rewrites the file (`printf > file`, so O_TRUNC) while node a removes
/// it, and c's change waits in its log (its daemon stopped) until a's removal is on the
/// servers. The change cannot apply, so c's bytes are kept as one `race.txt.conflict-*`
/// (QA once saw two, one of them empty; not with this sequence).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_truncating_write_to_a_file_removed_elsewhere_keeps_one_copy() {
    bounded(async {
        let tc = setup().await?;
        let (a, c) = two_nodes(&tc)?;
        let (wm, fa, fc) = race_base(&tc, &a, &c).await?;
        let out = sh_as(&wm, &format!("printf 'node c' > {}", fc.display()))?;
        ensure!(out.ok, "{}", out.stderr);
        let (removed, a_synced) = while_stopped(&c, || (sh_as(&wm, &format!("rm {}", fa.display())), a.sync()))?;
        ensure!(removed?.ok, "node a's removal");
        a_synced?;
        ensure!(synced(&c)?, "node c's sync reports its conflict");
        let www = a.path.join("www");
        let found = race_names(&www);
        ensure!(
            found.len() == 1 && found[0].starts_with("race.txt.conflict-"),
            "{found:?}\n--- c ---\n{}",
            c.log()
        );
        ensure!(read_file(&www.join(&found[0]))? == b"node c", "{found:?}");
        Ok(())
    })
    .await
}

/// A file larger than the whole write-back log (`--log-limit`) can never be logged: the write
/// that takes it past the bound fails with EFBIG ("File too large"), and the mount's log says
/// why and what to do. (It failed at close with ENOSPC and "the write-back log is full",
/// which it was not.) Smaller files go on as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_file_larger_than_the_write_back_log_is_refused_as_too_large() {
    bounded(async {
        let tc = setup().await?;
        let a = Mount::start(&tc.client_args(), tc.root.path(), "a", &["--log-limit", "40M"])?;
        let wm = tc.user(WEBMASTER_UID)?;
        login(&tc, &wm)?;
        let big = a.path.join("www/big.bin");
        let out = sh_as(&wm, &format!("dd if=/dev/zero of={} bs=1M count=48", big.display()))?;
        ensure!(!out.ok && out.stderr.contains("File too large"), "{}", out.stderr);
        let log = a.log();
        ensure!(
            log.contains("larger than the whole write-back log") && log.contains("--log-limit"),
            "{log}"
        );
        let small = a.path.join("www/small.html");
        let out = sh_as(&wm, &format!("printf small > {}", small.display()))?;
        ensure!(out.ok, "{}", out.stderr);
        a.sync()?;
        ensure!(tc.read_on(&tc.addrs()[0], "www", "small.html").await? == b"small");
        Ok(())
    })
    .await
}

/// The names in `www` that start with `race.txt` (none when it cannot be listed).
fn race_names(www: &Path) -> Vec<String> {
    std::fs::read_dir(www)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("race.txt"))
                .collect()
        })
        .unwrap_or_default()
}

/// `codafs sync` of `m`: true if it reported a write-back conflict (a change of this mount kept
/// under another name); any other failure is an error.
fn synced(m: &Mount) -> Result<bool> {
    match m.sync() {
        Ok(()) => Ok(false),
        Err(e) if e.to_string().contains("write-back conflict") => Ok(true),
        Err(e) => Err(e),
    }
}

/// Runs `f` while `m`'s daemon is stopped (SIGSTOP), so what it logged waits unsent; it goes
/// on (SIGCONT) once `f` returns.
fn while_stopped<T>(m: &Mount, f: impl FnOnce() -> T) -> Result<T> {
    let pid = m.pid().context("the mount's daemon")?.to_string();
    let stopped = std::process::Command::new("kill").args(["-STOP", &pid]).status()?;
    ensure!(stopped.success(), "kill -STOP {pid}");
    let r = f();
    let cont = std::process::Command::new("kill").args(["-CONT", &pid]).status()?;
    ensure!(cont.success(), "kill -CONT {pid}");
    Ok(r)
}

/// After [`race`]: `race.txt` and one `race.txt.conflict-*` sibling hold the two writers'
/// bytes on both nodes, and one mount reports the conflict.
/// `reported`: an earlier `codafs sync` reported the conflict already (each is reported to one).
async fn both_versions_kept(a: &Mount, c: &Mount, reported: bool) -> Result<()> {
    let now = synced(a)? | synced(c)?;
    ensure!(reported || now, "no codafs sync reported the conflict");
    let www = a.path.join("www");
    wait_until(Duration::from_secs(10), "both versions listed on node a", || {
        let n = race_names(&www).len();
        async move { n == 2 }
    })
    .await?;
    let mut found = race_names(&www);
    found.sort();
    ensure!(
        found[0] == "race.txt" && found[1].starts_with("race.txt.conflict-"),
        "{found:?}"
    );
    let mut contents = vec![read_file(&www.join(&found[0]))?, read_file(&www.join(&found[1]))?];
    contents.sort();
    ensure!(
        contents == [b"from node a".to_vec(), b"node c".to_vec()],
        "both writers' bytes are kept: {contents:?}"
    );
    wait_content(&c.path.join("www").join(&found[1]), &read_file(&www.join(&found[1]))?).await?;
    let conflicts = |m: &Mount| {
        m.status()
            .ok()
            .and_then(|s| s.writes.write_back)
            .map_or(0, |b| b.conflicts)
    };
    ensure!(
        conflicts(a) + conflicts(c) == 1,
        "one mount reports the conflict: a {} c {}",
        conflicts(a),
        conflicts(c)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_file_unlinked_while_open_closes_cleanly_and_stays_gone() {
    bounded(async {
        let tc = setup().await?;
        let a = Mount::start(&tc.client_args(), tc.root.path(), "a", &[])?;
        let wm = tc.user(WEBMASTER_UID)?;
        login(&tc, &wm)?;
        let f = a.path.join("www/tmp.txt");
        let script = format!(
            "set -e\nexec 3>{f}\nprintf 'scratch' >&3\nrm {f}\nprintf ' more' >&3\nexec 3>&-\n",
            f = f.display()
        );
        let out = sh_as(&wm, &script)?;
        ensure!(out.ok, "close after unlink failed: {}", out.stderr);
        ensure!(!f.exists(), "the unlinked file came back");
        let info = tc.volume_info("www").await?;
        ensure!(info.used_files == 0, "files left on the servers: {}", info.used_files);
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_commit_sent_twice_with_one_request_id_applies_once() {
    bounded(async {
        let tc = TestCluster::start(ClusterOpts::new(1, 0)).await?;
        tc.create_volume("www", 1).await?;
        let c = tc.client();
        c.put_blob(bytes::Bytes::from_static(b"once"), 1).await?;
        let req = codafs_client::ops::commit("www", vec![codafs_client::ops::file("once.html", b"once", 0o644)]);
        let first = c.commit(req.clone()).await?;
        let again = c.commit(req).await?;
        // The versions before each operation are not remembered for a retry.
        ensure!(
            (first.version, &first.created) == (again.version, &again.created) && again.prior.is_empty(),
            "a retry got another answer: {first:?} vs {again:?}"
        );
        let info = tc.volume_info("www").await?;
        ensure!(
            info.version == first.version && info.used_files == 1,
            "applied twice: {info:?}"
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_local_change_does_not_hide_later_remote_renames_in_that_directory() {
    bounded(async {
        let tc = setup().await?;
        let dir = tc.root.path();
        let a = Mount::start(&tc.client_args(), dir, "a", &[])?;
        let b = Mount::start(&tc.client_args(), dir, "b", &[])?;
        let wm = tc.user(WEBMASTER_UID)?;
        login(&tc, &wm)?;
        let (wa, wb) = (a.path.join("www"), b.path.join("www"));
        let out = sh_as(&wm, &format!("mkdir {0}/D && printf old > {0}/D/a", wa.display()))?;
        ensure!(out.ok, "{}", out.stderr);
        wait_content(&wb.join("D/a"), b"old").await?;
        // A change made on b in that directory, then a rename on a.
        let out = sh_as(&wm, &format!("touch {}/D/zzz", wb.display()))?;
        ensure!(out.ok, "{}", out.stderr);
        let out = sh_as(&wm, &format!("mv {0}/D/a {0}/D/b", wa.display()))?;
        ensure!(out.ok, "{}", out.stderr);
        let (gone, moved) = (wb.join("D/a"), wb.join("D/b"));
        wait_until(Duration::from_secs(10), "b sees the rename", || async {
            !gone.exists() && read_file(&moved).is_ok_and(|d| d == b"old")
        })
        .await?;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overlapping_stores_of_one_file_commit_in_order() {
    bounded(async {
        let tc = setup().await?;
        let (a, web) = writer_and_web_node(&tc)?;
        let path = a.path.join("www/big.bin");
        let p = path.clone();
        codafs_tests::fs_call(Duration::from_secs(60), move || {
            use std::os::fd::AsRawFd;
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&p)?;
            f.write_all_at(&vec![7u8; 32 << 20], 0)?;
            // Store 1 (32 MiB) starts on one thread; store 2 (small) starts while it runs.
            let dup1 = unsafe { libc::dup(f.as_raw_fd()) };
            let slow = std::thread::spawn(move || unsafe { libc::close(dup1) });
            std::thread::sleep(Duration::from_millis(20));
            f.set_len(0)?;
            f.write_all_at(b"small\n", 0)?;
            let dup2 = unsafe { libc::dup(f.as_raw_fd()) };
            let fast = unsafe { libc::close(dup2) };
            let slow = slow.join().unwrap_or(-1);
            drop(f);
            if fast != 0 || slow != 0 {
                return Err(std::io::Error::other(format!("close returned {fast} and {slow}")));
            }
            Ok(())
        })??;
        // The newer content is what every node ends up with.
        wait_content(&web.path.join("www/big.bin"), b"small\n").await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        ensure!(
            read_file(&web.path.join("www/big.bin"))? == b"small\n",
            "an older store landed last"
        );
        ensure!(read_file(&path)? == b"small\n");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_a_private_volume_what_root_listed_stays_closed_to_other_users() {
    bounded(async {
        let tc = setup().await?;
        admin(&tc, &["volume", "set", "other", "--private"], "")?;
        let m = Mount::start(&tc.client_args(), tc.root.path(), "m", &[])?;
        let reply = m
            .control(&format!("login {}", tc.token))
            .context("handing root the admin token")?;
        ensure!(reply["ok"] == true, "{reply}");
        let secret = m.path.join("other/secret");
        let p = secret.clone();
        codafs_tests::fs_call(Duration::from_secs(30), move || {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new().mode(0o700).create(&p)?;
            std::fs::write(p.join("f.txt"), b"for root only")?;
            // Root reads both, so the kernel holds the listing and the page.
            std::fs::read_dir(&p)?.count();
            std::fs::read(p.join("f.txt")).map(drop)
        })?
        .map_err(|e| anyhow::anyhow!("root's writes: {e}\n{}", m.log()))?;
        let stranger = tc.user(STRANGER_UID).context("a stranger")?;
        let out = sh_as(&stranger, &format!("ls {}", secret.display()))?;
        ensure!(!out.ok && out.stderr.contains("Permission denied"), "ls: {out:?}");
        let out = sh_as(&stranger, &format!("cat {}/f.txt", secret.display()))?;
        ensure!(!out.ok && out.stderr.contains("Permission denied"), "cat: {out:?}");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn new_content_with_the_same_size_and_mtime_reaches_another_node() {
    bounded(async {
        let tc = setup().await?;
        let (a, web) = writer_and_web_node(&tc)?;
        // Reproducible builds stamp every file with one time: same size, same mtime, new bytes.
        let stamp = std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let write = |content: &'static [u8]| {
            let p = a.path.join("www/same.txt");
            codafs_tests::fs_call(Duration::from_secs(30), move || {
                std::fs::write(&p, content)?;
                std::fs::File::options().write(true).open(&p)?.set_modified(stamp)
            })
        };
        write(b"aaaa")??;
        let seen = web.path.join("www/same.txt");
        wait_until(
            Duration::from_secs(10),
            "web shows the first version with its mtime",
            || {
                let p = seen.clone();
                async move {
                    read_file(&p).is_ok_and(|d| d == b"aaaa")
                        && std::fs::metadata(&p).is_ok_and(|m| m.mtime() == 1_700_000_000)
                }
            },
        )
        .await?;
        read_file(&seen)?;
        write(b"bbbb")??;
        // Both changes (content, then the mtime put back) reach the web node before it looks.
        a.sync()?;
        let version = www_version(&a).context("the writer's volume version")?;
        wait_until(Duration::from_secs(10), "web applies both commits", || async {
            www_version(&web).is_some_and(|v| v >= version)
        })
        .await?;
        let meta = std::fs::metadata(&seen)?;
        ensure!(
            meta.len() == 4 && meta.mtime() == 1_700_000_000,
            "size or mtime changed"
        );
        ensure!(read_file(&seen)? == b"bbbb", "the web node served the old bytes");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_directory_attribute_change_keeps_what_another_node_caches_below_it() {
    bounded(async {
        let tc = setup().await?;
        let (a, web) = writer_and_web_node(&tc)?;
        let dir = a.path.join("www/docs");
        let d = dir.clone();
        codafs_tests::fs_call(Duration::from_secs(30), move || {
            std::fs::create_dir(&d)?;
            (0..20).try_for_each(|i| std::fs::write(d.join(format!("f{i}")), format!("file {i}")))
        })??;
        let seen = web.path.join("www/docs");
        wait_content(&seen.join("f19"), b"file 19").await?;
        for i in 0..20 {
            read_file(&seen.join(format!("f{i}")))?;
        }
        let warm = web.fuse_requests(&["read"])?[0];
        // A directory's attributes change (as `touch`, `chmod` or `tar x` do).
        let d = dir.clone();
        codafs_tests::fs_call(Duration::from_secs(30), move || {
            std::fs::File::open(&d)?.set_modified(std::time::UNIX_EPOCH + Duration::from_secs(1_600_000_000))
        })??;
        wait_until(Duration::from_secs(10), "web shows the new mtime", || {
            let p = seen.clone();
            async move { std::fs::metadata(&p).is_ok_and(|m| m.mtime() == 1_600_000_000) }
        })
        .await?;
        for i in 0..20 {
            ensure!(read_file(&seen.join(format!("f{i}")))? == format!("file {i}").as_bytes());
        }
        let after = web.fuse_requests(&["read"])?[0];
        ensure!(
            after == warm,
            "a change of the directory evicted the files below it: {warm} -> {after} reads"
        );
        Ok(())
    })
    .await
}

/// FIFOs, sockets and device nodes are stored as metadata only: every node sees their type,
/// mode and device number, they take no bytes of the quota, and each node's kernel serves their
/// I/O itself (a FIFO carries data between processes of one node).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifos_sockets_and_device_nodes_are_metadata_every_node_sees() {
    use std::os::unix::fs::FileTypeExt;
    bounded(async {
        let tc = setup().await?;
        let (a, web) = writer_and_web_node(&tc)?;
        let dir = a.path.join("www");
        let run = |cmd: &str, args: &[&str]| -> Result<()> {
            let out = std::process::Command::new(cmd).args(args).output()?;
            ensure!(
                out.status.success(),
                "{cmd} {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(())
        };
        let fifo = dir.join("pipe");
        run("mkfifo", &["-m", "0620", &fifo.display().to_string()])?;
        run("mknod", &[&dir.join("null").display().to_string(), "c", "1", "3"])?;
        run("mknod", &[&dir.join("disk").display().to_string(), "b", "7", "0"])?;
        let sock = std::os::unix::net::UnixListener::bind(dir.join("sock"))?;
        // A regular file through mknod(2), as `creat` makes.
        let plain = std::ffi::CString::new(dir.join("plain").display().to_string())?;
        // SAFETY: a valid NUL-terminated path; mknod has no other preconditions.
        let rc = unsafe { libc::mknod(plain.as_ptr(), libc::S_IFREG | 0o640, 0) };
        ensure!(rc == 0, "mknod S_IFREG: {}", std::io::Error::last_os_error());

        // This node's kernel runs the FIFO: a writer and a reader meet through it.
        let writer = {
            let fifo = fifo.clone();
            std::thread::spawn(move || std::fs::write(fifo, b"ping"))
        };
        ensure!(std::fs::read(&fifo)? == b"ping", "the FIFO carried the wrong bytes");
        writer.join().map_err(|_| anyhow::anyhow!("FIFO writer panicked"))??;
        drop(sock);

        // Every node sees the same nodes, with their kinds and device numbers.
        let seen = web.path.join("www/disk");
        wait_until(Duration::from_secs(10), "the web node sees the new nodes", || {
            let seen = seen.clone();
            async move { seen.exists() }
        })
        .await?;
        for m in [&a, &web] {
            let d = m.path.join("www");
            let md = |n: &str| std::fs::symlink_metadata(d.join(n));
            let (p, n, b, s, f) = (md("pipe")?, md("null")?, md("disk")?, md("sock")?, md("plain")?);
            // A read-only web node shows public volumes world-readable (README, "Status").
            let want = if m.path == a.path { 0o620 } else { 0o664 };
            ensure!(p.file_type().is_fifo() && p.mode() & 0o7777 == want, "pipe: {p:?}");
            ensure!(
                n.file_type().is_char_device() && n.rdev() == libc::makedev(1, 3),
                "null: {n:?}"
            );
            ensure!(
                b.file_type().is_block_device() && b.rdev() == libc::makedev(7, 0),
                "disk: {b:?}"
            );
            ensure!(s.file_type().is_socket(), "sock: {s:?}");
            ensure!(f.file_type().is_file() && f.len() == 0, "plain: {f:?}");
        }
        let info = tc.volume_info("www").await?;
        ensure!(
            info.used_files == 5 && info.used_bytes == 0,
            "usage {} files, {} bytes",
            info.used_files,
            info.used_bytes
        );
        // They rename, link and go away like files.
        std::fs::rename(dir.join("null"), dir.join("null2"))?;
        std::fs::hard_link(dir.join("pipe"), dir.join("pipe2"))?;
        for n in ["null2", "pipe", "pipe2", "disk", "sock", "plain"] {
            std::fs::remove_file(dir.join(n))?;
        }
        // Logged (write-back): on the servers once the log is sent.
        a.sync()?;
        let info = tc.volume_info("www").await?;
        ensure!(info.used_files == 0, "files left: {}", info.used_files);
        Ok(())
    })
    .await
}

/// Write-back with every server down: closes return once logged, the log holds the backlog, a
/// kill -9 of the daemon loses none of it, and the next mount sends each file exactly once and
/// whole. The offline tree needs more node ids than one reservation holds (4,096): the mount
/// reserved a second batch ahead while the servers were up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_write_back_log_survives_servers_down_and_a_kill_9() {
    bounded(async {
        let mut tc = setup().await?;
        let (mut a, web) = writer_and_web_node(&tc)?;
        let www = a.path.join("www");
        // One file while the servers are up: node ids get reserved.
        let (first, sent) = (www.join("first.html"), www.join("sent.html"));
        let logs = |e: anyhow::Error| anyhow::anyhow!("{e}\n--- a ---\n{}", a.log());
        codafs_tests::fs_call(Duration::from_secs(30), move || {
            std::fs::write(first, "first")?;
            std::fs::write(sent, "sent")
        })?
        .context("the first files")
        .map_err(logs)?;
        a.sync()?;
        wait_content(&web.path.join("www/first.html"), b"first").await?;
        // No listing or stat while the servers are up: what the sync sent was read again
        // before it returned, so the servers can go at once.
        wait_until(Duration::from_secs(10), "node ids reserved ahead", || async {
            a.status().ok().and_then(|s| s.writes.write_back).is_some_and(|b| {
                b.ids_reserved
                    .get("www")
                    .is_some_and(|n| *n > (EMPTY + FILES + 2) as u64)
            })
        })
        .await?;

        for i in 0..tc.servers.len() {
            tc.kill(i);
        }
        const FILES: usize = 200;
        const EMPTY: usize = 4_000;
        let content = |i: usize| format!("<p>page {i}</p>\n").repeat(i + 1);
        let tree = www.join("tree");
        let (first, sent) = (www.join("first.html"), www.join("sent.html"));
        codafs_tests::fs_call(Duration::from_secs(60), move || {
            // Files sent just before: one reopened to append (its content comes from the
            // blob cache), one overwritten (its old content is copied from there too).
            use std::io::Write;
            std::fs::OpenOptions::new().append(true).open(&first)?.write_all(b"+")?;
            std::fs::write(&sent, "overwritten")?;
            std::fs::create_dir(&tree)?;
            (0..FILES).try_for_each(|i| std::fs::write(tree.join(format!("f{i}.html")), content(i)))?;
            std::fs::create_dir(tree.join("empty"))?;
            (0..EMPTY).try_for_each(|i| std::fs::write(tree.join(format!("empty/e{i}")), ""))
        })?
        .context("writing while every server is down")
        .map_err(|e| anyhow::anyhow!("{e:#}\n--- a ---\n{}", a.log()))?;
        let backlog = a.status()?.writes.write_back.context("a write-back mount")?;
        ensure!(backlog.changes as usize > FILES, "the log holds the tree: {backlog:?}");
        let own = read_file(&www.join("tree/f7.html"))
            .context("reading a logged file")
            .map_err(|e| anyhow::anyhow!("{e:#}\n--- a ---\n{}", a.log()))?;
        ensure!(own == content(7).as_bytes(), "the writer reads its own logged content");
        a.kill9();

        for i in 0..tc.servers.len() {
            tc.restart(i)?;
        }
        tc.wait_leader(Duration::from_secs(30)).await?;
        a.remount()?;
        a.sync().map_err(|e| anyhow::anyhow!("{e}\n{}", a.log()))?;
        for i in 0..FILES {
            wait_content(&web.path.join(format!("www/tree/f{i}.html")), content(i).as_bytes()).await?;
        }
        wait_content(&web.path.join("www/first.html"), b"first+").await?;
        wait_content(&web.path.join("www/sent.html"), b"overwritten").await?;
        let empties = std::fs::read_dir(web.path.join("www/tree/empty"))?.count();
        ensure!(empties == EMPTY, "{empties} of the {EMPTY} empty files");
        let info = tc.volume_info("www").await?;
        ensure!(
            info.used_files as usize == FILES + EMPTY + 4,
            "each file once (first.html, sent.html, tree/, the pages, empty/ and its files): {}",
            info.used_files
        );
        let backlog = a.status()?.writes.write_back.context("a write-back mount")?;
        ensure!(backlog.changes == 0 && backlog.conflicts == 0, "{backlog:?}");
        Ok(())
    })
    .await
}

/// A write-back mount creates files and directories while every server is down from its very
/// first create: its login reserves node ids ahead. A mount that had created nothing yet
/// asked the servers for ids at its first create, and with them down (or hung) it failed with
/// EIO. What it logs reaches the servers once they are back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fresh_write_back_mount_creates_files_with_every_server_down() {
    bounded(async {
        let mut tc = setup().await?;
        let a = Mount::start(&tc.client_args(), tc.root.path(), "a", &[])?;
        let wm = tc.user(WEBMASTER_UID)?;
        login(&tc, &wm)?;
        let reserved = a
            .status()?
            .writes
            .write_back
            .context("a write-back mount")?
            .ids_reserved;
        ensure!(
            reserved.get("www").is_some_and(|n| *n > 0),
            "the login reserved ids: {reserved:?}"
        );
        // Its listing cached: a create looks the name up first.
        let www = a.path.join("www");
        ensure!(std::fs::read_dir(&www)?.count() == 0);
        for i in 0..tc.servers.len() {
            tc.kill(i);
        }
        let out = sh_as(
            &wm,
            &format!(
                "set -e\nprintf offline > {w}/offline.html\nmkdir {w}/offdir\n",
                w = www.display()
            ),
        )?;
        ensure!(out.ok, "{}\n--- a ---\n{}", out.stderr, a.log());
        for i in 0..tc.servers.len() {
            tc.restart(i)?;
        }
        tc.wait_leader(Duration::from_secs(30)).await?;
        a.sync().map_err(|e| anyhow::anyhow!("{e}\n{}", a.log()))?;
        // The content may have gone to the other data server and a witness's hint while this
        // one was still starting (a CI run read "not stored here"): it comes with the handoff.
        let first = &tc.servers[0].addr;
        wait_until(Duration::from_secs(30), "offline.html on the first server", || async {
            tc.read_on(first, "www", "offline.html")
                .await
                .is_ok_and(|b| b == b"offline")
        })
        .await?;
        ensure!(tc.resolve_on(first, "www", "offdir").await.is_ok());
        Ok(())
    })
    .await
}

/// kill -9 of the daemon in the middle of a `cp -r`: at the next mount every file whose close
/// returned reaches the servers once, and no file shows part of its content (the one being
/// written when the daemon died is empty, as after `creat` on any filesystem, or absent).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_kill_9_in_the_middle_of_a_copy_loses_no_closed_file() {
    bounded(async {
        let tc = setup().await?;
        let (mut a, web) = writer_and_web_node(&tc)?;
        let src = tc.root.path().join("site");
        const FILES: usize = 400;
        let content = |i: usize| format!("<p>page {i}</p>\n").repeat(50 + i);
        std::fs::create_dir_all(&src)?;
        for i in 0..FILES {
            std::fs::write(src.join(format!("p{i:03}.html")), content(i))?;
        }
        let dst = a.path.join("www/site");
        let mut cp = std::process::Command::new("cp").arg("-r").arg(&src).arg(&dst).spawn()?;
        // Kill once part of the tree is through (bounded: the copy takes seconds).
        wait_until(Duration::from_secs(30), "cp to be under way", || {
            let n = std::fs::read_dir(&dst).map(Iterator::count).unwrap_or(0);
            async move { n >= FILES / 4 }
        })
        .await?;
        a.kill9();
        let _ = cp.wait();
        a.remount()?;
        a.sync().map_err(|e| anyhow::anyhow!("{e}\n{}", a.log()))?;
        let www = web.path.join("www/site");
        let mut complete = 0;
        let mut empty = 0;
        wait_until(Duration::from_secs(10), "the web node to list the copy", || {
            let ok = www.exists();
            async move { ok }
        })
        .await?;
        for e in std::fs::read_dir(&www)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            ensure!(!name.contains(".conflict-"), "a replay made a conflict copy: {name}");
            let i: usize = name
                .trim_start_matches('p')
                .trim_end_matches(".html")
                .parse()
                .with_context(|| format!("unexpected file {name}"))?;
            let got = read_file(&e.path())?;
            if got.is_empty() {
                empty += 1;
            } else {
                ensure!(
                    got == content(i).as_bytes(),
                    "{name} shows part of its content ({} bytes)",
                    got.len()
                );
                complete += 1;
            }
        }
        ensure!(complete >= FILES / 4 - 1, "closed files were lost: {complete} complete");
        ensure!(empty <= 1, "{empty} empty files: only the one being written may be");
        let info = tc.volume_info("www").await?;
        ensure!(
            info.used_files as usize == complete + empty + 1,
            "each file once: {} on the servers, {complete} + {empty} listed",
            info.used_files
        );
        Ok(())
    })
    .await
}

/// Write-back and rsync, the webmaster's tool: rsync writes each file under a temporary name
/// and renames it over the real one. The renames are logged like the writes (no round trip
/// each), the servers get the final tree in a few commits and never a temporary name, and a
/// second rsync of changed files replaces them the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rsync_into_a_write_back_mount_reaches_the_servers_as_its_final_tree() {
    bounded(async {
        let tc = setup().await?;
        let (a, web) = writer_and_web_node(&tc)?;
        let src = tc.root.path().join("site-src");
        for i in 0..300 {
            let d = src.join(format!("d{}", i % 3));
            std::fs::create_dir_all(&d)?;
            std::fs::write(
                d.join(format!("page{i}.html")),
                format!("<p>page {i}</p>\n").repeat(i % 40 + 1),
            )?;
        }
        let rsync = |what: &str| -> Result<()> {
            let out = std::process::Command::new("rsync")
                .args(["-r", &format!("{}/", src.display())])
                .arg(a.path.join("www/site"))
                .output()
                .context("rsync (scripts/install-deps.sh installs it)")?;
            ensure!(
                out.status.success(),
                "rsync {what}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(())
        };
        let before = tc.volume_info("www").await?.version;
        rsync("of 300 new files")?;
        // The second pass replaces 50 files (rsync's temporary name, then a rename over each).
        for i in (0..300).step_by(6) {
            let p = src.join(format!("d{}/page{i}.html", i % 3));
            std::fs::write(&p, format!("<p>page {i}, edited</p>\n"))?;
        }
        rsync("of 50 changed files")?;
        a.sync()?;
        let info = tc.volume_info("www").await?;
        let commits = info.version - before;
        ensure!(
            commits < 40,
            "{commits} commits for 350 files and their renames: not batched"
        );
        let www = web.path.join("www/site");
        wait_until(Duration::from_secs(10), "the web node sees the last edit", || {
            let p = www.join("d0/page294.html");
            async move { read_file(&p).is_ok_and(|d| d == b"<p>page 294, edited</p>\n") }
        })
        .await?;
        for i in 0..300 {
            let rel = format!("d{}/page{i}.html", i % 3);
            let (want, got) = (read_file(&src.join(&rel))?, read_file(&www.join(&rel))?);
            ensure!(got == want, "{rel} on the web node differs from the source");
        }
        for d in 0..3 {
            let names: Vec<String> = std::fs::read_dir(www.join(format!("d{d}")))?
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with('.'))
                .collect();
            ensure!(names.is_empty(), "temporary names on the web node: {names:?}");
        }
        let back = a.status()?.writes.write_back.context("a write-back mount")?;
        ensure!(back.conflicts == 0, "conflicts: {:?}", back.last_conflict);
        ensure!(
            info.used_files == 304,
            "nodes on the servers (300 files, 4 directories): {}",
            info.used_files
        );
        Ok(())
    })
    .await
}

/// Write-back and a quota: `close` returned long before the servers saw the files, so the
/// files past the quota are refused at reintegration. They are set aside (bytes in the cache
/// directory's `wblog/lost+found`, reported in `codafs status`), the files within the quota
/// reach the servers, and the refusal does not hold up what is logged after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn files_over_a_quota_are_set_aside_and_do_not_block_the_log() {
    bounded(async {
        let tc = setup().await?;
        let spec = codafs_proto::pb::VolumeSpec {
            name: "small".into(),
            quota_files: 3,
            write_quorum: 1,
            public_read: true,
            ..Default::default()
        };
        tc.client().create_volume(spec).await?;
        let (a, _web) = writer_and_web_node(&tc)?;
        let small = a.path.join("small");
        wait_until(Duration::from_secs(10), "the mount sees the new volume", || {
            let small = small.clone();
            async move { small.is_dir() }
        })
        .await?;
        for i in 0..5 {
            std::fs::write(small.join(format!("page{i}.html")), format!("page {i} of five"))?;
        }
        // Logged after the refused files, in another volume: not held up.
        std::fs::write(a.path.join("www/after.html"), "after")?;
        // The sync says what did not go as logged, once.
        let refused = a.sync().expect_err("the sync reports the refused files");
        ensure!(refused.to_string().contains("quota"), "{refused}");
        a.sync()?;
        let info = tc.volume_info("small").await?;
        ensure!(info.used_files == 3, "files on the servers: {}", info.used_files);
        ensure!(
            tc.volume_info("www").await?.used_files == 1,
            "www/after.html is not on the servers"
        );
        let back = a.status()?.writes.write_back.context("a write-back mount")?;
        ensure!(back.refused == 2, "refused: {} ({:?})", back.refused, back.last_refused);
        let note = back.last_refused.unwrap_or_default();
        ensure!(note.contains("quota"), "the reason is given: {note}");
        let kept: Vec<Vec<u8>> = std::fs::read_dir(a.cache.join("wblog/lost+found"))?
            .flatten()
            .map(|e| std::fs::read(e.path()))
            .collect::<std::io::Result<_>>()?;
        ensure!(kept.len() == 2, "{} files kept aside", kept.len());
        for k in &kept {
            let text = String::from_utf8_lossy(k);
            ensure!(text.starts_with("page ") && text.ends_with(" of five"), "kept: {text}");
        }
        // The mount shows what the servers hold: the three files within the quota.
        let mut names: Vec<String> = std::fs::read_dir(&small)?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        ensure!(names.len() == 3, "the mount shows {names:?}");
        Ok(())
    })
    .await
}

/// Write-back under server failures: a writer stores a stream of files, each followed by
/// `fsync` (which returns once the file is on the servers), while a random server and then the
/// leader are killed -9 and restarted. Every file whose `fsync` succeeded is on the servers,
/// whole, once the log drains; a file whose `fsync` failed is at most late, never torn.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nothing_acknowledged_by_fsync_is_lost_while_servers_are_killed() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    bounded(async {
        let mut tc = setup().await?;
        let (a, web) = writer_and_web_node(&tc)?;
        const FILES: usize = 120;
        let content = |i: usize| format!("<p>file {i}</p>\n").repeat(i % 50 + 1);
        let dir = a.path.join("www/stream");
        std::fs::create_dir(&dir)?;
        let (written, stop) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
        let writer = {
            let (written, stop, dir) = (written.clone(), stop.clone(), dir.clone());
            std::thread::spawn(move || {
                let mut acked = Vec::new();
                for i in 0..FILES {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let write = || -> std::io::Result<()> {
                        use std::io::Write;
                        let mut f = std::fs::File::create(dir.join(format!("f{i}.html")))?;
                        f.write_all(content(i).as_bytes())?;
                        f.sync_all()
                    };
                    if write().is_ok() {
                        acked.push(i);
                    }
                    written.store(i + 1, Ordering::Relaxed);
                }
                acked
            })
        };
        let progress = |n: usize| {
            let written = written.clone();
            async move { written.load(Ordering::Relaxed) >= n }
        };
        let victim = rand::random::<usize>() % tc.servers.len();
        wait_until(Duration::from_secs(60), "the writer gets going", || progress(20)).await?;
        tc.kill(victim);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        tc.restart(victim)?;
        wait_until(Duration::from_secs(90), "the writer goes on", || progress(60)).await?;
        let leader = tc.leader().await?;
        tc.kill(leader);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        tc.restart(leader)?;
        let done = wait_until(Duration::from_secs(120), "the writer finishes", || progress(FILES)).await;
        stop.store(true, Ordering::Relaxed);
        done?;
        let acked = writer.join().map_err(|_| anyhow::anyhow!("the writer panicked"))?;
        ensure!(
            acked.len() >= FILES / 2,
            "only {} of {FILES} fsyncs succeeded",
            acked.len()
        );
        tc.wait_leader(Duration::from_secs(30)).await?;
        a.sync().map_err(|e| anyhow::anyhow!("{e}\n{}", a.log()))?;
        for i in acked {
            wait_content(&web.path.join(format!("www/stream/f{i}.html")), content(i).as_bytes())
                .await
                .with_context(|| format!("f{i}.html (victim {victim}, leader {leader})"))?;
        }
        Ok(())
    })
    .await
}

/// The same large content closed again while its first change is still queued or being sent,
/// on a write-back mount: each change has its own copy in the log, so settling the first
/// leaves the second's in place (they used to share one file, named by content and node, which
/// the first's settling deleted: the log then retried the second for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_large_content_closed_again_before_it_was_sent_reaches_the_servers() {
    bounded(async {
        let tc = setup().await?;
        let (a, web) = writer_and_web_node(&tc)?;
        // Over the log's inline size (1 MiB): each close writes a data file. Large enough that
        // sending one takes a while, so the next close lands while it is in flight.
        let big = |tag: u8| -> Vec<u8> { (0..24usize << 20).map(|i| (i % 251) as u8 ^ tag).collect() };
        let (x, y) = (big(1), big(2));
        let f = a.path.join("www/big.bin");
        let (fx, fy) = (x.clone(), y.clone());
        codafs_tests::fs_call(Duration::from_secs(60), move || {
            [&fx, &fy, &fx, &fy, &fx]
                .into_iter()
                .try_for_each(|c| std::fs::write(&f, c))
        })?
        .context("closing big.bin five times")
        .map_err(|e| anyhow::anyhow!("{e:#}\n--- a ---\n{}", a.log()))?;
        // fsync of the directory waits, as `fsync` of a file does, until the servers have
        // every change logged before it.
        let dir = a.path.join("www");
        codafs_tests::fs_call(Duration::from_secs(60), move || std::fs::File::open(&dir)?.sync_all())?
            .context("fsync of www")
            .map_err(|e| anyhow::anyhow!("{e:#}\n--- a ---\n{}", a.log()))?;
        let backlog = a.status()?.writes.write_back.context("a write-back mount")?;
        ensure!(backlog.changes == 0 && backlog.conflicts == 0, "{backlog:?}");
        let p = web.path.join("www/big.bin");
        wait_until(Duration::from_secs(10), "big.bin on the web node", || {
            let same = read_file(&p).is_ok_and(|d| d == x);
            async move { same }
        })
        .await?;
        Ok(())
    })
    .await
}

/// Write-back with two users on one web node: the webmaster's token is revoked (their password
/// changed elsewhere) while their changes wait in the log. Root's page, logged after them, still
/// reaches the servers and another node, and its `fsync` returns; root's page in the
/// webmaster's new directory waits with that directory; `codafs status` and `codafs sync` name
/// the uid that must log in; nothing is set aside as a conflict. Once the webmaster logs in
/// again, everything held arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revoked_token_holds_back_only_that_users_changes() {
    bounded(async {
        let tc = setup().await?;
        let (a, web) = writer_and_web_node(&tc)?;
        let w = a.path.join("www");
        let r = web.path.join("www");
        // Root's first page: the mount reserves its node ids for the volume.
        std::fs::write(w.join("first.html"), "first")?;
        a.sync()?;
        let wm = tc.user(WEBMASTER_UID)?;
        login(&tc, &wm)?;
        let old = std::fs::read_to_string(wm.home.join(".config/codafs/token"))?;
        let old = old.trim().to_string();
        admin(
            &tc,
            &["user", "passwd", "webmaster", "--password-stdin"],
            "second-pass\n",
        )?;
        // Every server refuses the old token before the webmaster writes with it.
        for addr in tc.addrs() {
            wait_until(
                Duration::from_secs(10),
                &format!("{addr} to refuse the old token"),
                || {
                    let (addrs, tls, old, addr) = (tc.addrs(), tc.tls.clone(), old.clone(), addr.clone());
                    async move {
                        let Ok(c) = codafs_client::Cluster::new(&addrs, tls, Some(old)) else {
                            return false;
                        };
                        let r = c
                            .call_on(&addr, |ch| {
                                let req = c.request(codafs_proto::pb::Empty {});
                                async move {
                                    codafs_client::Cluster::admin(ch)
                                        .who_am_i(req)
                                        .await
                                        .map(|r| r.into_inner())
                                }
                            })
                            .await;
                        r.is_err_and(|e| e.code() == tonic::Code::Unauthenticated)
                    }
                },
            )
            .await?;
        }
        let out = sh_as(
            &wm,
            &format!(
                "set -e; mkdir {w}/news; printf alice > {w}/news/a.html",
                w = w.display()
            ),
        )?;
        ensure!(out.ok, "the webmaster's writes were not logged: {}", out.stderr);
        // Root: a page in the webmaster's new directory (it needs that directory), then one of
        // its own, with fsync.
        std::fs::write(w.join("news/root.html"), "root in news")?;
        {
            use std::io::Write;
            let mut f = std::fs::File::create(w.join("root.html"))?;
            f.write_all(b"root's own")?;
            f.sync_all()
                .context("fsync of root's page while the webmaster's changes wait")?;
        }
        wait_content(&r.join("root.html"), b"root's own").await?;
        ensure!(
            !r.join("news").exists(),
            "the webmaster's directory reached the servers with a revoked token"
        );
        let back = a.status()?.writes.write_back.context("a write-back mount")?;
        ensure!(back.waiting_for_login == [WEBMASTER_UID], "{back:?}");
        let why = back.blocked.clone().unwrap_or_default();
        ensure!(why.contains("uid 1000") && why.contains("codafs login"), "{why}");
        ensure!((back.conflicts, back.refused) == (0, 0), "{back:?}");
        let out = tc.codafs_as(None, &["sync", &a.path.display().to_string(), "--timeout", "2"], "")?;
        ensure!(
            !out.ok && out.stderr.contains("uid 1000"),
            "codafs sync says why it cannot finish: {}",
            out.stderr
        );

        // The webmaster logs in again: what waited arrives, in order, whole.
        let out = tc.codafs_as(Some(&wm), &["login", "webmaster", "--password-stdin"], "second-pass\n")?;
        ensure!(out.ok, "login failed: {}", out.stderr);
        a.sync()?;
        wait_content(&r.join("news/a.html"), b"alice").await?;
        wait_content(&r.join("news/root.html"), b"root in news").await?;
        let back = a.status()?.writes.write_back.context("a write-back mount")?;
        ensure!(
            back.waiting_for_login.is_empty() && back.blocked.is_none() && back.changes == 0,
            "{back:?}"
        );
        ensure!((back.conflicts, back.refused) == (0, 0), "{back:?}");
        Ok(())
    })
    .await
}

/// Write-back: after a copy larger than what the reintegrator reads again one node at a time
/// (512 nodes), with every server killed and the kernel's caches dropped, the writer still
/// lists and stats every directory and file it copied, and reads every file: each batch's
/// contents were kept in the cache (in packs) once sent. Before, the commits made the mount
/// forget the attributes of the copy's directories and most files, so paths into the copy
/// failed with EIO, and only the files of the batch that drained the log were kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_long_copy_stays_usable_with_every_server_down() {
    bounded(async {
        let mut tc = setup().await?;
        let (a, _web) = writer_and_web_node(&tc)?;
        const DIRS: usize = 12;
        const FILES: usize = 100;
        let content = |d: usize, i: usize| format!("<p>page {d}/{i}</p>\n").repeat(1 + i % 7);
        let site = a.path.join("www/site");
        let written = site.clone();
        codafs_tests::fs_call(Duration::from_secs(60), move || {
            for d in 0..DIRS {
                let dir = written.join(format!("d{d:02}"));
                std::fs::create_dir_all(&dir)?;
                for i in 0..FILES {
                    std::fs::write(dir.join(format!("f{i:03}.html")), content(d, i))?;
                }
            }
            Ok(())
        })?
        .context("copying the tree")
        .map_err(|e| anyhow::anyhow!("{e:#}\n--- a ---\n{}", a.log()))?;
        a.sync()?;
        // Every batch's contents are kept in the cache on a thread of their own, after it.
        wait_until(Duration::from_secs(30), "the copy kept in the cache", || {
            let n = a.status().map(|s| s.cache.entries).unwrap_or(0);
            async move { n >= (DIRS * FILES) as u64 }
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e:#}\n--- a ---\n{}", a.log()))?;
        for i in 0..tc.servers.len() {
            tc.kill(i);
        }
        // The kernel forgets names, attributes and pages: each path below reaches the daemon.
        std::fs::write("/proc/sys/vm/drop_caches", "3").context("dropping the kernel's caches")?;
        let read_back = site.clone();
        let (bad, read) = codafs_tests::fs_call(Duration::from_secs(60), move || {
            let (mut bad, mut read) = (Vec::new(), Vec::new());
            for d in 0..DIRS {
                let dir = read_back.join(format!("d{d:02}"));
                match std::fs::read_dir(&dir).map(|r| r.count()) {
                    Ok(n) if n == FILES => {}
                    Ok(n) => bad.push(format!("{}: {n} names", dir.display())),
                    Err(e) => bad.push(format!("listing {}: {e}", dir.display())),
                }
                for i in 0..FILES {
                    let p = dir.join(format!("f{i:03}.html"));
                    let want = content(d, i);
                    match std::fs::metadata(&p) {
                        Ok(m) if m.len() == want.len() as u64 => {}
                        Ok(m) => bad.push(format!("{}: size {}", p.display(), m.len())),
                        Err(e) => bad.push(format!("stat {}: {e}", p.display())),
                    }
                    match std::fs::read(&p) {
                        Ok(got) if got == want.as_bytes() => read.push((d, i)),
                        Ok(_) => bad.push(format!("{}: other bytes", p.display())),
                        Err(_) => {}
                    }
                }
            }
            Ok((bad, read))
        })?
        .context("reading the copy back offline")
        .map_err(|e| anyhow::anyhow!("{e:#}\n--- a ---\n{}", a.log()))?;
        ensure!(
            bad.is_empty(),
            "{} failures offline, first: {:?}\n--- a ---\n{}",
            bad.len(),
            bad.iter().take(5).collect::<Vec<_>>(),
            a.log()
        );
        ensure!(
            read.len() == DIRS * FILES,
            "{} of {} files read offline\n--- a ---\n{}",
            read.len(),
            DIRS * FILES,
            a.log()
        );
        Ok(())
    })
    .await
}

/// A damaged record in the middle of the write-back log (a bad block under the cache) loses
/// only its own change: the records after it are replayed and reach the servers, the damaged
/// bytes are kept in `wblog/lost+found`, and `codafs status` says so. (Before, the replay cut
/// the log at the damage, and every change after it was lost.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_damaged_log_record_loses_only_its_own_change() {
    bounded(async {
        let mut tc = setup().await?;
        let (mut a, web) = writer_and_web_node(&tc)?;
        let www = a.path.join("www");
        // Node ids reserved while the servers are up, for the creations below.
        let first = www.join("first.html");
        codafs_tests::fs_call(Duration::from_secs(30), move || std::fs::write(first, "first"))??;
        a.sync()?;
        for i in 0..tc.servers.len() {
            tc.kill(i);
        }
        let pages = [
            ("a.html", "PAGE-A ".repeat(50)),
            ("b.html", "PAGE-B ".repeat(50)),
            ("c.html", "PAGE-C ".repeat(50)),
        ];
        let files: Vec<(PathBuf, String)> = pages.iter().map(|(n, c)| (www.join(n), c.clone())).collect();
        codafs_tests::fs_call(Duration::from_secs(30), move || {
            files.iter().try_for_each(|(p, c)| std::fs::write(p, c))
        })??;
        a.kill9();
        // Flip a byte inside b.html's logged content.
        let wblog = a.cache.join("wblog");
        let mut flipped = false;
        for e in std::fs::read_dir(&wblog)? {
            let path = e?.path();
            if !path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("seg-"))
            {
                continue;
            }
            let mut bytes = std::fs::read(&path)?;
            if let Some(at) = bytes.windows(7).position(|w| w == b"PAGE-B ") {
                bytes[at + 100] ^= 0x20;
                std::fs::write(&path, &bytes)?;
                flipped = true;
            }
        }
        ensure!(flipped, "b.html's content not found in the log");
        for i in 0..tc.servers.len() {
            tc.restart(i)?;
        }
        tc.wait_leader(Duration::from_secs(30)).await?;
        a.remount()?;
        a.sync().map_err(|e| anyhow::anyhow!("{e}\n{}", a.log()))?;
        wait_content(&web.path.join("www/a.html"), pages[0].1.as_bytes()).await?;
        wait_content(&web.path.join("www/c.html"), pages[2].1.as_bytes()).await?;
        let b = std::fs::read(web.path.join("www/b.html")).unwrap_or_default();
        ensure!(
            b.is_empty(),
            "b.html's content was in the damaged record: {} bytes",
            b.len()
        );
        let backlog = a.status()?.writes.write_back.context("a write-back mount")?;
        let damaged = backlog.damaged.context("status reports the damage")?;
        ensure!(damaged.contains("lost+found"), "{damaged}");
        let kept: Vec<Vec<u8>> = std::fs::read_dir(wblog.join("lost+found"))?
            .map(|e| std::fs::read(e?.path()))
            .collect::<std::io::Result<_>>()?;
        ensure!(
            kept.iter().any(|k| k.windows(7).any(|w| w == b"PAGE-B ")),
            "the damaged bytes are kept"
        );
        Ok(())
    })
    .await
}
