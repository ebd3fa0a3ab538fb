"""Pure logic of managed networks: subnet parsing, overlap checks, the `auto` subnet choice, the
drivers' key validation and defaults (LXD's key names and messages), and `lxd init` flags."""

from __future__ import annotations

import ipaddress
import random
from pathlib import Path
from types import SimpleNamespace

import pytest

from lxd_daemon.cli_tools import InitError, auto_seed
from lxd_daemon.networks import subnets
from lxd_daemon.networks.drivers import DRIVERS, DriverContext, InvalidConfig
from lxd_daemon.networks.drivers import bridge as bridge_mod
from lxd_daemon.networks.service import _eui64


def test_interface_parsing_and_errors():
    assert subnets.interface("10.1.2.1/24", 4) == ipaddress.ip_interface("10.1.2.1/24")
    assert subnets.interface("fd42::1/64", 6).network == ipaddress.ip_network("fd42::/64")
    for bad, family, msg in (("10.1.2.0/24", 4, "Not a usable IPv4 address"),
                             ("10.1.2.1", 4, "invalid CIDR address"),
                             ("fd42::1/64", 4, "Not an IPv4 address"),
                             ("10.1.2.1/24", 6, "Not an IPv6 address"),
                             ("10.1.2.300/24", 4, "invalid CIDR address")):
        with pytest.raises(ValueError, match=msg):
            subnets.interface(bad, family)


def test_ranges():
    assert subnets.ranges("10.0.0.10-10.0.0.20, 10.0.0.30-10.0.0.40", 4) == [
        ("10.0.0.10", "10.0.0.20"), ("10.0.0.30", "10.0.0.40")]
    with pytest.raises(ValueError, match="must contain start and end"):
        subnets.ranges("10.0.0.10", 4)
    with pytest.raises(ValueError, match="start address is after the end"):
        subnets.ranges("10.0.0.20-10.0.0.10", 4)
    net = ipaddress.ip_network("10.0.0.0/24")
    assert subnets.ranges_within([("10.0.0.2", "10.0.0.9")], net) is None
    assert subnets.ranges_within([("10.0.0.2", "10.0.1.9")], net) == "10.0.0.2-10.0.1.9"


def test_host_prefixes_leave_out_default_loopback_and_link_local():
    got = subnets.host_prefixes(["0.0.0.0/0", "::/0", "10.5.0.0/16", "127.0.0.0/8", "fe80::/64"],
                                ["192.168.1.7/24", "127.0.0.1/8", "fe80::1/64", "fd00:1::5/64"])
    assert got == [ipaddress.ip_network("10.5.0.0/16"), ipaddress.ip_network("192.168.1.0/24"),
                   ipaddress.ip_network("fd00:1::/64")]


def test_auto_picks_lxds_shapes_outside_used_prefixes():
    rng = random.Random(7)
    used = [ipaddress.ip_network("10.0.0.0/9")]  # half of 10/8 taken
    for _ in range(50):
        v4 = subnets.pick(4, used, rng)
        assert v4.startswith("10.") and v4.endswith(".1/24")
        assert not ipaddress.ip_interface(v4).network.overlaps(used[0])
        v6 = subnets.pick(6, [], rng)
        assert v6.startswith("fd42:") and v6.endswith("::1/64")


def test_auto_gives_up_with_lxds_message():
    with pytest.raises(ValueError, match="Failed to automatically find an unused IPv4 subnet"):
        subnets.pick(4, [ipaddress.ip_network("10.0.0.0/8")], random.Random(1))


def test_nth_address():
    net = ipaddress.ip_network("10.9.8.0/24")
    assert (subnets.nth(net, 2), subnets.nth(net, -2)) == ("10.9.8.2", "10.9.8.254")
    assert subnets.nth(ipaddress.ip_network("fd42::/64"), -1) == "fd42::ffff:ffff:ffff:ffff"


def test_eui64_slaac_address():
    assert _eui64(ipaddress.ip_network("fd42:1:2:3::/64"), "00:16:3e:aa:bb:cc") == "fd42:1:2:3:216:3eff:feaa:bbcc"
    assert _eui64(ipaddress.ip_network("fd42::/80"), "00:16:3e:aa:bb:cc") is None


def _driver(kind: str, name: str = "tb0"):
    return DRIVERS[kind](name, {}, DriverContext(lxd_dir=Path("/nonexistent")))


def test_bridge_defaults_as_lxd(monkeypatch):
    drv = _driver("bridge")
    monkeypatch.setattr(bridge_mod, "ipv6_enabled_by_default", lambda: True)
    assert drv.fill_config({}) == {"ipv4.address": "auto", "ipv4.nat": "true", "ipv6.address": "auto",
                                   "ipv6.nat": "true"}
    # NAT is only the default of an `auto` address; a given one keeps what it was given.
    assert drv.fill_config({"ipv4.address": "10.1.1.1/24", "ipv6.address": "none"}) == {
        "ipv4.address": "10.1.1.1/24", "ipv6.address": "none"}
    monkeypatch.setattr(bridge_mod, "ipv6_enabled_by_default", lambda: False)
    assert "ipv6.address" not in drv.fill_config({})
    filled = drv.populate_auto({"ipv4.address": "auto", "ipv6.address": "auto"}, [])
    assert filled["ipv4.address"].startswith("10.") and filled["ipv6.address"].startswith("fd42:")


