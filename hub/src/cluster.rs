//! A cluster of hubs on one PostgreSQL database: one leader, fenced by a term.
//!
//! Every hub of a cluster campaigns on a dedicated connection (never a pooled
//! one: a session lock must not outlive its owner's intent) with
//! `pg_try_advisory_lock(LOCK_KEY)`. The hub that gets the lock increments
//! `muster.leader.term` and names itself there; from then on every write
//! transaction of its store checks that term inside the transaction (see
//! `store::postgres`), so a hub that lost the lock without noticing can no
//! longer commit, and so can never acknowledge anything.
//!
//! The lease is PostgreSQL's own `idle_session_timeout` on the lock
//! connection: the leader renews `muster.leader.renewed_at` every quarter
//! lease; a leader that stops (SIGSTOP, a hung machine, a partition) goes idle
//! and the server ends its session after one lease, which frees the lock for a
//! standby. A leader killed outright frees it at once (its socket closes).
//!
//! Why the term check is enough: the takeover `UPDATE … SET term = term + 1`
//! and a leader's `SELECT term … FOR SHARE` lock the same row. A commit whose
//! check ran first finishes before the takeover's update does, so the new
//! leader, which loads its state after that update, sees it; a check that runs
//! after the update sees the new term and rolls back. No commit of an old
//! term lands after a newer leader has read the state, whatever the timing of
//! the lock, the lease or the network.

use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

/// The advisory lock every hub of a cluster campaigns for ("muster" in ASCII).
pub const LOCK_KEY: i64 = 0x6d75_7374_6572;
/// How often a standby asks for the lock: a dead leader's lock is free at
/// once, so this bounds the takeover time after a crash.
const CAMPAIGN_EVERY: Duration = Duration::from_millis(250);
/// How often a hub writes its row in `muster.hubs`.
const REGISTER_EVERY: Duration = Duration::from_secs(5);
/// Hubs not seen for this long are left out of join tokens.
pub const HUB_FRESH: Duration = Duration::from_secs(3600);

/// What a hub needs to campaign.
#[derive(Clone)]
pub struct Campaign {
    /// The database.
    pub pg: tokio_postgres::Config,
    /// The lease: a leader that cannot renew for this long loses the lock.
    pub lease: Duration,
    /// This hub's address as sidecars and operators reach it (`host:port`); also its name.
    pub addr: String,
}

/// Leadership held: the term, and a way to learn it is lost.
pub struct Leadership {
    /// The term this hub took over with; its store commits only under it.
    pub term: u64,
    lost: watch::Receiver<Option<String>>,
    keeper: tokio::task::JoinHandle<()>,
}

impl Leadership {
    /// Resolves with the reason once leadership is lost (the lock connection
    /// failed, or a renewal found another term).
    pub async fn lost(&mut self) -> String {
        loop {
            if let Some(why) = self.lost.borrow_and_update().clone() {
                return why;
            }
            if self.lost.changed().await.is_err() {
                return "the lease keeper stopped".into();
            }
        }
    }

    /// Gives the lock up (the lock connection closes): another hub may take over.
    pub fn release(self) {
        self.keeper.abort();
    }
}

/// Connects with the lease as the session's idle timeout.
async fn connect(c: &Campaign) -> Result<tokio_postgres::Client, String> {
    let (client, conn) =
        c.pg.connect(tokio_postgres::NoTls)
            .await
            .map_err(|e| format!("cannot connect to PostgreSQL: {}", pg_error(&e)))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
        .batch_execute(&format!(
            "SET idle_session_timeout = {}; SET application_name = 'muster-hub lock'",
            c.lease.as_millis()
        ))
        .await
        .map_err(|e| {
            format!(
                "cannot set the lease on the lock connection: {}",
                pg_error(&e)
            )
        })?;
    Ok(client)
}

