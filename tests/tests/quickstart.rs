//! The README's "Quick start on real machines", walked literally (issue 18).
//!
//! The test reads README.md at run time, takes the lines of that section's
//! `sh` code blocks, and runs them in order with `sh -c`, one line at a time,
//! in one working directory (files such as the join tokens pass from line to
//! line; shell variables do not). Only what must differ on one machine is
//! replaced, by the explicit table [`SUBSTITUTIONS`]: the state directories
//! become temporary ones, `hub.example.net` the loopback name, port 7440 a
//! free port. A line whose comment starts with `# host only` (packages,
//! services, copying between machines) is skipped. Every other line must be a command this test
//! knows ([`step`]): an unknown one, or a line still naming a real-host path
//! or name after the substitutions, fails the test, so README and test
//! cannot drift apart.
//!
//! Lines ending in `&` (`serve`, `run`) and `watch` are started as children
//! and awaited by what they print or answer, never by sleeping; all are
//! killed when the test ends. Every other line must exit 0 within
//! [`CLI_TIMEOUT`], and its outcome is checked: the sidecar enrolls and
//! connects, `submit --wait` exits 0, `tasks` lists the task completed, and
//! `task logs` shows what the agent printed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use muster_tests::{
    CLI_TIMEOUT, FleetPermit, bins, clean_env, free_udp_port, run_bounded, stderr, stdout, tail,
    wait_for,
};

/// Generous for a loaded 2-core machine.
const DEADLINE: Duration = Duration::from_secs(30);

/// The README section this test walks.
const SECTION: &str = "## Quick start on real machines";

/// Marks a line the test does not run.
const HOST_ONLY: &str = "# host only";

/// What each real-host word becomes on loopback, applied in this order. The
/// values' `{host}`, `{port}` and `{root}` are the loopback name, the free
/// port and the test's temporary directory.
const SUBSTITUTIONS: &[(&str, &str)] = &[
    ("hub.example.net:7440", "{host}:{port}"),
    ("0.0.0.0:7440", "127.0.0.1:{port}"),
    ("hub.example.net", "{host}"),
    ("/var/lib/muster-hub", "{root}/hub"),
    ("/var/lib/muster-sidecar", "{root}/sidecar"),
];

/// Words that must not be left in a line once [`SUBSTITUTIONS`] ran: each
/// would reach beyond this machine's loopback or its temporary directory.
const FORBIDDEN_AFTER: &[&str] = &[
    "example.net",
    "/var/lib",
    "7440",
    "0.0.0.0",
    "sudo",
    "systemctl",
    "scp",
];

/// One line of the section, as written and as run.
#[derive(Debug)]
struct Line {
    /// As README.md has it (for messages).
    written: String,
    /// The command after the substitutions, without its comment and `&`.
    command: String,
    /// Ended in `&`.
    background: bool,
}

/// A command started in the background, killed and reaped when dropped; its
/// output goes to a file, printed when the test fails.
struct Background {
    child: Child,
    what: String,
    log: PathBuf,
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            eprintln!(
                "----- {} ({}) -----\n{}\n----- end -----",
                self.what,
                self.log.display(),
                tail(&text, 6000)
            );
        }
    }
}

/// Where the walk runs: the temporary root, the working directory, `$HOME`.
struct Place {
    root: PathBuf,
    work: PathBuf,
    home: PathBuf,
    path: String,
}

impl Place {
    /// `sh -c LINE` in the working directory, with the binaries under test on
    /// `PATH` and `$HOME` in the temporary directory.
    fn shell(&self, line: &str) -> Command {
        let mut cmd = Command::new("/bin/sh");
        clean_env(&mut cmd)
            .arg("-c")
            .arg(line)
            .current_dir(&self.work)
            .env("PATH", &self.path)
            .env("HOME", &self.home)
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("JOURNAL_STREAM");
        cmd
    }

    fn log(&self, name: &str) -> PathBuf {
        self.root.join(format!("{name}.log"))
    }
}

/// The `sh` lines of the section, with comments, `# host only` lines and
/// blank lines left out.
fn section_lines(readme: &str) -> Vec<String> {
    let start = readme
        .find(SECTION)
        .unwrap_or_else(|| panic!("README.md has no section {SECTION:?}"));
    let body = &readme[start + SECTION.len()..];
    let body = body.find("\n## ").map_or(body, |end| &body[..end]);
    let mut lines = Vec::new();
    let mut in_sh = false;
    for l in body.lines() {
        let t = l.trim();
        if t.starts_with("```") {
            in_sh = !in_sh && t == "```sh";
            continue;
        }
        if !in_sh || t.is_empty() || t.starts_with('#') {
            continue;
        }
        let comment = t[strip_comment(t).len()..].trim_start();
        if comment.starts_with(HOST_ONLY) {
            continue;
        }
        lines.push(t.to_string());
    }
    lines
}

