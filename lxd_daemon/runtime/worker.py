"""The liblxc worker process: `python -m lxd_daemon.runtime.worker FD`.

Single-threaded. It reads requests from the socket FD, runs one at a time, and reports the exit
status of the processes it started (exec) through pidfds, so it never installs a SIGCHLD
reaper that could steal a status. A method that only waits for a helper process (lxc-start)
returns `Pending`: the worker serves other requests meanwhile and replies when the helper exits.
Method handlers live in a registry; container methods are added by lxd_daemon.runtime.lxcops.

The daemon starts it as `python -I -S -c BOOTSTRAP FD PATH...` (see pool.worker_command): no
`site`, so it imports only what its methods need.
"""

from __future__ import annotations

import errno
import os
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable

from lxd_daemon.runtime import protocol

Handler = Callable[..., object]
HANDLERS: dict[str, Handler] = {}


def method(name: str | None = None):
    def deco(fn: Handler) -> Handler:
        HANDLERS[name or fn.__name__] = fn
        return fn

    return deco


class Reply:
    """A result that also carries file descriptors back to the daemon (closed here once sent)."""

    def __init__(self, result: object, fds: list[int]):
        self.result = result
        self.fds = fds


def exit_code(status: int) -> int:
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return 255


class Child:
    """A helper process started by `spawn`; the worker reaps it through this object alone."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None

    def kill(self) -> None:
        if self.returncode is None:  # not reaped yet: the pid is still ours
            os.kill(self.pid, signal.SIGKILL)

    def wait(self) -> int:
        if self.returncode is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = exit_code(status)
        return self.returncode


def spawn(argv: list[str], *, stderr: int) -> Child:
    """Start argv (looked up on PATH) with stdin and stdout on /dev/null and stderr on `stderr`.

    posix_spawn rather than subprocess, whose import (threading, locale, re...) would cost the
    worker ~0.5 MiB for this one use; it also vforks, cheap whatever the worker's size. The child
    gets no other descriptor: the worker opens all of its own close-on-exec. The signals Python
    ignores (and the worker: SIGINT) get their default action back."""
    actions = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
               (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
               (os.POSIX_SPAWN_DUP2, stderr, 2)]
    pid = os.posix_spawnp(argv[0], argv, os.environ, file_actions=actions,
                          setsigdef=(signal.SIGINT, signal.SIGPIPE, signal.SIGXFSZ))
    return Child(pid)


class Pending:
    """A result that is ready once the helper process `proc` (see `spawn`) exits.

    The worker goes on serving other calls meanwhile, so one container's slow start doesn't hold
    up the others' calls. `finish(returncode)` then runs here and returns the result (or a Reply)
    or raises; at `timeout` seconds the helper is killed first and finish gets None."""

    def __init__(self, proc: Child, finish: Callable[[int | None], object], timeout: float):
        self.proc = proc
        self.finish = finish
        self.deadline = time.monotonic() + timeout


class _Waiting:
    """A Pending call: its request id and the helper's pidfd (the worker's selector watches it)."""

    def __init__(self, req_id: object, pending: Pending, pidfd: int):
        self.req_id = req_id
        self.pending = pending
        self.pidfd = pidfd


class Worker:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.decoder = protocol.Decoder()
        self.sel = selectors.DefaultSelector()
        self.sel.register(sock, selectors.EVENT_READ, None)
        self.watched: dict[int, int] = {}  # pidfd -> pid
        self.waiting: list[_Waiting] = []

    def watch(self, pid: int) -> None:
        """Report {"ev":"exit","pid":pid,"code":c} when this child of ours exits."""
        pidfd = os.pidfd_open(pid)
        self.watched[pidfd] = pid
        self.sel.register(pidfd, selectors.EVENT_READ, pid)

    def notify(self, obj: dict) -> None:
        protocol.send_blocking(self.sock, obj)

    def _reap(self, pidfd: int, pid: int) -> None:
        self.sel.unregister(pidfd)
        os.close(pidfd)
        self.watched.pop(pidfd, None)
        try:
            _, status = os.waitpid(pid, 0)
            code = exit_code(status)
        except ChildProcessError:
            code = 255
        self.notify({"ev": "exit", "pid": pid, "code": code})

    def handle(self, msg: dict, fds: list[int]) -> None:
        name = msg.get("m", "")
        fn = HANDLERS.get(name)
        args = msg.get("a", [])

        def call():
            if fn is None:
                raise LookupError(f"unknown worker method {name!r}")
            return fn(self, *args, fds=fds) if fds else fn(self, *args)

        try:
            self._answer(msg.get("id"), call)
        finally:
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def _answer(self, req_id: object, call: Callable[[], object]) -> None:
        """Run call() and send its result or its error as the reply to req_id (later if Pending)."""
        out_fds: list[int] = []
        try:
            result = call()
            if isinstance(result, Pending):
                self._wait_for(req_id, result)
                return
            if isinstance(result, Reply):
                out_fds = result.fds
                result = result.result
            reply = {"id": req_id, "r": result}
        except Exception as e:  # the reply carries the error; the worker lives on
            reply = {"id": req_id, "e": str(e) or e.__class__.__name__, "k": e.__class__.__name__}
            if not isinstance(e, LookupError | ValueError | FileNotFoundError | PermissionError | OSError | RuntimeError):
                import traceback

                reply["tb"] = traceback.format_exc(limit=5)
        try:
            protocol.send_blocking(self.sock, reply, out_fds)
        finally:
            for fd in out_fds:
                os.close(fd)

    def _wait_for(self, req_id: object, pending: Pending) -> None:
        try:
            pidfd = os.pidfd_open(pending.proc.pid)
        except OSError:  # no pidfd (out of descriptors): wait here, as before `Pending` existed
            self._answer(req_id, lambda: pending.finish(pending.proc.wait()))
            return
        w = _Waiting(req_id, pending, pidfd)
        self.waiting.append(w)
        self.sel.register(pidfd, selectors.EVENT_READ, w)

    def _done_waiting(self, w: _Waiting, timed_out: bool) -> None:
        self.sel.unregister(w.pidfd)
        os.close(w.pidfd)
        self.waiting.remove(w)
        proc = w.pending.proc
        if timed_out:
            proc.kill()
        code = proc.wait()
        self._answer(w.req_id, lambda: w.pending.finish(None if timed_out else code))

    def _select_timeout(self) -> float | None:
        if not self.waiting:
            return None
        return max(0.0, min(w.pending.deadline for w in self.waiting) - time.monotonic())

    def _expire(self) -> None:
        now = time.monotonic()
        for w in [w for w in self.waiting if w.pending.deadline <= now]:
            self._done_waiting(w, timed_out=True)

    def run(self) -> None:
        while True:
            for key, _ in self.sel.select(self._select_timeout()):
                if key.fileobj is self.sock:
                    try:
                        alive = protocol.recv_into(self.sock, self.decoder)
                    except InterruptedError:
                        continue
                    except OSError as e:
                        if e.errno in (errno.ECONNRESET, errno.EPIPE):
                            return
                        raise
                    if not alive:
                        return
                    for msg, fds in self.decoder.messages():
                        self.handle(msg, fds)
                elif isinstance(key.data, _Waiting):
                    if key.data in self.waiting:
                        self._done_waiting(key.data, timed_out=False)
                else:
                    self._reap(key.fd, key.data)
            self._expire()


@method()
def ping(worker: Worker) -> str:
    return "pong"


@method()
def version(worker: Worker) -> str:
    import _lxc

    return _lxc.get_version()


# liblxc's API extensions that LXD 5.0.2 reports in GET /1.0 `environment.lxc_features`.
LXC_FEATURES = ("cgroup2", "core_scheduling", "devpts_fd", "idmapped_mounts_v2", "mount_injection_file",
                "network_gateway_device_route", "network_ipvlan", "network_l2proxy", "network_phys_macvlan_mtu",
                "network_veth_router", "pidfd", "seccomp_allow_deny_syntax", "seccomp_notify",
                "seccomp_proxy_send_notify_fd")


@method()
def lxc_features(worker: Worker) -> dict[str, str]:
    """Which of LXC_FEATURES this liblxc has (lxc_has_api_extension); {} without the symbol."""
    import ctypes

    try:
        has = ctypes.CDLL("liblxc.so.1").lxc_has_api_extension
    except (OSError, AttributeError):
        return {}
    has.argtypes = [ctypes.c_char_p]
    has.restype = ctypes.c_bool
    return {name: "true" if has(name.encode()) else "false" for name in LXC_FEATURES}


@method()
def pid(worker: Worker) -> int:
    return os.getpid()


@method()
def fstat(worker: Worker, *, fds: list[int] = ()) -> list[dict]:
    """Describe the file descriptors the daemon passed in (type, device, inode, size).

    The daemon uses it to check that a descriptor it hands to a worker (a pipe, a pty, an open
    file) is the object it means, as the worker sees it.
    """
    out = []
    for fd in fds:
        st = os.fstat(fd)
        out.append({"mode": st.st_mode, "dev": st.st_dev, "ino": st.st_ino, "size": st.st_size})
    return out


@method()
def open_path(worker: Worker, path: str, flags: int = os.O_RDONLY, mode: int = 0o600) -> Reply:
    """Open a path as the worker sees it (for example under /proc/<pid>/root of a container)
    and pass the descriptor back to the daemon. O_CLOEXEC is always added.
    """
    fd = os.open(path, flags | os.O_CLOEXEC, mode)
    return Reply({"path": path}, [fd])


def _give_back_startup_memory() -> None:
    """Return to the system what importing the methods left free in malloc's heap: the worker
    lives as long as the daemon, and without bytecode caches (PYTHONDONTWRITEBYTECODE, a
    read-only install) compiling its modules leaves ~1 MiB there."""
    import ctypes

    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    fd = int(argv[0])
    # The daemon handles signals for the whole service; a worker only dies with its socket.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        os.setsid()
    except OSError:
        pass
    os.set_inheritable(fd, False)  # no helper (lxc-start, an exec) may hold the daemon's line
    sock = socket.socket(fileno=fd)
    sock.setblocking(True)
    # Run as __main__: let `from lxd_daemon.runtime.worker import method` reach this registry.
    sys.modules.setdefault("lxd_daemon.runtime.worker", sys.modules[__name__])
    import lxd_daemon.runtime.attach  # noqa: F401  (methods register themselves on import)
    import lxd_daemon.runtime.hotplug  # noqa: F401
    import lxd_daemon.runtime.lxcops  # noqa: F401
    import lxd_daemon.runtime.nics  # noqa: F401
    _give_back_startup_memory()

    Worker(sock).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
