"""`disk`: the root disk (the instance's volume; nothing to mount), a host path bind-mounted at
`path`, a host block device whose filesystem is mounted on the host and bound in, or a custom
storage volume (`pool` + `source`).

Validation is pure (no host lookups): whether a source exists is checked when the container
starts or the device is hot-plugged, so that `optional` / `required` can say what happens then;
whether a custom volume exists is checked when the device is added (check_volumes).

Host preparation, as LXD 5.0 does it:
- A custom volume is mounted through storage (a no-op for dir and btrfs) and, for an
  unprivileged container, its files are shifted to the container's id map, so that the volume's
  root belongs to the container's root. The map the files are shifted to is recorded in the
  volume's config (`volatile.idmap.last`); attaching it to a container with another map shifts
  them again, which is refused while another container using the volume has a different map.
  `security.unmapped=true` leaves ownership alone (host root's files show as nobody inside);
  `security.shifted=true` keeps the files unshifted and mounts them idmapped into each container
  (a clear 400 where the kernel can't idmap that filesystem). When the container stops (or the
  disk is unplugged), storage unmounts the volume unless another running container uses it.
- A block device's filesystem is mounted on the host at
  `$LXD_DIR/devices/<instance>/disk.<device>.<path>`, bind-mounted into the container (at start
  by liblxc's mount entry, when hot-plugged by the worker) and unmounted on the host right after
  (a post_start hook): the container's mount keeps it alive, and it goes when the container
  stops or the device is removed. No host-side mount outlives the start or the hot-plug.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from lxd_daemon.devices.base import (
    Device,
    DeviceContext,
    container_path,
    dev_bool,
    is_abs_path,
    is_size,
)
from lxd_daemon.devices.runconfig import MountEntry, RunConfig
from lxd_daemon.errors import BadRequest, LXDError, NotFound
from lxd_daemon.instances.idmap import IdmapSet
from lxd_daemon.util import validate as v

log = logging.getLogger("lxd.devices.disk")

PROPAGATION = ("private", "shared", "slave", "unbindable", "rprivate", "rshared", "rslave", "runbindable")

OPTIONS = {
    "path": is_abs_path,
    "source": v.is_any,
    "pool": v.is_any,
    "readonly": v.is_bool,
    "recursive": v.is_bool,
    "propagation": v.is_one_of(*PROPAGATION),
    "shift": v.is_bool,
    "optional": v.is_bool,
    "required": v.is_bool,
    "size": is_size,
    "boot.priority": v.is_uint,
}

TRUE = ("true", "1", "yes", "on")
_VOLUME_LOCKS: dict[tuple[str, str, str], asyncio.Lock] = {}


@dataclass(frozen=True)
class DiskSource:
    """What a prepared disk device bind-mounts: a host path (a custom volume's directory, the
    host-side mount of a block device), whether it is a directory, and whether the mount is
    idmapped to the container (shift)."""

    path: str
    is_dir: bool = True
    shift: bool = False


# -- config helpers -----------------------------------------------------------------------------


def is_root_disk(dev: dict[str, str]) -> bool:
    return dev.get("type") == "disk" and dev.get("path") == "/" and not dev.get("source")


def root_disk(devices: dict[str, dict[str, str]]) -> tuple[str, dict[str, str]] | None:
    for name, dev in devices.items():
        if is_root_disk(dev):
            return name, dev
    return None


def disk_required(dev: dict[str, str]) -> bool:
    """A disk whose source is missing fails the start unless optional=true (or required=false)."""
    if "optional" in dev and dev["optional"] != "":
        return not dev_bool(dev, "optional")
    return dev_bool(dev, "required", True)


# Volume types a disk's `source` may name as "<type>/<volume>" (LXD 5.0): only custom volumes.
_REFUSED_VOLUME_TYPES = {"container": "Using instance storage volumes is not supported",
                         "virtual-machine": "Using instance storage volumes is not supported",
                         "image": "Using image storage volumes is not supported"}


def volume_source(source: str) -> str:
    """The custom volume a `pool` disk's source names ("vol" or "custom/vol"); ValueError for
    another volume type or a snapshot ("vol/snap": LXD 5.0 attaches no snapshots)."""
    if source.startswith("/"):
        raise ValueError("Storage volumes cannot be specified as absolute paths")
    vtype, sep, vname = source.partition("/")
    if not sep:
        return source
    if vtype in _REFUSED_VOLUME_TYPES:
        raise ValueError(_REFUSED_VOLUME_TYPES[vtype])
    if vtype != "custom":
        raise ValueError(f"Unknown storage volume type prefix {vtype!r} in {source!r} (snapshots of custom "
                         f"volumes can't be attached)")
    if not vname or "/" in vname:
        raise ValueError(f"Invalid storage volume name {vname!r} (snapshots of custom volumes can't be attached)")
    return vname


def is_volume_disk(dev: dict[str, str]) -> bool:
    """A disk backed by a custom storage volume (pool + source, not the root disk)."""
    return dev.get("type") == "disk" and bool(dev.get("pool")) and bool(dev.get("source")) \
        and dev.get("path") != "/"


def volume_of(dev: dict[str, str]) -> tuple[str, str] | None:
    """(pool, volume name) of a custom-volume disk, else None."""
    if not is_volume_disk(dev):
        return None
    try:
        return dev["pool"], volume_source(dev["source"])
    except ValueError:
        return None


def uses_volume(devices: dict[str, dict], pool: str, name: str) -> bool:
    return any(volume_of(d) == (pool, name) for d in devices.values())


def path_name_encode(text: str) -> str:
    """A path as one file name, as LXD encodes it ("-" doubled, then "/" -> "-")."""
    return text.replace("-", "--").replace("/", "-")


def disk_host_mount_path(devices_dir: Path, name: str, dev: dict[str, str]) -> Path:
    """Where a block device disk's filesystem is mounted on the host before it is bind-mounted
    into the container: <devices dir>/disk.<device>.<path>, as LXD names it."""
    rel = container_path(dev).lstrip("/")
    return devices_dir / path_name_encode(f"disk.{name}.{rel}")


# -- host lookups (synchronous: call them in a thread from the event loop) -----------------------


def check_disk_source(name: str, dev: dict[str, str]) -> bool:
    """True when a host-path disk's source exists (a path to bind-mount, or a block device whose
    filesystem is mounted on the host first); False when it is missing and optional; BadRequest
    when it is missing and required."""
    source = dev["source"]
    try:
        os.stat(source)
    except FileNotFoundError:
        if disk_required(dev):
            raise BadRequest(f"Missing source path {source!r} for disk {name!r}") from None
        return False
    except OSError as e:
        raise BadRequest(f"Invalid source path {source!r} for disk {name!r}: {e.strerror}") from None
    return True


def is_block_source(dev: dict[str, str]) -> bool:
    """Whether a host-path disk's source is a block device (its filesystem gets mounted)."""
    try:
        return stat.S_ISBLK(os.stat(dev.get("source", "")).st_mode)
    except (OSError, ValueError):
        return False


