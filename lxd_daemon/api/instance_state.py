"""`/1.0/instances/{name}/state`: the full runtime state, and start/stop/restart/freeze/unfreeze."""

from __future__ import annotations

import asyncio

from fastapi import Request
from starlette.responses import Response

from lxd_daemon.api.access import Access
from lxd_daemon.api.envelope import async_, sync
from lxd_daemon.api.instances import instance_key, project_name, resources, route, router
from lxd_daemon.api.request import parse
from lxd_daemon.errors import BadRequest
from lxd_daemon.services import get_services, requestor
from lxd_daemon.wire.instances import InstanceStatePut

__all__ = ["router"]

DESCRIPTIONS = {"start": "Starting instance", "stop": "Stopping instance", "restart": "Restarting instance",
                "freeze": "Freezing instance", "unfreeze": "Unfreezing instance"}


@route("GET", "/{name}/state", access=Access.TRUSTED)
async def get_state(prefix: str, request: Request, name: str) -> Response:
    svc = get_services(request).instances
    key = instance_key(request, name)
    svc.record(key)
    return sync(await asyncio.to_thread(svc.state_of, key))


@route("PUT", "/{name}/state", access=Access.TRUSTED)
async def put_state(prefix: str, request: Request, name: str) -> Response:
    services = get_services(request)
    svc = services.instances
    project = project_name(request)
    key = instance_key(request, name)
    svc.record(key)
    body = await parse(request, InstanceStatePut)
    if body.action not in DESCRIPTIONS:
        raise BadRequest(f"Unknown state action {body.action!r}")
    if body.stateful:
        raise BadRequest("Stateful stop and start (CRIU) are not supported")
    who = requestor(request)

    async def run(op):
        await svc.change_state(key, body.action, timeout=body.timeout, force=body.force, requestor=who)

    op = services.ops.create(description=DESCRIPTIONS[body.action], resources=resources(project, name), run=run,
                             project=project)
    return async_(op.render())
