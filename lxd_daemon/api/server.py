"""`/` and `/1.0`: the server document and server configuration."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from lxd_daemon.api.envelope import JSONBytes, sync
from lxd_daemon.api.request import check_etag, parse
from lxd_daemon.services import get_services, requestor
from lxd_daemon.wire import ServerPut

router = APIRouter()


def is_trusted(request: Request) -> bool:
    return request.scope.get("lxd_trusted", True)


@router.get("/")
async def get_root(request: Request) -> Response:
    return sync(["/1.0"])


@router.get("/1.0")
async def get_server(request: Request) -> Response:
    s = get_services(request).server
    if is_trusted(request):
        return JSONBytes(s.cached_body(), headers={"ETag": s.etag()})
    return sync(s.document(trusted=False))


@router.put("/1.0")
async def put_server(request: Request) -> Response:
    s = get_services(request).server
    check_etag(request, s.etag())
    body = await parse(request, ServerPut)
    await s.update_config(body.config, replace=True, requestor=requestor(request))
    return sync({})


@router.patch("/1.0")
async def patch_server(request: Request) -> Response:
    s = get_services(request).server
    check_etag(request, s.etag())
    body = await parse(request, ServerPut)
    await s.update_config(body.config, replace=False, requestor=requestor(request))
    return sync({})
