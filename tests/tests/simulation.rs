//! Deterministic, seeded simulation of the hub core and a fleet of sidecar cores
//! as today's daemons drive them (the hub's batches with one commit each, the
//! sidecar's launch before commit, handle files, unflushed batches) under faults:
//! connection drops, duplicated and reordered messages, sidecar and hub crashes,
//! wall-clock steps both ways and a clock that restarts with the hub, and agent
//! runs that fail to wake, never start, hang, fail or vanish. Safety is checked
//! after every commit and tick, liveness and the run's own totals at the end
//! (in the default workload every submitted task completes). See `sim/world.rs`
//! and `tests/README.md` for what is modelled and what is not.
//!
//! - `MUSTER_SIM_SEED=N`: run only seed N (prints its summary).
//! - `MUSTER_SIM_SEEDS=K`: run K seeds from `MUSTER_SIM_BASE_SEED` (default 1).
//! - `MUSTER_SIM_AGENTS`, `MUSTER_SIM_TASKS`: fleet and workload size for every seed
//!   (by default each seed draws a small fleet; `simulation_200_agents` runs the big one).
//! - `MUSTER_SIM_FAULT_MS`: length of the fault phase in virtual milliseconds.
//! - `MUSTER_SIM_MIXED=1`: every seed runs the mixed workload (cancels, failures
//!   for good); `simulation_mixed_workload` runs it on a few seeds by default.

mod sim;

use std::time::Instant;

const DEFAULT_SEEDS: u64 = 200;
const DEFAULT_BASE_SEED: u64 = 1;
const BIG_AGENTS: usize = 200;
const BIG_SEEDS: u64 = 3;
const MIXED_SEEDS: u64 = 40;
/// Below this many seeds a run may miss a fault kind by chance; from it on, every
/// kind must have been injected at least once.
const FAULT_KINDS_MIN_SEEDS: u64 = 50;

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    match v.trim().parse() {
        Ok(n) => Some(n),
        Err(e) => panic!("{name}={v:?} is not a number: {e}"),
    }
}

