//! Black-box test harness for muster: real `muster-hub` and `muster-sidecar`
//! binaries on 127.0.0.1, each in its own temporary directory.
//!
//! - [`bins`] builds both binaries once per test process and returns their paths.
//!   Set `MUSTER_TESTS_NO_BUILD=1` to use the binaries already in `target/`
//!   (built with `--features muster-sidecar/test-hooks`, as [`bins`] does).
//! - [`Hub`] is one hub: `init` on a free UDP port, config edits, `serve`,
//!   `kill -9`, SIGTERM, restart, and the operator CLI against it.
//! - [`Sidecar`] is one sidecar: enrollment, config edits, `run`, `kill -9`,
//!   SIGTERM, `status --json` and any other subcommand.
//! - [`wait_until`] and [`wait_for`] poll a condition with a deadline; tests never
//!   sleep to wait for an outcome.
//! - [`run_log_prelude`] and [`read_run_log`] give exec agents a run log outside
//!   every daemon's state: independent evidence of which runs happened and how
//!   each ended.
//! - A global limit ([`FleetPermit`], taken by every [`Hub`]) keeps at most
//!   [`FLEETS_MAX`] tests' fleets running at once on this 2-core machine.
//!
//! Fixtures clean up in `Drop` (SIGKILL to their processes; the temporary
//! directories go away). When a test panics, the fixtures print the tails of
//! their logs, so a failure shows what the daemons said.

use std::cell::Cell;
use std::ffi::{OsStr, OsString};
use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub mod attack;
pub mod pg;
pub mod tasks;

use muster_protocol::client::Credential;
use serde_json::Value;
use tempfile::TempDir;

/// How often [`wait_until`] polls.
pub const POLL: Duration = Duration::from_millis(75);
/// How long a hub may take to answer after `serve` starts.
pub const HUB_READY: Duration = Duration::from_secs(20);
/// How long a CLI command may run before the harness kills it and fails the test.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(30);
/// How long SIGTERM may take before the harness gives up and kills.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Most tests whose fleets (hub + sidecars) run at once.
pub const FLEETS_MAX: usize = 3;
/// Bytes of each log printed when a test fails.
const LOG_TAIL_BYTES: usize = 6000;

// === Binaries ===

/// Paths of the binaries under test.
#[derive(Debug, Clone)]
pub struct Bins {
    /// `muster-hub`.
    pub hub: PathBuf,
    /// `muster-sidecar`.
    pub sidecar: PathBuf,
}

/// Builds `muster-hub` and `muster-sidecar` once per test process (same
/// profile as the test, with their `test-hooks` features) and returns their
/// paths in `target/<profile>/`.
///
/// # Panics
/// When the build fails (with cargo's output) or a binary is missing.
pub fn bins() -> &'static Bins {
    static BINS: OnceLock<Bins> = OnceLock::new();
    BINS.get_or_init(|| {
        let exe = std::env::current_exe().expect("the test executable has a path");
        // …/target/<profile>/deps/<test> → …/target/<profile>
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("the test executable lives in target/<profile>/deps")
            .to_path_buf();
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        if std::env::var_os("MUSTER_TESTS_NO_BUILD").is_none() {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut cmd = Command::new(cargo);
            // The hub's test hooks (`MUSTER_TEST_STALL_FILE`) exist only in this build.
            cmd.args([
                "build",
                "-p",
                "muster-hub",
                "-p",
                "muster-sidecar",
                "--bins",
                // Test-only hooks (the stall file, crash points); inert unless a test arms them.
                "--features",
                "muster-hub/test-hooks,muster-sidecar/test-hooks",
            ]);
            if release {
                cmd.arg("--release");
            }
            let out = cmd
                .stdin(Stdio::null())
                .output()
                .expect("cargo can be run to build the binaries under test");
            assert!(
                out.status.success(),
                "building muster-hub and muster-sidecar failed ({}):\n{}",
                out.status,
                tail(&String::from_utf8_lossy(&out.stderr), 8000)
            );
        }
        let bins = Bins {
            hub: profile_dir.join("muster-hub"),
            sidecar: profile_dir.join("muster-sidecar"),
        };
        for b in [&bins.hub, &bins.sidecar] {
            assert!(
                b.is_file(),
                "{} does not exist after the build",
                b.display()
            );
        }
        bins
    })
}

// === Tools ===

/// Whether the external tool a test needs runs: `probe` (e.g. `strace -V`) exits 0.
/// Outside CI a missing tool prints `SKIPPED: …` (with `why`) and gives `false`, so
/// the test can return; in CI (`CI=true`) it fails the test instead, so a green CI
/// run never hides a test that did not run.
///
/// # Panics
/// When the tool is missing and `CI=true`.
pub fn tool_available(probe: &mut Command, why: &str) -> bool {
    let ok = probe
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return true;
    }
    let tool = probe.get_program().to_string_lossy().into_owned();
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{tool} is missing and CI=true, so this test cannot be skipped: {why} (.ci/run installs it)"
    );
    eprintln!("SKIPPED: {tool} is not installed: {why}");
    false
}

// === Waiting ===

/// Polls `f` every [`POLL`] until it returns `Some`, for at most `timeout`.
///
/// # Panics
/// When the deadline passes, naming `what`.
pub fn wait_until<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    wait_for(timeout, what, || f().ok_or_else(|| "not yet".to_string()))
}

