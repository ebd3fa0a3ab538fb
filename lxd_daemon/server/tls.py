"""The TLS server context: TLS 1.2+, AEAD ciphers, and a client certificate requested and accepted
whatever it is (trust is decided per request, by the certificate's fingerprint, in api.access).

Python's `ssl` module cannot ask for a client certificate without verifying it against CAs
(CERT_OPTIONAL aborts the handshake for an unknown self-signed certificate, CERT_NONE does not ask).
So the context's `SSL_CTX*` gets OpenSSL's own `SSL_CTX_set_verify(SSL_VERIFY_PEER, accept-all)`
through ctypes. That relies on CPython's private `PySSLContext` layout (the `SSL_CTX*` right after
the object header) and on `_ssl` being a shared module linked to libssl; both are checked before the
pointer is used, and `self_test()` proves the whole chain with in-memory handshakes: a context that
fails any check is never served (fail closed).
"""

from __future__ import annotations

import ctypes
import datetime
import functools
import logging
import ssl
import sys
import warnings
from pathlib import Path

log = logging.getLogger("lxd.tls")

# CPython versions whose PySSLContext starts with `SSL_CTX *ctx` (checked at run time as well).
_PINNED_PYTHON = ((3, 11), (3, 12), (3, 13))
_SSL_VERIFY_PEER = 0x01
# TLS 1.2 suites: forward secrecy and AEAD only (TLS 1.3 suites are all AEAD).
_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:!SHA1:!SHA256:!SHA384"

_VERIFY_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p)


def _accept_any(preverify_ok: int, store_ctx: int) -> int:
    return 1


# One callback object for the process's lifetime: OpenSSL keeps a raw pointer to it.
_ACCEPT_ANY = _VERIFY_CB(_accept_any)


class TLSUnavailable(Exception):
    """The TLS endpoint cannot be served safely on this host (the reason is the message)."""


@functools.cache
def _libssl():
    """The libssl functions, found through `_ssl` (a shared module linked to libssl)."""
    path = getattr(ssl._ssl, "__file__", None)  # noqa: SLF001
    if not path:
        raise TLSUnavailable("the _ssl module is built into the interpreter, not a shared module")
    lib = ctypes.CDLL(path)
    try:
        lib.SSL_CTX_set_verify.argtypes = [ctypes.c_void_p, ctypes.c_int, _VERIFY_CB]
        lib.SSL_CTX_set_verify.restype = None
        lib.SSL_CTX_get_verify_mode.argtypes = [ctypes.c_void_p]
        lib.SSL_CTX_get_verify_mode.restype = ctypes.c_int
        lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
        lib.SSL_CTX_get_options.restype = ctypes.c_uint64
        lib.OpenSSL_version_num.argtypes = []
        lib.OpenSSL_version_num.restype = ctypes.c_ulong
    except AttributeError as e:
        raise TLSUnavailable(f"libssl lacks a function the TLS endpoint needs: {e}") from None
    if lib.OpenSSL_version_num() != ssl.OPENSSL_VERSION_NUMBER:
        raise TLSUnavailable(f"libssl {lib.OpenSSL_version_num():#x} is not the one _ssl was built with "
                             f"({ssl.OPENSSL_VERSION_NUMBER:#x})")
    return lib


def _ctx_pointer(ctx: ssl.SSLContext) -> int:
    """The context's `SSL_CTX*`, read from the PySSLContext object and cross-checked."""
    if sys.version_info[:2] not in _PINNED_PYTHON:
        raise TLSUnavailable(f"Python {sys.version_info[0]}.{sys.version_info[1]} is not a version "
                             "whose ssl internals the TLS endpoint was checked against")
    lib = _libssl()
    ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not ptr:
        raise TLSUnavailable("could not find the OpenSSL context of an ssl.SSLContext")
    # Two distinct option sets must read back through the pointer as Python sees them.
    original = ctx.options
    for options in (original ^ ssl.OP_NO_TICKET, original):
        ctx.options = options
        if lib.SSL_CTX_get_options(ptr) != int(ctx.options):
            raise TLSUnavailable("the OpenSSL context of an ssl.SSLContext is not where expected")
    return ptr


