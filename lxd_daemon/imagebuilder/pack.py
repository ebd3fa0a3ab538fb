"""Image packing: metadata.yaml, tarballs (unified and split), squashfs, fingerprints.

An LXD image is either
  * unified: one tarball holding ``metadata.yaml``, ``rootfs/`` and ``templates/``; its
    fingerprint is the sha256 of the file, or
  * split: a metadata tarball (``metadata.yaml`` + ``templates/``) and a root filesystem
    (squashfs, or a tarball whose entries are relative to the root); its fingerprint is the
    sha256 of the metadata file's bytes followed by the rootfs file's bytes.

Tarballs are written in a deterministic order (depth first, names sorted byte-wise, a directory
before its contents, ``metadata.yaml`` first), in PAX format with numeric ownership, and are
compressed by the standard tools through a pipe. Every output is written to a temporary file in
the destination directory and renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import platform
import shutil
import stat
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lxd_daemon.util.atomic import fsync_dir

COMPRESSIONS = ("gzip", "xz", "zstd", "bzip2", "none")
SQUASHFS_COMPRESSIONS = ("gzip", "xz", "zstd", "lzo", "lz4")
FORMATS = ("unified", "split")
ROOTFS_FORMATS = ("squashfs", "tar")

TAR_EXTENSIONS = {"gzip": ".tar.gz", "xz": ".tar.xz", "zstd": ".tar.zst", "bzip2": ".tar.bz2", "none": ".tar"}

# The compressor commands read a tar stream on stdin and write the compressed stream on stdout.
_COMPRESSORS = {
    "gzip": ["gzip", "-c", "-n", "-6"],
    "xz": ["xz", "-c", "-6", "-T0"],
    "zstd": ["zstd", "-q", "-c", "-3", "-T0"],
    "bzip2": ["bzip2", "-c", "-9"],
}

# uname -m -> LXD architecture name (shared/osarch in LXD).
_LXD_ARCH = {
    "x86_64": "x86_64", "amd64": "x86_64",
    "i386": "i686", "i486": "i686", "i586": "i686", "i686": "i686",
    "aarch64": "aarch64", "arm64": "aarch64",
    "armv7l": "armv7l", "armv7": "armv7l", "armv8l": "armv7l", "armhf": "armv7l",
    "armv6l": "armv6l",
    "ppc64le": "ppc64le", "ppc64": "ppc64", "ppc": "ppc",
    "s390x": "s390x",
    "riscv64": "riscv64",
    "mips64": "mips64", "mips": "mips",
    "loongarch64": "loongarch64",
}

# LXD architecture name -> Debian architecture name (dpkg --print-architecture).
_DEBIAN_ARCH = {
    "x86_64": "amd64", "i686": "i386", "aarch64": "arm64", "armv7l": "armhf", "armv6l": "armel",
    "ppc64le": "ppc64el", "s390x": "s390x", "riscv64": "riscv64", "mips64": "mips64el",
    "loongarch64": "loong64",
}


class BuildError(Exception):
    """A build failed; the message says why (shown to the user as is)."""


@dataclass
class BuildResult:
    """What a build produced: the file(s) to pass to ``lxc image import`` and the fingerprint.

    ``paths`` is ``[image]`` for a unified image and ``[metadata, rootfs]`` for a split one, so
    ``lxc image import *paths`` imports it.
    """

    paths: list[Path]
    fingerprint: str
    metadata: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def size(self) -> int:
        return sum(p.stat().st_size for p in self.paths)


@dataclass(frozen=True)
class Template:
    """A file the daemon renders (pongo2) into the container at the given triggers."""

    path: str  # in the container, e.g. /etc/hostname
    name: str  # file under templates/, e.g. hostname.tpl
    content: str
    when: tuple[str, ...] = ("create", "copy")
    create_only: bool = False


HOSTNAME_TEMPLATE = Template("/etc/hostname", "hostname.tpl", "{{ container.name }}\n")
HOSTS_TEMPLATE = Template(
    "/etc/hosts",
    "hosts.tpl",
    "127.0.0.1\tlocalhost\n"
    "127.0.1.1\t{{ container.name }}\n"
    "\n"
    "# The following lines are desirable for IPv6 capable hosts\n"
    "::1\tlocalhost ip6-localhost ip6-loopback\n"
    "ff02::1\tip6-allnodes\n"
    "ff02::2\tip6-allrouters\n",
)
DEFAULT_TEMPLATES = (HOSTNAME_TEMPLATE, HOSTS_TEMPLATE)


# --------------------------------------------------------------------------------------------
# Architecture, time, metadata


def lxd_architecture(machine: str | None = None) -> str:
    """The LXD architecture name for a ``uname -m`` value (the host's by default)."""
    machine = machine or platform.machine()
    try:
        return _LXD_ARCH[machine]
    except KeyError:
        raise BuildError(f"unsupported architecture {machine!r}") from None


def debian_architecture(lxd_arch: str) -> str:
    try:
        return _DEBIAN_ARCH[lxd_arch]
    except KeyError:
        raise BuildError(f"no Debian architecture for {lxd_arch!r}") from None


def build_time() -> int:
    """The build's timestamp: $SOURCE_DATE_EPOCH if set (reproducible builds), else now."""
    sde = os.environ.get("SOURCE_DATE_EPOCH")
    if sde:
        try:
            return int(sde)
        except ValueError:
            raise BuildError(f"SOURCE_DATE_EPOCH is not an integer: {sde!r}") from None
    return int(time.time())


def serial(ts: int) -> str:
    """The image serial in the images: remote's style, e.g. 20261126_2033."""
    return time.strftime("%Y%m%d_%H%M", time.gmtime(ts))


def make_metadata(
    *,
    architecture: str,
    creation_date: int,
    properties: dict[str, str],
    templates: Iterable[Template] = DEFAULT_TEMPLATES,
    expiry_date: int | None = None,
) -> dict:
    """The metadata.yaml document (a dict) in LXD's shape."""
    meta: dict = {"architecture": architecture, "creation_date": int(creation_date)}
    if expiry_date:
        meta["expiry_date"] = int(expiry_date)
    meta["properties"] = {str(k): str(v) for k, v in properties.items()}
    tpl: dict = {}
    for t in templates:
        if not t.path.startswith("/"):
            raise BuildError(f"template target must be absolute: {t.path!r}")
        if "/" in t.name or t.name in ("", ".", ".."):
            raise BuildError(f"bad template file name: {t.name!r}")
        tpl[t.path] = {
            "when": list(t.when),
            "create_only": t.create_only,
            "template": t.name,
            "properties": {},
        }
    meta["templates"] = tpl
    return meta


def render_metadata(meta: dict) -> bytes:
    """metadata.yaml bytes: block style, keys in insertion order."""
    return yaml.safe_dump(meta, default_flow_style=False, sort_keys=False, allow_unicode=True).encode()


# --------------------------------------------------------------------------------------------
# Fingerprints


def sha256_file(path: Path, h=None) -> str:
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(paths: list[Path] | tuple[Path, ...]) -> str:
    """LXD's fingerprint: sha256 over the image file, or over metadata then rootfs for split."""
    if len(paths) not in (1, 2):
        raise ValueError("an image is one file (unified) or two (metadata, rootfs)")
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Tar writing


def walk_tree(root: Path) -> Iterator[tuple[str, Path]]:
    """(relative path, absolute path) for every entry under root, root excluded.

    Depth first, names sorted byte-wise, each directory before its contents. Symlinks are
    yielded, never followed.
    """
    root = Path(root)

    def rec(rel: str, d: Path) -> Iterator[tuple[str, Path]]:
        with os.scandir(d) as it:
            names = sorted((e.name for e in it), key=os.fsencode)
        for name in names:
            p = d / name
            r = f"{rel}/{name}" if rel else name
            yield r, p
            if stat.S_ISDIR(p.lstat().st_mode):
                yield from rec(r, p)

    yield from rec("", root)


def _xattrs(path: Path) -> dict[str, str]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    out = {}
    for n in sorted(names):
        try:
            v = os.getxattr(path, n, follow_symlinks=False)
        except OSError:
            continue
        out["SCHILY.xattr." + n] = v.decode("utf-8", "surrogateescape")
    return out


@dataclass
class TarOptions:
    owner: str = "root"  # "root": every entry uid/gid 0; "preserve": keep the tree's numeric ids
    mtime_clamp: int | None = None  # entries newer than this get this mtime (reproducible builds)
    xattrs: bool = False
    skip_devices: bool = True  # device nodes are never put in an image (liblxc makes /dev)


def _tarinfo(tar: tarfile.TarFile, path: Path, arcname: str, opts: TarOptions) -> tarfile.TarInfo | None:
    ti = tar.gettarinfo(str(path), arcname=arcname)
    if ti is None:  # a socket: nothing to archive
        return None
    if opts.skip_devices and (ti.ischr() or ti.isblk() or ti.isfifo()):
        return None
    if opts.owner == "root":
        ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    if opts.mtime_clamp is not None and ti.mtime > opts.mtime_clamp:
        ti.mtime = opts.mtime_clamp
    ti.mtime = int(ti.mtime)
    if opts.xattrs:
        x = _xattrs(path)
        if x:
            ti.pax_headers = dict(ti.pax_headers, **x)
    return ti


def add_tree(tar: tarfile.TarFile, root: Path, prefix: str, opts: TarOptions) -> None:
    """Add the directory ``root`` as ``prefix`` (e.g. "rootfs"; "" for the top level)."""
    root = Path(root)
    if prefix:
        ti = _tarinfo(tar, root, prefix, opts)
        tar.addfile(ti)
    for rel, p in walk_tree(root):
        arc = f"{prefix}/{rel}" if prefix else rel
        ti = _tarinfo(tar, p, arc, opts)
        if ti is None:
            continue
        if ti.isreg():
            with open(p, "rb") as f:
                tar.addfile(ti, f)
        else:
            tar.addfile(ti)


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes, *, mode: int = 0o644, mtime: int = 0) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    ti.mode = mode
    ti.mtime = int(mtime)
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    tar.addfile(ti, io.BytesIO(data))


