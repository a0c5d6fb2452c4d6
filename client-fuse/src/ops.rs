//! Builders for commit operations addressed by volume-relative paths, so callers (upload, the
//! demo, tests, benchmarks) do not assemble protocol messages by hand.
use codafs_common::Hash;
use codafs_proto::pb;

/// A reference to the object at a volume-relative path ("" is the root).
pub fn at(path: &str) -> Option<pb::NodeRef> {
    Some(pb::NodeRef {
        target: Some(pb::node_ref::Target::Path(path.to_string())),
    })
}

/// Splits "a/b/c" into ("a/b", "c").
pub fn split(path: &str) -> (&str, &str) {
    path.rsplit_once('/').unwrap_or(("", path))
}

fn create(path: &str, kind: pb::ObjectKind, mode: u32, hash: Option<Hash>, size: u64, target: &str) -> pb::Op {
    let (parent, name) = split(path);
    pb::Op {
        expect_version: None,
        op: Some(pb::op::Op::Create(pb::CreateOp {
            parent: at(parent),
            name: name.to_string(),
            kind: kind as i32,
            mode,
            hash: hash.map(|h| bytes::Bytes::copy_from_slice(&h.0)).unwrap_or_default(),
            size,
            symlink_target: target.to_string(),
            // Files and symlinks replace what is there; directories never do.
            replace: kind != pb::ObjectKind::Directory,
            ..Default::default()
        })),
    }
}

/// Creates (or replaces) the file at `path` with content `content`'s hash and size.
pub fn file(path: &str, content: &[u8], mode: u32) -> pb::Op {
    create(
        path,
        pb::ObjectKind::File,
        mode,
        Some(codafs_common::chunks::content_id_of(content)),
        content.len() as u64,
        "",
    )
}

/// Creates (or replaces) the file at `path` with an already known hash and size.
pub fn file_hashed(path: &str, hash: Hash, size: u64, mode: u32) -> pb::Op {
    create(path, pb::ObjectKind::File, mode, Some(hash), size, "")
}

/// Creates the directory at `path`.
pub fn dir(path: &str, mode: u32) -> pb::Op {
    create(path, pb::ObjectKind::Directory, mode, None, 0, "")
}

/// Creates (or replaces) a symlink at `path`.
pub fn symlink(path: &str, target: &str) -> pb::Op {
    create(path, pb::ObjectKind::Symlink, 0o777, None, 0, target)
}

/// Removes what is at `path` (directories with everything below them).
pub fn remove(path: &str) -> pb::Op {
    let (parent, name) = split(path);
    pb::Op {
        expect_version: None,
        op: Some(pb::op::Op::Remove(pb::RemoveOp {
            parent: at(parent),
            name: name.to_string(),
            recursive: true,
        })),
    }
}

/// The same operation, valid only if its target still has `version` (0 = must not exist).
pub fn expecting(mut op: pb::Op, version: u64) -> pb::Op {
    op.expect_version = Some(version);
    op
}

/// A commit of `ops` to `volume`, with a fresh request id (so it may be retried safely).
pub fn commit(volume: &str, ops: Vec<pb::Op>) -> pb::CommitRequest {
    pb::CommitRequest {
        volume: volume.to_string(),
        ops,
        expect_volume_version: None,
        request_id: request_id(),
    }
}

/// A random commit request id: the servers apply a commit with a given id at most once.
pub fn request_id() -> bytes::Bytes {
    bytes::Bytes::copy_from_slice(&rand::random::<[u8; 16]>())
}

/// The messages of a streamed blob put: a header, then `BLOB_CHUNK`-sized pieces of `data`.
pub fn put_chunks(data: &bytes::Bytes, write_quorum: u32) -> Vec<pb::PutBlobChunk> {
    use codafs_proto::limits::BLOB_CHUNK;
    let hash = Hash::of(data);
    let mut msgs = vec![pb::PutBlobChunk {
        part: Some(pb::put_blob_chunk::Part::Header(pb::PutBlobHeader {
            hash: bytes::Bytes::copy_from_slice(&hash.0),
            size: data.len() as u64,
            write_quorum,
            forwarded: false,
        })),
    }];
    let mut off = 0;
    while off < data.len() {
        let end = (off + BLOB_CHUNK).min(data.len());
        msgs.push(pb::PutBlobChunk {
            part: Some(pb::put_blob_chunk::Part::Data(data.slice(off..end))),
        });
        off = end;
    }
    msgs
}
