//! Golden bytes: the encoding of every wire message variant and of every
//! record the hub's store and the sidecar's queue write, pinned in
//! `tests/golden/` (one hex file per case; `tests/golden/README.md`).
//!
//! Each case is a fixed sample with every field set to a non-default,
//! distinct value, so moving a field changes the bytes. The test encodes it
//! with the real codec ([`muster_protocol::encode`]) and compares with the
//! file, then decodes the file and compares with the sample. Every variant of
//! every enum the formats contain has a case: the variant lists come from
//! serde (the order bincode numbers them), and the enums from the source
//! files, so a new enum or variant without a case fails too.
//!
//! `MUSTER_BLESS=1 cargo test -p muster-tests --test golden` rewrites the
//! files. It refuses to change the bytes of a file recorded under the
//! version this build still has: changed bytes are a wire or stored-format
//! change, which needs `PROTOCOL_VERSION` or `SCHEMA_VERSION` bumped first
//! (`MUSTER_BLESS=sample` overrides that, for a change of a sample only).
//!
//! The second half checks the stored-format version records: a new hub store
//! and sidecar queue record their `SCHEMA_VERSION` in the transaction that
//! creates their tables, and a file from a newer build is refused by name.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{Debug, Write as _};
use std::path::{Path, PathBuf};

use muster_hub::core::{
    AgentRecord, AttemptRecord, Audit, EventRecord, Identity, TaskRecord, TaskState, TokenRecord,
};
use muster_protocol::msg::{
    Activity, Assign, EnrollRefusal, EnrollRequest, EnrollResponse, Failure, Heartbeat, HeldTask,
    Hello, HostFigures, HubMsg, IdentityTarget, LogEnd, LogError, LogFrame, LogOpen, LogQuery,
    LogStream, OpError, OpErrorCode, OpRequest, OpResponse, Open, OpenBody, Outcome, Phase,
    Refused, Report, ReportBody, ReportKind, Role, SelfTest, SessionMsg, SidecarState,
    SubmitRequest, TaskSpec, TimeoutAction, Usage, Welcome, WireLimits,
};
use muster_protocol::work::{WorkResult, WorkspaceMode};
use muster_protocol::{
    AgentName, EventSeq, Generation, PROTOCOL_VERSION, ReportId, TaskId, decode, encode,
};
use muster_sidecar::core::LocalTask;
use muster_sidecar::core::run::{RunHandle, RunMode};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Bytes per hex line in a golden file.
const LINE_BYTES: usize = 32;
/// The command that rewrites the files.
const BLESS: &str = "MUSTER_BLESS=1 cargo test -p muster-tests --test golden";

// === Formats ===

/// The three encoded formats, each with its own version and directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Format {
    /// Frames on a `muster/1` or `muster-enroll/1` stream.
    Wire,
    /// Values in the hub's redb (`hub/src/store/redb.rs`).
    HubStore,
    /// Values in the sidecar's redb (`sidecar/src/queue.rs`).
    SidecarQueue,
}

impl Format {
    const ALL: [Format; 3] = [Format::Wire, Format::HubStore, Format::SidecarQueue];

    fn dir(self) -> &'static str {
        match self {
            Format::Wire => "wire",
            Format::HubStore => "hub-store",
            Format::SidecarQueue => "sidecar-queue",
        }
    }

    /// The version constant this build has for the format, and its name.
    fn version(self) -> (&'static str, u64) {
        match self {
            Format::Wire => ("PROTOCOL_VERSION", u64::from(PROTOCOL_VERSION)),
            Format::HubStore => ("SCHEMA_VERSION", muster_hub::store::SCHEMA_VERSION),
            Format::SidecarQueue => ("SCHEMA_VERSION", muster_sidecar::queue::SCHEMA_VERSION),
        }
    }

    /// What a change of these bytes means, and what to do about it.
    fn consequence(self) -> &'static str {
        match self {
            Format::Wire => {
                "a wire format change: a peer of the previous build no longer understands this one. \
                 Bump PROTOCOL_VERSION (protocol/wire/src/lib.rs) so mismatched peers are refused by name"
            }
            Format::HubStore => {
                "a stored-format change of the hub's redb: this build can no longer read what the \
                 previous one wrote. Bump SCHEMA_VERSION in hub/src/store/mod.rs and migrate the old \
                 records on open (see `migrate_v1` in hub/src/store/redb.rs and ARCHITECTURE.md, \"Formats and versions\")"
            }
            Format::SidecarQueue => {
                "a stored-format change of the sidecar's redb: this build can no longer read what the \
                 previous one wrote. Bump SCHEMA_VERSION in sidecar/src/queue.rs and migrate the old \
                 records on open (ARCHITECTURE.md, \"Formats and versions\")"
            }
        }
    }
}

fn golden_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("golden")
}

// === Cases ===

/// Decodes bytes as a case's type and compares them with its sample.
type Check = dyn Fn(&[u8]) -> Result<(), String>;

/// One sample value, encoded, with a way to decode bytes back and compare.
struct Case {
    format: Format,
    name: String,
    ty: String,
    bytes: Vec<u8>,
    /// Decodes bytes as the sample's type: `Ok` if they give the sample back,
    /// else a description of what they give (or why they do not decode).
    check: Box<Check>,
}

impl Case {
    fn new<T>(format: Format, name: impl Into<String>, sample: T) -> Case
    where
        T: Serialize + DeserializeOwned + PartialEq + Debug + 'static,
    {
        let bytes = encode(&sample).expect("samples encode");
        let check = move |bytes: &[u8]| match decode::<T>(bytes) {
            Ok(v) if v == sample => Ok(()),
            Ok(v) => Err(format!(
                "they decode under this build, but to another value (- sample, + decoded):\n{}",
                debug_diff(&sample, &v)
            )),
            Err(e) => Err(format!("they no longer decode under this build: {e}")),
        };
        Case {
            format,
            name: name.into(),
            ty: std::any::type_name::<T>().to_string(),
            bytes,
            check: Box::new(check),
        }
    }

    fn path(&self) -> PathBuf {
        golden_root()
            .join(self.format.dir())
            .join(format!("{}.hex", self.name))
    }

