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
import os
import shutil
import subprocess
import tarfile
import tempfile
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
                          compression: str) -> None:
    """Write index.yaml then the driver's optimised members (btrfs send streams) to `out`."""
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
        await driver.backup_volume_optimized(vol, snapshots, tar)
        await asyncio.to_thread(tar.close)
        ok = True
    finally:
        await asyncio.to_thread(sink.close, ok)


async def write_backup(driver, pool_name: str, vol: Volume, *, name: str, btype: str, snapshots: list[str],
                       config: BackupConfig, backup_yaml: str | None, optimized: bool, compression: str,
                       dest: Path) -> None:
    """Write the backup of `vol` to `dest` (atomically: a temporary file renamed into place)."""
    index = BackupIndex(name=name, backend=driver.info.name, pool=pool_name, snapshots=list(snapshots),
                        optimized=optimized, optimized_header=optimized and driver.info.optimized_backups,
                        type=btype, config=config)
    await asyncio.to_thread(dest.parent.mkdir, mode=0o700, parents=True, exist_ok=True)
    tmp = dest.parent / f".tmp-{dest.name}-{os.urandom(4).hex()}"
    try:
        if optimized:
            await write_optimized(driver, vol, snapshots, index, tmp, compression)
        else:
            await write_generic(driver, vol, snapshots, index, backup_yaml, tmp, compression, dest.parent)
        await asyncio.to_thread(os.chmod, tmp, 0o600)
        await asyncio.to_thread(os.rename, tmp, dest)
    except BaseException:
        await asyncio.to_thread(_unlink, tmp)
        raise


def _unlink(p: Path) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass
