"""The veth pair the bridged, p2p and routed nics are made of, and the host-side work around it
(limits, filtering, DHCP host entries, routes). Host calls block: each runs in a thread."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable

from lxd_daemon.devices.base import DeviceContext
from lxd_daemon.devices.nic.common import NicPrepared, parse_bit_rate, random_ifname, split_list
from lxd_daemon.devices.runconfig import NetInterface, RunConfig
from lxd_daemon.errors import BadRequest, LXDError
from lxd_daemon.util.revert import Revert

log = logging.getLogger("lxd.devices.nic")


def netlink():
    from lxd_daemon.networks import netlink as nl

    return nl


async def host(fn: Callable, *args, **kwargs):
    """A blocking host call in a thread; a host failure becomes BadRequest with its message."""
    try:
        return await asyncio.to_thread(fn, *args, **kwargs)
    except LXDError as e:
        raise BadRequest(e.message) from None
    except OSError as e:
        raise BadRequest(str(e)) from None


def limits_of(dev: dict) -> tuple[int | None, int | None]:
    """(ingress, egress) in bits/s: limits.max sets both unless given one by one."""
    top = dev.get("limits.max", "")
    ingress = dev.get("limits.ingress", "") or top
    egress = dev.get("limits.egress", "") or top
    return (parse_bit_rate(ingress) if ingress else None, parse_bit_rate(egress) if egress else None)


def filter_key(ctx: DeviceContext, dev_name: str) -> str:
    """The nic's name for the firewall and DHCP host entries (LXD's `<project>_<instance>.<dev>`)."""
    return f"{ctx.project}_{ctx.instance_name}.{dev_name}"


def networks(ctx: DeviceContext):
    """The managed network service (Part B), or BadRequest when this server has none."""
    svc = ctx.instances.services.networks if ctx.instances is not None else None
    if svc is None:
        raise BadRequest("Managed networks are not available on this server")
    return svc


async def start_veth(nic, ctx: DeviceContext, *, bridge: str = "", routed: bool = False,
                     network=None) -> RunConfig:
    """Set up the host side of a veth pair, record host_name, and describe the container's end.

    bridged and p2p: the pair is described, not made here: liblxc makes it at start, creating
    the container's end directly in the container's network namespace (moving an interface
    between namespaces waits for an RCU grace period, ~15 ms here), and live.plug_interface
    makes it for a hot-plug. Filters match the host end by name, so they are in place before it
    exists; tc limits need the interface and follow in a post_start hook.
    routed: the daemon makes the pair first (the host end holds the gateway addresses and the
    routes before the container runs) and liblxc moves the peer in as a "phys" interface.
    `network`: the managed network object, for DHCP entries and filters."""
    dev = nic.config
    name = await nic.ifname(ctx)
    hwaddr = await nic.hwaddr(ctx)
    mtu = int(dev["mtu"]) if dev.get("mtu") else None
    if mtu is None and network is not None:
        mtu = networks(ctx).mtu(network)
    nl = netlink()
    host_name = dev.get("host_name") or random_ifname("veth")
    peer = random_ifname("veth") if routed else ""

    def check_and_make() -> None:  # one thread hop and one netlink session on the start path
        if dev.get("host_name") and nl.link_exists(host_name):
            raise BadRequest(f"Invalid device {nic.name!r}: host interface {host_name!r} already exists")
        if bridge and not nl.link_exists(bridge):
            raise BadRequest(f"Invalid device {nic.name!r}: parent bridge {bridge!r} doesn't exist")
        if peer:
            nl.create_veth(host_name, peer, mtu=mtu, peer_hwaddr=hwaddr or None, master=bridge or None)

    ingress, egress = limits_of(dev)
    async with Revert() as revert:
        await host(check_and_make)
        revert.add(host, nl.delete_link, host_name)
        if routed:
            await _route_to(nic, ctx, host_name)
            if ingress or egress:
                await host(nl.set_limits, host_name, ingress=ingress, egress=egress)
        if network is not None:
            await _managed_attach(nic, ctx, network, host_name, hwaddr)
            revert.add(_managed_detach, nic, ctx, network)
        if await apply_filter(nic, ctx, host_name, hwaddr, bridge, network):
            revert.add(drop_filter, nic, ctx)
        await nic.set_volatile(ctx, {"host_name": host_name}, background=True)
        revert.success()
    ctx.prepared[nic.name] = NicPrepared(name=name, hwaddr=hwaddr, mtu=mtu, host_name=host_name, link=peer,
                                         bridge=bridge)
    rc = veth_run_config(nic, ctx, ctx.prepared[nic.name])
    if not routed and (ingress or egress):
        async def limit() -> None:  # the host end exists once the container started
            await host(nl.set_limits, host_name, ingress=ingress, egress=egress)

        rc.post_start.append(limit)
    return rc


def veth_run_config(nic, ctx: DeviceContext, prep: NicPrepared | None) -> RunConfig:
    """The container's end: a pair liblxc makes ("veth": host end `host_name` in `bridge`), or
    the peer of a pair made by start() that liblxc moves in ("phys"); none without a start."""
    if prep is None:
        return RunConfig()
    if not prep.link:
        return RunConfig(interfaces=[NetInterface("veth", name=prep.name, link=prep.bridge, hwaddr=prep.hwaddr,
                                                  mtu=prep.mtu, host_name=prep.host_name)])
    extra: list[tuple[str, str]] = []
    if nic.nictype == "routed":
        extra = routed_items(nic.config)
    return RunConfig(interfaces=[NetInterface("phys", name=prep.name, link=prep.link, hwaddr=prep.hwaddr,
                                              mtu=prep.mtu, extra=tuple(extra))])


def routed_items(dev: dict) -> list[tuple[str, str]]:
    """The container side of a routed nic: each address alone, the host end as the gateway."""
    out: list[tuple[str, str]] = []
    v4 = split_list(dev.get("ipv4.address", ""))
    v6 = split_list(dev.get("ipv6.address", ""))
    for a in v4:
        out.append(("ipv4.address", f"{a}/32"))
    if v4 and dev.get("ipv4.gateway", "auto") == "auto":
        out.append(("ipv4.gateway", dev.get("ipv4.host_address") or "169.254.0.1"))
    for a in v6:
        out.append(("ipv6.address", f"{a}/128"))
    if v6 and dev.get("ipv6.gateway", "auto") == "auto":
        out.append(("ipv6.gateway", dev.get("ipv6.host_address") or "fe80::1"))
    return out


async def _route_to(nic, ctx: DeviceContext, host_name: str) -> None:
    """The host end of a routed nic holds the gateway addresses; each container address gets a
    host route through it (and is proxied on `parent` when one is given)."""
    dev = nic.config
    nl = netlink()
    v4 = split_list(dev.get("ipv4.address", ""))
    v6 = split_list(dev.get("ipv6.address", ""))
    addrs = []
    if v4:
        addrs.append(ipaddress.ip_interface((dev.get("ipv4.host_address") or "169.254.0.1") + "/32"))
    if v6:
        addrs.append(ipaddress.ip_interface((dev.get("ipv6.host_address") or "fe80::1") + "/128"))
    if addrs:
        await host(_add_addresses, host_name, addrs)
    if v4:  # the container's traffic is routed on from its host end (as LXD does)
        await host(nl.set_sysctl, f"net/ipv4/conf/{host_name}/forwarding", 1)
    for a in v4:
        await host(nl.add_route, f"{a}/32", host_name)
    for a in v6:
        await host(nl.add_route, f"{a}/128", host_name)
    parent = dev.get("parent", "")
    if parent:
        await host(_proxy_neigh, parent, v4 + v6)


def _add_addresses(name: str, addrs: list) -> None:
    """Add addresses to a link (link-local ones too, which set_addresses leaves alone)."""
    import socket

    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=name)[0]
        for a in addrs:
            kw = {"flags": 0x02} if a.version == 6 else {}  # IFA_F_NODAD
            ipr.addr("add", index=idx, address=str(a.ip), prefixlen=a.network.prefixlen,
                     family=socket.AF_INET if a.version == 4 else socket.AF_INET6, **kw)


def _proxy_neigh(parent: str, addrs: list[str]) -> None:
    """Answer ARP/NDP for the container's addresses on `parent` (proxy neighbour entries)."""
    from pyroute2 import IPRoute

    nl = netlink()
    if not nl.link_exists(parent):
        raise BadRequest(f"Parent interface {parent!r} doesn't exist")
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=parent)[0]
        for a in addrs:
            ip = ipaddress.ip_address(a)
            ipr.neigh("replace", dst=str(ip), ifindex=idx, flags=0x08,  # NTF_PROXY
                      family=2 if ip.version == 4 else 10)


