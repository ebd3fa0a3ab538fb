"""Scanning an image upload while it arrives.

The safety scan (tarscan.py) has to decompress and walk the whole tarball; run after the upload,
it doubles the time an import takes. UploadScan runs it on threads of its own instead, fed with
the request body's chunks as the event loop receives them, so that decompressing overlaps
receiving, hashing and storing. The event loop only queues chunks; when the threads fall more
than QUEUE_LIMIT bytes behind, the receiver waits, so memory stays bounded for any upload size.

Dedicated threads, not the default executor: a scan lives as long as its upload, and uploads must
never take all of the executor's threads from the work they themselves wait for.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading

from lxd_daemon.errors import BadRequest
from lxd_daemon.images import formats
from lxd_daemon.images.tarscan import ScanResult, StreamScan, Unsupported

QUEUE_LIMIT = 8 << 20  # received bytes not yet decompressed (or walked, when uncompressed)
TAR_PIECES = 8  # decompressed pieces (up to tarscan.STEP bytes each) waiting for the walk
STREAMABLE = frozenset(("gzip", "bzip2", "xz", "lzma", "none"))


class _ScanThreads:
    """An inflating thread and a walking thread joined by a bounded queue of tar bytes: inflating
    runs mostly outside the GIL, so the walk (Python) overlaps it instead of following it. An
    uncompressed upload needs only the walking thread."""

    def __init__(self, compression: str, kind: str):
        self._loop = asyncio.get_running_loop()
        self._input: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._queued = 0
        self._room = asyncio.Event()
        self._room.set()
        self._done: asyncio.Future = self._loop.create_future()
        self._done.add_done_callback(_consume_exception)
        self._aborted = False
        self._inflate_failure: BaseException | None = None
        self._scan = StreamScan(compression, kind)  # raises Unsupported before any thread starts
        if compression == "none":
            self._tar = self._input
        else:
            self._tar = queue.Queue(maxsize=TAR_PIECES)
            threading.Thread(target=self._inflate, name="image-inflate", daemon=True).start()
        threading.Thread(target=self._walk, name="image-scan", daemon=True).start()

    async def feed(self, chunk: bytes) -> None:
        with self._lock:
            self._queued += len(chunk)
            if self._queued > QUEUE_LIMIT:
                self._room.clear()
        self._input.put(chunk)
        if not self._room.is_set():
            await self._room.wait()

    async def finish(self) -> ScanResult:
        self._input.put(None)
        return await self._done

    def abort(self) -> None:
        """Stop scanning (the upload failed); safe from any thread, and more than once."""
        self._aborted = True
        self._input.put(None)

    def _inflate(self) -> None:
        """Input chunks to tar pieces; after a failure it only drains, so the receiver never blocks."""
        failed = False
        while (chunk := self._input.get()) is not None:
            if not failed and not self._aborted:
                try:
                    for piece in self._scan.inflate(chunk):
                        self._tar.put(piece)
                except BaseException as e:  # noqa: BLE001 - reported by the walking thread
                    self._inflate_failure, failed = e, True
            self._release(len(chunk))
        if not failed and not self._aborted:
            try:
                self._scan.end_input()
            except BaseException as e:  # noqa: BLE001
                self._inflate_failure = e
        self._tar.put(None)

    def _walk(self) -> None:
        compressed = self._tar is not self._input
        failure: BaseException | None = None
        while (piece := self._tar.get()) is not None:
            if failure is None and self._aborted:
                failure = BadRequest("Image upload aborted")
            if failure is None and self._inflate_failure is None:
                try:
                    self._scan.walk(piece)
                except BaseException as e:  # noqa: BLE001 - keep draining; the inflater must not block
                    failure = e
            if not compressed:
                self._release(len(piece))
        result = None
        failure = self._inflate_failure or failure  # corrupt data explains whatever the walk saw
        if failure is None:
            try:
                result = self._scan.finish_walk()
            except BaseException as e:  # noqa: BLE001
                failure = e
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            self._loop.call_soon_threadsafe(_settle, self._done, result, failure)

    def _release(self, n: int) -> None:
        with self._lock:
            self._queued -= n
            wake = self._queued <= QUEUE_LIMIT
        if wake and not self._room.is_set():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._room.set)


def _settle(fut: asyncio.Future, result, failure) -> None:
    if fut.done():
        return
    if failure is not None:
        fut.set_exception(failure)
    else:
        fut.set_result(result)


def _consume_exception(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()  # an aborted scan's error is expected and of no interest


class UploadScan:
    """The scan of one tarball upload (kind as in tarscan: unified, meta or rootfs), fed chunk by chunk.

    It starts its thread once the first 512 bytes tell the compression. Uploads it cannot scan as
    they stream (zstd, squashfs, unknown formats) are left to the check after the upload:
    `finish()` then answers None, as it does when the tarball holds members only tarfile reads.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._head = bytearray()
        self._thread: _ScanThreads | None = None
        self._off = False

    async def feed(self, chunk: bytes) -> None:
        if self._thread is not None:
            await self._thread.feed(chunk)
            return
        if self._off:
            return
        self._head += chunk
        if len(self._head) >= 512:
            await self._start()

    async def _start(self) -> None:
        head, self._head = bytes(self._head), bytearray()
        try:
            compression = formats.detect_compression(head[:512])
        except BadRequest:
            compression = ""
        if compression not in STREAMABLE:
            self._off = True
            return
        try:
            self._thread = _ScanThreads(compression, self.kind)
        except Unsupported:
            self._off = True
            return
        await self._thread.feed(head)

    async def finish(self) -> ScanResult | None:
        """The scan's result; None when it has to be done from the stored file. Raises BadRequest."""
        if self._thread is None and not self._off and self._head:
            await self._start()  # an upload of under 512 bytes
        if self._thread is None:
            return None
        try:
            return await self._thread.finish()
        except Unsupported:
            return None

    def abort(self) -> None:
        if self._thread is not None:
            self._thread.abort()
