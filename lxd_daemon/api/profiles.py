"""`/1.0/profiles`: list, create, get, update, rename and delete profiles (of the request's
project, or of default's for a project without features.profiles)."""

from __future__ import annotations

from fastapi import Request
from starlette.responses import Response

from lxd_daemon.api.access import Access, Routes, shown
from lxd_daemon.api.envelope import etag_of, sync
from lxd_daemon.api.request import check_etag, listed_projects, parse, project_of, recursion
from lxd_daemon.filter import parse_filter
from lxd_daemon.services import get_services, requestor
from lxd_daemon.wire.profiles import ProfilePost, ProfilePut, ProfilesPost

router = Routes()


def _etag(p) -> str:
    return etag_of(p.description, p.config, p.devices)


def _render(request: Request, svc, p) -> dict:
    return shown(request, svc.render(p))


@router.get("/1.0/profiles", access=Access.TRUSTED)
async def list_profiles(request: Request) -> Response:
    svc = get_services(request).profiles
    flt = parse_filter(request.query_params.get("filter"))
    seen: set[str] = set()
    profiles = []
    for project in listed_projects(request):  # (all-projects: each profiles project once)
        eff = svc.effective(project)
        if eff not in seen:
            seen.add(eff)
            profiles.extend(p for _, p in sorted(svc.in_project(eff).items()))
    rendered = [(p, _render(request, svc, p)) for p in profiles]
    rendered = [(p, r) for p, r in rendered if flt.match(r)]
    if recursion(request):
        return sync([r for _, r in rendered])
    return sync([p.url for p, _ in rendered])


@router.post("/1.0/profiles", access=Access.TRUSTED)
async def create_profile(request: Request) -> Response:
    services = get_services(request)
    body = await parse(request, ProfilesPost)
    p = await services.profiles.create(project_of(request).name, body.name, body.description, body.config,
                                       body.devices)
    services.events.lifecycle("profile-created", p.url, requestor=requestor(request), project=p.project)
    return sync(None, status=201, location=p.url)


@router.get("/1.0/profiles/{name}", access=Access.TRUSTED)
async def get_profile(request: Request, name: str) -> Response:
    svc = get_services(request).profiles
    p = svc.get(project_of(request).name, name)
    return sync(_render(request, svc, p), etag=_etag(p))


async def _update(request: Request, name: str, replace: bool) -> Response:
    services = get_services(request)
    svc = services.profiles
    project = project_of(request).name
    p = svc.get(project, name)
    check_etag(request, _etag(p))
    body = await parse(request, ProfilePut)
    fields = body.model_fields_set
    if replace:
        description, config, devices = body.description, body.config, body.devices
    else:
        description = body.description if "description" in fields else p.description
        config = {**p.config, **body.config}
        devices = {**p.devices, **body.devices}
    await svc.update(project, name, description, config, devices)
    services.events.lifecycle("profile-updated", p.url, requestor=requestor(request), project=p.project)
    return sync({})


@router.put("/1.0/profiles/{name}", access=Access.TRUSTED)
async def put_profile(request: Request, name: str) -> Response:
    return await _update(request, name, True)


@router.patch("/1.0/profiles/{name}", access=Access.TRUSTED)
async def patch_profile(request: Request, name: str) -> Response:
    return await _update(request, name, False)


@router.post("/1.0/profiles/{name}", access=Access.TRUSTED)
async def rename_profile(request: Request, name: str) -> Response:
    services = get_services(request)
    body = await parse(request, ProfilePost)
    p = await services.profiles.rename(project_of(request).name, name, body.name)
    services.events.lifecycle("profile-renamed", p.url, {"old_name": name}, requestor=requestor(request),
                              project=p.project)
    return sync(None, status=201, location=p.url)


@router.delete("/1.0/profiles/{name}", access=Access.TRUSTED)
async def delete_profile(request: Request, name: str) -> Response:
    services = get_services(request)
    p = await services.profiles.delete(project_of(request).name, name)
    services.events.lifecycle("profile-deleted", p.url, requestor=requestor(request), project=p.project)
    return sync({})
