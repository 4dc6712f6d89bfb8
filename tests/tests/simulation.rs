//! Deterministic, seeded simulation of the hub core and a fleet of sidecar cores
//! under faults: connection drops, duplicated and reordered messages, sidecar
//! crashes with durable state, hub restarts, clock jumps, and agent runs that
//! fail to wake, never start, hang, fail or vanish. Safety is checked after every
//! step, liveness at the end. See `sim/world.rs` for the model.
//!
//! - `MUSTER_SIM_SEED=N`: run only seed N (prints its summary).
//! - `MUSTER_SIM_SEEDS=K`: run K seeds from `MUSTER_SIM_BASE_SEED` (default 1).
//! - `MUSTER_SIM_AGENTS`, `MUSTER_SIM_TASKS`: fleet and workload size for every seed
//!   (by default each seed draws a small fleet; `simulation_200_agents` runs the big one).
//! - `MUSTER_SIM_FAULT_MS`: length of the fault phase in virtual milliseconds.

mod sim;

use std::time::Instant;

const DEFAULT_SEEDS: u64 = 200;
const DEFAULT_BASE_SEED: u64 = 1;
const BIG_AGENTS: usize = 200;
const BIG_SEEDS: u64 = 3;

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    match v.trim().parse() {
        Ok(n) => Some(n),
        Err(e) => panic!("{name}={v:?} is not a number: {e}"),
    }
}

/// The configuration of one seed: sizes from the environment, else drawn from the seed.
fn config(seed: u64, agents: Option<usize>) -> sim::Config {
    let mix = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17);
    let agents = env_u64("MUSTER_SIM_AGENTS")
        .map(|n| n as usize)
        .or(agents)
        .unwrap_or(3 + (mix % 18) as usize);
    let tasks = env_u64("MUSTER_SIM_TASKS")
        .map(|n| n as usize)
        .unwrap_or(agents * (2 + ((mix >> 8) % 3) as usize));
    let fault_ms = env_u64("MUSTER_SIM_FAULT_MS").unwrap_or(6 * 60_000);
    sim::Config {
        seed,
        agents,
        tasks,
        fault_ms,
        max_steps: 2_000 * (agents as u64 + tasks as u64) + 500_000,
    }
}

fn run_one(cfg: sim::Config) -> Result<sim::Summary, String> {
    let seed = cfg.seed;
    match std::panic::catch_unwind(move || sim::run(cfg)) {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(failed)) => Err(failed.to_string()),
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(format!(
                "simulation panicked: seed {seed}: {msg}\nreproduce: MUSTER_SIM_SEED={seed} cargo test -p muster-tests --test simulation -- --nocapture"
            ))
        }
    }
}

fn run_seeds(seeds: impl Iterator<Item = u64>, agents: Option<usize>, label: &str) {
    let started = Instant::now();
    let mut failures = Vec::new();
    let mut total = sim::Summary::default();
    let mut n = 0;
    for seed in seeds {
        let cfg = config(seed, agents);
        let one = Instant::now();
        match run_one(cfg.clone()) {
            Ok(s) => {
                if env_u64("MUSTER_SIM_SEED").is_some()
                    || std::env::var("MUSTER_SIM_VERBOSE").is_ok()
                {
                    println!(
                        "seed {seed}: {} agents, {} tasks, {:.2} s: {s:?}",
                        cfg.agents,
                        cfg.tasks,
                        one.elapsed().as_secs_f64()
                    );
                }
                add(&mut total, &s);
            }
            Err(e) => {
                eprintln!("{e}\n");
                failures.push(seed);
            }
        }
        n += 1;
    }
    println!(
        "{label}: {n} seeds in {:.1} s; {} failed {failures:?}; totals: {} steps, {} tasks submitted, {} completed, {} failed, {} cancelled, {} requeues, {} connection drops, {} sidecar crashes ({} runs survived), {} hub restarts, {} clock jumps, {} duplicated reports, {} messages lost, {} runs, plans {:?}, attempt outcomes {:?}, {} ticks with two sidecars running one task",
        started.elapsed().as_secs_f64(),
        failures.len(),
        total.steps,
        total.submitted,
        total.completed,
        total.failed,
        total.cancelled,
        total.requeued,
        total.conn_breaks,
        total.sidecar_crashes,
        total.runs_survived,
        total.hub_restarts,
        total.clock_jumps,
        total.dup_reports,
        total.lost_messages,
        total.runs,
        total.plans,
        total.outcomes,
        total.overlap_ticks,
    );
    assert!(
        failures.is_empty(),
        "{label}: seeds {failures:?} failed (see stderr for each trace)"
    );
}

fn add(total: &mut sim::Summary, s: &sim::Summary) {
    total.steps += s.steps;
    total.submitted += s.submitted;
    total.acked += s.acked;
    total.completed += s.completed;
    total.failed += s.failed;
    total.cancelled += s.cancelled;
    total.requeued += s.requeued;
    total.conn_breaks += s.conn_breaks;
    total.sidecar_crashes += s.sidecar_crashes;
    total.runs_survived += s.runs_survived;
    total.hub_restarts += s.hub_restarts;
    total.clock_jumps += s.clock_jumps;
    total.dup_reports += s.dup_reports;
    total.lost_messages += s.lost_messages;
    total.runs += s.runs;
    total.overlap_ticks += s.overlap_ticks;
    for (k, v) in &s.plans {
        *total.plans.entry(k).or_default() += v;
    }
    for (k, v) in &s.outcomes {
        *total.outcomes.entry(k).or_default() += v;
    }
}

/// Many seeds of small fleets (or one seed, with `MUSTER_SIM_SEED`).
#[test]
fn simulation_seeds() {
    if let Some(seed) = env_u64("MUSTER_SIM_SEED") {
        run_seeds(std::iter::once(seed), None, "simulation");
        return;
    }
    let base = env_u64("MUSTER_SIM_BASE_SEED").unwrap_or(DEFAULT_BASE_SEED);
    let count = env_u64("MUSTER_SIM_SEEDS").unwrap_or(DEFAULT_SEEDS);
    run_seeds(base..base + count, None, "simulation");
}

/// A few seeds with the full fleet of 200 agents.
#[test]
fn simulation_200_agents() {
    if env_u64("MUSTER_SIM_SEED").is_some() {
        return;
    }
    let base = env_u64("MUSTER_SIM_BASE_SEED").unwrap_or(DEFAULT_BASE_SEED);
    run_seeds(
        (base..base + BIG_SEEDS).map(|s| s.wrapping_add(1 << 32)),
        Some(BIG_AGENTS),
        "simulation (200 agents)",
    );
}

/// The same seed twice gives the same run (the repro recipe depends on it).
#[test]
fn simulation_is_deterministic() {
    let base = env_u64("MUSTER_SIM_SEED").unwrap_or(DEFAULT_BASE_SEED);
    for seed in base..base + 5 {
        let a = sim::run(config(seed, Some(12))).map_err(|f| f.to_string());
        let b = sim::run(config(seed, Some(12))).map_err(|f| f.to_string());
        match (a, b) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "seed {seed} gave two different runs"),
            (Err(a), Err(b)) => assert_eq!(a, b, "seed {seed} failed two different ways"),
            (a, b) => panic!("seed {seed} passed once and failed once: {a:?} / {b:?}"),
        }
    }
}
