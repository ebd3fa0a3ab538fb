"""instances.live: which cgroup files a config change rewrites, and in what order (pure parts)."""

from lxd_daemon.instances import live, lxcconf

V1 = lxcconf.CgroupLayout({"cpu": 1, "cpuset": 1, "memory": 1, "pids": 1, "devices": 1}, memsw=True,
                          swappiness=True, online_cpus=(0, 1))
V2 = lxcconf.CgroupLayout({"cpu": 2, "cpuset": 2, "memory": 2, "pids": 2}, online_cpus=(0, 1))
MiB = 1024 * 1024


def keys(changes):
    return [k for _, k, _ in changes]


def test_no_change_no_writes():
    assert live.cgroup_changes({"limits.memory": "1GiB"}, {"limits.memory": "1GiB", "user.x": "y"}, V1) == []


def test_memory_raise_writes_memsw_first():
    old = {"limits.memory": "64MiB", "limits.memory.swap": "false"}
    new = {"limits.memory": "512MiB", "limits.memory.swap": "false"}
    ch = keys(live.cgroup_changes(old, new, V1))
    assert ch.index("memory.memsw.limit_in_bytes") < ch.index("memory.limit_in_bytes")


def test_memory_lower_writes_memsw_last():
    old = {"limits.memory": "512MiB", "limits.memory.swap": "false"}
    new = {"limits.memory": "64MiB", "limits.memory.swap": "false"}
    ch = live.cgroup_changes(old, new, V1)
    assert keys(ch)[-1] == "memory.memsw.limit_in_bytes"
    assert [1, "memory.limit_in_bytes", str(64 * MiB)] in ch


def test_unset_limits_reset_to_unlimited():
    ch = {k: v for _, k, v in live.cgroup_changes({"limits.processes": "10", "limits.memory": "1GB"}, {}, V1)}
    assert ch["pids.max"] == "max"
    assert ch["memory.limit_in_bytes"] == "-1"
    assert ch["memory.soft_limit_in_bytes"] == "-1"


def test_v2_names():
    ch = {k: v for _, k, v in live.cgroup_changes({}, {"limits.memory": "1GB", "limits.cpu.allowance": "10ms/50ms"}, V2)}
    assert ch == {"memory.max": "1000000000", "cpu.max": "10000 50000"}


def test_live_kinds_have_updaters():
    from lxd_daemon.instances import config as cfg

    for spec in [*cfg.KEYS.values(), *cfg.PREFIXES.values()]:
        assert spec.live is None or spec.live in live.UPDATERS


def test_monitor_lxcpath_parsing(tmp_path, monkeypatch):
    assert live._monitor_lxcpath("nope", 999999999) is None
    assert live._devices_dir("c1", tmp_path / "d") == tmp_path / "d"
    monkeypatch.setenv("LXD_DIR", str(tmp_path))
    assert live._devices_dir("c1", None) == tmp_path / "containers" / "c1" / "devices"
