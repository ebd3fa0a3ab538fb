"""The pure parts of nic devices (lxd_daemon/devices/nic/): option checks, generated names and MAC
addresses, the volatile keys kept across updates, what each nictype hands liblxc, and the parser
of the container's links (instances/state.py) on netlink messages built here."""

from __future__ import annotations

import asyncio
import socket
import struct
from pathlib import Path

import pytest

from lxd_daemon.devices import load, validate_devices
from lxd_daemon.devices.base import DeviceContext
from lxd_daemon.devices.nic.common import (
    after_live,
    keep_volatile,
    next_eth_name,
    parse_bit_rate,
    random_ifname,
    random_mac,
    volatile_defaults,
)
from lxd_daemon.errors import BadRequest
from lxd_daemon.instances import lxcconf, state
from lxd_daemon.instances.idmap import IdmapSet


def test_bit_rates():
    assert parse_bit_rate("10Mbit") == 10_000_000
    assert parse_bit_rate("1.5Gbit") == 1_500_000_000
    assert parse_bit_rate("100kbit") == 100_000
    assert parse_bit_rate("2MB/s") == 16_000_000
    for bad in ("fast", "10", "-1Mbit", "10Mbps"):
        with pytest.raises(ValueError):
            parse_bit_rate(bad)


def test_generated_names_and_macs():
    macs = {random_mac() for _ in range(50)}
    assert len(macs) == 50 and all(m.startswith("00:16:3e:") and len(m) == 17 for m in macs)
    name = random_ifname("veth")
    assert name.startswith("veth") and len(name) == 12
    assert next_eth_name(set()) == "eth0"
    assert next_eth_name({"eth0", "eth2"}) == "eth1"


def test_volatile_defaults_fill_only_what_is_missing():
    devices = {"eth0": {"type": "nic", "nictype": "bridged", "parent": "br0", "name": "eth0"},
               "net1": {"type": "nic", "network": "n1"},
               "ph": {"type": "nic", "nictype": "physical", "parent": "p0", "name": "p0"},
               "fixed": {"type": "nic", "nictype": "p2p", "name": "x0", "hwaddr": "00:16:3e:00:00:01"},
               "root": {"type": "disk", "path": "/", "pool": "default"}}
    out = volatile_defaults(devices, {"volatile.eth0.hwaddr": "00:16:3e:aa:bb:cc"})
    assert set(out) == {"volatile.net1.hwaddr", "volatile.net1.name"}
    assert out["volatile.net1.name"] == "eth1"  # eth0 is taken by another nic


def test_volatile_keys_follow_the_nics():
    old = {"volatile.eth0.hwaddr": "m0", "volatile.eth0.host_name": "veth1", "volatile.gone.hwaddr": "m1",
           "volatile.idmap.base": "0"}
    devices = {"eth0": {"type": "nic"}}
    assert keep_volatile(old, {}, devices) == {"volatile.eth0.hwaddr": "m0", "volatile.eth0.host_name": "veth1"}
    assert keep_volatile(old, {"volatile.eth0.hwaddr": "new"}, devices) == {"volatile.eth0.host_name": "veth1"}
    # after a live change the record's volatile keys win over the request's (an unplug dropped a host end)
    current = {"volatile.eth0.hwaddr": "m0"}
    stored = after_live(current, {"volatile.eth0.host_name": "stale", "limits.cpu": "1"}, devices)
    assert stored == {"volatile.eth0.hwaddr": "m0", "limits.cpu": "1"}


