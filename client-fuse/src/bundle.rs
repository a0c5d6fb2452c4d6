//! The client-config bundle (`codafs cluster client-config`): everything a client needs to find
//! the cluster. A plain TOML file so operators can read and template it.
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Servers of a cluster, as a client sees them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientBundle {
    pub cluster_id: String,
    pub servers: Vec<String>,
}

/// Bundle file problems.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("reading {0}: {1}")]
    Io(String, std::io::Error),
    #[error("{0} is not a client config: {1}")]
    Parse(String, String),
}

impl ClientBundle {
    pub fn load(path: &Path) -> Result<Self, BundleError> {
        let text = std::fs::read_to_string(path).map_err(|e| BundleError::Io(path.display().to_string(), e))?;
        toml::from_str(&text).map_err(|e| BundleError::Parse(path.display().to_string(), e.to_string()))
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }
}
