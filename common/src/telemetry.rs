//! Logging setup shared by every codafs process: `tracing` to stderr, filtered by `CODAFS_LOG`
//! (EnvFilter syntax, e.g. `CODAFS_LOG=codafs_server=debug,openraft=warn`).
use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Environment variable holding the log filter.
pub const LOG_ENV: &str = "CODAFS_LOG";

/// Installs the global subscriber. `default` applies when `CODAFS_LOG` is unset. Calling it twice
/// is harmless (the second call is ignored).
pub fn init(default: &str) {
    let filter = EnvFilter::try_from_env(LOG_ENV).unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(true)
        .try_init();
}
