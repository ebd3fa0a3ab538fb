"""Custom storage volumes between servers (`lxc storage volume copy/move A:pool/vol b:pool/vol`),
through the instance migration's machinery (docs/design/migration.md).

Source: `POST /1.0/storage-pools/P/volumes/custom/V {"migration": true, "volume_only": ...}`: a
websocket operation with `control` and `fs` secrets (pull, relay), or given `target` a task that
dials the sink's operation (push). Sink: `POST /1.0/storage-pools/P/volumes/custom {"source":
{"type": "migration", "mode": "pull"|"push", ...}}`.

The exchange, as LXD 5.0's (lxd/migrate_storage_volumes.go): the source's MigrationHeader (rsync,
its features, index header version 1, the volume's snapshots oldest first: no idmap, no instance
fields), the sink's answer (on a refresh only the snapshots it still needs, `refresh` set), the
index header over `fs` (`{"config": {"volume": ..., "volume_snapshots": [...]}}`, answered with
`{"StatusCode": 200, "Refresh": ...}`), one rsync stream per snapshot then the volume, and the
sink's MigrationControl.

The sink receives a new volume under custom.py's temporary name `.tmp-<hex>-<name>`, so a crash
before the record is committed leaves a leftover the start-up sweep removes; the record (with its
snapshots) is inserted and the volume renamed only once everything arrived. A refresh receives
into the existing volume under its lock: our snapshots the source no longer has go, the missing
ones are added, then the content is synced (rsync --delete).
"""

from __future__ import annotations

import logging

from lxd_daemon.errors import BadRequest, Conflict, NotFound
from lxd_daemon.migration import header as hdr
from lxd_daemon.migration import migrate_pb2 as pb
from lxd_daemon.migration.source import (
    CONTROL_TIMEOUT,
    MigrationError,
    Progress,
    Side,
    check_target,
    source_peer,
    target_peer,
)
from lxd_daemon.util.revert import Revert
from lxd_daemon.util.timefmt import ZERO_TIME, rfc3339

log = logging.getLogger("lxd.migration")


def _volume_dict(rec) -> dict:
    """A custom volume as LXD's api.StorageVolume (the index header's `volume`)."""
    return {"name": rec.name, "description": rec.description, "type": "custom", "config": dict(rec.config),
            "used_by": [], "location": "none", "content_type": rec.content_type, "project": rec.project,
            "created_at": rec.created_at or ZERO_TIME}


def _snapshot_dict(s, content_type: str) -> dict:
    """A volume snapshot as LXD's api.StorageVolumeSnapshot."""
    return {"name": s.name, "description": s.description, "config": dict(s.config), "content_type": content_type,
            "created_at": s.created_at or ZERO_TIME, "expires_at": s.expires_at or ZERO_TIME}


def snapshot_pb(s) -> pb.Snapshot:
    """A volume snapshot as the protobuf Snapshot (LXD fills only the name and config; the
    creation time is ours, so that a refresh between our daemons sees a snapshot taken anew)."""
    return pb.Snapshot(name=s.name, localConfig=[pb.Config(key=k, value=v) for k, v in sorted(s.config.items())],
                       profiles=[], ephemeral=False, localDevices=[], architecture=0, stateful=False,
                       creation_date=hdr._ts(s.created_at), last_used_date=0, expiry_date=0)


def volume_offer(snapshots: list, *, compress: bool = True) -> pb.MigrationHeader:
    return pb.MigrationHeader(fs=pb.RSYNC, rsyncFeatures=hdr.rsync_features_pb(compress=compress),
                              indexHeaderVersion=hdr.INDEX_HEADER_VERSION,
                              snapshotNames=[s.name for s in snapshots],
                              snapshots=[snapshot_pb(s) for s in snapshots])


