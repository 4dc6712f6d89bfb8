//! The web dashboard and the HTTP JSON API (`[dashboard]` in hub.toml): one
//! listener, routed by axum, answered by the same core as the QUIC operator
//! API and under the same limits.
//!
//! ```text
//! browser ──cookie+CSRF──┐
//!                        ├─▶ Caller ─▶ role check ─▶ ToCore::Op / Watch ─▶ core thread
//! script ──Bearer token──┘
//! ```
//!
//! Plain HTTP is allowed on loopback only; beyond it the listener speaks TLS
//! with the hub's certificate or the files given (checked when hub.toml is read).

mod api;
mod auth;
mod login;
mod pages;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use muster_hub_core::web::{Login, role_allows};
use muster_protocol::EventSeq;
use muster_protocol::msg::{OpErrorCode, OpRequest, OpResponse, Role};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::Value;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tracing::{debug, info, warn};

use super::ToCore;
use super::logs::{LogRelay, LogRelays};
use crate::config::{Dashboard, DashboardTls};
use crate::pki::Pki;
pub(crate) use auth::Session;

/// How long a request waits for the core before answering 503.
const CORE_WAIT: Duration = Duration::from_secs(10);
/// How long a client has to send its request headers (and finish a TLS handshake).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Most open event streams (SSE) at once.
pub(crate) const EVENT_STREAMS_MAX: usize = 256;
/// Most open HTTP connections at once.
pub(crate) const CONNECTIONS_MAX: usize = 1024;
/// Most bytes of an oversized body read (and dropped) before its 413; a
/// larger one just gets the answer and the connection closed.
const DRAIN_BYTES_MAX: u64 = 16 << 20;
/// Longest an oversized body is read before its 413 goes out anyway.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// What every handler shares.
pub(crate) struct Web {
    to_core: mpsc::Sender<ToCore>,
    sessions: auth::Sessions,
    limiter: auth::LoginLimiter,
    /// Whether the listener speaks TLS (cookies get `Secure`).
    secure: bool,
    /// Largest request body, as the QUIC API's largest frame.
    body_max: usize,
    /// Open event streams, at most [`EVENT_STREAMS_MAX`].
    streams: Arc<Semaphore>,
    /// Log relays, shared with `task logs` over QUIC (one bound for both).
    logs: Arc<LogRelays>,
    /// Requests in flight per caller, at most [`auth::REQUESTS_PER_CALLER_MAX`].
    in_flight: Arc<auth::InFlight>,
}

type AppState = Arc<Web>;

/// A running dashboard listener.
pub(crate) struct Listening {
    /// The bound address.
    pub(crate) addr: SocketAddr,
    /// The URL login links point at.
    pub(crate) url: String,
    /// The accept loop.
    pub(crate) task: tokio::task::JoinHandle<()>,
}

/// Binds the dashboard listener and starts serving.
///
/// # Errors
/// Why it could not start, in words naming the key or file to fix.
pub(crate) async fn start(
    cfg: &Dashboard,
    addr: SocketAddr,
    advertise_host: &str,
    pki: &Pki,
    body_max: usize,
    to_core: mpsc::Sender<ToCore>,
    logs: Arc<LogRelays>,
) -> Result<Listening, String> {
    let tls = match cfg.tls {
        DashboardTls::Off if !addr.ip().is_loopback() => {
            return Err(format!(
                "[dashboard] listen = {addr} is beyond loopback; set tls = \"hub\" or \"files\""
            ));
        }
        DashboardTls::Off => None,
        DashboardTls::Hub => Some(tls_config(
            pki.server_chain.clone(),
            pki.server_key.clone_key(),
        )?),
        DashboardTls::Files => {
            let (Some(cert), Some(key)) = (&cfg.cert, &cfg.key) else {
                return Err("[dashboard] tls = \"files\" needs cert and key".into());
            };
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("[dashboard] cert {}: {e}", cert.display()))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| format!("[dashboard] key {}: {e}", key.display()))?;
            Some(tls_config(chain, key)?)
        }
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr} ([dashboard] listen): {e}"))?;
    let bound = listener
        .local_addr()
        .map_err(|e| format!("[dashboard] listen {addr}: {e}"))?;
    let url = if cfg.url.is_empty() {
        base_url(bound, advertise_host, tls.is_some())
    } else {
        cfg.url.trim_end_matches('/').to_string()
    };
    let web = Arc::new(Web {
        to_core,
        sessions: auth::Sessions::new(cfg.session_ttl),
        limiter: auth::LoginLimiter::new(Instant::now()),
        secure: tls.is_some(),
        body_max,
        streams: Arc::new(Semaphore::new(EVENT_STREAMS_MAX)),
        logs,
        in_flight: Arc::new(auth::InFlight::default()),
    });
    let router = router(web);
    let acceptor = tls.map(|t| tokio_rustls::TlsAcceptor::from(Arc::new(t)));
    let task = tokio::spawn(accept_loop(listener, acceptor, router));
    info!(addr = %bound, %url, "dashboard listening");
    Ok(Listening {
        addr: bound,
        url,
        task,
    })
}