def _idmap_supported(path: str | os.PathLike) -> bool:
    """The probe in this process (a pure render, tests); the daemon asks a worker (_idmap_ok)."""
    from lxd_daemon.runtime.hotplug import idmapped_mounts_supported

    return idmapped_mounts_supported(path)


async def _idmap_ok(ctx: DeviceContext, path: str | os.PathLike) -> bool:
    """Whether mounts of `path`'s filesystem can be idmapped: asked of a runtime worker (the
    probe forks), or probed here in a thread where there is no runtime."""
    if ctx.runtime is not None:
        return await ctx.runtime.idmapped_mounts_supported(str(path))
    return await asyncio.to_thread(_idmap_supported, path)


# -- the device ---------------------------------------------------------------------------------


class Disk(Device):
    type = "disk"
    options = OPTIONS

    def check(self, *, profile: bool, pools: set[str] | None) -> None:
        name, dev = self.name, self.config
        path = dev.get("path", "")
        if not path:
            raise BadRequest(f"Invalid device {name!r}: disk devices need a path")
        pool = dev.get("pool", "")
        if path == "/":
            if dev.get("source"):
                raise BadRequest(f"Invalid device {name!r}: the root disk cannot have a source")
            if not pool:
                raise BadRequest(f"Invalid device {name!r}: the root disk needs a pool")
            for k in ("readonly", "shift", "recursive", "propagation"):
                if dev.get(k):
                    raise BadRequest(f"Invalid device {name!r}: option {k!r} is not supported on the root disk")
            if dev.get("optional") and dev_bool(dev, "optional"):
                raise BadRequest(f"Invalid device {name!r}: the root disk cannot be optional")
        else:
            if dev.get("size"):
                raise BadRequest(f"Invalid device {name!r}: size is only supported on the root disk")
            source = dev.get("source", "")
            if not source:
                raise BadRequest(f"Invalid device {name!r}: disk devices other than the root disk need a source")
            if "\0" in source or "\n" in source:
                raise BadRequest(f"Invalid device {name!r}: invalid source path")
            if pool:
                self._check_volume()
            elif not source.startswith("/"):
                raise BadRequest(f"Invalid device {name!r}: source {source!r} must be an absolute host path "
                                 f"(or the name of a custom storage volume, with `pool`)")
            if "optional" in dev and "required" in dev and dev["optional"] and dev["required"]:
                if dev_bool(dev, "optional") == dev_bool(dev, "required"):
                    raise BadRequest(f"Invalid device {name!r}: optional and required contradict each other")
        if pool and pools is not None and pool not in pools:
            raise BadRequest(f"Invalid device {name!r}: storage pool {pool!r} doesn't exist")

    def _check_volume(self) -> None:
        name, dev = self.name, self.config
        if dev.get("shift"):
            raise BadRequest(f'Invalid device {name!r}: the "shift" property cannot be used with custom storage '
                             f'volumes (set security.shifted=true on the volume instead)')
        try:
            volume_source(dev["source"])
        except ValueError as e:
            raise BadRequest(f"Invalid device {name!r}: {e}") from None

    @property
    def is_root(self) -> bool:
        return is_root_disk(self.config)

    def claimed_path(self) -> str | None:
        return None if self.is_root else container_path(self.config)

    @property
    def hotpluggable(self) -> bool:
        return not self.is_root  # a root disk change applies at the next start

    def _mount(self, source: str, *, is_dir: bool, shift: bool) -> MountEntry:
        dev = self.config
        return MountEntry(source, container_path(dev), kind="dir" if is_dir else "file",
                          recursive=dev_bool(dev, "recursive"), readonly=dev_bool(dev, "readonly"),
                          propagation=dev.get("propagation", ""), shift=shift)

    def run_config(self, ctx: DeviceContext) -> RunConfig:
        """The bind mount: of what start() prepared (a volume, a block device's host mount), or
        of a host path. An optional disk whose source is missing, and a volume or block device
        disk that wasn't prepared (a pure render), need nothing."""
        name, dev = self.name, self.config
        if self.is_root:
            return RunConfig()
        prepared: DiskSource | None = ctx.prepared.get(name)
        if prepared is not None:  # checked by start() (idmapped mount support too)
            return RunConfig(mounts=[self._mount(prepared.path, is_dir=prepared.is_dir,
                                                 shift=prepared.shift and not ctx.privileged)])
        if dev.get("pool"):
            return RunConfig()
        source = dev["source"]
        if not check_disk_source(name, dev) or is_block_source(dev):
            return RunConfig()
        shift = dev_bool(dev, "shift") and not ctx.privileged
        if shift and not _idmap_supported(source):
            raise BadRequest(f"Invalid device {name!r}: shift=true needs idmapped mounts, which "
                             f"the filesystem of {source!r} doesn't support on this kernel")
        return RunConfig(mounts=[self._mount(source, is_dir=os.path.isdir(source), shift=shift)])

    async def start(self, ctx: DeviceContext) -> RunConfig:
        name, dev = self.name, self.config
        if self.is_root:
            return RunConfig()
        ctx.prepared.pop(name, None)
        is_volume = bool(dev.get("pool"))
        if not is_volume and not await asyncio.to_thread(is_block_source, dev):
            return await self._start_host_path(ctx)
        if ctx.instances is None:
            raise BadRequest(f"Invalid device {name!r}: volume and block device disks can only be "
                             f"plugged by the daemon")
        post_start = []
        if is_volume:
            prepared = await _prepare_volume(ctx, name, dev)
        else:
            mnt = disk_host_mount_path(ctx.devices_dir, name, dev)
            post_start.append(functools.partial(_unmount_host, mnt))
            try:
                await _mount_block(ctx, name, dev, mnt)
            except BaseException:
                await _unmount_host(mnt)
                raise
            prepared = DiskSource(str(mnt), True, dev_bool(dev, "shift") and not ctx.privileged)
        if prepared is None:  # an optional volume that doesn't exist
            return RunConfig()
        ctx.prepared[name] = prepared
        rc = await asyncio.to_thread(self.run_config, ctx)
        rc.post_start.extend(post_start)
        return rc

    async def _start_host_path(self, ctx: DeviceContext) -> RunConfig:
        """A host path is bound as it is; with shift=true its filesystem must support idmapped
        mounts, which a worker probes (then the checked source is recorded as prepared)."""
        name, dev = self.name, self.config
        if ctx.runtime is None or not (dev_bool(dev, "shift") and not ctx.privileged):
            return await asyncio.to_thread(self.run_config, ctx)
        source = dev["source"]
        if not await asyncio.to_thread(check_disk_source, name, dev):
            return RunConfig()
        if not await _idmap_ok(ctx, source):
            raise BadRequest(f"Invalid device {name!r}: shift=true needs idmapped mounts, which "
                             f"the filesystem of {source!r} doesn't support on this kernel")
        ctx.prepared[name] = DiskSource(source, await asyncio.to_thread(os.path.isdir, source), True)
        return await asyncio.to_thread(self.run_config, ctx)

    async def stop(self, ctx: DeviceContext) -> RunConfig:
        if self.is_root:
            return RunConfig()
        # The mount point goes too (LXD removes it; a directory only when it is empty).
        rc = RunConfig(mounts=[MountEntry("", container_path(self.config))])
        ref = volume_of(self.config)
        if ref is not None and ctx.instances is not None:
            rc.post_stop.append(functools.partial(unmount_if_unused, ctx.instances, ref[0], ref[1],
                                                  exclude=ctx.instance, project=ctx.project))
        return rc


