"""The composition root: build the store, workers, services and app; serve; shut down in order."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import gc
import grp
import importlib
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

from lxd_daemon.settings import Settings

log = logging.getLogger("lxd.daemon")

SD_LISTEN_FDS_START = 3

# Subsystems wired in this order. Each module has `async def setup(services) -> list[Routes]`:
# it sets its service on `services`, registers hooks and API extensions, and returns its routers.
SUBSYSTEMS: tuple[str, ...] = (
    "lxd_daemon.warnings.subsystem",  # services.warnings first: any setup below may raise one
    "lxd_daemon.projects.subsystem",  # services.projects: everything else belongs to a project
    "lxd_daemon.trust.subsystem",  # services.trust (the Gate asks it), /1.0/certificates
    "lxd_daemon.storage.subsystem",
    "lxd_daemon.images.subsystem",
    "lxd_daemon.instances.subsystem",
    "lxd_daemon.api.instance_exec",
    "lxd_daemon.networks.subsystem",
    "lxd_daemon.server.https",  # the TLS listener on core.https_address (started once the app is built)
    "lxd_daemon.api.resources",  # GET /1.0/resources (the host's hardware)
    "lxd_daemon.api.metrics",  # GET /1.0/metrics, core.metrics_authentication
    "lxd_daemon.devlxd.server",  # /dev/lxd: the guest API on $LXD_DIR/devlxd/sock (its own app)
    "lxd_daemon.api.not_yet",
)


class StartupError(Exception):
    pass


class DirLock:
    """An exclusive flock on $LXD_DIR/lxd.lock, so two daemons never share a directory."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                who = f" (pid {holder})" if holder else ""
                raise StartupError(
                    f"Another daemon is already running on {self.path.parent}{who}") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def systemd_sockets() -> list[socket.socket]:
    """Sockets passed by systemd socket activation (LISTEN_FDS), if they are meant for us."""
    try:
        if int(os.environ.get("LISTEN_PID", "0")) != os.getpid():
            return []
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    socks = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        if stat.S_ISSOCK(os.fstat(fd).st_mode):
            os.set_inheritable(fd, False)
            socks.append(socket.socket(fileno=fd))
    return socks


def group_id(group: str | None) -> int:
    if not group:
        return 0
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise StartupError(f"Group {group!r} does not exist") from None


def remove_stale_socket(path: Path) -> None:
    """Remove a socket file nobody listens on; refuse if something does."""
    if not (path.exists() or path.is_symlink()):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # nobody listens: stale
    else:
        raise StartupError(f"Something is already listening on {path}")
    finally:
        probe.close()


def socket_activated() -> bool:
    return os.environ.get("LISTEN_PID") == str(os.getpid())


def bind_unix_socket(path: Path, group: str | None) -> socket.socket:
    """Bind $LXD_DIR/unix.socket (mode 0660, root:group), replacing a stale one."""
    remove_stale_socket(path)
    gid = group_id(group)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chown(path, 0 if os.geteuid() == 0 else os.geteuid(), gid if os.geteuid() == 0 or group else -1)
    os.chmod(path, 0o660)
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def prepare_dirs(lxd_dir: Path) -> None:
    lxd_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(lxd_dir, 0o711)
    # As LXD: only what a container's (unprivileged) root must traverse is 0711; the instance
    # volumes behind containers/ are 0100 each (see storage.drivers.base).
    for sub, mode in (("database", 0o700), ("logs", 0o700), ("containers", 0o711), ("images", 0o700),
                      ("storage-pools", 0o711), ("security", 0o700)):
        p = lxd_dir / sub
        if p.is_symlink():  # images or backups on a custom volume (storage.images_volume)
            continue
        p.mkdir(exist_ok=True)
        os.chmod(p, mode)


def prepare_state(s: Settings) -> None:
    """Create the key pair and migrate the schema, in a child process, when there is work to do."""
    from lxd_daemon import prepare

    if not prepare.needed(s.lxd_dir):
        return
    cmd = [sys.executable, "-m", "lxd_daemon.prepare", str(s.lxd_dir)]
    if s.debug or s.verbose:
        cmd.insert(3, "--verbose")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    rc = subprocess.run(cmd, stdin=subprocess.DEVNULL, env=env, close_fds=True).returncode
    if rc != 0:
        raise StartupError(f"Failed to prepare {s.lxd_dir} (key pair or database migration; exit status {rc})")


