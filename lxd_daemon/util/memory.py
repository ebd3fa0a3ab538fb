"""Giving back the memory a burst of work left behind.

Two things keep it resident after the work is done:

- Cyclic garbage. Python frees reference cycles only in collections that come with allocations,
  the oldest generation's rarely: what a burst of requests left in cycles (a websocket's parser
  generator refers to its protocol object, for one) waits, idle, for more work.
- glibc's malloc. After the first large buffer is freed it raises its mmap threshold, so later
  1-4 MiB buffers (a file transfer's chunks) come from a heap, and a heap only shrinks from its
  top: four rounds of 100 MiB file transfers left ~10 MiB resident.

`MemoryReclaimer` runs a full collection (a few ms with the start-up objects frozen, see
daemon._freeze_startup_objects) and malloc_trim(0), which hands the free pages of every malloc
arena back: as soon as the daemon goes quiet after some work, and every few seconds during long
work; never while it stays idle. Live data is untouched; without glibc only the collection runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import time

log = logging.getLogger("lxd.memory")
PAGE = os.sysconf("SC_PAGE_SIZE")


M_ARENA_MAX = -8  # mallopt parameter (malloc.h)
ARENAS = 2


def limit_malloc_arenas(n: int = ARENAS) -> None:
    """Let at most n malloc arenas serve the daemon's threads (call before any thread starts).

    glibc gives threads arenas of their own, up to 8 per CPU; each keeps what its thread freed in
    the middle of its heap. The daemon's threads (database, scans, body readers, executor) left
    9 MiB resident that way after a dozen image imports and exports, 2 MiB with two arenas, at
    the same speed: most of their allocations happen under the GIL anyway."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(M_ARENA_MAX, n)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


class _Glibc:
    """malloc_trim and mallinfo2, when glibc is the allocator."""

    def __init__(self):
        try:
            libc = ctypes.CDLL(None)
            self._trim, self._info = libc.malloc_trim, libc.mallinfo2
        except (OSError, AttributeError):  # not glibc (2.33 or later)
            self._trim = self._info = None
            return
        self._trim.argtypes = [ctypes.c_size_t]
        self._trim.restype = ctypes.c_int
        self._info.argtypes = []
        self._info.restype = _MallInfo2

    def trim(self) -> None:
        if self._trim is not None:
            self._trim(0)

    def in_use(self) -> int:
        """Bytes allocated with malloc and not freed yet (heaps and mmapped chunks)."""
        if self._info is None:
            return 0
        info = self._info()
        return info.uordblks + info.hblkhd


def resident_bytes() -> int:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * PAGE


class MemoryReclaimer:
    """Looks every `tick` seconds whether the daemon did something: the young generation was
    collected (Python allocations), or malloc's bytes in use or the resident size moved by
    `moved` bytes (large buffers, which the collector does not count, allocated or freed).
    Reclaims on the first quiet tick after some activity, and at most every `busy_every`
    seconds while the activity goes on."""

    def __init__(self, tick: float = 1.0, busy_every: float = 5.0, moved: int = 1 << 20):
        self.tick = tick
        self.busy_every = busy_every
        self.moved = moved
        self.malloc = _Glibc()
        self.last_tick = self.last_reclaim = self.activity()
        self.reclaimed_at = time.monotonic()

    def activity(self) -> tuple[int, int, int]:
        """(young collections so far, malloc bytes in use, resident bytes)."""
        return gc.get_stats()[0]["collections"], self.malloc.in_use(), resident_bytes()

    def _differs(self, a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
        return a[0] != b[0] or abs(a[1] - b[1]) >= self.moved or abs(a[2] - b[2]) >= self.moved

    def check(self, now: float | None = None) -> bool:
        """One tick; returns whether it reclaimed."""
        now = time.monotonic() if now is None else now
        current = self.activity()
        busy = self._differs(current, self.last_tick)
        self.last_tick = current
        if not self._differs(current, self.last_reclaim):
            return False  # nothing happened since the last reclaim
        if busy and now - self.reclaimed_at < self.busy_every:
            return False  # still working
        self.reclaim()
        # Measured after its own work, which is not the daemon's activity.
        self.last_tick = self.last_reclaim = self.activity()
        self.reclaimed_at = now
        return True

    def reclaim(self) -> None:
        start, before = time.perf_counter(), resident_bytes()
        gc.collect()
        self.malloc.trim()
        log.debug("memory reclaimed", extra={"ms": round(1e3 * (time.perf_counter() - start), 2),
                                             "freed_kib": (before - resident_bytes()) >> 10})

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.tick)
            self.check()