# -- custom volumes -----------------------------------------------------------------------------


def _true(value: str | None) -> bool:
    return (value or "").lower() in TRUE


def _custom(services):
    custom = services.storage.custom if services.storage is not None else None
    if custom is None:
        raise BadRequest("Custom storage volumes are not available on this server")
    return custom


def volume_space(svc, project: str) -> str:
    """The project whose custom volumes instances of `project` attach (features.storage.volumes)."""
    return svc.projects.effective(project, "storage.volumes")


def _shares_volumes(svc, key: str, space: str) -> bool:
    """Whether instance `key` attaches custom volumes of project `space`."""
    rec = svc.records.get(key)
    return rec is not None and volume_space(svc, rec.project) == space


async def check_volumes(services, devices: dict[str, dict], *, project: str) -> None:
    """At the time a device is added (instance create/update, a profile change reaching an
    instance of `project`): every custom-volume disk names a volume of the project's effective
    volumes project that exists and holds a filesystem. BadRequest naming the device otherwise."""
    for dname, dev in devices.items():
        ref = volume_of(dev)
        if ref is None:
            continue
        pool, vname = ref
        if services.storage is None or pool not in services.storage.pools:
            raise BadRequest(f"Invalid device {dname!r}: storage pool {pool!r} doesn't exist")
        try:
            vol = await _custom(services).get(pool, vname, project=project)
        except NotFound:
            raise BadRequest(f"Invalid device {dname!r}: storage volume {vname!r} doesn't exist on "
                             f"storage pool {pool!r}") from None
        if str(getattr(vol, "content_type", "filesystem")) == "block":
            raise BadRequest(f"Invalid device {dname!r}: custom block volumes cannot be used on containers")


