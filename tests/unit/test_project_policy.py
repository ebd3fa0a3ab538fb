"""projects/policy.py: LXD 5.0.2's project limits and restrictions, as pure checks."""

from __future__ import annotations

import pytest

from lxd_daemon.errors import BadRequest
from lxd_daemon.projects import policy
from lxd_daemon.projects.policy import Change, Entity, PolicyError

P = "default"
FEATURES = {k: "true" for k in policy.FEATURES}
ROOT = {"root": {"type": "disk", "path": "/", "pool": "default"}}


def inst(name: str, devices: dict | None = None, **config: str) -> Entity:
    return Entity(name, {k.replace("_", "."): v for k, v in config.items()}, {**ROOT, **(devices or {})})


def create(e: Entity, local: dict | None = None, strip: bool = False) -> Change:
    return Change("create", e, local=local if local is not None else dict(e.config), strip=strip)


# -- the key table ---------------------------------------------------------------------------------
@pytest.mark.parametrize("config,msg", [
    ({"limits.foo": "1"}, 'Invalid project configuration key "limits.foo"'),
    ({"limits.instances": "x"}, 'Invalid project configuration key "limits.instances" value: Invalid value for uint32'),
    ({"limits.memory": "1GB%"}, 'Invalid project configuration key "limits.memory" value'),
    ({"restricted": "maybe"}, 'Invalid value for a boolean "maybe"'),
    ({"restricted.containers.privilege": "root"}, 'Invalid value "root" (not one of [allow unprivileged isolated])'),
    ({"restricted.devices.nic": "x"}, "(not one of [block allow managed])"),
    ({"restricted.devices.disk.paths": "/a,b"}, "Item 'b': Must be absolute file path"),
    ({"restricted.idmap.uid": "5-1"}, "Start number must be lower than end number"),
    ({"images.compression_algorithm": "xz"}, 'Project configuration key "images.compression_algorithm" is not '
                                             'supported by this server yet'),
    ({"restricted.cluster.target": "maybe"}, "(not one of [block allow])"),
    ({"restricted.networks.subnets": "br0"}, "expected UPLINK:CIDR"),
    ({"restricted.networks.subnets": "br0:10.0.0.0/33"}, "is not a CIDR subnet"),
    ({"limits.disk": "lots"}, 'Invalid project configuration key "limits.disk" value'),
    ({"limits.networks": "-1"}, 'Invalid project configuration key "limits.networks" value'),
])
def test_validate_refuses(config, msg):
    with pytest.raises(BadRequest) as e:
        policy.validate_config({**FEATURES, **config}, FEATURES)
    assert msg in e.value.message


def test_validate_accepts_and_features_are_fixed_on_default():
    ok = {**FEATURES, "limits.instances": "3", "limits.cpu": "4", "limits.memory": "1GiB", "restricted": "true",
          "restricted.devices.disk.paths": "/srv,/data", "restricted.idmap.uid": "1000-1999,5000",
          "user.owner": "x", "limits.virtual-machines": "0", "restricted.devices.gpu": "allow",
          "limits.disk": "10GiB", "limits.networks": "2", "restricted.cluster.target": "allow",
          "restricted.networks.uplinks": "br0", "restricted.networks.subnets": "br0:10.1.0.0/24,br0:fd00::/64"}
    policy.validate_config(ok, FEATURES)
    with pytest.raises(BadRequest, match="You can't change the features of the default project"):
        policy.validate_config({**FEATURES, "features.images": "false"}, FEATURES)
    with pytest.raises(BadRequest, match="You can't change the features"):
        policy.validate_config({}, FEATURES)  # a PUT leaving them out changes them too
    # An unsupported key already stored (none can be) would not block other changes.
    policy.validate_config({**FEATURES, "restricted": "true"}, {**FEATURES})


