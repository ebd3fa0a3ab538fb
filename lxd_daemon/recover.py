"""`lxd recover`: bring back instances, their snapshots and custom volumes that are on storage
pools but whose database records were lost (LXD's `/internal/recover/validate` and
`/internal/recover/import`).

A scan takes the pools the client names: pools that have a record (only the name is sent) and
pools whose record is gone too (name, driver and config, `source` at least). An unknown pool is
reached through a driver of its own, not recorded (mounted if needed, and unmounted again unless
its record is made). On each pool it lists the volumes the driver finds:

- instance volumes no record names, with a backup.yaml naming that instance (the file every
  instance volume carries, see lxd_daemon/backups/config.py); the snapshots are those on disk,
  described by backup.yaml's `snapshots` where it has them;
- custom volumes no record names, with their snapshots (default config, as LXD: what the
  driver sees).

The validation answers what was found (`UnknownVolumes`) and what must exist first
(`DependencyErrors`: projects, profiles, networks the instances use), with LXD's field names.
The import re-checks everything, then makes the records: the pool's first (from the pool in an
instance's backup.yaml, else from what the client gave), then custom volumes, then instances with
their snapshots. A failure undoes every record made (the volumes are never touched).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import text

from lxd_daemon.backups.config import (
    BACKUP_YAML,
    BackupConfig,
    parse_backup_yaml,
    update_instance_backup_yaml,
)
from lxd_daemon.errors import BadRequest, LXDError
from lxd_daemon.instances.models import Record
from lxd_daemon.projects.naming import storage_name
from lxd_daemon.storage.drivers import DRIVERS, Driver
from lxd_daemon.storage.volume import Volume, VolumeType
from lxd_daemon.util.revert import Revert
from lxd_daemon.util.timefmt import EPOCH_TIME, rfc3339

log = logging.getLogger("lxd.recover")


@dataclass
class FoundInstance:
    volume: Volume
    config: BackupConfig
    snapshots: list[str]  # on disk, oldest first

    @property
    def instance(self) -> dict:
        return self.config.instance or {}


@dataclass
class FoundCustom:
    volume: Volume
    snapshots: list[str]


@dataclass
class PoolScan:
    name: str
    driver: Driver
    description: str = ""
    known: bool = True  # the pool has a record
    mounted_by_us: bool = False
    made_dir: bool = False  # the scan made the pool's mount point (removed again if not recorded)
    instances: list[FoundInstance] = field(default_factory=list)
    customs: list[FoundCustom] = field(default_factory=list)


class RecoverService:
    def __init__(self, services):
        self.services = services
        self._lock = asyncio.Lock()

    # -- the API ---------------------------------------------------------------------------
    async def validate(self, pools: list[dict]) -> dict:
        async with self._lock:
            scans = await self._scan(pools)
            try:
                return self._result(scans, await self._dependency_errors(scans))
            finally:
                await self._unmount_unknown(scans)

    async def import_(self, pools: list[dict]) -> dict:
        async with self._lock:
            scans = await self._scan(pools)
            try:
                errors = await self._dependency_errors(scans)
                if errors:
                    raise BadRequest("Missing dependencies (create them, then recover again): "
                                     + "; ".join(errors))
                await self._import(scans)
                return self._result(scans, [])
            finally:
                await self._unmount_unknown(scans)

    @staticmethod
    def _result(scans: list[PoolScan], errors: list[str]) -> dict:
        vols = []
        for s in scans:
            for fi in s.instances:
                vols.append({"name": fi.volume.name, "type": fi.instance.get("type") or "container",
                             "snapshotCount": len(fi.snapshots), "project": fi.volume.project, "pool": s.name})
            for fc in s.customs:
                vols.append({"name": fc.volume.name, "type": "volume", "snapshotCount": len(fc.snapshots),
                             "project": fc.volume.project, "pool": s.name})
        return {"UnknownVolumes": vols, "DependencyErrors": errors}

    # -- scanning ----------------------------------------------------------------------------
    def _check_request(self, pools) -> list[dict]:
        if not isinstance(pools, list):
            raise BadRequest("Invalid request: 'pools' must be a list")
        seen = set()
        out = []
        for p in pools:
            if not isinstance(p, dict) or not isinstance(p.get("name"), str) or not p["name"]:
                raise BadRequest("Invalid request: each pool needs a name")
            if p["name"] in seen:
                raise BadRequest(f"Storage pool {p['name']!r} is listed twice")
            seen.add(p["name"])
            cfg = p.get("config") or {}
            if not isinstance(cfg, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in cfg.items()):
                raise BadRequest(f"Invalid config for storage pool {p['name']!r}: a map of strings is expected")
            out.append({"name": p["name"], "driver": p.get("driver") or "", "config": dict(cfg),
                        "description": p.get("description") or ""})
        return out

    def _unknown_pool_driver(self, p: dict) -> Driver:
        storage = self.services.storage
        name, driver = p["name"], p["driver"]
        if not driver:
            raise BadRequest(f"Storage pool {name!r} has no record: its driver is needed to recover it")
        storage.check_name_and_driver(name, driver)
        if not p["config"].get("source"):
            raise BadRequest(f"Storage pool {name!r} has no record: its source is needed to recover it")
        config = storage._validate_config(driver, dict(p["config"]))
        mount_path = storage.root / name
        source = config["source"]
        for other in storage.pools.values():
            if other.config.get("source") and os.path.realpath(other.config["source"]) == os.path.realpath(source):
                raise BadRequest(f"The source {source!r} is the storage pool {other.name!r} already")
        # A dir pool whose link under storage-pools/ went with its record is read where it lives.
        if DRIVERS[driver].info.name == "dir" and os.path.isdir(source) and not (mount_path.is_dir()):
            mount_path = Path(source)
        return DRIVERS[driver](name, mount_path, config)

    async def _scan(self, pools) -> list[PoolScan]:
        storage = self.services.storage
        if storage is None:
            raise BadRequest("Storage is not available on this server")
        scans: list[PoolScan] = []
        try:
            for p in self._check_request(pools):
                existing = storage.pools.get(p["name"])
                if existing is not None:
                    scan = PoolScan(p["name"], existing.driver, existing.description)
                else:
                    drv = self._unknown_pool_driver(p)
                    scan = PoolScan(p["name"], drv, p["description"], known=False)
                    scan.made_dir = not await asyncio.to_thread(os.path.lexists, drv.mount_path)
                    scans.append(scan)
                    try:
                        scan.mounted_by_us = await drv.mount_pool()
                    except LXDError as e:
                        raise BadRequest(f"Failed mounting pool {p['name']!r}: {e.message}") from None
                    except OSError as e:
                        raise BadRequest(f"Failed mounting pool {p['name']!r}: {e}") from None
                    if not await asyncio.to_thread(lambda d=drv: (d.mount_path / "containers").is_dir()
                                                   or (d.mount_path / "custom").is_dir()):
                        raise BadRequest(f"Storage pool {p['name']!r}: no LXD storage pool found at "
                                         f"{drv.config.get('source')!r}")
                if existing is not None:
                    scans.append(scan)
                await self._scan_pool(scan)
        except BaseException:
            await self._unmount_unknown(scans)
            raise
        return scans

    async def _known_customs(self, scan: PoolScan) -> set[tuple[str, str]]:
        if not scan.known:
            return set()
        pool_id = self.services.storage.pools[scan.name].id

        def q(session):
            return session.execute(text("SELECT project, name FROM storage_volumes WHERE pool_id=:p AND type='custom'"),
                                   {"p": pool_id}).all()

        return {(r.project, r.name) for r in await self.db_run(q)}

    async def db_run(self, fn):
        return await self.services.db.run(fn)

    async def _scan_pool(self, scan: PoolScan) -> None:
        drv = scan.driver
        instances = self.services.instances
        try:
            vols = await drv.list_volumes()
        except LXDError as e:
            raise BadRequest(f"Failed checking volumes on pool {scan.name!r}: {e.message}") from None
        known_customs = await self._known_customs(scan)
        for v in vols:
            if v.is_snapshot or v.name.startswith("."):
                continue
            if v.type is VolumeType.CONTAINER:
                key = storage_name(v.project, v.name)
                if key in instances.records or key in instances._reserved:
                    continue
                cfg = await self._read_backup_yaml(drv, v)
                if cfg is None:
                    continue
                snaps = await drv.list_snapshots(v)
                scan.instances.append(FoundInstance(v, cfg, snaps))
            elif v.type is VolumeType.CUSTOM:
                if (v.project, v.name) in known_customs:
                    continue
                scan.customs.append(FoundCustom(v, await drv.list_snapshots(v)))

    async def _read_backup_yaml(self, drv: Driver, v: Volume) -> BackupConfig | None:
        try:
            path = await drv.mount_volume(v)
        except LXDError as e:
            log.warning("couldn't mount an instance volume", extra={"volume": v.name, "err": e.message})
            return None
        try:
            raw = await asyncio.to_thread(_read_small, path / BACKUP_YAML)
        finally:
            try:
                await drv.unmount_volume(v)
            except LXDError:
                pass
        if raw is None:
            log.warning("an instance volume without backup.yaml can't be recovered",
                        extra={"pool": drv.pool_name, "volume": v.name})
            return None
        try:
            cfg = parse_backup_yaml(raw)
        except ValueError as e:
            log.warning("an instance volume's backup.yaml is invalid",
                        extra={"pool": drv.pool_name, "volume": v.name, "err": str(e)})
            return None
        if cfg.instance is None or cfg.instance.get("name") != v.name:
            log.warning("an instance volume's backup.yaml names another instance",
                        extra={"pool": drv.pool_name, "volume": v.name})
            return None
        return cfg

    async def _dependency_errors(self, scans: list[PoolScan]) -> list[str]:
        errors: list[str] = []

        def add(msg: str) -> None:
            if msg not in errors:
                errors.append(msg)

        projects = self.services.projects
        networks: dict[str, set[str]] = {}  # project -> the networks it sees
        for s in scans:
            for item in [*s.instances, *s.customs]:
                project = item.volume.project
                if project not in projects.projects:
                    add(f'Project "{project}"')
                    continue
                if not isinstance(item, FoundInstance):
                    continue
                profiles = self.services.profiles.in_project(project)
                for pname in item.instance.get("profiles") or []:
                    if pname not in profiles:
                        add(f'Profile "{pname}" in project "{project}"')
                devices = item.instance.get("expanded_devices") or item.instance.get("devices") or {}
                for dev in devices.values():
                    if dev.get("type") == "nic" and dev.get("network"):
                        if project not in networks:
                            networks[project] = set(await self.services.networks.names(project)) \
                                if self.services.networks is not None else set()
                        if dev["network"] not in networks[project]:
                            add(f'Network "{dev["network"]}" in project "{project}"')
        return errors

    async def _unmount_unknown(self, scans: list[PoolScan]) -> None:
        """Leave the pools that were not recorded as the scan found them."""
        from lxd_daemon.storage.drivers.blockutil import remove_empty_dir

        storage = self.services.storage
        for s in scans:
            if s.name in storage.pools:
                continue
            if s.mounted_by_us:
                try:
                    await s.driver.unmount_pool()
                except Exception as e:
                    log.warning("couldn't unmount a scanned pool", extra={"pool": s.name, "err": str(e)})
                s.mounted_by_us = False
            if s.made_dir:
                await asyncio.to_thread(remove_empty_dir, s.driver.mount_path)

    # -- importing ---------------------------------------------------------------------------
    async def _import(self, scans: list[PoolScan]) -> None:
        instances = self.services.instances
        storage = self.services.storage
        reserved: list[str] = []
        adopted: list[str] = []
        try:
            async with Revert() as revert:
                for s in scans:
                    if not s.instances and not s.customs:
                        continue  # as LXD: no record for a pool with nothing to recover
                    pool = storage.pools.get(s.name)
                    if pool is None:
                        pool, link = await self._adopt_pool(s)
                        adopted.append(s.name)
                        revert.add(storage.forget, s.name)
                        if link is not None:
                            revert.add(asyncio.to_thread, link.unlink, True)
                    for fc in s.customs:
                        await self._import_custom(pool, fc, revert)
                    for fi in s.instances:
                        key = storage_name(fi.volume.project, fi.volume.name)
                        instances.reserve(key)
                        reserved.append(key)
                        await self._import_instance(pool, fi)
                        revert.add(self._forget_instance, key)
                revert.success()
        finally:
            for n in reserved:
                instances.release(n)
        for s in scans:
            for fi in s.instances:
                await self._after_instance(fi)
        if adopted:
            log.info("recovered storage pools", extra={"pools": adopted})

    async def _adopt_pool(self, scan: PoolScan):
        """The pool's record: from the pool an instance's backup.yaml describes (it has every key
        the pool was made with), else from what the client gave."""
        storage = self.services.storage
        drv, description = scan.driver, scan.description
        for fi in scan.instances:
            bp = fi.config.pool or {}
            if bp.get("driver") == drv.info.name and isinstance(bp.get("config"), dict):
                cfg = {str(k): str(v) for k, v in bp["config"].items() if not str(k).startswith("volatile.")}
                cfg["source"] = drv.config.get("source", cfg.get("source", ""))
                try:
                    cfg = storage._validate_config(drv.info.name, cfg)
                except LXDError as e:
                    log.warning("the pool in backup.yaml is not valid here: using the given config",
                                extra={"pool": scan.name, "err": e.message})
                    break
                drv.config = cfg
                description = str(bp.get("description") or description)
                break
        mount_path = storage.root / scan.name
        if drv.mount_path != mount_path:
            # A dir pool read where it lives: the link under storage-pools/ comes back.
            def link() -> None:
                mount_path.parent.mkdir(parents=True, exist_ok=True)
                if mount_path.is_symlink() and not mount_path.exists():
                    mount_path.unlink()  # a link to where the pool was before
                mount_path.symlink_to(drv.mount_path)

            await asyncio.to_thread(link)
            drv = DRIVERS[drv.info.name](scan.name, mount_path, drv.config)
            scan.driver = drv
            made_link: Path | None = mount_path
        else:
            made_link = None
        try:
            return await storage.adopt(scan.name, drv, description), made_link
        except BaseException:
            if made_link is not None:
                made_link.unlink(missing_ok=True)
            raise

    async def _import_custom(self, pool, fc: FoundCustom, revert: Revert) -> None:
        v = fc.volume
        now = rfc3339()

        def ins(session):
            vid = session.execute(text(
                "INSERT INTO storage_volumes (pool_id, project, type, name, description, content_type, created_at, "
                "config) VALUES (:p, :pr, 'custom', :n, '', :ct, :c, '{}') RETURNING id"),
                {"p": pool.id, "pr": v.project, "n": v.name, "ct": v.content_type.value, "c": now}).scalar_one()
            for snap in fc.snapshots:
                session.execute(text(
                    "INSERT INTO storage_volumes_snapshots (volume_id, name, description, created_at, expires_at, "
                    "config) VALUES (:v, :n, '', :c, '', '{}')"), {"v": vid, "n": snap, "c": now})
            return vid

        vid = await self.db_run(ins)

        async def undo() -> None:
            await self.db_run(lambda s: s.execute(text("DELETE FROM storage_volumes WHERE id=:i"), {"i": vid}))

        revert.add(undo)

    async def _import_instance(self, pool, fi: FoundInstance) -> None:
        inst = fi.instance
        name, project = fi.volume.name, fi.volume.project
        devices = {k: dict(v) for k, v in (inst.get("devices") or {}).items()}
        profiles = [p for p in (inst.get("profiles") or [])]
        self._populate_root_device(pool.name, devices, profiles, project)
        config = {k: v for k, v in (inst.get("config") or {}).items() if v != ""}
        rec = Record(0, name, str(inst.get("architecture") or _host_arch()), bool(inst.get("ephemeral")),
                     False, str(inst.get("description") or ""), _time(inst.get("created_at")) or rfc3339(),
                     _time(inst.get("last_used_at")), config, devices, profiles,
                     str(inst.get("type") or "container"), project)
        by_name = {s.get("name"): s for s in fi.config.snapshots}
        rows = []
        for snap in fi.snapshots:
            s = by_name.get(snap)
            if s is None:  # on disk but not in backup.yaml: described by the instance itself
                rows.append({"n": snap, "d": "", "c": rec.created_at, "x": "", "a": rec.architecture,
                             "e": rec.ephemeral, "cfg": dict(rec.config), "dev": rec.devices, "pr": rec.profiles})
                continue
            rows.append({"n": snap, "d": str(s.get("description") or ""),
                         "c": _time(s.get("created_at")) or rec.created_at, "x": _time(s.get("expires_at")),
                         "a": str(s.get("architecture") or rec.architecture), "e": bool(s.get("ephemeral")),
                         "cfg": {k: str(v) for k, v in (s.get("config") or {}).items()},
                         "dev": s.get("devices") or {}, "pr": list(s.get("profiles") or [])})
        snaps_svc = self.services.snapshots
        made: list = []
        if snaps_svc is not None:
            from lxd_daemon.instances.snapshots import Snapshot

            objs = [Snapshot(0, 0, r["n"], r["c"], r["x"], r["d"], False, r["a"], r["e"], r["cfg"], r["dev"],
                             r["pr"]) for r in rows]

            def snapshots_sql(session, iid: int) -> None:
                made.extend(snaps_svc.insert_rows_sql(session, iid, objs))
        else:
            def snapshots_sql(session, iid: int) -> None:
                for r in rows:
                    session.execute(text(
                        "INSERT INTO instances_snapshots (instance_id, name, description, created_at, expires_at, "
                        "stateful, architecture, ephemeral, config, devices, profiles) VALUES "
                        "(:i, :n, :d, :c, :x, 0, :a, :e, :cfg, :dev, :pr)"),
                        {"i": iid, **r, "cfg": json.dumps(r["cfg"]), "dev": json.dumps(r["dev"]),
                         "pr": json.dumps(r["pr"])})

        await self.services.instances.adopt_record(rec, pool, snapshots_sql)
        if made:
            snaps_svc.adopt(made)

    async def _forget_instance(self, name: str) -> None:
        rec = self.services.instances.records.get(name)
        snaps_svc = self.services.snapshots
        if rec is not None and snaps_svc is not None:
            snaps_svc.forget(rec.id)
        await self.services.instances.forget_record(name)

    def _populate_root_device(self, pool_name: str, devices: dict, profiles: list[str], project: str) -> None:
        """As LXD: the recovered instance's root disk is on the pool it was found on; a root disk
        from its profiles elsewhere is overridden by a local one."""
        for dev in devices.values():
            if dev.get("type") == "disk" and dev.get("path") == "/" and not dev.get("source"):
                dev["pool"] = pool_name
                return
        profs = self.services.profiles.in_project(project)
        for p in reversed(profiles):
            prof = profs.get(p)
            if prof is None:
                continue
            for dev in prof.devices.values():
                if dev.get("type") == "disk" and dev.get("path") == "/" and not dev.get("source"):
                    if dev.get("pool") == pool_name:
                        return
                    break
            else:
                continue
            break
        key = "root"
        i = 0
        while key in devices:
            key = f"root{i}"
            i += 1
        devices[key] = {"type": "disk", "path": "/", "pool": pool_name}

    async def _after_instance(self, fi: FoundInstance) -> None:
        """backup.yaml is rewritten from the recovered record; the creation is announced."""
        key = storage_name(fi.volume.project, fi.volume.name)
        await update_instance_backup_yaml(self.services, key)
        self.services.instances.lifecycle("instance-created", key)


def _read_small(path: Path, limit: int = 4 << 20) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read(limit)
    except FileNotFoundError:
        return None
    except OSError as e:
        log.warning("couldn't read backup.yaml", extra={"path": str(path), "err": str(e)})
        return None


def _time(value) -> str:
    """A time from backup.yaml as records keep it ("" for never; YAML may have parsed it)."""
    if value is None or value == "":
        return ""
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        if value.year <= 1970:
            return ""
        return rfc3339(value.timestamp())
    s = str(value)
    return "" if s.startswith(("0001-01-01", EPOCH_TIME[:10])) else s


def _host_arch() -> str:
    from lxd_daemon.instances.service import host_architecture

    return host_architecture()
