//! The hub's PKI: its CA, its server certificate, the admin credential, and
//! the signing of enrollment requests.
//!
//! Files in the data directory (keys are created mode 0600):
//!
//! ```text
//! ca.crt  ca.key          the CA; its SHA-256 fingerprint is pinned by join tokens
//! server.crt  server.key  the hub's QUIC certificate (SANs from --san)
//! admin.crt  admin.key    an admin client credential for local operator use
//! ```

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use muster_protocol::tls::fingerprint;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use time::{Duration, OffsetDateTime};

/// CA lifetime: long, since rotating it means re-enrolling every agent.
const CA_VALIDITY: Duration = Duration::days(3650);
/// Leaf lifetime for the server and client certificates.
const LEAF_VALIDITY: Duration = Duration::days(825);
/// Backdating absorbs modest clock skew between hub and agents.
const BACKDATE: Duration = Duration::hours(1);

/// File names in the data directory.
pub const CA_CERT: &str = "ca.crt";
/// The CA private key.
pub const CA_KEY: &str = "ca.key";
/// The server certificate.
pub const SERVER_CERT: &str = "server.crt";
/// The server private key.
pub const SERVER_KEY: &str = "server.key";
/// The admin client certificate.
pub const ADMIN_CERT: &str = "admin.crt";
/// The admin client private key.
pub const ADMIN_KEY: &str = "admin.key";

/// A PKI operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// rcgen refused to build or sign a certificate.
    #[error("certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// A private key is readable by group or others.
    #[error(
        "{path} has mode {mode:o}: a private key must not be readable by group or others; run `chmod 600 {path}`"
    )]
    Exposed {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A PEM file did not hold what it should.
    #[error("{path}: not a valid PEM {what}")]
    BadPem {
        /// The file.
        path: PathBuf,
        /// What was expected.
        what: &'static str,
    },
}

/// The loaded PKI of a running hub.
pub struct Pki {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate (DER).
    pub ca_der: CertificateDer<'static>,
    /// The CA certificate (PEM), sent to enrolling peers.
    pub ca_pem: String,
    /// The server chain: the leaf, then the CA (so enrolling peers can pin it).
    pub server_chain: Vec<CertificateDer<'static>>,
    /// The server key.
    pub server_key: PrivateKeyDer<'static>,
}

/// A freshly issued client credential.
pub struct Credential {
    /// PEM certificate.
    pub cert_pem: String,
    /// PEM private key.
    pub key_pem: String,
    /// SHA-256 of the certificate, the identity key in the hub's store.
    pub fingerprint: String,
}

