"""Custom storage volumes and their snapshots: records in `storage_volumes` and
`storage_volumes_snapshots`, volumes through the pool's driver.

Crash safety. A volume (or a snapshot) is made under a temporary name `.tmp-<8 hex>-<name>`,
its record is committed, then it is renamed to its name; a delete renames it to such a name
first, removes the record, then removes the volume. So after a crash the start-up sweep
(`load`) sees, for every `.tmp-*-<name>` left on a pool: a record for `<name>` whose volume is
missing (a create or a delete stopped after the record changed the other way round: the
temporary takes its place again), or no record (a create before its commit, a delete after it:
it is removed). A volume without a record that carries no such name is never touched (it may be
what `lxd recover` brings back).

Volumes are keyed by (pool, project, name) from the start; on disk a custom volume is named
`<project>_<name>` (Volume.storage_name).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from lxd_daemon import names
from lxd_daemon.errors import BadRequest, Conflict, NotFound
from lxd_daemon.projects.naming import DEFAULT, query, storage_name
from lxd_daemon.projects.service import making
from lxd_daemon.storage.drivers.trees import copy_tree, sync_tree
from lxd_daemon.storage.volume import ContentType, Volume, VolumeType
from lxd_daemon.util import schedule
from lxd_daemon.util.revert import Revert
from lxd_daemon.util.sizes import parse_byte_size
from lxd_daemon.util.tasks import cancel_and_wait
from lxd_daemon.util.timefmt import parse_rfc3339, rfc3339
from lxd_daemon.util.validate import is_bool

log = logging.getLogger("lxd.storage.custom")

TMP_PREFIX = ".tmp-"
_TMP = re.compile(r"^\.tmp-[0-9a-f]{8}-(.+)$", re.DOTALL)
NEVER = ""  # expires_at of a snapshot that doesn't expire
# Set on a record while its volume is being renamed: the name the volume had (see rename).
RENAMING_KEY = "volatile.rename.source"


def _size(value: str) -> None:
    parse_byte_size(value)


def _expiry(value: str) -> None:
    schedule.validate_expiry(value)


def _schedule(value: str) -> None:
    schedule.validate_schedule(value)


def _pattern(value: str) -> None:
    schedule.validate_pattern(value)


# Keys every custom volume takes, with their validators (ValueError with the reason).
VOLUME_KEYS: dict[str, Callable[[str], object]] = {
    "size": _size,
    "snapshots.expiry": _expiry,
    "snapshots.schedule": _schedule,
    "snapshots.pattern": _pattern,
    "security.shifted": is_bool,
    "security.unmapped": is_bool,
}
# Keys of block-backed drivers' volumes and of each driver (as LXD 5.0 lists them).
_BLOCK_KEYS = {"block.filesystem": lambda v: None, "block.mount_options": lambda v: None}
DRIVER_VOLUME_KEYS: dict[str, dict[str, Callable[[str], object]]] = {
    "dir": {},
    "btrfs": {},
    "lvm": {**_BLOCK_KEYS, "lvm.stripes": lambda v: int(v), "lvm.stripes.size": _size},
    "zfs": {**_BLOCK_KEYS, "zfs.blocksize": _size, "zfs.remove_snapshots": is_bool,
            "zfs.use_refquota": is_bool, "zfs.reserve_space": is_bool},
}
# Free-form keys: user data, and what the daemon records (volatile.idmap.last / .next).
FREE_PREFIXES = ("user.", "volatile.")


@dataclass
class CustomVolume:
    id: int
    pool: str
    name: str
    project: str
    description: str
    content_type: str
    created_at: str
    config: dict[str, str] = field(default_factory=dict)

    @property
    def volume(self) -> Volume:
        return Volume(self.pool, VolumeType.CUSTOM, self.name, project=self.project,
                      content_type=self.content_type, config=self.config)


@dataclass
class VolumeSnapshot:
    id: int
    volume_id: int
    name: str
    description: str
    created_at: str
    expires_at: str  # RFC 3339, "" for never
    config: dict[str, str] = field(default_factory=dict)


def _check_name(check: Callable[[object], str], name: str) -> None:
    """A name checked by one of lxd_daemon.names' validators, as a 400."""
    try:
        check(name)
    except names.InvalidName as e:
        raise BadRequest(e.message) from None
    if name.startswith(TMP_PREFIX):
        raise BadRequest(f"Invalid name {name!r}: names starting with {TMP_PREFIX!r} are reserved")


def _tmp_name(name: str) -> str:
    return f"{TMP_PREFIX}{uuid.uuid4().hex[:8]}-{name}"


def insert_snapshot_rows(session, vid: int, snapshots) -> None:
    """Rows for volume `vid`'s snapshots (copies keep their names, dates, expiry and config)."""
    for s in snapshots:
        session.execute(
            text("INSERT INTO storage_volumes_snapshots (volume_id, name, description, created_at, "
                 "expires_at, config) VALUES (:v, :n, :d, :c, :e, :cfg)"),
            {"v": vid, "n": s.name, "d": s.description, "c": s.created_at, "e": s.expires_at,
             "cfg": json.dumps(s.config)})


def _row_volume(pool: str, r) -> CustomVolume:
    return CustomVolume(r.id, pool, r.name, r.project, r.description, r.content_type, r.created_at,
                        json.loads(r.config or "{}"))


