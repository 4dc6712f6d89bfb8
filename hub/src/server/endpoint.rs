//! The QUIC endpoint: the stateless-reset key, binding, the accept loop with its
//! admission bounds, and the check that a new connection belongs to a live identity.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use muster_protocol::ALPN_ENROLL;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use super::ToCore;
use super::enroll::{ENROLL_DEADLINE, handle_enroll_conn};
use super::session::handle_stream;
use crate::core::ConnId;
use crate::metrics::Counters;
use crate::pki::Pki;
use muster_hub_core::admission::{Admission, Handshake};
use muster_protocol::pace::LogBudget;

/// UDP receive buffer asked of the OS: a burst of thousands of handshakes (a fleet
/// reconnecting after a hub restart) overflows the default 208 KiB and stalls them.
pub(super) const UDP_RECV_BUFFER: usize = 4 << 20;
/// Handshakes worked on at once (crypto, timers). Admitted handshakes past it wait
/// at most [`HANDSHAKE_QUEUE_WAIT`] for a place, then are refused: a fleet
/// reconnecting after a hub restart flows through at full speed instead of
/// retrying against refusals, and a stalled handshake holds its place at most
/// [`HANDSHAKE_TIMEOUT`].
pub(super) const HANDSHAKES_WORKING: usize = 64;
/// Handshakes admitted at once, working or waiting. Past it an unvalidated address
/// gets a stateless Retry and a validated one is refused at once; one source never
/// holds more than `limits.handshakes_per_source` of them, so a source that stalls
/// its handshakes waits behind its own, not others behind it.
pub(super) const HANDSHAKES_MAX: u32 = 4096;
/// How long an admitted handshake may wait for one of the working places.
pub(super) const HANDSHAKE_QUEUE_WAIT: Duration = Duration::from_secs(5);
/// How long one handshake may hold its place. On loopback a handshake takes about a
/// millisecond; one that has not finished in this time is for a client that gave up or
/// never meant to finish, and would otherwise hold the place until the idle timeout (15 s).
pub(super) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a new `muster/1` connection waits for the core to say whose it is.
pub(super) const ACCEPT_CHECK_TIMEOUT: Duration = Duration::from_secs(10);
/// Refusals logged per [`REFUSAL_LOG_WINDOW`]; the rest are counted and the count logged
/// with the next line, so an attack cannot flood the log.
pub(super) const REFUSAL_LOG_LINES: u32 = 10;
/// See [`REFUSAL_LOG_LINES`].
pub(super) const REFUSAL_LOG_WINDOW: Duration = Duration::from_secs(60);
/// The file holding the key for QUIC stateless resets.
pub(super) const RESET_KEY_FILE: &str = "reset.key";

/// The stateless-reset key, kept across restarts: a restarted hub then answers
/// packets of connections it no longer knows with a reset the sidecar trusts, so
/// sidecars reconnect at once instead of waiting out the idle timeout.
pub(super) fn load_reset_key(dir: &Path) -> std::io::Result<(ring::hmac::Key, u64)> {
    use ring::rand::SecureRandom;
    let path = dir.join(RESET_KEY_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) if b.len() == 64 => b,
        _ => {
            let mut b = vec![0u8; 64];
            ring::rand::SystemRandom::new()
                .fill(&mut b)
                .map_err(|_| std::io::Error::other("the system random number generator failed"))?;
            crate::pki::write_file(&path, &b, 0o600)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            b
        }
    };
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&bytes[56..64]);
    Ok((
        ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &bytes[..56]),
        u64::from_le_bytes(cid_key),
    ))
}

/// Binds the QUIC endpoint on a socket with a larger receive buffer (where the OS allows).
pub(super) fn bind_endpoint(
    cfg: quinn::ServerConfig,
    reset_key: (ring::hmac::Key, u64),
    addr: SocketAddr,
) -> std::io::Result<quinn::Endpoint> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        let _ = socket.set_only_v6(false);
    }
    if let Err(e) = socket.set_recv_buffer_size(UDP_RECV_BUFFER) {
        warn!("cannot raise the UDP receive buffer to {UDP_RECV_BUFFER} bytes: {e}");
    }
    socket.bind(&addr.into())?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| std::io::Error::other("no async runtime for QUIC"))?;
    let mut endpoint_cfg = quinn::EndpointConfig::new(Arc::new(reset_key.0));
    // Connection IDs signed with a key that survives restarts: the restarted hub then
    // recognises its old IDs and answers them with a stateless reset instead of dropping them.
    let cid_key = reset_key.1;
    endpoint_cfg.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    quinn::Endpoint::new(endpoint_cfg, Some(cfg), socket.into(), runtime)
}

