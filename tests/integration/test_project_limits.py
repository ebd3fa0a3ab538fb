"""Limits and restrictions of the `default` project (projects/policy.py), through the stock client.

Project config is server-wide state: this module runs a daemon of its own (module-scoped), and
every test unsets what it set. Containers are only created (`lxc init`), never started.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tests.helpers import Daemon, btrfs_pool_of, module_daemon, run_prefix

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    yield from module_daemon(tmp_path_factory, "lxdproj")


@pytest.fixture
def clean(d):
    """Names for this test; the project config and the default profile as they were, after it."""
    prefix = run_prefix()
    made: list[str] = []
    before = d.api("GET", "/1.0/projects/default").json()["metadata"]["config"]
    profile = d.api("GET", "/1.0/profiles/default").json()["metadata"]

    def make(suffix: str) -> str:
        made.append(f"{prefix}-{suffix}")
        return made[-1]

    yield make
    for n in made:
        d.lxc("delete", "-f", n, check=False)
        d.lxc("profile", "delete", n, check=False)
    r = d.api("PUT", "/1.0/projects/default", json={"config": before, "description": "Default LXD project"})
    assert r.status_code == 200, r.text
    r = d.api("PUT", "/1.0/profiles/default", json={"config": profile["config"], "devices": profile["devices"],
                                                     "description": profile["description"]})
    assert r.status_code == 200, r.text


def fails(d: Daemon, *args: str) -> str:
    r = d.lxc(*args, check=False)
    assert r.returncode != 0, f"lxc {' '.join(args)} succeeded: {r.stdout}"
    return r.stderr


def state(d: Daemon) -> dict:
    r = d.api("GET", "/1.0/projects/default/state")
    assert r.status_code == 200, r.text
    return r.json()["metadata"]["resources"]


def test_limits_instances_refuses_the_third(d, clean):
    a, b, c = clean("a"), clean("b"), clean("c")
    d.lxc("project", "set", "default", "limits.instances", "2")
    assert d.lxc("project", "get", "default", "limits.instances").stdout.strip() == "2"
    d.lxc("init", "busybox", a)
    d.lxc("init", "busybox", b)
    err = fails(d, "init", "busybox", c)
    assert 'Reached maximum number of instances in project "default"' in err
    err = fails(d, "copy", a, c)
    assert 'Reached maximum number of instances in project "default"' in err
    assert d.api("GET", f"/1.0/instances/{c}").status_code == 404
    res = state(d)
    assert res["instances"] == {"limit": 2, "usage": 2}
    assert res["containers"] == {"limit": -1, "usage": 2}
    assert set(res) == {"containers", "cpu", "disk", "instances", "memory", "networks", "processes",
                        "virtual-machines"}
    out = d.lxc("project", "info", "default").stdout
    assert "INSTANCES" in out and "UNLIMITED" in out
    row = next(line for line in out.splitlines() if "INSTANCES" in line)
    assert "| 2 " in row.replace("  ", " ")
    # Below the usage: refused, with the usage in the message.
    err = fails(d, "project", "set", "default", "limits.instances", "1")
    assert '"limits.instances" is too low: there currently are 2 total instances' in err
    err = fails(d, "project", "set", "default", "limits.containers", "1")
    assert "there currently are 2 instances of type container" in err
    # Unset restores everything.
    d.lxc("project", "unset", "default", "limits.instances")
    d.lxc("init", "busybox", c)
    assert state(d)["instances"] == {"limit": -1, "usage": 3}


def test_limits_containers_and_aggregates(d, clean):
    a, b = clean("a"), clean("b")
    d.lxc("project", "set", "default", "limits.containers", "1")
    d.lxc("init", "busybox", a, "-c", "limits.cpu=1", "-c", "limits.memory=64MiB", "-c", "limits.processes=50")
    err = fails(d, "init", "busybox", b)
    assert 'Reached maximum number of instances of type "container" in project "default"' in err
    d.lxc("project", "unset", "default", "limits.containers")
    # limits.cpu needs every instance to have one.
    d.lxc("project", "set", "default", "limits.cpu", "2")
    err = fails(d, "init", "busybox", b)
    assert f'Instance "{b}" in project "default" has no "limits.cpu" config' in err
    d.lxc("init", "busybox", b, "-c", "limits.cpu=1")
    err = fails(d, "config", "set", b, "limits.cpu", "2")
    assert 'Reached maximum aggregate value "2" for "limits.cpu" in project "default"' in err
    assert state(d)["cpu"] == {"limit": 2, "usage": 2}
    err = fails(d, "project", "set", "default", "limits.cpu", "1")
    assert '"limits.cpu" is too low: current total is "2"' in err
    d.lxc("project", "unset", "default", "limits.cpu")
    d.lxc("config", "set", b, "limits.memory", "64MiB")
    err = fails(d, "project", "set", "default", "limits.memory", "100MiB")
    assert '"limits.memory" is too low: current total is "128.0MiB"' in err
    d.lxc("project", "set", "default", "limits.memory", "128MiB")
    assert state(d)["memory"] == {"limit": 128 * 2 ** 20, "usage": 128 * 2 ** 20}
    err = fails(d, "config", "set", a, "limits.memory", "65MiB")
    assert "limits.memory" in err and "Reached maximum aggregate value" in err


def test_bad_and_unsupported_keys_are_refused(d, clean):
    assert 'Invalid project configuration key "limits.foo"' in fails(d, "project", "set", "default",
                                                                     "limits.foo", "1")
    assert 'Invalid project configuration key "limits.instances" value' in fails(
        d, "project", "set", "default", "limits.instances", "abc")
    assert "not one of" in fails(d, "project", "set", "default", "restricted.containers.privilege", "root")
    assert "is not supported by this server yet" in fails(d, "project", "set", "default",
                                                          "images.compression_algorithm", "xz")
    assert "You can't change the features of the default project" in fails(
        d, "project", "set", "default", "features.images", "false")
    cfg = d.api("GET", "/1.0/projects/default").json()["metadata"]["config"]
    assert "limits.disk" not in cfg and cfg["features.images"] == "true"
    # user.* keys are free
    d.lxc("project", "set", "default", "user.team", "blue")
    assert d.lxc("project", "get", "default", "user.team").stdout.strip() == "blue"


def test_restricted_refuses_escapes_on_every_path(d, clean, tmp_path):
    ok, ok2, bad = clean("ok"), clean("ok2"), clean("bad")
    prof = clean("p")
    host = tmp_path / "shared"
    host.mkdir()
    (tmp_path / "other").mkdir()
    d.lxc("init", "busybox", ok)
    d.lxc("profile", "create", prof)
    d.lxc("project", "set", "default", "restricted", "true")
    d.lxc("project", "set", "default", "restricted.devices.disk", "allow")
    d.lxc("project", "set", "default", "restricted.devices.disk.paths", str(host))
    escapes = (("security.privileged", "true", "Privileged containers are forbidden"),
               ("security.nesting", "true", "Container nesting is forbidden"),
               ("raw.lxc", "lxc.apparmor.profile=unconfined", 'Use of low-level config "raw.lxc"'),
               ("raw.idmap", "both 1000 1000", 'Use of low-level "raw.idmap" element 0'))
    for key, value, msg in escapes:
        # create
        err = fails(d, "init", "busybox", bad, "-c", f"{key}={value}")
        assert msg in err and "Failed checking if instance creation allowed" in err, err
        # config set (PUT of the instance)
        err = fails(d, "config", "set", ok, key, value)
        assert msg in err and "Failed checking if instance update allowed" in err, err
        # profile set
        err = fails(d, "profile", "set", prof, key, value)
        assert msg in err and "Failed checking if profile update allowed" in err, err
        # copy with the key given
        err = fails(d, "copy", ok, bad, "-c", f"{key}={value}")
        assert msg in err, err
    # A disk of a host path outside restricted.devices.disk.paths (one inside is fine): through
    # create and copy (the API: `lxc init` can't add devices), config and profile devices.
    outside = str(tmp_path / "other")
    disk = {"type": "disk", "source": outside, "path": "/mnt"}
    for source in ({"type": "image", "alias": "busybox"}, {"type": "copy", "source": ok}):
        r = d.api("POST", "/1.0/instances", json={"name": bad, "source": source, "devices": {"h": disk}})
        assert r.status_code == 400, r.text
        assert f'Disk source path \"{outside}\" not allowed' in r.text or "not allowed" in r.json()["error"]
    err = fails(d, "config", "device", "add", ok, "h", "disk", f"source={outside}", "path=/mnt")
    assert f'Disk source path "{outside}" not allowed' in err, err
    err = fails(d, "profile", "device", "add", prof, "h", "disk", f"source={outside}", "path=/mnt")
    assert "not allowed" in err and "profile update" in err, err
    d.lxc("config", "device", "add", ok, "h", "disk", f"source={host}", "path=/mnt")
    d.lxc("copy", ok, ok2)  # a copy of an allowed instance is allowed
    assert d.api("GET", f"/1.0/instances/{bad}").status_code == 404
    # Snapshots and backups are blocked by default in a restricted project.
    assert "doesn't allow for snapshot creation" in fails(d, "snapshot", ok)
    assert "doesn't allow for backup creation" in fails(d, "export", ok, str(tmp_path / "b.tar.gz"))
    out = d.lxc("project", "info", "default").stdout
    assert "INSTANCES" in out
    # Setting a restriction that what exists violates is refused, naming it.
    d.lxc("project", "unset", "default", "restricted")
    d.lxc("config", "set", ok2, "security.nesting", "true")
    err = fails(d, "project", "set", "default", "restricted", "true")
    assert 'Conflict detected when changing "restricted" in project "default"' in err
    assert "Container nesting is forbidden" in err
    # Unset restores everything.
    for key in ("restricted.devices.disk", "restricted.devices.disk.paths"):
        d.lxc("project", "unset", "default", key)
    d.lxc("config", "set", ok, "security.privileged", "true")
    d.lxc("profile", "set", prof, "raw.lxc", "lxc.apparmor.profile=unconfined")
    d.lxc("snapshot", ok)
    d.lxc("init", "busybox", bad, "-c", "security.nesting=true")
    cfg = d.api("GET", "/1.0/projects/default").json()["metadata"]["config"]
    assert not any(k.startswith("restricted") for k in cfg)


def test_limits_instances_holds_under_concurrent_creates(d, clean):
    """Four creates at once against limits.instances=2: exactly two pass (check and claim are
    one step), the others are refused naming the limit."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.helpers import wait_op

    names = [clean(f"r{i}") for i in range(4)]
    d.lxc("project", "set", "default", "limits.instances", "2")

    def create(n: str) -> tuple[int, str]:
        r = d.api("POST", "/1.0/instances", json={"name": n, "source": {"type": "image", "alias": "busybox"}})
        if r.status_code != 202:
            return r.status_code, r.json()["error"]
        op = wait_op(d, r)
        return (200 if op["status_code"] == 200 else 500), op.get("err", "")

    with ThreadPoolExecutor(4) as ex:
        results = list(ex.map(create, names))
    assert sorted(code for code, _ in results) == [200, 200, 400, 400], results
    assert all('Reached maximum number of instances in project "default"' in err
               for code, err in results if code == 400), results
    assert state(d)["instances"] == {"limit": 2, "usage": 2}


