"""Storage volumes through the daemon with the stock client: custom volumes (create, list, show,
get/set/unset, edit, rename, copy, move between pools and drivers, snapshots, restore, info,
delete, attach/detach), container and image volumes, bad input, `@startup` schedules with
expiry, and the start-up sweep of interrupted changes. On the shared dir pool and on a btrfs
pool on a loop file made (and deleted) here."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from datetime import UTC, datetime, timedelta

import pytest
import yaml

from lxd_daemon.util.timefmt import parse_rfc3339
from tests.helpers import run_prefix, wait_for, wait_op

pytestmark = pytest.mark.integration




@pytest.fixture(params=["dir", "btrfs"])
def pool(request, ready):
    if request.param == "dir":
        return "default"
    return request.getfixturevalue("btrfs_pool")


def vol_path(d, pool: str, name: str, snap: str = ""):
    base = d.lxd_dir / "storage-pools" / pool
    if snap:
        return base / "custom-snapshots" / f"default_{name}" / snap
    return base / "custom" / f"default_{name}"


def api_error(r) -> str:
    return r.json()["error"]


def test_custom_volume_with_the_stock_client(ready, pool):
    d = ready
    v, v2, v3 = (run_prefix() + s for s in ("-v", "-w", "-c"))
    d.lxc("storage", "volume", "create", pool, v, "user.note=hello")
    assert v in d.lxc("storage", "volume", "list", pool, "--format", "csv").stdout
    shown = yaml.safe_load(d.lxc("storage", "volume", "show", pool, v).stdout)
    assert shown["name"] == v and shown["type"] == "custom" and shown["content_type"] == "filesystem"
    assert shown["config"]["user.note"] == "hello" and shown["used_by"] == []
    d.lxc("storage", "volume", "set", pool, v, "snapshots.pattern=s%d")
    assert d.lxc("storage", "volume", "get", pool, v, "snapshots.pattern").stdout.strip() == "s%d"
    d.lxc("storage", "volume", "unset", pool, v, "user.note")
    assert "user.note" not in d.api("GET", f"/1.0/storage-pools/{pool}/volumes/custom/{v}").json()["metadata"]["config"]
    shown = yaml.safe_load(d.lxc("storage", "volume", "show", pool, v).stdout)
    shown["description"] = "edited"
    d.lxc("storage", "volume", "edit", pool, v, input=yaml.safe_dump(shown))
    assert d.api("GET", f"/1.0/storage-pools/{pool}/volumes/custom/{v}").json()["metadata"]["description"] == "edited"
    # Rename: the volume moves on disk.
    d.lxc("storage", "volume", "rename", pool, v, v2)
    assert not vol_path(d, pool, v).exists() and vol_path(d, pool, v2).is_dir()
    # Snapshot (name from snapshots.pattern), change, restore.
    (vol_path(d, pool, v2) / "f").write_text("one")
    d.lxc("storage", "volume", "snapshot", pool, v2)
    assert (vol_path(d, pool, v2, "s0") / "f").read_text() == "one"
    d.lxc("storage", "volume", "snapshot", pool, v2, "named")
    (vol_path(d, pool, v2) / "f").write_text("two")
    d.lxc("storage", "volume", "restore", pool, v2, "s0")
    assert (vol_path(d, pool, v2) / "f").read_text() == "one"
    info = d.lxc("storage", "volume", "info", pool, v2).stdout
    assert "s0" in info and "named" in info
    snaps = d.api("GET", f"/1.0/storage-pools/{pool}/volumes/custom/{v2}/snapshots?recursion=1").json()["metadata"]
    assert [s["name"] for s in snaps] == ["s0", "named"]
    state = d.api("GET", f"/1.0/storage-pools/{pool}/volumes/custom/{v2}/state").json()["metadata"]
    assert state["usage"]["used"] >= 0 and state["usage"]["total"] == -1
    # Snapshot rename and delete (operations).
    r = d.api("POST", f"/1.0/storage-pools/{pool}/volumes/custom/{v2}/snapshots/named", json={"name": "renamed"})
    assert wait_op(d, r)["status"] == "Success"
    assert vol_path(d, pool, v2, "renamed").is_dir() and not vol_path(d, pool, v2, "named").exists()
    # Copy with snapshots, and of one snapshot alone.
    d.lxc("storage", "volume", "copy", f"{pool}/{v2}", f"{pool}/{v3}")
    assert (vol_path(d, pool, v3) / "f").read_text() == "one"
    copied = d.api("GET", f"/1.0/storage-pools/{pool}/volumes/custom/{v3}/snapshots").json()["metadata"]
    assert sorted(u.rsplit("/", 1)[1] for u in copied) == ["renamed", "s0"]
    d.lxc("storage", "volume", "delete", pool, v3)
    d.lxc("storage", "volume", "copy", f"{pool}/{v2}/s0", f"{pool}/{v3}")
    assert (vol_path(d, pool, v3) / "f").read_text() == "one"
    assert d.api("GET", f"/1.0/storage-pools/{pool}/volumes/custom/{v3}/snapshots").json()["metadata"] == []
    # Listing with recursion shows volumes and their snapshots.
    listed = {x["name"] for x in d.api("GET", f"/1.0/storage-pools/{pool}/volumes?recursion=1").json()["metadata"]}
    assert {v2, v3, f"{v2}/s0"} <= listed
    d.lxc("storage", "volume", "delete", pool, f"{v2}/renamed")
    assert not vol_path(d, pool, v2, "renamed").exists()
    for x in (v2, v3):
        d.lxc("storage", "volume", "delete", pool, x)
        assert not vol_path(d, pool, x).exists()
        assert not (d.lxd_dir / "storage-pools" / pool / "custom-snapshots" / f"default_{x}").exists()
    leftovers = [e for e in os.listdir(d.lxd_dir / "storage-pools" / pool / "custom") if ".tmp-" in e]
    assert leftovers == []


def test_size_quota_on_btrfs_and_refused_on_dir(ready, btrfs_pool):
    d = ready
    v = run_prefix() + "-q"
    d.lxc("storage", "volume", "create", btrfs_pool, v, "size=64MiB")
    try:
        d.lxc("storage", "volume", "set", btrfs_pool, v, "size=128MiB")
        st = d.api("GET", f"/1.0/storage-pools/{btrfs_pool}/volumes/custom/{v}/state").json()["metadata"]
        assert st["usage"]["total"] == 128 * 1024 * 1024
    finally:
        d.lxc("storage", "volume", "delete", btrfs_pool, v)
    r = d.api("POST", "/1.0/storage-pools/default/volumes/custom", json={"name": v, "config": {"size": "1GiB"}})
    assert r.status_code == 400 and "size" in api_error(r).lower()
    assert d.api("GET", f"/1.0/storage-pools/default/volumes/custom/{v}").status_code == 404


def test_move_between_pools_of_different_drivers(ready, btrfs_pool):
    d = ready
    v, w = run_prefix() + "-m", run_prefix() + "-n"
    d.lxc("storage", "volume", "create", "default", v)
    (vol_path(d, "default", v) / "data").write_text("first")
    os.chown(vol_path(d, "default", v) / "data", 1000, 1000)
    d.lxc("storage", "volume", "snapshot", "default", v, "snap0")
    (vol_path(d, "default", v) / "data").write_text("second")
    d.lxc("storage", "volume", "move", f"default/{v}", f"{btrfs_pool}/{w}")
    assert d.api("GET", f"/1.0/storage-pools/default/volumes/custom/{v}").status_code == 404
    assert not vol_path(d, "default", v).exists()
    assert (vol_path(d, btrfs_pool, w) / "data").read_text() == "second"
    assert os.stat(vol_path(d, btrfs_pool, w) / "data").st_uid == 1000
    assert (vol_path(d, btrfs_pool, w, "snap0") / "data").read_text() == "first"
    # And back through the API (POST with `pool`: an operation), keeping the name.
    r = d.api("POST", f"/1.0/storage-pools/{btrfs_pool}/volumes/custom/{w}", json={"name": w, "pool": "default"})
    assert wait_op(d, r)["status"] == "Success"
    assert (vol_path(d, "default", w, "snap0") / "data").read_text() == "first"
    assert (vol_path(d, "default", w) / "data").read_text() == "second"
    assert not vol_path(d, btrfs_pool, w).exists()
    d.lxc("storage", "volume", "delete", "default", w)


def test_copy_refresh(ready, btrfs_pool):
    """`lxc storage volume copy --refresh`: the target's snapshots the source no longer has go,
    the source's new ones are added, the content is synced; across drivers and within a pool."""
    d = ready
    v, w, x = run_prefix() + "-rs", run_prefix() + "-rt", run_prefix() + "-rx"
    d.lxc("storage", "volume", "create", "default", v)
    src = vol_path(d, "default", v)
    (src / "a").write_text("one")
    d.lxc("storage", "volume", "snapshot", "default", v, "s0")
    (src / "a").write_text("two")
    d.lxc("storage", "volume", "snapshot", "default", v, "s1")
    try:
        # Without a target, --refresh is a plain copy.
        d.lxc("storage", "volume", "copy", f"default/{v}", f"{btrfs_pool}/{w}", "--refresh")
        assert (vol_path(d, btrfs_pool, w, "s0") / "a").read_text() == "one"
        dst = vol_path(d, btrfs_pool, w)
        (dst / "junk").write_text("target only")
        d.lxc("storage", "volume", "delete", "default", f"{v}/s0")
        (src / "a").write_text("three")
        d.lxc("storage", "volume", "snapshot", "default", v, "s2")
        (src / "a").write_text("four")
        (src / "b").write_text("new")
        d.lxc("storage", "volume", "copy", f"default/{v}", f"{btrfs_pool}/{w}", "--refresh")
        snaps = d.api("GET", f"/1.0/storage-pools/{btrfs_pool}/volumes/custom/{w}/snapshots").json()["metadata"]
        assert sorted(u.rsplit("/", 1)[-1] for u in snaps) == ["s1", "s2"]
        assert not vol_path(d, btrfs_pool, w, "s0").exists()
        assert (vol_path(d, btrfs_pool, w, "s1") / "a").read_text() == "two"
        assert (vol_path(d, btrfs_pool, w, "s2") / "a").read_text() == "three"
        assert (dst / "a").read_text() == "four" and (dst / "b").read_text() == "new"
        assert not (dst / "junk").exists()
        # --volume-only leaves the target's snapshots alone; within one pool too.
        d.lxc("storage", "volume", "copy", f"default/{v}", f"default/{x}", "--volume-only")
        d.lxc("storage", "volume", "snapshot", "default", x, "mine")
        (src / "a").write_text("five")
        d.lxc("storage", "volume", "copy", f"default/{v}", f"default/{x}", "--refresh", "--volume-only")
        assert (vol_path(d, "default", x) / "a").read_text() == "five"
        snaps = d.api("GET", f"/1.0/storage-pools/default/volumes/custom/{x}/snapshots").json()["metadata"]
        assert [u.rsplit("/", 1)[-1] for u in snaps] == ["mine"]
        # A missing source is a 404 before any operation.
        r = d.api("POST", "/1.0/storage-pools/default/volumes/custom",
                  json={"name": x, "source": {"type": "copy", "name": "nope", "pool": "default", "refresh": True}})
        assert r.status_code == 404, r.text
    finally:
        for pool_, name in ((btrfs_pool, w), ("default", x), ("default", v)):
            d.lxc("storage", "volume", "delete", pool_, name, check=False)


