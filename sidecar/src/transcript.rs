//! Usage read from an agent's JSON-lines transcript (`[agent] transcript`):
//! pure parsers over lines, no IO. The daemon follows the run's stdout file
//! and feeds each complete line to a [`Parser`] (see `daemon::usage`).
//!
//! Two formats, each as its public documentation describes it:
//!
//! - `claude-stream-json`: Claude Code's `claude -p --output-format
//!   stream-json` (the Claude Code CLI reference and the Agent SDK's message
//!   types). One JSON object per line: `{"type":"system","subtype":"init",
//!   "model":…}` first; `{"type":"assistant","message":{"id","model","usage":
//!   {"input_tokens","output_tokens","cache_creation_input_tokens",
//!   "cache_read_input_tokens"}}}` per assistant message (a message with
//!   several content blocks comes as several lines with the same `id` and
//!   usage, so usage is counted once per `id`); and last `{"type":"result",
//!   "total_cost_usd":…,"usage":{…}}`, the session's totals.
//! - `codex-json`: `codex exec --json` (the Codex CLI's non-interactive mode
//!   documentation). Events `thread.started`, `turn.started`,
//!   `item.started`/`item.updated`/`item.completed`, and `turn.completed` with
//!   `"usage":{"input_tokens","cached_input_tokens","output_tokens"}` for that
//!   turn; `input_tokens` there includes the cached ones. No cost.
//!
//! Anything else on a line (text, other JSON) is ignored: an agent's output
//! is not trusted to be well-formed, and a bad line costs nothing.

use muster_protocol::msg::Usage;
use serde_json::Value;

/// Longest transcript line read; longer ones are skipped whole (a line that
/// long is a tool's output, not usage). Bounds the follower's memory.
pub const LINE_BYTES_MAX: usize = 1 << 20;

/// The transcript formats the sidecar reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Claude Code, `--output-format stream-json`.
    ClaudeStreamJson,
    /// Codex, `codex exec --json`.
    CodexJson,
}

/// Usage so far of one transcript, line by line.
#[derive(Debug, Clone)]
pub struct Parser {
    format: Format,
    /// The model, from the init line or the latest message.
    model: Option<String>,
    /// Claude: the messages before the current one, summed; Codex: the turns.
    done: Usage,
    /// Claude: the current message's id and usage (its lines repeat it).
    current: Option<(String, Usage)>,
    /// Claude: the result line's totals and cost.
    result: Option<Usage>,
    /// Whether any line carried usage or a model.
    seen: bool,
}

impl Parser {
    /// A parser for `format`.
    pub fn new(format: Format) -> Parser {
        Parser {
            format,
            model: None,
            done: Usage::default(),
            current: None,
            result: None,
            seen: false,
        }
    }

    /// Takes one line (without its newline).
    pub fn line(&mut self, line: &[u8]) {
        let line = line.trim_ascii();
        if !line.starts_with(b"{") {
            return;
        }
        let Ok(v) = serde_json::from_slice::<Value>(line) else {
            return;
        };
        match self.format {
            Format::ClaudeStreamJson => self.claude(&v),
            Format::CodexJson => self.codex(&v),
        }
    }

    /// The usage so far, once any line carried some.
    pub fn usage(&self) -> Option<Usage> {
        if !self.seen {
            return None;
        }
        let mut sum = self.done.clone();
        if let Some((_, u)) = &self.current {
            sum.add(u);
        }
        if let Some(r) = &self.result {
            // The result's totals are the session's; a field it lacks (or
            // counts lower) keeps the messages' sum.
            sum.input_tokens = sum.input_tokens.max(r.input_tokens);
            sum.output_tokens = sum.output_tokens.max(r.output_tokens);
            sum.cache_read_tokens = sum.cache_read_tokens.max(r.cache_read_tokens);
            sum.cache_write_tokens = sum.cache_write_tokens.max(r.cache_write_tokens);
            sum.cost_micro_usd = r.cost_micro_usd;
        }
        sum.model.clone_from(&self.model);
        Some(sum)
    }