def add_dir(tar: tarfile.TarFile, name: str, *, mode: int = 0o755, mtime: int = 0) -> None:
    ti = tarfile.TarInfo(name)
    ti.type = tarfile.DIRTYPE
    ti.mode = mode
    ti.mtime = int(mtime)
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    tar.addfile(ti)


@contextlib.contextmanager
def compressed_writer(out: Path, compression: str) -> Iterator:
    """A binary file object; what is written to it lands in ``out`` compressed."""
    if compression not in COMPRESSIONS:
        raise BuildError(f"unknown compression {compression!r} (one of {', '.join(COMPRESSIONS)})")
    with open(out, "wb") as f:
        if compression == "none":
            yield f
            f.flush()
            os.fsync(f.fileno())
            return
        cmd = _COMPRESSORS[compression]
        if not shutil.which(cmd[0]):
            raise BuildError(f"{cmd[0]} is needed for {compression} compression but is not installed")
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=f, stderr=subprocess.PIPE)
        try:
            yield proc.stdin
            proc.stdin.close()
        except BrokenPipeError:
            pass  # the compressor died: its exit status and message say why, below
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        err = proc.stderr.read()
        rc = proc.wait()
        if rc != 0:
            raise BuildError(f"{cmd[0]} failed (exit {rc}): {err.decode(errors='replace').strip()}")
        f.flush()
        os.fsync(f.fileno())


