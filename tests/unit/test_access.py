"""Access declarations (api/access.py): every route of the daemon declares who may call it, and
an untrusted TLS client is refused before any handler on everything but LXD's public list.

In process: the application built from every router module, behind a TLS Gate whose trust
store knows nobody. A refusal here happens before the handler (whose services do not exist in
this test), so a 403 is the access check's own. The same walk runs against a real daemon over
TLS in tests/integration/test_access_tls.py.
"""

from __future__ import annotations

import asyncio
import importlib
import pkgutil
import re
import warnings

import httpx
import pytest

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # starlette's note on httpx: its websocket client is what is used
    from starlette.testclient import TestClient, WebSocketDenialResponse

import lxd_daemon.api
from lxd_daemon.api.access import Access, Gate, Routes, endpoint_of, routes_of, undeclared
from lxd_daemon.app import create_app
from tests.helpers import bare_services

# LXD's public list: what an untrusted client may call at all. GUARDED handlers narrow further
# (public images only, a valid secret, a password or token): their own tests check that.
PUBLIC = {
    ("GET", "/"): Access.ANYONE,
    ("GET", "/1.0"): Access.ANYONE,
    ("POST", "/1.0/certificates"): Access.GUARDED,
    ("GET", "/1.0/images"): Access.GUARDED,
    ("POST", "/1.0/images"): Access.GUARDED,
    ("GET", "/1.0/images/{fingerprint}"): Access.GUARDED,
    ("GET", "/1.0/images/{fingerprint}/export"): Access.GUARDED,
    ("GET", "/1.0/images/aliases"): Access.GUARDED,
    ("GET", "/1.0/images/aliases/{name:path}"): Access.GUARDED,
    ("GET", "/1.0/operations/{op_id}/wait"): Access.GUARDED,
    ("WEBSOCKET", "/1.0/operations/{op_id}/websocket"): Access.GUARDED,
}
# The simplestreams tree of public images (served to anyone, like a static image server).
PUBLIC_PREFIXES = ("/streams/",)


class NobodyTrusted:
    """A trust store that knows no certificate."""

    on_revoke: list = []

    def identify(self, der):
        return ("", None)


def all_tables() -> list[Routes]:
    tables = []
    for mod in pkgutil.iter_modules(lxd_daemon.api.__path__):
        module = importlib.import_module(f"lxd_daemon.api.{mod.name}")
        tables.extend(v for v in vars(module).values() if isinstance(v, Routes) and v not in tables)
    return tables


@pytest.fixture(scope="module")
def app():
    return create_app(services=bare_services(), routers=all_tables())


def declared(app):
    for route in routes_of(app.routes):
        table = vars(route).get("lxd_access", {})
        for method, ep in table.items():
            if method != "HEAD":
                yield method, route.path, ep


def concrete(path: str) -> str:
    """A URL for a route's path template: every parameter gets a valid name."""
    return re.sub(r"\{([a-z_]+)(:path)?\}", lambda m: "x1" if m.group(1) != "type" else "custom", path)


def test_every_route_is_declared(app):
    assert undeclared(app) == []
    assert len(list(declared(app))) > 120


def test_only_the_public_list_is_open_to_untrusted_clients(app):
    open_ = {(m, p): ep.access for m, p, ep in declared(app)
             if ep.access in (Access.ANYONE, Access.GUARDED) and not p.startswith(PUBLIC_PREFIXES)}
    assert open_ == {k: v for k, v in PUBLIC.items() if k in open_}
    missing = set(PUBLIC) - set(open_)
    # POST /1.0/certificates exists once the trust store is wired (trust/); the rest always.
    assert missing <= {("POST", "/1.0/certificates")}, missing
    for m, p, ep in declared(app):
        if p.startswith(PUBLIC_PREFIXES):
            assert m == "GET" and ep.access is Access.ANYONE, (m, p)


