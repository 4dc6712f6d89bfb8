//! Agent output kept in full: where each attempt's stdout and stderr live,
//! how their size is bounded, when they go, and how they are read.
//!
//! ```text
//! run:    <data_dir>/runs/<task>-<generation>/{stdout,stderr}   the agent writes (files, never a pipe)
//!           each cap pass (50 ms to 1 s apart, by the fastest file's rate): a file past
//!           cap + slack gets its middle punched out (fallocate PUNCH_HOLE, offsets kept);
//!           <data_dir>/logs/<t>-<g>/<stream>.hole says where
//! end:    released run directory ─▶ rename both files to <data_dir>/logs/<t>-<g>/ ─▶ compact
//!           (first and last halves of the cap, a marker line between) ─▶ `ended` ─▶ only
//!           then is the run directory pooled or removed (see [`keep`]: every step can be
//!           repeated, and a restart finishes a move a crash cut short)
//! sweep:  ended logs past [logs] retention, then the oldest while all exceed max_disk:
//!           files removed, a `removed` tombstone says when and why (so a reader is told)
//! read:   LogReader: from the run directory while the run goes on (skipping a punched
//!           hole with a marker, polling every 100 ms with --follow), from logs/ after
//! ```
//!
//! Output is never deleted with its run directory: a released one's output is
//! kept first, an orphan's when it is ended, and at startup a run directory
//! of an attempt no longer held is either an orphan or kept and removed
//! ([`keep::plan_run_dir`]).
//!
//! A running file's kept bytes (its size less its hole) stay within
//! `cap + slack(cap)` plus what the agent writes between two cap passes: see
//! [`next_pass`] for why, and [`CAP_PASS_MIN`] and [`CAP_PASS_MAX`] for the
//! figures.
//!
//! Readers never block the agent: it writes to its own files; a reader only
//! reads them, at its own pace. A follower that opened the run's file keeps
//! its descriptor across the move (a rename keeps the inode), so it reads on
//! to the end of what the agent wrote.

use std::collections::HashSet;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use muster_protocol::limits::{LOG_CHUNK_BYTES_MAX, LOG_TAIL_BYTES_MAX};
use muster_protocol::msg::{LogEnd, LogError, LogStream};
use muster_protocol::{Generation, TaskId};

use crate::config::LogsConfig;
use crate::workspace::retention::{Usage, plan_removal};

pub mod keep;

use keep::{AttemptOnDisk, KeepStep, STREAMS, StreamOnDisk};

/// How often a follower looks for new output: new bytes reach it within this
/// (plus one relay hop), well inside the 200 ms promised to operators.
pub const FOLLOW_POLL: Duration = Duration::from_millis(100);
/// How long a follower waits for an attempt's output to appear (an attempt
/// accepted but not yet spawned, a workspace being prepared) before "not found".
pub const FOLLOW_APPEAR_WAIT: Duration = Duration::from_secs(30);
/// Log streams served at once by one sidecar; more are answered `Busy`. Each
/// holds one chunk buffer ([`LOG_CHUNK_BYTES_MAX`]) and one open file.
pub const STREAMS_MAX: usize = 16;
/// Tombstones of removed logs older than this are themselves removed.
const TOMBSTONE_KEEP_MS: u64 = 30 * 86_400_000;
/// What a kept log costs beside its output (its directory and `ended` marker).
const DIR_OVERHEAD_BYTES: u64 = 8192;
/// Block size holes are aligned to, so a punch frees whole blocks.
const BLOCK: u64 = 4096;

/// The marker line put where the middle of an over-long log was cut.
pub fn marker(cut: u64) -> Vec<u8> {
    format!("\n[muster: {cut} bytes of output cut here]\n").into_bytes()
}

/// A punched range of a running attempt's file: `[start, end)` reads as zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hole {
    /// First byte cut (the head kept ends here).
    pub start: u64,
    /// First byte after the cut.
    pub end: u64,
}

impl Hole {
    fn parse(text: &str) -> Option<Hole> {
        let (a, b) = text.trim().split_once(' ')?;
        let h = Hole {
            start: a.parse().ok()?,
            end: b.parse().ok()?,
        };
        (h.start <= h.end).then_some(h)
    }

    fn render(self) -> String {
        format!("{} {}\n", self.start, self.end)
    }
}

/// How far past `cap` a running file's kept bytes may grow before its middle
/// is punched: an eighth of the cap, at least 1 MiB, so a busy file is not
/// punched on every pass (each punch frees at least this much).
pub fn slack(cap: u64) -> u64 {
    (cap / 8).max(1 << 20)
}

/// The shortest time between two cap passes ([`Logs::cap_pass`]): the bound
/// on a running file's kept bytes for an agent writing at a steady rate `r`
/// is `cap + slack(cap) + r × CAP_PASS_MIN` (plus a block; see [`next_pass`]).
pub const CAP_PASS_MIN: Duration = Duration::from_millis(50);
/// The longest time between two cap passes, when no running file grows: an
/// agent silent until then that writes at `r` gets at most
/// `cap + slack(cap) + r × CAP_PASS_MAX` kept bytes before the next pass.
pub const CAP_PASS_MAX: Duration = Duration::from_secs(1);

