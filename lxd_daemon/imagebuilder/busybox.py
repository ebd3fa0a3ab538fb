"""The busybox image: a tiny system container built in about a second from Debian's busybox-static.

The root filesystem holds the static /bin/busybox, a relative symlink for every applet it
provides (``busybox --list-full``), a minimal /etc, and /sbin/init, a busybox sh script that
runs as PID 1:

* it brings up the loopback (and DHCP on other interfaces, if any) through /etc/init.d/rcS, then
  sleeps, reaping orphans;
* SIGPWR (liblxc's halt signal: ``lxc stop``, ``lxc-stop``), SIGTERM, SIGUSR1 (``halt``) and
  SIGUSR2 (``poweroff``) stop every process (SIGTERM, up to half a second's grace, SIGKILL) and
  exit 0, so the container stops cleanly at once;
* SIGINT (liblxc's reboot signal: ``lxc restart``, ``lxc-stop -r``) does the same and then
  calls reboot(2), which in a container's PID namespace tells liblxc to start it again.
  ``reboot`` inside the container (without -f) sends SIGINT to PID 1 accordingly.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from lxd_daemon.imagebuilder.pack import (
    DEFAULT_TEMPLATES,
    BuildError,
    BuildResult,
    TarOptions,
    build_time,
    lxd_architecture,
    make_metadata,
    pack_image,
    planned_outputs,
    serial,
)

BUSYBOX = "/bin/busybox"

INIT = r"""#!/bin/sh
# PID 1 of the lxd-imagebuilder busybox image.
#   SIGPWR, SIGTERM, SIGUSR1, SIGUSR2: stop every process, then exit (the container stops).
#   SIGINT: stop every process, then reboot(2) (liblxc starts the container again).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root

stop_all() {
	trap '' PWR TERM USR1 USR2 INT HUP
	kill -TERM -1 2>/dev/null
	n=0
	# kill -0 -1 succeeds while any other process (or unreaped zombie) exists;
	# waiting on a short sleep reaps the exited ones.
	while kill -0 -1 2>/dev/null && [ "$n" -lt 10 ]; do
		sleep 0.05 &
		wait $! 2>/dev/null
		n=$((n + 1))
	done
	kill -KILL -1 2>/dev/null
	sync
}
halt_now() { stop_all; exit 0; }
reboot_now() { stop_all; /bin/busybox reboot -f; exit 0; }

trap halt_now PWR TERM USR1 USR2
trap reboot_now INT
trap '' HUP

[ -x /etc/init.d/rcS ] && /etc/init.d/rcS

# Sleep for ever; "wait" returns to run a trap as soon as a signal arrives, and reaps
# every child that exits (orphans are re-parented to PID 1).
while :; do
	sleep 2147483647 &
	wait $!
done
"""

RCS = r"""#!/bin/sh
# Boot tasks, run once by /sbin/init.
[ -e /proc/self ] || mount -t proc proc /proc 2>/dev/null
[ -n "$(hostname 2>/dev/null)" ] || { [ -s /etc/hostname ] && hostname -F /etc/hostname; }
ip link set lo up 2>/dev/null
for dev in /sys/class/net/*; do
	ifc=${dev##*/}
	case "$ifc" in lo|'*') continue ;; esac
	ip link set "$ifc" up 2>/dev/null
	# An interface that came configured (a routed or ipvlan nic: its addresses are set by the
	# host) keeps what it has.
	case "$(ip -4 addr show dev "$ifc" 2>/dev/null)" in *inet\ *) continue ;; esac
	# One client per interface, all at once and in the background (an interface without a DHCP
	# server holds up neither the boot nor the others): it asks three times a second apart, then
	# again every 5 s, and renews. -S: log to syslog, not the console. IPv6 comes from the kernel
	# (SLAAC) as the interface is up.
	udhcpc -f -T 1 -A 5 -S -i "$ifc" -p "/run/udhcpc.$ifc.pid" -s /usr/share/udhcpc/default.script \
		>/dev/null 2>&1 </dev/null &
done
exit 0
"""

REBOOT = r"""#!/bin/sh
# reboot: ask init to restart the container (SIGINT); "reboot -f" calls reboot(2) at once.
for a in "$@"; do
	case "$a" in -f|--force|-*f*) exec /bin/busybox reboot "$@" ;; esac
