//! Who may hold the listener's resources before it knows them: QUIC handshakes in
//! flight, connections without a client certificate, and enrollment attempts, each
//! counted per source address and in total.
//!
//! Pure policy: no sockets, no clock; every decision takes `now` (a [`Duration`]
//! since the shell's start). The shell keeps one
//! [`Admission`] behind a mutex (short critical sections, no `.await` inside) and
//! releases what it took with the `*_done` calls when a handshake or a connection ends.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use muster_wire::pace::{Window, retry_after_s};

/// Sources remembered at once. Past it, idle sources are forgotten (expired ones
/// first, then the least recently seen); a source with something in flight never is.
pub const SOURCES_MAX: usize = 4096;
/// The length of every per-minute window.
const MINUTE: Duration = Duration::from_secs(60);

/// The bounds [`Admission`] enforces.
#[derive(Debug, Clone)]
pub struct AdmissionLimits {
    /// Handshakes in flight from all sources.
    pub handshakes_max: u32,
    /// Handshakes in flight from one source.
    pub handshakes_per_source: u32,
    /// Unauthenticated connections open from all sources.
    pub unauthenticated_max: u32,
    /// Unauthenticated connections open from one source.
    pub unauthenticated_per_source: u32,
    /// Unauthenticated connections accepted per minute from one source.
    pub unauthenticated_per_minute: u32,
    /// Unauthenticated connections accepted per minute from all sources.
    pub unauthenticated_per_minute_total: u32,
    /// Failed enrollment attempts per minute from one source.
    pub enroll_per_minute: u32,
}

impl AdmissionLimits {
    /// The listener's bounds from `[limits]`: the unauthenticated total is at most
    /// half of `max_connections`, so authenticated peers always find room.
    pub fn from_limits(l: &crate::policy::Limits, handshakes_max: u32) -> Self {
        AdmissionLimits {
            handshakes_max,
            handshakes_per_source: l.handshakes_per_source,
            unauthenticated_max: l.unauthenticated_max.min(l.max_connections / 2).max(1),
            unauthenticated_per_source: l.unauthenticated_per_source,
            unauthenticated_per_minute: l.unauthenticated_per_minute,
            unauthenticated_per_minute_total: l.unauthenticated_per_minute_total,
            enroll_per_minute: l.enroll_per_minute,
        }
    }
}

/// What to do with a new handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handshake {
    /// Go ahead; counted until [`Admission::handshake_done`].
    Accept,
    /// Over a bound, and the address is not validated: answer with a stateless QUIC
    /// Retry, which costs the hub nothing and weeds out spoofed and dead sources.
    Retry,
    /// Over a bound from a validated address: refuse at once (the client backs off).
    Refuse(Refusal),
}

/// Why the listener turned a peer away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Too many handshakes in flight from all sources.
    HandshakesBusy,
    /// Too many handshakes in flight from this source.
    HandshakesPerSource,
    /// Too many unauthenticated connections open from all sources.
    UnauthenticatedBusy,
    /// Too many unauthenticated connections open from this source.
    UnauthenticatedPerSource,
    /// Too many unauthenticated connections this minute from this source.
    UnauthenticatedRate {
        /// Seconds until the window ends.
        retry_after_s: u64,
    },
    /// Too many unauthenticated connections this minute from all sources.
    UnauthenticatedRateTotal {
        /// Seconds until the window ends.
        retry_after_s: u64,
    },
    /// Every remembered source has something in flight.
    SourcesFull,
}

impl Refusal {
    /// Which `[limits]` key (or built-in bound) was hit, for logs.
    pub fn limit(&self) -> &'static str {
        match self {
            Refusal::HandshakesBusy => "handshakes in flight (built in)",
            Refusal::HandshakesPerSource => "limits.handshakes_per_source",
            Refusal::UnauthenticatedBusy => "limits.unauthenticated_max",
            Refusal::UnauthenticatedPerSource => "limits.unauthenticated_per_source",
            Refusal::UnauthenticatedRate { .. } => "limits.unauthenticated_per_minute",
            Refusal::UnauthenticatedRateTotal { .. } => "limits.unauthenticated_per_minute_total",
            Refusal::SourcesFull => "sources remembered (built in)",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::HandshakesBusy => write!(f, "too many handshakes in flight; try again"),
            Refusal::HandshakesPerSource => {
                write!(
                    f,
                    "too many handshakes in flight from this address; try again"
                )
            }
            Refusal::UnauthenticatedBusy => write!(
                f,
                "too many connections without a client certificate; try again later"
            ),
            Refusal::UnauthenticatedPerSource => write!(
                f,
                "too many connections without a client certificate from this address"
            ),
            Refusal::UnauthenticatedRate { retry_after_s } => write!(
                f,
                "too many connections without a client certificate from this address this minute; try again in {retry_after_s} s"
            ),
            Refusal::UnauthenticatedRateTotal { retry_after_s } => write!(
                f,
                "too many connections without a client certificate this minute; try again in {retry_after_s} s"
            ),
            Refusal::SourcesFull => write!(f, "the hub is busy; try again later"),
        }
    }
}

