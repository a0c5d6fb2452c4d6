//! `mount.codafs`: the helper mount(8) runs for `codafs` lines in /etc/fstab, e.g.
//!
//! ```text
//! /etc/codafs/client.toml  /coda  codafs  ro,cache_size=10G,_netdev  0 0
//! ```
//!
//! mount(8) calls `mount.codafs SOURCE MOUNTPOINT [-sfnv] [-o OPTIONS]`; this turns that into
//! `codafs mount MOUNTPOINT --config SOURCE …`. Install with
//! `ln -s $(command -v codafs) /sbin/mount.codafs`.
use std::ffi::OsString;

/// Options mount(8) passes that mean nothing to codafs (`ro` means `--read-only`).
const IGNORED: &[&str] = &[
    "defaults", "auto", "noauto", "user", "nouser", "users", "_netdev", "nofail", "rw", "exec", "noexec", "suid",
    "nosuid", "dev", "nodev", "atime", "noatime", "relatime",
];

/// Whether this process was started as the mount helper.
pub fn is_helper(argv0: &OsString) -> bool {
    std::path::Path::new(argv0)
        .file_name()
        .is_some_and(|n| n == "mount.codafs")
}

/// Translates helper arguments into `codafs mount` arguments.
pub fn translate(args: &[OsString]) -> Result<Vec<OsString>, String> {
    let mut positional = Vec::new();
    let mut options = Vec::new();
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        if s == "-o" {
            let o = it.next().ok_or("-o needs a value")?;
            options.extend(
                o.to_string_lossy()
                    .split(',')
                    .filter(|x| !x.is_empty())
                    .map(str::to_string),
            );
        } else if let Some(o) = s.strip_prefix("-o") {
            options.extend(o.split(',').filter(|x| !x.is_empty()).map(str::to_string));
        } else if s.starts_with('-') {
            // -s (sloppy), -f (fake), -n (no mtab), -v (verbose): nothing to do.
        } else {
            positional.push(a.clone());
        }
    }
    let [source, mountpoint] = positional.as_slice() else {
        return Err(
            "usage: mount.codafs CLIENT_CONFIG MOUNTPOINT [-o cache_dir=DIR,cache_size=SIZE,cache_checkpoint=SECS,timeout=SECS,log_limit=SIZE,prefer_server=HOST:PORT,ro,sync,async]".into(),
        );
    };
    let mut out: Vec<OsString> = vec![
        "codafs".into(),
        "mount".into(),
        mountpoint.clone(),
        "--config".into(),
        source.clone(),
    ];
    for o in options {
        let (k, v) = o.split_once('=').map_or((o.as_str(), None), |(k, v)| (k, Some(v)));
        match (k, v) {
            ("cache_dir", Some(v)) => out.extend(["--cache-dir".into(), v.into()]),
            ("cache_size", Some(v)) => out.extend(["--cache-size".into(), v.into()]),
            ("cache_checkpoint", Some(v)) => out.extend(["--cache-checkpoint".into(), v.into()]),
            ("timeout", Some(v)) => out.extend(["--timeout".into(), v.into()]),
            ("ro", None) => out.push("--read-only".into()),
            // fstab's usual word for "writes reach storage before the call returns".
            ("sync", None) => out.push("--write-through".into()),
            // The default: `close` returns once the change is in the mount's log.
            ("async", None) => {}
            ("log_limit", Some(v)) => out.extend(["--log-limit".into(), v.into()]),
            ("prefer_server", Some(v)) => out.extend(["--prefer-server".into(), v.into()]),
            (k, None) if IGNORED.contains(&k) => {}
            _ => {
                return Err(format!(
                    "unknown codafs mount option {o:?} (known: cache_dir=, cache_size=, cache_checkpoint=, timeout=, log_limit=, prefer_server=, ro, sync, async)"
                ))
            }
        }
    }
    if out.iter().any(|a| a == "--read-only") && out.iter().any(|a| a == "--write-through") {
        return Err("codafs mount options ro and sync cannot be combined: a read-only mount writes nothing".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(a: &[&str]) -> Vec<OsString> {
        a.iter().map(OsString::from).collect()
    }

    #[test]
    fn translates_fstab_calls() {
        let got = translate(&v(&[
            "mount.codafs",
            "/etc/codafs/client.toml",
            "/coda",
            "-o",
            "rw,_netdev,cache_size=10G,timeout=3",
        ]))
        .unwrap();
        assert_eq!(
            got,
            v(&[
                "codafs",
                "mount",
                "/coda",
                "--config",
                "/etc/codafs/client.toml",
                "--cache-size",
                "10G",
                "--timeout",
                "3"
            ])
        );
        let sync = translate(&v(&[
            "mount.codafs",
            "/c",
            "/coda",
            "-o",
            "sync,log_limit=1G,cache_checkpoint=60,prefer_server=10.0.0.2:7000",
        ]))
        .unwrap();
        assert_eq!(
            sync[5..],
            v(&[
                "--write-through",
                "--log-limit",
                "1G",
                "--cache-checkpoint",
                "60",
                "--prefer-server",
                "10.0.0.2:7000"
            ])
        );
        assert!(translate(&v(&["mount.codafs", "/c", "/coda", "-o", "bogus=1"]))
            .unwrap_err()
            .contains("bogus"));
        assert!(translate(&v(&["mount.codafs", "/coda"])).unwrap_err().contains("usage"));
        let plain = translate(&v(&["mount.codafs", "/c", "/coda", "-o", "async,defaults"])).unwrap();
        assert_eq!(plain.len(), 5, "async is the default and adds no flag: {plain:?}");
        assert!(translate(&v(&["mount.codafs", "/c", "/coda", "-o", "ro,sync"]))
            .unwrap_err()
            .contains("ro and sync"));
        assert!(is_helper(&"/sbin/mount.codafs".into()) && !is_helper(&"codafs".into()));
    }
}
