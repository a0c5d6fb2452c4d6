//! How to reach a codafs server: over TLS verified against the cluster CA (the default), or in
//! plaintext for clusters created with `--insecure`.
//!
//! Servers and clients verify a server's certificate against the cluster CA and the fixed name
//! [`SERVER_NAME`], never against the address they dialled: certificates stay valid when a
//! server moves to another address, and the trust decision is "signed by this cluster's CA",
//! which is the only thing the CA is used for. Servers additionally present their own
//! certificate as a client identity, which is how a server tells a peer from a client.
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// The DNS name every server certificate carries and every connection verifies.
pub const SERVER_NAME: &str = "codafs-server";

const CA_NAME_PREFIX: &str = "codafs cluster ";
const CA_NAME_SUFFIX: &str = " CA";

/// Hex digits of a cluster id made before ids came from the CA key (12 random bytes).
const LEGACY_ID_DIGITS: usize = 24;

/// The cluster id CA key `public_key` gives (the key's bytes as a certificate carries them):
/// the first 16 bytes of their blake3 digest, in hex (32 digits).
pub fn key_cluster_id(public_key: &[u8]) -> String {
    blake3::hash(public_key).as_bytes()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The common name of cluster `cluster_id`'s CA certificate: how clients know which cluster a
/// CA belongs to ([`Tls::cluster_id`]).
pub fn ca_common_name(cluster_id: &str) -> String {
    format!("{CA_NAME_PREFIX}{cluster_id}{CA_NAME_SUFFIX}")
}

/// Transport security of outgoing connections.
#[derive(Clone)]
pub enum Tls {
    /// TLS, verifying servers against this CA certificate (PEM). `identity` is presented to the
    /// server when set (servers use their own certificate; mounts and CLIs have none).
    Ca { ca_pem: String, identity: Option<Identity> },
    /// Plaintext HTTP/2: unencrypted and unauthenticated (`--insecure` clusters only).
    Insecure,
}

/// A bad CA certificate or identity, or an unusable address.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("bad server address {0}: {1}")]
    Address(String, String),
    #[error("TLS settings for {0}: {1}")]
    Config(String, String),
}

/// Never prints key material (a server's identity holds its private key).
impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Tls::Ca { identity, .. } => write!(
                f,
                "Tls::Ca {{ identity: {} }}",
                if identity.is_some() { "yes" } else { "no" }
            ),
            Tls::Insecure => f.write_str("Tls::Insecure"),
        }
    }
}

impl Tls {
    /// TLS against `ca_pem`, without a client certificate.
    pub fn ca(ca_pem: impl Into<String>) -> Self {
        Tls::Ca {
            ca_pem: ca_pem.into(),
            identity: None,
        }
    }

    pub fn is_insecure(&self) -> bool {
        matches!(self, Tls::Insecure)
    }

    /// The id of the cluster whose CA this trusts, from the CA certificate's name (see
    /// [`ca_common_name`]); `None` in plaintext or for a CA named otherwise. A client takes
    /// its cluster's id from here rather than from the servers, so servers cannot claim
    /// another cluster's id to be handed that cluster's tokens.
    ///
    /// A cluster made by `codafs cluster init` since this check has the id its CA key gives
    /// ([`key_cluster_id`]), so no other CA can carry it: a name with such an id is taken only
    /// from the CA whose key gives it. Older clusters' ids are 12 random bytes (24 hex digits)
    /// and are taken by name alone.
    pub fn cluster_id(&self) -> Option<String> {
        let Tls::Ca { ca_pem, .. } = self else {
            return None;
        };
        let (_, pem) = x509_parser::pem::parse_x509_pem(ca_pem.as_bytes()).ok()?;
        let cert = pem.parse_x509().ok()?;
        let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
        let id = cn.strip_prefix(CA_NAME_PREFIX)?.strip_suffix(CA_NAME_SUFFIX)?;
        if id == key_cluster_id(&cert.public_key().subject_public_key.data) {
            return Some(id.to_string());
        }
        let legacy = id.len() == LEGACY_ID_DIGITS && id.bytes().all(|b| b.is_ascii_hexdigit());
        legacy.then(|| id.to_string())
    }

    /// An endpoint for `addr` (`host:port`) with this transport applied: `https://` plus the
    /// cluster CA, or `http://`. Callers add their own timeouts and window sizes.
    pub fn endpoint(&self, addr: &str) -> Result<Endpoint, TlsError> {
        let bad = |e: &dyn std::fmt::Display| TlsError::Address(addr.to_string(), e.to_string());
        check_addr(addr).map_err(|e| bad(&e))?;
        match self {
            Tls::Insecure => Endpoint::from_shared(format!("http://{addr}")).map_err(|e| bad(&e)),
            Tls::Ca { ca_pem, identity } => {
                let mut cfg = ClientTlsConfig::new()
                    .domain_name(SERVER_NAME)
                    .ca_certificate(Certificate::from_pem(ca_pem));
                if let Some(id) = identity {
                    cfg = cfg.identity(id.clone());
                }
                Endpoint::from_shared(format!("https://{addr}"))
                    .map_err(|e| bad(&e))?
                    .tls_config(cfg)
                    .map_err(|e| TlsError::Config(addr.to_string(), error_chain(&e)))
            }
        }
    }
}

