"""`lxd init --auto` with LXD's storage flags, and `lxd init --preseed` with pools of every driver:
the pool is made by the daemon's driver and the default profile's root disk is on it; lvm and zfs
reach the daemon, which refuses them on a host without device-mapper or ZFS, naming why."""

from __future__ import annotations

import os
import subprocess

import pytest
import yaml

from lxd_daemon.storage.drivers.btrfs import BtrfsDriver
from lxd_daemon.storage.drivers.lvm import LvmDriver
from lxd_daemon.storage.drivers.zfs import ZfsDriver

pytestmark = pytest.mark.integration

needs_btrfs = pytest.mark.skipif(not BtrfsDriver.available()[0], reason="btrfs is not available on this host")


def _root_pool(d) -> str | None:
    root = d.api("GET", "/1.0/profiles/default").json()["metadata"]["devices"].get("root")
    return root and root.get("pool")


def _reset_storage(d, pool: str) -> None:
    d.lxc("profile", "device", "remove", "default", "root")
    d.lxc("storage", "delete", pool)


def test_auto_flags_are_checked_as_lxd_checks_them(fresh_daemon):
    d = fresh_daemon.start()
    for args, words in (
            (["--storage-backend", "nonsense"], "nonsense"),
            (["--storage-backend", "dir", "--storage-create-loop", "1"], "'dir' backend"),
            (["--storage-pool", "x"], "'dir' backend"),
            (["--storage-backend", "btrfs", "--storage-create-loop", "1", "--storage-create-device", "/dev/null"],
             "Only one of"),
            (["--storage-backend", "btrfs", "--storage-create-loop", "0"], "at least 1")):
        r = d.lxd("init", "--auto", *args, check=False)
        assert r.returncode == 1 and words in r.stderr, (args, r.stderr)
    assert d.api("GET", "/1.0/storage-pools").json()["metadata"] == []
    # Plain --auto: a dir pool `default`; once more: storage is left as it is, flags are refused.
    d.lxd("init", "--auto")
    assert d.api("GET", "/1.0/storage-pools/default").json()["metadata"]["driver"] == "dir"
    assert _root_pool(d) == "default"
    d.lxd("init", "--auto")
    r = d.lxd("init", "--auto", "--storage-backend", "dir", check=False)
    assert r.returncode == 1 and "Storage has already been configured" in r.stderr


@pytest.mark.parametrize("driver,cls", [("lvm", LvmDriver), ("zfs", ZfsDriver)])
def test_auto_lvm_zfs_reach_the_daemon(fresh_daemon, driver, cls):
    ok, why = cls.available()
    if ok:
        pytest.skip(f"this host can run {driver}")
    d = fresh_daemon.start()
    r = d.lxd("init", "--auto", "--storage-backend", driver, "--storage-create-loop", "1", check=False)
    assert r.returncode == 1 and why in r.stderr and driver in r.stderr, r.stderr
    assert d.api("GET", "/1.0/storage-pools").json()["metadata"] == []
    assert _root_pool(d) is None
    seed = {"storage_pools": [{"name": "p1", "driver": driver, "config": {"size": "1GiB"}}]}
    r = d.lxd("init", "--preseed", input=yaml.safe_dump(seed), check=False)
    assert r.returncode == 1 and why in r.stderr
    assert not (d.lxd_dir / "disks").exists() or not os.listdir(d.lxd_dir / "disks")


@needs_btrfs
def test_auto_btrfs_on_a_loop_file_then_on_a_device(fresh_daemon, tmp_path):
    d = fresh_daemon.start()
    d.lxd("init", "--auto", "--storage-backend", "btrfs", "--storage-create-loop", "1", "--storage-pool", "bt0")
    pool = d.api("GET", "/1.0/storage-pools/bt0").json()["metadata"]
    loop_file = d.lxd_dir / "disks" / "bt0.img"
    assert pool["driver"] == "btrfs" and pool["config"]["size"] == "1GiB"
    assert pool["config"]["source"] == str(loop_file) and loop_file.stat().st_size == 1 << 30
    assert _root_pool(d) == "bt0"
    r = d.lxd("init", "--auto", "--storage-backend", "btrfs", "--storage-create-loop", "1", check=False)
    assert r.returncode == 1 and "already been configured" in r.stderr
    _reset_storage(d, "bt0")
    assert not loop_file.exists()

    # On a block device (a loop device of the test's own): the pool is named `default`.
    img = tmp_path / "dev.img"
    with open(img, "wb") as f:
        f.truncate(512 << 20)
    dev = subprocess.run(["losetup", "--find", "--show", str(img)], capture_output=True, text=True,
                         check=True).stdout.strip()
    try:
        d.lxd("init", "--auto", "--storage-backend", "btrfs", "--storage-create-device", dev)
        pool = d.api("GET", "/1.0/storage-pools/default").json()["metadata"]
        assert pool["driver"] == "btrfs" and pool["config"]["source"] == dev
        assert _root_pool(d) == "default"
        fstype = subprocess.run(["blkid", "-p", "-s", "TYPE", "-o", "value", dev], capture_output=True,
                                text=True).stdout.strip()
        assert fstype == "btrfs"
        _reset_storage(d, "default")
    finally:
        mnt = d.lxd_dir / "storage-pools" / "default"
        if os.path.ismount(mnt):
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        subprocess.run(["losetup", "-d", dev], capture_output=True)


@needs_btrfs
def test_preseed_pools_of_each_driver_and_the_root_disk(fresh_daemon, tmp_path):
    d = fresh_daemon.start()
    src = tmp_path / "dirsrc"
    src.mkdir()
    seed = {
        "storage_pools": [
            {"name": "d1", "driver": "dir", "config": {"source": str(src)}, "description": "a dir pool"},
            {"name": "b1", "driver": "btrfs", "config": {"size": "512MiB"}},
        ],
        "profiles": [{"name": "default", "devices": {"root": {"type": "disk", "path": "/", "pool": "b1"}}}],
    }
    d.lxd("init", "--preseed", input=yaml.safe_dump(seed))
    try:
        d1 = d.api("GET", "/1.0/storage-pools/d1").json()["metadata"]
        assert d1["driver"] == "dir" and d1["description"] == "a dir pool" and (src / "containers").is_dir()
        b1 = d.api("GET", "/1.0/storage-pools/b1").json()["metadata"]
        assert b1["driver"] == "btrfs" and b1["config"]["size"] == "512MiB"
        assert os.path.ismount(d.lxd_dir / "storage-pools" / "b1")
        assert _root_pool(d) == "b1"
        # A preseed naming an existing pool updates it (here: nothing to change) and stays valid.
        d.lxd("init", "--preseed", input=yaml.safe_dump(seed))
        # Bad keys are refused by the driver, naming them; nothing is made.
        bad = {"storage_pools": [{"name": "b2", "driver": "btrfs", "config": {"btrfs.bogus": "1"}}]}
        r = d.lxd("init", "--preseed", input=yaml.safe_dump(bad), check=False)
        assert r.returncode == 1 and "btrfs.bogus" in r.stderr
        assert d.api("GET", "/1.0/storage-pools/b2").status_code == 404
    finally:
        d.lxc("profile", "device", "remove", "default", "root", check=False)
        d.lxc("storage", "delete", "b1", check=False)
        d.lxc("storage", "delete", "d1", check=False)
    assert not (d.lxd_dir / "disks" / "b1.img").exists()
