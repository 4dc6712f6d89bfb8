//! Who is asking: browser sessions (from one-time logins), API bearer tokens,
//! CSRF tokens, and the rate limit on failed logins.
//!
//! Sessions live in the hub's memory: a restart signs browsers out, which is
//! the safe direction. Every request made with a session asks the core whether
//! its identity is still live, so revoking an identity ends its sessions at once.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use muster_hub_core::web::{API_CALLER_PREFIX, API_TOKEN_PREFIX, Login};
use muster_protocol::msg::Role;
use muster_protocol::tls::{fingerprint, hex};

/// The session cookie's name.
pub(crate) const COOKIE: &str = "muster_session";
/// Most browser sessions at once; the oldest is dropped beyond it.
pub(crate) const SESSIONS_MAX: usize = 10_000;
/// Failed logins per address per window before it is refused for the rest of it.
pub(crate) const FAILED_LOGINS_PER_ADDR: u32 = 10;
/// Failed logins from all addresses per window.
pub(crate) const FAILED_LOGINS_ALL: u32 = 100;
/// The rate limit's window.
pub(crate) const FAILED_LOGIN_WINDOW: Duration = Duration::from_secs(60);
/// Addresses the limiter remembers; beyond it, the window restarts for all.
const LIMITER_ADDRS_MAX: usize = 10_000;

/// A signed-in browser.
#[derive(Debug, Clone)]
pub(crate) struct Session {
    /// The identity (or `api:` caller) it acts as.
    pub(crate) fingerprint: String,
    /// Its role, at most the identity's.
    pub(crate) role: Role,
    /// The identity's name, for the page.
    pub(crate) name: String,
    /// The token every state-changing request must carry.
    pub(crate) csrf: String,
    /// When it ends.
    pub(crate) expires: Instant,
}

/// The live sessions, by the SHA-256 of their cookie value.
pub(crate) struct Sessions {
    inner: Mutex<HashMap<String, Session>>,
    ttl: Duration,
}

impl Sessions {
    /// An empty set whose sessions last `ttl`.
    pub(crate) fn new(ttl: Duration) -> Sessions {
        Sessions {
            inner: Mutex::new(HashMap::new()),
            ttl,
        }
    }

    /// How long a session lasts.
    pub(crate) fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Starts a session for a redeemed login; its cookie value, or `None` if the
    /// system RNG failed.
    pub(crate) fn create(&self, login: Login, now: Instant) -> Option<(String, Session)> {
        let id = random_hex()?;
        let session = Session {
            fingerprint: login.fingerprint,
            role: login.role,
            name: login.name,
            csrf: random_hex()?,
            expires: now + self.ttl,
        };
        let mut map = self.lock();
        map.retain(|_, s| s.expires > now);
        if map.len() >= SESSIONS_MAX
            && let Some(oldest) = map
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(k, _)| k.clone())
        {
            map.remove(&oldest);
        }
        map.insert(fingerprint(id.as_bytes()), session.clone());
        Some((id, session))
    }

    /// The live session of a cookie value.
    pub(crate) fn get(&self, id: &str, now: Instant) -> Option<Session> {
        let key = fingerprint(id.as_bytes());
        let mut map = self.lock();
        match map.get(&key) {
            Some(s) if s.expires > now => Some(s.clone()),
            Some(_) => {
                map.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Ends one session (logout).
    pub(crate) fn remove(&self, id: &str) {
        self.lock().remove(&fingerprint(id.as_bytes()));
    }

    /// Ends every session of an identity (it was revoked).
    pub(crate) fn end_all(&self, fingerprint: &str) {
        self.lock().retain(|_, s| s.fingerprint != fingerprint);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        // A panic while holding the lock leaves a map that is still consistent.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// 32 random bytes as hex; `None` if the system RNG fails.
pub(crate) fn random_hex() -> Option<String> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new().fill(&mut bytes).ok()?;
    Some(hex(&bytes))
}

/// Compares two secrets in time independent of where they differ.
pub(crate) fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Whether `s` has the shape of a secret the hub hands out: 64 lower-case hex digits.
pub(crate) fn secret_shaped(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// How a request says who it is.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Credential {
    /// `Authorization: Bearer muster_api_…`: the caller fingerprint `api:<hash>`.
    Bearer(String),
    /// The session cookie's value.
    Cookie(String),
    /// Neither.
    None,
}

/// Reads the credential of a request; a malformed `Authorization` header is an
/// error that says what shape is expected.
pub(crate) fn credential(headers: &HeaderMap) -> Result<Credential, &'static str> {
    if let Some(auth) = headers.get(axum::http::header::AUTHORIZATION) {
        let auth = auth.to_str().unwrap_or_default();
        let secret = auth
            .strip_prefix("Bearer ")
            .map(str::trim)
            .and_then(|t| t.strip_prefix(API_TOKEN_PREFIX))
            .filter(|s| secret_shaped(s))
            .ok_or(
                "the Authorization header must be `Bearer muster_api_<64 hex digits>`; create a token with `muster-hub token create --kind api --name NAME`",
            )?;
        return Ok(Credential::Bearer(format!(
            "{API_CALLER_PREFIX}{}",
            fingerprint(secret.as_bytes())
        )));
    }
    Ok(cookie(headers, COOKIE).map_or(Credential::None, Credential::Cookie))
}

/// The value of cookie `name`, if the request carries a well-formed one.
pub(crate) fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, v)| *k == name && secret_shaped(v))
        .map(|(_, v)| v.to_string())
}

