"""The Debian image: debootstrap (minbase) configured to boot in an unprivileged container.

Init system. The default is sysvinit (``sysvinit-core``); ``--init systemd`` installs
``systemd-sysv`` instead. Both were built and booted here (liblxc, unprivileged, root mapped to
1000000, this kernel's cgroup v1 hybrid layout, ``lxc.mount.auto = cgroup:mixed``):

    init      image (gzip)  ready (runlevel/target)  clean stop  restart (SIGINT)
    sysvinit  57 MB         2.2 s                    0.4 s       1.0 s
    systemd   63 MB         2.1 s                    0.5 s       0.7 s

(the sysvinit image was also imported, launched, restarted and stopped with the stock LXD 5.0.2).
sysvinit is the default because it stops on the plain halt signal: systemd ignores SIGPWR and
SIGTERM as PID 1 and halts only on SIGRTMIN+3 (liblxc's shutdown() notices that systemd blocks
SIGRTMIN+3 and sends it, but anything that signals init itself does not stop a systemd
container), while sysvinit, like the busybox image's init, stops on SIGPWR. It is also smaller
and runs two processes (init, a console getty) where systemd runs six. sysvinit maps
liblxc's signals the way LXD expects:

* SIGPWR (``lxc stop``): the ``powerfail`` inittab entries run ``init 0`` - the rc0 scripts
  stop the services, then ``halt`` calls reboot(2), which in a container's PID namespace ends it;
* SIGINT (``lxc restart``): the ``ctrlaltdel`` entry runs ``shutdown -r now`` - the rc6
  scripts, then reboot(2), and liblxc starts the container again.

The rcS scripts that touch hardware or remount / (hwclock.sh, checkroot.sh, umountfs) print
warnings in a container and carry on; they stay enabled because insserv refuses to order the
other scripts without them.

With ``--init systemd``: systemd-networkd runs DHCP on eth0, and units that need hardware or
kernel facilities a container lacks (udev, modules, binfmt, sysctl, timesyncd...) are masked.

Networking: ifupdown with ``allow-hotplug eth0`` / ``iface eth0 inet dhcp`` (isc-dhcp-client);
Debian's networking script brings up hotplug interfaces that exist at boot. The image has
/etc/hostname and /etc/hosts templates, an empty /etc/machine-id (filled at first boot), apt
sources pointing at the mirror it was built from, no ssh host keys, no host resolv.conf, no
downloaded packages or apt lists, and an empty /dev (liblxc populates it).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from lxd_daemon.imagebuilder.pack import (
    DEFAULT_TEMPLATES,
    BuildError,
    BuildResult,
    TarOptions,
    Template,
    build_time,
    debian_architecture,
    lxd_architecture,
    make_metadata,
    pack_image,
    planned_outputs,
    serial,
)

# --cloud-init: cloud-init from the mirror, only its NoCloud datasource (the seed files the
# daemon renders from the image's templates: lxd_daemon/instances/cloudinit.py). Installed with
# apt in the debootstrapped tree: debootstrap's --include does not resolve virtual packages
# (python3-cryptography needs python3-cffi-backend-api-*).
CLOUD_INIT_PACKAGES = ["cloud-init"]
CLOUD_INIT_CFG = """# lxd-imagebuilder: the daemon renders the NoCloud seed (/var/lib/cloud/seed/nocloud-net)
datasource_list: [ NoCloud, None ]
# C.UTF-8 is always there (cloud-init's default, en_US.UTF-8, is not generated in the image)
locale: C.UTF-8
"""

DEBIAN_VERSIONS = {"buster": "10", "bullseye": "11", "bookworm": "12", "trixie": "13"}

SYSVINIT_PACKAGES = ["sysvinit-core", "ifupdown", "isc-dhcp-client", "iproute2", "procps", "netbase"]
SYSTEMD_PACKAGES = ["systemd-sysv", "iproute2", "procps", "netbase", "dbus"]

# Units that wait for or poke at hardware or kernel facilities an unprivileged container lacks.
SYSTEMD_MASK = [
    "systemd-udevd.service", "systemd-udevd-control.socket", "systemd-udevd-kernel.socket",
    "systemd-udev-trigger.service", "systemd-udev-settle.service", "systemd-modules-load.service",
    "sys-kernel-config.mount", "sys-kernel-debug.mount", "sys-kernel-tracing.mount",
    "sys-fs-fuse-connections.mount", "systemd-remount-fs.service", "systemd-journald-audit.socket",
    "getty-static.service", "systemd-timesyncd.service", "systemd-hwdb-update.service",
    "systemd-firstboot.service", "systemd-binfmt.service", "proc-sys-fs-binfmt_misc.automount",
    "systemd-sysctl.service", "systemd-pstore.service",
]


# --------------------------------------------------------------------------------------------
# apt sources: where this machine gets Debian from


@dataclass(frozen=True)
class AptSource:
    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]
    types: tuple[str, ...] = ("deb",)


def _parse_one_line(text: str) -> list[AptSource]:
    out = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if parts[0] not in ("deb", "deb-src"):
            continue
        typ = parts[0]
        parts = parts[1:]
        if parts and parts[0].startswith("["):  # options: [arch=amd64 signed-by=...]
            while parts and not parts[0].endswith("]"):
                parts = parts[1:]
            parts = parts[1:]
        if len(parts) < 2:
            continue
        out.append(AptSource(parts[0], (parts[1],), tuple(parts[2:]), (typ,)))
    return out


def _parse_deb822(text: str) -> list[AptSource]:
    out = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for raw in stanza.splitlines():
            if raw.lstrip().startswith("#"):
                continue
            if raw[:1] in (" ", "\t") and key:
                fields[key] += " " + raw.strip()
                continue
            if ":" in raw:
                key, val = raw.split(":", 1)
                key = key.strip().lower()
                fields[key] = val.strip()
        if not fields.get("uris") or fields.get("enabled", "yes").lower() == "no":
            continue
        types = tuple(fields.get("types", "deb").split())
        for uri in fields["uris"].split():
            out.append(AptSource(uri, tuple(fields.get("suites", "").split()),
                                 tuple(fields.get("components", "").split()), types))
    return out


def apt_sources(etc_apt: Path = Path("/etc/apt")) -> list[AptSource]:
    """The sources apt uses here (sources.list, sources.list.d/*.list and *.sources)."""
    out: list[AptSource] = []
    main = etc_apt / "sources.list"
    if main.is_file():
        out += _parse_one_line(main.read_text(errors="replace"))
    d = etc_apt / "sources.list.d"
    if d.is_dir():
        for p in sorted(d.iterdir()):
            if p.name.endswith(".list"):
                out += _parse_one_line(p.read_text(errors="replace"))
            elif p.name.endswith(".sources"):
                out += _parse_deb822(p.read_text(errors="replace"))
    return out


def find_mirror(release: str, etc_apt: Path = Path("/etc/apt")) -> str:
    """The Debian mirror this machine's apt uses for ``release`` (or for any Debian suite)."""
    srcs = [s for s in apt_sources(etc_apt) if "deb" in s.types]
    for s in srcs:
        if release in s.suites:
            return s.uri.rstrip("/")
    # A machine on another Debian release still names a usable mirror: a suite without a
    # dash that is served from a .../debian path.
    for s in srcs:
        if any("-" not in suite for suite in s.suites) and "security" not in s.uri:
            return s.uri.rstrip("/")
    raise BuildError(f"no Debian mirror for {release} in {etc_apt}/sources.list(.d); pass --mirror URL")


def find_security_mirror(release: str, etc_apt: Path = Path("/etc/apt")) -> str | None:
    for s in apt_sources(etc_apt):
        if "deb" in s.types and f"{release}-security" in s.suites:
            return s.uri.rstrip("/")
    return None


def image_sources(release: str, mirror: str, security: str | None) -> str:
    """/etc/apt/sources.list.d/debian.sources for the image (deb822)."""
    text = (
        "Types: deb\n"
        f"URIs: {mirror}\n"
        f"Suites: {release} {release}-updates\n"
        "Components: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
    )
    if security:
        text += (
            "\n"
            "Types: deb\n"
            f"URIs: {security}\n"
            f"Suites: {release}-security\n"
            "Components: main\n"
            "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        )
    return text


# --------------------------------------------------------------------------------------------
# Root filesystem configuration


INTERFACES = """# ifupdown: see interfaces(5). Interfaces that exist at boot and are marked allow-hotplug
# are brought up by /etc/init.d/networking.
source /etc/network/interfaces.d/*

auto lo
iface lo inet loopback

allow-hotplug eth0
iface eth0 inet dhcp
"""

NETWORKD_ETH0 = """[Match]
Name=eth0

[Network]
DHCP=yes
"""

HOSTS = """127.0.0.1\tlocalhost
127.0.1.1\tdebian

::1\tlocalhost ip6-localhost ip6-loopback
ff02::1\tip6-allnodes
ff02::2\tip6-allrouters
"""

CONSOLE_GETTY = """#!/bin/sh
# A getty on the container's console (lxc console), if it has one.
if [ -c /dev/console ] && [ -w /dev/console ]; then
	exec /sbin/getty --noclear -L 115200 console vt102
fi
exec sleep 2147483647
"""

MACHINE_ID_INIT = """#!/bin/sh
### BEGIN INIT INFO
# Provides:          machine-id
# Required-Start:    mountall
# Required-Stop:
# Default-Start:     S
# Default-Stop:
# Short-Description: Fill an empty /etc/machine-id at first boot
### END INIT INFO
case "$1" in
start)
	if [ ! -s /etc/machine-id ]; then
		tr -d '-' < /proc/sys/kernel/random/uuid > /etc/machine-id.new &&
			mv /etc/machine-id.new /etc/machine-id
	fi
	;;
stop|restart|force-reload|status) ;;
*) echo "Usage: $0 start" >&2; exit 3 ;;
esac
exit 0
"""


def container_inittab(inittab: str) -> str:
    """Debian's /etc/inittab adapted to a container.

    The tty gettys go (a container has no virtual consoles); a console getty remains; SIGPWR
    (powerfail) halts, SIGINT (ctrlaltdel) reboots.
    """
    out = []
    for line in inittab.splitlines():
        s = line.strip()
        if re.match(r"^\d+:\d+:respawn:/sbin/getty\b", s):
            out.append("#" + line + "  # no virtual consoles in a container")
            continue
        if re.match(r"^(pf|pn|po|p0|ca)::", s) or s.startswith(("pf::", "pn::", "po::", "ca:")):
            continue  # replaced below
        out.append(line)
    out += [
        "",
        "# Container: liblxc halts with SIGPWR and reboots with SIGINT.",
        "ca:12345:ctrlaltdel:/sbin/shutdown -t1 -r now",
        "pf::powerwait:/sbin/init 0",
        "pn::powerfailnow:/sbin/init 0",
        "po::powerokwait:/sbin/init 0",
        "c0:2345:respawn:/usr/local/sbin/console-getty",
        "",
    ]
    return "\n".join(out)


def _write(root: Path, rel: str, content: str, mode: int = 0o644) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.is_symlink():
        p.unlink()
    p.write_text(content)
    os.chmod(p, mode)


def _empty_dir(d: Path) -> None:
    if not d.is_dir() or d.is_symlink():
        return
    for c in d.iterdir():
        if c.is_dir() and not c.is_symlink():
            shutil.rmtree(c)
        else:
            c.unlink()


def _chroot(root: Path, *cmd: str, log: TextIO | None = None) -> None:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive",
           "LC_ALL": "C", "HOME": "/root"}
    r = subprocess.run(["chroot", str(root), *cmd], env=env, capture_output=True, text=True)
    if log:
        log.write(r.stdout + r.stderr)
    if r.returncode != 0:
        raise BuildError(f"chroot {' '.join(cmd)} failed (exit {r.returncode}): "
                         f"{(r.stderr or r.stdout).strip()[-2000:]}")


def configure_rootfs(root: Path, *, release: str, mirror: str, security: str | None, init: str,
                     log: TextIO | None = None) -> None:
    """Turn a debootstrapped tree into a container root filesystem (see the module docstring)."""
    root = Path(root)
    # apt: deb822 sources for the image, nothing downloaded left behind.
    (root / "etc/apt/sources.list").unlink(missing_ok=True)
    _write(root, "etc/apt/sources.list.d/debian.sources", image_sources(release, mirror, security))
    _chroot(root, "apt-get", "clean", log=log)
    lists = root / "var/lib/apt/lists"
    for p in lists.iterdir() if lists.is_dir() else []:
        if p.name == "partial" and p.is_dir() and not p.is_symlink():
            _empty_dir(p)  # keep apt's own directory, owner and mode
        elif p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()

    # Identity: templates fill hostname and hosts; a fresh machine-id per instance.
    _write(root, "etc/hostname", "debian\n")
    _write(root, "etc/hosts", HOSTS)
    _write(root, "etc/machine-id", "", 0o444)
    (root / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    for key in (root / "etc/ssh").glob("ssh_host_*") if (root / "etc/ssh").is_dir() else []:
        key.unlink()
    # The host's resolver configuration must not leak in; DHCP writes the container's.
    rc = root / "etc/resolv.conf"
    if rc.is_symlink() or rc.exists():
        rc.unlink()
    _write(root, "etc/resolv.conf", "")

    if init == "sysvinit":
        _write(root, "etc/network/interfaces", INTERFACES)
        (root / "etc/network/interfaces.d").mkdir(parents=True, exist_ok=True)
        inittab = root / "etc/inittab"
        if not inittab.is_file():
            raise BuildError("sysvinit-core did not install /etc/inittab")
        inittab.write_text(container_inittab(inittab.read_text()))
        _write(root, "usr/local/sbin/console-getty", CONSOLE_GETTY, 0o755)
        _write(root, "etc/init.d/machine-id", MACHINE_ID_INIT, 0o755)
        _chroot(root, "update-rc.d", "machine-id", "defaults", log=log)
        # (hwclock.sh, checkroot.sh and umountfs stay enabled: see the module docstring)
    elif init == "systemd":
        _write(root, "etc/systemd/network/eth0.network", NETWORKD_ETH0)
        _chroot(root, "systemctl", "enable", "systemd-networkd.service", log=log)
        for unit in SYSTEMD_MASK:
            link = root / "etc/systemd/system" / unit
            link.parent.mkdir(parents=True, exist_ok=True)
            if link.is_symlink() or link.exists():
                link.unlink()
            os.symlink("/dev/null", link)
    else:
        raise BuildError(f"unknown init {init!r} (sysvinit or systemd)")

    # Logs of the build, and device nodes (liblxc makes /dev), go.
    for p in (root / "var/log").rglob("*"):
        if p.is_file() and not p.is_symlink():
            p.write_bytes(b"")
    _empty_dir(root / "dev")
    _empty_dir(root / "tmp")
    _empty_dir(root / "run")
    for p in ("var/cache/debconf/config.dat-old", "var/cache/debconf/templates.dat-old",
              "var/lib/dpkg/status-old", "etc/shadow-", "etc/gshadow-", "etc/passwd-", "etc/group-"):
        (root / p).unlink(missing_ok=True)


def apt_install(root: Path, packages: Iterable[str], *, log: TextIO | None = None) -> None:
    """apt-get install in the debootstrapped tree (its sources are the build's mirror), with /proc
    mounted and no service started."""
    policy = root / "usr/sbin/policy-rc.d"
    _write(root, "usr/sbin/policy-rc.d", "#!/bin/sh\nexit 101\n", 0o755)
    rc = root / "etc/resolv.conf"
    if not rc.is_symlink() and (not rc.exists() or rc.stat().st_size == 0) and Path("/etc/resolv.conf").is_file():
        shutil.copyfile("/etc/resolv.conf", rc)  # (configure_rootfs empties it again)
    proc = root / "proc"
    proc.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "proc", "proc", str(proc)], check=True, capture_output=True)
    try:
        _chroot(root, "apt-get", "update", log=log)
        _chroot(root, "apt-get", "install", "-y", "--no-install-recommends", *packages, log=log)
    finally:
        subprocess.run(["umount", "-l", str(proc)], capture_output=True)
        policy.unlink(missing_ok=True)


def _cloud_init_setup(root: Path) -> list[Template]:
    """--cloud-init: NoCloud only, and the seed templates (rendered at create, copy and start)."""
    from lxd_daemon.instances.cloudinit import image_templates

    if not (root / "usr/bin/cloud-init").exists():
        raise BuildError("cloud-init did not get installed")
    _write(root, "etc/cloud/cloud.cfg.d/99_lxd_imagebuilder.cfg", CLOUD_INIT_CFG)
    files, entries = image_templates()
    return [Template(path, e["template"], files[e["template"]], when=tuple(e["when"]))
            for path, e in entries.items()]


def _cloud_init_properties(meta: dict) -> None:
    """The templates' `properties` (the user-data and vendor-data default)."""
    from lxd_daemon.instances.cloudinit import image_templates

    for path, e in image_templates()[1].items():
        meta["templates"][path]["properties"] = dict(e.get("properties") or {})


# --------------------------------------------------------------------------------------------
# Build


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` (deepest first), from /proc/self/mounts."""
    base = os.path.realpath(path)
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            mp = line.split()[1].replace("\\040", " ")
            if mp == base or mp.startswith(base + "/"):
                out.append(mp)
    return sorted(out, key=len, reverse=True)


@contextlib.contextmanager
def _unmount_on_exit(path: Path):
    """An interrupted debootstrap can leave proc/sys mounted in the target: unmount them before
    the work directory is removed, so that the removal never walks into them."""
    try:
        yield
    finally:
        for mp in mounts_under(path):
            subprocess.run(["umount", "-l", mp], capture_output=True)


def debootstrap(root: Path, *, release: str, variant: str, mirror: str, arch: str,
                include: Iterable[str], cache_dir: Path | None, log: TextIO | None) -> None:
    if not shutil.which("debootstrap"):
        raise BuildError("debootstrap is not installed (Debian package debootstrap)")
    cmd = ["debootstrap", f"--variant={variant}", f"--arch={arch}", "--merged-usr"]
    inc = sorted(set(include))
    if inc:
        cmd.append("--include=" + ",".join(inc))
    if cache_dir:
        cache_dir = Path(cache_dir).absolute()
        cache_dir.mkdir(parents=True, exist_ok=True)
        cmd.append(f"--cache-dir={cache_dir}")
    cmd += [release, str(root), mirror]
    if log:
        log.write("+ " + " ".join(cmd) + "\n")
        log.flush()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive"})
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        tail = (tail + [line])[-30:]
        if log:
            log.write(line)
            log.flush()
    rc = proc.wait()
    if rc != 0:
        dlog = root / "debootstrap/debootstrap.log"
        extra = dlog.read_text(errors="replace")[-3000:] if dlog.is_file() else ""
        raise BuildError(f"debootstrap failed (exit {rc}):\n{''.join(tail)}{extra}")


def build_debian(
    out_dir: Path | None = None,
    *,
    output: str | Path | None = None,
    name: str | None = None,
    fmt: str = "unified",
    compression: str = "gzip",
    rootfs_format: str = "squashfs",
    squashfs_compression: str | None = None,
    release: str = "bookworm",
    variant: str = "minbase",
    mirror: str | None = None,
    init: str = "sysvinit",
    include: Iterable[str] = (),
    cache_dir: Path | None = None,
    expiry_days: int | None = None,
    work_dir: Path | None = None,
    log: TextIO | None = None,
    cloud_init: bool = False,
) -> BuildResult:
    """Build a Debian image with debootstrap; needs root and the mirror's reachability."""
    if os.geteuid() != 0:
        raise BuildError("building a Debian image needs root (debootstrap, chroot)")
    if init not in ("sysvinit", "systemd"):
        raise BuildError(f"unknown init {init!r} (sysvinit or systemd)")
    name = name or f"debian-{release}"
    finals = planned_outputs(out_dir, output, name, fmt, compression, rootfs_format)
    mirror = (mirror or find_mirror(release)).rstrip("/")
    security = find_security_mirror(release)
    arch = lxd_architecture()
    deb_arch = debian_architecture(arch)
    ts = build_time()
    t0 = time.monotonic()
    packages = (SYSVINIT_PACKAGES if init == "sysvinit" else SYSTEMD_PACKAGES) + list(include)

    with tempfile.TemporaryDirectory(prefix="lxd-imagebuilder-debian-", dir=work_dir) as tmp, \
            _unmount_on_exit(Path(tmp)):
        root = Path(tmp) / "rootfs"
        debootstrap(root, release=release, variant=variant, mirror=mirror, arch=deb_arch,
                    include=packages, cache_dir=cache_dir, log=log)
        if cloud_init:
            apt_install(root, CLOUD_INIT_PACKAGES, log=log)
        t_boot = time.monotonic()
        configure_rootfs(root, release=release, mirror=mirror, security=security, init=init, log=log)
        templates = list(DEFAULT_TEMPLATES)
        if cloud_init:
            templates += _cloud_init_setup(root)
        version = DEBIAN_VERSIONS.get(release, "")
        dv = root / "etc/debian_version"
        point = dv.read_text().strip() if dv.is_file() else ""
        meta = make_metadata(
            architecture=arch,
            creation_date=ts,
            expiry_date=ts + expiry_days * 86400 if expiry_days else None,
            properties={
                "os": "debian",
                "release": release,
                "version": version or point,
                "description": f"Debian {release} {deb_arch} ({serial(ts)})",
                "architecture": deb_arch,
                "variant": "default",
                "serial": serial(ts),
                "init": init,
                "debootstrap_variant": variant,
            },
            templates=templates,
        )
        if cloud_init:
            meta["properties"]["variant"] = "cloud"
            _cloud_init_properties(meta)
        if log:
            log.write(f"debootstrap took {t_boot - t0:.1f}s; packing {fmt} ({compression})\n")
            log.flush()
        opts = TarOptions(owner="preserve", mtime_clamp=ts, xattrs=True)
        res = pack_image(root, finals, meta, templates, fmt=fmt, compression=compression,
                         rootfs_format=rootfs_format, squashfs_compression=squashfs_compression,
                         opts=opts)
    res.seconds = time.monotonic() - t0
    return res
