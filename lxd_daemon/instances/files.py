"""The instance file API: read, write, list and delete files inside a container's root.

Every path is resolved with openat2(2) and RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS relative to a
descriptor of the host-side root filesystem, so `..` and symlinks (relative or absolute) stay
inside the container whatever they say: the kernel treats the rootfs as "/" for the lookup. The
last component is first opened with O_PATH (which never opens a device or blocks on a FIFO),
checked with fstat, and only a regular file is then reopened for reading or writing through its
/proc/self/fd link. This works the same on stopped and running containers (the files are read
on the host side, so mounts made inside a running container are not visible here).

Ownership on disk is translated through the instance's disk idmap: the API shows and takes the
ids as the container sees them.

All functions here are blocking; the API calls them through asyncio.to_thread.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from dataclasses import dataclass

from lxd_daemon.errors import BadRequest, Conflict, Forbidden, NotFound, insufficient_storage

SYS_openat2 = 437
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def openat2(dirfd: int, path: str, flags: int, mode: int = 0,
            resolve: int = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS) -> int:
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    raw = os.fsencode(path)
    while True:
        fd = _libc.syscall(SYS_openat2, ctypes.c_int(dirfd), ctypes.c_char_p(raw), ctypes.byref(how),
                           ctypes.c_size_t(ctypes.sizeof(how)))
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err == errno.EAGAIN or err == errno.EINTR:
            continue  # a concurrent rename raced the lookup: retry
        raise OSError(err, os.strerror(err), path)


def normalize(path: str | None) -> str:
    """The API path, relative to the container root ("" is the root itself)."""
    if path is None or path == "":
        raise BadRequest("Missing path argument")
    if "\x00" in path:
        raise BadRequest("Invalid path")
    # The stock client sends `path=root/x` (no leading slash) for pulls: resolve from the root.
    return path.lstrip("/")


def split(rel: str) -> tuple[str, str]:
    """(parent, last component) of a normalized path; refuses paths whose last part is . or .."""
    rel = rel.rstrip("/")
    parent, _, name = rel.rpartition("/")
    if name in ("", ".", ".."):
        raise BadRequest("Invalid path: it must name a file inside the instance")
    return parent or ".", name


def _fail(e: OSError, path: str):
    code = e.errno
    if code in (errno.ENOENT, errno.ENOTDIR):
        raise NotFound(f"Path {path!r} not found") from None
    if code == errno.EXDEV:
        raise Forbidden(f"Path {path!r} leaves the instance") from None
    if code in (errno.EACCES, errno.EPERM):
        raise Forbidden(f"Permission denied: {path!r}") from None
    if code == errno.ELOOP:
        raise BadRequest(f"Too many levels of symbolic links in {path!r}") from None
    if code == errno.EEXIST:
        raise Conflict(f"Path {path!r} already exists") from None
    if code == errno.ENOTEMPTY:
        raise BadRequest(f"Directory {path!r} isn't empty") from None
    if code == errno.EISDIR:
        raise BadRequest(f"Path {path!r} is a directory") from None
    if code in (errno.ENOSPC, errno.EDQUOT):
        raise insufficient_storage(e, f"the instance's files (writing {path!r})", "") from None
    raise BadRequest(f"{e.strerror}: {path!r}") from None


class Root:
    """A container root filesystem, opened once per request."""

    def __init__(self, rootfs: str | os.PathLike, idmap=None):
        self.idmap = idmap
        try:
            self.fd = os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound("The instance's root filesystem is missing") from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Root:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- ids -------------------------------------------------------------------------
    def to_container(self, uid: int, gid: int) -> tuple[int, int]:
        if self.idmap is None or self.idmap.empty:
            return uid, gid
        cu, cg = self.idmap.to_container(uid, gid)
        return (cu if cu >= 0 else 65534), (cg if cg >= 0 else 65534)

    def to_host(self, uid: int, gid: int) -> tuple[int, int]:
        if self.idmap is None or self.idmap.empty:
            return uid, gid
        hu, hg = self.idmap.to_host(uid, gid)
        if (uid >= 0 and hu < 0) or (gid >= 0 and hg < 0):
            raise BadRequest(f"uid {uid} / gid {gid} isn't mapped in the instance")
        return hu, hg

    # -- lookups ---------------------------------------------------------------------
    def open_path(self, rel: str, *, follow: bool = False) -> int:
        """An O_PATH fd for rel (the last component not followed unless asked)."""
        flags = os.O_PATH | (0 if follow else os.O_NOFOLLOW)
        try:
            return openat2(self.fd, rel or ".", flags)
        except OSError as e:
            _fail(e, "/" + rel)

    def open_dir(self, rel: str) -> int:
        try:
            return openat2(self.fd, rel or ".", os.O_PATH | os.O_DIRECTORY)
        except OSError as e:
            _fail(e, "/" + rel)


def reopen(pathfd: int, flags: int) -> int:
    """Open the very inode an O_PATH fd names (no new path lookup)."""
    return os.open(f"/proc/self/fd/{pathfd}", flags | os.O_CLOEXEC)


@dataclass
class Entry:
    type: str  # file | directory | symlink
    uid: int
    gid: int
    mode: int
    mtime: float
    size: int
    fd: int | None = None  # regular file opened for reading
    names: list[str] | None = None  # directory
    target: bytes | None = None  # symlink

    def headers(self) -> dict[str, str]:
        from email.utils import formatdate

        return {"X-LXD-uid": str(self.uid), "X-LXD-gid": str(self.gid), "X-LXD-mode": f"{self.mode:04o}",
                "X-LXD-type": self.type, "X-LXD-modified": formatdate(self.mtime, usegmt=True)}


def stat_entry(root: Root, path: str | None, *, open_file: bool) -> Entry:
    """What GET/HEAD return for path: a regular file (opened when asked), a directory listing,
    or a symlink's target."""
    rel = normalize(path)
    pfd = root.open_path(rel)
    try:
        st = os.fstat(pfd)
        uid, gid = root.to_container(st.st_uid, st.st_gid)
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISLNK(st.st_mode):
            target = _readlink(pfd)
            return Entry("symlink", uid, gid, mode, st.st_mtime, len(target), target=target)
        if stat.S_ISDIR(st.st_mode):
            dfd = reopen(pfd, os.O_RDONLY | os.O_DIRECTORY)
            try:
                names = sorted(os.listdir(dfd))
            finally:
                os.close(dfd)
            return Entry("directory", uid, gid, mode, st.st_mtime, 0, names=names)
        if not stat.S_ISREG(st.st_mode):
            raise BadRequest(f"Path {'/' + rel!r} isn't a regular file, directory or symlink")
        fd = reopen(pfd, os.O_RDONLY | os.O_NONBLOCK) if open_file else None
        return Entry("file", uid, gid, mode, st.st_mtime, st.st_size, fd=fd)
    finally:
        os.close(pfd)