def test_restricted_refuses_restoring_an_older_escape(d, clean):
    """A snapshot taken before the project was restricted can't bring a refused key back."""
    c = clean("s")
    d.lxc("init", "busybox", c, "-c", "security.privileged=true")
    d.lxc("snapshot", c, "snap0")
    d.lxc("config", "unset", c, "security.privileged")
    d.lxc("project", "set", "default", "restricted", "true")
    d.lxc("project", "set", "default", "restricted.snapshots", "allow")
    err = fails(d, "restore", c, "snap0")
    assert "Privileged containers are forbidden" in err, err
    assert d.lxc("config", "get", c, "security.privileged").stdout.strip() == ""
    d.lxc("snapshot", c, "snap1")  # allowed by restricted.snapshots=allow
    d.lxc("restore", c, "snap1")


# -- limits.disk, custom volume snapshots, limits.networks -------------------------------------------
MiB = 2 ** 20


@pytest.fixture(scope="module")
def bt(d):
    """A btrfs pool of this module's daemon (sized custom volumes need quotas; dir has none here)."""
    yield from btrfs_pool_of(d, f"{run_prefix()}-pbt", "512MiB")


@pytest.fixture
def vols(d):
    """(pool, name) of custom volumes to delete after the test."""
    made: list[tuple[str, str]] = []
    yield made
    for pool, v in reversed(made):
        d.lxc("storage", "volume", "delete", pool, v, check=False)