    /// The golden file's text for these bytes.
    fn render(&self) -> String {
        let (vname, v) = self.format.version();
        let mut s = format!(
            "# muster golden bytes: {}/{}\n# type: {}\n# format: {}, {vname} = {v}\n# {} byte(s) as muster_protocol::encode writes them (bincode 2, standard config: varint, little endian)\n# written by: {BLESS} (see tests/golden/README.md)\n",
            self.format.dir(),
            self.name,
            self.ty,
            self.format.dir(),
            self.bytes.len(),
        );
        for line in self.bytes.chunks(LINE_BYTES) {
            let groups: Vec<String> = line.chunks(8).map(hex).collect();
            s.push_str(&groups.join(" "));
            s.push('\n');
        }
        s
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// A golden file read back: the version it was recorded under and its bytes.
struct Golden {
    version: Option<u64>,
    bytes: Vec<u8>,
}

fn parse(text: &str) -> Result<Golden, String> {
    let mut version = None;
    let mut digits = String::new();
    for line in text.lines() {
        if let Some(c) = line.strip_prefix('#') {
            if let Some(f) = c.trim().strip_prefix("format:") {
                version = f.rsplit('=').next().and_then(|v| v.trim().parse().ok());
            }
            continue;
        }
        digits.extend(line.chars().filter(|c| !c.is_whitespace()));
    }
    if !digits.len().is_multiple_of(2) {
        return Err("an odd number of hex digits".into());
    }
    let bytes = (0..digits.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&digits[i..i + 2], 16))
        .collect::<Result<Vec<u8>, _>>()
        .map_err(|e| format!("not hex: {e}"))?;
    Ok(Golden { version, bytes })
}

/// The lines of the two values' `{:#?}` that differ, at most 40.
fn debug_diff<T: Debug>(want: &T, got: &T) -> String {
    let (a, b) = (format!("{want:#?}"), format!("{got:#?}"));
    let (a, b): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
    let mut out = String::new();
    let mut shown = 0;
    for i in 0..a.len().max(b.len()) {
        let (x, y) = (a.get(i).copied(), b.get(i).copied());
        if x == y {
            continue;
        }
        if shown == 40 {
            out.push_str("        …\n");
            break;
        }
        if let Some(x) = x {
            let _ = writeln!(out, "        - {}", x.trim());
        }
        if let Some(y) = y {
            let _ = writeln!(out, "        + {}", y.trim());
        }
        shown += 1;
    }
    out
}

// === Variant coverage ===

/// The variant names of a serde enum, in declaration order (the index bincode
/// writes), read from its derived `Deserialize`.
fn variants<T: DeserializeOwned>() -> &'static [&'static str] {
    use serde::de::{Error as _, Visitor, value::Error};

    struct Probe<'a>(&'a mut &'static [&'static str]);
    impl<'de> serde::Deserializer<'de> for Probe<'_> {
        type Error = Error;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Error> {
            Err(Error::custom("not an enum"))
        }
        fn deserialize_enum<V: Visitor<'de>>(
            self,
            _name: &'static str,
            variants: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Error> {
            *self.0 = variants;
            Err(Error::custom("probed"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map
            struct identifier ignored_any
        }
    }
    let mut out: &'static [&'static str] = &[];
    let _ = T::deserialize(Probe(&mut out));
    assert!(
        !out.is_empty(),
        "{} is not an enum",
        std::any::type_name::<T>()
    );
    out
}

/// The variant of an enum value, from its encoding (bincode writes the index
/// first, as one byte below 251).
fn variant_index<T: Serialize + DeserializeOwned>(v: &T) -> usize {
    let bytes = encode(v).expect("samples encode");
    let index = usize::from(bytes[0]);
    assert!(index < 251, "variant index {index} needs a wider read");
    index
}

/// The variant's name in snake case, for case names (`ProtocolMismatch` →
/// `protocol_mismatch`; serde already gives `rename_all` enums in that form).
fn variant<T: Serialize + DeserializeOwned>(v: &T) -> String {
    let name = variants::<T>()[variant_index(v)];
    let mut out = String::new();
    for (i, c) in name.char_indices() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// The short name of a type (`muster_wire::msg::HubMsg` → `HubMsg`).
fn short<T>() -> &'static str {
    let full = std::any::type_name::<T>();
    full.rsplit("::").next().unwrap_or(full)
}

/// Which variants of each enum the samples use.
#[derive(Default)]
struct Coverage {
    /// Enum → (all variants, those with a sample).
    enums: BTreeMap<&'static str, (&'static [&'static str], BTreeSet<&'static str>)>,
}

impl Coverage {
    /// Records that `samples` hold these variants of `T`.
    fn cover<'a, T: Serialize + DeserializeOwned + 'a>(
        &mut self,
        samples: impl IntoIterator<Item = &'a T>,
    ) {
        let e = self
            .enums
            .entry(short::<T>())
            .or_insert_with(|| (variants::<T>(), BTreeSet::new()));
        for s in samples {
            e.1.insert(e.0[variant_index(s)]);
        }
    }

    /// Every variant of every enum without a sample.
    fn missing(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (ty, (all, seen)) in &self.enums {
            for v in all.iter().filter(|v| !seen.contains(*v)) {
                out.push(format!("{ty}::{v} (serde name)"));
            }
        }
        out
    }
}

/// Names of the types a source file declares with `derive(… Serialize …)`:
/// (enums, structs).
fn serialized_types(relative: &str) -> (Vec<String>, Vec<String>) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(relative);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let (mut enums, mut structs) = (Vec::new(), Vec::new());
    let mut serialize = false;
    // Inside a derive that rustfmt spread over several lines.
    let mut in_derive = false;
    for line in text.lines().map(str::trim) {
        if in_derive || line.starts_with("#[derive(") {
            serialize |= line.contains("Serialize");
            in_derive = !line.contains(")]");
            continue;
        }
        if line.starts_with("#[") || line.starts_with("///") {
            continue;
        }
        let ident = |rest: &str| {
            rest.split(|c: char| !(c.is_alphanumeric() || c == '_'))
                .next()
                .unwrap_or("")
                .to_string()
        };
        if serialize {
            if let Some(rest) = line.strip_prefix("pub enum ") {
                enums.push(ident(rest));
            } else if let Some(rest) = line.strip_prefix("pub struct ") {
                structs.push(ident(rest));
            }
        }
        serialize = false;
    }
    (enums, structs)
}

