"""physical: the host interface `parent` itself moves into the container (liblxc moves it back
when the container stops; an unplug gives it back under its own name)."""

from __future__ import annotations

import asyncio

from lxd_daemon.devices.base import DeviceContext
from lxd_daemon.devices.nic import veth
from lxd_daemon.devices.nic.common import MTU_HWADDR, NicPrepared, is_ifname
from lxd_daemon.devices.runconfig import NetInterface, RunConfig
from lxd_daemon.errors import BadRequest, LXDError

NICTYPE = "physical"
HOTPLUGGABLE = True
PARENT_REQUIRED = True
OPTIONS = {"parent": is_ifname, **MTU_HWADDR}


def check(dev: dict) -> None:
    return None


def run_config(nic, ctx: DeviceContext, prep: NicPrepared | None) -> RunConfig:
    dev = nic.config
    if prep is None:
        prep = NicPrepared(name=nic.pure_name(ctx), hwaddr=dev.get("hwaddr", ""),
                           mtu=int(dev["mtu"]) if dev.get("mtu") else None, link=dev.get("parent", ""))
    return RunConfig(interfaces=[NetInterface("phys", name=prep.name, link=prep.link, hwaddr=prep.hwaddr,
                                              mtu=prep.mtu)])


async def start(nic, ctx: DeviceContext) -> RunConfig:
    dev = nic.config
    parent = dev.get("parent", "")
    if dev.get("network"):
        from lxd_daemon.devices.nic.macvlan import parent_of

        parent = (await parent_of(nic, ctx))[0]
    if not await asyncio.to_thread(veth.netlink().link_exists, parent):
        raise BadRequest(f"Invalid device {nic.name!r}: parent interface {parent!r} doesn't exist")
    if (dev.get("hwaddr") or dev.get("mtu")) and not nic.volatile(ctx, "last_state.hwaddr"):
        # what the interface had, to give it back so (as LXD's volatile.<dev>.last_state.*)
        st = await veth.host(veth.netlink().link_state, parent)
        await nic.set_volatile(ctx, {"last_state.hwaddr": st.get("hwaddr") or "",
                                     "last_state.mtu": str(st.get("mtu") or "")})
    ctx.prepared[nic.name] = NicPrepared(name=await nic.ifname(ctx), hwaddr=dev.get("hwaddr", ""),
                                         mtu=int(dev["mtu"]) if dev.get("mtu") else None, link=parent)
    return run_config(nic, ctx, ctx.prepared[nic.name])


async def stop(nic, ctx: DeviceContext) -> RunConfig:
    name = nic.config.get("name") or nic.volatile(ctx, "name")
    parent = nic.config.get("parent", "")
    if nic.config.get("network"):
        from lxd_daemon.devices.nic.macvlan import parent_of

        try:
            parent = (await parent_of(nic, ctx))[0]
        except LXDError:  # the network is gone: give the interface back under its name inside
            parent = name
    hwaddr, mtu = nic.volatile(ctx, "last_state.hwaddr"), nic.volatile(ctx, "last_state.mtu")

    async def restore() -> None:
        """Once the interface is back on the host (liblxc gives it back as the container goes):
        its own MAC and MTU again."""
        if not (hwaddr or mtu) or not parent:
            return
        nl = veth.netlink()
        for _ in range(50):
            if await asyncio.to_thread(nl.link_exists, parent):
                await veth.host(nl.set_link, parent, hwaddr=hwaddr or None, mtu=int(mtu) if mtu else None)
                break
            await asyncio.sleep(0.1)
        await nic.set_volatile(ctx, {"last_state.hwaddr": None, "last_state.mtu": None})

    return RunConfig(interfaces=[NetInterface("phys", name=name, link=parent)] if name else [],
                     post_stop=[restore])
