//! Issue 17, item 5: the HTTP JSON API under `/api/v1/`, black-box with a
//! plain HTTP client (ureq) against a real hub on 127.0.0.1, and a real
//! sidecar with a shell-script agent where a task must run.
//!
//! Each test judges by status codes, headers and JSON bodies only. Every wait
//! is a poll or a read with a deadline; nothing sleeps for a fixed time to
//! let something happen (agents wait for files the test creates).

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use muster_tests::tasks::*;
use muster_tests::{Hub, Sidecar, wait_for};
use serde_json::{Value, json};

/// "Eventually" for a short task on a loaded machine.
const EVENTUALLY: Duration = Duration::from_secs(60);
/// Longest any one HTTP exchange (not a stream) may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest an event stream is read; its reader thread ends by then at the latest.
const STREAM_TIMEOUT: Duration = Duration::from_secs(180);

// === Fixtures ===

/// A started hub with 1 s heartbeats and the dashboard on; its API base URL.
fn hub() -> (Hub, String) {
    let mut hub = Hub::init();
    hub.set_policy("heartbeat_interval", "\"1s\"");
    let base = hub.enable_dashboard();
    hub.start();
    (hub, base)
}

/// An online exec-mode sidecar whose agent is `script` (a shell script body).
fn sidecar_running(hub: &Hub, name: &str, script: &str) -> Sidecar {
    let mut sc = sidecar(hub, name, &[]);
    let path = agent_script(&sc, "agent.sh", script);
    use_command(&sc, &path);
    go_online(hub, &mut sc);
    sc
}

/// An answer read to its end.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: ureq::http::HeaderMap,
    body: Vec<u8>,
}

impl Answer {
    /// The body as JSON.
    ///
    /// # Panics
    /// When it is not JSON.
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {}: body is not JSON ({e}): {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    }

    /// Asserts the status, and for errors the API's JSON error shape; the JSON.
    fn expect(&self, status: u16) -> Value {
        let v = self.json();
        assert_eq!(self.status, status, "{v}");
        if status >= 400 {
            assert!(
                self.header("content-type").starts_with("application/json"),
                "an error is JSON: {:?}",
                self.headers
            );
            let code = v["error"]["code"].as_str().unwrap_or_default();
            let message = v["error"]["message"].as_str().unwrap_or_default();
            assert!(!code.is_empty() && !message.is_empty(), "error shape: {v}");
        }
        v
    }

