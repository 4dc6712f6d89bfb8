//! The sidecar core rule by rule, with explicit time.

use std::time::Duration;

use muster_wire::msg::{
    Assign, HubMsg, Outcome, Phase, ReportBody, SessionMsg, TaskSpec, Welcome, WireLimits,
};
use muster_wire::{Generation, ReportId, TaskId};

use crate::policy::{DEFERRED_HOLD_MAX, DEFERRED_MAX, ORPHAN_CLAIM, Verifier};
use crate::run::{RunEvent, RunHandle, RunMode};
use crate::{AgentCmd, CommitKind, Core, Effect, LocalTask, Policy, commit_kind};

const T0: Duration = Duration::ZERO;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn core() -> Core {
    core_with(Policy {
        slots: 4,
        ..Policy::default()
    })
}

fn core_with(policy: Policy) -> Core {
    Core::new(vec![], vec![], 1, policy, 7)
}

fn spec() -> TaskSpec {
    TaskSpec {
        title: "t".into(),
        description: String::new(),
        capabilities: vec![],
        priority: 0,
        timeout_ms: None,
        ..Default::default()
    }
}

fn assign(task: u64, g: u64) -> HubMsg {
    HubMsg::Assign(Assign {
        task: TaskId(task),
        generation: Generation(g),
        spec: spec(),
    })
}

fn abandon(task: u64, g: u64) -> HubMsg {
    HubMsg::Abandon {
        task: TaskId(task),
        generation: Generation(g),
        reason: "x".into(),
    }
}

fn sends(e: &[Effect]) -> Vec<&SessionMsg> {
    e.iter()
        .filter_map(|e| match e {
            Effect::Send(m) => Some(m),
            _ => None,
        })
        .collect()
}

#[test]
fn assign_is_persisted_before_accepted_and_repeats_are_noops() {
    let mut c = core();
    c.handle_hub(T0, assign(1, 1));
    let e = c.take_effects();
    let put = e
        .iter()
        .position(|e| matches!(e, Effect::PutTask(_)))
        .expect("put");
    let send = e
        .iter()
        .position(|e| matches!(e, Effect::Send(_)))
        .expect("send");
    assert!(put < send, "the task is stored before Accepted is sent");
    assert!(e.iter().any(|e| matches!(e, Effect::StartRun(..))));
    c.handle_hub(T0, assign(1, 1));
    assert!(
        c.take_effects().is_empty(),
        "a repeated assignment is a no-op"
    );
}

#[test]
fn happy_path_reports_and_acks_clean_up() {
    let mut c = core();
    c.handle_hub(T0, assign(1, 1));
    let _ = c.take_effects();
    c.handle_run(
        T0,
        RunEvent::Started {
            task: TaskId(1),
            generation: Generation(1),
            pid: Some(9),
            session: None,
        },
    );
    c.handle_run(
        T0,
        RunEvent::Finished {
            task: TaskId(1),
            generation: Generation(1),
            outcome: Outcome::Completed,
            result: Some("ok".into()),
            error: None,
            work: None,
        },
    );
    // A second Finished (exit after the agent's own report) is ignored.
    c.handle_run(
        T0,
        RunEvent::Finished {
            task: TaskId(1),
            generation: Generation(1),
            outcome: Outcome::Failed,
            result: None,
            error: None,
            work: None,
        },
    );
    let e = c.take_effects();
    assert_eq!(sends(&e).len(), 2);
    assert_eq!(c.outbox().count(), 3);
    c.handle_hub(T0, HubMsg::Ack { upto: ReportId(3) });
    let e = c.take_effects();
    assert!(e.contains(&Effect::DeleteTask(TaskId(1), Generation(1))));
    assert_eq!(c.outbox().count(), 0);
    assert!(c.held().is_empty());
}

#[test]
fn abandon_stops_the_run_and_drops_its_reports() {
    let mut c = core();
    c.handle_hub(T0, assign(1, 1));
    let _ = c.take_effects();
    c.handle_hub(T0, abandon(1, 1));
    let e = c.take_effects();
    assert!(e.contains(&Effect::StopRun(TaskId(1), Generation(1))));
    assert!(e.contains(&Effect::DeleteReport(ReportId(1))));
    assert_eq!(c.busy(), 0);
    // Abandon of another generation is ignored.
    c.handle_hub(T0, assign(2, 5));
    let _ = c.take_effects();
    c.handle_hub(T0, abandon(2, 4));
    assert!(c.take_effects().is_empty());
}

