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


async def copy_tree(src: Path, dst: Path, *, into: bool = False) -> None:
    """Copy `src` to `dst`, which must not exist; with `into`, `dst` is an existing directory
    that receives `src`'s content (and its owner, mode and xattrs)."""
    try:
        await run("cp", "-a", "--reflink=auto", "--no-target-directory", "--", str(src), str(dst))
    except ToolError as e:
        if "No space left" in e.result.stderr:
            raise InsufficientStorage(f"No space left on the storage pool: {next(ln for ln in e.result.stderr.splitlines() if 'No space left' in ln).strip()}") from None
        raise


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
