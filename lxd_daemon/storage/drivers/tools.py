"""How storage drivers run host tools (cp, rm, btrfs, mkfs, losetup, zfs, zpool, lvm, ...).

Every tool invocation of every driver goes through `run()`, so the exact argv of each call can be
observed: tests of drivers whose tools or kernel support this machine lacks (lvm, zfs) replace
the runner with `use_runner()` and check the invocations and how the output is handled.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass

from lxd_daemon.errors import LXDError


@dataclass
class Result:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


class ToolError(LXDError):
    """A tool exited non-zero; the message names the tool and carries its stderr."""

    def __init__(self, result: Result):
        msg = result.stderr.strip() or result.stdout.strip() or f"exit status {result.returncode}"
        super().__init__(f"{result.argv[0]} failed: {msg}")
        self.result = result


Runner = Callable[[tuple[str, ...], bytes | None], Awaitable[Result]]


async def _communicate(proc, stdin: bytes | None = None, helper: asyncio.Future | None = None) -> tuple:
    """proc.communicate(stdin). If that is cancelled or fails, the tool is killed (it must not
    outlive the operation that ran it) and `helper` (a thread feeding or draining it) is awaited."""
    try:
        return await proc.communicate(stdin)
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            with contextlib.suppress(Exception):
                await proc.wait()
        if helper is not None:
            with contextlib.suppress(BaseException):
                await helper
        raise


async def _subprocess(argv: tuple[str, ...], stdin: bytes | None) -> Result:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await _communicate(proc, stdin)
    return Result(argv, proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace"))


_runner: Runner = _subprocess


async def run(*argv: str, input: bytes | None = None, check: bool = True) -> Result:
    """Run a tool to completion; its stdout and stderr as text. Non-zero exit raises ToolError
    unless `check` is false."""
    result = await _runner(tuple(argv), input)
    if check and result.returncode != 0:
        raise ToolError(result)
    return result


@contextlib.contextmanager
def use_runner(runner: Runner) -> Iterator[None]:
    """Replace how tools are run (tests of drivers whose tools can't run on this host)."""
    global _runner
    old, _runner = _runner, runner
    try:
        yield
    finally:
        _runner = old


Source = AsyncIterator[bytes]
Sink = Callable[[bytes], Awaitable[None]]


async def run_stream(*argv: str, source: Source | None = None, sink: Sink | None = None,
                     check: bool = True) -> Result:
    """Run a tool whose stdin and/or stdout are byte streams (zfs send/receive, btrfs send/receive):
    `source` feeds stdin chunk by chunk, `sink` receives stdout chunk by chunk (Result.stdout is
    then ""). With a replaced runner (tests) the source is gathered and handed to it as bytes and
    its stdout is passed to the sink, so stream commands are observed like every other."""
    if _runner is not _subprocess:
        data = b"".join([c async for c in source]) if source is not None else None
        result = await _runner(tuple(argv), data)
        if sink is not None:
            if result.stdout:
                await sink(result.stdout.encode(errors="surrogateescape"))
            result = Result(result.argv, result.returncode, "", result.stderr)
    else:
        result = await _stream_subprocess(tuple(argv), source, sink)
    if check and result.returncode != 0:
        raise ToolError(result)
    return result


async def run_to_fd(*argv: str, fd: int, check: bool = True) -> Result:
    """Run a tool whose stdout is the open descriptor `fd` (written at its current offset, with
    no copy through this process: a backup's `btrfs send` straight into the tarball). With a
    replaced runner (tests) its stdout is written to `fd` instead."""
    if _runner is not _subprocess:
        result = await _runner(tuple(argv), None)
        data = memoryview(result.stdout.encode(errors="surrogateescape"))
        while data:
            data = data[await asyncio.to_thread(os.write, fd, data):]
        result = Result(result.argv, result.returncode, "", result.stderr)
    else:
        proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL, stdout=fd,
                                                    stderr=asyncio.subprocess.PIPE)
        _, err = await _communicate(proc)
        result = Result(tuple(argv), proc.returncode or 0, "", err.decode(errors="replace"))
    if check and result.returncode != 0:
        raise ToolError(result)
    return result


PIPE_SIZE = 1 << 20


def _big_pipe() -> tuple[int, int]:
    """A pipe of PIPE_SIZE (fewer wake-ups between a tool and the thread feeding or draining it)."""
    r, w = os.pipe2(os.O_CLOEXEC)
    with contextlib.suppress(OSError):
        import fcntl

        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    return r, w


