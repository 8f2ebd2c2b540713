//! `cargo run --release -p qj-benches --example compare [WORKLOAD...]`: the
//! comparison table without the CLI (`qj bench` is the supported front end).
fn main() {
    let mut opts = qj_benches::BenchOptions::default();
    let named: Result<Vec<_>, _> = std::env::args()
        .skip(1)
        .map(|a| qj_benches::Workload::parse(&a))
        .collect();
    match named {
        Ok(w) if !w.is_empty() => {
            opts.targets = qj_benches::TargetKind::defaults_for(&w);
            opts.workloads = w;
        }
        Ok(_) => {}
        Err(e) => {
            eprintln!("compare: {e}");
            std::process::exit(2);
        }
    }
    match qj_benches::run_bench(&opts, &|p| {
        eprintln!("[{}/{}] {}", p.done, p.total, p.label)
    }) {
        Ok(rows) => print!("{}", qj_benches::render_table(&rows)),
        Err(e) => {
            eprintln!("compare: {e}");
            std::process::exit(1);
        }
    }
}
