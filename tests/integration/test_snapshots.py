"""Instance snapshots through the stock client, the REST API and pylxd, on a dir pool (the shared
daemon's `default`) and on a btrfs pool on a loop file made for this module; the scheduler is
driven through `POST /internal/snapshots/tick` (the same pass its minute loop runs)."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from tests.helpers import wait_op

pytestmark = pytest.mark.integration



@pytest.fixture(params=["dir", "btrfs"])
def pool(request, ready):
    return "default" if request.param == "dir" else request.getfixturevalue("btrfs_pool")


def snap_file(d, pool, inst, snap, path="root/f"):
    return d.lxd_dir / "storage-pools" / pool / "containers-snapshots" / inst / snap / "rootfs" / path


def write(d, inst, text):
    d.lxc("exec", inst, "--", "sh", "-c", f"echo {text} > /root/f")


def read(d, inst):
    return d.lxc("exec", inst, "--", "cat", "/root/f").stdout.strip()


def status(d, inst):
    return d.api("GET", f"/1.0/instances/{inst}").json()["metadata"]["status"]


def test_snapshot_restore_delete(ready, names, pool):
    d = ready
    c = names("s")
    d.lxc("launch", "busybox", c, "-s", pool)
    write(d, c, "one")
    d.lxc("snapshot", c, "s0")  # of a running container
    assert snap_file(d, pool, c, "s0").read_text() == "one\n"
    write(d, c, "two")
    d.lxc("snapshot", c)  # named by snapshots.pattern (default snap%d)
    assert snap_file(d, pool, c, "snap0").read_text() == "two\n"

    info = d.lxc("info", c).stdout
    assert "Snapshots:" in info and "s0" in info and "snap0" in info

    # restore while running: stopped, restored, started again
    write(d, c, "three")
    d.lxc("restore", c, "s0")
    assert status(d, c) == "Running"
    assert read(d, c) == "one"
    # restore while stopped
    d.lxc("stop", "-f", c)
    d.lxc("restore", c, "snap0")
    assert status(d, c) == "Stopped"
    d.lxc("start", c)
    assert read(d, c) == "two"

    # rename and delete
    d.lxc("move", f"{c}/snap0", f"{c}/later")
    assert snap_file(d, pool, c, "later").read_text() == "two\n"
    assert not snap_file(d, pool, c, "snap0").parent.parent.exists()
    d.lxc("delete", f"{c}/later")
    assert not snap_file(d, pool, c, "later").parent.parent.exists()
    names_now = d.api("GET", f"/1.0/instances/{c}/snapshots").json()["metadata"]
    assert names_now == [f"/1.0/instances/{c}/snapshots/s0"]

    # errors: clear, and nothing half made
    r = d.lxc("restore", c, "nope", check=False)
    assert r.returncode != 0 and "not found" in r.stderr
    r = d.lxc("snapshot", c, "s0", check=False)
    assert r.returncode != 0 and "already exists" in r.stderr
    r = d.api("POST", f"/1.0/instances/{c}/snapshots", json={"name": "a/b"})
    assert r.status_code == 400 and "slash" in r.json()["error"]
    r = d.api("POST", f"/1.0/instances/{c}/snapshots", json={"name": "st", "stateful": True})
    assert r.status_code == 400 and "CRIU" in r.json()["error"]
    assert not snap_file(d, pool, c, "st").parent.exists()
    assert d.api("GET", f"/1.0/instances/{c}/snapshots/st").status_code == 404

    # deleting the instance removes its snapshots' volumes
    d.lxc("delete", "-f", c)
    assert not (d.lxd_dir / "storage-pools" / pool / "containers-snapshots" / c).exists()


def test_snapshot_api_shapes_and_expiry(ready, names):
    d = ready
    c = names("api")
    d.lxc("init", "busybox", c, "-c", "snapshots.expiry=2d", "-c", "user.k=v")
    before = dt.datetime.now(dt.UTC)
    r = d.api("POST", f"/1.0/containers/{c}/snapshots", json={"name": "s1"})
    assert r.status_code == 202
    op = wait_op(d, r)
    assert op["status"] == "Success", op
    assert op["resources"]["instances"] == [f"/1.0/instances/{c}"]

    assert d.api("GET", f"/1.0/instances/{c}/snapshots").json()["metadata"] == [f"/1.0/instances/{c}/snapshots/s1"]
    assert d.api("GET", f"/1.0/containers/{c}/snapshots").json()["metadata"] == [f"/1.0/containers/{c}/snapshots/s1"]
    full = d.api("GET", f"/1.0/instances/{c}/snapshots?recursion=1").json()["metadata"]
    assert len(full) == 1
    s = full[0]
    for key in ("name", "created_at", "expires_at", "last_used_at", "stateful", "architecture", "config",
                "devices", "ephemeral", "expanded_config", "expanded_devices", "profiles", "size"):
        assert key in s, key
    assert s["name"] == "s1" and s["stateful"] is False and s["profiles"] == ["default"]
    assert s["config"]["user.k"] == "v" and s["expanded_devices"]["root"]["type"] == "disk"
    exp = dt.datetime.fromisoformat(s["expires_at"].replace("Z", "+00:00")[:26] + "+00:00")
    assert dt.timedelta(days=2) - dt.timedelta(minutes=1) < exp - before < dt.timedelta(days=2, minutes=1)
    # the instance's full render has them too
    inst = d.api("GET", f"/1.0/instances/{c}?recursion=1").json()["metadata"]
    assert [x["name"] for x in inst["snapshots"]] == ["s1"]

    # `lxc snapshot --no-expiry` sends Go's zero time: never expires
    d.lxc("snapshot", c, "s2", "--no-expiry")
    s2 = d.api("GET", f"/1.0/instances/{c}/snapshots/s2").json()["metadata"]
    assert s2["expires_at"] == "0001-01-01T00:00:00Z"
    # explicit expires_at at creation, then PATCH and PUT
    r = d.api("POST", f"/1.0/instances/{c}/snapshots", json={"name": "s3", "expires_at": "2031-01-02T03:04:05Z"})
    assert wait_op(d, r)["status"] == "Success"
    assert d.api("GET", f"/1.0/instances/{c}/snapshots/s3").json()["metadata"]["expires_at"].startswith(
        "2031-01-02T03:04:05")
    r = d.api("PATCH", f"/1.0/instances/{c}/snapshots/s3", json={"expires_at": "2032-01-01T00:00:00Z"})
    assert wait_op(d, r)["status"] == "Success"
    assert d.api("GET", f"/1.0/instances/{c}/snapshots/s3").json()["metadata"]["expires_at"].startswith("2032-01-01")
    r = d.api("PUT", f"/1.0/instances/{c}/snapshots/s3", json={})
    assert wait_op(d, r)["status"] == "Success"
    assert d.api("GET", f"/1.0/instances/{c}/snapshots/s3").json()["metadata"]["expires_at"] == "0001-01-01T00:00:00Z"
    r = d.api("PATCH", f"/1.0/instances/{c}/snapshots/s3", json={"expires_at": "tomorrow"})
    assert r.status_code == 400 and "expires_at" in r.json()["error"]

    # rename clash, migration, unknown
    r = d.api("POST", f"/1.0/instances/{c}/snapshots/s3", json={"name": "s1"})
    op = wait_op(d, r)
    assert op["status"] == "Failure" and "already in use" in op["err"]
    r = d.api("POST", f"/1.0/instances/{c}/snapshots/s3", json={"migration": True})  # (test_migration.py)
    assert r.status_code == 202 and set(r.json()["metadata"]["metadata"]) == {"control", "fs"}, r.text
    assert d.api("DELETE", f"/1.0/operations/{r.json()['metadata']['id']}").status_code == 200
    assert d.api("DELETE", f"/1.0/instances/{c}/snapshots/nope").status_code == 404
    assert d.api("GET", "/1.0/instances/nope-x/snapshots").status_code == 404
    # bad config values are refused with the key named
    for key, val in (("snapshots.schedule", "@fortnightly"), ("snapshots.expiry", "3x"),
                     ("snapshots.pattern", "%d-%d")):
        r = d.lxc("config", "set", c, key, val, check=False)
        assert r.returncode != 0 and key in r.stderr, r.stderr

    # back-to-back snapshots: each one's backup.yaml rewrite never races the next one's tree copy

    # rename instance: its snapshots follow
    c2 = names("api2")
    d.lxc("move", c, c2)
    assert [x["name"] for x in d.api("GET", f"/1.0/instances/{c2}/snapshots?recursion=1").json()["metadata"]] == \
        ["s1", "s2", "s3"]
    assert snap_file(d, "default", c2, "s1", "").is_dir()


def test_back_to_back_snapshots_and_copies(ready, names):
    """Snapshots and updates rewrite backup.yaml in the volume (through a temporary file) after
    they are done; a following snapshot's or copy's tree copy must never meet that temporary
    file (it did before snapshots and copies took the instance's backup.yaml lock; the race
    depends on timing, so this is a regression check, not a deterministic reproduction)."""
    d = ready
    c = names("quick")
    copies = [names(f"quick{i}") for i in range(10)]
    d.lxc("init", "busybox", c)
    d.lxc("snapshot", c, "x")
    with d.http() as client:  # one connection pool: requests follow each other closely
        for i in range(10):  # each update rewrites backup.yaml in the background
            r = client.patch(f"/1.0/instances/{c}/snapshots/x", json={"description": str(i)})
            assert client.get(f"{r.json()['operation']}/wait?timeout=60").json()["metadata"]["status"] == "Success"
        for i in range(10):
            r = client.post(f"/1.0/instances/{c}/snapshots", json={"name": f"q{i}"})
            op = client.get(f"{r.json()['operation']}/wait?timeout=60").json()["metadata"]
            assert op["status"] == "Success", op
            r = client.post("/1.0/instances", json={"name": copies[i], "source": {
                "type": "copy", "source": c, "instance_only": True}})
            op = client.get(f"{r.json()['operation']}/wait?timeout=60").json()["metadata"]
            assert op["status"] == "Success", op
    assert len(d.api("GET", f"/1.0/instances/{c}/snapshots").json()["metadata"]) == 11


def tick(d, when: dt.datetime) -> dict:
    r = d.api("POST", "/internal/snapshots/tick", json={"now": when.strftime("%Y-%m-%dT%H:%M:%SZ")})
    assert r.status_code == 200, r.text
    return r.json()["metadata"]


def test_scheduler_takes_and_expires(ready, names):
    d = ready
    c = names("sch")
    # a minute a little ahead of now (the scheduler's clock is the tick's `now`)
    at = (dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)).replace(second=30, microsecond=0)
    d.lxc("init", "busybox", c, "-c", f"snapshots.schedule={at.minute} {at.hour} * * *",
          "-c", "snapshots.pattern=auto-{{ creation_date|date:'2006-01-02' }}-%d", "-c", "snapshots.expiry=1H")
    day = at.strftime("%Y-%m-%d")
    # stopped and snapshots.schedule.stopped unset: skipped
    assert f"{c}/" not in json.dumps(tick(d, at))
    d.lxc("config", "set", c, "snapshots.schedule.stopped", "true")
    assert f"{c}/" not in json.dumps(tick(d, at + dt.timedelta(minutes=1)))  # the next minute is not due
    got = tick(d, at)
    assert [x for x in got["created"] if x.startswith(f"{c}/")] == [f"{c}/auto-{day}-0"], got
    got = tick(d, at)
    assert [x for x in got["created"] if x.startswith(f"{c}/")] == [f"{c}/auto-{day}-1"], got  # the index goes up
    snaps = d.api("GET", f"/1.0/instances/{c}/snapshots?recursion=1").json()["metadata"]
    assert [s["name"] for s in snaps] == [f"auto-{day}-0", f"auto-{day}-1"]
    assert all(s["expires_at"].startswith((at + dt.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M")) for s in snaps)
    # a manual snapshot without expiry survives; the scheduled ones expire after an hour
    d.lxc("snapshot", c, "keep", "--no-expiry")
    assert f"{c}/" not in json.dumps(tick(d, at + dt.timedelta(minutes=50)))
    got = tick(d, at + dt.timedelta(minutes=61))
    assert sorted(x for x in got["expired"] if x.startswith(f"{c}/")) == [f"{c}/auto-{day}-0", f"{c}/auto-{day}-1"]
    assert d.api("GET", f"/1.0/instances/{c}/snapshots").json()["metadata"] == [f"/1.0/instances/{c}/snapshots/keep"]
    assert not snap_file(d, "default", c, f"auto-{day}-0", "").exists()

    # @startup: a snapshot each time the instance starts (alias timing is covered by the unit tests)
    d.lxc("config", "set", c, "snapshots.schedule", "@daily, @startup")
    d.lxc("config", "unset", c, "snapshots.pattern")
    d.lxc("start", c)
    snaps = [s.rsplit("/", 1)[1] for s in d.api("GET", f"/1.0/instances/{c}/snapshots").json()["metadata"]]
    assert snaps == ["keep", "snap0"]
    r = d.api("POST", "/internal/snapshots/tick", json={"now": "not a time"})
    assert r.status_code == 400


def test_pylxd_snapshots(ready, names):
    d = ready
    c = names("py")
    d.lxc("init", "busybox", c)
    code = f"""
ct = client.containers.get({c!r})
ct.snapshots.create('s1', wait=True)
ct.snapshots.create('s2', wait=True)
print(json.dumps(sorted(s.name for s in ct.snapshots.all())))
s = ct.snapshots.get('s1')
print(s.name, s.stateful)
s.delete(wait=True)
print(json.dumps(sorted(s.name for s in ct.snapshots.all())))
"""
    r = d.pylxd(code)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert json.loads(lines[0]) == ["s1", "s2"]
    assert lines[1] == "s1 False"
    assert json.loads(lines[2]) == ["s2"]
