"""`/1.0/profiles`: list, create, get, update, rename and delete profiles."""

from __future__ import annotations

from fastapi import Request
from starlette.responses import Response

from lxd_daemon.api.access import Access, Routes
from lxd_daemon.api.envelope import etag_of, sync
from lxd_daemon.api.request import check_etag, parse, recursion
from lxd_daemon.filter import parse_filter
from lxd_daemon.services import get_services, requestor
from lxd_daemon.wire.profiles import ProfilePost, ProfilePut, ProfilesPost

router = Routes()


def _etag(p) -> str:
    return etag_of(p.description, p.config, p.devices)


@router.get("/1.0/profiles", access=Access.TRUSTED)
async def list_profiles(request: Request) -> Response:
    svc = get_services(request).profiles
    flt = parse_filter(request.query_params.get("filter"))
    rendered = [svc.render(p) for p in svc.profiles.values()]
    rendered = [r for r in rendered if flt.match(r)]
    if recursion(request):
        return sync(rendered)
    return sync([f"/1.0/profiles/{r['name']}" for r in rendered])


@router.post("/1.0/profiles", access=Access.TRUSTED)
async def create_profile(request: Request) -> Response:
    services = get_services(request)
    body = await parse(request, ProfilesPost)
    await services.profiles.create(body.name, body.description, body.config, body.devices)
    url = f"/1.0/profiles/{body.name}"
    services.events.lifecycle("profile-created", url, requestor=requestor(request))
    return sync(None, status=201, location=url)


@router.get("/1.0/profiles/{name}", access=Access.TRUSTED)
async def get_profile(request: Request, name: str) -> Response:
    svc = get_services(request).profiles
    p = svc.get(name)
    return sync(svc.render(p), etag=_etag(p))


async def _update(request: Request, name: str, replace: bool) -> Response:
    services = get_services(request)
    svc = services.profiles
    p = svc.get(name)
    check_etag(request, _etag(p))
    body = await parse(request, ProfilePut)
    fields = body.model_fields_set
    if replace:
        description, config, devices = body.description, body.config, body.devices
    else:
        description = body.description if "description" in fields else p.description
        config = {**p.config, **body.config}
        devices = {**p.devices, **body.devices}
    await svc.update(name, description, config, devices)
    services.events.lifecycle("profile-updated", f"/1.0/profiles/{name}", requestor=requestor(request))
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
    await services.profiles.rename(name, body.name)
    url = f"/1.0/profiles/{body.name}"
    services.events.lifecycle("profile-renamed", url, {"old_name": name}, requestor=requestor(request))
    return sync(None, status=201, location=url)


@router.delete("/1.0/profiles/{name}", access=Access.TRUSTED)
async def delete_profile(request: Request, name: str) -> Response:
    services = get_services(request)
    await services.profiles.delete(name)
    services.events.lifecycle("profile-deleted", f"/1.0/profiles/{name}", requestor=requestor(request))
    return sync({})
