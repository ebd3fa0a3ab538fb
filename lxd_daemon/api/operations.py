"""`/1.0/operations`: list, get, cancel, wait and websocket connect.

Operations belong to a project (that of the object they act on). A list shows the request's
project's, or with `all-projects=true` those of every project the caller may see. A restricted
certificate reaches only the operations of its projects: any other is "not found", as a missing
one is (an untrusted client holding an operation's secret still reaches it by the secret)."""

from __future__ import annotations

import logging

from fastapi import Request, WebSocket
from starlette.requests import HTTPConnection
from starlette.responses import Response

from lxd_daemon.api.access import Access, Routes, is_trusted, visible_projects
from lxd_daemon.api.envelope import error, sync
from lxd_daemon.api.request import listed_projects, recursion
from lxd_daemon.errors import BadRequest, Forbidden, LXDError, NotFound
from lxd_daemon.services import get_services, requestor

router = Routes()
log = logging.getLogger("lxd.api")


@router.get("/1.0/operations", access=Access.TRUSTED)
async def list_operations(request: Request) -> Response:
    ops = get_services(request).ops
    full = recursion(request) > 0
    projects = set(listed_projects(request))
    out: dict[str, list] = {}
    for op in ops.list():
        if op.project not in projects:
            continue
        key = op.status.label.lower()
        out.setdefault(key, []).append(op.render() if full else op.url)
    return sync(out)


def _operation(conn: HTTPConnection, op_id: str):
    """The operation, if the caller may see it: 404 "Operation not found" otherwise."""
    op = get_services(conn).ops.get(op_id)
    visible = visible_projects(conn)
    if visible is not None and op.project not in visible:
        raise NotFound("Operation not found")
    return op


@router.get("/1.0/operations/{op_id}", access=Access.TRUSTED)
async def get_operation(request: Request, op_id: str) -> Response:
    return sync(_operation(request, op_id).render())


@router.delete("/1.0/operations/{op_id}", access=Access.TRUSTED)
async def cancel_operation(request: Request, op_id: str) -> Response:
    op = _operation(request, op_id)
    await op.cancel()
    get_services(request).events.lifecycle("operation-cancelled", op.url, requestor=requestor(request),
                                            project=op.project)
    return sync({})


@router.get("/1.0/operations/{op_id}/wait", access=Access.GUARDED)
async def wait_operation(request: Request, op_id: str) -> Response:
    """An untrusted client may wait for an operation whose secret it holds (an image it pushes)."""
    op = _operation(request, op_id) if is_trusted(request) else _by_secret(request, op_id)
    raw = request.query_params.get("timeout", "-1") or "-1"
    try:
        timeout = float(raw)
    except ValueError:
        raise BadRequest(f"Invalid timeout value {raw!r}") from None
    await op.wait(None if timeout < 0 else timeout)
    return sync(op.render())


def _by_secret(request: Request, op_id: str):
    secret = request.query_params.get("secret", "")
    try:
        op = get_services(request).ops.get(op_id)
    except LXDError:
        op = None
    known = set(getattr(op, "secrets", ()) or ())
    meta = getattr(op, "metadata", None)
    if isinstance(meta, dict) and isinstance(meta.get("secret"), str):
        known.add(meta["secret"])
    if op is None or not secret or secret not in known:
        raise Forbidden("not authorized")
    return op


# The secret is checked for every client, trusted or not: it names the stream.
@router.websocket("/1.0/operations/{op_id}/websocket", access=Access.GUARDED)
async def operation_websocket(websocket: WebSocket, op_id: str) -> None:
    try:
        op = _operation(websocket, op_id) if is_trusted(websocket) else get_services(websocket).ops.get(op_id)
        op.check_secret(websocket.query_params.get("secret"))
    except LXDError as e:
        await websocket.send_denial_response(error(e.status, e.message))
        return
    await websocket.accept()
    try:
        await op.connect(websocket.query_params["secret"], websocket)
    except LXDError as e:
        log.info("websocket connect refused: %s", e.message)
        await websocket.close(code=1008)
