"""RFC 3339 timestamps as LXD writes them."""

from __future__ import annotations

import datetime as _dt
import time

ZERO_TIME = "0001-01-01T00:00:00Z"  # Go's zero time.Time: a date never set
EPOCH_TIME = "1970-01-01T00:00:00Z"  # time.Unix(0, 0): what LXD stores for "never" in some fields


def rfc3339(ts: float | None = None) -> str:
    """Format a unix time (default: now) with nanosecond precision, local offset as LXD does (UTC here)."""
    if ts is None:
        ns = time.time_ns()
    else:
        ns = int(ts * 1_000_000_000)
    sec, frac = divmod(ns, 1_000_000_000)
    base = _dt.datetime.fromtimestamp(sec, _dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{base}.{frac:09d}Z"


def parse_rfc3339(value: str) -> float:
    """Parse an RFC 3339 timestamp (any fractional precision) to a unix time."""
    v = value.strip()
    if v.endswith("Z"):
        v = v[:-1] + "+00:00"
    head, sep, rest = v.partition(".")
    if sep:
        digits = ""
        i = 0
        while i < len(rest) and rest[i].isdigit():
            digits += rest[i]
            i += 1
        tz = rest[i:]
        frac = float("0." + digits) if digits else 0.0
        dt = _dt.datetime.fromisoformat(head + tz)
        return dt.timestamp() + frac
    return _dt.datetime.fromisoformat(v).timestamp()
