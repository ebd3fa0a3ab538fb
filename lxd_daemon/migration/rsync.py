"""rsync through a migration Channel, both ends as LXD runs them (shared/reference/API.md §15).

Sender: `rsync -ar --devices --numeric-ids --partial --sparse [--bwlimit N] [features]
-e '<python> -m lxd_daemon netcat @SOCKET NAME' -- PATH/ localhost:/tmp/foo`. The remote shell is
`lxd netcat` tied to an abstract unix socket this module listens on; what rsync writes into it goes
out as binary frames, and what arrives over the channel goes back to rsync, until the receiver's
barrier. When rsync's side ends, an empty text frame (the barrier) ends our half.

Receiver: `rsync --server -vlogDtpre.iLsfx --numeric-ids --devices --partial --sparse
--modify-window=-1 [features] -- . PATH` with stdin fed from the channel until the sender's barrier
and stdout sent over it, then a barrier.

The server options must match the sender's protocol options exactly (LXD's receiver is built the
same way), so nothing beyond LXD's negotiated features (`xattrs`, `delete`, `compress`) is added:
in particular hard links are not preserved (no -H), as with LXD.

Either side fails with MigrationError when rsync fails or the channel closes before its barrier;
rsync and netcat are then killed and reaped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import signal
import socket
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lxd_daemon.migration.wire import Channel, MigrationError

log = logging.getLogger("lxd.migration")

CHUNK = 128 * 1024
SPAWN_TIMEOUT = 10.0  # rsync must have started its remote shell (netcat) by then
STDERR_KEEP = 4096
DRAIN_TIMEOUT = 30.0  # once rsync exited, how long the other side may take to end its stream
# The receiver's server options: what LXD's receiver passes (the sender's -ar --devices
# --numeric-ids --partial --sparse as rsync would hand them to its server).
SERVER_FLAGS = "-vlogDtpre.iLsfx"
# The same with rsync 3.2's capability negotiation (checksum and compression choice, varint
# lists, ...): only when the sender said its rsync negotiates (Features.negotiate): zstd, not zlib.
SERVER_FLAGS_NEGOTIATED = SERVER_FLAGS + "CIvu"

Progress = Callable[[int, float], None]  # (bytes so far, bytes per second); at most once a second


@dataclass
class Features:
    """The rsync features of a MigrationHeader (`rsyncFeatures`)."""

    xattrs: bool = True
    delete: bool = True
    compress: bool = True
    bidirectional: bool = True
    negotiate: bool = False  # the sender's rsync negotiates (header.negotiates): the receiver's flags

    @classmethod
    def from_pb(cls, msg) -> Features:
        """From a header's rsyncFeatures (None or no `bidirectional`: a peer from before the
        negotiation existed, LXD 3.7 level: xattrs, delete and compress)."""
        if msg is None or not (msg.HasField("bidirectional") and msg.bidirectional):
            return cls(xattrs=True, delete=True, compress=True, bidirectional=False)
        return cls(xattrs=bool(msg.xattrs), delete=bool(msg.delete), compress=bool(msg.compress),
                   bidirectional=True)

    def to_pb(self):
        from lxd_daemon.migration import migrate_pb2 as pb

        return pb.rsyncFeatures(xattrs=self.xattrs, delete=self.delete, compress=self.compress,
                                bidirectional=self.bidirectional)

    def common(self, other: Features) -> Features:
        """The features both sides have (`bidirectional` only when both do)."""
        return Features(xattrs=self.xattrs and other.xattrs, delete=self.delete and other.delete,
                        compress=self.compress and other.compress,
                        bidirectional=self.bidirectional and other.bidirectional)

    def args(self) -> list[str]:
        """rsync's arguments for these features (the same on both ends)."""
        out: list[str] = []
        if self.xattrs:
            out += ["--xattrs", "--filter=-x security.selinux"]
        if self.delete:
            out.append("--delete")
        if self.compress:
            out += ["--compress", "--compress-level=2"]
        return out


def progress_text(name: str, done: int, speed: float) -> str:
    """LXD's `fs_progress` value: "NAME: 12.35MB (4.50MB/s)"."""
    from lxd_daemon.util.sizes import format_rate

    return f"{name}: {format_rate(done)} ({format_rate(speed)}/s)"


