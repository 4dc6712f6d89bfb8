//! Unit tests of the decision core, with explicit time and an in-memory store.
//!
//! The harness [`H`] feeds inputs, takes each output, checks the "commit before
//! acknowledge" invariants on it, and folds its writes into [`Store`] the way
//! the real store would, so finished tasks can be read back through [`Archive`].

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use muster_wire::msg::{
    Activity, Assign, EnrollRefusal, EnrollResponse, Failure, Heartbeat, HeldTask, Hello,
    HostFigures, HubMsg, OpError, OpErrorCode, OpRequest, OpResponse, Outcome, Phase, Refused,
    Report, ReportBody, Role, SelfTest, SessionMsg, SidecarState, SubmitRequest, TimeoutAction,
    Usage,
};
use muster_wire::{AgentName, Generation, ReportId, TaskId, limits};
use serde_json::Value;

use super::{
    AgentRecord, Archive, AttemptRecord, ConnId, Core, Identity, Input, Millis, Output, Reply,
    ReplyId, Restored, TaskRecord, TaskState, TokenRecord, Write,
};
use crate::ops::AGENTS_REPLY_BYTES_MAX;
use crate::policy::{Limits, Policy};

/// A fixed wall-clock start, in milliseconds since the epoch.
const T0: Millis = 1_700_000_000_000;
const ADMIN: &str = "fp-admin";
const OPERATOR: &str = "fp-operator";

// === The in-memory store ===

/// What the real store would hold after committing every output's writes.
#[derive(Debug, Default)]
struct Store {
    tasks: HashMap<TaskId, TaskRecord>,
    attempts: BTreeMap<(TaskId, Generation), AttemptRecord>,
    agents: BTreeMap<String, AgentRecord>,
    identities: BTreeMap<String, Identity>,
    tokens: BTreeMap<String, TokenRecord>,
    api_tokens: BTreeMap<String, crate::web::ApiToken>,
    keys: BTreeMap<String, TaskId>,
    next_task_id: u64,
    events: u64,
}

impl Archive for Store {
    fn task(&self, id: TaskId) -> Option<TaskRecord> {
        self.tasks.get(&id).cloned()
    }
}

impl Store {
    fn commit(&mut self, writes: &[Write]) {
        for w in writes {
            match w {
                Write::Task(t) => {
                    self.tasks.insert(t.id, t.clone());
                }
                Write::Attempt(a) => {
                    self.attempts.insert((a.task, a.generation), a.clone());
                }
                Write::Agent(a) => {
                    self.agents.insert(a.name.clone(), a.clone());
                }
                Write::Identity(i) => {
                    self.identities.insert(i.fingerprint.clone(), i.clone());
                }
                Write::Token(h, t) => {
                    self.tokens.insert(h.clone(), t.clone());
                }
                Write::ApiToken(h, t) => {
                    self.api_tokens.insert(h.clone(), t.clone());
                }
                Write::Key(k, id) => {
                    self.keys.insert(k.clone(), *id);
                }
                Write::Event { seq, .. } => self.events = self.events.max(seq + 1),
                Write::NextTaskId(n) => self.next_task_id = *n,
            }
        }
    }

    /// What a restarted hub would load.
    fn restored(&self) -> Restored {
        let mut live: Vec<(TaskRecord, Option<AttemptRecord>)> = self
            .tasks
            .values()
            .filter(|t| !t.state.is_terminal())
            .map(|t| (t.clone(), self.attempts.get(&(t.id, t.generation)).cloned()))
            .collect();
        live.sort_by_key(|(t, _)| t.id);
        Restored {
            live,
            agents: self.agents.values().cloned().collect(),
            identities: self.identities.values().cloned().collect(),
            tokens: self
                .tokens
                .iter()
                .map(|(h, t)| (h.clone(), t.clone()))
                .collect(),
            keys: self.keys.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            next_task_id: self.next_task_id,
            next_event_seq: self.events,
            api_tokens: self
                .api_tokens
                .iter()
                .map(|(h, t)| (h.clone(), t.clone()))
                .collect(),
        }
    }
}

// === The harness ===

struct H {
    core: Core,
    store: Store,
    now: Millis,
    next_reply: u64,
    next_report: u64,
    /// Sessions the hub welcomed and that are still open, with the tasks each sidecar holds.
    online: BTreeMap<ConnId, Vec<HeldTask>>,
    /// The agent behind each connection ever opened.
    conn_agent: HashMap<ConnId, String>,
    /// The workspace mode the next hellos announce.
    workspace: muster_wire::work::WorkspaceMode,
}

impl H {
    fn new() -> Self {
        Self::with(Policy::default(), Limits::default())
    }

    fn with(policy: Policy, limits: Limits) -> Self {
        let mut core = Core::new(policy, limits, Restored::default(), T0, 7);
        // The per-report invariants below want every ack in the report's own output;
        // delayed acks have their own test.
        core.set_ack_delay(0);
        let mut h = H {
            core,
            store: Store::default(),
            now: T0,
            next_reply: 1,
            next_report: 1,
            online: BTreeMap::new(),
            conn_agent: HashMap::new(),
            workspace: muster_wire::work::WorkspaceMode::Shared,
        };
        h.add_identity("admin", Role::Admin, ADMIN);
        h.add_identity("ops", Role::Operator, OPERATOR);
        let _ = h.flush();
        h
    }

    /// A hub restart at `at`: a new core built from what the store holds; every session is gone.
    fn restart(&mut self, policy: Policy, at: Millis) {
        self.now = at;
        self.core = Core::new(policy, Limits::default(), self.store.restored(), at, 11);
        self.core.set_ack_delay(0);
        self.online.clear();
    }

    fn add_identity(&mut self, name: &str, role: Role, fingerprint: &str) {
        self.core.add_identity(Identity {
            name: name.into(),
            role,
            fingerprint: fingerprint.into(),
            key_fingerprint: format!("key-{fingerprint}"),
            created_at: self.now,
            revoked_at: None,
            capabilities: Vec::new(),
            slots: 0,
        });
    }

    /// Grants an agent identity what its next hello claims (the grant itself is
    /// tested on its own; most tests are about what happens after the hello).
    fn grant(&mut self, fingerprint: &str, caps: &[&str], slots: u32) {
        if let Some(mut id) = self
            .store
            .identities
            .get(fingerprint)
            .cloned()
            .filter(|i| i.role == Role::Agent)
        {
            for c in caps {
                if !id.capabilities.iter().any(|x| x == c) {
                    id.capabilities.push(c.to_string());
                }
            }
            id.slots = id.slots.max(slots);
            self.core.add_identity(id);
        }
    }

    /// Enrolls an agent identity; its fingerprint is `fp-<name>`.
    fn enroll(&mut self, name: &str) -> String {
        let fp = format!("fp-{name}");
        if !self.store.identities.contains_key(&fp) {
            self.add_identity(name, Role::Agent, &fp);
            let _ = self.flush();
        }
        fp
    }

    /// Takes the pending output and commits it.
    fn flush(&mut self) -> Output {
        let out = self.core.take_output();
        self.check_invariants(&out);
        self.store.commit(&out.writes);
        self.track(&out);
        out
    }

    fn step(&mut self, input: Input) -> Output {
        self.core.handle(self.now, input, &self.store);
        self.flush()
    }

    /// Several inputs handled before one output is taken, as the shell batches them.
    fn batch(&mut self, inputs: Vec<Input>) -> Output {
        for i in inputs {
            self.core.handle(self.now, i, &self.store);
        }
        self.flush()
    }

    /// Follows what each sidecar would hold, for heartbeats.
    fn track(&mut self, out: &Output) {
        for (conn, msg) in &out.sends {
            let Some(held) = self.online.get_mut(conn) else {
                continue;
            };
            match msg {
                HubMsg::Assign(a)
                    if !held
                        .iter()
                        .any(|h| h.task == a.task && h.generation == a.generation) =>
                {
                    held.push(HeldTask {
                        task: a.task,
                        generation: a.generation,
                        phase: Phase::Accepted,
                    });
                }
                HubMsg::Abandon {
                    task, generation, ..
                }
                | HubMsg::Cancel { task, generation } => {
                    held.retain(|h| !(h.task == *task && h.generation == *generation));
                }
                _ => {}
            }
        }
        for c in &out.closes {
            self.online.remove(c);
        }
    }

    /// The rules the shell relies on: a message that depends on a state change
    /// travels in the same output as the write of that change.
    fn check_invariants(&self, out: &Output) {
        let task_written = |id: TaskId| {
            out.writes
                .iter()
                .any(|w| matches!(w, Write::Task(t) if t.id == id))
        };
        for (conn, msg) in &out.sends {
            match msg {
                HubMsg::Assign(a) => {
                    let before = self.store.tasks.get(&a.task).map(|t| t.generation);
                    if before.is_none_or(|g| g < a.generation) {
                        assert!(
                            out.writes.iter().any(|w| matches!(w, Write::Task(t)
                                if t.id == a.task && t.generation == a.generation && t.state == TaskState::Assigned)),
                            "Assign {:?} gen {} sent without its Write::Task",
                            a.task,
                            a.generation
                        );
                    }
                }
                HubMsg::Cancel { task, .. } => {
                    assert!(
                        out.writes.iter().any(|w| matches!(w, Write::Task(t)
                            if t.id == *task && t.state == TaskState::Cancelled)),
                        "Cancel {task} sent without a Write::Task in state cancelled"
                    );
                }
                HubMsg::Abandon {
                    task, generation, ..
                } => {
                    let agent = self.conn_agent.get(conn);
                    let was_live_here = self.store.tasks.get(task).is_some_and(|t| {
                        t.state.has_live_attempt()
                            && t.generation == *generation
                            && t.agent.as_ref() == agent
                    });
                    if was_live_here {
                        assert!(
                            task_written(*task),
                            "Abandon of the live attempt {task}/{generation} without a Write::Task"
                        );
                    }
                }
                _ => {}
            }
        }
        for w in &out.writes {
            if let Write::Attempt(a) = w {
                assert!(
                    task_written(a.task),
                    "Write::Attempt for {} without a Write::Task",
                    a.task
                );
            }
        }
        // Every document renders with its keys in alphabetical order at every level,
        // as operators, `watch` and the event log have always had them.
        for w in &out.writes {
            if let Write::Event { event, .. } = w {
                assert_keys_sorted(event);
            }
        }
        for a in &out.alerts {
            assert_keys_sorted(a);
        }
        for (_, reply) in &out.replies {
            if let Reply::Answer(answer) = reply {
                assert_keys_sorted(answer);
                let v = json_of(answer);
                if let (Some(id), Some(_)) = (v.get("id").and_then(Value::as_u64), v.get("state")) {
                    let existing = v.get("existing").is_some();
                    if !existing {
                        assert!(
                            task_written(TaskId(id)),
                            "a reply about task {id} without its Write::Task"
                        );
                    }
                }
            }
        }
    }

    // --- Time ---

    fn advance(&mut self, ms: u64) {
        self.now += ms;
    }

    /// Lets `ms` pass in steps of 5 s; every open session heartbeats (listing what its
    /// sidecar holds) and the hub ticks after each step. Returns every output merged.
    fn pass(&mut self, ms: u64) -> Output {
        let mut all = Output::default();
        let mut left = ms;
        while left > 0 {
            let d = left.min(5_000);
            left -= d;
            self.advance(d);
            let conns: Vec<ConnId> = self.online.keys().copied().collect();
            for c in conns {
                let out = self.heartbeat(c, true);
                merge(&mut all, out);
            }
            let out = self.tick();
            merge(&mut all, out);
        }
        all
    }

    fn tick(&mut self) -> Output {
        self.step(Input::Tick)
    }

    // --- Sessions ---

    fn hello(
        &mut self,
        conn: u64,
        name: &str,
        caps: &[&str],
        slots: u32,
        resume: Vec<HeldTask>,
    ) -> Output {
        let fp = format!("fp-{name}");
        self.hello_as(conn, &fp, name, caps, slots, resume)
    }

    fn hello_as(
        &mut self,
        conn: u64,
        fingerprint: &str,
        name: &str,
        caps: &[&str],
        slots: u32,
        resume: Vec<HeldTask>,
    ) -> Output {
        self.grant(fingerprint, caps, slots);
        let conn = ConnId(conn);
        self.conn_agent.insert(conn, name.to_string());
        self.online.insert(conn, resume.clone());
        let out = self.step(Input::Hello {
            conn,
            fingerprint: fingerprint.into(),
            hello: Hello {
                version: "test".into(),
                agent: AgentName::new(name).expect("valid agent name"),
                capabilities: caps.iter().map(|c| c.to_string()).collect(),
                slots,
                resume,
                workspace: self.workspace,
            },
        });
        if !out
            .sends
            .iter()
            .any(|(c, m)| *c == conn && matches!(m, HubMsg::Welcome(_)))
        {
            self.online.remove(&conn);
        }
        out
    }

    /// Enrolls (if needed) and opens a session: returns the connection and the hello's output.
    fn connect(&mut self, conn: u64, name: &str, caps: &[&str], slots: u32) -> (ConnId, Output) {
        self.enroll(name);
        let out = self.hello(conn, name, caps, slots, Vec::new());
        (ConnId(conn), out)
    }

    fn close(&mut self, conn: ConnId) -> Output {
        self.online.remove(&conn);
        self.step(Input::Closed { conn })
    }

    fn heartbeat(&mut self, conn: ConnId, passed: bool) -> Output {
        let tasks = self.online.get(&conn).cloned().unwrap_or_default();
        self.heartbeat_with(conn, tasks, passed)
    }

    fn heartbeat_with(&mut self, conn: ConnId, tasks: Vec<HeldTask>, passed: bool) -> Output {
        // Each heartbeat newer than the last, as a sidecar numbers them.
        self.next_reply += 1;
        self.step(Input::Session {
            conn,
            msg: SessionMsg::Heartbeat(Heartbeat {
                seq: self.next_reply,
                state: SidecarState::Ready,
                tasks,
                free_slots: 0,
                self_test: SelfTest {
                    passed,
                    hub_rtt_us: Some(100),
                    command_ok: passed,
                    disk_ok: true,
                    problems: if passed {
                        Vec::new()
                    } else {
                        vec!["wake command missing".into()]
                    },
                },
                host: HostFigures::default(),
                activity: Vec::new(),
            }),
        })
    }

    // --- Reports ---

    fn report_input(
        &mut self,
        conn: ConnId,
        task: TaskId,
        generation: u64,
        body: ReportBody,
    ) -> (ReportId, Input) {
        let id = ReportId(self.next_report);
        self.next_report += 1;
        let input = Input::Session {
            conn,
            msg: SessionMsg::Report(Report {
                id,
                task,
                generation: Generation(generation),
                body,
            }),
        };
        (id, input)
    }

    /// Sends one report and checks it is acknowledged, and that a report that
    /// changes the current attempt has its Write::Task in the same output.
    fn report(&mut self, conn: ConnId, task: TaskId, generation: u64, body: ReportBody) -> Output {
        let (id, input) = self.report_input(conn, task, generation, body);
        self.report_raw(conn, task, generation, id, input)
    }

    fn report_raw(
        &mut self,
        conn: ConnId,
        task: TaskId,
        generation: u64,
        id: ReportId,
        input: Input,
    ) -> Output {
        let agent = self.conn_agent.get(&conn).cloned();
        let current = self.store.tasks.get(&task).is_some_and(|t| {
            t.state.has_live_attempt() && t.generation == Generation(generation) && t.agent == agent
        });
        let dups = self.core.counters().duplicate_reports;
        let out = self.step(input);
        if self.online.contains_key(&conn) {
            assert!(
                acks(&out, conn).iter().any(|u| *u >= id),
                "report {id} not acknowledged: {:?}",
                out.sends
            );
        }
        if current && self.core.counters().duplicate_reports == dups {
            assert!(
                !task_writes(&out, task).is_empty(),
                "report {id} changed task {task} without a Write::Task in the output that acks it"
            );
        }
        out
    }

    fn accept(&mut self, conn: ConnId, task: TaskId, generation: u64) -> Output {
        self.report(conn, task, generation, ReportBody::Accepted)
    }

    fn start(&mut self, conn: ConnId, task: TaskId, generation: u64) -> Output {
        if let Some(h) = self
            .online
            .get_mut(&conn)
            .and_then(|held| held.iter_mut().find(|h| h.task == task))
        {
            h.phase = Phase::Running;
        }
        self.report(
            conn,
            task,
            generation,
            ReportBody::Started {
                pid: Some(4242),
                session: None,
            },
        )
    }

    fn finish(
        &mut self,
        conn: ConnId,
        task: TaskId,
        generation: u64,
        outcome: Outcome,
        error: Option<Failure>,
    ) -> Output {
        if let Some(held) = self.online.get_mut(&conn) {
            held.retain(|h| !(h.task == task && h.generation == Generation(generation)));
        }
        self.report(
            conn,
            task,
            generation,
            ReportBody::Finished {
                outcome,
                result: (outcome == Outcome::Completed).then(|| "done".to_string()),
                error,
                work: None,
            },
        )
    }

    fn complete(&mut self, conn: ConnId, task: TaskId, generation: u64) -> Output {
        self.finish(conn, task, generation, Outcome::Completed, None)
    }

    fn fail(&mut self, conn: ConnId, task: TaskId, generation: u64, no_retry: bool) -> Output {
        self.finish(
            conn,
            task,
            generation,
            Outcome::Failed,
            Some(Failure {
                reason: "exit status 3".into(),
                exit_code: Some(3),
                no_retry,
                ..Failure::default()
            }),
        )
    }

    /// Accepted, Started, Finished{Completed}; returns the output of the last.
    fn run_ok(&mut self, conn: ConnId, task: TaskId, generation: u64) -> Output {
        let _ = self.accept(conn, task, generation);
        let _ = self.start(conn, task, generation);
        self.complete(conn, task, generation)
    }

    // --- Operators ---

    fn op(&mut self, fingerprint: &str, request: OpRequest) -> (OpResponse, Output) {
        self.op_with(fingerprint, request, None)
    }

    fn op_with(
        &mut self,
        fingerprint: &str,
        request: OpRequest,
        token_secret: Option<(String, String)>,
    ) -> (OpResponse, Output) {
        let reply = ReplyId(self.next_reply);
        self.next_reply += 1;
        let mut out = self.step(Input::Op {
            fingerprint: fingerprint.into(),
            request,
            reply,
            token_secret,
        });
        let i = out
            .replies
            .iter()
            .position(|(r, _)| *r == reply)
            .expect("every request is answered");
        let (_, resp) = out.replies.remove(i);
        let resp = match resp {
            Reply::Answer(answer) => OpResponse::Ok {
                json: serde_json::to_string(&answer).expect("answers render"),
            },
            Reply::Error(e) => OpResponse::Error(e),
            Reply::Stats(s) => OpResponse::Ok {
                json: serde_json::to_string(&s).expect("stats render"),
            },
            Reply::Enroll(_) => panic!("an operator request got an enrollment reply"),
        };
        (resp, out)
    }

    fn submit_resp(&mut self, r: SubmitRequest) -> (OpResponse, Output) {
        self.op(ADMIN, OpRequest::Submit(r))
    }

    fn submit(&mut self, r: SubmitRequest) -> (TaskId, Output) {
        let (resp, out) = self.submit_resp(r);
        let v = json_ok(&resp);
        (TaskId(v["id"].as_u64().expect("a task id")), out)
    }

    fn agent_json(&mut self, name: &str) -> Value {
        let (resp, _) = self.op(ADMIN, OpRequest::Agents);
        let v = json_ok(&resp);
        v["agents"]
            .as_array()
            .expect("an agents array")
            .iter()
            .find(|a| a["name"] == name)
            .cloned()
            .expect("the agent is listed")
    }

    fn enroll_input(&mut self, hash: &str, role: Role, name: &str, key: &str) -> EnrollResponse {
        self.enroll_asking(hash, role, name, key, (Vec::new(), 1))
    }