// === Samples ===
//
// Every field is set and differs from its default and from its neighbours of
// the same type, so swapping two fields changes the bytes (booleans, which
// have one non-default value, get extra cases that set them one at a time:
// `self_test.*_only`, `agents.agent_record.drained_only`). A new field breaks
// the struct literals here; a new variant fails `every_variant_has_a_case`.

/// 2026-12-03 10:00:00 UTC in milliseconds; record times are offsets from it.
const T0: u64 = 1_796_292_000_000;

fn agent_name(s: &str) -> AgentName {
    AgentName::new(s).expect("valid agent name")
}

fn spec() -> TaskSpec {
    TaskSpec {
        title: "fix the flaky integration test".into(),
        description: "It fails one run in ten.\nSee the log of run 77 ✓".into(),
        capabilities: vec!["rust".into(), "linux".into()],
        priority: -7,
        timeout_ms: Some(900_000),
        repo: Some("https://git.example.net/app.git".into()),
        base: Some("release/2.1".into()),
        env: vec![("RUST_LOG".into(), "debug".into())],
    }
}

fn failure() -> Failure {
    Failure {
        reason: "agent exited with status 3".into(),
        exit_code: Some(3),
        signal: Some(9),
        command: vec!["claude".into(), "--task".into(), "41".into()],
        stdout_tail: "running 12 tests\n".into(),
        stderr_tail: "error: test failed\n".into(),
        no_retry: true,
    }
}

fn held() -> Vec<HeldTask> {
    vec![
        HeldTask {
            task: TaskId(41),
            generation: Generation(2),
            phase: Phase::Running,
        },
        HeldTask {
            task: TaskId(44),
            generation: Generation(1),
            phase: Phase::Verifying,
        },
    ]
}

fn self_test() -> SelfTest {
    SelfTest {
        passed: true,
        hub_rtt_us: Some(850),
        command_ok: true,
        disk_ok: true,
        problems: vec!["clock 2 s ahead of the hub".into()],
    }
}

fn host() -> HostFigures {
    HostFigures {
        load1: 0.75,
        mem_available_bytes: 6 << 30,
        mem_total_bytes: 24 << 30,
        disk_free_bytes: 80 << 30,
        cpus: 2,
    }
}

fn submit_request(n: u64) -> SubmitRequest {
    SubmitRequest {
        title: format!("nightly review {n}"),
        description: "Review yesterday's merges.".into(),
        capabilities: vec!["review".into()],
        priority: 5,
        max_attempts: Some(4),
        timeout_ms: Some(1_800_000),
        timeout_action: TimeoutAction::Retry,
        after: vec![TaskId(39), TaskId(40)],
        key: Some(format!("nightly-2026-12-03-{n}")),
        repo: Some("/srv/repos/app".into()),
        base: Some("main".into()),
        env: vec![
            ("MODE".into(), "fast".into()),
            ("EMPTY".into(), String::new()),
        ],
        labels: vec![("team".into(), "infra".into())],
    }
}

fn hello() -> Hello {
    Hello {
        version: "0.1.0".into(),
        agent: agent_name("build-01"),
        capabilities: vec!["rust".into(), "review".into()],
        slots: 4,
        resume: held(),
        workspace: WorkspaceMode::Git,
    }
}

fn op_requests() -> Vec<OpRequest> {
    vec![
        OpRequest::Agents,
        OpRequest::AgentShow {
            name: "build-01".into(),
        },
        OpRequest::AgentRevoke {
            name: "build-02".into(),
        },
        OpRequest::AgentDrain {
            name: "build-03".into(),
        },
        OpRequest::AgentUndrain {
            name: "build-04".into(),
        },
        OpRequest::TokenCreate {
            role: Role::Agent,
            ttl_s: 3600,
            name: Some(agent_name("build-05")),
            capabilities: Some(vec!["rust".into()]),
            slots: Some(8),
        },
        OpRequest::Submit(submit_request(1)),
        OpRequest::Tasks {
            state: Some("running".into()),
            agent: Some("build-01".into()),
            limit: 50,
            cursor: Some(1234),
            label: Some(("team".into(), "infra".into())),
        },
        OpRequest::TaskShow { id: TaskId(41) },
        OpRequest::TaskCancel { id: TaskId(42) },
        OpRequest::TaskRequeue { id: TaskId(43) },
        OpRequest::Stats,
        OpRequest::Alerts,
        OpRequest::Watch {
            from: Some(EventSeq(977)),
        },
        OpRequest::SubmitBatch(vec![submit_request(2), submit_request(3)]),
        OpRequest::IdentityRevoke(IdentityTarget::Fingerprint("9f86d081884c7d65".into())),
        OpRequest::IdentityRevoke(IdentityTarget::Named {
            role: Role::Operator,
            name: "alice".into(),
        }),
        OpRequest::AgentSet {
            name: "build-06".into(),
            capabilities: Some(vec!["rust".into(), "gpu".into()]),
            slots: Some(2),
        },
        OpRequest::TaskLogs(LogQuery {
            task: TaskId(41),
            generation: Some(Generation(2)),
            stream: LogStream::Stderr,
            tail: Some(200),
            follow: true,
        }),
        OpRequest::ApiTokenCreate {
            role: Role::Operator,
            ttl_s: 30 * 86_400,
            name: "ci-bot".into(),
        },
        OpRequest::ApiTokens,
        OpRequest::ApiTokenRevoke {
            name: "ci-bot".into(),
        },
        OpRequest::DashboardLogin {
            role: Some(Role::Operator),
        },
        OpRequest::Identities {
            role: Some(Role::Operator),
            revoked: true,
        },
        OpRequest::JoinTokens,
        OpRequest::JoinTokenRevoke {
            id: "3fa9c2e1b0d4".into(),
        },
        OpRequest::Ping,
    ]
}