#[test]
fn agent_commands_check_task_and_generation() {
    let mut c = core();
    let (t, g) = (TaskId(3), Generation(2));
    assert!(
        c.handle_agent(T0, t, g, AgentCmd::Start)
            .expect_err("refused")
            .contains("not held")
    );
    c.handle_hub(T0, assign(3, 2));
    let _ = c.take_effects();
    let stale = c.handle_agent(T0, t, Generation(1), AgentCmd::Start);
    assert!(stale.expect_err("refused").contains("stale"));
    assert!(c.handle_agent(T0, t, g, AgentCmd::Start).is_ok());
    assert!(c.handle_agent(T0, t, g, AgentCmd::Current).is_ok());
    assert!(
        c.handle_agent(
            T0,
            t,
            g,
            AgentCmd::Complete {
                result: None,
                link: None
            }
        )
        .is_ok()
    );
    let e = c.take_effects();
    assert!(e.contains(&Effect::ForgetRun(t, g)));
    assert!(
        c.handle_agent(
            T0,
            t,
            g,
            AgentCmd::Complete {
                result: None,
                link: None
            }
        )
        .expect_err("refused")
        .contains("already ended")
    );
}

#[test]
fn a_newer_generation_supersedes_the_old_run() {
    let mut c = core();
    c.handle_hub(T0, assign(1, 1));
    let _ = c.take_effects();
    c.handle_hub(T0, assign(1, 2));
    let e = c.take_effects();
    assert!(e.contains(&Effect::StopRun(TaskId(1), Generation(1))));
    assert_eq!(c.held()[0].generation, Generation(2));
    // An older one arriving late is ignored.
    c.handle_hub(T0, assign(1, 1));
    assert!(c.take_effects().is_empty());
}

// === helpers for the timed rules ===

fn welcome(interval_ms: u64) -> Welcome {
    Welcome {
        hub_version: "test".into(),
        heartbeat_interval_ms: interval_ms,
        limits: WireLimits {
            max_frame_bytes: 1 << 20,
            max_result_bytes: 1 << 18,
        },
    }
}

fn handle(mode: RunMode, pid: Option<u32>) -> RunHandle {
    RunHandle {
        pid,
        session: None,
        run_dir: "/runs/x".into(),
        mode,
        start_ticks: None,
    }
}

fn spawned(task: u64, g: u64, mode: RunMode) -> RunEvent {
    RunEvent::Spawned {
        task: TaskId(task),
        generation: Generation(g),
        handle: handle(mode, Some(40 + task as u32)),
    }
}

fn finished(task: u64, g: u64, outcome: Outcome) -> RunEvent {
    RunEvent::Finished {
        task: TaskId(task),
        generation: Generation(g),
        outcome,
        result: None,
        error: None,
        work: None,
    }
}

fn reports(e: &[Effect]) -> Vec<&ReportBody> {
    e.iter()
        .filter_map(|e| match e {
            Effect::Send(SessionMsg::Report(r)) => Some(&r.body),
            _ => None,
        })
        .collect()
}

fn started(e: &[Effect]) -> Vec<Option<u32>> {
    reports(e)
        .into_iter()
        .filter_map(|b| match b {
            ReportBody::Started { pid, .. } => Some(*pid),
            _ => None,
        })
        .collect()
}

fn wake(verify: Verifier, limit_ms: u64) -> Policy {
    Policy {
        slots: 4,
        mode: RunMode::Wake,
        settle: Duration::ZERO,
        start_timeout: ms(limit_ms),
        verify,
    }
}

fn exec(settle_ms: u64) -> Policy {
    Policy {
        slots: 4,
        mode: RunMode::Exec,
        settle: ms(settle_ms),
        ..Policy::default()
    }
}

// === heartbeats ===

#[test]
fn heartbeats_follow_the_welcomed_interval_with_jitter() {
    let mut c = core();
    c.handle_startup(T0, vec![]);
    let first = c
        .poll_timeout()
        .expect("a heartbeat is scheduled at startup");
    assert!((ms(9_000)..=ms(11_000)).contains(&first), "{first:?}");
    // Before a session nothing is sent when it comes due.
    c.handle_timeout(first);
    assert!(!c.take_effects().contains(&Effect::Heartbeat));

    let at = ms(20_000);
    c.handle_connected(at, &welcome(1_000));
    assert_eq!(c.take_effects(), vec![Effect::Heartbeat], "one at once");
    let mut now = at;
    let mut gaps = Vec::new();
    for _ in 0..50 {
        let next = c.poll_timeout().expect("always scheduled");
        let gap = next - now;
        assert!((ms(900)..=ms(1_100)).contains(&gap), "±10 %: {gap:?}");
        // Early calls do nothing.
        c.handle_timeout(next - ms(1));
        assert!(c.take_effects().is_empty());
        c.handle_timeout(next);
        assert_eq!(c.take_effects(), vec![Effect::Heartbeat]);
        gaps.push(gap);
        now = next;
    }
    gaps.dedup();
    assert!(gaps.len() > 10, "jittered, not constant: {gaps:?}");
    c.handle_disconnected();
    c.handle_timeout(c.poll_timeout().expect("scheduled"));
    assert!(c.take_effects().is_empty(), "no session, no heartbeat");
}

