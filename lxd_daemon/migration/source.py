"""The source side of a migration (docs/design/migration.md): `POST /1.0/instances/NAME
{"migration": true, ...}` (or `.../snapshots/SNAP`).

Pull and relay: a websocket operation whose metadata holds the `control` and `fs` secrets; the
sink (pull) or the client (relay) connects both. Push (`target` given): a task operation that
dials the sink's operation. Then the exchange, the same in every mode: our MigrationHeader offer,
the sink's answer, the index header (version 1: the instance's backup.yaml-like config), every
snapshot oldest first then the volume (rsync, each stream ended by a barrier), and the sink's
final MigrationControl, which is the operation's result. Any failure is sent to the peer as a
MigrationControl{success: false} and fails the operation; nothing on the source changes (a live
migration's container, which its final dump stopped, is restored from that dump: live.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from lxd_daemon.errors import BadRequest, LXDError
from lxd_daemon.migration import header as hdr
from lxd_daemon.migration import migrate_pb2 as pb
from lxd_daemon.migration.criu import PreCopy
from lxd_daemon.migration.wire import Channel, MigrationError, accepted, dial
from lxd_daemon.util.revert import Revert
from lxd_daemon.util.tasks import cancel_and_wait, to_the_end

log = logging.getLogger("lxd.migration")

CHANNELS = ("control", "fs")
LIVE_CHANNELS = (*CHANNELS, "criu")  # a live migration's: CRIU's images travel over `criu`
CONNECT_TIMEOUT = 30.0  # for the peer (or the relaying client) to connect every websocket
CONTROL_TIMEOUT = 60.0  # for each control message of the exchange
FINAL_TIMEOUT = 300.0  # for the sink's verdict after the last stream (it commits then)
FOREVER = 7 * 86400.0


class Endpoints:
    """The websockets of one migration, accepted (an operation's on_connect) or dialed."""

    def __init__(self, names: tuple[str, ...] = CHANNELS) -> None:
        self.names = names
        self.channels: dict[str, Channel] = {}
        self.connected = asyncio.Event()
        self.finished = asyncio.Event()

    def secrets(self, op) -> dict[str, str]:
        return {name: op.new_secret(name) for name in self.names}

    async def on_connect(self, op, name: str, websocket) -> None:
        """An operation's on_connect: keep the websocket until the migration is over."""
        if name in self.channels or self.finished.is_set():
            with contextlib.suppress(Exception):
                await websocket.close(code=1008)
            return
        ch = accepted(websocket, name)
        self.channels[name] = ch
        if all(n in self.channels for n in self.names):
            self.connected.set()
        waiter = asyncio.ensure_future(self.finished.wait())
        gone = asyncio.ensure_future(ch.wait_closed())
        try:
            await asyncio.wait({waiter, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            gone.cancel()
        await ch.close()

    async def wait_connected(self, timeout: float = CONNECT_TIMEOUT) -> None:
        try:
            await asyncio.wait_for(self.connected.wait(), timeout)
        except TimeoutError:
            raise MigrationError("Timed out waiting for the migration websockets to connect") from None

    async def dial(self, services, url: str, secrets: dict, certificate: str | None) -> None:
        missing = [n for n in self.names if not secrets.get(n)]
        if missing:
            raise MigrationError(f"The migration's {', '.join(missing)} secret is missing")
        cert, key = services.lxd_dir / "server.crt", services.lxd_dir / "server.key"
        for name in self.names:
            self.channels[name] = await dial(url, secrets[name], certificate or None, cert=cert, key=key,
                                             name=name)
        self.connected.set()

    @property
    def control(self) -> Channel:
        return self.channels["control"]

    @property
    def fs(self) -> Channel:
        return self.channels["fs"]

    @property
    def criu(self) -> Channel:
        return self.channels["criu"]

    async def notify(self, message: str) -> None:
        """Tell the peer the migration failed (best effort)."""
        ch = self.channels.get("control")
        if ch is not None and not ch.closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ch.send_control(pb.MigrationControl(success=False, message=message)), 5)

    async def fail(self, message: str) -> None:
        """Tell the peer (best effort) and close."""
        await self.notify(message)
        await self.close()

    async def close(self) -> None:
        self.finished.set()
        for ch in list(self.channels.values()):
            with contextlib.suppress(Exception):
                await ch.close()


def message_of(e: BaseException) -> str:
    if isinstance(e, MigrationError | LXDError):
        return e.message
    return str(e) or e.__class__.__name__


class Progress:
    """`fs_progress` in the operation's metadata ("NAME: 12.35MB (4.50MB/s)", as LXD shows it),
    for one migration: `stream(label)` gives the callback of one rsync stream (rsync.py calls it
    with the stream's bytes so far and its rate); `finish()` publishes the total of every stream
    (what the whole transfer moved)."""

    def __init__(self, op, name: str):
        self.op = op
        self.name = name
        self.start = time.monotonic()
        self.done_before = 0  # bytes of the finished streams
        self.current = 0

    def stream(self, label: str):
        self.done_before += self.current
        self.current = 0

        def update(done, speed=0.0, *_rest) -> None:
            from lxd_daemon.migration.rsync import progress_text

            self.current = int(done)
            if self.op is not None:
                self.op.update_metadata({"fs_progress": progress_text(label, int(done), float(speed))})

        return update

    @property
    def total(self) -> int:
        return self.done_before + self.current

    def finish(self, total: int | None = None) -> None:
        from lxd_daemon.migration.rsync import progress_text

        n = self.total if total is None else total
        rate = n / max(time.monotonic() - self.start, 1e-3)
        if self.op is not None:
            self.op.update_metadata({"fs_progress": progress_text(self.name, n, rate)})


async def watch_control(channel: Channel) -> pb.MigrationControl:
    return await channel.recv_control(pb.MigrationControl, timeout=FOREVER)


async def while_watching(control_task: asyncio.Task, work, *, done_on_success: bool = False) -> None:
    """Run `work` (a coroutine) unless the peer's MigrationControl arrives first: a failure it
    reports ends the work and is raised. A success ends it too when `done_on_success` (a
    source: the sink says so only once it has everything, so what is left of the work is
    waiting for our rsync to exit, which polls its remote shell's exit every 20 ms)."""
    task = asyncio.ensure_future(work)
    try:
        await asyncio.wait({task, control_task}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()
            return
        ctl = control_task.result() if not control_task.cancelled() else None
        if ctl is not None and not ctl.success:
            raise MigrationError(ctl.message or "The peer reported a failure")
        if ctl is not None and done_on_success:
            return  # (the finally below stops the work)
        await task  # a success before the end: finish the stream anyway
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        # A broken control channel surfaces as this task's error: look at it so asyncio doesn't warn.
        if control_task.done() and not control_task.cancelled():
            control_task.exception()


class Side:
    """What every migration end shares (an instance's or a custom volume's source or sink): its
    channels, connecting them (dialing the peer's operation, or waiting for the peer or the
    relaying client to connect), and ending the exchange: a failure or cancel goes to the peer as
    a MigrationControl and fails the operation. Subclasses give `exchange()`, and may give
    `peer()`, `cleanup()` (always, after the exchange) and `finished()` (after success)."""

    role = "source"  # "source" or "target", as messages name the side
    what = "migration"  # for the log

    def __init__(self, services) -> None:
        self.services = services
        self.ends = Endpoints()

    def peer(self) -> tuple[str, dict, str | None] | None:
        """The peer operation to dial (URL, secrets, certificate), or None to wait for it."""
        return None

    def subject(self) -> dict:
        return {}

    async def exchange(self, op) -> None:
        raise NotImplementedError

    async def cleanup(self) -> None:
        pass

    async def finished(self) -> None:
        pass

    async def receive_index(self, resp, refresh: bool) -> dict:
        """A sink's half of the index header (when the answer `resp` agreed on version 1): the
        source's config frame, answered; {} before version 1."""
        if not (resp.HasField("indexHeaderVersion") and resp.indexHeaderVersion >= 1):
            return {}
        got = await self.ends.fs.recv_json(timeout=CONTROL_TIMEOUT)
        await self.ends.fs.send_json(hdr.index_response(refresh))
        return got if isinstance(got, dict) else {}

    @staticmethod
    def rsync_features(offer, resp):
        """The receiver's rsync features: those the answer agreed, and whether the sender negotiates."""
        from lxd_daemon.migration import rsync

        return rsync.Features(**hdr.agreed_features(resp), negotiate=hdr.negotiates(offer))

    async def receive_committed(self, ctl: Channel, receive) -> None:
        """A sink's transfer: `receive(revert)` (a coroutine function) takes the streams and
        registers how to undo what it made; unless the source's MigrationControl reports a failure
        meanwhile, our success goes to the source and everything is kept; otherwise, or on any
        error or cancel, everything is undone (to the end, even if cancelled again)."""
        watcher = asyncio.ensure_future(watch_control(ctl))
        revert = Revert()
        try:
            try:
                await while_watching(watcher, receive(revert))
                if watcher.done():  # the source gave up meanwhile
                    got = watcher.result()
                    raise MigrationError(got.message or "The source reported a failure")
                await ctl.send_control(pb.MigrationControl(success=True))
                revert.success()
            except BaseException:
                await to_the_end(revert.fail())
                raise
        finally:
            await cancel_and_wait(watcher)

    async def send_watched(self, ctl: Channel, work) -> None:
        """A source's transfer: `work` (a coroutine) sends the streams unless the sink's
        MigrationControl arrives first (a failure ends it, and so does a success: the sink has
        everything then); then the sink's verdict, which fails the migration unless a success."""
        watcher = asyncio.ensure_future(watch_control(ctl))
        try:
            await while_watching(watcher, work, done_on_success=True)
            try:
                verdict = await asyncio.wait_for(asyncio.shield(watcher), FINAL_TIMEOUT)
            except TimeoutError:
                raise MigrationError("Timed out waiting for the sink to finish the migration") from None
        finally:
            await cancel_and_wait(watcher)
        if not verdict.success:
            raise MigrationError(verdict.message or "The sink reported a failure")

    async def on_connect(self, op, name: str, websocket) -> None:
        await self.ends.on_connect(op, name, websocket)

    async def on_cancel(self, op) -> None:
        if self.role == "source":
            await self.ends.fail("Migration cancelled on the source")
        else:
            # The peer hears it now; the operation's task is cancelled next, which undoes what
            # was received (the channels stay open until then: closing them first would fail
            # the transfer, whose undo the cancellation would then cut short).
            await self.ends.notify("Migration cancelled on the target")

    async def run(self, op) -> None:
        try:
            peer = self.peer()
            if peer is not None:
                await self.ends.dial(self.services, *peer)
            else:
                await self.ends.wait_connected()
            await self.exchange(op)
        except asyncio.CancelledError:
            await self.ends.fail(f"Migration cancelled on the {self.role}")
            raise
        except BaseException as e:
            msg = message_of(e)
            log.warning(f"{self.what} failed on the {self.role}", extra={**self.subject(), "err": msg})
            await self.ends.fail(msg)
            if isinstance(e, LXDError):
                raise
            raise LXDError(msg) from None
        finally:
            await self.cleanup()
        await self.ends.close()
        await self.finished()


def offer_predump(header) -> bool:
    """Whether a header asks for (or agrees to) CRIU pre-dump rounds."""
    return header.HasField("predump") and header.predump


def check_target(target: dict | None, channels: tuple[str, ...] = CHANNELS) -> None:
    """A push target (`target`) is complete: the sink's operation URL, its secrets (one per
    channel), its certificate."""
    if target is None:
        return
    if not isinstance(target, dict) or not target.get("operation") or not isinstance(target["operation"], str):
        raise BadRequest("The migration target's operation URL is missing")
    secrets = target.get("secrets") or {}
    if not isinstance(secrets, dict) or not all(isinstance(secrets.get(n), str) and secrets[n] for n in CHANNELS):
        raise BadRequest("The migration target's control and fs secrets are missing")
    if "criu" in channels and not (isinstance(secrets.get("criu"), str) and secrets["criu"]):
        raise BadRequest("The migration target has no criu secret: it isn't set up for a live migration "
                         "(copy or move the running container with --stateless)")
    if not isinstance(target.get("certificate", ""), str):
        raise BadRequest("The migration target's certificate must be a PEM string")


def target_peer(target: dict | None) -> tuple[str, dict, str | None] | None:
    """A source's push target (`target`: the sink's operation, secrets and certificate)."""
    if target is None:
        return None
    return target["operation"], target.get("secrets") or {}, target.get("certificate")


def source_peer(source: dict, mode: str) -> tuple[str, dict, str | None] | None:
    """A sink's pull source (`source.operation`, `secrets` (or LXD's older `websockets`),
    `certificate`); push and relay wait instead."""
    if mode != "pull":
        return None
    return (source["operation"], source.get("secrets") or source.get("websockets") or {},
            source.get("certificate"))


class MigrationSource(Side):
    """One instance (or snapshot) being sent."""

    def __init__(self, services, key: str, *, snapshot: str | None = None, live: bool = False,
                 instance_only: bool = False, target: dict | None = None, requestor: dict | None = None):
        super().__init__(services)
        self.key = key
        self.snapshot = snapshot
        self.live = live
        self.instance_only = instance_only or snapshot is not None
        self.target = target
        self.requestor = requestor
        self.criu = None  # CRIU's status, for a live migration

    # -- checks before the operation ---------------------------------------------------------
    async def check(self) -> None:
        """Refusals before the operation: an unknown snapshot, a live migration this server
        can't make, a push target without its operation."""
        svc = self.services.instances
        svc.record(self.key)
        if self.snapshot is not None:
            self.services.snapshots.get(self.key, self.snapshot)  # 404 first
            self.live = False
        if self.live:
            if svc.status_of(self.key)[0] == "Running":
                from lxd_daemon.migration import criu

                self.criu = await criu.require("Live migration")  # a clear 400 when CRIU is unusable
                self.ends = Endpoints(LIVE_CHANNELS)
            else:
                self.live = False  # a stopped instance has no state to carry
        check_target(self.target, self.ends.names)

    def peer(self):
        return target_peer(self.target)

    def subject(self) -> dict:
        return {"instance": self.key}

    # -- the exchange --------------------------------------------------------------------------
    async def exchange(self, op) -> None:
        from lxd_daemon.instances.idmap import IdmapSet

        services = self.services
        svc = services.instances
        rec = svc.record(self.key)
        status = svc.status_of(self.key)[0]
        snaps = [] if self.instance_only else list(services.snapshots.list(self.key))
        if self.snapshot is not None:
            src_snap = services.snapshots.get(self.key, self.snapshot)
            disk_map = IdmapSet.from_json(src_snap.config.get("volatile.last_state.idmap"))
        else:
            src_snap = None
            disk_map = IdmapSet.from_json(rec.config.get("volatile.last_state.idmap"))
        pool = svc._root_pool(svc.expanded(self.key)[1], self.key)
        # btrfs send/receive when both pools are btrfs, from a read-only snapshot of the volume
        # (running or not). Not for a live migration: its files must be sent again once the dump
        # stopped the container, which only rsync does.
        native = self.snapshot is None and not self.live and "BTRFS" in pool.driver.info.migration_types
        offer = hdr.offer(fs=pb.BTRFS if native else pb.RSYNC, disk_idmap=disk_map, snapshots=snaps,
                          running=status != "Stopped" and self.snapshot is None, live=self.live,
                          compress=hdr.pool_compresses(pool))
        if native:
            offer.btrfsFeatures.CopyFrom(hdr.btrfs_features_pb())
        if self.live:  # pre-copy rounds: when the instance asks for them and CRIU can track dirty pages
            offer.predump = self.criu.predump and PreCopy.from_config(svc.expanded(self.key)[0]).enabled
        ctl = self.ends.control
        await ctl.send_control(offer)
        resp = await ctl.recv_control(pb.MigrationHeader, timeout=CONTROL_TIMEOUT)
        if resp.fs not in ((pb.RSYNC, pb.BTRFS) if native else (pb.RSYNC,)):
            raise MigrationError(f"The sink asked for a transfer type this source can't send ({resp.fs})")
        if self.live and not (resp.HasField("criu") and resp.criu == pb.CRIU_RSYNC):
            raise MigrationError("The target didn't agree to a live migration (CRIU over rsync)")
        features = hdr.agreed_features(resp)
        to_send = hdr.snapshots_to_send(offer, resp)
        state = None
        try:
            running = offer.HasField("criu") and self.snapshot is None
            if self.live:
                from lxd_daemon.migration import live

                state = await asyncio.to_thread(live.work_dir, services)
            await self.send_watched(ctl, self._send_all(op, rec, src_snap, to_send, resp, features, running, state))
        except BaseException:
            if state is not None:  # the container runs on here, from its dump if that had stopped it
                await to_the_end(live.rollback(services, self.key, state))
            raise
        finally:
            if state is not None:
                await to_the_end(asyncio.to_thread(live.remove, state))

    async def _send_all(self, op, rec, src_snap, to_send: list[str], resp, features: dict,
                        offer_running: bool = False, state=None) -> None:
        from lxd_daemon.backups.config import instance_backup_config
        from lxd_daemon.migration import rsync

        services = self.services
        svc = services.instances
        fs = self.ends.fs
        if resp.HasField("indexHeaderVersion") and resp.indexHeaderVersion >= 1:
            cfg = (await instance_backup_config(services, self.key)).to_dict()
            if src_snap is not None:  # a snapshot's copy: the snapshot is the instance
                cfg = _snapshot_as_instance(cfg, src_snap)
            else:
                cfg["snapshots"] = [s for s in cfg.get("snapshots") or [] if s.get("name") in set(to_send)]
                cfg["volume_snapshots"] = [s for s in cfg.get("volume_snapshots") or []
                                           if s.get("name") in set(to_send)]
            await fs.send_json(hdr.index_header(cfg))
            answer = await fs.recv_json(timeout=CONTROL_TIMEOUT)
            try:
                hdr.check_index_response(answer)
            except ValueError as e:
                raise MigrationError(str(e)) from None
        feats = rsync.Features(**features)
        pool = svc._root_pool(svc.expanded(self.key)[1], self.key)
        vol = services.storage.volumes.instance_volume(pool, rec.name, rec.project)
        drv = pool.driver
        bwlimit = (pool.config or {}).get("rsync.bwlimit", "")  # the pool's limit, as LXD
        progress = Progress(op, rec.name)
        if resp.fs == pb.BTRFS:
            from lxd_daemon.migration import streams

            log.info("migration: sending by btrfs send", extra={"instance": self.key})
            await streams.send_btrfs_volume(drv, vol, to_send, fs, streams.features_of(resp.btrfsFeatures),
                                            progress=progress.stream)
            progress.finish(fs.bytes_sent)
            return
        for s in to_send:
            svol = vol.snapshot(s)
            path = await drv.mount_volume(svol)
            try:
                await rsync.send(path, fs, feats, progress=progress.stream(s), bwlimit=bwlimit)
            finally:
                await drv.unmount_volume(svol)
        main = vol.snapshot(src_snap.name) if src_snap is not None else vol
        path = await drv.mount_volume(main)
        try:
            if offer_running:
                # A running container: a first pass while it runs, then the final sync, which the
                # sink expects (as LXD's): with the container frozen (stateless), or after the
                # live migration's final dump stopped it.
                await rsync.send(path, fs, feats, progress=progress.stream(rec.name), bwlimit=bwlimit)
            if state is not None:
                from lxd_daemon.migration import live

                await live.dump_and_send(services, self.key, state, self.ends.criu, feats,
                                         predump=offer_predump(resp), bwlimit=bwlimit)
            async with self._consistent(pool, src_snap is not None):
                await rsync.send(path, fs, feats, progress=progress.stream(rec.name), bwlimit=bwlimit)
        finally:
            await drv.unmount_volume(main)
        progress.finish(fs.bytes_sent)

    @contextlib.asynccontextmanager
    async def _consistent(self, pool, is_snapshot: bool):
        """A running container is frozen while its volume is sent (a stateless copy of a
        consistent tree, as a local copy does on drivers without atomic snapshots)."""
        svc = self.services.instances
        cg = None
        if not is_snapshot and svc.status_of(self.key)[0] == "Running":
            with contextlib.suppress(OSError, LXDError):
                cg = svc._cgroups(self.key)
                await svc._freeze_cg(self.key, cg, True)
        try:
            yield
        finally:
            if cg is not None:
                with contextlib.suppress(OSError, LXDError):
                    await svc._freeze_cg(self.key, cg, False)


def _snapshot_as_instance(cfg: dict, snap) -> dict:
    """The index header of a snapshot's copy: the snapshot's config, devices and profiles as
    the instance's, and no snapshots."""
    inst = dict(cfg.get("container") or {})
    inst["config"] = dict(snap.config)
    inst["devices"] = {k: dict(v) for k, v in snap.devices.items()}
    inst["profiles"] = list(snap.profiles)
    if snap.architecture:
        inst["architecture"] = snap.architecture
    out = dict(cfg)
    out["container"] = inst
    out.pop("snapshots", None)
    out.pop("volume_snapshots", None)
    return out
