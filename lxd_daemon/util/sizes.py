"""Byte and bit size strings as LXD 5.x parses them.

Bytes: an integer with no suffix, "B" or " bytes" is bytes; kB MB GB TB PB EB multiply by powers
of 1000 and KiB MiB GiB TiB PiB EiB by powers of 1024. Bits (for network limits): bit, kbit,
Mbit, Gbit, Tbit, Pbit, Ebit (1000) and Kibit ... Eibit (1024). The number is a whole number, as
in LXD ("1.5GB" is refused).
"""

from __future__ import annotations

import re

_BYTE_UNITS: dict[str, int] = {"": 1, "B": 1, " bytes": 1}
_BIT_UNITS: dict[str, int] = {"": 1, "bit": 1}
for _i, (_dec, _bin) in enumerate(zip("kMGTPE", "KMGTPE", strict=True), start=1):
    _BYTE_UNITS[f"{_dec}B"] = 1000 ** _i
    _BYTE_UNITS[f"{_bin}iB"] = 1024 ** _i
    _BIT_UNITS[f"{_dec}bit"] = 1000 ** _i
    _BIT_UNITS[f"{_bin}ibit"] = 1024 ** _i

_NUM = re.compile(r"^(-?\d+)(.*)$")


def _parse(value: str, units: dict[str, int], what: str) -> int:
    m = _NUM.match(value)
    if not m:
        raise ValueError(f"Invalid {what} {value!r}")
    number, suffix = m.groups()
    mult = units.get(suffix)
    if mult is None:
        raise ValueError(f"Invalid {what} {value!r}: unknown unit {suffix.strip()!r}")
    n = int(number)
    if n < 0:
        raise ValueError(f"Invalid {what} {value!r}: negative")
    result = n * mult
    if result >= 2 ** 63:
        raise ValueError(f"Invalid {what} {value!r}: too large")
    return result


def parse_byte_size(value: str) -> int:
    """"512MiB" -> 536870912, "1GB" -> 1000000000, "4096" -> 4096."""
    return _parse(value, _BYTE_UNITS, "size")


def parse_bit_size(value: str) -> int:
    """"100Mbit" -> 100000000 (bits)."""
    return _parse(value, _BIT_UNITS, "bit rate")


def format_byte_size(n: int) -> str:
    """The largest binary unit that divides n exactly ("512MiB"), else bytes."""
    for unit, mult in (("EiB", 1024 ** 6), ("PiB", 1024 ** 5), ("TiB", 1024 ** 4), ("GiB", 1024 ** 3),
                       ("MiB", 1024 ** 2), ("KiB", 1024)):
        if n and n % mult == 0:
            return f"{n // mult}{unit}"
    return f"{n}B"


def format_rate(n: float) -> str:
    """A size in decimal units with two decimals, as LXD prints transfer progress: "12.35MB"."""
    if n < 1000:
        return f"{int(n)}B"
    for unit in ("kB", "MB", "GB", "TB", "PB", "EB"):
        n /= 1000
        if n < 1000:
            return f"{n:.2f}{unit}"
    return f"{n:.2f}EB"
