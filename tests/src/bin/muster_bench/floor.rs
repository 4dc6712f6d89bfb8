//! The `floor` mode: what this machine does without muster, measured in the
//! same run as the figures it explains, and the ratios of each mode's figures
//! to it.
//!
//! Four floors, each bounded in time:
//!
//! - **redb**: durable commits of one small record (64 bytes) into a fresh
//!   database in the run's temporary directory (the filesystem the hub and the
//!   sidecars use), one write transaction each with `Durability::Immediate`
//!   (an `fdatasync` per commit), one after another, no network;
//! - **spawn**: `/bin/true` spawned and waited for, one after another;
//! - **QUIC**: a quinn echo on 127.0.0.1 with the hub's own TLS set-up (its
//!   PKI, `tls::server_config`, the client's mutual-TLS config): the round trip
//!   of a 64-byte message on one open stream, and the time of a whole
//!   handshake (connect until the connection is established, client side);
//! - **HTTP**: a minimal HTTP/1.1 server on a thread of this process (no
//!   framework) answering a 64-byte body on 127.0.0.1, asked by the same
//!   blocking `ureq` client the `dashboard` mode uses, on one kept-alive
//!   connection: the request → full body time.
//!
//! A figure divided by its floor says how many "free" operations of the
//! machine one muster operation costs, which travels between machines better
//! than the raw figure: a disk with 10× slower flushes moves tasks/s and the
//! redb floor together.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};

use crate::util::round3;

/// Bytes of the record committed and of the message echoed.
const RECORD_BYTES: usize = 64;
/// Most samples per floor, whatever the time allows (bounds the memory).
const SAMPLES_MAX: usize = 200_000;
/// Most handshakes in the QUIC floor.
const HANDSHAKES_MAX: usize = 500;
/// Untimed round trips before the QUIC floor's timed ones.
const WARMUP_ROUND_TRIPS: usize = 100;

/// `floor` options.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct FloorArgs {
    /// Milliseconds spent on each of the three floors.
    #[arg(long, default_value_t = 2500)]
    pub(crate) ms: u64,
}

/// p50 / p99 / mean of durations, in microseconds.
fn us(mut v: Vec<Duration>) -> Value {
    if v.is_empty() {
        return json!({ "p50_us": null, "p99_us": null, "mean_us": null });
    }
    v.sort();
    let at = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    let mean = v.iter().sum::<Duration>() / v.len() as u32;
    let f = |d: Duration| round3(d.as_secs_f64() * 1e6);
    json!({ "p50_us": f(at(0.5)), "p99_us": f(at(0.99)), "mean_us": f(mean) })
}

/// Durable commits of one small record, one after another, for `per`.
pub(crate) fn redb_floor(dir: &Path, per: Duration) -> Result<Value> {
    const FLOOR: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("floor");
    let path = dir.join("floor.redb");
    let db = redb::Database::create(&path).with_context(|| path.display().to_string())?;
    let record = [0x5a_u8; RECORD_BYTES];
    let mut times = Vec::new();
    let start = Instant::now();
    while start.elapsed() < per && times.len() < SAMPLES_MAX {
        let t = Instant::now();
        let mut tx = db.begin_write()?;
        tx.set_durability(redb::Durability::Immediate)?;
        {
            let mut table = tx.open_table(FLOOR)?;
            table.insert(times.len() as u64, record.as_slice())?;
        }
        tx.commit()?;
        times.push(t.elapsed());
    }
    let secs = start.elapsed().as_secs_f64();
    let n = times.len();
    drop(db);
    let _ = std::fs::remove_file(&path);
    Ok(json!({
        "commits": n,
        "commits_per_s": round3(n as f64 / secs),
        "commit": us(times),
        "record_bytes": RECORD_BYTES,
    }))
}

