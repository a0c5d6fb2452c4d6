//! Files at rest: what servers and mounts keep on disk is readable by its owner only.
//!
//! A server directory holds the token-signing keys (in the RocksDB tables and `snapshot.bin`),
//! TLS private keys and credentials; a mount's cache holds the contents of private volumes and
//! the tokens users handed over. Two measures keep them private whatever umask the process was
//! started with: [`private_umask`] makes everything created from then on 0700/0600 (RocksDB,
//! for one, creates its files 0644), and [`restrict_tree`] takes group and other permissions
//! off what an older version left behind.
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Mode of every directory [`restrict_tree`] leaves behind.
pub const PRIVATE_DIR_MODE: u32 = 0o700;

/// Sets the process umask to 077: files and directories created afterwards have no group or
/// other permissions. Process-wide, so call it at the start of a command that stores data.
pub fn private_umask() {
    // SAFETY: umask only changes the calling process's file mode creation mask.
    unsafe {
        libc::umask(0o077);
    }
}

/// Makes `root` and every directory under it 0700 and takes the group and other bits off every
/// file (0644 becomes 0600). Symbolic links are not followed. A missing `root` is not an error.
/// Returns how many entries were changed. Every entry is visited once (an `lstat` each), which
/// is of the order of what opening a blob store or cache costs anyway.
pub fn restrict_tree(root: &Path) -> std::io::Result<u64> {
    let mut changed = 0;
    let meta = match std::fs::symlink_metadata(root) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    changed += restrict(root, &meta)?;
    if !meta.is_dir() {
        return Ok(changed);
    }
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let path = entry.path();
            // Entries can vanish while we walk (temp files of a running process): skip them.
            let meta = match std::fs::symlink_metadata(&path) {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            changed += restrict(&path, &meta)?;
            if meta.is_dir() {
                dirs.push(path);
            }
        }
    }
    Ok(changed)
}

/// The marker [`restrict_tree_once`] leaves in a directory it has restricted.
pub const RESTRICTED_MARKER: &str = "perms-restricted";

/// [`restrict_tree`], once per directory. After a whole pass, and only if this process's umask
/// keeps group and other bits off everything it creates from then on, it leaves
/// [`RESTRICTED_MARKER`] in `root`; later calls restrict `root` itself only. Why: the walk
/// `lstat`s every entry, and a mount's cache of a million files after a reboot made that
/// seconds of disk reads at every start.
pub fn restrict_tree_once(root: &Path) -> std::io::Result<u64> {
    restrict_tree_marking(root, umask() & 0o077 == 0o077)
}

/// [`restrict_tree_once`], leaving the marker after a walk if `private` (the umask's verdict).
fn restrict_tree_marking(root: &Path, private: bool) -> std::io::Result<u64> {
    let marker = root.join(RESTRICTED_MARKER);
    if marker.exists() {
        let meta = std::fs::symlink_metadata(root)?;
        return restrict(root, &meta);
    }
    let changed = restrict_tree(root)?;
    if root.is_dir() && private {
        std::fs::write(&marker, b"")?;
        restrict(&marker, &std::fs::symlink_metadata(&marker)?)?;
    }
    Ok(changed)
}

/// This process's umask (from `/proc/self/status`, which reads it without changing it); 0 if
/// the kernel does not tell.
fn umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("Umask:"))?;
            u32::from_str_radix(line.split_whitespace().nth(1)?, 8).ok()
        })
        .unwrap_or(0)
}

/// Restricts one entry; 1 if its mode changed.
fn restrict(path: &Path, meta: &std::fs::Metadata) -> std::io::Result<u64> {
    let ft = meta.file_type();
    if ft.is_symlink() {
        return Ok(0);
    }
    let mode = meta.permissions().mode() & 0o7777;
    let want = if ft.is_dir() { PRIVATE_DIR_MODE } else { mode & !0o077 };
    if mode == want {
        return Ok(0);
    }
    match std::fs::set_permissions(path, std::fs::Permissions::from_mode(want)) {
        Ok(()) => Ok(1),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn restrict_tree_makes_dirs_0700_and_files_owner_only() {
        let t = tempfile_dir();
        let root = t.join("srv");
        std::fs::create_dir_all(root.join("db/sub")).unwrap();
        std::fs::write(root.join("db/sub/000001.sst"), b"x").unwrap();
        std::fs::write(root.join("snapshot.bin"), b"x").unwrap();
        std::fs::write(root.join("tool"), b"x").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("link")).unwrap();
        for (p, m) in [
            (root.clone(), 0o755),
            (root.join("db"), 0o775),
            (root.join("db/sub"), 0o711),
            (root.join("db/sub/000001.sst"), 0o644),
            (root.join("snapshot.bin"), 0o666),
            (root.join("tool"), 0o755),
        ] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(m)).unwrap();
        }
        let passwd = mode(Path::new("/etc/passwd"));
        assert_eq!(restrict_tree(&root).unwrap(), 6);
        assert_eq!(mode(&root), 0o700);
        assert_eq!(mode(&root.join("db")), 0o700);
        assert_eq!(mode(&root.join("db/sub")), 0o700);
        assert_eq!(mode(&root.join("db/sub/000001.sst")), 0o600);
        assert_eq!(mode(&root.join("snapshot.bin")), 0o600);
        assert_eq!(mode(&root.join("tool")), 0o700);
        assert_eq!(mode(Path::new("/etc/passwd")), passwd, "links are not followed");
        assert_eq!(restrict_tree(&root).unwrap(), 0, "a second pass changes nothing");
        assert_eq!(restrict_tree(&t.join("missing")).unwrap(), 0);
        std::fs::remove_dir_all(&t).unwrap();
    }

    #[test]
    fn restrict_tree_once_walks_until_a_pass_under_a_private_umask_leaves_its_marker() {
        let t = tempfile_dir();
        let root = t.join("cache");
        std::fs::create_dir_all(root.join("blobs")).unwrap();
        let old = root.join("blobs/old");
        std::fs::write(&old, b"x").unwrap();
        let loosen = |p: &Path, m: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
        loosen(&old, 0o644);
        loosen(&root, 0o755);
        loosen(&root.join("blobs"), 0o755);
        let marker = root.join(RESTRICTED_MARKER);
        // A umask that lets group or other bits through: no marker, every call walks.
        assert_eq!(
            restrict_tree_marking(&root, false).unwrap(),
            3,
            "root, blobs and the file"
        );
        assert!(!marker.exists());
        loosen(&old, 0o644);
        assert_eq!(restrict_tree_marking(&root, false).unwrap(), 1);
        // A private umask: the walk leaves the marker (itself private)...
        loosen(&old, 0o644);
        assert_eq!(restrict_tree_marking(&root, true).unwrap(), 1);
        assert_eq!(mode(&marker), 0o600);
        // ...and later calls restrict the root only.
        loosen(&old, 0o644);
        loosen(&root, 0o755);
        assert_eq!(restrict_tree_marking(&root, true).unwrap(), 1);
        assert_eq!(mode(&root), 0o700);
        assert_eq!(mode(&old), 0o644, "not visited again");
        std::fs::remove_dir_all(&t).unwrap();
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("codafs-perms-{}-{}", std::process::id(), rand::random::<u64>()));
        std::fs::create_dir_all(&p).unwrap();
        p
    }
}
