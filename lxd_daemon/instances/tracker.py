"""Tracking of running containers: each one's init process through a pidfd watched by the event
loop, the container's cgroups resolved once at start, and a callback when init exits.

The tracker owns this runtime state and nothing else: what an exit means (a reboot, a poweroff, an
ephemeral container to delete) is decided by the instance service's callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable

from lxd_daemon.instances import state as rstate
from lxd_daemon.instances.models import Runtime


class RuntimeTracker:
    def __init__(self, on_exit: Callable[[str, Runtime], None]):
        self.running: dict[str, Runtime] = {}  # instance name -> its tracked init
        self._on_exit_cb = on_exit
        self.loop: asyncio.AbstractEventLoop | None = None

    def track(self, name: str, pid: int) -> Runtime:
        """Watch `pid` as the init of container `name` (replacing an earlier watch)."""
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        old = self.running.pop(name, None)
        if old is not None:
            self.unwatch(old)
        pidfd = os.pidfd_open(pid)
        # The container's own cgroup, resolved once while init is known to be alive: later
        # reads of /proc/PID/cgroup could show the root cgroup of an exiting init.
        rt = Runtime(pid=pid, start_time=rstate.proc_start_time(pid), pidfd=pidfd,
                     cgroups=rstate.container_cgroups(name, pid), links=rstate.NetnsLinks(pid))
        self.running[name] = rt
        self.loop.add_reader(pidfd, self._exited, name, rt)
        return rt

    def unwatch(self, rt: Runtime) -> None:
        """Stop watching (the pidfd is closed, the netlink reader too) and wake whoever waits
        for the exit."""
        if rt.links is not None:
            rt.links.close()
        if rt.pidfd >= 0:
            with contextlib.suppress(Exception):
                self.loop.remove_reader(rt.pidfd)
            os.close(rt.pidfd)
            rt.pidfd = -1
        rt.exited.set()

    def _exited(self, name: str, rt: Runtime) -> None:
        self.unwatch(rt)
        if self.running.get(name) is rt:
            del self.running[name]
        self._on_exit_cb(name, rt)

    def close(self) -> None:
        """The daemon is exiting and the containers keep running: stop watching them (no exit
        callbacks), without pretending they exited."""
        for rt in list(self.running.values()):
            rt.stopping = True
            if rt.links is not None:
                rt.links.close()
            if rt.pidfd >= 0:
                with contextlib.suppress(Exception):
                    self.loop.remove_reader(rt.pidfd)
                os.close(rt.pidfd)
                rt.pidfd = -1
