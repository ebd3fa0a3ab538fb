"""TLS client contexts for connections to other servers (image servers, push targets), with the
peer's certificate pinned.

Given a certificate (PEM, as `source.certificate` or an image push's `certificate` carries it),
the handshake accepts exactly that certificate, compared byte for byte as soon as the handshake
ends and before a byte of the request is sent, whatever its names or issuer: LXD's remotes are
self-signed. Without one, the system CAs and the host name are checked as usual.
"""

from __future__ import annotations

import hashlib
import ssl

from lxd_daemon.errors import BadRequest


class PinMismatch(ssl.SSLError):
    pass


def _check(obj, expected: bytes, what: str) -> None:
    got = obj.getpeercert(binary_form=True)
    if got != expected:
        seen = hashlib.sha256(got).hexdigest() if got else "none"
        raise PinMismatch(f"The {what}'s certificate is not the expected one (sha256 {seen})")


def client_context(certificate: str, *, what: str = "server") -> ssl.SSLContext:
    """A client context that accepts only `certificate` (PEM), or the system CAs when it is empty.
    Works for asyncio/httpx (SSLObject) and blocking sockets (SSLSocket) alike."""
    if not certificate.strip():
        ctx = ssl.create_default_context()
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx
    try:
        expected = ssl.PEM_cert_to_DER_cert(certificate.strip())
    except ValueError:
        raise BadRequest(f"Invalid {what} certificate: not a PEM certificate") from None

    class PinnedObject(ssl.SSLObject):
        def do_handshake(self) -> None:
            super().do_handshake()
            _check(self, expected, what)

    class PinnedSocket(ssl.SSLSocket):
        def do_handshake(self, block: bool = False) -> None:
            super().do_handshake(block)
            _check(self, expected, what)

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the pin is the whole check: exactly this certificate
    ctx.sslobject_class = PinnedObject
    ctx.sslsocket_class = PinnedSocket
    return ctx
