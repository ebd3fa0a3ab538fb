"""Both ends of `lxc image copy --mode push` (lxd_daemon/images/push.py), without a network."""

from __future__ import annotations

import asyncio
import threading

import pytest

from lxd_daemon.errors import BadRequest
from lxd_daemon.events import EventHub
from lxd_daemon.images.multipart import MultipartParser, boundary_of
from lxd_daemon.images.push import PushToken, _Body, create_token, take_token, target_url
from lxd_daemon.ops.manager import OperationManager

FP = "ab" * 32


def test_target_url():
    assert target_url("https://10.0.0.1:9443") == ("10.0.0.1", 9443, "")
    assert target_url("https://host/") == ("host", 8443, "")
    for bad in ("http://unix.socket", "unix:///var/lib/lxd/unix.socket", "", "https://"):
        with pytest.raises(BadRequest, match="https"):
            target_url(bad)


def test_token_checks_the_image_it_names():
    PushToken("busybox", [], False, None, None).check(FP)  # an alias: the secret decided
    PushToken(FP[:12], [], False, None, None).check(FP)
    with pytest.raises(BadRequest, match="mismatch"):
        PushToken("cd" * 6, [], False, None, None).check(FP)


def test_multipart_body_of_a_split_image(tmp_path):
    meta, root = tmp_path / "meta", tmp_path / "root"
    meta.write_bytes(b"M" * 3000)
    root.write_bytes(bytes(range(256)) * 9000)  # more than one 1 MiB read
    seen = []
    body = _Body([("meta-x.tar.gz", meta), ("x.squashfs", root)], threading.Event(),
                 lambda done, total: seen.append((done, total)))
    data = b"".join(body)
    assert len(data) == body.length
    assert seen[-1] == (body.length - len(f"\r\n--{body.boundary}--\r\n"), body.length)
    parser = MultipartParser(boundary_of(body.content_type))
    parts: dict[str, bytes] = {}
    name = None
    for ev in parser.feed(data):
        if ev[0] == "begin":
            name = ev[1]
            parts[name] = b""
        elif ev[0] == "data":
            parts[name] += ev[1]
    parser.finish()
    assert parts == {"metadata": meta.read_bytes(), "rootfs": root.read_bytes()}


def test_unified_body_is_the_file_and_stops_when_told(tmp_path):
    f = tmp_path / "img"
    f.write_bytes(b"x" * (3 << 20))
    stop = threading.Event()
    body = _Body([("img.tar.gz", f)], stop, lambda *_: None)
    assert body.content_type == "application/octet-stream" and body.length == 3 << 20
    it = iter(body)
    assert next(it) == b"x" * (1 << 20)
    stop.set()
    with pytest.raises(Exception, match="cancelled"):
        next(it)


def test_a_token_admits_one_upload():
    async def main():
        hub = EventHub()
        ops = OperationManager(hub)
        op = create_token(ops, hub, project="default", fingerprint="busybox", aliases=[{"name": "bb", "description": ""}],
                          public=True, properties={"os": "x"}, expires_at="2030-01-01T00:00:00Z")
        secret = op.metadata["secret"]
        assert op.cls == "token" and op.resources == {"images": ["/1.0/images/busybox"]}
        assert await take_token(ops, FP, "0" * 64) is None
        assert await take_token(ops, FP, "") is None
        token = await take_token(ops, FP, secret)
        assert token.public is True and token.aliases == [{"name": "bb", "description": ""}]
        assert token.expires_at and token.properties == {"os": "x"}
        assert op.status.final
        assert await take_token(ops, FP, secret) is None
        with pytest.raises(BadRequest):
            create_token(ops, hub, project="default", fingerprint=FP, aliases=[], public=False, properties=None, expires_at="soon")
        with pytest.raises(BadRequest):
            create_token(ops, hub, project="default", fingerprint="", aliases=[], public=False, properties=None, expires_at=None)

    asyncio.run(main())