def _readlink(pfd: int) -> bytes:
    """readlinkat(fd, "") on an O_PATH|O_NOFOLLOW fd reads the link itself."""
    buf = ctypes.create_string_buffer(4096)
    _libc.readlinkat.restype = ctypes.c_ssize_t
    n = _libc.readlinkat(ctypes.c_int(pfd), b"", buf, ctypes.c_size_t(len(buf)))
    if n < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return buf.raw[:n]


ID_MAX = 2**32 - 2  # the largest uid/gid: (uid_t)-1 means "unchanged" to chown()


@dataclass
class WriteSpec:
    type: str = "file"  # file | directory | symlink
    uid: int = -1  # container ids; -1 means "not given"
    gid: int = -1
    mode: int = -1
    append: bool = False


def parse_headers(headers) -> WriteSpec:
    """X-LXD-uid/gid/mode/type/write, as the stock client and pylxd send them."""
    spec = WriteSpec()

    def num(name: str, base: int = 10) -> int:
        raw = headers.get(name)
        if raw is None or raw.strip() == "":
            return -1
        raw = raw.strip()
        try:
            return int(raw, base)
        except ValueError:
            raise BadRequest(f"Invalid {name} header {raw!r}") from None

    spec.uid = num("X-LXD-uid")
    spec.gid = num("X-LXD-gid")
    for name, value in (("X-LXD-uid", spec.uid), ("X-LXD-gid", spec.gid)):
        if not -1 <= value <= ID_MAX:  # -1: not given; (uid_t)-1 itself is no id
            raise BadRequest(f"Invalid {name} header {value}: ids are 0 to {ID_MAX}")
    raw_mode = (headers.get("X-LXD-mode") or "").strip()
    if raw_mode:
        try:
            # A leading 0 means octal (pylxd and the CLI send 0644); LXD parses with base 0.
            spec.mode = int(raw_mode, 8) if raw_mode.startswith("0") else int(raw_mode, 0)
        except ValueError:
            raise BadRequest(f"Invalid X-LXD-mode header {raw_mode!r}") from None
        if spec.mode > 0o7777 or spec.mode < 0:
            raise BadRequest(f"Invalid X-LXD-mode header {raw_mode!r}")
    kind = (headers.get("X-LXD-type") or "file").strip() or "file"
    if kind not in ("file", "directory", "symlink"):
        raise BadRequest(f"Invalid X-LXD-type header {kind!r}")
    spec.type = kind
    write = (headers.get("X-LXD-write") or "overwrite").strip() or "overwrite"
    if write not in ("overwrite", "append"):
        raise BadRequest(f"Invalid X-LXD-write header {write!r}")
    spec.append = write == "append"
    return spec


