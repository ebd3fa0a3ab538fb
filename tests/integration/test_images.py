"""The image store through the stock `lxc` client, curl and pylxd."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import tarfile
import time
from pathlib import Path

import pytest
import yaml

from lxd_daemon.imagebuilder.busybox import build_busybox
from tests.helpers import Daemon, run_prefix
from tests.unit.test_images_formats import make_image

pytestmark = pytest.mark.integration


def sha256(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def prefix() -> str:
    return run_prefix()


@pytest.fixture(scope="module")
def built(tmp_path_factory, prefix):
    """Busybox images from the image builder, unique to this run (the name is in the metadata)."""
    out = {}
    for key, kw in {
        "unified-gzip": {"fmt": "unified", "compression": "gzip"},
        "unified-xz": {"fmt": "unified", "compression": "xz"},
        "split-squashfs": {"fmt": "split", "compression": "gzip", "rootfs_format": "squashfs"},
        "split-tar-xz": {"fmt": "split", "compression": "xz", "rootfs_format": "tar"},
    }.items():
        d = tmp_path_factory.mktemp(key)
        out[key] = build_busybox(d, name=f"{prefix}-{key}", **kw)
    return out


def images_dir(daemon: Daemon) -> set[str]:
    """The image store's entries once deleted files are gone (they are unlinked in the background)."""
    deadline = time.monotonic() + 10
    while True:
        names = set(os.listdir(daemon.lxd_dir / "images"))
        if not any(n.startswith("tmp-deleted-") for n in names) or time.monotonic() > deadline:
            return names
        time.sleep(0.02)


def wait_op(daemon: Daemon, resp) -> dict:
    body = resp.json()
    assert resp.status_code == 202, body
    op = daemon.api("GET", body["operation"] + "/wait?timeout=30").json()["metadata"]
    return op


def delete_image(daemon: Daemon, fp: str) -> None:
    r = daemon.api("DELETE", f"/1.0/images/{fp}")
    if r.status_code == 202:
        wait_op(daemon, r)


@pytest.mark.parametrize("key", ["unified-gzip", "unified-xz", "split-squashfs", "split-tar-xz"])
def test_import_info_export_delete_with_lxc(daemon, built, prefix, key, tmp_path):
    res = built[key]
    alias = f"{prefix}/{key}"
    before = images_dir(daemon)
    out = daemon.lxc("image", "import", *map(str, res.paths), "--alias", alias, "--public", "custom=yes").stdout
    try:
        assert f"Image imported with fingerprint: {res.fingerprint}" in out
        assert sha256(*res.paths) == res.fingerprint
        info = daemon.lxc("image", "info", alias).stdout
        assert f"Fingerprint: {res.fingerprint}" in info
        assert "Public: yes" in info and "custom: yes" in info and f"- {alias}" in info
        assert "os: busybox" in info and "Architecture: x86_64" in info
        shown = yaml.safe_load(daemon.lxc("image", "show", alias).stdout)
        assert shown["public"] is True and shown["properties"]["custom"] == "yes"
        listed = json.loads(daemon.lxc("image", "list", res.fingerprint[:12], "--format", "json").stdout)
        assert [i["fingerprint"] for i in listed] == [res.fingerprint]
        assert listed[0]["aliases"] == [{"name": alias, "description": ""}]
        assert listed[0]["size"] == sum(p.stat().st_size for p in res.paths)
        assert listed[0]["type"] == "container"
        # Export: the file(s) hash back to the fingerprint.
        exp = tmp_path / "export"
        exp.mkdir()
        daemon.lxc("image", "export", alias, str(exp))
        files = sorted(exp.iterdir(), key=lambda p: (not p.name.startswith("meta-"), p.name))
        assert len(files) == len(res.paths)
        assert sha256(*files) == res.fingerprint
        if len(files) == 1:
            assert files[0].name.startswith(res.fingerprint + ".tar.")
    finally:
        daemon.lxc("image", "delete", alias, check=False)
    assert images_dir(daemon) == before
    r = daemon.lxc("image", "info", res.fingerprint, check=False)
    assert r.returncode != 0 and "not found" in r.stderr.lower()