/// When the cap pass should look again at a running file that keeps `kept`
/// bytes (its size less its hole) and grew by `grown` bytes over the last
/// `elapsed`: when, at that rate, it would pass `cap` + [`slack`]; never
/// sooner than [`CAP_PASS_MIN`] (a stat and a read per file per pass is the
/// price) nor later than [`CAP_PASS_MAX`].
///
/// Why the bound is what it is: the agent writes to its own file, never
/// through the sidecar (a slow sidecar or reader must never block it), so
/// nothing can stop a write from passing the cap; only the next pass can
/// take the excess back. Whatever is written between two passes is the
/// overshoot, and this makes that gap as short as the file's rate needs.
pub fn next_pass(kept: u64, grown: u64, elapsed: Duration, cap: u64) -> Duration {
    if grown == 0 {
        return CAP_PASS_MAX;
    }
    let room = cap.saturating_add(slack(cap)).saturating_sub(kept);
    // room / (grown / elapsed), in nanoseconds, without overflow.
    let ns = u128::from(room).saturating_mul(elapsed.as_nanos()) / u128::from(grown);
    Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX)).clamp(CAP_PASS_MIN, CAP_PASS_MAX)
}

/// The hole a running file of `size` bytes should have under `cap`: `None`
/// while the kept bytes (size less the current hole) are within `cap` plus
/// its [`slack`], else a hole from the end of the kept head (`cap / 2`) to a
/// block boundary before the last `cap / 2` bytes (so right after a punch the
/// kept bytes are at most `cap` plus one block).
pub fn plan_hole(size: u64, current: Option<Hole>, cap: u64) -> Option<Hole> {
    let slack = slack(cap);
    let cut = current.map_or(0, |h| h.end - h.start);
    if size.saturating_sub(cut) <= cap.saturating_add(slack) {
        return None;
    }
    let head = cap / 2;
    let tail = cap - head;
    let end = (size - tail) / BLOCK * BLOCK;
    let start = current.map_or(head, |h| h.start.min(head));
    (end > start && current.is_none_or(|h| end > h.end)).then_some(Hole { start, end })
}

/// Where a `task logs` read finds an attempt's output.
#[derive(Debug, Clone)]
pub struct Logs {
    runs: PathBuf,
    root: PathBuf,
    cfg: LogsConfig,
    /// Attempts whose run ended (so a follower stops at the end of the file)
    /// but whose output is not yet moved. Bounded by the attempts the sidecar holds.
    ended: Arc<Mutex<HashSet<(TaskId, Generation)>>>,
    /// Log streams served now, at most [`STREAMS_MAX`].
    pub streams: Arc<tokio::sync::Semaphore>,
    /// What the last cap pass saw, for each file's rate.
    growth: Arc<Mutex<Growth>>,
}

/// The running files' sizes at the last cap pass, and when it was.
#[derive(Debug, Default)]
struct Growth {
    /// By attempt and stream (0 stdout, 1 stderr); only the files of the last pass.
    sizes: std::collections::HashMap<(TaskId, Generation, usize), u64>,
    last: Option<std::time::Instant>,
}

/// What a log sweep did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SweepReport {
    /// Logs removed (their tombstones stay).
    pub removed: usize,
    /// Bytes freed.
    pub freed_bytes: u64,
}

