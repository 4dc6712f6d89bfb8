//! The `scale` mode: many idle sidecar sessions heartbeating, then a hub restart.
//!
//! Full daemons per session would measure this process, not the hub, so each
//! session is light: its own enrolled identity and mutual-TLS connection (on a
//! few shared client endpoints), the real `Hello`, `Welcome` and `Heartbeat`
//! messages at the hub's interval with ±10 % jitter, and the sidecar's
//! reconnect policy (1 s doubling to 60 s, each delay uniform in [base/2, base]).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use futures::StreamExt;
use muster_protocol::msg::{
    Heartbeat, Hello, HostFigures, HubMsg, Open, OpenBody, SelfTest, SessionMsg, SidecarState,
};
use muster_protocol::{AgentName, PROTOCOL_VERSION};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::fleet::{self, Identity};
use crate::hub::{HubProc, Stop};
use crate::util::{num, phase, round3, summary};

/// `scale` options.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ScaleArgs {
    /// Idle sessions.
    #[arg(long, default_value_t = 1000)]
    pub(crate) sessions: usize,
    /// The hub's heartbeat interval in milliseconds (default: the hub's default, 10 s).
    #[arg(long)]
    pub(crate) heartbeat_ms: Option<u64>,
    /// Measurement window in seconds (default: 2.5 heartbeat intervals).
    #[arg(long)]
    pub(crate) window_s: Option<f64>,
    /// Client endpoints (UDP sockets) the sessions share (default: one per 500 sessions).
    #[arg(long)]
    pub(crate) endpoints: Option<usize>,
    /// Handshakes in flight at once while the sessions first connect (reconnects are not capped).
    #[arg(long, default_value_t = 64)]
    pub(crate) connect_concurrency: usize,
    /// Enrollments in flight at once.
    #[arg(long, default_value_t = 32)]
    pub(crate) enroll_concurrency: usize,
    /// How to restart the hub.
    #[arg(long, value_enum, default_value = "term")]
    pub(crate) restart: Stop,
    /// How long after the restart every session must be back, in seconds.
    #[arg(long, default_value_t = 120)]
    pub(crate) online_deadline_s: u64,
}

const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);

struct Shared {
    addr: SocketAddr,
    stop: CancellationToken,
    /// Caps first connects only; `None` once the fleet is up.
    connect_cap: Arc<Semaphore>,
    capped: std::sync::atomic::AtomicBool,
    online: AtomicUsize,
    attempt_failures: AtomicU64,
    /// Failed connect attempts by reason, for telling a slow hub from a refusing one.
    failure_reasons: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
    drops: AtomicU64,
    origin: Instant,
}

type Wr = muster_protocol::FrameWriter;
type Rd = muster_protocol::FrameReader;

async fn open_session(
    ep: &quinn::Endpoint,
    sh: &Shared,
    cfg: quinn::ClientConfig,
    name: &AgentName,
) -> Result<(quinn::Connection, Wr, Rd, Duration)> {
    let connecting = ep.connect_with(cfg, sh.addr, "127.0.0.1")?;
    let conn = tokio::time::timeout(muster_protocol::client::CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| anyhow!("handshake timed out"))??;
    let (send, recv) = conn.open_bi().await?;
    let max = muster_protocol::limits::FRAME_BYTES_MAX;
    let (mut wr, mut rd) = muster_protocol::framed(send, recv, max);
    let open = Open {
        protocol: PROTOCOL_VERSION,
        body: OpenBody::Session(Hello {
            version: env!("CARGO_PKG_VERSION").into(),
            agent: name.clone(),
            capabilities: Vec::new(),
            slots: 1,
            resume: Vec::new(),
            workspace: Default::default(),
        }),
    };
    wr.send(&open).await?;
    let welcome = tokio::time::timeout(WELCOME_TIMEOUT, rd.recv::<HubMsg>())
        .await
        .map_err(|_| anyhow!("no welcome within 10 s"))??
        .ok_or_else(|| anyhow!("the hub closed the session"))?;
    match welcome {
        HubMsg::Welcome(w) => Ok((
            conn,
            wr,
            rd,
            Duration::from_millis(w.heartbeat_interval_ms.max(100)),
        )),
        other => bail!("expected a welcome, got {other:?}"),
    }
}

