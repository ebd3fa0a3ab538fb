"""The TLS context (server/tls.py) and the listener (server/https.py), in process on 127.0.0.1:
any client certificate is requested and accepted, TLS < 1.2 and non-AEAD suites are refused, the
start-up self-test fails closed, the peer certificate reaches HTTP and websocket scopes, revoking
a fingerprint closes its websockets, and a failed move keeps the old listener."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import ssl
import threading
import types
import urllib.request
from pathlib import Path

import pytest

from lxd_daemon.errors import BadRequest
from lxd_daemon.server import https, tls
from lxd_daemon.trust.certs import ensure_server_cert


@pytest.fixture(scope="module")
def keypair(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tlskeys")
    ensure_server_cert(d)
    return d


@pytest.fixture(scope="module")
def client_cert() -> tuple[bytes, bytes, bytes]:
    return tls._self_signed("unit-client")


def test_handshakes_with_any_client_certificate(keypair, client_cert):
    ctx = tls.server_context(keypair)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    pem, key, der = client_cert
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        seen, got = tls.handshake(ctx, tls._client_context((pem, key), version))
        assert seen == der
        assert got == {"TLSv1_2": "TLSv1.2", "TLSv1_3": "TLSv1.3"}[version.name]
    assert tls.handshake(ctx, tls._client_context(None))[0] is None


def test_no_session_tickets_are_made(keypair, client_cert):
    """Clients make full handshakes anyway; a ticket would only cost the server its making."""
    ctx = tls.server_context(keypair)
    assert ctx.num_tickets == 0 and ctx.options & ssl.OP_NO_TICKET
    s_in, s_out, c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    server = ctx.wrap_bio(s_in, s_out, server_side=True)
    client = tls._client_context(client_cert).wrap_bio(c_in, c_out, server_side=False)
    for _ in range(10):
        for end in (client, server):
            try:
                end.do_handshake()
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    client.write(b"x")
    s_in.write(c_out.read())
    assert server.read(1) == b"x"
    server.write(b"y")
    c_in.write(s_out.read())
    assert client.read(1) == b"y"
    assert client.session is None or not client.session.has_ticket


def test_old_versions_and_weak_suites_are_refused(keypair):
    ctx = tls.server_context(keypair)
    try:
        old = tls._client_context(None, ssl.TLSVersion.TLSv1_1)
    except (ValueError, ssl.SSLError):
        old = None
    if old is not None:
        with pytest.raises(ssl.SSLError, match="UNSUPPORTED_PROTOCOL|unsupported protocol"):
            tls.handshake(ctx, old)
        # The same client gets TLS 1.1 from a server that allows it: the refusal above is ours.
        permissive = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        permissive.set_ciphers("DEFAULT:@SECLEVEL=0")
        with pytest.warns(DeprecationWarning):
            permissive.minimum_version = ssl.TLSVersion.TLSv1
        permissive.load_cert_chain(keypair / "server.crt", keypair / "server.key")
        assert tls.handshake(permissive, tls._client_context(None, ssl.TLSVersion.TLSv1_1))[1] == "TLSv1.1"
    weak = tls._client_context(None, ssl.TLSVersion.TLSv1_2)
    weak.set_ciphers("ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA")
    with pytest.raises(ssl.SSLError):
        tls.handshake(ctx, weak)


def test_the_stock_ssl_module_cannot_do_it(keypair, client_cert):
    """Why tls.py exists: CERT_OPTIONAL aborts the handshake of an unknown client certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(keypair / "server.crt", keypair / "server.key")
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.load_verify_locations(keypair / "server.crt")
    with pytest.raises(ssl.SSLError):
        tls.handshake(ctx, tls._client_context(client_cert[:2], ssl.TLSVersion.TLSv1_2))


