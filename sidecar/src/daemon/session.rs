//! The hub session: connect, hello, welcome, then frames both ways until the
//! connection fails, and again with backoff. It owns no state of the daemon's:
//! it asks the loop for each hello and hands it everything the hub sends.

use std::sync::Arc;
use std::time::{Duration, Instant};

use muster_protocol::client::{self, Credential};
use muster_protocol::msg::{Hello, HubMsg, Open, OpenBody, Refused, SessionMsg, Welcome};
use muster_protocol::pace::{LogBudget, Rng};
use muster_protocol::{FrameError, FrameReader, FrameWriter, PROTOCOL_VERSION, framed};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use super::{Daemon, seed};
use crate::backoff;
use crate::logs::Logs;

/// Outgoing session queue; a hub this far behind gets the connection closed.
const SEND_QUEUE_LEN: usize = 1024;
/// How long the hub may take to answer a hello.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);

/// What the session task tells the daemon loop.
pub(super) enum ToMain {
    /// The session is about to connect: the loop answers with the current hello.
    HelloWanted(oneshot::Sender<Hello>),
    /// The hub welcomed the session; messages for it go into `tx`.
    Connected {
        tx: mpsc::Sender<SessionMsg>,
        welcome: Welcome,
        conn: quinn::Connection,
    },
    /// The session ended; the outbox replays after the next welcome.
    Disconnected,
    /// A message from the hub.
    Hub(HubMsg),
}

impl Daemon {
    /// Queues `msg` for the hub, if a session is up. A hub that does not read
    /// loses its session; the outbox replays on reconnect.
    pub(super) fn send(&mut self, msg: SessionMsg) {
        let Some(tx) = &self.tx else { return };
        if tx.try_send(msg).is_err() {
            warn!("send queue to the hub is full; reconnecting");
            if let Some(c) = &self.conn {
                c.close(5u32.into(), b"send queue full");
            }
            self.tx = None;
        }
    }
}

/// Most standby pointers followed in a row before the loop backs off: a
/// standby names the leader, so more hops mean an election is under way.
const LEADER_HOPS_MAX: u32 = 3;

/// Keeps one session to the hub, reconnecting with backoff; serves the log
/// streams the hub opens on each connection. With a cluster's `hubs`, a lost
/// or unreachable hub passes to the next in turn, and a standby's answer
/// (`NotLeader`) sends the next attempt straight to the leader it names.
pub(super) async fn session_loop(
    hubs: Vec<String>,
    cred: Credential,
    to_main: mpsc::Sender<ToMain>,
    logs: Arc<Logs>,
) {
    let mut backoff = backoff::reconnect();
    // A hub at its handshake or connection cap (a whole fleet reconnecting after
    // its restart) refuses at once: those retries come soon, jittered, and do not
    // grow the backoff that real failures use. A standby with no leader yet
    // (an election under way) is retried as soon.
    let mut busy = backoff::busy();
    let mut storm = LogBudget::new(1, Duration::from_secs(30));
    let origin = Instant::now();
    let mut rng = Rng::new(seed());
    let mut turn = 0usize;
    let mut leader: Option<String> = None;
    let mut hops = 0;
    loop {
        let (htx, hrx) = oneshot::channel();
        if to_main.send(ToMain::HelloWanted(htx)).await.is_err() {
            return;
        }
        let Ok(hello) = hrx.await else { return };
        let hub = leader
            .take()
            .unwrap_or_else(|| hubs[turn % hubs.len()].clone());
        match connect(&hub, &cred, hello).await {
            Ok((endpoint, conn, welcome, wr, rd)) => {
                if backoff.failures() > 0 {
                    info!(
                        hub,
                        "reconnected after {} failed attempts",
                        backoff.failures()
                    );
                } else {
                    info!(hub, "connected");
                }
                backoff.reset();
                busy.reset();
                hops = 0;
                let (tx, rx) = mpsc::channel(SEND_QUEUE_LEN);
                let connected = ToMain::Connected {
                    tx,
                    welcome,
                    conn: conn.clone(),
                };
                if to_main.send(connected).await.is_err() {
                    return;
                }
                let streams = tokio::spawn(serve_log_streams(conn.clone(), Arc::clone(&logs)));
                let reason = pump(wr, rd, rx, &to_main).await;
                streams.abort();
                conn.close(0u32.into(), b"session over");
                drop(endpoint);
                if to_main.send(ToMain::Disconnected).await.is_err() {
                    return;
                }
                warn!(hub, "session ended: {reason}");
                // The hub just lost is the least likely to lead next: go on
                // from the one after it. (`turn` may point elsewhere: a
                // standby's pointer, not the turn, chose this hub, and the
                // next turn would then be the very hub that just died, a
                // whole connect timeout lost before the next is tried.)
                turn = hubs
                    .iter()
                    .position(|h| *h == hub)
                    .map_or(turn + 1, |i| i + 1);
            }
            Err(ConnectFailure::NotLeader(Some(l))) if hops < LEADER_HOPS_MAX && l != hub => {
                debug!(hub, leader = l, "a standby: following it to the leader");
                hops += 1;
                leader = Some(l);
                continue;
            }
            Err(
                e @ (ConnectFailure::Busy(_)
                | ConnectFailure::NotLeader(_)
                | ConnectFailure::Leaderless(_)),
            ) => {
                debug!(hub, "{e}");
                hops = 0;
                turn += 1;
                tokio::time::sleep(busy.next_delay(rng.unit())).await;
                continue;
            }
            Err(ConnectFailure::Failed(e)) => {
                hops = 0;
                turn += 1;
                if let Some(suppressed) = storm.allow(origin.elapsed()) {
                    let more = if suppressed > 0 {
                        format!(" ({suppressed} more failures not logged)")
                    } else {
                        String::new()
                    };
                    warn!(
                        hub,
                        attempt = backoff.failures() + 1,
                        "cannot connect: {e}{more}"
                    );
                }
                // With other hubs to try, a dead one does not hold up the rest.
                if hubs.len() > 1 && !turn.is_multiple_of(hubs.len()) {
                    continue;
                }
            }
        }
        tokio::time::sleep(backoff.next_delay(rng.unit())).await;
    }
}

