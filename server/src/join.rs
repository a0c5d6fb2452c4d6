//! Joining an existing cluster with a join token: first, on a TLS cluster, getting this server's
//! certificate (before listening, since the leader dials a new member over mutual TLS as soon as
//! it is added): a new key pair is made here and a server holding the CA key signs its public
//! key; then asking to be added until a server accepts, which spends the token.
use std::path::Path;
use std::time::Duration;

use codafs_common::join::JoinToken;
use codafs_proto::error::{kind_of, ErrorKind};
use codafs_proto::pb;
use codafs_proto::tls::Tls;
use tokio::sync::watch;

use crate::grpc::refuse;

use crate::config::ServerConfig;
use crate::node::Node;
use crate::tls::{self, ServerTls};
use crate::ServerError;

/// How long one request to an existing server may take while joining.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a join token lives unless `--ttl` says otherwise.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);
/// The longest life a join token may be given.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// What the cluster records of a join token's secret: its hash, so the replicated state (and
/// every snapshot) holds nothing that admits a server.
pub fn secret_hash(join_key: &str) -> [u8; 32] {
    *blake3::hash(join_key.as_bytes()).as_bytes()
}

fn request(cfg: &ServerConfig, token: &JoinToken, csr_pem: String) -> pb::JoinRequest {
    pb::JoinRequest {
        node_id: cfg.node_id,
        addr: cfg.advertised().to_string(),
        witness: cfg.witness,
        join_key: token.join_key.clone(),
        csr_pem,
    }
}

/// How many times a token a server calls unknown is tried (on the next server each time, a
/// second apart): a token made a moment ago may not have reached every replica yet.
const UNKNOWN_TOKEN_TRIES: u32 = 5;
/// Rounds over the token's servers in which every one answered that it could not sign (it
/// holds no CA key, or cannot serve) before a joiner gives up: the server holding the CA key
/// may have been removed, and asking for ever would hide that.
const SIGNER_ROUNDS: usize = 5;

/// Refusals no retry changes: the token is spent or expired, or this node id was removed; or
/// the token stayed unknown to the cluster after `UNKNOWN_TOKEN_TRIES` answers (`unknown` counts
/// them).
fn final_refusal(s: &tonic::Status, unknown: &mut u32) -> bool {
    match kind_of(s) {
        // Denied: spent, expired or removed; invalid: e.g. a TLS token for an insecure cluster.
        ErrorKind::Denied | ErrorKind::Invalid => true,
        ErrorKind::Unauthenticated => {
            *unknown += 1;
            *unknown >= UNKNOWN_TOKEN_TRIES
        }
        _ => false,
    }
}

/// Asks the servers of `token` (verified against the CA in the token) to sign a certificate for
/// a key pair made here, and installs it into `dir/tls/` (no CA key: joiners never get it).
/// Servers without the CA key say so and the next is asked; retries until one signs, or until
/// every server has said it cannot for [`SIGNER_ROUNDS`] rounds. A refused token or a CA that
/// does not match the token ends it with an error.
pub async fn fetch_certificate(dir: &Path, cfg: &ServerConfig, token: &JoinToken) -> Result<ServerTls, ServerError> {
    let transport = Tls::ca(token.ca_cert.clone());
    let (key_pem, csr_pem) = tls::new_key_and_csr()?;
    let mut attempt = 0usize;
    let mut unknown = 0;
    // Answers in a row, from servers that were reached, that they cannot sign.
    let mut unable = 0usize;
    loop {
        let addr = &token.servers[attempt % token.servers.len().max(1)];
        let result = async {
            let ch = transport
                .endpoint(addr)
                .map_err(|e| refuse(ErrorKind::Unavailable, e.to_string()))?
                .connect_timeout(crate::peers::CONNECT_TIMEOUT)
                .connect_lazy();
            let mut r = tonic::Request::new(request(cfg, token, csr_pem.clone()));
            r.set_timeout(ATTEMPT_TIMEOUT);
            pb::admin_client::AdminClient::new(ch)
                .join_credentials(r)
                .await
                .map(|r| r.into_inner())
        }
        .await;
        match result {
            Ok(reply) => {
                if !tls::same_pem(&reply.ca_cert_pem, &token.ca_cert) {
                    return Err(ServerError::Tls(tls::TlsError::CaMismatch));
                }
                if tls::node_id_of_pem(&reply.cert_pem)? != Some(cfg.node_id)
                    || !tls::key_matches(&reply.cert_pem, &key_pem)?
                {
                    return Err(ServerError::Bootstrap(format!(
                        "joining via {addr}: the certificate received is not for this server's node id and key"
                    )));
                }
                let installed = tls::install(dir, &reply.ca_cert_pem, &reply.cert_pem, &key_pem)?;
                tracing::info!(via = %addr, node = cfg.node_id, "received this server's certificate");
                return Ok(installed);
            }
            Err(s) if final_refusal(&s, &mut unknown) => {
                return Err(ServerError::Bootstrap(format!(
                    "joining via {addr}: {}",
                    crate::peers::describe(&s)
                )));
            }
            Err(s) => {
                let e = crate::peers::describe(&s);
                // A server whose certificate the token's CA did not sign, or one without TLS: no
                // retry will change that.
                if let Some(hint) = codafs_proto::tls::mismatch_hint(&e, &transport) {
                    return Err(ServerError::Bootstrap(format!(
                        "joining via {addr}: {e} ({hint}; check the join token)"
                    )));
                }
                // A refusal the server built (its kind in the header), not a transport failure.
                let answered = s.metadata().get(codafs_proto::error::ERROR_KIND_HEADER).is_some();
                if answered && kind_of(&s) == ErrorKind::Unavailable {
                    unable += 1;
                } else {
                    unable = 0;
                }
                if unable >= SIGNER_ROUNDS * token.servers.len().max(1) {
                    return Err(ServerError::Bootstrap(format!(
                        "none of the {} servers named in the join token could sign this server's \
                         certificate in {SIGNER_ROUNDS} rounds (the last, {addr}: {e}); the server \
                         holding the cluster CA key may have been removed or be down: see \
                         docs/SECURITY.md, \"When the server holding the CA key is lost\"",
                        token.servers.len()
                    )));
                }
                tracing::warn!(via = %addr, error = %e, "could not get a certificate; asking the next server");
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
    let mut unknown = 0;
    while !*stop.borrow() && !member(node) {
        let addr = &token.servers[attempt as usize % token.servers.len().max(1)];
        let req = request(&node.cfg, token, String::new());
        let result = async {
            let mut c = node
                .peers
                .admin(addr)
                .map_err(|e| refuse(ErrorKind::Unavailable, e.to_string()))?;
            let mut r = tonic::Request::new(req);
            r.set_timeout(Duration::from_secs(120));
            c.join(r).await
        }
        .await;
        match result {
            Ok(_) => {
                tracing::info!(via = %addr, "joined the cluster");
                return;
            }
            Err(s) if final_refusal(&s, &mut unknown) => {
                tracing::error!(via = %addr, error = %crate::peers::describe(&s), "join refused");
                return;
            }
            Err(s) => {
                tracing::warn!(via = %addr, error = %crate::peers::describe(&s), "join attempt failed; retrying")
            }
        }
        attempt += 1;
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.changed() => {}
        }
    }
}
