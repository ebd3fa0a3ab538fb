"""Live limits: changing limits.* on a running container rewrites its cgroups (through the workers)."""

from __future__ import annotations

import pytest

from lxd_daemon.instances import live
from lxd_daemon.instances.lxcconf import host_layout
from lxd_daemon.runtime.client import RuntimeClient
from tests.helpers import LiveWorker, RawContainer, cgroup_file, started_raw_container

pytestmark = pytest.mark.integration
MiB = 1024 * 1024


_WORKER: list[LiveWorker] = []


@pytest.fixture(scope="module", autouse=True)
def worker_pool():
    """One liblxc worker and one event loop for the module's live updates."""
    w = LiveWorker()
    _WORKER.append(w)
    yield w.pool
    _WORKER.clear()
    w.close()


@pytest.fixture(scope="module")
def running():
    with started_raw_container("lim", config={"limits.memory": "128MiB"}) as c:
        yield c


def apply(c: RawContainer, old: dict, new: dict) -> None:
    _WORKER[0].run(live.apply_live(
        RuntimeClient(_WORKER[0].pool), c.name, (old, {}), (new, {}), init_pid=c.pid, idmap=c.idmap))


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
    got = _WORKER[0].run(
        worker_pool.call("read_cgroup_files", c.pid, [[ver, "pids.max"], [ver, "pids.nonexistent"]], c.name,
                         lane=c.name))
    assert got == {"pids.max": cgroup_file(c.pid, "pids.max"), "pids.nonexistent": None}
