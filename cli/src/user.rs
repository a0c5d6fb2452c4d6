//! `codafs user …`, `codafs login`, `codafs logout`: accounts and the caller's token.
use std::io::{BufRead, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use codafs_client::Cluster;
use codafs_proto::pb;

use crate::opts::ClientOpts;

#[derive(Subcommand)]
pub enum UserCmd {
    /// Create an account (admin). Asks for its password.
    Add {
        /// The account's name: 1-64 letters, digits, '.', '-', '_', '@', starting with a
        /// letter or digit.
        name: String,
        /// Give the account the admin role.
        #[arg(long)]
        admin: bool,
        #[command(flatten)]
        password: PasswordArgs,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// List accounts (admin).
    List {
        /// Print JSON instead of text (for scripts and monitoring).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Set an account's password (admin). Keeps its role unless --admin/--no-admin is given.
    /// Ends every token the account holds (the admin credential from `cluster init` too, when
    /// this sets the admin's password): log in again with the new password.
    Passwd {
        /// The account to change.
        name: String,
        /// Also give the account the admin role.
        #[arg(long, conflicts_with = "no_admin")]
        admin: bool,
        /// Also take the admin role from the account (not from your own: another admin can).
        #[arg(long)]
        no_admin: bool,
        #[command(flatten)]
        password: PasswordArgs,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Remove an account (admin). Volumes it owns need a new owner first. Its tokens stop
    /// working on every server within seconds.
    Remove {
        /// The account to remove.
        name: String,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// End every token issued so far to an account, on every server within seconds.
    ///
    /// For a stolen or leaked token, or to log an account out everywhere (mounts included).
    /// Admins may revoke any account's tokens; any user may revoke their own (the token doing
    /// it stops working too). The password stays valid: `codafs login USER` gives a new token.
    /// Removing an account, changing its password or role (`user passwd`), and taking away its
    /// write rights on a volume (`volume set --remove-writer`, or a new owner) revoke its tokens
    /// the same way.
    #[command(
        after_help = "Examples:\n  codafs user revoke webmaster   # as an admin: log webmaster out everywhere\n  codafs user revoke alice       # as alice: end all of alice's tokens, this one included"
    )]
    Revoke {
        /// The account whose tokens end.
        name: String,
        #[command(flatten)]
        client: ClientOpts,
    },
}

#[derive(Args, Clone)]
pub struct PasswordArgs {
    /// Read the password from the first line of standard input (for scripts) instead of asking.
    #[arg(long)]
    password_stdin: bool,
}

impl PasswordArgs {
    fn read(&self, prompt: &str, confirm: bool) -> Result<String> {
        if self.password_stdin {
            let mut line = String::new();
            std::io::stdin().lock().read_line(&mut line)?;
            return Ok(line.trim_end_matches(['\n', '\r']).to_string());
        }
        let p = rpassword::prompt_password(prompt)
            .context("reading the password (use --password-stdin without a terminal)")?;
        if confirm && rpassword::prompt_password("again: ")? != p {
            bail!("the passwords do not match");
        }
        Ok(p)
    }
}

/// Where `login` keeps the caller's token: $CODAFS_TOKEN_FILE, else ~/.config/codafs/token.
pub fn token_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CODAFS_TOKEN_FILE") {
        return Some(PathBuf::from(p));
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("codafs").join("token"))
}

/// A connection for an administrative command, which needs a token.
fn admin_cluster(client: &ClientOpts) -> Result<Cluster> {
    client.required_token()?;
    client.cluster()
}

pub async fn run(cmd: UserCmd) -> Result<()> {
    match cmd {
        UserCmd::Add {
            name,
            admin,
            password,
            client,
        } => {
            codafs_common::names::validate_account_name(&name).context("account name")?;
            let pw = password.read(&format!("password for {name}: "), true)?;
            let spec = pb::UserSpec {
                name: name.clone(),
                password: pw,
                admin,
                create: true,
            };
            admin_cluster(&client)?.put_user(spec).await?;
            println!("created account {name}{}", if admin { " (admin)" } else { "" });
        }
        UserCmd::List { json, client } => {
            let list = admin_cluster(&client)?.list_users().await?;
            if json {
                let v: Vec<_> = list
                    .users
                    .iter()
                    .map(|u| serde_json::json!({"name": u.name, "admin": u.admin, "has_password": u.has_password}))
                    .collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                println!("{:<32} {:<6} PASSWORD", "ACCOUNT", "ROLE");
                for u in &list.users {
                    let role = if u.admin { "admin" } else { "user" };
                    println!(
                        "{:<32} {:<6} {}",
                        u.name,
                        role,
                        if u.has_password { "set" } else { "none" }
                    );
                }
            }
        }
        UserCmd::Passwd {
            name,
            admin,
            no_admin,
            password,
            client,
        } => {
            let list = admin_cluster(&client)?.list_users().await?;
            let current = list
                .users
                .iter()
                .find(|u| u.name == name)
                .with_context(|| format!("no account {name}"))?;
            let role = if admin {
                true
            } else if no_admin {
                false
            } else {
                current.admin
            };
            let pw = password.read(&format!("new password for {name}: "), true)?;
            let spec = pb::UserSpec {
                name: name.clone(),
                password: pw,
                admin: role,
                create: false,
            };
            admin_cluster(&client)?.put_user(spec).await?;
            println!("password of {name} changed; tokens issued before no longer work");
        }
        UserCmd::Remove { name, client } => {
            admin_cluster(&client)?.remove_user(&name).await?;
            println!("removed account {name}");
        }
        UserCmd::Revoke { name, client } => {
            admin_cluster(&client)?.revoke_user(&name).await?;
            println!("revoked every token of {name} issued until now; {name} logs in again to get a new one");
        }
    }
    Ok(())
}

#[derive(Args)]
#[command(
    after_help = "Examples:\n  codafs login webmaster\n  echo \"$PASSWORD\" | codafs login webmaster --password-stdin\n  codafs login --credential /var/lib/codafs/admin.token   # hand an existing token to the mounts"
)]
pub struct LoginArgs {
    /// Account name. Without it, the token in --credential FILE (e.g. the admin credential from
    /// `cluster init`) is checked with the servers and handed to the mounts instead.
    #[arg(required_unless_present = "credential")]
    user: Option<String>,
    /// Token lifetime in hours, 1 to 720.
    #[arg(long, default_value_t = 12, value_parser = clap::value_parser!(u64).range(1..=720))]
    hours: u64,
    #[command(flatten)]
    password: PasswordArgs,
    #[command(flatten)]
    client: ClientOpts,
}

