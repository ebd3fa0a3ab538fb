"""The `dir` driver: every volume is a plain directory under the pool, laid out as LXD lays it
out (`containers/<vol>`, `containers-snapshots/<vol>/<snap>`, `custom/<vol>`, `images/<fp>`).

Copies and snapshots are `cp -a --reflink=auto` (owners, modes, timestamps, hard links, xattrs,
ACLs and device nodes kept; extents shared where the filesystem has reflinks). A restore copies
the snapshot next to the volume and swaps the two in one renameat2(RENAME_EXCHANGE), so a crash
leaves either the old or the new content, never a mix. `size` is enforced with project quotas
where the pool's filesystem has them (ext4 or xfs mounted with `prjquota`), else refused with the
reason. Every tool runs through tools.run.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import shutil
import uuid
from pathlib import Path

from lxd_daemon.errors import BadRequest, Conflict, NotFound
from lxd_daemon.storage.drivers.base import Driver, Filler
from lxd_daemon.storage.drivers.blockutil import mkdir_mode, remove_empty_dir
from lxd_daemon.storage.drivers.tools import ToolError, run
from lxd_daemon.storage.drivers.trees import copy_tree, remove_tree
from lxd_daemon.storage.volume import DriverInfo, Volume, VolumeType

SUBDIRS = tuple(Driver.TYPE_DIR_MODES)
# Project ids for quotas: LXD starts volume project ids above this offset; ours derive from the
# volume directory's inode so that no registry is needed.
PROJECT_ID_BASE = 10000
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> None:
    """Swap two paths atomically (renameat2 RENAME_EXCHANGE)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.renameat2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(a))


def _mount_of(path: Path) -> tuple[str, str, set[str]]:
    """(mount point, filesystem type, mount + super options) of the mount holding `path`."""
    real = os.path.realpath(path)
    best = ("/", "", set())
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            mnt = fields[4].encode().decode("unicode_escape")
            rf = right.split()
            if real == mnt or real.startswith(mnt.rstrip("/") + "/"):
                if len(mnt) >= len(best[0]):
                    opts = set(fields[5].split(",")) | set((rf[2] if len(rf) > 2 else "").split(","))
                    best = (mnt, rf[0], opts)
    return best


def project_quota_support(path: Path) -> tuple[bool, str, str, str]:
    """Whether `path`'s filesystem enforces project quotas: (ok, why not, fstype, mount point)."""
    mnt, fstype, opts = _mount_of(path)
    if fstype not in ("ext4", "xfs"):
        return False, f"the pool is on {fstype or 'an unknown filesystem'}, which has no project quotas", fstype, mnt
    if not opts & {"prjquota", "pquota", "prjjquota", "pqnoenforce"} or "pqnoenforce" in opts:
        return False, f"{mnt} ({fstype}) is not mounted with the prjquota option", fstype, mnt
    return True, "", fstype, mnt


