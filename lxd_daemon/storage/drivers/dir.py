"""The `dir` driver: volumes are plain directories under the pool; copies use reflinks when the
filesystem has them (cp --reflink=auto), else a full copy."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

from lxd_daemon.errors import LXDError
from lxd_daemon.storage.drivers.base import Driver

SUBDIRS = ("containers", "containers-snapshots", "custom", "custom-snapshots", "images",
           "virtual-machines", "virtual-machines-snapshots")


async def _run(*argv: str) -> None:
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise LXDError(f"{argv[0]} failed: {err.decode(errors='replace').strip()}")


class DirDriver(Driver):
    name = "dir"
    version = "1"

    async def create_pool(self) -> None:
        def mk() -> None:
            self.mount_path.mkdir(parents=True, exist_ok=True)
            os.chmod(self.mount_path, self.POOL_MODE)
            for sub in SUBDIRS:
                p = self.mount_path / sub
                p.mkdir(exist_ok=True)
                os.chmod(p, self.TYPE_DIR_MODES.get(sub, 0o700))

        await asyncio.to_thread(mk)

    async def delete_pool(self) -> None:
        await self.delete_tree(self.mount_path)

    async def copy_tree(self, src: Path, dst: Path) -> None:
        if dst.exists():
            raise LXDError(f"Copy target {dst} already exists")
        await _run("cp", "-a", "--reflink=auto", "--", str(src), str(dst))

    async def delete_tree(self, path: Path) -> None:
        if not path.exists() and not path.is_symlink():
            return
        if path.is_symlink() or not path.is_dir():
            path.unlink(missing_ok=True)
            return
        # rm(1), not shutil.rmtree: a big tree would hold the daemon's GIL for its whole walk.
        try:
            await _run("rm", "-rf", "--one-file-system", "--", str(path))
        except LXDError:
            await asyncio.to_thread(_rmtree, path)  # e.g. read-only directories inside

    def usage(self) -> dict:
        st = os.statvfs(self.mount_path)
        total = st.f_blocks * st.f_frsize
        used = (st.f_blocks - st.f_bfree) * st.f_frsize
        return {"space": {"used": used, "total": total},
                "inodes": {"used": st.f_files - st.f_ffree, "total": st.f_files}}


def _rmtree(path: Path) -> None:
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
