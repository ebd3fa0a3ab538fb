"""Stateful stop/start, stateful snapshots (and their restore) and live migration of containers
through CRIU.

Whether CRIU works here is asked once (`criu check`, plus `criu check --feature mem_dirty_track`
for pre-copy) and cached with its reason; every stateful request calls `require()` first, so a
host where CRIU can't work answers a clear 400 before the container is touched.

The container's checkpoint and restore are liblxc's (`lxc-checkpoint`, which runs `criu` itself),
run by the runtime workers (runtime/lxcops.py `lxc_checkpoint`/`lxc_restore`) as lxc-start is:
this module builds their exact command lines and drives the rounds:

- stateful stop:   lxc-checkpoint -n NAME -P LXCPATH --rcfile=CONF -D STATE -v -s
- stateful snapshot: lxc-checkpoint -n NAME -P LXCPATH --rcfile=CONF -D STATE -v   (left running)
- pre-dump round:  lxc-checkpoint -n NAME -P LXCPATH --rcfile=CONF -D STATE/NNN -v -p [--predump-dir=../PREV]
- final dump:      lxc-checkpoint -n NAME -P LXCPATH --rcfile=CONF -D STATE/final -v -s [--predump-dir=../LAST]
- restore:         lxc-checkpoint -r -n NAME -P LXCPATH --rcfile=CONF -D DIR -v -d

(each with `-o LOGFILE -l INFO` when a log file is given). A pre-dump round's images carry CRIU's
`stats-dump`; its share of pages unchanged since the previous round decides, against
`migration.incremental.memory.goal`, whether another round is worth it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from lxd_daemon.errors import BadRequest

log = logging.getLogger("lxd.criu")

CRIU = "criu"
LXC_CHECKPOINT = "lxc-checkpoint"
CHECK_TIMEOUT = 30.0
DUMP_TIMEOUT = 600.0
RESTORE_TIMEOUT = 120.0
# The API extensions that only make sense when CRIU works (GET /1.0 advertises them then).
EXTENSIONS = ("migration_pre_copy",)

# CRIU's image magics (criu/include/magic.h): a service image starts with IMG_SERVICE then its own.
IMG_SERVICE_MAGIC = 0x55105940
STATS_MAGIC = 0x57093306

Runner = Callable[[list[str], float], Awaitable[tuple[int, str, str]]]


async def run(argv: list[str], timeout: float) -> tuple[int, str, str]:
    """Run argv; (returncode, stdout, stderr). A missing tool is rc 127; at `timeout` the tool is
    killed and TimeoutError raised."""
    try:
        proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE)
    except FileNotFoundError:
        return 127, "", f"{argv[0]}: not found"
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except (TimeoutError, asyncio.CancelledError):
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


@dataclass(frozen=True)
class Status:
    usable: bool
    reason: str = ""  # why not, when not usable
    version: str = ""
    predump: bool = False  # memory pre-copy (dirty page tracking) works


def _last_error(out: str) -> str:
    """CRIU's most telling line: the last `Error (file:line): message`, without its location."""
    lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("Error")]
    pick = (errors or lines or [""])[-1]
    if pick.startswith("Error (") and "): " in pick:
        pick = pick.split("): ", 1)[1]
    return pick