class DirDriver(Driver):
    info = DriverInfo(name="dir", version="1", optimized_images=False, optimized_backups=False,
                      cow_snapshots=False, quota=False, running_quota_resize=True, remote=False,
                      preserves_inodes=False, block_backed=False)
    pool_keys: dict = {}

    # -- the driver on this host -----------------------------------------------------------
    @classmethod
    def available(cls) -> tuple[bool, str]:
        return (True, cls.info.version) if shutil.which("cp") else (False, "cp not found")

    @classmethod
    def validate_pool_config(cls, config: dict[str, str]) -> dict[str, str]:
        config = dict(config)
        src = config.get("source", "")
        if src and not src.startswith("/"):
            raise BadRequest(f"Invalid value for source {src!r}: must be an absolute path")
        if src and os.path.exists(src) and not os.path.isdir(src):
            raise BadRequest(f"Invalid value for source {src!r}: not a directory")
        return config

    # -- pools -------------------------------------------------------------------------------
    async def create_pool(self) -> None:
        """The layout under the pool's directory; with a `source` directory elsewhere, the pool's
        directory is a link to it. `source` is filled in with where it lives."""
        mount = self.mount_path
        source = self.config.get("source") or str(mount)
        linked = source != str(mount)

        def mk() -> None:
            if linked and not os.path.isdir(source):
                # As LXD: a `source` the user names must be there (a typo never makes a pool in
                # a new directory of its own).
                why = "isn't a directory" if os.path.lexists(source) else "doesn't exist"
                raise BadRequest(f"Source path {source!r} {why}")
            _require_empty(source)
            if linked:
                if mount.is_symlink() or mount.exists():
                    raise BadRequest(f"{mount} already exists")
                mount.parent.mkdir(parents=True, exist_ok=True)
                mount.symlink_to(source)
            self.mount_path.mkdir(parents=True, exist_ok=True)
            self.make_layout()

        try:
            await asyncio.to_thread(mk)
        except BaseException:
            if linked and mount.is_symlink():
                mount.unlink()
            raise
        self.config["source"] = source

    async def delete_pool(self) -> None:
        if self.mount_path.is_symlink():
            # A `source` the user brought stays, emptied of the (by now empty) layout made in it,
            # so that a pool can be made on it again; only the link to it goes.
            for sub in self.TYPE_DIR_MODES:
                await asyncio.to_thread(remove_empty_dir, self.mount_path / sub)
            self.mount_path.unlink()
            return
        await self._remove(self.mount_path)

    async def update_pool(self, changed: dict[str, str]) -> None:
        """Nothing to apply on a live dir pool: its keys only take effect on new volumes."""

    def usage(self) -> dict:
        st = os.statvfs(self.mount_path)
        total = st.f_blocks * st.f_frsize
        used = (st.f_blocks - st.f_bfree) * st.f_frsize
        return {"space": {"used": used, "total": total},
                "inodes": {"used": st.f_files - st.f_ffree, "total": st.f_files}}

    # -- helpers -----------------------------------------------------------------------------
    @staticmethod
    async def _remove(path: Path) -> None:
        await remove_tree(path)

    @staticmethod
    async def _copy(src: Path, dst: Path) -> None:
        await copy_tree(src, dst)

    async def _require(self, vol: Volume) -> Path:
        path = self.volume_path(vol)
        if not await asyncio.to_thread(path.is_dir):
            kind = "snapshot" if vol.is_snapshot else "volume"
            raise NotFound(f"Storage {kind} {vol.name!r} of type {vol.type.value!r} not found on pool {self.pool_name!r}")
        return path

    def _new_mode(self, vol: Volume) -> int:
        if vol.type is VolumeType.CUSTOM:
            return self.CUSTOM_MODE
        return 0o700  # instance volumes are closed to 0100 by the service; images stay root's

    # -- volumes -----------------------------------------------------------------------------
    async def has_volume(self, vol: Volume) -> bool:
        path = self.volume_path(vol)
        return await asyncio.to_thread(lambda: path.is_dir() and not path.is_symlink())

    async def create_volume(self, vol: Volume, filler: Filler | None = None) -> None:
        if vol.is_snapshot:
            raise BadRequest("Use create_snapshot to make a snapshot")
        path = self.volume_path(vol)
        mode = self._new_mode(vol)

        # Two metadata syscalls: cheaper on the loop than a thread hop (launches take this path).
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            raise Conflict(f"Storage volume {vol.name!r} already exists on pool {self.pool_name!r}") from None
        except FileNotFoundError:
            await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
            await self.create_volume(vol, filler)
            return
        os.chmod(path, mode)
        try:
            size = vol.config.get("size")
            if size:
                from lxd_daemon.util.sizes import parse_byte_size as parse_size

                await self.set_volume_quota(vol, parse_size(size))
            if filler is not None:
                await filler(path)
        except BaseException:
            await self._remove(path)
            raise

    async def create_volume_from_copy(self, vol: Volume, src: Volume, *, snapshots: bool = False) -> None:
        if vol.is_snapshot:
            raise BadRequest("Use create_snapshot to make a snapshot")
        src_path = await self._require(src)
        dst = self.volume_path(vol)
        if await asyncio.to_thread(os.path.lexists, dst):
            raise Conflict(f"Storage volume {vol.name!r} already exists on pool {self.pool_name!r}")
        snaps = await self.list_snapshots(src) if snapshots and not src.is_snapshot else []
        made: list[Path] = []
        try:
            if snaps:
                sdir = self.snapshots_dir(vol)
                await asyncio.to_thread(mkdir_mode, sdir, 0o700)
                made.append(sdir)
                for s in snaps:
                    await self._copy(self.volume_path(src.snapshot(s)), sdir / s)
            await asyncio.to_thread(dst.parent.mkdir, parents=True, exist_ok=True)
            made.append(dst)
            await self._copy(src_path, dst)
        except BaseException:
            for p in reversed(made):
                await self._remove(p)
            raise

    async def delete_volume(self, vol: Volume) -> None:
        if vol.is_snapshot:
            await self.delete_snapshot(vol)
            return
        sdir = self.snapshots_dir(vol)
        if await asyncio.to_thread(_listdir, sdir):
            raise BadRequest(f"Storage volume {vol.name!r} still has snapshots")
        await self._remove(self.volume_path(vol))
        await asyncio.to_thread(remove_empty_dir, sdir)

    async def rename_volume(self, vol: Volume, new_name: str) -> None:
        await self._rename_volume_dirs(vol, new_name, Path.is_dir)

    async def set_volume_quota(self, vol: Volume, size: int | None) -> None:
        path = await self._require(vol)
        ok, why, fstype, mnt = await asyncio.to_thread(project_quota_support, path)
        if not ok:
            if not size:
                return  # nothing to remove
            raise BadRequest(f"The dir driver can't limit a volume's size here: {why}")
        pid = PROJECT_ID_BASE + (os.stat(path).st_ino & 0x3FFFFFFF)
        kib = (size or 0) // 1024
        if fstype == "xfs":
            await run("xfs_quota", "-x", "-c", f"project -s -p {path} {pid}", mnt)
            await run("xfs_quota", "-x", "-c", f"limit -p bhard={size or 0} {pid}", mnt)
        else:
            await run("chattr", "-R", "+P", "-p", str(pid), str(path))
            await run("setquota", "-P", str(pid), "0", str(kib), "0", "0", mnt)

    async def volume_usage(self, vol: Volume) -> int | None:
        path = await self._require(vol)
        res = await run("du", "-s", "-B1", "--one-file-system", "--", str(path), check=False)
        try:
            return int(res.stdout.split()[0])
        except (IndexError, ValueError):
            if res.returncode:
                raise ToolError(res) from None
            return None

    async def list_volumes(self) -> list[Volume]:
        def walk() -> list[Volume]:
            out: list[Volume] = []
            for vtype in VolumeType:
                base = self.mount_path / vtype.dir_name
                for entry in _listdir(base):
                    if not (base / entry).is_dir() or (base / entry).is_symlink():
                        continue
                    out.append(self._decode(vtype, entry))
                sbase = self.mount_path / vtype.snapshots_dir_name
                for entry in _listdir(sbase):
                    parent = self._decode(vtype, entry)
                    for snap in _by_age(sbase / entry):
                        out.append(parent.snapshot(snap))
            return out

        return await asyncio.to_thread(walk)

    def _decode(self, vtype: VolumeType, storage_name: str) -> Volume:
        """The Volume a directory name stands for (`project_name` outside the default project)."""
        if vtype is not VolumeType.IMAGE and "_" in storage_name and not storage_name.startswith("."):
            project, name = storage_name.split("_", 1)
            return Volume(self.pool_name, vtype, name, project=project)
        return Volume(self.pool_name, vtype, storage_name)

    # -- snapshots ---------------------------------------------------------------------------
    async def create_snapshot(self, snap: Volume) -> None:
        await self._create_snapshot_entry(snap, self._require, self._copy, undo=self._remove)

    async def delete_snapshot(self, snap: Volume) -> None:
        path = self.volume_path(snap)
        await self._remove(path)
        await asyncio.to_thread(remove_empty_dir, path.parent)

    async def rename_snapshot(self, snap: Volume, new_snapshot_name: str) -> None:
        old = await self._require(snap)
        await self._rename_snapshot_entry(old, snap, new_snapshot_name)

    async def restore_snapshot(self, snap: Volume) -> None:
        src = await self._require(snap)
        vol_path = await self._require(snap.parent())
        tmp = vol_path.parent / f".restore-{vol_path.name}-{uuid.uuid4().hex[:8]}"
        try:
            await self._copy(src, tmp)
            # The volume directory itself keeps its current owner and mode (the service sets
            # them for a running or stopped instance); its content becomes the snapshot's.
            def swap() -> None:
                st = os.lstat(vol_path)
                os.chown(tmp, st.st_uid, st.st_gid)
                os.chmod(tmp, st.st_mode & 0o7777)
                _exchange(tmp, vol_path)

            await asyncio.to_thread(swap)
        finally:
            await self._remove(tmp)  # after the swap: the old content

    async def list_snapshots(self, vol: Volume) -> list[str]:
        sdir = self.snapshots_dir(vol.parent())
        return await asyncio.to_thread(_by_age, sdir)


def _require_empty(source: str) -> None:
    """A pool's source holds nothing yet (`lost+found` alone is fine at a mount point), so that
    a pool never takes over files it didn't make."""
    try:
        entries = os.listdir(source)
    except FileNotFoundError:
        return
    if entries and not (entries == ["lost+found"] and os.path.ismount(source)):
        raise BadRequest(f"Source path {source!r} isn't empty")


def _listdir(path: Path) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _by_age(path: Path) -> list[str]:
    """Subdirectories of `path`, oldest first (the directory's ctime: set when the snapshot was
    made; names break ties)."""
    out = []
    for e in _listdir(path):
        p = path / e
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            continue
        if not p.is_symlink() and p.is_dir():
            out.append((st.st_ctime_ns, e))
    return [e for _, e in sorted(out)]



