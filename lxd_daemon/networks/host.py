"""The host's network interfaces, read as LXD 5.0 reports unmanaged networks.

Pure reads of /sys/class/net, /proc/net and (for addresses) rtnetlink through pyroute2, which is
imported on first use. Everything here blocks: callers run it in a thread.
"""

from __future__ import annotations

import os
from pathlib import Path

from lxd_daemon.util.netif import IFF_LOOPBACK, IFF_UP, link_type

SYS_NET = Path("/sys/class/net")
PROC_NET = Path("/proc/net")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _read_int(path: Path) -> int | None:
    s = _read(path)
    try:
        return int(s, 0) if s is not None else None
    except ValueError:
        return None


def listed(name: str) -> bool:
    """LXD leaves veth pairs out (there can be thousands of them)."""
    return not name.startswith("veth")


def interface_names() -> list[str]:
    """The interfaces of the daemon's network namespace, in ifindex order (as LXD lists them)."""
    out = []
    try:
        entries = os.listdir(SYS_NET)
    except OSError:
        return []
    for name in entries:
        index = _read_int(SYS_NET / name / "ifindex")  # skips files such as bonding_masters
        if index is not None and listed(name):
            out.append((index, name))
    return [n for _, n in sorted(out)]


def exists(name: str) -> bool:
    return listed(name) and "/" not in name and name not in (".", "..") and (SYS_NET / name / "ifindex").exists()


def _flags(name: str) -> int:
    return _read_int(SYS_NET / name / "flags") or 0


def kind(name: str) -> str:
    """The `type` LXD gives an unmanaged network."""
    base = SYS_NET / name
    if _flags(name) & IFF_LOOPBACK:
        return "loopback"
    if (base / "bridge").exists():
        return "bridge"
    if (PROC_NET / "vlan" / name).exists():
        return "vlan"
    if (base / "device").exists():
        return "physical"
    if (base / "bonding").exists():
        return "bond"
    return "unknown"


def hwaddr(name: str) -> str:
    addr = _read(SYS_NET / name / "address") or ""
    return "" if all(c in "0:" for c in addr) else addr  # an all-zero address is no address


def _scope(address: str) -> str:
    if address.startswith("127") or address == "::1":
        return "local"
    if address.startswith("169.254") or address.startswith("fe80:"):
        return "link"
    return "global"


def addresses(name: str) -> list[dict]:
    """The interface's addresses as LXD reports them (IPv4 first, then IPv6)."""
    index = _read_int(SYS_NET / name / "ifindex")
    if index is None:
        return []
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        msgs = ipr.get_addr(index=index)
    out = []
    for family_id, family in ((2, "inet"), (10, "inet6")):
        for m in msgs:
            if m["family"] != family_id:
                continue
            address = m.get_attr("IFA_ADDRESS")
            if not address:
                continue
            out.append({"family": family, "address": address, "netmask": str(m["prefixlen"]),
                        "scope": _scope(address)})
    return out


def counters(name: str) -> dict:
    out = {"bytes_received": 0, "bytes_sent": 0, "packets_received": 0, "packets_sent": 0}
    try:
        lines = (PROC_NET / "dev").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        iface, sep, rest = line.partition(":")
        fields = rest.split()
        if not sep or iface.strip() != name or len(fields) != 16:
            continue
        out.update(bytes_received=int(fields[0]), packets_received=int(fields[1]),
                   bytes_sent=int(fields[8]), packets_sent=int(fields[9]))
        break
    return out


def _bond(name: str) -> dict | None:
    base = SYS_NET / name / "bonding"
    if not base.exists():
        return None

    def first(f: str) -> str:
        return (_read(base / f) or "").split(" ")[0]

    slaves = _read(base / "slaves")
    return {"mode": first("mode"), "transmit_policy": first("xmit_hash_policy"),
            "up_delay": _read_int(base / "updelay") or 0, "down_delay": _read_int(base / "downdelay") or 0,
            "mii_frequency": _read_int(base / "miimon") or 0, "mii_state": _read(base / "mii_status") or "",
            "lower_devices": slaves.split(" ") if slaves else []}


def _bridge(name: str) -> dict | None:
    base = SYS_NET / name / "bridge"
    if not base.exists():
        return None
    try:
        upper = sorted(os.listdir(SYS_NET / name / "brif"))
    except OSError:
        upper = None
    return {"id": _read(base / "bridge_id") or "", "stp": _read_int(base / "stp_state") == 1,
            "forward_delay": _read_int(base / "forward_delay") or 0,
            "vlan_default": _read_int(base / "default_pvid") or 0,
            "vlan_filtering": _read_int(base / "vlan_filtering") == 1, "upper_devices": upper}


def _vlan(name: str) -> dict | None:
    config = _read(PROC_NET / "vlan" / "config")
    for line in (config or "").splitlines():
        fields = [f.strip() for f in line.split("|")]
        if len(fields) == 3 and fields[0] == name and fields[1].isdigit():
            return {"lower_device": fields[2], "vid": int(fields[1])}
    return None


def state(name: str) -> dict:
    """GET /1.0/networks/{name}/state of a host interface (LXD's api.NetworkState)."""
    flags = _flags(name)
    net_type = link_type(flags)
    return {
        "addresses": addresses(name),
        "counters": counters(name),
        "hwaddr": hwaddr(name),
        "mtu": _read_int(SYS_NET / name / "mtu") or 0,
        "state": "up" if flags & IFF_UP else "down",
        "type": net_type,
        "bond": _bond(name),
        "bridge": _bridge(name),
        "vlan": _vlan(name),
        "ovn": None,
    }
