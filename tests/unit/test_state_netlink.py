"""The network part of a running container's state, read over netlink inside its namespace
(a process in a network namespace of its own stands in for the container's init)."""

from __future__ import annotations

import os
import subprocess

import pytest

from lxd_daemon.instances import state

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (setns)")


@pytest.fixture
def netns_pid():
    # lo up with its addresses; a veth pair inside the new namespace (never in the test's own)
    p = subprocess.Popen(["unshare", "-n", "sh", "-c",
                          "ip link set lo up && ip link add e0 type veth peer name e1 && "
                          "ip link set e0 up && ip addr add 10.9.8.7/24 dev e0 && exec sleep 30"])
    try:
        for _ in range(100):
            out = subprocess.run(["nsenter", "-t", str(p.pid), "-n", "ip", "-o", "addr"], capture_output=True,
                                 text=True).stdout
            if "10.9.8.7" in out:
                break
            subprocess.run(["sleep", "0.05"])
        yield p.pid
    finally:
        p.kill()
        p.wait()


def test_kept_reader_matches_a_fresh_read(netns_pid):
    links = state.NetnsLinks(netns_pid)
    kept = state.network(netns_pid, {"e0": "vethhost"}, links)
    fresh = state.network(netns_pid, {"e0": "vethhost"})
    assert set(kept) == set(fresh) == {"lo", "e0", "e1"}
    e0 = kept["e0"]
    assert {"family": "inet", "address": "10.9.8.7", "netmask": "24", "scope": "global"} in e0["addresses"]
    assert e0["host_name"] == "vethhost" and e0["type"] == "broadcast" and e0["state"] == "up"
    assert len(e0["hwaddr"]) == 17 and e0["mtu"] == 1500
    assert set(e0["counters"]) == {"bytes_received", "bytes_sent", "packets_received", "packets_sent",
                                   "errors_received", "errors_sent", "packets_dropped_inbound",
                                   "packets_dropped_outbound"}
    lo = kept["lo"]
    assert lo["type"] == "loopback" and lo["hwaddr"] == ""
    assert {a["address"] for a in lo["addresses"]} == {"127.0.0.1", "::1"}
    assert kept["e1"]["state"] == "down"
    # the same socket serves again; after close() nothing is read through it
    assert links.read().keys() == kept.keys()
    links.close()
    assert links.read() == {}
    assert state.network(netns_pid, None, links)["e0"]["addresses"]  # falls back to a fresh read
