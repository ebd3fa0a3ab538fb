"""Project limits and restrictions, with LXD 5.0.2's keys, defaults, semantics and error texts.

Pure functions over plain values (unit-tested without a daemon):

- the key table: validate_config() refuses unknown keys and bad values as LXD does, and keys LXD
  has that this server does not enforce yet (UNSUPPORTED), so nothing is accepted silently;
- usage: totals of limits.cpu/memory/processes over instances' EXPANDED config, counts;
- restrictions: check_restrictions() over every instance's expanded config and devices and every
  profile of the project;
- check(): THE entry point for a change of what instances a project has or their effective
  config (create, copy, import, instance update, profile update);
- check_project_update(): a project config change against what the project holds now;
- allocations(): GET /1.0/projects/{name}/state.

ProjectPolicy keeps each project's config in memory (loaded from the projects table, changed only
through set_config()) and the proposals that passed check() but aren't recorded yet (claims), so
that a check and its claim happen in one synchronous step on the event loop: two creates racing
for the last slot of limits.instances can't both pass.
"""

from __future__ import annotations

import json
import os.path
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from lxd_daemon.errors import BadRequest, Forbidden
from lxd_daemon.util.sizes import parse_byte_size
from lxd_daemon.util.validate import is_abs_path, is_any, list_of

DEFAULT = "default"
TRUE = ("true", "1", "yes", "on")
FALSE = ("false", "0", "no", "off")


def is_true(v: str | None) -> bool:
    return (v or "").lower() in TRUE


def is_false_or_empty(v: str | None) -> bool:
    return (v or "").lower() in FALSE or not v


class PolicyError(BadRequest):
    """A change the project's limits or restrictions refuse (400, LXD's text)."""


# ---------------------------------------------------------------------------------- validators
def _bool(v: str) -> None:
    if v.lower() not in (*TRUE, *FALSE):
        raise ValueError(f"Invalid value for a boolean {v!r}".replace("'", '"'))


def _one_of(*valid: str) -> Callable[[str], None]:
    def check(v: str) -> None:
        if v not in valid:
            raise ValueError(f'Invalid value "{v}" (not one of [{" ".join(valid)}])')
    return check


def _uint32(v: str) -> None:
    if not v.isdigit() or int(v) >= 2 ** 32:
        raise ValueError(f'Invalid value for uint32 "{v}": strconv.ParseUint: parsing "{v}": invalid syntax')


def _size(v: str) -> None:
    try:
        parse_byte_size(v)
    except ValueError:
        raise ValueError(f"Invalid value: {v}") from None


def parse_uint32_range(v: str) -> tuple[int, int]:
    """"N" or "START-END" -> (start, size), as LXD's ParseUint32Range."""
    a, sep, b = v.partition("-")
    if not a.isdigit() or int(a) >= 2 ** 32:
        raise ValueError(f'Invalid number "{v}"')
    if not sep:
        return int(a), 1
    if not b.isdigit() or int(b) >= 2 ** 32:
        raise ValueError(f'Invalid end number "{v}"')
    if int(b) < int(a):
        raise ValueError(f'Start number must be lower than end number "{v}"')
    return int(a), int(b) - int(a) + 1


def _range(v: str) -> None:
    parse_uint32_range(v)


def _uplink_subnet(v: str) -> None:
    """`UPLINK:CIDR` (restricted.networks.subnets)."""
    import ipaddress

    uplink, sep, cidr = v.partition(":")
    if not sep or not uplink:
        raise ValueError(f"Invalid subnet {v!r}: expected UPLINK:CIDR")
    try:
        ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        raise ValueError(f"Invalid subnet {v!r}: {cidr!r} is not a CIDR subnet") from None


_ALLOW_BLOCK = _one_of("block", "allow")
_ALLOW_BLOCK_MANAGED = _one_of("block", "allow", "managed")

