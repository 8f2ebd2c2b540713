//! Writes one SVG chart per workload from `qj bench --output json`, or one
//! per fio job and cache mode from `benches/nbd-bench.sh -o ROWS.json`:
//! `cargo run -p qj-benches --example plot -- BENCH.json OUT_DIR`.
fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [input, out_dir] = args.as_slice() else {
        eprintln!("usage: plot BENCH.json OUT_DIR");
        std::process::exit(2);
    };
    let text = std::fs::read_to_string(input).unwrap_or_else(|e| {
        eprintln!("plot: reading {input}: {e}");
        std::process::exit(1)
    });
    std::fs::create_dir_all(out_dir).expect("creating the output directory");
    // nbd-bench rows say how they were driven (`via`).
    if text.contains("\"via\"") {
        let charts = qj_benches::plot::nbd_charts(&text).unwrap_or_else(|e| {
            eprintln!("plot: {input}: {e}");
            std::process::exit(1)
        });
        for (name, svg) in charts {
            let path = std::path::Path::new(out_dir).join(name);
            std::fs::write(&path, svg).expect("writing the chart");
            println!("{}", path.display());
        }
        return;
    }
    let rows: Vec<qj_benches::BenchRow> = serde_json::from_str(&text).unwrap_or_else(|e| {
        eprintln!("plot: {input} is not qj bench JSON: {e}");
        std::process::exit(1)
    });
    for w in qj_benches::Workload::ALL
        .iter()
        .chain(&qj_benches::Workload::OPT_IN)
    {
        let title = format!("{w}: operations per second (higher is better)");
        if let Some(svg) = qj_benches::plot::workload_chart(&rows, w.name(), &title) {
            let path = std::path::Path::new(out_dir).join(format!("{}.svg", w.name()));
            std::fs::write(&path, svg).expect("writing the chart");
            println!("{}", path.display());
        }
    }
}
