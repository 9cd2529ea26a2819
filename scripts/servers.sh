#!/usr/bin/env bash
# Sourced by test.sh and bench.sh: installs and starts the servers foldercast needs, on free
# loopback ports in a temporary directory, and stops them on exit (trap).
#   FOLDERCAST_TEST_REDIS          redis://127.0.0.1:PORT (standalone)
#   FOLDERCAST_TEST_REDIS_CLUSTER  redis://…,redis://…,redis://… (3 nodes, no replicas)
#   FOLDERCAST_TEST_KAFKA          127.0.0.1:PORT (tansu, sqlite storage)
#   FOLDERCAST_TEST_NATS           nats://127.0.0.1:PORT (nats-server with JetStream)
#   FOLDERCAST_CHROMIUM, FOLDERCAST_COMPOSE_SCHEMA, FOLDERCAST_TEST_WEB_CLIENT
# Needs: set -euo pipefail in the caller.

TANSU_VERSION=0.6.0
CACHE="${FOLDERCAST_CACHE:-$HOME/.cache/foldercast}"
TANSU_ROOT="$CACHE/tansu-$TANSU_VERSION"
TANSU="$TANSU_ROOT/bin/tansu"
setup_start=$(date +%s)
log() { printf 'foldercast servers: %s\n' "$*" >&2; }

