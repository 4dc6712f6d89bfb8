//! The hub under test: a real `muster-hub` child process in a temporary
//! directory, the operator client that drives it, and its CPU and memory read
//! from `/proc`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use muster_hub::config::{CONFIG_FILE, HubConfig};
use muster_protocol::client::{self, Credential};
use muster_protocol::msg::{OpRequest, OpResponse};
use serde_json::Value;
use tokio::process::{Child, Command};

/// Finds (and, under cargo, builds) the `muster-hub` binary of the bench's own profile.
pub(crate) fn hub_binary(explicit: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p);
    }
    let exe = std::env::current_exe().context("locating this executable")?;
    let dir = exe
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent directory", exe.display()))?;
    // target/<profile>/muster-bench, or target/<profile>/deps/… for test binaries.
    let dir = if dir.ends_with("deps") {
        dir.parent().unwrap_or(dir)
    } else {
        dir
    };
    let release = dir.file_name().is_some_and(|n| n == "release");
    if let Some(cargo) = std::env::var_os("CARGO")
        && std::env::var_os("MUSTER_BENCH_NO_BUILD").is_none()
    {
        let mut cmd = std::process::Command::new(cargo);
        cmd.args(["build", "-q", "-p", "muster-hub", "--bins"]);
        if release {
            cmd.arg("--release");
        }
        let out = cmd
            .stdin(std::process::Stdio::null())
            .output()
            .context("running cargo build -p muster-hub")?;
        if !out.status.success() {
            bail!(
                "cargo build -p muster-hub failed ({}):\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let bin = dir.join("muster-hub");
    if !bin.is_file() {
        bail!(
            "{} does not exist: build it with `cargo build {}-p muster-hub --bins` or pass --hub-bin",
            bin.display(),
            if release { "--release " } else { "" }
        );
    }
    Ok(bin)
}

/// A free UDP port on 127.0.0.1 (free when asked; the hub binds it right after).
pub(crate) fn free_udp_port() -> Result<u16> {
    let s = std::net::UdpSocket::bind("127.0.0.1:0")?;
    Ok(s.local_addr()?.port())
}

/// How to stop the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Stop {
    /// SIGTERM: a clean shutdown (closes every connection at once).
    Term,
    /// SIGKILL: a crash (clients notice by keep-alive and stateless reset).
    Kill,
}

/// A `muster-hub serve` child process and its data directory.
pub(crate) struct HubProc {
    bin: PathBuf,
    /// The data directory.
    pub(crate) dir: PathBuf,
    child: Option<Child>,
    /// The QUIC address.
    pub(crate) addr: String,
    /// The admin credential.
    pub(crate) cred: Credential,
    log: PathBuf,
    /// Log the latency points (`muster::latency` at debug, JSON lines) for `latency --breakdown`.
    pub(crate) trace_latency: bool,
    /// The hub's PostgreSQL database, dropped after the process (see `Drop`).
    _db: Option<muster_hub::store::testdb::TestDb>,
}

/// The PostgreSQL server hubs keep their state on (`--store postgres --pg-url`);
/// unset: redb.
pub(crate) static PG_URL: std::sync::OnceLock<String> = std::sync::OnceLock::new();

impl HubProc {
    /// `muster-hub init` in `dir` on a free port, then `tweak` applied to hub.toml.
    /// With [`PG_URL`] set, the hub's store is a fresh database there, dropped with it.
    pub(crate) async fn init(
        bin: &Path,
        dir: &Path,
        tweak: impl FnOnce(&mut HubConfig),
    ) -> Result<Self> {
        let db = match PG_URL.get() {
            Some(base) => Some(
                muster_hub::store::testdb::TestDb::create_on(base).map_err(|e| anyhow!("{e}"))?,
            ),
            None => None,
        };
        let store: Vec<String> = db
            .iter()
            .flat_map(|db| ["--store".to_string(), db.url().to_string()])
            .collect();
        let store: Vec<&str> = store.iter().map(String::as_str).collect();
        let mut hub = Self::init_with(bin, dir, free_udp_port()?, &store, tweak).await?;
        hub._db = db;
        Ok(hub)
    }

    /// [`HubProc::init`] on `port` with `extra` arguments to `init` (a
    /// cluster member: `--store URL` or `--join URL`).
    pub(crate) async fn init_with(
        bin: &Path,
        dir: &Path,
        port: u16,
        extra: &[&str],
        tweak: impl FnOnce(&mut HubConfig),
    ) -> Result<Self> {
        let out = Command::new(bin)
            .arg("init")
            .arg("--data-dir")
            .arg(dir)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .args(extra)
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .with_context(|| format!("running {} init", bin.display()))?;
        if !out.status.success() {
            bail!(
                "muster-hub init failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let path = dir.join(CONFIG_FILE);
        let mut cfg = HubConfig::load(&path).map_err(|e| anyhow!("{e}"))?;
        // The bench enrolls thousands of identities and submits whole runs at once:
        // lift the limits meant for hostile peers, keep every other default.
        cfg.limits.enroll_per_minute = 10_000_000;
        cfg.limits.unauthenticated_per_minute = 10_000_000;
        cfg.limits.unauthenticated_per_minute_total = 10_000_000;
        // Every bench client comes from 127.0.0.1: one source may use every
        // unauthenticated and handshake place (the hub's own totals still hold).
        cfg.limits.unauthenticated_per_source = 100_000;
        cfg.limits.unauthenticated_max = 100_000;
        cfg.limits.handshakes_per_source = 100_000;
        tweak(&mut cfg);
        std::fs::write(&path, cfg.render()).with_context(|| path.display().to_string())?;
        let (addr, cred) =
            muster_hub::cli::data_dir_credential(dir).map_err(|e| anyhow!("{}", e.message))?;
        let log = dir.parent().unwrap_or(dir).join(format!("hub-{port}.log"));
        Ok(HubProc {
            bin: bin.to_path_buf(),
            dir: dir.to_path_buf(),
            child: None,
            addr,
            cred,
            log,
            trace_latency: false,
            _db: None,
        })
    }

    /// Spawns `serve` and waits until `stats` answers; returns the time that took.
    pub(crate) async fn start(&mut self, deadline: Duration) -> Result<Duration> {
        self.start_until(deadline, false).await
    }

    /// Spawns `serve` of a cluster member and waits until it answers a `Ping`
    /// as the leader or as a standby (`NotLeader`).
    pub(crate) async fn start_member(&mut self, deadline: Duration) -> Result<Duration> {
        self.start_until(deadline, true).await
    }

    async fn start_until(&mut self, deadline: Duration, member: bool) -> Result<Duration> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let started = Instant::now();
        let mut cmd = Command::new(&self.bin);
        cmd.arg("serve");
        if self.trace_latency {
            cmd.env("RUST_LOG", "info,muster::latency=debug")
                .args(["--log-format", "json"]);
        }
        let child = cmd
            .arg("--data-dir")
            .arg(&self.dir)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawning {} serve", self.bin.display()))?;
        self.child = Some(child);
        let port = self
            .addr
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok());
        loop {
            // A QUIC Initial sent before the port is bound is lost and retried only after
            // quinn's ~1 s PTO: wait until the socket exists, then ask.
            if port.is_none_or(udp_bound) {
                let attempt = async {
                    let (ep, conn) = client::connect(&self.addr, &self.cred).await?;
                    let req = if member {
                        OpRequest::Ping
                    } else {
                        OpRequest::Stats
                    };
                    let r = client::request(&conn, req).await;
                    conn.close(0u32.into(), b"");
                    drop(ep);
                    r
                };
                match tokio::time::timeout(Duration::from_secs(2), attempt).await {
                    Ok(Ok(OpResponse::Ok { .. })) => return Ok(started.elapsed()),
                    Ok(Err(client::ClientError::NotLeader { .. })) if member => {
                        return Ok(started.elapsed());
                    }
                    _ => {}
                }
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                bail!(
                    "muster-hub serve exited ({status}) before it was ready; log: {}",
                    self.log_tail()
                );
            }
            if started.elapsed() > deadline {
                bail!(
                    "muster-hub was not ready within {} s; log: {}",
                    deadline.as_secs(),
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// The hub's pid.
    pub(crate) fn pid(&self) -> Result<u32> {
        self.child
            .as_ref()
            .and_then(Child::id)
            .ok_or_else(|| anyhow!("the hub is not running"))
    }

    /// Stops the hub and waits for it to exit.
    pub(crate) async fn stop(&mut self, how: Stop) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        match how {
            Stop::Kill => {
                let _ = child.start_kill();
            }
            Stop::Term => {
                if let Some(pid) = child.id() {
                    let _ = Command::new("kill")
                        .arg("-TERM")
                        .arg(pid.to_string())
                        .status()
                        .await;
                }
            }
        }
        match tokio::time::timeout(Duration::from_secs(10), child.wait()).await {
            Ok(r) => {
                r?;
            }
            Err(_) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                eprintln!(
                    "muster-bench: warning: the hub did not exit within 10 s of SIGTERM; killed it"
                );
            }
        }
        Ok(())
    }

    /// The hub's log file.
    pub(crate) fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last lines of the hub's log, for error messages.
    pub(crate) fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let start = text.len().saturating_sub(3000);
        let start = (start..text.len())
            .find(|i| text.is_char_boundary(*i))
            .unwrap_or(text.len());
        format!("{}:\n{}", self.log.display(), &text[start..])
    }

    /// Operator connections to the hub.
    pub(crate) async fn ops(&self, connections: usize) -> Result<Ops> {
        Ops::connect(&self.addr, &self.cred, connections).await
    }

    /// CPU seconds (user + system) the hub used so far.
    pub(crate) fn cpu_seconds(&self) -> Result<f64> {
        cpu_seconds(self.pid()?)
    }

    /// A `/proc/<pid>/status` memory figure in KiB (`VmRSS`, `VmHWM`).
    pub(crate) fn mem_kib(&self, key: &str) -> Result<u64> {
        mem_kib(self.pid()?, key)
    }
}

impl Drop for HubProc {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.start_kill();
        }
        // The database is dropped next (DROP DATABASE … WITH (FORCE) ends the
        // connections of a hub still exiting).
    }
}