def test_untrusted_tls_client_gets_403_on_every_other_route(app):
    gate = Gate(app, type("S", (), {"trust": NobodyTrusted()})(), "tls")
    closed = [(m, p) for m, p, ep in declared(app) if ep.access in (Access.TRUSTED, Access.ADMIN, Access.LOCAL)]

    async def walk():
        got = {}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(gate), base_url="https://lxd") as c:
            for method, path in closed:
                if method == "WEBSOCKET":
                    continue
                r = await c.request(method, concrete(path), content=b"{}")
                got[(method, path)] = (r.status_code, r.json().get("error"))
        return got

    got = asyncio.run(walk())
    wrong = {k: v for k, v in got.items() if v != (403, "not authorized")}
    assert not wrong, wrong
    assert len(got) > 100
    client = TestClient(gate, base_url="https://lxd")
    for method, path in closed:
        if method == "WEBSOCKET":
            with pytest.raises(WebSocketDenialResponse) as e:
                with client.websocket_connect(concrete(path)):
                    pass
            assert e.value.status_code == 403, (path, e.value)


def test_local_routes_are_refused_even_to_trusted_tls_clients(app):
    class Everyone:
        on_revoke: list = []

        def identify(self, der):
            return ("ab" * 32, {"type": "client"})

    gate = Gate(app, type("S", (), {"trust": Everyone()})(), "tls")
    local = [(m, p) for m, p, ep in declared(app) if ep.access is Access.LOCAL]
    assert ("GET", "/internal/ready") in local

    async def walk():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(gate), base_url="https://lxd") as c:
            return {(m, p): (await c.request(m, concrete(p))).status_code for m, p in local}

    assert set(asyncio.run(walk()).values()) == {403}


def test_a_route_without_declaration_is_refused_on_every_transport():
    from fastapi import APIRouter

    plain = APIRouter()

    @plain.get("/1.0/open")
    async def open_route():
        return {"open": True}

    app = create_app(services=bare_services(), routers=[plain])
    assert "GET /1.0/open" in undeclared(app)

    async def main():
        for transport in ("unix", "tls"):
            gate = Gate(app, type("S", (), {"trust": NobodyTrusted()})(), transport)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(gate), base_url="http://lxd") as c:
                r = await c.get("/1.0/open")
                assert r.status_code == 403, (transport, r.text)

    asyncio.run(main())


def test_declarations_are_required_and_unique():
    routes = Routes()
    with pytest.raises(TypeError):
        routes.get("/1.0/x")  # no access: FastAPI's own decorator is not reachable

    @routes.get("/1.0/x", access=Access.TRUSTED)
    async def x():
        return {}

    with pytest.raises(ValueError):
        routes.add("/1.0/x", x, methods=["GET"], access=Access.TRUSTED)
    with pytest.raises(TypeError):
        routes.add("/1.0/y", x, methods=["GET"], access="trusted")


def test_declared_body_limit_is_enforced_before_the_handler():
    routes = Routes()
    calls = []

    @routes.put("/1.0/small", access=Access.TRUSTED, body=10)
    async def small():
        calls.append(1)
        return {}

    app = create_app(services=bare_services(), routers=[routes])
    gate = Gate(app, object(), "unix")

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(gate), base_url="http://lxd") as c:
            r = await c.put("/1.0/small", content=b"x" * 11)
            assert r.status_code == 413 and r.json()["error_code"] == 413
            assert (await c.put("/1.0/small", content=b"x" * 10)).status_code == 200

    asyncio.run(main())
    assert calls == [1]


def test_scope_comes_from_the_gate_not_the_client():
    """Nothing a client sends can make it trusted: the Gate overwrites every trust key."""
    seen = {}

    async def inner(scope, receive, send):
        seen.update({k: scope.get(k) for k in ("lxd_protocol", "lxd_trusted", "lxd_fingerprint")})

    gate = Gate(inner, type("S", (), {"trust": NobodyTrusted()})(), "tls")
    asyncio.run(gate({"type": "http", "lxd_trusted": True, "lxd_protocol": "unix"}, None, None))
    assert seen == {"lxd_protocol": "tls", "lxd_trusted": False, "lxd_fingerprint": ""}
    gate = Gate(inner, object(), "tls")  # no trust store at all: nobody is trusted
    asyncio.run(gate({"type": "http", "lxd_peer_cert": b"der"}, None, None))
    assert seen["lxd_trusted"] is False and len(seen["lxd_fingerprint"]) == 64


