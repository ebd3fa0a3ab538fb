"""Device validation: one option table per device type (disk, unix-char, unix-block, none).

Validation here is pure (no host lookups): whether a disk's source exists, or a unix device's
node, is checked when the container starts or the device is hot-plugged (lxcconf / live), as LXD
does, so that `optional` / `required` can say what happens then. A disk with `pool` and `source`
is a custom storage volume: whether it exists is checked when the device is added (instances/disks.py).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable

from lxd_daemon.errors import BadRequest
from lxd_daemon.util import validate as v
from lxd_daemon.util.sizes import parse_byte_size

PROPAGATION = ("private", "shared", "slave", "unbindable", "rprivate", "rshared", "rslave", "runbindable")

# Device types LXD has that this daemon does not implement (yet): a clear 400 rather than "unknown".
NOT_YET = {
    "nic": "nic devices are not supported yet",
    "infiniband": "infiniband devices are not supported",
    "gpu": "gpu devices are not supported",
    "usb": "usb devices are not supported",
    "proxy": "proxy devices are not supported",
    "unix-hotplug": "unix-hotplug devices are not supported",
    "tpm": "tpm devices are not supported",
    "pci": "pci devices are not supported",
}


def _is_abs_path(value: str) -> None:
    if not value.startswith("/"):
        raise ValueError(f"{value!r} is not an absolute path")
    if "\0" in value or "\n" in value:
        raise ValueError("the path contains a NUL or newline")


def _is_size(value: str) -> None:
    parse_byte_size(value)


def _is_octal_mode(value: str) -> None:
    if not re.fullmatch(r"0?[0-7]{1,4}", value):
        raise ValueError(f"{value!r} is not an octal file mode")


def _is_uint32(value: str) -> None:
    if not value.isdigit() or int(value) >= 2 ** 32:
        raise ValueError(f"{value!r} is not a valid id")


def _is_device_number(value: str) -> None:
    if not value.isdigit() or int(value) >= 2 ** 20:
        raise ValueError(f"{value!r} is not a device number")


Check = Callable[[str], None]

COMMON: dict[str, Check] = {"type": v.is_any}

OPTIONS: dict[str, dict[str, Check]] = {
    "disk": {
        "path": _is_abs_path,
        "source": v.is_any,
        "pool": v.is_any,
        "readonly": v.is_bool,
        "recursive": v.is_bool,
        "propagation": v.is_one_of(*PROPAGATION),
        "shift": v.is_bool,
        "optional": v.is_bool,
        "required": v.is_bool,
        "size": _is_size,
        "boot.priority": v.is_uint,
    },
    "unix-char": {
        "path": _is_abs_path,
        "source": _is_abs_path,
        "major": _is_device_number,
        "minor": _is_device_number,
        "uid": _is_uint32,
        "gid": _is_uint32,
        "mode": _is_octal_mode,
        "required": v.is_bool,
    },
    "none": {},
}
OPTIONS["unix-block"] = OPTIONS["unix-char"]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-:]*")


def _bool(dev: dict[str, str], key: str, default: bool = False) -> bool:
    val = dev.get(key, "")
    return v.parse_bool(val) if val else default


def is_root_disk(dev: dict[str, str]) -> bool:
    return dev.get("type") == "disk" and dev.get("path") == "/" and not dev.get("source")


def root_disk(devices: dict[str, dict[str, str]]) -> tuple[str, dict[str, str]] | None:
    for name, dev in devices.items():
        if is_root_disk(dev):
            return name, dev
    return None


def disk_required(dev: dict[str, str]) -> bool:
    """A disk whose source is missing fails the start unless optional=true (or required=false)."""
    if "optional" in dev and dev["optional"] != "":
        return not _bool(dev, "optional")
    return _bool(dev, "required", True)


def unix_required(dev: dict[str, str]) -> bool:
    return _bool(dev, "required", True)


def container_path(dev: dict[str, str]) -> str:
    """Where a disk / unix device appears inside the container (absolute, normalised)."""
    path = dev.get("path") or dev.get("source") or ""
    norm = os.path.normpath("/" + path.lstrip("/"))
    return norm


def _check_disk(name: str, dev: dict[str, str], *, profile: bool, pools: set[str] | None) -> None:
    path = dev.get("path", "")
    if not path:
        raise BadRequest(f"Invalid device {name!r}: disk devices need a path")
    pool = dev.get("pool", "")
    if path == "/":
        if dev.get("source"):
            raise BadRequest(f"Invalid device {name!r}: the root disk cannot have a source")
        if not pool:
            raise BadRequest(f"Invalid device {name!r}: the root disk needs a pool")
        for k in ("readonly", "shift", "recursive", "propagation"):
            if dev.get(k):
                raise BadRequest(f"Invalid device {name!r}: option {k!r} is not supported on the root disk")
        if dev.get("optional") and _bool(dev, "optional"):
            raise BadRequest(f"Invalid device {name!r}: the root disk cannot be optional")
    else:
        if dev.get("size"):
            raise BadRequest(f"Invalid device {name!r}: size is only supported on the root disk")
        source = dev.get("source", "")
        if not source:
            raise BadRequest(f"Invalid device {name!r}: disk devices other than the root disk need a source")
        if "\0" in source or "\n" in source:
            raise BadRequest(f"Invalid device {name!r}: invalid source path")
        if pool:
            _check_volume_disk(name, dev)
        elif not source.startswith("/"):
            raise BadRequest(f"Invalid device {name!r}: source {source!r} must be an absolute host path "
                             f"(or the name of a custom storage volume, with `pool`)")
        if "optional" in dev and "required" in dev and dev["optional"] and dev["required"]:
            if _bool(dev, "optional") == _bool(dev, "required"):
                raise BadRequest(f"Invalid device {name!r}: optional and required contradict each other")
    if pool and pools is not None and pool not in pools:
        raise BadRequest(f"Invalid device {name!r}: storage pool {pool!r} doesn't exist")


# Volume types a disk's `source` may name as "<type>/<volume>" (LXD 5.0): only custom volumes.
_REFUSED_VOLUME_TYPES = {"container": "Using instance storage volumes is not supported",
                         "virtual-machine": "Using instance storage volumes is not supported",
                         "image": "Using image storage volumes is not supported"}


def volume_source(source: str) -> str:
    """The custom volume a `pool` disk's source names ("vol" or "custom/vol"); ValueError for
    another volume type or a snapshot ("vol/snap": LXD 5.0 attaches no snapshots)."""
    if source.startswith("/"):
        raise ValueError("Storage volumes cannot be specified as absolute paths")
    vtype, sep, vname = source.partition("/")
    if not sep:
        return source
    if vtype in _REFUSED_VOLUME_TYPES:
        raise ValueError(_REFUSED_VOLUME_TYPES[vtype])
    if vtype != "custom":
        raise ValueError(f"Unknown storage volume type prefix {vtype!r} in {source!r} (snapshots of custom "
                         f"volumes can't be attached)")
    if not vname or "/" in vname:
        raise ValueError(f"Invalid storage volume name {vname!r} (snapshots of custom volumes can't be attached)")
    return vname


def is_volume_disk(dev: dict[str, str]) -> bool:
    """A disk backed by a custom storage volume (pool + source, not the root disk)."""
    return dev.get("type") == "disk" and bool(dev.get("pool")) and bool(dev.get("source")) \
        and dev.get("path") != "/"


def _check_volume_disk(name: str, dev: dict[str, str]) -> None:
    if dev.get("shift"):
        raise BadRequest(f'Invalid device {name!r}: the "shift" property cannot be used with custom storage '
                         f'volumes (set security.shifted=true on the volume instead)')
    try:
        volume_source(dev["source"])
    except ValueError as e:
        raise BadRequest(f"Invalid device {name!r}: {e}") from None


def _check_unix(name: str, dev: dict[str, str], *, profile: bool) -> None:
    if not dev.get("path") and not dev.get("source"):
        raise BadRequest(f"Invalid device {name!r}: unix devices need a path or a source")
    if bool(dev.get("major")) != bool(dev.get("minor")):
        raise BadRequest(f"Invalid device {name!r}: major and minor must be given together")
    if container_path(dev) in ("/", "/dev", "/proc", "/sys"):
        raise BadRequest(f"Invalid device {name!r}: invalid path {container_path(dev)!r}")


def validate_device(name: str, dev: dict[str, str], *, profile: bool = False,
                    pools: set[str] | None = None) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name) or len(name) > 64:
        raise BadRequest(f"Invalid device name {name!r}")
    if not isinstance(dev, dict):
        raise BadRequest(f"Invalid device {name!r}: must be an object")
    kind = dev.get("type", "")
    if not kind:
        raise BadRequest(f"Invalid device {name!r}: missing device type")
    if kind in NOT_YET:
        raise BadRequest(f"Invalid device {name!r}: {NOT_YET[kind]}")
    table = OPTIONS.get(kind)
    if table is None:
        raise BadRequest(f"Invalid device {name!r}: unknown device type {kind!r}")
    for key, value in dev.items():
        if not isinstance(value, str):
            raise BadRequest(f"Invalid device {name!r}: the value of {key!r} must be a string")
        check = table.get(key) or COMMON.get(key)
        if check is None:
            raise BadRequest(f"Invalid device {name!r}: unsupported {kind} device option {key!r}")
        if value == "":
            continue
        try:
            check(value)
        except ValueError as e:
            raise BadRequest(f"Invalid device {name!r}: invalid value for {key!r}: {e}") from None
    if kind == "disk":
        _check_disk(name, dev, profile=profile, pools=pools)
    elif kind in ("unix-char", "unix-block"):
        _check_unix(name, dev, profile=profile)


def validate_devices(devices: dict[str, dict[str, str]], *, profile: bool = False,
                     pools: set[str] | None = None) -> None:
    """Raise BadRequest naming the first bad device; also refuse two root disks or two devices
    mounted at the same path."""
    if not isinstance(devices, dict):
        raise BadRequest("Invalid devices: must be an object")
    seen: dict[str, str] = {}
    roots = []
    for name, dev in devices.items():
        validate_device(name, dev, profile=profile, pools=pools)
        kind = dev.get("type")
        if kind == "disk" and is_root_disk(dev):
            roots.append(name)
            continue
        if kind in ("disk", "unix-char", "unix-block"):
            path = container_path(dev)
            if path in seen:
                raise BadRequest(f"Invalid device {name!r}: path {path!r} is already used by device {seen[path]!r}")
            seen[path] = name
    if len(roots) > 1:
        raise BadRequest(f"Invalid devices: more than one root disk ({', '.join(sorted(roots))})")
