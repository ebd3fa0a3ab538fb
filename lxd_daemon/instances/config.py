"""Instance configuration keys: one table (STYLE idiom 5), validation, and profile expansion.

Every supported key is a row of KEYS (or of PREFIXES for the free-form namespaces). A row says
how to check a value and how a change reaches a running container: `live="cgroup"` keys are
re-applied to its cgroups by instances/live.py, `live="none"` keys need no action (they are read
when used, e.g. environment.* by exec), and `live=None` keys wait for the next start.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from lxd_daemon.errors import BadRequest
from lxd_daemon.util import validate as v
from lxd_daemon.util.sizes import parse_byte_size

# -- value parsers (pure; raise ValueError with a reason) ---------------------------------------


def parse_cpuset(value: str) -> list[int]:
    """"0-1,3" -> [0, 1, 3]."""
    cpus: set[int] = set()
    for part in value.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
        if not m:
            raise ValueError(f"Invalid CPU set {value!r}")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise ValueError(f"Invalid CPU range {part!r} in {value!r}")
        if hi > 8191:
            raise ValueError(f"Invalid CPU {hi} in {value!r}")
        cpus.update(range(lo, hi + 1))
    return sorted(cpus)


def parse_limits_cpu(value: str) -> tuple[int | None, list[int] | None]:
    """limits.cpu: a count ("2") or a set of CPUs ("0-1,3", "5-5"). Returns (count, cpus)."""
    v_ = value.strip()
    if re.fullmatch(r"\d+", v_):
        n = int(v_)
        if n < 1:
            raise ValueError("the number of CPUs must be at least 1")
        return n, None
    return None, parse_cpuset(v_)


def parse_cpu_allowance(value: str) -> tuple[int | None, tuple[int, int] | None]:
    """limits.cpu.allowance: "50%" (a share) or "25ms/100ms" (a hard quota).

    Returns (percent, None) or (None, (quota_us, period_us))."""
    v_ = value.strip()
    if v_.endswith("%"):
        num = v_[:-1]
        if not num.isdigit():
            raise ValueError(f"Invalid CPU allowance {value!r}")
        pct = int(num)
        if pct < 1:
            raise ValueError(f"Invalid CPU allowance {value!r}: must be at least 1%")
        return pct, None
    m = re.fullmatch(r"(\d+)ms/(\d+)ms", v_)
    if not m:
        raise ValueError(f"Invalid CPU allowance {value!r} (expected a percentage like 50% or a "
                         f"time slice like 25ms/100ms)")
    quota, period = int(m.group(1)), int(m.group(2))
    if quota < 1:
        raise ValueError(f"Invalid CPU allowance {value!r}: the quota must be at least 1ms")
    if not 1 <= period <= 1000:
        raise ValueError(f"Invalid CPU allowance {value!r}: the period must be 1ms to 1000ms")
    return None, (quota * 1000, period * 1000)


def parse_memory(value: str, total: int | None = None) -> int:
    """limits.memory: a size in either unit family ("512MiB", "1GB", "1048576") or a percentage
    of the host's memory ("50%"). With total=None a percentage is only checked."""
    v_ = value.strip()
    if v_.endswith("%"):
        num = v_[:-1]
        if not num.isdigit() or not 0 < int(num) <= 100:
            raise ValueError(f"Invalid memory limit {value!r}: a percentage must be 1% to 100%")
        if total is None:
            total = host_memory()
        return total * int(num) // 100
    n = parse_byte_size(v_)
    if n <= 0:
        raise ValueError(f"Invalid memory limit {value!r}: must be more than 0")
    return n


def host_memory() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise OSError("MemTotal missing from /proc/meminfo")


def _is_memory(value: str) -> None:
    parse_memory(value, total=1 << 30)


def _is_cpu(value: str) -> None:
    parse_limits_cpu(value)


def _is_allowance(value: str) -> None:
    parse_cpu_allowance(value)


def _is_priority(value: str) -> None:
    if not value.isdigit() or not 0 <= int(value) <= 10:
        raise ValueError(f"Invalid priority {value!r}: must be an integer from 0 to 10")


def _is_positive_int(value: str) -> None:
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"Invalid value {value!r}: must be a positive integer")


def _is_int(value: str) -> None:
    if not re.fullmatch(r"-?\d+", value):
        raise ValueError(f"Invalid value {value!r}: must be an integer")


def _is_uint(value: str) -> None:
    if not value.isdigit():
        raise ValueError(f"Invalid value {value!r}: must be a non-negative integer")


def _is_within(lo: int, hi: int) -> Callable[[str], None]:
    def check(value: str) -> None:
        if not value.isdigit() or not lo <= int(value) <= hi:
            raise ValueError(f"Invalid value {value!r}: must be an integer from {lo} to {hi}")

    return check