    /// The error's code and message.
    fn error(&self, status: u16) -> (String, String) {
        let v = self.expect(status);
        (
            v["error"]["code"].as_str().unwrap_or_default().to_string(),
            v["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        )
    }
}

/// A client that reports every status as an answer (not an error) and follows no redirect.
fn client(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .max_redirects_will_error(false)
        .timeout_global(Some(timeout))
        .build()
        .into()
}

/// One request: `method url` with `headers` and an optional body; the answer read whole.
fn call(method: &str, url: &str, headers: &[(&str, &str)], body: Option<&[u8]>) -> Answer {
    let mut req = ureq::http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let agent = client(REQUEST_TIMEOUT);
    let res = match body {
        Some(b) => agent.run(req.body(b.to_vec()).expect("a request")),
        None => agent.run(req.body(()).expect("a request")),
    };
    let mut res = res.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    let body = res
        .body_mut()
        .with_config()
        .limit(200 << 20)
        .read_to_vec()
        .unwrap_or_else(|e| panic!("{method} {url}: reading the body: {e}"));
    Answer {
        status,
        headers,
        body,
    }
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// `GET url` with `token`.
fn get(url: &str, token: &str) -> Answer {
    call("GET", url, &[("authorization", &bearer(token))], None)
}

/// `POST url` with `token` and a JSON body (or none).
fn post(url: &str, token: &str, body: Option<&Value>) -> Answer {
    let auth = bearer(token);
    match body {
        Some(v) => call(
            "POST",
            url,
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            Some(v.to_string().as_bytes()),
        ),
        None => call("POST", url, &[("authorization", &auth)], None),
    }
}

/// Submits `body` with `token`; the new task's id.
fn submit_api(base: &str, token: &str, body: &Value) -> u64 {
    let a = post(&format!("{base}/api/v1/tasks"), token, Some(body));
    let v = a.expect(201);
    v["id"].as_u64().unwrap_or_else(|| panic!("no id: {v}"))
}

/// Polls `GET /api/v1/tasks/{id}` until its state is one of `states`.
fn wait_task(base: &str, token: &str, id: u64, states: &[&str]) -> Value {
    wait_for(EVENTUALLY, &format!("task {id} in {states:?}"), || {
        let v = get(&format!("{base}/api/v1/tasks/{id}"), token).expect(200);
        if states.iter().any(|s| v["state"] == *s) {
            Ok(v)
        } else {
            Err(v["state"].to_string())
        }
    })
}

// === Server-Sent Events ===

/// One event of a stream.
#[derive(Debug, Clone, Default)]
struct SseEvent {
    id: Option<String>,
    event: String,
    data: String,
}

impl SseEvent {
    fn json(&self) -> Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|e| panic!("event data is not JSON ({e}): {self:?}"))
    }
}

/// An open event stream, read by a thread into a channel; the channel closes
/// when the hub ends the stream.
struct Sse {
    status: u16,
    content_type: String,
    rx: mpsc::Receiver<SseEvent>,
}

/// What waiting for the next event gave.
#[derive(Debug)]
enum Next {
    Event(SseEvent),
    Closed,
    TimedOut,
}

impl Sse {
    /// Opens `GET url` with `headers`; a non-200 answer gives a closed stream
    /// with its status.
    fn open(url: &str, headers: &[(&str, &str)]) -> Sse {
        let mut req = ureq::http::Request::builder().method("GET").uri(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let res = client(STREAM_TIMEOUT)
            .run(req.body(()).expect("a request"))
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        let status = res.status().as_u16();
        let content_type = res
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let (tx, rx) = mpsc::channel();
        let reader = BufReader::new(res.into_body().into_reader());
        std::thread::spawn(move || read_events(reader, &tx));
        Sse {
            status,
            content_type,
            rx,
        }
    }

    fn next(&self, timeout: Duration) -> Next {
        match self.rx.recv_timeout(timeout) {
            Ok(e) => Next::Event(e),
            Err(mpsc::RecvTimeoutError::Timeout) => Next::TimedOut,
            Err(mpsc::RecvTimeoutError::Disconnected) => Next::Closed,
        }
    }

    /// The next event, which must come within `timeout`.
    fn event(&self, timeout: Duration, what: &str) -> SseEvent {
        match self.next(timeout) {
            Next::Event(e) => e,
            other => panic!("waiting for {what}: {other:?}"),
        }
    }

    /// Waits until the hub ends the stream; the events that came first.
    fn until_closed(&self, timeout: Duration, what: &str) -> Vec<SseEvent> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left) {
                Next::Event(e) => seen.push(e),
                Next::Closed => return seen,
                Next::TimedOut => panic!("{what}: the stream is still open; saw {seen:?}"),
            }
        }
    }
}

/// Parses `text/event-stream` into events until the stream ends.
fn read_events(mut reader: impl BufRead, tx: &mpsc::Sender<SseEvent>) {
    let mut ev = SseEvent::default();
    let mut data: Vec<String> = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let l = line.trim_end_matches(['\r', '\n']);
        if l.is_empty() {
            if !data.is_empty() || !ev.event.is_empty() {
                ev.data = data.join("\n");
                if ev.event.is_empty() {
                    ev.event = "message".into();
                }
                if tx.send(std::mem::take(&mut ev)).is_err() {
                    return;
                }
            }
            data.clear();
            ev = SseEvent::default();
            continue;
        }
        if l.starts_with(':') {
            continue; // a comment: the keep-alive
        }
        let (field, value) = l.split_once(':').unwrap_or((l, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "id" => ev.id = Some(value.to_string()),
            "event" => ev.event = value.to_string(),
            "data" => data.push(value.to_string()),
            _ => {}
        }
    }
}

// === tests ===

