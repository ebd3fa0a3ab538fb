"""Exec: run a command in a running container and stream it over the operation's websockets.

Protocol (CLIENT-PROTOCOL.md "Exec"):
- Non-interactive: sockets "0" (stdin), "1", "2" and an optional "control"; interactive: "0"
  (a pty in the container's devpts, both directions) and "control". The command starts once the
  required sockets are connected (non-interactive 0/1/2, interactive 0); after 5 s the operation
  fails.
- Data is binary frames; an empty text frame is EOF, both ways.
- The exit status goes into metadata.return (128+N for signal N), the operation succeeds and its
  final event is published *before* the sockets close; sockets are closed without waiting for
  the peer's close frame.
- Closing "control" while the command runs kills it.
- Interactive stdin EOF: LXD closes the pty master, which hangs up the command (rc 129) and loses
  its output. We don't copy that: at EOF we send the terminal's EOF character (VEOF, ^D) when the
  terminal is in canonical mode, so `echo x | lxc exec -t c -- cat` ends normally, and otherwise
  leave the command running.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
import signal
import struct
import termios
from pathlib import Path
from typing import Any

from lxd_daemon.errors import BadRequest
from lxd_daemon.ops import CLASS_TASK, CLASS_WEBSOCKET, Operation
from lxd_daemon.projects.naming import query

log = logging.getLogger("lxd.exec")

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CONNECT_TIMEOUT = 5.0
CLOSE_TIMEOUT = 1.0
CHUNK = 1 << 17


def build_environment(expanded_config: dict[str, str], requested: dict[str, str] | None,
                      user: int) -> dict[str, str]:
    """LXD's exec environment: environment.* keys, the request on top, then defaults."""
    env = {k[len("environment."):]: v for k, v in expanded_config.items() if k.startswith("environment.")}
    env.update(requested or {})
    env.setdefault("PATH", DEFAULT_PATH)
    if user == 0:
        env.setdefault("HOME", "/root")
        env.setdefault("USER", "root")
    env.setdefault("LANG", "C.UTF-8")
    return env


def default_cwd(env: dict[str, str], cwd: str) -> str:
    if cwd:
        return cwd
    return env.get("HOME") or "/"


def resources(inst) -> dict[str, list[str]]:
    """An operation's `resources` for an Instance (instances.models): its API name and project."""
    q = query(inst.project)
    return {"instances": [f"/1.0/instances/{inst.api_name}{q}"], "containers": [f"/1.0/containers/{inst.api_name}{q}"]}


