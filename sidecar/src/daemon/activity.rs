//! What each running attempt is doing, measured for the heartbeat, and the
//! usage its transcript shows, read as the run writes it.
//!
//! Bounded cost per heartbeat: one pass over `/proc` for every run's process
//! group (at most `PROC_SCAN_MAX` entries), two `stat`s of the run's output
//! files, two of its workspace (the top directory and the git index; never a
//! tree walk), and the last [`TAIL_READ_BYTES`] of stdout when output is quiet.
//! A transcript is followed by offset, at most [`POLL_BYTES_MAX`] per attempt
//! per read, lines longer than `transcript::LINE_BYTES_MAX` skipped.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use muster_protocol::msg::{Activity, Phase, Usage};
use muster_protocol::{Generation, TaskId, limits};

use super::Daemon;
use crate::agent::RunMode;
use crate::config::WorkspaceMode;
use crate::core::Core;
use crate::transcript::{self, Format, Parser};

/// Bytes of a transcript read per attempt per poll (a poll comes with each
/// heartbeat, and before an attempt's end is reported): 4 MiB.
pub(super) const POLL_BYTES_MAX: u64 = 4 << 20;
/// Bytes from the end of stdout read for the output tail.
pub(super) const TAIL_READ_BYTES: u64 = 2048;
/// Lines of output the tail keeps.
pub(super) const TAIL_LINES: usize = 5;
/// Attempts followed at once, at most (a sidecar runs at most its slots).
pub(super) const FOLLOWED_MAX: usize = 1024;

type Attempt = (TaskId, Generation);

/// One transcript being followed.
#[derive(Debug)]
pub(super) struct Follower {
    format: Format,
    /// How far the file has been read.
    offset: u64,
    /// The start of a line not yet ended, at most `LINE_BYTES_MAX`.
    partial: Vec<u8>,
    /// Inside a line longer than `LINE_BYTES_MAX`: skip to its end.
    skipping: bool,
    parser: Parser,
    /// The usage last handed to the core.
    reported: Option<Usage>,
}

impl Follower {
    fn new(format: Format) -> Follower {
        Follower {
            format,
            offset: 0,
            partial: Vec::new(),
            skipping: false,
            parser: Parser::new(format),
            reported: None,
        }
    }

    /// Reads what was written since the last read (up to [`POLL_BYTES_MAX`]);
    /// returns the usage if it changed.
    fn poll(&mut self, path: &Path) -> Option<Usage> {
        let mut f = std::fs::File::open(path).ok()?;
        let len = f.metadata().ok()?.len();
        if len < self.offset {
            // Truncated or replaced: read it again from the start.
            *self = Follower::new(self.format);
        }
        f.seek(SeekFrom::Start(self.offset)).ok()?;
        let mut buf = Vec::new();
        f.take(POLL_BYTES_MAX).read_to_end(&mut buf).ok()?;
        self.offset += buf.len() as u64;
        self.feed(&buf);
        let usage = self.parser.usage();
        if usage.is_some() && usage != self.reported {
            self.reported.clone_from(&usage);
            return usage;
        }
        None
    }

    /// Feeds complete lines to the parser, keeping a bounded partial line.
    fn feed(&mut self, mut buf: &[u8]) {
        while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
            let (line, rest) = buf.split_at(nl);
            buf = &rest[1..];
            if self.skipping {
                self.skipping = false;
                continue;
            }
            if self.partial.is_empty() {
                if line.len() <= transcript::LINE_BYTES_MAX {
                    self.parser.line(line);
                }
            } else if self.partial.len() + line.len() <= transcript::LINE_BYTES_MAX {
                self.partial.extend_from_slice(line);
                let whole = std::mem::take(&mut self.partial);
                self.parser.line(&whole);
            } else {
                self.partial.clear();
            }
        }
        if self.skipping {
            return;
        }
        if self.partial.len() + buf.len() > transcript::LINE_BYTES_MAX {
            self.partial.clear();
            self.skipping = true;
        } else {
            self.partial.extend_from_slice(buf);
        }
    }
}

