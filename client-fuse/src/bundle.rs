//! The client-config bundle (`codafs cluster client-config`): everything a client needs to find
//! and trust the cluster. A plain TOML file so operators can read and template it; it holds no
//! secret (the CA certificate is public, its key stays on the servers).
use std::path::Path;

use codafs_proto::tls::Tls;
use serde::{Deserialize, Serialize};

/// Servers of a cluster and how to reach them, as a client sees them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientBundle {
    pub cluster_id: String,
    pub servers: Vec<String>,
    /// The cluster CA certificate (PEM) that server certificates are verified against.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ca_cert: String,
    /// The cluster runs without TLS (`cluster init --insecure`): connect in plaintext.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure: bool,
}

/// Bundle file problems.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("reading {0}: {1}")]
    Io(String, std::io::Error),
    #[error("{0} is not a client config: {1}")]
    Parse(String, String),
    #[error("{0} has no ca_cert: make a new one with `codafs cluster client-config` (or set insecure = true for a cluster created with --insecure)")]
    NoCa(String),
}

impl ClientBundle {
    /// Reads a bundle, refusing one that says neither how to verify servers nor that the
    /// cluster is plaintext.
    pub fn load(path: &Path) -> Result<Self, BundleError> {
        let text = std::fs::read_to_string(path).map_err(|e| BundleError::Io(path.display().to_string(), e))?;
        let b: Self =
            toml::from_str(&text).map_err(|e| BundleError::Parse(path.display().to_string(), e.to_string()))?;
        if !b.insecure && b.ca_cert.trim().is_empty() {
            return Err(BundleError::NoCa(path.display().to_string()));
        }
        Ok(b)
    }

    /// A bundle for `servers` reached over `tls`.
    pub fn new(cluster_id: String, servers: Vec<String>, tls: &Tls) -> Self {
        let (ca_cert, insecure) = match tls {
            Tls::Ca { ca_pem, .. } => (ca_pem.clone(), false),
            Tls::Insecure => (String::new(), true),
        };
        ClientBundle {
            cluster_id,
            servers,
            ca_cert,
            insecure,
        }
    }

    /// How to connect: TLS against the bundle's CA, or plaintext if it says so.
    pub fn tls(&self) -> Tls {
        if self.insecure {
            Tls::Insecure
        } else {
            Tls::ca(self.ca_cert.clone())
        }
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_a_bundle_without_ca() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("client.toml");
        let b = ClientBundle::new(
            "c".into(),
            vec!["127.0.0.1:1".into()],
            &Tls::ca("-----BEGIN CERTIFICATE-----\nAA\n"),
        );
        std::fs::write(&p, b.to_toml()).unwrap();
        assert_eq!(ClientBundle::load(&p).unwrap(), b);
        assert!(!b.tls().is_insecure());
        std::fs::write(&p, "cluster_id = \"c\"\nservers = [\"127.0.0.1:1\"]\n").unwrap();
        assert!(matches!(ClientBundle::load(&p), Err(BundleError::NoCa(_))));
        let plain = ClientBundle::new("c".into(), vec!["127.0.0.1:1".into()], &Tls::Insecure);
        std::fs::write(&p, plain.to_toml()).unwrap();
        assert!(ClientBundle::load(&p).unwrap().tls().is_insecure());
    }
}