def request_any_client_cert(ctx: ssl.SSLContext) -> None:
    """Make ctx ask every client for a certificate and accept whichever it sends (or none).
    Never set ctx.verify_mode afterwards: that resets OpenSSL's callback."""
    ptr = _ctx_pointer(ctx)
    lib = _libssl()
    lib.SSL_CTX_set_verify(ptr, _SSL_VERIFY_PEER, _ACCEPT_ANY)
    if lib.SSL_CTX_get_verify_mode(ptr) != _SSL_VERIFY_PEER:
        raise TLSUnavailable("setting the client certificate request on the OpenSSL context failed")


def _base_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    # No session tickets: the stock client resumes no session (each command's connections all make
    # full handshakes), and a TLS 1.3 ticket holds the client certificate: making two of them took
    # a quarter of the server's handshake time (0.34 of 1.39 ms with a P-384 client certificate).
    ctx.num_tickets = 0
    ctx.options |= ssl.OP_NO_TICKET
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def make_context(certfile: Path, keyfile: Path) -> ssl.SSLContext:
    ctx = _base_context()
    ctx.load_cert_chain(str(certfile), str(keyfile))
    request_any_client_cert(ctx)
    return ctx


def server_context(lxd_dir: Path) -> ssl.SSLContext:
    """The context of the daemon's TLS listener ($LXD_DIR/server.crt and server.key), after the
    self-test passed; TLSUnavailable (the reason) otherwise."""
    lxd_dir = Path(lxd_dir)
    try:
        ctx = make_context(lxd_dir / "server.crt", lxd_dir / "server.key")
    except (OSError, ssl.SSLError) as e:
        raise TLSUnavailable(f"cannot load the server key pair: {e}") from None
    self_test(ctx)
    return ctx


# -- the self-test ------------------------------------------------------------------------------

def _self_signed(cn: str) -> tuple[bytes, bytes, bytes]:
    """(certificate PEM, key PEM, certificate DER) of a throwaway self-signed certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(cn)]), critical=False)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()),
            cert.public_bytes(serialization.Encoding.DER))


def _client_context(cert: tuple[bytes, bytes] | None, version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    import tempfile

    c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    c.check_hostname = False
    c.verify_mode = ssl.CERT_NONE
    if version is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.1: offered on purpose
            c.minimum_version = c.maximum_version = version
        if version < ssl.TLSVersion.TLSv1_2:
            c.set_ciphers("DEFAULT:@SECLEVEL=0")  # so that the client really offers it
    if cert is not None:
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "c.crt").write_bytes(cert[0])
            (Path(d) / "c.key").write_bytes(cert[1])
            c.load_cert_chain(str(Path(d) / "c.crt"), str(Path(d) / "c.key"))
    return c


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> tuple[bytes | None, str | None]:
    """An in-memory handshake; (the certificate the server saw, the TLS version), or SSLError."""
    s_in, s_out, c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client = client_ctx.wrap_bio(c_in, c_out, server_side=False)
    done = {"s": False, "c": False}
    for _ in range(20):
        for name, obj in (("c", client), ("s", server)):
            if not done[name]:
                try:
                    obj.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if done["s"] and done["c"]:
            # TLS 1.3: the client's certificate is processed once the server reads its Finished.
            client.write(b"x")
            s_in.write(c_out.read())
            if server.read(1) != b"x":
                raise ssl.SSLError("no data after the handshake")
            return server.getpeercert(binary_form=True), server.version()
    raise ssl.SSLError("the handshake did not complete")


def self_test(ctx: ssl.SSLContext) -> None:
    """Prove the context does what the endpoint relies on, or raise TLSUnavailable:
    an unknown self-signed client certificate completes the handshake and is seen (TLS 1.2 and
    1.3), no certificate completes it too, and TLS 1.1 is refused."""
    pem, key, der = _self_signed("lxd-self-test")
    try:
        for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            seen, _ = handshake(ctx, _client_context((pem, key), version))
            if seen != der:
                raise TLSUnavailable(f"the self-test's client certificate was not seen ({version.name})")
        seen, _ = handshake(ctx, _client_context(None))
        if seen is not None:
            raise TLSUnavailable("a certificate was seen where the client sent none")
    except ssl.SSLError as e:
        raise TLSUnavailable(f"self-test handshake failed: {e}") from None
    try:
        old = _client_context(None, ssl.TLSVersion.TLSv1_1)
    except (ValueError, ssl.SSLError):
        return  # this OpenSSL cannot even offer TLS 1.1
    try:
        handshake(ctx, old)
    except ssl.SSLError:
        return
    raise TLSUnavailable("a TLS 1.1 handshake was accepted")