fn heartbeat(seq: u64, rtt: Duration) -> SessionMsg {
    SessionMsg::Heartbeat(Heartbeat {
        seq,
        state: SidecarState::Ready,
        tasks: Vec::new(),
        free_slots: 1,
        self_test: SelfTest {
            passed: true,
            hub_rtt_us: Some(rtt.as_micros() as u64),
            command_ok: true,
            disk_ok: true,
            problems: Vec::new(),
        },
        host: HostFigures {
            load1: 0.42,
            mem_available_bytes: 8 << 30,
            mem_total_bytes: 16 << 30,
            disk_free_bytes: 100 << 30,
            cpus: 2,
        },
        activity: Vec::new(),
    })
}

/// One light session: connect, hello, welcome, heartbeats; reconnect like a sidecar.
async fn session(ep: quinn::Endpoint, sh: Arc<Shared>, id: Identity, marks: Arc<Marks>, seed: u64) {
    let mut rng = muster_protocol::pace::Rng::new(seed);
    let Ok(cfg) = id.cred.client_config() else {
        sh.attempt_failures.fetch_add(1, Ordering::Relaxed);
        return;
    };
    // The sidecar's reconnect policy: refusals at the hub's caps retry soon
    // (`Backoff::busy`), other failures back off (`Backoff::reconnect`).
    let mut backoff = muster_sidecar::backoff::reconnect();
    let mut busy = muster_sidecar::backoff::busy();
    let mut seq = 0u64;
    loop {
        let permit = if sh.capped.load(Ordering::Relaxed) {
            sh.connect_cap.clone().acquire_owned().await.ok()
        } else {
            None
        };
        let opened = tokio::select! {
            r = open_session(&ep, &sh, cfg.clone(), &id.name) => r,
            _ = sh.stop.cancelled() => return,
        };
        drop(permit);
        match opened {
            Ok((conn, mut wr, mut rd, interval)) => {
                backoff.reset();
                busy.reset();
                marks.welcomed.store(
                    sh.origin.elapsed().as_millis() as u64 + 1,
                    Ordering::Relaxed,
                );
                sh.online.fetch_add(1, Ordering::Relaxed);
                // Like the sidecar: a heartbeat at once, then every interval ±10 %.
                let mut next = tokio::time::Instant::now();
                let stopped = loop {
                    tokio::select! {
                        _ = tokio::time::sleep_until(next) => {
                            seq += 1;
                            if wr.send(&heartbeat(seq, conn.rtt())).await.is_err() {
                                break false;
                            }
                            next = tokio::time::Instant::now()
                                + interval.mul_f64(0.9 + 0.2 * rng.unit());
                        }
                        f = rd.next() => match f {
                            Some(Ok(_)) => {}
                            _ => break false,
                        },
                        _ = sh.stop.cancelled() => break true,
                    }
                };
                sh.online.fetch_sub(1, Ordering::Relaxed);
                conn.close(0u32.into(), b"session over");
                if stopped {
                    return;
                }
                sh.drops.fetch_add(1, Ordering::Relaxed);
                marks.lost.store(
                    sh.origin.elapsed().as_millis() as u64 + 1,
                    Ordering::Relaxed,
                );
            }
            Err(e) => {
                sh.attempt_failures.fetch_add(1, Ordering::Relaxed);
                {
                    let mut reasons = sh
                        .failure_reasons
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    *reasons.entry(e.to_string()).or_default() += 1;
                }
                let refused = matches!(
                    e.downcast_ref::<quinn::ConnectionError>(),
                    Some(quinn::ConnectionError::ConnectionClosed(c))
                        if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED
                );
                let delay = if refused {
                    busy.next_delay(rng.unit())
                } else {
                    backoff.next_delay(rng.unit())
                };
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = sh.stop.cancelled() => return,
                }
                continue;
            }
        }
        let delay = backoff.next_delay(rng.unit());
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = sh.stop.cancelled() => return,
        }
    }
}

