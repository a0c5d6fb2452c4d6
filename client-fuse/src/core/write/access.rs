//! Read and search permission checks on writable mounts.
use super::*;

/// Read and search permission on writable mounts. A `--read-only` mount lets the kernel check
/// modes (`default_permissions`); a writable one cannot, because changes are authorized by token
/// and volume rights (as in AFS), not by mode bits, so the daemon checks reads itself.
impl<R: Remote> Core<R> {
    /// Whether `c` may read (`R_OK`) and/or search or execute (`X_OK`) a node with these
    /// attributes; on a public volume everyone may read files and search directories. Only
    /// the caller's primary group is known to the daemon.
    pub fn may_access(c: Caller, a: &NodeAttr, mask: i32, public: bool) -> bool {
        let want = (if mask & libc::R_OK != 0 { 4 } else { 0 }) | (if mask & libc::X_OK != 0 { 1 } else { 0 });
        let exec_file = want & 1 != 0 && a.kind != NodeKind::Dir;
        if public && !exec_file {
            return true;
        }
        if c.uid == 0 {
            // Root reads everything; it executes a file only if someone may.
            return want & 1 == 0 || a.kind == NodeKind::Dir || a.perm & 0o111 != 0;
        }
        let bits = if a.uid == c.uid {
            (a.perm >> 6) & 7
        } else if a.gid == c.gid {
            (a.perm >> 3) & 7
        } else {
            a.perm & 7
        };
        bits & want == want
    }

    /// Whether everyone may read the volume holding `ino` (`/coda` itself included).
    pub fn is_public(&self, ino: u64) -> bool {
        ino == ROOT_INO || self.volume_of(ino).is_none_or(|v| v.public_read)
    }

    /// `access(2)`: `W_OK` asks whether the caller's token may change the volume.
    pub async fn access(&self, c: Caller, ino: u64, mask: i32) -> Result<(), FsError> {
        let a = self.getattr(ino).await?;
        if mask & libc::W_OK != 0 {
            self.write_ctx(c.uid, ino)?;
        }
        if Self::may_access(c, &a, mask, self.is_public(ino)) {
            Ok(())
        } else {
            Err(FsError::Denied("mode bits".into()))
        }
    }

    /// Checks `mask` on node `ino` for `c`, and on a private volume search permission on every
    /// directory above it (the kernel's cached path walk does not ask us).
    pub async fn check_access(&self, c: Caller, ino: u64, mask: i32) -> Result<(), FsError> {
        let a = self.getattr(ino).await?;
        let public = self.is_public(ino);
        if !Self::may_access(c, &a, mask, public) {
            return Err(FsError::Denied("mode bits".into()));
        }
        if public || c.uid == 0 {
            return Ok(());
        }
        let mut cur = ino;
        for _ in 0..codafs_common::names::MAX_PATH_DEPTH {
            let raw = match self.attr(cur).await {
                Ok(r) => r,
                // Unlinked while open: no path leads to it any more.
                Err(FsError::NotFound) => return Ok(()),
                Err(e) => return Err(e),
            };
            if raw.parent == cur || raw.parent == 0 {
                return Ok(());
            }
            let p = self.getattr(raw.parent).await?;
            if !Self::may_access(c, &p, libc::X_OK, false) {
                return Err(FsError::Denied("search permission on a directory above".into()));
            }
            cur = raw.parent;
        }
        Ok(())
    }
}
