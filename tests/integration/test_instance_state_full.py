"""An instance's state in full (issue 14 item 4): `GET /1.0/instances/NAME/state`, the state in
`?recursion=1` / `?recursion=2` and `lxc info NAME`, checked against the container's own cgroup
files, its volume on the pool and (in a netns of the test) its nic's host end."""

from __future__ import annotations

import re
import subprocess
import time

import pytest

from tests.helpers import run_prefix

pytestmark = pytest.mark.integration


def cgroup_dirs(pid: int) -> dict[str, str]:
    """controller -> cgroup directory of `pid` ("" for the v2 hierarchy), from /proc/PID/cgroup."""
    unified = __import__("os").path.exists("/sys/fs/cgroup/cgroup.controllers")
    out = {}
    for line in open(f"/proc/{pid}/cgroup").read().splitlines():
        _, ctrls, rel = line.split(":", 2)
        if ctrls == "":
            out[""] = ("/sys/fs/cgroup" if unified else "/sys/fs/cgroup/unified") + rel
        for c in ctrls.split(","):
            if c:
                out[c.removeprefix("name=")] = f"/sys/fs/cgroup/{c.removeprefix('name=')}{rel}"
    return out


def read_int(path: str) -> int:
    return int(open(path).read().split()[0])


def cpu_ns(cg: dict[str, str]) -> int:
    if "cpuacct" in cg:
        return read_int(cg["cpuacct"] + "/cpuacct.usage")
    stat = dict(line.split() for line in open(cg[""] + "/cpu.stat").read().splitlines())
    return int(stat["usage_usec"]) * 1000


def memory_bytes(cg: dict[str, str]) -> int:
    if "memory" in cg:
        return read_int(cg["memory"] + "/memory.usage_in_bytes")
    return read_int(cg[""] + "/memory.current")


def tasks(cg: dict[str, str]) -> int:
    if "pids" in cg:
        return read_int(cg["pids"] + "/pids.current")
    return read_int(cg[""] + "/pids.current")


def state(d, name: str) -> dict:
    r = d.api("GET", f"/1.0/instances/{name}/state")
    assert r.status_code == 200, r.text
    return r.json()["metadata"]


def du_bytes(path) -> int:
    out = subprocess.run(["du", "-s", "-B1", "--one-file-system", str(path)], capture_output=True,
                         text=True, check=True).stdout
    return int(out.split()[0])


@pytest.fixture
def volume(ready):
    """Makes custom volumes on the default pool (`volume(name, *users)`); after the test the
    instances `users` go, then the volumes."""
    made, users = [], []

    def make(name: str, *using: str) -> str:
        ready.lxc("storage", "volume", "create", "default", name)
        made.append(name)
        users.extend(using)
        return name

    yield make
    for n in users:
        ready.lxc("delete", "-f", n, check=False)
    for v in made:
        ready.lxc("storage", "volume", "delete", "default", v, check=False)