fn log_errors() -> Vec<LogError> {
    vec![
        LogError::NotFound,
        LogError::Removed {
            reason: "removed by retention: the attempt ended more than 7d ago ([logs] retention)"
                .into(),
            at_ms: T0,
        },
        LogError::Busy,
        LogError::ProtocolMismatch { sidecar: 4, hub: 5 },
        LogError::Failed {
            reason: "Permission denied (os error 13)".into(),
        },
    ]
}

fn log_frames() -> Vec<LogFrame> {
    let mut v = vec![
        LogFrame::Chunk {
            data: b"running 12 tests\n\xff\x00 binary too\n".to_vec(),
        },
        LogFrame::End(LogEnd {
            bytes: 20_000_000,
            cut_bytes: 1_048_576,
            ended: true,
        }),
    ];
    v.extend(log_errors().into_iter().map(LogFrame::Error));
    v
}

fn refusals() -> Vec<Refused> {
    vec![
        Refused::ProtocolMismatch { hub: 2, peer: 1 },
        Refused::Revoked,
        Refused::Forbidden {
            reason: "role operator may not open a session".into(),
        },
        Refused::BadHello {
            reason: "name does not match the certificate".into(),
        },
        Refused::NotLeader {
            leader: Some("hub-b.example.net:7440".into()),
        },
    ]
}

fn hub_msgs() -> Vec<HubMsg> {
    let mut v = vec![HubMsg::Welcome(Welcome {
        hub_version: "0.1.0".into(),
        heartbeat_interval_ms: 10_000,
        limits: WireLimits {
            max_frame_bytes: 1 << 20,
            max_result_bytes: 64 << 10,
        },
    })];
    v.extend(refusals().into_iter().map(HubMsg::Refused));
    v.extend([
        HubMsg::Assign(Assign {
            task: TaskId(41),
            generation: Generation(2),
            spec: spec(),
        }),
        HubMsg::Cancel {
            task: TaskId(42),
            generation: Generation(3),
        },
        HubMsg::Abandon {
            task: TaskId(43),
            generation: Generation(4),
            reason: "superseded by generation 5".into(),
        },
        HubMsg::Ack {
            upto: ReportId(1001),
        },
    ]);
    v
}

fn report_bodies() -> Vec<ReportBody> {
    vec![
        ReportBody::Accepted,
        ReportBody::Started {
            pid: Some(4242),
            session: Some("muster-41".into()),
        },
        ReportBody::Progress {
            note: "3 of 12 tests fixed".into(),
        },
        ReportBody::Finished {
            outcome: Outcome::Failed,
            result: Some("partial: 9 of 12".into()),
            error: Some(failure()),
            work: Some(Box::new(work_result())),
        },
        ReportBody::Usage(usage()),
        ReportBody::Ran {
            pid: Some(4243),
            session: None,
            outcome: Outcome::Completed,
            result: Some("all 12 fixed".into()),
            error: None,
            work: Some(Box::new(work_result())),
        },
    ]
}

fn usage() -> Usage {
    Usage {
        model: Some("claude-sonnet-4-5-20250929".into()),
        input_tokens: 1_234,
        output_tokens: 567,
        cache_read_tokens: 89_012,
        cache_write_tokens: 3_456,
        cost_micro_usd: Some(42_100),
    }
}

fn activity() -> Vec<Activity> {
    vec![
        Activity {
            task: TaskId(41),
            generation: Generation(2),
            cpu_ms: Some(3_200),
            output_bytes: 1 << 20,
            output_age_ms: Some(12_000),
            workspace_age_ms: Some(45_000),
            output_tail: "Apply these edits? [y/N]".into(),
        },
        Activity {
            task: TaskId(42),
            generation: Generation(1),
            cpu_ms: None,
            output_bytes: 0,
            output_age_ms: None,
            workspace_age_ms: None,
            output_tail: String::new(),
        },
    ]
}

fn report(id: u64, body: ReportBody) -> Report {
    Report {
        id: ReportId(id),
        task: TaskId(41),
        generation: Generation(2),
        body,
    }
}

fn session_msgs() -> Vec<SessionMsg> {
    let mut v: Vec<SessionMsg> = report_bodies()
        .into_iter()
        .zip(1001..)
        .map(|(b, id)| SessionMsg::Report(report(id, b)))
        .collect();
    v.push(SessionMsg::Heartbeat(Heartbeat {
        seq: 321,
        state: SidecarState::Draining,
        tasks: held(),
        free_slots: 3,
        self_test: self_test(),
        host: host(),
        activity: activity(),
    }));
    v
}

fn op_error_codes() -> Vec<OpErrorCode> {
    vec![
        OpErrorCode::Forbidden,
        OpErrorCode::NotFound,
        OpErrorCode::Invalid,
        OpErrorCode::Busy,
        OpErrorCode::Conflict,
        OpErrorCode::ProtocolMismatch,
        OpErrorCode::Internal,
    ]
}

fn op_responses() -> Vec<OpResponse> {
    let mut v = vec![OpResponse::Ok {
        json: r#"{"id":41,"state":"queued"}"#.into(),
    }];
    v.extend(op_error_codes().into_iter().map(|code| {
        OpResponse::Error(OpError {
            code,
            message: "no task 99; list tasks with `muster-hub tasks`".into(),
        })
    }));
    v.push(OpResponse::Event {
        seq: EventSeq(978),
        json: r#"{"seq":978,"kind":"task","task":41,"state":"running"}"#.into(),
    });
    v.push(OpResponse::LogChunk {
        data: b"line one\nline two\n".to_vec(),
    });
    v
}

fn enroll_refusals() -> Vec<EnrollRefusal> {
    vec![
        EnrollRefusal::UnknownToken,
        EnrollRefusal::Expired {
            at_unix: 1_796_290_000,
        },
        EnrollRefusal::AlreadyUsed {
            at_unix: 1_796_291_000,
        },
        EnrollRefusal::WrongRole {
            token: Role::Operator,
            requested: Role::Admin,
        },
        EnrollRefusal::RateLimited { retry_after_s: 30 },
        EnrollRefusal::RevokedKey,
        EnrollRefusal::BadRequest {
            reason: "the CSR does not parse".into(),
        },
        EnrollRefusal::ProtocolMismatch { hub: 2, peer: 3 },
        EnrollRefusal::NameTaken {
            name: "build-01".into(),
            holder: "9f86d081884c7d65".into(),
            enrolled_at_unix: 1_796_280_000,
        },
        EnrollRefusal::NameRefused {
            reason: "the name admin is reserved".into(),
        },
        EnrollRefusal::NotGranted {
            reason: "8 slots asked, the token grants 4".into(),
        },
    ]
}

