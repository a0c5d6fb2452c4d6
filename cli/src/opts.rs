//! Options shared by every client command: where the servers are, how to trust them (the
//! cluster CA, or plaintext with `--insecure`), and which credential to use.
use std::path::{Path, PathBuf};
use std::sync::Once;

use anyhow::{bail, Context, Result};
use clap::Args;
use codafs_client::transport::Tls;
use codafs_client::{ClientBundle, Cluster};

/// Default location of the client-config bundle.
pub const DEFAULT_CONFIG: &str = "/etc/codafs/client.toml";

#[derive(Args, Clone, Debug, Default)]
#[command(next_help_heading = "Connection")]
pub struct ClientOpts {
    /// Server to talk to (host:port); repeat for failover. Overrides the client config.
    #[arg(long = "server-addr", env = "CODAFS_SERVERS", value_delimiter = ',')]
    pub servers: Vec<String>,
    /// Server (host:port, one of the servers) to talk to first [default: for `mount`, one of
    /// the servers at random, so a farm's nodes spread over them; for other commands, the
    /// first one, so each command sees what the one before it changed]. After it fails, the
    /// client moves to another one, picked at random. One not among the servers is ignored,
    /// with a warning.
    #[arg(long, env = "CODAFS_PREFER_SERVER", value_name = "HOST:PORT")]
    pub prefer_server: Option<String>,
    /// Client-config bundle from `codafs cluster client-config` [default: /etc/codafs/client.toml]
    #[arg(long, env = "CODAFS_CONFIG")]
    pub config: Option<PathBuf>,
    /// File holding a token (e.g. DIR/admin.token from `cluster init`).
    #[arg(long, env = "CODAFS_CREDENTIAL")]
    pub credential: Option<PathBuf>,
    /// Cluster CA certificate (PEM; DIR/tls/ca.crt on any server) to verify servers with.
    /// Overrides the client config's.
    #[arg(long, env = "CODAFS_CA", conflicts_with = "insecure")]
    pub ca: Option<PathBuf>,
    /// Talk plaintext to a cluster created with `cluster init --insecure`: unencrypted and
    /// unauthenticated. CODAFS_INSECURE accepts 1/0, true/false, yes/no, on/off.
    #[arg(long, env = "CODAFS_INSECURE", value_parser = clap::builder::BoolishValueParser::new())]
    pub insecure: bool,
}

/// Warns once per process that traffic is plaintext.
fn warn_plaintext() {
    static WARNED: Once = Once::new();
    WARNED.call_once(|| {
        eprintln!(
            "codafs: WARNING: connecting WITHOUT TLS (--insecure): traffic is unencrypted and the servers are not authenticated"
        );
    });
}

