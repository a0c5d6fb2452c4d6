//! Acting as other local users: running the CLI and filesystem calls under an unprivileged uid,
//! as a webmaster or a web server process would, and talking to a mount's control socket.
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result};

use crate::{codafs_bin, Mount, TestCluster};

/// What a command printed and whether it succeeded.
#[derive(Debug)]
pub struct Output {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

/// A local user: uid, gid and a home directory it owns.
pub struct User {
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

impl TestCluster {
    /// Makes the test directory traversable and puts a copy of `codafs` in it, so unprivileged
    /// uids can run it (the build directory usually lives under root's 0700 home).
    pub fn shared_bin(&self) -> Result<PathBuf> {
        let root = self.root.path();
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755))?;
        let bin = root.join("bin");
        let exe = bin.join("codafs");
        if !exe.exists() {
            std::fs::create_dir_all(&bin)?;
            std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755))?;
            std::fs::copy(codafs_bin(), &exe).context("copying the codafs binary")?;
            std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755))?;
            // The CA certificate too: server directories are private to root.
            if self.ca_path().exists() {
                std::fs::copy(self.ca_path(), bin.join("ca.crt"))?;
                std::fs::set_permissions(bin.join("ca.crt"), std::fs::Permissions::from_mode(0o644))?;
            }
        }
        Ok(exe)
    }

    /// A user with a fresh home directory under the test directory.
    pub fn user(&self, uid: u32) -> Result<User> {
        let home = self.root.path().join(format!("home-{uid}"));
        std::fs::create_dir_all(&home)?;
        std::os::unix::fs::chown(&home, Some(uid), Some(uid))?;
        Ok(User { uid, gid: uid, home })
    }

    /// Runs `codafs ARGS` as `user` (None = this process, root) against this cluster.
    pub fn codafs_as(&self, user: Option<&User>, args: &[&str], stdin: &str) -> Result<Output> {
        self.codafs_as_with(user, &[], args, stdin)
    }

    /// The environment that gives a `codafs` command the cluster's admin credential (and no
    /// saved token).
    pub fn admin_env(&self) -> Vec<(&'static str, String)> {
        let cred = self.servers[0].dir.join("admin.token").display().to_string();
        let none = self.root.path().join("no-token").display().to_string();
        vec![("CODAFS_CREDENTIAL", cred), ("CODAFS_TOKEN_FILE", none)]
    }

    /// `codafs ARGS` as root with the cluster's admin credential (and no saved token).
    pub fn codafs_admin(&self, args: &[&str]) -> Result<Output> {
        self.codafs_as_with(None, &self.admin_env(), args, "")
    }

    /// Like [`TestCluster::codafs_as`], with extra environment variables.
    pub fn codafs_as_with(
        &self,
        user: Option<&User>,
        env: &[(&str, String)],
        args: &[&str],
        stdin: &str,
    ) -> Result<Output> {
        let exe = self.shared_bin()?;
        let shared_ca = exe.with_file_name("ca.crt");
        let mut cmd = Command::new(&exe);
        if user.is_none() {
            // Root's runs get a home of their own: a token root saved on this machine with
            // `codafs login` (for another cluster, say) must not leak into a test.
            cmd.env("HOME", self.root.path());
        }
        cmd.args(args)
            .envs(self.client_env())
            .env_remove("CODAFS_CREDENTIAL")
            .env_remove("CODAFS_TOKEN_FILE");
        if shared_ca.exists() {
            cmd.env("CODAFS_CA", &shared_ca);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        run(cmd, user, stdin)
    }
}

/// Runs `sh -c script` as `user`.
pub fn sh_as(user: &User, script: &str) -> Result<Output> {
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(script);
    run(cmd, Some(user), "")
}

fn run(mut cmd: Command, user: Option<&User>, stdin: &str) -> Result<Output> {
    if let Some(u) = user {
        // std drops root's supplementary groups when it sets the uid: exactly that user.
        cmd.uid(u.uid).gid(u.gid).env("HOME", &u.home).current_dir(&u.home);
    }
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    // A copy of the binary just written may still be open for writing in a child another test
    // thread forked meanwhile (until it execs): exec then fails with ETXTBSY for a moment.
    let mut attempts = 0;
    let mut child = loop {
        match cmd.spawn() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && attempts < 50 => {
                attempts += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            r => break r.context("spawning a command as another user")?,
        }
    };
    child.stdin.take().context("stdin")?.write_all(stdin.as_bytes())?;
    let out = crate::wait_output(child, std::time::Duration::from_secs(60))?;
    Ok(Output {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into(),
        stderr: String::from_utf8_lossy(&out.stderr).into(),
    })
}

impl Mount {
    /// Sends one control request (`status`, `login TOKEN`, `logout`) as this process (root).
    pub fn control(&self, line: &str) -> Result<serde_json::Value> {
        control(&self.path, line)
    }
}

fn control(mnt: &Path, line: &str) -> Result<serde_json::Value> {
    use std::io::Read;
    let sock = codafs_client::mount::control_socket(&std::fs::canonicalize(mnt)?);
    let mut s = std::os::unix::net::UnixStream::connect(&sock)?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    s.write_all(format!("{line}\n").as_bytes())?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    Ok(serde_json::from_str(&reply)?)
}
