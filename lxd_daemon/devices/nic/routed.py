"""routed: a veth pair; the container's addresses are routed to it by host routes through the
host end, which holds the gateway addresses (169.254.0.1 and fe80::1 unless ipv4.host_address /
ipv6.host_address say otherwise); with `parent`, the host answers ARP/NDP for the addresses
there (proxy neighbour entries)."""

from __future__ import annotations

from lxd_daemon.devices.base import DeviceContext
from lxd_daemon.devices.nic import veth
from lxd_daemon.devices.nic.common import (
    LIMITS,
    MTU_HWADDR,
    NicPrepared,
    is_ifname,
    is_ipv4,
    is_ipv4_list,
    is_ipv6,
    is_ipv6_list,
)
from lxd_daemon.devices.runconfig import RunConfig
from lxd_daemon.util import validate as v

NICTYPE = "routed"
HOTPLUGGABLE = True
PARENT_REQUIRED = False


def _gateway(value: str) -> None:
    if value not in ("auto", "none"):
        raise ValueError(f"{value!r} is not a gateway mode (auto or none)")


OPTIONS = {"parent": is_ifname, "host_name": is_ifname, "ipv4.address": is_ipv4_list,
           "ipv6.address": is_ipv6_list, "ipv4.gateway": _gateway, "ipv6.gateway": _gateway,
           "ipv4.host_address": is_ipv4, "ipv6.host_address": is_ipv6, "ipv4.neighbor_probe": v.is_bool,
           "ipv6.neighbor_probe": v.is_bool, **MTU_HWADDR, **LIMITS}


def check(dev: dict) -> None:
    if not dev.get("ipv4.address") and not dev.get("ipv6.address"):
        raise ValueError("routed nics need ipv4.address or ipv6.address")


def run_config(nic, ctx: DeviceContext, prep: NicPrepared | None) -> RunConfig:
    return veth.veth_run_config(nic, ctx, prep)


async def start(nic, ctx: DeviceContext) -> RunConfig:
    return await veth.start_veth(nic, ctx, routed=True)


async def stop(nic, ctx: DeviceContext) -> RunConfig:
    return await veth.stop_veth(nic, ctx)