/// The configuration of one seed: sizes from the environment, else drawn from the seed.
fn config(seed: u64, agents: Option<usize>, mixed: bool) -> sim::Config {
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
        mixed: mixed || std::env::var("MUSTER_SIM_MIXED").is_ok_and(|v| v == "1"),
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

fn run_seeds(seeds: impl Iterator<Item = u64>, agents: Option<usize>, mixed: bool, label: &str) {
    let started = Instant::now();
    let mut failures = Vec::new();
    let mut total = sim::Summary::default();
    let mut n = 0;
    for seed in seeds {
        let cfg = config(seed, agents, mixed);
        let one = Instant::now();
        match run_one(cfg.clone()) {
            Ok(s) => {
                if env_u64("MUSTER_SIM_SEED").is_some()
                    || std::env::var("MUSTER_SIM_VERBOSE").is_ok()
                {
                    println!(
                        "seed {seed}: {} agents, {} tasks, {:.2} s: {}",
                        cfg.agents,
                        cfg.tasks,
                        one.elapsed().as_secs_f64(),
                        totals(&s)
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
        "{label}: {n} seeds in {:.1} s; {} failed {failures:?}; totals: {}",
        started.elapsed().as_secs_f64(),
        failures.len(),
        totals(&total)
    );
    assert!(
        failures.is_empty(),
        "{label}: seeds {failures:?} failed (see stderr for each trace)"
    );
    assert!(
        n == 0 || total.submitted > 0,
        "{label}: nothing was submitted"
    );
    if n >= FAULT_KINDS_MIN_SEEDS {
        let missing: Vec<&str> = sim::FAULT_KINDS
            .iter()
            .copied()
            .filter(|k| total.faults.get(k).copied().unwrap_or(0) == 0)
            .collect();
        assert!(
            missing.is_empty(),
            "{label}: {n} seeds never injected these faults: {missing:?}"
        );
        for class in ["active", "busy_silent", "idle"] {
            assert!(
                total.activity_classes.get(class).copied().unwrap_or(0) > 0,
                "{label}: {n} seeds never classified a run {class}: {:?}",
                total.activity_classes
            );
        }
    }
}

/// The summary line: what was done, what was injected, how it ended.
fn totals(s: &sim::Summary) -> String {
    format!(
        "{} steps, {} virtual s; submitted {}, acknowledged {} (refused for a failed dependency {}), completed {}, failed {}, cancelled {}, requeues {}; hub: {} commits of {} inputs (largest batch {}); {} runs ({} survived a sidecar crash), plans {:?}, attempt outcomes {:?}; {} ticks with two sidecars running one task; {} attempts spawned again after their orphan went unclaimed; activity classified {:?}; faults {:?}",
        s.steps,
        s.virtual_ms / 1000,
        s.submitted,
        s.acked,
        s.refused_submits,
        s.completed,
        s.failed,
        s.cancelled,
        s.requeued,
        s.hub_commits,
        s.hub_inputs,
        s.largest_batch,
        s.runs,
        s.runs_survived,
        s.plans,
        s.outcomes,
        s.overlap_ticks,
        s.orphan_respawns,
        s.activity_classes,
        s.faults,
    )
}

fn add(total: &mut sim::Summary, s: &sim::Summary) {
    total.steps += s.steps;
    total.virtual_ms += s.virtual_ms;
    total.submitted += s.submitted;
    total.acked += s.acked;
    total.refused_submits += s.refused_submits;
    total.completed += s.completed;
    total.failed += s.failed;
    total.cancelled += s.cancelled;
    total.requeued += s.requeued;
    total.hub_commits += s.hub_commits;
    total.hub_inputs += s.hub_inputs;
    total.largest_batch = total.largest_batch.max(s.largest_batch);
    total.runs_survived += s.runs_survived;
    total.runs += s.runs;
    total.overlap_ticks += s.overlap_ticks;
    total.orphan_respawns += s.orphan_respawns;
    for (k, v) in &s.activity_classes {
        *total.activity_classes.entry(k).or_default() += v;
    }
    for (k, v) in &s.plans {
        *total.plans.entry(k).or_default() += v;
    }
    for (k, v) in &s.outcomes {
        *total.outcomes.entry(k).or_default() += v;
    }
    for (k, v) in &s.faults {
        *total.faults.entry(k).or_default() += v;
    }
}

/// Many seeds of small fleets (or one seed, with `MUSTER_SIM_SEED`).
#[test]
fn simulation_seeds() {
    if let Some(seed) = env_u64("MUSTER_SIM_SEED") {
        run_seeds(std::iter::once(seed), None, false, "simulation");
        return;
    }
    let base = env_u64("MUSTER_SIM_BASE_SEED").unwrap_or(DEFAULT_BASE_SEED);
    let count = env_u64("MUSTER_SIM_SEEDS").unwrap_or(DEFAULT_SEEDS);
    run_seeds(base..base + count, None, false, "simulation");
}

/// The mixed workload on a few seeds: operators cancel, agents fail for good,
/// timeouts fail tasks and attempts run out; every task still ends, once.
#[test]
fn simulation_mixed_workload() {
    if env_u64("MUSTER_SIM_SEED").is_some() {
        return;
    }
    let base = env_u64("MUSTER_SIM_BASE_SEED").unwrap_or(DEFAULT_BASE_SEED);
    run_seeds(
        (base..base + MIXED_SEEDS).map(|s| s.wrapping_add(2 << 32)),
        None,
        true,
        "simulation (mixed workload)",
    );
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
        false,
        "simulation (200 agents)",
    );
}

/// The same seed twice gives the same run (the repro recipe depends on it).
#[test]
fn simulation_is_deterministic() {
    let base = env_u64("MUSTER_SIM_SEED").unwrap_or(DEFAULT_BASE_SEED);
    for seed in base..base + 5 {
        let a = sim::run(config(seed, Some(12), false)).map_err(|f| f.to_string());
        let b = sim::run(config(seed, Some(12), false)).map_err(|f| f.to_string());
        match (a, b) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "seed {seed} gave two different runs"),
            (Err(a), Err(b)) => assert_eq!(a, b, "seed {seed} failed two different ways"),
            (a, b) => panic!("seed {seed} passed once and failed once: {a:?} / {b:?}"),
        }
    }
}
