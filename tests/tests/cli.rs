//! The `codafs` binary's own commands that need no cluster: shell completions.
use std::process::Command;

use anyhow::{ensure, Result};
use codafs_tests::codafs_bin;

/// Every supported shell gets a script that knows the subcommands; an unknown shell is refused
/// with the list of supported ones.
#[test]
fn completions_cover_every_subcommand_and_refuse_unknown_shells() -> Result<()> {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = Command::new(codafs_bin()).args(["completions", shell]).output()?;
        ensure!(
            out.status.success(),
            "{shell}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let script = String::from_utf8(out.stdout)?;
        for sub in ["upload", "volume", "mount", "login", "completions"] {
            ensure!(script.contains(sub), "{shell} script lacks {sub}");
        }
    }
    let out = Command::new(codafs_bin()).args(["completions", "tcsh"]).output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success() && err.contains("possible values"), "{err}");
    Ok(())
}
