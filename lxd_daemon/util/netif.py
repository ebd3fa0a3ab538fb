"""Network interface flags (net/if.h) and the `type` LXD reports for an interface."""

from __future__ import annotations

IFF_UP = 0x1
IFF_BROADCAST = 0x2
IFF_LOOPBACK = 0x8
IFF_POINTOPOINT = 0x10


def link_type(flags: int) -> str:
    """LXD's interface type of a link with these flags."""
    if flags & IFF_LOOPBACK:
        return "loopback"
    if flags & IFF_POINTOPOINT:
        return "point-to-point"
    if flags & IFF_BROADCAST:
        return "broadcast"
    return "unknown"
