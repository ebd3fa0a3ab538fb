"""util/tlspin.py: a pinned client context accepts exactly the given certificate, for blocking
sockets (image push) and for asyncio/httpx connections (image pulls) alike."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading

import pytest

from lxd_daemon.errors import BadRequest
from lxd_daemon.server.tls import _self_signed
from lxd_daemon.util import tlspin


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A TLS server on 127.0.0.1 that answers each connection with b"ok"."""
    d = tmp_path_factory.mktemp("pin")
    pem, key, _ = _self_signed("pinned")
    (d / "s.crt").write_bytes(pem)
    (d / "s.key").write_bytes(key)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(d / "s.crt", d / "s.key")
    lsock = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve():
        lsock.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = lsock.accept()
            except TimeoutError:
                continue
            try:
                with ctx.wrap_socket(conn, server_side=True) as s:
                    s.sendall(b"ok")
            except (ssl.SSLError, OSError):
                pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield lsock.getsockname()[1], pem.decode()
    stop.set()
    t.join(5)
    lsock.close()


def test_the_pinned_certificate_is_accepted_and_another_refused_on_a_socket(server):
    port, pem = server
    with socket.create_connection(("127.0.0.1", port)) as raw:
        with tlspin.client_context(pem).wrap_socket(raw) as s:
            assert s.recv(2) == b"ok"
    other = _self_signed("other")[0].decode()
    with socket.create_connection(("127.0.0.1", port)) as raw:
        with pytest.raises(tlspin.PinMismatch, match="not the expected one"):
            tlspin.client_context(other, what="target server").wrap_socket(raw)


def test_the_pin_holds_for_asyncio_connections(server):
    port, pem = server
    other = _self_signed("other")[0].decode()

    async def fetch(cert):
        r, w = await asyncio.open_connection("127.0.0.1", port, ssl=tlspin.client_context(cert))
        try:
            return await r.read(2)
        finally:
            w.close()

    assert asyncio.run(fetch(pem)) == b"ok"
    with pytest.raises(ssl.SSLError, match="not the expected one"):
        asyncio.run(fetch(other))


def test_no_certificate_means_the_system_cas_and_a_bad_one_is_a_400(server):
    port, _ = server
    ctx = tlspin.client_context("")
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    with socket.create_connection(("127.0.0.1", port)) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):
            ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    with pytest.raises(BadRequest, match="Invalid image server certificate"):
        tlspin.client_context("not a certificate", what="image server")
