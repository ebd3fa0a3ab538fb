"""Who may call what: every endpoint's declaration, and the one check made before any handler.

Each router module declares its endpoints in one table, a `Routes`:

    routes = Routes()

    @routes.get("/1.0/profiles", access=Access.TRUSTED)
    async def list_profiles(request): ...

A declaration names the path, the method, the handler, who may call it (`Access`) and the
largest request body it accepts. `check()` runs first for every request (an app-wide dependency,
see app.create_app), before the route's other checks and its handler: it refuses what the caller
may not do. A route registered without a declaration is refused on every transport, so nothing
is ever open by omission.

Who the caller is comes from the listener: `Gate` wraps the application once per listener (unix
socket, TLS) and fills in the scope: `lxd_protocol`, `lxd_fingerprint` (the TLS client
certificate's sha256, "" when none), `lxd_trusted` and `lxd_certificate` (the trust record).
The unix socket is trusted (its mode and group decide who may connect); a TLS client is trusted
when the trust store (services.trust) knows its certificate, asked afresh on every request, so a
removed certificate loses access at once.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from fastapi import APIRouter
from starlette.requests import HTTPConnection

from lxd_daemon.errors import Forbidden, TooLarge
from lxd_daemon.util.validate import FALSE

BODY_LIMIT = 1 << 20  # the default for a JSON request body (also api.request.BODY_LIMIT)
STREAM = None  # body=STREAM: an upload, read as a stream by its handler


class Access(enum.Enum):
    ANYONE = "anyone"  # any client on any transport (GET /, GET /1.0, the simplestreams tree)
    GUARDED = "guarded"  # untrusted clients may call; the handler narrows (public images, secrets, password)
    TRUSTED = "trusted"  # trusted clients; a restricted certificate only in its projects
    ADMIN = "admin"  # trusted clients with an unrestricted certificate (server-wide settings, pools)
    LOCAL = "local"  # the unix socket only
    # GET /1.0/metrics: trusted clients, `metrics` certificates, and anyone when the server's
    # core.metrics_authentication is false (see _check_metrics)
    METRICS = "metrics"


@dataclass(frozen=True)
class Endpoint:
    path: str
    method: str
    handler: Callable
    access: Access
    body: int | None = BODY_LIMIT


class Routes(APIRouter):
    """A resource's table of endpoints: a FastAPI router whose every route is declared."""

    def __init__(self) -> None:
        super().__init__()
        self.endpoints: dict[tuple[str, str], Endpoint] = {}

    @property
    def router(self) -> Routes:
        return self

    def _declare(self, path: str, methods, handler, access: Access, body: int | None) -> None:
        """Record the declarations and attach them to the route just added: the route object a
        request is matched to (scope["route"]) carries who may call it, by method."""
        if not isinstance(access, Access):
            raise TypeError(f"{path}: access must be an Access, not {access!r}")
        route = self.routes[-1]
        table = route.__dict__.setdefault("lxd_access", {})
        for method in methods:
            key = (path, method)
            if key in self.endpoints:
                raise ValueError(f"{method} {path} is declared twice")
            self.endpoints[key] = table[method] = Endpoint(path, method, handler, access, body)
            # Also on the handler, by path: FastAPI matches a websocket to a copy of its route.
            vars(handler).setdefault("lxd_access", {})[key] = table[method]
        if "GET" in table and "HEAD" in (getattr(route, "methods", None) or ()):
            table.setdefault("HEAD", table["GET"])

    def add(self, path: str, handler, *, methods: list[str], access: Access,
            body: int | None = BODY_LIMIT, name: str | None = None) -> None:
        self.add_api_route(path, handler, methods=list(methods), name=name)
        self._declare(path, methods, handler, access, body)

    def add_websocket(self, path: str, handler, *, access: Access, name: str | None = None) -> None:
        self.add_api_websocket_route(path, handler, name=name)
        self._declare(path, ["WEBSOCKET"], handler, access, 0)

    def route_for(self, method: str, path: str, *, access: Access, body: int | None = BODY_LIMIT):
        def deco(fn):
            self.add(path, fn, methods=[method], access=access, body=body)
            return fn

        return deco

    # The decorators of APIRouter, with the declaration required. (FastAPI's own get()/post()
    # have no access argument: calling them is a TypeError here.)
    def get(self, path: str, *, access: Access, body: int | None = BODY_LIMIT):  # type: ignore[override]
        return self.route_for("GET", path, access=access, body=body)

    def put(self, path: str, *, access: Access, body: int | None = BODY_LIMIT):  # type: ignore[override]
        return self.route_for("PUT", path, access=access, body=body)

    def patch(self, path: str, *, access: Access, body: int | None = BODY_LIMIT):  # type: ignore[override]
        return self.route_for("PATCH", path, access=access, body=body)

    def post(self, path: str, *, access: Access, body: int | None = BODY_LIMIT):  # type: ignore[override]
        return self.route_for("POST", path, access=access, body=body)

    def delete(self, path: str, *, access: Access, body: int | None = BODY_LIMIT):  # type: ignore[override]
        return self.route_for("DELETE", path, access=access, body=body)

    def websocket(self, path: str, *, access: Access):  # type: ignore[override]
        def deco(fn):
            self.add_websocket(path, fn, access=access)
            return fn

        return deco


