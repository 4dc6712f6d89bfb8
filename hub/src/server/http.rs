//! `/metrics` and `/healthz`, answered from the core thread within a deadline.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::ToCore;
use crate::store::Store;

/// How long `/healthz` and `/metrics` wait for the core before answering 503.
pub(super) const CORE_ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

pub(super) fn http_handler(to_core: mpsc::Sender<ToCore>) -> muster_protocol::http::Handler {
    use muster_protocol::http::{PROMETHEUS, TEXT};
    Arc::new(move |path: String| {
        let to_core = to_core.clone();
        Box::pin(async move {
            match path.as_str() {
                "/metrics" => {
                    let (tx, rx) = oneshot::channel();
                    if to_core.try_send(ToCore::Scrape(tx)).is_err() {
                        return (503, TEXT, "the core is not taking requests\n".into());
                    }
                    match tokio::time::timeout(CORE_ANSWER_TIMEOUT, rx).await {
                        Ok(Ok(text)) => (200, PROMETHEUS, text),
                        _ => (503, TEXT, "the core did not answer within 2 s\n".into()),
                    }
                }
                "/healthz" => {
                    let (tx, rx) = oneshot::channel();
                    if to_core.try_send(ToCore::Health(tx)).is_err() {
                        return (
                            503,
                            TEXT,
                            "unhealthy: the core is not taking requests\n".into(),
                        );
                    }
                    match tokio::time::timeout(CORE_ANSWER_TIMEOUT, rx).await {
                        Ok(Ok(Ok(()))) => (200, TEXT, "ok: store writable, listener up\n".into()),
                        Ok(Ok(Err(e))) => (503, TEXT, format!("unhealthy: {e}\n")),
                        _ => (
                            503,
                            TEXT,
                            "unhealthy: the core did not answer within 2 s\n".into(),
                        ),
                    }
                }
                _ => (404, TEXT, "try /metrics or /healthz\n".into()),
            }
        })
    })
}

/// The store is writable: a redb commit and a synced probe file in the data directory.
pub(super) fn health(store: &Store, dir: &Path) -> Result<(), String> {
    store
        .probe()
        .map_err(|e| format!("store not writable: {e}"))?;
    let probe = dir.join(".healthz");
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(&probe)?;
        f.write_all(b"ok")?;
        f.sync_all()
    };
    write().map_err(|e| format!("data directory not writable ({}): {e}", probe.display()))
}
