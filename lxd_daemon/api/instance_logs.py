"""`/1.0/instances/{name}/logs`: the instance's log files (lxc.log, lxc.conf, ...)."""

from __future__ import annotations

import asyncio
import os
import re

from fastapi import Request
from starlette.responses import FileResponse, Response

from lxd_daemon.api.access import Access
from lxd_daemon.api.envelope import sync
from lxd_daemon.api.instances import instance_key, route, router
from lxd_daemon.errors import BadRequest, NotFound
from lxd_daemon.services import get_services

__all__ = ["router"]

VALID = re.compile(r"^(lxc\.log|lxc\.conf|console\.log|forkstart\.log|(migration|snapshot|exec)_[A-Za-z0-9._-]+)$")
UNDELETABLE = ("lxc.log", "lxc.conf")


def _check(file: str) -> None:
    if not VALID.fullmatch(file) or "/" in file or file.startswith("."):
        raise BadRequest(f"Invalid log file name {file!r}")


@route("GET", "/{name}/logs", access=Access.TRUSTED)
async def list_logs(prefix: str, request: Request, name: str) -> Response:
    svc = get_services(request).instances
    key = instance_key(request, name)
    logdir = svc.logs_root / key
    if key not in svc.records and not logdir.is_dir():
        raise NotFound("Instance not found")

    def ls():
        try:
            return sorted(e for e in os.listdir(logdir) if VALID.match(e))
        except OSError:
            return []

    # (no `?project=` here: as LXD's, and the stock client takes the names from these URLs)
    return sync([f"{prefix}/{name}/logs/{f}" for f in await asyncio.to_thread(ls)])


async def _existing_log(request: Request, name: str, file: str):
    """The path of one of the instance's log files. `name` and `file` were checked as names
    (lxd_daemon.names); the file must also be one that the instance's log directory holds."""
    _check(file)
    svc = get_services(request).instances
    logdir = svc.logs_root / instance_key(request, name)

    def present() -> bool:
        try:
            return file in os.listdir(logdir) and (logdir / file).is_file()
        except OSError:
            return False

    if not await asyncio.to_thread(present):
        raise NotFound("Log file not found")
    return logdir / file


@route("GET", "/{name}/logs/{file}", access=Access.TRUSTED)
async def get_log(prefix: str, request: Request, name: str, file: str) -> Response:
    path = await _existing_log(request, name, file)
    return FileResponse(path, media_type="application/octet-stream")


@route("DELETE", "/{name}/logs/{file}", access=Access.TRUSTED)
async def delete_log(prefix: str, request: Request, name: str, file: str) -> Response:
    _check(file)
    if file in UNDELETABLE:
        raise BadRequest("lxc.log and lxc.conf may not be deleted")
    path = await _existing_log(request, name, file)
    await asyncio.to_thread(path.unlink)
    return sync({})
