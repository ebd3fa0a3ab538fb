"""`/1.0/instances` (and the older `/1.0/containers`): list, create, get, update, rename, delete."""

from __future__ import annotations

import asyncio
import contextlib
import inspect

from fastapi import Request
from starlette.responses import Response

from lxd_daemon.api.access import BODY_LIMIT, STREAM, Access, Routes
from lxd_daemon.api.envelope import async_, etag_of, sync
from lxd_daemon.api.request import check_etag, listed_projects, parse, project_of, recursion, visible_project
from lxd_daemon.errors import BadRequest, Conflict, NotFound, NotImplementedYet
from lxd_daemon.filter import parse_filter
from lxd_daemon.instances import disk_usage
from lxd_daemon.projects import policy
from lxd_daemon.projects.naming import query, storage_name
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


def check_target(request: Request) -> None:
    """`?target=` (`lxc launch/copy/move --target`): refused (no cluster), by a restricted project
    first."""
    policy.check_target(project_of(request).config, request.query_params.get("target", ""))


def resources(project: str, *names: str) -> dict:
    """An operation's `resources` for instances of `project` named by their API names."""
    q = query(project)
    return {"instances": [f"/1.0/instances/{n}{q}" for n in names],
            "containers": [f"/1.0/containers/{n}{q}" for n in names]}


def project_name(request: Request) -> str:
    return project_of(request).name


def source_project(request: Request, source: dict) -> str:
    """The project of a copy's source: `source.project` (LXD's `lxc copy --target-project`: the
    request goes to the target project), else the request's."""
    return visible_project(request, source.get("project") or project_name(request))


def source_key(request: Request, src: str, source: dict | None = None) -> str:
    """The key of an instance a request body names (a copy source, ...): an API name in the
    request's project, or in `source.project` (404 "Instance not found" when it has none of
    that name)."""
    return get_services(request).instances.lookup(source_project(request, source or {}), src).key


def instance_type_ok(request: Request) -> bool:
    t = request.query_params.get("instance-type", "")
    return t in ("", "container")


@route("GET", "", access=Access.TRUSTED)
async def list_instances(prefix: str, request: Request) -> Response:
    svc = get_services(request).instances
    level = recursion(request)
    flt = parse_filter(request.query_params.get("filter"))
    keys = [k for p in listed_projects(request) for k in svc.keys_in(p)] if instance_type_ok(request) else []
    if level == 0 and not flt.clauses:
        return sync([f"{prefix}/{rec.name}{query(rec.project)}" for rec in (svc.records[k] for k in keys)])
    rendered = await svc.render_many(keys, full=level >= 2)
    if level >= 2:
        await _fill_backups(get_services(request), rendered)
    if flt.clauses:
        rendered = [r for r in rendered if flt.match(r)]
    if level == 0:
        return sync([f"{prefix}/{r['name']}{query(r.get('project') or 'default')}" for r in rendered])
    return sync(rendered)


@route("POST", "", access=Access.TRUSTED, body=STREAM)
async def create_instance(prefix: str, request: Request) -> Response:
    check_target(request)
    if request.headers.get("content-type", "").split(";")[0].strip().lower() == "application/octet-stream":
        from lxd_daemon.api.instance_backups import import_instance

        return await import_instance(prefix, request)  # `lxc import`: the body is a backup tarball
    services = get_services(request)
    svc = services.instances
    project = project_name(request)
    body = await parse(request, InstancesPost)
    if not body.name:
        body.name = svc.random_name(project)  # as LXD: `lxc launch IMAGE` without a name
    key = storage_name(project, body.name)
    src = body.source or {}
    if src.get("type") == "migration":  # from another server (migration/sink.py)
        return await _receive(request, body)
    if src.get("type") == "copy" and src.get("refresh") and key in svc.records:
        return _refresh(prefix, request, body)  # `lxc copy A B --refresh` onto an existing B
    if src.get("type") == "copy" and src.get("project"):
        source_project(request, src)  # one the caller may see
    remote = src.get("type") == "image" and bool(src.get("server"))
    if remote:  # from an image server: pulled in the operation (images/remote/)
        from lxd_daemon.images.remote.sources import check_source, pulled_body

        check_source(src)
    svc.reserve(key)
    try:
        plan = None if remote else await svc.prepare_create(body, project)
    except BaseException:
        svc.release(key)
        raise
    who = requestor(request)
    name = body.name

    async def run(op):
        nonlocal plan
        try:
            if plan is None:
                plan = await svc.prepare_create(await pulled_body(services, body, op, who, project=project), project)
            await svc.create(plan)
        finally:
            svc.release(key)
        services.events.lifecycle("instance-created", f"/1.0/instances/{name}{query(project)}",
                                  {"type": "container", "storage-pool": plan["pool"].name}, requestor=who,
                                  project=project)
        if body.start:
            await svc.change_state(key, "start", requestor=who)
        return None

    op = services.ops.create(description="Creating instance", resources=resources(project, name), run=run,
                             project=project)
    return async_(op.render())


