"""The `btrfs` driver: every volume is a btrfs subvolume, laid out as LXD lays it out
(`containers/<vol>`, `containers-snapshots/<vol>/<snap>`, `custom/<vol>`, `images/<fp>`).

Where the pool lives (`source`):
- nothing: a loop file `$LXD_DIR/disks/<pool>.img` of `size` (LXD's default: a fifth of the free
  space, 5 to 30 GiB) that the driver makes and owns; `source` then names it;
- `/dev/...`: a block device, not mounted: formatted when blank, reused when it holds an empty btrfs
  filesystem, refused when it holds anything else;
- `/path`: an existing, empty directory or subvolume on a mounted btrfs filesystem (bind-mounted).
The filesystem is mounted at the pool's mount path with `btrfs.mount_options` (default
`user_subvol_rm_allowed`); loop files are attached by mount(8) with autoclear, so unmounting the
pool frees the loop device, and mount_pool() re-attaches them when the daemon starts.

Image volumes are subvolumes; instances are made from them by a writable snapshot, snapshots are
read-only subvolume snapshots, copies are snapshots, a restore snapshots the snapshot next to the
volume and swaps the two. Subvolumes nested inside a volume (systemd makes some) are snapshotted
and deleted with it. `size` is a qgroup limit on referenced bytes (quotas are enabled on first
use). Optimised backups and migration are `btrfs send` streams (incremental against the previous
snapshot), in the members LXD's btrfs backups have: `backup/optimized_header.yaml`,
`backup/container.bin`, `backup/snapshots/<snap>.bin` (`volume`/`volume-snapshots` for custom
volumes), nested subvolumes as `<member>_<encoded path>.bin`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import BinaryIO

import yaml

from lxd_daemon.errors import BadRequest, Conflict, InsufficientStorage, LXDError, NotFound
from lxd_daemon.storage.drivers import blockutil, btrfs_ioctl
from lxd_daemon.storage.drivers.base import Driver, Filler
from lxd_daemon.storage.drivers.tools import ToolError, run, run_fed, run_stream
from lxd_daemon.storage.volume import DriverInfo, Volume, VolumeType
from lxd_daemon.util.sizes import parse_byte_size

SUBDIRS = tuple(Driver.TYPE_DIR_MODES)
DEFAULT_MOUNT_OPTIONS = "user_subvol_rm_allowed"
MIN_SIZE = 128 * 1024 * 1024  # mkfs.btrfs refuses much smaller devices
SUBVOL_INO = 256  # the inode number of every subvolume's root directory
TRANSPORT = "BTRFS"
_HIDDEN = "."  # temporary and trash entries in type directories start with this


def _check_mount_options(value: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_=,.:/+-]*", value):
        raise ValueError(f"Invalid mount options {value!r}")


def _check_size(value: str) -> None:
    if value and parse_byte_size(value) < MIN_SIZE:
        raise ValueError(f"Invalid size {value!r}: a btrfs pool needs at least 128MiB")


def _snapshot_by_ioctl(src: Path, dst: Path, readonly: bool) -> bool:
    """The common case in two ioctls, without a `btrfs` process: `src` has no nested subvolume.
    False (nothing made) when it has some, or when the kernel refuses: the tool path then runs
    and reports the error in its words."""
    try:
        if btrfs_ioctl.has_children(str(src)):
            return False
        btrfs_ioctl.snapshot(str(src), str(dst), readonly=readonly)
        return True
    except OSError:
        return False


# BTRFS_IOC_SUBVOL_GETFLAGS / SETFLAGS (a u64 of BTRFS_SUBVOL_* flags): the read-only flag of a
# live volume sent as it is (see BtrfsDriver.sends_live). Unlike `btrfs property set -f ro false`,
# clearing the flag this way leaves the subvolume as it was (its received UUID included).
_SUBVOL_GETFLAGS = btrfs_ioctl._ioc(btrfs_ioctl._IOC_READ, 25, 8)
_SUBVOL_SETFLAGS = btrfs_ioctl._ioc(btrfs_ioctl._IOC_WRITE, 26, 8)
_LIVE_SEND = ".sendro-"


def _subvol_flags(fd: int) -> int:
    buf = bytearray(8)
    fcntl.ioctl(fd, _SUBVOL_GETFLAGS, buf)
    return struct.unpack("=Q", buf)[0]


def _make_live_ro(path: Path, marker: Path) -> bool:
    """Make subvolume `path` read-only, `marker` made first; False (nothing changed) when it has
    nested subvolumes or is read-only already."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if btrfs_ioctl.has_children(str(path)):
            return False
        flags = _subvol_flags(fd)
        if flags & btrfs_ioctl.SUBVOL_RDONLY:
            return False
        os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
        try:
            fcntl.ioctl(fd, _SUBVOL_SETFLAGS, struct.pack("=Q", flags | btrfs_ioctl.SUBVOL_RDONLY))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(marker)
            raise
        return True
    finally:
        os.close(fd)


def _end_live_ro(path: Path, marker: Path) -> None:
    """Make subvolume `path` writable again, then remove `marker`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        fd = -1
    if fd >= 0:
        try:
            flags = _subvol_flags(fd)
            if flags & btrfs_ioctl.SUBVOL_RDONLY:
                fcntl.ioctl(fd, _SUBVOL_SETFLAGS, struct.pack("=Q", flags & ~btrfs_ioctl.SUBVOL_RDONLY))
        finally:
            os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(marker)


def _destroy_by_ioctl(path: Path) -> bool:
    """Delete a subvolume without nested ones in one ioctl; False (nothing done) otherwise."""
    try:
        btrfs_ioctl.destroy(str(path))
        return True
    except OSError:
        return False


def _is_subvolume(path: Path) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_ino == SUBVOL_INO


def _path_encode(text: str) -> str:
    """A subvolume's path inside its volume as part of a member name (as LXD encodes it)."""
    return text.replace("-", "--").replace("/", "-")


def _member_prefix(vol: Volume) -> tuple[str, str]:
    """(main member prefix, snapshots directory) in LXD's btrfs backup layout."""
    if vol.type is VolumeType.CUSTOM:
        return "volume", "volume-snapshots"
    if vol.type is VolumeType.VM:
        return "virtual-machine", "virtual-machine-snapshots"
    return "container", "snapshots"


