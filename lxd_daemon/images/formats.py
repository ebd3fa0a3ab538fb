"""Image file formats: compression by magic bytes, metadata.yaml, and the safety scan of tarballs.

Pure functions over files; they block, so callers run them in a thread.

Safety rules for image tarballs (checked on import, before anything is stored):
- every member name is relative and has no `..` component once normalised;
- no member lies under a member that is a symlink (nothing can be written through a link);
- a symlink's relative target, resolved from its directory, stays inside the tree it belongs to
  (`rootfs/` for the root filesystem; absolute targets are read inside the container and allowed);
- a hard link names an earlier member of the same tree by a safe relative path;
- character and block devices are allowed only under `rootfs/dev/` (and are never created by the
  unpacker, which removes them: unprivileged containers get their /dev from liblxc);
- `metadata.yaml` is present and has an architecture and a creation date.
"""

from __future__ import annotations

import bz2
import contextlib
import io
import lzma
import os
import subprocess
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO

import yaml

from lxd_daemon.errors import BadRequest

# Kernel architecture names LXD accepts in metadata.yaml (shared/osarch), and their aliases.
ARCHITECTURES = {
    "i686", "x86_64", "armv6l", "armv7l", "armv8l", "aarch64", "ppc", "ppc64", "ppc64le", "s390x",
    "mips", "mips64", "riscv32", "riscv64", "loongarch64",
}
ARCH_ALIASES = {
    "amd64": "x86_64", "x86-64": "x86_64", "i386": "i686", "i586": "i686", "386": "i686",
    "arm64": "aarch64", "armhf": "armv7l", "armel": "armv6l", "arm": "armv7l", "ppc64el": "ppc64le",
    "powerpc": "ppc", "powerpc64": "ppc64",
}

# compression name -> (file extension for exports, tar extension)
EXTENSIONS = {
    "gzip": ".tar.gz", "bzip2": ".tar.bz2", "xz": ".tar.xz", "lzma": ".tar.lzma", "zstd": ".tar.zst",
    "none": ".tar", "squashfs": ".squashfs",
}

MAX_METADATA = 4 << 20  # metadata.yaml bigger than this is not an image
READ_SIZE = 1 << 20

try:  # ISA-L inflates gzip about twice as fast as zlib
    from isal import isal_zlib as _inflate
except ImportError:  # pragma: no cover - isal is a dependency; zlib is the fallback
    _inflate = zlib
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class GzipReader(io.RawIOBase):
    """gzip decompression in 1 MiB steps (gzip.GzipFile reads 8 KiB at a time); multi-member aware."""

    def __init__(self, raw: IO[bytes]):
        self.raw = raw
        self.d = _inflate.decompressobj(wbits=31)
        self.pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self.pending:
            data = self.d.unconsumed_tail or self.raw.read(READ_SIZE)
            if self.d.eof:  # the next member of a multi-member file, or the end
                rest = self.d.unused_data + data
                if not rest.strip(b"\0"):
                    more = self.raw.read(READ_SIZE)
                    if not more:
                        return 0
                    rest += more
                self.d = _inflate.decompressobj(wbits=31)
                data = rest
            if not data:
                raise EOFError("Compressed file ended before the end-of-stream marker was reached")
            self.pending = self.d.decompress(data, READ_SIZE)
        n = min(len(b), len(self.pending))
        b[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        return n


def detect_compression(head: bytes) -> str:
    """The compression of a file from its first bytes (at least 512 for a bare tarball)."""
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"BZh"):
        return "bzip2"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd"
    if head.startswith(b"hsqs"):
        return "squashfs"
    if head.startswith(b"\x5d\x00\x00"):
        return "lzma"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "none"
    if head.startswith(b"QFI\xfb"):
        raise BadRequest("Virtual-machine images (qcow2) are not supported by this server")
    raise BadRequest("Unsupported image format: not a tarball (gzip, bzip2, xz, lzma, zstd or plain) "
                     "or a squashfs")


