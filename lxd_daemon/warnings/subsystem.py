"""Wires warnings into the daemon: services.warnings (first, so that every other subsystem's
setup can raise warnings) and `/1.0/warnings`."""

from __future__ import annotations

from lxd_daemon.api import warnings as api
from lxd_daemon.warnings.host_checks import check_subid_ranges
from lxd_daemon.warnings.service import WarningService


async def setup(services) -> list:
    svc = WarningService(services.db, services.events)
    await svc.load()
    services.warnings = svc
    await check_subid_ranges(services)  # root's /etc/subuid and /etc/subgid ranges
    services.server.advertise("warnings")
    return [api.router]
