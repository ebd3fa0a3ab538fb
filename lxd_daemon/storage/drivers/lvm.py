"""The `lvm` driver: volumes are logical volumes of a volume group, thin volumes of a thin pool by
default (`lvm.use_thinpool`), each holding an ext4 or xfs filesystem mounted at volume_path().

Pools: on an existing volume group (`source=<vg>`), on a block device turned into one
(`source=/dev/...`), or on a loop file the daemon creates in $LXD_DIR/disks (`size`), attached
again at every start. Logical volumes are named as LXD names them: `<type dir>_<name>` with every
`-` of the name doubled and the snapshot delimiter written as a single `-` (`containers_c1`,
`containers_web--1-snap0`, `custom_default_data`, `images_<fingerprint>`), `.block` appended
for block volumes. The volume group carries the tag `lxd_pool` while a pool uses it.

Instances are made from image volumes by thin snapshots (no copy); without a thin pool the image
is copied with rsync. Snapshots are LVM snapshots (read-only); restore swaps in a writable
snapshot of the snapshot on thin pools, as LXD does, and rsyncs on thick pools.

Every tool call goes through tools.run; the kernel needs device-mapper.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import math
import os
import re
import shutil
from dataclasses import replace
from pathlib import Path

from lxd_daemon.errors import BadRequest, Conflict, LXDError, NotFound
from lxd_daemon.storage.drivers import blockutil as bu
from lxd_daemon.storage.drivers import tools
from lxd_daemon.storage.drivers.base import Driver, Filler
from lxd_daemon.storage.volume import ContentType, DriverInfo, Volume, VolumeType
from lxd_daemon.util.sizes import parse_byte_size

VG_TAG = "lxd_pool"
DEFAULT_THINPOOL = "LXDThinPool"
DEFAULT_VOLUME_SIZE = "10GiB"  # LXD 5.0's default size of block-backed volumes
TMP_SUFFIX = ".lxdtmp"
BLOCK_SUFFIX = ".block"
TYPE_PREFIXES = {t.dir_name: t for t in VolumeType}
NOT_FOUND_EXIT = 5  # what the LVM tools exit with when the named object does not exist
SUBDIRS = tuple(Driver.TYPE_DIR_MODES)
RSYNC = ("rsync", "-a", "-HAX", "--sparse", "--devices", "--delete", "--numeric-ids")


def _check_fs(value: str) -> None:
    if value and value not in bu.BLOCK_FILESYSTEMS:
        raise ValueError(f"Invalid filesystem {value!r} (one of {', '.join(bu.BLOCK_FILESYSTEMS)})")


def _check_size(value: str) -> None:
    if value:
        parse_byte_size(value)


def _check_uint(value: str) -> None:
    if value and not value.isdigit():
        raise ValueError(f"Invalid value {value!r}: not a whole number")


def escape(name: str) -> str:
    """A volume name (`c1`, `c1/snap0`) as it appears in an LV name."""
    return name.replace("-", "--").replace("/", "-")


def unescape(lv_part: str) -> str:
    """The inverse of escape(): `--` is a hyphen, a single `-` the snapshot delimiter."""
    out: list[str] = []
    i = 0
    while i < len(lv_part):
        c = lv_part[i]
        if c == "-":
            if lv_part[i + 1:i + 2] == "-":
                out.append("-")
                i += 2
                continue
            out.append("/")
        else:
            out.append(c)
        i += 1
    return "".join(out)


def lv_name(vol: Volume) -> str:
    """LXD's logical volume name for a volume or snapshot."""
    name = vol.storage_name
    if vol.is_snapshot:
        name = f"{name}/{vol.snapshot_name}"
    suffix = BLOCK_SUFFIX if vol.content_type is ContentType.BLOCK else ""
    return f"{vol.type.dir_name}_{escape(name)}{suffix}"


def parse_snapshot(parent_lv: str, candidate: str) -> str:
    """The snapshot name if LV `candidate` is a snapshot of the LV `parent_lv`, else ""."""
    block = parent_lv.endswith(BLOCK_SUFFIX)
    if block:
        if not candidate.endswith(BLOCK_SUFFIX):
            return ""
        parent_lv, candidate = parent_lv[:-len(BLOCK_SUFFIX)], candidate[:-len(BLOCK_SUFFIX)]
    elif candidate.endswith(BLOCK_SUFFIX):
        return ""
    prefix = parent_lv + "-"
    if candidate.startswith(prefix) and not candidate.startswith(parent_lv + "--"):
        rest = candidate[len(prefix):]
        if rest.endswith(TMP_SUFFIX):
            return ""
        return rest.replace("--", "-")
    return ""


def _parse_fields(stdout: str, n: int, what: str) -> list[str]:
    line = next((ln for ln in stdout.splitlines() if ln.strip()), "")
    parts = [p.strip() for p in line.strip().split(",")]
    if len(parts) < n:
        raise LXDError(f"Unexpected output from {what}: {stdout.strip()!r}")
    return parts


