"""Object names: LXD's rules, one validator per kind of object.

Every name that arrives in a URL path (checked once for every route, in lxd_daemon.api.request)
or in a JSON body (the wire models' name fields) goes through one of these before any handler or
service uses it, e.g. to build a path. A name that breaks a rule raises InvalidName, which the API
answers with a 400 in LXD's error envelope (`status` says otherwise where LXD answers a malformed
lookup key as "not found").

The rules follow LXD 5.0: instance names are host names; profile, pool, volume, backup and
snapshot names may not contain `/` and may not be `.` or `..`; project names also refuse spaces,
underscores and quotes; network names must be safe in a URL segment; image alias names may
contain `/`. On top of LXD's rules every name must be non-empty, valid UTF-8 text (no lone
surrogates), free of control characters (NUL included) and of bounded length.
"""

from __future__ import annotations

import re
from collections.abc import Callable

MAX_LENGTH = 255  # bytes of UTF-8, for kinds LXD bounds only by its database

_HOSTNAME = re.compile(r"[A-Za-z0-9-]+")
_HEX = re.compile(r"[0-9a-fA-F]+")
_WORD = re.compile(r"[a-z][a-z-]*")
_LOG_FILE = re.compile(r"(lxc\.log|lxc\.conf|console\.log|forkstart\.log|(migration|snapshot|exec)_[A-Za-z0-9._-]+)")


