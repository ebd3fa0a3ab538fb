"""Render the liblxc configuration of a container from its expanded config and devices.

render(spec) returns LXC (key, value) pairs in order; to_text() turns them into the file the
worker loads. The result is what LXD 5.0 generates for a container on a host without AppArmor
or a network (no nic devices yet): id map, autodev, proc/sys/cgroup automounts, console and log
files, dropped capabilities, a seccomp deny list, cgroup limits (v1 hierarchies or v2, detected
once per process), what each device needs (its RunConfig from lxd_daemon/devices/: mount
entries, device cgroup rules, network interfaces, items), environment, then raw.lxc last.

render() touches the host only for what a start needs (spec.prepare_host): it writes the
seccomp policy next to the log file and creates device nodes for unix-char/unix-block devices
in the instance's devices directory. With prepare_host=False it is pure (for tests/previews).
"""

from __future__ import annotations

import functools
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from lxd_daemon.devices.base import DeviceContext
from lxd_daemon.devices.disk import DiskSource, disk_host_mount_path
from lxd_daemon.devices.registry import load_all
from lxd_daemon.devices.runconfig import MountEntry, RunConfig
from lxd_daemon.devices.unix import make_node
from lxd_daemon.errors import BadRequest
from lxd_daemon.instances import config as cfg
from lxd_daemon.instances.idmap import IdmapSet
from lxd_daemon.util import validate as v

Items = list[tuple[str, str]]

__all__ = ["DiskSource", "disk_host_mount_path"]  # kept importable from here (tests)

# What LXD drops when AppArmor can't confine the container (mac_* are only kept for stacking).
CAP_DROP = "sys_time sys_module sys_rawio mac_admin mac_override"

SECCOMP_POLICY = """2
denylist
[all]
kexec_load errno 38
open_by_handle_at errno 38
init_module errno 38
finit_module errno 38
delete_module errno 38
"""
SECCOMP_PRIVILEGED_EXTRA = "reject_force_umount  # umount -f would unmount the host's mounts\n"

# Host paths LXD passes through to every container when they exist (a reduced, safe list).
PASSTHROUGH = ("/dev/fuse", "/dev/net/tun", "/dev/mqueue", "/proc/sys/fs/binfmt_misc",
               "/sys/fs/fuse/connections")

# Device rules for privileged containers (unprivileged ones are confined by their user namespace).
PRIVILEGED_DEVICES = ("b *:* m", "c *:* m", "c 136:* rwm", "c 1:3 rwm", "c 1:5 rwm", "c 1:7 rwm",
                      "c 1:8 rwm", "c 1:9 rwm", "c 5:0 rwm", "c 5:1 rwm", "c 5:2 rwm",
                      "c 10:229 rwm", "c 10:200 rwm")

# raw.lxc may not undo what the daemon manages: key (or key prefix ending in ".") -> reason.
RAW_FORBIDDEN: dict[str, str] = {
    "lxc.idmap": "the id map is managed through security.idmap.* and raw.idmap",
    "lxc.id_map": "the id map is managed through security.idmap.* and raw.idmap",
    "lxc.rootfs": "the root filesystem is managed by the daemon",
    "lxc.rootfs.": "the root filesystem is managed by the daemon",
    "lxc.uts.name": "the host name is the instance name",
    "lxc.utsname": "the host name is the instance name",
    "lxc.console.logfile": "the console log is managed by the daemon",
    "lxc.console.path": "the console is managed by the daemon",
    "lxc.log.": "the log file is managed by the daemon",
    "lxc.logfile": "the log file is managed by the daemon",
    "lxc.syslog": "the log file is managed by the daemon",
    "lxc.loglevel": "the log file is managed by the daemon",
    "lxc.init.": "the init command is managed by the daemon",
    "lxc.init_cmd": "the init command is managed by the daemon",
    "lxc.include": "includes could change what the daemon manages",
    "lxc.namespace.": "the namespaces are managed by the daemon",
    "lxc.cgroup.dir": "the cgroup placement is managed by the daemon",
    "lxc.cgroup.dir.": "the cgroup placement is managed by the daemon",
    "lxc.cgroup.relative": "the cgroup placement is managed by the daemon",
    "lxc.ephemeral": "ephemeral containers are managed by the daemon",
    "lxc.prlimit.": "use limits.kernel.* instead",
    "lxc.limit.": "use limits.kernel.* instead",
    "lxc.network.": "legacy network keys are not supported (use lxc.net.N.*)",
}


