//! `task logs`: an attempt's output relayed from the sidecar that holds it, to
//! an operator over QUIC or to a script or page over HTTP.
//!
//! ```text
//! operator ──TaskLogs──▶ hub stream task ─┐
//! HTTP GET …/tasks/{id}/logs ─────────────┴▶ LogRelays::open ──ToCore::Logs──▶ core loop: role, task, attempt, agent, session
//!                                                 │  ◀── the agent's connection ──┘
//!                                                 └─ open_bi on that connection ─▶ LogOpen ─▶ sidecar
//! operator / HTTP body ◀── LogRelay::next: one piece at a time ◀── LogFrame::Chunk … End
//! ```
//!
//! The hub never holds a log: a relay reads the next chunk (at most
//! [`LOG_CHUNK_BYTES_MAX`]) only when its consumer asks for it, after the one
//! before was handed on, so a slow reader slows the sidecar's reader through
//! QUIC flow control, never the agent.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use muster_protocol::limits::LOG_CHUNK_BYTES_MAX;
use muster_protocol::msg::{
    LogError, LogFrame, LogOpen, LogQuery, OpError, OpErrorCode, OpRequest, OpResponse,
};
use muster_protocol::{FrameReader, FrameWriter, Generation, PROTOCOL_VERSION, TaskId};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use super::ToCore;
use super::endpoint::Shared;
use super::session::{framed, internal, send_frame};
use crate::core::Core;
use crate::store::{Store, StoreError};

/// Log relays at once on the hub (QUIC and HTTP together); more are answered
/// `busy`. Each holds one chunk and two streams' buffers (bounded by their
/// QUIC windows).
pub(super) const LOG_RELAYS_MAX: usize = 64;
/// Log relays at once from one sidecar, the sidecar's own bound
/// (`muster_sidecar::logs::STREAMS_MAX`): 16 streams of a 128 KiB window use
/// at most half the hub's 4 MiB connection window, so its session always has room.
pub(super) const LOG_RELAYS_PER_AGENT: usize = 16;

const _: () = assert!(
    LOG_RELAYS_PER_AGENT as u32 * muster_protocol::tls::HUB_STREAM_WINDOW
        <= muster_protocol::tls::HUB_CONNECTION_WINDOW / 2
);
/// How long opening the stream to the sidecar and its first answer may take.
const SIDECAR_OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the core loop found an attempt's log.
pub(super) struct LogSource {
    pub(super) agent: String,
    pub(super) generation: Generation,
    pub(super) connection: quinn::Connection,
}

/// What the core loop answers a `task logs` request with.
pub(super) type LogAnswer = Result<LogSource, OpResponse>;

/// What every log relay shares, whichever API asked: the way to the core, the
/// frame limit for the sidecar's stream and the bounds on relays at once.
pub(super) struct LogRelays {
    to_core: mpsc::Sender<ToCore>,
    max_frame: usize,
    /// Relays at once, at most [`LOG_RELAYS_MAX`].
    all: Arc<Semaphore>,
    /// Relays per agent, at most [`LOG_RELAYS_PER_AGENT`] each; an agent's
    /// entry goes when its last relay ends, so the map holds at most
    /// [`LOG_RELAYS_MAX`] entries.
    per_agent: Mutex<HashMap<String, usize>>,
}

/// One relay counted for its agent until dropped.
struct AgentPlace {
    relays: Arc<LogRelays>,
    agent: String,
}

impl Drop for AgentPlace {
    fn drop(&mut self) {
        let mut m = self.relays.per_agent();
        if let Some(n) = m.get_mut(&self.agent) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.agent);
            }
        }
    }
}

/// An open relay of one attempt's log from its sidecar. Pull it with
/// [`LogRelay::next`] until it gives [`LogPiece::End`] or an error; drop it to
/// stop (the sidecar's stream is dropped with it, which stops the sidecar's
/// reader too).
pub(super) struct LogRelay {
    /// The task.
    pub(super) task: TaskId,
    /// The attempt (resolved: "latest" is a number here).
    pub(super) generation: Generation,
    /// The agent that holds the log.
    pub(super) agent: String,
    query: LogQuery,
    rd: FrameReader,
    /// Kept open (finished) for the relay's life, as the sidecar expects.
    _wr: FrameWriter,
    /// Counted against [`LOG_RELAYS_PER_AGENT`] and [`LOG_RELAYS_MAX`] until dropped.
    _places: (AgentPlace, OwnedSemaphorePermit),
    done: bool,
}

/// The next thing a relay hands on.
#[derive(Debug)]
pub(super) enum LogPiece {
    /// Output bytes, at most [`LOG_CHUNK_BYTES_MAX`].
    Chunk(Vec<u8>),
    /// The end: the summary `task logs` answers with (task, generation, agent,
    /// stream, bytes, cut_bytes, ended). Nothing follows.
    End(serde_json::Value),
}

