"""Serving images over TLS (issue 11, item 5): public images to untrusted clients, image secrets,
the simplestreams tree, and `lxc image copy` in push and relay modes between two daemons.

Everything runs against the `tls_pair` fixture: daemons A and B in a namespace of their own; A's
`lxc` knows B as remote `b`. "Untrusted" requests are curl over TLS without a client certificate.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.helpers import busybox_tarball, lxd502_setup, wait_for, wait_op

pytestmark = pytest.mark.integration


def variant(tmp: Path, tag: str) -> tuple[Path, str]:
    """A busybox image with a fingerprint of its own (the same tarball, compressed anew)."""
    data = gzip.compress(gzip.decompress(busybox_tarball().read_bytes()),
                         mtime=int(hashlib.sha256(tag.encode()).hexdigest()[:7], 16))
    path = tmp / f"busybox-{tag}.tar.gz"
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def import_image(d, path: Path, alias: str, *, public: bool) -> str:
    args = ["image", "import", str(path), "--alias", alias] + (["--public"] if public else [])
    d.lxc(*args)
    return d.api("GET", f"/1.0/images/aliases/{alias}").json()["metadata"]["target"]


def delete_image(d, fp: str) -> None:
    r = d.api("DELETE", f"/1.0/images/{fp}")
    if r.status_code == 202:
        wait_op(d, r)


def fingerprints(d) -> set[str]:
    return {u.rsplit("/", 1)[-1] for u in d.api("GET", "/1.0/images").json()["metadata"]}


class Untrusted:
    """curl over TLS inside the pair's namespace, with no client certificate."""

    def __init__(self, pair):
        self.pair = pair

    def get(self, url: str, *args: str) -> subprocess.CompletedProcess:
        return self.pair.ns.run("curl", "-sk", *args, url, check=False)

    def json(self, url: str) -> dict:
        r = self.get(url)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def download(self, url: str, dest: Path) -> int:
        """The HTTP status; the body goes to dest."""
        r = self.get(url, "-o", str(dest), "-w", "%{http_code}")
        return int(r.stdout or 0)


@pytest.fixture(scope="module")
def serving(tls_pair, tmp_path_factory):
    """B with its busybox image public, and a private image `<prefix>-priv`."""
    pair = tls_pair
    tmp = tmp_path_factory.mktemp("serving")
    pair.ns.share(tmp)
    b = pair.b
    busybox_fp = b.api("GET", "/1.0/images/aliases/busybox").json()["metadata"]["target"]
    r = b.api("PATCH", f"/1.0/images/{busybox_fp}", json={"public": True})
    assert r.status_code == 200, r.text
    tag = uuid.uuid4().hex[:6]
    priv_path, _ = variant(tmp, "priv" + tag)
    priv_fp = import_image(b, priv_path, f"priv-{tag}", public=False)
    yield pair, tmp, busybox_fp, priv_fp, f"priv-{tag}"
    delete_image(b, priv_fp)


def test_untrusted_sees_public_images_only(serving):
    pair, tmp, busybox_fp, priv_fp, priv_alias = serving
    cli = Untrusted(pair)
    listed = cli.json(f"{pair.url_b}/1.0/images?recursion=1")["metadata"]
    fps = {i["fingerprint"] for i in listed}
    assert busybox_fp in fps and priv_fp not in fps
    assert all(i["public"] for i in listed)
    aliases = {a["name"] for a in cli.json(f"{pair.url_b}/1.0/images/aliases?recursion=1")["metadata"]}
    assert "busybox" in aliases and priv_alias not in aliases
    assert cli.json(f"{pair.url_b}/1.0/images/aliases/busybox")["metadata"]["target"] == busybox_fp
    # The private image and its alias look absent; so does its export.
    assert cli.json(f"{pair.url_b}/1.0/images/{priv_fp}")["error_code"] == 404
    assert cli.json(f"{pair.url_b}/1.0/images/aliases/{priv_alias}")["error_code"] == 404
    assert cli.download(f"{pair.url_b}/1.0/images/{priv_fp}/export", tmp / "x") == 404
    # The public one downloads whole.
    out = tmp / "public.tar.gz"
    assert cli.download(f"{pair.url_b}/1.0/images/{busybox_fp}/export", out) == 200
    assert hashlib.sha256(out.read_bytes()).hexdigest() == busybox_fp
    # Changes are refused.
    r = pair.ns.run("curl", "-sk", "-X", "PATCH", "-d", '{"public": false}',
                    f"{pair.url_b}/1.0/images/{busybox_fp}", check=False)
    assert json.loads(r.stdout)["error_code"] == 403
    r = pair.ns.run("curl", "-sk", "-X", "POST", f"{pair.url_b}/1.0/images/{priv_fp}/secret", check=False)
    assert json.loads(r.stdout)["error_code"] == 403


