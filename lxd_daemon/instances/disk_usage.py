"""The `disk` part of an instance's state: bytes used by each disk device backed by a storage
volume (the root disk: the instance's volume; a disk with `pool`: that custom volume), as the
pool's driver measures it. Reported for stopped instances too, as LXD does.

A driver may need a tool run to measure (du on dir, btrfs, zfs, lvs), so the figures are
gathered on the event loop (the drivers' own async subprocesses), concurrently and at most a
few tools at a time. A single instance's state is measured fresh; a listing (`recursion=2`,
which `lxc list` asks for) reuses each instance's last figures and, when they are older than
TTL seconds, refreshes them in the background, one instance at a time. Instances never measured
yet: a few (up to COLD_INLINE) are measured while the listing is made, for up to COLD_WAIT
seconds; more, or slower, are listed without disk figures this time and measured in the
background. So a listing of many instances never waits for a tool run, and the background work
is one tool at a time, paced.
"""

from __future__ import annotations

import asyncio
import logging
import time

log = logging.getLogger("lxd.instances")

TTL = 30.0
PARALLEL = 4  # measuring tools at a time
COLD_WAIT = 0.05
COLD_INLINE = 4
PACE = 0.02  # the background refresher's pause between two instances
_now = time.monotonic


def volume_disks(devices: dict) -> list[tuple[str, dict]]:
    """(device name, config) of the disk devices that are storage volumes, sorted by name:
    the root disk (`path` "/") and disks with a `pool` (custom volumes)."""
    out = []
    for dname in sorted(devices):
        dev = devices[dname]
        if dev.get("type") != "disk":
            continue
        if dev.get("path") == "/" or dev.get("pool"):
            out.append((dname, dev))
    return out


class DiskUsage:
    """Per-instance disk figures of the instances service `svc`, with the listing cache."""

    def __init__(self, svc):
        self.svc = svc
        self._cache: dict[str, tuple[float, dict]] = {}
        self._stale: set[str] = set()  # keys whose figures the background refresher measures
        self._refresher: bool | None = None
        self._inflight: dict[str, asyncio.Task] = {}  # first measurements started by listings
        self._sem: asyncio.Semaphore | None = None

    async def _device_usage(self, key: str, dname: str, dev: dict, devices: dict) -> int | None:
        storage = self.svc.services.storage
        project, api_name = self.svc.ident(key)
        if dev.get("path") == "/":
            pool = self.svc._root_pool(devices, key)
            vol = storage.volumes.instance_volume(pool, api_name, project)
            return await pool.driver.volume_usage(vol)
        source = dev.get("source", "")
        if not source or "/" in source:
            return None  # no volume named (a snapshot of one is not measured)
        used = await storage.custom.usage(dev["pool"], source, project)
        return used.get("used")

    async def measure(self, key: str) -> dict:
        """{device: {"usage": bytes}} measured now (devices the driver can't measure are left
        out, as LXD leaves them out)."""
        if self.svc.services.storage is None or key not in self.svc.records:
            return {}
        if self._sem is None:
            self._sem = asyncio.Semaphore(PARALLEL)
        try:
            devices = self.svc.expanded(key)[1]
        except Exception as e:  # noqa: BLE001 - deleted meanwhile: nothing to measure
            log.debug("disk usage of %s: %s", key, e)
            return {}

        async def one(dname: str, dev: dict):
            async with self._sem:
                try:
                    return dname, await self._device_usage(key, dname, dev, devices)
                except Exception as e:  # noqa: BLE001 - a device that can't be measured is left out
                    log.debug("disk usage of %s device %s: %s", key, dname, e)
                    return dname, None

        got = await asyncio.gather(*(one(n, d) for n, d in volume_disks(devices)))
        out = {n: {"usage": int(u)} for n, u in got if u is not None}
        self._cache[key] = (_now(), out)
        return out

    async def _refresh(self) -> None:
        """Measure the stale instances queued by listings, one at a time, starting once the
        listing that found them stale has been answered: a refresh never competes with a
        listing for the event loop or the CPUs more than one tool run at a time."""
        try:
            await asyncio.sleep(0.2)
            while self._stale:
                key = next(iter(self._stale))
                try:
                    await self.measure(key)
                finally:
                    self._stale.discard(key)
                await asyncio.sleep(PACE)
        finally:
            self._refresher = None

    def _first(self, key: str) -> asyncio.Task:
        t = self._inflight.get(key)
        if t is None:
            t = self._inflight[key] = asyncio.get_running_loop().create_task(self.measure(key))
            t.add_done_callback(lambda _t: self._inflight.pop(key, None))
        return t

    async def listed(self, keys: list[str]) -> list[dict]:
        """The figures of `keys` for a listing: the last ones (refreshed in the background once
        older than TTL); those never measured are measured now, for up to COLD_WAIT."""
        out: dict[str, dict] = {}
        cold: dict[str, asyncio.Task] = {}
        unknown = [k for k in keys if k not in self._cache]
        for key in keys:
            hit = self._cache.get(key)
            if hit is None:
                if len(unknown) <= COLD_INLINE or key in self._inflight:
                    cold[key] = self._first(key)
                else:
                    out[key] = {}
                    self._stale.add(key)
                continue
            out[key] = hit[1]
            if _now() - hit[0] >= TTL:
                self._stale.add(key)
        if self._stale and self._refresher is None:
            self._refresher = True
            self.svc._spawn(self._refresh())
        if cold:
            await asyncio.wait(list(cold.values()), timeout=COLD_WAIT)
            for key, t in cold.items():
                out[key] = t.result() if t.done() and not t.cancelled() and t.exception() is None else {}
        return [out[k] for k in keys]

    def forget_others(self, keys) -> None:
        """Drop the figures of instances no longer recorded (deleted or renamed)."""
        for k in [k for k in self._cache if k not in keys]:
            del self._cache[k]


def _usage(svc) -> DiskUsage:
    du = getattr(svc, "_disk_usage", None)
    if du is None:
        du = svc._disk_usage = DiskUsage(svc)
    return du


async def state(svc, key: str) -> dict:
    """The full `state` of instance `key`: the runtime part (cgroups, /proc, netlink: in a
    thread) and the disk part (measured fresh), gathered concurrently."""
    st, disk = await asyncio.gather(asyncio.to_thread(svc.state_of, key), _usage(svc).measure(key))
    st["disk"] = disk
    return st


async def render_full(svc, rec) -> dict:
    """`svc.render(rec, full=True)` (in a thread) with the disk part measured fresh alongside."""
    out, disk = await asyncio.gather(asyncio.to_thread(svc.render, rec, full=True), _usage(svc).measure(rec.key))
    out["state"]["disk"] = disk
    return out


async def render_many_full(svc, recs: list) -> list[dict]:
    """Full renders of many instances: the runtime parts in one thread, the disk parts from the
    listing cache alongside."""
    du = _usage(svc)
    du.forget_others(svc.records)
    rendered, disks = await asyncio.gather(
        asyncio.to_thread(lambda: [svc.render(r, full=True, cached_net=True) for r in recs]),
        du.listed([r.key for r in recs]))
    for out, disk in zip(rendered, disks, strict=True):
        out["state"]["disk"] = disk
    return rendered


__all__ = ["DiskUsage", "render_full", "render_many_full", "state", "volume_disks"]
