"""The migration's headers: the source's `MigrationHeader` offer built from an instance, the
sink's answer, the rsync features both agreed on, and the index header (the instance's
backup.yaml-like config sent first over `fs` when both sides speak version 1).

Pure functions (no I/O), unit-tested in tests/unit/test_migration_header.py."""

from __future__ import annotations

import datetime as dt

from lxd_daemon.instances.idmap import IdmapEntry, IdmapSet
from lxd_daemon.migration import migrate_pb2 as pb

# The index header version this daemon speaks (LXD's migration.IndexHeaderVersion).
INDEX_HEADER_VERSION = 1

# LXD's architecture ids (shared/osarch), as the protobuf Snapshot carries them.
_ARCH_IDS = {"i686": 1, "x86_64": 2, "armv7l": 3, "aarch64": 4, "ppc": 5, "ppc64": 6, "ppc64le": 7,
             "s390x": 8, "mips": 9, "mips64": 10, "riscv32": 11, "riscv64": 12}
_ARCH_NAMES = {v: k for k, v in _ARCH_IDS.items()}


def arch_id(name: str) -> int:
    return _ARCH_IDS.get(name, 0)


def arch_name(ident: int) -> str:
    return _ARCH_NAMES.get(ident, "")


def idmap_to_pb(m: IdmapSet) -> list:
    return [pb.IDMapType(isuid=e.isuid, isgid=e.isgid, hostid=e.hostid, nsid=e.nsid, maprange=e.maprange)
            for e in m.entries]


def idmap_from_pb(entries) -> IdmapSet:
    return IdmapSet(tuple(IdmapEntry(bool(e.isuid), bool(e.isgid), int(e.hostid), int(e.nsid), int(e.maprange))
                          for e in entries))


# Go's zero time (0001-01-01T00:00:00Z) in unix seconds: what LXD sends for "never" (no expiry).
GO_ZERO_TIME = -62135596800