#[test]
fn a_welcome_interval_below_the_floor_is_raised() {
    let mut c = core();
    c.handle_startup(T0, vec![]);
    c.handle_connected(T0, &welcome(1));
    let _ = c.take_effects();
    assert!(c.poll_timeout().expect("scheduled") >= ms(90));
}

#[test]
fn a_welcome_replays_the_outbox_before_the_heartbeat() {
    let mut c = core();
    c.handle_startup(T0, vec![]);
    c.handle_hub(T0, assign(1, 1));
    let _ = c.take_effects();
    c.handle_connected(ms(5), &welcome(1_000));
    let e = c.take_effects();
    assert_eq!(reports(&e), [&ReportBody::Accepted]);
    assert_eq!(e.last(), Some(&Effect::Heartbeat));
}

// === starts ===

#[test]
fn an_exec_run_counts_as_started_once_the_settle_time_has_passed() {
    let mut c = core_with(exec(500));
    c.handle_startup(T0, vec![]);
    c.handle_hub(ms(1), assign(1, 1));
    let _ = c.take_effects();
    c.handle_run(ms(3), spawned(1, 1, RunMode::Exec));
    assert!(
        started(&c.take_effects()).is_empty(),
        "not before the settle time"
    );
    assert_eq!(c.poll_timeout(), Some(ms(503)));
    c.handle_timeout(ms(502));
    assert!(c.take_effects().is_empty());
    c.handle_timeout(ms(503));
    assert_eq!(
        started(&c.take_effects()),
        [Some(41)],
        "with the handle's pid"
    );
    assert_eq!(c.tasks().next().map(|t| t.phase), Some(Phase::Running));
    assert_eq!(c.deadlines.len(), 0);
}

#[test]
fn an_exec_run_with_no_settle_time_starts_at_its_spawn() {
    let mut c = core_with(exec(0));
    c.handle_hub(T0, assign(1, 1));
    let _ = c.take_effects();
    c.handle_run(T0, spawned(1, 1, RunMode::Exec));
    let e = c.take_effects();
    assert_eq!(started(&e), [Some(41)]);
    assert!(c.starts.is_empty());
}

#[test]
fn an_exec_run_that_fails_within_the_settle_time_never_started() {
    let mut c = core_with(exec(500));
    c.handle_hub(T0, assign(1, 1));
    c.handle_run(ms(1), spawned(1, 1, RunMode::Exec));
    let _ = c.take_effects();
    c.handle_run(ms(100), finished(1, 1, Outcome::Failed));
    let e = c.take_effects();
    assert!(started(&e).is_empty());
    assert!(matches!(
        reports(&e)[..],
        [ReportBody::Finished {
            outcome: Outcome::Failed,
            ..
        }]
    ));
    assert_eq!(c.poll_timeout(), None, "its deadline went with it");
    // One that completes within it started: Started, then Finished.
    c.handle_hub(ms(200), assign(2, 1));
    c.handle_run(ms(201), spawned(2, 1, RunMode::Exec));
    c.handle_run(ms(210), finished(2, 1, Outcome::Completed));
    let e = c.take_effects();
    assert_eq!(started(&e), [Some(42)], "with the run's pid");
    c.handle_timeout(ms(10_000));
    assert!(started(&c.take_effects()).is_empty());
}

