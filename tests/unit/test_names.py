"""Object name rules (lxd_daemon.names), the JSON body reader's limits, and that every route of
the app gets the name check."""

from __future__ import annotations

import pytest

from lxd_daemon import names
from lxd_daemon.api.request import DEPTH_LIMIT, loads, validate
from lxd_daemon.errors import BadRequest
from tests.helpers import bare_services

ODD = ["", ".", "..", "a/b", "a\x00b", "a\nb", "x" * 10_000, "\udfff", "a\udfffb"]


@pytest.mark.parametrize("name", ["c1", "a", "web-01", "A" * 63, "x-y-z"])
def test_instance_names_accepted(name):
    assert names.instance(name) == name


@pytest.mark.parametrize("name", ODD + ["-a", "a-", "1a", "123", "a_b", "a.b", "é", "a b", "A" * 64])
def test_instance_names_refused(name):
    with pytest.raises(names.InvalidName):
        names.instance(name)


@pytest.mark.parametrize("name", ["default", "my.profile", "prøfil", "профиль", "a-b_c", "x" * 63])
def test_profile_names_accepted(name):
    assert names.profile(name) == name


@pytest.mark.parametrize("name", ODD + ["a b", "a'b", 'a"b', "a\\b", "x" * 64])
def test_profile_names_refused(name):
    with pytest.raises(names.InvalidName):
        names.profile(name)


@pytest.mark.parametrize("name", ["busybox", "a/b/", "a/b", "ubuntu/22.04", "a//b", "/x", "a.b/..c"])
def test_alias_names_may_contain_slashes(name):
    assert names.alias(name) == name


@pytest.mark.parametrize("name", ["", "a\x00", "a\udfff", "x" * 256, "../x", "a/./b", "a/..", ".", "a:b"])
def test_alias_names_refused(name):
    with pytest.raises(names.InvalidName):
        names.alias(name)


@pytest.mark.parametrize("name", ["my project", "my_project", "it's", "*", "a/b", "..", ""])
def test_project_names_refused(name):
    with pytest.raises(names.InvalidName):
        names.project(name)


@pytest.mark.parametrize("check", [names.pool, names.volume, names.network, names.backup, names.snapshot,
                                   names.generic, names.operation])
@pytest.mark.parametrize("name", ODD)
def test_every_kind_refuses_odd_names(check, name):
    with pytest.raises(names.InvalidName):
        check(name)


def test_fingerprints_are_hex_and_others_not_found():
    assert names.fingerprint("abc123") == "abc123"
    with pytest.raises(names.InvalidName) as e:
        names.fingerprint("busybox")
    assert e.value.status == 404
    with pytest.raises(names.InvalidName) as e:
        names.fingerprint("a\x00")
    assert e.value.status == 400


def test_log_file_names():
    assert names.log_file("lxc.log") == "lxc.log"
    assert names.log_file("exec_0a1b.stdout") == "exec_0a1b.stdout"
    for bad in ("..", "lxc.log\n", "../lxc.conf", "passwd", ".lxc.log"):
        with pytest.raises(names.InvalidName):
            names.log_file(bad)


def test_kinds_for_route():
    k = names.kinds_for_route("/1.0/instances/{name}/logs/{file}")
    assert k == {"name": names.instance, "file": names.log_file}
    k = names.kinds_for_route("/1.0/storage-pools/{pool}/volumes/{type}/{volume}")
    assert k == {"pool": names.pool, "type": names.volume_type, "volume": names.volume}
    assert names.kinds_for_route("/1.0/images/aliases/{name:path}") == {"name": names.alias}
    assert names.kinds_for_route("/1.0/widgets/{id}") == {"id": names.generic}
    assert names.kinds_for_route("/1.0/instances/{name}/snapshots/{snap}")["snap"] is names.snapshot


def test_json_depth_refused_before_parsing():
    loads(b"[" * DEPTH_LIMIT + b"]" * DEPTH_LIMIT)
    for raw in (b"[" * 100_000, b'{"a":' * 50_000, b"[" * (DEPTH_LIMIT + 1)):
        with pytest.raises(BadRequest, match="nested deeper"):
            loads(raw)
    # Brackets inside strings don't count; escaped quotes don't end a string.
    assert loads(b'{"a": "[[[[[[\\"[[[["}') == {"a": '[[[[[["[[[['}


def test_json_unterminated_strings_scan_in_linear_time():
    import time

    t = time.monotonic()
    for raw in (b'"' + b'\\"' * 300_000, b'"' * 300_000, b'["' * 200_000):
        with pytest.raises(BadRequest):
            loads(raw)
    assert time.monotonic() - t < 5


