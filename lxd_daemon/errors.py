"""Error kinds shared by services and routes; the API renders each as LXD's error envelope."""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator


class LXDError(Exception):
    """An error with an HTTP status. Services raise these; the API renders them."""

    status = 500

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status


class BadRequest(LXDError):
    status = 400


class Forbidden(LXDError):
    status = 403


class NotFound(LXDError):
    status = 404


class MethodNotAllowed(LXDError):
    status = 405


class Conflict(LXDError):
    status = 409


class PreconditionFailed(LXDError):
    status = 412


class TooLarge(LXDError):
    status = 413


class NotImplementedYet(LXDError):
    status = 501


class Unavailable(LXDError):
    status = 503


class InsufficientStorage(LXDError):
    """The storage under a write ran out of space or quota (ENOSPC, EDQUOT, SQLite's "database
    or disk is full"): 507, naming what ran out, never the raw errno or database text."""

    status = 507


_SQLITE_FULL = 13


def out_of_space(exc: BaseException) -> int:
    """ENOSPC or EDQUOT when exc is a write that ran out of space or quota, else 0.

    SQLite reports a full disk as SQLITE_FULL ("database or disk is full"), possibly wrapped by
    SQLAlchemy (the driver's exception is then `.orig`)."""
    if isinstance(exc, OSError):
        return exc.errno if exc.errno in (errno.ENOSPC, errno.EDQUOT) else 0
    orig = getattr(exc, "orig", None) or exc
    if orig.__class__.__name__ in ("OperationalError", "DatabaseError"):
        if getattr(orig, "sqlite_errorcode", None) == _SQLITE_FULL or "database or disk is full" in str(orig):
            return errno.ENOSPC
    return 0


def insufficient_storage(exc: BaseException, what: str, where: object = None) -> InsufficientStorage | None:
    """The 507 for an out-of-space exc (None for any other error): "No space left on the storage
    holding WHAT (WHERE)" or "Disk quota exceeded on ...". `where` defaults to the file the
    error names."""
    code = out_of_space(exc)
    if not code:
        return None
    if where is None:
        where = getattr(exc, "filename", None)
    head = "Disk quota exceeded on" if code == errno.EDQUOT else "No space left on"
    return InsufficientStorage(f"{head} the storage holding {what}" + (f" ({where})" if where else ""))


@contextlib.contextmanager
def storage_errors(what: str, where: object = None) -> Iterator[None]:
    """Turn ENOSPC/EDQUOT (and a full SQLite database) raised inside the block into a 507 naming
    `what`; any other error passes unchanged. Works around awaits too."""
    try:
        yield
    except InsufficientStorage:
        raise
    except Exception as e:
        mapped = insufficient_storage(e, what, where)
        if mapped is None:
            raise
        raise mapped from None