def test_limits_disk(d, clean, bt, vols, tmp_path):
    a, c = clean("a"), clean("c")
    v0, v1, v2, v3, v4 = (f"{run_prefix()}-v{i}" for i in range(5))
    vols.extend([("default", v0), (bt, v1), (bt, v2), (bt, v3), (bt, v4)])
    # Setting it needs every instance and custom volume to have a size (as LXD), and the total under it.
    d.lxc("init", "busybox", a)
    err = fails(d, "project", "set", "default", "limits.disk", "1GiB")
    assert f'Instance "{a}" in project "default" has no "size" config set on the root device' in err, err
    d.lxc("delete", a)
    d.lxc("storage", "volume", "create", "default", v0)
    err = fails(d, "project", "set", "default", "limits.disk", "1GiB")
    assert f'Custom volume "{v0}" in project "default" has no "size" config set' in err, err
    d.lxc("storage", "volume", "delete", "default", v0)
    d.lxc("storage", "volume", "create", bt, v1, "size=60MiB")
    err = fails(d, "project", "set", "default", "limits.disk", "50MiB")
    assert '"limits.disk" is too low: current total is "60.0MiB"' in err, err
    d.lxc("project", "set", "default", "limits.disk", "100MiB")
    assert state(d)["disk"] == {"limit": 100 * MiB, "usage": 60 * MiB}

    # Custom volumes: create, update, copy, import.
    err = fails(d, "storage", "volume", "create", bt, v2, "size=50MiB")
    assert ('Failed checking if volume creation allowed: Reached maximum aggregate value "100MiB" for '
            '"limits.disk" in project "default"') in err, err
    err = fails(d, "storage", "volume", "create", "default", v0)  # no size: refused before the driver runs
    assert f'Custom volume "{v0}" in project "default" has no "size" config set' in err, err
    err = fails(d, "storage", "volume", "set", bt, v1, "size=120MiB")
    assert "Failed checking if volume update allowed: Reached maximum aggregate value" in err, err
    assert d.lxc("storage", "volume", "get", bt, v1, "size").stdout.strip() == "60MiB"
    d.lxc("storage", "volume", "set", bt, v1, "size=40MiB")
    d.lxc("storage", "volume", "create", bt, v2, "size=50MiB")
    assert state(d)["disk"] == {"limit": 100 * MiB, "usage": 90 * MiB}
    err = fails(d, "storage", "volume", "copy", f"{bt}/{v1}", f"{bt}/{v3}")
    assert "Failed checking if volume creation allowed: Reached maximum aggregate value" in err, err
    out = tmp_path / "v1.tar.gz"
    d.lxc("storage", "volume", "export", bt, v1, str(out))
    err = fails(d, "storage", "volume", "import", bt, str(out), v4)
    assert "Failed checking if volume creation allowed: Reached maximum aggregate value" in err, err
    for v in (v0, v3, v4):
        assert d.api("GET", f"/1.0/storage-pools/{bt}/volumes/custom/{v}").status_code == 404
    assert state(d)["disk"]["usage"] == 90 * MiB

    # Instances: the root disk's size counts (refused before anything is made).
    err = fails(d, "init", "busybox", c)
    assert f'Instance "{c}" in project "default" has no "size" config set on the root device' in err, err
    err = fails(d, "init", "busybox", c, "-s", bt, "-d", "root,size=20MiB")
    assert ('Failed checking if instance creation allowed: Reached maximum aggregate value "100MiB" for '
            '"limits.disk"') in err, err
    # Freed space is usable again; unset lifts it.
    d.lxc("storage", "volume", "delete", bt, v2)
    d.lxc("storage", "volume", "copy", f"{bt}/{v1}", f"{bt}/{v3}")
    assert state(d)["disk"]["usage"] == 80 * MiB
    d.lxc("init", "busybox", c, "-s", bt, "-d", "root,size=20MiB")  # exactly at the limit
    assert state(d)["disk"] == {"limit": 100 * MiB, "usage": 100 * MiB}
    err = fails(d, "config", "device", "set", c, "root", "size=30MiB")
    assert "Failed checking if instance update allowed: Reached maximum aggregate value" in err, err
    d.lxc("delete", c)
    d.lxc("project", "unset", "default", "limits.disk")
    d.lxc("storage", "volume", "create", "default", v0)
    assert state(d)["disk"] == {"limit": -1, "usage": 80 * MiB}


