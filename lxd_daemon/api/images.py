"""`/1.0/images`: list, upload or publish, get, update, delete, export, secret."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import AsyncIterator
from urllib.parse import parse_qsl

from fastapi import Request
from starlette.responses import Response

from lxd_daemon.api import socket_body
from lxd_daemon.api.access import STREAM, Access, Routes, is_trusted
from lxd_daemon.api.envelope import async_, sync
from lxd_daemon.api.request import BODY_LIMIT, check_etag, loads, project_of, read_json, recursion, validate
from lxd_daemon.errors import (
    BadRequest,
    Forbidden,
    InsufficientStorage,
    NotFound,
    NotImplementedYet,
    TooLarge,
    storage_errors,
)
from lxd_daemon.images.remote.sources import check_source
from lxd_daemon.images.service import check_alias_name, image_etag, parse_time
from lxd_daemon.projects.naming import DEFAULT, query
from lxd_daemon.services import get_services, requestor
from lxd_daemon.wire.images import ImagePut, ImagesPost

router = Routes()

TRUE = ("1", "true", "yes", "on")
PUBLISH_TYPES = ("instance", "container", "snapshot", "virtual-machine")
# Image uploads with a Content-Length of at least this are read from the socket by a thread of
# their own, in big pieces (api/socket_body.py), rather than through uvicorn's 64 KiB steps.
TAKEOVER_MIN = 256 << 10


def image_url(fp: str, project: str = DEFAULT) -> str:
    return f"/1.0/images/{fp}{query(project)}"


def caller_project(request: Request) -> str:
    """The project whose images a request uses (the service resolves features.images): the
    request's; public images are served to untrusted callers from `default` only (or, with a
    download token's secret, from the project the token was made in)."""
    if is_trusted(request):
        return project_of(request).name
    images = get_services(request).images
    return images.secret_project(request.query_params.get("secret")) or DEFAULT


def _images_full(images):
    """ENOSPC/EDQUOT while an image is written: a 507 naming the image store."""
    return storage_errors("images", images.store.root)


@router.get("/1.0/images", access=Access.GUARDED)
async def list_images(request: Request) -> Response:
    images = get_services(request).images
    raw_filter = request.query_params.get("filter", "")
    project = caller_project(request)
    items = await images.list(project=project, public_only=not is_trusted(request))
    if raw_filter.strip():
        from lxd_daemon.filter import parse_filter

        flt = parse_filter(raw_filter)
        items = [i for i in items if flt.match(i)]
    if recursion(request):
        return sync(items)
    return sync([image_url(i["fingerprint"], project) for i in items])


# -- POST /1.0/images ---------------------------------------------------------------------------

def _looks_like_json(content_type: str, first: bytes) -> bool:
    ctype = content_type.split(";")[0].strip().lower()
    if ctype == "application/json":
        return True
    if ctype in ("multipart/form-data", "application/octet-stream"):
        return False
    return first.lstrip()[:1] == b"{"


def _header_properties(request: Request) -> dict[str, str]:
    props: dict[str, str] = {}
    for raw in request.headers.getlist("x-lxd-properties"):
        for k, v in parse_qsl(raw, keep_blank_values=True):
            props[k] = v
    return props


def _header_aliases(request: Request) -> list[dict]:
    out = []
    for raw in request.headers.getlist("x-lxd-aliases"):
        names = [v for k, v in parse_qsl(raw) if k == "alias"] if "=" in raw else raw.split(",")
        out.extend({"name": n.strip(), "description": ""} for n in names if n.strip())
    return out


def _header_profiles(request: Request) -> list[str] | None:
    raws = request.headers.getlist("x-lxd-profiles")
    if not raws:
        return None
    return [v for raw in raws for k, v in parse_qsl(raw) if k == "profile"]


