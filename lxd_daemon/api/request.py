"""Request helpers: bounded JSON bodies, typed parsing in LXD's error envelope, ETags."""

from __future__ import annotations

import json
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from lxd_daemon.errors import BadRequest, PreconditionFailed, TooLarge

BODY_LIMIT = 1 << 20  # non-upload request bodies

M = TypeVar("M", bound=BaseModel)


async def read_body(request: Request, limit: int = BODY_LIMIT) -> bytes:
    length = request.headers.get("content-length")
    if length is not None:
        try:
            if int(length) > limit:
                raise TooLarge(f"Request body too large (limit {limit} bytes)")
        except ValueError:
            raise BadRequest("Invalid Content-Length header") from None
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"Request body too large (limit {limit} bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: Request, *, default: object = None) -> object:
    """The request's JSON value; `default` for an empty body."""
    raw = await read_body(request)
    if not raw.strip():
        return default
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequest(f"Failed to parse request body: {e}") from None


def _field_path(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if p not in ("body",))


def validate(model: type[M], data: object) -> M:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise BadRequest("Invalid request body: expected a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = _field_path(first.get("loc", ()))
        msg = first.get("msg", "invalid value")
        raise BadRequest(f"Invalid value for field {where!r}: {msg}" if where else f"Invalid request: {msg}") from None


async def parse(request: Request, model: type[M]) -> M:
    return validate(model, await read_json(request, default={}))


def check_etag(request: Request, current: str) -> None:
    """Refuse a PUT/PATCH whose If-Match does not match the object's current ETag (412)."""
    want = request.headers.get("if-match")
    if not want:
        return
    candidates = [w.strip() for w in want.split(",")]
    if "*" in candidates:
        return
    bare = current.strip('"')
    if not any(c.strip('"').removeprefix("W/").strip('"') == bare for c in candidates):
        raise PreconditionFailed("ETag doesn't match: the object was changed since you read it")


def recursion(request: Request) -> int:
    raw = request.query_params.get("recursion", "0") or "0"
    try:
        level = int(raw)
    except ValueError:
        raise BadRequest(f"Invalid recursion value {raw!r}") from None
    return max(0, level)
