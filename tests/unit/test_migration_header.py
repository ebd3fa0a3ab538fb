"""lxd_daemon/migration/header.py: the offer, the answer, the agreed rsync features, the
snapshots a refresh asks for, and the index header frames."""

from __future__ import annotations

import pytest

from lxd_daemon.instances.idmap import IdmapEntry, IdmapSet
from lxd_daemon.instances.snapshots import Snapshot
from lxd_daemon.migration import header as hdr
from lxd_daemon.migration import migrate_pb2 as pb

MAP = IdmapSet((IdmapEntry(True, False, 1000000, 0, 65536), IdmapEntry(False, True, 1000000, 0, 65536)))


def snap(name: str, created: str = "2026-12-01T10:00:00Z") -> Snapshot:
    return Snapshot(0, 0, name, created, "2027-01-01T00:00:00Z", "d", False, "x86_64", False,
                    {"user.a": "1", "volatile.last_state.idmap": MAP.to_json()},
                    {"eth0": {"type": "nic", "network": "br0"}}, ["default"])


def test_offer_carries_the_idmap_and_snapshots_oldest_first():
    h = hdr.offer(fs=pb.RSYNC, disk_idmap=MAP, snapshots=[snap("s0"), snap("s1")], running=False, live=False)
    h2 = pb.MigrationHeader.FromString(h.SerializeToString())  # survives the wire
    assert list(h2.snapshotNames) == ["s0", "s1"]
    assert hdr.idmap_from_pb(h2.idmap) == MAP
    assert h2.indexHeaderVersion == 1 and h2.rsyncFeatures.bidirectional
    assert not h2.HasField("criu")  # stopped, not live
    s = hdr.snapshot_from_pb(h2.snapshots[0])
    assert s["config"]["user.a"] == "1" and s["devices"] == {"eth0": {"type": "nic", "network": "br0"}}
    assert s["architecture"] == "x86_64" and s["profiles"] == ["default"]
    assert s["created_at"] == "2026-12-01T10:00:00Z" and s["expires_at"] == "2027-01-01T00:00:00Z"


@pytest.mark.parametrize("running,live,criu", [(True, False, pb.NONE), (True, True, pb.CRIU_RSYNC)])
def test_offer_criu_type(running, live, criu):
    assert hdr.offer(fs=pb.RSYNC, disk_idmap=MAP, snapshots=[], running=running, live=live).criu == criu


def test_answer_falls_back_to_rsync_and_lists_what_a_refresh_needs():
    offered = hdr.offer(fs=pb.BTRFS, disk_idmap=MAP, snapshots=[snap("s0"), snap("s1"), snap("s2")],
                        running=False, live=False)
    a = hdr.answer(offered, refresh=True, have_snapshots=["s1"])
    assert a.fs == pb.RSYNC and a.refresh
    assert list(a.snapshotNames) == ["s0", "s2"]
    assert hdr.snapshots_to_send(offered, a) == ["s0", "s2"]
    full = hdr.answer(offered)
    assert hdr.snapshots_to_send(offered, full) == ["s0", "s1", "s2"]
    assert hdr.answer(offered, fs_types=(pb.RSYNC, pb.BTRFS)).fs == pb.BTRFS


def test_index_header_version_is_the_lower_one():
    old = pb.MigrationHeader(fs=pb.RSYNC)  # a peer without the index header
    assert hdr.answer(old).indexHeaderVersion == 0
    new = pb.MigrationHeader(fs=pb.RSYNC, indexHeaderVersion=7)
    assert hdr.answer(new).indexHeaderVersion == 1


def test_agreed_features():
    assert hdr.agreed_features(pb.MigrationHeader(fs=pb.RSYNC)) == {
        "xattrs": True, "delete": True, "compress": True, "bidirectional": False}  # an old peer: LXD 3.7's set
    h = pb.MigrationHeader(fs=pb.RSYNC, rsyncFeatures=pb.rsyncFeatures(xattrs=False, delete=True,
                                                                       compress=False, bidirectional=True))
    assert hdr.agreed_features(h) == {"xattrs": False, "delete": True, "compress": False, "bidirectional": True}


