"""Live changes to running containers, run inside the liblxc worker (registered with @worker.method):
cgroup limits, and the mounts and device cgroup rules of a hot-plugged device (instances/live.py
applies a device's RunConfig, lxd_daemon/devices/, through these primitives; nothing here knows
device types).

Mount injection uses the new mount API (Linux >= 5.2): the worker forks a child, which clones the
host path as a detached mount (open_tree(OPEN_TREE_CLONE)), makes it read-only and/or idmapped to
the container's user namespace (mount_setattr), enters the container's mount namespace (setns)
and attaches it with move_mount(). Entering the namespace first means every path is resolved
against the container's own root, so a symlink planted in the container can't redirect the mount
onto the host. Mount points are created with the filesystem ids of the container's root, so they
belong to it (and nothing is created where container root couldn't create it).

Module import is cheap (ctypes only); `lxc` is imported inside the methods that need it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import struct

from lxd_daemon.runtime.worker import Worker, method
from lxd_daemon.util.cgroups import own_cgroup

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_MOUNT_SETATTR = 442

OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
AT_SYMLINK_NOFOLLOW = 0x100
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_IDMAP = 0x100000
MS_UNBINDABLE = 1 << 17
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_REC = 0x4000
CLONE_NEWNS = 0x20000
CLONE_NEWUSER = 0x10000000
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8

PROPAGATION_FLAGS = {"private": MS_PRIVATE, "shared": MS_SHARED, "slave": MS_SLAVE,
                     "unbindable": MS_UNBINDABLE}


class MountError(OSError):
    pass


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise MountError(err, f"{what}: {os.strerror(err)}")
    return ret


def open_tree(path: str, *, recursive: bool = False, dfd: int = AT_FDCWD, flags: int = 0) -> int:
    fl = OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | flags | (AT_RECURSIVE if recursive else 0)
    return _check(_libc.syscall(SYS_OPEN_TREE, dfd, path.encode(), fl), f"open_tree({path})")


def mount_setattr(fd: int, *, attr_set: int = 0, attr_clr: int = 0, propagation: int = 0,
                  userns_fd: int = 0, recursive: bool = False) -> None:
    attr = struct.pack("QQQQ", attr_set, attr_clr, propagation, userns_fd)
    buf = ctypes.create_string_buffer(attr, len(attr))
    flags = AT_EMPTY_PATH | (AT_RECURSIVE if recursive else 0)
    _check(_libc.syscall(SYS_MOUNT_SETATTR, fd, b"", flags, buf, len(attr)), "mount_setattr")


def move_mount(fd: int, target: str) -> None:
    _check(_libc.syscall(SYS_MOVE_MOUNT, fd, b"", AT_FDCWD, target.encode(), MOVE_MOUNT_F_EMPTY_PATH),
           f"move_mount({target})")


def setns(fd: int, nstype: int) -> None:
    _check(_libc.setns(fd, nstype), "setns")


def umount(target: str, flags: int = MNT_DETACH | UMOUNT_NOFOLLOW) -> None:
    _check(_libc.umount2(target.encode(), flags), f"umount({target})")


def set_propagation(target: str, prop: str) -> None:
    base = prop[1:] if prop.startswith("r") and prop[1:] in PROPAGATION_FLAGS else prop
    flags = PROPAGATION_FLAGS[base] | (MS_REC if prop != base else 0)
    _check(_libc.mount(None, target.encode(), None, ctypes.c_ulong(flags), None), f"mount --make-{prop}")


# -- idmapped mount support ---------------------------------------------------------------------

_IDMAP_SUPPORT: dict[int, bool] = {}


def idmapped_mounts_supported(path: str | os.PathLike) -> bool:
    """Whether a mount of `path`'s filesystem can be idmapped on this kernel (tried for real once
    per filesystem: a detached clone is idmapped to a throw-away user namespace)."""
    try:
        dev = os.stat(path).st_dev
    except OSError:
        return False
    if dev in _IDMAP_SUPPORT:
        return _IDMAP_SUPPORT[dev]
    ok = _try_idmap(str(path))
    _IDMAP_SUPPORT[dev] = ok
    return ok


def _try_idmap(path: str) -> bool:
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: a new user namespace, held until the parent is done with it
        try:
            os.close(r1)
            os.close(w2)
            rc = _libc.unshare(CLONE_NEWUSER)
            os.write(w1, b"1" if rc == 0 else b"0")
            os.read(r2, 1)
        finally:
            os._exit(0)
    os.close(w1)
    os.close(r2)
    fd = nsfd = -1
    try:
        if os.read(r1, 1) != b"1":
            return False
        for kind in ("uid_map", "gid_map"):
            with open(f"/proc/{pid}/{kind}", "w") as f:
                f.write("0 1000000 65536\n")
        nsfd = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        fd = open_tree(path)
        mount_setattr(fd, attr_set=MOUNT_ATTR_IDMAP, userns_fd=nsfd)
        return True
    except OSError:
        return False
    finally:
        for x in (fd, nsfd):
            if x >= 0:
                os.close(x)
        os.close(w2)
        os.close(r1)
        os.waitpid(pid, 0)


# -- injection into a running container -----------------------------------------------------------


def _in_child(fn) -> None:
    """Run fn() in a forked child (it changes namespaces and fs ids); raise its error here."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(r)
            fn()
        except BaseException as e:  # report anything to the parent
            msg = e.strerror if isinstance(e, MountError) else str(e)
            if isinstance(e, OSError) and not isinstance(e, MountError):
                msg = f"{e.strerror}: {e.filename}" if e.filename else (e.strerror or str(e))
            try:
                os.write(w, (msg or e.__class__.__name__).encode()[:4000])
            except OSError:
                pass
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    while True:
        b = os.read(r, 4096)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        raise MountError(errno.EIO, b"".join(chunks).decode(errors="replace") or "mount helper failed")


