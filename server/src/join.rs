//! Joining an existing cluster with a join token: first, on a TLS cluster, fetching the cluster CA
//! and issuing this server's certificate (before listening, since the leader dials a new member
//! over mutual TLS as soon as it is added); then asking to be added until a server accepts.
use std::path::Path;
use std::time::Duration;

use codafs_common::join::JoinToken;
use codafs_proto::pb;
use codafs_proto::tls::Tls;
use tokio::sync::watch;

use crate::config::ServerConfig;
use crate::node::Node;
use crate::tls::{self, CaMaterial, ServerTls};
use crate::ServerError;

/// How long one request to an existing server may take while joining.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

fn request(cfg: &ServerConfig, token: &JoinToken) -> pb::JoinRequest {
    pb::JoinRequest {
        node_id: cfg.node_id,
        addr: cfg.advertised().to_string(),
        witness: cfg.witness,
        join_key: token.join_key.clone(),
    }
}

/// Asks the servers of `token` for the cluster CA (verifying them against the CA in the token),
/// then issues this server's certificate into `dir/tls/`. Retries until it succeeds; a refused
/// join key or a CA that does not match the token ends it with an error.
pub async fn fetch_certificate(dir: &Path, cfg: &ServerConfig, token: &JoinToken) -> Result<ServerTls, ServerError> {
    let transport = Tls::ca(token.ca_cert.clone());
    let mut attempt = 0usize;
    loop {
        let addr = &token.servers[attempt % token.servers.len().max(1)];
        let result = async {
            let ch = transport
                .endpoint(addr)
                .map_err(|e| e.to_string())?
                .connect_timeout(crate::peers::CONNECT_TIMEOUT)
                .connect_lazy();
            let mut r = tonic::Request::new(request(cfg, token));
            r.set_timeout(ATTEMPT_TIMEOUT);
            pb::admin_client::AdminClient::new(ch)
                .join_credentials(r)
                .await
                .map(|r| r.into_inner())
                .map_err(|s| crate::peers::describe(&s))
        }
        .await;
        match result {
            Ok(reply) => {
                if !tls::same_pem(&reply.ca_cert_pem, &token.ca_cert) {
                    return Err(ServerError::Tls(tls::TlsError::CaMismatch));
                }
                let ca = CaMaterial {
                    cert_pem: reply.ca_cert_pem,
                    key_pem: reply.ca_key_pem,
                };
                let installed = tls::install(dir, &ca, &reply.cluster_id, cfg.advertised())?;
                tracing::info!(via = %addr, "received the cluster CA and issued this server's certificate");
                return Ok(installed);
            }
            Err(e) if e.contains("join key") || e.contains("without TLS") => {
                return Err(ServerError::Bootstrap(format!("joining via {addr}: {e}")));
            }
            // A server whose certificate the token's CA did not sign, or one without TLS: no
            // retry will change that.
            Err(e) => {
                if let Some(hint) = codafs_proto::tls::mismatch_hint(&e, &transport) {
                    return Err(ServerError::Bootstrap(format!(
                        "joining via {addr}: {e} ({hint}; check the join token)"
                    )));
                }
                tracing::warn!(via = %addr, error = %e, "could not get the cluster CA; retrying")
            }
        }
        attempt += 1;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Asks the servers named in a join token to add this one, until one accepts or we stop.
pub async fn join_cluster(node: &Node, token: &JoinToken, mut stop: watch::Receiver<bool>) {
    let member = |n: &Node| n.members().iter().any(|m| m.id == n.id && m.voter);
    let mut attempt = 0u32;
    while !*stop.borrow() && !member(node) {
        let addr = &token.servers[attempt as usize % token.servers.len().max(1)];
        let req = request(&node.cfg, token);
        let result = async {
            let mut c = node.peers.admin(addr).map_err(|e| e.to_string())?;
            let mut r = tonic::Request::new(req);
            r.set_timeout(Duration::from_secs(120));
            c.join(r).await.map_err(|s| crate::peers::describe(&s))
        }
        .await;
        match result {
            Ok(_) => {
                tracing::info!(via = %addr, "joined the cluster");
                return;
            }
            Err(e) if e.contains("join key") => {
                tracing::error!(via = %addr, error = %e, "join refused; check the join token");
                return;
            }
            Err(e) => tracing::warn!(via = %addr, error = %e, "join attempt failed; retrying"),
        }
        attempt += 1;
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.changed() => {}
        }
    }
}