# Every key LXD 5.0.2 knows on a project, with its validator (empty values always pass).
LXD_KEYS: dict[str, Callable[[str], None]] = {
    "backups.compression_algorithm": is_any,
    "features.profiles": _bool,
    "features.images": _bool,
    "features.storage.volumes": _bool,
    "features.networks": _bool,
    "images.auto_update_cached": _bool,
    "images.auto_update_interval": is_any,
    "images.compression_algorithm": is_any,
    "images.default_architecture": is_any,
    "images.remote_cache_expiry": is_any,
    "limits.instances": _uint32,
    "limits.containers": _uint32,
    "limits.virtual-machines": _uint32,
    "limits.memory": _size,
    "limits.processes": _uint32,
    "limits.cpu": _uint32,
    "limits.disk": _size,
    "limits.networks": _uint32,
    "restricted": _bool,
    "restricted.backups": _ALLOW_BLOCK,
    "restricted.cluster.groups": is_any,
    "restricted.cluster.target": _ALLOW_BLOCK,
    "restricted.containers.interception": _one_of("allow", "block", "full"),
    "restricted.containers.nesting": _ALLOW_BLOCK,
    "restricted.containers.lowlevel": _ALLOW_BLOCK,
    "restricted.containers.privilege": _one_of("allow", "unprivileged", "isolated"),
    "restricted.virtual-machines.lowlevel": _ALLOW_BLOCK,
    "restricted.devices.unix-char": _ALLOW_BLOCK,
    "restricted.devices.unix-block": _ALLOW_BLOCK,
    "restricted.devices.unix-hotplug": _ALLOW_BLOCK,
    "restricted.devices.infiniband": _ALLOW_BLOCK,
    "restricted.devices.gpu": _ALLOW_BLOCK,
    "restricted.devices.usb": _ALLOW_BLOCK,
    "restricted.devices.pci": _ALLOW_BLOCK,
    "restricted.devices.proxy": _ALLOW_BLOCK,
    "restricted.devices.nic": _ALLOW_BLOCK_MANAGED,
    "restricted.devices.disk": _ALLOW_BLOCK_MANAGED,
    "restricted.devices.disk.paths": list_of(is_abs_path),
    "restricted.idmap.uid": list_of(_range),
    "restricted.idmap.gid": list_of(_range),
    "restricted.networks.access": is_any,
    "restricted.networks.uplinks": is_any,
    "restricted.networks.subnets": list_of(_uplink_subnet),
    "restricted.networks.zones": is_any,
    "restricted.snapshots": _ALLOW_BLOCK,
}

# Keys LXD has that this server doesn't enforce (yet): refused, never accepted silently.
# (The cluster keys restrict targeting cluster members, which this unclustered server refuses to
# everyone (check_target); the uplink, subnet and zone keys restrict the OVN networks and zones of a
# project, which this server can't make (networks/service.py refuses networks in a project with
# features.networks): both are enforced by there being nothing to allow.)
UNSUPPORTED = frozenset({
    "backups.compression_algorithm", "images.auto_update_cached", "images.auto_update_interval",
    "images.compression_algorithm", "images.default_architecture", "images.remote_cache_expiry",
})

FEATURES = ("features.images", "features.networks", "features.profiles", "features.storage.volumes")

# The restrictions and their defaults (what applies when `restricted=true` and the key is unset).
RESTRICTION_DEFAULTS: dict[str, str] = {
    "restricted.backups": "block",
    "restricted.cluster.target": "block",
    "restricted.containers.nesting": "block",
    "restricted.containers.interception": "block",
    "restricted.containers.lowlevel": "block",
    "restricted.containers.privilege": "unprivileged",
    "restricted.virtual-machines.lowlevel": "block",
    "restricted.devices.unix-char": "block",
    "restricted.devices.unix-block": "block",
    "restricted.devices.unix-hotplug": "block",
    "restricted.devices.infiniband": "block",
    "restricted.devices.gpu": "block",
    "restricted.devices.usb": "block",
    "restricted.devices.pci": "block",
    "restricted.devices.proxy": "block",
    "restricted.devices.nic": "managed",
    "restricted.devices.disk": "managed",
    "restricted.devices.disk.paths": "",
    "restricted.idmap.uid": "",
    "restricted.idmap.gid": "",
    "restricted.networks.access": "",
    "restricted.snapshots": "block",
}

AGGREGATE = ("limits.cpu", "limits.memory", "limits.processes")
# The aggregates checked on a change: limits.disk sums the instances' root disk `size` and the
# project's custom volumes' `size` (every one must have one while the limit is set, as LXD).
AGGREGATE_ALL = (*AGGREGATE, "limits.disk")

ALLOWABLE_INTERCEPT = (
    "security.syscalls.intercept.bpf", "security.syscalls.intercept.bpf.devices",
    "security.syscalls.intercept.mknod", "security.syscalls.intercept.mount",
    "security.syscalls.intercept.mount.fuse", "security.syscalls.intercept.setxattr",
)
LOWLEVEL_CONTAINER = (
    "boot.host_shutdown_timeout", "linux.kernel_modules", "raw.apparmor", "raw.idmap", "raw.lxc",
    "raw.seccomp", "security.devlxd.images", "security.idmap.base", "security.idmap.size",
)
SAFE_VOLATILE = ("volatile.apply_template", "volatile.base_image", "volatile.last_state.power")

