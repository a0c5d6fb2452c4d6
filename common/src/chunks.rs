//! Chunked content: how a large file's bytes are stored and moved.
//!
//! A file's content is named by one 32-byte hash (`Attr.hash`). Up to [`CHUNK_THRESHOLD`] bytes,
//! that is the blake3 of the content, stored as one blob. Above it, the content is cut into
//! content-defined chunks (FastCDC 2020: boundaries follow the bytes, so an edit moves only the
//! chunks it touches), each chunk is a blob named by its own blake3, and the file's hash names a
//! **manifest** blob listing the chunks in order. The rule depends only on the size, so a server
//! and every client agree on what a file's hash names without a separate flag.
//!
//! Why: a small change to a large file then stores and sends only the changed chunks, identical
//! chunks in several files or versions are stored once, a reader verifies each chunk as it
//! arrives, and no single blob (or message, or buffer) grows with the file.
use std::io::Read;

use crate::Hash;

/// Content larger than this is chunked; content of this size or less is one blob.
pub const CHUNK_THRESHOLD: u64 = 4 << 20;
/// The smallest chunk FastCDC cuts (except a file's last chunk).
pub const CHUNK_MIN: u32 = 256 << 10;
/// The average chunk size FastCDC aims at.
pub const CHUNK_AVG: u32 = 1 << 20;
/// The largest chunk: no chunk blob, and so no read or write buffer for one, is larger.
pub const CHUNK_MAX: u32 = 4 << 20;
/// The largest file content: 1 TiB. Its manifest stays within [`MAX_MANIFEST_LEN`].
pub const MAX_CONTENT: u64 = 1 << 40;
/// The bytes of one manifest entry: the chunk's hash and its length.
const ENTRY_LEN: usize = 32 + 4;
/// Bytes before the entries: magic, content size, entry count.
const HEADER_LEN: usize = 8 + 8 + 8;
const MAGIC: &[u8; 8] = b"CODAFSM1";
/// The largest manifest: every chunk of a [`MAX_CONTENT`] file at the minimum size.
pub const MAX_MANIFEST_LEN: u64 = HEADER_LEN as u64 + (MAX_CONTENT / CHUNK_MIN as u64 + 1) * ENTRY_LEN as u64;

/// Whether content of `size` bytes is stored as a manifest of chunks.
pub fn is_chunked(size: u64) -> bool {
    size > CHUNK_THRESHOLD
}

/// One chunk of a manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChunkRef {
    pub hash: Hash,
    pub len: u32,
}

/// A chunked file's list of chunks, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Manifest {
    pub chunks: Vec<ChunkRef>,
}

/// Why bytes are not a valid manifest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("not a chunk manifest (bad magic or too short)")]
    NotManifest,
    #[error("chunk manifest is malformed: {0}")]
    Malformed(String),
}

impl Manifest {
    /// The content size: the sum of the chunk lengths.
    pub fn size(&self) -> u64 {
        self.chunks.iter().map(|c| c.len as u64).sum()
    }

    /// Each chunk with the content offset it starts at.
    pub fn with_offsets(&self) -> impl Iterator<Item = (u64, &ChunkRef)> {
        self.chunks.iter().scan(0u64, |off, c| {
            let at = *off;
            *off += c.len as u64;
            Some((at, c))
        })
    }

