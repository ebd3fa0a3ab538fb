"""Issue 8, item 12: GET /1.0/networks lists the host's interfaces as unmanaged networks,
read-only, as LXD 5.0.2 does (stock `lxc network list/show/info`, curl, Debian's pylxd)."""

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


def test_writes_are_refused_as_not_implemented(daemon):
    for method, path in (("POST", "/1.0/networks"), ("PUT", "/1.0/networks/lo"),
                         ("PATCH", "/1.0/networks/lo"), ("POST", "/1.0/networks/lo"),
                         ("DELETE", "/1.0/networks/lo")):
        r = daemon.api(method, path, json={"name": "x", "config": {}})
        assert r.status_code == 501, (method, path, r.text)
        assert "Managed networks are not implemented yet" in r.json()["error"]
    assert daemon.api("DELETE", "/1.0/networks/nosuchif0").status_code == 404
    assert os.path.exists("/sys/class/net/lo")


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
