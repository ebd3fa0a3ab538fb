"""Shared pieces of the benchmark harness: a raw HTTP/1.1 client over a unix socket, statistics,
process memory accounting and a few small helpers.

The client is deliberately small and allocation-light (no http.client, no httpx) so that what we
time is the daemon, not the client: request bodies go out with sendfile(), response bodies are read
into one reusable buffer and can be discarded while they stream in.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

MiB = 1024 * 1024


class APIError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes = b""
    length: int = 0  # bytes of body received (also when the body was discarded)

    def json(self) -> dict:
        return json.loads(self.body) if self.body else {}

    def metadata(self):
        return self.json().get("metadata")


class UnixHTTP:
    """A keep-alive HTTP/1.1 client on one unix socket connection (reconnects when needed)."""

    def __init__(self, path: str | os.PathLike, timeout: float = 180.0):
        self.path = str(path)
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.buf = bytearray()
        # 64 KiB reads, like real clients (Go's io.Copy uses 32 KiB, curl 16 KiB): with 128 KiB or
        # more this client became the bottleneck (2.3 GB/s against 7.5 GB/s when a 200 MB image
        # export was read 64 KiB at a time from a sendfile() server on this machine).
        self.view = memoryview(bytearray(64 << 10))

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.buf.clear()

    def __enter__(self) -> UnixHTTP:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _connect(self) -> socket.socket:
        if self.sock is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(self.timeout)
            s.connect(self.path)
            self.sock = s
            self.buf.clear()
        return self.sock

    # -- request -----------------------------------------------------------------
    def request(self, method: str, target: str, body: bytes | dict | list | None = None, *,
                headers: dict[str, str] | None = None, body_file: str | os.PathLike | None = None,
                discard: bool = False) -> Response:
        """Send one request; `body_file` streams a file with sendfile(); `discard` drops the body."""
        hdrs = {"Host": "lxd", "User-Agent": "lxd-bench"}
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            hdrs["Content-Type"] = "application/json"
        if headers:
            hdrs.update(headers)
        if body_file is not None:
            size = os.path.getsize(body_file)
            hdrs["Content-Length"] = str(size)
        elif body is not None:
            hdrs["Content-Length"] = str(len(body))
        elif method in ("POST", "PUT", "PATCH"):
            hdrs["Content-Length"] = "0"
        head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items()) + "\r\n"
        for attempt in (0, 1):
            sock = self._connect()
            try:
                sock.sendall(head.encode())
                break
            except (BrokenPipeError, ConnectionResetError):
                # a kept-alive connection the server closed meanwhile: reconnect once
                self.close()
                if attempt:
                    raise
        if body_file is not None:
            with open(body_file, "rb") as f:
                sock.sendfile(f)
        elif body:
            sock.sendall(body)
        return self._read_response(method, discard)

    def _fill(self) -> int:
        n = self.sock.recv_into(self.view)
        if n == 0:
            raise ConnectionError("connection closed by the server")
        self.buf += self.view[:n]
        return n

    def _read_response(self, method: str, discard: bool) -> Response:
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                break
            self._fill()
        lines = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
        del self.buf[:end + 4]
        status = int(lines[0].split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        out = bytearray()
        length = 0
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            pass
        elif "content-length" in headers:
            remaining = int(headers["content-length"])
            length = remaining
            take = min(remaining, len(self.buf))
            if not discard:
                out += self.buf[:take]
            del self.buf[:take]
            remaining -= take
            while remaining:
                n = self.sock.recv_into(self.view[:min(remaining, len(self.view))])
                if n == 0:
                    raise ConnectionError("connection closed mid-body")
                if not discard:
                    out += self.view[:n]
                remaining -= n
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                while (j := self.buf.find(b"\r\n")) < 0:
                    self._fill()
                size = int(bytes(self.buf[:j]).split(b";")[0], 16)
                del self.buf[:j + 2]
                if size == 0:
                    while (j := self.buf.find(b"\r\n")) != 0:  # trailers until the empty line
                        if j > 0:
                            del self.buf[:j + 2]
                        else:
                            self._fill()
                    del self.buf[:2]
                    break
                while size:
                    if not self.buf:
                        self._fill()
                    take = min(size, len(self.buf))
                    if not discard:
                        out += self.buf[:take]
                    length += take
                    del self.buf[:take]
                    size -= take
                while len(self.buf) < 2:
                    self._fill()
                del self.buf[:2]
        else:  # body until close
            if not discard:
                out += self.buf
            length += len(self.buf)
            self.buf.clear()
            while True:
                n = self.sock.recv_into(self.view)
                if n == 0:
                    break
                length += n
                if not discard:
                    out += self.view[:n]
            self.close()
        if headers.get("connection", "").lower() == "close":
            self.close()
        if length == 0:
            length = len(out)
        return Response(status, headers, bytes(out), length)

    # -- LXD helpers ---------------------------------------------------------------
    def call(self, method: str, target: str, body=None, **kw) -> Response:
        """A request whose failure (>= 400 or an error envelope) raises APIError."""
        r = self.request(method, target, body, **kw)
        if r.status >= 400:
            try:
                msg = r.json().get("error") or r.body[:200].decode(errors="replace")
            except ValueError:
                msg = r.body[:200].decode(errors="replace")
            raise APIError(r.status, f"{method} {target}: {msg}")
        return r

    def wait(self, r: Response, timeout: int = 150) -> dict:
        """Wait for the operation of an async reply; return its final state or raise."""
        doc = r.json()
        if doc.get("type") != "async":
            return doc.get("metadata") or {}
        op = doc.get("operation") or r.headers.get("location")
        w = self.call("GET", f"{op}/wait?timeout={timeout}").metadata()
        if w.get("status_code") != 200:
            raise APIError(400, f"operation {op} ended {w.get('status')}: {w.get('err')}")
        return w

    def sync(self, method: str, target: str, body=None, **kw) -> dict:
        """Call and, for an async reply, wait for its operation; return the final metadata."""
        return self.wait(self.call(method, target, body, **kw))

    def exists(self, target: str) -> bool:
        """True when GET target answers < 400 (used to probe for endpoints)."""
        return self.request("GET", target).status < 400


# -- statistics ---------------------------------------------------------------------
def map_with_connections(connect, items, fn, workers: int = 2) -> None:
    """fn(connection, item) for every item, `workers` at a time, each worker thread with a
    connection of its own from connect(); all closed at the end."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    local = threading.local()
    conns = []

    def one(item):
        if not hasattr(local, "c"):
            local.c = connect()
            conns.append(local.c)
        fn(local.c, item)

    try:
        with ThreadPoolExecutor(workers) as ex:
            list(ex.map(one, items))
    finally:
        for c in conns:
            c.close()


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100)."""
    if not values:
        return float("nan")
    s = sorted(values)
    if len(s) == 1:
        return s[0]
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(values: list[float], higher_is_better: bool = False) -> dict:
    """median, p90 on the worse side (p10 when higher is better), min, max, n."""
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "median": statistics.median(values),
        "p90": percentile(values, 10 if higher_is_better else 90),
        "min": min(values),
        "max": max(values),
        "mean": statistics.fmean(values),
    }


def timed(fn, *args, **kw) -> tuple[float, object]:
    t = time.perf_counter()
    v = fn(*args, **kw)
    return time.perf_counter() - t, v


def run_wall(argv: list[str], env: dict, *, check: bool = True, timeout: float = 180,
             input: bytes | None = None) -> float:
    """Wall time of a command (like one hyperfine run); raise if it fails and check is set."""
    t = time.perf_counter()
    r = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout,
                       input=input)
    dt = time.perf_counter() - t
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.decode(errors='replace')[-500:]}")
    return dt


# -- processes and memory -------------------------------------------------------------
_SELF_PIDNS = os.readlink("/proc/self/ns/pid")


@dataclass
class Proc:
    pid: int
    ppid: int
    cmdline: str
    rss: int  # bytes
    pss: int  # bytes (0 if unreadable)
    host_pidns: bool
    children: list[int] = field(default_factory=list)


def _read_proc(pid: int) -> Proc | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        rss = pss = 0
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss = int(line.split()[1]) * 1024
                    elif line.startswith("Pss:"):
                        pss = int(line.split()[1]) * 1024
        except OSError:
            with open(f"/proc/{pid}/statm") as f:
                rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        host = os.readlink(f"/proc/{pid}/ns/pid") == _SELF_PIDNS
        return Proc(pid, ppid, cmd, rss, pss, host)
    except (OSError, ValueError, IndexError):
        return None


def process_table() -> dict[int, Proc]:
    procs = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            p = _read_proc(int(name))
            if p is not None:
                procs[p.pid] = p
    for p in procs.values():
        if p.ppid in procs:
            procs[p.ppid].children.append(p.pid)
    return procs


def descendants(procs: dict[int, Proc], pid: int) -> list[int]:
    out, todo = [], list(procs[pid].children) if pid in procs else []
    while todo:
        c = todo.pop()
        out.append(c)
        todo.extend(procs[c].children)
    return out


def daemon_memory(pid: int, lxd_dir: str) -> dict:
    """Memory of a daemon: the process itself, its descendants on the host (worker processes,
    forkexec helpers) and the other host processes that name its LXD_DIR (liblxc's per-container
    `[lxc monitor]` processes). Container payloads (other pid namespaces) are not counted."""
    procs = process_table()
    if pid not in procs:
        raise RuntimeError(f"daemon pid {pid} is gone")
    main = procs[pid]
    kids = [procs[c] for c in descendants(procs, pid) if procs[c].host_pidns]
    kid_pids = {k.pid for k in kids}
    helpers = [p for p in procs.values()
               if p.host_pidns and p.pid != pid and p.pid not in kid_pids and lxd_dir in p.cmdline
               and p.pid != os.getpid()]
    # Children of helpers that stay in the host pid namespace are helpers too.
    for h in list(helpers):
        for c in descendants(procs, h.pid):
            if procs[c].host_pidns and procs[c] not in helpers:
                helpers.append(procs[c])

    def tot(ps, attr):
        return sum(getattr(p, attr) for p in ps)

    return {
        "daemon_rss": main.rss, "daemon_pss": main.pss,
        "children_rss": tot(kids, "rss"), "children_pss": tot(kids, "pss"), "children": len(kids),
        "children_detail": [{"pid": k.pid, "rss": k.rss, "cmd": k.cmdline[:80]} for k in kids],
        "helpers_rss": tot(helpers, "rss"), "helpers_pss": tot(helpers, "pss"), "helpers": len(helpers),
        "total_rss": main.rss + tot(kids, "rss") + tot(helpers, "rss"),
        "total_pss": main.pss + tot(kids, "pss") + tot(helpers, "pss"),
    }


def loadavg() -> str:
    a, b, c = os.getloadavg()
    return f"{a:.2f} {b:.2f} {c:.2f}"


def write_json(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
