//! `watch`: follow the event log live.

use std::time::Duration;

use crate::cli::{CliError, ConnectArgs};
use muster_protocol::EventSeq;
use muster_protocol::client::{self};
use muster_protocol::msg::OpRequest;

/// Exit code: the hub could not be reached (EX_UNAVAILABLE).
pub(crate) const EXIT_UNREACHABLE: i32 = 69;
/// Exit code of `task wait` / `submit --wait`: the task was cancelled.
pub(crate) const EXIT_CANCELLED: i32 = 3;
/// Longest pause between reconnection attempts.
const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// The event log as a stream that survives hub restarts: on a lost
/// connection it reconnects with backoff and resumes after the last event it
/// gave out, so no event is missed or repeated.
pub(crate) struct Events<'a> {
    connect: &'a ConnectArgs,
    /// The next sequence number wanted (`None`: from now).
    next: Option<u64>,
    stream: Option<(
        crate::cli::Session,
        muster_protocol::FrameWriter,
        muster_protocol::FrameReader,
    )>,
    /// Give up after being unable to reach the hub this long (`None`: never).
    patience: Option<Duration>,
    /// Whether a reconnect happened since the caller last asked.
    pub(crate) resumed: bool,
}

impl<'a> Events<'a> {
    /// A stream from `from` (`None`: from now).
    pub(crate) fn new(
        connect: &'a ConnectArgs,
        from: Option<u64>,
        patience: Option<Duration>,
    ) -> Self {
        Events {
            connect,
            next: from,
            stream: None,
            patience,
            resumed: false,
        }
    }

    async fn open(&mut self) -> Result<(), CliError> {
        use muster_protocol::msg::{Open, OpenBody};
        let s = self.connect.connect().await?;
        let (send, recv) = s.conn.open_bi().await.map_err(client::refused_or_lost)?;
        let (mut wr, rd) =
            muster_protocol::framed(send, recv, muster_protocol::limits::FRAME_BYTES_MAX);
        let open = Open {
            protocol: muster_protocol::PROTOCOL_VERSION,
            body: OpenBody::Request(OpRequest::Watch {
                from: self.next.map(EventSeq),
            }),
        };
        wr.send(&open)
            .await
            .map_err(|e| unreachable(format!("opening the event stream: {e}")))?;
        self.stream = Some((s, wr, rd));
        Ok(())
    }

    /// Opens the stream now (it starts at the hub's next event), so a read of
    /// state made after this misses nothing the stream will not show.
    pub(crate) async fn ensure_open(&mut self) -> Result<(), CliError> {
        if self.stream.is_none() {
            self.open().await?;
        }
        Ok(())
    }

