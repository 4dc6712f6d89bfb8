//! The operating system underneath: signals to process groups, process state
//! from `/proc` (Linux) and the process search behind `verify = "process"`.

use std::io;

use sysinfo::{ProcessRefreshKind, ProcessStatus, ProcessesToUpdate, System, UpdateKind};

/// What is known about one pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ProcState {
    /// No such process.
    Gone,
    /// Exited, not yet reaped by its parent (`ppid`).
    Zombie { ppid: u32 },
    /// Running (or sleeping, stopped…), with its start time when known.
    Alive { start_ticks: Option<u64> },
}

/// Sends `signal` to every process in group `pgid`. Refuses group ids 0 and 1,
/// which `kill(2)` would read as "my group" and "every process". Returns
/// whether the signal was delivered to at least one process.
pub(super) fn signal_group(pgid: u32, signal: i32) -> bool {
    match i32::try_from(pgid) {
        Ok(pgid) if pgid > 1 => kill(-pgid, signal),
        _ => false,
    }
}

/// The process group of `pid`, unless it is the sidecar's own group (which a
/// stop must never signal) or not a group a stop may signal (0 or 1).
#[allow(unsafe_code)]
pub(super) fn foreign_group(pid: u32) -> Option<u32> {
    let pid = i32::try_from(pid).ok().filter(|p| *p > 1)?;
    // SAFETY: getpgid and getpgrp only read the process table.
    let (group, ours) = unsafe { (libc::getpgid(pid), libc::getpgrp()) };
    (group > 1 && group != ours).then_some(group as u32)
}

/// The sidecar's own process group.
#[allow(unsafe_code)]
pub(super) fn own_group() -> u32 {
    // SAFETY: getpgrp cannot fail and only reads the process table.
    unsafe { libc::getpgrp() as u32 }
}

/// Whether group `pgid` still has a process that is not a zombie.
pub(super) fn group_alive(pgid: u32) -> bool {
    let Ok(id) = i32::try_from(pgid) else {
        return false;
    };
    if id <= 1 {
        return false;
    }
    // Signal 0 checks existence; EPERM means it exists but is not ours.
    if !kill(-id, 0) && io::Error::last_os_error().raw_os_error() != Some(libc::EPERM) {
        return false;
    }
    group_has_live_member(pgid)
}

/// The state of `pid`.
pub(super) fn process_state(pid: u32) -> ProcState {
    #[cfg(target_os = "linux")]
    {
        match proc_stat(pid) {
            None => ProcState::Gone,
            Some(stat) if stat.state == 'Z' || stat.state == 'X' => {
                ProcState::Zombie { ppid: stat.ppid }
            }
            Some(stat) => ProcState::Alive {
                start_ticks: Some(stat.start_ticks),
            },
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        match i32::try_from(pid) {
            Ok(id) if id > 0 && kill(id, 0) => ProcState::Alive { start_ticks: None },
            _ => ProcState::Gone,
        }
    }
}

/// Whether `pid` now names a different process than the one that started at
/// `ticks` (a reused pid). One `/proc` read.
pub(super) fn pid_reused(pid: u32, ticks: Option<u64>) -> bool {
    match process_state(pid) {
        ProcState::Alive { start_ticks } => !same_start(start_ticks, ticks),
        ProcState::Zombie { .. } | ProcState::Gone => false,
    }
}

/// Whether a zombie whose parent is `ppid` is still to be reaped by a live
/// parent other than init: for a run, its reaper, which records the status
/// before it reaps.
pub(super) fn parent_will_reap(ppid: u32) -> bool {
    ppid > 1 && matches!(process_state(ppid), ProcState::Alive { .. })
}

/// Whether two start times name the same process; an unknown one counts as the same.
pub(super) fn same_start(now: Option<u64>, then: Option<u64>) -> bool {
    now.zip(then).is_none_or(|(a, b)| a == b)
}

/// The start time of `pid` in clock ticks since boot (Linux), to recognise it after a restart.
pub(super) fn start_ticks(pid: u32) -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        proc_stat(pid).map(|s| s.start_ticks)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = pid;
        None
    }
}

/// The lowest pid (other than this process) whose name equals `pattern` or
/// whose command line contains it, ignoring zombies. Blocking: a full
/// process scan costs about 20 µs per process.
///
/// # Errors
/// The process table could not be read.
pub(super) fn find_process(pattern: &str) -> Result<Option<u32>, String> {
    let mut system = System::new().map_err(|e| format!("could not read the process table: {e}"))?;
    system.refresh_processes_specifics(
        ProcessesToUpdate::All,
        true,
        ProcessRefreshKind::nothing()
            .without_tasks()
            .with_cmd(UpdateKind::Always),
    );
    let me = std::process::id();
    let found = system
        .processes()
        .iter()
        .filter(|(pid, p)| {
            pid.as_u32() != me
                && p.thread_kind().is_none()
                && !matches!(p.status(), ProcessStatus::Zombie | ProcessStatus::Dead)
        })
        .filter(|(_, p)| {
            p.name() == pattern || {
                let cmd: Vec<_> = p.cmd().iter().map(|a| a.to_string_lossy()).collect();
                contains_bounded(&cmd.join(" "), pattern)
            }
        })
        .map(|(pid, _)| pid.as_u32())
        .min();
    Ok(found)
}

