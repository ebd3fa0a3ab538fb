"""Issue 12: networks and projects, through the stock client (`lxc network ... --project P`), on a
daemon inside a network namespace of the module's own (`net_daemon`).

A project without features.networks sees and uses default's networks; one with it has networks
of its own, which LXD 5.0.2 only allows to be OVN networks (not available here: refused). A
restricted project sees only what restricted.networks.access allows. A network's used_by lists
the instances and profiles of every project that use it.
"""

from __future__ import annotations

import json

import pytest
import yaml

from tests.helpers import Daemon, run_prefix

pytestmark = pytest.mark.integration


def fails(d: Daemon, *args: str) -> str:
    r = d.lxc(*args, check=False)
    assert r.returncode != 0, f"lxc {' '.join(args)} succeeded: {r.stdout}"
    return r.stderr


def net_names(d: Daemon, project: str) -> list[str]:
    return [n["name"] for n in json.loads(d.lxc("network", "list", "--project", project, "--format", "json").stdout)]


@pytest.fixture
def env(net_daemon):
    """A bridge in default and three projects (plain, features.networks, restricted); all go after."""
    d = net_daemon
    prefix = run_prefix()
    br = f"{prefix}br"
    plain, own, rest = f"{prefix}n", f"{prefix}m", f"{prefix}r"
    made: list[str] = []
    try:
        d.lxc("network", "create", br, "ipv4.address=10.77.0.1/24", "ipv4.nat=false", "ipv6.address=none")
        for p, cfg in ((plain, ["features.images=false", "features.profiles=false"]),
                       (own, ["features.images=false", "features.profiles=false", "features.networks=true"]),
                       (rest, ["restricted=true", f"restricted.networks.access={br}"])):
            d.lxc("project", "create", p, *[a for kv in cfg for a in ("-c", kv)])
            made.append(p)
        yield d, br, plain, own, rest
    finally:
        for p in made:
            for url in (d.api("GET", f"/1.0/instances?project={p}").json().get("metadata") or []):
                d.lxc("delete", "-f", url.split("?")[0].rsplit("/", 1)[-1], "--project", p, check=False)
            for url in (d.api("GET", f"/1.0/profiles?project={p}").json().get("metadata") or []):
                name = url.split("?")[0].rsplit("/", 1)[-1]
                if name != "default" and "?project=" in url:
                    d.lxc("profile", "delete", name, "--project", p, check=False)
            d.lxc("project", "delete", p, check=False)
        d.lxc("network", "delete", br, check=False)


def test_networks_follow_features_networks(env):
    d, br, plain, own, rest = env
    # Without features.networks: default's networks (and the host's interfaces), plain URLs.
    assert net_names(d, plain) == net_names(d, "default")
    assert br in net_names(d, plain) and "lo" in net_names(d, plain)
    shown = yaml.safe_load(d.lxc("network", "show", br, "--project", plain).stdout)
    assert shown["config"]["ipv4.address"] == "10.77.0.1/24" and shown["managed"] is True
    assert f"/1.0/networks/{br}" in d.api("GET", f"/1.0/networks?project={plain}").json()["metadata"]
    d.lxc("network", "set", br, "user.via=plain", "--project", plain)
    assert d.lxc("network", "get", br, "user.via").stdout.strip() == "plain"
    assert yaml.safe_load(d.lxc("project", "show", plain).stdout)["used_by"] == []
    # A network made through such a project is default's.
    br2 = br[:-2] + "b2"
    d.lxc("network", "create", br2, "ipv4.address=10.78.0.1/24", "ipv6.address=none", "--project", plain)
    try:
        assert br2 in net_names(d, "default")
    finally:
        d.lxc("network", "delete", br2, "--project", plain)
    assert br2 not in net_names(d, "default")

    # With features.networks: its own networks only (none), and no way to make one here.
    assert net_names(d, own) == []
    assert "not found" in fails(d, "network", "show", br, "--project", own).lower()
    err = fails(d, "network", "create", "x0", "--project", own)
    assert "ovn" in err.lower() and "features.networks" in err, err
    err = fails(d, "network", "create", "x0", "--type=bridge", "--project", own)
    assert "Network type does not support non-default projects" in err, err
    assert yaml.safe_load(d.lxc("project", "show", own).stdout)["used_by"] == []

    # Restricted: only what restricted.networks.access names (no host interfaces either).
    assert net_names(d, rest) == [br]
    assert "not found" in fails(d, "network", "show", "lo", "--project", rest).lower()
    r = d.api("POST", f"/1.0/networks?project={rest}", json={"name": "x1", "config": {"ipv4.address": "none"}})
    assert r.status_code == 403 and r.json()["error"] == "Network not allowed in project", r.text
    # ... and it uses default's networks but can't change them (their config reaches the host).
    err = fails(d, "network", "set", br, "user.x=1", "--project", rest)
    assert f"Project {rest!r} is restricted" in err, err
    assert f"Project {rest!r} is restricted" in fails(d, "network", "delete", br, "--project", rest)
    assert "user.x" not in d.lxc("network", "show", br).stdout


def test_network_used_by_lists_every_project(env):
    d, br, plain, own, rest = env
    # An instance of `plain` (default's networks) with a nic on the bridge, and a profile of
    # `rest` (profiles of its own) naming it.
    d.lxc("init", "busybox", "c1", "--project", plain)
    d.lxc("config", "device", "add", "c1", "eth0", "nic", f"network={br}", "--project", plain)
    d.lxc("profile", "create", "pn", "--project", rest)
    d.lxc("profile", "device", "add", "pn", "eth0", "nic", f"network={br}", "--project", rest)
    used = yaml.safe_load(d.lxc("network", "show", br).stdout)["used_by"]
    assert f"/1.0/instances/c1?project={plain}" in used and f"/1.0/profiles/pn?project={rest}" in used, used
    assert "in use" in fails(d, "network", "delete", br)
    # An instance of the project with features.networks can't use default's bridge.
    d.lxc("init", "busybox", "c2", "--project", own)
    err = fails(d, "config", "device", "add", "c2", "eth0", "nic", f"network={br}", "--project", own)
    assert "not found" in err.lower(), err
    d.lxc("delete", "c1", "--project", plain)
    d.lxc("profile", "delete", "pn", "--project", rest)
    assert yaml.safe_load(d.lxc("network", "show", br).stdout)["used_by"] == []
