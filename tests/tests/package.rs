//! The Debian package (`scripts/build-deb.sh`): built from the binary the tests use, then
//! inspected and unpacked, and the unpacked binary and mount helper run.
use std::process::Command;

use anyhow::{ensure, Context, Result};

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn the_deb_holds_the_binary_mount_helper_units_man_pages_and_docs() -> Result<()> {
    // Cargo sets the manifest directory when it runs the test too; that one is right even when
    // a checkout elsewhere sharing the target directory built this binary.
    let manifest = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into());
    let root = std::path::Path::new(&manifest).join("..");
    let out = tempfile::tempdir()?;
    let printed = run(Command::new("bash")
        .arg(root.join("scripts/build-deb.sh"))
        .arg("--binary")
        .arg(codafs_tests::codafs_bin())
        .arg("--out")
        .arg(out.path()))?;
    let deb = std::path::PathBuf::from(printed.trim());
    ensure!(deb.exists(), "the script names the package it built: {printed}");

    let field = |f: &str| run(Command::new("dpkg-deb").args(["--field"]).arg(&deb).arg(f));
    ensure!(field("Package")?.trim() == "codafs");
    ensure!(field("Depends")?.contains("fuse3"));
    let contents = run(Command::new("dpkg-deb").arg("--contents").arg(&deb))?;
    for path in [
        "./usr/bin/codafs",
        "./sbin/mount.codafs -> ../usr/bin/codafs",
        "./lib/systemd/system/codafs-server.service",
        "./lib/systemd/system/codafs-mount.service",
        "./etc/default/codafs-mount",
        "./usr/share/man/man1/codafs.1.gz",
        "./usr/share/man/man1/codafs-volume-backup.1.gz",
        "./usr/share/bash-completion/completions/codafs",
        "./usr/share/doc/codafs/OPERATIONS.md",
    ] {
        ensure!(contents.contains(path), "{path} missing from the package:\n{contents}");
    }
    let conffiles = run(Command::new("dpkg-deb").arg("--info").arg(&deb).arg("conffiles"))?;
    ensure!(
        conffiles.contains("/etc/default/codafs-server") && conffiles.contains("/etc/default/codafs-mount"),
        "an upgrade keeps the admin's settings: {conffiles}"
    );

    // Unpacked: the binary runs, and the mount helper answers as mount(8) expects.
    let tree = tempfile::tempdir()?;
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(tree.path()))?;
    let version = run(Command::new(tree.path().join("usr/bin/codafs")).arg("--version"))?;
    ensure!(version.starts_with("codafs "), "{version}");
    let helper = Command::new(tree.path().join("sbin/mount.codafs")).output()?;
    ensure!(!helper.status.success());
    let said = String::from_utf8_lossy(&helper.stderr);
    ensure!(said.contains("usage: mount.codafs"), "{said}");
    let unit = std::fs::read_to_string(tree.path().join("lib/systemd/system/codafs-mount.service"))?;
    ensure!(
        unit.contains("ExecStart=/usr/bin/codafs mount") && unit.contains("--foreground"),
        "{unit}"
    );
    Ok(())
}