#[test]
fn while_a_workspace_is_prepared_no_start_deadline_runs_and_the_hub_hears_progress() {
    let mut c = core_with(wake(Verifier::Runner, 2_000));
    c.handle_hub(ms(10), assign(1, 1));
    let _ = c.take_effects();
    assert_eq!(c.poll_timeout(), Some(ms(2_010)));
    let preparing = |note: &str| RunEvent::Preparing {
        task: TaskId(1),
        generation: Generation(1),
        note: note.into(),
    };
    c.handle_run(ms(20), preparing("preparing a git worktree of /srv/app"));
    let e = c.take_effects();
    assert!(
        matches!(&reports(&e)[..], [ReportBody::Progress { note }] if note.contains("worktree"))
    );
    assert_eq!(
        c.poll_timeout(),
        None,
        "a clone may take longer than start_timeout"
    );
    c.handle_timeout(ms(60_000));
    c.handle_run(ms(60_000), preparing("still fetching"));
    assert!(
        !c.take_effects()
            .iter()
            .any(|e| matches!(e, Effect::TimeOutStart(..)))
    );
    // Ready: the wake command gets its whole start_timeout from now.
    c.handle_run(
        ms(70_000),
        RunEvent::Prepared {
            task: TaskId(1),
            generation: Generation(1),
            note: "workspace ready".into(),
        },
    );
    let e = c.take_effects();
    assert!(matches!(&reports(&e)[..], [ReportBody::Progress { .. }]));
    assert_eq!(c.poll_timeout(), Some(ms(72_000)));
    c.handle_timeout(ms(72_000));
    assert_eq!(
        c.take_effects(),
        [Effect::TimeOutStart(
            TaskId(1),
            Generation(1),
            Outcome::WakeFailed
        )]
    );
    // A late Preparing after the decision changes nothing.
    c.handle_run(ms(72_001), preparing("late"));
    assert!(reports(&c.take_effects()).is_empty());
}

#[test]
fn a_wake_command_that_outlasts_the_start_timeout_is_timed_out_as_wake_failed() {
    let mut c = core_with(wake(Verifier::Runner, 2_000));
    c.handle_hub(ms(10), assign(1, 1));
    let _ = c.take_effects();
    assert_eq!(c.poll_timeout(), Some(ms(2_010)));
    c.handle_timeout(ms(2_010));
    let e = c.take_effects();
    assert_eq!(
        e,
        [Effect::TimeOutStart(
            TaskId(1),
            Generation(1),
            Outcome::WakeFailed
        )]
    );
    // The decision stands: the wake command exiting now arms nothing.
    c.handle_run(ms(2_011), spawned(1, 1, RunMode::Wake));
    let _ = c.take_effects();
    assert_eq!(c.poll_timeout(), None);
    // The runner's Finished ends the attempt with what it saw.
    c.handle_run(ms(2_020), finished(1, 1, Outcome::WakeFailed));
    let e = c.take_effects();
    assert!(matches!(
        reports(&e)[..],
        [ReportBody::Finished {
            outcome: Outcome::WakeFailed,
            ..
        }]
    ));
    assert!(c.starts.is_empty());
}

#[test]
fn a_start_the_runner_does_not_verify_in_time_is_start_timeout_and_a_late_start_is_ignored() {
    let mut c = core_with(wake(Verifier::Runner, 2_000));
    c.handle_hub(T0, assign(1, 1));
    c.handle_run(ms(300), spawned(1, 1, RunMode::Wake));
    let _ = c.take_effects();
    // The verification gets its own window, counted from the wake command's exit.
    assert_eq!(c.poll_timeout(), Some(ms(2_300)));
    c.handle_timeout(ms(2_300));
    assert_eq!(
        c.take_effects(),
        [Effect::TimeOutStart(
            TaskId(1),
            Generation(1),
            Outcome::StartTimeout
        )]
    );
    c.handle_run(
        ms(2_301),
        RunEvent::Started {
            task: TaskId(1),
            generation: Generation(1),
            pid: Some(9),
            session: None,
        },
    );
    assert!(
        c.take_effects().is_empty(),
        "a start after the deadline is ignored"
    );
    let refused = c.handle_agent(ms(2_302), TaskId(1), Generation(1), AgentCmd::Start);
    assert!(
        refused
            .expect_err("refused")
            .contains("did not start in time")
    );
    c.handle_run(ms(2_310), finished(1, 1, Outcome::StartTimeout));
    assert!(matches!(
        reports(&c.take_effects())[..],
        [ReportBody::Finished {
            outcome: Outcome::StartTimeout,
            ..
        }]
    ));
}

#[test]
fn a_verified_start_in_time_disarms_the_deadline() {
    let mut c = core_with(wake(Verifier::Runner, 2_000));
    c.handle_hub(T0, assign(1, 1));
    c.handle_run(ms(300), spawned(1, 1, RunMode::Wake));
    c.handle_run(
        ms(900),
        RunEvent::Started {
            task: TaskId(1),
            generation: Generation(1),
            pid: Some(9),
            session: Some("s".into()),
        },
    );
    assert_eq!(started(&c.take_effects()), [Some(9)], "the runner's pid");
    assert_eq!(c.poll_timeout(), None);
    c.handle_timeout(ms(60_000));
    assert!(c.take_effects().is_empty());
}

