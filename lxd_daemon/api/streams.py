"""The simplestreams tree of the public images (images/streams.py), readable by anyone:
`/streams/v1/index.json`, the catalogue it names, and the files its items point to
(`/streams/images/<fingerprint>/<file>`), streamed from the image store with a Content-Length.

    lxc remote add NAME https://HOST:PORT --protocol simplestreams --public
    lxc launch NAME:ALIAS c1

`lxd streams export DIR` writes the same tree to a directory, for any static web server.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import Request
from starlette.responses import Response

from lxd_daemon.api.access import Access, Routes
from lxd_daemon.api.envelope import sync
from lxd_daemon.api.images import FileParts, _open_all
from lxd_daemon.api.request import read_json
from lxd_daemon.errors import BadRequest
from lxd_daemon.images.streams import FILES_PREFIX, INDEX_PATH, PRODUCTS_PATH, StreamsTree
from lxd_daemon.services import get_services

routes = Routes()


def _tree(request: Request) -> StreamsTree:
    return get_services(request).streams


async def _document(request: Request, path: str) -> Response:
    data = await _tree(request).document(path)
    return Response(data, media_type="application/json", headers={"Cache-Control": "no-cache"})


@routes.get("/" + INDEX_PATH, access=Access.ANYONE)
async def get_streams_index(request: Request) -> Response:
    return await _document(request, INDEX_PATH)


@routes.get("/" + PRODUCTS_PATH, access=Access.ANYONE)
async def get_streams_products(request: Request) -> Response:
    return await _document(request, PRODUCTS_PATH)


@routes.get(f"/{FILES_PREFIX}/{{fingerprint}}/{{name}}", access=Access.ANYONE)
async def get_streams_file(request: Request, fingerprint: str, name: str) -> Response:
    path = await _tree(request).file(fingerprint, name)
    opened = await asyncio.to_thread(_open_all, [path])
    return FileParts(opened, media_type="application/octet-stream", headers={})


@routes.post("/internal/streams/export", access=Access.LOCAL)
async def export_streams(request: Request) -> Response:
    """Write the tree to a directory for a static web server (`lxd streams export DIR`)."""
    body = await read_json(request, default={})
    path = body.get("path") if isinstance(body, dict) else None
    if not isinstance(path, str) or not path.startswith("/"):
        raise BadRequest("An absolute directory path is required")
    try:
        written = await _tree(request).write(Path(path))
    except OSError as e:
        raise BadRequest(f"Could not write the tree to {path}: {e.strerror or e}") from None
    return sync({"path": path, "files": written})
