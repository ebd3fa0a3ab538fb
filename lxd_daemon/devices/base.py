"""The device interface (one subclass per device type) and what a device is given to work with."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from lxd_daemon.devices.runconfig import RunConfig
from lxd_daemon.errors import BadRequest
from lxd_daemon.instances.idmap import IdmapSet
from lxd_daemon.projects.naming import DEFAULT, split
from lxd_daemon.util import validate as v
from lxd_daemon.util.sizes import parse_byte_size

Check = Callable[[str], None]

# -- option checks shared by device types -------------------------------------------------------


def is_abs_path(value: str) -> None:
    if not value.startswith("/"):
        raise ValueError(f"{value!r} is not an absolute path")
    if "\0" in value or "\n" in value:
        raise ValueError("the path contains a NUL or newline")


def is_size(value: str) -> None:
    parse_byte_size(value)


def is_octal_mode(value: str) -> None:
    if not re.fullmatch(r"0?[0-7]{1,4}", value):
        raise ValueError(f"{value!r} is not an octal file mode")


def is_uint32(value: str) -> None:
    if not value.isdigit() or int(value) >= 2 ** 32:
        raise ValueError(f"{value!r} is not a valid id")


def is_device_number(value: str) -> None:
    if not value.isdigit() or int(value) >= 2 ** 20:
        raise ValueError(f"{value!r} is not a device number")


COMMON: dict[str, Check] = {"type": v.is_any}


def dev_bool(dev: dict[str, str], key: str, default: bool = False) -> bool:
    val = dev.get(key, "")
    return v.parse_bool(val) if val else default


def container_path(dev: dict[str, str]) -> str:
    """Where a disk / unix device appears inside the container (absolute, normalised)."""
    path = dev.get("path") or dev.get("source") or ""
    return os.path.normpath("/" + path.lstrip("/"))


# -- context ------------------------------------------------------------------------------------


@dataclass
class DeviceContext:
    """What a device of instance `instance` works with.

    devices_dir  the instance's host directory for device state (unix nodes, block device mounts)
    instances    the instance service, for devices whose host work involves other instances or
                 storage (custom volumes): `.services.storage`, `.records`, `.status_of(name)`,
                 `.expanded(name)`; None where there is no daemon (a raw container in tests):
                 such devices then refuse to start
    prepared     per device name, what its start() prepared on the host (a disk's DiskSource),
                 so that a later pure run_config() (lxcconf.render) describes the prepared device
    runtime      the runtime client (runtime/client.py), for host probes that fork and so must
                 run in a worker (idmapped mount support); None: probed in this process (tests)
    init_pid     the running container's init pid where known (set once liblxc started it, for
                 post_start hooks; at adoption after a daemon restart); 0: ask ctx.instances
    """

    instance: str  # the instance's key (storage name: `c1`, `p1_c1`), as InstanceService knows it
    idmap: IdmapSet
    privileged: bool
    devices_dir: Path
    project: str = ""  # the instance's project ("": the one its key names)
    instances: Any = None
    prepared: dict[str, Any] = field(default_factory=dict)
    runtime: Any = None
    init_pid: int = 0

    def __post_init__(self) -> None:
        if not self.project:
            self.project = split(self.instance)[0]

    @property
    def instance_name(self) -> str:
        """The instance's own (API) name."""
        return split(self.instance)[1]

    @property
    def dns_name(self) -> str:
        """The instance's name in DNS/DHCP: `c1`, or `c1.p1` outside the default project (as LXD)."""
        return self.instance_name if self.project == DEFAULT else f"{self.instance_name}.{self.project}"

    @property
    def root_ids(self) -> tuple[int, int]:
        """Host (uid, gid) of the container's root (mount points are made as it)."""
        return (0, 0) if self.privileged else self.idmap.root_ids()

    @property
    def node_idmap(self) -> IdmapSet:
        """The map device node owners are shifted through (none for a privileged container)."""
        return IdmapSet(()) if self.privileged else self.idmap


# -- the interface ------------------------------------------------------------------------------


class Device:
    """One device of an instance: `name` and its config (the expanded device dict).

    Subclasses set `type` and `options` (option name -> check of a non-empty value) and override
    what they need of: check() (type-specific validation), run_config(), start(), stop(), remove().
    Objects are cheap and stateless (made per operation from the config); host state a start
    made is found again from the config and the context."""

    type: ClassVar[str] = ""
    options: ClassVar[dict[str, Check]] = {}

    def __init__(self, name: str, config: dict[str, str]):
        self.name = name
        self.config = config

    # -- validation (pure: no host lookups) ------------------------------------------------------
    def validate(self, *, profile: bool = False, pools: set[str] | None = None) -> None:
        """BadRequest naming the device when its config is invalid."""
        name, kind = self.name, self.type
        for key, value in self.config.items():
            if not isinstance(value, str):
                raise BadRequest(f"Invalid device {name!r}: the value of {key!r} must be a string")
            check = self.options.get(key) or COMMON.get(key)
            if check is None:
                raise BadRequest(f"Invalid device {name!r}: unsupported {kind} device option {key!r}")
            if value == "":
                continue
            try:
                check(value)
            except ValueError as e:
                raise BadRequest(f"Invalid device {name!r}: invalid value for {key!r}: {e}") from None
        self.check(profile=profile, pools=pools)

    def check(self, *, profile: bool, pools: set[str] | None) -> None:
        """Type-specific validation after the option table (override)."""

    def claimed_path(self) -> str | None:
        """The container path this device occupies (two devices may not claim the same one)."""
        return None

    @property
    def hotpluggable(self) -> bool:
        """Whether a change of this device applies to a running container (else at next start)."""
        return False

    def updates_live(self, old: dict[str, str]) -> bool:
        """Whether a change from config `old` applies to the running device as it is (update_live)
        rather than by unplugging and plugging it again."""
        return False

    async def update_live(self, old: dict[str, str], ctx: DeviceContext) -> None:
        """Apply this config to the running device in place (only where updates_live(old))."""

    @property
    def sort_key(self) -> tuple[int, str]:
        """Devices start shallowest mount path first (then by name), and stop in reverse."""
        return (container_path(self.config).count("/"), self.name)

    # -- lifecycle ------------------------------------------------------------------------------
    def run_config(self, ctx: DeviceContext) -> RunConfig:
        """What the container needs, from the config, ctx.prepared and the host as it is (read
        only: this may stat host paths, never changes the host). Synchronous: call it in a thread
        from the event loop. BadRequest when a required host resource is missing."""
        return RunConfig()

    async def start(self, ctx: DeviceContext) -> RunConfig:
        """Prepare the host for the device (before a start, or a hot-plug) and describe what the
        container needs. Whatever host work this does is undone by the returned post_start hooks
        (transient work) or by stop()'s post_stop hooks."""
        return await asyncio.to_thread(self.run_config, ctx)

    async def stop(self, ctx: DeviceContext) -> RunConfig:
        """What to take back from a running container (mount targets, cgroup rules), plus the
        post_stop hooks that undo start()'s host work; also called after the container stopped
        (then only the hooks run)."""
        return RunConfig()

    async def remove(self, ctx: DeviceContext) -> None:
        """The device left the instance (hot-unplugged, or the instance deleted): remove what it
        keeps on the host between starts."""

    async def adopt(self, ctx: DeviceContext) -> None:
        """The daemon (re)started while the container runs (ctx.init_pid): take back what start()
        left running on the host (a supervised process) without disturbing the container."""
