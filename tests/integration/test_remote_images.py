"""Images from image servers: a simplestreams tree served over TLS by the test on 127.0.0.1 (its
certificate pinned through source.certificate), pulled by the shared daemon with POST /1.0/images
and POST /1.0/instances; tampered files refused; auto-update, `lxc image refresh` and the remote
cache expiry.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest

from lxd_daemon.imagebuilder.busybox import build_busybox
from lxd_daemon.imagebuilder.pack import serial
from lxd_daemon.images.remote.simplestreams import host_architecture
from tests.helpers import lxd502_setup, run_prefix, wait_op

pytestmark = pytest.mark.integration

SS_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(host_architecture(), host_architecture())


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        state = getattr(self.server, "state", None)
        if state is not None:
            with state.lock:
                state.hits[self.path] = state.hits.get(self.path, 0) + 1
            if self.path.endswith(".squashfs") and state.delay:
                time.sleep(state.delay)
        super().do_GET()


class Server:
    """A simplestreams tree over HTTPS: `publish(alias, builds)` writes the catalogue of the given
    split busybox builds (newest last) under `path` (its own base URL)."""

    def __init__(self, root: Path, url: str, cert: str):
        self.root, self.url, self.cert = root, url, cert
        self.hits: dict[str, int] = {}  # GETs by request path
        self.delay = 0.0  # seconds each rootfs GET waits before it is answered
        self.lock = threading.Lock()

    def publish(self, path: str, alias: str, builds: list) -> str:
        base = self.root / path
        versions = {}
        for ts, res in builds:
            meta, rootfs = res.paths
            d = base / "images" / res.fingerprint[:16]
            d.mkdir(parents=True, exist_ok=True)
            (d / "lxd.tar.xz").write_bytes(meta.read_bytes())
            (d / "root.squashfs").write_bytes(rootfs.read_bytes())
            versions[serial(ts)] = {"items": {
                "lxd.tar.xz": _item("lxd.tar.xz", d / "lxd.tar.xz", base, combined_squashfs_sha256=res.fingerprint),
                "root.squashfs": _item("squashfs", d / "root.squashfs", base),
            }}
        product = f"busybox:{alias}:{SS_ARCH}:default"
        (base / "streams/v1").mkdir(parents=True, exist_ok=True)
        (base / "streams/v1/index.json").write_text(json.dumps({"format": "index:1.0", "index": {"images": {
            "datatype": "image-downloads", "path": "streams/v1/images.json", "products": [product]}}}))
        (base / "streams/v1/images.json").write_text(json.dumps({
            "format": "products:1.0", "datatype": "image-downloads", "content_id": "images", "products": {
                product: {"aliases": alias, "arch": SS_ARCH, "os": "BusyBox", "release": alias,
                          "release_title": alias, "variant": "default", "versions": versions}}}))
        return f"{self.url}/{path}"


def _item(ftype: str, f: Path, base: Path, **extra) -> dict:
    import hashlib

    data = f.read_bytes()
    return {"ftype": ftype, "path": str(f.relative_to(base)), "sha256": hashlib.sha256(data).hexdigest(),
            "size": len(data), **extra}


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Two split busybox images (metadata tarball + squashfs) built at different times."""
    out = tmp_path_factory.mktemp("ssbuilds")
    made = []
    old = os.environ.get("SOURCE_DATE_EPOCH")
    try:
        for i, ts in enumerate((1764900000, 1764990000)):
            os.environ["SOURCE_DATE_EPOCH"] = str(ts)
            (out / str(i)).mkdir()
            made.append((ts, build_busybox(out / str(i), fmt="split", compression="xz", rootfs_format="squashfs")))
    finally:
        if old is None:
            os.environ.pop("SOURCE_DATE_EPOCH", None)
        else:
            os.environ["SOURCE_DATE_EPOCH"] = old
    assert made[0][1].fingerprint != made[1][1].fingerprint
    return made


