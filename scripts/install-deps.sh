#!/usr/bin/env bash
# Install what the daemon and its tests need on Debian 12, idempotently:
# Debian packages, the lxd group, subordinate ids for root, and the Python venv in .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

DEB_PACKAGES=(
  lxc lxc-dev pkg-config gcc python3-dev python3-venv lvm2  # lvm2: the lvm driver (on hosts with device-mapper)
  busybox-static squashfs-tools xz-utils zstd bzip2 rsync btrfs-progs dnsmasq-base nftables python3-nftables  # nftables: the daemon's firewall tables, through libnftables
  criu uidmap lxd-client python3-pylxd debootstrap curl iproute2 systemd
  ansible  # the third-party client tests drive the daemon with community.general's lxd plugins
  prometheus  # tests/integration/test_metrics_prometheus.py: a real Prometheus scrapes /1.0/metrics
)

missing=()
for p in "${DEB_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "Installing Debian packages: ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

getent group lxd >/dev/null || groupadd --system lxd

# Unprivileged containers map root to a range of subordinate ids (LXD's default range).
grep -q '^root:' /etc/subuid 2>/dev/null || echo 'root:1000000:1000000000' >> /etc/subuid
grep -q '^root:' /etc/subgid 2>/dev/null || echo 'root:1000000:1000000000' >> /etc/subgid

# The daemon runs on Debian's Python 3.11, in a venv next to the code.
PY=/usr/bin/python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# Debian's nftables bindings (ctypes over libnftables, no PyPI release): visible in the venv.
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
ln -sfn /usr/lib/python3/dist-packages/nftables "$site/nftables"
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -e "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[test]'
  rm -f .venv/.installed-*
  touch "$stamp"
fi
echo "Dependencies ready: $(.venv/bin/python --version), $(.venv/bin/lxd --version 2>/dev/null || echo lxd)"