def test_restricted_snapshots_of_custom_volumes(d, clean, vols):
    v = f"{run_prefix()}-sv"
    vols.append(("default", v))
    base = f"/1.0/storage-pools/default/volumes/custom/{v}"
    d.lxc("storage", "volume", "create", "default", v, "snapshots.schedule=0 * * * *")
    d.lxc("project", "set", "default", "restricted", "true")
    err = fails(d, "storage", "volume", "snapshot", "default", v, "s0")
    assert 'Project "default" doesn\'t allow for snapshot creation' in err, err
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)

    def tick(at: datetime) -> dict:
        r = d.api("POST", "/internal/storage-volumes/snapshots/tick", json={"now": at.strftime("%Y-%m-%dT%H:%M:%SZ")})
        assert r.status_code == 200, r.text
        return r.json()["metadata"]

    assert tick(hour)["created"] == []  # the scheduled one is refused too
    assert d.api("GET", f"{base}/snapshots").json()["metadata"] == []
    d.lxc("project", "set", "default", "restricted.snapshots", "allow")
    d.lxc("storage", "volume", "snapshot", "default", v, "s0")
    assert len(tick(hour + timedelta(hours=1))["created"]) == 1
    assert len(d.api("GET", f"{base}/snapshots").json()["metadata"]) == 2