def test_validation_per_nictype():
    good = [{"type": "nic", "nictype": "routed", "ipv4.address": "10.0.0.2,10.0.0.3", "ipv4.gateway": "none"},
            {"type": "nic", "nictype": "ipvlan", "parent": "eth0", "mode": "l2"},
            {"type": "nic", "network": "lxdbr0", "security.ipv4_filtering": "true"}]
    for dev in good:
        validate_devices({"n": dev})
    bad = [({"type": "nic", "nictype": "routed", "ipv4.address": "10.0.0.300"}, "not an IPv4 address"),
           ({"type": "nic", "nictype": "p2p", "parent": "x0"}, "unsupported nic device option 'parent'"),
           ({"type": "nic", "nictype": "bridged", "parent": "br0", "mtu": "20"}, "Out of MTU range"),
           ({"type": "nic", "nictype": "bridged", "parent": "br0", "limits.max": "lots"}, "not a bit rate"),
           ({"type": "nic", "nictype": "ipvlan", "parent": "e0"}, "l3s mode need"),
           ({"type": "nic", "network": "n", "parent": "br0"}, "unsupported nic device option 'parent'"),
           ({"type": "nic", "nictype": "bridged", "parent": "br0", "vlan": "5"}, "not supported")]
    for dev, fragment in bad:
        with pytest.raises(BadRequest) as e:
            validate_devices({"n": dev})
        assert fragment in e.value.message, e.value.message


def _ctx(tmp_path: Path) -> DeviceContext:
    return DeviceContext(instance="c1", idmap=IdmapSet(()), privileged=True, devices_dir=tmp_path)


def _items(dev: dict, tmp_path: Path) -> list[tuple[str, str]]:
    rc = load("n", dev).run_config(_ctx(tmp_path))
    return [it for nic in rc.interfaces for it in nic.lxc_items(0)]


def test_what_liblxc_is_given(tmp_path):
    items = _items({"type": "nic", "nictype": "ipvlan", "parent": "eth0", "name": "eth1",
                    "ipv4.address": "10.0.0.5", "ipv6.address": "fd00::5"}, tmp_path)
    assert ("lxc.net.0.type", "ipvlan") in items and ("lxc.net.0.link", "eth0") in items
    assert ("lxc.net.0.ipvlan.mode", "l3s") in items
    assert ("lxc.net.0.ipv4.address", "10.0.0.5/32") in items and ("lxc.net.0.ipv4.gateway", "dev") in items
    assert ("lxc.net.0.ipv6.address", "fd00::5/128") in items
    items = _items({"type": "nic", "nictype": "macvlan", "parent": "eth0", "name": "m0", "hwaddr": "00:16:3e:01:02:03",
                    "mtu": "1400"}, tmp_path)
    assert items[:5] == [("lxc.net.0.type", "macvlan"), ("lxc.net.0.name", "m0"), ("lxc.net.0.link", "eth0"),
                         ("lxc.net.0.hwaddr", "00:16:3e:01:02:03"), ("lxc.net.0.mtu", "1400")]
    assert ("lxc.net.0.macvlan.mode", "bridge") in items
    # veth-based nics are described only once started (the pair is made then): nothing before
    assert _items({"type": "nic", "nictype": "p2p", "name": "p0"}, tmp_path) == []


def test_routed_items_and_pure_render(tmp_path):
    from lxd_daemon.devices.nic.common import NicPrepared

    dev = {"type": "nic", "nictype": "routed", "name": "r0", "ipv4.address": "10.1.0.5,10.1.0.6",
           "ipv6.address": "fd00::5", "ipv4.host_address": "169.254.9.9"}
    nic = load("n", dev)
    ctx = _ctx(tmp_path)
    ctx.prepared["n"] = NicPrepared(name="r0", hwaddr="00:16:3e:00:00:09", host_name="vethA", link="vethB")
    items = [it for i in nic.run_config(ctx).interfaces for it in i.lxc_items(2)]
    assert items[:4] == [("lxc.net.2.type", "phys"), ("lxc.net.2.name", "r0"), ("lxc.net.2.link", "vethB"),
                         ("lxc.net.2.hwaddr", "00:16:3e:00:00:09")]
    assert ("lxc.net.2.ipv4.address", "10.1.0.5/32") in items and ("lxc.net.2.ipv4.address", "10.1.0.6/32") in items
    assert ("lxc.net.2.ipv4.gateway", "169.254.9.9") in items and ("lxc.net.2.ipv6.gateway", "fe80::1") in items
    # no nic given to liblxc: the empty network fallback stays
    spec = lxcconf.LxcSpec(name="c1", lxcpath=tmp_path, rootfs=tmp_path / "r", log_file=tmp_path / "l",
                           console_log=tmp_path / "c", hostname="c1", expanded_config={},
                           expanded_devices={"n": {"type": "nic", "nictype": "p2p"}}, idmap=IdmapSet(()),
                           privileged=True, prepare_host=False)
    layout = lxcconf.CgroupLayout({"cpu": 2, "memory": 2, "pids": 2, "devices": 2})
    assert ("lxc.net.0.type", "empty") in lxcconf.render(spec, layout)


