//! The standard `process_*` metrics (CPU, memory, file descriptors, start
//! time, threads) read from `/proc/self` when scraped, and `build_info`:
//! what both daemons export besides their own figures.

use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Clock ticks per second of `/proc/<pid>/stat` times: `USER_HZ`, which the
/// kernel fixes at 100 for user space on every architecture it supports.
const TICKS_PER_SECOND: f64 = 100.0;

/// The `process_*` families, updated from `/proc/self` on each scrape.
#[derive(Debug, Default)]
pub struct ProcessMetrics {
    cpu: Counter<f64, AtomicU64>,
    resident: Gauge,
    virtual_bytes: Gauge,
    open_fds: Gauge,
    max_fds: Gauge,
    start_time: Gauge<f64, AtomicU64>,
    threads: Gauge,
}

impl ProcessMetrics {
    /// Registers the families under their standard names (no prefix).
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            self.cpu.clone(),
        );
        r.register(
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
            self.resident.clone(),
        );
        r.register(
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes",
            self.virtual_bytes.clone(),
        );
        r.register(
            "process_open_fds",
            "Number of open file descriptors",
            self.open_fds.clone(),
        );
        r.register(
            "process_max_fds",
            "Maximum number of open file descriptors",
            self.max_fds.clone(),
        );
        r.register(
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch in seconds",
            self.start_time.clone(),
        );
        r.register(
            "process_threads",
            "Number of OS threads in the process",
            self.threads.clone(),
        );
    }

    /// Reads `/proc/self` and sets the families; a file that cannot be read
    /// leaves its figures as they were.
    pub fn update(&self) {
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat")
            && let Some(s) = parse_stat(&stat)
        {
            let cpu = (s.utime + s.stime) as f64 / TICKS_PER_SECOND;
            let delta = cpu - self.cpu.get();
            if delta > 0.0 {
                self.cpu.inc_by(delta);
            }
            self.virtual_bytes.set(s.vsize as i64);
            self.resident.set((s.rss_pages * page_size()) as i64);
            self.threads.set(s.threads as i64);
            if let Some(boot) = boot_time() {
                self.start_time
                    .set(boot as f64 + s.start_ticks as f64 / TICKS_PER_SECOND);
            }
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            self.open_fds.set(dir.count() as i64);
        }
        if let Ok(limits) = std::fs::read_to_string("/proc/self/limits")
            && let Some(max) = parse_max_fds(&limits)
        {
            self.max_fds.set(max as i64);
        }
    }
}

/// The fields of `/proc/self/stat` the families need.
#[derive(Debug, PartialEq, Eq)]
struct Stat {
    utime: u64,
    stime: u64,
    threads: u64,
    start_ticks: u64,
    vsize: u64,
    rss_pages: u64,
}

/// Parses `/proc/<pid>/stat`; the command name (field 2) may hold spaces and
/// parentheses, so fields are counted after its last `)`.
fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (state): field n is f[n - 3].
    let n = |i: usize| f.get(i - 3).and_then(|v| v.parse::<u64>().ok());
    Some(Stat {
        utime: n(14)?,
        stime: n(15)?,
        threads: n(20)?,
        start_ticks: n(22)?,
        vsize: n(23)?,
        rss_pages: n(24)?,
    })
}

fn parse_max_fds(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Seconds since the epoch at boot (`btime` in `/proc/stat`).
fn boot_time() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

/// The page size: 4 KiB unless the kernel's `/proc/self/smaps` says otherwise.
fn page_size() -> u64 {
    std::fs::read_to_string("/proc/self/smaps")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("KernelPageSize:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(4096, |kb| kb * 1024)
}

/// Registers `build_info{version}` = 1 (under the registry's prefix), so a
/// dashboard can tell which build runs where.
pub fn register_build_info(r: &mut Registry, version: &'static str) {
    let info: Family<Vec<(&'static str, String)>, Gauge> = Family::default();
    info.get_or_create(&vec![("version", version.to_string())])
        .set(1);
    r.register(
        "build_info",
        "The running build: 1, labelled with its version",
        info,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        let text = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 250 125 0 0 20 0 7 0 12345 1000000 300 18446744073709551615";
        assert_eq!(
            parse_stat(text),
            Some(Stat {
                utime: 250,
                stime: 125,
                threads: 7,
                start_ticks: 12345,
                vsize: 1_000_000,
                rss_pages: 300,
            })
        );
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn this_process_has_figures() {
        let m = ProcessMetrics::default();
        m.update();
        assert!(m.resident.get() > 0 && m.open_fds.get() > 0 && m.threads.get() > 0);
        assert!(m.start_time.get() > 1.0e9);
        let mut r = Registry::default();
        m.register(&mut r);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r).expect("encode");
        assert!(out.contains("process_cpu_seconds_total "), "{out}");
        assert!(out.contains("process_resident_memory_bytes "), "{out}");
    }

    #[test]
    fn max_fds_is_read_from_limits() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units\nMax open files            1024                 524288               files\n";
        assert_eq!(parse_max_fds(limits), Some(1024));
    }
}
