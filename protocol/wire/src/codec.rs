//! bincode 2 (serde API) behind two functions.
//!
//! The codec sits behind [`encode`]/[`decode`] so it can be swapped: bincode
//! is unmaintained (RUSTSEC-2025-0141, accepted as a documented exception).

use bincode::config::{Configuration, Limit, LittleEndian, Varint};
use serde::{Serialize, de::DeserializeOwned};

use crate::limits::FRAME_BYTES_MAX;

/// bincode's standard configuration with a decode limit equal to the frame limit.
const CONFIG: Configuration<LittleEndian, Varint, Limit<FRAME_BYTES_MAX>> =
    bincode::config::standard().with_limit::<FRAME_BYTES_MAX>();

/// A message could not be encoded.
#[derive(Debug, thiserror::Error)]
#[error("cannot encode message: {0}")]
pub struct EncodeError(#[from] bincode::error::EncodeError);

/// Bytes did not decode to the expected message.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The bytes are not a valid message of this type.
    #[error("malformed frame: {0}")]
    Malformed(#[from] bincode::error::DecodeError),
    /// A valid message was followed by extra bytes.
    #[error("malformed frame: {0} trailing bytes after the message")]
    Trailing(usize),
}

/// Encodes a message to bytes.
///
/// # Errors
/// [`EncodeError`] when serde refuses the value (never for muster's own types).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, EncodeError> {
    Ok(bincode::serde::encode_to_vec(msg, CONFIG)?)
}

/// Decodes one whole message; trailing bytes are an error.
///
/// # Errors
/// [`DecodeError`] for truncated, malformed or over-long input. Never panics.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    let (msg, used) = bincode::serde::decode_from_slice(bytes, CONFIG)?;
    if used != bytes.len() {
        return Err(DecodeError::Trailing(bytes.len() - used));
    }
    Ok(msg)
}

/// Reads only the leading protocol version of an `Open` or enrollment frame,
/// so a peer of another version is refused by name rather than by a decode error.
pub fn peek_protocol(bytes: &[u8]) -> Option<u32> {
    bincode::serde::decode_from_slice::<u32, _>(bytes, CONFIG)
        .ok()
        .map(|(v, _)| v)
}

