"""The simplestreams tree rendered from image documents (lxd_daemon/images/streams.py)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from pathlib import Path

import pytest

from lxd_daemon.errors import NotFound
from lxd_daemon.events import EventHub
from lxd_daemon.images.streams import (
    INDEX_PATH,
    PRODUCTS_PATH,
    ImageFiles,
    ItemFile,
    StreamsTree,
    render,
    stream_arch,
)

FP1 = "a" * 64
FP2 = "b" * 64
FP3 = "c" * 64


def image(fp: str, *, public: bool = True, arch: str = "x86_64", aliases=(), created="2026-12-01T10:20:00Z",
          **props) -> dict:
    return {"fingerprint": fp, "public": public, "architecture": arch, "type": "container",
            "aliases": [{"name": a, "description": ""} for a in aliases], "properties": props,
            "created_at": created, "uploaded_at": "2026-12-02T00:00:00Z", "expires_at": "1970-01-01T00:00:00Z"}


def unified(fp: str, size: int = 100) -> ImageFiles:
    return ImageFiles(ItemFile(fp + ".tar.gz", size, fp))


def split(fp: str, root: str = "squashfs") -> ImageFiles:
    ext = ".squashfs" if root == "squashfs" else ".tar.gz"
    return ImageFiles(ItemFile(f"meta-{fp}.tar.gz", 10, "1" * 64), ItemFile(fp + ext, 90, "2" * 64), root)


def lxd_view(catalogue: dict) -> dict[str, dict]:
    """What a simplestreams client in LXD's manner makes of a catalogue: fingerprint -> facts."""
    out = {}
    for product in catalogue["products"].values():
        for version, entry in product["versions"].items():
            time.strptime(version[:8], "%Y%m%d")  # the date the parser reads
            items = entry["items"].values()
            for item in items:
                if item["ftype"] == "lxd_combined.tar.gz":
                    out[item["sha256"]] = {"files": [item["path"]], "product": product, "version": version}
                if item["ftype"] != "lxd.tar.xz":
                    continue
                for root in items:
                    key = {"squashfs": "combined_squashfs_sha256", "root.tar.xz": "combined_rootxz_sha256"}.get(
                        root["ftype"])
                    if key and item.get(key):
                        out[item[key]] = {"files": [item["path"], root["path"]], "product": product,
                                          "version": version}
    return out


def test_unified_image_is_one_combined_item():
    index, catalogue = render([image(FP1, aliases=["busybox"], os="BusyBox", release="1.36")],
                              {FP1: unified(FP1, 1234)}, now=0)
    assert index["format"] == "index:1.0"
    entry = index["index"]["images"]
    assert entry["datatype"] == "image-downloads" and entry["path"] == PRODUCTS_PATH
    assert entry["products"] == ["BusyBox:1.36:default:amd64"]
    assert catalogue["format"] == "products:1.0" and catalogue["datatype"] == "image-downloads"
    product = catalogue["products"]["BusyBox:1.36:default:amd64"]
    assert product["arch"] == "amd64" and product["os"] == "BusyBox" and product["release"] == "1.36"
    assert product["aliases"] == "busybox"
    (version, entry), = product["versions"].items()
    assert version == "20261201_10:20"
    item = entry["items"]["lxd_combined.tar.gz"]
    assert item == {"ftype": "lxd_combined.tar.gz", "path": f"streams/images/{FP1}/{FP1}.tar.gz", "sha256": FP1,
                    "size": 1234}
    assert set(lxd_view(catalogue)) == {FP1}


@pytest.mark.parametrize("root,key", [("squashfs", "combined_squashfs_sha256"),
                                      ("root.tar.xz", "combined_rootxz_sha256")])
def test_split_image_carries_the_combined_fingerprint(root, key):
    _, catalogue = render([image(FP2, os="Debian", release="12")], {FP2: split(FP2, root)})
    (product,) = catalogue["products"].values()
    (entry,) = product["versions"].values()
    meta = entry["items"]["lxd.tar.xz"]
    assert meta[key] == FP2 and meta["sha256"] == "1" * 64 and meta["size"] == 10
    roots = [i for i in entry["items"].values() if i["ftype"] == root]
    assert len(roots) == 1 and roots[0]["sha256"] == "2" * 64
    assert roots[0]["path"].startswith(f"streams/images/{FP2}/")
    assert lxd_view(catalogue)[FP2]["files"] == [meta["path"], roots[0]["path"]]
    if root == "root.tar.xz":
        assert meta["combined_sha256"] == FP2


def test_private_unknown_arch_and_unhashed_images_are_left_out():
    images = [image(FP1, public=False), image(FP2, arch="pdp11"), image(FP3)]
    index, catalogue = render(images, {FP1: unified(FP1), FP2: unified(FP2)})
    assert catalogue["products"] == {} and index["index"]["images"]["products"] == []


def test_images_group_by_release_and_aliases():
    images = [
        image(FP1, aliases=["deb"], os="Debian", release="12", created="2026-11-01T00:00:00Z"),
        image(FP2, os="Debian", release="12", created="2026-11-02T00:00:00Z"),
        image(FP3, os="Debian", release="12", created="2026-11-02T00:00:00Z"),
    ]
    _, catalogue = render(images, {fp: unified(fp) for fp in (FP1, FP2, FP3)})
    products = catalogue["products"]
    assert len(products) == 2
    with_alias = [p for p in products.values() if p["aliases"] == "deb"]
    assert len(with_alias) == 1 and len(with_alias[0]["versions"]) == 1
    (plain,) = [p for p in products.values() if p["aliases"] == ""]
    assert len(plain["versions"]) == 2  # the same minute: the second key gets a suffix
    assert all(v.startswith("20261102_00:00") for v in plain["versions"])
    assert set(lxd_view(catalogue)) == {FP1, FP2, FP3}


