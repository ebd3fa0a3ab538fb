"""The `remote` suite (issue 11): ours against LXD 5.0.2 over TLS, in the same run, interleaved.

Each daemon already runs in a network namespace of its own (the harness starts it so); the suite
sets `core.https_address=127.0.0.1:8443` and `core.trust_password` on it through the API, so the
TLS listener is a loopback address inside that namespace, and every client runs inside the same
namespace: `lxc` through `nsenter --net=/proc/PID/ns/net` with the daemon's own LXD_CONF (a remote
`b` added with the password and --accept-certificate, which also makes the client certificate the
Python clients use), the Python clients on sockets created inside the namespace (setns on one
thread around socket(); the socket keeps its namespace). Measured:

- `lxc exec b:C -- sh -c true` wall time, and the same exec through the API over TLS as `lxc exec`
  does it (POST exec with wait-for-websocket, the control/stdin/stdout/stderr websockets, stdin
  closed at once, stdout/stderr read to their close, the operation waited for), and without
  websockets (record-output false: the issue 4 API row, over TLS);
- `lxc list b:` with --containers (50) STOPPED containers (created, never started: cheap), and
  GET /1.0/instances?recursion=2 over TLS;
- GET /1.0 requests per second over TLS with the trusted client certificate (loadgen.py --tls,
  run inside the namespace), 1 and 8 clients, keep-alive and one new TLS connection per request;
- an image pull between two daemons of the same kind: a second daemon ("A", a fresh LXD_DIR in the
  run's work dir, no pool) started inside the same network namespace pulls a ~50 MB public image
  from the first ("B") over TLS: POST /1.0/images with source.server on A's unix socket (to the
  image being in A's store), and `lxc image copy b:ALIAS local:` with A's LXD_CONF.

The TLS listeners and remotes go away with the daemons; containers, the profile and the pulling
daemons are removed at the end of the suite (cleanup() catches what a crash leaves).
"""

from __future__ import annotations

import base64
import ctypes
import json
import os
import socket
import ssl
import statistics
import struct
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import images
from common import APIError, MiB, UnixHTTP, map_with_connections, run_wall
from daemons import LXC, REPO, Daemon

HERE = Path(__file__).resolve().parent
VENV_PY = REPO / ".venv" / "bin" / "python"
HOST = "127.0.0.1"
PORT = 8443
REMOTE = "b"
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)
_ns_lock = threading.Lock()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- sockets and clients inside a daemon's network namespace ------------------------------------
def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"setns: {os.strerror(e)}")


