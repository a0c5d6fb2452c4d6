//! Content hashes: blake3, 32 bytes, shown as lowercase hex. Blobs are named by their hash, so
//! any copy whose hash verifies is a correct copy.
use std::fmt;

/// A blake3 content hash.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct Hash(pub [u8; 32]);

/// A byte string that is not a 32-byte hash.
#[derive(Debug, thiserror::Error)]
#[error("a content hash is 32 bytes, got {0}")]
pub struct BadHash(pub usize);

impl Hash {
    /// Hash of `data`.
    pub fn of(data: &[u8]) -> Self {
        Hash(*blake3::hash(data).as_bytes())
    }

    /// Parses 32 raw bytes.
    pub fn from_slice(b: &[u8]) -> Result<Self, BadHash> {
        <[u8; 32]>::try_from(b).map(Hash).map_err(|_| BadHash(b.len()))
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Result<Self, BadHash> {
        let v = hex::decode(s).map_err(|_| BadHash(s.len() / 2))?;
        Self::from_slice(&v)
    }

    /// Lowercase hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl From<blake3::Hash> for Hash {
    fn from(h: blake3::Hash) -> Self {
        Hash(*h.as_bytes())
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({})", &self.to_hex()[..12])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_errors() {
        let h = Hash::of(b"hello");
        assert_eq!(Hash::from_hex(&h.to_hex()).unwrap(), h);
        assert!(Hash::from_slice(&[0; 31]).is_err());
        assert!(Hash::from_hex("zz").is_err());
    }
}
