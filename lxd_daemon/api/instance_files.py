"""`/1.0/instances/{name}/files` (and `/1.0/containers/...`): pull, push, list, delete.

Contents stream both ways in large chunks through worker threads (never buffered whole, never
blocking the event loop); a large pushed body with a Content-Length is spliced from the socket
into the file (lxd_daemon.api.socket_body). Path handling and its safety live in
lxd_daemon.instances.files.
"""

from __future__ import annotations

import asyncio
import contextlib
import os

from fastapi import Request
from starlette.responses import Response, StreamingResponse

from lxd_daemon.api import socket_body
from lxd_daemon.api.access import STREAM, Access, Routes
from lxd_daemon.api.envelope import sync
from lxd_daemon.api.instances import instance_key
from lxd_daemon.api.request import read_body
from lxd_daemon.errors import BadRequest, NotFound, out_of_space, storage_errors
from lxd_daemon.instances import files
from lxd_daemon.projects.naming import query
from lxd_daemon.services import get_services, requestor

router = Routes()

READ_CHUNK = 1 << 20
WRITE_BATCH = 4 << 20
SYMLINK_LIMIT = 4096
PREFIXES = ("/1.0/instances", "/1.0/containers")


async def get_instance(request: Request, name: str):
    """The services and the Instance (instances.models) of the request's project named `name`:
    `inst.name` is its key (host-facing), `inst.api_name` and `inst.project` what the API shows."""
    services = get_services(request)
    if services.instances is None:
        raise NotFound("Instance not found")
    return services, await services.instances.get(instance_key(request, name))


def instance_url(inst, suffix: str = "") -> str:
    """The API URL of an Instance (or of something under it), with its project."""
    return f"/1.0/instances/{inst.api_name}{suffix}{query(inst.project)}"


def lifecycle(request: Request, services, inst, action: str, context: dict | None = None) -> None:
    """A lifecycle event about an Instance: its URL as source, its project."""
    services.events.lifecycle(action, instance_url(inst), context or {}, requestor=requestor(request),
                              project=inst.project)


def _root(inst) -> files.Root:
    return files.Root(inst.rootfs, getattr(inst, "disk_idmap", None))


def _with_root(inst, fn, *args, **kw):
    with _root(inst) as root:
        return fn(root, *args, **kw)


def _lifecycle(request: Request, services, inst, action: str, path: str) -> None:
    lifecycle(request, services, inst, action, {"path": path})


async def _file_body(fd: int):
    """Read the file in a thread, one chunk ahead of the chunk being sent."""
    try:
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        pending = asyncio.ensure_future(asyncio.to_thread(os.read, fd, READ_CHUNK))
        while True:
            data = await pending
            if not data:
                break
            pending = asyncio.ensure_future(asyncio.to_thread(os.read, fd, READ_CHUNK))
            yield data
    finally:
        os.close(fd)


async def files_get(request: Request, name: str) -> Response:
    services, inst = await get_instance(request, name)
    path = request.query_params.get("path")
    head = request.method == "HEAD"
    entry = await asyncio.to_thread(_with_root, inst, files.stat_entry, path, open_file=not head)
    headers = entry.headers()
    if not head:
        _lifecycle(request, services, inst, "instance-file-retrieved", path)
    if entry.type == "directory":
        if head:
            return Response(status_code=200, headers=headers, media_type="application/json")
        return _sync_with(entry.names, headers)
    if entry.type == "symlink":
        return Response(b"" if head else entry.target, media_type="application/octet-stream", headers=headers)
    headers["Content-Length"] = str(entry.size)
    if head:
        return Response(status_code=200, headers=headers, media_type="application/octet-stream")
    return StreamingResponse(_file_body(entry.fd), media_type="application/octet-stream", headers=headers)


def _sync_with(metadata, headers: dict[str, str]) -> Response:
    resp = sync(metadata)
    resp.headers.update(headers)
    return resp


def _write_all(fd: int, chunks: list[bytes]) -> None:
    """writev() the chunks as they came (no joining copy), finishing any short write."""
    bufs = [memoryview(c) for c in chunks]
    while bufs:
        n = os.writev(fd, bufs[:512])
        while n and bufs:
            if n >= len(bufs[0]):
                n -= len(bufs[0])
                bufs.pop(0)
            else:
                bufs[0] = bufs[0][n:]
                n = 0