/// Checks that `addr` is `HOST:PORT` with a port in 1..=65535 (an IPv6 host in brackets).
/// Without it, an address with no port or an unparsable one was taken as the scheme's default
/// port: `10.0.0.2` or `10.0.0.2:70000` reached whatever listens on port 80 or 443 there.
pub fn check_addr(addr: &str) -> Result<(), String> {
    const WANT: &str = "needs HOST:PORT, e.g. 10.0.0.2:7400 or [fd00::2]:7400";
    let Some((host, port)) = addr.rsplit_once(':') else {
        return Err(format!("no port: {WANT}"));
    };
    match port.parse::<u16>() {
        Ok(p) if p > 0 => {}
        _ => return Err(format!("{port:?} is not a port (1-65535): {WANT}")),
    }
    if host.is_empty() {
        return Err(format!("no host: {WANT}"));
    }
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return Err(format!("an IPv6 host goes in brackets: {WANT}"));
    }
    Ok(())
}

/// A failed call's message with its transport cause on one line (for logs and errors). tonic's
/// message often already names the root cause; it is added only when missing.
pub fn describe(s: &tonic::Status) -> String {
    use std::error::Error as _;
    let mut root = None;
    let mut src = s.source();
    while let Some(e) = src {
        root = Some(e.to_string());
        src = e.source();
    }
    match root {
        Some(r) if !s.message().contains(&r) => format!("{}: {r}", s.message()),
        _ => s.message().to_string(),
    }
}

/// An error and its sources on one line (tonic's transport errors keep the useful part, such as
/// "invalid peer certificate: UnknownIssuer", in their sources).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let t = inner.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = inner.source();
    }
    s
}

/// What probably went wrong when a call failed with `text` (from [`describe`]) over `tls`: a
/// server whose certificate another CA signed, or one side speaking TLS to a plaintext peer.
/// Such calls fail fast either way (the handshake or the HTTP/2 preface is refused); this only
/// turns the low-level cause into advice.
pub fn mismatch_hint(text: &str, tls: &Tls) -> Option<&'static str> {
    let has = |needles: &[&str]| needles.iter().any(|n| text.contains(n));
    match tls {
        Tls::Ca { .. } if has(&["UnknownIssuer", "BadSignature", "invalid peer certificate"]) => Some(
            "the server's certificate is not signed by the cluster CA this client trusts: is the client config or CA file from another cluster?",
        ),
        Tls::Ca { .. } if has(&["InvalidContentType", "corrupt message", "InvalidMessage", "HTTP/2 was not negotiated"]) => {
            Some("the server does not speak TLS: it may be part of an --insecure cluster")
        }
        Tls::Insecure if has(&["connection reset", "Connection reset", "broken pipe", "Broken pipe", "frame with invalid size", "connection closed", "protocol error", "h2 protocol"]) => {
            Some("the server may require TLS: connect with the cluster's client config or --ca instead of --insecure")
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_name_the_likely_mismatch_and_debug_hides_keys() {
        let tls = Tls::ca("pem");
        let wrong_ca = "transport error: invalid peer certificate: UnknownIssuer";
        assert!(mismatch_hint(wrong_ca, &tls).is_some_and(|h| h.contains("not signed by the cluster CA")));
        let plain_server = "received corrupt message of type InvalidContentType";
        assert!(mismatch_hint(plain_server, &tls).is_some_and(|h| h.contains("does not speak TLS")));
        let tls_server = "h2 protocol error: http2 error: connection error detected: frame with invalid size";
        assert!(mismatch_hint(tls_server, &Tls::Insecure).is_some_and(|h| h.contains("may require TLS")));
        assert_eq!(mismatch_hint("tcp connect error: Connection refused", &tls), None);
        let with_key = Tls::Ca {
            ca_pem: "CA".into(),
            identity: Some(Identity::from_pem("CERT", "SECRET KEY")),
        };
        assert!(!format!("{with_key:?}").contains("SECRET"));
        assert!(Tls::Insecure.endpoint("127.0.0.1:1").is_ok());
        assert!(Tls::Insecure.endpoint("[::1]:7400").is_ok());
        assert!(Tls::Insecure.endpoint("localhost:7400").is_ok());
        for bad in [
            "127.0.0.1",
            "127.0.0.1:",
            "127.0.0.1:99999",
            "127.0.0.1:0",
            "127.0.0.1:abc",
            ":7400",
            "::1:7400",
        ] {
            assert!(
                matches!(Tls::Insecure.endpoint(bad), Err(TlsError::Address(..))),
                "{bad} was taken"
            );
        }
        assert!(matches!(
            Tls::Insecure.endpoint("bad host:1"),
            Err(TlsError::Address(..))
        ));
    }
}