class VolumeSource(Side):
    """One custom volume being sent."""

    what = "volume migration"

    def __init__(self, services, pool: str, name: str, project: str, *, volume_only: bool = False,
                 target: dict | None = None):
        super().__init__(services)
        self.custom = services.storage.custom
        self.pool = pool
        self.name = name
        self.project = self.custom.effective(project)
        self.volume_only = volume_only
        self.target = target

    async def check(self) -> None:
        if "/" in self.name:
            raise BadRequest("Copying a storage volume snapshot to another server is not supported")
        rec = await self.custom.get(self.pool, self.name, self.project)  # 404 first
        if rec.content_type != "filesystem":
            raise BadRequest(f"Migrating {rec.content_type} storage volumes between servers is not supported")
        check_target(self.target)

    def peer(self):
        return target_peer(self.target)

    def subject(self) -> dict:
        return {"volume": self.name}

    async def exchange(self, op) -> None:
        custom = self.custom
        rec = await custom.get(self.pool, self.name, self.project)
        snaps = [] if self.volume_only else await custom.snapshots(self.pool, self.name, self.project)
        offer = volume_offer(snaps, compress=hdr.pool_compresses(self.services.storage.get(self.pool)))
        ctl = self.ends.control
        await ctl.send_control(offer)
        resp = await ctl.recv_control(pb.MigrationHeader, timeout=CONTROL_TIMEOUT)
        if resp.fs != pb.RSYNC:
            raise MigrationError(f"The sink asked for a transfer type this source can't send ({resp.fs})")
        to_send = hdr.snapshots_to_send(offer, resp)
        await self.send_watched(ctl, self._send_all(op, rec, snaps, to_send, resp))

    async def _send_all(self, op, rec, snaps: list, to_send: list[str], resp) -> None:
        from lxd_daemon.migration import rsync

        fs = self.ends.fs
        if resp.HasField("indexHeaderVersion") and resp.indexHeaderVersion >= 1:
            wanted = set(to_send)
            pool = self.services.storage.get(self.pool)
            cfg = {"pool": {"name": pool.name, "driver": pool.driver_name, "description": pool.description,
                            "config": dict(pool.config or {})},
                   "volume": _volume_dict(rec),
                   "volume_snapshots": [_snapshot_dict(s, rec.content_type) for s in snaps if s.name in wanted]}
            await fs.send_json(hdr.index_header(cfg))
            answer = await fs.recv_json(timeout=CONTROL_TIMEOUT)
            try:
                hdr.check_index_response(answer)
            except ValueError as e:
                raise MigrationError(str(e)) from None
        feats = rsync.Features(**hdr.agreed_features(resp))
        p = self.services.storage.get(self.pool)
        drv = p.driver
        bwlimit = (p.config or {}).get("rsync.bwlimit", "")
        vol = rec.volume
        progress = Progress(op, self.name)
        for s in to_send:
            svol = vol.snapshot(s)
            path = await drv.mount_volume(svol)
            try:
                await rsync.send(path, fs, feats, progress=progress.stream(s), bwlimit=bwlimit)
            finally:
                await drv.unmount_volume(svol)
        path = await drv.mount_volume(vol)
        try:
            await rsync.send(path, fs, feats, progress=progress.stream(self.name), bwlimit=bwlimit)
        finally:
            await drv.unmount_volume(vol)
        progress.finish(fs.bytes_sent)


