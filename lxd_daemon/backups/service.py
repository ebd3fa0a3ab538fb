"""Instance backups (records in `instances_backups`, files under $LXD_DIR/backups/instances/) and
instance imports from backup tarballs.

A backup file is written under a temporary name and renamed into place, then its row is
inserted; a crash leaves at most a `.tmp-*` file (swept at start-up) or a file without a row
(swept too). An uncompressed optimised backup is committed (row inserted, operation done) as
soon as it can be read, before its file is complete (create.StreamedBackup: `lxc export` then
downloads it while it is written); a crash meanwhile leaves a row without a file, which the
start-up sweep removes too. Files live in a directory per instance id (stable across renames); directories of
instances that are gone are swept. Expired backups are deleted by a task that wakes each minute.

An import scans the whole tarball first (restore.scan: paths, links, devices, index.yaml), then
creates the volume (snapshots first, oldest first, each unpacked and snapshotted, then the
volume itself; or the driver's optimised receive), removes the volume's backup.yaml, commits
the instance and snapshot rows in one transaction, and writes a fresh backup.yaml last: a crash
before the commit leaves a volume without backup.yaml and without a record, which the start-up
sweep removes; nothing else is made.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import text

from lxd_daemon import names
from lxd_daemon.backups.config import BACKUP_YAML, instance_backup_config, render_backup_yaml
from lxd_daemon.errors import BadRequest, Conflict, LXDError, NotFound
from lxd_daemon.projects.naming import query, storage_name
from lxd_daemon.storage.volume import Volume, VolumeType
from lxd_daemon.util.lazy import lazy_module
from lxd_daemon.util.revert import Revert
from lxd_daemon.util.tasks import cancel_and_wait
from lxd_daemon.util.timefmt import ZERO_TIME, parse_rfc3339, rfc3339

# Loaded when a backup is made or imported (tar, compression, stream handling: ~1 MiB).
bcreate = lazy_module("lxd_daemon.backups.create")
brestore = lazy_module("lxd_daemon.backups.restore")

log = logging.getLogger("lxd.backups")
_AUTO = re.compile(r"^backup(\d+)$")


def parse_expiry(value: str | None) -> str:
    """An expires_at from a request: "" for never (Go's zero time, empty), else RFC 3339."""
    if not value or value.startswith("0001-01-01"):
        return ""
    try:
        parse_rfc3339(value)
    except ValueError:
        raise BadRequest(f"Invalid expires_at {value!r}") from None
    return value


def _expired(expires_at: str, now: float) -> bool:
    if not expires_at:
        return False
    try:
        return parse_rfc3339(expires_at) <= now
    except ValueError:
        return False


@dataclass
class BackupRow:
    id: int
    owner_id: int
    name: str
    created_at: str
    expires_at: str
    only: bool
    optimized: bool
    compression: str


@dataclass
class ImportPlan:
    path: Path  # the uploaded tarball
    spool: Path  # optimised members, spooled
    scan: brestore.ScanResult
    name: str
    pool: object
    record: object
    snapshots: list = field(default_factory=list)  # Snapshot records to insert
    snapshot_names: list[str] = field(default_factory=list)
    received: object = None  # an optimised backup's volume, received under a temporary name
    project: str = "default"  # the project it is imported into; `name` is the key (storage name)
    api_name: str = ""


class BackupService:
    def __init__(self, services):
        self.services = services
        self.db = services.db
        self.root: Path = services.lxd_dir / "backups"
        self._task: asyncio.Task | None = None
        self.volumes = VolumeBackups(self)  # the custom volume side
        # Backups committed while still being written (create.StreamedBackup), by (instance id,
        # name): (the backup, set when its writing ended); and the tasks writing them.
        self._writing: dict[tuple[int, str], tuple[bcreate.StreamedBackup, asyncio.Event]] = {}
        self._bg: set[asyncio.Task] = set()

    # -- paths -------------------------------------------------------------------------------
    def instance_dir(self, instance_id: int) -> Path:
        return self.root / "instances" / str(instance_id)

    def instance_file(self, row: BackupRow) -> Path:
        return self.instance_dir(row.owner_id) / row.name

    def work_dir(self) -> Path:
        return self.root

    # -- start-up ----------------------------------------------------------------------------
    async def load(self) -> None:
        await asyncio.to_thread(self._prepare)
        await self.sweep()
        if self.services.storage is not None:
            await self.volumes.sweep()

    def _prepare(self) -> None:
        for p in (self.root, self.root / "instances", self.root / "custom"):
            p.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(p, 0o700)

    async def sweep(self) -> None:
        """Remove temporaries (half-written files, uploads, spools), files without rows, and rows
        without files (a backup committed while it was written, cut short by a crash)."""
        def q(session):
            return session.execute(text("SELECT id, instance_id, name FROM instances_backups")).all()

        found = await self.db.run(q)
        rows = {(str(r.instance_id), r.name) for r in found}
        ids = {str(r.id) for r in self.services.instances.records.values()}
        idir0 = self.root / "instances"
        lost = await asyncio.to_thread(lambda: [r.id for r in found if str(r.instance_id) in ids and not os.path.lexists(
            idir0 / str(r.instance_id) / r.name)])
        for row_id in lost:
            log.warning("removing the record of backup %s: its file is missing (its writing was cut short)", row_id)
            await self._delete_row(row_id)

        def clean() -> None:
            for e in _listdir(self.root):
                if e.startswith((".import-", ".tmp-", ".stage-", ".backup_")):
                    _remove(self.root / e)
            idir = self.root / "instances"
            for d in _listdir(idir):
                if d not in ids:
                    _remove(idir / d)
                    continue
                for f in _listdir(idir / d):
                    if (d, f) not in rows:
                        _remove(idir / d / f)

        await asyncio.to_thread(clean)

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._expiry_loop())

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        # Backups still being written are given up (removed: the start-up sweep would anyway).
        for t in list(self._bg):
            t.cancel()
        if self._bg:
            await asyncio.gather(*self._bg, return_exceptions=True)

    async def _expiry_loop(self) -> None:
        while True:
            await asyncio.sleep(60)
            try:
                await self.expire()
                await self.prune_orphans()
                if self.services.storage is not None:
                    await self.volumes.expire()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("deleting expired backups failed")

    async def prune_orphans(self) -> None:
        """Remove the backup files of instances that are gone (their rows went with them)."""
        ids = {str(r.id) for r in self.services.instances.records.values()}
        idir = self.root / "instances"

        def clean() -> None:
            for d in _listdir(idir):
                if d not in ids:
                    _remove(idir / d)

        await asyncio.to_thread(clean)

    async def expire(self, now: float | None = None) -> list[str]:
        """Delete every instance backup whose expires_at has passed; returns their names."""
        now = time.time() if now is None else now
        gone = []
        svc = self.services.instances
        by_id = {r.id: (n, r) for n, r in svc.records.items()}
        for row in await self._rows():
            if _expired(row.expires_at, now) and row.owner_id in by_id:
                name, rec = by_id[row.owner_id]
                try:
                    await self.delete(name, row.name)
                    gone.append(f"{rec.name}/{row.name}{query(rec.project)}")
                except NotFound:
                    pass
        return gone

    # -- records -----------------------------------------------------------------------------
    async def _rows(self, instance_id: int | None = None) -> list[BackupRow]:
        return await self.db.run(lambda session: _select_rows(session, "instances_backups", instance_id))

    async def list(self, name: str) -> list[BackupRow]:
        rec = self.services.instances.record(name)
        return await self._rows(rec.id)

    async def rendered_by_instance(self) -> dict[int, list[dict]]:
        """Every instance's backups as the API renders them, by instance id (one query)."""
        out: dict[int, list[dict]] = {}
        for row in await self._rows():
            out.setdefault(row.owner_id, []).append(self.render("", row))
        return out

    async def get(self, name: str, bname: str) -> BackupRow:
        for row in await self.list(name):
            if row.name == bname:
                return row
        raise NotFound(f"Instance backup {self.services.instances.record(name).name}/{bname} not found")

    @staticmethod
    def render(instance: str, row: BackupRow) -> dict:
        return {"name": row.name, "created_at": row.created_at, "expires_at": row.expires_at or ZERO_TIME,
                "instance_only": row.only, "container_only": row.only, "optimized_storage": row.optimized}

    async def next_name(self, name: str) -> str:
        used = {r.name for r in await self.list(name)}
        n = 0
        while f"backup{n}" in used:
            n += 1
        return f"backup{n}"

    # -- create ------------------------------------------------------------------------------
    async def check_create(self, name: str, bname: str, compression: str) -> str:
        """What can be refused before the operation starts; returns the compression to use."""
        project = self.services.instances.record(name).project
        from lxd_daemon.projects import policy as project_policy

        project_policy.backup_allowed(project, self.services.projects.config(project))
        try:
            names.backup(bname)
        except names.InvalidName as e:
            raise BadRequest(e.message) from None
        if any(r.name == bname for r in await self.list(name)):
            raise Conflict(f"Backup {bname!r} already exists")
        return bcreate.check_compression(compression or self.default_compression())

    def default_compression(self) -> str:
        return self.services.server.config.get("backups.compression_algorithm") or bcreate.DEFAULT_COMPRESSION

    def _snapshot_names(self, name: str) -> list[str]:
        snaps = self.services.snapshots
        return list(snaps.names(name)) if snaps is not None else []

    async def create(self, name: str, bname: str, *, expires_at: str = "", instance_only: bool = False,
                     optimized: bool = False, compression: str = "gzip") -> BackupRow:
        """Make the backup; returns once it is committed. An uncompressed optimised backup is
        committed as soon as it can be read (create.StreamedBackup): a task of its own then
        finishes writing it, the instance's lock held until it is done."""
        loop = asyncio.get_running_loop()
        committed: asyncio.Future = loop.create_future()
        task = loop.create_task(self._create(name, bname, committed, expires_at=expires_at,
                                             instance_only=instance_only, optimized=optimized,
                                             compression=compression))
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)
        try:
            return await asyncio.shield(committed)
        except asyncio.CancelledError:
            if not committed.done():
                task.cancel()
            raise

    async def _create(self, name: str, bname: str, committed: asyncio.Future, **kw) -> None:
        try:
            await self._create_locked(name, bname, committed, **kw)
        except BaseException as e:
            if not committed.done():
                if isinstance(e, asyncio.CancelledError):
                    committed.cancel()
                else:
                    committed.set_exception(e)
            elif not isinstance(e, asyncio.CancelledError):
                log.error("writing backup %s/%s failed after it was committed: %s (it was removed)", name, bname, e)
            if isinstance(e, asyncio.CancelledError):
                raise

    async def _create_locked(self, name: str, bname: str, committed: asyncio.Future, *, expires_at: str,
                             instance_only: bool, optimized: bool, compression: str) -> None:
        svc = self.services.instances
        async with svc.lock(name):
            rec = svc.record(name)
            pool = svc._root_pool(svc.expanded(name)[1], name)
            drv = pool.driver
            vol = self.services.storage.volumes.instance_volume(pool, rec.name, rec.project)
            snapshots = [] if instance_only else self._snapshot_names(name)
            cfg = await instance_backup_config(self.services, name)
            if instance_only:
                cfg.snapshots, cfg.volume_snapshots = [], []
            use_optimized = optimized and drv.info.optimized_backups
            row = BackupRow(0, rec.id, bname, rfc3339(), expires_at, instance_only, optimized, compression)
            dest = self.instance_file(row)
            if await asyncio.to_thread(os.path.lexists, dest):
                await asyncio.to_thread(_remove, dest)  # a file without a row: a crash's leftover
            yaml_text = render_backup_yaml(cfg.instance, cfg.snapshots, cfg.pool, cfg.volume,
                                           cfg.volume_snapshots, profiles=cfg.profiles)
            # A stopped instance's volume doesn't change while its lock is held (and backup.yaml's
            # lock: no rewrite of it meanwhile): the driver may send it as it is.
            live = use_optimized and svc.status_of(name)[0] == "Stopped"
            async with Revert() as revert, (svc.backup_yaml_lock(name) if live else contextlib.nullcontext()):
                if bcreate.streams_while_written(drv, use_optimized, compression):
                    key = (rec.id, bname)
                    ended = asyncio.Event()
                    try:
                        async with bcreate.streamed_backup(drv, pool.name, vol, name=rec.name, btype="container",
                                                           snapshots=snapshots, config=cfg, dest=dest,
                                                           live=live) as sb:
                            row.id = await self.db.run(lambda session: _insert_row(session, "instances_backups", row))
                            revert.add(self._delete_row, row.id)
                            self._writing[key] = (sb, ended)
                            committed.set_result(row)
                        revert.add(asyncio.to_thread, _remove, dest)
                    finally:
                        if self._writing.get(key, (None, None))[1] is ended:
                            del self._writing[key]
                        ended.set()
                    revert.success()
                    return
                await bcreate.write_backup(drv, pool.name, vol, name=rec.name, btype="container", snapshots=snapshots,
                                           config=cfg, backup_yaml=yaml_text, optimized=use_optimized,
                                           compression=compression, dest=dest, live=live)
                revert.add(asyncio.to_thread, _remove, dest)

                row.id = await self.db.run(lambda session: _insert_row(session, "instances_backups", row))
                revert.success()
        committed.set_result(row)

    async def _delete_row(self, row_id: int) -> None:
        await self.db.run(lambda s: s.execute(text("DELETE FROM instances_backups WHERE id=:i"), {"i": row_id}))

    async def rename(self, name: str, bname: str, new: str) -> None:
        try:
            names.backup(new)
        except names.InvalidName as e:
            raise BadRequest(e.message) from None
        svc = self.services.instances
        async with svc.lock(name):
            row = await self.get(name, bname)
            if any(r.name == new for r in await self.list(name)):
                raise Conflict(f"Backup {new!r} already exists")
            old_path = self.instance_file(row)
            new_path = old_path.parent / new
            async with Revert() as revert:
                await asyncio.to_thread(os.rename, old_path, new_path)
                revert.add(asyncio.to_thread, os.rename, new_path, old_path)
                await self.db.run(lambda s: s.execute(text("UPDATE instances_backups SET name=:n WHERE id=:i"),
                                                      {"n": new, "i": row.id}))
                revert.success()

    async def delete(self, name: str, bname: str) -> None:
        row = await self.get(name, bname)
        writing = self._writing.get((row.owner_id, row.name))
        if writing is not None:  # still being written: once it is done (or gone)
            await writing[1].wait()
            row = await self.get(name, bname)
        await self._delete_row(row.id)
        await asyncio.to_thread(_remove, self.instance_file(row))

    async def open_export(self, name: str, bname: str) -> tuple[object, int, bcreate.StreamedBackup | None]:
        """(file, size, None) to export a backup; (file, final size, the backup) for a backup
        still being written: the reader follows it (StreamedBackup.wait)."""
        row = await self.get(name, bname)
        writing = self._writing.get((row.owner_id, row.name))
        if writing is not None:
            # (On the event loop: the writer's descriptor stays open while this runs.)
            f = writing[0].reopen()
            if f is not None:
                return f, writing[0].total, writing[0]
        f, size = await self.open_file(name, bname)
        return f, size, None

    async def open_file(self, name: str, bname: str) -> tuple[object, int]:
        row = await self.get(name, bname)
        path = self.instance_file(row)

        def op():
            f = open(path, "rb")  # noqa: SIM115 - closed by the response
            return f, os.fstat(f.fileno()).st_size

        try:
            return await asyncio.to_thread(op)
        except FileNotFoundError:
            raise NotFound(f"The file of backup {self.services.instances.record(name).name}/{bname} is missing"
                           ) from None

    # -- import ------------------------------------------------------------------------------
    def new_upload(self) -> Path:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        return self.root / f".import-{uuid.uuid4().hex}"

    def _decide(self, idx, cfg, pool_name: str, new_name: str, project: str) -> dict:
        """Everything an import into `project` needs from index.yaml and the backup's config: the
        name (its key reserved here: the caller releases it), the pool, the record and the
        snapshot records."""
        svc = self.services.instances
        storage = self.services.storage
        if idx.type != "container":
            raise BadRequest(f"Importing {idx.type} backups is not supported (only containers)")
        if cfg is None:
            raise BadRequest("Invalid backup: index.yaml holds no instance configuration")
        inst = cfg.instance
        if inst is None:
            raise BadRequest("Invalid backup: no instance configuration in it")
        name = new_name or idx.name or inst["name"]
        try:
            names.instance(name)
        except names.InvalidName as e:
            raise BadRequest(e.message) from None
        if pool_name:
            pool = storage.get(pool_name)
        else:
            pool = storage.pools.get(idx.pool) if idx.pool else None
        devices = {k: dict(v) for k, v in (inst.get("devices") or {}).items()}
        key = storage_name(project, name)
        profiles = list(inst.get("profiles") or [])
        known_profiles = self.services.profiles.in_project(project)
        missing = [p for p in profiles if p not in known_profiles]
        if missing:
            raise BadRequest(f"The backup's instance uses profiles this server doesn't have: {', '.join(missing)}")
        from lxd_daemon.instances import validation

        pinputs = [known_profiles[p].as_expand_input() for p in profiles]
        local_root = validation.root_disk(devices)
        if pool is None:
            # The pool the profiles' root disk names.
            rd = validation.root_disk(validation.expand(pinputs, {}, {})[1])
            pname = rd[1].get("pool", "") if rd else ""
            if not pname or pname not in storage.pools:
                raise BadRequest(f"The backup's storage pool {idx.pool!r} doesn't exist here: choose one "
                                 "(lxc import --storage POOL)")
            pool = storage.pools[pname]
        if local_root:
            devices[local_root[0]]["pool"] = pool.name
        else:
            rd = validation.root_disk(validation.expand(pinputs, {}, {})[1])
            if not rd or rd[1].get("pool") != pool.name:
                devices["root"] = {"type": "disk", "path": "/", "pool": pool.name}
        if idx.optimized:
            if pool.driver_name != idx.backend or not pool.driver.info.optimized_backups:
                raise BadRequest(f"An optimised {idx.backend} backup can only be imported into a "
                                 f"{idx.backend} storage pool (pool {pool.name!r} is {pool.driver_name})")
        config = {str(k): str(v) for k, v in (inst.get("config") or {}).items()}
        config.pop("volatile.idmap.current", None)
        validation.validate_devices(devices, pools=set(storage.pools))
        user_cfg = {k: v for k, v in config.items() if not k.startswith(("volatile.", "image."))}
        try:
            validation.validate_config(user_cfg)
        except LXDError as e:
            raise BadRequest(f"The backup's instance config is not valid here: {e.message}") from None
        snap_names = list(idx.snapshots)
        snap_cfg = {s["name"]: s for s in cfg.snapshots}
        svc.reserve(key)
        try:
            # The project's limits and restrictions, as for any new instance (the backup's
            # volatile keys are its own); claimed until the caller's release().
            svc.policy_check("create", key, config, devices, profiles, project=project, strip=True)
            ec = validation.expand(pinputs, config, devices)[0]
            desired = svc._desired_idmap(key, ec)
            config["volatile.idmap.base"] = "0" if desired.empty else str(desired.root_ids()[0])
            config["volatile.idmap.next"] = desired.to_json()
            config.setdefault("volatile.uuid", str(uuid.uuid4()))
            config.pop("volatile.apply_template", None)
            from lxd_daemon.instances.models import Record

            now = rfc3339()
            rec = Record(0, name, str(inst.get("architecture") or ""), bool(inst.get("ephemeral", False)), False,
                         str(inst.get("description") or ""), _time(inst.get("created_at")) or now, "",
                         config, devices, profiles, project=project)
            snaps = []
            snapmod = _snapshots_module()
            for s in snap_names:
                sc = snap_cfg.get(s, {})
                if snapmod is not None:
                    snaps.append(snapmod.Snapshot(
                        0, 0, s, _time(sc.get("created_at")) or now, parse_expiry_quiet(sc.get("expires_at")),
                        str(sc.get("description") or ""), False, str(sc.get("architecture") or rec.architecture),
                        bool(sc.get("ephemeral", False)), {str(k): str(v) for k, v in (sc.get("config") or {}).items()},
                        {str(k): {str(a): str(b) for a, b in v.items()} for k, v in (sc.get("devices") or {}).items()},
                        [p for p in (sc.get("profiles") or []) if p in known_profiles]))
        except BaseException:
            svc.release(key)
            svc._idmap_claims.pop(key, None)
            raise
        return {"name": key, "project": project, "api_name": name, "pool": pool, "record": rec, "snapshots": snaps,
                "snapshot_names": snap_names}

    async def prepare_import(self, upload: Path, project: str, pool_name: str = "", new_name: str = "",
                             source: brestore.GrowingFile | None = None) -> ImportPlan:
        """Scan the uploaded tarball and decide everything an import into `project` needs;
        BadRequest, NotFound or Conflict before anything is made. The instance's key is reserved
        (the caller releases it: plan.name).

        An optimised backup is received meanwhile (the scan hands each stream to the driver as it
        reaches it: no copy of the streams on disk) into a volume under a temporary name, which
        is removed if anything fails (and by the start-up sweep after a crash)."""
        svc = self.services.instances
        stream = brestore.StreamedMembers(asyncio.get_running_loop())
        # (On a thread of its own: it waits for the upload, whose writes need the executor's threads.)
        from lxd_daemon.storage.drivers.tools import in_own_thread

        scan = asyncio.ensure_future(in_own_thread(brestore.scan, upload, None, stream, source))
        decided: dict | None = None
        received = None
        try:
            try:
                idx = brestore.parse_index(await stream.index())
            except BaseException:
                stream.close_consumer()
                await scan  # the scan's own error says best what is wrong
                raise
            if not idx.optimized:
                stream.close_consumer()
                res = await scan
                decided = self._decide(res.index, res.config, pool_name, new_name, project)
                return ImportPlan(upload, Path(str(upload) + ".d"), res, **decided)
            decided = self._decide(idx, idx.config, pool_name, new_name, project)
            pool = decided["pool"]
            volumes = self.services.storage.volumes
            # A temporary name outside any project (named by the key: run_import renames it to
            # the key, which is the instance volume's name on disk).
            received = volumes.instance_volume(pool, f".import-{uuid.uuid4().hex[:8]}-{decided['name']}")
            try:
                await stream.started()
                await pool.driver.restore_volume_optimized(received, decided["snapshot_names"], stream.member)
            finally:
                stream.close_consumer()
            res = await scan
            plan = ImportPlan(upload, Path(str(upload) + ".d"), res, **decided)
            plan.received = received
            return plan
        except BaseException as e:
            stream.close_consumer()
            scan_error: BaseException | None = None
            try:
                await scan
            except BaseException as se:
                scan_error = se
            if received is not None:
                with contextlib.suppress(Exception):
                    await self.services.storage.volumes._delete_now(decided["pool"], received)
            if decided is not None:
                svc.release(decided["name"])
                svc._idmap_claims.pop(decided["name"], None)
            # A bad tarball makes the receive fail too: the scan's verdict says why.
            if isinstance(scan_error, BadRequest) and not isinstance(e, BadRequest | asyncio.CancelledError):
                raise scan_error from None
            raise


    async def run_import(self, plan: ImportPlan) -> None:
        """Create the instance the plan describes (the caller releases the name after)."""
        svc = self.services.instances
        volumes = self.services.storage.volumes
        pool, name, res = plan.pool, plan.name, plan.scan  # (name: the key)
        project, api_name = plan.project, plan.api_name or plan.name
        drv = pool.driver
        vol = volumes.instance_volume(pool, api_name, project)
        main, snaps_dir = bcreate.member_dirs(VolumeType.CONTAINER)
        try:
            async with Revert() as revert:
                if plan.received is not None:
                    # Received by prepare_import under a temporary name (swept at start-up); its
                    # backup.yaml (the source's) removed, then renamed into place.
                    tmp = plan.received
                    revert.add(volumes._delete_now, pool, tmp)
                    await volumes._clear_leftover(pool, vol)
                    tpath = await drv.mount_volume(tmp)
                    await asyncio.to_thread(_remove, tpath / BACKUP_YAML)
                    await drv.unmount_volume(tmp)
                    await drv.rename_volume(tmp, name)  # (tmp is of no project: renamed to the key)
                    revert.add(volumes.delete_instance_volume, pool, project, api_name, background=False)
                    path = await drv.mount_volume(vol)
                else:
                    first = f"{snaps_dir}/{plan.snapshot_names[0]}" if plan.snapshot_names else main

                    async def fill(p: Path) -> None:
                        # Never a backup.yaml at the top of the volume before the record is
                        # committed: the start-up sweep then knows it for an unfinished import.
                        await brestore.extract_tree(plan.path, res.compression, first, p, exclude_backup_yaml=True)

                    revert.add(volumes.delete_instance_volume, pool, project, api_name, background=False)
                    path = await volumes.create_empty_instance_volume(pool, project, api_name, filler=fill)
                    for i, s in enumerate(plan.snapshot_names):
                        if i:
                            await brestore.clear_dir(path)
                            await brestore.extract_tree(plan.path, res.compression, f"{snaps_dir}/{s}", path,
                                                        exclude_backup_yaml=True)
                        await drv.create_snapshot(vol.snapshot(s))
                    if plan.snapshot_names:
                        await brestore.clear_dir(path)
                        await brestore.extract_tree(plan.path, res.compression, main, path, exclude_backup_yaml=True)
                await asyncio.to_thread(drv.secure_instance_volume, path, 0)
                snapsvc = self.services.snapshots
                added: list = []

                def extra(session, iid: int) -> None:
                    if snapsvc is not None and plan.snapshots:
                        added.extend(snapsvc.insert_rows_sql(session, iid, plan.snapshots))

                await svc.adopt_record(plan.record, pool, extra)
                if snapsvc is not None:
                    snapsvc.adopt(added)
                revert.success()
        finally:
            svc._idmap_claims.pop(name, None)
        await svc._write_backup_yaml(name)

    async def discard_upload(self, plan_or_path) -> None:
        p = plan_or_path.path if isinstance(plan_or_path, ImportPlan) else plan_or_path
        await asyncio.to_thread(_remove, p)
        await asyncio.to_thread(_remove, Path(str(p) + ".d"))