/// `line` without a trailing comment: a `#` after white space, outside quotes.
fn strip_comment(line: &str) -> &str {
    let (mut single, mut double) = (false, false);
    let mut prev = ' ';
    for (i, c) in line.char_indices() {
        match c {
            '\'' if !double => single = !single,
            '"' if !single => double = !double,
            '#' if !single && !double && prev.is_whitespace() => return line[..i].trim_end(),
            _ => {}
        }
        prev = c;
    }
    line.trim_end()
}

/// One line as the test runs it, or why it cannot.
fn prepare(written: &str, host: &str, port: u16, root: &Path) -> Line {
    let mut command = strip_comment(written).to_string();
    let background = command.ends_with('&') && !command.ends_with("&&");
    if background {
        command.pop();
        command = command.trim_end().to_string();
    }
    for (from, to) in SUBSTITUTIONS {
        command = command.replace(from, to);
    }
    // Checked before the values go in: a free port or a temporary path may
    // contain a forbidden word by chance.
    for word in FORBIDDEN_AFTER {
        assert!(
            !command.contains(word),
            "README quick start line {written:?} still has {word:?} after the substitutions \
             ({command:?}): extend SUBSTITUTIONS in tests/tests/quickstart.rs, or mark the line \
             `{HOST_ONLY}` if it only makes sense on a real host"
        );
    }
    let command = command
        .replace("{host}", host)
        .replace("{port}", &port.to_string())
        .replace("{root}", &root.to_string_lossy());
    Line {
        written: written.to_string(),
        command,
        background,
    }
}

/// What the test does with a line, by its first words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    HubInit,
    HubServe,
    HubDoctor,
    TokenCreate,
    Enroll,
    /// printf, chmod, sed: files for the agent.
    File,
    SidecarRun,
    SidecarStatus,
    SidecarDoctor,
    Login,
    Agents,
    SubmitWait,
    Tasks,
    TaskShow,
    TaskLogs,
    Watch,
    Alerts,
}

/// The step a line is, judged by its program and subcommand.
///
/// # Panics
/// When the line is none the test knows: the README grew a command the test
/// does not cover.
fn step(line: &Line) -> Step {
    let words: Vec<&str> = line.command.split_whitespace().collect();
    let has = |w: &str| words.contains(&w);
    let step = match words.as_slice() {
        ["muster-hub", "init", ..] => Some(Step::HubInit),
        ["muster-hub", "serve", ..] => Some(Step::HubServe),
        ["muster-hub", "doctor", ..] => Some(Step::HubDoctor),
        ["muster-hub", "token", "create", ..] => Some(Step::TokenCreate),
        ["muster-hub", "login", ..] => Some(Step::Login),
        ["muster-hub", "agents", ..] => Some(Step::Agents),
        ["muster-hub", "submit", ..] if has("--wait") => Some(Step::SubmitWait),
        ["muster-hub", "tasks", ..] => Some(Step::Tasks),
        ["muster-hub", "task", "show", ..] => Some(Step::TaskShow),
        ["muster-hub", "task", "logs", ..] => Some(Step::TaskLogs),
        ["muster-hub", "watch", ..] => Some(Step::Watch),
        ["muster-hub", "alerts", ..] => Some(Step::Alerts),
        ["muster-sidecar", "enroll", ..] => Some(Step::Enroll),
        ["muster-sidecar", "run", ..] => Some(Step::SidecarRun),
        ["muster-sidecar", "status", ..] => Some(Step::SidecarStatus),
        ["muster-sidecar", "doctor", ..] => Some(Step::SidecarDoctor),
        ["printf" | "chmod" | "sed", ..] => Some(Step::File),
        _ => None,
    };
    let step = step.unwrap_or_else(|| {
        panic!(
            "README quick start line {:?} is a command tests/tests/quickstart.rs does not cover: \
             teach `step` what it does and how to check it, or mark it `{HOST_ONLY}`",
            line.written
        )
    });
    let daemon = matches!(step, Step::HubServe | Step::SidecarRun);
    assert_eq!(
        line.background, daemon,
        "README quick start line {:?}: a daemon line ends in `&` and no other does",
        line.written
    );
    step
}

/// The value of `--flag` in a line.
fn flag<'a>(line: &'a Line, name: &str) -> Option<&'a str> {
    let words: Vec<&str> = line.command.split_whitespace().collect();
    words
        .windows(2)
        .find(|w| w[0] == name)
        .map(|w| w[1].trim_matches(['"', '\'']))
}