class BtrfsDriver(Driver):
    info = DriverInfo(name="btrfs", version="", optimized_images=True, optimized_backups=True,
                      cow_snapshots=True, quota=True, running_quota_resize=True, remote=False,
                      preserves_inodes=True, block_backed=False,
                      migration_types=(TRANSPORT, "RSYNC"))
    pool_keys = {"btrfs.mount_options": _check_mount_options, "size": _check_size}

    def __init__(self, pool_name: str, mount_path: Path, config: dict[str, str]):
        super().__init__(pool_name, mount_path, config)
        self._quota_on: bool | None = None
        self._busy: set[Path] = set()  # temporary paths in use (the sweep leaves them)

    # -- the driver on this host -----------------------------------------------------------
    @classmethod
    def available(cls) -> tuple[bool, str]:
        if not shutil.which("btrfs"):
            return False, "btrfs not found (btrfs-progs)"
        try:
            with open("/proc/filesystems") as f:
                if not any(line.split()[-1:] == ["btrfs"] for line in f):
                    return False, "the kernel has no btrfs support"
        except OSError as e:
            return False, f"can't read /proc/filesystems: {e}"
        try:
            out = subprocess.run(["btrfs", "--version"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError) as e:
            return False, f"btrfs --version failed: {e}"
        m = re.search(r"v?(\d+(?:\.\d+)*)", out)
        return True, m.group(1) if m else out.strip()

    @classmethod
    def validate_pool_config(cls, config: dict[str, str]) -> dict[str, str]:
        config = dict(config)
        for key, check in cls.pool_keys.items():
            if key in config:
                try:
                    check(config[key])
                except ValueError as e:
                    raise BadRequest(f"Invalid value for pool key {key!r}: {e}") from None
        src = config.get("source", "")
        if src and not src.startswith("/"):
            raise BadRequest(f"Invalid value for pool key 'source' {src!r}: must be an absolute path")
        if src and config.get("size") and not os.path.isfile(src):
            raise BadRequest("Pool key 'size' only applies to loop-backed pools (no 'source')")
        config.setdefault("btrfs.mount_options", DEFAULT_MOUNT_OPTIONS)
        return config

    # -- where the pool lives ----------------------------------------------------------------
    def _mount_options(self) -> str:
        return self.config.get("btrfs.mount_options") or DEFAULT_MOUNT_OPTIONS

    def _source_kind(self) -> str:
        """"loop", "device" or "path" for an existing pool (after create_pool)."""
        src = self.config.get("source", "")
        if not src or os.path.isfile(src):
            return "loop"
        if blockutil.is_block_device(src):
            return "device"
        return "path"

    def _loop_file(self) -> Path:
        src = self.config.get("source", "")
        return Path(src) if src else blockutil.loop_file(self.mount_path, self.pool_name)

    async def _mount(self) -> None:
        kind = self._source_kind()
        src = self.config.get("source", "")
        await asyncio.to_thread(self.mount_path.mkdir, parents=True, exist_ok=True)
        if kind == "path":
            await run("mount", "--bind", src, str(self.mount_path))
            return
        opts = self._mount_options()
        dev = str(self._loop_file()) if kind == "loop" else src
        if kind == "loop":
            opts = f"loop,{opts}" if opts else "loop"  # mount(8) attaches it with autoclear
        argv = ["mount", "-t", "btrfs"] + (["-o", opts] if opts else []) + [dev, str(self.mount_path)]
        await run(*argv)
        if kind == "loop":
            # Direct I/O from the loop device to its file (as LXD sets it up): the pool's data is
            # not cached twice nor copied once more, which halves the cost of big writes
            # (`btrfs receive` of an import). Best effort: a filesystem without O_DIRECT keeps it off.
            loopdev = await blockutil.find_loop(self._loop_file())
            if loopdev:
                await run("losetup", "--direct-io=on", loopdev, check=False)

    async def _umount(self) -> None:
        if not await asyncio.to_thread(blockutil.mounted, self.mount_path):
            return
        await blockutil.umount(self.mount_path)

    # -- pools -------------------------------------------------------------------------------
    async def create_pool(self) -> None:
        if await asyncio.to_thread(blockutil.mounted, self.mount_path):
            raise Conflict(f"Something is already mounted at {self.mount_path}")
        src = self.config.get("source", "")
        undo: list[Callable[[], Awaitable[None]]] = []
        try:
            if not src:
                path = blockutil.loop_file(self.mount_path, self.pool_name)
                if await asyncio.to_thread(os.path.lexists, path):
                    raise Conflict(f"The loop file {path} already exists")
                size_text = self.config.get("size") or f"{blockutil.default_loop_size(self.mount_path.parent.parent) // blockutil.GiB}GiB"
                size = parse_byte_size(size_text)
                await asyncio.to_thread(blockutil.make_sparse_file, path, size)
                undo.append(lambda: asyncio.to_thread(path.unlink, True))
                await run("mkfs.btrfs", "-f", "-q", "-L", self.pool_name, str(path))
                self.config["source"] = str(path)
                self.config["size"] = size_text
            elif src.startswith("/dev/") or blockutil.is_block_device(src):
                await self._prepare_device(src)
            else:
                await self._check_path_source(src)
            await self._mount()
            undo.append(self._umount)
            await asyncio.to_thread(self._make_layout)
        except BaseException:
            if not src:
                self.config.pop("source", None)
            for fn in reversed(undo):
                try:
                    await fn()
                except Exception:
                    pass
            await asyncio.to_thread(blockutil.remove_empty_dir, self.mount_path)
            raise

    async def _prepare_device(self, dev: str) -> None:
        if not await asyncio.to_thread(os.path.lexists, dev):
            raise BadRequest(f"Invalid value for pool key 'source': the device {dev} doesn't exist")
        if not await asyncio.to_thread(blockutil.is_block_device, dev):
            raise BadRequest(f"Invalid value for pool key 'source' {dev!r}: not a block device")
        if await self._device_in_use(dev):
            raise BadRequest(f"The block device {dev} is in use (mounted)")
        res = await run("blkid", "-p", "-s", "TYPE", "-o", "value", dev, check=False)
        fstype = res.stdout.strip()
        if fstype == "btrfs":
            # Already btrfs: reuse it only if empty.
            probe = Path(f"{self.mount_path}.probe-{uuid.uuid4().hex[:6]}")
            await asyncio.to_thread(probe.mkdir, parents=True)
            try:
                await run("mount", "-t", "btrfs", dev, str(probe))
                try:
                    entries = await asyncio.to_thread(os.listdir, probe)
                finally:
                    await run("umount", str(probe))
            finally:
                await asyncio.to_thread(blockutil.remove_empty_dir, probe)
            if entries:
                raise BadRequest(f"The btrfs filesystem on {dev} is not empty")
            return
        if fstype:
            # As mkfs.btrfs without -f: a device holding another filesystem is never formatted over.
            raise BadRequest(f"The block device {dev} already holds a {fstype} filesystem")
        await run("mkfs.btrfs", "-f", "-q", "-L", self.pool_name, dev)

    @staticmethod
    async def _device_in_use(dev: str) -> bool:
        real = os.path.realpath(dev)

        def scan() -> bool:
            with open("/proc/self/mountinfo") as f:
                for line in f:
                    right = line.partition(" - ")[2].split()
                    if len(right) > 1 and os.path.realpath(right[1]) == real:
                        return True
            return False

        return await asyncio.to_thread(scan)

    async def _check_path_source(self, src: str) -> None:
        def check() -> None:
            p = Path(src)
            if not p.is_dir():
                raise BadRequest(f"Invalid value for pool key 'source' {src!r}: no such directory")
            res = subprocess.run(["stat", "-f", "-c", "%T", src], capture_output=True, text=True)
            if res.stdout.strip() != "btrfs":
                raise BadRequest(f"Invalid value for pool key 'source' {src!r}: not on a btrfs filesystem")
            if os.listdir(p):
                raise BadRequest(f"Invalid value for pool key 'source' {src!r}: the directory is not empty")

        await asyncio.to_thread(check)

    def _make_layout(self) -> None:
        self.make_layout()

    async def delete_pool(self) -> None:
        kind = self._source_kind()
        mounted = await asyncio.to_thread(blockutil.mounted, self.mount_path)
        if not mounted and kind != "loop" and self.config.get("source"):
            try:
                await self._mount()
                mounted = True
            except LXDError:
                pass
        if mounted:
            # Every subvolume and directory we made, then the mount.
            for sub in SUBDIRS:
                base = self.mount_path / sub
                for entry in await asyncio.to_thread(_listdir, base):
                    await self._delete_tree(base / entry)
                await asyncio.to_thread(blockutil.remove_empty_dir, base)
            await self._umount()
        if kind == "loop":
            await asyncio.to_thread(self._loop_file().unlink, True)
            await asyncio.to_thread(blockutil.remove_empty_dir, blockutil.disks_dir(self.mount_path))
        await asyncio.to_thread(blockutil.remove_empty_dir, self.mount_path)

    async def mount_pool(self) -> bool:
        did = False
        if not await asyncio.to_thread(blockutil.mounted, self.mount_path):
            if self._source_kind() == "loop" and not await asyncio.to_thread(self._loop_file().is_file):
                raise LXDError(f"The loop file {self._loop_file()} of pool {self.pool_name!r} is missing")
            await self._mount()
            await asyncio.to_thread(self._make_layout)
            did = True
        await self._sweep()
        return did

    async def unmount_pool(self) -> bool:
        if not await asyncio.to_thread(blockutil.mounted, self.mount_path):
            return False
        await blockutil.umount(self.mount_path)
        return True

    async def _sweep(self) -> None:
        """Remove what a killed daemon left half-made (temporary copies, trash, unpack dirs);
        not what this driver is working with right now."""
        for sub in SUBDIRS:
            base = self.mount_path / sub
            for entry in await asyncio.to_thread(_listdir, base):
                if entry.startswith(_HIDDEN) and base / entry not in self._busy:
                    if entry.startswith(_LIVE_SEND):  # a send of the volume was cut short
                        await asyncio.to_thread(_end_live_ro, base / entry[len(_LIVE_SEND):], base / entry)
                    await self._delete_tree(base / entry)

    def _temp(self, vol: Volume, kind: str) -> Path:
        """A hidden path next to `vol`'s type directory, kept from the sweep while in use."""
        path = self.mount_path / vol.type.dir_name / f".{kind}-{vol.storage_name}-{uuid.uuid4().hex[:8]}"
        self._busy.add(path)
        return path

    async def update_pool(self, changed: dict[str, str]) -> None:
        changed = dict(changed)
        if "btrfs.mount_options" in changed:
            opts = changed.pop("btrfs.mount_options") or DEFAULT_MOUNT_OPTIONS
            _check_mount_options(opts)
            if self._source_kind() != "path":
                await run("mount", "-o", f"remount,{opts}", str(self.mount_path))
            self.config["btrfs.mount_options"] = opts
        if "size" in changed and self._source_kind() == "loop":
            new = parse_byte_size(changed.pop("size"))
            path = self._loop_file()
            if new < path.stat().st_size:
                raise BadRequest("A btrfs pool can't be shrunk")
            await asyncio.to_thread(os.truncate, path, new)
            dev = await blockutil.find_loop(path)
            if dev:
                await run("losetup", "-c", dev)
            await run("btrfs", "filesystem", "resize", "max", str(self.mount_path))
            self.config["size"] = str(new)
        await super().update_pool(changed)

    def usage(self) -> dict:
        st = os.statvfs(self.mount_path)
        total = st.f_blocks * st.f_frsize
        used = (st.f_blocks - st.f_bfree) * st.f_frsize
        return {"space": {"used": used, "total": total},
                "inodes": {"used": st.f_files - st.f_ffree, "total": st.f_files}}

    # -- who may enter the pool ----------------------------------------------------------
    def secure_layout(self) -> None:
        # Images are whole volumes here (no per-idmap copies inside): only their roots close.
        root = self.mount_path
        if not root.is_dir():
            return
        os.chmod(root, self.POOL_MODE)
        for sub, mode in self.TYPE_DIR_MODES.items():
            p = root / sub
            p.mkdir(exist_ok=True)
            os.chmod(p, mode)
        for fp in _listdir(root / "images"):
            p = root / "images" / fp
            if not p.is_symlink() and p.is_dir():
                os.chmod(p, self.IMAGE_MODE)

    # -- subvolume primitives --------------------------------------------------------------
    async def _nested(self, path: Path) -> list[str]:
        """Paths (relative to `path`, parents first) of the subvolumes inside subvolume `path`."""
        res = await run("btrfs", "subvolume", "list", "-o", str(path), check=False)
        if res.returncode != 0:
            if not await asyncio.to_thread(_is_subvolume, path):
                return []
            raise ToolError(res)
        rel_self = os.path.relpath(path, self.mount_path)
        out: list[str] = []
        for line in res.stdout.splitlines():
            full = line.split(" path ", 1)[1] if " path " in line else ""
            rel = _strip_prefix(full, rel_self)
            if rel is None:
                continue
            out.append(rel)
            out.extend(f"{rel}/{sub}" for sub in await self._nested(path / rel))
        return sorted(out, key=lambda r: (r.count("/"), r))

    async def _snapshot(self, src: Path, dst: Path, readonly: bool) -> None:
        """Snapshot subvolume `src` (and the subvolumes nested in it) as `dst`."""
        if await asyncio.to_thread(_snapshot_by_ioctl, src, dst, readonly):
            return
        # Listing nested subvolumes runs alongside the snapshot (almost always there are none);
        # when there are, the snapshot shows them as empty directories: put their snapshots there.
        listing = asyncio.ensure_future(self._nested(src))
        try:
            await run("btrfs", "subvolume", "snapshot", *(["-r"] if readonly else []), str(src), str(dst))
        except BaseException:
            listing.cancel()
            await asyncio.gather(listing, return_exceptions=True)
            raise
        try:
            nested = await listing
            if not nested:
                return
            if readonly:
                await self._set_ro(dst, False)
            for rel in nested:
                await asyncio.to_thread(_rmdir_placeholder, dst / rel)
                await run("btrfs", "subvolume", "snapshot", str(src / rel), str(dst / rel))
            if readonly:
                for rel in [*reversed(nested), ""]:
                    await self._set_ro(dst / rel if rel else dst, True)
        except BaseException:
            await self._delete_tree(dst)
            raise

    async def _set_ro(self, path: Path, ro: bool) -> None:
        await run("btrfs", "property", "set", "-f", "-ts", str(path), "ro", "true" if ro else "false")

    async def _delete_subvolume(self, path: Path) -> None:
        """Delete subvolume `path` and every subvolume nested in it (a missing one is fine)."""
        if not await asyncio.to_thread(os.path.lexists, path):
            return
        quota = await self._quota_enabled()
        if not quota:
            # The common case in one ioctl: a subvolume with nothing nested in it.
            if await asyncio.to_thread(_destroy_by_ioctl, path):
                return
            res = await run("btrfs", "subvolume", "delete", str(path), check=False)
            if res.returncode == 0:
                return
            if not await asyncio.to_thread(os.path.lexists, path):
                return
        nested = await self._nested(path)
        qids: list[str] = []
        if await self._quota_enabled():
            for p in [path, *(path / r for r in nested)]:
                res = await run("btrfs", "inspect-internal", "rootid", str(p), check=False)
                if res.returncode == 0 and res.stdout.strip().isdigit():
                    qids.append(f"0/{res.stdout.strip()}")
        if nested:
            for p in [path, *(path / r for r in nested)]:
                if await self._is_ro(p):
                    await self._set_ro(p, False)
            for rel in reversed(nested):
                await run("btrfs", "subvolume", "delete", str(path / rel))
        await run("btrfs", "subvolume", "delete", str(path))
        for q in qids:
            await run("btrfs", "qgroup", "destroy", q, str(self.mount_path), check=False)

    async def _is_ro(self, path: Path) -> bool:
        res = await run("btrfs", "property", "get", "-ts", str(path), "ro")
        return res.stdout.strip() == "ro=true"

    async def _delete_tree(self, path: Path) -> None:
        """Delete whatever is at `path`: a subvolume, or a directory holding subvolumes."""
        if await asyncio.to_thread(_is_subvolume, path):
            await self._delete_subvolume(path)
            return
        if await asyncio.to_thread(lambda: path.is_dir() and not path.is_symlink()):
            for entry in await asyncio.to_thread(_listdir, path):
                await self._delete_tree(path / entry)
            await asyncio.to_thread(blockutil.remove_tree, path)
        elif await asyncio.to_thread(os.path.lexists, path):
            await asyncio.to_thread(path.unlink)

    # -- quotas -------------------------------------------------------------------------------
    async def _quota_enabled(self) -> bool:
        if self._quota_on is None:
            res = await run("btrfs", "qgroup", "show", str(self.mount_path), check=False)
            self._quota_on = res.returncode == 0
        return self._quota_on

    async def _enable_quota(self) -> None:
        if not await self._quota_enabled():
            await run("btrfs", "quota", "enable", str(self.mount_path))
            await run("btrfs", "quota", "rescan", "-W", str(self.mount_path), check=False)
            self._quota_on = True

    async def _qgroup(self, path: Path) -> tuple[int, int | None] | None:
        """(referenced bytes, referenced limit or None) of a subvolume's qgroup."""
        res = await run("btrfs", "qgroup", "show", "-rf", "--raw", str(path), check=False)
        if res.returncode != 0:
            return None
        for line in res.stdout.splitlines():
            parts = line.split()
            if len(parts) >= 4 and re.fullmatch(r"0/\d+", parts[0]):
                limit = None if parts[3] == "none" else int(parts[3])
                return int(parts[1]), limit
        return None

    async def set_volume_quota(self, vol: Volume, size: int | None) -> None:
        path = await self._require(vol)
        if not size:
            if await self._quota_enabled():
                await run("btrfs", "qgroup", "limit", "none", str(path))
            return
        await self._enable_quota()
        try:
            await run("btrfs", "qgroup", "limit", str(size), str(path))
        except ToolError as e:
            raise BadRequest(f"Can't limit volume {vol.name!r} to {size} bytes: {e.message}") from None

    async def _apply_size(self, vol: Volume) -> None:
        size = vol.config.get("size")
        if size:
            try:
                n = parse_byte_size(size)
            except ValueError as e:
                raise BadRequest(f"Invalid value for volume key 'size': {e}") from None
            await self.set_volume_quota(vol, n)

    # -- volumes -----------------------------------------------------------------------------
    async def _require(self, vol: Volume) -> Path:
        path = self.volume_path(vol)
        if not await asyncio.to_thread(_is_subvolume, path):
            kind = "snapshot" if vol.is_snapshot else "volume"
            raise NotFound(f"Storage {kind} {vol.name!r} of type {vol.type.value!r} not found on pool {self.pool_name!r}")
        return path

    def _mode(self, vol: Volume) -> int:
        if vol.type is VolumeType.CUSTOM:
            return self.CUSTOM_MODE
        if vol.type is VolumeType.IMAGE:
            return self.IMAGE_MODE
        return 0o700  # instance volumes are closed to 0100 by the service (secure_instance_volume)

    async def _free(self, vol: Volume, path: Path) -> None:
        if await asyncio.to_thread(os.path.lexists, path):
            raise Conflict(f"Storage volume {vol.name!r} already exists on pool {self.pool_name!r}")
        await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)

    async def has_volume(self, vol: Volume) -> bool:
        return await asyncio.to_thread(_is_subvolume, self.volume_path(vol))

    async def create_volume(self, vol: Volume, filler: Filler | None = None) -> None:
        if vol.is_snapshot:
            raise BadRequest("Use create_snapshot to make a snapshot")
        path = self.volume_path(vol)
        await self._free(vol, path)
        await run("btrfs", "subvolume", "create", str(path))
        try:
            await asyncio.to_thread(os.chmod, path, self._mode(vol))
            await self._apply_size(vol)
            if filler is not None:
                await filler(path)
        except BaseException as e:
            await self._delete_subvolume(path)
            if isinstance(e, OSError) and blockutil_full(e):
                # Give the space back before answering (the cleaner frees it in the background).
                await run("btrfs", "filesystem", "sync", str(self.mount_path), check=False)
                await run("btrfs", "subvolume", "sync", str(self.mount_path), check=False)
                raise InsufficientStorage(f"The storage pool {self.pool_name!r} is full: {e}") from None
            raise

    async def create_volume_from_image(self, vol: Volume, image: Volume) -> None:
        await self.create_volume_from_copy(vol, image)

    async def create_volume_from_copy(self, vol: Volume, src: Volume, *, snapshots: bool = False) -> None:
        if vol.is_snapshot:
            raise BadRequest("Use create_snapshot to make a snapshot")
        src_path = await self._require(src)
        dst = self.volume_path(vol)
        await self._free(vol, dst)
        snaps = await self.list_snapshots(src) if snapshots and not src.is_snapshot else []
        made: list[Path] = []
        try:
            if snaps:
                sdir = self.snapshots_dir(vol)
                await asyncio.to_thread(blockutil.mkdir_mode, sdir, 0o700)
                made.append(sdir)
                for s in snaps:
                    await self._snapshot(self.volume_path(src.snapshot(s)), sdir / s, readonly=True)
            await self._snapshot(src_path, dst, readonly=False)
            made.append(dst)
            if vol.type is not src.type:
                await asyncio.to_thread(os.chmod, dst, self._mode(vol))
            await self._apply_size(vol)
        except BaseException:
            for p in reversed(made):
                await self._delete_tree(p)
            raise

    async def delete_volume(self, vol: Volume) -> None:
        if vol.is_snapshot:
            await self.delete_snapshot(vol)
            return
        sdir = self.snapshots_dir(vol)
        if await asyncio.to_thread(lambda: sdir.is_dir() and bool(os.listdir(sdir))):
            raise LXDError(f"Storage volume {vol.name!r} still has snapshots")
        await self._delete_tree(self.volume_path(vol))
        await asyncio.to_thread(blockutil.remove_empty_dir, sdir)

    async def rename_volume(self, vol: Volume, new_name: str) -> None:
        await self._rename_volume_dirs(vol, new_name, _is_subvolume)

    async def volume_usage(self, vol: Volume) -> int | None:
        path = await self._require(vol)
        if await self._quota_enabled():
            q = await self._qgroup(path)
            if q is not None:
                return q[0]
        res = await run("btrfs", "filesystem", "du", "-s", "--raw", str(path), check=False)
        for line in res.stdout.splitlines()[1:]:
            parts = line.split()
            if parts and parts[0].isdigit():
                return int(parts[0])
        return None

    async def list_volumes(self) -> list[Volume]:
        def walk() -> list[Volume]:
            out: list[Volume] = []
            for vtype in VolumeType:
                base = self.mount_path / vtype.dir_name
                for entry in _listdir(base):
                    if entry.startswith(_HIDDEN) or not _is_subvolume(base / entry):
                        continue
                    out.append(self._decode(vtype, entry))
                sbase = self.mount_path / vtype.snapshots_dir_name
                for entry in _listdir(sbase):
                    if entry.startswith(_HIDDEN):
                        continue
                    parent = self._decode(vtype, entry)
                    for snap in _listdir(sbase / entry):
                        if _is_subvolume(sbase / entry / snap):
                            out.append(parent.snapshot(snap))
            return out

        vols = await asyncio.to_thread(walk)
        # Snapshots oldest first, as list_snapshots orders them.
        order = await self._subvolume_ids()
        return sorted(vols, key=lambda v: (v.type.value, v.project, v.parent_name,
                                           v.is_snapshot, order.get(str(self.volume_path(v)), 0)))

    def _decode(self, vtype: VolumeType, storage_name: str) -> Volume:
        if vtype is not VolumeType.IMAGE and "_" in storage_name:
            project, name = storage_name.split("_", 1)
            return Volume(self.pool_name, vtype, name, project=project)
        return Volume(self.pool_name, vtype, storage_name)

    async def _subvolume_ids(self) -> dict[str, int]:
        """Every subvolume of the pool's filesystem below the pool: host path -> subvolume id
        (ids grow with creation: the order snapshots were made in)."""
        res = await run("btrfs", "subvolume", "list", str(self.mount_path), check=False)
        out: dict[str, int] = {}
        for line in res.stdout.splitlines():
            m = re.match(r"ID (\d+) .* path (.*)$", line)
            if not m:
                continue
            full = m.group(2)
            for sub in SUBDIRS:
                i = _anchor(full, sub)
                if i is not None:
                    out[str(self.mount_path / full[i:])] = int(m.group(1))
                    break
        return out

    # -- snapshots ---------------------------------------------------------------------------
    async def create_snapshot(self, snap: Volume) -> None:
        async def make(src: Path, dst: Path) -> None:
            await self._snapshot(src, dst, readonly=True)

        await self._create_snapshot_entry(snap, self._require, make)

    async def delete_snapshot(self, snap: Volume) -> None:
        path = self.volume_path(snap)
        await self._delete_tree(path)
        await asyncio.to_thread(blockutil.remove_empty_dir, path.parent)

    async def rename_snapshot(self, snap: Volume, new_snapshot_name: str) -> None:
        old = await self._require(snap)
        if "/" in new_snapshot_name or not new_snapshot_name:
            raise BadRequest(f"Invalid snapshot name {new_snapshot_name!r}")
        await self._rename_snapshot_entry(old, snap, new_snapshot_name)

    async def restore_snapshot(self, snap: Volume) -> None:
        tmp = self._temp(snap.parent(), "restore")
        try:
            if not await self._quota_enabled():
                # The common case in one thread hop and three ioctls (no nested subvolumes).
                done = await asyncio.to_thread(self._restore_by_ioctl, snap, tmp)
                if done == "swapped":
                    await self._delete_tree(tmp)  # the old content, which has nested subvolumes
                if done:
                    return
            src = await self._require(snap)
            vol_path = await self._require(snap.parent())
            await self._restore(src, vol_path, tmp)
        finally:
            self._busy.discard(tmp)

    def _restore_by_ioctl(self, snap: Volume, tmp: Path) -> str:
        """Restore without a `btrfs` process: "" when the tool path must do it (nothing was
        changed), "done", or "swapped" when the old content (now at `tmp`) is left to delete."""
        src, vol_path = self.volume_path(snap), self.volume_path(snap.parent())
        for v, p in ((snap, src), (snap.parent(), vol_path)):
            if not _is_subvolume(p):
                kind = "snapshot" if v.is_snapshot else "volume"
                raise NotFound(f"Storage {kind} {v.name!r} of type {v.type.value!r} not found on pool {self.pool_name!r}")
        try:
            if btrfs_ioctl.has_children(str(src)):
                return ""
            btrfs_ioctl.snapshot(str(src), str(tmp), readonly=False)
        except OSError:
            return ""
        try:
            st = os.lstat(vol_path)
            os.chown(tmp, st.st_uid, st.st_gid)
            os.chmod(tmp, st.st_mode & 0o7777)
            # One atomic swap: a crash leaves the old or the new content, and a hidden leftover.
            _exchange(tmp, vol_path)
        except BaseException:
            _destroy_by_ioctl(tmp)
            raise
        return "done" if _destroy_by_ioctl(tmp) else "swapped"

    async def _restore(self, src: Path, vol_path: Path, tmp: Path) -> None:
        limit = None
        if await self._quota_enabled():
            q = await self._qgroup(vol_path)
            limit = q[1] if q else None
        await self._snapshot(src, tmp, readonly=False)
        try:
            st = await asyncio.to_thread(os.lstat, vol_path)
            await asyncio.to_thread(os.chown, tmp, st.st_uid, st.st_gid)
            await asyncio.to_thread(os.chmod, tmp, st.st_mode & 0o7777)
            if limit:
                await run("btrfs", "qgroup", "limit", str(limit), str(tmp))
            # One atomic swap: a crash leaves the old or the new content, and a hidden leftover.
            await asyncio.to_thread(_exchange, tmp, vol_path)
        except BaseException:
            await self._delete_tree(tmp)
            raise
        await self._delete_tree(tmp)  # the old content now

    async def list_snapshots(self, vol: Volume) -> list[str]:
        sdir = self.snapshots_dir(vol.parent())
        names = [n for n in await asyncio.to_thread(_listdir, sdir) if _is_subvolume(sdir / n)]
        if len(names) < 2:
            return names
        ids = await self._subvolume_ids()
        return sorted(names, key=lambda n: (ids.get(str(sdir / n), 0), n))

    # -- send streams (backups and migration) ----------------------------------------------
    async def _plan(self, vol: Volume, snapshots: list[str], frozen: Path) -> tuple[dict, list[tuple[str, list[str]]]]:
        """The optimised header (LXD's `subvolumes` list) and what to send, in order: a list of
        (member name, `btrfs send` argv). `frozen` is a read-only snapshot of the volume."""
        main, snap_dir = _member_prefix(vol)
        subvols: list[dict] = []
        sends: list[tuple[str, list[str]]] = []
        prev: Path | None = None
        live = self.volume_path(vol)
        for name, path, prefix in [*((s, self.volume_path(vol.snapshot(s)), f"{snap_dir}/{s}") for s in snapshots),
                                   ("", frozen, main)]:
            rels = ["/"] + ["/" + r for r in await self._nested(path)]
            for rel in rels:
                sub = path if rel == "/" else path / rel[1:]
                # Snapshots come back read-only; the volume's own subvolumes as they are now.
                ro = True if name else (rel != "/" and await self._is_ro(live / rel[1:]))
                subvols.append({"path": rel, "snapshot": name, "readonly": ro})
                argv = ["btrfs", "send", "-q"]
                parent = prev if rel == "/" else (prev / rel[1:] if prev else None)
                if parent is not None and await asyncio.to_thread(_is_subvolume, parent) and await self._is_ro(parent):
                    argv += ["-p", str(parent)]
                argv.append(str(sub))
                member = prefix if rel == "/" else f"{prefix}_{_path_encode(rel[1:])}"
                sends.append((f"backup/{member}.bin", argv))
            prev = path
        return {"subvolumes": subvols}, sends

    async def _frozen(self, vol: Volume) -> Path:
        """A read-only snapshot of `vol` in a hidden place, to send from."""
        src = await self._require(vol)
        tmp = self._temp(vol, "send")
        try:
            await self._snapshot(src, tmp, readonly=True)
        except BaseException:
            self._busy.discard(tmp)
            raise
        return tmp

    async def _drop_frozen(self, path: Path) -> None:
        try:
            await self._delete_tree(path)
        finally:
            self._busy.discard(path)

    # backup_volume_optimized(live=True) sends a volume that does not change meanwhile (a stopped
    # instance's, its lock held) from where it is, made read-only for the time of the send,
    # instead of from a fresh read-only snapshot: the data is then read through the volume's
    # own page cache (a snapshot's files are other inodes, whose pages all come from the disk:
    # 500 MB cost ~0.4 s more). A marker (`.sendro-<vol>`, made before the flag is set and
    # removed after it is cleared; the flag's transaction commits the marker too) lets the
    # start-up sweep make the volume writable again after a crash.
    sends_live = True

    async def _live_source(self, vol: Volume) -> tuple[Path, Path] | None:
        """(volume path, marker) with the volume made read-only, or None (nested subvolumes, or
        already read-only: a snapshot is sent then)."""
        path = self.volume_path(vol)
        marker = path.parent / f"{_LIVE_SEND}{path.name}"
        self._busy.add(marker)
        try:
            done = await asyncio.to_thread(_make_live_ro, path, marker)
        except BaseException:
            self._busy.discard(marker)
            raise
        if not done:
            self._busy.discard(marker)
            return None
        return path, marker

    async def _end_live(self, path: Path, marker: Path) -> None:
        try:
            await asyncio.to_thread(_end_live_ro, path, marker)
        finally:
            self._busy.discard(marker)

    @contextlib.asynccontextmanager
    async def optimized_sends(self, vol: Volume, snapshots: list[str],
                              live: bool = False) -> AsyncIterator[tuple[bytes, list[tuple[str, list[str]]]]]:
        """`backup/optimized_header.yaml`'s bytes and the streams of an optimised backup of `vol`,
        (member name, `btrfs send` argv) in order, sendable (and sent alike, run after run) until
        the context ends: what they send is held read-only meanwhile (see sends_live)."""
        held = await self._live_source(vol) if live else None
        source = held[0] if held is not None else await self._frozen(vol)
        try:
            header, sends = await self._plan(vol, snapshots, source)
            yield yaml.safe_dump(header, sort_keys=False).encode(), sends
        finally:
            if held is not None:
                await self._end_live(*held)
            else:
                await self._drop_frozen(source)

    async def backup_volume_optimized(self, vol: Volume, snapshots: list[str], out: BinaryIO,
                                      live: bool = False) -> list[str]:
        async with self.optimized_sends(vol, snapshots, live) as (data, sends):
            members = blockutil.TarMembers(out, self.mount_path.parent.parent / "backups")
            await asyncio.to_thread(_add_bytes, members.tar, "backup/optimized_header.yaml", data)
            names = ["backup/optimized_header.yaml"]
            for member, argv in sends:
                await members.add_from_tool(member, *argv)
                names.append(member)
            return names

    async def restore_volume_optimized(self, vol: Volume, snapshots: list[str],
                                       member: Callable[[str], BinaryIO]) -> None:
        main, snap_dir = _member_prefix(vol)
        try:
            f = member("backup/optimized_header.yaml")
            header = yaml.safe_load(f.read()) or {}
        except (KeyError, FileNotFoundError):
            header = {}
        subvols = header.get("subvolumes") or (
            [{"path": "/", "snapshot": s, "readonly": True} for s in snapshots]
            + [{"path": "/", "snapshot": "", "readonly": False}])
        items = []
        for sv in subvols:
            name, rel = sv.get("snapshot") or "", sv.get("path") or "/"
            if name and name not in snapshots:
                continue
            _check_rel(rel)
            prefix = f"{snap_dir}/{name}" if name else main
            mname = prefix if rel == "/" else f"{prefix}_{_path_encode(rel.lstrip('/'))}"
            items.append((name, rel, bool(sv.get("readonly")), f"backup/{mname}.bin"))

        async def receive(idx: int, mname: str, into: Path) -> None:
            try:
                f = member(mname)
            except (KeyError, FileNotFoundError):
                raise BadRequest(f"The backup has no member {mname}") from None
            if hasattr(f, "pipe_into"):  # an upload's member: fed from a thread, no copy in the loop
                await run_fed("btrfs", "receive", "-C", "-e", str(into), feed=f.pipe_into)
            else:
                await run_stream("btrfs", "receive", "-C", "-e", str(into), source=blockutil.file_chunks(f))

        await self._receive_all(vol, snapshots, items, receive)

    async def _receive_all(self, vol: Volume, snapshots: list[str],
                           items: list[tuple[str, str, bool, str]],
                           receive: Callable[[int, str, Path], Awaitable[None]]) -> None:
        """Receive every subvolume (snapshots oldest first, then the volume) into a hidden
        directory, then put them in place as snapshots of what was received (so the received
        subvolumes, parents of the later incremental streams, stay as they came until the end)."""
        dst = self.volume_path(vol)
        await self._free(vol, dst)
        sdir = self.snapshots_dir(vol)
        if snapshots and await asyncio.to_thread(os.path.lexists, sdir):
            raise Conflict(f"Snapshots of storage volume {vol.name!r} already exist on pool {self.pool_name!r}")
        work = self._temp(vol, "recv")
        try:
            await self._receive_into(vol, snapshots, items, receive, dst, sdir, work)
        finally:
            self._busy.discard(work)

    async def _receive_into(self, vol: Volume, snapshots: list[str], items: list[tuple[str, str, bool, str]],
                            receive: Callable[[int, str, Path], Awaitable[None]], dst: Path, sdir: Path,
                            work: Path) -> None:
        await asyncio.to_thread(blockutil.mkdir_mode, work, 0o700)
        made: list[Path] = []
        try:
            received: dict[tuple[str, str], tuple[Path, bool]] = {}
            for idx, (name, rel, ro, mname) in enumerate(items):
                into = work / str(idx)
                await asyncio.to_thread(into.mkdir)
                await receive(idx, mname, into)
                got = await asyncio.to_thread(_listdir, into)
                if len(got) != 1 or not _is_subvolume(into / got[0]):
                    raise BadRequest(f"The optimised stream {mname} did not hold one subvolume")
                received[(name, rel)] = (into / got[0], ro)
            if snapshots:
                await asyncio.to_thread(blockutil.mkdir_mode, sdir, 0o700)
                made.append(sdir)
            for name in [*snapshots, ""]:
                parts = {rel: v for (n, rel), v in received.items() if n == name}
                if "/" not in parts:
                    raise BadRequest(f"The optimised backup has no stream for {'snapshot ' + name if name else 'the volume'}")
                target = sdir / name if name else dst
                made.append(target)
                await self._place(parts, target, readonly=bool(name))
            await asyncio.to_thread(os.chmod, dst, self._mode(vol))
        except BaseException as e:
            for p in reversed(made):
                await self._delete_tree(p)
            await self._delete_tree(work)
            if isinstance(e, ToolError) and blockutil.no_space(e):
                raise InsufficientStorage(f"The storage pool {self.pool_name!r} is full: {e.message}") from None
            raise
        await self._delete_tree(work)
        await self._apply_size(vol)

    async def _place(self, parts: dict[str, tuple[Path, bool]], target: Path, readonly: bool) -> None:
        """Put what was received in place. The volume itself, when it is one subvolume, is made
        writable (its received UUID cleared, as `btrfs property set -f` does) and moved there: a
        snapshot of it would first write all its data out (~0.3 s for 500 MB). Snapshots, and
        nested subvolumes, are assembled from snapshots."""
        if len(parts) == 1 and not readonly:
            root, _ = parts["/"]
            await self._set_ro(root, False)
            await asyncio.to_thread(os.rename, root, target)
            return
        await self._assemble(parts, target, readonly)

    async def _assemble(self, parts: dict[str, tuple[Path, bool]], target: Path, readonly: bool) -> None:
        root, _ = parts["/"]
        nested = sorted((r for r in parts if r != "/"), key=lambda r: (r.count("/"), r))
        if not nested:
            await run("btrfs", "subvolume", "snapshot", *(["-r"] if readonly else []), str(root), str(target))
            return
        await run("btrfs", "subvolume", "snapshot", str(root), str(target))
        for rel in nested:
            where = target / rel.lstrip("/")
            await asyncio.to_thread(_rmdir_placeholder, where)
            await run("btrfs", "subvolume", "snapshot", str(parts[rel][0]), str(where))
        for rel in reversed(nested):
            if readonly or parts[rel][1]:
                await self._set_ro(target / rel.lstrip("/"), True)
        if readonly:
            await self._set_ro(target, True)

    # -- migration -------------------------------------------------------------------------
    # The stream: frames of a 4-byte big-endian length and that many bytes. The first frame is
    # a JSON header {"subvolumes": [...], "members": [...]}; then, for each member in order, its
    # `btrfs send` stream as frames, ended by an empty frame.
    async def send_volume(self, vol: Volume, snapshots: list[str], transport: str,
                          write: Callable[[bytes], Awaitable[None]]) -> None:
        if transport != TRANSPORT:
            raise BadRequest(f"The btrfs driver can't send in {transport!r}")
        frozen = await self._frozen(vol)
        try:
            header, sends = await self._plan(vol, snapshots, frozen)
            header["members"] = [m for m, _ in sends]
            await _frame(write, json.dumps(header).encode())
            for _, argv in sends:
                async def sink(chunk: bytes) -> None:
                    await _frame(write, chunk)

                await run_stream(*argv, sink=sink)
                await _frame(write, b"")
        finally:
            await self._drop_frozen(frozen)

    async def receive_volume(self, vol: Volume, snapshots: list[str], transport: str,
                             chunks: AsyncIterator[bytes]) -> None:
        if transport != TRANSPORT:
            raise BadRequest(f"The btrfs driver can't receive {transport!r}")
        reader = _FrameReader(chunks)
        try:
            header = json.loads(await reader.frame())
            subvols, members = header["subvolumes"], header["members"]
            if len(subvols) != len(members):
                raise ValueError("header mismatch")
        except (ValueError, KeyError, TypeError, EOFError) as e:
            raise BadRequest(f"Invalid btrfs migration stream header: {e}") from None
        items = []
        for sv, mname in zip(subvols, members, strict=True):
            name, rel = sv.get("snapshot") or "", sv.get("path") or "/"
            _check_rel(rel)
            items.append((name, rel, bool(sv.get("readonly")), mname))
        wanted = {name for name, *_ in items if name}
        if set(snapshots) - wanted:
            raise BadRequest(f"The stream lacks snapshots {sorted(set(snapshots) - wanted)}")
        # Members of snapshots not asked for are still received (incremental parents), then dropped.
        order = [s for s in dict.fromkeys(name for name, *_ in items if name)]

        async def receive(idx: int, mname: str, into: Path) -> None:
            try:
                await run_stream("btrfs", "receive", "-C", "-e", str(into), source=reader.member())
            except EOFError as e:
                raise BadRequest(f"Invalid btrfs migration stream: {e}") from None

        await self._receive_all(vol, order, items, receive)
        for s in order:
            if s not in snapshots:
                await self.delete_snapshot(vol.snapshot(s))


