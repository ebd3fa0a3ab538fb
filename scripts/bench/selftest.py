"""Self-test of the harness's own HTTP pieces (no daemon needed, no root):

    .venv/bin/python scripts/bench/selftest.py

Checks the raw unix-socket client (Content-Length, chunked with split chunks and trailers, bodies
discarded while streaming, sendfile uploads, keep-alive reuse) and the load generator's response
framing against a small threaded server, then the statistics helpers.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import UnixHTTP, percentile, summarize  # noqa: E402
from loadgen import response_end  # noqa: E402

BIG = os.urandom(3 * 1024 * 1024 + 17)


def chunked(body: bytes, sizes=(1, 4096, 70000)) -> bytes:
    out, i, k = bytearray(), 0, 0
    while i < len(body):
        piece = body[i:i + sizes[k % len(sizes)]]
        out += f"{len(piece):x};ext=1\r\n".encode() + piece + b"\r\n"
        i += len(piece)
        k += 1
    return bytes(out) + b"0\r\nX-Trailer: 1\r\n\r\n"


def serve(sock: socket.socket, seen: list) -> None:
    conn, _ = sock.accept()
    buf = b""
    with conn:
        while True:
            while b"\r\n\r\n" not in buf:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
            head, _, buf = buf.partition(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            method, path, _ = lines[0].split(" ")
            hdrs = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
            n = int(hdrs.get("content-length", "0"))
            while len(buf) < n:
                buf += conn.recv(1 << 20)
            body, buf = buf[:n], buf[n:]
            seen.append((method, path, len(body), body[:4]))
            if path == "/cl":
                payload = b'{"metadata": 1}'
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(payload) + payload)
            elif path == "/chunked":
                data = chunked(BIG)
                conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                for i in range(0, len(data), 1000):  # dribble it out
                    conn.sendall(data[i:i + 1000])
            elif path == "/big":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BIG) + BIG)
            elif path == "/upload":
                conn.sendall(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
            else:
                msg = b'{"type":"error","error":"not found","error_code":404}'
                conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: %d\r\n\r\n" % len(msg) + msg)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="lxdbench-selftest-") as tmp:
        path = os.path.join(tmp, "s")
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(path)
        srv.listen(1)
        seen: list = []
        t = threading.Thread(target=serve, args=(srv, seen), daemon=True)
        t.start()
        up = Path(tmp) / "up"
        up.write_bytes(BIG)
        with UnixHTTP(path, timeout=10) as c:
            r = c.request("GET", "/cl")
            assert r.status == 200 and r.metadata() == 1, r
            r = c.request("GET", "/chunked")
            assert r.body == BIG, "chunked body differs"
            r = c.request("GET", "/chunked", discard=True)
            assert r.body == b"" and r.length == len(BIG), r.length
            r = c.request("GET", "/big", discard=True)
            assert r.length == len(BIG)
            r = c.request("GET", "/big")
            assert r.body == BIG
            r = c.request("POST", "/upload", body_file=up)
            assert r.status == 201
            r = c.request("POST", "/upload", {"a": 1})
            assert r.status == 201
            try:
                c.call("GET", "/missing")
            except Exception as e:  # noqa: BLE001
                assert "404" in str(e) and "not found" in str(e), e
            else:
                raise AssertionError("call() did not raise on 404")
        assert seen[5] == ("POST", "/upload", len(BIG), BIG[:4]), seen[5]
        assert seen[6][2] == len(b'{"a": 1}')
        srv.close()

    # the load generator's framing
    body = b'{"x": 1}' * 500
    cl = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    ch = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
    for whole in (cl, ch):
        for cut in range(0, len(whole)):
            n, _ = response_end(bytearray(whole[:cut]))
            assert n == -1, (cut, n)
        n, status = response_end(bytearray(whole + b"HTTP/1.1 404"))
        assert (n, status) == (len(whole), 200), (n, status)

    assert percentile([1, 2, 3, 4], 50) == 2.5
    s = summarize([10.0, 20.0, 30.0], higher_is_better=True)
    assert s["median"] == 20.0 and s["p90"] == 12.0, s
    print("selftest ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