class Probe:
    """Whether CRIU works on this host, asked once and cached (with its reason)."""

    def __init__(self, runner: Runner = run):
        self.runner = runner
        self._status: Status | None = None
        self._lock = asyncio.Lock()

    def cached(self) -> Status | None:
        return self._status

    def forget(self) -> None:
        self._status = None

    async def status(self, *, refresh: bool = False) -> Status:
        async with self._lock:
            if self._status is None or refresh:
                self._status = await self._probe()
                log.info("criu", extra={"usable": self._status.usable, "reason": self._status.reason})
            return self._status

    async def _probe(self) -> Status:
        try:
            rc, out, err = await self.runner([CRIU, "--version"], CHECK_TIMEOUT)
        except TimeoutError:
            return Status(False, "`criu --version` timed out")
        if rc == 127:
            return Status(False, "the criu tool is not installed")
        version = ""
        for line in out.splitlines():
            if line.startswith("Version:"):
                version = line.split(":", 1)[1].strip()
        try:
            rc, out, err = await self.runner([CRIU, "check"], CHECK_TIMEOUT)
        except TimeoutError:
            return Status(False, "`criu check` timed out", version)
        if rc != 0:
            return Status(False, f"`criu check` failed: {_last_error(err + out) or f'exit status {rc}'}", version)
        try:
            rc, _, _ = await self.runner([CRIU, "check", "--feature", "mem_dirty_track"], CHECK_TIMEOUT)
        except TimeoutError:
            rc = 1
        return Status(True, "", version, predump=rc == 0)

    async def require(self, what: str) -> Status:
        """The status when CRIU works; else BadRequest naming `what` and CRIU's reason."""
        st = await self.status()
        if not st.usable:
            raise BadRequest(f"{what} needs CRIU, which doesn't work on this server: {st.reason}")
        return st


PROBE = Probe()


async def status(*, refresh: bool = False) -> Status:
    return await PROBE.status(refresh=refresh)


async def require(what: str) -> Status:
    return await PROBE.require(what)


async def startup(services, *, delay: float = 5.0) -> None:
    """A startup hook: probe CRIU once the daemon has settled (off the start-up path; the first
    stateful request then finds the answer cached) and advertise the pre-copy extension when
    CRIU works and can pre-dump."""
    await asyncio.sleep(delay)
    st = await PROBE.status()
    if st.usable and st.predump:
        services.server.advertise(*EXTENSIONS)
    from lxd_daemon.warnings import CRIU_UNUSABLE, raise_warning, resolve_warning

    if st.usable:  # a low-severity warning while it doesn't: stateful stop/snapshot/live migration
        await resolve_warning(services, CRIU_UNUSABLE)
    else:
        await raise_warning(services, CRIU_UNUSABLE,
                            f"CRIU doesn't work here (stateful features unavailable): {st.reason}")


# -- command lines ---------------------------------------------------------------------------
def _common(name: str, lxcpath: str, conf: str, directory: str, logfile: str | None) -> list[str]:
    argv = ["-n", name, "-P", lxcpath, f"--rcfile={conf}", "-D", directory, "-v"]
    if logfile:
        argv += ["-o", logfile, "-l", "INFO"]
    return argv


def dump_argv(name: str, lxcpath: str, conf: str, directory: str, *, stop: bool = True,
              predump_dir: str | None = None, logfile: str | None = None) -> list[str]:
    """A full dump; `stop` ends the container (CRIU kills it) once its images are written."""
    argv = [LXC_CHECKPOINT, *_common(name, lxcpath, conf, directory, logfile)]
    if stop:
        argv.append("-s")
    if predump_dir:
        argv.append(f"--predump-dir={predump_dir}")
    return argv


def predump_argv(name: str, lxcpath: str, conf: str, directory: str, *, predump_dir: str | None = None,
                 logfile: str | None = None) -> list[str]:
    """A memory pre-dump: the container keeps running; `predump_dir` (relative to `directory`)
    is the previous round, whose unchanged pages aren't written again."""
    argv = [LXC_CHECKPOINT, *_common(name, lxcpath, conf, directory, logfile), "-p"]
    if predump_dir:
        argv.append(f"--predump-dir={predump_dir}")
    return argv


def restore_argv(name: str, lxcpath: str, conf: str, directory: str, *, logfile: str | None = None) -> list[str]:
    """Restore from the images in `directory`, daemonized (liblxc's monitor stays, as after lxc-start)."""
    return [LXC_CHECKPOINT, "-r", *_common(name, lxcpath, conf, directory, logfile), "-d"]


# -- pre-copy --------------------------------------------------------------------------------
def _is_true(v: str | None) -> bool:
    return (v or "").strip().lower() in ("true", "1", "yes", "on")


