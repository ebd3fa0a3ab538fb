"""`/1.0/instances/{name}/metadata` and `.../metadata/templates` (and `/1.0/containers/...`)."""

from __future__ import annotations

import asyncio

from fastapi import Request
from starlette.responses import Response

from lxd_daemon.api.access import Access, Routes
from lxd_daemon.api.envelope import etag_of, sync
from lxd_daemon.api.instance_files import PREFIXES, get_instance, lifecycle
from lxd_daemon.api.request import check_etag, read_body, read_json, validate
from lxd_daemon.errors import BadRequest
from lxd_daemon.instances import metadata
from lxd_daemon.wire.exec import ImageMetadata

router = Routes()

TEMPLATE_LIMIT = 16 << 20


def _lifecycle(request: Request, services, inst, action: str, context: dict | None = None) -> None:
    lifecycle(request, services, inst, action, context)


def _etag(doc: dict) -> str:
    return etag_of(doc)


def _clean(model: ImageMetadata) -> dict:
    return model.model_dump(mode="json")


async def metadata_get(request: Request, name: str) -> Response:
    services, inst = await get_instance(request, name)
    doc = await asyncio.to_thread(metadata.read_metadata, inst)
    _lifecycle(request, services, inst, "instance-metadata-retrieved")
    return sync(doc, etag=_etag(doc))


async def _update(request: Request, name: str, *, patch: bool) -> Response:
    services, inst = await get_instance(request, name)
    body = await read_json(request, default={})
    if not isinstance(body, dict):
        raise BadRequest("Invalid request body: expected a JSON object")
    async with services.instances.lock(inst.name):
        current = await asyncio.to_thread(metadata.read_metadata, inst)
        check_etag(request, _etag(current))
        doc = {**current, **body} if patch else body
        new = _clean(validate(ImageMetadata, doc))
        await asyncio.to_thread(metadata.write_metadata, inst, new)
    _lifecycle(request, services, inst, "instance-metadata-updated")
    return sync({})


async def metadata_put(request: Request, name: str) -> Response:
    return await _update(request, name, patch=False)


async def metadata_patch(request: Request, name: str) -> Response:
    return await _update(request, name, patch=True)


async def templates_get(request: Request, name: str) -> Response:
    services, inst = await get_instance(request, name)
    path = request.query_params.get("path")
    if path is None:
        return sync(await asyncio.to_thread(metadata.list_templates, inst))
    data = await asyncio.to_thread(metadata.read_template, inst, path)
    _lifecycle(request, services, inst, "instance-metadata-template-retrieved", {"path": path})
    return Response(data, media_type="application/octet-stream")


async def templates_post(request: Request, name: str) -> Response:
    services, inst = await get_instance(request, name)
    path = request.query_params.get("path")
    metadata.template_file(inst, path)  # validate the name before reading the body
    data = await read_body(request, TEMPLATE_LIMIT)
    async with services.instances.volume_writes(inst.name):
        await asyncio.to_thread(metadata.write_template, inst, path, data)
    _lifecycle(request, services, inst, "instance-metadata-template-created", {"path": path})
    return sync({})


async def templates_delete(request: Request, name: str) -> Response:
    services, inst = await get_instance(request, name)
    path = request.query_params.get("path")
    async with services.instances.volume_writes(inst.name):
        await asyncio.to_thread(metadata.delete_template, inst, path)
    _lifecycle(request, services, inst, "instance-metadata-template-deleted", {"path": path})
    return sync({})


for _prefix in PREFIXES:
    router.add(f"{_prefix}/{{name}}/metadata", metadata_get, methods=["GET"], access=Access.TRUSTED)
    router.add(f"{_prefix}/{{name}}/metadata", metadata_put, methods=["PUT"], access=Access.TRUSTED)
    router.add(f"{_prefix}/{{name}}/metadata", metadata_patch, methods=["PATCH"], access=Access.TRUSTED)
    router.add(f"{_prefix}/{{name}}/metadata/templates", templates_get, methods=["GET"], access=Access.TRUSTED)
    router.add(f"{_prefix}/{{name}}/metadata/templates", templates_post, methods=["POST"], access=Access.TRUSTED, body=TEMPLATE_LIMIT)
    router.add(f"{_prefix}/{{name}}/metadata/templates", templates_delete, methods=["DELETE"], access=Access.TRUSTED)
