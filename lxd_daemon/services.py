"""The services the API routes call, built once by daemon.py (no module-level singletons)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.requests import HTTPConnection

from lxd_daemon.db import Database
from lxd_daemon.events import EventHub
from lxd_daemon.ops import OperationManager
from lxd_daemon.runtime.pool import WorkerPool
from lxd_daemon.server.service import ServerService


@dataclass
class Services:
    lxd_dir: Path
    db: Database
    events: EventHub
    ops: OperationManager
    pool: WorkerPool
    server: ServerService
    # Called with the reason ("shutdown" stops containers, "exit" leaves them running).
    request_stop: Callable[[str], None] = lambda reason: None
    debug: bool = False  # --debug: every request in the debug log (api/accesslog.py), on every listener
    # Run once the API is being served (autostart), at `lxd shutdown`/SIGPWR before exiting
    # (stop containers), and at every exit (release resources; containers keep running).
    startup_hooks: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    shutdown_hooks: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    exit_hooks: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # Subsystems, set by their setup() in daemon.SUBSYSTEMS order.
    projects: Any = None  # the projects, their limits and restrictions (projects/service.py)
    storage: Any = None
    images: Any = None
    profiles: Any = None
    instances: Any = None
    networks: Any = None
    snapshots: Any = None  # instance snapshots (instances/snapshots.py)
    backups: Any = None
    recover: Any = None  # made on first use (lxd recover)
    trust: Any = None  # the trust store (trust/store.py): who is trusted over TLS
    https: Any = None  # the TLS listener on core.https_address (server/https.py)
    streams: Any = None  # the simplestreams tree of the public images (images/streams.py)
    warnings: Any = None  # warnings/service.py; raise through lxd_daemon.warnings.raise_warning (None-safe)
    devlxd: Any = None  # the /dev/lxd listener (devlxd/server.py)
    # The ASGI application (app.create_app), served by each listener behind its api.access.Gate.
    app: Any = None
    # The typed client of the liblxc workers (runtime/client.py), over `pool`.
    runtime: Any = field(init=False, default=None)

    def __post_init__(self) -> None:
        from lxd_daemon.runtime.client import RuntimeClient

        self.runtime = RuntimeClient(self.pool)


def get_services(conn: HTTPConnection) -> Services:
    return conn.app.state.services


def requestor(conn: HTTPConnection) -> dict:
    """Who made a request, for lifecycle events."""
    client = conn.scope.get("client")
    if conn.scope.get("lxd_protocol") == "tls" and client:
        return {"username": conn.scope.get("lxd_fingerprint", ""), "protocol": "tls",
                "address": f"{client[0]}:{client[1]}"}
    return {"username": conn.scope.get("lxd_username", "root"), "protocol": "unix", "address": "@"}
