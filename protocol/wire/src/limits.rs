//! Bounds on every input that crosses the wire, with their defaults.
//!
//! The hub may configure tighter values in `hub.toml`; these are the ceilings
//! the codec enforces whatever the configuration says.

/// QUIC idle timeout: a dead peer is noticed this long after its last packet
/// (the core's agent view counts on it too).
pub const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);
/// Largest frame either side reads: a length prefix above this is refused before allocation.
pub const FRAME_BYTES_MAX: usize = 1 << 20;
/// Largest task title; titles are one line for listings.
pub const TITLE_BYTES_MAX: usize = 1024;
/// Default largest task description (`limits.max_description_bytes`).
pub const DESCRIPTION_BYTES_MAX: usize = 64 * 1024;
/// Default largest task result (`limits.max_result_bytes`).
pub const RESULT_BYTES_MAX: usize = 256 * 1024;
/// Captured stdout and stderr tails, each.
pub const TAIL_BYTES_MAX: usize = 8 * 1024;
/// Longest agent or operator name.
pub const NAME_BYTES_MAX: usize = 64;
/// Most capabilities an agent may announce or a task may require.
pub const CAPABILITIES_MAX: usize = 32;
/// Longest progress note.
pub const NOTE_BYTES_MAX: usize = 4096;
/// Most slots an agent may be granted.
pub const SLOTS_MAX: u32 = 256;
/// Longest capability name.
pub const CAPABILITY_BYTES_MAX: usize = 64;
/// Longest task timeout accepted at submission (30 days); time math on it cannot overflow.
pub const TIMEOUT_MS_MAX: u64 = 30 * 24 * 3600 * 1000;
/// Most attempts a task may ask for.
pub const ATTEMPTS_MAX: u32 = 100;
/// Longest sidecar version string kept from a hello.
pub const VERSION_BYTES_MAX: usize = 64;
/// Longest failure reason kept from a report.
pub const REASON_BYTES_MAX: usize = 1024;
/// Longest session name kept from a `Started` report.
pub const SESSION_BYTES_MAX: usize = 256;
/// Most words of a failed command kept from a report, each at most [`REASON_BYTES_MAX`].
pub const COMMAND_WORDS_MAX: usize = 64;
/// Most self-test problems kept from a heartbeat, each at most [`REASON_BYTES_MAX`].
pub const PROBLEMS_MAX: usize = 16;
/// Most tasks a hello or heartbeat may list (a sidecar holds at most its slots plus finished ones awaiting ack).
pub const HELD_TASKS_MAX: usize = 1024;
/// Longest model name kept from a usage report.
pub const MODEL_BYTES_MAX: usize = 128;
/// Longest output tail kept from a heartbeat's activity of one attempt.
pub const OUTPUT_TAIL_BYTES_MAX: usize = 512;
/// Largest page `tasks --limit` returns.
pub const PAGE_LEN_MAX: u32 = 1000;
/// Tasks in one `SubmitBatch` request, at most.
pub const SUBMIT_BATCH_MAX: usize = 1000;
/// Largest piece of a log in one frame: big enough that framing costs nothing,
/// small enough that a relay holds little (one chunk per stream at the hub).
pub const LOG_CHUNK_BYTES_MAX: usize = 64 * 1024;
/// Most bytes `task logs --tail N` looks back for its N lines.
pub const LOG_TAIL_BYTES_MAX: u64 = 64 << 20;

const _: () = assert!(LOG_CHUNK_BYTES_MAX + 64 < FRAME_BYTES_MAX);

/// Cuts `s` to at most `max` bytes at a character boundary, so bounded text stays valid UTF-8.
pub fn truncate_utf8(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

const _: () =
    assert!(DESCRIPTION_BYTES_MAX + RESULT_BYTES_MAX + 4 * TAIL_BYTES_MAX < FRAME_BYTES_MAX);

#[cfg(test)]
mod tests {
    use super::truncate_utf8;

    #[test]
    fn truncation_keeps_whole_characters() {
        assert_eq!(truncate_utf8("héllo".into(), 2), "h");
        assert_eq!(truncate_utf8("héllo".into(), 3), "hé");
        assert_eq!(truncate_utf8("abc".into(), 10), "abc");
    }
}
