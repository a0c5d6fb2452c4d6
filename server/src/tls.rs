//! The cluster CA, server certificates bound to node ids, and where they live in a server
//! directory.
//!
//! `codafs cluster init` creates a CA (ECDSA P-256) for the new cluster and a certificate for the
//! first server. The CA private key stays on that server (`tls/ca.key`) and nowhere else: a
//! joining server makes its own key pair and sends a certificate signing request with its join
//! token; a server holding the CA key signs it (docs/SECURITY.md, "Certificates and the CA").
//!
//! Every server certificate names the server's node id (a URI SAN `urn:codafs:node:<id>`), the
//! DNS name [`SERVER_NAME`] (what every connection verifies, so addresses can change without new
//! certificates) plus the advertised host, and both the serverAuth and clientAuth extended key
//! usages: servers present them when they dial a peer, and a peer-only call is accepted only
//! when the certificate names a node id in the current Raft membership (`grpc::is_peer`), so a
//! removed server is refused at once although its certificate stays signed. Certificates are
//! valid until 4096; `codafs server --rotate-cert` gives a server a new key and certificate.
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use codafs_proto::tls::{Tls, SERVER_NAME};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

/// Prefix of the URI subject alternative name that binds a certificate to a node id.
pub const NODE_URI_PREFIX: &str = "urn:codafs:node:";

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
    #[error("not a usable certificate signing request: {0}")]
    BadCsr(String),
    #[error("{0}")]
    Invalid(String),
}

/// The cluster CA: certificate and private key, PEM (what a signing server holds).
#[derive(Clone)]
pub struct CaMaterial {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Everything a TLS server needs, as read from `DIR/tls/`.
#[derive(Clone)]
pub struct ServerTls {
    /// The cluster CA certificate (what peers are verified against).
    pub ca_cert_pem: String,
    /// The CA private key, only on a server that signs certificates (the one `cluster init`
    /// created, or one the operator moved the key to).
    pub ca_key_pem: Option<String>,
    pub cert_pem: String,
    pub key_pem: String,
}

impl ServerTls {
    /// The CA with its key, if this server holds the key.
    pub fn signer(&self) -> Option<CaMaterial> {
        self.ca_key_pem.as_ref().map(|k| CaMaterial {
            cert_pem: self.ca_cert_pem.clone(),
            key_pem: k.clone(),
        })
    }
}

/// The CA's subject and constraints.
fn ca_params(cluster_id: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "codafs");
    dn.push(DnType::CommonName, codafs_proto::tls::ca_common_name(cluster_id));
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
/// A new cluster's CA and the cluster id its key gives ([`codafs_proto::tls::key_cluster_id`]),
/// which its name carries: clients take the id from it, and no other CA can carry that id.
pub fn new_cluster_ca() -> Result<(String, CaMaterial), TlsError> {
    use rcgen::PublicKeyData as _;
    let key = KeyPair::generate()?;
    let cluster_id = codafs_proto::tls::key_cluster_id(key.der_bytes());
    let mut params = ca_params(&cluster_id);
    params.serial_number = Some(random_serial());
    let cert = params.self_signed(&key)?;
    let ca = CaMaterial {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    };
    Ok((cluster_id, ca))
}

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

/// The parameters of node `node_id`'s certificate, advertised at `advertised`.
fn server_params(node_id: u64, advertised: &str) -> Result<CertificateParams, TlsError> {
    let mut sans = vec![
        SanType::DnsName(SERVER_NAME.try_into()?),
        SanType::URI(format!("{NODE_URI_PREFIX}{node_id}").try_into()?),
    ];
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
        .push(DnType::CommonName, format!("codafs node {node_id}"));
    params.subject_alt_names = sans;
    params.serial_number = Some(random_serial());
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// Signs a certificate for node `node_id` over `public_key` with the CA. The node id and address
/// come from the signer (a verified certificate or the join request it checked), never from a
/// signing request.
pub fn sign_server_cert(
    ca: &CaMaterial,
    node_id: u64,
    advertised: &str,
    public_key: &impl PublicKeyData,
) -> Result<String, TlsError> {
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, KeyPair::from_pem(&ca.key_pem)?)?;
    Ok(server_params(node_id, advertised)?
        .signed_by(public_key, &issuer)?
        .pem())
}

/// Signs the public key of a PEM certificate signing request for node `node_id`; the request's
/// own subject and extensions are ignored (its signature proves the requester holds the key).
pub fn sign_csr(ca: &CaMaterial, node_id: u64, advertised: &str, csr_pem: &str) -> Result<String, TlsError> {
    let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| TlsError::BadCsr(e.to_string()))?;
    sign_server_cert(ca, node_id, advertised, &csr.public_key)
}