_DEVICE_BANS = {
    "unix-char": ("restricted.devices.unix-char", "Unix character devices are forbidden"),
    "unix-block": ("restricted.devices.unix-block", "Unix block devices are forbidden"),
    "unix-hotplug": ("restricted.devices.unix-hotplug", "Unix hotplug devices are forbidden"),
    "infiniband": ("restricted.devices.infiniband", "Infiniband devices are forbidden"),
    "gpu": ("restricted.devices.gpu", "GPU devices are forbidden"),
    "usb": ("restricted.devices.usb", "USB devices are forbidden"),
    "pci": ("restricted.devices.pci", "PCI devices are forbidden"),
    "proxy": ("restricted.devices.proxy", "Proxy devices are forbidden"),
}


def validate_config(config: dict[str, str], current: dict[str, str], project: str = DEFAULT) -> None:
    """A new project config (PUT's whole config, PATCH's merged one), before anything is written."""
    changed = sorted(k for k in set(config) | set(current) if config.get(k) != current.get(k))
    if project == DEFAULT and any(k in FEATURES for k in changed):
        raise BadRequest("You can't change the features of the default project")
    for k, v in config.items():
        if k.startswith("user."):
            continue
        check = LXD_KEYS.get(k)
        if check is None:
            if k == "features.storage.buckets":
                raise BadRequest('Invalid project configuration key "features.storage.buckets": storage '
                                 'buckets are not supported by this server (nor by LXD 5.0.2)')
            raise BadRequest(f'Invalid project configuration key "{k}"')
        if v == "":
            continue
        try:
            check(v)
        except ValueError as e:
            raise BadRequest(f'Invalid project configuration key "{k}" value: {e}') from None
    for k in changed:
        if k in UNSUPPORTED and config.get(k, "") != "":
            raise BadRequest(f'Project configuration key "{k}" is not supported by this server yet')
    if is_true(config.get("restricted")) and (config.get("features.profiles") or "").lower() in FALSE:
        raise BadRequest("Projects without their own profiles cannot be restricted")


def changed_keys(config: dict[str, str], current: dict[str, str]) -> list[str]:
    return sorted(k for k in set(config) | set(current) if config.get(k, "") != current.get(k, ""))


# ---------------------------------------------------------------------------------- entities
@dataclass
class Entity:
    """An instance (expanded config and devices, profiles applied) or a profile, as checked."""

    name: str
    config: dict[str, str]
    devices: dict[str, dict[str, str]] = field(default_factory=dict)
    type: str = "container"  # "container", "virtual-machine" or "profile"


@dataclass
class VolumeEntity:
    """A custom volume of the project (any pool), as limits.disk counts it: its config."""

    name: str
    config: dict[str, str]


def has_limits_or_restrictions(cfg: dict[str, str]) -> bool:
    return any(k.startswith("limits.") for k in cfg) or is_true(cfg.get("restricted"))


def _restriction(cfg: dict[str, str], key: str) -> str:
    return cfg[key] if key in cfg else RESTRICTION_DEFAULTS.get(key, "")


# ---------------------------------------------------------------------------------- counts
def count_limit(cfg: dict[str, str], key: str) -> int:
    v = cfg.get(key, "")
    return int(v) if v != "" else -1


def check_counts(project: str, cfg: dict[str, str], instances: list[Entity], new_type: str = "container") -> None:
    """A new instance of `new_type` next to `instances` (the project's, the new one not among them)."""
    key = "limits.containers" if new_type == "container" else "limits.virtual-machines"
    limit = count_limit(cfg, key)
    if limit >= 0 and sum(1 for i in instances if i.type == new_type) >= limit:
        raise PolicyError(f'Reached maximum number of instances of type "{new_type}" in project "{project}"')
    limit = count_limit(cfg, "limits.instances")
    if limit >= 0 and len(instances) >= limit:
        raise PolicyError(f'Reached maximum number of instances in project "{project}"')


# ---------------------------------------------------------------------------------- aggregates
def parse_aggregate(key: str, value: str) -> int:
    if key == "limits.disk":
        return parse_byte_size(value)
    if key == "limits.memory":
        if value.endswith("%"):
            raise ValueError("Value can't be a percentage")
        return parse_byte_size(value)
    if key == "limits.cpu" and ("," in value or "-" in value):
        raise ValueError("CPUs can't be pinned if project limits are used")
    if not value.strip().lstrip("-").isdigit():
        raise ValueError(f'strconv.Atoi: parsing "{value}": invalid syntax')
    return int(value)


def iec(n: int, precision: int = 1) -> str:
    """LXD's GetByteSizeStringIEC."""
    if n < 1024:
        return f"{n}B"
    v = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        v /= 1024
        if v < 1024:
            return f"{v:.{precision}f}{unit}"
    return f"{v:.{precision}f}EB"


