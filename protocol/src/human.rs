//! Output for people, shared by the `muster-hub` and `muster-sidecar` command
//! lines: plain tables, spans of time in words, and text made safe for a
//! terminal. `--json` output never goes through here.

/// A plain table (no borders: it is read by people and by `grep`/`awk`);
/// control characters in cells are escaped.
pub fn table<const N: usize>(head: &[&str; N], rows: &[[String; N]]) -> String {
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::NOTHING)
        .set_content_arrangement(comfy_table::ContentArrangement::Disabled)
        .set_header(head.to_vec());
    for r in rows {
        t.add_row(r.iter().map(|c| escape_controls(c, false)));
    }
    // Each line without the preset's padding at its ends.
    t.lines().map(|l| l.trim().to_string() + "\n").collect()
}

/// A span of seconds as a person reads it: the two largest units.
pub fn span(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) if s == 0 => format!("{m}m"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, 0) => format!("{h}h"),
        (0, _, _) => format!("{h}h {m}m"),
        (_, 0, _) => format!("{d}d"),
        _ => format!("{d}d {h}h"),
    }
}

/// How long ago the wall-clock time `at_ms` was, seen at `now_ms`, in words
/// ("5m 12s ago"; a time ahead of `now_ms`, from another machine's clock, is "in 3s").
pub fn ago(at_ms: u64, now_ms: u64) -> String {
    match now_ms.checked_sub(at_ms) {
        Some(ms) => format!("{} ago", span(ms / 1000)),
        None => format!("in {}", span((at_ms - now_ms).div_ceil(1000))),
    }
}

/// Escapes C0/C1 control characters and the Unicode bidirectional overrides,
/// which could rewrite what a terminal shows; `keep_lines` keeps `\n` and `\t`.
pub fn escape_controls(s: &str, keep_lines: bool) -> String {
    let risky = |c: char| {
        (c.is_control() && !(keep_lines && matches!(c, '\n' | '\t')))
            || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !s.chars().any(risky) {
        return s.to_string();
    }
    s.chars()
        .map(|c| {
            if risky(c) {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_read_as_the_two_largest_units() {
        assert_eq!(span(5), "5s");
        assert_eq!(span(3262), "54m 22s");
        assert_eq!(span(3600), "1h");
        assert_eq!(span(2_590_988), "29d 23h");
        assert_eq!(span(86_400 * 30), "30d");
    }

    #[test]
    fn ages_either_side_of_now() {
        assert_eq!(ago(1_000, 61_000), "1m ago");
        assert_eq!(ago(5_500, 5_000), "in 1s");
        assert_eq!(ago(5_000, 5_000), "0s ago");
    }

    #[test]
    fn tables_align_and_escape() {
        let t = table(
            &["A", "B"],
            &[
                ["x".into(), "y\u{1b}[31m".into()],
                ["long".into(), "z".into()],
            ],
        );
        assert!(!t.contains('\u{1b}'), "{t}");
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0].find('B'), lines[2].find('z'));
    }

    #[test]
    fn controls_are_escaped_and_lines_kept_on_request() {
        assert_eq!(escape_controls("a\u{1b}b", false), "a\\u{1b}b");
        assert_eq!(escape_controls("a\nb", true), "a\nb");
        assert_eq!(escape_controls("a\nb", false), "a\\u{a}b");
        assert_eq!(escape_controls("\u{202e}x", true), "\\u{202e}x");
    }
}