    /// An enrollment asking for a grant; the certificate fingerprint is `fp-<name>-<key>`
    /// when `key` starts with `k:` (several identities of one name), else `fp-<name>`.
    fn enroll_asking(
        &mut self,
        hash: &str,
        role: Role,
        name: &str,
        key: &str,
        grant: (Vec<String>, u32),
    ) -> EnrollResponse {
        let fp = match key.strip_prefix("k:") {
            Some(k) => format!("fp-{name}-{k}"),
            None => format!("fp-{name}"),
        };
        let reply = ReplyId(self.next_reply);
        self.next_reply += 1;
        let mut out = self.step(Input::Enroll {
            secret_hash: hash.into(),
            role,
            name: name.into(),
            cert: (format!("PEM {name}"), fp, key.to_string()),
            grant,
            reply,
        });
        let (_, resp) = out.replies.pop().expect("an enrollment answer");
        let Reply::Enroll(resp) = resp else {
            panic!("an enrollment got an operator reply");
        };
        resp
    }

    fn task(&self, id: TaskId) -> &TaskRecord {
        self.store.tasks.get(&id).expect("the task was written")
    }

    fn attempt(&self, id: TaskId, generation: u64) -> &AttemptRecord {
        self.store
            .attempts
            .get(&(id, Generation(generation)))
            .expect("the attempt was written")
    }
}

// === Free helpers ===

fn req(title: &str) -> SubmitRequest {
    SubmitRequest {
        title: title.into(),
        description: String::new(),
        capabilities: Vec::new(),
        priority: 0,
        max_attempts: None,
        timeout_ms: None,
        timeout_action: TimeoutAction::Fail,
        after: Vec::new(),
        key: None,
        ..Default::default()
    }
}

fn req_caps(title: &str, caps: &[&str]) -> SubmitRequest {
    SubmitRequest {
        capabilities: caps.iter().map(|c| c.to_string()).collect(),
        ..req(title)
    }
}

fn held(task: TaskId, generation: u64, phase: Phase) -> HeldTask {
    HeldTask {
        task,
        generation: Generation(generation),
        phase,
    }
}

fn merge(into: &mut Output, from: Output) {
    into.writes.extend(from.writes);
    into.sends.extend(from.sends);
    into.replies.extend(from.replies);
    into.closes.extend(from.closes);
    into.alerts.extend(from.alerts);
    into.dispatch_ms.extend(from.dispatch_ms);
}

/// A typed document as the shell renders it, parsed back.
fn json_of<T: serde::Serialize>(doc: &T) -> Value {
    let text = serde_json::to_string(doc).expect("documents render");
    serde_json::from_str(&text).expect("valid JSON")
}

/// Checks that a document's JSON lists its keys in alphabetical order at every
/// level: a `Value` sorts its map keys, so rendering through one changes nothing.
fn assert_keys_sorted<T: serde::Serialize>(doc: &T) {
    let text = serde_json::to_string(doc).expect("documents render");
    let sorted = serde_json::to_value(doc)
        .expect("documents render")
        .to_string();
    assert_eq!(text, sorted, "keys out of alphabetical order");
}

/// The alerts of an output as `alert_command` gets them.
fn alerts_json(out: &Output) -> Vec<Value> {
    out.alerts.iter().map(json_of).collect()
}

fn json_ok(resp: &OpResponse) -> Value {
    match resp {
        OpResponse::Ok { json } => serde_json::from_str(json).expect("valid JSON"),
        other => panic!("expected Ok, got {other:?}"),
    }
}

fn op_err(resp: &OpResponse) -> &OpError {
    match resp {
        OpResponse::Error(e) => e,
        other => panic!("expected an error, got {other:?}"),
    }
}

fn sends_to(out: &Output, conn: ConnId) -> Vec<&HubMsg> {
    out.sends
        .iter()
        .filter(|(c, _)| *c == conn)
        .map(|(_, m)| m)
        .collect()
}

fn assigns(out: &Output, conn: ConnId) -> Vec<Assign> {
    sends_to(out, conn)
        .into_iter()
        .filter_map(|m| match m {
            HubMsg::Assign(a) => Some(a.clone()),
            _ => None,
        })
        .collect()
}

fn all_assigns(out: &Output) -> Vec<(ConnId, Assign)> {
    out.sends
        .iter()
        .filter_map(|(c, m)| match m {
            HubMsg::Assign(a) => Some((*c, a.clone())),
            _ => None,
        })
        .collect()
}

fn abandons(out: &Output, conn: ConnId) -> Vec<(TaskId, Generation)> {
    sends_to(out, conn)
        .into_iter()
        .filter_map(|m| match m {
            HubMsg::Abandon {
                task, generation, ..
            } => Some((*task, *generation)),
            _ => None,
        })
        .collect()
}

fn acks(out: &Output, conn: ConnId) -> Vec<ReportId> {
    sends_to(out, conn)
        .into_iter()
        .filter_map(|m| match m {
            HubMsg::Ack { upto } => Some(*upto),
            _ => None,
        })
        .collect()
}

fn task_writes(out: &Output, id: TaskId) -> Vec<&TaskRecord> {
    out.writes
        .iter()
        .filter_map(|w| match w {
            Write::Task(t) if t.id == id => Some(t),
            _ => None,
        })
        .collect()
}

fn refused(out: &Output, conn: ConnId) -> Option<Refused> {
    sends_to(out, conn).into_iter().find_map(|m| match m {
        HubMsg::Refused(r) => Some(r.clone()),
        _ => None,
    })
}

fn failure(reason: &str) -> Failure {
    Failure {
        reason: reason.into(),
        ..Failure::default()
    }
}

/// A hub with one agent `a` (one slot, no capabilities) and one task assigned to it.
fn one_assigned() -> (H, ConnId, TaskId) {
    let mut h = H::new();
    let (c, _) = h.connect(1, "a", &[], 1);
    let (t, out) = h.submit(req("t"));
    assert_eq!(assigns(&out, c).len(), 1);
    (h, c, t)
}

/// As [`one_assigned`], with the task accepted and started.
fn one_running() -> (H, ConnId, TaskId) {
    let (mut h, c, t) = one_assigned();
    let _ = h.accept(c, t, 1);
    let _ = h.start(c, t, 1);
    assert_eq!(h.task(t).state, TaskState::Running);
    (h, c, t)
}

// === Sessions: hello ===

#[test]
fn hello_from_enrolled_agent_gets_welcome_first() {
    let mut h = H::new();
    // Work is waiting, so the hello's output also carries an assignment: Welcome must come first.
    let (t, _) = h.submit(req("t"));
    let (c, out) = h.connect(1, "a", &["rust"], 2);
    let msgs = sends_to(&out, c);
    assert!(matches!(msgs.first(), Some(HubMsg::Welcome(w)) if w.heartbeat_interval_ms == 10_000));
    assert!(out.closes.is_empty());
    assert_eq!(assigns(&out, c).len(), 1);
    assert_eq!(assigns(&out, c)[0].task, t);
    // The registry records the hello.
    let rec = &h.store.agents["a"];
    assert_eq!(rec.capabilities, vec!["rust".to_string()]);
    assert_eq!(rec.slots, 2);
    let a = h.agent_json("a");
    assert_eq!(a["state"], "online");
}

#[test]
fn hello_with_unknown_fingerprint_is_refused_and_closed() {
    let mut h = H::new();
    let out = h.hello_as(1, "fp-nobody", "nobody", &[], 1, Vec::new());
    assert!(matches!(
        refused(&out, ConnId(1)),
        Some(Refused::Forbidden { .. })
    ));
    assert_eq!(out.closes, vec![ConnId(1)]);
    assert!(
        !sends_to(&out, ConnId(1))
            .iter()
            .any(|m| matches!(m, HubMsg::Welcome(_)))
    );
}

#[test]
fn hello_with_revoked_identity_is_refused_and_closed() {
    let mut h = H::new();
    h.core.add_identity(Identity {
        name: "a".into(),
        role: Role::Agent,
        fingerprint: "fp-a".into(),
        key_fingerprint: "key-a".into(),
        created_at: T0,
        revoked_at: Some(T0),
        capabilities: Vec::new(),
        slots: 1,
    });
    let _ = h.flush();
    let out = h.hello(1, "a", &[], 1, Vec::new());
    assert_eq!(refused(&out, ConnId(1)), Some(Refused::Revoked));
    assert_eq!(out.closes, vec![ConnId(1)]);
}

#[test]
fn hello_with_operator_credential_is_refused_and_closed() {
    let mut h = H::new();
    let out = h.hello_as(1, OPERATOR, "ops", &[], 1, Vec::new());
    match refused(&out, ConnId(1)) {
        Some(Refused::Forbidden { reason }) => assert!(reason.contains("operator"), "{reason}"),
        other => panic!("expected Forbidden, got {other:?}"),
    }
    assert_eq!(out.closes, vec![ConnId(1)]);
}

#[test]
fn hello_naming_another_agent_is_refused_and_closed() {
    let mut h = H::new();
    h.enroll("a");
    let out = h.hello_as(1, "fp-a", "b", &[], 1, Vec::new());
    match refused(&out, ConnId(1)) {
        Some(Refused::BadHello { reason }) => {
            assert!(
                reason.contains("\"a\"") && reason.contains("\"b\""),
                "{reason}"
            );
        }
        other => panic!("expected BadHello, got {other:?}"),
    }
    assert_eq!(out.closes, vec![ConnId(1)]);
    // No agent named b was created.
    assert!(!h.store.agents.contains_key("b"));
}

// === Scheduling ===

#[test]
fn submit_is_assigned_to_an_agent_with_the_capabilities() {
    let mut h = H::new();
    let (c, _) = h.connect(1, "a", &["rust", "linux"], 1);
    let (t, out) = h.submit(req_caps("build", &["rust"]));
    let a = assigns(&out, c);
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].task, t);
    assert_eq!(a[0].generation, Generation(1));
    assert_eq!(a[0].spec.title, "build");
    assert_eq!(a[0].spec.capabilities, vec!["rust".to_string()]);
    let rec = h.task(t);
    assert_eq!(rec.state, TaskState::Assigned);
    assert_eq!(rec.agent.as_deref(), Some("a"));
    assert_eq!(rec.attempts, 1);
    assert_eq!(h.attempt(t, 1).agent, "a");
}

#[test]
fn task_needing_a_capability_nobody_has_stays_queued() {
    let mut h = H::new();
    let (c, _) = h.connect(1, "a", &["rust"], 4);
    let (t, out) = h.submit(req_caps("train", &["gpu"]));
    assert!(assigns(&out, c).is_empty());
    assert_eq!(h.task(t).state, TaskState::Queued);
    let out = h.pass(30_000);
    assert!(all_assigns(&out).is_empty());
    assert_eq!(h.task(t).state, TaskState::Queued);
    // A task needing two capabilities, of which the agent has one, also waits.
    let (t2, out) = h.submit(req_caps("both", &["rust", "gpu"]));
    assert!(all_assigns(&out).is_empty());
    assert_eq!(h.task(t2).state, TaskState::Queued);
    // An agent with the capability arrives and gets both.
    let (g, out) = h.connect(2, "g", &["gpu", "rust"], 2);
    let got: Vec<TaskId> = assigns(&out, g).iter().map(|a| a.task).collect();
    assert_eq!(got, vec![t, t2]);
}

#[test]
fn capability_routing_picks_the_agent_that_has_it() {
    let mut h = H::new();
    // "a-plain" sorts first and is equally loaded: only the capability can send the task to b.
    let (plain, _) = h.connect(1, "a-plain", &["rust"], 2);
    let (gpu, _) = h.connect(2, "b-gpu", &["rust", "gpu"], 2);
    let (t, out) = h.submit(req_caps("train", &["gpu"]));
    assert!(assigns(&out, plain).is_empty());
    assert_eq!(assigns(&out, gpu).len(), 1);
    assert_eq!(h.task(t).agent.as_deref(), Some("b-gpu"));
    // A task with no requirement goes to the less loaded agent.
    let (t2, out) = h.submit(req("any"));
    assert_eq!(assigns(&out, plain).len(), 1);
    assert_eq!(h.task(t2).agent.as_deref(), Some("a-plain"));
}

#[test]
fn order_is_priority_then_fresh_before_retried_then_submission() {
    let mut h = H::new();
    let (c, _) = h.connect(1, "a", &[], 1);
    // R is submitted first and fails once, so it is a retried task.
    let (r, _) = h.submit(req("retried"));
    let _ = h.accept(c, r, 1);
    let _ = h.start(c, r, 1);
    let (resp, _) = h.op(ADMIN, OpRequest::AgentDrain { name: "a".into() });
    let _ = json_ok(&resp);
    let _ = h.fail(c, r, 1, false);
    assert_eq!(h.task(r).state, TaskState::Queued);
    // While the agent is drained, fresh tasks arrive.
    let (f1, _) = h.submit(req("fresh 1"));
    let (f2, _) = h.submit(req("fresh 2"));
    let (hi, _) = h.submit(SubmitRequest {
        priority: 5,
        ..req("high")
    });
    let (lo, _) = h.submit(SubmitRequest {
        priority: -1,
        ..req("low")
    });
    // Let R's backoff pass so that it is ready too.
    let out = h.pass(60_000);
    assert!(all_assigns(&out).is_empty());
    let (resp, out) = h.op(ADMIN, OpRequest::AgentUndrain { name: "a".into() });
    let _ = json_ok(&resp);
    let mut order = Vec::new();
    let mut next = assigns(&out, c);
    while let Some(a) = next.pop() {
        assert!(next.is_empty());
        order.push(a.task);
        let out = h.run_ok(c, a.task, a.generation.0);
        next = assigns(&out, c);
    }
    assert_eq!(order, vec![hi, f1, f2, r, lo]);
}

#[test]
fn prefers_an_agent_that_has_not_failed_the_task() {
    let mut h = H::new();
    let (a, _) = h.connect(1, "a", &[], 1);
    let (b, _) = h.connect(2, "b", &[], 1);
    let (t, out) = h.submit(req("t"));
    // Equal load: the tie goes to "a".
    assert_eq!(assigns(&out, a).len(), 1);
    let _ = h.accept(a, t, 1);
    let _ = h.start(a, t, 1);
    let _ = h.fail(a, t, 1, false);
    let out = h.pass(30_000);
    let got = assigns(&out, b);
    assert_eq!(got.len(), 1, "{:?}", out.sends);
    assert_eq!(got[0].generation, Generation(2));
    assert!(assigns(&out, a).is_empty());
}

#[test]
fn prefers_the_least_loaded_agent() {
    let mut h = H::new();
    let (a, _) = h.connect(1, "a", &[], 3);
    let (b, _) = h.connect(2, "b", &[], 3);
    let (t1, out) = h.submit(req("1"));
    assert_eq!(assigns(&out, a).len(), 1);
    let (t2, out) = h.submit(req("2"));
    assert_eq!(assigns(&out, b).len(), 1, "a has one task, b none");
    let (_, out) = h.submit(req("3"));
    assert_eq!(assigns(&out, a).len(), 1);
    // b finishes its task: now b is the least loaded.
    let _ = h.run_ok(b, t2, 1);
    let (_, out) = h.submit(req("4"));
    assert_eq!(assigns(&out, b).len(), 1);
    assert_eq!(h.task(t1).agent.as_deref(), Some("a"));
}

#[test]
fn several_tasks_go_at_once_to_an_agent_with_several_free_slots() {
    let mut h = H::new();
    let ids: Vec<TaskId> = (0..5).map(|i| h.submit(req(&format!("t{i}"))).0).collect();
    let (c, out) = h.connect(1, "a", &[], 3);
    // One input, several assignments, never more than the slots.
    let got: Vec<TaskId> = assigns(&out, c).iter().map(|a| a.task).collect();
    assert_eq!(got, ids[..3].to_vec());
    assert_eq!(h.task(ids[3]).state, TaskState::Queued);
    let out = h.pass(20_000);
    assert!(all_assigns(&out).is_empty(), "all slots are busy");
    // One slot frees: exactly one more.
    let out = h.run_ok(c, ids[0], 1);
    let got: Vec<TaskId> = assigns(&out, c).iter().map(|a| a.task).collect();
    assert_eq!(got, vec![ids[3]]);
    // Two slots free in one batch: the last task only, one Assign.
    let (_, r1) = h.report_input(
        c,
        ids[1],
        1,
        ReportBody::Finished {
            outcome: Outcome::Completed,
            result: None,
            error: None,
            work: None,
        },
    );
    let (_, r2) = h.report_input(
        c,
        ids[2],
        1,
        ReportBody::Finished {
            outcome: Outcome::Completed,
            result: None,
            error: None,
            work: None,
        },
    );
    let out = h.batch(vec![r1, r2]);
    let got: Vec<TaskId> = assigns(&out, c).iter().map(|a| a.task).collect();
    assert_eq!(got, vec![ids[4]]);
    assert_eq!(h.task(ids[1]).state, TaskState::Completed);
    assert_eq!(h.task(ids[2]).state, TaskState::Completed);
}

#[test]
fn an_agent_with_zero_slots_gets_nothing() {
    let mut h = H::new();
    let (c, _) = h.connect(1, "a", &[], 0);
    let (t, out) = h.submit(req("t"));
    assert!(assigns(&out, c).is_empty());
    assert_eq!(h.task(t).state, TaskState::Queued);
}

// === Fencing ===

#[test]
fn each_assignment_gets_the_next_generation() {
    let mut h = H::new();
    let (c, _) = h.connect(1, "a", &[], 1);
    let (t, out) = h.submit(req("t"));
    let mut gens = vec![assigns(&out, c)[0].generation];
    for _ in 0..2 {
        let g = gens.last().expect("one generation").0;
        let _ = h.accept(c, t, g);
        let _ = h.fail(c, t, g, false);
        // Longer than the backoff, shorter than the acceptance timeout.
        let out = h.pass(30_000);
        let a = assigns(&out, c);
        assert_eq!(a.len(), 1);
        gens.push(a[0].generation);
        assert_eq!(h.task(t).generation, a[0].generation);
    }
    assert_eq!(gens, vec![Generation(1), Generation(2), Generation(3)]);
    assert_eq!(h.task(t).attempts, 3);
}

#[test]
fn a_report_for_an_old_generation_is_answered_with_abandon() {
    let mut h = H::new();
    let (a, _) = h.connect(1, "a", &[], 1);
    let (b, _) = h.connect(2, "b", &[], 1);
    let (t, _) = h.submit(req("t"));
    let _ = h.accept(a, t, 1);
    let _ = h.fail(a, t, 1, false);
    let out = h.pass(30_000);
    assert_eq!(assigns(&out, b).len(), 1);
    assert_eq!(h.task(t).generation, Generation(2));
    // A late Started for generation 1 from a.
    let stale = h.core.counters().stale_reports;
    let out = h.start(a, t, 1);
    assert_eq!(abandons(&out, a), vec![(t, Generation(1))]);
    assert!(
        task_writes(&out, t).is_empty(),
        "a stale report changes nothing"
    );
    assert_eq!(h.core.counters().stale_reports, stale + 1);
    assert_eq!(h.task(t).state, TaskState::Assigned);
    assert_eq!(h.task(t).agent.as_deref(), Some("b"));
}

#[test]
fn a_report_from_the_wrong_agent_is_answered_with_abandon() {
    let mut h = H::new();
    let (a, _) = h.connect(1, "a", &[], 1);
    let (b, _) = h.connect(2, "b", &[], 0);
    let (t, _) = h.submit(req("t"));
    assert_eq!(h.task(t).agent.as_deref(), Some("a"));
    let out = h.accept(b, t, 1);
    assert_eq!(abandons(&out, b), vec![(t, Generation(1))]);
    assert!(abandons(&out, a).is_empty());
    assert!(task_writes(&out, t).is_empty());
    assert_eq!(h.task(t).state, TaskState::Assigned);
    // The right agent can still accept.
    let out = h.accept(a, t, 1);
    assert!(abandons(&out, a).is_empty());
    assert_eq!(h.task(t).state, TaskState::Accepted);
}

