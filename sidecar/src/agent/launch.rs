//! What every agent command shares: the run directory and its files, the
//! `MUSTER_*` environment, command resolution, exit statuses and output tails.
//!
//! Everything here that touches the disk is blocking and small; callers run
//! it on the blocking pool.

use std::ffi::OsString;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use muster_protocol::limits::TAIL_BYTES_MAX;
use muster_protocol::msg::Failure;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;

use super::template::Vars;
use super::{AgentConfig, RunSpec, Workdir};
use crate::config::Stdin;

/// The supervisor's hand-off to the sidecar, which is not the agent's: an agent
/// that inherited `NOTIFY_SOCKET` could confuse systemd, and the credentials are ours.
pub(super) const SUPERVISOR_VARS: [&str; 6] = [
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "CREDENTIALS_DIRECTORY",
    "LISTEN_FDS",
    "LISTEN_PID",
];

/// Largest status file read back; it holds one decimal number.
const STATUS_BYTES_MAX: u64 = 64;
/// An empty exit-status record: the exec wrapper overwrites these four bytes with
/// `printf '%-3s\n'` (statuses are 0–255), so the record is never truncated.
const STATUS_BLANK: &[u8] = b"   \n";

/// Largest run handle record read back (a few hundred bytes of JSON).
pub(super) const HANDLE_BYTES_MAX: u64 = 16 * 1024;

/// Highest signal number a shell reports as `128 + N`.
const SIGNAL_NUMBER_MAX: i32 = 64;

/// How much of the health command's stderr is kept for the error message.
const HEALTH_STDERR_BYTES_MAX: usize = 1024;

/// Used when `PATH` is unset, as the shell would.
const PATH_DEFAULT: &str = "/usr/local/bin:/usr/bin:/bin";

/// The contents of `task.json`.
#[derive(Serialize)]
struct TaskFile<'a> {
    id: u64,
    generation: u64,
    title: &'a str,
    description: &'a str,
    capabilities: &'a [String],
    priority: i32,
    /// The attempt's secret, as in `MUSTER_TASK_TOKEN`; the file is 0600.
    token: &'a str,
    repo: Option<&'a str>,
    base: Option<&'a str>,
    branch: Option<&'a str>,
    workspace: &'a Path,
    /// The sidecar's local socket, for `muster-sidecar task --task-file`.
    socket: &'a Path,
}

/// The prompt file's name in the run directory (`MUSTER_PROMPT_FILE`).
pub(super) const PROMPT_FILE: &str = "prompt.md";

/// One run to prepare and spawn: the reaper creates `run_dir` with
/// `task.json` and a blank status record, resolves `argv[0]` on its `PATH`,
/// and sends `stdout` and `stderr` to files in `run_dir`. The environment is
/// the reaper's (the sidecar's at its start, less the supervisor's variables)
/// plus `env`. Text only: a path that is not UTF-8 makes the run use the wrapper.
#[derive(Serialize, serde::Deserialize, Debug, Clone)]
pub(super) struct Request {
    pub(super) argv: Vec<String>,
    pub(super) env: Vec<(String, String)>,
    pub(super) cwd: String,
    pub(super) run_dir: String,
    pub(super) task_json: String,
    /// The prompt file's text.
    #[serde(default)]
    pub(super) prompt: String,
    /// Standard input is the prompt file (`stdin = "prompt"`), else `/dev/null`.
    #[serde(default)]
    pub(super) stdin_prompt: bool,
}

/// The files and environment of one attempt.
pub(super) struct Launch {
    run_dir: PathBuf,
    work_dir: PathBuf,
    env: Vec<(String, OsString)>,
    /// `task.json` and the prompt, or why they cannot be made.
    files: Result<(Vec<u8>, String), String>,
    /// The placeholders of this attempt's commands.
    vars: Vars,
    /// The agent command's standard input is the prompt file.
    stdin_prompt: bool,
}