/// The PostgreSQL server whose durable commit rate the floor measures too (`--pg-url`).
pub(crate) static PG_FLOOR_URL: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Single-row INSERTs committed one after another (autocommit, the server's
/// `synchronous_commit`, on by default) into a fresh database, for `per`.
async fn postgres_floor(base: &str, per: Duration) -> Result<Value> {
    let db = {
        let base = base.to_string();
        tokio::task::spawn_blocking(move || muster_hub::store::testdb::TestDb::create_on(&base))
            .await?
            .map_err(|e| anyhow::anyhow!("{e}"))?
    };
    let (client, conn) = tokio_postgres::connect(db.url(), tokio_postgres::NoTls).await?;
    let driver = tokio::spawn(conn);
    client
        .batch_execute("CREATE TABLE floor (id bigint PRIMARY KEY, rec bytea NOT NULL)")
        .await?;
    let sync: String = client
        .query_one("SHOW synchronous_commit", &[])
        .await?
        .get(0);
    let insert = client
        .prepare("INSERT INTO floor (id, rec) VALUES ($1, $2)")
        .await?;
    let record = vec![0x5a_u8; RECORD_BYTES];
    let mut times = Vec::new();
    let start = Instant::now();
    while start.elapsed() < per && times.len() < SAMPLES_MAX {
        let t = Instant::now();
        client
            .execute(&insert, &[&(times.len() as i64), &record])
            .await?;
        times.push(t.elapsed());
    }
    let secs = start.elapsed().as_secs_f64();
    let n = times.len();
    drop(client);
    let _ = driver.await;
    drop(db);
    Ok(json!({
        "commits": n,
        "commits_per_s": round3(n as f64 / secs),
        "commit": us(times),
        "record_bytes": RECORD_BYTES,
        "synchronous_commit": sync,
    }))
}

/// `/bin/true` spawned and waited for, one after another, for `per`.
fn spawn_floor(per: Duration) -> Result<Value> {
    use std::process::{Command, Stdio};
    const PROGRAM: &str = "/bin/true";
    let mut times = Vec::new();
    let start = Instant::now();
    while start.elapsed() < per && times.len() < SAMPLES_MAX {
        let t = Instant::now();
        let status = Command::new(PROGRAM)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .with_context(|| format!("spawning {PROGRAM}"))?;
        if !status.success() {
            bail!("{PROGRAM} exited {status}");
        }
        times.push(t.elapsed());
    }
    let secs = start.elapsed().as_secs_f64();
    let n = times.len();
    Ok(json!({
        "program": PROGRAM,
        "spawns": n,
        "per_s": round3(n as f64 / secs),
        "spawn_and_wait": us(times),
    }))
}

/// A quinn echo on loopback with the hub's TLS: round trips on one stream for
/// two thirds of `per`, then whole handshakes for the rest.
async fn quic_floor(dir: &Path, per: Duration) -> Result<Value> {
    use muster_protocol::{HUB_SERVER_NAME, client, tls};
    let pki_dir = dir.join("floor-pki");
    std::fs::create_dir_all(&pki_dir)?;
    let (pki, admin) = muster_hub::pki::Pki::create(&pki_dir, &[HUB_SERVER_NAME.to_string()])?;
    let server_cfg = tls::server_config(
        pki.ca_der.clone(),
        pki.server_chain.clone(),
        pki.server_key.clone_key(),
    )?;
    let server = quinn::Endpoint::server(server_cfg, (std::net::Ipv4Addr::LOCALHOST, 0).into())?;
    let addr = server.local_addr()?;
    let accepting = server.clone();
    let echo = tokio::spawn(async move {
        while let Some(incoming) = accepting.accept().await {
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else {
                    return;
                };
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    tokio::spawn(async move {
                        let mut buf = [0_u8; RECORD_BYTES];
                        while recv.read_exact(&mut buf).await.is_ok() {
                            if send.write_all(&buf).await.is_err() {
                                break;
                            }
                        }
                    });
                }
            });
        }
    });
    let cred = client::Credential {
        ca_pem: pki.ca_pem.clone(),
        cert_pem: admin.cert_pem,
        key_pem: admin.key_pem,
    };
    let cfg = cred.client_config()?;
    let endpoint = client::endpoint_for(addr)?;
    let result = async {
        let conn = endpoint
            .connect_with(cfg.clone(), addr, HUB_SERVER_NAME)?
            .await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        let mut buf = [0xa5_u8; RECORD_BYTES];
        let mut rtts = Vec::new();
        let start = Instant::now();
        let echo_for = per * 2 / 3;
        let mut i = 0;
        while start.elapsed() < echo_for && rtts.len() < SAMPLES_MAX {
            let t = Instant::now();
            send.write_all(&buf).await?;
            recv.read_exact(&mut buf).await?;
            if i >= WARMUP_ROUND_TRIPS {
                rtts.push(t.elapsed());
            }
            i += 1;
        }
        conn.close(0_u32.into(), b"done");
        let mut handshakes = Vec::new();
        let until = Instant::now() + (per - echo_for);
        while Instant::now() < until && handshakes.len() < HANDSHAKES_MAX {
            let t = Instant::now();
            let c = endpoint
                .connect_with(cfg.clone(), addr, HUB_SERVER_NAME)?
                .await?;
            handshakes.push(t.elapsed());
            c.close(0_u32.into(), b"done");
        }
        anyhow::Ok(json!({
            "round_trips": rtts.len(),
            "rtt": us(rtts),
            "handshakes": handshakes.len(),
            "handshake": us(handshakes),
            "message_bytes": RECORD_BYTES,
            "tls": "the hub's: its PKI, tls::server_config, mutual TLS 1.3",
        }))
    };
    let result = tokio::time::timeout(per + Duration::from_secs(10), result)
        .await
        .map_err(|_| anyhow!("the QUIC floor did not finish in time"))?;
    endpoint.close(0_u32.into(), b"done");
    server.close(0_u32.into(), b"done");
    echo.abort();
    let _ = std::fs::remove_dir_all(&pki_dir);
    result
}