def _owner(root: Root, spec: WriteSpec) -> tuple[int, int]:
    uid = spec.uid if spec.uid >= 0 else 0
    gid = spec.gid if spec.gid >= 0 else 0
    return root.to_host(uid, gid)


def open_for_write(root: Root, path: str | None, spec: WriteSpec, *, links: int = 0) -> tuple[int, bool]:
    """Open (creating it if missing) the regular file at path for writing. Returns (fd, created).

    Mode and owner are applied only when the file is created, as LXD 5.0.2 does; an existing
    file keeps its metadata and is appended to, or overwritten in place: end_write() then cuts
    what is left of the old contents. A symlink as last component is followed inside the
    container root."""
    rel = normalize(path)
    parent, name = split(rel)
    dfd = root.open_dir(parent)
    try:
        try:
            pfd = openat2(dfd, name, os.O_PATH | os.O_NOFOLLOW, resolve=RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
        except FileNotFoundError:
            pfd = -1
        except OSError as e:
            _fail(e, "/" + rel)
        if pfd >= 0:
            try:
                st = os.fstat(pfd)
                if stat.S_ISLNK(st.st_mode):
                    os.close(pfd)
                    pfd = -1
                    # Follow it inside the container root; create the target if it dangles.
                    try:
                        pfd = root.open_path(rel, follow=True)
                    except NotFound:
                        return _create_via_link(root, rel, spec, links + 1)
                    st = os.fstat(pfd)
                if stat.S_ISDIR(st.st_mode):
                    raise BadRequest(f"Path {'/' + rel!r} is a directory")
                if not stat.S_ISREG(st.st_mode):
                    raise BadRequest(f"Path {'/' + rel!r} isn't a regular file")
                return reopen(pfd, os.O_WRONLY | (os.O_APPEND if spec.append else 0)), False
            finally:
                if pfd >= 0:
                    os.close(pfd)
        return _create(root, dfd, name, rel, spec), True
    finally:
        os.close(dfd)


def end_write(fd: int, spec: WriteSpec) -> None:
    """Finish a write through open_for_write(), also a failed one: an overwrite ends where the
    new contents end.

    Overwriting in place instead of truncating at open() reuses the file's blocks and cached
    pages: on ext4, truncating a 100 MiB file and writing it anew costs several times the write
    itself (freeing and reallocating the blocks, waiting for the old pages' writeback, and the
    flush that ext4 starts on close() after a truncate). What is left after a failure is the same
    as with truncation: the part of the new contents that was written."""
    if not spec.append:
        os.ftruncate(fd, os.lseek(fd, 0, os.SEEK_CUR))


def _create(root: Root, dfd: int, name: str, rel: str, spec: WriteSpec) -> int:
    mode = spec.mode if spec.mode >= 0 else 0o644
    uid, gid = _owner(root, spec)
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
    except OSError as e:
        _fail(e, "/" + rel)
    try:
        os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)  # after chown, which clears setuid bits
    except BaseException:
        os.close(fd)
        os.unlink(name, dir_fd=dfd)
        raise
    return fd