def _refresh(prefix: str, request: Request, body) -> Response:
    services = get_services(request)
    project = project_name(request)
    src = body.source.get("source") or ""
    if "/" in src:
        raise BadRequest("Refreshing an instance from a snapshot is not supported")
    src_key = source_key(request, src, body.source)
    instance_only = bool(body.source.get("instance_only") or body.source.get("container_only"))
    who = requestor(request)
    name = body.name
    key = storage_name(project, name)

    async def run(op):
        await services.snapshots.refresh(src_key, key, instance_only=instance_only, requestor=who)

    op = services.ops.create(description="Creating instance", resources=resources(project, name), run=run,
                             project=project)
    return async_(op.render())


@route("PUT", "", access=Access.TRUSTED)
async def bulk_state(prefix: str, request: Request) -> Response:
    services = get_services(request)
    svc = services.instances
    project = project_name(request)
    body = await parse(request, InstancesPut)
    st = body.state
    if st.action not in ("start", "stop", "restart", "freeze", "unfreeze"):
        raise BadRequest(f"Unknown state action {st.action!r}")
    if st.stateful:  # never silently stateless
        from lxd_daemon.migration import criu

        await criu.require("A stateful state change")
        raise NotImplementedYet("Stateful state changes of all instances at once are not implemented yet")
    keys = svc.keys_in(project)
    names = [svc.records[k].name for k in keys]
    who = requestor(request)

    async def run(op):
        async def one(k: str):
            status = svc.status_of(k)[0]
            # Only act where the action applies, as LXD's bulk change does.
            if st.action == "start" and status == "Running":
                return
            if st.action in ("stop", "restart", "freeze") and status == "Stopped":
                return
            if st.action == "unfreeze" and status != "Frozen":
                return
            await svc.change_state(k, st.action, timeout=st.timeout, force=st.force, requestor=who)

        results = await asyncio.gather(*(one(k) for k in keys), return_exceptions=True)
        errors = [f"{n}: {r}" for n, r in zip(names, results, strict=True) if isinstance(r, Exception)]
        if errors:
            raise BadRequest("; ".join(errors))

    op = services.ops.create(description="Updating instance states", resources=resources(project, *names),
                             run=run, project=project)
    return async_(op.render())


@route("GET", "/{name}", access=Access.TRUSTED)
async def get_instance(prefix: str, request: Request, name: str) -> Response:
    svc = get_services(request).instances
    rec = svc.record(instance_key(request, name))
    full = recursion(request) >= 1 and request.url.path.startswith("/1.0/instances")
    # a full render reads the container's state (/proc, cgroups, its links over netlink: in a
    # thread) and its disk usage (the storage drivers)
    out = await disk_usage.render_full(svc, rec) if full else svc.render(rec)
    if full:
        await _fill_backups(get_services(request), [out])
    return sync(out, etag=etag_of(*svc.etag(rec)))


async def _fill_backups(services, rendered: list[dict]) -> None:
    """`backups` of full instance renders (the records are in the database, not in memory)."""
    if services.backups is None or not rendered:
        return
    by_id = await services.backups.rendered_by_instance()
    for out in rendered:
        rec = services.instances.records.get(storage_name(out.get("project") or "default", out["name"]))
        out["backups"] = by_id.get(rec.id, []) if rec is not None else []


async def _update(prefix: str, request: Request, name: str, replace: bool) -> Response:
    services = get_services(request)
    svc = services.instances
    project = project_name(request)
    key = instance_key(request, name)
    rec = svc.record(key)
    check_etag(request, etag_of(*svc.etag(rec)))
    body = await parse(request, InstancePut)
    fields = body.model_fields_set
    if body.restore:
        snap = body.restore.split("/", 1)[1] if "/" in body.restore else body.restore
        services.snapshots.get(key, snap)  # 404 for an unknown snapshot, before an operation
        stateful = bool(body.stateful)
        if stateful:  # no CRIU, or a stateless snapshot: a 400 before an operation
            from lxd_daemon.migration import criu

            await criu.require("Restoring a stateful snapshot")
            services.snapshots.check_restore(key, snap, True)
        who = requestor(request)

        async def restore(op):
            await services.snapshots.restore(key, snap, stateful=stateful, requestor=who)

        op = services.ops.create(description="Restoring snapshot", resources=resources(project, name), run=restore,
                                 project=project)
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
    source = f"/1.0/instances/{name}{query(project)}"
    if not replace:
        await svc.update(key, **kwargs)
        services.events.lifecycle("instance-updated", source, requestor=who, project=project)
        return sync({})

    async def run(op):
        await svc.update(key, **kwargs)
        services.events.lifecycle("instance-updated", source, requestor=who, project=project)

    op = services.ops.create(description="Updating instance", resources=resources(project, name), run=run,
                             project=project)
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
    project = project_name(request)
    key = instance_key(request, name)
    svc.record(key)
    check_target(request)
    body = await parse(request, InstancePost)
    if body.migration and body.pool:  # `lxc move NAME [NEW] -s POOL`
        return await _move_to_pool(prefix, request, name, body)
    if body.migration:  # to another server (migration/source.py)
        return await migrate(request, name, body)
    if not body.name:
        raise BadRequest("A new name is required")
    new = body.name
    who = requestor(request)

    async def run(op):
        await svc.rename(key, new)
        services.events.lifecycle("instance-renamed", f"/1.0/instances/{new}{query(project)}", {"old_name": name},
                                  requestor=who, project=project)

    op = services.ops.create(description="Renaming instance", resources=resources(project, name), run=run,
                             project=project)
    return async_(op.render())


