"""security.syscalls.* keys and the seccomp policy they render; raw.lxc checks; the mapping of
a full disk to 507 (issue 8, items 6 and 11)."""

from __future__ import annotations

import asyncio
import errno
import os
import sqlite3

import pytest

from lxd_daemon.errors import (
    BadRequest,
    InsufficientStorage,
    insufficient_storage,
    out_of_space,
    storage_errors,
)
from lxd_daemon.instances import config as cfg
from lxd_daemon.instances import lxcconf

# -- config keys ----------------------------------------------------------------------------------


@pytest.mark.parametrize("key,value", [
    ("security.syscalls.deny", "mknod\nmknodat errno 1"),
    ("security.syscalls.blacklist", "mknod"),
    ("security.syscalls.allow", "read\nwrite\n# comment\n"),
    ("security.syscalls.whitelist", "read"),
    ("security.syscalls.deny_default", "false"),
    ("security.syscalls.blacklist_default", "true"),
    ("security.syscalls.deny_compat", "true"),
    ("security.syscalls.blacklist_compat", "false"),
    ("security.syscalls.intercept.mknod", "false"),
    ("security.syscalls.intercept.sysinfo", "false"),
    ("security.syscalls.intercept.sched_setscheduler", "false"),
    ("security.syscalls.intercept.bpf.devices", "true"),
    ("security.syscalls.intercept.mount.allowed", "ext4,xfs"),
    ("security.syscalls.intercept.mount.fuse", "ext4=fuse2fs,ntfs=ntfs-3g"),
    ("security.syscalls.intercept.mount.shift", "true"),
])
def test_syscall_keys_are_known(key, value):
    cfg.validate_config({key: value})
    cfg.validate_config({key: value}, profile=True)


@pytest.mark.parametrize("config,msg", [
    ({"security.syscalls.deny_default": "maybe"}, "security.syscalls.deny_default"),
    ({"security.syscalls.deny": "mknod; rm -rf /"}, "Invalid syscall line"),
    ({"security.syscalls.deny": "\0"}, "Invalid syscall line"),
    ({"security.syscalls.intercept.mount.fuse": "ext4"}, "filesystem=fuse-binary"),
    ({"security.syscalls.intercept.mount.allowed": "ext4,,"}, "Invalid filesystem list"),
    ({"security.syscalls.intercept.fstype": "true"}, "unknown instance configuration key"),
    ({"security.syscalls.deny": "a", "security.syscalls.blacklist": "b"}, "Mutually exclusive keys"),
    ({"security.syscalls.allow": "read", "security.syscalls.deny": "mknod"}, "mutually exclusive"),
    ({"security.syscalls.allow": "read", "security.syscalls.deny_default": "true"}, "mutually exclusive"),
    ({"security.syscalls.allow": "read", "security.syscalls.deny_compat": "true"}, "mutually exclusive"),
])
def test_syscall_key_values_are_checked(config, msg):
    with pytest.raises(BadRequest, match=msg):
        cfg.validate_config(config)


def test_allow_with_deny_default_false_is_fine():
    cfg.validate_config({"security.syscalls.allow": "read", "security.syscalls.deny_default": "false"})


@pytest.mark.parametrize("name", cfg.INTERCEPT_SYSCALLS)
def test_interception_refused_where_it_cannot_work(name):
    key = f"security.syscalls.intercept.{name}"
    with pytest.raises(BadRequest, match="not supported by this server yet"):
        cfg.check_expanded({key: "true"})
    cfg.check_expanded({key: "false"})
    cfg.check_expanded({key: "true", "security.privileged": "true"})  # ignored there, as LXD


def test_mount_fs_in_both_lists_refused():
    with pytest.raises(BadRequest, match="cannot appear in"):
        cfg.validate_config({"security.syscalls.intercept.mount": "true",
                             "security.syscalls.intercept.mount.allowed": "ext4",
                             "security.syscalls.intercept.mount.fuse": "ext4=fuse2fs"})


# -- the policy -----------------------------------------------------------------------------------


def test_default_policy_is_the_deny_list():
    p = lxcconf.seccomp_policy({}, False)
    assert p.startswith("2\ndenylist\n[all]\n") and "kexec_load errno 38" in p
    assert "reject_force_umount" not in p
    assert "reject_force_umount" in lxcconf.seccomp_policy({}, True)


def test_deny_list_appends_to_the_defaults():
    p = lxcconf.seccomp_policy({"security.syscalls.deny": " mknod \n\nmknodat errno 1"}, False)
    assert p.endswith("delete_module errno 38\nmknod\nmknodat errno 1\n")
    p = lxcconf.seccomp_policy({"security.syscalls.blacklist": "mknod"}, False)
    assert p.endswith("\nmknod\n")


def test_no_defaults_and_nothing_else_means_no_policy():
    assert lxcconf.seccomp_policy({"security.syscalls.deny_default": "false"}, False) is None
    assert lxcconf.seccomp_policy({"security.syscalls.blacklist_default": "false"}, False) is None
    p = lxcconf.seccomp_policy({"security.syscalls.deny_default": "false", "security.syscalls.deny": "mknod"}, False)
    assert p == "2\ndenylist\n[all]\nmknod\n"


def test_allow_list():
    p = lxcconf.seccomp_policy({"security.syscalls.allow": "read\nwrite"}, False)
    assert p == "2\nallowlist\n[all]\nread\nwrite\n"
    assert lxcconf.seccomp_policy({"security.syscalls.whitelist": "read"}, False) == "2\nallowlist\n[all]\nread\n"