def test_duplicate_import_names_the_existing_fingerprint(daemon, built):
    res = built["unified-gzip"]
    daemon.lxc("image", "import", str(res.paths[0]))
    try:
        r = daemon.lxc("image", "import", str(res.paths[0]), check=False)
        assert r.returncode != 0
        assert f"already exists: {res.fingerprint}" in r.stderr
        r = daemon.api("POST", "/1.0/images", content=res.paths[0].read_bytes())
        assert r.status_code == 409 and res.fingerprint in r.json()["error"]
    finally:
        delete_image(daemon, res.fingerprint)


def test_show_edit_and_etag(daemon, built, prefix):
    res = built["unified-xz"]
    daemon.lxc("image", "import", str(res.paths[0]), "--alias", f"{prefix}-edit")
    try:
        text = daemon.lxc("image", "show", f"{prefix}-edit").stdout
        assert "public: false" in text and "  description: " in text
        text = text.replace("public: false", "public: true")
        text = re.sub(r"(?m)^  description: .*$", "  description: edited by test", text)
        daemon.lxc("image", "edit", f"{prefix}-edit", input=text)  # stdin is not a terminal: no editor
        img = daemon.api("GET", f"/1.0/images/{res.fingerprint}")
        meta = img.json()["metadata"]
        assert meta["public"] is True and meta["properties"]["description"] == "edited by test"
        etag = img.headers["etag"]
        r = daemon.api("PATCH", f"/1.0/images/{res.fingerprint}", json={"properties": {"x": "1"}},
                       headers={"If-Match": '"deadbeef"'})
        assert r.status_code == 412
        r = daemon.api("PATCH", f"/1.0/images/{res.fingerprint}", json={"properties": {"x": "1"}},
                       headers={"If-Match": etag})
        assert r.status_code == 200, r.text
        props = daemon.api("GET", f"/1.0/images/{res.fingerprint}").json()["metadata"]["properties"]
        assert props["x"] == "1" and props["description"] == "edited by test"  # PATCH merges
        r = daemon.api("PUT", f"/1.0/images/{res.fingerprint}", json={"properties": {"only": "this"}})
        assert r.status_code == 200
        meta = daemon.api("GET", f"/1.0/images/{res.fingerprint}").json()["metadata"]
        assert meta["properties"] == {"only": "this"} and meta["public"] is False  # PUT replaces
        r = daemon.api("PUT", f"/1.0/images/{res.fingerprint}", json={"public": "yes"})
        assert r.status_code == 400 and "public" in r.json()["error"]
    finally:
        delete_image(daemon, res.fingerprint)


def test_alias_commands(daemon, built, prefix):
    res = built["split-squashfs"]
    daemon.lxc("image", "import", *map(str, res.paths))
    a, b = f"{prefix}/one/two", f"{prefix}/renamed"
    try:
        daemon.lxc("image", "alias", "create", a, res.fingerprint[:16])
        rows = daemon.lxc("image", "alias", "list", "--format", "csv").stdout
        assert f"{a},{res.fingerprint[:12]},CONTAINER," in rows
        got = daemon.api("GET", f"/1.0/images/aliases/{a}")
        assert got.json()["metadata"] == {"name": a, "description": "", "target": res.fingerprint,
                                          "type": "container"}
        assert got.headers.get("etag")
        clash = daemon.api("POST", "/1.0/images/aliases", json={"name": a, "target": res.fingerprint})
        assert clash.status_code == 409
        r = daemon.api("PATCH", f"/1.0/images/aliases/{a}", json={"description": "desc"})
        assert r.status_code == 200
        daemon.lxc("image", "alias", "rename", a, b)
        assert daemon.api("GET", f"/1.0/images/aliases/{a}").status_code == 404
        info = daemon.lxc("image", "info", b).stdout
        assert f"- {b} (desc)" in info
        daemon.lxc("image", "alias", "delete", b)
        assert b not in daemon.lxc("image", "alias", "list", "--format", "csv").stdout
        r = daemon.api("POST", "/1.0/images/aliases", json={"name": f"{prefix}-x", "target": "f" * 64})
        assert r.status_code == 404
        r = daemon.api("POST", "/1.0/images/aliases", json={"name": f"{prefix}/../x", "target": res.fingerprint})
        assert r.status_code == 400
        created = daemon.api("POST", "/1.0/images/aliases", json={"name": f"{prefix}-loc", "target": res.fingerprint})
        assert created.status_code == 201 and created.headers["location"] == f"/1.0/images/aliases/{prefix}-loc"
    finally:
        delete_image(daemon, res.fingerprint)
    # Aliases go with their image.
    assert daemon.api("GET", f"/1.0/images/aliases/{prefix}-loc").status_code == 404