/// Whether `pattern` occurs in `text` not glued to a letter or digit on a side
/// where the pattern itself starts or ends with one, so `muster-4` does not
/// find the agent of task 41 and `claude` does not find `claudette`.
pub(super) fn contains_bounded(text: &str, pattern: &str) -> bool {
    if pattern.is_empty() {
        return false;
    }
    let word = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    let (first, last) = (pattern.chars().next(), pattern.chars().next_back());
    text.match_indices(pattern).any(|(at, _)| {
        let before = text[..at].chars().next_back();
        let after = text[at + pattern.len()..].chars().next();
        let glued_before = word(first) && word(before);
        let glued_after = word(last) && word(after);
        !glued_before && !glued_after
    })
}

/// How a waited-for child ended, as a shell reports it: the exit code, or
/// 128 + the signal that ended it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Reaped {
    /// The child's pid.
    pub(super) pid: u32,
    /// Exit code, or 128 + signal.
    pub(super) code: i32,
}

/// What [`wait_any`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum WaitAny {
    /// A child ended and is reaped.
    Reaped(Reaped),
    /// This process has no children.
    NoChildren,
    /// Interrupted, or a status that is not an end: try again.
    Again,
}

/// Blocks until any child of this process has ended, and leaves it unreaped
/// (a zombie), so its status can be recorded before it is gone; then call [`reap`].
pub(super) fn wait_any() -> WaitAny {
    match waitid_any() {
        Err(e) if e.raw_os_error() == Some(libc::ECHILD) => WaitAny::NoChildren,
        Err(_) | Ok(None) => WaitAny::Again,
        Ok(Some((pid, code))) => match u32::try_from(pid) {
            Ok(pid) if pid > 0 => WaitAny::Reaped(Reaped { pid, code }),
            _ => WaitAny::Again,
        },
    }
}

/// Reaps the ended child `pid` that [`wait_any`] reported.
pub(super) fn reap(pid: u32) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        waitpid(pid);
    }
}

/// Names this process for `top` and `ps -o comm` (Linux; elsewhere a no-op).
pub(super) fn set_process_name(name: &std::ffi::CStr) {
    #[cfg(target_os = "linux")]
    prctl_set_name(name);
    #[cfg(not(target_os = "linux"))]
    let _ = name;
}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn prctl_set_name(name: &std::ffi::CStr) {
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes
    // from a pointer that stays valid for the call; longer names are cut.
    unsafe {
        libc::prctl(libc::PR_SET_NAME, name.as_ptr());
    }
}

/// `waitid(P_ALL, WEXITED | WNOWAIT)`: the pid and shell-style code of an ended child.
#[allow(unsafe_code)]
fn waitid_any() -> io::Result<Option<(libc::pid_t, i32)>> {
    // SAFETY: an all-zero siginfo_t is a valid value of this plain C struct.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid(2) writes into `info` through a pointer to this live
    // local and reads nothing of ours.
    let rc = unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: after a successful waitid for WEXITED the kernel filled in the
    // child fields, which these accessors read.
    let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
    let code = match info.si_code {
        libc::CLD_EXITED => status,
        libc::CLD_KILLED | libc::CLD_DUMPED => 128 + status,
        _ => return Ok(None),
    };
    Ok(Some((pid, code)))
}

#[allow(unsafe_code)]
fn waitpid(pid: libc::pid_t) {
    let mut status: libc::c_int = 0;
    // SAFETY: waitpid(2) writes one int through a pointer to a live local.
    unsafe {
        libc::waitpid(pid, &mut status, 0);
    }
}

#[allow(unsafe_code)]
fn kill(pid: i32, signal: i32) -> bool {
    // SAFETY: kill(2) takes two integers and touches no memory of this
    // process. Callers never pass pid -1 (every process) or 0 (our own group).
    unsafe { libc::kill(pid, signal) == 0 }
}

#[cfg(target_os = "linux")]
struct ProcStat {
    state: char,
    ppid: u32,
    pgrp: u32,
    start_ticks: u64,
}

