"""Issue 10 item 4: nic devices of every nictype on a real container, driven by the stock client,
inside the network namespace of the `net_daemon` fixture (the bridge, dummies and routes the test
makes live there). One container carries a nic of each type at once; interfaces are checked from
inside the container and by traffic between the namespace and the container."""

from __future__ import annotations

import re

import pytest

from tests.helpers import run_prefix, wait_for
from tests.netns import links

pytestmark = pytest.mark.integration


def veths(ns) -> set[str]:
    return {n for n in links(ns) if n.startswith("veth")}


def inside(d, name: str, *cmd: str, check: bool = True) -> str:
    return d.lxc("exec", name, "--", *cmd, check=check).stdout


def ping_from(d, name: str, addr: str) -> None:
    """The container reaches `addr` in the namespace (the host has no ping; busybox inside has)."""
    d.lxc("exec", name, "--", "ping", "-c", "1", "-W", "2", addr)


def config_of(d, name: str) -> dict:
    return d.api("GET", f"/1.0/instances/{name}").json()["metadata"]["config"]


@pytest.fixture(scope="module")
def host_links(net_daemon):
    """A bridge with an address, and two veth pairs (this kernel may lack dummy): one end of the
    first is a macvlan parent, one end of the second is handed over whole as a physical nic; the
    other ends hold the namespace's side of those links."""
    ns = net_daemon.netns
    tag = run_prefix()[1:5]
    br = f"nb{tag}"
    ns.run("ip", "link", "add", br, "type", "bridge")
    ns.run("ip", "addr", "add", "10.231.0.1/24", "dev", br)
    ns.run("ip", "link", "set", br, "up")
    for a, b, addr in ((f"nm{tag}", f"nM{tag}", "10.235.0.1/24"), (f"np{tag}", f"nP{tag}", "10.234.0.1/24")):
        ns.run("ip", "link", "add", a, "type", "veth", "peer", "name", b)
        ns.run("ip", "addr", "add", addr, "dev", b)
        ns.run("ip", "link", "set", a, "up")
        ns.run("ip", "link", "set", b, "up")
    mac = re.search(r"link/ether (\S+)", ns.run("ip", "link", "show", f"np{tag}").stdout).group(1)
    return {"bridge": br, "macvlan": f"nm{tag}", "phys": f"np{tag}", "phys_mac": mac}


@pytest.fixture(scope="module")
def box(net_daemon, host_links):
    """One running container with a nic of each type."""
    d = net_daemon
    name = run_prefix() + "-nics"
    h = host_links
    d.lxc("init", "busybox", name)
    devices = {
        "eth0": ["nictype=bridged", f"parent={h['bridge']}", "name=eth0", "limits.max=50Mbit"],
        "mv": ["nictype=macvlan", f"parent={h['macvlan']}", "name=mv0"],
        "pp": ["nictype=p2p", "name=pp0", "mtu=1400"],
        "rt": ["nictype=routed", "name=rt0", "ipv4.address=10.232.0.5", f"parent={h['macvlan']}"],
        "ph": ["nictype=physical", f"parent={h['phys']}", "name=ph0", "hwaddr=00:16:3e:aa:00:01", "mtu=1450"],
    }
    for dev, opts in devices.items():
        d.lxc("config", "device", "add", name, dev, "nic", *opts)
    d.lxc("start", name)
    yield name
    d.lxc("delete", "-f", name, check=False)


