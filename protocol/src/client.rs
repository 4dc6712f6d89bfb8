//! The client side shared by the sidecar, the operator CLI and the tests:
//! join tokens, enrollment, and one operator request per stream.

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use futures::StreamExt;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::limits::FRAME_BYTES_MAX;
use crate::msg::{
    EnrollRequest, EnrollResponse, HubMsg, OpRequest, OpResponse, Open, OpenBody, Role,
};
use crate::{AgentName, FrameError, PROTOCOL_VERSION, decode, framed, tls};

/// How long a connection attempt may take before it is reported as unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A client-side failure, phrased for the person at the terminal.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The join token is malformed.
    #[error("bad join token: {0}")]
    BadToken(String),
    /// The hub address did not resolve.
    #[error("cannot resolve hub address {0:?}: {1}")]
    Resolve(String, String),
    /// No QUIC connection could be made.
    #[error("cannot reach the hub at {addr}: {reason}")]
    Connect {
        /// The address tried.
        addr: String,
        /// What failed.
        reason: String,
        /// The TLS alert that ended the handshake, if one did (see [`tls_alert`]).
        alert: Option<u8>,
    },
    /// The hub refused the connection before its handshake: it is at a cap
    /// (connections, handshakes in flight). Not a failure of ours: try again soon.
    #[error(
        "the hub at {0} is busy (it refused a new connection at its connection or handshake cap); try again in a moment"
    )]
    Busy(String),
    /// The hub refused us (credential, version, enrollment).
    #[error("{0}")]
    Refused(String),
    /// The join token grants another role than the one asked for (nothing was
    /// used up: asking again with that role enrolls).
    #[error("enrollment refused: {}", crate::msg::EnrollRefusal::WrongRole { token: *token, requested: *requested })]
    WrongRole {
        /// The role the token grants.
        token: Role,
        /// The role asked for.
        requested: Role,
    },
    /// The hub is a standby of a cluster: the leader serves (see [`follow_leader`]).
    #[error("{}", not_leader_text(.leader.as_deref()))]
    NotLeader {
        /// The leader's address, when the standby knows it.
        leader: Option<String>,
    },
    /// The hub's answer made no sense or the stream broke.
    #[error("talking to the hub: {0}")]
    Protocol(String),
    /// A local credential is unusable.
    #[error("credential: {0}")]
    Credential(String),
}

fn not_leader_text(leader: Option<&str>) -> String {
    match leader {
        Some(l) => format!("this hub is a standby; the leader is at {l}"),
        None => {
            "this hub is a standby and no leader is elected yet; try again in a few seconds".into()
        }
    }
}

/// Whether a standby's leader address is worth dialling: bounded, printable,
/// `host:port`. (It is dialled only with this CA's certificate check.)
pub fn valid_leader(l: &str) -> bool {
    !l.is_empty()
        && l.len() <= crate::LEADER_ADDR_MAX
        && l.bytes().all(|b| b.is_ascii_graphic())
        && l.rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
}

/// Most hub addresses a join token carries (a cluster's hubs).
pub const TOKEN_HUBS_MAX: usize = 16;

/// A join token: `muster1/<hub address>[,<hub address>…]/<CA SHA-256>/<secret>`;
/// a cluster's token names every hub, the leader first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// Where the hub listens (the first address).
    pub hub: String,
    /// Every hub address the token names, `hub` first.
    pub hubs: Vec<String>,
    /// The CA fingerprint to pin.
    pub ca_fingerprint: String,
    /// The single-use secret.
    pub secret: String,
}

impl FromStr for JoinToken {
    type Err = ClientError;
    fn from_str(s: &str) -> Result<Self, ClientError> {
        let s = s.trim();
        let bad = |why: &str| {
            ClientError::BadToken(format!(
                "{why}; a token looks like muster1/<hub>/<64 hex>/<64 hex>, as printed by `muster-hub token create`"
            ))
        };
        let rest = s
            .strip_prefix("muster1/")
            .ok_or_else(|| bad("it does not start with muster1/"))?;
        let mut parts = rest.rsplitn(3, '/');
        let secret = parts.next().unwrap_or_default();
        let fp = parts.next().unwrap_or_default();
        let hub = parts.next().unwrap_or_default();
        let hex64 = |x: &str| x.len() == 64 && x.bytes().all(|b| b.is_ascii_hexdigit());
        if hub.is_empty() {
            return Err(bad("it names no hub address"));
        }
        let hubs: Vec<String> = hub.split(',').map(str::to_string).collect();
        if hubs.iter().any(String::is_empty) {
            return Err(bad("it has an empty hub address in its list"));
        }
        if hubs.len() > TOKEN_HUBS_MAX {
            return Err(bad(&format!(
                "it names more than {TOKEN_HUBS_MAX} hub addresses"
            )));
        }
        if !hex64(fp) {
            return Err(bad("its CA fingerprint is not 64 hex digits"));
        }
        if !hex64(secret) {
            return Err(bad("its secret is not 64 hex digits"));
        }
        Ok(JoinToken {
            hub: hubs[0].clone(),
            hubs,
            ca_fingerprint: fp.to_ascii_lowercase(),
            secret: secret.into(),
        })
    }
}

