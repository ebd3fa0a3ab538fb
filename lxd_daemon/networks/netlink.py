"""Host network primitives over rtnetlink (pyroute2), /proc/sys and tc.

Every function here blocks and acts on the network namespace of the calling thread (the
daemon's): async callers wrap them in `asyncio.to_thread` (pyroute2's synchronous API cannot run
in a thread whose event loop is running). Each opens and closes its own IPRoute
(imported on first use). Kernel refusals become `NetlinkError`, naming the object and the cause.
"""

from __future__ import annotations

import errno as _errno
import ipaddress
import os
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lxd_daemon.errors import LXDError
from lxd_daemon.util.netif import IFF_UP, link_type

PROC_SYS = Path("/proc/sys")
IFA_F_NODAD = 0x02
RT_TABLES = {"main": 254, "local": 255, "default": 253}
RTN_MULTICAST = 5
IPVLAN_MODES = {"l2": 0, "l3": 1, "l3s": 2}
LIMITS_TABLE = "lxd_limits"  # netdev table for egress policing where tc police is missing


class NetlinkError(LXDError):
    """A host network change the kernel refused; `errno` is the kernel's."""

    status = 500

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message, 409 if errno == _errno.EEXIST else None)
        self.errno = errno


@contextmanager
def _ipr(what: str) -> Iterator:
    """An IPRoute; a netlink error inside becomes NetlinkError("Failed to <what>: <cause>")."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError as PyNetlinkError

    try:
        with IPRoute() as ipr:
            yield ipr
    except PyNetlinkError as e:
        raise NetlinkError(f"Failed to {what}: {os.strerror(e.code) if e.code else e}", e.code) from None


def _code(e: Exception) -> int | None:
    return getattr(e, "code", None)


def _index(ipr, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def _need(ipr, name: str, what: str) -> int:
    idx = _index(ipr, name)
    if idx is None:
        raise NetlinkError(f"Failed to {what}: interface {name!r} not found", _errno.ENODEV)
    return idx


def link_exists(name: str) -> bool:
    return link_index(name) is not None


def link_index(name: str) -> int | None:
    if not name or len(name) > 15 or "/" in name:
        return None
    with _ipr(f"look up interface {name!r}") as ipr:
        return _index(ipr, name)


def _kind(ipr, idx: int) -> str:
    links = ipr.get_links(idx)
    info = links[0].get("linkinfo") if links else None
    return (info.get("kind") if info else None) or ""


def create_bridge(name: str, *, mtu: int | None = None, hwaddr: str | None = None) -> None:
    """Create bridge `name` (kept as is when it exists already), then apply mtu/hwaddr if given."""
    with _ipr(f"create bridge {name!r}") as ipr:
        idx = _index(ipr, name)
        if idx is None:
            ipr.link("add", ifname=name, kind="bridge")
        elif _kind(ipr, idx) != "bridge":
            raise NetlinkError(f"Failed to create bridge {name!r}: an interface of another type has that name",
                               _errno.EEXIST)
    if mtu is not None or hwaddr:
        set_link(name, mtu=mtu, hwaddr=hwaddr)


def set_link(name: str, *, mtu: int | None = None, hwaddr: str | None = None, up: bool | None = None,
             master: str | None = None) -> None:
    """Change a link: `master=""` takes it out of its bridge, `master="br0"` puts it in br0."""
    with _ipr(f"configure interface {name!r}") as ipr:
        idx = _need(ipr, name, f"configure interface {name!r}")
        if master is not None:
            midx = 0 if master == "" else _need(ipr, master, f"attach {name!r} to {master!r}")
            ipr.link("set", index=idx, master=midx)
        if mtu is not None:
            ipr.link("set", index=idx, mtu=int(mtu))
        if hwaddr:
            ipr.link("set", index=idx, address=hwaddr)
        if up is not None:
            ipr.link("set", index=idx, state="up" if up else "down")


def set_bridge_port(name: str, *, hairpin: bool) -> None:
    """Bridge-port flags of `name` (a bridge member). Hairpin mode lets frames go back out the
    port they came in by, which a container reaching its own NAT-published port needs (with
    bridge netfilter on, the DNATed reply is bridged back to the same port)."""
    what = f"set hairpin mode on bridge port {name!r}"
    with _ipr(what) as ipr:
        ipr.link("set", index=_need(ipr, name, what), kind="bridge_slave", mode=1 if hairpin else 0)


def delete_link(name: str) -> None:
    """Delete an interface (a veth takes its peer with it); a missing one is fine."""
    with _ipr(f"delete interface {name!r}") as ipr:
        idx = _index(ipr, name)
        if idx is None:
            return
        try:
            ipr.link("del", index=idx)
        except Exception as e:
            if _code(e) != _errno.ENODEV:
                raise


def _is_link_local(a) -> bool:
    return a.is_link_local


def set_addresses(name: str, wanted: list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]) -> None:
    """Make the link hold exactly `wanted` as its non-link-local addresses (IPv6 without DAD, so
    they are usable at once)."""
    what = f"set the addresses of {name!r}"
    with _ipr(what) as ipr:
        idx = _need(ipr, name, what)
        have = {}
        for m in ipr.get_addr(index=idx):
            addr = m.get_attr("IFA_ADDRESS") if m["family"] == socket.AF_INET6 else (
                m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS"))
            if not addr:
                continue
            iface = ipaddress.ip_interface(f"{addr}/{m['prefixlen']}")
            if not _is_link_local(iface.ip):
                have[iface] = m["family"]
        want = {ipaddress.ip_interface(w) for w in wanted}
        for iface in have:
            if iface not in want:
                ipr.addr("del", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen)
        for iface in want:
            if iface in have:
                continue
            kw = {}
            if iface.version == 4 and iface.network.prefixlen < 31:
                kw["broadcast"] = str(iface.network.broadcast_address)
            if iface.version == 6:
                kw["flags"] = IFA_F_NODAD
            ipr.addr("add", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen, **kw)


def create_veth(host_name: str, peer_name: str, *, mtu: int | None = None,
                peer_hwaddr: str | None = None, master: str | None = None) -> None:
    """A veth pair; the host end is put in bridge `master` (if given) and brought up (the peer
    is configured by whoever moves it). Without `mtu`, both ends take the master's."""
    what = f"create veth pair {host_name!r}/{peer_name!r}"
    with _ipr(what) as ipr:
        midx = _need(ipr, master, f"attach {host_name!r} to {master!r}") if master else None
        if mtu is None and midx is not None:
            links = ipr.get_links(midx)
            mtu = links[0].get("mtu") if links else None
        peer: dict = {"ifname": peer_name}
        if mtu is not None:
            peer["mtu"] = int(mtu)
        if peer_hwaddr:
            peer["address"] = peer_hwaddr
        kw = {"mtu": int(mtu)} if mtu is not None else {}
        if midx is not None:
            kw["master"] = midx
        ipr.link("add", ifname=host_name, kind="veth", peer=peer, **kw)
        try:
            ipr.link("set", index=_need(ipr, host_name, what), state="up")
        except Exception:
            delete_link(host_name)
            raise


