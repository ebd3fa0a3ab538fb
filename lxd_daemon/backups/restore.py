"""Reading backup tarballs: checked first, then unpacked into new volumes.

The scan (one pass over the file, before anything is created) refuses, with a BadRequest naming
the member:
- a member outside `backup/` once normalised, an absolute name, a `..` component, a NUL;
- a member under a member that is a symlink (nothing is written through a link), or a symlink
  replacing a directory already seen;
- a hard link to anything but an earlier member of the same volume (or snapshot) tree;
- a character or block device outside a `rootfs/` tree; any other special member type;
- a missing or invalid `backup/index.yaml`, a snapshot the index names but the tarball lacks,
  a missing volume tree (or optimised stream);
- a truncated or corrupt archive (the tar reader or the decompressor fails).
Optimised members (`*.bin`, `optimized_header.yaml`) are spooled to files during the scan, for
the driver to read. The unpacking itself is GNU tar (numeric owners, xattrs, ACLs, devices),
one member tree at a time with its leading components stripped.
"""

from __future__ import annotations

import asyncio
import errno
import io
import os
import posixpath
import shutil
import subprocess
import tarfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from lxd_daemon.backups.config import BackupConfig, BackupIndex, parse_backup_yaml, parse_index_yaml
from lxd_daemon.errors import BadRequest, InsufficientStorage, LXDError
from lxd_daemon.storage.drivers import tools
from lxd_daemon.util import gz

CHUNK = 1 << 20