def test_secret_lets_untrusted_client_fetch_private_image(serving):
    pair, tmp, _, priv_fp, _ = serving
    cli = Untrusted(pair)
    r = pair.b.api("POST", f"/1.0/images/{priv_fp}/secret")
    assert r.status_code == 202, r.text
    secret = r.json()["metadata"]["metadata"]["secret"]
    assert cli.json(f"{pair.url_b}/1.0/images/{priv_fp}?secret=wrong")["error_code"] == 404
    doc = cli.json(f"{pair.url_b}/1.0/images/{priv_fp}?secret={secret}")
    assert doc["metadata"]["fingerprint"] == priv_fp and doc["metadata"]["public"] is False
    out = tmp / "private.tar.gz"
    assert cli.download(f"{pair.url_b}/1.0/images/{priv_fp}/export?secret={secret}", out) == 200
    assert hashlib.sha256(out.read_bytes()).hexdigest() == priv_fp
    # Used once, the token lasts a few seconds more, then it is gone.
    wait_for(lambda: cli.json(f"{pair.url_b}/1.0/images/{priv_fp}?secret={secret}").get("error_code") == 404,
             timeout=15, interval=0.5)


def _tree(cli: Untrusted, url: str) -> tuple[dict, dict]:
    index = cli.json(f"{url}/streams/v1/index.json")
    entry = index["index"]["images"]
    assert entry["datatype"] == "image-downloads" and entry["format"] == "products:1.0"
    return index, cli.json(f"{url}/{entry['path']}")


def _items_by_fp(catalogue: dict) -> dict[str, dict]:
    out = {}
    for product in catalogue["products"].values():
        for version in product["versions"].values():
            for item in version["items"].values():
                if item["ftype"] == "lxd_combined.tar.gz":
                    out[item["sha256"]] = {"item": item, "product": product}
    return out


def test_simplestreams_tree_lists_public_images_and_serves_them(serving):
    pair, tmp, busybox_fp, priv_fp, _ = serving
    cli = Untrusted(pair)
    _, catalogue = _tree(cli, pair.url_b)
    items = _items_by_fp(catalogue)
    assert busybox_fp in items and priv_fp not in items
    assert "busybox" in items[busybox_fp]["product"]["aliases"].split(",")
    item = items[busybox_fp]["item"]
    out = tmp / "ss.tar.gz"
    assert cli.download(f"{pair.url_b}/{item['path']}", out) == 200
    data = out.read_bytes()
    assert len(data) == item["size"] and hashlib.sha256(data).hexdigest() == item["sha256"]
    # Only the files of public images are served.
    name = item["path"].rsplit("/", 1)[-1]
    assert cli.download(f"{pair.url_b}/streams/images/{priv_fp}/{name.replace(busybox_fp, priv_fp)}", out) == 404
    # The tree follows the store: published, the private image appears; private again, it goes.
    r = pair.b.api("PATCH", f"/1.0/images/{priv_fp}", json={"public": True})
    assert r.status_code == 200, r.text
    try:
        assert priv_fp in _items_by_fp(_tree(cli, pair.url_b)[1])
    finally:
        pair.b.api("PATCH", f"/1.0/images/{priv_fp}", json={"public": False})
    assert priv_fp not in _items_by_fp(_tree(cli, pair.url_b)[1])


def _add_simplestreams_remote(pair, name: str) -> None:
    """`lxc remote add NAME URL --protocol simplestreams --public`: the stock client keeps no
    certificate for such a remote, so B's (as `lxc remote add b` accepted it) goes where it looks."""
    a = pair.a
    a.lxc("remote", "remove", name, check=False)
    a.lxc("remote", "add", name, pair.url_b, "--protocol", "simplestreams", "--public", "--accept-certificate")
    certs = Path(a.conf_dir) / "servercerts"
    shutil.copyfile(certs / "b.crt", certs / f"{name}.crt")


