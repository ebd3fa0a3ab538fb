"""Simplestreams catalogues as LXD reads them: `streams/v1/index.json`, the product catalogues it
names, and what they hold for this host.

Pure functions on parsed JSON (no I/O): `catalogue()` turns an index and its product documents into
the images of the host's architecture, each with the files to download and their sha256, and the
alias table LXD builds from them. `SimpleStreamsRemote` (remote/client.py) fetches the documents.

Facts followed (LXD 5.0 shared/simplestreams): an image is a version's `lxd.tar.xz` item with one
root item (`squashfs` or `root.tar.xz`; VM disk items are skipped here) or a `lxd_combined.tar.gz`
item alone. Its fingerprint is the combined sha256 the metadata item carries for that root type
(`combined_squashfs_sha256`, `combined_rootxz_sha256` or else `combined_sha256`), or the unified
file's own sha256. Versions are named by date (at least 8 characters, `YYYYMMDD` first); delta
items (`*.vcdiff`) are ignored. A product's `aliases` (comma separated) give, per alias, the short
name (host architecture only) and `alias/<product arch>`; the newest serial claims a name first.
"""

from __future__ import annotations

import calendar
import platform
import re
import time
from dataclasses import dataclass, field

from lxd_daemon.errors import BadRequest, NotFound

# Simplestreams / Debian / kernel architecture names -> LXD's.
ARCHITECTURES = {
    "x86_64": "x86_64", "amd64": "x86_64", "x64": "x86_64",
    "i386": "i686", "i686": "i686",
    "aarch64": "aarch64", "arm64": "aarch64",
    "armv7l": "armv7l", "armhf": "armv7l", "armel": "armv6l", "armv6l": "armv6l",
    "ppc64le": "ppc64le", "ppc64el": "ppc64le", "ppc64": "ppc64",
    "s390x": "s390x", "riscv64": "riscv64", "loongarch64": "loongarch64",
}
ROOT_TYPES = ("squashfs", "root.tar.xz")  # preferred first
HEX64 = re.compile(r"^[0-9a-f]{64}$")


def host_architecture() -> str:
    m = platform.machine()
    return ARCHITECTURES.get(m, m)


@dataclass(frozen=True)
class RemoteFile:
    kind: str  # "meta" (the metadata tarball or the unified image) or "root"
    path: str  # relative to the server's base URL
    sha256: str
    size: int
    ftype: str


@dataclass
class RemoteImage:
    fingerprint: str
    architecture: str  # LXD's name
    files: list[RemoteFile]
    properties: dict[str, str]
    filename: str
    created_at: float
    expires_at: float
    size: int
    aliases: list[str] = field(default_factory=list)
    type: str = "container"

    @property
    def split(self) -> bool:
        return len(self.files) > 1


@dataclass
class Catalogue:
    images: list[RemoteImage]
    aliases: dict[str, str]  # alias name -> fingerprint

    def resolve(self, name: str) -> RemoteImage:
        """An image by alias, full fingerprint or unique fingerprint prefix."""
        fp = self.aliases.get(name)
        if fp is not None:
            return next(i for i in self.images if i.fingerprint == fp)
        prefix = name.lower()
        matches = [i for i in self.images if i.fingerprint.startswith(prefix)] if prefix else []
        if not matches:
            raise NotFound(f"Image {name!r} not found on the image server")
        exact = [i for i in matches if i.fingerprint == prefix]
        if exact:
            return exact[0]
        if len(matches) > 1:
            raise BadRequest(f"More than one image matches {name!r} on the image server")
        return matches[0]


def product_paths(index: dict) -> list[str]:
    """The catalogue paths of an index's image-downloads entries (entries without products skipped)."""
    if not isinstance(index, dict) or not isinstance(index.get("index"), dict):
        raise BadRequest("Invalid simplestreams index: no 'index' object")
    paths = []
    for entry in index["index"].values():
        if not isinstance(entry, dict) or entry.get("datatype") != "image-downloads":
            continue
        if not entry.get("products") or not isinstance(entry.get("path"), str):
            continue
        paths.append(entry["path"])
    return paths


def _date(serial: str) -> float | None:
    if len(serial) < 8:
        return None
    try:
        return float(calendar.timegm(time.strptime(serial[:8], "%Y%m%d")))
    except ValueError:
        return None


def _eol(value: str) -> float:
    try:
        return float(calendar.timegm(time.strptime(value, "%Y-%m-%d")))
    except (TypeError, ValueError):
        return 0.0


def _file(kind: str, item: dict) -> RemoteFile | None:
    path, sha, size = item.get("path"), str(item.get("sha256") or "").lower(), item.get("size")
    if not isinstance(path, str) or not path or not HEX64.match(sha):
        return None  # every file is verified: one without a sha256 cannot be used
    return RemoteFile(kind, path, sha, int(size) if isinstance(size, int) and size >= 0 else -1,
                      str(item.get("ftype") or ""))


