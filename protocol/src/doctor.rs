//! The report of both daemons' `doctor` commands: one line per check, `ok`
//! or `fail` with what was found, and whether any failed.

/// Prints each check as it is made and remembers whether any failed.
#[derive(Debug, Default)]
pub struct Checks {
    failed: bool,
}

impl Checks {
    /// Prints one check: `Ok` says what was found, `Err` what is wrong.
    pub fn check(&mut self, name: &str, result: Result<String, String>) {
        match result {
            Ok(m) => println!("ok    {name}: {m}"),
            Err(m) => {
                self.failed = true;
                println!("fail  {name}: {m}");
            }
        }
    }

    /// Whether any check failed.
    pub fn failed(&self) -> bool {
        self.failed
    }
}