/// Why a connection attempt failed.
enum ConnectFailure {
    /// The hub refused the connection at a cap (a fleet reconnecting at once):
    /// retry soon, without the growing backoff.
    Busy(String),
    /// A standby of a cluster, naming the leader.
    NotLeader(Option<String>),
    /// A standby that knows no leader yet (an election is under way).
    Leaderless(String),
    /// Anything else.
    Failed(String),
}

impl From<String> for ConnectFailure {
    fn from(s: String) -> Self {
        ConnectFailure::Failed(s)
    }
}

impl From<client::ClientError> for ConnectFailure {
    fn from(e: client::ClientError) -> Self {
        match e {
            client::ClientError::Busy(_) => ConnectFailure::Busy(e.to_string()),
            client::ClientError::NotLeader { leader: None } => {
                ConnectFailure::Leaderless(e.to_string())
            }
            client::ClientError::NotLeader { leader } => ConnectFailure::NotLeader(leader),
            e => ConnectFailure::Failed(e.to_string()),
        }
    }
}

impl std::fmt::Display for ConnectFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectFailure::Busy(s) | ConnectFailure::Failed(s) | ConnectFailure::Leaderless(s) => {
                f.write_str(s)
            }
            ConnectFailure::NotLeader(l) => write!(
                f,
                "{}",
                client::ClientError::NotLeader { leader: l.clone() }
            ),
        }
    }
}

/// Connects, sends the hello and waits for the welcome: only then is the session up.
async fn connect(
    hub: &str,
    cred: &Credential,
    hello: Hello,
) -> Result<
    (
        quinn::Endpoint,
        quinn::Connection,
        Welcome,
        FrameWriter,
        FrameReader,
    ),
    ConnectFailure,
> {
    let (endpoint, conn) = client::connect(hub, cred).await?;
    let (welcome, wr, rd) = open_session(&conn, hello).await?;
    Ok((endpoint, conn, welcome, wr, rd))
}

/// Opens the session stream on `conn`: the hello, then the hub's welcome or refusal.
async fn open_session(
    conn: &quinn::Connection,
    hello: Hello,
) -> Result<(Welcome, FrameWriter, FrameReader), ConnectFailure> {
    let (send, recv) = conn.open_bi().await.map_err(client::refused_or_lost)?;
    let (mut wr, mut rd) = framed(send, recv, muster_protocol::limits::FRAME_BYTES_MAX);
    let open = Open {
        protocol: PROTOCOL_VERSION,
        body: OpenBody::Session(hello),
    };
    // A hub that refused the certificate at accept closes the connection with a
    // code that says so: report that rather than the bare write error.
    let lost = |e: FrameError| match (&e, conn.close_reason()) {
        (FrameError::Io(_), Some(r)) => ConnectFailure::from(client::refused_or_lost(r)),
        _ => ConnectFailure::Failed(e.to_string()),
    };
    wr.send(&open).await.map_err(lost)?;
    let welcome = match tokio::time::timeout(WELCOME_TIMEOUT, rd.recv::<HubMsg>()).await {
        Ok(Ok(Some(m))) => m,
        Ok(Err(FrameError::Decode(e))) => return Err(format!("malformed welcome: {e}").into()),
        Ok(Err(e)) => return Err(lost(e)),
        Ok(Ok(None)) => {
            return Err(match conn.close_reason() {
                Some(r) => client::refused_or_lost(r).into(),
                None => "the hub closed the session before welcoming it"
                    .to_string()
                    .into(),
            });
        }
        Err(_) => return Err("no welcome from the hub within 10 s".to_string().into()),
    };
    match welcome {
        HubMsg::Welcome(w) => Ok((w, wr, rd)),
        HubMsg::Refused(Refused::NotLeader { leader }) => Err(client::ClientError::NotLeader {
            leader: leader.filter(|l| client::valid_leader(l)),
        }
        .into()),
        HubMsg::Refused(r) => Err(ConnectFailure::Failed(match r {
            Refused::Revoked => format!(
                "refused: {r} (this sidecar's credential no longer works; run `muster-sidecar enroll` with a new token)"
            ),
            other => format!("refused: {other}"),
        })),
        other => Err(format!("expected a welcome, got {other:?}").into()),
    }
}

