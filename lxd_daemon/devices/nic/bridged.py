"""bridged: a veth pair whose host end joins a bridge: `parent` (a bridge the daemon doesn't
manage) or the managed network `network`."""

from __future__ import annotations

import ipaddress

from lxd_daemon.devices.base import DeviceContext
from lxd_daemon.devices.nic import veth
from lxd_daemon.devices.nic.common import (
    LIMITS,
    MTU_HWADDR,
    NicPrepared,
    is_ifname,
    is_ipv4,
    is_ipv4_cidr_list,
    is_ipv6,
    is_ipv6_cidr_list,
)
from lxd_daemon.devices.runconfig import RunConfig
from lxd_daemon.errors import BadRequest
from lxd_daemon.util import validate as v

NICTYPE = "bridged"
HOTPLUGGABLE = True
PARENT_REQUIRED = True
OPTIONS = {"parent": is_ifname, "host_name": is_ifname, "ipv4.address": is_ipv4, "ipv6.address": is_ipv6,
           "ipv4.routes": is_ipv4_cidr_list, "ipv6.routes": is_ipv6_cidr_list,
           "security.mac_filtering": v.is_bool, "security.ipv4_filtering": v.is_bool,
           "security.ipv6_filtering": v.is_bool, **MTU_HWADDR, **LIMITS}


def check(dev: dict) -> None:
    if (dev.get("ipv4.address") or dev.get("ipv6.address")) and not dev.get("network"):
        raise ValueError("static addresses (ipv4.address, ipv6.address) need a managed network (network=)")
    if (dev.get("ipv4.routes") or dev.get("ipv6.routes")):
        raise ValueError("ipv4.routes / ipv6.routes are not supported by this server")


def get_network(ctx: DeviceContext, name: str):
    """The managed network `name` of the instance's project (NotFound when there is none)."""
    return veth.networks(ctx).get(name, ctx.project)


def check_static(nic, ctx: DeviceContext, network) -> None:
    """A static address must lie in the network's subnet and not be another nic's on it."""
    svc = veth.networks(ctx)
    dev = nic.config
    for family, key in ((4, "ipv4.address"), (6, "ipv6.address")):
        if not dev.get(key):
            continue
        addr = ipaddress.ip_address(dev[key])
        subnet = svc.subnet(network, family)
        if subnet is None:
            raise BadRequest(f"Invalid device {nic.name!r}: network {network.name!r} has no IPv{family} subnet "
                             f"for {key} {dev[key]}")
        if addr not in subnet.network or addr in (subnet.ip, subnet.network.network_address) or (
                family == 4 and addr == subnet.network.broadcast_address):
            raise BadRequest(f"Invalid device {nic.name!r}: {key} {dev[key]} is not a usable address of "
                             f"network {network.name!r} ({subnet.network})")
        owner = address_owner(ctx, network.name, key, addr, exclude=(ctx.instance, nic.name))
        if owner:
            raise BadRequest(f"Invalid device {nic.name!r}: {key} {dev[key]} is already used by {owner} on "
                             f"network {network.name!r}")


def address_owner(ctx: DeviceContext, network: str, key: str, addr, *, exclude: tuple[str, str]) -> str:
    svc = ctx.instances
    if svc is None:
        return ""
    space = svc.projects.effective(ctx.project, "networks")  # the instances on the same network
    for inst in sorted(svc.records):
        rec = svc.records[inst]
        if svc.projects.effective(rec.project, "networks") != space:
            continue
        try:
            devices = svc.expanded(inst)[1]
        except Exception:
            continue
        for dname, d in devices.items():
            if (inst, dname) == exclude or d.get("type") != "nic" or d.get("network") != network:
                continue
            try:
                if d.get(key) and ipaddress.ip_address(d[key]) == addr:
                    where = "" if rec.project == "default" else f" of project {rec.project!r}"
                    return f"instance {rec.name!r}{where} (device {dname!r})"
            except ValueError:
                continue
    return ""


def run_config(nic, ctx: DeviceContext, prep: NicPrepared | None) -> RunConfig:
    return veth.veth_run_config(nic, ctx, prep)


async def start(nic, ctx: DeviceContext) -> RunConfig:
    network = None
    bridge = nic.config.get("parent", "")
    if nic.config.get("network"):
        network = get_network(ctx, nic.config["network"])
        check_static(nic, ctx, network)
        bridge = veth.networks(ctx).nic_parent(network)
        return await veth.start_veth(nic, ctx, bridge=bridge, network=network)
    return await veth.start_veth(nic, ctx, bridge=bridge)


async def stop(nic, ctx: DeviceContext) -> RunConfig:
    return await veth.stop_veth(nic, ctx)


async def remove(nic, ctx: DeviceContext) -> None:
    await veth.remove_managed(nic, ctx)
