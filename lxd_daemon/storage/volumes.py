"""Instance root volumes on any driver: made from images, copied, renamed, deleted, swept.

Written once over the Driver interface; drivers differ only by the flags in their `info`:

- Drivers with `optimized_images` keep one image volume per (image, id map) in the pool, named
  `<fingerprint>_<uid>_<gid>` (we shift ids when unpacking, so each map has its own tree). It is
  unpacked once, under a temporary name then renamed into place, and every launch is a
  copy-on-write child of it (driver.create_volume_from_image).
- The others keep the unpacked, shifted tree as a plain directory `images/<fp>/<uid>_<gid>` under
  the pool (the image cache), plus SPARES ready-made copies of it (`images/<fp>/.spare-<key>-*`)
  prepared in the background: a launch creates the volume and moves a spare's content into it
  (a few renames), so the copy is off the launch's critical path; without a spare it copies
  the cache (reflinks where the filesystem has them).

Crash safety: every temporary thing has a name the start-up sweep recognises (`.tmp*` entries of
the image caches, image volumes that are not `<fp>_<uid>_<gid>`, container volumes no instance
record names: `.trash-*` left by a delete, half-made volumes left by a create).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import uuid
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

from lxd_daemon.errors import BadRequest, Conflict, NotFound
from lxd_daemon.storage.drivers.base import Filler
from lxd_daemon.storage.drivers.trees import copy_tree, remove_tree
from lxd_daemon.storage.volume import DEFAULT_PROJECT, Volume, VolumeType
from lxd_daemon.util.revert import Revert

log = logging.getLogger("lxd.storage")

Unpack = Callable[[Path], Awaitable[None]]  # unpacks the image into an existing, empty directory
IMAGE_VOLUME = re.compile(r"^[0-9a-f]{64}_\d+_\d+$")


class VolumeService:
    # Ready copies of each image cache kept for the next launches (drivers without optimised images).
    SPARES = 2

    def __init__(self, storage):
        self.storage = storage
        self._locks: dict[str, asyncio.Lock] = {}
        self._bg: set[asyncio.Task] = set()

    # -- helpers -----------------------------------------------------------------------------
    def _lock(self, key: str) -> asyncio.Lock:
        lk = self._locks.get(key)
        if lk is None:
            lk = self._locks[key] = asyncio.Lock()
        return lk

    def _spawn(self, coro) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._bg.add(t)
        t.add_done_callback(self._bg.discard)

    async def close(self) -> None:
        """Let background removals and spare copies finish briefly, then cancel them (what is left
        has a name the next start-up sweep removes)."""
        if self._bg:
            await asyncio.wait(list(self._bg), timeout=2)
        for t in list(self._bg):
            t.cancel()

    @staticmethod
    def instance_volume(pool, name: str, project: str = DEFAULT_PROJECT) -> Volume:
        return Volume(pool.name, VolumeType.CONTAINER, name, project=project)

    def instance_path(self, pool, name: str, project: str = DEFAULT_PROJECT) -> Path:
        """Where the instance's root volume is reachable on the host (its `rootfs/` inside)."""
        return pool.driver.volume_path(self.instance_volume(pool, name, project))

    def find_instance_pool(self, name: str, project: str = DEFAULT_PROJECT):
        """The pool holding a volume for instance `name` (for instances without a root disk)."""
        for pool in self.storage.pools.values():
            if self.instance_path(pool, name, project).is_dir():
                return pool
        return None

    # -- create ------------------------------------------------------------------------------
    async def _clear_leftover(self, pool, vol: Volume) -> None:
        """A volume under the name of an instance being created is a crash's leftover (the caller
        holds the name and no record has it): remove it, snapshots included."""
        if await pool.driver.has_volume(vol):
            await self._delete_now(pool, vol)

    async def _create(self, pool, vol: Volume, make: Callable[[], Awaitable[None]]) -> None:
        """Run `make` (which creates `vol`); a Conflict means a crash's leftover holds the name
        (the caller holds it and no record has it): remove that and try once more. Nothing
        is asked of the pool on the fast path."""
        try:
            await make()
        except Conflict:
            await self._clear_leftover(pool, vol)
            await make()

    async def create_instance_volume(self, pool, project: str, name: str, image_fp: str, unpack_fn: Unpack,
                                     idmap_key: str) -> Path:
        """Create the root volume of instance `name` from image `image_fp` unpacked with the id
        map `idmap_key` (`<uid>_<gid>`); returns the volume's path. Nothing is left on failure."""
        drv = pool.driver
        vol = self.instance_volume(pool, name, project)
        if drv.info.optimized_images:
            image = await self._image_volume(pool, image_fp, unpack_fn, idmap_key)
            await self._create(pool, vol, lambda: drv.create_volume_from_image(vol, image))
        else:
            cache = await self._image_cache(pool, image_fp, unpack_fn, idmap_key)
            await self._create(pool, vol, lambda: drv.create_volume(vol, filler=self._fill_from_cache(cache)))
            self._spawn(self._refill_spare(cache))
        try:
            return await drv.mount_volume(vol)
        except BaseException:
            await self._delete_now(pool, vol)
            raise

    async def create_empty_instance_volume(self, pool, project: str, name: str, filler: Filler | None = None) -> Path:
        vol = self.instance_volume(pool, name, project)
        await self._create(pool, vol, lambda: pool.driver.create_volume(vol, filler=filler))
        try:
            return await pool.driver.mount_volume(vol)
        except BaseException:
            await self._delete_now(pool, vol)
            raise

    async def copy_instance_volume(self, src_pool, src_name: str, pool, name: str, *,
                                   src_project: str = DEFAULT_PROJECT, project: str = DEFAULT_PROJECT,
                                   snapshots: bool = False) -> Path:
        """Create instance `name`'s volume as a copy of instance `src_name`'s (or of its snapshot
        `src/snap`): the driver's fastest path within a pool, a tree copy between pools."""
        vol = self.instance_volume(pool, name, project)
        src = Volume(src_pool.name, VolumeType.CONTAINER, src_name, project=src_project)
        if src_pool is pool or src_pool.name == pool.name:
            await self._create(pool, vol, lambda: pool.driver.create_volume_from_copy(vol, src, snapshots=snapshots))
        else:
            await self._clear_leftover(pool, vol)
            if snapshots and await src_pool.driver.list_snapshots(src):
                raise BadRequest("Copying an instance with its snapshots to another pool is not supported yet")
            src_path = await src_pool.driver.mount_volume(src)
            try:
                async def fill(path: Path) -> None:
                    await copy_tree(src_path, path, into=True)

                await pool.driver.create_volume(vol, filler=fill)
            finally:
                await src_pool.driver.unmount_volume(src)
        try:
            return await pool.driver.mount_volume(vol)
        except BaseException:
            await self._delete_now(pool, vol)
            raise

    # -- image volumes (drivers with optimised images) -----------------------------------------
    async def _image_volume(self, pool, fp: str, unpack_fn: Unpack, key: str) -> Volume:
        drv = pool.driver
        image = Volume(pool.name, VolumeType.IMAGE, f"{fp}_{key}")
        if await drv.has_volume(image):
            return image
        async with self._lock(f"image:{pool.name}/{image.name}"):
            if await drv.has_volume(image):
                return image
            tmp = image.renamed(f"tmp-{uuid.uuid4().hex[:12]}-{fp[:12]}")
            async with Revert() as revert:
                await drv.create_volume(tmp, filler=unpack_fn)
                revert.add(drv.delete_volume, tmp)
                await drv.rename_volume(tmp, image.name)
                revert.success()
        return image

    # -- image caches and spares (drivers without optimised images) ----------------------------
    @staticmethod
    def cache_root(pool, fp: str) -> Path:
        return pool.driver.volume_path(Volume(pool.name, VolumeType.IMAGE, fp))

    async def _image_cache(self, pool, fp: str, unpack_fn: Unpack, key: str) -> Path:
        cache = self.cache_root(pool, fp) / key
        if cache.exists():
            return cache
        async with self._lock(f"cache:{pool.name}/{fp}/{key}"):
            if cache.exists():
                return cache
            tmp = cache.parent / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
            await asyncio.to_thread(lambda: (cache.parent.mkdir(parents=True, exist_ok=True),
                                             os.chmod(cache.parent, pool.driver.IMAGE_MODE)))
            async with Revert() as revert:
                revert.add(remove_tree, tmp)
                await asyncio.to_thread(tmp.mkdir, 0o700)
                await unpack_fn(tmp)
                # 0100 as an instance volume: copies and spares taken from it are closed from
                # the moment they appear under containers/.
                await asyncio.to_thread(os.chmod, tmp, pool.driver.INSTANCE_MODE)
                await asyncio.to_thread(os.rename, tmp, cache)
                revert.success()
        return cache

    @staticmethod
    def _spares(cache: Path) -> list[Path]:
        prefix = f".spare-{cache.name}-"
        try:
            return sorted(cache.parent / e for e in os.listdir(cache.parent) if e.startswith(prefix))
        except OSError:
            return []

    def _claim_spare(self, cache: Path) -> Path | None:
        """Take a spare out of the pool of spares (one rename, so two launches can't take the
        same one); it is named `.tmp-take-*` until emptied, swept at start-up after a crash."""
        for sp in self._spares(cache):
            claimed = cache.parent / f".tmp-take-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(sp, claimed)
                return claimed
            except OSError:
                continue
        return None

    def _fill_from_cache(self, cache: Path) -> Filler:
        async def fill(path: Path) -> None:
            def from_spare() -> tuple[bool, Path | None]:
                spare = self._claim_spare(cache)
                if spare is None:
                    return False, None
                try:
                    for entry in os.listdir(spare):
                        os.rename(spare / entry, path / entry)
                    os.rmdir(spare)
                    return True, None
                except OSError:
                    return False, spare  # e.g. a volume on another filesystem (EXDEV)

            done, leftover = await asyncio.to_thread(from_spare)
            if done:
                return
            if leftover is not None:
                await remove_tree(leftover)
                await remove_tree_contents(path)
            await copy_tree(cache, path, into=True)

        return fill

    async def _refill_spare(self, cache: Path) -> None:
        lk = self._lock(f"spare:{cache}")
        if lk.locked():
            return
        async with lk:
            try:
                while len(self._spares(cache)) < self.SPARES and cache.exists():
                    tmp = cache.parent / f".tmp-spare-{uuid.uuid4().hex[:8]}"
                    async with Revert() as revert:
                        revert.add(remove_tree, tmp)
                        await copy_tree(cache, tmp)
                        await asyncio.to_thread(os.rename, tmp, cache.parent / f".spare-{cache.name}-{tmp.name[11:]}")
                        revert.success()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("preparing a spare root filesystem failed", extra={"cache": str(cache)})

    async def drop_image(self, fp: str) -> None:
        """Forget an image on every pool (when it is deleted): its cache and spares, or its image
        volumes (instances made from them keep their own volumes)."""
        for pool in list(self.storage.pools.values()):
            drv = pool.driver
            try:
                if drv.info.optimized_images:
                    for v in await drv.list_volumes():
                        if v.type is VolumeType.IMAGE and not v.is_snapshot and v.name.startswith(f"{fp}_"):
                            await self._delete_now(pool, v)
                else:
                    await remove_tree(self.cache_root(pool, fp))
            except Exception:
                log.exception("removing an image's volumes failed", extra={"pool": pool.name, "fingerprint": fp})

    # -- delete / rename ---------------------------------------------------------------------
    async def _delete_now(self, pool, vol: Volume) -> None:
        drv = pool.driver
        for s in await drv.list_snapshots(vol):
            await drv.delete_snapshot(vol.snapshot(s))
        await drv.unmount_volume(vol)
        await drv.delete_volume(vol)

    async def delete_instance_volume(self, pool, project: str, name: str, *, background: bool = True) -> None:
        """Delete instance `name`'s volume and its snapshots. In the background (the default) it
        is renamed out of the way first (instant) and removed after; a crash before that finishes
        leaves a `.trash-*` volume, which the start-up sweep removes."""
        vol = self.instance_volume(pool, name, project)
        if not background:
            await self._delete_now(pool, vol)
            return
        trash = vol.renamed(f".trash-{name}-{uuid.uuid4().hex[:8]}")
        try:
            await pool.driver.rename_volume(vol, trash.name)
        except NotFound:
            return
        except FileNotFoundError:
            return

        async def remove() -> None:
            try:
                await self._delete_now(pool, trash)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("removing a deleted instance's volume failed", extra={"volume": trash.name})

        self._spawn(remove())

    async def rename_instance_volume(self, pool, project: str, name: str, new: str) -> Path:
        vol = self.instance_volume(pool, name, project)
        await pool.driver.rename_volume(vol, new)
        return pool.driver.volume_path(vol.renamed(new))

    # -- start-up sweep ----------------------------------------------------------------------
    async def sweep(self, known: Iterable[tuple[str, str]]) -> None:
        """Remove what a crash left behind on every pool: instance volumes no record names
        (half-made creates, `.trash-*` of deletes, `.restore-*` of restores), half-unpacked image
        caches and image volumes, spares being taken or copied."""
        known = set(known)
        for pool in list(self.storage.pools.values()):
            drv = pool.driver
            try:
                vols = await drv.list_volumes()
            except Exception as e:
                log.warning("couldn't list the pool's volumes", extra={"pool": pool.name, "err": str(e)})
                continue
            for v in vols:
                if v.is_snapshot:
                    continue
                stale = False
                if v.type is VolumeType.CONTAINER:
                    stale = (v.project, v.name) not in known
                elif v.type is VolumeType.IMAGE and drv.info.optimized_images:
                    stale = not IMAGE_VOLUME.match(v.name)
                if stale:
                    log.warning("removing a leftover volume", extra={"pool": pool.name, "volume": v.name})
                    try:
                        await self._delete_now(pool, v)
                    except Exception as e:
                        log.warning("couldn't remove a leftover volume",
                                    extra={"pool": pool.name, "volume": v.name, "err": str(e)})
            if not drv.info.optimized_images:
                images = drv.volume_path(Volume(pool.name, VolumeType.IMAGE, "x")).parent
                for fp in _listdir(images):
                    for key in _listdir(images / fp):
                        if key.startswith(".tmp"):
                            await remove_tree(images / fp / key)


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


async def remove_tree_contents(path: Path) -> None:
    for e in await asyncio.to_thread(_listdir, path):
        await remove_tree(path / e)