    fn claude(&mut self, v: &Value) {
        match v["type"].as_str() {
            Some("system") => {
                if let Some(m) = v["model"].as_str() {
                    self.model = Some(m.to_string());
                    self.seen = true;
                }
            }
            Some("assistant") => {
                let msg = &v["message"];
                if let Some(m) = msg["model"].as_str() {
                    self.model = Some(m.to_string());
                    self.seen = true;
                }
                let Some(u) = claude_usage(&msg["usage"]) else {
                    return;
                };
                self.seen = true;
                let id = msg["id"].as_str();
                match (id, self.current.take()) {
                    // Another line of the same message: its usage again.
                    (Some(id), Some((cur, _))) if cur == id => self.current = Some((cur, u)),
                    (Some(id), before) => {
                        if let Some((_, before)) = before {
                            self.done.add(&before);
                        }
                        self.current = Some((id.to_string(), u));
                    }
                    (None, before) => {
                        self.current = before;
                        self.done.add(&u);
                    }
                }
            }
            Some("result") => {
                let mut u = claude_usage(&v["usage"]).unwrap_or_default();
                u.cost_micro_usd = v["total_cost_usd"].as_f64().and_then(micro_usd_of);
                self.result = Some(u);
                self.seen = true;
            }
            _ => {}
        }
    }

    fn codex(&mut self, v: &Value) {
        if let Some(m) = v["model"].as_str() {
            self.model = Some(m.to_string());
            self.seen = true;
        }
        if v["type"].as_str() != Some("turn.completed") {
            return;
        }
        let u = &v["usage"];
        if !u.is_object() {
            return;
        }
        let n = |k: &str| u[k].as_u64().unwrap_or(0);
        let cached = n("cached_input_tokens");
        self.done.add(&Usage {
            input_tokens: n("input_tokens").saturating_sub(cached),
            output_tokens: n("output_tokens"),
            cache_read_tokens: cached,
            ..Usage::default()
        });
        self.seen = true;
    }
}

/// An Anthropic `usage` object, if it is one.
fn claude_usage(u: &Value) -> Option<Usage> {
    if !u.is_object() {
        return None;
    }
    let n = |k: &str| u[k].as_u64().unwrap_or(0);
    Some(Usage {
        input_tokens: n("input_tokens"),
        output_tokens: n("output_tokens"),
        cache_read_tokens: n("cache_read_input_tokens"),
        cache_write_tokens: n("cache_creation_input_tokens"),
        ..Usage::default()
    })
}

/// Dollars as millionths of a dollar, for amounts from 0 to a million dollars.
pub fn micro_usd_of(dollars: f64) -> Option<u64> {
    (dollars.is_finite() && (0.0..=1e6).contains(&dollars)).then(|| (dollars * 1e6).round() as u64)
}

