"""`lxc image copy --mode push` {images_push_relay}: both ends.

Target side: the client asks the target for a push token (`POST /1.0/images` with
`{"source": {"mode": "push", "fingerprint": FP}, "aliases", "public", "properties", "expires_at"}`),
a token operation whose metadata carries the secret. The source then uploads the image to the
target's `POST /1.0/images` with `X-LXD-fingerprint` and `X-LXD-secret`, as an untrusted client if
need be: the token admits that one upload (it is used up at once) and supplies the image's aliases,
public flag, properties and expiry. The upload's operation carries a secret of its own so that the
untrusted source may wait for it (`GET /1.0/operations/<id>/wait?secret=`).

Source side: `POST /1.0/images/<fp>/export` `{"target", "secret", "certificate", "aliases",
"project", "profiles"}`: connect to the target over HTTPS (its certificate pinned when given, else
the system CAs), upload the image's file(s) with the token, wait for the target's operation.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import secrets
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlencode, urlsplit

from lxd_daemon.errors import BadRequest, Forbidden, LXDError
from lxd_daemon.images.index import HEX
from lxd_daemon.projects.naming import query
from lxd_daemon.util import tlspin
from lxd_daemon.util.sizes import format_rate

log = logging.getLogger("lxd.images")

CHUNK = 1 << 20
USER_AGENT = "LXD 5.0.2"
CONNECT_TIMEOUT = 30.0
WAIT_STEP = 30


# -- target side ----------------------------------------------------------------------------------

@dataclass
class PushToken:
    """What a push token gives the upload it admits."""

    fingerprint: str  # as the client named the image (a fingerprint, a prefix or an alias)
    aliases: list[dict]
    public: bool
    properties: dict[str, str] | None
    expires_at: float | None
    project: str = "default"  # of the request that made the token: the image lands in its images

    def check(self, fingerprint: str) -> None:
        """The uploaded image must be the one the token was made for (when it names one by hash)."""
        want = self.fingerprint.lower()
        if want and set(want) <= HEX and not fingerprint.startswith(want):
            raise BadRequest(f"Fingerprint mismatch: got {fingerprint}, expected {self.fingerprint}")


def create_token(ops, events, *, project: str, fingerprint: str, aliases: list[dict], public: bool,
                 properties: dict[str, str] | None, expires_at: str | None, requestor: dict | None = None):
    """The token operation of a push (the target side's first step)."""
    from lxd_daemon.images.service import check_alias_name, parse_time
    from lxd_daemon.ops.manager import CLASS_TOKEN

    if not fingerprint:
        raise BadRequest("A push needs the fingerprint of the image")
    expires = parse_time(expires_at)  # a bad value is refused now, not after the upload
    for alias in aliases:
        check_alias_name(alias["name"])
    secret = secrets.token_hex(32)
    metadata = {"aliases": aliases, "expires_at": expires_at, "properties": properties, "public": public,
                "secret": secret}
    url = f"/1.0/images/{quote(fingerprint, safe='')}{query(project)}"
    op = ops.create(cls=CLASS_TOKEN, description="Image download token", resources={"images": [url]},
                    metadata=metadata, may_cancel=True, project=project)
    op.push_token = PushToken(fingerprint, aliases, public, properties, expires, project)
    events.lifecycle("image-secret-created", url, requestor=requestor, project=project)
    return op


async def take_token(ops, fingerprint: str, secret: str) -> PushToken | None:
    """The push token with this secret (used up now: a token admits one upload), or None.

    The secret alone names the token: the source may name the image by its full fingerprint where
    the client named it by alias; the upload is checked against the token afterwards."""
    from lxd_daemon.ops.manager import CLASS_TOKEN

    if not secret:
        return None
    op = ops.find(lambda o: o.cls == CLASS_TOKEN and not o.status.final
                  and getattr(o, "push_token", None) is not None
                  and isinstance(o.metadata, dict) and secrets.compare_digest(str(o.metadata.get("secret")), secret))
    if op is None:
        return None
    token = op.push_token
    try:
        await op.cancel()
    except LXDError:  # cancelled meanwhile: used by another upload
        return None
    if fingerprint and token.fingerprint and set(token.fingerprint.lower()) <= HEX \
            and set(fingerprint.lower()) <= HEX and not fingerprint.lower().startswith(token.fingerprint.lower()):
        raise Forbidden("not authorized")
    return token


def new_wait_secret() -> str:
    return secrets.token_hex(32)


# -- source side ----------------------------------------------------------------------------------

def target_url(url: str) -> tuple[str, int, str]:
    """(host, port, base path) of a push target, which must be an https URL."""
    parts = urlsplit(url or "")
    if parts.scheme != "https" or not parts.hostname:
        raise BadRequest(f"The push target must be an https:// URL of the target server (got {url!r}); "
                         "a server reached through its unix socket can't be pushed to")
    try:
        port = parts.port or 8443
    except ValueError:
        raise BadRequest(f"Invalid target URL {url!r}") from None
    return parts.hostname, port, parts.path.rstrip("/")


@dataclass
class PushJob:
    url: str
    certificate: str
    secret: str
    fingerprint: str
    files: list[tuple[str, Path]]  # [(name, path)]: one file, or a split image's metadata and rootfs
    filename: str
    project: str = ""


class _Body:
    """The upload body: the raw file, or a multipart form of a split image's two files, read in
    1 MiB pieces (stoppable, with progress)."""

    def __init__(self, files: list[tuple[str, Path]], stop: threading.Event, progress: Callable[[int, int], None]):
        self.files = files
        self.stop = stop
        self.progress = progress
        self.boundary = uuid.uuid4().hex
        if len(files) == 1:
            self.content_type = "application/octet-stream"
            self.pieces: list[bytes | Path] = [files[0][1]]
        else:
            self.content_type = f"multipart/form-data; boundary={self.boundary}"
            (meta_name, meta), (root_name, root) = files
            self.pieces = [self._head("metadata", meta_name, first=True), meta,
                           self._head("rootfs", root_name), root, f"\r\n--{self.boundary}--\r\n".encode()]
        self.length = sum(len(p) if isinstance(p, bytes) else p.stat().st_size for p in self.pieces)

    def _head(self, field: str, name: str, first: bool = False) -> bytes:
        return (("" if first else "\r\n") + f"--{self.boundary}\r\nContent-Disposition: form-data; "
                f"name=\"{field}\"; filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n").encode()

    def __iter__(self) -> Iterator[bytes]:
        sent = 0
        for piece in self.pieces:
            if isinstance(piece, bytes):
                sent += len(piece)
                yield piece
                continue
            with open(piece, "rb") as f:
                while chunk := f.read(CHUNK):
                    if self.stop.is_set():
                        raise LXDError("Push cancelled")
                    sent += len(chunk)
                    self.progress(sent, self.length)
                    yield chunk


def _connect(host: str, port: int, ctx: ssl.SSLContext) -> http.client.HTTPSConnection:
    conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=CONNECT_TIMEOUT, blocksize=CHUNK)
    try:
        conn.connect()
    except tlspin.PinMismatch as e:
        conn.close()
        raise Forbidden(str(e)) from None
    except OSError as e:
        conn.close()
        raise LXDError(f"Failed to connect to the target server: {e}") from None
    except BaseException:
        conn.close()
        raise
    return conn