pub(super) struct Shared {
    pub(super) to_core: mpsc::Sender<ToCore>,
    pub(super) pki: Arc<Pki>,
    pub(super) metrics: Arc<Counters>,
    /// The origin of the monotonic `now` the admission policy is given.
    pub(super) started: Instant,
    /// Handshakes, unauthenticated connections and enrollments per source and in total.
    pub(super) admission: Mutex<Admission>,
    /// Bounds the log lines refusals write.
    pub(super) refusals: Mutex<LogBudget>,
    pub(super) next_conn: AtomicU64,
    pub(super) max_frame: usize,
    /// Most connections at once; past it new ones are refused before the handshake.
    pub(super) max_connections: usize,
    /// Connections counted against `max_connections`: from the start of the handshake
    /// to the end of the connection's task. Unlike quinn's own count it leaves out
    /// connections already closed and draining (a few round trips), which would
    /// otherwise let a burst of refused peers fill the cap for a moment.
    pub(super) live: AtomicUsize,
    /// Session messages per second per connection; a sidecar past it is disconnected.
    pub(super) messages_per_second: u32,
    /// `task logs` relays, shared with the HTTP API's (one bound for both).
    pub(super) logs: Arc<super::logs::LogRelays>,
}

impl Shared {
    /// Monotonic time since the listener started, for the pure policies.
    pub(super) fn now(&self) -> Duration {
        self.started.elapsed()
    }

    pub(super) fn admission(&self) -> std::sync::MutexGuard<'_, Admission> {
        // The critical sections cannot panic half-way; a poisoned lock still holds
        // consistent counts.
        self.admission
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Logs a refusal, at most [`REFUSAL_LOG_LINES`] per [`REFUSAL_LOG_WINDOW`].
    pub(super) fn log_refusal(&self, peer: SocketAddr, what: &str, reason: &dyn std::fmt::Display) {
        let allowed = self
            .refusals
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .allow(self.now());
        if let Some(left_out) = allowed {
            warn!(%peer, left_out, "refused {what}: {reason}");
        }
    }
}

/// One connection counted in [`Shared::live`] until dropped.
pub(super) struct Live(Arc<Shared>);

