//! Issue 12, trust boundaries on the sidecar, acted out as an attacker would
//! through the real binaries: agents reporting for other attempts, floods on
//! the local socket, and join tokens leaking or being spent too early.

mod local_socket;
mod tokens;
