//! Signing in and out: the one-time login link, the session cookie, logout.
//!
//! Opening a login link does not use it up: the page posts it back (a script
//! does so at once). A chat client that fetches a pasted link to preview it
//! therefore cannot burn the one use, and the secret never lands in a log of
//! GET requests.

use axum::extract::{Form, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use maud::html;
use serde::Deserialize;

use super::pages::{explain, layout};
use super::{ApiError, AppState, Peer, WebState, auth};

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
}

#[derive(Deserialize)]
struct TokenParam {
    token: Option<String>,
}

/// `GET /login`: with `?token=`, a form that posts it (sent at once by the
/// page's script); without, how to get a login link.
async fn login_page(Query(q): Query<TokenParam>) -> Response {
    match q.token {
        Some(token) if auth::secret_shaped(&token) => layout(
            "Sign in",
            None,
            html! {
                h1 { "Sign in to muster" }
                form #login-form method="post" action="/login" {
                    input type="hidden" name="token" value=(token);
                    p { "This link signs you in once. " button type="submit" { "Sign in" } }
                }
            },
        )
        .into_response(),
        Some(_) => explain(
            StatusCode::BAD_REQUEST,
            "This is not a login link of this hub",
            "Run `muster-hub dashboard` on a machine with your muster credential and open the URL it prints.",
        ),
        None => explain(
            StatusCode::UNAUTHORIZED,
            "Sign in to muster",
            "The dashboard has no passwords. Run `muster-hub dashboard` (add `--role operator` for a read-only session) on a machine with your muster credential, and open the one-time URL it prints within its lifetime.",
        ),
    }
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

/// `POST /login`: redeems the link and starts a session.
async fn login(
    State(web): WebState,
    Extension(Peer(peer)): Extension<Peer>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    if let Err(e) = super::same_origin(&headers) {
        return explain(e.status, "Sign-in refused", &e.message);
    }
    match web.redeem(form.token.trim(), peer.ip()).await {
        Ok((id, _)) => {
            let cookie = auth::session_cookie(&id, web.sessions.ttl(), web.secure);
            ([(header::SET_COOKIE, cookie)], Redirect::to("/fleet")).into_response()
        }
        Err(e) => explain(e.status, "Sign-in refused", &e.message),
    }
}

#[derive(Deserialize)]
struct LogoutForm {
    csrf: String,
}

/// `POST /logout`: ends the session (the form carries its CSRF token).
async fn logout(
    State(web): WebState,
    headers: HeaderMap,
    Form(form): Form<LogoutForm>,
) -> Response {
    let secure = web.secure;
    if let Some(id) = auth::cookie(&headers, auth::COOKIE) {
        match web.sessions.get(&id, std::time::Instant::now()) {
            Some(s) if auth::same_secret(&form.csrf, &s.csrf) => web.sessions.remove(&id),
            Some(_) => {
                return ApiError::forbidden("wrong CSRF token; reload the page and sign out again")
                    .into_response();
            }
            None => {}
        }
    }
    (
        [(header::SET_COOKIE, auth::clear_cookie(secure))],
        Redirect::to("/login"),
    )
        .into_response()
}
