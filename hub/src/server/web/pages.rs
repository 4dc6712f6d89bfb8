//! The dashboard's pages: server-rendered HTML (maud), one small script for
//! live updates, everything embedded in the binary.

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use maud::{DOCTYPE, Markup, PreEscaped, html};
use serde_json::Value;

use super::{ApiError, AppState, Caller, Session, WebState};
use axum::extract::State;
use muster_protocol::msg::OpRequest;

const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/fleet") }))
        .route("/assets/app.js", get(js))
        .route("/assets/app.css", get(css))
        .route("/fleet", get(fleet))
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
                        span.who { (s.name) " · " (s.role) }
                        form.logout method="post" action="/logout" {
                            input type="hidden" name="csrf" value=(s.csrf);
                            button type="submit" { "Sign out" }
                        }
                    }
                }
                main { (body) }
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

/// `GET /fleet`: every agent with its state, why, slots, host figures and heartbeat age.
async fn fleet(State(web): WebState, caller: Result<Caller, ApiError>) -> Response {
    let caller = match caller {
        Ok(c) => c,
        Err(e) => return page_error(e),
    };
    let v = match web.op(&caller, OpRequest::Agents).await {
        Ok(v) => v,
        Err(e) => return page_error(e),
    };
    let session = caller.session.as_ref().map(|(_, s)| s);
    layout("Fleet", session, fleet_body(&v)).into_response()
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "—".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn fleet_body(v: &Value) -> Markup {
    let agents = v["agents"].as_array().cloned().unwrap_or_default();
    html! {
        h1 { "Fleet" }
        p.summary #fleet-summary {
            (text(&v["total"])) " agents"
            @if let Some(m) = v["by_state"].as_object() {
                @for (state, n) in m { " · " (text(n)) " " (state) }
            }
        }
        table #agents data-live="fleet" {
            thead { tr { th { "Agent" } th { "State" } th { "Why" } th { "Slots" } th { "Tasks" } } }
            tbody {
                @for a in &agents {
                    tr data-agent=(text(&a["name"])) {
                        td { (text(&a["name"])) }
                        td { span class={"state " (text(&a["state"]))} { (text(&a["state"])) } }
                        td { (text(&a["why"])) }
                        td { (text(&a["slots"])) }
                        td { (text(&a["running"])) }
                    }
                }
            }
        }
        (PreEscaped(""))
    }
}