/// Polls `f` every [`POLL`] until it returns `Ok`, for at most `timeout`; `Err`
/// carries the last observation, which the panic message shows.
///
/// # Panics
/// When the deadline passes, naming `what` and the last observation.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Result<T, String>) -> T {
    let start = Instant::now();
    loop {
        match f() {
            Ok(v) => return v,
            Err(last) => {
                if start.elapsed() >= timeout {
                    panic!(
                        "timed out after {:.1} s waiting for {what}; last observation: {last}",
                        start.elapsed().as_secs_f64()
                    );
                }
            }
        }
        std::thread::sleep(POLL);
    }
}

/// Runs a command to its end, killing it (and failing the test) after `timeout`.
///
/// # Panics
/// When the command cannot start or runs past `timeout`.
pub fn run_bounded(cmd: &mut Command, timeout: Duration) -> Output {
    run_bounded_input(cmd, None, timeout)
}

/// [`run_bounded`] with `input` written to the command's stdin (then closed).
///
/// # Panics
/// When the command cannot start or runs past `timeout`.
pub fn run_bounded_input(cmd: &mut Command, input: Option<&[u8]>, timeout: Duration) -> Output {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    if let (Some(input), Some(mut pipe)) = (input, child.stdin.take()) {
        let input = input.to_vec();
        // On a thread, so a command that never reads cannot block the test.
        std::thread::spawn(move || {
            let _ = std::io::Write::write_all(&mut pipe, &input);
        });
    }
    // Read the pipes on threads so a chatty command cannot block on a full pipe.
    let mut out = child.stdout.take().expect("stdout is piped");
    let mut err = child.stderr.take().expect("stderr is piped");
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut out, &mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut err, &mut v);
        v
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait on a child") {
            break s;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} still running after {} s", timeout.as_secs());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    }
}

/// Runs a future to completion on a fresh single-threaded tokio runtime.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(f)
}

/// stdout of an [`Output`] as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// stderr of an [`Output`] as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A free UDP port on 127.0.0.1 (bound, read, released).
pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("bind a UDP socket on 127.0.0.1")
        .port()
}

/// A free TCP port on 127.0.0.1 (bound, read, released).
pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("bind a TCP socket on 127.0.0.1")
        .port()
}

/// Some pseudo-random bytes (not for cryptography), seeded from the clock.
pub fn noise(len: usize) -> Vec<u8> {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut rng = muster_protocol::pace::Rng::new(seed);
    (0..len).map(|_| (rng.next_u64() >> 24) as u8).collect()
}

