"""Start-up checks of the host that end in a warning rather than a refusal to start.

root's subordinate id ranges: with no range for root in /etc/subuid or /etc/subgid the daemon maps
containers onto a default range (lxd_daemon/instances/idmap.py host_ranges) that the host never
allotted, so "Missing subordinate id range" is raised until a start-up finds both files in order.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from lxd_daemon.instances.idmap import DEFAULT_BASE, DEFAULT_RANGE, _sub_range
from lxd_daemon.warnings import SUBID_RANGE_MISSING, raise_warning, resolve_warning

SUBUID = Path("/etc/subuid")
SUBGID = Path("/etc/subgid")


def missing_subid_ranges(subuid: Path = SUBUID, subgid: Path = SUBGID) -> list[str]:
    """One sentence per file that has no range for root (missing, unreadable or without a
    `root:` / `0:` line), naming the default range used instead; empty when both have one."""
    out = []
    for path, what in ((subuid, "uid"), (subgid, "gid")):
        if _sub_range(path) is None:
            out.append(f"No {what} range for root in {path}: using the default range "
                       f"{DEFAULT_BASE}-{DEFAULT_BASE + DEFAULT_RANGE - 1} ({DEFAULT_BASE}:{DEFAULT_RANGE})")
    return out


async def check_subid_ranges(services, subuid: Path = SUBUID, subgid: Path = SUBGID) -> list[str]:
    """Raise the warning with what is missing, or resolve it when nothing is. Returns the
    sentences (for callers and tests)."""
    problems = await asyncio.to_thread(missing_subid_ranges, subuid, subgid)
    if problems:
        await raise_warning(services, SUBID_RANGE_MISSING, "; ".join(problems))
    else:
        await resolve_warning(services, SUBID_RANGE_MISSING)
    return problems