def _print_total(key: str, n: int) -> str:
    return iec(n) if key in ("limits.memory", "limits.disk") else str(n)


def _volume_sizes(project: str, volumes: Iterable[VolumeEntity], skip_unset: bool) -> int:
    total = 0
    for v in volumes:
        if "size" not in v.config:
            if skip_unset:
                continue
            raise PolicyError(f'Custom volume "{v.name}" in project "{project}" has no "size" config set')
        try:
            total += parse_byte_size(v.config["size"]) if v.config["size"] else 0
        except ValueError as e:
            raise PolicyError(f'Parse "size" for custom volume "{v.name}" in project "{project}": {e}') from None
    return total


def _root_size(project: str, inst: Entity, skip_unset: bool) -> str:
    """The `size` of an instance's root disk ("" when unset and skip_unset)."""
    from lxd_daemon.devices import root_disk

    root = root_disk(inst.devices)
    if root is None:
        if skip_unset:
            return ""
        raise PolicyError(f'Failed getting root disk device for instance "{inst.name}" in project "{project}": '
                          "No root device could be found")
    value = root[1].get("size", "")
    if value == "" and not skip_unset:
        raise PolicyError(f'Instance "{inst.name}" in project "{project}" has no "size" config set on the root '
                          "device either directly or via a profile")
    return value


def totals(project: str, instances: list[Entity], keys: Iterable[str], *, skip_unset: bool,
           volumes: Iterable[VolumeEntity] = ()) -> dict[str, int]:
    out = {k: 0 for k in keys}
    if "limits.disk" in out:
        out["limits.disk"] = _volume_sizes(project, volumes, skip_unset)
    for inst in instances:
        for key in out:
            value = _root_size(project, inst, skip_unset) if key == "limits.disk" else inst.config.get(key, "")
            if value == "":
                if skip_unset:
                    continue
                raise PolicyError(f'Instance "{inst.name}" in project "{project}" has no "{key}" config, '
                                  "either directly or via a profile")
            try:
                out[key] += parse_aggregate(key, value)
            except ValueError:
                if skip_unset:
                    continue
                raise PolicyError(f'Failed parsing "{key}" for instance "{inst.name}" in project "{project}"') \
                    from None
    return out


def check_aggregates(project: str, cfg: dict[str, str], instances: list[Entity],
                     volumes: Iterable[VolumeEntity] = ()) -> None:
    keys = [k for k in AGGREGATE_ALL if k in cfg]
    if not keys:
        return
    try:
        got = totals(project, instances, keys, skip_unset=False, volumes=volumes)
    except PolicyError as e:
        raise PolicyError(f"Failed getting usage of project entities: {e.message}") from None
    for key in keys:
        try:
            limit = parse_aggregate(key, cfg[key])
        except ValueError as e:
            raise PolicyError(str(e)) from None
        if got[key] > limit:
            raise PolicyError(f'Reached maximum aggregate value "{cfg[key]}" for "{key}" in project "{project}"')


# ---------------------------------------------------------------------------------- restrictions
def disk_path_allowed(cfg: dict[str, str], source: str) -> bool:
    paths = cfg.get("restricted.devices.disk.paths", "")
    if not paths:
        return True
    src = os.path.normpath(source or "/").rstrip("/") + "/"
    for parent in paths.split(","):
        p = os.path.normpath(parent.strip() or "/").rstrip("/") + "/"
        if src.startswith(p):
            return True
    return False


def network_allowed(cfg: dict[str, str], network: str, managed: bool) -> bool:
    if is_false_or_empty(cfg.get("restricted")):
        return True
    nic = cfg.get("restricted.devices.nic", "")
    if nic == "block":
        return False
    if nic in ("managed", "") and not managed:
        return False
    access = cfg.get("restricted.networks.access", "")
    if not access:
        return True
    return network in [a.strip() for a in access.split(",")]


def _check_device(cfg: dict[str, str], dev: dict[str, str]) -> None:
    """One device against the restrictions: ValueError(reason) if refused."""
    dtype = dev.get("type", "")
    if dtype in _DEVICE_BANS:
        key, msg = _DEVICE_BANS[dtype]
        if _restriction(cfg, key) != "allow":
            raise ValueError(msg)
    elif dtype == "nic":
        mode = _restriction(cfg, "restricted.devices.nic")
        if mode == "block":
            raise ValueError("Network devices are forbidden")
        if mode == "managed" and not dev.get("network"):
            raise ValueError("Only managed network devices are allowed")
        if dev.get("network"):
            if not network_allowed(cfg, dev["network"], True):
                raise ValueError("Network not allowed in project")
        elif dev.get("parent") and not network_allowed(cfg, dev["parent"], False):
            raise ValueError("Network not allowed in project")
    elif dtype == "disk":
        if dev.get("path") == "/" and dev.get("pool"):
            return
        if not dev.get("path") and dev.get("source") == "cloud-init:config":
            return
        mode = _restriction(cfg, "restricted.devices.disk")
        if mode == "block":
            raise ValueError("Disk devices are forbidden")
        if mode == "managed":
            if not dev.get("pool"):
                raise ValueError("Attaching disks not backed by a pool is forbidden")
        elif mode == "allow" and not dev.get("pool") and not disk_path_allowed(cfg, dev.get("source", "")):
            # (a pool's volume is no host path: LXD 5.0.2 tests its name as one and refuses it)
            raise ValueError(f'Disk source path "{dev.get("source", "")}" not allowed')


