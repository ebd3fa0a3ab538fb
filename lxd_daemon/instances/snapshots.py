"""Instance snapshots: records in `instances_snapshots`, volumes through the storage layer.

A snapshot record keeps what the instance was when it was taken (its local config, devices,
profile names, architecture); its volume is the root volume's snapshot `<instance>/<snap>` on the
instance's pool (a read-only subvolume on btrfs, a copy of the tree on dir). Records are cached
in memory per instance id (loaded at start-up; every change is written through).

Order for crash safety: a create makes the volume, then the row (a crash in between leaves a
volume without a row, removed when the same name is taken again); a delete removes the row,
then the volume. Restore swaps the volume's content in one rename (the drivers' restore), then
writes the record.

The scheduler (one asyncio task) wakes at each minute: it takes the snapshots whose
`snapshots.schedule` is due (running instances, stopped ones too with
`snapshots.schedule.stopped`), named by `snapshots.pattern`, expiring after `snapshots.expiry`,
and deletes expired snapshots. `run_due(now)` is that pass for one minute (the loop calls it;
`POST /internal/snapshots/tick` lets tests run it for a chosen minute). `@startup` snapshots are
taken when an instance starts (as LXD does).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
from dataclasses import dataclass, field

from sqlalchemy import text

from lxd_daemon import names
from lxd_daemon.errors import BadRequest, Conflict, LXDError, NotFound
from lxd_daemon.instances import cloudinit, validation
from lxd_daemon.projects.naming import query, split, storage_name
from lxd_daemon.storage.volume import Volume
from lxd_daemon.util import schedule
from lxd_daemon.util.revert import Revert
from lxd_daemon.util.tasks import cancel_and_wait
from lxd_daemon.util.timefmt import ZERO_TIME, parse_rfc3339, rfc3339
from lxd_daemon.warnings import SCHEDULED_SNAPSHOT_FAILURE, raise_warning, resolve_warning

log = logging.getLogger("lxd.snapshots")

TRUE = ("true", "1", "yes", "on")
CRIU_MISSING = ("Stateful snapshots need CRIU, which is not available on this server "
                "(take a stateless snapshot: stateful=false)")


@dataclass
class Snapshot:
    id: int
    instance_id: int
    name: str
    created_at: str
    expires_at: str = ""  # RFC 3339; "" never
    description: str = ""
    stateful: bool = False
    architecture: str = ""
    ephemeral: bool = False
    config: dict[str, str] = field(default_factory=dict)
    devices: dict[str, dict[str, str]] = field(default_factory=dict)
    profiles: list[str] = field(default_factory=list)

    def expiry_ts(self) -> float | None:
        if not self.expires_at or self.expires_at.startswith("0001-01-01"):
            return None
        try:
            return parse_rfc3339(self.expires_at)
        except ValueError:
            return None


def parse_expires_at(value: str | None) -> str:
    """An `expires_at` of a request as stored: "" for never (Go's zero time or empty)."""
    if not value or value.startswith("0001-01-01"):
        return ""
    try:
        ts = parse_rfc3339(value)
    except (ValueError, OverflowError):
        raise BadRequest(f"Invalid expires_at {value!r} (expected an RFC 3339 time)") from None
    return rfc3339(ts)


def _utc(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, dt.UTC)


_COLUMNS = ("id, instance_id, name, description, created_at, expires_at, stateful, architecture, ephemeral, "
            "config, devices, profiles")


class SnapshotStore:
    """The `instances_snapshots` rows: the only place that knows their SQL. Each method is one
    transaction, except insert(), which runs inside the caller's."""

    def __init__(self, db):
        self.db = db

    async def load(self, instance_id: int | None = None) -> list[Snapshot]:
        """Every row (or one instance's), oldest first."""
        where = "" if instance_id is None else " WHERE instance_id=:i"

        def q(session):
            return session.execute(text(f"SELECT {_COLUMNS} FROM instances_snapshots{where} ORDER BY created_at, id"),
                                   {"i": instance_id}).all()

        return [_from_row(r) for r in await self.db.run(q)]

    @staticmethod
    def insert(session, s: Snapshot) -> int:
        return session.execute(text(
            "INSERT INTO instances_snapshots (instance_id, name, description, created_at, expires_at, stateful, "
            "architecture, ephemeral, config, devices, profiles) VALUES (:i, :n, :d, :c, :e, :s, :a, :eph, :cfg, "
            ":dev, :p) RETURNING id"),
            {"i": s.instance_id, "n": s.name, "d": s.description, "c": s.created_at, "e": s.expires_at,
             "s": s.stateful, "a": s.architecture, "eph": s.ephemeral, "cfg": json.dumps(s.config),
             "dev": json.dumps(s.devices), "p": json.dumps(s.profiles)}).scalar_one()

    async def add(self, s: Snapshot) -> int:
        return await self.db.run(lambda session: self.insert(session, s))

    async def delete(self, snapshot_id: int) -> None:
        await self._exec("DELETE FROM instances_snapshots WHERE id=:i", {"i": snapshot_id})

    async def rename(self, snapshot_id: int, new: str) -> None:
        await self._exec("UPDATE instances_snapshots SET name=:n WHERE id=:i", {"n": new, "i": snapshot_id})

    async def update(self, snapshot_id: int, *, expires_at: str, description: str) -> None:
        await self._exec("UPDATE instances_snapshots SET expires_at=:e, description=:d WHERE id=:i",
                         {"e": expires_at, "d": description, "i": snapshot_id})

    async def _exec(self, sql: str, params: dict) -> None:
        await self.db.run(lambda session: session.execute(text(sql), params))


class SnapshotService:
    def __init__(self, services):
        self.services = services
        self.db = services.db
        self.store = SnapshotStore(services.db)
        self.by_instance: dict[int, dict[str, Snapshot]] = {}
        self._task: asyncio.Task | None = None
        self._bg: set[asyncio.Task] = set()

    @property
    def instances(self):
        return self.services.instances

    # -- records ---------------------------------------------------------------------------
    async def load(self) -> None:
        for s in await self.store.load():
            self.by_instance.setdefault(s.instance_id, {})[s.name] = s
        await self.sweep()

    async def sweep(self) -> None:
        """At start-up: remove snapshot volumes of known instances that have no row (a create
        killed between its volume and its row, or a delete between its row and its volume).
        Volumes of instances without records are left alone (`lxd recover` looks for those)."""
        svc = self.instances
        for name, rec in list(svc.records.items()):
            try:
                pool, vol = self._pool_and_volume(name)
                on_disk = await pool.driver.list_snapshots(vol)
            except Exception as e:
                log.warning("couldn't list an instance's snapshot volumes", extra={"instance": name, "err": str(e)})
                continue
            rows = self.by_instance.get(rec.id, {})
            for snap in on_disk:
                if snap in rows:
                    continue
                log.warning("removing a snapshot volume without a record", extra={"instance": name, "snapshot": snap})
                try:
                    await pool.driver.delete_snapshot(vol.snapshot(snap))
                except Exception as e:
                    log.warning("couldn't remove a leftover snapshot volume",
                                extra={"instance": name, "snapshot": snap, "err": str(e)})

    async def reload(self, instance_id: int) -> None:
        """Re-read one instance's rows (after something else wrote them: `lxd recover`, imports)."""
        self.by_instance[instance_id] = {s.name: s for s in await self.store.load(instance_id)}

    def forget(self, instance_id: int) -> None:
        """The instance's rows are gone (ON DELETE CASCADE): drop them from the cache."""
        self.by_instance.pop(instance_id, None)

    def list(self, name: str) -> list[Snapshot]:
        rec = self.instances.record(name)
        return list(self.by_instance.get(rec.id, {}).values())

    def get(self, name: str, snap: str) -> Snapshot:
        rec = self.instances.record(name)
        s = self.by_instance.get(rec.id, {}).get(snap)
        if s is None:
            raise NotFound(f"Instance snapshot {rec.name}/{snap} not found")
        return s

    def names(self, name: str) -> list[str]:
        return [s.name for s in self.list(name)]

    def insert_rows_sql(self, session, instance_id: int, snaps: list[Snapshot]) -> list[Snapshot]:
        """Insert copies of `snaps` for `instance_id` inside the caller's transaction (instance
        creates: copies, imports); returns them with their ids. Call `adopt` after the commit."""
        out = []
        for s in snaps:
            c = Snapshot(0, instance_id, s.name, s.created_at, s.expires_at, s.description, s.stateful,
                         s.architecture, s.ephemeral, dict(s.config), {k: dict(v) for k, v in s.devices.items()},
                         list(s.profiles))
            c.id = self.store.insert(session, c)
            out.append(c)
        return out

    def adopt(self, snaps: list[Snapshot]) -> None:
        for s in snaps:
            self.by_instance.setdefault(s.instance_id, {})[s.name] = s

    # -- rendering -------------------------------------------------------------------------
    def render(self, s: Snapshot, project: str) -> dict:
        """A snapshot of an instance of `project` (whose profiles expand it)."""
        profiles = self.services.profiles.in_project(project)
        pinputs = [profiles[p].as_expand_input() for p in s.profiles if p in profiles]
        ec, ed = validation.expand(pinputs, s.config, s.devices)
        return {
            "architecture": s.architecture,
            "config": dict(s.config),
            "created_at": s.created_at,
            "devices": {k: dict(v) for k, v in s.devices.items()},
            "ephemeral": s.ephemeral,
            "expanded_config": ec,
            "expanded_devices": ed,
            "expires_at": s.expires_at or ZERO_TIME,
            "last_used_at": ZERO_TIME,
            "name": s.name,
            "profiles": list(s.profiles),
            "stateful": s.stateful,
            "size": -1,
            "description": s.description,
        }

    def render_all(self, name: str) -> list[dict]:
        project = self.instances.record(name).project
        return [self.render(s, project) for s in self.list(name)]

    # -- helpers ---------------------------------------------------------------------------
    def _pool_and_volume(self, name: str):
        svc = self.instances
        pool = svc._root_pool(svc.expanded(name)[1], name)
        project, api_name = split(name)  # (volumes are named by API name and project)
        return pool, svc.services.storage.volumes.instance_volume(pool, api_name, project)

    def _expiry_for(self, name: str, expires_at: str | None, now: float) -> str:
        if expires_at is not None:
            return parse_expires_at(expires_at)
        spec = self.instances.expanded(name)[0].get("snapshots.expiry", "")
        try:
            when = schedule.expiry_at(spec, _utc(now))
        except ValueError as e:
            raise BadRequest(f"Invalid snapshots.expiry: {e}") from None
        return rfc3339(when.timestamp()) if when is not None else ""

    def next_name(self, name: str, now: float | None = None) -> str:
        pattern = self.instances.expanded(name)[0].get("snapshots.pattern") or schedule.DEFAULT_PATTERN
        existing = set(self.names(name))
        try:
            snap = schedule.render_pattern(pattern, existing, _utc(now or _now()))
            if snap in existing:  # a pattern without %d whose name is taken: LXD appends "-%d"
                snap = schedule.render_pattern(pattern + "-%d", existing, _utc(now or _now()))
            return snap
        except ValueError as e:
            raise BadRequest(f"Invalid snapshots.pattern: {e}") from None

    def _events(self):
        return self.services.events

    def _lifecycle(self, action: str, key: str, suffix: str = "", context: dict | None = None,
                   requestor: dict | None = None) -> None:
        """A lifecycle event about instance `key` (or something under it: `suffix`): its source is
        the instance's API URL with its project, and the event carries the project."""
        rec = self.instances.records.get(key)
        project, name = (rec.project, rec.name) if rec is not None else split(key)
        self._events().lifecycle(action, f"/1.0/instances/{name}{suffix}{query(project)}", context,
                                 requestor=requestor, project=project)

    # -- create ----------------------------------------------------------------------------
    def _project_allows(self, project: str) -> bool:
        from lxd_daemon.errors import LXDError
        from lxd_daemon.projects import policy as project_policy

        try:
            project_policy.snapshot_allowed(project, self.services.projects.config(project))
        except LXDError:
            return False
        return True

    def check_create(self, name: str, snap: str, stateful: bool) -> None:
        """What can be refused before an operation starts."""
        project = self.instances.record(name).project
        from lxd_daemon.projects import policy as project_policy

        project_policy.snapshot_allowed(project, self.instances.projects.config(project))
        try:
            names.snapshot(snap)
        except names.InvalidName as e:
            raise BadRequest(e.message) from None
        if snap in self.by_instance.get(self.instances.record(name).id, {}):
            raise Conflict(f"Snapshot {snap!r} already exists")

    async def create(self, name: str, snap: str, *, expires_at: str | None = None, stateful: bool = False,
                     description: str = "", requestor: dict | None = None) -> Snapshot:
        async with self.instances.lock(name):
            s = await self.create_locked(name, snap, expires_at=expires_at, stateful=stateful,
                                         description=description)
        self._lifecycle("instance-snapshot-created", name, f"/snapshots/{snap}", requestor=requestor)
        return s

    async def create_locked(self, name: str, snap: str, *, expires_at: str | None = None, stateful: bool = False,
                            description: str = "", clock: float | None = None) -> Snapshot:
        """Take snapshot `snap` of `name` (the caller holds the instance's lock). snapshots.expiry
        counts from `clock` (the scheduler's time; default now). `stateful`: the running
        instance is checkpointed (left running) first and the snapshot's volume holds its state
        (migration/criu.py `snapshot_state`)."""
        self.check_create(name, snap, stateful)
        if stateful:
            from lxd_daemon.migration import criu

            async with criu.snapshot_state(self.instances, name):
                return await self._create_locked(name, snap, expires_at, True, description, clock)
        return await self._create_locked(name, snap, expires_at, False, description, clock)

    async def _create_locked(self, name: str, snap: str, expires_at: str | None, stateful: bool, description: str,
                             clock: float | None) -> Snapshot:
        svc = self.instances
        rec = svc.record(name)
        now = _now()
        expiry = self._expiry_for(name, expires_at, now if clock is None else clock)
        pool, vol = self._pool_and_volume(name)
        svol = vol.snapshot(snap)
        drv = pool.driver
        s = Snapshot(0, rec.id, snap, rfc3339(now), expiry, description, stateful, rec.architecture, rec.ephemeral,
                     dict(rec.config), {k: dict(v) for k, v in rec.devices.items()}, list(rec.profiles))
        async with Revert() as revert:
            await self._take(name, pool, svol)
            revert.add(drv.delete_snapshot, svol)
            s.id = await self.store.add(s)
            revert.success()
        self.by_instance.setdefault(rec.id, {})[snap] = s
        self._refresh_backup_yaml(name)
        return s

    async def _take(self, name: str, pool, svol: Volume) -> None:
        """The volume part of a snapshot: a running instance is frozen meanwhile on drivers whose
        snapshots are copies (dir), as LXD does; copy-on-write snapshots are atomic."""
        svc = self.instances
        drv = pool.driver

        async def make() -> None:
            async with svc.backup_yaml_lock(name):  # no backup.yaml rewrite in the middle of the copy
                try:
                    await drv.create_snapshot(svol)
                except Conflict:
                    # A volume without a row: a crash's leftover between a create's two steps.
                    await drv.delete_snapshot(svol)
                    await drv.create_snapshot(svol)

        status = svc.status_of(name)[0]
        if status != "Running" or drv.info.cow_snapshots:
            await make()
            return
        cg = svc._cgroups(name)
        froze = False
        with contextlib.suppress(OSError, LXDError):
            await svc._freeze_cg(name, cg, True)
            froze = True
        try:
            await make()
        finally:
            if froze:
                with contextlib.suppress(OSError, LXDError):
                    await svc._freeze_cg(name, cg, False)

    def _refresh_backup_yaml(self, name: str) -> None:
        svc = self.instances
        if name in svc.records:
            svc.refresh_backup_yaml(name)

    # -- delete / rename / update ----------------------------------------------------------
    async def delete(self, name: str, snap: str, requestor: dict | None = None) -> None:
        async with self.instances.lock(name):
            await self.delete_locked(name, snap)
        self._lifecycle("instance-snapshot-deleted", name, f"/snapshots/{snap}", requestor=requestor)

    async def delete_locked(self, name: str, snap: str) -> None:
        s = self.get(name, snap)
        pool, vol = self._pool_and_volume(name)

        await self.store.delete(s.id)
        self.by_instance.get(s.instance_id, {}).pop(snap, None)
        try:
            await pool.driver.delete_snapshot(vol.snapshot(snap))
        except Exception:
            # The row is gone: the snapshot no longer exists for the API; its volume is a
            # leftover that a new snapshot of the same name replaces.
            log.exception("removing a snapshot's volume failed", extra={"instance": name, "snapshot": snap})
        self._refresh_backup_yaml(name)

    async def rename(self, name: str, snap: str, new: str, requestor: dict | None = None) -> None:
        try:
            names.snapshot(new)
        except names.InvalidName as e:
            raise BadRequest(e.message) from None
        async with self.instances.lock(name):
            s = self.get(name, snap)
            if new in self.by_instance.get(s.instance_id, {}):
                raise Conflict(f"Name {new!r} already in use")
            pool, vol = self._pool_and_volume(name)
            async with Revert() as revert:
                await pool.driver.rename_snapshot(vol.snapshot(snap), new)
                revert.add(pool.driver.rename_snapshot, vol.snapshot(new), snap)
                await self.store.rename(s.id, new)
                revert.success()
            snaps = self.by_instance[s.instance_id]
            # keep creation order
            self.by_instance[s.instance_id] = {(new if k == snap else k): v for k, v in snaps.items()}
            s.name = new
        self._refresh_backup_yaml(name)
        self._lifecycle("instance-snapshot-renamed", name, f"/snapshots/{new}", {"old_name": snap},
                        requestor=requestor)

    async def update(self, name: str, snap: str, *, expires_at: str | None, description: str | None,
                     requestor: dict | None = None) -> None:
        async with self.instances.lock(name):
            s = self.get(name, snap)
            exp = s.expires_at if expires_at is None else parse_expires_at(expires_at)
            desc = s.description if description is None else description
            await self.store.update(s.id, expires_at=exp, description=desc)
            s.expires_at, s.description = exp, desc
        self._refresh_backup_yaml(name)
        self._lifecycle("instance-snapshot-updated", name, f"/snapshots/{snap}", requestor=requestor)

    # -- restore ---------------------------------------------------------------------------
    def check_restore(self, name: str, snap: str, stateful: bool) -> Snapshot:
        """What a restore can refuse before an operation starts (CRIU is asked by the caller)."""
        s = self.get(name, snap)
        if stateful and not s.stateful:
            raise BadRequest(f"Snapshot {snap!r} is stateless: it has no saved state to restore "
                             "(restore it without --stateful)")
        return s

    async def restore(self, name: str, snap: str, *, stateful: bool = False, requestor: dict | None = None) -> None:
        """Make instance `name` what snapshot `snap` holds: its volume, config, devices and
        profiles. A running instance is stopped, restored and started again (as LXD).
        `stateful` (a stateful snapshot's): the instance then starts from the snapshot's saved
        state, whether or not it was running (migration/criu.py); a failed restore of that state
        leaves it stopped and stateful (`lxc start` tries again, `--stateless` boots instead).
        A stateless restore leaves no saved state behind."""
        from lxd_daemon.migration import criu

        svc = self.instances
        if stateful:
            await criu.require("Restoring a stateful snapshot")
        async with svc.lock(name):
            s = self.check_restore(name, snap, stateful)
            rec = svc.record(name)
            missing = [p for p in s.profiles if p not in self.services.profiles.in_project(rec.project)]
            if missing:
                raise BadRequest(f"Can't restore snapshot {snap!r}: its profiles no longer exist: "
                                 f"{', '.join(missing)}")
            # What the snapshot brings back is checked against the project's restrictions and
            # limits as an update would be (a snapshot may predate them).
            svc.policy_check("update", name, {**{k: v for k, v in s.config.items() if not k.startswith("volatile.")},
                                              **{k: v for k, v in rec.config.items() if k.startswith("volatile.")}},
                             s.devices, s.profiles, project=rec.project, current=rec.config, itype=rec.type)
            svc.policy_done(name)
            status = svc.status_of(name)[0]
            was_running = status != "Stopped"
            if was_running:
                await svc.stop(name, force=True)
            pool, vol = self._pool_and_volume(name)
            try:
                await pool.driver.restore_snapshot(vol.snapshot(s.name))
            except BaseException:
                if was_running:  # the volume is as it was (the drivers swap in one rename)
                    with contextlib.suppress(Exception):
                        await svc.start(name)
                raise
            # The snapshot's own config, devices and profiles; the files' id map is the
            # snapshot's (a start shifts them if the instance's map differs now); the
            # instance's identity and current maps stay.
            before = svc.expanded(name)
            config = {k: v for k, v in s.config.items() if not k.startswith("volatile.")}
            for k, v in rec.config.items():
                if k.startswith("volatile."):
                    config[k] = v
            if s.config.get("volatile.last_state.idmap"):
                config["volatile.last_state.idmap"] = s.config["volatile.last_state.idmap"]
            if s.config.get("volatile.base_image"):
                config["volatile.base_image"] = s.config["volatile.base_image"]
            rec.config = config
            rec.devices = {k: dict(v) for k, v in s.devices.items()}
            rec.profiles = list(s.profiles)
            rec.architecture = s.architecture or rec.architecture
            rec.ephemeral = s.ephemeral
            # cloud-init runs again when the restored cloud-init keys differ (as an update would)
            rec.config.update(cloudinit.on_update(before, svc.expanded(name), rec.config))
            if not stateful:
                await criu.drop_state(svc, name)  # (the volume's state dir is the snapshot's now)
            await svc.store.save(rec)
            svc.refresh_backup_yaml(name)
            if stateful:
                await criu.restore_snapshot_state(svc, name)
            elif was_running:
                await svc.start(name)
        self._lifecycle("instance-restored", name, "", {"snapshot": snap}, requestor=requestor)

    # -- instance start: @startup ----------------------------------------------------------
    async def on_start_locked(self, name: str) -> None:
        """Before a stopped instance starts (the caller holds its lock): an `@startup` trigger
        in snapshots.schedule takes a snapshot."""
        ec = self.instances.expanded(name)[0]
        if not schedule.has_startup(ec.get("snapshots.schedule", "")) or \
                not self._project_allows(self.instances.record(name).project):
            return
        snap = self.next_name(name)
        await self.create_locked(name, snap)
        self._lifecycle("instance-snapshot-created", name, f"/snapshots/{snap}")

    # -- scheduler -------------------------------------------------------------------------
    async def run_due(self, now: dt.datetime | None = None) -> dict:
        """One scheduler pass for the minute of `now`: scheduled snapshots, then expired ones
        deleted. Returns {"created": ["c1/snap0", ...], "expired": [...], "errors": [...]}."""
        now = now or dt.datetime.now(dt.UTC)
        if now.tzinfo is None:
            now = now.replace(tzinfo=dt.UTC)
        created, expired, errors = [], [], []
        svc = self.instances
        for name, rec in list(svc.records.items()):
            try:
                ec = svc.expanded(name)[0]
            except LXDError:
                continue
            spec = ec.get("snapshots.schedule", "")
            if not spec or not schedule.due(spec, now, rec.id) or not self._project_allows(rec.project):
                continue  # (as LXD, a project that forbids snapshots skips its schedules)
            if svc.status_of(name)[0] == "Stopped" and (ec.get("snapshots.schedule.stopped") or "").lower() \
                    not in TRUE:
                continue
            try:
                async with svc.lock(name):
                    if name not in svc.records:
                        continue
                    snap = self.next_name(name, now.timestamp())
                    await self.create_locked(name, snap, clock=now.timestamp())
                created.append(f"{rec.name}/{snap}" + query(rec.project))
                self._lifecycle("instance-snapshot-created", name, f"/snapshots/{snap}")
            except Exception as e:
                errors.append(f"{rec.name}{query(rec.project)}: {getattr(e, 'message', str(e))}")
                log.warning("scheduled snapshot failed", extra={"instance": name, "err": str(e)})
                await raise_warning(self.services, SCHEDULED_SNAPSHOT_FAILURE,
                                    f"Failed to create a scheduled snapshot of {rec.name!r}: "
                                    f"{getattr(e, 'message', None) or e}",
                                    project=rec.project, entity_url=svc.url(name))
            else:
                await resolve_warning(self.services, SCHEDULED_SNAPSHOT_FAILURE, project=rec.project,
                                      entity_url=svc.url(name))
        ts = now.timestamp()
        for name, rec in list(svc.records.items()):
            for s in list(self.by_instance.get(rec.id, {}).values()):
                exp = s.expiry_ts()
                if exp is None or exp > ts:
                    continue
                try:
                    async with svc.lock(name):
                        if name in svc.records and s.name in self.by_instance.get(rec.id, {}):
                            await self.delete_locked(name, s.name)
                    expired.append(f"{rec.name}/{s.name}" + query(rec.project))
                    self._lifecycle("instance-snapshot-deleted", name, f"/snapshots/{s.name}")
                except Exception as e:
                    errors.append(f"{rec.name}/{s.name}{query(rec.project)}: {getattr(e, 'message', str(e))}")
                    log.warning("removing an expired snapshot failed",
                                extra={"instance": name, "snapshot": s.name, "err": str(e)})
        return {"created": created, "expired": expired, "errors": errors}

    async def _loop(self) -> None:
        while True:
            now = dt.datetime.now(dt.UTC)
            nxt = now.replace(second=0, microsecond=0) + dt.timedelta(minutes=1)
            await asyncio.sleep(max((nxt - now).total_seconds(), 0.5))
            try:
                await self.run_due(dt.datetime.now(dt.UTC))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("snapshot scheduler pass failed")

    async def start_scheduler(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="snapshot-scheduler")

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    # -- copies ----------------------------------------------------------------------------
    def copy_records(self, src_name: str) -> list[Snapshot]:
        """The source's snapshots as records for a copy: fresh volatile identity keys (the
        files' id map and base image stay, as LXD's copies keep them)."""
        out = []
        for s in self.list(src_name):
            cfg = {k: v for k, v in s.config.items()
                   if not k.startswith("volatile.") or k in ("volatile.base_image", "volatile.last_state.idmap")}
            out.append(Snapshot(0, 0, s.name, s.created_at, s.expires_at, s.description, s.stateful,
                                s.architecture, s.ephemeral, cfg, {k: dict(v) for k, v in s.devices.items()},
                                list(s.profiles)))
        return out

    async def move_to_pool(self, name: str, new: str, pool: str, *, instance_only: bool = False,
                           requestor: dict | None = None) -> None:
        """`lxc move NAME [NEW] -s POOL` (instance_pool_move; `name` is the instance's key, `new`
        its new API name in the same project): copy to a temporary name on `pool`
        (snapshots too unless `instance_only`; config and volatile keys kept, as a move keeps
        its identity), delete the original, rename the copy. A failure before the delete leaves
        the original as it was."""
        from lxd_daemon.wire.instances import InstancesPost

        svc = self.instances
        rec = svc.record(name)
        if svc.status_of(name)[0] != "Stopped":
            raise BadRequest("The instance must be stopped to move it to another storage pool")
        devices = {k: dict(v) for k, v in rec.devices.items()}
        root = validation.root_disk(devices)
        if root is not None:
            devices[root[0]]["pool"] = pool
        else:
            ed = svc.expanded(name)[1]
            eroot = validation.root_disk(ed)
            key = eroot[0] if eroot is not None else "root"
            devices[key] = {**(eroot[1] if eroot is not None else {"type": "disk", "path": "/"}), "pool": pool}
        tmp = f"lxd-move-of-{(rec.config.get('volatile.uuid') or str(rec.id))}"[:63].rstrip("-")
        body = InstancesPost.model_validate({
            "name": tmp, "architecture": rec.architecture, "config": dict(rec.config), "devices": devices,
            "profiles": list(rec.profiles), "ephemeral": rec.ephemeral, "description": rec.description,
            "source": {"type": "copy", "source": rec.name, "instance_only": instance_only}})
        project = rec.project
        tmp_key = storage_name(project, tmp)
        svc.reserve(tmp_key)
        try:
            plan = await svc.prepare_create(body, project, new_instance=False)  # a move makes no new instance
            await svc.create(plan)
        finally:
            svc.release(tmp_key)
        # A move makes no new instance: the original's pending template trigger (if any) stays.
        await svc._set_volatile(tmp_key, {"volatile.apply_template": rec.config.get("volatile.apply_template")})
        if rec.stateful:  # its saved state came along in the volume (a stateful move)
            trec = svc.record(tmp_key)
            trec.stateful = True
            await svc.store.save(trec)
        try:
            await svc.delete(name, requestor)
        except BaseException:
            with contextlib.suppress(Exception):
                await svc.delete(tmp_key, None)
            raise
        await svc.rename(tmp_key, new)
        self._lifecycle("instance-updated", storage_name(project, new), requestor=requestor)

    async def refresh(self, src: str, dst: str, *, instance_only: bool, requestor: dict | None = None) -> None:
        """`lxc copy SRC DST --refresh`: bring DST's snapshots and volume up to SRC's, copying only
        what is missing (snapshots compared by name and creation time) and syncing the volume."""
        svc = self.instances
        if src == dst:
            raise BadRequest("Can't refresh an instance from itself")
        first, second = sorted((src, dst))
        async with svc.lock(first), svc.lock(second):
            svc.record(src)
            drec = svc.record(dst)
            if svc.status_of(dst)[0] != "Stopped":
                raise BadRequest(f"Can't refresh instance {drec.name!r} while it is running")
            src_pool, src_vol = self._pool_and_volume(src)
            dst_pool, dst_vol = self._pool_and_volume(dst)
            volumes = self.services.storage.volumes
            want = [] if instance_only else self.copy_records(src)
            want_by = {s.name: s for s in want}
            have = {s.name: s for s in self.list(dst)}
            stale = [] if instance_only else [n for n, s in have.items()
                                              if n not in want_by or want_by[n].created_at != s.created_at]
            for n in stale:
                await self.delete_locked(dst, n)
            missing = [s for s in want if s.name not in have or s.name in stale]
            async with svc.backup_yaml_lock(src):
                await volumes.refresh_instance_volume(src_pool, src_vol, dst_pool, dst_vol,
                                                      [s.name for s in missing])

            def ins(session):
                return self.insert_rows_sql(session, drec.id, missing)

            self.adopt(await self.db.run(ins))
            disk_map = svc.records[src].config.get("volatile.last_state.idmap")
            if disk_map:
                await svc._set_volatile(dst, {"volatile.last_state.idmap": disk_map})
            await svc._write_backup_yaml(dst)
        self._lifecycle("instance-updated", dst, requestor=requestor)


def _from_row(r) -> Snapshot:
    return Snapshot(r.id, r.instance_id, r.name, r.created_at, r.expires_at or "", r.description or "",
                    bool(r.stateful), r.architecture or "", bool(r.ephemeral), json.loads(r.config or "{}"),
                    json.loads(r.devices or "{}"), json.loads(r.profiles or "[]"))


def _now() -> float:
    import time

    return time.time()


async def _quietly(coro) -> None:
    try:
        await coro
    except Exception:
        log.exception("background task failed")
