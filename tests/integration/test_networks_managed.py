"""Issue 10, items 1-3 and 7: managed networks through the stock client (`lxc network
create/list/show/get/set/unset/edit/rename/delete/info/list-leases`), curl and pylxd, on a daemon
inside a network namespace of the module's own (`net_daemon`): every bridge, nftables chain and
dnsmasq these tests make lives and dies there."""

from __future__ import annotations

import ipaddress
import json
import os
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import envelope_ok, run_prefix, wait_for
from tests.netns import links

pytestmark = pytest.mark.integration


@pytest.fixture
def netname(net_daemon):
    """Unique network names (at most 15 characters); whatever bears one is deleted afterwards."""
    made: list[str] = []
    prefix = run_prefix()

    def make() -> str:
        n = f"{prefix}b{len(made)}"
        made.append(n)
        return n

    yield make
    for n in made:
        net_daemon.lxc("network", "delete", n, check=False)


def ns_run(d, *cmd, check=True):
    return d.netns.run(*cmd, check=check)


def addrs(d, dev: str) -> set[str]:
    out = json.loads(ns_run(d, "ip", "-j", "addr", "show", "dev", dev).stdout)
    return {f"{a['local']}/{a['prefixlen']}" for a in out[0]["addr_info"] if a.get("scope") == "global"}


def net_chains(d, name: str) -> list[str]:
    """Chains of the daemon's nftables table that belong to network `name`."""
    r = ns_run(d, "nft", "-j", "list", "table", "inet", "lxd", check=False)
    if r.returncode != 0:
        return []
    chains = [x["chain"]["name"] for x in json.loads(r.stdout)["nftables"] if "chain" in x]
    return [c for c in chains if c.split(".")[-1] == name]


def dnsmasq_pid(d, name: str) -> int | None:
    pidfile = d.lxd_dir / "networks" / name / "dnsmasq.pid"
    try:
        pid = int(pidfile.read_text().strip())
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    if not cmd[0].endswith(b"dnsmasq") or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
        return None
    return pid


def dnsmasq_pids_for(name: str) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if cmd and cmd[0].endswith(b"dnsmasq") and f"--interface={name}".encode() in cmd and state != "Z":
            out.append(int(entry))
    return out


def gone(d, name: str) -> None:
    """Nothing of network `name` is left: bridge, nftables chains, dnsmasq, state directory."""
    assert name not in links(d.netns)
    assert net_chains(d, name) == []
    assert wait_for(lambda: not dnsmasq_pids_for(name), timeout=5)
    assert not (d.lxd_dir / "networks" / name).exists()


def test_create_fills_lxds_defaults_and_picks_unused_subnets(net_daemon, netname):
    d = net_daemon
    # Half of 10/8 is routed on the host: `auto` must stay out of it (read from the routing
    # table, never by probing).
    ns_run(d, "ip", "link", "add", "taken0", "type", "bridge")
    try:
        ns_run(d, "ip", "addr", "add", "10.128.0.1/9", "dev", "taken0")
        ns_run(d, "ip", "link", "set", "taken0", "up")
        taken = ipaddress.ip_network("10.128.0.0/9")
        chosen = []
        for _ in range(3):
            name = netname()
            r = d.lxc("network", "create", name)
            assert f"Network {name} created" in r.stdout
            cfg = d.api("GET", f"/1.0/networks/{name}").json()["metadata"]["config"]
            assert cfg["ipv4.nat"] == "true" and cfg["ipv6.nat"] == "true"
            v4 = ipaddress.ip_interface(cfg["ipv4.address"])
            v6 = ipaddress.ip_interface(cfg["ipv6.address"])
            assert str(v4).startswith("10.") and v4.network.prefixlen == 24 and str(v4.ip).endswith(".1")
            assert str(v6).startswith("fd42:") and v6.network.prefixlen == 64
            assert not v4.network.overlaps(taken)
            assert all(not v4.network.overlaps(o) for o in chosen)
            chosen.append(v4.network)
            assert addrs(d, name) == {str(v4), str(v6)}
            assert net_chains(d, name), "NAT/firewall chains of the network"
            assert dnsmasq_pid(d, name)
    finally:
        ns_run(d, "ip", "link", "del", "taken0", check=False)


