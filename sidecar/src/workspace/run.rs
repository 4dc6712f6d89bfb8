//! Running `git` and the setup command: bounded in time and in captured
//! output, stdin closed, never prompting, and killed with every process it
//! started when the time is up or the caller gives up.
//!
//! Each command runs in a process group of its own. `git fetch` starts
//! `ssh` or `git-remote-https`, `git clone` of a local path starts
//! `git-upload-pack`, and a setup command such as `npm ci` starts many more;
//! killing only the leader would leave them running (and holding the pipes
//! open). So on a timeout, or when the future is dropped before the command
//! ended, the whole group gets SIGKILL.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use muster_protocol::limits::TAIL_BYTES_MAX;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// How long the pipes are still read after the command exited: a process it
/// left in the background (a daemon started by a setup command) may hold them
/// open for ever, and what it writes later is not the command's output.
const PIPE_GRACE: Duration = Duration::from_millis(500);

/// Most stdout kept from a git command whose output is parsed (`worktree
/// list`, `for-each-ref`); 1 MiB is about 7,000 worktrees, far beyond any
/// host's, and bounds the memory of a misbehaving command.
pub(super) const STDOUT_MAX: usize = 1 << 20;

/// Environment every git command gets, so that none can wait for a person:
/// no terminal prompt, askpass programs that answer nothing (`true` prints an
/// empty line), and ssh using askpass rather than the terminal.
const GIT_ENV: &[(&str, &str)] = &[
    ("GIT_TERMINAL_PROMPT", "0"),
    ("GIT_ASKPASS", "true"),
    ("SSH_ASKPASS", "true"),
    ("SSH_ASKPASS_REQUIRE", "force"),
];

/// Variables that would point git at another repository, index or object
/// store than the one in its argv; a sidecar started from a git hook has some.
const GIT_ENV_REMOVED: &[&str] = &[
    "GIT_DIR",
    "GIT_WORK_TREE",
    "GIT_INDEX_FILE",
    "GIT_COMMON_DIR",
    "GIT_OBJECT_DIRECTORY",
    "GIT_ALTERNATE_OBJECT_DIRECTORIES",
    "GIT_NAMESPACE",
    "GIT_PREFIX",
    "GIT_CONFIG_PARAMETERS",
];

/// Settings every git command gets on its command line: only the transports
/// of real repositories (no `ext::` or other remote helpers that run
/// commands; `file` is allowed because a task's repo may be a local path),
/// no automatic gc or maintenance inside a timed command (one killed by its
/// timeout could leave `packed-refs.lock` behind; the sweep runs `gc --auto`
/// instead), no signing prompt, and no hooks of ours to run.
const GIT_CONFIG: &[&str] = &[
    "protocol.allow=never",
    "protocol.https.allow=always",
    "protocol.http.allow=always",
    "protocol.ssh.allow=always",
    "protocol.git.allow=always",
    "protocol.file.allow=always",
    "gc.auto=0",
    "maintenance.auto=false",
    "commit.gpgSign=false",
    "core.hooksPath=/dev/null",
];

/// Which part of an output is kept.
#[derive(Debug, Clone, Copy)]
pub(super) enum Keep {
    /// The first bytes (parsed output).
    Head(usize),
    /// The last bytes (what a failure ended with).
    Tail(usize),
}

/// What a finished command left.
#[derive(Debug)]
pub(super) struct Output {
    /// How it ended.
    pub(super) status: ExitStatus,
    /// Its stdout, as [`Keep`] asked.
    pub(super) stdout: Vec<u8>,
    /// Whether stdout was longer than what was kept.
    pub(super) stdout_cut: bool,
    /// The last [`TAIL_BYTES_MAX`] bytes of its stderr.
    pub(super) stderr: Vec<u8>,
}

/// Why a command gave no [`Output`].
#[derive(Debug)]
pub(super) enum RunError {
    /// It could not be started (program missing, not executable, bad directory).
    Spawn(std::io::Error),
    /// It was still running at its deadline; its group was killed.
    TimedOut {
        /// The time it had.
        after: Duration,
        /// The last bytes of its stdout and stderr until then.
        stdout: Vec<u8>,
        /// See `stdout`.
        stderr: Vec<u8>,
    },
    /// Waiting for it failed.
    Wait(std::io::Error),
}

/// A `git` command line: `git -C <dir> -c … <args>`, with its own environment.
#[derive(Debug)]
pub(super) struct GitCmd {
    dir: PathBuf,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
}

