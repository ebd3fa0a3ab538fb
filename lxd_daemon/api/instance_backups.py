"""`/1.0/instances/{name}/backups` (and `/1.0/containers/...`): create (an operation writing the
tarball), list, get, rename, delete, and `.../export` (the file); and `lxc import`: a POST to
`/1.0/instances` whose body is a backup tarball (application/octet-stream, `X-LXD-pool`,
`X-LXD-name`), which instances.create_instance hands to import_instance()."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time

from fastapi import Request
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from lxd_daemon.api import socket_body
from lxd_daemon.api.access import Access, Routes
from lxd_daemon.api.envelope import async_, sync
from lxd_daemon.api.instances import instance_key, instance_routes, project_name
from lxd_daemon.api.request import parse, recursion
from lxd_daemon.errors import BadRequest, LXDError
from lxd_daemon.projects.naming import query
from lxd_daemon.services import get_services, requestor
from lxd_daemon.wire.backups import BackupPost, InstanceBackupsPost

log = logging.getLogger("lxd.backups")
router = Routes()
UPLOAD_BATCH = 1 << 20


route = instance_routes(router)


def _resources(project: str, name: str, backup: str | None = None) -> dict:
    q = query(project)
    out = {"instances": [f"/1.0/instances/{name}{q}"], "containers": [f"/1.0/containers/{name}{q}"]}
    if backup:
        out["backups"] = [backup]  # the bare name: the stock client builds .../backups/<it>/export
    return out


def _svc(request: Request):
    return get_services(request).backups


def _url(project: str, name: str, backup: str) -> str:
    return f"/1.0/instances/{name}/backups/{backup}{query(project)}"


@route("GET", "/{name}/backups", access=Access.TRUSTED)
async def list_backups(prefix: str, request: Request, name: str) -> Response:
    key = instance_key(request, name)
    rows = await _svc(request).list(key)
    if recursion(request) == 0:
        q = query(project_name(request))
        return sync([f"{prefix}/{name}/backups/{r.name}{q}" for r in rows])
    return sync([_svc(request).render(name, r) for r in rows])


@route("POST", "/{name}/backups", access=Access.TRUSTED)
async def create_backup(prefix: str, request: Request, name: str) -> Response:
    services = get_services(request)
    svc = services.backups
    project = project_name(request)
    key = instance_key(request, name)
    body = await parse(request, InstanceBackupsPost)
    from lxd_daemon.backups.service import parse_expiry

    bname = body.name or await svc.next_name(key)
    compression = await svc.check_create(key, bname, body.compression_algorithm)
    expires_at = parse_expiry(body.expires_at)
    only = body.instance_only or body.container_only
    who = requestor(request)

    async def run(op):
        await svc.create(key, bname, expires_at=expires_at, instance_only=only,
                         optimized=body.optimized_storage, compression=compression)
        services.events.lifecycle("instance-backup-created", _url(project, name, bname), requestor=who,
                                  project=project)

    op = services.ops.create(description="Backing up instance", resources=_resources(project, name, bname), run=run,
                             project=project)
    return async_(op.render())


@route("GET", "/{name}/backups/{backup}", access=Access.TRUSTED)
async def get_backup(prefix: str, request: Request, name: str, backup: str) -> Response:
    svc = _svc(request)
    return sync(svc.render(name, await svc.get(instance_key(request, name), backup)))


@route("POST", "/{name}/backups/{backup}", access=Access.TRUSTED)
async def rename_backup(prefix: str, request: Request, name: str, backup: str) -> Response:
    services = get_services(request)
    svc = services.backups
    project = project_name(request)
    key = instance_key(request, name)
    await svc.get(key, backup)
    body = await parse(request, BackupPost)
    if not body.name:
        raise BadRequest("A new name is required")
    who = requestor(request)

    async def run(op):
        await svc.rename(key, backup, body.name)
        services.events.lifecycle("instance-backup-renamed", _url(project, name, body.name),
                                  {"old_name": backup}, requestor=who, project=project)

    op = services.ops.create(description="Renaming instance backup", resources=_resources(project, name, backup),
                             run=run, project=project)
    return async_(op.render())


@route("DELETE", "/{name}/backups/{backup}", access=Access.TRUSTED)
async def delete_backup(prefix: str, request: Request, name: str, backup: str) -> Response:
    services = get_services(request)
    svc = services.backups
    project = project_name(request)
    key = instance_key(request, name)
    await svc.get(key, backup)
    who = requestor(request)

    async def run(op):
        await svc.delete(key, backup)
        services.events.lifecycle("instance-backup-deleted", _url(project, name, backup), requestor=who,
                                  project=project)

    op = services.ops.create(description="Deleting instance backup", resources=_resources(project, name, backup),
                             run=run, project=project)
    return async_(op.render())


@route("GET", "/{name}/backups/{backup}/export", access=Access.TRUSTED)
async def export_backup(prefix: str, request: Request, name: str, backup: str) -> Response:
    from lxd_daemon.api.images import FileParts

    services = get_services(request)
    project = project_name(request)
    f, size, follow = await services.backups.open_export(instance_key(request, name), backup)
    services.events.lifecycle("instance-backup-retrieved", _url(project, name, backup),
                              requestor=requestor(request), project=project)
    headers = {"Content-Disposition": f"attachment;filename={backup}"}
    if follow is not None:
        return FollowedFile(f, size, follow, headers)
    return FileParts([(f, size)], media_type="application/octet-stream", headers=headers)


class FollowedFile(Response):
    """A backup file still being written (backups.create.StreamedBackup), sent as its writer
    goes, with the Content-Length of the whole: with sendfile from a thread when the connection
    allows it, else in chunks. If the writing fails, the response ends short of its length and
    the connection closes: the client reports the download as failed, it never gets a short
    file that looks complete."""

    CHUNK = 4 << 20

    def __init__(self, f, size: int, follow, headers: dict[str, str]):
        super().__init__(media_type="application/octet-stream", headers=headers)
        self.f = f
        self.size = size
        self.follow = follow
        self.headers["content-length"] = str(size)

    async def __call__(self, scope, receive, send) -> None:
        sender = socket_body.FileSender.open(receive) if scope.get("method") == "GET" else None
        try:
            self.headers["connection"] = "close"
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            if scope.get("method") == "HEAD":
                await send({"type": "http.response.body", "body": b""})
                return
            if sender is not None and sender.headers_flushed():
                try:
                    await sender.send_body([(self.f, self.size, self.follow)])
                except (OSError, LXDError) as e:  # the writing failed, or the client went away
                    log.warning("export of a backup being written ended early: %s", e)
                finally:
                    sender.completed()  # uvicorn ends the response (short, if it failed) and closes
                await send({"type": "http.response.body", "body": b""})
                return
            fd, offset = self.f.fileno(), 0
            while offset < self.size:
                avail = min(self.size, await asyncio.to_thread(self.follow.wait, fd, offset))
                data = await asyncio.to_thread(os.pread, fd, min(self.CHUNK, avail - offset), offset)
                offset += len(data)
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            if sender is not None:
                sender.close()
            self.f.close()


# -- uploads (lxc import, lxc storage volume import) -------------------------------------------------
async def receive_upload(request: Request, path, on_body=None) -> int:
    """Write the request body to `path` (a new file) without holding it in memory: spliced from the
    socket when the connection allows it, else chunk by chunk. on_body(body) is told the
    socket_body.SocketBody that does it, if any, before it starts."""
    fd = await asyncio.to_thread(os.open, path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        # (A chunked body, as `lxc import` sends, is taken over too: decoded in a thread.)
        body = await socket_body.take(request, 0, chunked=True)
        if body is not None:
            if on_body is not None:
                on_body(body)
            try:
                return await body.copy_to(fd)
            except ClientDisconnect:
                raise BadRequest("The upload was interrupted") from None
        # (Where the body can't be taken over: gathered into big writes, not one thread hop
        # per ASGI piece.)
        total = 0
        batch: list[bytes] = []
        pending = 0
        try:
            async for chunk in request.stream():
                if chunk:
                    batch.append(chunk)
                    pending += len(chunk)
                if pending >= UPLOAD_BATCH or len(batch) >= 512:
                    total += await asyncio.to_thread(_writev_all, fd, batch)
                    batch, pending = [], 0
        except ClientDisconnect:
            raise BadRequest("The upload was interrupted") from None
        if batch:
            total += await asyncio.to_thread(_writev_all, fd, batch)
        return total
    finally:
        await asyncio.to_thread(os.close, fd)


def _writev_all(fd: int, pieces: list[bytes]) -> int:
    """Write the pieces in order (one writev where the file takes them all)."""
    total = sum(len(p) for p in pieces)
    done = os.writev(fd, pieces)
    if done < total:  # a short write: the rest one piece at a time
        rest = memoryview(b"".join(pieces))[done:]
        socket_body._write_all(fd, rest)
    return total


async def import_instance(prefix: str, request: Request) -> Response:
    """`lxc import FILE [NAME] [--storage POOL]`: the body is the backup tarball."""
    services = get_services(request)
    svc = services.backups
    project = project_name(request)  # `lxc import --project P`: the instance lands in P
    pool = request.headers.get("x-lxd-pool", "")
    new_name = request.headers.get("x-lxd-name", "")
    upload = svc.new_upload()
    t0 = time.monotonic()
    # The tarball is checked (and an optimised one received) while it arrives: the scan follows
    # the upload's file (restore.GrowingFile).
    from lxd_daemon.backups.restore import GrowingFile

    growing = GrowingFile(upload)

    async def receive() -> int:
        try:
            n = await receive_upload(request, upload, growing.set_router)
        except BaseException as e:
            growing.fail(e)
            raise
        growing.finish()
        log.debug("import uploaded", extra={"bytes": n, "upload_ms": round((time.monotonic() - t0) * 1000),
                                            "chunked": "transfer-encoding" in request.headers})
        return n

    uploading = asyncio.ensure_future(receive())
    try:
        try:
            plan = await svc.prepare_import(upload, project, pool, new_name, source=growing)
        except BaseException as e:
            # The rest of the body is still read (the client gets the answer, not a broken
            # pipe); an interrupted upload says best what went wrong.
            growing.stop()
            try:
                await uploading
            except BadRequest as ue:
                if not isinstance(e, asyncio.CancelledError):
                    raise ue from None
            except BaseException:
                pass
            raise
        t1 = time.monotonic()
        try:
            size = await uploading
        except BaseException:
            if plan.received is not None:
                with contextlib.suppress(Exception):
                    await services.storage.volumes._delete_now(plan.pool, plan.received)
            services.instances.release(plan.name)
            services.instances._idmap_claims.pop(plan.name, None)
            raise
        log.debug("import checked", extra={"bytes": size, "upload_and_scan_ms": round((t1 - t0) * 1000)})
    except BaseException:
        if not uploading.done():
            uploading.cancel()
            with contextlib.suppress(BaseException):
                await uploading
        await svc.discard_upload(upload)
        raise
    finally:
        growing.dispose()
    who = requestor(request)
    name = plan.name  # the key
    api_name = plan.api_name

    async def run(op):
        t2 = time.monotonic()
        try:
            await svc.run_import(plan)
        finally:
            services.instances.release(name)
            await svc.discard_upload(plan)
        log.debug("imported", extra={"instance": name, "create_ms": round((time.monotonic() - t2) * 1000)})
        services.events.lifecycle("instance-created", f"/1.0/instances/{api_name}{query(project)}",
                                  {"type": "container", "storage-pool": plan.pool.name}, requestor=who,
                                  project=project)

    op = services.ops.create(description="Creating instance", resources=_resources(project, api_name), run=run,
                             project=project)
    return async_(op.render())


@router.post("/internal/backups/expire", access=Access.LOCAL)
async def expire_now(request: Request) -> Response:
    """Run the expiry pass now (the task runs it each minute); returns what it deleted."""
    backups = get_services(request).backups
    gone = await backups.expire()
    await backups.prune_orphans()
    if get_services(request).storage is not None:
        gone += await backups.volumes.expire()
    return sync(gone)
