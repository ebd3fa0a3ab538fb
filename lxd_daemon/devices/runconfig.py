"""What a device needs of the container, as data: the value a device's start() and stop() return.

The start path (instances/lxcconf.py renders it as liblxc config items) and the hotplug path
(instances/live.py applies it through the runtime workers) consume the same values, so a device
type is written once. Everything here is plain data (picklable except the hooks, which stay in
the daemon process).
"""

from __future__ import annotations

import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

Hook = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class MountEntry:
    """A bind mount of host `source` at absolute container path `target`.

    kind: "dir" or "file" (what the mount point is created as). At stop, only `target` matters
    (what is unmounted, and the mount point removed when it holds nothing)."""

    source: str
    target: str
    kind: str = "dir"
    recursive: bool = False
    readonly: bool = False
    propagation: str = ""
    shift: bool = False      # idmapped to the container's user namespace

    def options(self) -> list[str]:
        """liblxc mount options (lxc.mount.entry's fourth field)."""
        opts = ["rbind" if self.recursive else "bind", "create=dir" if self.kind == "dir" else "create=file"]
        if self.readonly:
            opts.append("ro")
        if self.propagation:
            opts.append(self.propagation)
        if self.shift:
            opts.append("idmap=container")
        return opts

    def hotplug_options(self, root_uid: int, root_gid: int) -> dict:
        """The options runtime/hotplug.py's hotplug_mount takes."""
        return {"kind": self.kind, "recursive": self.recursive, "readonly": self.readonly,
                "propagation": self.propagation, "shift": self.shift, "root_uid": root_uid,
                "root_gid": root_gid}


@dataclass(frozen=True)
class DeviceRule:
    """A device cgroup rule ("c 1:3 rwm"). Applied only where the devices controller confines the
    container (privileged containers; a user namespace confines the others)."""

    kind: str        # "c" or "b"
    major: int
    minor: int
    access: str = "rwm"

    def text(self) -> str:
        return f"{self.kind} {self.major}:{self.minor} {self.access}"


@dataclass(frozen=True)
class UnixNode:
    """A device node the daemon creates on the host (`path`, under the instance's devices
    directory) for the container; a MountEntry binds it in. uid/gid are container ids (mapped
    to the host through the container's id map when the node is made)."""

    path: str
    kind: int        # stat.S_IFCHR or stat.S_IFBLK
    major: int
    minor: int
    mode: int = 0o660
    uid: int = 0
    gid: int = 0

    def rule(self) -> DeviceRule:
        return DeviceRule("c" if self.kind == stat.S_IFCHR else "b", self.major, self.minor)


@dataclass(frozen=True)
class NetInterface:
    """A network interface of the container (for nic devices): rendered as lxc.net.N.* items
    (type, name, link, hwaddr, mtu, veth pair name, flags, then `extra` (key suffix, value))."""

    type: str                    # veth, macvlan, ipvlan, phys, empty, ...
    name: str = ""               # inside the container
    link: str = ""               # host side parent/bridge
    hwaddr: str = ""
    mtu: int | None = None
    host_name: str = ""          # veth.pair
    flags: str = "up"
    extra: tuple[tuple[str, str], ...] = ()

    def lxc_items(self, index: int) -> list[tuple[str, str]]:
        p = f"lxc.net.{index}."
        out = [(p + "type", self.type)]
        for key, value in (("name", self.name), ("link", self.link), ("hwaddr", self.hwaddr),
                           ("mtu", str(self.mtu) if self.mtu else ""), ("veth.pair", self.host_name),
                           ("flags", self.flags if self.type != "empty" else "")):
            if value:
                out.append((p + key, value))
        out.extend((p + k, v) for k, v in self.extra)
        return out


@dataclass
class RunConfig:
    """What one device needs of the container (from start()), or what to take back (from stop()).

    mounts       bind mounts (start: mounted; stop: unmounted, deepest first)
    nodes        host device nodes to make before the mounts (start) or drop (hot-unplug)
    cgroup_rules device cgroup rules to allow (start) or deny (stop, unless another device keeps it)
    interfaces   network interfaces (nic devices)
    items        further liblxc config items, rendered as they are at start
    post_start   hooks run once the container holds what it needs (or the start failed): release
                 host-side state that was only needed while mounting (a block device's host mount)
    post_stop    hooks run once the container gave the device up (stopped, or hot-unplugged)
    """

    mounts: list[MountEntry] = field(default_factory=list)
    nodes: list[UnixNode] = field(default_factory=list)
    cgroup_rules: list[DeviceRule] = field(default_factory=list)
    interfaces: list[NetInterface] = field(default_factory=list)
    items: list[tuple[str, str]] = field(default_factory=list)
    post_start: list[Hook] = field(default_factory=list)
    post_stop: list[Hook] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.mounts or self.nodes or self.cgroup_rules or self.interfaces or self.items
                    or self.post_start or self.post_stop)


async def run_hooks(hooks: list[Hook]) -> None:
    """Run hooks in order, each once (the list is emptied first); the first error propagates
    after all of them ran."""
    todo = list(hooks)
    hooks.clear()
    first: BaseException | None = None
    for hook in todo:
        try:
            await hook()
        except Exception as e:  # the others still run
            first = first or e
    if first is not None:
        raise first
