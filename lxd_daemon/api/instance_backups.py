"""`/1.0/instances/{name}/backups` (and `/1.0/containers/...`): create (an operation writing the
tarball), list, get, rename, delete, and `.../export` (the file); and `lxc import`: a POST to
`/1.0/instances` whose body is a backup tarball (application/octet-stream, `X-LXD-pool`,
`X-LXD-name`), which instances.create_instance hands to import_instance()."""

from __future__ import annotations

import asyncio
import logging
import os
import time

from fastapi import APIRouter, Request
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from lxd_daemon.api import socket_body
from lxd_daemon.api.envelope import async_, sync
from lxd_daemon.api.request import parse, recursion
from lxd_daemon.errors import BadRequest
from lxd_daemon.services import get_services, requestor
from lxd_daemon.wire.backups import BackupPost, InstanceBackupsPost

log = logging.getLogger("lxd.backups")
router = APIRouter()
PREFIXES = ("/1.0/instances", "/1.0/containers")


def route(method: str, suffix: str):
    """Register a handler under both prefixes; it receives `prefix` as its first argument."""

    def deco(fn):
        import inspect

        sig = inspect.signature(fn)
        sig = sig.replace(parameters=[p for p in sig.parameters.values() if p.name != "prefix"])
        for prefix in PREFIXES:
            async def handler(request: Request, _fn=fn, _prefix=prefix, **kw):
                return await _fn(_prefix, request, **kw)

            handler.__signature__ = sig
            router.add_api_route(prefix + suffix, handler, methods=[method], name=f"backups:{method}:{prefix}{suffix}")
        return fn

    return deco


def _resources(name: str, backup: str | None = None) -> dict:
    out = {"instances": [f"/1.0/instances/{name}"], "containers": [f"/1.0/containers/{name}"]}
    if backup:
        out["backups"] = [backup]  # the bare name: the stock client builds .../backups/<it>/export
    return out


def _svc(request: Request):
    return get_services(request).backups


@route("GET", "/{name}/backups")
async def list_backups(prefix: str, request: Request, name: str) -> Response:
    rows = await _svc(request).list(name)
    if recursion(request) == 0:
        return sync([f"{prefix}/{name}/backups/{r.name}" for r in rows])
    return sync([_svc(request).render(name, r) for r in rows])


@route("POST", "/{name}/backups")
async def create_backup(prefix: str, request: Request, name: str) -> Response:
    services = get_services(request)
    svc = services.backups
    body = await parse(request, InstanceBackupsPost)
    from lxd_daemon.backups.service import parse_expiry

    bname = body.name or await svc.next_name(name)
    compression = await svc.check_create(name, bname, body.compression_algorithm)
    expires_at = parse_expiry(body.expires_at)
    only = body.instance_only or body.container_only
    who = requestor(request)

    async def run(op):
        await svc.create(name, bname, expires_at=expires_at, instance_only=only,
                         optimized=body.optimized_storage, compression=compression)
        services.events.lifecycle("instance-backup-created", f"/1.0/instances/{name}/backups/{bname}",
                                  requestor=who)

    op = services.ops.create(description="Backing up instance", resources=_resources(name, bname), run=run)
    return async_(op.render())


@route("GET", "/{name}/backups/{backup}")
async def get_backup(prefix: str, request: Request, name: str, backup: str) -> Response:
    svc = _svc(request)
    return sync(svc.render(name, await svc.get(name, backup)))


@route("POST", "/{name}/backups/{backup}")
async def rename_backup(prefix: str, request: Request, name: str, backup: str) -> Response:
    services = get_services(request)
    svc = services.backups
    await svc.get(name, backup)
    body = await parse(request, BackupPost)
    if not body.name:
        raise BadRequest("A new name is required")
    who = requestor(request)

    async def run(op):
        await svc.rename(name, backup, body.name)
        services.events.lifecycle("instance-backup-renamed", f"/1.0/instances/{name}/backups/{body.name}",
                                  {"old_name": backup}, requestor=who)

    op = services.ops.create(description="Renaming instance backup", resources=_resources(name, backup), run=run)
    return async_(op.render())


