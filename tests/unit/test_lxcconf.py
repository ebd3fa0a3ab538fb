import os
import stat
from pathlib import Path

import pytest

from lxd_daemon.errors import BadRequest
from lxd_daemon.instances import config as cfg
from lxd_daemon.instances import lxcconf
from lxd_daemon.instances.idmap import IdmapEntry, IdmapSet

V1 = lxcconf.CgroupLayout({"cpu": 1, "cpuacct": 1, "cpuset": 1, "memory": 1, "devices": 1, "pids": 1,
                           "freezer": 1, "blkio": 1}, memsw=True, swappiness=True, online_cpus=(0, 1, 2, 3))
V2 = lxcconf.CgroupLayout({"cpu": 2, "cpuset": 2, "memory": 2, "pids": 2, "io": 2, "devices": 2},
                          memsw=True, swappiness=True, online_cpus=(0, 1))
IDMAP = IdmapSet((IdmapEntry(True, True, 1000000, 0, 1000000000),))


def spec(tmp_path: Path, config=None, devices=None, **kw) -> lxcconf.LxcSpec:
    base = dict(name="c1", lxcpath=tmp_path / "containers", rootfs=tmp_path / "containers/c1/rootfs",
                log_file=tmp_path / "logs/c1/lxc.log", console_log=tmp_path / "logs/c1/console.log",
                hostname="c1", expanded_config=config or {}, expanded_devices=devices or {},
                idmap=IDMAP, privileged=False, prepare_host=False)
    base.update(kw)
    return lxcconf.LxcSpec(**base)


def values(items, key):
    return [v for k, v in items if k == key]


def test_unprivileged_base_config(tmp_path):
    items = lxcconf.render(spec(tmp_path), V1)
    d = dict(items)
    assert items[0] == ("lxc.uts.name", "c1")
    assert d["lxc.rootfs.path"] == f"dir:{tmp_path}/containers/c1/rootfs"
    assert values(items, "lxc.idmap") == ["u 0 1000000 1000000000", "g 0 1000000 1000000000"]
    assert d["lxc.mount.auto"] == "proc:rw sys:rw cgroup:mixed"
    assert d["lxc.autodev"] == "1"
    assert d["lxc.pty.max"] == "1024" and d["lxc.tty.max"] == "0"
    assert d["lxc.console.logfile"] == f"{tmp_path}/logs/c1/console.log"
    assert d["lxc.log.file"] == f"{tmp_path}/logs/c1/lxc.log"
    assert d["lxc.cap.drop"] == "sys_time sys_module sys_rawio mac_admin mac_override"
    assert d["lxc.signal.halt"] == "SIGPWR"
    assert d["lxc.seccomp.profile"] == f"{tmp_path}/security/seccomp/c1"  # one policy per container, as LXD
    assert items[-1] == ("lxc.net.0.type", "empty")
    assert not any(k.startswith("lxc.cgroup") for k, _ in items)  # no limits, no device rules
    assert "lxc.rootfs.options" not in d


def test_idmapped_rootfs(tmp_path):
    d = dict(lxcconf.render(spec(tmp_path, rootfs_idmapped=True), V1))
    assert d["lxc.rootfs.options"] == "idmap=container"


def test_privileged(tmp_path):
    items = lxcconf.render(spec(tmp_path, {"security.privileged": "true"}, privileged=True, idmap=IdmapSet(())), V1)
    assert not values(items, "lxc.idmap")
    assert dict(items)["lxc.mount.auto"] == "proc:mixed sys:mixed cgroup:mixed"
    assert values(items, "lxc.cgroup.devices.deny") == ["a"]
    assert "c 1:3 rwm" in values(items, "lxc.cgroup.devices.allow")
    assert ("lxc.mount.entry", "mqueue dev/mqueue mqueue rw,relatime,create=dir,optional 0 0") in items


def test_unprivileged_needs_a_map(tmp_path):
    with pytest.raises(BadRequest):
        lxcconf.render(spec(tmp_path, idmap=IdmapSet(())), V1)


def test_nesting(tmp_path):
    items = lxcconf.render(spec(tmp_path, {"security.nesting": "true"}), V1)
    assert dict(items)["lxc.mount.auto"] == "proc:rw sys:rw cgroup:rw:force"
    assert ("lxc.mount.entry", "proc dev/.lxc/proc proc create=dir,optional 0 0") in items


