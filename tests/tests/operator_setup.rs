//! Setting up through the real `muster-hub` binary (issue 18): `login` takes
//! the role from the token, `init --advertise` and its default decide what
//! join tokens carry, `init` warns about names other machines may not
//! resolve, and the hub's log lines carry colour codes only on a terminal
//! (`script(1)` gives it one) without `NO_COLOR`, and no timestamp of their
//! own under journald.
//!
//! Everything listens on 127.0.0.1 only: the "listens on all addresses"
//! warning is checked at `init`, which binds nothing.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use muster_protocol::client::JoinToken;
use muster_tests::{
    CLI_TIMEOUT, Hub, Sidecar, bins, clean_env, free_udp_port, run_bounded, run_bounded_input,
    stderr, stdout, tail, wait_for,
};

/// Generous for a loaded 2-core machine.
const DEADLINE: Duration = Duration::from_secs(30);

/// `muster-hub <args>` as an operator with the credential at `cred` (no admin data directory).
fn as_operator(cred: &Path, args: &[&str]) -> Output {
    run_bounded(
        clean_env(&mut Command::new(&bins().hub))
            .args(args)
            .arg("--credential")
            .arg(cred),
        CLI_TIMEOUT,
    )
}

/// `muster-hub login --token - --save-to F <args>`, the token on stdin.
fn login(token: &str, save_to: &Path, args: &[&str]) -> Output {
    let input = format!("{token}\n");
    run_bounded_input(
        clean_env(&mut Command::new(&bins().hub))
            .args(["login", "--token", "-", "--save-to"])
            .arg(save_to)
            .args(args),
        Some(input.as_bytes()),
        CLI_TIMEOUT,
    )
}

