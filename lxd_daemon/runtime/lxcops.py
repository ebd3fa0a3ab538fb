"""Container methods run inside the liblxc worker (registered with @worker.method).

The daemon writes the LXC config file; these methods only load it and drive liblxc. Calls are
short: waiting for a clean shutdown happens in the daemon (on the init pidfd), never here, so a
30 s shutdown never holds up a worker that other containers' calls share; and a start replies
when its lxc-start exits (`Pending`), the worker serving other calls meanwhile.
"""

from __future__ import annotations

import os
import signal

from lxd_daemon.runtime.worker import Pending, Worker, method, spawn

STDERR_KEEP = 64 * 1024  # the tail of lxc-start's stderr that an error message is taken from


def _container(name: str, lxcpath: str):
    """liblxc's container object: the C type, as in attach.container (python-lxc's
    `lxc.Container` wrapper adds a reference cycle and a module import for nothing used here)."""
    import _lxc

    return _lxc.Container(name, lxcpath)


@method("lxc_start")
def lxc_start(worker: Worker, name: str, lxcpath: str, conf: str, timeout: float = 10.0) -> Pending:
    """Start with the config file `conf`; the result is the init pid once RUNNING.

    The start itself is `lxc-start` (liblxc's own tool, a small C process): the `[lxc monitor]`
    that liblxc forks for every container is a copy of the process that started it, so starting
    from this Python worker would cost each container ~10 MiB of resident memory instead of ~3.
    """
    c = _container(name, lxcpath)
    try:
        if c.state not in ("STOPPED", "ABORTING"):
            # The monitor of a just-killed container may still be tearing down.
            c.wait("STOPPED", 3)
            if c.state == "RUNNING":
                raise RuntimeError("The instance is already running")
    finally:
        del c
    # stderr goes to a memfd, not a pipe: nobody has to drain it while lxc-start runs.
    err = os.memfd_create("lxc-start-stderr", os.MFD_CLOEXEC)
    try:
        proc = spawn(["lxc-start", "-n", name, "-P", lxcpath, "-f", conf], stderr=err)
    except BaseException:
        os.close(err)
        raise

    def finish(returncode: int | None) -> int:
        try:
            return _started(name, lxcpath, returncode, _tail(err), timeout)
        finally:
            os.close(err)

    return Pending(proc, finish, max(timeout, 1) + 5)


def _tail(fd: int) -> str:
    size = os.fstat(fd).st_size
    return os.pread(fd, STDERR_KEEP, max(0, size - STDERR_KEEP)).decode(errors="replace")


def _started(name: str, lxcpath: str, returncode: int | None, stderr: str, timeout: float) -> int:
    """What lxc-start's exit means: the init pid, or an error (None: it was killed at its deadline)."""
    c = _container(name, lxcpath)
    try:
        if returncode != 0:
            if c.state == "RUNNING":
                c.stop()  # never leave a container running that the daemon doesn't know about
            err = (stderr.strip().splitlines() or [""])[-1] if returncode is not None else "timed out"
            raise RuntimeError("Failed to start the container" + (f": {err}" if err else ""))
        if not c.wait("RUNNING", max(int(timeout), 1)):
            raise RuntimeError(f"The container did not reach RUNNING (state {c.state})")
        pid = c.init_pid
        if pid <= 0:
            raise RuntimeError("The container exited right after starting")
        return pid
    finally:
        del c


@method("lxc_lookup")
def lxc_lookup(worker: Worker, names: list[str], lxcpath: str) -> dict:
    """{name: [STATE, init_pid]} for each name, from liblxc's monitor (used at daemon start-up)."""
    out = {}
    for name in names:
        c = _container(name, lxcpath)
        try:
            state = c.state
            out[name] = [state, c.init_pid if state in ("RUNNING", "FROZEN", "FREEZING", "THAWED") else -1]
        finally:
            del c
    return out


@method("lxc_stop")
def lxc_stop(worker: Worker, name: str, lxcpath: str) -> bool:
    """liblxc's own forced stop (fallback when the daemon has no pid for the container)."""
    c = _container(name, lxcpath)
    try:
        if c.state == "STOPPED":
            return True
        pid = c.init_pid
        if pid > 0:
            try:
                fd = os.pidfd_open(pid)
            except OSError:
                fd = -1
            if fd >= 0:
                try:
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
                finally:
                    os.close(fd)
        return bool(c.stop())
    finally:
        del c  # its liblxc fds close now (refcount), not at some later GC


@method("lxc_config_items_ok")
def lxc_config_items_ok(worker: Worker, items: list) -> list:
    """liblxc's verdict on each [key, value]: True when set_config_item accepts it (a known key
    and a value liblxc can parse), in order on one scratch container object, as liblxc would
    read them from a config file. Nothing is written anywhere: the object has no config file."""
    c = _container("lxd-config-probe", "/nonexistent-lxd-config-probe")
    try:
        return [bool(c.set_config_item(str(k), str(v))) for k, v in items]
    finally:
        del c


def _checkpoint_argv(argv: list, restore: bool) -> list[str]:
    """Only liblxc's own checkpoint tool, and a restore only through lxc_restore."""
    argv = [str(a) for a in argv]
    if not argv or argv[0] != "lxc-checkpoint" or ("-r" in argv) != restore:
        raise ValueError("not an lxc-checkpoint " + ("restore" if restore else "dump") + " command line")
    return argv


@method("lxc_checkpoint")
def lxc_checkpoint(worker: Worker, argv: list, timeout: float = 600.0) -> Pending:
    """Dump (or pre-dump) a running container with `lxc-checkpoint` (migration/criu.py builds
    argv); replies None once it exited 0, else raises with its last stderr line."""
    argv = _checkpoint_argv(argv, restore=False)
    err = os.memfd_create("lxc-checkpoint-stderr", os.MFD_CLOEXEC)
    try:
        proc = spawn(argv, stderr=err)
    except BaseException:
        os.close(err)
        raise

    def finish(returncode: int | None) -> None:
        try:
            if returncode != 0:
                tail = (_tail(err).strip().splitlines() or [""])[-1] if returncode is not None else "timed out"
                raise RuntimeError("Failed to checkpoint the container" + (f": {tail}" if tail else "")
                                   + (f" (exit status {returncode})" if returncode else ""))
            return None
        finally:
            os.close(err)

    return Pending(proc, finish, max(timeout, 1))


@method("lxc_restore")
def lxc_restore(worker: Worker, name: str, lxcpath: str, argv: list, timeout: float = 120.0) -> Pending:
    """Boot a container from its checkpoint with `lxc-checkpoint -r` (daemonized, as lxc-start);
    the result is the init pid once RUNNING, as lxc_start's."""
    argv = _checkpoint_argv(argv, restore=True)
    c = _container(name, lxcpath)
    try:
        if c.state == "RUNNING":
            raise RuntimeError("The instance is already running")
    finally:
        del c
    err = os.memfd_create("lxc-restore-stderr", os.MFD_CLOEXEC)
    try:
        proc = spawn(argv, stderr=err)
    except BaseException:
        os.close(err)
        raise

    def finish(returncode: int | None) -> int:
        try:
            return _started(name, lxcpath, returncode, _tail(err), min(timeout, 10.0))
        except RuntimeError as e:
            raise RuntimeError(str(e).replace("Failed to start the container", "lxc-checkpoint failed", 1)) from None
        finally:
            os.close(err)

    return Pending(proc, finish, max(timeout, 1) + 5)
