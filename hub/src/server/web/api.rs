//! The HTTP JSON API under `/api/v1/`: the operator API's reads and writes as
//! JSON, authenticated by API tokens (or the dashboard's session), and the
//! event stream as Server-Sent Events. Documented in API.md.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use muster_protocol::msg::{
    LogQuery, LogStream, OpRequest, OpResponse, SubmitRequest, TimeoutAction,
};
use muster_protocol::{EventSeq, Generation, TaskId};
use serde::Deserialize;
use serde_json::Value;

use super::{ApiError, AppState, Caller, WebState};
use crate::core::TaskState;
use crate::server::logs::{LogPiece, LogRelay};
use crate::store::TaskFilter;

/// How often an idle event stream sends a comment, so proxies keep it open
/// and a dead peer is noticed.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The `/api/v1/` routes, and the answer to any path no route has.
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/agents", get(agents))
        .route("/api/v1/agents/{name}", get(agent))
        .route("/api/v1/agents/{name}/drain", post(drain))
        .route("/api/v1/agents/{name}/undrain", post(undrain))
        .route("/api/v1/tasks", get(tasks).post(submit))
        .route("/api/v1/tasks/{id}", get(task))
        .route("/api/v1/tasks/{id}/cancel", post(cancel))
        .route("/api/v1/tasks/{id}/requeue", post(requeue))
        .route("/api/v1/alerts", get(alerts))
        .route("/api/v1/stats", get(stats))
        .route("/api/v1/tasks/{id}/logs", get(logs))
        .route("/api/v1/events", get(events))
        // Only the routes above: a page's wrong method is the pages' business.
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
}

/// An unknown `/api/` path gets a JSON 404; any other path a page saying so.
async fn not_found(uri: Uri) -> Response {
    if uri.path().starts_with("/api/") {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no endpoint {}; API.md lists them", uri.path()),
        )
        .into_response()
    } else {
        super::pages::explain(
            StatusCode::NOT_FOUND,
            "No such page",
            "Try the fleet, tasks or alerts view.",
        )
    }
}

/// A known endpoint asked with a method it does not take (axum adds `Allow`).
async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!(
            "{} does not take {method}; the Allow header and API.md list what it takes",
            uri.path()
        ),
    )
}

/// Query parameters, or a JSON error naming the one that was not understood.
fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(q)| q).map_err(|e| {
        ApiError::invalid(format!(
            "the query string was not understood: {}; API.md lists each endpoint's parameters",
            e.body_text()
        ))
    })
}

/// An agent's name from the path, or a JSON error.
fn agent_name(name: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    name.map(|Path(n)| n)
        .map_err(|_| ApiError::invalid("an agent's name in the path must be UTF-8 text"))
}

/// `GET /api/v1/agents`.
async fn agents(State(web): WebState, caller: Caller) -> Result<Json<Value>, ApiError> {
    web.op(&caller, OpRequest::Agents).await.map(Json)
}

/// `POST /api/v1/agents/{name}/drain`: no new work for it.
async fn drain(
    State(web): WebState,
    caller: Caller,
    name: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let name = agent_name(name)?;
    web.op(&caller, OpRequest::AgentDrain { name })
        .await
        .map(Json)
}

/// `POST /api/v1/agents/{name}/undrain`: work for it again.
async fn undrain(
    State(web): WebState,
    caller: Caller,
    name: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let name = agent_name(name)?;
    web.op(&caller, OpRequest::AgentUndrain { name })
        .await
        .map(Json)
}

/// A task id from the path, or a JSON error saying what an id looks like.
fn task_id(id: Result<Path<u64>, PathRejection>) -> Result<TaskId, ApiError> {
    match id {
        Ok(Path(id)) if id > 0 => Ok(TaskId(id)),
        _ => Err(ApiError::invalid(
            "a task id is a positive whole number, e.g. /api/v1/tasks/42",
        )),
    }
}

/// `GET /api/v1/tasks/{id}`: the task, its attempts, usage and activity.
async fn task(
    State(web): WebState,
    caller: Caller,
    id: Result<Path<u64>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let id = task_id(id)?;
    web.op(&caller, OpRequest::TaskShow { id }).await.map(Json)
}

/// `POST /api/v1/tasks/{id}/cancel`.
async fn cancel(
    State(web): WebState,
    caller: Caller,
    id: Result<Path<u64>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let id = task_id(id)?;
    web.op(&caller, OpRequest::TaskCancel { id })
        .await
        .map(Json)
}