#[test]
fn agent_ack_sets_no_verification_deadline_the_hub_does() {
    let mut c = core_with(wake(Verifier::Agent, 2_000));
    c.handle_hub(T0, assign(1, 1));
    assert_eq!(c.poll_timeout(), Some(ms(2_000)), "the wake command's");
    c.handle_run(ms(10), spawned(1, 1, RunMode::Wake));
    let _ = c.take_effects();
    assert_eq!(c.poll_timeout(), None);
    assert!(
        c.handle_agent(ms(50_000), TaskId(1), Generation(1), AgentCmd::Start)
            .is_ok()
    );
    assert_eq!(started(&c.take_effects()), [None]);
}

#[test]
fn a_restored_wake_run_that_is_not_found_again_in_time_is_agent_exited() {
    let held = |task: u64, phase: Phase, handle: Option<RunHandle>| LocalTask {
        task: TaskId(task),
        generation: Generation(1),
        spec: spec(),
        phase,
        handle,
    };
    let tasks = vec![
        held(1, Phase::Running, Some(self::handle(RunMode::Wake, None))),
        held(2, Phase::Accepted, None),
        held(3, Phase::Finished, Some(self::handle(RunMode::Wake, None))),
    ];
    let mut c = Core::new(tasks, vec![], 1, wake(Verifier::Runner, 2_000), 1);
    c.handle_startup(ms(100), vec![]);
    assert_eq!(
        c.deadlines.len(),
        2,
        "the running one and the unspawned one"
    );
    // Task 1 is found again (Started, ignored: it ran already); task 2's wake
    // command never exits.
    c.handle_run(
        ms(500),
        RunEvent::Started {
            task: TaskId(1),
            generation: Generation(1),
            pid: None,
            session: None,
        },
    );
    assert!(started(&c.take_effects()).is_empty());
    c.handle_timeout(ms(2_100));
    assert_eq!(
        c.take_effects(),
        [Effect::TimeOutStart(
            TaskId(2),
            Generation(1),
            Outcome::WakeFailed
        )]
    );
    // Not found: AgentExited.
    let mut c = Core::new(
        vec![held(
            1,
            Phase::Running,
            Some(self::handle(RunMode::Wake, None)),
        )],
        vec![],
        1,
        wake(Verifier::Runner, 2_000),
        1,
    );
    c.handle_startup(ms(100), vec![]);
    c.handle_timeout(ms(2_100));
    assert!(c.take_effects().contains(&Effect::TimeOutStart(
        TaskId(1),
        Generation(1),
        Outcome::AgentExited
    )));
}

// === orphans ===

#[test]
fn orphans_are_adopted_by_their_resent_assignment_or_ended_after_the_claim() {
    let mut c = core();
    let orphans = vec![
        (TaskId(1), Generation(1)),
        (TaskId(2), Generation(1)),
        (TaskId(3), Generation(1)),
    ];
    c.handle_startup(T0, orphans);
    assert!(
        c.poll_timeout() > Some(ms(5_000)),
        "no claim window before a welcome"
    );
    c.handle_connected(ms(1_000), &welcome(10_000));
    let _ = c.take_effects();
    assert_eq!(c.poll_timeout(), Some(ms(1_000) + ORPHAN_CLAIM));
    // The resent assignment of the same attempt adopts its run.
    c.handle_hub(ms(1_010), assign(1, 1));
    let e = c.take_effects();
    assert!(e.contains(&Effect::AdoptRun(TaskId(1), Generation(1), spec())));
    assert!(!e.iter().any(|e| matches!(e, Effect::StartRun(..))));
    // A newer generation ends the older orphan and starts afresh.
    c.handle_hub(ms(1_020), assign(2, 2));
    let e = c.take_effects();
    assert!(e.contains(&Effect::EndOrphans(vec![(TaskId(2), Generation(1))])));
    assert!(e.contains(&Effect::StartRun(TaskId(2), Generation(2), spec())));
    // A second welcome does not move the claim deadline.
    c.handle_connected(ms(3_000), &welcome(10_000));
    let _ = c.take_effects();
    c.handle_timeout(ms(1_000) + ORPHAN_CLAIM);
    assert_eq!(
        c.take_effects(),
        [Effect::EndOrphans(vec![(TaskId(3), Generation(1))])]
    );
    c.handle_connected(ms(9_000), &welcome(10_000));
    let _ = c.take_effects();
    assert!(c.orphan_claim_at.is_none(), "nothing left to claim");
}