/// A minimal HTTP/1.1 keep-alive server on 127.0.0.1 answering every request
/// with [`RECORD_BYTES`] bytes, timed from `ureq` for `per`.
fn http_floor(per: Duration) -> Result<Value> {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    // Serves connections until the client goes; the thread ends with the run.
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let _ = conn.set_nodelay(true);
            std::thread::spawn(move || {
                let Ok(mut out) = conn.try_clone() else {
                    return;
                };
                let mut lines = BufReader::new(conn);
                let body = [b'x'; RECORD_BYTES];
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {RECORD_BYTES}\r\n\r\n"
                );
                let mut line = String::new();
                loop {
                    line.clear();
                    match lines.read_line(&mut line) {
                        Ok(0) | Err(_) => return,
                        Ok(_) if line == "\r\n" => {
                            if out.write_all(head.as_bytes()).is_err()
                                || out.write_all(&body).is_err()
                            {
                                return;
                            }
                        }
                        Ok(_) => {}
                    }
                }
            });
        }
    });
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    let url = format!("http://{addr}/");
    let mut times = Vec::new();
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed() < per && times.len() < SAMPLES_MAX {
        let t = Instant::now();
        let body = agent
            .get(&url)
            .call()
            .context("HTTP floor GET")?
            .body_mut()
            .read_to_string()
            .context("HTTP floor body")?;
        let took = t.elapsed();
        if body.len() != RECORD_BYTES {
            bail!("HTTP floor: {} bytes, want {RECORD_BYTES}", body.len());
        }
        n += 1;
        // The first requests open the connection and warm the code paths.
        if n > WARMUP_ROUND_TRIPS {
            times.push(took);
        }
    }
    Ok(json!({
        "requests": times.len(),
        "body_bytes": RECORD_BYTES,
        "rtt": us(times),
    }))
}

/// Measures the four floors, `per` each, in `dir`.
pub(crate) async fn measure(dir: &Path, per: Duration) -> Result<Value> {
    std::fs::create_dir_all(dir)?;
    // Write back what is dirty first (say, the files of the previous run,
    // removed seconds ago), so that writeback does not land in the redb floor.
    let synced = Instant::now();
    tokio::task::spawn_blocking(|| std::process::Command::new("sync").status())
        .await
        .context("sync")?
        .context("running sync")?;
    let sync_s = synced.elapsed().as_secs_f64();
    let d = dir.to_path_buf();
    let redb = tokio::task::spawn_blocking(move || redb_floor(&d, per))
        .await
        .context("redb floor")??;
    let spawn = tokio::task::spawn_blocking(move || spawn_floor(per))
        .await
        .context("spawn floor")??;
    let quic = quic_floor(dir, per).await?;
    let http = tokio::task::spawn_blocking(move || http_floor(per))
        .await
        .context("HTTP floor")??;
    let postgres = match PG_FLOOR_URL.get() {
        Some(url) => postgres_floor(url, per).await.context("PostgreSQL floor")?,
        None => Value::Null,
    };
    Ok(json!({
        "postgres": postgres,
        "ms_each": per.as_millis() as u64,
        "sync_before_s": round3(sync_s),
        "redb": redb,
        "spawn": spawn,
        "quic": quic,
        "http": http,
        "source": "measured in this run, before the hub started",
    }))
}

