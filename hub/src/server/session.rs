//! One driver per stream: routing an `Open` to a sidecar session, an operator
//! request or a `watch`, and the session loop with its message rate.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::StreamExt;
use muster_protocol::msg::{
    HubMsg, OpError, OpErrorCode, OpRequest, OpResponse, Open, OpenBody, Refused, SessionMsg,
};
use muster_protocol::{EventSeq, FrameReader, FrameWriter, PROTOCOL_VERSION, decode};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use super::endpoint::{Shared, closed_by_peer};
use super::queries::WATCH_PAGE;
use super::{SESSION_QUEUE_LEN, ToCore};
use crate::core::ConnId;
use muster_protocol::pace::Window;

pub(super) use muster_protocol::framed;

/// Messages of a sidecar session written with one flush, at most.
const WRITE_BATCH_MAX: usize = 64;

/// Sends `msg` as one frame; the bytes it took on the wire.
pub(super) async fn send_frame<T: serde::Serialize>(
    wr: &mut FrameWriter,
    msg: &T,
) -> Result<usize, String> {
    wr.send(msg).await.map_err(|e| e.to_string())
}

pub(super) async fn handle_stream(
    conn: quinn::Connection,
    conn_id: ConnId,
    fingerprint: String,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    shared: Arc<Shared>,
) {
    let (mut wr, mut rd) = framed(send, recv, shared.max_frame);
    let first = match rd.next().await {
        Some(Ok(f)) => f,
        Some(Err(e)) => {
            warn!(peer = %conn.remote_address(), "closing stream: bad first frame: {e}");
            return;
        }
        None => return,
    };
    if let Some((v, kind)) =
        muster_protocol::peek_open(&first).filter(|(v, _)| *v != PROTOCOL_VERSION)
    {
        let refusal = Refused::ProtocolMismatch {
            hub: PROTOCOL_VERSION,
            peer: v,
        };
        // Answer in the form the peer reads: a sidecar a hub message, an operator a response.
        let _ = if kind == 1 {
            let resp = OpResponse::Error(OpError {
                code: OpErrorCode::ProtocolMismatch,
                message: refusal.to_string(),
            });
            send_frame(&mut wr, &resp).await
        } else {
            send_frame(&mut wr, &HubMsg::Refused(refusal)).await
        };
        let _ = wr.get_mut().finish();
        let _ = tokio::time::timeout(Duration::from_secs(5), wr.get_mut().stopped()).await;
        return;
    }
    let open: Open = match decode(&first) {
        Ok(o) => o,
        Err(e) => {
            warn!(peer = %conn.remote_address(), "closing stream: {e}");
            return;
        }
    };
    match open.body {
        OpenBody::Session(hello) => {
            run_session(conn, conn_id, fingerprint, hello, wr, rd, shared).await;
        }
        OpenBody::Request(OpRequest::Watch { from }) => {
            run_watch(fingerprint, from, wr, shared).await;
        }
        OpenBody::Request(OpRequest::TaskLogs(query)) => {
            super::logs::run_logs(fingerprint, query, wr, shared).await;
        }
        OpenBody::Request(OpRequest::Ping) => {
            // The connection's certificate was checked live at accept: the
            // answer says only "this hub leads", so it needs no core turn.
            let pong = OpResponse::Ok { json: "{}".into() };
            let _ = send_frame(&mut wr, &pong).await;
            let _ = wr.get_mut().finish();
            let _ = tokio::time::timeout(Duration::from_secs(5), wr.get_mut().stopped()).await;
        }
        OpenBody::Request(request) => {
            let (tx, rx) = oneshot::channel();
            let msg = ToCore::Op {
                fingerprint,
                request,
                reply: tx,
            };
            let resp = if shared.to_core.send(msg).await.is_err() {
                internal("the hub is shutting down")
            } else {
                rx.await
                    .unwrap_or_else(|_| internal("the hub is shutting down"))
            };
            if let Err(e) = send_frame(&mut wr, &resp).await {
                warn!(peer = %conn.remote_address(), "an operator answer was not sent: {e}");
            }
            let _ = wr.get_mut().finish();
            // Let the peer read the answer before the stream is dropped.
            let _ = tokio::time::timeout(Duration::from_secs(5), wr.get_mut().stopped()).await;
        }
    }
}