/// Campaigns until this hub leads: publishes the current leader's address (or
/// `None`) on `leader` as it learns it, for the standby's answers, and keeps
/// this hub's row in `muster.hubs` fresh. Never gives up: a database that is
/// down is retried.
pub async fn campaign(c: &Campaign, leader: &watch::Sender<Option<String>>) -> Leadership {
    let mut failures = 0u32;
    loop {
        match campaign_once(c, leader).await {
            Ok(l) => return l,
            Err(e) => {
                failures += 1;
                // Logged at the first failure and then every minute or so.
                if failures == 1 || failures.is_multiple_of(60) {
                    warn!("campaigning for the cluster lead: {e}; retrying");
                }
                leader.send_replace(None);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

async fn campaign_once(
    c: &Campaign,
    leader: &watch::Sender<Option<String>>,
) -> Result<Leadership, String> {
    let client = connect(c).await?;
    let lease_s = c.lease.as_secs_f64();
    let mut registered: Option<tokio::time::Instant> = None;
    loop {
        if registered.is_none_or(|at| at.elapsed() >= REGISTER_EVERY) {
            register(&client, &c.addr).await?;
            registered = Some(tokio::time::Instant::now());
        }
        // The leader is named only while its lease is fresh, so a standby does
        // not send sidecars to a hub that stopped renewing.
        let row = client
            .query_one(
                "SELECT pg_try_advisory_lock($1), \
                 (SELECT addr FROM muster.leader WHERE id = 1 \
                  AND renewed_at > now() - make_interval(secs => $2))",
                &[&LOCK_KEY, &lease_s],
            )
            .await
            .map_err(|e| format!("asking for the lock: {}", pg_error(&e)))?;
        if row.get::<_, bool>(0) {
            let term: i64 = client
                .query_one(
                    "UPDATE muster.leader SET term = term + 1, hub = $1, addr = $1, \
                     renewed_at = now() WHERE id = 1 RETURNING term",
                    &[&c.addr],
                )
                .await
                .map_err(|e| format!("taking over: {}", pg_error(&e)))?
                .get(0);
            let term = term as u64;
            info!(term, "this hub leads the cluster");
            leader.send_replace(Some(c.addr.clone()));
            let (tx, rx) = watch::channel(None);
            let keeper = tokio::spawn(keep(client, c.clone(), term, tx));
            return Ok(Leadership {
                term,
                lost: rx,
                keeper,
            });
        }
        let named: Option<String> = row.get(1);
        leader.send_if_modified(|l| {
            let changed = *l != named;
            l.clone_from(&named);
            changed
        });
        tokio::time::sleep(CAMPAIGN_EVERY).await;
    }
}

/// Renews the lease every quarter of it; reports the first failure on `lost`.
async fn keep(
    client: tokio_postgres::Client,
    c: Campaign,
    term: u64,
    lost: watch::Sender<Option<String>>,
) {
    let every = c.lease / 4;
    let held = term as i64;
    let mut registered = tokio::time::Instant::now();
    let why = loop {
        tokio::time::sleep(every).await;
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&held];
        let renew = client.execute(
            "UPDATE muster.leader SET renewed_at = now() WHERE id = 1 AND term = $1",
            &params,
        );
        match tokio::time::timeout(c.lease / 2, renew).await {
            Ok(Ok(1)) => {}
            Ok(Ok(_)) => break format!("another hub took over (this hub held term {term})"),
            Ok(Err(e)) => break format!("the lock connection failed: {}", pg_error(&e)),
            Err(_) => {
                break format!(
                    "renewing the lease took longer than {} ms",
                    (c.lease / 2).as_millis()
                );
            }
        }
        if registered.elapsed() >= REGISTER_EVERY {
            if let Err(e) = register(&client, &c.addr).await {
                break e;
            }
            registered = tokio::time::Instant::now();
        }
    };
    lost.send_replace(Some(why));
    // Dropping the client closes the lock connection: the lock is free.
}

/// Writes this hub's row in `muster.hubs`.
async fn register(client: &tokio_postgres::Client, addr: &str) -> Result<(), String> {
    client
        .execute(
            "INSERT INTO muster.hubs (name, addr, started_at, seen_at) \
             VALUES ($1, $1, now(), now()) \
             ON CONFLICT (name) DO UPDATE SET addr = $1, seen_at = now()",
            &[&addr],
        )
        .await
        .map(|_| ())
        .map_err(|e| format!("registering this hub: {}", pg_error(&e)))
}

/// Every hub address seen within [`HUB_FRESH`], `first` first: what join tokens carry.
///
/// # Errors
/// A sentence when the database cannot be read.
pub async fn hub_addrs(pg: &tokio_postgres::Config, first: &str) -> Result<Vec<String>, String> {
    let (client, conn) = pg
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|e| format!("cannot connect to PostgreSQL: {}", pg_error(&e)))?;
    let conn = tokio::spawn(conn);
    let rows = client
        .query(
            "SELECT addr FROM muster.hubs WHERE seen_at > now() - make_interval(secs => $1) \
             ORDER BY name LIMIT $2",
            &[
                &HUB_FRESH.as_secs_f64(),
                &(muster_protocol::client::TOKEN_HUBS_MAX as i64),
            ],
        )
        .await
        .map_err(|e| format!("reading muster.hubs: {}", pg_error(&e)));
    drop(client);
    conn.abort();
    let mut addrs = vec![first.to_string()];
    for row in rows? {
        let a: String = row.get(0);
        if !addrs.contains(&a) && addrs.len() < muster_protocol::client::TOKEN_HUBS_MAX {
            addrs.push(a);
        }
    }
    Ok(addrs)
}

/// One hub as `cluster status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HubRow {
    /// Its address.
    pub addr: String,
    /// Whether it leads.
    pub leader: bool,
    /// Milliseconds since it last wrote its row.
    pub seen_ms_ago: u64,
    /// When it first registered (ms since the epoch).
    pub started_at: u64,
}

/// `cluster status`: the leader, its term and lease age, and every hub.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    /// The current term (0: no hub ever led).
    pub term: u64,
    /// The leader's address, if any hub ever led.
    pub leader: Option<String>,
    /// Milliseconds since the leader last renewed its lease.
    pub lease_age_ms: Option<u64>,
    /// The lease.
    pub lease_ms: u64,
    /// Whether the lease is fresh (younger than the lease).
    pub lease_fresh: bool,
    /// Every registered hub, by address.
    pub hubs: Vec<HubRow>,
}