/// The transcripts followed, per attempt.
#[derive(Debug, Default)]
pub(super) struct Transcripts {
    followers: HashMap<Attempt, Follower>,
}

impl Daemon {
    /// Reads the transcripts of running attempts (only `only`, if given) and
    /// hands the core any usage that changed. Call before an attempt's end
    /// reaches the core, so its final usage is reported before it.
    pub(super) fn read_usage(&mut self, core: &mut Core, only: Option<Attempt>) {
        let Some(format) = self.cfg.agent.transcript.format() else {
            return;
        };
        let runs: Vec<(Attempt, PathBuf)> = core
            .tasks()
            .filter(|t| t.phase != Phase::Finished)
            .filter(|t| only.is_none_or(|a| a == (t.task, t.generation)))
            .filter_map(|t| Some(((t.task, t.generation), t.handle.as_ref()?.run_dir.clone())))
            .collect();
        let live: Vec<Attempt> = core
            .tasks()
            .filter(|t| t.phase != Phase::Finished)
            .map(|t| (t.task, t.generation))
            .collect();
        if only.is_none() {
            self.transcripts.followers.retain(|a, _| live.contains(a));
        }
        for (attempt, run_dir) in runs {
            if !self.transcripts.followers.contains_key(&attempt)
                && self.transcripts.followers.len() >= FOLLOWED_MAX
            {
                continue;
            }
            let f = self
                .transcripts
                .followers
                .entry(attempt)
                .or_insert_with(|| Follower::new(format));
            if let Some(usage) = f.poll(&run_dir.join("stdout")) {
                core.handle_usage(attempt.0, attempt.1, usage);
            }
        }
    }

    /// What each running attempt is doing, for the heartbeat.
    pub(super) fn activity(&self, core: &Core, quiet_after: Duration) -> Vec<Activity> {
        let now = SystemTime::now();
        let runs: Vec<_> = core
            .tasks()
            .filter(|t| t.phase == Phase::Running)
            .filter_map(|t| Some((t.task, t.generation, t.handle.as_ref()?)))
            .take(limits::HELD_TASKS_MAX)
            .collect();
        let groups: Vec<Option<u32>> = runs
            .iter()
            .map(|(_, _, h)| match (h.mode, h.pid) {
                // An exec run leads its own group: its pid is the group's id.
                (RunMode::Exec, Some(pid)) => Some(pid),
                (RunMode::Wake, Some(pid)) => crate::agent::group_of(pid),
                (_, None) => None,
            })
            .collect();
        let wanted: Vec<u32> = groups.iter().flatten().copied().collect();
        let cpu = crate::agent::groups_cpu_ms(&wanted);
        runs.iter()
            .zip(groups)
            .map(|((task, generation, h), group)| {
                let (bytes, written) = output_figures(&h.run_dir);
                let output_age = written.map(|t| age_ms(now, t));
                let quiet = output_age.is_some_and(|a| a >= quiet_after.as_millis() as u64);
                Activity {
                    task: *task,
                    generation: *generation,
                    cpu_ms: group.and_then(|g| cpu.get(&g).copied()),
                    output_bytes: bytes,
                    output_age_ms: output_age,
                    workspace_age_ms: self
                        .workspace_dir(*task, *generation)
                        .and_then(|d| workspace_changed(&d))
                        .map(|t| age_ms(now, t)),
                    output_tail: if quiet {
                        output_tail(&h.run_dir.join("stdout"))
                    } else {
                        String::new()
                    },
                }
            })
            .collect()
    }

    /// The attempt's own workspace, in `dir` and `git` mode.
    fn workspace_dir(&self, task: TaskId, generation: Generation) -> Option<PathBuf> {
        match self.cfg.workspace.mode {
            WorkspaceMode::Shared => None,
            WorkspaceMode::Dir | WorkspaceMode::Git => Some(self.workspaces.path(task, generation)),
        }
    }
}

fn age_ms(now: SystemTime, then: SystemTime) -> u64 {
    now.duration_since(then).unwrap_or_default().as_millis() as u64
}