def test_show_get_set_unset_edit(net_daemon, netname):
    d = net_daemon
    name = netname()
    d.lxc("network", "create", name, "ipv4.address=10.61.0.1/24", "ipv4.nat=false", "ipv6.address=none")
    d.api("PATCH", f"/1.0/networks/{name}", json={"description": "first"})
    show = yaml.safe_load(d.lxc("network", "show", name).stdout)
    assert show["config"] == {"ipv4.address": "10.61.0.1/24", "ipv4.nat": "false", "ipv6.address": "none"}
    assert show["managed"] is True and show["type"] == "bridge" and show["status"] == "Created"
    assert show["description"] == "first" and show["locations"] == ["none"] and show["used_by"] == []
    assert d.lxc("network", "get", name, "ipv4.address").stdout.strip() == "10.61.0.1/24"
    d.lxc("network", "set", name, "ipv4.dhcp.expiry", "2h")
    assert d.lxc("network", "get", name, "ipv4.dhcp.expiry").stdout.strip() == "2h"
    pid = dnsmasq_pid(d, name)
    assert pid and "10.61.0.254,255.255.255.0,2h" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(
        errors="replace").replace("\0", " ")
    # it runs as nobody, as LXD runs it (the fixture's LXD_DIR is reachable, as /var/lib/lxd is)
    uid = [ln.split()[1] for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("Uid:")]
    assert uid == ["65534"], uid
    d.lxc("network", "unset", name, "ipv4.dhcp.expiry")
    assert d.lxc("network", "get", name, "ipv4.dhcp.expiry").stdout.strip() == ""
    # A new address takes the old one's place on the bridge.
    d.lxc("network", "set", name, "ipv4.address", "10.62.0.1/24")
    assert addrs(d, name) == {"10.62.0.1/24"}
    show["config"]["ipv4.address"] = "10.62.0.1/24"
    show["config"]["user.note"] = "edited"
    show["description"] = "second"
    d.lxc("network", "edit", name, input=yaml.safe_dump(show))
    after = d.api("GET", f"/1.0/networks/{name}").json()["metadata"]
    assert after["config"]["user.note"] == "edited" and after["description"] == "second"
    # `lxc network list` shows it with its addresses.
    listed = {n["name"]: n for n in json.loads(d.lxc("network", "list", "--format", "json").stdout)}
    assert listed[name]["managed"] is True and listed[name]["config"]["ipv4.address"] == "10.62.0.1/24"
    assert "lo" in listed and listed["lo"]["managed"] is False


def test_api_201_location_etag_and_patch(net_daemon, netname):
    d = net_daemon
    name = netname()
    r = d.api("POST", "/1.0/networks", json={"name": name, "type": "bridge", "description": "d",
                                             "config": {"ipv4.address": "10.63.0.1/24", "ipv6.address": "none"}})
    assert r.status_code == 201, r.text
    assert r.headers["location"] == f"/1.0/networks/{name}"
    envelope_ok(r.json())
    r = d.api("GET", f"/1.0/networks/{name}")
    etag = r.headers["etag"]
    cfg = r.json()["metadata"]["config"]
    # LXD fills NAT only for an `auto` address.
    assert cfg == {"ipv4.address": "10.63.0.1/24", "ipv6.address": "none"}
    bad = d.api("PUT", f"/1.0/networks/{name}", headers={"If-Match": '"nope"'}, json={"config": cfg})
    assert bad.status_code == 412, bad.text
    ok = d.api("PATCH", f"/1.0/networks/{name}", headers={"If-Match": etag},
               json={"config": {"ipv4.dhcp": "false"}})
    assert ok.status_code == 200, ok.text
    got = d.api("GET", f"/1.0/networks/{name}").json()["metadata"]
    assert got["config"] == {**cfg, "ipv4.dhcp": "false"} and got["description"] == "d"
    # PUT replaces the config as a whole.
    assert d.api("PUT", f"/1.0/networks/{name}", json={"config": cfg}).status_code == 200
    assert d.api("GET", f"/1.0/networks/{name}").json()["metadata"]["config"] == cfg
    body = json.loads(d.curl(f"lxd/1.0/networks/{name}/state").stdout)["metadata"]
    assert {"family": "inet", "address": "10.63.0.1", "netmask": "24", "scope": "global"} in body["addresses"]
    assert body["mtu"] == 1500 and body["hwaddr"].startswith("00:16:3e:") and body["bridge"] is not None


