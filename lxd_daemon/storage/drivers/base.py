"""The interface every storage driver implements: pools, volumes, snapshots, backups, migration.

A driver owns the volumes of one pool on the host (directories, btrfs subvolumes, zfs datasets,
lvm logical volumes) and nothing else: it never touches the database, never knows about
instances or images beyond the `Volume` it is handed, and declares what it can do in `info`
(a DriverInfo: callers test its flags, never the driver's name). The orchestration on top (the
records, image volumes, revert on failure, locking) lives once in the storage service.

Conventions for every method:
- Volumes are lxd_daemon.storage.volume.Volume values; a snapshot is a Volume whose name is
  `parent/snap`.
- Methods that do I/O are coroutines and never block the event loop (tools through
  asyncio.create_subprocess_exec, file work through asyncio.to_thread).
- A method that fails leaves nothing behind that it made (a partial subvolume, dataset, LV or
  directory is removed before the error propagates); errors are lxd_daemon.errors.LXDError
  (BadRequest for what the user asked wrong, InsufficientStorage for a full pool, LXDError(500)
  with the tool's message otherwise).
- Filesystem volumes are reachable at `volume_path(vol)` while mounted; `mount_volume` returns
  that path (a no-op for drivers whose volumes are always reachable, such as dir and btrfs).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import BinaryIO, ClassVar

from lxd_daemon.storage.volume import DriverInfo, Volume, VolumeType

# Fills a freshly created, mounted, empty filesystem volume (e.g. unpacks an image into it).
Filler = Callable[[Path], Awaitable[None]]


class Driver(ABC):
    info: ClassVar[DriverInfo]
    # Pool config keys this driver accepts besides the common ones (source, size,
    # volume.size, ...), each with a validator raising ValueError for a bad value.
    pool_keys: ClassVar[dict[str, Callable[[str], object]]] = {}

    def __init__(self, pool_name: str, mount_path: Path, config: dict[str, str]):
        self.pool_name = pool_name
        self.mount_path = mount_path  # $LXD_DIR/storage-pools/<pool>
        self.config = config

    # -- the driver on this host -----------------------------------------------------------
    @classmethod
    def available(cls) -> tuple[bool, str]:
        """Whether this host can run the driver (tools installed, kernel support), and its
        version (or why not). Called once at start-up for `GET /1.0`'s driver list."""
        return True, cls.info.version

    @classmethod
    def validate_pool_config(cls, config: dict[str, str]) -> dict[str, str]:
        """Check the driver's keys and values; returns the config with the driver's defaults
        filled in (e.g. `size` for a loop-backed pool). Raises BadRequest naming the key."""
        return dict(config)

    # -- pools -------------------------------------------------------------------------------
    @abstractmethod
    async def create_pool(self) -> None:
        """Create the pool (loop file, filesystem, volume group, zpool, or the directory layout on
        an existing source) and its layout; idempotent on the layout."""

    @abstractmethod
    async def delete_pool(self) -> None:
        """Remove the pool and everything the driver made for it (loop file, zpool, VG);
        a `source` the user brought is left as it was before create_pool."""

    async def mount_pool(self) -> bool:
        """Make the pool's volumes reachable (mount the loop file or device, import the zpool,
        activate the VG); True if this call mounted it. Called at every daemon start."""
        return False

    async def unmount_pool(self) -> bool:
        return False

    async def update_pool(self, changed: dict[str, str]) -> None:
        """Apply changed pool keys that may change on a live pool (e.g. `size` growth)."""
        if changed:
            from lxd_daemon.errors import BadRequest

            raise BadRequest(f"Storage pool keys can't be changed on a {self.info.name} pool: {', '.join(sorted(changed))}")

    @abstractmethod
    def usage(self) -> dict:
        """`/1.0/storage-pools/<pool>/resources`: {"space": {"used", "total"}, "inodes": {...}}."""

    async def pool_usage(self) -> dict:
        """usage() for drivers that must ask a tool (lvs, zfs get): those refresh it here and
        usage() returns the last value. Callers in the event loop should prefer this."""
        return self.usage()

    # -- volumes -----------------------------------------------------------------------------
    def volume_path(self, vol: Volume) -> Path:
        """Where a filesystem volume (or a snapshot) is reachable on the host, as LXD lays it out:
        `<pool>/<type dir>/<storage name>`, snapshots under `<type dir>-snapshots/<storage name>/<snap>`."""
        if vol.is_snapshot:
            return self.mount_path / vol.type.snapshots_dir_name / vol.storage_name / vol.snapshot_name
        if vol.type is VolumeType.IMAGE:
            return self.mount_path / vol.type.dir_name / vol.name
        return self.mount_path / vol.type.dir_name / vol.storage_name

    def snapshots_dir(self, vol: Volume) -> Path:
        """The directory holding `vol`'s snapshots (`<type dir>-snapshots/<storage name>`)."""
        return self.mount_path / vol.type.snapshots_dir_name / vol.storage_name

    def volume_mode(self, vol: Volume) -> int:
        """The mode of a volume's top directory (see "who may enter the pool" below)."""
        if vol.type is VolumeType.IMAGE:
            return self.IMAGE_MODE
        if vol.type is VolumeType.CUSTOM:
            return self.CUSTOM_MODE
        return self.INSTANCE_MODE

    async def _rename_volume_dirs(self, vol: Volume, new_name: str, exists: Callable[[Path], bool]) -> None:
        """Rename a volume whose volume and snapshots are directory entries of the pool (dir,
        btrfs subvolumes): both move, or neither. `exists(path)` tells whether the volume is there."""
        import asyncio

        from lxd_daemon.errors import BadRequest, Conflict, NotFound

        if vol.is_snapshot:
            raise BadRequest("Use rename_snapshot to rename a snapshot")
        new = vol.renamed(new_name)
        old_path, new_path = self.volume_path(vol), self.volume_path(new)
        old_snaps, new_snaps = self.snapshots_dir(vol), self.snapshots_dir(new)

        def mv() -> None:
            if not exists(old_path):
                raise NotFound(f"Storage volume {vol.name!r} not found on pool {self.pool_name!r}")
            if os.path.lexists(new_path) or os.path.lexists(new_snaps):
                raise Conflict(f"Storage volume {new_name!r} already exists on pool {self.pool_name!r}")
            os.rename(old_path, new_path)
            try:
                if old_snaps.is_dir():
                    os.rename(old_snaps, new_snaps)
            except BaseException:
                os.rename(new_path, old_path)
                raise

        await asyncio.to_thread(mv)

    async def _rename_snapshot_entry(self, old: Path, snap: Volume, new_snapshot_name: str) -> None:
        """Rename the snapshot at `old` (a directory entry of the pool) to `new_snapshot_name`."""
        import asyncio

        from lxd_daemon.errors import Conflict

        new = self.volume_path(snap.parent().snapshot(new_snapshot_name))

        def mv() -> None:
            if os.path.lexists(new):
                raise Conflict(f"Snapshot {new_snapshot_name!r} already exists")
            os.rename(old, new)

        await asyncio.to_thread(mv)

    async def _create_snapshot_entry(self, snap: Volume, require: Callable[[Volume], Awaitable[Path]],
                                     make: Callable[[Path, Path], Awaitable[None]],
                                     undo: Callable[[Path], Awaitable[None]] | None = None) -> None:
        """Create snapshot `snap` as a directory entry of the pool (dir, btrfs): `make(src, dst)`
        with `src` the parent volume's path (`require` finds it or raises NotFound). On failure
        `undo(dst)` runs and the snapshots directory goes again if this call made it."""
        import asyncio

        from lxd_daemon.errors import BadRequest, Conflict
        from lxd_daemon.storage.drivers.blockutil import mkdir_mode, remove_empty_dir

        if not snap.is_snapshot:
            raise BadRequest(f"{snap.name!r} is not a snapshot name")
        src = await require(snap.parent())
        dst = self.volume_path(snap)
        if await asyncio.to_thread(os.path.lexists, dst):
            raise Conflict(f"Snapshot {snap.snapshot_name!r} already exists")
        sdir = dst.parent
        made_dir = not await asyncio.to_thread(sdir.is_dir)
        await asyncio.to_thread(mkdir_mode, sdir, 0o700)
        try:
            await make(src, dst)
        except BaseException:
            if undo is not None:
                await undo(dst)
            if made_dir:
                await asyncio.to_thread(remove_empty_dir, sdir)
            raise

    def make_mountpoint(self, vol: Volume) -> None:
        """The directory a mounted volume (LV, dataset) appears at, with the volume's mode."""
        path = self.volume_path(vol)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.mkdir(mode=0o700, exist_ok=True)
        os.chmod(path, self.volume_mode(vol))

    def remove_mountpoint(self, vol: Volume) -> None:
        """Remove a volume's mount point (and a snapshot's parent directory) when empty."""
        from lxd_daemon.storage.drivers.blockutil import remove_empty_dir

        remove_empty_dir(self.volume_path(vol))
        if vol.is_snapshot:
            remove_empty_dir(self.volume_path(vol).parent)

    @abstractmethod
    async def has_volume(self, vol: Volume) -> bool:
        """Whether the volume (or snapshot) exists on the pool."""

    @abstractmethod
    async def create_volume(self, vol: Volume, filler: Filler | None = None) -> None:
        """Create an empty volume (honouring `size` where the driver has quotas) and, with
        `filler`, fill it while mounted. Nothing is left if the filler fails."""

    @abstractmethod
    async def create_volume_from_copy(self, vol: Volume, src: Volume, *, snapshots: bool = False) -> None:
        """Create `vol` as a copy of `src` (a volume or a snapshot of the same pool) through the
        driver's fastest path (reflink, subvolume snapshot, zfs clone/send, thin snapshot); with
        `snapshots`, `src`'s snapshots are copied too. Ownership, modes, xattrs, ACLs and device
        nodes are kept."""

    async def create_volume_from_image(self, vol: Volume, image: Volume) -> None:
        """Create an instance volume from the pool's image volume `image` (which exists). Drivers
        with `info.optimized_images` make a copy-on-write child; the default copies."""
        await self.create_volume_from_copy(vol, image)

    @abstractmethod
    async def delete_volume(self, vol: Volume) -> None:
        """Delete a volume (its snapshots must be gone first); a missing volume is fine."""

    @abstractmethod
    async def rename_volume(self, vol: Volume, new_name: str) -> None:
        """Rename a volume together with its snapshots."""

    async def set_volume_quota(self, vol: Volume, size: int | None) -> None:
        """Apply `size` (bytes; None or 0 removes the limit). Drivers without quotas refuse
        with a BadRequest saying why."""
        from lxd_daemon.errors import BadRequest

        if size:
            raise BadRequest(f"The {self.info.name} driver can't limit a volume's size on this pool")

    async def mount_volume(self, vol: Volume) -> Path:
        return self.volume_path(vol)

    async def unmount_volume(self, vol: Volume) -> bool:
        return False

    @abstractmethod
    async def volume_usage(self, vol: Volume) -> int | None:
        """Bytes used by the volume (None where the driver can't tell cheaply)."""

    @abstractmethod
    async def list_volumes(self) -> list[Volume]:
        """Every volume on the pool, snapshots included, from the pool itself (for `lxd recover`)."""

    # -- snapshots ---------------------------------------------------------------------------
    @abstractmethod
    async def create_snapshot(self, snap: Volume) -> None:
        """Snapshot `snap.parent()` as `snap` (read-only where the driver can)."""

    @abstractmethod
    async def delete_snapshot(self, snap: Volume) -> None:
        ...

    @abstractmethod
    async def rename_snapshot(self, snap: Volume, new_snapshot_name: str) -> None:
        ...

    @abstractmethod
    async def restore_snapshot(self, snap: Volume) -> None:
        """Make `snap.parent()` what `snap` holds (the volume is not in use, or frozen)."""

    @abstractmethod
    async def list_snapshots(self, vol: Volume) -> list[str]:
        """Names of `vol`'s snapshots on the pool, oldest first."""

    # -- backups (the driver's optimised format; the generic tarball is the service's) --------
    async def backup_volume_optimized(self, vol: Volume, snapshots: list[str], out: BinaryIO) -> list[str]:
        """Write the optimised backup of `vol` (and of `snapshots`, oldest first) into `out` as
        the members LXD's backup tarball has for this driver; returns the member names.
        Only for `info.optimized_backups` drivers."""
        raise NotImplementedError

    async def restore_volume_optimized(self, vol: Volume, snapshots: list[str], member: Callable[[str], BinaryIO]) -> None:
        """Create `vol` and its `snapshots` from an optimised backup (`member(name)` opens one
        member of the tarball). Only for `info.optimized_backups` drivers."""
        raise NotImplementedError

    # -- migration ---------------------------------------------------------------------------
    async def send_volume(self, vol: Volume, snapshots: list[str], transport: str,
                          write: Callable[[bytes], Awaitable[None]]) -> None:
        """Send `vol` (and `snapshots`) as a stream in `transport` (one of info.migration_types
        other than RSYNC, which the service does for every driver)."""
        raise NotImplementedError

    async def receive_volume(self, vol: Volume, snapshots: list[str], transport: str,
                             chunks: AsyncIterator[bytes]) -> None:
        raise NotImplementedError

    # -- who may enter the pool ----------------------------------------------------------
    # As LXD: the pool and the directories of volume types whose volumes a container must reach
    # (containers, custom volumes) can be traversed (0711), nothing in them can be listed; the
    # image caches and snapshots are root's only (0700). Each instance volume is 0100, owned by
    # root while stopped and by the host uid of the container's root while it runs: that uid
    # can reach its own root filesystem, no other host user can reach into any container (a
    # setuid binary made in a privileged container must not be callable through its host path).
    POOL_MODE = 0o711
    TYPE_DIR_MODES = {"containers": 0o711, "containers-snapshots": 0o700, "custom": 0o711,
                      "custom-snapshots": 0o700, "images": 0o700, "virtual-machines": 0o711,
                      "virtual-machines-snapshots": 0o700}
    INSTANCE_MODE = 0o100
    IMAGE_MODE = 0o700
    CUSTOM_MODE = 0o711

    def make_layout(self) -> None:
        """The pool's directory per volume type (and per type's snapshots), with their modes; the
        pool's mount path must exist."""
        os.chmod(self.mount_path, self.POOL_MODE)
        for sub, mode in self.TYPE_DIR_MODES.items():
            p = self.mount_path / sub
            p.mkdir(exist_ok=True)
            os.chmod(p, mode)

    def secure_instance_volume(self, path: Path, owner_uid: int = 0) -> None:
        """Close an instance (or instance snapshot) volume: mode 0100, owned by `owner_uid`
        (the host uid of the container's root while it runs, else 0) and group root."""
        os.chown(path, owner_uid, 0)
        os.chmod(path, self.INSTANCE_MODE)

    def secure_layout(self) -> None:
        """Set the modes of the pool's own directories and of every image cache entry (at pool
        creation and at each daemon start, fixing trees made by older versions)."""
        root = self.mount_path
        if not root.is_dir():
            return
        self.make_layout()
        images = root / "images"
        for fp in os.listdir(images):
            fdir = images / fp
            if fdir.is_symlink() or not fdir.is_dir():
                continue
            os.chmod(fdir, self.IMAGE_MODE)
            for key in os.listdir(fdir):
                p = fdir / key
                # Cache entries (`<uid>_<gid>`, temporaries) only: an image volume's own
                # content (rootfs/, templates/) keeps its modes.
                if (key[:1].isdigit() or key.startswith(".")) and not p.is_symlink() and p.is_dir():
                    os.chmod(p, self.INSTANCE_MODE)  # copied into containers/ as they are
        for sub in ("containers", "virtual-machines"):
            for e in os.listdir(root / sub):
                p = root / sub / e
                if e.startswith(".") and not p.is_symlink() and p.is_dir():
                    os.chmod(p, 0o700)  # leftovers (trash, temporary copies) being removed
