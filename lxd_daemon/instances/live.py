"""Apply a config or device change to a running container (limits and device hotplug).

Which keys can change live is data (instances.config.KEYS[k].live); this module holds the
updaters those rows name. Keys without an updater take effect at the next start. Devices are
plugged by applying their RunConfig (lxd_daemon/devices/) to the running container. All container
work goes through the liblxc workers (runtime/client.py, runtime/hotplug.py) on the instance's lane.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from lxd_daemon.devices.base import Device, DeviceContext
from lxd_daemon.devices.registry import load, load_all
from lxd_daemon.devices.runconfig import NetInterface, RunConfig, run_hooks
from lxd_daemon.devices.unix import device_rule, known_info, make_node
from lxd_daemon.errors import BadRequest, LXDError
from lxd_daemon.instances import config as cfg
from lxd_daemon.instances import lxcconf
from lxd_daemon.instances.idmap import IdmapSet
from lxd_daemon.settings import lxd_dir_from_env
from lxd_daemon.util.revert import Revert

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


def _devlxd_on(config: dict) -> bool:
    return (config.get("security.devlxd") or "true").lower() in ("true", "1", "yes", "on")


def _root_ids(pid: int) -> tuple[int, int]:
    """Host (uid, gid) of the root of process `pid`'s user namespace."""
    ids = []
    for kind in ("uid", "gid"):
        host = 0
        with open(f"/proc/{pid}/{kind}_map") as f:
            for line in f:
                inside, outside, _count = line.split()
                if inside == "0":
                    host = int(outside)
        ids.append(host)
    return ids[0], ids[1]


async def update_devlxd(runtime, name: str, old_config: dict, new_config: dict, *, init_pid: int) -> None:
    """security.devlxd on a running container: bind-mount $LXD_DIR/devlxd at /dev/lxd, or take it
    away (what the start path's lxc.mount.entry does at the next start)."""
    if _devlxd_on(old_config) == _devlxd_on(new_config):
        return
    lxcpath = await asyncio.to_thread(_monitor_lxcpath, name, init_pid)
    base = Path(lxcpath).parent if lxcpath else lxd_dir_from_env()
    try:
        uid, gid = await asyncio.to_thread(_root_ids, init_pid)
    except (OSError, ValueError):
        raise BadRequest("The instance isn't running") from None
    if _devlxd_on(new_config):
        await runtime.hotplug_mount(name, init_pid, str(base / "devlxd"), "/dev/lxd",
                                    {"kind": "dir", "root_uid": uid, "root_gid": gid}, what="/dev/lxd")
    else:
        await runtime.hotplug_unmount(name, init_pid, "/dev/lxd", True, uid, gid, what="/dev/lxd")


UPDATERS: dict[str, Updater] = {"cgroup": update_cgroups, "none": _noop, "devlxd": update_devlxd}


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


def _context(runtime, name: str, idmap: IdmapSet, privileged: bool, devices_dir: Path,
             instances) -> DeviceContext:
    return DeviceContext(instance=name, idmap=idmap, privileged=privileged, devices_dir=devices_dir,
                         instances=instances, runtime=runtime)


async def apply_run_config(runtime, name: str, dname: str, rc: RunConfig, ctx: DeviceContext, *,
                           init_pid: int) -> None:
    """Give a running container what a device's RunConfig says it needs: nodes made on the host,
    cgroup rules allowed (privileged containers), mounts injected by the worker."""
    if rc.items:
        raise BadRequest(f"Device {dname!r} can't be added to a running instance")
    for node in rc.nodes:
        await asyncio.to_thread(make_node, node, ctx.node_idmap)
    layout = lxcconf.host_layout()
    if rc.cgroup_rules and ctx.privileged and layout.version("devices"):
        failed = await runtime.set_cgroup_files(
            name, init_pid, [[layout.version("devices"), "devices.allow", r.text()] for r in rc.cgroup_rules])
        if failed:
            raise BadRequest(f"Failed to allow device {dname!r} in the instance's cgroup: {failed[0][2]}")
    root_uid, root_gid = ctx.root_ids
    for m in rc.mounts:
        await runtime.hotplug_mount(name, init_pid, m.source, m.target, m.hotplug_options(root_uid, root_gid),
                                    what=dname)
    for nic in rc.interfaces:
        await plug_interface(runtime, name, dname, nic, init_pid=init_pid)


