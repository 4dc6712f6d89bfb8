//! A standby hub's listener: it completes the handshake (so only peers with
//! this cluster's CA learn anything), reads the first message of the first
//! stream and answers `Refused::NotLeader { leader }`, then closes the
//! connection with [`CLOSE_NOT_LEADER`] and the leader's address. It holds no
//! state and touches no store: sidecars and operators follow the answer.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use muster_protocol::msg::{HubMsg, Refused};
use muster_protocol::{CLOSE_NOT_LEADER, LEADER_ADDR_MAX, framed};
use tokio::sync::{Semaphore, watch};
use tracing::{debug, info};

use super::StartError;
use super::endpoint::{HANDSHAKE_TIMEOUT, bind_endpoint, load_reset_key};
use crate::pki::Pki;

/// Connections a standby serves at once; past it new ones are refused (they retry).
const STANDBY_CONNECTIONS_MAX: usize = 256;
/// How long a standby waits for a connection's first message.
const FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest first message a standby reads (a hello or a request is far smaller).
const FIRST_MESSAGE_MAX: usize = 64 << 10;

/// A running standby listener.
pub struct Standby {
    /// The bound address.
    pub addr: SocketAddr,
    endpoint: quinn::Endpoint,
    accept: tokio::task::JoinHandle<()>,
    http: Option<tokio::task::JoinHandle<()>>,
}

impl Standby {
    /// Binds `listen` and answers every connection with the leader `leader` names.
    ///
    /// # Errors
    /// [`StartError`] when the PKI cannot be loaded or the port bound.
    pub async fn start(
        data_dir: &Path,
        listen: SocketAddr,
        http_listen: Option<SocketAddr>,
        leader: watch::Receiver<Option<String>>,
    ) -> Result<Standby, StartError> {
        let pki = Pki::load(data_dir)?;
        let server_cfg = muster_protocol::tls::server_config(
            pki.ca_der.clone(),
            pki.server_chain.clone(),
            pki.server_key.clone_key(),
        )?;
        let bind_err = |source| StartError::Bind {
            addr: listen,
            source,
        };
        let reset_key = load_reset_key(data_dir).map_err(bind_err)?;
        let endpoint = bind_endpoint(server_cfg, reset_key, listen).map_err(bind_err)?;
        let addr = endpoint.local_addr().map_err(bind_err)?;
        let http = match http_listen {
            Some(at) => {
                match muster_protocol::http::serve(at, http_handler(leader.clone())).await {
                    Ok(h) => Some(h),
                    Err(e) => {
                        endpoint.close(CLOSE_NOT_LEADER.into(), b"standby stopping");
                        return Err(StartError::Bind {
                            addr: at,
                            source: std::io::Error::other(e),
                        });
                    }
                }
            }
            None => None,
        };
        let accept = tokio::spawn(accept_loop(endpoint.clone(), leader));
        info!(%addr, "standby: answering with the leader's address");
        Ok(Standby {
            addr,
            endpoint,
            accept,
            http,
        })
    }

    /// Stops answering and frees the port (the leader binds it next).
    pub async fn stop(self) {
        self.accept.abort();
        if let Some(h) = &self.http {
            h.abort();
        }
        self.endpoint
            .close(CLOSE_NOT_LEADER.into(), b"standby stopping");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }
}

async fn accept_loop(endpoint: quinn::Endpoint, leader: watch::Receiver<Option<String>>) {
    let slots = Arc::new(Semaphore::new(STANDBY_CONNECTIONS_MAX));
    while let Some(incoming) = endpoint.accept().await {
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            incoming.refuse();
            continue;
        };
        let leader = leader.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await {
                Ok(Ok(c)) => c,
                _ => return,
            };
            answer(conn, leader).await;
        });
    }
}

/// Answers one connection's first stream, then closes it naming the leader.
async fn answer(conn: quinn::Connection, leader: watch::Receiver<Option<String>>) {
    let named = leader
        .borrow()
        .clone()
        .filter(|l| l.len() <= LEADER_ADDR_MAX);
    let first = async {
        let (send, recv) = conn.accept_bi().await.ok()?;
        let (mut wr, mut rd) = framed(send, recv, FIRST_MESSAGE_MAX);
        // Whatever the first message is (a hello, a request, an enrollment),
        // the answer is the same; its bytes are not decoded.
        let _ = futures::StreamExt::next(&mut rd).await;
        let refusal = HubMsg::Refused(Refused::NotLeader {
            leader: named.clone(),
        });
        wr.send(&refusal).await.ok()?;
        let _ = wr.get_mut().finish();
        let _ = tokio::time::timeout(Duration::from_secs(2), wr.get_mut().stopped()).await;
        Some(())
    };
    if tokio::time::timeout(FIRST_MESSAGE_TIMEOUT, first)
        .await
        .is_err()
    {
        debug!(peer = %conn.remote_address(), "standby: no first message");
    }
    let reason = named.unwrap_or_default();
    conn.close(CLOSE_NOT_LEADER.into(), reason.as_bytes());
}

/// A standby's `/livez` (it is live), `/readyz` and `/healthz` (not ready:
/// it serves nothing; the body names the leader) and `/metrics` (one gauge
/// saying it does not lead, so a scrape of every hub finds the leader).
fn http_handler(leader: watch::Receiver<Option<String>>) -> muster_protocol::http::Handler {
    use muster_protocol::http::{PROMETHEUS, TEXT};
    Arc::new(move |path: String| {
        let named = leader.borrow().clone();
        Box::pin(async move {
            let who = named.map_or_else(
                || "no leader is elected yet".to_string(),
                |l| format!("the leader is {l}"),
            );
            match path.as_str() {
                "/livez" => (200, TEXT, "ok: standby\n".into()),
                "/readyz" | "/healthz" => (503, TEXT, format!("not ready: a standby; {who}\n")),
                "/metrics" => (
                    200,
                    PROMETHEUS,
                    "# HELP muster_cluster_leader Whether this hub leads its cluster.\n\
                     # TYPE muster_cluster_leader gauge\n\
                     muster_cluster_leader 0\n"
                        .into(),
                ),
                _ => (
                    404,
                    TEXT,
                    "not found: try /livez, /readyz or /metrics\n".into(),
                ),
            }
        })
    })
}
