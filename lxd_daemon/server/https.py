"""The TLS listener on `core.https_address`: started at start-up, moved or stopped when the key
changes (no restart), serving `access.Gate(services.app, services, "tls")`.

uvicorn's protocols are subclassed to put the client's certificate (DER, or None) into every HTTP
and websocket scope as `lxd_peer_cert`, before the Gate decides trust. Connections that presented a
certificate are kept by its fingerprint, so that revoking it (`services.trust.on_revoke`) closes that
client's websockets (events, exec, console) and ends its other connections after their request.

Moving or stopping the listener also ends the connections it accepted: websockets at once, other
connections after the request in progress (so a client that moved it over TLS gets its answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import logging
import socket

from lxd_daemon.errors import BadRequest
from lxd_daemon.server.config import Key, register

log = logging.getLogger("lxd.https")

KEY = "core.https_address"
DEFAULT_PORT = 8443
BACKLOG = 1024


# -- the address --------------------------------------------------------------------------------

def parse_address(value: str) -> tuple[str, int]:
    """(host, port) of an LXD listen address: `HOST`, `HOST:PORT`, `[V6]`, `[V6]:PORT`, `:PORT`,
    or a bare IPv6 address; the port defaults to 8443, an empty host means every address."""
    value = value.strip()
    host, port = value, ""
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise ValueError(f"invalid address {value!r}: missing ']'")
        host, rest = value[1:end], value[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"invalid address {value!r}")
            port = rest[1:]
        with contextlib.suppress(ValueError):
            ipaddress.IPv6Address(host)
            return host, _port(value, port)
        raise ValueError(f"invalid address {value!r}: {host!r} is not an IPv6 address")
    if value.count(":") > 1:
        try:
            ipaddress.IPv6Address(value)
        except ValueError:
            raise ValueError(f"invalid address {value!r}: write IPv6 addresses as [ADDRESS]:PORT") from None
        return value, DEFAULT_PORT
    if ":" in value:
        host, port = value.split(":", 1)
    if host and not _valid_host(host):
        raise ValueError(f"invalid address {value!r}: bad host {host!r}")
    return host, _port(value, port)


def _port(value: str, port: str) -> int:
    if port == "":
        return DEFAULT_PORT
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"invalid address {value!r}: bad port {port!r}")
    return int(port)


def _valid_host(host: str) -> bool:
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(host)
        return True
    labels = host.rstrip(".").split(".")
    return len(host) <= 253 and all(
        0 < len(x) <= 63 and x[0] != "-" and x[-1] != "-" and all(c.isalnum() or c == "-" for c in x)
        for x in labels)


def check_address(value: str) -> None:
    parse_address(value)


register(KEY, Key(check_address))


def join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_wildcard(host: str) -> bool:
    return host in ("", "0.0.0.0", "::")


async def bind(host: str, port: int) -> socket.socket:
    """A listening non-blocking socket on host:port ("" or "::": every address, IPv4 included)."""
    if host in ("", "::"):
        try:
            return _bind(socket.AF_INET6, ("::", port), v6only=False)
        except OSError as e:
            if host == "::" or e.errno not in (97, 99):  # EAFNOSUPPORT, EADDRNOTAVAIL: no IPv6
                raise
            return _bind(socket.AF_INET, ("0.0.0.0", port))
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)
    err: OSError | None = None
    for family, _, _, _, addr in infos:
        try:
            return _bind(family, addr)
        except OSError as e:
            err = err or e
    raise err or OSError(f"no address for {host!r}")


def _bind(family: int, addr: tuple, *, v6only: bool = True) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1 if v6only else 0)
        sock.bind(addr)
        sock.listen(BACKLOG)
        sock.setblocking(False)
        sock.set_inheritable(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def host_addresses(host: str, port: int) -> list[str]:
    """What GET /1.0 shows in environment.addresses for a listener on host:port: that address,
    or for a wildcard the host's global unicast addresses (IPv4 only for 0.0.0.0)."""
    if not is_wildcard(host):
        return [join(host, port)]
    try:
        proc = await asyncio.create_subprocess_exec("ip", "-j", "address", "show", stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.DEVNULL)
        out, _ = await proc.communicate()
        links = json.loads(out or b"[]")
    except (OSError, ValueError) as e:
        log.warning("cannot list the host's addresses: %s", e)
        return []
    v4: list[str] = []
    v6: list[str] = []
    for link in links:
        for a in link.get("addr_info", []):
            try:
                ip = ipaddress.ip_address(a.get("local", ""))
            except ValueError:
                continue
            if ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified:
                continue
            (v4 if ip.version == 4 else v6).append(join(str(ip), port))
    return v4 if host == "0.0.0.0" else v4 + v6


