//! Retention: when finished tasks are pruned from the store, up to when, and
//! how much at a time. The shell does the deleting; the core decides.

use muster_wire::TaskId;

use crate::Core;
use crate::model::Millis;

/// How often finished tasks past their retention are pruned.
pub const PRUNE_EVERY: Millis = 60_000;
/// Tasks pruned per sweep at most, so a sweep never holds the core thread for long.
pub const PRUNE_BATCH: usize = 10_000;

/// A prune the shell should run now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prune {
    /// Delete finished tasks that ended before this.
    pub before: Millis,
    /// At most this many.
    pub limit: usize,
}

impl Core {
    /// Whether a prune is due at `now`, and what it covers. The next one is due
    /// [`PRUNE_EVERY`] later, or at once if this one comes back full
    /// (see [`Core::pruned`]).
    pub fn retention_due(&mut self, now: Millis) -> Option<Prune> {
        if now < self.prune_at {
            return None;
        }
        self.prune_at = now + PRUNE_EVERY;
        let retention = self.policy.retention.as_millis() as Millis;
        Some(Prune {
            before: now.saturating_sub(retention),
            limit: PRUNE_BATCH,
        })
    }

    /// The shell pruned `ids`: forget their idempotency keys; a full batch means
    /// there is more to prune, so the next prune is due at once.
    pub fn pruned(&mut self, now: Millis, ids: &[TaskId], limit: usize) {
        self.forget_keys(ids);
        if ids.len() >= limit {
            self.prune_at = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Limits, Policy};
    use crate::{Core, Restored};

    #[test]
    fn a_prune_is_due_once_a_minute_and_again_at_once_while_batches_come_back_full() {
        let t0 = 1_700_000_000_000;
        let policy = Policy::default();
        let retention = policy.retention.as_millis() as Millis;
        let mut core = Core::new(policy, Limits::default(), Restored::default(), t0, 1);
        assert_eq!(core.poll_timeout(), Some(t0 + PRUNE_EVERY));
        assert_eq!(core.retention_due(t0), None);
        let t0 = t0 + PRUNE_EVERY;
        let first = core
            .retention_due(t0)
            .expect("due a minute after the start");
        assert_eq!(first.before, t0 - retention);
        assert_eq!(core.retention_due(t0 + 1), None);
        assert_eq!(core.poll_timeout(), Some(t0 + PRUNE_EVERY));
        let full: Vec<TaskId> = (0..PRUNE_BATCH as u64).map(TaskId).collect();
        core.pruned(t0 + 5, &full, PRUNE_BATCH);
        assert!(core.retention_due(t0 + 5).is_some(), "more to prune");
        core.pruned(t0 + 6, &full[..3], PRUNE_BATCH);
        assert_eq!(core.retention_due(t0 + 6), None);
        assert!(core.retention_due(t0 + 5 + PRUNE_EVERY).is_some());
    }
}
