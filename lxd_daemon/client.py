"""A minimal synchronous client for the daemon's unix socket, used by the `lxd` subcommands."""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str | Path, timeout: float = 30.0):
        super().__init__("lxd", timeout=timeout)
        self.socket_path = str(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.socket_path)
        self.sock = sock


class APIError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Client:
    def __init__(self, socket_path: str | Path, timeout: float = 30.0):
        self.socket_path = socket_path
        self.timeout = timeout

    def request(self, method: str, path: str, body: object = None) -> dict:
        conn = UnixHTTPConnection(self.socket_path, self.timeout)
        try:
            data = None if body is None else json.dumps(body).encode()
            headers = {"Content-Type": "application/json"} if data is not None else {}
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        try:
            doc = json.loads(raw) if raw else {}
        except json.JSONDecodeError:
            raise APIError(resp.status, raw.decode(errors="replace")) from None
        if doc.get("type") == "error" or resp.status >= 400:
            raise APIError(resp.status, doc.get("error") or f"HTTP {resp.status}")
        return doc

    def get(self, path: str) -> object:
        return self.request("GET", path).get("metadata")

    def wait(self, doc: dict) -> dict:
        """Wait for an async reply's operation to finish; raise on failure."""
        if doc.get("type") != "async":
            return doc
        op = self.request("GET", doc["operation"] + "/wait?timeout=-1")["metadata"]
        if op.get("status_code") != 200:
            raise APIError(400, op.get("err") or op.get("status", "operation failed"))
        return op
