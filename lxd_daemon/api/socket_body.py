"""Large request bodies moved from the connection's socket into a file by splice(2).

Through ASGI, uvicorn (httptools on uvloop) hands a body over in pieces of at most 256 KB, each
one copied four times in user space (uvloop's read buffer, httptools' slice, uvicorn's bytearray,
the bytes given to the app) and each a round trip through the event loop: a 100 MiB upload costs
more CPU there than writing it to disk. For a plain `Content-Length` body on a connection without
TLS, take() hands the rest of the body to one thread of its own, which splices it from the
socket through a pipe into the file without it entering user space at all. A chunked body (the
stock client's uploads) is decoded by such a thread too, when the caller asks for it
(take(chunked=True), see take_chunked()).

The hand-over (only with uvicorn's httptools protocol, which keeps no body bytes of its own
beyond the ones it has parsed; anything else returns None and the caller reads the ASGI stream):
the first `receive()` goes through uvicorn as usual (so `Expect: 100-continue` is answered);
then, without yielding to the event loop, reading on the transport is paused and the body bytes
uvicorn has parsed but not delivered are taken over. The rest, `Content-Length` minus what was
taken, is read from a duplicate of the socket's descriptor (ours even if the connection closes
meanwhile). The HTTP parser still expects those bytes, so the connection is no longer kept alive:
the response carries `Connection: close` and uvicorn closes the connection after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import select
import socket
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from starlette.requests import ClientDisconnect, Request

MIN_SIZE = 1 << 20  # smaller bodies stream through ASGI (and keep their connection alive)
PIPE_SIZE = 1 << 20
READ_BUFFER = 1 << 20  # for the read()/write() fallback
POLL_MS = 500  # how often a waiting copy checks whether it was cancelled
PIECE_SIZE = 4 << 20  # pieces() reads the body in pieces of this size...
PIECES_AHEAD = 2  # ...and keeps at most this many waiting for the consumer
# pieces() readers: kept threads (a new one per upload cost about 1 ms more for a 1 MB image); a
# client that stalls holds one until it is cancelled, so there are plenty.
_READERS = ThreadPoolExecutor(max_workers=64, thread_name_prefix="lxd-body")
_busy: set = set()


def readers_busy() -> int:
    """How many pieces() readers are reading (none once their consumers are done)."""
    return len(_busy)
SEND_BUFFER = 4 << 20
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)  # root may exceed net.core.wmem_max
_HTTPTOOLS_CYCLE = "uvicorn.protocols.http.httptools_impl"


class _Stopped(Exception):
    """The coroutine awaiting the copy was cancelled."""


class SocketBody:
    """A request body: `head` (already received) and `remaining` bytes still on the socket."""

    def __init__(self, head: bytes, sock_fd: int = -1, remaining: int = 0):
        self.head = head
        self.sock_fd = sock_fd
        self.remaining = remaining
        self._stop = threading.Event()

    async def copy_to(self, fd: int) -> int:
        """Write the whole body to fd at its current offset; returns the bytes written.

        The copy runs in a thread of its own, not in the shared executor, so that a client that
        stalls mid-body holds no thread that other requests need. The descriptors stay valid
        until that thread has ended, also when this coroutine is cancelled."""
        try:
            return await in_own_thread(lambda: self._copy(fd), self._stop, "lxd-body")
        finally:
            self.close()

    async def pieces(self, size: int = PIECE_SIZE) -> AsyncIterator[bytes | bytearray]:
        """The body as pieces of up to `size` bytes, for callers that need the bytes themselves.

        A reader thread reads the socket into a fresh buffer per piece (one copy, where the
        ASGI stream makes four, and one event-loop wake-up per piece instead of per 64 KiB); at
        most PIECES_AHEAD pieces wait for the consumer, so memory stays bounded."""
        if not self.remaining:
            if self.head:
                yield self.head
            self.close()
            return
        # A body that fits in one piece comes whole, with the head (one buffer, one copy).
        first = bytearray(len(self.head) + self.remaining) if len(self.head) + self.remaining <= size else None
        if first is not None:
            first[:len(self.head)] = self.head
        elif self.head:
            yield self.head
        loop = asyncio.get_running_loop()
        ready: asyncio.Queue = asyncio.Queue()
        room = threading.Semaphore(PIECES_AHEAD)

        def run() -> None:
            _busy.add(self)
            try:
                while self.remaining:
                    while not room.acquire(timeout=POLL_MS / 1000):
                        if self._stop.is_set():
                            raise _Stopped()
                    if first is not None:
                        piece, filled = first, len(self.head)
                    else:
                        piece, filled = bytearray(min(self.remaining, size)), 0
                    view = memoryview(piece)
                    while filled < len(piece):
                        try:
                            n = os.readv(self.sock_fd, [view[filled:]])
                        except BlockingIOError:
                            self._wait_readable()
                            continue
                        if n == 0:
                            raise ClientDisconnect()
                        filled += n
                        self.remaining -= n
                    loop.call_soon_threadsafe(ready.put_nowait, (piece, None))
                outcome = (None, None)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                outcome = (None, e)
            finally:
                _busy.discard(self)
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(ready.put_nowait, outcome)

        reading = loop.run_in_executor(_READERS, run)
        try:
            while True:
                piece, error = await ready.get()
                if piece is None:
                    if error is not None:
                        raise error
                    return
                room.release()
                yield piece
        finally:
            self._stop.set()
            if not reading.done():  # the consumer stopped early: the reader ends within POLL_MS
                await asyncio.wait([reading])
            self.close()

    def close(self) -> None:
        if self.sock_fd >= 0:
            os.close(self.sock_fd)
            self.sock_fd = -1

    # -- in the copying thread ----------------------------------------------------------------
    def _copy(self, fd: int) -> int:
        try:
            written = _write_all(fd, memoryview(self.head))
            if not self.remaining:
                return written
            if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND:  # splice(2) refuses O_APPEND files
                return written + self._read_copy(fd)
            return written + self._splice_copy(fd)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                self.discard_rest()
            raise

    def discard_rest(self) -> None:
        """Read and drop the rest of the body (the file it was going to is full): a client still
        sending would otherwise get a broken pipe instead of the answer that says why."""
        buf = memoryview(bytearray(min(self.remaining, READ_BUFFER)))
        while self.remaining > 0 and self.sock_fd >= 0:
            try:
                n = os.readv(self.sock_fd, [buf[:min(self.remaining, len(buf))]])
            except BlockingIOError:
                self._wait_readable()
                continue
            except OSError:
                return
            if n == 0:
                return
            self.remaining -= n

    def _splice_copy(self, fd: int) -> int:
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            with contextlib.suppress(OSError):
                fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            size = fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
            written = 0
            while self.remaining:
                try:
                    n = os.splice(self.sock_fd, w, min(self.remaining, size), flags=os.SPLICE_F_MOVE)
                except BlockingIOError:
                    self._wait_readable()
                    continue
                except OSError as e:
                    if e.errno == errno.EINVAL and not written:  # no splice on this socket
                        return self._read_copy(fd)
                    raise
                if n == 0:
                    raise ClientDisconnect()
                self.remaining -= n
                written += _drain(r, fd, n)
            return written
        finally:
            os.close(r)
            os.close(w)

    def _read_copy(self, fd: int) -> int:
        buf = memoryview(bytearray(min(self.remaining, READ_BUFFER)))
        written = 0
        while self.remaining:
            try:
                n = os.readv(self.sock_fd, [buf[:min(self.remaining, len(buf))]])
            except BlockingIOError:
                self._wait_readable()
                continue
            if n == 0:
                raise ClientDisconnect()
            self.remaining -= n
            written += _write_all(fd, buf[:n])
        return written

    def _wait_readable(self) -> None:
        poller = select.poll()
        poller.register(self.sock_fd, select.POLLIN)
        while not poller.poll(POLL_MS):
            if self._stop.is_set():
                raise _Stopped()


async def in_own_thread(fn, stop: threading.Event, name: str):
    """fn() on a thread of its own (not the shared executor: a client that stalls holds no thread
    that other requests need). When the caller is cancelled, `stop` is set and the thread waited
    for (fn polls it every POLL_MS), so that the descriptors fn uses stay valid until it ends."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def run() -> None:
        try:
            outcome = (fn(), None)
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine
            outcome = (None, e)
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
            loop.call_soon_threadsafe(_settle, done, outcome)

    threading.Thread(target=run, name=name, daemon=True).start()
    try:
        return await asyncio.shield(done)
    except asyncio.CancelledError:
        stop.set()
        while not done.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([done])
        done.exception()  # retrieved: the cancellation is what the caller reports
        raise


