"""`GET /1.0/metrics`: the running containers' metrics, as LXD 5.0.2 serves them (Prometheus
scrapes it).

Without `?project=` every project's containers (those the caller may see: a restricted
certificate's own projects), with it that project's. Who may call it: api.access (Access.METRICS:
trusted clients, `metrics` certificates, anyone when core.metrics_authentication is false). The
answer is the bare text, not LXD's JSON envelope; errors keep the envelope.
"""

from __future__ import annotations

import asyncio

from fastapi import Request
from starlette.responses import Response

from lxd_daemon import metrics
from lxd_daemon.api import access
from lxd_daemon.api.access import Access, Routes
from lxd_daemon.services import get_services

router = Routes()

EXTENSIONS = ("metrics", "metrics_cpu_seconds", "metrics_authentication")


@router.get("/1.0/metrics", access=Access.METRICS)
async def get_metrics(request: Request) -> Response:
    services = get_services(request)
    visible = access.visible_projects(request)
    project = request.query_params.get("project")
    if project:  # check_project resolved it (404 for one that does not exist)
        wanted: set[str] | None = {project}
    else:
        wanted = set(visible) if visible is not None else None
    text = await asyncio.to_thread(metrics.scrape, services.instances, wanted)
    # LXD's exact header (no charset parameter: what Prometheus is used to from LXD)
    return Response(content=text.encode(), headers={"Content-Type": metrics.CONTENT_TYPE})


async def setup(services) -> list[Routes]:
    from lxd_daemon.server import config as server_config
    from lxd_daemon.util import validate as v

    # LXD's server key: false opens /1.0/metrics to every client.
    server_config.register("core.metrics_authentication", server_config.Key(v.is_bool, default="true"))
    services.server.advertise(*EXTENSIONS)
    from lxd_daemon.metrics import listener

    await listener.setup(services)  # core.metrics_address
    return [router]