def _templates_dir_entries(tar: tarfile.TarFile, templates: Iterable[Template], mtime: int) -> None:
    add_dir(tar, "templates", mtime=mtime)
    for t in sorted(templates, key=lambda t: t.name):
        add_bytes(tar, f"templates/{t.name}", t.content.encode(), mtime=mtime)


def write_unified_tar(
    out: Path,
    meta: dict,
    rootfs: Path,
    templates: Iterable[Template],
    compression: str,
    opts: TarOptions,
) -> None:
    """A unified image tarball at ``out`` (written in place; callers pass a temp path)."""
    mtime = meta["creation_date"]
    with compressed_writer(out, compression) as f:
        with tarfile.open(fileobj=f, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            add_bytes(tar, "metadata.yaml", render_metadata(meta), mtime=mtime)
            add_tree(tar, rootfs, "rootfs", opts)
            _templates_dir_entries(tar, templates, mtime)


def write_metadata_tar(out: Path, meta: dict, templates: Iterable[Template], compression: str) -> None:
    mtime = meta["creation_date"]
    with compressed_writer(out, compression) as f:
        with tarfile.open(fileobj=f, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            add_bytes(tar, "metadata.yaml", render_metadata(meta), mtime=mtime)
            _templates_dir_entries(tar, templates, mtime)


def write_rootfs_tar(out: Path, rootfs: Path, compression: str, opts: TarOptions) -> None:
    with compressed_writer(out, compression) as f:
        with tarfile.open(fileobj=f, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            add_tree(tar, rootfs, "", opts)


def write_squashfs(out: Path, rootfs: Path, compression: str, *, all_root: bool, mtime: int | None) -> None:
    if compression not in SQUASHFS_COMPRESSIONS:
        raise BuildError(f"unknown squashfs compression {compression!r} "
                         f"(one of {', '.join(SQUASHFS_COMPRESSIONS)})")
    if not shutil.which("mksquashfs"):
        raise BuildError("mksquashfs is needed for a squashfs rootfs (Debian package squashfs-tools)")
    cmd = ["mksquashfs", str(rootfs), str(out), "-noappend", "-comp", compression, "-no-progress",
           "-quiet", "-no-exports", "-processors", str(max(1, os.cpu_count() or 1))]
    if all_root:
        cmd.append("-all-root")
    if mtime is not None:
        cmd += ["-mkfs-time", str(mtime), "-all-time", str(mtime)]
    # mksquashfs refuses SOURCE_DATE_EPOCH together with the explicit times above.
    env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise BuildError(f"mksquashfs failed (exit {r.returncode}): {(r.stderr or r.stdout).strip()}")
    with open(out, "rb+") as f:
        os.fsync(f.fileno())


# --------------------------------------------------------------------------------------------
# Output naming and atomic placement


def output_paths(
    output: str | Path | None,
    name: str,
    fmt: str,
    compression: str,
    rootfs_format: str = "squashfs",
) -> list[Path]:
    """Where the image goes.

    ``output`` is a directory (existing, or given with a trailing slash) or a file name. For a
    split image a file name names the metadata tarball and the rootfs goes next to it, named
    after it (``NAME.squashfs`` or ``NAME.rootfs.tar.*``).
    """
    if fmt not in FORMATS:
        raise BuildError(f"unknown format {fmt!r} (one of {', '.join(FORMATS)})")
    if compression not in COMPRESSIONS:
        raise BuildError(f"unknown compression {compression!r} (one of {', '.join(COMPRESSIONS)})")
    if rootfs_format not in ROOTFS_FORMATS:
        raise BuildError(f"unknown rootfs format {rootfs_format!r} (one of {', '.join(ROOTFS_FORMATS)})")
    ext = TAR_EXTENSIONS[compression]
    if output is None:
        output = Path.cwd()
    as_dir = str(output).endswith("/") or Path(output).is_dir()
    output = Path(output)
    if as_dir:
        base = output / name
        main = output / (name + ext)
    else:
        main = output
        stem = output.name
        for e in sorted(TAR_EXTENSIONS.values(), key=len, reverse=True):
            if stem.endswith(e):
                stem = stem[: -len(e)]
                break
        base = output.parent / stem
    if fmt == "unified":
        return [main]
    if as_dir:
        main = Path(f"{base}.meta{ext}")
    rootfs = Path(f"{base}.squashfs") if rootfs_format == "squashfs" else Path(f"{base}.rootfs{ext}")
    if rootfs == main:
        raise BuildError(f"metadata and rootfs would both be written to {main}")
    return [main, rootfs]


def planned_outputs(out_dir: str | Path | None, output: str | Path | None, name: str, fmt: str,
                    compression: str, rootfs_format: str = "squashfs") -> list[Path]:
    """The final paths of a build given either a directory (out_dir) or a file name (output),
    checked before any work is done."""
    target = output if output is not None else out_dir
    if target is not None and output is None:
        if not Path(target).is_dir():
            raise BuildError(f"output directory {target} does not exist")
        target = str(target) + "/"
    finals = output_paths(target, name, fmt, compression, rootfs_format)
    check_outputs(finals)
    return finals


def check_outputs(finals: list[Path]) -> None:
    """Refuse at once (before any work) outputs whose directory is missing or is a directory."""
    for p in finals:
        if not Path(p).parent.is_dir():
            raise BuildError(f"output directory {Path(p).parent} does not exist")
        if Path(p).is_dir():
            raise BuildError(f"output {p} is a directory")


class AtomicOutputs:
    """Temporary files next to each final path, renamed into place together by commit()."""

    def __init__(self, finals: list[Path]):
        self.finals = [Path(p).absolute() for p in finals]
        self.temps: list[Path] = []

    def __enter__(self) -> list[Path]:
        for p in self.finals:
            if not p.parent.is_dir():
                raise BuildError(f"output directory {p.parent} does not exist")
            fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
            os.close(fd)
            self.temps.append(Path(tmp))
        return list(self.temps)

    def commit(self) -> None:
        # rootfs (if any) first, metadata/unified last: a complete main file implies the rest.
        for tmp, final in reversed(list(zip(self.temps, self.finals, strict=True))):
            os.chmod(tmp, 0o644)
            os.replace(tmp, final)
        for d in {p.parent for p in self.finals}:
            fsync_dir(d)
        self.temps = []

    def __exit__(self, *exc) -> None:
        for t in self.temps:
            with contextlib.suppress(FileNotFoundError):
                t.unlink()


def pack_image(
    rootfs: Path,
    finals: list[Path],
    meta: dict,
    templates: Iterable[Template],
    *,
    fmt: str,
    compression: str,
    rootfs_format: str = "squashfs",
    squashfs_compression: str | None = None,
    opts: TarOptions | None = None,
) -> BuildResult:
    """Pack a staged root filesystem into an image at ``finals`` (see output_paths)."""
    opts = opts or TarOptions()
    templates = list(templates)
    t0 = time.monotonic()
    outputs = AtomicOutputs(finals)
    with outputs as temps:
        if fmt == "unified":
            write_unified_tar(temps[0], meta, rootfs, templates, compression, opts)
        elif fmt == "split":
            write_metadata_tar(temps[0], meta, templates, compression)
            if rootfs_format == "squashfs":
                sq = squashfs_compression or ("xz" if compression == "xz" else "gzip")
                fixed = opts.mtime_clamp if os.environ.get("SOURCE_DATE_EPOCH") else None
                write_squashfs(temps[1], rootfs, sq, all_root=opts.owner == "root", mtime=fixed)
            else:
                write_rootfs_tar(temps[1], rootfs, compression, opts)
        else:
            raise BuildError(f"unknown format {fmt!r}")
        fp = fingerprint(temps)
        outputs.commit()
    return BuildResult(paths=list(outputs.finals), fingerprint=fp, metadata=meta,
                       seconds=time.monotonic() - t0)
