#!/usr/bin/env bash
# Set everything up and run the main job on this machine: install, start the daemon (if it is not
# running yet), initialise it, and show it to the stock `lxc` client.
# LXD_DIR selects the daemon's state directory (default /var/lib/lxd).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh

export LXD_DIR=${LXD_DIR:-/var/lib/lxd}
LXD=.venv/bin/lxd
mkdir -p "$LXD_DIR"
if ! $LXD waitready --timeout=1 2>/dev/null; then
  echo "Starting the daemon (LXD_DIR=$LXD_DIR, log $LXD_DIR/lxd.log)"
  nohup $LXD --group lxd --verbose --logfile "$LXD_DIR/lxd.log" >/dev/null 2>&1 &
  $LXD waitready --timeout=60
fi

lxc info