def routes_of(routes):
    """Every route of an app or router, through the routers it includes."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from routes_of(inner.routes)
        elif getattr(route, "path", None) is not None:
            yield route


def undeclared(app) -> list[str]:
    """The routes of `app` that some method lacks a declaration for (refused by check())."""
    missing = []
    for route in routes_of(app.routes):
        table = getattr(route, "lxd_access", {})
        methods = getattr(route, "methods", None) or {"WEBSOCKET"}
        missing.extend(f"{m} {route.path}" for m in sorted(methods) if m not in table)
    return missing


def endpoint_of(conn: HTTPConnection) -> Endpoint | None:
    route = conn.scope.get("route")
    if route is None:
        return None
    method = conn.scope.get("method", "GET") if conn.scope["type"] == "http" else "WEBSOCKET"
    found = vars(route).get("lxd_access", {}).get(method)
    if found is None:
        by_path = vars(getattr(route, "endpoint", None) or _nothing).get("lxd_access", {})
        found = by_path.get((route.path, method)) or (by_path.get((route.path, "GET")) if method == "HEAD" else None)
    return found


def _nothing() -> None:
    pass


def is_trusted(conn: HTTPConnection) -> bool:
    return conn.scope.get("lxd_trusted") is True


def check(conn: HTTPConnection) -> None:
    """The access check, made once for every request before anything else looks at it."""
    endpoint = endpoint_of(conn)
    if endpoint is None:
        raise Forbidden("not authorized")  # undeclared: closed
    access = endpoint.access
    if access is Access.LOCAL:
        if conn.scope.get("lxd_protocol") != "unix":
            raise Forbidden("not authorized")
    elif access in (Access.TRUSTED, Access.ADMIN):
        if not is_trusted(conn):
            raise Forbidden("not authorized")
        record = conn.scope.get("lxd_certificate") or {}
        if record.get("restricted"):
            # A restricted certificate reaches its own projects only, and nothing server-wide.
            if access is Access.ADMIN:
                raise Forbidden("Certificate is restricted")
            project = _project(conn)
            if _narrowed(conn, conn.scope["route"].path):
                pass  # the handler lists only the caller's projects (visible_projects)
            elif project not in (record.get("projects") or ()):
                raise Forbidden(f"Certificate is restricted and has no access to project {project!r}")
    elif access is Access.METRICS:
        _check_metrics(conn)
    elif access is Access.GUARDED and is_trusted(conn):
        record = conn.scope.get("lxd_certificate") or {}
        if record.get("restricted") and _project(conn) not in (record.get("projects") or ()):
            # Outside its projects a restricted certificate is any untrusted client (the handler
            # narrows: public images only, a secret, a password), as in LXD.
            conn.scope["lxd_trusted"] = False
    if endpoint.body is not None and conn.scope["type"] == "http":
        length = conn.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > endpoint.body:
            raise TooLarge(f"Request body too large (limit {endpoint.body} bytes)")


def _check_metrics(conn: HTTPConnection) -> None:
    """Who may scrape: a trusted client; over TLS a certificate of type `metrics` (untrusted
    everywhere else: the trust store does not identify it); anyone when the server config key
    core.metrics_authentication is false. A restricted certificate names only its own projects
    (without ?project= the handler reports those only: visible_projects)."""
    record = conn.scope.get("lxd_certificate") if is_trusted(conn) else None
    if not is_trusted(conn):
        services = getattr(conn.app.state, "services", None)
        trust = getattr(services, "trust", None)
        fp = conn.scope.get("lxd_fingerprint") or ""
        metrics = getattr(trust, "metrics", None)
        record = metrics(fp) if fp and metrics is not None else None
        if record is not None:
            conn.scope["lxd_metrics_certificate"] = record
        else:
            server = getattr(services, "server", None)
            config = getattr(server, "config", None)
            open_ = config is not None and config.get("core.metrics_authentication").strip().lower() in FALSE
            if not open_:
                raise Forbidden("not authorized")
            return
    project = conn.query_params.get("project")
    if record and record.get("restricted") and project and project not in (record.get("projects") or ()):
        raise Forbidden(f"Certificate is restricted and has no access to project {project!r}")


# Lists whose handler narrows what it shows to visible_projects(): GET /1.0/projects always, and
# with `all-projects=true` (api.request.listed_projects) the lists below. A restricted certificate
# may call them without naming one of its projects; any other route needs one of them.
ALL_PROJECTS_LISTS = frozenset({
    ("GET", "/1.0/instances"), ("GET", "/1.0/containers"), ("GET", "/1.0/operations"),
    ("GET", "/1.0/profiles"), ("WEBSOCKET", "/1.0/events"),
    ("GET", "/1.0/storage-pools/{pool}/volumes"), ("GET", "/1.0/storage-pools/{pool}/volumes/{type}"),
})


def _project(conn: HTTPConnection) -> str:
    """The project a request targets: `?project=` (default `default`), or the project itself."""
    project = conn.query_params.get("project") or "default"
    if conn.scope["route"].path.startswith("/1.0/projects/{name}"):
        project = conn.path_params.get("name", project)
    return project


def _narrowed(conn: HTTPConnection, path: str) -> bool:
    method = conn.scope.get("method", "GET") if conn.scope["type"] == "http" else "WEBSOCKET"
    if method == "HEAD":
        method = "GET"
    if (method, path) == ("GET", "/1.0/projects"):
        return True
    return ((method, path) in ALL_PROJECTS_LISTS
            and conn.query_params.get("all-projects", "").lower() in ("1", "true"))


def visible_projects(conn: HTTPConnection) -> frozenset[str] | None:
    """The projects a caller may see (`all-projects=true` lists, `GET /1.0/projects`): those of a
    restricted certificate, or None for all."""
    record = conn.scope.get("lxd_certificate") or conn.scope.get("lxd_metrics_certificate") or {}
    if record.get("restricted"):
        return frozenset(record.get("projects") or ())
    return None


def filter_used_by(conn: HTTPConnection, urls: list[str]) -> list[str]:
    """The `used_by` URLs the caller may see: a restricted certificate only its projects' objects."""
    visible = visible_projects(conn)
    if visible is None:
        return urls
    return [u for u in urls if (parse_qs(urlsplit(u).query).get("project") or ["default"])[0] in visible]