/// The URL a browser reaches the dashboard at: the bound address, or on an
/// all-addresses listener the host join tokens carry.
fn base_url(bound: SocketAddr, advertise_host: &str, tls: bool) -> String {
    let scheme = if tls { "https" } else { "http" };
    let host = if bound.ip().is_unspecified() {
        advertise_host.to_string()
    } else {
        match bound.ip() {
            IpAddr::V6(ip) => format!("[{ip}]"),
            IpAddr::V4(ip) => ip.to_string(),
        }
    };
    format!("{scheme}://{host}:{}", bound.port())
}

fn tls_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<rustls::ServerConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("[dashboard] TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("[dashboard] certificate and key: {e}"))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

fn router(web: AppState) -> Router {
    Router::new()
        .merge(api::routes())
        .merge(login::routes())
        .merge(pages::routes())
        .layer(axum::extract::DefaultBodyLimit::max(web.body_max))
        .layer(axum::middleware::from_fn_with_state(
            web.clone(),
            declared_body_limit,
        ))
        .layer(axum::middleware::map_response(security_headers))
        .with_state(web)
}

/// Refuses an API request whose declared `Content-Length` is past the body
/// limit before its body is parsed. A client that sent `Expect: 100-continue`
/// (curl does for large bodies) is told at once and never sends the body; one
/// already sending it has it read and thrown away first (up to
/// [`DRAIN_BYTES_MAX`] within [`DRAIN_TIMEOUT`]), so it reads the 413 rather
/// than a connection reset by a close with its bytes unread. A body without a
/// length is cut at the limit as it is read (`DefaultBodyLimit`), with a 413 too.
async fn declared_body_limit(
    State(web): State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let Some(declared) = declared.filter(|n| *n > web.body_max as u64) else {
        return next.run(req).await;
    };
    if !req.uri().path().starts_with("/api/") {
        return next.run(req).await;
    }
    let expects_continue = req
        .headers()
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if !expects_continue && declared <= DRAIN_BYTES_MAX {
        use futures::StreamExt;
        let mut body = req.into_body().into_data_stream();
        // Each piece is dropped as it comes: nothing is kept.
        let drain = async { while let Some(Ok(_)) = body.next().await {} };
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, drain).await;
    }
    ApiError::too_large(web.body_max).into_response()
}

/// Headers on every answer: no caching of private pages, no framing, no
/// referrer to other sites (a login URL carries its secret), and scripts from
/// the hub only. Not `no-referrer`: under it browsers send `Origin: null` on
/// the page's own POSTs, which the origin check must refuse.
async fn security_headers(mut res: Response) -> Response {
    let h = res.headers_mut();
    let set = |h: &mut axum::http::HeaderMap, k, v: &'static str| {
        h.entry(k).or_insert(HeaderValue::from_static(v));
    };
    set(h, header::CACHE_CONTROL, "no-store");
    set(h, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(h, header::X_FRAME_OPTIONS, "DENY");
    set(h, header::REFERRER_POLICY, "same-origin");
    set(
        h,
        header::CONTENT_SECURITY_POLICY,
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    );
    res
}

/// The peer of a connection, put on each of its requests.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Peer(pub(crate) SocketAddr);

async fn accept_loop(
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    router: Router,
) {
    let slots = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors, say: wait a moment rather than spin.
                warn!("dashboard accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(%peer, "dashboard: too many connections; closing this one");
            continue;
        };
        let router = router.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let _ = tcp.set_nodelay(true);
            match tls {
                Some(acceptor) => {
                    match tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => serve_connection(stream, peer, router).await,
                        Ok(Err(e)) => debug!(%peer, "dashboard TLS handshake: {e}"),
                        Err(_) => debug!(%peer, "dashboard TLS handshake timed out"),
                    }
                }
                None => serve_connection(tcp, peer, router).await,
            }
        });
    }
}

