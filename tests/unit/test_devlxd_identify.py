"""Who is calling /dev/lxd: the container a /proc/PID/cgroup text places its process in."""

import os

from lxd_daemon.devlxd import identify

V2 = "0::/lxc.payload.c1/init.scope\n"
V1 = """12:pids:/lxc.payload.c1
11:memory:/lxc.payload.c1/system.slice
10:freezer:/lxc.payload.c1
1:name=systemd:/lxc.payload.c1/init.scope
0::/lxc.payload.c1
"""
HOST = """12:pids:/system.slice/ssh.service
1:name=systemd:/system.slice/ssh.service
0::/system.slice/ssh.service
"""


def test_v2_line():
    assert identify.payload_component(V2) == "c1"


def test_v1_and_hybrid_lines():
    assert identify.payload_component(V1) == "c1"


def test_suffixed_payload_and_candidates():
    text = "0::/lxc.payload.c1-2\n"
    assert identify.payload_component(text) == "c1-2"
    assert identify.candidate_keys("c1-2") == ["c1-2", "c1"]
    assert identify.candidate_keys("proj_web") == ["proj_web"]


def test_not_a_container():
    assert identify.payload_component(HOST) is None
    assert identify.payload_component("0::/\n") is None
    assert identify.payload_component("0::/lxc.payload.\n") is None  # no name
    assert identify.payload_component("garbage\n") is None


def test_outermost_component_wins():
    # A guest may create cgroups below its own, named like another container's: never above.
    assert identify.payload_component("0::/lxc.payload.c1/lxc.payload.c2/x\n") == "c1"


def test_hierarchies_that_disagree_are_not_trusted():
    assert identify.payload_component("4:memory:/lxc.payload.c1\n0::/lxc.payload.c2\n") is None


def test_lxc_monitor_is_not_a_payload():
    assert identify.payload_component("0::/lxc.monitor.c1\n") is None


def test_instance_for_pid_needs_the_init_in_the_same_cgroup():
    me = os.getpid()
    # this process is in no container: nothing matches, whatever the records say
    assert identify.instance_for_pid(me, {"c1": 1}, lambda k: me) is None
    assert identify.instance_for_pid(0, {"c1": 1}, lambda k: 1) is None
    assert identify.instance_for_pid(-5, {"c1": 1}, lambda k: 1) is None