impl Logs {
    /// The logs of the sidecar with `data_dir`.
    pub fn new(data_dir: &Path, cfg: LogsConfig) -> Self {
        Logs {
            runs: data_dir.join("runs"),
            root: data_dir.join("logs"),
            cfg,
            ended: Arc::default(),
            streams: Arc::new(tokio::sync::Semaphore::new(STREAMS_MAX)),
            growth: Arc::default(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &LogsConfig {
        &self.cfg
    }

    /// Where an attempt's output is kept after it ends.
    pub fn dir(&self, task: TaskId, generation: Generation) -> PathBuf {
        self.root.join(format!("{task}-{generation}"))
    }

    fn run_dir(&self, task: TaskId, generation: Generation) -> PathBuf {
        self.runs.join(format!("{task}-{generation}"))
    }

    /// The attempt's run is over: a follower ends at the end of its output.
    pub fn mark_ended(&self, task: TaskId, generation: Generation) {
        self.lock().insert((task, generation));
    }

    fn is_ended(&self, task: TaskId, generation: Generation) -> bool {
        self.lock().contains(&(task, generation))
            || self.dir(task, generation).join("ended").exists()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<(TaskId, Generation)>> {
        // Inserts and lookups only; a poisoned set is still a valid set.
        self.ended
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Moves the output of the ended attempt whose run directory is `run_dir`
    /// to the log directory and cuts it to the cap, as planned by
    /// [`keep::plan_keep`] from what is on disk. Repeatable: after a crash or a
    /// failure at any step, calling it again finishes the move, and once it
    /// is done it does nothing. The run directory may be pooled or removed
    /// only after this returned `Ok`. Blocking.
    ///
    /// # Errors
    /// The step that failed (or a conflict that would overwrite output): the
    /// output is where it was, and the run directory must stay.
    pub fn keep(
        &self,
        run_dir: &Path,
        task: TaskId,
        generation: Generation,
    ) -> std::io::Result<()> {
        self.keep_upto(run_dir, task, generation, usize::MAX)
    }

    /// [`Logs::keep`], stopping after `limit` steps (a crash, in the tests).
    fn keep_upto(
        &self,
        run_dir: &Path,
        task: TaskId,
        generation: Generation,
        limit: usize,
    ) -> std::io::Result<()> {
        let dest = self.dir(task, generation);
        let seen = observe(run_dir, &dest);
        let steps = keep::plan_keep(&seen, self.cfg.max_bytes_per_attempt).map_err(|c| {
            std::io::Error::other(format!(
                "{c:?}: both {} and {} hold output",
                run_dir.display(),
                dest.display()
            ))
        })?;
        for step in steps.iter().take(limit) {
            #[cfg(feature = "test-hooks")]
            crate::test_hooks::hold_keep_step(
                self.runs.parent().unwrap_or(&self.runs),
                (task, generation),
                &step_label(*step),
                steps.first() == Some(step),
            );
            self.keep_step(run_dir, &dest, *step)?;
        }
        self.lock().remove(&(task, generation));
        Ok(())
    }

    fn keep_step(&self, run_dir: &Path, dest: &Path, step: KeepStep) -> std::io::Result<()> {
        let cap = self.cfg.max_bytes_per_attempt;
        match step {
            KeepStep::Move(s) => {
                std::fs::create_dir_all(dest)?;
                std::fs::rename(run_dir.join(s.as_str()), dest.join(s.as_str()))
            }
            KeepStep::Compact(s) => {
                let kept = dest.join(s.as_str());
                let cut = write_compacted(&kept, &compact_path(&kept), cap)?;
                // Recorded only once the copy is complete: "recorded" then means
                // "install it", never "cut it again".
                write_atomic(
                    &dest.join(format!("{}.cut", s.as_str())),
                    format!("{cut}\n").as_bytes(),
                )
            }
            KeepStep::Install(s) => {
                let kept = dest.join(s.as_str());
                std::fs::rename(compact_path(&kept), &kept)
            }
            KeepStep::MarkEnded => {
                write_atomic(&dest.join("ended"), format!("{}\n", wall_ms()).as_bytes())
            }
        }
    }

    /// Whether the release of the attempt's run directory began: its log
    /// directory holds a moved stream or `ended` (a running attempt's holds at
    /// most its `.hole` records). Blocking.
    pub fn release_began(&self, task: TaskId, generation: Generation) -> bool {
        let dir = self.dir(task, generation);
        dir.join("ended").exists() || kept_exists(&dir)
    }

    /// At startup: finishes the moves to `logs/` a crash cut short after the
    /// run directory went (none is left to plan them by), for attempts not
    /// in `held` (`<task>-<generation>` names). Blocking; one listing of
    /// `logs/` and a few stats per log.
    pub fn finish_moves(&self, held: &HashSet<String>) {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some((task, generation)) = keep::parse_attempt(&name) else {
                continue;
            };
            let dir = e.path();
            let run_dir = self.run_dir(task, generation);
            if !keep::finish_at_startup(
                held.contains(&name),
                dir.join("ended").exists(),
                dir.join("removed").exists(),
                run_dir.exists(),
            ) {
                continue;
            }
            if let Err(e) = self.keep(&run_dir, task, generation) {
                tracing::warn!("could not finish keeping {}: {e}", dir.display());
            }
        }
    }

    /// One pass of the cap on running output: punches the middle out of every
    /// file in a run directory whose kept bytes passed the cap plus its
    /// [`slack`], so a run that prints without end uses bounded disk; returns
    /// when the next pass is due ([`next_pass`] of the fastest-growing file).
    /// Looks at every attempt's directory under `runs/`: running, finished
    /// and not yet released, or orphaned. Blocking; a stat per file.
    pub fn cap_pass(&self) -> Duration {
        let cap = self.cfg.max_bytes_per_attempt;
        let now = std::time::Instant::now();
        let mut growth = self
            .growth
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // A file first seen grew at most since the last pass (it was not there then).
        let since_last = growth
            .last
            .map_or(CAP_PASS_MAX, |t| now.saturating_duration_since(t));
        let mut next = CAP_PASS_MAX;
        let mut seen = std::collections::HashMap::new();
        let Ok(entries) = std::fs::read_dir(&self.runs) else {
            growth.sizes.clear();
            growth.last = Some(now);
            return next;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let Some((task, generation)) = name.to_str().and_then(keep::parse_attempt) else {
                continue;
            };
            for (i, stream) in STREAMS.iter().enumerate() {
                let path = e.path().join(stream.as_str());
                let Ok(meta) = std::fs::metadata(&path) else {
                    continue;
                };
                let size = meta.len();
                let hole_path = self
                    .dir(task, generation)
                    .join(format!("{}.hole", stream.as_str()));
                let mut current = read_hole(&hole_path);
                if let Some(hole) = plan_hole(size, current, cap) {
                    // The hole is recorded before it is punched, so a reader never
                    // takes the zeros for output.
                    let recorded = std::fs::create_dir_all(self.dir(task, generation))
                        .and_then(|()| write_atomic(&hole_path, hole.render().as_bytes()));
                    match recorded.and_then(|()| punch(&path, hole)) {
                        Ok(()) => current = Some(hole),
                        // Moved to logs/ since the stat: its run is over.
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => {
                            tracing::warn!("could not cut the middle of {}: {e}", path.display())
                        }
                    }
                }
                let kept = size - current.map_or(0, |h| h.end.min(size) - h.start.min(size));
                let key = (task, generation, i);
                let grown = match growth.sizes.get(&key) {
                    Some(&before) => size.saturating_sub(before),
                    None => size,
                };
                next = next.min(next_pass(kept, grown, since_last, cap));
                seen.insert(key, size);
            }
        }
        // Only the files seen now: bounded by the run directories.
        growth.sizes = seen;
        growth.last = Some(now);
        next
    }

    /// Removes ended logs past retention, then the oldest while all exceed
    /// `max_disk`, leaving a tombstone; drops old tombstones. Blocking.
    pub fn sweep(&self, now_ms: u64) -> SweepReport {
        let mut report = SweepReport::default();
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return report;
        };
        let mut items = Vec::new();
        let mut dirs = Vec::new();
        for e in entries.flatten() {
            let dir = e.path();
            if let Some((at, _)) = read_tombstone(&dir) {
                if now_ms.saturating_sub(at) >= TOMBSTONE_KEEP_MS {
                    let _ = std::fs::remove_dir_all(&dir);
                }
                continue;
            }
            let finished_at_ms = std::fs::metadata(dir.join("ended"))
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_millis() as u64);
            // The directory and its markers count too, so many small logs are bounded as well.
            let bytes = [LogStream::Stdout, LogStream::Stderr]
                .iter()
                .filter_map(|s| std::fs::metadata(dir.join(s.as_str())).ok())
                .map(|m| disk_bytes(&m))
                .sum::<u64>()
                + DIR_OVERHEAD_BYTES;
            items.push(Usage {
                id: dirs.len(),
                finished_at_ms,
                bytes,
            });
            dirs.push(dir);
        }
        let retention = self.cfg.retention;
        for i in plan_removal(&items, now_ms, retention, self.cfg.max_disk) {
            let u = items[i];
            let aged = u
                .finished_at_ms
                .is_some_and(|at| now_ms.saturating_sub(at) as u128 >= retention.as_millis());
            let why = if aged {
                format!(
                    "removed by retention: the attempt ended more than {} ago ([logs] retention)",
                    muster_protocol::duration::format_duration(retention)
                )
            } else {
                format!(
                    "removed to keep this host's logs under {} bytes ([logs] max_disk), oldest first",
                    self.cfg.max_disk
                )
            };
            if remove_log(&dirs[i], now_ms, &why).is_ok() {
                report.removed += 1;
                report.freed_bytes += u.bytes;
            }
        }
        report
    }

    /// Opens the output of an attempt for reading: the log directory once it
    /// ended, else the run directory. With `follow`, waits up to
    /// [`FOLLOW_APPEAR_WAIT`] for output that does not exist yet.
    ///
    /// # Errors
    /// [`LogError::NotFound`], [`LogError::Removed`] or [`LogError::Failed`].
    pub async fn open(
        &self,
        task: TaskId,
        generation: Generation,
        stream: LogStream,
        tail: Option<u64>,
        follow: bool,
    ) -> Result<LogReader, LogError> {
        let deadline = tokio::time::Instant::now() + FOLLOW_APPEAR_WAIT;
        loop {
            let dir = self.dir(task, generation);
            if let Some((at_ms, reason)) = read_tombstone(&dir) {
                return Err(LogError::Removed { reason, at_ms });
            }
            let kept = dir.join(stream.as_str());
            let ended = dir.join("ended").exists();
            let (path, running) = if ended {
                (kept.clone(), false)
            } else {
                (self.run_dir(task, generation).join(stream.as_str()), true)
            };
            match std::fs::File::open(&path) {
                Ok(file) => {
                    let hole_path = dir.join(format!("{}.hole", stream.as_str()));
                    let cut_file = dir.join(format!("{}.cut", stream.as_str()));
                    let mut r = LogReader {
                        file,
                        pos: 0,
                        running,
                        follow,
                        hole_path,
                        hole: None,
                        pending: None,
                        logs: self.clone(),
                        task,
                        generation,
                        sent: 0,
                        cut: if running { 0 } else { read_number(&cut_file) },
                        draining: false,
                        done: false,
                    };
                    if let Some(lines) = tail {
                        r.seek_tail(lines).map_err(failed)?;
                    }
                    return Ok(r);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    let ended_without_output = ended && !kept_exists(&dir);
                    // Being moved to logs/ (out of the run directory, `ended` not yet
                    // written): the move takes milliseconds, and a restart finishes
                    // one a crash cut short before it serves a read.
                    let moving = !ended && kept.exists();
                    if (!follow && !moving)
                        || ended_without_output
                        || tokio::time::Instant::now() >= deadline
                    {
                        return Err(LogError::NotFound);
                    }
                    tokio::time::sleep(FOLLOW_POLL).await;
                }
                Err(e) => return Err(failed(e)),
            }
        }
    }

    /// The newest generation of `task` with output or a trace on this host.
    pub fn latest(&self, task: TaskId) -> Option<Generation> {
        let prefix = format!("{task}-");
        [&self.runs, &self.root]
            .iter()
            .filter_map(|d| std::fs::read_dir(d).ok())
            .flat_map(|d| d.flatten())
            .filter_map(|e| {
                let name = e.file_name();
                let g = name.to_str()?.strip_prefix(&prefix)?.parse().ok()?;
                Some(Generation(g))
            })
            .max()
    }
}

fn kept_exists(dir: &Path) -> bool {
    [LogStream::Stdout, LogStream::Stderr]
        .iter()
        .any(|s| dir.join(s.as_str()).exists())
}

fn failed(e: std::io::Error) -> LogError {
    LogError::Failed {
        reason: e.to_string(),
    }
}

/// Reads one attempt's output in chunks of at most [`LOG_CHUNK_BYTES_MAX`].
#[derive(Debug)]
pub struct LogReader {
    file: std::fs::File,
    pos: u64,
    /// Opened in the run directory: the run may go on, and a hole may be punched.
    running: bool,
    follow: bool,
    hole_path: PathBuf,
    hole: Option<Hole>,
    /// A marker to send before the next read.
    pending: Option<Vec<u8>>,
    logs: Logs,
    task: TaskId,
    generation: Generation,
    sent: u64,
    cut: u64,
    /// The run ended: read to the end once more, then stop.
    draining: bool,
    done: bool,
}

impl LogReader {
    /// The next chunk; `None` at the end (with `follow`, once the attempt
    /// ended and everything it wrote was read).
    ///
    /// # Errors
    /// [`LogError::Failed`] when the file cannot be read.
    pub async fn next(&mut self) -> Result<Option<Vec<u8>>, LogError> {
        loop {
            if self.done {
                return Ok(None);
            }
            if let Some(m) = self.pending.take() {
                self.sent += m.len() as u64;
                return Ok(Some(m));
            }
            if self.running {
                self.reload_hole();
                if self.skip_hole() {
                    continue;
                }
            }
            let limit = match self.hole {
                Some(h) if self.running && self.pos < h.start => h.start,
                _ => u64::MAX,
            };
            let want = (limit - self.pos).min(LOG_CHUNK_BYTES_MAX as u64) as usize;
            let mut buf = vec![0u8; want];
            let n = self.read_at(&mut buf).map_err(failed)?;
            if n > 0 {
                buf.truncate(n);
                if self.running {
                    // A hole punched while this was read: its zeros are not output.
                    self.reload_hole();
                    if let Some(h) = self.hole
                        && self.pos + n as u64 > h.start
                        && h.end > self.pos
                    {
                        let keep = h.start.saturating_sub(self.pos) as usize;
                        buf.truncate(keep);
                        if buf.is_empty() {
                            continue;
                        }
                    }
                }
                self.pos += buf.len() as u64;
                self.sent += buf.len() as u64;
                return Ok(Some(buf));
            }
            if !self.follow || !self.running || self.draining {
                self.done = true;
                return Ok(None);
            }
            if self.logs.is_ended(self.task, self.generation) {
                self.draining = true;
                continue;
            }
            tokio::time::sleep(FOLLOW_POLL).await;
        }
    }

    /// What the stream sent, for its end frame.
    pub fn end(&self) -> LogEnd {
        LogEnd {
            bytes: self.sent,
            cut_bytes: self.cut,
            ended: !self.running || self.draining,
        }
    }

    fn read_at(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.seek(SeekFrom::Start(self.pos))?;
        let mut n = 0;
        while n < buf.len() {
            match self.file.read(&mut buf[n..])? {
                0 => break,
                k => n += k,
            }
        }
        Ok(n)
    }

    fn reload_hole(&mut self) {
        if let Some(h) = read_hole(&self.hole_path) {
            self.hole = Some(h);
        }
    }

    /// At a hole: queues its marker and moves past it.
    fn skip_hole(&mut self) -> bool {
        match self.hole {
            Some(h) if self.pos >= h.start && self.pos < h.end => {
                let cut = h.end - self.pos;
                self.cut += cut;
                self.pos = h.end;
                self.pending = Some(marker(cut));
                true
            }
            _ => false,
        }
    }

    /// Starts at the last `lines` lines (at most [`LOG_TAIL_BYTES_MAX`] bytes
    /// back, never into a hole).
    fn seek_tail(&mut self, lines: u64) -> std::io::Result<()> {
        if self.running {
            self.reload_hole();
        }
        let size = self.file.metadata()?.len();
        let floor = size
            .saturating_sub(LOG_TAIL_BYTES_MAX)
            .max(self.hole.filter(|_| self.running).map_or(0, |h| h.end));
        let mut end = size;
        let mut seen = 0u64;
        let mut buf = vec![0u8; LOG_CHUNK_BYTES_MAX];
        // A last line without its newline counts as a line too.
        let mut skip_last_newline = true;
        while end > floor {
            let start = end.saturating_sub(buf.len() as u64).max(floor);
            let len = (end - start) as usize;
            self.pos = start;
            let n = self.read_at(&mut buf[..len])?;
            for i in (0..n).rev() {
                if buf[i] == b'\n' {
                    if skip_last_newline && start + i as u64 + 1 == size {
                        skip_last_newline = false;
                        continue;
                    }
                    seen += 1;
                    if seen >= lines {
                        self.pos = start + i as u64 + 1;
                        return Ok(());
                    }
                }
                skip_last_newline = false;
            }
            end = start;
        }
        self.pos = floor;
        Ok(())
    }
}

/// Cuts the file at `path` to `cap` bytes, keeping its first and last halves
/// with a marker between; returns the bytes cut (0: it fit). Writes the new
/// file beside it and renames it over. Blocking.
///
/// # Errors
/// Reading `path` or writing the copy beside it.
pub fn compact(path: &Path, cap: u64) -> std::io::Result<u64> {
    let tmp = compact_path(path);
    let cut = write_compacted(path, &tmp, cap)?;
    if cut > 0 {
        std::fs::rename(&tmp, path)?;
    }
    Ok(cut)
}

/// Where the compacted copy of `path` is written before it replaces it.
fn compact_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(".compact");
    path.with_file_name(name)
}

/// Writes the first and last halves of `cap` bytes of `path`, with a marker
/// between, to `tmp` (truncating what a crash left there); returns the bytes
/// cut, 0 (and no copy) when the file fits. Blocking.
fn write_compacted(path: &Path, tmp: &Path, cap: u64) -> std::io::Result<u64> {
    let mut src = std::fs::File::open(path)?;
    let size = src.metadata()?.len();
    if size <= cap {
        return Ok(0);
    }
    let head = cap / 2;
    let tail = cap - head;
    let cut = size - head - tail;
    use std::os::unix::fs::OpenOptionsExt;
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(tmp)?;
    std::io::copy(&mut (&mut src).take(head), &mut out)?;
    out.write_all(&marker(cut))?;
    src.seek(SeekFrom::Start(size - tail))?;
    std::io::copy(&mut src.take(tail), &mut out)?;
    out.flush()?;
    Ok(cut)
}

/// What an attempt's run and log directories hold, for [`keep::plan_keep`].
/// Blocking. A directory that is not there holds nothing, so its files are
/// not probed: most attempts end with no log directory, and many (an agent
/// that writes nothing, in process) with no run directory, and each probe is
/// a `statx` on the sidecar's hot path.
fn observe(run_dir: &Path, dest: &Path) -> AttemptOnDisk {
    let size = |p: PathBuf| {
        std::fs::metadata(p)
            .ok()
            .filter(|m| m.is_file())
            .map(|m| m.len())
    };
    let run_dir_there = run_dir.is_dir();
    let log_dir = dest.is_dir();
    AttemptOnDisk {
        streams: STREAMS.map(|s| {
            let kept = dest.join(s.as_str());
            StreamOnDisk {
                run: run_dir_there
                    .then(|| size(run_dir.join(s.as_str())))
                    .flatten(),
                kept: log_dir.then(|| size(kept.clone())).flatten(),
                cut_recorded: log_dir && dest.join(format!("{}.cut", s.as_str())).exists(),
                compacted: log_dir && compact_path(&kept).exists(),
            }
        }),
        log_dir,
        ended: log_dir && dest.join("ended").exists(),
    }
}

/// A step's name for the test hook: `move:stdout`, `compact:stderr`, `ended`.
#[cfg(feature = "test-hooks")]
fn step_label(step: KeepStep) -> String {
    match step {
        KeepStep::Move(s) | KeepStep::Compact(s) | KeepStep::Install(s) => {
            format!("{}:{}", step.name(), s.as_str())
        }
        KeepStep::MarkEnded => step.name().to_owned(),
    }
}

#[allow(unsafe_code)]
fn punch(path: &Path, hole: Hole) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new().write(true).open(path)?;
    let (Ok(off), Ok(len)) = (
        libc::off_t::try_from(hole.start),
        libc::off_t::try_from(hole.end - hole.start),
    ) else {
        return Err(std::io::Error::other("hole beyond the largest file offset"));
    };
    // SAFETY: the descriptor is open for writing for the length of the call;
    // fallocate reads no memory of ours.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Writes `path` whole or not at all: a crash leaves the old file or the new.
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    // Beside it, named after it: `stdout.hole` and `stdout.cut` never share one.
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(".tmp");
    let tmp = path.with_file_name(name);
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

fn read_hole(path: &Path) -> Option<Hole> {
    Hole::parse(&std::fs::read_to_string(path).ok()?)
}

fn read_number(path: &Path) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn read_tombstone(dir: &Path) -> Option<(u64, String)> {
    let text = std::fs::read_to_string(dir.join("removed")).ok()?;
    let (at, why) = text.split_once(' ')?;
    Some((at.parse().ok()?, why.trim().to_owned()))
}

/// Removes a log's files and leaves its tombstone (written first, so a reader
/// never finds neither).
fn remove_log(dir: &Path, now_ms: u64, why: &str) -> std::io::Result<()> {
    write_atomic(&dir.join("removed"), format!("{now_ms} {why}\n").as_bytes())?;
    for e in std::fs::read_dir(dir)?.flatten() {
        if e.file_name() != "removed" {
            let _ = std::fs::remove_file(e.path());
        }
    }
    Ok(())
}

fn disk_bytes(m: &std::fs::Metadata) -> u64 {
    use std::os::unix::fs::MetadataExt;
    (m.blocks() * 512).min(m.len().max(m.blocks() * 512))
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(cap: u64) -> LogsConfig {
        LogsConfig {
            max_bytes_per_attempt: cap,
            retention: Duration::from_secs(3600),
            max_disk: 1 << 30,
        }
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i % 251) as u8).collect()
    }

    async fn read_all(r: &mut LogReader) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(c) = r.next().await.expect("read") {
            assert!(c.len() <= LOG_CHUNK_BYTES_MAX);
            out.extend(c);
        }
        out
    }

    #[test]
    fn a_hole_is_planned_only_past_cap_and_slack_and_only_grows() {
        let mib = 1 << 20;
        assert_eq!(plan_hole(10 * mib, None, 64 * mib), None);
        assert_eq!(plan_hole(64 * mib + mib, None, 64 * mib), None);
        let h = plan_hole(100 * mib, None, 64 * mib).expect("a hole");
        assert_eq!(h.start, 32 * mib);
        assert_eq!(h.end, 68 * mib);
        // Kept bytes within the cap again: nothing more.
        assert_eq!(plan_hole(101 * mib, Some(h), 64 * mib), None);
        let h2 = plan_hole(200 * mib, Some(h), 64 * mib).expect("a larger hole");
        assert_eq!(h2.start, h.start);
        assert_eq!(h2.end, 168 * mib);
        assert_eq!(Hole::parse(&h2.render()), Some(h2));
        assert_eq!(Hole::parse("9 3"), None);
    }

    #[test]
    fn compaction_keeps_both_halves_and_marks_the_gap() {
        let tmp = tempfile::tempdir().expect("tmp");
        let p = tmp.path().join("stdout");
        let data = pattern(10_000);
        std::fs::write(&p, &data).expect("write");
        assert_eq!(compact(&p, 20_000).expect("fits"), 0);
        assert_eq!(compact(&p, 4_000).expect("cut"), 6_000);
        let got = std::fs::read(&p).expect("read");
        let mut want = data[..2_000].to_vec();
        want.extend(marker(6_000));
        want.extend(&data[8_000..]);
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn a_run_past_its_cap_is_punched_read_around_the_hole_and_compacted_at_its_end() {
        let tmp = tempfile::tempdir().expect("tmp");
        let cap = 2 << 20;
        let logs = Logs::new(tmp.path(), cfg(cap));
        let (t, g) = (TaskId(7), Generation(2));
        let run = tmp.path().join("runs/7-2");
        std::fs::create_dir_all(&run).expect("mkdir");
        let data = pattern(8 << 20);
        std::fs::write(run.join("stdout"), &data).expect("write");
        std::fs::write(run.join("stderr"), b"oops\n").expect("write");
        logs.cap_pass();
        let hole = read_hole(&logs.dir(t, g).join("stdout.hole")).expect("hole recorded");
        assert_eq!(hole.start, cap / 2);
        // Read while running: the head, one marker, the rest after the hole.
        let mut r = logs
            .open(t, g, LogStream::Stdout, None, false)
            .await
            .expect("open");
        let got = read_all(&mut r).await;
        let mut want = data[..hole.start as usize].to_vec();
        want.extend(marker(hole.end - hole.start));
        want.extend(&data[hole.end as usize..]);
        assert_eq!(got.len(), want.len());
        assert!(got == want, "running read differs");
        // Ended: moved and compacted to the cap.
        logs.keep(&run, t, g).expect("keep");
        assert!(!run.join("stdout").exists());
        let mut r = logs
            .open(t, g, LogStream::Stdout, None, false)
            .await
            .expect("open");
        let got = read_all(&mut r).await;
        let cut = data.len() as u64 - cap;
        let mut want = data[..(cap / 2) as usize].to_vec();
        want.extend(marker(cut));
        want.extend(&data[data.len() - (cap / 2) as usize..]);
        assert!(got == want, "compacted read differs");
        assert_eq!(r.end().cut_bytes, cut);
        let mut r = logs
            .open(t, g, LogStream::Stderr, None, false)
            .await
            .expect("open");
        assert_eq!(read_all(&mut r).await, b"oops\n");
    }

    /// Everything an attempt's log directory holds, and whether its run
    /// directory still holds output.
    fn snapshot(logs: &Logs, run: &Path, t: TaskId, g: Generation) -> Vec<(String, Vec<u8>)> {
        let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(logs.dir(t, g))
            .map(|d| {
                d.flatten()
                    .map(|e| {
                        let name = e.file_name().to_string_lossy().into_owned();
                        // `ended` holds a time: only its presence counts.
                        let body = if name == "ended" {
                            Vec::new()
                        } else {
                            std::fs::read(e.path()).expect("read")
                        };
                        (name, body)
                    })
                    .collect()
            })
            .unwrap_or_default();
        for s in STREAMS {
            if run.join(s.as_str()).exists() {
                files.push((format!("run:{}", s.as_str()), Vec::new()));
            }
        }
        files.sort();
        files
    }

    #[test]
    fn keeping_cut_short_at_any_step_and_repeated_gives_the_same_logs() {
        let cap = 4096;
        let (t, g) = (TaskId(9), Generation(1));
        let out = pattern(20_000);
        let err = pattern(3_000);
        let setup = || {
            let tmp = tempfile::tempdir().expect("tmp");
            let logs = Logs::new(tmp.path(), cfg(cap));
            let run = tmp.path().join("runs/9-1");
            std::fs::create_dir_all(&run).expect("mkdir");
            std::fs::write(run.join("stdout"), &out).expect("write");
            std::fs::write(run.join("stderr"), &err).expect("write");
            (tmp, logs, run)
        };
        let (_keep_tmp, want_logs, want_run) = setup();
        want_logs.keep(&want_run, t, g).expect("keep");
        let want = snapshot(&want_logs, &want_run, t, g);
        assert!(want.iter().any(|(n, _)| n == "stdout.cut"), "{want:?}");
        assert!(!want.iter().any(|(n, _)| n.starts_with("run:")));
        // Move, compact, install stdout; move stderr; ended: five steps.
        for k in 0..=5 {
            let (_tmp, logs, run) = setup();
            logs.keep_upto(&run, t, g, k).expect("first try");
            if k == 1 {
                // Killed while writing the compacted copy: a partial one is left.
                std::fs::write(logs.dir(t, g).join("stdout.compact"), b"partial").expect("write");
            }
            logs.keep(&run, t, g).expect("again");
            assert_eq!(
                snapshot(&logs, &run, t, g),
                want,
                "cut short after {k} steps"
            );
            // And once more: nothing changes (never cut twice).
            logs.keep(&run, t, g).expect("once more");
            assert_eq!(
                snapshot(&logs, &run, t, g),
                want,
                "repeated after {k} steps"
            );
        }
    }

    #[tokio::test]
    async fn a_read_during_the_move_waits_for_it() {
        let tmp = tempfile::tempdir().expect("tmp");
        let logs = Logs::new(tmp.path(), cfg(1 << 30));
        let (t, g) = (TaskId(8), Generation(1));
        let run = tmp.path().join("runs/8-1");
        std::fs::create_dir_all(&run).expect("mkdir");
        std::fs::write(run.join("stdout"), b"all of it\n").expect("write");
        // Stdout moved, `ended` not yet written.
        logs.keep_upto(&run, t, g, 1).expect("one step");
        let reader = logs.open(t, g, LogStream::Stdout, None, false);
        let finish = async {
            tokio::time::sleep(FOLLOW_POLL).await;
            logs.keep(&run, t, g).expect("keep");
        };
        let (r, ()) = tokio::join!(reader, finish);
        let mut r = r.expect("open once moved");
        assert_eq!(read_all(&mut r).await, b"all of it\n");
    }

    #[test]
    fn a_steady_writer_stays_within_cap_slack_and_its_rate_over_the_shortest_pass() {
        // Virtual time in milliseconds; the cap pass as the daemon runs it.
        let cap: u64 = 8 << 20;
        let min_ms = CAP_PASS_MIN.as_millis() as u64;
        let max_ms = CAP_PASS_MAX.as_millis() as u64;
        for (silent_ms, per_ms) in [(0, 1_000u64), (0, 50_000), (0, 2_000_000), (3_000, 50_000)] {
            let (mut size, mut hole, mut worst) = (0u64, None::<Hole>, 0u64);
            let (mut before, mut last, mut due) = (0u64, 0u64, 0u64);
            for now in 0..20_000u64 {
                if now >= silent_ms {
                    size += per_ms;
                }
                let kept = size - hole.map_or(0, |h| h.end - h.start);
                worst = worst.max(kept);
                if now == due {
                    if let Some(h) = plan_hole(size, hole, cap) {
                        hole = Some(h);
                        let kept = size - (h.end - h.start);
                        assert!(kept <= cap + BLOCK, "after a punch: {kept}");
                    }
                    let kept = size - hole.map_or(0, |h| h.end - h.start);
                    let wait =
                        next_pass(kept, size - before, Duration::from_millis(now - last), cap);
                    assert!((CAP_PASS_MIN..=CAP_PASS_MAX).contains(&wait));
                    (before, last, due) = (size, now, now + wait.as_millis() as u64);
                }
            }
            // Steady from the start: the shortest pass bounds the overshoot; from
            // silence: the longest (the rate was unknown).
            let gap_ms = if silent_ms == 0 { min_ms } else { max_ms };
            let bound = cap + slack(cap) + per_ms * gap_ms + BLOCK;
            assert!(worst <= bound, "{per_ms} B/ms: {worst} > {bound}");
            assert!(size > cap, "the writer passed the cap");
        }
        // Slow writers are looked at seldom.
        assert_eq!(next_pass(0, 0, CAP_PASS_MAX, cap), CAP_PASS_MAX);
        assert_eq!(next_pass(0, 10, CAP_PASS_MAX, cap), CAP_PASS_MAX);
        assert_eq!(
            next_pass(cap + slack(cap), 10, CAP_PASS_MAX, cap),
            CAP_PASS_MIN
        );
    }

    #[tokio::test]
    async fn tail_gives_the_last_lines() {
        let tmp = tempfile::tempdir().expect("tmp");
        let logs = Logs::new(tmp.path(), cfg(1 << 30));
        let run = tmp.path().join("runs/1-1");
        std::fs::create_dir_all(&run).expect("mkdir");
        let text: String = (1..=1000).map(|i| format!("line {i}\n")).collect();
        std::fs::write(run.join("stdout"), &text).expect("write");
        let open = |n| logs.open(TaskId(1), Generation(1), LogStream::Stdout, Some(n), false);
        let mut r = open(3).await.expect("open");
        assert_eq!(read_all(&mut r).await, b"line 998\nline 999\nline 1000\n");
        let mut r = open(5000).await.expect("open");
        assert_eq!(read_all(&mut r).await, text.as_bytes());
        std::fs::write(run.join("stdout"), "a\nb").expect("write");
        let mut r = open(1).await.expect("open");
        assert_eq!(read_all(&mut r).await, b"b");
    }

    #[tokio::test]
    async fn a_follower_sees_new_output_and_ends_with_the_attempt() {
        let tmp = tempfile::tempdir().expect("tmp");
        let logs = Logs::new(tmp.path(), cfg(1 << 30));
        let (t, g) = (TaskId(3), Generation(1));
        let run = tmp.path().join("runs/3-1");
        std::fs::create_dir_all(&run).expect("mkdir");
        let mut f = std::fs::File::create(run.join("stdout")).expect("create");
        f.write_all(b"one\n").expect("write");
        let mut r = logs
            .open(t, g, LogStream::Stdout, None, true)
            .await
            .expect("open");
        assert_eq!(r.next().await.expect("read"), Some(b"one\n".to_vec()));
        f.write_all(b"two\n").expect("write");
        let next = tokio::time::timeout(Duration::from_secs(1), r.next()).await;
        assert_eq!(
            next.expect("in time").expect("read"),
            Some(b"two\n".to_vec())
        );
        f.write_all(b"three\n").expect("write");
        logs.mark_ended(t, g);
        logs.keep(&run, t, g).expect("keep");
        assert_eq!(r.next().await.expect("read"), Some(b"three\n".to_vec()));
        assert_eq!(r.next().await.expect("read"), None);
        assert!(r.end().ended);
    }

    #[tokio::test]
    async fn retention_leaves_a_tombstone_that_readers_are_told_about() {
        let tmp = tempfile::tempdir().expect("tmp");
        let mut c = cfg(1 << 30);
        c.retention = Duration::from_millis(1);
        let logs = Logs::new(tmp.path(), c);
        let run = tmp.path().join("runs/5-1");
        std::fs::create_dir_all(&run).expect("mkdir");
        std::fs::write(run.join("stdout"), b"x").expect("write");
        logs.keep(&run, TaskId(5), Generation(1)).expect("keep");
        assert_eq!(logs.latest(TaskId(5)), Some(Generation(1)));
        let report = logs.sweep(wall_ms() + 10);
        assert_eq!(report.removed, 1);
        let err = logs
            .open(TaskId(5), Generation(1), LogStream::Stdout, None, false)
            .await
            .expect_err("gone");
        assert!(matches!(&err, LogError::Removed { reason, .. } if reason.contains("retention")));
        let missing = logs
            .open(TaskId(6), Generation(1), LogStream::Stdout, None, false)
            .await
            .expect_err("never there");
        assert_eq!(missing, LogError::NotFound);
    }
}
