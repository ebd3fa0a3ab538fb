"""Wire the image store into the daemon: the service, start-up cleanup, the updater of images from
image servers (auto-update, refresh, cache expiry), the simplestreams tree of the public images,
routers, API extensions."""

from __future__ import annotations

from lxd_daemon.images.service import ImageService

# Extensions whose whole behaviour is implemented here (api_filtering is advertised by the lead once
# instances filter too; compression_squashfs is not done).
EXTENSIONS = (
    "image_compression_algorithm",  # publish takes compression_algorithm
    "image_create_aliases",  # aliases in POST /1.0/images
    "image_types",  # the `type` field
    "images_expiry",  # expires_at editable through PUT/PATCH
    "image_profiles",  # an image's profiles apply to instances launched from it without -p
    "images_push_relay",  # lxc image copy --mode push|relay (images/push.py)
    "image_force_refresh",  # POST /1.0/images/<fp>/refresh (lxc image refresh)
)


async def setup(services) -> list:
    from lxd_daemon.api import image_aliases, images, streams
    from lxd_daemon.images.streams import StreamsTree
    from lxd_daemon.images.updater import Updater

    svc = ImageService(lxd_dir=services.lxd_dir, db=services.db, events=services.events, ops=services.ops,
                       server=services.server, services=services)
    services.images = svc
    if getattr(services, "projects", None) is not None:  # what a project with features.images holds
        services.projects.providers.append(svc.project_urls)
    # Before the API serves anything: drop what a killed daemon left mid-import.
    await svc.cleanup()
    await svc.load_index()
    services.exit_hooks.append(svc.drain)
    svc.updater = Updater(services)
    services.startup_hooks.append(svc.updater.start)
    services.exit_hooks.append(svc.updater.close)
    services.streams = StreamsTree(svc, services.events)
    services.server.advertise(*EXTENSIONS)
    # The alias routes come first: /1.0/images/aliases must not be read as a fingerprint.
    return [image_aliases.router, images.router, streams.routes]