MAX_LINKS = 40  # as the kernel's limit on symlinks followed in one lookup


def _create_via_link(root: Root, rel: str, spec: WriteSpec, links: int) -> tuple[int, bool]:
    """The last component is a dangling symlink: create its target, resolved inside the root.
    Links whose targets lead back to a dangling link (`l -> missing/../l`) end after MAX_LINKS."""
    if links > MAX_LINKS:
        raise BadRequest(f"Too many levels of symbolic links in {'/' + rel!r}")
    pfd = root.open_path(rel)
    try:
        target = os.fsdecode(_readlink(pfd))
    finally:
        os.close(pfd)
    parent = rel.rpartition("/")[0]
    joined = target if target.startswith("/") else f"{parent}/{target}"
    # normpath on an absolute path: `..` can't climb above "/" (the container root).
    return open_for_write(root, os.path.normpath("/" + joined), spec, links=links)


def mkdir(root: Root, path: str | None, spec: WriteSpec) -> bool:
    """Create a directory (default mode 0750); an existing directory is left as it is."""
    rel = normalize(path)
    parent, name = split(rel)
    dfd = root.open_dir(parent)
    try:
        mode = spec.mode if spec.mode >= 0 else 0o750
        uid, gid = _owner(root, spec)
        try:
            os.mkdir(name, 0o700, dir_fd=dfd)
        except FileExistsError:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                return False
            if stat.S_ISLNK(st.st_mode):
                os.close(root.open_dir(rel))  # a link to a directory (inside the root), or 404
                return False
            raise Conflict(f"Path {'/' + rel!r} exists and isn't a directory") from None
        except OSError as e:
            _fail(e, "/" + rel)
        pfd = openat2(dfd, name, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY)
        try:
            os.chown(f"/proc/self/fd/{pfd}", uid, gid)
            os.chmod(f"/proc/self/fd/{pfd}", mode)
        finally:
            os.close(pfd)
        return True
    finally:
        os.close(dfd)


def symlink(root: Root, path: str | None, target: bytes, spec: WriteSpec) -> None:
    """Create (or replace) a symlink; its target is stored verbatim (it is only ever followed
    inside the container)."""
    rel = normalize(path)
    parent, name = split(rel)
    if not target or b"\x00" in target:
        raise BadRequest("Invalid symlink target")
    dfd = root.open_dir(parent)
    try:
        uid, gid = _owner(root, spec)
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None:
            if stat.S_ISDIR(st.st_mode):
                raise Conflict(f"Path {'/' + rel!r} exists and is a directory")
            os.unlink(name, dir_fd=dfd)
        try:
            os.symlink(target, name, dir_fd=dfd)
        except OSError as e:
            _fail(e, "/" + rel)
        os.chown(name, uid, gid, dir_fd=dfd, follow_symlinks=False)
    finally:
        os.close(dfd)


def delete(root: Root, path: str | None) -> None:
    """Remove a file, symlink or empty directory (never following the last component)."""
    rel = normalize(path)
    parent, name = split(rel)
    dfd = root.open_dir(parent)
    try:
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except OSError as e:
            _fail(e, "/" + rel)
        try:
            if stat.S_ISDIR(st.st_mode):
                os.rmdir(name, dir_fd=dfd)
            else:
                os.unlink(name, dir_fd=dfd)
        except OSError as e:
            _fail(e, "/" + rel)
    finally:
        os.close(dfd)
