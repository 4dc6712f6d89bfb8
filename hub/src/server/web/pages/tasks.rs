//! The task pages: the filtered, paged list (with the submit form for admins)
//! and one task's detail with its attempts and live log.

use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use maud::{Markup, html};
use muster_protocol::TaskId;
use muster_protocol::msg::OpRequest;
use serde_json::Value;

use super::super::api::{PAGE_DEFAULT, TasksQuery};
use super::super::{ApiError, AppState, Caller, WebState};
use super::{
    bytes, clean, clean_line, css_word, enc, explain, layout, may_act_on_tasks, now_ms, num,
    page_error, session_of, span, str_of, when,
};

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/tasks", get(list))
        .route("/tasks/{id}", get(detail))
}

// === The list ===

/// `GET /tasks?state=&agent=&capability=&label=k=v&q=&cursor=`: tasks newest
/// first, filtered as the API filters them, a page at a time.
async fn list(
    State(web): WebState,
    caller: Result<Caller, ApiError>,
    query: Result<Query<TasksQuery>, QueryRejection>,
) -> Response {
    let caller = match caller {
        Ok(c) => c,
        Err(e) => return page_error(e),
    };
    let Ok(Query(q)) = query else {
        return explain(
            StatusCode::BAD_REQUEST,
            "This filter is not understood",
            "A parameter of the address is malformed (cursor must be a task id). Start again from the Tasks page.",
        );
    };
    let filter = match q.filter() {
        Ok(f) => f,
        Err(e) => return page_error(e),
    };
    let v = match web.tasks(&caller, filter, PAGE_DEFAULT, q.cursor).await {
        Ok(v) => v,
        Err(e) => return page_error(e),
    };
    let act = may_act_on_tasks(&caller);
    let body = html! {
        h1 { "Tasks" }
        (filters(&q))
        @if act { (submit_form()) }
        div #tasks-live data-live="tasks" {
            (task_table(&v, act, now_ms()))
            nav.pager {
                @if q.cursor.is_some() { a href={"/tasks" (query_string(&q, None))} { "← Newest" } }
                @if let Some(next) = v["next_cursor"].as_u64() {
                    a #tasks-older href={"/tasks" (query_string(&q, Some(next)))} { "Older →" }
                }
            }
        }
    };
    layout("Tasks", session_of(&caller), body).into_response()
}

/// The filter form: a plain GET, so a filtered view is a link to share.
fn filters(q: &TasksQuery) -> Markup {
    let val = |o: &Option<String>| o.clone().unwrap_or_default();
    let state = val(&q.state);
    html! {
        form.filters #task-filters method="get" action="/tasks" {
            label { "State "
                select name="state" {
                    option value="" selected[state.is_empty()] { "any" }
                    @for s in crate::core::TaskState::ALL.map(|s| s.as_str()) { option value=(s) selected[state == s] { (s) } }
                }
            }
            label { "Agent " input name="agent" value=(val(&q.agent)) size="12"; }
            label { "Capability " input name="capability" value=(val(&q.capability)) size="10"; }
            label { "Label " input name="label" value=(val(&q.label)) placeholder="key=value" size="12"; }
            label { "Title " input type="search" name="q" value=(val(&q.q)) placeholder="contains…" size="16"; }
            button type="submit" { "Filter" }
            a href="/tasks" { "Clear" }
        }
    }
}

