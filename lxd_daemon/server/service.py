"""The server document (`GET /1.0`) and server configuration updates."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import platform
import socket
from pathlib import Path

from sqlalchemy import text

from lxd_daemon import LXD_COMPAT_VERSION
from lxd_daemon.api.envelope import etag_of, sync_body
from lxd_daemon.events import EventHub
from lxd_daemon.extensions import CORE
from lxd_daemon.server.config import ServerConfig


def pem_to_der(pem: str) -> bytes:
    body = "".join(line for line in pem.strip().splitlines() if not line.startswith("-----"))
    return base64.b64decode(body)


def cert_fingerprint(pem: str) -> str:
    return hashlib.sha256(pem_to_der(pem)).hexdigest()


def _os_release() -> tuple[str, str]:
    name, version = "", ""
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            key, _, val = line.partition("=")
            val = val.strip().strip('"')
            if key == "NAME":
                name = val
            elif key == "VERSION_ID":
                version = val
    except OSError:
        pass
    return name, version


def _architectures() -> list[str]:
    machine = platform.machine()
    personalities = {"x86_64": ["x86_64", "i686"], "aarch64": ["aarch64", "armv7l"]}
    return personalities.get(machine, [machine])


def _kernel_features() -> dict[str, str]:
    release = platform.release()
    try:
        major, minor = (int(x) for x in release.split(".")[:2])
    except ValueError:
        major, minor = 0, 0
    ver = (major, minor)

    def b(x: bool) -> str:
        return "true" if x else "false"

    return {
        "idmapped_mounts": b(ver >= (5, 12)),
        "netnsid_getifaddrs": b(ver >= (4, 20)),
        "seccomp_listener": b(ver >= (5, 0)),
        "seccomp_listener_continue": b(ver >= (5, 5)),
        "shiftfs": "false",
        "uevent_injection": b(ver >= (4, 18)),
        "unpriv_fscaps": b(ver >= (4, 14)),
    }


class ServerService:
    def __init__(self, *, db, events: EventHub, config: ServerConfig, certificate_pem: str,
                 driver_version: str, lxc_features: dict[str, str] | None = None):
        self.db = db
        self.events = events
        self.config = config
        self.certificate_pem = certificate_pem
        self.fingerprint = cert_fingerprint(certificate_pem)
        self.driver_version = driver_version
        self.lxc_features = dict(lxc_features or {})
        # Filled in by later subsystems (storage driver in use, listener addresses).
        self.storage = ""
        self.storage_version = ""
        self.storage_supported_drivers: list[dict] = []
        self.addresses: list[str] = []
        self.extensions: list[str] = list(CORE)
        # key -> async fn(old, new): host work a changed key needs (storage.images_volume moves the
        # image store), run before the change is recorded and undone (fn(new, old)) if that fails.
        self.appliers: dict = {}
        self._static_env = self._build_static_env()
        self._cached: bytes | None = None

    def _build_static_env(self) -> dict:
        os_name, os_version = _os_release()
        uname = os.uname()
        return {
            "architectures": _architectures(),
            "certificate": self.certificate_pem,
            "certificate_fingerprint": self.fingerprint,
            "driver": "lxc",
            "driver_version": self.driver_version,
            "firewall": "nftables",
            "kernel": uname.sysname,
            "kernel_architecture": uname.machine,
            "kernel_features": _kernel_features(),
            "kernel_version": uname.release,
            # liblxc's own answers (runtime worker `lxc_features`), as LXD reports them
            "lxc_features": self.lxc_features or {"pidfd": "true"},
            "os_name": os_name,
            "os_version": os_version,
            "project": "default",
            "server": "lxd",
            "server_clustered": False,
            "server_event_mode": "full-mesh",
            "server_name": socket.gethostname(),
            "server_pid": os.getpid(),
            "server_version": LXD_COMPAT_VERSION,
        }

    def advertise(self, *names: str) -> None:
        """Announce API extensions whose behaviour is now complete."""
        for name in names:
            if name not in self.extensions:
                self.extensions.append(name)
        self.invalidate()

    # -- the document ------------------------------------------------------
    def document(self, trusted: bool = True) -> dict:
        doc = {
            "api_extensions": list(self.extensions),
            "api_status": "stable",
            "api_version": "1.0",
            "auth": "trusted" if trusted else "untrusted",
            "public": False,
            "auth_methods": ["tls"],
        }
        if trusted:
            env = dict(self._static_env)
            env["addresses"] = list(self.addresses)
            env["storage"] = self.storage
            env["storage_version"] = self.storage_version
            env["storage_supported_drivers"] = self.storage_supported_drivers
            doc["config"] = self.config.public()
            doc["environment"] = env
        return doc

    def etag(self) -> str:
        return etag_of(self.config.public())

    def cached_body(self) -> bytes:
        """The rendered sync envelope for a trusted GET /1.0, rebuilt after any change."""
        if self._cached is None:
            self._cached = sync_body(self.document(True))
        return self._cached

    def invalidate(self) -> None:
        self._cached = None

    # -- config ------------------------------------------------------------
    async def update_config(self, changes: dict, *, replace: bool, requestor: dict | None = None) -> None:
        plan = self.config.plan(changes, replace=replace)
        if not plan:
            return

        def write(session) -> None:
            for key, value in plan.items():
                if value is None:
                    session.execute(text("DELETE FROM config WHERE key=:k"), {"k": key})
                else:
                    session.execute(text("INSERT INTO config (key, value) VALUES (:k, :v) "
                                         "ON CONFLICT (key) DO UPDATE SET value=excluded.value"),
                                    {"k": key, "v": value})

        from lxd_daemon.util.revert import Revert

        async with Revert() as revert:
            for key, value in plan.items():
                fn = self.appliers.get(key)
                old = self.config.values.get(key)
                if fn is not None and old != value:
                    await fn(old, value)
                    revert.add(fn, value, old)
            await self.db.run(write)
            revert.success()
        self.config.apply(plan)
        self.invalidate()
        shown = {k: ("true" if k == "core.trust_password" and v is not None else v) for k, v in plan.items()}
        self.events.lifecycle("config-updated", "/1.0", {"config": json.loads(json.dumps(shown))},
                              requestor=requestor)


def load_config(session) -> dict[str, str]:
    return {row.key: row.value for row in session.execute(text("SELECT key, value FROM config"))}
