"""`/1.0/projects`: list, create, get, put, patch, rename, delete, and `/state` (usage against
limits). The records and the lifecycle are projects/service.py; limits and restrictions are
projects/policy.py."""

from __future__ import annotations

from fastapi import Request
from starlette.responses import Response

from lxd_daemon.api import access
from lxd_daemon.api.access import Access, Routes
from lxd_daemon.api.envelope import async_, etag_of, sync
from lxd_daemon.api.request import check_etag, parse, recursion
from lxd_daemon.projects import policy
from lxd_daemon.services import get_services, requestor
from lxd_daemon.wire import ProjectPost, ProjectPut, ProjectsPost

router = Routes()


def _etag(p: dict) -> str:
    return etag_of(p["description"], p["config"])


@router.get("/1.0/projects", access=Access.TRUSTED)
async def list_projects(request: Request) -> Response:
    svc = get_services(request).projects
    visible = access.visible_projects(request)
    names = [n for n in svc.names() if visible is None or n in visible]
    if recursion(request):
        return sync([await svc.render(n) for n in names])
    return sync([f"/1.0/projects/{n}" for n in names])


@router.post("/1.0/projects", access=Access.ADMIN)
async def create_project(request: Request) -> Response:
    services = get_services(request)
    body = await parse(request, ProjectsPost)
    await services.projects.create(body.name, body.description, dict(body.config or {}))
    services.events.lifecycle("project-created", f"/1.0/projects/{body.name}", requestor=requestor(request),
                              project=body.name)
    return sync({}, status=201, location=f"/1.0/projects/{body.name}")


@router.get("/1.0/projects/{name}", access=Access.TRUSTED)
async def get_project(request: Request, name: str) -> Response:
    p = await get_services(request).projects.render(name)
    return sync(p, etag=_etag(p))


async def _update(request: Request, name: str, replace: bool) -> Response:
    services = get_services(request)
    svc = services.projects
    p = await svc.render(name)
    check_etag(request, _etag(p))
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
    svc.check_features_change(name, config, await svc.is_empty(name))
    inst = services.instances
    if inst is not None:
        instances, profiles = inst.policy_entities(name)
        nets = len(services.networks.managed_names(name)) if services.networks is not None else 0
        policy.check_project_update(name, config, p["config"], instances, profiles,
                                    svc.volume_entities(name), nets)
    before = svc.config(name)
    svc.set_config(name, config)
    try:
        await svc.update(name, description, config)
    except BaseException:
        svc.set_config(name, before)
        raise
    services.events.lifecycle("project-updated", f"/1.0/projects/{name}", requestor=requestor(request),
                              project=name)
    return sync({})


@router.get("/1.0/projects/{name}/state", access=Access.TRUSTED)
async def project_state(request: Request, name: str) -> Response:
    """Usage against limits (`lxc project info`)."""
    services = get_services(request)
    cfg = services.projects.get(name).config
    inst = services.instances
    instances = inst.policy_entities(name)[0] if inst is not None else []
    networks = services.networks.managed_names(name) if services.networks is not None else []
    sizes: list[str] = []
    custom = services.storage.custom if services.storage is not None else None
    if custom is not None:
        for pool in list(services.storage.pools):
            # (custom.list resolves features.storage.volumes: only the project's own volumes count)
            sizes.extend(v.config.get("size", "") for v in await custom.list(pool, name) if v.project == name)
    return sync({"resources": policy.allocations(cfg, instances, len(networks), sizes)})


@router.put("/1.0/projects/{name}", access=Access.ADMIN)
async def put_project(request: Request, name: str) -> Response:
    return await _update(request, name, True)


@router.patch("/1.0/projects/{name}", access=Access.ADMIN)
async def patch_project(request: Request, name: str) -> Response:
    return await _update(request, name, False)


@router.post("/1.0/projects/{name}", access=Access.ADMIN)
async def rename_project(request: Request, name: str) -> Response:
    services = get_services(request)
    body = await parse(request, ProjectPost)
    await services.projects.check_rename(name, body.name)  # refusals answer the request itself
    who = requestor(request)

    async def run(op):
        await services.projects.rename(name, body.name)
        services.events.lifecycle("project-renamed", f"/1.0/projects/{body.name}", {"old_name": name},
                                  requestor=who, project=body.name)

    op = services.ops.create(description="Renaming project", resources={"projects": [f"/1.0/projects/{name}"]},
                             run=run, project="default")
    return async_(op.render())


@router.delete("/1.0/projects/{name}", access=Access.ADMIN)
async def delete_project(request: Request, name: str) -> Response:
    services = get_services(request)
    await services.projects.delete(name)
    services.events.lifecycle("project-deleted", f"/1.0/projects/{name}", requestor=requestor(request),
                              project=name)
    return sync({})