fn op_error(code: OpErrorCode, message: String) -> OpResponse {
    OpResponse::Error(OpError { code, message })
}

/// Finds where an attempt's log is: the role check, the task, the attempt and
/// its agent, and that agent's session. In the core loop, after the batch's
/// commit, so the store has every attempt the core made.
pub(super) fn locate(
    core: &Core,
    store: &Store,
    sessions: &dyn Fn(crate::core::ConnId) -> Option<quinn::Connection>,
    fingerprint: &str,
    query: &LogQuery,
) -> LogAnswer {
    if let Err(e) = core.authorize(fingerprint, &OpRequest::TaskLogs(query.clone())) {
        return Err(OpResponse::Error(e));
    }
    let found = (|| -> Result<LogAnswer, StoreError> {
        let reader = store.reader()?;
        let id = query.task;
        let Some(task) = reader.task(id)? else {
            return Ok(Err(op_error(
                OpErrorCode::NotFound,
                format!("no task {id}; list tasks with `muster-hub tasks`"),
            )));
        };
        let generation = query.generation.unwrap_or(task.generation);
        if generation.0 == 0 {
            return Ok(Err(op_error(
                OpErrorCode::NotFound,
                format!("task {id} has not run yet: no attempt has output"),
            )));
        }
        let attempts = reader.attempts(id)?;
        let Some(attempt) = attempts.iter().find(|a| a.generation == generation) else {
            return Ok(Err(op_error(
                OpErrorCode::NotFound,
                format!(
                    "task {id} has no attempt {generation} (its attempts are 1 to {}); `muster-hub task show {id}` lists them",
                    task.generation
                ),
            )));
        };
        let agent = attempt.agent.clone();
        let Some(connection) = core.agent_conn(&agent).and_then(sessions) else {
            return Ok(Err(op_error(
                OpErrorCode::Conflict,
                format!(
                    "agent {agent}, which holds the log of task {id} attempt {generation}, is offline; read it when it reconnects, or on that host with `muster-sidecar logs {id} --attempt {generation}`"
                ),
            )));
        };
        Ok(Ok(LogSource {
            agent,
            generation,
            connection,
        }))
    })();
    found.unwrap_or_else(|e| Err(internal(&format!("the store failed: {e}"))))
}

/// Serves one `task logs` stream over QUIC: opens a relay and sends its
/// pieces as `LogChunk` … `Ok`, or the error that ended it.
pub(super) async fn run_logs(
    fingerprint: String,
    query: LogQuery,
    mut wr: FrameWriter,
    shared: Arc<Shared>,
) {
    let resp = relay_to(fingerprint, query, &mut wr, &shared).await;
    if let Some(resp) = resp {
        let _ = send_frame(&mut wr, &resp).await;
    }
    let _ = wr.get_mut().finish();
    let _ = tokio::time::timeout(Duration::from_secs(5), wr.get_mut().stopped()).await;
}

/// The QUIC relay loop; the last response to send, if any (`None`: the operator left).
async fn relay_to(
    fingerprint: String,
    query: LogQuery,
    wr: &mut FrameWriter,
    shared: &Arc<Shared>,
) -> Option<OpResponse> {
    let mut relay = match shared.logs.open(fingerprint, query).await {
        Ok(r) => r,
        Err(resp) => return Some(resp),
    };
    loop {
        // End when the operator goes away: dropping the relay stops the sidecar too.
        let piece = tokio::select! {
            p = relay.next() => p,
            _ = wr.get_mut().stopped() => return None,
        };
        let resp = match piece {
            Ok(LogPiece::Chunk(data)) => OpResponse::LogChunk { data },
            Ok(LogPiece::End(doc)) => {
                return Some(OpResponse::Ok {
                    json: doc.to_string(),
                });
            }
            Err(e) => return Some(e),
        };
        // Awaited: the next chunk is read only once this one is on its way.
        if send_frame(wr, &resp).await.is_err() {
            return None;
        }
    }
}

// === impl LogRelays ===

impl LogRelays {
    /// Relays that reach the core by `to_core` and read sidecar frames of at
    /// most `max_frame` bytes.
    pub(super) fn new(to_core: mpsc::Sender<ToCore>, max_frame: usize) -> Arc<LogRelays> {
        Arc::new(LogRelays {
            to_core,
            max_frame,
            all: Arc::new(Semaphore::new(LOG_RELAYS_MAX)),
            per_agent: Mutex::new(HashMap::new()),
        })
    }