#[test]
fn a_report_for_an_unknown_task_is_abandoned_and_acked() {
    let mut h = H::new();
    let (c, _) = h.connect(1, "a", &[], 1);
    let out = h.accept(c, TaskId(999), 1);
    assert_eq!(abandons(&out, c), vec![(TaskId(999), Generation(1))]);
}

#[test]
fn a_repeated_report_is_a_no_op_but_acked() {
    let (mut h, c, t) = one_assigned();
    let (id, input) = h.report_input(c, t, 1, ReportBody::Accepted);
    let out = h.report_raw(c, t, 1, id, input);
    assert_eq!(task_writes(&out, t).len(), 1);
    // The sidecar resends the same report (same id), e.g. after a lost ack.
    let input = Input::Session {
        conn: c,
        msg: SessionMsg::Report(Report {
            id,
            task: t,
            generation: Generation(1),
            body: ReportBody::Accepted,
        }),
    };
    let out = h.report_raw(c, t, 1, id, input);
    assert_eq!(acks(&out, c), vec![id]);
    assert!(
        out.writes.is_empty(),
        "no second state change: {:?}",
        out.writes
    );
    assert!(abandons(&out, c).is_empty());
    assert_eq!(h.core.counters().duplicate_reports, 1);
    // Started twice: one state change.
    let _ = h.start(c, t, 1);
    let started_at = h.attempt(t, 1).started_at;
    h.advance(1_000);
    let out = h.start(c, t, 1);
    assert!(out.writes.is_empty());
    assert_eq!(h.attempt(t, 1).started_at, started_at);
    // A failure reported twice in one batch counts once.
    let body = ReportBody::Finished {
        outcome: Outcome::Failed,
        result: None,
        error: Some(failure("boom")),
        work: None,
    };
    let (_, f1) = h.report_input(c, t, 1, body.clone());
    let (last, f2) = h.report_input(c, t, 1, body);
    let out = h.batch(vec![f1, f2]);
    assert_eq!(acks(&out, c), vec![last]);
    assert_eq!(h.core.counters().outcomes.get(&Outcome::Failed), Some(&1));
    assert_eq!(h.task(t).attempts, 1);
    assert_eq!(h.task(t).state, TaskState::Queued);
    let queued_writes = task_writes(&out, t).len();
    assert_eq!(
        queued_writes, 1,
        "one state change for two identical reports"
    );
}

#[test]
fn a_repeated_final_report_after_the_task_ended_is_only_acked() {
    // The ack of a Finished report was lost; the sidecar resends it after the
    // hub committed it. It is a repeat of (task, generation, kind): a no-op.
    let (mut h, c, t) = one_running();
    let (id, input) = h.report_input(
        c,
        t,
        1,
        ReportBody::Finished {
            outcome: Outcome::Completed,
            result: Some("ok".into()),
            error: None,
            work: None,
        },
    );
    let _ = h.report_raw(c, t, 1, id, input);
    assert_eq!(h.task(t).state, TaskState::Completed);
    let repeat = Input::Session {
        conn: c,
        msg: SessionMsg::Report(Report {
            id,
            task: t,
            generation: Generation(1),
            body: ReportBody::Finished {
                outcome: Outcome::Completed,
                result: Some("ok".into()),
                error: None,
                work: None,
            },
        }),
    };
    let out = h.report_raw(c, t, 1, id, repeat);
    assert_eq!(acks(&out, c), vec![id]);
    assert!(task_writes(&out, t).is_empty());
    assert_eq!(h.core.counters().completed, 1);
    assert!(
        abandons(&out, c).is_empty(),
        "a repeat of a handled final report is a no-op, not a stale report"
    );
}

#[test]
fn a_ran_report_records_the_acceptance_the_start_and_the_end_at_once() {
    let (mut h, c, t) = one_assigned();
    let out = h.report(
        c,
        t,
        1,
        ReportBody::Ran {
            pid: Some(77),
            session: Some("s".repeat(muster_wire::limits::SESSION_BYTES_MAX + 10)),
            outcome: Outcome::Completed,
            result: Some("ok".into()),
            error: None,
            work: None,
        },
    );
    let rec = h.task(t);
    assert_eq!(rec.state, TaskState::Completed);
    assert_eq!(rec.result.as_deref(), Some("ok"));
    let a = h.attempt(t, 1);
    assert!(a.accepted_at.is_some() && a.started_at.is_some() && a.ended_at.is_some());
    assert_eq!(a.pid, Some(77));
    assert_eq!(
        a.session.as_ref().map(String::len),
        Some(muster_wire::limits::SESSION_BYTES_MAX),
        "the session name is bounded as in `Started`"
    );
    assert_eq!(a.outcome, Some(Outcome::Completed));
    // The verified start is still its own change, so watchers see `running`.
    let changes: Vec<(String, String)> = out
        .writes
        .iter()
        .filter_map(|w| match w {
            Write::Event { event, .. } => Some(json_of(event)),
            _ => None,
        })
        .filter(|e| e["kind"] == "task")
        .map(|e| (e["from"].to_string(), e["state"].to_string()))
        .collect();
    assert_eq!(
        changes,
        [
            ("\"assigned\"".to_string(), "\"running\"".to_string()),
            ("\"running\"".to_string(), "\"completed\"".to_string())
        ]
    );
    assert_eq!(out.dispatch_ms.len(), 1, "it counts as dispatched");
    assert_eq!(h.core.counters().completed, 1);
    // Its repeat, or a late `Started` of the same attempt, changes nothing.
    let dups = h.core.counters().duplicate_reports;
    let (_, again) = h.report_input(
        c,
        t,
        1,
        ReportBody::Ran {
            pid: Some(77),
            session: None,
            outcome: Outcome::Completed,
            result: None,
            error: None,
            work: None,
        },
    );
    let out = h.step(again);
    assert!(task_writes(&out, t).is_empty());
    assert!(abandons(&out, c).is_empty());
    assert_eq!(h.core.counters().duplicate_reports, dups + 1);
    assert_eq!(h.core.counters().completed, 1);
}

// === Acknowledgements ===

#[test]
fn every_report_is_acked_once_per_connection_with_the_highest_id() {
    let mut h = H::new();
    let (a, _) = h.connect(1, "a", &[], 2);
    let (b, _) = h.connect(2, "b", &[], 2);
    let (t1, _) = h.submit(req("1"));
    let (t2, _) = h.submit(req("2"));
    assert_eq!(h.task(t1).agent.as_deref(), Some("a"));
    assert_eq!(h.task(t2).agent.as_deref(), Some("b"));
    let mk = |id: u64, conn: ConnId, task: TaskId, body: ReportBody| Input::Session {
        conn,
        msg: SessionMsg::Report(Report {
            id: ReportId(id),
            task,
            generation: Generation(1),
            body,
        }),
    };
    let out = h.batch(vec![
        mk(5, a, t1, ReportBody::Accepted),
        mk(40, b, t2, ReportBody::Accepted),
        mk(
            7,
            a,
            t1,
            ReportBody::Started {
                pid: None,
                session: None,
            },
        ),
        mk(
            41,
            b,
            t2,
            ReportBody::Progress {
                note: "half".into(),
            },
        ),
        // Stale (unknown task): acked too, and answered with Abandon.
        mk(6, a, TaskId(77), ReportBody::Accepted),
    ]);
    assert_eq!(acks(&out, a), vec![ReportId(7)]);
    assert_eq!(acks(&out, b), vec![ReportId(41)]);
    assert_eq!(abandons(&out, a), vec![(TaskId(77), Generation(1))]);
    assert_eq!(h.task(t1).state, TaskState::Running);
    assert_eq!(h.task(t2).state, TaskState::Accepted);
    assert_eq!(h.task(t2).progress_note.as_deref(), Some("half"));
    // A report on a connection the hub does not know is neither handled nor acked.
    let out = h.step(mk(9, ConnId(99), t1, ReportBody::Accepted));
    assert!(out.sends.is_empty());
}

#[test]
fn acks_wait_for_the_final_report_or_the_delay_so_the_happy_path_is_five_messages() {
    let mut h = H::new();
    h.core.set_ack_delay(1000);
    let (c, _) = h.connect(1, "a", &[], 1);
    let (t, out) = h.submit(req("t"));
    let mut sent = assigns(&out, c).len();
    let (_, accepted) = h.report_input(c, t, 1, ReportBody::Accepted);
    let out = h.step(accepted);
    assert!(acks(&out, c).is_empty(), "the Accepted ack waits");
    sent += sends_to(&out, c).len();
    let (_, started) = h.report_input(
        c,
        t,
        1,
        ReportBody::Started {
            pid: None,
            session: None,
        },
    );
    let out = h.step(started);
    sent += sends_to(&out, c).len();
    let finished = ReportBody::Finished {
        outcome: Outcome::Completed,
        result: None,
        error: None,
        work: None,
    };
    let (last, input) = h.report_input(c, t, 1, finished);
    let out = h.step(input);
    assert_eq!(
        acks(&out, c),
        vec![last],
        "the final report is acked at once, covering the others"
    );
    sent += sends_to(&out, c).len();
    // Assign + Accepted + Started + Finished + one Ack.
    assert_eq!(sent + 3, 5);
    // A lone non-final report is acked by a tick once the delay has passed.
    let (t2, _) = h.submit(req("t2"));
    let (id, input) = h.report_input(c, t2, 1, ReportBody::Accepted);
    let out = h.step(input);
    assert!(acks(&out, c).is_empty());
    let out = h.step(Input::Tick);
    assert!(acks(&out, c).is_empty(), "not before the delay");
    h.now += 1000;
    let out = h.step(Input::Tick);
    assert_eq!(acks(&out, c), vec![id]);
}

// === The happy path ===

#[test]
fn accepted_running_completed_frees_the_slot_and_assigns_the_next() {
    let mut h = H::new();
    let (c, _) = h.connect(1, "a", &[], 1);
    let (t1, _) = h.submit(req("1"));
    let (t2, out) = h.submit(req("2"));
    assert!(assigns(&out, c).is_empty(), "one slot");
    assert_eq!(h.task(t2).state, TaskState::Queued);
    h.advance(1_000);
    let _ = h.accept(c, t1, 1);
    assert_eq!(h.task(t1).state, TaskState::Accepted);
    assert_eq!(h.attempt(t1, 1).accepted_at, Some(T0 + 1_000));
    h.advance(1_000);
    let _ = h.start(c, t1, 1);
    assert_eq!(h.task(t1).state, TaskState::Running);
    assert_eq!(h.attempt(t1, 1).started_at, Some(T0 + 2_000));
    assert_eq!(h.attempt(t1, 1).pid, Some(4242));
    h.advance(1_000);
    let out = h.complete(c, t1, 1);
    let rec = h.task(t1);
    assert_eq!(rec.state, TaskState::Completed);
    assert_eq!(rec.result.as_deref(), Some("done"));
    assert_eq!(rec.reason, None);
    assert_eq!(h.attempt(t1, 1).outcome, Some(Outcome::Completed));
    assert_eq!(h.attempt(t1, 1).ended_at, Some(T0 + 3_000));
    // The slot is free: the next task goes out in the same output.
    let a = assigns(&out, c);
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].task, t2);
    assert!(abandons(&out, c).is_empty());
    assert_eq!(h.core.counters().completed, 1);
    assert_eq!(h.core.live_tasks(), 1);
    let a = h.agent_json("a");
    assert_eq!(a["tasks"], 1);
}

// === Retries ===

#[test]
fn a_failure_retries_with_backoff_until_max_attempts() {
    let policy = Policy::default();
    let initial = policy.backoff_initial.as_millis() as u64;
    let factor = u64::from(policy.backoff_factor);
    let mut h = H::new();
    let (c, _) = h.connect(1, "a", &[], 1);
    let (t, _) = h.submit(req("t"));

    // Attempt 1 fails: backoff ≈ initial ±20 %.
    let _ = h.accept(c, t, 1);
    let out = h.fail(c, t, 1, false);
    assert!(assigns(&out, c).is_empty(), "not before the backoff");
    assert!(
        abandons(&out, c).is_empty(),
        "a reported failure needs no Abandon"
    );
    let rec = h.task(t).clone();
    assert_eq!(rec.state, TaskState::Queued);
    assert_eq!(rec.reason.as_deref(), Some("exit status 3"));
    let delay = rec.not_before.expect("a backoff") - h.now;
    assert!(
        (initial * 8 / 10..=initial * 12 / 10).contains(&delay),
        "first backoff {delay} ms"
    );
    assert_eq!(h.attempt(t, 1).outcome, Some(Outcome::Failed));
    assert_eq!(
        h.attempt(t, 1).error.as_ref().and_then(|e| e.exit_code),
        Some(3)
    );
    // Nothing before not_before, the retry at it.
    h.advance(delay - 1);
    let _ = h.heartbeat(c, true);
    assert!(all_assigns(&h.tick()).is_empty());
    h.advance(1);
    let out = h.tick();
    assert_eq!(assigns(&out, c).len(), 1);
    assert_eq!(assigns(&out, c)[0].generation, Generation(2));
    assert_eq!(h.task(t).not_before, None);

    // Attempt 2 fails: backoff ≈ initial × factor ±20 %.
    let _ = h.accept(c, t, 2);
    let _ = h.fail(c, t, 2, false);
    let delay = h.task(t).not_before.expect("a backoff") - h.now;
    let second = initial * factor;
    assert!(
        (second * 8 / 10..=second * 12 / 10).contains(&delay),
        "second backoff {delay} ms"
    );
    let out = h.pass(delay + 5_000);
    assert_eq!(assigns(&out, c).len(), 1);

    // Attempt 3 of 3 fails: the task fails for good, naming the attempts.
    let _ = h.accept(c, t, 3);
    let out = h.fail(c, t, 3, false);
    assert!(assigns(&out, c).is_empty());
    let rec = h.task(t);
    assert_eq!(rec.state, TaskState::Failed);
    assert_eq!(rec.attempts, 3);
    let reason = rec.reason.clone().expect("a reason");
    assert!(reason.contains("exit status 3"), "{reason}");
    assert!(reason.contains("attempt 3 of 3"), "{reason}");
    assert_eq!(h.core.live_tasks(), 0);
    let out = h.pass(20 * 60_000);
    assert!(all_assigns(&out).is_empty());
}

#[test]
fn backoff_grows_by_the_factor_and_is_capped() {
    let policy = Policy {
        max_attempts: 6,
        backoff_initial: Duration::from_secs(5),
        backoff_factor: 4,
        backoff_max: Duration::from_secs(30),
        ..Policy::default()
    };
    let mut h = H::with(policy, Limits::default());
    let (c, _) = h.connect(1, "a", &[], 1);
    let (t, _) = h.submit(req("t"));
    let expected = [5_000u64, 20_000, 30_000, 30_000];
    for (i, base) in expected.iter().enumerate() {
        let g = i as u64 + 1;
        let _ = h.accept(c, t, g);
        let _ = h.fail(c, t, g, false);
        let delay = h.task(t).not_before.expect("a backoff") - h.now;
        assert!(
            (base * 8 / 10..=base * 12 / 10).contains(&delay),
            "attempt {g}: backoff {delay} ms, expected {base} ±20 %"
        );
        let out = h.pass(delay + 5_000);
        assert_eq!(assigns(&out, c).len(), 1, "attempt {} assigned", g + 1);
    }
}

#[test]
fn a_no_retry_failure_ends_the_task_at_once() {
    let (mut h, c, t) = one_running();
    let out = h.fail(c, t, 1, true);
    let rec = h.task(t);
    assert_eq!(rec.state, TaskState::Failed);
    assert_eq!(rec.attempts, 1);
    assert_eq!(rec.reason.as_deref(), Some("exit status 3"));
    assert!(assigns(&out, c).is_empty());
    let out = h.pass(20 * 60_000);
    assert!(all_assigns(&out).is_empty());
}

// === Timeouts ===

#[test]
fn accept_timeout_abandons_and_requeues() {
    let mut h = H::new();
    let (a, _) = h.connect(1, "a", &[], 1);
    let (b, _) = h.connect(2, "b", &[], 1);
    let (t, _) = h.submit(req("t"));
    assert_eq!(h.task(t).agent.as_deref(), Some("a"));
    h.advance(29_999);
    let _ = h.heartbeat(a, true);
    let _ = h.heartbeat(b, true);
    let out = h.tick();
    assert!(abandons(&out, a).is_empty());
    assert_eq!(h.task(t).state, TaskState::Assigned);
    h.advance(1);
    let out = h.tick();
    assert_eq!(abandons(&out, a), vec![(t, Generation(1))]);
    assert_eq!(h.attempt(t, 1).outcome, Some(Outcome::AcceptTimeout));
    let rec = h.task(t);
    assert_eq!(rec.state, TaskState::Queued);
    assert!(rec.not_before.is_some());
    // After the backoff it goes to the other agent.
    let out = h.pass(30_000);
    let got = assigns(&out, b);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].generation, Generation(2));
    // The late Accepted of generation 1 is abandoned.
    let out = h.accept(a, t, 1);
    assert_eq!(abandons(&out, a), vec![(t, Generation(1))]);
}

#[test]
fn start_timeout_abandons_and_requeues() {
    let (mut h, c, t) = one_assigned();
    h.advance(5_000);
    let _ = h.accept(c, t, 1);
    h.advance(59_999);
    let _ = h.heartbeat(c, true);
    let out = h.tick();
    assert!(abandons(&out, c).is_empty());
    assert_eq!(h.task(t).state, TaskState::Accepted);
    h.advance(1);
    let out = h.tick();
    assert_eq!(abandons(&out, c), vec![(t, Generation(1))]);
    assert_eq!(h.attempt(t, 1).outcome, Some(Outcome::StartTimeout));
    assert_eq!(h.task(t).state, TaskState::Queued);
}

#[test]
fn progress_before_the_start_pushes_the_start_deadline_as_a_workspace_is_made() {
    let (mut h, c, t) = one_assigned();
    let _ = h.accept(c, t, 1);
    // The sidecar reports progress while it clones: each report restarts the clock.
    for _ in 0..3 {
        h.advance(50_000);
        let _ = h.report(
            c,
            t,
            1,
            ReportBody::Progress {
                note: "preparing a git worktree".into(),
            },
        );
        let _ = h.heartbeat(c, true);
        assert!(abandons(&h.tick(), c).is_empty());
    }
    assert_eq!(h.task(t).state, TaskState::Accepted);
    // Silence for start_timeout after the last report ends the attempt.
    h.advance(59_999);
    let _ = h.heartbeat(c, true);
    assert!(abandons(&h.tick(), c).is_empty());
    h.advance(1);
    assert_eq!(abandons(&h.tick(), c), vec![(t, Generation(1))]);
    assert_eq!(h.attempt(t, 1).outcome, Some(Outcome::StartTimeout));
}

#[test]
fn a_task_with_a_repo_goes_only_to_a_sidecar_with_git_workspaces() {
    let mut h = H::new();
    let (shared, _) = h.connect(1, "plain", &[], 2);
    let (t, out) = h.submit(SubmitRequest {
        repo: Some("https://git.example.net/app.git".into()),
        base: Some("main".into()),
        env: vec![("MODE".into(), "fast".into())],
        labels: vec![("team".into(), "infra".into())],
        ..req("code")
    });
    assert!(
        assigns(&out, shared).is_empty(),
        "a shared-mode sidecar got a repo task"
    );
    assert_eq!(h.task(t).state, TaskState::Queued);
    h.workspace = muster_wire::work::WorkspaceMode::Git;
    let (git, out) = h.connect(2, "coder", &[], 1);
    let a = assigns(&out, git);
    assert_eq!(a.len(), 1);
    assert_eq!(
        a[0].spec.repo.as_deref(),
        Some("https://git.example.net/app.git")
    );
    assert_eq!(a[0].spec.base.as_deref(), Some("main"));
    assert_eq!(
        a[0].spec.env,
        vec![("MODE".to_string(), "fast".to_string())]
    );
    assert!(h.agent_json("coder")["workspace"] == "git");
    // A task without a repo still goes anywhere.
    let (_, out) = h.submit(req("plain work"));
    assert_eq!(assigns(&out, shared).len(), 1);
}