/// `--cost-usd` text ("0.0421") as millionths of a dollar.
pub fn micro_usd(text: &str) -> Option<u64> {
    let t = text.trim().trim_start_matches('$');
    if t.is_empty() || !t.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return None;
    }
    micro_usd_of(t.parse().ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(format: Format, text: &str) -> Option<Usage> {
        let mut p = Parser::new(format);
        for line in text.lines() {
            p.line(line.as_bytes());
        }
        p.usage()
    }

    /// A session as `claude -p --output-format stream-json --verbose` prints
    /// it, after the Claude Code CLI reference ("Output formats") and the
    /// Agent SDK's `SDKSystemMessage`, `SDKAssistantMessage` and
    /// `SDKResultMessage` types: init, two assistant messages (the first in
    /// two lines, one per content block, repeating its usage), a tool result,
    /// and the result with the session's totals and cost.
    const CLAUDE: &str = r#"{"type":"system","subtype":"init","session_id":"5f2c","cwd":"/work","tools":["Bash","Edit"],"model":"claude-sonnet-4-5-20250929","permissionMode":"default"}
{"type":"assistant","session_id":"5f2c","message":{"id":"msg_01","type":"message","role":"assistant","model":"claude-sonnet-4-5-20250929","content":[{"type":"text","text":"Let me look."}],"usage":{"input_tokens":12,"cache_creation_input_tokens":2048,"cache_read_input_tokens":0,"output_tokens":40}}}
{"type":"assistant","session_id":"5f2c","message":{"id":"msg_01","type":"message","role":"assistant","model":"claude-sonnet-4-5-20250929","content":[{"type":"tool_use","id":"toolu_1","name":"Bash","input":{"command":"cargo test"}}],"usage":{"input_tokens":12,"cache_creation_input_tokens":2048,"cache_read_input_tokens":0,"output_tokens":40}}}
{"type":"user","session_id":"5f2c","message":{"role":"user","content":[{"type":"tool_result","tool_use_id":"toolu_1","content":"test result: ok"}]}}
{"type":"assistant","session_id":"5f2c","message":{"id":"msg_02","type":"message","role":"assistant","model":"claude-sonnet-4-5-20250929","content":[{"type":"text","text":"All tests pass."}],"usage":{"input_tokens":30,"cache_creation_input_tokens":100,"cache_read_input_tokens":2048,"output_tokens":25}}}
{"type":"result","subtype":"success","is_error":false,"duration_ms":8123,"duration_api_ms":7001,"num_turns":2,"result":"All tests pass.","session_id":"5f2c","total_cost_usd":0.0421,"usage":{"input_tokens":42,"cache_creation_input_tokens":2148,"cache_read_input_tokens":2048,"output_tokens":65}}"#;

    #[test]
    fn claude_stream_json_counts_each_message_once_and_takes_the_results_cost() {
        let u = parse(Format::ClaudeStreamJson, CLAUDE).expect("usage");
        assert_eq!(u.model.as_deref(), Some("claude-sonnet-4-5-20250929"));
        assert_eq!(
            (
                u.input_tokens,
                u.output_tokens,
                u.cache_read_tokens,
                u.cache_write_tokens
            ),
            (42, 65, 2048, 2148)
        );
        assert_eq!(u.cost_micro_usd, Some(42_100));
    }

    #[test]
    fn claude_usage_grows_line_by_line_before_the_result() {
        let lines: Vec<&str> = CLAUDE.lines().collect();
        let mut p = Parser::new(Format::ClaudeStreamJson);
        p.line(lines[0].as_bytes());
        let u = p.usage().expect("the init line names the model");
        assert_eq!((u.input_tokens, u.cost_micro_usd), (0, None));
        for l in &lines[1..3] {
            p.line(l.as_bytes());
        }
        assert_eq!(p.usage().map(|u| u.output_tokens), Some(40), "msg_01 once");
        for l in &lines[3..5] {
            p.line(l.as_bytes());
        }
        let u = p.usage().expect("usage");
        assert_eq!((u.input_tokens, u.output_tokens), (42, 65));
        assert_eq!(u.cost_micro_usd, None, "no cost before the result");
    }

    /// A run as `codex exec --json` prints it, after the Codex CLI's
    /// non-interactive mode documentation (`docs/exec.md`, "JSON output"):
    /// thread.started, a turn with items, turn.completed with the turn's usage;
    /// then a second turn.
    const CODEX: &str = r#"{"type":"thread.started","thread_id":"0199a213-81c0-7800-8aa1-bbab2a035a53"}
{"type":"turn.started"}
{"type":"item.started","item":{"id":"item_0","type":"command_execution","command":"bash -lc ls","aggregated_output":"","status":"in_progress"}}
{"type":"item.completed","item":{"id":"item_0","type":"command_execution","command":"bash -lc ls","aggregated_output":"src\n","exit_code":0,"status":"completed"}}
{"type":"item.completed","item":{"id":"item_1","type":"agent_message","text":"The repository has a src folder."}}
{"type":"turn.completed","usage":{"input_tokens":24763,"cached_input_tokens":24448,"output_tokens":122}}
{"type":"turn.started"}
{"type":"turn.completed","usage":{"input_tokens":1000,"cached_input_tokens":0,"output_tokens":50}}"#;

    #[test]
    fn codex_json_sums_turns_and_separates_cached_input() {
        let u = parse(Format::CodexJson, CODEX).expect("usage");
        assert_eq!(
            (u.input_tokens, u.cache_read_tokens, u.output_tokens),
            (24763 - 24448 + 1000, 24448, 172)
        );
        assert_eq!((u.cost_micro_usd, u.model), (None, None));
    }

    #[test]
    fn other_lines_are_ignored() {
        let text = "plain text\n{not json\n{\"type\":\"assistant\"}\n[1,2]\n\n";
        assert_eq!(parse(Format::ClaudeStreamJson, text), None);
        assert_eq!(parse(Format::CodexJson, text), None);
        assert_eq!(
            parse(
                Format::CodexJson,
                "{\"type\":\"turn.completed\",\"usage\":7}"
            ),
            None
        );
    }

    #[test]
    fn dollars_become_exact_micro_dollars() {
        assert_eq!(micro_usd("0.0421"), Some(42_100));
        assert_eq!(micro_usd("$1.5"), Some(1_500_000));
        assert_eq!(micro_usd("3"), Some(3_000_000));
        assert_eq!(micro_usd("-1"), None);
        assert_eq!(micro_usd("1e3"), None);
        assert_eq!(micro_usd("nan"), None);
        assert_eq!(micro_usd_of(f64::INFINITY), None);
    }
}