def test_list_formats_and_server_filter(daemon, built, prefix):
    res = built["split-tar-xz"]
    daemon.lxc("image", "import", *map(str, res.paths), "--alias", f"{prefix}-list", f"flavour={prefix}")
    try:
        csv = daemon.lxc("image", "list", f"{prefix}-list", "--format", "csv").stdout
        assert csv.startswith(f"{prefix}-list,{res.fingerprint[:12]},no,")
        ym = yaml.safe_load(daemon.lxc("image", "list", f"flavour={prefix}", "--format", "yaml").stdout)
        assert [i["fingerprint"] for i in ym] == [res.fingerprint]
        r = daemon.api("GET", "/1.0/images", params={"recursion": "1", "filter": f"properties.flavour eq {prefix}"})
        assert [i["fingerprint"] for i in r.json()["metadata"]] == [res.fingerprint]
        r = daemon.api("GET", "/1.0/images", params={"filter": f"properties.flavour eq {prefix} and public eq true"})
        assert r.json()["metadata"] == []
        r = daemon.api("GET", "/1.0/images", params={"filter": "properties.flavour eq"})
        assert r.status_code == 400
        urls = daemon.api("GET", "/1.0/images").json()["metadata"]
        assert f"/1.0/images/{res.fingerprint}" in urls
    finally:
        delete_image(daemon, res.fingerprint)


def tiny_image(path: Path, n: int) -> Path:
    return make_image(path, extra=[{"name": "rootfs/n", "data": str(n).encode()}])


def test_prefix_resolution(daemon, tmp_path):
    fps: dict[str, str] = {}
    made = []
    try:
        for n in range(17):
            img = tiny_image(tmp_path / f"i{n}.tar.gz", n)
            fp = sha256(img)
            r = daemon.api("POST", "/1.0/images", content=img.read_bytes(), headers={"X-LXD-fingerprint": fp})
            op = wait_op(daemon, r)
            assert op["status"] == "Success" and op["metadata"]["fingerprint"] == fp
            assert op["metadata"]["size"] == str(img.stat().st_size)
            made.append(fp)
            if fp[:1] in fps:
                other = fps[fp[:1]]
                break
            fps[fp[:1]] = fp
        else:
            pytest.skip("no two fingerprints shared a prefix")
        common = os.path.commonprefix([fp, other])
        r = daemon.api("GET", f"/1.0/images/{common}")
        assert r.status_code == 400 and common in r.json()["error"]
        everyone = [u.rsplit("/", 1)[-1] for u in daemon.api("GET", "/1.0/images").json()["metadata"]]
        n = len(common) + 1
        while sum(f.startswith(fp[:n]) for f in everyone) > 1:
            n += 1
        r = daemon.api("GET", f"/1.0/images/{fp[:n]}")
        assert r.status_code == 200 and r.json()["metadata"]["fingerprint"] == fp
        assert daemon.api("GET", "/1.0/images/" + "0" * 64).status_code == 404
        assert daemon.api("GET", "/1.0/images/nothex").status_code == 404
    finally:
        for fp in made:
            delete_image(daemon, fp)


def _evil(path: Path, entry: dict) -> Path:
    return make_image(path, extra=[entry])