/// The filters (and a cursor) as a query string, for the pager's links.
fn query_string(q: &TasksQuery, cursor: Option<u64>) -> String {
    let mut parts = Vec::new();
    for (k, v) in [
        ("state", &q.state),
        ("agent", &q.agent),
        ("capability", &q.capability),
        ("label", &q.label),
        ("q", &q.q),
    ] {
        if let Some(v) = v.as_deref().filter(|v| !v.is_empty()) {
            parts.push(format!("{k}={}", enc(v)));
        }
    }
    if let Some(c) = cursor {
        parts.push(format!("cursor={c}"));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

/// The admin's submit form; the script posts it as JSON to `/api/v1/tasks`.
fn submit_form() -> Markup {
    html! {
        details.submit {
            summary { "Submit a task" }
            form #submit-form data-post="/api/v1/tasks" {
                label { "Title " input name="title" required maxlength="500" size="40"; }
                label { "Description " textarea name="description" rows="3" cols="60" {} }
                label { "Capabilities " input name="capabilities" placeholder="comma-separated" size="20"; }
                label { "Priority " input type="number" name="priority" value="0" min="-1000" max="1000"; }
                label { "Repository " input name="repo" placeholder="git URL (optional)" size="30"; }
                label { "Labels " input name="labels" placeholder="key=value, key=value" size="24"; }
                button type="submit" { "Submit" }
            }
        }
    }
}

fn task_table(v: &Value, act: bool, now: u64) -> Markup {
    let empty = Vec::new();
    let tasks = v["tasks"].as_array().unwrap_or(&empty);
    if tasks.is_empty() {
        return html! { p.explain #tasks-empty { "No tasks match." } };
    }
    html! {
        table #tasks {
            thead { tr {
                th { "ID" } th { "Title" } th { "State" } th { "Agent" } th { "Priority" }
                th { "Labels" } th { "Attempts" } th { "Age" } th { "Updated" }
                @if act { th { "Actions" } }
            } }
            tbody {
                @for t in tasks { (task_row(t, act, now)) }
            }
        }
        @if v["truncated"].as_bool() == Some(true) {
            p.muted { "This page was cut short by size; Older → continues." }
        }
    }
}

fn task_row(t: &Value, act: bool, now: u64) -> Markup {
    let id = t["id"].as_u64().unwrap_or(0);
    let state = str_of(&t["state"]);
    html! {
        tr data-task=(id) data-state=(css_word(state)) {
            td { a href={"/tasks/" (id)} { (id) } }
            td { a href={"/tasks/" (id)} { (clean_line(str_of(&t["title"]))) } }
            td { span class={"state " (css_word(state))} { (clean_line(state)) } }
            td { (agent_link(&t["agent"])) }
            td { (num(&t["priority"])) }
            td { (labels(&t["labels"])) }
            td { (num(&t["attempts"])) " / " (num(&t["max_attempts"])) }
            td { (when(t["submitted_at"].as_u64(), now)) }
            td { (when(t["updated_at"].as_u64(), now)) }
            @if act { td { (task_actions(id, state)) } }
        }
    }
}

/// Cancel for a task that has not ended; requeue for one that has.
fn task_actions(id: u64, state: &str) -> Markup {
    let ended = matches!(state, "completed" | "failed" | "cancelled");
    html! {
        @if ended {
            button.act data-post={"/api/v1/tasks/" (id) "/requeue"} { "Requeue" }
        } @else {
            button.act.danger data-post={"/api/v1/tasks/" (id) "/cancel"} { "Cancel" }
        }
    }
}

fn agent_link(agent: &Value) -> Markup {
    match agent.as_str() {
        Some(a) => html! { a href={"/tasks?agent=" (enc(a))} { (clean_line(a)) } },
        None => html! { span.muted { "—" } },
    }
}

fn labels(v: &Value) -> Markup {
    let Some(m) = v.as_object() else {
        return html! {};
    };
    html! {
        @for (k, val) in m {
            a.label href={"/tasks?label=" (enc(&format!("{k}={}", str_of(val))))} {
                (clean_line(k)) "=" (clean_line(str_of(val)))
            }
            " "
        }
    }
}

// === One task ===

/// `GET /tasks/{id}`: the task, its attempts as a timeline, and its live log.
async fn detail(
    State(web): WebState,
    caller: Result<Caller, ApiError>,
    Path(id): Path<String>,
) -> Response {
    let caller = match caller {
        Ok(c) => c,
        Err(e) => return page_error(e),
    };
    let Ok(id) = id.parse::<u64>() else {
        return explain(
            StatusCode::NOT_FOUND,
            "No such task",
            "A task's address is /tasks/ and its number; the Tasks page lists them.",
        );
    };
    let t = match web
        .op(&caller, OpRequest::TaskShow { id: TaskId(id) })
        .await
    {
        Ok(v) => v,
        Err(e) => return page_error(e),
    };
    let act = may_act_on_tasks(&caller);
    let now = now_ms();
    let title = format!("Task {id}");
    let body = html! {
        div #task-live data-live="task" {
            h1 { "Task " (id) ": " (clean_line(str_of(&t["title"]))) }
            (task_fields(&t, now))
            @if act { p.actions { (task_actions(id, str_of(&t["state"]))) } }
            (text_block("Description", str_of(&t["description"])))
            @if let Some(note) = t["progress_note"].as_str() {
                h2 { "Progress" }
                p { (clean_line(note)) " " (when(t["progress_at"].as_u64(), now)) }
            }
            (activity(&t["activity"]))
            (usage_block("Usage and cost", &t["usage"]))
            (timeline(&t, now))
        }
        @if t["generation"].as_u64().unwrap_or(0) > 0 {
            section.log {
                h2 { "Log " span #log-status.muted { "connecting…" } }
                pre #log data-log-url={"/api/v1/tasks/" (id) "/logs?follow=1&tail=200"} {}
            }
        }
    };
    layout(&title, session_of(&caller), body).into_response()
}

fn task_fields(t: &Value, now: u64) -> Markup {
    let state = str_of(&t["state"]);
    html! {
        table.fields #task-fields {
            tr { th { "State" } td {
                span #task-state class={"state " (css_word(state))} { (clean_line(state)) }
                @if let Some(r) = t["reason"].as_str() { " — " (clean_line(r)) }
            } }
            @if let Some(r) = t["result"].as_str() { tr { th { "Result" } td { (clean_line(r)) } } }
            tr { th { "Agent" } td { (agent_link(&t["agent"])) } }
            tr { th { "Priority" } td { (num(&t["priority"])) } }
            tr { th { "Attempts" } td { (num(&t["attempts"])) " of " (num(&t["max_attempts"])) " (generation " (num(&t["generation"])) ")" } }
            tr { th { "Capabilities" } td { (list_of(&t["capabilities"])) } }
            tr { th { "Labels" } td { (labels(&t["labels"])) } }
            @if let Some(after) = t["after"].as_array() {
                @if !after.is_empty() {
                    tr { th { "After" } td {
                        @for d in after { @if let Some(d) = d.as_u64() { a href={"/tasks/" (d)} { (d) } " " } }
                    } }
                }
            }
            @if let Some(repo) = t["repo"].as_str() {
                tr { th { "Repository" } td { code { (clean_line(repo)) }
                    @if let Some(b) = t["base"].as_str() { " at " code { (clean_line(b)) } } } }
            }
            @if let Some(ms) = t["timeout_ms"].as_u64() { tr { th { "Timeout" } td { (span(ms)) } } }
            tr { th { "Submitted" } td { (when(t["submitted_at"].as_u64(), now)) } }
            tr { th { "Updated" } td { (when(t["updated_at"].as_u64(), now)) } }
            @if let Some(nb) = t["not_before"].as_u64() { tr { th { "Not before" } td { (when(Some(nb), now)) } } }
        }
    }
}