@dataclass(frozen=True)
class PreCopy:
    """migration.incremental.memory{,.iterations,.goal} of an instance's expanded config."""

    enabled: bool = False
    iterations: int = 10
    goal: int = 70  # percent of pages unchanged since the last round that ends the rounds

    @classmethod
    def from_config(cls, config: dict) -> PreCopy:
        def number(key: str, default: int, lo: int, hi: int) -> int:
            raw = config.get(key)
            if raw in (None, ""):
                return default
            try:
                n = int(raw)
            except ValueError:
                raise BadRequest(f"Invalid value for {key!r}: {raw!r} is not an integer") from None
            if not lo <= n <= hi:
                raise BadRequest(f"Invalid value for {key!r}: {n} is not within {lo}..{hi}")
            return n

        return cls(_is_true(config.get("migration.incremental.memory")),
                   number("migration.incremental.memory.iterations", 10, 1, 999),
                   number("migration.incremental.memory.goal", 70, 1, 100))


@dataclass(frozen=True)
class DumpStats:
    pages_written: int = 0
    pages_skipped_parent: int = 0

    @property
    def unchanged_percent(self) -> float:
        total = self.pages_written + self.pages_skipped_parent
        return 100.0 * self.pages_skipped_parent / total if total else 100.0


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        if i >= len(buf):
            raise ValueError("truncated varint")
        b = buf[i]
        i += 1
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            return n, i
        shift += 7


def _fields(buf: bytes):
    """(field number, wire type, value) of a protobuf message (varints and length-delimited)."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _varint(buf, i)
        elif wt == 2:
            ln, i = _varint(buf, i)
            v, i = buf[i:i + ln], i + ln
        elif wt == 1:
            v, i = buf[i:i + 8], i + 8
        elif wt == 5:
            v, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported wire type {wt}")
        yield num, wt, v


def parse_stats(data: bytes) -> DumpStats:
    """CRIU's `stats-dump` image: service magic, stats magic, then one u32-sized stats_entry whose
    `dump` (1) holds pages_skipped_parent (6) and pages_written (7)."""
    if len(data) < 12:
        raise ValueError("stats-dump is too short")
    m1, m2, size = struct.unpack_from("<III", data)
    if (m1, m2) != (IMG_SERVICE_MAGIC, STATS_MAGIC):
        raise ValueError("not a CRIU stats image")
    entry = data[12:12 + size]
    written = skipped = 0
    for num, wt, v in _fields(entry):
        if num == 1 and wt == 2:
            for n2, w2, v2 in _fields(v):
                if w2 == 0 and n2 == 6:
                    skipped = v2
                elif w2 == 0 and n2 == 7:
                    written = v2
    return DumpStats(written, skipped)


def read_stats(directory: Path) -> DumpStats | None:
    try:
        return parse_stats((directory / "stats-dump").read_bytes())
    except (OSError, ValueError) as e:
        log.warning("no usable criu stats", extra={"dir": str(directory), "err": str(e)})
        return None


# -- the container calls -----------------------------------------------------------------------
async def checkpoint(runtime, name: str, lxcpath: str, conf: str, directory: Path, *, stop: bool = True,
                     logfile: str | None = None) -> None:
    """A stateful stop's dump (or, stop=False, a dump that leaves it running) into `directory`."""
    await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
    await runtime.checkpoint(name, dump_argv(name, lxcpath, conf, str(directory), stop=stop, logfile=logfile),
                             DUMP_TIMEOUT)


async def restore(runtime, name: str, lxcpath: str, conf: str, directory: Path, *,
                  logfile: str | None = None) -> int:
    """Boot the container from its images in `directory`; returns its init pid."""
    if not await asyncio.to_thread((directory / "inventory.img").exists):
        raise BadRequest("The instance has no saved state to restore")
    return await runtime.restore(name, lxcpath, restore_argv(name, lxcpath, conf, str(directory), logfile=logfile),
                                 RESTORE_TIMEOUT)


RoundDone = Callable[[Path, bool], Awaitable[None]]


