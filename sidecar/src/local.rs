//! The local Unix socket (mode 0660 in the state directory) through which the
//! agent talks to its sidecar, and `status` asks the running daemon.
//!
//! One JSON request line, one JSON answer line, then the connection closes.
//! Agent requests carry their attempt (task, generation) and its task token
//! (`MUSTER_TASK_TOKEN`, see [`crate::tasktoken`]); the daemon refuses any
//! that do not match. `status` and `whoami` need no token: they reveal no
//! secret. At most [`CONNECTIONS_MAX`] connections are served at once, each
//! must send its request within [`REQUEST_DEADLINE`], and a failing `accept`
//! (say, out of file descriptors) pauses the loop instead of spinning.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::{Instant, timeout};
use tracing::warn;

use crate::core::AgentCmd;

/// The socket's file name in the state directory.
pub const SOCKET_FILE: &str = "muster.sock";
/// Longest request line accepted: a result is at most 256 KiB.
const REQUEST_BYTES_MAX: u64 = 512 * 1024;
/// How long a client waits for the daemon: an agent's `complete` in a git
/// workspace waits for its tree to be checkpointed first.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);
/// Connections served at once. Each holds a task, a socket and at most
/// [`REQUEST_BYTES_MAX`] of buffer, so the bound caps memory at about 32 MiB
/// in the worst case; a sidecar's agents need a handful at a time.
pub const CONNECTIONS_MAX: usize = 64;
/// How long a client has to send its request line; a connection that sends
/// nothing is closed after this, so idle connections cannot hold the slots.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// How long a connection waits for the daemon's answer (the client gives up
/// after [`CLIENT_TIMEOUT`] anyway).
const ANSWER_DEADLINE: Duration = CLIENT_TIMEOUT;
/// How long writing the answer may take.
const WRITE_DEADLINE: Duration = Duration::from_secs(5);
/// Pause after a failed `accept` (EMFILE, ENFILE, ENOMEM): the error usually
/// persists for a while, and retrying at once would spin a core.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
/// At most one log line per this interval for failing `accept`s.
const ACCEPT_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// What a connection beyond [`CONNECTIONS_MAX`] is told before it is closed.
const BUSY_ANSWER: &[u8] =
    b"{\"ok\":false,\"message\":\"the sidecar is busy: too many local connections at once; try again\",\"data\":null}\n";

/// A request on the socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Request {
    /// An agent command about its attempt.
    Agent(AgentRequest),
    /// Anything else: `{"cmd":"status"}` or `{"cmd":"whoami"}`.
    Query {
        /// `status` or `whoami`.
        cmd: String,
    },
}

/// The queries that need no task token.
const QUERIES: [&str; 2] = ["status", "whoami"];

impl Request {
    /// Parses a request line, with an error that says what was wrong.
    ///
    /// # Errors
    /// A sentence naming the problem (not JSON, no `cmd`, unknown command, bad field).
    pub fn parse(line: &str) -> Result<Request, String> {
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| format!("malformed request (not JSON): {e}"))?;
        let Some(cmd) = value.get("cmd").and_then(|c| c.as_str()) else {
            return Err("malformed request: no \"cmd\" string".into());
        };
        if QUERIES.contains(&cmd) {
            return Ok(Request::Query {
                cmd: cmd.to_owned(),
            });
        }
        serde_json::from_value::<AgentRequest>(value)
            .map(Request::Agent)
            .map_err(|e| format!("malformed request: {e}"))
    }
}

/// An agent command with the attempt it acts for and that attempt's token.
/// The fields are optional on the wire so that a missing one gets a clear
/// refusal instead of a parse error.
#[derive(Clone, Serialize, Deserialize)]
pub struct AgentRequest {
    /// The task (`MUSTER_TASK_ID`).
    #[serde(default)]
    pub task: Option<u64>,
    /// The generation (`MUSTER_GENERATION`).
    #[serde(default)]
    pub generation: Option<u64>,
    /// The attempt's token (`MUSTER_TASK_TOKEN`).
    #[serde(default)]
    pub token: Option<String>,
    /// What the agent asks.
    #[serde(flatten)]
    pub cmd: AgentCmd,
}

impl std::fmt::Debug for AgentRequest {
    // The token is a secret: never in a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentRequest")
            .field("task", &self.task)
            .field("generation", &self.generation)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("cmd", &self.cmd)
            .finish()
    }
}

/// The answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Answer {
    /// Whether the command succeeded.
    pub ok: bool,
    /// A sentence for the person or agent.
    pub message: String,
    /// Structured data (status).
    #[serde(default)]
    pub data: serde_json::Value,
}

/// A request from the socket, with where its answer goes.
pub type Incoming = (Request, oneshot::Sender<Answer>);

/// Binds the socket (replacing a stale one) with mode 0660.
///
/// # Errors
/// The OS error, with the path.
pub fn bind(dir: &Path) -> Result<(UnixListener, PathBuf), String> {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(SOCKET_FILE);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((listener, path))
}