class Daemon:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.stop_reason: str | None = None
        self.server = None
        self.services = None
        self._created_socket = False
        self._startup_tasks: list[asyncio.Task] = []

    def request_stop(self, reason: str) -> None:
        """reason: 'exit' leaves containers running, 'shutdown' stops them first."""
        if self.stop_reason != "shutdown":
            self.stop_reason = reason
        if self.server is not None:
            self.server.should_exit = True

    def run(self) -> int:
        s = self.settings
        prepare_dirs(s.lxd_dir)
        lock = DirLock(s.lock_path)
        lock.acquire()
        try:
            from lxd_daemon.runtime.pool import WorkerPool

            # Cheap refusals first, before any slow start-up work.
            group_id(s.group)
            if not socket_activated():
                remove_stale_socket(s.socket_path)
            prepare_state(s)
            cert_pem = (s.lxd_dir / "server.crt").read_text()
            # Workers first: they must not inherit any listening socket.
            pool = WorkerPool(s.workers)
            pool.spawn()
            try:
                socks = systemd_sockets()
                if not socks:
                    socks = [bind_unix_socket(s.socket_path, s.group)]
                    self._created_socket = True
                try:
                    self._run_loop(pool, cert_pem, socks)
                finally:
                    for sock in socks:
                        sock.close()
                    if self._created_socket:
                        with contextlib.suppress(FileNotFoundError):
                            s.socket_path.unlink()
            finally:
                pool.close()
        finally:
            lock.release()
        log.info("daemon stopped", extra={"reason": self.stop_reason or "exit"})
        return 0

    def _run_loop(self, pool, cert_pem: str, socks: list[socket.socket]) -> None:
        try:
            import uvloop
        except ImportError:
            asyncio.run(self._serve(pool, cert_pem, socks))
        else:
            uvloop.run(self._serve(pool, cert_pem, socks))

    async def _serve(self, pool, cert_pem: str, socks: list[socket.socket]) -> None:
        from lxd_daemon.app import create_app
        from lxd_daemon.db import Database
        from lxd_daemon.events import EventHub, LoggingToEvents
        from lxd_daemon.ops import OperationManager
        from lxd_daemon.server.config import ServerConfig
        from lxd_daemon.server.service import ServerService, load_config
        from lxd_daemon.services import Services
        from lxd_daemon.util.memory import MemoryReclaimer

        loop = asyncio.get_running_loop()
        pool.attach(loop)
        reclaimer = loop.create_task(MemoryReclaimer().run())  # gives memory left by bursts back
        s = self.settings
        db = Database(s.db_path)
        events = EventHub()
        events.bind_loop(loop)
        logging.getLogger("lxd").addHandler(LoggingToEvents(events))
        ops = OperationManager(events)
        config = ServerConfig(await db.run(load_config))
        from lxd_daemon.runtime.client import RuntimeClient

        runtime = RuntimeClient(pool)
        driver_version, lxc_features = await asyncio.gather(runtime.version(), runtime.lxc_features())
        server = ServerService(db=db, events=events, config=config, certificate_pem=cert_pem,
                               driver_version=driver_version, lxc_features=lxc_features)
        services = Services(lxd_dir=s.lxd_dir, db=db, events=events, ops=ops, pool=pool, server=server,
                            request_stop=self.request_stop, debug=s.debug)
        self.services = services
        routers = []
        for name in SUBSYSTEMS:
            module = importlib.import_module(name)
            routers.extend(await module.setup(services))
        services.app = create_app(services, routers)
        # Who the caller is: the unix socket's clients are trusted (its mode and group decide
        # who may connect); the TLS listener has a Gate of its own (api.access).
        from lxd_daemon.api.access import Gate

        app = Gate(services.app, services, "unix")
        if services.https is not None:
            await services.https.startup()  # core.https_address: listening before the daemon is ready
        if s.debug:  # each request in the debug log (as on the TLS listener); nothing in a request's way otherwise
            from lxd_daemon.api.accesslog import AccessLog
            app = AccessLog(app)

        server_ = make_server(app)
        _freeze_startup_objects()
        self.server = server_
        for sig, reason in ((signal.SIGTERM, "exit"), (signal.SIGINT, "exit"), (signal.SIGPWR, "shutdown")):
            loop.add_signal_handler(sig, self.request_stop, reason)
        log.info("daemon started", extra={"path": str(s.socket_path), "pid": os.getpid()})
        # Keep references: the loop only holds tasks weakly.
        self._startup_tasks = [loop.create_task(_run_hook(hook, "startup")) for hook in services.startup_hooks]
        try:
            await server_.serve(sockets=socks)
        finally:
            reclaimer.cancel()
            if self.stop_reason == "shutdown":
                for hook in services.shutdown_hooks:
                    await _run_hook(hook, "shutdown")
            for hook in services.exit_hooks:
                await _run_hook(hook, "exit")
            await ops.shutdown()
            db.close()