#[test]
fn every_endpoint_answers_and_roles_decide_writes() {
    let (hub, base) = hub();
    let _sc = sidecar_running(&hub, "api-agent", "#!/bin/sh\necho done\n");
    let admin = hub.api_token("admin-bot", "admin", "1h");
    let operator = hub.api_token("reader", "operator", "1h");
    let api = |path: &str| format!("{base}/api/v1{path}");

    // Agents.
    let v = get(&api("/agents"), &operator).expect(200);
    assert!(
        v["agents"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x["name"] == "api-agent")),
        "{v}"
    );
    let v = get(&api("/agents/api-agent"), &operator).expect(200);
    assert!(v.to_string().contains("api-agent"), "{v}");
    get(&api("/agents/no-such-agent"), &operator).error(404);

    // Drain and undrain: an admin may, an operator may not.
    let (code, message) = post(&api("/agents/api-agent/drain"), &operator, None).error(403);
    assert_eq!(code, "forbidden");
    assert!(message.contains("admin"), "{message}");
    let v = post(&api("/agents/api-agent/drain"), &admin, None).expect(200);
    assert_eq!(v["drained"], true, "{v}");
    // The answer comes after the commit: the agent shows drained at once.
    let v = get(&api("/agents/api-agent"), &operator).expect(200);
    assert_eq!(v["drained"], true, "{v}");
    let v = post(&api("/agents/api-agent/undrain"), &admin, None).expect(200);
    assert_eq!(v["drained"], false, "{v}");
    let v = get(&api("/agents/api-agent"), &operator).expect(200);
    assert_eq!(v["drained"], false, "{v}");

    // Submit: 201 with Location; an operator is refused.
    let body = json!({"title": "api hello", "labels": {"team": "infra"}});
    let (code, _) = post(&api("/tasks"), &operator, Some(&body)).error(403);
    assert_eq!(code, "forbidden");
    let a = post(&api("/tasks"), &admin, Some(&body));
    let v = a.expect(201);
    let id = v["id"].as_u64().expect("an id");
    assert_eq!(a.header("location"), format!("/api/v1/tasks/{id}"));
    let done = wait_task(&base, &operator, id, &["completed"]);
    assert_eq!(done["title"], "api hello");
    assert!(done["attempt_history"].is_array(), "{done}");

    // The listing with each filter.
    let listed = |q: &str| -> Vec<u64> {
        let v = get(&api(&format!("/tasks{q}")), &operator).expect(200);
        v["tasks"]
            .as_array()
            .unwrap_or_else(|| panic!("no tasks: {v}"))
            .iter()
            .filter_map(|t| t["id"].as_u64())
            .collect()
    };
    assert_eq!(listed(""), vec![id]);
    assert_eq!(listed("?state=completed"), vec![id]);
    assert!(listed("?state=queued").is_empty());
    assert_eq!(listed("?label=team=infra"), vec![id]);
    assert!(listed("?label=team=web").is_empty());
    assert_eq!(listed("?agent=api-agent"), vec![id]);
    assert_eq!(listed("?q=hello"), vec![id]);
    assert!(listed("?q=nothing-like-it").is_empty());

    // Requeue a finished task, cancel it, and a second cancel conflicts.
    post(&api(&format!("/tasks/{id}/requeue")), &operator, None).error(403);
    post(&api(&format!("/tasks/{id}/requeue")), &admin, None).expect(200);
    wait_task(&base, &admin, id, &["completed"]);
    // A task no agent can take stays queued; cancel it.
    let stuck = submit_api(
        &base,
        &admin,
        &json!({"title": "needs gpu", "capabilities": ["gpu"]}),
    );
    post(&api(&format!("/tasks/{stuck}/cancel")), &operator, None).error(403);
    let v = post(&api(&format!("/tasks/{stuck}/cancel")), &admin, None).expect(200);
    assert_eq!(v["state"], "cancelled", "{v}");
    let (code, _) = post(&api(&format!("/tasks/{stuck}/cancel")), &admin, None).error(409);
    assert_eq!(code, "conflict");

    // Alerts and stats.
    let v = get(&api("/alerts"), &operator).expect(200);
    assert!(v.is_object(), "{v}");
    let v = get(&api("/stats"), &operator).expect(200);
    assert!(v.is_object(), "{v}");

    // Ids, methods and paths that are not there.
    let (_, m) = get(&api("/tasks/999999"), &operator).error(404);
    assert!(m.contains("999999"), "{m}");
    get(&api("/tasks/abc"), &operator).error(400);
    get(&api("/tasks/0"), &operator).error(400);
    get(&api("/tasks/-1"), &operator).error(400);
    get(&api("/tasks/99999999999999999999999"), &operator).error(400);
    let (code, _) = get(&api("/no-such-endpoint"), &operator).error(404);
    assert_eq!(code, "not_found");
    let a = call(
        "DELETE",
        &api(&format!("/tasks/{id}")),
        &[("authorization", &bearer(&admin))],
        None,
    );
    let (code, _) = a.error(405);
    assert_eq!(code, "method_not_allowed");
    assert!(a.header("allow").contains("GET"), "{:?}", a.headers);
    let a = call(
        "PUT",
        &api("/tasks"),
        &[("authorization", &bearer(&admin))],
        Some(b"{}"),
    );
    a.error(405);
    let a = call(
        "GET",
        &api("/agents/api-agent/drain"),
        &[("authorization", &bearer(&admin))],
        None,
    );
    a.error(405);
}

