//! Issue 12, the trust boundaries: each test acts as an attacker does (a second
//! host under a held name, a sidecar claiming more than it was granted, agent
//! text built to break listings or terminals, files left readable, arithmetic
//! on hostile numbers, an agent reporting for another attempt, floods on the
//! local socket, join tokens leaking or spent too early) against the real
//! binaries on loopback, and checks both the refusal and that honest clients
//! keep working.

mod identity;
mod local_socket;
mod tokens;