async fn serve_connection<S>(stream: S, peer: SocketAddr, router: Router)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use tower_service::Service;
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(Peer(peer));
        let mut router = router.clone();
        async move { router.call(req).await }
    });
    let io = hyper_util::rt::TokioIo::new(stream);
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(64 * 1024)
        .serve_connection(io, svc);
    if let Err(e) = conn.await {
        debug!(%peer, "dashboard connection: {e}");
    }
}

// === Answers ===

/// An error as the API and the pages answer it: a status, a stable code and a
/// message that says what to do.
#[derive(Debug, Clone)]
pub(crate) struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) code: &'static str,
    pub(crate) message: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub(crate) fn unauthenticated(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthenticated", message)
    }

    pub(crate) fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid", message)
    }

    /// A body past the limit, which is the QUIC API's largest frame.
    pub(crate) fn too_large(body_max: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!(
                "the body is larger than the {body_max} bytes the hub takes ([limits] max_frame_bytes); send less (a long description belongs in the repository)"
            ),
        )
    }

    fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }

    /// The error an operator answer carries (anything but an error is a bug here).
    pub(crate) fn of_response(resp: OpResponse) -> Self {
        match resp {
            OpResponse::Error(e) => Self::of(e.code, e.message),
            _ => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "unexpected answer from the hub",
            ),
        }
    }

    /// The JSON body of this error, `{"error": {"code", "message"}}`.
    pub(crate) fn body(&self) -> Value {
        serde_json::json!({"error": {"code": self.code, "message": self.message}})
    }

    fn of(code: OpErrorCode, message: String) -> Self {
        let (status, code) = match code {
            OpErrorCode::Forbidden => (StatusCode::FORBIDDEN, "forbidden"),
            OpErrorCode::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            OpErrorCode::Invalid => (StatusCode::BAD_REQUEST, "invalid"),
            OpErrorCode::Busy => (StatusCode::TOO_MANY_REQUESTS, "busy"),
            OpErrorCode::Conflict => (StatusCode::CONFLICT, "conflict"),
            OpErrorCode::ProtocolMismatch | OpErrorCode::Internal => {
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
        };
        Self::new(status, code, message)
    }
}

/// The API's error body: `{"error": {"code": "...", "message": "..."}}`.
impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut res = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            res.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"muster\""),
            );
        }
        res
    }
}

// === Who is asking ===

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    /// The fingerprint the core authorizes: an identity's, or `api:<hash>`.
    pub(crate) fingerprint: String,
    /// A browser session, with the role it was granted and its CSRF token;
    /// `None` for an API token (whose role the core knows).
    pub(crate) session: Option<(String, Session)>,
    /// Counts this request against the caller's requests in flight until dropped.
    _in_flight: Arc<auth::InFlightPlace>,
}

impl Caller {
    /// The session's role, if a browser asks.
    pub(crate) fn role(&self) -> Option<Role> {
        self.session.as_ref().map(|(_, s)| s.role)
    }
}

/// Authenticates a request: a bearer token, or a session cookie whose identity
/// the core still knows. State-changing methods with a cookie must carry the
/// session's CSRF token in `X-CSRF-Token` and, if they send `Origin`, come
/// from this origin.
impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, web: &AppState) -> Result<Self, ApiError> {
        let cred = auth::credential(&parts.headers).map_err(ApiError::unauthenticated)?;
        match cred {
            auth::Credential::Bearer(fingerprint) => {
                let place = web.in_flight(&fingerprint)?;
                // A revoked or expired token is told so at once, as 401 (who are
                // you?), not as the 403 (you may not) the core would answer.
                if !web.alive(&fingerprint).await? {
                    return Err(ApiError::unauthenticated(
                        "this API token is unknown, expired or revoked; ask an admin for a new one (`muster-hub token create --kind api`)",
                    ));
                }
                Ok(Caller {
                    fingerprint,
                    session: None,
                    _in_flight: place,
                })
            }
            auth::Credential::None => Err(ApiError::unauthenticated(
                "no credential: send `Authorization: Bearer <API token>` (`muster-hub token create --kind api`), or sign in with `muster-hub dashboard`",
            )),
            auth::Credential::Cookie(id) => {
                let session = web.session(&id).await?;
                let safe = matches!(parts.method, Method::GET | Method::HEAD);
                if !safe {
                    check_csrf(parts, &session)?;
                }
                let place = web.in_flight(&session.fingerprint)?;
                Ok(Caller {
                    fingerprint: session.fingerprint.clone(),
                    session: Some((id, session)),
                    _in_flight: place,
                })
            }
        }
    }
}