impl Launch {
    pub(super) fn new(run: &RunSpec, work: &Workdir, stdin: Stdin) -> Self {
        let task_file = run.run_dir.join("task.json");
        let prompt_file = run.run_dir.join(PROMPT_FILE);
        let task_json = serde_json::to_vec_pretty(&TaskFile {
            id: run.task.0,
            generation: run.generation.0,
            title: &run.spec.title,
            description: &run.spec.description,
            capabilities: &run.spec.capabilities,
            priority: run.spec.priority,
            token: &run.token,
            repo: run.spec.repo.as_deref(),
            base: run.spec.base.as_deref(),
            branch: work.branch.as_deref(),
            workspace: &work.dir,
            socket: &run.socket,
        })
        .map_err(|e| format!("could not encode task.json: {e}"));
        // The hub checked the environment; so does this side, which trusts no peer.
        let files = muster_protocol::work::check_env(&run.spec.env)
            .map_err(|e| format!("the task's environment was refused: {e}"))
            .and_then(|()| Ok((task_json?, prompt(&run.spec.title, &run.spec.description))));
        let mut env: Vec<(String, OsString)> = run
            .spec
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.into()))
            .collect();
        let ours: [(&str, OsString); 8] = [
            ("MUSTER_TASK_ID", run.task.0.to_string().into()),
            ("MUSTER_GENERATION", run.generation.0.to_string().into()),
            ("MUSTER_AGENT", run.agent.as_str().into()),
            ("MUSTER_TASK_FILE", task_file.into_os_string()),
            ("MUSTER_SOCKET", run.socket.clone().into_os_string()),
            ("MUSTER_TASK_TOKEN", run.token.clone().into()),
            ("MUSTER_WORKSPACE", work.dir.clone().into_os_string()),
            ("MUSTER_PROMPT_FILE", prompt_file.clone().into_os_string()),
        ];
        env.extend(ours.into_iter().map(|(k, v)| (k.to_owned(), v)));
        if let Some(branch) = &work.branch {
            env.push(("MUSTER_BRANCH".into(), branch.into()));
        }
        if let Some(base) = &work.base {
            env.push(("MUSTER_BASE".into(), base.into()));
        }
        let vars = Vars {
            task_id: run.task.0.to_string(),
            generation: run.generation.0.to_string(),
            workspace: work.dir.to_string_lossy().into_owned(),
            prompt_file: prompt_file.to_string_lossy().into_owned(),
            task_file: run.run_dir.join("task.json").to_string_lossy().into_owned(),
        };
        Self {
            run_dir: run.run_dir.clone(),
            work_dir: work.dir.clone(),
            env,
            files,
            vars,
            stdin_prompt: stdin == Stdin::Prompt,
        }
    }

    /// `argv` with this attempt's placeholders filled in.
    pub(super) fn argv(&self, argv: &[String]) -> Vec<String> {
        self.vars.expand_all(argv)
    }

    /// `text` with this attempt's placeholders filled in.
    pub(super) fn expand(&self, text: &str) -> String {
        self.vars.expand(text)
    }

    /// Standard input for the agent command: the prompt file or nothing. Blocking.
    pub(super) fn agent_stdin(&self) -> Result<Stdio, String> {
        agent_stdin(&self.run_dir, self.stdin_prompt)
    }

    pub(super) fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    pub(super) fn status_path(&self) -> PathBuf {
        self.run_dir.join("status")
    }

    /// Creates the run and work directories and writes `task.json` (0600). Blocking.
    pub(super) fn prepare(&self) -> Result<(), String> {
        let (json, prompt) = self.files.as_ref().map_err(Clone::clone)?;
        prepare_dirs(&self.run_dir, &self.work_dir, json, prompt)
    }

    /// [`prepare_exec`] for this run. Blocking.
    pub(super) fn prepare_exec(&self, argv: &[String]) -> Result<PathBuf, String> {
        let (json, prompt) = self.files.as_ref().map_err(Clone::clone)?;
        prepare_exec(&self.run_dir, &self.work_dir, json, prompt, argv)
    }

    /// Records the run's handle in its directory, in place. Not synced: it
    /// only has to outlive a crash of the sidecar process, and a crash of the
    /// machine ends the run with it. Blocking.
    pub(super) fn write_handle(&self, handle: &super::RunHandle) -> Result<(), String> {
        write_handle(&self.run_dir, handle)
    }

    /// Fresh `stdout` and `stderr` files in the run directory (0600). Blocking.
    pub(super) fn output(&self) -> Result<(Stdio, Stdio), String> {
        output(&self.run_dir)
    }

    /// A command with the `MUSTER_*` environment and working directory, stdin
    /// closed, output discarded, in its own process group.
    pub(super) fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        for var in SUPERVISOR_VARS {
            cmd.env_remove(var);
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&self.work_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        cmd
    }

    /// What the reaper needs to prepare and spawn this run of `argv`; `None`
    /// when a path or variable is not UTF-8, which the reaper's JSON cannot
    /// carry, or `task.json` could not be made (the local path reports why).
    pub(super) fn reaper_request(&self, argv: &[String]) -> Option<Request> {
        let env = self
            .env
            .iter()
            .map(|(k, v)| Some((k.clone(), v.to_str()?.to_owned())))
            .collect::<Option<Vec<_>>>()?;
        let (json, prompt) = self.files.as_ref().ok()?;
        let task_json = String::from_utf8(json.clone()).ok()?;
        Some(Request {
            argv: argv.to_vec(),
            env,
            cwd: self.work_dir.to_str()?.to_owned(),
            run_dir: self.run_dir.to_str()?.to_owned(),
            task_json,
            prompt: prompt.clone(),
            stdin_prompt: self.stdin_prompt,
        })
    }

    /// The last bytes of the run's stdout and stderr. Blocking.
    pub(super) fn tails(&self) -> (String, String) {
        (
            tail(&self.run_dir.join("stdout")),
            tail(&self.run_dir.join("stderr")),
        )
    }

    /// The exit status the exec wrapper recorded, if any. Blocking.
    pub(super) fn recorded_status(&self) -> Option<i32> {
        let mut text = String::new();
        File::open(self.status_path())
            .ok()?
            .take(STATUS_BYTES_MAX)
            .read_to_string(&mut text)
            .ok()?;
        text.trim().parse().ok()
    }

    /// A [`Failure`] for `command` with this run's tails. Blocking.
    pub(super) fn failure(
        &self,
        reason: String,
        exit: Option<Exit>,
        command: &[String],
    ) -> Failure {
        let (stdout_tail, stderr_tail) = self.tails();
        Failure {
            reason,
            exit_code: match exit {
                Some(Exit::Code(code)) => Some(code),
                _ => None,
            },
            signal: match exit {
                Some(Exit::Signal(signal)) => Some(signal),
                _ => None,
            },
            command: command.to_vec(),
            stdout_tail,
            stderr_tail,
            no_retry: false,
        }
    }
}

