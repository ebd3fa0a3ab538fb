"""Issue 8, item 12: GET /1.0/networks lists the host's interfaces as unmanaged networks,
read-only, as LXD 5.0.2 does (stock `lxc network list/show/info`, curl, Debian's pylxd).
Managed networks: tests/integration/test_networks_managed.py (in a namespace of their own)."""

from __future__ import annotations

import json
import os

import pytest

from tests.helpers import envelope_ok

pytestmark = pytest.mark.integration


def host_interfaces() -> set[str]:
    return {n for n in os.listdir("/sys/class/net")
            if os.path.exists(f"/sys/class/net/{n}/ifindex") and not n.startswith("veth")}


def test_list_is_the_host_interfaces(daemon):
    body = daemon.api("GET", "/1.0/networks").json()
    envelope_ok(body)
    assert {u.rsplit("/", 1)[1] for u in body["metadata"]} == host_interfaces()
    assert body["metadata"][0] == "/1.0/networks/lo"  # ifindex order, as LXD


def test_recursion_and_get_have_lxds_fields(daemon):
    full = daemon.api("GET", "/1.0/networks?recursion=1").json()["metadata"]
    by_name = {n["name"]: n for n in full}
    assert by_name.keys() == host_interfaces()
    lo = by_name["lo"]
    assert lo == {"config": {}, "description": "", "name": "lo", "type": "loopback", "used_by": [],
                  "managed": False, "status": "", "locations": None}
    for n in full:
        assert n["type"] in ("loopback", "physical", "bridge", "bond", "vlan", "unknown")
        assert n["managed"] is False
    r = daemon.api("GET", "/1.0/networks/lo")
    assert r.status_code == 200 and r.headers.get("etag")
    assert r.json()["metadata"] == lo


def test_state(daemon):
    st = daemon.api("GET", "/1.0/networks/lo/state").json()["metadata"]
    assert st["type"] == "loopback" and st["state"] == "up" and st["hwaddr"] == ""
    assert st["mtu"] == int(open("/sys/class/net/lo/mtu").read())
    assert {"family": "inet", "address": "127.0.0.1", "netmask": "8", "scope": "local"} in st["addresses"]
    assert set(st["counters"]) == {"bytes_received", "bytes_sent", "packets_received", "packets_sent"}
    assert st["bond"] is None and st["bridge"] is None and st["vlan"] is None and st["ovn"] is None


def test_unknown_network_is_404(daemon):
    for path in ("/1.0/networks/nosuchif0", "/1.0/networks/nosuchif0/state"):
        r = daemon.api("GET", path)
        assert r.status_code == 404, r.text
        envelope_ok(r.json())


def test_host_interfaces_cannot_be_changed(daemon):
    """Only managed networks change; a host interface is LXD's "Failed loading network" (404)."""
    for method, path in (("PUT", "/1.0/networks/lo"), ("PATCH", "/1.0/networks/lo"),
                         ("POST", "/1.0/networks/lo"), ("DELETE", "/1.0/networks/lo"),
                         ("GET", "/1.0/networks/lo/leases")):
        r = daemon.api(method, path, json={"name": "x", "config": {}})
        assert r.status_code == 404, (method, path, r.text)
        assert r.json()["error"] == "Failed loading network: Network not found"
    assert daemon.api("DELETE", "/1.0/networks/nosuchif0").status_code == 404
    assert os.path.exists("/sys/class/net/lo")


def test_creates_refused_before_touching_the_host(daemon):
    """This daemon runs in the host's namespace: only requests refused before any host change
    are sent (managed networks are created in tests/integration/test_networks_managed.py, inside
    a namespace of their own)."""
    before = host_interfaces()
    for body, message in (({"name": "x"}, "Network interface is too short (minimum 2 characters)"),
                          ({"name": "lo"}, "Network interface 'lo' already exists"),
                          ({"name": "y" * 16}, "Network interface is too long (maximum 15 characters)"),
                          ({"name": "tq0", "type": "nosuch"}, "Unknown network type 'nosuch'"),
                          ({}, "No name provided")):
        r = daemon.api("POST", "/1.0/networks", json=body)
        assert r.status_code == 400, (body, r.text)
        assert message in r.json()["error"]
    assert host_interfaces() == before


def test_stock_client(daemon):
    r = daemon.lxc("network", "list", "--format", "json")
    listed = {n["name"] for n in json.loads(r.stdout)}
    assert listed == host_interfaces()
    show = daemon.lxc("network", "show", "lo").stdout
    assert "type: loopback" in show and "managed: false" in show
    info = daemon.lxc("network", "info", "lo").stdout
    assert "State: up" in info and "127.0.0.1/8 (local)" in info and "Type: loopback" in info


def test_curl(daemon):
    body = json.loads(daemon.curl("lxd/1.0/networks/lo").stdout)
    assert body["metadata"]["name"] == "lo"


def test_debian_pylxd_networks_all(daemon):
    r = daemon.pylxd("print(json.dumps(sorted(n.name for n in client.networks.all())))\n"
                     "lo = client.networks.get('lo')\n"
                     "print(lo.type, lo.managed)\n")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert set(json.loads(lines[0])) == host_interfaces()
    assert lines[1] == "loopback False"