def _parse_int(value: str, what: str) -> int:
    try:
        return int(float(value.strip()))
    except ValueError:
        raise LXDError(f"Unexpected output from {what}: {value.strip()!r}") from None


def _not_found(res: tools.Result) -> bool:
    return res.returncode == NOT_FOUND_EXIT or "not found" in res.stderr.lower() \
        or "failed to find" in res.stderr.lower()


class LvmDriver(Driver):
    info = DriverInfo(name="lvm", optimized_images=True, cow_snapshots=True, quota=True,
                      running_quota_resize=True, block_backed=True,
                      volume_types=frozenset({VolumeType.CONTAINER, VolumeType.IMAGE, VolumeType.CUSTOM}))
    pool_keys = {
        "lvm.vg_name": lambda v: None,
        "lvm.thinpool_name": lambda v: None,
        "lvm.use_thinpool": bu.check_bool,
        "lvm.vg.force_reuse": bu.check_bool,
        "volume.block.filesystem": _check_fs,
        "volume.block.mount_options": lambda v: None,
        "volume.lvm.stripes": _check_uint,
        "volume.lvm.stripes.size": _check_size,
        "volume.size": _check_size,
        "size": _check_size,
    }

    def __init__(self, pool_name: str, mount_path: Path, config: dict[str, str]):
        super().__init__(pool_name, mount_path, config)
        # Only thin pools make instances and snapshots by copy-on-write.
        thin = self.uses_thinpool
        self.info = replace(type(self).info, optimized_images=thin, cow_snapshots=thin)
        self._usage: dict = {"space": {"used": 0, "total": 0}}

    # -- the driver on this host ---------------------------------------------------------------
    @classmethod
    def available(cls) -> tuple[bool, str]:
        if not shutil.which("lvm"):
            return False, "the lvm tools are not installed (Debian package lvm2)"
        try:
            devices = Path("/proc/devices").read_text()
        except OSError:
            devices = ""
        if not re.search(r"^\s*\d+\s+device-mapper$", devices, re.M):
            return False, "no device-mapper support in the kernel"
        return True, _lvm_version()

    @classmethod
    def validate_pool_config(cls, config: dict[str, str]) -> dict[str, str]:
        out = dict(config)
        for key, value in config.items():
            check = cls.pool_keys.get(key)
            if check is None:
                continue
            try:
                check(value)
            except ValueError as e:
                raise BadRequest(f"Invalid value for storage pool key {key!r}: {e}") from None
        if "lvm.use_thinpool" in config and not bu.truthy(config["lvm.use_thinpool"]) \
                and config.get("lvm.thinpool_name"):
            raise BadRequest("The key lvm.use_thinpool cannot be set to false when lvm.thinpool_name is set")
        return out

    def _require_host(self) -> None:
        ok, why = self.available()
        if not ok:
            raise BadRequest(f"The lvm driver can't run on this host: {why}")

    # -- config ----------------------------------------------------------------------------------
    @property
    def uses_thinpool(self) -> bool:
        v = self.config.get("lvm.use_thinpool", "")
        return True if v == "" else bu.truthy(v)

    @property
    def vg(self) -> str:
        return self.config.get("lvm.vg_name") or self.pool_name

    @property
    def thinpool(self) -> str:
        return self.config.get("lvm.thinpool_name") or DEFAULT_THINPOOL

    def _loop_path(self) -> Path:
        return bu.loop_file(self.mount_path, self.pool_name)

    def _loop_backed(self) -> bool:
        src = self.config.get("source", "")
        return src.startswith("/") and not src.startswith("/dev/")

    def _vconf(self, vol: Volume, key: str, default: str = "") -> str:
        return vol.config.get(key) or self.config.get(f"volume.{key}") or default

    def fs(self, vol: Volume) -> str:
        return self._vconf(vol, "block.filesystem", "ext4")

    def mount_options(self, vol: Volume) -> str:
        return self._vconf(vol, "block.mount_options", "discard")

    def size_of(self, vol: Volume) -> int:
        return _round512(parse_byte_size(self._vconf(vol, "size", DEFAULT_VOLUME_SIZE)))

    def dev(self, vol: Volume) -> str:
        return f"/dev/{self.vg}/{lv_name(vol)}"

    def _dev_named(self, lv: str) -> str:
        return f"/dev/{self.vg}/{lv}"

    # -- tool wrappers -------------------------------------------------------------------------
    async def _vg_exists(self) -> tuple[bool, list[str]]:
        res = await tools.run("vgs", "--noheadings", "-o", "vg_tags", self.vg, check=False)
        if res.returncode != 0:
            if _not_found(res):
                return False, []
            raise bu.translate(tools.ToolError(res), f"Error checking for LVM volume group {self.vg!r}")
        tags = [t.strip() for t in res.stdout.strip().split(",") if t.strip()]
        return True, tags

    async def _pv_exists(self, pv: str) -> bool:
        res = await tools.run("pvs", "--noheadings", "-o", "pv_name", pv, check=False)
        if res.returncode != 0:
            if _not_found(res):
                return False
            raise bu.translate(tools.ToolError(res), f"Error checking for LVM physical volume {pv!r}")
        return True

    async def _lv_count(self) -> int:
        res = await tools.run("vgs", "--noheadings", "-o", "lv_count", self.vg)
        return _parse_int(res.stdout, "vgs")

    async def _thin_count(self) -> int | None:
        res = await tools.run("lvs", "--noheadings", "-o", "thin_count", f"{self.vg}/{self.thinpool}", check=False)
        if res.returncode != 0:
            if _not_found(res):
                return None
            raise tools.ToolError(res)
        return _parse_int(res.stdout, "lvs")

    async def _thinpool_exists(self) -> bool:
        res = await tools.run("lvs", "--noheadings", "-o", "lv_attr", f"{self.vg}/{self.thinpool}", check=False)
        if res.returncode != 0:
            if _not_found(res):
                return False
            raise tools.ToolError(res)
        if res.stdout.strip().startswith("t"):
            return True
        raise BadRequest(f"LVM volume named {self.thinpool!r} exists but is not a thin pool")

    async def _lv_exists(self, dev: str) -> bool:
        res = await tools.run("lvs", "--noheadings", "-o", "lv_name", dev, check=False)
        if res.returncode != 0:
            if _not_found(res):
                return False
            raise tools.ToolError(res)
        return True

    async def _lv_size(self, dev: str) -> int:
        res = await tools.run("lvs", "--noheadings", "--nosuffix", "--units", "b", "-o", "lv_size", dev, check=False)
        if res.returncode != 0:
            if _not_found(res):
                raise NotFound(f"LVM logical volume {dev} not found")
            raise tools.ToolError(res)
        return _parse_int(res.stdout, "lvs")

    async def _extent_size(self) -> int:
        res = await tools.run("vgs", "--noheadings", "--nosuffix", "--units", "b", "-o", "vg_extent_size", self.vg)
        return _parse_int(res.stdout, "vgs")

    async def _lvremove(self, dev: str, missing_ok: bool = True) -> None:
        res = await tools.run("lvremove", "-f", dev, check=False)
        if res.returncode != 0 and not (missing_ok and _not_found(res)):
            raise bu.translate(tools.ToolError(res), f"Error removing LVM logical volume {dev!r}")

    async def _lvrename(self, old: str, new: str) -> None:
        await tools.run("lvrename", old, new)

    async def _activate(self, dev: str) -> bool:
        if os.path.exists(dev):
            return False
        await tools.run("lvchange", "--activate", "y", "--ignoreactivationskip", dev)
        return True

    async def _deactivate(self, dev: str) -> None:
        await tools.run("lvchange", "--activate", "n", "--ignoreactivationskip", dev, check=False)

    async def _lvcreate_snapshot(self, src_dev: str, lv: str, *, readonly: bool, size: int | None = None) -> None:
        argv = ["lvcreate", "-n", lv, "-s", src_dev, "--setactivationskip", "y"]
        if not self.uses_thinpool:
            argv += ["--size", f"{size or 0}b"]
        argv.append("-pr" if readonly else "-prw")
        try:
            await tools.run(*argv)
        except tools.ToolError as e:
            raise bu.translate(e, f"Error creating LVM logical volume snapshot {lv!r}") from None

    async def _regenerate_uuid(self, vol: Volume, dev: str) -> None:
        # Snapshots share the filesystem UUID of their origin; xfs refuses to mount two at once.
        if self.fs(vol) == "xfs":
            await self._activate(dev)
            res = await tools.run("xfs_admin", "-U", "generate", dev)
            if res.stdout.strip():
                await tools.run("xfs_repair", "-o", "force_geometry", "-L", dev)
                await tools.run("xfs_admin", "-U", "generate", dev)

    # -- pools ---------------------------------------------------------------------------------
    async def create_pool(self) -> None:
        self._require_host()
        cfg = self.config
        cfg.setdefault("volatile.initial_source", cfg.get("source", ""))
        src = cfg.get("source", "")
        loop_path = self._loop_path()
        async with contextlib.AsyncExitStack() as undo:
            pv = ""
            pv_exists = vg_exists = False
            tags: list[str] = []
            if not src or src == str(loop_path):
                cfg["source"] = str(loop_path)
                cfg.setdefault("lvm.vg_name", self.pool_name)
                if not cfg.get("size"):
                    cfg["size"] = f"{bu.default_loop_size(loop_path.parent) // bu.GiB}GiB"
                if loop_path.exists():
                    raise BadRequest(f"Source file location already exists: {loop_path}")
                await asyncio.to_thread(bu.make_sparse_file, loop_path, parse_byte_size(cfg["size"]))
                undo.callback(loop_path.unlink, missing_ok=True)
                pv = await bu.attach_loop(loop_path)
                undo.push_async_callback(bu.detach_loop, loop_path)
                pv_exists = await self._pv_exists(pv)
                vg_exists, tags = await self._vg_exists()
            elif src.startswith("/"):
                if not bu.is_block_device(src):
                    raise BadRequest(f"Custom loop file locations are not supported: {src!r} is not a block device")
                cfg["size"] = ""
                cfg.setdefault("lvm.vg_name", self.pool_name)
                cfg["source"] = cfg["lvm.vg_name"]
                vg_exists, tags = await self._vg_exists()
                if vg_exists:
                    raise BadRequest(f"Volume group already exists, cannot use new physical device at {src!r}")
                pv = src
                pv_exists = await self._pv_exists(pv)
            else:
                cfg["size"] = ""
                if cfg.get("lvm.vg_name") and cfg["lvm.vg_name"] != src:
                    raise BadRequest("Invalid combination of source and lvm.vg_name properties")
                cfg["lvm.vg_name"] = src
                pv_exists = True
                vg_exists, tags = await self._vg_exists()
                if not vg_exists:
                    raise BadRequest(f"The requested volume group {src!r} does not exist")

            thin_exists = False
            if vg_exists:
                count = await self._lv_count()
                empty = count == 0
                if count > 0 and self.uses_thinpool:
                    thin_exists = await self._thinpool_exists()
                    empty = thin_exists and count == 1
                if not bu.truthy(cfg.get("lvm.vg.force_reuse")):
                    if not empty:
                        raise BadRequest(f"Volume group {self.vg!r} is not empty")
                    if VG_TAG in tags:
                        raise BadRequest(f"Volume group {self.vg!r} is already used by LXD")
            else:
                if not pv_exists:
                    await tools.run("pvcreate", pv)
                    undo.push_async_callback(_quiet, "pvremove", pv)
                await tools.run("vgcreate", self.vg, pv)
                undo.push_async_callback(_quiet, "vgremove", "-f", self.vg)

            if self.uses_thinpool and not thin_exists:
                argv = ["lvcreate", "--yes", "--wipesignatures", "y", "--poolmetadatasize", "1G",
                        "--thinpool", f"{self.vg}/{self.thinpool}", "--extents", "100%FREE"]
                if cfg.get("volume.lvm.stripes"):
                    argv += ["--stripes", cfg["volume.lvm.stripes"]]
                    if cfg.get("volume.lvm.stripes.size"):
                        argv += ["--stripesize", f"{_round512(parse_byte_size(cfg['volume.lvm.stripes.size']))}b"]
                try:
                    await tools.run(*argv)
                except tools.ToolError as e:
                    raise bu.translate(e, f"Error creating LVM thin pool named {self.thinpool!r}") from None
                undo.push_async_callback(self._lvremove, self._dev_named(self.thinpool))

            await tools.run("vgchange", "--addtag", VG_TAG, self.vg)
            await asyncio.to_thread(self._make_layout)
            undo.pop_all()
        await self._refresh_usage()

    def _make_layout(self) -> None:
        self.mount_path.mkdir(parents=True, exist_ok=True)
        self.make_layout()

    async def delete_pool(self) -> None:
        loop_path = Path(self.config["source"]) if self._loop_backed() else None
        if loop_path is not None and loop_path.exists():
            await bu.attach_loop(loop_path)
        vg_exists, tags = await self._vg_exists()
        remove_vg = False
        ours = loop_path is not None or self.config.get("volatile.initial_source", "").startswith("/dev/")
        if vg_exists and ours:
            remove_vg = True  # a volume group the daemon made: goes with everything in it
            await tools.run("vgremove", "-f", self.vg)
        elif vg_exists and not bu.truthy(self.config.get("lvm.vg.force_reuse")):
            count = await self._lv_count()
            if count == 0:
                remove_vg = True
            elif self.uses_thinpool:
                thin = await self._thin_count()
                if thin == 0 and count == 1:
                    remove_vg = True
                elif thin == 0:
                    await self._lvremove(self._dev_named(self.thinpool))
            if remove_vg:
                await tools.run("vgremove", "-f", self.vg)
        if vg_exists and not remove_vg and VG_TAG in tags:
            await tools.run("vgchange", "--deltag", VG_TAG, self.vg)
        if loop_path is not None and (remove_vg or not vg_exists):
            dev = await bu.find_loop(loop_path)
            if dev and remove_vg:
                await _quiet("pvremove", "-f", dev)
            await bu.detach_loop(loop_path)
            loop_path.unlink(missing_ok=True)
        await asyncio.to_thread(bu.remove_tree, self.mount_path)

    async def mount_pool(self) -> bool:
        if not self.config.get("lvm.vg_name"):
            raise LXDError("Cannot mount pool as \"lvm.vg_name\" is not specified")
        mounted = False
        if self._loop_backed() and not Path(f"/dev/{self.vg}").is_dir():
            loop_path = Path(self.config["source"])
            if not loop_path.exists():
                raise LXDError(f"The loop file of storage pool {self.pool_name!r} is missing: {loop_path}")
            await bu.attach_loop(loop_path)
            mounted = True
        if (await self._vg_exists())[0]:
            await self._sweep()
        await asyncio.to_thread(self._make_layout)
        with contextlib.suppress(LXDError):
            await self._refresh_usage()
        return mounted

    async def _sweep(self) -> None:
        """After a crash in a restore: a `.lxdtmp` LV is the original volume, renamed away. With
        the new volume in place it goes; without it, it is put back."""
        names = await self._lv_names()
        for lv in names:
            if not lv.endswith(TMP_SUFFIX) or self._decode(lv[:-len(TMP_SUFFIX)]) is None:
                continue
            base = lv[:-len(TMP_SUFFIX)]
            if base in names:
                await self._lvremove(self._dev_named(lv))
            else:
                await self._lvrename(self._dev_named(lv), self._dev_named(base))

    async def unmount_pool(self) -> bool:
        if not self._loop_backed():
            return False
        vg_exists, _ = await self._vg_exists()
        if vg_exists:
            await tools.run("vgchange", "-an", self.vg)
        await bu.detach_loop(Path(self.config["source"]))
        return True

    async def update_pool(self, changed: dict[str, str]) -> None:
        if "lvm.use_thinpool" in changed:
            raise BadRequest("lvm.use_thinpool cannot be changed")
        if self.uses_thinpool and ("volume.lvm.stripes" in changed or "volume.lvm.stripes.size" in changed):
            raise BadRequest("volume.lvm.stripes cannot be changed when using thin pool")
        if "size" in changed or "source" in changed:
            raise BadRequest(f"Storage pool keys can't be changed on an lvm pool: "
                             f"{', '.join(sorted(k for k in changed if k in ('size', 'source')))}")
        if changed.get("lvm.vg_name"):
            await tools.run("vgrename", self.vg, changed["lvm.vg_name"])
        if changed.get("lvm.thinpool_name"):
            await tools.run("lvrename", self.vg, self.thinpool, changed["lvm.thinpool_name"])

    async def _refresh_usage(self) -> dict:
        if self.uses_thinpool:
            res = await tools.run("lvs", self._dev_named(self.thinpool), "--noheadings", "--units", "b", "--nosuffix",
                                  "--separator", ",", "-o", "lv_size,data_percent,metadata_percent")
            size, data, meta = _parse_fields(res.stdout, 3, "lvs")
            total = _parse_int(size, "lvs")
            used = int(total * ((float(data or 0) + float(meta or 0)) / 100))
        else:
            res = await tools.run("vgs", self.vg, "--noheadings", "--units", "b", "--nosuffix",
                                  "--separator", ",", "-o", "vg_size,vg_free")
            size, free = _parse_fields(res.stdout, 2, "vgs")
            total = _parse_int(size, "vgs")
            used = total - _parse_int(free, "vgs")
        self._usage = {"space": {"used": used, "total": total}}
        return self._usage

    def usage(self) -> dict:
        return self._usage

    async def pool_usage(self) -> dict:
        return await self._refresh_usage()

    # -- volumes -------------------------------------------------------------------------------
    async def has_volume(self, vol: Volume) -> bool:
        return await self._lv_exists(self.dev(vol))

    async def _lvcreate(self, vol: Volume, size: int) -> None:
        lv = lv_name(vol)
        argv = ["lvcreate", "--name", lv, "--yes", "--wipesignatures", "y"]
        if self.uses_thinpool:
            argv += ["--thin", "--virtualsize", f"{size}b", f"{self.vg}/{self.thinpool}"]
        else:
            argv += ["--size", f"{size}b", self.vg]
            stripes = self._vconf(vol, "lvm.stripes")
            if stripes:
                argv += ["--stripes", stripes]
        try:
            await tools.run(*argv)
        except tools.ToolError as e:
            if "already exists" in e.result.stderr:
                raise Conflict(f"LVM logical volume {lv!r} already exists") from None
            raise bu.translate(e, f"Error creating LVM logical volume {lv!r}") from None

    async def create_volume(self, vol: Volume, filler: Filler | None = None) -> None:
        dev = self.dev(vol)
        async with contextlib.AsyncExitStack() as undo:
            await self._lvcreate(vol, self.size_of(vol))
            undo.push_async_callback(self._lvremove, dev)
            if vol.content_type is ContentType.FILESYSTEM:
                await bu.mkfs(dev, self.fs(vol))
            await tools.run("lvchange", "--setactivationskip", "y", dev)
            if vol.content_type is ContentType.FILESYSTEM:
                await asyncio.to_thread(self.make_mountpoint, vol)
                undo.callback(self.remove_mountpoint, vol)
                path = await self.mount_volume(vol)
                try:
                    await asyncio.to_thread(os.chmod, path, self.volume_mode(vol))
                    if filler is not None:
                        await filler(path)
                finally:
                    await self.unmount_volume(vol)
            undo.pop_all()

    async def create_volume_from_image(self, vol: Volume, image: Volume) -> None:
        if not self.uses_thinpool:
            return await self.create_volume_from_copy(vol, image)
        await self._copy_thin(vol, image, [])

    async def create_volume_from_copy(self, vol: Volume, src: Volume, *, snapshots: bool = False) -> None:
        snaps = await self.list_snapshots(src) if snapshots and not src.is_snapshot else []
        if self.uses_thinpool:
            return await self._copy_thin(vol, src, snaps)
        await self._copy_rsync(vol, src, snaps)

    async def _copy_thin(self, vol: Volume, src: Volume, snaps: list[str]) -> None:
        async with contextlib.AsyncExitStack() as undo:
            for snap in snaps:
                new_snap = vol.snapshot(snap)
                if await self._lv_exists(self.dev(new_snap)):
                    raise Conflict(f"LVM snapshot volume already exists {new_snap.name!r}")
                await asyncio.to_thread(self.make_mountpoint, new_snap)
                undo.callback(self.remove_mountpoint, new_snap)
                await self._lvcreate_snapshot(self.dev(src.snapshot(snap)), lv_name(new_snap), readonly=True)
                undo.push_async_callback(self._lvremove, self.dev(new_snap))
            if await self._lv_exists(self.dev(vol)):
                raise Conflict(f"LVM volume already exists {vol.name!r}")
            await self._lvcreate_snapshot(self.dev(src), lv_name(vol), readonly=False)
            undo.push_async_callback(self._lvremove, self.dev(vol))
            if vol.content_type is ContentType.FILESYSTEM:
                await asyncio.to_thread(self.make_mountpoint, vol)
                undo.callback(self.remove_mountpoint, vol)
                await self._regenerate_uuid(vol, self.dev(vol))
            if vol.config.get("size"):
                await self.set_volume_quota(vol, parse_byte_size(vol.config["size"]))
            undo.pop_all()

    async def _copy_rsync(self, vol: Volume, src: Volume, snaps: list[str]) -> None:
        async with contextlib.AsyncExitStack() as undo:
            await self.create_volume(vol)
            undo.push_async_callback(self._delete_all, vol)
            for snap in snaps:
                await self._rsync_into(src.snapshot(snap), vol)
                await self.create_snapshot(vol.snapshot(snap))
            await self._rsync_into(src, vol)
            undo.pop_all()

    async def _delete_all(self, vol: Volume) -> None:
        for snap in await self.list_snapshots(vol):
            await self.delete_snapshot(vol.snapshot(snap))
        await self.delete_volume(vol)

    async def _rsync_into(self, src: Volume, dst: Volume) -> None:
        src_was = bu.mounted(self.volume_path(src))
        dst_was = bu.mounted(self.volume_path(dst))
        s = await self.mount_volume(src)
        try:
            d = await self.mount_volume(dst)
            try:
                await tools.run(*RSYNC, f"{s}/", f"{d}/")
            finally:
                if not dst_was:
                    await self.unmount_volume(dst)
        finally:
            if not src_was:
                await self.unmount_volume(src)

    async def delete_volume(self, vol: Volume) -> None:
        if bu.mounted(self.volume_path(vol)):
            await self.unmount_volume(vol)
        await self._lvremove(self.dev(vol))
        tmp = self._dev_named(lv_name(vol) + TMP_SUFFIX)
        if not vol.is_snapshot and await self._lv_exists(tmp):
            await self._lvremove(tmp)  # left by a restore or refresh that was interrupted
        await asyncio.to_thread(self.remove_mountpoint, vol)
        if not vol.is_snapshot:
            snapdir = self.mount_path / vol.type.snapshots_dir_name / vol.storage_name
            await asyncio.to_thread(bu.remove_empty_dir, snapdir)

    async def rename_volume(self, vol: Volume, new_name: str) -> None:
        new = vol.renamed(new_name)
        if await self._lv_exists(self.dev(new)):
            raise Conflict(f"LVM logical volume for {new_name!r} already exists")
        if bu.mounted(self.volume_path(vol)):
            await self.unmount_volume(vol)
        snaps = await self.list_snapshots(vol)
        async with contextlib.AsyncExitStack() as undo:
            for snap in snaps:
                a, b = self.dev(vol.snapshot(snap)), self.dev(new.snapshot(snap))
                await self._lvrename(a, b)
                undo.push_async_callback(self._lvrename, b, a)
            await self._lvrename(self.dev(vol), self.dev(new))
            undo.push_async_callback(self._lvrename, self.dev(new), self.dev(vol))
            old_snapdir = self.mount_path / vol.type.snapshots_dir_name / vol.storage_name
            new_snapdir = self.mount_path / vol.type.snapshots_dir_name / new.storage_name
            if old_snapdir.exists():
                await asyncio.to_thread(os.rename, old_snapdir, new_snapdir)
                undo.callback(os.rename, new_snapdir, old_snapdir)
            if self.volume_path(vol).exists():
                await asyncio.to_thread(os.rename, self.volume_path(vol), self.volume_path(new))
            undo.pop_all()

    async def set_volume_quota(self, vol: Volume, size: int | None) -> None:
        if not size:
            return  # a logical volume always has a size: nothing to remove
        size = _round512(size)
        dev = self.dev(vol)
        old = await self._lv_size(dev)
        extent = await self._extent_size()
        if math.ceil(size / extent) == math.ceil(old / extent):
            return
        activated = await self._activate(dev)
        try:
            path = self.volume_path(vol)
            in_use = bu.mounted(path)
            fs = self.fs(vol)
            if vol.content_type is ContentType.FILESYSTEM:
                if size < old:
                    if fs == "xfs":
                        raise BadRequest("Filesystem \"xfs\" cannot be shrunk")
                    if in_use:
                        raise Conflict("Volumes can't be shrunk while in use")
                    await bu.shrink_fs(fs, dev, size)
                    await self._lvresize(dev, size)
                else:
                    await self._lvresize(dev, size)
                    if fs == "xfs":
                        await self.mount_volume(vol)
                        try:
                            await bu.grow_fs(fs, dev, path)
                        finally:
                            if not in_use:
                                await self.unmount_volume(vol)
                    else:
                        await bu.grow_fs(fs, dev, path)
            else:
                if size < old:
                    raise BadRequest("Block volumes cannot be shrunk")
                await self._lvresize(dev, size)
        finally:
            if activated and not bu.mounted(self.volume_path(vol)):
                await self._deactivate(dev)

    async def _lvresize(self, dev: str, size: int) -> None:
        try:
            await tools.run("lvresize", "-L", f"{size}b", "-f", dev)
        except tools.ToolError as e:
            raise bu.translate(e, f"Error resizing LVM logical volume {dev!r}") from None

    async def mount_volume(self, vol: Volume) -> Path:
        path = self.volume_path(vol)
        if vol.content_type is not ContentType.FILESYSTEM:
            await self._activate(self.dev(vol))
            return path
        if bu.mounted(path):
            return path
        await asyncio.to_thread(self.make_mountpoint, vol)
        dev = self.dev(vol)
        await self._activate(dev)
        options = self.mount_options(vol)
        fs = self.fs(vol)
        if vol.is_snapshot:
            options = ",".join(o for o in ("ro", options, "nouuid" if fs == "xfs" else "") if o)
        try:
            await bu.mount(dev, path, fs, options)
        except tools.ToolError as e:
            raise LXDError(f"Failed to mount LVM logical volume {dev}: {e.message}") from None
        return path

    async def unmount_volume(self, vol: Volume) -> bool:
        path = self.volume_path(vol)
        if vol.content_type is ContentType.FILESYSTEM and not bu.mounted(path):
            return False
        if vol.content_type is ContentType.FILESYSTEM:
            await bu.umount(path)
        await self._deactivate(self.dev(vol))
        return True

    async def volume_usage(self, vol: Volume) -> int | None:
        if vol.is_snapshot:
            return None
        path = self.volume_path(vol)
        if vol.content_type is ContentType.FILESYSTEM and bu.mounted(path):
            st = await asyncio.to_thread(os.statvfs, path)
            return (st.f_blocks - st.f_bfree) * st.f_frsize
        if self.uses_thinpool:
            res = await tools.run("lvs", self.dev(vol), "--noheadings", "--units", "b", "--nosuffix",
                                  "--separator", ",", "-o", "lv_size,data_percent", check=False)
            if res.returncode != 0:
                if _not_found(res):
                    raise NotFound(f"Volume {vol.name!r} not found on the pool")
                raise tools.ToolError(res)
            size, data = _parse_fields(res.stdout, 2, "lvs")
            return int(_parse_int(size, "lvs") * float(data or 0) / 100)
        if not await self._lv_exists(self.dev(vol)):
            raise NotFound(f"Volume {vol.name!r} not found on the pool")
        return None  # a thick LV's usage is only known from its mounted filesystem

    async def _lv_names(self) -> list[str]:
        res = await tools.run("lvs", "--noheadings", "--separator", ",", "-o", "lv_name", self.vg)
        return [ln.strip() for ln in res.stdout.splitlines() if ln.strip()]

    async def list_volumes(self) -> list[Volume]:
        out: list[Volume] = []
        for lv in await self._lv_names():
            vol = self._decode(lv)
            if vol is not None:
                out.append(vol)
        return out

    def _decode(self, lv: str) -> Volume | None:
        if lv == self.thinpool or lv.endswith(TMP_SUFFIX) or "_" not in lv:
            return None
        prefix, rest = lv.split("_", 1)
        vtype = TYPE_PREFIXES.get(prefix)
        if vtype is None or not rest:
            return None
        content = ContentType.FILESYSTEM
        if rest.endswith(BLOCK_SUFFIX):
            content, rest = ContentType.BLOCK, rest[:-len(BLOCK_SUFFIX)]
        name = unescape(rest)
        project = "default"
        if vtype is VolumeType.CUSTOM:
            if "_" not in name:
                return None
            project, name = name.split("_", 1)
        elif vtype is not VolumeType.IMAGE and "_" in name.split("/", 1)[0]:
            project, name = name.split("_", 1)
        return Volume(self.pool_name, vtype, name, project=project, content_type=content)

    # -- snapshots -----------------------------------------------------------------------------
    async def create_snapshot(self, snap: Volume) -> None:
        parent = snap.parent()
        if await self._lv_exists(self.dev(snap)):
            raise Conflict(f"Snapshot {snap.snapshot_name!r} already exists")
        if not await self._lv_exists(self.dev(parent)):
            raise NotFound(f"Volume {parent.name!r} not found on the pool")
        async with contextlib.AsyncExitStack() as undo:
            await asyncio.to_thread(self.make_mountpoint, snap)
            undo.callback(self.remove_mountpoint, snap)
            size = None if self.uses_thinpool else await self._lv_size(self.dev(parent))
            await self._lvcreate_snapshot(self.dev(parent), lv_name(snap), readonly=True, size=size)
            undo.pop_all()

    async def delete_snapshot(self, snap: Volume) -> None:
        await self.delete_volume(snap)

    async def rename_snapshot(self, snap: Volume, new_snapshot_name: str) -> None:
        new = snap.parent().snapshot(new_snapshot_name)
        if await self._lv_exists(self.dev(new)):
            raise Conflict(f"Snapshot {new_snapshot_name!r} already exists")
        if bu.mounted(self.volume_path(snap)):
            await self.unmount_volume(snap)
        await self._lvrename(self.dev(snap), self.dev(new))
        try:
            if self.volume_path(snap).exists():
                await asyncio.to_thread(os.rename, self.volume_path(snap), self.volume_path(new))
        except OSError:
            await self._lvrename(self.dev(new), self.dev(snap))
            raise

    async def restore_snapshot(self, snap: Volume) -> None:
        vol = snap.parent()
        if not await self._lv_exists(self.dev(snap)):
            raise NotFound(f"Snapshot {snap.snapshot_name!r} not found")
        if not self.uses_thinpool:
            await self._rsync_into(snap, vol)
            return
        was_mounted = bu.mounted(self.volume_path(vol))
        if was_mounted:
            await self.unmount_volume(vol)
        dev = self.dev(vol)
        tmp = self._dev_named(lv_name(vol) + TMP_SUFFIX)
        async with contextlib.AsyncExitStack() as undo:
            await self._lvrename(dev, tmp)
            undo.push_async_callback(self._lvrename, tmp, dev)
            await self._lvcreate_snapshot(self.dev(snap), lv_name(vol), readonly=False)
            undo.push_async_callback(self._lvremove, dev)
            await self._regenerate_uuid(vol, dev)
            await self._lvremove(tmp, missing_ok=False)
            undo.pop_all()
        if was_mounted:
            await self.mount_volume(vol)

    async def list_snapshots(self, vol: Volume) -> list[str]:
        parent_lv = lv_name(vol.parent())
        names = []
        res = await tools.run("lvs", "--noheadings", "--separator", ",", "-o", "lv_name,lv_time",
                              "--sort", "lv_time", self.vg)
        for line in res.stdout.splitlines():
            lv = line.strip().split(",", 1)[0].strip()
            snap = parse_snapshot(parent_lv, lv) if lv else ""
            if snap:
                names.append(snap)
        return names


def _round512(n: int) -> int:
    return max(512, n // 512 * 512)


async def _quiet(*argv: str) -> None:
    await tools.run(*argv, check=False)


def _lvm_version() -> str:
    async def probe() -> str:
        res = await tools.run("lvm", "version", check=False)
        versions = []
        for line in res.stdout.splitlines():
            if "version:" in line:
                versions.append(line.split(":", 1)[1].strip())
        return " / ".join(versions[:2])

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(probe())
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        return ex.submit(asyncio.run, probe()).result()