fn enroll_responses() -> Vec<EnrollResponse> {
    let mut v = vec![EnrollResponse::Enrolled {
        cert_pem: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into(),
        ca_pem: "-----BEGIN CERTIFICATE-----\nMIIC\n-----END CERTIFICATE-----\n".into(),
    }];
    v.extend(enroll_refusals().into_iter().map(EnrollResponse::Refused));
    v
}

fn enroll_request() -> EnrollRequest {
    EnrollRequest {
        protocol: PROTOCOL_VERSION,
        secret: "s3cr3t-part-of-the-token".into(),
        role: Role::Agent,
        name: agent_name("build-07"),
        csr_pem: "-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n-----END CERTIFICATE REQUEST-----\n"
            .into(),
        capabilities: vec!["rust".into()],
        slots: 4,
    }
}

fn task_states() -> Vec<TaskState> {
    TaskState::ALL.to_vec()
}

fn task_record() -> TaskRecord {
    TaskRecord {
        id: TaskId(41),
        title: "fix the flaky integration test".into(),
        description: "It fails one run in ten.".into(),
        capabilities: vec!["rust".into(), "linux".into()],
        priority: -7,
        max_attempts: 4,
        timeout_ms: Some(900_000),
        timeout_action: TimeoutAction::Retry,
        after: vec![TaskId(39), TaskId(40)],
        key: Some("nightly-2026-12-03".into()),
        state: TaskState::Running,
        generation: Generation(2),
        attempts: 3,
        not_before: Some(T0 + 2_000),
        agent: Some("build-01".into()),
        submitted_at: T0,
        updated_at: T0 + 9_000,
        progress_at: Some(T0 + 8_000),
        progress_note: Some("3 of 12 tests fixed".into()),
        result: Some("partial: 9 of 12".into()),
        reason: Some("agent exited with status 3".into()),
        audit: vec![
            Audit {
                at: T0,
                who: "admin".into(),
                action: "submit".into(),
            },
            Audit {
                at: T0 + 5_000,
                who: "alice".into(),
                action: "requeue".into(),
            },
        ],
        repo: Some("git@git.example.net:org/app.git".into()),
        base: None,
        env: vec![("CI".into(), "1".into())],
        labels: vec![
            ("team".into(), "infra".into()),
            ("ticket".into(), "ENG-7".into()),
        ],
    }
}

fn work_result() -> WorkResult {
    WorkResult {
        branch: "muster/41".into(),
        base_commit: "4b825dc642cb6eb9a060e54bf8d69288fbee4904".into(),
        head: "9c1185a5c5e9fc54612808977ee8f548b2258d31".into(),
        commits: 3,
        diffstat: " src/lib.rs | 4 ++--\n 1 file changed".into(),
        dirty: true,
        checkpoint: Some("refs/muster/checkpoints/41/3".into()),
        link: Some("https://git.example.net/org/app/pull/7".into()),
    }
}

fn attempt_record() -> AttemptRecord {
    AttemptRecord {
        task: TaskId(41),
        generation: Generation(2),
        agent: "build-01".into(),
        assigned_at: T0 + 1_000,
        accepted_at: Some(T0 + 1_001),
        started_at: Some(T0 + 1_003),
        ended_at: Some(T0 + 7_000),
        outcome: Some(Outcome::AgentExited),
        error: Some(failure()),
        pid: Some(4242),
        session: Some("muster-41".into()),
        work: Some(work_result()),
        usage: Some(usage()),
    }
}

fn identity() -> Identity {
    Identity {
        name: "build-01".into(),
        role: Role::Agent,
        fingerprint: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into(),
        key_fingerprint: "60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752".into(),
        created_at: T0 - 86_400_000,
        revoked_at: Some(T0 - 3_600_000),
        capabilities: vec!["rust".into(), "review".into()],
        slots: 4,
    }
}

fn token_record() -> TokenRecord {
    TokenRecord {
        role: Role::Agent,
        created_by: "admin".into(),
        created_at: T0 - 7_200_000,
        expires_at: T0 + 3_600_000,
        used_at: Some(T0 - 60_000),
        name: Some("build-01".into()),
        capabilities: Some(vec!["rust".into()]),
        slots: Some(8),
    }
}

fn agent_record() -> AgentRecord {
    AgentRecord {
        name: "build-01".into(),
        version: "0.1.0".into(),
        capabilities: vec!["rust".into(), "review".into()],
        slots: 4,
        enrolled_at: T0 - 86_400_000,
        last_seen: Some(T0 + 9_500),
        host: Some(host()),
        self_test: Some(self_test()),
        drained: true,
        revoked: true,
    }
}

fn event_record() -> EventRecord {
    EventRecord {
        seq: 977,
        at: T0 + 9_000,
        json: r#"{"seq":977,"kind":"task","task":41,"state":"running"}"#.into(),
    }
}

fn run_modes() -> Vec<RunMode> {
    vec![RunMode::Exec, RunMode::Wake]
}

fn local_task() -> LocalTask {
    LocalTask {
        task: TaskId(41),
        generation: Generation(2),
        spec: spec(),
        phase: Phase::Running,
        handle: Some(RunHandle {
            pid: Some(4242),
            session: Some("muster-41".into()),
            run_dir: "/var/lib/muster-sidecar/runs/41-2".into(),
            mode: RunMode::Exec,
            start_ticks: Some(1_234_567),
        }),
    }
}

