"""Disk devices whose host side needs preparing before they can be bind-mounted into a container:
custom storage volumes (`pool` + `source`) and host block devices (`source=/dev/...`).

As LXD 5.0 does:
- A custom volume is mounted through storage (a no-op for dir and btrfs) and, for an
  unprivileged container, its files are shifted to the container's id map, so that the volume's
  root belongs to the container's root. The map the files are shifted to is recorded in the
  volume's config (`volatile.idmap.last`); attaching it to a container with another map shifts
  them again, which is refused while another container using the volume has a different map.
  `security.unmapped=true` leaves ownership alone (host root's files show as nobody inside);
  `security.shifted=true` keeps the files unshifted and mounts them idmapped into each container
  (a clear 400 where the kernel can't idmap that filesystem).
- A block device's filesystem is mounted on the host at
  `$LXD_DIR/devices/<instance>/disk.<device>.<path>`, bind-mounted into the container (at start
  by liblxc's mount entry, when hot-plugged by the worker) and unmounted on the host right after:
  the container's mount keeps it alive, and it goes when the container stops or the device is
  removed. No host-side mount outlives the start or the hot-plug that made it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from pathlib import Path

from lxd_daemon.errors import BadRequest, LXDError, NotFound
from lxd_daemon.instances import devices as devs
from lxd_daemon.instances.idmap import IdmapSet
from lxd_daemon.instances.lxcconf import DiskSource, dev_bool, disk_host_mount_path

log = logging.getLogger("lxd.instances.disks")

TRUE = ("true", "1", "yes", "on")
_VOLUME_LOCKS: dict[tuple[str, str, str], asyncio.Lock] = {}


def _true(value: str | None) -> bool:
    return (value or "").lower() in TRUE


def _custom(services):
    custom = services.storage.custom if services.storage is not None else None
    if custom is None:
        raise BadRequest("Custom storage volumes are not available on this server")
    return custom


def volume_of(dev: dict[str, str]) -> tuple[str, str] | None:
    """(pool, volume name) of a custom-volume disk, else None."""
    if not devs.is_volume_disk(dev):
        return None
    try:
        return dev["pool"], devs.volume_source(dev["source"])
    except ValueError:
        return None


def uses_volume(devices: dict[str, dict], pool: str, name: str) -> bool:
    return any(volume_of(d) == (pool, name) for d in devices.values())


async def _get_volume(services, pool: str, name: str, project: str = "default"):
    return await _custom(services).get(pool, name, project=project)


async def check_volumes(services, devices: dict[str, dict], *, project: str = "default") -> None:
    """At the time a device is added (instance create/update, a profile change reaching an
    instance): every custom-volume disk names a volume that exists and holds a filesystem.
    BadRequest naming the device otherwise."""
    for dname, dev in devices.items():
        ref = volume_of(dev)
        if ref is None:
            continue
        pool, vname = ref
        if services.storage is None or pool not in services.storage.pools:
            raise BadRequest(f"Invalid device {dname!r}: storage pool {pool!r} doesn't exist")
        try:
            vol = await _get_volume(services, pool, vname, project)
        except NotFound:
            raise BadRequest(f"Invalid device {dname!r}: storage volume {vname!r} doesn't exist on "
                             f"storage pool {pool!r}") from None
        if str(getattr(vol, "content_type", "filesystem")) == "block":
            raise BadRequest(f"Invalid device {dname!r}: custom block volumes cannot be used on containers")


def _is_block(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


async def _run(*cmd: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(*cmd, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace").strip()


def _is_mountpoint(path: Path) -> bool:
    try:
        return os.path.ismount(path)
    except OSError:
        return False


async def _unmount_host(path: Path) -> None:
    """Lazily unmount a host-side mount point (if mounted) and remove it."""
    if await asyncio.to_thread(_is_mountpoint, path):
        rc, out = await _run("umount", "-l", str(path))
        if rc != 0:
            log.warning("couldn't unmount a disk's host-side mount", extra={"path": str(path), "err": out})
            return
    await asyncio.to_thread(_remove_mountpoint, path)


def _remove_mountpoint(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            path.rmdir()
        elif path.exists() or path.is_symlink():
            path.unlink()
    except OSError:
        pass


def unmount_under(devices_dir: Path) -> None:
    """Lazily unmount every host-side disk mount left under an instance's devices directory (a
    daemon killed between a mount and its unmount): before that directory is removed, nothing
    mounted may be in it. Synchronous (call it in a thread)."""
    prefix = str(devices_dir).rstrip("/") + "/"
    try:
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4] for line in f]
    except OSError:
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for mnt in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
        mnt = mnt.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
        libc.umount2(mnt.encode(), 2 | 8)  # MNT_DETACH | UMOUNT_NOFOLLOW


class DiskPrep:
    """Prepares the disks of one start or one hot-plug of instance `name` (id map `idmap`, the
    one it starts with or runs with). `release()` undoes the host-side block device mounts made;
    call it once the container holds its own mounts (or the start failed)."""

    def __init__(self, svc, name: str, idmap: IdmapSet, *, privileged: bool, project: str = "default"):
        self.svc = svc
        self.services = svc.services
        self.name = name
        self.idmap = idmap
        self.privileged = privileged
        self.project = project
        self.devices_dir: Path = svc.devices_dir(name)
        self._host_mounts: list[Path] = []
        self._pending: list[tuple[str, dict, Path]] = []

    async def prepare_all(self, devices: dict[str, dict]) -> dict[str, DiskSource]:
        """For a start: DiskSource for every volume / block device disk that is to be mounted
        (an optional one whose source is missing is left out). Volumes are mounted and shifted
        now; block devices are only planned: mount_pending() mounts them right before liblxc
        starts the container, and release() unmounts them right after."""
        out: dict[str, DiskSource] = {}
        for dname, dev in sorted(devices.items()):
            src = await self.prepare(dname, dev, defer=True)
            if src is not None:
                out[dname] = src
        return out

    async def prepare(self, dname: str, dev: dict, *, defer: bool = False) -> DiskSource | None:
        """DiskSource for a volume or block device disk; None for a disk that is neither (a host
        path: lxcconf binds it as it is) or an optional one whose source is missing. A block
        device is mounted on the host now, or with `defer` by mount_pending()."""
        if dev.get("type") != "disk" or devs.is_root_disk(dev):
            return None
        if dev.get("pool"):
            return await self._prepare_volume(dname, dev)
        source = dev.get("source", "")
        if source.startswith("/") and await asyncio.to_thread(_is_block, source):
            mnt = disk_host_mount_path(self.devices_dir, dname, dev)
            self._pending.append((dname, dev, mnt))
            if not defer:
                await self.mount_pending()
            return DiskSource(str(mnt), True, dev_bool(dev, "shift") and not self.privileged)
        return None

    async def mount_pending(self) -> None:
        """Mount the planned block devices on the host (undone by release(), also on failure)."""
        pending, self._pending = self._pending, []
        for dname, dev, mnt in pending:
            await self._mount_block(dname, dev, mnt)

    # -- custom volumes ----------------------------------------------------------------------
    async def _prepare_volume(self, dname: str, dev: dict) -> DiskSource | None:
        custom = _custom(self.services)
        try:
            vname = devs.volume_source(dev["source"])
        except ValueError as e:
            raise BadRequest(f"Invalid device {dname!r}: {e}") from None
        pool = dev["pool"]
        try:
            vol = await custom.get(pool, vname, project=self.project)
        except NotFound:
            if devs.disk_required(dev):
                raise BadRequest(f"Storage volume {vname!r} doesn't exist on storage pool {pool!r} "
                                 f"(device {dname!r})") from None
            return None
        if str(getattr(vol, "content_type", "filesystem")) == "block":
            raise BadRequest(f"Invalid device {dname!r}: custom block volumes cannot be used on containers")
        try:
            path = Path(await custom.mount(pool, vname, project=self.project))
        except LXDError as e:
            raise BadRequest(f"Failed mounting storage volume {vname!r} on storage pool {pool!r}: "
                             f"{e.message}") from None
        config = dict(getattr(vol, "config", {}) or {})
        shifted = _true(config.get("security.shifted"))
        if not _true(config.get("security.unmapped")):
            lock = _VOLUME_LOCKS.setdefault((self.project, pool, vname), asyncio.Lock())
            async with lock:
                # re-read under the lock: a parallel start may just have shifted it
                vol = await custom.get(pool, vname, project=self.project)
                await self._shift_volume(pool, vname, dict(getattr(vol, "config", {}) or {}), path)
        shift = shifted and not self.privileged
        if shift:
            from lxd_daemon.runtime.hotplug import idmapped_mounts_supported

            if not await asyncio.to_thread(idmapped_mounts_supported, path):
                raise BadRequest(f"Storage volume {vname!r} has security.shifted=true, but the kernel can't "
                                 f"shift (idmap) mounts of its filesystem")
        return DiskSource(str(path), True, shift)

    def _map_of(self, other: str) -> IdmapSet | None:
        """The map another container's files are at: its running map, else the next one."""
        rec = self.svc.records.get(other)
        if rec is None:
            return None
        running = self.svc.status_of(other)[0] != "Stopped"
        text = rec.config.get("volatile.idmap.current") if running else None
        text = text or rec.config.get("volatile.idmap.next")
        return IdmapSet.from_json(text) if text else None

    async def _shift_volume(self, pool: str, vname: str, config: dict, path: Path) -> None:
        last_text = config.get("volatile.idmap.last")
        last = IdmapSet.from_json(last_text) if last_text else IdmapSet(())
        shifted = _true(config.get("security.shifted"))
        nxt = IdmapSet(()) if shifted else self.idmap
        if last != nxt:
            if not shifted:
                for other in sorted(self.svc.records):
                    if other == self.name:
                        continue
                    try:
                        expanded = self.svc.expanded(other)[1]
                    except LXDError:
                        continue
                    if not uses_volume(expanded, pool, vname):
                        continue
                    theirs = self._map_of(other)
                    if theirs is not None and theirs != nxt:
                        raise BadRequest(f"Idmaps of container {other!r} and storage volume {vname!r} are not "
                                         f"identical (set security.shifted=true on the volume to share it)")
            from lxd_daemon.instances.service import shift_tree

            n = await asyncio.to_thread(shift_tree, path, last, nxt)
            log.info("shifted storage volume", extra={"pool": pool, "volume": vname, "entries": n})
        text = nxt.to_json()
        if config.get("volatile.idmap.last") != text or config.get("volatile.idmap.next") != text:
            await _custom(self.services).set_config_keys(
                pool, vname, {"volatile.idmap.last": text, "volatile.idmap.next": text}, project=self.project)

    async def volume_detached(self, dname: str, dev: dict) -> None:
        """After a volume disk left the container: storage unmounts the volume (a no-op for dir
        and btrfs) unless another running container still uses it."""
        ref = volume_of(dev)
        if ref is not None:
            await unmount_if_unused(self.svc, ref[0], ref[1], exclude=self.name, project=self.project)

    # -- block devices -----------------------------------------------------------------------
    async def _mount_block(self, dname: str, dev: dict, mnt: Path) -> None:
        source = dev["source"]

        def make() -> None:
            self.devices_dir.mkdir(parents=True, exist_ok=True, mode=0o711)
            os.chmod(self.devices_dir, 0o711)
            mnt.mkdir(mode=0o700)

        await _unmount_host(mnt)  # a leftover of an earlier start
        await asyncio.to_thread(make)
        self._host_mounts.append(mnt)
        opts = ["ro"] if dev_bool(dev, "readonly") else []
        cmd = ["mount", *(["-o", ",".join(opts)] if opts else []), "--", source, str(mnt)]
        rc, out = await _run(*cmd)
        if rc != 0:
            raise BadRequest(f"Failed to mount {source!r} for disk {dname!r}: {out or 'mount failed'}")
        shift = dev_bool(dev, "shift") and not self.privileged
        if shift:
            from lxd_daemon.runtime.hotplug import idmapped_mounts_supported

            if not await asyncio.to_thread(idmapped_mounts_supported, mnt):
                raise BadRequest(f"Invalid device {dname!r}: shift=true needs idmapped mounts, which the "
                                 f"filesystem on {source!r} doesn't support on this kernel")

    async def release(self) -> None:
        """Unmount (lazily) the host-side mounts this preparation made."""
        self._pending = []
        mounts, self._host_mounts = self._host_mounts, []
        for mnt in reversed(mounts):
            await _unmount_host(mnt)