def _setfsids(uid: int, gid: int) -> None:
    _libc.setfsgid(gid)
    _libc.setfsuid(uid)


def _makedirs(path: str, mode: int = 0o755) -> None:
    """mkdir -p, resolving in the current (container) mount namespace; refuses a non-directory."""
    parts = [p for p in path.split("/") if p]
    cur = "/"
    for p in parts:
        cur = os.path.join(cur, p)
        try:
            os.mkdir(cur, mode)
        except FileExistsError:
            if not os.path.isdir(cur):
                raise MountError(errno.ENOTDIR, f"{cur} exists and is not a directory") from None


def _make_target(target: str, kind: str) -> None:
    if kind == "dir":
        _makedirs(target)
        return
    _makedirs(os.path.dirname(target) or "/")
    if os.path.lexists(target):
        if os.path.isdir(target) or os.path.islink(target):
            raise MountError(errno.EEXIST, f"{target} exists and is not a file")
        return
    fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    os.close(fd)


def inject_mount(pid: int, source: str, target: str, *, kind: str = "dir", recursive: bool = False,
                 readonly: bool = False, propagation: str = "", shift: bool = False,
                 root_uid: int = 0, root_gid: int = 0) -> None:
    """Bind-mount host `source` at `target` inside the mount namespace of process `pid`."""

    def child() -> None:
        fd = open_tree(source, recursive=recursive)
        attrs = MOUNT_ATTR_RDONLY if readonly else 0
        if shift:
            userns = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
            mount_setattr(fd, attr_set=attrs | MOUNT_ATTR_IDMAP, userns_fd=userns, recursive=recursive)
        elif attrs:
            mount_setattr(fd, attr_set=attrs, recursive=recursive)
        mntns = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        setns(mntns, CLONE_NEWNS)
        os.chdir("/")
        _setfsids(root_uid, root_gid)
        _make_target(target, kind)
        _setfsids(0, 0)
        move_mount(fd, target)
        if propagation:
            set_propagation(target, propagation)

    _in_child(child)


def eject_mount(pid: int, target: str, *, remove: bool = False, root_uid: int = 0,
                root_gid: int = 0) -> None:
    """Unmount `target` inside the mount namespace of `pid` (lazily), optionally removing the
    mount point as container root, as LXD does when a device goes. Only what holds nothing goes:
    an empty directory, an empty file, a device node or symlink. A directory with files in it or
    a file with content was the container's before the mount hid it and stays (LXD would delete
    such a file)."""

    def child() -> None:
        mntns = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        setns(mntns, CLONE_NEWNS)
        os.chdir("/")
        _setfsids(root_uid, root_gid)
        try:
            umount(target)
        except MountError as e:
            if e.errno not in (errno.EINVAL, errno.ENOENT):
                raise
        if remove:
            try:
                st = os.lstat(target)
                if stat.S_ISDIR(st.st_mode):
                    os.rmdir(target)  # ENOTEMPTY: the container's own files, kept
                elif not (stat.S_ISREG(st.st_mode) and st.st_size > 0):
                    os.unlink(target)
            except OSError:
                pass

    _in_child(child)


