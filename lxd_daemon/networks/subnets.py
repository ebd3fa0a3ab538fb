"""Subnets of managed networks: parsing, overlap checks and the choice of an unused subnet for
`ipv4.address=auto` / `ipv6.address=auto`.

The choice reads only what the host already knows (its routes and its interfaces' addresses,
passed in by the caller from netlink.routes() / netlink.addresses()); it never sends a packet to
find out whether a subnet is taken. Everything here is pure.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Iterable

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

AUTO_TRIES = 100  # as LXD: 100 random candidates, then give up


def is_set(value: str | None) -> bool:
    """Whether an `ipv4.address`/`ipv6.address` value gives the bridge an address."""
    return value not in (None, "", "none")


def interface(value: str, family: int) -> IPInterface:
    """`10.0.0.1/24` -> IPv4Interface; ValueError (LXD's wording) when it is not a usable address
    of that family with a prefix."""
    if "/" not in value:
        raise ValueError(f"invalid CIDR address: {value}")
    try:
        iface = ipaddress.ip_interface(value)
    except ValueError:
        raise ValueError(f"invalid CIDR address: {value}") from None
    if iface.version != family:
        raise ValueError(f"Not an IPv{family} address {value!r}")
    if iface.ip == iface.network.network_address and iface.network.prefixlen < iface.max_prefixlen:
        raise ValueError(f"Not a usable IPv{family} address {value!r}")
    return iface


def address(value: str, family: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"Not an IPv{family} address {value!r}") from None
    if ip.version != family:
        raise ValueError(f"Not an IPv{family} address {value!r}")
    return ip


def network(value: str, family: int) -> IPNetwork:
    """A CIDR network of that family (host bits allowed to be set, as LXD's IsNetworkV4/V6)."""
    try:
        net = ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise ValueError(f"invalid CIDR address: {value}") from None
    if net.version != family or "/" not in value:
        raise ValueError(f"Not an IPv{family} network {value!r}")
    return net


def ranges(value: str, family: int) -> list[tuple[str, str]]:
    """`a-b,c-d` -> [(a, b), (c, d)]; each bound an address of the family, start <= end."""
    out = []
    for item in value.split(","):
        item = item.strip()
        parts = item.split("-", 1)
        if len(parts) != 2:
            raise ValueError(f"Item {item!r}: IP range must contain start and end IP addresses")
        try:
            start, end = address(parts[0].strip(), family), address(parts[1].strip(), family)
        except ValueError as e:
            raise ValueError(f"Item {item!r}: {e}") from None
        if start > end:
            raise ValueError(f"Item {item!r}: start address is after the end address")
        out.append((str(start), str(end)))
    return out


def ranges_within(rngs: list[tuple[str, str]], subnet: IPNetwork) -> str | None:
    """The first range not inside `subnet` (as `a-b`), or None."""
    for start, end in rngs:
        if ipaddress.ip_address(start) not in subnet or ipaddress.ip_address(end) not in subnet:
            return f"{start}-{end}"
    return None


def host_prefixes(routes: Iterable[str], addresses: Iterable[str]) -> list[IPNetwork]:
    """Every prefix the host uses: its route destinations and its addresses' subnets, leaving
    out default routes (which hold everything) and link-local/loopback space."""
    out: list[IPNetwork] = []
    for item in [*routes, *addresses]:
        try:
            net = ipaddress.ip_network(str(item).strip(), strict=False)
        except ValueError:
            continue
        if net.prefixlen == 0 or net.is_loopback or net.is_link_local or net.is_multicast:
            continue
        out.append(net)
    return out


def overlapping(candidate: IPNetwork, used: Iterable[IPNetwork]) -> IPNetwork | None:
    """The first used prefix that overlaps `candidate` (same family), or None."""
    for net in used:
        if net.version == candidate.version and candidate.overlaps(net):
            return net
    return None


def pick(family: int, used: Iterable[IPNetwork], rng: random.Random | None = None) -> str:
    """An unused subnet for `auto`, as LXD picks one: `10.X.Y.1/24` or `fd42:X:Y:Z::1/64`.

    ValueError (LXD's message) when 100 random candidates all overlap something in use."""
    rng = rng or random.SystemRandom()
    used = list(used)
    for _ in range(AUTO_TRIES):
        if family == 4:
            cidr = f"10.{rng.randrange(255)}.{rng.randrange(255)}.1/24"
        else:
            cidr = f"fd42:{rng.randrange(65535):x}:{rng.randrange(65535):x}:{rng.randrange(65535):x}::1/64"
        if overlapping(ipaddress.ip_interface(cidr).network, used) is None:
            return cidr
    raise ValueError(f"Failed to automatically find an unused IPv{family} subnet, manual configuration required")


def nth(subnet: IPNetwork, n: int) -> str:
    """The n-th address of a subnet (negative: counted from the end, -1 the last), as LXD's
    dhcpalloc.GetIP."""
    if n >= 0:
        return str(subnet.network_address + n)
    return str(subnet.broadcast_address + 1 + n)