def test_stock_client_lists_and_launches_from_the_tree(serving):
    pair, _, busybox_fp, priv_fp, _ = serving
    a = pair.a
    _add_simplestreams_remote(pair, "s")
    listed = json.loads(a.lxc("image", "list", "s:", "--format", "json").stdout)
    by_fp = {i["fingerprint"]: i for i in listed}
    assert busybox_fp in by_fp and priv_fp not in by_fp
    assert "busybox" in {al["name"] for al in by_fp[busybox_fp]["aliases"]}
    info = a.lxc("image", "info", "s:busybox").stdout
    assert busybox_fp in info
    # A launch pulls the image through A's simplestreams client.
    if a.api("GET", f"/1.0/images/{busybox_fp}").status_code == 200:
        delete_image(a, busybox_fp)  # pull it for real (A has the same busybox image)
    name = "c" + uuid.uuid4().hex[:6]
    try:
        a.lxc("launch", "s:busybox", name, timeout=180)
        state = a.api("GET", f"/1.0/instances/{name}/state").json()["metadata"]
        assert state["status"] == "Running"
        assert a.api("GET", f"/1.0/instances/{name}").json()["metadata"]["config"]["volatile.base_image"] == busybox_fp
    finally:
        a.lxc("delete", "-f", name, check=False)


def test_image_copy_push(serving):
    pair, tmp, _, _, _ = serving
    a, b = pair.a, pair.b
    pair.remote_add(a, "a", pair.url_a)  # A's client reaches A over TLS too: the target of the push
    tag = uuid.uuid4().hex[:6]
    pub_path, pub_fp = variant(tmp, "pub" + tag)
    priv_path, priv_fp = variant(tmp, "pp" + tag)
    import_image(b, pub_path, f"pub-{tag}", public=True)
    import_image(b, priv_path, f"pp-{tag}", public=False)
    try:
        # B uploads to A with the token A gave the client. (The stock client names a public image
        # by the alias it was given, which no LXD resolves on this route: name it by fingerprint.)
        a.lxc("image", "copy", f"b:{pub_fp[:12]}", "a:", "--mode", "push", "--copy-aliases")
        img = a.api("GET", f"/1.0/images/{pub_fp}").json()["metadata"]
        assert img["fingerprint"] == pub_fp and img["public"] is False
        assert {al["name"] for al in img["aliases"]} == {f"pub-{tag}"}
        a.lxc("image", "copy", f"b:pp-{tag}", "a:", "--mode", "push", "--public", "--alias", f"x-{tag}")
        img = a.api("GET", f"/1.0/images/{priv_fp}").json()["metadata"]
        assert img["public"] is True and f"x-{tag}" in {al["name"] for al in img["aliases"]}
        # The pushed image is whole: A exports exactly the bytes.
        out = tmp / "pushed"
        with a.http() as c, c.stream("GET", f"/1.0/images/{priv_fp}/export") as r:
            out.write_bytes(b"".join(r.iter_bytes()))
        assert hashlib.sha256(out.read_bytes()).hexdigest() == priv_fp
        # A target reached through its unix socket can't be pushed to: a clear error.
        r = a.lxc("image", "copy", f"b:{priv_fp[:12]}", "local:", "--mode", "push", check=False)
        assert r.returncode != 0 and "https" in r.stderr, r.stderr
    finally:
        for fp in (pub_fp, priv_fp):
            delete_image(a, fp)
            delete_image(b, fp)


def test_push_upload_needs_a_valid_secret(serving):
    """The target side: an untrusted upload gets in with a push token's secret, once."""
    pair, tmp, _, _, _ = serving
    a = pair.a
    path, fp = variant(tmp, "sec" + uuid.uuid4().hex[:6])
    cli = Untrusted(pair)

    def upload(secret: str) -> dict:
        r = pair.ns.run("curl", "-sk", "-X", "POST", "--data-binary", f"@{path}",
                        "-H", "Content-Type: application/octet-stream", "-H", f"X-LXD-fingerprint: {fp}",
                        "-H", f"X-LXD-secret: {secret}", f"{pair.url_a}/1.0/images", check=False)
        return json.loads(r.stdout)

    assert upload("")["error_code"] == 403
    assert upload("0" * 64)["error_code"] == 403
    r = a.api("POST", "/1.0/images", json={"source": {"mode": "push", "fingerprint": fp},
                                           "aliases": [{"name": f"sec-{fp[:8]}"}], "public": True})
    assert r.status_code == 202, r.text
    token = r.json()["metadata"]
    assert token["class"] == "token"
    secret = token["metadata"]["secret"]
    try:
        doc = upload(secret)
        assert doc["type"] == "async", doc
        op = doc["metadata"]
        # The untrusted source waits for its upload with the operation's own secret.
        waited = cli.json(f"{pair.url_a}/1.0/operations/{op['id']}/wait?timeout=30&secret={op['metadata']['secret']}")
        assert waited["metadata"]["status_code"] == 200, waited
        img = a.api("GET", f"/1.0/images/{fp}").json()["metadata"]
        assert img["public"] is True and img["aliases"] == [{"name": f"sec-{fp[:8]}", "description": ""}]
        # The token is used up.
        assert upload(secret)["error_code"] == 403
    finally:
        delete_image(a, fp)