/// `POST /api/v1/tasks/{id}/requeue`: run a finished task again.
async fn requeue(
    State(web): WebState,
    caller: Caller,
    id: Result<Path<u64>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let id = task_id(id)?;
    web.op(&caller, OpRequest::TaskRequeue { id })
        .await
        .map(Json)
}

/// `GET /api/v1/alerts`: the open alerts.
async fn alerts(State(web): WebState, caller: Caller) -> Result<Json<Value>, ApiError> {
    web.op(&caller, OpRequest::Alerts).await.map(Json)
}

/// `GET /api/v1/stats`: coordination figures, usage per task, agent and label.
async fn stats(State(web): WebState, caller: Caller) -> Result<Json<Value>, ApiError> {
    web.op(&caller, OpRequest::Stats).await.map(Json)
}

/// A submission as JSON: only `title` is required.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SubmitBody {
    title: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    capabilities: Vec<String>,
    #[serde(default)]
    priority: i32,
    max_attempts: Option<u32>,
    timeout_ms: Option<u64>,
    #[serde(default)]
    timeout_action: TimeoutAction,
    #[serde(default)]
    after: Vec<u64>,
    repo: Option<String>,
    base: Option<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

impl SubmitBody {
    /// The wire request, with the idempotency key from the header.
    pub(super) fn request(self, key: Option<String>) -> SubmitRequest {
        SubmitRequest {
            title: self.title,
            description: self.description,
            capabilities: self.capabilities,
            priority: self.priority,
            max_attempts: self.max_attempts,
            timeout_ms: self.timeout_ms,
            timeout_action: self.timeout_action,
            after: self.after.into_iter().map(TaskId).collect(),
            key,
            repo: self.repo,
            base: self.base,
            env: self.env.into_iter().collect(),
            labels: self.labels.into_iter().collect(),
        }
    }
}

/// Longest `Idempotency-Key` accepted (the hub checks the key's content).
const IDEMPOTENCY_KEY_MAX: usize = 256;

/// `POST /api/v1/tasks`: submit one task. With an `Idempotency-Key` header, a
/// repeat of the same submission answers with the task made the first time.
async fn submit(
    State(web): WebState,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Json<SubmitBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let body = json_body(body)?;
    let key = match headers.get("idempotency-key") {
        Some(v) => {
            let k = v.to_str().map_err(|_| {
                ApiError::invalid("the Idempotency-Key header must be printable ASCII")
            })?;
            if k.is_empty() || k.len() > IDEMPOTENCY_KEY_MAX {
                return Err(ApiError::invalid(format!(
                    "the Idempotency-Key header must be 1 to {IDEMPOTENCY_KEY_MAX} characters"
                )));
            }
            Some(k.to_string())
        }
        None => None,
    };
    let v = web
        .op(&caller, OpRequest::Submit(body.request(key)))
        .await?;
    // A repeat of a keyed submission is not a new resource.
    let status = if v["existing"].as_bool() == Some(true) {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    let mut res = (status, Json(v.clone())).into_response();
    if let Some(Ok(location)) = v["id"]
        .as_u64()
        .map(|id| HeaderValue::from_str(&format!("/api/v1/tasks/{id}")))
    {
        res.headers_mut().insert(header::LOCATION, location);
    }
    Ok(res)
}

/// A JSON body, or an error that says what was wrong with it: 413 past the
/// body limit (the QUIC API's largest frame), 415 without the JSON content
/// type, 400 for anything else.
pub(super) fn json_body<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    body.map(|Json(b)| b).map_err(|e| match e {
        JsonRejection::MissingJsonContentType(_) => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as JSON with `Content-Type: application/json`",
        ),
        other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            "the body is larger than the hub takes ([limits] max_frame_bytes, 1 MiB at most); send less (a long description belongs in the repository)",
        ),
        other => ApiError::invalid(format!(
            "the JSON body was not understood: {}",
            other.body_text()
        )),
    })
}

/// `GET /api/v1/agents/{name}`.
async fn agent(
    State(web): WebState,
    caller: Caller,
    name: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let name = agent_name(name)?;
    web.op(&caller, OpRequest::AgentShow { name })
        .await
        .map(Json)
}