def _settle(done: asyncio.Future, outcome: tuple) -> None:
    if done.done():
        return
    result, exc = outcome
    if exc is None:
        done.set_result(result)
    else:
        done.set_exception(exc)


def _write_all(fd: int, data: memoryview) -> int:
    total = len(data)
    while data:
        data = data[os.write(fd, data):]
    return total


def _drain(r: int, fd: int, n: int) -> int:
    """Splice the n bytes in the pipe into fd."""
    left = n
    while left:
        m = os.splice(r, fd, left, flags=os.SPLICE_F_MOVE)
        if m == 0:
            raise OSError(errno.EIO, "the file took no data")
        left -= m
    return n


def _uvicorn_cycle(request: Request):
    """uvicorn's httptools RequestResponseCycle behind request.receive, or None."""
    return _cycle_of(request.receive)


def _cycle_of(receive):
    cycle = getattr(receive, "__self__", None)
    if type(cycle).__module__ != _HTTPTOOLS_CYCLE:
        return None
    if not all(hasattr(cycle, a) for a in ("transport", "flow", "body", "more_body", "keep_alive",
                                           "expected_content_length")):
        return None
    transport = cycle.transport
    if transport.get_extra_info("sslcontext") is not None or transport.get_extra_info("socket") is None:
        return None
    return cycle