def _host_ranges(value: str, isuid: bool) -> list[tuple[int, int]]:
    out = []
    for item in (s.strip() for s in value.split(",")):
        if item:
            out.append(parse_uint32_range(item))
    return out


def _covered(hostid: int, size: int, allowed: list[tuple[int, int]]) -> bool:
    return any(hostid >= a and hostid + size <= a + n for a, n in allowed)


def _raw_idmap_allowed(value: str, uids: list[tuple[int, int]], gids: list[tuple[int, int]]) -> int | None:
    """The index of the first raw.idmap entry whose host ids aren't all allowed, else None."""
    from lxd_daemon.instances.idmap import parse_raw_idmap

    try:
        entries = parse_raw_idmap(value)
    except ValueError as e:
        raise PolicyError(str(e)) from None
    for i, e in enumerate(entries):
        ok = (e.isuid or e.isgid)
        if e.isuid and not _covered(e.hostid, e.maprange, uids):
            ok = False
        if e.isgid and not _covered(e.hostid, e.maprange, gids):
            ok = False
        if not ok:
            return i
    return None


def _lowlevel_forbidden(key: str) -> bool:
    if key.startswith("security.syscalls.intercept") and key not in ALLOWABLE_INTERCEPT:
        return True
    return key in LOWLEVEL_CONTAINER


def _check_config_key(cfg: dict[str, str], key: str, value: str) -> None:
    """ValueError(reason) if the restrictions refuse `key`=`value` on a container (or profile)."""
    if key in ALLOWABLE_INTERCEPT:
        if _restriction(cfg, "restricted.containers.interception") != "allow" and not is_false_or_empty(value):
            raise ValueError("Container syscall interception is forbidden")
    elif key == "security.nesting":
        if _restriction(cfg, "restricted.containers.nesting") == "block" and is_true(value):
            raise ValueError("Container nesting is forbidden")
    elif key == "security.privileged":
        if _restriction(cfg, "restricted.containers.privilege") != "allow" and is_true(value):
            raise ValueError("Privileged containers are forbidden")
    elif key == "security.idmap.isolated":
        if _restriction(cfg, "restricted.containers.privilege") == "isolated" and is_false_or_empty(value):
            raise ValueError("Non-isolated containers are forbidden")


def check_restrictions(project: str, cfg: dict[str, str], instances: list[Entity], profiles: list[Entity]) -> None:
    """Every instance (expanded) and profile of the project against the restrictions of `cfg`
    (whether `restricted` is on is the caller's test)."""
    lowlevel = _restriction(cfg, "restricted.containers.lowlevel") == "allow"
    vm_lowlevel = _restriction(cfg, "restricted.virtual-machines.lowlevel") == "allow"
    try:
        uids = _host_ranges(_restriction(cfg, "restricted.idmap.uid"), True)
        gids = _host_ranges(_restriction(cfg, "restricted.idmap.gid"), False)
    except ValueError as e:
        raise PolicyError(f'Failed parsing "restricted.idmap.uid": {e}') from None
    isolated_required = _restriction(cfg, "restricted.containers.privilege") == "isolated"

    def entity(e: Entity) -> None:
        label = "profile" if e.type == "profile" else e.type
        allow_low = (lowlevel and vm_lowlevel) if e.type == "profile" else (
            lowlevel if e.type == "container" else vm_lowlevel)
        config = dict(e.config)
        if isolated_required and e.type != "profile" and "security.idmap.isolated" not in config:
            # LXD checks the keys present; an instance without the key is not isolated.
            config["security.idmap.isolated"] = ""
        for key in sorted(config):
            value = config[key]
            if not allow_low:
                if key == "raw.idmap":
                    idx = _raw_idmap_allowed(value, uids, gids)
                    if idx is not None:
                        raise PolicyError(f'Use of low-level "raw.idmap" element {idx} on {label} "{e.name}" '
                                          f'of project "{project}" is forbidden')
                elif _lowlevel_forbidden(key) or (e.type == "profile" and key in (
                        "limits.memory.hugepages", "raw.qemu")):
                    raise PolicyError(f'Use of low-level config "{key}" on {label} "{e.name}" of project '
                                      f'"{project}" is forbidden')
            if e.type in ("container", "profile"):
                try:
                    _check_config_key(cfg, key, value)
                except ValueError as err:
                    raise PolicyError(f'Invalid value "{value}" for config "{key}" on {label} "{e.name}" of '
                                      f'project "{project}": {err}') from None
        for dname in sorted(e.devices):
            try:
                _check_device(cfg, e.devices[dname])
            except ValueError as err:
                raise PolicyError(f'Invalid device "{dname}" on {label} "{e.name}" of project "{project}": '
                                  f"{err}") from None

    for inst in instances:
        entity(inst)
    for prof in profiles:
        entity(prof)