impl GitCmd {
    /// `git <args>` run in `dir`.
    pub(super) fn new<I, S>(dir: &Path, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        GitCmd {
            dir: dir.to_owned(),
            args: args.into_iter().map(|a| a.as_ref().to_owned()).collect(),
            env: Vec::new(),
        }
    }

    /// Adds one environment variable (`GIT_INDEX_FILE` for a checkpoint's own index).
    pub(super) fn env(mut self, key: &str, value: impl AsRef<OsStr>) -> Self {
        self.env.push((key.into(), value.as_ref().to_owned()));
        self
    }

    /// The command as text for messages, e.g. `git -C /data/mirrors/x fetch --prune origin …`.
    pub(super) fn display(&self) -> String {
        let mut parts = vec!["git".to_string(), "-C".into(), quote(self.dir.as_os_str())];
        parts.extend(self.args.iter().map(|a| quote(a)));
        parts.join(" ")
    }

    /// Runs it for at most `timeout`, keeping `stdout` as asked.
    pub(super) async fn run(&self, timeout: Duration, stdout: Keep) -> Result<Output, RunError> {
        let mut cmd = Command::new("git");
        cmd.arg("-C").arg(&self.dir);
        for c in GIT_CONFIG {
            cmd.arg("-c").arg(c);
        }
        cmd.args(&self.args);
        for key in GIT_ENV_REMOVED {
            cmd.env_remove(key);
        }
        cmd.envs(GIT_ENV.iter().copied());
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        run(cmd, timeout, stdout).await
    }
}

/// Runs `cmd` with stdin closed in a process group of its own for at most
/// `timeout`; stderr keeps its last [`TAIL_BYTES_MAX`] bytes.
pub(super) async fn run(
    mut cmd: Command,
    timeout: Duration,
    stdout: Keep,
) -> Result<Output, RunError> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(RunError::Spawn)?;
    let mut group = Group(child.id());
    let mut out = Capture::new(stdout);
    let mut err = Capture::new(Keep::Tail(TAIL_BYTES_MAX));
    let deadline = Instant::now() + timeout;
    let status = pump(&mut child, &mut out, &mut err, deadline).await;
    match status {
        Ok(Some(status)) => {
            group.0 = None;
            let (stdout, stdout_cut) = out.finish();
            let (stderr, _) = err.finish();
            Ok(Output {
                status,
                stdout,
                stdout_cut,
                stderr,
            })
        }
        Ok(None) => {
            group.kill();
            // Reap the leader so it does not linger as a zombie; bounded, as
            // SIGKILL cannot be ignored.
            let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
            Err(RunError::TimedOut {
                after: timeout,
                stdout: out.finish().0,
                stderr: err.finish().0,
            })
        }
        Err(e) => Err(RunError::Wait(e)),
    }
}

/// Reads both pipes while waiting for `child`, until it exited and the pipes
/// closed (or [`PIPE_GRACE`] after it exited); `None` at the deadline.
async fn pump(
    child: &mut Child,
    out: &mut Capture,
    err: &mut Capture,
    deadline: Instant,
) -> std::io::Result<Option<ExitStatus>> {
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let mut obuf = [0u8; 8192];
    let mut ebuf = [0u8; 8192];
    let mut status = None;
    let mut until = deadline;
    loop {
        if status.is_some() && stdout.is_none() && stderr.is_none() {
            return Ok(status);
        }
        tokio::select! {
            n = read(&mut stdout, &mut obuf), if stdout.is_some() => match n {
                Some(n) => out.push(&obuf[..n]),
                None => stdout = None,
            },
            n = read(&mut stderr, &mut ebuf), if stderr.is_some() => match n {
                Some(n) => err.push(&ebuf[..n]),
                None => stderr = None,
            },
            s = child.wait(), if status.is_none() => {
                status = Some(s?);
                until = Instant::now() + PIPE_GRACE;
            }
            () = tokio::time::sleep_until(until) => return Ok(status),
        }
    }
}

/// One read from an open pipe: `None` at its end or on an error.
async fn read<R: AsyncReadExt + Unpin>(pipe: &mut Option<R>, buf: &mut [u8]) -> Option<usize> {
    match pipe.as_mut()?.read(buf).await {
        Ok(0) | Err(_) => None,
        Ok(n) => Some(n),
    }
}

/// A bounded capture of one output stream.
#[derive(Debug)]
struct Capture {
    keep: Keep,
    bytes: Vec<u8>,
    total: usize,
}

impl Capture {
    fn new(keep: Keep) -> Self {
        Capture {
            keep,
            bytes: Vec::new(),
            total: 0,
        }
    }

