import pytest

from lxd_daemon.errors import BadRequest
from lxd_daemon.instances import config as cfg


@pytest.mark.parametrize("key,value", [
    ("limits.cpu", "2"), ("limits.cpu", "0-1,3"), ("limits.cpu", "1,3"), ("limits.cpu", "5-5"),
    ("limits.cpu.allowance", "50%"), ("limits.cpu.allowance", "25ms/100ms"), ("limits.cpu.priority", "5"),
    ("limits.memory", "512MiB"), ("limits.memory", "1GB"), ("limits.memory", "50%"), ("limits.memory", "1048576"),
    ("limits.memory", "100kB"), ("limits.memory.enforce", "soft"), ("limits.memory.enforce", "hard"),
    ("limits.memory.swap", "false"), ("limits.memory.swap.priority", "0"), ("limits.processes", "100"),
    ("boot.autostart", "true"), ("boot.autostart.delay", "5"), ("boot.autostart.priority", "-3"),
    ("boot.stop.priority", "10"), ("boot.host_shutdown_timeout", "60"),
    ("security.privileged", "true"), ("security.nesting", "1"), ("security.idmap.isolated", "yes"),
    ("security.idmap.size", "65536"), ("security.idmap.base", "1065536"), ("security.protection.delete", "off"),
    ("raw.lxc", "lxc.cgroup.memory.swappiness = 10\n# comment\nlxc.apparmor.profile=unconfined"),
    ("raw.idmap", "both 1000 1000\nuid 50-60 500-510"),
    ("environment.FOO", "bar baz"), ("user.anything", "x\ny"), ("image.os", "busybox"),
    ("volatile.idmap.base", "0"), ("volatile.eth0.hwaddr", "00:16:3e:00:00:01"),
    ("limits.kernel.nofile", "1024:4096"), ("limits.kernel.core", "unlimited"),
    ("limits.memory", ""),  # empty means unset
])
def test_valid_values(key, value):
    cfg.validate_config({key: value})


@pytest.mark.parametrize("key,value", [
    ("limits.cpu", "0"), ("limits.cpu", "a"), ("limits.cpu", "-1"), ("limits.cpu", "1-"), ("limits.cpu", "3-1"),
    ("limits.cpu", ",1"),
    ("limits.cpu.allowance", "150"), ("limits.cpu.allowance", "0%"), ("limits.cpu.allowance", "25ms"),
    ("limits.cpu.allowance", "25/100"), ("limits.cpu.allowance", "10ms/2000ms"), ("limits.cpu.priority", "11"),
    ("limits.memory", "1.5GB"), ("limits.memory", "512M"), ("limits.memory", "lots"), ("limits.memory", "0"),
    ("limits.memory", "150%"), ("limits.memory", "-5MB"), ("limits.memory", "1KB"),
    ("limits.memory.enforce", "medium"), ("limits.memory.swap", "maybe"), ("limits.processes", "0"),
    ("limits.processes", "ten"), ("boot.autostart", "sometimes"), ("boot.autostart.delay", "-1"),
    ("boot.autostart.priority", "high"), ("security.privileged", "2"), ("security.idmap.size", "0"),
    ("security.idmap.base", "-1"),
    ("raw.lxc", "lxc.idmap = u 0 0 65536"), ("raw.lxc", "lxc.rootfs.path = dir:/"),
    ("raw.lxc", "lxc.uts.name = evil"), ("raw.lxc", "lxc.log.file = /etc/shadow"),
    ("raw.lxc", "lxc.init.cmd = /bin/sh"), ("raw.lxc", "lxc.include = /tmp/x"), ("raw.lxc", "not a line"),
    ("raw.lxc", "foo.bar = 1"), ("raw.lxc", "lxc.console.logfile = /x"), ("raw.lxc", "lxc.namespace.keep = user"),
    ("raw.idmap", "both 1000"), ("raw.idmap", "user 1 1"), ("raw.idmap", "uid 1-5 1-3"),
    ("environment.X", "a\nlxc.idmap = u 0 0 1"),
    ("limits.kernel.nofile", "lots"), ("limits.kernel.nofile", "10:5"), ("limits.kernel.bogus", "1"),
])
def test_bad_values_name_the_key(key, value):
    with pytest.raises(BadRequest) as e:
        cfg.validate_config({key: value})
    assert e.value.status == 400
    assert key in e.value.message


