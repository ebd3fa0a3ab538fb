"""The userspace forwarder of `proxy` devices: a small program (standard library only, it never
imports the daemon), one process per device, run by the daemon as

    python3 -I -S forwarder.py --name KEY SPEC_JSON

SPEC_JSON: {"listen": "tcp:0.0.0.0:80-81,90", "connect": "tcp:127.0.0.1:80", "bind": "host",
"pid": <the container's init pid>, "listen_uid"/"listen_gid" (host ids; -1 leaves them),
"listen_mode" (int), "security_uid"/"security_gid" (host ids; 0/0 keeps root),
"proxy_protocol" (bool)}.

It makes its listening sockets in one network namespace and connects in the other: the host's
(the one it was started in) and the container's (setns to /proc/PID/ns/net; for non-abstract unix
sockets on the container's side, its mount namespace too). With bind=host the daemon may hand it
the listening sockets it already bound (fd numbers in $LXD_FORWARDER_FDS: that is how a port in
use becomes an error before the container starts). Once both sides are set up it drops to
security.uid/gid (on the connecting side, as LXD's forkproxy does) and reports on the fd in
$LXD_FORWARDER_STATUS ("ok", or "error: <message>"), then relays until SIGTERM or until the
container's init exits.

TCP and unix streams are relayed both ways with half-close; UDP per client address (one connected
socket per client toward the target, idle sessions dropped); a stream listener may forward to a
UDP target (each read as one datagram). proxy_protocol=true sends the PROXY protocol header LXD
5.0 sends (the v1 text line: "PROXY TCP4 <src> <dst> <sport> <dport>\\r\\n", or "PROXY UNKNOWN"
for a unix listener) to TCP targets.

The address grammar (parse_address) and listen_sockets are also what the daemon uses to
validate a device and to bind host-side listeners.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ipaddress
import json
import os
import select
import signal
import socket
import stat
import sys
import time
from dataclasses import dataclass

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
UDP_IDLE = 30.0          # seconds without traffic before a UDP session is dropped
DEFAULT_MODE = 0o644     # LXD's default mode of a listening unix socket
DGRAM_GRACE = 1.0        # seconds a stream->UDP relay still takes answers after the stream ended


# -- addresses --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Address:
    """A parsed LXD proxy address: tcp/udp with an IP address and ports, or unix with a path
    ("@name": an abstract socket)."""

    kind: str
    host: str = ""
    ports: tuple[int, ...] = ()
    path: str = ""

    @property
    def abstract(self) -> bool:
        return self.kind == "unix" and self.path.startswith("@")

    @property
    def family(self) -> int:
        if self.kind == "unix":
            return socket.AF_UNIX
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    @property
    def socktype(self) -> int:
        return socket.SOCK_DGRAM if self.kind == "udp" else socket.SOCK_STREAM

    def endpoints(self) -> list:
        """What bind()/connect() take: one per port, or the unix path."""
        if self.kind == "unix":
            return ["\0" + self.path[1:] if self.abstract else self.path]
        return [(self.host, p) for p in self.ports]

    def describe(self, i: int = 0) -> str:
        if self.kind == "unix":
            return self.path
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.ports[i]}"


def _port_list(text: str) -> tuple[int, ...]:
    out: list[int] = []
    for part in text.split(","):
        first, sep, last = part.partition("-")
        try:
            a = int(first)
            b = int(last) if sep else a
        except ValueError:
            raise ValueError(f"Invalid port range {part!r}") from None
        if not (0 < a <= b < 65536) or not first.isdigit() or (sep and not last.isdigit()):
            raise ValueError(f"Invalid port range {part!r}")
        out.extend(range(a, b + 1))
    return tuple(out)


def parse_address(text: str, *, listen: bool = True) -> Address:
    """`<type>:<addr>:<port>[-<port>][,<port>]` (IPv6 in brackets) or `unix:<path>`/`unix:@name`.
    ValueError with LXD's wording when it is not one. An empty host is the wildcard address when
    listening and the local host when connecting."""
    if not text:
        raise ValueError("Address is required")
    kind, sep, rest = text.partition(":")
    if kind not in ("tcp", "udp", "unix") or not sep:
        raise ValueError(f"Unknown protocol type {kind!r}")
    if kind == "unix":
        if not rest or "\0" in rest:
            raise ValueError(f"Invalid unix socket address {text!r}")
        if not rest.startswith("@") and not rest.startswith("/"):
            raise ValueError(f"Unix socket path {rest!r} must be absolute (or @name for an abstract socket)")
        return Address("unix", path=rest)
    if rest.startswith("["):
        end = rest.find("]")
        if end < 0 or rest[end + 1:end + 2] != ":":
            raise ValueError(f"Invalid address {rest!r}: missing port")
        host, ports = rest[1:end], rest[end + 2:]
    else:
        host, sep, ports = rest.rpartition(":")
        if not sep:
            raise ValueError(f"Invalid address {rest!r}: missing port")
        if ":" in host:
            raise ValueError(f"Invalid address {rest!r}: too many colons (put an IPv6 address in brackets)")
    if host:
        try:
            host = str(ipaddress.ip_address(host))
        except ValueError:
            raise ValueError(f"Not an IP address {host!r}") from None
    else:
        host = "0.0.0.0" if listen else "127.0.0.1"
    if not ports:
        raise ValueError(f"Invalid address {rest!r}: missing port")
    return Address(kind, host, _port_list(ports))


def connect_index(listen: Address, connect: Address, i: int) -> int:
    """Which connect port listen port `i` forwards to: the same index, or the only one."""
    return i if len(connect.endpoints()) > 1 else 0


# -- listening sockets ------------------------------------------------------------------------


class ListenError(Exception):
    pass


def _unlink_stale_socket(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ListenError(f"Failed to listen on {path}: a file that isn't a socket is in the way")
    os.unlink(path)


def listen_sockets(addr: Address, *, uid: int = -1, gid: int = -1, mode: int | None = None) -> list[socket.socket]:
    """Bound (and, for streams, listening) non-blocking sockets for every endpoint of `addr`, in
    the calling thread's network (and mount) namespace. ListenError naming the endpoint when one
    can't be bound; then none stays open."""
    out: list[socket.socket] = []
    try:
        for i, ep in enumerate(addr.endpoints()):
            sock = socket.socket(addr.family, addr.socktype)
            out.append(sock)
            try:
                if addr.kind == "tcp":
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if addr.family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                if addr.kind == "unix" and not addr.abstract:
                    _unlink_stale_socket(ep)
                sock.bind(ep)
                if addr.kind == "unix" and not addr.abstract:
                    if uid >= 0 or gid >= 0:
                        os.chown(ep, uid, gid)
                    os.chmod(ep, DEFAULT_MODE if mode is None else mode)
                if addr.socktype == socket.SOCK_STREAM:
                    sock.listen(128)
            except OSError as e:
                raise ListenError(f"Failed to listen on {addr.describe(i)}: {e.strerror or e}") from None
            sock.setblocking(False)
    except BaseException:
        for s in out:
            s.close()
        raise
    return out


