import pytest

from lxd_daemon import devices as devs
from lxd_daemon.errors import BadRequest

ROOT = {"type": "disk", "path": "/", "pool": "default"}


@pytest.mark.parametrize("dev", [
    ROOT,
    {**ROOT, "size": "10GiB"},
    {"type": "disk", "source": "/srv/data", "path": "/data"},
    {"type": "disk", "source": "/srv/data", "path": "/data", "readonly": "true", "recursive": "true",
     "propagation": "rslave", "shift": "true", "optional": "true"},
    {"type": "disk", "source": "/srv/data", "path": "/data", "required": "false"},
    {"type": "unix-char", "path": "/dev/null2", "major": "1", "minor": "3"},
    {"type": "unix-char", "source": "/dev/null"},
    {"type": "unix-block", "path": "/dev/loop9", "uid": "1000", "gid": "1000", "mode": "0600", "required": "false"},
    {"type": "none"},
    {"type": "disk", "pool": "default", "source": "vol1", "path": "/data", "readonly": "true"},
    {"type": "disk", "pool": "default", "source": "custom/vol1", "path": "/data"},
    {"type": "disk", "source": "/dev/loop0", "path": "/mnt/blk"},
])
def test_valid_devices(dev):
    devs.validate_devices({"d": dev})


@pytest.mark.parametrize("dev,fragment", [
    ({"type": "nic", "nictype": "bridged"}, "bridged nics need a parent"),
    ({"type": "gpu"}, "gpu devices are not supported"),
    ({"type": "floppy"}, "unknown device type 'floppy'"),
    ({"path": "/x"}, "missing device type"),
    ({"type": "disk", "path": "/", "pool": "default", "source": "/x"}, "root disk cannot have a source"),
    ({"type": "disk", "path": "/"}, "root disk needs a pool"),
    ({"type": "disk", "path": "/", "pool": "default", "readonly": "true"}, "'readonly'"),
    ({"type": "disk", "source": "/srv"}, "need a path"),
    ({"type": "disk", "path": "/data"}, "need a source"),
    ({"type": "disk", "path": "data", "source": "/srv"}, "'path'"),
    ({"type": "disk", "path": "/data", "source": "srv"}, "absolute host path"),
    ({"type": "disk", "path": "/data", "source": "/srv", "size": "1GB"}, "size is only supported on the root disk"),
    ({"type": "disk", "path": "/data", "source": "/srv", "pool": "default"}, "cannot be specified as absolute paths"),
    ({"type": "disk", "path": "/data", "source": "vol1", "pool": "default", "shift": "true"}, "security.shifted"),
    ({"type": "disk", "path": "/data", "source": "container/c1", "pool": "default"}, "instance storage volumes"),
    ({"type": "disk", "path": "/data", "source": "image/abc", "pool": "default"}, "image storage volumes"),
    ({"type": "disk", "path": "/data", "source": "vol1/snap0", "pool": "default"}, "snapshots"),
    ({"type": "disk", "path": "/data", "source": "custom/vol1/snap0", "pool": "default"}, "snapshots"),
    ({"type": "disk", "path": "/data", "source": "/srv", "readonly": "perhaps"}, "'readonly'"),
    ({"type": "disk", "path": "/data", "source": "/srv", "propagation": "rweird"}, "'propagation'"),
    ({"type": "disk", "path": "/data", "source": "/srv", "colour": "red"}, "'colour'"),
    ({"type": "disk", "path": "/", "pool": "default", "size": "big"}, "'size'"),
    ({"type": "unix-char"}, "need a path or a source"),
    ({"type": "unix-char", "path": "/dev/x", "major": "1"}, "major and minor"),
    ({"type": "unix-char", "path": "/dev/x", "major": "a", "minor": "1"}, "'major'"),
    ({"type": "unix-char", "path": "/dev/x", "mode": "0999"}, "'mode'"),
    ({"type": "unix-char", "path": "/dev/x", "uid": "-1"}, "'uid'"),
    ({"type": "unix-block", "path": "/"}, "invalid path"),
    ({"type": "unix-char", "path": "/dev/x", "readonly": "true"}, "'readonly'"),
])
def test_invalid_devices(dev, fragment):
    with pytest.raises(BadRequest) as e:
        devs.validate_devices({"mydev": dev})
    assert e.value.status == 400
    assert fragment in e.value.message
    assert "'mydev'" in e.value.message


def test_values_must_be_strings():
    with pytest.raises(BadRequest):
        devs.validate_devices({"d": {"type": "disk", "source": "/srv", "path": "/d", "readonly": True}})


@pytest.mark.parametrize("name", ["", "a/b", "../x", "-x", "x" * 65])
def test_bad_device_names(name):
    with pytest.raises(BadRequest):
        devs.validate_devices({name: {"type": "none"}})


def test_pool_must_exist_when_known():
    devs.validate_devices({"root": ROOT}, pools={"default"})
    with pytest.raises(BadRequest) as e:
        devs.validate_devices({"root": {**ROOT, "pool": "nope"}}, pools={"default"})
    assert "'nope'" in e.value.message


def test_one_root_disk_and_distinct_paths():
    with pytest.raises(BadRequest, match="more than one root disk"):
        devs.validate_devices({"root": ROOT, "root2": dict(ROOT)})
    with pytest.raises(BadRequest, match="already used"):
        devs.validate_devices({"a": {"type": "disk", "source": "/a", "path": "/data"},
                               "b": {"type": "disk", "source": "/b", "path": "/data/"}})


def test_helpers():
    assert devs.is_root_disk(ROOT)
    assert not devs.is_root_disk({"type": "disk", "source": "/x", "path": "/"})
    assert devs.root_disk({"a": {"type": "none"}, "root": ROOT}) == ("root", ROOT)
    assert devs.container_path({"path": "//dev/../dev/x/"}) == "/dev/x"
    assert devs.container_path({"source": "/dev/null"}) == "/dev/null"
    assert devs.disk_required({}) is True
    assert devs.disk_required({"optional": "true"}) is False
    assert devs.disk_required({"required": "false"}) is False
