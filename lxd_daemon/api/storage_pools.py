"""`/1.0/storage-pools`: list, create, get, update and delete pools."""

from __future__ import annotations

from fastapi import Request
from starlette.responses import Response

from lxd_daemon.api.access import Access, Routes, shown
from lxd_daemon.api.envelope import etag_of, sync
from lxd_daemon.api.request import check_etag, parse, recursion
from lxd_daemon.services import get_services, requestor
from lxd_daemon.wire.storage import StoragePoolPut, StoragePoolsPost

router = Routes()


@router.get("/1.0/storage-pools", access=Access.TRUSTED)
async def list_pools(request: Request) -> Response:
    storage = get_services(request).storage
    if recursion(request):
        return sync([shown(request, await storage.render(p)) for p in storage.pools.values()])
    return sync([f"/1.0/storage-pools/{n}" for n in storage.pools])


@router.post("/1.0/storage-pools", access=Access.ADMIN)
async def create_pool(request: Request) -> Response:
    services = get_services(request)
    body = await parse(request, StoragePoolsPost)
    await services.storage.create(body.name, body.driver, body.description, body.config)
    services.events.lifecycle("storage-pool-created", f"/1.0/storage-pools/{body.name}",
                              requestor=requestor(request))
    return sync(None, status=201, location=f"/1.0/storage-pools/{body.name}")


def _etag(p: dict) -> str:
    return etag_of(p["description"], p["config"])


@router.get("/1.0/storage-pools/{name}", access=Access.TRUSTED)
async def get_pool(request: Request, name: str) -> Response:
    storage = get_services(request).storage
    p = await storage.render(storage.get(name))
    return sync(shown(request, p), etag=_etag(p))


@router.get("/1.0/storage-pools/{name}/resources", access=Access.TRUSTED)
async def pool_resources(request: Request, name: str) -> Response:
    pool = get_services(request).storage.get(name)
    return sync(await pool.driver.pool_usage())


async def _update(request: Request, name: str, replace: bool) -> Response:
    services = get_services(request)
    storage = services.storage
    p = await storage.render(storage.get(name))
    check_etag(request, _etag(p))
    body = await parse(request, StoragePoolPut)
    config = dict(body.config) if replace else {**p["config"], **body.config}
    description = body.description if (replace or "description" in body.model_fields_set) else p["description"]
    await storage.update(name, description, config)
    services.events.lifecycle("storage-pool-updated", f"/1.0/storage-pools/{name}", requestor=requestor(request))
    return sync({})


@router.put("/1.0/storage-pools/{name}", access=Access.ADMIN)
async def put_pool(request: Request, name: str) -> Response:
    return await _update(request, name, True)


@router.patch("/1.0/storage-pools/{name}", access=Access.ADMIN)
async def patch_pool(request: Request, name: str) -> Response:
    return await _update(request, name, False)


@router.delete("/1.0/storage-pools/{name}", access=Access.ADMIN)
async def delete_pool(request: Request, name: str) -> Response:
    services = get_services(request)
    await services.storage.delete(name)
    services.events.lifecycle("storage-pool-deleted", f"/1.0/storage-pools/{name}", requestor=requestor(request))
    return sync({})
