//! Join tokens: what `codafs cluster join-token` prints and `codafs server --join` consumes. It
//! names the cluster, carries a secret derived from the cluster key, and lists servers to ask.
use serde::{Deserialize, Serialize};

const PREFIX: &str = "cfsjoin1.";

/// Contents of a join token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    pub cluster_id: String,
    pub join_key: String,
    pub servers: Vec<String>,
}

/// A string that is not a join token.
#[derive(Debug, thiserror::Error)]
#[error("not a codafs join token (expected cfsjoin1.…)")]
pub struct BadJoinToken;

impl JoinToken {
    pub fn encode(&self) -> String {
        format!("{PREFIX}{}", hex::encode(serde_json::to_vec(self).unwrap_or_default()))
    }

    pub fn decode(s: &str) -> Result<Self, BadJoinToken> {
        let body = s.trim().strip_prefix(PREFIX).ok_or(BadJoinToken)?;
        let json = hex::decode(body).map_err(|_| BadJoinToken)?;
        serde_json::from_slice(&json).map_err(|_| BadJoinToken)
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
        };
        assert_eq!(JoinToken::decode(&t.encode()).unwrap(), t);
        assert!(JoinToken::decode("cfsjoin1.zz").is_err());
        assert!(JoinToken::decode("nope").is_err());
    }
}