/// Whether a UDP socket is bound to 127.0.0.1:`port` (from `/proc/net/udp`).
fn udp_bound(port: u16) -> bool {
    let want = format!("0100007F:{port:04X}");
    std::fs::read_to_string("/proc/net/udp")
        .map(|t| {
            t.lines()
                .any(|l| l.split_whitespace().nth(1) == Some(want.as_str()))
        })
        .unwrap_or(true)
}

fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// utime + stime of a process, in seconds.
pub(crate) fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    stat_cpu(&stat)
        .map(|(_, cpu)| cpu)
        .ok_or_else(|| anyhow!("malformed /proc/{pid}/stat"))
}

/// (name, utime + stime in seconds) of a `/proc/…/stat` line.
fn stat_cpu(stat: &str) -> Option<(String, f64)> {
    let (head, rest) = stat.rsplit_once(')')?;
    let name = head.split_once('(')?.1.to_string();
    // After the command name: field 3 (state) is index 0, so utime (14) is 11, stime (15) is 12.
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok());
    Some((name, (num(11)? + num(12)?) / clock_ticks()))
}

/// (thread id, name, CPU seconds) of every thread of `pid` running now: the
/// name from `/proc/<pid>/task/<tid>/stat`, the time from its `schedstat`
/// (time on a CPU, in ns; `stat`'s utime + stime when there is none). A
/// thread that has exited is in none of them: its time is only in the process
/// total ([`cpu_seconds`]).
///
/// Why not `stat`'s utime + stime: with many short-running threads (64 sidecar
/// daemons committing by `block_in_place`) their per-thread sum fell far
/// behind the process total while every thread lived (85 against 134 ticks
/// in one pass), while the `schedstat` sum followed it within a tick.
pub(crate) fn thread_cpu(pid: u32) -> Result<Vec<(u32, String, f64)>> {
    let dir = format!("/proc/{pid}/task");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| dir.clone())? {
        let entry = entry?;
        let Some(tid) = entry.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        // A thread may exit between the listing and the read.
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some((name, stat_cpu)) = stat_cpu(&stat) else {
            continue;
        };
        let run_ns = std::fs::read_to_string(entry.path().join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok());
        out.push((tid, name, run_ns.map_or(stat_cpu, |ns| ns / 1e9)));
    }
    Ok(out)
}

