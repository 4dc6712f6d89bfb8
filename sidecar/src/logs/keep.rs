//! Moving an ended attempt's output from its run directory to `logs/` so that
//! a crash at any point loses nothing, and what a restart does with the run
//! and log directories it finds.
//!
//! The move is a list of steps planned from what is on disk ([`plan_keep`]),
//! each of which leaves the disk in a state the same plan, made again, carries
//! on from; so [`super::Logs::keep`] can be repeated after a crash (or a
//! failure) at any step, and the run directory is pooled or removed only once
//! it returned `Ok` (the `ended` marker is its last step):
//!
//! ```text
//! per stream:  Move     rename runs/<t>-<g>/<s> → logs/<t>-<g>/<s>   (atomic; keeps the inode for followers)
//!              Compact  write the cut copy to <s>.compact, then record the cut in <s>.cut
//!              Install  rename <s>.compact over <s>
//! then:        MarkEnded  write `ended`: the move is complete, readers use logs/
//! ```
//!
//! A `<s>.cut` is only written once its `<s>.compact` is complete, so "cut
//! recorded, copy still there" means "install it", and "cut recorded, no copy"
//! means "installed": a compaction is never applied twice (a compacted file is
//! still longer than the cap, by its marker line).
//!
//! At startup ([`plan_run_dir`]) a run directory of an attempt the queue no
//! longer holds is either an orphan (a run spawned just before a crash: the
//! core decides whether the hub claims it, and its output is kept when it is
//! ended) or has its output kept and is removed; never removed with its output.
//! A log directory whose move began but has no `ended` and no run directory
//! left is finished ([`finish_at_startup`]).

use muster_protocol::msg::LogStream;
use muster_protocol::{Generation, TaskId};

/// The two streams, in the order they are moved.
pub const STREAMS: [LogStream; 2] = [LogStream::Stdout, LogStream::Stderr];

/// What one stream of one attempt has on disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamOnDisk {
    /// The size of `runs/<t>-<g>/<stream>`, when it exists.
    pub run: Option<u64>,
    /// The size of `logs/<t>-<g>/<stream>`, when it exists.
    pub kept: Option<u64>,
    /// `<stream>.cut` exists: a complete compacted copy was made.
    pub cut_recorded: bool,
    /// `<stream>.compact` exists (complete when `cut_recorded`, else partial).
    pub compacted: bool,
}

/// What one attempt has on disk, for [`plan_keep`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AttemptOnDisk {
    /// Stdout, then stderr.
    pub streams: [StreamOnDisk; 2],
    /// `logs/<t>-<g>/` exists.
    pub log_dir: bool,
    /// `logs/<t>-<g>/ended` exists: the move was completed.
    pub ended: bool,
}

/// One step of keeping an attempt's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepStep {
    /// Rename the run's file into the log directory.
    Move(LogStream),
    /// Write the first and last halves of the cap with a marker between to
    /// `<stream>.compact`, then record the bytes cut in `<stream>.cut`.
    Compact(LogStream),
    /// Rename `<stream>.compact` over the kept file.
    Install(LogStream),
    /// Write `ended`.
    MarkEnded,
}

impl KeepStep {
    /// A short name, for logs and the test hook.
    pub fn name(self) -> &'static str {
        match self {
            KeepStep::Move(_) => "move",
            KeepStep::Compact(_) => "compact",
            KeepStep::Install(_) => "install",
            KeepStep::MarkEnded => "ended",
        }
    }
}

/// Why an attempt's output cannot be kept as planned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepConflict {
    /// Both the run directory and the log directory hold this stream (a file
    /// recreated after the move): neither is overwritten, the run directory
    /// stays for an operator.
    BothHold(LogStream),
}