/// The filters of a task listing, as query parameters.
#[derive(Debug, Default, Deserialize)]
pub(super) struct TasksQuery {
    /// Only this state.
    pub(super) state: Option<String>,
    /// Only tasks whose latest attempt ran on this agent.
    pub(super) agent: Option<String>,
    /// Only tasks with this label, as `key=value`.
    pub(super) label: Option<String>,
    /// Only tasks requiring this capability.
    pub(super) capability: Option<String>,
    /// Only tasks whose title contains this text.
    pub(super) q: Option<String>,
    /// Page length (1 to 1000; default 50).
    pub(super) limit: Option<u32>,
    /// Continue below this task id (`next_cursor` of the page before).
    pub(super) cursor: Option<u64>,
}

/// Longest title search accepted.
const SEARCH_MAX: usize = 200;

impl TasksQuery {
    /// The store's filter, or what is wrong with a parameter.
    pub(super) fn filter(&self) -> Result<TaskFilter, ApiError> {
        let nonempty = |o: &Option<String>| o.clone().filter(|s| !s.trim().is_empty());
        let state = match nonempty(&self.state) {
            Some(s) => Some(TaskState::parse(&s).ok_or_else(|| {
                ApiError::invalid(format!(
                    "state {s:?} is not a state; use one of blocked, queued, assigned, accepted, running, completed, failed, cancelled"
                ))
            })?),
            None => None,
        };
        let label = match nonempty(&self.label) {
            Some(l) => {
                let (k, v) = l.split_once('=').ok_or_else(|| {
                    ApiError::invalid(format!(
                        "label {l:?} must be key=value, e.g. label=team=infra"
                    ))
                })?;
                muster_protocol::work::check_label_key(k)
                    .map_err(|m| ApiError::invalid(format!("label: {m}")))?;
                Some((k.to_string(), v.to_string()))
            }
            None => None,
        };
        let search = nonempty(&self.q);
        if search.as_ref().is_some_and(|q| q.len() > SEARCH_MAX) {
            return Err(ApiError::invalid(format!(
                "q is longer than {SEARCH_MAX} bytes; search for a shorter part of the title"
            )));
        }
        Ok(TaskFilter {
            state,
            agent: nonempty(&self.agent),
            label,
            capability: nonempty(&self.capability),
            search,
        })
    }
}

/// Tasks per page unless `limit` says otherwise.
pub(super) const PAGE_DEFAULT: u32 = 50;

/// `GET /api/v1/tasks?state=&agent=&label=k=v&capability=&q=&limit=&cursor=`:
/// newest first, a page at a time; pass `next_cursor` as `cursor` for the next.
async fn tasks(
    State(web): WebState,
    caller: Caller,
    q: Result<Query<TasksQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let q = query(q)?;
    let filter = q.filter()?;
    web.tasks(&caller, filter, q.limit.unwrap_or(PAGE_DEFAULT), q.cursor)
        .await
        .map(Json)
}

#[derive(Deserialize)]
struct EventsQuery {
    /// Resume from this sequence number (inclusive).
    from: Option<u64>,
}