    fn push(&mut self, chunk: &[u8]) {
        self.total = self.total.saturating_add(chunk.len());
        match self.keep {
            Keep::Head(max) => {
                let room = max.saturating_sub(self.bytes.len());
                self.bytes
                    .extend_from_slice(&chunk[..room.min(chunk.len())]);
            }
            Keep::Tail(max) => {
                self.bytes.extend_from_slice(chunk);
                // Trim in bulk, not per chunk: at most 2 × max is held.
                if self.bytes.len() > 2 * max {
                    self.bytes.drain(..self.bytes.len() - max);
                }
            }
        }
    }

    /// The kept bytes and whether anything was dropped.
    fn finish(mut self) -> (Vec<u8>, bool) {
        if let Keep::Tail(max) = self.keep
            && self.bytes.len() > max
        {
            self.bytes.drain(..self.bytes.len() - max);
        }
        let cut = self.total > self.bytes.len();
        (self.bytes, cut)
    }
}

/// A process group to kill when dropped, unless disarmed (`.0 = None`) once
/// its leader was seen to exit. The leader is not reaped before that, so its
/// pid, which is the group's id, cannot have been reused.
struct Group(Option<u32>);

impl Group {
    fn kill(&mut self) {
        if let Some(pgid) = self.0.take() {
            kill_group(pgid);
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.kill();
    }
}

/// SIGKILL to every process of group `pgid`; ids 0 and 1 (our own group,
/// every process) are refused.
#[allow(unsafe_code)]
fn kill_group(pgid: u32) {
    let Ok(pgid) = i32::try_from(pgid) else {
        return;
    };
    if pgid > 1 {
        // SAFETY: kill(2) takes two integers and touches no memory of this
        // process; a negative pid below -1 names exactly one process group.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
    }
}

/// `bytes` as text for a message: lossy UTF-8, trimmed.
pub(super) fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).trim().to_string()
}

/// The last [`TAIL_BYTES_MAX`] bytes of `bytes` as text, starting at a character boundary.
pub(super) fn tail(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    if text.len() <= TAIL_BYTES_MAX {
        return text.into_owned();
    }
    let mut from = text.len() - TAIL_BYTES_MAX;
    while !text.is_char_boundary(from) {
        from += 1;
    }
    text[from..].to_owned()
}

/// An argument as a shell reader would need it: bare when plain, else quoted.
fn quote(arg: &OsStr) -> String {
    let s = arg.to_string_lossy();
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=+*@%,^{}".contains(c));
    if plain {
        s.into_owned()
    } else {
        format!("{s:?}")
    }
}

/// An argv as text for messages.
pub(super) fn display_argv(argv: &[String]) -> String {
    argv.iter()
        .map(|a| quote(OsStr::new(a)))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_are_bounded() {
        let mut head = Capture::new(Keep::Head(4));
        head.push(b"abcdef");
        head.push(b"gh");
        assert_eq!(head.finish(), (b"abcd".to_vec(), true));
        let mut tail = Capture::new(Keep::Tail(4));
        for chunk in [&b"abc"[..], b"defgh", b"ijklmnop", b"q"] {
            tail.push(chunk);
            assert!(tail.bytes.len() <= 8);
        }
        assert_eq!(tail.finish(), (b"nopq".to_vec(), true));
        let mut whole = Capture::new(Keep::Tail(4));
        whole.push(b"ab");
        assert_eq!(whole.finish(), (b"ab".to_vec(), false));
    }

    #[tokio::test]
    async fn a_command_past_its_deadline_is_killed_with_its_children() {
        let mut cmd = Command::new("sh");
        // The child sleeps in the background holding the pipes; both must die.
        cmd.args(["-c", "sleep 30 & echo started; wait"]);
        let started = std::time::Instant::now();
        let r = run(cmd, Duration::from_millis(300), Keep::Tail(100)).await;
        assert!(started.elapsed() < Duration::from_secs(5));
        match r {
            Err(RunError::TimedOut { stdout, .. }) => assert_eq!(text(&stdout), "started"),
            other => panic!("expected a timeout, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_background_child_holding_the_pipes_does_not_hold_the_command() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "sleep 3 & echo done; exit 3"]);
        let started = std::time::Instant::now();
        let out = run(cmd, Duration::from_secs(20), Keep::Head(100))
            .await
            .expect("ran");
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(text(&out.stdout), "done");
    }

    #[test]
    fn quoting_for_messages() {
        assert_eq!(
            display_argv(&["git".into(), "a b".into(), "+refs/*:refs/*".into()]),
            "git \"a b\" +refs/*:refs/*"
        );
    }
}
