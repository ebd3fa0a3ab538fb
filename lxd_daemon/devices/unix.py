"""`unix-char` and `unix-block`: a host device node made in the instance's devices directory
(with the configured owner and mode, shifted through the container's id map) and bind-mounted at
`path`; a privileged container also gets a device cgroup rule for it."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

from lxd_daemon.devices.base import (
    Device,
    DeviceContext,
    container_path,
    dev_bool,
    is_abs_path,
    is_device_number,
    is_octal_mode,
    is_uint32,
)
from lxd_daemon.devices.runconfig import DeviceRule, MountEntry, RunConfig, UnixNode
from lxd_daemon.errors import BadRequest
from lxd_daemon.instances.idmap import IdmapSet
from lxd_daemon.util import validate as v

OPTIONS = {
    "path": is_abs_path,
    "source": is_abs_path,
    "major": is_device_number,
    "minor": is_device_number,
    "uid": is_uint32,
    "gid": is_uint32,
    "mode": is_octal_mode,
    "required": v.is_bool,
}


def unix_required(dev: dict[str, str]) -> bool:
    return dev_bool(dev, "required", True)


def unix_node_path(devices_dir: Path, name: str, dev: dict[str, str]) -> Path:
    rel = container_path(dev).strip("/").replace("/", "-")
    return devices_dir / f"unix.{name}.{rel}"


def unix_node_info(name: str, dev: dict[str, str]) -> tuple[int, int, int] | None:
    """(type bits, major, minor) of a unix device, from the config or the host node.

    None when the host node is missing and the device isn't required."""
    kind = stat.S_IFCHR if dev["type"] == "unix-char" else stat.S_IFBLK
    if dev.get("major") and dev.get("minor"):
        return kind, int(dev["major"]), int(dev["minor"])
    src = dev.get("source") or dev.get("path")
    try:
        st = os.stat(src)
    except OSError:
        if unix_required(dev):
            raise BadRequest(f"Missing source path {src!r} for device {name!r}") from None
        return None
    if stat.S_IFMT(st.st_mode) != kind:
        raise BadRequest(f"Invalid device {name!r}: {src!r} is not a {dev['type'][5:]} device")
    return kind, os.major(st.st_rdev), os.minor(st.st_rdev)


def known_info(dev: dict) -> tuple[int, int, int] | None:
    """(type, major, minor) of a unix device when its config says so (no host lookups)."""
    if not (dev.get("major") and dev.get("minor")):
        return None
    kind = stat.S_IFCHR if dev["type"] == "unix-char" else stat.S_IFBLK
    return kind, int(dev["major"]), int(dev["minor"])


def device_rule(info: tuple[int, int, int]) -> str:
    kind, major, minor = info
    return DeviceRule("c" if kind == stat.S_IFCHR else "b", major, minor).text()


def make_unix_node(path: Path, info: tuple[int, int, int], dev: dict[str, str], idmap: IdmapSet) -> None:
    """Create (or re-create) the host node that is bind-mounted into the container."""
    kind, major, minor = info
    mode = int(dev.get("mode") or "0660", 8)
    make_node(UnixNode(str(path), kind, major, minor, mode, int(dev.get("uid") or 0), int(dev.get("gid") or 0)),
              idmap)


def make_node(node: UnixNode, idmap: IdmapSet) -> None:
    """Create (or re-create, atomically) a host device node, owned by the container's ids."""
    path = Path(node.path)
    huid, hgid = idmap.to_host(node.uid, node.gid)
    if huid < 0 or hgid < 0:
        raise BadRequest(f"Invalid device: uid {node.uid} / gid {node.gid} are not mapped in the container")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o711)
    tmp = path.with_name(path.name + ".new")
    try:
        tmp.unlink()
    except FileNotFoundError:
        pass
    os.mknod(tmp, node.kind | node.mode, os.makedev(node.major, node.minor))
    os.chown(tmp, huid, hgid)
    os.chmod(tmp, node.mode)
    os.replace(tmp, path)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


class UnixDevice(Device):
    options = OPTIONS

    def check(self, *, profile: bool, pools: set[str] | None) -> None:
        name, dev = self.name, self.config
        if not dev.get("path") and not dev.get("source"):
            raise BadRequest(f"Invalid device {name!r}: unix devices need a path or a source")
        if bool(dev.get("major")) != bool(dev.get("minor")):
            raise BadRequest(f"Invalid device {name!r}: major and minor must be given together")
        if container_path(dev) in ("/", "/dev", "/proc", "/sys"):
            raise BadRequest(f"Invalid device {name!r}: invalid path {container_path(dev)!r}")

    def claimed_path(self) -> str | None:
        return container_path(self.config)

    @property
    def hotpluggable(self) -> bool:
        return True

    def node_path(self, ctx: DeviceContext) -> Path:
        return unix_node_path(ctx.devices_dir, self.name, self.config)

    def run_config(self, ctx: DeviceContext) -> RunConfig:
        info = unix_node_info(self.name, self.config)
        if info is None:
            return RunConfig()
        kind, major, minor = info
        dev = self.config
        node = UnixNode(str(self.node_path(ctx)), kind, major, minor, int(dev.get("mode") or "0660", 8),
                        int(dev.get("uid") or 0), int(dev.get("gid") or 0))
        return RunConfig(nodes=[node], cgroup_rules=[node.rule()],
                         mounts=[MountEntry(node.path, container_path(dev), kind="file")])

    async def stop(self, ctx: DeviceContext) -> RunConfig:
        try:
            info = await asyncio.to_thread(unix_node_info, self.name, self.config)
        except BadRequest:
            info = None
        rules = [] if info is None else [DeviceRule("c" if info[0] == stat.S_IFCHR else "b", info[1], info[2])]
        return RunConfig(mounts=[MountEntry("", container_path(self.config), kind="file")], cgroup_rules=rules)

    async def remove(self, ctx: DeviceContext) -> None:
        await asyncio.to_thread(_unlink, self.node_path(ctx))


class UnixChar(UnixDevice):
    type = "unix-char"


class UnixBlock(UnixDevice):
    type = "unix-block"
