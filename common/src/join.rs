//! Join tokens: what `codafs cluster join-token` prints and `codafs server --join` consumes. It
//! names the cluster, carries a random secret (the cluster records only its hash, with an expiry
//! time, and lets one server join with it), lists servers to ask, and carries the cluster CA
//! certificate, so the joining server can verify those servers before it has a certificate of
//! its own (or says the cluster runs without TLS).
use serde::{Deserialize, Serialize};

const PREFIX: &str = "cfsjoin1.";

/// Contents of a join token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    pub cluster_id: String,
    /// The secret (hex). Single use: the first server that joins with it spends it.
    pub join_key: String,
    pub servers: Vec<String>,
    /// The cluster CA certificate (PEM); empty on an `--insecure` cluster.
    #[serde(default)]
    pub ca_cert: String,
    /// The cluster runs without TLS.
    #[serde(default)]
    pub insecure: bool,
    /// When the token stops working (Unix seconds; the servers decide, this is for messages).
    #[serde(default)]
    pub expires: u64,
}

/// A string that is not a usable join token.
#[derive(Debug, thiserror::Error)]
pub enum BadJoinToken {
    #[error("not a codafs join token (expected cfsjoin1.…)")]
    Malformed,
    #[error("the join token carries no CA certificate (made by a server without TLS support?): make a new one with `codafs cluster join-token`")]
    NoCa,
}

impl JoinToken {
    pub fn encode(&self) -> String {
        format!("{PREFIX}{}", hex::encode(serde_json::to_vec(self).unwrap_or_default()))
    }

    pub fn decode(s: &str) -> Result<Self, BadJoinToken> {
        let body = s.trim().strip_prefix(PREFIX).ok_or(BadJoinToken::Malformed)?;
        let json = hex::decode(body).map_err(|_| BadJoinToken::Malformed)?;
        let t: JoinToken = serde_json::from_slice(&json).map_err(|_| BadJoinToken::Malformed)?;
        if !t.insecure && t.ca_cert.trim().is_empty() {
            return Err(BadJoinToken::NoCa);
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let t = JoinToken {
            cluster_id: "c".into(),
            join_key: "k".into(),
            servers: vec!["127.0.0.1:1".into()],
            ca_cert: "-----BEGIN CERTIFICATE-----\n…".into(),
            insecure: false,
            expires: 1,
        };
        assert_eq!(JoinToken::decode(&t.encode()).unwrap(), t);
        let no_ca = JoinToken {
            ca_cert: String::new(),
            ..t.clone()
        };
        assert!(matches!(JoinToken::decode(&no_ca.encode()), Err(BadJoinToken::NoCa)));
        let plain = JoinToken {
            insecure: true,
            ..no_ca
        };
        assert_eq!(JoinToken::decode(&plain.encode()).unwrap(), plain);
        assert!(JoinToken::decode("cfsjoin1.zz").is_err());
        assert!(JoinToken::decode("nope").is_err());
    }
}