impl ClientOpts {
    fn config_path(&self) -> PathBuf {
        self.config.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG))
    }

    /// The client config and its path; `missing(path)` says what to pass instead when there
    /// is none.
    fn bundle(&self, missing: impl FnOnce(&Path) -> String) -> Result<(ClientBundle, PathBuf)> {
        let path = self.config_path();
        if !path.exists() {
            bail!(missing(&path));
        }
        Ok((ClientBundle::load(&path)?, path))
    }

    /// Servers from the flags, else from the bundle.
    pub fn servers(&self) -> Result<Vec<String>> {
        let (servers, from) = if !self.servers.is_empty() {
            (self.servers.clone(), "--server-addr or CODAFS_SERVERS".to_string())
        } else {
            let (bundle, path) = self.bundle(|path| {
                format!(
                    "no servers given: pass --server-addr HOST:PORT, set CODAFS_SERVERS, or point --config at a client config ({} does not exist)",
                    path.display()
                )
            })?;
            (bundle.servers, path.display().to_string())
        };
        for s in &servers {
            codafs_proto::tls::check_addr(s).map_err(|e| anyhow::anyhow!("server address {s:?} ({from}): {e}"))?;
        }
        Ok(servers)
    }

    /// How to connect: --insecure, else TLS against --ca, else what the client config says.
    /// Never plaintext unless asked for, by the flag or by the config.
    pub fn tls(&self) -> Result<Tls> {
        let tls = if self.insecure {
            Tls::Insecure
        } else if let Some(p) = &self.ca {
            let pem = std::fs::read_to_string(p).with_context(|| format!("reading CA certificate {}", p.display()))?;
            // Anything else was taken and failed later as an "unknown issuer".
            if !pem.contains("-----BEGIN CERTIFICATE-----") {
                bail!(
                    "--ca {}: not a PEM certificate (use DIR/tls/ca.crt of a server)",
                    p.display()
                );
            }
            Tls::ca(pem)
        } else {
            let (bundle, _) = self.bundle(|path| {
                format!(
                    "no cluster CA to verify the servers with: pass --ca FILE (DIR/tls/ca.crt on a server), or --config CLIENT_CONFIG ({} does not exist), or --insecure for a cluster created with --insecure",
                    path.display()
                )
            })?;
            bundle.tls()
        };
        if tls.is_insecure() {
            warn_plaintext();
        }
        Ok(tls)
    }

    /// The connection options as arguments, to start another `codafs` process the same way.
    pub fn to_args(&self) -> Vec<String> {
        let mut v = Vec::new();
        for s in &self.servers {
            v.extend(["--server-addr".to_string(), s.clone()]);
        }
        if let Some(p) = &self.prefer_server {
            v.extend(["--prefer-server".to_string(), p.clone()]);
        }
        if let Some(c) = &self.config {
            v.extend(["--config".to_string(), c.display().to_string()]);
        }
        if let Some(c) = &self.ca {
            v.extend(["--ca".to_string(), c.display().to_string()]);
        }
        if self.insecure {
            v.push("--insecure".into());
        }
        v
    }

    /// The token: from --credential / CODAFS_CREDENTIAL, else the one `codafs login` stored.
    pub fn token(&self) -> Result<Option<String>> {
        match &self.credential {
            Some(p) => {
                let t = std::fs::read_to_string(p).with_context(|| format!("reading credential {}", p.display()))?;
                Ok(Some(t.trim().to_string()))
            }
            None => Ok(crate::user::token_path()
                .and_then(|p| std::fs::read_to_string(p).ok())
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())),
        }
    }

    /// A token that must exist (admin commands).
    pub fn required_token(&self) -> Result<String> {
        self.token()?
            .context("this command needs a credential: run `codafs login USER`, or pass --credential FILE")
    }

    /// `--prefer-server` if it is one of the servers. One that is not is ignored with a
    /// warning, not refused: it only says where to start, and a `CODAFS_PREFER_SERVER` a web
    /// node exports must not stop a command given another `--server-addr` (a recovery that
    /// talks to the one surviving server, say).
    pub fn prefer(&self) -> Result<Option<String>> {
        let Some(p) = &self.prefer_server else {
            return Ok(None);
        };
        let servers = self.servers()?;
        if !servers.contains(p) {
            eprintln!(
                "codafs: WARNING: ignoring --prefer-server/CODAFS_PREFER_SERVER {p}: not one of the servers ({})",
                servers.join(", ")
            );
            return Ok(None);
        }
        Ok(Some(p.clone()))
    }

    pub fn cluster(&self) -> Result<Cluster> {
        // A command starts at the first server unless told otherwise (`Cluster::new`; see
        // `prefer_server`): a commit is answered once the server that took it has applied it,
        // so the next command, starting there too, reads it.
        let c = Cluster::new(&self.servers()?, self.tls()?, self.token()?)?;
        if let Some(p) = self.prefer()? {
            c.prefer(&p)?;
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(servers: &[&str], prefer: Option<&str>) -> ClientOpts {
        ClientOpts {
            servers: servers.iter().map(|s| s.to_string()).collect(),
            prefer_server: prefer.map(str::to_string),
            insecure: true,
            ..ClientOpts::default()
        }
    }

    /// A server address without a port (or with a bad one) went to port 80 or 443.
    #[test]
    fn server_addresses_need_a_port() {
        assert!(opts(&["127.0.0.1:7400", "[::1]:7400"], None).servers().is_ok());
        for bad in ["127.0.0.1", "127.0.0.1:99999", "127.0.0.1:abc"] {
            let e = opts(&["127.0.0.1:7400", bad], None).servers().unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains("HOST:PORT"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_preferred_server_must_be_listed_or_is_ignored() -> Result<()> {
        let listed = ["127.0.0.1:1", "127.0.0.1:2"];
        assert_eq!(
            opts(&listed, Some("127.0.0.1:2")).prefer()?.as_deref(),
            Some("127.0.0.1:2")
        );
        // A stale CODAFS_PREFER_SERVER beside another --server-addr: a warning, not a refusal.
        assert_eq!(opts(&listed, Some("127.0.0.1:9")).prefer()?, None);
        assert_eq!(opts(&listed, None).prefer()?, None);
        Ok(())
    }

    #[tokio::test]
    async fn commands_start_at_the_first_server_unless_told() -> Result<()> {
        let listed = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"];
        for _ in 0..20 {
            assert_eq!(opts(&listed, None).cluster()?.preferred(), "127.0.0.1:1");
        }
        assert_eq!(opts(&listed, Some("127.0.0.1:3")).cluster()?.preferred(), "127.0.0.1:3");
        assert_eq!(opts(&listed, Some("127.0.0.1:9")).cluster()?.preferred(), "127.0.0.1:1");
        Ok(())
    }
}
