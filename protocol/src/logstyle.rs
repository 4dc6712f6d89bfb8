//! How a daemon's log lines look where they go: colour only on a terminal and
//! never with `NO_COLOR`; no timestamp of our own under journald, which stamps
//! every line itself (a second one only makes `journalctl` lines longer).

use std::io::IsTerminal;

/// What the log lines carry besides the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogStyle {
    /// ANSI colour codes.
    pub ansi: bool,
    /// Our own timestamp on each line.
    pub timestamps: bool,
}

/// The style for stderr going to a terminal or not, with `NO_COLOR` set or
/// not, and connected to the journal or not.
pub fn decide(terminal: bool, no_color: bool, journal: bool) -> LogStyle {
    LogStyle {
        ansi: terminal && !no_color,
        timestamps: !journal,
    }
}

/// The style for this process's stderr, from its environment.
pub fn detect() -> LogStyle {
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    decide(
        std::io::stderr().is_terminal(),
        no_color,
        stderr_is_journal(),
    )
}

/// Whether stderr is the journal stream systemd connected: it names that
/// stream's device and inode in `JOURNAL_STREAM`, and a child whose stderr was
/// redirected elsewhere inherits the variable, so both must match.
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(var) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = var.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    std::fs::metadata("/proc/self/fd/2").is_ok_and(|m| m.dev() == dev && m.ino() == ino)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_on_a_terminal_without_no_color_and_no_time_under_journald() {
        assert_eq!(
            decide(true, false, false),
            LogStyle {
                ansi: true,
                timestamps: true
            }
        );
        assert!(!decide(false, false, false).ansi, "a file or pm2's pipe");
        assert!(!decide(true, true, false).ansi, "NO_COLOR");
        assert!(
            !decide(false, false, true).timestamps,
            "journald stamps lines"
        );
    }
}