/// Resolves `host:port` to a socket address.
///
/// # Errors
/// [`ClientError::Resolve`].
pub async fn resolve(hub: &str) -> Result<SocketAddr, ClientError> {
    let mut addrs = tokio::net::lookup_host(hub)
        .await
        .map_err(|e| ClientError::Resolve(hub.into(), e.to_string()))?;
    addrs
        .next()
        .ok_or_else(|| ClientError::Resolve(hub.into(), "no address".into()))
}

/// The TLS server name for a hub address: its host part.
pub fn server_name(hub: &str) -> String {
    let host = hub.rsplit_once(':').map_or(hub, |(h, _)| h);
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_string()
}

/// A client endpoint bound to an ephemeral port of the address family of `addr`.
///
/// # Errors
/// [`ClientError::Connect`] when no UDP socket can be bound.
pub fn endpoint_for(addr: SocketAddr) -> Result<quinn::Endpoint, ClientError> {
    let bind: SocketAddr = if addr.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    quinn::Endpoint::client(bind).map_err(|e| ClientError::Connect {
        alert: None,
        addr: addr.to_string(),
        reason: format!("cannot bind a UDP socket: {e}"),
    })
}

async fn dial(
    endpoint: &quinn::Endpoint,
    cfg: quinn::ClientConfig,
    hub: &str,
    addr: SocketAddr,
) -> Result<quinn::Connection, ClientError> {
    let connecting = endpoint
        .connect_with(cfg, addr, &server_name(hub))
        .map_err(|e| ClientError::Connect {
            alert: None,
            addr: hub.into(),
            reason: e.to_string(),
        })?;
    match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(quinn::ConnectionError::ConnectionClosed(c)))
            if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED =>
        {
            Err(ClientError::Busy(hub.into()))
        }
        Ok(Err(e)) => Err(ClientError::Connect {
            alert: tls_alert(&e),
            addr: hub.into(),
            reason: e.to_string(),
        }),
        Err(_) => Err(ClientError::Connect {
            alert: None,
            addr: hub.into(),
            reason: format!(
                "no answer within {} s (is the hub running and the UDP port open?)",
                CONNECT_TIMEOUT.as_secs()
            ),
        }),
    }
}

/// Enrolls with a join token: pins the CA, sends the CSR and the grant asked for
/// (capabilities, slots; empty and 0 for operators), returns (certificate PEM, CA PEM).
///
/// # Errors
/// [`ClientError::Refused`] with the hub's reason (expired, used, unknown, wrong role, …).
pub async fn enroll(
    token: &JoinToken,
    name: &AgentName,
    role: Role,
    csr_pem: String,
    grant: (Vec<String>, u32),
) -> Result<(String, String), ClientError> {
    let (_, pems) = follow_leader(&token.hubs, |hub| {
        enroll_at(hub, token, name, role, csr_pem.clone(), grant.clone())
    })
    .await?;
    Ok(pems)
}

/// Most standby pointers followed from one address: a standby names the
/// leader, so a second hop means an election happened in between.
const LEADER_HOPS_MAX: usize = 3;

/// Runs `attempt` against `hubs` in turn, following a standby's pointer to
/// the leader ([`ClientError::NotLeader`]); returns the address that answered
/// and its answer. An unreachable hub passes to the next; any other error
/// (a refusal, a bad answer) is the leader's word and ends the search.
///
/// # Errors
/// The last error met when no hub answered.
pub async fn follow_leader<T, F, Fut>(
    hubs: &[String],
    mut attempt: F,
) -> Result<(String, T), ClientError>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    let mut last = ClientError::Protocol("no hub address to try".into());
    for first in hubs {
        let mut hub = first.clone();
        for _ in 0..=LEADER_HOPS_MAX {
            match attempt(hub.clone()).await {
                Ok(v) => return Ok((hub, v)),
                Err(ClientError::NotLeader {
                    leader: Some(leader),
                }) if leader != hub => {
                    last = ClientError::NotLeader {
                        leader: Some(leader.clone()),
                    };
                    hub = leader;
                }
                Err(
                    e @ (ClientError::NotLeader { .. }
                    | ClientError::Connect { alert: None, .. }
                    | ClientError::Resolve(..)
                    | ClientError::Busy(_)),
                ) => {
                    last = e;
                    break;
                }
                Err(e) => return Err(e),
            }
        }
    }
    Err(last)
}

