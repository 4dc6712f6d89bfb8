//! rustls and quinn configuration shared by hub, sidecar and CLI.
//!
//! Always the ring provider and TLS 1.3 through `builder_with_provider`: with
//! two providers compiled in, the implicit builders panic (see CRATES.md).

use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::{ALPN_ENROLL, ALPN_SESSION};

/// QUIC keep-alive: one side is enough; below the idle timeout.
///
/// quinn counts it from the last packet received. Sessions heartbeat every 10 s
/// (±10 %) and the hub acknowledges each one, so at 12 s the pings only fire when
/// heartbeats are late or slower than that; at 5 s they fired twice per heartbeat,
/// and at 10,000 sessions those pings and their acknowledgements were two thirds of
/// the packets the hub handled.
pub const KEEP_ALIVE: Duration = Duration::from_secs(12);
pub use crate::limits::IDLE_TIMEOUT;

/// Per-stream receive window on the hub, for every connection. It cannot be raised
/// once a connection is up, so it is small: a frame of up to 1 MiB then takes a few
/// flow-control updates, while a peer that never reads parks at most this per stream.
pub const HUB_STREAM_WINDOW: u32 = 128 << 10;
/// Connection receive window on the hub until the peer is known to be a live identity:
/// what an unauthenticated peer can park in hub memory, whatever it sends.
pub const HUB_CONNECTION_WINDOW_UNAUTHENTICATED: u32 = 256 << 10;
/// Connection receive window on the hub once the peer is a live identity.
pub const HUB_CONNECTION_WINDOW: u32 = 4 << 20;
/// Bidirectional streams a peer may open on the hub before it is known (enrollment
/// needs one; a `muster/1` peer waits the few milliseconds the hub takes to check it).
pub const HUB_STREAMS_UNAUTHENTICATED: u32 = 1;
/// Bidirectional streams a live identity may have open at once.
pub const HUB_STREAMS: u32 = 64;

/// A TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// rustls refused the certificates or keys.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client verifier could not be built.
    #[error("TLS client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// quinn refused the rustls configuration.
    #[error("QUIC crypto configuration: {0}")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
}

/// The ring crypto provider, shared by every config.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// SHA-256 of a DER certificate, lower-case hex: how the CA is pinned and identities are keyed.
pub fn fingerprint(der: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, der).as_ref())
}

/// Lower-case hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Transport settings for every muster connection.
pub fn transport() -> Arc<quinn::TransportConfig> {
    Arc::new(transport_base())
}

fn transport_base() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(KEEP_ALIVE));
    // 15 s fits the VarInt range, so this conversion cannot fail.
    if let Ok(idle) = IDLE_TIMEOUT.try_into() {
        t.max_idle_timeout(Some(idle));
    }
    // Muster messages are small; modest windows keep per-connection memory low.
    t.stream_receive_window(quinn::VarInt::from_u32(2 << 20));
    t.receive_window(quinn::VarInt::from_u32(4 << 20));
    t.send_window(4 << 20);
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(64));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    t
}

/// The hub's server config: both ALPNs; client certificates optional at the TLS layer
/// (enrollment has none) and required by the hub before it reads a `muster/1` byte.
///
/// # Errors
/// [`TlsError`] when the certificates or key are unusable.
pub fn server_config(
    ca: CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<quinn::ServerConfig, TlsError> {
    let provider = provider();
    let mut roots = RootCertStore::empty();
    roots.add(ca)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    tls.alpn_protocols = vec![ALPN_SESSION.to_vec(), ALPN_ENROLL.to_vec()];
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls)?));
    // Clients keep their connections alive; one side is enough, and with thousands
    // of idle sessions the hub's own pings would double the packets it handles.
    let mut t = transport_base();
    t.keep_alive_interval(None);
    // Small until the hub knows the peer; it raises the connection window and the
    // stream count for a `muster/1` connection of a live identity.
    t.stream_receive_window(quinn::VarInt::from_u32(HUB_STREAM_WINDOW));
    t.receive_window(quinn::VarInt::from_u32(
        HUB_CONNECTION_WINDOW_UNAUTHENTICATED,
    ));
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(HUB_STREAMS_UNAUTHENTICATED));
    cfg.transport_config(Arc::new(t));
    Ok(cfg)
}

/// A client config for `muster/1`: trusts only the hub's CA and presents the client certificate.
///
/// # Errors
/// [`TlsError`] when the certificates or key are unusable.
pub fn session_client_config(
    ca: CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<quinn::ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.add(ca)?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    tls.alpn_protocols = vec![ALPN_SESSION.to_vec()];
    client_from(tls)
}

/// A client config for `muster-enroll/1`: no client certificate; the hub is trusted
/// only if its chain holds a CA whose SHA-256 fingerprint is `ca_fingerprint`.
///
/// # Errors
/// [`TlsError`] when rustls refuses the configuration.
pub fn enroll_client_config(ca_fingerprint: &str) -> Result<quinn::ClientConfig, TlsError> {
    let provider = provider();
    let verifier = PinnedCaVerifier {
        fingerprint: ca_fingerprint.to_ascii_lowercase(),
        provider: provider.clone(),
    };
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN_ENROLL.to_vec()];
    client_from(tls)
}

fn client_from(tls: rustls::ClientConfig) -> Result<quinn::ClientConfig, TlsError> {
    let mut cfg = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls)?));
    cfg.transport_config(transport());
    Ok(cfg)
}

/// Verifies the hub against the CA named by a join token's fingerprint: the CA
/// must come in the hub's chain, match the pin, and have signed the leaf.
#[derive(Debug)]
struct PinnedCaVerifier {
    fingerprint: String,
    provider: Arc<CryptoProvider>,
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
            .find(|c| fingerprint(c.as_ref()) == self.fingerprint)
            // An unknown issuer: the handshake ends with the unknown_ca alert,
            // which the client reads as "not the token's hub" by its code.
            .ok_or(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            ))?;
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

/// The peer's leaf certificate on a connection, if it presented one.
pub fn peer_leaf(conn: &quinn::Connection) -> Option<CertificateDer<'static>> {
    let any = conn.peer_identity()?;
    let chain = any.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    chain.first().cloned()
}

/// The ALPN the connection negotiated.
pub fn negotiated_alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    let data = conn.handshake_data()?;
    let data = data
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?;
    data.protocol
}

/// Common name of a certificate's subject.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned)
}
