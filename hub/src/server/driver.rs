//! The core driver: a plain OS thread that batches inputs, runs the core, commits
//! the batch in one redb transaction and only then delivers what the core decided.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use muster_protocol::msg::{EnrollResponse, HubMsg, OpRequest, OpResponse, SessionMsg};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, error, info, warn};

use super::endpoint::REVOKED_REASON;
use super::http::health;
use super::queries::{feed_watchers, query, render_answer, render_stats, start_watch, tasks_query};
use super::{BATCH_LEN_MAX, Clock, ToCore};
use crate::core::{ConnId, Core, EventKind, Input, Millis, Reply, ReplyId, Write};
use crate::metrics::Counters;
use crate::store::{Store, StoreError, event_json};

/// How often the core drops registered connections that closed without saying so.
pub(super) const REGISTRY_SWEEP: Duration = Duration::from_secs(5);

pub(super) struct SessionHandle {
    pub(super) tx: mpsc::Sender<HubMsg>,
    pub(super) connection: quinn::Connection,
}

pub(super) struct Watcher {
    /// Whose stream this is: a revoked identity's watch ends.
    pub(super) fingerprint: String,
    pub(super) tx: mpsc::Sender<OpResponse>,
    pub(super) next: u64,
}

/// A `muster/1` connection of a live identity, kept so revocation can close it.
pub(super) struct Registered {
    pub(super) fingerprint: String,
    pub(super) connection: quinn::Connection,
}

pub(super) enum Pending {
    /// An operator's answer.
    Op(oneshot::Sender<OpResponse>),
    Enroll(oneshot::Sender<EnrollResponse>),
}

/// What the core loop needs besides the core and the store.
pub(super) struct Shell {
    pub(super) metrics: Arc<Counters>,
    pub(super) hub_metrics: Arc<crate::metrics::HubMetrics>,
    pub(super) data_dir: PathBuf,
    pub(super) events_max: u64,
    /// Where the core's next deadline is published for the ticker.
    pub(super) deadline_tx: watch::Sender<Option<Millis>>,
    /// The runtime, for the short delayed closes (no thread per close).
    pub(super) runtime: tokio::runtime::Handle,
    pub(super) alert_tx: Option<mpsc::Sender<String>>,
}

/// Test hook, only in builds with the `test-hooks` feature: while the file named by
/// `MUSTER_TEST_STALL_FILE` exists the core loop stops making progress, so tests
/// can show that a stuck core stops the watchdog pings. Logged when set, so a
/// test can tell a build with the hook from one without.
#[cfg(feature = "test-hooks")]
pub(super) fn stall_hook() -> Option<PathBuf> {
    let file = std::env::var_os("MUSTER_TEST_STALL_FILE").map(PathBuf::from)?;
    warn!(file = %file.display(), "test hook: the core loop stalls while this file exists");
    Some(file)
}