def test_limits_cgroup_v1(tmp_path):
    conf = {"limits.memory": "256MiB", "limits.memory.swap": "false", "limits.processes": "100",
            "limits.cpu": "2", "limits.cpu.allowance": "25ms/100ms"}
    d = dict(lxcconf.render(spec(tmp_path, conf), V1))
    assert d["lxc.cgroup.memory.limit_in_bytes"] == str(256 * 1024 ** 2)
    assert d["lxc.cgroup.memory.memsw.limit_in_bytes"] == str(256 * 1024 ** 2)
    assert d["lxc.cgroup.memory.soft_limit_in_bytes"] == str(int(256 * 1024 ** 2 * 0.9))
    assert d["lxc.cgroup.memory.swappiness"] == "0"
    assert d["lxc.cgroup.pids.max"] == "100"
    cpus = cfg.parse_cpuset(d["lxc.cgroup.cpuset.cpus"])
    assert len(cpus) == 2 and set(cpus) <= {0, 1, 2, 3}
    assert d["lxc.cgroup.cpu.cfs_quota_us"] == "25000"
    assert d["lxc.cgroup.cpu.cfs_period_us"] == "100000"


def test_limits_cgroup_v2(tmp_path):
    conf = {"limits.memory": "1GB", "limits.memory.swap": "false", "limits.processes": "50",
            "limits.cpu": "1,7", "limits.cpu.allowance": "50%"}
    d = dict(lxcconf.render(spec(tmp_path, conf), V2))
    assert d["lxc.cgroup2.memory.max"] == "1000000000"
    assert d["lxc.cgroup2.memory.swap.max"] == "0"
    assert d["lxc.cgroup2.pids.max"] == "50"
    assert d["lxc.cgroup2.cpuset.cpus"] == "1"  # 7 isn't online
    assert d["lxc.cgroup2.cpu.weight"] == str(512 * 100 // 1024)
    assert not any(k.startswith("lxc.cgroup.") for k in d)


def test_memory_percent_and_soft_enforce(tmp_path):
    items = lxcconf.limit_items({"limits.memory": "50%", "limits.memory.enforce": "soft"}, V1, memory_total=1000)
    assert (1, "memory.soft_limit_in_bytes", "500") in items
    assert not any(k == "memory.limit_in_bytes" for _, k, _ in items)


def test_cpu_set_offline_refused(tmp_path):
    with pytest.raises(BadRequest, match="limits.cpu"):
        lxcconf.render(spec(tmp_path, {"limits.cpu": "9-10"}), V1)


def test_limit_resets_cover_every_managed_file():
    resets = {k: v for _, k, v in lxcconf.limit_items({}, V1, resets=True)}
    assert resets["memory.limit_in_bytes"] == "-1"
    assert resets["pids.max"] == "max"
    assert resets["cpuset.cpus"] == "0-3"
    assert resets["cpu.cfs_quota_us"] == "-1"
    assert resets["cpu.shares"] == "1024"


def test_prlimits(tmp_path):
    d = dict(lxcconf.render(spec(tmp_path, {"limits.kernel.nofile": "1024:4096", "limits.kernel.core": "0"}), V1))
    assert d["lxc.prlimit.nofile"] == "1024:4096"
    assert d["lxc.prlimit.core"] == "0"


def test_disk_mount_entries(tmp_path):
    src = tmp_path / "my data"
    src.mkdir()
    f = tmp_path / "file.txt"
    f.write_text("x")
    devices = {
        "root": {"type": "disk", "path": "/", "pool": "default"},
        "data": {"type": "disk", "source": str(src), "path": "/mnt/data", "readonly": "true",
                 "recursive": "true", "propagation": "rslave"},
        "file": {"type": "disk", "source": str(f), "path": "/etc/f.txt"},
        "gone": {"type": "disk", "source": str(tmp_path / "missing"), "path": "/gone", "optional": "true"},
    }
    entries = values(lxcconf.render(spec(tmp_path, devices=devices), V1), "lxc.mount.entry")
    esc = str(src).replace(" ", "\\040")
    assert f"{esc} mnt/data none rbind,create=dir,ro,rslave 0 0" in entries
    assert f"{f} etc/f.txt none bind,create=file 0 0" in entries
    assert not any("/gone" in e or " gone " in e for e in entries)


def test_missing_required_disk_source(tmp_path):
    with pytest.raises(BadRequest, match="Missing source path"):
        lxcconf.render(spec(tmp_path, devices={"d": {"type": "disk", "source": str(tmp_path / "nope"), "path": "/x"}}), V1)


def test_unix_device_pure_and_privileged_rule(tmp_path):
    dev = {"type": "unix-char", "source": "/dev/null", "path": "/dev/mynull"}
    items = lxcconf.render(spec(tmp_path, devices={"n": dev}), V1)
    node = tmp_path / "containers/c1/devices/unix.n.dev-mynull"
    assert ("lxc.mount.entry", f"{node} dev/mynull none bind,create=file 0 0") in items
    assert not node.exists()  # prepare_host=False
    items = lxcconf.render(spec(tmp_path, {"security.privileged": "true"}, devices={"n": dev}, privileged=True,
                                idmap=IdmapSet(())), V1)
    assert "c 1:3 rwm" in values(items, "lxc.cgroup.devices.allow")


def test_unix_device_missing_host_node(tmp_path):
    dev = {"type": "unix-char", "path": "/dev/does-not-exist-here"}
    with pytest.raises(BadRequest, match="Missing source path"):
        lxcconf.render(spec(tmp_path, devices={"n": dev}), V1)
    items = lxcconf.render(spec(tmp_path, devices={"n": {**dev, "required": "false"}}), V1)
    assert not any("does-not-exist" in v for _, v in items)
    with pytest.raises(BadRequest, match="not a char device"):
        lxcconf.render(spec(tmp_path, devices={"n": {"type": "unix-char", "source": "/etc/hostname"}}), V1)


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod needs root")
def test_prepare_host_creates_node_and_seccomp(tmp_path):
    dev = {"type": "unix-char", "path": "/dev/x", "major": "1", "minor": "5", "uid": "5", "gid": "6", "mode": "0640"}
    lxcconf.render(spec(tmp_path, devices={"z": dev}, prepare_host=True), V1)
    node = tmp_path / "containers/c1/devices/unix.z.dev-x"
    st = node.stat()
    assert stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == 1 and os.minor(st.st_rdev) == 5
    assert (st.st_uid, st.st_gid) == (1000005, 1000006)
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert "kexec_load errno 38" in (tmp_path / "security/seccomp/c1").read_text()
    assert "reject_force_umount" not in (tmp_path / "security/seccomp/c1").read_text()


def test_environment_and_order(tmp_path):
    items = lxcconf.render(spec(tmp_path, {"environment.FOO": "bar baz", "environment.A": "1",
                                           "raw.lxc": "lxc.cgroup.memory.swappiness = 7"},
                                extra=[("lxc.hook.stop", "/bin/true")]), V1)
    assert values(items, "lxc.environment") == ["A=1", "FOO=bar baz"]
    keys = [k for k, _ in items]
    assert keys[-2:] == ["lxc.hook.stop", "lxc.cgroup.memory.swappiness"]  # extra, then raw.lxc last


def test_raw_lxc_cannot_override_managed_keys(tmp_path):
    with pytest.raises(BadRequest, match="lxc.idmap"):
        lxcconf.render(spec(tmp_path, {"raw.lxc": "lxc.idmap = u 0 0 65536"}), V1)
    for text in ("lxc.rootfs.path = dir:/", "LXC.IDMAP = u 0 0 1", "lxc.rootfs.mount=/", "lxc.log.level = trace",
                 "lxc.prlimit.nofile = 1", "lxc.cgroup.dir = /", "lxc.network.type = veth"):
        with pytest.raises(BadRequest):
            lxcconf.validate_raw_lxc(text)
    lxcconf.validate_raw_lxc("lxc.cgroup.memory.swappiness = 7\n\n# c\nlxc.mount.entry = /a b none bind 0 0")


def test_to_text_and_injection(tmp_path):
    assert lxcconf.to_text([("lxc.a", "1"), ("lxc.b", "x y")]) == "lxc.a = 1\nlxc.b = x y\n"
    with pytest.raises(BadRequest):
        lxcconf.to_text([("lxc.uts.name", "x\nlxc.idmap = u 0 0 1")])


def test_escape_fstab():
    assert lxcconf.escape_fstab("/a b\tc\\d") == "/a\\040b\\011c\\134d"


def test_detect_layout(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text("cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0\n"
                      "cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,cpu,cpuacct 0 0\n"
                      "cgroup2 /nonexistent/unified cgroup2 rw 0 0\n")
    layout = lxcconf.detect_layout(str(mounts))
    assert layout.version("memory") == 1 and layout.version("cpu") == 1 and layout.version("cpuacct") == 1
    assert layout.version("pids") is None
    assert layout.prefix("memory") == "lxc.cgroup."


def test_cpu_count_spreads_containers_over_cpus():
    sets = set()
    for i in range(20):
        items = dict(((k, v) for _, k, v in lxcconf.limit_items({"limits.cpu": "1"}, V1, name=f"c{i}")))
        sets.add(items["cpuset.cpus"])
    assert len(sets) > 1 and sets <= {"0", "1", "2", "3"}
    same = dict(((k, v) for _, k, v in lxcconf.limit_items({"limits.cpu": "1"}, V1, name="c1")))
    assert same == dict(((k, v) for _, k, v in lxcconf.limit_items({"limits.cpu": "1"}, V1, name="c1")))
    full = dict(((k, v) for _, k, v in lxcconf.limit_items({"limits.cpu": "8"}, V1, name="c1")))
    assert full["cpuset.cpus"] == "0-3"


def test_apparmor_only_where_enabled(tmp_path, monkeypatch):
    monkeypatch.setattr(lxcconf, "apparmor_enabled", lambda: False)
    assert not any(k.startswith("lxc.apparmor") for k, _ in lxcconf.render(spec(tmp_path), V1))
    monkeypatch.setattr(lxcconf, "apparmor_enabled", lambda: True)
    d = dict(lxcconf.render(spec(tmp_path, {"security.nesting": "true"}), V1))
    assert d["lxc.apparmor.profile"] == "generated" and d["lxc.apparmor.allow_nesting"] == "1"


def test_block_device_disk_binds_its_host_side_mount(tmp_path):
    """A block device disk binds where devices/disk.py mounted its filesystem on the host
    (LXD's devices/<name>/disk.<dev>.<path>); a pure render without that preparation leaves it out."""
    import glob

    blocks = [p for p in glob.glob("/dev/*") if stat.S_ISBLK(os.stat(p).st_mode)] if os.path.isdir("/dev") else []
    if not blocks:
        pytest.skip("no block device node here")
    dev = {"type": "disk", "source": blocks[0], "path": "/mnt/my-blk", "readonly": "true"}
    entries = [v for k, v in lxcconf.render(spec(tmp_path, devices={"d": dev}), V1) if k == "lxc.mount.entry"]
    assert not any(blocks[0] in e for e in entries)
    mnt = lxcconf.disk_host_mount_path(tmp_path / "devices", "d", dev)
    assert mnt.name == "disk.d.mnt-my--blk"
    s = spec(tmp_path, devices={"d": dev})
    s.disk_sources = {"d": lxcconf.DiskSource(str(mnt))}
    entries = [v for k, v in lxcconf.render(s, V1) if k == "lxc.mount.entry"]
    assert f"{mnt} mnt/my-blk none bind,create=dir,ro 0 0" in entries


def test_volume_disk_binds_the_prepared_volume(tmp_path):
    dev = {"type": "disk", "pool": "default", "source": "vol1", "path": "/data"}
    s = spec(tmp_path, devices={"v": dev})
    assert not any("data" in v for k, v in lxcconf.render(s, V1) if k == "lxc.mount.entry")
    s.disk_sources = {"v": lxcconf.DiskSource("/pool/custom/default_vol1", True, shift=True)}
    entries = [v for k, v in lxcconf.render(s, V1) if k == "lxc.mount.entry"]
    assert "/pool/custom/default_vol1 data none bind,create=dir,idmap=container 0 0" in entries