class _Meter:
    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress
        self.total = 0
        self.start = time.monotonic()
        self.last = 0.0

    def add(self, n: int) -> None:
        self.total += n
        if self.progress is not None and time.monotonic() - self.last >= 1.0:
            self.report()

    def report(self) -> None:
        if self.progress is None:
            return
        self.last = now = time.monotonic()
        with contextlib.suppress(Exception):
            self.progress(self.total, self.total / max(now - self.start, 1e-3))


NETCAT = str(Path(__file__).with_name("netcat.py"))


def netcat_command(address: str, name: str) -> str:
    """The remote shell rsync runs (it splits on blanks and honours quotes; no shell involved):
    `lxd netcat`, started as its own file in isolated mode without site packages (`-I -S`: it
    needs only the standard library, and starts once per stream, so its start-up counts)."""
    argv = [sys.executable, "-I", "-S", NETCAT, "--", address, name or "-"]
    return " ".join(shlex.quote(a) for a in argv)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    pkg_parent = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_parent, env.get("PYTHONPATH", "")) if p)
    env.setdefault("LC_ALL", "C")
    return env


async def _reap(proc: asyncio.subprocess.Process) -> None:
    """Kill rsync and what it started (its remote shell: the session we made it lead), then reap it."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    with contextlib.suppress(Exception):
        await proc.wait()


async def _read_stderr(stream: asyncio.StreamReader | None) -> bytes:
    if stream is None:
        return b""
    kept = b""
    while True:
        chunk = await stream.read(65536)
        if not chunk:
            return kept
        kept = (kept + chunk)[-STDERR_KEEP:]


def _stderr_text(data: bytes) -> str:
    return data.decode(errors="replace").strip()


async def _cancel(*tasks: asyncio.Task) -> None:
    for t in tasks:
        if not t.done():
            t.cancel()
    for t in tasks:
        with contextlib.suppress(BaseException):
            await t


async def send(path: Path, channel: Channel, features: Features, *, progress: Progress | None = None,
               bwlimit: str = "", name: str = "", extra_args: list[str] | None = None) -> None:
    """Send the tree at `path` (its contents: `path/`) to the receiver at the channel's other end.
    Returns once rsync succeeded and both barriers passed; MigrationError otherwise."""
    path = Path(path)
    if not path.is_absolute() or ".." in path.parts:
        raise MigrationError(f"Rsync path {str(path)!r} must be absolute")
    if not path.is_dir():
        raise MigrationError(f"Rsync send failed: {path}: no such directory")
    loop = asyncio.get_running_loop()
    address = "@lxd/" + uuid.uuid4().hex
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    listener.setblocking(False)
    conn: socket.socket | None = None
    proc: asyncio.subprocess.Process | None = None
    try:
        listener.bind("\0" + address[1:])
        listener.listen(1)
        args = ["rsync", "-ar", "--devices", "--numeric-ids", "--partial", "--sparse"]
        if bwlimit:
            args += ["--bwlimit", bwlimit]
        args += features.args()
        args += list(extra_args or [])
        args += ["-e", netcat_command(address, name or str(path)), "--", str(path).rstrip("/") + "/", "localhost:/tmp/foo"]
        log.debug("rsync send: %s", args)
        proc = await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, env=_child_env(), start_new_session=True)
        stderr_task = asyncio.ensure_future(_read_stderr(proc.stderr))
        accept = asyncio.ensure_future(loop.sock_accept(listener))
        exited = asyncio.ensure_future(proc.wait())
        await asyncio.wait({accept, exited}, timeout=SPAWN_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        if not accept.done():
            await _cancel(accept)
            await _reap(proc)
            err = _stderr_text(await stderr_task)
            await _cancel(exited)
            raise MigrationError(f"Rsync send failed: {path}: rsync did not start its transport"
                                 + (f" ({err})" if err else ""))
        conn, _ = accept.result()
        conn.setblocking(False)
        listener.close()
        meter = _Meter(progress)

        async def up() -> None:  # rsync -> peer, then our barrier
            while True:
                data = await loop.sock_recv(conn, CHUNK)
                if not data:
                    break
                await channel.send(data)
                meter.add(len(data))
            await channel.send_barrier()

        async def down() -> None:  # peer -> rsync, until the peer's barrier
            while True:
                data = await channel.recv()
                if data is None:
                    break
                await loop.sock_sendall(conn, data)
            if channel.closed:
                raise MigrationError(f"Rsync send failed: {path}: the receiving side closed the connection")
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_WR)

        await _pump(proc, exited, stderr_task, up(), down(), what=f"Rsync send failed: {path}",
                    channel=channel, peer="receiving")
        meter.report()  # the final count
    finally:
        listener.close()
        if conn is not None:
            conn.close()
        if proc is not None:
            await _reap(proc)


async def receive(path: Path, channel: Channel, features: Features, *, progress: Progress | None = None,
                  extra_args: list[str] | None = None) -> None:
    """Receive into `path` what the sender at the channel's other end sends, until its barrier.
    Returns once rsync succeeded; MigrationError otherwise."""
    path = Path(path)
    if not path.is_absolute() or ".." in path.parts:
        raise MigrationError(f"Rsync path {str(path)!r} must be absolute")
    flags = SERVER_FLAGS_NEGOTIATED if features.negotiate else SERVER_FLAGS
    args = ["rsync", "--server", flags, "--numeric-ids", "--devices", "--partial", "--sparse",
            "--modify-window=-1", *features.args(), *(extra_args or []), "--", ".", str(path)]
    log.debug("rsync receive: %s", args)
    proc = await asyncio.create_subprocess_exec(
        *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=_child_env(), start_new_session=True)
    try:
        stderr_task = asyncio.ensure_future(_read_stderr(proc.stderr))
        exited = asyncio.ensure_future(proc.wait())
        meter = _Meter(progress)
        assert proc.stdin is not None and proc.stdout is not None
        stdin, stdout = proc.stdin, proc.stdout

        async def down() -> None:  # peer -> rsync's stdin, until the peer's barrier
            try:
                while True:
                    data = await channel.recv()
                    if data is None:
                        break
                    meter.add(len(data))
                    stdin.write(data)
                    await stdin.drain()
            except (BrokenPipeError, ConnectionResetError):
                # rsync exited (its status tells why); keep reading to the barrier so the
                # channel stays usable, without feeding anything
                while await channel.recv() is not None:
                    pass
            if channel.closed:
                raise MigrationError(f"Rsync receive failed: {path}: the sending side closed the connection")
            stdin.close()

        async def up() -> None:  # rsync's stdout -> peer, then our barrier
            while True:
                data = await stdout.read(CHUNK)
                if not data:
                    break
                await channel.send(data)
            await channel.send_barrier()

        await _pump(proc, exited, stderr_task, up(), down(), what=f"Rsync receive failed: {path}",
                    channel=channel, peer="sending")
        meter.report()
    finally:
        await _reap(proc)


async def _pump(proc: asyncio.subprocess.Process, exited: asyncio.Future, stderr_task: asyncio.Future,
                up, down, *, what: str, channel: Channel, peer: str) -> None:
    """Run both directions and wait for rsync. A failing direction (the channel closed) kills
    rsync at once; rsync failing is reported with its stderr; once rsync exited, the peer has
    DRAIN_TIMEOUT seconds to end its stream."""
    tasks = [asyncio.ensure_future(up), asyncio.ensure_future(down)]
    error: BaseException | None = None
    try:
        pending: set[asyncio.Future] = set(tasks)
        deadline: float | None = None
        while pending:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            watch = pending | ({exited} if deadline is None else set())
            done, _ = await asyncio.wait(watch, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if not done:
                error = MigrationError(f"{what}: timed out waiting for the other side to end the stream")
                break
            pending -= done
            failed = [t for t in done if t is not exited and not t.cancelled() and t.exception() is not None]
            if failed:
                error = failed[0].exception()
                break
            if exited.done() and deadline is None:
                deadline = time.monotonic() + DRAIN_TIMEOUT
        if error is not None:
            await _reap(proc)
        status = await exited
        err = _stderr_text(await stderr_task)
    except BaseException:
        await _reap(proc)
        await _cancel(*tasks, stderr_task, exited)
        raise
    await _cancel(*tasks)
    if error is not None:
        if channel.closed:
            raise MigrationError(f"{what}: the {peer} side closed the connection")
        if isinstance(error, MigrationError):
            raise MigrationError(error.message + (f" ({err})" if err and status else ""))
        raise MigrationError(f"{what}: {error}")
    if status not in (0, 24):  # 24: files vanished while sending (a running container)
        raise MigrationError(f"{what}: rsync exited with status {status}" + (f" ({err})" if err else ""))
