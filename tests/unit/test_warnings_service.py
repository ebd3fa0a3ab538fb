"""WarningService on the real schema (migrations to head): raising is an upsert per type, project
and entity (count, last message and time bumped); resolving marks it resolved and raising it again
makes it new; the user's statuses; delete; prune; and the None-safe helpers."""

from __future__ import annotations

import asyncio
import time

import pytest

from lxd_daemon.db.engine import Database
from lxd_daemon.db.migrate import upgrade
from lxd_daemon.errors import BadRequest, Forbidden, NotFound
from lxd_daemon.warnings import (
    CRIU_UNUSABLE,
    INSTANCE_AUTOSTART_FAILURE,
    STORAGE_POOL_UNAVAILABLE,
    WarningService,
    raise_warning,
    resolve_warning,
)
from lxd_daemon.warnings.service import entity_type_of

POOL = "/1.0/storage-pools/p1"


@pytest.fixture
def svc(tmp_path):
    upgrade(tmp_path / "lxd.db")
    db = Database(tmp_path / "lxd.db")
    yield WarningService(db)
    db.close()


def run(coro):
    return asyncio.run(coro)


def raw(svc, uuid: str):
    return svc.db.run_sync(lambda s: s.exec_driver_sql(
        "SELECT project, entity_type, entity_url, count, status, severity, first_seen_at, last_seen_at "
        "FROM warnings WHERE uuid=?", (uuid,)).one())


def test_raise_is_an_upsert_per_type_project_and_entity(svc):
    u1 = run(svc.raise_(STORAGE_POOL_UNAVAILABLE, "first", entity_url=POOL))
    w = run(svc.get(u1))
    assert set(w) == {"status", "uuid", "location", "project", "type", "count", "first_seen_at",
                      "last_seen_at", "last_message", "severity", "entity_url"}
    assert (w["status"], w["count"], w["severity"], w["project"], w["entity_url"], w["last_message"]) == \
        ("new", 1, "high", "", POOL, "first")
    assert w["first_seen_at"].endswith("Z") and w["first_seen_at"] == w["last_seen_at"]
    assert raw(svc, u1)[:2] == (None, "storage-pool")  # server-wide: NULL project
    time.sleep(0.01)
    u2 = run(svc.raise_(STORAGE_POOL_UNAVAILABLE, "second", entity_url=POOL))
    assert u2 == u1
    w = run(svc.get(u1))
    assert (w["count"], w["last_message"]) == (2, "second")
    assert w["last_seen_at"] > w["first_seen_at"]
    # another entity, another project or another type is another warning
    others = {run(svc.raise_(STORAGE_POOL_UNAVAILABLE, "x", entity_url="/1.0/storage-pools/p2")),
              run(svc.raise_(INSTANCE_AUTOSTART_FAILURE, "x", project="default", entity_url="/1.0/instances/c1")),
              run(svc.raise_(INSTANCE_AUTOSTART_FAILURE, "x", project="p", entity_url="/1.0/instances/c1")),
              run(svc.raise_(CRIU_UNUSABLE, "x"))}
    assert len(others) == 4 and u1 not in others
    assert len(run(svc.list())) == 5
    assert [w["project"] for w in run(svc.list("p"))] == ["p"]
    assert run(svc.get(run(svc.raise_(CRIU_UNUSABLE, "y"))))["count"] == 2
    assert run(svc.get(run(svc.raise_(CRIU_UNUSABLE, "y"))))["severity"] == "low"


def test_resolve_then_raise_again_is_new(svc):
    u = run(svc.raise_(STORAGE_POOL_UNAVAILABLE, "gone", entity_url=POOL))
    assert run(svc.resolve(STORAGE_POOL_UNAVAILABLE, entity_url="/1.0/storage-pools/other")) == 0
    assert run(svc.resolve(STORAGE_POOL_UNAVAILABLE, project="default", entity_url=POOL)) == 0
    assert run(svc.resolve(STORAGE_POOL_UNAVAILABLE, entity_url=POOL)) == 1
    assert run(svc.get(u))["status"] == "resolved"
    assert run(svc.resolve(STORAGE_POOL_UNAVAILABLE, entity_url=POOL)) == 0  # already resolved
    assert run(svc.raise_(STORAGE_POOL_UNAVAILABLE, "again", entity_url=POOL)) == u
    w = run(svc.get(u))
    assert (w["status"], w["count"], w["last_message"]) == ("new", 2, "again")