#[test]
fn submit_is_idempotent_by_key() {
    let (hub, base) = hub();
    let admin = hub.api_token("submitter", "admin", "1h");
    let url = format!("{base}/api/v1/tasks");
    let body = json!({"title": "once only", "priority": 3}).to_string();
    let send = |key: &str| {
        call(
            "POST",
            &url,
            &[
                ("authorization", &bearer(&admin)),
                ("content-type", "application/json"),
                ("idempotency-key", key),
            ],
            Some(body.as_bytes()),
        )
    };
    let first = send("deploy-42").expect(201);
    let again = send("deploy-42").expect(200);
    assert_eq!(first["id"], again["id"], "{first} {again}");
    assert_eq!(again["existing"], true, "{again}");
    let other = send("deploy-43").expect(201);
    assert_ne!(first["id"], other["id"]);
    // Only two tasks exist.
    let v = get(&format!("{url}?limit=10"), &admin).expect(200);
    assert_eq!(v["tasks"].as_array().map(Vec::len), Some(2), "{v}");
    // A key that is too long is refused.
    let long = "k".repeat(300);
    send(&long).error(400);
}

#[test]
fn bad_requests_get_json_errors_and_limits_hold() {
    let (hub, base) = hub();
    let admin = hub.api_token("limits", "admin", "1h");
    let tasks = format!("{base}/api/v1/tasks");
    let auth = bearer(&admin);
    let json_post = |body: &[u8]| {
        call(
            "POST",
            &tasks,
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            Some(body),
        )
    };

    // Bodies: not JSON, not a submission, no content type.
    json_post(b"{not json").error(400);
    json_post(b"[]").error(400);
    let (_, m) = json_post(br#"{"title": "x", "colour": "red"}"#).error(400);
    assert!(m.contains("colour"), "{m}");
    json_post(br#"{"description": "no title"}"#).error(400);
    let (code, _) = call(
        "POST",
        &tasks,
        &[("authorization", &auth)],
        Some(br#"{"title": "x"}"#),
    )
    .error(415);
    assert_eq!(code, "unsupported_media_type");
    // The core's submission limits, as over QUIC.
    let (_, m) = json_post(json!({"title": "t".repeat(100_000)}).to_string().as_bytes()).error(400);
    assert!(m.contains("title"), "{m}");
    json_post(br#"{"title": "x", "labels": {"bad key!": "v"}}"#).error(400);

    // A body past max_frame_bytes: refused from its declared length, before
    // the body is sent (the client waits for 100 Continue, as curl does).
    let (status, body) = raw_exchange(
        &base,
        &format!(
            "POST /api/v1/tasks HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nContent-Type: application/json\r\nContent-Length: 5000000\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
        ),
    );
    assert_eq!(status, 413, "{body}");
    let v: Value = serde_json::from_str(&body).expect("a JSON error");
    assert_eq!(v["error"]["code"], "too_large", "{v}");
    // And one sent at once, as a client that does not wait: it reads the 413.
    let big = vec![b' '; 1_100_000];
    let (code, _) = json_post(&big).error(413);
    assert_eq!(code, "too_large");

    // Query strings.
    for q in [
        "limit=abc",
        "limit=-1",
        "cursor=x",
        "state=sleeping",
        "label=novalue",
        "label=bad%20key=v",
        "limit=1&limit=2",
    ] {
        let (code, m) = get(&format!("{tasks}?{q}"), &admin).error(400);
        assert_eq!(code, "invalid", "{q}: {m}");
    }
    let (_, m) = get(&format!("{tasks}?q={}", "x".repeat(300)), &admin).error(400);
    assert!(m.contains("shorter"), "{m}");
    get(&format!("{base}/api/v1/events?from=abc"), &admin).error(400);
    get(&format!("{base}/api/v1/tasks/1/logs?stream=stdin"), &admin).error(400);
    get(&format!("{base}/api/v1/tasks/1/logs?follow=maybe"), &admin).error(400);
    get(&format!("{base}/api/v1/tasks/1/logs?attempt=0"), &admin).error(400);
    get(&format!("{base}/api/v1/tasks/1/logs?tail=x"), &admin).error(400);

    // Page length: clamped to 1..=1000, never refused.
    for i in 0..3 {
        submit_api(
            &base,
            &admin,
            &json!({"title": format!("page {i}"), "capabilities": ["none"]}),
        );
    }
    let page = |q: &str| get(&format!("{tasks}?{q}"), &admin).expect(200);
    let v = page("limit=0");
    assert_eq!(v["tasks"].as_array().map(Vec::len), Some(1), "{v}");
    let cursor = v["next_cursor"].as_u64().expect("a next page");
    let v = page(&format!("limit=1&cursor={cursor}"));
    assert_eq!(v["tasks"].as_array().map(Vec::len), Some(1), "{v}");
    assert!(v["tasks"][0]["id"].as_u64() < Some(cursor), "{v}");
    let v = page("limit=4294967295");
    assert_eq!(v["tasks"].as_array().map(Vec::len), Some(3), "{v}");
    assert!(v["next_cursor"].is_null(), "{v}");

    // Headers and paths no hub should choke on.
    let a = call(
        "GET",
        &format!("{base}/api/v1/agents/%FF%FE"),
        &[("authorization", &auth)],
        None,
    );
    assert!(a.status == 400 || a.status == 404, "{a:?}");
    a.json();
    let a = call(
        "GET",
        &format!("{base}/api/v1/events"),
        &[("authorization", &auth), ("last-event-id", "not-a-number")],
        None,
    );
    a.error(400);
    // Still up and answering.
    get(&format!("{base}/api/v1/stats"), &admin).expect(200);
}

#[test]
fn credentials_are_checked_on_every_request() {
    let (hub, base) = hub();
    let agents = format!("{base}/api/v1/agents");

    // No credential, a malformed one, an unknown one: 401 with WWW-Authenticate.
    for auth in [
        None,
        Some("Basic dXNlcjpwYXNz".to_string()),
        Some("Bearer nope".to_string()),
        Some("Bearer muster_api_1234".to_string()),
        Some(format!("Bearer muster_api_{}", "ab".repeat(32))),
    ] {
        let headers: Vec<(&str, &str)> = auth
            .as_deref()
            .map(|a| vec![("authorization", a)])
            .unwrap_or_default();
        let a = call("GET", &agents, &headers, None);
        let (code, _) = a.error(401);
        assert_eq!(code, "unauthenticated", "{auth:?}");
        assert!(
            a.header("www-authenticate").starts_with("Bearer"),
            "{auth:?}: {:?}",
            a.headers
        );
    }

    // A revoked token: refused at once, and its open event stream ends.
    let doomed = hub.api_token("doomed", "admin", "1h");
    get(&agents, &doomed).expect(200);
    let stream = Sse::open(
        &format!("{base}/api/v1/events"),
        &[("authorization", &bearer(&doomed))],
    );
    assert_eq!(stream.status, 200);
    assert!(stream.content_type.starts_with("text/event-stream"));
    let out = hub.cli(&["token", "revoke", "doomed"]);
    assert!(out.status.success(), "{}", muster_tests::stderr(&out));
    let (_, m) = get(&agents, &doomed).error(401);
    assert!(m.contains("revoked"), "{m}");
    stream.until_closed(Duration::from_secs(30), "the revoked token's event stream");
    // Listed no more.
    let list = hub.json(&["token", "list"]);
    assert!(!list.to_string().contains("doomed"), "{list}");

    // An expired token: refused once its second is up.
    let brief = hub.api_token("brief", "operator", "1s");
    wait_for(EVENTUALLY, "the 1 s token refused", || {
        let a = get(&agents, &brief);
        if a.status == 401 {
            Ok(())
        } else {
            Err(format!("{}", a.status))
        }
    });
    get(&agents, &brief).error(401);

    // A browser session: reads with its cookie; a write without the CSRF token is refused.
    let cookie = sign_in(&base, &hub.login_url(Some("admin")));
    let with_cookie = [("cookie", cookie.as_str())];
    let a = call("GET", &agents, &with_cookie, None);
    a.expect(200);
    // The page's live log uses the same endpoint with the cookie.
    let (_, m) = call(
        "GET",
        &format!("{base}/api/v1/tasks/424242/logs"),
        &with_cookie,
        None,
    )
    .error(404);
    assert!(m.contains("no task 424242"), "{m}");
    let submit_body = br#"{"title": "from a page"}"#;
    let a = call(
        "POST",
        &format!("{base}/api/v1/tasks"),
        &[
            ("cookie", cookie.as_str()),
            ("content-type", "application/json"),
        ],
        Some(submit_body),
    );
    let (code, m) = a.error(403);
    assert_eq!(code, "forbidden");
    assert!(m.contains("CSRF"), "{m}");
    let a = call(
        "POST",
        &format!("{base}/api/v1/tasks"),
        &[
            ("cookie", cookie.as_str()),
            ("content-type", "application/json"),
            ("x-csrf-token", &"0".repeat(64)),
        ],
        Some(submit_body),
    );
    a.error(403);
    // Nothing was submitted.
    let admin = hub.api_token("checker", "admin", "1h");
    let v = get(&format!("{base}/api/v1/tasks"), &admin).expect(200);
    assert_eq!(v["tasks"].as_array().map(Vec::len), Some(0), "{v}");
}

#[test]
fn events_resume_after_last_event_id_exactly() {
    let (hub, base) = hub();
    let admin = hub.api_token("watcher", "admin", "1h");
    let auth = bearer(&admin);
    for i in 0..6 {
        submit_api(
            &base,
            &admin,
            &json!({"title": format!("event {i}"), "capabilities": ["none"]}),
        );
    }
    let events = format!("{base}/api/v1/events");
    // From the start of the log: the token's creation and the six submissions.
    let all = Sse::open(&format!("{events}?from=1"), &[("authorization", &auth)]);
    assert_eq!(all.status, 200);
    let mut first: Vec<(u64, String)> = Vec::new();
    while first.len() < 6 {
        let e = all.event(Duration::from_secs(30), "an event from the log");
        if let Some(id) = e.id.as_deref().and_then(|i| i.parse().ok()) {
            first.push((id, e.data));
        }
    }
    let ids: Vec<u64> = first.iter().map(|(i, _)| *i).collect();
    assert!(
        ids.windows(2).all(|w| w[1] == w[0] + 1),
        "ids in order without gaps: {ids:?}"
    );

    // Resume after the second: exactly the events after it, the same ones.
    let after = ids[1].to_string();
    let resumed = Sse::open(
        &events,
        &[("authorization", &auth), ("last-event-id", &after)],
    );
    assert_eq!(resumed.status, 200);
    for (id, data) in &first[2..] {
        let e = resumed.event(Duration::from_secs(30), "a resumed event");
        assert_eq!(e.id.as_deref(), Some(id.to_string().as_str()), "{e:?}");
        assert_eq!(&e.data, data);
        e.json();
    }

    // And a new event reaches both streams live.
    let newest = *ids.last().expect("ids");
    let id = submit_api(
        &base,
        &admin,
        &json!({"title": "live one", "capabilities": ["none"]}),
    );
    for (s, name) in [(&all, "the first stream"), (&resumed, "the resumed stream")] {
        wait_for(
            EVENTUALLY,
            &format!("task {id}'s event on {name}"),
            || match s.next(Duration::from_secs(5)) {
                Next::Event(e) if e.data.contains("live one") => {
                    let seq: u64 = e.id.as_deref().and_then(|i| i.parse().ok()).unwrap_or(0);
                    assert!(seq > newest, "{e:?}");
                    Ok(())
                }
                other => Err(format!("{other:?}")),
            },
        );
    }
    // An operator may watch too.
    let reader = hub.api_token("reader", "operator", "1h");
    let s = Sse::open(&events, &[("authorization", &bearer(&reader))]);
    assert_eq!(s.status, 200);
}

#[test]
fn a_finished_attempts_log_reads_back_byte_for_byte_and_errors_say_why() {
    let (hub, base) = hub();
    let dir = tempfile_dir();
    let data = generated(3_000_000);
    let file = dir.join("output.bin");
    std::fs::write(&file, &data).expect("write");
    let script = format!(
        "#!/bin/sh\ncat '{}'\nprintf 'one\\ntwo \\342\\202\\254\\nthree\\n' >&2\n",
        file.display()
    );
    let mut sc = sidecar_running(&hub, "api-logs", &script);
    let admin = hub.api_token("logs-admin", "admin", "1h");
    let reader = hub.api_token("logs-reader", "operator", "1h");
    // A task that has not run has no log.
    let waiting = submit_api(
        &base,
        &admin,
        &json!({"title": "never runs", "capabilities": ["none"]}),
    );
    let logs = |id: u64, q: &str| get(&format!("{base}/api/v1/tasks/{id}/logs{q}"), &reader);
    let (code, m) = logs(waiting, "").error(404);
    assert_eq!(code, "not_found");
    assert!(m.contains("has not run yet"), "{m}");

    let id = submit_api(&base, &admin, &json!({"title": "three megabytes"}));
    wait_task(&base, &admin, id, &["completed"]);
    wait_kept(&sc, id, 1);

    let a = logs(id, "");
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    assert!(
        a.header("content-type").starts_with("text/plain"),
        "{:?}",
        a.headers
    );
    assert!(
        a.body == data,
        "relayed: {}",
        first_difference(&a.body, &data)
    );
    let a = logs(id, "?attempt=1&stream=stderr");
    assert_eq!(a.status, 200);
    assert_eq!(a.body, "one\ntwo €\nthree\n".as_bytes());
    let a = logs(id, "?stream=stderr&tail=2");
    assert_eq!(a.body, "two €\nthree\n".as_bytes());

    // Followed after the end: the whole log as events, then `end`.
    let s = Sse::open(
        &format!("{base}/api/v1/tasks/{id}/logs?stream=stderr&follow=1"),
        &[("authorization", &bearer(&reader))],
    );
    assert_eq!(s.status, 200);
    assert!(s.content_type.starts_with("text/event-stream"));
    let seen = s.until_closed(EVENTUALLY, "a followed finished log");
    let (text, end) = chunks_and_end(&seen);
    assert_eq!(text, "one\ntwo €\nthree\n");
    assert_eq!(end["ended"], true, "{end}");
    assert_eq!(end["agent"], "api-logs", "{end}");
    assert_eq!(end["generation"], 1, "{end}");
    assert!(end["why"].as_str().is_some_and(|w| !w.is_empty()), "{end}");

    // No such task or attempt.
    let (_, m) = logs(999_999, "").error(404);
    assert!(m.contains("no task 999999"), "{m}");
    let (_, m) = logs(id, "?attempt=7").error(404);
    assert!(m.contains("has no attempt 7"), "{m}");

    // The host goes away: the same message as `muster-hub task logs`, as a
    // status or as an `error` event.
    sc.stop();
    let (code, m) = wait_for(EVENTUALLY, "logs to say the host is offline", || {
        let a = logs(id, "");
        if a.status == 409 {
            Ok(a.error(409))
        } else {
            Err(format!("{} {}", a.status, String::from_utf8_lossy(&a.body)))
        }
    });
    assert_eq!(code, "conflict");
    assert!(m.contains("agent api-logs") && m.contains("offline"), "{m}");
    let cli = hub.cli(&["task", "logs", &id.to_string()]);
    assert!(!cli.status.success());
    assert!(
        muster_tests::stderr(&cli).contains(&m),
        "{}",
        muster_tests::stderr(&cli)
    );
    let s = Sse::open(
        &format!("{base}/api/v1/tasks/{id}/logs?follow=1"),
        &[("authorization", &bearer(&reader))],
    );
    let seen = s.until_closed(EVENTUALLY, "a followed log of an offline host");
    let last = seen.last().unwrap_or_else(|| panic!("no events: {seen:?}"));
    assert_eq!(last.event, "error", "{seen:?}");
    let v = last.json();
    assert_eq!(v["error"]["code"], "conflict", "{v}");
    assert_eq!(v["error"]["status"], 409, "{v}");
    assert_eq!(v["error"]["message"], m.as_str(), "{v}");
}

#[test]
fn follow_sees_lines_while_the_run_goes_on_and_ends_with_it() {
    let (hub, base) = hub();
    let dir = tempfile_dir();
    let (go1, go2) = (dir.join("go1"), dir.join("go2"));
    let script = format!(
        r#"#!/bin/sh
echo first
i=0; while [ ! -e '{go1}' ]; do i=$((i+1)); [ $i -lt 1200 ] || exit 9; sleep 0.05; done
echo second
i=0; while [ ! -e '{go2}' ]; do i=$((i+1)); [ $i -lt 1200 ] || exit 9; sleep 0.05; done
echo third
"#,
        go1 = go1.display(),
        go2 = go2.display()
    );
    let _sc = sidecar_running(&hub, "api-follow", &script);
    let admin = hub.api_token("follow-admin", "admin", "1h");
    let id = submit_api(&base, &admin, &json!({"title": "talks while it runs"}));
    wait_task(&base, &admin, id, &["running"]);
    let s = Sse::open(
        &format!("{base}/api/v1/tasks/{id}/logs?follow=1"),
        &[("authorization", &bearer(&admin))],
    );
    assert_eq!(s.status, 200);
    let mut text = String::new();
    let read_until = |text: &mut String, want: &str| {
        while !text.contains(want) {
            let e = s.event(EVENTUALLY, want);
            assert_eq!(e.event, "chunk", "{e:?} before {want:?} (so far {text:?})");
            *text += e.json()["text"].as_str().expect("text");
        }
    };
    read_until(&mut text, "first\n");
    // The run is still going: it waits for go1, which only this test creates.
    assert!(!text.contains("second"), "{text:?}");
    // A follower whose token is revoked meanwhile is cut off with a 401 error event.
    let doomed = hub.api_token("doomed-follower", "operator", "1h");
    let cut = Sse::open(
        &format!("{base}/api/v1/tasks/{id}/logs?follow=1"),
        &[("authorization", &bearer(&doomed))],
    );
    let e = cut.event(EVENTUALLY, "the doomed follower's first chunk");
    assert_eq!(e.event, "chunk", "{e:?}");
    let out = hub.cli(&["token", "revoke", "doomed-follower"]);
    assert!(out.status.success(), "{}", muster_tests::stderr(&out));
    let seen = cut.until_closed(Duration::from_secs(30), "the revoked follower's stream");
    let last = seen
        .last()
        .unwrap_or_else(|| panic!("no error event: {seen:?}"));
    assert_eq!(last.event, "error", "{seen:?}");
    assert_eq!(last.json()["error"]["status"], 401, "{last:?}");
    std::fs::write(&go1, "").expect("go1");
    let released = Instant::now();
    read_until(&mut text, "second\n");
    let latency = released.elapsed();
    eprintln!("follow over HTTP: a new line arrived {latency:?} after the agent was released");
    assert!(latency < Duration::from_secs(2), "{latency:?}");
    std::fs::write(&go2, "").expect("go2");
    read_until(&mut text, "third\n");
    assert_eq!(text, "first\nsecond\nthird\n");
    // And the stream ends with the attempt: `end`, then nothing.
    let rest = s.until_closed(EVENTUALLY, "the followed log to end");
    let (more, end) = chunks_and_end(&rest);
    assert!(more.is_empty(), "{more:?}");
    assert_eq!(end["ended"], true, "{end}");
    wait_task(&base, &admin, id, &["completed"]);
    // Read plainly afterwards, the same bytes.
    let a = get(&format!("{base}/api/v1/tasks/{id}/logs"), &admin);
    assert_eq!(a.body, b"first\nsecond\nthird\n");
}

// === helpers ===

/// The text of `chunk` events and the JSON of the `end` event that must close them.
fn chunks_and_end(events: &[SseEvent]) -> (String, Value) {
    let (last, chunks) = events
        .split_last()
        .unwrap_or_else(|| panic!("no events at all"));
    assert_eq!(last.event, "end", "the last event: {events:?}");
    let mut text = String::new();
    for e in chunks {
        assert_eq!(e.event, "chunk", "{e:?}");
        text += e.json()["text"].as_str().expect("text");
    }
    (text, last.json())
}

/// Signs in with a one-time login URL as a browser does (the page posts the
/// token back); the session cookie as `name=value`.
fn sign_in(base: &str, login_url: &str) -> String {
    let token = login_url
        .split_once("token=")
        .map(|(_, t)| t)
        .expect("a token in the login URL");
    let a = call(
        "POST",
        &format!("{base}/login"),
        &[("content-type", "application/x-www-form-urlencoded")],
        Some(format!("token={token}").as_bytes()),
    );
    assert!(
        (300..400).contains(&a.status),
        "signing in: {} {}",
        a.status,
        String::from_utf8_lossy(&a.body)
    );
    let set = a.header("set-cookie");
    let pair = set.split(';').next().unwrap_or_default().trim().to_string();
    assert!(pair.starts_with("muster_session="), "{set:?}");
    pair
}

/// Sends `head` (a request without a body) on a fresh connection and reads the
/// answer to its end; its status and body.
fn raw_exchange(base: &str, head: &str) -> (u16, String) {
    let mut conn = connect(base);
    conn.write_all(head.as_bytes()).expect("send");
    read_answer(&mut conn)
}

fn connect(base: &str) -> std::net::TcpStream {
    let addr = base.trim_start_matches("http://");
    let conn = std::net::TcpStream::connect(addr).expect("connect");
    conn.set_read_timeout(Some(REQUEST_TIMEOUT))
        .expect("timeout");
    conn.set_write_timeout(Some(REQUEST_TIMEOUT))
        .expect("timeout");
    conn
}

/// Reads an HTTP/1.1 answer with a `Content-Length` (what the hub sends for
/// errors): its status and body.
fn read_answer(conn: &mut std::net::TcpStream) -> (u16, String) {
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    reader.read_line(&mut line).expect("status line");
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("status line {line:?}"));
    let mut length = 0usize;
    loop {
        line.clear();
        reader.read_line(&mut line).expect("a header");
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse().expect("a length");
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).expect("the body");
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Waits until the sidecar kept the attempt's output (its end was acknowledged).
fn wait_kept(sc: &Sidecar, id: u64, generation: u64) {
    let ended = sc
        .data_dir()
        .join("logs")
        .join(format!("{id}-{generation}"))
        .join("ended");
    wait_for(EVENTUALLY, "the attempt's output kept in logs/", || {
        if ended.exists() {
            Ok(())
        } else {
            Err(format!("no {}", ended.display()))
        }
    });
}

/// Deterministic bytes: a counter through a xorshift, every byte value occurring.
fn generated(n: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn first_difference(a: &[u8], b: &[u8]) -> String {
    let at = a.iter().zip(b).position(|(x, y)| x != y);
    format!(
        "lengths {} and {}, first difference at {at:?}",
        a.len(),
        b.len()
    )
}

/// A temporary directory that lives as long as the test process.
fn tempfile_dir() -> PathBuf {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().to_path_buf();
    std::mem::forget(dir);
    path
}