// === run directories ===

#[test]
fn run_directories_are_released_only_by_a_flushed_commit() {
    let mut c = core_with(exec(0));
    c.handle_startup(T0, vec![]);
    c.handle_connected(T0, &welcome(10_000));
    c.handle_hub(T0, assign(1, 1));
    c.handle_run(T0, spawned(1, 1, RunMode::Exec));
    c.handle_run(T0, finished(1, 1, Outcome::Completed));
    let _ = c.take_effects();
    // The acknowledgement forgets the task: an unflushed commit, no release.
    c.handle_hub(ms(10), HubMsg::Ack { upto: ReportId(99) });
    let e = c.take_effects();
    assert!(e.contains(&Effect::DeleteTask(TaskId(1), Generation(1))));
    assert_eq!(commit_kind(&e), CommitKind::Unflushed);
    assert!(!e.iter().any(|e| matches!(e, Effect::ReleaseRunDir(..))));
    // Idle until the heartbeat: one small flushed commit releases it.
    let hb = c.poll_timeout().expect("heartbeat");
    c.handle_timeout(hb);
    let e = c.take_effects();
    assert_eq!(
        e,
        [
            Effect::Heartbeat,
            Effect::NextReport(c.next_report()),
            Effect::ReleaseRunDir(TaskId(1), Generation(1)),
        ]
    );
    assert_eq!(commit_kind(&e), CommitKind::Flushed);
    // Nothing left: the next heartbeat commits nothing.
    c.handle_timeout(c.poll_timeout().expect("heartbeat"));
    assert_eq!(c.take_effects(), [Effect::Heartbeat]);
}

#[test]
fn a_flushed_batch_releases_what_was_forgotten_before_and_in_it() {
    let mut c = core();
    c.handle_hub(T0, assign(1, 1));
    let _ = c.take_effects();
    c.handle_hub(T0, abandon(1, 1));
    let e = c.take_effects();
    assert!(!e.iter().any(|e| matches!(e, Effect::ReleaseRunDir(..))));
    // The next assignment's commit is flushed; the release rides on it.
    c.handle_hub(T0, assign(2, 1));
    let e = c.take_effects();
    let release = e
        .iter()
        .position(|e| *e == Effect::ReleaseRunDir(TaskId(1), Generation(1)))
        .expect("released");
    assert!(e[..release].iter().any(Effect::is_store));
    // A superseded attempt forgotten and released in one flushed batch.
    c.handle_hub(T0, assign(2, 2));
    let e = c.take_effects();
    assert!(e.contains(&Effect::ReleaseRunDir(TaskId(2), Generation(1))));
}

// === slots ===

#[test]
fn an_assignment_beyond_the_slots_waits_for_one_to_free() {
    let mut c = core_with(Policy {
        slots: 1,
        ..exec(0)
    });
    c.handle_hub(T0, assign(1, 1));
    let _ = c.take_effects();
    c.handle_hub(T0, assign(2, 1));
    assert!(c.take_effects().is_empty(), "not accepted, nothing stored");
    assert_eq!((c.busy(), c.deferred()), (1, 1));
    assert_eq!(c.held().len(), 1, "the hub is not told it is held");
    // A repeat while it waits is a no-op.
    c.handle_hub(T0, assign(2, 1));
    assert_eq!(c.deferred(), 1);
    // The first ends: the second is accepted and started in the same batch.
    c.handle_run(T0, spawned(1, 1, RunMode::Exec));
    c.handle_run(ms(5), finished(1, 1, Outcome::Completed));
    let e = c.take_effects();
    assert!(e.contains(&Effect::StartRun(TaskId(2), Generation(1), spec())));
    assert_eq!((c.busy(), c.deferred()), (1, 0));
    // One cancelled while it waits is dropped without a trace.
    c.handle_hub(T0, assign(3, 1));
    c.handle_hub(
        T0,
        HubMsg::Cancel {
            task: TaskId(3),
            generation: Generation(1),
        },
    );
    assert!(c.take_effects().is_empty());
    assert_eq!(c.deferred(), 0);
    // A new session starts from what the hub resends behind its welcome.
    c.handle_hub(T0, assign(4, 1));
    assert_eq!(c.deferred(), 1);
    c.handle_connected(ms(10), &welcome(1_000));
    assert_eq!(c.deferred(), 0);
}