async def _wait_fd(loop: asyncio.AbstractEventLoop, fd: int, *, write: bool, also: asyncio.Event | None = None) -> None:
    """Wait until fd is readable (or writable), or `also` is set."""
    fut = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    (loop.add_writer if write else loop.add_reader)(fd, ready)
    waiter = None
    try:
        if also is None:
            await fut
        else:
            waiter = asyncio.ensure_future(also.wait())
            await asyncio.wait({fut, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        (loop.remove_writer if write else loop.remove_reader)(fd)
        if waiter is not None:
            waiter.cancel()


async def close_websocket(ws) -> None:
    """Send a close frame and let the transport go; never wait for the peer's answer."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(ws.close(), CLOSE_TIMEOUT)


class Process:
    """A command started in a container through a liblxc worker."""

    def __init__(self, pool, worker, pid: int):
        self.pool = pool
        self.worker = worker
        self.pid = pid
        self.code: int | None = None
        self.exited = asyncio.Event()
        self.pidfd: int | None = None
        try:
            self.pidfd = os.pidfd_open(pid)
        except OSError:
            self.pidfd = None  # already reaped by the worker: nothing left to signal
        self._waiter = asyncio.ensure_future(worker.wait_exit(pid))
        self._waiter.add_done_callback(self._done)

    def _done(self, fut: asyncio.Future) -> None:
        try:
            self.code = fut.result()
        except Exception as e:  # the worker died: the command died with it
            log.warning("lost the exit status of pid %s: %s", self.pid, e)
            self.code = 255
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
        self.exited.set()

    def signal(self, sig: int) -> None:
        if self.exited.is_set() or self.pidfd is None:
            return
        with contextlib.suppress(ProcessLookupError, OSError):
            signal.pidfd_send_signal(self.pidfd, sig)

    async def wait(self) -> int:
        await self.exited.wait()
        return self.code if self.code is not None else 255


async def start_process(services, inst, argv: list[str], env: dict[str, str], uid: int, gid: int,
                        cwd: str, *, init_pid: int, stdio: list[int] | None = None, pty: dict | None = None
                        ) -> tuple[Process, int | None]:
    """Attach argv to the running container. Returns the process and the pty master (or None)."""
    worker, pid, fds = await services.runtime.exec_attach(
        name=inst.name, lxcpath=str(inst.lxcpath), config_path=str(Path(inst.log_dir) / "lxc.conf"),
        lane=inst.lane, argv=list(argv), env=env, uid=uid, gid=gid, cwd=cwd, pty=pty, init_pid=init_pid,
        privileged=bool(inst.privileged), stdio=stdio or [])
    master = fds[0] if fds else None
    for extra in fds[1:]:
        os.close(extra)
    return Process(services.pool, worker, pid), master


def set_winsize(fd: int, width: int, height: int) -> None:
    if width > 0 and height > 0:
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))


class ExecSession:
    """One exec operation with websockets."""

    def __init__(self, services, inst, *, argv: list[str], env: dict[str, str], uid: int, gid: int,
                 cwd: str, interactive: bool, width: int, height: int, init_pid: int):
        self.services = services
        self.inst = inst
        self.argv = argv
        self.env = env
        self.uid = uid
        self.gid = gid
        self.cwd = cwd
        self.interactive = interactive
        self.width = width
        self.height = height
        self.init_pid = init_pid
        self.channels = ("0", "control") if interactive else ("0", "1", "2", "control")
        self.required = ("0",) if interactive else ("0", "1", "2")
        self.sockets: dict[str, Any] = {}
        self.ready = asyncio.Event()
        self.started = asyncio.Event()
        self.finished = asyncio.Event()
        self.proc: Process | None = None
        self.master: int | None = None
        self.stdin_w: int | None = None  # our end of the command's stdin pipe
        self.outputs: dict[str, int] = {}  # channel -> our read end

    # -- operation plumbing ----------------------------------------------------------
    def secrets_for(self, op: Operation) -> dict[str, str]:
        return {ch: op.new_secret(ch) for ch in self.channels}

    async def on_connect(self, op: Operation, channel: str, ws) -> None:
        if channel in self.sockets or self.finished.is_set():
            await close_websocket(ws)
            return
        self.sockets[channel] = ws
        if all(ch in self.sockets for ch in self.required):
            self.ready.set()
        if channel == "control":
            reader = self._control_loop(ws)
        elif channel == "0":
            reader = self._stdin_loop(ws)
        else:
            reader = self._drain_loop(ws)
        task = asyncio.ensure_future(reader)
        waiter = asyncio.ensure_future(self.finished.wait())
        try:
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if not waiter.done():
                await waiter
        finally:
            task.cancel()
            waiter.cancel()
            with contextlib.suppress(BaseException):
                await task
        await close_websocket(ws)

    async def run(self, op: Operation) -> None:
        try:
            await asyncio.wait_for(self.ready.wait(), CONNECT_TIMEOUT)
        except TimeoutError:
            self.finished.set()
            op.fail("Timed out waiting for websockets to connect")
            return
        try:
            await self._start()
        except Exception as e:
            self._close_fds()
            self.finished.set()
            message = e.message if hasattr(e, "message") else str(e)
            op.fail(message)
            return
        self.started.set()
        try:
            pumps = [asyncio.ensure_future(self._pump_out(ch, fd)) for ch, fd in self.outputs.items()]
            code = await self.proc.wait()
            if pumps:
                await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            self._close_fds()
        # The client reads metadata.return from the final event: publish it before closing.
        op.succeed({"return": code})
        self.finished.set()

    # -- start -----------------------------------------------------------------------
    async def _start(self) -> None:
        if self.interactive:
            host_uid, host_gid = self.inst.idmap.to_host(self.uid, self.gid)
            if host_uid < 0 or host_gid < 0:
                host_uid, host_gid = self.inst.idmap.root_ids()
            pty = {"uid": host_uid, "gid": host_gid, "width": self.width, "height": self.height}
            self.proc, master = await start_process(self.services, self.inst, self.argv, self.env, self.uid,
                                                    self.gid, self.cwd, init_pid=self.init_pid, pty=pty)
            os.set_blocking(master, False)
            self.master = master
            self.outputs = {"0": master}
            return
        stdin_r, stdin_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            self.proc, _ = await start_process(self.services, self.inst, self.argv, self.env, self.uid,
                                               self.gid, self.cwd, init_pid=self.init_pid,
                                               stdio=[stdin_r, out_w, err_w])
        except BaseException:
            for fd in (stdin_r, stdin_w, out_r, out_w, err_r, err_w):
                os.close(fd)
            raise
        for fd in (stdin_r, out_w, err_w):
            os.close(fd)
        for fd in (stdin_w, out_r, err_r):
            os.set_blocking(fd, False)
        self.stdin_w = stdin_w
        self.outputs = {"1": out_r, "2": err_r}

    def _close_fds(self) -> None:
        fds = list(self.outputs.values())
        if self.stdin_w is not None:
            fds.append(self.stdin_w)
            self.stdin_w = None
        for fd in set(fds):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.outputs = {}
        self.master = None

    # -- pumps -----------------------------------------------------------------------
    async def _pump_out(self, channel: str, fd: int) -> None:
        """Copy fd to the channel's websocket until EOF (or, once the command exited, until the
        pipe is empty: a background child may keep it open), then send the EOF barrier."""
        loop = asyncio.get_running_loop()
        ws = self.sockets.get(channel)
        while True:
            try:
                data = os.read(fd, CHUNK)
            except BlockingIOError:
                if self.proc.exited.is_set():
                    break
                await _wait_fd(loop, fd, write=False, also=self.proc.exited)
                continue
            except OSError as e:
                if e.errno == errno.EIO:  # pty: every slave is closed
                    break
                raise
            if not data:
                break
            if ws is not None:
                try:
                    await ws.send_bytes(data)
                except Exception:
                    ws = None  # the client went away; keep draining so the command never blocks
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.send_text("")

    async def _stdin_loop(self, ws) -> None:
        await self.started.wait()
        loop = asyncio.get_running_loop()
        while True:
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                break
            data = msg.get("bytes")
            if data is None:
                text = msg.get("text")
                if text:  # a non-empty text frame is data too
                    data = text.encode()
                else:
                    self._stdin_eof()
                    if not self.interactive:
                        return
                    continue
            fd = self.master if self.interactive else self.stdin_w
            if fd is None:
                continue
            view = memoryview(data)
            while view:
                try:
                    n = os.write(fd, view)
                    view = view[n:]
                except BlockingIOError:
                    await _wait_fd(loop, fd, write=True, also=self.proc.exited)
                    if self.proc.exited.is_set():
                        return
                except OSError:
                    return  # the command closed its stdin
        if not self.interactive:
            self._stdin_eof()

    def _stdin_eof(self) -> None:
        if self.interactive:
            master = self.master
            if master is None:
                return
            with contextlib.suppress(OSError):
                attrs = termios.tcgetattr(master)
                if attrs[3] & termios.ICANON:
                    os.write(master, attrs[6][termios.VEOF])
            return
        if self.stdin_w is not None:
            os.close(self.stdin_w)
            self.stdin_w = None

    async def _drain_loop(self, ws) -> None:
        """Output sockets: read (and ignore) whatever the client sends until it goes away."""
        while True:
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                return

    async def _control_loop(self, ws) -> None:
        while True:
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                break
            raw = msg.get("text") if msg.get("text") is not None else (msg.get("bytes") or b"").decode(errors="replace")
            try:
                ctl = json.loads(raw)
            except (ValueError, RecursionError):  # malformed, or nested past the parser's limit
                log.debug("ignoring a malformed control message: %r", raw[:100])
                continue
            if isinstance(ctl, dict):
                self._control(ctl)
        # The client went away while the command runs: kill it (as LXD does).
        if self.started.is_set() and self.proc is not None and not self.proc.exited.is_set():
            self.proc.signal(signal.SIGKILL)

    def _control(self, ctl: dict) -> None:
        command = ctl.get("command")
        if command == "window-resize":
            args = ctl.get("args") or {}
            try:
                width, height = int(args.get("width", 0)), int(args.get("height", 0))
            except (TypeError, ValueError):
                return
            self.width, self.height = width, height
            if self.master is not None:
                with contextlib.suppress(OSError):
                    set_winsize(self.master, width, height)
        elif command == "signal":
            try:
                sig = int(ctl.get("signal", 0))
            except (TypeError, ValueError):
                return
            if self.proc is not None and 0 < sig < 65:
                self.proc.signal(sig)


async def exec_instance(services, inst, req, *, init_pid: int, requestor: dict | None = None) -> Operation:
    """Create the exec operation for a parsed InstanceExecPost."""
    if not req.command:
        raise BadRequest("No command given")
    env = build_environment(inst.expanded_config, req.environment, req.user)
    cwd = default_cwd(env, req.cwd)
    meta_base = {"command": list(req.command), "environment": env, "interactive": req.interactive}
    services.events.lifecycle("instance-exec", f"/1.0/instances/{inst.api_name}{query(inst.project)}",
                              {"command": list(req.command)}, requestor=requestor, project=inst.project)

    if req.wait_for_websocket:
        session = ExecSession(services, inst, argv=list(req.command), env=env, uid=req.user, gid=req.group,
                              cwd=cwd, interactive=req.interactive, width=req.width, height=req.height,
                              init_pid=init_pid)
        op = services.ops.create(cls=CLASS_WEBSOCKET, description="Executing command",
                                 resources=resources(inst), metadata=dict(meta_base),
                                 run=session.run, on_connect=session.on_connect, start=False, project=inst.project)
        op.metadata["fds"] = session.secrets_for(op)
        services.ops.start(op)
        return op

    async def run(op: Operation) -> dict:
        return await run_detached(services, inst, op, list(req.command), env, req.user, req.group, cwd,
                                  record=req.record_output, init_pid=init_pid)

    return services.ops.create(cls=CLASS_TASK, description="Executing command", resources=resources(inst),
                               metadata=dict(meta_base), run=run, project=inst.project)


async def run_detached(services, inst, op: Operation, argv: list[str], env: dict[str, str], uid: int, gid: int,
                       cwd: str, *, record: bool, init_pid: int) -> dict:
    """wait-for-websocket false: stdin from /dev/null; output to /dev/null or, with record-output,
    to exec_<op id>.stdout/.stderr in the instance's log directory (served by the logs API)."""
    fds: list[int] = []
    meta: dict[str, Any] = {}
    try:
        fds.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
        if record:
            log_dir = Path(inst.log_dir)
            await asyncio.to_thread(log_dir.mkdir, parents=True, exist_ok=True)
            for suffix in ("stdout", "stderr"):
                path = log_dir / f"exec_{op.id}.{suffix}"
                fds.append(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600))
            base, q = f"/1.0/instances/{inst.api_name}/logs/exec_{op.id}", query(inst.project)
            meta["output"] = {"1": f"{base}.stdout{q}", "2": f"{base}.stderr{q}"}
        else:
            null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
            fds += [null, os.dup(null)]
        proc, _ = await start_process(services, inst, argv, env, uid, gid, cwd, init_pid=init_pid, stdio=fds)
    finally:
        for fd in fds:
            os.close(fd)
    if meta:
        op.update_metadata(meta)
    code = await proc.wait()
    meta["return"] = code
    return meta