def detect_file(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return detect_compression(f.read(512))


@contextlib.contextmanager
def open_decompressed(path: str | os.PathLike, compression: str) -> Iterator[IO[bytes]]:
    """A readable stream of the tar bytes inside a (possibly compressed) file."""
    if compression == "none":
        with open(path, "rb") as f:
            yield f
    elif compression == "gzip":
        with open(path, "rb") as raw:
            yield io.BufferedReader(GzipReader(raw), READ_SIZE)
    elif compression == "bzip2":
        with bz2.open(path, "rb") as f:
            yield f
    elif compression in ("xz", "lzma"):
        with lzma.open(path, "rb") as f:
            yield f
    elif compression == "zstd":
        proc = subprocess.Popen(["zstd", "-dcq", "--", os.fspath(path)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        try:
            yield proc.stdout
            # Drain so that a truncated stream is reported by zstd's exit status.
            while proc.stdout.read(1 << 20):
                pass
        finally:
            proc.stdout.close()
            err = proc.stderr.read().decode(errors="replace").strip()
            proc.stderr.close()
            rc = proc.wait()
        if rc != 0:
            raise BadRequest(f"Invalid image: zstd decompression failed: {err or rc}")
    else:
        raise BadRequest(f"Unsupported compression {compression!r}")


# -- metadata.yaml -------------------------------------------------------------------------

def normalise_architecture(name: str) -> str:
    arch = ARCH_ALIASES.get(name, name)
    if arch not in ARCHITECTURES:
        raise BadRequest(f"Invalid image metadata: unknown architecture {name!r}")
    return arch


def parse_metadata(raw: bytes) -> dict:
    """Parse and check metadata.yaml (architecture, creation_date, expiry_date, properties, templates)."""
    try:
        doc = yaml.load(raw.decode("utf-8"), Loader=_YAML_LOADER)
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise BadRequest(f"Invalid image metadata: metadata.yaml is not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise BadRequest("Invalid image metadata: metadata.yaml must be a mapping")
    arch = doc.get("architecture")
    if not isinstance(arch, str) or not arch:
        raise BadRequest("Invalid image metadata: missing architecture")
    arch = normalise_architecture(arch)

    def as_int(key: str) -> int:
        v = doc.get(key) or 0
        if isinstance(v, bool) or not isinstance(v, int | float | str):
            raise BadRequest(f"Invalid image metadata: {key} must be a unix time")
        try:
            return int(v)
        except ValueError:
            raise BadRequest(f"Invalid image metadata: {key} must be a unix time") from None

    created = as_int("creation_date")
    if created <= 0:
        raise BadRequest("Invalid image metadata: missing creation date")
    expiry = as_int("expiry_date")
    props = doc.get("properties") or {}
    if not isinstance(props, dict):
        raise BadRequest("Invalid image metadata: properties must be a mapping")
    templates = doc.get("templates") or {}
    if not isinstance(templates, dict):
        raise BadRequest("Invalid image metadata: templates must be a mapping")
    clean_templates = {}
    for path, spec in templates.items():
        if not isinstance(spec, dict):
            raise BadRequest(f"Invalid image metadata: template {path!r} must be a mapping")
        when = spec.get("when") or []
        if not isinstance(when, list):
            raise BadRequest(f"Invalid image metadata: template {path!r}: 'when' must be a list")
        tpl = spec.get("template", "")
        if not isinstance(tpl, str) or _unsafe(tpl):
            raise BadRequest(f"Invalid image metadata: template {path!r} names an unsafe file")
        clean_templates[str(path)] = {
            "when": [str(w) for w in when],
            "create_only": bool(spec.get("create_only", False)),
            "template": tpl,
            "properties": {str(k): "" if v is None else str(v) for k, v in (spec.get("properties") or {}).items()},
        }
    return {
        "architecture": arch,
        "creation_date": created,
        "expiry_date": expiry,
        "properties": {str(k): "" if v is None else str(v) for k, v in props.items()},
        "templates": clean_templates,
    }


# -- the safety scan -----------------------------------------------------------------------

@dataclass
class ScanResult:
    metadata: dict | None = None
    has_rootfs: bool = False
    members: int = 0
    bytes: int = 0
    templates: set[str] = field(default_factory=set)


def _unsafe(name: str) -> bool:
    return name.startswith("/") or ".." in name.split("/")


def _norm(name: str) -> str:
    """Normalise a member name ("./rootfs//bin/" -> "rootfs/bin"); refuse escapes."""
    if "\x00" in name:
        raise BadRequest(f"Invalid image: member name {name!r} contains NUL")
    if name.startswith("/"):
        raise BadRequest(f"Invalid image: member {name!r} has an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise BadRequest(f"Invalid image: member {name!r} would land outside the target")
    return "/".join(parts)


class _Tree:
    """What the scan knows of the archive so far."""

    def __init__(self, kind: str):
        self.kind = kind  # "unified" | "meta" | "rootfs"
        self.symlinks: set[str] = set()
        self.seen: set[str] = set()

    def root_of(self, path: str) -> str | None:
        """The tree a member belongs to: "" for a whole-rootfs archive, "rootfs", or None."""
        if self.kind == "rootfs":
            return ""
        if path == "rootfs" or path.startswith("rootfs/"):
            return "rootfs"
        if path == "templates" or path.startswith("templates/"):
            return "templates"
        return None

    def check_parents(self, path: str, original: str) -> None:
        parts = path.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in self.symlinks:
                raise BadRequest(f"Invalid image: member {original!r} lies under a symlink")


def _check_symlink(tree: _Tree, path: str, target: str, original: str) -> None:
    root = tree.root_of(path)
    if target.startswith("/"):
        if root not in ("", "rootfs"):  # only a root filesystem reads links from its own root
            raise BadRequest(f"Invalid image: symlink {original!r} points outside the image")
        return  # resolved inside the container's root, where ".." stops at "/"
    # Resolve the relative target from the link's directory, counting depth below the tree's root.
    depth = path.count("/") - (root.count("/") + 1 if root else 0)
    for part in target.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                raise BadRequest(f"Invalid image: symlink {original!r} -> {target!r} points outside the image")
        elif part and part != ".":
            depth += 1


def check_member(tree: _Tree, m: tarfile.TarInfo) -> str:
    """Refuse an unsafe member; returns its normalised path."""
    path = _norm(m.name)
    if not path:
        if m.isdir():
            return path
        raise BadRequest(f"Invalid image: member {m.name!r} has an empty name")
    tree.check_parents(path, m.name)
    if m.issym():
        _check_symlink(tree, path, m.linkname, m.name)
        tree.symlinks.add(path)
    else:
        tree.symlinks.discard(path)
    if m.islnk():
        target = _norm(m.linkname)
        if not target or tree.root_of(target) != tree.root_of(path) or target not in tree.seen:
            raise BadRequest(f"Invalid image: hard link {m.name!r} -> {m.linkname!r} points outside the image")
        tree.check_parents(target, m.linkname)
        if target in tree.symlinks:
            raise BadRequest(f"Invalid image: hard link {m.name!r} points at a symlink")
    if m.ischr() or m.isblk():
        rel = path if tree.kind == "rootfs" else path.removeprefix("rootfs/")
        in_dev = (tree.kind == "rootfs" or path.startswith("rootfs/")) and rel.startswith("dev/")
        if not in_dev:
            raise BadRequest(f"Invalid image: device node {m.name!r} outside /dev")
    elif not (m.isreg() or m.isdir() or m.issym() or m.islnk() or m.isfifo()):
        raise BadRequest(f"Invalid image: member {m.name!r} has an unsupported type")
    tree.seen.add(path)
    return path


SMALL_COMPRESSED = 32 << 20  # decompress images up to this size in one go...
SMALL_LIMIT = 256 << 20  # ...unless they expand beyond this (then stream them)
_ONE_SHOT = {"gzip": lambda: _inflate.decompressobj(wbits=31), "bzip2": bz2.BZ2Decompressor,
             "xz": lzma.LZMADecompressor, "lzma": lzma.LZMADecompressor}


def _small_in_memory(path: str | os.PathLike, compression: str) -> io.BytesIO | None:
    """Small images decompress faster in one call, and the tar scan can then seek over data."""
    make = _ONE_SHOT.get(compression)
    if make is None or os.path.getsize(path) > SMALL_COMPRESSED:
        return None
    with open(path, "rb") as f:
        raw = f.read()
    d = make()
    out = d.decompress(raw, SMALL_LIMIT)
    if not d.eof or d.unused_data.strip(b"\0"):
        return None  # truncated, too big, or several gzip members: let the streaming path decide
    return io.BytesIO(out)


class FastMember:
    """The fields of a tar header the scan needs (tarfile.TarInfo's names)."""

    __slots__ = ("name", "linkname", "size", "type")

    def __init__(self, name: str, linkname: str, size: int, type: bytes):
        self.name, self.linkname, self.size, self.type = name, linkname, size, type

    def isreg(self) -> bool:
        return self.type in (b"0", b"\0", b"7")

    def isdir(self) -> bool:
        return self.type == b"5"

    def issym(self) -> bool:
        return self.type == b"2"

    def islnk(self) -> bool:
        return self.type == b"1"

    def ischr(self) -> bool:
        return self.type == b"3"

    def isblk(self) -> bool:
        return self.type == b"4"

    def isfifo(self) -> bool:
        return self.type == b"6"


_ZERO = bytes(512)
_PLAIN_TYPES = frozenset((b"0", b"\0", b"7", b"1", b"2", b"3", b"4", b"5", b"6"))


def _num(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # base-256 (GNU), for sizes of 8 GiB and more
        n = int.from_bytes(field[1:], "big")
        return n if not field[0] & 0x40 else n - (1 << (8 * len(field) - 1))
    field = field.split(b"\0", 1)[0].strip()
    return int(field, 8) if field else 0


def _pax(data: bytes) -> dict[str, str]:
    out = {}
    pos = 0
    while pos < len(data):
        sp = data.index(b" ", pos)
        length = int(data[pos:sp])
        if length <= 0:
            raise tarfile.TarError("bad pax record")
        key, _, value = data[sp + 1:pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def fast_members(buf) -> list[tuple[FastMember, int]] | None:
    """Walk the headers of an in-memory tarball: [(member, data offset)]. None when it holds
    anything this walker does not handle (sparse files, multi-volume...): tarfile reads it then.
    Raises tarfile.TarError on a damaged header."""
    out: list[tuple[FastMember, int]] = []
    n = len(buf)
    off = 0
    pax: dict[str, str] = {}
    gpax: dict[str, str] = {}
    long_name = long_link = None
    while off + 512 <= n:
        h = bytes(buf[off:off + 512])
        if h == _ZERO:
            return out
        stored = h[148:156].split(b"\0", 1)[0].strip()
        try:
            chk = int(stored, 8) if stored else -1
        except ValueError:
            raise tarfile.TarError(f"bad header checksum at offset {off}") from None
        if chk != sum(h[:148]) + 256 + sum(h[156:]):
            raise tarfile.TarError(f"bad header checksum at offset {off}")
        try:
            size = _num(h[124:136])
        except ValueError:
            raise tarfile.TarError(f"bad size field at offset {off}") from None
        typ = h[156:157]
        start = off + 512
        if typ in (b"x", b"g", b"L", b"K"):
            data = bytes(buf[start:start + size])
            if len(data) < size:
                raise tarfile.TarError("unexpected end of data")
            if typ == b"x":
                pax = _pax(data)
            elif typ == b"g":
                gpax.update(_pax(data))
            elif typ == b"L":
                long_name = data.split(b"\0", 1)[0]
            else:
                long_link = data.split(b"\0", 1)[0]
            off = start + (size + 511) // 512 * 512
            continue
        if typ not in _PLAIN_TYPES:
            return None
        fields = {**gpax, **pax}
        if "size" in fields:
            size = int(fields["size"])
        name = h[:100].split(b"\0", 1)[0]
        if h[257:263] == b"ustar\0" and h[345:346] != b"\0":
            name = h[345:500].split(b"\0", 1)[0] + b"/" + name
        if long_name is not None:
            name = long_name
        link = long_link if long_link is not None else h[157:257].split(b"\0", 1)[0]
        sname = fields.get("path") or name.decode("utf-8", "surrogateescape")
        slink = fields.get("linkpath") or link.decode("utf-8", "surrogateescape")
        if typ == b"\0" and sname.endswith("/"):
            typ = b"5"  # old V7 style directory
        if typ not in (b"0", b"\0", b"7"):
            size = 0  # only regular files have data blocks
        data_size = size
        if start + data_size > n:
            raise tarfile.TarError("unexpected end of data")
        out.append((FastMember(sname, slink, size, typ), start))
        pax = {}
        long_name = long_link = None
        off = start + (data_size + 511) // 512 * 512
    if off < n and any(buf[off:]):
        raise tarfile.TarError("truncated header")
    return out


def scan_tarball(path: str | os.PathLike, compression: str, kind: str) -> ScanResult:
    """Read a whole image tarball and check every member (see the module docstring).

    kind: "unified" (metadata.yaml + rootfs/ + templates/), "meta" (the metadata tarball of a split
    image) or "rootfs" (a split image's root filesystem as a tarball).
    """
    result = ScanResult()
    tree = _Tree(kind)

    def visit(m, read) -> None:
        p = check_member(tree, m)
        result.members += 1
        result.bytes += m.size
        if kind != "rootfs" and p == "metadata.yaml" and m.isreg():
            if m.size > MAX_METADATA:
                raise BadRequest("Invalid image: metadata.yaml is too large")
            result.metadata = parse_metadata(read())
        elif kind != "rootfs" and p.startswith("templates/") and m.isreg():
            result.templates.add(p.removeprefix("templates/"))
        if kind == "rootfs" or p == "rootfs" or p.startswith("rootfs/"):
            result.has_rootfs = True

    try:
        with _small_in_memory(path, compression) or open_decompressed(path, compression) as stream:
            listed = None
            if isinstance(stream, io.BytesIO):
                with stream.getbuffer() as buf:
                    listed = fast_members(buf)
                    for m, start in listed or ():
                        visit(m, lambda m=m, start=start: bytes(buf[start:start + m.size]))
            if listed is None:
                mode = "r|" if compression != "none" and not isinstance(stream, io.BytesIO) else "r:"
                with tarfile.open(fileobj=stream, mode=mode, bufsize=READ_SIZE) as tf:
                    for m in tf:
                        visit(m, lambda m=m: (tf.extractfile(m) or io.BytesIO()).read())
    except BadRequest:
        raise
    except (tarfile.TarError, EOFError, OSError, lzma.LZMAError, zlib.error, _inflate.error) as e:
        raise BadRequest(f"Invalid image: truncated or corrupt {('tarball', compression)[compression != 'none']}"
                         f" data: {e}") from None
    if result.members == 0:
        raise BadRequest("Invalid image: the tarball is empty")
    if kind in ("unified", "meta") and result.metadata is None:
        raise BadRequest("Invalid image: the tarball is missing metadata.yaml")
    if kind == "unified" and not result.has_rootfs:
        raise BadRequest("Invalid image: the tarball has no rootfs/ directory")
    return result


def scan_squashfs(path: str | os.PathLike) -> ScanResult:
    """Check a squashfs root filesystem: readable, no device nodes outside /dev."""
    r = subprocess.run(["unsquashfs", "-lln", "-d", "", os.fspath(path)], capture_output=True)
    if r.returncode != 0:
        msg = r.stderr.decode(errors="replace").strip().splitlines()
        raise BadRequest(f"Invalid image: unreadable squashfs: {msg[-1] if msg else r.returncode}")
    result = ScanResult(has_rootfs=True)
    for line in r.stdout.decode(errors="replace").splitlines():
        if not line or line[0] not in "-dlcbps":
            continue
        result.members += 1
        if line[0] in "cb":
            # "crw-r--r-- 0/0  1,  3 2023-01-01 00:00 /dev/null"
            name = line.split(" /", 1)[-1] if " /" in line else ""
            if not ("/" + name).startswith("/dev/"):
                raise BadRequest(f"Invalid image: device node {('/' + name)!r} outside /dev")
    return result