/// Lower-case hex of some pseudo-random bytes.
pub fn noise_hex(bytes: usize) -> String {
    noise(bytes).iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

// === Config files ===

/// Sets `key = value` in `section` of a TOML file written by `init`/`enroll`
/// (one `key = value` per line; `section` `""` is the top level). `value` is
/// TOML as written, e.g. `"\"1s\""` or `"[\"/bin/true\"]"`.
///
/// # Panics
/// When the file cannot be read or written, or has no such key there.
pub fn set_toml_key(path: &Path, section: &str, key: &str, value: &str) {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let mut current = String::new();
    let mut found = false;
    let mut out = String::with_capacity(text.len() + value.len());
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('[') && t.ends_with(']') {
            current = t.trim_matches(['[', ']']).trim().to_string();
        }
        let is_key = t
            .strip_prefix(key)
            .is_some_and(|rest| rest.trim_start().starts_with('='));
        if !found && current == section && is_key {
            let _ = writeln!(out, "{key} = {value}");
            found = true;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    assert!(
        found,
        "{} has no key {key:?} in section [{section}]",
        path.display()
    );
    std::fs::write(path, out).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// Appends a raw line to the end of `section` (before the next section header).
///
/// # Panics
/// When the file cannot be read or written.
pub fn add_toml_line(path: &Path, section: &str, line: &str) {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let mut out = String::new();
    let mut current = String::new();
    let mut done = false;
    for l in text.lines() {
        let t = l.trim();
        if t.starts_with('[') && t.ends_with(']') {
            if !done && current == section {
                out.push_str(line);
                out.push('\n');
                done = true;
            }
            current = t.trim_matches(['[', ']']).trim().to_string();
        }
        out.push_str(l);
        out.push('\n');
    }
    if !done {
        if current != section {
            let _ = writeln!(out, "[{section}]");
        }
        out.push_str(line);
        out.push('\n');
    }
    std::fs::write(path, out).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

// === Fleet limit ===

static FLEETS: Mutex<usize> = Mutex::new(0);
static FLEETS_FREE: Condvar = Condvar::new();

thread_local! {
    static HELD_HERE: Cell<usize> = const { Cell::new(0) };
}

/// One of [`FLEETS_MAX`] slots for running daemons. Every [`Hub`] takes one;
/// further fixtures on the same test thread share the thread's slot, so a test
/// with two hubs cannot deadlock against others.
#[derive(Debug)]
pub struct FleetPermit {
    _private: (),
}

impl FleetPermit {
    /// Waits for a slot (or joins the one this thread holds).
    pub fn acquire() -> Self {
        let held = HELD_HERE.with(Cell::get);
        if held == 0 {
            let mut n = FLEETS.lock().unwrap_or_else(|p| p.into_inner());
            while *n >= FLEETS_MAX {
                n = FLEETS_FREE.wait(n).unwrap_or_else(|p| p.into_inner());
            }
            *n += 1;
        }
        HELD_HERE.with(|h| h.set(held + 1));
        FleetPermit { _private: () }
    }
}

impl Drop for FleetPermit {
    fn drop(&mut self) {
        let held = HELD_HERE.with(Cell::get);
        HELD_HERE.with(|h| h.set(held.saturating_sub(1)));
        if held == 1 {
            let mut n = FLEETS.lock().unwrap_or_else(|p| p.into_inner());
            *n = n.saturating_sub(1);
            FLEETS_FREE.notify_one();
        }
    }
}

// === Processes ===

/// Environment every daemon and CLI call gets: plain logs, no inherited muster settings.
pub fn clean_env(cmd: &mut Command) -> &mut Command {
    cmd.env("NO_COLOR", "1")
        .env_remove("CREDENTIALS_DIRECTORY")
        .env_remove("MUSTER_HUB")
        .env_remove("MUSTER_CREDENTIAL")
        .env_remove("MUSTER_SOCKET")
        .env_remove("MUSTER_TASK_ID")
        .env_remove("MUSTER_GENERATION")
        .env_remove("MUSTER_TASK_TOKEN")
        // A test run under a notify-type unit must not have its daemons talk to that unit.
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID");
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "info");
    }
    cmd
}

/// A daemon process with its stderr appended to a log file.
#[derive(Debug)]
struct Daemon {
    child: Option<Child>,
    log: PathBuf,
    /// A program and its arguments the daemon is launched through (`strace …`);
    /// empty for the daemon itself, the default.
    wrapper: Vec<OsString>,
}

impl Daemon {
    fn new(log: PathBuf) -> Self {
        Daemon {
            child: None,
            log,
            wrapper: Vec::new(),
        }
    }

    /// A command for `program`, through the wrapper if there is one.
    fn command(&self, program: &Path) -> Command {
        let Some((first, rest)) = self.wrapper.split_first() else {
            return Command::new(program);
        };
        let mut cmd = Command::new(first);
        cmd.args(rest).arg(program);
        cmd
    }

    fn spawn(&mut self, mut cmd: Command) {
        assert!(self.child.is_none(), "the daemon is already running");
        if !self.wrapper.is_empty() {
            // Its own process group, so kill9 reaches the daemon behind the wrapper too
            // (a SIGKILLed tracer leaves its tracee running).
            use std::os::unix::process::CommandExt;
            cmd.process_group(0);
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", self.log.display()));
        let log2 = log.try_clone().expect("clone the log file handle");
        let child = clean_env(&mut cmd)
            .stdin(Stdio::null())
            .stdout(log2)
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {cmd:?}: {e}"));
        self.child = Some(child);
    }

    /// The daemon's pid: the child itself, or the wrapper's child when wrapped.
    fn pid(&self) -> Option<u32> {
        let child = self.child.as_ref()?.id();
        if self.wrapper.is_empty() {
            return Some(child);
        }
        let children =
            std::fs::read_to_string(format!("/proc/{child}/task/{child}/children")).ok()?;
        children.split_whitespace().next()?.parse().ok()
    }

    /// `Some(status)` if the process has exited.
    fn exited(&mut self) -> Option<ExitStatus> {
        let c = self.child.as_mut()?;
        c.try_wait().ok().flatten()
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            if !self.wrapper.is_empty() {
                signal(&format!("-{}", c.id()), "KILL");
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM to the daemon (behind its wrapper, which exits with it), then waits.
    fn stop(&mut self) -> ExitStatus {
        let target = self.pid().expect("the daemon is running");
        let mut c = self.child.take().expect("the daemon is running");
        signal(&target.to_string(), "TERM");
        let start = Instant::now();
        loop {
            if let Some(s) = c.try_wait().expect("try_wait on a daemon") {
                return s;
            }
            if start.elapsed() > STOP_TIMEOUT {
                let _ = c.kill();
                let _ = c.wait();
                panic!(
                    "the daemon did not stop within {} s of SIGTERM",
                    STOP_TIMEOUT.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }
}

/// Sends a signal with kill(1): `target` is a pid, or `-pgid` for a process group.
fn signal(target: &str, sig: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{sig}"), "--", target])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// The last `max` bytes of `s`, on a character boundary.
pub fn tail(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

// === Hub ===

/// One hub in its own temporary directory, listening on 127.0.0.1.
#[derive(Debug)]
pub struct Hub {
    daemon: Daemon,
    /// The PostgreSQL database of a hub on PostgreSQL; dropped (after the
    /// daemon, so after its process is killed) with the hub.
    _db: Option<muster_hub::store::testdb::TestDb>,
    addr: SocketAddr,
    data: PathBuf,
    started_once: bool,
    // Dropped last: the directory outlives the process killed in Drop.
    _permit: FleetPermit,
    dir: TempDir,
}

impl Hub {
    /// `muster-hub init` on a free UDP port of 127.0.0.1; not started.
    ///
    /// # Panics
    /// When `init` fails.
    pub fn init() -> Hub {
        Hub::init_with(|_| Vec::new())
    }

    /// [`Hub::init`] with more `init` arguments, made from the listen address
    /// (e.g. `--advertise localhost:PORT`).
    ///
    /// # Panics
    /// When `init` fails.
    pub fn init_with(extra: impl FnOnce(SocketAddr) -> Vec<String>) -> Hub {
        Hub::init_prepared(extra, |_| {}, None)
    }

    /// [`Hub::init`] of a hub keeping its state in a fresh PostgreSQL database
    /// (`[store] kind = "postgres"`), dropped with the hub. `None` when no
    /// test server is set (`MUSTER_TEST_PG_URL`): then, outside CI, the
    /// test prints `SKIPPED: …` and should return.
    ///
    /// # Panics
    /// When `init` fails, or under `CI=true` without a test server.
    pub fn init_postgres() -> Option<Hub> {
        muster_hub::store::testdb::TestDb::create().map(|db| {
            let url = db.url().to_string();
            Hub::init_prepared(move |_| vec!["--store".into(), url], |_| {}, Some(db))
        })
    }

    /// The first hub of a cluster on the database at `url` (which the caller
    /// owns): `muster-hub init --store URL`.
    ///
    /// # Panics
    /// When `init` fails.
    pub fn init_store(url: &str) -> Hub {
        let url = url.to_string();
        Hub::init_with(move |_| vec!["--store".into(), url])
    }

    /// A further hub of the cluster `first` leads or serves in: its CA and admin
    /// credential copied (as the README says), then `muster-hub init --join URL`.
    ///
    /// # Panics
    /// When a copy or `init` fails.
    pub fn join(first: &Hub, url: &str) -> Hub {
        let from = first.data_dir().to_path_buf();
        let url = url.to_string();
        Hub::init_prepared(
            move |_| vec!["--join".into(), url],
            move |data| {
                std::fs::create_dir_all(data).expect("the data directory");
                for f in ["ca.crt", "ca.key", "admin.crt", "admin.key"] {
                    std::fs::copy(from.join(f), data.join(f)).expect("copying the cluster's PKI");
                }
            },
            None,
        )
    }

    /// `muster-hub init --data-dir D --listen 127.0.0.1:<free> <extra>`, after
    /// `prepare(D)`; not started. `db` is dropped with the hub.
    ///
    /// # Panics
    /// When `init` fails.
    pub fn init_prepared(
        extra: impl FnOnce(SocketAddr) -> Vec<String>,
        prepare: impl FnOnce(&Path),
        db: Option<muster_hub::store::testdb::TestDb>,
    ) -> Hub {
        let permit = FleetPermit::acquire();
        let dir = tempfile::Builder::new()
            .prefix("muster-hub-")
            .tempdir()
            .expect("a temporary directory");
        let data = dir.path().join("hub");
        prepare(&data);
        let addr: SocketAddr = ([127, 0, 0, 1], free_udp_port()).into();
        let out = run_bounded(
            clean_env(&mut Command::new(&bins().hub))
                .args([
                    "init",
                    "--data-dir",
                    &data.to_string_lossy(),
                    "--listen",
                    &addr.to_string(),
                ])
                .args(extra(addr)),
            CLI_TIMEOUT,
        );
        assert!(
            out.status.success(),
            "muster-hub init failed ({}): {}",
            out.status,
            stderr(&out)
        );
        Hub {
            daemon: Daemon::new(dir.path().join("hub.log")),
            _db: db,
            addr,
            data,
            started_once: false,
            _permit: permit,
            dir,
        }
    }

    /// [`Hub::init`], a one-second heartbeat interval (so liveness tests are
    /// quick), then [`Hub::start`].
    pub fn started() -> Hub {
        let mut hub = Hub::init();
        hub.set_policy("heartbeat_interval", "\"1s\"");
        hub.start();
        hub
    }

    /// The address the hub listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The hub's data directory (CA, admin credential, hub.toml, database).
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// The temporary directory holding the data directory and the log.
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// hub.toml.
    pub fn config_path(&self) -> PathBuf {
        self.data.join("hub.toml")
    }

    /// Sets a key in hub.toml's `[policy]`; `value` is TOML, e.g. `"\"1s\""`.
    pub fn set_policy(&self, key: &str, value: &str) {
        set_toml_key(&self.config_path(), "policy", key, value);
    }

    /// Sets a key in hub.toml's `[limits]`.
    pub fn set_limit(&self, key: &str, value: &str) {
        set_toml_key(&self.config_path(), "limits", key, value);
    }

    /// Spawns `muster-hub serve` and waits (at most [`HUB_READY`]) until it answers `stats`.
    /// On the first start, a listen port taken meanwhile by another process is replaced.
    ///
    /// # Panics
    /// When the hub exits or does not answer in time (with its log).
    pub fn start(&mut self) {
        self.start_with_env(&[]);
    }

    /// [`Hub::start`] with extra environment variables for this run of `serve` only
    /// (e.g. `LD_PRELOAD` of libfaketime to shift the hub's clock).
    ///
    /// # Panics
    /// When the hub exits or does not answer in time (with its log).
    pub fn start_with_env(&mut self, env: &[(&str, &str)]) {
        for attempt in 0..5 {
            let before = self.daemon.log_text().len();
            self.spawn_serve(env);
            match self.wait_ready(before) {
                Ok(()) => {
                    self.started_once = true;
                    return;
                }
                Err(log) if !self.started_once && attempt < 4 && log.contains("in use") => {
                    self.daemon.kill9();
                    self.addr.set_port(free_udp_port());
                    let listen = format!("\"{}\"", self.addr);
                    set_toml_key(&self.config_path(), "", "listen", &listen);
                }
                Err(log) => panic!("the hub did not become ready:\n{}", tail(&log, 4000)),
            }
        }
    }

    /// Launches `serve` through `prefix` from now on (e.g. `strace -f -o F`, the
    /// binary follows); an empty prefix restores the default, the binary itself.
    /// [`Hub::pid`] stays the hub's own pid; SIGKILL reaches both.
    pub fn wrap<S: AsRef<OsStr>>(&mut self, prefix: &[S]) {
        self.daemon.wrapper = prefix.iter().map(|s| s.as_ref().to_owned()).collect();
    }

    fn spawn_serve(&mut self, env: &[(&str, &str)]) {
        let mut cmd = self.daemon.command(&bins().hub);
        cmd.args(["serve", "--data-dir", &self.data.to_string_lossy()]);
        cmd.envs(env.iter().copied());
        self.daemon.spawn(cmd);
    }

    /// Waits for "hub listening" in the log written since `from`, then for one `stats` answer.
    fn wait_ready(&mut self, from: usize) -> Result<(), String> {
        let start = Instant::now();
        loop {
            let log = self.daemon.log_text();
            let new = log.get(from..).unwrap_or_default();
            if let Some(s) = self.daemon.exited() {
                return Err(format!("the hub exited ({s}):\n{new}"));
            }
            // A standby of a cluster answers by naming the leader, whom the CLI follows.
            if new.contains("hub listening") || new.contains("standby: answering") {
                let out = self.cli(&["stats", "--json"]);
                if out.status.success() {
                    return Ok(());
                }
            }
            if start.elapsed() > HUB_READY {
                return Err(format!(
                    "no answer within {} s:\n{new}",
                    HUB_READY.as_secs()
                ));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Runs `muster-hub serve` in the foreground (for configuration errors) and
    /// returns its output; fails the test if it runs longer than `timeout`.
    pub fn serve_output(&self, timeout: Duration) -> Output {
        run_bounded(
            clean_env(&mut Command::new(&bins().hub)).args([
                "serve",
                "--data-dir",
                &self.data.to_string_lossy(),
            ]),
            timeout,
        )
    }

    /// The hub process id, if running.
    pub fn pid(&self) -> Option<u32> {
        self.daemon.pid()
    }

    /// SIGKILL, then reap.
    pub fn kill9(&mut self) {
        self.daemon.kill9();
    }

    /// SIGTERM and wait (at most [`STOP_TIMEOUT`]); returns the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        self.daemon.stop()
    }

    /// SIGTERM, then [`Hub::start`] again on the same port and data.
    pub fn restart(&mut self) {
        self.stop();
        self.start();
    }

    /// Runs `muster-hub <args> --data-dir D` (the admin credential) to its end.
    pub fn cli(&self, args: &[&str]) -> Output {
        run_bounded(
            clean_env(&mut Command::new(&bins().hub))
                .args(args)
                .args(["--data-dir", &self.data.to_string_lossy()]),
            CLI_TIMEOUT,
        )
    }

    /// `muster-hub <args> --data-dir D` (the admin credential) as a command to
    /// spawn, for output read while it runs (`task logs --follow`).
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&bins().hub);
        clean_env(&mut cmd)
            .args(args)
            .args(["--data-dir", &self.data.to_string_lossy()]);
        cmd
    }

    /// Runs `muster-hub <args> --json`, asserts success and parses stdout.
    ///
    /// # Panics
    /// When the command fails or prints something that is not JSON.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.cli(&all);
        assert!(
            out.status.success(),
            "muster-hub {} failed ({}): {}",
            all.join(" "),
            out.status,
            stderr(&out)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "muster-hub {} printed no JSON ({e}): {}",
                all.join(" "),
                stdout(&out)
            )
        })
    }

    /// Turns the dashboard and HTTP API on at a free port of 127.0.0.1 (before
    /// [`Hub::start`]); its base URL, e.g. `http://127.0.0.1:40123`.
    pub fn enable_dashboard(&self) -> String {
        let port = free_tcp_port();
        set_toml_key(
            &self.config_path(),
            "dashboard",
            "listen",
            &format!("\"127.0.0.1:{port}\""),
        );
        format!("http://127.0.0.1:{port}")
    }

    /// A one-time dashboard login URL (`muster-hub dashboard [--role R]`).
    ///
    /// # Panics
    /// When the command fails.
    pub fn login_url(&self, role: Option<&str>) -> String {
        let mut args = vec!["dashboard"];
        if let Some(r) = role {
            args.extend(["--role", r]);
        }
        let out = self.cli(&args);
        assert!(
            out.status.success(),
            "dashboard failed ({}): {}",
            out.status,
            stderr(&out)
        );
        let url = stdout(&out).trim().to_string();
        assert!(url.contains("/login?token="), "not a login URL: {url:?}");
        url
    }

    /// An API token (`token create --kind api`) named `name` with `role`, valid for `ttl`.
    ///
    /// # Panics
    /// When the command fails.
    pub fn api_token(&self, name: &str, role: &str, ttl: &str) -> String {
        let out = self.cli(&[
            "token", "create", "--kind", "api", "--name", name, "--role", role, "--ttl", ttl,
        ]);
        assert!(
            out.status.success(),
            "token create --kind api failed ({}): {}",
            out.status,
            stderr(&out)
        );
        let token = stdout(&out).trim().to_string();
        assert!(
            token.starts_with("muster_api_"),
            "not an API token: {token:?}"
        );
        token
    }

    /// A single-use join token for `role` (`agent`, `operator`, `admin`) valid for an hour.
    pub fn token(&self, role: &str) -> String {
        self.token_ttl(role, "1h")
    }

    /// A single-use join token for `role` valid for `ttl` (e.g. `"1s"`).
    ///
    /// # Panics
    /// When `token create` fails.
    pub fn token_ttl(&self, role: &str, ttl: &str) -> String {
        let out = self.cli(&["token", "create", "--role", role, "--ttl", ttl]);
        assert!(
            out.status.success(),
            "token create failed ({}): {}",
            out.status,
            stderr(&out)
        );
        let token = stdout(&out).trim().to_string();
        assert!(token.starts_with("muster1/"), "not a token: {token:?}");
        token
    }

    /// `agents --json` entry of `name`, if listed.
    pub fn agent(&self, name: &str) -> Option<Value> {
        let v = self.json(&["agents"]);
        v["agents"]
            .as_array()?
            .iter()
            .find(|a| a["name"] == name)
            .cloned()
    }

    /// The `state` (`online`, `suspect`, `offline`) of `name` per `agents --json`.
    pub fn agent_state(&self, name: &str) -> Option<String> {
        self.agent(name)
            .and_then(|a| a["state"].as_str().map(str::to_owned))
    }

    /// Waits until `name` is `state`, at most `timeout`.
    pub fn wait_agent_state(&self, name: &str, state: &str, timeout: Duration) -> Value {
        wait_for(
            timeout,
            &format!("agent {name} {state} at the hub"),
            || match self.agent(name) {
                Some(a) if a["state"] == state => Ok(a),
                Some(a) => Err(a.to_string()),
                None => Err("not listed".into()),
            },
        )
    }

    /// The admin credential from the data directory, for protocol-level tests.
    pub fn admin_credential(&self) -> Credential {
        let read = |f: &str| {
            std::fs::read_to_string(self.data.join(f))
                .unwrap_or_else(|e| panic!("{}: {e}", self.data.join(f).display()))
        };
        Credential {
            ca_pem: read("ca.crt"),
            cert_pem: read("admin.crt"),
            key_pem: read("admin.key"),
        }
    }

    /// The CA fingerprint printed by `init` (SHA-256 of ca.crt, hex).
    pub fn ca_fingerprint(&self) -> String {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let der = CertificateDer::from_pem_file(self.data.join("ca.crt")).expect("ca.crt is PEM");
        muster_protocol::tls::fingerprint(der.as_ref())
    }

    /// Everything the hub logged so far.
    pub fn log(&self) -> String {
        self.daemon.log_text()
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.daemon.kill9();
        if std::thread::panicking() {
            eprintln!(
                "----- hub log ({}) -----\n{}\n----- end of hub log -----",
                self.daemon.log.display(),
                tail(&self.daemon.log_text(), LOG_TAIL_BYTES)
            );
        }
    }
}

// === Sidecar ===

/// One sidecar in its own temporary directory.
#[derive(Debug)]
pub struct Sidecar {
    daemon: Daemon,
    name: String,
    data: PathBuf,
    dir: TempDir,
    /// Extra environment for `run` (`PATH` with stand-ins, `TMUX_TMPDIR`, …).
    env: Vec<(OsString, OsString)>,
}

impl Sidecar {
    /// A sidecar directory, not enrolled.
    pub fn new(name: &str) -> Sidecar {
        let dir = tempfile::Builder::new()
            .prefix(&format!("muster-sidecar-{name}-"))
            .tempdir()
            .expect("a temporary directory");
        let data = dir.path().join("state");
        Sidecar {
            daemon: Daemon::new(dir.path().join("sidecar.log")),
            name: name.into(),
            data,
            dir,
            env: Vec::new(),
        }
    }

    /// A new token from `hub`, `muster-sidecar enroll` with it, then the test
    /// defaults in sidecar.toml (exec mode running `/bin/true`, a 1 MiB disk floor).
    ///
    /// # Panics
    /// When enrollment fails.
    pub fn enroll(hub: &Hub, name: &str, capabilities: &[&str]) -> Sidecar {
        let s = Sidecar::new(name);
        let out = s.enroll_with(&hub.token("agent"), capabilities);
        assert!(
            out.status.success(),
            "muster-sidecar enroll failed ({}): {}",
            out.status,
            stderr(&out)
        );
        s.set("", "disk_floor_mb", "1");
        s.set_agent("command", "[\"/bin/true\"]");
        s
    }

    /// [`Sidecar::enroll`] asking the hub for `slots` slots (`enroll --slots`),
    /// so sidecar.toml and the grant agree.
    ///
    /// # Panics
    /// When enrollment fails.
    pub fn enroll_slots(hub: &Hub, name: &str, slots: u32) -> Sidecar {
        let s = Sidecar::new(name);
        let token = hub.token("agent");
        let slots = slots.to_string();
        let out = s.enroll_args(&["--token", "-", "--slots", &slots], Some(&token));
        assert!(
            out.status.success(),
            "muster-sidecar enroll --slots failed ({}): {}",
            out.status,
            stderr(&out)
        );
        s.set("", "disk_floor_mb", "1");
        s.set_agent("command", "[\"/bin/true\"]");
        s
    }

    /// Runs `muster-sidecar enroll --data-dir D --name N <args>`, with `stdin`
    /// (a line, e.g. the token for `--token -`) on its standard input.
    pub fn enroll_args(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let data = self.data.to_string_lossy().into_owned();
        let input = stdin.map(|s| format!("{s}\n").into_bytes());
        run_bounded_input(
            clean_env(&mut Command::new(&bins().sidecar))
                .args(["enroll", "--data-dir", &data, "--name", &self.name])
                .args(args),
            input.as_deref(),
            CLI_TIMEOUT,
        )
    }

    /// Runs `muster-sidecar enroll --token T --data-dir D --name N --capability C…`.
    pub fn enroll_with(&self, token: &str, capabilities: &[&str]) -> Output {
        let data = self.data.to_string_lossy().into_owned();
        let mut args = vec![
            "enroll",
            "--token",
            token,
            "--data-dir",
            &data,
            "--name",
            &self.name,
        ];
        for c in capabilities {
            args.extend(["--capability", c]);
        }
        run_bounded(
            clean_env(&mut Command::new(&bins().sidecar)).args(&args),
            CLI_TIMEOUT,
        )
    }

    /// The agent name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The state directory.
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// The temporary directory holding the state directory and the log.
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// sidecar.toml.
    pub fn config_path(&self) -> PathBuf {
        self.data.join("sidecar.toml")
    }

    /// Sets `key = value` in sidecar.toml's `section` (`""` = top level); `value` is TOML.
    pub fn set(&self, section: &str, key: &str, value: &str) {
        set_toml_key(&self.config_path(), section, key, value);
    }

    /// Sets a key of `[agent]` (mode, command, settle, verify, …); `value` is TOML.
    pub fn set_agent(&self, key: &str, value: &str) {
        self.set("agent", key, value);
    }

    /// Grants `slots` at the hub (`muster-hub agent set NAME --slots N`) and sets them
    /// in sidecar.toml: slots are granted, not claimed, so a hello claiming more is refused.
    ///
    /// # Panics
    /// When the hub refuses the grant.
    pub fn set_slots(&self, hub: &Hub, slots: u32) {
        let n = slots.to_string();
        let out = hub.cli(&["agent", "set", &self.name, "--slots", &n]);
        assert!(
            out.status.success(),
            "agent set --slots {n} failed: {}",
            stderr(&out)
        );
        self.set("", "slots", &n);
    }

    /// Launches `run` through `prefix` from now on, as [`Hub::wrap`] does.
    pub fn wrap<S: AsRef<OsStr>>(&mut self, prefix: &[S]) {
        self.daemon.wrapper = prefix.iter().map(|s| s.as_ref().to_owned()).collect();
    }

    /// Sets `key=value` in the environment of every later `run` (the agents inherit it).
    pub fn set_env(&mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) {
        let key = key.as_ref().to_owned();
        self.env.retain(|(k, _)| *k != key);
        self.env.push((key, value.as_ref().to_owned()));
    }

    /// Spawns `muster-sidecar run --data-dir D`, stderr to the log.
    pub fn start(&mut self) {
        let mut cmd = self.daemon.command(&bins().sidecar);
        cmd.args(["run", "--data-dir", &self.data.to_string_lossy()]);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        self.daemon.spawn(cmd);
    }

    /// [`Sidecar::start`], then waits until `status --json` says connected.
    pub fn start_connected(&mut self, timeout: Duration) -> Value {
        self.start();
        self.wait_connected(true, timeout)
    }

    /// Waits until `status --json` says `connected == want`.
    ///
    /// # Panics
    /// When the deadline passes or the daemon exits.
    pub fn wait_connected(&mut self, want: bool, timeout: Duration) -> Value {
        let what = format!("sidecar {} connected == {want}", self.name);
        wait_for(timeout, &what, || {
            if let Some(s) = self.daemon.exited() {
                panic!("sidecar {} exited ({s})", self.name);
            }
            match self.status_json() {
                Some(v) if v["connected"] == want => Ok(v),
                Some(v) => Err(v.to_string()),
                None => Err("status does not answer".into()),
            }
        })
    }

    /// Runs `muster-sidecar run` in the foreground and returns its output; fails
    /// the test if it runs longer than `timeout` (for startup refusals).
    pub fn run_output(&self, timeout: Duration) -> Output {
        run_bounded(
            clean_env(&mut Command::new(&bins().sidecar)).args([
                "run",
                "--data-dir",
                &self.data.to_string_lossy(),
            ]),
            timeout,
        )
    }

    /// Runs `muster-sidecar <args>` (add `--data-dir` yourself where needed).
    pub fn cli(&self, args: &[&str]) -> Output {
        run_bounded(
            clean_env(&mut Command::new(&bins().sidecar)).args(args),
            CLI_TIMEOUT,
        )
    }

    /// `muster-sidecar status --json`; `None` when the daemon does not answer.
    pub fn status_json(&self) -> Option<Value> {
        let out = self.cli(&[
            "status",
            "--json",
            "--data-dir",
            &self.data.to_string_lossy(),
        ]);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// `muster-sidecar doctor --data-dir D`.
    pub fn doctor(&self) -> Output {
        self.cli(&["doctor", "--data-dir", &self.data.to_string_lossy()])
    }

    /// The sidecar process id, if running.
    pub fn pid(&self) -> Option<u32> {
        self.daemon.pid()
    }

    /// `Some(status)` once the daemon has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.daemon.exited()
    }

    /// SIGKILL, then reap. Agent runs (own process groups) are left running.
    pub fn kill9(&mut self) {
        self.daemon.kill9();
    }

    /// SIGTERM and wait (at most [`STOP_TIMEOUT`]); returns the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        self.daemon.stop()
    }

    /// Everything the sidecar logged so far.
    pub fn log(&self) -> String {
        self.daemon.log_text()
    }

    /// Kills the process groups of the agent runs the daemon reports (exec mode).
    fn kill_agent_runs(&self) {
        if self.daemon.child.is_none() {
            return;
        }
        let Some(v) = self.status_json() else { return };
        for t in v["tasks"].as_array().into_iter().flatten() {
            if let Some(pid) = t["pid"].as_u64().filter(|p| *p > 1) {
                signal(&format!("-{pid}"), "KILL");
            }
        }
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.kill_agent_runs();
        self.daemon.kill9();
        if std::thread::panicking() {
            eprintln!(
                "----- sidecar {} log ({}) -----\n{}\n----- end of sidecar {} log -----",
                self.name,
                self.daemon.log.display(),
                tail(&self.daemon.log_text(), LOG_TAIL_BYTES),
                self.name
            );
        }
    }
}

/// Writes an executable script (mode 0755), e.g. a sample agent for exec mode.
///
/// # Panics
/// When the file cannot be written.
pub fn write_script(path: &Path, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, body).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("cannot chmod {}: {e}", path.display()));
}

// === Run log ===

/// Shell text for the top of an exec agent script (`/bin/sh`): sets `t`, `g`
/// and `a` to the task, generation and agent, appends `start TASK GEN AGENT PID`
/// to `log`, and defines `fin CODE`, which appends `end TASK GEN AGENT CODE`
/// and exits with CODE. SIGTERM (a stop) ends the run with `fin 143`.
///
/// Each line is one `printf` of a short line to a file opened with `>>`
/// (`O_APPEND`): one write, so the runs of every sidecar append whole lines
/// in one order, the order in which they happened.
pub fn run_log_prelude(log: &Path) -> String {
    let log = log.display().to_string().replace('\'', r"'\''");
    format!(
        r#"log='{log}'
t="$MUSTER_TASK_ID" g="$MUSTER_GENERATION" a="$MUSTER_AGENT"
line="start $t $g $a $$"
printf '%s\n' "$line" >> "$log"
fin() {{
  line="end $t $g $a $1"
  printf '%s\n' "$line" >> "$log"
  exit "$1"
}}
trap 'fin 143' TERM"#
    )
}

/// Appends `note TEXT` to a run log in one `O_APPEND` write, so the test's own
/// events (a kill, say) take their place in the order of the runs.
///
/// # Panics
/// When the log cannot be written.
pub fn run_log_note(log: &Path, text: &str) {
    use std::io::Write as _;
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", log.display()));
    f.write_all(format!("note {text}\n").as_bytes())
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", log.display()));
}

/// The notes of a run log (see [`run_log_note`]), each with its line number.
///
/// # Panics
/// When the log exists but cannot be read.
pub fn run_log_notes(log: &Path) -> Vec<(usize, String)> {
    let text = match std::fs::read_to_string(log) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => panic!("cannot read the run log {}: {e}", log.display()),
    };
    text.lines()
        .enumerate()
        .filter_map(|(n, l)| Some((n, l.strip_prefix("note ")?.to_owned())))
        .collect()
}

/// One agent run in a run log (see [`run_log_prelude`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedRun {
    /// The task.
    pub task: u64,
    /// The generation.
    pub generation: u64,
    /// The agent (sidecar) that ran it.
    pub agent: String,
    /// The run's pid (the script's `$$`).
    pub pid: u64,
    /// Line number of its start: the log's line order is the order of the appends.
    pub started: usize,
    /// Line number of its end and its exit code; `None` while it has not logged one.
    pub ended: Option<(usize, i64)>,
}

/// Reads a run log written through [`run_log_prelude`] (none yet: no runs). A
/// start is paired with the next end of the same task, generation and agent.
/// Lines that begin with `note ` are the test's own marks (see [`run_log_note`])
/// and are skipped here.
///
/// # Errors
/// A line that is not a start or an end, or an end without its start.
pub fn read_run_log(log: &Path) -> Result<Vec<LoggedRun>, String> {
    let text = match std::fs::read_to_string(log) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(format!("cannot read the run log {}: {e}", log.display())),
    };
    let mut runs: Vec<LoggedRun> = Vec::new();
    let mut open: std::collections::BTreeMap<(u64, u64, String), Vec<usize>> =
        std::collections::BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        if line.starts_with("note ") {
            continue;
        }
        let f: Vec<&str> = line.split(' ').collect();
        let parsed = match f.as_slice() {
            [kind @ ("start" | "end"), t, g, a, x] => match (t.parse(), g.parse(), x.parse()) {
                (Ok(t), Ok(g), Ok(x)) => Some((*kind, t, g, (*a).to_owned(), x)),
                _ => None,
            },
            _ => None,
        };
        let Some((kind, task, generation, agent, x)) = parsed else {
            return Err(format!("run log line {} is malformed: {line:?}", n + 1));
        };
        let key = (task, generation, agent.clone());
        if kind == "start" {
            open.entry(key).or_default().push(runs.len());
            runs.push(LoggedRun {
                task,
                generation,
                agent,
                pid: u64::try_from(x).unwrap_or_default(),
                started: n,
                ended: None,
            });
            continue;
        }
        let pending = open.get_mut(&key).filter(|v| !v.is_empty());
        let Some(i) = pending.map(|v| v.remove(0)) else {
            return Err(format!(
                "run log line {}: an end without a start: {line:?}",
                n + 1
            ));
        };
        runs[i].ended = Some((n, x));
    }
    Ok(runs)
}