    fn per_agent(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        // The critical sections cannot panic half-way; a poisoned map still counts right.
        self.per_agent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn take_agent(self: &Arc<Self>, agent: &str) -> Option<AgentPlace> {
        let mut m = self.per_agent();
        let n = m.entry(agent.to_owned()).or_default();
        if *n >= LOG_RELAYS_PER_AGENT {
            return None;
        }
        *n += 1;
        Some(AgentPlace {
            relays: Arc::clone(self),
            agent: agent.to_owned(),
        })
    }

    /// Opens a relay for `fingerprint`: asks the core where the log is (and
    /// whether this caller may read it), opens a stream on that sidecar's
    /// connection and asks it for the log.
    ///
    /// # Errors
    /// The `task logs` error to answer: busy, no such task or attempt, the
    /// agent offline, the caller not allowed.
    pub(super) async fn open(
        self: &Arc<Self>,
        fingerprint: String,
        query: LogQuery,
    ) -> Result<LogRelay, OpResponse> {
        let Ok(permit) = Arc::clone(&self.all).try_acquire_owned() else {
            return Err(op_error(
                OpErrorCode::Busy,
                format!("the hub relays {LOG_RELAYS_MAX} log streams already; try again shortly"),
            ));
        };
        let (tx, rx) = oneshot::channel();
        let ask = ToCore::Logs {
            fingerprint,
            query: query.clone(),
            reply: tx,
        };
        if self.to_core.send(ask).await.is_err() {
            return Err(internal("the hub is shutting down"));
        }
        let source = match rx.await {
            Ok(Ok(s)) => s,
            Ok(Err(resp)) => return Err(resp),
            Err(_) => return Err(internal("the hub is shutting down")),
        };
        let (task, generation, agent) = (query.task, source.generation, source.agent.clone());
        let Some(place) = self.take_agent(&agent) else {
            return Err(op_error(
                OpErrorCode::Busy,
                format!(
                    "the hub relays {LOG_RELAYS_PER_AGENT} log streams from agent {agent} already; try again shortly"
                ),
            ));
        };
        let opened = tokio::time::timeout(SIDECAR_OPEN_TIMEOUT, source.connection.open_bi()).await;
        let Ok(Ok((send, recv))) = opened else {
            return Err(offline(task, generation, &agent));
        };
        let (mut wr, rd) = framed(send, recv, self.max_frame);
        let open = LogOpen {
            protocol: PROTOCOL_VERSION,
            task,
            generation,
            stream: query.stream,
            tail: query.tail,
            follow: query.follow,
        };
        if wr.send(&open).await.is_err() {
            return Err(offline(task, generation, &agent));
        }
        let _ = wr.get_mut().finish();
        Ok(LogRelay {
            task,
            generation,
            agent,
            query,
            rd,
            _wr: wr,
            _places: (place, permit),
            done: false,
        })
    }
}

/// The answer when the agent that holds a log goes (or is) away mid-relay.
fn offline(task: TaskId, generation: Generation, agent: &str) -> OpResponse {
    op_error(
        OpErrorCode::Conflict,
        format!(
            "agent {agent}, which holds the log of task {task} attempt {generation}, went offline; read it when it reconnects, or on that host with `muster-sidecar logs {task} --attempt {generation}`"
        ),
    )
}

// === impl LogRelay ===

impl LogRelay {
    /// The next piece of the log. Cancel safe (a partly read frame stays
    /// buffered). After [`LogPiece::End`] or an error the relay is over, and
    /// further calls answer an error.
    ///
    /// # Errors
    /// Why the log cannot be read (on the sidecar, or the sidecar went away),
    /// as the `task logs` error.
    pub(super) async fn next(&mut self) -> Result<LogPiece, OpResponse> {
        if self.done {
            return Err(internal("this log relay has ended"));
        }
        let frame = self.rd.recv::<LogFrame>().await;
        let (task, generation) = (self.task, self.generation);
        let piece = match frame {
            Ok(Some(LogFrame::Chunk { data })) if data.len() <= LOG_CHUNK_BYTES_MAX => {
                return Ok(LogPiece::Chunk(data));
            }
            Ok(Some(LogFrame::Chunk { .. })) => Err(internal(&format!(
                "agent {} sent a log chunk above {LOG_CHUNK_BYTES_MAX} bytes",
                self.agent
            ))),
            Ok(Some(LogFrame::End(end))) => Ok(LogPiece::End(serde_json::json!({
                "task": task.0,
                "generation": generation.0,
                "agent": self.agent,
                "stream": self.query.stream.as_str(),
                "bytes": end.bytes,
                "cut_bytes": end.cut_bytes,
                "ended": end.ended,
            }))),
            Ok(Some(LogFrame::Error(e))) => {
                let code = match e {
                    LogError::NotFound | LogError::Removed { .. } => OpErrorCode::NotFound,
                    LogError::Busy => OpErrorCode::Busy,
                    LogError::ProtocolMismatch { .. } => OpErrorCode::ProtocolMismatch,
                    LogError::Failed { .. } => OpErrorCode::Internal,
                };
                Err(op_error(code, e.describe(task, generation, &self.agent)))
            }
            Ok(None) | Err(_) => Err(offline(task, generation, &self.agent)),
        };
        self.done = true;
        piece
    }
}
