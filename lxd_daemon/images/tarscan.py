"""The safety scan of image tarballs, fed piece by piece as an upload arrives or read from a file.

Safety rules (checked on import, before anything is stored):
- no member name has a `..` component once normalised (a leading `/` is stripped, as LXD does);
- no member lies under a member that is a symlink (nothing can be written through a link);
- a symlink's relative target, resolved from its directory, stays inside the tree it belongs to
  (`rootfs/` for the root filesystem; absolute targets are read inside the container and allowed);
- a hard link names an earlier member of the same tree by a safe relative path;
- character and block devices are allowed only under `rootfs/dev/` (and are never created by the
  unpacker, which removes them: unprivileged containers get their /dev from liblxc);
- `metadata.yaml` is present and has an architecture and a creation date.

The pieces: `Decompressor` turns compressed bytes into tar bytes in bounded steps; `TarWalker`
reads the 512-byte headers from those bytes and passes over file data without keeping it;
`Checker` applies the rules above to each member; `StreamScan` joins the three, so that the
daemon can scan an upload while it is still arriving (images/pipeline.py). Archives the walker
does not read itself (sparse or multi-volume members, zstd, which has no in-process decoder) are
scanned from the stored file with Python's tarfile instead (`scan_tarball`). Everything here
blocks: callers run it in a thread.
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO

from lxd_daemon.errors import BadRequest
from lxd_daemon.images.formats import MAX_METADATA, READ_SIZE, parse_metadata

try:  # ISA-L inflates gzip about twice as fast as zlib (and releases the GIL while it does)
    from isal import isal_zlib as _inflate
except ImportError:  # pragma: no cover - isal is a dependency; zlib is the fallback
    _inflate = zlib

STEP = 1 << 20  # the most tar bytes one decompression step produces (bounds memory on a bomb)
INPUT_STEP = 64 << 10  # compressed bytes given to the decompressor at a time
MAX_EXTENDED_HEADER = 1 << 20  # pax records and GNU long names bigger than this are not an image
DATA_ERRORS = (tarfile.TarError, EOFError, OSError, lzma.LZMAError, zlib.error, _inflate.error)


class Unsupported(Exception):
    """The stream holds something only the tarfile-based scan reads (the caller falls back to it)."""


@dataclass
class ScanResult:
    metadata: dict | None = None
    has_rootfs: bool = False
    members: int = 0
    bytes: int = 0
    templates: set[str] = field(default_factory=set)


# -- decompression -----------------------------------------------------------------------------

class Decompressor:
    """Compressed bytes in, tar bytes out, at most STEP bytes per piece; multi-member and
    multi-stream files (concatenated gzip, bzip2 or xz) are read to the end like the tools do."""

    MAKERS: dict[str, Callable] = {
        "gzip": lambda: _inflate.decompressobj(wbits=31),
        "bzip2": bz2.BZ2Decompressor,
        "xz": lzma.LZMADecompressor,
        "lzma": lzma.LZMADecompressor,
    }

    def __init__(self, compression: str):
        if compression == "none":
            self._make = None
        elif compression in self.MAKERS:
            self._make = self.MAKERS[compression]
        else:
            raise Unsupported(compression)
        self.compression = compression
        self._d = self._make() if self._make else None
        self._zlib = compression == "gzip"
        self._started = False  # the current member/stream has consumed input
        self._trailer = b""  # bytes after an end-of-stream marker, not yet known to start a member

    def feed(self, data) -> Iterator[bytes]:
        if self._d is None:
            if data:
                yield data
            return
        if self._trailer:
            data, self._trailer = self._trailer + bytes(data), b""
        view = memoryview(data)
        for i in range(0, len(view), INPUT_STEP):  # small steps: the walk can start sooner
            piece = view[i:i + INPUT_STEP]
            while piece:
                if self._d.eof:
                    rest = bytes(piece) + bytes(view[i + INPUT_STEP:])
                    if not rest.strip(b"\0"):
                        self._trailer = rest  # zero padding after the last member (or before more)
                        return
                    self._d, self._started = self._make(), False
                yield from self._step(piece)
                piece = self._d.unused_data if self._d.eof else b""

    def _step(self, data) -> Iterator[bytes]:
        self._started = True
        d = self._d
        out = d.decompress(data, STEP)
        if out:
            yield out
        if self._zlib:
            while d.unconsumed_tail and not d.eof:
                out = d.decompress(d.unconsumed_tail, STEP)
                if out:
                    yield out
        else:
            while not d.eof and not d.needs_input:
                out = d.decompress(b"", STEP)
                if out:
                    yield out

    def close(self) -> None:
        """The end of the input: refuse a stream cut before its end marker."""
        if self._d is not None and self._started and not self._d.eof:
            raise EOFError("Compressed file ended before the end-of-stream marker was reached")
        if self._d is not None and not self._started:
            raise EOFError("Compressed file is empty")


class DecompressedReader(io.RawIOBase):
    """A compressed file's tar bytes as a stream, through a Decompressor (for tarfile)."""

    def __init__(self, raw: IO[bytes], compression: str):
        self.raw = raw
        self.decompressor = Decompressor(compression)
        self.pieces: Iterator[bytes] = iter(())
        self.pending = memoryview(b"")
        self.ended = False

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self.pending:
            piece = next(self.pieces, None)
            if piece is not None:
                self.pending = memoryview(piece)
            elif self.ended:
                return 0
            elif data := self.raw.read(READ_SIZE):
                self.pieces = self.decompressor.feed(data)
            else:
                self.decompressor.close()  # a stream cut before its end marker raises here
                self.ended = True
        n = min(len(b), len(self.pending))
        b[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        return n


@contextlib.contextmanager
def open_decompressed(path: str | os.PathLike, compression: str) -> Iterator[IO[bytes]]:
    """A readable stream of the tar bytes inside a (possibly compressed) file."""
    if compression == "zstd":  # no decoder in process: zstd(1), whose exit status tells a cut stream
        proc = subprocess.Popen(["zstd", "-dcq", "--", os.fspath(path)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        try:
            yield proc.stdout
            while proc.stdout.read(1 << 20):  # drain, so that a truncated stream shows in the status
                pass
        finally:
            proc.stdout.close()
            err = proc.stderr.read().decode(errors="replace").strip()
            proc.stderr.close()
            rc = proc.wait()
        if rc != 0:
            raise BadRequest(f"Invalid image: zstd decompression failed: {err or rc}")
        return
    if compression != "none" and compression not in Decompressor.MAKERS:
        raise BadRequest(f"Unsupported compression {compression!r}")
    with open(path, "rb") as raw:
        if compression == "none":
            yield raw
        else:
            yield io.BufferedReader(DecompressedReader(raw, compression), READ_SIZE)


# -- the tar headers -----------------------------------------------------------------------------

REGULAR_TYPES = frozenset((b"0", b"\0", b"7"))  # regular file (also old-style and contiguous)
LNKTYPE, SYMTYPE, CHRTYPE, BLKTYPE, DIRTYPE, FIFOTYPE = b"1", b"2", b"3", b"4", b"5", b"6"
_SIMPLE_TYPES = REGULAR_TYPES | {DIRTYPE, FIFOTYPE}  # nothing to check beyond the name


class Member:
    """The fields of a tar header the scan needs (named as in tarfile.TarInfo)."""

    __slots__ = ("name", "linkname", "size", "type")

    def __init__(self, name: str, linkname: str, size: int, type: bytes):
        self.name, self.linkname, self.size, self.type = name, linkname, size, type

    @classmethod
    def from_tarinfo(cls, ti: tarfile.TarInfo) -> Member:
        typ = b"0" if ti.isreg() else ti.type  # sparse files are regular files to the rules
        return cls(ti.name, ti.linkname, ti.size, typ)


_ZERO = bytes(512)
_PLAIN_TYPES = frozenset((b"0", b"\0", b"7", b"1", b"2", b"3", b"4", b"5", b"6"))
_EXTENDED = frozenset((b"x", b"g", b"L", b"K"))
_LINK_TYPES = frozenset((b"1", b"2"))


def _num(field: bytes) -> int:
    """A base-256 number field (GNU), used for sizes of 8 GiB and more."""
    n = int.from_bytes(field[1:], "big")
    return n if not field[0] & 0x40 else n - (1 << (8 * len(field) - 1))


def _checksum_ok(h: bytes, stored: int) -> bool:
    """The header checksum: the byte sum with the checksum field read as spaces. adler32's first
    half is that sum (plus one) modulo 65521, computed in C; the exact sums (unsigned, and the
    signed variant some old tars wrote) decide only when it does not match."""
    field_sum = sum(h[148:156])
    if ((zlib.adler32(h) & 0xFFFF) - 1 - field_sum + 256 - stored) % 65521 == 0:
        return True
    unsigned = sum(h) - field_sum + 256
    signed = unsigned - 256 * sum(1 for b in h[:148] + h[156:] if b > 127)
    return stored in (unsigned, signed)


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


class TarWalker:
    """Reads tar headers from a stream of pieces and hands each member to `on_member`, which may
    return a callback to receive the member's data (for metadata.yaml). Other data is passed over
    without being copied or kept. Stops at the first zero block, as GNU tar does without -i.
    Raises tarfile.TarError on a damaged archive and Unsupported on member types it leaves to
    tarfile (sparse files, multi-volume archives)."""

    def __init__(self, on_member: Callable[[Member], Callable[[bytes], None] | None]):
        self.on_member = on_member
        self._buf = bytearray()
        self._skip = 0  # data bytes (with padding) still to pass over
        self._want: tuple[Callable[[bytes], None], int, int] | None = None  # (callback, size, padded)
        self._ended = False
        self._offset = 0  # of the start of _buf in the archive, for messages
        self._pax: dict[str, str] = {}
        self._gpax: dict[str, str] = {}
        self._long_name: bytes | None = None
        self._long_link: bytes | None = None

    def feed(self, data) -> None:
        if self._ended or not data:
            return  # after the end-of-archive block there is only padding
        view = memoryview(data)
        if self._skip and not self._buf:
            n = min(self._skip, len(view))
            self._skip -= n
            self._offset += n
            view = view[n:]
            if not view:
                return
        self._buf += view
        self._parse()

    def _parse(self) -> None:
        buf = self._buf
        n = len(buf)
        pos = 0
        while True:
            if self._skip:
                k = min(self._skip, n - pos)
                pos += k
                self._skip -= k
                if self._skip:
                    break
            if self._want is not None:
                callback, size, padded = self._want
                if n - pos < padded:
                    break
                self._want = None
                callback(bytes(buf[pos:pos + size]))
                pos += padded
                continue
            if n - pos < 512:
                break
            h = bytes(buf[pos:pos + 512])
            if h == _ZERO:
                self._ended = True
                pos = n
                break
            self._header(h, self._offset + pos)
            pos += 512
        del buf[:pos]
        self._offset += pos

    def _header(self, h: bytes, offset: int) -> None:
        try:
            stored = h[148:156].split(b"\0", 1)[0].strip()
            chk = int(stored, 8) if stored else -1
            field = h[124:136]
            size = _num(field) if field[0] & 0x80 else int(field.split(b"\0", 1)[0].strip() or b"0", 8)
        except ValueError:
            raise tarfile.TarError(f"bad header at offset {offset}") from None
        if size < 0 or not _checksum_ok(h, chk):
            raise tarfile.TarError(f"bad header checksum or size at offset {offset}")
        typ = h[156:157]
        padded = (size + 511) & ~511
        if typ in _EXTENDED:
            if size > MAX_EXTENDED_HEADER:
                raise tarfile.TarError(f"extended header of {size} bytes at offset {offset}")
            self._want = (lambda data, typ=typ: self._extended(typ, data), size, padded)
            return
        if typ not in _PLAIN_TYPES:
            raise Unsupported(f"tar member type {typ!r}")
        name = h[:100].split(b"\0", 1)[0]
        if h[257:263] == b"ustar\0" and h[345] != 0:
            name = h[345:500].split(b"\0", 1)[0] + b"/" + name
        link = h[157:257].split(b"\0", 1)[0] if typ in _LINK_TYPES else b""
        if self._long_name is not None or self._long_link is not None:
            name = self._long_name if self._long_name is not None else name
            link = self._long_link if self._long_link is not None else link
            self._long_name = self._long_link = None
        sname = name.decode("utf-8", "surrogateescape")
        slink = link.decode("utf-8", "surrogateescape")
        if self._pax or self._gpax:
            pax = {**self._gpax, **self._pax}
            self._pax = {}
            sname = pax.get("path") or sname
            slink = pax.get("linkpath") or slink
            if "size" in pax:
                size = int(pax["size"])
                padded = (size + 511) & ~511
        if typ == b"\0" and sname.endswith("/"):
            typ = b"5"  # old V7 style directory
        if typ not in REGULAR_TYPES:
            size = padded = 0  # only regular files have data blocks
        callback = self.on_member(Member(sname, slink, size, typ))
        if callback is not None:
            self._want = (callback, size, padded)
        else:
            self._skip = padded

    def _extended(self, typ: bytes, data: bytes) -> None:
        if typ == b"x":
            self._pax = _pax(data)
        elif typ == b"g":
            self._gpax.update(_pax(data))
        elif typ == b"L":
            self._long_name = data.split(b"\0", 1)[0]
        else:
            self._long_link = data.split(b"\0", 1)[0]

    def close(self) -> None:
        """The end of the stream: a member cut short is an error, a missing end block is not."""
        if self._ended:
            return
        if self._skip or self._want is not None or any(self._buf):
            raise tarfile.TarError("unexpected end of data")


# -- the rules -----------------------------------------------------------------------------------

def _norm(name: str) -> str:
    """Normalise a member name ("./rootfs//bin/" -> "rootfs/bin"); refuse escapes."""
    if "\x00" in name:
        raise BadRequest(f"Invalid image: member name {name!r} contains NUL")
    if name[:1] == "/":
        # As LXD (and GNU tar, which unpacks the image): "/rootfs/etc/inittab" is
        # "rootfs/etc/inittab". Hard link targets go through here too and are stripped alike.
        name = name.lstrip("/")
    if name[:1] != "." and "//" not in name and "/." not in name:
        return name[:-1] if name.endswith("/") else name  # already normal (most names)
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise BadRequest(f"Invalid image: member {name!r} would land outside the target")
    return "/".join(parts)


class Checker:
    """Applies the safety rules to the members of one archive, in order; collects a ScanResult."""

    def __init__(self, kind: str):
        if kind not in ("unified", "meta", "rootfs"):
            raise ValueError(kind)
        self.kind = kind  # "unified" (metadata.yaml + rootfs/ + templates/), "meta" or "rootfs"
        self.result = ScanResult()
        self._symlinks: set[str] = set()
        self._seen: set[str] = set()
        # Directories known to have no symlink at or above them; `_above` holds every path that
        # entry relied on, so that a later symlink replacing one of them clears the cache.
        self._clear_dirs: set[str] = set()
        self._above: set[str] = set()

    def root_of(self, path: str) -> str | None:
        """The tree a member belongs to: "" for a whole-rootfs archive, "rootfs", "templates" or None."""
        if self.kind == "rootfs":
            return ""
        if path == "rootfs" or path.startswith("rootfs/"):
            return "rootfs"
        if path == "templates" or path.startswith("templates/"):
            return "templates"
        return None

    def _check_parents(self, path: str, original: str) -> None:
        parent = path.rpartition("/")[0]
        if not parent or parent in self._clear_dirs:
            return
        parts = parent.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        for p in prefixes:
            if p in self._symlinks:
                raise BadRequest(f"Invalid image: member {original!r} lies under a symlink")
        self._clear_dirs.add(parent)
        self._above.update(prefixes)

    def _check_symlink(self, path: str, target: str, original: str) -> None:
        if "/" not in target and target != "..":
            return  # a name in the link's own directory (most links)
        root = self.root_of(path)
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

    def member(self, m: Member) -> Callable[[bytes], None] | None:
        """Refuse an unsafe member and note what it tells about the image; returns a callback when
        the member's data is needed (metadata.yaml). Called once per member: kept lean."""
        name = m.name
        path = _norm(name)
        typ = m.type
        if not path:
            if typ == DIRTYPE:
                return None
            raise BadRequest(f"Invalid image: member {name!r} has an empty name")
        if "/" in path:
            self._check_parents(path, name)
        if typ == SYMTYPE:
            self._check_symlink(path, m.linkname, name)
            self._symlinks.add(path)
            if path in self._above:  # a directory replaced by a link: recheck everything below
                self._clear_dirs.clear()
                self._above.clear()
        else:
            if self._symlinks:
                self._symlinks.discard(path)
            if typ not in _SIMPLE_TYPES:
                self._check_special(path, m)
        self._seen.add(path)
        result = self.result
        result.members += 1
        result.bytes += m.size
        if self.kind == "rootfs" or path.startswith("rootfs/") or path == "rootfs":
            result.has_rootfs = True
        elif typ in REGULAR_TYPES:
            if path == "metadata.yaml":
                if m.size > MAX_METADATA:
                    raise BadRequest("Invalid image: metadata.yaml is too large")
                return self._metadata
            if path.startswith("templates/"):
                result.templates.add(path.removeprefix("templates/"))
        return None

    def _check_special(self, path: str, m: Member) -> None:
        """Hard links and device nodes; anything else that is not a file, directory, symlink or
        fifo is refused."""
        typ = m.type
        if typ == LNKTYPE:
            target = _norm(m.linkname)
            if not target or self.root_of(target) != self.root_of(path) or target not in self._seen:
                raise BadRequest(f"Invalid image: hard link {m.name!r} -> {m.linkname!r} points outside the image")
            self._check_parents(target, m.linkname)
            if target in self._symlinks:
                raise BadRequest(f"Invalid image: hard link {m.name!r} points at a symlink")
        elif typ in (CHRTYPE, BLKTYPE):
            rel = path if self.kind == "rootfs" else path.removeprefix("rootfs/")
            in_dev = (self.kind == "rootfs" or path.startswith("rootfs/")) and rel.startswith("dev/")
            if not in_dev:
                raise BadRequest(f"Invalid image: device node {m.name!r} outside /dev")
        else:
            raise BadRequest(f"Invalid image: member {m.name!r} has an unsupported type")

    def _metadata(self, data: bytes) -> None:
        self.result.metadata = parse_metadata(data)

    def finish(self) -> ScanResult:
        result = self.result
        if result.members == 0:
            raise BadRequest("Invalid image: the tarball is empty")
        if self.kind in ("unified", "meta") and result.metadata is None:
            raise BadRequest("Invalid image: the tarball is missing metadata.yaml")
        if self.kind == "unified" and not result.has_rootfs:
            raise BadRequest("Invalid image: the tarball has no rootfs/ directory")
        return result


def corrupt(compression: str, e: BaseException) -> BadRequest:
    what = "tarball" if compression == "none" else f"{compression} tarball"
    return BadRequest(f"Invalid image: truncated or corrupt {what} data: {e}")


class StreamScan:
    """The whole scan of one (possibly compressed) tarball, fed with its bytes in order.

    Two stages that may run on two threads: `inflate` (compressed bytes to tar bytes, mostly
    outside the GIL) and `walk` (the headers and the rules, in Python); `feed` and `finish` run
    both. Raises Unsupported (from the constructor or a stage) when the tarfile-based scan must do it.
    """

    def __init__(self, compression: str, kind: str):
        self.compression = compression
        self.checker = Checker(kind)
        self.decompressor = Decompressor(compression)
        self.walker = TarWalker(self.checker.member)

    def feed(self, data) -> None:
        for piece in self.inflate(data):
            self.walk(piece)

    def finish(self) -> ScanResult:
        self.end_input()
        return self.finish_walk()

    def inflate(self, data) -> Iterator[bytes]:
        try:
            yield from self.decompressor.feed(data)
        except DATA_ERRORS as e:
            raise corrupt(self.compression, e) from None

    def end_input(self) -> None:
        try:
            self.decompressor.close()
        except DATA_ERRORS as e:
            raise corrupt(self.compression, e) from None

    def walk(self, piece) -> None:
        try:
            self.walker.feed(piece)
        except (BadRequest, Unsupported):
            raise
        except DATA_ERRORS as e:
            raise corrupt(self.compression, e) from None

    def finish_walk(self) -> ScanResult:
        try:
            self.walker.close()
        except DATA_ERRORS as e:
            raise corrupt(self.compression, e) from None
        return self.checker.finish()


# -- whole files ---------------------------------------------------------------------------------

def scan_tarball(path: str | os.PathLike, compression: str, kind: str) -> ScanResult:
    """Read a whole image tarball and check every member (see the module docstring).

    kind: "unified" (metadata.yaml + rootfs/ + templates/), "meta" (the metadata tarball of a split
    image) or "rootfs" (a split image's root filesystem as a tarball).
    """
    try:
        scan = StreamScan(compression, kind)
        with open(path, "rb") as f:
            while chunk := f.read(READ_SIZE):
                scan.feed(chunk)
        return scan.finish()
    except Unsupported:
        return scan_with_tarfile(path, compression, kind)


def scan_with_tarfile(path: str | os.PathLike, compression: str, kind: str) -> ScanResult:
    """The same scan through Python's tarfile: slower, but it reads every tar dialect there is."""
    checker = Checker(kind)
    try:
        with open_decompressed(path, compression) as stream:
            mode = "r|" if compression != "none" else "r:"
            with tarfile.open(fileobj=stream, mode=mode, bufsize=READ_SIZE) as tf:
                for m in tf:
                    callback = checker.member(Member.from_tarinfo(m))
                    if callback is not None:
                        callback((tf.extractfile(m) or io.BytesIO()).read())
    except BadRequest:
        raise
    except DATA_ERRORS as e:
        raise corrupt(compression, e) from None
    return checker.finish()


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
