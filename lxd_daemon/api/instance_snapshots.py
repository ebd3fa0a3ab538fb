"""`/1.0/instances/{name}/snapshots` (and `/1.0/containers/...` for older clients and pylxd):
list, create, get, update, rename, delete; plus `/internal/snapshots/tick`, one pass of the
snapshot scheduler for a given minute (tests; local unix socket only)."""

from __future__ import annotations

from fastapi import Request
from starlette.responses import Response

from lxd_daemon.api.access import Access, Routes
from lxd_daemon.api.envelope import async_, etag_of, sync
from lxd_daemon.api.instances import instance_key, instance_routes, project_name
from lxd_daemon.api.request import check_etag, parse, recursion
from lxd_daemon.errors import BadRequest
from lxd_daemon.instances.snapshots import parse_expires_at
from lxd_daemon.projects.naming import query
from lxd_daemon.services import get_services, requestor
from lxd_daemon.wire.instances import InstanceSnapshotPost, InstanceSnapshotPut, InstanceSnapshotsPost

router = Routes()


route = instance_routes(router)


def _resources(project: str, name: str, snap: str | None = None) -> dict:
    q = query(project)
    out = {"instances": [f"/1.0/instances/{name}{q}"], "containers": [f"/1.0/containers/{name}{q}"]}
    if snap:
        out["instances_snapshots"] = [f"/1.0/instances/{name}/snapshots/{snap}{q}"]
        out["containers_snapshots"] = [f"/1.0/containers/{name}/snapshots/{snap}{q}"]
    return out


def _snapshots(request: Request):
    return get_services(request).snapshots


@route("GET", "/{name}/snapshots", access=Access.TRUSTED)
async def list_snapshots(prefix: str, request: Request, name: str) -> Response:
    snaps = _snapshots(request)
    key = instance_key(request, name)
    level = recursion(request)
    if level == 0:
        q = query(project_name(request))
        return sync([f"{prefix}/{name}/snapshots/{s.name}{q}" for s in snaps.list(key)])
    return sync(snaps.render_all(key))


@route("POST", "/{name}/snapshots", access=Access.TRUSTED)
async def create_snapshot(prefix: str, request: Request, name: str) -> Response:
    services = get_services(request)
    snaps = services.snapshots
    project = project_name(request)
    key = instance_key(request, name)
    services.instances.record(key)
    body = await parse(request, InstanceSnapshotsPost)
    snap = body.name or snaps.next_name(key)
    if body.stateful:
        await _stateful_snapshot_checks(services, key)
    snaps.check_create(key, snap, body.stateful)
    expires_at = body.expires_at if "expires_at" in body.model_fields_set else None
    if expires_at is not None:
        parse_expires_at(expires_at)
    who = requestor(request)

    async def run(op):
        await snaps.create(key, snap, expires_at=expires_at, stateful=body.stateful,
                           description=body.description, requestor=who)

    op = services.ops.create(description="Snapshotting instance", resources=_resources(project, name, snap),
                             run=run, project=project)
    return async_(op.render())


async def _stateful_snapshot_checks(services, key: str) -> None:
    """`snapshot --stateful`: refused before any operation without a running instance or CRIU."""
    from lxd_daemon.migration import criu

    await criu.require("A stateful snapshot")
    if services.instances.status_of(key)[0] == "Stopped":
        raise BadRequest("Unable to create a stateful snapshot: the instance isn't running")


@route("GET", "/{name}/snapshots/{snapshot}", access=Access.TRUSTED)
async def get_snapshot(prefix: str, request: Request, name: str, snapshot: str) -> Response:
    snaps = _snapshots(request)
    s = snaps.get(instance_key(request, name), snapshot)
    return sync(snaps.render(s, project_name(request)), etag=etag_of(s.expires_at, s.description))


async def _update(request: Request, name: str, snapshot: str, replace: bool) -> Response:
    services = get_services(request)
    snaps = services.snapshots
    project = project_name(request)
    key = instance_key(request, name)
    s = snaps.get(key, snapshot)
    check_etag(request, etag_of(s.expires_at, s.description))
    body = await parse(request, InstanceSnapshotPut)
    fields = body.model_fields_set
    if replace:
        expires_at = body.expires_at or ""
        description = body.description or ""
    else:
        expires_at = body.expires_at if "expires_at" in fields else None
        description = body.description if "description" in fields else None
    if expires_at is not None:
        parse_expires_at(expires_at)  # a bad time is a 400 before any operation
    who = requestor(request)

    async def run(op):
        await snaps.update(key, snapshot, expires_at=expires_at, description=description, requestor=who)

    op = services.ops.create(description="Updating snapshot", resources=_resources(project, name, snapshot),
                             run=run, project=project)
    return async_(op.render())


@route("PUT", "/{name}/snapshots/{snapshot}", access=Access.TRUSTED)
async def put_snapshot(prefix: str, request: Request, name: str, snapshot: str) -> Response:
    return await _update(request, name, snapshot, True)


@route("PATCH", "/{name}/snapshots/{snapshot}", access=Access.TRUSTED)
async def patch_snapshot(prefix: str, request: Request, name: str, snapshot: str) -> Response:
    return await _update(request, name, snapshot, False)


@route("POST", "/{name}/snapshots/{snapshot}", access=Access.TRUSTED)
async def rename_snapshot(prefix: str, request: Request, name: str, snapshot: str) -> Response:
    services = get_services(request)
    snaps = services.snapshots
    project = project_name(request)
    key = instance_key(request, name)
    snaps.get(key, snapshot)
    body = await parse(request, InstanceSnapshotPost)
    if body.migration:  # `lxc copy c1/snap0 remote:c2` (migration/source.py)
        from lxd_daemon.api.instances import migrate

        return await migrate(request, name, body, snapshot=snapshot)
    if not body.name:
        raise BadRequest("A new snapshot name is required")
    new = body.name
    who = requestor(request)

    async def run(op):
        await snaps.rename(key, snapshot, new, requestor=who)

    op = services.ops.create(description="Renaming snapshot", resources=_resources(project, name, snapshot),
                             run=run, project=project)
    return async_(op.render())


@route("DELETE", "/{name}/snapshots/{snapshot}", access=Access.TRUSTED)
async def delete_snapshot(prefix: str, request: Request, name: str, snapshot: str) -> Response:
    services = get_services(request)
    snaps = services.snapshots
    project = project_name(request)
    key = instance_key(request, name)
    snaps.get(key, snapshot)
    who = requestor(request)

    async def run(op):
        await snaps.delete(key, snapshot, requestor=who)

    op = services.ops.create(description="Deleting snapshot", resources=_resources(project, name, snapshot),
                             run=run, project=project)
    return async_(op.render())