# -- counts and aggregates -------------------------------------------------------------------------
def test_counts():
    cfg = {"limits.instances": "2"}
    policy.check(P, cfg, [inst("a")], [], create(inst("b")))
    with pytest.raises(PolicyError, match='Reached maximum number of instances in project "default"'):
        policy.check(P, cfg, [inst("a"), inst("b")], [], create(inst("c")))
    with pytest.raises(PolicyError, match='instances of type "container" in project "default"'):
        policy.check(P, {"limits.containers": "1"}, [inst("a")], [], create(inst("c")))
    policy.check(P, {"limits.instances": "0"}, [], [], Change("update", inst("a"), local={}))  # updates aren't counted


def test_aggregates_need_every_instance_to_set_the_key():
    cfg = {"limits.cpu": "4"}
    with pytest.raises(PolicyError) as e:
        policy.check(P, cfg, [inst("a", limits_cpu="2")], [], create(inst("b")))
    assert e.value.message == ('Failed checking if instance creation allowed: Failed getting usage of project '
                               'entities: Instance "b" in project "default" has no "limits.cpu" config, '
                               'either directly or via a profile')
    policy.check(P, cfg, [inst("a", limits_cpu="2")], [], create(inst("b", limits_cpu="2")))
    with pytest.raises(PolicyError, match='Reached maximum aggregate value "4" for "limits.cpu"'):
        policy.check(P, cfg, [inst("a", limits_cpu="2")], [], create(inst("b", limits_cpu="3")))
    with pytest.raises(PolicyError, match='Failed parsing "limits.cpu" for instance "b"'):  # pinned CPUs
        policy.check(P, cfg, [], [], create(inst("b", limits_cpu="0-1")))
    mem = {"limits.memory": "1GiB"}
    with pytest.raises(PolicyError, match="Reached maximum aggregate value"):
        policy.check(P, mem, [inst("a", limits_memory="512MiB")], [],
                     Change("update", inst("a", limits_memory="2GiB"), local={}))
    with pytest.raises(PolicyError, match='Failed parsing "limits.memory" for instance "b"'):  # a percentage
        policy.check(P, mem, [], [], create(inst("b", limits_memory="50%")))


def test_project_update_below_usage():
    two = [inst("a", limits_memory="64MiB", limits_processes="10"), inst("b", limits_memory="64MiB",
                                                                         limits_processes="5")]
    with pytest.raises(PolicyError) as e:
        policy.check_project_update(P, {"limits.instances": "1"}, {}, two, [])
    assert e.value.message == ('Can\'t change limits.instances in project "default": "limits.instances" is too '
                               'low: there currently are 2 total instances in project "default"')
    with pytest.raises(PolicyError, match="there currently are 2 instances of type container"):
        policy.check_project_update(P, {"limits.containers": "1"}, {}, two, [])
    with pytest.raises(PolicyError, match='"limits.memory" is too low: current total is "128.0MiB"'):
        policy.check_project_update(P, {"limits.memory": "100MiB"}, {}, two, [])
    with pytest.raises(PolicyError, match='"limits.processes" is too low: current total is "15"'):
        policy.check_project_update(P, {"limits.processes": "14"}, {}, two, [])
    with pytest.raises(PolicyError, match='Instance "a" in project "default" has no "limits.cpu" config'):
        policy.check_project_update(P, {"limits.cpu": "8"}, {}, two, [])
    policy.check_project_update(P, {"limits.instances": "2", "limits.memory": "128MiB"}, {}, two, [])
    # Unsetting is always fine.
    policy.check_project_update(P, {}, {"limits.instances": "2"}, two, [])


def test_allocations():
    res = policy.allocations({"limits.instances": "5", "limits.memory": "1GiB"},
                             [inst("a", limits_memory="256MiB", limits_cpu="2"), inst("b")], 3)
    assert res["instances"] == {"limit": 5, "usage": 2}
    assert res["containers"] == {"limit": -1, "usage": 2}
    assert res["memory"] == {"limit": 2 ** 30, "usage": 256 * 2 ** 20}
    assert res["cpu"] == {"limit": -1, "usage": 2}
    assert res["networks"] == {"limit": -1, "usage": 3}
    assert res["virtual-machines"] == {"limit": -1, "usage": 0}
    assert set(res) == {"containers", "cpu", "disk", "instances", "memory", "networks", "processes",
                        "virtual-machines"}
    sized = Entity("s", {}, {"root": {"type": "disk", "path": "/", "pool": "default", "size": "1GiB"}})
    res = policy.allocations({}, [sized, inst("b")], 0, ["10MiB", ""])
    assert res["disk"] == {"limit": -1, "usage": 2 ** 30 + 10 * 2 ** 20}


