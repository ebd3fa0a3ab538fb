"""Instance records (what the store holds) and the Instance view other subsystems use."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lxd_daemon.instances.idmap import IdmapSet
from lxd_daemon.projects.naming import storage_name


@dataclass
class Record:
    """One instance as stored: local config/devices and its profiles, in order."""

    id: int
    name: str
    architecture: str
    ephemeral: bool
    stateful: bool
    description: str
    created_at: str
    last_used_at: str
    config: dict[str, str]
    devices: dict[str, dict[str, str]]
    profiles: list[str]
    type: str = "container"
    project: str = "default"

    @property
    def key(self) -> str:
        """The instance's name on the host and its key in InstanceService.records (projects/naming.py)."""
        return storage_name(self.project, self.name)


@dataclass
class Runtime:
    """A running container as the daemon tracks it: init pid, its identity and a pidfd watch."""

    pid: int
    start_time: int | None
    pidfd: int
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    stopping: bool = False  # the daemon itself is stopping it (no "unexpected exit" handling)
    cgroups: dict[str, str] = field(default_factory=dict)  # controller -> cgroup dir of init
    net: dict | None = None  # last network state read, and when (time.monotonic())
    net_at: float = 0.0
    links: Any = None  # state.NetnsLinks of init's network namespace (closed when the watch ends)


@dataclass
class Instance:
    """What exec/files/console/metadata code needs about one instance.

    name      its key (storage name, Record.key): every host-facing use (liblxc, lanes, locks,
              paths) and every InstanceService call
    project   its project; api_name: its own name, the one the API shows (svc.url(name) for URLs)
    """

    name: str
    project: str
    api_name: str
    instance_dir: Path
    rootfs: Path
    log_dir: Path
    lxcpath: Path
    expanded_config: dict[str, str]
    expanded_devices: dict[str, dict[str, str]]
    disk_idmap: IdmapSet
    idmap: IdmapSet
    privileged: bool
    lane: str
    ephemeral: bool = False
    architecture: str = ""
    profiles: list[str] = field(default_factory=list)


@dataclass
class FrozenRootfs:
    rootfs: Path
    metadata_dir: Path
    uid_shift: int
    gid_shift: int
