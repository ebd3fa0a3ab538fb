"""Storage pools: records in the store, a driver per pool, pools mounted at $LXD_DIR/storage-pools/<name>."""

from __future__ import annotations

import asyncio
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import text

from lxd_daemon.errors import BadRequest, Conflict, NotFound
from lxd_daemon.storage.drivers import DRIVERS, Driver

POOL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
POOL_KEYS = {"source", "size", "rsync.bwlimit", "volume.size", "volume.block.filesystem"}


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

    async def load(self) -> None:
        def q(session):
            return session.execute(text("SELECT id, name, driver, description, config FROM storage_pools")).all()

        for row in await self.db.run(q):
            cfg = json.loads(row.config)
            self.pools[row.name] = Pool(row.id, row.name, row.driver, row.description, cfg,
                                        self._driver(row.name, row.driver, cfg))
        self._advertise_driver()

    def _driver(self, name: str, driver: str, config: dict) -> Driver:
        return DRIVERS[driver](name, self.root / name, config)

    def _advertise_driver(self) -> None:
        server = self.services.server
        server.storage_supported_drivers = [{"Name": "dir", "Version": "1", "Remote": False}]
        if self.pools:
            first = next(iter(self.pools.values()))
            server.storage = first.driver_name
            server.storage_version = first.driver.version
        server.invalidate()

    def get(self, name: str) -> Pool:
        pool = self.pools.get(name)
        if pool is None:
            raise NotFound("Storage pool not found")
        return pool

    async def used_by(self, name: str) -> list[str]:
        out: list[str] = []
        for provider in self.used_by_providers:
            out.extend(await provider(name))
        return sorted(set(out))

    async def render(self, pool: Pool) -> dict:
        return {"name": pool.name, "driver": pool.driver_name, "description": pool.description,
                "config": dict(pool.config), "used_by": await self.used_by(pool.name),
                "status": "Created", "locations": ["none"]}

    @staticmethod
    def _validate_config(driver: str, config: dict[str, str]) -> None:
        for key, value in config.items():
            if key not in POOL_KEYS:
                raise BadRequest(f"Invalid option for storage pool config: {key!r}")
            if key == "source" and value and not value.startswith("/"):
                raise BadRequest(f"Invalid value for source {value!r}: must be an absolute path")

    async def create(self, name: str, driver: str, description: str, config: dict[str, str]) -> Pool:
        if not POOL_NAME.match(name):
            raise BadRequest(f"Invalid storage pool name {name!r}")
        if driver not in DRIVERS:
            raise BadRequest(f"Storage pool driver {driver!r} is not supported by this server (supported: dir)")
        config = dict(config)
        self._validate_config(driver, config)
        async with self._lock:
            if name in self.pools:
                raise Conflict(f"Storage pool {name!r} already exists")
            mount = self.root / name
            source = config.get("source") or str(mount)
            config["source"] = source

            def prepare() -> None:
                self.root.mkdir(parents=True, exist_ok=True)
                os.chmod(self.root, 0o711)
                if source != str(mount):
                    Path(source).mkdir(parents=True, exist_ok=True)
                    if mount.is_symlink() or mount.exists():
                        raise BadRequest(f"{mount} already exists")
                    mount.symlink_to(source)

            await asyncio.to_thread(prepare)
            drv = self._driver(name, driver, config)
            try:
                await drv.create_pool()

                def ins(session):
                    return session.execute(
                        text("INSERT INTO storage_pools (name, driver, description, config) "
                             "VALUES (:n, :d, :desc, :c) RETURNING id"),
                        {"n": name, "d": driver, "desc": description, "c": json.dumps(config)}).scalar_one()

                pool_id = await self.db.run(ins)
            except BaseException:
                if mount.is_symlink():
                    mount.unlink()
                else:
                    await drv.delete_tree(mount)
                raise
            pool = Pool(pool_id, name, driver, description, config, drv)
            self.pools[name] = pool
        self._advertise_driver()
        return pool

    async def update(self, name: str, description: str, config: dict[str, str]) -> None:
        pool = self.get(name)
        config = dict(config)
        config.setdefault("source", pool.config.get("source", ""))
        if config.get("source") != pool.config.get("source"):
            raise BadRequest("The source of a storage pool can't be changed")
        self._validate_config(pool.driver_name, config)

        def upd(session):
            session.execute(text("UPDATE storage_pools SET description=:d, config=:c WHERE id=:i"),
                            {"d": description, "c": json.dumps(config), "i": pool.id})

        await self.db.run(upd)
        pool.description = description
        pool.config = config

    async def delete(self, name: str) -> None:
        pool = self.get(name)
        if await self.used_by(name):
            raise BadRequest("The storage pool is currently in use")

        def rm(session):
            session.execute(text("DELETE FROM storage_pools WHERE id=:i"), {"i": pool.id})

        await self.db.run(rm)
        del self.pools[name]
        mount = self.root / name
        if mount.is_symlink():
            mount.unlink()
        else:
            await pool.driver.delete_pool()
        self._advertise_driver()
