"""The `zfs` driver: volumes are datasets of a zpool (or of a dataset in one), laid out as LXD lays
them out: `<zfs.pool_name>/containers/<name>`, `/custom/<project>_<name>`, `/images/<fingerprint>`
(with a `@readonly` snapshot that instances are cloned from), snapshots `@snapshot-<name>`, and
`<zfs.pool_name>/deleted/<type>/...` for volumes deleted while clones still depend on them.
Filesystem datasets carry `mountpoint=<volume path>` and `canmount=noauto` and are mounted by
`zfs mount` when used.

Pools: on an existing zpool or dataset (`source=<zpool>[/<dataset>]`), on a block device
(`source=/dev/...`), or on a loop file the daemon creates in $LXD_DIR/disks (`size`), which is
imported again (`zpool import -d $LXD_DIR/disks`) at every start.

Copies are clones of a snapshot (`zfs.clone_copy`, default true), or full `zfs send | zfs receive`
copies (`zfs.clone_copy=false`, or when snapshots are copied too, or `rebase`: an incremental send
on top of the image the source came from). Optimised backups are `zfs send` streams stored as
LXD stores them (`backup/container.bin`, `backup/snapshots/<snap>.bin`; custom volumes
`backup/volume.bin`, `backup/volume-snapshots/<snap>.bin`).

Every tool call goes through tools.run; the kernel needs the zfs module.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import BinaryIO

from lxd_daemon.errors import BadRequest, Conflict, LXDError, NotFound
from lxd_daemon.storage.drivers import blockutil as bu
from lxd_daemon.storage.drivers import tools
from lxd_daemon.storage.drivers.base import Driver, Filler
from lxd_daemon.storage.volume import ContentType, DriverInfo, Volume, VolumeType
from lxd_daemon.util.sizes import parse_byte_size

# LXD's defaults on the pool's root dataset.
DEFAULT_PROPERTIES = ("mountpoint=none", "setuid=on", "exec=on", "devices=on", "acltype=posixacl", "xattr=sa")
TYPE_DIRS = ("containers", "virtual-machines", "images", "custom")
INITIAL_DATASETS = ("deleted",) + tuple(x for t in TYPE_DIRS for x in (t, f"deleted/{t}"))
SUBDIRS = tuple(Driver.TYPE_DIR_MODES)
SNAP_PREFIX = "snapshot-"
DEFAULT_BLOCK_SIZE = "10GiB"


class SubsequentSnapshots(BadRequest):
    """Restoring a snapshot that has newer snapshots: zfs can only roll back to the latest one.
    `removable` is true when `zfs.remove_snapshots` allows deleting `snapshots` (newest last):
    the caller deletes them (records and volumes) and restores again, as LXD's backend does."""

    def __init__(self, message: str, snapshots: list[str], removable: bool):
        super().__init__(message)
        self.snapshots = snapshots
        self.removable = removable


def _check_clone_copy(value: str) -> None:
    if value != "rebase":
        bu.check_bool(value)


def _check_size(value: str) -> None:
    if value:
        parse_byte_size(value)


def _check_pool_name(value: str) -> None:
    if value.startswith("/") or value.endswith("/") or "//" in value or "@" in value:
        raise ValueError(f"Invalid zfs pool or dataset name {value!r}")


class ZfsDriver(Driver):
    info = DriverInfo(name="zfs", optimized_images=True, optimized_backups=True, cow_snapshots=True,
                      quota=True, running_quota_resize=True, preserves_inodes=True,
                      migration_types=("ZFS", "RSYNC"))
    pool_keys = {
        "zfs.pool_name": _check_pool_name,
        "zfs.clone_copy": _check_clone_copy,
        "volume.zfs.remove_snapshots": bu.check_bool,
        "volume.zfs.use_refquota": bu.check_bool,
        "volume.size": _check_size,
        "size": _check_size,
    }

    def __init__(self, pool_name: str, mount_path: Path, config: dict[str, str]):
        super().__init__(pool_name, mount_path, config)
        self._usage: dict = {"space": {"used": 0, "total": 0}}

    # -- the driver on this host ---------------------------------------------------------------
    @classmethod
    def available(cls) -> tuple[bool, str]:
        missing = [t for t in ("zfs", "zpool") if not shutil.which(t)]
        if missing:
            return False, f"the zfs tools are not installed ({', '.join(missing)}; Debian package zfsutils-linux)"
        if not Path("/sys/module/zfs").is_dir():
            return False, "the zfs kernel module is not loaded"
        try:
            version = Path("/sys/module/zfs/version").read_text().strip()
        except OSError:
            version = ""
        return True, version.split("-")[0]

    @classmethod
    def validate_pool_config(cls, config: dict[str, str]) -> dict[str, str]:
        for key, value in config.items():
            check = cls.pool_keys.get(key)
            if check is None:
                continue
            try:
                check(value)
            except ValueError as e:
                raise BadRequest(f"Invalid value for storage pool key {key!r}: {e}") from None
        return dict(config)

    def _require_host(self) -> None:
        ok, why = self.available()
        if not ok:
            raise BadRequest(f"The zfs driver can't run on this host: {why}")

    # -- names ---------------------------------------------------------------------------------
    @property
    def root(self) -> str:
        return self.config.get("zfs.pool_name") or self.pool_name

    @property
    def zpool(self) -> str:
        return self.root.split("/", 1)[0]

    def dataset(self, vol: Volume) -> str:
        name = vol.storage_name if vol.type is not VolumeType.IMAGE else vol.parent_name
        if vol.content_type is ContentType.BLOCK and vol.type in (VolumeType.VM, VolumeType.IMAGE):
            name += ".block"
        ds = f"{self.root}/{vol.type.dir_name}/{name}"
        if vol.is_snapshot:
            ds += f"@{SNAP_PREFIX}{vol.snapshot_name}"
        return ds

    def deleted_dataset(self, vol: Volume) -> str:
        name = vol.parent_name if vol.type is VolumeType.IMAGE else str(uuid.uuid4())
        return f"{self.root}/deleted/{vol.type.dir_name}/{name}"

    def _vconf(self, vol: Volume, key: str, default: str = "") -> str:
        return vol.config.get(key) or self.config.get(f"volume.{key}") or default

    def _use_refquota(self, vol: Volume) -> bool:
        return bu.truthy(self._vconf(vol, "zfs.use_refquota"))

    def _loop_path(self) -> Path:
        return bu.loop_file(self.mount_path, self.pool_name)

    # -- tool wrappers -------------------------------------------------------------------------
    async def _exists(self, ds: str) -> bool:
        res = await tools.run("zfs", "get", "-H", "-o", "name", "name", ds, check=False)
        return res.returncode == 0 and res.stdout.strip() == ds

    async def _get(self, ds: str, prop: str) -> str:
        res = await tools.run("zfs", "get", "-H", "-p", "-o", "value", prop, ds, check=False)
        if res.returncode != 0:
            if "does not exist" in res.stderr:
                raise NotFound(f"ZFS dataset {ds!r} does not exist")
            raise tools.ToolError(res)
        return res.stdout.strip()

    async def _set(self, ds: str, *props: str) -> None:
        await self._zfs("set", *props, ds, what=f"Failed to set properties of {ds!r}")

    async def _zfs(self, *args: str, what: str) -> tools.Result:
        try:
            return await tools.run("zfs", *args)
        except tools.ToolError as e:
            msg = e.result.stderr
            if "dataset is busy" in msg or "pool or dataset is busy" in msg:
                raise Conflict(f"{what}: the dataset is in use ({e.message})") from None
            if "dataset already exists" in msg:
                raise Conflict(f"{what}: the dataset already exists") from None
            if "out of space" in msg or "quota exceeded" in msg:
                raise bu.translate(e, what) from None
            raise bu.translate(e, what) from None

    async def _children(self, ds: str) -> list[str]:
        """Everything under `ds` (snapshots as `@name`, descendants as `/path`), as LXD lists them."""
        res = await tools.run("zfs", "get", "-H", "-r", "-o", "name", "name", ds)
        out = []
        for line in res.stdout.splitlines():
            line = line.strip()
            if line and line != ds and line.startswith(ds):
                out.append(line[len(ds):])
        return out

    async def _clones(self, ds: str) -> list[str]:
        res = await tools.run("zfs", "get", "-H", "-p", "-r", "-o", "value", "clones", ds)
        clones = []
        for line in res.stdout.splitlines():
            line = line.strip()
            if line and line != "-":
                clones.extend(c for c in line.split(",") if c)
        return clones

    async def _destroy_recursive(self, ds: str) -> None:
        origin = await self._get(ds, "origin")
        await self._zfs("destroy", "-r", ds, what=f"Failed to delete {ds!r}")
        if origin and origin != "-":
            target = ""
            if origin.startswith(f"{self.root}/deleted"):
                target = origin.split("@", 1)[0]
            elif "@deleted-" in origin or "@copy-" in origin:
                target = origin
            if target and await self._exists(target) and not await self._clones(target):
                await self._destroy_recursive(target)

    # -- pools ---------------------------------------------------------------------------------
    async def create_pool(self) -> None:
        self._require_host()
        cfg = self.config
        cfg.setdefault("volatile.initial_source", cfg.get("source", ""))
        src = cfg.get("source", "")
        loop_path = self._loop_path()
        async with contextlib.AsyncExitStack() as undo:
            if not src or src == str(loop_path):
                cfg["source"] = str(loop_path)
                cfg.setdefault("zfs.pool_name", self.pool_name)
                if "/" in self.root:
                    raise BadRequest("zfs.pool_name can't point to a dataset when source isn't set")
                if not cfg.get("size"):
                    cfg["size"] = f"{bu.default_loop_size(loop_path.parent) // bu.GiB}GiB"
                if loop_path.exists():
                    raise BadRequest(f"Source file location already exists: {loop_path}")
                await asyncio.to_thread(bu.make_sparse_file, loop_path, parse_byte_size(cfg["size"]))
                undo.callback(loop_path.unlink, missing_ok=True)
                await self._zpool_create(str(loop_path))
                undo.push_async_callback(_quiet, "zpool", "destroy", self.zpool)
            elif src.startswith("/"):
                if not bu.is_block_device(src):
                    raise BadRequest(f"Custom loop file locations are not supported: {src!r} is not a block device")
                cfg["size"] = ""
                cfg.setdefault("zfs.pool_name", self.pool_name)
                if "/" in self.root:
                    raise BadRequest("zfs.pool_name can't point to a dataset when source isn't set")
                await self._zpool_create(src)
                undo.push_async_callback(_quiet, "zpool", "destroy", self.zpool)
                cfg["source"] = self.root
            else:
                cfg["size"] = ""
                cfg.setdefault("zfs.pool_name", src)
                if cfg["zfs.pool_name"] != src:
                    raise BadRequest("The source must match zfs.pool_name if specified")
                if "/" in src:
                    if not await self._exists(src):
                        await self._zfs("create", "-o", "mountpoint=none", src, what=f"Failed to create dataset {src!r}")
                        undo.push_async_callback(_quiet, "zfs", "destroy", "-r", src)
                else:
                    await self.mount_pool()
                if await self._children(self.root):
                    raise BadRequest("Provided ZFS pool (or dataset) isn't empty")
            await self._set(self.root, *DEFAULT_PROPERTIES)
            for sub in INITIAL_DATASETS:
                props = ["-o", "mountpoint=none"]
                if sub.endswith("virtual-machines"):
                    props += ["-o", "volmode=none"]
                await self._zfs("create", *props, f"{self.root}/{sub}", what=f"Failed to create dataset {sub!r}")
            if "/" in self.root and src:
                # Our datasets inside a dataset the user brought: remove them on failure.
                undo.push_async_callback(_quiet, "zfs", "destroy", "-r", f"{self.root}/deleted")
            await asyncio.to_thread(self._make_layout)
            undo.pop_all()
        with contextlib.suppress(LXDError):
            await self._refresh_usage()

    async def _zpool_create(self, vdev: str) -> None:
        res = await tools.run("zpool", "create", "-f", "-m", "none", "-O", "compression=on", self.zpool, vdev, check=False)
        if res.returncode != 0:
            if "already exists" in res.stderr or "pool already exists" in res.stderr:
                raise BadRequest(f"A zpool named {self.zpool!r} already exists")
            if "in use" in res.stderr or "is part of" in res.stderr:
                raise BadRequest(f"{vdev} is in use: {res.stderr.strip()}")
            raise LXDError(f"Failed to create the zpool: {res.stderr.strip()}")

    def _make_layout(self) -> None:
        self.mount_path.mkdir(parents=True, exist_ok=True)
        self.make_layout()

    async def delete_pool(self) -> None:
        # The service deletes only pools no instance or volume uses: what is left goes with it.
        if await self._exists(self.root):
            if "/" in self.root:
                await self._zfs("destroy", "-r", self.root, what="Failed to delete the dataset of the pool")
            else:
                res = await tools.run("zpool", "destroy", self.zpool, check=False)
                if res.returncode != 0:
                    if "busy" in res.stderr:
                        raise Conflict(f"The zpool {self.zpool!r} is busy: {res.stderr.strip()}")
                    raise tools.ToolError(res)
        await asyncio.to_thread(bu.remove_tree, self.mount_path)
        self._loop_path().unlink(missing_ok=True)

    async def mount_pool(self) -> bool:
        if await self._exists(self.root):
            await self._sweep()
            await asyncio.to_thread(self._make_layout)
            return False
        if await self._exists(self.zpool):
            raise LXDError(f"ZFS zpool {self.zpool!r} exists but dataset {self.root!r} is missing")
        src = self.config.get("source", "")
        if src.startswith("/") and not src.startswith("/dev/"):
            argv = ("zpool", "import", "-f", "-d", str(bu.disks_dir(self.mount_path)), self.zpool)
        else:
            argv = ("zpool", "import", self.zpool)
        res = await tools.run(*argv, check=False)
        if res.returncode != 0:
            raise LXDError(f"Failed to import the zpool {self.zpool!r}: {res.stderr.strip()}")
        if not await self._exists(self.root):
            raise LXDError(f"ZFS zpool {self.zpool!r} exists but dataset {self.root!r} is missing")
        await self._sweep()
        await asyncio.to_thread(self._make_layout)
        with contextlib.suppress(LXDError):
            await self._refresh_usage()
        return True

    async def _sweep(self) -> None:
        """Temporary snapshots a crash left behind (of a copy, backup or transfer) go, unless a
        copy was cloned from them."""
        for entry in await self._children(self.root):
            ds, _, snap = entry.partition("@")
            if snap.startswith(("copy-", "backup-", "migration-")) and "/deleted/" not in ds:
                name = f"{self.root}{entry}"
                if not await self._clones(name):
                    await _quiet("zfs", "destroy", name)

    async def unmount_pool(self) -> bool:
        if "/" in self.root or not await self._exists(self.root):
            return False
        res = await tools.run("zpool", "export", self.zpool, check=False)
        if res.returncode != 0:
            if "busy" in res.stderr:
                raise Conflict(f"The zpool {self.zpool!r} is busy: {res.stderr.strip()}")
            raise tools.ToolError(res)
        return True

    async def update_pool(self, changed: dict[str, str]) -> None:
        fixed = sorted(k for k in changed if k in ("zfs.pool_name", "source", "size"))
        if fixed:
            raise BadRequest(f"Storage pool keys can't be changed on a zfs pool: {', '.join(fixed)}")

    async def _refresh_usage(self) -> dict:
        res = await tools.run("zfs", "get", "-H", "-p", "-o", "value", "available,used", self.root)
        lines = [ln.strip() for ln in res.stdout.splitlines() if ln.strip()]
        try:
            available, used = int(lines[0]), int(lines[1])
        except (IndexError, ValueError):
            raise LXDError(f"Unexpected output from zfs get: {res.stdout.strip()!r}") from None
        self._usage = {"space": {"used": used, "total": used + available}}
        return self._usage

    def usage(self) -> dict:
        return self._usage

    async def pool_usage(self) -> dict:
        return await self._refresh_usage()

    # -- volumes -------------------------------------------------------------------------------
    async def has_volume(self, vol: Volume) -> bool:
        return await self._exists(self.dataset(vol))

    async def _apply_mount_properties(self, vol: Volume) -> None:
        await self._set(self.dataset(vol), f"mountpoint={self.volume_path(vol)}", "canmount=noauto")

    async def create_volume(self, vol: Volume, filler: Filler | None = None) -> None:
        ds = self.dataset(vol)
        if vol.type is VolumeType.IMAGE and vol.content_type is ContentType.FILESYSTEM:
            deleted = self.deleted_dataset(vol)
            if await self._exists(deleted):
                # The image was deleted while instances still used it: bring it back.
                await asyncio.to_thread(self.make_mountpoint, vol)
                await self._zfs("rename", deleted, ds, what="Failed to restore the cached image volume")
                return
        async with contextlib.AsyncExitStack() as undo:
            if vol.content_type is ContentType.FILESYSTEM:
                await asyncio.to_thread(self.make_mountpoint, vol)
                undo.callback(self.remove_mountpoint, vol)
                await self._zfs("create", "-o", f"mountpoint={self.volume_path(vol)}", "-o", "canmount=noauto", ds,
                                what=f"Failed to create volume {vol.name!r}")
            else:
                size = parse_byte_size(self._vconf(vol, "size", DEFAULT_BLOCK_SIZE))
                await self._zfs("create", "-s", "-V", str(_round_block(size)), "-o", "volmode=none", ds,
                                what=f"Failed to create volume {vol.name!r}")
            undo.push_async_callback(_quiet, "zfs", "destroy", "-r", ds)
            if vol.content_type is ContentType.FILESYSTEM:
                size = self._vconf(vol, "size")
                if size:
                    await self.set_volume_quota(vol, parse_byte_size(size))
                path = await self.mount_volume(vol)
                try:
                    await asyncio.to_thread(os.chmod, path, self.volume_mode(vol))
                    if filler is not None:
                        await filler(path)
                finally:
                    await self.unmount_volume(vol)
            if vol.type is VolumeType.IMAGE:
                await self._zfs("snapshot", f"{ds}@readonly", what="Failed to snapshot the image volume")
            undo.pop_all()

    async def create_volume_from_image(self, vol: Volume, image: Volume) -> None:
        await self.create_volume_from_copy(vol, image)

    async def create_volume_from_copy(self, vol: Volume, src: Volume, *, snapshots: bool = False) -> None:
        ds = self.dataset(vol)
        if await self._exists(ds):
            raise Conflict(f"Volume {vol.name!r} already exists on the pool")
        snaps = await self.list_snapshots(src) if snapshots and not src.is_snapshot else []
        clone_copy = self.config.get("zfs.clone_copy", "")
        full = (clone_copy not in ("", "rebase") and not bu.truthy(clone_copy)) or clone_copy == "rebase" or bool(snaps)
        async with contextlib.AsyncExitStack() as cleanup, contextlib.AsyncExitStack() as undo:
            if vol.content_type is ContentType.FILESYSTEM:
                await asyncio.to_thread(self.make_mountpoint, vol)
                undo.callback(self.remove_mountpoint, vol)
            if src.type is VolumeType.IMAGE:
                src_snap = f"{self.dataset(src)}@readonly"
            elif src.is_snapshot:
                src_snap = self.dataset(src)
            else:
                src_snap = f"{self.dataset(src)}@copy-{uuid.uuid4()}"
                await self._zfs("snapshot", src_snap, what=f"Failed to snapshot {src.name!r} for the copy")
                if full:
                    cleanup.push_async_callback(_quiet, "zfs", "destroy", src_snap)
                else:
                    undo.push_async_callback(_quiet, "zfs", "destroy", src_snap)
            if full:
                if snaps:
                    send = ("zfs", "send", "-R", src_snap)
                elif clone_copy == "rebase":
                    origin = await self._image_origin(self.dataset(src) if not src.is_snapshot else src_snap)
                    send = ("zfs", "send", "-i", origin, src_snap) if origin and origin != src_snap else ("zfs", "send", src_snap)
                else:
                    send = ("zfs", "send", src_snap)
                recv = ("zfs", "receive", "-x", "mountpoint", ds) if vol.content_type is ContentType.FILESYSTEM \
                    else ("zfs", "receive", ds)
                undo.push_async_callback(_quiet, "zfs", "destroy", "-r", ds)
                await pipe(send, recv, what=f"Failed to copy {src.name!r}")
                snap_name = src_snap.split("@", 1)[1]
                await _quiet("zfs", "destroy", f"{ds}@{snap_name}")
                if snaps:
                    keep = {f"@{SNAP_PREFIX}{s}" for s in snaps}
                    for entry in await self._children(ds):
                        if entry.startswith("@") and entry not in keep:
                            await self._zfs("destroy", f"{ds}{entry}", what="Failed to remove an internal snapshot")
                    for s in snaps:
                        await asyncio.to_thread(self.make_mountpoint, vol.snapshot(s))
            else:
                argv = ["clone"]
                if vol.content_type is ContentType.BLOCK:
                    argv += ["-o", "volmode=none"]
                await self._zfs(*argv, src_snap, ds, what=f"Failed to clone {src.name!r}")
                undo.push_async_callback(self._destroy_quiet, ds)
            if vol.content_type is ContentType.FILESYSTEM:
                await self._apply_mount_properties(vol)
            if vol.config.get("size"):
                await self.set_volume_quota(vol, parse_byte_size(vol.config["size"]))
            undo.pop_all()

    async def _destroy_quiet(self, ds: str) -> None:
        with contextlib.suppress(LXDError):
            await self._destroy_recursive(ds)

    async def _image_origin(self, ds: str) -> str:
        """For `zfs.clone_copy=rebase`: the `@readonly` snapshot of the image `ds` descends from."""
        origin = ds
        while True:
            base, _, snap = origin.partition("@")
            if snap == "readonly" and "/images/" in base:
                return origin
            origin = await self._get(origin, "origin")
            if not origin or origin == "-":
                return ""

    async def delete_volume(self, vol: Volume) -> None:
        ds = self.dataset(vol)
        if bu.mounted(self.volume_path(vol)):
            await self.unmount_volume(vol)
        if await self._exists(ds):
            if await self._clones(ds):
                # Instances were cloned from it: keep it, out of the way, until they are gone.
                await self._zfs("rename", ds, self.deleted_dataset(vol), what=f"Failed to delete {vol.name!r}")
            else:
                await self._destroy_recursive(ds)
        await asyncio.to_thread(self.remove_mountpoint, vol)
        snapdir = self.mount_path / vol.type.snapshots_dir_name / vol.storage_name
        await asyncio.to_thread(bu.remove_tree, snapdir)

    async def rename_volume(self, vol: Volume, new_name: str) -> None:
        new = vol.renamed(new_name)
        old_ds, new_ds = self.dataset(vol), self.dataset(new)
        if await self._exists(new_ds):
            raise Conflict(f"Volume {new_name!r} already exists on the pool")
        if bu.mounted(self.volume_path(vol)):
            await self.unmount_volume(vol)
        async with contextlib.AsyncExitStack() as undo:
            old_snapdir = self.mount_path / vol.type.snapshots_dir_name / vol.storage_name
            new_snapdir = self.mount_path / vol.type.snapshots_dir_name / new.storage_name
            if old_snapdir.exists():
                await asyncio.to_thread(os.rename, old_snapdir, new_snapdir)
                undo.callback(os.rename, new_snapdir, old_snapdir)
            if self.volume_path(vol).exists():
                await asyncio.to_thread(os.rename, self.volume_path(vol), self.volume_path(new))
                undo.callback(os.rename, self.volume_path(new), self.volume_path(vol))
            await self._zfs("rename", old_ds, new_ds, what=f"Failed to rename {vol.name!r}")
            undo.push_async_callback(_quiet, "zfs", "rename", new_ds, old_ds)
            if vol.content_type is ContentType.FILESYSTEM:
                await self._set(new_ds, f"mountpoint={self.volume_path(new)}")
            undo.pop_all()

    async def set_volume_quota(self, vol: Volume, size: int | None) -> None:
        ds = self.dataset(vol)
        if vol.content_type is ContentType.BLOCK:
            if not size:
                return
            size = _round_block(size)
            old = int(await self._get(ds, "volsize"))
            if size == old:
                return
            if size < old:
                raise BadRequest("Block volumes cannot be shrunk")
            await self._set(ds, f"volsize={size}")
            return
        key = "refquota" if self._use_refquota(vol) else "quota"
        value = str(size) if size else "none"
        try:
            await tools.run("zfs", "set", f"{key}={value}", ds)
        except tools.ToolError as e:
            if "size is less than current used or reserved space" in e.result.stderr:
                raise BadRequest(f"The volume already uses more than {size} bytes") from None
            raise bu.translate(e, f"Failed to set the size of {vol.name!r}") from None

    async def mount_volume(self, vol: Volume) -> Path:
        path = self.volume_path(vol)
        ds = self.dataset(vol)
        if vol.content_type is ContentType.BLOCK:
            if await self._get(ds, "volmode") != "dev":
                await self._set(ds, "volmode=dev")
            return path
        if bu.mounted(path):
            return path
        await asyncio.to_thread(self.make_mountpoint, vol)
        if vol.is_snapshot:
            # Snapshots can't be mounted through the zfs tool: mount them read-only directly.
            await bu.mount(ds, path, "zfs", "ro")
        else:
            await self._zfs("mount", ds, what=f"Failed to mount {vol.name!r}")
        return path

    async def unmount_volume(self, vol: Volume) -> bool:
        if vol.content_type is ContentType.BLOCK:
            ds = self.dataset(vol)
            if await self._get(ds, "volmode") == "dev":
                await self._set(ds, "volmode=none")
                return True
            return False
        path = self.volume_path(vol)
        if not bu.mounted(path):
            return False
        await bu.umount(path)
        return True

    async def volume_usage(self, vol: Volume) -> int | None:
        key = "used"
        if not vol.is_snapshot and self._use_refquota(vol):
            key = "referenced"
        value = await self._get(self.dataset(vol), key)
        try:
            return int(value)
        except ValueError:
            raise LXDError(f"Unexpected output from zfs get {key}: {value!r}") from None

    async def list_volumes(self) -> list[Volume]:
        res = await tools.run("zfs", "list", "-H", "-o", "name", "-t", "filesystem,volume,snapshot", "-r", self.root)
        out: list[Volume] = []
        prefix = self.root + "/"
        for line in res.stdout.splitlines():
            name = line.strip()
            if not name.startswith(prefix):
                continue
            vol = self._decode(name[len(prefix):])
            if vol is not None:
                out.append(vol)
        return out

    def _decode(self, rel: str) -> Volume | None:
        path, _, snap = rel.partition("@")
        if "/" not in path:
            return None
        tdir, name = path.split("/", 1)
        vtype = {t.dir_name: t for t in VolumeType}.get(tdir)
        if vtype is None or "/" in name:
            return None  # the type datasets themselves, deleted/..., foreign datasets
        if snap and not snap.startswith(SNAP_PREFIX):
            return None  # @readonly, @copy-..., @backup-...: internal
        content = ContentType.FILESYSTEM
        if name.endswith(".block"):
            content, name = ContentType.BLOCK, name[:-len(".block")]
        project = "default"
        if vtype is VolumeType.CUSTOM:
            if "_" not in name:
                return None
            project, name = name.split("_", 1)
        elif vtype is not VolumeType.IMAGE and "_" in name:
            project, name = name.split("_", 1)
        if snap:
            name = f"{name}/{snap[len(SNAP_PREFIX):]}"
        return Volume(self.pool_name, vtype, name, project=project, content_type=content)

    # -- snapshots -----------------------------------------------------------------------------
    async def create_snapshot(self, snap: Volume) -> None:
        if await self._exists(self.dataset(snap)):
            raise Conflict(f"Snapshot {snap.snapshot_name!r} already exists")
        if not await self._exists(self.dataset(snap.parent())):
            raise NotFound(f"Volume {snap.parent_name!r} not found on the pool")
        await asyncio.to_thread(self.make_mountpoint, snap)
        try:
            await self._zfs("snapshot", self.dataset(snap), what=f"Failed to create snapshot {snap.snapshot_name!r}")
        except BaseException:
            await asyncio.to_thread(self.remove_mountpoint, snap)
            raise

    async def delete_snapshot(self, snap: Volume) -> None:
        ds = self.dataset(snap)
        if bu.mounted(self.volume_path(snap)):
            await self.unmount_volume(snap)
        if await self._exists(ds):
            if await self._clones(ds):
                parent = ds.split("@", 1)[0]
                await self._zfs("rename", ds, f"{parent}@deleted-{uuid.uuid4()}", what="Failed to delete the snapshot")
            else:
                await self._zfs("destroy", ds, what=f"Failed to delete snapshot {snap.snapshot_name!r}")
        await asyncio.to_thread(self.remove_mountpoint, snap)

    async def rename_snapshot(self, snap: Volume, new_snapshot_name: str) -> None:
        new = snap.parent().snapshot(new_snapshot_name)
        if bu.mounted(self.volume_path(snap)):
            await self.unmount_volume(snap)
        await self._zfs("rename", self.dataset(snap), self.dataset(new), what="Failed to rename the snapshot")
        old_path, new_path = self.volume_path(snap), self.volume_path(new)
        if old_path.exists():
            await asyncio.to_thread(os.rename, old_path, new_path)

    async def restore_snapshot(self, snap: Volume) -> None:
        vol = snap.parent()
        ds = self.dataset(vol)
        entries = [e for e in await self._children(ds) if e.startswith("@")]
        target = f"@{SNAP_PREFIX}{snap.snapshot_name}"
        if target not in entries:
            raise NotFound(f"Snapshot {snap.snapshot_name!r} not found")
        later = entries[entries.index(target) + 1:]
        internal = [e for e in later if not e.startswith(f"@{SNAP_PREFIX}")]
        if internal:
            raise BadRequest(f"Snapshot {snap.snapshot_name!r} cannot be restored due to subsequent internal "
                             "snapshot(s) (from a copy)")
        newer = [e[len(SNAP_PREFIX) + 1:] for e in later]
        if newer:
            removable = bu.truthy(self._vconf(vol, "zfs.remove_snapshots"))
            msg = f"Snapshot {snap.snapshot_name!r} cannot be restored due to subsequent snapshot(s)"
            if not removable:
                msg += ". Set zfs.remove_snapshots to override"
            raise SubsequentSnapshots(msg, newer, removable)
        await self._zfs("rollback", self.dataset(snap), what=f"Failed to restore snapshot {snap.snapshot_name!r}")

    async def list_snapshots(self, vol: Volume) -> list[str]:
        ds = self.dataset(vol.parent())
        res = await tools.run("zfs", "list", "-H", "-o", "name", "-t", "snapshot", "-s", "createtxg", "-d", "1", ds,
                              check=False)
        if res.returncode != 0:
            if "does not exist" in res.stderr:
                return []
            raise tools.ToolError(res)
        out = []
        for line in res.stdout.splitlines():
            _, _, snap = line.strip().partition("@")
            if snap.startswith(SNAP_PREFIX):
                out.append(snap[len(SNAP_PREFIX):])
        return out

    # -- optimised backups ---------------------------------------------------------------------
    @staticmethod
    def backup_member_names(vol: Volume, snapshots: list[str]) -> tuple[list[str], str]:
        """LXD's member names: (snapshot streams, oldest first; the volume's stream)."""
        custom = vol.type is VolumeType.CUSTOM
        snapdir = "volume-snapshots" if custom else "snapshots"
        main = "backup/volume.bin" if custom else "backup/container.bin"
        return [f"backup/{snapdir}/{s}.bin" for s in snapshots], main

    async def backup_volume_optimized(self, vol: Volume, snapshots: list[str], out: BinaryIO) -> list[str]:
        members = bu.TarMembers(out, self.mount_path.parent.parent / "backups")
        snap_names, main_name = self.backup_member_names(vol, snapshots)
        parent = ""
        for snap, name in zip(snapshots, snap_names, strict=True):
            ds = self.dataset(vol.snapshot(snap))
            argv = ["zfs", "send"] + (["-i", parent] if parent else []) + [ds]
            await members.add_from_tool(name, *argv)
            parent = ds
        tmp = f"{self.dataset(vol)}@backup-{uuid.uuid4()}"
        await self._zfs("snapshot", tmp, what="Failed to snapshot the volume for the backup")
        try:
            argv = ["zfs", "send"] + (["-i", parent] if parent else []) + [tmp]
            await members.add_from_tool(main_name, *argv)
        finally:
            await _quiet("zfs", "destroy", tmp)
        return snap_names + [main_name]

    async def restore_volume_optimized(self, vol: Volume, snapshots: list[str],
                                       member: Callable[[str], BinaryIO]) -> None:
        ds = self.dataset(vol)
        if await self._exists(ds):
            raise Conflict(f"Cannot restore volume {vol.name!r}, it already exists on the pool")
        snap_names, main_name = self.backup_member_names(vol, snapshots)
        recv = ["zfs", "receive", "-x", "mountpoint", "-F"] if vol.content_type is ContentType.FILESYSTEM \
            else ["zfs", "receive", "-F"]
        async with contextlib.AsyncExitStack() as undo:
            undo.push_async_callback(_quiet, "zfs", "destroy", "-r", ds)
            undo.callback(bu.remove_tree, self.mount_path / vol.type.snapshots_dir_name / vol.storage_name)
            # The volume's stream is incremental on the last snapshot's: receive every snapshot the
            # backup holds (when the tarball can be listed), keep only those asked for.
            present = _snapshot_members(member, snap_names, main_name)
            for snap, name in present or list(zip(snapshots, snap_names, strict=True)):
                await self._receive(member(name), *recv, f"{ds}@{SNAP_PREFIX}{snap}")
            await self._receive(member(main_name), *recv, ds)
            keep = {f"@{SNAP_PREFIX}{s}" for s in snapshots}
            for entry in await self._children(ds):
                if entry.startswith("@") and entry not in keep:
                    await self._zfs("destroy", f"{ds}{entry}", what="Failed to remove a snapshot")
            for snap in snapshots:
                await asyncio.to_thread(self.make_mountpoint, vol.snapshot(snap))
            if vol.content_type is ContentType.FILESYSTEM:
                await asyncio.to_thread(self.make_mountpoint, vol)
                undo.callback(self.remove_mountpoint, vol)
                await self._apply_mount_properties(vol)
            undo.pop_all()

    async def _receive(self, stream: BinaryIO, *argv: str) -> None:
        try:
            await tools.run_stream(*argv, source=bu.file_chunks(stream))
        except tools.ToolError as e:
            if "invalid backup stream" in e.result.stderr or "checksum mismatch" in e.result.stderr:
                raise BadRequest(f"The backup's zfs stream is corrupt: {e.result.stderr.strip()}") from None
            raise bu.translate(e, "Failed to receive the zfs stream") from None
        finally:
            with contextlib.suppress(Exception):
                stream.close()

    # -- migration -----------------------------------------------------------------------------
    async def send_volume(self, vol: Volume, snapshots: list[str], transport: str,
                          write: Callable[[bytes], Awaitable[None]]) -> None:
        """One replication stream (`zfs send -R`) of a temporary snapshot: the volume with every
        snapshot; the receiver keeps only `snapshots`."""
        if transport != "ZFS":
            raise BadRequest(f"The zfs driver can't send volumes as {transport!r}")
        tmp = f"{self.dataset(vol)}@migration-{uuid.uuid4()}"
        await self._zfs("snapshot", tmp, what="Failed to snapshot the volume for the transfer")
        try:
            await tools.run_stream("zfs", "send", "-R", tmp, sink=write)
        finally:
            await _quiet("zfs", "destroy", tmp)

    async def receive_volume(self, vol: Volume, snapshots: list[str], transport: str,
                             chunks: AsyncIterator[bytes]) -> None:
        if transport != "ZFS":
            raise BadRequest(f"The zfs driver can't receive volumes as {transport!r}")
        ds = self.dataset(vol)
        if await self._exists(ds):
            raise Conflict(f"Volume {vol.name!r} already exists on the pool")
        async with contextlib.AsyncExitStack() as undo:
            undo.push_async_callback(_quiet, "zfs", "destroy", "-r", ds)
            try:
                await tools.run_stream("zfs", "receive", "-x", "mountpoint", "-F", "-u", ds, source=chunks)
            except tools.ToolError as e:
                raise bu.translate(e, "Failed to receive the zfs stream") from None
            keep = {f"@{SNAP_PREFIX}{s}" for s in snapshots}
            for entry in await self._children(ds):
                if entry.startswith("@") and entry not in keep:
                    await self._zfs("destroy", f"{ds}{entry}", what="Failed to remove a snapshot")
            for s in snapshots:
                await asyncio.to_thread(self.make_mountpoint, vol.snapshot(s))
            if vol.content_type is ContentType.FILESYSTEM:
                await asyncio.to_thread(self.make_mountpoint, vol)
                undo.callback(self.remove_mountpoint, vol)
                await self._apply_mount_properties(vol)
            undo.pop_all()


