//! Certificates and rustls configuration for mutual TLS.
//!
//! The coordinator is the mesh CA. It signs its own server certificate
//! (`coordinator.skein`), node certificates from their CSRs (`<node_id>.node.skein`) and client
//! certificates. Every connection checks the peer's chain against the CA; a node on its first
//! join pins the CA by the sha256 fingerprint carried in the join token.

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::sync::Arc;

/// Errors while building or loading certificates.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// Certificate generation or signing failed.
    #[error("certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// rustls refused the configuration.
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
    /// PEM text did not contain what was expected.
    #[error("pem: {0}")]
    Pem(String),
    /// The verifier could not be built.
    #[error("verifier: {0}")]
    Verifier(String),
    /// Reading or writing key material failed.
    #[error("{path}: {source}")]
    Io {
        /// File involved.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
}

/// TLS server name of the coordinator.
pub fn coordinator_server_name() -> &'static str {
    "coordinator.skein"
}

/// TLS server name of a node.
pub fn node_server_name(node_id: &str) -> String {
    format!("{node_id}.node.skein")
}

/// A node's id: hex of the first 16 bytes of sha256 over its public key (DER).
pub fn node_id_from_public_key(public_key_der: &[u8]) -> String {
    hex::encode(&Sha256::digest(public_key_der)[..16])
}

/// Lower-case hex sha256 of a DER certificate.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

fn pem_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = pem::parse_many(pem)
        .map_err(|e| TlsError::Pem(e.to_string()))?
        .into_iter()
        .filter(|p| p.tag() == "CERTIFICATE")
        .map(|p| CertificateDer::from(p.into_contents()))
        .collect::<Vec<_>>();
    if certs.is_empty() {
        return Err(TlsError::Pem("no CERTIFICATE block".into()));
    }
    Ok(certs)
}

pub(crate) fn write_private(path: &Path, contents: &str) -> Result<(), TlsError> {
    let io = |source| TlsError::Io {
        path: path.display().to_string(),
        source,
    };
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).map_err(io)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)
}

pub(crate) fn read_file(path: &Path) -> Result<Option<String>, TlsError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TlsError::Io {
            path: path.display().to_string(),
            source,
        }),
    }
}

/// An identity in the mesh: CA certificate, own certificate chain and private key, all PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The mesh CA certificate.
    pub ca_pem: String,
    /// This identity's certificate (chain, leaf first).
    pub cert_pem: String,
    /// This identity's private key (PKCS#8).
    pub key_pem: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("cert", &self.fingerprint().unwrap_or_default())
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// The certificate chain, leaf first.
    pub fn chain(&self) -> Result<Vec<CertificateDer<'static>>, TlsError> {
        pem_certs(&self.cert_pem)
    }
    /// The private key.
    pub fn key(&self) -> Result<PrivateKeyDer<'static>, TlsError> {
        let p = pem::parse(&self.key_pem).map_err(|e| TlsError::Pem(e.to_string()))?;
        PrivateKeyDer::try_from(p.into_contents()).map_err(|e| TlsError::Pem(e.to_string()))
    }
    /// Root store holding only the mesh CA.
    pub fn roots(&self) -> Result<RootCertStore, TlsError> {
        let mut roots = RootCertStore::empty();
        for c in pem_certs(&self.ca_pem)? {
            roots.add(c)?;
        }
        Ok(roots)
    }
    /// sha256 fingerprint of the leaf certificate.
    pub fn fingerprint(&self) -> Result<String, TlsError> {
        let chain = self.chain()?;
        Ok(fingerprint(&chain[0]))
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Whether a server requires client certificates on every connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// Every client must present a certificate signed by the mesh CA (nodes).
    Required,
    /// Clients may connect without one; each request then checks what it needs (coordinator:
    /// only `Join` works without a certificate).
    Optional,
}

/// rustls server configuration for `creds`, offering `alpns`.
pub fn server_config(
    creds: &Credentials,
    alpns: &[&[u8]],
    auth: ClientAuth,
) -> Result<rustls::ServerConfig, TlsError> {
    let roots = Arc::new(creds.roots()?);
    let builder = rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider());
    let verifier = match auth {
        ClientAuth::Required => builder.build(),
        ClientAuth::Optional => builder.allow_unauthenticated().build(),
    }
    .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(creds.chain()?, creds.key()?)?;
    cfg.alpn_protocols = alpns.iter().map(|a| a.to_vec()).collect();
    Ok(cfg)
}