#[test]
fn an_assignment_held_back_too_long_is_dropped_not_started_late() {
    // A sidecar stopped (SIGSTOP) or cut off while holding an assignment back:
    // by the time a slot frees the hub may have given the task to another
    // sidecar, so starting it then would run a superseded attempt.
    let mut c = core_with(Policy {
        slots: 1,
        ..exec(0)
    });
    c.handle_hub(T0, assign(1, 1));
    c.handle_hub(ms(10), assign(2, 1));
    let _ = c.take_effects();
    assert_eq!(c.deferred(), 1);
    c.handle_run(ms(20), spawned(1, 1, RunMode::Exec));
    let late = ms(10) + DEFERRED_HOLD_MAX + ms(1);
    c.handle_run(late, finished(1, 1, Outcome::Completed));
    let e = c.take_effects();
    assert!(
        !e.iter()
            .any(|e| matches!(e, Effect::StartRun(t, ..) if *t == TaskId(2))),
        "{e:?}"
    );
    assert_eq!((c.busy(), c.deferred()), (0, 0));
    // Held within the bound, it is admitted as before.
    c.handle_hub(late, assign(3, 1));
    c.handle_hub(late, assign(4, 1));
    c.handle_run(late, spawned(3, 1, RunMode::Exec));
    c.handle_run(late + ms(50), finished(3, 1, Outcome::Completed));
    let e = c.take_effects();
    assert!(e.contains(&Effect::StartRun(TaskId(4), Generation(1), spec())));
}

#[test]
fn losing_the_session_drops_held_back_assignments() {
    let mut c = core_with(Policy {
        slots: 1,
        ..exec(0)
    });
    c.handle_connected(T0, &welcome(1_000));
    c.handle_hub(T0, assign(1, 1));
    c.handle_hub(T0, assign(2, 1));
    assert_eq!(c.deferred(), 1);
    c.handle_disconnected();
    assert_eq!(c.deferred(), 0);
}

#[test]
fn assignments_held_back_are_bounded() {
    let mut c = core_with(Policy {
        slots: 1,
        ..exec(0)
    });
    for task in 1..=(DEFERRED_MAX as u64 + 10) {
        c.handle_hub(T0, assign(task, 1));
    }
    assert_eq!(c.busy(), 1);
    assert_eq!(c.deferred(), DEFERRED_MAX);
}

#[test]
fn a_newer_generation_replaces_its_held_back_assignment() {
    let mut c = core_with(Policy {
        slots: 1,
        ..exec(0)
    });
    c.handle_hub(T0, assign(1, 1));
    c.handle_hub(T0, assign(2, 1));
    c.handle_hub(T0, assign(2, 3));
    c.handle_hub(T0, assign(2, 2));
    let _ = c.take_effects();
    assert_eq!(c.deferred(), 1);
    c.handle_hub(T0, abandon(1, 1));
    assert_eq!(c.held()[0].generation, Generation(3));
}

#[test]
fn poll_timeout_names_the_earliest_deadline() {
    let mut c = core_with(wake(Verifier::Runner, 3_000));
    c.handle_startup(T0, vec![(TaskId(9), Generation(1))]);
    c.handle_connected(ms(100), &welcome(60_000));
    c.handle_hub(ms(200), assign(1, 1));
    let _ = c.take_effects();
    // Heartbeat ≥ 54 s, orphan claim at 5.1 s, the wake command's at 3.2 s.
    assert_eq!(c.poll_timeout(), Some(ms(3_200)));
    c.handle_timeout(ms(3_200));
    let _ = c.take_effects();
    assert_eq!(c.poll_timeout(), Some(ms(100) + ORPHAN_CLAIM));
}

fn usage(input: u64) -> muster_wire::msg::Usage {
    muster_wire::msg::Usage {
        input_tokens: input,
        ..Default::default()
    }
}

