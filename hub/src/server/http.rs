//! `/metrics`, `/livez` and `/readyz` (`/healthz` is `/readyz`), answered from
//! the core thread within a deadline.
//!
//! `/livez` asks only whether the core loop answers: no IO, so a supervisor
//! may probe it as often as it likes. `/readyz` adds whether the store is
//! writable, judged from the last durable commit when it is recent (a busy hub
//! never writes for a probe) and otherwise from a write probe made at most once
//! per [`PROBE_EVERY`], however often it is asked.

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
                "/livez" => {
                    let (tx, rx) = oneshot::channel();
                    if to_core.try_send(ToCore::Live(tx)).is_err() {
                        return (
                            503,
                            TEXT,
                            "not live: the core is not taking requests\n".into(),
                        );
                    }
                    match tokio::time::timeout(CORE_ANSWER_TIMEOUT, rx).await {
                        Ok(Ok(())) => (200, TEXT, "ok: the core loop answers\n".into()),
                        _ => (
                            503,
                            TEXT,
                            "not live: the core loop did not answer within 2 s\n".into(),
                        ),
                    }
                }
                "/readyz" | "/healthz" => {
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
                _ => (404, TEXT, "try /metrics, /livez or /readyz\n".into()),
            }
        })
    })
}

/// How long a verdict on the store stays good: a probe (or a real commit)
/// younger than this answers `/readyz` without touching the disk.
pub(super) const PROBE_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// The last verdict on whether the store is writable, and when it was made.
#[derive(Debug, Default)]
pub(super) struct Readiness {
    last: Option<(std::time::Instant, Result<(), String>)>,
}

impl Readiness {
    /// A durable commit just succeeded: the store is writable.
    pub(super) fn committed(&mut self, at: std::time::Instant) {
        self.last = Some((at, Ok(())));
    }

    /// The verdict: a recent one as it is, else a new probe (made by `probe`).
    pub(super) fn check(
        &mut self,
        now: std::time::Instant,
        probe: impl FnOnce() -> Result<(), String>,
    ) -> Result<(), String> {
        match &self.last {
            Some((at, verdict)) if now.saturating_duration_since(*at) < PROBE_EVERY => {
                verdict.clone()
            }
            _ => {
                let verdict = probe();
                self.last = Some((now, verdict.clone()));
                verdict
            }
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn readiness_probes_at_most_once_per_interval_and_commits_count_as_probes() {
        let mut r = Readiness::default();
        let t0 = Instant::now();
        let mut probes = 0;
        let mut probe = |ok: bool| {
            probes += 1;
            if ok { Ok(()) } else { Err("no".to_string()) }
        };
        assert!(r.check(t0, || probe(false)).is_err());
        assert!(
            r.check(t0 + Duration::from_secs(1), || probe(true))
                .is_err(),
            "cached"
        );
        assert!(
            r.check(t0 + PROBE_EVERY, || probe(true)).is_ok(),
            "probed again"
        );
        r.committed(t0 + PROBE_EVERY * 3);
        assert!(
            r.check(t0 + PROBE_EVERY * 3, || probe(false)).is_ok(),
            "a commit is a probe"
        );
        assert_eq!(probes, 2);
    }
}
