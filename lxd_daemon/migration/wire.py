"""A migration websocket (`control`, `fs` or `criu`) as a Channel, whichever side accepted or dialed it.

Framing is LXD's (shared/reference/API.md §15):
- `control`: one protobuf message per binary frame;
- `fs`/`criu`: a stream of binary frames ended by an empty text frame (the barrier); the next
  stream on the same websocket starts with the next binary frame. The index header is such a
  stream too: its JSON in binary frame(s), then the barrier.

`accepted(ws)` wraps a Starlette WebSocket an operation's `on_connect` was handed (that handler
keeps the connection by awaiting `channel.wait_closed()`); `dial()` opens a peer operation's
websocket over TLS with the peer's certificate pinned and our server certificate presented.
Every failure of the connection (closed, reset, timed out) is a MigrationError.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

log = logging.getLogger("lxd.migration")

CLOSE_TIMEOUT = 5.0
DIAL_TIMEOUT = 30.0
# The largest frame accepted from a dialed peer (LXD writes 32 KiB frames; rsync/btrfs streams
# stay far below this).
MAX_FRAME = 64 * 1024 * 1024


class MigrationError(Exception):
    """A migration failed; the message is what goes into MigrationControl and the operation's error."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


_BYTES, _BARRIER, _CLOSED = "bytes", "barrier", "closed"


