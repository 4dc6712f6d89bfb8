//! Which finished workspaces to remove: a pure function of what exists, the
//! time and the two limits, with no IO and no clock.

use std::time::Duration;

/// One workspace as the planner sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage<K> {
    /// What the caller knows it by.
    pub id: K,
    /// When its attempt finished (Unix ms); `None` while it runs.
    pub finished_at_ms: Option<u64>,
    /// Disk it uses.
    pub bytes: u64,
}

/// The workspaces to remove, in removal order: first every finished one
/// whose age is at least `retention`, then more finished ones, oldest first,
/// until all of them (running ones included) use at most `max_disk`. A
/// running workspace is never chosen, even when running ones alone exceed
/// `max_disk`. Ties in finish time go by position in `items`.
pub fn plan_removal<K: Copy>(
    items: &[Usage<K>],
    now_ms: u64,
    retention: Duration,
    max_disk: u64,
) -> Vec<K> {
    let retention_ms = u64::try_from(retention.as_millis()).unwrap_or(u64::MAX);
    let mut finished: Vec<(u64, usize)> = items
        .iter()
        .enumerate()
        .filter_map(|(i, u)| u.finished_at_ms.map(|at| (at, i)))
        .collect();
    finished.sort_unstable();
    let mut total: u64 = items.iter().map(|u| u.bytes).fold(0, u64::saturating_add);
    let mut out = Vec::new();
    for (at, i) in finished {
        let expired = now_ms.saturating_sub(at) >= retention_ms;
        if !expired && total <= max_disk {
            // Sorted oldest first: nothing after this one is expired either.
            break;
        }
        total = total.saturating_sub(items[i].bytes);
        out.push(items[i].id);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86_400_000;
    const WEEK: Duration = Duration::from_secs(7 * 86_400);

    fn done(id: u32, at: u64, bytes: u64) -> Usage<u32> {
        Usage {
            id,
            finished_at_ms: Some(at),
            bytes,
        }
    }

    fn running(id: u32, bytes: u64) -> Usage<u32> {
        Usage {
            id,
            finished_at_ms: None,
            bytes,
        }
    }

    #[test]
    fn old_finished_workspaces_go_and_young_ones_stay() {
        let now = 100 * DAY;
        let items = [
            done(1, now - 8 * DAY, 10),
            done(2, now - 7 * DAY, 10),
            done(3, now - 7 * DAY + 1, 10),
            running(4, 10),
            done(5, now, 10),
        ];
        assert_eq!(plan_removal(&items, now, WEEK, u64::MAX), vec![1, 2]);
        // A finish time in the future (a clock stepped back) is age zero.
        assert_eq!(
            plan_removal(&[done(1, now + DAY, 1)], now, WEEK, u64::MAX),
            Vec::<u32>::new()
        );
    }

    #[test]
    fn over_max_disk_the_oldest_finished_go_first_until_below() {
        let now = 100 * DAY;
        let items = [
            done(1, now - 3 * DAY, 40),
            running(2, 50),
            done(3, now - DAY, 30),
            done(4, now - 2 * DAY, 20),
        ];
        // 140 in all; the limit is 100: 1 (40) brings it to 100.
        assert_eq!(plan_removal(&items, now, WEEK, 100), vec![1]);
        // 99: 1 and then 4 (the next oldest), leaving 80.
        assert_eq!(plan_removal(&items, now, WEEK, 99), vec![1, 4]);
        // Running ones alone exceed the limit: every finished one goes, they stay.
        assert_eq!(plan_removal(&items, now, WEEK, 10), vec![1, 4, 3]);
        assert_eq!(plan_removal(&items, now, WEEK, 140), Vec::<u32>::new());
    }

    #[test]
    fn age_and_size_together() {
        let now = 100 * DAY;
        let items = [
            done(1, now - 10 * DAY, 5),
            done(2, now - DAY, 60),
            done(3, now - 2 * DAY, 60),
        ];
        assert_eq!(plan_removal(&items, now, WEEK, 100), vec![1, 3]);
        assert_eq!(plan_removal::<u32>(&[], now, WEEK, 0), Vec::<u32>::new());
    }

    #[test]
    fn ties_keep_input_order() {
        let items = [done(7, 5, 1), done(3, 5, 1), done(9, 5, 1)];
        assert_eq!(
            plan_removal(&items, 5 + DAY, Duration::from_millis(1), 0),
            vec![7, 3, 9]
        );
    }
}