async fn enroll_at(
    hub: String,
    token: &JoinToken,
    name: &AgentName,
    role: Role,
    csr_pem: String,
    grant: (Vec<String>, u32),
) -> Result<(String, String), ClientError> {
    let addr = resolve(&hub).await?;
    let endpoint = endpoint_for(addr)?;
    let cfg = tls::enroll_client_config(&token.ca_fingerprint)
        .map_err(|e| ClientError::Credential(e.to_string()))?;
    let conn = dial(&endpoint, cfg, &hub, addr).await.map_err(|e| match e {
        ClientError::Connect {
            alert: Some(ALERT_UNKNOWN_CA),
            ..
        } => ClientError::Refused(
            "the hub's CA does not match the fingerprint in the join token: refusing to send the secret (forged token, or the wrong hub)".into(),
        ),
        other => other,
    })?;
    let req = EnrollRequest {
        protocol: PROTOCOL_VERSION,
        secret: token.secret.clone(),
        role,
        name: name.clone(),
        csr_pem,
        capabilities: grant.0,
        slots: grant.1,
    };
    let resp: EnrollResponse = exchange(&conn, &req).await?;
    conn.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    match resp {
        EnrollResponse::Enrolled { cert_pem, ca_pem } => {
            // The CA we were given must be the one we pinned.
            let der = CertificateDer::from_pem_slice(ca_pem.as_bytes())
                .map_err(|_| ClientError::Protocol("the hub sent a malformed CA".into()))?;
            if tls::fingerprint(der.as_ref()) != token.ca_fingerprint {
                return Err(ClientError::Refused(
                    "the hub sent a CA that does not match the token's fingerprint".into(),
                ));
            }
            Ok((cert_pem, ca_pem))
        }
        EnrollResponse::Refused(crate::msg::EnrollRefusal::WrongRole { token, requested }) => {
            Err(ClientError::WrongRole { token, requested })
        }
        EnrollResponse::Refused(r) => Err(ClientError::Refused(format!("enrollment refused: {r}"))),
    }
}

/// PEM credentials for a `muster/1` connection.
#[derive(Debug, Clone)]
pub struct Credential {
    /// The hub's CA.
    pub ca_pem: String,
    /// Our certificate.
    pub cert_pem: String,
    /// Our private key.
    pub key_pem: String,
}

impl Credential {
    /// The quinn client config for these credentials.
    ///
    /// # Errors
    /// [`ClientError::Credential`] when a PEM does not parse.
    pub fn client_config(&self) -> Result<quinn::ClientConfig, ClientError> {
        let bad = |what: &str| ClientError::Credential(format!("the {what} is not valid PEM"));
        let ca = CertificateDer::from_pem_slice(self.ca_pem.as_bytes())
            .map_err(|_| bad("CA certificate"))?;
        let cert = CertificateDer::from_pem_slice(self.cert_pem.as_bytes())
            .map_err(|_| bad("certificate"))?;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(|_| bad("private key"))?;
        tls::session_client_config(ca, vec![cert], key)
            .map_err(|e| ClientError::Credential(e.to_string()))
    }
}

/// Connects with mutual TLS. A successful return does not yet prove the hub
/// accepted the certificate: the first exchange does.
///
/// # Errors
/// [`ClientError::Connect`] or [`ClientError::Credential`].
pub async fn connect(
    hub: &str,
    cred: &Credential,
) -> Result<(quinn::Endpoint, quinn::Connection), ClientError> {
    let addr = resolve(hub).await?;
    let endpoint = endpoint_for(addr)?;
    let conn = dial(&endpoint, cred.client_config()?, hub, addr).await?;
    Ok((endpoint, conn))
}

/// Sends one operator request on a new stream and reads the answer.
///
/// # Errors
/// [`ClientError::Refused`] for a version mismatch or a refused credential.
pub async fn request(conn: &quinn::Connection, req: OpRequest) -> Result<OpResponse, ClientError> {
    let open = Open {
        protocol: PROTOCOL_VERSION,
        body: OpenBody::Request(req),
    };
    exchange(conn, &open).await
}

/// Opens a stream, sends one message, reads one answer, refusals decoded as such.
async fn exchange<Q: serde::Serialize, A: serde::de::DeserializeOwned>(
    conn: &quinn::Connection,
    msg: &Q,
) -> Result<A, ClientError> {
    let (send, recv) = conn.open_bi().await.map_err(refused_or_lost)?;
    let (mut wr, mut rd) = framed(send, recv, FRAME_BYTES_MAX);
    wr.send(msg).await.map_err(|e| match e {
        FrameError::Io(e) => io_err(conn, e),
        e => ClientError::Protocol(e.to_string()),
    })?;
    let _ = wr.get_mut().finish();
    let frame = match rd.next().await {
        Some(Ok(f)) => f,
        Some(Err(e)) => return Err(io_err(conn, e)),
        None => {
            return Err(match conn.close_reason() {
                Some(r) => refused_or_lost(r),
                None => ClientError::Protocol("the hub closed the stream without answering".into()),
            });
        }
    };
    // A refusal comes in place of the answer: decoded as such, never as garbage.
    decode::<A>(&frame).map_err(|e| match decode::<HubMsg>(&frame) {
        Ok(HubMsg::Refused(crate::msg::Refused::NotLeader { leader })) => ClientError::NotLeader {
            leader: leader.filter(|l| valid_leader(l)),
        },
        Ok(HubMsg::Refused(r)) => ClientError::Refused(r.to_string()),
        _ => ClientError::Protocol(format!("unexpected answer: {e}")),
    })
}