/// A state-changing request made with a cookie proves it came from our page.
fn check_csrf(parts: &Parts, session: &Session) -> Result<(), ApiError> {
    let token = parts
        .headers
        .get("x-csrf-token")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !auth::same_secret(token, &session.csrf) {
        return Err(ApiError::forbidden(
            "missing or wrong CSRF token: send the page's token in the X-CSRF-Token header (reload the page for a fresh one)",
        ));
    }
    same_origin(&parts.headers)
}

/// If the browser says where a request comes from, it must be this origin.
pub(crate) fn same_origin(headers: &axum::http::HeaderMap) -> Result<(), ApiError> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    let origin = origin.to_str().unwrap_or_default();
    let from_here = origin
        .split_once("://")
        .is_some_and(|(_, rest)| rest == host);
    if from_here {
        Ok(())
    } else {
        Err(ApiError::forbidden(format!(
            "cross-origin request from {origin} refused"
        )))
    }
}

impl Web {
    /// The live session of a cookie: known, not expired, and its identity
    /// still live in the core (a revoked identity's sessions end here).
    async fn session(&self, id: &str) -> Result<Session, ApiError> {
        let Some(session) = self.sessions.get(id, Instant::now()) else {
            return Err(ApiError::unauthenticated(
                "your session has ended or is unknown; run `muster-hub dashboard` for a new login link",
            ));
        };
        if self.alive(&session.fingerprint).await? {
            return Ok(session);
        }
        self.sessions.end_all(&session.fingerprint);
        Err(ApiError::unauthenticated(
            "the identity this session belongs to has been revoked; sign in again with a live credential",
        ))
    }

    /// Whether a caller of a long stream may still read: its session (if it
    /// has one) has not ended, and the core still knows its identity or token.
    ///
    /// # Errors
    /// When the core does not answer in time (the caller may well be valid).
    pub(crate) async fn still_valid(
        &self,
        fingerprint: &str,
        session: Option<&str>,
    ) -> Result<bool, ApiError> {
        if let Some(id) = session
            && self.sessions.get(id, Instant::now()).is_none()
        {
            return Ok(false);
        }
        self.alive(fingerprint).await
    }

    /// Whether the core still knows `fingerprint` as a live caller (an
    /// identity, or an API token neither expired nor revoked).
    async fn alive(&self, fingerprint: &str) -> Result<bool, ApiError> {
        let (tx, rx) = oneshot::channel();
        self.send(ToCore::Alive {
            fingerprint: fingerprint.to_string(),
            reply: tx,
        })
        .await?;
        match tokio::time::timeout(CORE_WAIT, rx).await {
            Ok(Ok(alive)) => Ok(alive),
            _ => Err(ApiError::unavailable(
                "the hub did not answer in time; try again",
            )),
        }
    }

