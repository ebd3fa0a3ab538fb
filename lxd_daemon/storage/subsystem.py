"""Wires storage pools into the daemon."""

from __future__ import annotations

from lxd_daemon.api import storage_pools
from lxd_daemon.storage.service import StorageService


async def setup(services) -> list:
    storage = StorageService(services)
    await storage.load()
    services.storage = storage
    services.exit_hooks.append(storage.volumes.close)
    services.server.advertise("storage")
    return [storage_pools.router]
