#!/usr/bin/env bash
# Runs the benchmarks in docs/benchmarks.md; each prints its figures and the command that reproduces it.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release
ulimit -n 20000
./target/release/foldercast bench replay --events 1000000 --members 20 --depth 8 --spaces 1000
./target/release/foldercast bench idle --connections 19000 --users 1000