@pytest.mark.skipif(os.uname().machine not in lxcconf.COMPAT_ARCHES, reason="64-bit hosts with a compat ABI")
def test_compat_section():
    p = lxcconf.seccomp_policy({"security.syscalls.deny_compat": "true", "security.syscalls.deny": "mknod"}, False)
    section = f"[{os.uname().machine}]\n"
    assert section in p and "compat_sys_ptrace errno 38" in p
    assert p.index(section) < p.index("\nmknod\n")


def test_policy_file_per_container(tmp_path):
    spec = lxcconf.LxcSpec(name="c9", lxcpath=tmp_path / "containers", rootfs=tmp_path / "r", log_file=tmp_path / "l",
                           console_log=tmp_path / "cl", hostname="c9", expanded_config={"security.syscalls.deny": "mknod"},
                           expanded_devices={}, idmap=None, privileged=True, prepare_host=False)
    items = dict(lxcconf.render(spec))
    assert items["lxc.seccomp.profile"] == str(tmp_path / "security/seccomp/c9")
    spec.expanded_config = {"security.syscalls.deny_default": "false"}
    assert "lxc.seccomp.profile" not in dict(lxcconf.render(spec))


def test_policy_rewritten_when_it_changes_and_removed(tmp_path):
    path = tmp_path / "security/seccomp/c1"
    lxcconf._write_once(path, "A")
    lxcconf._write_once(path, "B")
    lxcconf._write_once(path, "A")
    assert path.read_text() == "A"
    lxcconf.remove_seccomp_policy(tmp_path / "containers", "c1")
    assert not path.exists()
    lxcconf._write_once(path, "A")  # a new container of the same name gets it again
    assert path.read_text() == "A"
    lxcconf.remove_seccomp_policy(tmp_path / "containers", "c1")
    lxcconf.remove_seccomp_policy(tmp_path / "containers", "never-started")


# -- raw.lxc --------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,msg", [
    ("lxc.syslog = daemon", "lxc.syslog"),
    ("lxc.log.syslog = daemon", "lxc.log.syslog"),
    ("lxc.ephemeral = 1", "lxc.ephemeral"),
    ("lxc.prlimit.nofile = 1", "limits.kernel"),
    ("lxc.net.0.type = veth", "only interface-specific"),
    ("lxc.net.0.link = br0", "only interface-specific"),
])
def test_raw_lxc_refused_keys(text, msg):
    with pytest.raises(BadRequest, match=msg):
        lxcconf.validate_raw_lxc(text)


def test_raw_lxc_net_addresses_allowed():
    lxcconf.validate_raw_lxc("lxc.net.0.ipv4.address = 10.0.0.2/24\nlxc.net.0.ipv6.gateway = auto")


class FakePool:
    """Answers like the worker's lxc_config_items_ok, from a fixed set of known keys."""

    def __init__(self):
        self.calls = []

    async def call(self, method, items, lane=None):
        assert method == "lxc_config_items_ok"
        self.calls.append(list(items))
        return [k in ("lxc.environment", "lxc.cgroup2.memory.high") for k, _ in items]


def test_check_raw_lxc_asks_liblxc_once_per_line():
    from lxd_daemon.runtime.client import RuntimeClient

    fake = FakePool()
    pool = RuntimeClient(fake)
    lxcconf._LIBLXC_VERDICTS.clear()
    asyncio.run(lxcconf.check_raw_lxc(pool, "lxc.environment = A=B\nlxc.cgroup2.memory.high = 100M"))
    asyncio.run(lxcconf.check_raw_lxc(pool, "lxc.environment = A=B"))
    assert len(fake.calls) == 1
    with pytest.raises(BadRequest, match="lxc.notaconfigkey"):
        asyncio.run(lxcconf.check_raw_lxc(pool, "lxc.environment = A=B\nlxc.notaconfigkey = 1"))
    assert fake.calls[-1] == [["lxc.notaconfigkey", "1"]]
    with pytest.raises(BadRequest, match="lxc.aa_profile"):
        asyncio.run(lxcconf.check_raw_lxc(pool, "lxc.aa_profile = unconfined"))
    with pytest.raises(BadRequest, match="lxc.idmap"):  # refused before asking liblxc
        asyncio.run(lxcconf.check_raw_lxc(pool, "lxc.idmap = u 0 0 1"))
    asyncio.run(lxcconf.check_raw_lxc(pool, ""))


# -- a full disk ----------------------------------------------------------------------------------


def test_out_of_space_mapping():
    assert out_of_space(OSError(errno.ENOSPC, "x")) == errno.ENOSPC
    assert out_of_space(OSError(errno.EDQUOT, "x")) == errno.EDQUOT
    assert out_of_space(OSError(errno.EIO, "x")) == 0
    assert out_of_space(sqlite3.OperationalError("database or disk is full")) == errno.ENOSPC
    assert out_of_space(sqlite3.OperationalError("no such table: x")) == 0
    e = insufficient_storage(OSError(errno.EDQUOT, "Disk quota exceeded", "/x"), "images", "/var/lib/lxd/images")
    assert e.status == 507 and e.message == "Disk quota exceeded on the storage holding images (/var/lib/lxd/images)"
    assert insufficient_storage(ValueError("x"), "images") is None


def test_storage_errors_context():
    with pytest.raises(InsufficientStorage, match="No space left on the storage holding images"):
        with storage_errors("images", "/i"):
            raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(PermissionError):
        with storage_errors("images", "/i"):
            raise PermissionError(errno.EACCES, "x")
