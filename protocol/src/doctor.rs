//! The report of both daemons' `doctor` commands: one line per check, `ok`
//! or `fail` with what was found, and whether any failed; or, for scripts,
//! one JSON document at the end.

/// Prints each check as it is made (or collects them for JSON) and remembers
/// whether any failed.
#[derive(Debug, Default)]
pub struct Checks {
    failed: bool,
    /// `Some` in JSON mode: the checks so far, printed by [`Checks::finish`].
    json: Option<Vec<serde_json::Value>>,
}

impl Checks {
    /// Checks reported as one JSON document by [`Checks::finish`] instead of lines.
    pub fn json() -> Checks {
        Checks {
            failed: false,
            json: Some(Vec::new()),
        }
    }

    /// Reports one check: `Ok` says what was found, `Err` what is wrong.
    pub fn check(&mut self, name: &str, result: Result<String, String>) {
        self.failed |= result.is_err();
        match (&mut self.json, result) {
            (Some(all), r) => {
                let (ok, detail) = match r {
                    Ok(m) => (true, m),
                    Err(m) => (false, m),
                };
                all.push(serde_json::json!({"name": name, "ok": ok, "detail": detail}));
            }
            (None, Ok(m)) => println!("ok    {name}: {m}"),
            (None, Err(m)) => println!("fail  {name}: {m}"),
        }
    }

    /// Whether any check failed.
    pub fn failed(&self) -> bool {
        self.failed
    }

    /// In JSON mode, prints `{"checks": [{"name", "ok", "detail"}], "ok"}`.
    pub fn finish(&self) {
        if let Some(all) = &self.json {
            println!("{}", serde_json::json!({"checks": all, "ok": !self.failed}));
        }
    }
}