/// Fields of `/proc/<pid>/stat` (see proc(5)): state is field 3, ppid 4, pgrp 5, starttime 22.
#[cfg(target_os = "linux")]
fn proc_stat(pid: u32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

#[cfg(target_os = "linux")]
fn parse_stat(text: &str) -> Option<ProcStat> {
    // The command name (field 2) is in parentheses and may contain anything,
    // so fields are counted from the last ')'.
    let rest = text.get(text.rfind(')')? + 1..)?;
    let fields: Vec<&str> = rest.split_whitespace().take(20).collect();
    Some(ProcStat {
        state: fields.first()?.chars().next()?,
        ppid: fields.get(1)?.parse().ok()?,
        pgrp: fields.get(2)?.parse().ok()?,
        start_ticks: fields.get(19)?.parse().ok()?,
    })
}

/// Processes looked at per scan of `/proc`, at most: bounds one heartbeat's cost.
pub(crate) const PROC_SCAN_MAX: usize = 65_536;

/// CPU time, in milliseconds, of each of the process groups `pgids`: user and
/// system time of their live members, with the time of the children those
/// members reaped. One pass over `/proc` for all of them. A group with no
/// member found is absent from the answer.
#[cfg(target_os = "linux")]
pub(crate) fn groups_cpu_ms(pgids: &[u32]) -> std::collections::HashMap<u32, u64> {
    let mut out = std::collections::HashMap::new();
    if pgids.is_empty() {
        return out;
    }
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    // SAFETY: sysconf only reads a constant of the system.
    #[allow(unsafe_code)]
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    for pid in dir
        .take(PROC_SCAN_MAX)
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
    {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((pgrp, cpu_ticks)) = parse_cpu(&text) else {
            continue;
        };
        if pgids.contains(&pgrp) {
            *out.entry(pgrp).or_insert(0) += cpu_ticks * 1000 / ticks;
        }
    }
    out
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn groups_cpu_ms(_pgids: &[u32]) -> std::collections::HashMap<u32, u64> {
    std::collections::HashMap::new()
}

/// The group and CPU ticks (utime + stime + cutime + cstime, fields 14–17)
/// of a `/proc/<pid>/stat` line.
#[cfg(target_os = "linux")]
fn parse_cpu(text: &str) -> Option<(u32, u64)> {
    let rest = text.get(text.rfind(')')? + 1..)?;
    let fields: Vec<&str> = rest.split_whitespace().take(15).collect();
    let pgrp = fields.get(2)?.parse().ok()?;
    let mut ticks = 0u64;
    for i in 11..15 {
        // cutime and cstime are signed in proc(5); a negative one counts as 0.
        ticks += fields.get(i)?.parse::<i64>().ok()?.max(0) as u64;
    }
    Some((pgrp, ticks))
}

/// The process group of `pid`, if it is alive and not the sidecar's own.
pub(crate) fn group_of(pid: u32) -> Option<u32> {
    foreign_group(pid)
}

#[cfg(target_os = "linux")]
fn group_has_live_member(pgid: u32) -> bool {
    // Zombies (an orphan waiting for an init that does not reap) still answer
    // kill(2); only /proc tells them apart.
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return true;
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(proc_stat)
        .any(|s| s.pgrp == pgid && s.state != 'Z' && s.state != 'X')
}

#[cfg(not(target_os = "linux"))]
fn group_has_live_member(_pgid: u32) -> bool {
    true
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn cpu_fields_are_counted_from_the_name_end() {
        let line = "42 (a) b) S 1 42 42 0 -1 4194560 100 0 0 0 150 50 7 3 20 0 1 0 99 0 0";
        assert_eq!(parse_cpu(line), Some((42, 210)));
    }

    #[test]
    fn this_process_group_uses_cpu() {
        let own = own_group();
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let cpu = groups_cpu_ms(&[own]);
        assert!(cpu.contains_key(&own), "{cpu:?}");
    }

    #[test]
    fn stat_with_parentheses_in_the_name() {
        let text = "42 (a) b (c)) S 1 42 42 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 123456 1000 10";
        let stat = parse_stat(text).expect("parses");
        assert_eq!(stat.state, 'S');
        assert_eq!(stat.ppid, 1);
        assert_eq!(stat.pgrp, 42);
        assert_eq!(stat.start_ticks, 123456);
    }

    #[test]
    fn patterns_match_only_at_word_boundaries_where_they_start_or_end_with_one() {
        assert!(contains_bounded("tmux new -s muster-4 claude", "muster-4"));
        assert!(!contains_bounded(
            "tmux new -s muster-41 claude",
            "muster-4"
        ));
        assert!(contains_bounded("/usr/bin/claude -p", "claude"));
        assert!(!contains_bounded("/usr/bin/claudette", "claude"));
        assert!(contains_bounded("sleep 0.61234 x", "sleep 0.61234"));
        assert!(contains_bounded("a --task=7-", "=7-"));
        assert!(!contains_bounded("abc", ""));
    }

    #[test]
    fn the_sidecars_own_group_is_never_a_stop_target() {
        assert_eq!(foreign_group(std::process::id()), None);
        assert_eq!(foreign_group(1), None);
        assert_eq!(foreign_group(0), None);
    }

    #[test]
    fn never_signals_everything() {
        assert!(!signal_group(0, 0));
        assert!(!signal_group(1, 0));
        assert!(!signal_group(u32::MAX, 0));
    }
}