@pytest.fixture(scope="module")
def unified_build(tmp_path_factory):
    """A unified busybox image (one gzip tarball) none of the daemons has."""
    out = tmp_path_factory.mktemp("unified")
    old = os.environ.get("SOURCE_DATE_EPOCH")
    os.environ["SOURCE_DATE_EPOCH"] = "1764800000"
    try:
        return build_busybox(out, fmt="unified", compression="gzip")
    finally:
        if old is None:
            os.environ.pop("SOURCE_DATE_EPOCH", None)
        else:
            os.environ["SOURCE_DATE_EPOCH"] = old


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("sstree")
    key, crt = base / "srv.key", base / "srv.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(crt), "-days", "2", "-subj", "/CN=ss-test",
                    "-addext", "subjectAltName=DNS:ss-test,IP:127.0.0.1"], check=True, capture_output=True)
    root = base / "www"
    root.mkdir()
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(crt), str(key))
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    srv.state = Server(root, f"https://127.0.0.1:{srv.server_address[1]}", crt.read_text())
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv.state
    finally:
        srv.shutdown()
        srv.server_close()


def _source(server: Server, url: str, **kw) -> dict:
    return {"type": "image", "mode": "pull", "server": url, "protocol": "simplestreams",
            "certificate": server.cert, **kw}


def _image(d, fp: str) -> dict | None:
    r = d.api("GET", f"/1.0/images/{fp}")
    return r.json()["metadata"] if r.status_code == 200 else None


def _delete_image(d, fp: str) -> None:
    r = d.api("DELETE", f"/1.0/images/{fp}")
    if r.status_code == 202:
        wait_op(d, r)


def _work_area(d) -> list[str]:
    return sorted(p.name for p in (d.lxd_dir / "images").iterdir() if p.name.startswith("tmp-"))


def test_pull_by_alias_and_by_fingerprint_with_progress(ready, server, builds):
    prefix = run_prefix()
    url = server.publish(f"{prefix}-a", f"{prefix}bb", builds[:1])
    fp = builds[0][1].fingerprint
    r = ready.api("POST", "/1.0/images", json={"source": _source(server, url, alias=f"{prefix}bb"),
                                               "aliases": [{"name": f"{prefix}-local", "description": "d"}]})
    assert r.status_code == 202, r.text
    op = wait_op(ready, r)
    try:
        assert op["status"] == "Success", op
        assert op["metadata"]["fingerprint"] == fp
        assert re.match(r"rootfs: \d+% \(", op["metadata"]["download_progress"]), op["metadata"]
        img = _image(ready, fp)
        assert img["cached"] is False and img["auto_update"] is False
        assert img["update_source"]["alias"] == f"{prefix}bb"
        assert img["update_source"]["protocol"] == "simplestreams" and img["update_source"]["server"] == url
        assert img["properties"]["os"] == "BusyBox" and img["properties"]["type"] == "squashfs"
        assert [a["name"] for a in img["aliases"]] == [f"{prefix}-local"]
        # The same image again, by fingerprint prefix: reused, not downloaded twice.
        r = ready.api("POST", "/1.0/images", json={"source": _source(server, url, fingerprint=fp[:16])})
        op = wait_op(ready, r)
        assert op["status"] == "Success" and op["metadata"]["fingerprint"] == fp, op
        assert "download_progress" not in op["metadata"]
    finally:
        _delete_image(ready, fp)
    # By full fingerprint, with the stock client's request shape: no update source is kept.
    r = ready.api("POST", "/1.0/images", json={"source": _source(server, url, fingerprint=fp), "public": True})
    op = wait_op(ready, r)
    try:
        assert op["status"] == "Success", op
        img = _image(ready, fp)
        assert img["public"] is True and "update_source" not in img
    finally:
        _delete_image(ready, fp)
    assert _work_area(ready) == []