@router.post("/1.0/images", access=Access.GUARDED, body=STREAM)
async def create_image(request: Request) -> Response:
    # The upload of a push (images/push.py): a push token's secret admits it, from an untrusted
    # source too, and is used up whoever sends it (as LXD does).
    from lxd_daemon.images.push import take_token

    push = await take_token(get_services(request).ops, request.headers.get("x-lxd-fingerprint", ""),
                            request.headers.get("x-lxd-secret", ""))
    if push is None and not is_trusted(request):
        raise Forbidden("not authorized")
    ctype = request.headers.get("content-type", "")
    if push is not None or ctype.split(";")[0].strip().lower() in ("application/octet-stream", "multipart/form-data"):
        body = await socket_body.take(request, TAKEOVER_MIN)
        if body is not None:
            pieces = body.pieces()
            try:
                return await _create_from_upload(request, pieces, ctype, push)
            finally:
                await pieces.aclose()  # stops the reading thread when the upload failed early
        if push is not None:
            return await _create_from_upload(request, request.stream().__aiter__(), ctype, push)
    stream = request.stream().__aiter__()
    first = b""
    async for chunk in stream:
        first = chunk
        if chunk:
            break
    if _looks_like_json(ctype, first):
        parts = [first]
        size = len(first)
        async for chunk in stream:
            size += len(chunk)
            if size > BODY_LIMIT:
                raise TooLarge(f"Request body too large (limit {BODY_LIMIT} bytes)")
            parts.append(chunk)
        raw = b"".join(parts)
        data = loads(raw) if raw.strip() else {}
        return await _create_from_json(request, validate(ImagesPost, data))
    return await _create_from_upload(request, _chain(first, stream), ctype)


