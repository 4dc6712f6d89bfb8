//! The hub's IO shell: the QUIC endpoint, one driver per connection, and the
//! core loop that joins them to the [`Core`].
//!
//! ```text
//! connection tasks ──ToCore (bounded)──▶ core thread: batch ─▶ Core::handle ─▶ Store::commit ─▶ deliver
//!        ▲                                                                                │
//!        └──────────── per-session HubMsg channel (bounded) / oneshot replies ◀───────────┘
//! ```
//!
//! The core thread is a plain OS thread: it blocks on redb commits, which must
//! not run on the async workers. Everything that arrived while it committed
//! forms the next batch, so concurrent events share one commit (group commit).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use muster_protocol::msg::{
    EnrollRefusal, EnrollRequest, EnrollResponse, HubMsg, OpError, OpErrorCode, OpRequest,
    OpResponse, Open, OpenBody, Refused, SessionMsg,
};
use muster_protocol::{
    ALPN_ENROLL, EventSeq, PROTOCOL_VERSION, TaskId, decode, encode, frame_codec, peek_protocol,
};
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};
use tracing::{debug, info, warn};

use crate::config::HubConfig;
use crate::core::{ConnId, Core, Input, Millis, Reply, ReplyId, TaskState, views};
use crate::pki::{Pki, cert_key_fingerprint, csr_key_fingerprint};
use crate::store::{Store, StoreError};
use muster_hub_core::admission::{Admission, AdmissionLimits, Handshake};
use muster_protocol::pace::{LogBudget, Window};

/// Capacity of the channel into the core: bounds memory when the core falls behind;
/// senders wait (sessions) or fail fast (ticks).
const CORE_QUEUE_LEN: usize = 8192;
/// Most inputs handled per commit, so one batch's latency stays bounded.
const BATCH_LEN_MAX: usize = 4096;
/// Per-session outgoing queue; a sidecar that falls this far behind is disconnected.
const SESSION_QUEUE_LEN: usize = 4096;
/// How often the core checks deadlines.
const TICK: Duration = Duration::from_millis(250);
/// Most `watch` events sent per read of the log.
const WATCH_PAGE: usize = 512;
/// Alerts waiting for `alert_command`; past this they are dropped (they stay in the event log).
const ALERT_QUEUE_LEN: usize = 256;
/// Most attempts `task show` lists (newest first; the rest are counted).
const ATTEMPTS_SHOWN_MAX: usize = 100;
/// How long one run of `alert_command` may take before it is killed.
const ALERT_COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// Shared counters, for `stats` and metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Session messages received, heartbeats apart.
    pub msgs_in: AtomicU64,
    /// Session messages sent.
    pub msgs_out: AtomicU64,
    /// Bytes of the above, framing included.
    pub bytes: AtomicU64,
    /// Commits made.
    pub commits: AtomicU64,
    /// Writes committed.
    pub writes: AtomicU64,
    /// Total commit time, microseconds.
    pub commit_us: AtomicU64,
}

/// Messages from the IO shell to the core thread.
enum ToCore {
    Hello {
        conn: ConnId,
        fingerprint: String,
        hello: muster_protocol::msg::Hello,
        tx: mpsc::Sender<HubMsg>,
        connection: quinn::Connection,
    },
    Session {
        conn: ConnId,
        msg: SessionMsg,
    },
    Closed {
        conn: ConnId,
    },
    /// A `muster/1` connection finished its handshake: is `fingerprint` a live
    /// identity? If so the connection is registered (to be closed when revoked).
    Accept {
        conn: ConnId,
        fingerprint: String,
        connection: quinn::Connection,
        reply: oneshot::Sender<bool>,
    },
    /// A registered `muster/1` connection ended.
    Disconnected {
        conn: ConnId,
    },
    Op {
        fingerprint: String,
        request: OpRequest,
        reply: oneshot::Sender<OpResponse>,
    },
    Enroll {
        secret_hash: String,
        role: muster_protocol::msg::Role,
        name: String,
        cert: (String, String, String),
        grant: (Vec<String>, u32),
        reply: oneshot::Sender<EnrollResponse>,
    },
    Tick,
    Watch {
        fingerprint: String,
        tx: mpsc::Sender<OpResponse>,
        from: Option<EventSeq>,
    },
    /// `/metrics`: render the registry from a fresh core snapshot.
    Scrape(oneshot::Sender<String>),
    /// `/healthz`: is the store writable?
    Health(oneshot::Sender<Result<(), String>>),
    /// Finish the current batch, commit it, and stop.
    Shutdown,
}

/// What `serve` needs.
pub struct Hub {
    /// The configuration.
    pub config: HubConfig,
    /// The data directory.
    pub data_dir: PathBuf,
}

/// Wall-clock milliseconds that never go backwards (a clock stepped back is held).
struct Clock {
    last: Millis,
}

impl Clock {
    fn now(&mut self) -> Millis {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        self.last = self.last.max(wall);
        self.last
    }
}

/// A running hub.
pub struct Running {
    /// The bound QUIC address.
    pub addr: SocketAddr,
    http: Option<tokio::task::JoinHandle<()>>,
    endpoint: quinn::Endpoint,
    to_core: mpsc::Sender<ToCore>,
    core_thread: std::thread::JoinHandle<Result<(), StoreError>>,
    accept: tokio::task::JoinHandle<()>,
    ticker: tokio::task::JoinHandle<()>,
}

