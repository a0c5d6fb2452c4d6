//! Connections to other servers, shared by Raft traffic, blob forwarding and write forwarding.
//! Channels connect lazily and reconnect on their own, so a dead peer costs a failed call, not a
//! stuck task; every call site sets its own deadline.
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use codafs_proto::limits::{MAX_MESSAGE, MAX_RAFT_MESSAGE};
use codafs_proto::pb;
use tonic::transport::{Channel, Endpoint};

/// How long establishing a TCP connection to a peer may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// A pool of channels keyed by address.
#[derive(Default)]
pub struct Peers {
    channels: Mutex<HashMap<String, Channel>>,
}

impl Peers {
    /// The channel to `addr`, created on first use.
    pub fn channel(&self, addr: &str) -> Result<Channel, tonic::transport::Error> {
        let mut map = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = map.get(addr) {
            return Ok(c.clone());
        }
        let ch = Endpoint::from_shared(format!("http://{addr}"))?
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

    pub fn raft(&self, addr: &str) -> Result<pb::raft_client::RaftClient<Channel>, tonic::transport::Error> {
        Ok(pb::raft_client::RaftClient::new(self.channel(addr)?)
            .max_decoding_message_size(MAX_RAFT_MESSAGE)
            .max_encoding_message_size(MAX_RAFT_MESSAGE))
    }

    pub fn blobs(&self, addr: &str) -> Result<pb::blobs_client::BlobsClient<Channel>, tonic::transport::Error> {
        Ok(pb::blobs_client::BlobsClient::new(self.channel(addr)?)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE))
    }

    pub fn write(&self, addr: &str) -> Result<pb::write_client::WriteClient<Channel>, tonic::transport::Error> {
        Ok(pb::write_client::WriteClient::new(self.channel(addr)?)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE))
    }

    pub fn admin(&self, addr: &str) -> Result<pb::admin_client::AdminClient<Channel>, tonic::transport::Error> {
        Ok(pb::admin_client::AdminClient::new(self.channel(addr)?)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE))
    }
}