/// Reads the cluster's state.
///
/// # Errors
/// A sentence when the database cannot be read.
pub async fn status(pg: &tokio_postgres::Config, lease: Duration) -> Result<Status, String> {
    let (client, conn) = pg
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|e| format!("cannot connect to PostgreSQL: {}", pg_error(&e)))?;
    let conn = tokio::spawn(conn);
    let result = async {
        let row = client
            .query_one(
                "SELECT term, NULLIF(addr, ''), \
                 (EXTRACT(EPOCH FROM (now() - renewed_at)) * 1000)::bigint \
                 FROM muster.leader WHERE id = 1",
                &[],
            )
            .await
            .map_err(|e| format!("reading muster.leader: {}", pg_error(&e)))?;
        let term: i64 = row.get(0);
        let leader: Option<String> = row.get(1);
        let age: Option<i64> = row.get(2);
        let rows = client
            .query(
                "SELECT addr, (EXTRACT(EPOCH FROM (now() - seen_at)) * 1000)::bigint, \
                 (EXTRACT(EPOCH FROM started_at) * 1000)::bigint \
                 FROM muster.hubs ORDER BY addr LIMIT 1000",
                &[],
            )
            .await
            .map_err(|e| format!("reading muster.hubs: {}", pg_error(&e)))?;
        let lease_ms = lease.as_millis() as u64;
        let lease_age_ms = age.map(|a| a.max(0) as u64);
        Ok(Status {
            term: term.max(0) as u64,
            hubs: rows
                .iter()
                .map(|r| {
                    let addr: String = r.get(0);
                    HubRow {
                        leader: leader.as_deref() == Some(addr.as_str()),
                        addr,
                        seen_ms_ago: r.get::<_, i64>(1).max(0) as u64,
                        started_at: r.get::<_, i64>(2).max(0) as u64,
                    }
                })
                .collect(),
            leader,
            lease_fresh: lease_age_ms.is_some_and(|a| a < lease_ms),
            lease_age_ms,
            lease_ms,
        })
    }
    .await;
    drop(client);
    conn.abort();
    result
}

/// A PostgreSQL error as a sentence: the server's message when there is one
/// (tokio-postgres's own Display says only "db error").
pub fn pg_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

/// Opens the store for a term just won (in a blocking thread: the PostgreSQL
/// store blocks), its term set so that every commit checks it.
pub type OpenStore =
    std::sync::Arc<dyn Fn(u64) -> Result<crate::store::Store, String> + Send + Sync>;