/// A stream error: the connection's close reason explains it better when there is one.
fn io_err(conn: &quinn::Connection, e: std::io::Error) -> ClientError {
    match conn.close_reason() {
        Some(r) => refused_or_lost(r),
        None => ClientError::Protocol(e.to_string()),
    }
}

/// TLS alert `unknown_ca`: the peer's certificate is not from the CA we trust
/// (a client certificate from another hub, or a hub that is not the token's).
pub const ALERT_UNKNOWN_CA: u8 = 48;
/// TLS alerts that mean "this credential is refused": bad_certificate (42),
/// certificate_revoked (44), certificate_expired (45), certificate_unknown (46),
/// unknown_ca (48), certificate_required (116).
const CREDENTIAL_ALERTS: [u8; 6] = [42, 44, 45, 46, ALERT_UNKNOWN_CA, 116];

/// The TLS alert a QUIC connection ended with, read from its error code (QUIC
/// carries a TLS alert as the CRYPTO_ERROR code 0x100 + alert), never from text.
pub fn tls_alert(e: &quinn::ConnectionError) -> Option<u8> {
    let code = match e {
        quinn::ConnectionError::TransportError(t) => t.code,
        quinn::ConnectionError::ConnectionClosed(c) => c.error_code,
        _ => return None,
    };
    let raw = u64::from(code);
    (0x100..0x200).contains(&raw).then(|| (raw - 0x100) as u8)
}

/// Turns a connection error into a sentence: TLS refusals become "refused".
pub fn refused_or_lost(e: quinn::ConnectionError) -> ClientError {
    if let quinn::ConnectionError::ApplicationClosed(c) = &e
        && c.error_code == quinn::VarInt::from_u32(crate::CLOSE_NOT_LEADER)
    {
        // The address is the standby's word: bounded, and only ever dialled
        // with this CA's certificate check.
        let leader = std::str::from_utf8(&c.reason)
            .ok()
            .filter(|l| valid_leader(l))
            .map(str::to_string);
        return ClientError::NotLeader { leader };
    }
    if let quinn::ConnectionError::ApplicationClosed(c) = &e
        && c.error_code == quinn::VarInt::from_u32(crate::CLOSE_NOT_ENROLLED)
    {
        return ClientError::Refused(
            "the hub refused this credential: it is not enrolled at this hub or has been revoked; enroll again with a new token".into(),
        );
    }
    let text = e.to_string();
    if tls_alert(&e).is_some_and(|a| CREDENTIAL_ALERTS.contains(&a)) {
        ClientError::Refused(format!(
            "the hub refused this credential ({text}); it may be from another hub or revoked, enroll again with a new token"
        ))
    } else {
        ClientError::Protocol(format!("connection lost: {text}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_and_refuse_garbage() {
        let fp = "a".repeat(64);
        let secret = "0".repeat(64);
        let t: JoinToken = format!("muster1/[::1]:7440/{fp}/{secret}")
            .parse()
            .expect("token");
        assert_eq!(t.hub, "[::1]:7440");
        assert_eq!(t.hubs, ["[::1]:7440"]);
        assert_eq!(server_name(&t.hub), "::1");
        let t: JoinToken = format!("muster1/a:1,[::1]:2/{fp}/{secret}")
            .parse()
            .expect("cluster token");
        assert_eq!((t.hub.as_str(), t.hubs.len()), ("a:1", 2));
        assert!(valid_leader("hub-b:7440") && valid_leader("[::1]:1"));
        assert!(!valid_leader("") && !valid_leader("hub b:1") && !valid_leader("hub"));
        assert_eq!(server_name("hub.example.net:7440"), "hub.example.net");
        for bad in [
            "",
            "muster1/",
            "x/127.0.0.1:1/aa/bb",
            &format!("muster1//{fp}/{secret}"),
            &format!("muster1/h:1/{fp}/short"),
            &format!("muster1/h:1,,h:2/{fp}/{secret}"),
            &format!("muster1/{}/{fp}/{secret}", vec!["h:1"; 17].join(",")),
        ] {
            assert!(bad.parse::<JoinToken>().is_err(), "{bad}");
        }
    }
}
