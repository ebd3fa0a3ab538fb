"""create_app(services) -> the ASGI application.

FastAPI routes every endpoint. Two small ASGI layers sit in front of it: every error leaves in
LXD's envelope (including 404/405 and validation errors, never FastAPI's default body), and the
hottest read, a trusted `GET /1.0`, is answered from a pre-rendered document.
"""

from __future__ import annotations

import logging

from fastapi import Depends, FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from lxd_daemon.api import access, events, internal, operations, projects, server
from lxd_daemon.api.envelope import error
from lxd_daemon.api.request import check_request
from lxd_daemon.errors import LXDError, insufficient_storage
from lxd_daemon.services import Services

log = logging.getLogger("lxd.api")

_REASONS = {404: "not found", 405: "method not allowed", 413: "request body too large"}


def create_app(services: Services, routers=()) -> FastAPI:
    # No trailing-slash redirects: LXD answers /1.0/instances/ with 404, and a redirect would
    # leave the error envelope.
    # check_request runs before every handler, also those of routers included later: the names
    # in the URL path are validated by kind (lxd_daemon.names) and `?project=` must exist.
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None, redirect_slashes=False,
                  dependencies=[Depends(check_request)])
    app.state.services = services
    tables = [module.router for module in (server, operations, events, projects, internal)] + list(routers)
    for router in tables:
        app.include_router(router)
    missing = access.undeclared(app)  # refused by access.check() on every transport
    if missing:
        log.warning("routes without an access declaration are refused", extra={"routes": missing})

    @app.exception_handler(LXDError)
    async def lxd_error(request: Request, exc: LXDError):
        return error(exc.status, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        detail = exc.detail if isinstance(exc.detail, str) and exc.detail else _REASONS.get(exc.status_code, "error")
        if exc.status_code == 404:
            detail = "not found"
        elif exc.status_code == 405:
            detail = "method not allowed"
        return error(exc.status_code, detail)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path"))
        return error(400, f"Invalid value for {where!r}: {first.get('msg', 'invalid')}")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        full = insufficient_storage(exc, "this request's data")  # a stray ENOSPC/EDQUOT: 507
        if full is not None:
            log.warning("out of space", extra={"path": request.url.path, "file": getattr(exc, "filename", "")})
            return error(full.status, full.message)
        log.exception("unhandled error", extra={"path": request.url.path})
        return error(500, f"Internal error: {exc.__class__.__name__}: {exc}")

    return FastPath(app, services)


class FastPath:
    """Serve a trusted `GET /1.0` from the cached rendered document; pass the rest through."""

    def __init__(self, app, services: Services):
        self.app = app
        self.services = services
        self.state = app.state

    def __getattr__(self, name):
        return getattr(self.app, name)

    async def __call__(self, scope, receive, send):
        if (scope["type"] == "http" and scope["path"] == "/1.0" and scope["method"] == "GET"
                and scope.get("lxd_trusted") is True and b"project=" not in scope.get("query_string", b"")):
            server = self.services.server
            body = server.cached_body()
            await send({
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"etag", server.etag().encode()),
                ],
            })
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)
