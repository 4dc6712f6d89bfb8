//! The `failover` mode: three hubs on one PostgreSQL database, the leader
//! killed (SIGKILL) again and again, and the time until a standby leads, until
//! a task submitted to it completes, and until every sidecar is back.
//!
//! Each hub is a real `muster-hub serve` child on its own fixed port of
//! 127.0.0.1; the sidecars are full daemons in this process (real redb
//! files, real enrollment with a token that names every hub, the real
//! process runner spawning `/bin/true`). The database is a fresh
//! `muster_bench_<random>` on the server of `--pg-url`, dropped after.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use muster_hub::config::HubConfig;
use muster_hub::store::testdb::TestDb;
use muster_protocol::TaskId;
use muster_protocol::client::{self, ClientError, Credential, JoinToken};
use muster_protocol::msg::{OpRequest, OpResponse, Role};
use serde_json::{Value, json};
use tokio::process::Command;

use crate::fleet::{self, Agent, Fleet};
use crate::hub::{HubProc, Ops, Stop, free_udp_port};
use crate::util::{ms, phase, round3, submit};

/// Hubs in the cluster.
const HUBS: usize = 3;
/// How often the takeover, the task and the sidecars are polled.
const POLL: Duration = Duration::from_millis(20);
/// How long a hub may take to answer after `serve` starts.
const HUB_READY: Duration = Duration::from_secs(60);
/// Slots per sidecar.
const SLOTS: u32 = 4;

/// `failover` options.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct FailoverArgs {
    /// A superuser's URL of a PostgreSQL server: the bench creates a database
    /// `muster_bench_<random>` there and drops it after.
    #[arg(long, env = "MUSTER_TEST_PG_URL")]
    pub(crate) pg_url: String,
    /// Kills of the leader.
    #[arg(long, default_value_t = 10)]
    pub(crate) runs: usize,
    /// The leader lease (`[store] lease` of each hub.toml, 1s..60s).
    #[arg(long, default_value = "5s", value_parser = muster_protocol::duration::parse_duration)]
    pub(crate) lease: Duration,
    /// Sidecars (full daemons in this process) running `/bin/true`.
    #[arg(long, default_value_t = 4)]
    pub(crate) sidecars: usize,
}

/// The bench's database: dropped (`WITH (FORCE)`) when this drops, from a
/// thread of its own (the drop blocks on a runtime of its own).
struct Database(Option<TestDb>);

impl Database {
    async fn create(base: &str) -> Result<Database> {
        let base = base.to_string();
        let db = tokio::task::spawn_blocking(move || TestDb::create_at(&base, "muster_bench_"))
            .await?
            .map_err(|e| anyhow!("{e}"))?;
        Ok(Database(Some(db)))
    }

    fn url(&self) -> &str {
        self.0.as_ref().map_or("", TestDb::url)
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        if let Some(db) = self.0.take() {
            let _ = std::thread::spawn(move || drop(db)).join();
        }
    }
}

/// What one kill measured, in milliseconds from the kill.
struct Run {
    killed: String,
    leader: String,
    takeover_ms: f64,
    serving_ms: f64,
    sidecars_back_ms: f64,
    steady_ms: f64,
}

/// `cluster status --json` through `dir`'s hub.toml.
async fn cluster_status(bin: &Path, dir: &Path) -> Result<Value> {
    let out = Command::new(bin)
        .args(["cluster", "status", "--json", "--data-dir"])
        .arg(dir)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .context("running muster-hub cluster status")?;
    if !out.status.success() {
        bail!(
            "cluster status failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Which hub leads by the database's word (a fresh lease), with the number
/// of registered hubs.
async fn db_leader(bin: &Path, hubs: &[HubProc], via: &Path) -> Result<(Option<usize>, usize)> {
    let s = cluster_status(bin, via).await?;
    let registered = s["hubs"].as_array().map_or(0, Vec::len);
    if s["lease_fresh"] != true {
        return Ok((None, registered));
    }
    let leader = s["leader"].as_str().unwrap_or_default();
    Ok((hubs.iter().position(|h| h.addr == leader), registered))
}

/// One `Ping` on a new connection: `Ok(true)` from the leader, `Ok(false)`
/// from a standby.
async fn ping(addr: &str, cred: &Credential) -> Result<bool, ClientError> {
    let (ep, conn) = client::connect(addr, cred).await?;
    let r = client::request(&conn, OpRequest::Ping).await;
    conn.close(0u32.into(), b"");
    drop(ep);
    match r {
        Ok(OpResponse::Ok { .. }) => Ok(true),
        Err(ClientError::NotLeader { .. }) => Ok(false),
        Ok(other) => Err(ClientError::Protocol(format!("ping answered {other:?}"))),
        Err(e) => Err(e),
    }
}

/// Asks every hub of `candidates` every [`POLL`] until one answers a `Ping`
/// as the leader; returns its index and when it did. The attempts overlap:
/// an Initial sent while the new leader rebinds its port is lost and resent
/// only after quinn's PTO (hundreds of ms), and waiting for it would add
/// that to the figure; a fresh attempt every 20 ms keeps the resolution.
async fn first_leader(candidates: Vec<(usize, String, Credential)>) -> Result<(usize, Instant)> {
    let mut attempts = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(POLL);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                for (i, addr, cred) in &candidates {
                    let (i, addr, cred) = (*i, addr.clone(), cred.clone());
                    attempts.spawn(async move {
                        let r = tokio::time::timeout(Duration::from_secs(2), ping(&addr, &cred)).await;
                        matches!(r, Ok(Ok(true))).then(|| (i, Instant::now()))
                    });
                }
            }
            Some(done) = attempts.join_next() => {
                if let Some(led) = done? {
                    attempts.abort_all();
                    return Ok(led);
                }
            }
        }
    }
}

