//! The `codafs` binary's own commands that need no cluster: shell completions, output into a
//! closed pipe, and arguments refused before anything is done.
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
/// quietly with status 141, as SIGPIPE would: it panicked ("failed printing to stdout: Broken
/// pipe", exit 101). Each run closes the pipe's read end before the command writes (a run
/// whose output fit the pipe first may also succeed).
#[test]
fn output_into_a_closed_pipe_ends_quietly() -> Result<()> {
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
            !err.contains("panicked") && (out.status.success() || out.status.code() == Some(141)),
            "{:?}: {err}",
            out.status
        );
    }
    Ok(())
}

/// `cluster init` refuses addresses it could never use before it writes anything: a listen
/// address without a port, and every interface (`0.0.0.0`) without `--advertise`, which would
/// go into join tokens and client configs as is. (A host that does not resolve is refused
/// too; not tried here, since resolving it would ask the network's name servers.) An admin
/// name outside the account-name rule that `user add` applies is refused the same way.
#[test]
fn cluster_init_refuses_addresses_it_could_never_use() -> Result<()> {
    let root = tempfile::tempdir()?;
    let init = |name: &str, args: &[&str]| -> Result<(bool, String)> {
        let out = Command::new(codafs_bin())
            .args(["cluster", "init", "--dir"])
            .arg(root.path().join(name))
            .args(args)
            .output()?;
        Ok((out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned()))
    };
    for (name, args, why) in [
        ("noport", &["--listen", "localhost"][..], "HOST:PORT"),
        ("any", &["--listen", "0.0.0.0:7999"][..], "--advertise"),
        (
            "badadmin",
            &["--listen", "127.0.0.1:7999", "--admin=root\x1b[31m"][..],
            "account name",
        ),
    ] {
        let (ok, err) = init(name, args)?;
        ensure!(!ok && err.contains(why), "{args:?}: {err}");
        ensure!(!root.path().join(name).exists(), "{args:?} wrote {name}");
    }
    let (ok, err) = init(
        "advertised",
        &["--listen", "0.0.0.0:7999", "--advertise", "127.0.0.1:7999"],
    )?;
    ensure!(ok, "{err}");
    let toml = std::fs::read_to_string(root.path().join("advertised/server.toml"))?;
    ensure!(toml.contains("127.0.0.1:7999"), "{toml}");
    Ok(())
}

/// A `--ca` file that is not a certificate is refused as such before any connection (it was
/// taken, and every call failed later with "unknown issuer").
#[test]
fn a_ca_file_that_is_not_a_certificate_is_refused_as_such() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let junk = dir.path().join("ca.crt");
    std::fs::write(&junk, "junk\n")?;
    let out = Command::new(codafs_bin())
        .args(["volume", "list", "--server-addr", "127.0.0.1:1", "--ca"])
        .arg(&junk)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success() && err.contains("not a PEM certificate"), "{err}");
    Ok(())
}

/// Arguments that cannot work are refused with a reason before anything is done, found by an
/// operator's pass over the commands: a timeout of `nan` or `inf` panicked; a server address
/// without a port reached port 80; `prefetch` of a path on no mount reported success; a mount
/// with a missing config made its directories first; the demo wiped any `--dir` it was given;
/// a bad volume name went to the servers.
#[test]
fn arguments_that_cannot_work_are_refused_before_anything_is_done() -> Result<()> {
    let root = tempfile::tempdir()?;
    let run = |args: &[&str]| -> Result<(Option<i32>, String)> {
        let out = Command::new(codafs_bin())
            .args(args)
            .env_remove("CODAFS_SERVERS")
            .env_remove("CODAFS_CONFIG")
            .env_remove("CODAFS_CREDENTIAL")
            .output()?;
        Ok((out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned()))
    };
    let dir = root.path().to_str().unwrap_or_default().to_string();
    for t in ["nan", "inf", "1e300", "-1"] {
        let (code, err) = run(&["sync", &dir, &format!("--timeout={t}")])?;
        ensure!(
            code == Some(2) && err.contains("--timeout"),
            "sync --timeout {t}: {code:?} {err}"
        );
    }
    for addr in ["127.0.0.1", "127.0.0.1:99999"] {
        let (code, err) = run(&["volume", "list", "--insecure", "--server-addr", addr])?;
        ensure!(code == Some(1) && err.contains("HOST:PORT"), "{addr}: {code:?} {err}");
    }
    for name in ["..", "a/b", "Www", &"a".repeat(65)] {
        let (code, err) = run(&["volume", "info", name, "--insecure", "--server-addr", "127.0.0.1:1"])?;
        ensure!(code == Some(2) && err.contains("volume name"), "{name}: {code:?} {err}");
    }
    let (code, err) = run(&["prefetch", &dir])?;
    ensure!(
        code == Some(1) && !err.is_empty(),
        "prefetch of a plain directory: {code:?} {err}"
    );
    let mnt = root.path().join("mnt");
    let missing = root.path().join("none.toml");
    let (code, err) = run(&[
        "mount",
        mnt.to_str().unwrap_or_default(),
        "--config",
        missing.to_str().unwrap_or_default(),
    ])?;
    ensure!(code == Some(1) && err.contains("none.toml"), "{code:?} {err}");
    ensure!(!mnt.exists(), "a refused mount made {}", mnt.display());
    let precious = root.path().join("site");
    std::fs::create_dir(&precious)?;
    std::fs::write(precious.join("index.html"), "mine")?;
    let (code, err) = run(&[
        "demo",
        "--dir",
        precious.to_str().unwrap_or_default(),
        "--mount",
        mnt.to_str().unwrap_or_default(),
    ])?;
    ensure!(
        code == Some(1) && err.contains("not made by codafs demo"),
        "{code:?} {err}"
    );
    ensure!(std::fs::read_to_string(precious.join("index.html"))? == "mine");
    Ok(())
}
