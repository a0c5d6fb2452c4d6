//! One daemon per cache directory. `umount` returns as soon as the kernel lets go of the mount,
//! while the old daemon may still be closing its caches; a new `codafs mount` over the same
//! cache directory (`systemctl restart`, a remount from fstab, `umount && mount` in a script)
//! waits for it here, a bounded time, instead of failing on the metadata database's lock.
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// The lock file inside the cache directory; it holds the holder's pid.
const LOCK_FILE: &str = "daemon.lock";

/// Why the cache directory could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum CacheLockError {
    #[error("cache directory {dir} is in use by {holder} (still running after {waited:?}); stop it or use another --cache-dir")]
    Held {
        dir: String,
        holder: String,
        waited: Duration,
    },
    #[error("cache directory lock {path}: {source}")]
    Io { path: String, source: std::io::Error },
}

/// Holds the cache directory for this process until dropped (or the process exits): the lock
/// lives as long as this open file.
#[derive(Debug)]
pub struct CacheLock {
    _file: std::fs::File,
}

/// Takes the cache directory `dir`, waiting up to `wait` for a previous daemon to exit.
pub fn lock_cache_dir(dir: &Path, wait: Duration) -> Result<CacheLock, CacheLockError> {
    let path = dir.join(LOCK_FILE);
    let io = |source| CacheLockError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(io)?;
    let start = Instant::now();
    let mut told = false;
    loop {
        // SAFETY: flock on a descriptor this function owns; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            break;
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(io(err));
        }
        let holder = holder(&mut file);
        if start.elapsed() >= wait {
            return Err(CacheLockError::Held {
                dir: dir.display().to_string(),
                holder,
                waited: wait,
            });
        }
        if !told {
            tracing::info!(dir = %dir.display(), %holder, "waiting for the previous daemon to release the cache directory");
            told = true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    file.set_len(0).map_err(io)?;
    file.rewind().map_err(io)?;
    write!(file, "{}", std::process::id()).map_err(io)?;
    Ok(CacheLock { _file: file })
}

/// Who holds the lock, as its file says.
fn holder(file: &mut std::fs::File) -> String {
    let mut s = String::new();
    let _ = file.rewind();
    let _ = file.read_to_string(&mut s);
    match s.trim().parse::<u32>() {
        Ok(pid) => format!("codafs daemon pid {pid}"),
        Err(_) => "another codafs daemon".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_waits_then_says_who_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        let first = lock_cache_dir(dir.path(), Duration::ZERO).unwrap();
        // flock locks belong to the open file: a second open in this process conflicts too.
        let e = lock_cache_dir(dir.path(), Duration::from_millis(120)).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains(&format!("pid {}", std::process::id())), "{msg}");
        drop(first);
        lock_cache_dir(dir.path(), Duration::ZERO).unwrap();
    }
}