pub(super) fn core_loop(
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
        alert_tx,
        deadline_tx,
        runtime,
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
    let mut readiness = super::http::Readiness::default();
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
        let mut log_queries = Vec::new();
        let mut task_lists = Vec::new();
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
                        let token_secret = matches!(
                            request,
                            OpRequest::TokenCreate { .. }
                                | OpRequest::ApiTokenCreate { .. }
                                | OpRequest::DashboardLogin { .. }
                        )
                        .then(new_secret)
                        .flatten();
                        next_reply += 1;
                        pending.insert(next_reply, Pending::Op(reply));
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
                    ToCore::EnrollCheck {
                        secret_hash,
                        role,
                        name,
                        key_fingerprint,
                        grant,
                        reply,
                    } => {
                        let verdict = core
                            .check_enroll(now, &secret_hash, role, &name, &key_fingerprint, grant)
                            .map(drop);
                        let _ = reply.send(verdict);
                        continue;
                    }
                    ToCore::Tick => Input::Tick,
                    ToCore::Tasks {
                        fingerprint,
                        filter,
                        limit,
                        cursor,
                        reply,
                    } => {
                        task_lists.push((fingerprint, (filter, limit, cursor), reply));
                        continue;
                    }
                    ToCore::AgentsPage {
                        fingerprint,
                        after,
                        limit,
                        reply,
                    } => {
                        // Read-only and answered from memory, as `agents` is, authorized as it.
                        let answer = match core.authorize(&fingerprint, &OpRequest::Agents) {
                            Ok(_) => {
                                let page = core.agents_page(now, after.as_deref(), limit as usize);
                                serde_json::to_string(&page).map_or_else(
                                    |e| {
                                        super::session::internal(&format!(
                                            "could not render the agents: {e}"
                                        ))
                                    },
                                    |json| OpResponse::Ok { json },
                                )
                            }
                            Err(e) => OpResponse::Error(e),
                        };
                        let _ = reply.send(answer);
                        continue;
                    }
                    ToCore::Redeem { hash, reply } => {
                        let _ = reply.send(core.redeem_login(now, &hash));
                        continue;
                    }
                    ToCore::Alive { fingerprint, reply } => {
                        let watch = OpRequest::Watch { from: None };
                        let _ = reply.send(core.authorize(&fingerprint, &watch).is_ok());
                        continue;
                    }
                    ToCore::Logs {
                        fingerprint,
                        query,
                        reply,
                    } => {
                        log_queries.push((fingerprint, query, reply));
                        continue;
                    }
                    ToCore::Scrape(tx) => {
                        let _ = tx.send(hub_metrics.render(&core.snapshot(now), &metrics));
                        continue;
                    }
                    ToCore::Health(tx) => {
                        let verdict = readiness.check(Instant::now(), || health(&store, &data_dir));
                        let _ = tx.send(verdict);
                        continue;
                    }
                    ToCore::Live(tx) => {
                        let _ = tx.send(());
                        continue;
                    }
                    ToCore::TokenPrefix(prefix) => {
                        core.set_token_prefix(prefix);
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
        for breach in &out.violations {
            error!(
                breach,
                "a core invariant is broken: this is a bug; please report it with the log"
            );
        }
        for w in &out.writes {
            if let Write::Event { seq, event, .. } = w {
                // Task transitions come several per task: at debug, so a busy hub does not
                // spend its core thread writing logs (or rendering them). Agents, alerts
                // and audit at info.
                if event.kind() == EventKind::Task {
                    debug!(target: "muster::events", seq, "{}", event_json(event));
                } else {
                    info!(target: "muster::events", seq, "{}", event_json(event));
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
            readiness.committed(Instant::now());
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
                (Some(Pending::Op(tx)), Reply::Answer(a)) => {
                    let _ = tx.send(render_answer(&a));
                }
                (Some(Pending::Op(tx)), Reply::Error(e)) => {
                    let _ = tx.send(OpResponse::Error(e));
                }
                (Some(Pending::Op(tx)), Reply::Stats(s)) => {
                    let _ = tx.send(render_stats(&s, &metrics));
                }
                (Some(Pending::Enroll(tx)), Reply::Enroll(r)) => {
                    let _ = tx.send(r);
                }
                _ => {}
            }
        }
        for alert in out.alerts {
            // Only a map with non-string keys fails to serialize; alerts have none.
            let alert = serde_json::to_string(&alert).unwrap_or_default();
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
            cut_off(&runtime, &out.revoked, &mut registry, &mut watchers);
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
                runtime.spawn(async move {
                    tokio::time::sleep(CLOSE_DELAY).await;
                    c.close(4u32.into(), b"closed by the hub");
                });
            }
        }
        for (fingerprint, request, reply) in queries {
            let _ = reply.send(query(&core, &store, &fingerprint, request, now));
        }
        for (fingerprint, list, reply) in task_lists {
            let _ = reply.send(tasks_query(&core, &store, &fingerprint, list, now));
        }
        let session_of = |c| sessions.get(&c).map(|s| s.connection.clone());
        for (fingerprint, q, reply) in log_queries {
            let _ = reply.send(super::logs::locate(
                &core,
                &store,
                &session_of,
                &fingerprint,
                &q,
            ));
        }
        feed_watchers(&core, &store, &mut watchers);
        if let Some(prune) = core.retention_due(now) {
            match store.prune(prune.before, prune.limit) {
                Ok(ids) => {
                    if !ids.is_empty() {
                        info!(
                            pruned = ids.len(),
                            "pruned finished tasks past their retention"
                        );
                    }
                    core.pruned(now, &ids, prune.limit);
                }
                Err(e) => warn!("pruning finished tasks: {e}"),
            }
        }
        // The ticker sleeps until this (or the next batch publishes another).
        deadline_tx.send_replace(core.poll_timeout());
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
pub(super) fn cut_off(
    runtime: &tokio::runtime::Handle,
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
    runtime.spawn(async move {
        tokio::time::sleep(CLOSE_DELAY).await;
        for c in closing {
            c.close(muster_protocol::CLOSE_NOT_ENROLLED.into(), REVOKED_REASON);
        }
    });
}

/// How long a closing connection waits so its last frame (a refusal) goes out first.
const CLOSE_DELAY: Duration = Duration::from_millis(50);

pub(super) fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
}

/// A fresh token secret and its hash; `None` if the system RNG fails, which the
/// core answers with an error rather than a weak secret.
pub(super) fn new_secret() -> Option<(String, String)> {
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