async def _prepare_volume(ctx: DeviceContext, dname: str, dev: dict) -> DiskSource | None:
    """Mount (and shift) a custom volume for the container; None for an optional one missing."""
    custom = _custom(ctx.instances.services)
    try:
        vname = volume_source(dev["source"])
    except ValueError as e:
        raise BadRequest(f"Invalid device {dname!r}: {e}") from None
    pool = dev["pool"]
    try:
        vol = await custom.get(pool, vname, project=ctx.project)
    except NotFound:
        if disk_required(dev):
            raise BadRequest(f"Storage volume {vname!r} doesn't exist on storage pool {pool!r} "
                             f"(device {dname!r})") from None
        return None
    if str(getattr(vol, "content_type", "filesystem")) == "block":
        raise BadRequest(f"Invalid device {dname!r}: custom block volumes cannot be used on containers")
    try:
        path = Path(await custom.mount(pool, vname, project=ctx.project))
    except LXDError as e:
        raise BadRequest(f"Failed mounting storage volume {vname!r} on storage pool {pool!r}: "
                         f"{e.message}") from None
    config = dict(getattr(vol, "config", {}) or {})
    shifted = _true(config.get("security.shifted"))
    if not _true(config.get("security.unmapped")):
        lock = _VOLUME_LOCKS.setdefault((volume_space(ctx.instances, ctx.project), pool, vname), asyncio.Lock())
        async with lock:
            # re-read under the lock: a parallel start may just have shifted it
            vol = await custom.get(pool, vname, project=ctx.project)
            await _shift_volume(ctx, pool, vname, dict(getattr(vol, "config", {}) or {}), path)
    shift = shifted and not ctx.privileged
    if shift and not await _idmap_ok(ctx, path):
        raise BadRequest(f"Storage volume {vname!r} has security.shifted=true, but the kernel can't "
                         f"shift (idmap) mounts of its filesystem")
    return DiskSource(str(path), True, shift)


