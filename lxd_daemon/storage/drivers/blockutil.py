"""Helpers shared by the drivers whose pools live on loop files or block devices (lvm, zfs):
loop files and devices, filesystems on block volumes, mount points, and byte streams for
send/receive. Every tool call goes through tools.run / tools.run_stream."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import BinaryIO

from lxd_daemon.errors import BadRequest, InsufficientStorage, LXDError
from lxd_daemon.storage.drivers import tools
from lxd_daemon.util.lazy import lazy_module

tarfile = lazy_module("tarfile")  # only backups write tarballs

GiB = 1024 ** 3
CHUNK = 1 << 20

# Where a mount is looked up; tests whose tools are simulated replace this.
is_mountpoint: Callable[[str], bool] = os.path.ismount


def mounted(path: Path) -> bool:
    # Looked up through the module on every call so that a replacement takes effect.
    import lxd_daemon.storage.drivers.blockutil as me

    return me.is_mountpoint(str(path))


def truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("true", "1", "yes", "on")


def check_bool(value: str) -> None:
    if value.strip().lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off", ""):
        raise ValueError(f"Invalid value for a boolean: {value!r}")


# -- loop files -----------------------------------------------------------------------------
def disks_dir(mount_path: Path) -> Path:
    """$LXD_DIR/disks, where LXD keeps the loop files of the pools it creates."""
    return mount_path.parent.parent / "disks"


def loop_file(mount_path: Path, pool_name: str) -> Path:
    return disks_dir(mount_path) / f"{pool_name}.img"


def default_loop_size(where: Path) -> int:
    """LXD's default for a loop-backed pool: a fifth of the free space, between 5 and 30 GiB,
    in whole GiB."""
    try:
        st = os.statvfs(where if where.exists() else where.parent)
        free = st.f_bavail * st.f_frsize
    except OSError:
        free = 0
    size = max(5 * GiB, min(30 * GiB, free // 5))
    return size // GiB * GiB


def make_sparse_file(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


_LOSETUP_J = re.compile(r"^(/dev/loop\d+):")


async def find_loop(path: Path) -> str | None:
    """The loop device already attached to `path`, if any (`losetup -j`)."""
    res = await tools.run("losetup", "-j", str(path), check=False)
    if res.returncode != 0:
        return None
    for line in res.stdout.splitlines():
        m = _LOSETUP_J.match(line.strip())
        if m:
            return m.group(1)
    return None


async def attach_loop(path: Path) -> str:
    """Attach `path` to a loop device (re-using one already attached); returns the device."""
    dev = await find_loop(path)
    if dev:
        return dev
    res = await tools.run("losetup", "--find", "--show", str(path))
    dev = res.stdout.strip()
    if not dev.startswith("/dev/loop"):
        raise LXDError(f"losetup gave no loop device for {path}: {res.stdout.strip()!r}")
    return dev


async def detach_loop(path: Path) -> None:
    dev = await find_loop(path)
    if dev:
        await tools.run("losetup", "-d", dev, check=False)


def is_block_device(path: str) -> bool:
    import stat

    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


# -- filesystems on block volumes -----------------------------------------------------------
BLOCK_FILESYSTEMS = ("ext4", "xfs")


async def mkfs(dev: str, fs: str) -> None:
    """Make the filesystem as LXD does (ext4 zeroes its tables now, not lazily after mount)."""
    argv = [f"mkfs.{fs}"]
    if fs == "ext4":
        argv += ["-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0"]
    argv.append(dev)
    await tools.run(*argv)


async def grow_fs(fs: str, dev: str, mount_path: Path) -> None:
    if fs == "xfs":
        await tools.run("xfs_growfs", str(mount_path))
    else:
        await tools.run("resize2fs", dev)


async def shrink_fs(fs: str, dev: str, size: int) -> None:
    """Shrink an unmounted ext4 filesystem to `size` bytes (xfs can't shrink)."""
    if fs == "xfs":
        raise BadRequest("Filesystem \"xfs\" cannot be shrunk")
    res = await tools.run("e2fsck", "-f", "-y", dev, check=False)
    if res.returncode not in (0, 1):  # 1: errors were corrected, fine
        raise tools.ToolError(res)
    await tools.run("resize2fs", dev, f"{size // 1024}K")


async def mount(dev: str, path: Path, fstype: str, options: str = "") -> None:
    argv = ["mount", "-t", fstype]
    if options:
        argv += ["-o", options]
    argv += [dev, str(path)]
    await tools.run(*argv)


async def umount(path: Path) -> None:
    res = await tools.run("umount", str(path), check=False)
    if res.returncode != 0:
        msg = res.stderr.strip()
        if "busy" in msg:
            from lxd_daemon.errors import Conflict

            raise Conflict(f"Volume at {path} is in use: {msg}")
        raise tools.ToolError(res)


def no_space(err: tools.ToolError) -> bool:
    text = (err.result.stderr + err.result.stdout).lower()
    return any(s in text for s in ("insufficient free space", "out of space", "no space left",
                                    "not enough space", "insufficient suitable allocatable extents"))


def translate(err: tools.ToolError, what: str) -> LXDError:
    """A tool's failure as the error the API shows: a full pool is 507, else 500 with the tool's
    message prefixed by what we were doing."""
    if no_space(err):
        return InsufficientStorage(f"{what}: the storage pool is full ({err.message})")
    return LXDError(f"{what}: {err.message}")


# -- byte streams ---------------------------------------------------------------------------
async def file_chunks(f: BinaryIO) -> AsyncIterator[bytes]:
    while True:
        chunk = await asyncio.to_thread(f.read, CHUNK)
        if not chunk:
            return
        yield chunk


def file_sink(f: BinaryIO):
    async def sink(chunk: bytes) -> None:
        await asyncio.to_thread(f.write, chunk)

    return sink


class TarMembers:
    """Writes members into the backup tarball `out`: a tarfile.TarFile, or a binary file that
    the members are appended to as tar blocks (the caller ends the archive)."""

    def __init__(self, out, spool_dir: Path):
        self.tar = out if hasattr(out, "addfile") else tarfile.TarFile(fileobj=out, mode="w", format=tarfile.PAX_FORMAT)
        self.spool_dir = spool_dir

    async def add_from_tool(self, name: str, *argv: str) -> None:
        """Run a tool writing a stream to stdout, spool it (the tar header needs its size) and add
        it as member `name`. Into an uncompressed tarball file the tool writes straight at the
        member's place instead, and the header is written over its placeholder after."""
        direct = getattr(self.tar.fileobj, "direct_fd", None)
        fd = direct() if direct is not None else None
        if fd is not None:
            await self._add_direct(fd, name, argv)
            return
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=self.spool_dir, prefix=".backup_") as tmp:
            await tools.run_stream(*argv, sink=file_sink(tmp))
            size = tmp.tell()
            tmp.seek(0)
            info = tarfile.TarInfo(name)
            info.size = size
            info.mode = 0o600
            await asyncio.to_thread(self.tar.addfile, info, tmp)

    async def _add_direct(self, fd: int, name: str, argv: tuple[str, ...]) -> None:
        # A GNU header's length depends on the name only (a size past 8 GiB is written in
        # base-256 in the same field), so a placeholder of that length can be replaced in place.
        tar = self.tar
        start = os.lseek(fd, 0, os.SEEK_CUR)

        def header(size: int) -> bytes:
            info = tarfile.TarInfo(name)
            info.size = size
            info.mode = 0o600
            return info.tobuf(tarfile.GNU_FORMAT, tar.encoding, tar.errors)

        hlen = len(header(0))
        await asyncio.to_thread(_write_fd, fd, bytes(hlen))
        await tools.run_to_fd(*argv, fd=fd)

        def finish() -> int:
            end = os.lseek(fd, 0, os.SEEK_CUR)
            size = end - start - hlen
            pad = -size % tarfile.BLOCKSIZE
            _write_fd(fd, bytes(pad))
            hdr = header(size)
            if len(hdr) != hlen:  # pragma: no cover - see above
                raise LXDError(f"The tar header of {name} changed length")
            os.pwrite(fd, hdr, start)
            return hlen + size + pad

        total = await asyncio.to_thread(finish)
        tar.offset += total
        tar.fileobj.advanced(total)


def _write_fd(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def mkdir_mode(path: Path, mode: int) -> None:
    """Make directory `path` (and its parents) with `mode`; an existing one is left as it is."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=mode)
    except FileExistsError:
        return
    os.chmod(path, mode)


def remove_empty_dir(path: Path) -> None:
    try:
        path.rmdir()
    except FileNotFoundError:
        pass
    except OSError:
        pass


def remove_tree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
