"""Framing between the daemon and its liblxc workers.

A stream socket pair carries messages of the form HEADER (body length, number of fds) + body.
File descriptors travel as SCM_RIGHTS on the sendmsg() that carries the header; the
receiver queues every fd it gets and hands each message the number its header announces, so
fds stay matched to their message whatever way the kernel splits the stream.

Bodies are `marshal` data: both ends are the same interpreter (the daemon starts its workers
with sys.executable), and marshal is built in, where `json` would cost each worker ~0.7 MiB of
imports (json and re). Values stay JSON-like: dicts with str keys, lists, str, int, float,
bool and None.

Requests:      {"id": n, "m": "method", "a": [args...]}             (+ fds)
Replies:       {"id": n, "r": result} or {"id": n, "e": "message", "k": "ErrorKind"}   (+ fds)
Notifications: {"ev": "exit", "pid": p, "code": c}                  (no id)
"""

from __future__ import annotations

import array
import marshal
import socket
import struct
from collections import deque
from collections.abc import Iterator, Sequence

HEADER = struct.Struct("!IH")
MAX_FDS = 32
RECV_SIZE = 256 * 1024
ANCILLARY = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)


def encode(obj: object, nfds: int = 0) -> bytes:
    body = marshal.dumps(obj)
    return HEADER.pack(len(body), nfds) + body


def fds_from_ancdata(ancdata) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - (len(data) % arr.itemsize)])
            fds.extend(arr)
    return fds


class Decoder:
    """Accumulates bytes and fds from recvmsg() and yields complete (message, fds) pairs."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._fds: deque[int] = deque()

    def feed(self, data: bytes, fds: Sequence[int] = ()) -> None:
        self._buf += data
        self._fds.extend(fds)

    def messages(self) -> Iterator[tuple[dict, list[int]]]:
        while len(self._buf) >= HEADER.size:
            length, nfds = HEADER.unpack_from(self._buf)
            end = HEADER.size + length
            if len(self._buf) < end:
                return
            body = bytes(self._buf[HEADER.size:end])
            del self._buf[:end]
            fds = [self._fds.popleft() for _ in range(min(nfds, len(self._fds)))]
            yield marshal.loads(body), fds


def send_blocking(sock: socket.socket, obj: object, fds: Sequence[int] = ()) -> None:
    data = encode(obj, len(fds))
    if fds:
        sent = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sent = sock.send(data)
    if sent < len(data):
        sock.sendall(data[sent:])


def recv_into(sock: socket.socket, decoder: Decoder) -> bool:
    """One recvmsg() into the decoder; returns False on EOF.

    Received descriptors are close-on-exec, so they never leak into a process either side
    starts later (dup2() onto 0/1/2 for an exec clears the flag where it must).
    """
    data, ancdata, _flags, _addr = sock.recvmsg(RECV_SIZE, ANCILLARY, socket.MSG_CMSG_CLOEXEC)
    fds = fds_from_ancdata(ancdata)
    if not data and not fds:
        return False
    decoder.feed(data, fds)
    return True