class VolumeSink(Side):
    """One custom volume being received (new, or a refresh of an existing one)."""

    role = "target"
    what = "volume migration"

    def __init__(self, services, pool: str, body, project: str, *, refresh: bool):
        super().__init__(services)
        self.custom = services.storage.custom
        self.pool = pool
        self.body = body
        self.source = body.source.model_dump() if hasattr(body.source, "model_dump") else dict(body.source)
        self.mode = self.source.get("mode") or "pull"
        self.name = body.name
        self.project = self.custom.effective(project)
        self.refresh = refresh
        self.volume_only = bool(self.source.get("volume_only"))
        self.config: dict[str, str] = {}

    async def check(self) -> None:
        """Everything before the operation: the source fields, the name, pool, content type,
        config and project limits; a new volume's name free, a refresh's volume present."""
        from lxd_daemon import names
        from lxd_daemon.migration.sink import MigrationSink
        from lxd_daemon.storage.custom import _check_name

        MigrationSink.check_source({**self.source, "secrets": self.source.get("secrets") or {}})
        _check_name(names.volume, self.name)
        custom = self.custom
        p = custom._pool(self.pool)
        if (self.body.content_type or "filesystem") != "filesystem":
            raise BadRequest(f"Migrating {self.body.content_type} storage volumes between servers is not supported")
        custom._check_content_type(p, "filesystem")
        cfg = {k: v for k, v in (self.body.config or {}).items() if not k.startswith("volatile.")}
        self.config = custom.validate_config(p, custom._with_pool_defaults(p, cfg))
        found = await custom._find(self.pool, self.name, self.project)
        exists = found is not None
        if self.refresh and exists and found.content_type != "filesystem":
            raise BadRequest(f"Can't refresh a {found.content_type} volume from a filesystem one")
        if self.refresh and not exists:
            self.refresh = False
        if not self.refresh:
            if exists:
                raise Conflict(f"Storage volume {self.name!r} already exists on pool {self.pool!r}")
            custom._check_disk(p, self.name, self.project, self.config, "creation")

    def peer(self):
        return source_peer(self.source, self.mode)

    def subject(self) -> dict:
        return {"volume": self.name}

    async def exchange(self, op) -> None:
        if self.refresh:
            async with self.custom.lock(self.pool, self.name, self.project):
                await self._exchange(op)
        else:
            await self._exchange(op)

    async def _exchange(self, op) -> None:
        ctl = self.ends.control
        offer = await ctl.recv_control(pb.MigrationHeader, timeout=CONTROL_TIMEOUT)
        if offer.fs != pb.RSYNC:
            raise MigrationError(f"Unsupported migration transfer type {offer.fs} for a storage volume")
        have: list[str] = []
        if self.refresh:
            have = await self._prepare_refresh(offer)
        # (The source decides whether snapshots come: `volume_only` in its request; the sink takes what
        # is offered, as LXD's, since a source not asked for a refresh sends every snapshot it offered.)
        resp = hdr.answer(offer, fs_types=(pb.RSYNC,), refresh=self.refresh, have_snapshots=have,
                          compress=hdr.pool_compresses(self.services.storage.get(self.pool)))
        await ctl.send_control(resp)
        wanted = hdr.snapshots_to_send(offer, resp) if self.refresh else list(resp.snapshotNames)
        await self.receive_committed(ctl, lambda revert: self._receive_all(op, offer, resp, wanted, revert))

    async def _prepare_refresh(self, offer) -> list[str]:
        """Our snapshots the source no longer has (or has anew under the same name) go; the
        names of those kept."""
        custom = self.custom
        p = custom._pool(self.pool)
        rec = await custom.get(self.pool, self.name, self.project)
        offered = {s.name: s for s in offer.snapshots}
        keep = []
        for s in await custom.snapshots(self.pool, self.name, self.project):
            o = offered.get(s.name)
            if o is not None and (not o.creation_date or o.creation_date == hdr.GO_ZERO_TIME
                                  or hdr._ts(s.created_at) == o.creation_date):
                keep.append(s.name)
                continue
            if self.volume_only and o is None:
                keep.append(s.name)  # --volume-only leaves our snapshots alone
                continue
            snap = rec.volume.snapshot(s.name)
            if await p.driver.has_volume(snap):
                await p.driver.delete_snapshot(snap)
            await custom._delete_snapshot_row(s.id)
        return keep

    async def _receive_all(self, op, offer, resp, wanted: list[str], revert: Revert) -> None:
        from lxd_daemon.migration import rsync
        from lxd_daemon.storage.custom import VolumeSnapshot, _tmp_name
        from lxd_daemon.storage.volume import ContentType, Volume, VolumeType

        fs = self.ends.fs
        info = await self.receive_index(resp, self.refresh)
        cfg_info = info.get("config") or {}
        src_vol = cfg_info.get("volume") or {}
        snap_info = {str(s.get("name")): s for s in (cfg_info.get("volume_snapshots") or []) if isinstance(s, dict)}
        feats = self.rsync_features(offer, resp)
        custom = self.custom
        p = custom._pool(self.pool)
        drv = p.driver
        if self.refresh:
            rec = await custom.get(self.pool, self.name, self.project)
            vol = rec.volume
        else:
            final = Volume(self.pool, VolumeType.CUSTOM, self.name, project=self.project,
                           content_type=ContentType("filesystem"), config=self.config)
            vol = final.renamed(_tmp_name(self.name))
            revert.add(custom._drop, p, vol)
            await drv.create_volume(vol)
        progress = Progress(op, self.name)
        records = []
        path = await drv.mount_volume(vol)
        try:
            for name in wanted:
                await rsync.receive(path, fs, feats, progress=progress.stream(name))
                snap = vol.snapshot(name)
                if await drv.has_volume(snap):
                    await drv.delete_snapshot(snap)
                await drv.create_snapshot(snap)
                revert.add(drv.delete_snapshot, snap)
                extra = snap_info.get(name) or {}
                expires = str(extra.get("expires_at") or "")
                if expires.startswith("0001-01-01"):
                    expires = ""
                created = str(extra.get("created_at") or "")
                if not created or created.startswith("0001-01-01"):
                    created = rfc3339()
                records.append(VolumeSnapshot(0, 0, name, str(extra.get("description") or ""), created, expires,
                                              {str(k): str(v) for k, v in (extra.get("config") or {}).items()}
                                              if isinstance(extra.get("config"), dict) else dict(self.config)))
            await rsync.receive(path, fs, feats, progress=progress.stream(self.name))
        finally:
            await drv.unmount_volume(vol)
        progress.finish(fs.bytes_received)
        if self.refresh:
            if records:
                await custom._insert_snapshot_rows(rec.id, records)
            return
        desc = self.body.description or str(src_vol.get("description") or "")
        vid = await custom._insert(p, self.name, self.project, desc, "filesystem", self.config, records)
        revert.add(custom._delete_row, vid)
        await drv.rename_volume(vol, self.name)
        revert.add(drv.rename_volume, vol.renamed(self.name), vol.name)


async def prepare_sink(services, pool: str, body, project: str) -> VolumeSink:
    services.storage.get(pool)
    if services.storage.custom is None:
        raise NotFound("Custom storage volumes are not available")
    s = VolumeSink(services, pool, body, project, refresh=bool(body.source.refresh))
    await s.check()
    return s
