"""Container methods run inside the liblxc worker (registered with @worker.method).

The daemon writes the LXC config file; these methods only load it and drive liblxc. Calls are
short: waiting for a clean shutdown happens in the daemon (on the init pidfd), never here, so a
30 s shutdown never holds up a worker that other containers' calls share.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

from lxd_daemon.runtime.worker import Worker, method


def _container(name: str, lxcpath: str):
    import lxc

    return lxc.Container(name, lxcpath)


@method("lxc_start")
def lxc_start(worker: Worker, name: str, lxcpath: str, conf: str, timeout: float = 10.0) -> int:
    """Start with the config file `conf`; returns the init pid once RUNNING.

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
    try:
        r = subprocess.run(["lxc-start", "-n", name, "-P", lxcpath, "-f", conf], stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, close_fds=True,
                           timeout=max(timeout, 1) + 5)
    except subprocess.TimeoutExpired:
        r = None
    c = _container(name, lxcpath)
    try:
        if r is None or r.returncode != 0:
            if c.state == "RUNNING":
                c.stop()  # never leave a container running that the daemon doesn't know about
            err = (r.stderr.decode(errors="replace").strip().splitlines() or [""])[-1] if r else "timed out"
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


@method("lxc_wait_stopped")
def lxc_wait_stopped(worker: Worker, name: str, lxcpath: str, timeout: float = 2.0) -> str:
    """Wait (briefly) until liblxc's monitor has finished with a container whose init died."""
    c = _container(name, lxcpath)
    try:
        deadline = time.monotonic() + timeout
        while c.state not in ("STOPPED",) and time.monotonic() < deadline:
            time.sleep(0.01)
        return c.state
    finally:
        del c  # its liblxc fds close now (refcount), not at some later GC


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