    /// The stored form (the manifest blob's bytes).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.chunks.len() * ENTRY_LEN);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.size().to_le_bytes());
        out.extend_from_slice(&(self.chunks.len() as u64).to_le_bytes());
        for c in &self.chunks {
            out.extend_from_slice(&c.hash.0);
            out.extend_from_slice(&c.len.to_le_bytes());
        }
        out
    }

    /// Whether the chunks are cut as the chunker cuts them: none under [`CHUNK_MIN`] but the
    /// last. Tiny chunks would multiply the blobs (and the work of GC, repair and scrub) a file
    /// of a given size costs, so servers refuse to commit such a manifest.
    pub fn check_cut(&self) -> Result<(), ManifestError> {
        let n = self.chunks.len();
        match self.chunks[..n.saturating_sub(1)]
            .iter()
            .position(|c| c.len < CHUNK_MIN)
        {
            Some(i) => Err(ManifestError::Malformed(format!(
                "chunk {i} of {n} is {} bytes; only the last may be under {CHUNK_MIN}",
                self.chunks[i].len
            ))),
            None => Ok(()),
        }
    }

    /// The manifest's blob hash: what a chunked file's `hash` names.
    pub fn hash(&self) -> Hash {
        Hash::of(&self.encode())
    }

    /// Parses and checks a manifest: every chunk is 1..=[`CHUNK_MAX`] bytes, the lengths add
    /// up to the recorded size, and that size is one that is chunked at all. (New manifests are
    /// also held to [`Manifest::check_cut`] when committed; stored ones are read as they are.)
    pub fn decode(b: &[u8]) -> Result<Manifest, ManifestError> {
        if b.len() < HEADER_LEN || &b[..8] != MAGIC {
            return Err(ManifestError::NotManifest);
        }
        let word = |at: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[at..at + 8]);
            u64::from_le_bytes(w)
        };
        let (size, count) = (word(8), word(16));
        let body = &b[HEADER_LEN..];
        if !body.len().is_multiple_of(ENTRY_LEN) || (body.len() / ENTRY_LEN) as u64 != count {
            return Err(ManifestError::Malformed(format!(
                "{count} entries declared, {} bytes of entries",
                body.len()
            )));
        }
        let mut chunks = Vec::with_capacity(count as usize);
        let mut total = 0u64;
        for e in body.chunks_exact(ENTRY_LEN) {
            let mut h = [0u8; 32];
            h.copy_from_slice(&e[..32]);
            let mut l = [0u8; 4];
            l.copy_from_slice(&e[32..]);
            let len = u32::from_le_bytes(l);
            if len == 0 || len > CHUNK_MAX {
                return Err(ManifestError::Malformed(format!("a chunk of {len} bytes")));
            }
            total += len as u64;
            chunks.push(ChunkRef { hash: Hash(h), len });
        }
        if total != size {
            return Err(ManifestError::Malformed(format!(
                "chunks add up to {total} bytes, the manifest says {size}"
            )));
        }
        if !is_chunked(size) || size > MAX_CONTENT {
            return Err(ManifestError::Malformed(format!(
                "content of {size} bytes is not stored in chunks"
            )));
        }
        Ok(Manifest { chunks })
    }
}

/// Cuts `source` into chunks, calling `each(offset, chunk, bytes)` for every chunk in order,
/// and returns the manifest. Memory stays at a few chunks whatever the size.
pub fn chunk_reader<R: Read>(
    source: R,
    mut each: impl FnMut(u64, ChunkRef, &[u8]) -> std::io::Result<()>,
) -> std::io::Result<Manifest> {
    let mut manifest = Manifest::default();
    for c in fastcdc::v2020::StreamCDC::new(source, CHUNK_MIN, CHUNK_AVG, CHUNK_MAX) {
        let c = c.map_err(std::io::Error::from)?;
        let r = ChunkRef {
            hash: Hash::of(&c.data),
            len: c.length as u32,
        };
        each(c.offset, r, &c.data)?;
        manifest.chunks.push(r);
    }
    Ok(manifest)
}

/// What names content of `size` bytes read from `source`: its blake3 when it is one blob, or
/// its manifest's hash (and the manifest) when it is chunked. The reader must give exactly
/// `size` bytes.
pub fn content_id<R: Read>(mut source: R, size: u64) -> std::io::Result<(Hash, Option<Manifest>)> {
    if !is_chunked(size) {
        let mut h = blake3::Hasher::new();
        let n = std::io::copy(&mut source, &mut h)?;
        if n != size {
            return Err(short(n, size));
        }
        return Ok((h.finalize().into(), None));
    }
    let m = chunk_reader(source, |_, _, _| Ok(()))?;
    if m.size() != size {
        return Err(short(m.size(), size));
    }
    Ok((m.hash(), Some(m)))
}

/// The content id of bytes in memory (see [`content_id`]).
pub fn content_id_of(data: &[u8]) -> Hash {
    match content_id(data, data.len() as u64) {
        Ok((h, _)) => h,
        // Reading a slice cannot fail, and its length is the size given.
        Err(_) => Hash::of(data),
    }
}

