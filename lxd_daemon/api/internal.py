"""`/internal/*`: used by the `lxd` command itself (waitready, shutdown)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from lxd_daemon.api.envelope import sync
from lxd_daemon.errors import Forbidden
from lxd_daemon.services import get_services

router = APIRouter()


def _local_only(request: Request) -> None:
    if request.scope.get("lxd_protocol") == "tls":
        raise Forbidden("Internal endpoints are only served on the unix socket")


@router.get("/internal/ready")
async def ready(request: Request) -> Response:
    _local_only(request)
    return sync({})


@router.put("/internal/shutdown")
async def shutdown(request: Request) -> Response:
    _local_only(request)
    get_services(request).request_stop("shutdown")
    return sync({})
