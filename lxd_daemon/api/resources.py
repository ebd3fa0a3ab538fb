"""`GET /1.0/resources`: the host's hardware (`lxc info --resources`).

The readers (lxd_daemon.resources) walk /sys and /proc: that runs in a thread, and an answer
is reused for at most a second, so that a burst of callers reads the tree once.
"""

from __future__ import annotations

import asyncio
import time

from fastapi import Request
from starlette.responses import Response

from lxd_daemon import resources
from lxd_daemon.api.access import Access, Routes
from lxd_daemon.api.envelope import sync

router = Routes()

# The API extensions whose fields the readers fill (LXD 5.0.2 names). Left out: the infiniband
# port details, the network firmware version (both from ethtool ioctls), GPU mediated devices,
# GPUs on USB and PCI VPD data.
EXTENSIONS = (
    "resources",
    "resources_cpu_socket",
    "resources_gpu",
    "resources_numa",
    "resources_v2",
    "resources_disk_sata",
    "resources_disk_id",
    "resources_usb_pci",
    "resources_cpu_threads_numa",
    "resources_cpu_core_die",
    "resources_system",
    "resources_pci_iommu",
    "resources_network_usb",
    "resources_disk_address",
)

MAX_AGE = 1.0  # seconds an answer is reused


class _Cache:
    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.lock = asyncio.Lock()
        self.at = float("-inf")
        self.value: dict | None = None

    async def get(self, root: str = "/") -> dict:
        if self.loop is not asyncio.get_running_loop():  # a lock belongs to one event loop
            self.loop, self.lock = asyncio.get_running_loop(), asyncio.Lock()
        async with self.lock:  # concurrent callers wait for the one read in progress
            if self.value is None or time.monotonic() - self.at > MAX_AGE:
                self.value = await asyncio.to_thread(resources.collect, root)
                self.at = time.monotonic()
            return self.value


_cache = _Cache()


@router.get("/1.0/resources", access=Access.TRUSTED)
async def get_resources(request: Request) -> Response:
    return sync(await _cache.get())


async def setup(services) -> list[Routes]:
    """Registered by daemon.py (SUBSYSTEMS)."""
    services.server.advertise(*EXTENSIONS)
    return [router]