async def live_checkpoint(runtime, name: str, lxcpath: str, conf: str, state_dir: Path, precopy: PreCopy, *,
                          predump_supported: bool, after_round: RoundDone | None = None,
                          logfile: str | None = None) -> Path:
    """The source's side of a live migration: pre-dump rounds (when migration.incremental.memory
    is on and CRIU can), each handed to `after_round(dir, final_predump)` (the source sends it and
    a MigrationSync), until `goal` percent of the pages were unchanged or `iterations` rounds ran;
    then the final dump, which stops the container. Returns the final images' directory."""
    await asyncio.to_thread(state_dir.mkdir, parents=True, exist_ok=True)
    previous: str | None = None
    if precopy.enabled and predump_supported:
        for i in range(precopy.iterations):
            round_dir = state_dir / f"{i:03d}"
            await asyncio.to_thread(round_dir.mkdir, exist_ok=True)
            argv = predump_argv(name, lxcpath, conf, str(round_dir),
                                predump_dir=f"../{previous}" if previous else None, logfile=logfile)
            await runtime.checkpoint(name, argv, DUMP_TIMEOUT)
            previous = round_dir.name
            stats = await asyncio.to_thread(read_stats, round_dir)
            final = i == precopy.iterations - 1 or (
                i > 0 and stats is not None and stats.unchanged_percent >= precopy.goal)
            if after_round is not None:
                await after_round(round_dir, final)
            if final:
                break
    final_dir = state_dir / "final"
    await asyncio.to_thread(final_dir.mkdir, exist_ok=True)
    await runtime.checkpoint(name, dump_argv(name, lxcpath, conf, str(final_dir), stop=True,
                                             predump_dir=f"../{previous}" if previous else None, logfile=logfile),
                             DUMP_TIMEOUT)
    return final_dir


def remove_state(directory: Path) -> None:
    """Blocking: drop a state directory (call through asyncio.to_thread)."""
    if directory.is_symlink() or directory.is_file():
        directory.unlink()
    elif directory.exists():
        shutil.rmtree(directory)


def state_path(lxcpath: str, name: str) -> Path:
    """Where a stateful stop keeps the container's images (as LXD: the instance dir's `state`)."""
    return Path(lxcpath) / name / "state"



# -- stateful stop and start of an instance (the instances service's internals, under its lock) --
def _paths(svc, name: str) -> tuple[str, Path, str, str]:
    lxcpath = str(svc.lxcpath)
    return lxcpath, state_path(lxcpath, name), str(svc.logs_root / name / "lxc.conf"), \
        str(svc.logs_root / name / "lxc-checkpoint.log")


async def stateful_stop(svc, name: str) -> None:
    """`stop --stateful`: dump the running container into its state directory (CRIU stops it),
    then the usual stop bookkeeping; the record reads `stateful` until the next start. A failed
    dump leaves the container running and no state behind."""
    async with svc.lock(name):
        rec = svc.record(name)
        status, _ = svc.status_of(name)
        if status == "Stopped":
            raise BadRequest("The instance is already stopped")
        rt = svc.runtime.get(name)
        if rt is None:
            raise BadRequest("The instance isn't tracked by this daemon: it can't be checkpointed")
        lxcpath, state, conf, logfile = _paths(svc, name)
        await asyncio.to_thread(remove_state, state)
        rt.stopping = True
        try:
            await checkpoint(svc.liblxc, name, lxcpath, conf, state, stop=True, logfile=logfile)
            await asyncio.wait_for(rt.exited.wait(), 30)
        except BaseException:
            rt.stopping = False
            with contextlib.suppress(OSError):
                await asyncio.to_thread(remove_state, state)
            raise
        await svc.stopped(name)
        rec.stateful = True
        await svc.store.save(rec)


async def discard_state(svc, name: str) -> None:
    """A stateless start of a stateful-stopped instance: its saved state goes (as LXD)."""
    rec = svc.record(name)
    if not rec.stateful:
        return
    await asyncio.to_thread(remove_state, _paths(svc, name)[1])
    rec.stateful = False
    await svc.store.save(rec)


