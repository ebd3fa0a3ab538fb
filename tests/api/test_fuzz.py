"""Fuzzing every route of the daemon's own route table with refused requests (issue 8).

Malformed bodies, wrong types, huge and odd strings (NUL, lone surrogates, non-ASCII, 10,000
characters, `..`, `/`), odd names in path parameters, odd query values, deep nesting and unknown
methods go to every route of a real daemon of this module's own (its routes are read from the
routers in lxd_daemon.api, the same objects the daemon serves). Every answer must be below 500
(501, "not implemented yet", excepted), every error in LXD's envelope with error_code equal to
the HTTP status, the daemon must stay alive, and a refused request must create or remove no
instance, profile, image, alias or storage pool.

Requests that could be valid and do real work are not sent: real object names go out only with
GET/HEAD or with a body that can't validate (never with DELETE, which takes no body).

Default run: a sweep of every route and method plus a short hypothesis run (well under a minute).
Longer run: `FUZZ_LONG=1 .venv/bin/python -m pytest -q tests/api/test_fuzz.py` (FUZZ_EXAMPLES=N
sets the number of hypothesis examples; default 300, 5000 with FUZZ_LONG).
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import uuid
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lxd_daemon import names
from tests.helpers import Daemon, ensure_containers_ready, run_prefix

pytestmark = pytest.mark.integration

LONG = os.environ.get("FUZZ_LONG", "") not in ("", "0")
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "5000" if LONG else "300"))
SKIP = {("PUT", "/internal/shutdown")}  # a valid request that stops the daemon
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "FOO", "PROPFIND", "M-SEARCH"]


# -- the route table -------------------------------------------------------------------------------

def _walk(routes):
    for r in routes:
        inner = getattr(r, "original_router", None)
        if inner is not None:
            yield from _walk(inner.routes)
        elif hasattr(r, "methods") and hasattr(r, "path"):
            yield r


def route_table() -> list[tuple[str, str]]:
    """(method, path template) for every HTTP route of every router in lxd_daemon.api."""
    import lxd_daemon.api as api

    seen: set[tuple[str, str]] = set()
    for mod in pkgutil.iter_modules(api.__path__):
        module = importlib.import_module(f"lxd_daemon.api.{mod.name}")
        router = getattr(module, "router", None)
        if router is None:
            continue
        for r in _walk(router.routes):
            for m in r.methods or ():
                if (m, r.path) not in SKIP:
                    seen.add((m, r.path))
    return sorted(seen, key=lambda t: (t[1], t[0]))


ROUTES = route_table()


# -- values ------------------------------------------------------------------------------------------

# Odd path parameter values, as they go on the wire (percent-encoded where they must be).
ODD_SEGMENTS = ["%2e%2e", "..", "a%00b", "x" * 10_000, ".", "%2e", "a%0ab", "%ff%fe", "%ed%bf%bf",
                "%C3%A9t%C3%A9", "-", "1", "a%2Fb", "a%20b", "*", "%25", "a'b", "%09", "_"]
# Odd strings inside JSON bodies (never valid names of any kind).
ODD_STRINGS = ["a\x00b", "\udfff", "x\ud800y", "x" * 10_000, "a\nb", "\x7f", "é" * 300, "../" * 100]
WRONG = [0, -1, 1.5, True, [], [1, "a"], {"a": {"b": None}}, {"alias": 5, "type": []}, "", "x", None]
FIELDS = ["name", "config", "devices", "profiles", "description", "source", "type", "action", "timeout",
          "force", "command", "environment", "target", "properties", "aliases", "public", "driver",
          "wait-for-websocket", "user", "group", "cwd", "width", "height", "templates", "state", "migration"]


def _real_values(d: Daemon, ct: str) -> dict:
    fp = d.api("GET", "/1.0/images/aliases/busybox").json()["metadata"]["target"]
    return {names.instance: ct, names.profile: "default", names.alias: "busybox", names.pool: "default",
            names.project: "default", names.fingerprint: fp, names.operation: str(uuid.uuid4()),
            names.network: "lo", names.log_file: "lxc.log", names.volume_type: "custom",
            names.volume: "vol0", names.snapshot: "snap0", names.backup: "backup0",
            names.generic: "thing", names.path_segment: "a/b"}


def fill(template: str, values: dict[str, str]) -> str:
    out = template
    for param in names.kinds_for_route(template):
        out = out.replace("{" + param + (":path" if "{" + param + ":path}" in template else "") + "}",
                          values[param])
    return out


def real_path(template: str, real: dict) -> str:
    """The template with the names of real objects (`real`: {validator: name})."""
    return fill(template, {p: quote(real[k], safe="/") for p, k in names.kinds_for_route(template).items()})


def odd_path(template: str, odd: str) -> str:
    return fill(template, {p: odd for p in names.kinds_for_route(template)})


def refused_bodies() -> list[bytes]:
    """Bodies no route can accept: malformed, too deep, not an object, wrong types."""
    bodies = [b"{", b"\xff\xfe\x00", b"[" * 50_000, b'{"a":' * 70 + b"1" + b"}" * 70, b"null" * 3,
              b'"\\udfff"', b"[1, 2]", b"123", b'{"name": "\\udfff"}']
    bodies += [json.dumps({f: w for f in FIELDS}, ensure_ascii=False).encode("utf-8", "surrogatepass")
               for w in (0, [1], "\x00" * 3, {"x": 1})]
    return bodies


def _json_bytes(value) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")


# A body of wrong types: at least one known field with a value of a type no model takes there.
wrong_bodies = st.one_of(
    st.fixed_dictionaries({"name": st.sampled_from(ODD_STRINGS + WRONG[:7])},
                          optional={f: st.sampled_from(WRONG + ODD_STRINGS) for f in FIELDS if f != "name"}).map(_json_bytes),
    st.binary(max_size=200),
    st.sampled_from(refused_bodies()),
    st.integers(min_value=65, max_value=5000).map(lambda n: b"[" * n + b"]" * n),
    st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                 lambda c: st.lists(c, max_size=3), max_leaves=10).map(_json_bytes),
)
odd_query = st.fixed_dictionaries({}, optional={
    "project": st.sampled_from(["nosuch", "..", "a/b", "x" * 5000, "a\x00b", "default"]),
    "recursion": st.sampled_from(["-1", "x", "99999999999999999999", "2"]),
    "path": st.sampled_from(["..", "/../../etc/passwd", "a\x00b", "/" * 100, "x" * 5000]),
    "filter": st.sampled_from(["name eq", "(((((", "x" * 3000, "status eq running"]),
    "timeout": st.sampled_from(["-5", "x", "1e999"]),
})


# -- the daemon and its objects ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def target(tmp_path_factory):
    base = tmp_path_factory.mktemp("fuzz")
    d = Daemon(lxd_dir=base / "var", conf_dir=base / "conf")
    d.start()
    try:
        ensure_containers_ready(d)
        ct = f"{run_prefix()}-fz"
        d.lxc("init", "busybox", ct)
        with d.http(timeout=120) as client:
            yield d, client, _real_values(d, ct)
        d.lxc("delete", "-f", ct, check=False)
    finally:
        d.stop()


def objects(client: httpx.Client) -> dict[str, list]:
    return {path: sorted(client.get(path).json()["metadata"])
            for path in ("/1.0/instances", "/1.0/profiles", "/1.0/images", "/1.0/images/aliases",
                         "/1.0/storage-pools")}


def check(resp: httpx.Response, what: str) -> None:
    assert resp.status_code < 500 or resp.status_code == 501, (what, resp.status_code, resp.text[:300])
    if resp.status_code >= 400 and resp.request.method != "HEAD":
        try:
            doc = resp.json()
        except ValueError:
            raise AssertionError((what, resp.status_code, "not JSON", resp.text[:300])) from None
        assert doc.get("type") == "error" and doc.get("error_code") == resp.status_code, (what, doc)


def send(client: httpx.Client, method: str, path: str, body: bytes = b"", params=None,
         content_type: str = "application/json") -> httpx.Response:
    url = httpx.URL("http://lxd" + path)
    if params:
        url = url.copy_merge_params(params)
    req = client.build_request(method, url, content=body or None, headers={"Content-Type": content_type})
    return client.send(req)


def run_case(client: httpx.Client, before: dict, method: str, path: str, body: bytes, params=None,
             content_type: str = "application/json") -> dict:
    """Send one request and check it; returns the object lists to compare the next request with."""
    what = f"{method} {path[:120]} {body[:60]!r} {params}"
    resp = send(client, method, path, body, params, content_type)
    check(resp, what)
    if resp.status_code == 202:  # accepted: let its task finish before the next baseline
        doc = resp.json()
        if doc.get("operation") and (doc.get("metadata") or {}).get("class") == "task":
            client.get(f"{doc['operation']}/wait", params={"timeout": 60})
    after = objects(client)
    if resp.status_code >= 400:
        assert after == before, (what, "refused, but objects changed", before, after)
    return after


def sweep_cases(real: dict):
    """Every route, every method it has plus unknown ones: odd names with any body, real names
    with bodies that can't validate."""
    bodies = refused_bodies()
    for i, (method, template) in enumerate(ROUTES):
        params = names.kinds_for_route(template)
        realp = real_path(template, real)
        n = len(ODD_SEGMENTS)
        odds = ODD_SEGMENTS[:4] + [ODD_SEGMENTS[4 + (i + k) % (n - 4)] for k in range(3)]
        for j, odd in enumerate(odds if params else [None]):
            body = bodies[(i + j) % len(bodies)]
            yield (method, odd_path(template, odd), body) if odd is not None else (method, realp, body)
        if method not in ("GET", "HEAD", "DELETE"):  # DELETE takes no body: it would be valid
            for body in bodies[:6] if i % 2 else bodies[6:]:
                yield method, realp, body
        yield ["FOO", "PROPFIND", "BREW"][i % 3], realp, b""