def check_volatile(project: str, cfg: dict[str, str], name: str, config: dict[str, str],
                   current: dict[str, str], inst_type: str = "container") -> None:
    """Setting or changing volatile.* keys (but the safe ones) needs low-level access."""
    low = "restricted.containers.lowlevel" if inst_type == "container" else "restricted.virtual-machines.lowlevel"
    if cfg.get(low) == "allow":
        return
    for key, value in sorted(config.items()):
        if not key.startswith("volatile."):
            continue
        if key in SAFE_VOLATILE or key.endswith((".apply_quota", ".hwaddr")):
            continue
        if key not in current:
            raise PolicyError(f'Setting "{key}" on {inst_type} "{name}" in project "{project}" is forbidden')
        if current[key] != value:
            raise PolicyError(f'Changing "{key}" on {inst_type} "{name}" in project "{project}" is forbidden')


# ---------------------------------------------------------------------------------- entry point
@dataclass
class Change:
    """What a request would change: `kind` is "create" (`instance` is new; `strip` for copies and
    imports, whose volatile keys are the source's), "update" (`instance` replaces the one of
    the same name; `current` is its local config now, `local` the new local config) or
    "profile" (`profile` replaces the one of the same name)."""

    kind: str
    instance: Entity | None = None
    local: dict[str, str] = field(default_factory=dict)
    current: dict[str, str] = field(default_factory=dict)
    profile: Entity | None = None
    strip: bool = False


def check(project: str, cfg: dict[str, str], instances: list[Entity], profiles: list[Entity], change: Change,
          volumes: Iterable[VolumeEntity] = ()) -> None:
    """THE check of a change to a project's instances or profiles (instances expanded, the
    changed one excluded for create; profiles as they are; `volumes` the project's custom
    volumes, for limits.disk). Raises PolicyError with LXD's text."""
    if not has_limits_or_restrictions(cfg):
        return
    others = [i for i in instances if change.instance is None or i.name != change.instance.name]
    if change.kind == "create":
        check_counts(project, cfg, others, change.instance.type)
        if not change.strip:
            check_volatile(project, cfg, change.instance.name, change.local, {}, change.instance.type)
        after, what = [*others, change.instance], "instance creation"
    elif change.kind == "update":
        check_volatile(project, cfg, change.instance.name, change.local, change.current, change.instance.type)
        after, what = [*others, change.instance], "instance update"
    else:
        after, what = instances, "profile update"
        profiles = [change.profile if p.name == change.profile.name else p for p in profiles]
    _check_all(project, cfg, after, profiles, volumes, what)


def _check_all(project: str, cfg: dict[str, str], instances: list[Entity], profiles: list[Entity],
               volumes, what: str) -> None:
    """The aggregate limits, and the restrictions when the project is restricted, over the
    project as it would be after the change `what` ("instance creation", ...)."""
    try:
        check_aggregates(project, cfg, instances, volumes)
        if is_true(cfg.get("restricted")):
            check_restrictions(project, cfg, instances, profiles)
    except PolicyError as e:
        raise PolicyError(f"Failed checking if {what} allowed: {e.message}") from None


def check_volume(project: str, cfg: dict[str, str], instances: list[Entity], profiles: list[Entity],
                 volumes: Iterable[VolumeEntity], what: str) -> None:
    """A custom volume create, copy or import (`what` "creation"), or config change ("update"):
    `volumes` are the project's custom volumes with the proposed one in its new state. Only while
    limits.disk is set, and then every aggregate limit and restriction is checked (as LXD)."""
    if not cfg.get("limits.disk"):
        return
    _check_all(project, cfg, instances, profiles, volumes, f"volume {what}")