/// `codafs login USER`: exchanges the password for a token, stores it (mode 0600) and hands it
/// to every running mount, which uses it for this uid's writes.
pub async fn login(a: LoginArgs) -> Result<()> {
    let path = token_path().context("no place for the token: set HOME or CODAFS_TOKEN_FILE")?;
    let c = a.client.cluster()?;
    let (user, reply) = match &a.user {
        Some(user) => {
            let pw = a.password.read(&format!("password for {user}: "), false)?;
            let req = pb::LoginRequest {
                user: user.clone(),
                password: pw,
                ttl_secs: a.hours.min(720) * 3600,
            };
            let reply = c.login(req).await?;
            (user.clone(), reply)
        }
        None => {
            // The cluster was built with the credential's token: ask who it speaks for.
            let token = a.client.required_token()?;
            let who = c.who_am_i(None).await?;
            (
                who.user,
                pb::LoginReply {
                    token,
                    expires: who.expires,
                },
            )
        }
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(reply.token.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    let hours = reply.expires.saturating_sub(codafs_common::token::unix_now()) / 3600;
    println!("logged in as {user} for {hours} h (token in {})", path.display());
    // Mounts take the token for this uid only (they read it from the socket, not from us).
    for (mnt, v) in crate::mount::tell_mounts(&format!("login {}", reply.token)) {
        match v["error"].as_str() {
            None if v["read_only"] == true => println!(
                "mount {mnt} (read-only): reads of private volumes by uid {} now use this token",
                v["uid"]
            ),
            None => println!("mount {mnt}: writes by uid {} now use this token", v["uid"]),
            Some(e) => eprintln!("mount {mnt}: token refused: {e}"),
        }
    }
    Ok(())
}

/// `codafs logout`.
#[derive(clap::Args, Debug)]
pub struct LogoutArgs {
    /// Drop your uid's token from every running mount on this host, whatever its cluster
    /// (without it, only mounts of the cluster the stored token is for; nothing if there is no
    /// stored token).
    #[arg(long)]
    everywhere: bool,
}

/// `codafs logout`: forgets the stored token, and drops it from the running mounts of its
/// cluster (this host may mount other clusters, whose tokens stay).
pub fn logout(a: &LogoutArgs) -> Result<()> {
    let path = token_path().context("no token location (HOME unset)")?;
    // Whose token this was: mounts of other clusters keep theirs.
    let stored = std::fs::read_to_string(&path).ok();
    let cluster = stored
        .as_deref()
        .and_then(|t| codafs_common::token::peek(t.trim()).ok())
        .map(|c| c.cluster)
        .filter(|c| !c.is_empty());
    match std::fs::remove_file(&path) {
        Ok(()) => println!("logged out ({} removed)", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => println!("no token file"),
        Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
    }
    let line = match (&cluster, a.everywhere) {
        (_, true) => "logout".to_string(),
        (Some(c), false) => format!("logout {c}"),
        (None, false) => {
            let what = if stored.is_some() {
                "the stored token was unreadable, so its cluster is unknown"
            } else {
                "there was no stored token"
            };
            println!("the mounts keep your tokens: {what} (--everywhere drops your token from every mount)");
            return Ok(());
        }
    };
    for (mnt, v) in crate::mount::tell_mounts(&line) {
        if v["had_token"].as_bool() == Some(true) {
            println!(
                "mount {mnt}: token of uid {} dropped; the mount is read-only for it",
                v["uid"]
            );
        } else if let Some(kept) = v["kept_cluster"].as_str() {
            println!("mount {mnt}: still holds your token for cluster {kept} (--everywhere drops it too)");
        }
    }
    Ok(())
}
