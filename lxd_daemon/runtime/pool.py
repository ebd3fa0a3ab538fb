"""Async facade over the liblxc worker processes.

Workers are spawned before the daemon binds any socket (so they inherit no listener) and
respawned if one dies; calls that were in flight on a dead worker fail with WorkerCrashed.
A call can pin itself to a lane (for example an instance name), so that calls for one
container run one after another, in order, on one worker, while others spread over the least
busy worker. A worker serves other calls while one waits for a helper process (a container
start), so one worker is enough for most hosts.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import os
import socket
import subprocess
import sys
import zlib
from collections.abc import Sequence

from lxd_daemon.runtime import protocol

log = logging.getLogger("lxd.runtime")

_LISTEN_VARS = frozenset({"LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"})

# What `python -c` runs in a worker; its arguments are the socket's fd, then the import path.
_BOOTSTRAP = ("import sys; sys.path[:0] = [p for p in sys.argv[2:] if p not in sys.path]; "
              "from lxd_daemon.runtime.worker import main; sys.exit(main(sys.argv[1:2]))")


def import_path() -> list[str]:
    """The directories a worker imports from: the one holding lxd_daemon (an editable install
    maps it with an import hook, not a path entry), then the daemon's own sys.path."""
    import lxd_daemon

    out = [os.path.dirname(os.path.dirname(os.path.abspath(lxd_daemon.__file__)))]
    out.extend(p for p in sys.path if p and p not in out and os.path.isdir(p))
    return out


def worker_command(fd: int) -> list[str]:
    """The interpreter the daemon runs on, isolated (-I: no PYTHON* variables, no script or user
    directory on sys.path) and without `site` (-S): a worker then imports only what its methods
    need, not what the environment's .pth hooks load (an editable install's finder alone costs
    each worker ~0.7 MiB). It writes bytecode caches as the daemon does: compiling its modules
    from source at every start costs a worker ~1.5 MiB more."""
    flags = ["-I", "-S"] + (["-B"] if sys.dont_write_bytecode else [])
    return [sys.executable, *flags, "-c", _BOOTSTRAP, str(fd), *import_path()]


class WorkerError(Exception):
    """A worker method raised; kind is the exception class name inside the worker."""

    def __init__(self, message: str, kind: str = ""):
        super().__init__(message)
        self.kind = kind


class WorkerCrashed(WorkerError):
    pass


