//! `submit`: one task from arguments, or a batch of JSON lines.

use crate::cli::args::SubmitArgs;
use crate::cli::{CliError, print};
use muster_protocol::TaskId;
use muster_protocol::duration::parse_duration;
use muster_protocol::msg::{OpRequest, SubmitRequest, TimeoutAction};
use muster_protocol::work;

pub(crate) async fn submit(a: SubmitArgs) -> Result<(), CliError> {
    let usage = |m: String| CliError {
        code: 2,
        message: m,
    };
    let Some(title) = a.title.clone() else {
        return submit_batch(a).await;
    };
    let description = match (&a.description, &a.description_file) {
        (Some(d), _) => d.clone(),
        (None, Some(p)) if p.as_os_str() == "-" => {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
                .map_err(|e| CliError::fail(format!("reading the description from stdin: {e}")))?;
            s
        }
        (None, Some(p)) => std::fs::read_to_string(p)
            .map_err(|e| CliError::fail(format!("--description-file {}: {e}", p.display())))?,
        (None, None) => String::new(),
    };
    let (timeout_ms, timeout_action) =
        timeout_fields(a.timeout.as_deref(), &a.timeout_action).map_err(usage)?;
    let env = pairs("--env", &a.env).map_err(usage)?;
    let labels = pairs("--label", &a.labels).map_err(usage)?;
    let req = SubmitRequest {
        title,
        description,
        capabilities: a.capabilities,
        priority: a.priority,
        max_attempts: a.max_attempts,
        timeout_ms,
        timeout_action,
        after: a.after.into_iter().map(TaskId).collect(),
        key: a.key,
        repo: a.repo,
        base: a.base,
        env,
        labels,
    };
    check_work(&req).map_err(usage)?;
    let s = a.connect.connect().await?;
    let v = s.call(OpRequest::Submit(req)).await?;
    if !a.wait {
        s.close().await;
        print(&v, a.json, |v| format!("submitted task {}\n", v["id"]));
        return Ok(());
    }
    s.close().await;
    let id = TaskId(v["id"].as_u64().unwrap_or_default());
    if !a.json {
        eprintln!("submitted task {id}; waiting for it to end");
    }
    crate::cli::watch::wait_task(&a.connect, id, a.json).await
}

/// `--timeout` and `--timeout-action` as the request carries them.
pub(crate) fn timeout_fields(
    timeout: Option<&str>,
    action: &str,
) -> Result<(Option<u64>, TimeoutAction), String> {
    let timeout_ms = match timeout {
        Some(t) => Some(
            parse_duration(t)
                .map_err(|e| format!("--timeout: {e}"))?
                .as_millis() as u64,
        ),
        None => None,
    };
    let action = match action {
        "fail" => TimeoutAction::Fail,
        "retry" => TimeoutAction::Retry,
        other => return Err(format!("--timeout-action {other:?}: use fail or retry")),
    };
    Ok((timeout_ms, action))
}

/// `K=V` arguments of `flag` as pairs.
pub(crate) fn pairs(flag: &str, args: &[String]) -> Result<Vec<(String, String)>, String> {
    args.iter().map(|a| work::split_pair(flag, a)).collect()
}

/// The code-work fields checked as the hub will check them, so a mistake is
/// reported before anything is sent.
pub(crate) fn check_work(req: &SubmitRequest) -> Result<(), String> {
    if let Some(repo) = &req.repo {
        work::check_repo(repo)?;
    }
    if let Some(base) = &req.base {
        work::check_base(base)?;
    }
    work::check_env(&req.env)?;
    work::check_labels(&req.labels)
}

/// One line of a `submit --batch` file.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BatchLine {
    pub(crate) title: String,
    #[serde(default)]
    pub(crate) description: String,
    #[serde(default)]
    pub(crate) capabilities: Vec<String>,
    #[serde(default)]
    pub(crate) priority: i32,
    pub(crate) max_attempts: Option<u32>,
    pub(crate) timeout: Option<String>,
    pub(crate) timeout_action: Option<String>,
    #[serde(default)]
    pub(crate) after: Vec<u64>,
    pub(crate) key: Option<String>,
    pub(crate) repo: Option<String>,
    pub(crate) base: Option<String>,
    #[serde(default)]
    pub(crate) env: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub(crate) labels: std::collections::BTreeMap<String, String>,
}

/// Bytes of task text per `SubmitBatch` request, at most, so each fits in a frame.
pub(crate) const BATCH_TEXT_BYTES_MAX: usize = 512 * 1024;