@pytest.mark.parametrize("body, status, message", [
    ({"name": "x" * 16}, 400, "Network interface is too long (maximum 15 characters)"),
    ({"name": "lo"}, 400, "Network interface 'lo' already exists"),
    ({"name": "bad/name"}, 400, "may not contain slashes"),
    ({"name": "ok0", "type": "nosuch"}, 400, "Unknown network type 'nosuch'"),
    ({"name": "ok0", "config": {"nosuch.key": "1"}}, 400, "Invalid option for network 'ok0' option 'nosuch.key'"),
    ({"name": "ok0", "config": {"ipv4.address": "10.0.0.0/24"}}, 400,
     "Invalid value for network 'ok0' option 'ipv4.address': Not a usable IPv4 address '10.0.0.0/24'"),
    ({"name": "ok0", "config": {"ipv4.address": "300.0.0.1/24"}}, 400, "invalid CIDR address"),
    ({"name": "ok0", "config": {"bridge.mtu": "9"}}, 400, "Out of MTU range"),
    ({"name": "ok0", "type": "macvlan", "config": {}}, 400, "option 'parent': Required value"),
    ({"name": "ok0", "type": "macvlan", "config": {"parent": "nosuch0"}}, 400, "Parent interface 'nosuch0' not found"),
    ({"name": "", "config": {}}, 400, "No name provided"),
    # A host failure half-way (dnsmasq refuses its config) undoes the bridge and its rules.
    ({"name": "ok0", "config": {"ipv4.address": "10.98.0.1/24", "ipv6.address": "none",
                                "raw.dnsmasq": "no-such-option=1"}}, 500, "Failed to start dnsmasq for network 'ok0'"),
])
def test_bad_input_is_refused_and_leaves_nothing(net_daemon, body, status, message):
    d = net_daemon
    before = links(d.netns)
    r = d.api("POST", "/1.0/networks", json=body)
    assert r.status_code == status, r.text
    assert message in r.json()["error"], r.json()["error"]
    assert links(d.netns) == before
    assert "ok0" not in [n.rsplit("/", 1)[1] for n in d.api("GET", "/1.0/networks").json()["metadata"]]
    assert not (d.lxd_dir / "networks" / "ok0").exists()
    assert net_chains(d, "ok0") == [] and not dnsmasq_pids_for("ok0")


def test_overlapping_subnets_are_refused(net_daemon, netname):
    d = net_daemon
    a, b = netname(), netname()
    d.lxc("network", "create", a, "ipv4.address=10.64.0.1/24", "ipv6.address=fd42:64::1/64")
    r = d.lxc("network", "create", b, "ipv4.address=10.64.0.129/25", "ipv6.address=none", check=False)
    assert r.returncode != 0
    assert f"IPv4 subnet 10.64.0.128/25 overlaps with the subnet 10.64.0.0/24 of network '{a}'" in r.stderr
    r = d.lxc("network", "create", b, "ipv4.address=none", "ipv6.address=fd42:64::2/64", check=False)
    assert "IPv6 subnet fd42:64::/64 overlaps" in r.stderr
    assert b not in links(d.netns) and not (d.lxd_dir / "networks" / b).exists()
    # A change to an overlapping subnet is refused and changes nothing.
    d.lxc("network", "create", b, "ipv4.address=10.65.0.1/24", "ipv6.address=none")
    r = d.lxc("network", "set", b, "ipv4.address", "10.64.0.5/16", check=False)
    assert r.returncode != 0 and "overlaps" in r.stderr
    assert addrs(d, b) == {"10.65.0.1/24"}
    # Its own current subnet is no obstacle to a change of it.
    d.lxc("network", "set", b, "ipv4.address", "10.65.0.2/24")
    assert addrs(d, b) == {"10.65.0.2/24"}