def _freeze_startup_objects() -> None:
    """Move what start-up created (modules, classes, routes: ~100,000 objects that live as long
    as the daemon) out of the cyclic garbage collector's reach.

    Every full collection walks all tracked objects: ~45 ms with them, a few ms without, for
    the daemon's memory reclaimer (util.memory) and Python's own collections alike. And Python
    runs a full collection only once the objects that survived the last one grew by a quarter:
    counting the start-up objects, that let ~25,000 objects of cyclic garbage pile up first."""
    gc.collect()  # start-up's own garbage is not worth keeping for ever
    gc.freeze()
    gc.collect()  # counts the long-lived objects afresh: none are left outside the frozen set


async def _run_hook(hook, kind: str) -> None:
    try:
        await hook()
    except Exception:
        log.exception("hook failed", extra={"kind": kind})


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server without its own signal handling (the daemon installs its own)."""

        @contextlib.contextmanager
        def capture_signals(self):
            yield

    return Server


def _http_protocol():
    """uvicorn's httptools protocol, answering requests its parser refuses (an unknown method,
    a malformed request line or header) in LXD's error envelope instead of uvicorn's plain text.
    A method the parser does not know gets 405, as a known method a route lacks does."""
    import re

    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from lxd_daemon.api.envelope import error_body
    from lxd_daemon.api.socket_body import RAW_LIMIT as raw_limit

    request_line = re.compile(rb"\A\s*([!#$%&'*+.^_`|~0-9A-Za-z-]+) ")
    known = {b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS", b"CONNECT", b"TRACE"}

    class LXDHttpToolsProtocol(HttpToolsProtocol):
        _head = b""
        # The raw bytes of the connection's first request, until it is complete (or RAW_LIMIT):
        # socket_body.take_chunked() decodes a chunked body's start from them.
        _raw: list[bytes] | None = None
        _raw_size = 0

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._raw = []

        def data_received(self, data: bytes) -> None:
            if not self._head or self.cycle is None or self.cycle.response_complete:
                self._head = bytes(data[:64])  # the start of a request, to tell why it was refused
            if self._raw is not None:
                self._raw_size += len(data)
                if self._raw_size > raw_limit:
                    self._raw = None
                else:
                    self._raw.append(data)
            super().data_received(data)

        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            if self._raw is not None and not any(n == b"transfer-encoding" and b"chunked" in v.lower()
                                                 for n, v in self.headers):
                self._raw = None  # only a chunked body is ever decoded from them

        def on_message_complete(self) -> None:
            self._raw = None
            super().on_message_complete()

        @property
        def raw_request(self) -> list[bytes] | None:
            return self._raw

        def take_raw_request(self) -> bytes | None:
            raw, self._raw = self._raw, None
            return b"".join(raw) if raw is not None else None

        def send_400_response(self, msg: str) -> None:
            m = request_line.match(self._head)
            if m and m.group(1) not in known:
                status, message = 405, f"Method {m.group(1).decode()!r} not allowed"
            else:
                status, message = 400, "Invalid HTTP request"
            body = error_body(status, message)
            reason = b"Method Not Allowed" if status == 405 else b"Bad Request"
            self.transport.write(b"".join([
                b"HTTP/1.1 %d %s\r\n" % (status, reason),
                b"content-type: application/json\r\n",
                b"content-length: %d\r\n" % len(body),
                b"connection: close\r\n\r\n",
                body,
            ]))
            self.transport.close()

    return LXDHttpToolsProtocol


def uvicorn_config(app):
    """How the daemon serves its ASGI app (also used by in-process API tests)."""
    import uvicorn

    return uvicorn.Config(app, lifespan="off", http=_http_protocol(), ws="websockets-sansio",
                          log_config=None, access_log=False, proxy_headers=False,
                          server_header=False, date_header=False, timeout_graceful_shutdown=5,
                          ws_ping_interval=10)


def make_server(app):
    """A uvicorn server for app that leaves signal handling to the daemon."""
    return _server_class()(uvicorn_config(app))


def run(settings: Settings) -> int:
    from lxd_daemon import logs
    from lxd_daemon.util.memory import limit_malloc_arenas

    limit_malloc_arenas()  # before the first thread
    logs.setup(debug=settings.debug, verbose=settings.verbose, logfile=settings.logfile, syslog=settings.syslog)
    try:
        return Daemon(settings).run()
    except StartupError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