def _is_raw_idmap(value: str) -> None:
    from lxd_daemon.instances.idmap import parse_raw_idmap

    parse_raw_idmap(value)


def _is_raw_lxc(value: str) -> None:
    from lxd_daemon.instances.lxcconf import raw_lxc_problem

    problem = raw_lxc_problem(value)
    if problem:
        raise ValueError(problem)


_PRLIMITS = frozenset({"as", "core", "cpu", "data", "fsize", "locks", "memlock", "msgqueue", "nice",
                       "nofile", "nproc", "rss", "rtprio", "rttime", "sigpending", "stack"})


def parse_prlimit(value: str) -> tuple[str, str]:
    """limits.kernel.*: "N", "unlimited" or "SOFT:HARD" -> (soft, hard)."""
    soft, sep, hard = value.partition(":")
    if not sep:
        hard = soft
    for part in (soft, hard):
        if part != "unlimited" and not part.isdigit():
            raise ValueError(f"Invalid resource limit {value!r} (expected N, unlimited or SOFT:HARD)")
    if soft != "unlimited" and hard != "unlimited" and int(soft) > int(hard):
        raise ValueError(f"Invalid resource limit {value!r}: the soft limit exceeds the hard limit")
    return soft, hard


def _is_env_value(value: str) -> None:
    if "\n" in value or "\0" in value:
        raise ValueError("environment values cannot contain a newline or NUL")


def _is_prlimit(value: str) -> None:
    parse_prlimit(value)


INTERCEPT_SYSCALLS = ("mknod", "setxattr", "mount", "bpf", "sched_setscheduler", "sysinfo")
_SYSCALL_LINE = re.compile(r"(\[[a-z0-9_,]+\]|[A-Za-z0-9_]+( [^\0]*)?)")


def _is_syscall_list(value: str) -> None:
    """security.syscalls.allow/deny: one syscall per line, optionally followed by a liblxc action
    ("mknod", "mknodat errno 1"); written as is into the container's seccomp policy."""
    for line in value.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and not _SYSCALL_LINE.fullmatch(line):
            raise ValueError(f"Invalid syscall line {line!r} (expected a syscall name, optionally "
                             f"followed by an action such as 'errno 1')")


def _is_fs_list(value: str) -> None:
    for fs in value.split(","):
        if not re.fullmatch(r"[A-Za-z0-9_.+-]+", fs.strip()):
            raise ValueError(f"Invalid filesystem list {value!r} (comma-separated filesystem names)")


def _is_mount_fuse(value: str) -> None:
    for ent in value.split(","):
        fs, sep, binary = ent.partition("=")
        if not sep or "=" in binary or not fs or not binary:
            raise ValueError(f"security.syscalls.intercept.mount.fuse is not of the form "
                             f"'filesystem=fuse-binary': {ent}")


def _first_set(config: dict[str, str], key: str, old_key: str) -> str:
    """The value of a key or of its older name; both set at once is refused, as in LXD."""
    if config.get(key) and config.get(old_key):
        raise BadRequest(f"Mutually exclusive keys {key} and {old_key} are set")
    return config.get(key) or config.get(old_key) or ""


def check_syscalls(config: dict[str, str]) -> None:
    """The security.syscalls.* combinations LXD refuses."""
    allow = _first_set(config, "security.syscalls.allow", "security.syscalls.whitelist")
    deny = _first_set(config, "security.syscalls.deny", "security.syscalls.blacklist")
    deny_default = _first_set(config, "security.syscalls.deny_default", "security.syscalls.blacklist_default")
    deny_compat = _first_set(config, "security.syscalls.deny_compat", "security.syscalls.blacklist_compat")
    explicit_deny = deny or (deny_default and v.parse_bool(deny_default)) or (
        deny_compat and v.parse_bool(deny_compat))
    if allow and explicit_deny:
        raise BadRequest("security.syscalls.allow is mutually exclusive with security.syscalls.deny*")
    if get_bool(config, "security.syscalls.intercept.mount"):
        fused = {e.partition("=")[0] for e in config.get("security.syscalls.intercept.mount.fuse", "").split(",") if e}
        for fs in config.get("security.syscalls.intercept.mount.allowed", "").split(","):
            if fs and fs in fused:
                raise BadRequest(f"Filesystem {fs} cannot appear in security.syscalls.intercept.mount.allowed "
                                 f"and security.syscalls.intercept.mount.fuse")


def _is_snapshot_schedule(value: str) -> None:
    from lxd_daemon.util.schedule import validate_schedule

    validate_schedule(value)


def _is_snapshot_pattern(value: str) -> None:
    from lxd_daemon.util.schedule import validate_pattern

    validate_pattern(value)