MAGIC = [(b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd")]
DECOMPRESSORS = {"gzip": ["gzip", "-d", "-c"], "bzip2": ["bzip2", "-d", "-c"], "xz": ["xz", "-d", "-c", "-T0"],
                 "zstd": ["zstd", "-d", "-c", "-q"]}
MAX_YAML = 16 << 20
SPECIAL_OK = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE,
              tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE, tarfile.CONTTYPE, tarfile.GNUTYPE_SPARSE)
# Volume member directories: (the volume's, its snapshots') per backup type.
TREES = {"container": ("container", "snapshots"), "virtual-machine": ("virtual-machine", "virtual-machine-snapshots"),
         "custom": ("volume", "volume-snapshots")}


def detect_compression(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(262)
    for magic, name in MAGIC:
        if head.startswith(magic):
            return name
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "none"
    if not head:
        raise BadRequest("The backup file is empty")
    raise BadRequest("The backup file is not a tarball (unknown compression or format)")


@dataclass
class ScanResult:
    index: BackupIndex
    compression: str
    trees: set[str] = field(default_factory=set)  # "" for the volume, snapshot names
    spooled: dict[str, Path] = field(default_factory=dict)  # optimised members -> spool files
    backup_yaml: str | None = None  # the volume's backup.yaml member, if any
    members: int = 0
    optimised: set[str] = field(default_factory=set)  # names of the optimised members

    @property
    def config(self) -> BackupConfig:
        if self.index.config is not None and (self.index.config.instance is not None
                                              or self.index.config.volume is not None):
            return self.index.config
        if self.backup_yaml is not None:
            try:
                return parse_backup_yaml(self.backup_yaml)
            except ValueError as e:
                raise BadRequest(f"Invalid backup: {e}") from None
        raise BadRequest("Invalid backup: it holds no instance or volume configuration "
                         "(no config in index.yaml and no backup.yaml)")


def _norm(name: str, what: str) -> str:
    if "\x00" in name:
        raise BadRequest(f"Invalid backup: member name with a NUL byte ({what})")
    if name.startswith("/"):
        raise BadRequest(f"Invalid backup: absolute member name {name!r}")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise BadRequest(f"Invalid backup: member {name!r} has a '..' component")
    return "/".join(parts)


class _Checker:
    def __init__(self, btype: str | None):
        self.symlinks: set[str] = set()
        self.dirs: set[str] = set()
        self.files: set[str] = set()
        self.btype = btype

    def tree_of(self, name: str) -> tuple[str | None, str, str]:
        """(tree key or None for top-level files, the tree's root, the path inside it)."""
        parts = name.split("/")
        if parts[0] != "backup":
            raise BadRequest(f"Invalid backup: member {name!r} is outside backup/")
        if len(parts) == 1:
            return None, "backup", ""
        top = parts[1]
        for main, snaps in TREES.values():
            if top == main:
                return "", f"backup/{main}", "/".join(parts[2:])
            if top == snaps and len(parts) >= 3:
                snap = parts[2]
                if snap.endswith(".bin") and len(parts) == 3:
                    return None, name, ""
                return snap, f"backup/{snaps}/{snap}", "/".join(parts[3:])
            if top == snaps:
                return None, name, ""
        return None, name, ""

    def check(self, m: tarfile.TarInfo) -> tuple[str, str | None, str]:
        name = _norm(m.name, m.name)
        if m.type not in SPECIAL_OK:
            raise BadRequest(f"Invalid backup: member {name!r} has an unsupported type")
        key, root, inner = self.tree_of(name)
        # Nothing may be written through a symlink, nor may a symlink replace a directory.
        p = name
        while "/" in p:
            p = p.rsplit("/", 1)[0]
            if p in self.symlinks:
                raise BadRequest(f"Invalid backup: member {name!r} lies under the symbolic link {p!r}")
        if key is not None and inner == "" and not m.isdir():
            raise BadRequest(f"Invalid backup: {name!r} must be a directory")
        if m.issym() and key is not None and "/" not in inner and not root.startswith("backup/volume"):
            # An instance volume's own entries (rootfs/, templates/, metadata.yaml, backup.yaml)
            # are read and written by the daemon: never links.
            raise BadRequest(f"Invalid backup: {name!r} is a symbolic link")
        if m.issym():
            if name in self.dirs:
                raise BadRequest(f"Invalid backup: symbolic link {name!r} replaces a directory")
            if key is None:
                raise BadRequest(f"Invalid backup: unexpected symbolic link {name!r}")
            self.symlinks.add(name)
        else:
            self.symlinks.discard(name)
        if m.islnk():
            target = _norm(m.linkname, f"link target of {name}")
            try:
                tkey, troot, _ = self.tree_of(target)
            except BadRequest:
                tkey = troot = None
            if key is None or tkey != key or troot != root or target == root:
                raise BadRequest(f"Invalid backup: hard link {name!r} points outside its volume ({m.linkname!r})")
            if target not in self.files:
                raise BadRequest(f"Invalid backup: hard link {name!r} points to {m.linkname!r}, "
                                 "which is not an earlier file of the backup")
            q = target
            while "/" in q:
                q = q.rsplit("/", 1)[0]
                if q in self.symlinks:
                    raise BadRequest(f"Invalid backup: hard link {name!r} goes through the symbolic link {q!r}")
        if m.ischr() or m.isblk():
            if key is None or not inner.startswith("rootfs/"):
                raise BadRequest(f"Invalid backup: device node {name!r} outside the root filesystem")
        if m.isdir():
            self.dirs.add(name)
            self.files.discard(name)
        elif not m.issym():
            self.files.add(name)
        q = name
        while "/" in q:
            q = q.rsplit("/", 1)[0]
            if q in self.dirs:
                break
            self.dirs.add(q)
        return name, key, inner


def _open_stream(path: Path, compression: str):
    if compression == "none":
        return None, open(path, "rb")  # noqa: SIM115 - closed by the caller
    if compression == "gzip" and gz.available():
        return None, gz.open_gzip(path)
    prog = DECOMPRESSORS[compression]
    if shutil.which(prog[0]) is None:
        raise BadRequest(f"Can't read a {compression}-compressed backup: {prog[0]} is not installed")
    f = open(path, "rb")  # noqa: SIM115
    try:
        proc = subprocess.Popen(prog, stdin=f, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    finally:
        f.close()
    return proc, proc.stdout


def _is_optimised_member(name: str) -> bool:
    return name == "backup/optimized_header.yaml" or (name.endswith(".bin") and name.count("/") <= 2)


def scan(path: Path, spool_dir: Path | None = None, hooks: StreamedMembers | None = None,
         source: GrowingFile | None = None) -> ScanResult:
    """Check the whole tarball (blocking; run it in a thread). Optimised members are handed to
    `hooks` as the scan reaches them (StreamedMembers: the driver receives them meanwhile), else
    copied into `spool_dir` (made here); with neither, a tarball holding them is refused.
    With `source` (the upload still being written to `path`), an uncompressed tarball is
    checked as it arrives (its members' data is skipped, not read: the driver reads optimised
    members from the file itself); a compressed one once it has all arrived."""
    error: BaseException | None = None
    try:
        return _scan(path, spool_dir, hooks, source)
    except BaseException as e:
        error = e
        raise
    finally:
        if hooks is not None:
            hooks.on_end(error)


def _scan(path: Path, spool_dir: Path | None, hooks: StreamedMembers | None,
          source: GrowingFile | None = None) -> ScanResult:
    if source is not None:
        source.wait_for(261)
        compression = detect_compression(path)
        if compression != "none":
            source.wait_done()
            source = None
    else:
        compression = detect_compression(path)
    if source is not None:
        proc, stream = None, source
    else:
        proc, stream = _open_stream(path, compression)
    checker = _Checker(None)
    index_text: bytes | None = None
    backup_yaml: dict[str, bytes] = {}
    trees: set[str] = set()
    spooled: dict[str, Path] = {}
    optimised: set[str] = set()
    count = 0
    try:
        try:
            tf = tarfile.open(fileobj=stream, mode="r:" if source is not None else "r|")
            for m in tf:
                count += 1
                name, key, inner = checker.check(m)
                if name == "backup/index.yaml":
                    if not m.isreg() or m.size > MAX_YAML:
                        raise BadRequest("Invalid backup: backup/index.yaml is not a small regular file")
                    index_text = tf.extractfile(m).read()
                    if hooks is not None:
                        hooks.on_index(index_text)
                elif key is not None:
                    trees.add(key)
                    if inner == "backup.yaml" and m.isreg() and m.size <= MAX_YAML:
                        backup_yaml[key] = tf.extractfile(m).read()
                elif _is_optimised_member(name) and m.isreg():
                    optimised.add(name)
                    if hooks is not None:
                        if name.endswith(".yaml"):
                            if m.size > MAX_YAML:
                                raise BadRequest(f"Invalid backup: {name} is too big")
                            hooks.on_header(tf.extractfile(m).read())
                        else:
                            region = (source, m.offset_data, m.size) if source is not None else None
                            hooks.on_bin(name, tf.extractfile(m), region)
                        continue
                    if spool_dir is None:
                        raise BadRequest("Invalid backup: unexpected optimised member " + repr(name))
                    spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                    dst = spool_dir / f"{len(spooled)}.bin"
                    with open(dst, "wb") as out:
                        shutil.copyfileobj(tf.extractfile(m), out, 1 << 20)
                    spooled[name] = dst
                elif m.isdir() and name in ("backup", *(f"backup/{t[1]}" for t in TREES.values())):
                    pass
                else:
                    raise BadRequest(f"Invalid backup: unexpected member {name!r}")
        except (tarfile.TarError, *gz.INFLATE_ERRORS) as e:
            raise BadRequest(f"Invalid backup: the tarball is truncated or corrupt ({e})") from None
        if count == 0:
            raise BadRequest("Invalid backup: the tarball is empty or corrupt")
    finally:
        stream.close()
        if proc is not None:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if proc is not None and proc.returncode != 0:
        err = proc.stderr.read().decode(errors="replace").strip()
        proc.stderr.close()
        raise BadRequest(f"Invalid backup: the {compression} stream is truncated or corrupt ({err})")
    if proc is not None:
        proc.stderr.close()
    if index_text is None:
        raise BadRequest("Invalid backup: backup/index.yaml is missing")
    try:
        index = parse_index_yaml(index_text)
    except ValueError as e:
        raise BadRequest(f"Invalid backup: {e}") from None
    res = ScanResult(index=index, compression=compression, trees=trees, spooled=spooled, members=count,
                     optimised=optimised)
    by = backup_yaml.get("")
    res.backup_yaml = by.decode(errors="replace") if by is not None else None
    main, snaps = TREES[index.type]
    if index.optimized:
        if not any(n.startswith(f"backup/{main}") and n.endswith(".bin") for n in optimised):
            raise BadRequest(f"Invalid backup: the optimised stream backup/{main}.bin is missing")
    else:
        if optimised:
            raise BadRequest(f"Invalid backup: optimised member {sorted(optimised)[0]!r} in a backup "
                             "index.yaml calls not optimised")
        if "" not in trees:
            raise BadRequest(f"Invalid backup: backup/{main}/ is missing")
        missing = [s for s in index.snapshots if s not in trees]
        if missing:
            raise BadRequest(f"Invalid backup: snapshot(s) {', '.join(missing)} listed in index.yaml "
                             f"are missing from backup/{snaps}/")
    return res


def parse_index(text: bytes) -> BackupIndex:
    try:
        return parse_index_yaml(text)
    except ValueError as e:
        raise BadRequest(f"Invalid backup: {e}") from None


async def extract_tree(path: Path, compression: str, member: str, dest: Path, *,
                       exclude_backup_yaml: bool = False) -> None:
    """Unpack the member tree `member` (e.g. `backup/container`) of a scanned tarball into `dest`."""
    depth = member.count("/") + 1
    argv = ["tar", "--extract", "--file", str(path), "-C", str(dest), f"--strip-components={depth}",
            "--numeric-owner", "--same-owner", "--same-permissions", "--xattrs", "--xattrs-include=*",
            "--no-overwrite-dir", "--delay-directory-restore", "--anchored", "--no-wildcards"]
    fast_gzip = compression == "gzip" and gz.available()
    if fast_gzip:
        argv[argv.index("--file") + 1] = "-"  # fed the inflated stream here
    elif compression != "none":
        argv.append("--use-compress-program=" + DECOMPRESSORS[compression][0])
    if exclude_backup_yaml:
        argv.append(f"--exclude={member}/backup.yaml")
    argv.append(member)
    if fast_gzip:
        try:
            rc, err = await asyncio.to_thread(gz.inflate_into, path, argv)
        except gz.CorruptGzip as e:
            raise LXDError(f"Unpacking the backup failed: {e}") from None
        _check_tar(rc, err)
        return
    res = await tools.run(*argv, check=False)
    _check_tar(res.returncode, res.stderr.encode())


def _check_tar(rc: int, err: bytes) -> None:
    if rc != 0:
        lines = err.decode(errors="replace").strip().splitlines()
        msg = lines[-1] if lines else f"exit status {rc}"
        if "No space left" in err.decode(errors="replace"):
            raise InsufficientStorage(f"Unpacking the backup failed: the storage pool is full ({msg})")
        raise LXDError(f"Unpacking the backup failed: {msg}")


async def clear_dir(path: Path) -> None:
    """Remove everything inside `path` (between unpacking snapshots into one volume)."""
    def rm() -> None:
        for e in os.listdir(path):
            p = path / e
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()

    await asyncio.to_thread(rm)


def spool_member(scan_result: ScanResult):
    """member(name) -> an open file for the driver's restore_volume_optimized."""
    def member(name: str):
        name = posixpath.normpath(name)
        p = scan_result.spooled.get(name)
        if p is None:
            raise KeyError(name)
        return open(p, "rb")  # noqa: SIM115 - the driver reads and drops it

    return member


class GrowingFile:
    """A reader of a file that an upload is still writing (`lxc import`: the tarball is checked
    and its optimised streams received while it arrives). Reads wait until the bytes they ask
    for are there, or the upload ended (then a short read: a truncated tarball) or failed (its
    error). The writer reports only the end (finish() or fail()); progress is the file's size."""

    POLL = 0.002

    def __init__(self, path: Path):
        self.path = path
        self.fd = -1
        self.pos = 0
        self.name = str(path)
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._stopped = False
        self.router = None  # see set_router()

    # -- the writer's side -----------------------------------------------------------------
    def finish(self) -> None:
        self._done.set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._done.set()

    def stop(self) -> None:
        """Nobody reads any more (the import gave up): waiting readers give up too."""
        self._stopped = True
        self._done.set()

    def dispose(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- the readers' side -------------------------------------------------------------------
    def _check(self) -> None:
        if self._error is not None:
            e = self._error
            raise e if isinstance(e, LXDError) else BadRequest(f"The upload failed: {e}")
        if self._stopped:
            raise BadRequest("The import was stopped")

    def wait_for(self, pos: int) -> int:
        """Wait until the file holds byte `pos` or the upload ended; returns the file's size."""
        while True:
            done = self._done.is_set()
            if self.fd < 0:
                try:
                    self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    if done:
                        self._check()
                        raise BadRequest("The backup file is empty") from None
                    self._done.wait(self.POLL)
                    continue
            size = os.fstat(self.fd).st_size
            if size > pos:
                return size
            if done:
                self._check()
                return size
            self._done.wait(self.POLL)

    def wait_done(self) -> None:
        self._done.wait()
        self._check()

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            self.wait_done()
            n = os.fstat(self.fd).st_size - self.pos if self.fd >= 0 else 0
        out = bytearray()
        while len(out) < n:
            size = self.wait_for(self.pos)
            if size <= self.pos:
                break
            data = os.pread(self.fd, min(n - len(out), size - self.pos), self.pos)
            if not data:
                break
            out += data
            self.pos += len(data)
        return bytes(out)

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 0:
            self.pos = offset
        elif whence == 1:
            self.pos += offset
        else:
            self.wait_done()
            self.pos = os.fstat(self.fd).st_size + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        """The scan is done with it (the owner disposes of the descriptor)."""

    def set_router(self, body) -> None:
        """The upload's body, when it can hand a part of itself to a pipe directly (divert():
        socket_body.ChunkedSocketBody); copy_region() then asks it to."""
        if hasattr(body, "divert"):
            self.router = body

    def copy_region(self, offset: int, size: int, fd: int) -> None:
        """Copy `size` bytes at `offset` into `fd` (a pipe) as they arrive; BrokenPipeError when
        the pipe's reader is gone. What is in the file already goes with sendfile; what has not
        arrived yet, the upload's reader writes into the pipe itself when it can (set_router):
        those bytes are never written into the file (which keeps a hole there) nor read back."""
        d = self.router.divert(offset, size, fd) if self.router is not None else None
        if d is None:
            self._copy_from_file(offset, size, fd)
            return
        try:
            self._copy_from_file(offset, d.start - offset, fd)
        except BaseException as e:
            d.abort(e)
            raise
        d.go()
        try:
            d.wait(lambda: self._stopped)
        except BrokenPipeError:
            raise
        except OSError as e:
            if e.errno == errno.EPIPE:
                raise BrokenPipeError(str(e)) from None
            raise BadRequest(f"The upload failed: {e}") from None
        except Exception as e:
            if isinstance(e, LXDError):
                raise
            raise BadRequest("Invalid backup: the tarball is truncated (an optimised stream ends early)") from None

    def _copy_from_file(self, offset: int, size: int, fd: int) -> None:
        pos, end = offset, offset + size
        while pos < end:
            avail = self.wait_for(pos)
            if avail <= pos:
                raise BadRequest("Invalid backup: the tarball is truncated (an optimised stream ends early)")
            n = os.sendfile(fd, self.fd, pos, min(end, avail) - pos)
            if n == 0:
                raise BadRequest("Invalid backup: the tarball is truncated (an optimised stream ends early)")
            pos += n


class StreamedMembers:
    """The scan's hooks for an optimised import without spooling: the scan (in its thread) hands
    each optimised member over as it reaches it and waits while the consumer (the driver's
    restore_volume_optimized, reading through member()) reads it, so inflating, checking and
    `btrfs receive` run at once. Members are read in tarball order; one the consumer does not
    ask for is passed over; asking for one already passed is an error. Nothing here touches the
    event loop's thread except index(), started() and member() (which never block)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.cv = threading.Condition()
        self._index: asyncio.Future = loop.create_future()
        self._started: asyncio.Future = loop.create_future()
        self.header: bytes | None = None
        self.current: tuple[str, object] | None = None
        self.region: tuple[GrowingFile, int, int] | None = None  # where the current member's data is
        self.passed: set[str] = set()
        self.wanted: str | None = None
        self.closed = False  # the consumer is done: the scan passes over the rest
        self.reading = 0  # consumer reads under way (outside the lock)
        self.ended = False
        self.error: BaseException | None = None

    # -- the scan's side (its thread) --------------------------------------------------------
    def _settle(self, fut: asyncio.Future, value=None, error: BaseException | None = None) -> None:
        def go() -> None:
            if not fut.done():
                if error is not None:
                    fut.set_exception(error)
                else:
                    fut.set_result(value)

        self.loop.call_soon_threadsafe(go)

    def on_index(self, text: bytes) -> None:
        self._settle(self._index, text)

    def on_header(self, data: bytes) -> None:
        with self.cv:
            self.header = data
        self._settle(self._started)

    def on_bin(self, name: str, f, region=None) -> None:
        self._settle(self._started)
        with self.cv:
            if self.closed:
                self.passed.add(name)
                return
            self.current = (name, f)
            self.region = region
            self.cv.notify_all()
            # Never go on while a consumer's read of this member is under way (one stream).
            while self.reading or not self.closed:
                if not self.reading:
                    if self.current is None:  # read to the end
                        break
                    if self.wanted is not None and self.wanted != name and self.wanted not in self.passed:
                        break  # the consumer wants a later member: pass over this one
                self.cv.wait()
            self.current = None
            self.passed.add(name)
            self.cv.notify_all()

    def on_end(self, error: BaseException | None) -> None:
        with self.cv:
            self.ended = True
            self.error = error
            self.cv.notify_all()
        err = error if error is not None else BadRequest("Invalid backup: backup/index.yaml is missing")
        self._settle(self._index, error=err)
        self._settle(self._started)

    # -- the consumer's side -------------------------------------------------------------------
    async def index(self) -> bytes:
        return await self._index

    async def started(self) -> None:
        """Wait until the optimised members begin (or the scan ended)."""
        await self._started

    def close_consumer(self) -> None:
        with self.cv:
            self.closed = True
            self.cv.notify_all()

    def member(self, name: str):
        if name == "backup/optimized_header.yaml":
            with self.cv:
                if self.header is None:
                    raise KeyError(name)
                return io.BytesIO(self.header)
        return _StreamedMember(self, name)


class _StreamedMember:
    def __init__(self, owner: StreamedMembers, name: str):
        self.owner = owner
        self.name = name
        self.f = None
        self.finished = False

    def _attach(self) -> None:
        """Wait (the owner's lock held) until the scan reaches this member."""
        o = self.owner
        o.wanted = self.name
        o.cv.notify_all()
        while True:
            if o.current is not None and o.current[0] == self.name:
                self.f = o.current[1]
                return
            if self.name in o.passed:
                raise BadRequest(f"Invalid backup: the optimised member {self.name} is missing or out of order")
            if o.ended:
                if o.error is not None:
                    raise o.error if isinstance(o.error, LXDError) else BadRequest(f"Invalid backup: {o.error}")
                raise BadRequest(f"Invalid backup: the optimised member {self.name} is missing")
            o.cv.wait()

    def _begin_read(self):
        """Attach to the member being scanned (waiting for it) and count this reader in; returns
        where its bytes are in the uploaded file, if the scan knows (else None)."""
        o = self.owner
        with o.cv:
            if self.f is None:
                self._attach()
            if o.current is None or o.current[0] != self.name:
                raise BadRequest(f"Invalid backup: the optimised member {self.name} could not be read")
            o.reading += 1
            return o.region

    def read(self, n: int = -1) -> bytes:
        if self.finished:
            return b""
        o = self.owner
        self._begin_read()
        try:
            data = self.f.read(n)
        finally:
            with o.cv:
                o.reading -= 1
                o.cv.notify_all()
        if not data:
            self.close()
        return data

    def pipe_into(self, fd: int) -> None:
        """Write the member's bytes into `fd` (a tool's stdin pipe; blocking: run it in a thread):
        straight from the uploaded file when the scan says where they are, else read and written."""
        o = self.owner
        region = self._begin_read()
        try:
            if region is not None:
                src, offset, size = region
                src.copy_region(offset, size, fd)
            else:
                while data := self.f.read(CHUNK):
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
        finally:
            with o.cv:
                o.reading -= 1
                o.cv.notify_all()
        self.close()

    def close(self) -> None:
        if self.finished:
            return
        self.finished = True
        o = self.owner
        with o.cv:
            if o.current is not None and o.current[0] == self.name:
                o.current = None
            if o.wanted == self.name:
                o.wanted = None
            o.cv.notify_all()