#[test]
fn bad_code_work_fields_are_refused_at_submission_naming_the_field() {
    let mut h = H::new();
    for (r, says) in [
        (
            SubmitRequest {
                repo: Some("--upload-pack=x".into()),
                ..req("t")
            },
            "--repo",
        ),
        (
            SubmitRequest {
                base: Some("main".into()),
                ..req("t")
            },
            "--base needs --repo",
        ),
        (
            SubmitRequest {
                repo: Some("/srv/app".into()),
                base: Some("a..b".into()),
                ..req("t")
            },
            "--base",
        ),
        (
            SubmitRequest {
                env: vec![("LD_PRELOAD".into(), "x".into())],
                ..req("t")
            },
            "--env LD_PRELOAD",
        ),
        (
            SubmitRequest {
                labels: vec![("a b".into(), "x".into())],
                ..req("t")
            },
            "label",
        ),
    ] {
        let (resp, _) = h.submit_resp(r);
        let e = op_err(&resp);
        assert_eq!(e.code, OpErrorCode::Invalid);
        assert!(
            e.message.contains(says),
            "{} does not name {says}",
            e.message
        );
    }
}

#[test]
fn task_timeout_with_action_fail_ends_the_task_failed() {
    let mut h = H::new();
    let (c, _) = h.connect(1, "a", &[], 1);
    let (t, _) = h.submit(SubmitRequest {
        timeout_ms: Some(10_000),
        timeout_action: TimeoutAction::Fail,
        ..req("t")
    });
    let _ = h.accept(c, t, 1);
    h.advance(2_000);
    let _ = h.start(c, t, 1);
    h.advance(9_999);
    let _ = h.heartbeat(c, true);
    let out = h.tick();
    assert!(abandons(&out, c).is_empty());
    h.advance(1);
    let out = h.tick();
    assert_eq!(abandons(&out, c), vec![(t, Generation(1))]);
    assert_eq!(h.attempt(t, 1).outcome, Some(Outcome::TimedOut));
    let rec = h.task(t);
    assert_eq!(rec.state, TaskState::Failed);
    assert!(
        rec.reason.as_deref().is_some_and(|r| r.contains("timeout")),
        "{:?}",
        rec.reason
    );
    let out = h.pass(20 * 60_000);
    assert!(all_assigns(&out).is_empty());
}

#[test]
fn task_timeout_with_action_retry_requeues() {
    let mut h = H::new();
    let (c, _) = h.connect(1, "a", &[], 1);
    let (t, _) = h.submit(SubmitRequest {
        timeout_ms: Some(10_000),
        timeout_action: TimeoutAction::Retry,
        ..req("t")
    });
    let _ = h.accept(c, t, 1);
    let _ = h.start(c, t, 1);
    h.advance(10_000);
    let _ = h.heartbeat(c, true);
    let out = h.tick();
    assert_eq!(abandons(&out, c), vec![(t, Generation(1))]);
    assert_eq!(h.attempt(t, 1).outcome, Some(Outcome::TimedOut));
    assert_eq!(h.task(t).state, TaskState::Queued);
    let out = h.pass(30_000);
    assert_eq!(assigns(&out, c).len(), 1);
    assert_eq!(h.task(t).generation, Generation(2));
}

// === Lost grace ===

#[test]
fn a_closed_session_with_running_work_is_lost_after_the_grace() {
    let (mut h, c, t) = one_running();
    let (b, _) = h.connect(2, "b", &[], 1);
    h.advance(1_000);
    let closed_at = h.now;
    let _ = h.close(c);
    let a = h.agent_json("a");
    assert_eq!(a["state"], "offline");
    // Just before the grace: nothing.
    let out = h.pass(55_000);
    assert_eq!(h.now, closed_at + 55_000);
    assert!(all_assigns(&out).is_empty());
    h.advance(4_999);
    let _ = h.heartbeat(b, true);
    let _ = h.tick();
    assert_eq!(h.task(t).state, TaskState::Running);
    // At the grace: lost and re-queued.
    h.advance(1);
    let _ = h.tick();
    assert_eq!(h.attempt(t, 1).outcome, Some(Outcome::Lost));
    assert_eq!(h.task(t).state, TaskState::Queued);
    let out = h.pass(30_000);
    assert_eq!(assigns(&out, b).len(), 1);
    assert_eq!(h.task(t).generation, Generation(2));
}

#[test]
fn an_agent_back_within_the_grace_keeps_its_task() {
    let (mut h, c, t) = one_running();
    let _ = h.close(c);
    h.advance(30_000);
    let out = h.hello(2, "a", &[], 1, vec![held(t, 1, Phase::Running)]);
    let c2 = ConnId(2);
    assert!(matches!(
        sends_to(&out, c2).first(),
        Some(HubMsg::Welcome(_))
    ));
    assert!(assigns(&out, c2).is_empty(), "no re-assignment");
    assert!(abandons(&out, c2).is_empty());
    // Well past the original grace, the task still runs on generation 1.
    let out = h.pass(90_000);
    assert!(abandons(&out, c2).is_empty());
    assert!(all_assigns(&out).is_empty());
    assert_eq!(h.task(t).state, TaskState::Running);
    assert_eq!(h.task(t).generation, Generation(1));
    assert_eq!(h.attempt(t, 1).outcome, None);
    let _ = h.complete(c2, t, 1);
    assert_eq!(h.task(t).state, TaskState::Completed);
}

#[test]
fn a_restarted_hub_gives_a_full_grace_from_its_start() {
    let (mut h, c, t) = one_running();
    let _ = c;
    // The hub is down for 5 minutes, far beyond the grace.
    let start = T0 + 5 * 60_000;
    h.restart(Policy::default(), start);
    h.advance(59_999);
    let out = h.tick();
    assert!(out.sends.is_empty());
    assert_eq!(h.task(t).state, TaskState::Running);
    h.advance(1);
    let _ = h.tick();
    assert_eq!(h.attempt(t, 1).outcome, Some(Outcome::Lost));
    assert_eq!(h.task(t).state, TaskState::Queued);
}

#[test]
fn a_restarted_hub_keeps_the_work_of_an_agent_that_returns_in_time() {
    let (mut h, _c, t) = one_running();
    let (t2, _) = h.submit(req("queued"));
    h.restart(Policy::default(), T0 + 5 * 60_000);
    h.advance(20_000);
    let _ = h.tick();
    let out = h.hello(5, "a", &[], 1, vec![held(t, 1, Phase::Running)]);
    let c = ConnId(5);
    assert!(assigns(&out, c).is_empty());
    assert!(abandons(&out, c).is_empty());
    let out = h.pass(120_000);
    assert!(all_assigns(&out).is_empty());
    assert_eq!(h.task(t).state, TaskState::Running);
    // The restored queue still works: finishing t sends out t2.
    let out = h.complete(c, t, 1);
    assert_eq!(
        assigns(&out, c).iter().map(|a| a.task).collect::<Vec<_>>(),
        vec![t2]
    );
    assert_eq!(assigns(&out, c)[0].generation, Generation(1));
}

#[test]
fn a_hub_restarted_on_a_clock_stepped_back_counts_restored_deadlines_from_its_start() {
    let policy = Policy {
        backoff_max: Duration::from_secs(30),
        ..Policy::default()
    };
    let mut h = H::with(policy.clone(), Limits::default());
    let (c, _) = h.connect(1, "a", &[], 2);
    let (t, _) = h.submit(SubmitRequest {
        timeout_ms: Some(10_000),
        ..req("hangs")
    });
    let _ = h.accept(c, t, 1);
    let _ = h.start(c, t, 1);
    let (f, _) = h.submit(req("flaky"));
    let _ = h.accept(c, f, 1);
    let _ = h.fail(c, f, 1, false);
    assert_eq!(h.task(f).state, TaskState::Queued);
    assert!(h.task(f).not_before.is_some_and(|n| n > h.now));
    // The hub restarts with its clock 10 minutes behind every stored time.
    let start = h.now - 10 * 60_000;
    h.restart(policy, start);
    let out = h.hello(2, "a", &[], 2, vec![held(t, 1, Phase::Running)]);
    let c2 = ConnId(2);
    assert!(abandons(&out, c2).is_empty());
    // The task timeout counts from the restart: not yet at 9.999 s, at 10 s.
    h.advance(9_999);
    let _ = h.heartbeat(c2, true);
    let _ = h.tick();
    assert_eq!(h.task(t).state, TaskState::Running);
    h.advance(1);
    let out = h.tick();
    assert_eq!(abandons(&out, c2), vec![(t, Generation(1))]);
    assert_eq!(h.attempt(t, 1).outcome, Some(Outcome::TimedOut));
    // The retry waits at most `backoff_max` from the restart, not 10 minutes more.
    let out = h.pass(20_001);
    let sent: Vec<(TaskId, Generation)> = assigns(&out, c2)
        .iter()
        .map(|a| (a.task, a.generation))
        .collect();
    assert_eq!(sent, vec![(f, Generation(2))]);
}

#[test]
fn a_restarted_hub_does_not_time_out_assignments_within_the_grace() {
    let mut h = H::new();
    let (c, _) = h.connect(1, "a", &[], 2);
    let (t1, _) = h.submit(req("assigned"));
    let (t2, _) = h.submit(req("accepted"));
    let _ = h.accept(c, t2, 1);
    // The hub is down for 70 s (longer than both timeouts), then restarts.
    let start = T0 + 70_000;
    h.restart(Policy::default(), start);
    h.advance(1_000);
    let _ = h.tick();
    // "Every agent gets a full lost grace counted from the hub's start before
    // any of its work is re-queued."
    assert_eq!(
        h.task(t1).state,
        TaskState::Assigned,
        "{:?}",
        h.store.attempts
    );
    assert_eq!(h.task(t2).state, TaskState::Accepted);
    // The agent comes back in time and holds both.
    let out = h.hello(
        2,
        "a",
        &[],
        2,
        vec![held(t1, 1, Phase::Accepted), held(t2, 1, Phase::Waking)],
    );
    assert!(abandons(&out, ConnId(2)).is_empty());
}

// === Reconciliation ===

#[test]
fn a_heartbeat_that_no_longer_lists_a_running_task_ends_it_lost() {
    let (mut h, c, t) = one_running();
    h.advance(5_000);
    // A heartbeat that lists it changes nothing.
    let out = h.heartbeat_with(c, vec![held(t, 1, Phase::Running)], true);
    assert!(out.writes.iter().all(|w| !matches!(w, Write::Task(_))));
    let out = h.heartbeat_with(c, Vec::new(), true);
    assert_eq!(h.attempt(t, 1).outcome, Some(Outcome::Lost));
    assert_eq!(h.task(t).state, TaskState::Queued);
    assert_eq!(abandons(&out, c), vec![(t, Generation(1))]);
}

#[test]
fn a_heartbeat_that_does_not_list_an_unaccepted_assignment_keeps_it() {
    let (mut h, c, t) = one_assigned();
    let out = h.heartbeat_with(c, Vec::new(), true);
    assert!(abandons(&out, c).is_empty());
    assert_eq!(h.task(t).state, TaskState::Assigned);
}

#[test]
fn a_hello_resuming_an_unknown_generation_is_abandoned() {
    let (mut h, c, t) = one_running();
    let _ = h.close(c);
    let out = h.hello(
        2,
        "a",
        &[],
        1,
        vec![
            held(t, 1, Phase::Running),
            held(t, 7, Phase::Running),
            held(TaskId(555), 2, Phase::Verifying),
            // A finished one awaits its ack: no Abandon, its report will be replayed.
            held(TaskId(556), 1, Phase::Finished),
        ],
    );
    let c2 = ConnId(2);
    let mut got = abandons(&out, c2);
    got.sort();
    assert_eq!(got, vec![(t, Generation(7)), (TaskId(555), Generation(2))]);
    assert!(matches!(
        sends_to(&out, c2).first(),
        Some(HubMsg::Welcome(_))
    ));
    assert_eq!(h.task(t).state, TaskState::Running);
}

#[test]
fn a_hello_without_an_assigned_task_gets_the_assign_again() {
    let (mut h, c, t) = one_assigned();
    let _ = h.close(c);
    h.advance(5_000);
    let assigned = h.core.counters().assigned;
    let out = h.hello(2, "a", &[], 1, Vec::new());
    let c2 = ConnId(2);
    let msgs = sends_to(&out, c2);
    assert!(matches!(msgs.first(), Some(HubMsg::Welcome(_))));
    let a = assigns(&out, c2);
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].task, t);
    assert_eq!(a[0].generation, Generation(1), "same generation, re-sent");
    assert_eq!(h.core.counters().assigned, assigned);
    assert_eq!(h.task(t).generation, Generation(1));
    // The re-sent assignment keeps its slot: nothing else goes out.
    let _ = h.submit(req("other"));
    assert_eq!(h.core.live_tasks(), 2);
}

#[test]
fn a_hello_without_an_accepted_task_ends_it_lost() {
    let (mut h, c, t) = one_running();
    let _ = h.close(c);
    let _ = h.hello(2, "a", &[], 1, Vec::new());
    assert_eq!(h.attempt(t, 1).outcome, Some(Outcome::Lost));
    assert_eq!(h.task(t).state, TaskState::Queued);
}

#[test]
fn reconciliation_comes_before_new_assignments() {
    let (mut h, c, t) = one_running();
    let (t2, _) = h.submit(req("waiting"));
    let _ = h.close(c);
    // Back with an unknown generation and more slots: the Abandon precedes the new Assign.
    let out = h.hello(
        2,
        "a",
        &[],
        2,
        vec![
            held(t, 1, Phase::Running),
            held(TaskId(900), 1, Phase::Running),
        ],
    );
    let msgs = sends_to(&out, ConnId(2));
    let abandon_at = msgs
        .iter()
        .position(|m| matches!(m, HubMsg::Abandon { .. }))
        .expect("an Abandon");
    let assign_at = msgs
        .iter()
        .position(|m| matches!(m, HubMsg::Assign(a) if a.task == t2))
        .expect("an Assign");
    assert!(matches!(msgs[0], HubMsg::Welcome(_)));
    assert!(abandon_at < assign_at);
}

#[test]
fn a_second_session_replaces_the_first() {
    let (mut h, c, t) = one_running();
    let out = h.hello(2, "a", &[], 1, vec![held(t, 1, Phase::Running)]);
    assert_eq!(out.closes, vec![c]);
    // The old connection's close changes nothing.
    let _ = h.close(c);
    let out = h.pass(120_000);
    assert!(all_assigns(&out).is_empty());
    assert_eq!(h.task(t).state, TaskState::Running);
    // Reports on the old connection are ignored.
    let out = h.step(Input::Session {
        conn: c,
        msg: SessionMsg::Report(Report {
            id: ReportId(1_000),
            task: t,
            generation: Generation(1),
            body: ReportBody::Finished {
                outcome: Outcome::Completed,
                result: None,
                error: None,
                work: None,
            },
        }),
    });
    assert!(out.sends.is_empty());
    assert_eq!(h.task(t).state, TaskState::Running);
}

// === Circuit breaker ===

/// Trips `a`'s breaker with three wake failures; returns the hub, its conn and when the breaker closes.
fn tripped() -> (H, ConnId, Millis) {
    let mut h = H::new();
    let (c, _) = h.connect(1, "a", &[], 1);
    let ids: Vec<TaskId> = (0..3)
        .map(|i| {
            h.submit(SubmitRequest {
                max_attempts: Some(1),
                ..req(&format!("t{i}"))
            })
            .0
        })
        .collect();
    for (i, t) in ids.iter().enumerate() {
        assert_eq!(h.task(*t).state, TaskState::Assigned, "task {i}");
        let _ = h.accept(c, *t, 1);
        let out = h.finish(
            c,
            *t,
            1,
            Outcome::WakeFailed,
            Some(failure("wake exited 1")),
        );
        assert_eq!(h.task(*t).state, TaskState::Failed);
        if i < 2 {
            assert_eq!(h.agent_json("a")["available"], true);
        } else {
            assert!(all_assigns(&out).is_empty());
        }
    }
    let a = h.agent_json("a");
    assert_eq!(a["available"], false);
    let reason = a["unavailable_reason"]
        .as_str()
        .expect("a reason")
        .to_string();
    assert!(reason.contains("degraded"), "{reason}");
    let until: Millis = reason
        .rsplit(' ')
        .next()
        .and_then(|s| s.parse().ok())
        .expect("the reason names when the circuit closes");
    let cooldown = Policy::default().breaker_cooldown.as_millis() as u64;
    assert_eq!(until, h.now + cooldown);
    (h, c, until)
}

#[test]
fn three_infrastructure_failures_open_the_circuit_until_cooldown_and_healthy_heartbeat() {
    let (mut h, c, until) = tripped();
    let (t, out) = h.submit(req("next"));
    assert!(assigns(&out, c).is_empty());
    // Healthy heartbeats during the cooldown do not close it.
    let before = until - h.now - 5_000;
    let out = h.pass(before);
    assert!(all_assigns(&out).is_empty());
    assert_eq!(h.task(t).state, TaskState::Queued);
    assert_eq!(h.agent_json("a")["available"], false);
    // After the cooldown, a healthy heartbeat closes it and work flows.
    h.advance(until - h.now + 1);
    let out = h.heartbeat(c, true);
    assert_eq!(assigns(&out, c).len(), 1);
    assert_eq!(h.agent_json("a")["available"], true);
}

#[test]
fn an_unhealthy_heartbeat_after_the_cooldown_keeps_the_circuit_open() {
    let (mut h, c, until) = tripped();
    let _ = h.submit(req("next"));
    let _ = h.pass(until - h.now - 5_000);
    h.advance(until - h.now + 1);
    let out = h.heartbeat(c, false);
    assert!(assigns(&out, c).is_empty());
    let a = h.agent_json("a");
    assert_eq!(a["available"], false);
    let out = h.tick();
    assert!(assigns(&out, c).is_empty());
    h.advance(1_000);
    let out = h.heartbeat(c, true);
    assert_eq!(assigns(&out, c).len(), 1);
}

#[test]
fn the_circuit_stays_open_after_the_cooldown_until_a_heartbeat() {
    let (mut h, c, until) = tripped();
    let _ = h.submit(req("next"));
    // Healthy heartbeats keep the agent online until just before the cooldown ends.
    let _ = h.pass(until - h.now - 1_000);
    // The cooldown passes; no heartbeat yet, only a tick.
    h.advance(2_000);
    let out = h.tick();
    assert!(
        assigns(&out, c).is_empty(),
        "the circuit closes on a healthy heartbeat after the cooldown, not by itself"
    );
    let out = h.heartbeat(c, true);
    assert_eq!(assigns(&out, c).len(), 1);
}

#[test]
fn agent_failures_of_the_work_do_not_open_the_circuit() {
    let mut h = H::new();
    let (c, _) = h.connect(1, "a", &[], 1);
    for i in 0..4 {
        let (t, _) = h.submit(SubmitRequest {
            max_attempts: Some(1),
            ..req(&format!("t{i}"))
        });
        let _ = h.accept(c, t, 1);
        let _ = h.fail(c, t, 1, false);
    }
    assert_eq!(h.agent_json("a")["available"], true);
}

#[test]
fn a_success_resets_the_count_of_infrastructure_failures() {
    let mut h = H::new();
    let (c, _) = h.connect(1, "a", &[], 1);
    let outcomes = [
        Outcome::WakeFailed,
        Outcome::WakeFailed,
        Outcome::Completed,
        Outcome::WakeFailed,
        Outcome::AgentExited,
    ];
    for (i, o) in outcomes.into_iter().enumerate() {
        let (t, _) = h.submit(SubmitRequest {
            max_attempts: Some(1),
            ..req(&format!("t{i}"))
        });
        let _ = h.accept(c, t, 1);
        let err = (o != Outcome::Completed).then(|| failure("x"));
        let _ = h.finish(c, t, 1, o, err);
    }
    assert_eq!(h.agent_json("a")["available"], true);
}

// === Drain, revoke ===