/// `submit --batch FILE`: every line is checked before anything is sent; then
/// the tasks go in requests of at most `SUBMIT_BATCH_MAX`, and each line's
/// answer is printed. Exit 1 if the hub refused any.
pub(crate) async fn submit_batch(a: SubmitArgs) -> Result<(), CliError> {
    use muster_protocol::limits::SUBMIT_BATCH_MAX;
    let path = a.batch.unwrap_or_default();
    let text = if path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
            .map_err(|e| CliError::fail(format!("reading the batch from stdin: {e}")))?;
        s
    } else {
        std::fs::read_to_string(&path)
            .map_err(|e| CliError::fail(format!("--batch {}: {e}", path.display())))?
    };
    let mut tasks = Vec::new();
    let mut errors = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let parsed = serde_json::from_str::<BatchLine>(line)
            .map_err(|e| e.to_string())
            .and_then(|l| {
                let (timeout_ms, timeout_action) = timeout_fields(
                    l.timeout.as_deref(),
                    l.timeout_action.as_deref().unwrap_or("fail"),
                )?;
                let req = SubmitRequest {
                    title: l.title,
                    description: l.description,
                    capabilities: l.capabilities,
                    priority: l.priority,
                    max_attempts: l.max_attempts,
                    timeout_ms,
                    timeout_action,
                    after: l.after.into_iter().map(TaskId).collect(),
                    key: l.key,
                    repo: l.repo,
                    base: l.base,
                    env: l.env.into_iter().collect(),
                    labels: l.labels.into_iter().collect(),
                };
                check_work(&req)?;
                Ok(req)
            });
        match parsed {
            Ok(req) => tasks.push((i + 1, req)),
            Err(e) => errors.push(format!("line {}: {e}", i + 1)),
        }
    }
    if !errors.is_empty() {
        return Err(CliError {
            code: 2,
            message: format!(
                "--batch {}: nothing was submitted:\n  {}",
                path.display(),
                errors.join("\n  ")
            ),
        });
    }
    if tasks.is_empty() {
        return Err(CliError {
            code: 2,
            message: format!("--batch {}: no tasks in it", path.display()),
        });
    }
    let s = a.connect.connect().await?;
    let mut results = Vec::with_capacity(tasks.len());
    let mut rest = tasks.into_iter().peekable();
    while rest.peek().is_some() {
        let (mut lines, mut reqs, mut bytes) = (Vec::new(), Vec::new(), 0);
        while let Some((_, next)) = rest.peek() {
            let size = next.title.len()
                + next.description.len()
                + next.repo.as_ref().map_or(0, String::len)
                + next
                    .env
                    .iter()
                    .map(|(k, v)| k.len() + v.len() + 8)
                    .sum::<usize>()
                + next
                    .labels
                    .iter()
                    .map(|(k, v)| k.len() + v.len() + 8)
                    .sum::<usize>()
                + 512;
            if reqs.len() == SUBMIT_BATCH_MAX
                || (!reqs.is_empty() && bytes + size > BATCH_TEXT_BYTES_MAX)
            {
                break;
            }
            let Some((line, req)) = rest.next() else {
                break;
            };
            bytes += size;
            lines.push(line);
            reqs.push(req);
        }
        let v = s.call(OpRequest::SubmitBatch(reqs)).await?;
        let answers = v["results"].as_array().cloned().unwrap_or_default();
        if answers.len() != lines.len() {
            return Err(CliError::fail(format!(
                "the hub answered {} of {} tasks; `muster-hub tasks` shows what it took",
                answers.len(),
                lines.len()
            )));
        }
        for (line, mut r) in lines.into_iter().zip(answers) {
            r["line"] = line.into();
            results.push(r);
        }
    }
    s.close().await;
    let refused = results.iter().filter(|r| r.get("error").is_some()).count();
    let v = serde_json::json!({
        "results": results,
        "accepted": results.len() - refused,
        "refused": refused,
    });
    print(&v, a.json, |v| {
        let mut out = String::new();
        for r in v["results"].as_array().into_iter().flatten() {
            match r.get("error") {
                Some(e) => {
                    out += &format!(
                        "line {}: refused: {}\n",
                        r["line"],
                        e.as_str().unwrap_or("?")
                    )
                }
                None => {
                    out += &format!(
                        "line {}: task {} ({})\n",
                        r["line"],
                        r["id"],
                        r["state"].as_str().unwrap_or("?")
                    )
                }
            }
        }
        out + &format!("{} submitted, {} refused\n", v["accepted"], v["refused"])
    });
    if refused > 0 {
        return Err(CliError::fail(format!(
            "the hub refused {refused} of the tasks"
        )));
    }
    Ok(())
}
