"""storage.volumes.VolumeService over real dir pools in a temporary directory, and over a driver
declaring optimised images (a dir driver that records its CoW calls)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from lxd_daemon.storage.drivers.dir import DirDriver
from lxd_daemon.storage.volume import DriverInfo, Volume, VolumeType
from lxd_daemon.storage.volumes import VolumeService

FP = "ab" * 32


class CowDriver(DirDriver):
    info = DriverInfo(name="cowtest", version="0", optimized_images=True, cow_snapshots=True)
    from_image: list = []

    async def create_volume_from_image(self, vol, image):
        type(self).from_image.append((vol.name, image.name))
        await self.create_volume_from_copy(vol, image)


def make(tmp_path: Path, *drivers) -> tuple[VolumeService, list]:
    pools = {}
    for i, cls in enumerate(drivers or (DirDriver,)):
        drv = cls(f"p{i}", tmp_path / f"p{i}", {})
        asyncio.run(drv.create_pool())
        pools[f"p{i}"] = SimpleNamespace(name=f"p{i}", driver=drv)
    return VolumeService(SimpleNamespace(pools=pools)), list(pools.values())


def unpacker(counter: list, fail: bool = False):
    async def unpack(path: Path) -> None:
        counter.append(path)
        await asyncio.sleep(0.01)
        (path / "rootfs").mkdir()
        (path / "rootfs" / "hello").write_text("hi")
        (path / "metadata.yaml").write_text("architecture: x86_64\n")
        if fail:
            raise RuntimeError("corrupt image")

    return unpack


def entries(p: Path) -> list[str]:
    return sorted(os.listdir(p)) if p.is_dir() else []


def test_dir_launches_unpack_into_each_volume_without_a_cache(tmp_path):
    """On a filesystem without reflinks (ext4 here) every launch unpacks the image into its own
    volume, as LXD does: nothing else is kept in the pool."""
    vs, (pool,) = make(tmp_path)
    unpacked = []

    async def go():
        paths = await asyncio.gather(*(vs.create_instance_volume(pool, "default", f"c{i}", FP, unpacker(unpacked), "0_0")
                                       for i in range(3)))
        assert sorted(unpacked) == sorted(paths)  # each one unpacked into its own volume
        for i, p in enumerate(paths):
            assert p == pool.driver.mount_path / "containers" / f"c{i}"
            assert (p / "rootfs" / "hello").read_text() == "hi"
        assert entries(pool.driver.mount_path / "images") == []
        assert vs._reflinks == {pool.name: False} and not vs._bg and not vs._idle
        await vs.close()

    asyncio.run(go())


def test_dir_launches_on_a_reflink_filesystem_share_one_cache(reflink_dir):
    """Where the filesystem has reflinks (btrfs here) the image is unpacked once per id map into
    the pool's cache and every launch is a reflinked copy of it."""
    vs, (pool,) = make(reflink_dir)
    unpacked = []

    async def go():
        paths = await asyncio.gather(*(vs.create_instance_volume(pool, "default", f"c{i}", FP, unpacker(unpacked), "0_0")
                                       for i in range(3)))
        assert len(unpacked) == 1  # once, for concurrent launches
        for p in paths:
            assert (p / "rootfs" / "hello").read_text() == "hi"
        cache = pool.driver.mount_path / "images" / FP
        assert entries(cache) == ["0_0"]
        await vs.create_instance_volume(pool, "default", "c9", FP, unpacker(unpacked), "0_0")
        assert len(unpacked) == 1
        # A different id map gets its own cache.
        await vs.create_instance_volume(pool, "default", "u1", FP, unpacker(unpacked), "1000000_1000000")
        assert len(unpacked) == 2 and entries(cache) == ["0_0", "1000000_1000000"]
        await vs.close()

    asyncio.run(go())


def test_failed_unpack_leaves_nothing(tmp_path):
    vs, (pool,) = make(tmp_path)
    with pytest.raises(RuntimeError):
        asyncio.run(vs.create_instance_volume(pool, "default", "c1", FP, unpacker([], fail=True), "0_0"))
    assert entries(pool.driver.mount_path / "containers") == []
    assert entries(pool.driver.mount_path / "images" / FP) == []


def test_leftover_under_the_name_is_replaced(tmp_path):
    vs, (pool,) = make(tmp_path)
    stale = pool.driver.mount_path / "containers" / "c1"
    (stale / "junk").mkdir(parents=True)

    async def go():
        try:
            return await vs.create_instance_volume(pool, "default", "c1", FP, unpacker([]), "0_0")
        finally:
            await vs.close()

    p = asyncio.run(go())
    assert entries(p) == ["metadata.yaml", "rootfs"]


