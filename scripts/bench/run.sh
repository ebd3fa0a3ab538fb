#!/usr/bin/env bash
# Benchmark our daemon against LXD 5.0.2 (Debian's `lxd`) in the same run.
#   scripts/bench/run.sh [--only api|images|containers|...|projects] [--quick] [more: --help]
# Installs Debian's lxd if needed (never started as a service; the harness starts it in a network
# namespace of its own with a temporary LXD_DIR), runs the suites, prints a markdown table and
# writes bench-results/<timestamp>.json. Everything the run creates lives under one
# /tmp/lxdbench-XXXXXX directory and is removed on exit, also after a failure or an interrupt.
set -euo pipefail
cd "$(dirname "$0")/../.."

if [ "$(id -u)" != 0 ]; then
  echo "run.sh needs root (it starts LXD and containers)" >&2
  exit 2
fi
if [ ! -x .venv/bin/python ] || [ ! -x .venv/bin/lxd ]; then
  bash scripts/install-deps.sh
fi
need=()
for p in lxd lxd-client busybox-static util-linux iproute2; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "Installing Debian packages for the benchmarks: ${need[*]}"
  apt-get update -q
  # policy-rc.d (if present) keeps the package from starting a system LXD; we never use one.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o DPkg::Lock::Timeout=300 \
    --no-install-recommends "${need[@]}"
fi

LXDBENCH_WORKDIR=$(mktemp -d /tmp/lxdbench-XXXXXX)
export LXDBENCH_WORKDIR
chmod 711 "$LXDBENCH_WORKDIR"
cleanup() {
  # the harness cleans up after itself; this catches what a killed harness left behind
  if [ -d "$LXDBENCH_WORKDIR" ]; then
    .venv/bin/python scripts/bench/daemons.py || true
  fi
}
trap cleanup EXIT

# The harness runs in the background so that a TERM or INT to this script reaches it at once (it
# then deletes its containers and stops both daemons before exiting).
.venv/bin/python scripts/bench/harness.py "$@" &
child=$!
trap 'kill -TERM $child 2>/dev/null; wait $child; exit 143' TERM
trap 'kill -TERM $child 2>/dev/null; wait $child; exit 130' INT
rc=0
wait $child || rc=$?
exit $rc