#[test]
fn drain_stops_new_work_and_undrain_resumes_it() {
    let mut h = H::new();
    let (c, _) = h.connect(1, "a", &[], 2);
    let (running, _) = h.submit(req("running"));
    let (resp, _) = h.op(ADMIN, OpRequest::AgentDrain { name: "a".into() });
    assert_eq!(json_ok(&resp)["drained"], true);
    assert!(h.store.agents["a"].drained);
    let (t, out) = h.submit(req("t"));
    assert!(assigns(&out, c).is_empty());
    let a = h.agent_json("a");
    assert_eq!(a["available"], false);
    assert_eq!(a["unavailable_reason"], "draining");
    // Work already there continues.
    let out = h.run_ok(c, running, 1);
    assert!(assigns(&out, c).is_empty());
    assert_eq!(h.task(running).state, TaskState::Completed);
    let (resp, out) = h.op(ADMIN, OpRequest::AgentUndrain { name: "a".into() });
    assert_eq!(json_ok(&resp)["drained"], false);
    assert_eq!(assigns(&out, c).len(), 1);
    assert_eq!(h.task(t).state, TaskState::Assigned);
    // Unknown agent.
    let (resp, _) = h.op(ADMIN, OpRequest::AgentDrain { name: "zz".into() });
    assert_eq!(op_err(&resp).code, OpErrorCode::NotFound);
}

#[test]
fn revoke_closes_the_session_and_later_hellos_are_refused() {
    let (mut h, c, _t) = one_running();
    let (resp, out) = h.op(ADMIN, OpRequest::AgentRevoke { name: "a".into() });
    assert_eq!(json_ok(&resp)["revoked"], true);
    assert_eq!(refused(&out, c), Some(Refused::Revoked));
    assert!(out.closes.contains(&c));
    assert!(h.store.identities["fp-a"].revoked_at.is_some());
    assert!(h.store.agents["a"].revoked);
    let out = h.hello(2, "a", &[], 1, Vec::new());
    assert_eq!(refused(&out, ConnId(2)), Some(Refused::Revoked));
    assert_eq!(out.closes, vec![ConnId(2)]);
    // The revoked credential cannot make requests either.
    let (resp, _) = h.op("fp-a", OpRequest::Agents);
    assert_eq!(op_err(&resp).code, OpErrorCode::Forbidden);
    let a = h.agent_json("a");
    assert_eq!(a["state"], "offline");
    // Unknown agent.
    let (resp, _) = h.op(ADMIN, OpRequest::AgentRevoke { name: "zz".into() });
    assert_eq!(op_err(&resp).code, OpErrorCode::NotFound);
}

#[test]
fn a_revoked_agents_work_is_requeued_after_the_grace() {
    let (mut h, c, t) = one_running();
    let _ = h.op(ADMIN, OpRequest::AgentRevoke { name: "a".into() });
    let _ = h.close(c);
    h.advance(60_000);
    let _ = h.tick();
    assert_eq!(h.task(t).state, TaskState::Queued);
}

// === Cancel, requeue ===

#[test]
fn cancel_of_a_running_task_sends_cancel_and_ends_it_cancelled() {
    let (mut h, c, t) = one_running();
    let (resp, out) = h.op(ADMIN, OpRequest::TaskCancel { id: t });
    let v = json_ok(&resp);
    assert_eq!(v["state"], "cancelled");
    assert!(sends_to(&out, c).contains(&&HubMsg::Cancel {
        task: t,
        generation: Generation(1),
    }));
    let rec = h.task(t);
    assert_eq!(rec.state, TaskState::Cancelled);
    assert_eq!(rec.reason.as_deref(), Some("cancelled by admin"));
    assert!(
        rec.audit
            .iter()
            .any(|a| a.action == "cancel" && a.who == "admin")
    );
    assert_eq!(h.attempt(t, 1).outcome, Some(Outcome::Cancelled));
    // The sidecar's late Finished for it is acked, not acted on.
    let out = h.finish(c, t, 1, Outcome::Cancelled, Some(failure("stopped")));
    assert!(task_writes(&out, t).is_empty());
    assert_eq!(h.task(t).state, TaskState::Cancelled);
    // Cancelling again is a conflict.
    let (resp, _) = h.op(ADMIN, OpRequest::TaskCancel { id: t });
    assert_eq!(op_err(&resp).code, OpErrorCode::Conflict);
    // The slot is free again.
    let (_, out) = h.submit(req("next"));
    assert_eq!(assigns(&out, c).len(), 1);
}

#[test]
fn cancel_of_a_queued_task_ends_it_without_a_message() {
    let mut h = H::new();
    let (t, _) = h.submit(req("t"));
    let (resp, out) = h.op(ADMIN, OpRequest::TaskCancel { id: t });
    assert_eq!(json_ok(&resp)["state"], "cancelled");
    assert!(out.sends.is_empty());
    assert_eq!(h.task(t).state, TaskState::Cancelled);
    // It never runs.
    let (c, out) = h.connect(1, "a", &[], 1);
    assert!(assigns(&out, c).is_empty());
}

#[test]
fn requeue_of_a_finished_task_runs_it_again_with_a_higher_generation() {
    let (mut h, c, t) = one_running();
    let _ = h.complete(c, t, 1);
    assert_eq!(h.core.live_tasks(), 0);
    h.advance(10_000);
    let (resp, out) = h.op(ADMIN, OpRequest::TaskRequeue { id: t });
    let v = json_ok(&resp);
    assert_eq!(v["id"], t.0);
    let a = assigns(&out, c);
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].task, t);
    assert_eq!(a[0].generation, Generation(2));
    let rec = h.task(t);
    assert_eq!(rec.state, TaskState::Assigned);
    assert_eq!(rec.attempts, 1);
    assert_eq!(rec.result, None);
    assert!(rec.audit.iter().any(|a| a.action == "requeue"));
    let _ = h.run_ok(c, t, 2);
    assert_eq!(h.task(t).state, TaskState::Completed);
    // A failed task can be requeued too.
    let (t2, _) = h.submit(SubmitRequest {
        max_attempts: Some(1),
        ..req("f")
    });
    let _ = h.fail(c, t2, 1, false);
    assert_eq!(h.task(t2).state, TaskState::Failed);
    let (resp, out) = h.op(ADMIN, OpRequest::TaskRequeue { id: t2 });
    let _ = json_ok(&resp);
    assert_eq!(assigns(&out, c)[0].generation, Generation(2));
}

#[test]
fn requeue_of_a_live_task_is_refused() {
    let (mut h, _c, t) = one_running();
    let (resp, out) = h.op(ADMIN, OpRequest::TaskRequeue { id: t });
    assert_eq!(op_err(&resp).code, OpErrorCode::Conflict);
    assert!(task_writes(&out, t).is_empty());
    let (resp, _) = h.op(ADMIN, OpRequest::TaskRequeue { id: TaskId(4_444) });
    assert_eq!(op_err(&resp).code, OpErrorCode::NotFound);
}

// === Submission ===

#[test]
fn an_idempotency_key_returns_the_same_task() {
    let mut h = H::new();
    let keyed = || SubmitRequest {
        key: Some("build-42".into()),
        ..req("build")
    };
    let (t, out) = h.submit(keyed());
    assert!(
        out.writes
            .iter()
            .any(|w| matches!(w, Write::Key(k, id) if k == "build-42" && *id == t))
    );
    let (resp, out) = h.submit_resp(keyed());
    let v = json_ok(&resp);
    assert_eq!(v["id"], t.0);
    assert_eq!(v["existing"], true);
    assert!(task_writes(&out, t).is_empty());
    assert_eq!(h.core.live_tasks(), 1);
    // Still the same after the task finished and is only in the archive.
    let (c, _) = h.connect(1, "a", &[], 1);
    let _ = h.run_ok(c, t, 1);
    let (resp, out) = h.submit_resp(keyed());
    assert_eq!(json_ok(&resp)["id"], t.0);
    assert_eq!(json_ok(&resp)["state"], "completed");
    assert!(all_assigns(&out).is_empty());
}

#[test]
fn a_submission_past_the_queue_limit_is_busy() {
    let limits = Limits {
        max_queued_tasks: 2,
        ..Limits::default()
    };
    let mut h = H::with(Policy::default(), limits);
    let _ = h.submit(req("1"));
    let _ = h.submit(req("2"));
    let (resp, out) = h.submit_resp(req("3"));
    let e = op_err(&resp);
    assert_eq!(e.code, OpErrorCode::Busy);
    assert!(
        e.message.contains("limits.max_queued_tasks"),
        "{}",
        e.message
    );
    assert!(e.message.contains('2'), "{}", e.message);
    assert!(out.writes.iter().all(|w| !matches!(w, Write::Task(_))));
    assert_eq!(h.core.live_tasks(), 2);
}

#[test]
fn an_overlong_description_is_refused_naming_the_limit() {
    let mut h = H::new();
    let max = Limits::default().max_description_bytes as usize;
    let ok = SubmitRequest {
        description: "x".repeat(max),
        ..req("t")
    };
    let _ = h.submit(ok);
    let (resp, _) = h.submit_resp(SubmitRequest {
        description: "x".repeat(max + 1),
        ..req("t")
    });
    let e = op_err(&resp);
    assert_eq!(e.code, OpErrorCode::Invalid);
    assert!(
        e.message.contains("limits.max_description_bytes"),
        "{}",
        e.message
    );
    assert!(e.message.contains(&max.to_string()), "{}", e.message);
}

#[test]
fn a_batch_accepts_or_refuses_each_task_on_its_own_and_assigns_in_one_step() {
    let mut h = H::new();
    let (c, _) = h.connect(1, "a", &[], 4);
    let keyed = SubmitRequest {
        key: Some("k-1".into()),
        ..req("keyed")
    };
    let (resp, out) = h.op(
        ADMIN,
        OpRequest::SubmitBatch(vec![
            req("first"),
            req("  "),
            keyed.clone(),
            keyed,
            req_caps("needs gpu", &["gpu"]),
        ]),
    );
    let v = json_ok(&resp);
    let results = v["results"].as_array().expect("results");
    assert_eq!(results.len(), 5, "one result per task, in order: {v}");
    assert_eq!(
        (v["accepted"].as_u64(), v["refused"].as_u64()),
        (Some(4), Some(1))
    );
    let first = TaskId(results[0]["id"].as_u64().expect("an id"));
    assert_eq!(results[1]["code"], "invalid");
    assert!(
        results[1]["error"]
            .as_str()
            .is_some_and(|e| e.contains("--title is empty")),
        "{v}"
    );
    // The key's second use names the task its first use made, in the same batch.
    assert_eq!(results[3]["id"], results[2]["id"]);
    assert_eq!(results[3]["existing"], true);
    assert_eq!(h.core.live_tasks(), 3);
    // Both runnable tasks went out in the batch's own step; the gpu one waits.
    let sent: Vec<TaskId> = assigns(&out, c).iter().map(|a| a.task).collect();
    assert_eq!(
        sent,
        [first, TaskId(results[2]["id"].as_u64().expect("an id"))]
    );
    assert_eq!(results[4]["state"], "queued");
}

#[test]
fn a_batch_over_the_limit_is_refused_whole() {
    let mut h = H::new();
    let n = muster_wire::limits::SUBMIT_BATCH_MAX + 1;
    let (resp, out) = h.op(ADMIN, OpRequest::SubmitBatch(vec![req("t"); n]));
    let e = op_err(&resp);
    assert_eq!(e.code, OpErrorCode::Invalid);
    assert!(e.message.contains("split it"), "{}", e.message);
    assert!(out.writes.is_empty());
    assert_eq!(h.core.live_tasks(), 0);
    // An operator may not submit in batches either.
    let (resp, _) = h.op(OPERATOR, OpRequest::SubmitBatch(vec![req("t")]));
    assert_eq!(op_err(&resp).code, OpErrorCode::Forbidden);
}

#[test]
fn invalid_submissions_are_refused() {
    let mut h = H::new();
    for r in [
        req("  "),
        req(&"t".repeat(1025)),
        SubmitRequest {
            max_attempts: Some(0),
            ..req("t")
        },
        SubmitRequest {
            key: Some(String::new()),
            ..req("t")
        },
    ] {
        let (resp, _) = h.submit_resp(r);
        assert_eq!(op_err(&resp).code, OpErrorCode::Invalid);
    }
    assert_eq!(h.core.live_tasks(), 0);
}

// === Dependencies ===

#[test]
fn a_dependant_is_blocked_until_its_dependency_completes() {
    let mut h = H::new();
    let (t1, _) = h.submit(req("first"));
    let (t2, _) = h.submit(SubmitRequest {
        after: vec![t1],
        ..req("second")
    });
    assert_eq!(h.task(t2).state, TaskState::Blocked);
    let (c, out) = h.connect(1, "a", &[], 2);
    let got: Vec<TaskId> = assigns(&out, c).iter().map(|a| a.task).collect();
    assert_eq!(got, vec![t1]);
    let _ = h.accept(c, t1, 1);
    let _ = h.start(c, t1, 1);
    assert_eq!(h.task(t2).state, TaskState::Blocked);
    let out = h.complete(c, t1, 1);
    assert_eq!(
        assigns(&out, c).iter().map(|a| a.task).collect::<Vec<_>>(),
        vec![t2]
    );
    assert_eq!(h.task(t2).state, TaskState::Assigned);
    // A dependency that already completed does not block.
    let (t3, _) = h.submit(SubmitRequest {
        after: vec![t1],
        ..req("third")
    });
    assert_eq!(h.task(t3).state, TaskState::Assigned);
}

#[test]
fn a_dependant_waits_for_all_its_dependencies() {
    let mut h = H::new();
    let (d1, _) = h.submit(req("d1"));
    let (d2, _) = h.submit(req("d2"));
    let (t, _) = h.submit(SubmitRequest {
        after: vec![d1, d2],
        ..req("t")
    });
    let (c, _) = h.connect(1, "a", &[], 3);
    let _ = h.run_ok(c, d1, 1);
    assert_eq!(h.task(t).state, TaskState::Blocked);
    let out = h.run_ok(c, d2, 1);
    assert_eq!(assigns(&out, c).len(), 1);
    assert_eq!(h.task(t).state, TaskState::Assigned);
}

#[test]
fn a_failed_dependency_cancels_the_dependants_with_a_reason() {
    let mut h = H::new();
    let (t1, _) = h.submit(SubmitRequest {
        max_attempts: Some(1),
        ..req("first")
    });
    let (t2, _) = h.submit(SubmitRequest {
        after: vec![t1],
        ..req("second")
    });
    let (t3, _) = h.submit(SubmitRequest {
        after: vec![t2],
        ..req("third")
    });
    let (c, _) = h.connect(1, "a", &[], 2);
    let _ = h.accept(c, t1, 1);
    let out = h.fail(c, t1, 1, false);
    assert_eq!(h.task(t1).state, TaskState::Failed);
    assert_eq!(task_writes(&out, t2).len(), 1);
    let rec = h.task(t2);
    assert_eq!(rec.state, TaskState::Cancelled);
    let reason = rec.reason.clone().expect("a reason");
    assert!(
        reason.contains(&t1.to_string()) && reason.contains("failed"),
        "{reason}"
    );
    // The cancellation reaches the whole chain.
    assert_eq!(h.task(t3).state, TaskState::Cancelled);
    assert!(all_assigns(&out).is_empty());
    assert_eq!(h.core.live_tasks(), 0);
    // A new task after the failed one is refused.
    let (resp, _) = h.submit_resp(SubmitRequest {
        after: vec![t1],
        ..req("late")
    });
    assert_eq!(op_err(&resp).code, OpErrorCode::Conflict);
}

#[test]
fn a_cancelled_dependency_cancels_the_dependant() {
    let mut h = H::new();
    let (t1, _) = h.submit(req("first"));
    let (t2, _) = h.submit(SubmitRequest {
        after: vec![t1],
        ..req("second")
    });
    let (resp, _) = h.op(ADMIN, OpRequest::TaskCancel { id: t1 });
    let _ = json_ok(&resp);
    let rec = h.task(t2);
    assert_eq!(rec.state, TaskState::Cancelled);
    assert!(
        rec.reason
            .as_deref()
            .is_some_and(|r| r.contains("cancelled")),
        "{:?}",
        rec.reason
    );
}

#[test]
fn an_unknown_dependency_is_refused() {
    let mut h = H::new();
    let (resp, out) = h.submit_resp(SubmitRequest {
        after: vec![TaskId(404)],
        ..req("t")
    });
    let e = op_err(&resp);
    assert_eq!(e.code, OpErrorCode::Invalid);
    assert!(e.message.contains("404"), "{}", e.message);
    assert!(out.writes.iter().all(|w| !matches!(w, Write::Task(_))));
}

// === Roles ===

#[test]
fn an_operator_can_read_but_not_write() {
    let mut h = H::new();
    let _ = h.connect(1, "a", &[], 1);
    let (resp, _) = h.op(OPERATOR, OpRequest::Agents);
    let v = json_ok(&resp);
    assert_eq!(v["agents"][0]["name"], "a");
    let (resp, _) = h.op(OPERATOR, OpRequest::Stats);
    let _ = json_ok(&resp);
    let (resp, out) = h.op(OPERATOR, OpRequest::Submit(req("t")));
    let e = op_err(&resp);
    assert_eq!(e.code, OpErrorCode::Forbidden);
    assert!(e.message.contains("admin"), "{}", e.message);
    assert!(out.writes.is_empty());
    let (resp, _) = h.op(OPERATOR, OpRequest::AgentDrain { name: "a".into() });
    assert_eq!(op_err(&resp).code, OpErrorCode::Forbidden);
    assert_eq!(h.core.live_tasks(), 0);
}

#[test]
fn an_agent_credential_may_neither_read_nor_write() {
    let mut h = H::new();
    let fp = h.enroll("a");
    let (resp, _) = h.op(&fp, OpRequest::Agents);
    assert_eq!(op_err(&resp).code, OpErrorCode::Forbidden);
    let (resp, _) = h.op(&fp, OpRequest::Submit(req("t")));
    assert_eq!(op_err(&resp).code, OpErrorCode::Forbidden);
    let (resp, _) = h.op("fp-stranger", OpRequest::Agents);
    assert_eq!(op_err(&resp).code, OpErrorCode::Forbidden);
    assert_eq!(h.core.live_tasks(), 0);
}

// === Enrollment ===

fn token(h: &mut H, role: Role, ttl_s: u64, hash: &str) {
    let (resp, out) = h.op_with(
        ADMIN,
        OpRequest::TokenCreate {
            role,
            ttl_s,
            name: None,
            capabilities: None,
            slots: None,
        },
        Some((format!("secret-{hash}"), hash.to_string())),
    );
    let v = json_ok(&resp);
    let token = v["token"].as_str().expect("token string");
    assert!(token.ends_with(&format!("secret-{hash}")), "{token}");
    assert_eq!(v["role"], role.as_str());
    assert!(
        out.writes
            .iter()
            .any(|w| matches!(w, Write::Token(k, _) if k == hash))
    );
}

#[test]
fn a_token_enrolls_once() {
    let mut h = H::new();
    token(&mut h, Role::Agent, 600, "h1");
    let r = h.enroll_input("h1", Role::Agent, "new", "key-new");
    assert!(matches!(r, EnrollResponse::Enrolled { ref cert_pem, .. } if cert_pem == "PEM new"));
    assert_eq!(h.store.identities["fp-new"].role, Role::Agent);
    assert!(h.store.tokens["h1"].used_at.is_some());
    // The new identity can open a session.
    let out = h.hello(1, "new", &[], 1, Vec::new());
    assert!(matches!(
        sends_to(&out, ConnId(1)).first(),
        Some(HubMsg::Welcome(_))
    ));
    // The token is spent.
    h.advance(1_000);
    let r = h.enroll_input("h1", Role::Agent, "other", "key-other");
    assert_eq!(
        r,
        EnrollResponse::Refused(EnrollRefusal::AlreadyUsed { at_unix: T0 / 1000 })
    );
    assert!(!h.store.identities.contains_key("fp-other"));
}

