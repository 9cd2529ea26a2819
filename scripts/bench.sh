#!/usr/bin/env bash
# Runs the benchmarks of docs/benchmarks.md. Each prints its figures and the command that
# reproduces it. Usage: scripts/bench.sh [replay|idle|consume|ingest|publish|fanout|metrics|storm|membership]… (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace
BIN=./target/release/foldercast-bench
which=("$@")
((${#which[@]})) || which=(replay idle consume ingest publish fanout metrics storm membership)
needs_servers=0
for b in "${which[@]}"; do case "$b" in consume|ingest|publish|fanout|metrics|storm) needs_servers=1 ;; esac; done
if ((needs_servers)); then source scripts/servers.sh; fi
ulimit -n 20000
for b in "${which[@]}"; do
  case "$b" in
    replay)  $BIN replay --events 1000000 --members 20 --depth 8 --spaces 1000 ;;
    idle)    $BIN idle --connections 19000 --users 1000 ;;
    consume) $BIN consume --brokers "$FOLDERCAST_TEST_KAFKA" --redis "$FOLDERCAST_TEST_REDIS" --events 100000 --members 20 --spaces 1000 --rounds 5 --user-rate 0
             $BIN consume --brokers "$FOLDERCAST_TEST_KAFKA" --redis "$FOLDERCAST_TEST_REDIS" --events 100000 --members 20 --spaces 1000 --rounds 5 --user-rate 20 --user-burst 5 ;;
    ingest)  $BIN ingest --brokers "$FOLDERCAST_TEST_KAFKA" --nats "$FOLDERCAST_TEST_NATS" --redis "$FOLDERCAST_TEST_REDIS" --events 20000 --members 20 --spaces 100 --rounds 5 --burst 10000 ;;
    publish) $BIN publish --redis "$FOLDERCAST_TEST_REDIS" --users 100000 --connected 10000 ;;
    fanout)  $BIN fanout --redis "$FOLDERCAST_TEST_REDIS" --connections 1000 --rate 1000 --seconds 10 --rounds 3 ;;
    metrics) $BIN metrics --redis "$FOLDERCAST_TEST_REDIS" --connections 500 --paced-rate 20000 --seconds 10 --rounds 5 ;;
    storm)   $BIN storm --redis "$FOLDERCAST_TEST_REDIS" --connections 10000 --missed 10 ;;
    membership) $BIN membership --events 500000 --spaces 1000 --members 20 --paced-events 100000 --paced-seconds 10 --short-ttl 2s ;;
    *) echo "unknown benchmark $b" >&2; exit 2 ;;
  esac
done
