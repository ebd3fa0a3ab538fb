"""socket_body: large Content-Length bodies spliced from uvicorn's socket into a file, served by
the daemon's own uvicorn configuration on uvloop and driven by a raw socket client."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import threading
import time
from pathlib import Path

import pytest
import uvloop
from starlette.requests import ClientDisconnect, Request

from lxd_daemon.api import socket_body
from lxd_daemon.daemon import make_server

BIG = 3 << 20


class Sink:
    """An ASGI app writing each request's body to `out`, the way the file API does."""

    def __init__(self, out: Path, append: bool = False, timeout: float = 10, chunked: bool = False):
        self.out = out
        self.append = append
        self.timeout = timeout
        self.chunked = chunked
        self.results: list[dict] = []

    async def __call__(self, scope, receive, send) -> None:
        request = Request(scope, receive)
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if self.append else os.O_TRUNC)
        fd = os.open(self.out, flags, 0o600)
        result = {"path": None, "error": None}
        try:
            body = await (socket_body.take(request, 0, chunked=True) if self.chunked else socket_body.take(request))
            if body is None:
                result["path"] = "stream"
                async for chunk in request.stream():
                    os.write(fd, chunk)
            else:
                result["path"] = "socket" if body.sock_fd >= 0 or not self.chunked else type(body).__name__
                result["written"] = await asyncio.wait_for(body.copy_to(fd), self.timeout)
        except (ClientDisconnect, TimeoutError) as e:
            result["error"] = type(e).__name__
        finally:
            os.close(fd)
            self.results.append(result)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain"), (b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})


def serve(tmp_path: Path, app, client) -> None:
    """Run app under the daemon's uvicorn config on uvloop; client(sock_path) runs in a thread."""
    path = tmp_path / "s.sock"

    async def main():
        server = make_server(app)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        sock.listen(8)
        sock.setblocking(False)
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            await asyncio.sleep(0.01)
        try:
            await asyncio.wait_for(asyncio.to_thread(client, str(path)), 30)
        finally:
            server.should_exit = True
            await asyncio.wait_for(task, 10)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


def connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    return s


def head(length: int | None = None, extra: str = "") -> bytes:
    size = f"Content-Length: {length}\r\n" if length is not None else "Transfer-Encoding: chunked\r\n"
    return f"POST /f HTTP/1.1\r\nHost: lxd\r\n{size}{extra}\r\n".encode()


