"""`/1.0/networks`: managed networks (create, get, update, rename, delete, state, leases) and the
host's other interfaces, listed read-only as LXD's unmanaged networks."""

from __future__ import annotations

from fastapi import Request
from starlette.responses import Response

from lxd_daemon.api.access import Access, Routes
from lxd_daemon.api.envelope import etag_of, sync
from lxd_daemon.api.request import check_etag, parse, recursion
from lxd_daemon.services import get_services, requestor
from lxd_daemon.wire.networks import NetworkPost, NetworkPut, NetworksPost

router = Routes()


def _networks(request: Request):
    return get_services(request).networks


def _project(request: Request) -> str:
    return request.query_params.get("project") or "default"


def _etag(n: dict) -> str:
    return etag_of(n["name"], n["managed"], n["type"], n["description"], n["config"])


@router.get("/1.0/networks", access=Access.TRUSTED)
async def list_networks(request: Request) -> Response:
    svc = _networks(request)
    if recursion(request):
        return sync(await svc.render_all(_project(request)))
    return sync([f"/1.0/networks/{n}" for n in await svc.names(_project(request))])


@router.post("/1.0/networks", access=Access.TRUSTED)
async def create_network(request: Request) -> Response:
    services = get_services(request)
    body = await parse(request, NetworksPost)
    await services.networks.create(body.name, body.type, body.description, body.config, _project(request))
    url = f"/1.0/networks/{body.name}"
    services.events.lifecycle("network-created", url, requestor=requestor(request))
    return sync(None, status=201, location=url)


@router.get("/1.0/networks/{name}", access=Access.TRUSTED)
async def get_network(request: Request, name: str) -> Response:
    n = await _networks(request).render(name, _project(request))
    return sync(n, etag=_etag(n))


async def _update(request: Request, name: str, replace: bool) -> Response:
    services = get_services(request)
    svc = services.networks
    project = _project(request)
    svc._managed(name, project)  # "Failed loading network" for a host interface or nothing
    current = await svc.render(name, project)
    check_etag(request, _etag(current))
    body = await parse(request, NetworkPut)
    if replace:
        config, description = dict(body.config), body.description
    else:
        config = {**current["config"], **body.config}
        description = body.description if "description" in body.model_fields_set else current["description"]
    await svc.update(name, description, config, project)
    services.events.lifecycle("network-updated", f"/1.0/networks/{name}", requestor=requestor(request))
    return sync({})


@router.put("/1.0/networks/{name}", access=Access.TRUSTED)
async def put_network(request: Request, name: str) -> Response:
    return await _update(request, name, True)


@router.patch("/1.0/networks/{name}", access=Access.TRUSTED)
async def patch_network(request: Request, name: str) -> Response:
    return await _update(request, name, False)


@router.post("/1.0/networks/{name}", access=Access.TRUSTED)
async def rename_network(request: Request, name: str) -> Response:
    services = get_services(request)
    body = await parse(request, NetworkPost)
    await services.networks.rename(name, body.name, _project(request))
    url = f"/1.0/networks/{body.name}"
    services.events.lifecycle("network-renamed", url, {"old_name": name}, requestor=requestor(request))
    return sync(None, status=201, location=url)


@router.delete("/1.0/networks/{name}", access=Access.TRUSTED)
async def delete_network(request: Request, name: str) -> Response:
    services = get_services(request)
    await services.networks.delete(name, _project(request))
    services.events.lifecycle("network-deleted", f"/1.0/networks/{name}", requestor=requestor(request))
    return sync({})


@router.get("/1.0/networks/{name}/state", access=Access.TRUSTED)
async def get_network_state(request: Request, name: str) -> Response:
    return sync(await _networks(request).state(name, _project(request)))


@router.get("/1.0/networks/{name}/leases", access=Access.TRUSTED)
async def get_network_leases(request: Request, name: str) -> Response:
    return sync(await _networks(request).leases(name, _project(request)))