def _proxy_neigh_drop(parent: str, addrs: list[str]) -> None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=parent)
        if not found:
            return
        for a in addrs:
            ip = ipaddress.ip_address(a)
            try:
                ipr.neigh("del", dst=str(ip), ifindex=found[0], flags=0x08, family=2 if ip.version == 4 else 10)
            except Exception:  # gone already
                pass


async def _managed_attach(nic, ctx: DeviceContext, network, host_name: str, hwaddr: str) -> None:
    """The nic's DHCP host entry on the managed network (its name for DNS, its static lease)."""
    dev = nic.config
    svc = networks(ctx)
    await svc.nic_attach(network, filter_key(ctx, nic.name), hwaddr=hwaddr, hostname=ctx.dns_name,
                         ipv4=dev.get("ipv4.address") or None, ipv6=dev.get("ipv6.address") or None)


def filtering(dev: dict) -> bool:
    from lxd_daemon.devices.base import dev_bool

    return any(dev_bool(dev, k) for k in ("security.mac_filtering", "security.ipv4_filtering",
                                          "security.ipv6_filtering"))


async def apply_filter(nic, ctx: DeviceContext, host_name: str, hwaddr: str, bridge: str, network=None) -> bool:
    """security.mac_filtering / ipv4_filtering / ipv6_filtering through the firewall (an
    address filter implies the MAC filter, as in LXD). False when the nic asks for none."""
    from lxd_daemon.devices.base import dev_bool

    dev = nic.config
    mac = dev_bool(dev, "security.mac_filtering")
    f4 = dev_bool(dev, "security.ipv4_filtering")
    f6 = dev_bool(dev, "security.ipv6_filtering")
    if not (mac or f4 or f6):
        return False
    fw = networks(ctx).firewall
    if fw is None:
        why = networks(ctx).firewall_error or "nftables is not usable"
        raise BadRequest(f"Invalid device {nic.name!r}: security.*_filtering needs the firewall: {why}")
    ipv4 = ipv6 = None
    if f4:
        ipv4 = [dev["ipv4.address"]] if dev.get("ipv4.address") else []
        if not dev.get("ipv4.address") and network is not None:
            subnet = networks(ctx).subnet(network, 4)
            ipv4 = [str(subnet.network)] if subnet is not None else []
    if f6:
        ipv6 = [dev["ipv6.address"]] if dev.get("ipv6.address") else []
        if not dev.get("ipv6.address") and network is not None:
            subnet = networks(ctx).subnet(network, 6)
            ipv6 = [str(subnet.network)] if subnet is not None else []
    await host(fw.nic_filter_apply, filter_key(ctx, nic.name), bridge=bridge, host_ifname=host_name,
               hwaddr=hwaddr, mac=mac or f4 or f6, ipv4=ipv4, ipv6=ipv6)
    return True