def _map_of(svc, other: str) -> IdmapSet | None:
    """The map another container's files are at: its running map, else the next one."""
    rec = svc.records.get(other)
    if rec is None:
        return None
    running = svc.status_of(other)[0] != "Stopped"
    text = rec.config.get("volatile.idmap.current") if running else None
    text = text or rec.config.get("volatile.idmap.next")
    return IdmapSet.from_json(text) if text else None


async def _shift_volume(ctx: DeviceContext, pool: str, vname: str, config: dict, path: Path) -> None:
    from lxd_daemon.instances.idmap import shift_tree

    svc = ctx.instances
    last_text = config.get("volatile.idmap.last")
    last = IdmapSet.from_json(last_text) if last_text else IdmapSet(())
    shifted = _true(config.get("security.shifted"))
    nxt = IdmapSet(()) if shifted else ctx.idmap
    if last != nxt:
        if not shifted:
            space = volume_space(svc, ctx.project)
            for other in sorted(svc.records):
                if other == ctx.instance or not _shares_volumes(svc, other, space):
                    continue
                try:
                    expanded = svc.expanded(other)[1]
                except LXDError:
                    continue
                if not uses_volume(expanded, pool, vname):
                    continue
                theirs = _map_of(svc, other)
                if theirs is not None and theirs != nxt:
                    raise BadRequest(f"Idmaps of container {svc.records[other].name!r} and storage volume {vname!r} are not "
                                     f"identical (set security.shifted=true on the volume to share it)")
        n = await asyncio.to_thread(shift_tree, path, last, nxt)
        log.info("shifted storage volume", extra={"pool": pool, "volume": vname, "entries": n})
    text = nxt.to_json()
    if config.get("volatile.idmap.last") != text or config.get("volatile.idmap.next") != text:
        await _custom(svc.services).set_config_keys(
            pool, vname, {"volatile.idmap.last": text, "volatile.idmap.next": text}, project=ctx.project)


