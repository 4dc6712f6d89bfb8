//! The local Unix socket (mode 0660 in the state directory) through which the
//! agent talks to its sidecar, and `status` asks the running daemon.
//!
//! One JSON request line, one JSON answer line, then the connection closes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use crate::core::AgentCmd;

/// The socket's file name in the state directory.
pub const SOCKET_FILE: &str = "muster.sock";
/// Longest request line accepted: a result is at most 256 KiB.
const REQUEST_BYTES_MAX: u64 = 512 * 1024;
/// How long a client waits for the daemon.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// A request on the socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Request {
    /// An agent command.
    Agent(AgentCmd),
    /// Anything else: `{"cmd":"status"}` or `{"cmd":"whoami"}`.
    Query {
        /// `status` or `whoami`.
        cmd: String,
    },
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
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let tx = to_daemon.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, tx).await {
                warn!("local socket: {e}");
            }
        });
    }
}

async fn handle(stream: UnixStream, tx: mpsc::Sender<Incoming>) -> Result<(), String> {
    let (rd, mut wr) = stream.into_split();
    let mut line = String::new();
    let mut rd = BufReader::new(tokio::io::AsyncReadExt::take(rd, REQUEST_BYTES_MAX));
    rd.read_line(&mut line).await.map_err(|e| e.to_string())?;
    let answer = match serde_json::from_str::<Request>(&line) {
        Ok(req) => {
            let (otx, orx) = oneshot::channel();
            if tx.send((req, otx)).await.is_err() {
                Answer::err("the sidecar is shutting down")
            } else {
                orx.await
                    .unwrap_or_else(|_| Answer::err("the sidecar is shutting down"))
            }
        }
        Err(e) => Answer::err(&format!("malformed request: {e}")),
    };
    let mut out = serde_json::to_vec(&answer).map_err(|e| e.to_string())?;
    out.push(b'\n');
    wr.write_all(&out).await.map_err(|e| e.to_string())
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
