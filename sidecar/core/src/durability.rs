//! How a batch of store effects is committed, and when a forgotten task's run
//! directory may go.
//!
//! A batch that only forgets (acknowledged reports, ended or dropped tasks)
//! commits without a flush. A run directory removed while a crash can still
//! undo that forgetting would leave a held attempt with no trace of its run,
//! which the restart would start a second time; so the core hands out
//! [`crate::Effect::ReleaseRunDir`] only in a batch whose commit is flushed,
//! which makes every earlier unflushed commit durable too. An idle sidecar
//! makes one small flushed commit at its next heartbeat for that.

use crate::Effect;

/// Whether and how one batch of effects is committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitKind {
    /// No store effect: no transaction.
    Nothing,
    /// Only forgetting: committed without a flush; it reaches the disk with the
    /// next flushed commit.
    Unflushed,
    /// Anything else: flushed before the commit returns, so before the shell
    /// sends the `Accepted`, `Started` or `Finished` report the batch guards.
    Flushed,
}

/// How the shell commits `effects`.
///
/// A batch that only forgets need not reach the disk before anything else
/// happens: if it is lost in a crash, the restarted sidecar replays reports the
/// hub already has and offers tasks it already ended, and the hub answers both
/// as repeats. Such batches ride on the next durable commit; it saves one flush
/// per acknowledgement. Everything else a batch stores (a task, a report, the
/// next report id) is what a report sent after the commit promises.
pub fn commit_kind(effects: &[Effect]) -> CommitKind {
    let mut kind = CommitKind::Nothing;
    for e in effects {
        match e {
            Effect::PutTask(_) | Effect::PutReport(_) | Effect::NextReport(_) => {
                return CommitKind::Flushed;
            }
            Effect::DeleteTask(..) | Effect::DeleteReport(_) => kind = CommitKind::Unflushed,
            Effect::Send(_)
            | Effect::StartRun(..)
            | Effect::AdoptRun(..)
            | Effect::StopRun(..)
            | Effect::ForgetRun(..)
            | Effect::TimeOutStart(..)
            | Effect::EndOrphans(_)
            | Effect::Heartbeat
            | Effect::ReleaseRunDir(..) => {}
        }
    }
    kind
}