def test_running_state_matches_the_cgroup_and_the_volume(ready, names, volume):
    d = ready
    c = names("st")
    vol = volume(run_prefix() + "-stvol", c)
    d.lxc("init", "busybox", c)
    d.lxc("config", "device", "add", c, "data", "disk", "pool=default", f"source={vol}", "path=/data")
    d.lxc("start", c)
    # a little work: CPU, a file on the root disk and one on the custom volume, and a sleeper
    d.lxc("exec", c, "--", "sh", "-c",
          "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; "
          "dd if=/dev/urandom of=/root/blob bs=64k count=32 2>/dev/null; "
          "dd if=/dev/urandom of=/data/blob bs=64k count=16 2>/dev/null; sync")
    d.lxc("exec", c, "--", "sh", "-c", "nohup sleep 600 >/dev/null 2>&1 &")
    time.sleep(0.3)

    pid = state(d, c)["pid"]
    assert pid > 0
    cg = cgroup_dirs(pid)
    cpu_before = cpu_ns(cg)
    st = state(d, c)
    cpu_after, mem, ntasks = cpu_ns(cg), memory_bytes(cg), tasks(cg)

    assert st["status"] == "Running" and st["status_code"] == 103 and st["pid"] == pid
    # the counters the daemon read lie between the test's two reads of the same files
    assert cpu_before <= st["cpu"]["usage"] <= cpu_after, (cpu_before, st["cpu"], cpu_after)
    assert st["cpu"]["usage"] > 0
    assert st["processes"] == ntasks and st["processes"] >= 2, (st["processes"], ntasks)
    m = st["memory"]
    assert set(m) == {"usage", "usage_peak", "swap_usage", "swap_usage_peak"}
    assert m["usage"] > 0 and abs(m["usage"] - mem) <= max(mem // 4, 1 << 20), (m, mem)
    if "memory" in cg:  # cgroup v1 always has the peak (v2 only with memory.peak)
        assert m["usage_peak"] > 0
    assert m["usage_peak"] == 0 or m["usage_peak"] >= m["usage"], m
    assert m["swap_usage"] >= 0 and m["swap_usage_peak"] >= 0

    # disk: the root volume and the custom volume, as du measures them on the pool
    pool_dir = d.lxd_dir / "storage-pools" / "default"
    root_du = du_bytes(pool_dir / "containers" / c)
    vol_du = du_bytes(pool_dir / "custom" / f"default_{vol}")
    assert set(st["disk"]) == {"root", "data"}, st["disk"]
    assert 2 << 20 <= st["disk"]["root"]["usage"] and abs(st["disk"]["root"]["usage"] - root_du) < 1 << 20
    assert 1 << 20 <= st["disk"]["data"]["usage"] and abs(st["disk"]["data"]["usage"] - vol_du) < 1 << 20

    # network: the container's loopback, in full
    lo = st["network"]["lo"]
    assert lo["type"] == "loopback" and lo["state"] == "up" and lo["mtu"] == 65536
    assert {"family": "inet", "address": "127.0.0.1", "netmask": "8", "scope": "local"} in lo["addresses"]
    assert set(lo["counters"]) == {"bytes_received", "bytes_sent", "packets_received", "packets_sent",
                                   "errors_received", "errors_sent", "packets_dropped_outbound",
                                   "packets_dropped_inbound"}

    # the same state in ?recursion=1 and in the recursion=2 listing
    full = d.api("GET", f"/1.0/instances/{c}?recursion=1").json()["metadata"]["state"]
    assert full["pid"] == pid and set(full["disk"]) == {"root", "data"} and full["processes"] >= 2
    listed = {i["name"]: i for i in d.api("GET", "/1.0/instances?recursion=2").json()["metadata"]}
    ls = listed[c]["state"]
    assert ls["pid"] == pid and abs(ls["disk"]["root"]["usage"] - root_du) < 1 << 20 and ls["cpu"]["usage"] > 0
    # recursion=1 listings carry no state
    assert all("state" not in i for i in d.api("GET", "/1.0/instances?recursion=1").json()["metadata"])

    # what `lxc info` shows of it
    info = d.lxc("info", c).stdout
    assert f"PID: {pid}" in info
    assert re.search(r"Processes: \d+", info), info
    for want in ("Disk usage:", "    root: ", "    data: ", "CPU usage:", "CPU usage (in seconds)",
                 "Memory usage:", "Memory (current): ", "Memory (peak): ", "Network usage:", "    lo:",
                 "Type: loopback", "inet:  127.0.0.1/8 (local)"):
        assert want in info, (want, info)
    # `lxc list` columns of the state
    row = d.lxc("list", c, "--format", "csv", "-c", "nsDmpu").stdout.strip().split(",")
    assert row[0] == c and row[1] == "RUNNING" and row[2].endswith("B") and row[3].endswith("B") \
        and row[4] == str(pid) and re.fullmatch(r"\d+s", row[5]), row


def test_stopped_state(ready, names):
    d = ready
    c = names("stopped")
    d.lxc("init", "busybox", c)
    st = state(d, c)
    assert st["status"] == "Stopped" and st["status_code"] == 102
    assert st["pid"] == 0 and st["processes"] == 0 and st["cpu"] == {"usage": 0}  # LXD: zero values
    assert st["memory"] == {"usage": 0, "usage_peak": 0, "swap_usage": 0, "swap_usage_peak": 0}
    assert st["network"] is None
    # the volume's usage is reported while stopped too (LXD measures the disks in any state)
    assert st["disk"]["root"]["usage"] > 0
    info = d.lxc("info", c).stdout
    assert "Status: STOPPED" in info and "Resources:" not in info and "PID:" not in info


def test_nic_interfaces_in_the_state(net_daemon):
    """A p2p nic (a veth whose host end stays in the daemon's namespace, no bridge): its MAC,
    host end, MTU, addresses and counters, matching the host end's own counters."""
    d, ns = net_daemon, net_daemon.netns
    c = run_prefix() + "-stnic"
    d.lxc("init", "busybox", c)
    try:
        d.lxc("config", "device", "add", c, "eth0", "nic", "nictype=p2p", "name=eth0", "mtu=1400")
        d.lxc("start", c)
        conf = d.api("GET", f"/1.0/instances/{c}").json()["metadata"]["config"]
        host = conf["volatile.eth0.host_name"]
        ns.run("ip", "addr", "add", "10.233.7.1/24", "dev", host)
        ns.run("ip", "link", "set", host, "up")
        d.lxc("exec", c, "--", "sh", "-c", "ip link set eth0 up && ip addr add 10.233.7.2/24 dev eth0")
        d.lxc("exec", c, "--", "ping", "-c", "3", "-W", "2", "10.233.7.1", check=False)
        eth0 = state(d, c)["network"]["eth0"]
        dev = ns.run("cat", "/proc/net/dev").stdout
        f = next(line for line in dev.splitlines() if line.strip().startswith(host + ":")).split(":", 1)[1].split()
        host_rx_b, host_rx_p, host_tx_b, host_tx_p = int(f[0]), int(f[1]), int(f[8]), int(f[9])
        assert eth0["hwaddr"] == conf["volatile.eth0.hwaddr"] and eth0["host_name"] == host
        assert eth0["mtu"] == 1400 and eth0["state"] == "up" and eth0["type"] == "broadcast"
        assert {"family": "inet", "address": "10.233.7.2", "netmask": "24", "scope": "global"} in eth0["addresses"]
        assert any(a["family"] == "inet6" and a["scope"] == "link" for a in eth0["addresses"]), eth0
        cnt = eth0["counters"]
        # what the container sent is what the host end received (and the other way round)
        assert cnt["packets_sent"] >= 3 and cnt["packets_received"] >= 3, cnt
        assert abs(cnt["packets_sent"] - host_rx_p) <= 2 and abs(cnt["packets_received"] - host_tx_p) <= 2
        assert abs(cnt["bytes_sent"] - host_rx_b) <= 400 and abs(cnt["bytes_received"] - host_tx_b) <= 400
        info = d.lxc("info", c).stdout
        for want in ("    eth0:", f"Host interface: {host}", f"MAC address: {conf['volatile.eth0.hwaddr']}",
                     "MTU: 1400", "State: UP", "inet:  10.233.7.2/24 (global)", "Packets sent: "):
            assert want in info, (want, info)
    finally:
        d.lxc("delete", "-f", c, check=False)