fn list_of(v: &Value) -> String {
    let items: Vec<&str> = v
        .as_array()
        .map(|a| a.iter().map(str_of).collect())
        .unwrap_or_default();
    if items.is_empty() {
        "—".into()
    } else {
        clean_line(&items.join(", "))
    }
}

/// A block of text from the task or its agent, as preformatted text.
fn text_block(heading: &str, text: &str) -> Markup {
    html! {
        @if !text.trim().is_empty() {
            h2 { (heading) }
            pre.text { (clean(text)) }
        }
    }
}

/// What the running attempt is doing, from the hub's memory.
fn activity(a: &Value) -> Markup {
    if !a.is_object() {
        return html! {};
    }
    html! {
        h2 { "Activity" }
        p #activity {
            span class={"activity " (css_word(str_of(&a["class"])))} { (clean_line(&str_of(&a["class"]).replace('_', " "))) }
            " · silent for " (span(a["silent_ms"].as_u64().unwrap_or(0)))
            " · output " (bytes(a["output_bytes"].as_u64().unwrap_or(0)))
            @if let Some(cpu) = a["cpu_ms"].as_u64() { " · CPU " (span(cpu)) }
        }
        (text_block("Output tail", str_of(&a["output_tail"])))
    }
}

/// Tokens and cost, from a usage view.
fn usage_block(heading: &str, u: &Value) -> Markup {
    if !u.is_object() {
        return html! {};
    }
    html! {
        h2 { (heading) }
        (usage_line(u))
    }
}

fn usage_line(u: &Value) -> Markup {
    html! {
        p.usage {
            @if let Some(m) = u["model"].as_str() { (clean_line(m)) " · " }
            (num(&u["input_tokens"])) " in · " (num(&u["output_tokens"])) " out · "
            (num(&u["cache_read_tokens"])) " cache read · " (num(&u["cache_write_tokens"])) " cache write"
            @if let Some(c) = u["cost_usd"].as_f64() { " · $" (format!("{c:.4}")) }
        }
    }
}

/// The attempts, oldest first, each with its outcome, error, tails and workspace.
fn timeline(t: &Value, now: u64) -> Markup {
    let empty = Vec::new();
    let attempts = t["attempt_history"].as_array().unwrap_or(&empty);
    html! {
        h2 { "Attempts" }
        @if attempts.is_empty() {
            p.explain { "No attempt yet." }
        } @else {
            @if let Some(n) = t["attempts_not_shown"].as_u64().filter(|n| *n > 0) {
                p.muted { (n) " older attempts not shown." }
            }
            ol.timeline #attempts {
                @for a in attempts { (attempt(a, now)) }
            }
        }
    }
}

