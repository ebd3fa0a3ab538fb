"""ProjectService on the real schema (migrations to head): the project records, the features a new
project gets, and the lifecycle rules (default is permanent, only empty projects are renamed or
deleted, features change only on empty projects)."""

from __future__ import annotations

import asyncio
import json

import pytest

from lxd_daemon.db.engine import Database
from lxd_daemon.db.migrate import upgrade
from lxd_daemon.errors import BadRequest, Conflict, Forbidden, NotFound
from lxd_daemon.projects.service import ProjectService


@pytest.fixture
def svc(tmp_path):
    upgrade(tmp_path / "lxd.db")
    db = Database(tmp_path / "lxd.db")
    s = ProjectService(db)
    asyncio.run(s.load())
    yield s
    db.close()


def rows(svc) -> dict[str, dict]:
    return {r[0]: json.loads(r[1]) for r in svc.db.run_sync(
        lambda s: s.exec_driver_sql("SELECT name, config FROM projects").all())}


def test_default_exists_with_every_feature(svc):
    p = svc.get("default")
    assert all(p.has(f) for f in ("images", "profiles", "storage.volumes", "networks"))
    with pytest.raises(NotFound, match="Project not found"):
        svc.get("nope")


def test_create_sets_lxd_feature_defaults_and_effective_projects(svc):
    asyncio.run(svc.create("p1", "first", {}))
    asyncio.run(svc.create("p2", "", {"features.images": "false", "limits.instances": "3"}))
    assert rows(svc)["p1"] == {"features.images": "true", "features.profiles": "true",
                              "features.storage.volumes": "true"}
    p2 = svc.get("p2")
    assert (p2.effective("images"), p2.effective("profiles"), p2.effective("networks")) == ("default", "p2", "default")
    assert svc.config("p2")["limits.instances"] == "3"  # the policy state sees it at once
    assert svc.names() == ["default", "p1", "p2"]
    with pytest.raises(Conflict):
        asyncio.run(svc.create("p1", "", {}))
    with pytest.raises(BadRequest, match="storage buckets"):
        asyncio.run(svc.create("p3", "", {"features.storage.buckets": "true"}))
    with pytest.raises(BadRequest, match='Invalid project configuration key "bogus"'):
        asyncio.run(svc.create("p3", "", {"bogus": "1"}))
    assert "p3" not in svc.projects


def test_a_failed_create_hook_rolls_the_project_back(svc):
    async def boom(name):
        raise BadRequest("no default profile")

    svc.on_create.append(boom)
    with pytest.raises(BadRequest):
        asyncio.run(svc.create("p1", "", {}))
    assert "p1" not in svc.projects and "p1" not in rows(svc)


def test_rename_and_delete_only_empty_projects_never_default(svc):
    held: dict[str, list[str]] = {"p1": ["/1.0/instances/c1?project=p1", "/1.0/profiles/default?project=p1"]}

    async def provider(project):
        return held.get(project, [])

    svc.providers.append(provider)
    asyncio.run(svc.create("p1", "", {}))
    with pytest.raises(Forbidden, match="cannot be deleted"):
        asyncio.run(svc.delete("default"))
    with pytest.raises(Forbidden, match="cannot be renamed"):
        asyncio.run(svc.rename("default", "x"))
    with pytest.raises(BadRequest, match="Only empty projects can be removed"):
        asyncio.run(svc.delete("p1"))
    with pytest.raises(BadRequest, match="Only empty projects can be renamed"):
        asyncio.run(svc.rename("p1", "p9"))
    with pytest.raises(BadRequest, match="Features can only be changed on empty projects"):
        svc.check_features_change("p1", {"features.images": "false"}, asyncio.run(svc.is_empty("p1")))
    held["p1"] = ["/1.0/profiles/default?project=p1"]  # its own default profile doesn't count
    moved = []

    async def on_rename(old, new):
        moved.append((old, new))

    svc.on_rename.append(on_rename)
    asyncio.run(svc.rename("p1", "p9"))
    assert moved == [("p1", "p9")] and "p9" in rows(svc) and "p1" not in svc.projects
    assert svc.config("p9")["features.images"] == "true"
    asyncio.run(svc.delete("p9"))
    assert set(rows(svc)) == {"default"}


def test_nothing_is_made_in_a_project_while_it_is_deleted_or_renamed(svc):
    """A project is closed (check_open refuses) from before its emptiness check to the end of the
    delete or rename: what was made before is seen, nothing can be made after."""
    seen = []

    async def provider(project):
        try:
            svc.check_open(project)
            seen.append("open")
        except NotFound:
            seen.append("closed")
        return []

    svc.providers.append(provider)
    asyncio.run(svc.create("p1", "", {}))
    svc.check_open("p1")
    asyncio.run(svc.rename("p1", "p2"))
    svc.check_open("p2")
    with pytest.raises(NotFound):
        svc.check_open("p1")
    asyncio.run(svc.delete("p2"))
    assert seen == ["closed", "closed"]
    with pytest.raises(NotFound):
        svc.check_open("p2")