def test_image_without_properties_still_listed():
    _, catalogue = render([image(FP1, arch="aarch64")], {FP1: unified(FP1)})
    (pid,) = catalogue["products"]
    assert pid == f"unknown:{FP1[:12]}:default:arm64"


def test_requirements_and_expiry():
    img = image(FP1, os="X", release="1", **{"requirements.secureboot": "false"})
    img["expires_at"] = "2030-06-01T00:00:00Z"
    _, catalogue = render([img], {FP1: unified(FP1)})
    (product,) = catalogue["products"].values()
    assert product["lxd_requirements"] == {"secureboot": "false"}
    assert product["support_eol"] == "2030-06-01"


def test_stream_arch():
    assert stream_arch("x86_64") == "amd64"
    assert stream_arch("amd64") == "amd64"
    assert stream_arch("armv7l") == "armhf"
    assert stream_arch("") == "" and stream_arch("vax") == ""


class FakeImages:
    """The two ImageService calls the tree uses, over real files."""

    def __init__(self, root: Path):
        self.root = root
        self.docs: dict[str, dict] = {}
        self.paths: dict[str, list[tuple[str, Path]]] = {}
        self.lists = 0

    def add_unified(self, data: bytes, public=True, aliases=()) -> str:
        fp = hashlib.sha256(data).hexdigest()
        p = self.root / fp
        p.write_bytes(data)
        self.docs[fp] = image(fp, public=public, aliases=aliases, os="T", release=fp[:4])
        self.paths[fp] = [(fp + ".tar.gz", p)]
        return fp

    def add_split(self, meta: bytes, root: bytes) -> str:
        fp = hashlib.sha256(meta + root).hexdigest()
        (self.root / fp).write_bytes(meta)
        (self.root / (fp + ".rootfs")).write_bytes(root)
        self.docs[fp] = image(fp, os="S", release="1")
        self.paths[fp] = [(f"meta-{fp}.tar.gz", self.root / fp), (fp + ".squashfs", self.root / (fp + ".rootfs"))]
        return fp

    async def list(self, *, project, public_only=False):
        assert project == "default"
        self.lists += 1
        return [d for d in self.docs.values() if d["public"] or not public_only]

    async def files(self, fp, *, project):
        assert project == "default"
        if fp not in self.docs:
            raise NotFound("Image not found")
        return fp, self.docs[fp]["public"], self.paths[fp]


def test_tree_caches_until_an_image_event(tmp_path):
    async def main():
        hub = EventHub()
        fake = FakeImages(tmp_path)
        tree = StreamsTree(fake, hub)
        fp1 = fake.add_unified(b"one", aliases=["one"])
        first = json.loads(await tree.document(PRODUCTS_PATH))
        await tree.document(INDEX_PATH)
        assert fake.lists == 1 and set(lxd_view(first)) == {fp1}
        fp2 = fake.add_split(b"meta", b"rootfs")
        hub.lifecycle("image-retrieved", f"/1.0/images/{fp1}")  # changes nothing
        assert json.loads(await tree.document(PRODUCTS_PATH)) == first and fake.lists == 1
        hub.lifecycle("image-created", f"/1.0/images/{fp2}")
        second = json.loads(await tree.document(PRODUCTS_PATH))
        assert fake.lists == 2 and set(lxd_view(second)) == {fp1, fp2}
        (entry,) = [e for p in second["products"].values() for e in p["versions"].values()
                    if "lxd.tar.xz" in e["items"]]
        assert entry["items"]["lxd.tar.xz"]["sha256"] == hashlib.sha256(b"meta").hexdigest()
        assert entry["items"]["root.squashfs"]["sha256"] == hashlib.sha256(b"rootfs").hexdigest()
        # The static copy, while both are listed.
        out = tmp_path / "www"
        await tree.write(out)
        assert (out / "streams" / "images" / fp1 / f"{fp1}.tar.gz").read_bytes() == b"one"
        # Files: only what the tree lists, only of public images.
        assert await tree.file(fp1, f"{fp1}.tar.gz") == tmp_path / fp1
        with pytest.raises(NotFound):
            await tree.file(fp1, "other")
        fake.docs[fp1]["public"] = False
        hub.lifecycle("image-updated", f"/1.0/images/{fp1}")
        with pytest.raises(NotFound):
            await tree.file(fp1, f"{fp1}.tar.gz")
        assert set(lxd_view(json.loads(await tree.document(PRODUCTS_PATH)))) == {fp2}
        with pytest.raises(NotFound):
            await tree.document("streams/v1/other.json")
        # Written again: what is no longer listed goes.
        written = await tree.write(out)
        assert written[-1] == INDEX_PATH
        assert not (out / "streams" / "images" / fp1).exists()
        assert json.loads((out / INDEX_PATH).read_text())["index"]["images"]["products"]
        for item in entry["items"].values():
            assert hashlib.sha256((out / item["path"]).read_bytes()).hexdigest() == item["sha256"]

    asyncio.run(main())
