#!/usr/bin/env bash
# Render the systemd units in systemd/ for this checkout and install them.
#
#   scripts/install-systemd.sh              install into /etc/systemd/system, reload, enable the socket
#   scripts/install-systemd.sh DIR          only render the units into DIR (for checks and packaging)
#
# The units run the daemon from this repository's virtualenv (created by scripts/install-deps.sh).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
DEST="${1:-/etc/systemd/system}"
SYSTEM_DEST=/etc/systemd/system

case "$REPO" in
  *[[:space:]\'\"\;\\]*) echo "error: the repository path must not contain spaces or quotes: $REPO" >&2; exit 1 ;;
esac
if [ ! -x "$REPO/.venv/bin/lxd" ]; then
  echo "error: $REPO/.venv/bin/lxd is missing; run scripts/install-deps.sh first" >&2
  exit 1
fi

mkdir -p "$DEST"
for unit in lxd.socket lxd.service lxd-containers.service; do
  tmp="$(mktemp "$DEST/.$unit.XXXXXX")"
  sed "s|@REPO@|$REPO|g" "$REPO/systemd/$unit" > "$tmp"
  chmod 0644 "$tmp"
  mv -f "$tmp" "$DEST/$unit"
done
echo "rendered lxd.socket, lxd.service and lxd-containers.service into $DEST"

if [ "$DEST" = "$SYSTEM_DEST" ]; then
  getent group lxd >/dev/null || groupadd --system lxd
  if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl enable lxd.socket lxd-containers.service
    echo "enabled lxd.socket and lxd-containers.service; start with: systemctl start lxd.socket"
  else
    echo "systemd is not running here; the units take effect at the next boot"
  fi
fi