async def _chain(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    if first:
        yield first
    async for chunk in rest:
        yield chunk


async def _create_from_upload(request: Request, chunks: AsyncIterator[bytes], ctype: str,
                              push=None) -> Response:
    services = get_services(request)
    images = services.images
    project = push.project if push is not None else project_of(request).name
    expected = request.headers.get("x-lxd-fingerprint", "")
    if push is not None and not set(expected.lower()) <= set("0123456789abcdef"):
        expected = ""  # a push of an image the client named by alias: the token is checked instead
    try:
        with _images_full(images):  # the temp files are gone by then (receive and discard)
            upload = await images.receive(chunks, ctype)
            try:
                await images.check(upload, expected, project=project)
                if push is not None:
                    push.check(upload.fingerprint)
            except BaseException:
                await asyncio.to_thread(upload.discard)
                raise
    except InsufficientStorage:
        # Read and drop the rest of the upload: a client still sending would get a broken pipe
        # instead of this answer.
        with contextlib.suppress(Exception):
            async for _ in chunks:
                pass
        raise
    public = request.headers.get("x-lxd-public", "").strip().lower() in TRUE
    filename = request.headers.get("x-lxd-filename", "") if upload.rootfs is None else upload.part_filename
    props = _header_properties(request)
    aliases = _header_aliases(request)
    profiles = _header_profiles(request)
    who = requestor(request)
    expires = None
    extra: dict = {}
    if push is not None:  # what the client asked for when it made the token, not the source
        from lxd_daemon.images.push import new_wait_secret

        public, props, aliases, expires = push.public, push.properties, push.aliases, push.expires_at
        if not is_trusted(request):
            profiles = None
        extra = {"secret": new_wait_secret()}  # the (maybe untrusted) source waits with it

    async def run(op):
        try:
            with _images_full(images):
                img = await images.add(upload, project=project, filename=filename, public=public,
                                       properties=props, aliases=aliases, profiles=profiles, expires_at=expires,
                                       requestor=who)
        except BaseException:
            await asyncio.to_thread(upload.discard)
            raise
        op.resources = {"images": [image_url(img["fingerprint"], project)]}
        return {"fingerprint": img["fingerprint"], "size": str(img["size"]), **extra}

    op = services.ops.create(description="Downloading image", run=run, metadata=dict(extra) or None,
                             project=project)
    return async_(op.render())


async def _create_from_json(request: Request, body: ImagesPost) -> Response:
    services = get_services(request)
    src = body.source
    if src is None or not (src.type or src.mode):
        raise BadRequest("No image source given: upload an image file or give a 'source'")
    if src.mode == "push":  # the target side of a push: a token for the source's upload
        from lxd_daemon.images.push import create_token

        op = create_token(services.ops, services.events, project=project_of(request).name,
                          fingerprint=src.fingerprint,
                          aliases=[{"name": a.name, "description": a.description} for a in body.aliases or []],
                          public=body.public, properties=body.properties, expires_at=body.expires_at,
                          requestor=requestor(request))
        return async_(op.render())
    if src.type == "image" and src.mode in ("", "pull") and src.server:

        return await create_from_remote(request, body)
    if src.type in ("image", "url"):
        raise NotImplementedYet(f"Image source type {src.type!r} (copy from a remote) is not supported yet")
    if src.type not in PUBLISH_TYPES:
        raise BadRequest(f"Invalid image source type {src.type!r}")
    if src.type == "virtual-machine":
        raise BadRequest("Virtual machines are not supported by this server")
    if not src.name:
        raise BadRequest("No source provided")
    if src.type == "snapshot" and "/" not in src.name:
        raise BadRequest("Not a snapshot")
    if src.type != "snapshot" and "/" in src.name:
        raise BadRequest("This is a snapshot")
    images = services.images
    compression = body.compression_algorithm or images.compression_default()
    from lxd_daemon.images.publish import COMPRESSORS

    if compression not in COMPRESSORS:
        raise BadRequest(f"Unsupported compression algorithm {compression!r} for publishing")
    if services.instances is None:
        raise BadRequest("instances are not available")
    who = requestor(request)
    aliases = [{"name": a.name, "description": a.description} for a in body.aliases or []]
    expires = parse_time(body.expires_at)
    kind = "instances"
    inst = src.name.split("/", 1)[0]
    project = project_of(request).name
    services.instances.lookup(project, inst)  # 404 now for an instance the project doesn't have

    async def run(op):
        with _images_full(images):  # publish removes its work directory on any failure
            img = await images.publish(op, project=project, source_type=src.type, name=src.name,
                                       compression=compression, filename=body.filename, public=body.public,
                                       properties=body.properties, aliases=aliases, expires_at=expires,
                                       profiles=body.profiles, requestor=who)
        op.resources = {**op.resources, "images": [image_url(img["fingerprint"], project)]}
        return {"fingerprint": img["fingerprint"], "size": str(img["size"])}

    q = query(project)
    op = services.ops.create(description="Downloading image", run=run, project=project,
                             resources={kind: [f"/1.0/instances/{inst}{q}"],
                                        "containers": [f"/1.0/containers/{inst}{q}"]})
    return async_(op.render())


# -- one image ----------------------------------------------------------------------------------

async def _visible(request: Request, fingerprint: str) -> dict:
    images = get_services(request).images
    img = await images.get(fingerprint, project=caller_project(request))
    if not img["public"] and not is_trusted(request):
        if not images.use_secret(img["fingerprint"], request.query_params.get("secret")):
            raise NotFound("Image not found")
    return img


@router.get("/1.0/images/{fingerprint}", access=Access.GUARDED)
async def get_image(request: Request, fingerprint: str) -> Response:
    img = await _visible(request, fingerprint)
    return sync(img, etag=image_etag(img))


async def _update(request: Request, fingerprint: str, replace: bool) -> Response:
    raw = await read_json(request, default={})
    body = validate(ImagePut, raw)
    values = {k: getattr(body, k) for k in body.model_fields_set}
    if replace:
        values.setdefault("properties", body.properties)
    await get_services(request).images.update(
        fingerprint, project=project_of(request).name, values=values, replace=replace,
        if_match=lambda etag: check_etag(request, etag),
        requestor=requestor(request))
    return sync({})


@router.put("/1.0/images/{fingerprint}", access=Access.TRUSTED)
async def put_image(request: Request, fingerprint: str) -> Response:
    return await _update(request, fingerprint, True)


@router.patch("/1.0/images/{fingerprint}", access=Access.TRUSTED)
async def patch_image(request: Request, fingerprint: str) -> Response:
    return await _update(request, fingerprint, False)


@router.delete("/1.0/images/{fingerprint}", access=Access.TRUSTED)
async def delete_image(request: Request, fingerprint: str) -> Response:
    services = get_services(request)
    project = project_of(request).name
    img = await services.images.get(fingerprint, project=project)
    fp = img["fingerprint"]
    who = requestor(request)

    async def run(op):
        await services.images.delete(fp, project=project, requestor=who)

    op = services.ops.create(description="Deleting image", resources={"images": [image_url(fp, project)]}, run=run,
                             project=project)
    return async_(op.render())


@router.post("/1.0/images/{fingerprint}/secret", access=Access.TRUSTED)
async def create_secret(request: Request, fingerprint: str) -> Response:
    project = project_of(request).name
    img = await get_services(request).images.get(fingerprint, project=project)
    op = get_services(request).images.create_secret(img["fingerprint"], project=project, requestor=requestor(request))
    return async_(op.render())


# -- export -------------------------------------------------------------------------------------

EXPORT_CHUNK = 4 << 20


class FileParts(Response):
    """Sends files (and the bytes between them) with a Content-Length: with sendfile(2) from a
    thread when the connection allows it (api/socket_body.py), else one read per 4 MiB chunk in a
    worker thread, rather than FileResponse's 64 KiB steps."""

    def __init__(self, pieces: list, *, media_type: str, headers: dict[str, str]):
        super().__init__(media_type=media_type, headers=headers)
        self.pieces = pieces  # bytes, or (open file, size)
        length = sum(len(p) if isinstance(p, bytes) else p[1] for p in pieces)
        self.headers["content-length"] = str(length)

    async def __call__(self, scope, receive, send) -> None:
        sender = None
        if scope.get("method") == "GET" and any(not isinstance(p, bytes) for p in self.pieces):
            sender = socket_body.FileSender.open(receive)
        try:
            if sender is not None:
                self.headers["connection"] = "close"
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})
            if scope.get("method") == "HEAD":
                await send({"type": "http.response.body", "body": b""})
                return
            if sender is not None and sender.headers_flushed():
                try:
                    await sender.send_body(self.pieces)
                except OSError:
                    pass  # the client went away mid-body: the connection is closed below
                finally:
                    sender.completed()  # uvicorn completes the response and closes the connection
                await send({"type": "http.response.body", "body": b""})
                return
            for piece in self.pieces:
                if isinstance(piece, bytes):
                    await send({"type": "http.response.body", "body": piece, "more_body": True})
                    continue
                f = piece[0]
                while True:
                    chunk = await asyncio.to_thread(f.read, EXPORT_CHUNK)
                    if not chunk:
                        break
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            if sender is not None:
                sender.close()
            for piece in self.pieces:
                if not isinstance(piece, bytes):
                    piece[0].close()


