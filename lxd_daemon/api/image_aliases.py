"""`/1.0/images/aliases`: list, create, get, update, rename, delete. Names may contain `/`."""

from __future__ import annotations

from urllib.parse import quote

from fastapi import Request
from starlette.responses import Response

from lxd_daemon.api.access import Access, Routes, is_trusted
from lxd_daemon.api.envelope import sync
from lxd_daemon.api.images import caller_project
from lxd_daemon.api.request import check_etag, parse, project_of, read_json, recursion, validate
from lxd_daemon.errors import BadRequest
from lxd_daemon.images.service import alias_etag
from lxd_daemon.projects.naming import DEFAULT, query
from lxd_daemon.services import get_services, requestor
from lxd_daemon.wire.images import ImageAliasesEntryPost, ImageAliasesEntryPut, ImageAliasesPost

router = Routes()


def alias_url(name: str, project: str = DEFAULT) -> str:
    return "/1.0/images/aliases/" + quote(name, safe="/") + query(project)


@router.get("/1.0/images/aliases", access=Access.GUARDED)
async def list_aliases(request: Request) -> Response:
    project = caller_project(request)
    aliases = await get_services(request).images.list_aliases(project=project, public_only=not is_trusted(request))
    if recursion(request):
        return sync(aliases)
    return sync([alias_url(a["name"], project) for a in aliases])


@router.post("/1.0/images/aliases", access=Access.TRUSTED)
async def create_alias(request: Request) -> Response:
    body = await parse(request, ImageAliasesPost)
    if not body.name or not body.target:
        raise BadRequest("name and target are required")
    project = project_of(request).name
    await get_services(request).images.create_alias(body.name, body.target, body.description, project=project,
                                                    requestor=requestor(request))
    return sync(None, status=201, location=alias_url(body.name, project))


@router.get("/1.0/images/aliases/{name:path}", access=Access.GUARDED)
async def get_alias(request: Request, name: str) -> Response:
    alias = await get_services(request).images.get_alias(name, project=caller_project(request),
                                                         public_only=not is_trusted(request))
    return sync(alias, etag=alias_etag(alias))


async def _update(request: Request, name: str, replace: bool) -> Response:
    raw = await read_json(request, default={})
    body = validate(ImageAliasesEntryPut, raw)
    values = {k: getattr(body, k) for k in body.model_fields_set}
    await get_services(request).images.update_alias(
        name, values, project=project_of(request).name, replace=replace,
        if_match=lambda etag: check_etag(request, etag),
        requestor=requestor(request))
    return sync({})


@router.put("/1.0/images/aliases/{name:path}", access=Access.TRUSTED)
async def put_alias(request: Request, name: str) -> Response:
    return await _update(request, name, True)


@router.patch("/1.0/images/aliases/{name:path}", access=Access.TRUSTED)
async def patch_alias(request: Request, name: str) -> Response:
    return await _update(request, name, False)


@router.post("/1.0/images/aliases/{name:path}", access=Access.TRUSTED)
async def rename_alias(request: Request, name: str) -> Response:
    body = await parse(request, ImageAliasesEntryPost)
    if not body.name:
        raise BadRequest("The new alias name is required")
    project = project_of(request).name
    await get_services(request).images.rename_alias(name, body.name, project=project, requestor=requestor(request))
    return sync(None, status=201, location=alias_url(body.name, project))


@router.delete("/1.0/images/aliases/{name:path}", access=Access.TRUSTED)
async def delete_alias(request: Request, name: str) -> Response:
    await get_services(request).images.delete_alias(name, project=project_of(request).name,
                                                    requestor=requestor(request))
    return sync({})
