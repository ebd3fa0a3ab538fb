"""Device types by name, and validation of an instance's or profile's devices."""

from __future__ import annotations

import re

from lxd_daemon.devices.base import Device
from lxd_daemon.devices.disk import Disk
from lxd_daemon.devices.nic import Nic
from lxd_daemon.devices.none import NoneDevice
from lxd_daemon.devices.proxy import Proxy
from lxd_daemon.devices.unix import UnixBlock, UnixChar
from lxd_daemon.errors import BadRequest

DEVICE_TYPES: dict[str, type[Device]] = {cls.type: cls for cls in (Disk, UnixChar, UnixBlock, NoneDevice, Nic,
                                                                      Proxy)}

# Device types LXD has that this daemon does not implement (yet): a clear 400 rather than "unknown".
NOT_YET = {
    "infiniband": "infiniband devices are not supported",
    "gpu": "gpu devices are not supported",
    "usb": "usb devices are not supported",
    "unix-hotplug": "unix-hotplug devices are not supported",
    "tpm": "tpm devices are not supported",
    "pci": "pci devices are not supported",
}

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-:]*")


def load(name: str, config: dict[str, str]) -> Device | None:
    """The device object for a (validated) device config; None for a type this daemon has no
    implementation of (stored configs are validated when written, so only in odd cases)."""
    cls = DEVICE_TYPES.get(config.get("type", ""))
    return cls(name, config) if cls is not None else None


def load_all(devices: dict[str, dict[str, str]]) -> list[Device]:
    """Device objects in start order (shallowest mount path first, then by name)."""
    out = [d for n, c in devices.items() if (d := load(n, c)) is not None]
    return sorted(out, key=lambda d: d.sort_key)


def validate_device(name: str, dev: dict[str, str], *, profile: bool = False,
                    pools: set[str] | None = None) -> Device:
    if not isinstance(name, str) or not _NAME.fullmatch(name) or len(name) > 64:
        raise BadRequest(f"Invalid device name {name!r}")
    if not isinstance(dev, dict):
        raise BadRequest(f"Invalid device {name!r}: must be an object")
    kind = dev.get("type", "")
    if not kind:
        raise BadRequest(f"Invalid device {name!r}: missing device type")
    if kind in NOT_YET:
        raise BadRequest(f"Invalid device {name!r}: {NOT_YET[kind]}")
    cls = DEVICE_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise BadRequest(f"Invalid device {name!r}: unknown device type {kind!r}")
    device = cls(name, dev)
    device.validate(profile=profile, pools=pools)
    return device


def validate_devices(devices: dict[str, dict[str, str]], *, profile: bool = False,
                     pools: set[str] | None = None) -> None:
    """Raise BadRequest naming the first bad device; also refuse two root disks or two devices
    mounted at the same path."""
    if not isinstance(devices, dict):
        raise BadRequest("Invalid devices: must be an object")
    seen: dict[str, str] = {}
    roots = []
    for name, dev in devices.items():
        device = validate_device(name, dev, profile=profile, pools=pools)
        if isinstance(device, Disk) and device.is_root:
            roots.append(name)
            continue
        path = device.claimed_path()
        if path is not None:
            if path in seen:
                raise BadRequest(f"Invalid device {name!r}: path {path!r} is already used by device {seen[path]!r}")
            seen[path] = name
    if len(roots) > 1:
        raise BadRequest(f"Invalid devices: more than one root disk ({', '.join(sorted(roots))})")
