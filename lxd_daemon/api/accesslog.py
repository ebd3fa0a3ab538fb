"""Each API request in the debug log, so that a client's behaviour can be followed.

Installed by daemon.py around the whole application only when the daemon runs with `--debug`;
without it nothing of this is in a request's way. Like LXD's debug log, a line when a request
arrives (`Handling API request`: method, url with its query, ip, protocol and the requestor: the
unix user from the socket's peer credentials, or the client certificate's fingerprint), and one
when it is answered with its status and the time taken (for a websocket, when it closes).
"""

from __future__ import annotations

import logging
import pwd
import socket
import struct
import time

log = logging.getLogger("lxd.api")

_UCRED = struct.Struct("3i")  # pid, uid, gid


def _peer_user(receive) -> str:
    """The user at the other end of the unix socket the request came in on ("" if unknown)."""
    transport = getattr(getattr(receive, "__self__", None), "transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family != socket.AF_UNIX:
        return ""
    try:
        _, uid, _ = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    except OSError:
        return ""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def request_context(scope, receive) -> dict:
    url = scope.get("path", "")
    query = scope.get("query_string", b"")
    if query:
        url += "?" + query.decode("latin-1")
    ctx = {"method": scope.get("method", "GET") if scope["type"] == "http" else "GET", "url": url}
    if scope.get("lxd_protocol") == "tls":
        client = scope.get("client") or ("", 0)
        ctx.update(ip=f"{client[0]}:{client[1]}", protocol="tls", fingerprint=scope.get("lxd_fingerprint", ""))
    else:
        ctx.update(ip="@", protocol="unix", username=_peer_user(receive))
    if scope["type"] == "websocket":
        ctx["websocket"] = True
    return ctx


class AccessLog:
    """ASGI middleware: two debug lines per request (arrival; status and duration)."""

    def __init__(self, app):
        self.app = app

    def __getattr__(self, name):
        return getattr(self.app, name)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        ctx = request_context(scope, receive)
        log.debug("Handling API request", extra=ctx)
        status = [0]
        t0 = time.monotonic()

        async def send_logged(message):
            kind = message.get("type")
            if kind == "http.response.start":
                status[0] = message.get("status", 0)
            elif kind == "websocket.accept":
                status[0] = 101
            elif kind == "websocket.close" and not status[0]:
                status[0] = 403  # refused before the upgrade (uvicorn answers 403)
            await send(message)

        try:
            await self.app(scope, receive, send_logged)
        except BaseException:
            status[0] = status[0] or 500
            raise
        finally:
            log.debug("API request done", extra={**ctx, "status": status[0],
                                                 "duration": f"{(time.monotonic() - t0) * 1000:.1f}ms"})