def test_rename_and_delete_rules(net_daemon, netname, names):
    d = net_daemon
    a, b = netname(), netname()
    d.lxc("network", "create", a, "ipv4.address=10.66.0.1/24", "ipv6.address=none")
    d.lxc("network", "create", b, "ipv4.address=10.67.0.1/24", "ipv6.address=none")
    r = d.api("POST", f"/1.0/networks/{a}", json={"name": b})
    assert r.status_code == 409 and f"Network '{b}' already exists" in r.json()["error"]
    r = d.api("POST", f"/1.0/networks/{a}", json={"name": "lo"})
    assert r.status_code == 400 and "Network interface 'lo' already exists" in r.json()["error"]
    assert a in links(d.netns)

    # In use by a profile: listed in used_by, neither renamed nor deleted.
    profile = names("prof")
    d.lxc("profile", "create", profile)
    d.lxc("profile", "device", "add", profile, "eth0", "nic", f"network={a}", "name=eth0")
    try:
        assert d.api("GET", f"/1.0/networks/{a}").json()["metadata"]["used_by"] == [f"/1.0/profiles/{profile}"]
        r = d.lxc("network", "delete", a, check=False)
        assert r.returncode != 0 and "The network is currently in use" in r.stderr
        r = d.lxc("network", "rename", a, netname(), check=False)
        assert r.returncode != 0 and "Network is currently in use" in r.stderr
        assert a in links(d.netns) and dnsmasq_pid(d, a)
    finally:
        d.lxc("profile", "delete", profile)

    new = netname()
    r = d.api("POST", f"/1.0/networks/{a}", json={"name": new})
    assert r.status_code == 201 and r.headers["location"] == f"/1.0/networks/{new}"
    assert new in links(d.netns) and a not in links(d.netns)
    assert addrs(d, new) == {"10.66.0.1/24"} and dnsmasq_pid(d, new) and net_chains(d, new)
    assert net_chains(d, a) == [] and not (d.lxd_dir / "networks" / a).exists()
    assert d.api("GET", f"/1.0/networks/{a}").status_code == 404

    d.lxc("network", "delete", new)
    gone(d, new)
    assert d.api("GET", f"/1.0/networks/{new}").status_code == 404


def test_info_and_list_leases_with_the_stock_client(net_daemon, netname):
    d = net_daemon
    name = netname()
    d.lxc("network", "create", name, "ipv4.address=10.68.0.1/24", "ipv6.address=fd42:68::1/64")
    info = d.lxc("network", "info", name).stdout
    assert f"Name: {name}" in info and "State: up" in info
    assert "10.68.0.1/24 (global)" in info and "fd42:68::1/64 (global)" in info
    assert "MTU: 1500" in info and "Bridge:" in info
    leases = json.loads(d.lxc("network", "list-leases", name, "--format", "json").stdout)
    assert {(x["hostname"], x["address"], x["type"]) for x in leases} >= {
        (f"{name}.gw", "10.68.0.1", "gateway"), (f"{name}.gw", "fd42:68::1", "gateway")}
    # A lease dnsmasq handed out shows up as dynamic.
    leasefile = d.lxd_dir / "networks" / name / "dnsmasq.leases"
    leasefile.write_text(f"{int(time.time()) + 3600} 00:16:3e:11:22:33 10.68.0.77 somehost *\n")
    got = d.api("GET", f"/1.0/networks/{name}/leases").json()["metadata"]
    assert {"hostname": "somehost", "hwaddr": "00:16:3e:11:22:33", "address": "10.68.0.77",
            "type": "dynamic", "location": "none"}.items() <= next(
        x for x in got if x["address"] == "10.68.0.77").items()