# -- namespaces -------------------------------------------------------------------------------

_libc = None


def _setns(fd: int, nstype: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class Namespaces:
    """The host's (this process's at start) and the container's network and mount namespaces."""

    def __init__(self, pid: int, need_mnt: bool):
        flags = os.O_RDONLY | os.O_CLOEXEC
        self.need_mnt = need_mnt
        self.pidfd = os.pidfd_open(pid)
        self.fds = {"host": (os.open("/proc/self/ns/net", flags), os.open("/proc/self/ns/mnt", flags)),
                    "instance": (os.open(f"/proc/{pid}/ns/net", flags), os.open(f"/proc/{pid}/ns/mnt", flags))}
        # the namespace files are init's only if it is still that process now
        if _readable(self.pidfd):
            raise OSError(f"the container's init (pid {pid}) exited")
        self.current = "host"

    def enter(self, side: str) -> None:
        if side == self.current:
            return
        net, mnt = self.fds[side]
        _setns(net, CLONE_NEWNET)
        if self.need_mnt:
            _setns(mnt, CLONE_NEWNS)
        self.current = side

    def close(self) -> None:
        for net, mnt in self.fds.values():
            os.close(net)
            os.close(mnt)
        self.fds = {}


def _readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


# -- the relay --------------------------------------------------------------------------------


def _plain_ip(host: str) -> str:
    if host.startswith("::ffff:") and "." in host:
        return host[7:]
    return host.split("%", 1)[0]


def proxy_header(listen: Address, conn: socket.socket, peer) -> bytes:
    """The PROXY protocol (v1) line LXD 5.0 sends ahead of the client's bytes."""
    if listen.kind != "tcp":
        return b"PROXY UNKNOWN\r\n"
    chost, cport = _plain_ip(peer[0]), peer[1]
    local = conn.getsockname()
    dhost, dport = _plain_ip(local[0]), local[1]
    proto = "TCP6" if ":" in chost else "TCP4"
    return f"PROXY {proto} {chost} {dhost} {cport} {dport}\r\n".encode()


def log(msg: str) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    print(f"{stamp} {msg}", file=sys.stderr, flush=True)


class Forwarder:
    def __init__(self, spec: dict, inherited: list[int]):
        self.spec = spec
        self.listen = parse_address(spec["listen"], listen=True)
        self.connect = parse_address(spec["connect"], listen=False)
        self.bind = spec.get("bind") or "host"
        self.proxy_protocol = bool(spec.get("proxy_protocol"))
        self.inherited = inherited
        self.listeners: list[socket.socket] = []
        self.unix_cleanup: tuple[int, str, int] | None = None   # (dir fd, name, inode)
        self.sessions: dict = {}
        self.ns: Namespaces | None = None

    def setup(self) -> None:
        spec = self.spec
        listen_side, connect_side = ("host", "instance") if self.bind == "host" else ("instance", "host")
        inst_addr = self.connect if connect_side == "instance" else self.listen
        need_mnt = inst_addr.kind == "unix" and not inst_addr.abstract
        self.ns = Namespaces(int(spec["pid"]), need_mnt)
        if self.inherited:
            self.listeners = [socket.socket(fileno=fd) for fd in self.inherited]
            for s in self.listeners:
                s.setblocking(False)
        else:
            self.ns.enter(listen_side)
            self.listeners = listen_sockets(self.listen, uid=int(spec.get("listen_uid", -1)),
                                            gid=int(spec.get("listen_gid", -1)),
                                            mode=spec.get("listen_mode"))
        if self.listen.kind == "unix" and not self.listen.abstract:
            self.ns.enter(listen_side)
            path = self.listen.path
            with contextlib.suppress(OSError):
                dfd = os.open(os.path.dirname(path) or "/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
                name = os.path.basename(path)
                self.unix_cleanup = (dfd, name, os.stat(name, dir_fd=dfd, follow_symlinks=False).st_ino)
        self.ns.enter(connect_side)
        uid, gid = int(spec.get("security_uid", 0)), int(spec.get("security_gid", 0))
        if uid or gid:
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)

    # -- serving ---------------------------------------------------------------------------------
    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, stop.set)
        assert self.ns is not None
        loop.add_reader(self.ns.pidfd, stop.set)  # the container stopped
        tasks = []
        for i, sock in enumerate(self.listeners):
            target = self.connect.endpoints()[connect_index(self.listen, self.connect, i)]
            if self.listen.kind == "udp":
                loop.add_reader(sock.fileno(), self._udp_in, sock, target)
            else:
                tasks.append(loop.create_task(self._accept(sock, target)))
        if self.listen.kind == "udp":
            tasks.append(loop.create_task(self._sweep()))
        log("Status: Started")
        await stop.wait()
        for t in tasks:
            t.cancel()
        self.cleanup()

    def cleanup(self) -> None:
        if self.unix_cleanup is not None:
            dfd, name, ino = self.unix_cleanup
            with contextlib.suppress(OSError):
                if os.stat(name, dir_fd=dfd, follow_symlinks=False).st_ino == ino:
                    os.unlink(name, dir_fd=dfd)
        for s in self.listeners:
            s.close()

    async def _accept(self, sock: socket.socket, target) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, peer = await loop.sock_accept(sock)
            except OSError as e:
                log(f"Error: Failed to accept new connection: {e}")
                await asyncio.sleep(0.1)
                continue
            loop.create_task(self._handle(conn, peer, target))

    async def _handle(self, conn: socket.socket, peer, target) -> None:
        loop = asyncio.get_running_loop()
        conn.setblocking(False)
        out = socket.socket(self.connect.family, self.connect.socktype)
        out.setblocking(False)
        try:
            await loop.sock_connect(out, target)
            if self.proxy_protocol and self.connect.kind == "tcp":
                await loop.sock_sendall(out, proxy_header(self.listen, conn, peer))
        except OSError as e:
            log(f"Error: Failed to connect to target: {e}")
            conn.close()
            out.close()
            return
        try:
            await self._relay(conn, out, dgram=self.connect.kind == "udp")
        finally:
            conn.close()
            out.close()

    async def _relay(self, a: socket.socket, b: socket.socket, *, dgram: bool) -> None:
        loop = asyncio.get_running_loop()

        async def pipe(src: socket.socket, dst: socket.socket) -> bool:
            try:
                while True:
                    data = await loop.sock_recv(src, 65536)
                    if not data:
                        break
                    await loop.sock_sendall(dst, data)
            except OSError:
                return False
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
            return True

        up = loop.create_task(pipe(a, b))
        down = loop.create_task(pipe(b, a))
        try:
            done, pending = await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
            first = done.pop()
            if dgram and first is up and first.result():
                # the stream ended toward a datagram target: late answers get a moment
                await asyncio.wait(pending, timeout=DGRAM_GRACE)
            elif not first.result():  # an error: both directions end
                for t in pending:
                    t.cancel()
            if dgram:
                for t in pending:
                    t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        finally:
            for t in (up, down):
                t.cancel()

    # UDP: one connected socket per client toward the target
    def _udp_in(self, lsock: socket.socket, target) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(64):
            try:
                data, client = lsock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            key = (lsock.fileno(), client)
            sess = self.sessions.get(key)
            if sess is None:
                out = socket.socket(self.connect.family, socket.SOCK_DGRAM)
                out.setblocking(False)
                try:
                    out.connect(target)
                except OSError as e:
                    log(f"Error: Failed to connect to target: {e}")
                    out.close()
                    continue
                sess = self.sessions[key] = [out, time.monotonic()]
                loop.add_reader(out.fileno(), self._udp_back, key, out, lsock, client)
            sess[1] = time.monotonic()
            with contextlib.suppress(OSError):
                sess[0].send(data)

    def _udp_back(self, key, out: socket.socket, lsock: socket.socket, client) -> None:
        for _ in range(64):
            try:
                data = out.recv(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # e.g. ECONNREFUSED from an ICMP error: the session stays until idle
            sess = self.sessions.get(key)
            if sess is not None:
                sess[1] = time.monotonic()
            with contextlib.suppress(OSError):
                lsock.sendto(data, client)

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(UDP_IDLE / 3)
            now = time.monotonic()
            for key, (out, last) in list(self.sessions.items()):
                if now - last > UDP_IDLE:
                    loop.remove_reader(out.fileno())
                    out.close()
                    del self.sessions[key]


# -- the program ------------------------------------------------------------------------------


def _report(fd: int | None, text: str) -> None:
    if fd is None:
        return
    with contextlib.suppress(OSError):
        os.write(fd, (text + "\n").encode())
    with contextlib.suppress(OSError):
        os.close(fd)


def main(argv: list[str]) -> int:
    if len(argv) != 4 or argv[1] != "--name":
        print("usage: forwarder.py --name KEY SPEC_JSON", file=sys.stderr)
        return 2
    status = os.environ.get("LXD_FORWARDER_STATUS")
    status_fd = int(status) if status else None
    fds = [int(x) for x in os.environ.get("LXD_FORWARDER_FDS", "").split(",") if x]
    try:
        spec = json.loads(argv[3])
        fw = Forwarder(spec, fds)
        fw.setup()
    except (ListenError, OSError, ValueError, KeyError) as e:
        msg = str(e) if isinstance(e, ListenError) else f"Error: {e}"
        log(msg)
        _report(status_fd, "error: " + msg)
        return 1
    _report(status_fd, "ok")
    try:
        asyncio.run(fw.serve())
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
