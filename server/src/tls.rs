//! The cluster CA and server certificates, and where they live in a server directory.
//!
//! `codafs cluster init` creates a CA (ECDSA P-256) for the new cluster and a certificate for the
//! first server; a joining server receives the CA certificate and key over TLS (after proving it
//! holds the join key) and issues its own certificate. Every server therefore holds the CA key:
//! that adds no trust beyond what a server already has, since every server also holds the
//! token-signing keys in the replicated state and can act as any user.
//!
//! Server certificates carry the DNS name [`SERVER_NAME`] (what every connection verifies, so
//! addresses can change without new certificates) plus the advertised host, and both the
//! serverAuth and clientAuth extended key usages: servers present them when they dial a peer,
//! which is how a server tells a peer from a client. Certificates are valid until 4096; there is
//! no rotation (see docs/CONFIGURATION.md).
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use codafs_proto::tls::{Tls, SERVER_NAME};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

/// Folder of a server directory holding the TLS files.
pub const TLS_DIR: &str = "tls";
pub const CA_CERT_FILE: &str = "ca.crt";
pub const CA_KEY_FILE: &str = "ca.key";
pub const SERVER_CERT_FILE: &str = "server.crt";
pub const SERVER_KEY_FILE: &str = "server.key";

/// How long a TLS handshake on the listener may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Certificate problems, one line each.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("generating certificates: {0}")]
    Generate(#[from] rcgen::Error),
    #[error(
        "{0} is missing: this server has no TLS certificate (was it created before TLS, or copied without its tls/ folder?)"
    )]
    Missing(PathBuf),
    #[error("the CA certificate received while joining differs from the one in the join token")]
    CaMismatch,
}

/// The cluster CA: certificate and private key, PEM.
#[derive(Clone)]
pub struct CaMaterial {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Everything a TLS server needs, as read from `DIR/tls/`.
#[derive(Clone)]
pub struct ServerTls {
    pub ca: CaMaterial,
    pub cert_pem: String,
    pub key_pem: String,
}

/// The CA's subject, rebuilt identically whenever a certificate is issued (issuing needs the
/// CA's name and key, not its certificate).
fn ca_params(cluster_id: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "codafs");
    dn.push(DnType::CommonName, format!("codafs cluster {cluster_id} CA"));
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p
}

fn random_serial() -> SerialNumber {
    let mut b: [u8; 16] = rand::random();
    b[0] &= 0x7f;
    SerialNumber::from_slice(&b)
}

