//! Packs: the small files that came together (a directory's, brought with its listing) kept
//! in one cache file, `blobs/<2 hex>/<64 hex>.pack`, instead of one file each.
//!
//! Why: on a cold web node every small file cached as a file of its own cost an inode, and
//! creating inodes was most of the cost of caching a directory's small files: about 25 ms for
//! 90 files on ext4 (`find_inode_bit`, `recently_deleted`), against the 35 ms the servers took
//! to send them (docs/benchmarks.md, "First reads"). A pack is written once, and read back
//! with one open for all of its files, so a restarted node also reads fewer inodes and
//! directory blocks.
//!
//! A pack is one cache entry: one place in the order of use (reading any of its files marks
//! it used) and one size in the budget, and it is evicted whole. Its files came together and
//! are read together, so keeping them together costs little: at most [`MAX_BYTES`] of
//! neighbours stay cached beside a popular file.
//!
//! Format: [`MAGIC`], the number of files (u32, little-endian), then per file its content hash
//! and length (u32), then the files' bytes in that order. The pack's name is a blake3 hash
//! of all of that, derived with its own context ([`id_of`]), so it can never name a file's
//! content, and a torn pack (after a reboot) fails to match its name like a torn file.
use std::io::Read;
use std::path::Path;

use codafs_common::Hash;

/// First bytes of a pack, with its format's version.
pub const MAGIC: &[u8; 8] = b"CDFSPAK1";
/// Bytes of one file's line in a pack's header (and in a saved index): hash, then length.
pub const LINE: usize = 36;
/// Files one pack holds, at most.
pub const MAX_FILES: usize = 1024;
/// Bytes of files one pack holds, at most (the batch a listing brings is bounded below it).
pub const MAX_BYTES: u64 = 4 << 20;
/// The blake3 context of a pack's name.
const CONTEXT: &str = "codafs cache pack v1";

/// One file of a pack: its content hash, and where its bytes are in the pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    pub hash: Hash,
    pub offset: u64,
    pub len: u64,
}

/// Why bytes are not a pack.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("not a cache pack: {0}")]
    Malformed(&'static str),
    #[error("cache pack I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// A pack's name, from all of its bytes.
pub fn id_of(bytes: &[u8]) -> Hash {
    let mut h = blake3::Hasher::new_derive_key(CONTEXT);
    h.update(bytes);
    Hash::from(h.finalize())
}

/// The pack holding `files` (each already checked against its hash by the caller), and
/// its members; `None` when there are none or they are past the bounds.
pub fn encode(files: &[(Hash, &[u8])]) -> Option<(Vec<u8>, Vec<Member>)> {
    let total: u64 = files.iter().map(|(_, d)| d.len() as u64).sum();
    if files.is_empty() || files.len() > MAX_FILES || total > MAX_BYTES {
        return None;
    }
    let mut out = Vec::with_capacity(header_len(files.len()) + total as usize);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(files.len() as u32).to_le_bytes());
    for (hash, data) in files {
        push_line(&mut out, hash, data.len() as u64);
    }
    for (_, data) in files {
        out.extend_from_slice(data);
    }
    let members = layout(files.iter().map(|(h, d)| (*h, d.len() as u64)));
    Some((out, members))
}

/// Appends one file's line (hash, then length) of a pack's header, or of a saved index.
pub fn push_line(out: &mut Vec<u8>, hash: &Hash, len: u64) {
    out.extend_from_slice(&hash.0);
    out.extend_from_slice(&(len as u32).to_le_bytes());
}

/// The files a pack's header lines name (`lines`: whole lines, as [`push_line`] wrote them),
/// if they fill the pack's `pack_len` bytes exactly.
pub fn members_of(lines: &[u8], pack_len: u64) -> Option<Vec<Member>> {
    let members = layout(lines.chunks_exact(LINE).map(|line| {
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&line[..32]);
        (
            Hash(hash),
            u64::from(u32::from_le_bytes([line[32], line[33], line[34], line[35]])),
        )
    }));
    (members.last().map(|m| m.offset + m.len) == Some(pack_len)).then_some(members)
}

/// Where each file of a pack is, from its header's lines (hash and length, in order).
fn layout(lines: impl ExactSizeIterator<Item = (Hash, u64)>) -> Vec<Member> {
    let mut offset = header_len(lines.len()) as u64;
    lines
        .map(|(hash, len)| {
            let m = Member { hash, offset, len };
            offset += len;
            m
        })
        .collect()
}

fn header_len(files: usize) -> usize {
    MAGIC.len() + 4 + files * LINE
}

/// Reads the members a pack's header names, checking that they fit in its `file_len` bytes
/// (a pack cut short is refused here; one torn inside fails its name when verified).
pub fn read_members(path: &Path, file_len: u64) -> Result<Vec<Member>, PackError> {
    let mut f = std::fs::File::open(path)?;
    let mut head = [0u8; 12];
    f.read_exact(&mut head)?;
    if &head[..8] != MAGIC {
        return Err(PackError::Malformed("wrong magic"));
    }
    let n = u32::from_le_bytes([head[8], head[9], head[10], head[11]]) as usize;
    if n == 0 || n > MAX_FILES {
        return Err(PackError::Malformed("file count out of range"));
    }
    let mut lines = vec![0u8; n * LINE];
    f.read_exact(&mut lines)?;
    members_of(&lines, file_len).ok_or(PackError::Malformed("header does not match the file's length"))
}

/// Whether the pack file at `path` still matches its name `id` (after a reboot).
pub fn matches(path: &Path, id: &Hash) -> std::io::Result<bool> {
    let mut f = std::fs::File::open(path)?;
    let mut h = blake3::Hasher::new_derive_key(CONTEXT);
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(Hash::from(h.finalize()) == *id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pack_reads_back_its_members_and_its_name_covers_every_byte() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (b"first file".as_slice(), vec![7u8; 5000]);
        let files = [(Hash::of(a), a), (Hash::of(&b), b.as_slice())];
        let (bytes, members) = encode(&files).unwrap();
        let path = dir.path().join("x.pack");
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(read_members(&path, bytes.len() as u64).unwrap(), members);
        for (m, (h, d)) in members.iter().zip(files) {
            assert_eq!(m.hash, h);
            assert_eq!(&bytes[m.offset as usize..(m.offset + m.len) as usize], d);
        }
        let id = id_of(&bytes);
        assert_ne!(id, Hash::of(&bytes), "a pack's name is not a content hash");
        assert!(matches(&path, &id).unwrap());
        // One byte changed in the last file: the name no longer matches.
        let mut torn = bytes.clone();
        *torn.last_mut().unwrap() ^= 1;
        std::fs::write(&path, &torn).unwrap();
        assert!(!matches(&path, &id).unwrap());
    }

    #[test]
    fn cut_short_or_foreign_files_are_not_packs() {
        let dir = tempfile::tempdir().unwrap();
        let d = b"x".as_slice();
        let (bytes, _) = encode(&[(Hash::of(d), d)]).unwrap();
        let path = dir.path().join("x.pack");
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        assert!(read_members(&path, bytes.len() as u64 - 1).is_err(), "cut short");
        std::fs::write(&path, b"CDFSPAK1\0\0\0\0").unwrap();
        assert!(read_members(&path, 12).is_err(), "no files");
        std::fs::write(&path, b"not a pack at all").unwrap();
        assert!(read_members(&path, 19).is_err(), "wrong magic");
        assert!(encode(&[]).is_none());
    }
}