def parse_expiry_quiet(value) -> str:
    try:
        return parse_expiry(_time(value))
    except BadRequest:
        return ""


def _time(value) -> str:
    if value is None:
        return ""
    if hasattr(value, "isoformat"):
        import datetime as dt

        if isinstance(value, dt.datetime):
            if value.year <= 1:
                return ""  # Go's zero time: never set
            if value.tzinfo is None:
                value = value.replace(tzinfo=dt.UTC)
            return rfc3339(value.timestamp())
    v = str(value)
    if v.startswith("0001-01-01"):
        return ""
    return v


def _snapshots_module():
    try:
        from lxd_daemon.instances import snapshots
    except ImportError:
        return None
    return snapshots


def _listdir(p: Path) -> list[str]:
    try:
        return os.listdir(p)
    except OSError:
        return []


def _remove(p: Path) -> None:
    try:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink()
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("couldn't remove %s: %s", p, e)



# -- custom volume backups ------------------------------------------------------------------------
@dataclass
class VolumeImportPlan:
    path: Path
    scan: brestore.ScanResult
    pool: object
    name: str
    project: str
    description: str
    content_type: str
    config: dict
    snapshots: list  # storage.custom.VolumeSnapshot, oldest first


class VolumeBackups:
    """Backups of custom volumes: rows in `storage_volumes_backups`, files under
    $LXD_DIR/backups/custom/<pool>/<volume id>/<backup>; imports of custom volume backups."""

    def __init__(self, backups: BackupService):
        self.backups = backups
        self.services = backups.services
        self.db = backups.db
        self.root = backups.root / "custom"

    @property
    def custom(self):
        return self.services.storage.custom

    def _file(self, pool: str, volume_id: int, bname: str) -> Path:
        return self.root / pool / str(volume_id) / bname

    async def sweep(self) -> None:
        def q(session):
            return session.execute(text(
                "SELECT b.volume_id, b.name, p.name AS pool FROM storage_volumes_backups b "
                "JOIN storage_volumes v ON v.id = b.volume_id JOIN storage_pools p ON p.id = v.pool_id")).all()

        rows = {(r.pool, str(r.volume_id), r.name) for r in await self.db.run(q)}
        vols = {(p, v) for p, v, _ in rows}

        def clean() -> None:
            for pool in _listdir(self.root):
                for vid in _listdir(self.root / pool):
                    if (pool, vid) not in vols:
                        _remove(self.root / pool / vid)
                        continue
                    for f in _listdir(self.root / pool / vid):
                        if (pool, vid, f) not in rows:
                            _remove(self.root / pool / vid / f)

        await asyncio.to_thread(clean)

    async def _rows(self, volume_id: int | None = None) -> list[BackupRow]:
        return await self.db.run(lambda session: _select_rows(session, "storage_volumes_backups", volume_id))

    async def list(self, pool: str, name: str, project: str) -> list[BackupRow]:
        rec = await self.custom.get(pool, name, project)
        return await self._rows(rec.id)

    async def get(self, pool: str, name: str, bname: str, project: str) -> BackupRow:
        for row in await self.list(pool, name, project):
            if row.name == bname:
                return row
        raise NotFound(f"Storage volume backup {name}/{bname} not found")

    @staticmethod
    def render(row: BackupRow) -> dict:
        return {"name": row.name, "created_at": row.created_at, "expires_at": row.expires_at or ZERO_TIME,
                "volume_only": row.only, "optimized_storage": row.optimized}

    async def next_name(self, pool: str, name: str, project: str) -> str:
        used = {r.name for r in await self.list(pool, name, project)}
        n = 0
        while f"backup{n}" in used:
            n += 1
        return f"backup{n}"

    async def check_create(self, pool: str, name: str, bname: str, compression: str, project: str) -> str:
        rec = await self.custom.get(pool, name, project)
        from lxd_daemon.projects import policy as project_policy

        project_policy.backup_allowed(project, self.backups.services.projects.config(project))
        if rec.content_type != "filesystem":
            raise BadRequest("Backups of block custom volumes are not supported yet")
        try:
            names.backup(bname)
        except names.InvalidName as e:
            raise BadRequest(e.message) from None
        if any(r.name == bname for r in await self.list(pool, name, project)):
            raise Conflict(f"Backup {bname!r} already exists")
        return bcreate.check_compression(compression or self.backups.default_compression())

    @staticmethod
    def volume_dict(rec) -> dict:
        return {"config": dict(rec.config), "description": rec.description, "name": rec.name, "type": "custom",
                "used_by": [], "location": "none", "content_type": rec.content_type, "project": rec.project,
                "created_at": rec.created_at}

    async def create(self, pool: str, name: str, bname: str, *, expires_at: str = "", volume_only: bool = False,
                     optimized: bool = False, compression: str = "gzip", project: str) -> BackupRow:
        storage = self.services.storage
        p = storage.get(pool)
        async with self.custom.lock(pool, name, project):
            rec = await self.custom.get(pool, name, project)
            snaps = [] if volume_only else await self.custom.snapshots(pool, name, project)
            vol_snaps = [{"config": dict(s.config), "description": s.description, "name": s.name,
                          "content_type": rec.content_type, "created_at": s.created_at,
                          "expires_at": s.expires_at or ZERO_TIME} for s in snaps]
            from lxd_daemon.backups.config import build_config

            cfg = build_config(None, None, await storage.render(p), self.volume_dict(rec), vol_snaps)
            use_optimized = optimized and p.driver.info.optimized_backups
            row = BackupRow(0, rec.id, bname, rfc3339(), expires_at, volume_only, optimized, compression)
            dest = self._file(pool, rec.id, bname)
            await asyncio.to_thread(_remove, dest)
            async with Revert() as revert:
                await bcreate.write_backup(p.driver, pool, rec.volume, name=name, btype="custom",
                                           snapshots=[s.name for s in snaps], config=cfg, backup_yaml=None,
                                           optimized=use_optimized, compression=compression, dest=dest)
                revert.add(asyncio.to_thread, _remove, dest)

                row.id = await self.db.run(lambda session: _insert_row(session, "storage_volumes_backups", row))
                revert.success()
        return row

    async def rename(self, pool: str, name: str, bname: str, new: str, project: str) -> None:
        try:
            names.backup(new)
        except names.InvalidName as e:
            raise BadRequest(e.message) from None
        async with self.custom.lock(pool, name, project):
            row = await self.get(pool, name, bname, project)
            if any(r.name == new for r in await self.list(pool, name, project)):
                raise Conflict(f"Backup {new!r} already exists")
            old_path = self._file(pool, row.owner_id, bname)
            new_path = old_path.parent / new
            async with Revert() as revert:
                await asyncio.to_thread(os.rename, old_path, new_path)
                revert.add(asyncio.to_thread, os.rename, new_path, old_path)
                await self.db.run(lambda s: s.execute(
                    text("UPDATE storage_volumes_backups SET name=:n WHERE id=:i"), {"n": new, "i": row.id}))
                revert.success()

    async def delete(self, pool: str, name: str, bname: str, project: str) -> None:
        row = await self.get(pool, name, bname, project)
        await self.db.run(lambda s: s.execute(text("DELETE FROM storage_volumes_backups WHERE id=:i"),
                                              {"i": row.id}))
        await asyncio.to_thread(_remove, self._file(pool, row.owner_id, bname))

    async def open_file(self, pool: str, name: str, bname: str, project: str):
        row = await self.get(pool, name, bname, project)
        path = self._file(pool, row.owner_id, bname)

        def op():
            f = open(path, "rb")  # noqa: SIM115 - closed by the response
            return f, os.fstat(f.fileno()).st_size

        try:
            return await asyncio.to_thread(op)
        except FileNotFoundError:
            raise NotFound(f"The file of backup {name}/{bname} is missing") from None

    async def expire(self, now: float | None = None) -> list[str]:
        now = time.time() if now is None else now

        def q(session):
            return session.execute(text(
                "SELECT b.name AS bname, v.name AS vname, v.project, p.name AS pool, b.expires_at "
                "FROM storage_volumes_backups b JOIN storage_volumes v ON v.id = b.volume_id "
                "JOIN storage_pools p ON p.id = v.pool_id")).all()

        gone = []
        for r in await self.db.run(q):
            if _expired(r.expires_at or "", now):
                try:
                    await self.delete(r.pool, r.vname, r.bname, r.project)
                    gone.append(f"{r.pool}/{r.vname}/{r.bname}")
                except NotFound:
                    pass
        return gone

    # -- import ------------------------------------------------------------------------------
    async def prepare_import(self, upload: Path, pool: str, new_name: str,
                             project: str) -> VolumeImportPlan:
        from lxd_daemon.storage.custom import NEVER, VolumeSnapshot

        p = self.services.storage.get(pool)
        project = self.custom.effective(project)  # where the volume lands (features.storage.volumes)
        res = await asyncio.to_thread(brestore.scan, upload, Path(str(upload) + ".d"))
        idx = res.index
        if idx.type != "custom":
            raise BadRequest(f"The file is a backup of a {idx.type}, not of a custom volume "
                             "(import it with `lxc import`)")
        name = new_name or idx.name
        try:
            names.volume(name)
        except names.InvalidName as e:
            raise BadRequest(e.message) from None
        if idx.optimized and (p.driver_name != idx.backend or not p.driver.info.optimized_backups):
            raise BadRequest(f"An optimised {idx.backend} backup can only be imported into a "
                             f"{idx.backend} storage pool (pool {pool!r} is {p.driver_name})")
        cfg = idx.config
        vol = cfg.volume if cfg is not None and cfg.volume is not None else {}
        ct = str(vol.get("content_type") or "filesystem")
        if ct != "filesystem":
            raise BadRequest("Importing backups of block custom volumes is not supported yet")
        config = {k: v for k, v in (vol.get("config") or {}).items() if not k.startswith("volatile.")}
        try:
            config = self.custom.validate_config(p, config)
        except LXDError as e:
            raise BadRequest(f"The backup's volume config is not valid on pool {pool!r}: {e.message}") from None
        if await self.custom._find(pool, name, project) is not None:
            raise Conflict(f"Storage volume {name!r} already exists on pool {pool!r}")
        snap_cfg = {s["name"]: s for s in (cfg.volume_snapshots if cfg is not None else [])}
        now = rfc3339()
        snaps = []
        for s in idx.snapshots:
            sc = snap_cfg.get(s, {})
            snaps.append(VolumeSnapshot(0, 0, s, str(sc.get("description") or ""), _time(sc.get("created_at")) or now,
                                        parse_expiry_quiet(sc.get("expires_at")) or NEVER, dict(config)))
        return VolumeImportPlan(upload, res, p, name, project, str(vol.get("description") or ""), ct, config, snaps)

    async def run_import(self, plan: VolumeImportPlan) -> None:
        """Made under a temporary name (`.tmp-<hex>-<name>`, swept at start-up without a record),
        the records committed, then renamed into place (custom.py's crash-safety scheme)."""
        from lxd_daemon.storage.custom import _tmp_name

        p, res, name = plan.pool, plan.scan, plan.name
        drv = p.driver
        final = Volume(p.name, VolumeType.CUSTOM, name, project=plan.project, content_type=plan.content_type,
                       config=plan.config)
        tmp = final.renamed(_tmp_name(name))
        main, snaps_dir = bcreate.member_dirs(VolumeType.CUSTOM)
        snap_names = [s.name for s in plan.snapshots]
        async with self.custom.lock(p.name, name, plan.project):
            if await self.custom._find(p.name, name, plan.project) is not None:
                raise Conflict(f"Storage volume {name!r} already exists on pool {p.name!r}")
            async with Revert() as revert:
                revert.add(self.custom._drop, p, tmp)
                if res.index.optimized:
                    await drv.restore_volume_optimized(tmp, snap_names, brestore.spool_member(res))
                else:
                    first = f"{snaps_dir}/{snap_names[0]}" if snap_names else main

                    async def fill(path: Path) -> None:
                        await brestore.extract_tree(plan.path, res.compression, first, path)

                    await drv.create_volume(tmp, filler=fill)
                    path = await drv.mount_volume(tmp)
                    try:
                        for i, s in enumerate(snap_names):
                            if i:
                                await brestore.clear_dir(path)
                                await brestore.extract_tree(plan.path, res.compression, f"{snaps_dir}/{s}", path)
                            await drv.create_snapshot(tmp.snapshot(s))
                        if snap_names:
                            await brestore.clear_dir(path)
                            await brestore.extract_tree(plan.path, res.compression, main, path)
                    finally:
                        await drv.unmount_volume(tmp)
                vid = await self.custom._insert(p, name, plan.project, plan.description, plan.content_type,
                                                plan.config, plan.snapshots)
                revert.add(self.custom._delete_row, vid)
                await drv.rename_volume(tmp, name)
                revert.success()