/// `GET /api/v1/events`: every event as it is committed, as SSE with the
/// sequence number as the event id; a reconnect with `Last-Event-ID` resumes
/// after it (or `?from=N` starts at N).
async fn events(
    State(web): WebState,
    caller: Caller,
    headers: HeaderMap,
    q: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let q = query(q)?;
    let last = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(|s| {
            s.trim()
                .parse::<u64>()
                .map_err(|_| ApiError::invalid("Last-Event-ID must be an event's sequence number"))
        })
        .transpose()?;
    let from = last.map(|l| l.saturating_add(1)).or(q.from).map(EventSeq);
    let (mut rx, permit) = web.watch(&caller, from).await?;
    let stream = async_stream(move |tx| async move {
        let _permit = permit;
        while let Some(msg) = rx.recv().await {
            let ev = match msg {
                OpResponse::Event { seq, json } if seq.0 > 0 => {
                    Event::default().id(seq.0.to_string()).data(json)
                }
                // Notes without a place in the log (a pruned gap, snapshot rows).
                OpResponse::Event { json, .. } => Event::default().event("note").data(json),
                OpResponse::Error(e) => {
                    let body = ApiError::of_response(OpResponse::Error(e)).body();
                    let _ = tx
                        .send(Event::default().event("error").data(body.to_string()))
                        .await;
                    return;
                }
                _ => continue,
            };
            if tx.send(ev).await.is_err() {
                return;
            }
        }
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response())
}

/// A stream fed by a task through a small channel: the producer waits while
/// the client reads slowly, so nothing piles up in the hub.
fn async_stream<F, Fut>(
    f: F,
) -> impl futures::Stream<Item = Result<Event, Infallible>> + Send + 'static
where
    F: FnOnce(tokio::sync::mpsc::Sender<Event>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(64);
    let task = tokio::spawn(f(tx));
    let guard = AbortOnDrop(task);
    futures::stream::unfold((rx, guard), |(mut rx, guard)| async move {
        rx.recv().await.map(|ev| (Ok(ev), (rx, guard)))
    })
}

/// Ends the producer when the client goes away.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

// === Task logs ===

/// The parameters of `GET /api/v1/tasks/{id}/logs`.
#[derive(Debug, Default, Deserialize)]
struct LogsQuery {
    /// The attempt's generation; the latest when absent.
    attempt: Option<u64>,
    /// `stdout` (the default) or `stderr`.
    stream: Option<String>,
    /// Only the last this many lines.
    tail: Option<u64>,
    /// `1`/`true`: keep sending until the attempt ends, as SSE.
    follow: Option<String>,
}

impl LogsQuery {
    /// The relay's query for task `task`, or what is wrong with a parameter.
    fn to_query(&self, task: TaskId) -> Result<LogQuery, ApiError> {
        let generation = match self.attempt {
            Some(0) => {
                return Err(ApiError::invalid(
                    "attempt is a generation, numbered from 1; leave it out for the latest",
                ));
            }
            g => g.map(Generation),
        };
        let stream = match self.stream.as_deref() {
            None | Some("stdout") => LogStream::Stdout,
            Some("stderr") => LogStream::Stderr,
            Some(other) => {
                return Err(ApiError::invalid(format!(
                    "stream {other:?} is not an output stream; use stdout or stderr"
                )));
            }
        };
        let follow = match self.follow.as_deref() {
            None | Some("0" | "false" | "no") => false,
            // A bare `?follow` asks to follow.
            Some("" | "1" | "true" | "yes") => true,
            Some(other) => {
                return Err(ApiError::invalid(format!(
                    "follow {other:?} is not a yes or no; use follow=1 or leave it out"
                )));
            }
        };
        Ok(LogQuery {
            task,
            generation,
            stream,
            tail: self.tail,
            follow,
        })
    }
}

/// `GET /api/v1/tasks/{id}/logs?attempt=G&stream=stdout|stderr&tail=N&follow=1`:
/// an attempt's output relayed from the sidecar that holds it, as `task logs`.
///
/// Without `follow`, the bytes as they are (`text/plain`), streamed: the hub
/// holds one chunk at a time. Errors known before the first byte are JSON
/// errors with their status; a sidecar lost midway cuts the body short.
///
/// With `follow=1`, Server-Sent Events: `chunk` (`{"text"}`, UTF-8, lossy),
/// then `end` (the summary with `why`) when the attempt ends, or `error`
/// (`{"error": {"code", "message", "status"}}`) when the log cannot be read.
/// Nothing follows either; the hub closes the stream.
async fn logs(
    State(web): WebState,
    caller: Caller,
    id: Result<Path<u64>, PathRejection>,
    q: Result<Query<LogsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let id = task_id(id)?;
    let log_query = query(q)?.to_query(id)?;
    if log_query.follow {
        return Ok(follow_logs(web, caller, log_query));
    }
    let mut relay = web.logs(&caller, log_query).await?;
    // The first piece before the status: a log the sidecar cannot read is a
    // 404 or 409 with the reason, not an empty 200.
    let first = relay.next().await.map_err(ApiError::of_response)?;
    let mut res = Response::new(axum::body::Body::from_stream(log_body(first, relay)));
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    Ok(res)
}

/// The body of a plain log read: the first piece, then one piece per poll,
/// so the next chunk is read from the sidecar only once hyper took the one
/// before. An error midway ends the body with an error, which cuts the
/// connection: the client sees a short read, not a complete-looking log.
fn log_body(
    first: LogPiece,
    relay: LogRelay,
) -> impl futures::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send + 'static {
    futures::stream::unfold((Some(first), Some(relay)), |(pending, relay)| async move {
        let mut relay = relay?;
        let piece = match pending {
            Some(p) => Ok(p),
            None => relay.next().await,
        };
        match piece {
            Ok(LogPiece::Chunk(data)) => Some((Ok(data.into()), (None, Some(relay)))),
            Ok(LogPiece::End(_)) => None,
            Err(e) => {
                let why = ApiError::of_response(e).message;
                tracing::debug!(task = %relay.task, "log body cut short: {why}");
                Some((Err(std::io::Error::other(why)), (None, None)))
            }
        }
    })
}