/// The `Set-Cookie` value that starts a session.
pub(crate) fn session_cookie(id: &str, ttl: Duration, secure: bool) -> String {
    format!(
        "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
        ttl.as_secs(),
        if secure { "; Secure" } else { "" }
    )
}

/// The `Set-Cookie` value that ends a session.
pub(crate) fn clear_cookie(secure: bool) -> String {
    format!(
        "{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{}",
        if secure { "; Secure" } else { "" }
    )
}

/// Requests of one caller (an API token or a session's identity) in flight at
/// once. HTTP/1.1 answers one request per connection at a time, so this bounds
/// how much of the core's queue and of the connection limit one credential
/// can hold, whatever number of connections it opens.
pub(crate) const REQUESTS_PER_CALLER_MAX: usize = 32;

/// Requests in flight per caller. An entry lives only while one of its
/// requests does, so the map holds at most as many entries as there are
/// connections (`CONNECTIONS_MAX`), a few dozen bytes each.
#[derive(Default)]
pub(crate) struct InFlight {
    inner: Mutex<HashMap<String, usize>>,
}

/// One request counted for its caller until dropped.
pub(crate) struct InFlightPlace {
    in_flight: Arc<InFlight>,
    caller: String,
}

impl InFlight {
    /// Counts one more request of `caller`; `None` when it has
    /// [`REQUESTS_PER_CALLER_MAX`] in flight already.
    pub(crate) fn take(this: &Arc<InFlight>, caller: &str) -> Option<InFlightPlace> {
        let mut m = this.lock();
        let n = m.entry(caller.to_owned()).or_default();
        if *n >= REQUESTS_PER_CALLER_MAX {
            return None;
        }
        *n += 1;
        Some(InFlightPlace {
            in_flight: Arc::clone(this),
            caller: caller.to_owned(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        // The critical sections cannot panic half-way; a poisoned map still counts right.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Drop for InFlightPlace {
    fn drop(&mut self) {
        let mut m = self.in_flight.lock();
        if let Some(n) = m.get_mut(&self.caller) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.caller);
            }
        }
    }
}

impl std::fmt::Debug for InFlightPlace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InFlightPlace").finish_non_exhaustive()
    }
}

/// Failed logins counted per address and overall, in fixed windows.
pub(crate) struct LoginLimiter {
    inner: Mutex<Limiter>,
}

struct Limiter {
    per_addr: HashMap<IpAddr, (Instant, u32)>,
    all: (Instant, u32),
}

impl LoginLimiter {
    /// A limiter with nothing counted.
    pub(crate) fn new(now: Instant) -> LoginLimiter {
        LoginLimiter {
            inner: Mutex::new(Limiter {
                per_addr: HashMap::new(),
                all: (now, 0),
            }),
        }
    }

    /// `Err(seconds to wait)` if `addr` (or everyone) failed too often lately.
    pub(crate) fn check(&self, addr: IpAddr, now: Instant) -> Result<(), u64> {
        let l = self.lock();
        let wait = |(start, n): (Instant, u32), max: u32| {
            let end = start + FAILED_LOGIN_WINDOW;
            (n >= max && end > now).then(|| (end - now).as_secs().max(1))
        };
        if let Some(w) = l
            .per_addr
            .get(&addr)
            .and_then(|c| wait(*c, FAILED_LOGINS_PER_ADDR))
        {
            return Err(w);
        }
        wait(l.all, FAILED_LOGINS_ALL).map_or(Ok(()), Err)
    }

