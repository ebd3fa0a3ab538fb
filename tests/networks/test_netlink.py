"""lxd_daemon.networks.netlink, run inside network namespaces the tests make."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from tests.helpers import REPO, run_prefix
from tests.netns import NetNS, links

pytestmark = pytest.mark.integration

PRELUDE = "import ipaddress, json, os, subprocess, sys, time\nfrom lxd_daemon.networks import netlink as nl\n"


def run_py(ns: NetNS, code: str, *args: str, timeout: float = 60) -> dict:
    """Run `code` with the repository importable inside `ns`; it prints one JSON line last."""
    r = subprocess.run([*ns.prefix(), sys.executable, "-c", PRELUDE + textwrap.dedent(code), *args],
                       capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert r.returncode == 0, r.stderr + r.stdout
    return json.loads(r.stdout.strip().splitlines()[-1])


def sleeper_in(ns: NetNS) -> subprocess.Popen:
    """A process inside `ns` (once nsenter has entered it): a target for move_to_netns."""
    p = subprocess.Popen([*ns.prefix(), "sleep", "60"])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            if os.stat(f"/proc/{p.pid}/ns/net").st_ino == ns.inode():
                return p
        except OSError:
            pass
        time.sleep(0.005)
    p.kill()
    raise AssertionError("sleeper did not enter the namespace")


@pytest.fixture
def ns():
    with NetNS("hn" + run_prefix()) as n:
        yield n


@pytest.fixture
def peer_ns():
    with NetNS("hp" + run_prefix()) as n:
        yield n


def test_bridge_addresses_and_state(ns):
    out = run_py(ns, """
        nl.create_bridge("tbr0", mtu=1400, hwaddr="00:16:3e:00:00:01")
        nl.create_bridge("tbr0")  # kept
        nl.set_link("tbr0", up=True)
        v4, v6 = ipaddress.ip_interface("10.61.0.1/24"), ipaddress.ip_interface("fd61::1/64")
        nl.set_addresses("tbr0", [v4, v6])
        first = nl.link_state("tbr0")
        routes1, addrs1 = nl.routes(), nl.addresses()
        subprocess.run(["ip", "-6", "addr", "add", "fe80::99/64", "dev", "tbr0"], check=True)
        nl.set_addresses("tbr0", [ipaddress.ip_interface("10.62.0.1/24")])
        second = nl.link_state("tbr0")
        nl.create_veth("tv0", "tv1")
        nl.set_link("tv0", master="tbr0")
        ports = nl.link_state("tbr0")["bridge"]["upper_devices"]
        nl.set_link("tv0", master="")
        ports2 = nl.link_state("tbr0")["bridge"]["upper_devices"]
        try:
            nl.create_bridge("tv0")
            clash = None
        except nl.NetlinkError as e:
            clash = [e.status, e.message]
        try:
            nl.set_link("missing0", up=True)
            missing = None
        except nl.NetlinkError as e:
            missing = e.message
        nl.delete_link("tbr0"); nl.delete_link("tbr0")
        print(json.dumps(dict(first=first, second=second, routes=routes1, addrs=addrs1, ports=ports,
                              ports2=ports2, clash=clash, missing=missing, gone=nl.link_exists("tbr0"),
                              idx=nl.link_index("tv0"))))
    """)
    first = out["first"]
    assert first["mtu"] == 1400 and first["hwaddr"] == "00:16:3e:00:00:01" and first["state"] == "up"
    assert first["type"] == "broadcast"
    got = {(a["family"], a["address"], a["netmask"], a["scope"]) for a in first["addresses"]}
    assert {("inet", "10.61.0.1", "24", "global"), ("inet6", "fd61::1", "64", "global")} <= got
    assert first["bridge"]["id"] == "8000.00163e000001" and first["bridge"]["stp"] is False
    assert set(first["counters"]) == {"bytes_received", "bytes_sent", "packets_received", "packets_sent"}
    assert "10.61.0.0/24" in out["routes"] and "fd61::/64" in out["routes"]
    assert "10.61.0.1/24" in out["addrs"] and "fd61::1/64" in out["addrs"]
    second = {a["address"] for a in out["second"]["addresses"]}
    assert "10.62.0.1" in second and "10.61.0.1" not in second and "fd61::1" not in second
    assert "fe80::99" in second  # link-local left alone
    assert out["ports"] == ["tv0"] and out["ports2"] == []
    assert out["clash"][0] == 409 and "tv0" in out["clash"][1]
    assert "missing0" in out["missing"] and "not found" in out["missing"]
    assert out["gone"] is False and isinstance(out["idx"], int)


def test_veth_moved_into_another_namespace(ns, peer_ns):
    sleeper = sleeper_in(peer_ns)
    try:
        out = run_py(ns, """
            nl.create_veth("th0", "tp0", mtu=1300, peer_hwaddr="00:16:3e:12:34:56")
            host = nl.link_state("th0")
            nl.move_to_netns("tp0", int(sys.argv[1]), "eth7")
            print(json.dumps(dict(host=host, peer_here=nl.link_exists("tp0"))))
        """, str(sleeper.pid))
    finally:
        sleeper.kill()
        sleeper.wait()
    assert out["host"]["mtu"] == 1300 and out["host"]["state"] == "up"
    assert out["peer_here"] is False
    assert "eth7" in links(peer_ns)
    shown = peer_ns.run("ip", "-o", "link", "show", "eth7").stdout
    assert "00:16:3e:12:34:56" in shown and "mtu 1300" in shown


def test_macvlan_ipvlan_routes_and_sysctl(ns):
    out = run_py(ns, """
        nl.create_bridge("tpar0"); nl.set_link("tpar0", up=True)
        nl.create_macvlan("tmv0", "tpar0", mtu=1400, hwaddr="00:16:3e:aa:00:01")
        mv = nl.link_state("tmv0")
        try:
            nl.create_ipvlan("tip0", "tpar0")
            ipvlan = "ok" if nl.link_exists("tip0") else "missing"
        except nl.NetlinkError as e:
            ipvlan = e.message
        nl.create_veth("trt0", "trt1")
        nl.add_route("10.63.1.2/32", "trt0"); nl.add_route("10.63.1.2", "trt0")
        nl.add_route("fd63::2/128", "trt0")
        after_add = nl.routes()
        nl.del_route("10.63.1.2/32", "trt0"); nl.del_route("fd63::2/128", "trt0")
        nl.del_route("10.63.1.2/32", "trt0"); nl.del_route("10.63.1.2/32", "nope0")
        after_del = nl.routes()
        nl.set_sysctl("net/ipv4/ip_forward", 1)
        fwd = nl.get_sysctl("net/ipv4/ip_forward")
        nl.set_sysctl("net/ipv6/conf/tpar0/accept_ra", "0")
        ra = nl.get_sysctl("net/ipv6/conf/tpar0/accept_ra")
        print(json.dumps(dict(mv=mv, ipvlan=ipvlan, after_add=after_add, after_del=after_del, fwd=fwd, ra=ra)))
    """)
    assert out["mv"]["mtu"] == 1400 and out["mv"]["hwaddr"] == "00:16:3e:aa:00:01"
    # this kernel may lack CONFIG_IPVLAN: then the error names the link and the cause
    assert out["ipvlan"] == "ok" or ("tip0" in out["ipvlan"] and "not supported" in out["ipvlan"])
    assert "10.63.1.2/32" in out["after_add"] and "fd63::2/128" in out["after_add"]
    assert "10.63.1.2/32" not in out["after_del"] and "fd63::2/128" not in out["after_del"]
    assert out["fwd"] == "1" and out["ra"] == "0"


def test_limits_shape_and_go_away(ns, peer_ns):
    """limits.ingress shapes traffic to the container side (measured), limits.egress polices
    traffic from it; None removes both."""
    sleeper = sleeper_in(peer_ns)
    try:
        run_py(ns, """
            nl.create_veth("tlh0", "tlp0")
            nl.set_addresses("tlh0", [ipaddress.ip_interface("10.64.0.1/24")])
            nl.move_to_netns("tlp0", int(sys.argv[1]), "eth0")
            print(json.dumps({}))
        """, str(sleeper.pid))
    finally:
        sleeper.kill()
        sleeper.wait()
    peer_ns.run("ip", "addr", "add", "10.64.0.2/24", "dev", "eth0")
    peer_ns.run("ip", "link", "set", "eth0", "up")

    def send_seconds(size: int) -> float:
        """Time to push `size` bytes from ns to the peer over TCP."""
        server = subprocess.Popen([*peer_ns.prefix(), sys.executable, "-c", textwrap.dedent("""
            import socket
            s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("10.64.0.2", 5001)); s.listen(1); print("ready", flush=True)
            c, _ = s.accept()
            while c.recv(65536):
                pass
        """)], stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout.readline().strip() == "ready"
            out = run_py(ns, f"""
                import socket
                s = socket.create_connection(("10.64.0.2", 5001), timeout=20)
                t = time.monotonic(); s.sendall(b"x" * {size}); s.shutdown(socket.SHUT_WR)
                s.settimeout(20); s.recv(1)
                print(json.dumps(dict(t=time.monotonic() - t)))
            """)
            return out["t"]
        finally:
            server.kill()
            server.wait()

    out = run_py(ns, """
        nl.set_limits("tlh0", ingress=2_000_000, egress=1_000_000)
        q = subprocess.run(["tc", "qdisc", "show", "dev", "tlh0"], capture_output=True, text=True).stdout
        c = subprocess.run(["tc", "class", "show", "dev", "tlh0"], capture_output=True, text=True).stdout
        f = subprocess.run(["tc", "filter", "show", "dev", "tlh0", "ingress"], capture_output=True, text=True).stdout
        n = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True).stdout
        print(json.dumps(dict(q=q, c=c, f=f, n=n)))
    """)
    assert "htb" in out["q"] and "rate 2Mbit" in out["c"]
    assert "police" in out["f"] or ('device "tlh0"' in out["n"] and "125000 bytes/second" in out["n"])
    limited = send_seconds(500_000)  # 4 Mbit at 2 Mbit/s: about 2 s
    assert limited > 1.2, limited
    out = run_py(ns, """
        nl.set_limits("tlh0", ingress=None, egress=None)
        q = subprocess.run(["tc", "qdisc", "show", "dev", "tlh0"], capture_output=True, text=True).stdout
        n = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True).stdout
        print(json.dumps(dict(q=q, n=n)))
    """)
    assert "htb" not in out["q"] and "ingress" not in out["q"] and "tlh0" not in out["n"]
    assert send_seconds(500_000) < limited / 2
