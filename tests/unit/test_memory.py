"""The daemon's memory reclaimer: when it collects garbage and trims malloc."""

from __future__ import annotations

from lxd_daemon.util.memory import MemoryReclaimer, resident_bytes

MiB = 1 << 20


def reclaimer():
    """A reclaimer on a fake clock and fake activity counters; returns it, the counters, the calls."""
    r = MemoryReclaimer(busy_every=5.0, moved=MiB)
    state = {"activity": (0, 50 * MiB, 100 * MiB)}
    calls: list[float] = []
    r.activity = lambda: state["activity"]
    r.reclaim = lambda: calls.append(1)
    r.last_tick = r.last_reclaim = state["activity"]
    r.reclaimed_at = 0.0
    return r, state, calls


def test_idle_daemon_is_left_alone():
    r, state, calls = reclaimer()
    for t in range(1, 30):
        assert not r.check(float(t))
    state["activity"] = (0, 50 * MiB + 4096, 100 * MiB + 4096)  # a page more or less is not work
    assert not r.check(31.0)
    assert calls == []


def test_reclaims_once_the_daemon_goes_quiet_after_work():
    r, state, calls = reclaimer()
    state["activity"] = (3, 54 * MiB, 104 * MiB)  # young collections and growth: busy
    assert not r.check(1.0)
    state["activity"] = (5, 55 * MiB, 105 * MiB)
    assert not r.check(2.0)
    assert r.check(3.0)  # no change since the last tick: quiet
    assert calls == [1]
    assert not r.check(4.0) and not r.check(10.0)


def test_large_buffers_count_as_work_without_any_young_collection():
    r, state, calls = reclaimer()
    state["activity"] = (0, 50 * MiB, 120 * MiB)  # allocated
    assert not r.check(1.0)
    assert r.check(2.0)
    state["activity"] = (0, 30 * MiB, 120 * MiB)  # freed: resident until trimmed
    assert not r.check(3.0)
    assert r.check(4.0)
    assert calls == [1, 1]


def test_reclaims_every_few_seconds_during_long_work():
    r, state, calls = reclaimer()
    for t in range(1, 13):
        state["activity"] = (t, 50 * MiB, 100 * MiB)  # busy at every tick
        r.check(float(t))
    assert len(calls) == 2  # at 5 s and 10 s


def test_reclaim_runs_for_real():
    r = MemoryReclaimer()
    r.reclaim()
    assert resident_bytes() > 0
    buf = bytearray(8 * MiB)  # a chunk of its own: mmapped, counted in use
    assert r.malloc.in_use() >= 8 * MiB
    del buf


ARENA_PROBE = """
import sys, threading
from lxd_daemon.util.memory import limit_malloc_arenas
if sys.argv[1] != "default":
    limit_malloc_arenas(int(sys.argv[1]))
held = []
def work():
    held.append([bytes(100_000) for _ in range(20)])  # malloc'd on this thread's arena
threads = [threading.Thread(target=work) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
# A glibc thread arena is a heap of 64 MiB reserved at a 64 MiB boundary: a rw-p part then a
# ---p rest (the main arena is the brk heap).
maps = []
for line in open("/proc/self/maps"):
    f = line.split()
    lo, hi = (int(x, 16) for x in f[0].split("-"))
    maps.append((lo, hi, f[1], len(f) > 5))
heaps = 0
for i, (lo, hi, perms, named) in enumerate(maps):
    if lo % (64 << 20) or named or perms != "rw-p":
        continue
    end = hi
    if i + 1 < len(maps) and maps[i + 1][0] == hi and maps[i + 1][2] == "---p" and not maps[i + 1][3]:
        end = maps[i + 1][1]
    heaps += end - lo == 64 << 20
print(heaps)
"""


def test_malloc_arenas_are_limited():
    import subprocess
    import sys

    def heaps(arg: str) -> int:
        r = subprocess.run([sys.executable, "-c", ARENA_PROBE, arg], capture_output=True, text=True, check=True)
        return int(r.stdout)

    assert heaps("1") == 0  # every thread shares the main arena
    assert heaps("default") >= 1  # glibc's default: arenas of their own for threads