#[test]
fn the_enrollment_check_decides_before_signing_and_spends_nothing() {
    let mut h = H::new();
    let grant = || (Vec::new(), 1);
    assert_eq!(
        h.core
            .check_enroll(h.now, "nope", Role::Agent, "new", "key-new", grant())
            .map(drop),
        Err(EnrollRefusal::UnknownToken)
    );
    token(&mut h, Role::Agent, 600, "h1");
    let ok = h
        .core
        .check_enroll(h.now, "h1", Role::Agent, "new", "key-new", grant())
        .expect("a fresh token passes the check");
    assert_eq!(ok.replaces, None);
    // The check is a question: the token is not spent and nothing is written.
    assert!(h.flush().writes.is_empty());
    assert!(h.store.tokens["h1"].used_at.is_none());
    let r = h.enroll_input("h1", Role::Agent, "new", "key-new");
    assert!(matches!(r, EnrollResponse::Enrolled { .. }), "{r:?}");
    // Between a check and the commit the token can be used up: the commit checks again.
    assert!(matches!(
        h.core
            .check_enroll(h.now, "h1", Role::Agent, "late", "key-late", grant()),
        Err(EnrollRefusal::AlreadyUsed { .. })
    ));
}

#[test]
fn an_expired_token_is_refused() {
    let mut h = H::new();
    token(&mut h, Role::Agent, 60, "h1");
    h.advance(60_000);
    let r = h.enroll_input("h1", Role::Agent, "new", "key-new");
    assert_eq!(
        r,
        EnrollResponse::Refused(EnrollRefusal::Expired {
            at_unix: (T0 + 60_000) / 1000
        })
    );
    assert!(!h.store.identities.contains_key("fp-new"));
}

#[test]
fn a_token_for_another_role_is_refused() {
    let mut h = H::new();
    token(&mut h, Role::Operator, 600, "h1");
    let r = h.enroll_input("h1", Role::Agent, "new", "key-new");
    assert_eq!(
        r,
        EnrollResponse::Refused(EnrollRefusal::WrongRole {
            token: Role::Operator,
            requested: Role::Agent
        })
    );
    // The refusal did not spend the token.
    let r = h.enroll_input("h1", Role::Operator, "watcher", "key-w");
    assert!(matches!(r, EnrollResponse::Enrolled { .. }));
    let (resp, _) = h.op("fp-watcher", OpRequest::Agents);
    let _ = json_ok(&resp);
}

#[test]
fn an_unknown_token_is_refused() {
    let mut h = H::new();
    let r = h.enroll_input("nope", Role::Agent, "new", "key-new");
    assert_eq!(r, EnrollResponse::Refused(EnrollRefusal::UnknownToken));
}

#[test]
fn a_revoked_key_cannot_enroll_again() {
    let mut h = H::new();
    let _ = h.connect(1, "a", &[], 1);
    let (resp, _) = h.op(ADMIN, OpRequest::AgentRevoke { name: "a".into() });
    let _ = json_ok(&resp);
    token(&mut h, Role::Agent, 600, "h1");
    // Same key as the revoked identity (`key-fp-a`).
    let r = h.enroll_input("h1", Role::Agent, "a2", "key-fp-a");
    assert_eq!(r, EnrollResponse::Refused(EnrollRefusal::RevokedKey));
    // A fresh key works, and clears the agent's revoked flag.
    let r = h.enroll_input("h1", Role::Agent, "a", "key-fresh");
    assert!(matches!(r, EnrollResponse::Enrolled { .. }));
    assert!(!h.store.agents["a"].revoked);
}

#[test]
fn only_an_admin_creates_tokens() {
    let mut h = H::new();
    let (resp, _) = h.op_with(
        OPERATOR,
        OpRequest::TokenCreate {
            role: Role::Admin,
            ttl_s: 60,
            name: None,
            capabilities: None,
            slots: None,
        },
        Some(("s".into(), "h".into())),
    );
    assert_eq!(op_err(&resp).code, OpErrorCode::Forbidden);
    let r = h.enroll_input("h", Role::Admin, "evil", "key-evil");
    assert_eq!(r, EnrollResponse::Refused(EnrollRefusal::UnknownToken));
}

// === Commit before acknowledge ===

#[test]
fn every_task_change_is_written_in_the_output_that_announces_it() {
    let mut h = H::new();
    let (c, _) = h.connect(1, "a", &[], 1);
    let (t, out) = h.submit(req("t"));
    // Submit and assignment: the Assign travels with the record in state assigned.
    let w = task_writes(&out, t);
    assert_eq!(w.last().map(|r| r.state), Some(TaskState::Assigned));
    assert!(
        out.writes.iter().any(
            |w| matches!(w, Write::Attempt(a) if a.task == t && a.generation == Generation(1))
        )
    );
    assert!(out.writes.iter().any(|w| matches!(w, Write::NextTaskId(2))));
    let steps: [(ReportBody, TaskState); 4] = [
        (ReportBody::Accepted, TaskState::Accepted),
        (
            ReportBody::Started {
                pid: None,
                session: Some("muster-1".into()),
            },
            TaskState::Running,
        ),
        (
            ReportBody::Progress {
                note: "50 %".into(),
            },
            TaskState::Running,
        ),
        (
            ReportBody::Finished {
                outcome: Outcome::Completed,
                result: Some("r".into()),
                error: None,
                work: None,
            },
            TaskState::Completed,
        ),
    ];
    for (body, state) in steps {
        let (id, input) = h.report_input(c, t, 1, body);
        let out = h.report_raw(c, t, 1, id, input);
        // The ack and the write that makes it true are in the same output.
        assert_eq!(acks(&out, c), vec![id]);
        let w = task_writes(&out, t);
        assert_eq!(w.last().map(|r| r.state), Some(state), "{:?}", out.writes);
    }
    assert_eq!(h.task(t).progress_note.as_deref(), Some("50 %"));
    assert_eq!(h.attempt(t, 1).session.as_deref(), Some("muster-1"));
    // Timeouts: the Abandon travels with the re-queue.
    let (t2, _) = h.submit(req("t2"));
    h.advance(30_000);
    let _ = h.heartbeat(c, true);
    let out = h.tick();
    assert_eq!(abandons(&out, c), vec![(t2, Generation(1))]);
    assert_eq!(
        task_writes(&out, t2).last().map(|r| r.state),
        Some(TaskState::Queued)
    );
    // Cancel: the Cancel travels with the record in state cancelled.
    let out = h.pass(30_000);
    assert_eq!(assigns(&out, c).len(), 1);
    let (_, out) = h.op(ADMIN, OpRequest::TaskCancel { id: t2 });
    assert_eq!(
        task_writes(&out, t2).last().map(|r| r.state),
        Some(TaskState::Cancelled)
    );
}

#[test]
fn a_restart_from_the_store_continues_where_it_left_off() {
    let mut h = H::new();
    let (c, _) = h.connect(1, "a", &[], 1);
    let (t1, _) = h.submit(SubmitRequest {
        key: Some("k".into()),
        ..req("1")
    });
    let (t2, _) = h.submit(req("2"));
    let _ = h.accept(c, t1, 1);
    h.restart(Policy::default(), T0 + 1_000);
    // Task ids continue, keys survive.
    let (t3, _) = h.submit(req("3"));
    assert_eq!(t3.0, t2.0 + 1);
    let (resp, _) = h.submit_resp(SubmitRequest {
        key: Some("k".into()),
        ..req("1 again")
    });
    assert_eq!(json_ok(&resp)["id"], t1.0);
    // The agent returns with t1; t2 and t3 wait for its slot.
    let out = h.hello(2, "a", &[], 1, vec![held(t1, 1, Phase::Waking)]);
    let c2 = ConnId(2);
    assert!(assigns(&out, c2).is_empty());
    let _ = h.start(c2, t1, 1);
    let out = h.complete(c2, t1, 1);
    assert_eq!(
        assigns(&out, c2).iter().map(|a| a.task).collect::<Vec<_>>(),
        vec![t2]
    );
}

// === Alerts ===