def test_unmanaged_interfaces_cannot_be_changed(net_daemon):
    d = net_daemon
    for method, path in (("PUT", "/1.0/networks/lo"), ("PATCH", "/1.0/networks/lo"),
                         ("POST", "/1.0/networks/lo"), ("DELETE", "/1.0/networks/lo"),
                         ("GET", "/1.0/networks/lo/leases")):
        r = d.api(method, path, json={"name": "x", "config": {}})
        assert r.status_code == 404, (method, path, r.text)
        assert r.json()["error"] == "Failed loading network: Network not found"
    assert "lo" in links(d.netns)


def test_macvlan_and_physical_networks(net_daemon, netname):
    d = net_daemon
    for parent in ("parent0", "parent2"):
        ns_run(d, "ip", "link", "add", parent, "type", "veth", "peer", "name", parent + "p")
    try:
        mv, ph = netname(), netname()
        d.lxc("network", "create", mv, "--type=macvlan", "parent=parent0", "mtu=1400")
        d.lxc("network", "create", ph, "--type=physical", "parent=parent2", "ipv4.gateway=192.0.2.1/24")
        listed = {n["name"]: n for n in d.api("GET", "/1.0/networks?recursion=1").json()["metadata"]}
        assert listed[mv]["type"] == "macvlan" and listed[mv]["managed"] is True
        assert listed[ph]["type"] == "physical" and listed[ph]["config"]["parent"] == "parent2"
        assert listed["parent0"]["managed"] is False
        assert d.lxc("network", "get", mv, "mtu").stdout.strip() == "1400"
        # A physical interface belongs to one network only.
        r = d.lxc("network", "create", netname(), "--type=physical", "parent=parent2", check=False)
        assert r.returncode != 0 and "Parent interface 'parent2' in use by another network" in r.stderr
        r = d.lxc("network", "create", netname(), "--type=physical", "parent=parent0", check=False)
        assert r.returncode != 0 and "Parent interface 'parent0' in use by another network" in r.stderr
        r = d.lxc("network", "set", mv, "vlan", "5000", check=False)
        assert r.returncode != 0 and "Out of VLAN ID range" in r.stderr
        r = d.api("GET", f"/1.0/networks/{mv}/leases")
        assert r.status_code == 501
        st = d.api("GET", f"/1.0/networks/{mv}/state").json()["metadata"]
        assert st["state"] in ("up", "down") and "counters" in st
        d.lxc("network", "rename", mv, mv + "r")
        d.lxc("network", "delete", mv + "r")
        d.lxc("network", "delete", ph)
        assert {"parent0", "parent2"} <= links(d.netns)  # the parents are the host's, left alone
    finally:
        for parent in ("parent0", "parent2"):
            ns_run(d, "ip", "link", "del", parent, check=False)