/// rustls client configuration trusting the mesh CA and presenting `creds` (no certificate
/// when `creds.cert_pem` is empty).
pub fn client_config(creds: &Credentials, alpn: &[u8]) -> Result<rustls::ClientConfig, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(creds.roots()?);
    // A client known by its API key alone presents no certificate.
    let mut cfg = if creds.cert_pem.trim().is_empty() {
        builder.with_no_client_auth()
    } else {
        builder.with_client_auth_cert(creds.chain()?, creds.key()?)?
    };
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Ok(cfg)
}

/// rustls client configuration for a first join: no client certificate; the server's chain must
/// contain a CA certificate with sha256 `ca_fingerprint` that signs the server's certificate.
pub fn pinned_client_config(
    ca_fingerprint: &str,
    alpn: &[u8],
) -> Result<rustls::ClientConfig, TlsError> {
    let verifier = Arc::new(PinnedCaVerifier {
        fingerprint: ca_fingerprint.to_ascii_lowercase(),
        provider: provider(),
    });
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Ok(cfg)
}

/// Verifies a server against the CA certificate in its own chain whose fingerprint is pinned.
#[derive(Debug)]
struct PinnedCaVerifier {
    fingerprint: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| fingerprint(c) == self.fingerprint)
            .ok_or_else(|| {
                rustls::Error::General(
                    "the coordinator's CA does not match the fingerprint in the join token".into(),
                )
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// sha256 fingerprint of the leaf certificate the peer of `conn` presented, if any.
pub fn peer_fingerprint(conn: &quinn::Connection) -> Option<String> {
    let any = conn.peer_identity()?;
    let certs = any.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    certs.first().map(|c| fingerprint(c))
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Skein mesh CA");
    dn.push(DnType::OrganizationName, "Skein");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn leaf_params(common_name: &str, dns_names: Vec<String>) -> Result<CertificateParams, TlsError> {
    let mut params = CertificateParams::new(dns_names)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    Ok(params)
}

/// The mesh certificate authority, kept by the coordinator.
pub struct MeshCa {
    cert: rcgen::Certificate,
    cert_pem: String,
    key: KeyPair,
}

impl std::fmt::Debug for MeshCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshCa")
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

impl MeshCa {
    /// Load `ca.crt`/`ca.key` from `dir`, or create them (key mode 0600) on first start.
    pub fn load_or_create(dir: &Path) -> Result<MeshCa, TlsError> {
        let crt = dir.join("ca.crt");
        let key_path = dir.join("ca.key");
        if let (Some(cert_pem), Some(key_pem)) = (read_file(&crt)?, read_file(&key_path)?) {
            let key = KeyPair::from_pem(&key_pem)?;
            // Only the issuer's name and key matter for signing; the distributed certificate
            // stays the one on disk.
            let cert = ca_params().self_signed(&key)?;
            return Ok(MeshCa {
                cert,
                cert_pem,
                key,
            });
        }
        std::fs::create_dir_all(dir).map_err(|source| TlsError::Io {
            path: dir.display().to_string(),
            source,
        })?;
        let key = KeyPair::generate()?;
        let cert = ca_params().self_signed(&key)?;
        let cert_pem = cert.pem();
        write_private(&key_path, &key.serialize_pem())?;
        std::fs::write(&crt, &cert_pem).map_err(|source| TlsError::Io {
            path: crt.display().to_string(),
            source,
        })?;
        Ok(MeshCa {
            cert,
            cert_pem,
            key,
        })
    }

    /// A CA held only in memory (tests).
    pub fn ephemeral() -> Result<MeshCa, TlsError> {
        let key = KeyPair::generate()?;
        let cert = ca_params().self_signed(&key)?;
        let cert_pem = cert.pem();
        Ok(MeshCa {
            cert,
            cert_pem,
            key,
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// sha256 fingerprint of the CA certificate as distributed.
    pub fn fingerprint(&self) -> String {
        pem_certs(&self.cert_pem)
            .ok()
            .and_then(|c| c.first().map(|c| fingerprint(c)))
            .unwrap_or_default()
    }

    /// Credentials for the coordinator itself (`coordinator.skein`), chain includes the CA.
    pub fn issue_coordinator(&self) -> Result<Credentials, TlsError> {
        let key = KeyPair::generate()?;
        let params = leaf_params(
            "skein coordinator",
            vec![coordinator_server_name().to_string()],
        )?;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok(Credentials {
            ca_pem: self.cert_pem.clone(),
            cert_pem: format!("{}{}", cert.pem(), self.cert_pem),
            key_pem: key.serialize_pem(),
        })
    }

    /// Client credentials (SDK, CLI) named `name`.
    pub fn issue_client(&self, name: &str) -> Result<Credentials, TlsError> {
        let key = KeyPair::generate()?;
        let params = leaf_params(name, vec![format!("{name}.client.skein")])?;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok(Credentials {
            ca_pem: self.cert_pem.clone(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Sign a node's CSR. The certificate names `<node_id>.node.skein`, where the node id is
    /// derived from the CSR's public key. Returns `(node_id, certificate PEM)`.
    pub fn sign_node_csr(&self, csr_pem: &str) -> Result<(String, String), TlsError> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
        let node_id = node_id_from_public_key(rcgen::PublicKeyData::der_bytes(&csr.public_key));
        csr.params = leaf_params(
            &format!("skein node {node_id}"),
            vec![node_server_name(&node_id)],
        )?;
        let cert = csr.signed_by(&self.cert, &self.key)?;
        Ok((node_id, cert.pem()))
    }
}

/// A node's persistent key pair, kept on disk so the node keeps its identity across restarts.
pub struct NodeKey {
    key: KeyPair,
}

impl NodeKey {
    /// Load `node.key` from `dir` or create it (mode 0600).
    pub fn load_or_create(dir: &Path) -> Result<NodeKey, TlsError> {
        let path = dir.join("node.key");
        if let Some(pem) = read_file(&path)? {
            return Ok(NodeKey {
                key: KeyPair::from_pem(&pem)?,
            });
        }
        std::fs::create_dir_all(dir).map_err(|source| TlsError::Io {
            path: dir.display().to_string(),
            source,
        })?;
        let key = KeyPair::generate()?;
        write_private(&path, &key.serialize_pem())?;
        Ok(NodeKey { key })
    }

    /// The node id this key yields.
    pub fn node_id(&self) -> String {
        node_id_from_public_key(rcgen::PublicKeyData::der_bytes(&self.key))
    }

    /// A certificate signing request for this key.
    pub fn csr_pem(&self) -> Result<String, TlsError> {
        let params = CertificateParams::new(vec![])?;
        Ok(params.serialize_request(&self.key)?.pem()?)
    }

    /// The private key, PEM.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }
}

/// Write credentials (certificate and key) for later use; the key file gets mode 0600.
pub fn save_cert_and_key(dir: &Path, name: &str, creds: &Credentials) -> Result<(), TlsError> {
    std::fs::write(dir.join(format!("{name}.crt")), &creds.cert_pem).map_err(|source| {
        TlsError::Io {
            path: dir.display().to_string(),
            source,
        }
    })?;
    write_private(&dir.join(format!("{name}.key")), &creds.key_pem)
}

/// sha256 fingerprint of the first certificate in `pem`.
pub fn pem_fingerprint(pem: &str) -> Result<String, TlsError> {
    let certs = pem_certs(pem)?;
    Ok(fingerprint(&certs[0]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_persists_and_signs_nodes() {
        let dir = tempfile::tempdir().unwrap();
        let ca = MeshCa::load_or_create(dir.path()).unwrap();
        let again = MeshCa::load_or_create(dir.path()).unwrap();
        assert_eq!(ca.fingerprint(), again.fingerprint());
        let nk = NodeKey::load_or_create(dir.path()).unwrap();
        let nk2 = NodeKey::load_or_create(dir.path()).unwrap();
        assert_eq!(nk.node_id(), nk2.node_id());
        let (id, pem) = again.sign_node_csr(&nk.csr_pem().unwrap()).unwrap();
        assert_eq!(id, nk.node_id());
        assert!(pem.contains("BEGIN CERTIFICATE"));
        assert!(again.sign_node_csr("not a csr").is_err());
    }
}
