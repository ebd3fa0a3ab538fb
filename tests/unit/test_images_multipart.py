"""The streaming multipart parser used for split image uploads."""

from __future__ import annotations

import pytest

from lxd_daemon.errors import BadRequest
from lxd_daemon.images.multipart import MultipartParser, boundary_of

BOUNDARY = "0123456789abcdef"


def body(parts: list[tuple[str, str, bytes]], boundary: str = BOUNDARY) -> bytes:
    out = b""
    for name, filename, data in parts:
        out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\n"
                f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def parse(raw: bytes, step: int) -> list[tuple[str, str, bytes]]:
    p = MultipartParser(BOUNDARY)
    parts: list[list] = []
    for i in range(0, len(raw), step):
        for ev in p.feed(raw[i:i + step]):
            if ev[0] == "begin":
                parts.append([ev[1], ev[2], b""])
            elif ev[0] == "data":
                parts[-1][2] += ev[1]
    p.finish()
    return [tuple(x) for x in parts]


@pytest.mark.parametrize("step", [1, 7, 64, 4096, 1 << 20])
def test_parts_survive_any_chunking(step):
    meta = b"meta\r\n--0123456789abcde not a boundary\r\n"
    rootfs = bytes(range(256)) * 50 + b"\r\n--" + BOUNDARY[:-1].encode()
    parts = [("metadata", "meta.tar.xz", meta), ("rootfs", "root.squashfs", rootfs)]
    assert parse(body(parts), step) == parts


def test_go_style_content_type_boundary():
    assert boundary_of("multipart/form-data; boundary=abc123") == "abc123"
    assert boundary_of('multipart/form-data; boundary="a b"') == "a b"
    with pytest.raises(BadRequest):
        boundary_of("multipart/form-data")


def test_truncated_body_is_an_error():
    raw = body([("metadata", "m", b"x" * 100)])
    with pytest.raises(BadRequest, match="ended before the closing boundary"):
        parse(raw[:-30], 16)


def test_empty_part_data():
    assert parse(body([("metadata", "m", b""), ("rootfs", "r", b"y")]), 3) == [
        ("metadata", "m", b""), ("rootfs", "r", b"y")]
