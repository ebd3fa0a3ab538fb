"""Scenarios every storage driver runs (the FSTestCases shape: a mixin plus one hook).

A driver's test module subclasses `DriverConformance` and gives `make_driver(tmp_path)` (a Driver
whose pool does not exist yet: each test creates it) and, if it made anything create/delete_pool
does not undo on a failed test (a loop device, a mount), `cleanup_driver(driver)`. Scenarios are
driver-agnostic: they test the flags of `driver.info` (quota, optimized_images, optimized_backups,
preserves_inodes, migration_types), never the driver's name.

Drivers whose tools can't run on this host (a simulated tool layer: nothing lands on disk) set
`checks_files = False`; scenarios then still drive every method but skip reading the files.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import stat
import struct
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from lxd_daemon.errors import BadRequest, Conflict, LXDError
from lxd_daemon.storage.drivers.base import Driver
from lxd_daemon.storage.volume import Volume, VolumeType

MiB = 1024 * 1024
HIGH_UID = 1000000
_UNDEF = 0xFFFFFFFF


def posix_acl(entries: list[tuple[int, int, int]]) -> bytes:
    """The raw `system.posix_acl_*` xattr value (version 2; (tag, perm, id) entries)."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", t, p, i) for t, p, i in entries)


# user::rw- user:1000:r-- group::r-- mask::r-- other::r--
ACL_ACCESS = posix_acl([(0x01, 6, _UNDEF), (0x02, 4, 1000), (0x04, 4, _UNDEF), (0x10, 4, _UNDEF), (0x20, 4, _UNDEF)])
# default: user::rwx group::r-x group:2000:rwx mask::rwx other::---
ACL_DEFAULT = posix_acl([(0x01, 7, _UNDEF), (0x04, 5, _UNDEF), (0x08, 7, 2000), (0x10, 7, _UNDEF), (0x20, 0, _UNDEF)])
# file capabilities v2: effective, permitted cap_net_raw (13)
CAPABILITY = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)


def populate(root: Path, tag: str = "v1") -> None:
    """A tree with what copies must keep: owners (high uids too), setuid, xattrs, file
    capabilities, ACLs, device nodes, a fifo, symlinks and hard links."""
    (root / "etc").mkdir()
    (root / "etc" / "hostname").write_text(f"host-{tag}\n")
    (root / "data").mkdir(mode=0o750)
    os.chown(root / "data", HIGH_UID, HIGH_UID)
    f = root / "data" / "owned"
    f.write_bytes(os.urandom(64 * 1024))
    os.chown(f, HIGH_UID + 5, HIGH_UID + 7)
    os.chmod(f, 0o640)
    suid = root / "suid"
    suid.write_bytes(b"#!/bin/sh\n")
    os.chown(suid, 0, 0)
    os.chmod(suid, 0o4755)
    os.setxattr(suid, "security.capability", CAPABILITY)
    x = root / "xattrs"
    x.write_text("x")
    os.setxattr(x, "user.comment", b"hello world")
    os.setxattr(x, "trusted.lxd", b"\x00\x01binary")
    os.setxattr(x, "system.posix_acl_access", ACL_ACCESS)
    os.setxattr(root / "data", "system.posix_acl_default", ACL_DEFAULT)
    dev = root / "dev"
    dev.mkdir()
    os.mknod(dev / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(dev / "loopish", 0o660 | stat.S_IFBLK, os.makedev(7, 200))
    os.mkfifo(dev / "fifo", 0o600)
    os.symlink("../etc/hostname", root / "data" / "link")
    os.symlink("/nonexistent/target", root / "dangling")
    os.link(root / "etc" / "hostname", root / "etc" / "hostname.hard")
    os.utime(root / "etc" / "hostname", ns=(1_500_000_000_000_000_000, 1_500_000_000_123_456_789))


def tree(root: Path, with_inodes: bool = False) -> dict[str, tuple]:
    """Everything a copy must keep, per path (the root directory's own mode and owner are the
    driver's: instance volumes are closed by the service)."""
    out: dict[str, tuple] = {}
    inodes: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = os.lstat(p)
            try:
                xattrs = tuple(sorted((k, os.getxattr(p, k, follow_symlinks=False))
                                      for k in os.listxattr(p, follow_symlinks=False)))
            except OSError:
                xattrs = ()
            entry: tuple = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, xattrs)
            if stat.S_ISREG(st.st_mode):
                entry += (st.st_size, hashlib.sha256(p.read_bytes()).hexdigest(), st.st_mtime_ns)
                if with_inodes and st.st_nlink > 1:
                    entry += ("linked-to", inodes.setdefault(st.st_ino, rel))
            elif stat.S_ISLNK(st.st_mode):
                entry += (os.readlink(p),)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                entry += (st.st_rdev,)
            out[rel] = entry
    return out