def test_image_copy_relay(serving):
    pair, tmp, _, _, _ = serving
    a, b = pair.a, pair.b
    tag = uuid.uuid4().hex[:6]
    path, fp = variant(tmp, "rel" + tag)
    import_image(b, path, f"rel-{tag}", public=False)
    try:
        # The client downloads from B and uploads to A (a private image, by alias: the client
        # names it by fingerprint then).
        a.lxc("image", "copy", f"b:rel-{tag}", "local:", "--mode", "relay", "--copy-aliases")
        img = a.api("GET", f"/1.0/images/{fp}").json()["metadata"]
        assert img["fingerprint"] == fp and f"rel-{tag}" in {al["name"] for al in img["aliases"]}
        assert fp in fingerprints(a)
    finally:
        delete_image(a, fp)
        delete_image(b, fp)


@pytest.mark.parametrize("rootfs_format", ["squashfs", "tar"])
def test_split_images_in_the_tree(serving, rootfs_format):
    """A split image is an lxd.tar.xz item and a root item carrying the combined fingerprint:
    the stock client lists it by that fingerprint, and A pulls it from the tree whole."""
    from lxd_daemon.imagebuilder.busybox import build_busybox

    pair, tmp, _, _, _ = serving
    a, b = pair.a, pair.b
    out = tmp / f"split-{rootfs_format}-{uuid.uuid4().hex[:6]}"
    out.mkdir()
    built = build_busybox(out, fmt="split", rootfs_format=rootfs_format)
    fp = built.fingerprint
    b.lxc("image", "import", *map(str, built.paths), "--public")
    try:
        _add_simplestreams_remote(pair, "s")
        listed = {i["fingerprint"] for i in json.loads(a.lxc("image", "list", "s:", "--format", "json").stdout)}
        assert fp in listed
        a.lxc("image", "copy", f"s:{fp}", "local:")
        img = a.api("GET", f"/1.0/images/{fp}").json()["metadata"]
        assert img["fingerprint"] == fp
        # Pushed, a split image travels as the two parts of a multipart upload.
        delete_image(a, fp)
        pair.remote_add(a, "a", pair.url_a)
        a.lxc("image", "copy", f"b:{fp}", "a:", "--mode", "push")
        assert a.api("GET", f"/1.0/images/{fp}").json()["metadata"]["fingerprint"] == fp
        # Relayed, it comes down and goes up as two parts through the client.
        delete_image(a, fp)
        a.lxc("image", "copy", f"b:{fp}", "local:", "--mode", "relay")
        assert a.api("GET", f"/1.0/images/{fp}").json()["metadata"]["fingerprint"] == fp
    finally:
        delete_image(a, fp)
        delete_image(b, fp)


def test_streams_export_writes_a_static_tree(serving):
    """`lxd streams export DIR`: the same tree as served, with every file, for a static server."""
    pair, tmp, busybox_fp, priv_fp, _ = serving
    out = tmp / f"www-{uuid.uuid4().hex[:6]}"
    r = pair.b.lxd("streams", "export", str(out))
    assert "Wrote the simplestreams tree" in r.stdout
    index = json.loads((out / "streams/v1/index.json").read_text())
    catalogue = json.loads((out / index["index"]["images"]["path"]).read_text())
    assert catalogue["products"] == _tree(Untrusted(pair), pair.url_b)[1]["products"]
    items = _items_by_fp(catalogue)
    assert busybox_fp in items and priv_fp not in items
    for product in catalogue["products"].values():
        for version in product["versions"].values():
            for item in version["items"].values():
                data = (out / item["path"]).read_bytes()
                assert len(data) == item["size"] and hashlib.sha256(data).hexdigest() == item["sha256"]


def test_push_refuses_a_target_with_another_certificate(serving):
    """The source pins the target's certificate: a target that shows another one gets nothing."""
    pair, _, busybox_fp, _, _ = serving
    wrong = (Path(pair.a.conf_dir) / "servercerts" / "b.crt").read_text()  # B's, not A's
    r = pair.b.api("POST", f"/1.0/images/{busybox_fp}/export",
                   json={"target": pair.url_a, "secret": "0" * 64, "certificate": wrong})
    assert r.status_code == 202, r.text
    op = wait_op(pair.b, r)
    assert op["status_code"] == 400 and "certificate" in op["err"], op
    r = pair.b.api("POST", f"/1.0/images/{busybox_fp}/export", json={"target": "http://unix.socket", "secret": "x"})
    assert r.status_code == 400 and "https" in r.json()["error"]