def test_concurrent_pulls_share_one_download(ready, server, builds):
    prefix = run_prefix()
    url = server.publish(prefix, "bb", builds[:1])
    fp = builds[0][1].fingerprint
    server.delay = 1.0
    try:
        rs = [ready.api("POST", "/1.0/images", json={"source": _source(server, url, alias="bb"),
                                                     "aliases": [{"name": f"{prefix}-{i}"}]}) for i in range(2)]
        ops = [wait_op(ready, r) for r in rs]
    finally:
        server.delay = 0.0
    try:
        assert all(op["status"] == "Success" and op["metadata"]["fingerprint"] == fp for op in ops), ops
        assert all("download_progress" in op["metadata"] for op in ops), ops
        rootfs = [p for p in server.hits if p.startswith(f"/{prefix}/") and p.endswith(".squashfs")]
        assert len(rootfs) == 1 and server.hits[rootfs[0]] == 1, server.hits
        assert sorted(a["name"] for a in _image(ready, fp)["aliases"]) == [f"{prefix}-0", f"{prefix}-1"]
    finally:
        _delete_image(ready, fp)


def test_bad_sources_are_refused(ready, server, builds):
    r = ready.api("POST", "/1.0/images", json={"source": {"type": "image", "server": "ftp://x", "alias": "a"}})
    assert r.status_code == 400, r.text
    r = ready.api("POST", "/1.0/images", json={"source": {"type": "image", "server": server.url, "alias": "a",
                                                          "protocol": "gopher"}})
    assert r.status_code == 400 and "protocol" in r.json()["error"]
    # A certificate other than the server's: the pinned handshake fails, nothing is stored.
    other = subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                            "-nodes", "-keyout", "/dev/null", "-days", "1", "-subj", "/CN=other"],
                           check=True, capture_output=True, text=True).stdout
    url = server.publish(run_prefix(), "bb", builds[:1])
    r = ready.api("POST", "/1.0/images", json={"source": {**_source(server, url, alias="bb"), "certificate": other}})
    op = wait_op(ready, r)
    assert op["status"] == "Failure" and "certificate" in op["err"].lower(), op
    assert _image(ready, builds[0][1].fingerprint) is None


