"""Where each image's files are, kept in memory.

An export, a launch or a delete first resolves a fingerprint (or a unique prefix of one) to the
image's files and public flag. Rows are per (project, fingerprint): the same image may be in
several projects (the files are shared). The index answers that without a database round trip. It is loaded
with one query when first needed; the image service records each write it commits (put, drop,
invalidate), and a load that raced with a write is thrown away rather than installed.
"""

from __future__ import annotations

from dataclasses import dataclass

from lxd_daemon.errors import BadRequest, NotFound

HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True, slots=True)
class Located:
    id: int
    fingerprint: str
    public: bool
    layout: str  # "unified" or "split"
    compression: str
    rootfs_format: str
    project: str = "default"


def check_prefix(prefix: str) -> str:
    """A fingerprint prefix in canonical form; anything that cannot name an image is not found."""
    prefix = prefix.lower()
    if not prefix or len(prefix) > 64 or not set(prefix) <= HEX:
        raise NotFound("Image not found")
    return prefix


def pick(prefix: str, candidates: list) -> object:
    """The one candidate a prefix names: an exact match wins, several matches are an error."""
    if not candidates:
        raise NotFound("Image not found")
    if len(candidates) > 1:
        exact = [c for c in candidates if c.fingerprint == prefix]
        if exact:
            return exact[0]
        raise BadRequest(f"More than one image matches the fingerprint prefix {prefix!r}")
    return candidates[0]


class ImageIndex:
    def __init__(self) -> None:
        self._rows: dict[tuple[str, str], Located] | None = None  # (project, fingerprint)
        self.generation = 0  # bumped by every write, so that a stale load is not installed

    @property
    def loaded(self) -> bool:
        return self._rows is not None

    def install(self, entries: list[Located], generation: int) -> None:
        """Install a load that started at `generation`, unless a write happened since."""
        if generation == self.generation:
            self._rows = {(e.project, e.fingerprint): e for e in entries}

    def resolve(self, prefix: str, public_only: bool = False, project: str | None = None) -> Located:
        """The image of `project` a fingerprint or unique prefix names; with project None, any
        project's row (where the shared files are)."""
        assert self._rows is not None, "load the index first"
        prefix = check_prefix(prefix)
        hit = self._rows.get((project, prefix)) if project is not None else None
        if hit is not None:
            candidates = [hit]
        else:
            seen: dict[str, Located] = {}
            for (p, fp), e in self._rows.items():
                if fp.startswith(prefix) and (project is None or p == project):
                    if fp not in seen or (public_only and e.public and not seen[fp].public):
                        seen[fp] = e
            candidates = list(seen.values())
        if public_only:
            candidates = [e for e in candidates if e.public]
        return pick(prefix, candidates)

    def has(self, fingerprint: str, project: str | None = None) -> bool:
        assert self._rows is not None, "load the index first"
        if project is not None:
            return (project, fingerprint) in self._rows
        return any(fp == fingerprint for _, fp in self._rows)

    def put(self, entry: Located) -> None:
        self.generation += 1
        if self._rows is not None:
            self._rows[(entry.project, entry.fingerprint)] = entry

    def drop(self, fingerprint: str, project: str) -> None:
        self.generation += 1
        if self._rows is not None:
            self._rows.pop((project, fingerprint), None)

    def invalidate(self) -> None:
        self.generation += 1
        self._rows = None