/// When a session last lost its connection and was last welcomed, in ms since
/// `Shared::origin` plus one (0: never), for the restart's timeline.
#[derive(Default)]
struct Marks {
    welcomed: AtomicU64,
    lost: AtomicU64,
}

/// Sessions welcomed after `since_ms`.
fn count_since(marks: &[Arc<Marks>], since_ms: u64) -> usize {
    times_since(marks, since_ms, |m| &m.welcomed).len()
}

/// Milliseconds after `since_ms` of the marks `pick` reads that fall after it.
fn times_since(marks: &[Arc<Marks>], since_ms: u64, pick: fn(&Marks) -> &AtomicU64) -> Vec<f64> {
    marks
        .iter()
        .map(|m| pick(m).load(Ordering::Relaxed))
        .filter(|&at| at > since_ms)
        .map(|at| (at - since_ms) as f64)
        .collect()
}

pub(crate) async fn scale(bin: &Path, root: &Path, a: &ScaleArgs) -> Result<Value> {
    let s = a.sessions;
    if s == 0 {
        bail!("--sessions must be at least 1");
    }
    let mut hub = HubProc::init(bin, &root.join("hub"), |c| {
        if let Some(ms) = a.heartbeat_ms {
            c.policy.heartbeat_interval = Duration::from_millis(ms);
        }
        c.limits.max_connections = c.limits.max_connections.max(s as u32 + 1000);
    })
    .await?;
    let ready = phase(
        "hub start",
        Duration::from_secs(60),
        hub.start(Duration::from_secs(60)),
    )
    .await?;
    let ops = Arc::new(hub.ops(4).await?);

    // Enrollment: one token and one CSR per identity.
    let t = Instant::now();
    let enroll_limit = Duration::from_secs(60) + Duration::from_millis(50) * s as u32;
    let ids = phase(
        "enroll",
        enroll_limit,
        fleet::enroll_many(&ops, "idle", s, a.enroll_concurrency),
    )
    .await?;
    let enroll = t.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss0 = hub.mem_kib("VmRSS")?;

    // Connect every session.
    let addr: SocketAddr = hub.addr.parse()?;
    let n_ep = a.endpoints.unwrap_or(s.div_ceil(500)).max(1);
    let mut eps = Vec::new();
    for _ in 0..n_ep {
        eps.push(quinn::Endpoint::client(
            (std::net::Ipv4Addr::LOCALHOST, 0).into(),
        )?);
    }
    let sh = Arc::new(Shared {
        addr,
        stop: CancellationToken::new(),
        connect_cap: Arc::new(Semaphore::new(a.connect_concurrency.max(1))),
        capped: std::sync::atomic::AtomicBool::new(true),
        online: AtomicUsize::new(0),
        attempt_failures: AtomicU64::new(0),
        failure_reasons: Default::default(),
        drops: AtomicU64::new(0),
        origin: Instant::now(),
    });
    let _stop_guard = sh.stop.clone().drop_guard();
    let marks: Vec<Arc<Marks>> = (0..s).map(|_| Arc::default()).collect();
    let t = Instant::now();
    let mut seeds = muster_protocol::pace::Rng::new(u64::from(std::process::id()));
    for (i, id) in ids.into_iter().enumerate() {
        tokio::spawn(session(
            eps[i % n_ep].clone(),
            sh.clone(),
            id,
            marks[i].clone(),
            seeds.next_u64(),
        ));
    }
    let connect_limit = Duration::from_secs(60) + Duration::from_millis(20) * s as u32;
    phase("connect sessions", connect_limit, async {
        while sh.online.load(Ordering::Relaxed) < s {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    })
    .await?;
    let connect = t.elapsed();
    sh.capped.store(false, Ordering::Relaxed);
    // `agents` answers in one frame; past a few thousand agents it exceeds the frame limit.
    let hub_online_after_connect = ops.online(false).await.map_err(|e| format!("{e:#}"));

    // Idle: CPU and memory over at least two heartbeat intervals.
    let interval = Duration::from_millis(a.heartbeat_ms.unwrap_or(10_000));
    tokio::time::sleep(Duration::from_secs(2).min(interval)).await;
    let window = Duration::from_secs_f64(a.window_s.unwrap_or(2.5 * interval.as_secs_f64()));
    let (cpu0, st0, drops0) = (
        hub.cpu_seconds()?,
        ops.stats().await?,
        sh.drops.load(Ordering::Relaxed),
    );
    let w0 = Instant::now();
    tokio::time::sleep(window).await;
    let (cpu1, st1) = (hub.cpu_seconds()?, ops.stats().await?);
    let secs = w0.elapsed().as_secs_f64();
    let rss1 = hub.mem_kib("VmRSS")?;
    let hwm = hub.mem_kib("VmHWM")?;
    let dropped = sh.drops.load(Ordering::Relaxed) - drops0;
    let online_in_window = sh.online.load(Ordering::Relaxed);
    let hb_per_s = (num(&st1, "heartbeats") - num(&st0, "heartbeats")) / secs;
    if let Ok(o) = Arc::try_unwrap(ops) {
        o.close().await;
    }

    // Restart and wait for everyone to come back.
    let failures0 = sh.attempt_failures.load(Ordering::Relaxed);
    sh.failure_reasons
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clear();
    let restart_mark = sh.origin.elapsed().as_millis() as u64;
    let t = Instant::now();
    hub.stop(a.restart).await?;
    let stopped = t.elapsed();
    let ready_again = phase(
        "hub restart",
        Duration::from_secs(60),
        hub.start(Duration::from_secs(60)),
    )
    .await?;
    let online_deadline = Duration::from_secs(a.online_deadline_s);
    let mut all_back = None;
    while t.elapsed() < online_deadline {
        if count_since(&marks, restart_mark) >= s {
            all_back = Some(t.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let back = count_since(&marks, restart_mark);
    // When each session noticed the restart and when it was welcomed again:
    // a late tail in the first means closes that never arrived.
    let noticed = summary(times_since(&marks, restart_mark, |m| &m.lost));
    let welcomed = summary(times_since(&marks, restart_mark, |m| &m.welcomed));
    let ops = hub.ops(1).await?;
    let hub_online = ops.online(false).await.map_err(|e| format!("{e:#}"));
    ops.close().await;
    sh.stop.cancel();
    for ep in &eps {
        ep.close(0u32.into(), b"bench over");
    }
    hub.stop(Stop::Term).await?;
    Ok(json!({
        "mode": "scale",
        "sessions": s,
        "endpoints": n_ep,
        "heartbeat_interval_s": interval.as_secs_f64(),
        "hub_ready_s": round3(ready.as_secs_f64()),
        "enroll_s": round3(enroll.as_secs_f64()),
        "enroll_per_s": round3(s as f64 / enroll.as_secs_f64()),
        "connect_s": round3(connect.as_secs_f64()),
        "connect_concurrency": a.connect_concurrency,
        "hub_online_after_connect": hub_online_after_connect.as_ref().ok(),
        "hub_online_error": hub_online_after_connect.err(),
        "window_s": round3(secs),
        "hub_cpu_pct_of_one_core": round3((cpu1 - cpu0) / secs * 100.0),
        "heartbeats_per_s": round3(hb_per_s),
        "sessions_dropped_in_window": dropped,
        "sessions_online_at_window_end": online_in_window,
        "hub_rss_before_sessions_kib": rss0,
        "hub_rss_kib": rss1,
        "hub_peak_rss_kib": hwm,
        "rss_per_session_kib": round3((rss1 as f64 - rss0 as f64) / s as f64),
        "restart": {
            "how": format!("{:?}", a.restart).to_lowercase(),
            "stop_s": round3(stopped.as_secs_f64()),
            "ready_after_start_s": round3(ready_again.as_secs_f64()),
            "all_online_s": all_back.map(|d| round3(d.as_secs_f64())),
            "noticed_after_stop": noticed,
            "welcomed_after_stop": welcomed,
            "online_again": back,
            "failed": s - back,
            "failed_connect_attempts": sh.attempt_failures.load(Ordering::Relaxed) - failures0,
            "failure_reasons": *sh.failure_reasons.lock().unwrap_or_else(std::sync::PoisonError::into_inner),
            "hub_online": hub_online.as_ref().ok(),
            "hub_online_error": hub_online.err(),
        },
    }))
}