def test_tampered_item_is_refused_and_leaves_nothing(ready, server, builds):
    prefix = run_prefix()
    url = server.publish(prefix, "bb", builds[:1])
    fp = builds[0][1].fingerprint
    rootfs = next((server.root / prefix / "images").glob("*/root.squashfs"))
    data = bytearray(rootfs.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte changed
    rootfs.write_bytes(bytes(data))
    before = sorted(p.name for p in (ready.lxd_dir / "images").iterdir())
    r = ready.api("POST", "/1.0/images", json={"source": _source(server, url, alias="bb")})
    op = wait_op(ready, r)
    assert op["status"] == "Failure" and "sha256 mismatch" in op["err"], op
    assert _image(ready, fp) is None
    assert sorted(p.name for p in (ready.lxd_dir / "images").iterdir()) == before
    assert _work_area(ready) == []


def test_stock_client_simplestreams_remote_launch_and_copy(ready, server, builds, names):
    """`lxc remote add NAME URL --protocol simplestreams --public`, then `lxc init
    NAME:ALIAS` and `lxc image copy NAME:ALIAS local:` against the test's tree."""
    prefix = run_prefix()
    url = server.publish(prefix, "bb", builds[:1])
    fp = builds[0][1].fingerprint
    remote = f"{prefix}ss"
    ready.lxc("remote", "add", remote, url, "--protocol", "simplestreams", "--public")
    # The stock client pins a server certificate it finds under servercerts/ (lxc remote add
    # stores none for simplestreams remotes: they normally have a CA-signed one).
    pinned = ready.conf_dir / "servercerts" / f"{remote}.crt"
    pinned.parent.mkdir(exist_ok=True)
    pinned.write_text(server.cert)
    try:
        assert "bb" in ready.lxc("image", "list", f"{remote}:", "--format", "csv").stdout
        name = names("ssl")
        out = ready.lxc("init", f"{remote}:bb", name)
        assert "Retrieving image" in out.stdout + out.stderr
        assert _image(ready, fp)["cached"] is True
        ready.lxc("delete", "-f", name)
        _delete_image(ready, fp)
        ready.lxc("image", "copy", f"{remote}:bb", "local:", "--alias", f"{prefix}-c")
        img = _image(ready, fp)
        assert img["cached"] is False and [a["name"] for a in img["aliases"]] == [f"{prefix}-c"]
    finally:
        ready.lxc("remote", "remove", remote, check=False)
        pinned.unlink(missing_ok=True)
        _delete_image(ready, fp)


def test_launch_from_server_caches_the_image_then_expiry_removes_it(ready, server, builds, names):
    prefix = run_prefix()
    url = server.publish(prefix, "bb", builds[:1])
    fp = builds[0][1].fingerprint
    name = names("ss")
    body = {"name": name, "source": _source(server, url, alias="bb")}
    r = ready.curl("-X", "POST", "--data", json.dumps(body), "lxd/1.0/instances")
    resp = json.loads(r.stdout)
    assert resp["type"] == "async", resp
    op = ready.api("GET", f"{resp['operation']}/wait?timeout=120").json()["metadata"]
    try:
        assert op["status"] == "Success", op
        assert re.match(r"rootfs: \d+% \(", op["metadata"]["download_progress"]), op["metadata"]
        inst = ready.api("GET", f"/1.0/instances/{name}").json()["metadata"]
        assert inst["config"]["volatile.base_image"] == fp
        assert inst["config"]["image.os"] == "BusyBox"
        img = _image(ready, fp)
        assert img["cached"] is True and img["auto_update"] is True  # images.auto_update_cached
        assert img["update_source"]["alias"] == "bb"
        ready.lxc("delete", "-f", name)
        # Used just now: kept a day later; gone once images.remote_cache_expiry (10 days) passed.
        day = 86400
        r = ready.api("POST", "/internal/images/expire", json={"now": _rfc3339(time.time() + day)})
        assert r.json()["metadata"] == [] and _image(ready, fp) is not None
        r = ready.api("POST", "/internal/images/expire", json={"now": _rfc3339(time.time() + 11 * day)})
        assert r.json()["metadata"] == [fp]
        assert _image(ready, fp) is None
        assert ready.api("GET", "/1.0/images/aliases/busybox").status_code == 200  # not cached: kept
    finally:
        _delete_image(ready, fp)


def _rfc3339(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def test_auto_update_and_lxc_image_refresh_move_the_alias(ready, server, builds):
    prefix = run_prefix()
    path = prefix
    old_fp, new_fp = builds[0][1].fingerprint, builds[1][1].fingerprint
    url = server.publish(path, "bb", builds[:1])
    r = ready.api("POST", "/1.0/images", json={"source": _source(server, url, alias="bb"), "auto_update": True,
                                               "public": True, "aliases": [{"name": f"{prefix}-x"}]})
    assert wait_op(ready, r)["status"] == "Success"
    try:
        # Nothing newer yet: `lxc image refresh` says so.
        out = ready.lxc("image", "refresh", f"{prefix}-x").stdout
        assert "Image already up to date." in out, out
        # A newer image on the server: one auto-update pass takes it, the alias moves, the old goes.
        server.publish(path, "bb", builds)
        changed = ready.api("POST", "/internal/images/auto-update").json()["metadata"]
        assert {"old": old_fp, "new": new_fp} in changed, changed
        assert _image(ready, old_fp) is None
        img = _image(ready, new_fp)
        assert [a["name"] for a in img["aliases"]] == [f"{prefix}-x"]
        assert img["auto_update"] is True and img["public"] is True and img["cached"] is False
        assert img["update_source"]["alias"] == "bb"
        # Back to the older one on the server (it becomes "newest" again): `lxc image refresh`.
        server.publish(path, "bb", builds[:1])
        out = ready.lxc("image", "refresh", f"{prefix}-x").stdout
        assert "Image refreshed successfully!" in out, out
        assert ready.api("GET", f"/1.0/images/aliases/{prefix}-x").json()["metadata"]["target"] == old_fp
        assert _image(ready, new_fp) is None
    finally:
        for fp in (old_fp, new_fp):
            _delete_image(ready, fp)
    # An image that was not pulled from a server cannot be refreshed.
    local = ready.api("GET", "/1.0/images/aliases/busybox").json()["metadata"]["target"]
    r = ready.api("POST", f"/1.0/images/{local}/refresh")
    assert wait_op(ready, r)["status"] == "Failure"
    assert ready.api("POST", "/1.0/images/" + "0" * 64 + "/refresh").status_code == 404


# -- between two daemons of ours over TLS (lxd protocol) -------------------------------------------

def _import(d, build, alias: str, *, public: bool) -> str:
    args = ["image", "import", *map(str, build.paths), "--alias", alias]
    d.lxc(*args, *(["--public"] if public else []))
    return build.fingerprint


def test_launch_from_another_daemon_pulls_with_progress(tls_pair, unified_build):
    a, b = tls_pair.a, tls_pair.b
    fp = _import(b, unified_build, "bb", public=True)
    try:
        r = a.lxc("launch", "b:bb", "c2")
        assert "Retrieving image" in r.stdout + r.stderr, r.stdout + r.stderr
        img = _image(a, fp)
        assert img is not None and img["cached"] is True
        assert img["update_source"]["protocol"] == "lxd" and img["update_source"]["server"] == tls_pair.url_b
        assert a.api("GET", "/1.0/instances/c2").json()["metadata"]["status"] == "Running"
    finally:
        a.lxc("delete", "-f", "c2", check=False)
        _delete_image(a, fp)
        _delete_image(b, fp)


def test_image_copy_pull_mode_private_then_auto_update(tls_pair, builds):
    a, b = tls_pair.a, tls_pair.b
    old_fp = _import(b, builds[0][1], "bb", public=False)  # private: the copy uses a secret
    new_fp = None
    try:
        a.lxc("image", "copy", "b:bb", "local:", "--alias", "x", "--auto-update", "--copy-aliases")
        img = _image(a, old_fp)
        assert img is not None and img["auto_update"] is True and img["cached"] is False
        assert sorted(al["name"] for al in img["aliases"]) == ["bb", "x"]
        a.lxc("image", "delete", "x")
        # Public now: the copy names the alias, kept as the update source; a newer image on B
        # under that alias is picked up by an auto-update run on A, and the aliases move.
        b.lxc("image", "edit", "bb", input=json.dumps({"public": True, "auto_update": False, "properties": {}}))
        a.lxc("image", "copy", "b:bb", "local:", "--alias", "x", "--auto-update")
        assert _image(a, old_fp)["update_source"]["alias"] == "bb"
        b.lxc("image", "alias", "delete", "bb")
        new_fp = _import(b, builds[1][1], "bb", public=True)
        changed = a.api("POST", "/internal/images/auto-update").json()["metadata"]
        assert {"old": old_fp, "new": new_fp} in changed, changed
        assert a.api("GET", "/1.0/images/aliases/x").json()["metadata"]["target"] == new_fp
        assert _image(a, old_fp) is None
    finally:
        for fp in (old_fp, new_fp):
            if fp:
                _delete_image(a, fp)
                _delete_image(b, fp)


def test_tampered_image_on_the_other_daemon_is_refused(tls_pair, builds):
    a, b = tls_pair.a, tls_pair.b
    fp = _import(b, builds[0][1], "bad", public=True)
    try:
        stored = b.lxd_dir / "images" / f"{fp}.rootfs"
        data = bytearray(stored.read_bytes())
        data[len(data) // 2] ^= 0xFF  # B now serves other bytes under the same fingerprint
        stored.write_bytes(bytes(data))
        before = sorted(p.name for p in (a.lxd_dir / "images").iterdir())
        r = a.lxc("image", "copy", "b:bad", "local:", check=False)
        assert r.returncode != 0 and "sha256 mismatch" in r.stderr, r.stderr
        assert _image(a, fp) is None
        assert sorted(p.name for p in (a.lxd_dir / "images").iterdir()) == before
    finally:
        _delete_image(b, fp)


# -- with LXD 5.0.2 (Debian's lxd, in a network namespace of its own; ours joins it) ---------------



def _uds(d, method: str, path: str, **kw):
    import httpx

    with httpx.Client(transport=httpx.HTTPTransport(uds=str(d.socket)), base_url="http://lxd", timeout=120) as c:
        return c.request(method, path, **kw)


def _uds_wait(d, r) -> dict:
    body = r.json()
    assert body["type"] == "async", body
    return _uds(d, "GET", f"{body['operation']}/wait?timeout=120").json()["metadata"]


@pytest.fixture(scope="module")
def with_lxd502(tmp_path_factory):
    """(LXD 5.0.2, ours): LXD in a new network namespace, ours in LXD's; both serve HTTPS on
    loopback (8443: LXD, 8444: ours). No storage pools: images only."""

    daemons, wd = lxd502_setup(tmp_path_factory, "interop-img")
    prefix = run_prefix()
    lxd = daemons.Daemon("lxd", "LXD 5.0.2", daemons.DEBIAN_LXD, wd, prefix)
    ours = None
    try:
        lxd.start()
        ours = daemons.Daemon("ours", "ours", daemons.OUR_LXD, wd, prefix, netns=f"/proc/{lxd.pid}/ns/net")
        ours.start()
        for d, port in ((lxd, 8443), (ours, 8444)):
            r = _uds(d, "PATCH", "/1.0", json={"config": {"core.https_address": f"127.0.0.1:{port}"}})
            assert r.status_code == 200, r.text
        yield lxd, ours
    finally:
        for d in (ours, lxd):
            if d is not None:
                try:
                    d.stop()
                except Exception:  # noqa: BLE001 - cleanup() below catches what is left
                    pass
        daemons.cleanup(wd, log=lambda *_: None)


def _cert(d) -> str:
    return _uds(d, "GET", "/1.0").json()["metadata"]["environment"]["certificate"]


def test_ours_pulls_a_public_image_from_lxd_502(with_lxd502, builds):
    lxd, ours = with_lxd502
    fp = builds[0][1].fingerprint
    lxd.lxc("image", "import", *map(str, builds[0][1].paths), "--alias", "bb", "--public")
    r = _uds(ours, "POST", "/1.0/images", json={"source": {
        "type": "image", "mode": "pull", "server": "https://127.0.0.1:8443", "protocol": "lxd",
        "alias": "bb", "certificate": _cert(lxd)}, "aliases": [{"name": "from-lxd"}]})
    op = _uds_wait(ours, r)
    assert op["status"] == "Success", op
    assert op["metadata"]["fingerprint"] == fp and "download_progress" in op["metadata"]
    alias = _uds(ours, "GET", "/1.0/images/aliases/from-lxd").json()["metadata"]
    assert alias["target"] == fp
    img = _uds(ours, "GET", f"/1.0/images/{fp}").json()["metadata"]
    assert img["update_source"]["server"] == "https://127.0.0.1:8443" and img["update_source"]["alias"] == "bb"


def test_lxd_502_pulls_a_public_image_from_ours(with_lxd502, unified_build):
    lxd, ours = with_lxd502
    fp = unified_build.fingerprint
    ours.lxc("image", "import", str(unified_build.paths[0]), "--alias", "uu", "--public")
    r = _uds(lxd, "POST", "/1.0/images", json={"source": {
        "type": "image", "mode": "pull", "server": "https://127.0.0.1:8444", "protocol": "lxd",
        "alias": "uu", "certificate": _cert(ours)}})
    op = _uds_wait(lxd, r)
    assert op["status"] == "Success", op
    assert op["metadata"]["fingerprint"] == fp