// === Attempt histories ===

/// `task show` of every id in `ids`, over one admin session of `hub` (hundreds
/// of CLI processes would be slow): the task's JSON with its `attempt_history`.
///
/// # Panics
/// When the session cannot be opened or a task does not answer within 30 s.
pub fn task_shows(hub: &Hub, ids: &[u64]) -> std::collections::BTreeMap<u64, Value> {
    use muster_protocol::TaskId;
    use muster_protocol::msg::OpRequest;
    let connect = muster_hub::cli::ConnectArgs {
        hub: None,
        credential: None,
        data_dir: Some(hub.data_dir().to_path_buf()),
    };
    let result: Result<std::collections::BTreeMap<u64, Value>, String> = block_on(async {
        let s = connect.connect().await.map_err(|e| e.message)?;
        let mut out = std::collections::BTreeMap::new();
        for id in ids {
            let call = s.call(OpRequest::TaskShow { id: TaskId(*id) });
            let v = tokio::time::timeout(Duration::from_secs(30), call)
                .await
                .map_err(|_| format!("task show {id} did not answer within 30 s"))?
                .map_err(|e| format!("task show {id}: {}", e.message))?;
            out.insert(*id, v);
        }
        s.close().await;
        Ok(out)
    });
    result.unwrap_or_else(|e| panic!("reading the attempt histories failed: {e}"))
}
