//! Human-readable formatting shared by the commands.

/// Formats a byte count with binary units.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// "unlimited" for a zero limit.
pub fn limit(n: u64, f: impl Fn(u64) -> String) -> String {
    if n == 0 {
        "unlimited".into()
    } else {
        f(n)
    }
}
