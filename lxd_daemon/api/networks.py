"""`/1.0/networks`: managed networks (create, get, update, rename, delete, state, leases) and the
host's other interfaces, listed read-only as LXD's unmanaged networks. The service resolves which
project's networks the request's project uses (features.networks)."""

from __future__ import annotations

from fastapi import Request
from starlette.responses import Response

from lxd_daemon.api.access import Access, Routes, shown
from lxd_daemon.api.envelope import etag_of, sync
from lxd_daemon.api.request import check_etag, parse, project_of, recursion
from lxd_daemon.services import get_services, requestor
from lxd_daemon.wire.networks import NetworkPost, NetworkPut, NetworksPost

router = Routes()


def _networks(request: Request):
    return get_services(request).networks


def _etag(n: dict) -> str:
    return etag_of(n["name"], n["managed"], n["type"], n["description"], n["config"])


def _event(request: Request, action: str, name: str, context: dict | None = None) -> None:
    services = get_services(request)
    project = project_of(request).name
    services.events.lifecycle(action, services.networks.url(name, project), context, requestor=requestor(request),
                              project=services.networks.effective(project))


@router.get("/1.0/networks", access=Access.TRUSTED)
async def list_networks(request: Request) -> Response:
    svc = _networks(request)
    project = project_of(request).name
    if recursion(request):
        return sync([shown(request, n) for n in await svc.render_all(project)])
    return sync([svc.url(n, project) for n in await svc.names(project)])


@router.post("/1.0/networks", access=Access.TRUSTED)
async def create_network(request: Request) -> Response:
    services = get_services(request)
    project = project_of(request).name
    body = await parse(request, NetworksPost)
    await services.networks.create(body.name, body.type, body.description, body.config, project)
    _event(request, "network-created", body.name)
    return sync(None, status=201, location=services.networks.url(body.name, project))


@router.get("/1.0/networks/{name}", access=Access.TRUSTED)
async def get_network(request: Request, name: str) -> Response:
    n = await _networks(request).render(name, project_of(request).name)
    return sync(shown(request, n), etag=_etag(n))


async def _update(request: Request, name: str, replace: bool) -> Response:
    svc = _networks(request)
    project = project_of(request).name
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
    _event(request, "network-updated", name)
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
    project = project_of(request).name
    body = await parse(request, NetworkPost)
    await services.networks.rename(name, body.name, project)
    _event(request, "network-renamed", body.name, {"old_name": name})
    return sync(None, status=201, location=services.networks.url(body.name, project))


@router.delete("/1.0/networks/{name}", access=Access.TRUSTED)
async def delete_network(request: Request, name: str) -> Response:
    await _networks(request).delete(name, project_of(request).name)
    _event(request, "network-deleted", name)
    return sync({})


@router.get("/1.0/networks/{name}/state", access=Access.TRUSTED)
async def get_network_state(request: Request, name: str) -> Response:
    return sync(await _networks(request).state(name, project_of(request).name))


@router.get("/1.0/networks/{name}/leases", access=Access.TRUSTED)
async def get_network_leases(request: Request, name: str) -> Response:
    return sync(await _networks(request).leases(name, project_of(request).name))
