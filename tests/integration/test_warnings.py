"""Warnings (`/1.0/warnings`, `lxc warning`) raised by the daemon for a real condition: a dir
pool whose source directory is gone at start-up carries "Storage pool unavailable" until a later
start-up finds it again. Driven with the stock client on a daemon of this module's own (it is
restarted)."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess

import pytest

from tests.helpers import (
    Daemon,
    btrfs_pool_of,
    ensure_containers_ready,
    envelope_ok,
    release_host_state,
    run_prefix,
    wait_for,
)

pytestmark = pytest.mark.integration

POOL_TYPE = "Storage pool unavailable"


@pytest.fixture(scope="module")
def wd(tmp_path_factory):
    base = tmp_path_factory.mktemp("lxdwarn")
    d = Daemon(lxd_dir=base / "var", conf_dir=base / "conf")
    d.start()
    yield d
    d.stop()
    release_host_state(d.lxd_dir)


def _restart(d: Daemon) -> None:
    d.stop()
    d.start()


def _pool_warnings(d: Daemon, pool: str, *extra: str) -> list[dict]:
    out = json.loads(d.lxc("query", "/1.0/warnings?recursion=1").stdout)
    return [w for w in out if w["type"] == POOL_TYPE and w["entity_url"] == f"/1.0/storage-pools/{pool}"]


def test_missing_pool_source_raises_a_warning_that_is_resolved_when_it_is_back(wd, tmp_path):
    d = wd
    pool = run_prefix() + "-p"
    src = tmp_path / "src"
    src.mkdir()
    d.lxc("storage", "create", pool, "dir", f"source={src}")
    try:
        assert _pool_warnings(d, pool) == []
        d.stop()
        shutil.rmtree(src)
        d.start()
        [w] = _pool_warnings(d, pool)
        assert (w["status"], w["severity"], w["project"], w["count"], w["location"]) == \
            ("new", "high", "", 1, "none")
        assert str(src) in w["last_message"] and "doesn't exist" in w["last_message"], w
        uuid = w["uuid"]

        listed = d.lxc("warning", "list", "--format=csv").stdout
        assert any(line.startswith(uuid + ",") and POOL_TYPE in line and "NEW" in line and "HIGH" in line
                   for line in listed.splitlines()), listed
        shown = d.lxc("warning", "show", uuid).stdout
        assert f"uuid: {uuid}" in shown and f"entity_url: /1.0/storage-pools/{pool}" in shown, shown

        # Still missing at the next start-up: the same warning, seen twice.
        _restart(d)
        [w] = _pool_warnings(d, pool)
        assert (w["uuid"], w["count"]) == (uuid, 2)
        assert w["last_seen_at"] > w["first_seen_at"]

        # Acknowledged: hidden from `lxc warning list`, still in `--all`.
        d.lxc("warning", "ack", uuid)
        assert _pool_warnings(d, pool)[0]["status"] == "acknowledged"
        assert uuid not in d.lxc("warning", "list", "--format=csv").stdout
        assert uuid in d.lxc("warning", "list", "--all", "--format=csv").stdout

        # Back: the next start-up resolves it.
        src.mkdir()
        _restart(d)
        [w] = _pool_warnings(d, pool)
        assert (w["uuid"], w["status"]) == (uuid, "resolved")

        d.lxc("warning", "delete", uuid)
        assert _pool_warnings(d, pool) == []
        r = d.lxc("warning", "show", uuid, check=False)
        assert r.returncode != 0 and "Warning not found" in r.stderr
    finally:
        src.mkdir(exist_ok=True)
        d.lxc("storage", "delete", pool, check=False)


def test_api_shape_statuses_and_events(wd, tmp_path):
    d = wd
    pool = run_prefix() + "-q"
    src = tmp_path / "src"
    src.mkdir()
    d.lxc("storage", "create", pool, "dir", f"source={src}")
    try:
        d.stop()
        shutil.rmtree(src)
        d.start()
        [w] = _pool_warnings(d, pool)
        uuid = w["uuid"]
        assert set(w) == {"status", "uuid", "location", "project", "type", "count", "first_seen_at",
                          "last_seen_at", "last_message", "severity", "entity_url"}

        r = d.api("GET", "/1.0/warnings")
        envelope_ok(r.json())
        assert f"/1.0/warnings/{uuid}" in r.json()["metadata"]
        # ?project= keeps that project's warnings only (this one is server-wide); ?filter= applies.
        assert d.api("GET", "/1.0/warnings?project=default").json()["metadata"] == []
        assert d.api("GET", "/1.0/warnings?all-projects=true").json()["metadata"] == r.json()["metadata"]
        got = d.api("GET", "/1.0/warnings", params={"recursion": "1", "filter": "severity eq high"}).json()
        assert uuid in [x["uuid"] for x in got["metadata"]]
        got = d.api("GET", "/1.0/warnings", params={"recursion": "1", "filter": "severity eq nothing"}).json()
        assert got["metadata"] == []
        r = d.api("GET", f"/1.0/warnings/{uuid}")
        assert r.status_code == 200 and r.json()["metadata"] == w

        # Unknown uuid: 404 on every method.
        for method, kw in (("GET", {}), ("PUT", {"json": {"status": "new"}}), ("PATCH", {"json": {"status": "new"}}),
                           ("DELETE", {})):
            r = d.api(method, "/1.0/warnings/00000000-0000-0000-0000-000000000000", **kw)
            assert r.status_code == 404 and r.json()["error"] == "Warning not found", (method, r.text)

        # Status: only acknowledged or new; anything else is refused.
        r = d.api("PUT", f"/1.0/warnings/{uuid}", json={"status": "bogus"})
        assert r.status_code == 400 and "Invalid warning status" in r.json()["error"], r.text
        r = d.api("PUT", f"/1.0/warnings/{uuid}", json={"status": 3})
        assert r.status_code == 400, r.text
        r = d.api("PATCH", f"/1.0/warnings/{uuid}", json={"status": "resolved"})
        assert r.status_code == 403, r.text

        from websockets.sync.client import unix_connect

        with unix_connect(str(d.socket), "ws://lxd/1.0/events?type=lifecycle") as ws:
            assert d.api("PATCH", f"/1.0/warnings/{uuid}", json={"status": "acknowledged"}).status_code == 200
            assert d.api("GET", f"/1.0/warnings/{uuid}").json()["metadata"]["status"] == "acknowledged"
            assert d.api("PUT", f"/1.0/warnings/{uuid}", json={"status": "new"}).status_code == 200
            assert d.api("GET", f"/1.0/warnings/{uuid}").json()["metadata"]["status"] == "new"
            assert d.api("DELETE", f"/1.0/warnings/{uuid}").status_code == 200
            actions = []
            while len(actions) < 3:
                meta = json.loads(ws.recv(timeout=10))["metadata"]
                if meta["source"] == f"/1.0/warnings/{uuid}":
                    actions.append(meta["action"])
        assert actions == ["warning-acknowledged", "warning-reset", "warning-deleted"]
        assert d.api("GET", f"/1.0/warnings/{uuid}").status_code == 404
    finally:
        src.mkdir(exist_ok=True)
        d.lxc("storage", "delete", pool, check=False)


def test_autostart_failure_is_a_warning_until_the_next_autostart_succeeds(wd, tmp_path):
    d = wd
    ensure_containers_ready(d)
    ct = run_prefix() + "-a"
    url = f"/1.0/instances/{ct}"
    d.lxc("init", "busybox", ct)
    try:
        d.lxc("config", "set", ct, "boot.autostart", "true")
        d.lxc("config", "device", "add", ct, "gone", "disk", f"source={tmp_path / 'missing'}", "path=/mnt")

        def autostart_warning() -> dict | None:
            out = json.loads(d.lxc("query", "/1.0/warnings?recursion=1").stdout)
            found = [w for w in out if w["type"] == "Failed to autostart instance" and w["entity_url"] == url]
            return found[0] if found else None

        _restart(d)
        w = wait_for(autostart_warning, timeout=30)
        assert (w["status"], w["severity"], w["project"]) == ("new", "low", "default"), w
        assert ct in w["last_message"], w

        d.lxc("config", "device", "remove", ct, "gone")
        _restart(d)
        w = wait_for(lambda: (x := autostart_warning()) and x["status"] == "resolved" and x, timeout=30)
        assert d.api("GET", f"{url}/state").json()["metadata"]["status"] == "Running"
        d.lxc("delete", "-f", ct)
        assert autostart_warning() is None  # the instance's warnings went with it
    finally:
        d.lxc("delete", "-f", ct, check=False)


def test_failed_scheduled_snapshot_is_a_warning_until_one_succeeds(wd):
    d = wd
    ensure_containers_ready(d)
    ct = run_prefix() + "-s"
    url = f"/1.0/instances/{ct}"
    at = (dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)).replace(second=30, microsecond=0)
    d.lxc("init", "busybox", ct, "-c", f"snapshots.schedule={at.minute} {at.hour} * * *",
          "-c", "snapshots.schedule.stopped=true")
    vol = d.lxd_dir / "storage-pools" / "default" / "containers" / ct
    away = vol.with_name(ct + ".away")

    def tick() -> dict:
        r = d.api("POST", "/internal/snapshots/tick", json={"now": at.strftime("%Y-%m-%dT%H:%M:%SZ")})
        assert r.status_code == 200, r.text
        return r.json()["metadata"]

    def snapshot_warnings() -> list[dict]:
        out = json.loads(d.lxc("query", "/1.0/warnings?recursion=1").stdout)
        return [w for w in out if w["type"] == "Failed to create scheduled snapshot" and w["entity_url"] == url]

    try:
        vol.rename(away)  # its volume gone: the scheduled snapshot can't be taken
        got = tick()
        assert any(e.startswith(ct) for e in got["errors"]), got
        [w] = snapshot_warnings()
        assert (w["status"], w["severity"], w["project"]) == ("new", "moderate", "default"), w
        away.rename(vol)
        got = tick()
        assert any(x.startswith(f"{ct}/") for x in got["created"]), got
        [w] = snapshot_warnings()
        assert w["status"] == "resolved"
    finally:
        if away.exists():
            away.rename(vol)
        d.lxc("delete", "-f", ct, check=False)
    assert snapshot_warnings() == []


def test_pool_with_an_unusable_driver_says_why(wd, tmp_path):
    # A pool record whose driver can't run on this host (made where it could: lvm without
    # device-mapper here, zfs without its module): at start-up "Storage pool unavailable" names
    # the driver and why; creating such a pool is refused with a 400 giving the same reason.
    from lxd_daemon.db.engine import Database
    from lxd_daemon.storage.drivers import DRIVERS

    d = wd
    driver = next((n for n in ("lvm", "zfs") if not DRIVERS[n].available()[0]), None)
    if driver is None:
        pytest.skip("lvm and zfs both run on this host")
    why = DRIVERS[driver].available()[1]
    pool = run_prefix() + "-u"
    r = d.api("POST", "/1.0/storage-pools", json={"name": pool, "driver": driver, "config": {"size": "1GiB"}})
    assert r.status_code == 400 and why in r.json()["error"], r.text

    def rows(sql: str, **kw) -> None:
        db = Database(d.lxd_dir / "database" / "lxd.db")
        try:
            db.run_sync(lambda s: s.exec_driver_sql(sql, kw))
        finally:
            db.close()

    d.stop()
    cfg = json.dumps({"source": str(tmp_path / "gone.img"), "size": "1GiB", "lvm.vg_name": pool, "zfs.pool_name": pool})
    rows("INSERT INTO storage_pools (name, driver, description, config) VALUES (:n, :d, '', :c)",
         n=pool, d=driver, c=cfg)
    try:
        d.start()
        [w] = _pool_warnings(d, pool)
        assert (w["status"], w["severity"]) == ("new", "high"), w
        assert f"Storage driver {driver!r} isn't usable on this host" in w["last_message"], w
        assert why in w["last_message"], w
        assert d.api("GET", f"/1.0/storage-pools/{pool}").status_code == 200  # still listed
    finally:
        d.stop()
        rows("DELETE FROM storage_pools WHERE name = :n", n=pool)
        d.start()
    for w in _pool_warnings(d, pool):
        d.lxc("warning", "delete", w["uuid"])


def test_nearly_full_pool_is_a_warning_until_space_is_freed(wd):
    d = wd
    pool = run_prefix() + "-f"
    gen = btrfs_pool_of(d, pool, "300MiB")
    next(gen)
    url = f"/1.0/storage-pools/{pool}"

    def check() -> dict:
        r = d.api("POST", "/internal/storage/usage-check")
        assert r.status_code == 200, r.text
        return r.json()["metadata"]

    def full_warnings() -> list[dict]:
        out = json.loads(d.lxc("query", "/1.0/warnings?recursion=1").stdout)
        return [w for w in out if w["type"] == "Storage pool nearly full" and w["entity_url"] == url]

    try:
        d.lxc("storage", "volume", "create", pool, "v")
        got = check()
        assert got["pools"][pool] < 85 and pool not in got["nearly_full"], got
        assert full_warnings() == []

        # Filled in 8MiB steps to over 92% (btrfs's own metadata makes the end point uncertain).
        vol = d.lxd_dir / "storage-pools" / pool / "custom" / "default_v"
        for i in range(64):
            st = os.statvfs(vol)
            if st.f_bavail < st.f_blocks * 0.07:
                break
            if subprocess.run(["fallocate", "-l", "8MiB", str(vol / f"fill{i}")]).returncode:
                break  # out of space: full enough
            subprocess.run(["sync", "-f", str(vol)], check=True)
        got = check()
        assert pool in got["nearly_full"] and got["pools"][pool] > 90, got
        [w] = full_warnings()
        assert (w["status"], w["severity"], w["project"]) == ("new", "moderate", ""), w
        assert pool in w["last_message"] and "% full" in w["last_message"] and "available" in w["last_message"], w

        for f in vol.glob("fill*"):
            f.unlink()
        subprocess.run(["sync", "-f", str(vol)], check=True)
        got = wait_for(lambda: (g := check()) and pool in g["resolved"] and g, timeout=30)
        [w2] = full_warnings()
        assert (w2["uuid"], w2["status"]) == (w["uuid"], "resolved")
    finally:
        for _ in gen:
            pass
    assert full_warnings() == []  # the pool's warnings went with it


def test_subid_ranges_checked_at_start_up(wd):
    # The start-up check reads the host's /etc/subuid and /etc/subgid (tests/unit/test_host_checks.py
    # drives it on files of its own): the warning is there exactly when one lacks a range for root.
    from lxd_daemon.warnings.host_checks import missing_subid_ranges

    out = json.loads(wd.lxc("query", "/1.0/warnings?recursion=1").stdout)
    found = [w for w in out if w["type"] == "Missing subordinate id range" and w["status"] != "resolved"]
    assert len(found) == (1 if missing_subid_ranges() else 0), found