/// The file a line's stdout is redirected to (`> FILE`), in the working directory.
fn redirect(line: &Line, place: &Place) -> Option<PathBuf> {
    let (_, after) = line.command.rsplit_once("> ")?;
    Some(place.work.join(after.trim()))
}

fn run(place: &Place, line: &Line) -> Output {
    let out = run_bounded(&mut place.shell(&line.command), CLI_TIMEOUT);
    assert!(
        out.status.success(),
        "README quick start line {:?} (run as {:?}) failed ({}):\nstdout: {}\nstderr: {}",
        line.written,
        line.command,
        out.status,
        stdout(&out),
        stderr(&out)
    );
    out
}

fn start(place: &Place, line: &Line, name: &str) -> Background {
    let log = place.log(name);
    let file = std::fs::File::create(&log).expect("create a log file");
    let file2 = file.try_clone().expect("clone the log file handle");
    let child = place
        .shell(&format!("exec {}", line.command))
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(file2)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {:?}: {e}", line.command));
    Background {
        child,
        what: line.command.clone(),
        log,
    }
}

/// Waits until the background command's output contains `needle`.
fn await_output(bg: &mut Background, needle: &str) -> String {
    let what = format!("{:?} to print {needle:?}", bg.what);
    wait_for(DEADLINE, &what, || {
        if let Some(s) = bg.child.try_wait().ok().flatten() {
            panic!("{:?} exited ({s})", bg.what);
        }
        let text = std::fs::read_to_string(&bg.log).unwrap_or_default();
        if text.contains(needle) {
            Ok(text)
        } else {
            Err(tail(&text, 2000).to_string())
        }
    })
}

/// The loopback name the hub is reached at: `localhost` where it resolves
/// to 127.0.0.1 first (the hub listens there only), else the address itself.
fn loopback_host(port: u16) -> &'static str {
    use std::net::ToSocketAddrs;
    let first = ("localhost", port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next());
    match first {
        Some(a) if a.ip() == std::net::Ipv4Addr::LOCALHOST => "localhost",
        _ => "127.0.0.1",
    }
}

