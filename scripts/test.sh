#!/usr/bin/env bash
# The whole test suite, on a fresh machine that has only the Rust toolchain.
#
# 1. Installs what the tests need: Debian's redis-server, redis-tools and chromium, and the
#    tansu Kafka-protocol broker (built once from crates.io, then cached by version).
# 2. Starts, on free loopback ports in a temporary directory: a standalone Redis, a 3-node Redis
#    Cluster and the broker (scripts/servers.sh). Their addresses reach the tests through
#    FOLDERCAST_TEST_* variables.
# 3. Runs every test (release mode: the end-to-end tests drive the release binary).
# 4. Stops everything it started, whatever happened.
#
# Nothing is skipped: a server that cannot be started fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/servers.sh

cargo test --release --all-targets "$@"