fn attempt(a: &Value, now: u64) -> Markup {
    let outcome = a["outcome"].as_str().unwrap_or(if a["ended_at"].is_null() {
        "in progress"
    } else {
        "ended"
    });
    html! {
        li class={"attempt " (css_word(outcome))} {
            div.head {
                strong { "Attempt " (num(&a["generation"])) }
                " on " (agent_link(&a["agent"]))
                " · " span class={"state " (css_word(outcome))} { (clean_line(outcome)) }
            }
            p.times {
                "assigned " (when(a["assigned_at"].as_u64(), now))
                @if a["started_at"].is_u64() { " · started " (when(a["started_at"].as_u64(), now)) }
                @if a["ended_at"].is_u64() { " · ended " (when(a["ended_at"].as_u64(), now)) }
                @if let Some(pid) = a["pid"].as_u64() { " · pid " (pid) }
            }
            @if a["error"].is_object() { (failure(&a["error"])) }
            @if a["work"].is_object() { (work(&a["work"])) }
            @if a["usage"].is_object() { (usage_line(&a["usage"])) }
        }
    }
}

fn failure(e: &Value) -> Markup {
    html! {
        div.error {
            p {
                strong { "Error: " } (clean_line(str_of(&e["reason"])))
                @if let Some(c) = e["exit_code"].as_i64() { " · exit code " (c) }
                @if let Some(s) = e["signal"].as_i64() { " · signal " (s) }
                @if e["no_retry"].as_bool() == Some(true) { " · not retried" }
            }
            @if let Some(cmd) = e["command"].as_array().filter(|c| !c.is_empty()) {
                p { "Command: " code { (clean_line(&cmd.iter().map(str_of).collect::<Vec<_>>().join(" "))) } }
            }
            (text_block("stderr (tail)", str_of(&e["stderr_tail"])))
            (text_block("stdout (tail)", str_of(&e["stdout_tail"])))
        }
    }
}

fn work(w: &Value) -> Markup {
    html! {
        p.work {
            "Workspace: branch " code { (clean_line(str_of(&w["branch"]))) }
            " · head " code title=(clean_line(str_of(&w["head"]))) { (clean_line(&short(str_of(&w["head"])))) }
            " · " (num(&w["commits"])) " commits"
            @if w["dirty"].as_bool() == Some(true) { " · uncommitted changes" }
            @if let Some(l) = w["link"].as_str().filter(|l| l.starts_with("https://") || l.starts_with("http://")) {
                " · " a href=(l) rel="noopener noreferrer" { "view" }
            }
        }
        (text_block("Diffstat", str_of(&w["diffstat"])))
    }
}

/// A commit id, shortened as git does.
fn short(head: &str) -> String {
    head.chars().take(12).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_task_text_is_escaped_and_its_control_characters_shown() {
        let t = serde_json::json!({
            "id": 7, "state": "running\"><script>", "title": "<img src=x onerror=alert(1)>\u{1b}[2J\r",
            "agent": "a/b c", "labels": {"k": "v\u{7}"}, "priority": 1, "attempts": 1, "max_attempts": 3,
            "submitted_at": 1, "updated_at": 2,
        });
        let html = task_row(&t, true, 10_000).into_string();
        assert!(!html.contains("<img"), "{html}");
        assert!(!html.contains("<script>"), "{html}");
        assert!(!html.contains('\u{1b}') && !html.contains('\r') && !html.contains('\u{7}'));
        assert!(html.contains("\\u{1b}[2J\\u{d}"), "{html}");
        assert!(html.contains("href=\"/tasks?agent=a%2Fb%20c\""), "{html}");
        assert!(
            html.contains("data-post=\"/api/v1/tasks/7/cancel\""),
            "{html}"
        );
        assert!(html.contains(
            "<time datetime=\"1970-01-01T00:00:00Z\" title=\"1970-01-01 00:00:00 UTC\">"
        ));
        // An operator's row has no actions.
        assert!(
            !task_row(&t, false, 10_000)
                .into_string()
                .contains("data-post")
        );
    }

    #[test]
    fn pager_links_keep_the_filters() {
        let q = TasksQuery {
            state: Some("running".into()),
            label: Some("team=a b".into()),
            q: Some(String::new()),
            ..TasksQuery::default()
        };
        assert_eq!(
            query_string(&q, Some(42)),
            "?state=running&label=team%3Da%20b&cursor=42"
        );
        assert_eq!(query_string(&TasksQuery::default(), None), "");
    }
}