/// A join token from the leader that names every hub of `addrs` (the leader
/// learns of hubs that registered after it took over every 5 s).
async fn cluster_token(ops: &Ops, addrs: &[String]) -> Result<JoinToken> {
    loop {
        let v = ops
            .call(OpRequest::TokenCreate {
                role: Role::Agent,
                ttl_s: 3600,
                name: None,
                capabilities: None,
                slots: None,
            })
            .await
            .context("token create")?;
        let token: JoinToken = v["token"]
            .as_str()
            .ok_or_else(|| anyhow!("token create answered without a token: {v}"))?
            .parse()?;
        if addrs.iter().all(|a| token.hubs.contains(a)) {
            return Ok(token);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until `task` completes at the leader `ops` talks to.
async fn completed(ops: &Ops, task: u64) -> Result<Instant> {
    loop {
        let v = ops.call(OpRequest::TaskShow { id: TaskId(task) }).await?;
        match v["state"].as_str() {
            Some("completed") => return Ok(Instant::now()),
            Some("failed" | "cancelled") => bail!("task {task} ended {}", v["state"]),
            _ => tokio::time::sleep(POLL).await,
        }
    }
}

/// Waits until `k` agents are online at the leader `ops` talks to.
async fn online(ops: &Ops, k: usize) -> Result<Instant> {
    loop {
        if ops.online(false).await? >= k {
            return Ok(Instant::now());
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Nearest-rank p50 / p90 / max of milliseconds, as JSON.
fn summary(mut v: Vec<f64>) -> Value {
    if v.is_empty() {
        return json!({ "n": 0, "p50_ms": null, "p90_ms": null, "max_ms": null });
    }
    v.sort_by(f64::total_cmp);
    let rank = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    json!({
        "n": v.len(),
        "p50_ms": round3(rank(0.50)),
        "p90_ms": round3(rank(0.90)),
        "max_ms": round3(v[v.len() - 1]),
        "mean_ms": round3(v.iter().sum::<f64>() / v.len() as f64),
    })
}

/// Runs the `failover` mode.
pub(crate) async fn failover(bin: &Path, root: &Path, a: &FailoverArgs) -> Result<Value> {
    if a.lease < Duration::from_secs(1) || a.lease > Duration::from_secs(60) {
        bail!("--lease must be between 1s and 60s");
    }
    // The in-process sidecars' logs (reconnections), when asked for.
    if let Ok(filter) = std::env::var("MUSTER_BENCH_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .try_init();
    }
    let setup_started = Instant::now();
    // Dropped last (declared first): the hubs and sidecars go before the database.
    let db = phase("creating the database", Duration::from_secs(60), async {
        Database::create(&a.pg_url).await
    })
    .await?;
    let lease = a.lease;
    let tweak = move |cfg: &mut HubConfig| cfg.store.lease = lease;
    let mut hubs: Vec<HubProc> = Vec::new();
    phase("init", Duration::from_secs(120), async {
        let first = root.join("hub-0");
        let store = ["--store", db.url()];
        hubs.push(HubProc::init_with(bin, &first, free_udp_port()?, &store, tweak).await?);
        for i in 1..HUBS {
            let dir = root.join(format!("hub-{i}"));
            std::fs::create_dir_all(&dir)?;
            for f in ["ca.crt", "ca.key", "admin.crt", "admin.key"] {
                std::fs::copy(first.join(f), dir.join(f))
                    .with_context(|| format!("copying {f}"))?;
            }
            let join = ["--join", db.url()];
            hubs.push(HubProc::init_with(bin, &dir, free_udp_port()?, &join, tweak).await?);
        }
        anyhow::Ok(())
    })
    .await?;
    for h in &mut hubs {
        h.start_member(HUB_READY).await?;
    }
    let addrs: Vec<String> = hubs.iter().map(|h| h.addr.clone()).collect();
    let via = hubs[0].dir.clone();
    let mut leader = phase("a leader", Duration::from_secs(60), async {
        loop {
            // The database names the leader before it serves (it restores
            // and binds after taking the term): it must answer, too.
            if let (Some(l), n) = db_leader(bin, &hubs, &via).await?
                && n == HUBS
                && matches!(ping(&hubs[l].addr, &hubs[l].cred).await, Ok(true))
            {
                return Ok(l);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await?;

    let mut fleet = Fleet::new();
    let mut ops = Arc::new(hubs[leader].ops(1).await?);
    phase("enrolling the sidecars", Duration::from_secs(120), async {
        for i in 0..a.sidecars {
            let token = cluster_token(&ops, &addrs).await?;
            let id = fleet::enroll_with(&token, &format!("failover-{i:03}")).await?;
            let hubs_of_token = token.hubs.clone();
            fleet.spawn_with(
                &id,
                &token.hub,
                root.join(id.name.as_str()),
                SLOTS,
                Agent::Exec,
                move |c| c.hubs = hubs_of_token,
            )?;
        }
        anyhow::Ok(())
    })
    .await?;
    fleet::wait_available(&ops, &fleet, a.sidecars, Duration::from_secs(120)).await?;
    let setup_s = setup_started.elapsed().as_secs_f64();

    let mut runs: Vec<Run> = Vec::new();
    for run in 0..a.runs {
        let killed = leader;
        let candidates: Vec<(usize, String, Credential)> = hubs
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != killed)
            .map(|(i, h)| (i, h.addr.clone(), h.cred.clone()))
            .collect();
        drop(ops);
        let t0 = Instant::now();
        hubs[killed].stop(Stop::Kill).await?;
        let (new, led_at) = phase("takeover", lease * 3 + Duration::from_secs(30), async {
            first_leader(candidates).await
        })
        .await?;
        leader = new;
        ops = Arc::new(hubs[leader].ops(1).await?);
        let task = submit(&ops, format!("failover run {run}")).await?;
        let (done_at, back_at) = phase(
            "serving and sidecars back",
            Duration::from_secs(120),
            async { tokio::try_join!(completed(&ops, task), online(&ops, a.sidecars)) },
        )
        .await?;
        // The killed hub comes back as a standby; the cluster is steady when
        // all three are registered, one leads with a fresh lease, and every
        // sidecar is available at the leader.
        hubs[killed].start_member(HUB_READY).await?;
        let via = hubs[leader].dir.clone();
        phase("steady again", Duration::from_secs(120), async {
            loop {
                if let (Some(l), n) = db_leader(bin, &hubs, &via).await?
                    && n == HUBS
                    && l == leader
                    && matches!(
                        ping(&hubs[killed].addr, &hubs[killed].cred).await,
                        Ok(false)
                    )
                {
                    return anyhow::Ok(());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await?;
        fleet::wait_available(&ops, &fleet, a.sidecars, Duration::from_secs(120)).await?;
        let r = Run {
            killed: hubs[killed].addr.clone(),
            leader: hubs[leader].addr.clone(),
            takeover_ms: ms(led_at - t0),
            serving_ms: ms(done_at - t0),
            sidecars_back_ms: ms(back_at - t0),
            steady_ms: ms(t0.elapsed()),
        };
        eprintln!(
            "muster-bench: failover run {}/{}: takeover {:.0} ms, serving {:.0} ms, sidecars back {:.0} ms",
            run + 1,
            a.runs,
            r.takeover_ms,
            r.serving_ms,
            r.sidecars_back_ms
        );
        runs.push(r);
    }
    let term = cluster_status(bin, &hubs[leader].dir).await?["term"].clone();

    // Clean stops: the sidecars drain, the hubs shut down; then the database goes.
    if let Ok(o) = Arc::try_unwrap(ops) {
        o.close().await;
    }
    let fleet_result = fleet.shutdown().await;
    for h in &mut hubs {
        h.stop(Stop::Term).await?;
    }
    drop(hubs);
    drop(db);
    fleet_result?;

    let takeover = summary(runs.iter().map(|r| r.takeover_ms).collect());
    let goal_ms = ms(lease) + 2000.0;
    let p50 = takeover["p50_ms"].as_f64();
    Ok(json!({
        "mode": "failover",
        "hubs": HUBS,
        "sidecars": a.sidecars,
        "runs": runs.len(),
        "lease_ms": ms(lease),
        "setup_s": round3(setup_s),
        "final_term": term,
        "takeover": takeover,
        "serving": summary(runs.iter().map(|r| r.serving_ms).collect()),
        "sidecars_back": summary(runs.iter().map(|r| r.sidecars_back_ms).collect()),
        "goal": {
            "what": "takeover p50 ≤ lease + 2 s",
            "limit_ms": goal_ms,
            "takeover_p50_ms": p50,
            "pass": p50.is_some_and(|p| p <= goal_ms),
        },
        "per_run": runs.iter().map(|r| json!({
            "killed": r.killed,
            "new_leader": r.leader,
            "takeover_ms": round3(r.takeover_ms),
            "serving_ms": round3(r.serving_ms),
            "sidecars_back_ms": round3(r.sidecars_back_ms),
            "steady_ms": round3(r.steady_ms),
        })).collect::<Vec<_>>(),
    }))
}