def test_bad_input(ready, pool):
    d = ready
    v = run_prefix() + "-bad"
    base = f"/1.0/storage-pools/{pool}/volumes/custom"
    r = d.api("POST", base, json={"name": v, "config": {"bogus.key": "1"}})
    assert r.status_code == 400 and "bogus.key" in api_error(r)
    r = d.api("POST", base, json={"name": v, "config": {"size": "lots"}})
    assert r.status_code == 400 and "size" in api_error(r)
    r = d.api("POST", base, json={"name": v, "content_type": "block"})
    assert r.status_code == 400 and "block" in api_error(r).lower()
    r = d.api("POST", base, json={"name": "a/b"})
    assert r.status_code == 400
    r = d.api("POST", f"/1.0/storage-pools/{pool}/volumes/bogus", json={"name": v})
    assert r.status_code == 400 and "bogus" in api_error(r)
    assert d.api("POST", base, json={"name": v}).status_code == 201
    try:
        r = d.api("POST", base, json={"name": v})
        assert r.status_code == 409 and "already exists" in api_error(r)
        r = d.api("PATCH", f"{base}/{v}", json={"config": {"security.shifted": "maybe"}})
        assert r.status_code == 400 and "security.shifted" in api_error(r)
        r = d.api("PATCH", f"{base}/{v}", json={"config": {"snapshots.schedule": "not a schedule"}})
        assert r.status_code == 400 and "snapshots.schedule" in api_error(r)
        r = d.api("POST", f"{base}/{v}/snapshots", json={"name": "x/y"})
        assert r.status_code == 400 and "x/y" in api_error(r)
        r = d.api("PUT", f"{base}/{v}", json={"restore": "missing"})
        assert r.status_code == 404 and "missing" in api_error(r)
        r = d.lxc("storage", "volume", "restore", pool, v, "missing", check=False)
        assert r.returncode != 0 and "missing" in r.stderr
        assert d.api("GET", f"{base}/{v}/snapshots/missing").status_code == 404
        assert d.api("GET", f"{base}/nosuch").status_code == 404
        assert d.api("GET", "/1.0/storage-pools/nosuchpool/volumes").status_code == 404
        # Nothing half-made by the refusals.
        assert sorted(os.listdir(d.lxd_dir / "storage-pools" / pool / "custom")).count(f"default_{v}") == 1
        assert not [e for e in os.listdir(d.lxd_dir / "storage-pools" / pool / "custom") if ".tmp-" in e]
    finally:
        d.api("DELETE", f"{base}/{v}")