/// Every case, and which enum variants they cover.
fn cases() -> (Vec<Case>, Coverage) {
    use Format::{HubStore, SidecarQueue, Wire};
    let mut cov = Coverage::default();
    let mut out = Vec::new();

    // Wire: every frame a stream carries, one case per variant.
    let opens = std::iter::once(Open {
        protocol: PROTOCOL_VERSION,
        body: OpenBody::Session(hello()),
    })
    .chain(op_requests().into_iter().map(|r| Open {
        protocol: PROTOCOL_VERSION,
        body: OpenBody::Request(r),
    }));
    for o in opens {
        let name = match &o.body {
            OpenBody::Session(_) => "open.session".to_string(),
            OpenBody::Request(r @ OpRequest::IdentityRevoke(t)) => {
                format!("open.request.{}.{}", variant(r), variant(t))
            }
            OpenBody::Request(r) => format!("open.request.{}", variant(r)),
        };
        cov.cover([&o.body]);
        out.push(Case::new(Wire, name, o));
    }
    let ops = op_requests();
    cov.cover(&ops);
    cov.cover(ops.iter().filter_map(|r| match r {
        OpRequest::IdentityRevoke(t) => Some(t),
        _ => None,
    }));

    for m in hub_msgs() {
        let name = match &m {
            HubMsg::Refused(r) => format!("hub_msg.refused.{}", variant(r)),
            m => format!("hub_msg.{}", variant(m)),
        };
        cov.cover([&m]);
        out.push(Case::new(Wire, name, m));
    }
    cov.cover(&refusals());
    for m in session_msgs() {
        let name = match &m {
            SessionMsg::Report(r) => format!("session_msg.report.{}", variant(&r.body)),
            m => format!("session_msg.{}", variant(m)),
        };
        cov.cover([&m]);
        out.push(Case::new(Wire, name, m));
    }
    cov.cover(&report_bodies());
    for r in op_responses() {
        let name = match &r {
            OpResponse::Error(e) => format!("op_response.error.{}", variant(&e.code)),
            r => format!("op_response.{}", variant(r)),
        };
        cov.cover([&r]);
        out.push(Case::new(Wire, name, r));
    }
    cov.cover(&op_error_codes());
    out.push(Case::new(Wire, "enroll_request", enroll_request()));
    for r in enroll_responses() {
        let name = match &r {
            EnrollResponse::Refused(x) => format!("enroll_response.refused.{}", variant(x)),
            r => format!("enroll_response.{}", variant(r)),
        };
        cov.cover([&r]);
        out.push(Case::new(Wire, name, r));
    }
    cov.cover(&enroll_refusals());
    out.push(Case::new(
        Wire,
        "log_open",
        LogOpen {
            protocol: PROTOCOL_VERSION,
            task: TaskId(41),
            generation: Generation(2),
            stream: LogStream::Stdout,
            tail: None,
            follow: true,
        },
    ));
    for f in log_frames() {
        let name = match &f {
            LogFrame::Error(e) => format!("log_frame.error.{}", variant(e)),
            f => format!("log_frame.{}", variant(f)),
        };
        cov.cover([&f]);
        out.push(Case::new(Wire, name, f));
    }
    cov.cover(&log_errors());

    // Wire: the small enums, each variant on its own, so one inserted in the
    // middle shows as the variants after it changing.
    fn each<T>(out: &mut Vec<Case>, cov: &mut Coverage, format: Format, prefix: &str, all: Vec<T>)
    where
        T: Serialize + DeserializeOwned + PartialEq + Debug + 'static,
    {
        cov.cover(&all);
        for v in all {
            out.push(Case::new(format, format!("{prefix}.{}", variant(&v)), v));
        }
    }
    let phases = vec![
        Phase::Accepted,
        Phase::Waking,
        Phase::Verifying,
        Phase::Running,
        Phase::Finished,
    ];
    each(&mut out, &mut cov, Wire, "phase", phases);
    let kinds = vec![
        ReportKind::Accepted,
        ReportKind::Started,
        ReportKind::Progress,
        ReportKind::Finished,
        ReportKind::Usage,
    ];
    each(&mut out, &mut cov, Wire, "report_kind", kinds);
    each(&mut out, &mut cov, Wire, "outcome", Outcome::ALL.to_vec());
    let states = vec![SidecarState::Ready, SidecarState::Draining];
    each(&mut out, &mut cov, Wire, "sidecar_state", states);
    let roles = vec![Role::Agent, Role::Operator, Role::Admin, Role::Submitter];
    each(&mut out, &mut cov, Wire, "role", roles);
    let actions = vec![TimeoutAction::Fail, TimeoutAction::Retry];
    each(&mut out, &mut cov, Wire, "timeout_action", actions);
    let modes = vec![
        WorkspaceMode::Shared,
        WorkspaceMode::Dir,
        WorkspaceMode::Git,
    ];
    each(&mut out, &mut cov, Wire, "workspace_mode", modes);
    let streams = vec![LogStream::Stdout, LogStream::Stderr];
    each(&mut out, &mut cov, Wire, "log_stream", streams);

    // Booleans set alike cannot show two of them swapped; these samples set
    // one at a time, so any swap changes one of them.
    for (name, passed, command_ok) in [
        ("passed_only", true, false),
        ("command_ok_only", false, true),
    ] {
        let t = SelfTest {
            passed,
            command_ok,
            disk_ok: false,
            ..self_test()
        };
        out.push(Case::new(Wire, format!("self_test.{name}"), t));
    }

    // Hub store: the value of every table that holds bincode (the others hold
    // redb's own integers and tuples), and the state codes of `by_state`.
    out.push(Case::new(HubStore, "tasks.task_record", task_record()));
    out.push(Case::new(
        HubStore,
        "attempts.attempt_record",
        attempt_record(),
    ));
    out.push(Case::new(HubStore, "identities.identity", identity()));
    out.push(Case::new(HubStore, "tokens.token_record", token_record()));
    out.push(Case::new(HubStore, "agents.agent_record", agent_record()));
    let drained_only = AgentRecord {
        revoked: false,
        ..agent_record()
    };
    out.push(Case::new(
        HubStore,
        "agents.agent_record.drained_only",
        drained_only,
    ));
    out.push(Case::new(HubStore, "events.event_record", event_record()));
    each(&mut out, &mut cov, HubStore, "task_state", task_states());
    let codes: Vec<(String, u8)> = TaskState::ALL
        .iter()
        .map(|s| (s.as_str().to_string(), muster_hub::store::state_code(*s)))
        .collect();
    out.push(Case::new(HubStore, "by_state_codes", codes));

    // Sidecar queue: its two tables' values.
    out.push(Case::new(SidecarQueue, "tasks.local_task", local_task()));
    for (id, body) in (2001..).zip(report_bodies()) {
        let name = format!("outbox.report.{}", variant(&body));
        out.push(Case::new(SidecarQueue, name, report(id, body)));
    }
    each(&mut out, &mut cov, SidecarQueue, "run_mode", run_modes());

    (out, cov)
}

