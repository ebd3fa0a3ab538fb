"""The metrics listener on `core.metrics_address` (LXD's: HTTPS, default port 9100).

The same TLS listener as core.https_address (server/https.py: client certificates, revocation,
moving without a restart), serving a narrow application: `GET /`, `/1.0` and `/1.0/metrics` pass
to the daemon's app (behind the same Gate, so the same access rules apply); anything else is
LXD's 404. It does not change the addresses GET /1.0 shows.
"""

from __future__ import annotations

import asyncio
import logging

from lxd_daemon.api.envelope import error_body
from lxd_daemon.errors import BadRequest
from lxd_daemon.server.config import Key, register
from lxd_daemon.server.https import HttpsListener, parse_address

log = logging.getLogger("lxd.metrics")

KEY = "core.metrics_address"
DEFAULT_PORT = 9100
PATHS = frozenset({"/", "/1.0", "/1.0/metrics"})


def parse(value: str) -> tuple[str, int]:
    """(host, port) of a metrics address: as core.https_address, with port 9100 by default."""
    value = value.strip()
    if value.count(":") > 1 and not value.startswith("["):
        return parse_address(value)[0], DEFAULT_PORT  # a bare IPv6 address
    try:
        return parse_address(f"{value}:{DEFAULT_PORT}")  # HOST, [V6]: no port of its own
    except ValueError:
        return parse_address(value)


def check(value: str) -> None:
    parse(value)


register(KEY, Key(check))


class OnlyMetrics:
    """ASGI: the routes the metrics listener serves, LXD's 404 for the rest."""

    def __init__(self, app):
        self.app = app

    def __getattr__(self, name):
        return getattr(self.app, name)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("path") not in PATHS:
            body = error_body(404, "not found")
            await send({"type": "http.response.start", "status": 404,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await self.app(scope, receive, send)


class MetricsListener(HttpsListener):
    def _wrap(self, app):
        return OnlyMetrics(app)

    async def _publish(self) -> None:
        pass  # GET /1.0 shows the API's addresses (core.https_address) only

    async def _set_address(self, value: str | None) -> None:
        # Normalise to HOST:PORT with the metrics default port, then move as the HTTPS listener.
        if value:
            host, port = parse(value)
            value = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        await super()._set_address(value)

    async def startup(self) -> None:
        self.register_revoke()
        value = self.services.server.config.get(KEY)
        if value:
            try:
                await self.set_address(value)
            except BadRequest as e:
                log.error("not listening for metrics: %s", e.message)


async def setup(services) -> MetricsListener:
    listener = MetricsListener(services)
    listener.loop = asyncio.get_running_loop()
    services.server.appliers[KEY] = listener.apply
    services.startup_hooks.append(listener.startup)
    services.exit_hooks.append(listener.close)
    return listener