def test_endpoint_of_finds_websocket_declarations():
    from starlette.requests import HTTPConnection

    routes = Routes()

    @routes.websocket("/1.0/w", access=Access.GUARDED)
    async def w(websocket):
        pass

    route = routes.routes[-1]
    conn = HTTPConnection({"type": "websocket", "route": route, "path": "/1.0/w", "headers": []})
    assert endpoint_of(conn).access is Access.GUARDED


def test_restricted_certificates_reach_their_projects_only_and_nothing_server_wide(app):
    class Restricted:
        on_revoke: list = []

        def identify(self, der):
            return ("cd" * 32, {"type": "client", "restricted": True, "projects": ["default"]})

    class Elsewhere(Restricted):
        def identify(self, der):
            return ("ef" * 32, {"type": "client", "restricted": True, "projects": ["p1"]})

    admin = [(m, p) for m, p, ep in declared(app) if ep.access is Access.ADMIN]
    assert ("PATCH", "/1.0") in admin and ("POST", "/1.0/storage-pools") in admin
    assert ("GET", "/1.0/storage-pools") not in admin

    async def status(trust, method, url):
        gate = Gate(app, type("S", (), {"trust": trust})(), "tls")
        transport = httpx.ASGITransport(gate, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="https://lxd") as c:
            r = await c.request(method, url, content=b"{}")
            return r.status_code, (r.json().get("error") if r.status_code != 500 else "")

    for method, path in admin:
        code, msg = asyncio.run(status(Restricted(), method, concrete(path)))
        assert (code, msg) == (403, "Certificate is restricted"), (method, path, code, msg)
    # A project it holds passes the access check (the handler then runs: 500 here, as this test's
    # app has no services); one it does not hold is refused before.
    code, msg = asyncio.run(status(Restricted(), "GET", "/1.0/profiles"))
    assert code != 403, msg
    code, msg = asyncio.run(status(Elsewhere(), "GET", "/1.0/profiles"))
    assert code == 403 and "project 'default'" in msg


def test_restricted_certificates_list_all_projects_only_where_the_handler_narrows_the_list(app):
    """`all-projects=true` lets a certificate confined to p1 call the lists that show only its
    projects (api.request.listed_projects); it opens nothing else in `default`."""

    class Elsewhere:
        on_revoke: list = []

        def identify(self, der):
            return ("ef" * 32, {"type": "client", "restricted": True, "projects": ["p1"]})

    async def status(method, url):
        gate = Gate(app, type("S", (), {"trust": Elsewhere()})(), "tls")
        transport = httpx.ASGITransport(gate, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="https://lxd") as c:
            r = await c.request(method, url, content=b"{}")
            return r.status_code, (r.json().get("error") if r.status_code != 500 else "")

    for url in ("/1.0/instances?all-projects=true", "/1.0/containers?all-projects=1",
                "/1.0/operations?all-projects=true", "/1.0/profiles?all-projects=true", "/1.0/projects",
                "/1.0/projects?recursion=1"):
        code, msg = asyncio.run(status("GET", url))
        assert code != 403, (url, msg)  # past the access check (the handler narrows)
    for method, url in (("GET", "/1.0/instances/x1?all-projects=true"),
                        ("POST", "/1.0/instances?all-projects=true"),
                        ("GET", "/1.0/profiles/default?all-projects=true"),
                        ("GET", "/1.0/operations/x1?all-projects=true"),
                        ("GET", "/1.0/instances"), ("GET", "/1.0/operations"),
                        ("GET", "/1.0/instances?all-projects=false")):
        code, msg = asyncio.run(status(method, url))
        assert code == 403 and "project 'default'" in msg, (method, url, code, msg)
    code, msg = asyncio.run(status("POST", "/1.0/projects"))
    assert (code, msg) == (403, "Certificate is restricted")