def netns_socket(pid: int) -> socket.socket:
    """A TCP socket created inside the network namespace of process `pid` (it stays there)."""
    with _ns_lock:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
        try:
            _setns(target)
            try:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            finally:
                _setns(own)
        finally:
            os.close(own)
            os.close(target)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def client_context(cert: Path, key: Path) -> ssl.SSLContext:
    """TLS client context with the client certificate; the server certificate is compared with the
    one the daemon reports on its unix socket (pinned), not verified against a CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


def tls_connect(pid: int, ctx: ssl.SSLContext, timeout: float = 60) -> ssl.SSLSocket:
    raw = netns_socket(pid)
    raw.settimeout(timeout)
    try:
        raw.connect((HOST, PORT))
        return ctx.wrap_socket(raw)
    except BaseException:
        raw.close()
        raise


class TLSHTTP(UnixHTTP):
    """common.UnixHTTP (same framing, same buffers) on a TLS connection inside a network namespace."""

    def __init__(self, pid: int, ctx: ssl.SSLContext, timeout: float = 180.0):
        super().__init__(f"https://{HOST}:{PORT}", timeout)
        self.pid = pid
        self.ctx = ctx

    def _connect(self):
        if self.sock is None:
            self.sock = tls_connect(self.pid, self.ctx, self.timeout)
            self.buf.clear()
        return self.sock


# -- a minimal websocket client (the exec streams) ------------------------------------------------
class WS:
    """Just enough RFC 6455 for the exec streams: the upgrade, reading frames until the close
    frame, sending a close. Frames are small here, the reads are plain."""

    def __init__(self, pid: int, ctx: ssl.SSLContext, path: str):
        self.sock = tls_connect(pid, ctx)
        self.buf = bytearray()
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {HOST}:{PORT}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                           "User-Agent: lxd-bench\r\n\r\n").encode())
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            self._fill()
        status = bytes(self.buf[:end]).split(b"\r\n", 1)[0]
        if b" 101 " not in status + b" ":
            raise RuntimeError(f"websocket {path.split('?')[0]}: {status.decode(errors='replace')}")
        del self.buf[:end + 4]
        self.closed = False

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("connection closed")
        self.buf += data

    def _need(self, n: int) -> None:
        while len(self.buf) < n:
            self._fill()

    def read_to_close(self) -> int:
        """Read (and drop) data frames until the server's close frame or EOF; answer the close.
        Returns the bytes of data received."""
        got = 0
        try:
            while True:
                self._need(2)
                op, ln = self.buf[0] & 0x0F, self.buf[1] & 0x7F
                masked = self.buf[1] & 0x80
                hdr = 2
                if ln == 126:
                    self._need(4)
                    ln, hdr = struct.unpack("!H", self.buf[2:4])[0], 4
                elif ln == 127:
                    self._need(10)
                    ln, hdr = struct.unpack("!Q", self.buf[2:10])[0], 10
                hdr += 4 if masked else 0
                self._need(hdr + ln)
                del self.buf[:hdr + ln]
                if op == 8:
                    self.close()
                    return got
                if op in (0, 1, 2):
                    got += ln
        except (ConnectionError, OSError):
            return got

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                mask = os.urandom(4)
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(struct.pack("!H", 1000)))
                self.sock.sendall(bytes([0x88, 0x80 | 2]) + mask + payload)
            except OSError:
                pass
        try:
            self.sock.close()
        except OSError:
            pass


# -- the suite ----------------------------------------------------------------------------------
class RemoteSuite:
    def __init__(self, bench, cpu_seconds):
        self.b = bench
        self.cpu_seconds = cpu_seconds
        self.args = bench.args
        self.quick = bench.quick
        self.prefix = bench.prefix
        self.password = uuid.uuid4().hex
        self.profile = f"{self.prefix}-r"
        self.ctx: dict[str, ssl.SSLContext] = {}
        self.server_pem: dict[str, str] = {}
        self.pullers: dict[str, Daemon] = {}

    def nsenter(self, d: Daemon, *argv: str) -> list[str]:
        return ["nsenter", f"--net=/proc/{d.pid}/ns/net", *argv]

    def lxc_wall(self, d: Daemon, *args: str, env: dict | None = None) -> float:
        return run_wall(self.nsenter(d, LXC, *args), env or d.env)

    def tls(self, d: Daemon) -> TLSHTTP:
        return TLSHTTP(d.pid, self.ctx[d.key])

    def cname(self, d: Daemon, tag: str) -> str:
        return f"{self.prefix}-{d.key[0]}{tag}"

    # -- set-up -------------------------------------------------------------------------------
    def enable_tls(self, d: Daemon) -> None:
        """core.https_address + core.trust_password through the API, a remote added with the
        password, and a check that the client certificate is trusted over TLS."""
        with d.http() as c:
            r = c.request("PATCH", "/1.0", {"config": {"core.https_address": f"{HOST}:{PORT}",
                                                       "core.trust_password": self.password}})
            if r.status >= 400:
                msg = (r.json().get("error") if r.body.startswith(b"{") else r.body[:200].decode()) or r.status
                raise RuntimeError(f"PATCH /1.0 core.https_address: HTTP {r.status}: {msg}")
            env = c.call("GET", "/1.0").metadata()["environment"]
            self.server_pem[d.key] = env.get("certificate", "")
        self.add_remote(d, d)
        ctx = client_context(d.conf_dir / "client.crt", d.conf_dir / "client.key")
        self.ctx[d.key] = ctx
        with self.tls(d) as c:
            meta = c.call("GET", "/1.0").metadata()
            peer = c.sock.getpeercert(binary_form=True)
        if meta.get("auth") != "trusted":
            raise RuntimeError(f"the client certificate is not trusted over TLS (auth {meta.get('auth')!r})")
        if self.server_pem[d.key] and ssl.DER_cert_to_PEM_cert(peer).strip() != self.server_pem[d.key].strip():
            raise RuntimeError("the TLS listener's certificate differs from GET /1.0's environment.certificate")

    def add_remote(self, server: Daemon, client: Daemon) -> None:
        """`lxc remote add b https://127.0.0.1:8443 --password ... --accept-certificate` with the
        client's LXD_CONF, inside the server's network namespace."""
        r = subprocess.run(self.nsenter(server, LXC, "remote", "list", "--format=csv"), env=client.env,
                           capture_output=True, text=True, timeout=60)
        if any(line.split(",")[0].split(" ")[0] == REMOTE for line in r.stdout.splitlines()):
            return
        r = subprocess.run(self.nsenter(server, LXC, "remote", "add", REMOTE, f"https://{HOST}:{PORT}",
                                        f"--password={self.password}", "--accept-certificate"),
                           env=client.env, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"lxc remote add: {(r.stderr or r.stdout).strip()[-300:]}")

    def prepare(self, d: Daemon, small: Path, fp: str) -> None:
        with d.http() as c:
            self.b.ensure_base(d, c, small, fp)
            self.b.ensure_root_profile(c, self.profile)
        self.enable_tls(d)

    def create(self, c: UnixHTTP, name: str, fp: str) -> None:
        c.sync("POST", "/1.0/instances", {"name": name, "source": {"type": "image", "fingerprint": fp},
                                          "profiles": [self.profile], "config": {}, "devices": {}})

    # -- run --------------------------------------------------------------------------------
    def run(self) -> None:
        b = self.b
        active, skipped = b.split_support("remote", "/1.0/images", "/1.0/instances", "/1.0/profiles")
        if not active:
            return
        small = b.busybox()
        fp = images.sha256_file(small)
        ready = b.prepare_each("remote", "enabling TLS and trust", active, skipped,
                               lambda d: self.prepare(d, small, fp))
        try:
            if ready:
                self.step("exec", lambda: self.exec_rows(ready, skipped, fp))
                self.step("list", lambda: self.list_rows(ready, skipped, fp))
                self.step("GET /1.0", lambda: self.rps_rows(ready, skipped))
                self.step("image pull", lambda: self.pull_rows(ready, skipped))
        finally:
            for d in ready:
                b.delete_prefixed(d)
                try:
                    with d.http() as c:
                        c.request("DELETE", f"/1.0/profiles/{self.profile}")
                except OSError as e:
                    log(f"{d.label}: removing the profile: {e}")
            for p in self.pullers.values():
                try:
                    p.stop(timeout=30)
                except Exception as e:  # noqa: BLE001
                    log(f"stopping {p.label}: {e}")

    def step(self, what: str, fn) -> None:
        """One group of rows; a failure is noted and the other groups still run."""
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            self.b.notes.append(f"remote: {what} rows aborted: {type(e).__name__}: {e}"[:400])
            log(f"remote: {what} rows aborted: {type(e).__name__}: {e}")
            if self.args.verbose:
                import traceback

                traceback.print_exc()
        self.b.load(f"after remote {what}")

    # -- exec ------------------------------------------------------------------------------------
    def exec_ws(self, d: Daemon, c: TLSHTTP, name: str) -> float:
        """POST exec with wait-for-websocket, as `lxc exec` (non-interactive, stdin at EOF) does."""
        t = time.perf_counter()
        r = c.call("POST", f"/1.0/instances/{name}/exec",
                   {"command": ["sh", "-c", "true"], "environment": {}, "interactive": False,
                    "wait-for-websocket": True, "record-output": False, "width": 0, "height": 0})
        doc = r.json()
        op = doc.get("operation") or r.headers.get("location")
        fds = ((doc.get("metadata") or {}).get("metadata") or {}).get("fds") or {}
        socks = {}
        try:
            for fd in ("control", "0", "1", "2"):
                socks[fd] = WS(d.pid, self.ctx[d.key], f"{op}/websocket?secret={fds[fd]}")
            socks["0"].close()  # stdin: EOF at once
            socks["1"].read_to_close()
            socks["2"].read_to_close()
            w = c.call("GET", f"{op}/wait?timeout=60").metadata()
        finally:
            for s in socks.values():
                s.close()
        dt = time.perf_counter() - t
        rc = (w.get("metadata") or {}).get("return")
        if w.get("status_code") != 200 or rc != 0:
            raise RuntimeError(f"exec ended {w.get('status')} with return {rc!r}: {w.get('err')}")
        return dt

    def exec_plain(self, c: TLSHTTP, name: str) -> float:
        t = time.perf_counter()
        op = c.sync("POST", f"/1.0/instances/{name}/exec",
                    {"command": ["sh", "-c", "true"], "environment": {}, "interactive": False,
                     "wait-for-websocket": False, "record-output": False, "width": 0, "height": 0})
        dt = time.perf_counter() - t
        if (op.get("metadata") or {}).get("return") != 0:
            raise RuntimeError(f"exec returned {(op.get('metadata') or {}).get('return')!r}")
        return dt

    def exec_rows(self, active, skipped, fp: str) -> None:
        b = self.b
        running = []
        for d in active:
            try:
                with d.http() as c:
                    self.create(c, self.cname(d, "x1"), fp)
                    c.sync("PUT", f"/1.0/instances/{self.cname(d, 'x1')}/state", {"action": "start", "timeout": 30})
                running.append(d)
            except Exception as e:  # noqa: BLE001
                skipped[d.key] = f"failed: starting the exec container: {type(e).__name__}: {e}"[:300]
                log(f"remote: {d.label}: {skipped[d.key]}")
        rounds = 2 if self.quick else 6
        n_cli, n_api = (3, 5) if self.quick else (5, 10)
        for d in running:  # warm-up: the first exec of a container, the lxc client's caches
            name = self.cname(d, "x1")
            self.lxc_wall(d, "exec", f"{REMOTE}:{name}", "--", "sh", "-c", "true")
            with self.tls(d) as c:
                self.exec_ws(d, c, name)

        def cycle(d, i):
            name = self.cname(d, "x1")
            cli = [self.lxc_wall(d, "exec", f"{REMOTE}:{name}", "--", "sh", "-c", "true") * 1000
                   for _ in range(n_cli)]
            with self.tls(d) as c:
                ws = [self.exec_ws(d, c, name) * 1000 for _ in range(n_api)]
                plain = [self.exec_plain(c, name) * 1000 for _ in range(n_api)]
            return {"cli": statistics.median(cli), "ws": statistics.median(ws), "plain": statistics.median(plain)}

        s, e = b.interleave("exec over TLS", rounds, running, cycle)
        for metric, label, target in (
                ("cli", "`lxc exec b:C -- sh -c true` wall, over TLS", ("<=", 0.5)),
                ("ws", "exec `sh -c true`, API over TLS with the 4 websockets (as lxc exec)", ("<=", 0.5)),
                ("plain", "exec `sh -c true`, API over TLS without websockets", None)):
            b.row("remote", label + " (median of each round's runs)", "ms", "lower", target,
                  b.values(running, s, e, metric, skipped))
        for d in running:
            with d.http() as c:
                b.force_delete(c, self.cname(d, "x1"))

    def create_many(self, d: Daemon, names: list[str], fp: str) -> None:
        """Create (not start) `names`, two at a time."""
        map_with_connections(d.http, names, lambda c, name: self.create(c, name, fp))

    # -- list ------------------------------------------------------------------------------------
    def list_rows(self, active, skipped, fp: str) -> None:
        b = self.b
        n = self.args.containers or (10 if self.quick else 50)
        names = {d.key: [self.cname(d, f"l{j:02d}") for j in range(n)] for d in active}
        errs: dict[str, str] = {}
        for d in active:
            t = time.perf_counter()
            try:
                self.create_many(d, names[d.key], fp)
                log(f"{d.label}: {n} stopped containers created in {time.perf_counter() - t:.1f}s")
            except Exception as e:  # noqa: BLE001
                errs[d.key] = f"failed: creating {n} containers: {type(e).__name__}: {e}"[:300]
                log(errs[d.key])
        ok = [d for d in active if d.key not in errs]
        for d in ok:  # warm-up
            self.lxc_wall(d, "list", f"{REMOTE}:")

        def listing(d, i):
            t = self.lxc_wall(d, "list", f"{REMOTE}:") * 1000
            with self.tls(d) as c:
                t0 = time.perf_counter()
                docs = c.call("GET", "/1.0/instances?recursion=2").metadata()
                api = (time.perf_counter() - t0) * 1000
            got = sum(1 for x in docs if x["name"] in names[d.key])
            if got != n:
                raise RuntimeError(f"{got} of the {n} containers in the list")
            return {"cli": t, "api": api}

        rounds = 3 if self.quick else 6
        s, e = b.interleave("lxc list over TLS", rounds, ok, listing)
        e.update(errs)
        vals = b.values(ok, s, e, "cli", skipped)
        vals.update(errs)
        b.row("remote", f"`lxc list b:` with {n} stopped containers, over TLS", "ms", "lower", ("<=", 0.5), vals)
        vals = b.values(ok, s, e, "api", skipped)
        vals.update(errs)
        b.row("remote", f"GET /1.0/instances?recursion=2 with {n} stopped, over TLS", "ms", "lower", None, vals)
        for d in active:
            t = time.perf_counter()
            with ThreadPoolExecutor(4) as ex:
                def gone(name, d=d):
                    with d.http() as c:
                        b.force_delete(c, name)
                list(ex.map(gone, names[d.key]))
            log(f"{d.label}: {n} containers deleted in {time.perf_counter() - t:.1f}s")

    # -- GET /1.0 requests per second over TLS ------------------------------------------------------
    def loadgen(self, d: Daemon, clients: int, mode: str, duration: float, port: int = PORT) -> dict:
        argv = self.nsenter(d, str(VENV_PY), str(HERE / "loadgen.py"), "client",
                            "--tls", f"{HOST}:{port}", "--cert", str(d.conf_dir / "client.crt"),
                            "--key", str(d.conf_dir / "client.key"), "--clients", str(clients), "--mode", mode,
                            "--duration", str(duration), "--warmup", "0.5")
        r = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
        if r.returncode != 0:
            raise RuntimeError(f"load generator failed: {r.stderr.strip()[-400:]}")
        res = json.loads(r.stdout.strip().splitlines()[-1])
        if res["errors"]:
            raise RuntimeError(f"{res['errors']} failed requests")
        return res

    def calibrate(self, d: Daemon, cells, duration: float) -> None:
        """The TLS generator against a trivial uvloop TLS server (same body, the client certificate
        as its server certificate), inside d's namespace on another port."""
        with self.tls(d) as c:
            body = c.request("GET", "/1.0").body
        bf = self.b.workdir / "remote-trivial-body.json"
        bf.write_bytes(body)
        srv = subprocess.Popen(self.nsenter(d, str(VENV_PY), str(HERE / "loadgen.py"), "server",
                                            "--tls", f"{HOST}:{PORT + 1}", "--cert", str(d.conf_dir / "client.crt"),
                                            "--key", str(d.conf_dir / "client.key"), "--body-file", str(bf)),
                               stdout=subprocess.PIPE, text=True)
        try:
            srv.stdout.readline()
            cal = {}
            for clients, mode in cells:
                res = self.loadgen(d, clients, mode, duration, port=PORT + 1)
                cal[f"{clients}/{mode}"] = res
                log(f"TLS generator ceiling, {clients} client(s) {mode}: {res['rps']:.0f} req/s against a trivial "
                    f"TLS server, generator CPU {res['gen_cpu_us_per_req']:.0f} us/request")
            self.b.raw["remote_generator_calibration"] = cal
            self.b.notes.append("remote: TLS load generator ceiling against a trivial uvloop TLS server with the "
                                "same body (" + ", ".join(f"{k}: {v['rps']:.0f} req/s, "
                                                          f"{v['gen_cpu_us_per_req']:.0f} µs CPU/req"
                                                          for k, v in cal.items()) + ")")
        finally:
            srv.terminate()
            srv.wait(10)

    def rps_rows(self, active, skipped) -> None:
        b = self.b
        cpu_seconds = self.cpu_seconds
        duration = self.args.duration or (2.0 if self.quick else 5.0)
        rounds = self.args.rounds or (1 if self.quick else 3)
        cells = [(1, "keepalive"), (8, "keepalive"), (1, "newconn"), (8, "newconn")]
        try:
            self.calibrate(active[0], cells, min(duration, 3.0))
        except Exception as e:  # noqa: BLE001
            log(f"remote: TLS generator calibration failed: {e}")
        runs = {cell: {d.key: [] for d in active} for cell in cells}
        errs: dict[str, str] = {}
        for rnd in range(rounds):
            for clients, mode in cells:
                for d in b.order(rnd, active):
                    if d.key in errs:
                        continue
                    try:
                        c0 = cpu_seconds(d.pid)
                        res = self.loadgen(d, clients, mode, duration)
                    except Exception as e:  # noqa: BLE001
                        errs[d.key] = f"failed: {type(e).__name__}: {e}"[:300]
                        log(f"remote GET /1.0: {d.label}: {errs[d.key]}")
                        continue
                    res["daemon_cpu_us_per_req"] = (cpu_seconds(d.pid) - c0) / max(1, res["requests"]) * 1e6 \
                        * res["duration"] / (res["duration"] + 0.5)
                    runs[(clients, mode)][d.key].append(res)
                    log(f"GET /1.0 over TLS {d.label:9s} {clients} client(s) {mode:9s} round {rnd + 1}: "
                        f"{res['rps']:8.0f} req/s, p50 {res['lat_ms']['p50']:.3f} ms, "
                        f"daemon CPU {res['daemon_cpu_us_per_req']:.0f} us/req, "
                        f"generator {res['gen_cpu_us_per_req']:.0f} us/req")
        b.raw["remote_get_1_0"] = {f"{c}/{m}": v for (c, m), v in runs.items()}
        for (clients, mode), per in runs.items():
            label = f"{clients} client{'s' if clients > 1 else ''}, " + (
                "keep-alive" if mode == "keepalive" else "new TLS connection per request")
            target = (">=", 1.5) if mode == "keepalive" else None
            vals = {k: (errs.get(k) or [r["rps"] for r in v]) for k, v in per.items()}
            vals.update({k: v for k, v in skipped.items() if k not in vals})
            b.row("remote", f"GET /1.0 req/s over TLS ({label})", "req/s", "higher", target, vals)
            lat = {k: (errs.get(k) or {"n": len(v), "median": statistics.median(r["lat_ms"]["p50"] for r in v),
                                       "p90": statistics.median(r["lat_ms"]["p90"] for r in v)})
                   for k, v in per.items() if v or k in errs}
            lat.update({k: v for k, v in skipped.items() if k not in lat})
            b.row("remote", f"GET /1.0 latency over TLS ({label})", "ms", "lower", None, lat)
            cpu = {k: (errs.get(k) or [r["daemon_cpu_us_per_req"] for r in v]) for k, v in per.items()}
            cpu.update({k: v for k, v in skipped.items() if k not in cpu})
            b.row("remote", f"GET /1.0 over TLS daemon CPU per request ({label})", "µs", "lower", None, cpu)

    # -- image pull between two daemons ----------------------------------------------------------------
    def start_puller(self, d: Daemon) -> Daemon:
        """A second daemon of d's kind, a fresh LXD_DIR in the work dir, in d's network namespace."""
        p = Daemon(f"{d.key}-pull", f"{d.label} (puller)", d.binary, d.workdir, d.prefix,
                   netns=f"/proc/{d.pid}/ns/net")
        self.pullers[d.key] = p
        t = time.perf_counter()
        p.start()
        log(f"{p.label} ready in {time.perf_counter() - t:.2f}s (pid {p.pid}, in {d.label}'s network namespace)")
        return p

    def pull_rows(self, active, skipped) -> None:
        b = self.b
        size_mb = 53  # 12 random 4 MiB files and the busybox rootfs: ~52 MB
        t = time.perf_counter()
        built = images.build_big(b.workdir, size_mb)
        img = built.with_name(f"remote-{size_mb}.tar")
        os.replace(built, img)
        fp, size = images.sha256_file(img), img.stat().st_size
        alias = f"{self.prefix}-big"
        log(f"remote: {size / 1e6:.0f} MB image built in {time.perf_counter() - t:.1f}s ({fp[:12]})")
        ok, errs = [], {}
        for d in active:
            try:
                with d.http() as c:
                    if c.request("GET", f"/1.0/images/{fp}").status == 404:
                        op = c.wait(c.call("POST", "/1.0/images", body_file=img, headers={
                            "Content-Type": "application/octet-stream", "X-LXD-filename": img.name,
                            "X-LXD-public": "1"}))
                        got = (op.get("metadata") or {}).get("fingerprint") or fp
                        if got != fp:
                            raise RuntimeError(f"imported fingerprint {got} != {fp}")
                    c.call("PATCH", f"/1.0/images/{fp}", {"public": True})
                    if c.request("GET", f"/1.0/images/aliases/{alias}").status == 404:
                        c.call("POST", "/1.0/images/aliases", {"name": alias, "target": fp, "description": ""})
                p = self.start_puller(d)
                self.add_remote(d, p)
                ok.append(d)
            except Exception as e:  # noqa: BLE001
                errs[d.key] = f"failed: preparing the pull: {type(e).__name__}: {e}"[:300]
                log(f"remote: {d.label}: {errs[d.key]}")

        def drop(p: Daemon) -> None:
            with p.http() as c:
                if c.request("GET", f"/1.0/images/{fp}").status != 404:
                    c.sync("DELETE", f"/1.0/images/{fp}")

        def cycle(d, i):
            p = self.pullers[d.key]
            out = {}
            with p.http() as c:
                drop(p)
                t0 = time.perf_counter()
                try:
                    c.sync("POST", "/1.0/images", {
                        "source": {"type": "image", "mode": "pull", "server": f"https://{HOST}:{PORT}",
                                   "protocol": "lxd", "certificate": self.server_pem[d.key], "fingerprint": fp},
                        "public": False, "auto_update": False})
                except APIError as e:
                    raise RuntimeError(f"pull through the API: {e}") from None
                out["api"] = time.perf_counter() - t0
                if c.request("GET", f"/1.0/images/{fp}").status != 200:
                    raise RuntimeError("the pulled image is not in the puller's store")
                drop(p)
            out["api_rate"] = size / MiB / out["api"]
            out["cli"] = self.lxc_wall(d, "image", "copy", f"{REMOTE}:{alias}", "local:", env=p.env)
            with p.http() as c:
                if c.request("GET", f"/1.0/images/{fp}").status != 200:
                    raise RuntimeError("`lxc image copy` left no image in the puller's store")
            drop(p)
            return out

        rounds = 2 if self.quick else 4
        s, e = b.interleave("image pull over TLS", rounds, ok, cycle)
        e.update(errs)
        name = f"{size / 1e6:.0f} MB public image"
        for metric, label, unit, better in (
                ("api", f"{name} pulled from another daemon over TLS, POST /1.0/images source.server", "s", "lower"),
                ("api_rate", f"{name} pull throughput (API)", "MiB/s", "higher"),
                ("cli", f"{name} `lxc image copy b:ALIAS local:` wall (pull mode)", "s", "lower")):
            vals = b.values(ok, s, e, metric, skipped)
            vals.update(errs)
            b.row("remote", label, unit, better, None, vals)
        img.unlink(missing_ok=True)