/// Runs a cluster hub until `shutdown`: a standby that answers with the
/// leader's address while it campaigns, the leader once it wins, and a
/// standby again the moment it loses the lead or its store fails.
///
/// # Errors
/// A sentence when the listener cannot be bound at all.
pub async fn serve(
    hub: crate::config::HubConfig,
    data_dir: std::path::PathBuf,
    c: Campaign,
    open: OpenStore,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
    use crate::server::Hub;
    let (leader_tx, leader_rx) = watch::channel(None);
    let mut shutdown = std::pin::pin!(shutdown);
    // The standby has no core loop to ping systemd's watchdog: this does.
    let watchdog = sd_notify::watchdog_enabled().map(|w| {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval((w / 4).max(Duration::from_millis(10)));
            loop {
                tick.tick().await;
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            }
        })
    });
    let mut ready = false;
    let result = loop {
        let standby = match bind_standby(&data_dir, hub.listen, hub.http_listen, &leader_rx).await {
            Ok(s) => s,
            Err(e) => break Err(e),
        };
        if !ready {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
            ready = true;
        }
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Status("standby: campaigning")]);
        let mut lead = tokio::select! {
            l = campaign(&c, &leader_tx) => l,
            () = &mut shutdown => {
                standby.stop().await;
                break Ok(());
            }
        };
        standby.stop().await;
        let term = lead.term;
        let opener = std::sync::Arc::clone(&open);
        let store = match tokio::task::spawn_blocking(move || opener(term)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                warn!("won term {term} but cannot open the store: {e}; stepping down");
                lead.release();
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(e) => break Err(format!("opening the store panicked: {e}")),
        };
        let carry = match hub_addrs(&c.pg, &c.addr).await {
            Ok(a) => Some(a),
            Err(e) => {
                warn!("join tokens will carry only this hub: {e}");
                None
            }
        };
        let started = Hub {
            config: hub.clone(),
            data_dir: data_dir.clone(),
        }
        .start_with(store, carry.clone())
        .await;
        let running = match started {
            Ok(r) => r,
            Err(e) => {
                warn!("won term {term} but cannot serve: {e}; stepping down");
                lead.release();
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let status = format!("leading (term {term})");
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&status)]);
        let mut fatal = tokio::time::interval(Duration::from_millis(100));
        // Hubs that join later are named in the tokens made after they do.
        let mut carried = carry.unwrap_or_default();
        let mut hubs_check = tokio::time::interval(REGISTER_EVERY);
        let why = loop {
            tokio::select! {
                () = &mut shutdown => break None,
                why = lead.lost() => break Some(why),
                _ = fatal.tick() => {
                    if running.core_finished() {
                        break Some("the store refused a commit".to_string());
                    }
                }
                _ = hubs_check.tick() => {
                    if let Ok(now) = hub_addrs(&c.pg, &c.addr).await
                        && now != carried
                    {
                        running.set_token_hubs(&now).await;
                        carried = now;
                    }
                }
            }
        };
        // Stop serving first: sessions close, nothing more is acknowledged; a
        // commit still under way either lands under this term (and the next
        // leader reads it) or is refused by the term check.
        let stopped = running.shutdown().await;
        lead.release();
        match why {
            None => break stopped.map_err(|e| format!("fatal: {e}")),
            Some(why) => {
                let detail = stopped.err().map(|e| format!(" ({e})")).unwrap_or_default();
                warn!("stepping down from term {term}: {why}{detail}");
            }
        }
    };
    if let Some(w) = watchdog {
        w.abort();
    }
    result
}

/// Binds the standby listener; the port may still be held for a moment by
/// this process's own leader endpoint that is closing, so it retries briefly.
async fn bind_standby(
    data_dir: &std::path::Path,
    listen: std::net::SocketAddr,
    http_listen: Option<std::net::SocketAddr>,
    leader: &watch::Receiver<Option<String>>,
) -> Result<crate::server::Standby, String> {
    let mut tries = 0;
    loop {
        match crate::server::Standby::start(data_dir, listen, http_listen, leader.clone()).await {
            Ok(s) => return Ok(s),
            Err(e) if tries < 20 => {
                tries += 1;
                tracing::debug!("binding the standby listener: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}