/// A new key pair and a signing request for it: (key PEM, request PEM).
pub fn new_key_and_csr() -> Result<(String, String), TlsError> {
    let key = KeyPair::generate()?;
    let csr = CertificateParams::default().serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
}

/// The node id a certificate (DER) is bound to, if it names one.
pub fn node_id_of_der(der: &[u8]) -> Option<u64> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => u.strip_prefix(NODE_URI_PREFIX)?.parse().ok(),
        _ => None,
    })
}

/// The DER of the first certificate in a PEM text.
fn der_of_pem(pem: &str) -> Result<Vec<u8>, TlsError> {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| TlsError::Invalid(format!("not a PEM certificate: {e}")))?;
    Ok(p.contents)
}

/// The node id a certificate (PEM) is bound to, if it names one.
pub fn node_id_of_pem(pem: &str) -> Result<Option<u64>, TlsError> {
    Ok(node_id_of_der(&der_of_pem(pem)?))
}

/// Whether the private key `key_pem` belongs to the certificate `cert_pem`.
pub fn key_matches(cert_pem: &str, key_pem: &str) -> Result<bool, TlsError> {
    let key = KeyPair::from_pem(key_pem)?;
    let der = der_of_pem(cert_pem)?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(&der).map_err(|e| TlsError::Invalid(format!("bad certificate: {e}")))?;
    Ok(cert.public_key().subject_public_key.data.as_ref() == key.public_key_raw())
}

