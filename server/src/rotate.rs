//! `codafs server --rotate-cert`: at start, before listening, this server gets a new key pair
//! and a certificate for the same node id, signed by itself when it holds the CA key, otherwise
//! by a server that does (asked over mutual TLS with the current certificate, which proves the
//! node id). The old certificate stays valid while the server is a member (there is no
//! revocation list; removing a server is what cuts a certificate off).
use std::path::Path;
use std::time::Duration;

use codafs_proto::pb;

use crate::config::ServerConfig;
use crate::db::Tables;
use crate::tls::{self, ServerTls};
use crate::ServerError;

/// How many rounds over the other servers a rotation tries before giving up.
const ROUNDS: usize = 5;
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// Replaces this server's key and certificate in `dir/tls/` and returns the new TLS material.
pub async fn rotate(
    dir: &Path,
    cfg: &ServerConfig,
    current: &ServerTls,
    tables: &Tables,
) -> Result<ServerTls, ServerError> {
    let (cert_pem, key_pem) = match current.signer() {
        Some(ca) => tls::issue_locally(&ca, cfg.node_id, cfg.advertised())?,
        None => {
            let others: Vec<String> = crate::raft::state_machine::stored_members(tables)
                .map_err(|e| ServerError::Raft(e.to_string()))?
                .into_iter()
                .filter(|(id, _)| *id != cfg.node_id)
                .map(|(_, info)| info.addr)
                .collect();
            let (key_pem, csr_pem) = tls::new_key_and_csr()?;
            (renew(&others, current, &csr_pem).await?, key_pem)
        }
    };
    if tls::node_id_of_pem(&cert_pem)? != Some(cfg.node_id) || !tls::key_matches(&cert_pem, &key_pem)? {
        return Err(ServerError::Bootstrap(
            "rotating the certificate: the certificate received is not for this server's node id and key".into(),
        ));
    }
    tls::replace_server_cert(dir, &cert_pem, &key_pem)?;
    tracing::info!(node = cfg.node_id, "rotated this server's certificate and key");
    Ok(ServerTls {
        cert_pem,
        key_pem,
        ..current.clone()
    })
}

/// Asks the servers at `addrs` in turn, presenting the current certificate, until one signs.
async fn renew(addrs: &[String], current: &ServerTls, csr_pem: &str) -> Result<String, ServerError> {
    if addrs.is_empty() {
        return Err(ServerError::Bootstrap(
            "rotating the certificate: this server knows no other server, and it does not hold the CA key".into(),
        ));
    }
    let transport = current.peer_transport();
    let mut errors = Vec::new();
    for round in 0..ROUNDS {
        for addr in addrs {
            let result = async {
                let ch = transport
                    .endpoint(addr)
                    .map_err(|e| e.to_string())?
                    .connect_timeout(crate::peers::CONNECT_TIMEOUT)
                    .connect_lazy();
                let mut r = tonic::Request::new(pb::RenewCertificateRequest {
                    csr_pem: csr_pem.to_string(),
                });
                r.set_timeout(ATTEMPT_TIMEOUT);
                pb::admin_client::AdminClient::new(ch)
                    .renew_certificate(r)
                    .await
                    .map(|r| r.into_inner().cert_pem)
                    .map_err(|s| crate::peers::describe(&s))
            }
            .await;
            match result {
                Ok(cert) => {
                    tracing::info!(via = %addr, "a server holding the CA key signed the new certificate");
                    return Ok(cert);
                }
                Err(e) => {
                    tracing::warn!(via = %addr, error = %e, "could not renew the certificate here");
                    if round + 1 == ROUNDS {
                        errors.push(format!("{addr}: {e}"));
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Err(ServerError::Bootstrap(format!(
        "rotating the certificate: no server signed it (is the server holding the CA key up?): {}",
        errors.join("; ")
    )))
}