def _interface_options(nic: NetInterface) -> dict:
    """What the worker sets on a moved interface: MAC, MTU, and the lxc.net-style addresses and
    gateways of its `extra` items (a routed nic's)."""
    extra = dict.fromkeys(("ipv4.gateway", "ipv6.gateway"), "")
    addresses = []
    for key, value in nic.extra:
        if key in ("ipv4.address", "ipv6.address"):
            addresses.append(value)
        elif key in extra:
            extra[key] = value
    gateways = [g for g in (extra["ipv4.gateway"], extra["ipv6.gateway"]) if g and g != "dev"]
    return {"hwaddr": nic.hwaddr, "mtu": nic.mtu, "addresses": addresses, "gateways": gateways}


async def plug_interface(runtime, name: str, dname: str, nic: NetInterface, *, init_pid: int) -> None:
    """Move a nic's interface into the running container: a host interface ("phys": a veth
    peer or a physical nic) as it is; a veth pair (host end in its bridge) or a macvlan is made
    on the host first, the container's end under a temporary name."""
    from lxd_daemon.devices.nic.common import random_ifname
    from lxd_daemon.networks import netlink

    made = ""
    link = nic.link
    if nic.type == "veth":  # what liblxc does at start: the pair, its host end in the bridge
        link = random_ifname("veth")
        try:
            await asyncio.to_thread(netlink.create_veth, nic.host_name, link, mtu=nic.mtu,
                                    peer_hwaddr=nic.hwaddr or None, master=nic.link or None)
        except LXDError as e:
            raise BadRequest(f"Failed to add device {dname!r} on the running instance: {e.message}") from None
        made = nic.host_name
    elif nic.type == "macvlan":
        made = link = random_ifname("mac")
        mode = dict(nic.extra).get("macvlan.mode", "bridge")
        try:
            await asyncio.to_thread(netlink.create_macvlan, made, nic.link, mode, mtu=nic.mtu,
                                    hwaddr=nic.hwaddr or None)
        except LXDError as e:
            raise BadRequest(f"Failed to add device {dname!r} on the running instance: {e.message}") from None
    elif nic.type != "phys":
        raise BadRequest(f"Device {dname!r} ({nic.type} interface) can't be added to a running instance")
    try:
        await runtime.nic_attach(name, init_pid, link, nic.name, _interface_options(nic), what=dname)
    except BaseException:
        if made:
            await asyncio.to_thread(netlink.delete_link, made)
        raise


async def plug_device(runtime, name: str, device: Device, ctx: DeviceContext, *, init_pid: int) -> None:
    """Add one device to the running container: the device prepares the host (start()), its
    RunConfig is applied, then its post_start hooks run (a block device's host mount goes)."""
    rc = await device.start(ctx)
    try:
        await apply_run_config(runtime, name, device.name, rc, ctx, init_pid=init_pid)
    except BaseException:
        if rc.interfaces:  # a nic's host side (a veth pair, its filters) goes again
            await run_hooks(rc.post_start)
            stopped = await device.stop(ctx)
            await run_hooks(stopped.post_stop)
        raise
    finally:
        await run_hooks(rc.post_start)  # the container holds its own mount now