def test_index_response():
    assert hdr.index_response(True) == {"StatusCode": 200, "Error": "", "Refresh": True}
    hdr.check_index_response(hdr.index_response(False))
    with pytest.raises(ValueError, match="nope"):
        hdr.check_index_response(hdr.index_response(False, "nope"))
    with pytest.raises(ValueError):
        hdr.check_index_response([])


def test_never_expiring_snapshots_travel_as_go_zero_time():
    """LXD sends Go's zero time (0001-01-01) for "never": it must read back as never, not as year 1
    or 1970 (which would make the snapshot expire at once)."""
    s = snap("s0")
    s.expires_at = ""
    p = hdr.snapshot_to_pb(s)
    assert p.expiry_date == hdr.GO_ZERO_TIME
    assert hdr.snapshot_from_pb(p)["expires_at"] == ""
    assert hdr.snapshot_from_pb(pb.Snapshot(name="x", ephemeral=False, architecture=2, stateful=False,
                                            expiry_date=0))["expires_at"] == ""


def test_btrfs_answer_keeps_the_features_both_have():
    offered = hdr.offer(fs=pb.BTRFS, disk_idmap=MAP, snapshots=[], running=False, live=False)
    offered.btrfsFeatures.CopyFrom(pb.btrfsFeatures(migration_header=True, header_subvolume_uuids=True))
    a = hdr.answer(offered, fs_types=(pb.RSYNC, pb.BTRFS))
    assert a.fs == pb.BTRFS
    assert a.btrfsFeatures.migration_header and not a.btrfsFeatures.header_subvolumes
    assert not a.btrfsFeatures.header_subvolume_uuids  # not one this daemon speaks
    assert not hdr.answer(offered).HasField("btrfsFeatures")  # rsync: no btrfs features


def test_only_our_senders_get_the_negotiated_rsync_receiver():
    """Our offer carries rsyncFeatures.negotiate (our extension, ignored by LXD); LXD's never does,
    so an LXD sender meets LXD's own receiver flags."""
    from lxd_daemon.migration import rsync

    ours = hdr.offer(fs=pb.RSYNC, disk_idmap=MAP, snapshots=[], running=False, live=False)
    lxd = pb.MigrationHeader(fs=pb.RSYNC, rsyncFeatures=pb.rsyncFeatures(xattrs=True, delete=True, compress=True,
                                                                         bidirectional=True))
    assert hdr.negotiates(ours) and not hdr.negotiates(lxd)
    assert not hdr.negotiates(pb.MigrationHeader(fs=pb.RSYNC))
    # LXD parses our header (the unknown field is skipped) and its own round-trips without it.
    assert pb.MigrationHeader.FromString(lxd.SerializeToString()).rsyncFeatures.negotiate is False
    assert rsync.SERVER_FLAGS_NEGOTIATED.startswith(rsync.SERVER_FLAGS)


class _Pool:
    def __init__(self, config):
        self.config = config


def test_rsync_compression_of_either_pool_turns_compress_off():
    assert hdr.pool_compresses(_Pool({})) and hdr.pool_compresses(_Pool({"rsync.compression": "true"}))
    assert not hdr.pool_compresses(_Pool({"rsync.compression": "false"}))
    on = hdr.offer(fs=pb.RSYNC, disk_idmap=MAP, snapshots=[], running=False, live=False)
    off = hdr.offer(fs=pb.RSYNC, disk_idmap=MAP, snapshots=[], running=False, live=False, compress=False)
    assert on.rsyncFeatures.compress and not off.rsyncFeatures.compress
    # the answer has what both sides have (as LXD's MatchTypes)
    assert hdr.agreed_features(hdr.answer(on))["compress"]
    assert not hdr.agreed_features(hdr.answer(off))["compress"]
    assert not hdr.agreed_features(hdr.answer(on, compress=False))["compress"]
    # an old peer (no `bidirectional`) can't negotiate: LXD 3.7's fixed set, compress included, as LXD's
    old = pb.MigrationHeader(fs=pb.RSYNC)
    for compress in (True, False):
        assert hdr.agreed_features(hdr.answer(old, compress=compress)) == {
            "xattrs": True, "delete": True, "compress": True, "bidirectional": False}
