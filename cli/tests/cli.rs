//! The `codafs` binary's behaviour on bad input: one clear line on stderr, non-zero exit, no
//! panic. (Also makes `cargo test` build the binary the process-cluster tests spawn.)
use std::process::Command;

fn codafs(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_codafs"))
        .args(args)
        .env_remove("CODAFS_CONFIG")
        .output()
        .expect("run codafs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn help_lists_the_contract_commands() {
    let (ok, out, _) = codafs(&["--help"]);
    assert!(ok);
    for cmd in ["server", "cluster", "volume", "status"] {
        assert!(out.contains(cmd), "--help lacks {cmd}: {out}");
    }
}

#[test]
fn errors_are_one_line_without_panics() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<Vec<String>> = vec![
        vec![
            "volume".into(),
            "list".into(),
            "--config".into(),
            "/nonexistent/client.toml".into(),
        ],
        vec![
            "server".into(),
            "--dir".into(),
            dir.path().join("s").display().to_string(),
        ],
        vec!["status".into(), "--server".into(), "127.0.0.1:1".into()],
        vec![
            "volume".into(),
            "create".into(),
            "x".into(),
            "--server-addr".into(),
            "127.0.0.1:1".into(),
        ],
    ];
    for args in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, _, err) = codafs(&args);
        assert!(!ok, "{args:?} should fail");
        assert!(
            err.starts_with("codafs: ") || err.contains("unreachable"),
            "{args:?}: {err}"
        );
        assert!(
            !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
            "{args:?} panicked: {err}"
        );
    }
}

#[test]
fn init_refuses_to_overwrite_a_server_directory() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("s0");
    let d = d.to_str().unwrap();
    let (ok, out, err) = codafs(&["cluster", "init", "--dir", d, "--listen", "127.0.0.1:7999"]);
    assert!(ok, "{err}");
    assert!(out.contains("admin credential"));
    let (ok, _, err) = codafs(&["cluster", "init", "--dir", d, "--listen", "127.0.0.1:7999"]);
    assert!(!ok);
    assert!(err.contains("already holds a server"), "{err}");
}
