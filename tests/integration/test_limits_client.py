"""Config keys through the stock client: limits in the container's cgroups (at start and live),
validation errors naming the key, raw.lxc limits, environment and privileged containers."""

from __future__ import annotations

import pytest

from lxd_daemon.instances.lxcconf import host_layout
from tests.helpers import cgroup_file, ensure_containers_ready, init_pid, run_prefix

pytestmark = pytest.mark.integration
MiB = 1024 * 1024


def mem_key() -> str:
    return "memory.max" if host_layout().version("memory") == 2 else "memory.limit_in_bytes"


@pytest.fixture(scope="module")
def ct(daemon):
    alias = ensure_containers_ready(daemon)
    name = f"{run_prefix()}-lim"
    daemon.lxc("launch", alias, name, "-c", "limits.memory=128MiB", "-c", "limits.processes=50",
               "-c", "limits.cpu=1", "-c", "environment.GREETING=hello there")
    yield name
    daemon.lxc("delete", "-f", name, check=False)


def test_limits_applied_at_start(daemon, ct):
    pid = init_pid(daemon, ct)
    assert int(cgroup_file(pid, mem_key())) == 128 * MiB
    assert cgroup_file(pid, "pids.max") == "50"
    assert len(cgroup_file(pid, "cpuset.cpus").split(",")) == 1 and "-" not in cgroup_file(pid, "cpuset.cpus")
    environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    assert b"GREETING=hello there" in environ


def test_limits_change_live(daemon, ct):
    pid = init_pid(daemon, ct)
    daemon.lxc("config", "set", ct, "limits.memory", "256MB")
    assert int(cgroup_file(pid, mem_key())) == 256 * 1000 * 1000
    daemon.lxc("config", "set", ct, "limits.processes", "77")
    assert cgroup_file(pid, "pids.max") == "77"
    daemon.lxc("config", "unset", ct, "limits.processes")
    assert cgroup_file(pid, "pids.max") == "max"
    daemon.lxc("config", "set", ct, "limits.memory", "128MiB")
    assert int(cgroup_file(pid, mem_key())) == 128 * MiB
    assert init_pid(daemon, ct) == pid  # no restart happened


@pytest.mark.parametrize("key,value,fragment", [
    ("limits.memory", "1.5GB", "limits.memory"),
    ("limits.memory", "12XB", "limits.memory"),
    ("limits.cpu", "one", "limits.cpu"),
    ("limits.cpu.allowance", "25ms", "limits.cpu.allowance"),
    ("limits.memory.enforce", "strict", "limits.memory.enforce"),
    ("boot.autostart", "often", "boot.autostart"),
    ("security.idmap.size", "big", "security.idmap.size"),
    ("limits.bogus", "bogusvalue", "limits.bogus"),
    ("raw.lxc", "lxc.idmap = u 0 0 65536", "lxc.idmap"),
    ("raw.lxc", "lxc.rootfs.path = dir:/", "lxc.rootfs.path"),
    ("raw.idmap", "both 1000", "raw.idmap"),
])
def test_bad_keys_are_400_naming_the_key(daemon, ct, key, value, fragment):
    r = daemon.lxc("config", "set", ct, key, value, check=False)
    assert r.returncode != 0
    assert fragment in r.stderr
    assert value not in daemon.lxc("config", "show", ct).stdout


def test_api_error_envelope(daemon, ct):
    r = daemon.api("PATCH", f"/1.0/instances/{ct}", json={"config": {"limits.memory": "lots"}})
    assert r.status_code == 400
    body = r.json()
    assert body["type"] == "error" and body["error_code"] == 400 and "limits.memory" in body["error"]


def test_raw_lxc_applies_at_next_start(daemon):
    alias = ensure_containers_ready(daemon)
    name = f"{run_prefix()}-raw"
    try:
        daemon.lxc("init", alias, name, "-c", "raw.lxc=lxc.environment = FROM_RAW=1")
        daemon.lxc("start", name)
        environ = open(f"/proc/{init_pid(daemon, name)}/environ", "rb").read().split(b"\0")
        assert b"FROM_RAW=1" in environ
    finally:
        daemon.lxc("delete", "-f", name, check=False)


def test_privileged_container_runs_without_a_map(daemon):
    alias = ensure_containers_ready(daemon)
    name = f"{run_prefix()}-priv"
    try:
        daemon.lxc("launch", alias, name, "-c", "security.privileged=true")
        pid = init_pid(daemon, name)
        assert open(f"/proc/{pid}/uid_map").read().split() == ["0", "0", "4294967295"]
    finally:
        daemon.lxc("delete", "-f", name, check=False)


def test_profile_change_applies_live(daemon):
    alias = ensure_containers_ready(daemon)
    prefix = run_prefix()
    prof, name = f"{prefix}-lp", f"{prefix}-lpc"
    daemon.lxc("profile", "create", prof)
    try:
        daemon.lxc("profile", "set", prof, "limits.processes", "30")
        daemon.lxc("launch", alias, name, "-p", "default", "-p", prof)
        pid = init_pid(daemon, name)
        assert cgroup_file(pid, "pids.max") == "30"
        daemon.lxc("profile", "set", prof, "limits.processes", "60")
        assert cgroup_file(pid, "pids.max") == "60"
        r = daemon.lxc("profile", "set", prof, "limits.processes", "many", check=False)
        assert r.returncode != 0 and "limits.processes" in r.stderr
        r = daemon.lxc("profile", "set", prof, "volatile.x", "1", check=False)
        assert r.returncode != 0 and "Volatile keys can only be set on instances" in r.stderr
        # the instance's own key wins over the profile's
        daemon.lxc("config", "set", name, "limits.processes", "45")
        daemon.lxc("profile", "set", prof, "limits.processes", "90")
        assert cgroup_file(pid, "pids.max") == "45"
    finally:
        daemon.lxc("delete", "-f", name, check=False)
        daemon.lxc("profile", "delete", prof, check=False)
