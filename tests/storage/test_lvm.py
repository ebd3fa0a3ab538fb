"""The lvm driver at the command level: this kernel has no device-mapper, so the LVM tools run
against a simulation (tests/storage/fake_tools.py) that answers as they do. The conformance
suite runs on it; the tests below pin the exact invocations and the handling of the tools'
output and failures. Not run against a real volume group."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from unittest import mock

import pytest

from lxd_daemon.errors import BadRequest, Conflict, InsufficientStorage, LXDError, NotFound
from lxd_daemon.storage.drivers import DRIVERS
from lxd_daemon.storage.drivers.lvm import LvmDriver, escape, lv_name, parse_snapshot, unescape
from lxd_daemon.storage.volume import ContentType, Volume, VolumeType
from tests.storage.conformance import DriverConformance
from tests.storage.fake_tools import LvmSim

GiB = 1024 ** 3


def _available(cls):
    return True, "2.03.16(2) (2022-05-18) / 1.02.185 (2022-05-18)"


class LvmFixture:
    pool_name = "pool"
    config: dict = {}

    def make_driver(self, tmp_path: Path) -> LvmDriver:
        self.sim = LvmSim()
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(self.sim.installed())
        self._stack.enter_context(mock.patch.object(LvmDriver, "available", classmethod(_available)))
        return LvmDriver(self.pool_name, tmp_path / "lxd" / "storage-pools" / self.pool_name,
                         {"size": "1GiB", **self.config})

    def cleanup_driver(self, driver) -> None:
        try:
            super().cleanup_driver(driver)
        finally:
            self._stack.close()

    def host_leftovers(self, driver) -> list[str]:
        out = super().host_leftovers(driver)
        loop = driver.mount_path.parent.parent / "disks" / f"{driver.pool_name}.img"
        out += [str(loop)] if loop.exists() else []
        out += list(self.sim.loops.values()) + list(self.sim.vgs) + sorted(self.sim.mounted)
        return out


class TestLvmConformance(LvmFixture, DriverConformance):
    checks_files = False


class TestLvmThickConformance(LvmFixture, DriverConformance):
    checks_files = False
    config = {"lvm.use_thinpool": "false", "volume.size": "64MiB"}


# -- names ---------------------------------------------------------------------------------------
def test_lv_names_as_lxd():
    c = Volume("p", VolumeType.CONTAINER, "c1")
    assert lv_name(c) == "containers_c1"
    assert lv_name(c.snapshot("snap0")) == "containers_c1-snap0"
    assert lv_name(Volume("p", VolumeType.CONTAINER, "web-1/snap-x")) == "containers_web--1-snap--x"
    assert lv_name(Volume("p", VolumeType.CONTAINER, "c1", project="p1")) == "containers_p1_c1"
    assert lv_name(Volume("p", VolumeType.CUSTOM, "my-vol")) == "custom_default_my--vol"
    assert lv_name(Volume("p", VolumeType.IMAGE, "ab" * 32)) == "images_" + "ab" * 32
    assert lv_name(Volume("p", VolumeType.CUSTOM, "blk", content_type=ContentType.BLOCK)) == "custom_default_blk.block"
    assert escape("a-b/c") == "a--b-c" and unescape("a--b-c") == "a-b/c"


def test_snapshot_names_parsed_as_lxd():
    assert parse_snapshot("containers_c1", "containers_c1-snap0") == "snap0"
    assert parse_snapshot("containers_c1", "containers_c1-snap--0") == "snap-0"
    assert parse_snapshot("containers_c1", "containers_c1--2") == ""  # volume "c1-2", not a snapshot
    assert parse_snapshot("containers_c1", "containers_c2-snap0") == ""
    assert parse_snapshot("containers_c1", "containers_c1.lxdtmp") == ""
    assert parse_snapshot("custom_default_b.block", "custom_default_b-s1.block") == "s1"


# -- command-level tests -------------------------------------------------------------------------
@pytest.fixture
def env(tmp_path):
    sim = LvmSim()
    with sim.installed(), mock.patch.object(LvmDriver, "available", classmethod(_available)):
        yield sim, tmp_path


def make(tmp_path: Path, **config: str) -> LvmDriver:
    return LvmDriver("p1", tmp_path / "storage-pools" / "p1", dict(config))


def run(coro):
    return asyncio.run(coro)


def test_registered():
    assert DRIVERS["lvm"] is LvmDriver


def test_not_available_here_is_a_clear_400(tmp_path):
    ok, why = LvmDriver.available()
    if ok:
        pytest.skip("this host has device-mapper")
    assert "device-mapper" in why or "lvm2" in why
    d = make(tmp_path)
    with pytest.raises(BadRequest) as e:
        run(d.create_pool())
    assert e.value.status == 400 and e.value.message.startswith("The lvm driver can't run on this host: ")
    assert not (tmp_path / "disks").exists()


def test_validate_pool_config():
    LvmDriver.validate_pool_config({"lvm.use_thinpool": "false", "volume.block.filesystem": "xfs", "size": "5GiB"})
    for bad in ({"volume.block.filesystem": "btrfs2"}, {"lvm.use_thinpool": "maybe"}, {"size": "5 parsecs"},
                {"lvm.use_thinpool": "false", "lvm.thinpool_name": "x"}):
        with pytest.raises(BadRequest):
            LvmDriver.validate_pool_config(bad)


def test_create_loop_pool_invocations(env):
    sim, tmp = env
    d = make(tmp, size="2GiB")
    run(d.create_pool())
    loop = tmp / "disks" / "p1.img"
    assert loop.stat().st_size == 2 * GiB
    assert sim.calls == [
        ("losetup", "-j", str(loop)),
        ("losetup", "--find", "--show", str(loop)),
        ("pvs", "--noheadings", "-o", "pv_name", "/dev/loop7"),
        ("vgs", "--noheadings", "-o", "vg_tags", "p1"),
        ("pvcreate", "/dev/loop7"),
        ("vgcreate", "p1", "/dev/loop7"),
        ("lvcreate", "--yes", "--wipesignatures", "y", "--poolmetadatasize", "1G", "--thinpool", "p1/LXDThinPool",
         "--extents", "100%FREE"),
        ("vgchange", "--addtag", "lxd_pool", "p1"),
        ("lvs", "/dev/p1/LXDThinPool", "--noheadings", "--units", "b", "--nosuffix", "--separator", ",",
         "-o", "lv_size,data_percent,metadata_percent"),
    ]
    assert d.config["source"] == str(loop) and d.config["lvm.vg_name"] == "p1"
    assert d.usage()["space"]["total"] == sim.vgs["p1"].lvs["LXDThinPool"].size
    assert 0 < d.usage()["space"]["used"] < d.usage()["space"]["total"]  # 12.5% data + 3% metadata
    assert (d.mount_path / "containers").is_dir() and (d.mount_path / "images").is_dir()


def test_create_pool_failure_cleans_up(env):
    sim, tmp = env
    sim.fail("lvcreate", stderr="  Insufficient free space: 256 extents needed, but only 0 available\n")
    d = make(tmp, size="2GiB")
    with pytest.raises(InsufficientStorage):
        run(d.create_pool())
    assert sim.mutating()[-3:] == [("vgremove", "-f", "p1"), ("pvremove", "/dev/loop7"), ("losetup", "-d", "/dev/loop7")]
    assert not (tmp / "disks" / "p1.img").exists()
    assert sim.vgs == {} and sim.loops == {}


def test_create_on_existing_vg(env):
    sim, tmp = env
    sim.pvs.add("/dev/sdb")
    run(sim(("vgcreate", "vg0", "/dev/sdb"), None))
    d = make(tmp, source="vg0")
    run(d.create_pool())
    assert d.config["lvm.vg_name"] == "vg0" and d.config["size"] == ""
    assert ("pvcreate", "/dev/sdb") not in sim.calls and ("vgcreate", "vg0", "/dev/sdb") not in sim.mutating()[1:]
    assert "lxd_pool" in sim.vgs["vg0"].tags
    # The same VG for a second pool: refused, it carries the tag (and the thin pool).
    d2 = LvmDriver("p2", tmp / "storage-pools" / "p2", {"source": "vg0"})
    with pytest.raises(BadRequest, match="already used by LXD"):
        run(d2.create_pool())
    # Deleting the pool removes the thin pool (now empty) only if it's the last LV: the VG stays.
    run(d.delete_pool())
    assert "vg0" not in sim.vgs or "lxd_pool" not in sim.vgs["vg0"].tags


def test_missing_or_busy_vg(env):
    sim, tmp = env
    with pytest.raises(BadRequest, match="volume group 'nope' does not exist"):
        run(make(tmp, source="nope").create_pool())
    sim.pvs.add("/dev/sdb")
    run(sim(("vgcreate", "vg0", "/dev/sdb"), None))
    run(sim(("lvcreate", "--name", "other", "--size", "4194304b", "vg0"), None))
    with pytest.raises(BadRequest, match="Volume group 'vg0' is not empty"):
        run(make(tmp, source="vg0").create_pool())
    d = make(tmp, source="vg0", **{"lvm.vg.force_reuse": "true"})
    run(d.create_pool())
    assert "LXDThinPool" in sim.vgs["vg0"].lvs and "other" in sim.vgs["vg0"].lvs


def test_source_must_be_block_device(env):
    _, tmp = env
    f = tmp / "file"
    f.write_text("")
    with pytest.raises(BadRequest, match="not a block device"):
        run(make(tmp, source=str(f)).create_pool())


@pytest.fixture
def pool(env):
    sim, tmp = env
    d = make(tmp, size="2GiB")
    run(d.create_pool())
    sim.clear()
    return sim, d


def test_create_volume_invocations(pool):
    sim, d = pool
    seen = []

    async def filler(path: Path) -> None:
        seen.append((path, str(path) in sim.mounted))

    v = Volume("p1", VolumeType.CONTAINER, "c1")
    run(d.create_volume(v, filler))
    path = str(d.volume_path(v))
    assert seen == [(d.volume_path(v), True)]
    assert sim.mutating() == [
        ("lvcreate", "--name", "containers_c1", "--yes", "--wipesignatures", "y", "--thin", "--virtualsize",
         "10737418240b", "p1/LXDThinPool"),
        ("mkfs.ext4", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0", "/dev/p1/containers_c1"),
        ("lvchange", "--setactivationskip", "y", "/dev/p1/containers_c1"),
        ("lvchange", "--activate", "y", "--ignoreactivationskip", "/dev/p1/containers_c1"),
        ("mount", "-t", "ext4", "-o", "discard", "/dev/p1/containers_c1", path),
        ("umount", path),
        ("lvchange", "--activate", "n", "--ignoreactivationskip", "/dev/p1/containers_c1"),
    ]


def test_volume_options_from_pool_and_volume(pool):
    sim, d = pool
    d.config.update({"volume.block.filesystem": "xfs", "volume.block.mount_options": "noatime", "volume.size": "1GiB"})
    v = Volume("p1", VolumeType.CUSTOM, "data", config={"size": "3GiB"})
    run(d.create_volume(v))
    cmds = sim.mutating()
    assert cmds[0][:9] == ("lvcreate", "--name", "custom_default_data", "--yes", "--wipesignatures", "y", "--thin",
                           "--virtualsize", f"{3 * GiB}b")
    assert cmds[1] == ("mkfs.xfs", "/dev/p1/custom_default_data")
    assert cmds[4] == ("mount", "-t", "xfs", "-o", "noatime", "/dev/p1/custom_default_data", str(d.volume_path(v)))


def test_failed_filler_removes_the_lv(pool):
    sim, d = pool

    async def bad(path: Path) -> None:
        raise RuntimeError("unpack failed")

    v = Volume("p1", VolumeType.IMAGE, "f" * 64)
    with pytest.raises(RuntimeError):
        run(d.create_volume(v, bad))
    assert sim.mutating()[-3:] == [("umount", str(d.volume_path(v))),
                                   ("lvchange", "--activate", "n", "--ignoreactivationskip", f"/dev/p1/images_{'f' * 64}"),
                                   ("lvremove", "-f", f"/dev/p1/images_{'f' * 64}")]
    assert not d.volume_path(v).exists()
    assert f"images_{'f' * 64}" not in sim.vgs["p1"].lvs


def test_full_pool_is_507(pool):
    sim, d = pool
    sim.fail("lvcreate", stderr="  Insufficient free space: 2560 extents needed, but only 10 available\n")
    with pytest.raises(InsufficientStorage):
        run(d.create_volume(Volume("p1", VolumeType.CUSTOM, "big")))
    assert not (d.mount_path / "custom" / "default_big").exists()


def test_instance_from_image_is_a_thin_snapshot(pool):
    sim, d = pool
    img = Volume("p1", VolumeType.IMAGE, "a" * 64)
    run(d.create_volume(img))
    sim.clear()
    v = Volume("p1", VolumeType.CONTAINER, "c1")
    run(d.create_volume_from_image(v, img))
    assert sim.mutating() == [("lvcreate", "-n", "containers_c1", "-s", f"/dev/p1/images_{'a' * 64}",
                               "--setactivationskip", "y", "-prw")]
    assert d.volume_path(v).is_dir()
    # xfs: the snapshot gets a new filesystem UUID.
    d.config["volume.block.filesystem"] = "xfs"
    sim.clear()
    run(d.create_volume_from_image(Volume("p1", VolumeType.CONTAINER, "c2"), img))
    assert ("xfs_admin", "-U", "generate", "/dev/p1/containers_c2") in sim.calls


def test_copy_with_snapshots(pool):
    sim, d = pool
    src = Volume("p1", VolumeType.CONTAINER, "c1")
    run(d.create_volume(src))
    run(d.create_snapshot(src.snapshot("s1")))
    sim.clear()
    run(d.create_volume_from_copy(Volume("p1", VolumeType.CONTAINER, "c2"), src, snapshots=True))
    assert sim.mutating() == [
        ("lvcreate", "-n", "containers_c2-s1", "-s", "/dev/p1/containers_c1-s1", "--setactivationskip", "y", "-pr"),
        ("lvcreate", "-n", "containers_c2", "-s", "/dev/p1/containers_c1", "--setactivationskip", "y", "-prw"),
    ]


def test_copy_failure_removes_what_it_made(pool):
    sim, d = pool
    src = Volume("p1", VolumeType.CONTAINER, "c1")
    run(d.create_volume(src))
    run(d.create_snapshot(src.snapshot("s1")))
    sim.fail("lvcreate", "-n", "containers_c2", stderr="  Cannot create new thin volume, free space in thin pool p1/LXDThinPool reached threshold.\n")
    with pytest.raises(LXDError):
        run(d.create_volume_from_copy(Volume("p1", VolumeType.CONTAINER, "c2"), src, snapshots=True))
    assert ("lvremove", "-f", "/dev/p1/containers_c2-s1") in sim.calls
    assert set(sim.vgs["p1"].lvs) == {"LXDThinPool", "containers_c1", "containers_c1-s1"}
    assert not (d.mount_path / "containers-snapshots" / "c2").exists()


def test_snapshot_restore_invocations(pool):
    sim, d = pool
    v = Volume("p1", VolumeType.CONTAINER, "c1")
    run(d.create_volume(v))
    sim.clear()
    run(d.create_snapshot(v.snapshot("snap0")))
    assert sim.mutating() == [("lvcreate", "-n", "containers_c1-snap0", "-s", "/dev/p1/containers_c1",
                               "--setactivationskip", "y", "-pr")]
    sim.clear()
    run(d.restore_snapshot(v.snapshot("snap0")))
    assert sim.mutating() == [
        ("lvrename", "/dev/p1/containers_c1", "/dev/p1/containers_c1.lxdtmp"),
        ("lvcreate", "-n", "containers_c1", "-s", "/dev/p1/containers_c1-snap0", "--setactivationskip", "y", "-prw"),
        ("lvremove", "-f", "/dev/p1/containers_c1.lxdtmp"),
    ]
    # A failed restore puts the original back.
    sim.fail("lvcreate", stderr="  Insufficient free space\n")
    with pytest.raises(InsufficientStorage):
        run(d.restore_snapshot(v.snapshot("snap0")))
    assert sim.mutating()[-1] == ("lvrename", "/dev/p1/containers_c1.lxdtmp", "/dev/p1/containers_c1")
    assert "containers_c1" in sim.vgs["p1"].lvs and "containers_c1.lxdtmp" not in sim.vgs["p1"].lvs
    with pytest.raises(NotFound):
        run(d.restore_snapshot(v.snapshot("nope")))


def test_thick_pool_snapshot_and_restore(env):
    sim, tmp = env
    d = make(tmp, size="2GiB", **{"lvm.use_thinpool": "false", "volume.size": "100MiB"})
    run(d.create_pool())
    assert not d.info.optimized_images and not d.info.cow_snapshots
    assert not any(c[:2] == ("lvcreate", "--yes") for c in sim.calls)  # no thin pool
    v = Volume("p1", VolumeType.CONTAINER, "c1")
    run(d.create_volume(v))
    assert ("lvcreate", "--name", "containers_c1", "--yes", "--wipesignatures", "y", "--size", f"{100 * 1024 * 1024}b",
            "p1") in sim.calls
    sim.clear()
    run(d.create_snapshot(v.snapshot("s1")))
    assert sim.mutating() == [("lvcreate", "-n", "containers_c1-s1", "-s", "/dev/p1/containers_c1",
                               "--setactivationskip", "y", "--size", f"{100 * 1024 * 1024}b", "-pr")]
    sim.clear()
    run(d.restore_snapshot(v.snapshot("s1")))
    rsyncs = sim.commands("rsync")
    assert len(rsyncs) == 1 and rsyncs[0][-2:] == (f"{d.volume_path(v.snapshot('s1'))}/", f"{d.volume_path(v)}/")
    assert ("mount", "-t", "ext4", "-o", "ro,discard", "/dev/p1/containers_c1-s1",
            str(d.volume_path(v.snapshot("s1")))) in sim.calls
    assert sim.mounted == set()


def test_rename_invocations(pool):
    sim, d = pool
    v = Volume("p1", VolumeType.CONTAINER, "c1")
    run(d.create_volume(v))
    run(d.create_snapshot(v.snapshot("s1")))
    sim.clear()
    run(d.rename_volume(v, "web-2"))
    assert sim.mutating() == [("lvrename", "/dev/p1/containers_c1-s1", "/dev/p1/containers_web--2-s1"),
                              ("lvrename", "/dev/p1/containers_c1", "/dev/p1/containers_web--2")]
    assert (d.mount_path / "containers" / "web-2").is_dir()
    assert (d.mount_path / "containers-snapshots" / "web-2" / "s1").is_dir()
    assert not (d.mount_path / "containers" / "c1").exists()
    # A failure half-way renames back.
    sim.fail("lvrename", "/dev/p1/containers_web--2", stderr="  device busy\n")
    with pytest.raises(LXDError):
        run(d.rename_volume(v.renamed("web-2"), "c3"))
    assert set(sim.vgs["p1"].lvs) == {"LXDThinPool", "containers_web--2", "containers_web--2-s1"}
    assert (d.mount_path / "containers-snapshots" / "web-2" / "s1").is_dir()


def test_quota_invocations(pool):
    sim, d = pool
    v = Volume("p1", VolumeType.CUSTOM, "data")
    run(d.create_volume(v))
    sim.clear()
    run(d.set_volume_quota(v, 20 * GiB))
    dev = "/dev/p1/custom_default_data"
    assert sim.calls == [
        ("lvs", "--noheadings", "--nosuffix", "--units", "b", "-o", "lv_size", dev),
        ("vgs", "--noheadings", "--nosuffix", "--units", "b", "-o", "vg_extent_size", "p1"),
        ("lvchange", "--activate", "y", "--ignoreactivationskip", dev),
        ("lvresize", "-L", f"{20 * GiB}b", "-f", dev),
        ("resize2fs", dev),
        ("lvchange", "--activate", "n", "--ignoreactivationskip", dev),
    ]
    # Within one extent: nothing to do.
    sim.clear()
    run(d.set_volume_quota(v, 20 * GiB - 4096))
    assert sim.mutating() == []
    # Shrinking ext4 while unmounted: fsck, resize2fs to the size, then the LV.
    sim.clear()
    run(d.set_volume_quota(v, 5 * GiB))
    assert sim.mutating()[1:4] == [("e2fsck", "-f", "-y", dev), ("resize2fs", dev, f"{5 * GiB // 1024}K"),
                                   ("lvresize", "-L", f"{5 * GiB}b", "-f", dev)]
    # ... but not while mounted, and never xfs.
    run(d.mount_volume(v))
    with pytest.raises(Conflict):
        run(d.set_volume_quota(v, 2 * GiB))
    run(d.unmount_volume(v))
    x = Volume("p1", VolumeType.CUSTOM, "x", config={"block.filesystem": "xfs"})
    run(d.create_volume(x))
    with pytest.raises(BadRequest, match="xfs"):
        run(d.set_volume_quota(x, GiB))
    # Growing xfs grows the mounted filesystem.
    sim.clear()
    run(d.set_volume_quota(x, 30 * GiB))
    assert ("xfs_growfs", str(d.volume_path(x))) in sim.calls
    # Thick pool out of space: 507.
    sim.fail("lvresize", stderr="  Insufficient free space: 5000 extents needed, but only 10 available\n")
    with pytest.raises(InsufficientStorage):
        run(d.set_volume_quota(v, 50 * GiB))


def test_usage_and_output_parsing(pool):
    sim, d = pool
    v = Volume("p1", VolumeType.CUSTOM, "data")
    run(d.create_volume(v))
    # Thin volume not mounted: from the pool's allocation of it.
    assert run(d.volume_usage(v)) == int(10 * GiB * 0.125)
    sim.on("lvs", "/dev/p1/LXDThinPool", stdout="  21474836480,50.00,1.00\n")
    assert run(d.pool_usage()) == {"space": {"used": int(21474836480 * 0.51), "total": 21474836480}}
    assert d.usage()["space"]["total"] == 21474836480
    sim.on("lvs", "/dev/p1/LXDThinPool", stdout="garbage\n")
    with pytest.raises(LXDError, match="Unexpected output from lvs"):
        run(d.pool_usage())
    assert run(d.volume_usage(v.snapshot("x"))) is None


def test_list_volumes_from_lvs_output(pool):
    sim, d = pool
    sim.on("lvs", "--noheadings", "--separator", ",", "-o", "lv_name", "p1", stdout=(
        "  LXDThinPool\n  containers_c1\n  containers_c1-snap0\n  containers_web--1-s--1\n"
        "  containers_p1_c1\n  custom_default_my--vol\n  custom_default_blk.block\n  images_abc\n"
        "  containers_c1.lxdtmp\n  someone_elses\n  lvol0\n"))
    got = {(v.type.value, v.project, v.name, v.content_type.value) for v in run(d.list_volumes())}
    assert got == {("container", "default", "c1", "filesystem"), ("container", "default", "c1/snap0", "filesystem"),
                   ("container", "default", "web-1/s-1", "filesystem"), ("container", "p1", "c1", "filesystem"),
                   ("custom", "default", "my-vol", "filesystem"), ("custom", "default", "blk", "block"),
                   ("image", "default", "abc", "filesystem")}


def test_list_snapshots_by_time(pool):
    sim, d = pool
    sim.on("lvs", "--noheadings", "--separator", ",", "-o", "lv_name,lv_time", stdout=(
        "  containers_c1,2026-12-04 10:00:00 +0000\n  containers_c1-a,2026-12-04 10:00:01 +0000\n"
        "  containers_c1--2-x,2026-12-04 10:00:02 +0000\n  containers_c1-b--c,2026-12-04 10:00:03 +0000\n"))
    assert run(d.list_snapshots(Volume("p1", VolumeType.CONTAINER, "c1"))) == ["a", "b-c"]


def test_delete_invocations(pool):
    sim, d = pool
    v = Volume("p1", VolumeType.CONTAINER, "c1")
    run(d.create_volume(v))
    run(d.mount_volume(v))
    sim.clear()
    run(d.delete_volume(v))
    assert sim.mutating() == [("umount", str(d.volume_path(v))),
                              ("lvchange", "--activate", "n", "--ignoreactivationskip", "/dev/p1/containers_c1"),
                              ("lvremove", "-f", "/dev/p1/containers_c1")]
    assert not d.volume_path(v).exists()
    sim.clear()
    run(d.delete_volume(v))  # missing: fine
    sim.fail("lvremove", stderr="  Logical volume p1/containers_c2 contains a filesystem in use.\n", returncode=5)
    run(d.create_volume(Volume("p1", VolumeType.CONTAINER, "c2")))


def test_busy_unmount_is_a_conflict(pool):
    sim, d = pool
    v = Volume("p1", VolumeType.CONTAINER, "c1")
    run(d.create_volume(v))
    run(d.mount_volume(v))
    sim.fail("umount", stderr=f"umount: {d.volume_path(v)}: target is busy.\n", returncode=32)
    with pytest.raises(Conflict):
        run(d.unmount_volume(v))


def test_mount_and_delete_pool(env):
    sim, tmp = env
    d = make(tmp, size="2GiB")
    run(d.create_pool())
    run(d.create_volume(Volume("p1", VolumeType.CONTAINER, "c1")))
    run(d.unmount_pool())
    assert sim.loops == {}
    assert ("vgchange", "-an", "p1") in sim.calls
    sim.clear()
    # After a reboot the loop file is attached again.
    assert run(d.mount_pool()) is True
    assert sim.mutating() == [("losetup", "--find", "--show", str(tmp / "disks" / "p1.img"))]
    sim.clear()
    run(d.delete_pool())
    assert sim.mutating() == [("vgremove", "-f", "p1"), ("pvremove", "-f", "/dev/loop8"), ("losetup", "-d", "/dev/loop8")]
    assert not (tmp / "disks" / "p1.img").exists() and not d.mount_path.exists()


def test_mount_pool_with_missing_loop_file(env):
    sim, tmp = env
    d = make(tmp, size="2GiB")
    run(d.create_pool())
    run(d.unmount_pool())
    (tmp / "disks" / "p1.img").unlink()
    with pytest.raises(LXDError, match="loop file"):
        run(d.mount_pool())


def test_mount_pool_repairs_an_interrupted_restore(pool):
    sim, d = pool
    for name in ("c1", "c2"):
        run(d.create_volume(Volume("p1", VolumeType.CONTAINER, name)))
    lvs = sim.vgs["p1"].lvs
    lvs["containers_c1.lxdtmp"] = lvs.pop("containers_c1")  # crashed after the rename
    lvs["containers_c2.lxdtmp"] = lvs["containers_c2"]  # crashed before removing the original
    sim.clear()
    run(d.mount_pool())
    assert sim.mutating() == [("lvrename", "/dev/p1/containers_c1.lxdtmp", "/dev/p1/containers_c1"),
                              ("lvremove", "-f", "/dev/p1/containers_c2.lxdtmp")]
    assert set(lvs) == {"LXDThinPool", "containers_c1", "containers_c2"}
