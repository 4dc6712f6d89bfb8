//! Enrollment: one stream, one request, one answer, bounded in time and by the
//! per-source failure budget.

use std::net::SocketAddr;
use std::time::Duration;

use futures::StreamExt;
use muster_protocol::msg::{EnrollRefusal, EnrollRequest, EnrollResponse};
use muster_protocol::{PROTOCOL_VERSION, decode, peek_protocol};
use tokio::sync::oneshot;

use super::ToCore;
use super::endpoint::Shared;
use super::session::{framed, send_frame};
use crate::pki::csr_key_fingerprint;

/// The whole enrollment exchange (accept the stream, read one request, answer, close);
/// an enrollment connection still open past it is closed.
pub(super) const ENROLL_DEADLINE: Duration = Duration::from_secs(10);
/// Largest enrollment request frame (a CSR, a token and a name fit in a few KiB).
pub(super) const ENROLL_FRAME_MAX: usize = 64 * 1024;
/// One enrollment exchange: one stream, one request, one answer. The caller bounds it
/// in time and closes the connection after.
pub(super) async fn handle_enroll_conn(conn: &quinn::Connection, shared: &Shared) {
    let Ok((send, recv)) = conn.accept_bi().await else {
        return;
    };
    let (mut wr, mut rd) = framed(send, recv, ENROLL_FRAME_MAX);
    let resp = match rd.next().await {
        Some(Ok(frame)) => enroll(&frame, shared, conn.remote_address()).await,
        _ => return,
    };
    let _ = send_frame(&mut wr, &resp).await;
    let _ = wr.get_mut().finish();
    // Let the peer read the answer before the connection is closed.
    let _ = wr.get_mut().stopped().await;
}

pub(super) async fn enroll(frame: &[u8], shared: &Shared, peer: SocketAddr) -> EnrollResponse {
    let refuse = EnrollResponse::Refused;
    // Every attempt counts against its source until it succeeds; one source's
    // failures never use up another's budget.
    let now = shared.now();
    let limited = shared.admission().enroll(peer.ip(), now);
    if let Err(wait) = limited {
        shared.log_refusal(
            peer,
            "an enrollment",
            &format_args!("too many failed attempts from this address (limits.enroll_per_minute); retry in {wait} s"),
        );
        return refuse(EnrollRefusal::RateLimited {
            retry_after_s: wait,
        });
    }
    let resp = enroll_checked(frame, shared).await;
    if matches!(resp, EnrollResponse::Enrolled { .. }) {
        shared.admission().enrolled(peer.ip());
    }
    resp
}

pub(super) async fn enroll_checked(frame: &[u8], shared: &Shared) -> EnrollResponse {
    let refuse = EnrollResponse::Refused;
    if let Some(v) = peek_protocol(frame).filter(|v| *v != PROTOCOL_VERSION) {
        return refuse(EnrollRefusal::ProtocolMismatch {
            hub: PROTOCOL_VERSION,
            peer: v,
        });
    }
    let req: EnrollRequest = match decode(frame) {
        Ok(r) => r,
        Err(e) => {
            return refuse(EnrollRefusal::BadRequest {
                reason: e.to_string(),
            });
        }
    };
    let bad = |reason: String| refuse(EnrollRefusal::BadRequest { reason });
    let key_fp = match csr_key_fingerprint(&req.csr_pem) {
        Ok(fp) => fp,
        Err(e) => return bad(format!("certificate signing request: {e}")),
    };
    let secret_hash = muster_protocol::tls::fingerprint(req.secret.as_bytes());
    let grant = (req.capabilities, req.slots);
    // The core checks the token, name and key before anything is signed.
    let (tx, rx) = oneshot::channel();
    let check = ToCore::EnrollCheck {
        secret_hash: secret_hash.clone(),
        role: req.role,
        name: req.name.to_string(),
        key_fingerprint: key_fp.clone(),
        grant: grant.clone(),
        reply: tx,
    };
    if shared.to_core.send(check).await.is_err() {
        return bad("the hub is shutting down".into());
    }
    match rx.await {
        Ok(Ok(())) => {}
        Ok(Err(why)) => return refuse(why),
        Err(_) => return bad("the hub is shutting down".into()),
    }
    let (cert_pem, fingerprint) = match shared.pki.sign_csr(&req.csr_pem, req.name.as_str()) {
        Ok(c) => c,
        Err(e) => return bad(format!("certificate signing request: {e}")),
    };
    let (tx, rx) = oneshot::channel();
    let msg = ToCore::Enroll {
        secret_hash,
        role: req.role,
        name: req.name.to_string(),
        cert: (cert_pem, fingerprint, key_fp),
        grant,
        reply: tx,
    };
    if shared.to_core.send(msg).await.is_err() {
        return bad("the hub is shutting down".into());
    }
    match rx.await {
        Ok(EnrollResponse::Enrolled { cert_pem, .. }) => EnrollResponse::Enrolled {
            cert_pem,
            ca_pem: shared.pki.ca_pem.clone(),
        },
        Ok(other) => other,
        Err(_) => bad("the hub is shutting down".into()),
    }
}

// === The core loop ===
