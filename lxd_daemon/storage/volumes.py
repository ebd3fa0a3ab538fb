"""Instance root volumes on any driver: made from images, copied, renamed, deleted, swept.

Written once over the Driver interface; drivers differ only by the flags in their `info`:

- Drivers with `optimized_images` keep one image volume per (image, id map) in the pool, named
  `<fingerprint>_<uid>_<gid>` (we shift ids when unpacking, so each map has its own tree). It is
  unpacked once, under a temporary name then renamed into place, and every launch is a
  copy-on-write child of it (driver.create_volume_from_image).
- The others unpack the image straight into each new volume, as LXD does (about half LXD's time:
  the gzip stream is inflated with ISA-L while tar writes the files). Only where the pool's
  filesystem has reflinks (xfs, btrfs) is an unpacked, shifted tree kept as
  `images/<fp>/<uid>_<gid>` under the pool (the image cache), and launches are reflinked copies
  of it, which share its blocks; CACHE_IDLE_S after the last launch from a cache it is removed.
  Without reflinks a cache, or ready copies of it, would cost a full copy of the image's tree
  each for a few hundred milliseconds per launch; on such pools N containers take what N
  containers take.

Crash safety: every temporary thing has a name the start-up sweep recognises (`.tmp*` entries of
the image caches and of the images directory, image volumes that are not `<fp>_<uid>_<gid>`, container volumes no instance
record names: `.trash-*` left by a delete, half-made volumes left by a create).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import uuid
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

from lxd_daemon.errors import Conflict, NotFound
from lxd_daemon.storage.drivers.base import Filler
from lxd_daemon.storage.drivers.trees import can_reflink, copy_tree, remove_tree, sync_tree
from lxd_daemon.storage.volume import DEFAULT_PROJECT, Volume, VolumeType
from lxd_daemon.util.revert import Revert

log = logging.getLogger("lxd.storage")

Unpack = Callable[[Path], Awaitable[None]]  # unpacks the image into an existing, empty directory
IMAGE_VOLUME = re.compile(r"^[0-9a-f]{64}_\d+_\d+$")


class VolumeService:
    # An image cache (pools with reflinks) is for launches in quick succession: this long after
    # the last launch from it, it is removed (see the module's docstring).
    CACHE_IDLE_S = 60.0

    def __init__(self, storage):
        self.storage = storage
        self._locks: dict[str, asyncio.Lock] = {}
        self._bg: set[asyncio.Task] = set()
        self._idle: dict[Path, asyncio.TimerHandle] = {}  # cache -> when it expires
        self._busy: dict[Path, int] = {}  # cache -> launches using it right now
        self._reflinks: dict[str, bool] = {}  # pool -> whether its filesystem has reflinks

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
        """Let background removals finish briefly, then cancel them (what is left
        has a name the next start-up sweep removes)."""
        for h in self._idle.values():
            h.cancel()
        self._idle.clear()
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
        elif await self._has_reflinks(pool):
            cache = self.cache_root(pool, image_fp) / idmap_key
            self._busy[cache] = self._busy.get(cache, 0) + 1
            try:
                await self._image_cache(pool, image_fp, unpack_fn, idmap_key)

                async def fill(path: Path) -> None:
                    await copy_tree(cache, path, into=True)

                await self._create(pool, vol, lambda: drv.create_volume(vol, filler=fill))
            finally:
                self._busy[cache] -= 1
                if not self._busy[cache]:
                    del self._busy[cache]
                self._cache_idle_later(cache)
        else:
            await self._create(pool, vol, lambda: drv.create_volume(vol, filler=unpack_fn))
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
            snaps = await src_pool.driver.list_snapshots(src) if snapshots and not src.is_snapshot else []
            if snaps:
                await self._copy_across_with_snapshots(src_pool, src, pool, vol, snaps)
            else:
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

    async def _copy_across_with_snapshots(self, src_pool, src: Volume, pool, vol: Volume, snaps: list[str]) -> None:
        """A copy between pools (any two drivers) with snapshots: each snapshot's tree, oldest
        first, is synced into the new volume and snapshotted there, then the volume itself.
        Nothing is left on failure."""
        async with Revert() as revert:
            await pool.driver.create_volume(vol)
            revert.add(self._delete_now, pool, vol)
            await self.sync_into(src_pool, src, pool, vol, snaps)
            revert.success()

    async def sync_into(self, src_pool, src: Volume, pool, vol: Volume, snaps: list[str]) -> None:
        """Make `vol` (which exists) hold the snapshots `snaps` of `src` (each synced into `vol`
        and snapshotted there, oldest first), then `src`'s own content. Only what differs is
        copied (rsync)."""
        dst_path = await pool.driver.mount_volume(vol)
        try:
            for s in snaps:
                ssrc = src.snapshot(s)
                spath = await src_pool.driver.mount_volume(ssrc)
                try:
                    await sync_tree(spath, dst_path)
                finally:
                    await src_pool.driver.unmount_volume(ssrc)
                await pool.driver.create_snapshot(vol.snapshot(s))
            src_path = await src_pool.driver.mount_volume(src)
            try:
                await sync_tree(src_path, dst_path)
            finally:
                await src_pool.driver.unmount_volume(src)
        except BaseException:
            for s in snaps:
                with contextlib.suppress(Exception):
                    if await pool.driver.has_volume(vol.snapshot(s)):
                        await pool.driver.delete_snapshot(vol.snapshot(s))
            raise

    async def refresh_instance_volume(self, src_pool, src: Volume, pool, vol: Volume, snaps: list[str]) -> None:
        """`copy --refresh`: add the snapshots `snaps` of `src` to `vol` (which exists) and sync
        its content to `src`'s, within a pool or between pools."""
        if not await pool.driver.has_volume(vol):
            raise NotFound(f"Storage volume {vol.name!r} not found on pool {pool.name!r}")
        for s in snaps:
            if await pool.driver.has_volume(vol.snapshot(s)):
                await pool.driver.delete_snapshot(vol.snapshot(s))
        await self.sync_into(src_pool, src, pool, vol, snaps)

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

    # -- image caches (drivers without optimised images, on filesystems with reflinks) ---------
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
                # 0100 as an instance volume: copies taken from it are closed from
                # the moment they appear under containers/.
                await asyncio.to_thread(os.chmod, tmp, pool.driver.INSTANCE_MODE)
                await asyncio.to_thread(os.rename, tmp, cache)
                revert.success()
        return cache

    async def _has_reflinks(self, pool) -> bool:
        """Whether the pool's filesystem can share blocks between copies (probed once per pool)."""
        known = self._reflinks.get(pool.name)
        if known is None:
            where = self.cache_root(pool, "x").parent.parent  # the pool's root
            known = self._reflinks[pool.name] = await asyncio.to_thread(can_reflink, where)
        return known

    def _cache_idle_later(self, cache: Path) -> None:
        """(Re)arm the removal of `cache` CACHE_IDLE_S after this launch."""
        old = self._idle.pop(cache, None)
        if old is not None:
            old.cancel()
        self._idle[cache] = asyncio.get_running_loop().call_later(self.CACHE_IDLE_S, self._cache_idle, cache)

    def _cache_idle(self, cache: Path) -> None:
        self._idle.pop(cache, None)
        if self._busy.get(cache):  # in use: look again later
            self._cache_idle_later(cache)
            return
        # One rename on the event loop while no launch uses the cache: a launch starting now finds
        # the whole cache or none. `.tmp-*` names are swept at start-up after a crash.
        doomed = cache.parent / f".tmp-idle-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(cache, doomed)
        except OSError:
            return
        self._spawn(remove_tree(doomed))

    async def drop_image(self, fp: str) -> None:
        """Forget an image on every pool (when it is deleted): its cache, or its image volumes (instances made from them keep their own volumes)."""
        for pool in list(self.storage.pools.values()):
            drv = pool.driver
            try:
                if drv.info.optimized_images:
                    for v in await drv.list_volumes():
                        if v.type is VolumeType.IMAGE and not v.is_snapshot and v.name.startswith(f"{fp}_"):
                            await self._delete_now(pool, v)
                else:
                    # Out of the way in one rename first: a launch of the same image imported
                    # again meanwhile sees the whole cache or none, never a half-removed one.
                    root = self.cache_root(pool, fp)
                    gone = root.parent / f".tmp-drop-{uuid.uuid4().hex[:8]}"
                    try:
                        await asyncio.to_thread(os.rename, root, gone)
                    except FileNotFoundError:
                        continue
                    await remove_tree(gone)
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
    async def _recoverable(self, pool, v: Volume) -> bool:
        """Whether an instance volume no record names may hold an instance `lxd recover` can
        bring back: not a temporary (`.trash-*`, `.tmp-*`, ...) and with a backup.yaml (written
        once the record is committed). One naming another instance whose volume is on the pool
        is a copy's leftover (a copy carries its source's); one naming an instance whose volume
        is missing is kept (a rename cut short). A volume that can't be read is kept."""
        if v.name.startswith("."):
            return False
        drv = pool.driver
        try:
            path = await drv.mount_volume(v)
        except Exception as e:
            log.warning("couldn't mount a volume to check it", extra={"pool": pool.name, "volume": v.name,
                                                                     "err": str(e)})
            return True
        try:
            named = await asyncio.to_thread(_backup_yaml_name, path / "backup.yaml")
        finally:
            try:
                await drv.unmount_volume(v)
            except Exception:
                pass
        if named is None:
            return False
        return named == v.name or not await drv.has_volume(v.renamed(named))

    async def sweep(self, known: Iterable[tuple[str, str]]) -> None:
        """Remove what a crash left behind on every pool: instance volumes no record names
        (half-made creates, `.trash-*` of deletes, `.restore-*` of restores), half-unpacked image
        caches and image volumes, and spare copies of caches made by earlier versions."""
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
                    # Without a record: a leftover only if provably unfinished (a temporary name, or
                    # no backup.yaml naming it: written once the record is committed); otherwise
                    # recoverable data whose rows were lost, kept for `lxd recover`.
                    stale = (v.project, v.name) not in known and not await self._recoverable(pool, v)
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
                    if fp.startswith(".tmp"):  # a dropped image's cache being removed
                        await remove_tree(images / fp)
                        continue
                    for key in _listdir(images / fp):
                        if key.startswith((".tmp", ".spare-")):
                            await remove_tree(images / fp / key)


def _backup_yaml_name(path: Path) -> str | None:
    """The instance a volume's backup.yaml describes (None: no readable backup.yaml)."""
    import yaml

    try:
        with open(path, "rb") as f:
            data = yaml.safe_load(f.read(1 << 20))
    except (OSError, yaml.YAMLError):
        return None
    inst = data.get("container") if isinstance(data, dict) else None
    name = inst.get("name") if isinstance(inst, dict) else None
    return name if isinstance(name, str) and name and "/" not in name else None


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []
