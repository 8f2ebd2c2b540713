#!/usr/bin/env bash
# The loom models (second half of the README's test command): they run the
# production code with loom's primitives, built in their own target
# directory so the normal build stays cached. Bound: 3 preemptions
# (model-checks/LOOM.md says why).
set -euo pipefail
cd "$(dirname "$0")/.."
export RUSTFLAGS="--cfg loom"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR_LOOM:-target/loom}"
export LOOM_MAX_PREEMPTIONS="${LOOM_MAX_PREEMPTIONS:-3}"
cargo test --locked --release -p qj-model-checks --test loom_engine
cargo test --locked --release -p qj-journal --test loom_group_commit
cargo test --locked --release -p qj-journal --test loom_space
