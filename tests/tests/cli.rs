//! The `codafs` binary's own commands that need no cluster: shell completions, and output into a
//! closed pipe.
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

/// Output into a pipe its reader has closed (`codafs status | head -1`) ends the command
/// quietly, as with other Unix tools: it panicked ("failed printing to stdout: Broken pipe",
/// exit 101). Each run closes the pipe's read end before the command writes.
#[test]
fn output_into_a_closed_pipe_ends_quietly() -> Result<()> {
    use std::os::unix::process::ExitStatusExt;
    for _ in 0..5 {
        let mut child = Command::new(codafs_bin())
            .args(["completions", "bash"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        drop(child.stdout.take());
        let out = child.wait_with_output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !err.contains("panicked") && (out.status.success() || out.status.signal() == Some(libc::SIGPIPE)),
            "{:?}: {err}",
            out.status
        );
    }
    Ok(())
}