async def stateful_start(svc, name: str) -> None:
    """`start` of a stateful-stopped instance: the usual start (devices, config) with the boot
    replaced by a restore from the saved state, which is then dropped."""
    async with svc.lock(name):
        if not svc.record(name).stateful:
            raise BadRequest("The instance has no saved state to restore")
        await _start_from_state(svc, name)


async def _start_from_state(svc, name: str) -> None:
    """(Under the instance's lock, the record `stateful`.) Start it by restoring its state
    directory; on success the state is dropped, on failure the instance stays stopped and
    stateful, its state kept for another try (or `start --stateless`)."""
    rec = svc.record(name)
    state = _paths(svc, name)[1]
    await start_from(svc, name, state)
    rec.stateful = False
    await svc.store.save(rec)
    await asyncio.to_thread(remove_state, state)


async def start_from(svc, name: str, images: Path) -> None:
    """(Under the instance's lock.) The usual start (devices, config) with the boot replaced by a
    restore from CRIU's images in `images` (a stateful start's state, a live migration's final dump)."""
    svc.liblxc.arm_restore(name, str(images), _paths(svc, name)[3])
    try:
        await svc.start(name)
    finally:
        svc.liblxc.disarm_restore(name)


# -- stateful snapshots (the snapshots service calls these under the instance's lock) ----------
@contextlib.asynccontextmanager
async def snapshot_state(svc, name: str):
    """`snapshot --stateful`: dump the running container into its state directory without
    stopping it (CRIU leaves it running); the body takes the snapshot, whose volume then holds
    a copy of that directory; the instance's own copy goes afterwards, whatever happened (the
    snapshot keeps the only one, as LXD). A failed dump takes no snapshot."""
    await require("A stateful snapshot")
    if svc.status_of(name)[0] == "Stopped":
        raise BadRequest("Unable to create a stateful snapshot: the instance isn't running")
    if svc.record(name).stateful:  # (stopped, so unreachable; its saved state must not be lost)
        raise BadRequest("Unable to create a stateful snapshot: the instance holds a saved state")
    lxcpath, state, conf, logfile = _paths(svc, name)
    await asyncio.to_thread(remove_state, state)  # a crash's leftover
    try:
        await checkpoint(svc.liblxc, name, lxcpath, conf, state, stop=False, logfile=logfile)
        yield state
    finally:
        with contextlib.suppress(OSError):
            await asyncio.to_thread(remove_state, state)


def has_state(svc, name: str) -> bool:
    """Blocking: whether the instance's state directory holds a checkpoint."""
    return (_paths(svc, name)[1] / "inventory.img").exists()


async def restore_snapshot_state(svc, name: str) -> None:
    """`restore --stateful` (under the instance's lock, the instance stopped, a stateful
    snapshot's volume just swapped in, its state directory with it): the instance is now
    stateful-stopped with that state, and starts from it as a stateful start does."""
    rec = svc.record(name)
    if not await asyncio.to_thread(has_state, svc, name):  # (a record that says more than its volume)
        await drop_state(svc, name)
        await svc.store.save(rec)
        raise BadRequest("The snapshot's volume holds no saved state to restore: the instance was restored "
                         "without it and left stopped")
    rec.stateful = True
    await svc.store.save(rec)
    await _start_from_state(svc, name)


async def drop_state(svc, name: str) -> None:
    """(Under the instance's lock.) No saved state any more: a stateless restore replaced it (or
    brought a stateful snapshot's copy back, which a stateless restore doesn't use). The caller
    saves the record."""
    await asyncio.to_thread(remove_state, _paths(svc, name)[1])
    svc.record(name).stateful = False


__all__ = ["PROBE", "PreCopy", "Probe", "Status", "checkpoint", "discard_state", "drop_state", "dump_argv",
           "has_state", "live_checkpoint", "parse_stats", "predump_argv", "read_stats", "remove_state", "require",
           "restore", "restore_argv", "restore_snapshot_state", "snapshot_state", "start_from", "state_path",
           "stateful_start",
           "stateful_stop", "status", "startup"]
