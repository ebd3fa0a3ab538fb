"""`/1.0/warnings`: the warnings the daemon raised (list with `?project=`, `?all-projects`,
`?filter=`; get; set the status to acknowledged or new; delete). The records are
warnings/service.py.

As LXD 5.0.2: without `?project=` the list holds every warning (server-wide ones too); with it only
that project's. A restricted certificate sees only the warnings of its projects.
"""

from __future__ import annotations

from fastapi import Request
from starlette.responses import Response

from lxd_daemon.api import access
from lxd_daemon.api.access import Access, Routes
from lxd_daemon.api.envelope import sync
from lxd_daemon.api.request import parse, recursion
from lxd_daemon.errors import NotFound
from lxd_daemon.filter import parse_filter
from lxd_daemon.services import get_services, requestor
from lxd_daemon.wire.warnings import WarningPut

router = Routes()


def _visible(request: Request, w: dict) -> bool:
    visible = access.visible_projects(request)
    return visible is None or (w["project"] != "" and w["project"] in visible)


async def _lookup(request: Request, uuid: str) -> dict:
    w = await get_services(request).warnings.get(uuid)
    if not _visible(request, w):
        raise NotFound("Warning not found")
    return w


@router.get("/1.0/warnings", access=Access.TRUSTED)
async def list_warnings(request: Request) -> Response:
    flt = parse_filter(request.query_params.get("filter"))
    project = request.query_params.get("project") or None
    if request.query_params.get("all-projects", "").lower() in ("1", "true"):
        project = None
    found = [w for w in await get_services(request).warnings.list(project)
             if _visible(request, w) and flt.match(w)]
    if recursion(request):
        return sync(found)
    return sync([f"/1.0/warnings/{w['uuid']}" for w in found])


@router.get("/1.0/warnings/{uuid}", access=Access.TRUSTED)
async def get_warning(request: Request, uuid: str) -> Response:
    return sync(await _lookup(request, uuid))


async def _set_status(request: Request, uuid: str) -> Response:
    services = get_services(request)
    await _lookup(request, uuid)
    body = await parse(request, WarningPut)
    await services.warnings.set_status(uuid, body.status)
    action = "warning-acknowledged" if body.status == "acknowledged" else "warning-reset"
    services.events.lifecycle(action, f"/1.0/warnings/{uuid}", requestor=requestor(request))
    return sync({})


@router.put("/1.0/warnings/{uuid}", access=Access.TRUSTED)
async def put_warning(request: Request, uuid: str) -> Response:
    return await _set_status(request, uuid)


@router.patch("/1.0/warnings/{uuid}", access=Access.TRUSTED)
async def patch_warning(request: Request, uuid: str) -> Response:
    return await _set_status(request, uuid)


@router.delete("/1.0/warnings/{uuid}", access=Access.TRUSTED)
async def delete_warning(request: Request, uuid: str) -> Response:
    services = get_services(request)
    await _lookup(request, uuid)
    await services.warnings.delete(uuid)
    services.events.lifecycle("warning-deleted", f"/1.0/warnings/{uuid}", requestor=requestor(request))
    return sync({})
