//! Reading a join token from the command line, stdin or a file, bounded.

use std::path::PathBuf;

/// Longest join token read from a file or stdin; real ones are a few hundred bytes.
const TOKEN_BYTES_MAX: u64 = 4096;

/// The join token from exactly one source: `--token T` (visible in `ps`),
/// `--token -` (stdin) or `--token-file F`; the first line, trimmed. Shared
/// by `muster-sidecar enroll` and `muster-hub login`.
///
/// # Errors
/// A sentence saying which source is wrong and what to pass instead.
pub fn read(token: Option<String>, file: Option<PathBuf>) -> Result<String, String> {
    use std::io::Read;
    let (text, from) = match (token, file) {
        (Some(_), Some(_)) => {
            return Err("give the join token once: --token or --token-file, not both".into());
        }
        (None, None) => {
            return Err("no join token: pass --token-file FILE, or --token - to read it from stdin (a literal --token TOKEN works too, but is visible in `ps`)".into());
        }
        (Some(t), None) if t == "-" => {
            let mut text = String::new();
            std::io::stdin()
                .take(TOKEN_BYTES_MAX)
                .read_to_string(&mut text)
                .map_err(|e| format!("--token -: cannot read the token from stdin: {e}"))?;
            (text, "stdin (--token -)".to_string())
        }
        (Some(t), None) => (t, "--token".to_string()),
        (None, Some(path)) => {
            let mut text = String::new();
            std::fs::File::open(&path)
                .and_then(|f| f.take(TOKEN_BYTES_MAX).read_to_string(&mut text))
                .map_err(|e| format!("--token-file {}: {e}", path.display()))?;
            (text, format!("--token-file {}", path.display()))
        }
    };
    let line = text.lines().next().unwrap_or("").trim();
    if line.is_empty() {
        return Err(format!(
            "{from}: no join token there (the first line is empty); create one with `muster-hub token create`"
        ));
    }
    Ok(line.to_owned())
}