def _is_chunked(request: Request) -> bool:
    te = request.headers.get("transfer-encoding", "")
    return te.strip().lower() == "chunked" and "content-length" not in request.headers


def _content_length(request: Request) -> int:
    if "transfer-encoding" in request.headers:
        return -1
    try:
        return int(request.headers.get("content-length", ""))
    except ValueError:
        return -1


async def _receive_head(request: Request, cycle) -> tuple[bytes, bool]:
    """The body's first piece through uvicorn (which answers `Expect: 100-continue`) plus what it
    has parsed but not delivered; then, with no await after the first piece, reading on the
    transport is paused. Returns (those bytes, whether more of the body is still to come)."""
    message = await request.receive()
    if message["type"] != "http.request":
        raise ClientDisconnect()
    head = message.get("body", b"")
    if not message.get("more_body", False):
        return head, False
    cycle.flow.pause_reading()
    head += bytes(cycle.body)
    cycle.body = cycle.body[:0]
    return head, bool(cycle.more_body)  # not more: the rest had arrived already


async def take(request: Request, min_size: int = MIN_SIZE, max_size: int = -1,
               chunked: bool = False) -> SocketBody | None:
    """The request's body as a SocketBody, or None (nothing received) when it is smaller than
    min_size (or bigger than max_size), chunked (unless `chunked`: see take_chunked()) or not on
    a connection this can take over: read request.stream() then."""
    if chunked and _is_chunked(request):
        return await take_chunked(request)
    length = _content_length(request)
    if length < min_size or (max_size >= 0 and length > max_size):
        return None
    cycle = _uvicorn_cycle(request)
    if cycle is None:
        return None
    head, more = await _receive_head(request, cycle)
    if not more:
        return SocketBody(head)
    # From here to the return there is no await: uvicorn cannot read or parse meanwhile.
    cycle.keep_alive = False
    sock_fd = os.dup(cycle.transport.get_extra_info("socket").fileno())
    return SocketBody(head, sock_fd, max(0, length - len(head)))


