//! Join tokens: read from a file or stdin so they never show in `ps`, and not
//! spent by an `enroll` that could not have finished.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use muster_tests::{Hub, Sidecar, bins, run_bounded, stderr, wait_until};

/// How long a CLI call may run.
const CLI: Duration = Duration::from_secs(30);
/// How long a fresh sidecar may take to connect.
const CONNECT: Duration = Duration::from_secs(20);

/// Writes `token` into a new 0600 file at `path`.
fn token_file(path: &Path, token: &str) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .expect("token file");
    writeln!(f, "{token}").expect("write token");
}

/// The command line of process `pid`, as `ps` would show it.
fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

#[test]
fn enroll_and_login_take_the_token_from_a_file_or_stdin_never_argv() {
    let mut hub = Hub::init();
    hub.start();

    // --token-file: enrolls, and the sidecar then connects.
    let mut by_file = Sidecar::new("byfile");
    let path = by_file.root().join("join-token");
    let token = hub.token("agent");
    token_file(&path, &token);
    let out = by_file.enroll_args(&["--token-file", &path.to_string_lossy()], None);
    assert!(
        out.status.success(),
        "enroll --token-file: {}",
        stderr(&out)
    );
    assert!(!stderr(&out).contains(&token), "enroll printed the token");
    by_file.set("", "disk_floor_mb", "1");
    by_file.set_agent("command", "[\"/bin/true\"]");
    by_file.start_connected(CONNECT);

    // --token -: while enroll waits for stdin, its argv holds no token.
    let by_stdin = Sidecar::new("bystdin");
    let token = hub.token("agent");
    let mut child = Command::new(&bins().sidecar)
        .args(["enroll", "--token", "-", "--name", "bystdin", "--data-dir"])
        .arg(by_stdin.data_dir())
        .env_remove("MUSTER_SOCKET")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn enroll");
    let argv = wait_until(Duration::from_secs(5), "enroll's /proc cmdline", || {
        Some(cmdline(child.id())).filter(|c| c.contains("enroll"))
    });
    assert!(
        !argv.contains(&token),
        "the token is in enroll's argv: {argv}"
    );
    let mut stdin = child.stdin.take().expect("stdin");
    writeln!(stdin, "{token}").expect("write the token");
    drop(stdin);
    let deadline = std::time::Instant::now() + CLI;
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("enroll --token - still running after {CLI:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    let _ = std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err);
    assert!(status.success(), "enroll --token -: {err}");
    assert!(by_stdin.data_dir().join("sidecar.crt").exists(), "enrolled");

    // Exactly one source, or a clear usage error.
    let none = Sidecar::new("nosource");
    let out = none.enroll_args(&[], None);
    assert_eq!(out.status.code(), Some(2), "no token: {}", stderr(&out));
    assert!(stderr(&out).contains("--token-file"), "{}", stderr(&out));
    let out = none.enroll_args(&["--token", "x", "--token-file", "/nonexistent"], None);
    assert_eq!(out.status.code(), Some(2), "two sources: {}", stderr(&out));
    assert!(stderr(&out).contains("not both"), "{}", stderr(&out));

    // muster-hub login takes its token the same way.
    let op_token = hub.token("operator");
    let saved = by_file.root().join("operator.toml");
    let out = run_bounded(
        Command::new(&bins().hub)
            .args(["login", "--token", "-", "--name", "opstdin", "--save-to"])
            .arg(&saved)
            .stdin(Stdio::null()),
        CLI,
    );
    assert!(!out.status.success(), "login with an empty stdin must fail");
    let op_file = by_file.root().join("op-token");
    token_file(&op_file, &op_token);
    let out = run_bounded(
        Command::new(&bins().hub)
            .args(["login", "--token-file"])
            .arg(&op_file)
            .args(["--name", "opfile", "--save-to"])
            .arg(&saved),
        CLI,
    );
    assert!(out.status.success(), "login --token-file: {}", stderr(&out));
    assert!(saved.exists(), "credential saved");
}

#[test]
fn enroll_checks_the_state_directory_before_spending_the_token() {
    let mut hub = Hub::init();
    hub.start();
    let sc = Sidecar::new("careful");
    let token = hub.token("agent");
    let data = sc.data_dir().to_path_buf();

    // The state directory cannot be made: a file is in its place.
    std::fs::write(&data, b"not a directory").expect("blocker");
    let out = sc.enroll_args(&["--token", "-"], Some(&token));
    assert!(!out.status.success(), "enroll into a file must fail");
    assert!(
        stderr(&out).contains("token was not used"),
        "{}",
        stderr(&out)
    );
    std::fs::remove_file(&data).expect("remove blocker");

    // A key is already where the new one would go.
    std::fs::create_dir(&data).expect("state dir");
    std::fs::write(data.join("sidecar.key"), b"old").expect("old key");
    std::fs::set_permissions(
        data.join("sidecar.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .expect("chmod");
    let out = sc.enroll_args(&["--token", "-"], Some(&token));
    assert!(
        !out.status.success(),
        "enroll over an existing key must fail"
    );
    assert!(stderr(&out).contains("already exists"), "{}", stderr(&out));
    std::fs::remove_file(data.join("sidecar.key")).expect("remove old key");

    // Not writable (only observable when not root, which writes anyway).
    let uid = std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m));
    if uid.is_ok_and(|u| u != 0) {
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o500)).expect("chmod");
        let out = sc.enroll_args(&["--token", "-"], Some(&token));
        assert!(
            !out.status.success(),
            "enroll into a read-only directory must fail"
        );
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o750)).expect("chmod");
    }

    // Fixed: the very same token still enrolls.
    let out = sc.enroll_args(&["--token", "-"], Some(&token));
    assert!(
        out.status.success(),
        "the unspent token enrolls: {}",
        stderr(&out)
    );
    assert!(data.join("sidecar.crt").exists(), "enrolled");
}
