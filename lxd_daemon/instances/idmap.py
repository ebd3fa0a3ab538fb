"""User-namespace id maps, as LXD records them in `volatile.idmap.*`.

An IdmapSet is a list of entries {Isuid, Isgid, Hostid, Nsid, Maprange} (LXD's JSON field names).
The shared default map gives container root the host range allotted to root in /etc/subuid and
/etc/subgid; `security.idmap.isolated` carves a distinct range per container.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

DEFAULT_BASE = 1_000_000
DEFAULT_RANGE = 1_000_000_000
ISOLATED_SIZE = 65536


@dataclass(frozen=True)
class IdmapEntry:
    isuid: bool
    isgid: bool
    hostid: int
    nsid: int
    maprange: int

    def to_json(self) -> dict:
        return {"Isuid": self.isuid, "Isgid": self.isgid, "Hostid": self.hostid, "Nsid": self.nsid,
                "Maprange": self.maprange}

    @classmethod
    def from_json(cls, d: dict) -> IdmapEntry:
        return cls(bool(d["Isuid"]), bool(d["Isgid"]), int(d["Hostid"]), int(d["Nsid"]), int(d["Maprange"]))

    def host_of(self, nsid: int) -> int | None:
        if self.nsid <= nsid < self.nsid + self.maprange:
            return self.hostid + (nsid - self.nsid)
        return None

    def ns_of(self, hostid: int) -> int | None:
        if self.hostid <= hostid < self.hostid + self.maprange:
            return self.nsid + (hostid - self.hostid)
        return None


@dataclass(frozen=True)
class IdmapSet:
    entries: tuple[IdmapEntry, ...]

    # -- conversions -------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps([e.to_json() for e in self.entries], separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | None) -> IdmapSet:
        if not text:
            return cls(())
        return cls(tuple(IdmapEntry.from_json(d) for d in json.loads(text)))

    def lxc_lines(self) -> list[str]:
        """Values for `lxc.idmap` ("u 0 1000000 65536")."""
        out = []
        for e in self.entries:
            if e.isuid:
                out.append(f"u {e.nsid} {e.hostid} {e.maprange}")
            if e.isgid:
                out.append(f"g {e.nsid} {e.hostid} {e.maprange}")
        return out

    @property
    def empty(self) -> bool:
        return not self.entries

    # -- shifting ----------------------------------------------------------
    def to_host(self, uid: int, gid: int) -> tuple[int, int]:
        """Container ids -> host ids (-1 where unmapped)."""
        if self.empty:
            return uid, gid
        hu = next((h for e in self.entries if e.isuid and (h := e.host_of(uid)) is not None), -1)
        hg = next((h for e in self.entries if e.isgid and (h := e.host_of(gid)) is not None), -1)
        return hu, hg

    def to_container(self, uid: int, gid: int) -> tuple[int, int]:
        """Host ids -> container ids (-1 where unmapped, shown as 65534-ish by callers)."""
        if self.empty:
            return uid, gid
        cu = next((n for e in self.entries if e.isuid and (n := e.ns_of(uid)) is not None), -1)
        cg = next((n for e in self.entries if e.isgid and (n := e.ns_of(gid)) is not None), -1)
        return cu, cg

    def root_ids(self) -> tuple[int, int]:
        """Host uid/gid of container root (0, 0 when unmapped/privileged)."""
        hu, hg = self.to_host(0, 0)
        return max(hu, 0), max(hg, 0)


def _sub_range(path: Path, user: str = "root") -> tuple[int, int] | None:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    best = None
    for line in lines:
        parts = line.strip().split(":")
        if len(parts) != 3 or parts[0] not in (user, "0"):
            continue
        try:
            start, count = int(parts[1]), int(parts[2])
        except ValueError:
            continue
        if best is None or count > best[1]:
            best = (start, count)
    return best


def host_ranges(subuid: Path = Path("/etc/subuid"), subgid: Path = Path("/etc/subgid")) -> tuple[tuple[int, int], tuple[int, int]]:
    """root's subordinate uid and gid ranges, LXD's default when none are configured."""
    u = _sub_range(subuid) or (DEFAULT_BASE, DEFAULT_RANGE)
    g = _sub_range(subgid) or (DEFAULT_BASE, DEFAULT_RANGE)
    return u, g


def default_set(subuid: Path = Path("/etc/subuid"), subgid: Path = Path("/etc/subgid")) -> IdmapSet:
    (ub, us), (gb, gs) = host_ranges(subuid, subgid)
    if (ub, us) == (gb, gs):
        return IdmapSet((IdmapEntry(True, True, ub, 0, us),))
    return IdmapSet((IdmapEntry(True, False, ub, 0, us), IdmapEntry(False, True, gb, 0, gs)))


def isolated_set(used: list[IdmapSet], size: int = ISOLATED_SIZE, *, base: int | None = None,
                 subuid: Path = Path("/etc/subuid"), subgid: Path = Path("/etc/subgid")) -> IdmapSet:
    """A map of `size` ids that overlaps no other isolated container's host range.

    The first block (of the shared size) is left to the shared map, as LXD does."""
    (ub, us), (gb, gs) = host_ranges(subuid, subgid)
    lo, hi = max(ub, gb), min(ub + us, gb + gs)
    if base is not None:
        start = base
        if start < lo or start + size > hi:
            raise ValueError(f"security.idmap.base {base} with size {size} is outside the allotted range")
        return IdmapSet((IdmapEntry(True, True, start, 0, size),))
    taken = sorted((e.hostid, e.hostid + e.maprange) for s in used for e in s.entries)
    start = lo + ISOLATED_SIZE
    for a, b in taken:
        if start + size <= a:
            break
        if b > start:
            start = b
    if start + size > hi:
        raise ValueError("Not enough subordinate ids left for an isolated container")
    return IdmapSet((IdmapEntry(True, True, start, 0, size),))


def host_blocks(m: IdmapSet, lo: int, hi: int) -> list[tuple[int, int]]:
    """The host ranges [start, end) of `m` inside the subordinate range [lo, hi) (raw.idmap
    entries for host ids outside it are not blocks of the range)."""
    out = set()
    for e in m.entries:
        a, b = max(e.hostid, lo), min(e.hostid + e.maprange, hi)
        if a < b:
            out.add((a, b))
    return sorted(out)


@dataclass(frozen=True)
class Claim:
    """What another container holds of the subordinate range: its map for the next start
    (`volatile.idmap.next`), the map it runs with now (`volatile.idmap.current`, empty when
    stopped), whether its expanded config asks for an isolated map, and the shared map it would
    have without isolation (so a running shared map is told apart from a block)."""

    isolated: bool
    next: IdmapSet
    current: IdmapSet
    shared: IdmapSet


def ranges_in_use(claims: list[Claim], lo: int, hi: int) -> list[tuple[int, int]]:
    """Host ranges that isolated blocks must avoid, LXD's rule: every isolated container keeps
    its block (running or not); containers on the shared map consume nothing of it. A container
    still running with a block it no longer wants (config changed since its start) keeps that
    block until it stops."""
    used: set[tuple[int, int]] = set()
    for c in claims:
        if c.isolated:
            used.update(host_blocks(c.next, lo, hi))
            used.update(host_blocks(c.current, lo, hi))
        elif not c.current.empty and c.current != c.shared:
            used.update(host_blocks(c.current, lo, hi))
    return sorted(used)


def allocate_isolated(in_use: list[tuple[int, int]], size: int = ISOLATED_SIZE, *, base: int | None = None,
                      previous: IdmapSet | None = None, subuid: Path = Path("/etc/subuid"),
                      subgid: Path = Path("/etc/subgid")) -> IdmapSet:
    """The isolated block (uid and gid) for a container: its previous block when that is still
    the right size (and base) and free, else the first free block of `size` ids after the first
    65536 of root's range (left to the shared map), as LXD allocates them."""
    (ub, us), (gb, gs) = host_ranges(subuid, subgid)
    lo, hi = max(ub, gb), min(ub + us, gb + gs)
    if size <= 0:
        raise ValueError(f"Invalid security.idmap.size {size}")
    if base is not None:
        if base < lo or base + size > hi:
            raise ValueError(f"security.idmap.base {base} with size {size} is outside the allotted range")
        return IdmapSet((IdmapEntry(True, True, base, 0, size),))
    if previous is not None and previous.entries:
        first = next((e for e in previous.entries if e.nsid == 0 and e.isuid), None)
        if first is not None and first.maprange == size and lo + ISOLATED_SIZE <= first.hostid \
                and first.hostid + size <= hi and all(b <= first.hostid or a >= first.hostid + size
                                                      for a, b in in_use):
            return IdmapSet((IdmapEntry(True, True, first.hostid, 0, size),))
    start = lo + ISOLATED_SIZE
    for a, b in sorted(in_use):
        if start + size <= a:
            break
        if b > start:
            start = b
    if start + size > hi:
        raise ValueError(f"Not enough subordinate ids left for an isolated container of {size} ids "
                         f"(root's range is {lo}-{hi - 1}; {len(in_use)} blocks in use)")
    return IdmapSet((IdmapEntry(True, True, start, 0, size),))