/// Bytes in stdout and stderr, and when either was last written.
fn output_figures(run_dir: &Path) -> (u64, Option<SystemTime>) {
    let mut bytes = 0;
    let mut written = None;
    for name in ["stdout", "stderr"] {
        if let Ok(m) = std::fs::metadata(run_dir.join(name)) {
            bytes += m.len();
            written = written.max(m.modified().ok());
        }
    }
    (bytes, written)
}

/// When the workspace last changed, as far as two `stat`s tell: its top
/// directory (files made, removed or renamed there) and its git index (a
/// worktree's `.git` file names the directory that holds it).
fn workspace_changed(dir: &Path) -> Option<SystemTime> {
    let top = std::fs::metadata(dir).and_then(|m| m.modified()).ok();
    let dot_git = dir.join(".git");
    let index = match std::fs::metadata(&dot_git) {
        Ok(m) if m.is_dir() => Some(dot_git.join("index")),
        Ok(m) if m.len() <= 4096 => std::fs::read_to_string(&dot_git)
            .ok()
            .and_then(|t| t.strip_prefix("gitdir:").map(|p| PathBuf::from(p.trim())))
            .map(|g| g.join("index")),
        _ => None,
    };
    let index = index.and_then(|i| std::fs::metadata(i).and_then(|m| m.modified()).ok());
    top.max(index)
}

/// The last lines of a file, at most [`TAIL_LINES`] and
/// `limits::OUTPUT_TAIL_BYTES_MAX` bytes.
fn output_tail(path: &Path) -> String {
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if f.seek(SeekFrom::Start(len.saturating_sub(TAIL_READ_BYTES)))
        .is_err()
    {
        return String::new();
    }
    let mut buf = Vec::new();
    if f.take(TAIL_READ_BYTES).read_to_end(&mut buf).is_err() {
        return String::new();
    }
    tail_lines(&String::from_utf8_lossy(&buf))
}

/// The last [`TAIL_LINES`] non-empty lines of `text`, cut from the front to
/// `limits::OUTPUT_TAIL_BYTES_MAX` bytes.
fn tail_lines(text: &str) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut tail = lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n");
    if tail.len() > limits::OUTPUT_TAIL_BYTES_MAX {
        let mut start = tail.len() - limits::OUTPUT_TAIL_BYTES_MAX;
        while !tail.is_char_boundary(start) {
            start += 1;
        }
        tail = tail[start..].to_string();
    }
    tail
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turn(input: u64) -> String {
        format!(
            "{{\"type\":\"turn.completed\",\"usage\":{{\"input_tokens\":{input},\"cached_input_tokens\":0,\"output_tokens\":1}}}}\n"
        )
    }

    #[test]
    fn a_follower_reads_lines_as_they_are_written_and_skips_long_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("stdout");
        let mut f = Follower::new(Format::CodexJson);
        assert_eq!(f.poll(&path), None, "no file yet");
        let first = turn(10);
        let (a, b) = first.split_at(20);
        std::fs::write(&path, a).expect("write");
        assert_eq!(f.poll(&path), None, "half a line");
        let long = format!("{}\n", "x".repeat(transcript::LINE_BYTES_MAX + 10));
        std::fs::write(&path, format!("{a}{b}{long}{}", turn(5))).expect("write");
        let u = f.poll(&path).expect("usage");
        assert_eq!(u.input_tokens, 15);
        assert_eq!(f.poll(&path), None, "nothing new");
    }

    #[test]
    fn a_line_longer_than_the_limit_split_across_reads_is_skipped() {
        let mut f = Follower::new(Format::CodexJson);
        f.feed(&vec![b'{'; transcript::LINE_BYTES_MAX]);
        f.feed(b"more of the same line");
        f.feed(format!("\n{}", turn(7)).as_bytes());
        assert_eq!(f.parser.usage().map(|u| u.input_tokens), Some(7));
    }

    #[test]
    fn the_tail_keeps_the_last_lines_within_bounds() {
        assert_eq!(tail_lines("a\nb\n\nc\nd\ne\nf\n"), "b\nc\nd\ne\nf");
        let long = "é".repeat(1000);
        let t = tail_lines(&long);
        assert!(t.len() <= limits::OUTPUT_TAIL_BYTES_MAX);
    }
}
