#!/usr/bin/env bash
# The project's test command (README: "Run the tests"). Builds the
# workspace once and runs every test, including the QEMU interop tests
# (which need qemu-img and qemu-io on PATH) and a bounded crash exploration.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace --locked