async def unmount_if_unused(svc, pool: str, vname: str, *, exclude: str, project: str = "default") -> None:
    if svc.services.storage is None:
        return
    unmount = svc.services.storage.custom.unmount
    for other in list(svc.records):
        if other == exclude or svc.status_of(other)[0] == "Stopped":
            continue
        try:
            if uses_volume(svc.expanded(other)[1], pool, vname):
                return
        except LXDError:
            continue
    try:
        await unmount(pool, vname, project=project)
    except Exception as e:  # the container is without it either way
        log.warning("couldn't unmount a custom volume", extra={"volume": vname, "err": str(e)})


async def instance_stopped(svc, name: str, devices: dict[str, dict]) -> None:
    """After a container stopped: the custom volumes it had are unmounted where no other running
    container uses them (as LXD's disk postStop)."""
    for dev in devices.values():
        ref = volume_of(dev)
        if ref is not None:
            await unmount_if_unused(svc, ref[0], ref[1], exclude=name)


async def volume_used_by(svc, profiles, pool: str, name: str, project: str = "default") -> list[str]:
    """Instances (by their expanded devices) and profiles whose disks attach the custom volume."""
    if project != "default":
        return []
    out = [f"/1.0/profiles/{pname}" for pname, p in sorted(profiles.profiles.items())
           if uses_volume(p.devices, pool, name)]
    for n in sorted(svc.records):
        try:
            expanded = svc.expanded(n)[1]
        except LXDError:
            continue
        if uses_volume(expanded, pool, name):
            out.append(f"/1.0/instances/{n}")
    return out