impl Pki {
    /// Creates the CA, the server certificate and the admin credential in `dir`.
    /// Returns the PKI and the admin credential.
    ///
    /// # Errors
    /// [`PkiError`] when a file cannot be written or a certificate cannot be built.
    pub fn create(dir: &Path, sans: &[String]) -> Result<(Pki, Credential), PkiError> {
        let now = OffsetDateTime::now_utc();
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.distinguished_name = dn("muster hub CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        ca_params.not_before = now - BACKDATE;
        ca_params.not_after = now + CA_VALIDITY;
        let ca_cert = ca_params.self_signed(&ca_key)?;
        write_file(&dir.join(CA_CERT), ca_cert.pem().as_bytes(), 0o644)?;
        write_file(&dir.join(CA_KEY), ca_key.serialize_pem().as_bytes(), 0o600)?;
        let issuer = Issuer::new(ca_params, ca_key);
        issue_server(dir, sans, &issuer)?;
        let pki = Pki::load(dir)?;
        let admin_key = KeyPair::generate()?;
        let admin = pki.issue_client("admin", &admin_key)?;
        write_file(&dir.join(ADMIN_CERT), admin.cert_pem.as_bytes(), 0o644)?;
        write_file(&dir.join(ADMIN_KEY), admin.key_pem.as_bytes(), 0o600)?;
        Ok((pki, admin))
    }

    /// A further hub of a cluster: `dir` holds the first hub's CA (`ca.crt`,
    /// `ca.key`) and admin credential (`admin.crt`, `admin.key`), copied; this
    /// issues this hub's own server certificate for `sans` from that CA.
    ///
    /// # Errors
    /// [`PkiError`] naming a missing or malformed file.
    pub fn join(dir: &Path, sans: &[String]) -> Result<Pki, PkiError> {
        for f in [ADMIN_CERT, ADMIN_KEY] {
            read(&dir.join(f))?;
        }
        let ca_pem = read(&dir.join(CA_CERT))?;
        let ca_key = KeyPair::from_pem(&read_secret(&dir.join(CA_KEY))?)?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;
        issue_server(dir, sans, &issuer)?;
        Pki::load(dir)
    }

    /// Loads the PKI from `dir`. The server key may come from a systemd credential
    /// (`$CREDENTIALS_DIRECTORY/hub-server-key`) instead of the data directory.
    ///
    /// # Errors
    /// [`PkiError`] when a file is missing or malformed.
    pub fn load(dir: &Path) -> Result<Pki, PkiError> {
        let ca_pem = read(&dir.join(CA_CERT))?;
        let ca_key_pem = read_secret(&credential_or(dir, "hub-ca-key", CA_KEY))?;
        let ca_key = KeyPair::from_pem(&ca_key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;
        let ca_der = pem_cert(&dir.join(CA_CERT), &ca_pem)?;
        let server_path = dir.join(SERVER_CERT);
        let server_der = pem_cert(&server_path, &read(&server_path)?)?;
        let key_path = credential_or(dir, "hub-server-key", SERVER_KEY);
        let server_key = PrivateKeyDer::from_pem_slice(read_secret(&key_path)?.as_bytes())
            .map_err(|_| PkiError::BadPem {
                path: key_path.clone(),
                what: "private key",
            })?;
        Ok(Pki {
            issuer,
            server_chain: vec![server_der, ca_der.clone()],
            ca_der,
            ca_pem,
            server_key,
        })
    }

    /// SHA-256 fingerprint of the CA certificate.
    pub fn ca_fingerprint(&self) -> String {
        fingerprint(self.ca_der.as_ref())
    }

    /// Issues a client certificate for `name` to a key generated here (admin, demo).
    ///
    /// # Errors
    /// [`PkiError::Rcgen`] when signing fails.
    pub fn issue_client(&self, name: &str, key: &KeyPair) -> Result<Credential, PkiError> {
        let cert = client_params(name)?.signed_by(key, &self.issuer)?;
        Ok(Credential {
            fingerprint: fingerprint(cert.der()),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Signs a peer's certificate signing request for `name`; the key stays with the peer.
    /// Returns the PEM certificate and its fingerprint.
    ///
    /// # Errors
    /// [`PkiError::Rcgen`] when the CSR is malformed or its signature is wrong.
    pub fn sign_csr(&self, csr_pem: &str, name: &str) -> Result<(String, String), PkiError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
        // The hub decides what the certificate says; only the public key is taken from the CSR.
        let params = client_params(name)?;
        let csr = CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        };
        let cert = csr.signed_by(&self.issuer)?;
        Ok((cert.pem(), fingerprint(cert.der())))
    }
}

/// Issues and writes the hub's server certificate for `sans`.
fn issue_server(dir: &Path, sans: &[String], issuer: &Issuer<'_, KeyPair>) -> Result<(), PkiError> {
    let now = OffsetDateTime::now_utc();
    let server_key = KeyPair::generate()?;
    let mut params = CertificateParams::new(sans.to_vec())?;
    params.distinguished_name = dn("muster hub");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = now - BACKDATE;
    params.not_after = now + LEAF_VALIDITY;
    let server_cert = params.signed_by(&server_key, issuer)?;
    write_file(&dir.join(SERVER_CERT), server_cert.pem().as_bytes(), 0o644)?;
    write_file(
        &dir.join(SERVER_KEY),
        server_key.serialize_pem().as_bytes(),
        0o600,
    )?;
    Ok(())
}

/// Builds a CSR for a freshly generated key (the enrolling side).
///
/// # Errors
/// [`rcgen::Error`] when the key cannot sign.
pub fn make_csr(name: &str) -> Result<(KeyPair, String), rcgen::Error> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = dn(name);
    let csr = params.serialize_request(&key)?;
    Ok((key, csr.pem()?))
}

/// SHA-256 of the public key in a CSR, to refuse re-enrollment with a revoked key.
///
/// # Errors
/// [`rcgen::Error`] when the CSR is malformed.
pub fn csr_key_fingerprint(csr_pem: &str) -> Result<String, rcgen::Error> {
    let csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
    Ok(fingerprint(csr.public_key.der_bytes()))
}

/// SHA-256 of the public key of a certificate.
pub fn cert_key_fingerprint(cert_der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    Some(fingerprint(&cert.public_key().subject_public_key.data))
}

fn client_params(name: &str) -> Result<CertificateParams, rcgen::Error> {
    let now = OffsetDateTime::now_utc();
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = dn(name);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.not_before = now - BACKDATE;
    params.not_after = now + LEAF_VALIDITY;
    Ok(params)
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

fn credential_or(dir: &Path, credential: &str, file: &str) -> PathBuf {
    if let Some(creds) = std::env::var_os("CREDENTIALS_DIRECTORY") {
        let p = Path::new(&creds).join(credential);
        if p.exists() {
            return p;
        }
    }
    dir.join(file)
}

fn pem_cert(path: &Path, pem: &str) -> Result<CertificateDer<'static>, PkiError> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|_| PkiError::BadPem {
        path: path.to_owned(),
        what: "certificate",
    })
}

/// Reads a private key, refusing one that group or others can read.
///
/// # Errors
/// [`PkiError::Exposed`] naming the file and the `chmod` to run, or [`PkiError::Io`].
pub fn read_secret(path: &Path) -> Result<String, PkiError> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(path).map_err(|source| PkiError::Io {
        path: path.to_owned(),
        source,
    })?;
    if meta.mode() & 0o077 != 0 {
        return Err(PkiError::Exposed {
            path: path.to_owned(),
            mode: meta.mode() & 0o777,
        });
    }
    read(path)
}

fn read(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| PkiError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Writes a file with a mode, atomically (temp name, then rename).
///
/// # Errors
/// [`PkiError::Io`] naming the file.
pub fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PkiError> {
    let io = |source| PkiError::Io {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    fs::rename(&tmp, path).map_err(io)
}