# -- the spec -----------------------------------------------------------------------------------


@dataclass
class LxcSpec:
    name: str
    lxcpath: Path
    rootfs: Path
    log_file: Path
    console_log: Path
    hostname: str
    expanded_config: dict
    expanded_devices: dict
    idmap: IdmapSet
    privileged: bool
    rootfs_idmapped: bool = False
    devlxd_dir: Path | None = None
    extra: list[tuple[str, str]] = field(default_factory=list)
    prepare_host: bool = True          # write the seccomp file and device nodes (False: pure)
    devices_dir: Path | None = None    # host dir for unix device nodes (default lxcpath/name/devices)
    # Disks whose host side was prepared for this start (devices/disk.py): custom volumes
    # (mounted and shifted) and block devices (mounted on the host), by device name.
    disk_sources: dict[str, DiskSource] = field(default_factory=dict)
    # What each device needs, from its start() (devices/): by device name. None: described here
    # from the devices' configs (a pure render for tests and previews; prepared disks from
    # disk_sources).
    run_configs: dict[str, RunConfig] | None = None
    log_level: str = "warn"

    @property
    def device_dir(self) -> Path:
        return self.devices_dir or (Path(self.lxcpath) / self.name / "devices")


# -- cgroups ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CgroupLayout:
    """Which hierarchy serves each controller: {controller: 1 or 2}, plus v1 abilities."""

    controllers: dict[str, int]
    memsw: bool = False
    swappiness: bool = False
    online_cpus: tuple[int, ...] = ()

    def version(self, controller: str) -> int | None:
        return self.controllers.get(controller)

    def prefix(self, controller: str) -> str:
        return "lxc.cgroup2." if self.controllers.get(controller) == 2 else "lxc.cgroup."


def _online_cpus() -> tuple[int, ...]:
    try:
        text = Path("/sys/devices/system/cpu/online").read_text().strip()
        return tuple(cfg.parse_cpuset(text))
    except (OSError, ValueError):
        return tuple(range(os.cpu_count() or 1))


def detect_layout(mounts_file: str = "/proc/self/mounts") -> CgroupLayout:
    controllers: dict[str, int] = {}
    v1_mounts: dict[str, str] = {}
    v2_mount = None
    with open(mounts_file) as f:
        for line in f:
            parts = line.split()
            if len(parts) < 4:
                continue
            fstype, mnt, opts = parts[2], parts[1], parts[3].split(",")
            if fstype == "cgroup":
                for o in opts:
                    if o in ("cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio", "pids",
                             "hugetlb", "net_cls", "net_prio", "perf_event", "rdma", "misc"):
                        controllers[o] = 1
                        v1_mounts[o] = mnt
            elif fstype == "cgroup2" and v2_mount is None:
                v2_mount = mnt
    if v2_mount:
        try:
            for c in Path(v2_mount, "cgroup.controllers").read_text().split():
                controllers.setdefault(c, 2)
        except OSError:
            pass
        if controllers.get("cpu") == 2 or not v1_mounts:
            # cgroup2 has no devices controller file: liblxc does it with BPF.
            controllers.setdefault("devices", 2)
    memsw = swappiness = False
    if "memory" in v1_mounts:
        memsw = Path(v1_mounts["memory"], "memory.memsw.limit_in_bytes").exists()
        swappiness = Path(v1_mounts["memory"], "memory.swappiness").exists()
    elif controllers.get("memory") == 2:
        memsw = swappiness = True  # memory.swap.max exists below the root
    return CgroupLayout(controllers, memsw=memsw, swappiness=swappiness, online_cpus=_online_cpus())


