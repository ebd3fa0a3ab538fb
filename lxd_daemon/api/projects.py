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
from lxd_daemon.services import get_services
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
    p = await _project(request, name)
    check_etag(request, etag_of(p["description"], p["config"]))
    body = await parse(request, ProjectPut)
    fields = body.model_fields_set
    config = dict(body.config) if replace else {**p["config"], **body.config}
    if config != p["config"]:
        raise BadRequest("Project features of the 'default' project can't be changed")
    description = body.description if (replace or "description" in fields) else p["description"]

    def write(session):
        session.execute(update(projects).where(projects.c.name == name).values(description=description))

    await get_services(request).db.run(write)
    get_services(request).events.lifecycle("project-updated", f"/1.0/projects/{name}")
    return sync({})


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