/// Reads a floor from the JSON a `muster-bench floor --json` run printed.
pub(crate) fn load(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    let v: Value = serde_json::from_str(text.trim())
        .with_context(|| format!("{} is not JSON", path.display()))?;
    let mut floor = if v["floor"].is_object() {
        v["floor"].clone()
    } else {
        v
    };
    if !floor["redb"]["commits_per_s"].is_number() {
        bail!(
            "{} holds no floor (write one with `muster-bench floor --json > FILE`)",
            path.display()
        );
    }
    floor["source"] = json!(format!("read from {}", path.display()));
    Ok(floor)
}

// === Ratios ===

/// A number at a dotted path.
fn at(v: &Value, path: &str) -> Option<f64> {
    path.split('.').fold(v, |x, k| &x[k]).as_f64()
}

/// One figure set against one floor.
struct Ratio {
    /// What is divided by what.
    name: &'static str,
    /// Where the figure is in the mode's result, or how it was derived.
    figure: String,
    /// The figure in its own unit.
    value: Option<f64>,
    /// Brings `value` to the floor's unit (1000 for milliseconds against microseconds).
    scale: f64,
    /// Where the floor is in `floor`, or how it is composed.
    floor: String,
    /// The floor in its own unit.
    floor_value: Option<f64>,
}

impl Ratio {
    /// `figure` (a path in `result`) against `floor_path` (a path in `floor`).
    fn of(
        name: &'static str,
        result: &Value,
        figure: &str,
        scale: f64,
        floor: &Value,
        floor_path: &str,
    ) -> Ratio {
        Ratio {
            name,
            figure: figure.to_string(),
            value: at(result, figure),
            scale,
            floor: format!("floor.{floor_path}"),
            floor_value: at(floor, floor_path),
        }
    }

    fn json(&self) -> Value {
        let ratio = match (self.value, self.floor_value) {
            (Some(v), Some(f)) if f > 0.0 => Some(round3(v * self.scale / f)),
            _ => None,
        };
        json!({
            "figure": self.figure,
            "value": self.value.map(round3),
            "floor": self.floor,
            "floor_value": self.floor_value.map(round3),
            "ratio": ratio,
        })
    }
}

/// The least time the submit → running path could take on this machine: the
/// durable commits on it (hub: submission; sidecar: acceptance with the run's
/// spawn and start; hub: running), four one-way hops (client → hub → sidecar
/// → hub → client's `watch`: two round trips) and, for exec, one spawn.
fn path_floor(floor: &Value, exec: bool) -> (String, Option<f64>) {
    let commit = at(floor, "redb.commit.p50_us");
    let rtt = at(floor, "quic.rtt.p50_us");
    let spawn = if exec {
        at(floor, "spawn.spawn_and_wait.p50_us")
    } else {
        Some(0.0)
    };
    let what = format!(
        "3 × floor.redb.commit.p50_us + 2 × floor.quic.rtt.p50_us{}",
        if exec {
            " + floor.spawn.spawn_and_wait.p50_us"
        } else {
            ""
        }
    );
    let value = match (commit, rtt, spawn) {
        (Some(c), Some(r), Some(s)) => Some(3.0 * c + 2.0 * r + s),
        _ => None,
    };
    (what, value)
}