def test_self_test_fails_closed(keypair, tmp_path, monkeypatch):
    (tmp_path / "server.crt").write_bytes((keypair / "server.crt").read_bytes())
    (tmp_path / "server.key").write_text("not a key\n")
    with pytest.raises(tls.TLSUnavailable, match="key pair"):
        tls.server_context(tmp_path)
    # An interpreter whose ssl internals were not checked: refused before the pointer is used.
    monkeypatch.setattr(tls, "_PINNED_PYTHON", ())
    with pytest.raises(tls.TLSUnavailable, match="not a version"):
        tls.server_context(keypair)
    # A context that does not ask for client certificates fails the self-test.
    monkeypatch.undo()
    plain = tls._base_context()
    plain.load_cert_chain(keypair / "server.crt", keypair / "server.key")
    with pytest.raises(tls.TLSUnavailable, match="not seen"):
        tls.self_test(plain)


def test_server_certificate_names():
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(ensure_server_cert_tmp().encode())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName)[0] == socket.gethostname()
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in eku


def ensure_server_cert_tmp() -> str:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        return ensure_server_cert(Path(d))


@pytest.mark.parametrize(("value", "want"), [
    ("127.0.0.1", ("127.0.0.1", 8443)),
    ("127.0.0.1:9443", ("127.0.0.1", 9443)),
    (":9443", ("", 9443)),
    ("[::]", ("::", 8443)),
    ("[::]:8444", ("::", 8444)),
    ("[::1]:8444", ("::1", 8444)),
    ("::1", ("::1", 8443)),
    ("0.0.0.0", ("0.0.0.0", 8443)),
    ("lxd.example.org:443", ("lxd.example.org", 443)),
])
def test_parse_address(value, want):
    assert https.parse_address(value) == want


@pytest.mark.parametrize("value", ["127.0.0.1:0", "127.0.0.1:65536", "[::1", "[::1]x", "[nothost]:1",
                                   "1:2:3", "a b:1", "host:port", "-bad-:1"])
def test_parse_address_refuses(value):
    with pytest.raises(ValueError):
        https.parse_address(value)


# -- the listener, in process --------------------------------------------------------------------

async def _echo(scope, receive, send):
    """Says what the listener and the Gate put into the scope."""
    info = {"peer": hashlib.sha256(scope["lxd_peer_cert"]).hexdigest() if scope["lxd_peer_cert"] else None,
            "fingerprint": scope["lxd_fingerprint"], "protocol": scope["lxd_protocol"],
            "trusted": scope["lxd_trusted"]}
    if scope["type"] == "http":
        body = json.dumps(info).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
        return
    assert (await receive())["type"] == "websocket.connect"
    await send({"type": "websocket.accept"})
    await send({"type": "websocket.send", "text": json.dumps(info)})
    while (await receive())["type"] != "websocket.disconnect":
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _services(lxd_dir: Path):
    server = types.SimpleNamespace(addresses=[], invalidate=lambda: None,
                                   config=types.SimpleNamespace(get=lambda key: ""), appliers={})
    return types.SimpleNamespace(lxd_dir=lxd_dir, app=_echo, server=server, trust=None, debug=False,
                                 startup_hooks=[], exit_hooks=[])


def _client_ctx(cert_dir: Path | None) -> ssl.SSLContext:
    c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    c.check_hostname = False
    c.verify_mode = ssl.CERT_NONE
    if cert_dir is not None:
        c.load_cert_chain(cert_dir / "c.crt", cert_dir / "c.key")
    return c