def read_response(s: socket.socket) -> tuple[bytes, bool]:
    """(head, closed by the server after the response)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    header, _, rest = data.partition(b"\r\n\r\n")
    while len(rest) < 2:
        rest += s.recv(65536)
    s.settimeout(0.5)
    try:
        closed = s.recv(1) == b""
    except TimeoutError:
        closed = False
    return header.lower(), closed


def test_big_body_is_spliced_and_the_connection_closes(tmp_path):
    data = os.urandom(BIG)
    app = Sink(tmp_path / "out")
    seen = {}

    def client(path):
        with connect(path) as s:
            s.sendall(head(len(data)) + data)
            seen["head"], seen["closed"] = read_response(s)

    serve(tmp_path, app, client)
    assert app.results == [{"path": "socket", "error": None, "written": BIG}]
    assert hashlib.sha256((tmp_path / "out").read_bytes()).digest() == hashlib.sha256(data).digest()
    assert b"connection: close" in seen["head"] and seen["closed"]


def test_small_and_chunked_bodies_stream_and_keep_the_connection(tmp_path):
    small = os.urandom(100 << 10)
    big = os.urandom(BIG)
    app = Sink(tmp_path / "out", append=True)
    closed = []

    def client(path):
        with connect(path) as s:
            s.sendall(head(len(small)) + small)
            closed.append(read_response(s)[1])
            chunks = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (big[:BIG // 2], big[BIG // 2:]))
            s.sendall(head() + chunks + b"0\r\n\r\n")
            closed.append(read_response(s)[1])

    serve(tmp_path, app, client)
    assert [r["path"] for r in app.results] == ["stream", "stream"]
    assert closed == [False, False]
    assert (tmp_path / "out").read_bytes() == small + big


def test_expect_continue_is_answered_first(tmp_path):
    data = os.urandom(BIG)
    app = Sink(tmp_path / "out")

    def client(path):
        with connect(path) as s:
            s.sendall(head(len(data), "Expect: 100-continue\r\n"))
            assert s.recv(100).startswith(b"HTTP/1.1 100 Continue")
            s.sendall(data)
            read_response(s)

    serve(tmp_path, app, client)
    assert app.results[0]["path"] == "socket"
    assert (tmp_path / "out").read_bytes() == data


def test_append_target_uses_read_and_write(tmp_path):
    """splice(2) refuses O_APPEND files: the copy falls back to read()/write()."""
    (tmp_path / "out").write_bytes(b"before\n")
    data = os.urandom(BIG)
    app = Sink(tmp_path / "out", append=True)

    def client(path):
        with connect(path) as s:
            s.sendall(head(len(data)))
            time.sleep(0.05)
            s.sendall(data)
            read_response(s)

    serve(tmp_path, app, client)
    assert app.results[0]["path"] == "socket"
    assert (tmp_path / "out").read_bytes() == b"before\n" + data


def test_client_gone_mid_body_is_a_disconnect(tmp_path):
    part = os.urandom(2 << 20)
    app = Sink(tmp_path / "out")

    def client(path):
        with connect(path) as s:
            s.sendall(head(BIG) + part)
            time.sleep(0.3)
        deadline = time.monotonic() + 5
        while not app.results and time.monotonic() < deadline:
            time.sleep(0.05)

    serve(tmp_path, app, client)
    assert app.results == [{"path": "socket", "error": "ClientDisconnect"}]
    assert (tmp_path / "out").read_bytes() == part  # what arrived was written


def test_cancelled_copy_stops_its_thread(tmp_path):
    """A client that stalls mid-body: cancelling the copy ends its thread within a poll period."""
    app = Sink(tmp_path / "out", timeout=0.5)

    def client(path):
        with connect(path) as s:
            s.sendall(head(BIG) + os.urandom(1 << 20))
            deadline = time.monotonic() + 10
            while not app.results and time.monotonic() < deadline:
                time.sleep(0.05)

    serve(tmp_path, app, client)
    assert app.results == [{"path": "socket", "error": "TimeoutError"}]
    time.sleep(socket_body.POLL_MS / 1000 + 0.2)
    assert not [t for t in threading.enumerate() if t.name == "lxd-body"]


@pytest.mark.parametrize("length", [None, "x", str(socket_body.MIN_SIZE - 1)])
def test_no_take_over_without_a_large_content_length(length):
    headers = [] if length is None else [(b"content-length", length.encode())]
    request = Request({"type": "http", "method": "POST", "path": "/", "headers": headers, "query_string": b""})

    async def check():
        return await socket_body.take(request)

    assert asyncio.run(check()) is None


def test_no_take_over_outside_uvicorn():
    """An ASGI server other than uvicorn's httptools protocol: the caller streams."""
    calls = []

    async def receive():
        calls.append(1)
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/", "query_string": b"",
             "headers": [(b"content-length", str(BIG).encode())]}

    async def check():
        return await socket_body.take(Request(scope, receive))

    assert asyncio.run(check()) is None
    assert calls == []  # nothing was received


def test_write_all_and_drain_finish_short_writes(tmp_path):
    r, w = os.pipe()
    with contextlib.ExitStack() as stack:
        stack.callback(os.close, r)
        stack.callback(os.close, w)
        out = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o600)
        stack.callback(os.close, out)
        os.write(w, b"x" * 1000)
        assert socket_body._drain(r, out, 1000) == 1000
        assert socket_body._write_all(out, memoryview(b"y" * 10)) == 10
    assert (tmp_path / "f").read_bytes() == b"x" * 1000 + b"y" * 10


class Pieces:
    """An ASGI app reading a body as pieces (the image upload's way), answering with their sizes."""

    def __init__(self, stop_after: int | None = None):
        self.stop_after = stop_after
        self.results: list = []

    async def __call__(self, scope, receive, send) -> None:
        request = Request(scope, receive)
        body = await socket_body.take(request, 1 << 16)
        sizes, digest, error = [], hashlib.sha256(), None
        pieces = body.pieces(1 << 20)
        try:
            async for piece in pieces:
                sizes.append(len(piece))
                digest.update(piece)
                if self.stop_after is not None and len(sizes) >= self.stop_after:
                    break
        except ClientDisconnect as e:
            error = type(e).__name__
        finally:
            await pieces.aclose()
        self.results.append((sizes, digest.hexdigest(), error))
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain"), (b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})


def test_pieces_read_the_body_in_bounded_pieces(tmp_path):
    data = os.urandom(BIG + 12345)
    app = Pieces()

    def client(path):
        with connect(path) as s:
            s.sendall(head(len(data)) + data)
            read_response(s)

    serve(tmp_path, app, client)
    [(sizes, digest, error)] = app.results
    assert error is None and digest == hashlib.sha256(data).hexdigest() and sum(sizes) == len(data)
    assert max(sizes) <= 1 << 20 and len(sizes) >= 4


