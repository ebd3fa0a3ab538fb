"""`/` and `/1.0`: the server document and server configuration."""

from __future__ import annotations

from fastapi import Request
from starlette.responses import Response

from lxd_daemon.api.access import Access, Routes, is_trusted
from lxd_daemon.api.envelope import JSONBytes, sync
from lxd_daemon.api.request import check_etag, parse
from lxd_daemon.services import get_services, requestor
from lxd_daemon.wire import ServerPut

router = Routes()


@router.get("/", access=Access.ANYONE)
async def get_root(request: Request) -> Response:
    return sync(["/1.0"])


@router.get("/1.0", access=Access.ANYONE)
async def get_server(request: Request) -> Response:
    s = get_services(request).server
    if is_trusted(request):
        return JSONBytes(s.cached_body(), headers={"ETag": s.etag()})
    return sync(s.document(trusted=False))


@router.put("/1.0", access=Access.ADMIN)
async def put_server(request: Request) -> Response:
    s = get_services(request).server
    check_etag(request, s.etag())
    body = await parse(request, ServerPut)
    await s.update_config(body.config, replace=True, requestor=requestor(request))
    return sync({})


@router.patch("/1.0", access=Access.ADMIN)
async def patch_server(request: Request) -> Response:
    s = get_services(request).server
    check_etag(request, s.etag())
    body = await parse(request, ServerPut)
    await s.update_config(body.config, replace=False, requestor=requestor(request))
    return sync({})
