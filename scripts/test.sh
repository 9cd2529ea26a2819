#!/usr/bin/env bash
# The whole test suite, on a fresh machine that has only the Rust toolchain.
#
# Installs what the tests need (Debian's chromium for the demo-page test), then runs every test
# in release mode (the end-to-end tests drive the release binary). Nothing is skipped: a missing
# dependency fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."

setup_start=$(date +%s)
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if ((${#missing[@]})); then
  if [ "$(id -u)" != 0 ]; then
    echo "test.sh: missing ${missing[*]} and not root: install them (apt-get install ${missing[*]})" >&2
    exit 1
  fi
  echo "test.sh: installing ${missing[*]}…"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
FOLDERCAST_CHROMIUM="$(command -v chromium)"
export FOLDERCAST_CHROMIUM
echo "test.sh: setup took $(( $(date +%s) - setup_start )) s"

cargo test --release --all-targets "$@"
