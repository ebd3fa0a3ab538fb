"""On a host without device-mapper or the zfs module, `lxc storage create P lvm|zfs` is refused with
a clear 400 naming why, and leaves nothing behind (no record, no loop file, no directory)."""

from __future__ import annotations

import pytest

from lxd_daemon.storage.drivers.lvm import LvmDriver
from lxd_daemon.storage.drivers.zfs import ZfsDriver
from tests.helpers import run_prefix

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("driver,cls", [("lvm", LvmDriver), ("zfs", ZfsDriver)])
def test_pool_create_refused_with_reason(daemon, driver, cls):
    ok, why = cls.available()
    if ok:
        pytest.skip(f"this host can run {driver}")
    name = f"{run_prefix()}-{driver}"[:60]
    r = daemon.api("POST", "/1.0/storage-pools", json={"name": name, "driver": driver, "config": {"size": "1GiB"}})
    assert r.status_code == 400, r.text
    assert why in r.json()["error"]
    r = daemon.lxc("storage", "create", name, driver, check=False)
    assert r.returncode != 0 and why in r.stderr
    assert daemon.api("GET", f"/1.0/storage-pools/{name}").status_code == 404
    assert not (daemon.lxd_dir / "disks" / f"{name}.img").exists()
    assert not (daemon.lxd_dir / "storage-pools" / name).exists()
    supported = daemon.api("GET", "/1.0").json()["metadata"]["environment"]["storage_supported_drivers"]
    assert driver not in [d["Name"] for d in supported]
