//! `cargo run --release -p qj-benches --example compare`: the comparison
//! table without the CLI (the CLI's `qj bench` is the supported front end).
fn main() {
    let opts = qj_benches::BenchOptions::default();
    match qj_benches::run_bench(&opts, &|p| eprintln!("[{}/{}] {}", p.done, p.total, p.label)) {
        Ok(rows) => print!("{}", qj_benches::render_table(&rows)),
        Err(e) => {
            eprintln!("compare: {e}");
            std::process::exit(1);
        }
    }
}