// === The golden test ===

/// How `MUSTER_BLESS` asks the test to behave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Compare only.
    Check,
    /// Rewrite the files, but not changed bytes under an unchanged version.
    Bless,
    /// Rewrite everything (`MUSTER_BLESS=sample`: only a sample changed).
    BlessSamples,
}

fn mode() -> Mode {
    match std::env::var("MUSTER_BLESS").as_deref() {
        Ok("sample") => Mode::BlessSamples,
        Ok(v) if !v.is_empty() && v != "0" => Mode::Bless,
        _ => Mode::Check,
    }
}

/// The first byte at which `a` and `b` differ, if any.
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    (0..a.len().max(b.len())).find(|&i| a.get(i) != b.get(i))
}

/// Up to 16 bytes from `at`, hex, with an ellipsis when cut.
fn window(bytes: &[u8], at: usize) -> String {
    let from = at.saturating_sub(4).min(bytes.len());
    let to = (at + 12).min(bytes.len());
    format!(
        "[{from}..{to}] {}{}",
        hex(&bytes[from..to]),
        if to < bytes.len() { " …" } else { "" }
    )
}

#[test]
fn every_case_matches_its_golden_file() {
    let (cases, _) = cases();
    let mode = mode();
    let mut problems: Vec<String> = Vec::new();
    let mut formats_changed: BTreeSet<Format> = BTreeSet::new();
    let mut blessed: Vec<String> = Vec::new();
    let mut names = BTreeSet::new();
    for c in &cases {
        assert!(
            names.insert((c.format, c.name.clone())),
            "two cases are named {}/{}",
            c.format.dir(),
            c.name
        );
        let (vname, version) = c.format.version();
        let label = format!("{}/{} ({})", c.format.dir(), c.name, c.ty);
        let text = std::fs::read_to_string(c.path()).ok();
        let golden = match text.as_deref().map(parse) {
            None => None,
            Some(Ok(g)) => Some(g),
            Some(Err(e)) => {
                problems.push(format!("{label}: the file does not parse ({e})"));
                continue;
            }
        };
        // The file's own bytes must decode to the sample, whatever this build writes.
        let mut report = String::new();
        match &golden {
            None => {
                let _ = writeln!(
                    report,
                    "{label}: no golden file yet, a new case: bless to write it (a variant appended at the end of its enum needs no version bump)"
                );
            }
            Some(g) if g.bytes != c.bytes => {
                formats_changed.insert(c.format);
                let at = first_difference(&g.bytes, &c.bytes).unwrap_or(0);
                let _ = writeln!(
                    report,
                    "{label}: this build encodes the sample differently.\n      file:    {} bytes, {}\n      encoded: {} bytes, {}\n      the file's bytes: {}",
                    g.bytes.len(),
                    window(&g.bytes, at),
                    c.bytes.len(),
                    window(&c.bytes, at),
                    match (c.check)(&g.bytes) {
                        Ok(()) => "still decode to the sample".to_string(),
                        Err(e) => e,
                    }
                );
            }
            Some(g) => {
                if let Err(e) = (c.check)(&g.bytes) {
                    let _ = writeln!(
                        report,
                        "{label}: the file matches the encoding but does not decode back to the sample: {e}"
                    );
                }
                if g.version != Some(version) {
                    let _ = writeln!(
                        report,
                        "{label}: the file was written under {vname} {:?}, this build has {version}; bless to record the new version",
                        g.version
                    );
                }
            }
        }
        // Blessing also refreshes a file whose comments are out of date.
        let stale_text = text.as_deref() != Some(c.render().as_str());
        if report.is_empty() && (mode == Mode::Check || !stale_text) {
            continue;
        }
        let bytes_changed = matches!(&golden, Some(g) if g.bytes != c.bytes);
        let version_kept = matches!(&golden, Some(g) if g.version == Some(version));
        match mode {
            Mode::Check => problems.push(report),
            Mode::Bless if bytes_changed && version_kept => problems.push(format!(
                "{report}    not blessed: the bytes changed but {vname} is still {version}. Bump it first \
                 ({}), or use MUSTER_BLESS=sample if only the sample in tests/tests/golden.rs changed.",
                c.format.consequence()
            )),
            Mode::Bless | Mode::BlessSamples => {
                let path = c.path();
                std::fs::create_dir_all(path.parent().expect("golden files have a directory"))
                    .expect("create the golden directory");
                std::fs::write(&path, c.render()).expect("write a golden file");
                blessed.push(format!("{}/{}", c.format.dir(), c.name));
            }
        }
    }
    // Files no case writes any more: a case was renamed or removed.
    for f in Format::ALL {
        let dir = golden_root().join(f.dir());
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let file = e.file_name().to_string_lossy().to_string();
            let Some(stem) = file.strip_suffix(".hex") else {
                continue;
            };
            if names.contains(&(f, stem.to_string())) {
                continue;
            }
            if mode == Mode::Check {
                problems.push(format!(
                    "{}/{file}: no case writes this file any more (a case was renamed or removed; a variant must never be removed)",
                    f.dir()
                ));
            } else {
                std::fs::remove_file(e.path()).expect("remove a stale golden file");
                blessed.push(format!("{}/{file} removed", f.dir()));
            }
        }
    }
    if !blessed.is_empty() {
        eprintln!(
            "golden: rewrote {} file(s) in {}:\n  {}",
            blessed.len(),
            golden_root().display(),
            blessed.join("\n  ")
        );
    }
    if problems.is_empty() {
        return;
    }
    let mut msg = format!(
        "{} golden case(s) of {} differ from tests/golden/:\n\n",
        problems.len(),
        cases.len()
    );
    for p in &problems {
        msg.push_str("  ");
        msg.push_str(p);
        msg.push('\n');
    }
    msg.push_str(
        "\nChanged bytes mean a field was added, removed, moved or retyped, or an enum variant was \
         inserted or moved (bincode writes fields in order and variants by index, without names).\n",
    );
    for f in formats_changed {
        let _ = writeln!(msg, "For {}: this is {}.", f.dir(), f.consequence());
    }
    let _ = write!(
        msg,
        "If the change is not intended, undo it: new fields need a version bump anyway, and new \
         variants go at the end of their enum. If it is intended, bump the version, then rewrite the \
         files with\n    {BLESS}\nand commit them with the bump. Blessing records a wire or \
         stored-format change; it is never a way to make this test pass."
    );
    panic!("{msg}");
}