#[test]
fn login_takes_the_role_from_the_token_and_a_different_role_is_refused_without_spending_it() {
    let hub = Hub::started();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let cred = dir.path().join("alice.toml");

    // Another role than the token's: refused, and the token is still good.
    let token = hub.token("submitter");
    let out = login(&token, &cred, &["--name", "alice", "--role", "operator"]);
    assert!(
        !out.status.success(),
        "login --role operator with a submitter token succeeded"
    );
    assert!(
        stderr(&out).contains("submitter"),
        "the refusal names the token's role: {}",
        stderr(&out)
    );
    assert!(!cred.exists(), "a refused login saved a credential");

    // Without --role, the token's role.
    let out = login(&token, &cred, &["--name", "alice", "--json"]);
    assert!(out.status.success(), "login: {}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("login --json printed no JSON ({e}): {}", stdout(&out)));
    assert_eq!(v["role"], "submitter", "{v}");
    assert_eq!(v["name"], "alice", "{v}");
    assert_eq!(v["hub"], hub.addr().to_string(), "{v}");

    // The hub enrolled alice as a submitter…
    let ids = hub.json(&["identities", "--role", "submitter"]);
    let alice = ids["identities"]
        .as_array()
        .and_then(|a| a.iter().find(|i| i["name"] == "alice"))
        .unwrap_or_else(|| panic!("identities lists alice as a submitter: {ids}"));
    assert_eq!(alice["role"], "submitter", "{alice}");

    // …and the credential acts as one: it submits, it mints no tokens.
    let out = as_operator(&cred, &["submit", "--title", "from alice", "--json"]);
    assert!(
        out.status.success(),
        "a submitter submits: {}",
        stderr(&out)
    );
    let out = as_operator(&cred, &["token", "create", "--role", "agent"]);
    assert!(
        !out.status.success(),
        "a submitter created a join token: {}",
        stdout(&out)
    );
    // The token was spent by the login that succeeded.
    let again = login(
        &token,
        &dir.path().join("again.toml"),
        &["--name", "alice2"],
    );
    assert!(!again.status.success(), "a join token was used twice");
}

#[test]
fn init_advertise_is_what_tokens_carry_and_an_agent_enrolls_through_it() {
    let mut hub =
        Hub::init_with(|addr| vec!["--advertise".into(), format!("localhost:{}", addr.port())]);
    hub.start();
    let want = format!("localhost:{}", hub.addr().port());
    let token = hub.token("agent");
    let parsed: JoinToken = token.parse().expect("a join token parses");
    assert_eq!(parsed.hub, want, "{token}");
    // localhost must reach the hub's 127.0.0.1 for the enrollment below.
    use std::net::ToSocketAddrs;
    let first = want.to_socket_addrs().ok().and_then(|mut a| a.next());
    if first.is_none_or(|a| a.ip() != std::net::Ipv4Addr::LOCALHOST) {
        eprintln!(
            "localhost does not resolve to 127.0.0.1 first here; the enrollment step is left out"
        );
        return;
    }
    let mut sc = Sidecar::new("adv-01");
    let out = sc.enroll_with(&token, &[]);
    assert!(
        out.status.success(),
        "enroll through {want}: {}",
        stderr(&out)
    );
    let toml = std::fs::read_to_string(sc.config_path()).expect("sidecar.toml");
    assert!(toml.contains(&format!("hub = \"{want}\"")), "{toml}");
    sc.set("", "disk_floor_mb", "1");
    sc.set_agent("command", "[\"/bin/true\"]");
    sc.start_connected(DEADLINE);
    hub.wait_agent_state("adv-01", "online", DEADLINE);
}

#[test]
fn init_advertises_the_first_non_loopback_san_by_default() {
    let mut hub = Hub::init_with(|_| {
        [
            "--san",
            "localhost",
            "--san",
            "127.0.0.1",
            "--san",
            "hub.example.test",
            "--san",
            "second.example.test",
        ]
        .map(String::from)
        .to_vec()
    });
    let want = format!("hub.example.test:{}", hub.addr().port());
    let toml = std::fs::read_to_string(hub.config_path()).expect("hub.toml");
    assert!(toml.contains(&format!("advertise = \"{want}\"")), "{toml}");
    hub.start();
    let parsed: JoinToken = hub.token("agent").parse().expect("a join token parses");
    assert_eq!(parsed.hub, want);
}

/// `muster-hub init` of a fresh directory with these arguments.
fn init(args: &[&str]) -> Output {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let data = dir.path().join("hub");
    run_bounded(
        clean_env(&mut Command::new(&bins().hub))
            .arg("init")
            .arg("--data-dir")
            .arg(&data)
            .args(args),
        CLI_TIMEOUT,
    )
}

#[test]
fn init_warns_when_tokens_would_carry_a_bare_or_loopback_name_on_all_addresses() {
    let port = free_udp_port().to_string();
    let all = format!("0.0.0.0:{port}");
    let warned = |args: &[&str]| {
        let out = init(args);
        assert!(out.status.success(), "init {args:?}: {}", stderr(&out));
        stderr(&out)
            .lines()
            .find(|l| l.starts_with("warning:"))
            .map(str::to_owned)
    };
    let bare = warned(&[
        "--listen",
        &all,
        "--advertise",
        &format!("buildhost:{port}"),
    ])
    .expect("a bare name on all addresses warns");
    assert!(
        bare.contains("without a domain") && bare.contains("--advertise"),
        "{bare}"
    );
    let lo = warned(&[
        "--listen",
        &all,
        "--advertise",
        &format!("127.0.0.1:{port}"),
    ])
    .expect("a loopback address on all addresses warns");
    assert!(lo.contains("loopback"), "{lo}");
    let none = warned(&["--listen", &all, "--san", "hub.example.test"]);
    assert_eq!(none, None, "a name with a domain does not warn");
    // A specific listen address is what tokens carry: nothing to warn about.
    let specific = warned(&["--listen", &format!("127.0.0.1:{port}")]);
    assert_eq!(specific, None);
}

/// A hub `serve` started with its stderr in a file, `env` set and `unset`
/// removed; killed when dropped.
struct Serving {
    child: Child,
    log: std::path::PathBuf,
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            eprintln!("----- serve log -----\n{}\n-----", tail(&text, 4000));
        }
    }
}

