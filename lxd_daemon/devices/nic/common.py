"""What the nic types share: option checks, generated names and MAC addresses, the volatile keys
a nic keeps in its instance's config, and the host-side steps (over networks/netlink.py, blocking:
called in a thread).

Volatile keys, as LXD keeps them:
- `volatile.<dev>.hwaddr`: the MAC address of a nic without `hwaddr` (all types but physical and
  ipvlan), generated (00:16:3e:xx:xx:xx) when the device is added or first started and kept for
  the instance's life (a copy gets a new one);
- `volatile.<dev>.name`: the interface name inside the container of a nic without `name`
  (the first free ethN), kept likewise;
- `volatile.<dev>.host_name`: the host-side interface of a veth-based nic (bridged, p2p, routed)
  while the container runs (removed when it stops or the nic is unplugged).
"""

from __future__ import annotations

import ipaddress
import re
import secrets
from dataclasses import dataclass

from lxd_daemon.util import validate as v

MAC_PREFIX = "00:16:3e"


# -- option checks ------------------------------------------------------------------------------


def is_ipv4(value: str) -> None:
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an IPv4 address") from None


def is_ipv6(value: str) -> None:
    try:
        ipaddress.IPv6Address(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an IPv6 address") from None


def _list_of(check):
    def run(value: str) -> None:
        for item in split_list(value):
            check(item)
        if not split_list(value):
            raise ValueError("empty list")

    return run


is_ipv4_list = _list_of(is_ipv4)
is_ipv6_list = _list_of(is_ipv6)


def is_ipv4_cidr_list(value: str) -> None:
    for item in split_list(value):
        try:
            ipaddress.IPv4Network(item, strict=False)
        except ValueError:
            raise ValueError(f"{item!r} is not an IPv4 network (CIDR)") from None


def is_ipv6_cidr_list(value: str) -> None:
    for item in split_list(value):
        try:
            ipaddress.IPv6Network(item, strict=False)
        except ValueError:
            raise ValueError(f"{item!r} is not an IPv6 network (CIDR)") from None


def split_list(value: str) -> list[str]:
    return [x.strip() for x in value.split(",") if x.strip()]


_RATE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kMGTP]?)(bit|B)(?:/s)?$", re.IGNORECASE)
_RATE_UNITS = {"": 1, "k": 10 ** 3, "m": 10 ** 6, "g": 10 ** 9, "t": 10 ** 12, "p": 10 ** 15}


def parse_bit_rate(value: str) -> int:
    """A rate as LXD's limits.* take it ("100Mbit", "10kbit", "1Gbit", "500kB/s") in bits/s."""
    m = _RATE.match(value.strip())
    if not m:
        raise ValueError(f"{value!r} is not a bit rate (e.g. 10Mbit, 1Gbit)")
    n = float(m.group(1)) * _RATE_UNITS[m.group(2).lower()]
    return int(n * (8 if m.group(3) == "B" else 1))


def is_bit_rate(value: str) -> None:
    parse_bit_rate(value)


def is_priority(value: str) -> None:
    if not value.isdigit() or int(value) > 10:
        raise ValueError(f"{value!r} is not a priority (0-10)")


is_ifname = v.is_interface_name
COMMON = {"nictype": v.is_any, "name": is_ifname, "boot.priority": v.is_uint}
MTU_HWADDR = {"mtu": v.is_mtu, "hwaddr": v.is_mac}
LIMITS = {"limits.ingress": is_bit_rate, "limits.egress": is_bit_rate, "limits.max": is_bit_rate,
          "limits.priority": is_priority}
# LXD options this daemon refuses with a clear message rather than ignoring them.
UNSUPPORTED = {
    "vlan": "VLAN tagging", "vlan.tagged": "VLAN tagging", "gvrp": "GVRP", "maas.subnet.ipv4": "MAAS",
    "maas.subnet.ipv6": "MAAS", "ipv4.routes.external": "external routes", "ipv6.routes.external": "external routes",
    "ipv4.host_table": "custom host routing tables", "ipv6.host_table": "custom host routing tables",
    "queue.tx.length": "tx queue lengths", "security.port_isolation": "port isolation",
}