    /// The next event: its sequence number (0 for notes outside the log) and JSON.
    pub(crate) async fn next(&mut self) -> Result<(u64, serde_json::Value), CliError> {
        use muster_protocol::msg::OpResponse;
        let mut backoff = Duration::from_millis(200);
        let mut down_since: Option<std::time::Instant> = None;
        loop {
            if self.stream.is_none() {
                match self.open().await {
                    Ok(()) => {
                        if down_since.is_some() {
                            self.resumed = true;
                            eprintln!("muster-hub: reconnected; resuming the event stream");
                        }
                    }
                    Err(e) if e.code == EXIT_UNREACHABLE => {
                        let since = *down_since.get_or_insert_with(std::time::Instant::now);
                        if self.patience.is_some_and(|p| since.elapsed() >= p) {
                            return Err(e);
                        }
                        eprintln!(
                            "muster-hub: {}; retrying in {:.1} s",
                            e.message,
                            backoff.as_secs_f64()
                        );
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(RECONNECT_MAX);
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            }
            let Some((_, _, rd)) = self.stream.as_mut() else {
                continue;
            };
            match rd.recv::<OpResponse>().await {
                Ok(Some(OpResponse::Event { seq, json })) => {
                    if seq.0 > 0 {
                        self.next = Some(seq.0 + 1);
                    }
                    let v = serde_json::from_str(&json).unwrap_or_default();
                    return Ok((seq.0, v));
                }
                Ok(Some(OpResponse::Error(e))) => return Err(CliError::fail(e.message)),
                Ok(Some(_)) => {}
                // The hub went away (a restart, say): reconnect and resume; but a
                // credential the hub revoked ends the stream for good.
                Ok(None) | Err(_) => {
                    let closed = self
                        .stream
                        .take()
                        .and_then(|(s, _, _)| s.conn.close_reason());
                    if let Some(reason) = closed
                        && let e @ client::ClientError::Refused(_) = client::refused_or_lost(reason)
                    {
                        return Err(e.into());
                    }
                    down_since.get_or_insert_with(std::time::Instant::now);
                }
            }
        }
    }
}

fn unreachable(message: String) -> CliError {
    CliError {
        code: EXIT_UNREACHABLE,
        message,
    }
}

pub(crate) async fn watch(
    connect: &ConnectArgs,
    from: Option<u64>,
    json: bool,
) -> Result<(), CliError> {
    let mut events = Events::new(connect, from, None);
    loop {
        let (seq, mut v) = events.next().await?;
        if json {
            v["seq"] = seq.into();
            println!("{v}");
        } else {
            println!("{}", event_line(seq, &v));
        }
    }
}

/// One event as a line a person reads: sequence, kind and what happened.
pub(crate) fn event_line(seq: u64, v: &serde_json::Value) -> String {
    let text = |k: &str| v[k].as_str().unwrap_or_default().to_string();
    let line = match v["kind"].as_str().unwrap_or_default() {
        "task" => format!(
            "task {} {} -> {}{}  {}",
            v["id"],
            text("from"),
            text("state"),
            v["agent"]
                .as_str()
                .map(|a| format!(" on {a}"))
                .unwrap_or_default(),
            text("why")
        ),
        "progress" => format!(
            "task {} progress on {}: {}",
            v["id"],
            text("agent"),
            text("note")
        ),
        "agent" => format!("agent {} {}  {}", text("name"), text("state"), text("why")),
        "alert" => format!(
            "alert {} {} {}: {}",
            text("alert"),
            text("state"),
            text("subject"),
            text("message")
        ),
        "audit" => format!("{} by {}: {}", text("action"), text("who"), text("subject")),
        "pruned" => format!(
            "events before {} were pruned; showing the live tasks, then what happens next",
            v["oldest"]
        ),
        "snapshot_task" => format!("task {} is {}: {}", v["id"], text("state"), text("title")),
        other => format!("{other} {v}"),
    };
    let seq = if seq > 0 { seq.to_string() } else { "-".into() };
    crate::cli::escape_controls(&format!("{seq:>8}  {line}"), false)
}

/// Follows task `id` until it ends: prints its state changes and progress
/// notes as they happen (from the event stream, resumed across hub restarts),
/// then the task; the exit code says how it ended (0 completed, 1 failed, 3
/// cancelled, 69 hub unreachable).
pub(crate) async fn wait_task(
    connect: &ConnectArgs,
    id: muster_protocol::TaskId,
    json: bool,
) -> Result<(), CliError> {
    // Open the stream first, then read the task: a change between the two is
    // in the stream, so nothing is missed.
    let mut events = Events::new(connect, None, Some(HUB_PATIENCE));
    let started = std::time::Instant::now();
    let show = || crate::cli::dispatch::one(connect, OpRequest::TaskShow { id });
    events.ensure_open().await?;
    let v = show().await?;
    let mut state = v["state"].as_str().unwrap_or_default().to_string();
    if !json {
        eprintln!(
            "{:>7.1}s  task {id} {state}",
            started.elapsed().as_secs_f64()
        );
    }
    while !is_final(&state) {
        let (_, ev) = events.next().await?;
        if events.resumed {
            // Events may have been pruned while away: the task's own record says where it is.
            events.resumed = false;
            let v = show().await?;
            state = v["state"].as_str().unwrap_or_default().to_string();
            continue;
        }
        if ev["id"].as_u64() != Some(id.0) {
            continue;
        }
        match ev["kind"].as_str() {
            Some("task") => {
                state = ev["state"].as_str().unwrap_or_default().to_string();
                if !json {
                    eprintln!(
                        "{:>7.1}s  {state}{}  {}",
                        started.elapsed().as_secs_f64(),
                        ev["agent"]
                            .as_str()
                            .map(|a| format!(" on {a}"))
                            .unwrap_or_default(),
                        crate::cli::escape_controls(ev["why"].as_str().unwrap_or_default(), false)
                    );
                }
            }
            Some("progress") if !json => eprintln!(
                "{:>7.1}s  progress: {}",
                started.elapsed().as_secs_f64(),
                crate::cli::escape_controls(ev["note"].as_str().unwrap_or_default(), false)
            ),
            _ => {}
        }
    }
    let v = show().await?;
    crate::cli::print(&v, json, crate::cli::task_detail);
    match v["state"].as_str().unwrap_or_default() {
        "completed" => Ok(()),
        "cancelled" => Err(CliError {
            code: EXIT_CANCELLED,
            message: format!("task {id} was cancelled"),
        }),
        other => Err(CliError::fail(format!("task {id} ended {other}"))),
    }
}

/// How long `task wait` keeps trying to reach a hub that went away.
const HUB_PATIENCE: Duration = Duration::from_secs(60);

fn is_final(state: &str) -> bool {
    matches!(state, "completed" | "failed" | "cancelled")
}

/// `task logs`: an attempt's output, relayed by the hub from its sidecar.
/// Raw bytes on stdout (control characters escaped when it is a terminal);
/// with `json`, one document per chunk and a last one that sums up.
pub(crate) async fn logs(
    connect: &ConnectArgs,
    query: muster_protocol::msg::LogQuery,
    json: bool,
) -> Result<(), CliError> {
    use muster_protocol::msg::{OpResponse, Open, OpenBody};
    use std::io::{IsTerminal, Write};
    let s = connect.connect().await?;
    let (send, recv) = s.conn.open_bi().await.map_err(client::refused_or_lost)?;
    let (mut wr, mut rd) =
        muster_protocol::framed(send, recv, muster_protocol::limits::FRAME_BYTES_MAX);
    let open = Open {
        protocol: muster_protocol::PROTOCOL_VERSION,
        body: OpenBody::Request(OpRequest::TaskLogs(query)),
    };
    wr.send(&open)
        .await
        .map_err(|e| CliError::fail(e.to_string()))?;
    let mut out = std::io::stdout().lock();
    let terminal = out.is_terminal();
    let written = |e: std::io::Error| CliError::fail(format!("writing the log: {e}"));
    loop {
        match rd.recv::<OpResponse>().await {
            Ok(Some(OpResponse::LogChunk { data })) => {
                if json {
                    let doc = serde_json::json!({
                        "bytes": data.len(),
                        "text": String::from_utf8_lossy(&data),
                    });
                    writeln!(out, "{doc}").map_err(written)?;
                } else if terminal {
                    let text = String::from_utf8_lossy(&data);
                    out.write_all(crate::cli::escape_controls(&text, true).as_bytes())
                        .map_err(written)?;
                } else {
                    out.write_all(&data).map_err(written)?;
                }
                // Followers see each chunk as it comes.
                out.flush().map_err(written)?;
            }
            Ok(Some(OpResponse::Ok { json: doc })) => {
                if json {
                    writeln!(out, "{doc}").map_err(written)?;
                } else {
                    let v: serde_json::Value = serde_json::from_str(&doc).unwrap_or_default();
                    let cut = v["cut_bytes"].as_u64().unwrap_or(0);
                    if cut > 0 {
                        eprintln!(
                            "muster: {cut} bytes in the middle of this log were cut ([logs] max_bytes_per_attempt on agent {})",
                            v["agent"].as_str().unwrap_or("?")
                        );
                    }
                }
                break;
            }
            Ok(Some(OpResponse::Error(e))) => return Err(CliError::fail(e.message)),
            Ok(Some(OpResponse::Event { .. })) => {}
            Ok(None) => return Err(CliError::fail("the hub ended the log stream early")),
            Err(e) => return Err(CliError::fail(format!("log stream: {e}"))),
        }
    }
    Ok(())
}