def test_attached_volume_is_in_use(ready, names, pool):
    d = ready
    c = names("att")
    v = run_prefix() + "-att"
    d.lxc("init", "busybox", c)
    d.lxc("storage", "volume", "create", pool, v)
    try:
        d.lxc("storage", "volume", "attach", pool, v, c, "/mnt/data")
        dev = d.api("GET", f"/1.0/instances/{c}").json()["metadata"]["devices"][v]
        assert dev == {"type": "disk", "pool": pool, "source": v, "path": "/mnt/data"}
        got = d.api("GET", f"/1.0/storage-pools/{pool}/volumes/custom/{v}").json()["metadata"]
        assert got["used_by"] == [f"/1.0/instances/{c}"]
        assert f"/1.0/storage-pools/{pool}/volumes/custom/{v}" in \
            d.api("GET", f"/1.0/storage-pools/{pool}").json()["metadata"]["used_by"]
        r = d.api("DELETE", f"/1.0/storage-pools/{pool}/volumes/custom/{v}")
        assert r.status_code == 400 and "still in use" in api_error(r)
        r = d.lxc("storage", "volume", "rename", pool, v, v + "x", check=False)
        assert r.returncode != 0 and "in use" in r.stderr
        assert vol_path(d, pool, v).is_dir()
        d.lxc("storage", "volume", "detach", pool, v, c)
        assert v not in d.api("GET", f"/1.0/instances/{c}").json()["metadata"]["devices"]
    finally:
        d.lxc("storage", "volume", "delete", pool, v)
    assert not vol_path(d, pool, v).exists()