class Channel:
    """One migration websocket. Receiving is for one task at a time; sending is serialised."""

    def __init__(self, name: str = "") -> None:
        self.name = name  # for messages: "control", "fs", ... or the URL
        self.closed = False  # the connection is gone (either side closed it)
        self.close_code: int | None = None
        self._send_lock = asyncio.Lock()
        self._gone = asyncio.Event()
        self.bytes_sent = 0  # binary payload bytes, every frame
        self.bytes_received = 0

    # -- transport hooks (subclasses) -----------------------------------------------
    async def _recv_frame(self) -> tuple[str, bytes]:
        raise NotImplementedError

    async def _send_frame(self, data: bytes | str) -> None:
        raise NotImplementedError

    async def _close(self) -> None:
        raise NotImplementedError

    # -- frames -------------------------------------------------------------------------
    def _what(self) -> str:
        return f"migration websocket {self.name}".rstrip()

    def _mark_closed(self, code: int | None = None) -> None:
        if not self.closed:
            self.closed = True
            self.close_code = code
        self._gone.set()

    async def send(self, data: bytes) -> None:
        """Send one binary frame (empty data sends nothing: an empty frame means nothing in LXD's streams)."""
        if not data:
            return
        await self._send(bytes(data))

    async def send_barrier(self) -> None:
        """End the current stream: an empty text frame."""
        await self._send("")

    async def _send(self, data: bytes | str) -> None:
        if self.closed:
            raise MigrationError(f"The {self._what()} is closed")
        async with self._send_lock:
            try:
                await self._send_frame(data)
                self.bytes_sent += len(data)
            except MigrationError:
                raise
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self._mark_closed()
                raise MigrationError(f"Failed sending on the {self._what()}: {_describe(e)}") from None

    async def recv(self, timeout: float | None = None) -> bytes | None:
        """The next binary frame; None at the barrier (stream end) or when the connection closed
        (then `closed` is True). A non-empty text frame is a protocol error. TimeoutError when
        nothing arrived within `timeout` seconds."""
        if self.closed:
            return None
        try:
            kind, data = await asyncio.wait_for(self._recv_frame(), timeout)
        except TimeoutError:
            raise
        except (MigrationError, asyncio.CancelledError):
            raise
        except Exception as e:
            self._mark_closed()
            log.debug("migration websocket receive failed: %s", _describe(e))
            return None
        if kind == _CLOSED:
            self._mark_closed(self.close_code)
            return None
        if kind == _BARRIER:
            if data:
                raise MigrationError(f"Unexpected text message on the {self._what()}")
            return None
        self.bytes_received += len(data)
        return data

    async def recv_stream(self, timeout: float | None = 60.0) -> bytes:
        """Everything up to the next barrier, joined. MigrationError when the connection closes
        first or nothing arrives for `timeout` seconds."""
        parts: list[bytes] = []
        while True:
            try:
                data = await self.recv(timeout)
            except TimeoutError:
                raise MigrationError(f"Timed out waiting on the {self._what()}") from None
            if data is None:
                if self.closed:
                    raise MigrationError(f"The {self._what()} closed unexpectedly")
                return b"".join(parts)
            parts.append(data)

    # -- control messages ---------------------------------------------------------------
    async def send_control(self, msg: Any) -> None:
        """A protobuf message, one binary frame."""
        await self._send(msg.SerializeToString())

    async def recv_control(self, cls: type, timeout: float = 60.0) -> Any:
        """The next frame parsed as `cls` (a protobuf message class)."""
        try:
            data = await self.recv(timeout)
        except TimeoutError:
            raise MigrationError(f"Timed out waiting for a {cls.__name__} on the {self._what()}") from None
        if data is None:
            if self.closed:
                raise MigrationError(f"The {self._what()} closed before a {cls.__name__} arrived")
            raise MigrationError(f"Only binary messages are allowed on the {self._what()}")
        msg = cls()
        try:
            msg.ParseFromString(data)
        except Exception as e:  # google.protobuf.message.DecodeError and friends
            raise MigrationError(f"Failed decoding a {cls.__name__}: {e}") from None
        return msg

    # -- JSON frames (the index header and its answer) ----------------------------------
    async def send_json(self, obj: Any) -> None:
        """`obj` as JSON in a binary frame, then the barrier (LXD's index header framing)."""
        await self.send(json.dumps(obj, separators=(",", ":")).encode())
        await self.send_barrier()

    async def recv_json(self, timeout: float = 60.0) -> Any:
        """The JSON value sent up to the next barrier."""
        data = await self.recv_stream(timeout)
        try:
            return json.loads(data)
        except ValueError as e:
            raise MigrationError(f"Failed decoding JSON from the {self._what()}: {e}") from None

    # -- end ------------------------------------------------------------------------------
    async def close(self) -> None:
        """Close the connection (a close frame; never waits long for the peer's answer)."""
        already = self.closed
        self._mark_closed(self.close_code)
        if already and self._closed_by_us:
            return
        self._closed_by_us = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._close(), CLOSE_TIMEOUT)

    _closed_by_us = False

    async def wait_closed(self) -> None:
        """Until the connection is closed (by close() or the peer, once a recv noticed it)."""
        await self._gone.wait()

    async def __aenter__(self) -> Channel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


_CLOSED_ERRORS = ("WebSocketDisconnect", "ClientDisconnected", "ConnectionClosed", "ConnectionClosedError",
                  "ConnectionClosedOK")


def _describe(e: BaseException) -> str:
    if e.__class__.__name__ in _CLOSED_ERRORS or isinstance(e, ConnectionError):
        return "the connection is closed"
    return str(e) or e.__class__.__name__


class _AcceptedChannel(Channel):
    """A Starlette WebSocket (already accepted)."""

    def __init__(self, websocket: Any, name: str = "") -> None:
        super().__init__(name)
        self._ws = websocket

    async def _recv_frame(self) -> tuple[str, bytes]:
        msg = await self._ws.receive()
        if msg["type"] == "websocket.disconnect":
            self.close_code = msg.get("code")
            return _CLOSED, b""
        if msg.get("bytes") is not None:
            return _BYTES, msg["bytes"]
        return _BARRIER, (msg.get("text") or "").encode()

    async def _send_frame(self, data: bytes | str) -> None:
        if isinstance(data, str):
            await self._ws.send_text(data)
        else:
            await self._ws.send_bytes(data)

    async def _close(self) -> None:
        await self._ws.close()


