"""Where each image's files are, kept in memory.

An export, a launch or a delete first resolves a fingerprint (or a unique prefix of one) to the
image's files and public flag. The index answers that without a database round trip. It is loaded
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
        self._by_fp: dict[str, Located] | None = None
        self.generation = 0  # bumped by every write, so that a stale load is not installed

    @property
    def loaded(self) -> bool:
        return self._by_fp is not None

    def install(self, entries: list[Located], generation: int) -> None:
        """Install a load that started at `generation`, unless a write happened since."""
        if generation == self.generation:
            self._by_fp = {e.fingerprint: e for e in entries}

    def resolve(self, prefix: str, public_only: bool = False) -> Located:
        assert self._by_fp is not None, "load the index first"
        prefix = check_prefix(prefix)
        hit = self._by_fp.get(prefix)
        if hit is not None:
            candidates = [hit]
        else:
            candidates = [e for fp, e in self._by_fp.items() if fp.startswith(prefix)]
        if public_only:
            candidates = [e for e in candidates if e.public]
        return pick(prefix, candidates)

    def has(self, fingerprint: str) -> bool:
        assert self._by_fp is not None, "load the index first"
        return fingerprint in self._by_fp

    def put(self, entry: Located) -> None:
        self.generation += 1
        if self._by_fp is not None:
            self._by_fp[entry.fingerprint] = entry

    def drop(self, fingerprint: str) -> None:
        self.generation += 1
        if self._by_fp is not None:
            self._by_fp.pop(fingerprint, None)

    def invalidate(self) -> None:
        self.generation += 1
        self._by_fp = None
