//! Options shared by every client command: where the servers are and which credential to use.
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use codafs_client::{ClientBundle, Cluster};

/// Default location of the client-config bundle.
pub const DEFAULT_CONFIG: &str = "/etc/codafs/client.toml";

#[derive(Args, Clone, Debug, Default)]
#[command(next_help_heading = "Connection")]
pub struct ClientOpts {
    /// Server to talk to (host:port); repeat for failover. Overrides the client config.
    #[arg(long = "server-addr", env = "CODAFS_SERVERS", value_delimiter = ',')]
    pub servers: Vec<String>,
    /// Client-config bundle from `codafs cluster client-config` [default: /etc/codafs/client.toml]
    #[arg(long, env = "CODAFS_CONFIG")]
    pub config: Option<PathBuf>,
    /// File holding a token (e.g. DIR/admin.token from `cluster init`).
    #[arg(long, env = "CODAFS_CREDENTIAL")]
    pub credential: Option<PathBuf>,
}

impl ClientOpts {
    /// Servers from the flags, else from the bundle.
    pub fn servers(&self) -> Result<Vec<String>> {
        if !self.servers.is_empty() {
            return Ok(self.servers.clone());
        }
        let path = self.config.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
        if !path.exists() {
            bail!(
                "no servers given: pass --server-addr HOST:PORT, set CODAFS_SERVERS, or point --config at a client config ({} does not exist)",
                path.display()
            );
        }
        Ok(ClientBundle::load(&path)?.servers)
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

    pub fn cluster(&self) -> Result<Cluster> {
        Ok(Cluster::new(&self.servers()?, self.token()?)?)
    }
}
