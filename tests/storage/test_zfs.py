"""The zfs driver at the command level: this kernel has no zfs module, so `zfs` and `zpool` run
against a simulation (tests/storage/fake_tools.py) that answers as they do. The conformance
suite runs on it; the tests below pin the exact invocations and the handling of the tools'
output and failures. Not run against a real zpool."""

from __future__ import annotations

import asyncio
import contextlib
import io
import tarfile
from pathlib import Path
from unittest import mock

import pytest

from lxd_daemon.errors import BadRequest, Conflict, InsufficientStorage, LXDError, NotFound
from lxd_daemon.storage.drivers import DRIVERS
from lxd_daemon.storage.drivers.zfs import SubsequentSnapshots, ZfsDriver
from lxd_daemon.storage.volume import Volume, VolumeType
from tests.storage.conformance import DriverConformance
from tests.storage.fake_tools import ZfsSim

GiB = 1024 ** 3
FP = "a" * 64


def _available(cls):
    return True, "2.1.11"


class ZfsFixture:
    pool_name = "pool"
    config: dict = {}

    def make_driver(self, tmp_path: Path) -> ZfsDriver:
        self.sim = ZfsSim()
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(self.sim.installed())
        self._stack.enter_context(mock.patch.object(ZfsDriver, "available", classmethod(_available)))
        return ZfsDriver(self.pool_name, tmp_path / "lxd" / "storage-pools" / self.pool_name,
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
        return out + list(self.sim.pools) + sorted(self.sim.mounted)


class TestZfsConformance(ZfsFixture, DriverConformance):
    checks_files = False


class TestZfsFullCopyConformance(ZfsFixture, DriverConformance):
    checks_files = False
    config = {"zfs.clone_copy": "false"}


# -- command-level tests -------------------------------------------------------------------------
@pytest.fixture
def env(tmp_path):
    sim = ZfsSim()
    with sim.installed(), mock.patch.object(ZfsDriver, "available", classmethod(_available)):
        yield sim, tmp_path


def make(tmp_path: Path, **config: str) -> ZfsDriver:
    return ZfsDriver("p1", tmp_path / "storage-pools" / "p1", dict(config))


def run(coro):
    return asyncio.run(coro)


def test_registered_and_flags():
    assert DRIVERS["zfs"] is ZfsDriver
    i = ZfsDriver.info
    assert i.optimized_images and i.optimized_backups and i.cow_snapshots and i.quota and i.preserves_inodes
    assert i.migration_types == ("ZFS", "RSYNC")


def test_not_available_here_is_a_clear_400(tmp_path):
    ok, why = ZfsDriver.available()
    if ok:
        pytest.skip("this host has zfs")
    assert "zfs" in why
    with pytest.raises(BadRequest) as e:
        run(make(tmp_path).create_pool())
    assert e.value.message.startswith("The zfs driver can't run on this host: ")
    assert not (tmp_path / "disks").exists()


def test_validate_pool_config():
    ZfsDriver.validate_pool_config({"zfs.clone_copy": "rebase", "volume.zfs.use_refquota": "true"})
    for bad in ({"zfs.clone_copy": "sometimes"}, {"volume.zfs.remove_snapshots": "perhaps"},
                {"zfs.pool_name": "/abs"}, {"size": "big"}):
        with pytest.raises(BadRequest):
            ZfsDriver.validate_pool_config(bad)


def test_create_loop_pool_invocations(env):
    sim, tmp = env
    d = make(tmp, size="2GiB")
    run(d.create_pool())
    loop = tmp / "disks" / "p1.img"
    assert loop.stat().st_size == 2 * GiB
    assert sim.mutating() == [
        ("zpool", "create", "-f", "-m", "none", "-O", "compression=on", "p1", str(loop)),
        ("zfs", "set", "mountpoint=none", "setuid=on", "exec=on", "devices=on", "acltype=posixacl", "xattr=sa", "p1"),
        ("zfs", "create", "-o", "mountpoint=none", "p1/deleted"),
        ("zfs", "create", "-o", "mountpoint=none", "p1/containers"),
        ("zfs", "create", "-o", "mountpoint=none", "p1/deleted/containers"),
        ("zfs", "create", "-o", "mountpoint=none", "-o", "volmode=none", "p1/virtual-machines"),
        ("zfs", "create", "-o", "mountpoint=none", "-o", "volmode=none", "p1/deleted/virtual-machines"),
        ("zfs", "create", "-o", "mountpoint=none", "p1/images"),
        ("zfs", "create", "-o", "mountpoint=none", "p1/deleted/images"),
        ("zfs", "create", "-o", "mountpoint=none", "p1/custom"),
        ("zfs", "create", "-o", "mountpoint=none", "p1/deleted/custom"),
    ]
    assert d.config["source"] == str(loop) and d.config["zfs.pool_name"] == "p1"
    assert d.usage() == {"space": {"used": 1048576, "total": 1048576 + 900 * 1024 * 1024}}


def test_create_pool_failures(env):
    sim, tmp = env
    sim.fail("zfs", "create", "-o", "mountpoint=none", "p1/images", stderr="cannot create 'p1/images': out of space\n",
             returncode=1)
    with pytest.raises(InsufficientStorage):
        run(make(tmp, size="2GiB").create_pool())
    assert sim.mutating()[-1] == ("zpool", "destroy", "p1")
    assert not (tmp / "disks" / "p1.img").exists() and sim.pools == {}
    # An existing zpool must be empty; a dataset in it is made.
    run(sim(("zpool", "create", "-f", "tank", "/dev/sdb"), None))
    run(sim(("zfs", "create", "tank/stuff"), None))
    with pytest.raises(BadRequest, match="isn't empty"):
        run(make(tmp, source="tank").create_pool())
    d = make(tmp, source="tank/lxd")
    run(d.create_pool())
    assert ("zfs", "create", "-o", "mountpoint=none", "tank/lxd") in sim.calls
    assert d.dataset(Volume("p1", VolumeType.CONTAINER, "c1")) == "tank/lxd/containers/c1"
    with pytest.raises(BadRequest, match="must match"):
        run(make(tmp, source="tank", **{"zfs.pool_name": "other"}).create_pool())
    with pytest.raises(BadRequest, match="already exists"):
        run(ZfsDriver("tank", tmp / "storage-pools" / "tank", {}).create_pool())


@pytest.fixture
def pool(env):
    sim, tmp = env
    d = make(tmp, size="2GiB")
    run(d.create_pool())
    sim.clear()
    return sim, d


def test_dataset_names(pool):
    _, d = pool
    assert d.dataset(Volume("p1", VolumeType.CONTAINER, "c1")) == "p1/containers/c1"
    assert d.dataset(Volume("p1", VolumeType.CONTAINER, "c1/snap0")) == "p1/containers/c1@snapshot-snap0"
    assert d.dataset(Volume("p1", VolumeType.CONTAINER, "c1", project="p2")) == "p1/containers/p2_c1"
    assert d.dataset(Volume("p1", VolumeType.CUSTOM, "data")) == "p1/custom/default_data"
    assert d.dataset(Volume("p1", VolumeType.IMAGE, FP)) == f"p1/images/{FP}"


def test_image_then_instance_clone(pool):
    sim, d = pool
    img = Volume("p1", VolumeType.IMAGE, FP)
    filled = []

    async def filler(path):
        filled.append(str(path) in sim.mounted)

    run(d.create_volume(img, filler))
    ipath = str(d.volume_path(img))
    assert filled == [True]
    assert sim.mutating() == [
        ("zfs", "create", "-o", f"mountpoint={ipath}", "-o", "canmount=noauto", f"p1/images/{FP}"),
        ("zfs", "mount", f"p1/images/{FP}"),
        ("umount", ipath),
        ("zfs", "snapshot", f"p1/images/{FP}@readonly"),
    ]
    sim.clear()
    c = Volume("p1", VolumeType.CONTAINER, "c1")
    run(d.create_volume_from_image(c, img))
    assert sim.mutating() == [
        ("zfs", "clone", f"p1/images/{FP}@readonly", "p1/containers/c1"),
        ("zfs", "set", f"mountpoint={d.volume_path(c)}", "canmount=noauto", "p1/containers/c1"),
    ]
    # Deleting the image while c1 is its clone parks it under deleted/; a new image of the
    # same fingerprint brings it back; deleting c1 later takes the parked image with it.
    sim.clear()
    run(d.delete_volume(img))
    assert sim.mutating() == [("zfs", "rename", f"p1/images/{FP}", f"p1/deleted/images/{FP}")]
    run(d.create_volume(img))
    assert sim.mutating()[-1] == ("zfs", "rename", f"p1/deleted/images/{FP}", f"p1/images/{FP}")
    run(d.delete_volume(img))
    sim.clear()
    run(d.delete_volume(c))
    assert sim.mutating() == [("zfs", "destroy", "-r", "p1/containers/c1"),
                              ("zfs", "destroy", "-r", f"p1/deleted/images/{FP}")]
    assert not any("images" in n for n in sim.objs if n.startswith("p1/images/") or n.startswith("p1/deleted/images/"))


def test_failed_filler_leaves_nothing(pool):
    sim, d = pool

    async def bad(path):
        raise RuntimeError("unpack failed")

    v = Volume("p1", VolumeType.CUSTOM, "data", config={"size": "1GiB"})
    with pytest.raises(RuntimeError):
        run(d.create_volume(v, bad))
    assert sim.mutating()[-1] == ("zfs", "destroy", "-r", "p1/custom/default_data")
    assert ("zfs", "set", f"quota={GiB}", "p1/custom/default_data") in sim.calls
    assert "p1/custom/default_data" not in sim.objs and not d.volume_path(v).exists()


def test_copy_modes(pool):
    sim, d = pool
    src = Volume("p1", VolumeType.CONTAINER, "c1")
    run(d.create_volume(src))
    run(d.create_snapshot(src.snapshot("s1")))
    # Default: a clone of a fresh @copy- snapshot.
    sim.clear()
    run(d.create_volume_from_copy(Volume("p1", VolumeType.CONTAINER, "c2"), src))
    snap = sim.mutating()[0][2]
    assert snap.startswith("p1/containers/c1@copy-")
    assert sim.mutating()[1] == ("zfs", "clone", snap, "p1/containers/c2")
    # With snapshots: a replication stream, the temporary snapshot destroyed on both sides.
    sim.clear()
    run(d.create_volume_from_copy(Volume("p1", VolumeType.CONTAINER, "c3"), src, snapshots=True))
    m = sim.mutating()
    tmp = m[0][2]
    assert m[1] == ("zfs", "send", "-R", tmp)
    assert m[2] == ("zfs", "receive", "-x", "mountpoint", "p1/containers/c3")
    assert ("zfs", "destroy", "p1/containers/c3@" + tmp.split("@")[1]) in m
    assert m[-1] == ("zfs", "destroy", tmp)
    assert run(d.list_snapshots(Volume("p1", VolumeType.CONTAINER, "c3"))) == ["s1"]
    # zfs.clone_copy=false: a plain send of the volume.
    d.config["zfs.clone_copy"] = "false"
    sim.clear()
    run(d.create_volume_from_copy(Volume("p1", VolumeType.CONTAINER, "c4"), src))
    m = sim.mutating()
    assert m[1] == ("zfs", "send", m[0][2]) and m[2] == ("zfs", "receive", "-x", "mountpoint", "p1/containers/c4")
    # rebase: an incremental send on top of the image the source was cloned from.
    img = Volume("p1", VolumeType.IMAGE, FP)
    run(d.create_volume(img))
    c5 = Volume("p1", VolumeType.CONTAINER, "c5")
    d.config["zfs.clone_copy"] = "true"
    run(d.create_volume_from_image(c5, img))
    d.config["zfs.clone_copy"] = "rebase"
    sim.clear()
    run(d.create_volume_from_copy(Volume("p1", VolumeType.CONTAINER, "c6"), c5))
    m = sim.mutating()
    assert m[1] == ("zfs", "send", "-i", f"p1/images/{FP}@readonly", m[0][2])


def test_failed_copy_cleans_up(pool):
    sim, d = pool
    src = Volume("p1", VolumeType.CONTAINER, "c1")
    run(d.create_volume(src))
    run(d.create_snapshot(src.snapshot("s1")))
    sim.fail("zfs", "receive", stderr="cannot receive new filesystem stream: out of space\n", returncode=1)
    with pytest.raises(InsufficientStorage):
        run(d.create_volume_from_copy(Volume("p1", VolumeType.CONTAINER, "c2"), src, snapshots=True))
    assert "p1/containers/c2" not in sim.objs
    assert [n for n in sim.objs if "@copy-" in n] == []
    assert not (d.mount_path / "containers" / "c2").exists()
    with pytest.raises(Conflict):
        run(d.create_volume_from_copy(src, src))


def test_snapshot_rename_restore(pool):
    sim, d = pool
    v = Volume("p1", VolumeType.CONTAINER, "c1")
    run(d.create_volume(v))
    sim.clear()
    run(d.create_snapshot(v.snapshot("s1")))
    run(d.create_snapshot(v.snapshot("s2")))
    assert sim.mutating() == [("zfs", "snapshot", "p1/containers/c1@snapshot-s1"),
                              ("zfs", "snapshot", "p1/containers/c1@snapshot-s2")]
    assert run(d.list_snapshots(v)) == ["s1", "s2"]
    assert sim.calls[-1] == ("zfs", "list", "-H", "-o", "name", "-t", "snapshot", "-s", "createtxg", "-d", "1",
                             "p1/containers/c1")
    # Restoring s1 would lose s2: refused, naming the key; with it, the caller is told what to delete.
    with pytest.raises(SubsequentSnapshots) as e:
        run(d.restore_snapshot(v.snapshot("s1")))
    assert "zfs.remove_snapshots" in e.value.message and e.value.snapshots == ["s2"] and not e.value.removable
    d.config["volume.zfs.remove_snapshots"] = "true"
    with pytest.raises(SubsequentSnapshots) as e:
        run(d.restore_snapshot(v.snapshot("s1")))
    assert e.value.removable and e.value.status == 400
    sim.clear()
    run(d.restore_snapshot(v.snapshot("s2")))
    assert sim.mutating() == [("zfs", "rollback", "p1/containers/c1@snapshot-s2")]
    with pytest.raises(NotFound):
        run(d.restore_snapshot(v.snapshot("nope")))
    sim.clear()
    run(d.rename_snapshot(v.snapshot("s2"), "last"))
    assert sim.mutating() == [("zfs", "rename", "p1/containers/c1@snapshot-s2", "p1/containers/c1@snapshot-last")]
    assert (d.mount_path / "containers-snapshots" / "c1" / "last").is_dir()
    with pytest.raises(Conflict):
        run(d.rename_snapshot(v.snapshot("s1"), "last"))
    # A snapshot someone cloned from is parked, not destroyed.
    run(d.create_volume_from_copy(Volume("p1", VolumeType.CONTAINER, "c2"), v.snapshot("s1")))
    sim.clear()
    run(d.delete_snapshot(v.snapshot("s1")))
    (cmd,) = sim.mutating()
    assert cmd[:3] == ("zfs", "rename", "p1/containers/c1@snapshot-s1") and "@deleted-" in cmd[3]


def test_rename_volume(pool):
    sim, d = pool
    v = Volume("p1", VolumeType.CUSTOM, "data")
    run(d.create_volume(v))
    run(d.create_snapshot(v.snapshot("s1")))
    sim.clear()
    run(d.rename_volume(v, "data2"))
    new = v.renamed("data2")
    assert sim.mutating() == [("zfs", "rename", "p1/custom/default_data", "p1/custom/default_data2"),
                              ("zfs", "set", f"mountpoint={d.volume_path(new)}", "p1/custom/default_data2")]
    assert (d.mount_path / "custom-snapshots" / "default_data2" / "s1").is_dir()
    sim.fail("zfs", "rename", stderr="cannot rename 'p1/custom/default_data2': dataset is busy\n", returncode=1)
    with pytest.raises(Conflict, match="in use"):
        run(d.rename_volume(new, "data3"))
    assert d.volume_path(new).is_dir() and (d.mount_path / "custom-snapshots" / "default_data2").is_dir()


def test_quota_and_usage(pool):
    sim, d = pool
    v = Volume("p1", VolumeType.CUSTOM, "data")
    run(d.create_volume(v))
    sim.clear()
    run(d.set_volume_quota(v, 5 * GiB))
    run(d.set_volume_quota(v, None))
    d.config["volume.zfs.use_refquota"] = "true"
    run(d.set_volume_quota(v, GiB))
    assert sim.mutating() == [("zfs", "set", f"quota={5 * GiB}", "p1/custom/default_data"),
                              ("zfs", "set", "quota=none", "p1/custom/default_data"),
                              ("zfs", "set", f"refquota={GiB}", "p1/custom/default_data")]
    sim.fail("zfs", "set", stderr="cannot set property for 'p1/custom/default_data': size is less than current used "
                                  "or reserved space\n", returncode=1)
    with pytest.raises(BadRequest, match="already uses more"):
        run(d.set_volume_quota(v, 1024))
    sim.clear()
    assert run(d.volume_usage(v)) == 1048576
    assert sim.calls == [("zfs", "get", "-H", "-p", "-o", "value", "referenced", "p1/custom/default_data")]
    sim.on("zfs", "get", "-H", "-p", "-o", "value", "referenced", stdout="-\n")
    with pytest.raises(LXDError, match="Unexpected output"):
        run(d.volume_usage(v))
    with pytest.raises(NotFound):
        run(d.volume_usage(Volume("p1", VolumeType.CUSTOM, "nope")))


def test_busy_dataset(pool):
    sim, d = pool
    v = Volume("p1", VolumeType.CONTAINER, "c1")
    run(d.create_volume(v))
    sim.fail("zfs", "destroy", stderr="cannot destroy 'p1/containers/c1': dataset is busy\n", returncode=1)
    with pytest.raises(Conflict, match="in use"):
        run(d.delete_volume(v))
    assert "p1/containers/c1" in sim.objs


def test_list_volumes_parsing(pool):
    sim, d = pool
    sim.on("zfs", "list", stdout="\n".join([
        "p1", "p1/containers", "p1/containers/c1", "p1/containers/c1@snapshot-s1", "p1/containers/c1@copy-123",
        "p1/containers/p2_web", "p1/custom", "p1/custom/default_data", "p1/custom/default_data@snapshot-x",
        f"p1/images/{FP}", f"p1/images/{FP}@readonly", "p1/deleted/images/" + "b" * 64, "p1/deleted/containers/uuid",
        "p1/virtual-machines/vm1.block", "p1/foreign/thing"]) + "\n")
    got = {(v.type.value, v.project, v.name) for v in run(d.list_volumes())}
    assert got == {("container", "default", "c1"), ("container", "default", "c1/s1"), ("container", "p2", "web"),
                   ("custom", "default", "data"), ("custom", "default", "data/x"), ("image", "default", FP),
                   ("virtual-machine", "default", "vm1")}
    assert sim.calls[-1] == ("zfs", "list", "-H", "-o", "name", "-t", "filesystem,volume,snapshot", "-r", "p1")


def test_optimized_backup_members_and_invocations(pool, tmp_path):
    sim, d = pool
    v = Volume("p1", VolumeType.CONTAINER, "c1")
    run(d.create_volume(v))
    run(d.create_snapshot(v.snapshot("s1")))
    run(d.create_snapshot(v.snapshot("s2")))
    sim.clear()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        names = run(d.backup_volume_optimized(v, ["s1", "s2"], tar))
    assert names == ["backup/snapshots/s1.bin", "backup/snapshots/s2.bin", "backup/container.bin"]
    m = sim.mutating()
    tmp = m[2][2]
    assert m[0] == ("zfs", "send", "p1/containers/c1@snapshot-s1")
    assert m[1] == ("zfs", "send", "-i", "p1/containers/c1@snapshot-s1", "p1/containers/c1@snapshot-s2")
    assert tmp.startswith("p1/containers/c1@backup-")
    assert m[3] == ("zfs", "send", "-i", "p1/containers/c1@snapshot-s2", tmp)
    assert m[4] == ("zfs", "destroy", tmp)
    buf.seek(0)
    with tarfile.open(fileobj=buf) as tar:
        assert tar.getnames() == names
    # Custom volumes: LXD's names for them.
    assert ZfsDriver.backup_member_names(Volume("p1", VolumeType.CUSTOM, "d"), ["a"]) == (
        ["backup/volume-snapshots/a.bin"], "backup/volume.bin")
    # Restore: snapshots oldest first, then the volume; internal snapshots stripped.
    buf.seek(0)
    new = Volume("p1", VolumeType.CONTAINER, "c9")
    sim.clear()
    with tarfile.open(fileobj=buf) as tar:
        run(d.restore_volume_optimized(new, ["s1", "s2"], tar.extractfile))
    recv = sim.commands("zfs")
    recv = [c for c in recv if c[1] == "receive"]
    assert recv == [("zfs", "receive", "-x", "mountpoint", "-F", "p1/containers/c9@snapshot-s1"),
                    ("zfs", "receive", "-x", "mountpoint", "-F", "p1/containers/c9@snapshot-s2"),
                    ("zfs", "receive", "-x", "mountpoint", "-F", "p1/containers/c9")]
    assert run(d.list_snapshots(new)) == ["s1", "s2"]
    assert [n for n in sim.objs if n.startswith("p1/containers/c9@backup-")] == []


def test_backup_into_a_plain_stream(pool):
    """`out` may be a binary file: members are appended as tar blocks, the caller ends the archive."""
    sim, d = pool
    v = Volume("p1", VolumeType.CUSTOM, "d")
    run(d.create_volume(v))
    buf = io.BytesIO()
    names = run(d.backup_volume_optimized(v, [], buf))
    assert names == ["backup/volume.bin"]
    buf.write(b"\0" * 1024)
    buf.seek(0)
    with tarfile.open(fileobj=buf) as tar:
        assert tar.getnames() == names


def test_send_receive_invocations(pool):
    sim, d = pool
    v = Volume("p1", VolumeType.CONTAINER, "c1")
    run(d.create_volume(v))
    run(d.create_snapshot(v.snapshot("s1")))
    chunks = []

    async def write(b):
        chunks.append(b)

    sim.clear()
    run(d.send_volume(v, ["s1"], "ZFS", write))
    m = sim.mutating()
    assert m[0][:2] == ("zfs", "snapshot") and "@migration-" in m[0][2]
    assert m[1] == ("zfs", "send", "-R", m[0][2]) and m[2] == ("zfs", "destroy", m[0][2])

    async def feed():
        for c in chunks:
            yield c

    sim.clear()
    run(d.receive_volume(Volume("p1", VolumeType.CONTAINER, "c2"), ["s1"], "ZFS", feed()))
    assert sim.mutating()[0] == ("zfs", "receive", "-x", "mountpoint", "-F", "-u", "p1/containers/c2")
    assert run(d.list_snapshots(Volume("p1", VolumeType.CONTAINER, "c2"))) == ["s1"]
    with pytest.raises(BadRequest):
        run(d.send_volume(v, [], "BTRFS", write))


def test_pool_mount_unmount_delete(env):
    sim, tmp = env
    d = make(tmp, size="2GiB")
    run(d.create_pool())
    sim.clear()
    assert run(d.mount_pool()) is False  # imported already
    assert run(d.unmount_pool()) is True
    assert sim.mutating() == [("zpool", "export", "p1")]
    sim.clear()
    assert run(d.mount_pool()) is True
    assert sim.mutating() == [("zpool", "import", "-f", "-d", str(tmp / "disks"), "p1")]
    sim.fail("zpool", "destroy", stderr="cannot destroy 'p1': pool is busy\n", returncode=1)
    with pytest.raises(Conflict):
        run(d.delete_pool())
    run(d.delete_pool())
    assert sim.pools == {} and not (tmp / "disks" / "p1.img").exists() and not d.mount_path.exists()
    # An imported pool that lost its dataset, or a pool that can't be imported: clear errors.
    run(sim(("zpool", "create", "-f", "tank", "/dev/sdb"), None))
    with pytest.raises(LXDError, match="dataset 'tank/gone' is missing"):
        run(make(tmp, source="tank/gone", **{"zfs.pool_name": "tank/gone"}).mount_pool())
    with pytest.raises(LXDError, match="Failed to import"):
        run(make(tmp, source="nopool").mount_pool())


# -- the stream plumbing, with real processes ----------------------------------------------------
def test_pipe_with_real_processes(tmp_path):
    from lxd_daemon.storage.drivers.zfs import pipe

    out = tmp_path / "count"
    run(pipe(("head", "-c", "5000000", "/dev/zero"), ("sh", "-c", f"wc -c > {out}"), what="copy"))
    assert out.read_text().strip() == "5000000"
    # A receiver that fails stops an endless sender, with the receiver's message.
    with pytest.raises(LXDError, match="copy: sh failed: refused"):
        run(asyncio.wait_for(pipe(("yes",), ("sh", "-c", "head -c 10 >/dev/null; echo refused >&2; exit 1"),
                                  what="copy"), 30))
    # A sender that fails is reported too.
    with pytest.raises(LXDError, match="cannot send"):
        run(asyncio.wait_for(pipe(("sh", "-c", "echo cannot send >&2; exit 1"), ("cat",), what="copy"), 30))


def test_mount_pool_removes_temporary_snapshots(pool):
    sim, d = pool
    v = Volume("p1", VolumeType.CONTAINER, "c1")
    run(d.create_volume(v))
    for snap in ("copy-1", "backup-2", "migration-3", "copy-4", "snapshot-keep"):
        run(sim(("zfs", "snapshot", f"p1/containers/c1@{snap}"), None))
    run(sim(("zfs", "clone", "p1/containers/c1@copy-4", "p1/containers/c2"), None))
    sim.clear()
    assert run(d.mount_pool()) is False
    assert sim.mutating() == [("zfs", "destroy", "p1/containers/c1@copy-1"),
                              ("zfs", "destroy", "p1/containers/c1@backup-2"),
                              ("zfs", "destroy", "p1/containers/c1@migration-3")]
    assert "p1/containers/c1@copy-4" in sim.objs and "p1/containers/c1@snapshot-keep" in sim.objs
