"""Storage pools: records in the store, a driver per pool, pools mounted at $LXD_DIR/storage-pools/<name>."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from dataclasses import dataclass, field

from sqlalchemy import text

from lxd_daemon.errors import BadRequest, Conflict, NotFound
from lxd_daemon.storage.custom import CustomVolumeService
from lxd_daemon.storage.drivers import DRIVERS, Driver
from lxd_daemon.storage.volumes import VolumeService
from lxd_daemon.util.revert import Revert
from lxd_daemon.warnings import STORAGE_POOL_UNAVAILABLE, forget_warnings, raise_warning, resolve_warning

log = logging.getLogger("lxd.storage")
POOL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
# Keys every driver's pools take; each driver adds its own (Driver.pool_keys).
POOL_KEYS = {"source", "size", "rsync.bwlimit", "rsync.compression", "volume.size", "volume.block.filesystem"}


@dataclass
class Pool:
    id: int
    name: str
    driver_name: str
    description: str
    config: dict[str, str]
    driver: Driver = field(repr=False)


class StorageService:
    def __init__(self, services):
        self.services = services
        self.db = services.db
        self.root = services.lxd_dir / "storage-pools"
        self.pools: dict[str, Pool] = {}
        self.used_by_providers = []  # async callables(pool_name) -> list[str]
        self._lock = asyncio.Lock()
        self.volumes = VolumeService(self)
        self.custom = CustomVolumeService(self)  # custom volumes and their snapshots
        self.usage_check = None  # usage_check.PoolUsageChecker (set by the subsystem)
        # name -> (usable here, version or why not), asked once at start-up.
        self.drivers_available: dict[str, tuple[bool, str]] = {}

    async def load(self) -> None:
        def q(session):
            return session.execute(text("SELECT id, name, driver, description, config FROM storage_pools")).all()

        for row in await self.db.run(q):
            cfg = json.loads(row.config)
            self.pools[row.name] = Pool(row.id, row.name, row.driver, row.description, cfg,
                                        self._driver(row.name, row.driver, cfg))

        def probe() -> dict[str, tuple[bool, str]]:
            out = {}
            for dname, cls in DRIVERS.items():
                try:
                    out[dname] = cls.available()
                except Exception as e:  # a broken tool must not stop the daemon
                    out[dname] = (False, str(e))
            return out

        self.drivers_available = await asyncio.to_thread(probe)
        for pool in self.pools.values():
            # Bring each pool's volumes within reach (a loop file re-attached after a reboot,
            # a zpool imported, a VG activated); a pool that can't be mounted stays listed,
            # with a warning (`lxc warning list`) until a start-up finds it usable again.
            try:
                # A driver that can't run here (lvm without device-mapper, zfs without its
                # module: a pool made on another host or before the host changed) says why.
                usable, reason = self.drivers_available.get(pool.driver_name, (True, ""))
                if not usable:
                    raise OSError(f"Storage driver {pool.driver_name!r} isn't usable on this host: {reason}")
                await pool.driver.mount_pool()
                await asyncio.to_thread(self._check_usable, pool)
            except Exception as e:
                why = getattr(e, "message", None) or str(e)
                log.warning("couldn't mount the storage pool", extra={"pool": pool.name, "err": why})
                await raise_warning(self.services, STORAGE_POOL_UNAVAILABLE,
                                    f"Failed mounting storage pool {pool.name!r}: {why}",
                                    entity_url=f"/1.0/storage-pools/{pool.name}")
            else:
                await resolve_warning(self.services, STORAGE_POOL_UNAVAILABLE,
                                      entity_url=f"/1.0/storage-pools/{pool.name}")
        self._advertise_driver()

    @staticmethod
    def _check_usable(pool: Pool) -> None:
        """A dir pool's directory (or the `source` it links to) must be there."""
        if pool.driver_name == "dir" and not os.path.isdir(pool.driver.mount_path):
            source = pool.config.get("source") or str(pool.driver.mount_path)
            raise OSError(f"Source path {source!r} doesn't exist")

    def _driver(self, name: str, driver: str, config: dict) -> Driver:
        return DRIVERS[driver](name, self.root / name, config)

    def _advertise_driver(self) -> None:
        server = self.services.server
        supported = []
        for dname, cls in DRIVERS.items():
            ok, version = self.drivers_available.get(dname, (dname == "dir", cls.info.version))
            if ok:
                supported.append({**cls.info.to_api(), "Version": version})
        server.storage_supported_drivers = supported
        if self.pools:
            first = next(iter(self.pools.values()))
            server.storage = first.driver_name
            server.storage_version = self.drivers_available.get(first.driver_name, (True, first.driver.info.version))[1]
        server.invalidate()

    def get(self, name: str) -> Pool:
        pool = self.pools.get(name)
        if pool is None:
            raise NotFound("Storage pool not found")
        return pool

    async def used_by(self, name: str) -> list[str]:
        out: list[str] = await self.custom.pool_volume_urls(name)
        for provider in self.used_by_providers:
            out.extend(await provider(name))
        return sorted(set(out))

    def describe(self, pool: Pool) -> dict:
        """The pool as the API renders it, without `used_by` (which looks at every instance,
        profile and volume)."""
        return {"name": pool.name, "driver": pool.driver_name, "description": pool.description,
                "config": dict(pool.config), "status": "Created", "locations": ["none"]}

    async def render(self, pool: Pool) -> dict:
        return {**self.describe(pool), "used_by": await self.used_by(pool.name)}

    @staticmethod
    def _validate_config(driver: str, config: dict[str, str]) -> dict[str, str]:
        """Check every key against the common ones and the driver's own (`pool_keys`, each with
        its validator), then let the driver check values and fill its defaults."""
        cls = DRIVERS[driver]
        for key, value in config.items():
            if key in cls.pool_keys:
                try:
                    cls.pool_keys[key](value)
                except (ValueError, TypeError) as e:
                    raise BadRequest(f"Invalid value for storage pool config {key!r}: {e}") from None
            elif key not in POOL_KEYS:
                raise BadRequest(f"Invalid option for storage pool config: {key!r}")
            if key == "source" and value and not value.startswith("/"):
                raise BadRequest(f"Invalid value for source {value!r}: must be an absolute path")
        return cls.validate_pool_config(dict(config))

    def check_name_and_driver(self, name: str, driver: str) -> None:
        """A new pool's name is valid and its driver known and usable on this host."""
        if not POOL_NAME.match(name):
            raise BadRequest(f"Invalid storage pool name {name!r}")
        if driver not in DRIVERS:
            raise BadRequest(f"Storage pool driver {driver!r} is not supported by this server "
                             f"(supported: {', '.join(sorted(DRIVERS))})")
        ok, why = self.drivers_available.get(driver, (True, ""))
        if not ok:
            raise BadRequest(f"Storage pool driver {driver!r} can't run on this server: {why}")

    async def create(self, name: str, driver: str, description: str, config: dict[str, str]) -> Pool:
        self.check_name_and_driver(name, driver)
        config = self._validate_config(driver, dict(config))
        async with self._lock:
            if name in self.pools:
                raise Conflict(f"Storage pool {name!r} already exists")
            if config.get("source"):
                await asyncio.to_thread(self._check_source_free, name, config["source"])

            def prepare() -> None:
                self.root.mkdir(parents=True, exist_ok=True)
                os.chmod(self.root, 0o711)

            await asyncio.to_thread(prepare)
            drv = self._driver(name, driver, config)
            async with Revert() as revert:
                # The driver makes the pool (a loop file, a mount, a directory layout, or a link
                # to the user's `source`) and may fill keys in (`source`, `size`); nothing is
                # left of it if it fails, and it is removed again if the record can't be written.
                await drv.create_pool()
                revert.add(drv.delete_pool)
                config = dict(drv.config)

                def ins(session):
                    return session.execute(
                        text("INSERT INTO storage_pools (name, driver, description, config) "
                             "VALUES (:n, :d, :desc, :c) RETURNING id"),
                        {"n": name, "d": driver, "desc": description, "c": json.dumps(config)}).scalar_one()

                pool_id = await self.db.run(ins)
                revert.success()
            drv.config = config
            pool = Pool(pool_id, name, driver, description, config, drv)
            self.pools[name] = pool
        self._advertise_driver()
        return pool

    def _check_source_free(self, name: str, source: str) -> None:
        """Refuse a `source` that another pool uses (the same path, one inside it or one holding
        it) or that lies within $LXD_DIR (other than the new pool's own directory)."""
        real = os.path.realpath(source)
        for other in self.pools.values():
            theirs = other.config.get("source", "")
            if theirs and os.path.realpath(theirs) == real:
                raise BadRequest(f"Source path {source!r} is already used by storage pool {other.name!r}")
        lxd_dir = os.path.realpath(self.services.lxd_dir)
        if _within(real, lxd_dir) and real != os.path.realpath(self.root / name):
            raise BadRequest(f"Source path {source!r} is within the LXD directory ({lxd_dir})")
        for other in self.pools.values():
            theirs = os.path.realpath(other.config.get("source", "") or other.driver.mount_path)
            if _within(real, theirs):
                raise BadRequest(f"Source path {source!r} is inside the source of storage pool {other.name!r}")
            if _within(theirs, real):
                raise BadRequest(f"Source path {source!r} holds the source of storage pool {other.name!r}")

    async def adopt(self, name: str, driver: Driver, description: str = "") -> Pool:
        """Record a pool that exists on the host but has no record (`lxd recover`): the driver
        (already mounted) is kept as it is, nothing is created on the host."""
        config = dict(driver.config)
        async with self._lock:
            if name in self.pools:
                raise Conflict(f"Storage pool {name!r} already exists")

            def ins(session):
                return session.execute(
                    text("INSERT INTO storage_pools (name, driver, description, config) "
                         "VALUES (:n, :d, :desc, :c) RETURNING id"),
                    {"n": name, "d": driver.info.name, "desc": description, "c": json.dumps(config)}).scalar_one()

            pool_id = await self.db.run(ins)
            pool = Pool(pool_id, name, driver.info.name, description, config, driver)
            self.pools[name] = pool
        self._advertise_driver()
        return pool

    async def forget(self, name: str) -> None:
        """Drop a pool's record only, leaving everything on the host (undoes adopt())."""
        pool = self.pools.pop(name, None)
        if pool is None:
            return
        await self.db.run(lambda s: s.execute(text("DELETE FROM storage_pools WHERE id=:i"), {"i": pool.id}))
        self._advertise_driver()

    async def update(self, name: str, description: str, config: dict[str, str]) -> None:
        pool = self.get(name)
        config = dict(config)
        config.setdefault("source", pool.config.get("source", ""))
        if config.get("source") != pool.config.get("source"):
            raise BadRequest("The source of a storage pool can't be changed")
        config = self._validate_config(pool.driver_name, config)
        changed = {k: v for k, v in config.items() if pool.config.get(k) != v}
        changed.update({k: "" for k in pool.config if k not in config})
        changed.pop("source", None)
        if changed:
            await pool.driver.update_pool(changed)

        def upd(session):
            session.execute(text("UPDATE storage_pools SET description=:d, config=:c WHERE id=:i"),
                            {"d": description, "c": json.dumps(config), "i": pool.id})

        await self.db.run(upd)
        pool.description = description
        pool.config = config
        pool.driver.config = config

    async def delete(self, name: str) -> None:
        pool = self.get(name)
        if await self.used_by(name):
            raise BadRequest("The storage pool is currently in use")

        def rm(session):
            session.execute(text("DELETE FROM storage_pools WHERE id=:i"), {"i": pool.id})

        await self.db.run(rm)
        del self.pools[name]
        await forget_warnings(self.services, f"/1.0/storage-pools/{name}")
        await pool.driver.delete_pool()
        self._advertise_driver()


def _within(path: str, top: str) -> bool:
    """Whether `path` is `top` or below it (both real paths)."""
    return path == top or path.startswith(top.rstrip("/") + "/")