def create_macvlan(name: str, parent: str, mode: str = "bridge", *, mtu: int | None = None,
                   hwaddr: str | None = None) -> None:
    what = f"create macvlan {name!r} on {parent!r}"
    with _ipr(what) as ipr:
        pidx = _need(ipr, parent, what)
        kw: dict = {}
        if mtu is not None:
            kw["mtu"] = int(mtu)
        if hwaddr:
            kw["address"] = hwaddr
        ipr.link("add", ifname=name, kind="macvlan", link=pidx, macvlan_mode=mode, **kw)


def create_ipvlan(name: str, parent: str, mode: str = "l3s") -> None:
    """An ipvlan link (needs CONFIG_IPVLAN; the kernel answers 'Operation not supported' without)."""
    what = f"create ipvlan {name!r} on {parent!r}"
    if mode not in IPVLAN_MODES:
        raise NetlinkError(f"Failed to {what}: unknown ipvlan mode {mode!r}", _errno.EINVAL)
    with _ipr(what) as ipr:
        pidx = _need(ipr, parent, what)
        ipr.link("add", ifname=name, kind="ipvlan", link=pidx, ipvlan_mode=IPVLAN_MODES[mode])


def move_to_netns(name: str, pid: int, new_name: str) -> None:
    """Move interface `name` into the network namespace of process `pid`, renamed `new_name`."""
    what = f"move interface {name!r} into the namespace of process {pid}"
    with _ipr(what) as ipr:
        idx = _need(ipr, name, what)
        ipr.link("set", index=idx, net_ns_pid=int(pid), ifname=new_name)


def _table(table: str | int) -> int:
    if isinstance(table, int):
        return table
    if table in RT_TABLES:
        return RT_TABLES[table]
    if str(table).isdigit():
        return int(table)
    raise NetlinkError(f"Unknown routing table {table!r}", _errno.EINVAL)


def _route_args(dst: str) -> dict:
    net = ipaddress.ip_network(dst, strict=False)
    return {"dst": str(net.network_address), "dst_len": net.prefixlen,
            "family": socket.AF_INET if net.version == 4 else socket.AF_INET6}


