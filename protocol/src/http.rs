//! A minimal HTTP/1.1 endpoint for `/metrics` and `/healthz`, shared by the
//! hub and the sidecar. Loopback by default; GET only; bounded in time.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tracing::{info, warn};

/// An answer: status, content type, body.
pub type Answer = (u16, &'static str, String);
/// What the endpoint calls for each GET path.
pub type Handler =
    Arc<dyn Fn(String) -> Pin<Box<dyn Future<Output = Answer> + Send>> + Send + Sync>;

/// How long one request may take before the connection is dropped.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more wait in the kernel's backlog.
const CONNECTIONS_MAX: usize = 64;

/// The Prometheus text exposition format (0.0.4): what every scraper and
/// `promtool check metrics` read.
pub const PROMETHEUS: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Turns the OpenMetrics text `prometheus-client` encodes into the Prometheus
/// text format: a counter family is named with its `_total` suffix in `HELP`
/// and `TYPE` (as its samples are), and `UNIT` and `EOF` lines, which that
/// format lacks, are dropped.
pub fn openmetrics_to_text(om: &str) -> String {
    let counters: std::collections::HashSet<&str> = om
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(om.len());
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            counters
                .contains(name)
                .then(|| format!("{p}{name}_total {tail}"))
        });
        match renamed {
            Some(l) => out.push_str(l.trim_end()),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}
/// Plain text.
pub const TEXT: &str = "text/plain; charset=utf-8";

/// Binds `addr` and serves `handler` until the task is dropped.
///
/// # Errors
/// The bind error, naming the address.
pub async fn serve(
    addr: SocketAddr,
    handler: Handler,
) -> Result<tokio::task::JoinHandle<()>, String> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("http_listen {addr}: {e}"))?;
    let bound = listener.local_addr().map_err(|e| e.to_string())?;
    info!(%bound, "metrics and health on http://{bound}/metrics and /healthz");
    let limit = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS_MAX));
    Ok(tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let Ok(permit) = limit.clone().acquire_owned().await else {
                return;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |req: Request<hyper::body::Incoming>| {
                        let handler = handler.clone();
                        async move { Ok::<_, std::convert::Infallible>(respond(req, handler).await) }
                    },
                );
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service);
                if let Ok(Err(e)) = tokio::time::timeout(REQUEST_TIMEOUT, conn).await {
                    warn!("http: {e}");
                }
                drop(permit);
            });
        }
    }))
}

async fn respond(req: Request<hyper::body::Incoming>, handler: Handler) -> Response<Full<Bytes>> {
    let (status, content_type, body) = if req.method() != hyper::Method::GET {
        (405, TEXT, "only GET\n".to_string())
    } else {
        handler(req.uri().path().to_string()).await
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}

#[cfg(test)]
mod format_tests {
    use super::*;

    #[test]
    fn counters_are_named_with_total_and_openmetrics_only_lines_go() {
        let om = "# HELP muster_commits Durable commits.\n# TYPE muster_commits counter\nmuster_commits_total 3\n# HELP muster_tasks Live tasks.\n# TYPE muster_tasks gauge\n# UNIT muster_tasks tasks\nmuster_tasks{state=\"queued\"} 1\n# EOF\n";
        assert_eq!(
            openmetrics_to_text(om),
            "# HELP muster_commits_total Durable commits.\n# TYPE muster_commits_total counter\nmuster_commits_total 3\n# HELP muster_tasks Live tasks.\n# TYPE muster_tasks gauge\nmuster_tasks{state=\"queued\"} 1\n"
        );
    }
}
