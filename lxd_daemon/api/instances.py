"""`/1.0/instances` (and the older `/1.0/containers`): list, create, get, update, rename, delete."""

from __future__ import annotations

import asyncio
import inspect

from fastapi import Request
from starlette.responses import Response

from lxd_daemon.api.access import BODY_LIMIT, STREAM, Access, Routes
from lxd_daemon.api.envelope import async_, etag_of, sync
from lxd_daemon.api.request import check_etag, parse, project_of, recursion
from lxd_daemon.errors import BadRequest, Conflict, NotFound, NotImplementedYet
from lxd_daemon.filter import parse_filter
from lxd_daemon.projects.naming import storage_name
from lxd_daemon.services import get_services, requestor
from lxd_daemon.wire.instances import InstancePost, InstancePut, InstancesPost, InstancesPut

router = Routes()
PREFIXES = ("/1.0/instances", "/1.0/containers")


def instance_routes(target: Routes):
    """The `route(method, suffix, access=...)` decorator of a router serving instance URLs: the
    handler is declared under both prefixes and receives `prefix` as its first argument."""

    def route(method: str, suffix: str, *, access: Access, body: int | None = BODY_LIMIT):
        def deco(fn):
            sig = inspect.signature(fn)
            sig = sig.replace(parameters=[p for p in sig.parameters.values() if p.name != "prefix"])
            for prefix in PREFIXES:
                async def handler(request: Request, _fn=fn, _prefix=prefix, **kw):
                    return await _fn(_prefix, request, **kw)

                handler.__signature__ = sig
                target.add(prefix + suffix, handler, methods=[method], access=access, body=body)
            return fn

        return deco

    return route


route = instance_routes(router)


def instance_key(request: Request, name: str) -> str:
    """The key (storage name) of instance `name` of the request's project: what every
    InstanceService method takes."""
    return storage_name(project_of(request).name, name)


def resources(prefix: str, *names: str) -> dict:
    return {"instances": [f"/1.0/instances/{n}" for n in names],
            "containers": [f"/1.0/containers/{n}" for n in names]}


def instance_type_ok(request: Request) -> bool:
    t = request.query_params.get("instance-type", "")
    return t in ("", "container")


@route("GET", "", access=Access.TRUSTED)
async def list_instances(prefix: str, request: Request) -> Response:
    svc = get_services(request).instances
    level = recursion(request)
    flt = parse_filter(request.query_params.get("filter"))
    names = sorted(svc.records) if instance_type_ok(request) else []
    if level == 0 and not flt.clauses:
        return sync([f"{prefix}/{n}" for n in names])
    rendered = await svc.render_many(names, full=level >= 2)
    if level >= 2:
        await _fill_backups(get_services(request), rendered)
    if flt.clauses:
        rendered = [r for r in rendered if flt.match(r)]
    if level == 0:
        return sync([f"{prefix}/{r['name']}" for r in rendered])
    return sync(rendered)


@route("POST", "", access=Access.TRUSTED, body=STREAM)
async def create_instance(prefix: str, request: Request) -> Response:
    if request.headers.get("content-type", "").split(";")[0].strip().lower() == "application/octet-stream":
        from lxd_daemon.api.instance_backups import import_instance

        return await import_instance(prefix, request)  # `lxc import`: the body is a backup tarball
    services = get_services(request)
    svc = services.instances
    body = await parse(request, InstancesPost)
    if not body.name:
        body.name = svc.random_name()  # as LXD: `lxc launch IMAGE` without a name
    src = body.source or {}
    if src.get("type") == "copy" and src.get("refresh") and body.name in svc.records:
        return _refresh(prefix, request, body)  # `lxc copy A B --refresh` onto an existing B
    remote = src.get("type") == "image" and bool(src.get("server"))
    if remote:  # from an image server: pulled in the operation (images/remote/)
        from lxd_daemon.images.remote.sources import check_source, pulled_body

        check_source(src)
    svc.reserve(body.name)
    try:
        plan = None if remote else await svc.prepare_create(body)
    except BaseException:
        svc.release(body.name)
        raise
    who = requestor(request)
    name = body.name

    async def run(op):
        nonlocal plan
        try:
            if plan is None:
                plan = await svc.prepare_create(await pulled_body(services, body, op, who))
            await svc.create(plan)
        finally:
            svc.release(name)
        services.events.lifecycle("instance-created", f"/1.0/instances/{name}",
                                  {"type": "container", "storage-pool": plan["pool"].name}, requestor=who)
        if body.start:
            await svc.change_state(name, "start", requestor=who)
        return None

    op = services.ops.create(description="Creating instance", resources=resources(prefix, name), run=run)
    return async_(op.render())