/// How often a followed log checks that its caller is still valid, so a
/// revoked or expired token (or an ended session) stops reading within this.
/// One round trip to the core per open follower ([`LOG_RELAYS_MAX`] at most).
///
/// [`LOG_RELAYS_MAX`]: crate::server::logs::LOG_RELAYS_MAX
const FOLLOW_RECHECK: Duration = Duration::from_secs(5);

/// Where a followed log's event stream is.
enum Follow {
    /// Not opened yet: the relay opens on the first poll, so the client has
    /// its 200 and can show "connecting" while the hub finds the sidecar.
    Start(AppState, Caller, LogQuery),
    /// Relaying (boxed: one allocation per stream keeps the state small).
    Relaying(Box<Relaying>),
    /// One last event to send (the `end` after the last characters).
    Last(Event),
    /// `end` or `error` was sent.
    Done,
}

/// A followed log being relayed.
struct Relaying {
    web: AppState,
    /// Who asked: the caller's fingerprint and session, rechecked every
    /// [`FOLLOW_RECHECK`]. Not the `Caller` itself, which would count this
    /// long stream as a request in flight.
    who: (String, Option<String>),
    relay: LogRelay,
    /// The bytes of a UTF-8 character split between chunks wait here.
    carry: Utf8Carry,
    recheck_at: tokio::time::Instant,
}

/// `GET …/logs?follow=1`: the relay as Server-Sent Events, without a task or
/// a buffer of its own: the next chunk is read when hyper wants the next event.
fn follow_logs(web: AppState, caller: Caller, query: LogQuery) -> Response {
    let events = futures::stream::unfold(Follow::Start(web, caller, query), |state| async move {
        let mut r = match state {
            Follow::Done => return None,
            Follow::Last(ev) => return Some((Ok::<_, Infallible>(ev), Follow::Done)),
            Follow::Start(web, caller, query) => match web.logs(&caller, query).await {
                Ok(relay) => Box::new(Relaying {
                    who: (
                        caller.fingerprint.clone(),
                        caller.session.as_ref().map(|(id, _)| id.clone()),
                    ),
                    web,
                    relay,
                    carry: Utf8Carry::default(),
                    recheck_at: tokio::time::Instant::now() + FOLLOW_RECHECK,
                }),
                Err(e) => return Some((Ok(error_event(&e)), Follow::Done)),
            },
            Follow::Relaying(r) => r,
        };
        let (ev, next) = r.next_event().await;
        Some((Ok(ev), next.unwrap_or(Follow::Relaying(r))))
    });
    Sse::new(events)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response()
}

impl Relaying {
    /// The next event, and the state after it (`None`: still relaying).
    async fn next_event(&mut self) -> (Event, Option<Follow>) {
        loop {
            // `LogRelay::next` is cancel safe: a recheck loses no output.
            let piece = tokio::select! {
                p = self.relay.next() => p,
                () = tokio::time::sleep_until(self.recheck_at) => {
                    self.recheck_at = tokio::time::Instant::now() + FOLLOW_RECHECK;
                    let (fingerprint, session) = &self.who;
                    // A hub too busy to answer is not a reason to stop reading.
                    if let Ok(false) = self.web.still_valid(fingerprint, session.as_deref()).await {
                        let e = ApiError::unauthenticated(
                            "this credential was revoked or has expired (or the session ended); the log stream is closed",
                        );
                        return (error_event(&e), Some(Follow::Done));
                    }
                    continue;
                }
            };
            match piece {
                Ok(LogPiece::Chunk(data)) => {
                    let text = self.carry.push(&data);
                    if text.is_empty() {
                        // Only part of a character so far: wait for the rest.
                        continue;
                    }
                    return (chunk_event(&text), None);
                }
                Ok(LogPiece::End(mut doc)) => {
                    doc["why"] = if doc["ended"] == true {
                        "the attempt ended; all its output was sent"
                    } else {
                        "all output so far was sent (the attempt had not ended)"
                    }
                    .into();
                    let end = Event::default().event("end").data(doc.to_string());
                    // A character cut off by the end of the output, as U+FFFD.
                    let rest = self.carry.finish();
                    if rest.is_empty() {
                        return (end, Some(Follow::Done));
                    }
                    return (chunk_event(&rest), Some(Follow::Last(end)));
                }
                Err(e) => {
                    let e = ApiError::of_response(e);
                    return (error_event(&e), Some(Follow::Done));
                }
            }
        }
    }
}

