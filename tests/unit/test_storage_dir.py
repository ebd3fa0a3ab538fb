"""The dir driver on a temporary directory: volumes, copies that keep everything, snapshots,
restore, rename, listing, usage, quotas (refused with the reason here; the exact tool calls on a
prjquota filesystem through a recorded runner)."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
from pathlib import Path

import pytest

from lxd_daemon.errors import BadRequest, Conflict, NotFound
from lxd_daemon.storage.drivers import dir as dirmod
from lxd_daemon.storage.drivers import tools
from lxd_daemon.storage.drivers.dir import DirDriver
from lxd_daemon.storage.volume import Volume, VolumeType

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root (chown, mknod)")


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def drv(tmp_path):
    d = DirDriver("p", tmp_path / "pool", {})
    run(d.create_pool())
    return d


def vol(name, vtype="container", project="default"):
    return Volume("p", vtype, name, project=project)


async def _fill(path: Path) -> None:
    (path / "rootfs").mkdir()
    (path / "rootfs" / "f").write_text("one")
    if ROOT:
        os.chown(path / "rootfs" / "f", 1000123, 1000124)
        os.mknod(path / "rootfs" / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.setxattr(path / "rootfs" / "f", "user.k", b"v")
    # A POSIX ACL (user 1234: r--) as its xattr, which is what setfacl writes.
    acl = (b"\x02\x00\x00\x00" + b"\x01\x00\x06\x00\xff\xff\xff\xff" + b"\x02\x00\x04\x00\xd2\x04\x00\x00"
           + b"\x04\x00\x04\x00\xff\xff\xff\xff" + b"\x10\x00\x04\x00\xff\xff\xff\xff"
           + b"\x20\x00\x04\x00\xff\xff\xff\xff")
    os.setxattr(path / "rootfs" / "f", "system.posix_acl_access", acl)
    os.chmod(path / "rootfs" / "f", 0o4755)


def test_info_and_layout(drv):
    assert DirDriver.info.name == "dir" and DirDriver.info.version == "1"
    assert not DirDriver.info.optimized_images
    for sub in ("containers", "containers-snapshots", "custom", "images"):
        assert (drv.mount_path / sub).is_dir()
    assert stat.S_IMODE(os.stat(drv.mount_path).st_mode) == 0o711
    assert stat.S_IMODE(os.stat(drv.mount_path / "images").st_mode) == 0o700
    assert DirDriver.available()[0]


def test_validate_pool_config():
    assert DirDriver.validate_pool_config({"source": "/x"}) == {"source": "/x"}
    with pytest.raises(BadRequest):
        DirDriver.validate_pool_config({"source": "rel"})


def test_create_volume_and_filler_failure_leaves_nothing(drv):
    v = vol("c1")
    run(drv.create_volume(v, _fill))
    assert run(drv.has_volume(v))
    assert (drv.volume_path(v) / "rootfs" / "f").read_text() == "one"
    with pytest.raises(Conflict):
        run(drv.create_volume(v))

    async def bad(path):
        (path / "x").write_text("half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        run(drv.create_volume(vol("c2"), bad))
    assert not os.path.lexists(drv.volume_path(vol("c2")))


def test_custom_volume_mode_and_project_name(drv):
    v = vol("data", "custom", project="p1")
    run(drv.create_volume(v))
    path = drv.volume_path(v)
    assert path == drv.mount_path / "custom" / "p1_data"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o711
    listed = run(drv.list_volumes())
    assert any(x.type is VolumeType.CUSTOM and x.name == "data" and x.project == "p1" for x in listed)


def _getfattr(path: Path) -> str:
    return subprocess.run(["getfattr", "-d", "-m", "-", "--absolute-names", str(path)],
                          capture_output=True, text=True, check=True).stdout.split("\n", 1)[1]


def test_copy_keeps_owner_mode_xattrs_acls_devices(drv):
    src, dst = vol("c1"), vol("c2")
    run(drv.create_volume(src, _fill))
    run(drv.create_volume_from_copy(dst, src))
    a, b = drv.volume_path(src) / "rootfs", drv.volume_path(dst) / "rootfs"
    sa, sb = os.lstat(a / "f"), os.lstat(b / "f")
    assert (sa.st_mode, sa.st_uid, sa.st_gid) == (sb.st_mode, sb.st_uid, sb.st_gid)
    assert _getfattr(a / "f") == _getfattr(b / "f")
    assert "system.posix_acl_access" in _getfattr(b / "f") and "user.k" in _getfattr(b / "f")
    if ROOT:
        assert sb.st_uid == 1000123 and stat.S_ISCHR(os.lstat(b / "null").st_mode)
        assert os.lstat(b / "null").st_rdev == os.makedev(1, 3)
    with pytest.raises(Conflict):
        run(drv.create_volume_from_copy(dst, src))
    with pytest.raises(NotFound):
        run(drv.create_volume_from_copy(vol("c3"), vol("missing")))


def test_snapshots_restore_rename_copy_with_snapshots(drv):
    v = vol("c1")
    run(drv.create_volume(v, _fill))
    f = drv.volume_path(v) / "rootfs" / "f"
    run(drv.create_snapshot(v.snapshot("s1")))
    f.write_text("two")
    run(drv.create_snapshot(v.snapshot("s2")))
    f.write_text("three")
    assert run(drv.list_snapshots(v)) == ["s1", "s2"]
    assert drv.volume_path(v.snapshot("s1")) == drv.mount_path / "containers-snapshots" / "c1" / "s1"
    assert stat.S_IMODE(os.stat(drv.mount_path / "containers-snapshots" / "c1").st_mode) == 0o700
    with pytest.raises(Conflict):
        run(drv.create_snapshot(v.snapshot("s1")))
    os.chmod(drv.volume_path(v), 0o100)
    run(drv.restore_snapshot(v.snapshot("s1")))
    assert f.read_text() == "one"
    assert stat.S_IMODE(os.stat(drv.volume_path(v)).st_mode) == 0o100  # the volume keeps its mode
    assert [e for e in os.listdir(drv.mount_path / "containers") if e.startswith(".")] == []
    with pytest.raises(NotFound):
        run(drv.restore_snapshot(v.snapshot("nope")))
    run(drv.rename_snapshot(v.snapshot("s2"), "later"))
    assert sorted(run(drv.list_snapshots(v))) == ["later", "s1"]
    with pytest.raises(Conflict):
        run(drv.rename_snapshot(v.snapshot("later"), "s1"))
    # A copy with its snapshots, then a rename moves the snapshots too.
    run(drv.create_volume_from_copy(vol("c2"), v, snapshots=True))
    assert sorted(run(drv.list_snapshots(vol("c2")))) == ["later", "s1"]
    assert (drv.volume_path(vol("c2").snapshot("later")) / "rootfs" / "f").read_text() == "two"
    run(drv.rename_volume(vol("c2"), "c3"))
    assert sorted(run(drv.list_snapshots(vol("c3")))) == ["later", "s1"]
    assert not os.path.lexists(drv.mount_path / "containers-snapshots" / "c2")
    with pytest.raises(Conflict):
        run(drv.rename_volume(vol("c3"), "c1"))
    # A copy of a snapshot is a plain volume.
    run(drv.create_volume_from_copy(vol("c4"), v.snapshot("s1")))
    assert (drv.volume_path(vol("c4")) / "rootfs" / "f").read_text() == "one"
    names = sorted(x.name for x in run(drv.list_volumes()) if x.type is VolumeType.CONTAINER)
    assert names == ["c1", "c1/later", "c1/s1", "c3", "c3/later", "c3/s1", "c4"]


def test_delete_leaves_nothing(drv):
    v = vol("c1")
    run(drv.create_volume(v, _fill))
    run(drv.create_snapshot(v.snapshot("s1")))
    with pytest.raises(BadRequest, match="snapshots"):
        run(drv.delete_volume(v))  # snapshots first
    assert run(drv.has_volume(v))
    run(drv.delete_snapshot(v.snapshot("s1")))
    run(drv.delete_volume(v))
    run(drv.delete_volume(v))  # missing is fine
    assert run(drv.list_volumes()) == []
    for sub in dirmod.SUBDIRS:
        assert os.listdir(drv.mount_path / sub) == []
    run(drv.delete_pool())
    assert not drv.mount_path.exists()


def test_usage(drv):
    v = vol("c1")

    async def big(path):
        (path / "blob").write_bytes(os.urandom(256 * 1024))

    run(drv.create_volume(v, big))
    assert run(drv.volume_usage(v)) >= 256 * 1024
    with pytest.raises(NotFound):
        run(drv.volume_usage(vol("nope")))
    u = drv.usage()
    assert u["space"]["total"] > 0 and u["inodes"]["total"] > 0


def test_quota_refused_with_reason_without_prjquota(drv, monkeypatch):
    v = vol("c1")
    run(drv.create_volume(v))
    monkeypatch.setattr(dirmod, "_mount_of", lambda p: ("/", "ext4", {"rw", "relatime"}))
    with pytest.raises(BadRequest, match="prjquota"):
        run(drv.set_volume_quota(v, 10 << 20))
    run(drv.set_volume_quota(v, None))  # removing no limit is fine
    monkeypatch.setattr(dirmod, "_mount_of", lambda p: ("/", "tmpfs", set()))
    with pytest.raises(BadRequest, match="tmpfs"):
        run(drv.create_volume(Volume("p", "container", "c2", config={"size": "10MiB"})))
    assert not os.path.lexists(drv.volume_path(vol("c2")))


@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_quota_invocations_on_prjquota_filesystems(drv, monkeypatch, fstype):
    v = vol("c1")
    run(drv.create_volume(v))
    monkeypatch.setattr(dirmod, "_mount_of", lambda p: ("/srv", fstype, {"rw", "prjquota"}))
    calls = []

    async def runner(argv, stdin):
        calls.append(argv)
        return tools.Result(argv, 0, "", "")

    pid = str(dirmod.PROJECT_ID_BASE + (os.stat(drv.volume_path(v)).st_ino & 0x3FFFFFFF))
    with tools.use_runner(runner):
        run(drv.set_volume_quota(v, 10 << 20))
    path = str(drv.volume_path(v))
    if fstype == "ext4":
        assert calls == [("chattr", "-R", "+P", "-p", pid, path),
                         ("setquota", "-P", pid, "0", str(10 << 10), "0", "0", "/srv")]
    else:
        assert calls == [("xfs_quota", "-x", "-c", f"project -s -p {path} {pid}", "/srv"),
                         ("xfs_quota", "-x", "-c", f"limit -p bhard={10 << 20} {pid}", "/srv")]


def test_mount_of_finds_the_longest_prefix():
    mnt, fstype, opts = dirmod._mount_of(Path("/proc/self"))
    assert mnt == "/proc" and fstype == "proc"


def test_tool_failure_is_an_lxd_error_and_leaves_nothing(drv):
    v = vol("c1")
    run(drv.create_volume(v, _fill))

    async def failing(argv, stdin):
        if argv[0] == "cp":
            return tools.Result(argv, 1, "", "cp: boom")
        return await tools._subprocess(argv, stdin)

    with tools.use_runner(failing):
        with pytest.raises(tools.ToolError, match="cp failed: cp: boom"):
            run(drv.create_snapshot(v.snapshot("s1")))
        with pytest.raises(tools.ToolError):
            run(drv.create_volume_from_copy(vol("c2"), v))
    assert run(drv.list_snapshots(v)) == []
    assert not os.path.lexists(drv.mount_path / "containers-snapshots" / "c1")
    assert not os.path.lexists(drv.volume_path(vol("c2")))