/// A new CA for cluster `cluster_id`.
pub fn new_ca(cluster_id: &str) -> Result<CaMaterial, TlsError> {
    let key = KeyPair::generate()?;
    let mut params = ca_params(cluster_id);
    params.serial_number = Some(random_serial());
    let cert = params.self_signed(&key)?;
    Ok(CaMaterial {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// The host part of `host:port` or `[v6]:port`.
fn host_of(addr: &str) -> &str {
    if let Some(rest) = addr.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    addr.rsplit_once(':').map_or(addr, |(h, _)| h)
}

/// Issues a server certificate (new key) for a server advertised at `advertised`.
/// Returns (certificate PEM, key PEM).
pub fn issue_server_cert(ca: &CaMaterial, cluster_id: &str, advertised: &str) -> Result<(String, String), TlsError> {
    let ca_key = KeyPair::from_pem(&ca.key_pem)?;
    let issuer = Issuer::new(ca_params(cluster_id), ca_key);
    let mut sans = vec![SanType::DnsName(SERVER_NAME.try_into()?)];
    let host = host_of(advertised);
    match host.parse::<IpAddr>() {
        Ok(ip) => sans.push(SanType::IpAddress(ip)),
        // A host name that is not a valid DNS name is left out: SERVER_NAME is what is verified.
        Err(_) => {
            if let Ok(name) = host.to_string().try_into() {
                if host != SERVER_NAME {
                    sans.push(SanType::DnsName(name));
                }
            }
        }
    }
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("codafs server {advertised}"));
    params.subject_alt_names = sans;
    params.serial_number = Some(random_serial());
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn write_file(path: &Path, data: &str, private: bool) -> Result<(), TlsError> {
    let io = |e| TlsError::Io(path.to_path_buf(), e);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(path)
        .map_err(io)?;
    std::io::Write::write_all(&mut f, data.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)
}

/// Issues this server's certificate and writes the CA and it to `dir/tls/` (keys mode 0600).
/// Refuses to overwrite existing files.
pub fn install(dir: &Path, ca: &CaMaterial, cluster_id: &str, advertised: &str) -> Result<ServerTls, TlsError> {
    let (cert_pem, key_pem) = issue_server_cert(ca, cluster_id, advertised)?;
    let tls = dir.join(TLS_DIR);
    std::fs::create_dir_all(&tls).map_err(|e| TlsError::Io(tls.clone(), e))?;
    // The key files first: a crash in between leaves no certificate that looks usable.
    write_file(&tls.join(CA_KEY_FILE), &ca.key_pem, true)?;
    write_file(&tls.join(SERVER_KEY_FILE), &key_pem, true)?;
    write_file(&tls.join(CA_CERT_FILE), &ca.cert_pem, false)?;
    write_file(&tls.join(SERVER_CERT_FILE), &cert_pem, false)?;
    Ok(ServerTls {
        ca: ca.clone(),
        cert_pem,
        key_pem,
    })
}

/// Whether `dir/tls/` holds a server certificate.
pub fn installed(dir: &Path) -> bool {
    dir.join(TLS_DIR).join(SERVER_CERT_FILE).exists()
}

/// Reads `dir/tls/`.
pub fn load(dir: &Path) -> Result<ServerTls, TlsError> {
    let tls = dir.join(TLS_DIR);
    let read = |name: &str| {
        let p = tls.join(name);
        std::fs::read_to_string(&p).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => TlsError::Missing(p.clone()),
            _ => TlsError::Io(p.clone(), e),
        })
    };
    Ok(ServerTls {
        ca: CaMaterial {
            cert_pem: read(CA_CERT_FILE)?,
            key_pem: read(CA_KEY_FILE)?,
        },
        cert_pem: read(SERVER_CERT_FILE)?,
        key_pem: read(SERVER_KEY_FILE)?,
    })
}

/// The cluster CA certificate of a server directory (what clients need to trust).
pub fn ca_cert_of(dir: &Path) -> Result<String, TlsError> {
    let p = dir.join(TLS_DIR).join(CA_CERT_FILE);
    std::fs::read_to_string(&p).map_err(|e| TlsError::Io(p, e))
}

impl ServerTls {
    /// The listener's settings: our certificate, and client certificates verified against the
    /// cluster CA when offered (mounts and CLIs offer none; peers must, see `grpc::require_peer`).
    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .client_ca_root(Certificate::from_pem(&self.ca.cert_pem))
            .client_auth_optional(true)
            .timeout(HANDSHAKE_TIMEOUT)
    }

    /// Settings for dialling peers: verify them against the CA, present our certificate.
    pub fn peer_transport(&self) -> Tls {
        Tls::Ca {
            ca_pem: self.ca.cert_pem.clone(),
            identity: Some(Identity::from_pem(&self.cert_pem, &self.key_pem)),
        }
    }
}

/// Whether two PEM texts hold the same certificate (ignoring surrounding whitespace).
pub fn same_pem(a: &str, b: &str) -> bool {
    a.trim() == b.trim()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_of_addresses() {
        assert_eq!(host_of("127.0.0.1:7400"), "127.0.0.1");
        assert_eq!(host_of("[::1]:7400"), "::1");
        assert_eq!(host_of("files.example.com:7400"), "files.example.com");
        assert_eq!(host_of("noport"), "noport");
    }

    #[test]
    fn install_writes_private_keys_and_loads_back() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let ca = new_ca("c1").unwrap();
        install(dir.path(), &ca, "c1", "files.example.com:7400").unwrap();
        for (f, mode) in [
            (CA_KEY_FILE, 0o600),
            (SERVER_KEY_FILE, 0o600),
            (CA_CERT_FILE, 0o644),
            (SERVER_CERT_FILE, 0o644),
        ] {
            let m = std::fs::metadata(dir.path().join(TLS_DIR).join(f)).unwrap();
            assert_eq!(m.permissions().mode() & 0o777, mode, "{f}");
        }
        let loaded = load(dir.path()).unwrap();
        assert!(same_pem(&loaded.ca.cert_pem, &ca.cert_pem));
        assert!(loaded.cert_pem.contains("BEGIN CERTIFICATE"));
        // Installing again never overwrites.
        assert!(install(dir.path(), &ca, "c1", "x:1").is_err());
        assert!(matches!(
            load(tempfile::tempdir().unwrap().path()),
            Err(TlsError::Missing(_))
        ));
    }
}
