//! `muster-hub`: the hub daemon and the operator CLI.

use std::process::ExitCode;

fn main() -> ExitCode {
    muster_hub::cli::main()
}
