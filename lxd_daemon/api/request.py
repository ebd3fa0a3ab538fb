"""Request helpers: bounded JSON bodies, typed parsing in LXD's error envelope, ETags, and the
checks every route gets (names in the URL path, the `project` it targets)."""

from __future__ import annotations

import json
import re
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import HTTPConnection, Request

from lxd_daemon import names
from lxd_daemon.api import access
from lxd_daemon.errors import BadRequest, LXDError, NotFound, PreconditionFailed, TooLarge

BODY_LIMIT = access.BODY_LIMIT  # non-upload request bodies
DEPTH_LIMIT = 64  # nesting of JSON arrays and objects in a request body

# A JSON string (with its escapes; an unterminated one runs to the end) or a bracket: only
# brackets outside strings count for depth, and the scan is linear whatever the input.
_TOKENS = re.compile(rb'"(?:[^"\\]++|\\.)*+(?:"|\\?\Z)|[\[\]{}]', re.DOTALL)

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
    return loads(raw)


def loads(raw: bytes) -> object:
    """Parse a request body as JSON: nesting deeper than DEPTH_LIMIT is refused before parsing,
    and text that is not valid Unicode (a lone surrogate such as "\\udfff") after it."""
    depth = 0
    for m in _TOKENS.finditer(raw):
        c = m.group()
        if c in (b"[", b"{"):
            depth += 1
            if depth > DEPTH_LIMIT:
                raise BadRequest(f"Failed to parse request body: nested deeper than {DEPTH_LIMIT} levels")
        elif c in (b"]", b"}"):
            depth -= 1
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise BadRequest(f"Failed to parse request body: {e}") from None
    _check_text(value)
    return value


def _check_text(value: object) -> None:
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            strings = (v,)
        elif isinstance(v, dict):
            strings = v.keys()
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
            continue
        else:
            continue
        for s in strings:
            try:
                s.encode("utf-8")
            except UnicodeEncodeError:
                raise BadRequest("Failed to parse request body: invalid Unicode text "
                                 f"(lone surrogate) in {s.encode('utf-8', 'backslashreplace').decode()[:64]!r}") from None


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
        if first.get("type") == "value_error" and "error" in first.get("ctx", {}):
            msg = str(first["ctx"]["error"])  # our validators' own message, without pydantic's prefix
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


def _route_checks(route) -> dict:
    checks = getattr(route, "_lxd_name_checks", None)
    if checks is None:
        checks = names.kinds_for_route(route.path)
        route._lxd_name_checks = checks
    return checks


def check_path_names(conn: HTTPConnection) -> None:
    """Validate every object name in the URL path by its kind (lxd_daemon.names), for every
    route: installed once as an app-wide dependency, so handlers only see valid names."""
    route = conn.scope.get("route")
    params = conn.path_params
    if route is None or not params:
        return
    checks = _route_checks(route)
    for param, value in params.items():
        check = checks.get(param, names.generic)
        try:
            check(value)
        except names.InvalidName as e:
            raise LXDError(e.message, e.status) from None


async def check_project(conn: HTTPConnection) -> None:
    """`?project=NAME` must name an existing project: LXD's 404 otherwise, on every endpoint. The
    project is resolved here, once per request (project_of())."""
    name = conn.query_params.get("project") or "default"
    if name != "default":
        try:
            names.project(name)
        except names.InvalidName:
            raise NotFound("Project not found") from None
    projects = conn.app.state.services.projects
    conn.scope["lxd_project"] = projects.get(name)  # NotFound("Project not found")


def project_of(conn: HTTPConnection):
    """The request's project (projects.service.Project), resolved by check_project."""
    return conn.scope["lxd_project"]


def visible_project(conn: HTTPConnection, name: str) -> str:
    """A project a request body names (a copy's source, a move's target): one that exists and
    that the caller may see; any other is "not found", as one that doesn't exist."""
    visible = access.visible_projects(conn)
    if visible is not None and name not in visible:
        raise NotFound("Project not found")
    return conn.app.state.services.projects.get(name).name


def listed_projects(conn: HTTPConnection) -> list[str]:
    """The projects a list covers: the request's, or with `all-projects=true` every project the
    caller may see."""
    if conn.query_params.get("all-projects", "").lower() not in ("1", "true"):
        return [project_of(conn).name]
    visible = access.visible_projects(conn)
    return [n for n in conn.app.state.services.projects.names() if visible is None or n in visible]


async def check_request(conn: HTTPConnection) -> None:
    """The checks every route runs before its handler (see create_app): who may call it first
    (api.access), then the names in its path and its project."""
    access.check(conn)
    check_path_names(conn)
    await check_project(conn)