    /// Counts a request of `fingerprint` in flight, or refuses it (429) when
    /// that caller has [`auth::REQUESTS_PER_CALLER_MAX`] in flight already.
    fn in_flight(&self, fingerprint: &str) -> Result<Arc<auth::InFlightPlace>, ApiError> {
        auth::InFlight::take(&self.in_flight, fingerprint)
            .map(Arc::new)
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "busy",
                    format!(
                        "this credential has {} requests in flight already; wait for their answers",
                        auth::REQUESTS_PER_CALLER_MAX
                    ),
                )
            })
    }

    /// Opens a relay of an attempt's log for `caller` (the same as `task logs`).
    pub(crate) async fn logs(
        &self,
        caller: &Caller,
        query: muster_protocol::msg::LogQuery,
    ) -> Result<LogRelay, ApiError> {
        if let Some(role) = caller.role()
            && !role_allows(role, &OpRequest::TaskLogs(query.clone()))
        {
            return Err(ApiError::forbidden(format!(
                "this dashboard session has role {role}, which may not read logs"
            )));
        }
        self.logs
            .open(caller.fingerprint.clone(), query)
            .await
            .map_err(ApiError::of_response)
    }

    async fn send(&self, msg: ToCore) -> Result<(), ApiError> {
        self.to_core
            .send(msg)
            .await
            .map_err(|_| ApiError::unavailable("the hub is shutting down"))
    }

    /// Runs an operator request as `caller`; the answer's JSON, or the error.
    pub(crate) async fn op(&self, caller: &Caller, request: OpRequest) -> Result<Value, ApiError> {
        if let Some(role) = caller.role()
            && !role_allows(role, &request)
        {
            return Err(ApiError::forbidden(format!(
                "this dashboard session has role {role}, which may not do this; sign in with `muster-hub dashboard --role admin`"
            )));
        }
        let (tx, rx) = oneshot::channel();
        self.send(ToCore::Op {
            fingerprint: caller.fingerprint.clone(),
            request,
            reply: tx,
        })
        .await?;
        answer(tokio::time::timeout(CORE_WAIT, rx).await)
    }

    /// A page of tasks matching `filter`, newest first (the `tasks` answer).
    pub(crate) async fn tasks(
        &self,
        caller: &Caller,
        filter: crate::store::TaskFilter,
        limit: u32,
        cursor: Option<u64>,
    ) -> Result<Value, ApiError> {
        let (tx, rx) = oneshot::channel();
        self.send(ToCore::Tasks {
            fingerprint: caller.fingerprint.clone(),
            filter,
            limit,
            cursor,
            reply: tx,
        })
        .await?;
        answer(tokio::time::timeout(CORE_WAIT, rx).await)
    }

    /// A page of agents by name after `after` (the fleet view; see `Core::agents_page`).
    pub(crate) async fn agents_page(
        &self,
        caller: &Caller,
        after: Option<String>,
        limit: u32,
    ) -> Result<Value, ApiError> {
        let (tx, rx) = oneshot::channel();
        self.send(ToCore::AgentsPage {
            fingerprint: caller.fingerprint.clone(),
            after,
            limit,
            reply: tx,
        })
        .await?;
        answer(tokio::time::timeout(CORE_WAIT, rx).await)
    }

    /// Opens an event stream for `caller` from `from` (`None`: from now).
    pub(crate) async fn watch(
        &self,
        caller: &Caller,
        from: Option<EventSeq>,
    ) -> Result<
        (
            mpsc::Receiver<OpResponse>,
            tokio::sync::OwnedSemaphorePermit,
        ),
        ApiError,
    > {
        let permit = self.streams.clone().try_acquire_owned().map_err(|_| {
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "busy",
                format!("{EVENT_STREAMS_MAX} event streams are open; close one or poll instead"),
            )
        })?;
        let (tx, rx) = mpsc::channel(super::queries::WATCH_PAGE * 2);
        self.send(ToCore::Watch {
            fingerprint: caller.fingerprint.clone(),
            tx,
            from,
        })
        .await?;
        Ok((rx, permit))
    }

    /// Redeems a one-time login secret into a session: its cookie value.
    pub(crate) async fn redeem(
        &self,
        secret: &str,
        peer: IpAddr,
    ) -> Result<(String, Session), ApiError> {
        let now = Instant::now();
        if let Err(wait) = self.limiter.check(peer, now) {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "busy",
                format!("too many failed sign-ins; wait {wait} s and try again"),
            ));
        }
        let refuse = |why: &str| {
            self.limiter.failed(peer, now);
            ApiError::unauthenticated(why)
        };
        if !auth::secret_shaped(secret) {
            return Err(refuse(
                "this is not a login link of this hub; run `muster-hub dashboard` for one",
            ));
        }
        let (tx, rx) = oneshot::channel();
        self.send(ToCore::Redeem {
            hash: muster_protocol::tls::fingerprint(secret.as_bytes()),
            reply: tx,
        })
        .await?;
        let login: Login = match tokio::time::timeout(CORE_WAIT, rx).await {
            Ok(Ok(Ok(login))) => login,
            Ok(Ok(Err(why))) => return Err(refuse(why)),
            _ => {
                return Err(ApiError::unavailable(
                    "the hub did not answer in time; try again",
                ));
            }
        };
        info!(name = login.name, role = %login.role, "dashboard sign-in");
        self.sessions.create(login, now).ok_or_else(|| {
            ApiError::unavailable("the system random number generator failed; try again")
        })
    }
}

/// The JSON of a core answer that came in time, or the error it makes.
fn answer(
    got: Result<Result<OpResponse, oneshot::error::RecvError>, tokio::time::error::Elapsed>,
) -> Result<Value, ApiError> {
    match got {
        Ok(Ok(OpResponse::Ok { json })) => serde_json::from_str(&json).map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("the hub rendered bad JSON: {e}"),
            )
        }),
        Ok(Ok(OpResponse::Error(e))) => Err(ApiError::of(e.code, e.message)),
        Ok(Ok(_)) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "unexpected streamed answer",
        )),
        _ => Err(ApiError::unavailable(
            "the hub did not answer in time; try again",
        )),
    }
}

/// `State` for handlers.
pub(crate) type WebState = State<AppState>;
