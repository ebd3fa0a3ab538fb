"""dir pools through the daemon: the drivers `GET /1.0` lists, pool keys validated by the driver,
instance volumes on a second pool (launch, copy within and between pools, rename, delete)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.helpers import run_prefix, wait_for

pytestmark = pytest.mark.integration


def test_supported_drivers_are_listed_with_versions(ready):
    env = ready.api("GET", "/1.0").json()["metadata"]["environment"]
    drivers = {x["Name"]: x for x in env["storage_supported_drivers"]}
    assert drivers["dir"] == {"Name": "dir", "Version": "1", "Remote": False}
    assert env["storage"] == "dir" and env["storage_version"] == "1"


def test_pool_keys_are_validated(ready):
    d = ready
    name = run_prefix() + "-bad"
    r = d.api("POST", "/1.0/storage-pools", json={"name": name, "driver": "dir", "config": {"bogus.key": "1"}})
    assert r.status_code == 400 and "bogus.key" in r.json()["error"]
    r = d.api("POST", "/1.0/storage-pools", json={"name": name, "driver": "dir", "config": {"source": "relative"}})
    assert r.status_code == 400 and "source" in r.json()["error"]
    r = d.api("POST", "/1.0/storage-pools", json={"name": name, "driver": "nope", "config": {}})
    assert r.status_code == 400 and "nope" in r.json()["error"]
    assert d.api("GET", f"/1.0/storage-pools/{name}").status_code == 404


@pytest.fixture
def second_pool(ready):
    d = ready
    name = run_prefix() + "-p2"
    src = Path(tempfile.mkdtemp(prefix=name + "-", dir=d.lxd_dir.parent))
    os.chmod(src, 0o711)
    r = d.api("POST", "/1.0/storage-pools", json={"name": name, "driver": "dir", "config": {"source": str(src)}})
    assert r.status_code == 201, r.text
    yield name, src
    d.api("DELETE", f"/1.0/storage-pools/{name}")
    shutil.rmtree(src, ignore_errors=True)


def _entries(p: Path) -> list[str]:
    return sorted(os.listdir(p)) if p.is_dir() else []


def test_instances_on_a_second_dir_pool(ready, names, second_pool):
    d = ready
    pool, src = second_pool
    c1, c2, c3, c4 = names("v1"), names("v2"), names("v3"), names("v4")
    d.lxc("init", "busybox", c1, "-s", pool)
    vol = src / "containers" / c1
    assert (vol / "rootfs" / "bin" / "busybox").exists()
    assert (d.lxd_dir / "containers" / c1).resolve() == vol.resolve()
    # The image was unpacked into the volume itself: this pool's filesystem (ext4) has no
    # reflinks, so nothing else is kept in the pool.
    assert _entries(src / "images") == []
    (vol / "rootfs" / "marker").write_text("m")
    # Copy within the pool, and to the default pool.
    d.lxc("copy", c1, c2)
    assert (src / "containers" / c2 / "rootfs" / "marker").read_text() == "m"
    d.lxc("copy", c1, c3, "-s", "default")
    default_vol = d.lxd_dir / "storage-pools" / "default" / "containers" / c3
    assert (default_vol / "rootfs" / "marker").read_text() == "m"
    st_a, st_b = os.stat(vol / "rootfs" / "bin" / "busybox"), os.stat(default_vol / "rootfs" / "bin" / "busybox")
    assert (st_a.st_uid, st_a.st_mode) == (st_b.st_uid, st_b.st_mode)
    # Rename moves the volume; the container starts from it.
    d.lxc("move", c2, c4)
    assert not (src / "containers" / c2).exists() and (src / "containers" / c4 / "rootfs").is_dir()
    d.lxc("start", c4)
    assert d.lxc("exec", c4, "--", "cat", "/marker").stdout == "m"
    d.lxc("stop", "-f", c4)
    # In use: the pool can't go.
    r = d.api("DELETE", f"/1.0/storage-pools/{pool}")
    assert r.status_code == 400
    for c in (c1, c4):
        d.lxc("delete", c)
    wait_for(lambda: _entries(src / "containers") == [])
    d.lxc("delete", c3)
    wait_for(lambda: not default_vol.exists())


def test_pool_resources(ready):
    res = ready.api("GET", "/1.0/storage-pools/default/resources").json()["metadata"]
    assert res["space"]["total"] > 0 and res["inodes"]["total"] > 0