/// What is known about one source address.
#[derive(Debug, Clone, Copy)]
struct Source {
    handshakes: u32,
    unauthenticated: u32,
    minute: Window,
    enroll: Window,
    seen: Duration,
}

impl Source {
    fn new(now: Duration) -> Self {
        Source {
            handshakes: 0,
            unauthenticated: 0,
            minute: Window::new(MINUTE, now),
            enroll: Window::new(MINUTE, now),
            seen: now,
        }
    }

    fn busy(&self) -> bool {
        self.handshakes > 0 || self.unauthenticated > 0
    }

    fn expired(&self, now: Duration) -> bool {
        !self.busy() && self.minute.expired(now) && self.enroll.expired(now)
    }
}

/// Handshake, unauthenticated-connection and enrollment bounds per source and in
/// total. See the module docs.
#[derive(Debug)]
pub struct Admission {
    limits: AdmissionLimits,
    sources: HashMap<IpAddr, Source>,
    handshakes: u32,
    unauthenticated: u32,
    minute: Window,
}

/// The address a peer is counted under: an IPv4 address (IPv4-mapped IPv6 included)
/// as is, an IPv6 address by its /64, which is what one host usually controls.
pub fn source_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut seg = v6.segments();
                seg[4..].fill(0);
                IpAddr::V6(seg.into())
            }
        },
    }
}

impl Admission {
    /// An empty table enforcing `limits`.
    pub fn new(limits: AdmissionLimits, now: Duration) -> Self {
        Admission {
            limits,
            sources: HashMap::new(),
            handshakes: 0,
            unauthenticated: 0,
            minute: Window::new(MINUTE, now),
        }
    }

    /// Handshakes in flight, unauthenticated connections open, sources remembered.
    #[cfg(test)]
    pub fn counts(&self) -> (u32, u32, usize) {
        (self.handshakes, self.unauthenticated, self.sources.len())
    }

    /// A new handshake from `ip`; `validated` when the client proved its address
    /// (it answered a Retry). On [`Handshake::Accept`] the caller must call
    /// [`Admission::handshake_done`] when the handshake ends, however it ends.
    pub fn handshake(&mut self, ip: IpAddr, validated: bool, now: Duration) -> Handshake {
        let over = |r| {
            if validated {
                Handshake::Refuse(r)
            } else {
                Handshake::Retry
            }
        };
        if self.handshakes >= self.limits.handshakes_max {
            return over(Refusal::HandshakesBusy);
        }
        let per_source = self.limits.handshakes_per_source;
        let Some(source) = self.source(ip, now) else {
            return over(Refusal::SourcesFull);
        };
        if source.handshakes >= per_source {
            return over(Refusal::HandshakesPerSource);
        }
        source.handshakes += 1;
        self.handshakes += 1;
        Handshake::Accept
    }

    /// A handshake accepted by [`Admission::handshake`] ended.
    pub fn handshake_done(&mut self, ip: IpAddr) {
        self.handshakes = self.handshakes.saturating_sub(1);
        if let Some(s) = self.sources.get_mut(&source_of(ip)) {
            s.handshakes = s.handshakes.saturating_sub(1);
        }
    }

    /// A connection without a client certificate from `ip` finished its handshake.
    /// On `Ok` the caller must call [`Admission::unauthenticated_done`] when it closes.
    pub fn unauthenticated(&mut self, ip: IpAddr, now: Duration) -> Result<(), Refusal> {
        let l = self.limits.clone();
        if self.unauthenticated >= l.unauthenticated_max {
            return Err(Refusal::UnauthenticatedBusy);
        }
        if self.minute.expired(now) {
            self.minute = Window::new(MINUTE, now);
        }
        if self.minute.count() >= l.unauthenticated_per_minute_total {
            let retry_after_s = self
                .minute
                .take(now, l.unauthenticated_per_minute_total)
                .map_err(retry_after_s)
                .err()
                .unwrap_or(1);
            return Err(Refusal::UnauthenticatedRateTotal { retry_after_s });
        }
        let source = self.source(ip, now).ok_or(Refusal::SourcesFull)?;
        if source.unauthenticated >= l.unauthenticated_per_source {
            return Err(Refusal::UnauthenticatedPerSource);
        }
        source
            .minute
            .take(now, l.unauthenticated_per_minute)
            .map_err(retry_after_s)
            .map_err(|retry_after_s| Refusal::UnauthenticatedRate { retry_after_s })?;
        source.unauthenticated += 1;
        let _ = self.minute.take(now, u32::MAX);
        self.unauthenticated += 1;
        Ok(())
    }

