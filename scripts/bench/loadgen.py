"""GET /1.0 load generator over a unix socket (asyncio + uvloop with a raw protocol for several
clients, a blocking socket loop for one), and a trivial server to measure the generator's ceiling.

    python loadgen.py client --socket S --clients 8 --mode keepalive|newconn --duration 5
    python loadgen.py server --socket S --body-file F      (serves the body to every request)
    ... --tls HOST:PORT --cert C --key K instead of --socket: over TLS with that client (server)
    certificate (the remote suite, issue 11; the server certificate is not verified)

The client prints one JSON line: requests, errors, duration, rps, latency percentiles (ms) and the
generator's own CPU time per request (so one can see how far it is from being the bottleneck).
It understands Content-Length and chunked responses (LXD's Go server sends /1.0 chunked).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import socket
import ssl
import sys
import time

try:
    import uvloop
except ImportError:  # pragma: no cover - the venv has it (uvicorn[standard])
    uvloop = None

REQUEST = b"GET /1.0 HTTP/1.1\r\nHost: lxd\r\nUser-Agent: lxd-bench\r\n\r\n"
# --tls: ((host, port), client or server SSLContext); None: the unix socket given as `path`
TLS: tuple[tuple[str, int], ssl.SSLContext] | None = None


def tls_context(server: bool, cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    if not server:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


async def open_connection(loop, path: str):
    if TLS is None:
        return await loop.create_unix_connection(ClientProto, path)
    (host, port), ctx = TLS
    return await loop.create_connection(ClientProto, host, port, ssl=ctx)


def blocking_connection(path: str) -> socket.socket:
    if TLS is None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        return sock
    (host, port), ctx = TLS
    sock = socket.create_connection((host, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return ctx.wrap_socket(sock)


def response_end(buf: bytearray) -> tuple[int, int]:
    """(bytes the first complete response takes, its status) or (-1, 0) if incomplete."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return -1, 0
    status = int(buf[9:12])
    head = bytes(buf[:end]).lower()
    i = head.find(b"\r\ncontent-length:")
    if i >= 0:
        j = head.find(b"\r\n", i + 2)
        n = int(head[i + 17:j if j >= 0 else end])
        total = end + 4 + n
        return (total, status) if len(buf) >= total else (-1, 0)
    if b"\r\ntransfer-encoding: chunked" in head:
        pos = end + 4
        while True:
            j = buf.find(b"\r\n", pos)
            if j < 0:
                return -1, 0
            size = int(bytes(buf[pos:j]).split(b";")[0], 16)
            if size == 0:
                total = j + 4  # "0\r\n\r\n" (no trailers)
                return (total, status) if len(buf) >= total else (-1, 0)
            pos = j + 2 + size + 2
            if pos > len(buf):
                return -1, 0
    return end + 4, status  # no body


class ClientProto(asyncio.Protocol):
    def __init__(self):
        self.buf = bytearray()
        self.waiter: asyncio.Future | None = None
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.buf += data
        if self.waiter is not None:
            n, status = response_end(self.buf)
            if n >= 0:
                del self.buf[:n]
                w, self.waiter = self.waiter, None
                if not w.done():
                    w.set_result(status)

    def connection_lost(self, exc):
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection lost"))
        self.waiter = None


class Stats:
    def __init__(self):
        self.recording = False
        self.lat: list[int] = []
        self.errors = 0
        self.stop = False


async def client_keepalive(path: str, st: Stats) -> None:
    loop = asyncio.get_running_loop()
    transport, proto = await open_connection(loop, path)
    perf = time.perf_counter_ns
    try:
        while not st.stop:
            fut = loop.create_future()
            proto.waiter = fut
            t = perf()
            transport.write(REQUEST)
            try:
                status = await fut
            except ConnectionError:
                st.errors += 1
                transport, proto = await open_connection(loop, path)
                continue
            if st.recording:
                if status == 200:
                    st.lat.append(perf() - t)
                else:
                    st.errors += 1
    finally:
        transport.close()


async def client_newconn(path: str, st: Stats) -> None:
    loop = asyncio.get_running_loop()
    perf = time.perf_counter_ns
    while not st.stop:
        t = perf()
        try:
            transport, proto = await open_connection(loop, path)
            fut = loop.create_future()
            proto.waiter = fut
            transport.write(REQUEST)
            status = await fut
            transport.close()
        except (ConnectionError, OSError):
            if st.recording:
                st.errors += 1
            await asyncio.sleep(0.001)
            continue
        if st.recording:
            if status == 200:
                st.lat.append(perf() - t)
            else:
                st.errors += 1


def pct(sorted_ns: list[int], q: float) -> float:
    if not sorted_ns:
        return float("nan")
    i = min(len(sorted_ns) - 1, max(0, round((len(sorted_ns) - 1) * q / 100)))
    return sorted_ns[i] / 1e6