def test_pool_with_volumes_cant_be_deleted(ready, btrfs_pool):
    d = ready
    v = run_prefix() + "-keep"
    d.lxc("storage", "volume", "create", btrfs_pool, v)
    r = d.api("DELETE", f"/1.0/storage-pools/{btrfs_pool}")
    assert r.status_code == 400 and "in use" in api_error(r)
    d.lxc("storage", "volume", "delete", btrfs_pool, v)


def test_container_and_image_volumes(ready, names, btrfs_pool):
    d = ready
    c, c2 = names("cv"), names("cd")
    d.lxc("init", "busybox", c, "-s", btrfs_pool)
    d.lxc("init", "busybox", c2)
    fp = d.api("GET", "/1.0/images/aliases/busybox").json()["metadata"]["target"]
    for pool, inst in ((btrfs_pool, c), ("default", c2)):
        vols = d.api("GET", f"/1.0/storage-pools/{pool}/volumes?recursion=1").json()["metadata"]
        by = {(x["type"], x["name"]): x for x in vols}
        assert by[("container", inst)]["used_by"] == [f"/1.0/instances/{inst}"]
        if pool == "default":
            # A dir pool on a filesystem without reflinks (as LXD's dir driver) keeps no image
            # volume: each launch unpacks the image into its own volume.
            assert ("image", fp) not in by
            assert d.api("GET", f"/1.0/storage-pools/{pool}/volumes/image/{fp}").status_code == 404
        else:
            assert by[("image", fp)]["used_by"] == [f"/1.0/images/{fp}"]
            assert len([k for k in by if k[0] == "image" and k[1] == fp]) == 1
            assert d.api("GET", f"/1.0/storage-pools/{pool}/volumes/image/{fp}").status_code == 200
        urls = d.api("GET", f"/1.0/storage-pools/{pool}/volumes/container").json()["metadata"]
        assert f"/1.0/storage-pools/{pool}/volumes/container/{inst}" in urls
        got = d.api("GET", f"/1.0/storage-pools/{pool}/volumes/container/{inst}").json()["metadata"]
        assert got["name"] == inst and got["type"] == "container"
        st = d.api("GET", f"/1.0/storage-pools/{pool}/volumes/container/{inst}/state").json()["metadata"]
        assert st["usage"]["used"] > 0
    out = d.lxc("storage", "volume", "list", btrfs_pool, "--format", "csv").stdout
    assert f"container,{c}" in out and f"image,{fp}" in out
    r = d.api("DELETE", f"/1.0/storage-pools/{btrfs_pool}/volumes/container/{c}")
    assert r.status_code == 400
    assert d.api("GET", f"/1.0/storage-pools/{btrfs_pool}/volumes/container/{c2}").status_code == 404