def parse_raw_idmap(text: str) -> list[IdmapEntry]:
    """`raw.idmap`: lines "uid|gid|both HOST[-HOST] NS[-NS]" that map host ids into the container."""
    out: list[IdmapEntry] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 3 or parts[0] not in ("uid", "gid", "both"):
            raise ValueError(f"Invalid raw.idmap line {line!r}")

        def rng(s: str) -> tuple[int, int]:
            a, _, b = s.partition("-")
            lo = int(a)
            hi = int(b) if b else lo
            if hi < lo or lo < 0:
                raise ValueError(f"Invalid range {s!r} in raw.idmap")
            return lo, hi - lo + 1

        try:
            (h, hn), (n, nn) = rng(parts[1]), rng(parts[2])
        except ValueError as e:
            raise ValueError(f"Invalid raw.idmap line {line!r}: {e}") from None
        if hn != nn:
            raise ValueError(f"Invalid raw.idmap line {line!r}: ranges differ in size")
        out.append(IdmapEntry(parts[0] in ("uid", "both"), parts[0] in ("gid", "both"), h, n, hn))
    return out


def with_raw(base: IdmapSet, raw: list[IdmapEntry]) -> IdmapSet:
    """Punch the raw entries into the base map (splitting base entries around them)."""
    entries = list(base.entries)
    for r in raw:
        new: list[IdmapEntry] = []
        for e in entries:
            for kind in ("uid", "gid"):
                has = e.isuid if kind == "uid" else e.isgid
                hit = r.isuid if kind == "uid" else r.isgid
                if not has:
                    continue
                pieces = [(e.nsid, e.hostid, e.maprange)]
                if hit:
                    pieces = []
                    lo, hi = e.nsid, e.nsid + e.maprange
                    rlo, rhi = r.nsid, r.nsid + r.maprange
                    if rlo > lo:
                        pieces.append((lo, e.hostid, min(rlo, hi) - lo))
                    if rhi < hi:
                        start = max(rhi, lo)
                        pieces.append((start, e.hostid + (start - lo), hi - start))
                for ns, host, n in pieces:
                    if n > 0:
                        new.append(IdmapEntry(kind == "uid", kind == "gid", host, ns, n))
        new.append(r)
        entries = new
    return IdmapSet(tuple(_merge(entries)))


