//! Sending a stored blob to another replica (put forwarding and repair share the wire format).
use std::time::Duration;

use codafs_common::Hash;
use codafs_proto::limits::BLOB_CHUNK;
use codafs_proto::pb;
use futures::StreamExt;
use tokio::io::AsyncReadExt;

use codafs_proto::error::{kind_of, ErrorKind};

use crate::peers::Peers;

/// Why a forward to one replica failed, with the kind of the replica's refusal (a replica out
/// of disk space makes the put's answer say so).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{addr}: {message}")]
pub struct ForwardError {
    pub addr: String,
    pub kind: ErrorKind,
    pub message: String,
}

impl ForwardError {
    /// The replica answered with a refusal.
    pub fn refused(addr: &str, s: &tonic::Status) -> Self {
        ForwardError {
            addr: addr.to_string(),
            kind: kind_of(s),
            message: s.message().to_string(),
        }
    }

    /// The replica could not be asked at all (a bad address, a local file gone).
    pub fn unreachable(addr: &str, e: impl std::fmt::Display) -> Self {
        ForwardError {
            addr: addr.to_string(),
            kind: ErrorKind::Unavailable,
            message: e.to_string(),
        }
    }
}

/// Streams the file at `path` (content `hash`, `size` bytes) to `addr` as a forwarded put.
pub async fn send_file(
    peers: &Peers,
    addr: &str,
    path: &std::path::Path,
    hash: Hash,
    size: u64,
) -> Result<u32, ForwardError> {
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|e| ForwardError::unreachable(addr, format!("open {}: {e}", path.display())))?;
    let header = pb::PutBlobChunk {
        part: Some(pb::put_blob_chunk::Part::Header(pb::PutBlobHeader {
            hash: bytes::Bytes::copy_from_slice(&hash.0),
            size,
            write_quorum: 1,
            forwarded: true,
        })),
    };
    let body = futures::stream::unfold(Some(file), |state| async move {
        let mut f = state?;
        let mut buf = vec![0u8; BLOB_CHUNK];
        let mut filled = 0;
        // Fill whole chunks so the receiver sees few, large messages.
        while filled < buf.len() {
            match f.read(&mut buf[filled..]).await {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(_) => return None,
            }
        }
        if filled == 0 {
            return None;
        }
        buf.truncate(filled);
        let msg = pb::PutBlobChunk {
            part: Some(pb::put_blob_chunk::Part::Data(buf.into())),
        };
        Some((msg, Some(f)))
    });
    let stream = futures::stream::iter([header]).chain(body);
    let mut client = peers.blobs(addr).map_err(|e| ForwardError::unreachable(addr, e))?;
    let mut req = tonic::Request::new(stream);
    // Generous: at least 30 s, plus a second per 20 MiB.
    req.set_timeout(Duration::from_secs(30 + size / (20 << 20)));
    let reply = client.put(req).await.map_err(|s| ForwardError::refused(addr, &s))?;
    Ok(reply.into_inner().copies)
}
