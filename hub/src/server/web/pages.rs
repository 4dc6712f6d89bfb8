//! The dashboard's pages: server-rendered HTML (maud), one small script for
//! live updates and actions, everything embedded in the binary.
//!
//! Every page reads through the same calls as the JSON API ([`super::Web`]),
//! so a session sees exactly what its role may see. Pages never print JSON:
//! each field is rendered as text, with control characters made visible
//! ([`clean`]) so an agent's output cannot forge lines or hide text. Regions
//! marked `data-live` are re-fetched and swapped by `app.js` when the hub's
//! event stream says something changed.

mod tasks;

use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use maud::{DOCTYPE, Markup, html};
use serde::Deserialize;
use serde_json::Value;

use super::{ApiError, AppState, Caller, Session, WebState};
use muster_protocol::msg::{OpRequest, Role};

const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");

/// Agents per fleet page: a screenful to scan, and a page the core builds in
/// well under a millisecond even with 10,000 agents registered.
pub(super) const FLEET_PAGE: u32 = 100;
/// Longest agent name accepted in `?after=` (longer cannot be a name).
const NAME_PARAM_MAX: usize = 256;

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/fleet") }))
        .route("/assets/app.js", get(js))
        .route("/assets/app.css", get(css))
        .route("/fleet", get(fleet))
        .route("/alerts", get(alerts))
        .merge(tasks::routes())
}

async fn js() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        APP_JS,
    )
        .into_response()
}

async fn css() -> Response {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], APP_CSS).into_response()
}

/// The frame of every page: the navigation, who is signed in and the live badge.
pub(super) fn layout(title: &str, session: Option<&Session>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                @if let Some(s) = session {
                    meta name="csrf-token" content=(s.csrf);
                }
                title { (title) " · muster" }
                link rel="stylesheet" href="/assets/app.css";
                script src="/assets/app.js" defer {}
            }
            body {
                header.top {
                    a.brand href="/fleet" { "muster" }
                    @if let Some(s) = session {
                        nav {
                            a href="/fleet" { "Fleet" }
                            a href="/tasks" { "Tasks" }
                            a href="/alerts" { "Alerts" }
                        }
                        span #live.badge.stale title="The page updates itself from the hub's event stream" { "Connecting" }
                        span.who { (clean_line(&s.name)) " · " (s.role) }
                        form.logout method="post" action="/logout" {
                            input type="hidden" name="csrf" value=(s.csrf);
                            button type="submit" { "Sign out" }
                        }
                    }
                }
                main {
                    p #flash role="status" {}
                    (body)
                }
            }
        }
    }
}

/// A page that explains why the visitor cannot go on, and what to do.
pub(super) fn explain(status: StatusCode, title: &str, what_to_do: &str) -> Response {
    let page = layout(
        title,
        None,
        html! {
            h1 { (title) }
            p.explain { (what_to_do) }
            p { a href="/login" { "How to sign in" } }
        },
    );
    (status, page).into_response()
}

/// An API error shown to a person: a page without a session goes to the
/// sign-in explanation, other errors are explained in place.
pub(super) fn page_error(e: ApiError) -> Response {
    if e.status == StatusCode::UNAUTHORIZED {
        return Redirect::to("/login").into_response();
    }
    explain(e.status, "Something went wrong", &e.message)
}

/// The session of a browser caller (pages are for browsers; an API token
/// gets the page without actions).
pub(super) fn session_of(caller: &Caller) -> Option<&Session> {
    caller.session.as_ref().map(|(_, s)| s)
}

/// Whether the page offers agent actions (drain, undrain): admin sessions only.
pub(super) fn may_act(caller: &Caller) -> bool {
    caller.role() == Some(Role::Admin)
}

/// Whether the page offers task actions (submit, cancel, requeue): admin and
/// submitter sessions.
pub(super) fn may_act_on_tasks(caller: &Caller) -> bool {
    matches!(caller.role(), Some(Role::Admin | Role::Submitter))
}

// === Fleet ===

#[derive(Debug, Deserialize)]
struct FleetQuery {
    /// Start after this agent name (the previous page's last).
    after: Option<String>,
}

/// `GET /fleet?after=name`: every agent with its state, why, slots, host
/// figures, heartbeat age, circuit and drain, a page at a time.
async fn fleet(
    State(web): WebState,
    caller: Result<Caller, ApiError>,
    query: Result<Query<FleetQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let caller = match caller {
        Ok(c) => c,
        Err(e) => return page_error(e),
    };
    let after = query
        .ok()
        .and_then(|Query(q)| q.after)
        .filter(|a| !a.is_empty() && a.len() <= NAME_PARAM_MAX);
    let v = match web.agents_page(&caller, after.clone(), FLEET_PAGE).await {
        Ok(v) => v,
        Err(e) => return page_error(e),
    };
    let body = fleet_body(&v, after.is_some(), may_act(&caller), now_ms());
    layout("Fleet", session_of(&caller), body).into_response()
}