@pytest.mark.parametrize("key", ["limits.bogus", "foo", "security.yolo", "environment.", "user.", "boot", "limits"])
def test_unknown_keys(key):
    with pytest.raises(BadRequest) as e:
        cfg.validate_config({key: "1"})
    assert "Invalid config key" in e.value.message and repr(key) in e.value.message


def test_values_must_be_strings():
    with pytest.raises(BadRequest):
        cfg.validate_config({"limits.processes": 5})


def test_volatile_refused_on_profiles():
    cfg.validate_config({"volatile.foo": "1"})
    with pytest.raises(BadRequest) as e:
        cfg.validate_config({"volatile.foo": "1"}, profile=True)
    assert "Volatile keys can only be set on instances" in e.value.message


def test_check_expanded_cross_keys():
    cfg.check_expanded({"security.idmap.isolated": "true", "security.idmap.base": "2000000"})
    cfg.check_expanded({"security.idmap.base": "2000000"})  # ignored without isolated, as in LXD
    with pytest.raises(BadRequest):
        cfg.check_expanded({"security.idmap.base": str(2 ** 32 - 10), "security.idmap.size": "65536"})
    with pytest.raises(BadRequest):
        cfg.check_expanded({"limits.memory": "1XB"})


def test_parsers():
    assert cfg.parse_limits_cpu("2") == (2, None)
    assert cfg.parse_limits_cpu("0-1,3") == (None, [0, 1, 3])
    assert cfg.parse_cpu_allowance("50%") == (50, None)
    assert cfg.parse_cpu_allowance("25ms/100ms") == (None, (25000, 100000))
    assert cfg.parse_memory("50%", total=1000) == 500
    assert cfg.parse_memory("1GiB") == 1024 ** 3
    assert cfg.parse_memory("1GB") == 10 ** 9
    assert cfg.parse_prlimit("5") == ("5", "5")
    assert cfg.parse_prlimit("5:unlimited") == ("5", "unlimited")


def test_key_table_live_kinds():
    for key, spec in cfg.KEYS.items():
        assert spec.live in (None, *cfg.LIVE_KINDS), key
    assert cfg.KEYS["limits.memory"].live == "cgroup"
    assert cfg.KEYS["security.privileged"].live is None
    assert cfg.lookup("user.foo").live == "none"
    assert cfg.needs_restart({"security.nesting": "true"}, {}) == {"security.nesting"}
    assert cfg.needs_restart({"limits.memory": "1GB"}, {"limits.memory": "2GB", "user.a": "b"}) == set()


def test_defaults():
    assert cfg.get({}, "limits.memory.enforce") == "hard"
    assert cfg.get({"limits.memory.enforce": "soft"}, "limits.memory.enforce") == "soft"
    assert cfg.get_bool({}, "security.privileged") is False
    assert cfg.get_bool({"security.privileged": "yes"}, "security.privileged") is True


def test_expand_profiles_in_order_then_local():
    profiles = [
        {"config": {"limits.memory": "1GB", "user.a": "p1"},
         "devices": {"root": {"type": "disk", "path": "/", "pool": "default"},
                     "data": {"type": "disk", "source": "/srv", "path": "/srv"}}},
        {"config": {"user.a": "p2", "user.b": "p2"}, "devices": {"data": {"type": "disk", "source": "/opt", "path": "/srv"}}},
    ]
    config, devices = cfg.expand(profiles, {"user.b": "local"}, {"extra": {"type": "unix-char", "path": "/dev/null"}})
    assert config == {"limits.memory": "1GB", "user.a": "p2", "user.b": "local"}
    assert devices["data"]["source"] == "/opt"
    assert set(devices) == {"root", "data", "extra"}


def test_expand_none_masks_inherited_device():
    profiles = [{"config": {}, "devices": {"root": {"type": "disk", "path": "/", "pool": "default"},
                                             "data": {"type": "disk", "source": "/srv", "path": "/srv"}}},
                {"config": {}, "devices": {"data": {"type": "none"}}}]
    _, devices = cfg.expand(profiles, {}, {})
    assert "data" not in devices and "root" in devices
    _, devices = cfg.expand(profiles[:1], {}, {"root": {"type": "none"}})
    assert devices == {"data": {"type": "disk", "source": "/srv", "path": "/srv"}}


def test_expand_does_not_alias_inputs():
    prof = {"config": {}, "devices": {"d": {"type": "disk", "source": "/a", "path": "/b"}}}
    _, devices = cfg.expand([prof], {}, {})
    devices["d"]["path"] = "/changed"
    assert prof["devices"]["d"]["path"] == "/b"
