"""The btrfs driver for real, on a small loop file per test (conformance suite + btrfs's own)."""

from __future__ import annotations

import os
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from lxd_daemon.errors import BadRequest, LXDError
from lxd_daemon.storage.drivers import blockutil
from lxd_daemon.storage.drivers.btrfs import BtrfsDriver
from lxd_daemon.storage.volume import VolumeType
from tests.storage.conformance import DriverConformance, populate

ok, why = BtrfsDriver.available()
pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not ok, reason=f"needs root and btrfs ({why})")

POOL_SIZE = "300MiB"


def _sh(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True)


def mounts_under(path: Path) -> list[str]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mnt = line.split()[4]
            if mnt == str(path) or mnt.startswith(str(path) + "/"):
                out.append(mnt)
    return out


def loops_of(path: Path) -> list[str]:
    """Loop devices whose backing file is under `path`."""
    res = _sh("losetup", "-l", "-n", "-O", "NAME,BACK-FILE")
    out = []
    for line in res.stdout.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[1].strip().startswith(str(path)):
            out.append(parts[0])
    return out


def force_cleanup(tmp_path: Path) -> None:
    """Whatever a failed test left under tmp_path: mounts (deepest first), then loop devices."""
    for mnt in sorted(mounts_under(tmp_path), key=len, reverse=True):
        if _sh("umount", mnt).returncode != 0:
            _sh("umount", "-l", mnt)
    for dev in loops_of(tmp_path):
        _sh("losetup", "-d", dev)


class BtrfsFixture:
    def make_driver(self, tmp_path: Path) -> BtrfsDriver:
        mount = tmp_path / "var" / "storage-pools" / self.pool_name
        return BtrfsDriver(self.pool_name, mount, BtrfsDriver.validate_pool_config({"size": POOL_SIZE}))

    def cleanup_driver(self, driver: BtrfsDriver) -> None:
        try:
            super().cleanup_driver(driver)
        finally:
            force_cleanup(self.tmp_path)

    def host_leftovers(self, driver: BtrfsDriver) -> list[str]:
        out = super().host_leftovers(driver)
        loop = blockutil.loop_file(driver.mount_path, driver.pool_name)
        out += [str(loop)] if loop.exists() else []
        out += mounts_under(driver.mount_path) + loops_of(self.tmp_path)
        return out

    def volume_leftovers(self, driver: BtrfsDriver) -> list[str]:
        out = super().volume_leftovers(driver)
        res = _sh("btrfs", "subvolume", "list", str(driver.mount_path))
        return out + [line for line in res.stdout.splitlines() if line.strip()]


class TestBtrfsConformance(BtrfsFixture, DriverConformance):
    pass


