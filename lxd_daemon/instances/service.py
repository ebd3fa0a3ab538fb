"""The instance service: records (in memory, written through to the store), the on-disk layout,
and the lifecycle of containers on liblxc.

An instance is (project, name). Its key in `records` and every name it has on the host is its
storage name (projects/naming.py: `c1` in default, `p1_c1` elsewhere); every method taking an
instance takes that key. The API shows the instance's own name and its project.

Layout: the root filesystem volume lives in the pool (`<pool>/containers/<key>`), reached through
`$LXD_DIR/containers/<key>` (a symlink; that directory is liblxc's lxcpath). Logs and the LXC
config written at each start are in `$LXD_DIR/logs/<key>/`.

Running containers are tracked by their init pid (plus its start time, against pid reuse) and a
pidfd watched on the event loop, so state is known without asking liblxc and a forced stop is
one pidfd_send_signal(). liblxc's monitor finishes the teardown on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import platform
import signal
import stat
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from lxd_daemon import names
from lxd_daemon.devices import lifecycle as device_lifecycle
from lxd_daemon.devices.base import DeviceContext
from lxd_daemon.devices.disk import check_volumes, unmount_under
from lxd_daemon.devices.registry import load_all
from lxd_daemon.errors import BadRequest, Conflict, LXDError, NotFound, NotImplementedYet
from lxd_daemon.instances import cloudinit, validation
from lxd_daemon.instances import idmap as idmaps
from lxd_daemon.instances import state as rstate
from lxd_daemon.instances.idmap import IdmapEntry, IdmapSet, shift_tree
from lxd_daemon.instances.models import FrozenRootfs, Instance, Record, Runtime
from lxd_daemon.instances.store import InstanceStore
from lxd_daemon.instances.tracker import RuntimeTracker
from lxd_daemon.projects import policy as project_policy
from lxd_daemon.projects.naming import query, split, storage_name
from lxd_daemon.runtime.client import StartFailed
from lxd_daemon.util.revert import Revert
from lxd_daemon.util.timefmt import EPOCH_TIME, rfc3339

log = logging.getLogger("lxd.instances")

STATUS_CODES = {"Running": 103, "Stopped": 102, "Frozen": 110, "Error": 112}
# volatile keys the daemon manages: a PUT that leaves them out keeps them.
MANAGED_VOLATILE = ("volatile.idmap.base", "volatile.idmap.current", "volatile.idmap.next",
                    "volatile.last_state.idmap", "volatile.last_state.power", "volatile.base_image",
                    "volatile.apply_template", "volatile.uuid", "volatile.cloud-init.instance-id")
TRUE = ("true", "1", "yes", "on")
_ADJECTIVES = ("able", "bold", "brave", "calm", "clever", "eager", "fair", "gentle", "happy", "keen", "lively",
               "lucky", "merry", "neat", "proud", "quick", "quiet", "sharp", "smart", "swift", "tidy", "vivid",
               "warm", "wise")
_NOUNS = ("badger", "beetle", "bison", "crane", "dingo", "eagle", "ferret", "gecko", "heron", "ibis", "koala",
          "lemur", "lynx", "marten", "newt", "otter", "panda", "quail", "raven", "seal", "tapir", "viper",
          "walrus", "yak")


def validate_name(name: str) -> None:
    try:
        names.instance(name)
    except names.InvalidName as e:
        raise BadRequest(e.message) from None


def host_architecture() -> str:
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine(), platform.machine())


def is_true(v: str | None) -> bool:
    return (v or "").lower() in TRUE


class InstanceService:
    def __init__(self, services):
        self.services = services
        self.db = services.db
        self.pool = services.pool
        self.liblxc = services.runtime  # the typed client of the liblxc workers
        self.store = InstanceStore(services.db, lambda project, p: services.profiles.id_of(project, p))
        self.lxd_dir: Path = services.lxd_dir
        self.lxcpath = self.lxd_dir / "containers"
        self.logs_root = self.lxd_dir / "logs"
        self.records: dict[str, Record] = {}
        self.tracker = RuntimeTracker(self._on_exit)
        self.runtime: dict[str, Runtime] = self.tracker.running  # name -> tracked init (read-only here)
        self._locks: dict[str, asyncio.Lock] = {}
        self._reserved: set[str] = set()
        self._unreachable: set[str] = set()  # running, but out of reach of liblxc's command socket
        # Maps chosen by a create whose record doesn't exist yet: name -> (map, isolated).
        self._idmap_claims: dict[str, tuple[IdmapSet, bool]] = {}
        self._bg: set[asyncio.Task] = set()
        # Long-lived host state of device types, by type (proxy: the supervisor of its forwarders).
        self.device_state: dict[str, object] = {}
        self._yaml_locks: dict[str, asyncio.Lock] = {}  # see backup_yaml_lock()
        self.loop: asyncio.AbstractEventLoop | None = None
        # Project config, limits and restrictions (projects/service.py, policy.py); checks run
        # synchronously with their claim, as reserve() does for names.
        self.projects = services.projects

    # ------------------------------------------------------------------ helpers
    def lock(self, name: str) -> asyncio.Lock:
        lk = self._locks.get(name)
        if lk is None:
            lk = self._locks[name] = asyncio.Lock()
        return lk

    @contextlib.asynccontextmanager
    async def volume_writes(self, name: str):
        """Around a write into the instance's volume from outside (file push/delete, templates):
        while the instance is stopped it holds the instance's lock, so that it waits for, and holds
        off, the changes that take the stopped volume to themselves (an optimised backup sends a
        stopped instance's btrfs volume as it is, read-only meanwhile)."""
        if self.status_of(name)[0] == "Running":
            yield
            return
        async with self.lock(name):
            yield

    def _spawn(self, coro) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._bg.add(t)
        t.add_done_callback(self._bg.discard)

    async def _write_backup_yaml(self, name: str) -> None:
        """Refresh $volume/backup.yaml (LXD's; `lxd recover` and imports read it)."""
        from lxd_daemon.backups.config import update_instance_backup_yaml

        async with self.backup_yaml_lock(name):
            await update_instance_backup_yaml(self.services, name)

    def refresh_backup_yaml(self, name: str) -> None:
        """Rewrite backup.yaml in the background, after a change is committed (off the request's
        path; each write renders the state current when it runs, under backup_yaml_lock)."""
        self._spawn(self._write_backup_yaml(name))

    def backup_yaml_lock(self, name: str) -> asyncio.Lock:
        """Held while backup.yaml is rewritten in the instance's volume (through a temporary file
        beside it). A copy of the volume's tree (snapshot, copy) holds it too, so that it never
        meets a temporary file that vanishes under it."""
        lk = self._yaml_locks.get(name)
        if lk is None:
            lk = self._yaml_locks[name] = asyncio.Lock()
        return lk

    def record(self, name: str) -> Record:
        """The record of the instance whose key (storage name, Record.key) is `name`."""
        rec = self.records.get(name)
        if rec is None:
            raise NotFound("Instance not found")
        return rec

    # -- projects: an instance is (project, name); its key in `records` is its storage name ---
    @staticmethod
    def key(project: str, name: str) -> str:
        return storage_name(project, name)

    def lookup(self, project: str, name: str) -> Record:
        return self.record(storage_name(project, name))

    def keys_in(self, project: str) -> list[str]:
        """The keys of the project's instances, in the order of their names."""
        return [r.key for r in sorted((r for r in self.records.values() if r.project == project),
                                      key=lambda r: r.name)]

    def url(self, key: str, suffix: str = "") -> str:
        """The API URL of an instance (or of something under it: `suffix`), with its project."""
        project, name = self.ident(key)
        return f"/1.0/instances/{name}{suffix}{query(project)}"

    def ident(self, key: str) -> tuple[str, str]:
        """(project, API name) of the instance with key `key` (recorded or not)."""
        rec = self.records.get(key)
        return (rec.project, rec.name) if rec is not None else split(key)

    def lifecycle(self, action: str, key: str, context: dict | None = None, *,
                  requestor: dict | None = None) -> None:
        """A lifecycle event of instance `key`: its URL and its project."""
        project, _ = self.ident(key)
        self.services.events.lifecycle(action, self.url(key), context, requestor=requestor, project=project)

    def profiles_of(self, project: str) -> dict:
        """The profiles (name -> Profile) instances of `project` use: those of its effective
        profiles project."""
        return self.services.profiles.in_project(project)

    def profile_inputs(self, rec: Record) -> list[dict]:
        profiles = self.profiles_of(rec.project)
        return [profiles[p].as_expand_input() for p in rec.profiles if p in profiles]

    def expanded(self, name: str) -> tuple[dict, dict]:
        rec = self.record(name)
        return validation.expand(self.profile_inputs(rec), rec.config, rec.devices)

    def keys_using_profile(self, profile_project: str, profile: str) -> list[str]:
        """The instances using profile `profile` of project `profile_project`: those of every
        project whose effective profiles project it is."""
        projects = {p for p in self.projects.names() if self.projects.effective(p, "profiles") == profile_project}
        return sorted(k for k, r in self.records.items() if r.project in projects and profile in r.profiles)

    def profile_renamed(self, profile_project: str, old: str, new: str) -> None:
        for k in self.keys_using_profile(profile_project, old):
            r = self.records[k]
            r.profiles = [new if p == old else p for p in r.profiles]

    def devices_dir(self, name: str) -> Path:
        """Host directory for the instance's unix device nodes ($LXD_DIR/devices/<key>, as LXD)."""
        return self.lxd_dir / "devices" / name

    def volume_dir(self, name: str, expanded_devices: dict | None = None) -> Path:
        pool = self._root_pool(expanded_devices if expanded_devices is not None else self.expanded(name)[1], name)
        project, api_name = self.ident(name)
        return self.services.storage.volumes.instance_path(pool, api_name, project)

    def _root_pool(self, expanded_devices: dict, name: str | None = None):
        """The pool of the root disk. Given the instance's `name`, one without a root disk (LXD
        lets profiles without devices take it away from a container) finds its volume's pool."""
        root = validation.root_disk(expanded_devices)
        if root is None and name is not None and self.services.storage is not None:
            project, api_name = self.ident(name)
            found = self.services.storage.volumes.find_instance_pool(api_name, project)
            if found is not None:
                return found
        if root is None:
            raise BadRequest("Failed getting root disk: No root device could be found")
        storage = self.services.storage
        pool_name = root[1].get("pool", "")
        if storage is None or pool_name not in storage.pools:
            raise BadRequest(f"Failed getting root disk: storage pool {pool_name!r} doesn't exist")
        return storage.pools[pool_name]

    def _desired_idmap(self, name: str, expanded_config: dict, current_next: str | None = None) -> IdmapSet:
        """The id map `name` gets from its expanded config. An isolated block is chosen and
        claimed (in self._idmap_claims, until the caller records it in volatile.idmap.next) in
        one synchronous step on the event loop, so parallel starts and creates can't pick the
        same block: no await between reading what is in use and claiming."""
        if is_true(expanded_config.get("security.privileged")):
            m = IdmapSet(())
        elif is_true(expanded_config.get("security.idmap.isolated")):
            try:
                size = int(expanded_config.get("security.idmap.size") or idmaps.ISOLATED_SIZE)
                base_s = expanded_config.get("security.idmap.base")
                base = int(base_s) if base_s else None
                (ub, us), (gb, gs) = idmaps.host_ranges()
                lo, hi = max(ub, gb), min(ub + us, gb + gs)
                in_use = idmaps.ranges_in_use(self._idmap_claims_of_others(name), lo, hi)
                prev = IdmapSet.from_json(current_next) if current_next else None
                m = idmaps.allocate_isolated(in_use, size, base=base, previous=prev)
            except ValueError as e:
                raise BadRequest(str(e)) from None
        else:
            m = idmaps.default_set()
        m = self._with_raw(m, expanded_config)
        self._idmap_claims[name] = (m, is_true(expanded_config.get("security.idmap.isolated")))
        return m

    def _idmap_claims_of_others(self, name: str) -> list[idmaps.Claim]:
        """What every other container holds of root's subordinate range, from its EXPANDED config
        (isolation set through a profile counts) and its recorded maps; plus the in-flight claims
        of creates and starts not recorded yet."""
        claims = []
        shared_base = idmaps.default_set()
        for other, r in list(self.records.items()):
            if other == name:
                continue
            try:
                ec = self.expanded(other)[0]
            except LXDError:
                ec = r.config
            privileged = is_true(ec.get("security.privileged"))
            isolated = not privileged and is_true(ec.get("security.idmap.isolated"))
            nxt = IdmapSet.from_json(r.config.get("volatile.idmap.next"))
            cur = IdmapSet.from_json(r.config.get("volatile.idmap.current")) if other in self.runtime \
                else IdmapSet(())
            try:
                shared = self._with_raw(shared_base, ec)
            except LXDError:
                shared = shared_base
            claims.append(idmaps.Claim(isolated, nxt, cur, shared))
        for other, (m, isolated) in list(self._idmap_claims.items()):
            if other != name and other not in self.records:  # a create in progress
                claims.append(idmaps.Claim(isolated, m, IdmapSet(()), IdmapSet(())))
        return claims

    @staticmethod
    def _with_raw(m: IdmapSet, expanded_config: dict) -> IdmapSet:
        raw = expanded_config.get("raw.idmap")
        if raw:
            try:
                m = idmaps.with_raw(m, idmaps.parse_raw_idmap(raw))
            except ValueError as e:
                raise BadRequest(str(e)) from None
        return m

    def _instance(self, rec: Record) -> Instance:
        ec, ed = validation.expand(self.profile_inputs(rec), rec.config, rec.devices)
        key = rec.key
        idir = self.lxcpath / key
        privileged = is_true(ec.get("security.privileged"))
        running_map = rec.config.get("volatile.idmap.current") or rec.config.get("volatile.idmap.next")
        return Instance(
            name=key, project=rec.project, api_name=rec.name, instance_dir=idir, rootfs=idir / "rootfs",
            log_dir=self.logs_root / key, lxcpath=self.lxcpath, expanded_config=ec,
            expanded_devices=ed, disk_idmap=IdmapSet.from_json(rec.config.get("volatile.last_state.idmap")),
            idmap=IdmapSet.from_json(running_map), privileged=privileged, lane=key,
            ephemeral=rec.ephemeral, architecture=rec.architecture, profiles=list(rec.profiles))

    # ------------------------------------------------------------------ contract (C2, B2)
    async def get(self, name: str) -> Instance:
        return self._instance(self.record(name))

    def status_of(self, name: str) -> tuple[str, int]:
        rt = self.runtime.get(name)
        if rt is None or rt.exited.is_set():
            return "Stopped", -1
        # The pidfd watch notices init's exit on the loop; between that and the callback, a
        # kill(pid, 0)-style check keeps answers exact (start time guards against pid reuse).
        if not rstate.alive(rt.pid, rt.start_time):
            return "Stopped", -1
        fz = rstate.freezer_state(rt.cgroups)
        return ("Frozen" if fz == "FROZEN" else "Running"), rt.pid

    async def runtime_state(self, name: str) -> tuple[str, int]:
        self.record(name)
        return self.status_of(name)

    @contextlib.asynccontextmanager
    async def frozen_rootfs(self, name: str) -> AsyncIterator[FrozenRootfs]:
        if "/" in name:
            # A snapshot (publish from `c1/snap0`): its tree doesn't change while the lock is held.
            parent, snap = name.split("/", 1)
            async with self.lock(parent):
                s = self.services.snapshots.get(parent, snap)
                pool = self._root_pool(self.expanded(parent)[1], parent)
                project, api_name = self.ident(parent)
                svol = self.services.storage.volumes.instance_volume(pool, api_name, project).snapshot(s.name)
                path = await pool.driver.mount_volume(svol)
                uid, gid = IdmapSet.from_json(s.config.get("volatile.last_state.idmap")).root_ids()
                try:
                    yield FrozenRootfs(path / "rootfs", path, uid, gid)
                finally:
                    await pool.driver.unmount_volume(svol)
            return
        async with self.lock(name):
            inst = await self.get(name)
            status, pid = self.status_of(name)
            froze = False
            if status == "Running":
                cg = self._cgroups(name)
                try:
                    await self._freeze_cg(name, cg, True)
                    froze = True
                except (OSError, LXDError):
                    raise BadRequest("The instance must be stopped") from None
            uid, gid = inst.disk_idmap.root_ids()
            try:
                yield FrozenRootfs(inst.rootfs, inst.instance_dir, uid, gid)
            finally:
                if froze:
                    with contextlib.suppress(OSError, LXDError):
                        await self._freeze_cg(name, cg, False)

    # ------------------------------------------------------------------ start-up
    async def load(self) -> None:
        self.loop = asyncio.get_running_loop()
        await asyncio.to_thread(self._prepare_dirs)

        records, pending = await self.store.load()
        for rec in records:
            self.records[rec.key] = rec
        await self._sweep(pending)
        await asyncio.to_thread(self._restore_links)
        await self._find_running()
        await asyncio.to_thread(self._secure_existing)

    def _secure_existing(self) -> None:
        """At start-up, fix the modes trees made by older versions have: each pool's own
        directories and image caches, and each instance volume (0100, owned by the running
        container's root, else by root)."""
        storage = self.services.storage
        for pool in (storage.pools.values() if storage is not None else []):
            try:
                pool.driver.secure_layout()
            except OSError as e:
                log.warning("couldn't fix the storage pool's modes", extra={"pool": pool.name, "err": str(e)})
        for name, rec in list(self.records.items()):
            uid = 0
            if name in self.runtime:
                uid = IdmapSet.from_json(rec.config.get("volatile.idmap.current")
                                         or rec.config.get("volatile.idmap.next")).root_ids()[0]
            try:
                vol = self.volume_dir(name)
                if vol.is_dir() and not vol.is_symlink():
                    self._root_pool(self.expanded(name)[1], name).driver.secure_instance_volume(vol, uid)
            except (LXDError, OSError) as e:
                log.warning("couldn't fix the instance volume's mode", extra={"instance": name, "err": str(e)})

    def _restore_links(self) -> None:
        for name in self.records:
            link = self.lxcpath / name
            if link.is_symlink() or link.exists():
                continue
            try:
                vol = self.volume_dir(name)
            except LXDError:
                continue
            if vol.is_dir():
                link.symlink_to(vol)
            (self.logs_root / name).mkdir(parents=True, exist_ok=True)

    def _prepare_dirs(self) -> None:
        for p in (self.lxcpath, self.logs_root):
            p.mkdir(parents=True, exist_ok=True)
        os.chmod(self.lxcpath, 0o711)
        self._ensure_traversable()

    def _ensure_traversable(self) -> None:
        """Container root (an unprivileged host uid) must be able to reach its rootfs: every
        ancestor of $LXD_DIR needs the search bit for others, as LXD requires. Checked at every
        start, since other tools (pytest's temporary-directory root, for one) reset modes."""
        for parent in [self.lxd_dir, *self.lxd_dir.parents]:
            try:
                mode = os.stat(parent).st_mode
            except OSError:
                continue
            if not mode & stat.S_IXOTH:
                log.warning("adding o+x to %s so containers can reach their root filesystems", parent)
                os.chmod(parent, stat.S_IMODE(mode) | stat.S_IXOTH)

    async def _sweep(self, pending: list[tuple[int, str]]) -> None:
        """Remove what a crash in the middle of a create left behind."""
        storage = self.services.storage
        for iid, name in pending:
            log.warning("removing half-created instance", extra={"instance": name})

            await self.store.delete(iid)
        known = set(self.records)
        if storage is not None:  # volumes no record names, half-made image caches, trash
            await storage.volumes.sweep([(r.project, r.name) for r in self.records.values()])
        with contextlib.suppress(OSError):
            for e in os.listdir(self.lxcpath):
                if e not in known:
                    p = self.lxcpath / e
                    if p.is_symlink():
                        p.unlink()
                    elif p.is_dir():
                        await asyncio.to_thread(_rmtree, p)
        # Only our own containers' leftovers: another daemon on this host (LXD itself, or a
        # second instance of this one) may be between creating a monitor cgroup and entering it.
        def sweep_monitors() -> None:
            for n in self.records:
                rstate.remove_monitor_cgroups(n)

        await asyncio.to_thread(sweep_monitors)

    async def _find_running(self) -> None:
        if not self.records:
            return
        found = await self.liblxc.lookup(sorted(self.records), str(self.lxcpath))
        for name, (st, pid) in found.items():
            if st in ("RUNNING", "FROZEN", "FREEZING", "THAWED") and pid > 0:
                self._track(name, pid)
                log.info("found running container", extra={"instance": name, "pid": pid})
        for name in sorted(self.records):
            if name not in self.runtime:
                await self._adopt_unreachable(name)

    async def _adopt_unreachable(self, name: str) -> bool:
        """liblxc answered "stopped", but that answer comes through its command socket, an
        abstract unix socket reachable only from the network namespace the container was started
        from. Decide from facts that don't depend on it: the container's cgroup still holds
        processes and its monitor's child (init) is inside it. Such a container is tracked by its
        init pid (stop, freeze, state and exec work through pidfd, cgroups and /proc), and never
        started a second time or deleted under itself."""
        pid = await asyncio.to_thread(rstate.find_running_init, str(self.lxcpath), name)
        if pid is None or name in self.runtime:
            return name in self.runtime
        try:
            self._track(name, pid)
        except OSError:
            return False
        self._unreachable.add(name)
        log.warning(f"Instance {name} is running (its cgroup still has processes, init pid {pid}) but liblxc's "
                    "command socket can't be reached from this daemon's network namespace; it is managed "
                    "through its init process, and start/delete are refused while it runs",
                    extra={"instance": name, "pid": pid})
        return True

    async def _refuse_if_alive(self, name: str, action: str) -> None:
        """Before booting or deleting a container the daemon believes stopped: refuse when its
        cgroup still holds processes (a copy liblxc can't see from this network namespace)."""
        if await self._adopt_unreachable(name):
            raise BadRequest(f"Can't {action} instance {self.ident(name)[1]!r}: it is running (its cgroup still has processes) "
                             "although liblxc can't reach it from this daemon's network namespace")

    # ------------------------------------------------------------------ runtime tracking
    def _track(self, name: str, pid: int) -> Runtime:
        return self.tracker.track(name, pid)

    def _on_exit(self, name: str, rt: Runtime) -> None:
        """init of a tracked container exited (the tracker no longer has it)."""
        self._spawn(self._cleanup_monitor(name))
        if not rt.stopping:
            self._spawn(self._unexpected_exit(name))

    async def _cleanup_monitor(self, name: str, timeout: float = 5.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            # Under the instance's lock: a start creates a new monitor cgroup and enters it a
            # moment later; an rmdir in between would make that start fail.
            async with self.lock(name):
                if name in self.runtime:
                    return  # started again: its monitor owns the cgroup now
                busy = await asyncio.to_thread(rstate.remove_monitor_cgroups, name)
            if not busy or asyncio.get_running_loop().time() > deadline:
                return
            await asyncio.sleep(0.05)

    async def _unexpected_exit(self, name: str) -> None:
        """init exited on its own: a reboot (liblxc restarts it) or a poweroff inside."""
        async with self.lock(name):
            if name not in self.records or name in self.runtime:
                return
            for _ in range(40):
                found = await self.liblxc.lookup([name], str(self.lxcpath), lane=name)
                st, pid = found.get(name, ["STOPPED", -1])
                if st == "RUNNING" and pid > 0:
                    self._track(name, pid)
                    self.lifecycle("instance-restarted", name)
                    return
                if st == "STOPPED" and name in self._unreachable:
                    # liblxc can't see it from here: ask the monitor process instead (it
                    # restarts init on a reboot, and exits once the container is down).
                    pid = await asyncio.to_thread(rstate.find_running_init, str(self.lxcpath), name)
                    if pid is not None:
                        self._track(name, pid)
                        self.lifecycle("instance-restarted", name)
                        return
                    if not await asyncio.to_thread(rstate.monitor_running, str(self.lxcpath), name):
                        break
                elif st == "STOPPED":
                    break
                await asyncio.sleep(0.05)
            self._unreachable.discard(name)
            await self._close_volume(name)
            await self._set_volatile(name, {"volatile.last_state.power": "STOPPED"})
            self.lifecycle("instance-shutdown", name)
            rec = self.records.get(name)
            if rec is not None and rec.ephemeral:
                await self._delete_locked(name, None)

    # ------------------------------------------------------------------ DB helpers
    def set_volatile_soon(self, name: str, values: dict[str, str | None]) -> None:
        """Set volatile keys in memory now and in the store in the background (the one DB thread
        keeps writes in order): for runtime state recorded on a hot path (a nic's host_name)."""
        rec = self.records.get(name)
        if rec is None:
            return
        for k, v in values.items():
            if v is None:
                rec.config.pop(k, None)
            else:
                rec.config[k] = v
        self._spawn(_quietly(self.store.set_config_keys(rec.id, dict(values))))

    async def _set_volatile(self, name: str, values: dict[str, str | None], *,
                            last_used_at: str | None = None) -> None:
        rec = self.records.get(name)
        if rec is None:
            return
        await self.store.set_config_keys(rec.id, values, last_used_at=last_used_at)
        for k, v in values.items():
            if v is None:
                rec.config.pop(k, None)
            else:
                rec.config[k] = v

    # ------------------------------------------------------------------ rendering
    def etag(self, rec: Record) -> tuple:
        return (rec.architecture, rec.config, rec.devices, rec.ephemeral, rec.profiles, rec.description)

    def render(self, rec: Record, *, full: bool = False, cached_net: bool = False) -> dict:
        ec, ed = validation.expand(self.profile_inputs(rec), rec.config, rec.devices)
        key = rec.key
        status, pid = self.status_of(key)
        out = {
            "architecture": rec.architecture,
            "config": dict(rec.config),
            "devices": {k: dict(v) for k, v in rec.devices.items()},
            "ephemeral": rec.ephemeral,
            "profiles": list(rec.profiles),
            "stateful": rec.stateful,
            "description": rec.description,
            "created_at": rec.created_at,
            "expanded_config": ec,
            "expanded_devices": ed,
            "name": rec.name,
            "status": status,
            "status_code": STATUS_CODES[status],
            "last_used_at": rec.last_used_at or EPOCH_TIME,  # LXD: never started = Unix time 0
            "location": "none",
            "type": rec.type,
            "project": rec.project,
        }
        if full:
            out["state"] = self.state_of(key, status, pid, cached_net=cached_net)
            snaps = self.services.snapshots
            out["snapshots"] = snaps.render_all(key) if snaps is not None else []
            out["backups"] = []
        return out

    # Listing many instances reuses each one's network part (addresses and counters read from
    # /proc/PID/net/*, the costliest reads) for up to this long; a single instance's state is
    # always read fresh.
    NET_TTL = 1.0

    def state_of(self, name: str, status: str | None = None, pid: int | None = None, *,
                 cached_net: bool = False) -> dict:
        if status is None:
            status, pid = self.status_of(name)
        if status == "Stopped" or not pid or pid <= 0:
            return rstate.stopped_state()
        rt = self.runtime.get(name)
        net = None
        if rt is not None:
            now = time.monotonic()
            if cached_net and rt.net is not None and now - rt.net_at < self.NET_TTL:
                net = rt.net
            else:
                net = rstate.network(pid, self._nic_host_names(name), rt.links)
                rt.net, rt.net_at = net, now
        return rstate.full_state(pid, "FROZEN" if status == "Frozen" else "THAWED",
                                 rt.cgroups if rt is not None and rt.cgroups else None, net)

    def _nic_host_names(self, name: str) -> dict[str, str]:
        """{interface inside: host end} of the instance's veth-based nics (their volatile keys)."""
        rec = self.records.get(name)
        if rec is None or not any(k.endswith(".host_name") for k in rec.config):
            return {}
        out = {}
        for dname, dev in self.expanded(name)[1].items():
            host = rec.config.get(f"volatile.{dname}.host_name")
            if dev.get("type") == "nic" and host:
                out[dev.get("name") or rec.config.get(f"volatile.{dname}.name", "")] = host
        return out

    async def render_many(self, names: list[str], *, full: bool) -> list[dict]:
        recs = [self.records[n] for n in names if n in self.records]
        if not full:
            return [self.render(r) for r in recs]
        # /proc and cgroup reads for many containers off the event loop in one go, with the
        # disk usage of each (instances/disk_usage.py: its listing cache)
        from lxd_daemon.instances.disk_usage import render_many_full

        return await render_many_full(self, recs)

    # ------------------------------------------------------------------ create
    def reserve(self, key: str) -> None:
        """Hold the key of an instance being made (its API name validated)."""
        project, name = split(key)
        validate_name(name)
        if self.projects is not None:
            self.projects.check_open(project)  # not one being deleted or renamed meanwhile
        if key in self.records or key in self._reserved:
            raise Conflict(f"Instance {name!r} already exists")
        self._reserved.add(key)

    def reserved_keys(self) -> list[str]:
        """Keys of instances being created (reserved, not recorded yet)."""
        return [k for k in self._reserved if k not in self.records]

    def random_name(self, project: str) -> str:
        """A free API name in `project` (`lxc launch IMAGE` without a name)."""
        import secrets

        for _ in range(100):
            name = f"{secrets.choice(_ADJECTIVES)}-{secrets.choice(_NOUNS)}"
            key = storage_name(project, name)
            if key not in self.records and key not in self._reserved:
                return name
        return f"c{uuid.uuid4().hex[:12]}"

    def release(self, key: str) -> None:
        self._reserved.discard(key)
        self.projects.release(*split(key))

    # ------------------------------------------------------------------ project limits/restrictions
    def policy_entities(self, project: str, profile: tuple | None = None
                        ) -> tuple[list[project_policy.Entity], list[project_policy.Entity]]:
        """The project's instances (recorded, or claimed by a change in flight), expanded and named
        by their API names, and the profiles of its effective profiles project; `profile` =
        (name, config, devices) stands for that profile's proposed state."""
        profs = {n: (p.config, p.devices) for n, p in self.profiles_of(project).items()}
        if profile is not None:
            profs[profile[0]] = (profile[1], profile[2])
        local = {r.name: (r.config, r.devices, r.profiles, r.type) for r in self.records.values()
                 if r.project == project}
        local.update(self.projects.claims.get(project, {}))
        instances = []
        for n, (c, d, ps, t) in sorted(local.items()):
            pin = [{"config": profs[p][0], "devices": profs[p][1]} for p in ps if p in profs]
            ec, ed = validation.expand(pin, c, d)
            instances.append(project_policy.Entity(n, ec, ed, t))
        profiles = [project_policy.Entity(n, dict(c), {k: dict(v) for k, v in d.items()}, "profile")
                    for n, (c, d) in sorted(profs.items())]
        return instances, profiles

    def policy_check(self, kind: str, key: str, config: dict, devices: dict, profiles: list[str], *,
                     project: str, current: dict | None = None, strip: bool = False,
                     itype: str = "container") -> None:
        """Check a create ("create") or an update ("update") of instance `key` of `project` against
        the project's limits and restrictions, and claim it (release() or policy_done() drops the
        claim). Synchronous: no other change can pass between the check and the claim."""
        kp, name = split(key)
        if kp != project:
            raise ValueError(f"instance key {key!r} is not of project {project!r}")
        cfg = self.projects.config(project)
        if project_policy.has_limits_or_restrictions(cfg):
            instances, profs = self.policy_entities(project)
            pmap = {p.name: p for p in profs}
            pin = [{"config": pmap[p].config, "devices": pmap[p].devices} for p in profiles if p in pmap]
            ec, ed = validation.expand(pin, config, devices)
            change = project_policy.Change(kind, project_policy.Entity(name, ec, ed, itype), local=dict(config),
                                           current=dict(current or {}), strip=strip)
            project_policy.check(project, cfg, instances, profs, change, self.projects.volume_entities(project))
        self.projects.claim(project, name, (dict(config), {k: dict(v) for k, v in devices.items()},
                                            list(profiles), itype))

    def policy_done(self, key: str) -> None:
        self.projects.release(*split(key))

    async def adopt_record(self, rec: Record, pool, extra_sql=None) -> None:
        """Record an instance whose volume exists on `pool` but whose rows were lost (`lxd
        recover`; the caller holds the name through reserve()): the rows in one transaction
        (`extra_sql(session, instance_id)` adds its own, e.g. snapshots), then the lxcpath link
        and log directory. The volume is closed to every host user until a start opens it."""
        vol = self.services.storage.volumes.instance_path(pool, rec.name, rec.project)
        key = rec.key

        def ins(session):
            iid = self.store.insert(session, rec)
            if extra_sql is not None:
                extra_sql(session, iid)

        await self.db.run(ins)

        def links() -> None:
            link = self.lxcpath / key
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(vol)
            (self.logs_root / key).mkdir(parents=True, exist_ok=True)
            os.chmod(self.logs_root / key, 0o700)
            pool.driver.secure_instance_volume(vol, 0)

        try:
            await asyncio.to_thread(links)
        except BaseException:
            await self.store.delete(rec.id)
            raise
        self.records[key] = rec

    async def forget_record(self, name: str) -> None:
        """Undo adopt_record(): the rows and links go, the volume stays."""
        rec = self.records.pop(name, None)
        if rec is None:
            return
        await self.store.delete(rec.id)
        await asyncio.to_thread(_remove_paths, self.lxcpath / name)

    async def prepare_create(self, body, project: str, *, new_instance: bool = True) -> dict:
        """Validate a create request of instance `body.name` of `project` (the caller's, before
        the operation starts); returns the plan (with the project and the key). A new instance
        (not a pool move's copy) is checked against the project's limits and restrictions, and
        claimed until release(key). A copy's source is an instance of `project`, or of
        `source.project` (the router checks the caller may see that one)."""
        name = body.name
        key = storage_name(project, name)
        if body.type not in ("", "container"):
            raise BadRequest(f"Instance type {body.type!r} is not supported (only containers)")
        profiles = ["default"] if body.profiles is None else list(body.profiles)
        config = {k: v for k, v in (body.config or {}).items() if v != ""}
        devices = {k: dict(v) for k, v in (body.devices or {}).items()}
        source = body.source or {}
        stype = source.get("type") or ("none" if not source else "")
        image = None
        src_rec = None
        src_snap = None
        if stype == "image":
            if source.get("server") or source.get("mode") == "pull":
                raise BadRequest("Creating instances from remote images is not supported yet")
            image = await self._resolve_image(source, project)
            if body.profiles is None and image.get("profiles") is not None:
                profiles = list(image["profiles"])  # an image's profiles apply when none are given
            props = image.get("properties") or {}
            for k, v in props.items():
                config.setdefault(f"image.{k}", str(v))
            config["volatile.base_image"] = image["fingerprint"]
        elif stype == "copy":
            src = source.get("source") or ""
            src_project = source.get("project") or project
            self.projects.get(src_project)  # 404 "Project not found"
            snap_name = None
            if "/" in src:  # `lxc copy c1/snap0 c2`: from a snapshot
                src, _, snap_name = src.partition("/")
            src_key = storage_name(src_project, src)
            src_rec = self.record(src_key)
            if snap_name is not None:
                src_snap = self.services.snapshots.get(src_key, snap_name)
            if src_snap is not None:
                # The snapshot's config, devices, profiles and architecture, under the source's id.
                from dataclasses import replace as _replace

                src_rec = _replace(src_rec, config=dict(src_snap.config),
                                   devices={k: dict(v) for k, v in src_snap.devices.items()},
                                   profiles=list(src_snap.profiles),
                                   architecture=src_snap.architecture or src_rec.architecture)
            base = dict(src_rec.config)
            base = {k: v for k, v in base.items()
                    if not k.startswith("volatile.") or k in ("volatile.base_image", "volatile.last_state.idmap")}
            base.update(config)
            config = base
            if body.profiles is None:
                profiles = list(src_rec.profiles)
            devices = {**{k: dict(v) for k, v in src_rec.devices.items()}, **devices}
        elif stype == "migration":
            raise NotImplementedYet("Instance migration is not implemented yet")
        elif stype != "none":
            raise BadRequest(f"Unknown source type {stype!r}")
        known_profiles = self.profiles_of(project)
        for p in profiles:
            if p not in known_profiles:
                raise BadRequest(f"Requested profile {p!r} doesn't exist")
        if len(set(profiles)) != len(profiles):
            raise BadRequest("Duplicate profile found in request")
        user_cfg = {k: v for k, v in config.items() if not k.startswith(("volatile.", "image."))}
        validation.validate_config(user_cfg)
        from lxd_daemon.instances.lxcconf import check_raw_lxc

        await check_raw_lxc(self.liblxc, user_cfg.get("raw.lxc"))
        storage = self.services.storage
        validation.validate_devices(devices, pools=set(storage.pools) if storage else set())
        pinputs = [known_profiles[p].as_expand_input() for p in profiles]
        ec, ed = validation.expand(pinputs, config, devices)
        pool = self._root_pool(ed)
        await check_volumes(self.services, ed, project=project)  # custom volumes named by disks exist
        from lxd_daemon.devices.nic import check_nics

        await check_nics(self.services, ed, instance=key, expanded=ed)  # networks exist, addresses are free
        arch = body.architecture or (image or {}).get("architecture") or (
            src_rec.architecture if src_rec else host_architecture())
        with_snaps = stype == "copy" and src_snap is None and not (
            source.get("instance_only") or source.get("container_only"))
        if new_instance:  # after the last await: the check and the claim are one step
            self.policy_check("create", key, config, devices, profiles, project=project, strip=stype == "copy")
        return {"name": name, "project": project, "key": key, "profiles": profiles, "config": config, "devices": devices, "image": image,
                "expanded_devices": ed,
                "source_rec": src_rec, "pool": pool, "expanded_config": ec, "architecture": arch,
                "source_snapshot": src_snap.name if src_snap is not None else None,
                "with_snapshots": with_snaps, "copy_snapshots": [],
                "ephemeral": bool(body.ephemeral), "description": body.description or "", "stype": stype}

    async def _resolve_image(self, source: dict, project: str) -> dict:
        """The image a create names, among those `project` sees (its effective images project)."""
        images = self.services.images
        if images is None:
            raise BadRequest("Images are not available on this server")
        if source.get("fingerprint"):
            return await images.resolve(source["fingerprint"], project=project)
        if source.get("alias"):
            return await images.resolve(source["alias"], project=project)
        if source.get("properties"):
            finder = getattr(images, "find_by_properties", None)
            if finder is None:
                raise BadRequest("Selecting images by properties is not supported yet")
            return await finder(source["properties"], project=project)
        raise BadRequest("No image given: set source alias, fingerprint or properties")

    async def create(self, plan: dict) -> None:
        """Make the instance: the volume (from a ready copy of the image cache), its links, then
        the record. Any failure undoes every step (revert stack)."""
        name, project, key = plan["name"], plan["project"], plan["key"]
        pool = plan["pool"]
        config = dict(plan["config"])
        ec = plan["expanded_config"]
        desired = self._desired_idmap(key, ec)
        if desired.empty:
            config["volatile.idmap.base"] = "0"
        else:
            config["volatile.idmap.base"] = str(desired.root_ids()[0])
        config["volatile.idmap.next"] = desired.to_json()
        config.setdefault("volatile.uuid", str(uuid.uuid4()))
        config.update(cloudinit.on_create(config))  # a copy's too: volatile keys aren't copied
        from lxd_daemon.devices.nic.common import volatile_defaults

        config.update(volatile_defaults(plan.get("expanded_devices") or {}, config))  # nics' MAC and name
        if plan["stype"] == "image":
            config["volatile.apply_template"] = "create"
        elif plan["stype"] == "copy":
            config["volatile.apply_template"] = "copy"
        created = rfc3339()
        rec = Record(0, name, plan["architecture"], plan["ephemeral"], False, plan["description"], created, "",
                     config, plan["devices"], plan["profiles"], project=project)
        volumes = self.services.storage.volumes
        vol = volumes.instance_path(pool, name, project)
        link = self.lxcpath / key
        logdir = self.logs_root / key
        t0 = _now()
        marks: dict[str, float] = {}
        # Order for crash safety: volume, then the record in ONE transaction. A crash before the
        # commit leaves a volume without a record, which the start-up sweep removes; after it,
        # the instance is complete (load() restores a missing lxcpath link). The name is held in
        # memory (reserve()) meanwhile. Rows flagged `pending` by older versions are swept too.
        try:
            async with Revert() as revert:
                await self._create_locked(plan, rec, revert, desired, vol, link, logdir, marks, t0)
                revert.success()
        except BaseException:
            self._idmap_claims.pop(key, None)
            raise
        self.records[key] = rec
        self._idmap_claims.pop(key, None)  # recorded in rec.config's volatile.idmap.next now
        self.refresh_backup_yaml(key)  # after the commit, off the launch's path
        marks["done_ms"] = _now() - t0
        log.debug("created", extra={"instance": key, **{k: round(v, 1) for k, v in marks.items()}})
        if plan["image"] is not None:
            mark = getattr(self.services.images, "mark_used", None)
            if mark is not None:
                self._spawn(_quietly(mark(plan["image"]["fingerprint"], project)))  # off the launch's path

    async def _create_locked(self, plan: dict, rec: Record, revert: Revert, desired: IdmapSet, vol: Path,
                             link: Path, logdir: Path, marks: dict, t0: float) -> None:
        name, pool, config = rec.name, plan["pool"], rec.config
        volumes = self.services.storage.volumes
        # The volume (a leftover of a crash under this name is removed first: no record has it).
        disk_map = await self._make_volume(plan, vol, desired)
        revert.add(volumes.delete_instance_volume, pool, rec.project, name, background=False)
        # Closed to every host user until a start opens it to the container's own root.
        await asyncio.to_thread(pool.driver.secure_instance_volume, vol, 0)
        marks["volume_ms"] = _now() - t0
        config["volatile.last_state.idmap"] = disk_map.to_json()

        def finish_fs():
            logdir.mkdir(parents=True, exist_ok=True)
            os.chmod(logdir, 0o700)
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(vol)

        revert.add(asyncio.to_thread, _remove_paths, link, logdir)
        finish_fs()  # three metadata syscalls: cheaper inline than a thread hop
        marks["fs_ms"] = _now() - t0

        if plan.get("copy_snapshots"):
            # The copied snapshots' rows, in the same transaction as the instance's.
            snaps = self.services.snapshots

            def ins(session):
                iid = self.store.insert(session, rec)
                return snaps.insert_rows_sql(session, iid, plan["copy_snapshots"])

            snaps.adopt(await self.db.run(ins))
        else:
            await self.store.add(rec)

    async def _make_volume(self, plan: dict, vol: Path, desired: IdmapSet) -> IdmapSet:
        """Create the instance volume through storage (whatever the pool's driver); returns the id
        map its files are stored with."""
        pool = plan["pool"]
        name, project = plan["name"], plan["project"]
        volumes = self.services.storage.volumes
        if plan["stype"] == "none":
            uid, gid = desired.root_ids()

            async def fill(path: Path) -> None:
                def mk():
                    (path / "rootfs").mkdir(mode=0o755)
                    os.chown(path / "rootfs", uid, gid)

                await asyncio.to_thread(mk)

            await volumes.create_empty_instance_volume(pool, project, name, filler=fill)
            return desired
        if plan["stype"] == "copy":
            src = plan["source_rec"]
            skey = src.key
            async with self.lock(skey):
                src_pool = self._root_pool(self.expanded(skey)[1], skey)
                src_name = src.name
                if plan.get("source_snapshot"):
                    src_name = f"{src.name}/{plan['source_snapshot']}"
                elif plan.get("with_snapshots"):  # the snapshots as they are now, under the lock
                    plan["copy_snapshots"] = self.services.snapshots.copy_records(skey)
                # A running source is frozen while its tree is copied, on drivers whose copies
                # aren't atomic snapshots (dir), as LXD does.
                cg = None
                if (src_name == src.name and not src_pool.driver.info.cow_snapshots
                        and self.status_of(skey)[0] == "Running"):
                    with contextlib.suppress(OSError, LXDError):
                        await self._freeze_cg(skey, self._cgroups(skey), True)
                        cg = self._cgroups(skey)
                try:
                    async with self.backup_yaml_lock(skey):
                        await volumes.copy_instance_volume(src_pool, src_name, pool, name,
                                                           src_project=src.project, project=project,
                                                           snapshots=bool(plan.get("copy_snapshots")))
                finally:
                    if cg is not None:
                        with contextlib.suppress(OSError, LXDError):
                            await self._freeze_cg(skey, cg, False)
            return IdmapSet.from_json(src.config.get("volatile.last_state.idmap"))
        # From the image: an image volume's CoW child, or a copy of the unpacked, shifted cache.
        fp = plan["image"]["fingerprint"]
        uid, gid = desired.root_ids()

        async def unpack(path: Path) -> None:
            await self.services.images.unpack(fp, path, uid_shift=uid, gid_shift=gid)

        await volumes.create_instance_volume(pool, project, name, fp, unpack, f"{uid}_{gid}")
        if desired.empty:
            return IdmapSet(())
        return _simple_map(desired, uid, gid)

    # ------------------------------------------------------------------ update
    async def update(self, name: str, *, architecture: str | None, config: dict, devices: dict,
                     profiles: list[str], ephemeral: bool, description: str) -> None:
        async with self.lock(name):
            rec = self.record(name)
            known_profiles = self.profiles_of(rec.project)
            for p in profiles:
                if p not in known_profiles:
                    raise BadRequest(f"Requested profile {p!r} doesn't exist")
            if len(set(profiles)) != len(profiles):
                raise BadRequest("Duplicate profile found in request")
            config = {k: v for k, v in config.items() if v != ""}  # an empty value unsets the key
            for k in MANAGED_VOLATILE:
                if k not in config and k in rec.config:
                    config[k] = rec.config[k]
            asked = dict(config)  # the local config as asked (volatile keys checked by the project)
            validation.validate_config({k: v for k, v in config.items() if not k.startswith("image.")})
            if config.get("raw.lxc") != rec.config.get("raw.lxc"):
                from lxd_daemon.instances.lxcconf import check_raw_lxc

                await check_raw_lxc(self.liblxc, config.get("raw.lxc"))
            storage = self.services.storage
            validation.validate_devices(devices, pools=set(storage.pools) if storage else set())
            pinputs = [known_profiles[p].as_expand_input() for p in profiles]
            new = validation.expand(pinputs, config, devices)
            old = validation.expand(self.profile_inputs(rec), rec.config, rec.devices)
            from lxd_daemon.devices.nic.common import drop_gone, keep_volatile, volatile_defaults

            config.update(keep_volatile(rec.config, config, new[1]))  # the nics' kept MAC, name, host end
            config.update(volatile_defaults(new[1], config))
            config = drop_gone(config, old[1], new[1])
            config.update(cloudinit.on_update(old, new, config))  # a new instance-id when cloud-init's input changed
            await check_volumes(self.services, {k: d for k, d in new[1].items() if old[1].get(k) != d},
                                project=rec.project)
            from lxd_daemon.devices.nic import check_nics

            await check_nics(self.services, {k: d for k, d in new[1].items() if old[1].get(k) != d}, instance=name,
                             expanded=new[1])
            # As LXD: the expanded devices need a root disk unless there are none at all (then
            # the container keeps its volume but can't start until it gets one back).
            if new[1] and validation.root_disk(new[1]) is None:
                raise BadRequest("Invalid expanded devices: Failed detecting root disk device: "
                                 "No root device could be found")
            if new[1] and self._root_pool(new[1]) is not self._root_pool(old[1], name):
                raise BadRequest("Changing the root disk's storage pool is not supported")
            self._check_expanded(new[0])
            self.policy_check("update", name, asked, devices, profiles, project=rec.project, current=rec.config,
                              itype=rec.type)
            try:
                status, pid = self.status_of(name)
                if status != "Stopped":
                    await self._apply_live(name, old, new, pid)
                    from lxd_daemon.devices.nic.common import after_live

                    config = after_live(self.records[name].config, config, new[1])
                newrec = Record(rec.id, rec.name, architecture or rec.architecture, ephemeral, rec.stateful,
                                description, rec.created_at, rec.last_used_at, config,
                                {k: dict(v) for k, v in devices.items()}, list(profiles), rec.type, rec.project)
                await self.store.save(newrec)
                self.records[name] = newrec
            finally:
                self.policy_done(name)
            self.refresh_backup_yaml(name)
            if status == "Stopped":  # devices that left remove what they keep on the host
                gone = {k: d for k, d in old[1].items() if new[1].get(k) != d}
                if gone:
                    await device_lifecycle.remove_devices(load_all(gone), self.device_context(name, IdmapSet(())))

    @staticmethod
    def _check_expanded(ec: dict) -> None:
        from lxd_daemon.instances import config as cfgmod

        cfgmod.check_expanded(ec)

    async def _apply_live(self, name: str, old: tuple, new: tuple, pid: int) -> None:
        from lxd_daemon.instances import live

        inst = self._instance(self.records[name])
        # Live limits are written to the cgroups of init's pid (runtime/hotplug.py): only while
        # that pid is still inside the container's own cgroup (an exiting init is in the root one).
        if not rstate.alive(pid, None) or not rstate.container_cgroups(name, pid):
            raise BadRequest("The instance isn't running")
        await live.apply_live(self.liblxc, name, old, new, init_pid=pid, idmap=inst.idmap,
                              privileged=inst.idmap.empty, devices_dir=self.devices_dir(name), instances=self)

    async def check_profile_change(self, profile_project: str, profile: str, config: dict, devices: dict) -> None:
        """Before profile `profile` of project `profile_project` takes this config and these
        devices: the limits and restrictions of every project using it (those whose effective
        profiles project it is), then every instance using it."""
        for project in self.projects.names():
            if self.projects.effective(project, "profiles") != profile_project:
                continue
            cfg = self.projects.config(project)
            if project_policy.has_limits_or_restrictions(cfg):  # the project's limits and restrictions
                instances, profs = self.policy_entities(project, (profile, config, devices))
                change = project_policy.Change("profile", profile=project_policy.Entity(profile, config, devices,
                                                                                        "profile"))
                project_policy.check(project, cfg, instances, profs, change,
                                     self.projects.volume_entities(project))
        for n in self.keys_using_profile(profile_project, profile):
            rec = self.records[n]
            known = self.profiles_of(rec.project)
            pinputs = [({"config": config, "devices": devices} if p == profile else known[p].as_expand_input())
                       for p in rec.profiles if p == profile or p in known]
            ec, ed = validation.expand(pinputs, rec.config, rec.devices)
            try:
                self._check_expanded(ec)
                if ed:  # as in update(): no devices at all is allowed
                    self._root_pool(ed)
                old_ed = self.expanded(n)[1]
                await check_volumes(self.services, {k: d for k, d in ed.items() if old_ed.get(k) != d},
                                    project=rec.project)
            except LXDError as e:
                where = "" if rec.project == project_policy.DEFAULT else f" in project {rec.project!r}"
                raise BadRequest(f"Failed to update instance {rec.name!r}{where}: {e.message}") from None

    async def apply_profile_change(self, before: dict[str, tuple], best_effort: bool = False) -> None:
        for n, old in before.items():
            if n not in self.records:
                continue
            status, pid = self.status_of(n)
            if status == "Stopped":
                continue
            try:
                await self._apply_live(n, old, self.expanded(n), pid)
            except Exception:
                if not best_effort:
                    raise
                log.exception("profile change: live apply failed", extra={"instance": n})
        if not best_effort:  # (best_effort: a rollback to what the instances had)
            for n, old in before.items():
                rec = self.records.get(n)
                rotated = cloudinit.on_update(old, self.expanded(n), rec.config) if rec is not None else {}
                if rotated:
                    await self._set_volatile(n, rotated)
                    self.refresh_backup_yaml(n)

    # ------------------------------------------------------------------ delete / rename
    async def delete(self, name: str, requestor: dict | None) -> None:
        async with self.lock(name):
            self.record(name)
            status, _ = self.status_of(name)
            if status != "Stopped":
                raise BadRequest("Instance is running")
            await self._refuse_if_alive(name, "delete")
            await self._delete_locked(name, requestor)

    async def _delete_locked(self, name: str, requestor: dict | None) -> None:
        rec = self.record(name)
        url = self.url(name)
        try:
            devices = load_all(self.expanded(name)[1])
        except LXDError:
            devices = []
        try:
            pool = self._root_pool(self.expanded(name)[1], name)
        except LXDError:
            pool = None

        await self.store.delete(rec.id)
        del self.records[name]
        if self.services.snapshots is not None:
            self.services.snapshots.forget(rec.id)  # its rows went with it (ON DELETE CASCADE)
        # The lock stays: a task still waiting on it (monitor cgroup clean-up) and a new instance
        # of the same name must serialise on the same object.
        if pool is not None:
            # Renamed out of the way now (instant), removed in the background; a crash before
            # that finishes leaves a `.trash-*` volume, which the start-up sweep removes.
            await self.services.storage.volumes.delete_instance_volume(pool, rec.project, rec.name)
        # each device removes what it keeps on the host; then no disk mount may be left in its dir
        await device_lifecycle.remove_devices(devices, self.device_context(name, IdmapSet(())))
        await asyncio.to_thread(unmount_under, self.devices_dir(name))
        await asyncio.to_thread(_remove_paths, self.lxcpath / name, self.logs_root / name, self.devices_dir(name))
        from lxd_daemon.instances.lxcconf import remove_seccomp_policy

        await asyncio.to_thread(remove_seccomp_policy, self.lxcpath, name)  # its policy goes with it
        from lxd_daemon.warnings import forget_warnings

        await forget_warnings(self.services, url)  # (autostart, scheduled snapshots)
        self.services.events.lifecycle("instance-deleted", url, requestor=requestor, project=rec.project)

    async def rename(self, name: str, new_name: str) -> str:
        """Rename instance `name` (a key) to the API name `new_name` in its project; returns the
        new key."""
        validate_name(new_name)
        async with self.lock(name):
            rec = self.record(name)
            new = storage_name(rec.project, new_name)
            if self.status_of(name)[0] != "Stopped":
                raise BadRequest("Renaming of running instance not allowed")
            if new in self.records or new in self._reserved:
                raise Conflict(f"Name {new_name!r} already in use")
            pool = self._root_pool(self.expanded(name)[1], name)
            volumes = self.services.storage.volumes
            old_vol = volumes.instance_path(pool, rec.name, rec.project)
            new_vol = await volumes.rename_instance_volume(pool, rec.project, rec.name, new_name)

            def mv():
                (self.lxcpath / name).unlink(missing_ok=True)
                (self.lxcpath / new).symlink_to(new_vol)
                if (self.logs_root / name).exists():
                    os.rename(self.logs_root / name, self.logs_root / new)
                unmount_under(self.devices_dir(name))
                _remove_paths(self.devices_dir(name))  # re-made at the next start

            def back():
                (self.lxcpath / new).unlink(missing_ok=True)
                (self.lxcpath / name).unlink(missing_ok=True)
                (self.lxcpath / name).symlink_to(old_vol)
                if (self.logs_root / new).exists():
                    os.rename(self.logs_root / new, self.logs_root / name)

            async with Revert() as revert:
                revert.add(volumes.rename_instance_volume, pool, rec.project, new_name, rec.name)
                revert.add(asyncio.to_thread, back)
                await asyncio.to_thread(mv)
                await self.store.rename(rec.id, new_name)
                revert.success()
            del self.records[name]
            rec.name = new_name
            self.records[new] = rec
            await self._set_volatile(new, cloudinit.on_rename())  # cloud-init runs again under the new name
            self.refresh_backup_yaml(new)
            from lxd_daemon.instances.lxcconf import remove_seccomp_policy

            await asyncio.to_thread(remove_seccomp_policy, self.lxcpath, name)  # re-made at the next start
            from lxd_daemon.devices.nic import forget_hosts

            await forget_hosts(self.services, name, self.expanded(new)[1])  # DHCP entries of the old name
        return new

    # ------------------------------------------------------------------ lifecycle
    async def start(self, name: str) -> None:
        t0 = _now()
        rec = self.record(name)
        status, pid = self.status_of(name)
        if status == "Frozen":
            await self._freeze_cg(name, self._cgroups(name), False)
            return
        if status == "Running":
            raise BadRequest("The instance is already running")
        if not rstate.cgroupfs_mounted():
            # liblxc would boot it outside any cgroup (no limits, no freezer, and a container no
            # later daemon can recognise as running): `ip netns exec` remounts /sys, for one.
            raise LXDError("Failed to start the instance: the cgroup filesystem isn't mounted in the daemon's "
                           "mount namespace (/sys/fs/cgroup); `ip netns exec` hides it: enter a network "
                           "namespace with `nsenter --net=/run/netns/NAME` instead")
        await self._refuse_if_alive(name, "start")
        ec, ed = validation.expand(self.profile_inputs(rec), rec.config, rec.devices)
        self._root_pool(ed)
        self._check_expanded(ec)
        hostname = rec.name  # the API name (the key may carry the project)
        desired = self._desired_idmap(name, ec, rec.config.get("volatile.idmap.next"))
        # Recorded in memory in the same synchronous step as the choice (the store follows with
        # the other updates below): a parallel start sees this block as taken.
        rec.config["volatile.idmap.next"] = desired.to_json()
        self._idmap_claims.pop(name, None)
        disk = IdmapSet.from_json(rec.config.get("volatile.last_state.idmap"))
        idir = self.lxcpath / name
        rootfs = idir / "rootfs"
        updates: dict[str, str | None] = {}
        if disk != desired:
            n = await asyncio.to_thread(shift_tree, rootfs, disk, desired)
            log.info("shifted root filesystem", extra={"instance": name, "entries": n})
            updates["volatile.last_state.idmap"] = desired.to_json()
        updates["volatile.idmap.next"] = desired.to_json()
        updates["volatile.idmap.current"] = desired.to_json()
        updates["volatile.idmap.base"] = str(desired.root_ids()[0]) if not desired.empty else "0"
        if updates.get("volatile.last_state.idmap"):
            await self._set_volatile(name, {"volatile.last_state.idmap": updates["volatile.last_state.idmap"]})
        logdir = self.logs_root / name
        t1 = _now()
        await self._apply_templates(rec, idir, rootfs, ec, ed, desired)
        t2 = _now()
        if rec.config.get("volatile.apply_template"):
            updates["volatile.apply_template"] = None
        conf = logdir / "lxc.conf"
        ctx = self.device_context(name, desired)
        async with Revert() as revert:
            # Each device prepares the host (volumes mounted and shifted, block devices mounted
            # on the host); a later failure undoes the devices already started.
            run_configs = await device_lifecycle.start_devices(load_all(ed), ctx, revert)
            try:
                text_ = await asyncio.to_thread(self._render_lxc, name, idir, rootfs, logdir, ec, ed, desired,
                                                run_configs, hostname)

                def write_conf():
                    logdir.mkdir(parents=True, exist_ok=True)
                    tmp = conf.with_name(".lxc.conf.tmp")
                    tmp.write_text(text_)
                    os.replace(tmp, conf)

                await asyncio.to_thread(write_conf)
                # The volume directory: traversable by the container's root only (as LXD's start does).
                await asyncio.to_thread(self._root_pool(ed).driver.secure_instance_volume, idir,
                                        desired.root_ids()[0])
                await asyncio.to_thread(rstate.remove_monitor_cgroups, name)
                if not idmap_empty(desired):
                    self._ensure_traversable()
                t3 = _now()
                pid = await self.liblxc.start(name, str(self.lxcpath), str(conf))
                ctx.init_pid = pid  # for the devices' post_start hooks (proxy forwarders)
            except StartFailed as e:
                tail = _log_tail(logdir / "lxc.log")
                raise LXDError(e.message + (f"\n{tail}" if tail else "")) from None
            finally:
                # block devices' host-side mounts: only while liblxc starts the container
                await device_lifecycle.post_start(run_configs)
            revert.success()
        t4 = _now()
        self._track(name, pid)
        rec.last_used_at = rfc3339()
        updates["volatile.last_state.power"] = "RUNNING"
        for k, v in updates.items():  # in memory now; the store follows in the background
            if v is None:
                rec.config.pop(k, None)
            else:
                rec.config[k] = v
        # One DB thread runs writes in order, so a later stop's write can't overtake this one.
        self._spawn(_quietly(self._set_volatile(name, updates, last_used_at=rec.last_used_at)))
        t5 = _now()
        log.debug("started", extra={"instance": name, "prepare_ms": round(t1 - t0, 1),
                                    "templates_ms": round(t2 - t1, 1), "config_ms": round(t3 - t2, 1),
                                    "liblxc_ms": round(t4 - t3, 1), "record_ms": round(t5 - t4, 1)})

    def _render_lxc(self, name, idir, rootfs, logdir, ec, ed, idmap, run_configs, hostname) -> str:
        from lxd_daemon.instances import lxcconf

        spec = lxcconf.LxcSpec(name=name, lxcpath=self.lxcpath, rootfs=rootfs, log_file=logdir / "lxc.log",
                               console_log=logdir / "console.log", hostname=hostname, expanded_config=ec,
                               expanded_devices=ed, idmap=idmap, privileged=idmap.empty,
                               devices_dir=self.devices_dir(name), run_configs=run_configs,
                               devlxd_dir=self.lxd_dir / "devlxd"
                               if is_true(ec.get("security.devlxd") or "true") else None)
        return lxcconf.to_text(lxcconf.render(spec))

    async def adopt_devices(self) -> None:
        """Start-up (a hook): the devices of each running container take back their host side
        (a proxy's forwarder is adopted, not started twice)."""
        for name in sorted(self.records):
            status, pid = self.status_of(name)
            if status == "Stopped" or pid <= 0:
                continue
            try:
                devices = load_all(self.expanded(name)[1])
            except LXDError:
                continue
            if devices:
                idmap = IdmapSet.from_json(self.records[name].config.get("volatile.idmap.current"))
                ctx = self.device_context(name, idmap)
                ctx.init_pid = pid
                await device_lifecycle.adopt_devices(devices, ctx)

    def device_context(self, name: str, idmap: IdmapSet) -> DeviceContext:
        """What instance `name`'s devices work with (devices/base.py)."""
        return DeviceContext(instance=name, project=self.ident(name)[0], idmap=idmap, privileged=idmap.empty,
                             devices_dir=self.devices_dir(name), instances=self, runtime=self.liblxc)

    async def _apply_templates(self, rec, idir, rootfs, ec, ed, idmap) -> None:
        from lxd_daemon.instances import templates

        if not (idir / "metadata.yaml").exists():
            return
        uid, gid = idmap.root_ids()
        ctx = {"container": {"name": rec.name, "type": "container", "architecture": rec.architecture,
                             "privileged": str(idmap.empty).lower(), "ephemeral": str(rec.ephemeral).lower()},
               "instance": {"name": rec.name, "type": "container", "architecture": rec.architecture,
                            "privileged": str(idmap.empty).lower(), "ephemeral": str(rec.ephemeral).lower()},
               "config": ec, "devices": ed, "properties": {}}
        triggers = []
        first = rec.config.get("volatile.apply_template")
        if first:
            triggers.append(first)
        triggers.append("start")
        for trig in triggers:
            await asyncio.to_thread(templates.apply_templates, idir, rootfs, trig, dict(ctx, trigger=trig),
                                    uid=uid, gid=gid)

    async def stop(self, name: str, *, force: bool, timeout: float = -1) -> str:
        """Stop; returns the lifecycle action ("instance-stopped" or "instance-shutdown")."""
        rec = self.record(name)
        status, pid = self.status_of(name)
        if status == "Stopped":
            raise BadRequest("The instance is already stopped")
        rt = self.runtime.get(name)
        if rt is None:
            await self.liblxc.stop(name, str(self.lxcpath))
            return "instance-stopped"
        rt.stopping = True
        try:
            if status == "Frozen":
                with contextlib.suppress(OSError, LXDError):
                    await self._freeze_cg(name, rt.cgroups, False)
            if force:
                await self._signal(rt, signal.SIGKILL)
                await asyncio.wait_for(rt.exited.wait(), 10)
                action = "instance-stopped"
            else:
                sig = _halt_signal(rec, self.expanded(name)[0])
                await self._signal(rt, sig)
                try:
                    await asyncio.wait_for(rt.exited.wait(), None if timeout is None or timeout < 0 else timeout)
                except TimeoutError:
                    raise LXDError(f'Failed shutting down instance, status is "Running": timed out after '
                                   f'{timeout}s') from None
                action = "instance-shutdown"
        except BaseException:
            rt.stopping = False
            raise
        await self.stopped(name)
        return action

    async def stopped(self, name: str) -> None:
        """The bookkeeping once a container stopped at our request (stop, a stateful stop): its
        volume closed, its power state and running id map recorded."""
        await self._close_volume(name)
        await self._set_volatile(name, {"volatile.last_state.power": "STOPPED",
                                        "volatile.idmap.current": None})

    async def _close_volume(self, name: str) -> None:
        """A stopped container's volume goes back to root (0100): if its host uids are given to
        another container later, that one's root can't reach in."""
        try:
            drv = self._root_pool(self.expanded(name)[1], name).driver
            await asyncio.to_thread(drv.secure_instance_volume, self.lxcpath / name, 0)
        except (LXDError, OSError) as e:
            log.warning("couldn't reset the volume's owner", extra={"instance": name, "err": str(e)})
        with contextlib.suppress(LXDError):  # each device undoes its host work (volumes unmounted...)
            rec = self.record(name)
            idmap = IdmapSet.from_json(rec.config.get("volatile.idmap.current"))
            await device_lifecycle.stop_devices(load_all(self.expanded(name)[1]), self.device_context(name, idmap))

    async def _signal(self, rt: Runtime, sig: int) -> None:
        if rt.exited.is_set() or rt.pidfd < 0:
            return
        try:
            signal.pidfd_send_signal(rt.pidfd, sig)
        except ProcessLookupError:
            pass

    def _cgroups(self, name: str) -> dict[str, str]:
        """The running container's own cgroup directories, as resolved when it was started or
        found (never re-read from /proc of an init that may be exiting)."""
        rt = self.runtime.get(name)
        if rt is None or rt.exited.is_set() or not rt.cgroups:
            raise BadRequest("The instance isn't running")
        return rt.cgroups

    @staticmethod
    def _gone(name: str, rt: Runtime | None) -> bool:
        """init has exited (a zombie counts as exited) or is no longer tracked."""
        return rt is None or rt.exited.is_set() or not rstate.alive(rt.pid, rt.start_time)

    async def _freeze_cg(self, name: str, cg: dict, frozen: bool, timeout: float = 5.0) -> None:
        """Freeze or thaw the container's cgroup `cg` (only ever a path inside its own cgroup:
        set_frozen refuses anything else); a container that went away meanwhile gets a 400."""
        rt = self.runtime.get(name)
        if self._gone(name, rt):
            raise BadRequest("The instance isn't running")
        try:
            await asyncio.to_thread(rstate.set_frozen, cg, frozen, name)
        except rstate.CgroupOutsideContainer as e:
            log.error("refused a freezer write outside the container's cgroup",
                      extra={"instance": name, "err": str(e)})
            raise BadRequest("The instance isn't running") from None
        except OSError:
            if self._gone(name, rt) or not all(os.path.isdir(p) for p in cg.values()):
                raise BadRequest("The instance isn't running") from None
            raise
        want = "FROZEN" if frozen else "THAWED"
        deadline = asyncio.get_running_loop().time() + timeout
        while rstate.freezer_state(cg) != want:
            if self._gone(name, rt):
                raise BadRequest("The instance isn't running")
            if asyncio.get_running_loop().time() > deadline:
                raise LXDError(f"The instance did not reach {want.lower()} state in time")
            await asyncio.sleep(0.005)

    async def freeze(self, name: str) -> None:
        self.record(name)
        status, pid = self.status_of(name)
        if status == "Stopped":
            raise BadRequest("The instance isn't running")
        if status == "Frozen":
            raise BadRequest("The instance is already frozen")
        await self._freeze_cg(name, self._cgroups(name), True)

    async def unfreeze(self, name: str) -> None:
        self.record(name)
        status, pid = self.status_of(name)
        if status != "Frozen":
            raise BadRequest("The instance is not frozen")
        await self._freeze_cg(name, self._cgroups(name), False)

    async def change_state(self, name: str, action: str, *, timeout: float = -1, force: bool = False,
                           requestor: dict | None = None) -> None:
        """One `PUT .../state` action, serialised with every other action on the instance."""
        async with self.lock(name):
            self.record(name)
            if action == "start":
                was = self.status_of(name)[0]
                if was == "Stopped" and self.services.snapshots is not None:
                    await self.services.snapshots.on_start_locked(name)  # `@startup` in snapshots.schedule
                await self.start(name)
                self.lifecycle("instance-resumed" if was == "Frozen" else "instance-started", name,
                               requestor=requestor)
            elif action == "stop":
                ev = await self.stop(name, force=force, timeout=timeout)
                self.lifecycle(ev, name, requestor=requestor)
                rec = self.records.get(name)
                if rec is not None and rec.ephemeral:
                    await self._delete_locked(name, requestor)
            elif action == "restart":
                if self.status_of(name)[0] == "Stopped":
                    raise BadRequest("The instance is already stopped")
                rec = self.records[name]
                if rec.ephemeral:
                    # An ephemeral instance must survive its own restart.
                    rec.ephemeral = False
                    try:
                        await self.stop(name, force=force, timeout=timeout)
                    finally:
                        rec.ephemeral = True
                else:
                    await self.stop(name, force=force, timeout=timeout)
                await self.start(name)
                self.lifecycle("instance-restarted", name, requestor=requestor)
            elif action == "freeze":
                await self.freeze(name)
                self.lifecycle("instance-paused", name, requestor=requestor)
            elif action == "unfreeze":
                await self.unfreeze(name)
                self.lifecycle("instance-resumed", name, requestor=requestor)
            else:
                raise BadRequest(f"Unknown state action {action!r}")

    # ------------------------------------------------------------------ daemon hooks
    async def autostart(self) -> None:
        """At daemon start: start boot.autostart instances, highest boot.autostart.priority first."""
        todo = []
        for name, rec in self.records.items():
            ec = self.expanded(name)[0]
            want = ec.get("boot.autostart")
            last = rec.config.get("volatile.last_state.power", "")
            if is_true(want) or (want is None and last == "RUNNING"):
                if self.status_of(name)[0] == "Stopped":
                    todo.append((-int(ec.get("boot.autostart.priority") or 0), name,
                                 int(ec.get("boot.autostart.delay") or 0)))
        from lxd_daemon.warnings import INSTANCE_AUTOSTART_FAILURE, raise_warning, resolve_warning

        for _, name, delay in sorted(todo):
            project = self.ident(name)[0]
            try:
                await self.change_state(name, "start")
            except Exception as e:
                why = getattr(e, "message", None) or str(e)
                log.warning("autostart failed", extra={"instance": name, "err": why})
                await raise_warning(self.services, INSTANCE_AUTOSTART_FAILURE,
                                    f"Failed to autostart instance {self.ident(name)[1]!r}: {why}",
                                    project=project, entity_url=self.url(name))
                continue
            await resolve_warning(self.services, INSTANCE_AUTOSTART_FAILURE, project=project,
                                  entity_url=self.url(name))
            if delay > 0:
                await asyncio.sleep(delay)

    async def shutdown_all(self) -> None:
        """`lxd shutdown` / SIGPWR: stop every running instance, boot.stop.priority groups in order
        (highest first), each group in parallel, within core.shutdown_timeout."""
        try:
            total = float(self.services.server.config.get("core.shutdown_timeout") or 5) * 60
        except Exception:
            total = 300.0
        groups: dict[int, list[str]] = {}
        for name in list(self.records):
            if self.status_of(name)[0] != "Stopped":
                prio = int(self.expanded(name)[0].get("boot.stop.priority") or 0)
                groups.setdefault(prio, []).append(name)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + total
        for prio in sorted(groups, reverse=True):
            async def one(n: str) -> None:
                left = max(deadline - loop.time(), 1.0)
                async with self.lock(n):
                    try:
                        await self.stop(n, force=False, timeout=left)
                    except LXDError:
                        with contextlib.suppress(LXDError):
                            await self.stop(n, force=True)
                # Keep the power state RUNNING so the next daemon start brings them back.
                await self._set_volatile(n, {"volatile.last_state.power": "RUNNING"})

            await asyncio.gather(*(one(n) for n in groups[prio]), return_exceptions=True)

    async def close(self) -> None:
        self.tracker.close()  # the daemon is exiting; containers keep running
        if self._bg:  # let pending store writes and clean-ups finish (briefly)
            await asyncio.wait(list(self._bg), timeout=2)
        for t in list(self._bg):
            t.cancel()


def _halt_signal(rec: Record, ec: dict) -> int:
    for line in (ec.get("raw.lxc") or "").splitlines():
        k, _, v = line.partition("=")
        if k.strip() == "lxc.signal.halt":
            v = v.strip()
            try:
                return int(v)
            except ValueError:
                try:
                    return int(getattr(signal, v if v.startswith("SIG") else "SIG" + v))
                except (AttributeError, TypeError):
                    pass
    return int(signal.SIGPWR)


def _simple_map(desired: IdmapSet, uid: int, gid: int) -> IdmapSet:
    """The map of a tree shifted by a plain offset (what images.unpack produces)."""
    if all(e.nsid == 0 for e in desired.entries) and len({(e.hostid, e.maprange) for e in desired.entries}) == 1:
        return desired
    if uid == gid:
        return IdmapSet((IdmapEntry(True, True, uid, 0, idmaps.ISOLATED_SIZE),))
    return IdmapSet((IdmapEntry(True, False, uid, 0, idmaps.ISOLATED_SIZE),
                     IdmapEntry(False, True, gid, 0, idmaps.ISOLATED_SIZE)))


def _overlaps(a: IdmapSet, b: IdmapSet) -> bool:
    for x in a.entries:
        for y in b.entries:
            if x.hostid < y.hostid + y.maprange and y.hostid < x.hostid + x.maprange:
                return True
    return False


def _rmtree(p: Path) -> None:
    import shutil

    shutil.rmtree(p, ignore_errors=True)


def _remove_paths(*paths: Path) -> None:
    for p in paths:
        if p.is_symlink() or p.is_file():
            p.unlink(missing_ok=True)
        elif p.is_dir():
            _rmtree(p)


async def _quietly(coro) -> None:
    try:
        await coro
    except Exception:
        log.exception("background task failed")


def idmap_empty(m: IdmapSet) -> bool:
    return m.empty


def _now() -> float:
    return time.perf_counter() * 1000


def _log_tail(path: Path, lines: int = 5) -> str:
    try:
        data = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    errs = [line for line in data if " ERROR " in line]
    return "\n".join(errs[-lines:])
