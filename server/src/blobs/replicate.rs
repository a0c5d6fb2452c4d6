//! Sending a stored blob to another replica (put forwarding and repair share the wire format).
use std::time::Duration;

use codafs_common::Hash;
use codafs_proto::limits::BLOB_CHUNK;
use codafs_proto::pb;
use futures::StreamExt;
use tokio::io::AsyncReadExt;

use crate::peers::Peers;

/// Streams the file at `path` (content `hash`, `size` bytes) to `addr` as a forwarded put.
pub async fn send_file(
    peers: &Peers,
    addr: &str,
    path: &std::path::Path,
    hash: Hash,
    size: u64,
) -> Result<u32, String> {
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|e| format!("open {}: {e}", path.display()))?;
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
    let mut client = peers.blobs(addr).map_err(|e| e.to_string())?;
    let mut req = tonic::Request::new(stream);
    // Generous: at least 30 s, plus a second per 20 MiB.
    req.set_timeout(Duration::from_secs(30 + size / (20 << 20)));
    let reply = client.put(req).await.map_err(|s| format!("{addr}: {}", s.message()))?;
    Ok(reply.into_inner().copies)
}