class TestBtrfsDriver(BtrfsFixture, DriverConformance):
    """What only btrfs has: where pools live, nested subvolumes, the backup layout, speed."""

    def test_loop_pool(self):
        d = self.driver
        loop = blockutil.loop_file(d.mount_path, d.pool_name)
        assert d.config["source"] == str(loop) and loop.is_file()
        assert loop.stat().st_size == 300 * 1024 * 1024
        assert mounts_under(d.mount_path) == [str(d.mount_path)]
        opts = _sh("findmnt", "-n", "-o", "OPTIONS", str(d.mount_path)).stdout
        assert "user_subvol_rm_allowed" in opts
        # Unmounting frees the loop device (autoclear); mounting re-attaches it (daemon start).
        assert self.run(d.unmount_pool())
        assert loops_of(self.tmp_path) == [] and mounts_under(d.mount_path) == []
        assert self.run(d.mount_pool())
        assert not self.run(d.mount_pool())
        assert len(loops_of(self.tmp_path)) == 1

    def test_mount_options_and_bad_keys(self):
        with pytest.raises(BadRequest):
            BtrfsDriver.validate_pool_config({"size": "10MiB"})
        with pytest.raises(BadRequest):
            BtrfsDriver.validate_pool_config({"btrfs.mount_options": "a b"})
        with pytest.raises(BadRequest):
            BtrfsDriver.validate_pool_config({"source": "relative"})
        assert BtrfsDriver.validate_pool_config({})["btrfs.mount_options"] == "user_subvol_rm_allowed"
        self.run(self.driver.update_pool({"btrfs.mount_options": "user_subvol_rm_allowed,noatime"}))
        opts = _sh("findmnt", "-n", "-o", "OPTIONS", str(self.driver.mount_path)).stdout
        assert "noatime" in opts

    def test_block_device_pool(self):
        img = self.tmp_path / "dev.img"
        with open(img, "wb") as f:
            f.truncate(256 * 1024 * 1024)
        dev = _sh("losetup", "--find", "--show", str(img)).stdout.strip()
        assert dev.startswith("/dev/loop")
        d = BtrfsDriver("blk", self.tmp_path / "var" / "storage-pools" / "blk",
                        BtrfsDriver.validate_pool_config({"source": dev}))
        self.run(d.create_pool())
        v = self.vol("c1")
        self.run(d.create_volume(v.renamed("c1")))
        assert _sh("blkid", "-p", "-s", "TYPE", "-o", "value", dev).stdout.strip() == "btrfs"
        self.run(d.unmount_pool())
        self.run(d.mount_pool())
        assert self.run(d.has_volume(v))
        # A second pool can't take the same device while it is mounted.
        d2 = BtrfsDriver("blk2", self.tmp_path / "var" / "storage-pools" / "blk2", {"source": dev})
        with pytest.raises(BadRequest):
            self.run(d2.create_pool())
        self.run(d.delete_volume(v))
        self.run(d.delete_pool())
        assert mounts_under(d.mount_path) == [] and not d.mount_path.exists()
        # An empty btrfs device is reused without mkfs, a non-empty one refused.
        self.run(d.create_pool())
        self.run(d.create_volume(v))
        self.run(d.unmount_pool())
        with pytest.raises(BadRequest):
            self.run(d2.create_pool())
        assert not d2.mount_path.exists()
        self.run(d.mount_pool())
        self.run(d.delete_volume(v))
        self.run(d.delete_pool())
        _sh("losetup", "-d", dev)
        missing = BtrfsDriver("m", self.tmp_path / "var" / "storage-pools" / "m", {"source": "/dev/nonexistent-disk"})
        with pytest.raises(BadRequest):
            self.run(missing.create_pool())

    def test_path_pool(self):
        src = self.driver.mount_path / "elsewhere"
        src.mkdir()
        d = BtrfsDriver("onpath", self.tmp_path / "var" / "storage-pools" / "onpath", {"source": str(src)})
        self.run(d.create_pool())
        v = self.vol("c1")
        self.run(d.create_volume(v))
        assert (src / "containers" / "c1").is_dir()
        self.run(d.create_snapshot(v.snapshot("s1")))
        assert self.run(d.list_snapshots(v)) == ["s1"]
        self.run(d.delete_pool())
        assert src.is_dir() and os.listdir(src) == []
        assert not d.mount_path.exists()
        with pytest.raises(BadRequest):  # not on btrfs
            self.run(BtrfsDriver("x", self.tmp_path / "x", {"source": str(self.tmp_path)}).create_pool())

    def test_nested_subvolumes(self):
        v = self.make(self.vol("c1"))
        p = self.path(v)
        (p / "var" / "lib").mkdir(parents=True)
        _sh("btrfs", "subvolume", "create", str(p / "var" / "lib" / "machines"))
        _sh("btrfs", "subvolume", "create", str(p / "var" / "lib" / "machines" / "inner"))
        (p / "var" / "lib" / "machines" / "inner" / "f").write_text("nested")
        self.run(self.driver.create_snapshot(v.snapshot("s1")))
        assert (self.path(v.snapshot("s1")) / "var/lib/machines/inner/f").read_text() == "nested"
        c = self.vol("c2")
        self.run(self.driver.create_volume_from_copy(c, v, snapshots=True))
        assert (self.path(c) / "var/lib/machines/inner/f").read_text() == "nested"
        (self.path(c) / "var/lib/machines/inner/f").write_text("changed")
        self.run(self.driver.restore_snapshot(c.snapshot("s1")))
        assert (self.path(c) / "var/lib/machines/inner/f").read_text() == "nested"
        tar_path = self.tmp_path / "b.tar"
        with tarfile.open(tar_path, "w") as tar:
            names = self.run(self.driver.backup_volume_optimized(v, ["s1"], tar))
        assert "backup/container_var-lib-machines.bin" in names
        with tarfile.open(tar_path) as tar:
            r = self.vol("r1")
            self.run(self.driver.restore_volume_optimized(r, ["s1"], tar.extractfile))
        assert (self.path(r) / "var/lib/machines/inner/f").read_text() == "nested"
        assert (self.path(r.snapshot("s1")) / "var/lib/machines/inner/f").read_text() == "nested"
        for vol in (v, c, r):
            for s in self.run(self.driver.list_snapshots(vol)):
                self.run(self.driver.delete_snapshot(vol.snapshot(s)))
            self.run(self.driver.delete_volume(vol))
        assert self.volume_leftovers(self.driver) == []

    def test_backup_layout(self):
        v = self.make(self.vol("c1"))
        self.run(self.driver.create_snapshot(v.snapshot("snap0")))
        tar_path = self.tmp_path / "b.tar"
        with tarfile.open(tar_path, "w") as tar:
            names = self.run(self.driver.backup_volume_optimized(v, ["snap0"], tar))
        assert names == ["backup/optimized_header.yaml", "backup/snapshots/snap0.bin", "backup/container.bin"]
        cv = self.make(self.vol("v1", VolumeType.CUSTOM))
        self.run(self.driver.create_snapshot(cv.snapshot("s")))
        with tarfile.open(self.tmp_path / "c.tar", "w") as tar:
            names = self.run(self.driver.backup_volume_optimized(cv, ["s"], tar))
        assert names[1:] == ["backup/volume-snapshots/s.bin", "backup/volume.bin"]
        with tarfile.open(tar_path) as tar:
            data = tar.extractfile("backup/container.bin").read()
        assert data.startswith(b"btrfs-stream\x00")

    def test_quota_survives_restore(self):
        v = self.make(self.vol("c1", VolumeType.CUSTOM, size="20MiB"), None)
        self.run(self.driver.create_snapshot(v.snapshot("s1")))
        self.run(self.driver.restore_snapshot(v.snapshot("s1")))
        from tests.storage.conformance import _write
        with pytest.raises(OSError):
            _write(self.path(v) / "big", 60 * 1024 * 1024)

    def test_usage_with_quotas(self):
        from tests.storage.conformance import _write

        v = self.make(self.vol("c1", VolumeType.CUSTOM, size="50MiB"), lambda root: _write(root / "f", 5 * 1024 * 1024))
        os.sync()
        _sh("btrfs", "filesystem", "sync", str(self.driver.mount_path))
        used = self.run(self.driver.volume_usage(v))
        assert 4 * 1024 * 1024 <= used <= 16 * 1024 * 1024, used
        assert self.run(self.driver._qgroup(self.path(v)))[1] == 50 * 1024 * 1024
        self.run(self.driver.delete_volume(v))
        assert self.volume_leftovers(self.driver) == []

    def test_full_pool(self):
        v = self.make(self.vol("c1"), None)
        from tests.storage.conformance import _write
        with pytest.raises(OSError):
            _write(self.path(v) / "big", 400 * 1024 * 1024)
        (self.path(v) / "big").unlink()
        self.run(self.driver.create_snapshot(v.snapshot("after-full")))

    def test_default_loop_size(self):
        d = BtrfsDriver("big", self.tmp_path / "var" / "storage-pools" / "big", BtrfsDriver.validate_pool_config({}))
        self.run(d.create_pool())
        try:
            want = blockutil.default_loop_size(self.tmp_path / "var")  # a fifth of free, 5..30 GiB
            assert d.config["size"] == f"{want // 1024 ** 3}GiB"
            assert 5 <= want // 1024 ** 3 <= 30
            assert Path(d.config["source"]).stat().st_size == want
        finally:
            self.run(d.delete_pool())
        assert not Path(d.config["source"]).exists()

    def test_sweep_after_crash(self):
        v = self.make(self.vol("c1"))
        base = self.driver.mount_path / "containers"
        _sh("btrfs", "subvolume", "snapshot", str(self.path(v)), str(base / ".restore-c1-dead"))
        (base / ".recv-c1-dead" / "0").mkdir(parents=True)
        _sh("btrfs", "subvolume", "snapshot", "-r", str(self.path(v)), str(base / ".recv-c1-dead" / "0" / "x"))
        busy = self.driver._temp(v, "send")
        busy.mkdir()
        self.run(self.driver.unmount_pool())
        assert self.run(self.driver.mount_pool())
        assert sorted(os.listdir(base)) == sorted(["c1", busy.name])
        self.run(self.driver.mount_pool())  # at every start, also when still mounted
        self.driver._busy.discard(busy)
        self.run(self.driver.mount_pool())
        assert os.listdir(base) == ["c1"]

    def test_full_pool_filler(self):
        from lxd_daemon.errors import InsufficientStorage
        from tests.storage.conformance import _write

        v = self.vol("c1")
        with pytest.raises(InsufficientStorage):
            self.make(v, lambda root: _write(root / "big", 400 * 1024 * 1024))
        assert not self.run(self.driver.has_volume(v))
        assert self.volume_leftovers(self.driver) == []
        self.make(v)  # and the pool still works

    def test_bad_migration_stream(self):
        v = self.make(self.vol("c1"))

        async def garbage():
            yield b"\x00\x00\x00\x05hello"

        async def write(b: bytes) -> None:
            pass

        with pytest.raises(BadRequest):
            self.run(self.driver.receive_volume(self.vol("r"), [], "BTRFS", garbage()))
        with pytest.raises(BadRequest):
            self.run(self.driver.send_volume(v, [], "ZFS", write))
        chunks: list[bytes] = []

        async def keep(b: bytes) -> None:
            chunks.append(b)

        self.run(self.driver.send_volume(v, [], "BTRFS", keep))
        data = b"".join(chunks)

        async def cut():
            yield data[: len(data) // 2]

        with pytest.raises(LXDError):
            self.run(self.driver.receive_volume(self.vol("r"), [], "BTRFS", cut()))
        assert not self.run(self.driver.has_volume(self.vol("r")))
        assert sorted(os.listdir(self.driver.mount_path / "containers")) == ["c1"]

    def test_grow_pool(self):
        before = self.driver.usage()["space"]["total"]
        self.run(self.driver.update_pool({"size": "400MiB"}))
        assert self.driver.usage()["space"]["total"] > before + 64 * 1024 * 1024
        with pytest.raises(BadRequest):
            self.run(self.driver.update_pool({"size": "200MiB"}))
        with pytest.raises(BadRequest):
            self.run(self.driver.update_pool({"volume.nope": "x"}))

    def test_timings(self, capsys):
        """snapshot / copy / restore of a small (busybox-sized) container, medians in ms."""
        def fill(root: Path) -> None:
            populate(root)
            for i in range(300):
                (root / "etc" / f"f{i}").write_bytes(os.urandom(4096))

        v = self.make(self.vol("c1"), fill)
        res: dict[str, list[float]] = {"snapshot": [], "copy": [], "restore": [],
                                       "floor (bare btrfs subvolume snapshot)": []}
        base = self.driver.mount_path / "containers"
        for i in range(15):  # interleaved with the floor: same pool, same moment
            t = time.perf_counter()
            _sh("btrfs", "subvolume", "snapshot", "-r", str(self.path(v)), str(base / f"floor{i}"))
            res["floor (bare btrfs subvolume snapshot)"].append(time.perf_counter() - t)
            t = time.perf_counter()
            self.run(self.driver.create_snapshot(v.snapshot(f"s{i}")))
            res["snapshot"].append(time.perf_counter() - t)
            t = time.perf_counter()
            self.run(self.driver.create_volume_from_copy(self.vol(f"copy{i}"), v))
            res["copy"].append(time.perf_counter() - t)
            t = time.perf_counter()
            self.run(self.driver.restore_snapshot(v.snapshot(f"s{i}")))
            res["restore"].append(time.perf_counter() - t)
        med = {k: sorted(x)[len(x) // 2] * 1000 for k, x in res.items()}
        with capsys.disabled():
            print("\nbtrfs timings (median ms): " + ", ".join(f"{k} {v:.1f}" for k, v in med.items()))
        assert med["snapshot"] < 100


# The btrfs-only class re-runs the conformance scenarios otherwise: keep them in one class.
for _name in [n for n in dir(DriverConformance) if n.startswith("test_")]:
    setattr(TestBtrfsDriver, _name, None)
