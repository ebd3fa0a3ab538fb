"""macvlan: a macvlan interface on `parent` (or a managed macvlan network's parent), bridge
mode. liblxc makes it at start; hot-plugged, the daemon makes it and a worker moves it in."""

from __future__ import annotations

import asyncio

from lxd_daemon.devices.base import DeviceContext
from lxd_daemon.devices.nic import veth
from lxd_daemon.devices.nic.common import MTU_HWADDR, NicPrepared, is_ifname
from lxd_daemon.devices.runconfig import NetInterface, RunConfig
from lxd_daemon.errors import BadRequest

NICTYPE = "macvlan"
HOTPLUGGABLE = True
PARENT_REQUIRED = True
OPTIONS = {"parent": is_ifname, **MTU_HWADDR}


def check(dev: dict) -> None:
    return None


def run_config(nic, ctx: DeviceContext, prep: NicPrepared | None) -> RunConfig:
    dev = nic.config
    if prep is None:
        prep = NicPrepared(name=nic.pure_name(ctx), hwaddr=dev.get("hwaddr") or nic.volatile(ctx, "hwaddr"),
                           mtu=int(dev["mtu"]) if dev.get("mtu") else None, link=dev.get("parent", ""))
    return RunConfig(interfaces=[NetInterface("macvlan", name=prep.name, link=prep.link, hwaddr=prep.hwaddr,
                                              mtu=prep.mtu, extra=(("macvlan.mode", "bridge"),))])


async def parent_of(nic, ctx: DeviceContext) -> tuple[str, int | None]:
    dev = nic.config
    if dev.get("network"):
        from lxd_daemon.devices.nic.bridged import get_network

        net = get_network(ctx, dev["network"])
        svc = veth.networks(ctx)
        return svc.nic_parent(net), svc.mtu(net)
    return dev["parent"], None


async def start(nic, ctx: DeviceContext) -> RunConfig:
    dev = nic.config
    parent, net_mtu = await parent_of(nic, ctx)
    if not await asyncio.to_thread(veth.netlink().link_exists, parent):
        raise BadRequest(f"Invalid device {nic.name!r}: parent interface {parent!r} doesn't exist")
    mtu = int(dev["mtu"]) if dev.get("mtu") else net_mtu
    ctx.prepared[nic.name] = NicPrepared(name=await nic.ifname(ctx), hwaddr=await nic.hwaddr(ctx), mtu=mtu,
                                         link=parent)
    return run_config(nic, ctx, ctx.prepared[nic.name])


async def stop(nic, ctx: DeviceContext) -> RunConfig:
    name = nic.config.get("name") or nic.volatile(ctx, "name")
    return RunConfig(interfaces=[NetInterface("macvlan", name=name)] if name else [])