def test_pylxd(net_daemon, netname):
    d = net_daemon
    name = netname()
    r = d.pylxd(f"client.networks.create({name!r}, description='py', type='bridge', "
                "config={'ipv4.address': '10.69.0.1/24', 'ipv6.address': 'none'})\n"
                f"n = client.networks.get({name!r})\n"
                "print(n.managed, n.type, n.config['ipv4.address'])\n"
                "n.config['ipv4.dhcp.expiry'] = '3h'\n"
                "n.save()\n"
                f"print(client.networks.get({name!r}).config.get('ipv4.dhcp.expiry'))\n"
                f"print(client.networks.exists({name!r}))\n"
                "n.delete()\n"
                f"print(client.networks.exists({name!r}))\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["True bridge 10.69.0.1/24", "3h", "True", "False"]
    gone(d, name)


def test_daemon_restart_keeps_networks_running_and_delete_cleans_up(net_daemon, netname):
    d = net_daemon
    name, mv = netname(), netname()
    d.lxc("network", "create", name, "ipv4.address=10.70.0.1/24", "ipv6.address=fd42:70::1/64")
    ns_run(d, "ip", "link", "add", "parent1", "type", "veth", "peer", "name", "parent1p")
    d.lxc("network", "create", mv, "--type=macvlan", "parent=parent1")
    pid = dnsmasq_pid(d, name)
    index = ns_run(d, "cat", f"/sys/class/net/{name}/ifindex").stdout
    chains = net_chains(d, name)
    assert pid and chains
    d.stop()
    ns_run(d, "ip", "link", "del", "parent1")
    # While the daemon is down, the bridge, its rules and dnsmasq stay (containers keep networking).
    assert name in links(d.netns) and dnsmasq_pid(d, name) == pid and net_chains(d, name) == chains
    d.start()
    assert dnsmasq_pid(d, name) == pid, "the running dnsmasq is adopted, not restarted"
    assert ns_run(d, "cat", f"/sys/class/net/{name}/ifindex").stdout == index
    assert addrs(d, name) == {"10.70.0.1/24", "fd42:70::1/64"}
    # A network whose parent went away while the daemon was down is listed as LXD lists it.
    assert d.api("GET", f"/1.0/networks/{mv}").json()["metadata"]["status"] == "Unavailable"
    assert d.api("GET", f"/1.0/networks/{name}").json()["metadata"]["status"] == "Created"
    d.lxc("network", "delete", mv)
    # dnsmasq killed: restarted by the daemon.
    os.kill(pid, 9)
    assert wait_for(lambda: dnsmasq_pid(d, name) not in (None, pid), timeout=15)
    d.lxc("network", "delete", name)
    gone(d, name)


def test_attach_profile_and_detach_profile(net_daemon, netname, names):
    d = net_daemon
    name = netname()
    d.lxc("network", "create", name, "ipv4.address=10.73.0.1/24", "ipv6.address=none")
    profile = names("ap")
    d.lxc("profile", "create", profile)
    try:
        d.lxc("network", "attach-profile", name, profile, "eth0")
        devices = d.api("GET", f"/1.0/profiles/{profile}").json()["metadata"]["devices"]
        assert devices["eth0"]["type"] == "nic"
        assert name in (devices["eth0"].get("network"), devices["eth0"].get("parent"))
        assert d.api("GET", f"/1.0/networks/{name}").json()["metadata"]["used_by"] == [f"/1.0/profiles/{profile}"]
        d.lxc("network", "detach-profile", name, profile, "eth0")
        assert d.api("GET", f"/1.0/profiles/{profile}").json()["metadata"]["devices"] == {}
        assert d.api("GET", f"/1.0/networks/{name}").json()["metadata"]["used_by"] == []
    finally:
        d.lxc("profile", "delete", profile, check=False)
    # The same for an instance (`lxc network attach/detach`), here a stopped one.
    inst = names("at")
    d.lxc("init", "busybox", inst)
    d.lxc("network", "attach", name, inst, "eth1")
    dev = d.api("GET", f"/1.0/instances/{inst}").json()["metadata"]["devices"]["eth1"]
    assert dev["type"] == "nic" and name in (dev.get("network"), dev.get("parent"))
    assert d.api("GET", f"/1.0/networks/{name}").json()["metadata"]["used_by"] == [f"/1.0/instances/{inst}"]
    d.lxc("network", "detach", name, inst)
    assert "eth1" not in d.api("GET", f"/1.0/instances/{inst}").json()["metadata"]["devices"]
    assert d.api("GET", f"/1.0/networks/{name}").json()["metadata"]["used_by"] == []


def test_preseed_creates_and_updates_networks(net_daemon, netname):
    d = net_daemon
    name = netname()
    seed = {"networks": [{"name": name, "type": "bridge", "description": "seeded",
                          "config": {"ipv4.address": "10.74.0.1/24", "ipv6.address": "none"}}]}
    d.lxd("init", "--preseed", input=yaml.safe_dump(seed))
    got = d.api("GET", f"/1.0/networks/{name}").json()["metadata"]
    assert got["description"] == "seeded" and got["config"]["ipv4.address"] == "10.74.0.1/24"
    assert addrs(d, name) == {"10.74.0.1/24"}
    # Again with a change: the existing network is updated, not created twice.
    seed["networks"][0]["config"]["ipv4.address"] = "10.75.0.1/24"
    d.lxd("init", "--preseed", input=yaml.safe_dump(seed))
    assert addrs(d, name) == {"10.75.0.1/24"}
    dumped = yaml.safe_load(d.lxd("init", "--dump").stdout)
    assert [n for n in dumped["networks"] if n["name"] == name] == [
        {"name": name, "description": "seeded", "type": "bridge",
         "config": {"ipv4.address": "10.75.0.1/24", "ipv6.address": "none"}}]
    # `lxd init --auto` alone makes no network.
    before = d.api("GET", "/1.0/networks").json()["metadata"]
    d.lxd("init", "--auto")
    assert d.api("GET", "/1.0/networks").json()["metadata"] == before


def test_leases_and_used_by_of_a_running_container(net_daemon, netname, names):
    d = net_daemon
    name = netname()
    d.lxc("network", "create", name, "ipv4.address=10.76.0.1/24", "ipv6.address=fd42:76::1/64")
    c = names("c")
    d.lxc("launch", "busybox", c, "-n", name)

    def leased():
        got = d.api("GET", f"/1.0/networks/{name}/leases").json()["metadata"]
        return [x for x in got if x["address"].startswith("10.76.0.") and x["type"] == "dynamic"]

    assert wait_for(leased, timeout=30), "the container got a DHCP lease"
    lease = leased()[0]
    hwaddr = d.lxc("config", "get", c, "volatile.eth0.hwaddr").stdout.strip()
    assert lease["hostname"] == c and lease["hwaddr"] == hwaddr and lease["location"] == "none"
    table = d.lxc("network", "list-leases", name).stdout
    assert c in table and lease["address"] in table and "DYNAMIC" in table
    # Its SLAAC address is listed too, as LXD lists it.
    slaac = [x for x in d.api("GET", f"/1.0/networks/{name}/leases").json()["metadata"]
             if x["address"].startswith("fd42:76::") and x["type"] != "gateway"]
    assert slaac and slaac[0]["hostname"] == c
    assert d.api("GET", f"/1.0/networks/{name}").json()["metadata"]["used_by"] == [f"/1.0/instances/{c}"]
    r = d.lxc("network", "delete", name, check=False)
    assert r.returncode != 0 and "The network is currently in use" in r.stderr
    d.lxc("delete", "-f", c)
    d.lxc("network", "delete", name)
    gone(d, name)


def test_dnsmasq_follows_dhcp_and_dns_keys(net_daemon, netname):
    d = net_daemon
    name = netname()
    d.lxc("network", "create", name, "ipv4.address=10.77.0.1/24", "ipv6.address=none",
          "ipv4.dhcp.ranges=10.77.0.100-10.77.0.150", "dns.domain=example")
    pid = dnsmasq_pid(d, name)
    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    assert [a for a in cmd if a.startswith("--dhcp-range=10.77.")] == [
        "--dhcp-range=10.77.0.100,10.77.0.150,255.255.255.0,1h"]
    assert "--domain=example" in cmd
    d.lxc("network", "set", name, "ipv4.dhcp.gateway=10.77.0.254", "dns.search=corp.example",
          "raw.dnsmasq=log-dhcp")
    new = dnsmasq_pid(d, name)
    assert new and new != pid, "a config change restarts dnsmasq"
    raw = (d.lxd_dir / "networks" / name / "dnsmasq.raw").read_text()
    assert "dhcp-option-force=3,10.77.0.254" in raw and "dhcp-option-force=119,corp.example" in raw
    assert "log-dhcp" in raw
    # Without addresses there is nothing to serve: dnsmasq goes, the bridge stays.
    d.lxc("network", "set", name, "ipv4.address=none")
    assert wait_for(lambda: not dnsmasq_pids_for(name), timeout=5)
    assert name in links(d.netns) and addrs(d, name) == set()
    d.lxc("network", "delete", name)
    gone(d, name)
