"""Start-up host checks that raise warnings: root's subordinate id ranges (/etc/subuid, /etc/subgid;
here tmp files) missing -> "Missing subordinate id range" naming the file and the default range;
found at a later check -> resolved. The hook runs on a WarningService on the real schema."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from lxd_daemon.db.engine import Database
from lxd_daemon.db.migrate import upgrade
from lxd_daemon.warnings import SUBID_RANGE_MISSING, WarningService
from lxd_daemon.warnings.host_checks import check_subid_ranges, missing_subid_ranges


@pytest.fixture
def svc(tmp_path):
    upgrade(tmp_path / "lxd.db")
    db = Database(tmp_path / "lxd.db")
    s = WarningService(db)
    asyncio.run(s.load())
    yield s
    db.close()


@pytest.fixture
def files(tmp_path):
    u, g = tmp_path / "subuid", tmp_path / "subgid"
    u.write_text("alice:100000:65536\nroot:1000000:1000000000\n")
    g.write_text("0:2000000:65536\n")  # root by uid counts too
    return u, g


def test_pure_check(files, tmp_path):
    u, g = files
    assert missing_subid_ranges(u, g) == []
    u.write_text("alice:100000:65536\nroot:bad:1\n")
    [msg] = missing_subid_ranges(u, g)
    assert str(u) in msg and "uid" in msg and "1000000:1000000000" in msg, msg
    missing = tmp_path / "nope"
    both = missing_subid_ranges(missing, missing)
    assert len(both) == 2 and all(str(missing) in m for m in both)
    assert "gid" in both[1]


def _warnings(svc) -> list[dict]:
    return [w for w in asyncio.run(svc.list()) if w["type"] == SUBID_RANGE_MISSING]


def test_hook_raises_then_resolves(svc, files):
    u, g = files
    services = SimpleNamespace(warnings=svc)
    assert asyncio.run(check_subid_ranges(services, u, g)) == []
    assert _warnings(svc) == []

    g.write_text("")  # no range for root in subgid
    [msg] = asyncio.run(check_subid_ranges(services, u, g))
    [w] = _warnings(svc)
    assert (w["status"], w["severity"], w["project"], w["entity_url"]) == ("new", "low", "", "")
    assert w["last_message"] == msg and str(g) in msg and "default range" in msg

    u.unlink()  # both now: the same warning, seen again, naming both files
    asyncio.run(check_subid_ranges(services, u, g))
    [w2] = _warnings(svc)
    assert (w2["uuid"], w2["count"]) == (w["uuid"], 2)
    assert str(u) in w2["last_message"] and str(g) in w2["last_message"]

    u.write_text("root:1000000:1000000000\n")
    g.write_text("root:1000000:1000000000\n")
    assert asyncio.run(check_subid_ranges(services, u, g)) == []
    [w3] = _warnings(svc)
    assert (w3["uuid"], w3["status"]) == (w["uuid"], "resolved")


def test_hook_without_warnings_service(tmp_path):
    # A bare Services (no warnings subsystem): the check still answers, nothing raises.
    assert len(asyncio.run(check_subid_ranges(SimpleNamespace(), tmp_path / "a", tmp_path / "b"))) == 2