/// The ratios of a mode's figures to the floor, keyed by what is divided by
/// what: each with the figure, the floor, both values and figure ÷ floor.
pub(crate) fn ratios(result: &Value, floor: &Value) -> Value {
    const MS: f64 = 1000.0;
    let exec = result["agent"].as_str().is_some_and(|a| a != "instant");
    let mut out: Vec<Ratio> = Vec::new();
    match result["mode"].as_str() {
        Some("throughput") => {
            out.push(Ratio::of(
                "tasks/s ÷ redb commits/s",
                result,
                "tasks_per_s",
                1.0,
                floor,
                "redb.commits_per_s",
            ));
            out.push(Ratio::of(
                "hub commits/s ÷ redb commits/s",
                result,
                "hub.commits_per_s",
                1.0,
                floor,
                "redb.commits_per_s",
            ));
            if exec {
                out.push(Ratio::of(
                    "tasks/s ÷ spawns/s",
                    result,
                    "tasks_per_s",
                    1.0,
                    floor,
                    "spawn.per_s",
                ));
            }
        }
        Some("latency") => {
            let (what, value) = path_floor(floor, exec);
            out.push(Ratio {
                name: "submit → running p50 ÷ the path's floor",
                figure: "submit_to_running.p50_ms".into(),
                value: at(result, "submit_to_running.p50_ms"),
                scale: MS,
                floor: what,
                floor_value: value,
            });
            out.push(Ratio::of(
                "submit → running p50 ÷ QUIC RTT p50",
                result,
                "submit_to_running.p50_ms",
                MS,
                floor,
                "quic.rtt.p50_us",
            ));
            out.push(Ratio::of(
                "submit → running p50 ÷ redb commit p50",
                result,
                "submit_to_running.p50_ms",
                MS,
                floor,
                "redb.commit.p50_us",
            ));
            if exec {
                out.push(Ratio::of(
                    "submit → running p50 ÷ spawn p50",
                    result,
                    "submit_to_running.p50_ms",
                    MS,
                    floor,
                    "spawn.spawn_and_wait.p50_us",
                ));
            }
            let (c, r) = (
                at(floor, "redb.commit.p50_us"),
                at(floor, "quic.rtt.p50_us"),
            );
            out.push(Ratio {
                name: "submit acknowledged p50 ÷ (redb commit + QUIC RTT)",
                figure: "submit_ack.p50_ms".into(),
                value: at(result, "submit_ack.p50_ms"),
                scale: MS,
                floor: "floor.redb.commit.p50_us + floor.quic.rtt.p50_us".into(),
                floor_value: c.zip(r).map(|(c, r)| c + r),
            });
        }
        Some("logs") => {
            // The floor of an agent's write is the same write without muster.
            let direct = at(result, "direct_write_s");
            for (name, figure) in [
                (
                    "agent write, no follower ÷ the same write without muster",
                    "runs.followers_0.agent_s",
                ),
                (
                    "agent write, 1 follower ÷ the same write without muster",
                    "runs.followers_1.agent_s",
                ),
                (
                    "agent write, 10 followers ÷ the same write without muster",
                    "runs.followers_10.agent_s",
                ),
            ] {
                out.push(Ratio {
                    name,
                    figure: figure.into(),
                    value: at(result, figure),
                    scale: 1.0,
                    floor: "direct_write_s (dd to a file, no muster)".into(),
                    floor_value: direct,
                });
            }
        }
        Some("backlog") => {
            let (what, value) = path_floor(floor, exec);
            for (name, figure) in [
                (
                    "empty store: submit → running p50 ÷ the path's floor",
                    "empty.submit_to_running.p50_ms",
                ),
                (
                    "full store: submit → running p50 ÷ the path's floor",
                    "full.submit_to_running.p50_ms",
                ),
            ] {
                out.push(Ratio {
                    name,
                    figure: figure.into(),
                    value: at(result, figure),
                    scale: MS,
                    floor: what.clone(),
                    floor_value: value,
                });
            }
        }
        Some("scale") => {
            let sessions = at(result, "sessions").filter(|s| *s > 0.0);
            let handshake = at(floor, "quic.handshake.p50_us");
            for (name, figure) in [
                (
                    "enrollment, wall time per identity ÷ QUIC handshake p50",
                    "enroll_s",
                ),
                (
                    "first connect, wall time per session ÷ QUIC handshake p50",
                    "connect_s",
                ),
                (
                    "restart, wall time per session until all are back ÷ QUIC handshake p50",
                    "restart.all_online_s",
                ),
            ] {
                out.push(Ratio {
                    name,
                    figure: format!("{figure} ÷ sessions, in µs"),
                    value: at(result, figure).zip(sessions).map(|(x, s)| x * 1e6 / s),
                    scale: 1.0,
                    floor: "floor.quic.handshake.p50_us".into(),
                    floor_value: handshake,
                });
            }
        }
        Some("dashboard") => {
            for (name, figure) in [
                ("fleet page p50 ÷ HTTP RTT p50", "pages.fleet_page.p50_ms"),
                ("tasks page p50 ÷ HTTP RTT p50", "pages.tasks_page.p50_ms"),
                (
                    "/api/v1/agents p50 ÷ HTTP RTT p50",
                    "pages.api_agents.p50_ms",
                ),
                ("/api/v1/tasks p50 ÷ HTTP RTT p50", "pages.api_tasks.p50_ms"),
                (
                    "/api/v1/tasks?state=queued p50 ÷ HTTP RTT p50",
                    "pages.api_tasks_state_queued.p50_ms",
                ),
                (
                    "/api/v1/tasks?q= p50 ÷ HTTP RTT p50",
                    "pages.api_tasks_search.p50_ms",
                ),
                (
                    "/api/v1/tasks?q= without a match (the scan bound) p50 ÷ HTTP RTT p50",
                    "pages.api_tasks_search_no_match.p50_ms",
                ),
                (
                    "/api/v1/tasks 10th page p50 ÷ HTTP RTT p50",
                    "pages.api_tasks_page_10.p50_ms",
                ),
            ] {
                out.push(Ratio::of(
                    name,
                    result,
                    figure,
                    MS,
                    floor,
                    "http.rtt.p50_us",
                ));
            }
            // The least an event can take: the submission's durable commit and
            // one HTTP round trip (the request in, the event out on a stream).
            let (c, h) = (
                at(floor, "redb.commit.p50_us"),
                at(floor, "http.rtt.p50_us"),
            );
            out.push(Ratio {
                name: "event to all streams p50 ÷ (redb commit + HTTP RTT)",
                figure: "fan_out.to_all_streams.p50_ms".into(),
                value: at(result, "fan_out.to_all_streams.p50_ms"),
                scale: MS,
                floor: "floor.redb.commit.p50_us + floor.http.rtt.p50_us".into(),
                floor_value: c.zip(h).map(|(c, h)| c + h),
            });
        }
        Some("failover") => {
            // Each poll of the takeover is a new connection: a handshake, then a round trip.
            for (name, figure) in [
                ("takeover p50 ÷ QUIC handshake p50", "takeover.p50_ms"),
                ("serving p50 ÷ QUIC handshake p50", "serving.p50_ms"),
            ] {
                out.push(Ratio::of(
                    name,
                    result,
                    figure,
                    MS,
                    floor,
                    "quic.handshake.p50_us",
                ));
            }
            out.push(Ratio::of(
                "takeover p50 ÷ QUIC RTT p50",
                result,
                "takeover.p50_ms",
                MS,
                floor,
                "quic.rtt.p50_us",
            ));
        }
        Some("workspace") => {
            out.push(Ratio {
                name: "prepare p50 ÷ bare git worktree add p50 (same run)",
                figure: "prepare.p50_ms".into(),
                value: at(result, "prepare.p50_ms"),
                scale: 1.0,
                floor: "bare_worktree_add.p50_ms of this run".into(),
                floor_value: at(result, "bare_worktree_add.p50_ms"),
            });
            out.push(Ratio {
                name: "prepare p50 ÷ bare git worktree add p50 with prepare's parallel checkout (same run)",
                figure: "prepare.p50_ms".into(),
                value: at(result, "prepare.p50_ms"),
                scale: 1.0,
                floor: "bare_worktree_add_parallel_checkout.p50_ms of this run".into(),
                floor_value: at(result, "bare_worktree_add_parallel_checkout.p50_ms"),
            });
            out.push(Ratio::of(
                "prepare p50 ÷ spawn p50",
                result,
                "prepare.p50_ms",
                MS,
                floor,
                "spawn.spawn_and_wait.p50_us",
            ));
            out.push(Ratio::of(
                "warm fetch p50 ÷ spawn p50",
                result,
                "fetch_warm_mirror.p50_ms",
                MS,
                floor,
                "spawn.spawn_and_wait.p50_us",
            ));
        }
        _ => {}
    }
    Value::Object(out.iter().map(|r| (r.name.to_string(), r.json())).collect())
}