fn open_alerts(h: &mut H) -> Vec<(String, String)> {
    let (resp, _) = h.op(ADMIN, OpRequest::Alerts);
    json_ok(&resp)["alerts"]
        .as_array()
        .expect("alerts")
        .iter()
        .map(|a| {
            (
                a["alert"].as_str().unwrap_or_default().to_string(),
                a["subject"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

#[test]
fn agent_down_is_raised_after_the_policy_time_and_cleared_on_return() {
    let mut h = H::new();
    let (c, _) = h.connect(1, "a", &[], 1);
    let _ = h.close(c);
    let out = h.pass(115_000);
    assert!(out.alerts.is_empty(), "not before agent_down_alert");
    let out = h.pass(10_000);
    assert_eq!(out.alerts.len(), 1);
    assert_eq!(alerts_json(&out)[0]["alert"], "agent_down");
    assert_eq!(open_alerts(&mut h), vec![("agent_down".into(), "a".into())]);
    // The raise is in the event log, with the state change that caused it.
    assert!(out.writes.iter().any(
        |w| matches!(w, Write::Event { event, .. } if json_of(event)["alert"] == "agent_down")
    ));
    let _ = h.connect(2, "a", &[], 1);
    let out = h.tick();
    assert_eq!(alerts_json(&out)[0]["state"], "cleared");
    assert!(open_alerts(&mut h).is_empty());
}

#[test]
fn a_task_failed_for_good_raises_an_alert_that_requeue_clears() {
    let mut h = H::new();
    let (c, _) = h.connect(1, "a", &[], 1);
    let (t, _) = h.submit(req("t"));
    let _ = h.accept(c, t, 1);
    let _ = h.start(c, t, 1);
    let out = h.fail(c, t, 1, true);
    assert!(
        alerts_json(&out)
            .iter()
            .any(|a| a["alert"] == "task_failed")
    );
    assert_eq!(
        open_alerts(&mut h),
        vec![("task_failed".into(), t.to_string())]
    );
    let (resp, _) = h.op(ADMIN, OpRequest::TaskRequeue { id: t });
    json_ok(&resp);
    assert!(open_alerts(&mut h).is_empty());
}

#[test]
fn a_running_task_without_progress_is_stalled_not_failed() {
    let mut h = H::new();
    let (c, _) = h.connect(1, "a", &[], 1);
    let (t, _) = h.submit(req("t"));
    let _ = h.accept(c, t, 1);
    let _ = h.start(c, t, 1);
    h.online.insert(
        c,
        vec![HeldTask {
            task: t,
            generation: Generation(1),
            phase: Phase::Running,
        }],
    );
    let out = h.pass(31 * 60_000);
    assert!(
        alerts_json(&out)
            .iter()
            .any(|a| a["alert"] == "stalled" && a["subject"] == t.to_string())
    );
    assert_eq!(
        h.task(t).state,
        TaskState::Running,
        "a stall is an alert, not a failure"
    );
    let _ = h.report(
        c,
        t,
        1,
        ReportBody::Progress {
            note: "alive".into(),
        },
    );
    // A busy hub passes over its alerts at most once per ALERT_EVERY.
    let _ = h.pass(crate::timers::ALERT_EVERY);
    assert!(open_alerts(&mut h).is_empty(), "progress clears the stall");
}

#[test]
fn a_submitter_past_its_limit_is_busy_and_others_are_not() {
    let limits = Limits {
        max_tasks_per_submitter: 2,
        ..Limits::default()
    };
    let mut h = H::with(Policy::default(), limits);
    let _ = h.submit(req("1"));
    let _ = h.submit(req("2"));
    let (resp, out) = h.submit_resp(req("3"));
    let e = op_err(&resp);
    assert_eq!(e.code, OpErrorCode::Busy);
    assert!(
        e.message.contains("max_tasks_per_submitter"),
        "{}",
        e.message
    );
    assert!(
        !out.writes.iter().any(|w| matches!(w, Write::Task(_))),
        "nothing accepted"
    );
    assert_eq!(h.core.live_tasks(), 2);
}

#[test]
fn a_sidecar_shutting_down_gets_no_new_work_until_it_says_hello_again() {
    let mut h = H::new();
    let (c, _) = h.connect(1, "a", &[], 2);
    let out = h.step(Input::Session {
        conn: c,
        msg: SessionMsg::Heartbeat(Heartbeat {
            seq: 2,
            state: SidecarState::Draining,
            tasks: Vec::new(),
            free_slots: 2,
            self_test: SelfTest {
                passed: true,
                hub_rtt_us: Some(100),
                command_ok: true,
                disk_ok: true,
                problems: Vec::new(),
            },
            host: HostFigures::default(),
            activity: Vec::new(),
        }),
    });
    assert!(all_assigns(&out).is_empty());
    let (t, out) = h.submit(req("t"));
    assert!(
        assigns(&out, c).is_empty(),
        "no work for a sidecar that is stopping"
    );
    assert_eq!(h.task(t).state, TaskState::Queued);
    assert!(
        h.agent_json("a")["unavailable_reason"]
            .as_str()
            .unwrap_or_default()
            .contains("shutting down")
    );
    let (c2, out) = h.connect(2, "a", &[], 2);
    assert_eq!(
        assigns(&out, c2).len(),
        1,
        "its next session takes work again"
    );
}

// === Regressions found by the simulation ===

#[test]
fn a_late_report_for_an_attempt_the_hub_ended_is_stale_not_current() {
    let (mut h, c, t) = one_assigned();
    let _ = h.accept(c, t, 1);
    h.advance(61_000);
    let out = h.tick();
    assert_eq!(
        abandons(&out, c),
        vec![(t, Generation(1))],
        "start timeout abandons attempt 1"
    );
    assert_eq!(h.attempt(t, 1).outcome, Some(Outcome::StartTimeout));
    let (_, late) = h.report_input(
        c,
        t,
        1,
        ReportBody::Started {
            pid: None,
            session: None,
        },
    );
    let out = h.step(late);
    assert_eq!(
        abandons(&out, c),
        vec![(t, Generation(1))],
        "the late Started is told to abandon"
    );
    assert_ne!(
        h.task(t).state,
        TaskState::Running,
        "an ended attempt cannot make the task run"
    );
    let finished = ReportBody::Finished {
        outcome: Outcome::Completed,
        result: None,
        error: None,
        work: None,
    };
    let (_, late) = h.report_input(c, t, 1, finished);
    let out = h.step(late);
    assert!(
        abandons(&out, c).is_empty(),
        "a late final report is a harmless repeat"
    );
    assert_ne!(h.task(t).state, TaskState::Completed);
}

#[test]
fn a_requeued_dependency_still_releases_its_dependants() {
    let mut h = H::new();
    let (c, _) = h.connect(1, "a", &[], 1);
    let (a, _) = h.submit(req("a"));
    let _ = h.run_ok(c, a, 1);
    let (other, _) = h.submit(req("c"));
    let mut r = req("b");
    r.after = vec![a, other];
    let (b, _) = h.submit(r);
    assert_eq!(h.task(b).state, TaskState::Blocked);
    let (resp, _) = h.op(ADMIN, OpRequest::TaskRequeue { id: a });
    json_ok(&resp);
    let g = h.task(other).generation.0;
    let _ = h.run_ok(c, other, g);
    assert_eq!(h.task(b).state, TaskState::Blocked, "a is live again");
    let g = h.task(a).generation.0;
    let _ = h.run_ok(c, a, g);
    assert_ne!(
        h.task(b).state,
        TaskState::Blocked,
        "a completed again: b runs"
    );
}

#[test]
fn the_agents_answer_stays_bounded_for_a_large_fleet_and_counts_everyone() {
    let mut h = H::new();
    for i in 0..3000u64 {
        let _ = h.connect(
            i + 1,
            &format!("agent-{i:05}"),
            &["a-capability-with-a-long-name"],
            4,
        );
    }
    let (resp, _) = h.op(ADMIN, OpRequest::Agents);
    let OpResponse::Ok { json } = &resp else {
        panic!("expected Ok")
    };
    assert!(
        json.len() <= AGENTS_REPLY_BYTES_MAX + 4096,
        "{} bytes",
        json.len()
    );
    let v: Value = serde_json::from_str(json).expect("json");
    assert_eq!(v["total"], 3000);
    assert_eq!(v["by_state"]["online"], 3000);
    let listed = v["agents"].as_array().expect("agents").len();
    assert_eq!(v["truncated"], listed < 3000);
}

#[test]
fn the_fleet_page_walks_every_agent_by_name_and_counts_the_whole_fleet() {
    let mut h = H::new();
    for i in 0..250u64 {
        let _ = h.connect(i + 1, &format!("agent-{i:05}"), &[], 1);
    }
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    for _ in 0..10 {
        let page = h.core.agents_page(h.now, after.as_deref(), 100);
        assert_eq!(page.total, 250);
        assert_eq!(page.by_state.get("online"), Some(&250));
        assert!(page.agents.len() <= 100);
        seen.extend(page.agents.iter().map(|a| a.name.clone()));
        after = page.next_after;
        if after.is_none() {
            break;
        }
    }
    let want: Vec<String> = (0..250).map(|i| format!("agent-{i:05}")).collect();
    assert_eq!(seen, want, "every agent once, in name order");
    // A name that is no agent still places the page; a huge limit is clamped.
    let page = h.core.agents_page(h.now, Some("agent-00099x"), usize::MAX);
    assert_eq!(page.agents[0].name, "agent-00100");
    assert_eq!(page.agents.len(), 150);
    assert!(h.core.agents_page(h.now, Some("zzz"), 10).agents.is_empty());
}

#[test]
fn a_batch_writes_each_record_once_in_its_final_state_and_keeps_every_event() {
    let mut h = H::new();
    let (c, _) = h.connect(1, "a", &[], 1);
    let (t, _) = h.submit(req("t"));
    let mk = |id: u64, body: ReportBody| Input::Session {
        conn: c,
        msg: SessionMsg::Report(Report {
            id: ReportId(id),
            task: t,
            generation: Generation(1),
            body,
        }),
    };
    let out = h.batch(vec![
        mk(1, ReportBody::Accepted),
        mk(
            2,
            ReportBody::Started {
                pid: None,
                session: None,
            },
        ),
        mk(
            3,
            ReportBody::Finished {
                outcome: Outcome::Completed,
                result: None,
                error: None,
                work: None,
            },
        ),
    ]);
    let tasks = task_writes(&out, t);
    assert_eq!(tasks.len(), 1, "one write of the task per batch");
    assert_eq!(tasks[0].state, TaskState::Completed, "its final state");
    let events = out
        .writes
        .iter()
        .filter(|w| matches!(w, Write::Event { .. }))
        .count();
    assert!(
        events >= 3,
        "every transition is still in the event log ({events})"
    );
}

// === Identity and grants (issue 12) ===

fn token_for(
    h: &mut H,
    hash: &str,
    role: Role,
    name: Option<&str>,
    caps: Option<&[&str]>,
    slots: Option<u32>,
) -> OpResponse {
    h.op_with(
        ADMIN,
        OpRequest::TokenCreate {
            role,
            ttl_s: 600,
            name: name.map(|n| AgentName::new(n).expect("valid name")),
            capabilities: caps.map(|c| c.iter().map(|s| s.to_string()).collect()),
            slots,
        },
        Some((format!("secret-{hash}"), hash.to_string())),
    )
    .0
}

fn caps(c: &[&str]) -> Vec<String> {
    c.iter().map(|s| s.to_string()).collect()
}

#[test]
fn a_held_name_is_refused_naming_its_holder() {
    let mut h = H::new();
    token(&mut h, Role::Agent, 600, "h1");
    token(&mut h, Role::Agent, 600, "h2");
    let r = h.enroll_input("h1", Role::Agent, "build-01", "k:one");
    assert!(matches!(r, EnrollResponse::Enrolled { .. }), "{r:?}");
    h.advance(1_000);
    let r = h.enroll_input("h2", Role::Agent, "build-01", "k:two");
    match r {
        EnrollResponse::Refused(EnrollRefusal::NameTaken {
            name,
            holder,
            enrolled_at_unix,
        }) => {
            assert_eq!(name, "build-01");
            assert!("fp-build-01-one".starts_with(&holder), "{holder}");
            assert_eq!(enrolled_at_unix, T0 / 1000);
        }
        other => panic!("a second holder of build-01 was not refused: {other:?}"),
    }
    // The refusal spent nothing and changed nothing.
    assert!(h.store.tokens["h2"].used_at.is_none());
    assert!(!h.store.identities.contains_key("fp-build-01-two"));
    assert!(h.store.identities["fp-build-01-one"].revoked_at.is_none());
}

#[test]
fn a_token_made_for_a_name_replaces_its_holder_in_the_same_commit() {
    let mut h = H::new();
    token(&mut h, Role::Agent, 600, "h1");
    let _ = h.enroll_input("h1", Role::Agent, "build-01", "k:old");
    let _ = json_ok(&token_for(
        &mut h,
        "h2",
        Role::Agent,
        Some("build-01"),
        None,
        None,
    ));
    // Bound to its name: another name cannot use it.
    let r = h.enroll_input("h2", Role::Agent, "build-02", "k:x");
    assert!(
        matches!(
            r,
            EnrollResponse::Refused(EnrollRefusal::NameRefused { .. })
        ),
        "{r:?}"
    );
    let reply = ReplyId(h.next_reply);
    h.next_reply += 1;
    h.core.handle(
        h.now,
        Input::Enroll {
            secret_hash: "h2".into(),
            role: Role::Agent,
            name: "build-01".into(),
            cert: ("PEM".into(), "fp-build-01-new".into(), "k:new".into()),
            grant: (Vec::new(), 1),
            reply,
        },
        &h.store,
    );
    let out = h.flush();
    // One output (one commit) revokes the old identity and adds the new one.
    let ids: Vec<&Identity> = out
        .writes
        .iter()
        .filter_map(|w| match w {
            Write::Identity(i) => Some(i),
            _ => None,
        })
        .collect();
    assert!(
        ids.iter()
            .any(|i| i.fingerprint == "fp-build-01-old" && i.revoked_at.is_some())
    );
    assert!(
        ids.iter()
            .any(|i| i.fingerprint == "fp-build-01-new" && i.revoked_at.is_none())
    );
    assert_eq!(out.revoked, vec!["fp-build-01-old".to_string()]);
}

#[test]
fn admin_is_reserved_and_agents_and_operators_have_separate_namespaces() {
    let mut h = H::new();
    token(&mut h, Role::Agent, 600, "h1");
    let r = h.enroll_input("h1", Role::Agent, "admin", "k:evil");
    assert!(
        matches!(
            r,
            EnrollResponse::Refused(EnrollRefusal::NameRefused { .. })
        ),
        "{r:?}"
    );
    assert_eq!(
        op_err(&token_for(
            &mut h,
            "h9",
            Role::Agent,
            Some("admin"),
            None,
            None
        ))
        .code,
        OpErrorCode::Invalid
    );
    // An agent and an operator may share a name; revoking the agent leaves the operator.
    token(&mut h, Role::Operator, 600, "h2");
    let _ = h.enroll_input("h1", Role::Agent, "alice", "k:agent");
    let r = h.enroll_input("h2", Role::Operator, "alice", "k:op");
    assert!(matches!(r, EnrollResponse::Enrolled { .. }), "{r:?}");
    let (resp, _) = h.op(
        ADMIN,
        OpRequest::AgentRevoke {
            name: "alice".into(),
        },
    );
    let _ = json_ok(&resp);
    assert!(h.store.identities["fp-alice-agent"].revoked_at.is_some());
    assert!(h.store.identities["fp-alice-op"].revoked_at.is_none());
    // `agent revoke admin` cannot touch the hub's admin credential.
    let (resp, _) = h.op(
        ADMIN,
        OpRequest::AgentRevoke {
            name: "admin".into(),
        },
    );
    assert_eq!(op_err(&resp).code, OpErrorCode::NotFound);
    let (resp, _) = h.op(ADMIN, OpRequest::Agents);
    let _ = json_ok(&resp);
}

#[test]
fn the_last_admin_cannot_be_revoked() {
    use muster_wire::msg::IdentityTarget;
    let mut h = H::new();
    let (resp, _) = h.op(
        ADMIN,
        OpRequest::IdentityRevoke(IdentityTarget::Named {
            role: Role::Admin,
            name: "admin".into(),
        }),
    );
    let e = op_err(&resp);
    assert_eq!(e.code, OpErrorCode::Conflict);
    assert!(e.message.contains("last admin"), "{}", e.message);
    assert!(h.core.identity(ADMIN).is_some());
    // With a second admin, the first can go, by fingerprint prefix.
    token(&mut h, Role::Admin, 600, "h1");
    let _ = h.enroll_input("h1", Role::Admin, "root2", "k:r");
    let (resp, out) = h.op(
        "fp-root2-r",
        OpRequest::IdentityRevoke(IdentityTarget::Fingerprint("fp-admin".into())),
    );
    let v = json_ok(&resp);
    assert_eq!(v["revoked"], true);
    assert_eq!(out.revoked, vec![ADMIN.to_string()]);
    assert!(h.core.identity(ADMIN).is_none());
}

#[test]
fn capabilities_and_slots_are_granted_not_claimed() {
    let mut h = H::new();
    let _ = json_ok(&token_for(
        &mut h,
        "h1",
        Role::Agent,
        None,
        Some(&["rust"]),
        Some(2),
    ));
    // Asking beyond the token's grant is refused without spending it.
    let r = h.enroll_asking("h1", Role::Agent, "b1", "k:1", (caps(&["rust", "gpu"]), 1));
    assert!(
        matches!(r, EnrollResponse::Refused(EnrollRefusal::NotGranted { .. })),
        "{r:?}"
    );
    let r = h.enroll_asking("h1", Role::Agent, "b1", "k:1", (caps(&["rust"]), 3));
    assert!(
        matches!(r, EnrollResponse::Refused(EnrollRefusal::NotGranted { .. })),
        "{r:?}"
    );
    assert!(h.store.tokens["h1"].used_at.is_none());
    let r = h.enroll_asking("h1", Role::Agent, "b1", "k:1", (caps(&["rust"]), 1));
    assert!(matches!(r, EnrollResponse::Enrolled { .. }), "{r:?}");
    let id = &h.store.identities["fp-b1-1"];
    assert_eq!((id.capabilities.clone(), id.slots), (caps(&["rust"]), 2));
    // A hello that claims more than the grant is refused and closed.
    let hello = |caps: &[&str], slots: u32| Input::Hello {
        conn: ConnId(7),
        fingerprint: "fp-b1-1".into(),
        hello: Hello {
            version: "x".repeat(10_000),
            agent: AgentName::new("b1").expect("name"),
            capabilities: caps.iter().map(|c| c.to_string()).collect(),
            slots,
            resume: Vec::new(),
            workspace: Default::default(),
        },
    };
    let out = h.step(hello(&["rust", "gpu"], 1));
    assert!(
        matches!(refused(&out, ConnId(7)), Some(Refused::BadHello { reason }) if reason.contains("gpu"))
    );
    assert_eq!(out.closes, vec![ConnId(7)]);
    let out = h.step(hello(&["rust"], 4_000_000_000));
    assert!(
        matches!(refused(&out, ConnId(7)), Some(Refused::BadHello { reason }) if reason.contains("slots"))
    );
    // Within the grant it is welcome, and its version string is cut to the limit.
    let out = h.step(hello(&["rust"], 2));
    assert!(matches!(
        sends_to(&out, ConnId(7)).first(),
        Some(HubMsg::Welcome(_))
    ));
    assert_eq!(
        h.store.agents["b1"].version.len(),
        limits::VERSION_BYTES_MAX
    );
    // An operator narrows the grant: the live registry entry follows at once.
    let (resp, _) = h.op(
        ADMIN,
        OpRequest::AgentSet {
            name: "b1".into(),
            capabilities: Some(Vec::new()),
            slots: Some(1),
        },
    );
    let _ = json_ok(&resp);
    assert!(h.store.agents["b1"].capabilities.is_empty());
    assert_eq!(h.store.agents["b1"].slots, 1);
    let (resp, _) = h.op(
        OPERATOR,
        OpRequest::AgentSet {
            name: "b1".into(),
            capabilities: None,
            slots: Some(256),
        },
    );
    assert_eq!(op_err(&resp).code, OpErrorCode::Forbidden);
}

#[test]
fn a_heartbeat_listing_too_many_tasks_ends_the_session() {
    let mut h = H::new();
    let _ = h.connect(1, "a", &[], 1);
    let held: Vec<HeldTask> = (0..=limits::HELD_TASKS_MAX as u64)
        .map(|i| HeldTask {
            task: TaskId(i + 1_000_000),
            generation: Generation(1),
            phase: Phase::Running,
        })
        .collect();
    let out = h.step(Input::Session {
        conn: ConnId(1),
        msg: SessionMsg::Heartbeat(muster_wire::msg::Heartbeat {
            seq: 1,
            state: muster_wire::msg::SidecarState::Ready,
            tasks: held,
            free_slots: 1,
            self_test: Default::default(),
            host: Default::default(),
            activity: Vec::new(),
        }),
    });
    assert_eq!(out.closes, vec![ConnId(1)]);
    // No Abandon storm for a thousand made-up tasks.
    assert!(sends_to(&out, ConnId(1)).len() <= 1);
}

#[test]
fn agent_text_is_bounded_on_arrival_and_timeouts_at_admission() {
    let mut h = H::new();
    let (conn, _) = h.connect(1, "a", &[], 1);
    let (id, _) = h.submit(req("t"));
    let big = "x".repeat(500_000);
    let out = h.report(
        conn,
        id,
        1,
        ReportBody::Finished {
            outcome: Outcome::Failed,
            result: None,
            error: Some(Failure {
                reason: big.clone(),
                command: vec![big.clone(); 1000],
                stdout_tail: big.clone(),
                stderr_tail: format!("{big}END"),
                ..Default::default()
            }),
            work: None,
        },
    );
    drop(out);
    let a = h.attempt(id, 1);
    let e = a.error.as_ref().expect("the failure is kept");
    assert_eq!(e.reason.len(), limits::REASON_BYTES_MAX);
    assert_eq!(e.command.len(), limits::COMMAND_WORDS_MAX);
    assert!(e.stderr_tail.ends_with("END"));
    assert_eq!(e.stderr_tail.len(), limits::TAIL_BYTES_MAX);
    // A timeout past the maximum is refused at admission (it used to wrap `start + timeout`).
    let mut r = req("forever");
    r.timeout_ms = Some(u64::MAX);
    let (resp, _) = h.op(ADMIN, OpRequest::Submit(r));
    assert_eq!(op_err(&resp).code, OpErrorCode::Invalid);
    let mut r = req("many");
    r.max_attempts = Some(u32::MAX);
    let (resp, _) = h.op(ADMIN, OpRequest::Submit(r));
    assert_eq!(op_err(&resp).code, OpErrorCode::Invalid);
}

// === Timers as data ===

#[test]
fn the_core_names_its_next_deadline_and_a_tick_before_it_changes_nothing() {
    let mut h = H::new();
    let (_c, _) = h.connect(1, "a", &[], 1);
    let (t, _) = h.submit(req("t"));
    assert_eq!(h.task(t).state, TaskState::Assigned);
    let accept = Policy::default().accept_timeout.as_millis() as u64;
    assert_eq!(
        h.core.poll_timeout(),
        Some(h.now + accept),
        "the accept timeout is the only deadline"
    );
    h.advance(accept - 1);
    let out = h.tick();
    assert!(
        out.writes.is_empty() && out.sends.is_empty(),
        "nothing due yet"
    );
    assert_eq!(h.task(t).state, TaskState::Assigned);
    h.advance(1);
    let _ = h.tick();
    let rec = h.task(t);
    assert_ne!(
        rec.state,
        TaskState::Assigned,
        "the accept timeout ended the attempt"
    );
}

#[test]
fn an_idle_core_has_no_deadline_and_stale_entries_go_when_they_come_due() {
    let mut h = H::new();
    let sweep = T0 + crate::retention::PRUNE_EVERY;
    assert_eq!(
        h.core.poll_timeout(),
        Some(sweep),
        "only the retention sweep"
    );
    let (c, _) = h.connect(1, "a", &[], 4);
    assert_eq!(
        h.core.poll_timeout(),
        Some(sweep),
        "an idle agent needs no tick"
    );
    let ids: Vec<TaskId> = (0..4).map(|i| h.submit(req(&format!("t{i}"))).0).collect();
    for &t in &ids {
        let _ = h.accept(c, t, 1);
        let _ = h.start(c, t, 1);
        let _ = h.complete(c, t, 1);
    }
    // Every accept and start deadline was armed and is now stale: ticking past
    // them drops them without touching a task.
    h.advance(Policy::default().start_timeout.as_millis() as u64 * 2);
    let out = h.tick();
    assert!(out.writes.is_empty(), "{:?}", out.writes);
    assert_eq!(
        h.core.deadlines_held(),
        0,
        "one entry per live task, none for finished ones"
    );
    // What is left is the one alert pass a running task's progress asked for;
    // it finds nothing and asks for no other.
    let stall = Policy::default().stall_alert.as_millis() as u64;
    let at = h.core.poll_timeout().expect("the stall check");
    assert!(at <= T0 + stall + 1000, "{at}");
    h.now = at;
    let out = h.tick();
    assert!(out.writes.is_empty() && out.alerts.is_empty());
    assert!(
        h.core.retention_due(h.now).is_some(),
        "the shell prunes after the batch"
    );
    assert_eq!(
        h.core.poll_timeout(),
        Some(h.now + crate::retention::PRUNE_EVERY),
        "then only the next sweep"
    );
}

#[test]
fn a_retry_in_backoff_wakes_the_core_when_it_is_due() {
    let mut h = H::new();
    let (c, _) = h.connect(1, "a", &[], 1);
    let (t, _) = h.submit(req("t"));
    let _ = h.accept(c, t, 1);
    let _ = h.start(c, t, 1);
    let _ = h.fail(c, t, 1, false);
    let rec = h.task(t);
    assert_eq!(rec.state, TaskState::Queued);
    let not_before = rec.not_before.expect("a backoff");
    assert_eq!(h.core.poll_timeout(), Some(not_before));
    h.now = not_before;
    let _ = h.tick();
    assert_eq!(h.task(t).state, TaskState::Assigned, "assigned when due");
}

#[test]
fn invariants_hold_after_every_batch_and_a_breach_is_named() {
    let mut h = H::new();
    let (c, _) = h.connect(1, "a", &[], 1);
    let (t, _) = h.submit(req("t"));
    let _ = h.accept(c, t, 1);
    assert_eq!(h.core.violations(), 0);
    // Break the books on purpose: the agent forgets the task it holds.
    if let Some(a) = h.core.agents.get_mut("a") {
        a.tasks.clear();
    }
    let err = h.core.check_invariants(&[t]).expect_err("a breach");
    assert!(
        err.contains(&format!("task {t}")) && err.contains("does not count it"),
        "{err}"
    );
}

#[test]
fn an_attempt_renders_as_task_show_has_always_listed_it() {
    let a = AttemptRecord {
        task: TaskId(7),
        generation: Generation(2),
        agent: "a".into(),
        assigned_at: 1,
        accepted_at: Some(2),
        started_at: Some(3),
        ended_at: Some(4),
        outcome: Some(Outcome::Failed),
        error: Some(Failure {
            reason: "exit status 3".into(),
            exit_code: Some(3),
            signal: Some(9),
            command: vec!["run".into()],
            stdout_tail: "out".into(),
            stderr_tail: "err".into(),
            no_retry: true,
        }),
        pid: Some(42),
        session: Some("s".into()),
        work: Some(muster_wire::work::WorkResult {
            branch: "muster/7".into(),
            base_commit: "b".into(),
            head: "h".into(),
            commits: 2,
            diffstat: " x | 1 +".into(),
            dirty: true,
            checkpoint: Some("refs/muster/checkpoints/7/2".into()),
            link: None,
        }),
        usage: Some(muster_wire::msg::Usage {
            model: Some("m".into()),
            input_tokens: 1,
            output_tokens: 2,
            cache_read_tokens: 3,
            cache_write_tokens: 4,
            cost_micro_usd: Some(1_500_000),
        }),
    };
    let view = crate::views::AttemptView::of(&a);
    assert_keys_sorted(&view);
    assert_eq!(
        serde_json::to_string(&view).expect("renders"),
        r#"{"accepted_at":2,"agent":"a","assigned_at":1,"ended_at":4,"error":{"command":["run"],"exit_code":3,"no_retry":true,"reason":"exit status 3","signal":9,"stderr_tail":"err","stdout_tail":"out"},"generation":2,"outcome":"failed","pid":42,"session":"s","started_at":3,"usage":{"cache_read_tokens":3,"cache_write_tokens":4,"cost_micro_usd":1500000,"cost_usd":1.5,"input_tokens":1,"model":"m","output_tokens":2},"work":{"base_commit":"b","branch":"muster/7","checkpoint":"refs/muster/checkpoints/7/2","commits":2,"diffstat":" x | 1 +","dirty":true,"head":"h","link":null}}"#
    );
}

// === Activity, idle and stall, usage ===

/// One running attempt's activity as a sidecar measures it.
fn activity(t: TaskId, g: u64, cpu_ms: u64, output_age_ms: u64, tail: &str) -> Activity {
    Activity {
        task: t,
        generation: Generation(g),
        cpu_ms: Some(cpu_ms),
        output_bytes: 100,
        output_age_ms: Some(output_age_ms),
        workspace_age_ms: None,
        output_tail: tail.into(),
    }
}

impl H {
    fn heartbeat_activity(&mut self, conn: ConnId, activity: Vec<Activity>) -> Output {
        let tasks = self.online.get(&conn).cloned().unwrap_or_default();
        self.next_reply += 1;
        self.step(Input::Session {
            conn,
            msg: SessionMsg::Heartbeat(Heartbeat {
                seq: self.next_reply,
                state: SidecarState::Ready,
                tasks,
                free_slots: 0,
                self_test: SelfTest {
                    passed: true,
                    ..SelfTest::default()
                },
                host: HostFigures::default(),
                activity,
            }),
        })
    }

    /// A connected agent running one task, started now.
    fn running(&mut self) -> (ConnId, TaskId) {
        let (c, _) = self.connect(1, "a", &[], 1);
        let (t, _) = self.submit(req("t"));
        let _ = self.accept(c, t, 1);
        let _ = self.start(c, t, 1);
        self.online.insert(c, vec![held(t, 1, Phase::Running)]);
        (c, t)
    }

    /// Heartbeats every 10 s for `ms`, each with the activity `f(elapsed)`
    /// gives, and the ticks the hub would have between them.
    fn beat_for(
        &mut self,
        conn: ConnId,
        ms: u64,
        mut f: impl FnMut(u64) -> Vec<Activity>,
    ) -> Output {
        let mut all = Output::default();
        let mut elapsed = 0;
        while elapsed < ms {
            self.advance(10_000);
            elapsed += 10_000;
            let out = self.heartbeat_activity(conn, f(elapsed));
            merge(&mut all, out);
            let out = self.tick();
            merge(&mut all, out);
        }
        all
    }
}

fn activity_class(h: &H, t: TaskId) -> &'static str {
    h.core
        .activity_view(t, h.now)
        .map(|v| v.class)
        .unwrap_or("none")
}

#[test]
fn a_busy_agent_that_prints_nothing_raises_nothing_over_three_stall_windows() {
    let mut h = H::new();
    let (c, t) = h.running();
    // Half a core, not one byte of output, for 90 minutes.
    let out = h.beat_for(c, 90 * 60_000, |e| vec![activity(t, 1, e / 2, e, "")]);
    assert!(alerts_json(&out).is_empty(), "{:?}", alerts_json(&out));
    assert!(open_alerts(&mut h).is_empty());
    assert_eq!(activity_class(&h, t), "busy_silent");
}

#[test]
fn an_idle_agent_raises_agent_idle_after_idle_alert_with_its_last_output() {
    let mut h = H::new();
    let (c, t) = h.running();
    let prompt = "Apply these edits? [y/N]\n";
    let out = h.beat_for(c, 4 * 60_000, |e| vec![activity(t, 1, 40, e, prompt)]);
    assert!(alerts_json(&out).is_empty(), "not idle for 5 minutes yet");
    assert_eq!(activity_class(&h, t), "idle");
    let out = h.beat_for(c, 70_000, |e| {
        vec![activity(t, 1, 40, 4 * 60_000 + e, prompt)]
    });
    let raised = alerts_json(&out);
    let idle = raised
        .iter()
        .find(|a| a["alert"] == "agent_idle" && a["subject"] == t.to_string())
        .expect("agent_idle raised");
    let message = idle["message"].as_str().unwrap_or_default();
    assert!(message.contains("Apply these edits? [y/N]"), "{message}");
    assert!(message.contains("on a"), "{message}");
    // Output again: active, and the alert clears.
    let _ = h.heartbeat_activity(c, vec![activity(t, 1, 40, 0, "")]);
    let _ = h.pass(crate::timers::ALERT_EVERY);
    assert_eq!(activity_class(&h, t), "active");
    assert!(open_alerts(&mut h).is_empty(), "{:?}", open_alerts(&mut h));
}

#[test]
fn an_idle_agent_is_stalled_after_stall_alert_and_both_alerts_are_open() {
    let mut h = H::new();
    let (c, t) = h.running();
    let _ = h.beat_for(c, 31 * 60_000, |e| vec![activity(t, 1, 0, e, "")]);
    assert_eq!(activity_class(&h, t), "stalled");
    let open = open_alerts(&mut h);
    assert!(
        open.contains(&("stalled".into(), t.to_string())),
        "{open:?}"
    );
    assert!(
        open.contains(&("agent_idle".into(), t.to_string())),
        "{open:?}"
    );
    assert_eq!(h.task(t).state, TaskState::Running, "alerts, not failures");
}

#[test]
fn output_or_a_progress_note_keeps_an_agent_active() {
    let mut h = H::new();
    let (c, t) = h.running();
    // Output every heartbeat, no CPU to speak of.
    let out = h.beat_for(c, 40 * 60_000, |_| vec![activity(t, 1, 0, 1_000, "")]);
    assert!(alerts_json(&out).is_empty());
    assert_eq!(activity_class(&h, t), "active");
    let _ = h.report(
        c,
        t,
        1,
        ReportBody::Progress {
            note: "half".into(),
        },
    );
    assert_eq!(activity_class(&h, t), "active");
}

#[test]
fn activity_of_another_attempt_or_agent_is_ignored() {
    let mut h = H::new();
    let (c, t) = h.running();
    let _ = h.beat_for(c, 60_000, |e| vec![activity(t, 2, 0, e, "stale")]);
    let v = h.core.activity_view(t, h.now).expect("running");
    assert_eq!(v.heard_age_ms, None, "generation 2 is not the attempt");
    assert_eq!(v.class, "active", "no figures: the progress rule alone");
}

#[test]
fn without_activity_figures_stalled_keeps_its_old_meaning() {
    let mut h = H::new();
    let (_, t) = h.running();
    let out = h.pass(31 * 60_000);
    assert!(
        alerts_json(&out)
            .iter()
            .any(|a| a["alert"] == "stalled" && a["subject"] == t.to_string())
    );
    assert!(
        !alerts_json(&out).iter().any(|a| a["alert"] == "agent_idle"),
        "idle needs CPU figures"
    );
}

#[test]
fn the_activity_view_shows_cpu_in_the_last_minute_and_ages() {
    let mut h = H::new();
    let (c, t) = h.running();
    let _ = h.beat_for(c, 120_000, |e| vec![activity(t, 1, e / 10, 12_000, "")]);
    let v = h.core.activity_view(t, h.now).expect("running");
    assert_eq!(v.cpu_last_minute_ms, Some(6_000));
    assert_eq!(v.output_age_ms, Some(12_000));
    assert_eq!(v.cpu_ms, Some(12_000));
    assert_keys_sorted(&v);
}

#[test]
fn progress_notes_are_events() {
    let mut h = H::new();
    let (c, t) = h.running();
    let out = h.report(
        c,
        t,
        1,
        ReportBody::Progress {
            note: "3 of 12 tests fixed".into(),
        },
    );
    let events: Vec<Value> = out
        .writes
        .iter()
        .filter_map(|w| match w {
            Write::Event { event, .. } => Some(json_of(event)),
            _ => None,
        })
        .collect();
    let e = events
        .iter()
        .find(|e| e["kind"] == "progress")
        .expect("a progress event");
    assert_eq!(e["note"], "3 of 12 tests fixed");
    assert_eq!(e["id"], t.0);
    assert_eq!(e["agent"], "a");
}

fn usage(input: u64, output: u64, cost: Option<u64>) -> Usage {
    Usage {
        model: Some("claude-sonnet-4-5".into()),
        input_tokens: input,
        output_tokens: output,
        cache_read_tokens: input * 10,
        cache_write_tokens: 1,
        cost_micro_usd: cost,
    }
}

fn stats_json(h: &mut H) -> Value {
    let (resp, _) = h.op(OPERATOR, OpRequest::Stats);
    json_ok(&resp)
}

#[test]
fn usage_reports_are_cumulative_per_attempt_and_summed_per_agent_and_label() {
    let mut h = H::new();
    let (c, _) = h.connect(1, "a", &[], 1);
    let labelled = SubmitRequest {
        labels: vec![("team".into(), "web".into())],
        ..req("t")
    };
    let (t, _) = h.submit(labelled);
    let _ = h.accept(c, t, 1);
    let _ = h.start(c, t, 1);
    let out = h.report(c, t, 1, ReportBody::Usage(usage(100, 10, Some(5_000))));
    assert!(
        out.writes
            .iter()
            .any(|w| matches!(w, Write::Attempt(a) if a.usage.as_ref().is_some_and(|u| u.input_tokens == 100)))
    );
    // Repeatable: a later, larger report replaces it; the sums grow by the difference.
    let _ = h.report(c, t, 1, ReportBody::Usage(usage(300, 30, Some(20_000))));
    let _ = h.report(c, t, 1, ReportBody::Usage(usage(300, 30, Some(20_000))));
    assert_eq!(
        h.attempt(t, 1).usage.as_ref().map(|u| u.input_tokens),
        Some(300)
    );
    let s = stats_json(&mut h);
    assert_eq!(s["usage"]["total"]["input_tokens"], 300);
    assert_eq!(s["usage"]["total"]["output_tokens"], 30);
    assert_eq!(s["usage"]["total"]["cache_read_tokens"], 3000);
    assert_eq!(s["usage"]["total"]["cost_micro_usd"], 20_000);
    assert_eq!(s["usage"]["by_agent"]["a"]["input_tokens"], 300);
    assert_eq!(s["usage"]["by_label"]["team=web"]["output_tokens"], 30);
    assert_eq!(h.core.counters().usage.total.input_tokens, 300);
    // Usage of a generation the hub does not know is stale, and adds nothing.
    let out = h.report(c, t, 2, ReportBody::Usage(usage(1_000, 1, None)));
    assert!(
        out.sends
            .iter()
            .any(|(_, m)| matches!(m, HubMsg::Abandon { .. }))
    );
    assert_eq!(stats_json(&mut h)["usage"]["total"]["input_tokens"], 300);
}

#[test]
fn a_usage_reports_model_is_cut_to_its_limit() {
    let mut h = H::new();
    let (c, t) = h.running();
    let mut u = usage(1, 1, None);
    u.model = Some("m".repeat(1000));
    let _ = h.report(c, t, 1, ReportBody::Usage(u));
    let model = h.attempt(t, 1).usage.clone().and_then(|u| u.model);
    assert_eq!(model.map(|m| m.len()), Some(limits::MODEL_BYTES_MAX));
}

// === Web access: API tokens and dashboard logins ===

fn api_token(h: &mut H, name: &str, role: Role, ttl_s: u64, hash: &str) -> OpResponse {
    h.op_with(
        ADMIN,
        OpRequest::ApiTokenCreate {
            role,
            ttl_s,
            name: name.into(),
        },
        Some((format!("secret-{hash}"), hash.to_string())),
    )
    .0
}

#[test]
fn api_tokens_authorize_by_role_until_they_expire_or_are_revoked() {
    let mut h = H::new();
    let v = json_ok(&api_token(&mut h, "ci", Role::Operator, 60, "h1"));
    assert_eq!(v["token"], "muster_api_secret-h1");
    assert_eq!(v["role"], "operator");
    // Hashed at rest: the store holds the hash as key, never the secret.
    assert!(h.store.api_tokens.contains_key("h1"));
    assert!(!format!("{:?}", h.store.api_tokens).contains("secret-h1"));
    let caller = "api:h1";
    let _ = json_ok(&h.op(caller, OpRequest::Agents).0);
    let e = op_err(&h.op(caller, OpRequest::TaskCancel { id: TaskId(1) }).0).clone();
    assert_eq!(e.code, OpErrorCode::Forbidden);
    assert!(
        e.message.contains("api:ci has role operator"),
        "{}",
        e.message
    );
    // Names are unique among live tokens; an operator cannot mint tokens.
    assert_eq!(
        op_err(&api_token(&mut h, "ci", Role::Operator, 60, "h2")).code,
        OpErrorCode::Conflict
    );
    let (resp, _) = h.op_with(
        OPERATOR,
        OpRequest::ApiTokenCreate {
            role: Role::Operator,
            ttl_s: 60,
            name: "x".into(),
        },
        Some(("s".into(), "h3".into())),
    );
    assert_eq!(op_err(&resp).code, OpErrorCode::Forbidden);
    // Listed without secrets; survives a restart; expires.
    let v = json_ok(&h.op(ADMIN, OpRequest::ApiTokens).0);
    assert_eq!(v["tokens"][0]["name"], "ci");
    assert!(!v.to_string().contains("secret"));
    let now = h.now;
    h.restart(Policy::default(), now + 1);
    let _ = json_ok(&h.op(caller, OpRequest::Agents).0);
    h.advance(60_000);
    assert_eq!(
        op_err(&h.op(caller, OpRequest::Agents).0).code,
        OpErrorCode::Forbidden,
        "expired"
    );
    // A revoked token stops at once and its streams are cut.
    let _ = json_ok(&api_token(&mut h, "bot", Role::Admin, 600, "h4"));
    let (resp, out) = h.op(ADMIN, OpRequest::ApiTokenRevoke { name: "bot".into() });
    let _ = json_ok(&resp);
    assert_eq!(out.revoked, vec!["api:h4".to_string()]);
    assert_eq!(
        op_err(&h.op("api:h4", OpRequest::Agents).0).code,
        OpErrorCode::Forbidden
    );
    let now = h.now;
    h.restart(Policy::default(), now + 1);
    assert_eq!(
        op_err(&h.op("api:h4", OpRequest::Agents).0).code,
        OpErrorCode::Forbidden,
        "revoked stays revoked after a restart"
    );
}

#[test]
fn dashboard_logins_are_single_use_short_lived_and_bound_to_a_live_identity() {
    let mut h = H::new();
    let login = |h: &mut H, fp: &str, role: Option<Role>, hash: &str| {
        h.op_with(
            fp,
            OpRequest::DashboardLogin { role },
            Some((format!("s-{hash}"), hash.to_string())),
        )
        .0
    };
    assert_eq!(
        op_err(&login(&mut h, ADMIN, None, "l0")).code,
        OpErrorCode::Conflict,
        "the dashboard is off"
    );
    h.core
        .set_dashboard(Some("http://127.0.0.1:7442/".into()), 120_000);
    let v = json_ok(&login(&mut h, ADMIN, None, "l1"));
    assert_eq!(v["url"], "http://127.0.0.1:7442/login?token=s-l1");
    assert_eq!(v["role"], "admin");
    // An operator may not get an admin session.
    assert_eq!(
        op_err(&login(&mut h, OPERATOR, Some(Role::Admin), "l2")).code,
        OpErrorCode::Forbidden
    );
    let now = h.now;
    let got = h.core.redeem_login(now, "l1").expect("first use");
    assert_eq!((got.fingerprint.as_str(), got.role), (ADMIN, Role::Admin));
    assert!(h.core.redeem_login(now, "l1").is_err(), "single use");
    let _ = json_ok(&login(&mut h, OPERATOR, Some(Role::Operator), "l3"));
    assert!(h.core.redeem_login(now + 120_000, "l3").is_err(), "expired");
    let _ = json_ok(&login(&mut h, OPERATOR, None, "l4"));
    let (resp, _) = h.op(
        ADMIN,
        OpRequest::IdentityRevoke(muster_wire::msg::IdentityTarget::Named {
            role: Role::Operator,
            name: "ops".into(),
        }),
    );
    let _ = json_ok(&resp);
    assert!(
        h.core.redeem_login(now, "l4").is_err(),
        "a revoked identity's login is refused"
    );
}

#[test]
fn a_submitter_submits_cancels_and_requeues_but_controls_no_agent_or_credential() {
    let mut h = H::new();
    h.add_identity("ci", Role::Submitter, "fp-ci");
    let (resp, _) = h.op(
        "fp-ci",
        OpRequest::Submit(SubmitRequest {
            title: "t".into(),
            ..Default::default()
        }),
    );
    let id = TaskId(json_ok(&resp)["id"].as_u64().expect("id"));
    let _ = json_ok(&h.op("fp-ci", OpRequest::TaskCancel { id }).0);
    let _ = json_ok(&h.op("fp-ci", OpRequest::TaskRequeue { id }).0);
    let _ = json_ok(&h.op("fp-ci", OpRequest::Agents).0);
    for refused in [
        OpRequest::AgentDrain { name: "a".into() },
        OpRequest::ApiTokens,
        OpRequest::TokenCreate {
            role: Role::Agent,
            ttl_s: 60,
            name: None,
            capabilities: None,
            slots: None,
        },
    ] {
        let e = op_err(&h.op("fp-ci", refused).0).clone();
        assert_eq!(e.code, OpErrorCode::Forbidden);
        assert!(e.message.contains("role admin needed"), "{}", e.message);
    }
    // An operator is told which roles may submit.
    let e = op_err(&h.op(OPERATOR, OpRequest::TaskCancel { id }).0).clone();
    assert!(e.message.contains("submitter or admin"), "{}", e.message);
}

#[test]
fn identities_are_listed_and_unused_join_tokens_listed_and_revoked() {
    let mut h = H::new();
    let v = json_ok(
        &h.op(
            OPERATOR,
            OpRequest::Identities {
                role: None,
                revoked: false,
            },
        )
        .0,
    );
    let names: Vec<&str> = v["identities"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|i| i["name"].as_str())
        .collect();
    assert_eq!(names, ["admin", "ops"], "by role, then name");
    token(&mut h, Role::Agent, 600, "abcdef0123456789");
    let v = json_ok(&h.op(ADMIN, OpRequest::JoinTokens).0);
    assert_eq!(v["tokens"][0]["id"], "abcdef012345");
    assert!(!v.to_string().contains("secret"));
    assert_eq!(
        op_err(&h.op(OPERATOR, OpRequest::JoinTokens).0).code,
        OpErrorCode::Forbidden
    );
    let (resp, _) = h.op(
        ADMIN,
        OpRequest::JoinTokenRevoke {
            id: "abcdef01".into(),
        },
    );
    let _ = json_ok(&resp);
    let v = json_ok(&h.op(ADMIN, OpRequest::JoinTokens).0);
    assert_eq!(v["tokens"].as_array().map(Vec::len), Some(0));
    let r = h.enroll_input("abcdef0123456789", Role::Agent, "h1", "k:1");
    assert!(
        matches!(r, EnrollResponse::Refused(_)),
        "a revoked token enrolls nobody: {r:?}"
    );
}

#[test]
fn a_queued_task_says_why_it_waits_and_one_nobody_can_run_raises_unschedulable() {
    let mut h = H::new();
    let gpu = |title: &str| SubmitRequest {
        title: title.into(),
        capabilities: vec!["gpu".into()],
        ..Default::default()
    };
    let (t1, _) = h.submit(gpu("train"));
    assert_eq!(
        h.core.waiting_reason(t1, h.now).as_deref(),
        Some("no agent is enrolled")
    );
    let (c, _) = h.connect(1, "a", &["rust"], 1);
    assert_eq!(
        h.core.waiting_reason(t1, h.now).as_deref(),
        Some("no agent has capability gpu")
    );
    let out = h.pass(5_000);
    assert!(
        alerts_json(&out)
            .iter()
            .any(|a| a["alert"] == "unschedulable"
                && a["subject"] == "1"
                && a["state"] == "raised"),
        "{:?}",
        alerts_json(&out)
    );
    // An agent with the capability arrives: the alert clears and the task runs.
    let (_c2, _) = h.connect(2, "g", &["gpu"], 1);
    let out = h.pass(5_000);
    assert!(
        alerts_json(&out)
            .iter()
            .any(|a| a["alert"] == "unschedulable" && a["state"] == "cleared"),
        "{:?}",
        alerts_json(&out)
    );
    assert_eq!(h.core.waiting_reason(t1, h.now), None, "assigned");
    // A second gpu task waits for the busy agent; a dependent waits for its dependency.
    let (t2, _) = h.submit(gpu("eval"));
    assert_eq!(
        h.core.waiting_reason(t2, h.now).as_deref(),
        Some("all 1 matching agent busy or unavailable (1 busy)")
    );
    let (t3, _) = h.submit(SubmitRequest {
        title: "report".into(),
        after: vec![t2],
        ..Default::default()
    });
    assert_eq!(
        h.core.waiting_reason(t3, h.now).as_deref(),
        Some("blocked by task 2")
    );
    let _ = c;
}

#[test]
fn a_replayed_heartbeat_keeps_the_agent_alive_but_does_not_make_a_busy_run_look_idle() {
    let mut h = H::new();
    let (c, t) = h.running();
    // A busy run that has printed nothing for 90 s: one sample says nothing of its CPU yet.
    let busy = Activity {
        task: t,
        generation: Generation(1),
        cpu_ms: Some(39_000),
        output_bytes: 0,
        output_age_ms: Some(90_000),
        workspace_age_ms: None,
        output_tail: String::new(),
    };
    let _ = h.heartbeat_activity(c, vec![busy.clone()]);
    let seq = h.next_reply;
    // The same heartbeat delivered again 700 ms later (a replayed frame): a second
    // sample of the same CPU total would read as "no CPU in the last minute".
    h.advance(700);
    let tasks = h.online.get(&c).cloned().unwrap_or_default();
    let _ = h.step(Input::Session {
        conn: c,
        msg: SessionMsg::Heartbeat(Heartbeat {
            seq,
            state: SidecarState::Ready,
            tasks,
            free_slots: 0,
            self_test: SelfTest {
                passed: true,
                ..Default::default()
            },
            host: Default::default(),
            activity: vec![busy],
        }),
    });
    let v = h.core.activity_view(t, h.now).expect("running");
    assert_eq!(
        v.cpu_last_minute_ms, None,
        "the replay was not taken as a sample: {v:?}"
    );
    assert_ne!(v.class, "idle", "{v:?}");
}

#[test]
fn the_alerts_answer_lists_recent_raises_and_clears_newest_first() {
    let mut h = H::new();
    let (c, _) = h.connect(1, "a", &[], 1);
    let _ = h.close(c);
    let _ = h.pass(125_000);
    let (_c, _) = h.connect(2, "a", &[], 1);
    let _ = h.pass(5_000);
    let v = json_ok(&h.op(OPERATOR, OpRequest::Alerts).0);
    assert_eq!(v["alerts"].as_array().map(Vec::len), Some(0), "{v}");
    let recent = v["recent"].as_array().expect("recent");
    assert_eq!(recent.len(), 2, "{v}");
    assert_eq!(
        (&recent[0]["alert"], &recent[0]["state"]),
        (&Value::from("agent_down"), &Value::from("cleared"))
    );
    assert_eq!(recent[1]["state"], "raised");
    assert!(recent[0]["at"].as_u64() > recent[1]["at"].as_u64(), "{v}");
}

#[test]
fn a_state_index_is_its_position_in_all() {
    for (i, s) in TaskState::ALL.into_iter().enumerate() {
        assert_eq!(s.index(), i, "{s:?}");
    }
}