/// Reads the protocol version and the body kind (0 = session, 1 = request) of an
/// `Open` frame. Both lead the frame in every version (variants are append-only),
/// so a peer of another version can be answered in the form it expects.
pub fn peek_open(bytes: &[u8]) -> Option<(u32, u32)> {
    bincode::serde::decode_from_slice::<(u32, u32), _>(bytes, CONFIG)
        .ok()
        .map(|(v, _)| v)
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::ids::*;
    use crate::msg::*;

    fn name(s: &str) -> AgentName {
        AgentName::new(s).expect("valid name")
    }

    fn held() -> Vec<HeldTask> {
        vec![HeldTask {
            task: TaskId(7),
            generation: Generation(3),
            phase: Phase::Running,
        }]
    }

    fn spec() -> TaskSpec {
        TaskSpec {
            title: "fix the build".into(),
            description: "\"; rm -rf / # $(reboot) `id`".into(),
            capabilities: vec!["rust".into()],
            priority: -2,
            timeout_ms: Some(60_000),
            ..Default::default()
        }
    }

    /// One value of every message type and every variant, for round trips.
    fn samples() -> (Vec<Open>, Vec<HubMsg>, Vec<SessionMsg>, Vec<OpResponse>) {
        let hello = Hello {
            version: "0.1.0".into(),
            agent: name("build-01"),
            capabilities: vec!["rust".into(), "review".into()],
            slots: 4,
            resume: held(),
            workspace: Default::default(),
        };
        let requests = vec![
            OpRequest::Agents,
            OpRequest::AgentShow { name: "a".into() },
            OpRequest::AgentRevoke { name: "a".into() },
            OpRequest::AgentDrain { name: "a".into() },
            OpRequest::AgentUndrain { name: "a".into() },
            OpRequest::TokenCreate {
                role: Role::Operator,
                ttl_s: 3600,
                name: None,
                capabilities: None,
                slots: None,
            },
            OpRequest::TokenCreate {
                role: Role::Agent,
                ttl_s: 60,
                name: Some(name("build-01")),
                capabilities: Some(vec!["rust".into()]),
                slots: Some(2),
            },
            OpRequest::IdentityRevoke(crate::msg::IdentityTarget::Fingerprint("ab12".into())),
            OpRequest::IdentityRevoke(crate::msg::IdentityTarget::Named {
                role: Role::Operator,
                name: "alice".into(),
            }),
            OpRequest::AgentSet {
                name: "a".into(),
                capabilities: Some(vec!["gpu".into()]),
                slots: None,
            },
            OpRequest::Submit(SubmitRequest {
                title: "t".into(),
                description: "d".into(),
                capabilities: vec![],
                priority: 5,
                max_attempts: Some(2),
                timeout_ms: None,
                timeout_action: TimeoutAction::Retry,
                after: vec![TaskId(1)],
                key: Some("k".into()),
                ..Default::default()
            }),
            OpRequest::Tasks {
                state: Some("queued".into()),
                agent: None,
                limit: 50,
                cursor: Some(9),
                label: None,
            },
            OpRequest::TaskShow { id: TaskId(1) },
            OpRequest::TaskCancel { id: TaskId(1) },
            OpRequest::TaskRequeue { id: TaskId(1) },
            OpRequest::Stats,
            OpRequest::Alerts,
            OpRequest::Watch {
                from: Some(EventSeq(4)),
            },
            OpRequest::SubmitBatch(vec![SubmitRequest {
                title: "b".into(),
                description: String::new(),
                capabilities: vec!["rust".into()],
                priority: 0,
                max_attempts: None,
                timeout_ms: Some(5),
                timeout_action: TimeoutAction::Fail,
                after: vec![],
                key: None,
                ..Default::default()
            }]),
        ];
        let mut opens = vec![Open {
            protocol: 1,
            body: OpenBody::Session(hello),
        }];
        opens.extend(requests.into_iter().map(|r| Open {
            protocol: 1,
            body: OpenBody::Request(r),
        }));
        let hub = vec![
            HubMsg::Welcome(Welcome {
                hub_version: "0.1.0".into(),
                heartbeat_interval_ms: 10_000,
                limits: WireLimits {
                    max_frame_bytes: 1 << 20,
                    max_result_bytes: 1 << 18,
                },
            }),
            HubMsg::Refused(Refused::ProtocolMismatch { hub: 1, peer: 2 }),
            HubMsg::Refused(Refused::Revoked),
            HubMsg::Refused(Refused::Forbidden { reason: "r".into() }),
            HubMsg::Refused(Refused::BadHello { reason: "r".into() }),
            HubMsg::Assign(Assign {
                task: TaskId(7),
                generation: Generation(1),
                spec: spec(),
            }),
            HubMsg::Cancel {
                task: TaskId(7),
                generation: Generation(1),
            },
            HubMsg::Abandon {
                task: TaskId(7),
                generation: Generation(1),
                reason: "superseded".into(),
            },
            HubMsg::Ack { upto: ReportId(9) },
        ];
        let report = |body| {
            SessionMsg::Report(Report {
                id: ReportId(1),
                task: TaskId(7),
                generation: Generation(1),
                body,
            })
        };
        let mut session: Vec<SessionMsg> = vec![
            report(ReportBody::Accepted),
            report(ReportBody::Started {
                pid: Some(42),
                session: Some("muster-7".into()),
            }),
            report(ReportBody::Progress {
                note: "half".into(),
            }),
            SessionMsg::Heartbeat(Heartbeat {
                seq: 3,
                state: SidecarState::Draining,
                tasks: held(),
                free_slots: 0,
                self_test: SelfTest {
                    passed: false,
                    hub_rtt_us: Some(120),
                    command_ok: true,
                    disk_ok: false,
                    problems: vec!["disk".into()],
                },
                host: HostFigures {
                    load1: 0.5,
                    mem_available_bytes: 1 << 30,
                    mem_total_bytes: 1 << 34,
                    disk_free_bytes: 1 << 33,
                    cpus: 2,
                },
                activity: vec![crate::msg::Activity {
                    task: TaskId(7),
                    generation: Generation(1),
                    cpu_ms: Some(3200),
                    output_bytes: 4096,
                    output_age_ms: Some(12_000),
                    workspace_age_ms: None,
                    output_tail: "waiting for input\n".into(),
                }],
            }),
            report(ReportBody::Usage(crate::msg::Usage {
                model: Some("claude-sonnet-4-5".into()),
                input_tokens: 10,
                output_tokens: 20,
                cache_read_tokens: 30,
                cache_write_tokens: 40,
                cost_micro_usd: Some(123_456),
            })),
        ];
        session.push(report(ReportBody::Ran {
            pid: Some(4242),
            session: Some("muster-7".into()),
            outcome: Outcome::Completed,
            result: Some("done".into()),
            error: None,
            work: None,
        }));
        session.extend(Outcome::ALL.iter().map(|&outcome| {
            report(ReportBody::Finished {
                outcome,
                result: Some("r".into()),
                error: Some(Failure {
                    reason: "exit 3".into(),
                    exit_code: Some(3),
                    signal: None,
                    command: vec!["/bin/false".into()],
                    stdout_tail: "out".into(),
                    stderr_tail: "err".into(),
                    no_retry: true,
                }),
                work: None,
            })
        }));
        let responses = vec![
            OpResponse::Ok { json: "{}".into() },
            OpResponse::Error(OpError {
                code: OpErrorCode::Busy,
                message: "full".into(),
            }),
            OpResponse::Event {
                seq: EventSeq(3),
                json: "{}".into(),
            },
        ];
        (opens, hub, session, responses)
    }

    fn round_trip<T>(values: &[T])
    where
        T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
    {
        for v in values {
            let bytes = encode(v).expect("encode");
            let back: T = decode(&bytes).expect("decode");
            assert_eq!(&back, v);
            // Every strict prefix is an error, never a panic.
            for cut in 0..bytes.len() {
                assert!(decode::<T>(&bytes[..cut]).is_err(), "prefix {cut} of {v:?}");
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert!(matches!(
                decode::<T>(&longer),
                Err(DecodeError::Trailing(1))
            ));
        }
    }

    #[test]
    fn every_message_round_trips_and_truncations_fail() {
        let (opens, hub, session, responses) = samples();
        round_trip(&opens);
        round_trip(&hub);
        round_trip(&session);
        round_trip(&responses);
        let enroll = EnrollRequest {
            protocol: 1,
            secret: "s".into(),
            role: Role::Agent,
            name: name("n"),
            csr_pem: "pem".into(),
            capabilities: vec!["rust".into()],
            slots: 2,
        };
        round_trip(&[enroll]);
        let refusals = vec![
            EnrollRefusal::UnknownToken,
            EnrollRefusal::Expired { at_unix: 1 },
            EnrollRefusal::AlreadyUsed { at_unix: 1 },
            EnrollRefusal::WrongRole {
                token: Role::Operator,
                requested: Role::Agent,
            },
            EnrollRefusal::RateLimited { retry_after_s: 3 },
            EnrollRefusal::RevokedKey,
            EnrollRefusal::BadRequest { reason: "x".into() },
            EnrollRefusal::ProtocolMismatch { hub: 1, peer: 2 },
        ];
        let mut responses: Vec<EnrollResponse> =
            refusals.into_iter().map(EnrollResponse::Refused).collect();
        responses.push(EnrollResponse::Enrolled {
            cert_pem: "c".into(),
            ca_pem: "a".into(),
        });
        round_trip(&responses);
    }

    #[test]
    fn protocol_version_is_readable_from_any_open() {
        let (opens, ..) = samples();
        for mut open in opens {
            open.protocol = 99;
            assert_eq!(peek_protocol(&encode(&open).expect("encode")), Some(99));
        }
    }

    #[test]
    fn open_kind_is_readable_from_any_open() {
        let (opens, ..) = samples();
        for open in opens {
            let kind = match open.body {
                OpenBody::Session(_) => 0,
                OpenBody::Request(_) => 1,
            };
            assert_eq!(peek_open(&encode(&open).expect("encode")), Some((1, kind)));
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        // A fixed seed so failures reproduce.
        let mut rng = crate::pace::Rng::new(0x9E37_79B9_7F4A_7C15);
        for _ in 0..20_000 {
            let x = rng.next_u64();
            let len = (x % 64) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|i| (x.rotate_left(i as u32 * 5) & 0xff) as u8)
                .collect();
            let _ = decode::<Open>(&bytes);
            let _ = decode::<SessionMsg>(&bytes);
            let _ = decode::<HubMsg>(&bytes);
            let _ = decode::<EnrollRequest>(&bytes);
        }
    }

    #[test]
    fn hostile_length_prefix_is_refused_without_allocating() {
        // A string claiming 2^40 bytes: varint marker 0xfd + u64.
        let mut bytes = vec![1u8, 1, 0];
        bytes.push(0xfd);
        bytes.extend_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(decode::<Open>(&bytes).is_err());
    }

    #[test]
    fn happy_path_messages_are_small() {
        let assign = HubMsg::Assign(Assign {
            task: TaskId(123_456),
            generation: Generation(1),
            spec: spec(),
        });
        let n = encode(&assign).expect("encode").len();
        assert!(n < 200, "assign is {n} bytes");
    }
}