def _exchange(host: str, port: int, ctx: ssl.SSLContext, method: str, path: str, *, headers: dict,
              body=None, timeout: float | None = None, lost: str, refused: str) -> dict:
    """One request on a connection of its own; the JSON answer. `lost` prefixes a connection
    failure, `refused` an error answer (_read_json)."""
    conn = _connect(host, port, ctx)
    try:
        if timeout is not None:
            conn.sock.settimeout(timeout)
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
        except OSError as e:
            raise LXDError(f"{lost}: {e}") from None
        return _read_json(resp, refused)
    finally:
        conn.close()


def _read_json(resp: http.client.HTTPResponse, what: str) -> dict:
    raw = resp.read()
    try:
        doc = json.loads(raw)
    except ValueError:
        raise LXDError(f"{what}: the target answered {resp.status} without an LXD response") from None
    if not isinstance(doc, dict):
        raise LXDError(f"{what}: unexpected answer from the target")
    if doc.get("type") == "error" or resp.status >= 400:
        raise LXDError(f"{what}: {doc.get('error') or resp.reason} ({doc.get('error_code') or resp.status})")
    return doc


def push(job: PushJob, stop: threading.Event, progress: Callable[[int, int], None]) -> str:
    """Upload the image to the target and wait for its operation (blocking: run in a thread).
    Returns the fingerprint the target reports."""
    host, port, base = target_url(job.url)
    ctx = tlspin.client_context(job.certificate, what="target server")
    body = _Body(job.files, stop, progress)
    query = f"?{urlencode({'project': job.project})}" if job.project and job.project != "default" else ""
    headers = {
        "Content-Type": body.content_type, "Content-Length": str(body.length), "User-Agent": USER_AGENT,
        "X-LXD-fingerprint": job.fingerprint, "X-LXD-secret": job.secret, "X-LXD-filename": job.filename,
    }
    doc = _exchange(host, port, ctx, "POST", f"{base}/1.0/images{query}", body=iter(body), headers=headers,
                    lost="Failed to upload the image to the target", refused="Image upload refused")
    op = doc.get("metadata") or {}
    op_id = op.get("id") if isinstance(op, dict) else None
    if doc.get("type") != "async" or not op_id:
        raise LXDError("Image upload: the target did not start an operation")
    wait_secret = (op.get("metadata") or {}).get("secret", "")
    # Waits of WAIT_STEP seconds, so that a target that goes away is noticed.
    path = f"{base}/1.0/operations/{quote(op_id, safe='')}/wait?" + urlencode({"secret": wait_secret,
                                                                              "timeout": WAIT_STEP})
    while True:
        if stop.is_set():
            raise LXDError("Push cancelled")
        result = _exchange(host, port, ctx, "GET", path, headers={"User-Agent": USER_AGENT},
                           timeout=WAIT_STEP + CONNECT_TIMEOUT,
                           lost="Lost the target server while it imported the image",
                           refused="Waiting for the target")
        meta = result.get("metadata") or {}
        if meta.get("status_code") == 200:
            return (meta.get("metadata") or {}).get("fingerprint", "")
        if meta.get("status_code") in (400, 401):
            raise LXDError(f"The target failed to import the image: {meta.get('err') or meta.get('status')}")
        time.sleep(0.1)  # not final yet: the import goes on, wait again


async def run_push(op, job: PushJob) -> str:
    """Run push() in a thread with progress in the operation's metadata; a cancelled operation
    stops the upload."""
    loop = asyncio.get_running_loop()
    stop = threading.Event()
    started = time.monotonic()
    last = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] < 0.5 and done < total:
            return
        last[0] = now
        pct = int(done * 100 / total) if total else 100
        speed = int(done / max(now - started, 1e-3))
        meta = {"progress": {"stage": "upload", "percent": str(pct), "processed": str(done), "speed": str(speed)},
                "upload_progress": f"Upload: {pct}% ({format_rate(speed)}/s)"}
        loop.call_soon_threadsafe(op.update_metadata, meta)

    try:
        return await asyncio.to_thread(push, job, stop, progress)
    except asyncio.CancelledError:
        stop.set()
        raise



__all__ = ["PushToken", "PushJob", "create_token", "take_token", "run_push", "push", "target_url",
           "new_wait_secret"]
