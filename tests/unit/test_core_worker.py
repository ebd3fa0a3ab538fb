"""The liblxc worker's Pending replies (a call that waits for a helper process) and the pool's lanes."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import threading
import time

import pytest

from lxd_daemon.runtime import protocol, worker
from lxd_daemon.runtime.pool import WorkerPool, worker_command


@pytest.fixture
def in_process_worker():
    """A Worker serving one end of a socket pair on a thread; yields a call(msgs) -> replies helper."""
    ours, theirs = socket.socketpair()
    w = worker.Worker(theirs)
    t = threading.Thread(target=w.run, daemon=True)
    t.start()
    decoder = protocol.Decoder()

    def replies(n: int, timeout: float = 10) -> list[dict]:
        ours.settimeout(timeout)
        out: list[dict] = []
        while len(out) < n:
            assert protocol.recv_into(ours, decoder)
            out.extend(msg for msg, _ in decoder.messages())
        return out

    def send(*msgs: dict) -> None:
        for m in msgs:
            protocol.send_blocking(ours, m)

    yield send, replies
    ours.close()
    t.join(5)
    theirs.close()


def pending(argv: list[str], finish, timeout: float = 5.0):
    def handler(w):
        return worker.Pending(worker.spawn(argv, stderr=2), finish, timeout)

    return handler


def test_a_pending_call_does_not_hold_up_the_others(in_process_worker, monkeypatch):
    send, replies = in_process_worker
    monkeypatch.setitem(worker.HANDLERS, "slow", pending(["sleep", "0.5"], lambda rc: f"exited {rc}"))
    t = time.monotonic()
    send({"id": 1, "m": "slow"}, {"id": 2, "m": "ping"})
    first = replies(1)
    assert first == [{"id": 2, "r": "pong"}] and time.monotonic() - t < 0.4
    assert replies(1) == [{"id": 1, "r": "exited 0"}]


def test_a_pending_call_past_its_deadline_kills_its_helper(in_process_worker, monkeypatch):
    send, replies = in_process_worker
    procs = []

    def hang(w):
        procs.append(worker.spawn(["sleep", "30"], stderr=2))
        return worker.Pending(procs[-1], lambda rc: "timed out" if rc is None else rc, 0.2)

    monkeypatch.setitem(worker.HANDLERS, "hang", hang)
    t = time.monotonic()
    send({"id": 7, "m": "hang"})
    assert replies(1) == [{"id": 7, "r": "timed out"}]
    assert time.monotonic() - t < 3
    assert procs[0].returncode is not None  # killed and reaped


def test_a_pending_call_that_fails_replies_with_the_error(in_process_worker, monkeypatch):
    send, replies = in_process_worker

    def finish(rc):
        raise RuntimeError(f"helper exited {rc}")

    monkeypatch.setitem(worker.HANDLERS, "fails", pending(["false"], finish))
    send({"id": 3, "m": "fails"})
    assert replies(1) == [{"id": 3, "e": "helper exited 1", "k": "RuntimeError"}]


def test_spawn_gives_the_helper_its_stdio_and_no_close_on_exec_descriptor():
    err = os.memfd_create("stderr")
    mine = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)  # as every descriptor of a worker
    try:
        child = worker.spawn(["sh", "-c", "echo out; echo err >&2; ls /proc/self/fd >&2"], stderr=err)
        assert child.wait() == 0 and child.returncode == 0
        text = os.pread(err, 4096, 0).decode()
    finally:
        os.close(mine)
        os.close(err)
    lines = text.split()
    assert lines[0] == "err" and "out" not in lines
    fds = {int(x) for x in lines[1:]}
    assert {0, 1, 2} <= fds and mine not in fds and err not in fds


def test_spawned_helper_killed_reports_the_signal():
    child = worker.spawn(["sleep", "30"], stderr=2)
    child.kill()
    assert child.wait() == 128 + 9
    child.kill()  # reaped: a no-op, never a stray signal


def test_calls_of_one_lane_reach_the_worker_one_at_a_time(tmp_path):
    """A lane's second call waits in the daemon until the first is answered; other calls go on."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)

    async def main():
        pool = WorkerPool(1)
        pool.spawn()
        pool.attach(asyncio.get_running_loop())
        try:
            w = pool.workers[0]
            first = asyncio.ensure_future(pool.call_fds("open_path", str(fifo), lane="c1"))  # blocks the worker
            await asyncio.sleep(0.2)
            second = asyncio.ensure_future(pool.call("ping", lane="c1"))
            other = asyncio.ensure_future(pool.call("ping"))
            await asyncio.sleep(0.2)
            assert len(w.pending) == 2, "the lane's second call must not be sent yet"
            fd = os.open(fifo, os.O_WRONLY)  # lets the worker's open() return
            try:
                _, fds = await asyncio.wait_for(first, 10)
                for x in fds:
                    os.close(x)
                assert await asyncio.wait_for(second, 10) == "pong"
                assert await asyncio.wait_for(other, 10) == "pong"
            finally:
                os.close(fd)
            assert not pool._lanes
        finally:
            pool.close()

    asyncio.run(main())


def test_worker_command_runs_isolated_without_site():
    cmd = worker_command(5)
    assert cmd[1:3] == ["-I", "-S"] and "-c" in cmd
    i = cmd.index("-c")
    assert cmd[i + 2] == "5"
    import lxd_daemon

    assert os.path.dirname(os.path.dirname(os.path.abspath(lxd_daemon.__file__))) == cmd[i + 3]


def test_exec_join_data_of_containers_whose_init_is_gone_is_dropped():
    from lxd_daemon.runtime import attach

    r, w = os.pipe()  # stand-ins for the cgroup.procs descriptors
    gone = worker.spawn(["true"], stderr=2)
    gone.wait()
    me = os.getpid()
    attach._join_cache["gone"] = (gone.pid, "1", [r], 0, False)
    attach._join_cache["alive"] = (me, attach._start_time(me), [w], 0, False)
    try:
        attach._drop_dead_joins()
        assert "gone" not in attach._join_cache and "alive" in attach._join_cache
        with pytest.raises(OSError):
            os.fstat(r)  # closed
    finally:
        attach._join_cache.pop("gone", None)
        attach._drop_join("alive")


def test_exec_in_a_container_imports_nothing_new():
    """The exec child runs os.execvpe inside the container, where the host's Python library is
    out of reach: what it imports must already be loaded by the worker's own imports."""
    cmd = worker_command(0)
    boot = ("import sys; sys.path[:0] = sys.argv[1:]; "
            "import lxd_daemon.runtime.worker, lxd_daemon.runtime.attach, lxd_daemon.runtime.hotplug, "
            "lxd_daemon.runtime.lxcops, os; before = set(sys.modules); os.get_exec_path({'PATH': '/bin'}); "
            "print(sorted(set(sys.modules) - before))")
    i = cmd.index("-c")
    out = subprocess.run([*cmd[:i], "-c", boot, *cmd[i + 3:]], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
