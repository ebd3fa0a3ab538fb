"""Writing backup tarballs in LXD's layout.

    backup/index.yaml                 what the backup holds (config.BackupIndex), always first
    backup/container/...              the instance volume: backup.yaml, metadata.yaml, rootfs/, templates/
    backup/snapshots/<snap>/...       each snapshot's volume (oldest first)
    backup/volume/..., backup/volume-snapshots/<snap>/...   the same for a custom volume

Generic backups are one GNU tar run over the pool (numeric owners, xattrs including POSIX ACLs,
device nodes, hard links, symlinks as they are), renaming the volume directories to their member
names on the way; optimised backups are the driver's own streams (btrfs send) in the members the
driver names, written after index.yaml. The file is written under a temporary name next to its
final one and renamed into place when complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import subprocess
import tarfile
import tempfile
import threading
from pathlib import Path

from lxd_daemon.backups.config import BackupConfig, BackupIndex, render_index_yaml
from lxd_daemon.errors import BadRequest, LXDError
from lxd_daemon.storage.drivers import tools
from lxd_daemon.storage.volume import Volume, VolumeType
from lxd_daemon.util import gz as gzutil

GZIP_LEVEL = 2  # ISA-L's default: about gzip -1's size, far faster than any gzip level
CHUNK = 1 << 20

# compression_algorithm -> the program tar / we pipe through (None: no compression).
COMPRESSORS: dict[str, list[str] | None] = {
    "gzip": ["gzip", "-c", "-n"],
    "bzip2": ["bzip2", "-c"],
    "xz": ["xz", "-c", "-T0"],
    "zstd": ["zstd", "-c", "-q", "-T0"],
    "none": None,
}
DEFAULT_COMPRESSION = "gzip"


def check_compression(algo: str) -> str:
    """The algorithm to use for `algo` ("" = the default); BadRequest if unknown or not here."""
    algo = (algo or DEFAULT_COMPRESSION).strip().lower()
    if algo not in COMPRESSORS:
        raise BadRequest(f"Unsupported compression algorithm {algo!r} "
                         f"(supported: {', '.join(COMPRESSORS)})")
    prog = COMPRESSORS[algo]
    if prog is not None and shutil.which(prog[0]) is None:
        raise BadRequest(f"Compression algorithm {algo!r} is not available on this server ({prog[0]} is missing)")
    return algo


def member_dirs(vtype: VolumeType) -> tuple[str, str]:
    """(the volume's member directory, its snapshots' member directory) for a volume type."""
    if vtype is VolumeType.CUSTOM:
        return "backup/volume", "backup/volume-snapshots"
    if vtype is VolumeType.VM:
        return "backup/virtual-machine", "backup/virtual-machine-snapshots"
    return "backup/container", "backup/snapshots"


def _bre(text: str) -> str:
    """`text` as a literal in a sed basic regular expression delimited by ','."""
    out = []
    for ch in text:
        if ch in ".[]*^$\\,":
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


def _stage(staging: Path, index: BackupIndex, backup_yaml: str | None, main_dir: str) -> list[str]:
    (staging / "backup").mkdir(mode=0o700, parents=True)
    (staging / "backup" / "index.yaml").write_text(render_index_yaml(index))
    names = ["backup/index.yaml"]
    if backup_yaml is not None:
        (staging / main_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
        (staging / main_dir / "backup.yaml").write_text(backup_yaml)
        names.append(f"{main_dir}/backup.yaml")
    return names


async def _run(argv: list[str], what: str) -> None:
    res = await tools.run(*argv, check=False)
    # tar answers 1 for "file changed as we read it" (a running container): the file is fine.
    if res.returncode != 0 and not (argv[0] == "tar" and res.returncode == 1):
        msg = res.stderr.strip().splitlines()
        raise LXDError(f"{what} failed: {msg[-1] if msg else f'exit status {res.returncode}'}")


async def write_generic(driver, vol: Volume, snapshots: list[str], index: BackupIndex, backup_yaml: str | None,
                        out: Path, compression: str, work_dir: Path) -> None:
    """Write the generic tarball of `vol` (with `snapshots`) to `out`."""
    main_dir, snaps_dir = member_dirs(vol.type)
    root = driver.mount_path
    parts: list[tuple[Path, str]] = []
    vpath = await driver.mount_volume(vol)
    mounted = [vol]
    try:
        for s in snapshots:
            sv = vol.snapshot(s)
            parts.append((await driver.mount_volume(sv), f"{snaps_dir}/{s}"))
            mounted.append(sv)
        parts.append((vpath, main_dir))
        staging = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix=".stage-", dir=work_dir))
        try:
            staged = await asyncio.to_thread(_stage, staging, index, backup_yaml, main_dir)
            argv = ["tar", "--create", "--file", str(out), "--format=posix", "--numeric-owner", "--xattrs",
                    "--xattrs-include=*", "--warning=no-file-changed", "--warning=no-file-removed",
                    "--warning=no-file-ignored"]
            prog = COMPRESSORS[compression]
            fast_gzip = compression == "gzip" and gzutil.available()
            if fast_gzip:
                argv[argv.index("--file") + 1] = "-"  # tar's stream, compressed here
            elif prog is not None:
                argv.append("--use-compress-program=" + " ".join(prog[:1] + [a for a in prog[1:] if a != "-c"]))
            argv += ["-C", str(staging), staged[0], "-C", str(root), "--anchored"]
            rels = []
            for path, member in parts:
                rel = os.path.relpath(path, root)
                if rel.startswith(".."):
                    raise LXDError(f"Volume {path} is outside its pool's mount path")
                rels.append(rel)
                argv.append(f"--transform=s,^{_bre(rel)}\\(/\\|$\\),{member}\\1,S")
            if backup_yaml is not None:
                argv.append(f"--exclude={rels[-1]}/backup.yaml")
            argv += rels
            if len(staged) > 1:
                argv += ["-C", str(staging), *staged[1:]]
            if fast_gzip:
                await asyncio.to_thread(_tar_to_gzip, argv, out)
            else:
                await _run(argv, "Creating the backup tarball")
        finally:
            await asyncio.to_thread(shutil.rmtree, staging, True)
    finally:
        for v in reversed(mounted):
            try:
                await driver.unmount_volume(v)
            except Exception:
                pass


def _tar_to_gzip(argv: list[str], out: Path) -> None:
    """Run tar writing to stdout and gzip its stream into `out` (blocking: run in a thread)."""
    with tempfile.TemporaryFile() as errf, gzutil.open_gzip_out(out, GZIP_LEVEL) as gz:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errf)
        try:
            while True:
                chunk = proc.stdout.read(CHUNK)
                if not chunk:
                    break
                gz.write(chunk)
        finally:
            proc.stdout.close()
            rc = proc.wait()
        if rc not in (0, 1):  # 1: "file changed as we read it" (a running container)
            errf.seek(0)
            lines = errf.read().decode(errors="replace").strip().splitlines()
            raise LXDError(f"Creating the backup tarball failed: {lines[-1] if lines else f'exit status {rc}'}")


class _Counting:
    """A write-only stream that knows its position (tarfile asks tell(); a pipe can't answer)."""

    def __init__(self, raw, plain: bool = False):
        self.raw = raw
        self.pos = 0
        self.plain = plain  # raw is the tarball's file itself (no compressor in between)

    def direct_fd(self) -> int | None:
        """The file's descriptor, flushed, for a tool to write a member straight into (the caller
        then reports what it added with advanced()); None when a compressor is in between."""
        if not self.plain:
            return None
        self.raw.flush()
        return self.raw.fileno()

    def advanced(self, n: int) -> None:
        self.pos += n

    def write(self, data) -> int:
        self.raw.write(data)
        self.pos += len(data)
        return len(data)

    def tell(self) -> int:
        return self.pos

    def flush(self) -> None:
        self.raw.flush()


class _Compressed:
    """A binary sink: a compressor process writing into `out`, or `out` itself."""

    def __init__(self, out: Path, compression: str):
        prog = COMPRESSORS[compression]
        self.file = open(out, "wb")  # noqa: SIM115 - closed in close()
        self.proc = None
        self.gz = None
        if compression == "gzip" and gzutil.available():
            self.gz = gzutil.open_gzip_out(self.file, GZIP_LEVEL)
            self.sink = _Counting(self.gz)
        elif prog is not None:
            self.proc = subprocess.Popen(prog, stdin=subprocess.PIPE, stdout=self.file, stderr=subprocess.PIPE)
            self.sink = _Counting(self.proc.stdin)
        else:
            self.sink = _Counting(self.file, plain=True)

    def close(self, ok: bool) -> None:
        try:
            if self.gz is not None:
                self.gz.close()
            if self.proc is not None:
                try:
                    self.proc.stdin.close()
                except OSError:
                    pass
                if not ok:
                    self.proc.kill()
                err = self.proc.stderr.read()
                self.proc.wait()
                if ok and self.proc.returncode != 0:
                    raise LXDError(f"Compressing the backup failed: {err.decode(errors='replace').strip()}")
        finally:
            self.file.close()


async def write_optimized(driver, vol: Volume, snapshots: list[str], index: BackupIndex, out: Path,
                          compression: str, live: bool = False) -> None:
    """Write index.yaml then the driver's optimised members (btrfs send streams) to `out`.
    `live`: the volume does not change meanwhile (a stopped instance's, its locks held), so a
    driver that can (`sends_live`) sends it as it is rather than from a snapshot of it."""
    if not driver.info.optimized_backups:
        raise BadRequest(f"The {driver.info.name} driver has no optimised backup format")
    sink = await asyncio.to_thread(_Compressed, out, compression)
    ok = False
    try:
        tar = tarfile.TarFile(fileobj=sink.sink, mode="w", format=tarfile.PAX_FORMAT)
        data = render_index_yaml(index).encode()
        info = tarfile.TarInfo("backup/index.yaml")
        info.size = len(data)
        info.mode = 0o644
        import io

        await asyncio.to_thread(tar.addfile, info, io.BytesIO(data))
        if live and getattr(driver, "sends_live", False):
            await driver.backup_volume_optimized(vol, snapshots, tar, live=True)
        else:
            await driver.backup_volume_optimized(vol, snapshots, tar)
        await asyncio.to_thread(tar.close)
        ok = True
    finally:
        await asyncio.to_thread(sink.close, ok)


async def write_backup(driver, pool_name: str, vol: Volume, *, name: str, btype: str, snapshots: list[str],
                       config: BackupConfig, backup_yaml: str | None, optimized: bool, compression: str,
                       dest: Path, live: bool = False) -> None:
    """Write the backup of `vol` to `dest` (atomically: a temporary file renamed into place)."""
    index = BackupIndex(name=name, backend=driver.info.name, pool=pool_name, snapshots=list(snapshots),
                        optimized=optimized, optimized_header=optimized and driver.info.optimized_backups,
                        type=btype, config=config)
    await asyncio.to_thread(dest.parent.mkdir, mode=0o700, parents=True, exist_ok=True)
    tmp = dest.parent / f".tmp-{dest.name}-{os.urandom(4).hex()}"
    try:
        if optimized:
            await write_optimized(driver, vol, snapshots, index, tmp, compression, live)
        else:
            await write_generic(driver, vol, snapshots, index, backup_yaml, tmp, compression, dest.parent)
        await asyncio.to_thread(os.chmod, tmp, 0o600)
        await asyncio.to_thread(os.rename, tmp, dest)
    except BaseException:
        await asyncio.to_thread(_unlink, tmp)
        raise


# -- optimised and uncompressed: readable while it is written ---------------------------------------
#
# `lxc export --optimized-storage --compression none` creates the backup, waits for it, then
# downloads it: one after the other, the send into the file and the download each took about
# half of the time. A tar member's size comes before its data, so the file can't be read while a
# stream is still being written into it unless each stream's size is known first: every stream
# is therefore sent twice, at once, from the same read-only source (btrfs send gives the same
# bytes each time): once only to count its bytes (dropped in the kernel), once into the file.
# Once every size is known, the headers are final, the whole file's space is reserved
# (fallocate: no ENOSPC later) and the backup is committed (its row inserted, the operation
# done): readers then follow the writer (follow()). An error after that (a stream that ends at
# another size, an I/O error) fails the readers (the download ends short of its Content-Length:
# the client reports an error) and removes the backup; a crash leaves a row without a file,
# which the start-up sweep removes.

FALLOC_FL_KEEP_SIZE = 1


def _tar_header(name: str, size: int, fmt: int = tarfile.GNU_FORMAT) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o600 if fmt == tarfile.GNU_FORMAT else 0o644
    return info.tobuf(fmt, tarfile.ENCODING, "surrogateescape")


def _small_member(name: str, data: bytes) -> bytes:
    """A whole member as TarFile(format=PAX_FORMAT).addfile() writes it."""
    return _tar_header(name, len(data), tarfile.PAX_FORMAT) + data + bytes(-len(data) % tarfile.BLOCKSIZE)


def _archive_end(pos: int) -> int:
    """Where an archive whose members end at `pos` ends (TarFile.close(): two zero blocks, then
    zeros up to a whole record)."""
    pos += 2 * tarfile.BLOCKSIZE
    return pos + (-pos % tarfile.RECORDSIZE)


def _reserve(fd: int, size: int) -> None:
    """Reserve the file's blocks up to `size` without changing its size (readers follow it)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if libc.fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, size) != 0:
        err = ctypes.get_errno()
        if err in (errno.EOPNOTSUPP, errno.ENOSYS):
            return  # nothing to reserve with: an ENOSPC then fails the readers
        raise OSError(err, os.strerror(err))


class StreamedBackup:
    """An uncompressed optimised backup written into `tmp` (see above): start() returns once it
    can be read (follow()); finish() waits for the rest and ends the archive."""

    POLL = 0.002  # how often a reader waiting for bytes looks again

    def __init__(self, tmp: Path, index_yaml: bytes, header_yaml: bytes, sends: list[tuple[str, list[str]]]):
        self.tmp = tmp
        self.sends = sends
        self.prefix = (_small_member("backup/index.yaml", index_yaml)
                       + _small_member("backup/optimized_header.yaml", header_yaml))
        self.fd = -1
        self.total = -1  # the file's final size, once known
        self.error: BaseException | None = None
        self.done = threading.Event()  # complete, or failed
        self._mu = threading.Lock()
        self._counts: dict[int, int] = {}  # stream -> its size, counted
        self._sizes: dict[int, int] = {}  # stream -> its size, as written
        self._headers: dict[int, tuple[int, bool]] = {}  # stream -> (its header's offset, final)
        self._writer: asyncio.Future | None = None

    # -- the writer's side ---------------------------------------------------------------------
    async def start(self) -> None:
        self.fd = await asyncio.to_thread(os.open, self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                                          0o600)
        await asyncio.to_thread(_write_fd, self.fd, self.prefix)
        self._writer = asyncio.ensure_future(self._write())
        try:
            for i, (_, argv) in enumerate(self.sends):
                _, n = await tools.run_count(*argv)
                with self._mu:
                    self._counts[i] = n
                    if i in self._sizes and self._sizes[i] != n:
                        raise LXDError(f"The stream of {self.sends[i][0]} changed size between two sends")
                if self._writer.done():
                    self._writer.result()  # its error, if any
            await asyncio.to_thread(self._commit)
        except BaseException:
            if not self._writer.done():
                self._writer.cancel()
            with contextlib.suppress(BaseException):
                await self._writer
            raise

    async def _write(self) -> None:
        for i, (member, argv) in enumerate(self.sends):
            start = await asyncio.to_thread(self._begin, i, member)
            await tools.run_to_fd(*argv, fd=self.fd)
            await asyncio.to_thread(self._end, i, member, start)
        end = await asyncio.to_thread(os.lseek, self.fd, 0, os.SEEK_CUR)
        await asyncio.to_thread(_write_fd, self.fd, bytes(_archive_end(end) - end))

    def _begin(self, i: int, member: str) -> int:
        with self._mu:
            start = os.lseek(self.fd, 0, os.SEEK_CUR)
            n = self._counts.get(i)
            _write_fd(self.fd, _tar_header(member, n or 0))
            self._headers[i] = (start, n is not None)
            return start

    def _end(self, i: int, member: str, start: int) -> None:
        end = os.lseek(self.fd, 0, os.SEEK_CUR)
        with self._mu:
            size = end - start - len(_tar_header(member, 0))
            self._sizes[i] = size
            if i in self._counts:
                if self._counts[i] != size:
                    raise LXDError(f"The stream of {member} changed size between two sends")
            elif not self._headers[i][1]:
                os.pwrite(self.fd, _tar_header(member, size), start)  # (written before it was counted)
                self._headers[i] = (start, True)
            _write_fd(self.fd, bytes(-size % tarfile.BLOCKSIZE))

    def _commit(self) -> None:
        """Every size is known: the headers written before it was are made final and the file's
        space is reserved."""
        with self._mu:
            pos = len(self.prefix)
            for i, (member, _) in enumerate(self.sends):
                n = self._counts[i]
                head = _tar_header(member, n)
                if i in self._headers and not self._headers[i][1]:
                    os.pwrite(self.fd, head, self._headers[i][0])
                    self._headers[i] = (self._headers[i][0], True)
                pos += len(head) + n + (-n % tarfile.BLOCKSIZE)
            self.total = _archive_end(pos)
        _reserve(self.fd, self.total)

    async def finish(self) -> None:
        """Wait for the writer; raises its error (or a size that isn't the announced one)."""
        await self._writer
        size = await asyncio.to_thread(lambda: os.fstat(self.fd).st_size)
        if size != self.total:
            raise LXDError(f"The backup file has {size} bytes, not the {self.total} announced")

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.done.set()

    def close(self) -> None:
        """(On the event loop, after finish() or fail().)"""
        self.done.set()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- the readers' side ---------------------------------------------------------------------
    def reopen(self):
        """A file object of its own on the file being written (on the event loop: the writer's
        descriptor stays open until close()); None once it is done."""
        if self.fd < 0 or self.done.is_set():
            return None
        return open(f"/proc/self/fd/{self.fd}", "rb")  # noqa: SIM115 - closed by the response

    def wait(self, fd: int, offset: int, stop: threading.Event | None = None) -> int:
        """Block until the file (read through `fd`) holds bytes past `offset`; returns its size.
        Raises when the backup failed, or ended before `offset` (ReadStopped when `stop` is set)."""
        while True:
            if self.error is not None:
                raise OSError(errno.EIO, f"Writing the backup failed: {self.error}")
            size = os.fstat(fd).st_size
            if size > offset:
                return size
            if self.done.is_set():
                raise OSError(errno.EIO, "The backup file ended early")
            if stop is not None and stop.is_set():
                raise ReadStopped()
            self.done.wait(self.POLL)


def _write_fd(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class ReadStopped(Exception):
    """The reader waiting in StreamedBackup.wait() was told to stop."""


def streams_while_written(driver, optimized: bool, compression: str) -> bool:
    """Whether a backup is written as a StreamedBackup (readable before it is complete)."""
    return (optimized and compression == "none" and driver.info.optimized_backups
            and hasattr(driver, "optimized_sends"))


@contextlib.asynccontextmanager
async def streamed_backup(driver, pool_name: str, vol: Volume, *, name: str, btype: str, snapshots: list[str],
                          config: BackupConfig, dest: Path, live: bool = False):
    """A started StreamedBackup of `vol` for `dest` (readable: its size known, its space
    reserved); when the body ends it is finished and renamed into place. Any error fails its
    readers and removes the temporary file."""
    index = BackupIndex(name=name, backend=driver.info.name, pool=pool_name, snapshots=list(snapshots),
                        optimized=True, optimized_header=True, type=btype, config=config)
    await asyncio.to_thread(dest.parent.mkdir, mode=0o700, parents=True, exist_ok=True)
    tmp = dest.parent / f".tmp-{dest.name}-{os.urandom(4).hex()}"
    async with driver.optimized_sends(vol, snapshots, live) as (header, sends):
        sb = StreamedBackup(tmp, render_index_yaml(index).encode(), header, sends)
        try:
            await sb.start()
            yield sb
            await sb.finish()
            await asyncio.to_thread(os.rename, tmp, dest)
        except BaseException as e:
            sb.fail(e)
            await asyncio.to_thread(_unlink, tmp)
            raise
        finally:
            sb.close()


def _unlink(p: Path) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass
