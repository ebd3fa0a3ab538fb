"""lxd_daemon.networks.firewall, observed from the outside: three namespaces the test makes, a
"router" running the rules (bridge br0 10.81.0.1/24 + fd81::1/64, uplink 192.0.2.1/24), a
"container" on the bridge (10.81.0.5, fd81::5) and a "world" on the uplink (192.0.2.2, with no
route back to the bridge's subnet)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest

from tests.helpers import REPO, run_prefix
from tests.netns import NetNS, nft_tables

pytestmark = pytest.mark.integration

PRELUDE = ("import json, sys\nfrom lxd_daemon.networks.firewall import FamilyRules, Firewall, FirewallError\n"
           "fw = Firewall()\n")

# Accepts connections and answers each with the address it saw the connection come from and the
# port it listens on.
PEER_SERVER = textwrap.dedent("""
    import socket, sys
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(8); print("ready", flush=True)
    while True:
        c, peer = s.accept(); c.sendall(f"{peer[0]} {sys.argv[2]}\\n".encode()); c.close()
""")

CONNECT = textwrap.dedent("""
    import socket, sys
    try:
        s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
        s.settimeout(float(sys.argv[3])); print(s.recv(100).decode().strip())
    except OSError as e:
        print("ERROR", type(e).__name__)
