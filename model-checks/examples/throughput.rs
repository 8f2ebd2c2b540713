//! Measures crash states checked per second on in-memory images.
//!
//! `cargo run --release -p qj-model-checks --example throughput [BACKEND] [STATES] [SIZE_MIB] [MUTATION]`
//!
//! BACKEND is any name `qj crash --backend` takes: the qcow2 engine's
//! (`ordered`, `journal`, ...) or the built-in proof targets (`raw`, ...).
//! With a mutation, prints the violations found (with their reproducers).
//! The rate printed is of wall time; run it under `/usr/bin/time` for the
//! CPU time on a shared machine.

use std::time::Instant;

use qj_model_checks::{crash_target, explore, ExploreConfig, Summary, WorkloadConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let backend = args.next().unwrap_or_else(|| "raw".to_string());
    let states: u64 = args.next().map_or(Ok(50_000), |s| s.parse())?;
    let size_mib: u64 = args.next().map_or(Ok(2), |s| s.parse())?;
    let mutation = args.next();
    let mut workload = WorkloadConfig::preset("mixed")?;
    workload.size_bytes = size_mib << 20;
    workload.size_max_bytes = 2 * workload.size_bytes;
    workload.ops_per_thread = 400;
    let mut config = ExploreConfig::new(workload);
    config.states_budget = states;
    config.shrink = mutation.is_some();
    let started = Instant::now();
    let report = explore(crash_target(&backend, mutation.as_deref())?, &config, None)?;
    for violation in &report.violations {
        println!("{violation}");
    }
    let summary = Summary {
        rows: vec![report.summary.clone()],
    };
    print!("{summary}");
    println!(
        "{} states in {:.2}s: {:.0} states/s on {size_mib} MiB images ({} violations)",
        report.summary.states_explored,
        started.elapsed().as_secs_f64(),
        report.summary.states_per_second(),
        report.violations.len()
    );
    Ok(())
}