fn fleet_body(v: &Value, paged: bool, act: bool, now: u64) -> Markup {
    let empty = Vec::new();
    let agents = v["agents"].as_array().unwrap_or(&empty);
    html! {
        h1 { "Fleet" }
        div #fleet-live data-live="fleet" {
            p.summary #fleet-summary {
                (num(&v["total"])) " agents"
                @if let Some(m) = v["by_state"].as_object() {
                    @for (state, n) in m {
                        " · " span class={"state " (css_word(state))} { (num(n)) " " (clean_line(state)) }
                    }
                }
            }
            @if agents.is_empty() {
                p.explain { "No agents on this page. Enroll one with `muster-hub token create` and `muster-sidecar enroll`." }
            } @else {
                table #agents {
                    thead { tr {
                        th { "Agent" } th { "State" } th { "Why unavailable" } th { "Slots" }
                        th { "Host" } th { "Heartbeat" } th { "Circuit" } th { "Drain" }
                    } }
                    tbody {
                        @for a in agents { (agent_row(a, act, now)) }
                    }
                }
            }
            nav.pager {
                @if paged { a href="/fleet" { "← First page" } }
                @if let Some(next) = v["next_after"].as_str() {
                    a #fleet-next href={"/fleet?after=" (enc(next))} { "Next page →" }
                }
            }
        }
    }
}

fn agent_row(a: &Value, act: bool, now: u64) -> Markup {
    let name = str_of(&a["name"]);
    let state = str_of(&a["state"]);
    let why = [str_of(&a["why"]), str_of(&a["unavailable_reason"])]
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    let reason = str_of(&a["unavailable_reason"]);
    let circuit = if reason.contains("circuit open") {
        "open"
    } else {
        "closed"
    };
    let drained = a["drained"].as_bool() == Some(true);
    let heartbeat = a["last_heartbeat_age_ms"].as_u64();
    html! {
        tr data-agent=(name) {
            td {
                strong { (clean_line(name)) }
                @if let Some(caps) = a["capabilities"].as_array() {
                    @if !caps.is_empty() {
                        br; span.muted { (clean_line(&caps.iter().map(str_of).collect::<Vec<_>>().join(", "))) }
                    }
                }
            }
            td { span class={"state " (css_word(state))} { (clean_line(state)) } }
            td { @if why.is_empty() { span.muted { "—" } } @else { (clean_line(&why)) } }
            td { (num(&a["tasks"])) " / " (num(&a["slots"])) }
            td { (host(&a["host"])) }
            td {
                @match heartbeat {
                    Some(age) => time datetime=(iso(now.saturating_sub(age))) title=(exact(now.saturating_sub(age))) { (ago(age)) },
                    None => span.muted { "never" },
                }
            }
            td { span class={"circuit " (circuit)} { (circuit) } }
            td {
                @if drained { span.state.drained { "drained" } } @else { span.muted { "no" } }
                @if act {
                    " "
                    @if drained {
                        button.act data-post={"/api/v1/agents/" (enc(name)) "/undrain"} { "Undrain" }
                    } @else {
                        button.act.danger data-post={"/api/v1/agents/" (enc(name)) "/drain"} { "Drain" }
                    }
                }
            }
        }
    }
}

/// The host figures of an agent's last heartbeat, in words.
fn host(h: &Value) -> Markup {
    if !h.is_object() {
        return html! { span.muted { "—" } };
    }
    let mem_total = h["mem_total_bytes"].as_u64().unwrap_or(0);
    let mem_avail = h["mem_available_bytes"].as_u64().unwrap_or(0);
    html! {
        span title="CPUs · load (1 min) · memory used of total · disk free" {
            (num(&h["cpus"])) " CPU · load " (format!("{:.2}", h["load1"].as_f64().unwrap_or(0.0)))
            " · mem " (bytes(mem_total.saturating_sub(mem_avail))) " / " (bytes(mem_total))
            " · disk " (bytes(h["disk_free_bytes"].as_u64().unwrap_or(0))) " free"
        }
    }
}

// === Alerts ===

