//! `qj`: the qjournal command line.
fn main() {}