def test_listener_scopes_revoke_and_moves(keypair, client_cert, tmp_path):
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    pem, key, der = client_cert
    (tmp_path / "c.crt").write_bytes(pem)
    (tmp_path / "c.key").write_bytes(key)
    fp = hashlib.sha256(der).hexdigest()
    port, other = _free_port(), _free_port()

    def get(url: str, cert: bool) -> dict:
        with urllib.request.urlopen(url, context=_client_ctx(tmp_path if cert else None), timeout=10) as r:
            return json.loads(r.read())

    def websocket_revoked(listener, loop) -> tuple[dict, float]:
        with connect(f"wss://127.0.0.1:{port}/ws", ssl=_client_ctx(tmp_path), open_timeout=10) as ws:
            first = json.loads(ws.recv(timeout=10))
            t = loop.time()
            loop.call_soon_threadsafe(listener.revoke, fp)
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=5)
            assert closed.value.rcvd is None or closed.value.rcvd.code == 1008
            return first, loop.time() - t

    async def main():
        services = _services(keypair)
        await https.setup(services)
        listener = services.https
        assert services.server.appliers[https.KEY] == listener.apply
        await listener.apply(None, f"127.0.0.1:{port}")
        assert services.server.addresses == [f"127.0.0.1:{port}"]
        with_cert = await asyncio.to_thread(get, f"https://127.0.0.1:{port}/", True)
        assert with_cert == {"peer": fp, "fingerprint": fp, "protocol": "tls", "trusted": False}
        without = await asyncio.to_thread(get, f"https://127.0.0.1:{port}/", False)
        assert without["peer"] is None and without["fingerprint"] == ""
        loop = asyncio.get_running_loop()
        first, took = await asyncio.to_thread(websocket_revoked, listener, loop)
        assert first["peer"] == fp and first["protocol"] == "tls"
        assert took < 2
        assert fp not in listener.by_fingerprint
        # A bind that fails (the port is taken) keeps the old listener.
        blocker = socket.socket()
        blocker.bind(("127.0.0.1", other))
        blocker.listen()
        try:
            with pytest.raises(BadRequest, match="Cannot listen on"):
                await listener.apply(f"127.0.0.1:{port}", f"127.0.0.1:{other}")
        finally:
            blocker.close()
        assert (await asyncio.to_thread(get, f"https://127.0.0.1:{port}/", True))["peer"] == fp
        # Moving ends what the old listener accepted: an open websocket is closed at once.
        opened, closed = threading.Event(), {}

        def hold_websocket() -> None:
            with connect(f"wss://127.0.0.1:{port}/ws", ssl=_client_ctx(None), open_timeout=10) as ws:
                ws.recv(timeout=10)
                opened.set()
                try:
                    ws.recv(timeout=10)
                except ConnectionClosed as e:
                    closed["code"] = e.rcvd.code if e.rcvd else None

        holder = asyncio.ensure_future(asyncio.to_thread(hold_websocket))
        await asyncio.to_thread(opened.wait, 10)
        await listener.apply(f"127.0.0.1:{port}", f"127.0.0.1:{other}")
        await asyncio.wait_for(holder, 5)
        assert closed == {"code": 1012}
        assert (await asyncio.to_thread(get, f"https://127.0.0.1:{other}/", False))["peer"] is None
        with pytest.raises(OSError):
            await asyncio.to_thread(get, f"https://127.0.0.1:{port}/", False)
        await listener.apply(f"127.0.0.1:{other}", None)
        assert services.server.addresses == []
        with pytest.raises(OSError):
            await asyncio.to_thread(get, f"https://127.0.0.1:{other}/", False)
        await listener.close()

    asyncio.run(main())


def test_listener_fails_closed(keypair, tmp_path, monkeypatch):
    """No TLS unless every check passes: a broken key pair or unchecked uvicorn refuses the
    config change (400) and nothing listens."""
    from lxd_daemon.server.tls import TLSUnavailable

    https.check_uvicorn()
    (tmp_path / "server.crt").write_bytes((keypair / "server.crt").read_bytes())
    (tmp_path / "server.key").write_text("garbage\n")
    port = _free_port()

    async def main(lxd_dir: Path, match: str):
        services = _services(lxd_dir)
        await https.setup(services)
        with pytest.raises(BadRequest, match=match):
            await services.https.apply(None, f"127.0.0.1:{port}")
        assert services.https.server is None and services.server.addresses == []
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0

    asyncio.run(main(tmp_path, "Cannot serve HTTPS: cannot load the server key pair"))
    monkeypatch.setattr(https, "_UVICORN", ((0, 0), (0, 1)))
    with pytest.raises(TLSUnavailable):
        https.check_uvicorn()
    asyncio.run(main(keypair, "Cannot serve HTTPS: uvicorn"))


def test_wildcard_addresses_are_the_hosts():
    v4 = asyncio.run(https.host_addresses("0.0.0.0", 8443))
    both = asyncio.run(https.host_addresses("::", 8443))
    assert set(v4) <= set(both)
    for a in both:
        assert a.endswith(":8443") and not a.startswith(("127.", "[::1]", "[fe80"))
    assert all("[" not in a for a in v4)
    assert asyncio.run(https.host_addresses("::1", 9)) == ["[::1]:9"]