async def run_client(path: str, clients: int, mode: str, duration: float, warmup: float) -> dict:
    st = Stats()
    fn = client_keepalive if mode == "keepalive" else client_newconn
    tasks = [asyncio.create_task(fn(path, st)) for _ in range(clients)]
    await asyncio.sleep(warmup)
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    st.recording = True
    await asyncio.sleep(duration)
    st.recording = False
    elapsed = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    st.stop = True
    await asyncio.wait(tasks, timeout=10)
    for t in tasks:
        if t.done() and t.exception() is not None:
            raise t.exception()
    lat = sorted(st.lat)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    n = len(lat)
    return {
        "clients": clients, "mode": mode, "requests": n, "errors": st.errors, "duration": elapsed,
        "rps": n / elapsed, "lat_ms": {"p50": pct(lat, 50), "p90": pct(lat, 90), "p99": pct(lat, 99)},
        "gen_cpu_s": cpu, "gen_cpu_us_per_req": (cpu / n * 1e6) if n else None,
    }


def run_blocking(path: str, mode: str, duration: float, warmup: float) -> dict:
    """One client without an event loop: a blocking socket, the cheapest loop for a single client
    (used for --clients 1, where a request's round trip, not concurrency, sets the rate)."""
    view = memoryview(bytearray(1 << 16))
    buf = bytearray()
    perf = time.perf_counter_ns
    sock = None
    lat: list[int] = []
    errors = 0

    def one() -> int:
        nonlocal sock
        if sock is None:
            sock = blocking_connection(path)
        sock.sendall(REQUEST)
        buf.clear()
        while True:
            n = sock.recv_into(view)
            if n == 0:
                raise ConnectionError("connection closed")
            buf.extend(view[:n])
            end, status = response_end(buf)
            if end >= 0:
                break
        if mode == "newconn":
            sock.close()
            sock = None
        return status

    warm_end = time.perf_counter() + warmup
    while time.perf_counter() < warm_end:
        one()
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    stop_ns = perf() + int(duration * 1e9)
    while (t := perf()) < stop_ns:
        try:
            status = one()
        except OSError:
            errors += 1
            if sock is not None:
                sock.close()
            sock = None
            continue
        if status == 200:
            lat.append(perf() - t)
        else:
            errors += 1
    elapsed = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    if sock is not None:
        sock.close()
    lat.sort()
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    n = len(lat)
    return {
        "clients": 1, "mode": mode, "engine": "blocking", "requests": n, "errors": errors, "duration": elapsed,
        "rps": n / elapsed, "lat_ms": {"p50": pct(lat, 50), "p90": pct(lat, 90), "p99": pct(lat, 99)},
        "gen_cpu_s": cpu, "gen_cpu_us_per_req": (cpu / n * 1e6) if n else None,
    }


# -- trivial server ---------------------------------------------------------------
class ServerProto(asyncio.Protocol):
    response = b""

    def connection_made(self, transport):
        self.transport = transport
        self.buf = bytearray()

    def data_received(self, data):
        self.buf += data
        n = self.buf.count(b"\r\n\r\n")
        if n:
            idx = self.buf.rfind(b"\r\n\r\n")
            del self.buf[:idx + 4]
            self.transport.write(self.response * n)


async def run_server(path: str, body: bytes) -> None:
    ServerProto.response = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                            + str(len(body)).encode() + b"\r\n\r\n" + body)
    loop = asyncio.get_running_loop()
    if TLS is None:
        server = await loop.create_unix_server(ServerProto, path, backlog=1024)
    else:
        (host, port), ctx = TLS
        server = await loop.create_server(ServerProto, host, port, ssl=ctx, backlog=1024)
    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
    loop.add_signal_handler(signal.SIGINT, stop.set_result, None)
    print("ready", flush=True)
    await stop
    server.close()
    if TLS is None:
        os.unlink(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("client")
    c.add_argument("--socket", default="")
    c.add_argument("--clients", type=int, default=1)
    c.add_argument("--mode", choices=("keepalive", "newconn"), default="keepalive")
    c.add_argument("--duration", type=float, default=5.0)
    c.add_argument("--warmup", type=float, default=0.5)
    c.add_argument("--engine", choices=("auto", "asyncio"), default="auto",
                   help="auto: a blocking socket loop for one client, asyncio (uvloop) for several")
    s = sub.add_parser("server")
    s.add_argument("--socket", default="")
    s.add_argument("--body-file", required=True)
    for p in (c, s):
        p.add_argument("--tls", default="", metavar="HOST:PORT", help="TLS to/on this address instead of --socket")
        p.add_argument("--cert", default="", help="--tls: the client (server) certificate")
        p.add_argument("--key", default="", help="--tls: its key")
    args = ap.parse_args(argv)
    if args.tls:
        global TLS
        host, _, port = args.tls.rpartition(":")
        TLS = ((host, int(port)), tls_context(args.cmd == "server", args.cert, args.key))
    elif not args.socket:
        ap.error("--socket or --tls is required")
    runner = uvloop.run if uvloop is not None else asyncio.run
    if args.cmd == "client" and args.clients == 1 and args.engine != "asyncio":
        res = run_blocking(args.socket, args.mode, args.duration, args.warmup)
        print(json.dumps(res), flush=True)
    elif args.cmd == "client":
        res = runner(run_client(args.socket, args.clients, args.mode, args.duration, args.warmup))
        res["engine"] = "asyncio"
        res["uvloop"] = uvloop is not None
        print(json.dumps(res), flush=True)
    else:
        with open(args.body_file, "rb") as f:
            body = f.read()
        runner(run_server(args.socket, body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