def add_route(dst: str, dev: str, *, table: str | int = "main") -> None:
    """A device route to `dst` (a CIDR or a single address) through `dev`; an existing one is kept."""
    what = f"add route {dst} via {dev!r}"
    with _ipr(what) as ipr:
        idx = _need(ipr, dev, what)
        try:
            ipr.route("add", oif=idx, table=_table(table), scope=253, **_route_args(dst))
        except Exception as e:
            if _code(e) != _errno.EEXIST:
                raise


def del_route(dst: str, dev: str, *, table: str | int = "main") -> None:
    """Remove the route; a missing route or device is fine."""
    what = f"remove route {dst} via {dev!r}"
    args = _route_args(dst)
    with _ipr(what) as ipr:
        idx = _index(ipr, dev)
        if idx is None:
            return
        for r in ipr.get_routes(family=args["family"], table=_table(table)):
            if (r.get("oif") != idx or (r.get("dst_len") or 0) != args["dst_len"]
                    or (r.get("dst") or "") != args["dst"]):
                continue
            try:
                ipr.route("del", oif=idx, table=_table(table), proto=r["proto"], scope=r["scope"],
                          type=r["type"], **args)
            except Exception as e:
                if _code(e) not in (_errno.ESRCH, _errno.ENOENT):
                    raise


def routes() -> list[str]:
    """Every destination prefix routed in this namespace (all tables, both families), as CIDRs.
    Default routes (prefix length 0) and multicast routes are left out: they overlap everything."""
    out: list[str] = []
    with _ipr("list routes") as ipr:
        for r in ipr.get_routes():
            dst_len = r.get("dst_len") or 0
            if dst_len == 0 or r.get("type") == RTN_MULTICAST:
                continue
            dst = r.get("dst") or r.get_attr("RTA_DST")
            if not dst:
                continue
            cidr = str(ipaddress.ip_network(f"{dst}/{dst_len}", strict=False))
            if cidr not in out:
                out.append(cidr)
    return out


def addresses() -> list[str]:
    """Every address of every interface in this namespace, as `address/prefixlen`."""
    out: list[str] = []
    with _ipr("list addresses") as ipr:
        for m in ipr.get_addr():
            addr = m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS")
            if addr:
                out.append(f"{addr}/{m['prefixlen']}")
    return out


def _sysctl_path(path: str) -> Path:
    rel = path.strip("/").replace(".", "/") if "/" not in path else path.strip("/")
    if ".." in rel.split("/"):
        raise NetlinkError(f"Bad sysctl path {path!r}", _errno.EINVAL)
    return PROC_SYS / rel


def set_sysctl(path: str, value: str | int) -> None:
    """Write /proc/sys/<path> (e.g. `net/ipv4/ip_forward`)."""
    p = _sysctl_path(path)
    try:
        p.write_text(f"{value}\n")
    except OSError as e:
        raise NetlinkError(f"Failed to set sysctl {path} to {value!r}: {e.strerror}", e.errno) from None


def get_sysctl(path: str) -> str:
    p = _sysctl_path(path)
    try:
        return p.read_text().strip()
    except OSError as e:
        raise NetlinkError(f"Failed to read sysctl {path}: {e.strerror}", e.errno) from None