    /// Counts a failed login from `addr`.
    pub(crate) fn failed(&self, addr: IpAddr, now: Instant) {
        let mut l = self.lock();
        let bump = |c: &mut (Instant, u32)| {
            if now >= c.0 + FAILED_LOGIN_WINDOW {
                *c = (now, 0);
            }
            c.1 = c.1.saturating_add(1);
        };
        bump(&mut l.all);
        if l.per_addr.len() >= LIMITER_ADDRS_MAX && !l.per_addr.contains_key(&addr) {
            l.per_addr.retain(|_, c| now < c.0 + FAILED_LOGIN_WINDOW);
            if l.per_addr.len() >= LIMITER_ADDRS_MAX {
                l.per_addr.clear();
            }
        }
        bump(l.per_addr.entry(addr).or_insert((now, 0)));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Limiter> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn login(fp: &str) -> Login {
        Login {
            fingerprint: fp.into(),
            role: Role::Operator,
            name: "ops".into(),
        }
    }

    #[test]
    fn sessions_expire_end_on_logout_and_on_revocation() {
        let t0 = Instant::now();
        let s = Sessions::new(Duration::from_secs(60));
        let (a, sa) = s.create(login("fp1"), t0).expect("rng");
        let (b, _) = s.create(login("fp2"), t0).expect("rng");
        assert!(secret_shaped(&a) && secret_shaped(&sa.csrf) && a != sa.csrf);
        assert_eq!(s.get(&a, t0).map(|x| x.name), Some("ops".into()));
        assert!(s.get(&a, t0 + Duration::from_secs(61)).is_none(), "expired");
        s.end_all("fp2");
        assert!(s.get(&b, t0).is_none(), "revoked identity");
        let (c, _) = s.create(login("fp1"), t0).expect("rng");
        s.remove(&c);
        assert!(s.get(&c, t0).is_none(), "logged out");
    }

    #[test]
    fn credentials_are_read_strictly() {
        let mut h = HeaderMap::new();
        assert_eq!(credential(&h), Ok(Credential::None));
        let id = "a".repeat(64);
        h.insert(
            "cookie",
            format!("x=1; {COOKIE}={id}").parse().expect("header"),
        );
        assert_eq!(credential(&h), Ok(Credential::Cookie(id.clone())));
        h.insert(
            "authorization",
            format!("Bearer {API_TOKEN_PREFIX}{id}")
                .parse()
                .expect("header"),
        );
        match credential(&h) {
            Ok(Credential::Bearer(fp)) => assert!(fp.starts_with(API_CALLER_PREFIX)),
            other => panic!("{other:?}"),
        }
        h.insert("authorization", "Bearer nope".parse().expect("header"));
        assert!(credential(&h).is_err());
        let mut h = HeaderMap::new();
        h.insert("cookie", format!("{COOKIE}=short").parse().expect("header"));
        assert_eq!(credential(&h), Ok(Credential::None));
    }

    #[test]
    fn failed_logins_are_limited_per_address_and_window() {
        let t0 = Instant::now();
        let l = LoginLimiter::new(t0);
        let a: IpAddr = "127.0.0.1".parse().expect("ip");
        let b: IpAddr = "127.0.0.2".parse().expect("ip");
        for _ in 0..FAILED_LOGINS_PER_ADDR {
            assert!(l.check(a, t0).is_ok());
            l.failed(a, t0);
        }
        assert!(l.check(a, t0).is_err());
        assert!(l.check(b, t0).is_ok(), "another address is not held back");
        assert!(l.check(a, t0 + FAILED_LOGIN_WINDOW).is_ok(), "a new window");
    }

    #[test]
    fn requests_in_flight_are_bounded_per_caller_and_forgotten_when_done() {
        let f = Arc::new(InFlight::default());
        let held: Vec<_> = (0..REQUESTS_PER_CALLER_MAX)
            .map(|_| InFlight::take(&f, "a").expect("room"))
            .collect();
        assert!(InFlight::take(&f, "a").is_none(), "a is at its bound");
        assert!(InFlight::take(&f, "b").is_some(), "b is not held back");
        drop(held);
        assert!(f.lock().is_empty(), "no entry outlives its requests");
        assert!(InFlight::take(&f, "a").is_some());
    }

    #[test]
    fn secrets_compare_by_value() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "ab"));
    }
}
