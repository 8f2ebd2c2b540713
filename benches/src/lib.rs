//! Comparison workloads shared by `qj bench` and the criterion benchmarks.
