"""Wires storage pools into the daemon."""

from __future__ import annotations

from lxd_daemon.api import storage_pools, storage_volumes
from lxd_daemon.storage.daemon_storage import DaemonStorage
from lxd_daemon.storage.service import StorageService
from lxd_daemon.storage.usage_check import PoolUsageChecker


async def setup(services) -> list:
    storage = StorageService(services)
    await storage.load()
    services.storage = storage
    services.exit_hooks.append(storage.volumes.close)
    await storage.custom.load()  # finish or undo custom volume changes a crash interrupted
    services.startup_hooks.append(storage.custom.startup)  # snapshots.schedule / snapshots.expiry
    services.exit_hooks.append(storage.custom.close)
    storage.usage_check = PoolUsageChecker(services, storage)  # "Storage pool nearly full"
    services.startup_hooks.append(storage.usage_check.startup)
    services.exit_hooks.append(storage.usage_check.close)
    if getattr(services, "projects", None) is not None:  # a project's own custom volumes
        services.projects.providers.append(storage.custom.project_urls)
    daemon_storage = DaemonStorage(services, storage)
    daemon_storage.setup()  # storage.images_volume, storage.backups_volume
    await daemon_storage.mount_all()
    services.server.advertise(*storage_volumes.EXTENSIONS)
    services.server.advertise("daemon_storage")
    services.server.advertise("storage")
    return [storage_pools.router, storage_volumes.router]
