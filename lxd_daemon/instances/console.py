"""The container console: a websocket session on the console pty, and the console log.

The console is reached through liblxc's console_getfd (tty 0) in the instance's worker, which
hands back the pty master and the command socket that keeps the console reserved; both are
closed when the session ends, freeing the console for the next client. Output the container
wrote while nobody was attached is in the console log file (lxc.console.logfile).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
from pathlib import Path
from typing import Any

from lxd_daemon.errors import BadRequest, LXDError
from lxd_daemon.instances.exec import CHUNK, _wait_fd, close_websocket, resources, set_winsize
from lxd_daemon.ops import CLASS_WEBSOCKET, Operation

log = logging.getLogger("lxd.console")

CONNECT_TIMEOUT = 5.0


def log_path(inst) -> Path:
    return Path(inst.log_dir) / "console.log"


def read_log(inst) -> bytes:
    try:
        return log_path(inst).read_bytes()
    except FileNotFoundError:
        return b""


def clear_log(inst) -> None:
    """Empty the log in place (liblxc appends to the file it holds open)."""
    with contextlib.suppress(FileNotFoundError):
        fd = os.open(log_path(inst), os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)


class ConsoleSession:
    def __init__(self, services, inst, width: int, height: int):
        self.services = services
        self.inst = inst
        self.width = width
        self.height = height
        self.sockets: dict[str, Any] = {}
        self.data_connected = asyncio.Event()
        self.finished = asyncio.Event()
        self.master: int | None = None
        self.keep: list[int] = []

    async def on_connect(self, op: Operation, channel: str, ws) -> None:
        if channel in self.sockets or self.finished.is_set():
            await close_websocket(ws)
            return
        self.sockets[channel] = ws
        if channel == "0":
            self.data_connected.set()
        reader = asyncio.ensure_future(self._control_loop(ws) if channel == "control" else self._input_loop(ws))
        waiter = asyncio.ensure_future(self.finished.wait())
        try:
            await asyncio.wait({reader, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            reader.cancel()
            waiter.cancel()
            with contextlib.suppress(BaseException):
                await reader
        # The client left (or the console ended): the session is over.
        self.finished.set()
        await close_websocket(ws)

    async def run(self, op: Operation) -> None:
        try:
            await asyncio.wait_for(self.data_connected.wait(), CONNECT_TIMEOUT)
        except TimeoutError:
            self.finished.set()
            op.fail("Timed out waiting for websockets to connect")
            return
        config_path = str(Path(self.inst.log_dir) / "lxc.conf")
        try:
            fds = await self.services.runtime.console_open(self.inst.name, str(self.inst.lxcpath), config_path, 0,
                                                           lane=self.inst.lane)
        except LXDError as e:
            self.finished.set()
            op.fail(e.message)
            return
        self.master, self.keep = fds[0], fds[1:]
        os.set_blocking(self.master, False)
        with contextlib.suppress(OSError):
            set_winsize(self.master, self.width, self.height)
        try:
            await self._output_loop()
        finally:
            for fd in [self.master, *self.keep]:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self.master = None
            self.keep = []
        op.succeed()
        self.finished.set()

    async def _output_loop(self) -> None:
        loop = asyncio.get_running_loop()
        ws = self.sockets.get("0")
        while not self.finished.is_set():
            try:
                data = os.read(self.master, CHUNK)
            except BlockingIOError:
                await _wait_fd(loop, self.master, write=False, also=self.finished)
                continue
            except OSError as e:
                if e.errno == errno.EIO:
                    break
                raise
            if not data:
                break
            try:
                await ws.send_bytes(data)
            except Exception:
                break

    async def _input_loop(self, ws) -> None:
        loop = asyncio.get_running_loop()
        while True:
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                return
            data = msg.get("bytes")
            if data is None:
                data = (msg.get("text") or "").encode()
            if not data or self.master is None:
                continue
            view = memoryview(data)
            while view and self.master is not None:
                try:
                    view = view[os.write(self.master, view):]
                except BlockingIOError:
                    await _wait_fd(loop, self.master, write=True, also=self.finished)
                except OSError:
                    return

    async def _control_loop(self, ws) -> None:
        while True:
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                return
            raw = msg.get("text") or (msg.get("bytes") or b"").decode(errors="replace")
            try:
                ctl = json.loads(raw)
            except (ValueError, RecursionError):  # malformed, or nested past the parser's limit
                continue
            if isinstance(ctl, dict) and ctl.get("command") == "window-resize":
                args = ctl.get("args") or {}
                try:
                    self.width, self.height = int(args.get("width", 0)), int(args.get("height", 0))
                except (TypeError, ValueError):
                    continue
                if self.master is not None:
                    with contextlib.suppress(OSError):
                        set_winsize(self.master, self.width, self.height)


def console_operation(services, inst, width: int, height: int, kind: str) -> Operation:
    if kind not in ("console", ""):
        if kind == "vga":
            raise BadRequest("VGA consoles are only available on virtual machines")
        raise BadRequest(f"Unknown console type {kind!r}")
    session = ConsoleSession(services, inst, width, height)
    op = services.ops.create(cls=CLASS_WEBSOCKET, description="Showing console", resources=resources(inst),
                             metadata={}, run=session.run, on_connect=session.on_connect, start=False,
                             project=inst.project)
    op.metadata["fds"] = {"0": op.new_secret("0"), "control": op.new_secret("control")}
    services.ops.start(op)
    return op
