"""p2p: a veth pair whose host end stays on its own (up, in no bridge)."""

from __future__ import annotations

from lxd_daemon.devices.base import DeviceContext
from lxd_daemon.devices.nic import veth
from lxd_daemon.devices.nic.common import LIMITS, MTU_HWADDR, NicPrepared, is_ifname
from lxd_daemon.devices.runconfig import RunConfig

NICTYPE = "p2p"
HOTPLUGGABLE = True
PARENT_REQUIRED = False
OPTIONS = {"host_name": is_ifname, **MTU_HWADDR, **LIMITS}


def check(dev: dict) -> None:
    return None


def run_config(nic, ctx: DeviceContext, prep: NicPrepared | None) -> RunConfig:
    return veth.veth_run_config(nic, ctx, prep)


async def start(nic, ctx: DeviceContext) -> RunConfig:
    return await veth.start_veth(nic, ctx)


async def stop(nic, ctx: DeviceContext) -> RunConfig:
    return await veth.stop_veth(nic, ctx)