def test_startup_schedule_expiry_and_sweep(fresh_daemon):
    d = fresh_daemon
    d.start()
    d.lxd("init", "--auto")
    base = "/1.0/storage-pools/default/volumes/custom"
    assert d.api("POST", base, json={"name": "sched", "config": {
        "snapshots.schedule": "@startup", "snapshots.expiry": "1d"}}).status_code == 201
    soon = (datetime.now(UTC) + timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    r = d.api("POST", f"{base}/sched/snapshots", json={"name": "old", "expires_at": soon})
    assert wait_op(d, r)["status"] == "Success"
    assert d.api("POST", base, json={"name": "keep"}).status_code == 201
    assert d.api("POST", base, json={"name": "torename"}).status_code == 201
    d.stop()
    # A rename that crashed after its record changed, before the volume was renamed: finished.
    with sqlite3.connect(d.lxd_dir / "database" / "lxd.db") as db:
        db.execute("UPDATE storage_volumes SET name='renamed', config=? WHERE name='torename'",
                   (json.dumps({"volatile.rename.source": "torename", "user.x": "y"}),))
    custom = d.lxd_dir / "storage-pools" / "default" / "custom"
    # A create that crashed before its record: removed. A delete that crashed after renaming
    # the volume but before removing its record: put back. A volume without a record and
    # without the marker (what `lxd recover` would find): left alone.
    (custom / "default_.tmp-0123abcd-half").mkdir()
    os.rename(custom / "default_keep", custom / "default_.tmp-89abcdef-keep")
    (custom / "default_orphan").mkdir()
    time.sleep(1.2)
    d.start()

    def snaps_now() -> list[dict]:
        return d.api("GET", f"{base}/sched/snapshots?recursion=1").json()["metadata"]

    # Start-up hooks run once the API is served.
    wait_for(lambda: [s["name"] for s in snaps_now()] == ["snap0"])
    snaps = snaps_now()
    left = parse_rfc3339(snaps[0]["expires_at"]) - time.time()
    assert 23 * 3600 < left <= 24 * 3600
    assert not (custom / "default_.tmp-0123abcd-half").exists()
    assert (custom / "default_keep").is_dir() and d.api("GET", f"{base}/keep").status_code == 200
    assert (custom / "default_orphan").is_dir()
    assert (custom / "default_renamed").is_dir() and not (custom / "default_torename").exists()
    assert d.api("GET", f"{base}/renamed").json()["metadata"]["config"] == {"user.x": "y"}
    os.rmdir(custom / "default_orphan")
    for v in ("sched", "keep", "renamed"):
        for s in d.api("GET", f"{base}/{v}/snapshots").json()["metadata"]:
            wait_op(d, d.api("DELETE", s))
        assert d.api("DELETE", f"{base}/{v}").status_code == 200
    assert json.loads(d.api("GET", base).text)["metadata"] == []


def test_scheduled_snapshots_and_expiry(ready):
    d = ready
    v = run_prefix() + "-sch"
    base = "/1.0/storage-pools/default/volumes/custom"
    r = d.api("POST", base, json={"name": v, "config": {
        "snapshots.schedule": "0 * * * *", "snapshots.expiry": "1H", "snapshots.pattern": "auto-%d"}})
    assert r.status_code == 201, r.text
    try:
        hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)

        def tick(at: datetime) -> dict:
            r = d.api("POST", "/internal/storage-volumes/snapshots/tick",
                      json={"now": at.strftime("%Y-%m-%dT%H:%M:%SZ")})
            assert r.status_code == 200, r.text
            return r.json()["metadata"]

        assert tick(hour)["created"] == [f"{base}/{v}/snapshots/auto-0"]
        assert tick(hour + timedelta(minutes=1))["created"] == []
        snaps = d.api("GET", f"{base}/{v}/snapshots?recursion=1").json()["metadata"]
        assert [s["name"] for s in snaps] == ["auto-0"]
        assert parse_rfc3339(snaps[0]["expires_at"]) == (hour + timedelta(hours=1)).timestamp()
        assert (vol_path(d, "default", v, "auto-0")).is_dir()
        # Expired: deleted by the next pass (and a new one taken on the hour).
        done = tick(hour + timedelta(hours=1))
        assert done == {"created": [f"{base}/{v}/snapshots/auto-1"], "deleted": [f"{base}/{v}/snapshots/auto-0"]}
        assert not vol_path(d, "default", v, "auto-0").exists()
        wait_op(d, d.api("DELETE", f"{base}/{v}/snapshots/auto-1"))
    finally:
        d.api("DELETE", f"{base}/{v}")


def test_pylxd_custom_volume(ready):
    d = ready
    v, w = run_prefix() + "-py", run_prefix() + "-pz"
    r = d.pylxd(f"""
import warnings
warnings.simplefilter("ignore")
pool = client.storage_pools.get("default")
vol = pool.volumes.create({{"name": "{v}", "type": "custom", "config": {{"user.a": "b"}}}})
vol.config["user.c"] = "d"
vol.save(wait=True)
got = pool.volumes.get("custom", "{v}")
vol.rename({{"name": "{w}", "pool": "default"}}, wait=True)
names = [x.name for x in pool.volumes.all()]
pool.volumes.get("custom", "{w}").delete()
print(json.dumps({{"config": got.config, "names": names,
                  "after": [x.name for x in pool.volumes.all()]}}))
""")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["config"] == {"user.a": "b", "user.c": "d"}
    assert w in out["names"] and v not in out["names"] and w not in out["after"]