/// The steps that finish keeping an attempt's output under `cap`, from what is
/// on disk. Empty when it is done (or there is nothing at all to keep).
///
/// # Errors
/// [`KeepConflict`] when going on would overwrite output.
pub fn plan_keep(a: &AttemptOnDisk, cap: u64) -> Result<Vec<KeepStep>, KeepConflict> {
    if a.ended {
        // `ended` is written last: everything before it is done. A stream in
        // the run directory now would be new output, left where it is.
        return Ok(Vec::new());
    }
    let mut steps = Vec::new();
    for (s, &stream) in a.streams.iter().zip(STREAMS.iter()) {
        let size = match (s.run, s.kept) {
            (Some(_), Some(_)) => return Err(KeepConflict::BothHold(stream)),
            (Some(run), None) => {
                steps.push(KeepStep::Move(stream));
                run
            }
            (None, Some(kept)) => kept,
            (None, None) => continue,
        };
        if s.cut_recorded {
            if s.compacted {
                steps.push(KeepStep::Install(stream));
            }
        } else if size > cap {
            steps.push(KeepStep::Compact(stream));
            steps.push(KeepStep::Install(stream));
        }
    }
    // An attempt that never wrote a file and has no log directory leaves no
    // trace (a reader is told "not found"); one that has a directory (a
    // recorded hole) ends like the others.
    if !steps.is_empty() || a.log_dir {
        steps.push(KeepStep::MarkEnded);
    }
    Ok(steps)
}

/// What a run directory found at startup tells about its attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunDirSeen {
    /// The attempt its name gives (`<task>-<generation>`), if it is one.
    pub attempt: Option<(TaskId, Generation)>,
    /// The queue still holds this attempt (recovery re-attaches it).
    pub held: bool,
    /// Its name starts with `.` (the pool, temporary files).
    pub hidden: bool,
    /// It holds the handle file of an exec run that was spawned.
    pub handle: bool,
    /// The attempt's log directory holds a moved stream or `ended`: its
    /// release began, so the hub had acknowledged its end and no resent
    /// assignment can claim it.
    pub release_began: bool,
}

/// What to do with a run directory found at startup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AtStartup {
    /// Not ours to touch now.
    Leave,
    /// A run spawned before a crash and never recorded: the core waits for the
    /// hub to claim it; its output is kept when it is ended.
    Orphan,
    /// Keep its output (finish the move), then remove it.
    KeepThenRemove,
    /// Not an attempt's directory, with a live run: end the run, then remove it.
    EndThenRemove,
    /// Not an attempt's directory: nothing can read its output; remove it.
    Remove,
}

/// What to do with a run directory found at startup.
pub fn plan_run_dir(seen: &RunDirSeen) -> AtStartup {
    if seen.hidden || seen.held {
        return AtStartup::Leave;
    }
    match seen.attempt {
        None if seen.handle => AtStartup::EndThenRemove,
        None => AtStartup::Remove,
        Some(_) if seen.release_began => AtStartup::KeepThenRemove,
        Some(_) if seen.handle => AtStartup::Orphan,
        Some(_) => AtStartup::KeepThenRemove,
    }
}

/// Whether a log directory found at startup is a move to finish: it is an
/// attempt's, not held, neither `ended` nor `removed`, and its run directory
/// is gone (one that is still there is planned by [`plan_run_dir`]).
pub fn finish_at_startup(held: bool, ended: bool, removed: bool, run_dir: bool) -> bool {
    !held && !ended && !removed && !run_dir
}