#[test]
fn the_readme_quick_start_runs_as_written() {
    let readme_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let readme = std::fs::read_to_string(&readme_path)
        .unwrap_or_else(|e| panic!("{}: {e}", readme_path.display()));
    let _permit = FleetPermit::acquire();
    let dir = tempfile::Builder::new()
        .prefix("muster-quickstart-")
        .tempdir()
        .expect("a temporary directory");
    let bins = bins();
    let bin_dir = bins.hub.parent().expect("the binaries' directory");
    assert_eq!(Some(bin_dir), bins.sidecar.parent());
    let place = Place {
        root: dir.path().to_path_buf(),
        work: dir.path().join("work"),
        home: dir.path().join("home"),
        path: format!(
            "{}:{}",
            bin_dir.display(),
            std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into())
        ),
    };
    std::fs::create_dir_all(&place.work).expect("mkdir work");
    std::fs::create_dir_all(&place.home).expect("mkdir home");
    let port = free_udp_port();
    let host = loopback_host(port);
    let advertised = format!("{host}:{port}");

    let lines: Vec<Line> = section_lines(&readme)
        .iter()
        .map(|l| prepare(l, host, port, &place.root))
        .collect();
    let mut ran = Vec::new();
    let mut background: Vec<Background> = Vec::new();
    for line in &lines {
        let step = step(line);
        eprintln!(
            "$ {}{}",
            line.command,
            if line.background { " &" } else { "" }
        );
        ran.push(step);
        match step {
            Step::HubInit => {
                let out = run(&place, line);
                let fp = stdout(&out);
                assert!(
                    fp.trim().len() == 64 && fp.trim().chars().all(|c| c.is_ascii_hexdigit()),
                    "init prints the CA fingerprint: {fp:?}"
                );
                assert!(
                    stderr(&out).contains(&format!("join tokens will carry {advertised}")),
                    "init says what tokens carry: {}",
                    stderr(&out)
                );
            }
            Step::HubServe => {
                let mut bg = start(&place, line, "hub");
                await_output(&mut bg, "hub listening");
                background.push(bg);
            }
            Step::HubDoctor | Step::SidecarDoctor | Step::Alerts | Step::File => {
                run(&place, line);
            }
            Step::TokenCreate => {
                run(&place, line);
                let file = redirect(line, &place).expect("the token goes to a file");
                let token = std::fs::read_to_string(&file).expect("the token file");
                assert!(
                    token.starts_with(&format!("muster1/{advertised}/")),
                    "the token carries the advertised address {advertised}: {token:?}"
                );
            }
            Step::Enroll => {
                let out = run(&place, line);
                let data = flag(line, "--data-dir").expect("enroll names its --data-dir");
                assert!(
                    Path::new(data).join("sidecar.crt").is_file(),
                    "enroll wrote the certificate: {}",
                    stderr(&out)
                );
            }
            Step::SidecarRun => {
                let bg = start(&place, line, "sidecar");
                let data = flag(line, "--data-dir").expect("run names its --data-dir");
                let status = format!("muster-sidecar status --json --data-dir {data}");
                wait_for(DEADLINE, "the sidecar connected to the hub", || {
                    let out = run_bounded(&mut place.shell(&status), CLI_TIMEOUT);
                    let v: serde_json::Value =
                        serde_json::from_slice(&out.stdout).unwrap_or_default();
                    if v["connected"] == true {
                        Ok(())
                    } else {
                        Err(format!("{} {}", stdout(&out), stderr(&out)))
                    }
                });
                background.push(bg);
            }
            Step::SidecarStatus => {
                let out = stdout(&run(&place, line));
                let row: Vec<&str> = out
                    .lines()
                    .nth(1)
                    .unwrap_or_default()
                    .split_whitespace()
                    .collect();
                assert!(
                    row.first() == Some(&"build-01") && row.contains(&"connected"),
                    "status shows the agent connected: {out}"
                );
            }
            Step::Login => {
                let out = run(&place, line);
                assert!(
                    stderr(&out).contains("(submitter)"),
                    "login takes the role from the token: {}",
                    stderr(&out)
                );
                assert!(place.home.join(".config/muster/operator.toml").is_file());
            }
            Step::Agents => {
                let out = stdout(&run(&place, line));
                assert!(
                    out.contains("build-01") && out.contains("online"),
                    "agents lists the enrolled host online: {out}"
                );
            }
            Step::SubmitWait => {
                let out = run(&place, line);
                let said = format!("{}{}", stdout(&out), stderr(&out));
                assert!(said.contains("completed"), "submit --wait: {said}");
            }
            Step::Tasks => {
                let out = stdout(&run(&place, line));
                let row = out
                    .lines()
                    .find(|l| l.contains("say hello"))
                    .unwrap_or_else(|| panic!("tasks lists the task: {out}"));
                assert!(row.contains("completed"), "{out}");
            }
            Step::TaskShow => {
                let out = stdout(&run(&place, line));
                assert!(
                    out.contains("say hello") && out.contains("completed"),
                    "{out}"
                );
            }
            Step::TaskLogs => {
                let out = stdout(&run(&place, line));
                assert!(
                    out.contains("hello from build-01: say hello"),
                    "task logs shows what the agent printed: {out:?}"
                );
            }
            Step::Watch => {
                let mut bg = start(&place, line, "watch");
                await_output(&mut bg, "-> completed on build-01");
                background.push(bg);
            }
        }
    }
    // The core path was walked, not skipped as host-only.
    for must in [
        Step::HubInit,
        Step::HubServe,
        Step::TokenCreate,
        Step::Enroll,
        Step::SidecarRun,
        Step::Login,
        Step::SubmitWait,
        Step::Tasks,
        Step::TaskLogs,
    ] {
        assert!(
            ran.contains(&must),
            "the quick start has no {must:?} line that runs"
        );
    }
    drop(background);
}

#[test]
fn comments_are_cut_outside_quotes_only() {
    assert_eq!(strip_comment("a b   # note"), "a b");
    assert_eq!(
        strip_comment("printf '#!/bin/sh\\n' > f"),
        "printf '#!/bin/sh\\n' > f"
    );
    assert_eq!(strip_comment("echo \"a # b\" # c"), "echo \"a # b\"");
    assert_eq!(strip_comment("x#y"), "x#y");
}

#[test]
#[should_panic(expected = "does not cover")]
fn a_command_the_test_does_not_know_fails_it() {
    let line = prepare(
        "curl https://example.org/",
        "localhost",
        1,
        Path::new("/tmp/x"),
    );
    step(&line);
}

#[test]
#[should_panic(expected = "after the substitutions")]
fn a_real_host_path_left_after_the_substitutions_fails_it() {
    prepare(
        "muster-hub serve --data-dir /var/lib/muster/hub &",
        "localhost",
        1,
        Path::new("/tmp/x"),
    );
}

#[test]
fn host_only_lines_and_other_sections_are_left_out() {
    let readme = "## Quick start on real machines\n\n```sh\nsudo dpkg -i x.deb   # host only: packages\nmuster-hub tasks   # a comment\n```\n\n```toml\nx = 1\n```\n\n## Next\n\n```sh\nmuster-hub agents\n```\n";
    assert_eq!(section_lines(readme), ["muster-hub tasks   # a comment"]);
}