/// Issues node `node_id`'s certificate with a new key, signed locally by `ca`: (cert, key) PEM.
pub fn issue_locally(ca: &CaMaterial, node_id: u64, advertised: &str) -> Result<(String, String), TlsError> {
    let key = KeyPair::generate()?;
    Ok((sign_server_cert(ca, node_id, advertised, &key)?, key.serialize_pem()))
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

/// Writes the TLS files of the server `cluster init` creates: the CA with its key (this server
/// signs joiners' certificates) and its own certificate for node `node_id`. Keys mode 0600;
/// refuses to overwrite existing files.
pub fn install_with_ca(dir: &Path, ca: &CaMaterial, node_id: u64, advertised: &str) -> Result<ServerTls, TlsError> {
    let (cert_pem, key_pem) = issue_locally(ca, node_id, advertised)?;
    let tls = tls_dir(dir)?;
    write_file(&tls.join(CA_KEY_FILE), &ca.key_pem, true)?;
    install(dir, &ca.cert_pem, &cert_pem, &key_pem)?;
    Ok(ServerTls {
        ca_cert_pem: ca.cert_pem.clone(),
        ca_key_pem: Some(ca.key_pem.clone()),
        cert_pem,
        key_pem,
    })
}

fn tls_dir(dir: &Path) -> Result<PathBuf, TlsError> {
    let tls = dir.join(TLS_DIR);
    std::fs::create_dir_all(&tls).map_err(|e| TlsError::Io(tls.clone(), e))?;
    Ok(tls)
}

/// Writes the TLS files of a server without the CA key (a joiner): the CA certificate and its
/// own key and certificate. Refuses to overwrite existing files.
pub fn install(dir: &Path, ca_cert_pem: &str, cert_pem: &str, key_pem: &str) -> Result<ServerTls, TlsError> {
    let tls = tls_dir(dir)?;
    // The key file first: a crash in between leaves no certificate that looks usable.
    write_file(&tls.join(SERVER_KEY_FILE), key_pem, true)?;
    write_file(&tls.join(CA_CERT_FILE), ca_cert_pem, false)?;
    write_file(&tls.join(SERVER_CERT_FILE), cert_pem, false)?;
    Ok(ServerTls {
        ca_cert_pem: ca_cert_pem.to_string(),
        ca_key_pem: None,
        cert_pem: cert_pem.to_string(),
        key_pem: key_pem.to_string(),
    })
}

/// Suffix of the new key and certificate while they replace the old ones.
const NEW_SUFFIX: &str = "new";

/// Replaces this server's key and certificate (rotation). Both new files are written and synced
/// first, then renamed over the old ones key first; [`load`] finishes an interrupted
/// replacement, so a crash never leaves a key that does not match its certificate.
pub fn replace_server_cert(dir: &Path, cert_pem: &str, key_pem: &str) -> Result<(), TlsError> {
    let tls = tls_dir(dir)?;
    let key_new = tls.join(SERVER_KEY_FILE).with_extension(format!("key.{NEW_SUFFIX}"));
    let cert_new = tls.join(SERVER_CERT_FILE).with_extension(format!("crt.{NEW_SUFFIX}"));
    for p in [&key_new, &cert_new] {
        match std::fs::remove_file(p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(TlsError::Io(p.clone(), e)),
            _ => {}
        }
    }
    write_file(&key_new, key_pem, true)?;
    write_file(&cert_new, cert_pem, false)?;
    finish_replacement(&tls)
}

/// Renames a fully written new key and certificate (see [`replace_server_cert`]) into place.
fn finish_replacement(tls: &Path) -> Result<(), TlsError> {
    let key_new = tls.join(SERVER_KEY_FILE).with_extension(format!("key.{NEW_SUFFIX}"));
    let cert_new = tls.join(SERVER_CERT_FILE).with_extension(format!("crt.{NEW_SUFFIX}"));
    if !cert_new.exists() {
        // Nothing under way (a lone new key is a write that never completed).
        let _ = std::fs::remove_file(&key_new);
        return Ok(());
    }
    let rename = |from: &Path, to: &Path| std::fs::rename(from, to).map_err(|e| TlsError::Io(to.to_path_buf(), e));
    if key_new.exists() {
        rename(&key_new, &tls.join(SERVER_KEY_FILE))?;
    }
    rename(&cert_new, &tls.join(SERVER_CERT_FILE))?;
    std::fs::File::open(tls)
        .and_then(|d| d.sync_all())
        .map_err(|e| TlsError::Io(tls.to_path_buf(), e))
}

/// Whether `dir/tls/` holds a server certificate.
pub fn installed(dir: &Path) -> bool {
    dir.join(TLS_DIR).join(SERVER_CERT_FILE).exists()
}

/// Reads `dir/tls/` (finishing an interrupted certificate replacement first). `ca.key` is
/// optional: only a signing server has it, and it must belong to `ca.crt`.
pub fn load(dir: &Path) -> Result<ServerTls, TlsError> {
    let tls = dir.join(TLS_DIR);
    if tls.exists() {
        finish_replacement(&tls)?;
    }
    let read = |name: &str| {
        let p = tls.join(name);
        std::fs::read_to_string(&p).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => TlsError::Missing(p.clone()),
            _ => TlsError::Io(p.clone(), e),
        })
    };
    let ca_key_pem = match read(CA_KEY_FILE) {
        Ok(k) => Some(k),
        Err(TlsError::Missing(_)) => None,
        Err(e) => return Err(e),
    };
    let loaded = ServerTls {
        ca_cert_pem: read(CA_CERT_FILE)?,
        ca_key_pem,
        cert_pem: read(SERVER_CERT_FILE)?,
        key_pem: read(SERVER_KEY_FILE)?,
    };
    if let Some(k) = &loaded.ca_key_pem {
        if !key_matches(&loaded.ca_cert_pem, k)? {
            return Err(TlsError::Invalid(format!(
                "{} does not belong to the CA certificate {}",
                tls.join(CA_KEY_FILE).display(),
                tls.join(CA_CERT_FILE).display()
            )));
        }
    }
    if !key_matches(&loaded.cert_pem, &loaded.key_pem)? {
        return Err(TlsError::Invalid(format!(
            "{} does not belong to {}",
            tls.join(SERVER_KEY_FILE).display(),
            tls.join(SERVER_CERT_FILE).display()
        )));
    }
    Ok(loaded)
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
            .client_ca_root(Certificate::from_pem(&self.ca_cert_pem))
            .client_auth_optional(true)
            .timeout(HANDSHAKE_TIMEOUT)
    }

    /// Settings for dialling peers: verify them against the CA, present our certificate.
    pub fn peer_transport(&self) -> Tls {
        Tls::Ca {
            ca_pem: self.ca_cert_pem.clone(),
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

    /// Clients take the cluster id from the CA's name (servers could claim any); a new
    /// cluster's id is its CA key's, which no other CA can carry.
    #[test]
    fn a_ca_names_its_cluster() {
        let (id, ca) = new_cluster_ca().unwrap();
        assert_eq!(id.len(), 32);
        assert_eq!(Tls::ca(ca.cert_pem).cluster_id(), Some(id.clone()));
        let forged = new_ca(&id).unwrap();
        assert_eq!(
            Tls::ca(forged.cert_pem).cluster_id(),
            None,
            "another key cannot carry it"
        );
        let legacy = "0a1b2c3d4e5f60718293a4b5";
        let old = new_ca(legacy).unwrap();
        assert_eq!(
            Tls::ca(old.cert_pem).cluster_id().as_deref(),
            Some(legacy),
            "older ids by name"
        );
        assert_eq!(Tls::ca(new_ca("0a1b2c").unwrap().cert_pem).cluster_id(), None);
        assert_eq!(Tls::Insecure.cluster_id(), None);
        assert_eq!(Tls::ca("not a certificate").cluster_id(), None);
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, "some other CA");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let other = p.self_signed(&key).unwrap();
        assert_eq!(
            Tls::ca(other.pem()).cluster_id(),
            None,
            "a CA named otherwise names none"
        );
    }

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
        install_with_ca(dir.path(), &ca, 42, "files.example.com:7400").unwrap();
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
        assert!(same_pem(&loaded.ca_cert_pem, &ca.cert_pem));
        assert!(loaded.ca_key_pem.is_some());
        assert_eq!(node_id_of_pem(&loaded.cert_pem).unwrap(), Some(42));
        // Installing again never overwrites.
        assert!(install_with_ca(dir.path(), &ca, 42, "x:1").is_err());
        assert!(matches!(
            load(tempfile::tempdir().unwrap().path()),
            Err(TlsError::Missing(_))
        ));
    }

    #[test]
    fn a_joiner_gets_a_certificate_for_its_node_id_without_the_ca_key() {
        let ca = new_ca("c1").unwrap();
        let (key, csr) = new_key_and_csr().unwrap();
        let cert = sign_csr(&ca, 7, "10.0.0.2:7400", &csr).unwrap();
        assert_eq!(node_id_of_pem(&cert).unwrap(), Some(7));
        assert!(key_matches(&cert, &key).unwrap());
        let dir = tempfile::tempdir().unwrap();
        install(dir.path(), &ca.cert_pem, &cert, &key).unwrap();
        assert!(!dir.path().join(TLS_DIR).join(CA_KEY_FILE).exists());
        let loaded = load(dir.path()).unwrap();
        assert!(loaded.ca_key_pem.is_none() && loaded.signer().is_none());
        assert!(matches!(sign_csr(&ca, 7, "x:1", "garbage"), Err(TlsError::BadCsr(_))));
        // Another key's certificate is refused at load.
        let (other_cert, _) = issue_locally(&ca, 7, "x:1").unwrap();
        assert!(!key_matches(&other_cert, &key).unwrap());
    }

    #[test]
    fn replacing_a_certificate_survives_an_interruption() {
        let ca = new_ca("c1").unwrap();
        let dir = tempfile::tempdir().unwrap();
        install_with_ca(dir.path(), &ca, 9, "x:1").unwrap();
        let (cert, key) = issue_locally(&ca, 9, "x:1").unwrap();
        replace_server_cert(dir.path(), &cert, &key).unwrap();
        let loaded = load(dir.path()).unwrap();
        assert!(same_pem(&loaded.cert_pem, &cert) && same_pem(&loaded.key_pem, &key));
        // A crash after the key was renamed but before the certificate was: load finishes it.
        let (cert2, key2) = issue_locally(&ca, 9, "x:1").unwrap();
        let tls = dir.path().join(TLS_DIR);
        std::fs::write(tls.join(SERVER_KEY_FILE), &key2).unwrap();
        std::fs::write(tls.join("server.crt.new"), &cert2).unwrap();
        let loaded = load(dir.path()).unwrap();
        assert!(same_pem(&loaded.cert_pem, &cert2) && same_pem(&loaded.key_pem, &key2));
    }
}
