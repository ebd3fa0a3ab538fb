"""The liblxc worker process: `python -m lxd_daemon.runtime.worker FD`.

Single-threaded. It reads requests from the socket FD, runs one at a time, and reports the exit
status of the processes it started (exec) through pidfds, so it never installs a SIGCHLD
reaper that could steal a status. Method handlers live in a registry; container methods are
added by lxd_daemon.runtime.lxcops.
"""

from __future__ import annotations

import errno
import os
import selectors
import signal
import socket
import sys
import traceback
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


class Worker:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.decoder = protocol.Decoder()
        self.sel = selectors.DefaultSelector()
        self.sel.register(sock, selectors.EVENT_READ, None)
        self.watched: dict[int, int] = {}  # pidfd -> pid

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
        req_id = msg.get("id")
        name = msg.get("m", "")
        fn = HANDLERS.get(name)
        out_fds: list[int] = []
        try:
            if fn is None:
                raise LookupError(f"unknown worker method {name!r}")
            result = fn(self, *msg.get("a", []), fds=fds) if fds else fn(self, *msg.get("a", []))
            if isinstance(result, Reply):
                out_fds = result.fds
                result = result.result
            reply = {"id": req_id, "r": result}
        except Exception as e:  # the reply carries the error; the worker lives on
            reply = {"id": req_id, "e": str(e) or e.__class__.__name__, "k": e.__class__.__name__}
            if not isinstance(e, LookupError | ValueError | FileNotFoundError | PermissionError | OSError | RuntimeError):
                reply["tb"] = traceback.format_exc(limit=5)
        finally:
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
        try:
            protocol.send_blocking(self.sock, reply, out_fds)
        finally:
            for fd in out_fds:
                os.close(fd)

    def run(self) -> None:
        while True:
            for key, _ in self.sel.select():
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
                else:
                    self._reap(key.fd, key.data)


@method()
def ping(worker: Worker) -> str:
    return "pong"


@method()
def version(worker: Worker) -> str:
    import lxc

    return lxc.version


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
    sock = socket.socket(fileno=fd)
    sock.setblocking(True)
    # Run as __main__: let `from lxd_daemon.runtime.worker import method` reach this registry.
    sys.modules.setdefault("lxd_daemon.runtime.worker", sys.modules[__name__])
    import lxd_daemon.runtime.attach  # noqa: F401  (methods register themselves on import)
    import lxd_daemon.runtime.hotplug  # noqa: F401
    import lxd_daemon.runtime.lxcops  # noqa: F401

    Worker(sock).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