async def drop_filter(nic, ctx: DeviceContext) -> None:
    try:
        fw = networks(ctx).firewall
        if fw is not None:
            await host(fw.nic_filter_drop, filter_key(ctx, nic.name))
    except BadRequest as e:
        log.warning("couldn't drop a nic's filter", extra={"device": nic.name, "err": e.message})


async def _managed_detach(nic, ctx: DeviceContext, network) -> None:
    svc = networks(ctx)
    await svc.nic_detach(network, filter_key(ctx, nic.name))


async def stop_veth(nic, ctx: DeviceContext, *, network=None) -> RunConfig:
    """Take the peer out of a running container (hotplug) and, after, remove the host end."""
    # only the host end this nic made (recorded at start), never an interface merely named in the config
    host_name = nic.volatile(ctx, "host_name") or (
        ctx.prepared[nic.name].host_name if nic.name in ctx.prepared else "")
    name = nic.config.get("name") or nic.volatile(ctx, "name") or (
        ctx.prepared[nic.name].name if nic.name in ctx.prepared else "")

    async def after() -> None:
        nl = netlink()
        dev = nic.config
        if filtering(dev):
            await drop_filter(nic, ctx)
        if host_name:
            ingress, egress = limits_of(dev)
            if ingress or egress:
                await host(nl.set_limits, host_name, ingress=None, egress=None)
            await host(nl.delete_link, host_name)
        if nic.nictype == "routed" and dev.get("parent"):
            await host(_proxy_neigh_drop, dev["parent"],
                       split_list(dev.get("ipv4.address", "")) + split_list(dev.get("ipv6.address", "")))
        await nic.set_volatile(ctx, {"host_name": None})

    rc = RunConfig(post_stop=[after])
    if name:
        rc.interfaces.append(NetInterface("veth", name=name))
    return rc


async def remove_managed(nic, ctx: DeviceContext) -> None:
    """The nic left the instance: its DHCP host entry goes."""
    if nic.config.get("network"):
        try:
            svc = networks(ctx)
            await svc.nic_detach(svc.get(nic.config["network"], ctx.project), filter_key(ctx, nic.name))
        except LXDError:
            pass
