#!/usr/bin/env bash
# The project's test command (README: "Run the tests"). Runs every test of
# the workspace -- unit, property, QEMU interop (needs qemu-img/qemu-io on
# PATH), crash-state exploration of both backends with every mutation, the
# 8-thread stress test -- then the loom models under `--cfg loom`.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo test --workspace --locked

# loom models run the production code with loom's primitives; they build in
# their own target directory so the normal build stays cached. Bound: 3
# preemptions (model-checks/LOOM.md says why).
export RUSTFLAGS="--cfg loom"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR_LOOM:-target/loom}"
export LOOM_MAX_PREEMPTIONS="${LOOM_MAX_PREEMPTIONS:-3}"
cargo test --locked --release -p qj-model-checks --test loom_engine
cargo test --locked --release -p qj-journal --test loom_group_commit
