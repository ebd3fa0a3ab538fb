"""Live migration of a running container: its memory, through CRIU, over the `criu` websocket,
as LXD 5.0.2 exchanges it (docs/design/migration.md, "Live migration").

The source, after the first pass of the container's files:
- when both sides agreed on pre-copy (`predump` in both headers, `migration.incremental.memory`
  on and CRIU able to track dirty pages), pre-dump rounds: each dumps the memory into
  STATE/NNN with the container running (`lxc-checkpoint -p`), rsyncs the whole STATE/ over
  `criu`, then sends MigrationSync{finalPreDump} there, true for the last round
  (`migration.incremental.memory.goal`/`.iterations` decide, migration/criu.py);
- the final dump into STATE/final, which stops the container, and STATE/ over `criu` once more;
- then the final pass of the files (the container is stopped now: they no longer change).

The sink receives STATE/ into a directory of its own while the files arrive, records the
instance when both are in, then starts it by restoring STATE/final; only then does the source
hear success. When the sink fails (its restore included), the source restores the container
from its own final dump, so it runs on where it was: its files were not touched meanwhile.
The state directories live under `$LXD_DIR/migration` and go when the migration ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
from pathlib import Path

from lxd_daemon.migration import criu
from lxd_daemon.migration import migrate_pb2 as pb
from lxd_daemon.migration.wire import Channel, MigrationError

log = logging.getLogger("lxd.migration")

SYNC_TIMEOUT = 60.0  # for the MigrationSync after each pre-dump round's images
STOP_TIMEOUT = 30.0  # for the container to be gone once the final dump stopped it


def work_dir(services) -> Path:
    """Blocking: a new directory for one migration's CRIU images, under `$LXD_DIR/migration`
    (not the instance's own directory: the files' final pass would carry it along)."""
    root = Path(services.lxd_dir) / "migration"
    root.mkdir(mode=0o700, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="criu-", dir=root))


def remove(path: Path | None) -> None:
    """Blocking: drop a state directory (whatever is left of it)."""
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


def sweep(services) -> None:
    """Blocking, at start-up: state directories a crash left behind."""
    remove(Path(services.lxd_dir) / "migration")


# -- the source ----------------------------------------------------------------------------------
async def dump_and_send(services, key: str, state: Path, channel: Channel, features, *, predump: bool,
                        bwlimit: str = "") -> None:
    """The source's part: pre-dump rounds (when `predump` was agreed), the final dump into
    `state`/final, which stops the container, each sent over `channel`; the stop's bookkeeping.
    A failure before the final dump finished leaves the container running; after it, the
    caller's `rollback` restores the container from `state`."""
    from lxd_daemon.migration import rsync

    svc = services.instances
    async with svc.lock(key):
        if svc.status_of(key)[0] == "Stopped":
            raise MigrationError("The instance stopped before its live migration's dump")
        rt = svc.runtime.get(key)
        if rt is None:
            raise MigrationError("The instance isn't tracked by this daemon: it can't be checkpointed")
        precopy = criu.PreCopy.from_config(svc.expanded(key)[0])
        lxcpath, _, conf, logfile = criu._paths(svc, key)

        async def after_round(round_dir: Path, final: bool) -> None:
            await rsync.send(state, channel, features, bwlimit=bwlimit, name=f"{key}: criu")
            await channel.send_control(pb.MigrationSync(finalPreDump=final))
            log.info("migration: pre-dump round sent", extra={"instance": key, "round": round_dir.name,
                                                               "final": final})

        rt.stopping = True
        try:
            await criu.live_checkpoint(svc.liblxc, key, lxcpath, conf, state, precopy,
                                       predump_supported=predump, after_round=after_round, logfile=logfile)
            await asyncio.wait_for(rt.exited.wait(), STOP_TIMEOUT)
        except BaseException:
            if not rt.exited.is_set():
                rt.stopping = False  # the final dump didn't stop it: it runs on
            raise
        await svc.stopped(key)
    await rsync.send(state, channel, features, bwlimit=bwlimit, name=f"{key}: criu")


async def rollback(services, key: str, state: Path) -> None:
    """The source's rollback after a failure: when the final dump had stopped the container, it
    starts again from that dump, where it was (its files are as the dump left them). A restore
    that fails too is logged and leaves it stopped (the dump goes with the state directory)."""
    svc = services.instances
    async with svc.lock(key):
        if svc.status_of(key)[0] != "Stopped" or not await asyncio.to_thread(
                (state / "final" / "inventory.img").exists):
            return
        try:
            await criu.start_from(svc, key, state / "final")
        except Exception as e:
            log.error("migration: the container could not be restored on the source after a failed live "
                      "migration; it is stopped", extra={"instance": key, "err": str(e)})
            return
    log.info("migration: the container was restored on the source", extra={"instance": key})


# -- the sink --------------------------------------------------------------------------------------
async def receive_state(channel: Channel, into: Path, features, *, predump: bool) -> None:
    """The sink's part of the transfer: the pre-dump rounds' images (each followed by its
    MigrationSync) when `predump` was agreed, then the final dump's, into `into`."""
    from lxd_daemon.migration import rsync

    if predump:
        while True:
            await rsync.receive(into, channel, features)
            sync = await channel.recv_control(pb.MigrationSync, timeout=SYNC_TIMEOUT)
            if sync.finalPreDump:
                break
    await rsync.receive(into, channel, features)


async def restore_received(services, key: str, state: Path) -> None:
    """Start the just-recorded instance `key` by restoring the received final dump."""
    svc = services.instances
    if not await asyncio.to_thread((state / "final" / "inventory.img").exists):
        raise MigrationError("The source's CRIU images arrived without a final dump (final/inventory.img)")
    async with svc.lock(key):
        await criu.start_from(svc, key, state / "final")
    log.info("migration: the container was restored on the target", extra={"instance": key})


@contextlib.asynccontextmanager
async def state_dir(services):
    """A state directory for one migration, removed at the end whatever happened."""
    path = await asyncio.to_thread(work_dir, services)
    try:
        yield path
    finally:
        await asyncio.to_thread(remove, path)


__all__ = ["dump_and_send", "receive_state", "remove", "restore_received", "rollback", "state_dir", "sweep",
           "work_dir"]