def test_pieces_stopped_early_end_their_thread(tmp_path):
    app = Pieces(stop_after=1)

    def client(path):
        with connect(path) as s:
            def send():  # blocks once the server stops reading; ends when the socket closes
                with contextlib.suppress(OSError):
                    s.sendall(head(BIG) + os.urandom(BIG))

            sender = threading.Thread(target=send)
            sender.start()
            read_response(s)
            s.shutdown(socket.SHUT_RDWR)
        sender.join(10)

    serve(tmp_path, app, client)
    assert len(app.results[0][0]) == 1
    assert socket_body.readers_busy() == 0


def test_pieces_report_a_client_that_left(tmp_path):
    app = Pieces()

    def client(path):
        with connect(path) as s:
            s.sendall(head(BIG) + os.urandom(1 << 20))
        deadline = time.monotonic() + 5
        while not app.results and time.monotonic() < deadline:
            time.sleep(0.05)

    serve(tmp_path, app, client)
    assert app.results[0][2] == "ClientDisconnect"


class Files:
    """An ASGI app answering with a file the way the image export does."""

    def __init__(self, path: Path):
        self.path = path
        self.senders: list = []

    async def __call__(self, scope, receive, send) -> None:
        from lxd_daemon.api.images import FileParts

        f = open(self.path, "rb")  # noqa: SIM115 - FileParts closes it
        size = os.fstat(f.fileno()).st_size
        probe = socket_body.FileSender.open(receive)
        self.senders.append(probe is not None)
        if probe is not None:
            probe.close()
        await FileParts([b"<head>", (f, size), b"<tail>"], media_type="application/octet-stream",
                        headers={})(scope, receive, send)


def test_files_are_sent_with_sendfile_and_the_connection_closes(tmp_path):
    data = os.urandom(BIG)
    (tmp_path / "f").write_bytes(data)
    app = Files(tmp_path / "f")
    got = {}

    def client(path):
        with connect(path) as s:
            s.sendall(b"GET /f HTTP/1.1\r\nHost: lxd\r\n\r\n")
            buf = b""
            while True:
                chunk = s.recv(1 << 16)
                if not chunk:
                    break
                buf += chunk
            got["head"], _, got["body"] = buf.partition(b"\r\n\r\n")
        with connect(path) as s:  # HEAD: the headers only
            s.sendall(b"HEAD /f HTTP/1.1\r\nHost: lxd\r\n\r\n")
            got["head2"] = s.recv(65536)

    serve(tmp_path, app, client)
    assert app.senders == [True, True]
    assert got["body"] == b"<head>" + data + b"<tail>"
    assert b"connection: close" in got["head"].lower()
    assert f"content-length: {len(data) + 12}".encode() in got["head2"].lower()
    assert b"connection: close" not in got["head2"].lower()


# -- chunked bodies ------------------------------------------------------------------------------
def chunked(data: bytes, sizes, ext: bool = False, trailer: bytes = b"") -> bytes:
    """data in chunks of the given sizes (cycled), then the last chunk and the trailer section."""
    out, i, k = [], 0, 0
    while i < len(data):
        n = sizes[k % len(sizes)]
        k += 1
        piece = data[i:i + n]
        i += n
        out.append(b"%x%s\r\n%s\r\n" % (len(piece), b";name=value" if ext and k % 3 == 0 else b"", piece))
    return b"".join(out) + b"0\r\n" + trailer + b"\r\n"


@pytest.mark.parametrize("pause", [False, True])
def test_chunked_first_request_is_taken_over(tmp_path, pause):
    """A chunked body (the stock client's uploads: 32 KiB chunks) on a connection's first request:
    decoded from the socket by a thread, whatever pieces the bytes arrive in."""
    data = os.urandom(BIG + 12345)
    wire = chunked(data, [32768, 1, 7000, 65536 * 3], ext=True, trailer=b"X-Sum: 1\r\n")
    app = Sink(tmp_path / "out", chunked=True)
    seen = {}

    def client(path):
        with connect(path) as s:
            s.sendall(head())
            if pause:  # the body arrives in odd pieces, splitting chunk lines
                for i in range(0, len(wire), 100003):
                    s.sendall(wire[i:i + 100003])
                    time.sleep(0.002)
            else:
                s.sendall(wire)
            seen["head"], seen["closed"] = read_response(s)

    serve(tmp_path, app, client)
    assert app.results == [{"path": "socket", "error": None, "written": len(data)}]
    assert (tmp_path / "out").read_bytes() == data
    assert b"connection: close" in seen["head"] and seen["closed"]