/// Writes `bytes` over the file's start and cuts it to that length. Unlike a
/// truncate-and-write, this reuses the file's block: on ext4 that is about 10 µs
/// against 0.3 ms.
/// Everything an exec run needs before its spawn: the directories, `task.json`,
/// a blank status record; returns the program resolved. Blocking. The reaper
/// runs this too, so a run it spawns is prepared in one place.
pub(super) fn prepare_exec(
    run_dir: &Path,
    work_dir: &Path,
    task_json: &[u8],
    prompt: &str,
    argv: &[String],
) -> Result<PathBuf, String> {
    let program = argv
        .first()
        .ok_or_else(|| "the agent command is empty".to_owned())?;
    prepare_dirs(run_dir, work_dir, task_json, prompt)?;
    let resolved = resolve(program).map_err(|e| format!("could not start `{program}`: {e}"))?;
    // Also in "waited" mode: a reused run directory may hold an earlier run's record.
    clear_status(run_dir)?;
    Ok(resolved)
}

fn prepare_dirs(
    run_dir: &Path,
    work_dir: &Path,
    task_json: &[u8],
    prompt: &str,
) -> Result<(), String> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(run_dir)
        .map_err(|e| {
            format!(
                "could not create the run directory {}: {e}",
                run_dir.display()
            )
        })?;
    std::fs::create_dir_all(work_dir).map_err(|e| {
        format!(
            "could not create the working directory {}: {e}",
            work_dir.display()
        )
    })?;
    let path = run_dir.join("task.json");
    // It holds the attempt's token: 0600 even in a reused directory.
    overwrite_private(&path, task_json)
        .and_then(|()| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)))
        .map_err(|e| format!("could not write {}: {e}", path.display()))?;
    let path = run_dir.join(PROMPT_FILE);
    overwrite_private(&path, prompt.as_bytes())
        .map_err(|e| format!("could not write {}: {e}", path.display()))
}

/// The prompt file's text: the title, a blank line, the description.
fn prompt(title: &str, description: &str) -> String {
    if description.is_empty() {
        format!("{title}\n")
    } else {
        format!("{title}\n\n{description}\n")
    }
}

/// The agent command's standard input: the prompt file, or `/dev/null`. Blocking.
pub(super) fn agent_stdin(run_dir: &Path, prompt: bool) -> Result<Stdio, String> {
    if !prompt {
        return Ok(Stdio::null());
    }
    let path = run_dir.join(PROMPT_FILE);
    File::open(&path).map(Stdio::from).map_err(|e| {
        format!(
            "could not open the prompt file {} for stdin: {e}",
            path.display()
        )
    })
}

