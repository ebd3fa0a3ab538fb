"""HTTPS to image servers: the remote's certificate pinned, downloads streamed to files and hashed.

Pinning (util/tlspin.py): given the remote's certificate (PEM, as `source.certificate` carries
it), the TLS handshake accepts exactly that certificate; without one, the system CAs and the host
name are checked as usual.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlencode, urljoin, urlsplit

import httpx

from lxd_daemon.errors import BadRequest, LXDError
from lxd_daemon.util import tlspin
from lxd_daemon.util.sizes import format_rate

USER_AGENT = "LXD 5.0.2"
CHUNK = 1 << 20
TIMEOUT = httpx.Timeout(30.0, read=120.0)
READ_TIMEOUT = 120.0  # seconds without a byte from the image server


class RemoteError(BadRequest):
    """The image server failed or answered something unusable (a 400 in the operation)."""


def ssl_context(certificate: str = "") -> ssl.SSLContext:
    return tlspin.client_context(certificate, what="image server")


def base_url(server: str) -> str:
    server = server.strip().rstrip("/")
    if not server.startswith(("https://", "http://")):
        raise BadRequest(f"Invalid image server URL {server!r}: https://HOST[:PORT] expected")
    return server


def client(server: str, certificate: str = "") -> httpx.AsyncClient:
    url = base_url(server)
    # The same context for a redirect to https (plain http itself never sees it).
    return httpx.AsyncClient(base_url=url, verify=ssl_context(certificate), timeout=TIMEOUT, follow_redirects=True,
                             headers={"User-Agent": USER_AGENT}, trust_env=False)


def describe(e: Exception) -> str:
    if isinstance(e, ssl.SSLError) or (isinstance(e, httpx.ConnectError) and "certificate" in str(e).lower()):
        return f"TLS failure: {e}"
    return str(e) or e.__class__.__name__


async def get_json(c: httpx.AsyncClient, path: str, params: dict | None = None) -> object:
    try:
        r = await c.get(path, params=params)
    except httpx.HTTPError as e:
        raise RemoteError(f"Failed to reach the image server {c.base_url}: {describe(e)}") from None
    if r.status_code == 404:
        raise _not_found(r, path)
    if r.status_code != 200:
        raise RemoteError(f"Unable to fetch {c.base_url}{path}: {r.status_code} {_error_text(r)}")
    try:
        return r.json()
    except ValueError:
        raise RemoteError(f"Invalid JSON from {c.base_url}{path}") from None


def _error_text(r: httpx.Response) -> str:
    try:
        body = r.json()
        if isinstance(body, dict) and body.get("error"):
            return str(body["error"])
    except ValueError:
        pass
    return r.reason_phrase


def _not_found(r: httpx.Response, path: str) -> LXDError:
    from lxd_daemon.errors import NotFound

    return NotFound(f"Not found on the image server: {path} ({_error_text(r)})")


class Progress:
    """Renders download progress as LXD does ("[name: ]NN% (SPEED/s)") into callbacks, at most
    once per percent and per 0.5 s."""

    def __init__(self, report: Callable[[str], None], total: int, label: str = ""):
        self.report = report
        self.total = total
        self.label = label
        self.done = 0
        self.start = time.monotonic()
        self.last_pct = -1
        self.last_t = 0.0

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        pct = int(self.done * 100 / self.total) if self.total > 0 else 0
        pct = min(pct, 100)
        if pct == self.last_pct or (now - self.last_t < 0.5 and pct < 100):
            return
        self.last_pct, self.last_t = pct, now
        speed = self.done / max(now - self.start, 1e-3)
        text = f"{pct}% ({format_rate(speed)}/s)"
        self.report(f"{self.label}: {text}" if self.label else text)




class FileSink:
    """Writes a download to a file from a thread, hashing what it writes (one block in flight)."""

    def __init__(self, path: Path, hasher=None, scan=None):
        self.path = path
        self.f = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.hash = hashlib.sha256()
        self.combined = hasher
        # The content scan (images.pipeline.UploadScan) fed as the download arrives, so that it
        # overlaps the transfer instead of following it.
        self.scan = scan
        self.size = 0
        self.head = b""
        self._pending: asyncio.Future | None = None

    def _write(self, block: bytes) -> None:
        self.f.write(block)
        self.hash.update(block)
        if self.combined is not None:
            self.combined.update(block)

    async def write(self, block: bytes) -> None:
        if len(self.head) < 512:
            self.head += block[: 512 - len(self.head)]
        self.size += len(block)
        if self.scan is not None:
            await self.scan.feed(block)
        if self._pending is not None:
            await self._pending
        self._pending = asyncio.get_running_loop().run_in_executor(None, self._write, block)

    async def close(self) -> None:
        try:
            if self._pending is not None:
                await self._pending
        finally:
            self._pending = None
            await asyncio.to_thread(self.f.close)


class Body:
    """The response to a GET of an image file, read by threads over a connection of its own.

    httpx reads a body 64 KiB at a time through anyio's TLS layer, in Python on the event loop:
    52 MB took 130-220 ms here. http.client on a blocking socket does the TLS reads in C without
    the GIL, a MiB at a time, in 90 ms with the hashing. The next read runs while the caller
    handles the current chunk. Same pinning (util/tlspin.py), same errors (RemoteError)."""

    REDIRECTS = 5

    def __init__(self, conn, resp, url: str):
        self._conn = conn
        self._resp = resp
        self.url = url
        self.status_code = resp.status
        self.reason_phrase = resp.reason
        self.headers = {k.lower(): v for k, v in resp.getheaders()}
        self.content = b""

    @classmethod
    async def get(cls, server: str, certificate: str, path: str, params: dict | None = None) -> Body:
        ctx = ssl_context(certificate)  # a bad certificate is a 400 before any connection
        url = base_url(server) + path + (("?" + urlencode(params)) if params else "")
        return await asyncio.to_thread(cls._open, url, ctx)

    @classmethod
    def _open(cls, url: str, ctx: ssl.SSLContext) -> Body:
        for _ in range(cls.REDIRECTS + 1):
            parts = urlsplit(url)
            if parts.scheme == "https":
                conn = http.client.HTTPSConnection(parts.hostname, parts.port or 443, context=ctx,
                                                   timeout=READ_TIMEOUT, blocksize=CHUNK)
            else:
                conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=READ_TIMEOUT,
                                                  blocksize=CHUNK)
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            try:
                conn.request("GET", target, headers={"User-Agent": USER_AGENT})
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                raise RemoteError(f"Failed to reach the image server {parts.scheme}://{parts.netloc}: "
                                  f"{describe(e)}") from None
            if resp.status in (301, 302, 303, 307, 308) and resp.getheader("location"):
                url = urljoin(url, resp.getheader("location"))
                conn.close()
                continue
            return cls(conn, resp, url)
        raise RemoteError(f"Too many redirects from the image server for {url}")

    def _read(self) -> bytes:
        try:
            return self._resp.read(CHUNK)
        except (OSError, http.client.HTTPException) as e:
            raise RemoteError(f"Failed to download {self.url}: {describe(e)}") from None

    async def aiter_bytes(self):
        loop = asyncio.get_running_loop()
        pending = loop.run_in_executor(None, self._read)
        try:
            while chunk := await pending:
                pending = loop.run_in_executor(None, self._read)  # the next read, while this chunk is used
                yield chunk
            pending = None
        finally:
            if pending is not None:
                self.close()  # ends the read in flight
                with contextlib.suppress(Exception):
                    await pending

    async def aread(self) -> bytes:
        """The whole (small) body: an error document."""
        self.content = b"".join([c async for c in self.aiter_bytes()])
        return self.content

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._conn.sock and self._conn.sock.shutdown(socket.SHUT_RDWR)
        self._conn.close()

    async def __aenter__(self) -> Body:
        return self

    async def __aexit__(self, *exc) -> None:
        await asyncio.to_thread(self.close)


async def stream_to(response: Body, sink: FileSink, progress: Progress | None,
                    limit: int = -1) -> None:
    """Write the body to sink; more than `limit` bytes (when >= 0) is refused as it arrives."""
    buf = bytearray()
    got = 0
    async for chunk in response.aiter_bytes():
        got += len(chunk)
        if 0 <= limit < got:
            raise RemoteError(f"The image server sent more than the {limit} bytes announced for {response.url}")
        buf += chunk
        if progress is not None:
            progress.add(len(chunk))
        if len(buf) >= CHUNK:
            await sink.write(bytes(buf))
            buf.clear()
    if buf:
        await sink.write(bytes(buf))


__all__ = ["Body", "FileSink", "Progress", "RemoteError", "base_url", "client", "get_json", "ssl_context",
           "stream_to"]