# -- LXD 5.0.2 as the client of our image server ---------------------------------------------------


@pytest.fixture(scope="module")
def lxd502(serving, tmp_path_factory):
    """Debian's LXD 5.0.2 with a dir pool, in the pair's network namespace (so that it reaches B's
    loopback address), with its `lxc` run there too."""

    pair = serving[0]
    daemons, wd = lxd502_setup(tmp_path_factory, "lxd502")
    d = daemons.Daemon("lxd", "LXD 5.0.2", daemons.DEBIAN_LXD, wd, uuid.uuid4().hex[:6], netns=str(pair.ns.path))
    try:
        d.start()
        d.preseed("default")

        def lxc(*args: str, check: bool = True) -> subprocess.CompletedProcess:
            r = subprocess.run(["nsenter", f"--net={pair.ns.path}", daemons.LXC, *args], env=d.env,
                               capture_output=True, text=True, timeout=300)
            if check and r.returncode != 0:
                raise AssertionError(f"LXD 5.0.2: lxc {' '.join(args)} failed: {r.stderr}{r.stdout}")
            return r

        d.lxc_ns = lxc
        yield d
    finally:
        try:
            d.stop()
        finally:
            daemons.cleanup(wd, log=lambda *_: None)


def test_lxd502_pulls_public_images_from_ours(serving, lxd502):
    """LXD 5.0.2 uses B as an untrusted lxd-protocol image server and as a simplestreams server."""
    pair, _, busybox_fp, priv_fp, priv_alias = serving
    lxc = lxd502.lxc_ns
    lxc("remote", "add", "b", pair.url_b, "--public", "--accept-certificate")
    listed = {i["fingerprint"] for i in json.loads(lxc("image", "list", "b:", "--format", "json").stdout)}
    assert busybox_fp in listed and priv_fp not in listed
    assert lxc("image", "info", f"b:{priv_alias}", check=False).returncode != 0
    lxc("image", "copy", "b:busybox", "local:", "--alias", "from-ours")
    got = json.loads(lxc("image", "list", "local:", "--format", "json").stdout)
    assert busybox_fp in {i["fingerprint"] for i in got}
    lxc("image", "delete", busybox_fp)
    # The simplestreams tree, by alias.
    lxc("remote", "add", "s", pair.url_b, "--protocol", "simplestreams", "--public")
    certs = lxd502.conf_dir / "servercerts"
    shutil.copyfile(certs / "b.crt", certs / "s.crt")
    lxc("image", "copy", "s:busybox", "local:", "--alias", "from-tree")
    got = {i["fingerprint"]: i for i in json.loads(lxc("image", "list", "local:", "--format", "json").stdout)}
    assert busybox_fp in got and got[busybox_fp]["properties"].get("os")


def test_push_between_lxd502_and_ours(serving, lxd502):
    """Push mode across implementations: LXD 5.0.2 uploads to ours with the token as an untrusted
    client, and ours uploads to LXD 5.0.2."""
    pair, tmp, _, _, _ = serving
    a, b = pair.a, pair.b
    port = int(pair.ns.run("/usr/bin/python3", "-c", "import socket; s = socket.socket(); "
                           "s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])").stdout)
    lxc = lxd502.lxc_ns
    lxc("config", "set", "core.https_address", f"127.0.0.1:{port}")
    lxc("config", "set", "core.trust_password", pair.password)
    pair.remote_add(a, "l", f"https://127.0.0.1:{port}")
    pair.remote_add(a, "a", pair.url_a)
    tag = uuid.uuid4().hex[:6]
    from_lxd, lxd_fp = variant(tmp, "fl" + tag)
    from_ours, ours_fp = variant(tmp, "fo" + tag)
    lxc("image", "import", str(from_lxd), "--alias", f"fl-{tag}")
    import_image(b, from_ours, f"fo-{tag}", public=False)
    try:
        a.lxc("image", "copy", f"l:fl-{tag}", "a:", "--mode", "push", "--alias", f"gotl-{tag}")
        img = a.api("GET", f"/1.0/images/{lxd_fp}").json()["metadata"]
        assert img["fingerprint"] == lxd_fp and f"gotl-{tag}" in {al["name"] for al in img["aliases"]}
        a.lxc("image", "copy", f"b:fo-{tag}", "l:", "--mode", "push")
        got = {i["fingerprint"] for i in json.loads(lxc("image", "list", "local:", "--format", "json").stdout)}
        assert ours_fp in got
    finally:
        delete_image(a, lxd_fp)
        delete_image(b, ours_fp)
        lxc("image", "delete", lxd_fp, check=False)
        lxc("image", "delete", ours_fp, check=False)