done
exec /bin/busybox kill -INT 1
"""

UDHCPC_SCRIPT = r"""#!/bin/sh
# udhcpc event handler: configure the interface, routes and /etc/resolv.conf.
[ -n "$1" ] || exit 1
case "$1" in
deconfig)
	# only the address this client set goes (others were set by hand or by the host)
	[ -s "/run/udhcpc.$interface.addr" ] && ip addr del "$(cat "/run/udhcpc.$interface.addr")" dev "$interface" 2>/dev/null
	rm -f "/run/udhcpc.$interface.addr"
	ip link set "$interface" up
	;;
bound|renew)
	new="$ip/${mask:-24}"
	old=$(cat "/run/udhcpc.$interface.addr" 2>/dev/null)
	[ -n "$old" ] && [ "$old" != "$new" ] && ip addr del "$old" dev "$interface" 2>/dev/null
	ip addr replace "$new" ${broadcast:+broadcast "$broadcast"} dev "$interface"
	echo "$new" > "/run/udhcpc.$interface.addr"
	if [ -n "$router" ]; then
		while ip -4 route del default dev "$interface" 2>/dev/null; do :; done
		for r in $router; do ip route add default via "$r" dev "$interface"; break; done
	fi
	if [ -n "$dns" ]; then
		{
			[ -n "$domain" ] && echo "search $domain"
			for s in $dns; do echo "nameserver $s"; done
		} > /etc/resolv.conf.new && mv /etc/resolv.conf.new /etc/resolv.conf
	fi
	;;
esac
exit 0
"""

PASSWD = """root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/bin/false
bin:x:2:2:bin:/bin:/bin/false
sys:x:3:3:sys:/dev:/bin/false
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
"""
GROUP = """root:x:0:
daemon:x:1:
bin:x:2:
sys:x:3:
adm:x:4:
tty:x:5:
disk:x:6:
wheel:x:10:root
shadow:x:42:
utmp:x:43:
users:x:100:
nogroup:x:65534:
"""
SHADOW = """root:*::0:99999:7:::
daemon:*::0:99999:7:::
bin:*::0:99999:7:::
sys:*::0:99999:7:::
nobody:*::0:99999:7:::
"""
PROFILE = r"""export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export HOME=${HOME:-/root}
if [ "$(id -u)" = 0 ]; then PS1='\h:\w# '; else PS1='\h:\w$ '; fi
export PS1
"""
HOSTS = """127.0.0.1\tlocalhost
127.0.1.1\tbusybox