async def run_count(*argv: str, check: bool = True) -> tuple[Result, int]:
    """Run a tool only to learn how many bytes it writes to stdout (they are dropped in the
    kernel: spliced from its pipe into /dev/null, never copied into this process)."""
    if _runner is not _subprocess:
        result = await _runner(tuple(argv), None)
        n = len(result.stdout.encode(errors="surrogateescape"))
        result = Result(result.argv, result.returncode, "", result.stderr)
    else:
        r, w = _big_pipe()
        try:
            proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL, stdout=w,
                                                        stderr=asyncio.subprocess.PIPE)
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(w)

        def drain() -> int:
            total = 0
            null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
            try:
                while m := os.splice(r, null, PIPE_SIZE):
                    total += m
            finally:
                os.close(null)
                os.close(r)
            return total

        counting = asyncio.ensure_future(in_own_thread(drain))  # ends when the tool's stdout closes
        _, err = await _communicate(proc, helper=counting)
        n = await counting
        result = Result(tuple(argv), proc.returncode or 0, "", err.decode(errors="replace"))
    if check and result.returncode != 0:
        raise ToolError(result)
    return result, n


async def in_own_thread(fn: Callable, *args):
    """fn(*args) on a thread of its own: for work that waits on something else (an upload still
    arriving) and must not hold one of the default executor's few threads, which that something
    else may need. If the caller is cancelled the thread still runs to its end."""
    import threading

    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def settle(outcome: tuple) -> None:
        if not done.done():
            if outcome[1] is None:
                done.set_result(outcome[0])
            else:
                done.set_exception(outcome[1])

    def run() -> None:
        try:
            outcome = (fn(*args), None)
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine
            outcome = (None, e)
        with contextlib.suppress(RuntimeError):  # the loop is gone
            loop.call_soon_threadsafe(settle, outcome)

    threading.Thread(target=run, name="lxd-stream", daemon=True).start()
    return await done


async def run_fed(*argv: str, feed: Callable[[int], None], check: bool = True) -> Result:
    """Run a tool whose stdin is fed by `feed(fd)` (blocking, run in a thread: it writes into the
    pipe with big writes or sendfile, not through the event loop). feed's own error (a bad
    upload) wins over the tool's. With a replaced runner (tests) what feed writes is gathered
    and handed to it."""
    if _runner is not _subprocess:
        import tempfile

        def gather() -> bytes:
            with tempfile.TemporaryFile() as t:
                feed(t.fileno())
                t.seek(0)
                return t.read()

        result = await _runner(tuple(argv), await asyncio.to_thread(gather))
    else:
        r, w = _big_pipe()
        try:
            proc = await asyncio.create_subprocess_exec(*argv, stdin=r, stdout=asyncio.subprocess.PIPE,
                                                        stderr=asyncio.subprocess.PIPE)
        except BaseException:
            os.close(w)
            raise
        finally:
            os.close(r)

        def fill() -> None:
            try:
                feed(w)
            except BrokenPipeError:
                pass  # the tool exited early: its status and stderr say why
            finally:
                os.close(w)

        feeder = asyncio.ensure_future(in_own_thread(fill))
        out, err = await _communicate(proc, helper=feeder)
        await feeder  # its error (e.g. a truncated upload) says best what went wrong
        result = Result(tuple(argv), proc.returncode or 0, out.decode(errors="replace"),
                        err.decode(errors="replace"))
    if check and result.returncode != 0:
        raise ToolError(result)
    return result


async def _stream_subprocess(argv: tuple[str, ...], source: Source | None, sink: Sink | None) -> Result:
    pipe = asyncio.subprocess.PIPE
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=pipe if source is not None else asyncio.subprocess.DEVNULL,
        stdout=pipe, stderr=pipe)
    out: list[bytes] = []

    async def feed() -> None:
        assert proc.stdin is not None
        try:
            async for chunk in source:  # type: ignore[union-attr]
                proc.stdin.write(chunk)
                await proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the tool exited early: its status and stderr say why
        finally:
            proc.stdin.close()
            with contextlib.suppress(Exception):
                await proc.stdin.wait_closed()  # collects a broken pipe's error

    async def drain() -> None:
        assert proc.stdout is not None
        while chunk := await proc.stdout.read(1 << 20):
            if sink is not None:
                await sink(chunk)
            else:
                out.append(chunk)

    assert proc.stderr is not None
    # stdin is fed on the side: a tool that exits without reading all of it (an error, a
    # refusal) must not leave us writing into a closed pipe.
    feeder = asyncio.ensure_future(feed()) if source is not None else None
    try:
        results = await asyncio.gather(drain(), proc.stderr.read())
        await proc.wait()
    except BaseException:
        if proc.returncode is None:
            proc.kill()
        # Read what is left so the pipes reach EOF (a full, paused pipe would keep wait() waiting).
        with contextlib.suppress(Exception):
            await asyncio.wait_for(_discard(proc), 30)
        if feeder is not None:
            feeder.cancel()
            with contextlib.suppress(BaseException):
                await feeder
        raise
    if feeder is not None:
        if not feeder.done():
            feeder.cancel()
        try:
            await feeder
        except asyncio.CancelledError:
            if not feeder.cancelled():
                raise
    return Result(argv, proc.returncode or 0, b"".join(out).decode(errors="replace"),
                  results[1].decode(errors="replace"))


async def _discard(proc: asyncio.subprocess.Process) -> None:
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            while await stream.read(1 << 16):
                pass
    await proc.wait()