async def migrate(request: Request, name: str, body, snapshot: str | None = None) -> Response:
    """The source of a migration (`lxc copy/move` to another server): a websocket operation
    with the `control` and `fs` secrets (pull, relay), or, given `target`, a task that dials
    the sink's operation (push)."""
    from lxd_daemon.migration.source import MigrationSource
    from lxd_daemon.ops.manager import CLASS_WEBSOCKET

    services = get_services(request)
    project = project_name(request)
    key = instance_key(request, name)
    src = MigrationSource(services, key, snapshot=snapshot, live=body.live,
                          instance_only=getattr(body, "instance_only", False) or getattr(body, "container_only", False),
                          target=body.target, requestor=requestor(request))
    await src.check()
    res = resources(project, name)
    if snapshot is not None:
        q = query(project)
        res["instances_snapshots"] = [f"/1.0/instances/{name}/snapshots/{snapshot}{q}"]
        res["containers_snapshots"] = [f"/1.0/containers/{name}/snapshots/{snapshot}{q}"]
    if body.target is not None:
        op = services.ops.create(description="Migrating instance", resources=res, run=src.run,
                                 on_cancel=src.on_cancel, may_cancel=True, project=project)
        return async_(op.render())
    op = services.ops.create(cls=CLASS_WEBSOCKET, description="Migrating instance", resources=res, run=src.run,
                             on_connect=src.on_connect, on_cancel=src.on_cancel, may_cancel=True,
                             project=project, start=False)
    op.metadata = src.ends.secrets(op)
    services.ops.start(op)
    return async_(op.render())


async def _receive(request: Request, body) -> Response:
    """The sink of a migration: pull (a task dialing the source's operation) or push (a
    websocket operation the source or the relaying client connects)."""
    from lxd_daemon.migration import sink
    from lxd_daemon.ops.manager import CLASS_WEBSOCKET

    services = get_services(request)
    project = project_name(request)
    plan = await sink.prepare(services, body, project)  # every check before data moves
    s = sink.MigrationSink(services, body, project, plan=plan, requestor=requestor(request))
    res = resources(project, body.name)
    if s.mode == "pull":
        op = services.ops.create(description="Creating instance", resources=res, run=s.run,
                                 on_cancel=s.on_cancel, may_cancel=True, project=project)
        return async_(op.render())
    op = services.ops.create(cls=CLASS_WEBSOCKET, description="Creating instance", resources=res, run=s.run,
                             on_connect=s.on_connect, on_cancel=s.on_cancel, may_cancel=True, project=project,
                             start=False)
    op.metadata = s.ends.secrets(op)
    services.ops.start(op)
    return async_(op.render())


async def _move_to_pool(prefix: str, request: Request, name: str, body) -> Response:
    services = get_services(request)
    storage = services.storage
    project = project_name(request)
    key = instance_key(request, name)
    if storage is None or body.pool not in storage.pools:
        raise NotFound(f"Storage pool {body.pool!r} not found")
    svc = services.instances
    # A running instance moves statefully (the client's default: stopped with CRIU, moved, restored),
    # as LXD's; statelessly it must be stopped first.
    stateful = svc.status_of(key)[0] != "Stopped"
    if stateful and not body.live:
        raise BadRequest("Instance must be stopped to move between pools statelessly")
    new = body.name or name
    if new != name and storage_name(project, new) in svc.records:
        raise Conflict(f"Instance {new!r} already exists")
    from lxd_daemon.migration import criu

    if stateful:
        await criu.require("Moving a running instance between pools")
    who = requestor(request)

    async def run(op):
        if stateful:
            await criu.stateful_stop(svc, key)
        try:
            await services.snapshots.move_to_pool(key, new, body.pool, instance_only=body.instance_only,
                                                  requestor=who)
        except BaseException:
            if stateful:  # not moved: it runs on where it was
                with contextlib.suppress(Exception):
                    await criu.stateful_start(svc, key)
            raise
        if stateful:
            await criu.stateful_start(svc, storage_name(project, new))

    op = services.ops.create(description="Moving instance", resources=resources(project, name), run=run,
                             project=project)
    return async_(op.render())


@route("DELETE", "/{name}", access=Access.TRUSTED)
async def delete_instance(prefix: str, request: Request, name: str) -> Response:
    services = get_services(request)
    svc = services.instances
    project = project_name(request)
    key = instance_key(request, name)
    svc.record(key)
    if svc.status_of(key)[0] != "Stopped":
        raise BadRequest("Instance is running")
    who = requestor(request)

    async def run(op):
        await svc.delete(key, who)

    op = services.ops.create(description="Deleting instance", resources=resources(project, name), run=run,
                             project=project)
    return async_(op.render())