def _merge(entries: list[IdmapEntry]) -> list[IdmapEntry]:
    """Join uid/gid twins back into `both` entries, sorted by nsid."""
    uids = {(e.hostid, e.nsid, e.maprange) for e in entries if e.isuid and not e.isgid}
    gids = {(e.hostid, e.nsid, e.maprange) for e in entries if e.isgid and not e.isuid}
    both = [e for e in entries if e.isuid and e.isgid]
    for key in sorted(uids & gids):
        both.append(IdmapEntry(True, True, *key))
    rest = [IdmapEntry(True, False, *k) for k in sorted(uids - gids)] + [
        IdmapEntry(False, True, *k) for k in sorted(gids - uids)]
    return sorted(both + rest, key=lambda e: (e.nsid, not e.isuid))


def shift_tree(root: Path, old: IdmapSet, new: IdmapSet) -> int:
    """Re-own every file under root from the `old` on-disk map to the `new` one (one chown pass).
    Mode bits that chown clears (setuid/setgid) are put back. Returns the number of entries."""
    count = 0

    def one(path: str) -> None:
        nonlocal count
        st = os.lstat(path)
        cu, cg = old.to_container(st.st_uid, st.st_gid) if not old.empty else (st.st_uid, st.st_gid)
        if cu < 0 or cg < 0:
            return
        hu, hg = new.to_host(cu, cg) if not new.empty else (cu, cg)
        if hu < 0 or hg < 0 or (hu, hg) == (st.st_uid, st.st_gid):
            return
        os.lchown(path, hu, hg)
        count += 1
        if not stat.S_ISLNK(st.st_mode) and st.st_mode & (stat.S_ISUID | stat.S_ISGID):
            os.chmod(path, stat.S_IMODE(st.st_mode))

    one(str(root))
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for n in dirnames + filenames:
            one(os.path.join(dirpath, n))
    return count
