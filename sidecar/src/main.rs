//! `muster-sidecar`: the sidecar daemon, enrollment, and the agent-facing commands.

fn main() -> std::process::ExitCode {
    muster_sidecar::cli::main_from(std::env::args_os())
}
