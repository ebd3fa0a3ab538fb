"""Wire the image store into the daemon: service, start-up cleanup, routers, API extensions."""

from __future__ import annotations

from lxd_daemon.images.service import ImageService

# Extensions whose whole behaviour is implemented here (api_filtering is advertised by the lead once
# instances filter too; image_force_refresh / compression_squashfs are not done).
EXTENSIONS = (
    "image_compression_algorithm",  # publish takes compression_algorithm
    "image_create_aliases",  # aliases in POST /1.0/images
    "image_types",  # the `type` field
    "images_expiry",  # expires_at editable through PUT/PATCH
    "image_profiles",  # an image's profiles apply to instances launched from it without -p
    "images_push_relay",  # lxc image copy --mode push|relay (images/push.py)
)


async def setup(services) -> list:
    from lxd_daemon.api import image_aliases, images

    svc = ImageService(lxd_dir=services.lxd_dir, db=services.db, events=services.events, ops=services.ops,
                       server=services.server, services=services)
    services.images = svc
    # Before the API serves anything: drop what a killed daemon left mid-import.
    await svc.cleanup()
    await svc.load_index()
    services.exit_hooks.append(svc.drain)
    services.server.advertise(*EXTENSIONS)
    # The alias routes come first: /1.0/images/aliases must not be read as a fingerprint.
    return [image_aliases.router, images.router]
