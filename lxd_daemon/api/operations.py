"""`/1.0/operations`: list, get, cancel, wait and websocket connect."""

from __future__ import annotations

import logging

from fastapi import Request, WebSocket
from starlette.responses import Response

from lxd_daemon.api.access import Access, Routes, is_trusted
from lxd_daemon.api.envelope import error, sync
from lxd_daemon.api.request import recursion
from lxd_daemon.errors import BadRequest, Forbidden, LXDError
from lxd_daemon.services import get_services, requestor

router = Routes()
log = logging.getLogger("lxd.api")


@router.get("/1.0/operations", access=Access.TRUSTED)
async def list_operations(request: Request) -> Response:
    ops = get_services(request).ops
    full = recursion(request) > 0
    out: dict[str, list] = {}
    for op in ops.list():
        key = op.status.label.lower()
        out.setdefault(key, []).append(op.render() if full else op.url)
    return sync(out)


@router.get("/1.0/operations/{op_id}", access=Access.TRUSTED)
async def get_operation(request: Request, op_id: str) -> Response:
    return sync(get_services(request).ops.get(op_id).render())


@router.delete("/1.0/operations/{op_id}", access=Access.TRUSTED)
async def cancel_operation(request: Request, op_id: str) -> Response:
    op = get_services(request).ops.get(op_id)
    await op.cancel()
    get_services(request).events.lifecycle("operation-cancelled", op.url, requestor=requestor(request),
                                            project=op.project)
    return sync({})


@router.get("/1.0/operations/{op_id}/wait", access=Access.GUARDED)
async def wait_operation(request: Request, op_id: str) -> Response:
    """An untrusted client may wait for an operation whose secret it holds (an image it pushes)."""
    op = get_services(request).ops.get(op_id) if is_trusted(request) else _by_secret(request, op_id)
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
    services = get_services(websocket)
    try:
        op = services.ops.get(op_id)
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