def _images_of(products: dict, arch: str) -> list[RemoteImage]:
    out: list[RemoteImage] = []
    catalogue_products = products.get("products")
    for product in catalogue_products.values() if isinstance(catalogue_products, dict) else ():
        if not isinstance(product, dict) or not isinstance(product.get("versions"), dict):
            continue
        parch = str(product.get("arch") or "")
        if ARCHITECTURES.get(parch) != arch:
            continue  # only the host's architecture
        for serial, version in (product.get("versions") or {}).items():
            created = _date(str(serial))
            if created is None or not isinstance(version, dict) or not isinstance(version.get("items"), dict):
                continue
            items = [i for i in version["items"].values() if isinstance(i, dict)]
            for item in items:
                ftype = item.get("ftype")
                if ftype == "lxd_combined.tar.gz":
                    f = _file("meta", item)
                    if f is not None:
                        out.append(_image(product, serial, version, created, f.sha256, [f], "tar.gz"))
                elif ftype == "lxd.tar.xz":
                    meta = _file("meta", item)
                    if meta is None:
                        continue
                    for root in items:
                        rtype = root.get("ftype")
                        if rtype not in ROOT_TYPES:
                            continue
                        if rtype == "squashfs":
                            fp = item.get("combined_squashfs_sha256")
                        else:
                            fp = item.get("combined_rootxz_sha256") or item.get("combined_sha256")
                        rf = _file("root", root)
                        fp = str(fp or "").lower()
                        if rf is None or not HEX64.match(fp):
                            continue
                        out.append(_image(product, serial, version, created, fp, [meta, rf], rtype))
    return out


def _image(product: dict, serial: str, version: dict, created: float, fp: str, files: list[RemoteFile],
           rtype: str) -> RemoteImage:
    label = str(version.get("label") or "")
    desc = f"{product.get('os', '')} {product.get('release_title', '')} {product.get('arch', '')}"
    if label:
        desc += f" ({label})"
    desc += f" ({serial})"
    props = {"os": product.get("os"), "release": product.get("release"), "version": product.get("version"),
             "architecture": product.get("arch"), "label": label, "serial": serial, "description": desc,
             "variant": product.get("variant"), "type": rtype}
    reqs = product.get("lxd_requirements")
    for k, v in (reqs.items() if isinstance(reqs, dict) else ()):
        props[f"requirements.{k}"] = v
    props = {k: str(v) for k, v in props.items() if v not in (None, "")}
    aliases = [a.strip() for a in str(product.get("aliases") or "").split(",") if a.strip()]
    aliases = [a for a in aliases if _valid_alias(a)]
    size = sum(max(f.size, 0) for f in files)
    return RemoteImage(fingerprint=fp, architecture=ARCHITECTURES.get(str(product.get("arch")), ""),
                       files=files, properties=props, filename=files[0].path.rsplit("/", 1)[-1],
                       created_at=created, expires_at=_eol(product.get("support_eol", "")), size=size,
                       aliases=aliases)


def _valid_alias(name: str) -> bool:
    from lxd_daemon import names

    try:
        names.alias(name)
    except names.InvalidName:
        return False
    return True


def _order(img: RemoteImage) -> tuple:
    """LXD's preference: grouped by os, release, variant; newest serial first; squashfs before xz."""
    p = img.properties
    serial = p.get("serial", "")
    rank = ROOT_TYPES.index(p["type"]) if p.get("type") in ROOT_TYPES else len(ROOT_TYPES)
    return (p.get("os", ""), p.get("release", ""), p.get("variant", ""),
            tuple(-ord(c) for c in serial), rank)


def catalogue(index: dict, products: dict[str, dict], arch: str | None = None) -> Catalogue:
    """The images of the host's architecture (`arch`) in an index's catalogues and their aliases.

    `products` maps each path of `product_paths(index)` to its parsed document."""
    arch = arch or host_architecture()
    images: list[RemoteImage] = []
    seen: set[str] = set()
    for path in product_paths(index):
        doc = products.get(path)
        if not isinstance(doc, dict):
            raise BadRequest(f"Invalid simplestreams catalogue {path!r}")
        for img in _images_of(doc, arch):
            if img.fingerprint not in seen:
                seen.add(img.fingerprint)
                images.append(img)
    images.sort(key=_order)
    aliases: dict[str, str] = {}
    for img in images:
        names = []
        for a in img.aliases:
            for name in (a, f"{a}/{img.properties.get('architecture', '')}"):
                if name not in aliases:
                    aliases[name] = img.fingerprint
                    names.append(name)
        img.aliases = names
    return Catalogue(images, aliases)


__all__ = ["Catalogue", "RemoteFile", "RemoteImage", "catalogue", "host_architecture", "product_paths"]
