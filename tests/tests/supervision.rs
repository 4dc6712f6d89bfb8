//! Issue 5, supervision: sd_notify readiness, watchdog and stopping observed on
//! a test `NOTIFY_SOCKET`, a stalled core that stops the watchdog pings, SIGTERM
//! during a run, and a configuration error that exits 78 — against the real
//! binaries on 127.0.0.1.
//!
//! The harness's fixtures start daemons without a notify socket, so these tests
//! spawn `muster-hub serve` / `muster-sidecar run` themselves (in a [`Proc`]
//! guard that kills them at the end) in the fixtures' directories.

use std::fs::File;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use muster_tests::tasks::*;
use muster_tests::{
    Hub, Sidecar, bins, free_udp_port, set_toml_key, stderr, tail, tool_available, wait_for,
    wait_until, write_script,
};
use serde_json::Value;
use tempfile::TempDir;

/// How long a daemon may take to say READY=1.
const READY: Duration = Duration::from_secs(20);
/// How long a fresh sidecar may take to connect and show up online.
const CONNECT: Duration = Duration::from_secs(20);
/// How long a short task may take from submission to its end.
const TASK_END: Duration = Duration::from_secs(20);
/// How long a daemon may take to exit after SIGTERM.
const STOP: Duration = Duration::from_secs(15);

// === sd_notify socket ===

/// A datagram socket standing in for systemd's `NOTIFY_SOCKET`.
struct Notify {
    sock: UnixDatagram,
    path: PathBuf,
    /// Every message received so far, with when it arrived.
    seen: Vec<(Instant, String)>,
    _dir: TempDir,
}

impl Notify {
    fn new() -> Notify {
        let dir = tempfile::Builder::new()
            .prefix("muster-notify-")
            .tempdir()
            .expect("a temporary directory");
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).expect("bind the notify socket");
        Notify {
            sock,
            path,
            seen: Vec::new(),
            _dir: dir,
        }
    }

    /// The next message, or `None` once `deadline` passes.
    fn recv_until(&mut self, deadline: Instant) -> Option<String> {
        let mut buf = vec![0u8; 4096];
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            if left.is_zero() {
                return None;
            }
            self.sock
                .set_read_timeout(Some(left))
                .expect("set a read timeout");
            match self.sock.recv(&mut buf) {
                Ok(n) => {
                    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                    self.seen.push((Instant::now(), msg.clone()));
                    return Some(msg);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) =>
                {
                    continue;
                }
                Err(e) => panic!("notify socket: {e}"),
            }
        }
    }

    /// Waits (at most `timeout`) for a message with the line `line`, e.g. `READY=1`.
    fn wait_line(&mut self, line: &str, timeout: Duration, proc: &mut Proc) {
        let deadline = Instant::now() + timeout;
        loop {
            // Poll in short slices so a daemon that died is noticed at once.
            let slice = (Instant::now() + Duration::from_millis(200)).min(deadline);
            if let Some(m) = self.recv_until(slice)
                && has_line(&m, line)
            {
                return;
            }
            if let Some(s) = proc.exited() {
                panic!(
                    "{} exited ({s}) before {line}; messages: {:?}\n{}",
                    proc.name,
                    self.messages(),
                    tail(&proc.log(), 4000)
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {line} from {} within {} s; messages: {:?}",
                proc.name,
                timeout.as_secs(),
                self.messages()
            );
        }
    }

    /// Collects messages until `deadline`; returns the arrival times of those with `line`.
    fn collect(&mut self, line: &str, deadline: Instant) -> Vec<Instant> {
        let mut at = Vec::new();
        while let Some(m) = self.recv_until(deadline) {
            if has_line(&m, line) {
                at.push(Instant::now());
            }
        }
        at
    }

    fn messages(&self) -> Vec<String> {
        self.seen.iter().map(|(_, m)| m.clone()).collect()
    }
}

fn has_line(msg: &str, line: &str) -> bool {
    msg.lines().any(|l| l.trim() == line)
}

// === processes ===

/// A daemon spawned by the test, killed (SIGKILL) when dropped.
struct Proc {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    /// Spawns `cmd` in a clean environment with stdout and stderr appended to `log`.
    fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Proc {
        let out = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", log.display()));
        let err = out.try_clone().expect("clone the log handle");
        cmd.env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .env_remove("CREDENTIALS_DIRECTORY")
            .env_remove("MUSTER_HUB")
            .env_remove("MUSTER_CREDENTIAL")
            .env_remove("MUSTER_SOCKET")
            .env_remove("MUSTER_TASK_ID")
            .env_remove("MUSTER_GENERATION")
            .env_remove("WATCHDOG_PID")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {cmd:?}: {e}"));
        Proc {
            name: name.into(),
            child: Some(child),
            log,
        }
    }

    fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(Child::id)
            .expect("the process runs")
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    fn sigterm(&self) {
        kill("TERM", &self.pid().to_string());
    }

    /// Waits (at most `timeout`) for the process to exit.
    fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let name = self.name.clone();
        let status = wait_until(timeout, &format!("{name} to exit"), || self.exited());
        self.child = None;
        status
    }

    fn log(&self) -> String {
        std::fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "----- {} log ({}) -----\n{}\n----- end of {} log -----",
                self.name,
                self.log.display(),
                tail(&self.log(), 6000),
                self.name
            );
        }
    }
}

/// Sends a signal with kill(1) (the workspace forbids `unsafe`, so no libc::kill).
fn kill(sig: &str, target: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{sig}"), "--", target])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// `muster-hub serve --data-dir D` with `NOTIFY_SOCKET` and `env`; waits for
/// READY=1. A listen port taken meanwhile by another process is replaced.
fn serve_hub(hub: &Hub, notify: &mut Notify, env: &[(&str, &str)]) -> Proc {
    serve_hub_limited(hub, notify, env, None)
}

/// [`serve_hub`], optionally with a file size limit (`RLIMIT_FSIZE`, bytes) and
/// SIGXFSZ ignored, so writes past the limit fail with EFBIG instead of killing.
fn serve_hub_limited(
    hub: &Hub,
    notify: &mut Notify,
    env: &[(&str, &str)],
    fsize: Option<u64>,
) -> Proc {
    for attempt in 0..4 {
        let data = hub.data_dir().to_string_lossy().into_owned();
        let mut cmd = match fsize {
            None => Command::new(&bins().hub),
            Some(limit) => {
                let mut c = Command::new("sh");
                c.args([
                    "-c",
                    "trap '' XFSZ; exec prlimit --fsize=$0:$0 -- \"$@\"",
                    &limit.to_string(),
                ])
                .arg(&bins().hub);
                c
            }
        };
        cmd.args(["serve", "--data-dir", &data])
            .env("NOTIFY_SOCKET", &notify.path);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let log = hub.root().join(format!("hub-notify-{attempt}.log"));
        let mut p = Proc::spawn("hub", cmd, log);
        let deadline = Instant::now() + READY;
        loop {
            let slice = (Instant::now() + Duration::from_millis(200)).min(deadline);
            if let Some(m) = notify.recv_until(slice)
                && has_line(&m, "READY=1")
            {
                return p;
            }
            if let Some(s) = p.exited() {
                let log = p.log();
                if log.contains("in use") && attempt < 3 {
                    let listen = format!("\"127.0.0.1:{}\"", free_udp_port());
                    set_toml_key(&hub.config_path(), "", "listen", &listen);
                    break;
                }
                panic!("the hub exited ({s}) before READY=1:\n{}", tail(&log, 4000));
            }
            assert!(
                Instant::now() < deadline,
                "no READY=1 from the hub within {} s; messages: {:?}\n{}",
                READY.as_secs(),
                notify.messages(),
                tail(&p.log(), 4000)
            );
        }
    }
    panic!("the hub could not find a free listen port");
}

/// `muster-sidecar run --data-dir D` with `NOTIFY_SOCKET` (not waiting for anything).
fn spawn_sidecar(sc: &Sidecar, notify: &Notify, env: &[(&str, &str)]) -> Proc {
    let mut cmd = Command::new(&bins().sidecar);
    cmd.args(["run", "--data-dir", &sc.data_dir().to_string_lossy()])
        .env("NOTIFY_SOCKET", &notify.path);
    for (k, v) in env {
        cmd.env(k, v);
    }
    Proc::spawn(
        &format!("sidecar {}", sc.name()),
        cmd,
        sc.root().join("sidecar-notify.log"),
    )
}

/// `muster-hub stats --json` once, with no retry; `Err` says why it failed.
fn stats_once(hub: &Hub) -> Result<Value, String> {
    let out = hub.cli(&["stats", "--json"]);
    if !out.status.success() {
        return Err(format!("stats exited {}: {}", out.status, stderr(&out)));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("stats printed no JSON: {e}"))
}

/// A TOML argv array holding one path.
fn argv_of(path: &Path) -> String {
    format!("[{}]", Value::String(path.to_string_lossy().into_owned()))
}

// === readiness and stopping ===

#[test]
fn hub_says_ready_only_once_it_answers_and_stopping_on_sigterm() {
    let hub = Hub::init();
    let mut notify = Notify::new();
    let mut p = serve_hub(&hub, &mut notify, &[]);
    // READY=1 has arrived: the very first request must be answered (no retries).
    let stats = stats_once(&hub).unwrap_or_else(|e| {
        panic!(
            "the hub said READY=1 but did not answer its first request: {e}\n{}",
            tail(&p.log(), 4000)
        )
    });
    assert!(stats.is_object(), "{stats}");
    // STATUS= may accompany READY=1 in the same datagram; nothing came before it.
    let first = notify.messages();
    assert!(
        first.first().is_some_and(|m| has_line(m, "READY=1")),
        "the first notification is not READY=1: {first:?}"
    );

    p.sigterm();
    notify.wait_line("STOPPING=1", STOP, &mut p);
    let status = p.wait_exit(STOP);
    assert_eq!(
        status.code(),
        Some(0),
        "the hub exited {status} after SIGTERM:\n{}",
        tail(&p.log(), 4000)
    );
    let all = notify.messages();
    let ready_at = all.iter().position(|m| has_line(m, "READY=1"));
    let stopping_at = all.iter().position(|m| has_line(m, "STOPPING=1"));
    assert!(ready_at < stopping_at, "READY=1 after STOPPING=1: {all:?}");
}

#[test]
fn sidecar_says_ready_once_its_socket_answers_pings_the_watchdog_and_stops_on_sigterm() {
    let hub = Hub::started();
    let sc = Sidecar::enroll(&hub, "notified", &[]);
    let mut notify = Notify::new();
    let mut p = spawn_sidecar(&sc, &notify, &[("WATCHDOG_USEC", "3000000")]);
    notify.wait_line("READY=1", READY, &mut p);
    // The local socket must answer the first `status` right after READY=1.
    let status = sc.status_json().unwrap_or_else(|| {
        panic!(
            "the sidecar said READY=1 but `status --json` did not answer at once\n{}",
            tail(&p.log(), 4000)
        )
    });
    assert!(status.is_object(), "{status}");

    // Watchdog pings from the daemon loop: several within ~3 s.
    let start = Instant::now();
    let pings = notify.collect("WATCHDOG=1", start + Duration::from_millis(3200));
    assert!(
        pings.len() >= 2,
        "only {} WATCHDOG=1 in 3.2 s: {:?}",
        pings.len(),
        notify.messages()
    );

    p.sigterm();
    let term_at = Instant::now();
    notify.wait_line("STOPPING=1", STOP, &mut p);
    let code = p.wait_exit(STOP);
    assert_eq!(
        code.code(),
        Some(0),
        "the sidecar exited {code} after SIGTERM:\n{}",
        tail(&p.log(), 4000)
    );
    eprintln!(
        "sidecar: {} watchdog pings in 3.2 s; exited {:.2} s after SIGTERM",
        pings.len(),
        term_at.elapsed().as_secs_f64()
    );
}

// === watchdog ===

#[test]
fn hub_watchdog_pings_stop_while_the_core_is_stalled_and_resume_after() {
    let hub = Hub::init();
    let stall = hub.root().join("stall");
    let stall_s = stall.to_string_lossy().into_owned();
    let mut notify = Notify::new();
    let mut p = serve_hub(
        &hub,
        &mut notify,
        &[
            ("WATCHDOG_USEC", "1000000"),
            ("MUSTER_TEST_STALL_FILE", &stall_s),
        ],
    );

    // The core loop announces the hook as it starts (around "hub listening").
    wait_for(
        Duration::from_secs(10),
        "the hub announces its stall hook (a build without `--features \
         muster-hub/test-hooks`, e.g. MUSTER_TESTS_NO_BUILD=1 after a plain build, has none)",
        || {
            let log = std::fs::read_to_string(&p.log).unwrap_or_default();
            if log.contains("test hook") {
                Ok(())
            } else {
                Err(tail(&log, 2000).to_string())
            }
        },
    );

    // Healthy: pings at about half the watchdog interval.
    let pings = notify.collect("WATCHDOG=1", Instant::now() + Duration::from_secs(3));
    assert!(
        pings.len() >= 3,
        "only {} WATCHDOG=1 in 3 s with WATCHDOG_USEC=1000000: {:?}",
        pings.len(),
        notify.messages()
    );

    // Stall the core, and give it work it cannot do: an operator request.
    File::create(&stall).expect("create the stall file");
    let stalled_at = Instant::now();
    let out = hub.root().join("stats-during-stall.out");
    let mut stats = Command::new(&bins().hub);
    stats
        .args([
            "stats",
            "--json",
            "--data-dir",
            &hub.data_dir().to_string_lossy(),
        ])
        .env("NO_COLOR", "1");
    let stats_proc = Proc::spawn("stats during the stall", stats, out.clone());
    let mut stats_proc = stats_proc;

    // The iteration in progress when the file appeared may still ping once; then silence.
    let during = notify.collect("WATCHDOG=1", stalled_at + Duration::from_millis(3000));
    let last = during.last().copied().unwrap_or(stalled_at);
    let silent = last.elapsed();
    assert!(
        during.len() <= 1,
        "{} WATCHDOG=1 while the core was stalled: {:?}",
        during.len(),
        notify.messages()
    );
    assert!(
        silent >= Duration::from_secs(2),
        "no WATCHDOG=1 silence of 2 s while stalled (last ping {:.2} s after the stall)",
        last.duration_since(stalled_at).as_secs_f64()
    );
    assert!(
        stats_proc.exited().is_none(),
        "the stats request was answered while the core was stalled: {}",
        std::fs::read_to_string(&out).unwrap_or_default()
    );

    // Unstall: pings resume and the pending request is answered.
    std::fs::remove_file(&stall).expect("remove the stall file");
    let resumed_at = Instant::now();
    notify.wait_line("WATCHDOG=1", Duration::from_secs(5), &mut p);
    let resumed_in = resumed_at.elapsed();
    let s = stats_proc.wait_exit(Duration::from_secs(20));
    assert!(
        s.success(),
        "stats after the stall exited {s}: {}",
        std::fs::read_to_string(&out).unwrap_or_default()
    );
    let more = notify.collect("WATCHDOG=1", Instant::now() + Duration::from_secs(2));
    assert!(
        !more.is_empty(),
        "WATCHDOG=1 did not keep coming after the stall: {:?}",
        notify.messages()
    );
    eprintln!(
        "hub watchdog: {} pings in 3 s healthy; {} during a 3 s stall; resumed {:.2} s after unstalling",
        pings.len(),
        during.len(),
        resumed_in.as_secs_f64()
    );
}

// === SIGTERM during a run ===

#[test]
fn sigterm_during_a_run_exits_0_leaves_the_agent_running_and_the_run_completes() {
    let mut hub = Hub::init();
    hub.set_policy("heartbeat_interval", "\"1s\"");
    hub.start();
    let mut sc = Sidecar::enroll(&hub, "drainer", &[]);
    sc.set_agent("settle", "\"100ms\"");
    sc.set_agent("stop_grace", "\"2s\"");
    let dir = sc.root().to_path_buf();
    let script = dir.join("agent.sh");
    write_script(
        &script,
        &format!(
            "#!/bin/sh\necho $$ > '{d}/pid'\nsleep 4\necho \"$MUSTER_GENERATION\" >> '{d}/done'\nexit 0\n",
            d = dir.display()
        ),
    );
    sc.set_agent("command", &argv_of(&script));
    sc.start_connected(CONNECT);
    hub.wait_agent_state("drainer", "online", CONNECT);

    let v = hub.json(&["submit", "--title", "outlives a SIGTERM"]);
    let id = v["id"].as_u64().unwrap_or_else(|| panic!("no id: {v}"));
    wait_state(&hub, id, &["running"], TASK_END);
    let agent_pid = wait_until(Duration::from_secs(10), "the agent's pid file", || {
        std::fs::read_to_string(dir.join("pid"))
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
    });

    let t0 = Instant::now();
    let status = sc.stop();
    let took = t0.elapsed();
    assert_eq!(
        status.code(),
        Some(0),
        "the sidecar exited {status} on SIGTERM:\n{}",
        tail(&sc.log(), 4000)
    );
    assert!(
        pid_alive(agent_pid),
        "the agent (pid {agent_pid}) died with the sidecar's SIGTERM"
    );
    assert!(
        !dir.join("done").exists(),
        "the agent finished before the sidecar exited ({:.2} s): not a SIGTERM during a run",
        took.as_secs_f64()
    );
    let mid = show(&hub, id);
    eprintln!(
        "sidecar exited 0 {:.2} s after SIGTERM; agent {agent_pid} still running; hub says {}",
        took.as_secs_f64(),
        mid["state"]
    );

    sc.start_connected(CONNECT);
    let t = wait_state(
        &hub,
        id,
        &["completed", "failed", "cancelled"],
        Duration::from_secs(40),
    );
    let attempts = t["attempt_history"].as_array().cloned().unwrap_or_default();
    let completed = attempts
        .iter()
        .filter(|a| a["outcome"] == "completed")
        .count();
    let outcomes: Vec<&str> = attempts
        .iter()
        .map(|a| a["outcome"].as_str().unwrap_or("-"))
        .collect();
    eprintln!(
        "after the restart: {} with outcomes {outcomes:?}",
        t["state"]
    );
    assert!(completed <= 1, "completed twice: {t}");
    assert_eq!(t["state"], "completed", "{t}");
    assert_eq!(
        t["generation"], 1,
        "the same run should have continued: {t}"
    );
    assert_eq!(outcomes, ["completed"], "{t}");
    assert_eq!(
        std::fs::read_to_string(dir.join("done")).unwrap_or_default(),
        "1\n",
        "the agent ran once, to its end"
    );
    let stats = hub.json(&["stats"]);
    assert_eq!(stats["completed"], 1, "{stats}");
}

// === configuration errors ===

#[test]
fn hub_serve_with_a_bad_listen_address_exits_78() {
    let hub = Hub::init();
    set_toml_key(&hub.config_path(), "", "listen", "\"not an address\"");
    let out = hub.serve_output(Duration::from_secs(20));
    assert_eq!(
        out.status.code(),
        Some(78),
        "serve with listen = \"not an address\" exited {}: {}",
        out.status,
        stderr(&out)
    );
    let err = stderr(&out);
    assert!(
        err.contains("listen"),
        "the message does not name the key: {err}"
    );
}

// === fatal errors ===

#[test]
fn hub_store_failure_is_fatal_exit_1_and_acknowledged_tasks_survive() {
    if !tool_available(
        Command::new("prlimit").arg("--version"),
        "prlimit (util-linux) makes the store fail",
    ) {
        return;
    }
    let mut hub = Hub::init();
    let db = hub.data_dir().join("hub.redb");
    let size = std::fs::metadata(&db)
        .map(|m| m.len())
        .expect("hub.redb exists");
    // The database may grow by 256 KiB; then every write fails with EFBIG.
    let limit = size + 256 * 1024;
    let mut notify = Notify::new();
    let mut p = serve_hub_limited(&hub, &mut notify, &[], Some(limit));

    let desc = hub.root().join("description.txt");
    std::fs::write(&desc, "x".repeat(60_000)).expect("write the description");
    let desc_s = desc.to_string_lossy().into_owned();
    let mut acked = Vec::new();
    for i in 0..200 {
        if p.exited().is_some() {
            break;
        }
        let title = format!("big {i}");
        let out = hub.cli(&[
            "submit",
            "--title",
            &title,
            "--description-file",
            &desc_s,
            "--capability",
            "nowhere",
            "--json",
        ]);
        if out.status.success() {
            let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            acked.push(
                v["id"]
                    .as_u64()
                    .unwrap_or_else(|| panic!("submit printed no id: {v}")),
            );
        }
    }
    let status = p.wait_exit(STOP);
    let log = p.log();
    assert_eq!(
        status.code(),
        Some(1),
        "the hub exited {status} after its store failed:\n{}",
        tail(&log, 4000)
    );
    assert!(
        log.contains("fatal"),
        "the fatal error is not logged:\n{}",
        tail(&log, 4000)
    );
    // The datagram was queued before the exit; reading it takes no waiting.
    notify.wait_line("STOPPING=1", Duration::from_secs(2), &mut p);
    assert!(
        !acked.is_empty(),
        "no submission was acknowledged before the failure"
    );

    // Without the limit the hub starts again with every acknowledged task.
    hub.start();
    // 60 KB descriptions: a listing answer holds about a dozen, so follow the cursor.
    let mut listed: Vec<u64> = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..100 {
        let mut args = vec!["tasks", "--limit", "1000"];
        if let Some(c) = &cursor {
            args.extend(["--cursor", c.as_str()]);
        }
        let v = hub.json(&args);
        listed.extend(
            v["tasks"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|t| t["id"].as_u64()),
        );
        match v["next_cursor"].as_u64() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    let lost: Vec<&u64> = acked.iter().filter(|id| !listed.contains(id)).collect();
    assert!(
        lost.is_empty(),
        "acknowledged tasks lost: {lost:?} (listed {listed:?})"
    );
    eprintln!(
        "store failed after {} acknowledged submissions; exit 1; all {} listed after restart",
        acked.len(),
        acked.len()
    );
}
