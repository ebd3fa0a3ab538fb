"""The streaming safety scan: the same answers whatever the pieces, bounded memory, and the
scan that runs while an upload arrives (images/pipeline.py)."""

from __future__ import annotations

import asyncio
import gzip
import io
import subprocess
import tarfile

import pytest

from lxd_daemon.errors import BadRequest
from lxd_daemon.images import pipeline, tarscan
from tests.unit.test_images_formats import META, add, make_image


def feed_in_pieces(data: bytes, compression: str, size: int, kind: str = "unified") -> tarscan.ScanResult:
    scan = tarscan.StreamScan(compression, kind)
    for i in range(0, len(data), size):
        scan.feed(data[i:i + size])
    return scan.finish()


@pytest.mark.parametrize("comp,name", [("gz", "gzip"), ("xz", "xz"), ("bz2", "bzip2"), ("none", "none")])
def test_any_piece_size_gives_the_same_answer(tmp_path, comp, name):
    p = make_image(tmp_path / "image", compression=comp, extra=[
        {"name": "rootfs/big", "data": bytes(range(256)) * 3000},
        {"name": "rootfs/" + "long-name-" * 20, "data": b"x"},  # a pax path record
        {"name": "rootfs/bin/ln", "type": tarfile.SYMTYPE, "linkname": "../" + "t" * 120},
    ])
    data = p.read_bytes()
    whole = tarscan.scan_tarball(p, name, "unified")
    assert whole.metadata["properties"]["os"] == "busybox"
    assert whole.templates == {"hostname.tpl"}
    for size in (1, 7, 511, 512, 513, 4096, 65536, len(data)):
        got = feed_in_pieces(data, name, size)
        assert (got.members, got.bytes, got.metadata, got.templates) == \
            (whole.members, whole.bytes, whole.metadata, whole.templates), size


def test_concatenated_gzip_members_and_zero_padding_are_read(tmp_path):
    raw = make_image(tmp_path / "image.tar", compression="none").read_bytes()
    cut = 3 * 512
    data = gzip.compress(raw[:cut]) + gzip.compress(raw[cut:]) + bytes(1024)
    p = tmp_path / "multi.tar.gz"
    p.write_bytes(data)
    assert tarscan.scan_tarball(p, "gzip", "unified").members >= 8
    assert feed_in_pieces(data, "gzip", 100).members >= 8


@pytest.mark.parametrize("where", ["header", "data"])
def test_cut_archives_are_refused(tmp_path, where):
    p = make_image(tmp_path / "image.tar", compression="none",
                   extra=[{"name": "rootfs/big", "data": b"z" * 100_000}])
    raw = p.read_bytes()
    end = raw.index(b"z" * 512)
    cut = raw[:end - 512 + 100] if where == "header" else raw[:end + 50_000]
    with pytest.raises(BadRequest, match="truncated or corrupt"):
        feed_in_pieces(cut, "none", 4096)
    with pytest.raises(BadRequest, match="truncated or corrupt"):
        feed_in_pieces(gzip.compress(raw)[:-9], "gzip", 4096)


def test_a_damaged_header_is_refused(tmp_path):
    raw = bytearray(make_image(tmp_path / "image.tar", compression="none").read_bytes())
    raw[raw.index(b"rootfs/bin/hello") + 3] ^= 0x41  # inside a header's name field
    with pytest.raises(BadRequest, match="checksum"):
        feed_in_pieces(bytes(raw), "none", 512)


def test_a_symlink_that_replaces_a_directory_guards_what_follows(tmp_path):
    p = make_image(tmp_path / "image.tar.gz", extra=[
        {"name": "rootfs/etc/a", "data": b"fine"},  # rootfs/etc is now known to be a plain directory
        {"name": "rootfs/etc", "type": tarfile.SYMTYPE, "linkname": "/etc"},
        {"name": "rootfs/etc/passwd", "data": b"root::0:0::/:/bin/sh\n"},
    ])
    with pytest.raises(BadRequest, match="lies under a symlink"):
        tarscan.scan_tarball(p, "gzip", "unified")


