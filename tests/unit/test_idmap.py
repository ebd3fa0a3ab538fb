from lxd_daemon.instances import idmap


def test_default_set_from_subuid(tmp_path):
    (tmp_path / "subuid").write_text("root:1000000:1000000000\n")
    (tmp_path / "subgid").write_text("root:1000000:1000000000\n")
    s = idmap.default_set(tmp_path / "subuid", tmp_path / "subgid")
    assert s.lxc_lines() == ["u 0 1000000 1000000000", "g 0 1000000 1000000000"]
    assert s.to_host(0, 0) == (1000000, 1000000)
    assert s.to_container(1000033, 1000044) == (33, 44)
    assert s.to_container(5, 5) == (-1, -1)
    assert idmap.IdmapSet.from_json(s.to_json()) == s
    assert '"Isuid":true' in s.to_json()


def test_default_set_without_subuid_uses_lxd_default(tmp_path):
    s = idmap.default_set(tmp_path / "none", tmp_path / "none")
    assert s.root_ids() == (1000000, 1000000)


def test_isolated_ranges_do_not_overlap(tmp_path):
    (tmp_path / "subuid").write_text("root:1000000:1000000000\n")
    (tmp_path / "subgid").write_text("root:1000000:1000000000\n")
    a = idmap.isolated_set([], subuid=tmp_path / "subuid", subgid=tmp_path / "subgid")
    b = idmap.isolated_set([a], subuid=tmp_path / "subuid", subgid=tmp_path / "subgid")
    ea, eb = a.entries[0], b.entries[0]
    assert ea.hostid + ea.maprange <= eb.hostid
    assert ea.hostid >= 1000000 + 65536


def test_raw_idmap_punches_hole():
    base = idmap.IdmapSet((idmap.IdmapEntry(True, True, 1000000, 0, 65536),))
    raw = idmap.parse_raw_idmap("both 1000 1000")
    s = idmap.with_raw(base, raw)
    assert s.to_host(1000, 1000) == (1000, 1000)
    assert s.to_host(999, 999) == (1000999, 1000999)
    assert s.to_host(1001, 1001) == (1001001, 1001001)
    assert "u 1000 1000 1" in s.lxc_lines()


def test_raw_idmap_rejects_garbage():
    import pytest

    for bad in ("uid 1", "both a b", "uid 5-1 1-5", "uid 1-3 1-2", "foo 1 1"):
        with pytest.raises(ValueError):
            idmap.parse_raw_idmap(bad)