@pytest.mark.parametrize("raw", [b'"\\udfff"', b'{"name": "x\\ud800"}', b'{"\\udc00": 1}', b'[["\\udfff"]]'])
def test_json_lone_surrogates_refused(raw):
    with pytest.raises(BadRequest, match="surrogate"):
        loads(raw)


def test_null_means_not_given_in_every_request_model():
    from lxd_daemon.wire import ServerPut
    from lxd_daemon.wire.exec import ImageMetadata, InstanceExecPost
    from lxd_daemon.wire.images import ImageAliasesEntryPut
    from lxd_daemon.wire.instances import InstanceStatePut

    e = validate(InstanceExecPost, {"command": ["ls"], "user": None, "group": None, "cwd": None,
                                    "width": None, "height": None, "environment": None})
    assert (e.user, e.group, e.cwd, e.width, e.height) == (0, 0, "", 0, 0)
    s = validate(InstanceStatePut, {"action": "stop", "force": None, "timeout": None})
    assert (s.force, s.timeout) == (False, -1)
    assert validate(ServerPut, {"config": None}).config == {}
    assert validate(ImageAliasesEntryPut, {"description": None}).description == ""
    m = validate(ImageMetadata, {"templates": {"h.tpl": {"when": ["create"], "template": "h.tpl",
                                                         "properties": None}}, "properties": None})
    assert m.templates["h.tpl"].properties == {} and m.properties == {}


def test_every_request_model_takes_null_as_not_given():
    """Walk every Request subclass: a body of nulls for all its fields validates as {} does."""
    import importlib
    import pkgutil

    import lxd_daemon.wire as wire

    for mod in pkgutil.iter_modules(wire.__path__):
        importlib.import_module(f"lxd_daemon.wire.{mod.name}")

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    seen = 0
    for model in set(subclasses(wire.Request)):
        nulls = {(f.alias or n): None for n, f in model.model_fields.items()}
        try:
            want = model.model_validate({})
        except Exception:
            continue  # required fields: null is "not given" and so missing, as {} is
        assert model.model_validate(nulls) == want, model
        seen += 1
    assert seen >= 10


def test_body_names_checked_by_kind():
    from lxd_daemon.wire.images import ImageAliasesPost
    from lxd_daemon.wire.instances import InstancesPost
    from lxd_daemon.wire.profiles import ProfilesPost

    assert validate(ImageAliasesPost, {"name": "a/b/", "target": "ab"}).name == "a/b/"
    for model, name in ((ProfilesPost, "a\x00b"), (ProfilesPost, "x" * 10_000), (InstancesPost, "1abc"),
                        (InstancesPost, ".."), (ProfilesPost, "a/b")):
        with pytest.raises(BadRequest, match="name"):
            validate(model, {"name": name})


def api_routes(routes):
    """The app's routes, through included routers (FastAPI keeps those as wrappers)."""
    for r in routes:
        inner = getattr(r, "original_router", None)
        if inner is not None:
            yield from api_routes(inner.routes)
        elif hasattr(r, "path"):
            yield r


def test_every_route_of_the_app_checks_names():
    """The check is app-wide: routes of routers included after create_app's own get it too."""
    import asyncio

    import httpx

    from lxd_daemon.api.access import Access, Gate, Routes
    from lxd_daemon.app import create_app

    extra = Routes()

    @extra.get("/1.0/widgets/{widget}", access=Access.TRUSTED)
    async def get_widget(widget: str):
        return {"widget": widget}

    app = create_app(services=bare_services(), routers=[extra])
    assert "/1.0/widgets/{widget}" in {r.path for r in api_routes(app.app.routes)}

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(Gate(app, object(), "unix")),
                                     base_url="http://lxd") as c:
            assert (await c.get("/1.0/widgets/ok")).json() == {"widget": "ok"}
            for bad in ("%2e%2e", "a%00b", "x" * 300):
                r = await c.get(f"/1.0/widgets/{bad}")
                assert r.status_code == 400 and r.json()["error_code"] == 400, r.text

    asyncio.run(main())


def test_response_headers_and_bodies_carry_any_name():
    """A name that passed its rules can't break the response after the work is done (item 4)."""
    import json

    from lxd_daemon.api.envelope import dumps, header_url, sync

    assert header_url("/1.0/profiles/профиль") == "/1.0/profiles/%D0%BF%D1%80%D0%BE%D1%84%D0%B8%D0%BB%D1%8C"
    assert header_url("/1.0/profiles/50%") == "/1.0/profiles/50%25"
    assert header_url("/1.0/images/aliases/a%2Fb/") == "/1.0/images/aliases/a%2Fb/"
    resp = sync(None, status=201, location="/1.0/profiles/prøfil")
    assert dict(resp.headers)["location"].isascii()
    assert json.loads(dumps({"e": "bad \udfff text"})) == {"e": "bad \udfff text"}
