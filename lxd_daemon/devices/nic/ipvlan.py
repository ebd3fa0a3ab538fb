"""ipvlan: an ipvlan interface on `parent` that liblxc makes at start (l3s mode: the container's
addresses only, a device default route; l2 mode: the addresses on a shared L2). As in LXD it
can't be hot-plugged: a change applies at the next start."""

from __future__ import annotations

import asyncio

from lxd_daemon.devices.base import DeviceContext
from lxd_daemon.devices.nic import veth
from lxd_daemon.devices.nic.common import (
    NicPrepared,
    is_ifname,
    is_ipv4_list,
    is_ipv6_list,
    split_list,
)
from lxd_daemon.devices.runconfig import NetInterface, RunConfig
from lxd_daemon.errors import BadRequest
from lxd_daemon.util import validate as v

NICTYPE = "ipvlan"
HOTPLUGGABLE = False
PARENT_REQUIRED = True


def _gateway(value: str) -> None:
    if value not in ("auto", "none"):
        try:
            import ipaddress

            ipaddress.ip_address(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a gateway (auto, none or an address)") from None


OPTIONS = {"parent": is_ifname, "mtu": v.is_mtu, "mode": v.is_one_of("l3s", "l2"), "ipv4.address": is_ipv4_list,
           "ipv6.address": is_ipv6_list, "ipv4.gateway": _gateway, "ipv6.gateway": _gateway}


def check(dev: dict) -> None:
    if dev.get("mode", "l3s") == "l3s" and not (dev.get("ipv4.address") or dev.get("ipv6.address")):
        raise ValueError("ipvlan nics in l3s mode need ipv4.address or ipv6.address")


def _items(dev: dict) -> tuple[tuple[str, str], ...]:
    mode = dev.get("mode", "l3s")
    out = [("ipvlan.mode", mode), ("ipvlan.isolation", "bridge")]
    v4 = split_list(dev.get("ipv4.address", ""))
    v6 = split_list(dev.get("ipv6.address", ""))
    out += [("ipv4.address", a if "/" in a else f"{a}/32") for a in v4]
    out += [("ipv6.address", a if "/" in a else f"{a}/128") for a in v6]
    gw4, gw6 = dev.get("ipv4.gateway", "auto"), dev.get("ipv6.gateway", "auto")
    if v4 and gw4 != "none":
        out.append(("ipv4.gateway", "dev" if mode == "l3s" or gw4 == "auto" else gw4))
    if v6 and gw6 != "none":
        out.append(("ipv6.gateway", "dev" if mode == "l3s" or gw6 == "auto" else gw6))
    return tuple(out)


def run_config(nic, ctx: DeviceContext, prep: NicPrepared | None) -> RunConfig:
    dev = nic.config
    name = prep.name if prep is not None else nic.pure_name(ctx)
    return RunConfig(interfaces=[NetInterface("ipvlan", name=name, link=dev.get("parent", ""),
                                              mtu=int(dev["mtu"]) if dev.get("mtu") else None,
                                              extra=_items(dev))])


_SUPPORTED: list[bool] = []


def _kernel_supports(parent: str) -> bool:
    """Whether the kernel makes ipvlan links: probed once by making one on `parent` (in the
    daemon's namespace) and deleting it again."""
    if not _SUPPORTED:
        from lxd_daemon.devices.nic.common import random_ifname

        nl = veth.netlink()
        probe = random_ifname("ipv")
        try:
            nl.create_ipvlan(probe, parent)
        except nl.NetlinkError as e:
            if e.errno in (95, 22):  # EOPNOTSUPP, or no such link kind (EINVAL) without CONFIG_IPVLAN
                _SUPPORTED.append(False)
                return False
            return True  # another reason: let liblxc say
        nl.delete_link(probe)
        _SUPPORTED.append(True)
    return _SUPPORTED[0]


async def start(nic, ctx: DeviceContext) -> RunConfig:
    parent = nic.config["parent"]
    if not await asyncio.to_thread(veth.netlink().link_exists, parent):
        raise BadRequest(f"Invalid device {nic.name!r}: parent interface {parent!r} doesn't exist")
    if not await asyncio.to_thread(_kernel_supports, parent):
        raise BadRequest(f"Invalid device {nic.name!r}: ipvlan nics need the kernel's ipvlan support "
                         f"(CONFIG_IPVLAN), which this host doesn't have")
    ctx.prepared[nic.name] = NicPrepared(name=await nic.ifname(ctx), link=parent)
    return run_config(nic, ctx, ctx.prepared[nic.name])


async def stop(nic, ctx: DeviceContext) -> RunConfig:
    return RunConfig()