def test_every_nictype_is_inside_the_container(net_daemon, box, host_links):
    d, ns = net_daemon, net_daemon.netns
    text = inside(d, box, "ip", "addr")
    for ifname in ("eth0", "mv0", "pp0", "rt0", "ph0"):
        assert re.search(rf"^\d+: {ifname}[@:]", text, re.M), text
    conf = config_of(d, box)
    # the MAC kept in volatile is the container's
    for dev, ifname in (("eth0", "eth0"), ("mv", "mv0"), ("pp", "pp0"), ("rt", "rt0")):
        mac = conf[f"volatile.{dev}.hwaddr"]
        assert mac.startswith("00:16:3e:")
        assert mac in inside(d, box, "cat", f"/sys/class/net/{ifname}/address")
    assert "volatile.ph.hwaddr" not in conf
    # veth-based nics record their host end while running
    for dev in ("eth0", "pp", "rt"):
        host = conf[f"volatile.{dev}.host_name"]
        assert host in links(ns)
    assert inside(d, box, "cat", "/sys/class/net/pp0/mtu").strip() == "1400"
    assert host_links["phys"] not in links(ns)  # handed over whole, with the MAC and MTU asked for
    assert "00:16:3e:aa:00:01" in inside(d, box, "cat", "/sys/class/net/ph0/address")
    assert inside(d, box, "cat", "/sys/class/net/ph0/mtu").strip() == "1450"
    # the bridge port and the container talk
    inside(d, box, "ip", "addr", "add", "10.231.0.2/24", "dev", "eth0")
    ping_from(d, box, "10.231.0.1")
    # routed: the host routes the address to the container, which has it as a /32
    assert "10.232.0.5/32" in text
    assert "10.232.0.5" in ns.run("ip", "route", "show", "dev", conf["volatile.rt.host_name"]).stdout
    assert ns.run("sysctl", "-n", f"net.ipv4.conf.{conf['volatile.rt.host_name']}.forwarding").stdout.strip() == "1"
    ping_from(d, box, "169.254.0.1")
    # ... and, with a parent, answered for there (a proxy neighbour entry)
    assert "10.232.0.5" in ns.run("ip", "neigh", "show", "proxy", "dev", host_links["macvlan"]).stdout
    # macvlan and physical carry traffic to the namespace's end of their parents
    inside(d, box, "ip", "addr", "add", "10.235.0.2/24", "dev", "mv0")
    ping_from(d, box, "10.235.0.1")
    inside(d, box, "ip", "addr", "add", "10.234.0.2/24", "dev", "ph0")
    ping_from(d, box, "10.234.0.1")
    # limits.max: shaped on the host end
    qd = ns.run("tc", "qdisc", "show", "dev", conf["volatile.eth0.host_name"]).stdout
    assert "htb" in qd
    # changed on the running nic: applied to the same host end (not unplugged and plugged again)
    d.lxc("config", "device", "set", box, "eth0", "limits.max=20Mbit")
    assert config_of(d, box)["volatile.eth0.host_name"] == conf["volatile.eth0.host_name"]
    assert "rate 20Mbit" in ns.run("tc", "class", "show", "dev", conf["volatile.eth0.host_name"]).stdout
    assert "10.231.0.2/24" in inside(d, box, "ip", "addr", "show", "eth0")  # the interface stayed


def test_state_shows_each_interface(net_daemon, box):
    d = net_daemon
    conf = config_of(d, box)
    st = d.api("GET", f"/1.0/instances/{box}/state").json()["metadata"]["network"]
    eth0 = st["eth0"]
    assert eth0["hwaddr"] == conf["volatile.eth0.hwaddr"]
    assert eth0["host_name"] == conf["volatile.eth0.host_name"]
    assert eth0["state"] == "up" and eth0["type"] == "broadcast" and eth0["mtu"] == 1500
    assert {"family": "inet", "address": "10.232.0.5", "netmask": "32", "scope": "global"} \
        in st["rt0"]["addresses"]
    assert st["pp0"]["mtu"] == 1400
    assert st["lo"]["type"] == "loopback"
    listing = d.lxc("list", box, "--format", "csv", "-c", "n4").stdout
    assert "10.232.0.5 (rt0)" in listing