@route("DELETE", "/{name}/backups/{backup}")
async def delete_backup(prefix: str, request: Request, name: str, backup: str) -> Response:
    services = get_services(request)
    svc = services.backups
    await svc.get(name, backup)
    who = requestor(request)

    async def run(op):
        await svc.delete(name, backup)
        services.events.lifecycle("instance-backup-deleted", f"/1.0/instances/{name}/backups/{backup}",
                                  requestor=who)

    op = services.ops.create(description="Deleting instance backup", resources=_resources(name, backup), run=run)
    return async_(op.render())


@route("GET", "/{name}/backups/{backup}/export")
async def export_backup(prefix: str, request: Request, name: str, backup: str) -> Response:
    from lxd_daemon.api.images import FileParts

    services = get_services(request)
    f, size = await services.backups.open_file(name, backup)
    services.events.lifecycle("instance-backup-retrieved", f"/1.0/instances/{name}/backups/{backup}",
                              requestor=requestor(request))
    return FileParts([(f, size)], media_type="application/octet-stream",
                     headers={"Content-Disposition": f"attachment;filename={backup}"})


# -- uploads (lxc import, lxc storage volume import) -------------------------------------------------
async def receive_upload(request: Request, path) -> int:
    """Write the request body to `path` (a new file) without holding it in memory: spliced from the
    socket when the connection allows it, else chunk by chunk."""
    fd = await asyncio.to_thread(os.open, path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        body = await socket_body.take(request, 0)
        if body is not None:
            return await body.copy_to(fd)
        total = 0
        try:
            async for chunk in request.stream():
                if chunk:
                    await asyncio.to_thread(socket_body._write_all, fd, memoryview(chunk))
                    total += len(chunk)
        except ClientDisconnect:
            raise BadRequest("The upload was interrupted") from None
        return total
    finally:
        await asyncio.to_thread(os.close, fd)


async def import_instance(prefix: str, request: Request) -> Response:
    """`lxc import FILE [NAME] [--storage POOL]`: the body is the backup tarball."""
    services = get_services(request)
    svc = services.backups
    pool = request.headers.get("x-lxd-pool", "")
    new_name = request.headers.get("x-lxd-name", "")
    upload = svc.new_upload()
    t0 = time.monotonic()
    try:
        size = await receive_upload(request, upload)
        if size == 0:
            raise BadRequest("The backup file is empty")
        t1 = time.monotonic()
        plan = await svc.prepare_import(upload, pool, new_name)
        log.debug("import checked", extra={"bytes": size, "upload_ms": round((t1 - t0) * 1000),
                                           "scan_ms": round((time.monotonic() - t1) * 1000)})
    except BaseException:
        await svc.discard_upload(upload)
        raise
    who = requestor(request)
    name = plan.name

    async def run(op):
        t2 = time.monotonic()
        try:
            await svc.run_import(plan)
        finally:
            services.instances.release(name)
            await svc.discard_upload(plan)
        log.debug("imported", extra={"instance": name, "create_ms": round((time.monotonic() - t2) * 1000)})
        services.events.lifecycle("instance-created", f"/1.0/instances/{name}",
                                  {"type": "container", "storage-pool": plan.pool.name}, requestor=who)

    op = services.ops.create(description="Creating instance",
                             resources={"instances": [f"/1.0/instances/{name}"],
                                        "containers": [f"/1.0/containers/{name}"]}, run=run)
    return async_(op.render())


@router.post("/internal/backups/expire")
async def expire_now(request: Request) -> Response:
    """Run the expiry pass now (the task runs it each minute); returns what it deleted."""
    from lxd_daemon.errors import Forbidden

    if request.scope.get("lxd_protocol") == "tls":
        raise Forbidden("Internal endpoints are only served on the unix socket")
    backups = get_services(request).backups
    gone = await backups.expire()
    await backups.prune_orphans()
    if get_services(request).storage is not None:
        gone += await backups.volumes.expire()
    return sync(gone)