/// A `chunk` event: `{"text": "…"}`.
fn chunk_event(text: &str) -> Event {
    Event::default()
        .event("chunk")
        .data(serde_json::json!({ "text": text }).to_string())
}

/// An `error` event: the API's error body, with the status the same error
/// has without `follow`.
fn error_event(e: &ApiError) -> Event {
    let mut body = e.body();
    body["error"]["status"] = e.status.as_u16().into();
    Event::default().event("error").data(body.to_string())
}

/// Turns chunks of bytes into text without splitting a UTF-8 character
/// across two events: at most 3 bytes of an unfinished character wait for
/// the next chunk; bytes that can never be UTF-8 become U+FFFD.
#[derive(Debug, Default)]
struct Utf8Carry {
    held: Vec<u8>,
}

impl Utf8Carry {
    /// The text of `chunk` (after what was held), holding back an unfinished
    /// character at its end.
    fn push(&mut self, chunk: &[u8]) -> String {
        let mut bytes = std::mem::take(&mut self.held);
        bytes.extend_from_slice(chunk);
        let keep = match std::str::from_utf8(&bytes) {
            Ok(_) => 0,
            // `error_len() == None`: the input ended inside a character.
            Err(e) if e.error_len().is_none() => bytes.len() - e.valid_up_to(),
            Err(_) => unfinished_tail(&bytes),
        };
        self.held = bytes.split_off(bytes.len() - keep);
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// What is still held, as text (U+FFFD for a cut-off character).
    fn finish(&mut self) -> String {
        String::from_utf8_lossy(&std::mem::take(&mut self.held)).into_owned()
    }
}

/// Length of an unfinished UTF-8 character at the end of `bytes` (0 to 3),
/// when an invalid byte earlier hides it from `from_utf8`.
fn unfinished_tail(bytes: &[u8]) -> usize {
    let start = bytes.len().saturating_sub(3);
    for i in (start..bytes.len()).rev() {
        let b = bytes[i];
        if b & 0b1100_0000 == 0b1000_0000 {
            continue; // a continuation byte: look further back for the lead
        }
        let need = match b {
            0xC2..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF4 => 4,
            _ => return 0,
        };
        let have = bytes.len() - i;
        return if have < need { have } else { 0 };
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn characters_split_between_chunks_are_joined() {
        let text = "añ€😀z";
        let bytes = text.as_bytes();
        // Every way of cutting the text in two gives it back whole.
        for cut in 0..=bytes.len() {
            let mut c = Utf8Carry::default();
            let mut got = c.push(&bytes[..cut]);
            got += &c.push(&bytes[cut..]);
            got += &c.finish();
            assert_eq!(got, text, "cut at {cut}");
        }
        // One byte at a time, too.
        let mut c = Utf8Carry::default();
        let got: String = bytes.iter().map(|b| c.push(&[*b])).collect();
        assert_eq!(got, text);
    }

    #[test]
    fn bytes_that_are_not_utf8_become_replacement_characters() {
        let mut c = Utf8Carry::default();
        assert_eq!(c.push(b"a\xffb"), "a\u{fffd}b");
        // An invalid byte, then a character cut at the chunk's end.
        assert_eq!(c.push(b"\xff\xe2\x82"), "\u{fffd}");
        assert_eq!(c.push(b"\xac!"), "€!");
        // A cut-off character at the very end.
        assert_eq!(c.push(b"\xf0\x9f"), "");
        assert_eq!(c.finish(), "\u{fffd}");
        assert!(c.held.len() <= 3);
    }

    #[test]
    fn log_parameters_are_checked() {
        let q = |s: &str| {
            let uri: Uri = format!("/x?{s}").parse().expect("a URI");
            let Query(q) = Query::<LogsQuery>::try_from_uri(&uri).expect("parses");
            q.to_query(TaskId(7))
        };
        let lq = q("").expect("defaults");
        assert_eq!(
            (lq.generation, lq.stream, lq.tail, lq.follow),
            (None, LogStream::Stdout, None, false)
        );
        let lq = q("attempt=2&stream=stderr&tail=5&follow=1").expect("all");
        assert_eq!(
            (lq.generation, lq.stream, lq.tail, lq.follow),
            (Some(Generation(2)), LogStream::Stderr, Some(5), true)
        );
        assert!(q("follow").expect("bare follow").follow);
        assert!(q("attempt=0").is_err());
        assert!(q("stream=stdin").is_err());
        assert!(q("follow=maybe").is_err());
    }
}