def _row_snapshot(r) -> VolumeSnapshot:
    return VolumeSnapshot(r.id, r.volume_id, r.name, r.description, r.created_at, r.expires_at or NEVER,
                          json.loads(r.config or "{}"))


class CustomVolumeService:
    """What `/1.0/storage-pools/{pool}/volumes/custom` does, and what disk devices ask of a volume."""

    SCHEDULE_INTERVAL = 60.0

    def __init__(self, storage):
        self.storage = storage
        self.db = storage.db
        # Async callables (pool, name, project) -> URLs of the instances and profiles whose
        # disk devices use the volume.
        self.used_by_providers: list[Callable[[str, str, str], Awaitable[list[str]]]] = []  # instances/subsystem.py adds the disks'
        self._locks: dict[str, asyncio.Lock] = {}
        self._task: asyncio.Task | None = None

    # -- helpers -----------------------------------------------------------------------------
    def effective(self, project: str) -> str:
        """The project whose custom volumes `project` uses (features.storage.volumes): every
        method takes the caller's project and resolves it here (resolving twice changes nothing)."""
        projects = getattr(self.storage.services, "projects", None)
        if projects is None:
            return project
        return projects.effective(project, "storage.volumes")

    def lock(self, pool: str, name: str, project: str) -> asyncio.Lock:
        project = self.effective(project)
        key = f"{pool}/{project}/{name}"
        lk = self._locks.get(key)
        if lk is None:
            lk = self._locks[key] = asyncio.Lock()
        return lk

    def _pool(self, pool: str):
        return self.storage.get(pool)

    # -- project limits (limits.disk) and restrictions (restricted.snapshots) -----------------
    def _projects(self):
        """The projects' policy state (projects/policy.py ProjectPolicy), when instances run."""
        return self.storage.services.projects

    def _check_disk(self, pool, name: str, project: str, config: dict[str, str], what: str) -> None:
        """Refuse (PolicyError, 400) a volume create ("creation") or config change ("update") that
        the project's limits.disk (and, then, its other limits and restrictions) refuse."""
        from lxd_daemon.projects import policy as project_policy

        pp = self._projects()
        if pp is None or not pp.config(project).get("limits.disk"):
            return
        instances, profiles = self.storage.services.instances.policy_entities(project)
        project_policy.check_volume(project, pp.config(project), instances, profiles,
                                    pp.volume_entities(project, (pool.id, name, config)), what)

    def _claim_disk(self, pool, name: str, project: str, config: dict[str, str], what: str,
                    enforce: bool = True) -> tuple[bool, dict | None]:
        """Check (if `enforce`) and record the volume's size in one synchronous step (no other
        change passes in between); returns what _unclaim_disk needs to undo it."""
        pp = self._projects()
        if pp is None:
            return False, None
        if enforce:
            self._check_disk(pool, name, project, config, what)
        return True, pp.set_volume(project, pool.id, name, config)

    def _unclaim_disk(self, pool, name: str, project: str, claim: tuple[bool, dict | None]) -> None:
        pp = self._projects()
        if pp is not None and claim[0]:
            pp.set_volume(project, pool.id, name, None)
            if claim[1] is not None:
                pp.volumes.setdefault(project, {})[(pool.id, name)] = claim[1]

    def validate_config(self, pool, config: dict[str, str]) -> dict[str, str]:
        """Check every key against the common ones and the pool driver's; 400 naming the key."""
        allowed = {**VOLUME_KEYS, **DRIVER_VOLUME_KEYS.get(pool.driver_name, {})}
        out = {}
        for key, value in config.items():
            if not isinstance(value, str):
                raise BadRequest(f"Invalid value for storage volume config {key!r}: must be a string")
            if key.startswith(FREE_PREFIXES):
                out[key] = value
                continue
            check = allowed.get(key)
            if check is None:
                raise BadRequest(f"Invalid option for storage volume config: {key!r}")
            if value != "":
                try:
                    check(value)
                except (ValueError, TypeError) as e:
                    raise BadRequest(f"Invalid value for storage volume config {key!r}: {e}") from None
            out[key] = value
        if out.get("security.shifted", "").lower() in ("true", "1", "yes", "on") and \
                out.get("security.unmapped", "").lower() in ("true", "1", "yes", "on"):
            raise BadRequest("security.shifted and security.unmapped can't both be set")
        return {k: v for k, v in out.items() if v != ""}

    def _with_pool_defaults(self, pool, config: dict[str, str]) -> dict[str, str]:
        """The pool's `volume.<key>` values for keys a new volume doesn't set (as LXD)."""
        allowed = {**VOLUME_KEYS, **DRIVER_VOLUME_KEYS.get(pool.driver_name, {})}
        out = dict(config)
        for key, value in pool.config.items():
            if key.startswith("volume."):
                sub = key[len("volume."):]
                if sub in allowed and sub not in out and value:
                    out[sub] = value
        return out

    @staticmethod
    def _check_content_type(pool, content_type: str) -> ContentType:
        try:
            ct = ContentType(content_type or "filesystem")
        except ValueError:
            raise BadRequest(f"Invalid content type {content_type!r} (filesystem or block)") from None
        if ct is ContentType.BLOCK and not pool.driver.info.block_backed:
            raise BadRequest(f"Block storage volumes are not supported on {pool.driver_name} pools")
        return ct

    # -- records -----------------------------------------------------------------------------
    async def list(self, pool: str, project: str | None) -> list[CustomVolume]:
        project = None if project is None else self.effective(project)
        p = self._pool(pool)

        def q(session):
            sql = ("SELECT id, project, name, description, content_type, created_at, config FROM storage_volumes "
                   "WHERE pool_id=:p AND type='custom'")
            args = {"p": p.id}
            if project is not None:
                sql += " AND project=:proj"
                args["proj"] = project
            return session.execute(text(sql + " ORDER BY name"), args).all()

        return [_row_volume(pool, r) for r in await self.db.run(q)]

    async def _find(self, pool: str, name: str, project: str) -> CustomVolume | None:
        project = self.effective(project)
        p = self._pool(pool)

        def q(session):
            return session.execute(
                text("SELECT id, project, name, description, content_type, created_at, config FROM storage_volumes "
                     "WHERE pool_id=:p AND type='custom' AND project=:proj AND name=:n"),
                {"p": p.id, "proj": project, "n": name}).first()

        r = await self.db.run(q)
        return _row_volume(pool, r) if r is not None else None

    async def get(self, pool: str, name: str, project: str) -> CustomVolume:
        project = self.effective(project)
        vol = await self._find(pool, name, project)
        if vol is None:
            raise NotFound("Storage volume not found")
        return vol

    async def instance_snapshots(self, instance_id: int) -> list:
        """Rows (name, description, created_at, expires_at) of an instance's snapshots, oldest first (the
        snapshots of its container volume)."""
        def q(session):
            return session.execute(
                text("SELECT name, description, created_at, expires_at FROM instances_snapshots WHERE instance_id=:i "
                     "ORDER BY created_at, id"), {"i": instance_id}).all()

        return await self.db.run(q)

    async def pool_volume_urls(self, pool: str) -> list[str]:
        """`used_by` of a pool: its custom volumes."""
        if pool not in self.storage.pools:
            return []
        return [f"/1.0/storage-pools/{pool}/volumes/custom/{v.name}{query(v.project)}"
                for v in await self.list(pool, None)]

    async def project_urls(self, project: str) -> list[str]:
        """The projects `providers` entry: the custom volumes a project with
        features.storage.volumes holds, on every pool."""
        if self.effective(project) != project:
            return []
        out = []
        for pool in list(self.storage.pools):
            out += [f"/1.0/storage-pools/{pool}/volumes/custom/{v.name}{query(project)}"
                    for v in await self.list(pool, project)]
        return out

    async def used_by(self, pool: str, name: str, project: str) -> list[str]:
        project = self.effective(project)
        out: list[str] = []
        for provider in self.used_by_providers:
            out.extend(await provider(pool, name, project))
        return sorted(set(out))

    async def _refuse_in_use(self, pool: str, name: str, project: str) -> None:
        if await self.used_by(pool, name, project):
            raise BadRequest("The storage volume is still in use")

    async def _insert(self, pool, name: str, project: str, description: str, content_type: str,
                      config: dict[str, str], snapshots: list[VolumeSnapshot] = (), *, enforce: bool = True) -> int:
        """The records of a new volume, checked against the project's limits.disk (`enforce`) and
        counted in one step with that check: every create, copy and import ends here."""
        project = self.effective(project)
        created = rfc3339()

        def ins(session):
            vid = session.execute(
                text("INSERT INTO storage_volumes (pool_id, project, type, name, description, content_type, "
                     "created_at, config) VALUES (:p, :proj, 'custom', :n, :d, :ct, :c, :cfg) RETURNING id"),
                {"p": pool.id, "proj": project, "n": name, "d": description, "ct": content_type,
                 "c": created, "cfg": json.dumps(config)}).scalar_one()
            insert_snapshot_rows(session, vid, snapshots)
            return vid

        claim = self._claim_disk(pool, name, project, config, "creation", enforce)
        try:
            vid = await self.db.run(ins)
        except IntegrityError:
            self._unclaim_disk(pool, name, project, claim)
            raise Conflict(f"Storage volume {name!r} already exists on pool {pool.name!r}") from None
        except BaseException:
            self._unclaim_disk(pool, name, project, claim)
            raise
        pp = self._projects()
        if pp is not None:
            pp.set_volume(project, pool.id, name, config, vid)
        return vid

    async def _delete_row(self, vid: int) -> None:
        def rm(session):
            session.execute(text("DELETE FROM storage_volumes WHERE id=:i"), {"i": vid})

        await self.db.run(rm)
        pp = self._projects()
        if pp is not None:
            pp.forget_volume_id(vid)

    # -- volumes -----------------------------------------------------------------------------
    async def create(self, pool: str, name: str, *, project: str, description: str = "",
                     config: dict[str, str] | None = None, content_type: str = "filesystem") -> CustomVolume:
        project = self.effective(project)
        _check_name(names.volume, name)
        p = self._pool(pool)
        ct = self._check_content_type(p, content_type)
        config = self.validate_config(p, self._with_pool_defaults(p, dict(config or {})))
        with making(self._projects(), project):  # not in a project being deleted
            async with self.lock(pool, name, project):
                if await self._find(pool, name, project) is not None:
                    raise Conflict(f"Storage volume {name!r} already exists on pool {pool!r}")
                self._check_disk(p, name, project, config, "creation")
                final = Volume(pool, VolumeType.CUSTOM, name, project=project, content_type=ct, config=config)
                tmp = final.renamed(_tmp_name(name))
                async with Revert() as revert:
                    await p.driver.create_volume(tmp)
                    revert.add(p.driver.delete_volume, tmp)
                    vid = await self._insert(p, name, project, description, ct.value, config)
                    revert.add(self._delete_row, vid)
                    await p.driver.rename_volume(tmp, name)
                    revert.success()
        return await self.get(pool, name, project)

    async def copy(self, pool: str, name: str, *, src_pool: str, src_name: str, project: str,
                   src_project: str, description: str | None = None,
                   config: dict[str, str] | None = None, volume_only: bool = False,
                   enforce_limits: bool = True) -> CustomVolume:
        """Create `pool/name` as a copy of `src_pool/src_name` (a volume, or a snapshot `vol/snap`),
        with the volume's snapshots unless `volume_only`, through the driver's fastest path within a
        pool and a tree copy (rsync for each snapshot in turn) between pools. (`enforce_limits`
        False: a move, which adds nothing to the project's disk usage.)"""
        project = self.effective(project)
        src_project = self.effective(src_project)
        _check_name(names.volume, name)
        p, sp = self._pool(pool), self._pool(src_pool)
        parent, _, snap = src_name.partition("/")
        src_rec = await self.get(src_pool, parent, src_project)
        src = src_rec.volume
        snaps: list[VolumeSnapshot] = []
        if snap:
            await self.get_snapshot(src_pool, parent, snap, src_project)
            src = src.snapshot(snap)
        elif not volume_only:
            snaps = await self.snapshots(src_pool, parent, src_project)
        ct = self._check_content_type(p, src_rec.content_type)
        cfg = dict(src_rec.config if config is None else config)
        cfg = {k: v for k, v in cfg.items() if not k.startswith("volatile.")}
        cfg = self.validate_config(p, cfg)
        desc = src_rec.description if description is None else description
        with making(self._projects(), project):  # not in a project being deleted
            async with self.lock(pool, name, project):
                if await self._find(pool, name, project) is not None:
                    raise Conflict(f"Storage volume {name!r} already exists on pool {pool!r}")
                if enforce_limits:
                    self._check_disk(p, name, project, cfg, "creation")
                final = Volume(pool, VolumeType.CUSTOM, name, project=project, content_type=ct, config=cfg)
                tmp = final.renamed(_tmp_name(name))
                async with Revert() as revert:
                    if p is sp:
                        await p.driver.create_volume_from_copy(tmp, src, snapshots=bool(snaps))
                        revert.add(self._drop, p, tmp)
                        # The driver copies every snapshot on disk; keep those with records only.
                        for s in await p.driver.list_snapshots(tmp):
                            if s not in {x.name for x in snaps}:
                                await p.driver.delete_snapshot(tmp.snapshot(s))
                        if cfg.get("size"):
                            await p.driver.set_volume_quota(tmp.with_config(cfg), parse_byte_size(cfg["size"]))
                    else:
                        revert.add(self._drop, p, tmp)
                        await self._copy_between_pools(sp, src, snaps, p, tmp.with_config(cfg))
                    copied = [VolumeSnapshot(0, 0, s.name, s.description, s.created_at, s.expires_at, dict(s.config))
                              for s in snaps]
                    vid = await self._insert(p, name, project, desc, ct.value, cfg, copied, enforce=enforce_limits)
                    revert.add(self._delete_row, vid)
                    await p.driver.rename_volume(tmp, name)
                    revert.success()
        return await self.get(pool, name, project)

    async def refresh(self, pool: str, name: str, *, src_pool: str, src_name: str, project: str,
                      src_project: str, volume_only: bool = False) -> CustomVolume:
        """`storage volume copy --refresh` onto the existing `pool/name`: its snapshots that the
        source lacks, or has under the same name but taken at another time, are removed; the
        source's snapshots it lacks are added (oldest first), then its content is synced to the
        source's. Only what differs is copied (rsync), within a pool or between pools."""
        project = self.effective(project)
        src_project = self.effective(src_project)
        p, sp = self._pool(pool), self._pool(src_pool)
        if "/" in src_name:
            raise BadRequest("A snapshot can't be the source of a refresh")
        src_rec = await self.get(src_pool, src_name, src_project)
        if (src_pool, src_name, src_project) == (pool, name, project):
            raise BadRequest("A volume can't be refreshed from itself")
        async with self.lock(pool, name, project):
            rec = await self.get(pool, name, project)
            if rec.content_type != src_rec.content_type:
                raise BadRequest(f"Can't refresh a {rec.content_type} volume from a {src_rec.content_type} one")
            theirs = [] if volume_only else await self.snapshots(src_pool, src_name, src_project)
            ours = await self.snapshots(pool, name, project)
            by_name = {s.name: s for s in theirs}
            stale = [s for s in ours if s.name not in by_name and not volume_only
                     or s.name in by_name and by_name[s.name].created_at != s.created_at]
            kept = {s.name for s in ours} - {s.name for s in stale}
            missing = [s for s in theirs if s.name not in kept]
            dst, src = rec.volume, src_rec.volume
            for s in stale:
                if await p.driver.has_volume(dst.snapshot(s.name)):
                    await p.driver.delete_snapshot(dst.snapshot(s.name))
                await self._delete_snapshot_row(s.id)
            dpath = await p.driver.mount_volume(dst)
            try:
                for s in missing:
                    ssrc = src.snapshot(s.name)
                    spath = await sp.driver.mount_volume(ssrc)
                    try:
                        await sync_tree(spath, dpath)
                    finally:
                        await sp.driver.unmount_volume(ssrc)
                    async with Revert() as revert:
                        await p.driver.create_snapshot(dst.snapshot(s.name))
                        revert.add(p.driver.delete_snapshot, dst.snapshot(s.name))
                        await self._insert_snapshot_rows(rec.id, [s])
                        revert.success()
                spath = await sp.driver.mount_volume(src)
                try:
                    await sync_tree(spath, dpath)
                finally:
                    await sp.driver.unmount_volume(src)
            finally:
                await p.driver.unmount_volume(dst)
        return await self.get(pool, name, project)

    async def _insert_snapshot_rows(self, vid: int, snapshots: list[VolumeSnapshot]) -> None:
        await self.db.run(lambda session: insert_snapshot_rows(session, vid, snapshots))

    async def _copy_between_pools(self, sp, src: Volume, snaps: list[VolumeSnapshot], p, dst: Volume) -> None:

        """Fill `dst` (new, on pool `p`) from `src` on pool `sp`: each snapshot in turn (oldest
        first: the tree synced to it, then snapshotted), then the volume itself."""
        sources = [src.snapshot(s.name) for s in snaps] + [src]
        first = True
        for i, s in enumerate(sources):
            spath = await sp.driver.mount_volume(s)
            try:
                if first:
                    async def fill(path: Path, spath=spath) -> None:
                        await copy_tree(spath, path, into=True)

                    await p.driver.create_volume(dst, filler=fill)
                    first = False
                else:
                    dpath = await p.driver.mount_volume(dst)
                    await sync_tree(spath, dpath)
            finally:
                await sp.driver.unmount_volume(s)
            if i < len(snaps):
                await p.driver.create_snapshot(dst.snapshot(snaps[i].name))
        await p.driver.unmount_volume(dst)

    async def _drop(self, pool, vol: Volume) -> None:
        """Remove a volume and its snapshots from the pool (not its records)."""
        drv = pool.driver
        for s in await drv.list_snapshots(vol):
            await drv.delete_snapshot(vol.snapshot(s))
        await drv.unmount_volume(vol)
        await drv.delete_volume(vol)

    async def update(self, pool: str, name: str, *, description: str, config: dict[str, str],
                     project: str) -> CustomVolume:
        """Replace the volume's config and description (a changed `size` goes to the driver)."""
        project = self.effective(project)
        p = self._pool(pool)
        async with self.lock(pool, name, project):
            rec = await self.get(pool, name, project)
            # The daemon's own keys stay unless the request names them (an edit round trip).
            config = {**{k: v for k, v in rec.config.items() if k.startswith("volatile.")}, **config}
            config = self.validate_config(p, dict(config))
            for key in ("security.shifted", "security.unmapped"):
                if config.get(key, "") != rec.config.get(key, "") and await self.used_by(pool, name, project):
                    raise BadRequest(f"{key} can't be changed while the storage volume is in use")
            # Checked and counted in one step; the old size counts again if the change fails.
            claim = self._claim_disk(p, name, project, config, "update")
            try:
                if config.get("size", "") != rec.config.get("size", ""):
                    n = parse_byte_size(config["size"]) if config.get("size") else None
                    await p.driver.set_volume_quota(rec.volume.with_config(config), n)
                await self._write_config(rec.id, config, description)
            except BaseException:
                self._unclaim_disk(p, name, project, claim)
                raise
        return await self.get(pool, name, project)

    async def _write_config(self, vid: int, config: dict[str, str], description: str | None = None) -> None:
        def upd(session):
            if description is None:
                session.execute(text("UPDATE storage_volumes SET config=:c WHERE id=:i"),
                                {"c": json.dumps(config), "i": vid})
            else:
                session.execute(text("UPDATE storage_volumes SET config=:c, description=:d WHERE id=:i"),
                                {"c": json.dumps(config), "d": description, "i": vid})

        await self.db.run(upd)

    async def set_config_keys(self, pool: str, name: str, values: dict[str, str | None],
                              project: str) -> None:
        """Record keys the daemon keeps on a volume (e.g. volatile.idmap.last); an empty or None
        value removes the key. No validation: for the daemon's own keys."""
        project = self.effective(project)
        async with self.lock(pool, name, project):
            rec = await self.get(pool, name, project)
            config = dict(rec.config)
            for k, v in values.items():
                if v is None or v == "":
                    config.pop(k, None)
                else:
                    config[k] = str(v)
            await self._write_config(rec.id, config)

    async def adopt(self, pool: str, name: str, *, project: str, description: str = "",
                    config: dict[str, str] | None = None, content_type: str = "filesystem",
                    snapshots: list[VolumeSnapshot] | None = None) -> CustomVolume:
        """Record a custom volume that is on the pool without a record (`lxd recover`, a backup
        import that made the volume itself): rows for it and for `snapshots` (default: the
        snapshots found on the pool, created now, never expiring)."""
        project = self.effective(project)
        _check_name(names.volume, name)
        p = self._pool(pool)
        ct = self._check_content_type(p, content_type)
        config = self.validate_config(p, dict(config or {}))
        vol = Volume(pool, VolumeType.CUSTOM, name, project=project, content_type=ct, config=config)
        async with self.lock(pool, name, project):
            if await self._find(pool, name, project) is not None:
                raise Conflict(f"Storage volume {name!r} already exists on pool {pool!r}")
            if not await p.driver.has_volume(vol):
                raise NotFound(f"Storage volume {name!r} not found on pool {pool!r}")
            if snapshots is None:
                now = rfc3339()
                snapshots = [VolumeSnapshot(0, 0, s, "", now, NEVER, dict(config))
                             for s in await p.driver.list_snapshots(vol) if not s.startswith(TMP_PREFIX)]
            await self._insert(p, name, project, description, ct.value, config, list(snapshots), enforce=False)
        return await self.get(pool, name, project)

    async def mount(self, pool: str, name: str, project: str) -> Path:
        """The host path of the mounted volume (mounting it where the driver needs to)."""
        project = self.effective(project)
        rec = await self.get(pool, name, project)
        return await self._pool(pool).driver.mount_volume(rec.volume)

    async def unmount(self, pool: str, name: str, project: str) -> None:
        project = self.effective(project)
        rec = await self.get(pool, name, project)
        await self._pool(pool).driver.unmount_volume(rec.volume)

    async def usage(self, pool: str, name: str, project: str) -> dict:
        project = self.effective(project)
        rec = await self.get(pool, name, project)
        used = await self._pool(pool).driver.volume_usage(rec.volume)
        total = parse_byte_size(rec.config["size"]) if rec.config.get("size") else -1
        return {"used": used or 0, "total": total}

    async def rename(self, pool: str, name: str, new_name: str, project: str) -> None:
        project = self.effective(project)
        _check_name(names.volume, new_name)
        p = self._pool(pool)
        async with self.lock(pool, name, project), self.lock(pool, new_name, project):
            rec = await self.get(pool, name, project)
            if new_name == name:
                return
            await self._refuse_in_use(pool, name, project)
            if await self._find(pool, new_name, project) is not None:
                raise Conflict(f"Storage volume {new_name!r} already exists on pool {pool!r}")
            # The record first, noting the old name: a crash before the volume is renamed is
            # finished by the start-up sweep; then the volume; then the note goes.
            def upd(session, n: str, cfg: dict):
                session.execute(text("UPDATE storage_volumes SET name=:n, config=:c WHERE id=:i"),
                                {"n": n, "c": json.dumps(cfg), "i": rec.id})

            await self.db.run(upd, new_name, {**rec.config, RENAMING_KEY: name})
            try:
                await p.driver.rename_volume(rec.volume, new_name)
            except BaseException:
                await self.db.run(upd, name, rec.config)
                raise
            await self._write_config(rec.id, rec.config)
            pp = self._projects()
            if pp is not None:
                pp.set_volume(project, p.id, name, None)
                pp.set_volume(project, p.id, new_name, rec.config, rec.id)

    async def move(self, pool: str, name: str, new_pool: str, new_name: str | None,
                   project: str, new_project: str | None = None) -> None:
        """Move a volume (with its snapshots) to another pool, also of another driver, or to
        another project (`lxc storage volume move --target-project`): copy, then delete the
        source. Into another project the target's limits apply."""
        project = self.effective(project)
        target = self.effective(new_project) if new_project else project
        new_name = new_name or name
        if new_pool == pool and target == project:
            await self.rename(pool, name, new_name, project)
            return
        self._pool(new_pool)
        await self.get(pool, name, project)
        await self._refuse_in_use(pool, name, project)
        await self.copy(new_pool, new_name, src_pool=pool, src_name=name, project=target, src_project=project,
                        enforce_limits=target != project)
        await self.delete(pool, name, project)

    async def delete(self, pool: str, name: str, project: str) -> None:
        project = self.effective(project)
        p = self._pool(pool)
        async with self.lock(pool, name, project):
            rec = await self.get(pool, name, project)
            await self._refuse_in_use(pool, name, project)
            vol = rec.volume
            if not await p.driver.has_volume(vol):
                # A record whose volume is gone (found so by the start-up sweep): only the record goes.
                await self._delete_row(rec.id)
                return
            trash = vol.renamed(_tmp_name(name))
            await p.driver.unmount_volume(vol)
            await p.driver.rename_volume(vol, trash.name)
            try:
                await self._delete_row(rec.id)
            except BaseException:
                await p.driver.rename_volume(trash, name)
                raise
            await self._drop(p, trash)

    # -- snapshots ---------------------------------------------------------------------------
    async def snapshots(self, pool: str, name: str, project: str) -> list[VolumeSnapshot]:
        project = self.effective(project)
        rec = await self.get(pool, name, project)

        def q(session):
            return session.execute(
                text("SELECT id, volume_id, name, description, created_at, expires_at, config "
                     "FROM storage_volumes_snapshots WHERE volume_id=:v ORDER BY created_at, id"),
                {"v": rec.id}).all()

        return [_row_snapshot(r) for r in await self.db.run(q)]

    async def get_snapshot(self, pool: str, name: str, snap: str, project: str) -> VolumeSnapshot:
        project = self.effective(project)
        for s in await self.snapshots(pool, name, project):
            if s.name == snap:
                return s
        raise NotFound("Storage volume snapshot not found")

    async def create_snapshot(self, pool: str, name: str, snap: str | None = None, *,
                              project: str, expires_at: str | None = None,
                              description: str = "", now: datetime | None = None) -> VolumeSnapshot:
        """Snapshot a volume. Without `snap`, the name comes from `snapshots.pattern`; without
        `expires_at`, the expiry from `snapshots.expiry` ("" for never)."""
        project = self.effective(project)
        p = self._pool(pool)
        pp = self._projects()
        if pp is not None:  # restricted.snapshots (manual and scheduled snapshots alike)
            from lxd_daemon.projects import policy as project_policy

            project_policy.snapshot_allowed(project, pp.config(project))
        async with self.lock(pool, name, project):
            rec = await self.get(pool, name, project)
            existing = {s.name for s in await self.snapshots(pool, name, project)}
            now = now or datetime.now(UTC)
            if not snap:
                snap = schedule.render_pattern(rec.config.get("snapshots.pattern", ""), existing, now)
            _check_name(names.snapshot, snap)
            if snap in existing:
                raise Conflict(f"Snapshot {snap!r} already exists")
            if expires_at is None:
                spec = rec.config.get("snapshots.expiry", "")
                when = schedule.expiry_at(spec, now) if spec else None
                expires_at = rfc3339(when.timestamp()) if when else NEVER
            elif expires_at:
                try:
                    ts = parse_rfc3339(expires_at)
                except ValueError:
                    raise BadRequest(f"Invalid expires_at {expires_at!r}") from None
                expires_at = NEVER if ts <= -62135596800 + 1 else rfc3339(ts)  # Go's zero time: never
            vol = rec.volume
            tmp = vol.snapshot(_tmp_name(snap))
            async with Revert() as revert:
                await p.driver.create_snapshot(tmp)
                revert.add(p.driver.delete_snapshot, tmp)
                created = rfc3339()

                def ins(session):
                    return session.execute(
                        text("INSERT INTO storage_volumes_snapshots (volume_id, name, description, created_at, "
                             "expires_at, config) VALUES (:v, :n, :d, :c, :e, :cfg) RETURNING id"),
                        {"v": rec.id, "n": snap, "d": description, "c": created, "e": expires_at,
                         "cfg": json.dumps(rec.config)}).scalar_one()

                try:
                    sid = await self.db.run(ins)
                except IntegrityError:
                    raise Conflict(f"Snapshot {snap!r} already exists") from None
                revert.add(self._delete_snapshot_row, sid)
                await p.driver.rename_snapshot(tmp, snap)
                revert.success()
            return VolumeSnapshot(sid, rec.id, snap, description, created, expires_at, dict(rec.config))

    async def _delete_snapshot_row(self, sid: int) -> None:
        def rm(session):
            session.execute(text("DELETE FROM storage_volumes_snapshots WHERE id=:i"), {"i": sid})

        await self.db.run(rm)

    async def update_snapshot(self, pool: str, name: str, snap: str, *, description: str, expires_at: str,
                              project: str) -> None:
        project = self.effective(project)
        s = await self.get_snapshot(pool, name, snap, project)
        if expires_at:
            try:
                ts = parse_rfc3339(expires_at)
            except ValueError:
                raise BadRequest(f"Invalid expires_at {expires_at!r}") from None
            expires_at = NEVER if ts <= -62135596800 + 1 else rfc3339(ts)

        def upd(session):
            session.execute(text("UPDATE storage_volumes_snapshots SET description=:d, expires_at=:e WHERE id=:i"),
                            {"d": description, "e": expires_at, "i": s.id})

        await self.db.run(upd)

    async def rename_snapshot(self, pool: str, name: str, snap: str, new_snap: str,
                              project: str) -> None:
        project = self.effective(project)
        _check_name(names.snapshot, new_snap)
        p = self._pool(pool)
        async with self.lock(pool, name, project):
            rec = await self.get(pool, name, project)
            s = await self.get_snapshot(pool, name, snap, project)
            if new_snap == snap:
                return
            if any(x.name == new_snap for x in await self.snapshots(pool, name, project)):
                raise Conflict(f"Snapshot {new_snap!r} already exists")
            await p.driver.rename_snapshot(rec.volume.snapshot(snap), new_snap)

            def upd(session):
                session.execute(text("UPDATE storage_volumes_snapshots SET name=:n WHERE id=:i"),
                                {"n": new_snap, "i": s.id})

            try:
                await self.db.run(upd)
            except BaseException:
                await p.driver.rename_snapshot(rec.volume.snapshot(new_snap), snap)
                raise

    async def delete_snapshot(self, pool: str, name: str, snap: str, project: str) -> None:
        project = self.effective(project)
        p = self._pool(pool)
        async with self.lock(pool, name, project):
            rec = await self.get(pool, name, project)
            s = await self.get_snapshot(pool, name, snap, project)
            vol = rec.volume.snapshot(snap)
            trash_name = _tmp_name(snap)
            await p.driver.rename_snapshot(vol, trash_name)
            try:
                await self._delete_snapshot_row(s.id)
            except BaseException:
                await p.driver.rename_snapshot(rec.volume.snapshot(trash_name), snap)
                raise
            await p.driver.delete_snapshot(rec.volume.snapshot(trash_name))

    async def restore(self, pool: str, name: str, snap: str, project: str) -> None:
        """Make the volume hold what snapshot `snap` holds (refused while a running instance uses it)."""
        project = self.effective(project)
        p = self._pool(pool)
        async with self.lock(pool, name, project):
            rec = await self.get(pool, name, project)
            try:
                await self.get_snapshot(pool, name, snap, project)
            except NotFound:
                raise NotFound(f"Storage volume snapshot {snap!r} of volume {name!r} not found") from None
            running = self._running_users(await self.used_by(pool, name, project))
            if running:
                raise BadRequest(f"The storage volume is in use by running instances: {', '.join(running)}")
            await p.driver.restore_snapshot(rec.volume.snapshot(snap))

    def _running_users(self, urls: list[str]) -> list[str]:
        instances = self.storage.services.instances
        runtime = instances.runtime if instances is not None else {}
        out = []
        for u in urls:
            if u.startswith("/1.0/instances/"):
                path, _, q = u.partition("?")
                n = path.rsplit("/", 1)[1]
                project = q.removeprefix("project=") if q.startswith("project=") else DEFAULT
                if storage_name(project, n) in runtime:
                    out.append(n)
        return out

    # -- start-up sweep and the snapshot scheduler -------------------------------------------
    async def load(self) -> None:
        """Finish or undo what a crash interrupted (see the module's doc)."""
        for p in list(self.storage.pools.values()):
            try:
                await self._sweep_pool(p)
            except Exception as e:
                log.warning("couldn't check the pool's custom volumes", extra={"pool": p.name, "err": str(e)})

    async def _sweep_pool(self, p) -> None:
        vols = [v for v in await p.driver.list_volumes() if v.type is VolumeType.CUSTOM]
        rows = await self.list(p.name, None)
        have = {(r.project, r.name): r for r in rows}
        on_disk = {(v.project, v.name) for v in vols if not v.is_snapshot}
        for v in vols:
            if v.is_snapshot:
                continue
            m = _TMP.match(v.name)
            if not m:
                continue
            target = m.group(1)
            if (v.project, target) in have and (v.project, target) not in on_disk:
                log.warning("finishing an interrupted volume change", extra={"pool": p.name, "volume": target})
                await p.driver.rename_volume(v, target)
                on_disk.add((v.project, target))
            else:
                log.warning("removing a leftover volume", extra={"pool": p.name, "volume": v.name})
                await self._drop(p, v)
        for r in rows:
            src = r.config.get(RENAMING_KEY)
            if src is not None:
                if (r.project, r.name) not in on_disk and (r.project, src) in on_disk:
                    log.warning("finishing an interrupted volume rename", extra={"pool": p.name, "volume": r.name})
                    await p.driver.rename_volume(Volume(p.name, VolumeType.CUSTOM, src, project=r.project), r.name)
                    on_disk.add((r.project, r.name))
                r.config.pop(RENAMING_KEY)
                await self._write_config(r.id, r.config)
            if (r.project, r.name) not in on_disk:
                log.warning("a custom volume's record has no volume", extra={"pool": p.name, "volume": r.name})
                continue
            vol = r.volume
            snaps = {s.name for s in await self.snapshots(p.name, r.name, r.project)}
            disk_snaps = await p.driver.list_snapshots(vol)
            for s in disk_snaps:
                m = _TMP.match(s)
                if not m:
                    continue
                if m.group(1) in snaps and m.group(1) not in disk_snaps:
                    await p.driver.rename_snapshot(vol.snapshot(s), m.group(1))
                else:
                    await p.driver.delete_snapshot(vol.snapshot(s))

    def start_scheduler(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._scheduler(), name="volume-snapshots")

    async def startup(self) -> None:
        """Startup hook: `@startup` schedules fire, then the minute scheduler runs."""
        await self.run_schedules(startup=True)
        self.start_scheduler()

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _scheduler(self) -> None:
        while True:
            now = datetime.now(UTC)
            await asyncio.sleep(self.SCHEDULE_INTERVAL - now.second - now.microsecond / 1e6 + 0.5)
            try:
                await self.run_schedules()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("custom volume snapshot scheduling failed")

    async def run_schedules(self, *, startup: bool = False, now: datetime | None = None) -> dict:
        """Take the snapshots due this minute (or the `@startup` ones) and delete the expired
        ones, on every pool; returns their URLs ({"created": [...], "deleted": [...]})."""
        now = now or datetime.now(UTC)
        done: dict[str, list[str]] = {"created": [], "deleted": []}
        for pname in list(self.storage.pools):
            try:
                vols = await self.list(pname, None)
            except NotFound:
                continue
            for v in vols:
                base = f"/1.0/storage-pools/{pname}/volumes/custom/{v.name}/snapshots/"
                spec = v.config.get("snapshots.schedule", "")
                try:
                    fire = bool(spec) and (schedule.has_startup(spec) if startup else schedule.due(spec, now, v.id))
                    if fire:
                        try:
                            s = await self.create_snapshot(pname, v.name, project=v.project, now=now)
                            done["created"].append(base + s.name)
                        except BadRequest as e:  # e.g. the project's restricted.snapshots
                            log.warning("scheduled snapshot of a custom volume refused",
                                        extra={"pool": pname, "volume": v.name, "err": e.message})
                    for s in await self.snapshots(pname, v.name, v.project):
                        if s.expires_at and parse_rfc3339(s.expires_at) <= now.timestamp():
                            await self.delete_snapshot(pname, v.name, s.name, v.project)
                            done["deleted"].append(base + s.name)
                except NotFound:
                    continue
                except Exception:
                    log.exception("scheduled snapshot of a custom volume failed",
                                  extra={"pool": pname, "volume": v.name})
        return done
