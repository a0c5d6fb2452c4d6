//! The backup archive format: one stream, written and read front to back, so it can be piped
//! through compression or to remote storage.
//!
//! ```text
//! "CODAFSBK" u32-LE format version
//! frame*    each: u32-LE length, bincode(Frame); a Content frame is followed by its raw bytes
//! ```
//!
//! Frames come in this order: one `Header`; `Node`s in pre-order (a directory before what it
//! holds), each file's `Content` (once per distinct content, anywhere before the `End`); one
//! `End`. Every content is named by its hash (blake3, or its chunk manifest's hash for large
//! files) and checked against it when read back. The `End` frame carries the blake3 of every
//! byte before it, so a truncated or damaged archive is refused as a whole.
use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

/// Magic bytes opening every archive.
pub const MAGIC: &[u8; 8] = b"CODAFSBK";
/// The archive format this build writes and reads.
pub const FORMAT: u32 = 1;
/// Largest frame (metadata only; contents follow their frame unframed).
const MAX_FRAME: u32 = 1 << 20;

/// The volume's settings, as `volume create` takes them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMeta {
    pub name: String,
    pub owner: String,
    pub writers: Vec<String>,
    pub quota_bytes: u64,
    pub quota_files: u64,
    pub write_quorum: u32,
    pub public_read: bool,
}

/// One node of the volume, by path ("" is the root).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub path: String,
    /// `pb::ObjectKind` as its number.
    pub kind: i32,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_ns: i64,
    pub atime_ns: i64,
    pub size: u64,
    /// Files: what names the content.
    pub hash: Option<[u8; 32]>,
    pub symlink: String,
    pub rdev: u64,
    /// Another name of a node already in the archive (a hard link): that node's path.
    pub link_to: Option<String>,
}

/// One frame of the archive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    Header {
        volume: VolumeMeta,
        /// The volume version the archive shows.
        version: u64,
        /// Incremental: only contents of files changed after this version are included.
        since: Option<u64>,
        created_ns: i64,
    },
    Node(Node),
    /// `size` raw bytes follow, the content named `hash`.
    Content {
        hash: [u8; 32],
        size: u64,
    },
    End {
        nodes: u64,
        contents: u64,
        content_bytes: u64,
        /// blake3 of every archive byte before this frame's length prefix.
        digest: [u8; 32],
    },
}

/// Why an archive could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// The cause is in the message and not also a `source`, so an error chain prints it once.
    #[error("archive I/O: {0}")]
    Io(std::io::Error),
    #[error("not a codafs backup archive (bad magic)")]
    NotAnArchive,
    #[error("archive format {0} is not supported by this build (it reads format {FORMAT})")]
    Format(u32),
    #[error("the archive is damaged: {0}")]
    Damaged(String),
}

impl From<std::io::Error> for ArchiveError {
    fn from(e: std::io::Error) -> Self {
        ArchiveError::Io(e)
    }
}

/// Writes an archive, keeping the running digest.
pub struct Writer<W: Write> {
    out: W,
    digest: blake3::Hasher,
}

impl<W: Write> Writer<W> {
    /// Starts an archive on `out` (writes the magic and format).
    pub fn new(mut out: W) -> Result<Self, ArchiveError> {
        let mut digest = blake3::Hasher::new();
        let mut head = MAGIC.to_vec();
        head.extend_from_slice(&FORMAT.to_le_bytes());
        out.write_all(&head)?;
        digest.update(&head);
        Ok(Writer { out, digest })
    }

    fn raw(&mut self, b: &[u8]) -> Result<(), ArchiveError> {
        self.out.write_all(b)?;
        self.digest.update(b);
        Ok(())
    }

    /// Writes one frame (not `End`: see [`Writer::finish`]).
    pub fn frame(&mut self, f: &Frame) -> Result<(), ArchiveError> {
        let body = bincode::serialize(f).map_err(|e| ArchiveError::Damaged(e.to_string()))?;
        let len = u32::try_from(body.len())
            .ok()
            .filter(|n| *n <= MAX_FRAME)
            .ok_or_else(|| ArchiveError::Damaged(format!("a frame of {} bytes", body.len())))?;
        self.raw(&len.to_le_bytes())?;
        self.raw(&body)
    }

    /// Writes content bytes (after their `Content` frame).
    pub fn content_bytes(&mut self, b: &[u8]) -> Result<(), ArchiveError> {
        self.raw(b)
    }

