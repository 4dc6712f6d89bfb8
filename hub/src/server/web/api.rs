//! The HTTP JSON API under `/api/v1/`: the operator API's reads and writes as
//! JSON, authenticated by API tokens (or the dashboard's session), and the
//! event stream as Server-Sent Events. Documented in API.md.

use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::Router;
use std::collections::BTreeMap;

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use muster_protocol::EventSeq;
use muster_protocol::TaskId;
use muster_protocol::msg::OpResponse;
use muster_protocol::msg::{OpRequest, SubmitRequest, TimeoutAction};
use serde::Deserialize;
use serde_json::Value;

use super::{ApiError, AppState, Caller, WebState};
use crate::core::TaskState;
use crate::store::TaskFilter;

/// How often an idle event stream sends a comment, so proxies keep it open
/// and a dead peer is noticed.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

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
        .route("/api/v1/events", get(events))
        .fallback(not_found)
}

async fn not_found(uri: axum::http::Uri) -> Response {
    if uri.path().starts_with("/api/") {
        ApiError::new(
            axum::http::StatusCode::NOT_FOUND,
            "not_found",
            format!("no endpoint {}; API.md lists them", uri.path()),
        )
        .into_response()
    } else {
        super::pages::explain(
            axum::http::StatusCode::NOT_FOUND,
            "No such page",
            "Try the fleet, tasks or alerts view.",
        )
    }
}

/// `GET /api/v1/agents`.
async fn agents(State(web): WebState, caller: Caller) -> Result<Json<Value>, ApiError> {
    web.op(&caller, OpRequest::Agents).await.map(Json)
}

/// `POST /api/v1/agents/{name}/drain`: no new work for it.
async fn drain(
    State(web): WebState,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    web.op(&caller, OpRequest::AgentDrain { name })
        .await
        .map(Json)
}

/// `POST /api/v1/agents/{name}/undrain`: work for it again.
async fn undrain(
    State(web): WebState,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    web.op(&caller, OpRequest::AgentUndrain { name })
        .await
        .map(Json)
}

/// A task id from the path, or a JSON error saying what an id looks like.
fn task_id(id: Result<Path<u64>, PathRejection>) -> Result<TaskId, ApiError> {
    id.map(|Path(id)| TaskId(id)).map_err(|_| {
        ApiError::invalid("a task id is a positive whole number, e.g. /api/v1/tasks/42")
    })
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
    Ok((status, Json(v)).into_response())
}

/// A JSON body, or an error that says what was wrong with it.
pub(super) fn json_body<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    body.map(|Json(b)| b).map_err(|e| match e {
        JsonRejection::MissingJsonContentType(_) => {
            ApiError::invalid("send the body as JSON with `Content-Type: application/json`")
        }
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
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
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
    Query(q): Query<TasksQuery>,
) -> Result<Json<Value>, ApiError> {
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
    Query(q): Query<EventsQuery>,
) -> Result<Response, ApiError> {
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
                    let body =
                        serde_json::json!({"error": {"code": "forbidden", "message": e.message}});
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