/// The attempt a `runs/` or `logs/` entry's name gives (`<task>-<generation>`).
pub fn parse_attempt(name: &str) -> Option<(TaskId, Generation)> {
    let (t, g) = name.split_once('-')?;
    Some((TaskId(t.parse().ok()?), Generation(g.parse().ok()?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAP: u64 = 1000;
    use KeepStep::*;
    use LogStream::{Stderr, Stdout};

    fn run(size: u64) -> StreamOnDisk {
        StreamOnDisk {
            run: Some(size),
            ..StreamOnDisk::default()
        }
    }

    fn kept(size: u64) -> StreamOnDisk {
        StreamOnDisk {
            kept: Some(size),
            ..StreamOnDisk::default()
        }
    }

    fn attempt(out: StreamOnDisk, err: StreamOnDisk) -> AttemptOnDisk {
        AttemptOnDisk {
            streams: [out, err],
            log_dir: out.kept.is_some() || err.kept.is_some(),
            ended: false,
        }
    }

    #[test]
    fn a_fresh_release_moves_both_compacts_what_is_over_and_ends() {
        let plan = plan_keep(&attempt(run(5000), run(10)), CAP).expect("plan");
        assert_eq!(
            plan,
            [
                Move(Stdout),
                Compact(Stdout),
                Install(Stdout),
                Move(Stderr),
                MarkEnded
            ]
        );
        // Exactly the cap is not over it.
        let plan = plan_keep(&attempt(run(CAP), StreamOnDisk::default()), CAP).expect("plan");
        assert_eq!(plan, [Move(Stdout), MarkEnded]);
    }

    #[test]
    fn every_crash_point_resumes_where_it_stopped() {
        // Stdout moved, stderr not yet.
        let plan = plan_keep(&attempt(kept(10), run(20)), CAP).expect("plan");
        assert_eq!(plan, [Move(Stderr), MarkEnded]);
        // Compaction begun (a partial copy, no cut recorded): done again.
        let mut s = kept(5000);
        s.compacted = true;
        let plan = plan_keep(&attempt(s, StreamOnDisk::default()), CAP).expect("plan");
        assert_eq!(plan, [Compact(Stdout), Install(Stdout), MarkEnded]);
        // The copy complete and recorded, not installed: install only.
        s.cut_recorded = true;
        let plan = plan_keep(&attempt(s, StreamOnDisk::default()), CAP).expect("plan");
        assert_eq!(plan, [Install(Stdout), MarkEnded]);
        // Installed (the compacted file is still over the cap, by its marker):
        // never cut twice.
        let mut s = kept(CAP + 40);
        s.cut_recorded = true;
        let plan = plan_keep(&attempt(s, StreamOnDisk::default()), CAP).expect("plan");
        assert_eq!(plan, [MarkEnded]);
        // Ended: nothing.
        let mut a = attempt(s, kept(3));
        a.ended = true;
        assert_eq!(plan_keep(&a, CAP).expect("plan"), []);
    }

    #[test]
    fn nothing_to_keep_and_conflicts() {
        let empty = AttemptOnDisk::default();
        assert_eq!(plan_keep(&empty, CAP).expect("plan"), []);
        // Only a recorded hole: the log directory ends without output.
        let hole_only = AttemptOnDisk {
            log_dir: true,
            ..AttemptOnDisk::default()
        };
        assert_eq!(plan_keep(&hole_only, CAP).expect("plan"), [MarkEnded]);
        let both = StreamOnDisk {
            run: Some(1),
            kept: Some(2),
            ..StreamOnDisk::default()
        };
        assert_eq!(
            plan_keep(&attempt(kept(1), both), CAP),
            Err(KeepConflict::BothHold(Stderr))
        );
    }

    #[test]
    fn a_run_directory_at_startup_is_never_removed_with_its_output() {
        let a = Some((TaskId(4), Generation(2)));
        let seen = |attempt, held, hidden, handle, release_began| RunDirSeen {
            attempt,
            held,
            hidden,
            handle,
            release_began,
        };
        assert_eq!(
            plan_run_dir(&seen(a, true, false, true, false)),
            AtStartup::Leave
        );
        assert_eq!(
            plan_run_dir(&seen(None, false, true, false, false)),
            AtStartup::Leave
        );
        // Killed after the hub's acknowledgement, before the release began: an
        // orphan to the core, whose output is kept when it is ended.
        assert_eq!(
            plan_run_dir(&seen(a, false, false, true, false)),
            AtStartup::Orphan
        );
        // Killed while releasing: finish the move now.
        assert_eq!(
            plan_run_dir(&seen(a, false, false, true, true)),
            AtStartup::KeepThenRemove
        );
        // No spawned run (a wake run, a spawn that failed): keep, then remove.
        assert_eq!(
            plan_run_dir(&seen(a, false, false, false, false)),
            AtStartup::KeepThenRemove
        );
        assert_eq!(
            plan_run_dir(&seen(None, false, false, true, false)),
            AtStartup::EndThenRemove
        );
        assert_eq!(
            plan_run_dir(&seen(None, false, false, false, false)),
            AtStartup::Remove
        );

        assert!(finish_at_startup(false, false, false, false));
        assert!(!finish_at_startup(true, false, false, false));
        assert!(!finish_at_startup(false, true, false, false));
        assert!(!finish_at_startup(false, false, true, false));
        assert!(!finish_at_startup(false, false, false, true));
        assert_eq!(parse_attempt("12-3"), Some((TaskId(12), Generation(3))));
        assert_eq!(parse_attempt("x-3"), None);
        assert_eq!(parse_attempt(".free"), None);
    }
}