# --- install -----------------------------------------------------------------------------
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
# oCIS's event bus: Debian's nats-server (2.9), with JetStream.
command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ] || missing+=(nats-server)
if ((${#missing[@]})); then
  if [ "$(id -u)" != 0 ]; then
    log "missing ${missing[*]} and not root: install them (apt-get install ${missing[*]})"
    exit 1
  fi
  log "installing ${missing[*]}…"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if [ ! -x "$TANSU" ]; then
  log "building tansu $TANSU_VERSION (once; about 10-13 min on 2 cores)…"
  cargo install tansu --locked --version "$TANSU_VERSION" --features dynostore,libsql --root "$TANSU_ROOT" >&2
fi
FOLDERCAST_CHROMIUM="$(command -v chromium)"
export FOLDERCAST_CHROMIUM
# The Compose Specification's JSON Schema ships in Debian's docker-compose package: take the file,
# install nothing.
COMPOSE_SCHEMA="$CACHE/compose-spec/compose_spec.json"
if [ ! -f "$COMPOSE_SCHEMA" ]; then
  mkdir -p "$CACHE/compose-spec"
  ( cd "$CACHE/compose-spec" && apt-get download docker-compose >/dev/null 2>&1 \
      || { apt-get update -qq && apt-get download docker-compose >/dev/null; } )
  dpkg-deb -x "$CACHE"/compose-spec/docker-compose_*.deb "$CACHE/compose-spec/pkg"
  cp "$CACHE/compose-spec/pkg/usr/lib/python3/dist-packages/compose/config/compose_spec.json" "$COMPOSE_SCHEMA"
fi
export FOLDERCAST_COMPOSE_SCHEMA="$COMPOSE_SCHEMA"
# ownCloud Web's own SSE client, the published npm package, unchanged: the gateway's oCIS route
# is tested with it. Pinned; the tarball's checksum is npm's own (npm pack verifies it).
WEB_CLIENT_VERSION=12.5.0
WEB_CLIENT="$CACHE/npm/web-client-$WEB_CLIENT_VERSION/package/dist/web-client/sse.js"
if [ ! -f "$WEB_CLIENT" ]; then
  command -v npm >/dev/null || { apt-get update -qq && apt-get install -y -qq npm >/dev/null; }
  mkdir -p "$CACHE/npm/web-client-$WEB_CLIENT_VERSION"
  ( cd "$CACHE/npm/web-client-$WEB_CLIENT_VERSION" \
      && npm pack --silent "@ownclouders/web-client@$WEB_CLIENT_VERSION" >/dev/null \
      && tar xzf ownclouders-web-client-"$WEB_CLIENT_VERSION".tgz )
fi
export FOLDERCAST_TEST_WEB_CLIENT="$WEB_CLIENT"

# --- servers -----------------------------------------------------------------------------
WORK="$(mktemp -d -t foldercast-test.XXXXXX)"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pidfile in "$WORK"/redis-*/redis.pid; do
    [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
  done
  sleep 0.2
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

# A port nobody listens on (checked by connecting; the kernel's ephemeral range is avoided).
used_ports=" "
free_port() {
  local p
  while :; do
    p=$((20000 + RANDOM % 12000))
    case "$used_ports" in *" $p "*) continue ;; esac
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      used_ports+="$p "
      echo "$p"
      return
    fi
  done
}

wait_for() { # description, command…
  local what=$1; shift
  for _ in $(seq 1 100); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  log "$what did not come up"
  return 1
}

start_redis_on() { # port, extra args…
  local port=$1; shift
  local dir="$WORK/redis-$port"
  mkdir -p "$dir"
  redis-server --bind 127.0.0.1 --port "$port" --save '' --appendonly no --dir "$dir" \
    --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" "$@" || return 1
  for _ in $(seq 1 50); do
    redis-cli -p "$port" ping >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  log "redis on $port did not come up; its log:"
  tail -n 5 "$dir/redis.log" >&2 || true
  return 1
}

# Starts redis on a free port (another one if that fails) and prints the port.
start_redis() { # extra args…
  local port
  for _ in 1 2 3; do
    port=$(free_port)
    if start_redis_on "$port" "$@" >&2; then echo "$port"; return 0; fi
  done
  log "could not start redis-server"
  return 1
}

REDIS_PORT=$(start_redis)
export FOLDERCAST_TEST_REDIS="redis://127.0.0.1:$REDIS_PORT"

CLUSTER_PORTS=()
for _ in 1 2 3; do
  CLUSTER_PORTS+=("$(start_redis --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 5000)")
done
redis-cli --cluster create "${CLUSTER_PORTS[@]/#/127.0.0.1:}" --cluster-replicas 0 --cluster-yes >/dev/null
cluster_ok() { for p in "${CLUSTER_PORTS[@]}"; do redis-cli -p "$p" cluster info | grep -q 'cluster_state:ok' || return 1; done; }
wait_for "the Redis Cluster" cluster_ok
FOLDERCAST_TEST_REDIS_CLUSTER=$(printf 'redis://127.0.0.1:%s,' "${CLUSTER_PORTS[@]}")
export FOLDERCAST_TEST_REDIS_CLUSTER="${FOLDERCAST_TEST_REDIS_CLUSTER%,}"

KAFKA_PORT=$(free_port)
mkdir -p "$WORK/kafka"
( cd "$WORK/kafka" && exec "$TANSU" broker --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" --storage-engine "sqlite://tansu.db" \
    >"$WORK/kafka/broker.log" 2>&1 ) &
PIDS+=($!)
wait_for "the tansu broker on $KAFKA_PORT" bash -c "exec 3<>/dev/tcp/127.0.0.1/$KAFKA_PORT"
export FOLDERCAST_TEST_KAFKA="127.0.0.1:$KAFKA_PORT"

# NATS with JetStream, as oCIS runs it (`-p -1` would pick a port too, but a free one we chose
# keeps the log and the URL simple). A taken port is tried again on another.
NATS_BIN=$(command -v nats-server || echo /usr/sbin/nats-server)
for _ in 1 2 3; do
  NATS_PORT=$(free_port)
  mkdir -p "$WORK/nats-$NATS_PORT"
  "$NATS_BIN" -js -sd "$WORK/nats-$NATS_PORT" -a 127.0.0.1 -p "$NATS_PORT" \
    >"$WORK/nats-$NATS_PORT/nats.log" 2>&1 &
  NATS_PID=$!
  PIDS+=("$NATS_PID")
  if wait_for "nats-server on $NATS_PORT" bash -c "kill -0 $NATS_PID && exec 3<>/dev/tcp/127.0.0.1/$NATS_PORT"; then
    break
  fi
  tail -n 5 "$WORK/nats-$NATS_PORT/nats.log" >&2 || true
  NATS_PORT=""
done
[ -n "$NATS_PORT" ] || { log "could not start nats-server"; exit 1; }
export FOLDERCAST_TEST_NATS="nats://127.0.0.1:$NATS_PORT"

log "setup took $(( $(date +%s) - setup_start )) s: redis $FOLDERCAST_TEST_REDIS, cluster $FOLDERCAST_TEST_REDIS_CLUSTER, kafka $FOLDERCAST_TEST_KAFKA, nats $FOLDERCAST_TEST_NATS"