def test_hotplug_and_removal_leave_no_veth(net_daemon, box, host_links):
    d, ns = net_daemon, net_daemon.netns
    before = veths(ns)
    d.lxc("config", "device", "add", box, "hot", "nic", "nictype=bridged", f"parent={host_links['bridge']}",
          "name=eth9")
    conf = config_of(d, box)
    host = conf["volatile.hot.host_name"]
    assert host in veths(ns)
    assert f"master {host_links['bridge']}" in ns.run("ip", "link", "show", host).stdout
    text = inside(d, box, "ip", "addr", "show", "eth9")
    assert conf["volatile.hot.hwaddr"] in text and "UP" in text
    inside(d, box, "ip", "addr", "add", "10.231.0.9/24", "dev", "eth9")
    ping_from(d, box, "10.231.0.1")
    d.lxc("config", "device", "remove", box, "hot")
    assert "eth9" not in inside(d, box, "ip", "link")
    assert veths(ns) == before
    assert "volatile.hot.host_name" not in config_of(d, box)
    # a routed nic hot-plugged gets its address and gateway from the worker
    d.lxc("config", "device", "add", box, "hr", "nic", "nictype=routed", "name=rt9", "ipv4.address=10.232.0.9")
    assert "10.232.0.9/32" in inside(d, box, "ip", "addr", "show", "rt9")
    ping_from(d, box, "169.254.0.1")
    d.lxc("config", "device", "remove", box, "hr")
    assert veths(ns) == before
    # security.mac_filtering on a bridge the daemon doesn't manage: another source MAC gets nowhere
    d.lxc("config", "device", "add", box, "mf", "nic", "nictype=bridged", f"parent={host_links['bridge']}",
          "name=mf0", "security.mac_filtering=true")
    host = config_of(d, box)["volatile.mf.host_name"]
    assert host in ns.run("nft", "list", "ruleset").stdout
    inside(d, box, "ip", "addr", "add", "10.231.0.11/24", "dev", "mf0")
    d.lxc("exec", box, "--", "ping", "-c", "1", "-W", "2", "-I", "mf0", "10.231.0.1")
    inside(d, box, "ip", "link", "set", "mf0", "address", "00:16:3e:bb:00:01")
    r = d.lxc("exec", box, "--", "ping", "-c", "1", "-W", "2", "-I", "mf0", "10.231.0.1", check=False)
    assert r.returncode != 0
    d.lxc("config", "device", "remove", box, "mf")
    assert host not in ns.run("nft", "list", "ruleset").stdout and veths(ns) == before
    # a name another nic has: a clear error; one taken inside by hand: too, nothing left behind
    r = d.lxc("config", "device", "add", box, "dup", "nic", "nictype=p2p", "name=eth0", check=False)
    assert r.returncode != 0 and "already used by device 'eth0'" in r.stderr, r.stderr
    inside(d, box, "ip", "link", "set", "lo", "up")
    r = d.lxc("config", "device", "add", box, "dup", "nic", "nictype=p2p", "name=lo", check=False)
    assert r.returncode != 0 and "already exists" in r.stderr, r.stderr
    assert veths(ns) == before


def test_stop_gives_everything_back(net_daemon, box, host_links):
    d, ns = net_daemon, net_daemon.netns
    hw = config_of(d, box)["volatile.eth0.hwaddr"]
    d.lxc("stop", "-f", box)
    conf = config_of(d, box)
    assert conf["volatile.eth0.hwaddr"] == hw  # kept
    assert not any(k.endswith(".host_name") for k in conf)
    wait_for(lambda: host_links["phys"] in links(ns), timeout=10)
    wait_for(lambda: host_links["phys_mac"] in ns.run("ip", "link", "show", host_links["phys"]).stdout, timeout=10)
    assert "mtu 1500" in ns.run("ip", "link", "show", host_links["phys"]).stdout  # given back as it was
    assert not veths(ns)
    assert "10.232.0.5" not in ns.run("ip", "neigh", "show", "proxy", "dev", host_links["macvlan"]).stdout
    d.lxc("start", box)
    assert config_of(d, box)["volatile.eth0.hwaddr"] == hw
    assert hw in inside(d, box, "cat", "/sys/class/net/eth0/address")


def test_bad_nics_are_refused(net_daemon, box):
    d = net_daemon
    for opts, fragment in ((["nictype=bridged", "parent=nosuchbr0"], "doesn't exist"),
                           (["nictype=macvlan"], "need a parent"),
                           (["nictype=bridged", "parent=br0", "hwaddr=zz"], "Invalid MAC address")):
        r = d.lxc("config", "device", "add", box, "bad", "nic", *opts, check=False)
        assert r.returncode != 0 and fragment in r.stderr, r.stderr