fn clear_status(run_dir: &Path) -> Result<(), String> {
    let path = run_dir.join("status");
    overwrite_private(&path, STATUS_BLANK)
        .map_err(|e| format!("could not clear {}: {e}", path.display()))
}

/// Writes `handle` into `run_dir`, in place; see [`Launch::write_handle`]. Blocking.
pub(super) fn write_handle(run_dir: &Path, handle: &super::RunHandle) -> Result<(), String> {
    let path = run_dir.join(super::HANDLE_FILE);
    let json = serde_json::to_vec(handle).map_err(|e| format!("encode the run handle: {e}"))?;
    overwrite_private(&path, &json).map_err(|e| format!("could not write {}: {e}", path.display()))
}

/// Fresh `stdout` and `stderr` files in `run_dir` (0600). Blocking.
pub(super) fn output(run_dir: &Path) -> Result<(Stdio, Stdio), String> {
    let open = |name: &str| {
        let path = run_dir.join(name);
        create_private(&path)
            .map(Stdio::from)
            .map_err(|e| format!("could not create {}: {e}", path.display()))
    };
    Ok((open("stdout")?, open("stderr")?))
}

/// The exit-status record for a shell-style `code`, as the wrapper writes it.
pub(super) fn status_record(code: i32) -> Vec<u8> {
    format!("{code:<3}\n").into_bytes()
}

/// Writes `bytes` over the file at `path` (0600), reusing its blocks.
pub(super) fn overwrite_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.set_len(bytes.len() as u64)
}

fn create_private(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Exit {
    /// It exited with this code.
    Code(i32),
    /// A signal ended it.
    Signal(i32),
}

impl Exit {
    /// From a status reported through `sh`, which turns "killed by signal N"
    /// into exit code `128 + N`; codes in that range are read as signals.
    pub(super) fn from_shell_code(code: i32) -> Self {
        if (129..=128 + SIGNAL_NUMBER_MAX).contains(&code) {
            Exit::Signal(code - 128)
        } else {
            Exit::Code(code)
        }
    }

    /// From the status of the wrapper shell itself.
    pub(super) fn from_wrapper(status: ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(code), _) => Exit::from_shell_code(code),
            (None, Some(signal)) => Exit::Signal(signal),
            // Stopped or continued statuses never come out of wait for a child we do not trace.
            (None, None) => Exit::Code(-1),
        }
    }

    /// From the status of a command run directly (no shell in between).
    pub(super) fn from_direct(status: ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(code), _) => Exit::Code(code),
            (None, Some(signal)) => Exit::Signal(signal),
            (None, None) => Exit::Code(-1),
        }
    }

    pub(super) fn success(self) -> bool {
        self == Exit::Code(0)
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Exit::Code(code) => write!(f, "exit status {code}"),
            Exit::Signal(signal) => match signal_name(signal) {
                Some(name) => write!(f, "killed by signal {signal} ({name})"),
                None => write!(f, "killed by signal {signal}"),
            },
        }
    }
}

fn signal_name(signal: i32) -> Option<&'static str> {
    const NAMES: [(i32, &str); 14] = [
        (libc::SIGHUP, "SIGHUP"),
        (libc::SIGINT, "SIGINT"),
        (libc::SIGQUIT, "SIGQUIT"),
        (libc::SIGILL, "SIGILL"),
        (libc::SIGTRAP, "SIGTRAP"),
        (libc::SIGABRT, "SIGABRT"),
        (libc::SIGBUS, "SIGBUS"),
        (libc::SIGFPE, "SIGFPE"),
        (libc::SIGKILL, "SIGKILL"),
        (libc::SIGUSR1, "SIGUSR1"),
        (libc::SIGSEGV, "SIGSEGV"),
        (libc::SIGUSR2, "SIGUSR2"),
        (libc::SIGPIPE, "SIGPIPE"),
        (libc::SIGTERM, "SIGTERM"),
    ];
    NAMES
        .iter()
        .find(|(n, _)| *n == signal)
        .map(|(_, name)| *name)
}

/// The last [`TAIL_BYTES_MAX`] bytes of a file as text, starting at a UTF-8
/// boundary; invalid bytes become U+FFFD. Empty if the file cannot be read.
pub(super) fn tail(path: &Path) -> String {
    let Ok(mut file) = File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(TAIL_BYTES_MAX as u64);
    let mut bytes = Vec::with_capacity(TAIL_BYTES_MAX.min(len as usize));
    if file.seek(SeekFrom::Start(start)).is_err()
        || file
            .take(TAIL_BYTES_MAX as u64)
            .read_to_end(&mut bytes)
            .is_err()
    {
        return String::new();
    }
    tail_text(&bytes, start > 0)
}