@functools.cache
def host_layout() -> CgroupLayout:
    return detect_layout()


@functools.cache
def apparmor_enabled() -> bool:
    """AppArmor confines containers only where the kernel enables it (not on this kind of host)."""
    try:
        return Path("/sys/module/apparmor/parameters/enabled").read_text().strip() == "Y"
    except OSError:
        return False


def _cpus_text(cpus: list[int] | tuple[int, ...]) -> str:
    out: list[str] = []
    start = prev = None
    for c in cpus:
        if start is None:
            start = prev = c
        elif c == prev + 1:
            prev = c
        else:
            out.append(f"{start}-{prev}" if start != prev else str(start))
            start = prev = c
    if start is not None:
        out.append(f"{start}-{prev}" if start != prev else str(start))
    return ",".join(out)


def limit_items(config: dict[str, str], layout: CgroupLayout, *, resets: bool = False,
                memory_total: int | None = None, name: str = "") -> list[tuple[int, str, str]]:
    """Cgroup settings for the limits.* keys as (version, controller file, value).

    With resets=True every managed file is listed, unset limits at their unlimited value (what a
    live update writes when a key goes away); otherwise only what the config limits. A CPU count
    pins the container to that many consecutive online CPUs starting at a place derived from its
    name, so that containers spread over the CPUs."""
    out: list[tuple[int, str, str]] = []

    def add(controller: str, key: str, value: str, is_default: bool) -> None:
        ver = layout.version(controller)
        if ver is None:
            return
        if is_default and not resets:
            return
        out.append((ver, key, value))

    # memory
    mver = layout.version("memory")
    mem = cfg.get(config, "limits.memory")
    enforce = cfg.get(config, "limits.memory.enforce")
    swap_val = config.get("limits.memory.swap", "")
    swap_off = bool(swap_val) and not v.parse_bool(swap_val)
    swap_prio = config.get("limits.memory.swap.priority", "")
    limit = cfg.parse_memory(mem, memory_total) if mem else None
    if mver == 1:
        hard = limit if limit is not None and enforce != "soft" else None
        soft = (limit if enforce == "soft" else int(limit * 0.9)) if limit is not None else None
        add("memory", "memory.limit_in_bytes", str(hard) if hard else "-1", hard is None)
        if layout.memsw:
            memsw = hard if (hard is not None and swap_off) else None
            add("memory", "memory.memsw.limit_in_bytes", str(memsw) if memsw else "-1", memsw is None)
        add("memory", "memory.soft_limit_in_bytes", str(soft) if soft else "-1", soft is None)
        if layout.swappiness:
            if swap_off:
                add("memory", "memory.swappiness", "0", False)
            elif swap_prio:
                add("memory", "memory.swappiness", str(60 - 10 + int(swap_prio)), False)
            else:
                add("memory", "memory.swappiness", "60", True)
    elif mver == 2:
        hard = limit if limit is not None and enforce != "soft" else None
        high = limit if limit is not None and enforce == "soft" else None
        add("memory", "memory.max", str(hard) if hard else "max", hard is None)
        add("memory", "memory.high", str(high) if high else "max", high is None)
        add("memory", "memory.swap.max", "0" if swap_off else "max", not swap_off)

    # processes
    procs = config.get("limits.processes", "")
    add("pids", "pids.max", procs or "max", not procs)

    # cpus
    cpu_limit = config.get("limits.cpu", "")
    online = list(layout.online_cpus) or list(range(os.cpu_count() or 1))
    if cpu_limit:
        count, cpus = cfg.parse_limits_cpu(cpu_limit)
        if count is not None:
            start = zlib.crc32(name.encode()) % len(online) if count < len(online) else 0
            chosen = sorted((online * 2)[start:start + min(count, len(online))])
        else:
            chosen = [c for c in cpus if c in online]
            if not chosen:
                raise BadRequest(f"Invalid value for config key 'limits.cpu': none of the CPUs "
                                 f"{cpu_limit!r} is online (online: {_cpus_text(online)})")
        add("cpuset", "cpuset.cpus", _cpus_text(chosen), False)
    else:
        add("cpuset", "cpuset.cpus", _cpus_text(online), True)

    allowance = config.get("limits.cpu.allowance", "")
    priority = config.get("limits.cpu.priority", "")
    shares, quota, period = 1024, -1, 100000
    if allowance or priority:
        shares = -(10 - int(priority or 10))
        if allowance:
            pct, slice_ = cfg.parse_cpu_allowance(allowance)
            if pct is not None:
                shares += 1024 * pct // 100
            else:
                quota, period = slice_
                shares += 1024
        else:
            shares += 1024
        shares = max(shares, 2)
    cver = layout.version("cpu")
    if cver == 1:
        add("cpu", "cpu.shares", str(shares), shares == 1024)
        add("cpu", "cpu.cfs_period_us", str(period), quota == -1)
        add("cpu", "cpu.cfs_quota_us", str(quota), quota == -1)
    elif cver == 2:
        weight = max(1, min(10000, shares * 100 // 1024))
        add("cpu", "cpu.weight", str(weight), shares == 1024)
        add("cpu", "cpu.max", f"{quota if quota != -1 else 'max'} {period}", quota == -1)
    return out


# -- raw.lxc ------------------------------------------------------------------------------------


def parse_raw_lxc(text: str) -> Items:
    """raw.lxc lines -> (key, value); raises ValueError on a line that isn't "key = value"."""
    items: Items = []
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"line {n} is not of the form 'key = value': {line!r}")
        if not key.startswith("lxc."):
            raise ValueError(f"line {n}: {key!r} is not an LXC configuration key")
        items.append((key, value.strip()))
    return items


def raw_lxc_problem(text: str) -> str | None:
    try:
        items = parse_raw_lxc(text)
    except ValueError as e:
        return f"Invalid raw.lxc: {e}"
    for key, _ in items:
        k = key.lower()
        for forbidden, reason in RAW_FORBIDDEN.items():
            if k == forbidden or (forbidden.endswith(".") and k.startswith(forbidden)):
                return f"Invalid raw.lxc: {key} can't be set ({reason})"
        if k.startswith("lxc.net.") and not _RAW_NET_KEY.fullmatch(k):
            # as LXD: NICs are devices; only addresses of an interface may be added by hand
            return f"Invalid raw.lxc: {key} can't be set (only interface-specific ipv4/ipv6 lxc.net. keys are allowed)"
    return None


_RAW_NET_KEY = re.compile(r"lxc\.net\.[^.]+\.ipv[46]\.(address|gateway)")

# liblxc's verdict on raw.lxc lines, per (key, value): liblxc parses a value when it is set, so
# an unknown key (lxc.notaconfigkey), a removed legacy key (lxc.aa_profile) and a value it can't
# parse are all refused when raw.lxc is set, not at the next start ("Failed to load rcfile").
# The answers only depend on the liblxc the workers load, so they are kept for the process.
_LIBLXC_VERDICTS: dict[tuple[str, str], bool] = {}
_LIBLXC_VERDICTS_MAX = 4096


async def check_raw_lxc(runtime, text: str | None) -> None:
    """Raise BadRequest unless raw.lxc is well formed, sets nothing the daemon manages, and
    every line is accepted by liblxc (asked through a worker: the daemon never loads liblxc)."""
    if not text:
        return
    validate_raw_lxc(text)
    items = parse_raw_lxc(text)
    todo = list(dict.fromkeys(it for it in items if it not in _LIBLXC_VERDICTS))
    if todo and runtime is not None:
        answers = await runtime.config_items_ok([list(it) for it in todo])
        if len(_LIBLXC_VERDICTS) + len(todo) > _LIBLXC_VERDICTS_MAX:
            _LIBLXC_VERDICTS.clear()
        for it, ok in zip(todo, answers, strict=True):
            _LIBLXC_VERDICTS[it] = bool(ok)
    for key, value in items:
        if _LIBLXC_VERDICTS.get((key, value)) is False:
            raise BadRequest(f"Invalid raw.lxc: liblxc refuses {key} = {value!r} (an unknown or "
                             f"removed configuration key, or a value it can't parse)")


def validate_raw_lxc(text: str) -> None:
    """Raise BadRequest when raw.lxc is malformed or sets something the daemon manages."""
    problem = raw_lxc_problem(text)
    if problem:
        raise BadRequest(problem)


# -- helpers ------------------------------------------------------------------------------------


def escape_fstab(path: str) -> str:
    """A path as an lxc.mount.entry field (fstab escaping of whitespace and backslashes)."""
    return (path.replace("\\", "\\134").replace(" ", "\\040").replace("\t", "\\011")
            .replace("\n", "\\012"))


def _arch() -> str | None:
    return {"x86_64": "linux64", "aarch64": "linux64", "i686": "linux32", "armv7l": "linux32",
            "ppc64le": "linux64", "s390x": "linux64", "riscv64": "linux64"}.get(os.uname().machine)


# -- render -------------------------------------------------------------------------------------


def render(spec: LxcSpec, layout: CgroupLayout | None = None) -> Items:
    """The LXC configuration for a start, as ordered (key, value) pairs."""
    layout = layout or host_layout()
    conf = spec.expanded_config
    items: Items = []
    add = items.append

    add(("lxc.uts.name", spec.hostname))
    arch = _arch()
    if arch:
        add(("lxc.arch", arch))
    add(("lxc.log.file", str(spec.log_file)))
    add(("lxc.log.level", spec.log_level))
    add(("lxc.console.buffer.size", "auto"))
    add(("lxc.console.size", "auto"))
    add(("lxc.console.logfile", str(spec.console_log)))
    add(("lxc.rootfs.path", f"dir:{spec.rootfs}"))
    if spec.rootfs_idmapped and not spec.privileged:
        add(("lxc.rootfs.options", "idmap=container"))

    nesting = cfg.get_bool(conf, "security.nesting")
    if spec.privileged:
        add(("lxc.mount.auto", "proc:rw sys:rw cgroup:rw" if nesting else "proc:mixed sys:mixed cgroup:mixed"))
    else:
        add(("lxc.mount.auto", "proc:rw sys:rw cgroup:rw:force" if nesting else "proc:rw sys:rw cgroup:mixed"))
    if nesting:
        add(("lxc.mount.entry", "proc dev/.lxc/proc proc create=dir,optional 0 0"))
        add(("lxc.mount.entry", "sys dev/.lxc/sys sysfs create=dir,optional 0 0"))
    add(("lxc.autodev", "1"))
    add(("lxc.pty.max", "1024"))
    add(("lxc.tty.max", "0"))
    add(("lxc.cap.drop", CAP_DROP))
    if apparmor_enabled():
        # liblxc generates and loads a per-container profile (needs apparmor_parser)
        add(("lxc.apparmor.profile", "generated"))
        if nesting:
            add(("lxc.apparmor.allow_nesting", "1"))
    add(("lxc.signal.halt", "SIGPWR"))
    add(("lxc.signal.reboot", "SIGINT"))

    if not spec.privileged:
        if spec.idmap.empty:
            raise BadRequest("An unprivileged container needs an id map")
        for line in spec.idmap.lxc_lines():
            add(("lxc.idmap", line))

    policy = seccomp_policy(conf, spec.privileged)
    if policy is not None:
        seccomp = seccomp_path(spec)
        if spec.prepare_host:
            _write_once(seccomp, policy)
        add(("lxc.seccomp.profile", str(seccomp)))

    # pass-through host paths, as LXD does
    for host in PASSTHROUGH:
        if host == "/dev/mqueue" and spec.privileged:
            add(("lxc.mount.entry", "mqueue dev/mqueue mqueue rw,relatime,create=dir,optional 0 0"))
            continue
        if not os.path.exists(host):
            continue
        if os.path.isdir(host):
            add(("lxc.mount.entry", f"{host} {host[1:]} none rbind,create=dir,optional 0 0"))
        else:
            add(("lxc.mount.entry", f"{host} {host[1:]} none bind,create=file,optional 0 0"))

    if spec.devlxd_dir is not None:
        add(("lxc.mount.entry", f"{escape_fstab(str(spec.devlxd_dir))} dev/lxd none bind,create=dir 0 0"))

    # device cgroup rules (privileged only; user namespaces confine the others)
    dev_prefix = layout.prefix("devices")
    if spec.privileged and layout.version("devices"):
        add((dev_prefix + "devices.deny", "a"))
        for rule in PRIVILEGED_DEVICES:
            add((dev_prefix + "devices.allow", rule))

    # limits
    for ver, key, value in limit_items(conf, layout, name=spec.name):
        add((("lxc.cgroup2." if ver == 2 else "lxc.cgroup.") + key, value))
    for key in sorted(conf):
        if key.startswith("limits.kernel.") and conf[key]:
            soft, hard = cfg.parse_prlimit(conf[key])
            add((f"lxc.prlimit.{key[len('limits.kernel.'):]}",
                 soft if soft == hard else f"{soft}:{hard}"))

    # devices: shallower mount paths first, then by name
    run_configs = device_run_configs(spec)
    for rc in run_configs:
        items.extend(run_config_items(spec, rc, layout))

    # environment
    for key in sorted(conf):
        if key.startswith("environment.") and conf[key] != "":
            add(("lxc.environment", f"{key[len('environment.'):]}={conf[key]}"))

    nics = [nic for rc in run_configs for nic in rc.interfaces]
    for index, nic in enumerate(nics):
        items.extend(nic.lxc_items(index))
    if not nics:
        add(("lxc.net.0.type", "empty"))
    items.extend(spec.extra)

    raw = conf.get("raw.lxc", "")
    if raw:
        validate_raw_lxc(raw)
        items.extend(parse_raw_lxc(raw))
    return items


def device_run_configs(spec: LxcSpec) -> list[RunConfig]:
    """Each device's RunConfig in start order: the ones the start path prepared (spec.run_configs),
    or else described from the configs (disks prepared per spec.disk_sources)."""
    devices = load_all(spec.expanded_devices)
    if spec.run_configs is not None:
        return [spec.run_configs[d.name] for d in devices if d.name in spec.run_configs]
    ctx = DeviceContext(instance=spec.name, idmap=spec.idmap, privileged=spec.privileged,
                        devices_dir=spec.device_dir, prepared=dict(spec.disk_sources))
    return [device.run_config(ctx) for device in devices]


def mount_entry(m: MountEntry) -> str:
    """A MountEntry as the value of lxc.mount.entry."""
    return f"{escape_fstab(m.source)} {escape_fstab(m.target.lstrip('/'))} none {','.join(m.options())} 0 0"


def run_config_items(spec: LxcSpec, rc: RunConfig, layout: CgroupLayout) -> Items:
    """What a device's RunConfig means at start: its device nodes made (with prepare_host), its
    cgroup rules (privileged containers), its mount entries, its own items."""
    out: Items = []
    if spec.prepare_host:
        for node in rc.nodes:
            make_node(node, IdmapSet(()) if spec.privileged else spec.idmap)
    if spec.privileged and layout.version("devices"):
        out.extend((layout.prefix("devices") + "devices.allow", rule.text()) for rule in rc.cgroup_rules)
    out.extend(("lxc.mount.entry", mount_entry(m)) for m in rc.mounts)
    out.extend(rc.items)
    return out


def seccomp_policy(conf: dict[str, str], privileged: bool) -> str | None:
    """The liblxc (version 2) seccomp policy of a container, or None when it needs none.

    As LXD: security.syscalls.allow (or .whitelist) makes an allow list; otherwise a deny list
    holding the default entries (unless security.syscalls.deny_default=false), the compat-ABI
    entries (security.syscalls.deny_compat) and security.syscalls.deny (or .blacklist)."""
    allow = conf.get("security.syscalls.allow") or conf.get("security.syscalls.whitelist") or ""
    if allow:
        return "2\nallowlist\n[all]\n" + _lines(allow)
    deny_default = _first_bool(conf, "security.syscalls.deny_default", "security.syscalls.blacklist_default", True)
    compat = _first_bool(conf, "security.syscalls.deny_compat", "security.syscalls.blacklist_compat", False)
    deny = conf.get("security.syscalls.deny") or conf.get("security.syscalls.blacklist") or ""
    if not (deny_default or compat or deny):
        return None
    if deny_default:
        policy = SECCOMP_POLICY + (SECCOMP_PRIVILEGED_EXTRA if privileged else "")
    else:
        policy = "2\ndenylist\n[all]\n"
    if compat:
        arch = os.uname().machine
        if arch not in COMPAT_ARCHES:
            raise BadRequest(f"security.syscalls.deny_compat isn't supported on this architecture ({arch})")
        policy += f"[{arch}]\n" + "".join(f"{name} errno 38\n" for name in COMPAT_DENY)
    if deny:
        policy += _lines(deny)
    return policy


COMPAT_ARCHES = ("x86_64", "aarch64", "ppc64")
# The compat-ABI entry points that have been exploitable from 32-bit processes on 64-bit hosts.
COMPAT_DENY = (
    "compat_sys_rt_sigaction", "stub_x32_rt_sigreturn", "compat_sys_ioctl", "compat_sys_readv",
    "compat_sys_writev", "compat_sys_recvfrom", "compat_sys_sendmsg", "compat_sys_recvmsg",
    "stub_x32_execve", "compat_sys_ptrace", "compat_sys_rt_sigpending", "compat_sys_rt_sigtimedwait",
    "compat_sys_rt_sigqueueinfo", "compat_sys_sigaltstack", "compat_sys_timer_create",
    "compat_sys_mq_notify", "compat_sys_kexec_load", "compat_sys_waitid", "compat_sys_set_robust_list",
    "compat_sys_get_robust_list", "compat_sys_vmsplice", "compat_sys_move_pages", "compat_sys_preadv64",
    "compat_sys_pwritev64", "compat_sys_rt_tgsigqueueinfo", "compat_sys_recvmmsg", "compat_sys_sendmmsg",
    "compat_sys_process_vm_readv", "compat_sys_process_vm_writev", "compat_sys_setsockopt",
    "compat_sys_getsockopt", "compat_sys_io_setup", "compat_sys_io_submit", "stub_x32_execveat",
)


def _first_bool(conf: dict[str, str], key: str, old_key: str, default: bool) -> bool:
    val = conf.get(key) or conf.get(old_key) or ""
    return v.parse_bool(val) if val else default


def _lines(text: str) -> str:
    return "".join(line.strip() + "\n" for line in text.splitlines() if line.strip())


def seccomp_dir(lxcpath: Path | str) -> Path:
    return Path(lxcpath).parent / "security" / "seccomp"


def seccomp_path(spec: LxcSpec) -> Path:
    """Each container's policy file, as LXD: $LXD_DIR/security/seccomp/<name>."""
    return seccomp_dir(spec.lxcpath) / spec.name


def remove_seccomp_policy(lxcpath: Path | str, name: str) -> None:
    """Remove a container's policy file (on delete and rename; absent when it never started)."""
    path = seccomp_dir(lxcpath) / name
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    _WRITTEN.pop(str(path), None)


_WRITTEN: dict[str, str] = {}  # path -> the text this process last wrote or found there


def _write_once(path: Path, text: str) -> None:
    """Write a file if its content differs (read once per process per path and content)."""
    if _WRITTEN.get(str(path)) == text and path.exists():
        return
    try:
        same = path.read_text() == text
    except OSError:
        same = False
    if not same:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    _WRITTEN[str(path)] = text


def to_text(items: Items) -> str:
    """The configuration file text. A value holding a newline would inject keys: refused."""
    lines = []
    for key, value in items:
        if "\n" in key or "\n" in value or "\r" in value or "\0" in value:
            raise BadRequest(f"Invalid LXC configuration value for {key}")
        lines.append(f"{key} = {value}")
    return "\n".join(lines) + "\n"