def unsupported_check(key: str):
    def check(value: str) -> None:
        raise ValueError(f"{UNSUPPORTED[key]} ({key}) is not supported by this server")

    return check


# -- generated values ---------------------------------------------------------------------------


def random_mac() -> str:
    return MAC_PREFIX + "".join(f":{b:02x}" for b in secrets.token_bytes(3))


def random_ifname(prefix: str) -> str:
    """LXD's host-side names: a prefix and 8 random hex digits ("veth1a2b3c4d")."""
    return prefix + secrets.token_hex(4)


def next_eth_name(taken: set[str]) -> str:
    i = 0
    while f"eth{i}" in taken:
        i += 1
    return f"eth{i}"


def volatile_defaults(devices: dict[str, dict], config: dict[str, str]) -> dict[str, str]:
    """volatile.<dev>.hwaddr and .name of each nic that needs one and has none yet (when an
    instance is created or its nics change)."""
    out: dict[str, str] = {}
    taken = {d.get("name") or config.get(f"volatile.{n}.name", "")
             for n, d in devices.items() if d.get("type") == "nic"}
    for n, d in sorted(devices.items()):
        if d.get("type") != "nic":
            continue
        if needs_hwaddr(d) and not d.get("hwaddr") and not config.get(f"volatile.{n}.hwaddr"):
            out[f"volatile.{n}.hwaddr"] = random_mac()
        if not d.get("name") and not config.get(f"volatile.{n}.name"):
            name = next_eth_name(taken)
            taken.add(name)
            out[f"volatile.{n}.name"] = name
    return out


def needs_hwaddr(dev: dict) -> bool:
    return dev.get("nictype") not in ("physical", "ipvlan")


# -- what a started nic made --------------------------------------------------------------------


@dataclass(frozen=True)
class NicPrepared:
    """What a nic's start() prepared for the container: the interface liblxc moves in (`link`,
    "phys"), or none for the types liblxc creates itself (a veth pair, a macvlan)."""

    name: str                    # inside the container
    hwaddr: str = ""
    mtu: int | None = None
    host_name: str = ""          # the host end of a veth pair
    link: str = ""               # what liblxc / the hotplug moves in (a pair start() made)
    bridge: str = ""             # the bridge the host end of a pair liblxc makes joins


def keep_volatile(old_config: dict[str, str], new_config: dict[str, str], devices: dict[str, dict]) -> dict[str, str]:
    """The volatile.<dev>.* keys of nics that are still there, which a PUT left out."""
    prefixes = tuple(f"volatile.{n}." for n, d in devices.items() if d.get("type") == "nic")
    return {k: val for k, val in old_config.items()
            if prefixes and k.startswith(prefixes) and k not in new_config}


def after_live(current: dict[str, str], config: dict[str, str], devices: dict[str, dict]) -> dict[str, str]:
    """The config to store after a live change: the nics' volatile keys as plugging and
    unplugging left them in the record (`current`), not as the request carried them."""
    prefixes = tuple(f"volatile.{n}." for n, d in devices.items() if d.get("type") == "nic")
    out = {k: val for k, val in config.items() if not (k.startswith("volatile.") and k.endswith(".host_name"))}
    out.update({k: val for k, val in current.items() if prefixes and k.startswith(prefixes)})
    return out


_RESERVED = ("idmap", "last_state", "apply_template", "base_image", "uuid", "cloud-init")


def drop_gone(config: dict[str, str], old_devices: dict[str, dict], new_devices: dict[str, dict]) -> dict[str, str]:
    """The config without the volatile.<dev>.* keys of nics that left the instance (as LXD)."""
    prefixes = tuple(f"volatile.{n}." for n, d in old_devices.items()
                     if d.get("type") == "nic" and n not in new_devices and n not in _RESERVED)
    if not prefixes:
        return config
    return {k: val for k, val in config.items() if not k.startswith(prefixes)}