/// Moves messages both ways until either side fails; returns why.
async fn pump(
    mut wr: FrameWriter,
    mut rd: FrameReader,
    mut rx: mpsc::Receiver<SessionMsg>,
    to_main: &mpsc::Sender<ToMain>,
) -> String {
    let mut out = Vec::with_capacity(WRITE_BATCH_MAX);
    loop {
        tokio::select! {
            // Cancel safe. What the loop queued together leaves in one stream write.
            n = rx.recv_many(&mut out, WRITE_BATCH_MAX) => {
                if n == 0 {
                    return "closed locally".into();
                }
                match send_all(&mut wr, &mut out).await {
                    Ok(()) => {}
                    Err(e @ FrameError::Io(_)) => return format!("send: {e}"),
                    Err(e) => return e.to_string(),
                }
            }
            // Cancel safe: a frame read halfway stays buffered for the next turn.
            msg = rd.recv::<HubMsg>() => match msg {
                Ok(Some(HubMsg::Refused(r))) => return format!("refused: {r}"),
                Ok(Some(m)) => {
                    if to_main.send(ToMain::Hub(m)).await.is_err() {
                        return "stopping".into();
                    }
                }
                Ok(None) => return "the hub closed the session".into(),
                Err(FrameError::Decode(e)) => return format!("malformed message from the hub: {e}"),
                Err(e) => return format!("receive: {e}"),
            },
        }
    }
}

/// Messages written to the session stream with one flush, at most.
const WRITE_BATCH_MAX: usize = 64;

/// Frames every message of `out` (emptying it), then flushes once.
async fn send_all(wr: &mut FrameWriter, out: &mut Vec<SessionMsg>) -> Result<(), FrameError> {
    for msg in out.drain(..) {
        wr.feed(&msg).await?;
    }
    wr.flush().await
}

/// How long the hub has to send a log stream's first frame.
const LOG_OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts the streams the hub opens on this connection: each is one log read.
/// Past [`crate::logs::STREAMS_MAX`] at once a stream is answered `Busy`.
async fn serve_log_streams(conn: quinn::Connection, logs: Arc<Logs>) {
    while let Ok((send, recv)) = conn.accept_bi().await {
        tokio::spawn(serve_log_stream(send, recv, Arc::clone(&logs)));
    }
}

/// One log stream: the hub's [`LogOpen`], then chunks as the reader gives
/// them (QUIC flow control holds the reader back when the hub reads slowly),
/// then the end or an error; the stream ends when the hub stops reading.
async fn serve_log_stream(send: quinn::SendStream, recv: quinn::RecvStream, logs: Arc<Logs>) {
    use futures::StreamExt;
    use muster_protocol::msg::{LogError, LogFrame, LogOpen};
    let (mut wr, mut rd) = framed(send, recv, muster_protocol::limits::FRAME_BYTES_MAX);
    let first = match tokio::time::timeout(LOG_OPEN_TIMEOUT, rd.next()).await {
        Ok(Some(Ok(f))) => f,
        _ => return,
    };
    let refuse = |e: LogError| LogFrame::Error(e);
    let frame = match muster_protocol::peek_protocol(&first) {
        Some(v) if v != PROTOCOL_VERSION => Some(refuse(LogError::ProtocolMismatch {
            sidecar: PROTOCOL_VERSION,
            hub: v,
        })),
        _ => None,
    };
    let open: Option<LogOpen> = muster_protocol::decode(&first).ok();
    let (Some(open), None) = (open, frame.clone()) else {
        if let Some(f) = frame {
            let _ = wr.send(&f).await;
        }
        let _ = wr.get_mut().finish();
        return;
    };
    let Ok(_permit) = Arc::clone(&logs.streams).try_acquire_owned() else {
        let _ = wr.send(&refuse(LogError::Busy)).await;
        let _ = wr.get_mut().finish();
        return;
    };
    let mut reader = match logs
        .open(
            open.task,
            open.generation,
            open.stream,
            open.tail,
            open.follow,
        )
        .await
    {
        Ok(r) => r,
        Err(e) => {
            let _ = wr.send(&refuse(e)).await;
            let _ = wr.get_mut().finish();
            return;
        }
    };
    loop {
        // End when the hub stops the stream (the operator went away), not only
        // when the next chunk fails to send.
        let next = tokio::select! {
            next = reader.next() => next,
            _ = wr.get_mut().stopped() => return,
        };
        let frame = match next {
            Ok(Some(data)) => LogFrame::Chunk { data },
            Ok(None) => LogFrame::End(reader.end()),
            Err(e) => refuse(e),
        };
        let last = !matches!(frame, LogFrame::Chunk { .. });
        if wr.send(&frame).await.is_err() {
            return;
        }
        if last {
            let _ = wr.get_mut().finish();
            let _ = tokio::time::timeout(Duration::from_secs(5), wr.get_mut().stopped()).await;
            return;
        }
    }
}