/// Why the hub could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The PKI files are missing or bad.
    #[error("{0} (run `muster-hub init` first?)")]
    Pki(#[from] crate::pki::PkiError),
    /// The store could not be opened.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// TLS configuration.
    #[error("{0}")]
    Tls(#[from] muster_protocol::tls::TlsError),
    /// The listener could not bind.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// UDP receive buffer asked of the OS: a burst of thousands of handshakes (a fleet
/// reconnecting after a hub restart) overflows the default 208 KiB and stalls them.
const UDP_RECV_BUFFER: usize = 4 << 20;
/// Handshakes worked on at once (crypto, timers). Admitted handshakes past it wait
/// at most [`HANDSHAKE_QUEUE_WAIT`] for a place, then are refused: a fleet
/// reconnecting after a hub restart flows through at full speed instead of
/// retrying against refusals, and a stalled handshake holds its place at most
/// [`HANDSHAKE_TIMEOUT`].
const HANDSHAKES_WORKING: usize = 64;
/// Handshakes admitted at once, working or waiting. Past it an unvalidated address
/// gets a stateless Retry and a validated one is refused at once; one source never
/// holds more than `limits.handshakes_per_source` of them, so a source that stalls
/// its handshakes waits behind its own, not others behind it.
const HANDSHAKES_MAX: u32 = 4096;
/// How long an admitted handshake may wait for one of the working places.
const HANDSHAKE_QUEUE_WAIT: Duration = Duration::from_secs(5);
/// How long one handshake may hold its place. On loopback a handshake takes about a
/// millisecond; one that has not finished in this time is for a client that gave up or
/// never meant to finish, and would otherwise hold the place until the idle timeout (15 s).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// The whole enrollment exchange (accept the stream, read one request, answer, close);
/// an enrollment connection still open past it is closed.
const ENROLL_DEADLINE: Duration = Duration::from_secs(10);
/// Largest enrollment request frame (a CSR, a token and a name fit in a few KiB).
const ENROLL_FRAME_MAX: usize = 64 * 1024;
/// How long a new `muster/1` connection waits for the core to say whose it is.
const ACCEPT_CHECK_TIMEOUT: Duration = Duration::from_secs(10);
/// Refusals logged per [`REFUSAL_LOG_WINDOW`]; the rest are counted and the count logged
/// with the next line, so an attack cannot flood the log.
const REFUSAL_LOG_LINES: u32 = 10;
/// See [`REFUSAL_LOG_LINES`].
const REFUSAL_LOG_WINDOW: Duration = Duration::from_secs(60);
/// How often the core drops registered connections that closed without saying so.
const REGISTRY_SWEEP: Duration = Duration::from_secs(5);

/// The file holding the key for QUIC stateless resets.
const RESET_KEY_FILE: &str = "reset.key";

/// The stateless-reset key, kept across restarts: a restarted hub then answers
/// packets of connections it no longer knows with a reset the sidecar trusts, so
/// sidecars reconnect at once instead of waiting out the idle timeout.
fn load_reset_key(dir: &Path) -> std::io::Result<(ring::hmac::Key, u64)> {
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
fn bind_endpoint(
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

/// Where a hub's token prefix points: `muster1/<advertise>/<ca fingerprint>/`.
fn token_prefix(advertise: &str, ca_fp: &str) -> String {
    format!("muster1/{advertise}/{ca_fp}/")
}

impl Hub {
    /// Opens the store, loads the PKI, binds the listener and starts the core.
    /// Returns once the listener is bound and the database open (the readiness point).
    ///
    /// # Errors
    /// [`StartError`] naming what failed.
    pub async fn start(self) -> Result<Running, StartError> {
        let pki = Arc::new(Pki::load(&self.data_dir)?);
        let db_path = self.data_dir.join(crate::store::DB_FILE);
        let store = Store::open(&db_path)?;
        if let Err(e) = restrict_db(&db_path) {
            warn!(
                "cannot make {} readable by this user only: {e}",
                db_path.display()
            );
        }
        let mut clock = Clock { last: 0 };
        let now = clock.now();
        let restored = store.restore(now)?;
        let seed = now ^ u64::from(std::process::id()).rotate_left(32);
        let mut core = Core::new(
            self.config.policy.clone(),
            self.config.limits.clone(),
            restored,
            now,
            seed,
        );
        let host = hostname();
        let advertise = self.config.advertise_addr(&host);
        let server_cfg = muster_protocol::tls::server_config(
            pki.ca_der.clone(),
            pki.server_chain.clone(),
            pki.server_key.clone_key(),
        )?;
        let reset_key = load_reset_key(&self.data_dir).map_err(|source| StartError::Bind {
            addr: self.config.listen,
            source,
        })?;
        let endpoint =
            bind_endpoint(server_cfg, reset_key, self.config.listen).map_err(|source| {
                StartError::Bind {
                    addr: self.config.listen,
                    source,
                }
            })?;
        let addr = endpoint.local_addr().map_err(|source| StartError::Bind {
            addr: self.config.listen,
            source,
        })?;
        // The token must name the port really bound (listen may say :0 in tests).
        let advertise = if advertise.ends_with(":0") {
            addr.to_string()
        } else {
            advertise
        };
        core.set_token_prefix(token_prefix(&advertise, &pki.ca_fingerprint()));
        let (to_core, rx) = mpsc::channel(CORE_QUEUE_LEN);
        let metrics = Arc::new(Metrics::default());
        let events_max = self.config.policy.events_max;
        let retention_ms = self.config.policy.retention.as_millis() as u64;
        let m = metrics.clone();
        let hub_metrics = Arc::new(crate::metrics::HubMetrics::default());
        let hm = hub_metrics.clone();
        let data_dir = self.data_dir.clone();
        let alert_tx = (!self.config.alert_command.is_empty()).then(|| {
            let (tx, rx) = mpsc::channel(ALERT_QUEUE_LEN);
            tokio::spawn(alert_worker(self.config.alert_command.clone(), rx));
            tx
        });
        let core_thread = std::thread::Builder::new()
            .name("muster-core".into())
            .spawn(move || {
                let shell = Shell {
                    metrics: m,
                    hub_metrics: hm,
                    data_dir,
                    events_max,
                    retention_ms,
                    alert_tx,
                };
                core_loop(core, store, rx, clock, shell)
            })
            .map_err(|source| StartError::Bind { addr, source })?;
        let shared = Arc::new(Shared {
            to_core: to_core.clone(),
            pki,
            metrics,
            started: Instant::now(),
            admission: Mutex::new(Admission::new(
                AdmissionLimits::from_limits(&self.config.limits, HANDSHAKES_MAX),
                Duration::ZERO,
            )),
            refusals: Mutex::new(LogBudget::new(REFUSAL_LOG_LINES, REFUSAL_LOG_WINDOW)),
            next_conn: AtomicU64::new(1),
            max_frame: self.config.limits.max_frame_bytes as usize,
            max_connections: self.config.limits.max_connections as usize,
            live: AtomicUsize::new(0),
            messages_per_second: self.config.limits.messages_per_second,
        });
        let accept = tokio::spawn(accept_loop(endpoint.clone(), shared));
        let http = match self.config.http_listen {
            Some(addr) => Some(
                muster_protocol::http::serve(addr, http_handler(to_core.clone()))
                    .await
                    .map_err(|e| StartError::Bind {
                        addr,
                        source: std::io::Error::other(e),
                    })?,
            ),
            None => None,
        };
        let tick_tx = to_core.clone();
        let ticker = tokio::spawn(async move {
            let mut every = tokio::time::interval(TICK);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                // A full queue already keeps the core busy; dropping a tick loses nothing.
                if let Err(mpsc::error::TrySendError::Closed(_)) = tick_tx.try_send(ToCore::Tick) {
                    break;
                }
            }
        });
        info!(%addr, advertise, "hub listening");
        Ok(Running {
            addr,
            http,
            endpoint,
            to_core,
            core_thread,
            accept,
            ticker,
        })
    }
}

impl Running {
    /// Stops taking connections, lets the core commit what it has, and closes.
    ///
    /// # Errors
    /// The store error that stopped the core, if one did.
    pub async fn shutdown(self) -> Result<(), StoreError> {
        self.accept.abort();
        self.ticker.abort();
        if let Some(h) = &self.http {
            h.abort();
        }
        self.endpoint.close(0u32.into(), b"hub shutting down");
        // Connection tasks (a `watch` stream, say) may still hold senders: tell the core
        // to stop rather than waiting for every sender to go away.
        let _ = self.to_core.send(ToCore::Shutdown).await;
        drop(self.to_core);
        let core = tokio::task::spawn_blocking(move || self.core_thread.join());
        let result = match core.await {
            Ok(Ok(r)) => r,
            _ => Err(StoreError::Db("the core thread panicked".into())),
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
        result
    }

    /// Waits until the core stops on its own (a fatal store error).
    pub fn core_finished(&self) -> bool {
        self.core_thread.is_finished()
    }
}

struct Shared {
    to_core: mpsc::Sender<ToCore>,
    pki: Arc<Pki>,
    metrics: Arc<Metrics>,
    /// The origin of the monotonic `now` the admission policy is given.
    started: Instant,
    /// Handshakes, unauthenticated connections and enrollments per source and in total.
    admission: Mutex<Admission>,
    /// Bounds the log lines refusals write.
    refusals: Mutex<LogBudget>,
    next_conn: AtomicU64,
    max_frame: usize,
    /// Most connections at once; past it new ones are refused before the handshake.
    max_connections: usize,
    /// Connections counted against `max_connections`: from the start of the handshake
    /// to the end of the connection's task. Unlike quinn's own count it leaves out
    /// connections already closed and draining (a few round trips), which would
    /// otherwise let a burst of refused peers fill the cap for a moment.
    live: AtomicUsize,
    /// Session messages per second per connection; a sidecar past it is disconnected.
    messages_per_second: u32,
}

impl Shared {
    /// Monotonic time since the listener started, for the pure policies.
    fn now(&self) -> Duration {
        self.started.elapsed()
    }

    fn admission(&self) -> std::sync::MutexGuard<'_, Admission> {
        // The critical sections cannot panic half-way; a poisoned lock still holds
        // consistent counts.
        self.admission
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Logs a refusal, at most [`REFUSAL_LOG_LINES`] per [`REFUSAL_LOG_WINDOW`].
    fn log_refusal(&self, peer: SocketAddr, what: &str, reason: &dyn std::fmt::Display) {
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
struct Live(Arc<Shared>);

impl Live {
    fn new(shared: Arc<Shared>) -> Self {
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
struct Slot {
    shared: Arc<Shared>,
    ip: IpAddr,
    kind: SlotKind,
}

#[derive(Clone, Copy)]
enum SlotKind {
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

fn wall_ms() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The machine's host name, for token addresses and default SANs.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

async fn accept_loop(endpoint: quinn::Endpoint, shared: Arc<Shared>) {
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

async fn handle_connection(conn: quinn::Connection, shared: Arc<Shared>) {
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
async fn accept_identity(
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
const REVOKED_REASON: &[u8] =
    b"this client certificate is not enrolled at this hub or has been revoked";

/// Whether a read failed because the peer closed the connection itself.
fn closed_by_peer(e: &std::io::Error) -> bool {
    matches!(
        e.get_ref()
            .and_then(|inner| inner.downcast_ref::<quinn::ReadError>()),
        Some(quinn::ReadError::ConnectionLost(
            quinn::ConnectionError::ApplicationClosed(_)
        ))
    )
}

fn framed(
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    max: usize,
) -> (
    FramedWrite<quinn::SendStream, LengthDelimitedCodec>,
    FramedRead<quinn::RecvStream, LengthDelimitedCodec>,
) {
    (
        FramedWrite::new(send, frame_codec(max)),
        FramedRead::new(recv, frame_codec(max)),
    )
}

async fn send_frame<T: serde::Serialize>(
    wr: &mut FramedWrite<quinn::SendStream, LengthDelimitedCodec>,
    msg: &T,
) -> Result<usize, String> {
    let bytes = encode(msg).map_err(|e| e.to_string())?;
    let n = bytes.len() + 4;
    wr.send(Bytes::from(bytes))
        .await
        .map_err(|e| e.to_string())?;
    Ok(n)
}

async fn handle_stream(
    conn: quinn::Connection,
    conn_id: ConnId,
    fingerprint: String,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    shared: Arc<Shared>,
) {
    let (mut wr, mut rd) = framed(send, recv, shared.max_frame);
    let first = match rd.next().await {
        Some(Ok(f)) => f,
        Some(Err(e)) => {
            warn!(peer = %conn.remote_address(), "closing stream: bad first frame: {e}");
            return;
        }
        None => return,
    };
    if let Some((v, kind)) =
        muster_protocol::peek_open(&first).filter(|(v, _)| *v != PROTOCOL_VERSION)
    {
        let refusal = Refused::ProtocolMismatch {
            hub: PROTOCOL_VERSION,
            peer: v,
        };
        // Answer in the form the peer reads: a sidecar a hub message, an operator a response.
        let _ = if kind == 1 {
            let resp = OpResponse::Error(OpError {
                code: OpErrorCode::ProtocolMismatch,
                message: refusal.to_string(),
            });
            send_frame(&mut wr, &resp).await
        } else {
            send_frame(&mut wr, &HubMsg::Refused(refusal)).await
        };
        let _ = wr.get_mut().finish();
        let _ = tokio::time::timeout(Duration::from_secs(5), wr.get_mut().stopped()).await;
        return;
    }
    let open: Open = match decode(&first) {
        Ok(o) => o,
        Err(e) => {
            warn!(peer = %conn.remote_address(), "closing stream: {e}");
            return;
        }
    };
    match open.body {
        OpenBody::Session(hello) => {
            run_session(conn, conn_id, fingerprint, hello, wr, rd, shared).await;
        }
        OpenBody::Request(OpRequest::Watch { from }) => {
            run_watch(fingerprint, from, wr, shared).await;
        }
        OpenBody::Request(request) => {
            let (tx, rx) = oneshot::channel();
            let msg = ToCore::Op {
                fingerprint,
                request,
                reply: tx,
            };
            let resp = if shared.to_core.send(msg).await.is_err() {
                internal("the hub is shutting down")
            } else {
                rx.await
                    .unwrap_or_else(|_| internal("the hub is shutting down"))
            };
            if let Err(e) = send_frame(&mut wr, &resp).await {
                warn!(peer = %conn.remote_address(), "an operator answer was not sent: {e}");
            }
            let _ = wr.get_mut().finish();
            // Let the peer read the answer before the stream is dropped.
            let _ = tokio::time::timeout(Duration::from_secs(5), wr.get_mut().stopped()).await;
        }
    }
}

fn internal(msg: &str) -> OpResponse {
    OpResponse::Error(OpError {
        code: OpErrorCode::Internal,
        message: msg.into(),
    })
}

async fn run_session(
    conn: quinn::Connection,
    conn_id: ConnId,
    fingerprint: String,
    hello: muster_protocol::msg::Hello,
    mut wr: FramedWrite<quinn::SendStream, LengthDelimitedCodec>,
    mut rd: FramedRead<quinn::RecvStream, LengthDelimitedCodec>,
    shared: Arc<Shared>,
) {
    let (tx, mut rx) = mpsc::channel::<HubMsg>(SESSION_QUEUE_LEN);
    let agent = hello.agent.to_string();
    let hello_msg = ToCore::Hello {
        conn: conn_id,
        fingerprint,
        hello,
        tx,
        connection: conn.clone(),
    };
    if shared.to_core.send(hello_msg).await.is_err() {
        return;
    }
    let metrics = shared.metrics.clone();
    let writer = tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            let last = matches!(msg, HubMsg::Refused(_));
            // Per-task coordination cost: the session's own Welcome is not a task message,
            // as the sidecar's Hello and heartbeats are not counted either.
            let counted = !matches!(msg, HubMsg::Welcome(_) | HubMsg::Refused(_));
            match send_frame(&mut wr, &msg).await {
                Ok(n) if counted => {
                    metrics.msgs_out.fetch_add(1, Ordering::Relaxed);
                    metrics.bytes.fetch_add(n as u64, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(_) => break,
            }
            if last {
                let _ = wr.get_mut().finish();
                break;
            }
        }
    });
    // A one-second window: a sidecar sends a few messages per task and a heartbeat
    // per interval, so this bound only stops a peer that floods.
    let mut window = Window::new(Duration::from_secs(1), shared.now());
    loop {
        let frame = match rd.next().await {
            Some(Ok(f)) => f,
            Some(Err(e)) if closed_by_peer(&e) => {
                // A sidecar stopping (SIGTERM, upgrade) closes its connection on purpose.
                info!(agent, "session closed by the sidecar");
                break;
            }
            Some(Err(e)) => {
                warn!(agent, "closing session: {e}");
                break;
            }
            None => break,
        };
        if window
            .take(shared.now(), shared.messages_per_second)
            .is_err()
        {
            warn!(
                agent,
                limit = shared.messages_per_second,
                "closing session: more messages per second than limits.messages_per_second"
            );
            break;
        }
        let msg: SessionMsg = match decode(&frame) {
            Ok(m) => m,
            Err(e) => {
                warn!(agent, "closing session: {e}");
                break;
            }
        };
        if !matches!(msg, SessionMsg::Heartbeat(_)) {
            shared.metrics.msgs_in.fetch_add(1, Ordering::Relaxed);
            shared
                .metrics
                .bytes
                .fetch_add(frame.len() as u64 + 4, Ordering::Relaxed);
        }
        if shared
            .to_core
            .send(ToCore::Session { conn: conn_id, msg })
            .await
            .is_err()
        {
            break;
        }
    }
    let _ = shared.to_core.send(ToCore::Closed { conn: conn_id }).await;
    writer.abort();
    // A session stream that failed takes its connection with it: the sidecar reconnects.
    conn.close(2u32.into(), b"session ended");
}

async fn run_watch(
    fingerprint: String,
    from: Option<EventSeq>,
    mut wr: FramedWrite<quinn::SendStream, LengthDelimitedCodec>,
    shared: Arc<Shared>,
) {
    let (tx, mut rx) = mpsc::channel(WATCH_PAGE * 2);
    let msg = ToCore::Watch {
        fingerprint,
        tx,
        from,
    };
    if shared.to_core.send(msg).await.is_err() {
        return;
    }
    loop {
        // End when the watcher goes away, not only when the next event fails to send.
        let ev = tokio::select! {
            ev = rx.recv() => ev,
            _ = wr.get_mut().stopped() => return,
        };
        let Some(ev) = ev else { break };
        if send_frame(&mut wr, &ev).await.is_err() {
            return;
        }
    }
    let _ = wr.get_mut().finish();
}

/// One enrollment exchange: one stream, one request, one answer. The caller bounds it
/// in time and closes the connection after.
async fn handle_enroll_conn(conn: &quinn::Connection, shared: &Shared) {
    let Ok((send, recv)) = conn.accept_bi().await else {
        return;
    };
    let (mut wr, mut rd) = framed(send, recv, ENROLL_FRAME_MAX);
    let resp = match rd.next().await {
        Some(Ok(frame)) => enroll(&frame, shared, conn.remote_address()).await,
        _ => return,
    };
    let _ = send_frame(&mut wr, &resp).await;
    let _ = wr.get_mut().finish();
    // Let the peer read the answer before the connection is closed.
    let _ = wr.get_mut().stopped().await;
}

async fn enroll(frame: &[u8], shared: &Shared, peer: SocketAddr) -> EnrollResponse {
    let refuse = EnrollResponse::Refused;
    // Every attempt counts against its source until it succeeds; one source's
    // failures never use up another's budget.
    let now = shared.now();
    let limited = shared.admission().enroll(peer.ip(), now);
    if let Err(wait) = limited {
        shared.log_refusal(
            peer,
            "an enrollment",
            &format_args!("too many failed attempts from this address (limits.enroll_per_minute); retry in {wait} s"),
        );
        return refuse(EnrollRefusal::RateLimited {
            retry_after_s: wait,
        });
    }
    let resp = enroll_checked(frame, shared).await;
    if matches!(resp, EnrollResponse::Enrolled { .. }) {
        shared.admission().enrolled(peer.ip());
    }
    resp
}

async fn enroll_checked(frame: &[u8], shared: &Shared) -> EnrollResponse {
    let refuse = EnrollResponse::Refused;
    if let Some(v) = peek_protocol(frame).filter(|v| *v != PROTOCOL_VERSION) {
        return refuse(EnrollRefusal::ProtocolMismatch {
            hub: PROTOCOL_VERSION,
            peer: v,
        });
    }
    let req: EnrollRequest = match decode(frame) {
        Ok(r) => r,
        Err(e) => {
            return refuse(EnrollRefusal::BadRequest {
                reason: e.to_string(),
            });
        }
    };
    let bad = |reason: String| refuse(EnrollRefusal::BadRequest { reason });
    let key_fp = match csr_key_fingerprint(&req.csr_pem) {
        Ok(fp) => fp,
        Err(e) => return bad(format!("certificate signing request: {e}")),
    };
    let (cert_pem, fingerprint) = match shared.pki.sign_csr(&req.csr_pem, req.name.as_str()) {
        Ok(c) => c,
        Err(e) => return bad(format!("certificate signing request: {e}")),
    };
    let secret_hash = muster_protocol::tls::fingerprint(req.secret.as_bytes());
    let (tx, rx) = oneshot::channel();
    let msg = ToCore::Enroll {
        secret_hash,
        role: req.role,
        name: req.name.to_string(),
        cert: (cert_pem, fingerprint, key_fp),
        grant: (req.capabilities, req.slots),
        reply: tx,
    };
    if shared.to_core.send(msg).await.is_err() {
        return bad("the hub is shutting down".into());
    }
    match rx.await {
        Ok(EnrollResponse::Enrolled { cert_pem, .. }) => EnrollResponse::Enrolled {
            cert_pem,
            ca_pem: shared.pki.ca_pem.clone(),
        },
        Ok(other) => other,
        Err(_) => bad("the hub is shutting down".into()),
    }
}

// === The core loop ===

struct SessionHandle {
    tx: mpsc::Sender<HubMsg>,
    connection: quinn::Connection,
}

struct Watcher {
    /// Whose stream this is: a revoked identity's watch ends.
    fingerprint: String,
    tx: mpsc::Sender<OpResponse>,
    next: u64,
}

/// A `muster/1` connection of a live identity, kept so revocation can close it.
struct Registered {
    fingerprint: String,
    connection: quinn::Connection,
}

enum Pending {
    /// An operator's answer; `true` for `stats`, which the shell adds its own figures to.
    Op(oneshot::Sender<OpResponse>, bool),
    Enroll(oneshot::Sender<EnrollResponse>),
}

/// What the core loop needs besides the core and the store.
struct Shell {
    metrics: Arc<Metrics>,
    hub_metrics: Arc<crate::metrics::HubMetrics>,
    data_dir: PathBuf,
    events_max: u64,
    retention_ms: u64,
    alert_tx: Option<mpsc::Sender<serde_json::Value>>,
}

/// How often finished tasks past their retention are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// Tasks pruned per sweep at most, so a sweep never holds the core for long.
const PRUNE_BATCH: usize = 10_000;

/// How long `/healthz` and `/metrics` wait for the core before answering 503.
const CORE_ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

fn http_handler(to_core: mpsc::Sender<ToCore>) -> muster_protocol::http::Handler {
    use muster_protocol::http::{PROMETHEUS, TEXT};
    Arc::new(move |path: String| {
        let to_core = to_core.clone();
        Box::pin(async move {
            match path.as_str() {
                "/metrics" => {
                    let (tx, rx) = oneshot::channel();
                    if to_core.try_send(ToCore::Scrape(tx)).is_err() {
                        return (503, TEXT, "the core is not taking requests\n".into());
                    }
                    match tokio::time::timeout(CORE_ANSWER_TIMEOUT, rx).await {
                        Ok(Ok(text)) => (200, PROMETHEUS, text),
                        _ => (503, TEXT, "the core did not answer within 2 s\n".into()),
                    }
                }
                "/healthz" => {
                    let (tx, rx) = oneshot::channel();
                    if to_core.try_send(ToCore::Health(tx)).is_err() {
                        return (
                            503,
                            TEXT,
                            "unhealthy: the core is not taking requests\n".into(),
                        );
                    }
                    match tokio::time::timeout(CORE_ANSWER_TIMEOUT, rx).await {
                        Ok(Ok(Ok(()))) => (200, TEXT, "ok: store writable, listener up\n".into()),
                        Ok(Ok(Err(e))) => (503, TEXT, format!("unhealthy: {e}\n")),
                        _ => (
                            503,
                            TEXT,
                            "unhealthy: the core did not answer within 2 s\n".into(),
                        ),
                    }
                }
                _ => (404, TEXT, "try /metrics or /healthz\n".into()),
            }
        })
    })
}

/// The store is writable: a redb commit and a synced probe file in the data directory.
fn health(store: &Store, dir: &Path) -> Result<(), String> {
    store
        .probe()
        .map_err(|e| format!("store not writable: {e}"))?;
    let probe = dir.join(".healthz");
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(&probe)?;
        f.write_all(b"ok")?;
        f.sync_all()
    };
    write().map_err(|e| format!("data directory not writable ({}): {e}", probe.display()))
}

/// Test hook, only in builds with the `test-hooks` feature: while the file named by
/// `MUSTER_TEST_STALL_FILE` exists the core loop stops making progress, so tests
/// can show that a stuck core stops the watchdog pings. Logged when set, so a
/// test can tell a build with the hook from one without.
#[cfg(feature = "test-hooks")]
fn stall_hook() -> Option<PathBuf> {
    let file = std::env::var_os("MUSTER_TEST_STALL_FILE").map(PathBuf::from)?;
    warn!(file = %file.display(), "test hook: the core loop stalls while this file exists");
    Some(file)
}

fn core_loop(
    mut core: Core,
    store: Store,
    mut rx: mpsc::Receiver<ToCore>,
    mut clock: Clock,
    shell: Shell,
) -> Result<(), StoreError> {
    let Shell {
        metrics,
        hub_metrics,
        data_dir,
        events_max,
        retention_ms,
        alert_tx,
    } = shell;
    let mut sessions: HashMap<ConnId, SessionHandle> = HashMap::new();
    let mut pending: HashMap<u64, Pending> = HashMap::new();
    let mut watchers: Vec<Watcher> = Vec::new();
    // Bounded by the open connections (limits.max_connections): an entry goes when its
    // connection reports its end, or at the next sweep if that message was lost.
    let mut registry: HashMap<ConnId, Registered> = HashMap::new();
    let mut last_sweep = Instant::now();
    let mut next_reply = 0u64;
    let watchdog = watchdog_interval();
    let mut last_watchdog = Instant::now();
    #[cfg(feature = "test-hooks")]
    let stall_file = stall_hook();
    let mut batch = Vec::with_capacity(BATCH_LEN_MAX);
    let mut last_prune = Instant::now();
    let mut stopping = false;
    while !stopping {
        let Some(first) = rx.blocking_recv() else {
            break;
        };
        #[cfg(feature = "test-hooks")]
        while stall_file.as_ref().is_some_and(|f| f.exists()) {
            std::thread::sleep(Duration::from_millis(50));
        }
        batch.push(first);
        while batch.len() < BATCH_LEN_MAX {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        let now = clock.now();
        let mut queries = Vec::new();
        let mut accepts = Vec::new();
        {
            let reader = store.reader()?;
            for msg in batch.drain(..) {
                let input = match msg {
                    ToCore::Hello {
                        conn,
                        fingerprint,
                        hello,
                        tx,
                        connection,
                    } => {
                        sessions.insert(conn, SessionHandle { tx, connection });
                        Input::Hello {
                            conn,
                            fingerprint,
                            hello,
                        }
                    }
                    ToCore::Session { conn, msg } => {
                        if let SessionMsg::Report(r) = &msg {
                            debug!(target: "muster::latency", task = r.task.0, point = "hub_report_in", kind = ?r.body.kind(), at_us = muster_protocol::wall_us());
                        }
                        Input::Session { conn, msg }
                    }
                    ToCore::Accept {
                        conn,
                        fingerprint,
                        connection,
                        reply,
                    } => {
                        // Answered after the commit, with this batch's revocations applied.
                        accepts.push((conn, fingerprint, connection, reply));
                        continue;
                    }
                    ToCore::Disconnected { conn } => {
                        registry.remove(&conn);
                        continue;
                    }
                    ToCore::Closed { conn } => {
                        sessions.remove(&conn);
                        Input::Closed { conn }
                    }
                    ToCore::Op {
                        fingerprint,
                        request,
                        reply,
                    } => {
                        if matches!(
                            request,
                            OpRequest::Tasks { .. } | OpRequest::TaskShow { .. }
                        ) {
                            queries.push((fingerprint, request, reply));
                            continue;
                        }
                        let token_secret = matches!(request, OpRequest::TokenCreate { .. })
                            .then(new_secret)
                            .flatten();
                        next_reply += 1;
                        let stats = matches!(request, OpRequest::Stats);
                        pending.insert(next_reply, Pending::Op(reply, stats));
                        Input::Op {
                            fingerprint,
                            request,
                            reply: ReplyId(next_reply),
                            token_secret,
                        }
                    }
                    ToCore::Enroll {
                        secret_hash,
                        role,
                        name,
                        cert,
                        grant,
                        reply,
                    } => {
                        next_reply += 1;
                        pending.insert(next_reply, Pending::Enroll(reply));
                        Input::Enroll {
                            secret_hash,
                            role,
                            name,
                            cert,
                            grant,
                            reply: ReplyId(next_reply),
                        }
                    }
                    ToCore::Tick => Input::Tick,
                    ToCore::Scrape(tx) => {
                        let _ = tx.send(hub_metrics.render(&core.snapshot(now), &metrics));
                        continue;
                    }
                    ToCore::Health(tx) => {
                        let _ = tx.send(health(&store, &data_dir));
                        continue;
                    }
                    ToCore::Shutdown => {
                        stopping = true;
                        continue;
                    }
                    ToCore::Watch {
                        fingerprint,
                        tx,
                        from,
                    } => {
                        start_watch(&core, &store, fingerprint, tx, from, &mut watchers);
                        continue;
                    }
                };
                core.handle(now, input, &reader);
            }
        }
        let out = core.take_output();
        for w in &out.writes {
            if let crate::core::Write::Event(e) = w {
                // Task transitions come several per task: at debug, so a busy hub does not
                // spend its core thread writing logs. Agents, alerts and audit at info.
                if e.json.contains("\"kind\":\"task\"") {
                    debug!(target: "muster::events", seq = e.seq, "{}", e.json);
                } else {
                    info!(target: "muster::events", seq = e.seq, "{}", e.json);
                }
            }
        }
        let started = Instant::now();
        // Commit before acknowledge: nothing below leaves until this returns Ok.
        store.commit(&out.writes, events_max)?;
        for ms in &out.dispatch_ms {
            hub_metrics.dispatch.observe(*ms as f64 / 1000.0);
        }
        if !out.writes.is_empty() {
            hub_metrics.commit.observe(started.elapsed().as_secs_f64());
            hub_metrics.group.observe(out.writes.len() as f64);
            hub_metrics.commits.inc();
            metrics.commits.fetch_add(1, Ordering::Relaxed);
            metrics
                .writes
                .fetch_add(out.writes.len() as u64, Ordering::Relaxed);
            metrics
                .commit_us
                .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        }
        if tracing::enabled!(target: "muster::latency", tracing::Level::DEBUG) {
            let at_us = muster_protocol::wall_us();
            for w in &out.writes {
                if let crate::core::Write::Task(t) = w {
                    debug!(target: "muster::latency", task = t.id.0, point = "hub_commit", state = t.state.as_str(), at_us);
                }
            }
            for (_, msg) in &out.sends {
                if let HubMsg::Assign(a) = msg {
                    debug!(target: "muster::latency", task = a.task.0, point = "hub_assign_out", at_us);
                }
            }
        }
        for (conn, msg) in out.sends {
            let Some(s) = sessions.get(&conn) else {
                continue;
            };
            if s.tx.try_send(msg).is_err() {
                warn!(?conn, "session queue full or closed; disconnecting it");
                s.connection.close(3u32.into(), b"too slow");
                sessions.remove(&conn);
            }
        }
        for (id, reply) in out.replies {
            match (pending.remove(&id.0), reply) {
                (Some(Pending::Op(tx, stats)), Reply::Op(mut r)) => {
                    if stats {
                        add_shell_stats(&mut r, &metrics, &core);
                    }
                    let _ = tx.send(r);
                }
                (Some(Pending::Enroll(tx)), Reply::Enroll(r)) => {
                    let _ = tx.send(r);
                }
                _ => {}
            }
        }
        for alert in out.alerts {
            warn!(alert = %alert, "alert");
            if let Some(tx) = &alert_tx
                && tx.try_send(alert).is_err()
            {
                warn!(
                    "alert_command is falling behind; an alert was not passed to it (it is in the event log)"
                );
            }
        }
        if !out.revoked.is_empty() {
            cut_off(&out.revoked, &mut registry, &mut watchers);
        }
        for (conn, fingerprint, connection, reply) in accepts {
            let live = core.identity(&fingerprint).is_some();
            if live {
                registry.insert(
                    conn,
                    Registered {
                        fingerprint,
                        connection,
                    },
                );
            }
            if reply.send(live).is_err() {
                // The connection task gave up waiting; it closes the connection itself.
                registry.remove(&conn);
            }
        }
        if last_sweep.elapsed() >= REGISTRY_SWEEP {
            last_sweep = Instant::now();
            registry.retain(|_, r| r.connection.close_reason().is_none());
        }
        for conn in out.closes {
            if let Some(s) = sessions.remove(&conn) {
                // Let the refusal frame go out first; the close follows shortly.
                let c = s.connection.clone();
                drop(s);
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(50));
                    c.close(4u32.into(), b"closed by the hub");
                });
            }
        }
        for (fingerprint, request, reply) in queries {
            let _ = reply.send(query(&core, &store, &fingerprint, request));
        }
        feed_watchers(&store, &mut watchers);
        if last_prune.elapsed() >= PRUNE_EVERY {
            last_prune = Instant::now();
            let before = now.saturating_sub(retention_ms);
            match store.prune(before, PRUNE_BATCH) {
                Ok(ids) if !ids.is_empty() => {
                    info!(
                        pruned = ids.len(),
                        "pruned finished tasks past their retention"
                    );
                    core.forget_keys(&ids);
                }
                Ok(_) => {}
                Err(e) => warn!("pruning finished tasks: {e}"),
            }
        }
        if let Some(interval) = watchdog
            && last_watchdog.elapsed() >= interval / 2
        {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            last_watchdog = Instant::now();
        }
    }
    Ok(())
}

/// Closes every connection of the revoked certificates and ends their `watch` streams.
fn cut_off(
    revoked: &[String],
    registry: &mut HashMap<ConnId, Registered>,
    watchers: &mut Vec<Watcher>,
) {
    // Dropping a watcher's sender ends its stream (the stream task finishes it).
    watchers.retain(|w| !revoked.contains(&w.fingerprint));
    let mut closing = Vec::new();
    registry.retain(|_, r| {
        if revoked.contains(&r.fingerprint) {
            closing.push(r.connection.clone());
            false
        } else {
            true
        }
    });
    info!(
        certificates = revoked.len(),
        connections = closing.len(),
        "revoked: closing their connections"
    );
    if closing.is_empty() {
        return;
    }
    // A moment for a session's refusal frame to go out first, as for `closes`.
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        for c in closing {
            c.close(muster_protocol::CLOSE_NOT_ENROLLED.into(), REVOKED_REASON);
        }
    });
}

/// Runs `alert_command` once per alert with the alert as JSON on stdin, one at a time,
/// each bounded in time; failures are logged and never reach the core.
async fn alert_worker(argv: Vec<String>, mut rx: mpsc::Receiver<serde_json::Value>) {
    use tokio::io::AsyncWriteExt;
    while let Some(alert) = rx.recv().await {
        let Some((program, args)) = argv.split_first() else {
            return;
        };
        let spawned = tokio::process::Command::new(program)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn();
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                warn!(command = ?argv, "alert_command cannot start: {e}");
                continue;
            }
        };
        let mut line = alert.to_string().into_bytes();
        line.push(b'\n');
        let stdin = child.stdin.take();
        // The write is inside the time limit too: a command that never reads its
        // stdin must not hold the worker (and every later alert) forever.
        let run = async move {
            if let Some(mut stdin) = stdin {
                let _ = stdin.write_all(&line).await;
            }
            child.wait_with_output().await
        };
        match tokio::time::timeout(ALERT_COMMAND_TIMEOUT, run).await {
            Ok(Ok(out)) if out.status.success() => {}
            Ok(Ok(out)) => warn!(
                command = ?argv,
                "alert_command failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Ok(Err(e)) => warn!(command = ?argv, "alert_command: {e}"),
            Err(_) => {
                warn!(command = ?argv, "alert_command did not finish within {} s; killed", ALERT_COMMAND_TIMEOUT.as_secs())
            }
        }
    }
}

fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
}

/// A fresh token secret and its hash; `None` if the system RNG fails, which the
/// core answers with an error rather than a weak secret.
fn new_secret() -> Option<(String, String)> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 32];
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        warn!("the system random number generator failed; no token created");
        return None;
    }
    let secret = muster_protocol::tls::hex(&bytes);
    let hash = muster_protocol::tls::fingerprint(secret.as_bytes());
    Some((secret, hash))
}

fn add_shell_stats(resp: &mut OpResponse, metrics: &Metrics, core: &Core) {
    let OpResponse::Ok { json } = resp else {
        return;
    };
    let Ok(mut v) = serde_json::from_str::<serde_json::Value>(json) else {
        return;
    };
    if v.get("finished").is_none() || v.get("heartbeats").is_none() {
        return;
    }
    let finished = core.counters().finished.max(1) as f64;
    let msgs = metrics.msgs_in.load(Ordering::Relaxed) + metrics.msgs_out.load(Ordering::Relaxed);
    let bytes = metrics.bytes.load(Ordering::Relaxed);
    let commits = metrics.commits.load(Ordering::Relaxed);
    let writes = metrics.writes.load(Ordering::Relaxed);
    v["messages"] = msgs.into();
    v["bytes"] = bytes.into();
    v["messages_per_finished_task"] = (msgs as f64 / finished).into();
    v["bytes_per_finished_task"] = (bytes as f64 / finished).into();
    v["commits"] = commits.into();
    v["mean_group_size"] = (writes as f64 / commits.max(1) as f64).into();
    v["mean_commit_ms"] =
        (metrics.commit_us.load(Ordering::Relaxed) as f64 / commits.max(1) as f64 / 1000.0).into();
    *json = v.to_string();
}

fn authorize_read(core: &Core, fingerprint: &str) -> Result<(), OpResponse> {
    match core.identity(fingerprint) {
        Some(i) if i.role != muster_protocol::msg::Role::Agent => Ok(()),
        Some(i) => Err(OpResponse::Error(OpError {
            code: OpErrorCode::Forbidden,
            message: format!(
                "{} has role agent and may not read (role operator or admin needed)",
                i.name
            ),
        })),
        None => Err(OpResponse::Error(OpError {
            code: OpErrorCode::Forbidden,
            message: "this credential is not enrolled at this hub or has been revoked".into(),
        })),
    }
}

/// Serves the read-only task queries from the store, after the batch's commit.
fn query(core: &Core, store: &Store, fingerprint: &str, request: OpRequest) -> OpResponse {
    if let Err(e) = authorize_read(core, fingerprint) {
        return e;
    }
    let result = (|| -> Result<OpResponse, StoreError> {
        let reader = store.reader()?;
        Ok(match request {
            OpRequest::TaskShow { id } => match reader.task(id)? {
                Some(t) => {
                    let mut v = views::task_json(&t);
                    let budget = views::REPLY_BYTES_MAX.saturating_sub(v.to_string().len());
                    let newest = reader.newest_attempts(id, ATTEMPTS_SHOWN_MAX)?;
                    let (mut attempts, left_out) =
                        views::fit(newest.iter().map(views::attempt_json), budget);
                    attempts.reverse();
                    v["attempt_history"] = attempts.into();
                    // Older attempts than those shown (by count or by size) are counted.
                    let older = t.generation.0.saturating_sub(newest.len() as u64);
                    v["attempts_not_shown"] = (left_out as u64 + older).into();
                    OpResponse::Ok {
                        json: v.to_string(),
                    }
                }
                None => not_found_task(id),
            },
            OpRequest::Tasks {
                state,
                agent,
                limit,
                cursor,
            } => {
                let state = match state.as_deref().map(|s| (s, TaskState::parse(s))) {
                    Some((s, None)) => {
                        return Ok(OpResponse::Error(OpError {
                            code: OpErrorCode::Invalid,
                            message: format!(
                                "--state {s:?} is not a state; use one of blocked, queued, assigned, accepted, running, completed, failed, cancelled"
                            ),
                        }));
                    }
                    Some((_, Some(s))) => Some(s),
                    None => None,
                };
                let limit = limit.clamp(1, muster_protocol::limits::PAGE_LEN_MAX) as usize;
                let page = reader.tasks(state, agent.as_deref(), limit, cursor)?;
                let (tasks, left_out) = views::fit(
                    page.tasks.iter().map(views::task_json),
                    views::REPLY_BYTES_MAX,
                );
                // Cut short by size: the next page starts below the last task shown.
                let next_cursor = if left_out > 0 {
                    tasks.last().and_then(|t| t["id"].as_u64())
                } else {
                    page.next_cursor
                };
                OpResponse::Ok {
                    json: serde_json::json!({
                        "tasks": tasks,
                        "next_cursor": next_cursor,
                        "truncated": left_out > 0,
                    })
                    .to_string(),
                }
            }
            _ => internal("not a query"),
        })
    })();
    result.unwrap_or_else(|e| internal(&format!("store: {e}")))
}

fn not_found_task(id: TaskId) -> OpResponse {
    OpResponse::Error(OpError {
        code: OpErrorCode::NotFound,
        message: format!("no task {id}; `muster-hub tasks` lists them"),
    })
}

fn start_watch(
    core: &Core,
    store: &Store,
    fingerprint: String,
    tx: mpsc::Sender<OpResponse>,
    from: Option<EventSeq>,
    watchers: &mut Vec<Watcher>,
) {
    if let Err(e) = authorize_read(core, &fingerprint) {
        let _ = tx.try_send(e);
        return;
    }
    let Ok(reader) = store.reader() else { return };
    let last = reader.last_event().ok().flatten().unwrap_or(0);
    let next = match from {
        None => last + 1,
        Some(EventSeq(seq)) => {
            let oldest = reader.events(0, 1).ok().and_then(|(_, o)| o).unwrap_or(1);
            if seq < oldest {
                // Pruned: say so, then send a fresh snapshot and continue from now.
                let note =
                    serde_json::json!({"kind": "pruned", "requested": seq, "oldest": oldest});
                let _ = tx.try_send(OpResponse::Event {
                    seq: EventSeq(0),
                    json: note.to_string(),
                });
                snapshot(&reader, &tx);
                last + 1
            } else {
                seq
            }
        }
    };
    watchers.push(Watcher {
        fingerprint,
        tx,
        next,
    });
}

fn snapshot(reader: &crate::store::Reader, tx: &mpsc::Sender<OpResponse>) {
    for state in TaskState::ALL.iter().filter(|s| !s.is_terminal()) {
        if let Ok(page) = reader.tasks(Some(*state), None, 1000, None) {
            for t in page.tasks {
                let mut v = views::task_json(&t);
                v["kind"] = "snapshot_task".into();
                let _ = tx.try_send(OpResponse::Event {
                    seq: EventSeq(0),
                    json: v.to_string(),
                });
            }
        }
    }
}

fn feed_watchers(store: &Store, watchers: &mut Vec<Watcher>) {
    if watchers.is_empty() {
        return;
    }
    let Ok(reader) = store.reader() else { return };
    watchers.retain_mut(|w| {
        if w.tx.is_closed() {
            return false;
        }
        let room = w.tx.capacity().min(WATCH_PAGE);
        let Ok((events, _)) = reader.events(w.next, room) else {
            return true;
        };
        for e in events {
            let msg = OpResponse::Event {
                seq: EventSeq(e.seq),
                json: e.json,
            };
            if w.tx.try_send(msg).is_err() {
                return true;
            }
            w.next = e.seq + 1;
        }
        true
    });
}

/// Creates a data directory's PKI, config and database (`muster-hub init`).
///
/// # Errors
/// A message naming what failed.
pub fn init_data_dir(dir: &Path, config: &HubConfig, sans: &[String]) -> Result<String, String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    // Task text and keys live here: group may read (a backup user), others nothing.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750))
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    let (pki, admin) = Pki::create(dir, sans).map_err(|e| e.to_string())?;
    crate::pki::write_file(
        &dir.join(crate::config::CONFIG_FILE),
        config.render().as_bytes(),
        0o644,
    )
    .map_err(|e| e.to_string())?;
    let store = Store::open(&dir.join(crate::store::DB_FILE)).map_err(|e| e.to_string())?;
    restrict_db(&dir.join(crate::store::DB_FILE)).map_err(|e| e.to_string())?;
    let key_fp = x509_key_fp(&admin.cert_pem).unwrap_or_default();
    let id = crate::core::Identity {
        name: "admin".into(),
        role: muster_protocol::msg::Role::Admin,
        fingerprint: admin.fingerprint.clone(),
        key_fingerprint: key_fp,
        created_at: wall_ms(),
        revoked_at: None,
        capabilities: Vec::new(),
        slots: 0,
    };
    store
        .commit(&[crate::core::Write::Identity(id)], u64::MAX)
        .map_err(|e| e.to_string())?;
    Ok(pki.ca_fingerprint())
}

/// Makes the database readable by the hub's user only: it holds every task's text.
fn restrict_db(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    if std::fs::metadata(path)?.mode() & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

fn x509_key_fp(cert_pem: &str) -> Option<String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).ok()?;
    cert_key_fingerprint(der.as_ref())
}
