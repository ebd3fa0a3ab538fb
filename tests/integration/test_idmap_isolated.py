"""Isolated id maps (issue 8 item 10): every isolated container gets its own block of host ids,
whether isolation comes from a profile or its own config, started in parallel or one by one,
next to running non-isolated containers, and for copies."""

from __future__ import annotations

import json

import pytest

from tests.helpers import ensure_containers_ready, init_pid, root_subids, run_prefix

pytestmark = pytest.mark.integration


@pytest.fixture
def d(fresh_daemon):
    d = fresh_daemon.start()
    ensure_containers_ready(d)
    made: list[str] = []
    d.made = made
    yield d
    for n in made:
        d.lxc("delete", "-f", n, check=False)


def host_range(d, name: str) -> tuple[int, int]:
    """(first host uid, count) of the running container's user namespace, from the kernel."""
    m = open(f"/proc/{init_pid(d, name)}/uid_map").read().split()
    assert m[0] == "0", m
    g = open(f"/proc/{init_pid(d, name)}/gid_map").read().split()
    assert g[:3] == m[:3], (m, g)
    return int(m[1]), int(m[2])


def assert_disjoint(ranges: dict[str, tuple[int, int]]) -> None:
    items = sorted(ranges.items(), key=lambda kv: kv[1][0])
    for (a, (sa, na)), (b, (sb, nb)) in zip(items, items[1:], strict=False):
        assert sa + na <= sb, f"{a} {sa}+{na} overlaps {b} {sb}+{nb}: {ranges}"
    base = root_subids()[0]
    for n, (s, _) in ranges.items():
        assert s >= base + 65536, (n, s)  # the first block is the shared map's


def test_profile_isolation_parallel_restart(d):
    p = run_prefix()
    prof = f"{p}-iso"
    d.lxc("profile", "create", prof)
    d.lxc("profile", "set", prof, "security.idmap.isolated", "true")
    shared = f"{p}-shared"
    d.made.append(shared)
    d.lxc("launch", "busybox", shared)  # a running non-isolated container consumes no block
    names = [f"{p}-{x}" for x in "abc"]
    d.made.extend(names)
    try:
        for n in names:
            d.lxc("init", "busybox", n, "-p", "default", "-p", prof)
        d.lxc("start", *names)
        first = {n: host_range(d, n) for n in names}
        assert_disjoint(first)
        d.lxc("restart", *names, "--force")
        again = {n: host_range(d, n) for n in names}
        assert_disjoint(again)
        assert all(r[1] == 65536 for r in again.values())
        d.lxc("stop", *names, "--force")
        d.lxc("start", *names)
        assert_disjoint({n: host_range(d, n) for n in names})
        # The files follow the map: each container's root owns its root filesystem.
        for n in names:
            assert d.lxc("exec", n, "--", "stat", "-c", "%u", "/bin/busybox").stdout.strip() == "0"
        assert host_range(d, shared)[0] == root_subids()[0]
    finally:
        for n in names:
            d.lxc("delete", "-f", n, check=False)
        d.lxc("profile", "delete", prof, check=False)


def test_ten_started_one_by_one(d):
    p = run_prefix()
    shared = f"{p}-shared"
    d.made.append(shared)
    d.lxc("launch", "busybox", shared)
    names = [f"{p}-{i}" for i in range(10)]
    d.made.extend(names)
    for n in names:
        d.lxc("launch", "busybox", n, "-c", "security.idmap.isolated=true")
    ranges = {n: host_range(d, n) for n in names}
    assert_disjoint(ranges)
    # Stopped isolated containers keep their block: restarting one by one changes nothing.
    for n in names:
        d.lxc("restart", n, "--force")
    assert {n: host_range(d, n) for n in names} == ranges


def test_profile_and_local_config_mixed_and_copies(d):
    p = run_prefix()
    prof = f"{p}-iso"
    d.lxc("profile", "create", prof)
    d.lxc("profile", "set", prof, "security.idmap.isolated", "true")
    a, b, c, cp1, cp2 = (f"{p}-{x}" for x in ("a", "b", "c", "copy1", "copy2"))
    d.made.extend([a, b, c, cp1, cp2])
    try:
        d.lxc("init", "busybox", a, "-p", "default", "-p", prof)  # from the profile
        d.lxc("init", "busybox", b, "-c", "security.idmap.isolated=true")  # its own config
        d.lxc("init", "busybox", c, "-c", "security.idmap.isolated=true", "-c", "security.idmap.size=100000")
        # Allocated at create already (as LXD), from the expanded config: three distinct blocks.
        nexts = {}
        for n in (a, b, c):
            e = json.loads(d.api("GET", f"/1.0/instances/{n}").json()["metadata"]["config"]["volatile.idmap.next"])
            nexts[n] = (e[0]["Hostid"], e[0]["Maprange"])
        assert_disjoint(nexts)
        d.lxc("start", a, b, c)
        ranges = {n: host_range(d, n) for n in (a, b, c)}
        assert ranges[c][1] == 100000
        assert_disjoint(ranges)
        # Copies get a block of their own, also when copied from a running container.
        d.lxc("copy", a, cp1)
        d.lxc("copy", b, cp2)
        cfg = d.api("GET", f"/1.0/instances/{cp1}").json()["metadata"]["config"]
        nxt = json.loads(cfg["volatile.idmap.next"])
        assert nxt[0]["Hostid"] not in {r[0] for r in ranges.values()}, nxt
        d.lxc("start", cp1, cp2)
        ranges.update({n: host_range(d, n) for n in (cp1, cp2)})
        assert_disjoint(ranges)
        assert d.lxc("exec", cp1, "--", "stat", "-c", "%u", "/bin/busybox").stdout.strip() == "0"
        # Dropping isolation from the profile: back to the shared map at the next start.
        d.lxc("profile", "unset", prof, "security.idmap.isolated")
        d.lxc("restart", a, "--force")
        assert host_range(d, a)[0] == root_subids()[0]
    finally:
        for n in (a, b, c, cp1, cp2):
            d.lxc("delete", "-f", n, check=False)
        d.lxc("profile", "delete", prof, check=False)
