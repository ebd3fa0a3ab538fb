"""A dir pool's image cache (kept only on filesystems with reflinks) is removed once launches stop
(VolumeService.CACHE_IDLE_S after the last one), over a real dir pool on a btrfs loop file."""

from __future__ import annotations

import asyncio

from tests.unit.test_storage_volumes import FP, entries, make, unpacker


def test_cache_is_removed_after_the_last_launch(reflink_dir, monkeypatch):
    from lxd_daemon.storage import volumes

    vs, (pool,) = make(reflink_dir)
    monkeypatch.setattr(type(vs), "CACHE_IDLE_S", 0.6)
    cache = pool.driver.mount_path / "images" / FP
    unpacked = []

    async def settle():
        if vs._bg:
            await asyncio.wait(list(vs._bg), timeout=5)

    async def go():
        await vs.create_instance_volume(pool, "default", "c1", FP, unpacker(unpacked), "0_0")
        assert entries(cache) == ["0_0"]
        # A launch before the delay re-arms it: the cache stays for the next ones.
        await asyncio.sleep(0.4)
        await vs.create_instance_volume(pool, "default", "c2", FP, unpacker(unpacked), "0_0")
        await asyncio.sleep(0.4)
        assert entries(cache) == ["0_0"]
        # A launch copying from the cache when the delay ends keeps it: c3's copy waits meanwhile.
        release = asyncio.Event()
        real_copy = volumes.copy_tree

        async def slow_copy(src, dst, **kw):
            await release.wait()
            await real_copy(src, dst, **kw)

        monkeypatch.setattr(volumes, "copy_tree", slow_copy)
        launch = asyncio.ensure_future(vs.create_instance_volume(pool, "default", "c3", FP, unpacker(unpacked), "0_0"))
        await asyncio.sleep(0.9)  # the delay armed by c2 ends meanwhile
        assert entries(cache) == ["0_0"]
        release.set()
        p = await launch
        assert (p / "rootfs" / "hello").read_text() == "hi"
        monkeypatch.setattr(volumes, "copy_tree", real_copy)
        await asyncio.sleep(0.8)
        await settle()
        assert entries(cache) == []  # idle: the cache is gone, temporaries too
        assert len(unpacked) == 1
        # The next launch unpacks the image again.
        p = await vs.create_instance_volume(pool, "default", "c4", FP, unpacker(unpacked), "0_0")
        assert (p / "rootfs" / "hello").read_text() == "hi" and len(unpacked) == 2
        assert entries(cache) == ["0_0"]
        await vs.close()
        assert vs._idle == {}

    asyncio.run(go())


def test_a_dropped_image_cache_goes_out_of_the_way_in_one_rename(reflink_dir, monkeypatch):
    """Deleting an image renames its cache away before removing it: the same image imported again
    and launched meanwhile finds the whole cache or none (it used to copy a half-removed one)."""
    from lxd_daemon.storage import volumes

    vs, (pool,) = make(reflink_dir)
    images = pool.driver.mount_path / "images"
    seen = []
    real_remove = volumes.remove_tree

    async def watching_remove(path):
        if path.name.startswith(".tmp-drop-"):
            seen.append(entries(images))
        await real_remove(path)

    async def go():
        await vs.create_instance_volume(pool, "default", "c1", FP, unpacker([]), "0_0")
        if vs._bg:
            await asyncio.wait(list(vs._bg), timeout=5)
        monkeypatch.setattr(volumes, "remove_tree", watching_remove)
        await vs.drop_image(FP)
        assert len(seen) == 1 and FP not in seen[0]  # gone from its name before the removal
        assert entries(images) == []
        # A crash in the middle of the removal leaves `.tmp-drop-*`: the start-up sweep removes it.
        (images / ".tmp-drop-12345678" / "0_0" / "rootfs").mkdir(parents=True)
        await vs.sweep([("default", "c1")])
        assert entries(images) == []
        await vs.close()

    asyncio.run(go())