def check_network_count(project: str, cfg: dict[str, str], networks: Iterable[str], name: str) -> None:
    """A new managed network `name` next to the project's `networks` (limits.networks)."""
    limit = count_limit(cfg, "limits.networks")
    existing = list(networks)
    if limit >= 0 and name not in existing and len(existing) >= limit:
        raise PolicyError("Networks limit has been reached for project")


def check_project_update(project: str, new: dict[str, str], current: dict[str, str], instances: list[Entity],
                         profiles: list[Entity], volumes: Iterable[VolumeEntity] = (), networks: int = 0) -> None:
    """A project config change against the project's instances, profiles, custom volumes and
    managed networks now."""
    for key in changed_keys(new, current):
        if key == "restricted" or key.startswith("restricted."):
            # (LXD 5.0.2 re-checks on a restricted.* change even while `restricted` is off, which
            # refuses unsetting a restriction of an unrestricted project: only when it applies.)
            if not is_true(new.get("restricted")):
                continue
            try:
                check_restrictions(project, new, instances, profiles)
            except PolicyError as e:
                raise PolicyError(f'Conflict detected when changing "{key}" in project "{project}": '
                                  f"{e.message}") from None
        elif key == "limits.instances" and new.get(key, "") != "":
            if int(new[key]) < len(instances):
                raise PolicyError(f'Can\'t change limits.instances in project "{project}": "limits.instances" is '
                                  f'too low: there currently are {len(instances)} total instances in project '
                                  f'"{project}"')
        elif key in ("limits.containers", "limits.virtual-machines") and new.get(key, "") != "":
            itype = "container" if key == "limits.containers" else "virtual-machine"
            n = sum(1 for i in instances if i.type == itype)
            if int(new[key]) < n:
                raise PolicyError(f'Can\'t change "{key}" in project "{project}": "{key}" is too low: there '
                                  f'currently are {n} instances of type {itype} in project "{project}"')
        elif key == "limits.networks" and new.get(key, "") != "":
            # (LXD 5.0.2 doesn't check this one; below the usage it would only refuse creates.)
            if int(new[key]) < networks:
                raise PolicyError(f'Can\'t change "limits.networks" in project "{project}": "limits.networks" is '
                                  f'too low: there currently are {networks} networks in project "{project}"')
        elif key in AGGREGATE_ALL and new.get(key, "") != "":
            got = totals(project, instances, [key], skip_unset=False, volumes=volumes)
            try:
                limit = parse_aggregate(key, new[key])
            except ValueError as e:
                raise PolicyError(f'Invalid value "{new[key]}" for limit "{key}": {e}') from None
            if limit < got[key]:
                raise PolicyError(f'"{key}" is too low: current total is "{_print_total(key, got[key])}"')


def disk_usage(instances: list[Entity], volume_sizes: Iterable[str]) -> int:
    """The root disks' and custom volumes' `size` (those that have one), as LXD sums them."""
    from lxd_daemon.devices import root_disk

    total = 0
    sizes = list(volume_sizes)
    for inst in instances:
        root = root_disk(inst.devices)
        if root is not None:
            sizes.append(root[1].get("size", ""))
    for v in sizes:
        try:
            total += parse_byte_size(v) if v else 0
        except ValueError:
            continue
    return total


def allocations(cfg: dict[str, str], instances: list[Entity], networks: int,
                volume_sizes: Iterable[str] = ()) -> dict[str, dict[str, int]]:
    """`resources` of GET /1.0/projects/{name}/state (limit -1 when unset)."""
    got = totals("", instances, AGGREGATE, skip_unset=True)

    def limit_of(key: str) -> int:
        v = cfg.get(key, "")
        if not v:
            return -1
        try:
            return parse_aggregate(key, v) if key in AGGREGATE else (
                parse_byte_size(v) if key == "limits.disk" else int(v))
        except ValueError:
            return -1

    return {
        "containers": {"limit": limit_of("limits.containers"),
                       "usage": sum(1 for i in instances if i.type == "container")},
        "cpu": {"limit": limit_of("limits.cpu"), "usage": got["limits.cpu"]},
        "disk": {"limit": limit_of("limits.disk"), "usage": disk_usage(instances, volume_sizes)},
        "instances": {"limit": limit_of("limits.instances"), "usage": len(instances)},
        "memory": {"limit": limit_of("limits.memory"), "usage": got["limits.memory"]},
        "networks": {"limit": limit_of("limits.networks"), "usage": networks},
        "processes": {"limit": limit_of("limits.processes"), "usage": got["limits.processes"]},
        "virtual-machines": {"limit": limit_of("limits.virtual-machines"),
                             "usage": sum(1 for i in instances if i.type == "virtual-machine")},
    }