""")


def fw(ns: NetNS, code: str) -> dict:
    r = subprocess.run([*ns.prefix(), sys.executable, "-c", PRELUDE + textwrap.dedent(code)],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr + r.stdout
    lines = r.stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines else {}


def connect(ns: NetNS, addr: str, port: int, timeout: float = 2.0, *, with_port: bool = False) -> str:
    """The peer address the server saw ("ERROR ..." when the connection failed)."""
    out = ns.run(sys.executable, "-c", CONNECT, addr, str(port), str(timeout), timeout=30).stdout.strip()
    return out if with_port or out.startswith("ERROR") else out.split()[0]


@pytest.fixture
def topo():
    p = run_prefix()
    router, ctr, world = NetNS("fr" + p), NetNS("fc" + p), NetNS("fw" + p)
    servers: list[subprocess.Popen] = []
    try:
        for n in (router, ctr, world):
            n.create()
        r = router.run
        r("ip", "link", "add", "br0", "type", "bridge")
        r("ip", "addr", "add", "10.81.0.1/24", "dev", "br0")
        r("ip", "addr", "add", "fd81::1/64", "dev", "br0", "nodad")
        r("ip", "link", "set", "br0", "up")
        r("ip", "link", "add", "rc0", "type", "veth", "peer", "name", "eth0", "netns", ctr.name)
        r("ip", "link", "set", "rc0", "master", "br0", "up")
        r("ip", "link", "add", "rw0", "type", "veth", "peer", "name", "eth0", "netns", world.name)
        r("ip", "addr", "add", "192.0.2.1/24", "dev", "rw0")
        r("ip", "link", "set", "rw0", "up")
        r("sysctl", "-qw", "net.ipv4.ip_forward=1")
        ctr.run("ip", "link", "set", "eth0", "address", "00:16:3e:81:00:05", "up")
        ctr.run("ip", "addr", "add", "10.81.0.5/24", "dev", "eth0")
        ctr.run("ip", "addr", "add", "fd81::5/64", "dev", "eth0", "nodad")
        ctr.run("ip", "route", "add", "default", "via", "10.81.0.1")
        world.run("ip", "link", "set", "eth0", "up")
        world.run("ip", "addr", "add", "192.0.2.2/24", "dev", "eth0")

        def serve(ns: NetNS, addr: str, port: int) -> None:
            p = subprocess.Popen([*ns.prefix(), sys.executable, "-c", PEER_SERVER, addr, str(port)],
                                 stdout=subprocess.PIPE, text=True)
            servers.append(p)
            assert p.stdout.readline().strip() == "ready"

        yield SimpleNamespace(router=router, ctr=ctr, world=world, serve=serve)
    finally:
        for s in servers:
            s.kill()
            s.wait()
        for n in (router, ctr, world):
            n.destroy()


def test_available():
    ok, how = __import__("lxd_daemon.networks.firewall", fromlist=["Firewall"]).Firewall().available()
    assert ok and how == "nftables"


def test_nat_masquerades_the_subnet(topo):
    topo.serve(topo.world, "192.0.2.2", 7000)
    # no NAT: the world has no route back, nothing comes back
    assert connect(topo.ctr, "192.0.2.2", 7000, 0.5).startswith("ERROR")
    fw(topo.router, """
        fw.network_apply("br0", bridge="br0", v4=FamilyRules("10.81.0.1/24", nat=True),
                         v6=FamilyRules("fd81::1/64", nat=True))
    """)
    assert connect(topo.ctr, "192.0.2.2", 7000) == "192.0.2.1"  # the world sees the router
    assert {"inet lxd"} <= nft_tables(topo.router)
    assert ('ip6 saddr fd81::/64 ip6 daddr != fd81::/64 oifname != "br0" masquerade'
            in topo.router.run("nft", "list", "table", "inet", "lxd").stdout)
    # routing off: the bridge's traffic is not forwarded any more
    fw(topo.router, 'fw.network_apply("br0", bridge="br0", v4=FamilyRules("10.81.0.1/24", nat=True, routing=False), v6=None)')
    assert connect(topo.ctr, "192.0.2.2", 7000, 0.5).startswith("ERROR")
    fw(topo.router, 'fw.network_drop("br0"); fw.network_drop("br0")')
    assert connect(topo.ctr, "192.0.2.2", 7000, 0.5).startswith("ERROR")
    assert "inet lxd" not in nft_tables(topo.router)  # the last object gone: so is the table


def test_nic_filter_drops_spoofed_sources(topo):
    c = topo.ctr

    def ping(src: str, dst: str) -> bool:
        return c.run("busybox", "ping", "-c", "1", "-W", "1", "-I", src, dst, check=False).returncode == 0

    c.run("ip", "addr", "add", "10.81.0.6/24", "dev", "eth0")
    c.run("ip", "addr", "add", "fd81::6/64", "dev", "eth0", "nodad")
    assert ping("10.81.0.6", "10.81.0.1") and ping("fd81::6", "fd81::1")
    fw(topo.router, """
        fw.nic_filter_apply("default_c-1.eth0", bridge="br0", host_ifname="rc0", hwaddr="00:16:3e:81:00:05",
                            mac=True, ipv4=["10.81.0.5"], ipv6=["fd81::5"])
    """)
    assert ping("10.81.0.5", "10.81.0.1") and ping("fd81::5", "fd81::1")  # its own ARP/NDP answers pass
    assert "nd-neighbor-advert @th,64,16 != 0xfe80 @th,64,128 != 0xfd810000000000000000000000000005 drop" in \
        topo.router.run("nft", "list", "table", "bridge", "lxd").stdout
    assert not ping("10.81.0.6", "10.81.0.1")
    assert not ping("fd81::6", "fd81::1")
    # a foreign MAC is dropped too
    c.run("ip", "link", "set", "eth0", "address", "00:16:3e:81:00:99")
    topo.router.run("ip", "neigh", "flush", "dev", "br0")
    assert not ping("10.81.0.5", "10.81.0.1")
    c.run("ip", "link", "set", "eth0", "address", "00:16:3e:81:00:05")
    topo.router.run("ip", "neigh", "flush", "dev", "br0")
    # no IPv4 allowed at all, IPv6 unfiltered
    fw(topo.router, """
        fw.nic_filter_apply("default_c-1.eth0", bridge="br0", host_ifname="rc0", hwaddr="00:16:3e:81:00:05",
                            mac=False, ipv4=[], ipv6=None)
    """)
    assert not ping("10.81.0.5", "10.81.0.1") and ping("fd81::6", "fd81::1")
    out = fw(topo.router, 'print(json.dumps(sorted(fw.keys()["nic"])))')
    assert out == ["default_c-1.eth0"]
    fw(topo.router, 'fw.nic_filter_drop("default_c-1.eth0")')
    assert ping("10.81.0.6", "10.81.0.1")
    assert "bridge lxd" not in nft_tables(topo.router)


def test_proxy_dnat_forwards_tcp(topo):
    topo.serve(topo.ctr, "10.81.0.5", 80)
    assert connect(topo.world, "192.0.2.1", 8080, 0.5).startswith("ERROR")
    fw(topo.router, """
        fw.network_apply("br0", bridge="br0", v4=FamilyRules("10.81.0.1/24", nat=False), v6=None)
        fw.proxy_dnat_apply("default_c1.web", family="ipv4", proto="tcp", listen_addr="0.0.0.0",
                            listen_ports=[8080, 8081], connect_addr="10.81.0.5", connect_port=80)
    """)
    assert connect(topo.world, "192.0.2.1", 8080) == "192.0.2.2"  # from outside (prerouting)
    assert connect(topo.world, "192.0.2.1", 8081) == "192.0.2.2"
    assert connect(topo.router, "192.0.2.1", 8080) in ("192.0.2.1", "10.81.0.1")  # the host itself (output)
    # hairpin (the container to its own published port): masqueraded; with bridge netfilter the
    # DNATed packet is bridged back out the port it came in by, which needs hairpin mode there
    topo.router.run(sys.executable, "-c", "from lxd_daemon.networks import netlink; "
                    "netlink.set_bridge_port('rc0', hairpin=True)")
    assert "hairpin on" in topo.router.run("bridge", "-d", "link", "show", "dev", "rc0").stdout
    assert connect(topo.ctr, "192.0.2.1", 8080) == "10.81.0.1"
    # a listen address of its own only matches that address
    fw(topo.router, """
        fw.proxy_dnat_apply("default_c1.web", family="ipv4", proto="tcp", listen_addr="10.81.0.1",
                            listen_ports=[8080], connect_addr="10.81.0.5", connect_port=80)
    """)
    assert connect(topo.world, "192.0.2.1", 8080, 0.5).startswith("ERROR")
    assert connect(topo.router, "10.81.0.1", 8080) == "10.81.0.1"
    assert fw(topo.router, 'print(json.dumps(sorted(fw.keys()["proxy"])))') == ["default_c1.web"]
    # listen ports mapped one to one onto connect ports
    topo.serve(topo.ctr, "10.81.0.5", 81)
    fw(topo.router, """
        fw.proxy_dnat_apply("default_c1.web", family="ipv4", proto="tcp", listen_addr="192.0.2.1",
                            listen_ports=[9080, 9081], connect_addr="10.81.0.5", connect_port=[80, 81])
    """)
    assert connect(topo.world, "192.0.2.1", 9080, with_port=True) == "192.0.2.2 80"
    assert connect(topo.world, "192.0.2.1", 9081, with_port=True) == "192.0.2.2 81"
    fw(topo.router, 'fw.proxy_dnat_drop("default_c1.web")')
    assert connect(topo.router, "10.81.0.1", 8080, 0.5).startswith("ERROR")


def test_failed_change_keeps_previous_rules_and_drop_all(topo):
    r = topo.router
    fw(r, """
        fw.network_apply("net-a", bridge="br0", v4=FamilyRules("10.81.0.1/24", nat=True), v6=None)
        fw.nic_filter_apply("p:x_c2.eth0", bridge="br0", host_ifname="rc0", hwaddr="00:16:3e:81:00:05",
                            mac=True, ipv4=None, ipv6=None)
        fw.proxy_dnat_apply("default_c1.p", family="ipv6", proto="udp", listen_addr="fd81::1",
                            listen_ports=[53], connect_addr="fd81::5", connect_port=5353)
    """)
    before = r.run("nft", "list", "ruleset").stdout
    out = fw(r, """
        try:
            fw.network_apply("net-a", bridge="br0" * 7, v4=FamilyRules("10.81.0.1/24", nat=False), v6=None)
            err = None
        except FirewallError as e:
            err = e.message
        try:
            fw.network_apply("net-a", bridge="br0", v4=FamilyRules("fd81::/64", nat=True), v6=None)
            bad = None
        except FirewallError as e:
            bad = e.message
        print(json.dumps(dict(err=err, bad=bad, keys={k: sorted(v) for k, v in fw.keys().items()})))
    """)
    assert out["err"] and "net-a" in out["err"]
    assert out["bad"] and "fd81::/64" in out["bad"]
    assert r.run("nft", "list", "ruleset").stdout == before
    assert out["keys"] == {"network": ["net-a"], "nic": ["p:x_c2.eth0"], "proxy": ["default_c1.p"]}
    assert "dnat ip6 to [fd81::5]:5353" in before
    fw(r, "fw.drop_all(); fw.drop_all()")
    assert not {"inet lxd", "bridge lxd"} & nft_tables(r)