# -- the protocols ------------------------------------------------------------------------------

def peer_certificate(transport) -> bytes | None:
    obj = transport.get_extra_info("ssl_object")
    if obj is None:
        return None
    try:
        return obj.getpeercert(binary_form=True)
    except ValueError:  # the handshake is not done (never for a protocol the server made)
        return None


# The uvicorn internals the subclasses below rely on (checked when the listener is prepared).
# Should they change, no scope gets `lxd_peer_cert` and every TLS client is untrusted: closed.
_UVICORN = ((0, 29), (0, 55))
_HOOKS = {"http": ("connection_made", "connection_lost", "on_message_begin", "handle_websocket_upgrade",
                   "shutdown"),
          "ws": ("connection_made", "connection_lost", "run_asgi", "handle_connect")}


def check_uvicorn() -> None:
    import uvicorn
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

    from lxd_daemon.server.tls import TLSUnavailable

    version = tuple(int(x) for x in uvicorn.__version__.split(".")[:2])
    if not _UVICORN[0] <= version < _UVICORN[1]:
        raise TLSUnavailable(f"uvicorn {uvicorn.__version__} is not a version the TLS listener was checked against")
    for kind, cls in (("http", HttpToolsProtocol), ("ws", WebSocketsSansIOProtocol)):
        missing = [h for h in _HOOKS[kind] if not callable(getattr(cls, h, None))]
        if missing:
            raise TLSUnavailable(f"uvicorn's {cls.__name__} lacks {', '.join(missing)}")


def protocols(listener: HttpsListener) -> tuple[type, type]:
    """The HTTP and websocket protocol classes of the daemon, with the peer certificate in the
    scope and the connection registered by its fingerprint."""
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

    from lxd_daemon.daemon import _http_protocol

    check_uvicorn()

    class Tracked:
        """The client certificate of the connection, and the connection in the listener's
        registry by its fingerprint (to be closed when the certificate is revoked)."""

        peer_cert: bytes | None = None
        fingerprint = ""

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.peer_cert = peer_certificate(transport)
            if self.peer_cert is not None:
                self.fingerprint = hashlib.sha256(self.peer_cert).hexdigest()
                listener.track(self.fingerprint, self)

        def connection_lost(self, exc) -> None:
            listener.untrack(self.fingerprint, self)
            super().connection_lost(exc)

    class TLSHttpProtocol(Tracked, _http_protocol()):
        def on_message_begin(self) -> None:
            super().on_message_begin()
            self.scope["lxd_peer_cert"] = self.peer_cert

        def handle_websocket_upgrade(self) -> None:
            listener.untrack(self.fingerprint, self)  # the websocket protocol takes the connection over
            super().handle_websocket_upgrade()

        def revoke(self) -> None:
            self.shutdown()  # after the request in progress, if any

    class TLSWebSocketProtocol(Tracked, WebSocketsSansIOProtocol):
        async def run_asgi(self) -> None:
            self.scope["lxd_peer_cert"] = self.peer_cert
            await super().run_asgi()

        def revoke(self) -> None:
            if self.transport is None or self.transport.is_closing():
                return
            if self.handshake_complete and not self.close_sent:
                with contextlib.suppress(Exception):
                    self.conn.send_close(1008, "Certificate revoked")
                    self.transport.write(b"".join(self.conn.data_to_send()))
                self.close_sent = True
            self.transport.close()
            # A TLS close waits for the peer's answer: do not let it keep the socket.
            self.loop.call_later(1.0, self.transport.abort)

    return TLSHttpProtocol, TLSWebSocketProtocol


