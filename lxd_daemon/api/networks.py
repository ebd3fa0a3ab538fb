"""`/1.0/networks`: the host's interfaces as unmanaged networks (read-only, as LXD lists them).
Creating, changing and deleting networks answers "not implemented yet" until managed networks
exist."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from lxd_daemon.api.envelope import etag_of, sync
from lxd_daemon.api.request import recursion
from lxd_daemon.services import get_services

router = APIRouter()


def _networks(request: Request):
    return get_services(request).networks


@router.get("/1.0/networks")
async def list_networks(request: Request) -> Response:
    svc = _networks(request)
    if recursion(request):
        return sync(await svc.render_all())
    return sync([f"/1.0/networks/{n}" for n in await svc.names()])


@router.post("/1.0/networks")
async def create_network(request: Request) -> Response:
    await _networks(request).refuse_change()


@router.get("/1.0/networks/{name}")
async def get_network(request: Request, name: str) -> Response:
    n = await _networks(request).render(name)
    return sync(n, etag=etag_of(n["name"], n["managed"], n["type"], n["description"], n["config"]))


@router.get("/1.0/networks/{name}/state")
async def get_network_state(request: Request, name: str) -> Response:
    return sync(await _networks(request).state(name))


async def change_network(request: Request, name: str) -> Response:
    await _networks(request).refuse_change(name)


for _method in ("PUT", "PATCH", "POST", "DELETE"):
    router.add_api_route("/1.0/networks/{name}", change_network, methods=[_method])
router.add_api_route("/1.0/networks/{name}/leases", change_network, methods=["GET"])
