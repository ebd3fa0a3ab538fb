"""The container cgroup guard (issue 8 item 5): cgroup paths come from the container's own
`lxc.payload.<name>` cgroup, never from where some pid happens to be, and nothing outside it is
ever written."""

from __future__ import annotations

import os
import subprocess

import pytest

from lxd_daemon.instances import state as rstate

ROOT = str(rstate.CGROUP_ROOT)


@pytest.mark.parametrize("cg", [
    {"freezer": f"{ROOT}/freezer"},
    {"freezer": f"{ROOT}/freezer/"},
    {"": rstate._V2_BASE},
    {"": rstate._V2_BASE + "/"},
    {"freezer": f"{ROOT}/freezer/lxc.payload.c1/../../"},
    {"freezer": f"{ROOT}/freezer/lxc.payload.c10"},
    {"freezer": f"{ROOT}/freezer/lxc.payload.other"},
    {"freezer": f"{ROOT}/memory/lxc.payload.c1"},
    {"freezer": "/tmp/lxc.payload.c1"},
    {},
])
def test_guard_refuses_paths_outside_the_container(cg, tmp_path):
    with pytest.raises(rstate.CgroupOutsideContainer):
        rstate.check_container_cgroups(cg, "c1")
    with pytest.raises(rstate.CgroupOutsideContainer):
        rstate.set_frozen(cg, True, "c1")


@pytest.mark.parametrize("cg", [
    {"freezer": f"{ROOT}/freezer/lxc.payload.c1"},
    {"freezer": f"{ROOT}/freezer/lxc.payload.c1-2"},
    {"": rstate._V2_BASE + "/lxc.payload.c1/init.scope"},
    {"systemd": f"{ROOT}/systemd/lxc.payload.c1", "": rstate._V2_BASE + "/lxc.payload.c1"},
])
def test_guard_accepts_the_containers_own_cgroup(cg):
    rstate.check_container_cgroups(cg, "c1")


def test_a_pid_outside_the_container_yields_no_cgroup():
    """The init of an exiting container shows the root cgroup; any process outside the payload
    cgroup (this test's own, here) resolves to nothing instead of to its cgroup."""
    assert rstate.container_cgroups("c1", os.getpid()) == {}
    p = subprocess.Popen(["sleep", "30"])
    try:
        assert rstate.container_cgroups("c1", p.pid) == {}
    finally:
        p.kill()
        p.wait()
    assert rstate.container_cgroups("c1", p.pid) == {}  # gone


def test_alive_is_false_for_a_zombie():
    p = subprocess.Popen(["true"])
    started = rstate.proc_start_time(p.pid)
    import time

    for _ in range(200):
        if rstate.proc_state(p.pid) == "Z":
            break
        time.sleep(0.01)
    assert rstate.proc_state(p.pid) == "Z"
    assert not rstate.alive(p.pid, started)
    p.wait()
    assert not rstate.alive(p.pid, started)


def _service(tmp_path):
    import types

    from lxd_daemon.instances.service import InstanceService

    services = types.SimpleNamespace(db=None, pool=None, runtime=None, lxd_dir=tmp_path, storage=None,
                                     profiles=types.SimpleNamespace(profiles={}), projects=None)
    return InstanceService(services)


@pytest.mark.parametrize("cgroups", ["resolved", "root"])
def test_freeze_of_a_pid_outside_its_cgroup_is_a_400_and_writes_nothing(tmp_path, cgroups):
    """The daemon's runtime record points at a process that is not inside lxc.payload.c1 (an
    init already moved to the root cgroup looks like this): freeze answers "isn't running" and
    never writes freezer.state / cgroup.freeze anywhere."""
    import asyncio

    from lxd_daemon.errors import BadRequest
    from lxd_daemon.instances.models import Record, Runtime

    svc = _service(tmp_path)
    svc.records["c1"] = Record(1, "c1", "x86_64", False, False, "", "", "", {}, {}, [])
    p = subprocess.Popen(["sleep", "30"])
    try:
        cg = rstate.container_cgroups("c1", p.pid) if cgroups == "resolved" else \
            {"freezer": f"{ROOT}/freezer", "": rstate._V2_BASE}
        writes = []
        real = rstate.set_frozen

        def spy(c, frozen, name=None):
            writes.append(c)
            return real(c, frozen, name)

        async def go():
            svc.runtime["c1"] = Runtime(pid=p.pid, start_time=rstate.proc_start_time(p.pid), pidfd=-1,
                                        cgroups=cg)
            with pytest.raises(BadRequest, match="isn't running"):
                await svc.freeze("c1")

        rstate.set_frozen = spy
        try:
            asyncio.run(go())
        finally:
            rstate.set_frozen = real
        # either refused before any write, or the guard refused the write itself
        assert all(c == cg for c in writes)
        assert rstate.freezer_state({"freezer": f"{ROOT}/freezer/x"}) == "THAWED"
    finally:
        p.kill()
        p.wait()


def test_worker_cgroup_dirs_never_leave_the_container():
    """The worker's live-limit writes resolve cgroups only inside `lxc.payload.<name>[-N]`: a pid
    outside it (here: this test process, like an exiting init moved to the root cgroup) gives
    no directory at all, and a nested path is cut at the container's own cgroup."""
    from lxd_daemon.runtime.hotplug import cgroup_dirs, write_cgroup_files
    from lxd_daemon.util.cgroups import own_cgroup as _container_part

    assert cgroup_dirs(os.getpid(), "nosuchcontainer") == ({}, None)
    failed = write_cgroup_files(os.getpid(), [[2, "pids.max", "5"]], "nosuchcontainer")
    assert failed and failed[0][:2] == ["pids.max", "5"]
    assert _container_part("/lxc.payload.c1/init.scope", "c1") == "/lxc.payload.c1"
    assert _container_part("/lxc.payload.c1-2", "c1") == "/lxc.payload.c1-2"
    assert _container_part("/lxc.payload.c10", "c1") is None
    assert _container_part("/", "c1") is None