def shown(conn: HTTPConnection, obj: dict) -> dict:
    """An object as the caller may see it: its `used_by` through filter_used_by."""
    return {**obj, "used_by": filter_used_by(conn, obj["used_by"])}


def fingerprint(der: bytes | None) -> str:
    return hashlib.sha256(der).hexdigest() if der else ""


class Gate:
    """ASGI layer in front of the app, one per listener: says who the caller is."""

    def __init__(self, app, services, transport: str):
        if transport not in ("unix", "tls"):
            raise ValueError(transport)
        self.app = app
        self.services = services
        self.transport = transport

    def __getattr__(self, name):
        return getattr(self.app, name)

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            if self.transport == "unix":
                scope["lxd_protocol"] = "unix"
                scope["lxd_fingerprint"] = ""
                scope["lxd_trusted"] = True
                scope["lxd_certificate"] = None
            else:
                der = scope.get("lxd_peer_cert")
                trust = getattr(self.services, "trust", None)
                if trust is not None:
                    fp, record = trust.identify(der)
                else:  # no trust store: nobody is trusted over TLS
                    fp, record = fingerprint(der), None
                scope["lxd_protocol"] = "tls"
                scope["lxd_fingerprint"] = fp
                scope["lxd_trusted"] = record is not None
                scope["lxd_certificate"] = record
        await self.app(scope, receive, send)