def test_ipvlan(net_daemon, host_links):
    """ipvlan (l3s): the address and a device default route, or, on a kernel without ipvlan
    (this test host's), a clear refusal at start."""
    d = net_daemon
    name = run_prefix() + "-iv"
    d.lxc("init", "busybox", name)
    try:
        d.lxc("config", "device", "add", name, "iv", "nic", "nictype=ipvlan", f"parent={host_links['macvlan']}",
              "name=iv0", "ipv4.address=10.233.0.7")
        r = d.lxc("start", name, check=False)
        if r.returncode != 0:
            assert "CONFIG_IPVLAN" in r.stderr, r.stderr
            return
        assert "10.233.0.7/32" in inside(d, name, "ip", "addr", "show", "iv0")
        assert "default dev iv0" in inside(d, name, "ip", "route")
    finally:
        d.lxc("delete", "-f", name, check=False)


def test_daemon_restart_keeps_the_nics(net_daemon, box, host_links):
    """A restarted daemon leaves running containers' interfaces alone, and still knows their host
    ends (volatile.<dev>.host_name): stopping afterwards removes them."""
    d, ns = net_daemon, net_daemon.netns
    host = config_of(d, box)["volatile.eth0.host_name"]
    inside(d, box, "ip", "addr", "add", "10.231.0.3/24", "dev", "eth0")
    rate = d.lxc("config", "device", "get", box, "eth0", "limits.max").stdout.strip()
    d.stop()
    # a host change while the daemon is down: the nic's shaping goes; the next daemon puts it back
    ns.run("tc", "qdisc", "del", "dev", host, "root")
    assert f"rate {rate}" not in ns.run("tc", "class", "show", "dev", host).stdout
    d.start()
    assert host in veths(ns)
    wait_for(lambda: f"rate {rate}" in ns.run("tc", "class", "show", "dev", host).stdout, timeout=10)
    ping_from(d, box, "10.231.0.1")
    st = d.api("GET", f"/1.0/instances/{box}/state").json()["metadata"]["network"]
    assert st["eth0"]["host_name"] == host
    d.lxc("stop", "-f", box)
    assert not veths(ns)
    d.lxc("start", box)


def _ipv4_of(d, name: str, ifname: str = "eth0") -> list[str]:
    st = d.api("GET", f"/1.0/instances/{name}/state").json()["metadata"]["network"] or {}
    return [a["address"] for a in st.get(ifname, {}).get("addresses", [])
            if a["family"] == "inet" and a["scope"] == "global"]


def _ipv6_of(d, name: str, ifname: str = "eth0") -> list[str]:
    st = d.api("GET", f"/1.0/instances/{name}/state").json()["metadata"]["network"] or {}
    return [a["address"] for a in st.get(ifname, {}).get("addresses", [])
            if a["family"] == "inet6" and a["scope"] == "global"]


@pytest.fixture(scope="module")
def managed(net_daemon):
    d = net_daemon
    net = f"nn{run_prefix()[1:6]}"
    d.lxc("network", "create", net, "ipv4.address=10.236.0.1/24", "ipv4.nat=true",
          "ipv6.address=fd42:236::1/64")
    made: list[str] = []
    yield net, made
    for n in made:
        d.lxc("delete", "-f", n, check=False)
    d.lxc("network", "delete", net, check=False)