def _tc(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["tc", *args], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise NetlinkError(f"Failed to run tc {' '.join(args)}: {r.stderr.strip() or r.stdout.strip()}")
    return r


def _nft(cmd: str) -> tuple[int, str]:
    import nftables

    nft = nftables.Nftables()
    rc, out, err = nft.cmd(cmd)
    return rc, err


def _nft_out(cmd: str) -> tuple[int, str]:
    import nftables

    rc, out, _ = nftables.Nftables().cmd(cmd)
    return rc, out


def _burst(bits: int) -> int:
    """Bytes of burst for a rate: 100 ms worth, at least 16 KiB (one TSO chunk is up to 64 KiB)."""
    return max(bits // 8 // 10, 65536)


def set_limits(ifname: str, *, ingress: int | None, egress: int | None) -> None:
    """Rate limits (bits/s) on a nic's host-side interface. `ingress` (traffic to the container)
    shapes the interface's egress with htb; `egress` (traffic from the container) polices its
    ingress with tc police, or, on kernels without act_police, a `limit ... drop` rule in the
    netdev table `lxd_limits` (chain named after the interface). None removes a limit. Call
    set_limits(ifname, ingress=None, egress=None) when the interface goes away: a netdev chain
    outlives its interface."""
    if not link_exists(ifname):
        if ingress is None and egress is None:
            _drop_limit_chain(ifname)
            return
        raise NetlinkError(f"Failed to set limits on {ifname!r}: interface not found", _errno.ENODEV)
    _tc("qdisc", "del", "dev", ifname, "root", check=False)
    if ingress:
        _tc("qdisc", "add", "dev", ifname, "root", "handle", "1:", "htb", "default", "10")
        _tc("class", "add", "dev", ifname, "parent", "1:", "classid", "1:10", "htb",
            "rate", f"{int(ingress)}bit", "burst", str(_burst(int(ingress))))
    _tc("qdisc", "del", "dev", ifname, "ingress", check=False)
    _drop_limit_chain(ifname)
    if egress:
        _tc("qdisc", "add", "dev", ifname, "ingress")
        r = _tc("filter", "add", "dev", ifname, "parent", "ffff:", "protocol", "all", "u32", "match", "u32",
                "0", "0", "police", "rate", f"{int(egress)}bit", "burst", str(_burst(int(egress))), "drop",
                check=False)
        if r.returncode != 0:
            _tc("qdisc", "del", "dev", ifname, "ingress", check=False)
            bytes_s = max(int(egress) // 8, 1)
            rc, err = _nft(
                f"add table netdev {LIMITS_TABLE}\n"
                f"add chain netdev {LIMITS_TABLE} {ifname} {{ type filter hook ingress device \"{ifname}\" "
                f"priority 0; }}\n"
                f"add rule netdev {LIMITS_TABLE} {ifname} limit rate over {bytes_s} bytes/second "
                f"burst {_burst(int(egress))} bytes drop\n")
            if rc != 0:
                raise NetlinkError(f"Failed to set the egress limit on {ifname!r}: {err.strip()}")


def _drop_limit_chain(ifname: str) -> None:
    rc, _ = _nft(f"list chain netdev {LIMITS_TABLE} {ifname}")
    if rc == 0:
        _nft(f"delete chain netdev {LIMITS_TABLE} {ifname}")
        rc, out = _nft_out(f"list table netdev {LIMITS_TABLE}")
        if rc == 0 and "chain " not in out:
            _nft(f"delete table netdev {LIMITS_TABLE}")



def _scope(ip) -> str:
    if ip.is_loopback:
        return "local"
    if ip.is_link_local:
        return "link"
    return "global"


def link_state(name: str) -> dict:
    """LXD's NetworkState of an interface, read over netlink (sysfs shows the namespace that
    mounted it, not necessarily the daemon's): addresses, counters, hwaddr, mtu, state, type and,
    for a bridge, its settings and ports."""
    what = f"read the state of {name!r}"
    with _ipr(what) as ipr:
        idx = _need(ipr, name, what)
        link = ipr.get_links(idx)[0]
        addrs = ipr.get_addr(index=idx)
        info = link.get("linkinfo")
        kind = (info.get("kind") if info else None) or ""
        ports = sorted(x.get("ifname") for x in ipr.get_links() if x.get("master") == idx) if kind == "bridge" \
            else []
    flags = link["flags"]
    net_type = link_type(flags)
    out_addrs = []
    for family_id, family in ((socket.AF_INET, "inet"), (socket.AF_INET6, "inet6")):
        for m in addrs:
            if m["family"] != family_id:
                continue
            addr = m.get_attr("IFA_ADDRESS") if family_id == socket.AF_INET6 else (
                m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS"))
            if addr:
                out_addrs.append({"family": family, "address": addr, "netmask": str(m["prefixlen"]),
                                  "scope": _scope(ipaddress.ip_address(addr))})
    stats = link.get("stats64") or link.get("stats") or {}
    hwaddr = link.get("address") or ""
    bridge = None
    if kind == "bridge":
        data = info.get("data")
        prio = data.get("IFLA_BR_PRIORITY") or 0
        bridge = {"id": f"{prio:04x}." + hwaddr.replace(":", ""),
                  "stp": (data.get("IFLA_BR_STP_STATE") or 0) != 0,
                  "forward_delay": data.get("IFLA_BR_FORWARD_DELAY") or 0,
                  "vlan_default": data.get("IFLA_BR_VLAN_DEFAULT_PVID") or 1,
                  "vlan_filtering": (data.get("IFLA_BR_VLAN_FILTERING") or 0) != 0,
                  "upper_devices": ports}
    return {
        "addresses": out_addrs,
        "counters": {"bytes_received": stats.get("rx_bytes", 0), "bytes_sent": stats.get("tx_bytes", 0),
                     "packets_received": stats.get("rx_packets", 0), "packets_sent": stats.get("tx_packets", 0)},
        "hwaddr": "" if all(c in "0:" for c in hwaddr) else hwaddr,
        "mtu": link.get("mtu") or 0,
        "state": "up" if flags & IFF_UP else "down",
        "type": net_type,
        "bond": None,
        "bridge": bridge,
        "vlan": None,
        "ovn": None,
    }
