//! Run directories, `<data_dir>/runs/<task>-<generation>`, and a small pool of
//! finished ones to reuse.
//!
//! An attempt's directory is gone once the sidecar forgets the task; keeping it
//! until the next restart filled the disk. Deleting and creating files is also
//! the dearest part of starting a short run on some filesystems: on the
//! benchmark VM's ext4 a new file costs about 0.5 ms, a write after a truncate
//! 0.3 ms, and a rename or an in-place overwrite about 10 µs. So a finished
//! run's directory goes to `runs/.free/` and the next attempt renames it into
//! place; the launcher rewrites `task.json`, the status record and the run
//! handle in place and truncates `stdout` and `stderr`, so nothing of the
//! earlier run can be read as this one's (a handle names its own directory, so
//! an earlier run's is never taken for this one's). A directory whose process
//! group may still be alive is removed instead (a leftover process could write
//! into the reused files), and so is one holding anything but those five files.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use muster_protocol::{Generation, TaskId};

use crate::agent::{RunHandle, RunMode};

/// The pool's folder under `runs/`; the restart sweep leaves names starting with `.` alone.
const POOL: &str = ".free";

/// Hands out run directories and takes finished ones back.
pub struct RunDirs {
    root: PathBuf,
    pool: PathBuf,
    free: Mutex<Vec<PathBuf>>,
    next: AtomicU64,
    cap: usize,
}

impl RunDirs {
    /// Run directories under `root` (`<data_dir>/runs`), keeping at most `cap` for reuse.
    /// Directories already in the pool (from before a restart) are reused.
    pub fn new(root: PathBuf, cap: usize) -> Self {
        let pool = root.join(POOL);
        let free: Vec<PathBuf> = std::fs::read_dir(&pool)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        let next = free
            .iter()
            .filter_map(|p| p.file_name()?.to_str()?.parse::<u64>().ok())
            .max()
            .map_or(0, |n| n + 1);
        RunDirs {
            root,
            pool,
            free: Mutex::new(free),
            next: AtomicU64::new(next),
            cap,
        }
    }

    /// Where an attempt's directory lives.
    pub fn path(&self, task: TaskId, generation: Generation) -> PathBuf {
        self.root.join(format!("{task}-{generation}"))
    }

