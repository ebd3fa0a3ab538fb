"""The liblxc worker pool: real worker processes, concurrent calls, fd passing, crash and respawn."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import time

import pytest

from lxd_daemon.runtime.pool import WorkerCrashed, WorkerError, WorkerPool


def run_with_pool(size: int, body):
    async def main():
        pool = WorkerPool(size)
        pool.spawn()
        pool.attach(asyncio.get_running_loop())
        try:
            return await asyncio.wait_for(body(pool), 30)
        finally:
            pool.close()

    return asyncio.run(main())


def test_version_is_liblxc_version():
    import lxc  # the daemon never imports it; the test compares with what the worker reports

    got = run_with_pool(1, lambda pool: pool.call("version"))
    assert got == lxc.version
    assert got.split(".")[0].isdigit()


def test_concurrent_calls_spread_over_workers_and_all_return():
    async def body(pool):
        results = await asyncio.gather(*(pool.call("pid") for _ in range(200)),
                                       *(pool.call("ping") for _ in range(200)))
        return results, pool.pids()

    results, pids = run_with_pool(2, body)
    pids_seen = set(results[:200])
    assert results[200:] == ["pong"] * 200
    assert pids_seen <= set(pids)
    assert len(pids_seen) == 2, "calls should spread over both workers"


def test_lanes_pin_calls_to_one_worker():
    async def body(pool):
        return [await pool.call("pid", lane="instance-c1") for _ in range(10)]

    assert len(set(run_with_pool(2, body))) == 1


def test_errors_in_a_worker_method_come_back_and_the_worker_lives():
    async def body(pool):
        with pytest.raises(WorkerError) as e:
            await pool.call("no_such_method")
        assert "no_such_method" in str(e.value)
        with pytest.raises(WorkerError) as e:
            await pool.call("open_path", "/nonexistent/file")
        assert e.value.kind == "FileNotFoundError"
        return await pool.call("ping")

    assert run_with_pool(1, body) == "pong"


def test_fds_pass_to_the_worker(tmp_path):
    f = tmp_path / "data"
    f.write_bytes(b"x" * 1234)
    r, w = os.pipe()

    async def body(pool):
        fd = os.open(f, os.O_RDONLY)
        try:
            return await pool.call("fstat", fds=[fd, r])
        finally:
            os.close(fd)

    try:
        info = run_with_pool(1, body)
        st = os.stat(f)
        assert info[0]["ino"] == st.st_ino and info[0]["dev"] == st.st_dev and info[0]["size"] == 1234
        assert stat.S_ISFIFO(info[1]["mode"]) and info[1]["ino"] == os.fstat(r).st_ino
    finally:
        os.close(r)
        os.close(w)


def test_fds_pass_back_from_the_worker(tmp_path):
    f = tmp_path / "data"
    f.write_bytes(b"from the worker")

    async def body(pool):
        meta, fds = await pool.call_fds("open_path", str(f))
        assert meta == {"path": str(f)} and len(fds) == 1
        try:
            return os.read(fds[0], 100), os.fstat(fds[0]).st_ino, os.get_inheritable(fds[0])
        finally:
            os.close(fds[0])

    data, ino, inheritable = run_with_pool(1, body)
    assert data == b"from the worker"
    assert ino == os.stat(f).st_ino
    assert not inheritable


def test_many_fds_in_flight_stay_matched_to_their_calls(tmp_path):
    files = []
    for i in range(40):
        p = tmp_path / f"f{i}"
        p.write_bytes(b"y" * i)
        files.append(p)

    async def body(pool):
        async def one(p):
            fd = os.open(p, os.O_RDONLY)
            try:
                return await pool.call("fstat", fds=[fd])
            finally:
                os.close(fd)

        return await asyncio.gather(*(one(p) for p in files))

    out = run_with_pool(2, body)
    assert [o[0]["size"] for o in out] == list(range(40))


def test_killed_worker_fails_pending_calls_then_is_respawned():
    async def body(pool):
        w = pool.workers[0]
        old_pid = w.pid
        # Freeze the worker so the call is certainly still pending when it dies.
        os.kill(old_pid, signal.SIGSTOP)
        pending = asyncio.ensure_future(pool.call_on(w, "ping"))
        await asyncio.sleep(0.1)
        assert not pending.done()
        os.kill(old_pid, signal.SIGKILL)
        with pytest.raises(WorkerCrashed):
            await pending
        # A new worker takes its place; later calls work.
        deadline = time.monotonic() + 10
        while w.pid == old_pid or w.sock is None:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        assert await pool.call("ping") == "pong"
        assert (await pool.call_on(w, "pid"))[0] == w.pid != old_pid
        return old_pid, w.pid

    old, new = run_with_pool(1, body)
    assert not os.path.exists(f"/proc/{old}") or open(f"/proc/{old}/stat").read().split()[2] == "Z"
    assert old != new


def test_workers_exit_when_the_pool_closes():
    pids = run_with_pool(2, lambda pool: asyncio.sleep(0, result=pool.pids()))
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}"), f"worker {pid} outlived its pool"
