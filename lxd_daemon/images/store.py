"""The image files under $LXD_DIR/images, content-addressed by fingerprint.

`<fp>` is the unified tarball or a split image's metadata tarball; `<fp>.rootfs` is a split image's
root filesystem. Work in progress lives in `tmp-*` files and directories next to them and is renamed into place
only once complete, so a crash leaves nothing but `tmp-*` entries (and, at worst, a file whose
database row was never written); `cleanup()` removes both at start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger("lxd.images")

FINGERPRINT_RE = re.compile(r"^[0-9a-f]{64}$")
TMP_PREFIX = "tmp-"
CHUNK = 1 << 20


class ImageStore:
    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, fingerprint: str) -> Path:
        return self.root / fingerprint

    def rootfs_path(self, fingerprint: str) -> Path:
        return self.root / f"{fingerprint}.rootfs"

    def exists(self, fingerprint: str) -> bool:
        return self.path(fingerprint).exists()

    def new_tempfile(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=TMP_PREFIX, dir=self.root)
        os.close(fd)
        return Path(name)

    def new_workdir(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=self.root))

    def install(self, fingerprint: str, meta: Path, rootfs: Path | None) -> None:
        """Move finished files into place by rename (the rootfs first, then the file that marks it whole).

        No fsync, like LXD: an image survives a daemon crash (the page cache does), and the database
        runs with synchronous=NORMAL, which gives the same guarantee. A power loss can lose the
        newest images; flushing 200 MB on every import would cost far more than it protects.
        """
        if rootfs is not None:
            os.replace(rootfs, self.rootfs_path(fingerprint))
        os.replace(meta, self.path(fingerprint))

    def remove(self, fingerprint: str) -> None:
        for p in (self.path(fingerprint), self.rootfs_path(fingerprint)):
            try:
                p.unlink()
            except FileNotFoundError:
                pass

    def retire(self, fingerprint: str) -> list[Path]:
        """Rename an image's files out of the way (fast); the caller unlinks them later, which for a
        big file that is still being written back can take a while. Leftovers are `tmp-*` entries,
        removed at start-up."""
        moved = []
        for p in (self.path(fingerprint), self.rootfs_path(fingerprint)):
            target = self.root / f"{TMP_PREFIX}deleted-{p.name}-{os.urandom(4).hex()}"
            try:
                os.rename(p, target)
            except FileNotFoundError:
                continue
            moved.append(target)
        return moved

    def cleanup(self, known: set[str]) -> list[str]:
        """Remove temp work and files that no database row refers to. Returns what was removed."""
        removed = []
        if not self.root.is_dir():
            return removed
        for entry in os.scandir(self.root):
            name = entry.name
            fp = name.removesuffix(".rootfs")
            if name.startswith(TMP_PREFIX) or (FINGERPRINT_RE.match(fp) and fp not in known):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
                removed.append(name)
        if removed:
            log.info("removed leftover image files", extra={"files": ",".join(sorted(removed))})
        return removed


class HashingWriter:
    """Writes an upload to a file while hashing it. The methods block: call them from threads."""

    def __init__(self, path: Path, hasher=None):
        self.path = path
        self.f = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.hasher = hasher if hasher is not None else hashlib.sha256()
        self.size = 0
        self.head = b""

    def write(self, data: bytes) -> None:
        self.store(data)
        self.hash(data)

    def store(self, data: bytes) -> None:
        self.f.write(data)

    def hash(self, data: bytes) -> None:
        if len(self.head) < 512:
            self.head += data[: 512 - len(self.head)]
        self.hasher.update(data)
        self.size += len(data)

    def close(self) -> None:
        if not self.f.closed:
            self.f.close()


class AsyncSink:
    """Feeds a HashingWriter from the event loop: buffers ~1 MiB, then writes and hashes that block in
    two threads at once, while the next block is received. At most one write and one hash are in
    flight, so memory stays bounded (two blocks) and the file and the hash see blocks in order.
    """

    def __init__(self, writer: HashingWriter):
        self.writer = writer
        self.buf = bytearray()
        self.pending: list[asyncio.Future] = []

    async def write(self, data: bytes) -> None:
        if not self.buf and len(data) >= CHUNK:  # a big piece goes as it is, without a copy
            await self._wait()
            self._start(data)
            return
        self.buf += data
        if len(self.buf) >= CHUNK:
            await self._flush()

    async def _wait(self) -> None:
        pending, self.pending = self.pending, []
        for fut in pending:
            await fut

    async def _flush(self) -> None:
        await self._wait()
        if self.buf:
            block = bytes(self.buf)
            self.buf.clear()
            self._start(block)

    def _start(self, block) -> None:
        """Write and hash one block (never changed afterwards) in two threads at once."""
        loop = asyncio.get_running_loop()
        self.pending = [loop.run_in_executor(None, self.writer.store, block),
                        loop.run_in_executor(None, self.writer.hash, block)]

    async def finish(self) -> None:
        await self._flush()
        await self._wait()
        await asyncio.get_running_loop().run_in_executor(None, self.writer.close)

    async def abort(self) -> None:
        for fut in self.pending:
            try:
                await fut
            except Exception:
                pass
        self.pending = []
        self.writer.close()