async def unplug_device(runtime, name: str, device: Device, ctx: DeviceContext, *, init_pid: int,
                        keep_rules: frozenset[str] = frozenset()) -> None:
    """Take one device out of the running container: what its stop() RunConfig lists is
    unmounted (mount points removed) and its cgroup rules denied (unless `keep_rules` still
    needs them), then its post_stop hooks and its remove() undo the host side."""
    rc = await device.stop(ctx)
    root_uid, root_gid = ctx.root_ids
    for nic in rc.interfaces:  # a physical nic goes back to the host as `link`; the others go
        await runtime.nic_detach(name, init_pid, nic.name, nic.link if nic.type == "phys" else "",
                                 what=device.name)
    for m in reversed(rc.mounts):
        await runtime.hotplug_unmount(name, init_pid, m.target, True, root_uid, root_gid, what=device.name)
    layout = lxcconf.host_layout()
    deny = [r.text() for r in rc.cgroup_rules if r.text() not in keep_rules]
    if deny and ctx.privileged and layout.version("devices"):
        await runtime.set_cgroup_files(name, init_pid, [[layout.version("devices"), "devices.deny", r] for r in deny])
    await run_hooks(rc.post_stop)
    await device.remove(ctx)


async def apply_live(runtime, name: str, old: tuple[dict, dict], new: tuple[dict, dict], *, init_pid: int,
                     idmap: IdmapSet, privileged: bool | None = None, devices_dir: Path | None = None,
                     instances=None) -> None:
    """Bring a running container from the old expanded (config, devices) to the new one.

    Devices that went away or changed are unplugged (deepest paths first), then new or changed
    ones are plugged; then changed limits are written to the cgroups. Keys without a live
    updater (security.*, raw.*) wait for the next start. When a step fails, the steps already
    done are undone (best effort, in reverse) and BadRequest is raised, so the container stays
    as the old config describes; the caller stores the new config only when this returns.
    `instances` (the instance service) lets volume and block device disks be plugged."""
    old_config, old_devices = old
    new_config, new_devices = new
    if privileged is None:
        privileged = idmap.empty

    # a device that can take the change as it is (a nic's limits or filters) keeps running
    in_place = [d for d in load_all({n: c for n, c in new_devices.items() if n in old_devices
                                     and old_devices[n] != c})
                if d.updates_live(old_devices[d.name])]
    kept = {d.name for d in in_place}
    gone = [d for d in load_all({n: c for n, c in old_devices.items() if new_devices.get(n) != c and n not in kept})
            if d.hotpluggable]
    came = [d for d in load_all({n: c for n, c in new_devices.items() if old_devices.get(n) != c and n not in kept})
            if d.hotpluggable]
    gone.sort(key=lambda d: -d.sort_key[0])
    keep_new = _kept_rules(new_devices)
    keep_old = _kept_rules(old_devices)

    kinds: set[str] = set()
    for key in cfg.changed_keys(old_config, new_config):
        spec = cfg.lookup(key)
        if spec is not None and spec.live:
            kinds.add(spec.live)

    ctx = None
    if gone or came or in_place:
        ddir = await asyncio.to_thread(_devices_dir, name, devices_dir, init_pid)
        ctx = _context(runtime, name, idmap, privileged, ddir, instances)
    async with Revert() as revert:
        for device in gone:
            await unplug_device(runtime, name, device, ctx, init_pid=init_pid, keep_rules=keep_new)
            revert.add(plug_device, runtime, name, device, ctx, init_pid=init_pid)
        for device in in_place:
            await device.update_live(old_devices[device.name], ctx)
            revert.add(load(device.name, old_devices[device.name]).update_live, new_devices[device.name], ctx)
        for device in came:
            await plug_device(runtime, name, device, ctx, init_pid=init_pid)
            revert.add(unplug_device, runtime, name, device, ctx, init_pid=init_pid, keep_rules=keep_old)
        for kind in sorted(kinds):
            revert.add(_quietly, UPDATERS[kind], runtime, name, new_config, old_config, init_pid=init_pid)
            await UPDATERS[kind](runtime, name, old_config, new_config, init_pid=init_pid)
        revert.success()


def _kept_rules(devices: dict) -> frozenset[str]:
    """Device cgroup rules that must stay allowed: the defaults and the devices' own."""
    return frozenset(lxcconf.PRIVILEGED_DEVICES) | {
        device_rule(info) for d in devices.values()
        if d.get("type") in ("unix-char", "unix-block") and (info := known_info(d))}


async def _quietly(fn, *args, **kwargs) -> None:
    try:
        await fn(*args, **kwargs)
    except Exception:
        log.warning("failed to undo a live change", exc_info=True)