/// `GET /alerts`: the open alerts, oldest first.
async fn alerts(State(web): WebState, caller: Result<Caller, ApiError>) -> Response {
    let caller = match caller {
        Ok(c) => c,
        Err(e) => return page_error(e),
    };
    let v = match web.op(&caller, OpRequest::Alerts).await {
        Ok(v) => v,
        Err(e) => return page_error(e),
    };
    let now = now_ms();
    let empty = Vec::new();
    let list = v["alerts"].as_array().unwrap_or(&empty);
    let recent = v["recent"].as_array().unwrap_or(&empty);
    let body = html! {
        h1 { "Alerts" }
        div #alerts-live data-live="alerts" {
            p.summary { (num(&v["total"])) " open"
                @if v["truncated"].as_bool() == Some(true) { " (not all listed; `muster-hub alerts --json` lists them)" } }
            @if list.is_empty() {
                p.explain { "No open alerts." }
            } @else {
                table #alerts {
                    thead { tr { th { "Alert" } th { "Subject" } th { "What" } th { "Since" } } }
                    tbody {
                        @for a in list {
                            tr {
                                td { span.state.alert { (clean_line(str_of(&a["alert"]))) } }
                                td { (subject_link(str_of(&a["alert"]), str_of(&a["subject"]))) }
                                td { (clean_line(str_of(&a["message"]))) }
                                td { (when(a["since"].as_u64(), now)) }
                            }
                        }
                    }
                }
            }
            h2 { "Recent" }
            @if recent.is_empty() {
                p.explain { "No alert was raised or cleared since the hub started." }
            } @else {
                table #recent-alerts {
                    thead { tr { th { "When" } th { "Alert" } th { "" } th { "Subject" } th { "What" } } }
                    tbody {
                        @for a in recent {
                            tr {
                                td { (when(a["at"].as_u64(), now)) }
                                td { span.state.alert { (clean_line(str_of(&a["alert"]))) } }
                                td { (clean_line(str_of(&a["state"]))) }
                                td { (subject_link(str_of(&a["alert"]), str_of(&a["subject"]))) }
                                td { (clean_line(str_of(&a["message"]))) }
                            }
                        }
                    }
                }
            }
        }
    };
    layout("Alerts", session_of(&caller), body).into_response()
}

/// An alert's subject, linked to its task when it is one.
fn subject_link(kind: &str, subject: &str) -> Markup {
    match subject.parse::<u64>() {
        Ok(id) if kind.starts_with("task") => html! { a href={"/tasks/" (id)} { "task " (id) } },
        _ => html! { (clean_line(subject)) },
    }
}

// === Rendering helpers ===

/// The text of a JSON string (empty for anything else).
pub(super) fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

/// A JSON number as text, "—" when absent.
pub(super) fn num(v: &Value) -> String {
    match v {
        Value::Number(n) => n.to_string(),
        _ => "—".into(),
    }
}

/// Text from an agent or a task, safe to show: control characters (escape
/// sequences, carriage returns, NULs) are shown as `\u{..}` escapes so they
/// cannot hide or forge text; newlines and tabs stay for `<pre>` blocks.
pub(super) fn clean(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() && c != '\n' && c != '\t' {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

/// [`clean`] for text shown on one line: newlines are escaped too.
pub(super) fn clean_line(s: &str) -> String {
    clean(s).replace('\n', "\\n")
}

/// A word safe as a CSS class: letters, digits, `-` and `_` only.
pub(super) fn css_word(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
        .take(32)
        .collect()
}

/// Percent-encodes a path segment or query value.
pub(super) fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Bytes in binary units.
pub(super) fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// The wall clock in milliseconds since the epoch (times on the page are
/// relative to it).
pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A duration in milliseconds, coarsely: "42 s", "3 min", "5 h", "2 d".
pub(super) fn span(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=59 => format!("{s} s"),
        60..=3599 => format!("{} min", s / 60),
        3600..=172_799 => format!("{} h", s / 3600),
        _ => format!("{} d", s / 86_400),
    }
}

/// How long ago, in words.
pub(super) fn ago(ms: u64) -> String {
    format!("{} ago", span(ms))
}

/// A moment as a `<time>`: relative text (kept fresh by the script), the
/// exact time on hover.
pub(super) fn when(at: Option<u64>, now: u64) -> Markup {
    match at {
        Some(t) if t > 0 => html! {
            time datetime=(iso(t)) title=(exact(t)) {
                @if t <= now { (ago(now - t)) } @else { "in " (span(t - now)) }
            }
        },
        _ => html! { span.muted { "—" } },
    }
}

/// RFC 3339 in UTC, to the second (for `datetime`).
pub(super) fn iso(ms: u64) -> String {
    let secs = ms / 1000;
    let (y, mo, d) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// The exact time, for a person (the `title` of a `<time>`).
pub(super) fn exact(ms: u64) -> String {
    iso(ms).replace('T', " ").replace('Z', " UTC")
}

/// The civil date of a day count since 1970-01-01 (Howard Hinnant's
/// algorithm), so the hub needs no date library to print one.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_made_visible() {
        assert_eq!(clean("a\u{1b}[31mb\r\n\tc"), "a\\u{1b}[31mb\\u{d}\n\tc");
        assert_eq!(clean_line("x\ny"), "x\\ny");
        assert_eq!(css_word("running\" onclick=x"), "runningonclickx");
    }

    #[test]
    fn times_are_exact_and_relative() {
        assert_eq!(iso(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso(1_796_299_999_000), "2026-12-03T12:13:19Z");
        assert_eq!(exact(951_782_400_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(ago(42_000), "42 s ago");
        assert_eq!(span(3 * 3_600_000), "3 h");
    }

    #[test]
    fn names_are_encoded_in_urls() {
        assert_eq!(enc("a b/c?"), "a%20b%2Fc%3F");
        assert_eq!(bytes(1536), "1.5 KiB");
    }
}
