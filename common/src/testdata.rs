//! Deterministic content for tests and benchmarks: bytes that never repeat a region (so
//! content-defined chunking cuts them as it would real files, and no two chunks are equal),
//! the same for the same seed on every run.

/// `len` bytes of seeded noise (xorshift64).
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut out = vec![0u8; len];
    fill_noise(seed, &mut out);
    out
}

/// Fills `out` with seeded noise, 8 bytes per step: fast enough for gigabytes.
pub fn fill_noise(seed: u64, out: &mut [u8]) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for word in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        word.copy_from_slice(&x.to_le_bytes()[..word.len()]);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn seeds_give_different_repeatable_bytes() {
        assert_eq!(super::noise(100, 1), super::noise(100, 1));
        assert_ne!(super::noise(100, 1), super::noise(100, 2));
        assert_eq!(super::noise(13, 5).len(), 13);
    }
}
