//! Placeholders in the `[agent]` commands and patterns: `{task_id}`,
//! `{generation}`, `{workspace}`, `{prompt_file}` and `{task_file}`.
//!
//! Only ids and paths the sidecar made are ever substituted, never task text,
//! so a title or description cannot become an argument. Each placeholder is
//! replaced inside one argv word; nothing is split or parsed by a shell.

/// The placeholder names, as written between braces.
pub const NAMES: [&str; 5] = [
    "task_id",
    "generation",
    "workspace",
    "prompt_file",
    "task_file",
];

/// The values of one attempt's placeholders.
#[derive(Debug, Clone, Default)]
pub struct Vars {
    /// `{task_id}`.
    pub task_id: String,
    /// `{generation}`.
    pub generation: String,
    /// `{workspace}`: the run's working directory.
    pub workspace: String,
    /// `{prompt_file}`: the prompt in the run directory.
    pub prompt_file: String,
    /// `{task_file}`: the attempt's task.json (0600; holds its token), for
    /// `muster-sidecar task --task-file` where the environment does not reach.
    pub task_file: String,
}

impl Vars {
    fn get(&self, name: &str) -> Option<&str> {
        match name {
            "task_id" => Some(&self.task_id),
            "generation" => Some(&self.generation),
            "workspace" => Some(&self.workspace),
            "prompt_file" => Some(&self.prompt_file),
            "task_file" => Some(&self.task_file),
            _ => None,
        }
    }

    /// `text` with every known placeholder replaced; other braces are kept.
    pub fn expand(&self, text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            out.push_str(&rest[..open]);
            let after = &rest[open + 1..];
            match after
                .find('}')
                .and_then(|close| Some((close, self.get(&after[..close])?)))
            {
                Some((close, value)) => {
                    out.push_str(value);
                    rest = &after[close + 1..];
                }
                None => {
                    out.push('{');
                    rest = after;
                }
            }
        }
        out.push_str(rest);
        out
    }

    /// Every word of `argv` expanded.
    pub fn expand_all(&self, argv: &[String]) -> Vec<String> {
        argv.iter().map(|w| self.expand(w)).collect()
    }
}

/// Checks that every `{word}` in `text` (a word of lower-case letters and
/// `_`) is a known placeholder, so a typo is an error where it is written
/// instead of a literal `{promt_file}` reaching the agent.
///
/// # Errors
/// A sentence naming the unknown placeholder and the known ones.
pub fn check(text: &str) -> Result<(), String> {
    let mut rest = text;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        if let Some(close) = after.find('}') {
            let word = &after[..close];
            let looks_like_one =
                !word.is_empty() && word.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
            if looks_like_one && !NAMES.contains(&word) {
                return Err(format!(
                    "has the unknown placeholder {{{word}}}; the placeholders are {}",
                    NAMES.map(|n| format!("{{{n}}}")).join(", ")
                ));
            }
        }
        rest = after;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> Vars {
        Vars {
            task_id: "41".into(),
            generation: "3".into(),
            workspace: "/w/41-3".into(),
            prompt_file: "/r/prompt.md".into(),
            task_file: "/r/task.json".into(),
        }
    }

    #[test]
    fn known_placeholders_are_replaced_and_other_braces_kept() {
        let v = vars();
        assert_eq!(v.expand("muster-{task_id}"), "muster-41");
        assert_eq!(
            v.expand("{workspace}/x --m {prompt_file}"),
            "/w/41-3/x --m /r/prompt.md"
        );
        assert_eq!(v.expand("{task_id}-{generation}"), "41-3");
        assert_eq!(
            v.expand(r#"{"json": 1} {unclosed"#),
            r#"{"json": 1} {unclosed"#
        );
        assert_eq!(v.expand("{{task_id}}"), "{41}");
        // A value is never expanded again.
        let tricky = Vars {
            workspace: "{task_id}".into(),
            ..vars()
        };
        assert_eq!(tricky.expand("{workspace}"), "{task_id}");
    }

    #[test]
    fn an_unknown_placeholder_is_refused_by_name() {
        assert!(check("claude -p --cwd {workspace} {task_id}").is_ok());
        assert!(check(r#"{"a": 1}"#).is_ok());
        let e = check("--file {promt_file}").expect_err("refused");
        assert!(
            e.contains("{promt_file}") && e.contains("{prompt_file}"),
            "{e}"
        );
    }
}