def _snapshot_members(member: Callable[[str], BinaryIO], wanted: list[str], main_name: str) -> list[tuple[str, str]]:
    """(snapshot, member name) of every snapshot stream in the tarball, in its order, when
    `member` is a TarFile's extractfile (else [] and only the wanted ones are received)."""
    tar = getattr(member, "__self__", None)
    if tar is None or not hasattr(tar, "getnames"):
        return []
    prefix = wanted[0].rsplit("/", 1)[0] + "/" if wanted else \
        main_name.replace("container.bin", "snapshots/").replace("volume.bin", "volume-snapshots/")
    out = []
    for name in tar.getnames():
        if name.startswith(prefix) and name.endswith(".bin") and "/" not in name[len(prefix):]:
            out.append((name[len(prefix):-len(".bin")], name))
    return out


def _round_block(size: int) -> int:
    """zvol sizes are whole multiples of 8 KiB (LXD rounds block files the same way)."""
    block = 8192
    return max(block, (size + block - 1) // block * block)


async def _quiet(*argv: str) -> None:
    await tools.run(*argv, check=False)


async def pipe(send: tuple[str, ...], recv: tuple[str, ...], *, what: str) -> None:
    """`send | recv`, both through tools.run_stream; either failing stops the other."""
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=16)

    async def sink(chunk: bytes) -> None:
        await queue.put(chunk)

    async def source() -> AsyncIterator[bytes]:
        while (chunk := await queue.get()) is not None:
            yield chunk

    async def sender() -> None:
        try:
            await tools.run_stream(*send, sink=sink)
        except BaseException:
            # The receiver is cancelled (or already gone): never block on a full queue here.
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)
            raise
        await queue.put(None)

    send_task = asyncio.ensure_future(sender())
    recv_task = asyncio.ensure_future(tools.run_stream(*recv, source=source()))
    try:
        await asyncio.wait([send_task, recv_task], return_when=asyncio.FIRST_COMPLETED)
        if recv_task.done() and not send_task.done():
            # The receiver ended before the stream did: stop the sender.
            send_task.cancel()
        elif send_task.done() and send_task.exception() is not None:
            recv_task.cancel()
        await asyncio.gather(send_task, recv_task, return_exceptions=True)
        for t in (recv_task, send_task):
            if t.cancelled():
                continue
            exc = t.exception()
            if exc is not None:
                if isinstance(exc, tools.ToolError):
                    raise bu.translate(exc, what) from None
                raise exc
        if send_task.cancelled():
            raise LXDError(f"{what}: {recv[0]} {recv[1]} ended before the end of the stream")
    finally:
        for t in (send_task, recv_task):
            if not t.done():
                t.cancel()
