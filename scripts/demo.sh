#!/usr/bin/env bash
# Set everything up and run the main job on this machine: install, start the daemon (unless it is
# running), initialise it (dir pool + root disk), build a busybox image, import it, launch a
# container and exec in it, all through the stock `lxc` client.
# LXD_DIR selects the daemon's state directory (default /var/lib/lxd).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh

export LXD_DIR=${LXD_DIR:-/var/lib/lxd}
LXD=$PWD/.venv/bin/lxd
mkdir -p "$LXD_DIR"
started=""
if ! $LXD waitready --timeout=1 2>/dev/null; then
  echo "== starting the daemon (LXD_DIR=$LXD_DIR, log $LXD_DIR/lxd.log)"
  nohup $LXD --group lxd --verbose --logfile "$LXD_DIR/lxd.log" >/dev/null 2>&1 &
  started=$!
  $LXD waitready --timeout=60
fi
lxc info | head -n 12

if ! lxc storage show default >/dev/null 2>&1; then
  echo "== lxd init --auto"
  $LXD init --auto --storage-backend dir
fi

if ! lxc image info busybox >/dev/null 2>&1; then
  echo "== building and importing a busybox image"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  .venv/bin/lxd-imagebuilder busybox --output "$work/"
  lxc image import "$work"/busybox.tar.gz --alias busybox
fi
lxc image list busybox

name=demo-$(date +%s)
echo "== lxc launch busybox $name"
time lxc launch busybox "$name"
echo "== lxc exec $name -- sh -c 'hostname; id; uname -a; ps'"
lxc exec "$name" -- sh -c 'hostname; id; uname -a; ps'
lxc list
echo "== the container stays; remove it with: lxc delete -f $name"

# The daemon keeps running in the background (its pid is in $LXD_DIR/lxd.lock).
pid=$(head -n 1 "$LXD_DIR/lxd.lock" 2>/dev/null || true)
pid=${pid:-$started}
if [ -n "$started" ]; then
  echo "== the daemon started here keeps running (pid ${pid:-unknown}, log $LXD_DIR/lxd.log)"
else
  echo "== the daemon was already running (pid ${pid:-unknown}) and keeps running"
fi
echo "   stop it and its containers:        LXD_DIR=$LXD_DIR $LXD shutdown"
echo "   stop it, leave containers running: kill ${pid:-<pid>}   (SIGTERM; the next daemon takes them over)"
