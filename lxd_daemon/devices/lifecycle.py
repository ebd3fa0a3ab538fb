"""Starting and stopping an instance's devices as a group (the service's start and stop paths)."""

from __future__ import annotations

import logging

from lxd_daemon.devices.base import Device, DeviceContext
from lxd_daemon.devices.runconfig import RunConfig, run_hooks
from lxd_daemon.util.revert import Revert

log = logging.getLogger("lxd.devices")


async def start_devices(devices: list[Device], ctx: DeviceContext, revert: Revert) -> dict[str, RunConfig]:
    """Start each device in order (host preparation); for each one started, push its undo on
    `revert` (its post_start hooks, then its stop's post_stop hooks), so that a later device or
    step that fails leaves the host as it was."""
    out: dict[str, RunConfig] = {}
    for device in devices:
        rc = await device.start(ctx)
        revert.add(undo_start, device, ctx, rc)
        out[device.name] = rc
    return out


async def undo_start(device: Device, ctx: DeviceContext, rc: RunConfig) -> None:
    await run_hooks(rc.post_start)
    stopped = await device.stop(ctx)
    await run_hooks(stopped.post_stop)


async def post_start(run_configs: dict[str, RunConfig]) -> None:
    """After liblxc started the container (or failed to): each device's post_start hooks."""
    for name, rc in run_configs.items():
        try:
            await run_hooks(rc.post_start)
        except Exception:
            log.warning("a device's post-start step failed", extra={"device": name}, exc_info=True)


async def stop_devices(devices: list[Device], ctx: DeviceContext) -> None:
    """After the container stopped: undo each device's host work (in reverse start order).
    Failures are logged: the container is stopped either way."""
    for device in reversed(devices):
        try:
            rc = await device.stop(ctx)
            await run_hooks(rc.post_stop)
        except Exception:
            log.warning("a device's stop step failed", extra={"device": device.name, "instance": ctx.instance},
                        exc_info=True)


async def adopt_devices(devices: list[Device], ctx: DeviceContext) -> None:
    """The daemon started and found the container running: each device takes back its host
    side (failures are logged: the container keeps running either way)."""
    for device in devices:
        try:
            await device.adopt(ctx)
        except Exception:
            log.warning("a device's adoption step failed", extra={"device": device.name, "instance": ctx.instance},
                        exc_info=True)


async def remove_devices(devices: list[Device], ctx: DeviceContext) -> None:
    """The instance is deleted: each device removes what it keeps on the host between starts."""
    for device in reversed(devices):
        try:
            await device.remove(ctx)
        except Exception:
            log.warning("a device's removal step failed", extra={"device": device.name, "instance": ctx.instance},
                        exc_info=True)
