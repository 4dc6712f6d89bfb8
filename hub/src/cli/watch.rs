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
            Ok(Some(OpResponse::Ok { .. } | OpResponse::LogChunk { .. })) => {}
            Err(e) => return Err(CliError::fail(format!("watch stream: {e}"))),
        }
    }
    Ok(())
}

/// `task logs`: an attempt's output, relayed by the hub from its sidecar.
/// Raw bytes on stdout (control characters escaped when it is a terminal);
/// with `json`, one document per chunk and a last one that sums up.
pub(crate) async fn logs(
    connect: &ConnectArgs,
    query: muster_protocol::msg::LogQuery,
    json: bool,
) -> Result<(), CliError> {
    use muster_protocol::msg::{OpResponse, Open, OpenBody};
    use std::io::{IsTerminal, Write};
    let s = connect.connect().await?;
    let (send, recv) = s.conn.open_bi().await.map_err(client::refused_or_lost)?;
    let (mut wr, mut rd) =
        muster_protocol::framed(send, recv, muster_protocol::limits::FRAME_BYTES_MAX);
    let open = Open {
        protocol: muster_protocol::PROTOCOL_VERSION,
        body: OpenBody::Request(OpRequest::TaskLogs(query)),
    };
    wr.send(&open)
        .await
        .map_err(|e| CliError::fail(e.to_string()))?;
    let mut out = std::io::stdout().lock();
    let terminal = out.is_terminal();
    let written = |e: std::io::Error| CliError::fail(format!("writing the log: {e}"));
    loop {
        match rd.recv::<OpResponse>().await {
            Ok(Some(OpResponse::LogChunk { data })) => {
                if json {
                    let doc = serde_json::json!({
                        "bytes": data.len(),
                        "text": String::from_utf8_lossy(&data),
                    });
                    writeln!(out, "{doc}").map_err(written)?;
                } else if terminal {
                    let text = String::from_utf8_lossy(&data);
                    out.write_all(crate::cli::escape_controls(&text, true).as_bytes())
                        .map_err(written)?;
                } else {
                    out.write_all(&data).map_err(written)?;
                }
                // Followers see each chunk as it comes.
                out.flush().map_err(written)?;
            }
            Ok(Some(OpResponse::Ok { json: doc })) => {
                if json {
                    writeln!(out, "{doc}").map_err(written)?;
                } else {
                    let v: serde_json::Value = serde_json::from_str(&doc).unwrap_or_default();
                    let cut = v["cut_bytes"].as_u64().unwrap_or(0);
                    if cut > 0 {
                        eprintln!(
                            "muster: {cut} bytes in the middle of this log were cut ([logs] max_bytes_per_attempt on agent {})",
                            v["agent"].as_str().unwrap_or("?")
                        );
                    }
                }
                break;
            }
            Ok(Some(OpResponse::Error(e))) => return Err(CliError::fail(e.message)),
            Ok(Some(OpResponse::Event { .. })) => {}
            Ok(None) => return Err(CliError::fail("the hub ended the log stream early")),
            Err(e) => return Err(CliError::fail(format!("log stream: {e}"))),
        }
    }
    Ok(())
}