class WorkerProcess:
    def __init__(self, index: int):
        self.index = index
        self.proc: subprocess.Popen | None = None
        self.sock: socket.socket | None = None
        self.decoder = protocol.Decoder()
        self.pending: dict[int, asyncio.Future] = {}
        self.next_id = 1
        self.outbox = bytearray()
        self.outbox_fds: list[tuple[int, list[int]]] = []  # (offset in outbox, fds) not yet sent
        self.loop: asyncio.AbstractEventLoop | None = None
        self.exits: dict[int, int] = {}  # pid -> exit code, not yet claimed
        self.exit_waiters: dict[int, asyncio.Future] = {}
        self.on_dead = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def load(self) -> int:
        return len(self.pending)

    def spawn(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # Socket-activation variables are meant for the daemon alone.
            env = {k: v for k, v in os.environ.items() if k not in _LISTEN_VARS}
            self.proc = subprocess.Popen(worker_command(child.fileno()), pass_fds=[child.fileno()],
                                         close_fds=True, stdin=subprocess.DEVNULL, env=env)
        finally:
            child.close()
        parent.setblocking(False)
        self.sock = parent
        self.decoder = protocol.Decoder()

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        loop.add_reader(self.sock.fileno(), self._on_readable)

    # -- I/O -------------------------------------------------------------
    def _on_readable(self) -> None:
        sock = self.sock
        while True:
            try:
                alive = protocol.recv_into(sock, self.decoder)
            except BlockingIOError:
                break
            except OSError:
                alive = False
            if not alive:
                self._died()
                return
            for msg, fds in self.decoder.messages():
                self._dispatch(msg, fds)

    def _dispatch(self, msg: dict, fds: list[int]) -> None:
        if "ev" in msg:
            if msg["ev"] == "exit":
                pid, code = msg["pid"], msg["code"]
                fut = self.exit_waiters.pop(pid, None)
                if fut is not None and not fut.done():
                    fut.set_result(code)
                else:
                    self.exits[pid] = code
            for fd in fds:
                os.close(fd)
            return
        fut = self.pending.pop(msg.get("id"), None)
        if fut is None or fut.done():
            for fd in fds:
                os.close(fd)
            return
        if "e" in msg:
            if msg.get("tb"):
                log.error("worker method failed: %s", msg["tb"])
            fut.set_exception(WorkerError(msg["e"], msg.get("k", "")))
            for fd in fds:
                os.close(fd)
        else:
            fut.set_result((msg.get("r"), fds))

    def send(self, obj: dict, fds: Sequence[int]) -> None:
        data = protocol.encode(obj, len(fds))
        if self.outbox:
            self.outbox_fds.append((len(self.outbox), list(fds)))
            self.outbox += data
            return
        try:
            if fds:
                sent = self.sock.sendmsg(
                    [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
            else:
                sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
            self.outbox_fds.append((0, list(fds)))
        if sent < len(data):
            self.outbox += data[sent:]
            self.loop.add_writer(self.sock.fileno(), self._on_writable)

    def _on_writable(self) -> None:
        while self.outbox:
            fds: list[int] = []
            limit = len(self.outbox)
            if self.outbox_fds:
                off, pending_fds = self.outbox_fds[0]
                if off == 0:
                    fds = pending_fds
                    self.outbox_fds.pop(0)
                    if len(self.outbox_fds):
                        limit = self.outbox_fds[0][0]
                else:
                    limit = off
            try:
                chunk = bytes(self.outbox[:limit])
                if fds:
                    sent = self.sock.sendmsg(
                        [chunk], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
                else:
                    sent = self.sock.send(chunk)
            except BlockingIOError:
                if fds:
                    self.outbox_fds.insert(0, (0, fds))
                return
            except OSError:
                self._died()
                return
            del self.outbox[:sent]
            self.outbox_fds = [(o - sent, f) for o, f in self.outbox_fds]
        self.loop.remove_writer(self.sock.fileno())

    def _close_socket(self) -> None:
        """Stop watching the worker's socket and close it."""
        if self.loop is not None:
            with contextlib.suppress(Exception):
                self.loop.remove_reader(self.sock.fileno())
                self.loop.remove_writer(self.sock.fileno())
        self.sock.close()
        self.sock = None

    def _died(self) -> None:
        if self.sock is None:
            return
        self._close_socket()
        err = WorkerCrashed(f"liblxc worker {self.index} exited")
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(err)
        self.pending.clear()
        for fut in self.exit_waiters.values():
            if not fut.done():
                fut.set_exception(err)
        self.exit_waiters.clear()
        self.outbox.clear()
        self.outbox_fds.clear()
        if self.proc is not None:
            try:
                self.proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.on_dead is not None:
            self.on_dead(self)

    # -- calls -----------------------------------------------------------
    def call(self, method: str, args: Sequence[object], fds: Sequence[int]) -> asyncio.Future:
        if self.sock is None:
            raise WorkerCrashed(f"liblxc worker {self.index} is not running")
        req_id = self.next_id
        self.next_id += 1
        fut = self.loop.create_future()
        self.pending[req_id] = fut
        self.send({"id": req_id, "m": method, "a": list(args)}, fds)
        return fut

    def wait_exit(self, pid: int) -> asyncio.Future:
        fut = self.loop.create_future()
        if pid in self.exits:
            fut.set_result(self.exits.pop(pid))
        else:
            self.exit_waiters[pid] = fut
        return fut

    def close(self) -> None:
        if self.sock is not None:
            self._close_socket()
        if self.proc is not None:
            try:
                self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class WorkerPool:
    def __init__(self, size: int = 1):
        self.size = size
        self.workers = [WorkerProcess(i) for i in range(size)]
        self.loop: asyncio.AbstractEventLoop | None = None
        self.closing = False
        self._lanes: dict[str, list] = {}  # lane -> [asyncio.Lock, number of calls using it]

    def spawn(self) -> None:
        """Start every worker. Call before binding any listening socket."""
        for w in self.workers:
            w.spawn()

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        for w in self.workers:
            w.on_dead = self._respawn
            w.attach(loop)

    def _respawn(self, w: WorkerProcess) -> None:
        if self.closing:
            return
        log.warning("liblxc worker died, starting a new one", extra={"worker": w.index})
        w.spawn()
        w.attach(self.loop)

    def pick(self, lane: str | None) -> WorkerProcess:
        if lane is not None:
            return self.workers[zlib.crc32(lane.encode()) % self.size]
        return min(self.workers, key=lambda w: w.load)

    async def call_fds(self, method: str, *args: object, fds: Sequence[int] = (),
                       lane: str | None = None) -> tuple[object, list[int]]:
        """Call a worker method; returns (result, fds the worker sent back)."""
        if lane is None:
            return await self.pick(None).call(method, args, fds)
        async with self._in_lane(lane):
            return await self.pick(lane).call(method, args, fds)

    @contextlib.asynccontextmanager
    async def _in_lane(self, lane: str):
        """One call of a lane at a time, in the order they came: a worker may interleave calls
        (it serves others while a start waits for lxc-start), so the order is kept here."""
        entry = self._lanes.get(lane)
        if entry is None:
            entry = self._lanes[lane] = [asyncio.Lock(), 0]
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                del self._lanes[lane]

    async def call(self, method: str, *args: object, fds: Sequence[int] = (), lane: str | None = None):
        result, got = await self.call_fds(method, *args, fds=fds, lane=lane)
        for fd in got:
            os.close(fd)
        return result

    async def call_on(self, worker: WorkerProcess, method: str, *args: object,
                      fds: Sequence[int] = ()) -> tuple[object, list[int]]:
        return await worker.call(method, args, fds)

    def pids(self) -> list[int]:
        return [w.pid for w in self.workers if w.pid]

    def close(self) -> None:
        self.closing = True
        for w in self.workers:
            w.close()