def _ts(value: str) -> int:
    """An RFC 3339 time as unix seconds; Go's zero time when empty, never or unreadable."""
    if not value or value.startswith("0001-01-01"):
        return GO_ZERO_TIME
    try:
        return int(dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return GO_ZERO_TIME


def _rfc3339(ts: int) -> str:
    """Unix seconds as RFC 3339; "" for Go's zero time and anything before 1970 (never set)."""
    if ts <= 0:
        return ""
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def snapshot_to_pb(s) -> pb.Snapshot:
    """A snapshot record (lxd_daemon.instances.snapshots.Snapshot) as the protobuf Snapshot."""
    return pb.Snapshot(
        name=s.name,
        localConfig=[pb.Config(key=k, value=v) for k, v in sorted(s.config.items())],
        profiles=list(s.profiles),
        ephemeral=bool(s.ephemeral),
        localDevices=[pb.Device(name=n, config=[pb.Config(key=k, value=v) for k, v in sorted(d.items())])
                      for n, d in sorted(s.devices.items())],
        architecture=arch_id(s.architecture),
        stateful=bool(s.stateful),
        creation_date=_ts(s.created_at),
        last_used_date=0,
        expiry_date=_ts(s.expires_at),
    )


def snapshot_from_pb(p: pb.Snapshot) -> dict:
    """A protobuf Snapshot as the fields of a snapshot record."""
    return {
        "name": p.name,
        "config": {c.key: c.value for c in p.localConfig},
        "profiles": list(p.profiles),
        "ephemeral": bool(p.ephemeral),
        "devices": {d.name: {c.key: c.value for c in d.config} for d in p.localDevices},
        "architecture": arch_name(p.architecture),
        "stateful": bool(p.stateful),
        "created_at": _rfc3339(p.creation_date) if p.HasField("creation_date") else "",
        "expires_at": _rfc3339(p.expiry_date) if p.HasField("expiry_date") else "",
    }


def rsync_features_pb(*, xattrs: bool = True, delete: bool = True, compress: bool = True,
                      bidirectional: bool = True) -> pb.rsyncFeatures:
    """Ours, also in the answer: `negotiate` (our extension, migrate.proto) says our rsync (3.2 or
    later) negotiates its capabilities."""
    return pb.rsyncFeatures(xattrs=xattrs, delete=delete, compress=compress, bidirectional=bidirectional,
                            negotiate=True)


def negotiates(offered: pb.MigrationHeader) -> bool:
    """Whether the sender is one of ours (its rsync negotiates): the receiver may then offer its
    capabilities (zstd instead of zlib for `compress`). Never for LXD, whose rsync may be older."""
    return offered.HasField("rsyncFeatures") and offered.rsyncFeatures.negotiate


def pool_compresses(pool) -> bool:
    """Whether a pool's rsync transfers compress (`rsync.compression`, true unless set false)."""
    return ((getattr(pool, "config", None) or {}).get("rsync.compression") or "true").strip().lower() not in (
        "false", "0", "no", "off")


def offer(*, fs: int, disk_idmap: IdmapSet, snapshots: list, running: bool, live: bool,
          index_header_version: int = INDEX_HEADER_VERSION, compress: bool = True) -> pb.MigrationHeader:
    """The source's offer: its transfer type, the id map its files are stored with, the
    snapshots it would send (oldest first), whether the instance runs (`criu` NONE when it
    runs and the copy is stateless, as LXD: the sink then knows the files were moving), and the
    rsync features of its pool (`compress` off with rsync.compression=false)."""
    h = pb.MigrationHeader(fs=fs, idmap=idmap_to_pb(disk_idmap),
                           snapshotNames=[s.name for s in snapshots],
                           snapshots=[snapshot_to_pb(s) for s in snapshots],
                           predump=False, rsyncFeatures=rsync_features_pb(compress=compress),
                           indexHeaderVersion=index_header_version)
    if live:
        h.criu = pb.CRIU_RSYNC
    elif running:
        h.criu = pb.NONE
    return h


# The btrfs migration features this daemon speaks (migration/streams.py).
BTRFS_FEATURES = ("migration_header", "header_subvolumes")


def btrfs_features_pb(names=BTRFS_FEATURES) -> pb.btrfsFeatures:
    return pb.btrfsFeatures(**{n: True for n in names})


def answer(offered: pb.MigrationHeader, *, fs_types: tuple[int, ...] = (pb.RSYNC,), refresh: bool = False,
           have_snapshots: list[str] | tuple[str, ...] = (), compress: bool = True) -> pb.MigrationHeader:
    """The sink's answer to `offered`: the same fs type when it can take it, else RSYNC; the
    rsync features both sides have (ours: `compress` unless our pool's rsync.compression is
    false; an offer without `bidirectional` has LXD 3.7's fixed set), and for btrfs those of
    BTRFS_FEATURES both have; the index header version both speak; for a refresh, the
    snapshots it still needs (those it lacks, in the offer's order)."""
    fs = offered.fs if offered.fs in fs_types else pb.RSYNC
    theirs = agreed_features(offered)
    common = rsync_features_pb(xattrs=theirs["xattrs"], delete=theirs["delete"],
                               compress=theirs["compress"] and compress, bidirectional=theirs["bidirectional"])
    h = pb.MigrationHeader(fs=fs, rsyncFeatures=common,
                           indexHeaderVersion=min(offered.indexHeaderVersion if offered.HasField("indexHeaderVersion")
                                                  else 0, INDEX_HEADER_VERSION))
    if offered.HasField("criu"):
        h.criu = offered.criu
    have = set(have_snapshots)
    wanted = [s for s in offered.snapshots if s.name not in have] if refresh else list(offered.snapshots)
    h.snapshotNames.extend(s.name for s in wanted)
    h.snapshots.extend(wanted)
    if refresh:
        h.refresh = True
    if fs == pb.BTRFS:
        offered_f = offered.btrfsFeatures if offered.HasField("btrfsFeatures") else pb.btrfsFeatures()
        h.btrfsFeatures.CopyFrom(btrfs_features_pb([n for n in BTRFS_FEATURES if getattr(offered_f, n)]))
    return h


def agreed_features(resp: pb.MigrationHeader) -> dict[str, bool]:
    """The rsync features a header carries (the sink's answer: those agreed): without
    `bidirectional` (an old peer), the fixed set xattrs, delete and compress, as LXD assumes."""
    f = resp.rsyncFeatures if resp.HasField("rsyncFeatures") else None
    if f is None or not f.bidirectional:
        return {"xattrs": True, "delete": True, "compress": True, "bidirectional": False}
    return {"xattrs": bool(f.xattrs), "delete": bool(f.delete), "compress": bool(f.compress), "bidirectional": True}


def snapshots_to_send(offered: pb.MigrationHeader, resp: pb.MigrationHeader) -> list[str]:
    """The snapshots the source sends, oldest first: on a refresh only those the sink asked for."""
    if resp.HasField("refresh") and resp.refresh:
        asked = set(resp.snapshotNames)
        return [n for n in offered.snapshotNames if n in asked]
    return list(offered.snapshotNames)


def index_header(config: dict) -> dict:
    """The index header frame's JSON (LXD's migration.Info)."""
    return {"config": config}


def index_response(refresh: bool, error: str = "") -> dict:
    """The sink's answer to the index header (LXD's migration.InfoResponse)."""
    return {"StatusCode": 400 if error else 200, "Error": error, "Refresh": refresh}


def check_index_response(resp) -> None:
    """Raise ValueError when the sink's index header answer is a refusal."""
    if not isinstance(resp, dict):
        raise ValueError("Invalid migration index header response")
    code = resp.get("StatusCode", 200)
    if code != 200 or resp.get("Error"):
        raise ValueError(resp.get("Error") or f"Migration index header refused ({code})")
