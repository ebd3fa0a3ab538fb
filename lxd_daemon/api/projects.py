"""`/1.0/projects`: the single `default` project."""

from __future__ import annotations

import json

from fastapi import Request
from sqlalchemy import select, update
from starlette.responses import Response

from lxd_daemon.api.access import Access, Routes
from lxd_daemon.api.envelope import etag_of, sync
from lxd_daemon.api.request import check_etag, parse, recursion
from lxd_daemon.db.models import projects
from lxd_daemon.errors import BadRequest, NotFound, NotImplementedYet
from lxd_daemon.projects import policy
from lxd_daemon.services import get_services, requestor
from lxd_daemon.wire import ProjectPut, ProjectsPost

router = Routes()


async def _project(request: Request, name: str) -> dict:
    services = get_services(request)

    def load(session):
        return session.execute(select(projects).where(projects.c.name == name)).one_or_none()

    row = await services.db.run(load)
    if row is None:
        raise NotFound("Project not found")
    used_by: list[str] = []
    for provider in services.project_used_by:
        used_by.extend(await provider())
    return {"name": row.name, "description": row.description, "config": json.loads(row.config),
            "used_by": sorted(used_by)}


@router.get("/1.0/projects", access=Access.TRUSTED)
async def list_projects(request: Request) -> Response:
    if recursion(request):
        return sync([await _project(request, "default")])
    return sync(["/1.0/projects/default"])


@router.post("/1.0/projects", access=Access.ADMIN)
async def create_project(request: Request) -> Response:
    body = await parse(request, ProjectsPost)
    if body.name == "default":
        raise BadRequest("The 'default' project already exists")
    raise NotImplementedYet("Only the 'default' project is supported by this server")


@router.get("/1.0/projects/{name}", access=Access.TRUSTED)
async def get_project(request: Request, name: str) -> Response:
    p = await _project(request, name)
    return sync(p, etag=etag_of(p["description"], p["config"]))


async def _update(request: Request, name: str, replace: bool) -> Response:
    services = get_services(request)
    p = await _project(request, name)
    check_etag(request, etag_of(p["description"], p["config"]))
    body = await parse(request, ProjectPut)
    fields = body.model_fields_set
    if replace:
        config = {str(k): str(v) for k, v in (body.config or {}).items()}
    elif "config" in fields:
        config = {**p["config"], **{str(k): str(v) for k, v in (body.config or {}).items()}}
    else:
        config = dict(p["config"])
    config = {k: v for k, v in config.items() if v != ""}  # an empty value unsets the key
    description = body.description if (replace or "description" in fields) else p["description"]
    # Validated (LXD's keys and texts; keys this server doesn't enforce refused), then checked
    # against what the project holds now, then made current in memory in the same synchronous
    # step, so that no create or update can pass against the old limits meanwhile.
    policy.validate_config(config, p["config"], name)
    svc = services.instances
    if svc is not None:
        instances, profiles = svc.policy_entities(name)
        nets = len(services.networks.managed_names(name)) if services.networks is not None else 0
        policy.check_project_update(name, config, p["config"], instances, profiles,
                                    svc.projects.volume_entities(name), nets)
        before = svc.projects.config(name)
        svc.projects.set_config(name, config)

    def write(session):
        session.execute(update(projects).where(projects.c.name == name).values(
            description=description, config=json.dumps(config, sort_keys=True)))

    try:
        await services.db.run(write)
    except BaseException:
        if svc is not None:
            svc.projects.set_config(name, before)
        raise
    services.events.lifecycle("project-updated", f"/1.0/projects/{name}", requestor=requestor(request))
    return sync({})


@router.get("/1.0/projects/{name}/state", access=Access.TRUSTED)
async def project_state(request: Request, name: str) -> Response:
    """Usage against limits (`lxc project info`)."""
    services = get_services(request)
    p = await _project(request, name)
    svc = services.instances
    instances = svc.policy_entities(name)[0] if svc is not None else []
    networks = services.networks.managed_names(name) if services.networks is not None else []
    sizes: list[str] = []
    custom = services.storage.custom if services.storage is not None else None
    if custom is not None:
        for pool in list(services.storage.pools):
            sizes.extend(v.config.get("size", "") for v in await custom.list(pool, name))
    return sync({"resources": policy.allocations(p["config"], instances, len(networks), sizes)})


@router.put("/1.0/projects/{name}", access=Access.ADMIN)
async def put_project(request: Request, name: str) -> Response:
    return await _update(request, name, True)


@router.patch("/1.0/projects/{name}", access=Access.ADMIN)
async def patch_project(request: Request, name: str) -> Response:
    return await _update(request, name, False)


@router.post("/1.0/projects/{name}", access=Access.ADMIN)
async def rename_project(request: Request, name: str) -> Response:
    await _project(request, name)
    raise BadRequest("The 'default' project can't be renamed")


@router.delete("/1.0/projects/{name}", access=Access.ADMIN)
async def delete_project(request: Request, name: str) -> Response:
    await _project(request, name)
    raise BadRequest("The 'default' project can't be deleted")