def test_managed_bridge_dhcp_static_dns_and_filtering(net_daemon, managed):
    d, ns = net_daemon, net_daemon.netns
    net, made = managed
    a, b = run_prefix() + "-a", run_prefix() + "-b"
    made += [a, b]
    d.lxc("launch", "busybox", a, "-n", net)  # the stock client's -n: a nic with network=
    devices = d.api("GET", f"/1.0/instances/{a}").json()["metadata"]["devices"]
    assert devices["eth0"] == {"type": "nic", "network": net, "name": "eth0"}, devices
    d.lxc("init", "busybox", b, "-n", net)
    d.lxc("config", "device", "set", b, "eth0", "ipv4.address=10.236.0.50", "security.ipv4_filtering=true")
    d.lxc("start", b)
    wait_for(lambda: _ipv4_of(d, a), timeout=20)
    assert _ipv4_of(d, a)[0].startswith("10.236.0.")
    wait_for(lambda: _ipv4_of(d, b) == ["10.236.0.50"], timeout=20)
    wait_for(lambda: any(x.startswith("fd42:236:") for x in _ipv6_of(d, a)), timeout=20)
    listing = d.lxc("list", a, "--format", "csv", "-c", "n46").stdout
    assert _ipv4_of(d, a)[0] in listing and "fd42:236:" in listing
    # the bridge answers, and names resolve through its dnsmasq
    ping_from(d, b, "10.236.0.1")
    out = d.lxc("exec", b, "--", "nslookup", a, "10.236.0.1", check=False)
    assert _ipv4_of(d, a)[0] in out.stdout, out.stdout + out.stderr
    # `lxc network attach`: a device named after the network, on the next free ethN (kept in
    # volatile.<dev>.name), hot-plugged; detach takes it out again, veth and all
    before = veths(ns)
    d.lxc("network", "attach", net, a)
    conf = config_of(d, a)
    assert conf[f"volatile.{net}.name"] == "eth1" and conf[f"volatile.{net}.host_name"] in veths(ns)
    assert conf[f"volatile.{net}.hwaddr"] in inside(d, a, "ip", "link", "show", "eth1")
    d.lxc("network", "detach", net, a, net)  # two nics of a are on it: name the device
    assert "eth1" not in inside(d, a, "ip", "link") and veths(ns) == before
    assert not any(k.startswith(f"volatile.{net}.") for k in config_of(d, a))
    # security.ipv4_filtering: an address the nic wasn't given gets nowhere
    inside(d, b, "ip", "addr", "add", "10.236.0.98/24", "dev", "eth0")
    r = d.lxc("exec", b, "--", "ping", "-c", "1", "-W", "2", "-I", "10.236.0.98", "10.236.0.1", check=False)
    assert r.returncode != 0
    ping_from(d, b, "10.236.0.1")
    # stopping removes the host end; the DHCP entry stays with the nic
    host = config_of(d, b)["volatile.eth0.host_name"]
    d.lxc("stop", "-f", b)
    assert host not in links(ns)


def test_static_addresses_are_checked(net_daemon, managed):
    d = net_daemon
    net, made = managed
    c = run_prefix() + "-c"
    made.append(c)
    d.lxc("init", "busybox", c, "-n", net)
    for value, fragment in (("10.99.0.5", "not a usable address"), ("10.236.0.1", "not a usable address")):
        r = d.lxc("config", "device", "set", c, "eth0", f"ipv4.address={value}", check=False)
        assert r.returncode != 0 and fragment in r.stderr, r.stderr
    # taken by another instance's nic on the same network
    d.lxc("config", "device", "set", c, "eth0", "ipv4.address=10.236.0.60")
    other = run_prefix() + "-d"
    made.append(other)
    d.lxc("init", "busybox", other, "-n", net)
    r = d.lxc("config", "device", "set", other, "eth0", "ipv4.address=10.236.0.60", check=False)
    assert r.returncode != 0 and "already used by" in r.stderr, r.stderr
    r = d.lxc("config", "device", "add", other, "eth1", "nic", "network=nosuchnet", check=False)
    assert r.returncode != 0 and "nosuchnet" in r.stderr, r.stderr


def test_init_on_an_unmanaged_bridge(net_daemon, host_links):
    """`lxc init -n BRIDGE` with a bridge the daemon doesn't manage: the client makes a bridged nic
    with parent=; it gets its MAC and name in volatile at once."""
    d = net_daemon
    name = run_prefix() + "-u"
    d.lxc("init", "busybox", name, "-n", host_links["bridge"])
    try:
        meta = d.api("GET", f"/1.0/instances/{name}").json()["metadata"]
        assert meta["devices"]["eth0"] == {"type": "nic", "nictype": "bridged", "parent": host_links["bridge"],
                                           "name": "eth0"}
        assert meta["config"]["volatile.eth0.hwaddr"].startswith("00:16:3e:")
    finally:
        d.lxc("delete", "-f", name, check=False)


