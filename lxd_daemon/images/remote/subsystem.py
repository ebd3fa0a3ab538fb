"""Remote image sources wired into the daemon: the auto-update and cache-expiry task
(images/updater.py) and the API extension of `lxc image refresh`. The routes are in
api/images.py (pulls, refresh) and api/internal.py (one pass of either task now)."""

from __future__ import annotations

EXTENSIONS = (
    "image_force_refresh",  # POST /1.0/images/<fp>/refresh (lxc image refresh)
)


async def setup(services) -> list:
    from lxd_daemon.images.updater import Updater

    images = services.images
    images.updater = Updater(services)
    services.startup_hooks.append(images.updater.start)
    services.exit_hooks.append(images.updater.close)
    services.server.advertise(*EXTENSIONS)
    return []  # its routes: api/images.py (refresh, pulls), api/internal.py (the passes)
