//! `task logs`: an attempt's output relayed from the sidecar that holds it.
//!
//! ```text
//! operator ──TaskLogs──▶ hub stream task ──ToCore::Logs──▶ core loop: role, task, attempt, agent, session
//!                              │  ◀── the agent's connection ──┘
//!                              └─ open_bi on that connection ─▶ LogOpen ─▶ sidecar
//! operator ◀── LogChunk … Ok ◀── relay: one chunk at a time ◀── LogFrame::Chunk … End
//! ```
//!
//! The hub never holds a log: it forwards one chunk (at most
//! [`LOG_CHUNK_BYTES_MAX`]) before it reads the next, so a slow operator
//! slows the sidecar's reader through QUIC flow control, never the agent.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use muster_protocol::limits::LOG_CHUNK_BYTES_MAX;
use muster_protocol::msg::{
    LogError, LogFrame, LogOpen, LogQuery, OpError, OpErrorCode, OpRequest, OpResponse,
};
use muster_protocol::{FrameWriter, Generation, PROTOCOL_VERSION};
use tokio::sync::oneshot;

use super::ToCore;
use super::endpoint::Shared;
use super::session::{framed, internal, send_frame};
use crate::core::Core;
use crate::store::{Store, StoreError};

/// Log relays at once on the hub; more are answered `busy`. Each holds one
/// chunk and two streams' buffers (bounded by their QUIC windows).
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

/// Relays per agent, for [`LOG_RELAYS_PER_AGENT`].
#[derive(Default)]
pub(super) struct Relays {
    per_agent: Mutex<HashMap<String, usize>>,
}

/// One relay counted for its agent until dropped.
struct RelayPlace<'a> {
    relays: &'a Relays,
    agent: String,
}

impl Relays {
    fn take(&self, agent: &str) -> Option<RelayPlace<'_>> {
        let mut m = self
            .per_agent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = m.entry(agent.to_owned()).or_default();
        if *n >= LOG_RELAYS_PER_AGENT {
            return None;
        }
        *n += 1;
        Some(RelayPlace {
            relays: self,
            agent: agent.to_owned(),
        })
    }
}

impl Drop for RelayPlace<'_> {
    fn drop(&mut self) {
        let mut m = self
            .relays
            .per_agent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = m.get_mut(&self.agent) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.agent);
            }
        }
    }
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

/// Serves one `task logs` stream: asks the core where the log is, opens a
/// stream on that sidecar's connection and relays its chunks one at a time.
pub(super) async fn run_logs(
    fingerprint: String,
    query: LogQuery,
    mut wr: FrameWriter,
    shared: Arc<Shared>,
) {
    let resp = relay(fingerprint, query, &mut wr, &shared).await;
    if let Some(resp) = resp {
        let _ = send_frame(&mut wr, &resp).await;
    }
    let _ = wr.get_mut().finish();
    let _ = tokio::time::timeout(Duration::from_secs(5), wr.get_mut().stopped()).await;
}

/// The relay; the last response to send, if any (`None`: the operator left).
async fn relay(
    fingerprint: String,
    query: LogQuery,
    wr: &mut FrameWriter,
    shared: &Arc<Shared>,
) -> Option<OpResponse> {
    let Ok(_place) = Arc::clone(&shared.log_relays).try_acquire_owned() else {
        return Some(op_error(
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
    if shared.to_core.send(ask).await.is_err() {
        return Some(internal("the hub is shutting down"));
    }
    let source = match rx.await {
        Ok(Ok(s)) => s,
        Ok(Err(resp)) => return Some(resp),
        Err(_) => return Some(internal("the hub is shutting down")),
    };
    let (task, generation, agent) = (query.task, source.generation, source.agent.clone());
    let Some(_agent_place) = shared.relays.take(&agent) else {
        return Some(op_error(
            OpErrorCode::Busy,
            format!(
                "the hub relays {LOG_RELAYS_PER_AGENT} log streams from agent {agent} already; try again shortly"
            ),
        ));
    };
    let offline = || {
        op_error(
            OpErrorCode::Conflict,
            format!(
                "agent {agent}, which holds the log of task {task} attempt {generation}, went offline; read it when it reconnects, or on that host with `muster-sidecar logs {task} --attempt {generation}`"
            ),
        )
    };
    let opened = tokio::time::timeout(SIDECAR_OPEN_TIMEOUT, source.connection.open_bi()).await;
    let Ok(Ok((send, recv))) = opened else {
        return Some(offline());
    };
    let (mut swr, mut srd) = framed(send, recv, shared.max_frame);
    let open = LogOpen {
        protocol: PROTOCOL_VERSION,
        task,
        generation,
        stream: query.stream,
        tail: query.tail,
        follow: query.follow,
    };
    if swr.send(&open).await.is_err() {
        return Some(offline());
    }
    let _ = swr.get_mut().finish();
    loop {
        // End when the operator goes away: dropping the sidecar's stream stops it there too.
        let frame = tokio::select! {
            f = srd.recv::<LogFrame>() => f,
            _ = wr.get_mut().stopped() => return None,
        };
        let resp = match frame {
            Ok(Some(LogFrame::Chunk { data })) if data.len() <= LOG_CHUNK_BYTES_MAX => {
                OpResponse::LogChunk { data }
            }
            Ok(Some(LogFrame::Chunk { .. })) => {
                return Some(internal(&format!(
                    "agent {agent} sent a log chunk above {LOG_CHUNK_BYTES_MAX} bytes"
                )));
            }
            Ok(Some(LogFrame::End(end))) => {
                let doc = serde_json::json!({
                    "task": task.0,
                    "generation": generation.0,
                    "agent": agent,
                    "stream": query.stream.as_str(),
                    "bytes": end.bytes,
                    "cut_bytes": end.cut_bytes,
                    "ended": end.ended,
                });
                return Some(OpResponse::Ok {
                    json: doc.to_string(),
                });
            }
            Ok(Some(LogFrame::Error(e))) => {
                let code = match e {
                    LogError::NotFound | LogError::Removed { .. } => OpErrorCode::NotFound,
                    LogError::Busy => OpErrorCode::Busy,
                    LogError::ProtocolMismatch { .. } => OpErrorCode::ProtocolMismatch,
                    LogError::Failed { .. } => OpErrorCode::Internal,
                };
                return Some(op_error(code, e.describe(task, generation, &agent)));
            }
            Ok(None) | Err(_) => return Some(offline()),
        };
        // Awaited: the next chunk is read only once this one is on its way.
        if send_frame(wr, &resp).await.is_err() {
            return None;
        }
    }
}