# -- the listener -------------------------------------------------------------------------------

class HttpsListener:
    def __init__(self, services):
        self.services = services
        self.address: tuple[str, int] | None = None  # what is bound now
        self.server: asyncio.AbstractServer | None = None
        self.state = None  # uvicorn's ServerState of `server`: its connections and tasks
        self._retired: list = []  # states of earlier listeners, until their tasks end
        self.by_fingerprint: dict[str, set] = {}
        self._ctx = None
        self._config = None
        self._revoke_registered = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self._lock = asyncio.Lock()

    # connections by client certificate
    def track(self, fingerprint: str, proto) -> None:
        self.by_fingerprint.setdefault(fingerprint, set()).add(proto)

    def untrack(self, fingerprint: str, proto) -> None:
        conns = self.by_fingerprint.get(fingerprint)
        if conns is not None:
            conns.discard(proto)
            if not conns:
                del self.by_fingerprint[fingerprint]

    def revoke(self, fingerprint: str) -> None:
        """The certificate is no longer trusted: close its websockets now, its other connections
        after their current request. Safe to call from any thread."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if self.loop is not None and running is not self.loop:
            self.loop.call_soon_threadsafe(self.revoke, fingerprint)
            return
        conns = self.by_fingerprint.pop(fingerprint, set())
        if conns:
            log.info("closing the connections of a revoked certificate",
                     extra={"fingerprint": fingerprint, "count": len(conns)})
        for proto in conns:
            with contextlib.suppress(Exception):
                proto.revoke()

    def register_revoke(self) -> None:
        trust = self.services.trust
        if trust is not None and not self._revoke_registered:
            trust.on_revoke.append(self.revoke)
            self._revoke_registered = True

    # serving
    async def _prepare(self) -> None:
        """The TLS context (self-tested) and the uvicorn config; TLSUnavailable if TLS can't be served."""
        if self._config is not None:
            return
        from lxd_daemon.api.access import Gate
        from lxd_daemon.daemon import uvicorn_config
        from lxd_daemon.server.tls import TLSUnavailable, server_context

        app = self.services.app
        if app is None:
            raise TLSUnavailable("the API application is not built yet")
        ctx = await asyncio.to_thread(server_context, self.services.lxd_dir)
        http, ws = protocols(self)
        app = self._wrap(app)
        if self.services.debug:  # as the unix socket's, with --debug
            from lxd_daemon.api.accesslog import AccessLog
            app = AccessLog(app)  # inside the Gate: it logs who the Gate says the caller is
        config = uvicorn_config(Gate(app, self.services, "tls"))
        config.http, config.ws = http, ws
        config.load()
        self._ctx, self._config = ctx, config

    def _wrap(self, app):
        """The application this listener serves, inside the Gate (a subclass narrows it)."""
        return app

    async def _serve(self, sock: socket.socket):
        """(asyncio server, uvicorn ServerState) serving on sock."""
        from uvicorn.server import ServerState

        config = self._config
        state = ServerState()
        state.default_headers = list(config.encoded_headers)

        def factory(_loop=None):
            return config.http_protocol_class(config=config, server_state=state, app_state={}, _loop=_loop)

        server = await asyncio.get_running_loop().create_server(factory, sock=sock, ssl=self._ctx, backlog=BACKLOG,
                                                                ssl_handshake_timeout=10)
        return server, state

    def _stop_accepting(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    def _retire(self, state, *, end: bool = True) -> None:
        """Keep a former listener's state until its tasks are done; end its connections (gracefully:
        websockets at once, other connections after the request in progress) unless end=False."""
        if state is None:
            return
        if end:
            for conn in list(state.connections):
                with contextlib.suppress(Exception):
                    conn.shutdown()
        self._retired = [st for st in self._retired if st.tasks or st.connections]
        if state.tasks or state.connections:
            self._retired.append(state)

    async def _publish(self) -> None:
        server = self.services.server
        server.addresses = await host_addresses(*self.address) if self.address else []
        server.invalidate()

    async def set_address(self, value: str | None) -> None:
        """Listen on value (a core.https_address), or stop listening (None or ""). A failure
        (bad address, bind error, TLS unavailable) raises BadRequest and leaves the old listener."""
        async with self._lock:  # one move at a time
            await self._set_address(value)

    async def _set_address(self, value: str | None) -> None:
        from lxd_daemon.server.tls import TLSUnavailable

        want = parse_address(value) if value else None
        if want == self.address and (want is None or self.server is not None):
            return
        if want is None:
            self._stop_accepting()
            self._retire(self.state)
            self.address, self.state = None, None
            await self._publish()
            log.info("stopped listening on HTTPS")
            return
        try:
            await self._prepare()
        except TLSUnavailable as e:
            log.error("the TLS endpoint is disabled: %s", e)
            raise BadRequest(f"Cannot serve HTTPS: {e}") from None
        host, port = want
        try:
            sock = await bind(host, port)
        except OSError as e:
            if self.address is None or self.address[1] != port:
                raise BadRequest(f"Cannot listen on {join(host, port)}: {e.strerror or e}") from None
            # The old listener may hold the port (127.0.0.1:P -> 0.0.0.0:P): free it and retry.
            old = self.address
            self._stop_accepting()
            try:
                sock = await bind(host, port)
            except OSError as e2:
                with contextlib.suppress(OSError):
                    self._retire(self.state, end=False)  # back where it was: its clients stay
                    self.server, self.state = await self._serve(await bind(*old))
                raise BadRequest(f"Cannot listen on {join(host, port)}: {e2.strerror or e2}") from None
        try:
            server, state = await self._serve(sock)
        except BaseException:
            sock.close()
            raise
        self._stop_accepting()
        self._retire(self.state)
        self.server, self.state, self.address = server, state, want
        await self._publish()
        log.info("listening on HTTPS", extra={"address": join(host, port)})

    # hooks
    async def apply(self, old: str | None, new: str | None) -> None:
        """Server config applier: run before the change is stored, undone with apply(new, old)."""
        await self.set_address(new)

    async def startup(self) -> None:
        """Listen on the stored core.https_address (daemon.py calls this once the app is built,
        before it serves): a failure is logged and the daemon runs without it, as LXD does."""
        self.register_revoke()
        value = self.services.server.config.get(KEY)
        if not value:
            return
        try:
            await self.set_address(value)
        except BadRequest as e:
            log.error("not listening on HTTPS: %s", e.message)
        except Exception:
            log.exception("not listening on HTTPS")

    async def close(self) -> None:
        """At exit: stop accepting, end every connection, give their requests a moment."""
        self._stop_accepting()
        states = [st for st in (self.state, *self._retired) if st is not None]
        self.state, self._retired = None, []
        for st in states:
            for conn in list(st.connections):
                with contextlib.suppress(Exception):
                    conn.shutdown()
        tasks = {t for st in states for t in st.tasks}
        if tasks:
            await asyncio.wait(tasks, timeout=3)


async def setup(services) -> list:
    listener = HttpsListener(services)
    listener.loop = asyncio.get_running_loop()
    services.https = listener
    services.server.appliers[KEY] = listener.apply
    listener.register_revoke()
    services.exit_hooks.append(listener.close)
    return []
