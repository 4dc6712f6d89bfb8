//! `watch`: follow the event log live.

use crate::cli::{CliError, ConnectArgs};
use muster_protocol::EventSeq;
use muster_protocol::client::{self};
use muster_protocol::msg::OpRequest;

pub(crate) async fn watch(
    connect: &ConnectArgs,
    from: Option<u64>,
    json: bool,
) -> Result<(), CliError> {
    use muster_protocol::msg::{OpResponse, Open, OpenBody};
    let s = connect.connect().await?;
    let (send, recv) = s.conn.open_bi().await.map_err(client::refused_or_lost)?;
    let (mut wr, mut rd) =
        muster_protocol::framed(send, recv, muster_protocol::limits::FRAME_BYTES_MAX);
    let open = Open {
        protocol: muster_protocol::PROTOCOL_VERSION,
        body: OpenBody::Request(OpRequest::Watch {
            from: from.map(EventSeq),
        }),
    };
    wr.send(&open)
        .await
        .map_err(|e| CliError::fail(e.to_string()))?;
    loop {
        let event = rd.recv::<OpResponse>().await;
        match event {
            Ok(None) => break,
            Ok(Some(OpResponse::Event { seq, json: doc })) => {
                if json {
                    let mut v: serde_json::Value = serde_json::from_str(&doc).unwrap_or_default();
                    v["seq"] = seq.0.into();
                    println!("{v}");
                } else {
                    println!("{seq:>8}  {}", crate::cli::escape_controls(&doc, false));
                }
            }
            Ok(Some(OpResponse::Error(e))) => return Err(CliError::fail(e.message)),
            Ok(Some(OpResponse::Ok { .. })) => {}
            Err(e) => return Err(CliError::fail(format!("watch stream: {e}"))),
        }
    }
    Ok(())
}