/// A memory line of `/proc/<pid>/status`, in KiB.
pub(crate) fn mem_kib(pid: u32, key: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| {
            v.trim_start_matches(':')
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .ok_or_else(|| anyhow!("no {key} in /proc/{pid}/status"))
}

/// Operator connections (admin credential); requests go round robin, one stream each.
pub(crate) struct Ops {
    conns: Vec<(quinn::Endpoint, quinn::Connection)>,
    next: AtomicUsize,
}

impl Ops {
    async fn connect(addr: &str, cred: &Credential, n: usize) -> Result<Ops> {
        let mut conns = Vec::new();
        for _ in 0..n.max(1) {
            conns.push(client::connect(addr, cred).await?);
        }
        Ok(Ops {
            conns,
            next: AtomicUsize::new(0),
        })
    }

    /// Every connection.
    pub(crate) fn conns(&self) -> impl Iterator<Item = &quinn::Connection> {
        self.conns.iter().map(|(_, c)| c)
    }

    /// One connection, for streams of our own (`watch`).
    pub(crate) fn conn(&self) -> &quinn::Connection {
        &self.conns[0].1
    }

    /// One request; an error answer is an error.
    pub(crate) async fn call(&self, req: OpRequest) -> Result<Value> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.conns.len();
        match client::request(&self.conns[i].1, req).await? {
            OpResponse::Ok { json } => Ok(serde_json::from_str(&json)?),
            OpResponse::Error(e) => bail!("the hub answered {:?}: {}", e.code, e.message),
            OpResponse::Event { .. } | OpResponse::LogChunk { .. } => {
                bail!("unexpected streamed answer")
            }
        }
    }

    /// `stats`.
    pub(crate) async fn stats(&self) -> Result<Value> {
        self.call(OpRequest::Stats).await
    }

    /// How many agents are online (and, if `available`, also available).
    pub(crate) async fn online(&self, available: bool) -> Result<usize> {
        let v = self.call(OpRequest::Agents).await?;
        // The answer lists agents up to a byte budget but counts the whole fleet by state.
        if !available && let Some(n) = v["by_state"]["online"].as_u64() {
            return Ok(n as usize);
        }
        Ok(v["agents"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|x| x["state"] == "online" && (!available || x["available"] == true))
                    .count()
            })
            .unwrap_or(0))
    }

    /// Closes every connection.
    pub(crate) async fn close(self) {
        for (ep, c) in self.conns {
            c.close(0u32.into(), b"bye");
            let _ = tokio::time::timeout(Duration::from_millis(500), ep.wait_idle()).await;
        }
    }
}