def test_limits_networks(net_daemon):
    """On a daemon in a network namespace of its own (the bridge is made there)."""
    d = net_daemon
    n1, n2 = f"{run_prefix()[:6]}n1", f"{run_prefix()[:6]}n2"
    have = sum(1 for n in d.api("GET", "/1.0/networks?recursion=1").json()["metadata"] if n["managed"])
    try:
        d.lxc("project", "set", "default", "limits.networks", str(have + 1))
        d.lxc("network", "create", n1, "ipv4.address=none", "ipv6.address=none")
        err = fails(d, "network", "create", n2, "ipv4.address=none", "ipv6.address=none")
        assert "Networks limit has been reached for project" in err, err
        assert d.api("GET", f"/1.0/networks/{n2}").status_code == 404
        res = d.api("GET", "/1.0/projects/default/state").json()["metadata"]["resources"]
        assert res["networks"] == {"limit": have + 1, "usage": have + 1}
        err = fails(d, "project", "set", "default", "limits.networks", str(have))
        assert f'"limits.networks" is too low: there currently are {have + 1} networks' in err, err
    finally:
        d.lxc("project", "unset", "default", "limits.networks", check=False)
        d.lxc("network", "delete", n1, check=False)
    d.lxc("network", "create", n2, "ipv4.address=none", "ipv6.address=none")
    d.lxc("network", "delete", n2)


def test_limits_disk_holds_under_concurrent_volume_creates(d, clean, bt, vols):
    """Four 10MiB volumes at once against room for two: exactly two are made (the check and the
    count are one step)."""
    from concurrent.futures import ThreadPoolExecutor

    names = [f"{run_prefix()}-cv{i}" for i in range(4)]
    vols.extend((bt, n) for n in names)
    d.lxc("project", "set", "default", "limits.disk", "20MiB")

    def create(n: str) -> tuple[int, str]:
        r = d.api("POST", f"/1.0/storage-pools/{bt}/volumes/custom", json={"name": n, "config": {"size": "10MiB"}})
        return r.status_code, r.json().get("error", "")

    with ThreadPoolExecutor(4) as ex:
        results = list(ex.map(create, names))
    assert sorted(code for code, _ in results) == [201, 201, 400, 400], results
    assert all("Reached maximum aggregate value" in err for code, err in results if code == 400), results
    assert state(d)["disk"] == {"limit": 20 * MiB, "usage": 20 * MiB}