    /// Writes the `End` frame and flushes; returns the output.
    pub fn finish(mut self, nodes: u64, contents: u64, content_bytes: u64) -> Result<W, ArchiveError> {
        let digest: [u8; 32] = self.digest.finalize().into();
        let end = Frame::End {
            nodes,
            contents,
            content_bytes,
            digest,
        };
        let body = bincode::serialize(&end).map_err(|e| ArchiveError::Damaged(e.to_string()))?;
        self.out.write_all(&(body.len() as u32).to_le_bytes())?;
        self.out.write_all(&body)?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Reads an archive front to back, checking its digest at the end.
pub struct Reader<R: Read> {
    input: R,
    digest: blake3::Hasher,
    ended: bool,
}

impl<R: Read> Reader<R> {
    /// Opens an archive: checks the magic and the format.
    pub fn new(mut input: R) -> Result<Self, ArchiveError> {
        let mut head = [0u8; 12];
        input.read_exact(&mut head).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => ArchiveError::NotAnArchive,
            _ => ArchiveError::Io(e),
        })?;
        if &head[..8] != MAGIC {
            return Err(ArchiveError::NotAnArchive);
        }
        let format = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
        if format != FORMAT {
            return Err(ArchiveError::Format(format));
        }
        let mut digest = blake3::Hasher::new();
        digest.update(&head);
        Ok(Reader {
            input,
            digest,
            ended: false,
        })
    }

    fn exact(&mut self, buf: &mut [u8]) -> Result<(), ArchiveError> {
        self.input.read_exact(buf).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => ArchiveError::Damaged("it ends early (truncated?)".into()),
            _ => ArchiveError::Io(e),
        })
    }

    /// The next frame; after `End` (whose digest it has checked), `None`.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, ArchiveError> {
        if self.ended {
            return Ok(None);
        }
        let mut len = [0u8; 4];
        self.exact(&mut len)?;
        let n = u32::from_le_bytes(len);
        if n > MAX_FRAME {
            return Err(ArchiveError::Damaged(format!("a frame of {n} bytes")));
        }
        let mut body = vec![0u8; n as usize];
        self.exact(&mut body)?;
        let f: Frame = bincode::deserialize(&body).map_err(|e| ArchiveError::Damaged(e.to_string()))?;
        if let Frame::End { digest, .. } = &f {
            let want: [u8; 32] = self.digest.finalize().into();
            if *digest != want {
                return Err(ArchiveError::Damaged("its checksum does not match its contents".into()));
            }
            self.ended = true;
        } else {
            self.digest.update(&len);
            self.digest.update(&body);
        }
        Ok(Some(f))
    }

    /// Reads `size` content bytes into `sink` in pieces of at most 1 MiB.
    pub fn content_into(
        &mut self,
        size: u64,
        mut sink: impl FnMut(&[u8]) -> std::io::Result<()>,
    ) -> Result<(), ArchiveError> {
        let mut buf = vec![0u8; (1 << 20).min(size as usize).max(1)];
        let mut left = size;
        while left > 0 {
            let n = (buf.len() as u64).min(left) as usize;
            self.exact(&mut buf[..n])?;
            self.digest.update(&buf[..n]);
            sink(&buf[..n])?;
            left -= n as u64;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut w = Writer::new(Vec::new()).unwrap();
        w.frame(&Frame::Header {
            volume: VolumeMeta {
                name: "www".into(),
                owner: "alice".into(),
                writers: vec![],
                quota_bytes: 0,
                quota_files: 0,
                write_quorum: 2,
                public_read: true,
            },
            version: 7,
            since: None,
            created_ns: 1,
        })
        .unwrap();
        w.frame(&Frame::Content { hash: [1; 32], size: 5 }).unwrap();
        w.content_bytes(b"hello").unwrap();
        w.finish(0, 1, 5).unwrap()
    }

    fn read_all(bytes: &[u8]) -> Result<Vec<Frame>, ArchiveError> {
        let mut r = Reader::new(bytes)?;
        let mut out = Vec::new();
        while let Some(f) = r.next_frame()? {
            if let Frame::Content { size, .. } = &f {
                let mut got = Vec::new();
                r.content_into(*size, |b| {
                    got.extend_from_slice(b);
                    Ok(())
                })?;
                assert_eq!(got, b"hello");
            }
            out.push(f);
        }
        Ok(out)
    }

    #[test]
    fn an_archive_reads_back_and_damage_is_refused() {
        let a = sample();
        let frames = read_all(&a).unwrap();
        assert_eq!(frames.len(), 3);
        assert!(matches!(frames[2], Frame::End { contents: 1, .. }));

        let mut flipped = a.clone();
        let at = flipped.len() - 60;
        flipped[at] ^= 1;
        assert!(
            matches!(read_all(&flipped), Err(ArchiveError::Damaged(_))),
            "a flipped byte"
        );
        assert!(
            matches!(read_all(&a[..a.len() - 10]), Err(ArchiveError::Damaged(_))),
            "a truncated archive"
        );
        assert!(matches!(read_all(b"NOTANARCHIVE"), Err(ArchiveError::NotAnArchive)));
        let mut newer = a.clone();
        newer[8] = 9;
        assert!(matches!(read_all(&newer), Err(ArchiveError::Format(9))));
    }
}