def test_sweep_every_route(target):
    d, client, real = target
    before = objects(client)
    n = 0
    for method, path, body in sweep_cases(real):
        before = run_case(client, before, method, path, body)
        n += 1
    assert n >= len(ROUTES) * 3
    assert client.get("/1.0").status_code == 200
    assert d.proc.poll() is None


def test_fuzz_routes(target):
    d, client, real = target
    state = {"before": objects(client)}

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=not LONG, database=None,
              suppress_health_check=list(HealthCheck))
    @given(route=st.sampled_from(ROUTES), odd_names=st.booleans(), odd=st.sampled_from(ODD_SEGMENTS),
           method=st.sampled_from(METHODS), use_route_method=st.booleans(), body=wrong_bodies,
           query=odd_query, content_type=st.sampled_from(["application/json", "text/plain", ""]))
    def one(route, odd_names, odd, method, use_route_method, body, query, content_type):
        route_method, template = route
        params = names.kinds_for_route(template)
        if use_route_method:
            method = route_method
        if params and odd_names:
            path = odd_path(template, odd)
        else:
            path = real_path(template, real)
            if method == "DELETE":
                return  # takes no body: with real names it could be valid
            if method not in ("GET", "HEAD"):
                # Real names with a body that could be valid: only bodies that can't be.
                body = refused_bodies()[len(body) % len(refused_bodies())]
                content_type = "application/json"
                query = {k: v for k, v in query.items() if k != "path"}
            if (method, template) in SKIP:
                return
        if (route_method, template) == ("POST", "/1.0/images") and content_type != "application/json":
            content_type = "application/json"  # an upload: its own tests cover refused tarballs
        state["before"] = run_case(client, state["before"], method, path, body, query, content_type)

    one()
    assert client.get("/1.0").status_code == 200
    assert d.proc.poll() is None


def test_route_table_is_the_daemons(target):
    """Every route read from lxd_daemon.api answers on the daemon (none is a 404 for its path
    shape), so the fuzzing reaches the routes the daemon really serves."""
    d, client, real = target
    assert len(ROUTES) > 40
    missing = []
    for method, template in ROUTES:
        if method != "GET" or "{" not in template:
            continue
        r = client.get(real_path(template, real))
        if r.status_code == 404 and r.json()["error"] in ("not found", "Not Found"):
            missing.append(template)
    assert not missing, missing