# -- chunked request bodies --------------------------------------------------------------------
#
# `lxc import` (and every upload of the stock client) sends `Transfer-Encoding: chunked` in
# pieces of 32 KiB: through uvicorn each piece costs a parser callback, a copy and an event-loop
# wake-up. The takeover needs to know where in the chunk framing uvicorn's parser stopped, which
# httptools does not tell; so the daemon's protocol (daemon.py) keeps the raw bytes of each
# connection's first request (up to RAW_LIMIT) and take_chunked() decodes them again itself: its
# result must equal what uvicorn delivered, else nothing is taken over. The rest is read from the
# socket and decoded in a thread of its own, its data written to the file with pwritev (one copy)
# or, for a range another thread asked for (ChunkedSocketBody.divert), into that thread's pipe.

RAW_LIMIT = 1 << 20  # raw bytes kept per connection's first request (see daemon.py): uvicorn pauses reading
# once 64 KiB of body wait for the app, so a takeover finds far less than this
MAX_CHUNK_LINE = 4096  # a chunk-size line (with extensions) or trailer line longer than this is refused


class ChunkedBodyError(ClientDisconnect):
    """The chunked framing is broken (or the client left mid-body): the upload is incomplete."""


class Dechunker:
    """Incremental decoder of HTTP/1.1 chunked framing (RFC 9112 7.1): chunk-size lines (with
    extensions, ignored), data, the CRLF after it, the last chunk and the trailer section."""

    SIZE, DATA, DATA_END, TRAILER, DONE = range(5)

    def __init__(self):
        self.state = self.SIZE
        self.left = 0  # data bytes still due in the current chunk
        self.line = bytearray()

    @property
    def done(self) -> bool:
        return self.state == self.DONE

    def feed(self, buf, start: int, end: int) -> list[tuple[int, int]]:
        """Decode buf[start:end]; returns the (start, stop) ranges of body data in it, in order.
        Bytes after the end of the body are ignored (the connection closes after the answer)."""
        out: list[tuple[int, int]] = []
        i = start
        while i < end and self.state != self.DONE:
            if self.state == self.DATA:
                n = min(self.left, end - i)
                out.append((i, i + n))
                i += n
                self.left -= n
                if not self.left:
                    self.state = self.DATA_END
                continue
            j = buf.find(b"\n", i, end)
            if j < 0:
                self.line += buf[i:end]
                if len(self.line) > MAX_CHUNK_LINE:
                    raise ChunkedBodyError("a chunk line is too long")
                break
            if self.line:
                self.line += buf[i:j]
                line = bytes(self.line)
                self.line.clear()
            else:
                line = bytes(buf[i:j])
            i = j + 1
            if len(line) > MAX_CHUNK_LINE:
                raise ChunkedBodyError("a chunk line is too long")
            self._line(line[:-1] if line.endswith(b"\r") else line)
        return out

    def _line(self, line: bytes) -> None:
        if self.state == self.DATA_END:
            if line:
                raise ChunkedBodyError("a chunk's data is longer than its size")
            self.state = self.SIZE
        elif self.state == self.SIZE:
            size = line.split(b";", 1)[0].strip()
            try:
                if not size or any(c not in b"0123456789abcdefABCDEF" for c in size) or len(size) > 15:
                    raise ValueError
                self.left = int(size, 16)
            except ValueError:
                raise ChunkedBodyError(f"invalid chunk size line {line[:40]!r}") from None
            self.state = self.DATA if self.left else self.TRAILER
        elif self.state == self.TRAILER and not line:
            self.state = self.DONE