/// `bytes` as text of at most [`TAIL_BYTES_MAX`] bytes, keeping the end.
pub(super) fn tail_text(bytes: &[u8], cut: bool) -> String {
    let bytes = &bytes[bytes.len().saturating_sub(TAIL_BYTES_MAX)..];
    // Skip the continuation bytes of a character cut by the window (at most 3).
    let skip = if cut || bytes.len() == TAIL_BYTES_MAX {
        bytes
            .iter()
            .take(3)
            .take_while(|b| (**b & 0xC0) == 0x80)
            .count()
    } else {
        0
    };
    let text = String::from_utf8_lossy(&bytes[skip..]);
    if text.len() <= TAIL_BYTES_MAX {
        return text.into_owned();
    }
    // Replacement characters are 3 bytes each: trim the front again.
    let mut from = text.len() - TAIL_BYTES_MAX;
    while !text.is_char_boundary(from) {
        from += 1;
    }
    text[from..].to_owned()
}

/// Where `program` resolves: itself when it contains '/', else the first
/// executable match in `PATH`. Blocking.
///
/// # Errors
/// A fragment such as "not found in PATH (…): No such file or directory (os error 2)".
pub(super) fn resolve(program: &str) -> Result<PathBuf, String> {
    if program.is_empty() {
        return Err("the program name is empty".into());
    }
    if program.contains('/') {
        let path = PathBuf::from(program);
        return executable(&path).map(|()| path).map_err(|e| e.to_string());
    }
    let search = std::env::var_os("PATH").unwrap_or_else(|| PATH_DEFAULT.into());
    let mut denied = None;
    for dir in std::env::split_paths(&search) {
        let candidate = dir.join(program);
        match executable(&candidate) {
            Ok(()) => return Ok(candidate),
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => denied = Some(candidate),
            Err(_) => {}
        }
    }
    let search = search.to_string_lossy();
    match denied {
        Some(path) => Err(format!(
            "{} is not executable: {}",
            path.display(),
            io::Error::from_raw_os_error(libc::EACCES)
        )),
        None => Err(format!(
            "not found in PATH ({search}): {}",
            io::Error::from_raw_os_error(libc::ENOENT)
        )),
    }
}

/// Ok if `path` is a regular file with an execute bit set.
fn executable(path: &Path) -> io::Result<()> {
    let meta = std::fs::metadata(path)?;
    if meta.is_dir() {
        return Err(io::Error::from_raw_os_error(libc::EISDIR));
    }
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        return Err(io::Error::from_raw_os_error(libc::EACCES));
    }
    Ok(())
}

/// Reads `reader` to its end, keeping only the last `max` bytes.
pub(super) async fn read_tail<R: AsyncRead + Unpin>(mut reader: R, max: usize) -> Vec<u8> {
    let mut kept = Vec::with_capacity(max.min(4096));
    let mut buf = [0u8; 4096];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                kept.extend_from_slice(&buf[..n]);
                if kept.len() > 2 * max {
                    kept.drain(..kept.len() - max);
                }
            }
        }
    }
    let from = kept.len().saturating_sub(max);
    kept.split_off(from)
}

/// See [`super::run_health`].
pub(super) async fn run_health(config: &AgentConfig, limit: Duration) -> Result<(), String> {
    let Some((program, args)) = config.health_command.split_first() else {
        return Ok(());
    };
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(dir) = &config.working_dir {
        cmd.current_dir(dir);
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("the health command `{program}` could not start: {e}"))?;
    let stderr = child.stderr.take();
    let run = async {
        let tail = match stderr {
            Some(stderr) => read_tail(stderr, HEALTH_STDERR_BYTES_MAX).await,
            None => Vec::new(),
        };
        (child.wait().await, tail)
    };
    // On timeout the child is dropped, and kill_on_drop ends it.
    let Ok((status, tail)) = tokio::time::timeout(limit, run).await else {
        return Err(format!(
            "the health command `{program}` did not finish within {limit:?}"
        ));
    };
    let status = status
        .map_err(|e| format!("the health command `{program}` could not be waited for: {e}"))?;
    let exit = Exit::from_direct(status);
    if exit.success() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&tail);
    match text.lines().rev().find(|l| !l.trim().is_empty()) {
        Some(line) => Err(format!(
            "the health command `{program}` failed: {exit}: {}",
            line.trim()
        )),
        None => Err(format!("the health command `{program}` failed: {exit}")),
    }
}
