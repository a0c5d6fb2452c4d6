//! Disk and hashing work that may cover a whole file, kept from stalling the async workers.

/// Work on less than this many bytes runs inline (cheaper than handing the worker's tasks off).
const BLOCKING_MIN: u64 = 256 << 10;

/// Runs disk or hashing work that may cover a whole file (up to 1 GiB) without stalling the
/// mount's async workers: on its multi-threaded runtime, tokio first hands this worker's other
/// tasks to another thread (`block_in_place`; unlike `spawn_blocking` it may borrow, so a shadow
/// is still read under its own lock, as one snapshot). Small work, and single-threaded runtimes
/// (unit tests), run inline.
pub fn blocking<T>(len: u64, f: impl FnOnce() -> T) -> T {
    let multi = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if multi && len >= BLOCKING_MIN {
        tokio::task::block_in_place(f)
    } else {
        f()
    }
}

/// Lowers the calling thread's CPU priority (nice 10), for background work that must yield to
/// requests on a busy machine: the cache sweep, copies of sent contents into the cache.
pub fn lower_priority() {
    // SAFETY: setpriority on the calling thread (who = 0 with PRIO_PROCESS names the calling
    // thread on Linux); a refusal only leaves the priority as it was.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 10) };
}