class Diversion:
    """Body bytes [start, end) written into another descriptor (a pipe) than the body's file; see
    ChunkedSocketBody.divert()."""

    def __init__(self, start: int, end: int, fd: int):
        self.start = start
        self.end = end
        self.fd = fd
        self.active = threading.Event()  # the claimer wrote what came before `start` into fd
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.broken = False  # fd took no more: the rest of the range goes to the file

    def go(self) -> None:
        self.active.set()

    def abort(self, error: BaseException) -> None:
        """The claimer gives up (its descriptor is gone): the reader writes the range to the file."""
        self.error = error
        self.broken = True
        self.active.set()

    def wait(self, stopped=lambda: False) -> None:
        """Wait until the range went into fd; raises what stopped it."""
        while not self.done.wait(POLL_MS / 1000):
            if stopped():
                raise _Stopped()
        if self.error is not None:
            raise self.error


class ChunkedSocketBody(SocketBody):
    """A chunked request body: `head` (decoded already) and the rest on the socket, decoded by
    `decoder`, which stands where the head ended. Only copy_to() (and discard_rest) read it.

    A part of the body can go elsewhere than the file (divert(): `lxc import`'s btrfs streams
    go straight into `btrfs receive`, never written into the upload's file nor read back from
    it); the file then has a hole there."""

    def __init__(self, head: bytes, sock_fd: int, decoder: Dechunker):
        super().__init__(head, sock_fd, 0 if decoder.done else 1)
        self.decoder = decoder
        self.pos = 0  # body bytes handled (written to the file or diverted)
        self.finished = False
        self._mu = threading.Lock()
        self._div: Diversion | None = None

    async def pieces(self, size: int = PIECE_SIZE):  # pragma: no cover - not used for chunked bodies
        raise NotImplementedError("a chunked body is only copied to a file")
        yield b""

    # -- another thread's side ---------------------------------------------------------------------
    def divert(self, offset: int, size: int, fd: int) -> Diversion | None:
        """Have the body bytes [offset, offset + size) that are not in the file yet written into
        `fd` instead, in order. None when they are all in the file already (or the body ended).
        Otherwise the caller writes [offset, d.start) into fd itself (from the file), then calls
        d.go() (or d.abort()), then d.wait()."""
        with self._mu:
            end = offset + size
            if self.finished or self.pos >= end or self._div is not None:
                return None
            d = Diversion(max(self.pos, offset), end, fd)
            self._div = d
            return d

    # -- in the copying thread -------------------------------------------------------------------
    def _copy(self, fd: int) -> int:
        try:
            self._emit(fd, [memoryview(self.head)])
            buf = bytearray(READ_BUFFER)
            view = memoryview(buf)
            dec = self.decoder
            while not dec.done:
                if self._splice_diverted(dec):
                    continue
                n = self._read_into(view)
                ranges = dec.feed(buf, 0, n)
                if ranges:
                    self._emit(fd, [view[a:b] for a, b in ranges])
            if os.fstat(fd).st_size < self.pos:  # it ended in a diverted range: the file's size is the body's
                os.ftruncate(fd, self.pos)
        except BaseException as e:
            self._end_diversion(e if isinstance(e, OSError | ClientDisconnect) else ChunkedBodyError(str(e)))
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                self.discard_rest()
            raise
        finally:
            with self._mu:
                self.finished = True
            if self._peek_sock is not None:
                self._peek_sock.close()
                self._peek_sock = None
        self._end_diversion(ChunkedBodyError("the body ended before the part asked for"))
        self.remaining = 0
        return self.pos

    _can_splice = True

    def _splice_diverted(self, dec: Dechunker) -> int:
        """Chunk data inside an active diversion goes from the socket into the diversion's pipe
        within the kernel (splice(2)), never through this process: for `lxc import` the
        btrfs stream, most of the body. Returns how much moved; 0 when this can't be done now
        (then the data is read and written as usual)."""
        if not self._can_splice:
            return 0
        with self._mu:
            d, at = self._div, self.pos
        if d is None or d.broken or not d.active.is_set() or not d.start <= at < d.end:
            return 0
        if dec.state != dec.DATA:
            return self._take_chunk_lines(dec)
        want = min(dec.left, d.end - at, PIPE_SIZE)
        while True:
            try:
                n = os.splice(self.sock_fd, d.fd, want, flags=os.SPLICE_F_MOVE)
                break
            except BlockingIOError:
                self._wait_readable()
            except OSError as e:
                if e.errno == errno.EINVAL:  # not a socket and a pipe (a test's file): as usual
                    self._can_splice = False
                    return 0
                # The pipe's reader is gone: nothing moved; as in _emit, the rest of the range
                # goes to the file.
                d.error = e
                d.broken = True
                return 0
        if n == 0:
            raise ChunkedBodyError("the client left before the end of the body")
        dec.left -= n
        if not dec.left:
            dec.state = dec.DATA_END
        with self._mu:
            self.pos += n
            finished = self.pos >= d.end
            if finished:
                self._div = None
        if finished:
            d.done.set()
        return n

    _peek_sock: socket.socket | None = None

    def _take_chunk_lines(self, dec: Dechunker) -> int:
        """Between two chunks of a diverted range: read exactly the end of one chunk's data and the
        next chunk's size line (looked at first with MSG_PEEK), so that the next read of the
        socket is that chunk's data, for _splice_diverted. Returns the bytes read; 0 (nothing
        read) when the lines are not all there yet or are not plain ones."""
        if dec.state not in (dec.DATA_END, dec.SIZE) or dec.line:
            return 0
        if self._peek_sock is None:
            self._peek_sock = socket.fromfd(self.sock_fd, socket.AF_UNIX, socket.SOCK_STREAM)
        while True:
            try:
                peek = self._peek_sock.recv(64, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                break
            except BlockingIOError:
                self._wait_readable()
        end = 0
        for _ in range(2 if dec.state == dec.DATA_END else 1):
            nl = peek.find(b"\n", end)
            if nl < 0:
                return 0
            end = nl + 1
        lines = bytearray()
        while len(lines) < end:
            got = os.read(self.sock_fd, end - len(lines))
            if not got:
                raise ChunkedBodyError("the client left before the end of the body")
            lines += got
        if dec.feed(lines, 0, end):  # pragma: no cover - lines only: no data in them
            raise ChunkedBodyError("unexpected data in a chunk line")
        return end

    def _end_diversion(self, error: BaseException) -> None:
        with self._mu:
            d, self._div = self._div, None
        if d is not None and not d.done.is_set():
            d.error = d.error or error
            d.done.set()

    def _emit(self, fd: int, pieces: list[memoryview]) -> None:
        """Body bytes from self.pos on: into the file at their offset, or into a diversion."""
        while pieces:
            total = sum(len(p) for p in pieces)
            with self._mu:  # (self.pos moves under the lock: divert() sees where the file ends up)
                d = self._div
                at = self.pos
                if d is None or d.start >= at + total:
                    self.pos += total
                elif d.start > at:
                    self.pos = d.start
            if d is None or d.start >= at + total:
                _pwritev_all(fd, pieces, at)
                return
            if d.start > at:
                head, pieces = _split(pieces, d.start - at)
                _pwritev_all(fd, head, at)
                continue
            # self.pos is inside the diverted range
            while not d.active.wait(POLL_MS / 1000):
                if self._stop.is_set():
                    raise _Stopped()
            part, pieces = _split(pieces, d.end - self.pos)
            n = sum(len(p) for p in part)
            if not d.broken:
                try:
                    _writev_all(d.fd, list(part))
                except OSError as e:  # (the pipe's reader is gone: the rest goes to the file)
                    d.error = e
                    d.broken = True
            if d.broken:
                _pwritev_all(fd, part, self.pos)
            self.pos += n
            if self.pos >= d.end:
                with self._mu:
                    self._div = None
                d.done.set()

    def _read_into(self, view: memoryview) -> int:
        while True:
            try:
                n = os.readv(self.sock_fd, [view])
            except BlockingIOError:
                self._wait_readable()
                continue
            if n == 0:
                raise ChunkedBodyError("the client left before the end of the body")
            return n

    def discard_rest(self) -> None:
        buf = bytearray(READ_BUFFER)
        view = memoryview(buf)
        with contextlib.suppress(OSError, ClientDisconnect, _Stopped):
            while not self.decoder.done and self.sock_fd >= 0:
                self.decoder.feed(buf, 0, self._read_into(view))
        self.remaining = 0


class _ReceivedBody(SocketBody):
    """The fallback when a chunked body cannot be taken over after its first piece was received:
    the rest comes through the ASGI receive channel."""

    def __init__(self, head: bytes, receive):
        super().__init__(head)
        self._receive = receive

    async def copy_to(self, fd: int) -> int:
        written = await asyncio.to_thread(_write_all, fd, memoryview(self.head))
        while True:
            message = await self._receive()
            if message["type"] != "http.request":
                raise ClientDisconnect()
            body = message.get("body", b"")
            if body:
                written += await asyncio.to_thread(_write_all, fd, memoryview(body))
            if not message.get("more_body", False):
                return written


def _raw_keeper(cycle):
    """The daemon's protocol instance behind uvicorn's cycle when it keeps raw request bytes."""
    proto = getattr(getattr(cycle, "on_response", None), "__self__", None)
    return proto if proto is not None and hasattr(proto, "raw_request") else None


async def take_chunked(request: Request) -> SocketBody | None:
    """A chunked body as a SocketBody read and decoded from the socket by a thread of its own, or
    None (nothing received) where that cannot be done: read request.stream() then."""
    cycle = _uvicorn_cycle(request)
    keeper = _raw_keeper(cycle) if cycle is not None else None
    if keeper is None or keeper.raw_request is None:
        return None
    head, more = await _receive_head(request, cycle)
    if not more:
        return SocketBody(head)
    # From here to the return there is no await: uvicorn cannot read or parse meanwhile.
    raw = keeper.take_raw_request()
    decoded = _decode_raw(raw) if raw is not None else None
    if decoded is None or decoded[0] != head:
        return _ReceivedBody(head, request.receive)
    cycle.keep_alive = False
    sock_fd = os.dup(cycle.transport.get_extra_info("socket").fileno())
    return ChunkedSocketBody(head, sock_fd, decoded[1])


def _decode_raw(raw: bytes) -> tuple[bytes, Dechunker] | None:
    """The body data in a request's raw bytes (request head included) and the decoder where they
    end, or None if they cannot be decoded."""
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        return None
    dec = Dechunker()
    try:
        ranges = dec.feed(raw, end + 4, len(raw))
    except ChunkedBodyError:
        return None
    view = memoryview(raw)
    return b"".join(view[a:b] for a, b in ranges), dec


def _split(pieces: list[memoryview], n: int) -> tuple[list[memoryview], list[memoryview]]:
    """(the first n bytes of pieces, the rest)."""
    head: list[memoryview] = []
    for i, p in enumerate(pieces):
        if n <= 0:
            return head, pieces[i:]
        if len(p) <= n:
            head.append(p)
            n -= len(p)
        else:
            head.append(p[:n])
            return head, [p[n:], *pieces[i + 1:]]
    return head, []


def _writev_all(fd: int, pieces: list[memoryview]) -> None:
    """Write the pieces in order (the list is changed), with as few writev as it takes."""
    i = 0
    while i < len(pieces):
        n = os.writev(fd, pieces[i:i + 1024])
        while i < len(pieces) and n >= len(pieces[i]):
            n -= len(pieces[i])
            i += 1
        if n:
            pieces[i] = pieces[i][n:]


def _pwritev_all(fd: int, pieces: list[memoryview], offset: int) -> int:
    """Write the pieces at `offset` (the list is changed), with as few pwritev as it takes."""
    total = sum(len(p) for p in pieces)
    i = 0
    while i < len(pieces):
        n = os.pwritev(fd, pieces[i:i + 1024], offset)
        offset += n
        while i < len(pieces) and n >= len(pieces[i]):
            n -= len(pieces[i])
            i += 1
        if n:
            pieces[i] = pieces[i][n:]
    return total


# -- response bodies ---------------------------------------------------------------------------

class FileSender:
    """Sends a response body made of bytes and open files on the connection's socket itself, the
    files with sendfile(2) (no copy through Python; uvicorn's path reads and copies every byte).

    The status line and headers go through uvicorn as usual (with `Connection: close`); once they
    are on the socket, a thread of its own writes the body to a duplicate of the socket's
    descriptor, and uvicorn is then told the response is complete. Only for uvicorn's httptools
    protocol without TLS, like take(); `open()` answers None otherwise and nothing is sent.
    """

    def __init__(self, cycle, sock_fd: int):
        self._cycle = cycle
        self.sock_fd = sock_fd
        self._stop = threading.Event()

    @classmethod
    def open(cls, receive) -> FileSender | None:
        cycle = _cycle_of(receive)
        if cycle is None:
            return None
        fd = os.dup(cycle.transport.get_extra_info("socket").fileno())
        # The socket is non-blocking (it is the event loop's): with the default buffer of ~200 KB
        # the thread would wake up a thousand times per 200 MB. A bigger buffer for this one
        # response (the connection closes after it) lets sendfile move megabytes per call.
        with contextlib.suppress(OSError), socket.socket(fileno=os.dup(fd)) as sock:
            sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, SEND_BUFFER)
        return cls(cycle, fd)

    def headers_flushed(self) -> bool:
        """True once uvicorn has put everything it was given on the socket (the body may follow)."""
        return self._cycle.transport.get_write_buffer_size() == 0

    async def send_body(self, pieces: list) -> None:
        """Write the pieces (bytes, or (file, size) read from the file's current offset, or
        (file, size, follow) for a file still being written: follow.wait(fd, offset, stop)
        blocks until the file holds bytes past offset and returns its size, or raises)."""
        def run() -> None:
            for piece in pieces:
                if isinstance(piece, bytes | bytearray | memoryview):
                    self._write(memoryview(piece))
                else:
                    self._sendfile(piece[0].fileno(), piece[1], piece[2] if len(piece) > 2 else None)

        await in_own_thread(run, self._stop, "lxd-send")

    def completed(self) -> None:
        """The body is on the socket (or the connection is broken): uvicorn completes the response
        on the next empty body message and, as the response asked, closes the connection."""
        self._cycle.expected_content_length = 0

    def close(self) -> None:
        if self.sock_fd >= 0:
            os.close(self.sock_fd)
            self.sock_fd = -1

    # -- in the sending thread ------------------------------------------------------------------
    def _write(self, data: memoryview) -> None:
        while data:
            try:
                data = data[os.write(self.sock_fd, data):]
            except BlockingIOError:
                self._wait_writable()

    def _sendfile(self, fd: int, size: int, follow=None) -> None:
        offset = os.lseek(fd, 0, os.SEEK_CUR)
        end = offset + size
        avail = end if follow is None else offset
        while offset < end:
            if offset >= avail:
                avail = min(end, follow.wait(fd, offset, self._stop))
            try:
                n = os.sendfile(self.sock_fd, fd, offset, avail - offset)
            except BlockingIOError:
                self._wait_writable()
                continue
            if n == 0:
                raise OSError(errno.EIO, "the file ended early")
            offset += n

    def _wait_writable(self) -> None:
        poller = select.poll()
        poller.register(self.sock_fd, select.POLLOUT)
        while not poller.poll(POLL_MS):
            if self._stop.is_set():
                raise _Stopped()