    /// The directory for a new attempt: a pooled one renamed into place when there
    /// is one (the launcher creates it otherwise). One `rename`, about 10 µs, and
    /// no probe at all with an empty pool: a run that makes no directory (an
    /// agent run in process) costs no file-system call here.
    pub fn take(&self, task: TaskId, generation: Generation) -> PathBuf {
        let dir = self.path(task, generation);
        loop {
            // The lock is not held across the rename (nor the push below).
            let next = self.lock().pop();
            let Some(free) = next else { break };
            match std::fs::rename(&free, &dir) {
                Ok(()) => break,
                // The attempt's directory is there already (with files: `rename`
                // replaces only an empty one): it is used, and the pooled one kept.
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::DirectoryNotEmpty | std::io::ErrorKind::AlreadyExists
                    ) =>
                {
                    self.lock().push(free);
                    break;
                }
                Err(e) => {
                    tracing::debug!("pooled run directory {} unusable: {e}", free.display());
                    let _ = std::fs::remove_dir_all(&free);
                }
            }
        }
        dir
    }

    /// Takes back the directory of a forgotten attempt: into the pool when its run
    /// is known to be over (an exec run whose process group is gone) and the pool
    /// has room, else removed. Blocking.
    pub fn release(&self, dir: &Path, handle: Option<&RunHandle>) {
        let over = handle.is_some_and(|h| {
            h.mode == RunMode::Exec && h.pid.is_some_and(|p| !crate::agent::group_alive(p))
        });
        if over && self.lock().len() < self.cap && only_our_files(dir) {
            let slot = self
                .pool
                .join(self.next.fetch_add(1, Ordering::Relaxed).to_string());
            let moved =
                std::fs::create_dir_all(&self.pool).and_then(|()| std::fs::rename(dir, &slot));
            if moved.is_ok() {
                self.lock().push(slot);
                return;
            }
        }
        match std::fs::remove_dir_all(dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                tracing::warn!("could not remove the run directory {}: {e}", dir.display());
            }
            _ => {}
        }
    }

    /// How many directories wait in the pool.
    pub fn pooled(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<PathBuf>> {
        // The critical sections are a push or a pop; a poisoned lock still holds a valid list.
        self.free
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The files the launcher writes, and nothing else: anything an agent left
/// behind must not reach the next run.
fn only_our_files(dir: &Path) -> bool {
    const OURS: [&str; 5] = [
        "task.json",
        "stdout",
        "stderr",
        "status",
        crate::agent::HANDLE_FILE,
    ];
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries
            .map(|e| e.map(|e| e.file_name()))
            .all(|name| name.is_ok_and(|n| OURS.iter().any(|o| n == *o)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle(dir: &Path, pid: Option<u32>, mode: RunMode) -> RunHandle {
        RunHandle {
            pid,
            session: None,
            run_dir: dir.to_owned(),
            mode,
            start_ticks: None,
        }
    }

    /// A pid whose process has exited and been reaped.
    fn dead_pid() -> u32 {
        let mut child = std::process::Command::new("true").spawn().expect("spawn");
        let pid = child.id();
        child.wait().expect("reaped");
        pid
    }

    #[test]
    fn a_finished_directory_is_reused_by_the_next_attempt_and_others_are_removed() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dirs = RunDirs::new(tmp.path().join("runs"), 1);
        let first = dirs.take(TaskId(1), Generation(1));
        assert_eq!(first, tmp.path().join("runs/1-1"));
        std::fs::create_dir_all(&first).expect("mkdir");
        std::fs::write(first.join("stdout"), "old output").expect("write");

        dirs.release(
            &first,
            Some(&handle(&first, Some(dead_pid()), RunMode::Exec)),
        );
        assert!(!first.exists());
        assert_eq!(dirs.pooled(), 1);

        let second = dirs.take(TaskId(2), Generation(1));
        assert!(second.is_dir(), "renamed into place");
        assert_eq!(dirs.pooled(), 0);
        assert!(
            second.join("stdout").exists(),
            "the same directory, files kept for in-place rewriting"
        );

        // A live process group, a wake run, or no handle: removed, never pooled.
        use std::os::unix::process::CommandExt;
        let mut leader = std::process::Command::new("sleep")
            .arg("30")
            .process_group(0)
            .spawn()
            .expect("spawn");
        let live = handle(&second, Some(leader.id()), RunMode::Exec);
        let wake = handle(&second, Some(dead_pid()), RunMode::Wake);
        for h in [Some(&live), Some(&wake), None] {
            let d = dirs.take(TaskId(3), Generation(1));
            std::fs::create_dir_all(&d).expect("mkdir");
            dirs.release(&d, h);
            assert!(!d.exists());
            assert_eq!(dirs.pooled(), 0, "{h:?}");
        }
        let _ = leader.kill();
        let _ = leader.wait();

        // Something an agent left behind: removed, so the next run cannot see it.
        let d = dirs.take(TaskId(7), Generation(1));
        std::fs::create_dir_all(&d).expect("mkdir");
        std::fs::write(d.join("stdout"), "").expect("write");
        std::fs::write(d.join("result.txt"), "secret").expect("write");
        dirs.release(&d, Some(&handle(&d, Some(dead_pid()), RunMode::Exec)));
        assert!(!d.exists());
        assert_eq!(dirs.pooled(), 0);

        // Past the cap: removed.
        let a = dirs.take(TaskId(4), Generation(1));
        let b = dirs.take(TaskId(5), Generation(1));
        for d in [&a, &b] {
            std::fs::create_dir_all(d).expect("mkdir");
            dirs.release(d, Some(&handle(d, Some(dead_pid()), RunMode::Exec)));
            assert!(!d.exists());
        }
        assert_eq!(dirs.pooled(), 1);

        // A restarted sidecar finds the pool again.
        let again = RunDirs::new(tmp.path().join("runs"), 1);
        assert_eq!(again.pooled(), 1);
        assert!(again.take(TaskId(6), Generation(1)).is_dir());
    }

    #[test]
    fn an_attempt_whose_directory_is_there_keeps_it_and_the_pool_keeps_its_own() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dirs = RunDirs::new(tmp.path().join("runs"), 2);
        let old = dirs.take(TaskId(1), Generation(1));
        std::fs::create_dir_all(&old).expect("mkdir");
        std::fs::write(old.join("stdout"), "pooled").expect("write");
        dirs.release(&old, Some(&handle(&old, Some(dead_pid()), RunMode::Exec)));
        assert_eq!(dirs.pooled(), 1);
        // Left by an earlier process for attempt 2-1 (spawned, then a crash).
        let there = dirs.path(TaskId(2), Generation(1));
        std::fs::create_dir_all(&there).expect("mkdir");
        std::fs::write(there.join("stdout"), "its own").expect("write");
        assert_eq!(dirs.take(TaskId(2), Generation(1)), there);
        assert_eq!(
            std::fs::read_to_string(there.join("stdout")).expect("read"),
            "its own"
        );
        assert_eq!(dirs.pooled(), 1, "the pooled directory is kept");
        // With an empty pool nothing is made: the launcher makes the directory.
        let fresh = RunDirs::new(tmp.path().join("other"), 2);
        let d = fresh.take(TaskId(3), Generation(1));
        assert!(!d.exists());
    }
}
