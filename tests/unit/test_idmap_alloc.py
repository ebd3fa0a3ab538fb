"""Isolated id map allocation (issue 8 item 10): what is in use, and first-fit blocks after the
first 65536 ids of root's range, as LXD allocates them."""

from __future__ import annotations

import pytest

from lxd_daemon.instances import idmap
from lxd_daemon.instances.idmap import Claim, IdmapEntry, IdmapSet

BASE = 100000
SIZE = 10000001  # Debian's lxd package writes root:100000:10000001


@pytest.fixture
def subids(tmp_path):
    u, g = tmp_path / "subuid", tmp_path / "subgid"
    u.write_text(f"root:{BASE}:{SIZE}\n")
    g.write_text(f"root:{BASE}:{SIZE}\n")
    return {"subuid": u, "subgid": g}


def block(start: int, size: int = 65536) -> IdmapSet:
    return IdmapSet((IdmapEntry(True, True, start, 0, size),))


def shared(subids) -> IdmapSet:
    return idmap.default_set(**subids)


def test_shared_running_container_consumes_nothing(subids):
    lo, hi = BASE, BASE + SIZE
    sh = shared(subids)
    # A running non-isolated container: its whole shared range must not count as used.
    claims = [Claim(False, sh, sh, sh)]
    assert idmap.ranges_in_use(claims, lo, hi) == []
    m = idmap.allocate_isolated([], **subids)
    assert m.entries[0].hostid == BASE + 65536 and m.entries[0].maprange == 65536


def test_isolated_claims_count_running_or_not(subids):
    lo, hi = BASE, BASE + SIZE
    sh = shared(subids)
    a, b = block(BASE + 65536), block(BASE + 2 * 65536)
    claims = [Claim(True, a, IdmapSet(()), sh),  # stopped isolated: keeps its block
              Claim(True, b, b, sh),  # running isolated
              Claim(False, sh, IdmapSet(()), sh)]  # stopped shared
    used = idmap.ranges_in_use(claims, lo, hi)
    assert used == [(BASE + 65536, BASE + 2 * 65536), (BASE + 2 * 65536, BASE + 3 * 65536)]
    m = idmap.allocate_isolated(used, **subids)
    assert m.entries[0].hostid == BASE + 3 * 65536


def test_running_block_kept_until_stop(subids):
    """isolated was switched off while running: its block stays in use until it stops."""
    lo, hi = BASE, BASE + SIZE
    sh = shared(subids)
    a = block(BASE + 65536)
    used = idmap.ranges_in_use([Claim(False, sh, a, sh)], lo, hi)
    assert used == [(BASE + 65536, BASE + 2 * 65536)]


def test_raw_entries_outside_the_range_are_not_blocks(subids):
    lo, hi = BASE, BASE + SIZE
    m = IdmapSet((IdmapEntry(True, True, BASE + 65536, 0, 1000), IdmapEntry(True, True, 1000, 1000, 1),
                  IdmapEntry(True, True, BASE + 65536 + 1001, 1001, 64535)))
    assert idmap.host_blocks(m, lo, hi) == [(BASE + 65536, BASE + 65536 + 1000),
                                            (BASE + 65536 + 1001, BASE + 2 * 65536)]


def test_first_fit_fills_holes(subids):
    used = [(BASE + 65536, BASE + 2 * 65536), (BASE + 3 * 65536, BASE + 4 * 65536)]
    m = idmap.allocate_isolated(used, **subids)
    assert m.entries[0].hostid == BASE + 2 * 65536
    big = idmap.allocate_isolated(used, 2 * 65536, **subids)
    assert big.entries[0].hostid == BASE + 4 * 65536


def test_previous_block_kept_when_free_and_right_size(subids):
    prev = block(BASE + 5 * 65536)
    m = idmap.allocate_isolated([(BASE + 65536, BASE + 2 * 65536)], previous=prev, **subids)
    assert m == prev
    # taken by another meanwhile: a new one
    m = idmap.allocate_isolated([(BASE + 5 * 65536, BASE + 6 * 65536)], previous=prev, **subids)
    assert m.entries[0].hostid == BASE + 65536
    # size changed: a new one
    m = idmap.allocate_isolated([], 100000, previous=prev, **subids)
    assert m.entries[0].maprange == 100000 and m.entries[0].hostid == BASE + 65536
    # a shared map is never "kept" as a block
    m = idmap.allocate_isolated([], previous=shared(subids), **subids)
    assert m.entries[0].hostid == BASE + 65536


def test_ten_blocks_distinct(subids):
    lo, hi = BASE, BASE + SIZE
    sh = shared(subids)
    claims: list[Claim] = [Claim(False, sh, sh, sh)]
    got = []
    for _ in range(10):
        m = idmap.allocate_isolated(idmap.ranges_in_use(claims, lo, hi), **subids)
        claims.append(Claim(True, m, m, sh))
        got.append(m.entries[0].hostid)
    assert len(set(got)) == 10
    assert sorted(got) == [BASE + 65536 * (i + 1) for i in range(10)]


def test_exhaustion_and_base(subids, tmp_path):
    small = {"subuid": tmp_path / "u", "subgid": tmp_path / "g"}
    for p in small.values():
        p.write_text(f"root:{BASE}:{3 * 65536}\n")
    m = idmap.allocate_isolated([], **small)
    assert m.entries[0].hostid == BASE + 65536
    with pytest.raises(ValueError, match="Not enough subordinate ids"):
        idmap.allocate_isolated([(BASE + 65536, BASE + 3 * 65536)], **small)
    assert idmap.allocate_isolated([], base=BASE + 70000, **subids).entries[0].hostid == BASE + 70000
    with pytest.raises(ValueError):
        idmap.allocate_isolated([], base=5, **subids)
