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
//!
//! The shell does not even commit a forget-only batch on its own: it holds it
//! ([`HeldForgets`]) and puts it in front of the next flushed commit, which is
//! as durable as an unflushed commit followed by that flushed one, for one
//! transaction instead of two.

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

/// Forget-only batches held back in memory to ride on the next flushed
/// commit, so that an acknowledgement costs no transaction of its own.
///
/// Holding them is as safe as committing them unflushed: either way a crash
/// may lose them, and the restart then replays what the hub answers as
/// repeats (see [`commit_kind`]). Prepending them keeps the order of the
/// batches, so a task forgotten and then assigned again ends up stored.
#[derive(Debug, Default)]
pub struct HeldForgets {
    held: Vec<Effect>,
}

/// Forget effects held at most; beyond, they are committed unflushed at once.
pub const FORGETS_HELD_MAX: usize = 4096;

impl HeldForgets {
    /// What to commit now for a batch whose store effects are `store`: nothing
    /// for a forget-only batch while there is room to hold it, else everything
    /// held, then `store`.
    pub fn commit_now(&mut self, store: Vec<Effect>) -> Vec<Effect> {
        match commit_kind(&store) {
            CommitKind::Nothing => Vec::new(),
            CommitKind::Unflushed if self.held.len() + store.len() <= FORGETS_HELD_MAX => {
                self.held.extend(store);
                Vec::new()
            }
            CommitKind::Unflushed | CommitKind::Flushed => {
                let mut all = std::mem::take(&mut self.held);
                all.extend(store);
                all
            }
        }
    }

    /// Everything held (at a drain, so it is committed before the process ends).
    pub fn take(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.held)
    }

    /// How many forget effects wait.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Whether none waits.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use muster_wire::{Generation, ReportId, TaskId};

    use super::*;

    fn forget(n: u64) -> Effect {
        Effect::DeleteReport(ReportId(n))
    }

    #[test]
    fn forgets_wait_for_the_next_flushed_commit_and_go_first() {
        let mut h = HeldForgets::default();
        assert!(h.commit_now(vec![forget(1)]).is_empty());
        assert!(h.commit_now(vec![]).is_empty());
        assert!(
            h.commit_now(vec![Effect::DeleteTask(TaskId(9), Generation(1))])
                .is_empty()
        );
        assert_eq!(h.len(), 2);
        let now = h.commit_now(vec![Effect::NextReport(5)]);
        assert_eq!(
            now,
            vec![
                forget(1),
                Effect::DeleteTask(TaskId(9), Generation(1)),
                Effect::NextReport(5)
            ]
        );
        assert_eq!(commit_kind(&now), CommitKind::Flushed);
        assert!(h.is_empty());
    }

    #[test]
    fn held_forgets_are_bounded_then_committed_unflushed() {
        let mut h = HeldForgets::default();
        let full: Vec<Effect> = (0..FORGETS_HELD_MAX as u64).map(forget).collect();
        assert!(h.commit_now(full).is_empty());
        let now = h.commit_now(vec![forget(u64::MAX)]);
        assert_eq!(now.len(), FORGETS_HELD_MAX + 1);
        assert_eq!(now.last(), Some(&forget(u64::MAX)));
        assert_eq!(commit_kind(&now), CommitKind::Unflushed);
        assert!(h.is_empty());
        h.commit_now(vec![forget(1)]);
        assert_eq!(h.take(), vec![forget(1)]);
        assert!(h.is_empty());
    }
}
