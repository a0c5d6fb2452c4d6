//! Connections to other servers, shared by Raft traffic, blob forwarding and write forwarding.
//! Channels connect lazily and reconnect on their own, so a dead peer costs a failed call, not a
//! stuck task; every call site sets its own deadline. Over TLS every channel verifies the peer
//! against the cluster CA and presents this server's certificate, which is what lets the peer
//! accept Raft messages and forwarded requests from it.
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use codafs_proto::limits::{MAX_MESSAGE, MAX_RAFT_MESSAGE};
use codafs_proto::pb;
use codafs_proto::tls::{Tls, TlsError};
use tonic::transport::Channel;

pub use codafs_proto::tls::describe;

/// How long establishing a TCP connection to a peer may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// A pool of channels keyed by address.
pub struct Peers {
    tls: Tls,
    channels: Mutex<HashMap<String, Channel>>,
}

impl Peers {
    /// A pool whose channels use `tls` (the server's own certificate as client identity).
    pub fn new(tls: Tls) -> Self {
        Peers {
            tls,
            channels: Mutex::default(),
        }
    }

    /// The channel to `addr`, created on first use.
    pub fn channel(&self, addr: &str) -> Result<Channel, TlsError> {
        let mut map = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = map.get(addr) {
            return Ok(c.clone());
        }
        let ch = self
            .tls
            .endpoint(addr)?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .initial_stream_window_size(Some(4 << 20))
            .initial_connection_window_size(Some(8 << 20))
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .connect_lazy();
        map.insert(addr.to_string(), ch.clone());
        Ok(ch)
    }

    pub fn raft(&self, addr: &str) -> Result<pb::raft_client::RaftClient<Channel>, TlsError> {
        Ok(pb::raft_client::RaftClient::new(self.channel(addr)?)
            .max_decoding_message_size(MAX_RAFT_MESSAGE)
            .max_encoding_message_size(MAX_RAFT_MESSAGE))
    }

    pub fn blobs(&self, addr: &str) -> Result<pb::blobs_client::BlobsClient<Channel>, TlsError> {
        Ok(pb::blobs_client::BlobsClient::new(self.channel(addr)?)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE))
    }

    pub fn write(&self, addr: &str) -> Result<pb::write_client::WriteClient<Channel>, TlsError> {
        Ok(pb::write_client::WriteClient::new(self.channel(addr)?)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE))
    }

    pub fn admin(&self, addr: &str) -> Result<pb::admin_client::AdminClient<Channel>, TlsError> {
        Ok(pb::admin_client::AdminClient::new(self.channel(addr)?)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE))
    }
}
