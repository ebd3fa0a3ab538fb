"""Wires instance (and custom volume) backups into the daemon: called from the instances
subsystem's setup, after the instance and snapshot services are loaded."""

from __future__ import annotations

from lxd_daemon.backups.service import BackupService


async def setup(services) -> list:
    from lxd_daemon.api import instance_backups
    from lxd_daemon.server import config as server_config
    from lxd_daemon.util import validate as v

    # LXD's server key: the compression of backups whose request names none.
    server_config.register("backups.compression_algorithm",
                           server_config.Key(v.is_one_of("none", "gzip", "bzip2", "xz", "zstd"), default="gzip"))
    svc = BackupService(services)
    services.backups = svc
    await svc.load()
    services.startup_hooks.append(svc.start)
    services.exit_hooks.append(svc.close)
    services.server.advertise(
        "container_backup", "backup_compression", "backup_compression_algorithm", "container_backup_override_pool",
        "backup_override_name", "custom_volume_backup")
    routers = [instance_backups.router]
    try:
        from lxd_daemon.api import storage_volume_backups
    except ImportError:
        storage_volume_backups = None
    if storage_volume_backups is not None:
        routers.append(storage_volume_backups.router)
    return routers
