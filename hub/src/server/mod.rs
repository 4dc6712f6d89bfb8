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

mod alerts;
mod driver;
mod endpoint;
mod enroll;
mod http;
mod logs;
mod queries;
mod session;
mod standby;
mod web;

pub use standby::Standby;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use muster_protocol::EventSeq;
use muster_protocol::msg::{EnrollResponse, HubMsg, OpRequest, OpResponse, SessionMsg};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

use crate::config::HubConfig;
use crate::core::{ConnId, Core, Millis};
use crate::init::restrict_db;
use crate::metrics::Counters;
use crate::pki::Pki;
use crate::store::{Store, StoreError};
use alerts::{ALERT_QUEUE_LEN, alert_worker};
use driver::Shell;
use driver::core_loop;
use endpoint::Shared;
use endpoint::{
    HANDSHAKES_MAX, REFUSAL_LOG_LINES, REFUSAL_LOG_WINDOW, accept_loop, bind_endpoint,
    load_reset_key,
};
use http::http_handler;
use muster_hub_core::admission::{Admission, AdmissionLimits};
use muster_protocol::pace::LogBudget;

/// Capacity of the channel into the core: bounds memory when the core falls behind;
/// senders wait (sessions) or fail fast (ticks).
const CORE_QUEUE_LEN: usize = 8192;
/// Most inputs handled per commit, so one batch's latency stays bounded.
const BATCH_LEN_MAX: usize = 4096;
/// Per-session outgoing queue; a sidecar that falls this far behind is disconnected.
const SESSION_QUEUE_LEN: usize = 4096;
/// The longest the ticker sleeps without looking at the clock again (a wall
/// clock stepped forward brings deadlines closer).
const TICK_WAIT_MAX: Duration = Duration::from_secs(5);
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
    /// Asked before the CSR is signed: may this enrollment go ahead?
    EnrollCheck {
        secret_hash: String,
        role: muster_protocol::msg::Role,
        name: String,
        key_fingerprint: String,
        grant: (Vec<String>, u32),
        reply: oneshot::Sender<Result<(), muster_protocol::msg::EnrollRefusal>>,
    },
    Tick,
    Watch {
        fingerprint: String,
        tx: mpsc::Sender<OpResponse>,
        from: Option<EventSeq>,
    },
    /// `task logs`: where is this attempt's log (after the batch's commit)?
    Logs {
        fingerprint: String,
        query: muster_protocol::msg::LogQuery,
        reply: oneshot::Sender<logs::LogAnswer>,
    },
    /// The HTTP API's and dashboard's task listing, with every filter.
    Tasks {
        fingerprint: String,
        filter: crate::store::TaskFilter,
        limit: u32,
        cursor: Option<u64>,
        reply: oneshot::Sender<OpResponse>,
    },
    /// The dashboard's fleet view: a page of agents by name after `after`.
    AgentsPage {
        fingerprint: String,
        after: Option<String>,
        limit: u32,
        reply: oneshot::Sender<OpResponse>,
    },
    /// The dashboard: redeem a one-time login by its secret's hash.
    Redeem {
        hash: String,
        reply: oneshot::Sender<Result<muster_hub_core::web::Login, &'static str>>,
    },
    /// The dashboard: is this session's identity still live?
    Alive {
        fingerprint: String,
        reply: oneshot::Sender<bool>,
    },
    /// `/metrics`: render the registry from a fresh core snapshot.
    Scrape(oneshot::Sender<String>),
    /// `/readyz`: is the store writable (see [`http::Readiness`])?
    Health(oneshot::Sender<Result<(), String>>),
    /// `/livez`: does the core loop answer?
    Live(oneshot::Sender<()>),
    /// What join tokens carry from now on (a cluster's hubs changed).
    TokenPrefix(String),
    /// Finish the current batch, commit it, and stop.
    Shutdown,
}

/// Timers as data: sends the core a tick when its next deadline (published after
/// every batch) comes, and sleeps otherwise, so an idle hub does no work at all.
/// Under a systemd watchdog it also ticks at least every quarter interval: the
/// core loop pings the watchdog after a batch, so a live but idle hub must
/// still run one.
async fn tick_at_deadlines(
    to_core: mpsc::Sender<ToCore>,
    mut deadline: watch::Receiver<Option<Millis>>,
    watchdog: Option<Duration>,
) {
    let keepalive = watchdog.map(|w| (w / 4).max(Duration::from_millis(10)));
    let wait_max = keepalive.map_or(TICK_WAIT_MAX, |k| k.min(TICK_WAIT_MAX));
    loop {
        let next = *deadline.borrow_and_update();
        let now = wall_ms();
        if next.is_none_or(|at| at > now) {
            let wait = next.map_or(wait_max, |at| Duration::from_millis(at - now).min(wait_max));
            tokio::select! {
                () = tokio::time::sleep(wait) => {
                    if keepalive.is_none() {
                        continue;
                    }
                }
                changed = deadline.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    continue;
                }
            }
        }
        if to_core.send(ToCore::Tick).await.is_err() {
            return;
        }
        // The batch with that tick publishes the next deadline.
        if let Ok(Err(_)) = tokio::time::timeout(wait_max, deadline.changed()).await {
            return;
        }
    }
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
    /// The dashboard's bound address and the URL its login links carry.
    pub dashboard: Option<(SocketAddr, String)>,
    dashboard_task: Option<tokio::task::JoinHandle<()>>,
    http: Option<tokio::task::JoinHandle<()>>,
    endpoint: quinn::Endpoint,
    to_core: mpsc::Sender<ToCore>,
    ca_fingerprint: String,
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
    /// The dashboard could not start.
    #[error("{0}")]
    Dashboard(String),
    /// The listener could not bind.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Opens the redb store of `data_dir`. A PostgreSQL hub is not opened here:
