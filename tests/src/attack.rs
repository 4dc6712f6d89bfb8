//! Attacker tools shared by the suites that attack the listener: source
//! addresses across 127.0.0.0/8, real QUIC Initials, and a flood of handshakes
//! that never finish.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::{Hub, block_on};

/// `127.0.0.<last>`: loopback source addresses stand in for other hosts.
pub fn lo(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// A quinn client endpoint bound to `ip` (the attacker's source address).
///
/// # Panics
/// When no UDP socket can be bound there.
pub fn endpoint_on(ip: IpAddr) -> quinn::Endpoint {
    quinn::Endpoint::client(SocketAddr::new(ip, 0)).expect("bind a client endpoint on loopback")
}

/// Real QUIC Initial packets (each with a fresh connection ID and a ClientHello for
/// ALPN `muster-enroll/1`), captured by pointing a quinn client at a local socket.
///
/// # Panics
/// When the capture socket cannot be bound or quinn sends nothing within 5 s.
pub fn capture_initials(hub: &Hub, n: usize, ip: IpAddr) -> Vec<Vec<u8>> {
    let cfg = muster_protocol::tls::enroll_client_config(&hub.ca_fingerprint())
        .expect("an enrollment client config");
    block_on(async move {
        let sink = tokio::net::UdpSocket::bind(SocketAddr::new(ip, 0))
            .await
            .expect("bind the capture socket");
        let target = sink.local_addr().expect("capture address");
        let ep = endpoint_on(ip);
        let mut initials = Vec::with_capacity(n);
        let mut buf = vec![0u8; 65536];
        let mut pending = Vec::new();
        while initials.len() < n {
            pending.push(ep.connect_with(cfg.clone(), target, "localhost"));
            let (len, _) = tokio::time::timeout(Duration::from_secs(5), sink.recv_from(&mut buf))
                .await
                .expect("the quinn client sends its Initial")
                .expect("read the Initial");
            if len >= 1200 && buf[0] & 0xf0 == 0xc0 {
                initials.push(buf[..len].to_vec());
            }
        }
        drop(pending);
        ep.close(0u32.into(), b"");
        initials
    })
}

/// Replays captured Initials at the hub from a raw UDP socket that never answers:
/// every handshake it starts stalls until the hub gives up on it. Counts what it
/// sent and what the hub sent back; stops when dropped.
pub struct HandshakeFlood {
    /// Initials sent.
    pub sent: Arc<AtomicU64>,
    /// Datagrams the hub sent back.
    pub answers: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HandshakeFlood {
    /// Sends `initials` in a cycle from `from` to `hub`, `per_second` a second.
    ///
    /// # Panics
    /// When the flood socket cannot be bound.
    pub fn start(initials: Vec<Vec<u8>>, from: IpAddr, hub: SocketAddr, per_second: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let answers = Arc::new(AtomicU64::new(0));
        let sock = UdpSocket::bind(SocketAddr::new(from, 0)).expect("bind the flood socket");
        sock.set_nonblocking(true).expect("nonblocking");
        let (s, n, a) = (stop.clone(), sent.clone(), answers.clone());
        let gap = Duration::from_secs(1) / per_second.max(1);
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            let mut next = Instant::now();
            for packet in initials.iter().cycle() {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                let _ = sock.send_to(packet, hub);
                n.fetch_add(1, Ordering::Relaxed);
                while sock.recv_from(&mut buf).is_ok() {
                    a.fetch_add(1, Ordering::Relaxed);
                }
                next += gap;
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
        });
        HandshakeFlood {
            sent,
            answers,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for HandshakeFlood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
