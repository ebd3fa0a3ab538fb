"""Directory trees on the host: copy (everything `cp -a` keeps, reflinks where the filesystem has
them) and remove, through tools.run and without blocking the event loop or holding the GIL for a
big walk. Used by the dir driver and by the image caches of drivers without optimised images."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

from lxd_daemon.errors import InsufficientStorage, LXDError
from lxd_daemon.storage.drivers.tools import ToolError, run


def _no_space(e: ToolError) -> InsufficientStorage | None:
    """A tool's ENOSPC as the pool's 507, naming the tool's own line about it."""
    line = next((ln for ln in e.result.stderr.splitlines() if "No space left" in ln), None)
    return InsufficientStorage(f"No space left on the storage pool: {line.strip()}") if line else None


async def copy_tree(src: Path, dst: Path, *, into: bool = False) -> None:
    """Copy `src` to `dst`, which must not exist; with `into`, `dst` is an existing directory
    that receives `src`'s content (and its owner, mode and xattrs)."""
    try:
        await run("cp", "-a", "--reflink=auto", "--no-target-directory", "--", str(src), str(dst))
    except ToolError as e:
        raise _no_space(e) or e from None


async def sync_tree(src: Path, dst: Path) -> None:
    """Make the existing directory `dst` hold what `src` holds (owners, modes, xattrs, ACLs,
    hard links, device nodes), copying only what differs and removing what `src` lacks
    (instance copies between pools and `copy --refresh`)."""
    try:
        # --checksum: a file changed within the same second keeps its size and mtime (as LXD does).
        await run("rsync", "-aHAX", "--numeric-ids", "--delete", "--checksum", "--", f"{src}/", f"{dst}/")
    except ToolError as e:
        raise _no_space(e) or e from None


FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)


def can_reflink(directory: Path) -> bool:
    """Whether files in `directory` can be cloned sharing their blocks (FICLONE: btrfs, xfs
    with reflink, ...); probed with two temporary files, removed again. Blocking."""
    import fcntl
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=directory) as a, tempfile.TemporaryFile(dir=directory) as b:
            a.write(b"x" * 4096)
            a.flush()
            fcntl.ioctl(b.fileno(), FICLONE, a.fileno())
            return True
    except OSError:
        return False


async def remove_tree(path: Path) -> None:
    """Remove a tree (or a file, or a symlink); missing is fine."""
    if not os.path.lexists(path):
        return
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
        return
    try:
        await run("rm", "-rf", "--one-file-system", "--", str(path))
    except LXDError:
        pass
    if os.path.lexists(path):
        await asyncio.to_thread(rmtree, path)  # e.g. read-only directories inside


def rmtree(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
        return

    def onerror(func, p, exc_info):
        # Immutable or read-only directories inside a container: make them writable and retry.
        try:
            os.chmod(os.path.dirname(p), 0o700)
            func(p)
        except FileNotFoundError:
            pass

    shutil.rmtree(path, onerror=onerror)