class InvalidName(ValueError):
    """A name that breaks its kind's rules; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message = message
        self.status = status


def _text(kind: str, name: object, max_length: int = MAX_LENGTH) -> str:
    """The rules every name follows: a non-empty str of valid UTF-8 without control characters."""
    if not isinstance(name, str) or name == "":
        raise InvalidName(f"No {kind} name provided")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidName(f"Invalid {kind} name: not valid UTF-8 text") from None
    if size > max_length:
        raise InvalidName(f"Invalid {kind} name: longer than {max_length} bytes")
    if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in name):
        raise InvalidName(f"Invalid {kind} name {name!r}: contains control characters")
    return name


def _no_slash(kind: str, name: str) -> None:
    if "/" in name:
        raise InvalidName(f"Invalid {kind} name {name!r}: {kind} names may not contain slashes")
    if name in (".", ".."):
        raise InvalidName(f"Invalid {kind} name {name!r}")


def _plain(kind: str, max_length: int = MAX_LENGTH) -> Callable[[object], str]:
    """The validator of a kind whose names only follow the common rules and have no `/`."""

    def check(name: object) -> str:
        name = _text(kind, name, max_length)
        _no_slash(kind, name)
        return name

    return check


def hostname(kind: str, name: object) -> str:
    """LXD's host-name rule: 1-63 letters, digits and hyphens; not starting with a hyphen or a
    digit, not ending with a hyphen."""
    name = _text(kind, name)
    if len(name) > 63:
        raise InvalidName(f"Invalid {kind} name: name must be 1-63 characters long")
    if not _HOSTNAME.fullmatch(name):
        raise InvalidName(f"Invalid {kind} name {name!r}: name can only contain alphanumeric and hyphen characters")
    if name[0] == "-" or name[-1] == "-":
        raise InvalidName(f"Invalid {kind} name {name!r}: name must not start or end with a hyphen")
    if name[0].isdigit():
        raise InvalidName(f"Invalid {kind} name {name!r}: name must not start with a number")
    return name


def instance(name: object) -> str:
    return hostname("instance", name)


def snapshot(name: object) -> str:
    name = _text("snapshot", name)
    _no_slash("snapshot", name)
    if " " in name:
        raise InvalidName(f"Invalid snapshot name {name!r}: snapshot names may not contain spaces")
    return name


_PROFILE_FORBIDDEN = re.compile(r"[/\s'\"\\]")


def profile(name: object) -> str:
    name = _text("profile", name)
    _no_slash("profile", name)
    if len(name) > 63:
        raise InvalidName("Invalid profile name: longer than 63 characters")
    if _PROFILE_FORBIDDEN.search(name):
        raise InvalidName(f"Invalid profile name {name!r}: no spaces, quotes or backslashes")
    return name


def alias(name: object) -> str:
    """Image alias names may contain `/`, empty components included (`a/b/`), as in LXD. A `.`
    or `..` component is refused: clients and proxies rewrite such a URL path into another one.
    So is `:`, which the stock client reads as `remote:alias`."""
    name = path_segment(name, "alias")
    if ":" in name:
        raise InvalidName(f"Invalid alias name {name!r}: cannot contain ':'")
    return name


pool = _plain("storage pool")


volume = _plain("storage volume")


def volume_type(name: object) -> str:
    name = _text("storage volume type", name, 32)
    if not _WORD.fullmatch(name):
        raise InvalidName(f"Invalid storage volume type {name!r}")
    return name


def network(name: object) -> str:
    name = _text("network", name)
    _no_slash("network", name)
    for c in "?&:":
        if c in name:
            raise InvalidName(f"Invalid network name {name!r}: cannot contain {c!r}")
    return name


def project(name: object) -> str:
    name = _text("project", name)
    _no_slash("project", name)
    for chars, what in ((" ", "spaces"), ("_", "underscores"), ("'\"", "quotes")):
        if any(c in name for c in chars):
            raise InvalidName(f"Invalid project name {name!r}: project names may not contain {what}")
    if name == "*":
        raise InvalidName("Reserved project name '*'")
    return name


backup = _plain("backup")


operation = _plain("operation", 64)


def fingerprint(name: object) -> str:
    """An image or certificate fingerprint (or a prefix of one): hex digits. Anything else can't
    name an object: "not found", as LXD answers it."""
    name = _text("fingerprint", name, 64)
    if not _HEX.fullmatch(name):
        raise InvalidName("not found", status=404)
    return name


def log_file(name: object) -> str:
    name = _text("log file", name)
    _no_slash("log file", name)
    if not _LOG_FILE.fullmatch(name):
        raise InvalidName(f"Invalid log file name {name!r}")
    return name


generic = _plain("object")  # any other name taken from a URL path segment


def path_segment(name: object, kind: str = "object") -> str:
    """The value of a `{name:path}` parameter: a name that may contain `/` (and empty
    components), but no `.` or `..` component."""
    name = _text(kind, name)
    if any(part in (".", "..") for part in name.split("/")):
        raise InvalidName(f"Invalid {kind} name {name!r}: '.' or '..' path component")
    return name


# The kind of the object named by a URL path parameter, from the path segment before it
# (`/1.0/profiles/{name}` -> profile). `{type}` after `volumes` is a volume type, and the
# parameter after it a volume name.
COLLECTIONS: dict[str, Callable[[object], str]] = {
    "instances": instance,
    "containers": instance,
    "virtual-machines": instance,
    "snapshots": snapshot,
    "backups": backup,
    "logs": log_file,
    "profiles": profile,
    "aliases": alias,
    "images": fingerprint,
    "certificates": fingerprint,
    "storage-pools": pool,
    "volumes": volume_type,
    "networks": network,
    "projects": project,
    "operations": operation,
}


def kinds_for_route(template: str) -> dict[str, Callable[[object], str]]:
    """{parameter name: validator} for a route's path template such as
    `/1.0/storage-pools/{pool}/volumes/{type}/{name}`."""
    out: dict[str, Callable[[object], str]] = {}
    segments = template.strip("/").split("/")
    for i, seg in enumerate(segments):
        if not (seg.startswith("{") and seg.endswith("}")):
            continue
        param, _, convertor = seg[1:-1].partition(":")
        before = segments[i - 1] if i else ""
        if before.startswith("{") and i >= 2 and segments[i - 2] == "volumes":
            check = volume
        else:
            check = COLLECTIONS.get(before)
            if check is None:
                check = path_segment if convertor == "path" else generic
        out[param] = check
    return out


__all__ = ["InvalidName", "alias", "backup", "fingerprint", "generic", "instance", "kinds_for_route",
           "log_file", "network", "operation", "path_segment", "pool", "profile", "project", "snapshot",
           "volume", "volume_type"]