def test_chunked_body_split_anywhere_decodes_the_same():
    data = os.urandom(5000)
    wire = chunked(data, [1000, 1, 333], ext=True, trailer=b"A: b\r\n")
    for step in (1, 2, 3, 7, 64, 4096):
        dec = socket_body.Dechunker()
        got = bytearray()
        buf = bytearray(wire)
        for i in range(0, len(wire), step):
            for a, b in dec.feed(buf, i, min(i + step, len(wire))):
                got += buf[a:b]
        assert dec.done and bytes(got) == data, step


@pytest.mark.parametrize("bad", [b"zz\r\nabc\r\n", b"3\r\nabcdef\r\n", b"1" * 5000])
def test_broken_chunk_framing_is_refused(bad):
    dec = socket_body.Dechunker()
    with pytest.raises(socket_body.ChunkedBodyError):
        dec.feed(bytearray(bad), 0, len(bad))


def test_chunked_client_gone_mid_body_is_a_disconnect(tmp_path):
    data = os.urandom(BIG)
    wire = chunked(data, [32768])
    app = Sink(tmp_path / "out", chunked=True)

    def client(path):
        with connect(path) as s:
            s.sendall(head() + wire[: len(wire) // 2])
            time.sleep(0.3)
        deadline = time.monotonic() + 5
        while not app.results and time.monotonic() < deadline:
            time.sleep(0.05)

    serve(tmp_path, app, client)
    assert app.results == [{"path": "socket", "error": "ChunkedBodyError"}]


def test_chunked_body_on_a_kept_alive_connection_streams(tmp_path):
    """Only a connection's first request keeps its raw bytes: a later chunked request streams
    through uvicorn and the connection stays open."""
    small = os.urandom(1000)
    data = os.urandom(BIG)
    app = Sink(tmp_path / "out", chunked=True, append=True)
    closed = []

    def client(path):
        with connect(path) as s:
            s.sendall(head(len(small)) + small)
            closed.append(read_response(s)[1])
            s.sendall(head() + chunked(data, [32768]))
            closed.append(read_response(s)[1])

    serve(tmp_path, app, client)
    assert [r["path"] for r in app.results] == ["SocketBody", "stream"]  # (the first one whole)
    assert closed == [False, False]
    assert (tmp_path / "out").read_bytes() == small + data


class Diverter:
    """An ASGI app copying a chunked body to `out` while another thread has the range
    [at, at + size) written into a pipe instead, as `lxc import` does with a btrfs stream."""

    def __init__(self, out: Path, at: int, size: int):
        self.out, self.at, self.size = out, at, size
        self.piped = bytearray()
        self.result: dict = {}

    async def __call__(self, scope, receive, send) -> None:
        request = Request(scope, receive)
        fd = os.open(self.out, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        r, w = os.pipe()
        body = await socket_body.take(request, 0, chunked=True)
        assert isinstance(body, socket_body.ChunkedSocketBody)

        def claim() -> None:
            while os.fstat(fd).st_size <= self.at:  # some of the range is in the file already
                time.sleep(0.001)
            d = body.divert(self.at, self.size, w)
            assert d is not None and d.start >= self.at
            self.result["start"] = d.start
            os.write(w, os.pread(fd, d.start - self.at, self.at))
            d.go()
            d.wait()
            os.close(w)

        def drain() -> None:
            while chunk := os.read(r, 1 << 16):
                self.piped.extend(chunk)
            os.close(r)

        threads = [threading.Thread(target=claim), threading.Thread(target=drain)]
        for t in threads:
            t.start()
        self.result["written"] = await body.copy_to(fd)
        for t in threads:
            await asyncio.to_thread(t.join, 10)
        os.close(fd)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})


def test_a_range_of_a_chunked_body_is_diverted_into_a_pipe(tmp_path):
    data = os.urandom(BIG)
    at, size = 100_003, 2_000_001
    wire = chunked(data, [32768])
    app = Diverter(tmp_path / "out", at, size)

    def client(path):
        with connect(path) as s:
            s.sendall(head())
            for i in range(0, len(wire), 65536):  # slowly: the range is claimed while it arrives
                s.sendall(wire[i:i + 65536])
                time.sleep(0.001)
            read_response(s)

    serve(tmp_path, app, client)
    assert app.result["written"] == len(data)
    assert bytes(app.piped) == data[at:at + size]
    got = (tmp_path / "out").read_bytes()
    start = app.result["start"]
    assert len(got) == len(data) and got[:start] == data[:start] and got[at + size:] == data[at + size:]
    assert got[start:at + size] == bytes(at + size - start)  # never written: a hole