::1\tlocalhost ip6-localhost ip6-loopback
ff02::1\tip6-allnodes
ff02::2\tip6-allrouters
"""

_DIRS = {
    "bin": 0o755, "sbin": 0o755, "usr": 0o755, "usr/bin": 0o755, "usr/sbin": 0o755,
    "usr/share": 0o755, "usr/share/udhcpc": 0o755,
    "etc": 0o755, "etc/init.d": 0o755, "etc/network": 0o755,
    "dev": 0o755, "proc": 0o555, "sys": 0o555, "run": 0o755, "tmp": 0o1777,
    "var": 0o755, "var/log": 0o755, "var/tmp": 0o1777, "var/spool": 0o755, "var/lib": 0o755,
    "root": 0o700, "home": 0o755, "mnt": 0o755, "media": 0o755, "opt": 0o755, "srv": 0o755,
    "lib": 0o755,
}


def busybox_version(busybox: str = BUSYBOX) -> str:
    """The version of a busybox binary, e.g. 1.35.0."""
    try:
        r = subprocess.run([busybox], capture_output=True, text=True, timeout=10)
    except FileNotFoundError:
        raise BuildError(f"{busybox} not found: install Debian's busybox-static") from None
    m = re.search(r"BusyBox v(\d+(?:\.\d+)+)", r.stdout + r.stderr)
    if not m:
        raise BuildError(f"cannot tell the version of {busybox}")
    return m.group(1)


def busybox_applets(busybox: str = BUSYBOX) -> list[str]:
    """Applet paths relative to / (e.g. ``usr/bin/sha256sum``) as ``busybox --list-full`` gives."""
    r = subprocess.run([busybox, "--list-full"], capture_output=True, text=True, timeout=10)
    if r.returncode != 0:
        raise BuildError(f"{busybox} --list-full failed: {r.stderr.strip()}")
    out = []
    for line in r.stdout.split():
        line = line.strip().lstrip("/")
        if not line or "/" not in line or ".." in line.split("/"):
            continue  # top-level entries such as linuxrc are not wanted
        out.append(line)
    return sorted(set(out))


def _check_static(busybox: str) -> None:
    with open(busybox, "rb") as f:
        head = f.read(4096)
    if head[:4] != b"\x7fELF":
        raise BuildError(f"{busybox} is not an ELF binary")
    if b"/lib64/ld-linux" in head or b"/lib/ld-linux" in head or b"ld-linux" in head:
        raise BuildError(f"{busybox} is dynamically linked: install Debian's busybox-static")


def _write(root: Path, rel: str, content: str, mode: int = 0o644) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(content)
    os.chmod(p, mode)


def make_rootfs(root: Path, *, busybox: str = BUSYBOX, hostname: str = "busybox") -> list[str]:
    """Populate the empty directory ``root`` with the busybox root filesystem.

    Returns the applet paths linked. Files are owned by the caller (root when run as root).
    """
    root = Path(root)
    busybox = os.path.realpath(busybox)
    if not os.path.isfile(busybox):
        raise BuildError(f"{busybox} not found: install Debian's busybox-static")
    _check_static(busybox)
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)
    for d, mode in _DIRS.items():
        (root / d).mkdir(parents=True, exist_ok=True)
        os.chmod(root / d, mode)
    shutil.copyfile(busybox, root / "bin/busybox")
    os.chmod(root / "bin/busybox", 0o755)

    own = {"sbin/init", "sbin/reboot", "bin/busybox"}
    applets = busybox_applets(busybox)
    for rel in applets:
        if rel in own:
            continue
        link = root / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.exists() or link.is_symlink():
            continue
        target = os.path.relpath("bin/busybox", start=os.path.dirname(rel) or ".")
        os.symlink(target, link)
    os.symlink("../run", root / "var/run")

    _write(root, "sbin/init", INIT, 0o755)
    _write(root, "sbin/reboot", REBOOT, 0o755)
    _write(root, "etc/init.d/rcS", RCS, 0o755)
    _write(root, "usr/share/udhcpc/default.script", UDHCPC_SCRIPT, 0o755)
    _write(root, "etc/passwd", PASSWD)
    _write(root, "etc/group", GROUP)
    _write(root, "etc/shadow", SHADOW, 0o600)
    _write(root, "etc/hostname", hostname + "\n")
    _write(root, "etc/hosts", HOSTS.replace("busybox", hostname))
    _write(root, "etc/profile", PROFILE)
    _write(root, "etc/shells", "/bin/sh\n/bin/ash\n")
    _write(root, "etc/fstab", "# <file system> <mount point> <type> <options> <dump> <pass>\n")
    _write(root, "etc/nsswitch.conf", "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n")
    version = busybox_version(busybox)
    _write(root, "etc/os-release",
           'NAME="BusyBox"\nID=busybox\n'
           f'VERSION_ID="{version}"\nPRETTY_NAME="BusyBox {version}"\n'
           'HOME_URL="https://busybox.net/"\n')
    _write(root, "etc/network/interfaces",
           "auto lo\niface lo inet loopback\n\n# Other interfaces get DHCP from /etc/init.d/rcS.\n")
    return applets


def build_busybox(
    out_dir: Path | None = None,
    *,
    fmt: str = "unified",
    compression: str = "gzip",
    output: str | Path | None = None,
    name: str = "busybox",
    rootfs_format: str = "squashfs",
    squashfs_compression: str | None = None,
    busybox: str = BUSYBOX,
    expiry_days: int | None = None,
) -> BuildResult:
    """Build the busybox image into ``out_dir`` (or the file ``output``) and return what was made.

    ``fmt`` is "unified" (one tarball) or "split" (metadata tarball + squashfs or tar rootfs).
    ``result.paths`` is what ``lxc image import`` takes, ``result.fingerprint`` its fingerprint.
    """
    finals = planned_outputs(out_dir, output, name, fmt, compression, rootfs_format)
    version = busybox_version(busybox)
    arch = lxd_architecture()
    ts = build_time()
    meta = make_metadata(
        architecture=arch,
        creation_date=ts,
        expiry_date=ts + expiry_days * 86400 if expiry_days else None,
        properties={
            "os": "busybox",
            "release": version,
            "description": f"BusyBox {version} {arch} ({serial(ts)})",
            "architecture": arch,
            "variant": "default",
            "serial": serial(ts),
        },
    )
    with tempfile.TemporaryDirectory(prefix="lxd-imagebuilder-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        make_rootfs(rootfs, busybox=busybox)
        opts = TarOptions(owner="root", mtime_clamp=ts, xattrs=False)
        return pack_image(rootfs, finals, meta, DEFAULT_TEMPLATES, fmt=fmt, compression=compression,
                          rootfs_format=rootfs_format, squashfs_compression=squashfs_compression,
                          opts=opts)