def test_sparse_members_are_scanned_by_tarfile(tmp_path):
    src = tmp_path / "src"
    (src / "rootfs").mkdir(parents=True)
    (src / "metadata.yaml").write_bytes(META)
    with open(src / "rootfs" / "sparse", "wb") as f:
        f.truncate(8 << 20)
        f.write(b"data at the start")
    out = tmp_path / "sparse.tar.gz"
    subprocess.run(["tar", "--sparse", "--format=gnu", "-czf", str(out), "-C", str(src), "metadata.yaml", "rootfs"],
                   check=True)
    with pytest.raises(tarscan.Unsupported):
        feed_in_pieces(out.read_bytes(), "gzip", 65536)
    result = tarscan.scan_tarball(out, "gzip", "unified")
    assert result.members == 3 and result.metadata is not None  # metadata.yaml, rootfs/, the sparse file


def test_decompression_is_bounded(tmp_path):
    bomb = gzip.compress(bytes(64 << 20), compresslevel=9)  # 64 MiB of zeros in ~64 KiB
    pieces = list(tarscan.Decompressor("gzip").feed(bomb))
    assert sum(len(p) for p in pieces) == 64 << 20
    assert max(len(p) for p in pieces) <= tarscan.STEP


def upload_scan(data: bytes, piece: int, kind: str = "unified"):
    async def run():
        scan = pipeline.UploadScan(kind)
        for i in range(0, len(data), piece):
            await scan.feed(data[i:i + piece])
        return await scan.finish()

    return asyncio.run(run())


def test_upload_scan_matches_the_file_scan(tmp_path):
    p = make_image(tmp_path / "image.tar.xz", compression="xz")
    result = upload_scan(p.read_bytes(), 1000)
    assert result is not None and result.metadata == tarscan.scan_tarball(p, "xz", "unified").metadata


def test_upload_scan_reports_unsafe_content(tmp_path):
    p = make_image(tmp_path / "image.tar.gz", extra=[{"name": "../evil", "data": b"x"}])
    with pytest.raises(BadRequest, match="outside the target"):
        upload_scan(p.read_bytes(), 333)


def test_upload_scan_leaves_what_it_cannot_stream_to_the_file_scan(tmp_path):
    assert upload_scan(b"hsqs" + bytes(4096), 1024) is None  # squashfs
    assert upload_scan(b"PK\x03\x04" + bytes(4096), 1024) is None  # not an image: the check says so
    with pytest.raises(BadRequest, match="truncated"):
        upload_scan(gzip.compress(b"tiny")[:10], 1024)  # under 512 bytes: scanned at the end


def test_upload_scan_waits_for_a_slow_scan_and_can_be_aborted(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "QUEUE_LIMIT", 4096)
    data = make_image(tmp_path / "image.tar", compression="none",
                      extra=[{"name": "rootfs/big", "data": b"q" * 300_000}]).read_bytes()

    async def run():
        scan = pipeline.UploadScan("unified")
        for i in range(0, len(data), 1024):
            await scan.feed(data[i:i + 1024])
            assert scan._thread._queued <= 4096 + 1024  # the receiver waited for the thread
        result = await scan.finish()
        aborted = pipeline.UploadScan("unified")
        await aborted.feed(data[:65536])
        aborted.abort()
        with pytest.raises(BadRequest):
            await aborted._thread.finish()
        return result

    assert asyncio.run(run()).members >= 9


def test_tarinfo_members_follow_the_same_rules():
    ti = tarfile.TarInfo("rootfs/sda")
    ti.type = tarfile.BLKTYPE
    checker = tarscan.Checker("unified")
    with pytest.raises(BadRequest, match="outside /dev"):
        checker.member(tarscan.Member.from_tarinfo(ti))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        add(tf, "rootfs/x", b"1")
    assert tarscan.Member.from_tarinfo(tarfile.open(fileobj=io.BytesIO(buf.getvalue())).next()).type == b"0"
