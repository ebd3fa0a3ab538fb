"""The /dev/lxd listener: its own uvicorn server on `$LXD_DIR/devlxd/sock` (directory 0755,
socket 0666) with its own small ASGI app, never the host API's.

Each connection is identified once, when it is accepted, from the kernel's peer credentials
(identify.py); a peer that is not in one of our running containers gets 403 and the connection
closes. Limits: uvicorn's (concurrency, an 8 KiB request head, keep-alive timeout), a deadline for
the first request head, a number of connections per guest and a per-guest request budget (429
beyond it, and the connection closes). Replies are LXD 5.0.2's: JSON or raw text, no envelope.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import time
from pathlib import Path
from urllib.parse import parse_qs, unquote

from lxd_daemon.devlxd import identify

log = logging.getLogger("lxd.devlxd")

HEAD_SIZE = 8192          # bytes of a request head (h11's incomplete-event limit)
BODY_LIMIT = 64 << 10     # bytes of a request body (PATCH /1.0)
HEAD_TIMEOUT = 10.0       # seconds for a new connection to send its first request head
BODY_TIMEOUT = 10.0       # seconds for a body to arrive
KEEP_ALIVE = 5            # seconds an idle keep-alive connection is kept
CONCURRENCY = 512         # connections (all guests) before uvicorn answers 503
CONNS_PER_GUEST = 32      # open connections per guest (events streams included)
RATE = 200.0              # requests per second per guest, sustained
BURST = 500.0             # ... and in a burst
EVENT_QUEUE = 256         # events buffered per listener before it is dropped
STREAM_BUFFER = 1 << 20   # unread bytes of a raw event stream before it is dropped
STATES = ("Started", "Ready")


def _true(v: str | None) -> bool:
    return (v or "").lower() in ("true", "1", "yes", "on")


def _false(v: str | None) -> bool:
    return (v or "").lower() in ("false", "0", "no", "off")


class Guest:
    """Per-instance accounting: open connections, the request budget, the reported state."""

    __slots__ = ("conns", "tokens", "stamp")

    def __init__(self):
        self.conns = 0
        self.tokens = BURST
        self.stamp = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(BURST, self.tokens + (now - self.stamp) * RATE)
        self.stamp = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


def _open_all(paths) -> list:
    """Open every file or none."""
    opened = []
    try:
        for p in paths:
            opened.append(open(p, "rb"))  # noqa: SIM115 (closed by the caller)
    except BaseException:
        for f in opened:
            f.close()
        raise
    return opened


def _plain(status: int, reason: bytes, text: str) -> bytes:
    body = (text + "\n").encode()
    return b"".join([b"HTTP/1.1 %d %s\r\n" % (status, reason),
                     b"Content-Type: text/plain; charset=utf-8\r\nX-Content-Type-Options: nosniff\r\n",
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body), body])


class DevLxd:
    def __init__(self, services):
        self.services = services
        self.dir: Path = Path(services.lxd_dir) / "devlxd"
        self.path = self.dir / "sock"
        self.owner: dict[object, str] = {}   # transport -> instance key
        self.guests: dict[str, Guest] = {}
        self.states: dict[str, str] = {}     # key -> state reported with PATCH /1.0
        self.listeners: dict[str, set[tuple[asyncio.Queue, frozenset[str]]]] = {}
        self.snapshots: dict[str, tuple[dict, dict]] = {}  # key -> (expanded config, devices) last sent
        self.server: asyncio.AbstractServer | None = None
        self.state = None
        self.sock: socket.socket | None = None

    # -- who is calling ------------------------------------------------------------------------
    def _init_pid(self, key: str) -> int:
        rt = self.services.instances.runtime.get(key)
        return rt.pid if rt is not None else 0

    def identify(self, transport) -> tuple[str | None, bool]:
        """(instance key or None, whether the caller is that container's root)."""
        cred = identify.peer_credentials(transport.get_extra_info("socket"))
        if cred is None:
            return None, False
        key = identify.instance_for_pid(cred[0], self.services.instances.records, self._init_pid)
        if key is None:
            return None, False
        return key, identify.host_root_uid(self._init_pid(key)) == cred[1]

    def accept(self, transport) -> bytes | None:
        """Register a new connection; the refusal to write (and close) when it may not stay."""
        if transport in self.owner:
            return None  # a websocket upgrade: the connection is known
        try:
            key, root = self.identify(transport)
        except Exception:
            log.exception("cannot identify a /dev/lxd caller")
            key, root = None, False
        if key is None:
            return _plain(403, b"Forbidden", "not authorized")
        if not root:  # as LXD: only the container's root may ask
            return _plain(401, b"Unauthorized", "Access denied for non-root user")
        guest = self.guests.setdefault(key, Guest())
        if guest.conns >= CONNS_PER_GUEST:
            return _plain(429, b"Too Many Requests", "too many connections")
        guest.conns += 1
        self.owner[transport] = key
        return None

    def release(self, transport) -> None:
        key = self.owner.pop(transport, None)
        if key is None:
            return
        guest = self.guests.get(key)
        if guest is not None:
            guest.conns -= 1
            if guest.conns <= 0 and guest.tokens >= BURST:
                self.guests.pop(key, None)

    def key_of(self, receive) -> str | None:
        transport = getattr(getattr(receive, "__self__", None), "transport", None)
        return self.owner.get(transport) if transport is not None else None

    # -- serving -------------------------------------------------------------------------------
    def _config(self):
        import uvicorn
        from uvicorn.protocols.http.h11_impl import H11Protocol
        from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

        devlxd = self

        class Tracked:
            def connection_made(self, transport) -> None:
                super().connection_made(transport)
                self._refusal = devlxd.accept(transport)

            def connection_lost(self, exc) -> None:
                devlxd.release(self.transport)
                super().connection_lost(exc)

        class GuestHttp(Tracked, H11Protocol):
            _head_timer = None
            _refusal: bytes | None = None

            def data_received(self, data: bytes) -> None:
                # A refused connection is answered once its request comes (closing a unix socket
                # with unread data would reset it and the peer could lose the answer).
                if self._refusal is None:
                    super().data_received(data)
                elif self._refusal:
                    self.transport.write(self._refusal)
                    self._refusal = b""
                    self.transport.close()

            def connection_made(self, transport) -> None:
                super().connection_made(transport)
                if not transport.is_closing():
                    self._head_timer = self.loop.call_later(HEAD_TIMEOUT, self._head_expired)

            def _head_expired(self) -> None:
                if self.cycle is None and self.transport is not None and not self.transport.is_closing():
                    self.transport.close()

            def connection_lost(self, exc) -> None:
                if self._head_timer is not None:
                    self._head_timer.cancel()
                super().connection_lost(exc)

            def handle_websocket_upgrade(self, event) -> None:
                if self._head_timer is not None:
                    self._head_timer.cancel()
                super().handle_websocket_upgrade(event)

        class GuestWebSocket(Tracked, WebSocketsSansIOProtocol):
            pass

        config = uvicorn.Config(self.app, interface="asgi3", lifespan="off", http=GuestHttp, ws=GuestWebSocket, log_config=None,
                                access_log=False, proxy_headers=False, server_header=False, date_header=False,
                                limit_concurrency=CONCURRENCY, timeout_keep_alive=KEEP_ALIVE,
                                h11_max_incomplete_event_size=HEAD_SIZE, ws_max_size=BODY_LIMIT,
                                ws_ping_interval=10, timeout_graceful_shutdown=1)
        config.load()
        return config

    def _bind(self) -> socket.socket:
        from lxd_daemon.daemon import remove_stale_socket

        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o755)
        remove_stale_socket(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(self.path))
            os.chmod(self.path, 0o666)
            sock.listen(1024)
            sock.setblocking(False)
            sock.set_inheritable(False)
        except BaseException:
            sock.close()
            raise
        return sock

    async def start(self) -> None:
        from uvicorn.server import ServerState

        config = self._config()
        self.sock = await asyncio.to_thread(self._bind)
        state = ServerState()
        state.default_headers = list(config.encoded_headers)

        def factory(_loop=None):
            return config.http_protocol_class(config=config, server_state=state, app_state={}, _loop=_loop)

        self.state = state
        self.server = await asyncio.get_running_loop().create_server(factory, sock=self.sock, backlog=1024)
        self.services.events.tap(["lifecycle"], self._on_lifecycle)
        log.info("listening for /dev/lxd", extra={"path": str(self.path)})

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        for queues in list(self.listeners.values()):
            for q, _ in list(queues):
                with contextlib.suppress(asyncio.QueueFull):
                    q.put_nowait(None)
        if self.state is not None:
            for conn in list(self.state.connections):
                with contextlib.suppress(Exception):
                    conn.shutdown()
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        with contextlib.suppress(OSError):
            self.path.unlink()

    # -- the app -------------------------------------------------------------------------------
    async def app(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return
        # h11 bounds a head that trickles in; one that arrives at once is measured here
        head = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
        head += sum(len(k) + len(v) + 4 for k, v in scope.get("headers") or ())
        if head > HEAD_SIZE:
            await self._refuse(scope, receive, send, 431, "request header fields too large", close=True)
            return
        key = self.key_of(receive)
        rec = self.services.instances.records.get(key) if key is not None else None
        if rec is None:
            await self._refuse(scope, receive, send, 403, "not authorized", close=True)
            return
        guest = self.guests.setdefault(key, Guest())
        if not guest.take():
            await self._refuse(scope, receive, send, 429, "too many requests", close=True)
            return
        ec, ed = self.services.instances.expanded(key)
        if _false(ec.get("security.devlxd")):
            await self._refuse(scope, receive, send, 403, "not authorized")
            return
        path = scope.get("raw_path") or scope["path"].encode()
        path = path.decode("latin-1")
        if scope["type"] == "websocket":
            if path == "/1.0/events":
                await self._events(scope, receive, send, key, websocket=True)
            else:
                await send({"type": "websocket.close", "code": 1008})
            return
        method = scope["method"]
        if path == "/1.0" and method == "PATCH":
            await self._patch(receive, send, key)
            return
        if method not in ("GET", "HEAD"):
            await self._text(send, 405, "method not allowed")
            return
        if path == "/":
            await self._json(send, ["/1.0"])
        elif path == "/1.0":
            await self._json(send, {"state": self.states.get(key, "Started"), "api_version": "1.0",
                                    "instance_type": rec.type or "container", "location": "none"})
        elif path == "/1.0/config":
            await self._json(send, [f"/1.0/config/{k}" for k in sorted(ec)
                                    if k.startswith("user.") or k.startswith("cloud-init.")])
        elif path.startswith("/1.0/config/"):
            k = unquote(path[len("/1.0/config/"):])
            if not (k.startswith("user.") or k.startswith("cloud-init.")):
                await self._text(send, 403, "not authorized")
            elif k not in ec:
                await self._text(send, 404, "not found")
            else:
                await self._raw(send, ec[k].encode())
        elif path == "/1.0/meta-data":
            iid = rec.config.get("volatile.cloud-init.instance-id") or rec.name
            text = f"#cloud-config\ninstance-id: {iid}\nlocal-hostname: {rec.name}\n{ec.get('user.meta-data', '')}"
            await self._raw(send, text.encode())
        elif path == "/1.0/devices":
            devices = {n: dict(d) for n, d in ed.items()}
            for n, d in devices.items():
                hw = rec.config.get(f"volatile.{n}.hwaddr")
                if d.get("type") == "nic" and not d.get("hwaddr") and hw:
                    d["hwaddr"] = hw
            await self._json(send, devices)
        elif path == "/1.0/events":
            await self._events(scope, receive, send, key, websocket=False)
        elif path.startswith("/1.0/images/") and path.endswith("/export"):
            await self._image(send, rec, ec, unquote(path[len("/1.0/images/"):-len("/export")]))
        else:
            await self._text(send, 404, "not found")

    # -- replies -------------------------------------------------------------------------------
    @staticmethod
    async def _reply(send, status: int, ctype: bytes, body: bytes, *, close: bool = False) -> None:
        headers = [(b"content-type", ctype), (b"content-length", b"%d" % len(body))]
        if status >= 400:
            headers.append((b"x-content-type-options", b"nosniff"))
        if close:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _json(self, send, value) -> None:
        await self._reply(send, 200, b"application/json", json.dumps(value).encode() + b"\n")

    async def _raw(self, send, data: bytes) -> None:
        await self._reply(send, 200, b"application/octet-stream", data)

    async def _text(self, send, status: int, text: str, *, close: bool = False) -> None:
        await self._reply(send, status, b"text/plain; charset=utf-8", (text + "\n").encode(), close=close)

    async def _refuse(self, scope, receive, send, status: int, text: str, *, close: bool = False) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.http.response.start", "status": status,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
            await send({"type": "websocket.http.response.body", "body": (text + "\n").encode()})
            return
        await self._text(send, status, text, close=close)

    async def _patch(self, receive, send, key: str) -> None:
        body = bytearray()
        try:
            async with asyncio.timeout(BODY_TIMEOUT):
                while True:
                    msg = await receive()
                    if msg["type"] == "http.disconnect":
                        return
                    body += msg.get("body", b"")
                    if len(body) > BODY_LIMIT:
                        await self._text(send, 413, "request body too large", close=True)
                        return
                    if not msg.get("more_body"):
                        break
        except TimeoutError:
            await self._text(send, 408, "request timeout", close=True)
            return
        try:
            doc = json.loads(body)
            state = doc.get("state") if isinstance(doc, dict) else None
        except ValueError:
            state = None
        if state not in STATES:
            await self._text(send, 400, "bad request")
            return
        self.states[key] = state
        await self._raw(send, b"")

    async def _image(self, send, rec, ec: dict, fingerprint: str) -> None:
        """As LXD: an exact fingerprint of an image the guest's project sees that is public or
        cached; a unified image is its one file, a split one a multipart/form-data body with the
        parts `metadata` and `rootfs` (given a Content-Length rather than chunked)."""
        from lxd_daemon.api.images import image_url
        from lxd_daemon.errors import LXDError

        if not _true(ec.get("security.devlxd.images")):
            await self._text(send, 403, "not authorized")
            return
        images = self.services.images
        try:
            img = await images.resolve(fingerprint, project=rec.project)
            if img["fingerprint"] != fingerprint or not (img["public"] or img["cached"]):
                raise LookupError
            fp, _, files = await images.files(fingerprint, project=rec.project)
            opened = await asyncio.to_thread(_open_all, [p for _, p in files])
        except (LXDError, LookupError, OSError):
            await self._text(send, 404, "not found")
            return
        try:
            sizes = [await asyncio.to_thread(os.fstat, f.fileno()) for f in opened]
            if len(files) == 1:
                pieces: list = [opened[0]]
                headers = [(b"content-type", b"application/octet-stream"),
                           (b"content-disposition", f"inline;filename={files[0][0]}".encode())]
            else:
                boundary = secrets.token_hex(16)
                pieces = []
                for i, ((name, _), f) in enumerate(zip(files, opened, strict=True)):
                    part = "metadata" if i == 0 else ("rootfs.img" if img.get("type") == "virtual-machine" else "rootfs")
                    pieces.append((b"\r\n" if i else b"") + (
                        f"--{boundary}\r\nContent-Disposition: form-data; name=\"{part}\"; filename=\"{name}\"\r\n"
                        "Content-Type: application/octet-stream\r\n\r\n").encode())
                    pieces.append(f)
                pieces.append(f"\r\n--{boundary}--\r\n".encode())
                headers = [(b"content-type", f"multipart/form-data; boundary={boundary}".encode())]
            size = sum(len(p) if isinstance(p, bytes) else 0 for p in pieces) + sum(st.st_size for st in sizes)
            headers.append((b"content-length", b"%d" % size))
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            for piece in pieces:
                if isinstance(piece, bytes):
                    await send({"type": "http.response.body", "body": piece, "more_body": True})
                    continue
                while chunk := await asyncio.to_thread(piece.read, 1 << 20):
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            for f in opened:
                f.close()
        if len(files) == 1:  # (LXD reports no retrieval of a split image)
            self.services.events.lifecycle("image-retrieved", image_url(fp, rec.project), project=rec.project)

    # -- events --------------------------------------------------------------------------------
    async def _events(self, scope, receive, send, key: str, *, websocket: bool) -> None:
        qs = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        types = frozenset(t for v in qs.get("type", []) for t in v.split(",") if t) or frozenset(("config", "device"))
        queue: asyncio.Queue = asyncio.Queue(EVENT_QUEUE)
        entry = (queue, types)
        if key not in self.snapshots:
            ec, ed = self.services.instances.expanded(key)
            self.snapshots[key] = (dict(ec), {n: dict(d) for n, d in ed.items()})
        self.listeners.setdefault(key, set()).add(entry)
        try:
            if websocket:
                await self._ws_stream(receive, send, queue)
            else:
                await self._raw_stream(receive, queue)
        finally:
            queues = self.listeners.get(key)
            if queues is not None:
                queues.discard(entry)
                if not queues:
                    del self.listeners[key]
                    self.snapshots.pop(key, None)

    async def _ws_stream(self, receive, send, queue: asyncio.Queue) -> None:
        msg = await receive()
        if msg["type"] != "websocket.connect":
            return
        await send({"type": "websocket.accept"})

        async def pump():
            while True:
                data = await queue.get()
                if data is None:
                    return
                await send({"type": "websocket.send", "text": data.decode()})

        async def drain():
            while (await receive())["type"] != "websocket.disconnect":
                pass

        await self._until_first(pump(), drain())
        with contextlib.suppress(Exception):
            await send({"type": "websocket.close", "code": 1000})

    async def _raw_stream(self, receive, queue: asyncio.Queue) -> None:
        # As LXD 5.0.2 without an upgrade: a bare response head, then one JSON event after another
        # on the connection itself (no chunked framing), until either side closes.
        transport = getattr(getattr(receive, "__self__", None), "transport", None)
        if transport is None:
            return
        transport.write(b"HTTP/1.1 200 OK\r\n\r\n")

        async def pump():
            while True:
                data = await queue.get()
                if data is None or transport.is_closing() or transport.get_write_buffer_size() > STREAM_BUFFER:
                    return
                transport.write(data + b"\n")

        async def drain():
            while (await receive())["type"] != "http.disconnect":
                pass

        try:
            await self._until_first(pump(), drain())
        finally:
            transport.close()

    @staticmethod
    async def _until_first(*coros) -> None:
        tasks = [asyncio.ensure_future(c) for c in coros]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _on_lifecycle(self, kind: str, metadata: dict) -> None:
        """The events hub's tap: an instance with guest listeners changed, or a profile (which
        any of them may use, from its own project or another's); send each the diff of its
        expanded config and devices since what it was last sent."""
        action = metadata.get("action")
        if action not in ("instance-updated", "profile-updated") or not self.listeners:
            return
        if action == "profile-updated":
            for key in list(self.listeners):
                self._send_diff(key)
            return
        from lxd_daemon.projects.naming import storage_name

        source = metadata.get("source", "")
        path, _, query = source.partition("?")
        if not path.startswith("/1.0/instances/"):
            return
        name = path[len("/1.0/instances/"):]
        project = (parse_qs(query).get("project") or ["default"])[0]
        self._send_diff(storage_name(project, name))

    def _send_diff(self, key: str) -> None:
        if key not in self.listeners or key not in self.services.instances.records:
            return
        try:
            ec, ed = self.services.instances.expanded(key)
        except Exception:  # a tap must not raise
            log.exception("cannot expand an instance's config", extra={"instance": key})
            return
        old_ec, old_ed = self.snapshots.get(key, ({}, {}))
        self.snapshots[key] = (dict(ec), {n: dict(d) for n, d in ed.items()})
        out: list[tuple[str, dict]] = []
        for k in sorted(set(ec) | set(old_ec)):
            if k.startswith("user.") and ec.get(k) != old_ec.get(k):
                out.append(("config", {"key": k, "old_value": old_ec.get(k, ""), "value": ec.get(k, "")}))
        for n in sorted(old_ed):
            if n not in ed:
                out.append(("device", {"action": "removed", "name": n, "config": old_ed[n]}))
        for n in sorted(ed):
            if n in old_ed and ed[n] != old_ed[n]:
                out.append(("device", {"action": "updated", "name": n, "config": ed[n]}))
        for n in sorted(ed):
            if n not in old_ed:
                out.append(("device", {"action": "added", "name": n, "config": ed[n]}))
        if out:
            self.send(key, out)

    def send(self, key: str, events: list[tuple[str, dict]]) -> None:
        from lxd_daemon.events.hub import rfc3339

        for queue, types in list(self.listeners.get(key, ())):
            for kind, meta in events:
                if kind not in types:
                    continue
                data = json.dumps({"type": kind, "timestamp": rfc3339(), "metadata": meta}).encode()
                try:
                    queue.put_nowait(data)
                except asyncio.QueueFull:  # a guest that does not read: end its stream
                    with contextlib.suppress(asyncio.QueueEmpty):
                        while True:
                            queue.get_nowait()
                    queue.put_nowait(None)
                    break


async def setup(services) -> list:
    """The /dev/lxd subsystem: listening from start-up, stopped at exit. No host API routes."""
    devlxd = DevLxd(services)
    services.devlxd = devlxd
    try:
        await devlxd.start()
    except Exception as e:  # the host API is still worth serving
        log.error("cannot serve /dev/lxd: %s", e)
        services.devlxd = None
        return []
    services.exit_hooks.append(devlxd.stop)
    return []
