//! Free loopback ports for local clusters (`codafs demo`, tests, benches).
//!
//! A port from `bind(127.0.0.1:0)` comes from the kernel's ephemeral range, the same range
//! outgoing connections take their local ports from: between choosing it and the server
//! binding it, a connection (to any server of the machine) may take it, and the server then
//! fails to start. Ports below the ephemeral range are never given to outgoing connections, so
//! one free when checked stays free unless another listener takes it.
use std::net::TcpListener;

/// Lowest port tried (below it sit well-known and registered services).
const LOW: u16 = 10_000;

/// The first port of the kernel's ephemeral range (32768 when it cannot be read).
fn ephemeral_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// Whether this process has not handed out `port` before (two servers started at once must
/// not be given one port between its check and their binds).
fn first_time(port: u16) -> bool {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    if given.contains(&port) {
        return false;
    }
    // Bounded: the oldest go first (long since bound, or released).
    if given.len() >= 4096 {
        given.remove(0);
    }
    given.push(port);
    true
}

/// A loopback port free now, below the ephemeral range if there is room there (otherwise one
/// the kernel picks).
pub fn free_loopback_port() -> std::io::Result<u16> {
    let high = ephemeral_start();
    if high > LOW + 1000 {
        let span = u32::from(high - LOW);
        // Spread callers (processes, threads, calls) over the range.
        let mut x = (std::process::id() as u64) << 32
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
        for _ in 0..200 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let port = LOW + (x % u64::from(span)) as u16;
            if TcpListener::bind(("127.0.0.1", port)).is_ok() && first_time(port) {
                return Ok(port);
            }
        }
    }
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_free_and_below_the_ephemeral_range() {
        let high = ephemeral_start();
        for _ in 0..20 {
            let p = free_loopback_port().unwrap();
            assert!(TcpListener::bind(("127.0.0.1", p)).is_ok(), "{p} is free");
            if high > LOW + 1000 {
                assert!((LOW..high).contains(&p), "{p} below {high}");
            }
        }
    }
}