pub(super) fn internal(msg: &str) -> OpResponse {
    OpResponse::Error(OpError {
        code: OpErrorCode::Internal,
        message: msg.into(),
    })
}

pub(super) async fn run_session(
    conn: quinn::Connection,
    conn_id: ConnId,
    fingerprint: String,
    hello: muster_protocol::msg::Hello,
    mut wr: FrameWriter,
    mut rd: FrameReader,
    shared: Arc<Shared>,
) {
    let (tx, mut rx) = mpsc::channel::<HubMsg>(SESSION_QUEUE_LEN);
    let agent = hello.agent.to_string();
    let hello_msg = ToCore::Hello {
        conn: conn_id,
        fingerprint,
        hello,
        tx,
        connection: conn.clone(),
    };
    if shared.to_core.send(hello_msg).await.is_err() {
        return;
    }
    let metrics = shared.metrics.clone();
    let writer = tokio::spawn(async move {
        // What the core queued together (a batch's assignments and acks) leaves
        // in one stream write.
        let mut out = Vec::with_capacity(WRITE_BATCH_MAX);
        while rx.recv_many(&mut out, WRITE_BATCH_MAX).await > 0 {
            let mut last = false;
            for msg in out.drain(..) {
                last = matches!(msg, HubMsg::Refused(_));
                // Per-task coordination cost: the session's own Welcome is not a task
                // message, as the sidecar's Hello and heartbeats are not counted either.
                let counted = !matches!(msg, HubMsg::Welcome(_) | HubMsg::Refused(_));
                match wr.feed(&msg).await {
                    Ok(n) if counted => {
                        metrics.msgs_out.fetch_add(1, Ordering::Relaxed);
                        metrics.bytes.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
                if last {
                    break;
                }
            }
            if wr.flush().await.is_err() {
                return;
            }
            if last {
                let _ = wr.get_mut().finish();
                return;
            }
        }
    });
    // A one-second window: a sidecar sends a few messages per task and a heartbeat
    // per interval, so this bound only stops a peer that floods.
    let mut window = Window::new(Duration::from_secs(1), shared.now());
    loop {
        let frame = match rd.next().await {
            Some(Ok(f)) => f,
            Some(Err(e)) if closed_by_peer(&e) => {
                // A sidecar stopping (SIGTERM, upgrade) closes its connection on purpose.
                info!(agent, "session closed by the sidecar");
                break;
            }
            Some(Err(e)) => {
                warn!(agent, "closing session: {e}");
                break;
            }
            None => break,
        };
        if window
            .take(shared.now(), shared.messages_per_second)
            .is_err()
        {
            warn!(
                agent,
                limit = shared.messages_per_second,
                "closing session: more messages per second than limits.messages_per_second"
            );
            break;
        }
        let msg: SessionMsg = match decode(&frame) {
            Ok(m) => m,
            Err(e) => {
                warn!(agent, "closing session: {e}");
                break;
            }
        };
        if !matches!(msg, SessionMsg::Heartbeat(_)) {
            shared.metrics.msgs_in.fetch_add(1, Ordering::Relaxed);
            shared
                .metrics
                .bytes
                .fetch_add(frame.len() as u64 + 4, Ordering::Relaxed);
        }
        if shared
            .to_core
            .send(ToCore::Session { conn: conn_id, msg })
            .await
            .is_err()
        {
            break;
        }
    }
    let _ = shared.to_core.send(ToCore::Closed { conn: conn_id }).await;
    writer.abort();
    // A session stream that failed takes its connection with it: the sidecar reconnects.
    conn.close(2u32.into(), b"session ended");
}

pub(super) async fn run_watch(
    fingerprint: String,
    from: Option<EventSeq>,
    mut wr: FrameWriter,
    shared: Arc<Shared>,
) {
    let (tx, mut rx) = mpsc::channel(WATCH_PAGE * 2);
    let msg = ToCore::Watch {
        fingerprint,
        tx,
        from,
    };
    if shared.to_core.send(msg).await.is_err() {
        return;
    }
    loop {
        // End when the watcher goes away, not only when the next event fails to send.
        let ev = tokio::select! {
            ev = rx.recv() => ev,
            _ = wr.get_mut().stopped() => return,
        };
        let Some(ev) = ev else { break };
        if send_frame(&mut wr, &ev).await.is_err() {
            return;
        }
    }
    let _ = wr.get_mut().finish();
}