def _is_snapshot_expiry(value: str) -> None:
    from lxd_daemon.util.schedule import validate_expiry

    validate_expiry(value)


def _is_cloud_user_data(value: str) -> None:
    from lxd_daemon.instances.cloudinit import check_user_data

    check_user_data(value)


def _is_yaml(value: str) -> None:
    from lxd_daemon.instances.cloudinit import check_yaml

    check_yaml(value)


def _is_uuid(value: str) -> None:
    from lxd_daemon.instances.cloudinit import check_uuid

    check_uuid(value)


# -- the table --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    check: Callable[[str], None] = v.is_any
    live: str | None = None       # updater in instances/live.UPDATERS; None: applies at next start
    default: str = ""
    instance_only: bool = False   # refused in profiles (volatile.*)


KEYS: dict[str, Key] = {
    "limits.cpu": Key(_is_cpu, live="cgroup"),
    "limits.cpu.allowance": Key(_is_allowance, live="cgroup"),
    "limits.cpu.priority": Key(_is_priority, live="cgroup", default="10"),
    "limits.memory": Key(_is_memory, live="cgroup"),
    "limits.memory.enforce": Key(v.is_one_of("hard", "soft"), live="cgroup", default="hard"),
    "limits.memory.swap": Key(v.is_bool, live="cgroup", default="true"),
    "limits.memory.swap.priority": Key(_is_priority, live="cgroup", default="10"),
    "limits.processes": Key(_is_positive_int, live="cgroup"),
    "boot.autostart": Key(v.is_bool, live="none"),
    "boot.autostart.delay": Key(_is_uint, live="none", default="0"),
    "boot.autostart.priority": Key(_is_int, live="none", default="0"),
    "boot.stop.priority": Key(_is_int, live="none", default="0"),
    "boot.host_shutdown_timeout": Key(_is_uint, live="none", default="30"),
    "security.privileged": Key(v.is_bool, default="false"),
    "security.nesting": Key(v.is_bool, default="false"),
    "security.devlxd": Key(v.is_bool, live="devlxd", default="true"),  # /dev/lxd in the container
    "security.devlxd.images": Key(v.is_bool, live="none", default="false"),  # its images/{fp}/export
    "security.idmap.isolated": Key(v.is_bool, default="false"),
    "security.idmap.size": Key(_is_positive_int),
    "security.idmap.base": Key(_is_uint),
    "security.protection.delete": Key(v.is_bool, live="none", default="false"),
    "raw.lxc": Key(_is_raw_lxc),
    "raw.idmap": Key(_is_raw_idmap),
    # seccomp (instances/lxcconf.seccomp_policy); the older names are kept as LXD keeps them
    "security.syscalls.allow": Key(_is_syscall_list),
    "security.syscalls.whitelist": Key(_is_syscall_list),
    "security.syscalls.deny": Key(_is_syscall_list),
    "security.syscalls.blacklist": Key(_is_syscall_list),
    "security.syscalls.deny_default": Key(v.is_bool, default="true"),
    "security.syscalls.blacklist_default": Key(v.is_bool),
    "security.syscalls.deny_compat": Key(v.is_bool, default="false"),
    "security.syscalls.blacklist_compat": Key(v.is_bool),
    # syscall interception: accepted, but only "false" works on an unprivileged container until
    # the daemon serves seccomp notifications (check_expanded refuses "true" there)
    **{f"security.syscalls.intercept.{name}": Key(v.is_bool, default="false") for name in INTERCEPT_SYSCALLS},
    "security.syscalls.intercept.bpf.devices": Key(v.is_bool, default="false"),
    "security.syscalls.intercept.mount.allowed": Key(_is_fs_list),
    "security.syscalls.intercept.mount.fuse": Key(_is_mount_fuse),
    "security.syscalls.intercept.mount.shift": Key(v.is_bool, default="false"),
    # live migration's memory pre-copy rounds (migration/criu.py PreCopy reads them)
    "migration.incremental.memory": Key(v.is_bool, live="none", default="false"),
    "migration.incremental.memory.iterations": Key(_is_within(1, 999), live="none", default="10"),
    "migration.incremental.memory.goal": Key(_is_within(1, 100), live="none", default="70"),
    # snapshots (instances/snapshots.py reads them; the syntax is util/schedule.py's)
    "snapshots.schedule": Key(_is_snapshot_schedule, live="none"),
    "snapshots.schedule.stopped": Key(v.is_bool, live="none", default="false"),
    "snapshots.pattern": Key(_is_snapshot_pattern, live="none", default="snap%d"),
    "snapshots.expiry": Key(_is_snapshot_expiry, live="none"),
    # cloud-init (instances/cloudinit.py): read by the image's templates at the next start
    "cloud-init.user-data": Key(_is_cloud_user_data, live="none"),
    "cloud-init.vendor-data": Key(_is_cloud_user_data, live="none"),
    "cloud-init.network-config": Key(_is_yaml, live="none"),
    "volatile.cloud-init.instance-id": Key(_is_uuid, live="none", instance_only=True),
}