fn short(got: u64, want: u64) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        format!("content changed while read: {got} bytes, expected {want}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdata::noise;

    #[test]
    fn small_content_is_its_blake3_and_large_content_its_manifest() {
        let small = noise(CHUNK_THRESHOLD as usize, 1);
        assert_eq!(content_id_of(&small), Hash::of(&small));
        let large = noise(CHUNK_THRESHOLD as usize + 1, 2);
        let (h, m) = content_id(&large[..], large.len() as u64).unwrap();
        let m = m.unwrap();
        assert_eq!(h, m.hash());
        assert_ne!(h, Hash::of(&large));
        assert_eq!(m.size(), large.len() as u64);
        for (off, c) in m.with_offsets() {
            let bytes = &large[off as usize..off as usize + c.len as usize];
            assert_eq!(Hash::of(bytes), c.hash);
            assert!(c.len <= CHUNK_MAX);
        }
        assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
    }

    /// What the chunker cuts, the manifest check takes: every chunk but the last is at least
    /// CHUNK_MIN, for noise, for runs of one byte (cut at CHUNK_MAX) and for a size that
    /// leaves a short tail.
    #[test]
    fn the_chunker_cuts_only_the_last_chunk_short() {
        let mut cases = vec![noise(9 << 20, 8), vec![0u8; (17 << 20) + 5]];
        let mut mixed = noise(6 << 20, 9);
        mixed.extend(std::iter::repeat_n(7u8, (5 << 20) + 1));
        cases.push(mixed);
        for data in cases {
            let m = content_id(&data[..], data.len() as u64).unwrap().1.unwrap();
            let (last, rest) = m.chunks.split_last().unwrap();
            assert!(rest.iter().all(|c| c.len >= CHUNK_MIN), "a short chunk before the end");
            assert!(last.len >= 1);
            assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
            m.check_cut().unwrap();
        }
    }

    #[test]
    fn an_edit_in_the_middle_changes_only_the_chunks_around_it() {
        let mut data = noise(40 << 20, 3);
        let (_, before) = content_id(&data[..], data.len() as u64).unwrap();
        let before = before.unwrap();
        data[20 << 20..(20 << 20) + 65536].copy_from_slice(&noise(65536, 4));
        let (_, after) = content_id(&data[..], data.len() as u64).unwrap();
        let after = after.unwrap();
        let old: std::collections::HashSet<_> = before.chunks.iter().map(|c| c.hash).collect();
        let new_bytes: u64 = after
            .chunks
            .iter()
            .filter(|c| !old.contains(&c.hash))
            .map(|c| c.len as u64)
            .sum();
        assert!(new_bytes > 0, "the edit must change some chunk");
        assert!(new_bytes <= 2 * CHUNK_MAX as u64, "{new_bytes} bytes of new chunks");
    }

    #[test]
    fn malformed_manifests_are_refused() {
        assert_eq!(Manifest::decode(b"short"), Err(ManifestError::NotManifest));
        assert_eq!(Manifest::decode(&noise(100, 5)), Err(ManifestError::NotManifest));
        let m = content_id(&noise(9 << 20, 6)[..], 9 << 20).unwrap().1.unwrap();
        let good = m.encode();
        // Truncated entries, a wrong size, a zero-length chunk, a small file "chunked".
        assert!(Manifest::decode(&good[..good.len() - 1]).is_err());
        let mut wrong_size = good.clone();
        wrong_size[8] ^= 1;
        assert!(Manifest::decode(&wrong_size).is_err());
        let mut zero = good.clone();
        zero[HEADER_LEN + 32..HEADER_LEN + 36].copy_from_slice(&0u32.to_le_bytes());
        assert!(Manifest::decode(&zero).is_err());
        let tiny = Manifest {
            chunks: vec![ChunkRef {
                hash: Hash::of(b"x"),
                len: 1,
            }],
        };
        assert!(Manifest::decode(&tiny.encode()).is_err());
        // Many tiny chunks adding up to a chunked size: read, but not to be committed.
        let splinters = Manifest {
            chunks: (0..(CHUNK_THRESHOLD / 1000 + 1) as u32)
                .map(|i| ChunkRef {
                    hash: Hash::of(&i.to_le_bytes()),
                    len: 1000,
                })
                .collect(),
        };
        let read = Manifest::decode(&splinters.encode()).expect("a stored one is still read");
        let e = read.check_cut().unwrap_err();
        assert!(e.to_string().contains("only the last may be under"), "{e}");
    }

    #[test]
    fn a_reader_shorter_than_the_size_is_an_error() {
        let data = noise(5 << 20, 7);
        assert!(content_id(&data[..], 6 << 20).is_err());
        assert!(content_id(&data[..100], 200).is_err());
    }
}