/// Starts `serve` for `hub`'s data directory and waits for "hub listening";
/// `journal` sets `JOURNAL_STREAM` to the log file's device and inode (as
/// systemd does for a unit's journal stream) or to another file's.
fn serve_logging(hub: &Hub, name: &str, journal: Option<bool>) -> (Serving, String) {
    use std::os::unix::fs::MetadataExt;
    let log = hub.root().join(name);
    let file = std::fs::File::create(&log).expect("create the log");
    let mut cmd = Command::new(&bins().hub);
    clean_env(&mut cmd)
        .args(["serve", "--data-dir"])
        .arg(hub.data_dir())
        .env_remove("NO_COLOR")
        .env_remove("JOURNAL_STREAM")
        .env("RUST_LOG", "info");
    if let Some(matching) = journal {
        let m = if matching {
            file.metadata()
        } else {
            std::fs::metadata(hub.config_path())
        }
        .expect("metadata");
        cmd.env("JOURNAL_STREAM", format!("{}:{}", m.dev(), m.ino()));
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(file)
        .spawn()
        .expect("spawn serve");
    let mut s = Serving { child, log };
    let text = wait_for(DEADLINE, "the hub listening", || {
        if let Some(st) = s.child.try_wait().ok().flatten() {
            panic!("serve exited ({st})");
        }
        let t = std::fs::read_to_string(&s.log).unwrap_or_default();
        if t.contains("hub listening") {
            Ok(t)
        } else {
            Err(t)
        }
    });
    let _ = s.child.kill();
    let _ = s.child.wait();
    (s, text)
}

/// Whether `line` has an RFC 3339 time in it, as the log formatter writes one.
fn has_timestamp(line: &str) -> bool {
    let b = line.as_bytes();
    b.windows(16).any(|w| {
        let d = |i: usize| w[i].is_ascii_digit();
        d(0) && d(1)
            && d(2)
            && d(3)
            && w[4] == b'-'
            && d(5)
            && d(6)
            && w[7] == b'-'
            && d(8)
            && d(9)
            && w[10] == b'T'
            && d(11)
            && d(12)
            && w[13] == b':'
            && d(14)
            && d(15)
    })
}

#[test]
fn hub_logs_have_no_colour_off_a_terminal_and_no_own_timestamp_under_journald() {
    let hub = Hub::init();
    let listening = |text: &str| {
        text.lines()
            .find(|l| l.contains("hub listening"))
            .map(str::to_owned)
            .expect("a listening line")
    };

    // A file, NO_COLOR unset: plain text with our timestamp.
    let (_s, text) = serve_logging(&hub, "plain.log", None);
    assert!(!text.contains('\u{1b}'), "colour codes in a file: {text:?}");
    assert!(has_timestamp(&listening(&text)), "{text}");

    // JOURNAL_STREAM naming this very stderr: journald stamps lines, we do not.
    let (_s, text) = serve_logging(&hub, "journal.log", Some(true));
    assert!(!text.contains('\u{1b}'), "{text:?}");
    let line = listening(&text);
    assert!(
        !has_timestamp(&line),
        "a second timestamp under journald: {line}"
    );
    assert!(line.contains("INFO"), "{line}");

    // JOURNAL_STREAM inherited but stderr redirected elsewhere: stamped again.
    let (_s, text) = serve_logging(&hub, "redirected.log", Some(false));
    assert!(has_timestamp(&listening(&text)), "{text}");
}

/// The hub's log on a terminal: `serve` under `script(1)`, which gives it a
/// pseudo-terminal and copies what it prints to a file; `no_color` sets
/// `NO_COLOR=1`. Returns the output up to "hub listening".
fn serve_on_a_terminal(hub: &Hub, name: &str, no_color: bool) -> String {
    let log = hub.root().join(name);
    let file = std::fs::File::create(&log).expect("create the log");
    let inner = format!(
        "exec '{}' serve --data-dir '{}'",
        bins().hub.display(),
        hub.data_dir().display()
    );
    let mut cmd = Command::new("script");
    clean_env(&mut cmd)
        .args(["-q", "-f", "-e", "-c", &inner, "/dev/null"])
        .env_remove("NO_COLOR")
        .env_remove("JOURNAL_STREAM")
        .env("RUST_LOG", "info");
    if no_color {
        cmd.env("NO_COLOR", "1");
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn script");
    let mut s = Serving { child, log };
    let text = wait_for(DEADLINE, "the hub listening on a terminal", || {
        if let Some(st) = s.child.try_wait().ok().flatten() {
            panic!("script exited ({st})");
        }
        let t = std::fs::read_to_string(&s.log).unwrap_or_default();
        if t.contains("hub listening") {
            Ok(t)
        } else {
            Err(t)
        }
    });
    // The hub runs in a session of its own under script: stop it by its pid.
    let id = s.child.id();
    let hub_pid = std::fs::read_to_string(format!("/proc/{id}/task/{id}/children"))
        .ok()
        .and_then(|c| c.split_whitespace().next().map(str::to_owned));
    if let Some(pid) = hub_pid {
        let _ = Command::new("kill").args(["-KILL", &pid]).status();
    }
    drop(s);
    text
}

#[test]
fn hub_logs_are_coloured_on_a_terminal_unless_no_color() {
    if !muster_tests::tool_available(
        Command::new("script").arg("--version"),
        "script(1) gives the hub a terminal (util-linux)",
    ) {
        return;
    }
    let hub = Hub::init();
    let text = serve_on_a_terminal(&hub, "tty.log", false);
    assert!(
        text.contains("\u{1b}["),
        "no colour on a terminal: {text:?}"
    );
    let text = serve_on_a_terminal(&hub, "tty-no-color.log", true);
    assert!(
        !text.contains('\u{1b}'),
        "colour despite NO_COLOR: {text:?}"
    );
}
