"""Validators for config values. Each takes a string and raises ValueError with a reason."""

from __future__ import annotations

import ipaddress
import re

TRUE = frozenset({"true", "1", "yes", "on"})
FALSE = frozenset({"false", "0", "no", "off"})


def parse_bool(value: str) -> bool:
    v = value.strip().lower()
    if v in TRUE:
        return True
    if v in FALSE:
        return False
    raise ValueError(f"Invalid value for a boolean: {value!r}")


def is_bool(value: str) -> None:
    parse_bool(value)


def is_any(value: str) -> None:
    return None


def is_int(value: str) -> None:
    try:
        int(value)
    except ValueError:
        raise ValueError(f"Invalid value for an integer: {value!r}") from None


def is_uint(value: str) -> None:
    is_int(value)
    if int(value) < 0:
        raise ValueError(f"Invalid value for a positive integer: {value!r}")


def is_one_of(*choices: str):
    def check(value: str) -> None:
        if value not in choices:
            raise ValueError(f"Invalid value {value!r} (supported: {', '.join(choices)})")

    return check


_DURATION = re.compile(r"^(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$")


def is_duration(value: str) -> None:
    """A Go-style duration ("1h30m", "10s") as LXD uses for core.remote_token_expiry."""
    if not _DURATION.match(value):
        raise ValueError(f"Invalid duration: {value!r}")


def is_listen_address(value: str) -> None:
    """host, host:port, [v6]:port or :port."""
    v = value.strip()
    if not v:
        raise ValueError("Empty address")
    host, port = v, None
    if v.startswith("["):
        end = v.find("]")
        if end < 0:
            raise ValueError(f"Invalid address: {value!r}")
        host, rest = v[1:end], v[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"Invalid address: {value!r}")
            port = rest[1:]
    elif v.count(":") == 1:
        host, port = v.split(":")
    if port is not None:
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"Invalid port in address: {value!r}")
    if host and host not in ("localhost",):
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if not re.match(r"^[A-Za-z0-9.-]+$", host):
                raise ValueError(f"Invalid host in address: {value!r}") from None


# -- network values (LXD's wording), shared by network drivers and nic devices -----------------

_IFNAME = re.compile(r"^[-_a-zA-Z0-9.]+$")
_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")


def is_interface_name(value: str) -> None:
    """A Linux interface name: 2-15 characters of letters, digits, '-', '_' and '.'."""
    if len(value) < 2:
        raise ValueError("Network interface is too short (minimum 2 characters)")
    if len(value) > 15:
        raise ValueError("Network interface is too long (maximum 15 characters)")
    if not _IFNAME.match(value) or value in ("..",):
        raise ValueError("Network interface contains invalid characters")


def is_mac(value: str) -> None:
    """A unicast MAC address, six colon-separated hex bytes."""
    if not _MAC.match(value):
        raise ValueError("Invalid MAC address, must be 6 bytes of hex separated by colons")
    if int(value[:2], 16) & 1:
        raise ValueError(f"{value!r} is a multicast MAC address")


def int_in_range(what: str, low: int, high: int):
    """A check of a decimal integer within [low, high] (`what` names it in the errors)."""
    def check(value: str) -> None:
        try:
            n = int(value, 10)
        except ValueError:
            raise ValueError(f"Invalid {what} {value!r}") from None
        if n < low or n > high:
            raise ValueError(f"Out of {what} range ({low}-{high}) {value!r}")

    return check


is_mtu = int_in_range("MTU", 1280, 16384)
is_vlan = int_in_range("VLAN ID", 0, 4094)


def list_of(item_check, label: str = "Item"):
    """A comma-separated list, each item checked (the error names the item after `label`)."""
    def check(value: str) -> None:
        for item in value.split(","):
            item = item.strip()
            try:
                item_check(item)
            except ValueError as e:
                raise ValueError(f"{label} {item!r}: {e}") from None
    return check


def is_abs_path(value: str) -> None:
    if not value.startswith("/"):
        raise ValueError("Must be absolute file path")