impl Live {
    pub(super) fn new(shared: Arc<Shared>) -> Self {
        shared.live.fetch_add(1, Ordering::Relaxed);
        Live(shared)
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Holds one admitted handshake or unauthenticated connection; gives it back on drop,
/// however the task holding it ends.
pub(super) struct Slot {
    pub(super) shared: Arc<Shared>,
    pub(super) ip: IpAddr,
    pub(super) kind: SlotKind,
}

#[derive(Clone, Copy)]
pub(super) enum SlotKind {
    Handshake,
    Unauthenticated,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut a = self.shared.admission();
        match self.kind {
            SlotKind::Handshake => a.handshake_done(self.ip),
            SlotKind::Unauthenticated => a.unauthenticated_done(self.ip),
        }
    }
}

pub(super) async fn accept_loop(endpoint: quinn::Endpoint, shared: Arc<Shared>) {
    let working = Arc::new(tokio::sync::Semaphore::new(HANDSHAKES_WORKING));
    while let Some(incoming) = endpoint.accept().await {
        let peer = incoming.remote_address();
        if shared.live.load(Ordering::Relaxed) >= shared.max_connections {
            shared.log_refusal(
                peer,
                "a connection",
                &format_args!(
                    "connection limit reached (limits.max_connections = {})",
                    shared.max_connections
                ),
            );
            incoming.refuse();
            continue;
        }
        let validated = incoming.remote_address_validated();
        let verdict = shared
            .admission()
            .handshake(peer.ip(), validated, shared.now());
        match verdict {
            Handshake::Accept => {}
            Handshake::Retry => {
                // Stateless: nothing is kept until the client comes back with the token.
                if let Err(e) = incoming.retry() {
                    e.into_incoming().refuse();
                }
                continue;
            }
            Handshake::Refuse(r) => {
                shared.log_refusal(peer, "a handshake", &format_args!("{r} ({})", r.limit()));
                incoming.refuse();
                continue;
            }
        }
        let slot = Slot {
            shared: shared.clone(),
            ip: peer.ip(),
            kind: SlotKind::Handshake,
        };
        let live = Live::new(shared.clone());
        let shared = shared.clone();
        let working = working.clone();
        tokio::spawn(async move {
            let _live = live;
            let place = tokio::time::timeout(HANDSHAKE_QUEUE_WAIT, working.acquire_owned()).await;
            let Ok(Ok(place)) = place else {
                shared.log_refusal(
                    peer,
                    "a handshake",
                    &format_args!(
                        "no handshake place free within {} s ({HANDSHAKES_WORKING} at once)",
                        HANDSHAKE_QUEUE_WAIT.as_secs()
                    ),
                );
                incoming.refuse();
                return;
            };
            let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await;
            // The place is for the handshake only, never for the connection's life.
            drop(place);
            drop(slot);
            match handshake {
                Ok(Ok(conn)) => handle_connection(conn, shared).await,
                Ok(Err(e)) => debug!(%peer, "handshake failed: {e}"),
                Err(_) => debug!(%peer, "handshake abandoned after {HANDSHAKE_TIMEOUT:?}"),
            }
        });
    }
}

pub(super) async fn handle_connection(conn: quinn::Connection, shared: Arc<Shared>) {
    let peer = conn.remote_address();
    let alpn = muster_protocol::tls::negotiated_alpn(&conn).unwrap_or_default();
    let leaf = muster_protocol::tls::peer_leaf(&conn);
    let (Some(leaf), false) = (leaf, alpn == ALPN_ENROLL) else {
        // No client certificate, or enrollment: capped per source and in total, small
        // windows, one stream, a deadline.
        let admitted = shared.admission().unauthenticated(peer.ip(), shared.now());
        if let Err(r) = admitted {
            shared.log_refusal(
                peer,
                "a connection without a client certificate",
                &format_args!("{r} ({})", r.limit()),
            );
            conn.close(5u32.into(), r.to_string().as_bytes());
            return;
        }
        let _slot = Slot {
            shared: shared.clone(),
            ip: peer.ip(),
            kind: SlotKind::Unauthenticated,
        };
        if alpn != ALPN_ENROLL {
            // muster/1 needs a client certificate issued by our CA (rustls checked the
            // chain); without one the connection is closed before a byte is read.
            conn.close(1u32.into(), b"client certificate required");
            return;
        }
        match tokio::time::timeout(ENROLL_DEADLINE, handle_enroll_conn(&conn, &shared)).await {
            Ok(()) => conn.close(0u32.into(), b"enrollment answered"),
            Err(_) => {
                shared.log_refusal(
                    peer,
                    "an enrollment",
                    &format_args!("not finished within {} s", ENROLL_DEADLINE.as_secs()),
                );
                conn.close(5u32.into(), b"enrollment not finished in time");
            }
        }
        return;
    };
    let fingerprint = muster_protocol::tls::fingerprint(leaf.as_ref());
    let conn_id = ConnId(shared.next_conn.fetch_add(1, Ordering::Relaxed));
    // Nothing is served before the core says this certificate is a live identity.
    if !accept_identity(&conn, conn_id, &fingerprint, &shared).await {
        return;
    }
    conn.set_receive_window(quinn::VarInt::from_u32(
        muster_protocol::tls::HUB_CONNECTION_WINDOW,
    ));
    conn.set_max_concurrent_bi_streams(quinn::VarInt::from_u32(muster_protocol::tls::HUB_STREAMS));
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(_) => break,
        };
        let shared = shared.clone();
        let fingerprint = fingerprint.clone();
        let conn = conn.clone();
        tokio::spawn(async move {
            handle_stream(conn, conn_id, fingerprint, send, recv, shared).await;
        });
    }
    let _ = shared
        .to_core
        .send(ToCore::Disconnected { conn: conn_id })
        .await;
}

/// Asks the core whether `fingerprint` is a live identity (registering the connection
/// if so); closes the connection with the reason if not.
pub(super) async fn accept_identity(
    conn: &quinn::Connection,
    conn_id: ConnId,
    fingerprint: &str,
    shared: &Shared,
) -> bool {
    let (tx, rx) = oneshot::channel();
    let ask = ToCore::Accept {
        conn: conn_id,
        fingerprint: fingerprint.to_owned(),
        connection: conn.clone(),
        reply: tx,
    };
    let answer = tokio::time::timeout(ACCEPT_CHECK_TIMEOUT, async {
        shared.to_core.send(ask).await.ok()?;
        rx.await.ok()
    })
    .await;
    match answer {
        Ok(Some(true)) => true,
        Ok(Some(false)) => {
            shared.log_refusal(
                conn.remote_address(),
                "a connection",
                &format_args!("certificate {fingerprint} is not a live identity"),
            );
            conn.close(muster_protocol::CLOSE_NOT_ENROLLED.into(), REVOKED_REASON);
            false
        }
        _ => {
            conn.close(7u32.into(), b"the hub is busy or shutting down; try again");
            false
        }
    }
}

/// The close reason for a certificate that is unknown or revoked (clients recognise
/// "certificate" and "revoked" in it).
pub(super) const REVOKED_REASON: &[u8] =
    b"this client certificate is not enrolled at this hub or has been revoked";

/// Whether a read failed because the peer closed the connection itself.
pub(super) fn closed_by_peer(e: &std::io::Error) -> bool {
    matches!(
        e.get_ref()
            .and_then(|inner| inner.downcast_ref::<quinn::ReadError>()),
        Some(quinn::ReadError::ConnectionLost(
            quinn::ConnectionError::ApplicationClosed(_)
        ))
    )
}