# -- worker methods -----------------------------------------------------------------------------


@method()
def hotplug_mount(worker: Worker, pid: int, source: str, target: str, options: dict) -> None:
    inject_mount(pid, source, target, kind=options.get("kind", "dir"),
                 recursive=bool(options.get("recursive")), readonly=bool(options.get("readonly")),
                 propagation=options.get("propagation", ""), shift=bool(options.get("shift")),
                 root_uid=int(options.get("root_uid", 0)), root_gid=int(options.get("root_gid", 0)))


@method()
def idmap_supported(worker: Worker, path: str) -> bool:
    """Whether mounts of `path`'s filesystem can be idmapped (the probe forks: done here)."""
    return idmapped_mounts_supported(path)


@method()
def hotplug_unmount(worker: Worker, pid: int, target: str, remove: bool = False, root_uid: int = 0,
                    root_gid: int = 0) -> None:
    eject_mount(pid, target, remove=remove, root_uid=root_uid, root_gid=root_gid)


def _cgroup_mounts() -> tuple[dict[str, str], str | None]:
    v1: dict[str, str] = {}
    v2 = None
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) < 4:
                continue
            if parts[2] == "cgroup":
                for o in parts[3].split(","):
                    v1.setdefault(o, parts[1])
            elif parts[2] == "cgroup2" and v2 is None:
                v2 = parts[1]
    return v1, v2


def cgroup_dirs(pid: int, name: str) -> tuple[dict[str, str], str | None]:
    """Host directories of container `name`'s own cgroups, found through its process `pid`:
    ({v1 controller: dir}, v2 dir). Never a directory outside the container's cgroup: a hierarchy
    in which the pid is not inside it (a pid gone or reused, an exiting init the kernel already
    moved to the root cgroup) is left out, so nothing is written there."""
    mounts, v2mnt = _cgroup_mounts()
    v1: dict[str, str] = {}
    v2 = None
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _, ctrls, path = line.rstrip("\n").split(":", 2)
            own = own_cgroup(path, name)
            if own is None:
                continue
            if ctrls == "":
                if v2mnt:
                    v2 = v2mnt + own
                continue
            for c in ctrls.split(","):
                if c in mounts:
                    v1[c] = mounts[c] + own
    return v1, v2


def write_cgroup_files(pid: int, items: list, name: str) -> list:
    """Write [version, "controller.file", value] items to the cgroups of `pid`, in order.

    An item that fails is retried once after the others (memory.limit_in_bytes and
    memory.memsw.limit_in_bytes must be changed in an order that depends on the direction).
    Returns the items that still failed as [key, value, error]."""
    try:
        v1, v2 = cgroup_dirs(pid, name)
    except OSError as e:
        return [[k, val, e.strerror or str(e)] for _, k, val in items]
    pending = list(items)
    failed: list = []
    for _attempt in range(2):
        failed = []
        for ver, key, value in pending:
            controller = key.split(".", 1)[0]
            base = v2 if ver == 2 else v1.get(controller)
            if base is None:
                failed.append([ver, key, value, f"no {controller} cgroup"])
                continue
            try:
                fd = os.open(os.path.join(base, key), os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
                try:
                    os.write(fd, str(value).encode())
                finally:
                    os.close(fd)
            except OSError as e:
                failed.append([ver, key, value, e.strerror or str(e)])
        if not failed:
            return []
        pending = [f[:3] for f in failed]
    return [[k, val, err] for _, k, val, err in failed]


@method()
def set_cgroup_files(worker: Worker, pid: int, items: list, name: str) -> list:
    return write_cgroup_files(pid, items, name)


@method()
def read_cgroup_files(worker: Worker, pid: int, items: list, name: str) -> dict:
    """{"controller.file": content} for [version, "controller.file"] items (None when unreadable)."""
    try:
        v1, v2 = cgroup_dirs(pid, name)
    except OSError:
        return {key: None for _, key in items}
    out = {}
    for ver, key in items:
        base = v2 if ver == 2 else v1.get(key.split(".", 1)[0])
        try:
            if base is None:
                out[key] = None
                continue
            with open(os.path.join(base, key)) as f:
                out[key] = f.read().strip()
        except OSError:
            out[key] = None
    return out