def test_bad_uploads_are_refused_and_leave_nothing(daemon, built, tmp_path):
    good = built["unified-xz"].paths[0]
    before = images_dir(daemon)
    data = good.read_bytes()
    cases = {
        "truncated": (data[: len(data) // 2], {}, 400, "truncated or corrupt"),
        "corrupt": (data[:4096] + bytes(64) + data[4160:], {}, 400, "corrupt"),
        "mismatch": (data, {"X-LXD-fingerprint": "0" * 64}, 400, "Fingerprint mismatch"),
        "compression": (b"PK\x03\x04" + bytes(2000), {}, 400, "Unsupported image format"),
        "empty": (b"", {"Content-Type": "application/octet-stream"}, 400, "Empty image"),
        "dotdot": (_evil(tmp_path / "a.tgz", {"name": "../x", "data": b"x"}).read_bytes(), {}, 400, "outside"),
        # a leading "/" is stripped as LXD does (tests/integration/test_hardening_compat.py); ".." is not
        "absolute": (_evil(tmp_path / "b.tgz", {"name": "/../etc/x", "data": b"x"}).read_bytes(), {}, 400, "outside"),
        "symlink": (_evil(tmp_path / "c.tgz", {"name": "rootfs/x", "type": tarfile.SYMTYPE,
                                                "linkname": "../../../../etc"}).read_bytes(), {}, 400, "points outside"),
        "hardlink": (_evil(tmp_path / "d.tgz", {"name": "rootfs/x", "type": tarfile.LNKTYPE,
                                                 "linkname": "../../etc/shadow"}).read_bytes(), {}, 400, "outside"),
        "device": (_evil(tmp_path / "e.tgz", {"name": "rootfs/root/sda", "type": tarfile.BLKTYPE,
                                               "devmajor": 8}).read_bytes(), {}, 400, "device node"),
        "nometa": (make_image(tmp_path / "f.tgz", meta=None).read_bytes(), {}, 400, "missing metadata.yaml"),
    }
    for name, (body, headers, status, msg) in cases.items():
        r = daemon.api("POST", "/1.0/images", content=body,
                       headers={"Content-Type": "application/octet-stream", **headers})
        assert r.status_code == status, (name, r.text)
        assert msg in r.json()["error"], (name, r.text)
        assert images_dir(daemon) == before, name
    # Through curl too (what the stock tools would send), and a broken multipart upload.
    (tmp_path / "t.bin").write_bytes(data[:1000])
    r = daemon.curl("-X", "POST", "--data-binary", f"@{tmp_path / 't.bin'}", "-H",
                    "Content-Type: application/octet-stream", "lxd/1.0/images")
    assert json.loads(r.stdout)["error_code"] == 400
    r = daemon.curl("-X", "POST", "-F", f"metadata=@{good}", "lxd/1.0/images")
    assert json.loads(r.stdout)["error_code"] == 400 and "rootfs" in json.loads(r.stdout)["error"]
    r = daemon.curl("-X", "POST", "-F", f"rootfs=@{good}", "-F", f"metadata=@{good}", "lxd/1.0/images")
    assert json.loads(r.stdout)["error_code"] == 400
    assert images_dir(daemon) == before


def test_multipart_upload_with_curl_and_fingerprint(daemon, built):
    res = built["split-squashfs"]
    meta, rootfs = res.paths
    r = daemon.curl("-X", "POST", "-H", f"X-LXD-fingerprint: {res.fingerprint}", "-H", "X-LXD-public: 1",
                    "-H", "X-LXD-properties: a=1&b=two%20words",
                    "-F", f"metadata=@{meta}", "-F", f"rootfs=@{rootfs}", "lxd/1.0/images")
    body = json.loads(r.stdout)
    assert body["type"] == "async", body
    op = daemon.api("GET", body["operation"] + "/wait?timeout=30").json()["metadata"]
    try:
        assert op["status"] == "Success", op
        img = daemon.api("GET", f"/1.0/images/{res.fingerprint}").json()["metadata"]
        assert img["public"] is True and img["properties"]["a"] == "1" and img["properties"]["b"] == "two words"
        assert img["filename"] == rootfs.name
        assert (daemon.lxd_dir / "images" / f"{res.fingerprint}.rootfs").exists()
    finally:
        delete_image(daemon, res.fingerprint)


def test_create_with_aliases_header_and_secret(daemon, tmp_path, prefix):
    img = tiny_image(tmp_path / "s.tar.gz", 1000)
    r = daemon.api("POST", "/1.0/images", content=img.read_bytes(),
                   headers={"X-LXD-aliases": f"{prefix}-h1,{prefix}-h2", "X-LXD-filename": "s.tar.gz"})
    op = wait_op(daemon, r)
    fp = op["metadata"]["fingerprint"]
    try:
        assert op["resources"]["images"] == [f"/1.0/images/{fp}"]
        img_doc = daemon.api("GET", f"/1.0/images/{fp}").json()["metadata"]
        assert {a["name"] for a in img_doc["aliases"]} == {f"{prefix}-h1", f"{prefix}-h2"}
        assert img_doc["filename"] == "s.tar.gz"
        r = daemon.api("POST", f"/1.0/images/{fp[:20]}/secret")
        assert r.status_code == 202
        meta = r.json()["metadata"]
        assert meta["class"] == "token" and len(meta["metadata"]["secret"]) == 64
        assert meta["metadata"]["fingerprint"] == fp
        daemon.api("DELETE", f"/1.0/operations/{meta['id']}")
    finally:
        delete_image(daemon, fp)


def test_publish_bad_requests_and_unsupported_sources(daemon):
    r = daemon.api("POST", "/1.0/images", json={"source": {"type": "url", "url": "https://example.invalid/x"}})
    assert r.status_code == 501
    r = daemon.api("POST", "/1.0/images", json={"source": {"type": "bogus"}})
    assert r.status_code == 400
    r = daemon.api("POST", "/1.0/images", json={"source": {"type": "snapshot", "name": "c1"}})
    assert r.status_code == 400 and "snapshot" in r.json()["error"]
    r = daemon.api("POST", "/1.0/images", json={"compression_algorithm": "rar",
                                                "source": {"type": "instance", "name": "c1"}})
    assert r.status_code == 400


def test_pylxd_create_list_delete(daemon, tmp_path):
    img = tiny_image(tmp_path / "p.tar.gz", 2000)
    fp = sha256(img)
    code = f"""
data = open({str(img)!r}, 'rb').read()
image = client.images.create(data, public=True, wait=True)
print(image.fingerprint)
print(json.dumps([i.fingerprint for i in client.images.all()]))
got = client.images.get(image.fingerprint)
print(got.public, got.properties['os'])
got.delete(wait=True)
print(client.images.exists({fp!r}))
"""
    r = daemon.pylxd(code)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == fp
    assert fp in json.loads(lines[1])
    assert lines[2] == "True busybox"
    assert lines[3] == "False"


def test_import_speed_of_a_1mb_image(daemon, built):
    """A small import through the API is a matter of milliseconds (LXD 5.0.2: 18 ms here)."""
    res = built["unified-gzip"]
    data = res.paths[0].read_bytes()
    times = []
    with daemon.http() as c:
        for _ in range(3):
            t = time.perf_counter()
            r = c.post("/1.0/images", content=data, headers={"Content-Type": "application/octet-stream"})
            op = c.get(r.json()["operation"] + "/wait?timeout=30").json()["metadata"]
            times.append(time.perf_counter() - t)
            assert op["status"] == "Success", op
            r = c.delete(f"/1.0/images/{res.fingerprint}")
            c.get(r.json()["operation"] + "/wait?timeout=30")
    assert min(times) < 1.0, times


def test_leftovers_are_removed_at_start(fresh_daemon, tmp_path):
    import socket

    d = fresh_daemon
    d.start()
    img = tiny_image(tmp_path / "k.tar.gz", 3000)
    fp = sha256(img)
    wait_op(d, d.api("POST", "/1.0/images", content=img.read_bytes()))
    images = d.lxd_dir / "images"
    # Kill the daemon in the middle of a big upload (past the in-memory size: a temp file exists).
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(d.socket))
    total = 64 << 20
    s.sendall(b"POST /1.0/images HTTP/1.1\r\nHost: lxd\r\nContent-Type: application/octet-stream\r\n"
              b"Content-Length: %d\r\n\r\n" % total)
    s.sendall(b"\x1f\x8b" + os.urandom(20 << 20))
    deadline = time.monotonic() + 20
    while not any(n.startswith("tmp-") for n in os.listdir(images)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any(n.startswith("tmp-") for n in os.listdir(images))
    d.stop(signal.SIGKILL)
    s.close()
    # And a file whose database row was never written (killed between the rename and the commit).
    (images / ("ab" * 32)).write_bytes(b"orphan")
    (images / ("ab" * 32 + ".rootfs")).write_bytes(b"orphan")
    d.start()
    assert sorted(os.listdir(images)) == [fp]
    assert d.api("GET", f"/1.0/images/{fp}").status_code == 200


def test_interrupted_upload_leaves_nothing(daemon, built):
    """A client that goes away mid-upload leaves no temp files behind."""
    import socket

    before = images_dir(daemon)
    data = built["unified-xz"].paths[0].read_bytes()
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(daemon.socket))
    s.sendall(b"POST /1.0/images HTTP/1.1\r\nHost: lxd\r\nContent-Type: application/octet-stream\r\n"
              b"Content-Length: %d\r\n\r\n" % len(data) + data[:100000])
    time.sleep(0.3)
    s.close()
    deadline = time.monotonic() + 5
    while images_dir(daemon) != before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert images_dir(daemon) == before


def test_export_split_multipart_shape(daemon, built):
    res = built["split-tar-xz"]
    daemon.lxc("image", "import", *map(str, res.paths))
    try:
        r = daemon.api("GET", f"/1.0/images/{res.fingerprint}/export")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("multipart/form-data; boundary=")
        assert int(r.headers["content-length"]) == len(r.content)
        assert b'name="metadata"; filename="meta-' + res.fingerprint.encode() + b'.tar.xz"' in r.content
        assert b'name="rootfs"; filename="' + res.fingerprint.encode() + b'.tar.xz"' in r.content
        unified = daemon.api("GET", f"/1.0/images/{res.fingerprint}")
        assert unified.json()["metadata"]["fingerprint"] == res.fingerprint
    finally:
        delete_image(daemon, res.fingerprint)


def test_unified_export_headers(daemon, tmp_path):
    img = tiny_image(tmp_path / "u.tar.gz", 4000)
    fp = sha256(img)
    wait_op(daemon, daemon.api("POST", "/1.0/images", content=img.read_bytes()))
    try:
        r = daemon.api("GET", f"/1.0/images/{fp}/export")
        assert r.status_code == 200 and r.content == img.read_bytes()
        assert r.headers["content-type"] == "application/octet-stream"
        assert r.headers["content-disposition"].startswith("inline;")
        assert f"filename={fp}.tar.gz" in r.headers["content-disposition"]
    finally:
        delete_image(daemon, fp)


def test_tar_members_listing_sanity(tmp_path):
    # The helper images used above are valid tarballs with the expected layout.
    with tarfile.open(tiny_image(tmp_path / "z.tar.gz", 1)) as tf:
        names = tf.getnames()
    assert "metadata.yaml" in names and "rootfs/n" in names


def test_lifecycle_events(daemon, tmp_path, prefix):
    from websockets.sync.client import unix_connect

    img = tiny_image(tmp_path / "ev.tar.gz", 5000)
    fp = sha256(img)
    with unix_connect(str(daemon.socket), "ws://lxd/1.0/events?type=lifecycle") as ws:
        wait_op(daemon, daemon.api("POST", "/1.0/images", content=img.read_bytes()))
        daemon.api("POST", "/1.0/images/aliases", json={"name": f"{prefix}-ev", "target": fp})
        daemon.api("PATCH", f"/1.0/images/{fp}", json={"public": True})
        daemon.api("POST", f"/1.0/images/aliases/{prefix}-ev", json={"name": f"{prefix}-ev2"})
        delete_image(daemon, fp)
        seen = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(seen) < 5:
            ev = json.loads(ws.recv(timeout=10))
            if fp in json.dumps(ev) or prefix in json.dumps(ev):
                seen.append((ev["metadata"]["action"], ev["metadata"]["source"]))
    assert seen == [
        ("image-created", f"/1.0/images/{fp}"),
        ("image-alias-created", f"/1.0/images/aliases/{prefix}-ev"),
        ("image-updated", f"/1.0/images/{fp}"),
        ("image-alias-renamed", f"/1.0/images/aliases/{prefix}-ev2"),
        ("image-deleted", f"/1.0/images/{fp}"),
    ]


def test_publish_with_lxc_and_launch_from_it(daemon, prefix):
    from tests.helpers import ensure_containers_ready

    ensure_containers_ready(daemon)
    c1, c2, alias = f"{prefix}-pub1", f"{prefix}-pub2", f"{prefix}/published"
    try:
        daemon.lxc("launch", "busybox", c1)
        daemon.lxc("exec", c1, "--", "sh", "-c", "echo marker > /root/marker")
        out = daemon.lxc("publish", c1, "--alias", alias, "--force", "--compression", "xz",
                         f"description={prefix} published").stdout
        assert "Instance published with fingerprint:" in out
        img = daemon.api("GET", f"/1.0/images/aliases/{alias}").json()["metadata"]
        fp = img["target"]
        doc = daemon.api("GET", f"/1.0/images/{fp}").json()["metadata"]
        assert doc["properties"] == {"description": f"{prefix} published"}
        path = daemon.lxd_dir / "images" / fp
        assert sha256(path) == fp
        with tarfile.open(path) as tf:
            marker = tf.getmember("rootfs/root/marker")
            assert (marker.uid, marker.gid) == (0, 0), "ids are mapped back into the container's range"
            assert "metadata.yaml" in tf.getnames()
        daemon.lxc("launch", alias, c2)
        assert daemon.lxc("exec", c2, "--", "cat", "/root/marker").stdout == "marker\n"
    finally:
        daemon.lxc("delete", "-f", c1, check=False)
        daemon.lxc("delete", "-f", c2, check=False)
        r = daemon.api("GET", f"/1.0/images/aliases/{alias}")
        if r.status_code == 200:
            delete_image(daemon, r.json()["metadata"]["target"])


def test_image_profiles_are_checked_and_apply_at_launch(daemon, prefix):
    from tests.helpers import ensure_containers_ready

    ensure_containers_ready(daemon)
    prof, c1, c2 = f"{prefix}-improf", f"{prefix}-improf1", f"{prefix}-improf2"
    fp = daemon.api("GET", "/1.0/images/aliases/busybox").json()["metadata"]["target"]
    before = daemon.api("GET", f"/1.0/images/{fp}").json()["metadata"]["profiles"]
    try:
        r = daemon.api("PATCH", f"/1.0/images/{fp}", json={"profiles": ["default", prof]})
        assert r.status_code == 400 and prof in r.json()["error"], r.text
        daemon.lxc("profile", "create", prof)
        daemon.lxc("profile", "set", prof, "user.from-image-profile", "yes")
        r = daemon.api("PATCH", f"/1.0/images/{fp}", json={"profiles": ["default", prof]})
        assert r.status_code == 200, r.text
        daemon.lxc("init", "busybox", c1)  # no -p: the image's profiles
        assert daemon.api("GET", f"/1.0/instances/{c1}").json()["metadata"]["profiles"] == ["default", prof]
        assert daemon.lxc("config", "get", c1, "user.from-image-profile", "--expanded").stdout.strip() == "yes"
        daemon.lxc("init", "busybox", c2, "-p", "default")  # explicit profiles win
        assert daemon.api("GET", f"/1.0/instances/{c2}").json()["metadata"]["profiles"] == ["default"]
    finally:
        daemon.lxc("delete", "-f", c1, check=False)
        daemon.lxc("delete", "-f", c2, check=False)
        daemon.api("PATCH", f"/1.0/images/{fp}", json={"profiles": before})
        daemon.lxc("profile", "delete", prof, check=False)


def test_large_upload_and_export_take_the_socket_paths(daemon, tmp_path):
    """A Content-Length upload bigger than a piece is read from the socket by a thread, a file
    export bigger than 4 MiB is sent with sendfile; both must be byte-exact, with the stock client too."""
    path = make_image(tmp_path / "big.tar", compression="none",
                      extra=[{"name": "rootfs/blob", "data": os.urandom(9 << 20)}])
    fp = sha256(path)
    r = daemon.curl("-X", "POST", "-H", "Content-Type: application/octet-stream", "-H", f"X-LXD-fingerprint: {fp}",
                    "--data-binary", f"@{path}", "-D", "-", "lxd/1.0/images")
    head, _, body = r.stdout.rpartition("\n\n")  # after curl's "100 Continue" and the answer's head
    assert "connection: close" in head.lower(), head
    op = daemon.api("GET", json.loads(body)["operation"] + "/wait?timeout=60").json()["metadata"]
    try:
        assert op["status"] == "Success", op
        out = tmp_path / "export.tar"
        r = daemon.curl("-o", str(out), "-D", "-", f"lxd/1.0/images/{fp}/export")
        assert "connection: close" in r.stdout.lower() and sha256(out) == fp
        dest = tmp_path / "lxc-export"
        dest.mkdir()
        daemon.lxc("image", "export", fp, str(dest) + "/")
        [exported] = list(dest.iterdir())
        assert sha256(exported) == fp
    finally:
        delete_image(daemon, fp)
