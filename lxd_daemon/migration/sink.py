"""The sink side of a migration (docs/design/migration.md): `POST /1.0/instances
{"source": {"type": "migration", "mode": "pull"|"push", ...}}`.

Pull: a task operation that dials the source's operation (`source.operation`, its pinned
`source.certificate`, `source.secrets`). Push and relay: a websocket operation whose metadata
holds the `control` and `fs` secrets, which the source (push) or the client (relay) connects.

Everything the request asks for (profiles, pool, devices, config, project limits) is checked
before the operation starts, so a refusal comes before any data moves. The files arrive in a
temporary volume (`.migrate-<hex>-<key>`, which the start-up sweep removes after a crash) and
the instance is recorded only once the last stream arrived; then the source hears
MigrationControl{success}. A failure or a cancel undoes everything (one Revert) and the source
hears why. A refresh (`lxc copy --refresh` onto an existing instance) receives into its volume:
only the snapshots it lacks, then the changes (rsync --delete).

The files keep the source's on-disk ids (rsync --numeric-ids); the record's
`volatile.last_state.idmap` says so (the source's map from its header), and the first start
shifts them to this server's map, as for any instance whose map changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

from lxd_daemon.errors import BadRequest, NotFound
from lxd_daemon.migration import header as hdr
from lxd_daemon.migration import migrate_pb2 as pb
from lxd_daemon.migration.source import (
    CONTROL_TIMEOUT,
    LIVE_CHANNELS,
    Endpoints,
    MigrationError,
    Progress,
    Side,
    offer_predump,
    source_peer,
)
from lxd_daemon.projects.naming import query
from lxd_daemon.util.revert import Revert
from lxd_daemon.util.tasks import cancel_and_wait
from lxd_daemon.util.timefmt import rfc3339

log = logging.getLogger("lxd.migration")

BACKUP_YAML = "backup.yaml"


class MigrationSink(Side):
    """One instance being received. `plan` is InstanceService.prepare_create's plan for a new
    instance (its key reserved by the caller until the operation ends), None for a refresh."""

    role = "target"

    def __init__(self, services, body, project: str, *, plan: dict | None, requestor: dict | None = None):
        super().__init__(services)
        self.body = body
        self.source = dict(body.source or {})
        self.mode = self.source.get("mode") or "pull"
        self.project = project
        self.name = body.name
        self.key = services.instances.key(project, body.name)
        self.plan = plan
        self.refresh = plan is None
        self.requestor = requestor
        self.live = self.is_live(self.source)
        if self.live:
            self.ends = Endpoints(LIVE_CHANNELS)

    @staticmethod
    def is_live(source: dict) -> bool:
        """A live migration (the source's memory comes too, over `criu`): asked for (`live`), or
        in pull mode the source gave a `criu` secret (as LXD decides)."""
        secrets = source.get("secrets") or source.get("websockets") or {}
        return bool(source.get("live")) or ((source.get("mode") or "pull") == "pull" and isinstance(secrets, dict)
                                            and bool(secrets.get("criu")))

    @staticmethod
    def check_source(source: dict) -> None:
        """The request's source fields (before any operation)."""
        mode = source.get("mode") or "pull"
        if mode not in ("pull", "push"):
            raise BadRequest(f"Unknown migration mode {mode!r}")
        if not isinstance(source.get("certificate", ""), str):
            raise BadRequest("The migration source's certificate must be a PEM string")
        if mode == "pull":
            if not source.get("operation") or not isinstance(source["operation"], str):
                raise BadRequest("The migration source's operation URL is missing")
            secrets = source.get("secrets") or source.get("websockets") or {}
            if (not isinstance(secrets, dict) or not isinstance(secrets.get("control"), str)
                    or not isinstance(secrets.get("fs"), str) or not secrets["control"] or not secrets["fs"]):
                raise BadRequest("The migration source's control and fs secrets are missing")

    # -- operation callbacks -----------------------------------------------------------------
    def peer(self):
        return source_peer(self.source, self.mode)

    def subject(self) -> dict:
        return {"instance": self.key}

    async def cleanup(self) -> None:
        if self.plan is not None:
            self.services.instances.release(self.key)
            self.services.instances._idmap_claims.pop(self.key, None)

    async def finished(self) -> None:
        if self.refresh:
            self.services.events.lifecycle("instance-updated", f"/1.0/instances/{self.name}{query(self.project)}",
                                           requestor=self.requestor, project=self.project)
        else:
            self.services.events.lifecycle("instance-created", f"/1.0/instances/{self.name}{query(self.project)}",
                                           {"type": "container", "storage-pool": self.plan["pool"].name},
                                           requestor=self.requestor, project=self.project)

    # -- the exchange ------------------------------------------------------------------------
    async def exchange(self, op) -> None:
        if not self.refresh:
            return await self._exchange_locked(op)
        # A refresh changes an existing instance: nothing else may meanwhile (start, snapshot, ...).
        async with self.services.instances.lock(self.key):
            return await self._exchange_locked(op)

    async def _exchange_locked(self, op) -> None:
        ctl = self.ends.control
        offer = await ctl.recv_control(pb.MigrationHeader, timeout=CONTROL_TIMEOUT)
        live = offer.HasField("criu") and offer.criu == pb.CRIU_RSYNC
        if live and not self.live:
            raise MigrationError("The source offers a live migration, which this target wasn't asked for "
                                 "(no criu channel)")
        if self.live and not live:
            raise MigrationError("The source didn't offer the live migration this target was set up for")
        if offer.fs != pb.RSYNC and offer.fs not in (pb.BTRFS, pb.ZFS):
            raise MigrationError(f"Unsupported migration transfer type {offer.fs}")
        have: list[str] = []
        if self.refresh:
            if live:
                raise MigrationError("A refresh can't be a live migration")
            have = await self._prepare_refresh(offer)
        # btrfs send/receive when the target pool is btrfs too, for a new instance (a running
        # source sends a read-only snapshot); a live migration goes by rsync (its files' final
        # pass follows the dump)
        fs_types = (pb.RSYNC,)
        if not self.refresh and not live and "BTRFS" in self.plan["pool"].driver.info.migration_types:
            fs_types = (pb.RSYNC, pb.BTRFS)
        resp = hdr.answer(offer, fs_types=fs_types, refresh=self.refresh, have_snapshots=have,
                          compress=hdr.pool_compresses(self._pool()))
        if live:
            from lxd_daemon.migration import criu

            resp.predump = offer_predump(offer) and (await criu.status()).predump
        await ctl.send_control(resp)
        wanted = [s for s in offer.snapshots if s.name in set(resp.snapshotNames)]
        await self.receive_committed(ctl, lambda revert: self._receive_all(op, offer, resp, wanted, revert))

    def _pool(self):
        """The pool the instance lands in."""
        if self.refresh:
            svc = self.services.instances
            return svc._root_pool(svc.expanded(self.key)[1], self.key)
        return self.plan["pool"]

    async def _prepare_refresh(self, offer) -> list[str]:
        """A refresh: drop our snapshots the source no longer has (or has anew under the same
        name); the names of those we keep."""
        snaps = self.services.snapshots
        svc = self.services.instances
        if svc.status_of(self.key)[0] != "Stopped":
            raise MigrationError(f"Can't refresh instance {self.name!r} while it is running")
        offered = {s.name: s for s in offer.snapshots}
        keep = []
        for s in list(snaps.list(self.key)):
            o = offered.get(s.name)
            if o is not None and (not o.HasField("creation_date") or not o.creation_date
                                  or hdr._ts(s.created_at) == o.creation_date):
                keep.append(s.name)
            else:
                await snaps.delete_locked(self.key, s.name)
        return keep

    async def _receive_all(self, op, offer, resp, wanted: list, revert: Revert) -> None:
        if not self.live:
            return await self._receive_files(op, offer, resp, wanted, revert)
        from lxd_daemon.migration import live

        # The memory's images arrive over `criu` while the files arrive over `fs`; the instance,
        # once recorded, starts from the final dump (a failure undoes it all: the source restores
        # its own container then).
        async with live.state_dir(self.services) as state:
            memory = asyncio.ensure_future(live.receive_state(self.ends.criu, state, self.rsync_features(offer, resp),
                                                              predump=offer_predump(resp)))
            try:
                await self._receive_files(op, offer, resp, wanted, revert)
                await memory
            finally:
                await cancel_and_wait(memory)
            await live.restore_received(self.services, self.key, state)

    async def _receive_files(self, op, offer, resp, wanted: list, revert: Revert) -> None:
        fs = self.ends.fs
        info = await self.receive_index(resp, self.refresh)
        feats = self.rsync_features(offer, resp)
        services = self.services
        volumes = services.storage.volumes
        native = resp.fs == pb.BTRFS
        pool = self._pool()
        if self.refresh:
            vol = volumes.instance_volume(pool, self.name, self.project)
        else:
            vol = volumes.instance_volume(pool, f".migrate-{uuid.uuid4().hex[:8]}-{self.key}")
            await volumes._clear_leftover(pool, vol)
            revert.add(volumes._clear_leftover, pool, vol)
            if not native:
                await pool.driver.create_volume(vol)
        drv = pool.driver
        progress = Progress(op, self.name)
        if native:
            from lxd_daemon.migration import streams

            log.info("migration: receiving by btrfs receive", extra={"instance": self.key})

            def named(label: str):  # "<temporary name>/snap" -> "NAME/snap"
                return progress.stream(self.name + label[len(vol.name):] if label.startswith(vol.name) else label)

            await streams.receive_btrfs_volume(drv, vol, [s.name for s in wanted], fs,
                                               streams.features_of(resp.btrfsFeatures), progress=named)
        else:
            await self._receive_rsync(offer, wanted, fs, feats, drv, vol, progress, revert)
        progress.finish(fs.bytes_received)  # what came over `fs`: the whole transfer's size
        snap_info = {str(s.get("name")): s for s in ((info.get("config") or {}).get("snapshots") or [])
                     if isinstance(s, dict)}
        records = [self._snapshot_record(s, snap_info.get(s.name) or {}) for s in wanted]
        disk_map = hdr.idmap_from_pb(offer.idmap)
        if self.refresh:
            await self._commit_refresh(records, disk_map, revert)
        else:
            await self._commit_new(pool, vol, records, disk_map, info, revert)

    async def _receive_rsync(self, offer, wanted: list, fs, feats, drv, vol, progress, revert: Revert) -> None:
        """Each snapshot synced into the volume and snapshotted there, oldest first, then the
        volume (twice when the source runs: the final sync follows)."""
        from lxd_daemon.migration import rsync

        path = await drv.mount_volume(vol)
        try:
            for s in wanted:
                await rsync.receive(path, fs, feats, progress=progress.stream(s.name))
                snap = vol.snapshot(s.name)
                if await drv.has_volume(snap):
                    await drv.delete_snapshot(snap)
                await drv.create_snapshot(snap)
                revert.add(drv.delete_snapshot, snap)
            await rsync.receive(path, fs, feats, progress=progress.stream(self.name))
            if offer.HasField("criu"):
                # The source runs (stateless, or live until its dump): the final sync of its volume follows.
                await rsync.receive(path, fs, feats, progress=progress.stream(self.name))
        finally:
            await drv.unmount_volume(vol)

    def _snapshot_record(self, s, extra: dict):
        from lxd_daemon.backups.service import _time, parse_expiry_quiet
        from lxd_daemon.instances.snapshots import Snapshot

        f = hdr.snapshot_from_pb(s)
        arch = f["architecture"] or (self.plan or {}).get("architecture") or ""
        # The index header's times when it came (RFC 3339, as the source stores them), else the header's.
        created = _time(extra.get("created_at")) or f["created_at"] or rfc3339()
        expires = parse_expiry_quiet(extra["expires_at"]) if "expires_at" in extra else f["expires_at"]
        return Snapshot(0, 0, f["name"], created, expires,
                        str(extra.get("description") or ""), False, arch, f["ephemeral"], f["config"],
                        f["devices"], f["profiles"])

    async def _commit_new(self, pool, tmp, records: list, disk_map, info: dict, revert: Revert) -> None:
        from lxd_daemon.devices.nic.common import volatile_defaults
        from lxd_daemon.instances.models import Record

        services = self.services
        svc = services.instances
        volumes = services.storage.volumes
        drv = pool.driver
        plan = self.plan
        key, name, project = self.key, self.name, self.project
        # The source's backup.yaml goes: ours is written once the record is committed.
        tpath = await drv.mount_volume(tmp)
        try:
            await asyncio.to_thread(_unlink, tpath / BACKUP_YAML)
        finally:
            await drv.unmount_volume(tmp)
        await volumes._clear_leftover(pool, volumes.instance_volume(pool, name, project))  # a crash's, unrecorded
        await drv.rename_volume(tmp, key)
        revert.add(volumes.delete_instance_volume, pool, project, name, background=False)
        config = {k: v for k, v in plan["config"].items()
                  if k not in ("volatile.idmap.current", "volatile.last_state.power", "volatile.apply_template")}
        desired = svc._desired_idmap(key, plan["expanded_config"])
        config["volatile.idmap.base"] = "0" if desired.empty else str(desired.root_ids()[0])
        config["volatile.idmap.next"] = desired.to_json()
        config["volatile.last_state.idmap"] = disk_map.to_json()
        config.setdefault("volatile.uuid", str(uuid.uuid4()))
        config.update(volatile_defaults(plan.get("expanded_devices") or {}, config))
        inst = (info.get("config") or {}).get("container") or {}
        created = str(inst.get("created_at") or "") or rfc3339()
        rec = Record(0, name, plan["architecture"], plan["ephemeral"], False,
                     plan["description"] or str(inst.get("description") or ""), created, "",
                     config, plan["devices"], plan["profiles"], project=project)
        snapsvc = services.snapshots
        added: list = []

        def extra(session, iid: int) -> None:
            if records:
                added.extend(snapsvc.insert_rows_sql(session, iid, records))

        await svc.adopt_record(rec, pool, extra)
        revert.add(svc.forget_record, key)
        snapsvc.adopt(added)
        await svc._write_backup_yaml(key)

    async def _commit_refresh(self, records: list, disk_map, revert: Revert) -> None:
        services = self.services
        svc = services.instances
        snapsvc = services.snapshots
        rec = svc.record(self.key)
        if records:
            def ins(session):
                return snapsvc.insert_rows_sql(session, rec.id, records)

            snapsvc.adopt(await services.db.run(ins))
        await svc._set_volatile(self.key, {"volatile.last_state.idmap": disk_map.to_json()})
        await svc._write_backup_yaml(self.key)


def _unlink(p) -> None:
    with contextlib.suppress(FileNotFoundError):
        p.unlink()


async def prepare(services, body, project: str) -> dict | None:
    """Check a migration create before its operation: the plan of a new instance (its key
    reserved: the sink releases it), or None for a refresh of an existing one."""
    svc = services.instances
    src = dict(body.source or {})
    MigrationSink.check_source(src)
    if MigrationSink.is_live(src):
        from lxd_daemon.migration import criu

        await criu.require("Live migration")  # a clear 400 when CRIU is unusable here
        if src.get("refresh"):
            raise BadRequest("A refresh can't be a live migration (copy with --stateless)")
    key = svc.key(project, body.name)
    if src.get("refresh") and key in svc.records:
        if svc.status_of(key)[0] != "Stopped":
            raise BadRequest(f"Can't refresh instance {body.name!r} while it is running")
        return None
    if services.storage is None:
        raise NotFound("No storage pool to receive the instance")
    svc.reserve(key)
    try:
        # Everything as for a new empty instance: profiles, pool, devices, config, limits.
        plain = body.model_copy(update={"source": {}})
        plan = await svc.prepare_create(plain, project)
    except BaseException:
        svc.release(key)
        svc._idmap_claims.pop(key, None)
        raise
    plan["stype"] = "migration"
    return plan
