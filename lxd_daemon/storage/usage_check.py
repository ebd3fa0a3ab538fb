"""How full each storage pool is, checked at start-up and then every 5 minutes: a pool over 90 %
used carries "Storage pool nearly full" (with the figures) until a check finds it under 85 %
(between the two it stays as it was, so a pool hovering at the mark doesn't flap).

The figures are those of `GET /1.0/storage-pools/{pool}/resources` (the driver's pool_usage()),
and, where the pool is a filesystem of its own, what df calls "Available" (btrfs can be out of
space while its used/total figures say 75 %): the fuller of the two counts.
`POST /internal/storage/usage-check` runs one pass now (for tests and scripts).
"""

from __future__ import annotations

import asyncio
import logging
import os

from lxd_daemon.storage.drivers.base import Driver
from lxd_daemon.util.tasks import cancel_and_wait
from lxd_daemon.warnings import STORAGE_POOL_NEARLY_FULL, raise_warning, resolve_warning

log = logging.getLogger("lxd.storage")

INTERVAL = 300.0
RAISE_ABOVE = 90.0  # percent used
RESOLVE_BELOW = 85.0


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def _df_of(path, total: int) -> tuple[float, int] | None:
    """df's view where the pool is mounted: (Use% = used / (used + available), available bytes),
    when the filesystem there is the pool's own (its size is the pool's total); None otherwise (a
    driver whose volumes live elsewhere: lvm, zfs)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    if st.f_blocks * st.f_frsize != total:
        return None
    used, avail = st.f_blocks - st.f_bfree, st.f_bavail
    return (used * 100.0 / (used + avail) if used + avail else 100.0), avail * st.f_frsize


class PoolUsageChecker:
    def __init__(self, services, storage):
        self.services = services
        self.storage = storage
        self._task: asyncio.Task | None = None

    async def check(self) -> dict:
        """One pass over every pool: {"pools": {name: percent used}, "nearly_full": [...],
        "resolved": [...], "errors": {name: why}} (a pool whose usage can't be read, e.g. one
        that isn't mounted, is left as it is)."""
        out: dict = {"pools": {}, "nearly_full": [], "resolved": [], "errors": {}}
        for pool in list(self.storage.pools.values()):
            try:
                if type(pool.driver).pool_usage is Driver.pool_usage:  # a statvfs: off the loop
                    usage = await asyncio.to_thread(pool.driver.usage)
                else:
                    usage = await pool.driver.pool_usage()
                space = usage["space"]
                used, total = int(space["used"]), int(space["total"])
            except Exception as e:
                out["errors"][pool.name] = getattr(e, "message", None) or str(e)
                continue
            if total <= 0:
                continue
            pct, free = used * 100.0 / total, max(total - used, 0)
            df = await asyncio.to_thread(_df_of, pool.driver.mount_path, total)
            if df is not None:
                # What is left for use, not just what is unused: btrfs keeps allocated chunks
                # and reserves out of "available" (out of space at 75% used by the figures).
                pct, free = max(pct, df[0]), df[1]
            out["pools"][pool.name] = round(pct, 1)
            url = f"/1.0/storage-pools/{pool.name}"
            if pct > RAISE_ABOVE:
                out["nearly_full"].append(pool.name)
                await raise_warning(self.services, STORAGE_POOL_NEARLY_FULL,
                                    f"Storage pool {pool.name!r} is {pct:.1f}% full: {_human(used)} used "
                                    f"of {_human(total)}, {_human(free)} available",
                                    entity_url=url)
            elif pct < RESOLVE_BELOW:
                svc = getattr(self.services, "warnings", None)
                if svc is not None and (STORAGE_POOL_NEARLY_FULL, None, url) in svc.open:
                    out["resolved"].append(pool.name)
                await resolve_warning(self.services, STORAGE_POOL_NEARLY_FULL, entity_url=url)
        return out

    async def _loop(self) -> None:
        while True:
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("storage pool usage check failed")
            await asyncio.sleep(INTERVAL)

    async def startup(self) -> None:
        """Startup hook: the first check now, then one every INTERVAL."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="pool-usage-check")

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
