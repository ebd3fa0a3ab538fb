"""`/internal/*`: used by the `lxd` command itself (waitready, shutdown, recover), and one pass of
the snapshot schedulers at a given time (what they run each minute; for tests and scripts)."""

from __future__ import annotations

import datetime as dt

from fastapi import Request
from starlette.responses import Response

from lxd_daemon.api.access import Access, Routes
from lxd_daemon.api.envelope import sync
from lxd_daemon.api.request import read_json
from lxd_daemon.errors import BadRequest
from lxd_daemon.services import get_services
from lxd_daemon.util.timefmt import parse_rfc3339

router = Routes()


@router.get("/internal/ready", access=Access.LOCAL)
async def ready(request: Request) -> Response:
    return sync({})


@router.put("/internal/shutdown", access=Access.LOCAL)
async def shutdown(request: Request) -> Response:
    get_services(request).request_stop("shutdown")
    return sync({})


def _recover_service(request: Request):
    services = get_services(request)
    svc = services.recover
    if svc is None:
        from lxd_daemon.recover import RecoverService

        svc = services.recover = RecoverService(services)
    return svc


async def _recover_pools(request: Request) -> list:
    body = await read_json(request, default={})
    if not isinstance(body, dict):
        raise BadRequest("Invalid request: a JSON object with 'pools' is expected")
    return body.get("pools") or []


# LXD's internalRecoverValidatePost / internalRecoverImportPost: {"pools": [StoragePoolsPost]}
# (existing pools by name only); the validation answers internalRecoverValidateResult.
@router.post("/internal/recover/validate", access=Access.LOCAL)
async def recover_validate(request: Request) -> Response:
    return sync(await _recover_service(request).validate(await _recover_pools(request)))


@router.post("/internal/recover/import", access=Access.LOCAL)
async def recover_import(request: Request) -> Response:
    return sync(await _recover_service(request).import_(await _recover_pools(request)))


async def _tick_time(request: Request) -> dt.datetime:
    """`{"now": RFC 3339}` of a scheduler tick (default: the current time)."""
    body = await read_json(request, default={}) or {}
    if not isinstance(body, dict):
        raise BadRequest("Expected a JSON object")
    raw = body.get("now")
    if raw is None:
        return dt.datetime.now(dt.UTC)
    try:
        return dt.datetime.fromtimestamp(parse_rfc3339(str(raw)), dt.UTC)
    except (ValueError, OverflowError):
        raise BadRequest(f"Invalid time {raw!r}") from None


@router.post("/internal/snapshots/tick", access=Access.LOCAL)
async def instance_snapshots_tick(request: Request) -> Response:
    """One pass of the instance snapshot scheduler (snapshots due, expired ones deleted)."""
    now = await _tick_time(request)
    return sync(await get_services(request).snapshots.run_due(now))


@router.post("/internal/storage-volumes/snapshots/tick", access=Access.LOCAL)
async def volume_snapshots_tick(request: Request) -> Response:
    """One pass of the custom volume snapshot scheduler."""
    now = await _tick_time(request)
    return sync(await get_services(request).storage.custom.run_schedules(now=now))


@router.post("/internal/storage/usage-check", access=Access.LOCAL)
async def storage_usage_check(request: Request) -> Response:
    """One pass of the storage pool usage check ("Storage pool nearly full"), as run every 5 minutes."""
    return sync(await get_services(request).storage.usage_check.check())


# -- image servers: one auto-update or cache-expiry pass now (images/updater.py) ---------------------

@router.post("/internal/images/auto-update", access=Access.LOCAL)
async def auto_update_now(request: Request) -> Response:
    """One auto-update pass now, whatever images.auto_update_interval says (for tests and scripts)."""
    return sync(await get_services(request).images.updater.auto_update())


@router.post("/internal/images/expire", access=Access.LOCAL)
async def expire_now(request: Request) -> Response:
    """One remote-cache expiry pass, at `{"now": RFC 3339}` (default: now)."""
    now = await _tick_time(request)
    return sync(await get_services(request).images.updater.expire(now.timestamp()))