def check_target(cfg: dict[str, str], target: str) -> None:
    """`?target=MEMBER` on an instance create, copy or move: a restricted project refuses it first
    (restricted.cluster.target), as LXD; and this server is not a cluster."""
    if not target:
        return
    if is_true(cfg.get("restricted")) and _restriction(cfg, "restricted.cluster.target") != "allow":
        raise Forbidden("This project doesn't allow cluster member targeting")
    raise BadRequest("Target only allowed when clustered")


def snapshot_allowed(project: str, cfg: dict[str, str]) -> None:
    if is_true(cfg.get("restricted")) and _restriction(cfg, "restricted.snapshots") == "block":
        raise PolicyError(f'Project "{project}" doesn\'t allow for snapshot creation')


def backup_allowed(project: str, cfg: dict[str, str]) -> None:
    if is_true(cfg.get("restricted")) and _restriction(cfg, "restricted.backups") == "block":
        raise PolicyError(f'Project "{project}" doesn\'t allow for backup creation')


# ---------------------------------------------------------------------------------- state
def parse_config(stored: str | None) -> dict[str, str]:
    """A project's config as the `projects` table stores it (JSON)."""
    return {str(k): str(v) for k, v in json.loads(stored or "{}").items()}


def _sized(config: dict[str, str]) -> dict[str, str]:
    return {"size": str(config["size"])} if "size" in config else {}


class ProjectPolicy:
    """The projects' config in memory, and the proposals that passed check() but aren't
    recorded yet (name -> Entity, by project)."""

    def __init__(self, db):
        self.db = db
        self.configs: dict[str, dict[str, str]] = {DEFAULT: {}}
        # project -> instance name -> (local config, local devices, profiles, type)
        self.claims: dict[str, dict[str, tuple[dict, dict, list[str], str]]] = {}
        # The custom volumes' `size` for limits.disk (kept by storage/custom.py, which checks and
        # records a new volume in one synchronous step): project -> (pool id, name) -> {"size": ..}
        # (empty when the volume has none), and volume id -> (project, pool id, name).
        self.volumes: dict[str, dict[tuple[int, str], dict[str, str]]] = {}
        self._volume_ids: dict[int, tuple[str, int, str]] = {}

    async def load(self) -> None:
        from sqlalchemy import text

        def q(session):
            return session.execute(text("SELECT name, config FROM projects")).all()

        for name, config in await self.db.run(q):
            self.configs[name] = parse_config(config)
        await self.load_volumes()

    async def load_volumes(self) -> None:
        from sqlalchemy import text

        def q(session):
            return session.execute(text("SELECT id, pool_id, project, name, config FROM storage_volumes "
                                        "WHERE type='custom'")).all()

        for vid, pool_id, project, name, config in await self.db.run(q):
            self.set_volume(project, pool_id, name, json.loads(config or "{}"), vid)

    # -- custom volumes (limits.disk) ---------------------------------------------------------
    def volume_entities(self, project: str, replace: tuple[int, str, dict[str, str]] | None = None
                        ) -> list[VolumeEntity]:
        """The project's custom volumes; `replace` = (pool id, name, config) stands for that
        volume's proposed state (a new one or a changed one)."""
        vols = dict(self.volumes.get(project, {}))
        if replace is not None:
            vols[(replace[0], replace[1])] = _sized(replace[2])
        return [VolumeEntity(n, dict(c)) for (_, n), c in sorted(vols.items())]

    def set_volume(self, project: str, pool_id: int, name: str, config: dict[str, str] | None,
                   vid: int | None = None) -> dict[str, str] | None:
        """Record (config None: forget) a volume; returns what was recorded before."""
        vols = self.volumes.setdefault(project, {})
        before = vols.pop((pool_id, name), None)
        if config is not None:
            vols[(pool_id, name)] = _sized(config)
            if vid is not None:
                self._volume_ids[vid] = (project, pool_id, name)
        return before

    def volume_by_id(self, vid: int) -> tuple[str, int, str] | None:
        return self._volume_ids.get(vid)

    def forget_volume_id(self, vid: int) -> None:
        key = self._volume_ids.pop(vid, None)
        if key is not None:
            self.volumes.get(key[0], {}).pop((key[1], key[2]), None)

    def config(self, project: str = DEFAULT) -> dict[str, str]:
        return self.configs.get(project, {})

    def set_config(self, project: str, config: dict[str, str]) -> None:
        self.configs[project] = dict(config)

    def claim(self, project: str, name: str, local: tuple[dict, dict, list[str], str]) -> None:
        """Hold a checked proposal (local config, devices, profiles) until it is recorded."""
        self.claims.setdefault(project, {})[name] = local

    def release(self, project: str, name: str) -> None:
        self.claims.get(project, {}).pop(name, None)