def test_iec():
    assert policy.iec(512) == "512B"
    assert policy.iec(128 * 2 ** 20) == "128.0MiB"
    assert policy.iec(3 * 2 ** 30 // 2) == "1.5GiB"


# -- restrictions ----------------------------------------------------------------------------------
R = {"restricted": "true"}


@pytest.mark.parametrize("config,msg", [
    ({"security.privileged": "true"}, 'Invalid value "true" for config "security.privileged" on container "c" '
                                      'of project "default": Privileged containers are forbidden'),
    ({"security.nesting": "true"}, "Container nesting is forbidden"),
    ({"raw.lxc": "lxc.apparmor.profile=unconfined"},
     'Use of low-level config "raw.lxc" on container "c" of project "default" is forbidden'),
    ({"raw.apparmor": "x"}, 'Use of low-level config "raw.apparmor"'),
    ({"linux.kernel_modules": "nbd"}, 'Use of low-level config "linux.kernel_modules"'),
    ({"security.syscalls.intercept.mknod": "true"}, "Container syscall interception is forbidden"),
    ({"security.syscalls.intercept.sched_setscheduler": "true"}, "Use of low-level config"),
    ({"raw.idmap": "both 1000 1000"}, 'Use of low-level "raw.idmap" element 0 on container "c"'),
])
def test_restricted_config(config, msg):
    with pytest.raises(PolicyError) as e:
        policy.check(P, R, [], [], create(Entity("c", config, dict(ROOT))))
    assert e.value.message.startswith("Failed checking if instance creation allowed: ")
    assert msg in e.value.message
    # Unrestricted: all fine; restricted but allowed: fine.
    policy.check(P, {}, [], [], create(Entity("c", config, dict(ROOT))))
    allow = {**R, "restricted.containers.privilege": "allow", "restricted.containers.nesting": "allow",
             "restricted.containers.lowlevel": "allow", "restricted.containers.interception": "allow"}
    policy.check(P, allow, [], [], create(Entity("c", config, dict(ROOT))))


def test_raw_idmap_within_allowed_host_ranges():
    cfg = {**R, "restricted.idmap.uid": "1000-1999", "restricted.idmap.gid": "1000-1999"}
    policy.check(P, cfg, [], [], create(Entity("c", {"raw.idmap": "both 1000-1009 0-9"}, dict(ROOT))))
    with pytest.raises(PolicyError, match='"raw.idmap" element 1'):
        policy.check(P, cfg, [], [], create(Entity("c", {"raw.idmap": "uid 1000 0\ngid 2000 1"}, dict(ROOT))))


def test_isolated_privilege():
    cfg = {**R, "restricted.containers.privilege": "isolated"}
    with pytest.raises(PolicyError, match="Non-isolated containers are forbidden"):
        policy.check(P, cfg, [], [], create(Entity("c", {}, dict(ROOT))))
    policy.check(P, cfg, [], [], create(Entity("c", {"security.idmap.isolated": "true"}, dict(ROOT))))


@pytest.mark.parametrize("device,cfg,msg", [
    ({"type": "disk", "source": "/etc", "path": "/mnt"}, {}, "Attaching disks not backed by a pool is forbidden"),
    ({"type": "disk", "source": "/etc", "path": "/mnt"}, {"restricted.devices.disk": "block"},
     "Disk devices are forbidden"),
    ({"type": "disk", "source": "/srvx/a", "path": "/mnt"},
     {"restricted.devices.disk": "allow", "restricted.devices.disk.paths": "/srv"},
     'Disk source path "/srvx/a" not allowed'),
    ({"type": "disk", "source": "/srv/../etc", "path": "/mnt"},
     {"restricted.devices.disk": "allow", "restricted.devices.disk.paths": "/srv"},
     'Disk source path "/srv/../etc" not allowed'),
    ({"type": "nic", "nictype": "bridged", "parent": "br0"}, {}, "Only managed network devices are allowed"),
    ({"type": "nic", "network": "n1"}, {"restricted.devices.nic": "block"}, "Network devices are forbidden"),
    ({"type": "nic", "network": "n1"}, {"restricted.networks.access": "n2"}, "Network not allowed in project"),
    ({"type": "nic", "nictype": "bridged", "parent": "br0"}, {"restricted.devices.nic": "allow",
                                                              "restricted.networks.access": "n2"},
     "Network not allowed in project"),
    ({"type": "unix-char", "path": "/dev/zero"}, {}, "Unix character devices are forbidden"),
    ({"type": "unix-block", "path": "/dev/loop0"}, {}, "Unix block devices are forbidden"),
    ({"type": "unix-hotplug", "vendorid": "1"}, {}, "Unix hotplug devices are forbidden"),
    ({"type": "proxy", "listen": "tcp:0.0.0.0:80", "connect": "tcp:127.0.0.1:80"}, {}, "Proxy devices are forbidden"),
])
def test_restricted_devices(device, cfg, msg):
    e = Entity("c", {}, {**ROOT, "d0": device})
    with pytest.raises(PolicyError) as err:
        policy.check(P, {**R, **cfg}, [], [], create(e))
    assert f'Invalid device "d0" on container "c" of project "default": {msg}' in err.value.message


def test_restricted_devices_allowed():
    cfg = {**R, "restricted.devices.disk": "allow", "restricted.devices.disk.paths": "/srv,/data/x",
           "restricted.devices.proxy": "allow", "restricted.devices.unix-char": "allow"}
    devices = {**ROOT, "a": {"type": "disk", "source": "/srv", "path": "/a"},
               "b": {"type": "disk", "source": "/data/x/y/", "path": "/b"},
               "v": {"type": "disk", "pool": "default", "source": "vol", "path": "/v"},
               "n": {"type": "nic", "network": "lxdbr0"},
               "p": {"type": "proxy", "listen": "tcp:0.0.0.0:80", "connect": "tcp:127.0.0.1:80"},
               "z": {"type": "unix-char", "path": "/dev/zero"}}
    policy.check(P, cfg, [], [], create(Entity("c", {}, devices)))
    # managed (the default): a pool-backed disk is fine, the root disk always.
    policy.check(P, R, [], [], create(Entity("c", {}, {**ROOT, "v": devices["v"], "n": devices["n"]})))


def test_profiles_and_other_instances_are_checked_too():
    bad_profile = Entity("p", {"security.privileged": "true"}, {}, "profile")
    with pytest.raises(PolicyError, match='on profile "p" of project "default"'):
        policy.check(P, R, [], [bad_profile], create(inst("c")))
    # A profile update: the new profile (and instances expanded with it) are what is checked.
    good = Entity("p", {}, {}, "profile")
    change = Change("profile", profile=Entity("p", {"security.nesting": "true"}, {}, "profile"))
    with pytest.raises(PolicyError) as e:
        policy.check(P, R, [inst("c")], [good], change)
    assert e.value.message.startswith("Failed checking if profile update allowed: ")
    policy.check(P, R, [inst("c")], [good], Change("profile", profile=Entity("p", {"limits.cpu": "1"}, {}, "profile")))


def test_volatile_keys_need_lowlevel():
    cfg = {"limits.instances": "10"}
    with pytest.raises(PolicyError, match='Setting "volatile.eth0.name" on container "c" in project "default"'):
        policy.check(P, cfg, [], [], create(inst("c"), local={"volatile.eth0.name": "x"}))
    policy.check(P, cfg, [], [], create(inst("c"), local={"volatile.eth0.name": "x"}, strip=True))  # a copy
    policy.check(P, cfg, [], [], create(inst("c"), local={"volatile.base_image": "abc",
                                                          "volatile.eth0.hwaddr": "00:16:3e:00:00:01"}))
    cur = {"volatile.idmap.next": "[]"}
    policy.check(P, cfg, [inst("c")], [], Change("update", inst("c"), local=dict(cur), current=cur))
    with pytest.raises(PolicyError, match='Changing "volatile.idmap.next"'):
        policy.check(P, cfg, [inst("c")], [], Change("update", inst("c"), local={"volatile.idmap.next": "[1]"},
                                                     current=cur))
    # Without limits or restrictions nothing is checked (as LXD).
    policy.check(P, {}, [], [], create(inst("c"), local={"volatile.eth0.name": "x"}))


def test_project_update_restrictions():
    with pytest.raises(PolicyError) as e:
        policy.check_project_update(P, R, {}, [inst("c", security_nesting="true")], [])
    assert e.value.message.startswith('Conflict detected when changing "restricted" in project "default": '
                                      'Invalid value "true" for config "security.nesting"')
    # Restrictions of an unrestricted project don't apply (so they can be unset in any order).
    policy.check_project_update(P, {"restricted.devices.disk": "block"}, {}, [inst("c", security_nesting="true")], [])


def test_snapshots_and_backups():
    policy.snapshot_allowed(P, {})
    policy.backup_allowed(P, {"restricted.backups": "block"})
    with pytest.raises(PolicyError, match='Project "default" doesn\'t allow for snapshot creation'):
        policy.snapshot_allowed(P, R)
    with pytest.raises(PolicyError, match="doesn't allow for backup creation"):
        policy.backup_allowed(P, R)
    policy.snapshot_allowed(P, {**R, "restricted.snapshots": "allow"})
    policy.backup_allowed(P, {**R, "restricted.backups": "allow"})


def test_disk_path_prefixes():
    cfg = {"restricted.devices.disk.paths": "/srv/a,/data"}
    assert policy.disk_path_allowed(cfg, "/srv/a")
    assert policy.disk_path_allowed(cfg, "/srv/a/b/")
    assert not policy.disk_path_allowed(cfg, "/srv/ab")
    assert not policy.disk_path_allowed(cfg, "/srv/a/../b")
    assert policy.disk_path_allowed({}, "/etc")


# -- limits.disk -----------------------------------------------------------------------------------
def sized(name: str, size: str | None, **config: str) -> Entity:
    root = {"type": "disk", "path": "/", "pool": "default"}
    if size is not None:
        root["size"] = size
    return Entity(name, {k.replace("_", "."): v for k, v in config.items()}, {"root": root})


def vol(name: str, size: str | None = None) -> policy.VolumeEntity:
    return policy.VolumeEntity(name, {"size": size} if size is not None else {})


DISK = {"limits.disk": "1GiB"}


def test_limits_disk_on_instances():
    # Every instance needs a root disk size (directly or from a profile), as LXD.
    with pytest.raises(PolicyError) as e:
        policy.check(P, DISK, [], [], create(inst("c")))
    assert e.value.message == ('Failed checking if instance creation allowed: Failed getting usage of project '
                               'entities: Instance "c" in project "default" has no "size" config set on the root '
                               'device either directly or via a profile')
    policy.check(P, DISK, [sized("a", "512MiB")], [], create(sized("c", "512MiB")), [vol("v", "0")])
    with pytest.raises(PolicyError) as e:
        policy.check(P, DISK, [sized("a", "512MiB")], [], create(sized("c", "256MiB")), [vol("v", "512MiB")])
    assert e.value.message.endswith('Reached maximum aggregate value "1GiB" for "limits.disk" in project "default"')
    # A volume without a size makes every change fail while the limit is set.
    with pytest.raises(PolicyError, match='Custom volume "v" in project "default" has no "size" config set'):
        policy.check(P, DISK, [], [], create(sized("c", "1MiB")), [vol("v")])
    # An update growing the root disk.
    with pytest.raises(PolicyError, match='Failed checking if instance update allowed: Reached maximum aggregate'):
        policy.check(P, DISK, [sized("a", "512MiB")], [], Change("update", sized("a", "2GiB"), local={}))
    with pytest.raises(PolicyError, match="No root device could be found"):
        policy.check(P, DISK, [], [], create(Entity("c", {}, {})))
    # Without the limit nothing is asked of sizes.
    policy.check(P, {"limits.instances": "5"}, [], [], create(inst("c")), [vol("v")])


def test_limits_disk_on_volumes():
    cfg = {**DISK, "limits.cpu": "4"}
    ok = [sized("a", "256MiB", limits_cpu="1")]
    policy.check_volume(P, cfg, ok, [], [vol("v1", "256MiB"), vol("new", "512MiB")], "creation")
    with pytest.raises(PolicyError) as e:
        policy.check_volume(P, cfg, ok, [], [vol("v1", "256MiB"), vol("new", "600MiB")], "creation")
    assert e.value.message == ('Failed checking if volume creation allowed: Reached maximum aggregate value "1GiB" '
                               'for "limits.disk" in project "default"')
    with pytest.raises(PolicyError) as e:
        policy.check_volume(P, cfg, ok, [], [vol("new")], "update")
    assert e.value.message == ('Failed checking if volume update allowed: Failed getting usage of project entities: '
                               'Custom volume "new" in project "default" has no "size" config set')
    # Every aggregate limit is checked then (an instance without limits.cpu), as LXD does.
    with pytest.raises(PolicyError, match='Instance "b" in project "default" has no "limits.cpu" config'):
        policy.check_volume(P, cfg, [*ok, sized("b", "1MiB")], [], [vol("new", "1MiB")], "creation")
    # And the restrictions, when the project is restricted.
    with pytest.raises(PolicyError, match="Privileged containers are forbidden"):
        policy.check_volume(P, {**DISK, **R}, [sized("p", "1MiB", security_privileged="true")], [],
                            [vol("new", "1MiB")], "creation")
    # No limits.disk: volumes are never checked.
    policy.check_volume(P, {"limits.cpu": "1"}, [sized("b", None)], [], [vol("new")], "creation")


def test_limits_disk_project_update_and_usage():
    insts, vols = [sized("a", "1GiB"), sized("b", "512MiB")], [vol("v", "10MiB")]
    with pytest.raises(PolicyError) as e:
        policy.check_project_update(P, {"limits.disk": "1GiB"}, {}, insts, [], vols)
    assert e.value.message == '"limits.disk" is too low: current total is "1.5GiB"'
    policy.check_project_update(P, {"limits.disk": "1546MiB"}, {}, insts, [], vols)
    with pytest.raises(PolicyError, match='Custom volume "w" in project "default" has no "size" config set'):
        policy.check_project_update(P, {"limits.disk": "10GiB"}, {}, insts, [], [*vols, vol("w")])
    with pytest.raises(PolicyError, match='Instance "c" in project "default" has no "size" config set'):
        policy.check_project_update(P, {"limits.disk": "10GiB"}, {}, [*insts, inst("c")], [], vols)
    res = policy.allocations({"limits.disk": "2GiB"}, insts, 0, ["10MiB"])
    assert res["disk"] == {"limit": 2 * 2 ** 30, "usage": 1536 * 2 ** 20 + 10 * 2 ** 20}


# -- limits.networks -------------------------------------------------------------------------------
def test_limits_networks():
    cfg = {"limits.networks": "2"}
    policy.check_network_count(P, cfg, ["n1"], "n2")
    with pytest.raises(PolicyError, match="Networks limit has been reached for project"):
        policy.check_network_count(P, cfg, ["n1", "n2"], "n3")
    policy.check_network_count(P, cfg, ["n1", "n2"], "n2")  # a duplicate fails as one, not on the limit
    policy.check_network_count(P, {}, ["n1", "n2"], "n3")
    with pytest.raises(PolicyError, match="Networks limit has been reached"):
        policy.check_network_count(P, {"limits.networks": "0"}, [], "n1")
    with pytest.raises(PolicyError) as e:
        policy.check_project_update(P, {"limits.networks": "1"}, {}, [], [], networks=2)
    assert e.value.message == ('Can\'t change "limits.networks" in project "default": "limits.networks" is too '
                               'low: there currently are 2 networks in project "default"')
    policy.check_project_update(P, {"limits.networks": "2"}, {}, [], [], networks=2)


# -- the volumes ProjectPolicy keeps ---------------------------------------------------------------
def test_project_policy_volume_bookkeeping():
    pp = policy.ProjectPolicy(None)
    pp.set_volume(P, 1, "a", {"size": "1GiB", "user.x": "y"}, vid=10)
    pp.set_volume(P, 2, "a", {}, vid=11)  # same name on another pool: another volume
    pp.set_volume("other", 1, "z", {"size": "1MiB"}, vid=12)
    assert [(v.name, v.config) for v in pp.volume_entities(P)] == [("a", {"size": "1GiB"}), ("a", {})]
    got = pp.volume_entities(P, (1, "b", {"size": "5MiB"}))
    assert sorted((v.name, v.config.get("size", "")) for v in got) == [("a", ""), ("a", "1GiB"), ("b", "5MiB")]
    assert pp.volume_entities(P, (1, "a", {})) == [policy.VolumeEntity("a", {}), policy.VolumeEntity("a", {})]
    before = pp.set_volume(P, 1, "a", {"size": "2GiB"})
    assert before == {"size": "1GiB"}
    pp.forget_volume_id(10)
    assert [v.config for v in pp.volume_entities(P)] == [{}]
    assert pp.volume_by_id(12) == ("other", 1, "z")


def test_project_policy_load_reads_configs_and_custom_volumes(tmp_path):
    """After a restart, the custom volumes' sizes count again (limits.disk)."""
    import asyncio

    from lxd_daemon.db.engine import Database

    db = Database(tmp_path / "lxd.db")
    with db.engine.begin() as c:
        c.exec_driver_sql("CREATE TABLE projects (name TEXT, description TEXT, config TEXT)")
        c.exec_driver_sql("CREATE TABLE storage_volumes (id INTEGER PRIMARY KEY, pool_id INTEGER, project TEXT, "
                          "type TEXT, name TEXT, config TEXT)")
        c.exec_driver_sql("""INSERT INTO projects VALUES ('default', '', '{"limits.disk": "1GiB"}')""")
        c.exec_driver_sql("""INSERT INTO storage_volumes VALUES (7, 1, 'default', 'custom', 'v', '{"size": "5MiB"}'),
                             (8, 1, 'default', 'container', 'c', '{}'), (9, 2, 'default', 'custom', 'w', '{}')""")
    pp = policy.ProjectPolicy(db)
    asyncio.run(pp.load())
    assert pp.config(P) == {"limits.disk": "1GiB"}
    assert pp.volume_entities(P) == [policy.VolumeEntity("v", {"size": "5MiB"}), policy.VolumeEntity("w", {})]
    assert pp.volume_by_id(7) == (P, 1, "v")
    db.engine.dispose()


def test_targeting_a_cluster_member_is_refused_by_a_restricted_project_first():
    from lxd_daemon.errors import Forbidden

    policy.check_target({"restricted": "true"}, "")  # no target: nothing to refuse
    with pytest.raises(Forbidden, match="doesn't allow cluster member targeting"):
        policy.check_target({"restricted": "true"}, "node1")
    for cfg in ({}, {"restricted": "true", "restricted.cluster.target": "allow"}):
        with pytest.raises(BadRequest, match="Target only allowed when clustered"):
            policy.check_target(cfg, "node1")