@pytest.mark.parametrize("config, message", [
    ({"ipv4.address": "10.0.0.0/24"}, "Invalid value for network 'tb0' option 'ipv4.address': Not a usable"),
    ({"ipv4.address": "fd42::1/64"}, "option 'ipv4.address': Not an IPv4 address"),
    ({"ipv4.nat": "maybe"}, "option 'ipv4.nat': Invalid value for a boolean"),
    ({"bridge.mtu": "100"}, "option 'bridge.mtu': Out of MTU range (1280-16384)"),
    ({"bridge.hwaddr": "00:11:22"}, "option 'bridge.hwaddr': Invalid MAC address"),
    ({"dns.mode": "loud"}, "option 'dns.mode': Invalid value 'loud' (not one of"),
    ({"ipv4.dhcp.ranges": "10.0.0.9"}, "option 'ipv4.dhcp.ranges': Item '10.0.0.9': IP range must contain"),
    ({"ipv4.dhcp.expiry": "soon"}, "option 'ipv4.dhcp.expiry': Invalid lease time"),
    ({"bridge.external_interfaces": "a"}, "Invalid interface name 'a'"),
    ({"nosuch.key": "1"}, "Invalid option for network 'tb0' option 'nosuch.key'"),
    ({"ipv4.address": "10.0.0.1/24", "ipv4.dhcp.ranges": "10.0.1.2-10.0.1.9"},
     "The range '10.0.1.2-10.0.1.9' in \"ipv4.dhcp.ranges\" is not inside the network's subnet 10.0.0.0/24"),
    ({"bridge.driver": "openvswitch"}, "Open vSwitch isn't installed"),
    ({"fan.type": "vxlan"}, "FAN configuration may only be set when in 'fan' mode"),
])
def test_bridge_validation_messages(config, message):
    with pytest.raises(InvalidConfig) as e:
        _driver("bridge").validate(config)
    assert message in str(e.value)


def test_bridge_accepts_every_issue_key():
    _driver("bridge").validate({
        "ipv4.address": "10.0.0.1/24", "ipv4.nat": "true", "ipv4.nat.address": "10.9.9.9", "ipv4.nat.order": "after",
        "ipv4.dhcp": "true", "ipv4.dhcp.ranges": "10.0.0.10-10.0.0.20", "ipv4.dhcp.expiry": "2h",
        "ipv4.dhcp.gateway": "10.0.0.1", "ipv4.routing": "true", "ipv4.firewall": "false",
        "ipv4.routes": "10.200.0.0/24",
        "ipv6.address": "fd42:1::1/64", "ipv6.nat": "false", "ipv6.nat.address": "fd00::9", "ipv6.nat.order": "before",
        "ipv6.dhcp": "true", "ipv6.dhcp.stateful": "true", "ipv6.dhcp.ranges": "fd42:1::10-fd42:1::20",
        "ipv6.dhcp.expiry": "infinite", "ipv6.routing": "true", "ipv6.firewall": "true",
        "dns.domain": "example", "dns.mode": "dynamic", "dns.search": "example", "bridge.driver": "native",
        "bridge.mtu": "1400", "bridge.hwaddr": "00:16:3e:01:02:03", "bridge.external_interfaces": "eth9,dummy3",
        "raw.dnsmasq": "log-queries", "user.note": "anything"})


def test_bridge_names_are_interface_names():
    cls = DRIVERS["bridge"]
    cls.validate_name("lxdbr0")
    for bad, msg in (("x" * 16, r"too long \(maximum 15"), ("a", "too short"), ("br 0", "invalid characters")):
        with pytest.raises(ValueError, match=msg):
            cls.validate_name(bad)


@pytest.mark.parametrize("kind", ["macvlan", "physical"])
def test_parent_networks_need_a_parent(kind):
    drv = _driver(kind)
    with pytest.raises(InvalidConfig, match="option 'parent': Required value"):
        drv.validate({})
    drv.validate({"parent": "eth0", "mtu": "1500", "vlan": "10"})
    with pytest.raises(InvalidConfig, match="option 'vlan': Out of VLAN ID range"):
        drv.validate({"parent": "eth0", "vlan": "5000"})
    drv.config = {"parent": "eth0", "mtu": "1400"}
    assert drv.nic_parent() == "eth0" and drv.mtu() == 1400


def test_stable_bridge_hwaddr():
    a = bridge_mod.stable_hwaddr("seed.0.1")
    assert a == bridge_mod.stable_hwaddr("seed.0.1") != bridge_mod.stable_hwaddr("seed.0.2")
    assert a.startswith("00:16:3e:")


def _args(**kw):
    base = {"network_address": None, "network_port": None, "trust_password": None, "storage_backend": "",
            "storage_create_device": "", "storage_create_loop": None, "storage_pool": ""}
    return SimpleNamespace(**{**base, **kw})


def test_init_auto_makes_no_network_and_sets_the_listener():
    seed = auto_seed(_args())
    assert "networks" not in seed and "config" not in seed
    assert auto_seed(_args(network_address="10.0.0.5"))["config"] == {"core.https_address": "10.0.0.5:8443"}
    assert auto_seed(_args(network_address="::", network_port=9443))["config"] == {
        "core.https_address": "[::]:9443"}
    with pytest.raises(InitError, match="--network-port can't be used without --network-address"):
        auto_seed(_args(network_port=9443))
    with pytest.raises(InitError, match="--trust-password can't be used without --network-address"):
        auto_seed(_args(trust_password="x"))
