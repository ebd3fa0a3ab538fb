"""Every route of the running daemon, walked over TLS by untrusted clients: one without a client
certificate and one with a certificate the daemon does not know. Both reach LXD's public list only;
everything else is a 403 given before its handler (api/access.py). The route list is the daemon's
own declarations (the same tables the daemon serves; tests/unit/test_access.py checks that list
against LXD's public list)."""

from __future__ import annotations

import asyncio
import datetime
import json
import re
import socket
import ssl

import httpx
import pytest
import websockets

from lxd_daemon.api.access import Access, routes_of
from lxd_daemon.app import create_app
from tests.helpers import bare_services
from tests.unit.test_access import PUBLIC, all_tables, concrete


def self_signed(tmp_path, cn: str = "stranger"):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA384()))
    crt, pem = tmp_path / f"{cn}.crt", tmp_path / f"{cn}.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    return crt, pem


def client_context(cert=None) -> ssl.SSLContext:
    """Accepts the daemon's self-signed certificate; presents `cert` (crt, key) if given."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if cert:
        ctx.load_cert_chain(*map(str, cert))
    return ctx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def https(daemon):
    """The shared daemon listening on a loopback TLS port for this module."""
    port = free_port()
    r = daemon.api("PATCH", "/1.0", json={"config": {"core.https_address": f"127.0.0.1:{port}"}})
    assert r.status_code == 200, r.text
    yield f"https://127.0.0.1:{port}"
    daemon.api("PATCH", "/1.0", json={"config": {"core.https_address": ""}})


def declared():
    app = create_app(services=bare_services(), routers=all_tables())
    out = []
    for route in routes_of(app.routes):
        for method, ep in vars(route).get("lxd_access", {}).items():
            if method != "HEAD":
                out.append((method, route.path, ep.access))
    return out


@pytest.mark.parametrize("with_cert", [False, True], ids=["no-certificate", "unknown-certificate"])
def test_untrusted_clients_reach_only_the_public_list(https, tmp_path, with_cert):
    cert = self_signed(tmp_path) if with_cert else None
    routes = declared()
    assert len(routes) > 120
    refused, public = {}, {}
    with httpx.Client(base_url=https, verify=client_context(cert), timeout=30) as c:
        for method, path, access in routes:
            if method == "WEBSOCKET":
                continue
            r = c.request(method, concrete(path), content=b"{}")
            if access in (Access.TRUSTED, Access.ADMIN, Access.LOCAL, Access.METRICS):
                refused[(method, path)] = (r.status_code, r.json().get("error"))
            else:
                public[(method, path)] = r.status_code
        # The public list answers (GET /1.0 as untrusted; GUARDED routes narrow: see below).
        doc = c.get("/1.0").json()["metadata"]
        assert doc["auth"] == "untrusted"
        assert "config" not in doc or not doc["config"]
        assert c.get("/").json()["metadata"] == ["/1.0"]
        assert c.get("/1.0/images").json()["metadata"] == [] or all(
            c.get(u).json()["metadata"]["public"] for u in c.get("/1.0/images").json()["metadata"])
    wrong = {k: v for k, v in refused.items() if v != (403, "not authorized")}
    assert not wrong, wrong
    assert len(refused) > 100
    assert all(code != 403 or (m, p) in PUBLIC for (m, p), code in public.items())

    async def sockets():
        ctx = client_context(cert)
        codes = {}
        for method, path, _access in routes:
            if method != "WEBSOCKET":
                continue
            url = https.replace("https", "wss") + concrete(path)
            try:
                async with websockets.connect(url, ssl=ctx, open_timeout=10):
                    codes[path] = 101
            except websockets.exceptions.InvalidStatus as e:
                codes[path] = e.response.status_code
        return codes

    codes = asyncio.run(sockets())
    assert codes["/1.0/events"] == 403
    # The operation websocket is GUARDED: an unknown operation or a wrong secret is refused too.
    assert codes["/1.0/operations/{op_id}/websocket"] in (403, 404)
    assert set(codes.values()) <= {403, 404}


def test_untrusted_sees_no_private_image_and_no_server_config(https, ready):
    """The untrusted view of what is public: no private image or alias, no config, no environment
    beyond what LXD shows untrusted clients."""
    with httpx.Client(base_url=https, verify=False, timeout=30) as c:
        images = c.get("/1.0/images?recursion=1").json()["metadata"]
        assert all(i["public"] for i in images)
        aliases = c.get("/1.0/images/aliases?recursion=1").json()["metadata"]
        private = [a for a in ready.api("GET", "/1.0/images/aliases?recursion=1").json()["metadata"]
                   if not ready.api("GET", f"/1.0/images/{a['target']}").json()["metadata"]["public"]]
        assert private, "the busybox image is private in the shared daemon"
        assert not {a["name"] for a in private} & {a["name"] for a in aliases}
        for a in private:
            assert c.get(f"/1.0/images/aliases/{a['name']}").status_code == 404
            assert c.get(f"/1.0/images/{a['target']}").status_code == 404
            assert c.get(f"/1.0/images/{a['target']}/export").status_code == 404
        doc = c.get("/1.0").json()["metadata"]
        text = json.dumps(doc)
        assert "core.https_address" not in text and not re.search(r"trust_password", text)