/// Accepts connections and forwards each request to the daemon loop.
pub async fn serve(listener: UnixListener, to_daemon: mpsc::Sender<Incoming>) {
    let slots = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    let mut last_logged: Option<Instant> = None;
    let mut unlogged = 0u64;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                let now = Instant::now();
                if last_logged.is_none_or(|t| now.duration_since(t) >= ACCEPT_ERROR_LOG_INTERVAL) {
                    warn!(error = %e, failed_since_last_log = unlogged, "local socket: accept failed; pausing");
                    last_logged = Some(now);
                    unlogged = 0;
                } else {
                    unlogged += 1;
                }
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // No task for it: a short line fits the fresh socket's buffer, so a
            // non-blocking write either goes through or the client loses nothing it was owed.
            let _ = stream.try_write(BUSY_ANSWER);
            continue;
        };
        let tx = to_daemon.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, tx).await {
                warn!("local socket: {e}");
            }
            drop(slot);
        });
    }
}

async fn handle(stream: UnixStream, tx: mpsc::Sender<Incoming>) -> Result<(), String> {
    let (rd, mut wr) = stream.into_split();
    let mut line = String::new();
    let mut rd = BufReader::new(tokio::io::AsyncReadExt::take(rd, REQUEST_BYTES_MAX));
    match timeout(REQUEST_DEADLINE, rd.read_line(&mut line)).await {
        Ok(r) => {
            r.map_err(|e| e.to_string())?;
        }
        Err(_) => {
            // Tell the client why, best effort, then close.
            let _ = wr.try_write(
                b"{\"ok\":false,\"message\":\"no request within 5 s; closing\",\"data\":null}\n",
            );
            return Ok(());
        }
    }
    let answer = match Request::parse(&line) {
        Ok(req) => {
            let (otx, orx) = oneshot::channel();
            if tx.send((req, otx)).await.is_err() {
                Answer::err("the sidecar is shutting down")
            } else {
                match timeout(ANSWER_DEADLINE, orx).await {
                    Ok(Ok(a)) => a,
                    Ok(Err(_)) => Answer::err("the sidecar is shutting down"),
                    Err(_) => Answer::err("the sidecar did not answer in time; try again"),
                }
            }
        }
        Err(e) => Answer::err(&e),
    };
    let mut out = serde_json::to_vec(&answer).map_err(|e| e.to_string())?;
    out.push(b'\n');
    timeout(WRITE_DEADLINE, wr.write_all(&out))
        .await
        .map_err(|_| "the client did not read its answer within 5 s".to_string())?
        .map_err(|e| e.to_string())
}

impl Answer {
    /// A failure.
    pub fn err(message: &str) -> Answer {
        Answer {
            ok: false,
            message: message.into(),
            data: serde_json::Value::Null,
        }
    }

    /// A success.
    pub fn ok(message: impl Into<String>, data: serde_json::Value) -> Answer {
        Answer {
            ok: true,
            message: message.into(),
            data,
        }
    }
}

/// Sends one request to the daemon at `socket` (the client side of the CLI).
///
/// # Errors
/// A sentence when the daemon does not answer.
pub async fn call(socket: &Path, req: &Request) -> Result<Answer, String> {
    let fut = async {
        let mut stream = UnixStream::connect(socket).await.map_err(|e| {
            format!(
                "cannot reach the sidecar at {}: {e} (is `muster-sidecar run` running?)",
                socket.display()
            )
        })?;
        let mut line = serde_json::to_vec(req).map_err(|e| e.to_string())?;
        line.push(b'\n');
        stream.write_all(&line).await.map_err(|e| e.to_string())?;
        let mut answer = String::new();
        BufReader::new(stream)
            .read_line(&mut answer)
            .await
            .map_err(|e| e.to_string())?;
        serde_json::from_str(&answer).map_err(|e| format!("malformed answer from the sidecar: {e}"))
    };
    tokio::time::timeout(CLIENT_TIMEOUT, fut)
        .await
        .map_err(|_| "the sidecar did not answer within 10 s".to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_with_clear_errors_and_the_token_is_never_printed() {
        let r = Request::parse(r#"{"cmd":"status"}"#).expect("status");
        assert!(matches!(r, Request::Query { cmd } if cmd == "status"));
        let r = Request::parse(
            r#"{"cmd":"complete","task":4,"generation":2,"token":"s3cret","result":"ok"}"#,
        )
        .expect("complete");
        let Request::Agent(a) = &r else {
            panic!("expected an agent request, got {r:?}");
        };
        assert_eq!((a.task, a.generation), (Some(4), Some(2)));
        assert_eq!(a.token.as_deref(), Some("s3cret"));
        assert_eq!(
            a.cmd,
            AgentCmd::Complete {
                result: Some("ok".into()),
                link: None,
            }
        );
        assert!(
            !format!("{r:?}").contains("s3cret"),
            "Debug hides the token"
        );
        // A request as the CLI sends it survives the round trip.
        let line = serde_json::to_string(&r).expect("encode");
        assert!(matches!(Request::parse(&line), Ok(Request::Agent(_))));
        // Old clients without a token still parse, so the daemon can say what is missing.
        let r = Request::parse(r#"{"cmd":"start","task":4,"generation":2}"#).expect("start");
        assert!(matches!(
            r,
            Request::Agent(AgentRequest { token: None, .. })
        ));
        let e = Request::parse(r#"{"cmd":"explode"}"#).expect_err("unknown");
        assert!(e.contains("explode"), "{e}");
        assert!(
            Request::parse("not json")
                .expect_err("junk")
                .contains("not JSON")
        );
        assert!(Request::parse("{}").expect_err("no cmd").contains("cmd"));
    }

    #[test]
    fn the_busy_answer_is_an_answer() {
        let a: Answer = serde_json::from_slice(BUSY_ANSWER).expect("busy parses");
        assert!(!a.ok && a.message.contains("busy"));
    }
}
