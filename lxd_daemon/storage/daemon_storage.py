"""`storage.images_volume` and `storage.backups_volume`: the image store and the backups kept on a
custom volume (`POOL/VOLUME`), as LXD does.

Setting a key moves what `$LXD_DIR/images` (or `backups`) holds into an `images` (`backups`)
directory inside the volume and leaves a symlink to it in its place; unsetting it moves everything
back into a plain directory. Everything else keeps using `$LXD_DIR/images`. Each step is a rename
where source and target share a filesystem, else a copy then a removal, entry by entry; the
symlink replaces the directory in one rename. The volume is in use by the server meanwhile: it
can't be deleted, renamed or moved, and only a filesystem volume of the default project will do.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from pathlib import Path

from lxd_daemon.errors import BadRequest, NotFound
from lxd_daemon.storage.volume import DEFAULT_PROJECT

KEYS = {"storage.images_volume": "images", "storage.backups_volume": "backups"}


def parse(value: str) -> tuple[str, str]:
    pool, _, vol = value.partition("/")
    if not pool or not vol or "/" in vol:
        raise ValueError("must be POOL/VOLUME")
    return pool, vol


class DaemonStorage:
    def __init__(self, services, storage):
        self.services = services
        self.storage = storage

    def setup(self) -> None:
        from lxd_daemon.server import config as server_config

        for key in KEYS:
            server_config.register(key, server_config.Key(parse))
            self.services.server.appliers[key] = self._applier(key)
        self.storage.custom.used_by_providers.append(self.used_by)

    async def used_by(self, pool: str, name: str, project: str) -> list[str]:
        """The server (`/1.0`) uses a volume one of the keys names."""
        values = self.services.server.config.values
        if project == DEFAULT_PROJECT and any(values.get(k) == f"{pool}/{name}" for k in KEYS):
            return ["/1.0"]
        return []

    async def mount_all(self) -> None:
        """At start-up: mount the volumes the keys name (their pools are up by now)."""
        for key in KEYS:
            value = self.services.server.config.values.get(key)
            if value:
                try:
                    await self._target(value, KEYS[key], check=False)
                except Exception as e:  # the daemon starts; the store is unreachable until fixed
                    import logging

                    logging.getLogger("lxd.storage").error(
                        "can't mount the volume holding the daemon's storage",
                        extra={"key": key, "volume": value, "err": str(e)})

    async def _target(self, value: str, sub: str, *, check: bool = True) -> Path:
        pool, name = parse(value)
        custom = self.storage.custom
        try:
            rec = await custom.get(pool, name, DEFAULT_PROJECT)
        except NotFound:
            raise BadRequest(f"Storage volume {name!r} doesn't exist on pool {pool!r}") from None
        if rec.content_type != "filesystem":
            raise BadRequest(f"Storage volume {value!r} isn't a filesystem volume")
        if check:
            users = [u for u in await custom.used_by(pool, name, DEFAULT_PROJECT) if u != "/1.0"]
            if users:
                raise BadRequest(f"Storage volume {value!r} is in use by {', '.join(users)}")
        path = await custom.mount(pool, name, DEFAULT_PROJECT)
        return path / sub

    def _applier(self, key: str):
        sub = KEYS[key]

        async def apply(old: str | None, new: str | None) -> None:
            link = self.services.lxd_dir / sub
            target = await self._target(new, sub) if new else None
            await asyncio.to_thread(_move_store, link, target)

        return apply


def _move_store(link: Path, target: Path | None) -> None:
    """Make `link` (a directory, or a symlink to one) a symlink to `target` (None: a plain
    directory), moving its content along. Blocking."""
    if not link.exists() and not link.is_symlink():
        link.mkdir(mode=0o700)
    current = link.resolve()
    if target is not None and current == target.resolve():
        return
    if target is None:
        if not link.is_symlink():
            return
        fresh = link.parent / f".{link.name}-{uuid.uuid4().hex[:8]}"
        fresh.mkdir(mode=0o700)
    else:
        if target.exists() and any(target.iterdir()):
            raise BadRequest(f"{target} isn't empty")
        target.mkdir(mode=0o700, exist_ok=True)
        os.chmod(target, 0o700)
        fresh = target
    for entry in os.listdir(current):
        _move(current / entry, fresh / entry)
    if target is None:
        # A directory can't be renamed over a symlink: the link goes aside first.
        aside = link.parent / f".{link.name}-link-{uuid.uuid4().hex[:8]}"
        os.rename(link, aside)
        os.rename(fresh, link)
        os.unlink(aside)
        try:
            current.rmdir()  # the now empty directory in the volume
        except OSError:
            pass
    else:
        tmp = link.parent / f".{link.name}-link-{uuid.uuid4().hex[:8]}"
        os.symlink(target, tmp)
        if link.is_symlink():
            os.rename(tmp, link)
        else:
            old = link.parent / f".{link.name}-old-{uuid.uuid4().hex[:8]}"
            os.rename(link, old)
            os.rename(tmp, link)
            os.rmdir(old)


def _move(src: Path, dst: Path) -> None:
    try:
        os.rename(src, dst)
    except OSError as e:
        if e.errno != 18:  # EXDEV: another filesystem
            raise
        if src.is_dir() and not src.is_symlink():
            shutil.copytree(src, dst, symlinks=True, copy_function=shutil.copy2)
            shutil.rmtree(src)
        else:
            shutil.copy2(src, dst, follow_symlinks=False)
            os.unlink(src)
