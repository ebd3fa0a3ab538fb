"""Server configuration (`PUT/PATCH /1.0`): a key schema, validation, and the cached values.

Keys are data (one table); validation is a lookup. Hidden keys are stored transformed and read
back as `true`, as LXD does for core.trust_password.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable
from dataclasses import dataclass

from lxd_daemon.errors import BadRequest
from lxd_daemon.util import schedule
from lxd_daemon.util import validate as v


@dataclass(frozen=True)
class Key:
    check: Callable[[str], None] = v.is_any
    default: str = ""
    hidden: bool = False


def _hash_password(value: str) -> str:
    salt = os.urandom(32)
    digest = hashlib.scrypt(value.encode(), salt=salt, n=16384, r=8, p=1, dklen=64, maxmem=64 * 1024 * 1024)
    return (salt + digest).hex()


def check_password(stored: str, candidate: str) -> bool:
    try:
        raw = bytes.fromhex(stored)
    except ValueError:
        return False
    salt, digest = raw[:32], raw[32:]
    got = hashlib.scrypt(candidate.encode(), salt=salt, n=16384, r=8, p=1, dklen=64, maxmem=64 * 1024 * 1024)
    return hmac.compare_digest(got, digest)


# Stored-form transformers for hidden keys.
_TRANSFORM: dict[str, Callable[[str], str]] = {"core.trust_password": _hash_password}

KEYS: dict[str, Key] = {
    "core.trust_password": Key(hidden=True),
    "core.remote_token_expiry": Key(schedule.validate_expiry),  # LXD's expiry expression: "1d 12H"
    "core.shutdown_timeout": Key(v.is_uint, default="5"),
    "core.proxy_http": Key(),
    "core.proxy_https": Key(),
    "core.proxy_ignore_hosts": Key(),
    "images.auto_update_cached": Key(v.is_bool, default="true"),
    "images.auto_update_interval": Key(v.is_uint, default="6"),
    "images.compression_algorithm": Key(
        v.is_one_of("none", "gzip", "bzip2", "xz", "lzma", "zstd", "squashfs"), default="gzip"),
    "images.default_architecture": Key(v.is_one_of("", "x86_64", "aarch64", "armv7l", "i686", "ppc64le", "s390x", "riscv64")),
    "images.remote_cache_expiry": Key(v.is_uint, default="10"),
}


def register(key: str, spec: Key) -> None:
    """Let a later subsystem (TLS listener, storage) add its server keys."""
    KEYS[key] = spec


def normalise_value(key: str, value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    raise BadRequest(f"Invalid value for config key {key!r}: must be a string")


class ServerConfig:
    """The server config as stored (hidden values transformed), cached in memory."""

    def __init__(self, values: dict[str, str] | None = None):
        self.values: dict[str, str] = dict(values or {})

    def get(self, key: str) -> str:
        if key in self.values:
            return self.values[key]
        spec = KEYS.get(key)
        return spec.default if spec else ""

    def public(self) -> dict[str, object]:
        """What GET /1.0 shows: set keys only, hidden ones as true."""
        out: dict[str, object] = {}
        for key, val in sorted(self.values.items()):
            spec = KEYS.get(key)
            out[key] = True if spec is not None and spec.hidden else val
        return out

    def plan(self, changes: dict[str, object], *, replace: bool) -> dict[str, str | None]:
        """Validate a PUT (replace=True) or PATCH and return {key: stored value or None to unset}."""
        if not isinstance(changes, dict):
            raise BadRequest("Invalid config: must be an object")
        result: dict[str, str | None] = {}
        for key, raw in changes.items():
            spec = KEYS.get(key)
            if spec is None:
                raise BadRequest(f"Invalid config key {key!r}: unknown server configuration key")
            if spec.hidden and raw is True:
                continue  # a client sending back what it read: keep the stored value
            value = normalise_value(key, raw)
            if value == "":
                result[key] = None
                continue
            try:
                spec.check(value)
            except ValueError as e:
                raise BadRequest(f"Invalid value for config key {key!r}: {e}") from None
            result[key] = _TRANSFORM[key](value) if key in _TRANSFORM else value
        if replace:
            for key in self.values:
                if key not in changes:
                    result[key] = None
        # Only real changes: clients send back the whole config on every `config set`.
        return {k: val for k, val in result.items() if self.values.get(k) != val}

    def apply(self, plan: dict[str, str | None]) -> None:
        for key, value in plan.items():
            if value is None:
                self.values.pop(key, None)
            else:
                self.values[key] = value
