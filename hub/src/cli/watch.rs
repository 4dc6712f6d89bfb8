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
    use bytes::Bytes;
    use futures::{SinkExt, StreamExt};
    use muster_protocol::msg::{OpResponse, Open, OpenBody};
    let s = connect.connect().await?;
    let (send, recv) = s.conn.open_bi().await.map_err(client::refused_or_lost)?;
    let codec = || muster_protocol::frame_codec(muster_protocol::limits::FRAME_BYTES_MAX);
    let mut wr = tokio_util::codec::FramedWrite::new(send, codec());
    let mut rd = tokio_util::codec::FramedRead::new(recv, codec());
    let open = Open {
        protocol: muster_protocol::PROTOCOL_VERSION,
        body: OpenBody::Request(OpRequest::Watch {
            from: from.map(EventSeq),
        }),
    };
    let bytes = muster_protocol::encode(&open).map_err(|e| CliError::fail(e.to_string()))?;
    wr.send(Bytes::from(bytes))
        .await
        .map_err(|e| CliError::fail(e.to_string()))?;
    while let Some(frame) = rd.next().await {
        let frame = frame.map_err(|e| CliError::fail(format!("watch stream: {e}")))?;
        match muster_protocol::decode::<OpResponse>(&frame) {
            Ok(OpResponse::Event { seq, json: doc }) => {
                if json {
                    let mut v: serde_json::Value = serde_json::from_str(&doc).unwrap_or_default();
                    v["seq"] = seq.0.into();
                    println!("{v}");
                } else {
                    println!("{seq:>8}  {}", crate::cli::escape_controls(&doc, false));
                }
            }
            Ok(OpResponse::Error(e)) => return Err(CliError::fail(e.message)),
            Ok(OpResponse::Ok { .. }) => {}
            Err(e) => return Err(CliError::fail(format!("watch stream: {e}"))),
        }
    }
    Ok(())
}
