"""Apply a config or device change to a running container (limits and device hotplug).

Which keys can change live is data (instances.config.KEYS[k].live); this module holds the
updaters those rows name. Keys without an updater take effect at the next start. All container
work goes through the liblxc workers (runtime/client.py, runtime/hotplug.py) on the instance's lane.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path

from lxd_daemon.errors import BadRequest
from lxd_daemon.instances import config as cfg
from lxd_daemon.instances import devices as devs
from lxd_daemon.instances import lxcconf
from lxd_daemon.instances.idmap import IdmapSet
from lxd_daemon.settings import lxd_dir_from_env

log = logging.getLogger("lxd.instances.live")

Updater = Callable[..., Awaitable[None]]


def cgroup_changes(old_config: dict, new_config: dict,
                   layout: lxcconf.CgroupLayout | None = None, *, name: str = "") -> list[list]:
    """[version, file, value] to write so the cgroups match the new limits, in a safe order."""
    layout = layout or lxcconf.host_layout()
    old = {(ver, key): val for ver, key, val in lxcconf.limit_items(old_config, layout, resets=True, name=name)}
    new = lxcconf.limit_items(new_config, layout, resets=True, name=name)
    todo = [[ver, key, val] for ver, key, val in new if old.get((ver, key)) != val]

    # v1: memsw >= limit at all times, so raise memsw before the limit and lower it after.
    def rank(item: list) -> int:
        key, val = item[1], item[2]
        if key == "memory.memsw.limit_in_bytes":
            before = old.get((item[0], key), "-1")
            return 0 if _bigger(val, before) else 2
        return 1

    return sorted(todo, key=rank)


def _bigger(a: str, b: str) -> bool:
    ia = int(a) if a not in ("-1", "max") else 1 << 62
    ib = int(b) if b not in ("-1", "max") else 1 << 62
    return ia > ib


async def update_cgroups(runtime, name: str, old_config: dict, new_config: dict, *, init_pid: int) -> None:
    todo = cgroup_changes(old_config, new_config, name=name)
    if not todo:
        return
    failed = await runtime.set_cgroup_files(name, init_pid, todo)
    if failed:
        key, value, err = failed[0]
        raise BadRequest(f"Failed to set cgroup {key}={value} on the running instance: {err}")


async def _noop(*args, **kwargs) -> None:
    return None


UPDATERS: dict[str, Updater] = {"cgroup": update_cgroups, "none": _noop}


# -- devices --------------------------------------------------------------------------------------


def _devices_dir(name: str, devices_dir: Path | None, init_pid: int = -1) -> Path:
    """Where the container's unix device nodes live: given, or <lxcpath>/<name>/devices with the
    lxcpath read from the container's liblxc monitor ("[lxc monitor] LXCPATH NAME", the parent
    of init), or else $LXD_DIR/containers."""
    if devices_dir is not None:
        return devices_dir
    lxcpath = _monitor_lxcpath(name, init_pid) if init_pid > 0 else None
    base = Path(lxcpath) if lxcpath else lxd_dir_from_env() / "containers"
    return base / name / "devices"


def _monitor_lxcpath(name: str, init_pid: int) -> str | None:
    try:
        with open(f"/proc/{init_pid}/status") as f:
            ppid = next(int(line.split()[1]) for line in f if line.startswith("PPid:"))
        with open(f"/proc/{ppid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except (OSError, StopIteration, ValueError):
        return None
    prefix = "[lxc monitor] "
    if not cmd.startswith(prefix) or not cmd.endswith(" " + name):
        return None
    return cmd[len(prefix):-len(name) - 1] or None


async def plug_device(runtime, name: str, dname: str, dev: dict, *, init_pid: int, idmap: IdmapSet,
                      privileged: bool = False, devices_dir: Path | None = None, disks=None) -> None:
    """Add one device to the running container. `disks` (an instances.disks.DiskPrep) prepares
    custom volume and block device disks; without it only host-path disks can be plugged."""
    kind = dev.get("type")
    root_uid, root_gid = (0, 0) if privileged else idmap.root_ids()
    target = devs.container_path(dev)
    if kind == "disk":
        if devs.is_root_disk(dev):
            return  # a root disk change applies at the next start
        if dev.get("pool") or await asyncio.to_thread(lxcconf.is_block_source, dev):
            if disks is None:
                raise BadRequest(f"Invalid device {dname!r}: volume and block device disks can only be "
                                 f"plugged by the daemon")
            try:
                prepared = await disks.prepare(dname, dev)
                if prepared is None:
                    return
                options = {"kind": "dir" if prepared.is_dir else "file",
                           "recursive": lxcconf.dev_bool(dev, "recursive"),
                           "readonly": lxcconf.dev_bool(dev, "readonly"),
                           "propagation": dev.get("propagation", ""), "shift": prepared.shift,
                           "root_uid": root_uid, "root_gid": root_gid}
                await runtime.hotplug_mount(name, init_pid, prepared.path, target, options, what=dname)
            finally:
                await disks.release()  # the container holds its own mount now
            return
        source = dev["source"]
        if not await asyncio.to_thread(lxcconf.check_disk_source, dname, dev):
            return
        shift = lxcconf.dev_bool(dev, "shift") and not privileged
        if shift:
            from lxd_daemon.runtime.hotplug import idmapped_mounts_supported

            if not await asyncio.to_thread(idmapped_mounts_supported, source):
                raise BadRequest(f"Invalid device {dname!r}: shift=true needs idmapped mounts, which "
                                 f"the filesystem of {source!r} doesn't support on this kernel")
        is_dir = await asyncio.to_thread(os.path.isdir, source)
        options = {"kind": "dir" if is_dir else "file", "recursive": lxcconf.dev_bool(dev, "recursive"),
                   "readonly": lxcconf.dev_bool(dev, "readonly"), "propagation": dev.get("propagation", ""),
                   "shift": shift, "root_uid": root_uid, "root_gid": root_gid}
        await runtime.hotplug_mount(name, init_pid, source, target, options, what=dname)
    elif kind in ("unix-char", "unix-block"):
        info = await asyncio.to_thread(lxcconf.unix_node_info, dname, dev)
        if info is None:
            return
        ddir = await asyncio.to_thread(_devices_dir, name, devices_dir, init_pid)
        node = lxcconf.unix_node_path(ddir, dname, dev)
        await asyncio.to_thread(lxcconf.make_unix_node, node, info, dev,
                                IdmapSet(()) if privileged else idmap)
        layout = lxcconf.host_layout()
        if privileged and layout.version("devices"):
            failed = await runtime.set_cgroup_files(
                name, init_pid, [[layout.version("devices"), "devices.allow", lxcconf.device_rule(info)]])
            if failed:
                raise BadRequest(f"Failed to allow device {dname!r} in the instance's cgroup: {failed[0][2]}")
        options = {"kind": "file", "root_uid": root_uid, "root_gid": root_gid}
        await runtime.hotplug_mount(name, init_pid, str(node), target, options, what=dname)


async def unplug_device(runtime, name: str, dname: str, dev: dict, *, init_pid: int,
                        privileged: bool = False, devices_dir: Path | None = None,
                        keep_rules: frozenset[str] = frozenset(), idmap: IdmapSet | None = None,
                        disks=None) -> None:
    kind = dev.get("type")
    root_uid, root_gid = (0, 0) if privileged or idmap is None else idmap.root_ids()
    target = devs.container_path(dev)
    if kind == "disk":
        if devs.is_root_disk(dev):
            return
        # The mount point goes too (LXD removes it; a directory only when it is empty).
        await runtime.hotplug_unmount(name, init_pid, target, True, root_uid, root_gid, what=dname)
        if disks is not None and dev.get("pool"):
            await disks.volume_detached(dname, dev)
    elif kind in ("unix-char", "unix-block"):
        await runtime.hotplug_unmount(name, init_pid, target, True, root_uid, root_gid, what=dname)
        ddir = await asyncio.to_thread(_devices_dir, name, devices_dir, init_pid)
        node = lxcconf.unix_node_path(ddir, dname, dev)
        layout = lxcconf.host_layout()
        if privileged and layout.version("devices"):
            try:
                info = await asyncio.to_thread(lxcconf.unix_node_info, dname, dev)
            except BadRequest:
                info = None
            if info is not None and lxcconf.device_rule(info) not in keep_rules:
                await runtime.set_cgroup_files(
                    name, init_pid, [[layout.version("devices"), "devices.deny", lxcconf.device_rule(info)]])
        await asyncio.to_thread(_unlink, node)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _known_info(dev: dict) -> tuple[int, int, int] | None:
    """(type, major, minor) of a unix device when its config says so (no host lookups)."""
    if not (dev.get("major") and dev.get("minor")):
        return None
    kind = stat.S_IFCHR if dev["type"] == "unix-char" else stat.S_IFBLK
    return kind, int(dev["major"]), int(dev["minor"])


def _hotplug_kind(dev: dict) -> bool:
    return dev.get("type") in ("disk", "unix-char", "unix-block") and not devs.is_root_disk(dev)


async def apply_live(runtime, name: str, old: tuple[dict, dict], new: tuple[dict, dict], *, init_pid: int,
                     idmap: IdmapSet, privileged: bool | None = None, devices_dir: Path | None = None,
                     disks=None) -> None:
    """Bring a running container from the old expanded (config, devices) to the new one.

    Devices that went away or changed are unplugged (deepest paths first), then new or changed
    ones are plugged; then changed limits are written to the cgroups. Keys without a live
    updater (security.*, raw.*) wait for the next start. When a step fails, the steps already
    done are undone (best effort, in reverse) and BadRequest is raised, so the container stays
    as the old config describes; the caller stores the new config only when this returns."""
    old_config, old_devices = old
    new_config, new_devices = new
    if privileged is None:
        privileged = idmap.empty
    common = {"init_pid": init_pid, "privileged": privileged, "devices_dir": devices_dir, "disks": disks}

    gone = [(n, d) for n, d in old_devices.items() if _hotplug_kind(d) and new_devices.get(n) != d]
    came = [(n, d) for n, d in new_devices.items() if _hotplug_kind(d) and old_devices.get(n) != d]
    gone.sort(key=lambda nd: -devs.container_path(nd[1]).count("/"))
    came.sort(key=lambda nd: (devs.container_path(nd[1]).count("/"), nd[0]))
    keep_new = _kept_rules(new_devices)
    keep_old = _kept_rules(old_devices)

    kinds: set[str] = set()
    for key in cfg.changed_keys(old_config, new_config):
        spec = cfg.lookup(key)
        if spec is not None and spec.live:
            kinds.add(spec.live)

    async with contextlib.AsyncExitStack() as undo:
        for dname, dev in gone:
            await unplug_device(runtime, name, dname, dev, keep_rules=keep_new, idmap=idmap, **common)
            undo.push_async_callback(_quietly, plug_device, runtime, name, dname, dev, idmap=idmap, **common)
        for dname, dev in came:
            await plug_device(runtime, name, dname, dev, idmap=idmap, **common)
            undo.push_async_callback(_quietly, unplug_device, runtime, name, dname, dev, keep_rules=keep_old,
                                     idmap=idmap, **common)
        for kind in sorted(kinds):
            undo.push_async_callback(_quietly, UPDATERS[kind], runtime, name, new_config, old_config,
                                     init_pid=init_pid)
            await UPDATERS[kind](runtime, name, old_config, new_config, init_pid=init_pid)
        undo.pop_all()


def _kept_rules(devices: dict) -> frozenset[str]:
    """Device cgroup rules that must stay allowed: the defaults and the devices' own."""
    return frozenset(lxcconf.PRIVILEGED_DEVICES) | {
        lxcconf.device_rule(info) for d in devices.values()
        if d.get("type") in ("unix-char", "unix-block") and (info := _known_info(d))}


async def _quietly(fn, *args, **kwargs) -> None:
    try:
        await fn(*args, **kwargs)
    except Exception:
        log.warning("failed to undo a live change", exc_info=True)