/// it leads only through the cluster's election (`cluster::serve`), which sets
/// the term its commits check before the first one.
fn open_redb(config: &HubConfig, data_dir: &std::path::Path) -> Result<Store, StartError> {
    match config.store.kind {
        crate::store::StoreKind::Redb => {
            let db_path = data_dir.join(crate::store::DB_FILE);
            let store = Store::open(&db_path)?;
            if let Err(e) = restrict_db(&db_path) {
                warn!(
                    "cannot make {} readable by this user only: {e}",
                    db_path.display()
                );
            }
            Ok(store)
        }
        crate::store::StoreKind::Postgres => Err(StoreError::Db(
            "a hub on PostgreSQL serves through the leader election (muster-hub serve)".into(),
        )
        .into()),
    }
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
        let config = self.config.clone();
        let data_dir = self.data_dir.clone();
        let store = tokio::task::spawn_blocking(move || open_redb(&config, &data_dir))
            .await
            .map_err(|e| StoreError::Db(format!("opening the store stopped: {e}")))??;
        self.start_with(store, None).await
    }

    /// Starts the hub on an open store. `tokens_carry` names every hub address
    /// join tokens carry (a cluster's hubs, this one first); `None`: this hub's.
    ///
    /// # Errors
    /// [`StartError`] naming what failed.
    pub async fn start_with(
        self,
        store: Store,
        tokens_carry: Option<Vec<String>>,
    ) -> Result<Running, StartError> {
        let pki = Arc::new(Pki::load(&self.data_dir)?);
        let mut clock = Clock { last: 0 };
        let now = clock.now();
        // Reading blocks (a PostgreSQL store runs its own runtime and may not
        // be driven from this one), so it happens on a blocking thread.
        let (store, restored) = tokio::task::spawn_blocking(move || {
            let restored = store.restore(now);
            (store, restored)
        })
        .await
        .map_err(|e| StoreError::Db(format!("reading the store stopped: {e}")))?;
        let restored = restored?;
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
        let carried = match tokens_carry {
            Some(hubs) if !hubs.is_empty() => hubs.join(","),
            _ => advertise.clone(),
        };
        let ca_fingerprint = pki.ca_fingerprint();
        core.set_token_prefix(token_prefix(&carried, &ca_fingerprint));
        let warning = self.config.advertise_warning(&host);
        if let Some(w) = &warning {
            warn!("{w}");
        }
        core.set_token_warning(warning);
        let (to_core, rx) = mpsc::channel(CORE_QUEUE_LEN);
        let log_relays =
            logs::LogRelays::new(to_core.clone(), self.config.limits.max_frame_bytes as usize);
        let dashboard = match self.config.dashboard.listen {
            Some(listen) => {
                let host = advertise
                    .rsplit_once(':')
                    .map_or(advertise.as_str(), |(h, _)| h);
                let d = web::start(
                    &self.config.dashboard,
                    listen,
                    host,
                    &pki,
                    self.config.limits.max_frame_bytes as usize,
                    to_core.clone(),
                    Arc::clone(&log_relays),
                )
                .await
                .map_err(StartError::Dashboard)?;
                core.set_dashboard(
                    Some(d.url.clone()),
                    self.config.dashboard.login_ttl.as_millis() as u64,
                );
                Some(d)
            }
            None => None,
        };
        let metrics = Arc::new(Counters::default());
        let events_max = self.config.policy.events_max;
        let (deadline_tx, deadline_rx) = watch::channel(Some(0));
        let runtime = tokio::runtime::Handle::current();
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
                    alert_tx,
                    deadline_tx,
                    runtime,
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
            logs: log_relays,
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
        let ticker = tokio::spawn(tick_at_deadlines(
            to_core.clone(),
            deadline_rx,
            driver::watchdog_interval(),
        ));
        info!(%addr, advertise, "hub listening");
        Ok(Running {
            addr,
            dashboard: dashboard.as_ref().map(|d| (d.addr, d.url.clone())),
            dashboard_task: dashboard.map(|d| d.task),
            http,
            endpoint,
            to_core,
            ca_fingerprint,
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
        if let Some(h) = &self.dashboard_task {
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

    /// Join tokens carry `hubs` from now on (a cluster's hubs, the leader first).
    pub async fn set_token_hubs(&self, hubs: &[String]) {
        let prefix = token_prefix(&hubs.join(","), &self.ca_fingerprint);
        let _ = self.to_core.send(ToCore::TokenPrefix(prefix)).await;
    }

    /// Waits until the core stops on its own (a fatal store error).
    pub fn core_finished(&self) -> bool {
        self.core_thread.is_finished()
    }
}

pub(crate) fn wall_ms() -> Millis {
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