def test_ipvlan_is_not_hotpluggable_and_interfaces_need_a_worker():
    assert not load("n", {"type": "nic", "nictype": "ipvlan", "parent": "e0", "ipv4.address": "1.2.3.4"}).hotpluggable
    assert load("n", {"type": "nic", "nictype": "bridged", "parent": "b"}).hotpluggable
    from lxd_daemon.devices.runconfig import NetInterface
    from lxd_daemon.instances.live import _interface_options, plug_interface

    opts = _interface_options(NetInterface("phys", name="r0", link="v", hwaddr="00:16:3e:00:00:01", mtu=1400,
                                           extra=(("ipv4.address", "10.0.0.5/32"), ("ipv4.gateway", "169.254.0.1"),
                                                  ("ipv6.gateway", "dev"))))
    assert opts == {"hwaddr": "00:16:3e:00:00:01", "mtu": 1400, "addresses": ["10.0.0.5/32"],
                    "gateways": ["169.254.0.1"]}
    with pytest.raises(BadRequest, match="can't be added to a running instance"):
        asyncio.run(plug_interface(None, "c1", "n", NetInterface("ipvlan", name="i0", link="e"), init_pid=1))


def _nlmsg(mtype: int, body: bytes, attrs: list[tuple[int, bytes]]) -> bytes:
    payload = body
    for atype, data in attrs:
        a = struct.pack("=HH", 4 + len(data), atype) + data
        payload += a + b"\0" * ((4 - len(a) % 4) % 4)
    return struct.pack("=IHHII", 16 + len(payload), mtype, 2, 1, 0) + payload


class _FakeSock:
    def __init__(self, chunks: list[bytes]):
        self.chunks = chunks
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> None:
        self.sent.append(data)

    def recv(self, n: int) -> bytes:
        return self.chunks.pop(0)


def test_netlink_link_and_address_parsing():
    ifinfo = struct.pack("=BxHiII", 0, 1, 7, 0x1 | 0x2, 0)  # IFF_UP | IFF_BROADCAST, index 7
    link = _nlmsg(16, ifinfo, [(3, b"eth0\0"), (1, bytes.fromhex("00163e010203")), (4, struct.pack("=I", 1400))])
    lo = _nlmsg(16, struct.pack("=BxHiII", 0, 772, 1, 0x1 | 0x8, 0), [(3, b"lo\0"), (4, struct.pack("=I", 65536))])
    done = struct.pack("=IHHII", 20, 3, 2, 1, 0) + b"\0" * 4
    links = state._dump_links(_FakeSock([link + lo, done]))
    assert links["eth0"]["hwaddr"] == "00:16:3e:01:02:03" and links["eth0"]["mtu"] == 1400
    assert links["eth0"]["state"] == "up" and links["eth0"]["type"] == "broadcast"
    assert links["lo"]["type"] == "loopback"
    addr = _nlmsg(20, struct.pack("=BBBBI", socket.AF_INET, 32, 0, 0, 7), [(2, socket.inet_aton("10.232.0.5"))])
    state._dump_inet(_FakeSock([addr, done]), links)
    assert links["eth0"]["inet"] == [{"family": "inet", "address": "10.232.0.5", "netmask": "32",
                                      "scope": "global"}]


def test_which_changes_apply_to_a_running_nic():
    base = {"type": "nic", "nictype": "bridged", "parent": "br0", "name": "eth0"}
    nic = load("eth0", {**base, "limits.max": "10Mbit", "security.mac_filtering": "true"})
    assert nic.updates_live(base)  # limits and filters: on the host end, in place
    assert not load("eth0", {**base, "mtu": "1400"}).updates_live(base)  # anything else: re-plugged
    assert not load("eth0", {**base, "parent": "br1"}).updates_live(base)
    mv = {"type": "nic", "nictype": "macvlan", "parent": "eth0"}
    assert not load("m", {**mv, "mtu": "1400"}).updates_live(mv)