def test_user_statuses_and_an_acknowledged_warning_stays_acknowledged(svc):
    u = run(svc.raise_(INSTANCE_AUTOSTART_FAILURE, "m", project="default", entity_url="/1.0/instances/c1"))
    run(svc.set_status(u, "acknowledged"))
    assert run(svc.get(u))["status"] == "acknowledged"
    run(svc.raise_(INSTANCE_AUTOSTART_FAILURE, "m2", project="default", entity_url="/1.0/instances/c1"))
    assert (run(svc.get(u))["status"], run(svc.get(u))["count"]) == ("acknowledged", 2)
    run(svc.set_status(u, "new"))
    assert run(svc.get(u))["status"] == "new"
    with pytest.raises(BadRequest, match="Invalid warning status"):
        run(svc.set_status(u, "bogus"))
    with pytest.raises(Forbidden, match="acknowledged"):
        run(svc.set_status(u, "resolved"))
    with pytest.raises(NotFound, match="Warning not found"):
        run(svc.set_status("nope", "new"))


def test_delete_forget_and_prune(svc):
    u = run(svc.raise_(CRIU_UNUSABLE, "m"))
    run(svc.delete(u))
    with pytest.raises(NotFound):
        run(svc.get(u))
    with pytest.raises(NotFound):
        run(svc.delete(u))
    run(svc.raise_(INSTANCE_AUTOSTART_FAILURE, "m", project="default", entity_url="/1.0/instances/c1"))
    assert run(svc.forget("/1.0/instances/c1")) == 1 and run(svc.list()) == []
    old = run(svc.raise_(STORAGE_POOL_UNAVAILABLE, "m", entity_url=POOL))
    run(svc.resolve(STORAGE_POOL_UNAVAILABLE, entity_url=POOL))
    fresh = run(svc.raise_(CRIU_UNUSABLE, "m"))
    assert run(svc.prune()) == 0  # resolved just now: kept for a day
    svc.db.run_sync(lambda s: s.exec_driver_sql("UPDATE warnings SET updated_at=updated_at-90000 WHERE uuid=?", (old,)))
    assert run(svc.prune()) == 1
    assert [w["uuid"] for w in run(svc.list())] == [fresh]


def test_helpers_do_nothing_without_the_service_and_never_raise(svc):
    class Bare:
        warnings = None

    run(raise_warning(Bare(), CRIU_UNUSABLE, "m"))
    run(resolve_warning(Bare(), CRIU_UNUSABLE))

    class Broken:
        class warnings:  # noqa: N801
            @staticmethod
            async def raise_(*a, **k):
                raise RuntimeError("db gone")

            @staticmethod
            async def resolve(*a, **k):
                raise RuntimeError("db gone")

    run(raise_warning(Broken(), CRIU_UNUSABLE, "m"))
    run(resolve_warning(Broken(), CRIU_UNUSABLE))

    class With:
        warnings = svc

    run(raise_warning(With(), CRIU_UNUSABLE, "m"))
    assert [w["type"] for w in run(svc.list())] == [CRIU_UNUSABLE]
    run(resolve_warning(With(), CRIU_UNUSABLE))
    assert run(svc.list())[0]["status"] == "resolved"


def test_entity_types():
    assert entity_type_of("/1.0/instances/c1?project=p") == "instance"
    assert entity_type_of(POOL) == "storage-pool"
    assert entity_type_of("") == ""


def test_criu_startup_raises_or_resolves_by_what_criu_answers_here(svc):
    """The real probe (`criu check` on this host): unusable -> a low warning naming why; usable
    -> none left new."""
    from lxd_daemon.migration import criu

    class Server:
        def advertise(self, *names):
            pass

    class Services:
        server = Server()
        warnings = svc

    async def go():
        criu.PROBE.forget()
        await criu.startup(Services(), delay=0)
        return await criu.status()

    st = run(go())
    found = [w for w in run(svc.list()) if w["type"] == CRIU_UNUSABLE]
    if st.usable:
        assert all(w["status"] == "resolved" for w in found)
    else:
        [w] = found
        assert (w["status"], w["severity"], w["entity_url"]) == ("new", "low", "")
        assert st.reason in w["last_message"]
