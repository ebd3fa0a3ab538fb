"""Every registered device type against the device interface (lxd_daemon/devices/): it validates
good and bad configs, its RunConfig renders as liblxc items, the start path and a pure render
agree, and what hot-plugging it adds to a running container its unplug takes away again.

A new device type adds one entry to CASES (the first test fails until it does)."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass

import pytest

from lxd_daemon.devices import DEVICE_TYPES, Device, DeviceContext, RunConfig, load, validate_devices
from lxd_daemon.devices.runconfig import DeviceRule, MountEntry, NetInterface, UnixNode
from lxd_daemon.errors import BadRequest
from lxd_daemon.instances import live, lxcconf
from lxd_daemon.instances.idmap import IdmapEntry, IdmapSet

IDMAP = IdmapSet((IdmapEntry(True, True, 1000000, 0, 1000000000),))
V2 = lxcconf.CgroupLayout({"cpu": 2, "memory": 2, "pids": 2, "devices": 2}, online_cpus=(0,))


@dataclass
class Case:
    good: list[dict]               # valid configs (validation only)
    bad: list[tuple[dict, str]]    # invalid configs and a fragment of the error
    live: dict                     # a config that starts without a daemon (tmp paths filled in)
    needs_root: bool = False       # plugging it makes a device node
    daemon_only: bool = False      # its start needs the instance service (a supervised process)


def _cases(tmp) -> dict[str, Case]:
    return {
        "disk": Case(
            good=[{"type": "disk", "path": "/", "pool": "default"},
                  {"type": "disk", "source": "/srv", "path": "/srv", "readonly": "true"},
                  {"type": "disk", "pool": "default", "source": "vol1", "path": "/v"}],
            bad=[({"type": "disk", "path": "/x"}, "need a source"),
                 ({"type": "disk", "source": "rel", "path": "/x"}, "absolute host path")],
            live={"type": "disk", "source": str(tmp / "src"), "path": "/mnt/a/b", "recursive": "true"}),
        "unix-char": Case(
            good=[{"type": "unix-char", "path": "/dev/n", "major": "1", "minor": "3"}],
            bad=[({"type": "unix-char"}, "need a path or a source"),
                 ({"type": "unix-char", "path": "/dev/x", "major": "1"}, "major and minor")],
            live={"type": "unix-char", "path": "/dev/mynull", "major": "1", "minor": "3", "mode": "0600"},
            needs_root=True),
        "unix-block": Case(
            good=[{"type": "unix-block", "path": "/dev/b", "major": "7", "minor": "9", "required": "false"}],
            bad=[({"type": "unix-block", "path": "/"}, "invalid path")],
            live={"type": "unix-block", "path": "/dev/myloop", "major": "7", "minor": "250"},
            needs_root=True),
        "none": Case(good=[{"type": "none"}], bad=[], live={"type": "none"}),
        # physical on "lo": its start only reads the host (liblxc moves the interface in)
        "nic": Case(
            good=[{"type": "nic", "nictype": "bridged", "parent": "br0", "limits.max": "10Mbit",
                   "hwaddr": "00:16:3e:00:00:01", "security.mac_filtering": "true"},
                  {"type": "nic", "network": "lxdbr0", "ipv4.address": "10.0.0.5"},
                  {"type": "nic", "nictype": "macvlan", "parent": "eth0", "mtu": "1400"},
                  {"type": "nic", "nictype": "ipvlan", "parent": "eth0", "ipv4.address": "10.0.0.5,10.0.0.6"},
                  {"type": "nic", "nictype": "p2p", "host_name": "vethx"},
                  {"type": "nic", "nictype": "routed", "ipv4.address": "10.0.0.9", "ipv6.address": "fd00::9"}],
            bad=[({"type": "nic"}, "need a nictype or a network"),
                 ({"type": "nic", "nictype": "macvlan"}, "need a parent"),
                 ({"type": "nic", "nictype": "bridged", "parent": "br0", "hwaddr": "zz"}, "Invalid MAC address"),
                 ({"type": "nic", "nictype": "bridged", "parent": "br0", "ipv4.address": "10.0.0.2"}, "managed network"),
                 ({"type": "nic", "nictype": "routed"}, "need ipv4.address or ipv6.address"),
                 ({"type": "nic", "nictype": "wifi", "parent": "br0"}, "unsupported nictype"),
                 ({"type": "nic", "nictype": "p2p", "name": "a/b"}, "Network interface contains invalid characters")],
            live={"type": "nic", "nictype": "physical", "parent": "lo", "name": "eth7"}),
        # a forwarder process per device: the daemon's (tests/integration/test_proxy.py)
        "proxy": Case(
            good=[{"type": "proxy", "listen": "tcp:0.0.0.0:80-81,90", "connect": "tcp:127.0.0.1:80"},
                  {"type": "proxy", "listen": "udp:[::1]:53", "connect": "udp:[fd00::2]:53", "bind": "instance"},
                  {"type": "proxy", "listen": "unix:/run/a.sock", "connect": "unix:@b", "mode": "0600",
                   "uid": "1", "gid": "2", "security.uid": "1000"},
                  {"type": "proxy", "listen": "tcp:10.0.0.1:80", "connect": "tcp:10.0.0.5:8080", "nat": "true"}],
            bad=[({"type": "proxy", "connect": "tcp:127.0.0.1:1"}, "'listen'"),
                 ({"type": "proxy", "listen": "tcp:127.0.0.1:1", "connect": "tcp:localhost:1"}, "Not an IP address"),
                 ({"type": "proxy", "listen": "tcp:1.2.3.4:1", "connect": "tcp:1.2.3.4:1-2"}, "Mismatch"),
                 ({"type": "proxy", "listen": "tcp:0.0.0.0:1", "connect": "tcp:1.2.3.4:1", "nat": "true"},
                  "wildcard"),
                 ({"type": "proxy", "listen": "tcp:1.2.3.4:1", "connect": "tcp:1.2.3.4:1", "bind": "x"},
                  "binding side")],
            live={"type": "proxy", "listen": "unix:@x", "connect": "tcp:127.0.0.1:1", "bind": "instance"},
            daemon_only=True),
    }


def test_every_registered_type_has_a_case(tmp_path):
    assert set(_cases(tmp_path)) == set(DEVICE_TYPES)
    for kind, cls in DEVICE_TYPES.items():
        assert issubclass(cls, Device) and cls.type == kind


@pytest.fixture(params=sorted(DEVICE_TYPES))
def kind(request):
    return request.param


def test_validates_good_and_bad_configs(kind, tmp_path):
    case = _cases(tmp_path)[kind]
    for dev in case.good + [case.live]:
        validate_devices({"d": dev})
    for dev, fragment in case.bad + [({"type": kind, "colour": "red"}, "'colour'")]:
        with pytest.raises(BadRequest) as e:
            validate_devices({"dev0": dev})
        assert fragment in e.value.message and "'dev0'" in e.value.message


class FakeRuntime:
    """The runtime client's hotplug calls, recorded as a container's mount table and rules."""

    def __init__(self):
        self.mounts: dict[str, tuple[str, dict]] = {}
        self.rules: set[str] = set()
        self.nics: dict[str, str] = {}

    async def hotplug_mount(self, name, init_pid, source, target, options, *, what):
        assert target.startswith("/") and target not in self.mounts
        self.mounts[target] = (source, options)

    async def hotplug_unmount(self, name, init_pid, target, remove, root_uid, root_gid, *, what):
        assert remove
        self.mounts.pop(target)

    async def nic_attach(self, name, init_pid, link, ifname, options, *, what):
        assert ifname not in self.nics
        self.nics[ifname] = link

    async def nic_detach(self, name, init_pid, ifname, give_back="", *, what):
        assert self.nics.pop(ifname) == give_back  # a physical nic goes back under its own name

    async def set_cgroup_files(self, name, init_pid, items):
        for _ver, key, value in items:
            (self.rules.add if key == "devices.allow" else self.rules.discard)(value)
        return []


def _ctx(tmp_path, privileged: bool) -> DeviceContext:
    return DeviceContext(instance="c1", idmap=IdmapSet(()) if privileged else IDMAP, privileged=privileged,
                         devices_dir=tmp_path / "devices")


@pytest.mark.parametrize("privileged", [False, True])
def test_start_renders_like_a_pure_render(kind, tmp_path, privileged):
    case = _cases(tmp_path)[kind]
    if case.daemon_only:
        pytest.skip("its start needs the daemon")
    (tmp_path / "src").mkdir()
    devices = {"root": {"type": "disk", "path": "/", "pool": "default"}, "d": case.live}
    device = load("d", case.live)
    ctx = _ctx(tmp_path, privileged)
    rc = asyncio.run(device.start(ctx))
    assert isinstance(rc, RunConfig)

    def spec(**kw):
        return lxcconf.LxcSpec(name="c1", lxcpath=tmp_path / "containers", rootfs=tmp_path / "rootfs",
                               log_file=tmp_path / "lxc.log", console_log=tmp_path / "console.log", hostname="c1",
                               expanded_config={}, expanded_devices=devices, idmap=ctx.idmap,
                               privileged=privileged, prepare_host=False, devices_dir=ctx.devices_dir, **kw)

    started = lxcconf.render(spec(run_configs={"d": rc, "root": RunConfig()}), V2)
    pure = lxcconf.render(spec(), V2)
    assert started == pure
    entries = [v for k, v in started if k == "lxc.mount.entry"]
    for m in rc.mounts:
        assert lxcconf.mount_entry(m) in entries
        assert f" {m.target.lstrip('/')} none " in lxcconf.mount_entry(m)
    rules = [v for k, v in started if k == "lxc.cgroup2.devices.allow"]
    assert all((r.text() in rules) == privileged for r in rc.cgroup_rules)


@pytest.mark.parametrize("privileged", [False, True])
def test_hotplug_round_trip(kind, tmp_path, privileged):
    case = _cases(tmp_path)[kind]
    if case.daemon_only:
        pytest.skip("its start needs the daemon")
    if case.needs_root and os.geteuid() != 0:
        pytest.skip("mknod needs root")
    (tmp_path / "src").mkdir()
    device = load("d", case.live)
    ctx = _ctx(tmp_path, privileged)
    rt = FakeRuntime()
    layout_has_devices = bool(lxcconf.host_layout().version("devices"))

    async def go():
        await live.plug_device(rt, "c1", device, ctx, init_pid=1)
        plugged = (dict(rt.mounts), set(rt.rules))
        plugged_nics.update(rt.nics)
        await live.unplug_device(rt, "c1", device, ctx, init_pid=1)
        return plugged

    plugged_nics: dict[str, str] = {}
    mounts, rules = asyncio.run(go())
    assert plugged_nics == {n.name: n.link for n in device.run_config(ctx).interfaces}
    rc = device.run_config(ctx)
    assert set(mounts) == {m.target for m in rc.mounts}
    for m in rc.mounts:
        assert mounts[m.target][0] == m.source
        assert mounts[m.target][1] == m.hotplug_options(*ctx.root_ids)
    assert rules == ({r.text() for r in rc.cgroup_rules} if privileged and layout_has_devices else set())
    for node in rc.nodes:
        assert not os.path.exists(node.path)  # made for the plug, gone with the device
    assert rt.mounts == {} and rt.rules == set() and rt.nics == {}  # what was added is taken away again
    if device.hotpluggable:
        assert rc.mounts or rc.interfaces  # a hot-pluggable device always adds something


def test_stop_takes_back_what_start_mounted(kind, tmp_path):
    case = _cases(tmp_path)[kind]
    if case.daemon_only:
        pytest.skip("its start needs the daemon")
    (tmp_path / "src").mkdir()
    device = load("d", case.live)
    ctx = _ctx(tmp_path, False)

    async def go():
        return await device.start(ctx), await device.stop(ctx)

    started, stopped = asyncio.run(go())
    assert [m.target for m in stopped.mounts] == [m.target for m in started.mounts]
    assert {r.text() for r in stopped.cgroup_rules} <= {r.text() for r in started.cgroup_rules}
    asyncio.run(device.remove(ctx))  # nothing made: nothing to remove, no error


def test_value_types_render():
    m = MountEntry("/srv/my data", "/mnt/x", kind="file", recursive=True, readonly=True, propagation="rslave",
                   shift=True)
    assert lxcconf.mount_entry(m) == "/srv/my\\040data mnt/x none rbind,create=file,ro,rslave,idmap=container 0 0"
    assert DeviceRule("b", 7, 3).text() == "b 7:3 rwm"
    assert UnixNode("/n", 0o020000, 1, 3).rule() == DeviceRule("c", 1, 3)
    nic = NetInterface("veth", name="eth0", link="br0", mtu=1500, host_name="veth1", extra=(("ipv4.address", "10.0.0.2/24"),))
    assert nic.lxc_items(1) == [("lxc.net.1.type", "veth"), ("lxc.net.1.name", "eth0"), ("lxc.net.1.link", "br0"),
                                ("lxc.net.1.mtu", "1500"), ("lxc.net.1.veth.pair", "veth1"),
                                ("lxc.net.1.flags", "up"), ("lxc.net.1.ipv4.address", "10.0.0.2/24")]


def test_volume_and_block_disks_need_the_daemon(tmp_path):
    """Without an instance service (a raw container) a volume disk can't start; a pure render
    leaves it out rather than failing."""
    dev = {"type": "disk", "pool": "default", "source": "vol1", "path": "/data"}
    ctx = _ctx(tmp_path, False)
    with pytest.raises(BadRequest, match="plugged by the daemon"):
        asyncio.run(load("v", dev).start(ctx))
    assert load("v", dev).run_config(ctx).empty()
    proxy = {"type": "proxy", "listen": "tcp:127.0.0.1:1", "connect": "tcp:127.0.0.1:2"}
    with pytest.raises(BadRequest, match="started by the daemon"):
        asyncio.run(load("p", proxy).start(ctx))


def test_a_failed_start_undoes_the_devices_started(tmp_path):
    """lifecycle.start_devices pushes each started device's undo on the Revert."""
    from lxd_daemon.devices import lifecycle
    from lxd_daemon.util.revert import Revert

    undone = []

    class Recording(Device):
        type = "recording"

        async def start(self, ctx):
            if self.name == "bad":
                raise BadRequest("no")
            return RunConfig(post_start=[lambda: _note(undone, f"{self.name}:post_start")])

        async def stop(self, ctx):
            return RunConfig(post_stop=[lambda: _note(undone, f"{self.name}:post_stop")])

    async def go():
        async with Revert() as revert:
            await lifecycle.start_devices([Recording("a", {}), Recording("b", {}), Recording("bad", {})],
                                          _ctx(tmp_path, False), revert)
            revert.success()

    with pytest.raises(BadRequest):
        asyncio.run(go())
    assert undone == ["b:post_start", "b:post_stop", "a:post_start", "a:post_stop"]


async def _note(out: list, what: str) -> None:
    out.append(what)
