"""gzip inflated with ISA-L (several times faster than gzip(1) or zlib), fed to a tool's stdin.

Image unpacks and backup imports both hand a gzip tarball to tar(1): tar spawning gzip(1) spends
most of an unpack inflating; inflating here, in the calling thread, while tar writes the files
halves it."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

try:
    from isal import igzip_threaded as _igzip
    from isal.isal_zlib import error as _inflate_error
except ImportError:  # pragma: no cover - isal is a dependency; gzip(1) is the fallback
    _igzip = None
    _inflate_error = OSError

CHUNK = 1 << 20
INFLATE_ERRORS = (OSError, EOFError, ValueError, _inflate_error)


class CorruptGzip(Exception):
    """The compressed stream is damaged (the message says how)."""


def available() -> bool:
    return _igzip is not None


def is_gzip(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(2) == b"\x1f\x8b"
    except OSError:
        return False


def open_gzip(path: Path):
    """A binary file object of the inflated content (ISA-L when available, else the stdlib)."""
    if _igzip is not None:
        return _igzip.open(path, "rb", threads=1)
    import gzip

    return gzip.open(path, "rb")


def open_gzip_out(target, level: int):
    """A binary file object compressing into `target` (a path or a binary file) at `level`."""
    if _igzip is not None:
        return _igzip.open(target, "wb", compresslevel=level, threads=1)
    import gzip

    return gzip.GzipFile(filename=target if isinstance(target, (str, Path)) else None,
                         fileobj=None if isinstance(target, (str, Path)) else target, mode="wb", compresslevel=level)


def inflate_into(path: Path, argv: list[str]) -> tuple[int, bytes]:
    """Run `argv` (reading stdin) fed the inflated content of the gzip file `path`; blocking, run
    it in a thread. Returns the tool's exit status and stderr; a damaged stream kills the tool and
    raises CorruptGzip."""
    with tempfile.TemporaryFile() as errf, open_gzip(path) as src:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=errf)
        try:
            while chunk := src.read(CHUNK):
                proc.stdin.write(chunk)
        except BrokenPipeError:
            pass  # the tool stopped early: its status and message say why
        except INFLATE_ERRORS as e:
            proc.kill()
            proc.wait()
            raise CorruptGzip(str(e) or type(e).__name__) from None
        finally:
            try:
                proc.stdin.close()
            except BrokenPipeError:
                pass
        rc = proc.wait()
        errf.seek(0)
        return rc, errf.read()