    /// A connection admitted by [`Admission::unauthenticated`] closed.
    pub fn unauthenticated_done(&mut self, ip: IpAddr) {
        self.unauthenticated = self.unauthenticated.saturating_sub(1);
        if let Some(s) = self.sources.get_mut(&source_of(ip)) {
            s.unauthenticated = s.unauthenticated.saturating_sub(1);
        }
    }

    /// One enrollment attempt from `ip`; `Err(seconds to wait)` when the source
    /// used up its failures this minute. Every attempt counts until
    /// [`Admission::enrolled`] gives back the ones that succeeded, so only failures
    /// weigh, and one source's failures never touch another's budget.
    pub fn enroll(&mut self, ip: IpAddr, now: Duration) -> Result<(), u64> {
        let max = self.limits.enroll_per_minute;
        // With every source busy there is nowhere to count: refuse for a moment.
        let source = self.source(ip, now).ok_or(1u64)?;
        source.enroll.take(now, max).map_err(retry_after_s)
    }

    /// An enrollment from `ip` succeeded: it does not use up the source's budget.
    pub fn enrolled(&mut self, ip: IpAddr) {
        if let Some(s) = self.sources.get_mut(&source_of(ip)) {
            s.enroll.give_back();
        }
    }

    /// The entry for `ip`, made room for if needed; `None` when every remembered
    /// source has something in flight.
    fn source(&mut self, ip: IpAddr, now: Duration) -> Option<&mut Source> {
        let key = source_of(ip);
        if !self.sources.contains_key(&key) && self.sources.len() >= SOURCES_MAX {
            self.sources.retain(|_, s| !s.expired(now));
            if self.sources.len() >= SOURCES_MAX {
                let oldest = self
                    .sources
                    .iter()
                    .filter(|(_, s)| !s.busy())
                    .min_by_key(|(_, s)| s.seen)
                    .map(|(k, _)| *k)?;
                self.sources.remove(&oldest);
            }
        }
        let s = self.sources.entry(key).or_insert_with(|| Source::new(now));
        s.seen = now;
        Some(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> AdmissionLimits {
        AdmissionLimits {
            handshakes_max: 4,
            handshakes_per_source: 2,
            unauthenticated_max: 5,
            unauthenticated_per_source: 2,
            unauthenticated_per_minute: 3,
            unauthenticated_per_minute_total: 6,
            enroll_per_minute: 2,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn one_source_cannot_hold_every_handshake() {
        let t0 = Duration::ZERO;
        let mut a = Admission::new(limits(), t0);
        let (x, y) = (ip("127.0.0.2"), ip("127.0.0.1"));
        assert_eq!(a.handshake(x, false, t0), Handshake::Accept);
        assert_eq!(a.handshake(x, false, t0), Handshake::Accept);
        // Over the per-source bound: a Retry while unvalidated, a refusal once validated.
        assert_eq!(a.handshake(x, false, t0), Handshake::Retry);
        assert_eq!(
            a.handshake(x, true, t0),
            Handshake::Refuse(Refusal::HandshakesPerSource)
        );
        // Another source still gets in.
        assert_eq!(a.handshake(y, false, t0), Handshake::Accept);
        assert_eq!(a.handshake(y, true, t0), Handshake::Accept);
        // The total is full now.
        assert_eq!(a.handshake(ip("10.0.0.1"), false, t0), Handshake::Retry);
        assert_eq!(
            a.handshake(ip("10.0.0.1"), true, t0),
            Handshake::Refuse(Refusal::HandshakesBusy)
        );
        a.handshake_done(x);
        assert_eq!(a.handshake(ip("10.0.0.1"), true, t0), Handshake::Accept);
        assert_eq!(a.counts().0, 4);
    }

    #[test]
    fn unauthenticated_connections_are_capped_per_source_in_total_and_per_minute() {
        let t0 = Duration::ZERO;
        let mut a = Admission::new(limits(), t0);
        let x = ip("127.0.0.2");
        assert!(a.unauthenticated(x, t0).is_ok());
        assert!(a.unauthenticated(x, t0).is_ok());
        assert_eq!(
            a.unauthenticated(x, t0),
            Err(Refusal::UnauthenticatedPerSource)
        );
        a.unauthenticated_done(x);
        assert!(a.unauthenticated(x, t0).is_ok());
        a.unauthenticated_done(x);
        // Three this minute already.
        assert_eq!(
            a.unauthenticated(x, t0 + Duration::from_secs(20)),
            Err(Refusal::UnauthenticatedRate { retry_after_s: 40 })
        );
        // A new minute.
        assert!(a.unauthenticated(x, t0 + MINUTE).is_ok());
        // The open total: 2 from x now; 3 more from others reach 5.
        let t1 = t0 + MINUTE;
        assert!(a.unauthenticated(ip("10.0.0.1"), t1).is_ok());
        assert!(a.unauthenticated(ip("10.0.0.2"), t1).is_ok());
        assert!(a.unauthenticated(ip("10.0.0.3"), t1).is_ok());
        assert_eq!(a.counts().1, 5);
        assert_eq!(
            a.unauthenticated(ip("10.0.0.4"), t1),
            Err(Refusal::UnauthenticatedBusy)
        );
    }

    #[test]
    fn the_total_per_minute_bounds_many_sources_and_does_not_charge_the_source() {
        let t0 = Duration::ZERO;
        let mut a = Admission::new(limits(), t0);
        for i in 0..6 {
            let peer = ip(&format!("10.0.1.{i}"));
            assert!(a.unauthenticated(peer, t0).is_ok());
            a.unauthenticated_done(peer);
        }
        let late = ip("10.0.2.1");
        let t = t0 + Duration::from_secs(30);
        assert_eq!(
            a.unauthenticated(late, t),
            Err(Refusal::UnauthenticatedRateTotal { retry_after_s: 30 })
        );
        // Next minute the late source has its whole budget.
        for _ in 0..3 {
            assert!(a.unauthenticated(late, t0 + MINUTE).is_ok());
            a.unauthenticated_done(late);
        }
    }

    #[test]
    fn enrollment_failures_count_per_source_and_successes_are_free() {
        let t0 = Duration::ZERO;
        let mut a = Admission::new(limits(), t0);
        let (flood, honest) = (ip("127.0.0.2"), ip("127.0.0.1"));
        assert!(a.enroll(flood, t0).is_ok());
        assert!(a.enroll(flood, t0).is_ok());
        assert_eq!(a.enroll(flood, t0 + Duration::from_secs(1)), Err(59));
        // The flood does not touch another source.
        for _ in 0..5 {
            assert!(a.enroll(honest, t0).is_ok());
            a.enrolled(honest);
        }
        // Successes were given back: two failures still fit.
        assert!(a.enroll(honest, t0).is_ok());
        assert!(a.enroll(honest, t0).is_ok());
        assert!(a.enroll(honest, t0).is_err());
        assert!(a.enroll(flood, t0 + MINUTE).is_ok());
    }

    #[test]
    fn ipv6_sources_count_by_their_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(source_of(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(source_of(ip("::ffff:10.1.2.3")), ip("10.1.2.3"));
        let t0 = Duration::ZERO;
        let mut a = Admission::new(limits(), t0);
        assert!(a.enroll(ip("2001:db8::1"), t0).is_ok());
        assert!(a.enroll(ip("2001:db8::2"), t0).is_ok());
        assert!(a.enroll(ip("2001:db8::3"), t0).is_err());
    }

    #[test]
    fn the_source_table_is_bounded_and_never_forgets_a_busy_source() {
        let t0 = Duration::ZERO;
        let mut l = limits();
        l.handshakes_max = u32::MAX;
        let mut a = Admission::new(l, t0);
        let busy = ip("192.168.0.1");
        assert_eq!(a.handshake(busy, false, t0), Handshake::Accept);
        for i in 0..(SOURCES_MAX as u32 * 2) {
            let peer = IpAddr::V4((0x0a00_0000 + i).into());
            assert!(
                a.enroll(peer, t0 + Duration::from_millis(u64::from(i)))
                    .is_ok()
            );
            assert!(a.counts().2 <= SOURCES_MAX);
        }
        assert_eq!(a.sources.get(&busy).map(|s| s.handshakes), Some(1));
        a.handshake_done(busy);
        assert_eq!(a.counts().0, 0);
    }
}
