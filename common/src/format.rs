//! On-disk format versions: each directory codafs keeps state in (a server's `--dir`, a mount's
//! cache directory) carries a `FORMAT` file naming what it holds and in which version. A build
//! checks it at start and refuses, with the way forward, a directory written in a format it
//! does not read, instead of misreading it.
//!
//! Directories written before formats were versioned have no file. They hold version 1 of
//! their format, which every build so far reads, so they are stamped with the current version
//! and accepted.
//!
//! A build may also read some older versions as they are (a server reads format 1's one file per
//! blob beside format 2's packed small blobs): it upgrades such a directory by stamping it with
//! its own version, so that older builds refuse it from then on instead of misreading it.
use std::path::Path;

/// The file holding a directory's format.
pub const FORMAT_FILE: &str = "FORMAT";

/// Why a directory cannot be used by this build.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("{dir}: {what} format {found}, but this build reads format {reads}. {advice}")]
    Unsupported {
        dir: String,
        what: String,
        found: u32,
        reads: u32,
        advice: String,
    },
    #[error("{dir}/FORMAT: {0}", dir = .1)]
    Unreadable(String, String),
    #[error("{dir}/FORMAT holds {found:?}, not a {what} directory's format")]
    Foreign { dir: String, what: String, found: String },
    #[error("writing {0}/FORMAT: {1}")]
    Write(String, std::io::Error),
}

/// Checks that `dir` holds `what` data in format `reads`, stamping a directory that has no
/// `FORMAT` yet (a new one, or one from before versions). `what` is a short name such as
/// `codafs-server`.
pub fn check_or_stamp(dir: &Path, what: &str, reads: u32) -> Result<(), FormatError> {
    check_or_upgrade(dir, what, reads, &[]).map(drop)
}

/// Like [`check_or_stamp`], and a directory in one of the `older` versions, which this build
/// reads as they are, is stamped `reads`: older builds refuse it from then on. Returns the
/// version it was upgraded from, if it was.
pub fn check_or_upgrade(dir: &Path, what: &str, reads: u32, older: &[u32]) -> Result<Option<u32>, FormatError> {
    let path = dir.join(FORMAT_FILE);
    let shown = dir.display().to_string();
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let mut parts = text.split_whitespace();
            let (name, version) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            if name != what {
                return Err(FormatError::Foreign {
                    dir: shown,
                    what: what.to_string(),
                    found: text.trim().to_string(),
                });
            }
            let found: u32 = version
                .parse()
                .map_err(|_| FormatError::Unreadable(format!("no version in {:?}", text.trim()), shown.clone()))?;
            if found == reads {
                return Ok(None);
            }
            if older.contains(&found) {
                return stamp(dir, what, reads).map(|()| Some(found));
            }
            let advice = if found > reads {
                "A newer codafs wrote it: run that version (or newer) here; docs/OPERATIONS.md, Upgrades."
            } else {
                "An older codafs wrote it: upgrade it step by step as docs/OPERATIONS.md (Upgrades) says."
            };
            Err(FormatError::Unsupported {
                dir: shown,
                what: what.to_string(),
                found,
                reads,
                advice: advice.to_string(),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => stamp(dir, what, reads).map(|()| None),
        Err(e) => Err(FormatError::Unreadable(e.to_string(), shown)),
    }
}

/// Writes `dir`'s `FORMAT` file (a temp file renamed over it, then the directory synced).
fn stamp(dir: &Path, what: &str, version: u32) -> Result<(), FormatError> {
    let tmp = dir.join(format!("{FORMAT_FILE}.tmp"));
    std::fs::write(&tmp, format!("{what} {version}\n"))
        .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
        .and_then(|()| std::fs::rename(&tmp, dir.join(FORMAT_FILE)))
        .and_then(|()| std::fs::File::open(dir)?.sync_all())
        .map_err(|e| FormatError::Write(dir.display().to_string(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_directory_is_stamped_and_a_foreign_version_refused_with_the_way_forward() {
        let dir = tempfile::tempdir().unwrap();
        check_or_stamp(dir.path(), "codafs-server", 1).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join(FORMAT_FILE)).unwrap(),
            "codafs-server 1\n"
        );
        check_or_stamp(dir.path(), "codafs-server", 1).unwrap();

        std::fs::write(dir.path().join(FORMAT_FILE), "codafs-server 2\n").unwrap();
        let e = check_or_stamp(dir.path(), "codafs-server", 1).unwrap_err().to_string();
        assert!(
            e.contains("format 2") && e.contains("reads format 1") && e.contains("newer"),
            "{e}"
        );
        let e = check_or_stamp(dir.path(), "codafs-server", 3).unwrap_err().to_string();
        assert!(e.contains("older"), "{e}");

        std::fs::write(dir.path().join(FORMAT_FILE), "codafs-cache 1\n").unwrap();
        let e = check_or_stamp(dir.path(), "codafs-server", 1).unwrap_err().to_string();
        assert!(e.contains("not a codafs-server directory"), "{e}");
        std::fs::write(dir.path().join(FORMAT_FILE), "codafs-server x\n").unwrap();
        assert!(check_or_stamp(dir.path(), "codafs-server", 1).is_err());
    }

    #[test]
    fn an_older_version_this_build_reads_is_upgraded_and_others_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let read = |d: &Path| std::fs::read_to_string(d.join(FORMAT_FILE)).unwrap();
        std::fs::write(dir.path().join(FORMAT_FILE), "codafs-server 1\n").unwrap();
        assert_eq!(check_or_upgrade(dir.path(), "codafs-server", 2, &[1]).unwrap(), Some(1));
        assert_eq!(read(dir.path()), "codafs-server 2\n");
        assert_eq!(check_or_upgrade(dir.path(), "codafs-server", 2, &[1]).unwrap(), None);
        // An older build now refuses it, saying a newer one wrote it.
        let e = check_or_stamp(dir.path(), "codafs-server", 1).unwrap_err().to_string();
        assert!(e.contains("newer"), "{e}");
        // A version not listed as readable is refused, and left as it was.
        std::fs::write(dir.path().join(FORMAT_FILE), "codafs-server 0\n").unwrap();
        assert!(check_or_upgrade(dir.path(), "codafs-server", 2, &[1]).is_err());
        assert_eq!(read(dir.path()), "codafs-server 0\n");
        // A new directory is stamped with the current version.
        let new = tempfile::tempdir().unwrap();
        assert_eq!(check_or_upgrade(new.path(), "codafs-server", 2, &[1]).unwrap(), None);
        assert_eq!(read(new.path()), "codafs-server 2\n");
    }
}
