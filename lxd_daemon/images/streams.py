"""A simplestreams tree of the public images: what `lxc remote add NAME URL --protocol simplestreams`
and LXD's simplestreams client read (streams/v1/index.json, then the product catalogue it names).

The shape is the one LXD 5.0.2's parser reads (shared/simplestreams): products keyed
"os:release:variant:arch" with `arch`, `os`, `release`, `release_title`, `aliases` (a comma list),
`variant` and `versions`; a version's key starts with YYYYMMDD (the parser takes the image date
from it) and its items are files. A split image is an `lxd.tar.xz` item (the metadata tarball,
carrying the combined fingerprint under `combined_squashfs_sha256` or `combined_rootxz_sha256` /
`combined_sha256`) next to a `squashfs` or `root.tar.xz` item; a unified image is one
`lxd_combined.tar.gz` item whose sha256 is the fingerprint. The ftype names a role, not the real
compression: LXD detects that when it imports. Item paths are
`streams/images/<fingerprint>/<file>`, the file names the export API uses.

Aliases belong to products in simplestreams and to images here, so images are grouped into one
product only when they share os, release, variant, architecture and aliases (for example the
successive builds of one image after the alias moved on are separate products). The parser makes
each alias `A` into `A` (for the host's architecture) and `A/<arch>`.

`render()` is pure (image documents and file facts in, JSON documents out). `StreamsTree` keeps the
rendering, rebuilt on the first request after an image or alias changed (it listens to the image
lifecycle events), and the sha256 of split images' parts (content-addressed, so never stale).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path

from lxd_daemon.errors import NotFound
from lxd_daemon.projects.naming import DEFAULT

log = logging.getLogger("lxd.images")

INDEX_PATH = "streams/v1/index.json"
PRODUCTS_PATH = "streams/v1/images.json"
CONTENT_ID = "images"
FILES_PREFIX = "streams/images"  # under /streams/ with the rest of the tree

# Kernel architecture names (image metadata) to the names simplestreams servers use; LXD's
# parser accepts both spellings and takes `arch` for the `A/<arch>` aliases.
ARCH_NAMES = {
    "x86_64": "amd64", "i686": "i386", "i586": "i386", "aarch64": "arm64", "armv7l": "armhf",
    "armv6l": "armel", "ppc64le": "ppc64el", "ppc64": "powerpc64", "ppc": "powerpc", "s390x": "s390x",
    "riscv64": "riscv64", "mips64": "mips64", "mips": "mips", "loongarch64": "loong64",
}
KNOWN_ARCHES = frozenset(ARCH_NAMES) | frozenset(ARCH_NAMES.values()) | {"x32"}

# Lifecycle actions that do not change what the tree shows.
_QUIET_ACTIONS = ("image-retrieved", "image-secret-created")  # read, not changed


@dataclass(frozen=True, slots=True)
class ItemFile:
    """One file of an image as the tree lists it."""

    name: str  # the file name under images/<fingerprint>/
    size: int
    sha256: str


@dataclass(frozen=True, slots=True)
class ImageFiles:
    meta: ItemFile  # the unified tarball, or a split image's metadata tarball
    root: ItemFile | None = None  # a split image's root filesystem
    root_ftype: str = ""  # "squashfs" or "root.tar.xz" for a split image


def stream_arch(architecture: str) -> str:
    """The simplestreams name of an architecture, "" for one LXD would not know."""
    arch = (architecture or "").strip()
    arch = ARCH_NAMES.get(arch, arch)
    return arch if arch in KNOWN_ARCHES else ""


def _stamp(ts: float) -> str:
    """Simplestreams dates: RFC 2822."""
    return formatdate(ts, usegmt=False).replace("-0000", "+0000")


def _parse_time(value: str) -> float:
    """An image document's RFC 3339 time as Unix seconds (0 for Go's zero time or garbage)."""
    from lxd_daemon.util.timefmt import parse_rfc3339

    if not value or value.startswith("0001-01-01"):
        return 0.0
    try:
        return parse_rfc3339(value)
    except ValueError:
        return 0.0


def _version_key(img: dict) -> str:
    ts = _parse_time(img.get("created_at", "")) or _parse_time(img.get("uploaded_at", ""))
    return time.strftime("%Y%m%d_%H:%M", time.gmtime(max(ts, 0)))


def _items(fp: str, files: ImageFiles) -> dict:
    def path(f: ItemFile) -> str:
        return f"{FILES_PREFIX}/{fp}/{f.name}"

    if files.root is None:
        return {"lxd_combined.tar.gz": {"ftype": "lxd_combined.tar.gz", "path": path(files.meta),
                                        "sha256": files.meta.sha256, "size": files.meta.size}}
    meta = {"ftype": "lxd.tar.xz", "path": path(files.meta), "sha256": files.meta.sha256,
            "size": files.meta.size}
    if files.root_ftype == "squashfs":
        meta["combined_squashfs_sha256"] = fp
        root_key = "root.squashfs"
    else:
        meta["combined_rootxz_sha256"] = fp
        meta["combined_sha256"] = fp
        root_key = "root.tar.xz"
    root = {"ftype": files.root_ftype or "root.tar.xz", "path": path(files.root), "sha256": files.root.sha256,
            "size": files.root.size}
    return {"lxd.tar.xz": meta, root_key: root}


def render(images: list[dict], files: dict[str, ImageFiles], now: float | None = None) -> tuple[dict, dict]:
    """(index.json, images.json) for these image documents (public ones are listed; images without
    a known architecture or without file facts are left out)."""
    now = time.time() if now is None else now
    updated = _stamp(now)
    groups: dict[tuple, list[dict]] = {}
    for img in images:
        if not img.get("public") or img.get("type", "container") != "container":
            continue
        arch = stream_arch(img.get("architecture", ""))
        fp = img["fingerprint"]
        if not arch or fp not in files:
            continue
        props = img.get("properties") or {}
        os_name = (props.get("os") or "").strip() or "unknown"
        release = (props.get("release") or "").strip() or fp[:12]
        variant = (props.get("variant") or "").strip() or "default"
        aliases = tuple(sorted(a["name"] for a in img.get("aliases") or () if "," not in a["name"]))
        groups.setdefault((os_name, release, variant, arch, aliases), []).append(img)

    products: dict[str, dict] = {}
    for key in sorted(groups):
        os_name, release, variant, arch, aliases = key
        members = sorted(groups[key], key=lambda i: (_version_key(i), i["fingerprint"]))
        pid = f"{os_name}:{release}:{variant}:{arch}"
        if pid in products:  # same os/release/variant/arch, other aliases: a product of its own
            pid = f"{pid}:{members[-1]['fingerprint'][:12]}"
        newest = members[-1]
        props = newest.get("properties") or {}
        product: dict = {
            "aliases": ",".join(aliases), "arch": arch, "os": os_name, "release": release,
            "release_title": (props.get("release_title") or props.get("version") or release),
            "variant": variant, "versions": {},
        }
        if props.get("version"):
            product["version"] = props["version"]
        requirements = {k.removeprefix("requirements."): v for k, v in props.items()
                        if k.startswith("requirements.") and v}
        if requirements:
            product["lxd_requirements"] = requirements
        expires = _parse_time(newest.get("expires_at", ""))
        if expires > 0:
            product["support_eol"] = time.strftime("%Y-%m-%d", time.gmtime(expires))
        product["supported"] = True
        for img in members:
            fp = img["fingerprint"]
            version = _version_key(img)
            if version in product["versions"]:
                version = f"{version}-{fp[:12]}"
            entry: dict = {"items": _items(fp, files[fp])}
            label = (img.get("properties") or {}).get("label")
            if label:
                entry["label"] = label
            product["versions"][version] = entry
        products[pid] = product

    catalogue = {"content_id": CONTENT_ID, "datatype": "image-downloads", "format": "products:1.0",
                 "updated": updated, "products": products}
    index = {"format": "index:1.0", "updated": updated,
             "index": {CONTENT_ID: {"datatype": "image-downloads", "path": PRODUCTS_PATH, "format": "products:1.0",
                                    "updated": updated, "products": sorted(products)}}}
    return index, catalogue


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class StreamsTree:
    """The rendered tree of one daemon's public images, kept until an image or alias changes."""

    def __init__(self, images, events=None):
        self.images = images
        self._docs: dict[str, bytes] | None = None
        self._generation = 0
        self._lock = asyncio.Lock()
        # sha256 of the parts of split images, by fingerprint (the files never change).
        self._parts: dict[str, ImageFiles] = {}
        if events is not None:
            events.tap(["lifecycle"], self._on_event)

    def _on_event(self, kind: str, metadata: dict) -> None:
        action = metadata.get("action", "")
        if action.startswith("image-") and action not in _QUIET_ACTIONS:
            self.invalidate()

    def invalidate(self) -> None:
        self._generation += 1
        self._docs = None

    async def document(self, path: str) -> bytes:
        """The JSON of INDEX_PATH or PRODUCTS_PATH."""
        docs = self._docs
        if docs is None:
            async with self._lock:
                docs = self._docs
                if docs is None:
                    generation = self._generation
                    docs = await self._build()
                    if generation == self._generation:  # nothing changed while it was built
                        self._docs = docs
        try:
            return docs[path]
        except KeyError:
            raise NotFound("Not found") from None

    async def _build(self) -> dict[str, bytes]:
        images = await self.images.list(project=DEFAULT, public_only=True)  # public serving: default only
        files: dict[str, ImageFiles] = {}
        for img in images:
            try:
                files[img["fingerprint"]] = await self.image_files(img["fingerprint"])
            except NotFound:  # deleted meanwhile
                continue
        index, catalogue = render(images, files)
        self._parts = {fp: f for fp, f in self._parts.items() if fp in files}
        dump = json.dumps
        return {INDEX_PATH: dump(index, indent=1).encode(), PRODUCTS_PATH: dump(catalogue, indent=1).encode()}

    async def image_files(self, fingerprint: str) -> ImageFiles:
        """The files of an image with their sizes and sha256 (split parts hashed once)."""
        cached = self._parts.get(fingerprint)
        if cached is not None:
            return cached
        fp, _, entries = await self.images.files(fingerprint, project=DEFAULT)

        def facts() -> ImageFiles:
            try:
                if len(entries) == 1:
                    name, path = entries[0]
                    return ImageFiles(ItemFile(name, path.stat().st_size, fp))
                (meta_name, meta_path), (root_name, root_path) = entries
                ftype = "squashfs" if root_name.endswith(".squashfs") else "root.tar.xz"
                return ImageFiles(ItemFile(meta_name, meta_path.stat().st_size, _sha256_file(meta_path)),
                                  ItemFile(root_name, root_path.stat().st_size, _sha256_file(root_path)), ftype)
            except FileNotFoundError:
                raise NotFound("Image not found") from None

        result = await asyncio.to_thread(facts)
        self._parts[fp] = result
        return result

    async def file(self, fingerprint: str, name: str) -> Path:
        """The path of one file the tree lists (public images only; anything else is not found)."""
        if len(fingerprint) != 64:
            raise NotFound("Not found")
        fp, public, entries = await self.images.files(fingerprint, project=DEFAULT)
        if not public or fp != fingerprint:
            raise NotFound("Not found")
        for entry_name, path in entries:
            if entry_name == name:
                return path
        raise NotFound("Not found")

    async def write(self, dest: Path) -> list[str]:
        """Write the tree (documents and image files) under dest, for any static web server.
        Returns the paths written, relative to dest."""
        index = await self.document(INDEX_PATH)
        catalogue = await self.document(PRODUCTS_PATH)
        products = json.loads(catalogue)["products"]
        wanted: list[tuple[str, str]] = []
        for product in products.values():
            for version in product["versions"].values():
                for item in version["items"].values():
                    fp, name = item["path"].removeprefix(FILES_PREFIX + "/").split("/", 1)
                    wanted.append((fp, name))
        sources = [(fp, name, await self.file(fp, name)) for fp, name in wanted]
        return await asyncio.to_thread(_write_tree, Path(dest), index, catalogue, sources)


