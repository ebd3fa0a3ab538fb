"""Simplestreams catalogues (images/remote/simplestreams.py) from fixture JSON, and the download
checks of the simplestreams client against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import http.server
import json
import threading
from pathlib import Path

import pytest

from lxd_daemon.errors import BadRequest, NotFound
from lxd_daemon.images.remote.client import SimpleStreamsRemote, TamperedImage
from lxd_daemon.images.remote.simplestreams import catalogue, product_paths


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


META_NEW, SQ_NEW, XZ_NEW = b"meta-new" * 10, b"squash-new" * 10, b"rootxz-new" * 10
META_OLD, SQ_OLD = b"meta-old" * 10, b"squash-old" * 10
COMBINED = b"combined" * 10
FP_NEW_SQ = sha(META_NEW + SQ_NEW)
FP_NEW_XZ = sha(META_NEW + XZ_NEW)
FP_OLD_SQ = sha(META_OLD + SQ_OLD)
FP_COMBINED = sha(COMBINED)


def item(ftype: str, path: str, data: bytes, **extra) -> dict:
    return {"ftype": ftype, "path": path, "sha256": sha(data), "size": len(data), **extra}


INDEX = {
    "format": "index:1.0",
    "index": {
        "images": {"datatype": "image-downloads", "path": "streams/v1/images.json", "format": "products:1.0",
                   "products": ["busybox:1.36:amd64:default", "busybox:1.36:arm64:default", "tiny:1:amd64:default"]},
        "other": {"datatype": "image-ids", "path": "streams/v1/ids.json", "products": ["x"]},
        "empty": {"datatype": "image-downloads", "path": "streams/v1/empty.json", "products": []},
    },
}

PRODUCTS = {
    "format": "products:1.0", "datatype": "image-downloads", "content_id": "images",
    "products": {
        "busybox:1.36:amd64:default": {
            "aliases": "busybox,busybox/1.36", "arch": "amd64", "os": "BusyBox", "release": "1.36",
            "release_title": "1.36", "variant": "default", "support_eol": "2030-01-02",
            "versions": {
                "20261204_0700": {"items": {
                    "lxd.tar.xz": item("lxd.tar.xz", "images/old/lxd.tar.xz", META_OLD,
                                       combined_squashfs_sha256=FP_OLD_SQ),
                    "root.squashfs": item("squashfs", "images/old/root.squashfs", SQ_OLD),
                }},
                "20261205_0700": {"items": {
                    "lxd.tar.xz": item("lxd.tar.xz", "images/new/lxd.tar.xz", META_NEW,
                                       combined_squashfs_sha256=FP_NEW_SQ, combined_rootxz_sha256=FP_NEW_XZ),
                    "root.squashfs": item("squashfs", "images/new/root.squashfs", SQ_NEW),
                    "root.tar.xz": item("root.tar.xz", "images/new/root.tar.xz", XZ_NEW),
                    "delta": item("squashfs.vcdiff", "images/new/delta.vcdiff", b"delta",
                                  delta_base="20261204_0700"),
                }},
                "bad": {"items": {}},  # not a date: skipped, as LXD does
            },
        },
        "busybox:1.36:arm64:default": {
            "aliases": "busybox", "arch": "arm64", "os": "BusyBox", "release": "1.36",
            "versions": {"20261205_0700": {"items": {
                "lxd.tar.xz": item("lxd.tar.xz", "images/arm/lxd.tar.xz", b"arm",
                                   combined_squashfs_sha256=sha(b"armroot")),
                "root.squashfs": item("squashfs", "images/arm/root.squashfs", b"root"),
            }}},
        },
        "tiny:1:amd64:default": {
            "aliases": "tiny", "arch": "x86_64", "os": "Tiny", "release": "1",
            "versions": {"20260101": {"items": {
                "combined": item("lxd_combined.tar.gz", "images/tiny/lxd.tar.gz", COMBINED),
            }}},
        },
    },
}


def cat():
    return catalogue(INDEX, {"streams/v1/images.json": PRODUCTS}, arch="x86_64")


def test_index_paths_only_image_downloads_with_products():
    assert product_paths(INDEX) == ["streams/v1/images.json"]
    with pytest.raises(BadRequest):
        product_paths({"format": "index:1.0"})


def test_catalogue_host_architecture_only_and_fingerprints():
    c = cat()
    fps = {i.fingerprint for i in c.images}
    assert fps == {FP_NEW_SQ, FP_NEW_XZ, FP_OLD_SQ, FP_COMBINED}  # the arm64 product is left out
    assert all(i.architecture == "x86_64" for i in c.images)
    new = next(i for i in c.images if i.fingerprint == FP_NEW_SQ)
    assert [f.kind for f in new.files] == ["meta", "root"]
    assert new.files[1].path == "images/new/root.squashfs"  # the delta file is ignored
    assert new.properties["serial"] == "20261205_0700" and new.properties["type"] == "squashfs"
    assert new.properties["os"] == "BusyBox" and new.properties["architecture"] == "amd64"
    assert new.expires_at > 0 and new.created_at > 0
    tiny = next(i for i in c.images if i.fingerprint == FP_COMBINED)
    assert len(tiny.files) == 1 and tiny.properties["type"] == "tar.gz"


def test_aliases_newest_serial_squashfs_first_with_arch_forms():
    c = cat()
    assert c.aliases["busybox"] == FP_NEW_SQ
    assert c.aliases["busybox/amd64"] == FP_NEW_SQ
    assert c.aliases["busybox/1.36"] == FP_NEW_SQ
    assert c.aliases["busybox/1.36/amd64"] == FP_NEW_SQ
    assert c.aliases["tiny/x86_64"] == FP_COMBINED
    assert c.resolve("busybox").fingerprint == FP_NEW_SQ
    assert "busybox" in c.resolve("busybox").aliases


def test_resolve_by_fingerprint_and_prefix():
    c = cat()
    assert c.resolve(FP_OLD_SQ).fingerprint == FP_OLD_SQ
    assert c.resolve(FP_COMBINED[:12]).fingerprint == FP_COMBINED
    with pytest.raises(NotFound):
        c.resolve("nosuchalias")
    # A one-character prefix shared by several images is ambiguous.
    first = [i.fingerprint[0] for i in c.images]
    shared = next((ch for ch in first if first.count(ch) > 1), None)
    if shared is not None:
        with pytest.raises(BadRequest):
            c.resolve(shared)


def test_items_without_sha256_are_unusable():
    products = json.loads(json.dumps(PRODUCTS))
    del products["products"]["tiny:1:amd64:default"]["versions"]["20260101"]["items"]["combined"]["sha256"]
    c = catalogue(INDEX, {"streams/v1/images.json": products}, arch="x86_64")
    assert FP_COMBINED not in {i.fingerprint for i in c.images}


@pytest.fixture
def tree(tmp_path: Path):
    """The fixture catalogue and its files served over HTTP on 127.0.0.1 (a thread of the test)."""
    root = tmp_path / "www"
    files = {"images/new/lxd.tar.xz": META_NEW, "images/new/root.squashfs": SQ_NEW,
             "images/new/root.tar.xz": XZ_NEW, "images/old/lxd.tar.xz": META_OLD,
             "images/old/root.squashfs": SQ_OLD, "images/tiny/lxd.tar.gz": COMBINED}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "streams/v1").mkdir(parents=True)
    (root / "streams/v1/index.json").write_text(json.dumps(INDEX))
    (root / "streams/v1/images.json").write_text(json.dumps(PRODUCTS))
    handler = functools.partial(_Quiet, directory=str(root))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield root, f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def _download(url: str, name: str, workdir: Path):
    async def go():
        remote = SimpleStreamsRemote(url)
        info = await remote.resolve(name)
        seen: list[str] = []
        fetched = await remote.download(info, workdir, seen.append)
        return info, fetched, seen

    return asyncio.run(go())


def test_download_split_verifies_and_reports_progress(tree, tmp_path, monkeypatch):
    monkeypatch.setattr("lxd_daemon.images.remote.simplestreams.host_architecture", lambda: "x86_64")
    _, url = tree
    work = tmp_path / "work"
    work.mkdir()
    info, fetched, seen = _download(url, "busybox", work)
    assert fetched.fingerprint == FP_NEW_SQ == info.fingerprint
    assert fetched.meta.read_bytes() == META_NEW and fetched.rootfs.read_bytes() == SQ_NEW
    assert fetched.size == len(META_NEW) + len(SQ_NEW)
    assert any(s.startswith("metadata: ") for s in seen) and any(s.startswith("rootfs: 100%") for s in seen)


def test_download_refuses_a_tampered_file(tree, tmp_path, monkeypatch):
    monkeypatch.setattr("lxd_daemon.images.remote.simplestreams.host_architecture", lambda: "x86_64")
    root, url = tree
    (root / "images/new/root.squashfs").write_bytes(b"X" + SQ_NEW[1:])  # same size, other content
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(TamperedImage, match="sha256 mismatch"):
        _download(url, "busybox", work)


def test_malformed_catalogue_entries_are_skipped():
    products = {"products": {
        "a": {"arch": "amd64", "versions": ["not", "a", "dict"]},
        "b": {"arch": "amd64", "versions": {"20260101": {"items": ["x"]}}},
        "c": "nonsense",
        "d": {"arch": "amd64", "aliases": 7, "lxd_requirements": "x",
              "versions": {"20260101": {"items": {"i": item("lxd_combined.tar.gz", "d.tar.gz", COMBINED)}}}},
    }}
    c = catalogue(INDEX, {"streams/v1/images.json": products}, arch="x86_64")
    assert [i.fingerprint for i in c.images] == [FP_COMBINED]
    assert catalogue(INDEX, {"streams/v1/images.json": {"products": []}}, arch="x86_64").images == []


def test_download_unified_item(tree, tmp_path, monkeypatch):
    monkeypatch.setattr("lxd_daemon.images.remote.simplestreams.host_architecture", lambda: "x86_64")
    _, url = tree
    work = tmp_path / "work"
    work.mkdir()
    info, fetched, seen = _download(url, "tiny", work)
    assert fetched.fingerprint == FP_COMBINED and fetched.rootfs is None
    assert fetched.meta.read_bytes() == COMBINED and seen


def test_download_refuses_more_bytes_than_announced(tree, tmp_path, monkeypatch):
    monkeypatch.setattr("lxd_daemon.images.remote.simplestreams.host_architecture", lambda: "x86_64")
    root, url = tree
    (root / "images/tiny/lxd.tar.gz").write_bytes(COMBINED + b"more")
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(BadRequest, match="more than"):
        _download(url, "tiny", work)