def test_delete_in_the_background_rename_and_copy(tmp_path):
    vs, (pool, other) = make(tmp_path, DirDriver, DirDriver)
    drv = pool.driver

    async def go():
        await vs.create_instance_volume(pool, "default", "c1", FP, unpacker([]), "0_0")
        await drv.create_snapshot(Volume(pool.name, "container", "c1/s1"))
        new = await vs.rename_instance_volume(pool, "default", "c1", "c2")
        assert new == drv.mount_path / "containers" / "c2" and (new / "rootfs").is_dir()
        assert await drv.list_snapshots(Volume(pool.name, "container", "c2")) == ["s1"]
        # Same pool: the driver's copy; another pool: a tree copy.
        p3 = await vs.copy_instance_volume(pool, "c2", pool, "c3")
        p4 = await vs.copy_instance_volume(pool, "c2", other, "c4")
        assert (p3 / "rootfs" / "hello").read_text() == (p4 / "rootfs" / "hello").read_text() == "hi"
        assert p4 == other.driver.mount_path / "containers" / "c4"
        await vs.delete_instance_volume(pool, "default", "c2")
        assert not (drv.mount_path / "containers" / "c2").exists()  # gone at once
        await vs.close()
        assert entries(drv.mount_path / "containers") == ["c3"]
        assert entries(drv.mount_path / "containers-snapshots") == []
        await vs.delete_instance_volume(pool, "default", "missing")  # fine
        await vs.delete_instance_volume(pool, "default", "c3", background=False)
        assert entries(drv.mount_path / "containers") == []

    asyncio.run(go())


def test_sweep_removes_leftovers_and_keeps_instances_and_caches(tmp_path):
    vs, (pool,) = make(tmp_path)
    drv = pool.driver

    async def go():
        await vs.create_instance_volume(pool, "default", "keep", FP, unpacker([]), "0_0")
        c = drv.mount_path / "containers"
        for leftover in (".trash-x-1234", "half", ".restore-keep-1"):
            (c / leftover / "rootfs").mkdir(parents=True)
        (drv.mount_path / "containers-snapshots" / ".trash-x-1234" / "s0").mkdir(parents=True)
        cache = drv.mount_path / "images" / FP
        # A finished cache (a pool with reflinks), a half-unpacked one, and a spare copy an
        # earlier version kept next to it.
        for e in ("0_0", ".tmp-0_0-dead", ".spare-0_0-1234"):
            (cache / e / "rootfs").mkdir(parents=True)
        (drv.mount_path / "images" / ".tmp-drop-1234").mkdir()
        await vs.sweep([("default", "keep")])
        assert entries(c) == ["keep"]
        assert entries(drv.mount_path / "containers-snapshots") == []
        assert entries(cache) == ["0_0"]
        assert entries(drv.mount_path / "images") == [FP]
        await vs.drop_image(FP)
        assert not cache.exists() and (c / "keep" / "rootfs").is_dir()

    asyncio.run(go())


def test_optimized_driver_gets_one_image_volume_per_idmap_and_cow_children(tmp_path):
    CowDriver.from_image = []
    vs, (pool,) = make(tmp_path, CowDriver)
    drv = pool.driver
    unpacked = []

    async def go():
        await asyncio.gather(*(vs.create_instance_volume(pool, "default", f"c{i}", FP, unpacker(unpacked), "0_0")
                               for i in range(3)))
        assert len(unpacked) == 1
        assert sorted(CowDriver.from_image) == [(f"c{i}", f"{FP}_0_0") for i in range(3)]
        images = [v.name for v in await drv.list_volumes() if v.type is VolumeType.IMAGE]
        assert images == [f"{FP}_0_0"]
        await vs.create_instance_volume(pool, "default", "u", FP, unpacker(unpacked), "100_100")
        assert len(unpacked) == 2
        # A half-unpacked image volume (crash) is swept; finished ones stay.
        await drv.create_volume(Volume(pool.name, "image", f"tmp-dead-{FP[:12]}"))
        await vs.sweep([("default", f"c{i}") for i in range(3)] + [("default", "u")])
        images = sorted(v.name for v in await drv.list_volumes() if v.type is VolumeType.IMAGE)
        assert images == [f"{FP}_0_0", f"{FP}_100_100"]
        await vs.drop_image(FP)
        assert [v for v in await drv.list_volumes() if v.type is VolumeType.IMAGE] == []
        assert (drv.mount_path / "containers" / "c0" / "rootfs" / "hello").exists()

    asyncio.run(go())


def test_failed_image_volume_leaves_nothing(tmp_path):
    vs, (pool,) = make(tmp_path, CowDriver)
    with pytest.raises(RuntimeError):
        asyncio.run(vs.create_instance_volume(pool, "default", "c1", FP, unpacker([], fail=True), "0_0"))
    assert asyncio.run(pool.driver.list_volumes()) == []