async def unmount_if_unused(svc, pool: str, vname: str, *, exclude: str, project: str) -> None:
    """Storage unmounts the volume (a no-op for dir and btrfs) of instance `exclude` (a key) of
    `project` unless another running container attaching the same volume uses it."""
    if svc.services.storage is None:
        return
    unmount = svc.services.storage.custom.unmount
    space = volume_space(svc, project)
    for other in list(svc.records):
        if other == exclude or not _shares_volumes(svc, other, space) or svc.status_of(other)[0] == "Stopped":
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


async def volume_used_by(svc, profiles, pool: str, name: str, project: str) -> list[str]:
    """Instances (by their expanded devices) and profiles whose disks attach the custom volume
    `name` stored in project `project`: those of every project whose effective volumes project
    that is. URLs carry their project."""
    from lxd_daemon.projects.naming import query

    users = [p for p in svc.projects.names() if volume_space(svc, p) == project]
    out: set[str] = set()
    for user in users:
        for pname, p in profiles.in_project(user).items():
            if uses_volume(p.devices, pool, name):
                out.add(f"/1.0/profiles/{pname}{query(getattr(p, 'project', user))}")
    for n in sorted(svc.records):
        if svc.records[n].project not in users:
            continue
        try:
            expanded = svc.expanded(n)[1]
        except LXDError:
            continue
        if uses_volume(expanded, pool, name):
            out.add(svc.url(n))
    return sorted(out)


# -- block devices ------------------------------------------------------------------------------


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


def _remove_mountpoint(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            path.rmdir()
        elif path.exists() or path.is_symlink():
            path.unlink()
    except OSError:
        pass


async def _unmount_host(path: Path) -> None:
    """Lazily unmount a host-side mount point (if mounted) and remove it."""
    if await asyncio.to_thread(_is_mountpoint, path):
        rc, out = await _run("umount", "-l", str(path))
        if rc != 0:
            log.warning("couldn't unmount a disk's host-side mount", extra={"path": str(path), "err": out})
            return
    await asyncio.to_thread(_remove_mountpoint, path)


async def _mount_block(ctx: DeviceContext, dname: str, dev: dict, mnt: Path) -> None:
    source = dev["source"]
    devices_dir = ctx.devices_dir

    def make() -> None:
        devices_dir.mkdir(parents=True, exist_ok=True, mode=0o711)
        os.chmod(devices_dir, 0o711)
        mnt.mkdir(mode=0o700)

    await _unmount_host(mnt)  # a leftover of an earlier start
    await asyncio.to_thread(make)
    opts = ["ro"] if dev_bool(dev, "readonly") else []
    cmd = ["mount", *(["-o", ",".join(opts)] if opts else []), "--", source, str(mnt)]
    rc, out = await _run(*cmd)
    if rc != 0:
        raise BadRequest(f"Failed to mount {source!r} for disk {dname!r}: {out or 'mount failed'}")
    if dev_bool(dev, "shift") and not ctx.privileged and not await _idmap_ok(ctx, mnt):
        raise BadRequest(f"Invalid device {dname!r}: shift=true needs idmapped mounts, which the "
                         f"filesystem on {source!r} doesn't support on this kernel")


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