#[test]
fn usage_reports_replace_the_unacknowledged_one_of_their_attempt() {
    let mut c = core();
    let (t, g) = (TaskId(3), Generation(2));
    c.handle_hub(T0, assign(3, 2));
    let _ = c.take_effects();
    let outbox_before = c.outbox().count();
    assert!(c.handle_agent(T0, t, g, AgentCmd::Usage(usage(10))).is_ok());
    let first = c.take_effects();
    assert!(reports(&first).contains(&&ReportBody::Usage(usage(10))));
    // The transcript's reading of the same attempt supersedes the first.
    c.handle_usage(t, g, usage(25));
    let e = c.take_effects();
    assert!(
        e.iter().any(|e| matches!(e, Effect::DeleteReport(_))),
        "the older usage report leaves the outbox"
    );
    assert_eq!(
        c.outbox().count(),
        outbox_before + 1,
        "one usage report per attempt"
    );
    assert!(matches!(
        c.outbox().last().map(|r| &r.body),
        Some(ReportBody::Usage(u)) if u.input_tokens == 25
    ));
    // Another generation, or an ended attempt, reports nothing.
    c.handle_usage(t, Generation(1), usage(99));
    assert!(c.take_effects().is_empty());
    assert!(
        c.handle_agent(
            T0,
            t,
            g,
            AgentCmd::Complete {
                result: None,
                link: None
            }
        )
        .is_ok()
    );
    let _ = c.take_effects();
    c.handle_usage(t, g, usage(100));
    assert!(reports(&c.take_effects()).is_empty());
    assert!(
        c.handle_agent(T0, t, g, AgentCmd::Usage(usage(1)))
            .expect_err("refused")
            .contains("already ended")
    );
}

// === reports folded into one ===

/// The reports a batch stores: (id, body), in order.
fn stored_reports(e: &[Effect]) -> Vec<(u64, &ReportBody)> {
    e.iter()
        .filter_map(|e| match e {
            Effect::PutReport(r) => Some((r.id.0, &r.body)),
            _ => None,
        })
        .collect()
}

#[test]
fn an_attempt_that_starts_and_ends_in_one_batch_sends_one_ran_report() {
    let mut c = core_with(exec(0));
    c.handle_hub(T0, assign(1, 1));
    c.handle_run(ms(1), spawned(1, 1, RunMode::Exec));
    c.handle_run(ms(2), finished(1, 1, Outcome::Completed));
    let mut e = c.take_effects();
    assert_eq!(
        reports(&e).len(),
        3,
        "accepted, started, finished before folding"
    );
    c.coalesce_reports(&mut e);
    assert!(
        matches!(
            &reports(&e)[..],
            [ReportBody::Ran {
                pid: Some(41),
                outcome: Outcome::Completed,
                ..
            }]
        ),
        "{:?}",
        reports(&e)
    );
    // Stored under the `Finished` report's id, the only row of the outbox.
    assert!(matches!(
        &stored_reports(&e)[..],
        [(3, ReportBody::Ran { .. })]
    ));
    let outbox: Vec<_> = c.outbox().map(|r| (r.id.0, r.body.kind())).collect();
    assert_eq!(outbox, [(3, muster_wire::msg::ReportKind::Finished)]);
    assert_eq!(commit_kind(&e), CommitKind::Flushed);
    // Its ack forgets the task: nothing else was outstanding.
    c.handle_hub(ms(3), HubMsg::Ack { upto: ReportId(3) });
    let e = c.take_effects();
    assert!(e.iter().any(|e| matches!(e, Effect::DeleteTask(..))));
    assert_eq!(c.tasks().count(), 0);
}

#[test]
fn reports_of_another_batch_or_without_a_start_are_not_folded() {
    let mut c = core_with(exec(0));
    c.handle_hub(T0, assign(1, 1));
    let mut first = c.take_effects();
    c.coalesce_reports(&mut first);
    assert!(matches!(&reports(&first)[..], [ReportBody::Accepted]));
    // Started and finished in the next batch: folded, the sent `Accepted` kept.
    c.handle_run(ms(1), spawned(1, 1, RunMode::Exec));
    c.handle_run(ms(2), finished(1, 1, Outcome::Completed));
    let mut e = c.take_effects();
    c.coalesce_reports(&mut e);
    assert!(matches!(&reports(&e)[..], [ReportBody::Ran { .. }]));
    let kinds: Vec<_> = c.outbox().map(|r| r.body.kind()).collect();
    use muster_wire::msg::ReportKind;
    assert_eq!(kinds, [ReportKind::Accepted, ReportKind::Finished]);
    // A run that fails before it started: `Accepted` and `Finished` stay as they are.
    let mut c = core_with(exec(500));
    c.handle_hub(T0, assign(2, 1));
    c.handle_run(ms(1), spawned(2, 1, RunMode::Exec));
    c.handle_run(ms(2), finished(2, 1, Outcome::Failed));
    let mut e = c.take_effects();
    let before = e.clone();
    c.coalesce_reports(&mut e);
    assert_eq!(e, before);
    assert!(matches!(
        &reports(&e)[..],
        [ReportBody::Accepted, ReportBody::Finished { .. }]
    ));
}