async def _receive_into(request: Request, fd: int) -> int:
    """Write the request body to fd: spliced from the socket when it can be, else streamed."""
    body = await socket_body.take(request)
    if body is not None:
        return await body.copy_to(fd)  # drains the socket itself when the file is full
    try:
        return await _stream_into(request, fd)
    except OSError as e:
        if out_of_space(e):
            await _discard_body(request)
        raise


async def _stream_into(request: Request, fd: int) -> int:
    """Stream the request body into fd: batches are written in a thread while the next one arrives."""
    pending: asyncio.Future | None = None
    batch: list[bytes] = []
    size = total = 0
    try:
        async for chunk in request.stream():
            if not chunk:
                continue
            batch.append(chunk)
            size += len(chunk)
            total += len(chunk)
            if size >= WRITE_BATCH:
                data, batch, size = batch, [], 0
                if pending is not None:
                    await pending
                pending = asyncio.ensure_future(asyncio.to_thread(_write_all, fd, data))
        if pending is not None:
            await pending
            pending = None
        if batch:
            await asyncio.to_thread(_write_all, fd, batch)
    finally:
        if pending is not None and not pending.done():
            with contextlib.suppress(BaseException):
                await pending
    return total


async def files_post(request: Request, name: str) -> Response:
    services, inst = await get_instance(request, name)
    path = request.query_params.get("path")
    spec = files.parse_headers(request.headers)
    async with services.instances.volume_writes(inst.name):
        if spec.type == "directory":
            await read_body(request, SYMLINK_LIMIT)
            await asyncio.to_thread(_with_root, inst, files.mkdir, path, spec)
        elif spec.type == "symlink":
            target = await read_body(request, SYMLINK_LIMIT)
            await asyncio.to_thread(_with_root, inst, files.symlink, path, target, spec)
        else:
            await _push_file(request, inst, path, spec)
    _lifecycle(request, services, inst, "instance-file-pushed", path)
    return sync({})


async def _push_file(request: Request, inst, path: str | None, spec: files.WriteSpec) -> None:
    """Write the body to the file at path. After a failure a new file is removed again, and an
    existing one keeps what was written (as if it had been truncated first). Running out of
    space or quota is a 507 naming the instance's storage."""
    fd, created = await asyncio.to_thread(_with_root, inst, files.open_for_write, path, spec)
    try:
        with storage_errors(f"instance {inst.api_name!r}", inst.rootfs):
            await _receive_into(request, fd)
            await asyncio.to_thread(files.end_write, fd, spec)
    except BaseException:
        if created:  # roll back a half-written new file
            os.close(fd)
            fd = -1
            with contextlib.suppress(Exception):
                await asyncio.to_thread(_with_root, inst, files.delete, path)
        else:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(files.end_write, fd, spec)
        raise
    finally:
        if fd >= 0:
            os.close(fd)


async def _discard_body(request: Request) -> None:
    """Read and drop what is left of a streamed body that can't be stored: a client still sending
    would otherwise get a broken pipe instead of the answer. (A spliced body drains itself.)"""
    with contextlib.suppress(Exception):
        while True:
            msg = await request.receive()
            if msg.get("type") != "http.request" or not msg.get("more_body"):
                return


async def files_delete(request: Request, name: str) -> Response:
    services, inst = await get_instance(request, name)
    path = request.query_params.get("path")
    if path is None:
        raise BadRequest("Missing path argument")
    async with services.instances.volume_writes(inst.name):
        await asyncio.to_thread(_with_root, inst, files.delete, path)
    _lifecycle(request, services, inst, "instance-file-deleted", path)
    return sync({})


for _prefix in PREFIXES:
    router.add(f"{_prefix}/{{name}}/files", files_get, methods=["GET", "HEAD"], access=Access.TRUSTED)
    router.add(f"{_prefix}/{{name}}/files", files_post, methods=["POST"], access=Access.TRUSTED, body=STREAM)
    router.add(f"{_prefix}/{{name}}/files", files_delete, methods=["DELETE"], access=Access.TRUSTED)