class _FrameReader:
    def __init__(self, chunks: AsyncIterator[bytes]):
        self._it = chunks.__aiter__()
        self._buf = bytearray()

    async def _need(self, n: int) -> bytes:
        while len(self._buf) < n:
            try:
                self._buf.extend(await self._it.__anext__())
            except StopAsyncIteration:
                raise EOFError("the stream ended early") from None
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def frame(self) -> bytes:
        (n,) = struct.unpack(">I", await self._need(4))
        return await self._need(n)

    async def member(self) -> AsyncIterator[bytes]:
        while True:
            data = await self.frame()
            if not data:
                return
            yield data


async def _frame(write: Callable[[bytes], Awaitable[None]], data: bytes) -> None:
    await write(struct.pack(">I", len(data)) + data)


def _check_rel(rel: str) -> None:
    if not rel.startswith("/") or any(p in ("..", ".") for p in rel.split("/")):
        raise BadRequest(f"Invalid subvolume path {rel!r} in the optimised header")


def _add_bytes(tar, name: str, data: bytes) -> None:
    import io
    import tarfile

    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _anchor(full: str, sub: str) -> int | None:
    """Where the pool-relative part (`<sub>/...`) of a path from the filesystem top begins."""
    if full.startswith(sub + "/"):
        return 0
    i = full.find("/" + sub + "/")
    return None if i < 0 else i + 1


def _strip_prefix(full: str, rel_self: str) -> str | None:
    """`full` (a path from the filesystem top) relative to the subvolume whose pool-relative
    path is `rel_self`."""
    if full.startswith(rel_self + "/"):
        return full[len(rel_self) + 1:]
    i = full.find("/" + rel_self + "/")
    return None if i < 0 else full[i + len(rel_self) + 2:]


def _exchange(a: Path, b: Path) -> None:
    """Swap two paths atomically (renameat2 with RENAME_EXCHANGE)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.renameat2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(-100, os.fsencode(a), -100, os.fsencode(b), 2) != 0:  # AT_FDCWD, RENAME_EXCHANGE
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(a))


def _rmdir_placeholder(path: Path) -> None:
    """A snapshot shows a nested subvolume as an empty directory: make room for its snapshot."""
    try:
        path.rmdir()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)


def _listdir(path: Path) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except (FileNotFoundError, NotADirectoryError):
        return []




def blockutil_full(e: OSError) -> bool:
    import errno

    return e.errno in (errno.ENOSPC, errno.EDQUOT)