def _open_all(paths) -> list:
    """Open the files; small ones are read at once (one thread hop in all)."""
    opened = []
    try:
        for p in paths:
            f = open(p, "rb")  # noqa: SIM115 - closed by FileParts
            size = os.fstat(f.fileno()).st_size
            if size <= EXPORT_CHUNK:
                with f:
                    data = f.read()
                opened.append(data)
            else:
                opened.append((f, size))
    except OSError:
        for item in opened:
            if not isinstance(item, bytes):
                item[0].close()
        raise NotFound("Image not found") from None
    return opened


@router.get("/1.0/images/{fingerprint}/export", access=Access.GUARDED)
async def export_image(request: Request, fingerprint: str) -> Response:
    services = get_services(request)
    project = caller_project(request)
    fp, public, files = await services.images.files(fingerprint, project=project)
    if not public and not is_trusted(request):
        if not services.images.use_secret(fp, request.query_params.get("secret")):
            raise NotFound("Image not found")
    opened = await asyncio.to_thread(_open_all, [p for _, p in files])
    services.events.lifecycle("image-retrieved", image_url(fp, project), requestor=requestor(request),
                              project=project)
    if len(files) == 1:
        return FileParts([opened[0]], media_type="application/octet-stream",
                         headers={"Content-Disposition": f"inline;filename={files[0][0]}"})
    boundary = secrets.token_hex(16)
    pieces: list = []
    for i, ((name, _), handle) in enumerate(zip(files, opened, strict=True)):
        part = "metadata" if i == 0 else "rootfs"
        pieces.append(("\r\n" if i else "").encode() + (
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"{part}\"; filename=\"{name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode())
        pieces.append(handle)
    pieces.append(f"\r\n--{boundary}--\r\n".encode())
    return FileParts(pieces, media_type=f"multipart/form-data; boundary={boundary}", headers={})


@router.post("/1.0/images/{fingerprint}/export", access=Access.TRUSTED)
async def push_image(request: Request, fingerprint: str) -> Response:
    """Push the image to another server: the source side of `lxc image copy --mode push`
    {images_push_relay} (images/push.py). The client names a public image by its alias."""
    from lxd_daemon.images.push import PushJob, run_push, target_url
    from lxd_daemon.wire.images import ImageExportPost

    body = validate(ImageExportPost, await read_json(request, default={}))
    services = get_services(request)
    project = project_of(request).name
    img = await services.images.resolve(fingerprint, project=project)
    fp = img["fingerprint"]
    target_url(body.target)  # a bad target is a 400 now rather than a failed operation
    if not body.secret:
        raise BadRequest("The target's secret is required to push an image")
    _, _, files = await services.images.files(fp, project=project)
    job = PushJob(url=body.target, certificate=body.certificate, secret=body.secret, fingerprint=fp,
                  files=files, filename=img["filename"] or fp, project=body.project)
    who = requestor(request)

    async def run(op):
        await run_push(op, job)
        services.events.lifecycle("image-retrieved", image_url(fp, project), {"target": body.target},
                                  requestor=who, project=project)

    op = services.ops.create(description="Downloading image", resources={"images": [image_url(fp, project)]},
                             run=run, may_cancel=True, project=project)
    return async_(op.render())


# -- images from image servers (images/remote/) ----------------------------------------------------

async def create_from_remote(request: Request, body) -> Response:
    """POST /1.0/images with source {type: image, mode: pull, server, ...}: the copy runs in the
    operation; its metadata shows download_progress, then the fingerprint and size."""
    services = get_services(request)
    source = check_source(body.source)  # a malformed source is a 400 now, not a failed operation

    aliases = [{"name": a.name, "description": a.description} for a in body.aliases or []]
    for a in aliases:
        check_alias_name(a["name"])
    who = requestor(request)
    images = services.images
    project = project_of(request).name

    async def run(op):
        fp = await images.pull(source, project=project, aliases=aliases, auto_update=bool(body.auto_update),
                               public=bool(body.public), op=op, requestor=who)
        img = await images.get(fp, project=project)
        op.resources = {**(op.resources or {}), "images": [image_url(fp, project)]}
        return {"fingerprint": fp, "size": str(img["size"])}

    op = services.ops.create(description="Downloading image", run=run, project=project)
    return async_(op.render())


@router.post("/1.0/images/{fingerprint}/refresh", access=Access.TRUSTED)
async def refresh_image(request: Request, fingerprint: str) -> Response:
    services = get_services(request)
    project = project_of(request).name
    img = await services.images.get(fingerprint, project=project)  # 404 for an unknown image first
    fp = img["fingerprint"]
    who = requestor(request)

    async def run(op):
        await services.images.updater.refresh(fp, project=project, op=op, requestor=who)

    op = services.ops.create(description="Refreshing image", resources={"images": [image_url(fp, project)]},
                             run=run, project=project)
    return async_(op.render())
