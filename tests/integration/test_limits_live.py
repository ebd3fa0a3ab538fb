"""Live limits: changing limits.* on a running container rewrites its cgroups (through the workers)."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

import pytest

from lxd_daemon.instances import live
from lxd_daemon.instances.lxcconf import host_layout
from lxd_daemon.runtime.pool import WorkerPool
from tests.helpers import RawContainer, cgroup_file, run_prefix

pytestmark = pytest.mark.integration
MiB = 1024 * 1024


_POOL: dict = {}


@pytest.fixture(scope="module", autouse=True)
def worker_pool():
    """One liblxc worker (a subprocess) and one event loop for the module's live updates."""
    loop = asyncio.new_event_loop()
    pool = WorkerPool(1)
    pool.spawn()
    pool.attach(loop)
    _POOL.update(loop=loop, pool=pool)
    yield pool
    pool.close()
    loop.close()
    _POOL.clear()


@pytest.fixture(scope="module")
def running():
    base = Path(tempfile.mkdtemp(prefix="limits-"))
    base.chmod(0o711)
    c = RawContainer(base / "c", f"{run_prefix()}-lim", config={"limits.memory": "128MiB"})
    try:
        c.build()
        c.start()
        yield c
    finally:
        c.cleanup()
        shutil.rmtree(base, ignore_errors=True)


def apply(c: RawContainer, old: dict, new: dict) -> None:
    _POOL["loop"].run_until_complete(live.apply_live(
        _POOL["pool"], c.name, (old, {}), (new, {}), init_pid=c.pid, idmap=c.idmap))


def mem_key() -> str:
    return "memory.max" if host_layout().version("memory") == 2 else "memory.limit_in_bytes"


def test_memory_limit_changes_live(running):
    c = running
    assert int(cgroup_file(c.pid, mem_key())) == 128 * MiB
    apply(c, {"limits.memory": "128MiB"}, {"limits.memory": "256MB"})
    assert int(cgroup_file(c.pid, mem_key())) == 256 * 1000 * 1000
    apply(c, {"limits.memory": "256MB"}, {"limits.memory": "64MiB", "limits.memory.swap": "false"})
    assert int(cgroup_file(c.pid, mem_key())) == 64 * MiB
    if host_layout().version("memory") == 1 and host_layout().memsw:
        assert int(cgroup_file(c.pid, "memory.memsw.limit_in_bytes")) == 64 * MiB
    # raising again needs memsw raised first: handled
    apply(c, {"limits.memory": "64MiB", "limits.memory.swap": "false"},
          {"limits.memory": "512MiB", "limits.memory.swap": "false"})
    assert int(cgroup_file(c.pid, mem_key())) == 512 * MiB
    # unset: unlimited again
    apply(c, {"limits.memory": "512MiB", "limits.memory.swap": "false"}, {})
    assert int(cgroup_file(c.pid, mem_key()) .replace("max", str(1 << 62))) > 1 << 40
    apply(c, {}, {"limits.memory": "128MiB"})


def test_processes_and_cpu_live(running):
    c = running
    apply(c, {"limits.memory": "128MiB"}, {"limits.memory": "128MiB", "limits.processes": "42", "limits.cpu": "1",
                                           "limits.cpu.allowance": "20ms/100ms"})
    assert cgroup_file(c.pid, "pids.max") == "42"
    assert len(cgroup_file(c.pid, "cpuset.cpus").split(",")) == 1 and "-" not in cgroup_file(c.pid, "cpuset.cpus")
    if host_layout().version("cpu") == 1:
        assert cgroup_file(c.pid, "cpu.cfs_quota_us") == "20000"
    apply(c, {"limits.memory": "128MiB", "limits.processes": "42", "limits.cpu": "1",
              "limits.cpu.allowance": "20ms/100ms"}, {"limits.memory": "128MiB"})
    assert cgroup_file(c.pid, "pids.max") == "max"
    if host_layout().version("cpu") == 1:
        assert cgroup_file(c.pid, "cpu.cfs_quota_us") == "-1"


def test_keys_without_live_updater_are_left_for_next_start(running):
    c = running
    before = cgroup_file(c.pid, mem_key())
    apply(c, {"limits.memory": "128MiB"}, {"limits.memory": "128MiB", "security.nesting": "true", "user.x": "y"})
    assert cgroup_file(c.pid, mem_key()) == before


def test_memory_limit_below_usage_is_a_clear_error(running):
    from lxd_daemon.errors import BadRequest

    c = running
    c.attach("sh", "-c", "mkdir -p /dev/shm && mount -t tmpfs tmpfs /dev/shm 2>/dev/null; "
             "dd if=/dev/zero of=/dev/shm/fill bs=1M count=20 2>/dev/null; true")
    with pytest.raises(BadRequest, match="memory"):
        apply(c, {"limits.memory": "128MiB", "limits.memory.swap": "false"},
              {"limits.memory": "1MiB", "limits.memory.swap": "false"})
    c.attach("rm", "-f", "/dev/shm/fill")


def test_read_cgroup_files_worker_method(running, worker_pool):
    c = running
    ver = host_layout().version("pids")
    got = _POOL["loop"].run_until_complete(
        worker_pool.call("read_cgroup_files", c.pid, [[ver, "pids.max"], [ver, "pids.nonexistent"]], lane=c.name))
    assert got == {"pids.max": cgroup_file(c.pid, "pids.max"), "pids.nonexistent": None}