#[test]
fn every_variant_has_a_case() {
    let (_, cov) = cases();
    let missing = cov.missing();
    assert!(
        missing.is_empty(),
        "these enum variants have no golden case; add a sample for each in tests/tests/golden.rs \
         (a new variant goes at the end of its enum) and run {BLESS}:\n  {}",
        missing.join("\n  ")
    );
    // Every enum the formats can hold, found in the source, has its variants checked.
    let mut unchecked = Vec::new();
    for file in [
        "../protocol/wire/src/msg.rs",
        "../hub/core/src/model.rs",
        "../sidecar/core/src/run.rs",
    ] {
        let (enums, _) = serialized_types(file);
        for e in enums {
            if !cov.enums.contains_key(e.as_str()) {
                unchecked.push(format!("{e} (in {file})"));
            }
        }
    }
    assert!(
        unchecked.is_empty(),
        "these serialized enums have no golden coverage; add their variants to `cases()` in \
         tests/tests/golden.rs:\n  {}",
        unchecked.join("\n  ")
    );
    // Every record type the hub keeps has a case (`Audit` rides in `TaskRecord`).
    let (_, records) = serialized_types("../hub/core/src/model.rs");
    let known = [
        short::<TaskRecord>(),
        short::<Audit>(),
        short::<AttemptRecord>(),
        short::<Identity>(),
        short::<TokenRecord>(),
        short::<AgentRecord>(),
        short::<EventRecord>(),
    ];
    let new: Vec<&String> = records
        .iter()
        .filter(|r| !known.contains(&r.as_str()))
        .collect();
    assert!(
        new.is_empty(),
        "hub/core/src/model.rs has serialized record types without a golden case: {new:?}; add a \
         sample in tests/tests/golden.rs"
    );
}

// === Stored-format version records ===

const META: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("meta");

/// The `schema_version` a redb file records, opened with redb alone.
fn recorded_version(path: &Path) -> Option<u64> {
    use redb::ReadableDatabase;
    let db = redb::Database::open(path).expect("open the file with redb");
    let tx = db.begin_read().expect("read transaction");
    let meta = tx.open_table(META).expect("a meta table");
    meta.get("schema_version")
        .expect("read meta")
        .map(|v| v.value())
}

/// A redb file holding only `meta.schema_version = version`, as a build that
/// writes that version would leave it.
fn file_with_version(path: &Path, version: u64) {
    let db = redb::Database::create(path).expect("create a redb file");
    let tx = db.begin_write().expect("write transaction");
    tx.open_table(META)
        .expect("meta table")
        .insert("schema_version", version)
        .expect("insert the version");
    tx.commit().expect("commit");
}

#[test]
fn a_new_hub_store_records_its_schema_version_and_a_newer_file_is_refused() {
    use muster_hub::store::{SCHEMA_VERSION, Store, StoreError};
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("hub.redb");
    drop(Store::open(&path).expect("a new store opens"));
    assert_eq!(recorded_version(&path), Some(SCHEMA_VERSION));
    drop(Store::open(&path).expect("its own file opens again"));
    assert_eq!(recorded_version(&path), Some(SCHEMA_VERSION));

    let newer = dir.path().join("newer.redb");
    file_with_version(&newer, SCHEMA_VERSION + 1);
    match Store::open(&newer) {
        Err(e @ StoreError::TooNew { found, .. }) => {
            assert_eq!(found, SCHEMA_VERSION + 1);
            let text = e.to_string();
            assert!(
                text.contains(&format!("schema version {}", SCHEMA_VERSION + 1))
                    && text.contains("newer than this build"),
                "the error says which version and what to do: {text}"
            );
        }
        Err(e) => panic!("a newer file must be refused as too new, got: {e}"),
        Ok(_) => panic!("a file of schema version {} opened", SCHEMA_VERSION + 1),
    }
    // Refusing it changed nothing in it.
    assert_eq!(recorded_version(&newer), Some(SCHEMA_VERSION + 1));
}

#[test]
fn a_new_sidecar_queue_records_its_schema_version_and_a_newer_file_is_refused() {
    use muster_sidecar::queue::{Queue, QueueError, SCHEMA_VERSION};
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("sidecar.redb");
    drop(Queue::open(&path).expect("a new queue opens"));
    assert_eq!(recorded_version(&path), Some(SCHEMA_VERSION));
    let q = Queue::open(&path).expect("its own file opens again");
    let loaded = q.load().expect("and loads");
    assert!(loaded.tasks.is_empty() && loaded.outbox.is_empty());
    drop(q);

    let newer = dir.path().join("newer.redb");
    file_with_version(&newer, SCHEMA_VERSION + 1);
    match Queue::open(&newer) {
        Err(e @ QueueError::TooNew(found)) => {
            assert_eq!(found, SCHEMA_VERSION + 1);
            let text = e.to_string();
            assert!(
                text.contains(&format!("schema version {}", SCHEMA_VERSION + 1))
                    && text.contains("newer than this build"),
                "the error says which version and what to do: {text}"
            );
        }
        Err(e) => panic!("a newer file must be refused as too new, got: {e}"),
        Ok(_) => panic!("a file of schema version {} opened", SCHEMA_VERSION + 1),
    }
    assert_eq!(recorded_version(&newer), Some(SCHEMA_VERSION + 1));
}