@pytest.fixture(scope="module")
def debian_image(tmp_path_factory):
    """The image `lxd-imagebuilder debian` builds (a couple of minutes), or the one named by
    $LXD_TEST_DEBIAN_IMAGE (a unified tarball that command built)."""
    import os
    import subprocess
    import sys

    given = os.environ.get("LXD_TEST_DEBIAN_IMAGE")
    if given:
        return given
    import shutil

    if not shutil.which("debootstrap"):
        pytest.skip("needs debootstrap")
    out = tmp_path_factory.mktemp("debian")
    r = subprocess.run([sys.executable, "-m", "lxd_daemon.imagebuilder.cli", "debian", "--output", f"{out}/",
                        "--alias-hint", "deb"], capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    return dict(line.split(": ", 1) for line in r.stdout.splitlines() if ": " in line)["image"]


@pytest.mark.slow
def test_debian_image_gets_its_address_by_dhcp(net_daemon, managed, debian_image):
    """The Debian image's own DHCP client (ifupdown + isc-dhcp-client, allow-hotplug eth0) asks
    the managed bridge's dnsmasq at boot; the kernel takes an IPv6 address from its RAs."""
    d = net_daemon
    net, made = managed
    alias = run_prefix() + "-deb"
    d.lxc("image", "import", debian_image, "--alias", alias)
    name = run_prefix() + "-deb"
    made.append(name)
    try:
        d.lxc("launch", alias, name, "-n", net)
        wait_for(lambda: _ipv4_of(d, name), timeout=60)
        assert _ipv4_of(d, name)[0].startswith("10.236.0.")
        wait_for(lambda: any(x.startswith("fd42:236:") for x in _ipv6_of(d, name)), timeout=30)
        assert "default via 10.236.0.1 dev eth0" in inside(d, name, "ip", "route")  # the lease's router
    finally:
        d.lxc("delete", "-f", name, check=False)
        d.lxc("image", "delete", alias, check=False)


def test_nics_on_managed_macvlan_and_physical_networks(net_daemon, box, host_links):
    """network= on a macvlan network: a macvlan nic on the network's parent (hot-plugged here);
    on a physical network: the parent itself moves in and comes back."""
    d, ns = net_daemon, net_daemon.netns
    tag = run_prefix()[1:6]
    mv, ph = f"mv{tag}", f"ph{tag}"
    pa, pb = f"pa{tag}", f"pb{tag}"
    ns.run("ip", "link", "add", pa, "type", "veth", "peer", "name", pb)
    d.lxc("network", "create", mv, "--type=macvlan", f"parent={host_links['macvlan']}")
    d.lxc("network", "create", ph, "--type=physical", f"parent={pa}")
    try:
        d.lxc("config", "device", "add", box, "mvn", "nic", f"network={mv}", "name=mn0")
        text = inside(d, box, "ip", "link", "show", "mn0")
        assert config_of(d, box)["volatile.mvn.hwaddr"] in text and "UP" in text
        d.lxc("config", "device", "add", box, "phn", "nic", f"network={ph}", "name=pn0")
        assert pa not in links(ns) and "pn0" in inside(d, box, "ip", "link")
        d.lxc("config", "device", "remove", box, "phn")
        assert pa in links(ns)
        d.lxc("config", "device", "remove", box, "mvn")
        assert "mn0" not in inside(d, box, "ip", "link")
    finally:
        d.lxc("config", "device", "remove", box, "mvn", check=False)
        d.lxc("config", "device", "remove", box, "phn", check=False)
        d.lxc("network", "delete", mv, check=False)
        d.lxc("network", "delete", ph, check=False)
        ns.run("ip", "link", "del", pa, check=False)