def _refresh(prefix: str, request: Request, body) -> Response:
    services = get_services(request)
    src = body.source.get("source") or ""
    if "/" in src:
        raise BadRequest("Refreshing an instance from a snapshot is not supported")
    services.instances.record(src)
    instance_only = bool(body.source.get("instance_only") or body.source.get("container_only"))
    who = requestor(request)
    name = body.name

    async def run(op):
        await services.snapshots.refresh(src, name, instance_only=instance_only, requestor=who)

    op = services.ops.create(description="Creating instance", resources=resources(prefix, name), run=run)
    return async_(op.render())


@route("PUT", "", access=Access.TRUSTED)
async def bulk_state(prefix: str, request: Request) -> Response:
    services = get_services(request)
    svc = services.instances
    body = await parse(request, InstancesPut)
    st = body.state
    if st.action not in ("start", "stop", "restart", "freeze", "unfreeze"):
        raise BadRequest(f"Unknown state action {st.action!r}")
    names = sorted(svc.records)
    who = requestor(request)

    async def run(op):
        import asyncio

        async def one(n: str):
            status = svc.status_of(n)[0]
            # Only act where the action applies, as LXD's bulk change does.
            if st.action == "start" and status == "Running":
                return
            if st.action in ("stop", "restart", "freeze") and status == "Stopped":
                return
            if st.action == "unfreeze" and status != "Frozen":
                return
            await svc.change_state(n, st.action, timeout=st.timeout, force=st.force, requestor=who)

        results = await asyncio.gather(*(one(n) for n in names), return_exceptions=True)
        errors = [f"{n}: {r}" for n, r in zip(names, results, strict=True) if isinstance(r, Exception)]
        if errors:
            raise BadRequest("; ".join(errors))

    op = services.ops.create(description="Updating instance states", resources=resources(prefix, *names), run=run)
    return async_(op.render())


@route("GET", "/{name}", access=Access.TRUSTED)
async def get_instance(prefix: str, request: Request, name: str) -> Response:
    svc = get_services(request).instances
    rec = svc.record(name)
    full = recursion(request) >= 1 and request.url.path.startswith("/1.0/instances")
    # a full render reads the container's state (/proc, cgroups, its links over netlink): in a thread
    out = await asyncio.to_thread(svc.render, rec, full=True) if full else svc.render(rec)
    if full:
        await _fill_backups(get_services(request), [out])
    return sync(out, etag=etag_of(*svc.etag(rec)))


async def _fill_backups(services, rendered: list[dict]) -> None:
    """`backups` of full instance renders (the records are in the database, not in memory)."""
    if services.backups is None or not rendered:
        return
    by_id = await services.backups.rendered_by_instance()
    for out in rendered:
        rec = services.instances.records.get(out["name"])
        out["backups"] = by_id.get(rec.id, []) if rec is not None else []


