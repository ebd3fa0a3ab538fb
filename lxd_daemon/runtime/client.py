"""The typed client of the liblxc workers: the only place outside runtime/ that knows the worker
methods' names and argument order, and that turns a worker's failure into an LXD error.

Services call `services.runtime.<method>(...)`; the worker processes (runtime/worker.py and the
@method handlers in runtime/) do the liblxc calls and the forks.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lxd_daemon.errors import BadRequest, LXDError
from lxd_daemon.runtime.pool import WorkerError, WorkerPool


class StartFailed(LXDError):
    """lxc-start failed; `reason` is liblxc's (or the worker's) message."""

    def __init__(self, reason: str):
        super().__init__(f"Failed to start the instance: {reason}")
        self.reason = reason


def _reason(e: Exception) -> str:
    return str(e.args[0]) if e.args else str(e)


class RuntimeClient:
    def __init__(self, pool: WorkerPool):
        self.pool = pool
        # name -> (state directory, log file): the next start() of `name` restores from a
        # checkpoint instead of booting (migration/criu.py stateful_start arms it).
        self._restore_from: dict[str, tuple[str, str]] = {}

    def arm_restore(self, name: str, state_dir: str, logfile: str = "") -> None:
        self._restore_from[name] = (state_dir, logfile)

    def disarm_restore(self, name: str) -> None:
        self._restore_from.pop(name, None)

    # -- the workers -------------------------------------------------------------------------
    async def version(self) -> str:
        """liblxc's version as the workers see it."""
        return await self.pool.call("version")

    async def lxc_features(self) -> dict[str, str]:
        """liblxc's API extensions LXD reports (`environment.lxc_features`): name -> "true"/"false"."""
        return await self.pool.call("lxc_features")

    # -- container lifecycle -----------------------------------------------------------------
    async def lookup(self, names: Sequence[str], lxcpath: str, *, lane: str | None = None) -> dict[str, tuple[str, int]]:
        """{name: (liblxc state, init pid or -1)} for each name."""
        found = await self.pool.call("lxc_lookup", list(names), lxcpath, lane=lane)
        return {n: (st, int(pid)) for n, (st, pid) in found.items()}

    async def start(self, name: str, lxcpath: str, conf: str) -> int:
        """Boot the container from `conf`; returns its init pid. Raises StartFailed."""
        armed = self._restore_from.pop(name, None)
        if armed is not None:
            from lxd_daemon.migration import criu

            try:
                return await criu.restore(self, name, lxcpath, conf, Path(armed[0]), logfile=armed[1] or None)
            except LXDError as e:
                raise StartFailed(f"restoring its saved state: {e.message}") from None
        try:
            return int(await self.pool.call("lxc_start", name, lxcpath, conf, lane=name))
        except WorkerError as e:
            raise StartFailed(_reason(e)) from None

    async def stop(self, name: str, lxcpath: str) -> None:
        """Stop through liblxc (for a container the daemon doesn't track by pid)."""
        try:
            await self.pool.call("lxc_stop", name, lxcpath, lane=name)
        except WorkerError as e:
            raise LXDError(f"Failed to stop the instance: {_reason(e)}") from None

    async def checkpoint(self, name: str, argv: list[str], timeout: float) -> None:
        """Run an `lxc-checkpoint` dump or pre-dump (argv from migration/criu.py) for `name`."""
        try:
            await self.pool.call("lxc_checkpoint", list(argv), timeout, lane=name)
        except WorkerError as e:
            raise LXDError(_reason(e)) from None

    async def restore(self, name: str, lxcpath: str, argv: list[str], timeout: float) -> int:
        """Boot `name` from its checkpoint (`lxc-checkpoint -r`, argv from migration/criu.py);
        returns its init pid."""
        try:
            return int(await self.pool.call("lxc_restore", name, lxcpath, list(argv), timeout, lane=name))
        except WorkerError as e:
            raise LXDError(_reason(e)) from None

    async def config_items_ok(self, items: list[list[str]]) -> list:
        """liblxc's verdict on each [key, value] of a raw.lxc config (True, or why not)."""
        return await self.pool.call("lxc_config_items_ok", [list(it) for it in items])

    # -- cgroups and hotplug of a running container ------------------------------------------
    async def set_cgroup_files(self, name: str, init_pid: int, items: list) -> list:
        """Write [version, file, value] items into the container's cgroups; returns the
        [file, value, error] of those that failed."""
        return await self.pool.call("set_cgroup_files", init_pid, items, name, lane=name)

    async def hotplug_mount(self, name: str, init_pid: int, source: str, target: str, options: dict, *,
                            what: str) -> None:
        try:
            await self.pool.call("hotplug_mount", init_pid, source, target, options, lane=name)
        except WorkerError as e:
            raise BadRequest(f"Failed to add device {what!r} on the running instance: {e}") from None

    async def idmapped_mounts_supported(self, path: str) -> bool:
        """Whether mounts of `path`'s filesystem can be idmapped on this kernel (probed once per
        filesystem and worker)."""
        return bool(await self.pool.call("idmap_supported", str(path)))

    async def hotplug_unmount(self, name: str, init_pid: int, target: str, remove: bool, root_uid: int,
                              root_gid: int, *, what: str) -> None:
        try:
            await self.pool.call("hotplug_unmount", init_pid, target, remove, root_uid, root_gid, lane=name)
        except WorkerError as e:
            raise BadRequest(f"Failed to remove device {what!r} on the running instance: {e}") from None

    async def nic_attach(self, name: str, init_pid: int, link: str, ifname: str, options: dict, *,
                         what: str) -> None:
        """Move host interface `link` into the running container as `ifname` (runtime/nics.py)."""
        try:
            await self.pool.call("nic_attach", init_pid, link, ifname, options, lane=name)
        except WorkerError as e:
            raise BadRequest(f"Failed to add device {what!r} on the running instance: {e}") from None

    async def nic_detach(self, name: str, init_pid: int, ifname: str, give_back: str = "", *,
                         what: str) -> None:
        """Take interface `ifname` out of the running container (deleted, or given back as
        `give_back`)."""
        try:
            await self.pool.call("nic_detach", init_pid, ifname, give_back, lane=name)
        except WorkerError as e:
            raise BadRequest(f"Failed to remove device {what!r} on the running instance: {e}") from None

    # -- console and exec --------------------------------------------------------------------
    async def console_open(self, name: str, lxcpath: str, config_path: str, ttynum: int, *,
                           lane: str) -> list[int]:
        """The console's pty master followed by the fds that keep it reserved."""
        try:
            _, fds = await self.pool.call_fds("console_open", name, lxcpath, config_path, ttynum, lane=lane)
        except WorkerError as e:
            raise LXDError(f"Failed to attach to the console: {e}") from None
        return fds

    async def exec_attach(self, *, name: str, lxcpath: str, config_path: str, lane: str, argv: list[str],
                          env: dict[str, str], uid: int, gid: int, cwd: str, pty: dict | None,
                          init_pid: int, privileged: bool, stdio: Sequence[int] = ()):
        """Start argv in the container; returns (the worker that owns the process, its pid, the
        fds sent back: the pty master first when `pty` is given)."""
        worker = self.pool.pick(lane)
        try:
            result, fds = await self.pool.call_on(worker, "exec_attach", name, lxcpath, config_path, list(argv),
                                                  env, uid, gid, cwd, pty,
                                                  {"init_pid": init_pid, "privileged": privileged},
                                                  fds=list(stdio))
        except WorkerError as e:
            raise BadRequest(f"Failed to run the command: {e}") from None
        return worker, int(result["pid"]), fds