# The two backup tables: (owner column, "only" column).
_BACKUP_TABLES = {"instances_backups": ("instance_id", "instance_only"),
                  "storage_volumes_backups": ("volume_id", "volume_only")}


def _insert_row(session, table: str, row: BackupRow) -> int:
    owner, only = _BACKUP_TABLES[table]
    return session.execute(text(
        f"INSERT INTO {table} ({owner}, name, created_at, expires_at, {only}, optimized_storage, "
        "compression_algorithm) VALUES (:i, :n, :c, :e, :o, :opt, :comp) RETURNING id"),
        {"i": row.owner_id, "n": row.name, "c": row.created_at, "e": row.expires_at, "o": row.only,
         "opt": row.optimized, "comp": row.compression}).scalar_one()


def _select_rows(session, table: str, owner_id: int | None) -> list[BackupRow]:
    """The backup rows of one owner (or of all), oldest first."""
    owner, only = _BACKUP_TABLES[table]
    sql = (f"SELECT id, {owner} AS owner, name, created_at, expires_at, {only} AS only, optimized_storage, "
           f"compression_algorithm FROM {table}")
    if owner_id is None:
        rows = session.execute(text(sql + " ORDER BY id")).all()
    else:
        rows = session.execute(text(sql + f" WHERE {owner}=:o ORDER BY id"), {"o": owner_id}).all()
    return [BackupRow(r.id, r.owner, r.name, r.created_at, r.expires_at or "", bool(r.only),
                      bool(r.optimized_storage), r.compression_algorithm or "") for r in rows]