async def _update(prefix: str, request: Request, name: str, replace: bool) -> Response:
    services = get_services(request)
    svc = services.instances
    rec = svc.record(name)
    check_etag(request, etag_of(*svc.etag(rec)))
    body = await parse(request, InstancePut)
    fields = body.model_fields_set
    if body.restore:
        snap = body.restore.split("/", 1)[1] if "/" in body.restore else body.restore
        services.snapshots.get(name, snap)  # 404 for an unknown snapshot, before an operation
        if body.stateful:
            from lxd_daemon.instances.snapshots import CRIU_MISSING

            raise BadRequest(CRIU_MISSING)
        who = requestor(request)

        async def restore(op):
            await services.snapshots.restore(name, snap, requestor=who)

        op = services.ops.create(description="Restoring snapshot", resources=resources(prefix, name), run=restore)
        return async_(op.render())
    if replace:
        config = body.config
        devices = body.devices
        profiles = body.profiles if body.profiles is not None else []
        ephemeral = body.ephemeral
        description = body.description
    else:
        config = {**rec.config, **body.config}
        devices = {**rec.devices, **body.devices}
        profiles = body.profiles if ("profiles" in fields and body.profiles is not None) else rec.profiles
        ephemeral = body.ephemeral if "ephemeral" in fields else rec.ephemeral
        description = body.description if "description" in fields else rec.description
    kwargs = dict(architecture=body.architecture or None, config=config, devices=devices, profiles=list(profiles),
                  ephemeral=ephemeral, description=description)
    who = requestor(request)
    if not replace:
        await svc.update(name, **kwargs)
        services.events.lifecycle("instance-updated", f"/1.0/instances/{name}", requestor=who)
        return sync({})

    async def run(op):
        await svc.update(name, **kwargs)
        services.events.lifecycle("instance-updated", f"/1.0/instances/{name}", requestor=who)

    op = services.ops.create(description="Updating instance", resources=resources(prefix, name), run=run)
    return async_(op.render())


@route("PUT", "/{name}", access=Access.TRUSTED)
async def put_instance(prefix: str, request: Request, name: str) -> Response:
    return await _update(prefix, request, name, True)


@route("PATCH", "/{name}", access=Access.TRUSTED)
async def patch_instance(prefix: str, request: Request, name: str) -> Response:
    return await _update(prefix, request, name, False)


@route("POST", "/{name}", access=Access.TRUSTED)
async def rename_instance(prefix: str, request: Request, name: str) -> Response:
    services = get_services(request)
    svc = services.instances
    svc.record(name)
    body = await parse(request, InstancePost)
    if body.migration and body.pool:  # `lxc move NAME [NEW] -s POOL`
        return _move_to_pool(prefix, request, name, body)
    if body.migration:
        raise NotImplementedYet("Instance migration is not implemented yet")
    if not body.name:
        raise BadRequest("A new name is required")
    new = body.name
    who = requestor(request)

    async def run(op):
        await svc.rename(name, new)
        services.events.lifecycle("instance-renamed", f"/1.0/instances/{new}", {"old_name": name}, requestor=who)

    op = services.ops.create(description="Renaming instance", resources=resources(prefix, name), run=run)
    return async_(op.render())


def _move_to_pool(prefix: str, request: Request, name: str, body) -> Response:
    services = get_services(request)
    storage = services.storage
    if storage is None or body.pool not in storage.pools:
        raise NotFound(f"Storage pool {body.pool!r} not found")
    if services.instances.status_of(name)[0] != "Stopped":
        raise BadRequest("The instance must be stopped to move it to another storage pool")
    new = body.name or name
    if new != name and (new in services.instances.records):
        raise Conflict(f"Instance {new!r} already exists")
    who = requestor(request)

    async def run(op):
        await services.snapshots.move_to_pool(name, new, body.pool, instance_only=body.instance_only,
                                              requestor=who)

    op = services.ops.create(description="Moving instance", resources=resources(prefix, name), run=run)
    return async_(op.render())


@route("DELETE", "/{name}", access=Access.TRUSTED)
async def delete_instance(prefix: str, request: Request, name: str) -> Response:
    services = get_services(request)
    svc = services.instances
    svc.record(name)
    if svc.status_of(name)[0] != "Stopped":
        raise BadRequest("Instance is running")
    who = requestor(request)

    async def run(op):
        await svc.delete(name, who)

    op = services.ops.create(description="Deleting instance", resources=resources(prefix, name), run=run)
    return async_(op.render())