class _DialedChannel(Channel):
    """A websocket we opened with the `websockets` library."""

    def __init__(self, conn: Any, name: str = "") -> None:
        super().__init__(name)
        self._conn = conn

    async def _recv_frame(self) -> tuple[str, bytes]:
        from websockets.exceptions import ConnectionClosed

        try:
            msg = await self._conn.recv()
        except ConnectionClosed as e:
            self.close_code = e.rcvd.code if e.rcvd is not None else 1006
            return _CLOSED, b""
        if isinstance(msg, str):
            return _BARRIER, msg.encode()
        return _BYTES, msg

    async def _send_frame(self, data: bytes | str) -> None:
        await self._conn.send(data)

    async def _close(self) -> None:
        await self._conn.close()


def accepted(websocket: Any, name: str = "") -> Channel:
    """A Channel over a Starlette WebSocket an operation's on_connect was handed (already accepted).
    The handler should `await channel.wait_closed()` so the connection outlives it."""
    return _AcceptedChannel(websocket, name)


def websocket_url(url: str, secret: str) -> str:
    """`https://HOST:PORT/1.0/operations/ID[?project=P]` -> `wss://HOST:PORT/1.0/operations/ID/websocket?...&secret=S`."""
    parts = urlsplit(url)
    scheme = {"https": "wss", "http": "ws", "wss": "wss", "ws": "ws"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise MigrationError(f"Invalid migration operation URL: {url!r}")
    path = parts.path.rstrip("/")
    if not path.endswith("/websocket"):
        path += "/websocket"
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "secret"]
    query.append(("secret", secret))
    return urlunsplit((scheme, parts.netloc, path, urlencode(query), ""))


async def dial(url: str, secret: str, certificate: str | None, *, cert: Path | None = None,
               key: Path | None = None, client_cert: Path | None = None, client_key: Path | None = None,
               timeout: float = DIAL_TIMEOUT, name: str = "") -> Channel:
    """Open the websocket of a peer's operation: `url` is `https://HOST:PORT/1.0/operations/ID`
    (optionally `?project=`), `secret` one of its secrets, `certificate` the peer's PEM (pinned;
    None/empty: the system CAs). We present `cert`/`key` (our server certificate) as client
    certificate. MigrationError when it cannot be opened."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    from lxd_daemon.errors import LXDError
    from lxd_daemon.util import tlspin

    ws_url = websocket_url(url, secret)
    cert = cert or client_cert
    key = key or client_key
    ctx: ssl.SSLContext | None = None
    if ws_url.startswith("wss:"):
        try:
            ctx = tlspin.client_context(certificate or "", what="migration peer")
        except LXDError as e:
            raise MigrationError(e.message) from None
        if cert is not None:
            ctx.load_cert_chain(str(cert), str(key) if key is not None else None)
    shown = urlunsplit(urlsplit(url)._replace(query=""))
    try:
        conn = await connect(ws_url, ssl=ctx, open_timeout=timeout, max_size=MAX_FRAME,
                             compression=None, proxy=None, close_timeout=CLOSE_TIMEOUT,
                             ping_interval=10, ping_timeout=20, user_agent_header="LXD")
    except InvalidStatus as e:
        status = e.response.status_code
        detail = ""
        with contextlib.suppress(Exception):
            detail = json.loads(e.response.body or b"{}").get("error", "")
        raise MigrationError(f"Failed connecting to the migration websocket at {shown}: "
                             f"{detail or 'HTTP ' + str(status)}") from None
    except TimeoutError:
        raise MigrationError(f"Timed out connecting to the migration websocket at {shown}") from None
    except Exception as e:  # refused, reset, TLS (a pin mismatch says which certificate it saw)
        raise MigrationError(f"Failed connecting to the migration websocket at {shown}: "
                             f"{str(e) or e.__class__.__name__}") from None
    return _DialedChannel(conn, name or shown)