class DriverConformance:
    """Mixin: subclass it with a `make_driver` and the scenarios below run against the driver."""

    checks_files = True
    pool_name = "pool"

    # -- hooks -------------------------------------------------------------------------------
    def make_driver(self, tmp_path: Path) -> Driver:
        raise NotImplementedError

    def cleanup_driver(self, driver: Driver) -> None:
        """Undo what a failed test may have left (the default deletes the pool)."""
        try:
            self.run(driver.delete_pool())
        except Exception:
            pass

    def host_leftovers(self, driver: Driver) -> list[str]:
        """After delete_pool: what of the pool is still on the host (loop devices, mounts, files).
        The default looks at the mount path only; drivers add their own."""
        return [str(driver.mount_path)] if os.path.lexists(driver.mount_path) else []

    def volume_leftovers(self, driver: Driver) -> list[str]:
        """With no volume left on the pool: what is still there besides the empty layout."""
        out = []
        if self.checks_files:
            for dirpath, dirnames, filenames in os.walk(driver.mount_path):
                rel = os.path.relpath(dirpath, driver.mount_path)
                out += [os.path.join(rel, f) for f in filenames]
                if rel != ".":
                    out += [os.path.join(rel, d) for d in dirnames]
        return out

    # -- plumbing ----------------------------------------------------------------------------
    @pytest.fixture(autouse=True)
    def _pool(self, tmp_path):
        self.tmp_path = tmp_path
        self._loop = asyncio.new_event_loop()
        try:
            self.driver = self.make_driver(tmp_path)
            self.run(self.driver.create_pool())
            try:
                yield self.driver
            finally:
                self.cleanup_driver(self.driver)
        finally:
            self._loop.close()

    def run(self, coro):
        return self._loop.run_until_complete(coro)

    def vol(self, name: str, type: VolumeType = VolumeType.CONTAINER, project: str = "default", **config: str) -> Volume:
        return Volume(self.pool_name, type, name, project=project, config=config)

    def make(self, vol: Volume, fill: Callable[[Path], None] | None = populate) -> Volume:
        async def filler(path: Path) -> None:
            if self.checks_files and fill is not None:
                await asyncio.to_thread(fill, path)

        self.run(self.driver.create_volume(vol, filler))
        return vol

    def path(self, vol: Volume) -> Path:
        return self.run(self.driver.mount_volume(vol))

    def tree_of(self, vol: Volume) -> dict:
        return tree(self.path(vol), self.driver.info.preserves_inodes)

    # -- pools -------------------------------------------------------------------------------
    def test_create_pool(self):
        if self.checks_files:
            assert self.driver.mount_path.is_dir()
            space = self.driver.usage()["space"]
            assert space["total"] > 0 and 0 <= space["used"] <= space["total"]
        assert self.run(self.driver.list_volumes()) == []

    def test_unmount_and_mount_pool_keeps_volumes(self):
        v = self.make(self.vol("c1"))
        self.run(self.driver.unmount_pool())
        self.run(self.driver.mount_pool())
        assert self.run(self.driver.has_volume(v))
        if self.checks_files:
            assert (self.path(v) / "etc" / "hostname").read_text() == "host-v1\n"

    # -- volumes -----------------------------------------------------------------------------
    def test_create_empty_volume(self):
        v = self.vol("c1")
        assert not self.run(self.driver.has_volume(v))
        self.run(self.driver.create_volume(v))
        assert self.run(self.driver.has_volume(v))
        if self.checks_files:
            p = self.path(v)
            assert p == self.driver.volume_path(v) and p.is_dir() and os.listdir(p) == []
        with pytest.raises(LXDError):
            self.run(self.driver.create_volume(v))

    def test_create_volume_with_filler(self):
        v = self.make(self.vol("c1"))
        if self.checks_files:
            assert (self.path(v) / "etc" / "hostname").read_text() == "host-v1\n"

    def test_failed_filler_leaves_nothing(self):
        async def bad(path: Path) -> None:
            if self.checks_files:
                (path / "half").write_text("x")
            raise RuntimeError("unpack failed")

        v = self.vol("c1")
        with pytest.raises(RuntimeError):
            self.run(self.driver.create_volume(v, bad))
        assert not self.run(self.driver.has_volume(v))
        assert self.volume_leftovers(self.driver) == []

    def test_volume_path_layout(self):
        d = self.driver
        assert d.volume_path(self.vol("c1")) == d.mount_path / "containers" / "c1"
        assert d.volume_path(self.vol("c1", project="p1")) == d.mount_path / "containers" / "p1_c1"
        assert d.volume_path(self.vol("c1/s1")) == d.mount_path / "containers-snapshots" / "c1" / "s1"
        assert d.volume_path(self.vol("v1", VolumeType.CUSTOM)) == d.mount_path / "custom" / "default_v1"
        assert d.volume_path(self.vol("abc", VolumeType.IMAGE, project="p1")) == d.mount_path / "images" / "abc"

    def test_copy_keeps_everything(self):
        src = self.make(self.vol("c1"))
        dst = self.vol("c2")
        self.run(self.driver.create_volume_from_copy(dst, src))
        assert self.run(self.driver.has_volume(dst))
        if not self.checks_files:
            return
        before = self.tree_of(src)
        assert self.tree_of(dst) == before
        # Spot checks of what the comparison covers.
        p = self.path(dst)
        assert os.stat(p / "data" / "owned").st_uid == HIGH_UID + 5
        assert stat.S_IMODE(os.stat(p / "suid").st_mode) == 0o4755
        assert os.getxattr(p / "suid", "security.capability") == CAPABILITY
        assert os.getxattr(p / "xattrs", "system.posix_acl_access") == ACL_ACCESS
        assert os.getxattr(p / "data", "system.posix_acl_default") == ACL_DEFAULT
        assert os.stat(p / "dev" / "null").st_rdev == os.makedev(1, 3)
        if self.driver.info.preserves_inodes:
            assert os.stat(p / "etc" / "hostname").st_ino == os.stat(p / "etc" / "hostname.hard").st_ino
        # The copy is independent of its source.
        (p / "etc" / "hostname").write_text("changed\n")
        assert (self.path(src) / "etc" / "hostname").read_text() == "host-v1\n"

    def test_copy_onto_existing_volume_refused(self):
        src = self.make(self.vol("c1"))
        dst = self.make(self.vol("c2"), None)
        with pytest.raises(LXDError):
            self.run(self.driver.create_volume_from_copy(dst, src))
        assert self.run(self.driver.has_volume(src))

    def test_copy_with_snapshots_and_from_snapshot(self):
        src = self.make(self.vol("c1"))
        self.run(self.driver.create_snapshot(src.snapshot("s1")))
        if self.checks_files:
            (self.path(src) / "etc" / "hostname").write_text("second\n")
        self.run(self.driver.create_snapshot(src.snapshot("s2")))
        dst = self.vol("c2")
        self.run(self.driver.create_volume_from_copy(dst, src, snapshots=True))
        assert self.run(self.driver.list_snapshots(dst)) == ["s1", "s2"]
        one = self.vol("c3")
        self.run(self.driver.create_volume_from_copy(one, src.snapshot("s1")))
        assert self.run(self.driver.list_snapshots(one)) == []
        if self.checks_files:
            assert self.tree_of(dst.snapshot("s1")) == self.tree_of(src.snapshot("s1"))
            assert (self.path(dst.snapshot("s2")) / "etc" / "hostname").read_text() == "second\n"
            assert self.tree_of(one) == self.tree_of(src.snapshot("s1"))
            (self.path(one) / "new").write_text("writable")

    # -- snapshots ---------------------------------------------------------------------------
    def test_snapshot_create_list_rename_delete(self):
        v = self.make(self.vol("c1"))
        self.run(self.driver.create_snapshot(v.snapshot("s1")))
        if self.checks_files:
            (self.path(v) / "etc" / "hostname").write_text("after s1\n")
        self.run(self.driver.create_snapshot(v.snapshot("s2")))
        assert self.run(self.driver.list_snapshots(v)) == ["s1", "s2"]
        assert self.run(self.driver.has_volume(v.snapshot("s1")))
        with pytest.raises(LXDError):
            self.run(self.driver.create_snapshot(v.snapshot("s1")))
        if self.checks_files:
            assert (self.path(v.snapshot("s1")) / "etc" / "hostname").read_text() == "host-v1\n"
            assert (self.path(v.snapshot("s2")) / "etc" / "hostname").read_text() == "after s1\n"
            if self.driver.info.cow_snapshots:
                with pytest.raises(OSError):  # read-only where the driver can
                    (self.path(v.snapshot("s1")) / "new").write_text("x")
        self.run(self.driver.rename_snapshot(v.snapshot("s1"), "s0"))
        assert sorted(self.run(self.driver.list_snapshots(v))) == ["s0", "s2"]
        assert not self.run(self.driver.has_volume(v.snapshot("s1")))
        with pytest.raises(LXDError):
            self.run(self.driver.rename_snapshot(v.snapshot("s0"), "s2"))
        if self.checks_files:
            assert (self.path(v.snapshot("s0")) / "etc" / "hostname").read_text() == "host-v1\n"
        self.run(self.driver.delete_snapshot(v.snapshot("s0")))
        assert self.run(self.driver.list_snapshots(v)) == ["s2"]
        assert not self.run(self.driver.has_volume(v.snapshot("s0")))
        self.run(self.driver.delete_snapshot(v.snapshot("s2")))
        assert self.run(self.driver.list_snapshots(v)) == []
        self.run(self.driver.delete_volume(v))
        assert self.volume_leftovers(self.driver) == []

    def test_snapshot_of_missing_volume(self):
        with pytest.raises(LXDError):
            self.run(self.driver.create_snapshot(self.vol("nope/s1")))
        assert self.volume_leftovers(self.driver) == []

    def test_restore(self):
        v = self.make(self.vol("c1"))
        before = self.tree_of(v) if self.checks_files else None
        self.run(self.driver.create_snapshot(v.snapshot("s1")))
        if self.checks_files:
            p = self.path(v)
            (p / "etc" / "hostname").write_text("changed\n")
            (p / "added-later").write_text("gone after restore")
            (p / "suid").unlink()
        self.run(self.driver.restore_snapshot(v.snapshot("s1")))
        assert self.run(self.driver.list_snapshots(v)) == ["s1"]
        if self.checks_files:
            p = self.path(v)
            assert not (p / "added-later").exists()
            assert self.tree_of(v) == before
            (p / "writable").write_text("the restored volume is writable")
        # And again: a snapshot survives being restored from.
        self.run(self.driver.restore_snapshot(v.snapshot("s1")))
        if self.checks_files:
            assert not (self.path(v) / "writable").exists()

    def test_restore_missing_snapshot(self):
        v = self.make(self.vol("c1"))
        with pytest.raises(LXDError) as e:
            self.run(self.driver.restore_snapshot(v.snapshot("nope")))
        assert e.value.status == 404
        assert self.run(self.driver.has_volume(v))

    def test_rename_volume_with_snapshots(self):
        v = self.make(self.vol("c1"))
        self.run(self.driver.create_snapshot(v.snapshot("s1")))
        self.run(self.driver.rename_volume(v, "c2"))
        new = self.vol("c2")
        assert not self.run(self.driver.has_volume(v))
        assert not self.run(self.driver.has_volume(v.snapshot("s1")))
        assert self.run(self.driver.has_volume(new))
        assert self.run(self.driver.list_snapshots(new)) == ["s1"]
        if self.checks_files:
            assert (self.path(new.snapshot("s1")) / "etc" / "hostname").read_text() == "host-v1\n"
        other = self.make(self.vol("c3"), None)
        with pytest.raises(Conflict):
            self.run(self.driver.rename_volume(new, other.name))

    # -- images --------------------------------------------------------------------------
    def test_create_volume_from_image(self):
        def fill_image(root: Path) -> None:
            populate(root)
            (root / "big").write_bytes(os.urandom(24 * MiB))

        image = self.make(self.vol("f" * 64, VolumeType.IMAGE), fill_image)
        if self.checks_files:
            os.sync()
            used0 = self.driver.usage()["space"]["used"]
        made = []
        for i in range(3):
            v = self.vol(f"c{i}")
            self.run(self.driver.create_volume_from_image(v, image))
            made.append(v)
        if not self.checks_files:
            return
        want = self.tree_of(image)
        for v in made:
            assert self.tree_of(v) == want
        (self.path(made[0]) / "etc" / "hostname").write_text("mine\n")
        assert (self.path(image) / "etc" / "hostname").read_text() == "host-v1\n"
        if self.driver.info.optimized_images:
            os.sync()
            grown = self.driver.usage()["space"]["used"] - used0
            assert grown < 24 * MiB, f"3 instances from a 24 MiB image used {grown} bytes: not copy-on-write"

    # -- quotas and usage ----------------------------------------------------------------------
    def test_quota(self):
        v = self.make(self.vol("c1", VolumeType.CUSTOM), None)
        if not self.driver.info.quota:
            with pytest.raises(BadRequest) as e:
                self.run(self.driver.set_volume_quota(v, 20 * MiB))
            assert e.value.message  # says why
            return
        self.run(self.driver.set_volume_quota(v, 20 * MiB))
        if self.checks_files:
            with pytest.raises(OSError) as e:
                _write(self.path(v) / "big", 60 * MiB)
            assert e.value.errno in (errno.ENOSPC, errno.EDQUOT)
            (self.path(v) / "big").unlink()
        self.run(self.driver.set_volume_quota(v, None))
        if self.checks_files:
            _write(self.path(v) / "big", 40 * MiB)  # no limit any more

    def test_quota_from_volume_config(self):
        if not self.driver.info.quota:
            with pytest.raises(BadRequest):
                self.make(self.vol("c1", VolumeType.CUSTOM, size="20MiB"), None)
            assert not self.run(self.driver.has_volume(self.vol("c1", VolumeType.CUSTOM)))
            return
        v = self.make(self.vol("c1", VolumeType.CUSTOM, size="20MiB"), None)
        if self.checks_files:
            with pytest.raises(OSError) as e:
                _write(self.path(v) / "big", 60 * MiB)
            assert e.value.errno in (errno.ENOSPC, errno.EDQUOT)

    def test_volume_usage(self):
        v = self.make(self.vol("c1"), lambda root: _write(root / "five", 5 * MiB))
        if self.checks_files:
            os.sync()
        used = self.run(self.driver.volume_usage(v))
        if self.checks_files:
            assert used is not None and 4 * MiB <= used <= 64 * MiB, used
        with pytest.raises(LXDError):
            self.run(self.driver.volume_usage(self.vol("nope")))

    def test_list_volumes(self):
        made = [self.make(self.vol("c1"), None), self.make(self.vol("c1", project="p1"), None),
                self.make(self.vol("vol1", VolumeType.CUSTOM), None),
                self.make(self.vol("a" * 64, VolumeType.IMAGE), None)]
        self.run(self.driver.create_snapshot(made[0].snapshot("s1")))
        self.run(self.driver.create_snapshot(made[1].snapshot("s1")))
        self.run(self.driver.create_snapshot(made[0].snapshot("s2")))
        found = self.run(self.driver.list_volumes())
        key = {(v.type, v.project, v.name) for v in found}
        want = {(v.type, v.project, v.name) for v in made} | {
            (VolumeType.CONTAINER, "default", "c1/s1"), (VolumeType.CONTAINER, "default", "c1/s2"),
            (VolumeType.CONTAINER, "p1", "c1/s1")}
        assert key == want
        assert all(v.pool == self.pool_name for v in found)

    # -- backups and migration -------------------------------------------------------------
    def _with_history(self, name: str = "c1") -> tuple[Volume, dict]:
        """A volume with two snapshots of different content; their trees."""
        v = self.make(self.vol(name))
        trees = {}
        self.run(self.driver.create_snapshot(v.snapshot("s1")))
        if self.checks_files:
            trees["s1"] = self.tree_of(v.snapshot("s1"))
            p = self.path(v)
            _write(p / "grown", 2 * MiB)
            (p / "etc" / "hostname").write_text("s2\n")
        self.run(self.driver.create_snapshot(v.snapshot("s2")))
        if self.checks_files:
            trees["s2"] = self.tree_of(v.snapshot("s2"))
            (self.path(v) / "grown").unlink()
            (self.path(v) / "latest").write_text("only in the volume")
            trees[""] = self.tree_of(v)
        return v, trees

    def _check_history(self, v: Volume, trees: dict) -> None:
        assert self.run(self.driver.list_snapshots(v)) == ["s1", "s2"]
        if self.checks_files:
            assert self.tree_of(v) == trees[""]
            assert self.tree_of(v.snapshot("s1")) == trees["s1"]
            assert self.tree_of(v.snapshot("s2")) == trees["s2"]
            (self.path(v) / "writable").write_text("x")

    def test_optimized_backup_round_trip(self):
        if not self.driver.info.optimized_backups:
            pytest.skip("the driver has no optimised backup format")
        v, trees = self._with_history()
        tar_path = self.tmp_path / "backup.tar"
        with tarfile.open(tar_path, "w") as tar:
            names = self.run(self.driver.backup_volume_optimized(v, ["s1", "s2"], tar))
        assert names and all(n.startswith("backup/") for n in names)
        with tarfile.open(tar_path) as tar:
            assert set(names) <= set(tar.getnames())
        for s in ("s1", "s2"):
            self.run(self.driver.delete_snapshot(v.snapshot(s)))
        self.run(self.driver.delete_volume(v))
        for target in (v, self.vol("restored")):
            with tarfile.open(tar_path) as tar:
                self.run(self.driver.restore_volume_optimized(target, ["s1", "s2"], tar.extractfile))
            self._check_history(target, trees)
        # Without snapshots: only the volume comes back.
        only = self.vol("only")
        with tarfile.open(tar_path) as tar:
            self.run(self.driver.restore_volume_optimized(only, [], tar.extractfile))
        assert self.run(self.driver.list_snapshots(only)) == []
        if self.checks_files:
            assert self.tree_of(only) == trees[""]

    def test_corrupt_optimized_backup_leaves_nothing(self):
        if not self.driver.info.optimized_backups:
            pytest.skip("the driver has no optimised backup format")
        v, _ = self._with_history()
        tar_path = self.tmp_path / "backup.tar"
        with tarfile.open(tar_path, "w") as tar:
            names = self.run(self.driver.backup_volume_optimized(v, ["s1", "s2"], tar))
        bad = self.tmp_path / "bad.tar"
        with tarfile.open(tar_path) as src, tarfile.open(bad, "w") as dst:
            for m in src.getmembers():
                data = src.extractfile(m).read()
                if m.name == names[-1]:
                    data = data[: len(data) // 2]  # a truncated stream
                    m.size = len(data)
                import io

                dst.addfile(m, io.BytesIO(data))
        target = self.vol("restored")
        with tarfile.open(bad) as tar, pytest.raises(LXDError):
            self.run(self.driver.restore_volume_optimized(target, ["s1", "s2"], tar.extractfile))
        assert not self.run(self.driver.has_volume(target))
        assert self.run(self.driver.list_snapshots(target)) == []
        names_now = {x.name for x in self.run(self.driver.list_volumes())}
        assert names_now == {"c1", "c1/s1", "c1/s2"}

    def test_send_receive_round_trip(self):
        types = [t for t in self.driver.info.migration_types if t != "RSYNC"]
        if not types:
            pytest.skip("the driver has only the generic rsync transport")
        v, trees = self._with_history()
        for i, transport in enumerate(types):
            chunks: list[bytes] = []

            async def write(b: bytes, chunks: list[bytes] = chunks) -> None:
                chunks.append(b)

            self.run(self.driver.send_volume(v, ["s1", "s2"], transport, write))

            async def feed(chunks: list[bytes] = chunks):
                for c in chunks:
                    yield c

            target = self.vol(f"received{i}")
            self.run(self.driver.receive_volume(target, ["s1", "s2"], transport, feed()))
            self._check_history(target, trees)

    # -- deleting --------------------------------------------------------------------------
    def test_delete_leaves_nothing(self):
        vols = [self.make(self.vol("c1")), self.make(self.vol("v1", VolumeType.CUSTOM)),
                self.make(self.vol("c1", project="p1"))]
        self.run(self.driver.create_snapshot(vols[0].snapshot("s1")))
        self.run(self.driver.create_snapshot(vols[1].snapshot("s1")))
        copy = self.vol("c2")
        self.run(self.driver.create_volume_from_copy(copy, vols[0], snapshots=True))
        self.run(self.driver.restore_snapshot(vols[0].snapshot("s1")))
        for v in [*vols, copy]:
            for s in self.run(self.driver.list_snapshots(v)):
                self.run(self.driver.delete_snapshot(v.snapshot(s)))
            self.run(self.driver.delete_volume(v))
            assert not self.run(self.driver.has_volume(v))
        self.run(self.driver.delete_volume(self.vol("never-existed")))
        assert self.run(self.driver.list_volumes()) == []
        assert self.volume_leftovers(self.driver) == []

    def test_delete_pool_leaves_nothing(self):
        v = self.make(self.vol("c1"))
        self.run(self.driver.create_snapshot(v.snapshot("s1")))
        self.make(self.vol("v1", VolumeType.CUSTOM))
        self.run(self.driver.delete_pool())
        assert self.host_leftovers(self.driver) == []


def _write(path: Path, size: int) -> None:
    """Write `size` bytes and make them reach the disk (quota and space errors show here)."""
    block = os.urandom(MiB)
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(block)
            f.flush()
        os.fsync(f.fileno())
