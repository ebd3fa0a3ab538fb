"""`/1.0/instances/{name}/state`: the full runtime state, and start/stop/restart/freeze/unfreeze."""

from __future__ import annotations

from fastapi import Request
from starlette.responses import Response

from lxd_daemon.api.access import Access
from lxd_daemon.api.envelope import async_, sync
from lxd_daemon.api.instances import instance_key, project_name, resources, route, router
from lxd_daemon.api.request import parse
from lxd_daemon.errors import BadRequest
from lxd_daemon.instances import disk_usage
from lxd_daemon.migration import criu
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
    return sync(await disk_usage.state(svc, key))


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
    who = requestor(request)
    rec = svc.record(key)
    stateful = await _stateful_checks(svc, key, rec, body)

    async def run(op):
        if stateful:
            await (criu.stateful_stop if body.action == "stop" else criu.stateful_start)(svc, key)
            svc.lifecycle("instance-stopped" if body.action == "stop" else "instance-started", key, requestor=who)
            return
        if body.action == "start" and rec.stateful:
            await criu.discard_state(svc, key)  # a stateless start drops the saved state (as LXD)
        await svc.change_state(key, body.action, timeout=body.timeout, force=body.force, requestor=who)

    op = services.ops.create(description=DESCRIPTIONS[body.action], resources=resources(project, name), run=run,
                             project=project)
    return async_(op.render())


async def _stateful_checks(svc, key: str, rec, body) -> bool:
    """A stateful stop or start is refused here, before any operation, when it can't be done
    (no CRIU on this server, not running, no saved state)."""
    if not body.stateful:
        return False
    if body.action not in ("start", "stop"):
        raise BadRequest(f"A stateful {body.action} isn't possible: only start and stop can be stateful")
    status = svc.status_of(key)[0]
    if body.action == "stop":
        if status == "Stopped":
            raise BadRequest("The instance is already stopped")
        await criu.require("A stateful stop")
    else:
        if status != "Stopped":
            raise BadRequest("The instance is already running")
        if not rec.stateful:
            raise BadRequest("The instance has no saved state to restore (start it without --stateful)")
        await criu.require("Restoring the instance's saved state (start it with --stateless to discard it)")
    return True