PREFIXES: dict[str, Key] = {
    "environment.": Key(_is_env_value, live="none"),
    "user.": Key(live="none"),
    "image.": Key(live="none"),
    "volatile.": Key(live="none", instance_only=True),
    "limits.kernel.": Key(_is_prlimit),
}

LIVE_KINDS = frozenset({"cgroup", "none", "devlxd"})


def lookup(key: str) -> Key | None:
    """The table row for a key, or None when it isn't a supported instance key."""
    spec = KEYS.get(key)
    if spec is not None:
        return spec
    for prefix, pspec in PREFIXES.items():
        if key.startswith(prefix) and len(key) > len(prefix):
            if prefix == "limits.kernel." and key[len(prefix):] not in _PRLIMITS:
                return None
            if prefix == "environment." and not _ENV_NAME.fullmatch(key[len(prefix):]):
                return None
            return pspec
    return None


_ENV_NAME = re.compile(r"[^=\0\n]+")


def get(config: dict[str, str], key: str) -> str:
    """A key's value with the table's default."""
    val = config.get(key, "")
    if val != "":
        return val
    spec = lookup(key)
    return spec.default if spec else ""


def get_bool(config: dict[str, str], key: str) -> bool:
    val = get(config, key)
    return v.parse_bool(val) if val else False


def validate_config(config: dict[str, str], *, profile: bool = False) -> None:
    """Raise BadRequest naming the first unknown key or bad value."""
    if not isinstance(config, dict):
        raise BadRequest("Invalid config: must be an object")
    for key, value in config.items():
        if not isinstance(key, str):
            raise BadRequest(f"Invalid config key {key!r}")
        spec = lookup(key)
        if spec is None:
            raise BadRequest(f"Invalid config key {key!r}: unknown instance configuration key")
        if not isinstance(value, str):
            raise BadRequest(f"Invalid value for config key {key!r}: must be a string")
        if spec.instance_only and profile:
            raise BadRequest(f"Invalid config key {key!r}: Volatile keys can only be set on instances")
        if value == "":
            continue  # an empty value is the key unset
        try:
            spec.check(value)
        except ValueError as e:
            raise BadRequest(f"Invalid value for config key {key!r}: {e}") from None
    check_syscalls(config)


def check_expanded(config: dict[str, str]) -> None:
    """Checks of the whole expanded config (after profiles). security.idmap.size/base only matter
    with security.idmap.isolated=true and are ignored otherwise, as in LXD."""
    validate_config(config)
    if not get_bool(config, "security.privileged"):
        # LXD ignores interception for privileged containers; an unprivileged one needs the
        # daemon to answer seccomp notifications, which this server does not do yet.
        for name in INTERCEPT_SYSCALLS:
            key = f"security.syscalls.intercept.{name}"
            if get_bool(config, key):
                raise BadRequest(f"Invalid config key {key!r}: system call interception is not "
                                 f"supported by this server yet")
    if get(config, "security.idmap.base") and get(config, "security.idmap.size"):
        base, size = int(get(config, "security.idmap.base")), int(get(config, "security.idmap.size"))
        if base + size > 2 ** 32:
            raise BadRequest("Invalid config key 'security.idmap.base': the map would end past 2^32")


def expand(profiles: list[dict], config: dict, devices: dict) -> tuple[dict, dict]:
    """Profiles in order, then the instance's own keys and devices.

    A device of type "none" (in the instance or a later profile) masks an inherited device of the
    same name and is itself left out of the expanded map."""
    out_config: dict[str, str] = {}
    out_devices: dict[str, dict[str, str]] = {}
    for layer_config, layer_devices in [*((p.get("config") or {}, p.get("devices") or {}) for p in profiles),
                                        (config or {}, devices or {})]:
        for key, value in layer_config.items():
            if value == "" or value is None:
                out_config.pop(key, None)
            else:
                out_config[key] = value
        for name, dev in layer_devices.items():
            out_devices[name] = dict(dev)
    expanded_devices = {n: d for n, d in out_devices.items() if d.get("type") != "none"}
    return out_config, expanded_devices


def changed_keys(old: dict[str, str], new: dict[str, str]) -> set[str]:
    return {k for k in old.keys() | new.keys() if old.get(k, "") != new.get(k, "")}


def needs_restart(old: dict[str, str], new: dict[str, str]) -> set[str]:
    """Changed keys that only take effect at the next start."""
    out = set()
    for k in changed_keys(old, new):
        spec = lookup(k)
        if spec is None or spec.live is None:
            out.add(k)
    return out