def _write_tree(dest: Path, index: bytes, catalogue: bytes, sources: list[tuple[str, str, Path]]) -> list[str]:
    """Copy the files (never hard links: the store's files must not change under the daemon if
    someone edits the copy), then the catalogue, then the index, each by rename, so a reader never
    sees a path that is not there yet; then drop the image directories no longer listed."""
    import os
    import re
    import shutil

    written = []
    listed: set[str] = set()
    for fp, name, src in sources:
        listed.add(fp)
        rel = f"{FILES_PREFIX}/{fp}/{name}"
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            tmp = target.with_name(target.name + ".tmp")
            shutil.copyfile(src, tmp)
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        written.append(rel)
    for rel, data in ((PRODUCTS_PATH, catalogue), (INDEX_PATH, index)):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_bytes(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
        written.append(rel)
    files_dir = dest / FILES_PREFIX
    if files_dir.is_dir():
        for entry in os.scandir(files_dir):
            if entry.is_dir(follow_symlinks=False) and re.fullmatch(r"[0-9a-f]{64}", entry.name) \
                    and entry.name not in listed:
                shutil.rmtree(entry.path, ignore_errors=True)
    return written


__all__ = ["StreamsTree", "ImageFiles", "ItemFile", "render", "stream_arch", "INDEX_PATH", "PRODUCTS_PATH"]
