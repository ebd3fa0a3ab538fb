"""The volume migration's headers (lxd_daemon/migration/volumes.py): the offer LXD 5.0's sink
expects (rsync, its features, index header version 1, snapshots by name and config, no idmap),
and the target checks of a push."""

from __future__ import annotations

import pytest

from lxd_daemon.errors import BadRequest
from lxd_daemon.migration import header as hdr
from lxd_daemon.migration import migrate_pb2 as pb
from lxd_daemon.migration.volumes import check_target, volume_offer
from lxd_daemon.storage.custom import VolumeSnapshot


def _snap(name: str, created: str = "2026-01-02T03:04:05Z") -> VolumeSnapshot:
    return VolumeSnapshot(1, 1, name, "d", created, "", {"user.a": "1"})


def test_offer_is_rsync_with_snapshots_oldest_first():
    h = volume_offer([_snap("s0"), _snap("s1")])
    h = pb.MigrationHeader.FromString(h.SerializeToString())
    assert h.fs == pb.RSYNC and h.indexHeaderVersion == 1
    assert list(h.snapshotNames) == ["s0", "s1"]
    assert [s.name for s in h.snapshots] == ["s0", "s1"]
    assert {c.key: c.value for c in h.snapshots[0].localConfig} == {"user.a": "1"}
    assert h.snapshots[0].creation_date == hdr._ts("2026-01-02T03:04:05Z")
    assert not h.idmap and h.rsyncFeatures.xattrs and h.rsyncFeatures.delete and h.rsyncFeatures.bidirectional


def test_refresh_answer_asks_only_for_missing_snapshots():
    offer = volume_offer([_snap("s0"), _snap("s1"), _snap("s2")])
    resp = hdr.answer(offer, refresh=True, have_snapshots=["s0", "s1"])
    assert resp.refresh and list(resp.snapshotNames) == ["s2"]
    assert hdr.snapshots_to_send(offer, resp) == ["s2"]
    assert hdr.snapshots_to_send(offer, hdr.answer(offer)) == ["s0", "s1", "s2"]


@pytest.mark.parametrize("target", [{}, {"operation": "https://x/1.0/operations/1"},
                                    {"operation": "https://x/1.0/operations/1", "secrets": {"control": "a"}},
                                    {"operation": 3, "secrets": {"control": "a", "fs": "b"}}])
def test_push_target_needs_operation_and_secrets(target):
    with pytest.raises(BadRequest):
        check_target(target)


def test_push_target_ok():
    check_target(None)
    check_target({"operation": "https://x/1.0/operations/1", "secrets": {"control": "a", "fs": "b"},
                  "certificate": ""})
