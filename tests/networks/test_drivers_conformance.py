"""Every network driver through the same scenarios, each run inside a network namespace the test
makes (the driver code runs in a child process entered into it): validation, create, start
twice (idempotent), state, update, daemon exit and a new start adopting what runs, rename,
delete leaving nothing behind.

A case names its driver, a config, a change and what the host must look like; the scenario
is the same for all (pyfilesystem2's FSTestCases shape).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.netns import NetNS

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


# -- the scenario (runs inside the namespace) -----------------------------------------------------

def _snapshot(drv, ctx) -> dict:
    from lxd_daemon.networks import host, netlink

    names = [n for n in host.interface_names() if n != "lo"]
    state_dirs = sorted(os.listdir(ctx.networks_dir)) if ctx.networks_dir.is_dir() else []
    pid = None
    pidfile = ctx.networks_dir / drv.name / "dnsmasq.pid"
    if pidfile.exists():
        try:
            pid = int(pidfile.read_text().strip())
            os.kill(pid, 0)
        except (ValueError, OSError):
            pid = None
    return {
        "links": names,
        "addrs": {n: sorted(a["address"] + "/" + a["netmask"] for a in host.addresses(n) if a["scope"] == "global")
                  for n in names},
        "dnsmasq": pid,
        "chains": sorted(ctx.firewall.keys()["network"]) if ctx.firewall is not None else [],
        "state_dirs": state_dirs,
        "routes": sorted(r for r in netlink.routes() if r.startswith("10.17")),
    }


async def _scenario(spec: dict) -> dict:
    from lxd_daemon.networks.drivers import DRIVERS, DriverContext, InvalidConfig
    from lxd_daemon.networks.firewall import Firewall

    ctx = DriverContext(lxd_dir=Path(spec["lxd_dir"]), firewall=Firewall(table="lxd"), seed="conformance")
    cls = DRIVERS[spec["type"]]
    obs: dict = {}
    drv = cls(spec["name"], {}, ctx, id=1)
    config = drv.fill_config(spec["config"])
    drv.validate(config)
    for bad in ({**config, "no.such.key": "1"}, {**config, spec["bad_key"]: "!!"}):
        try:
            drv.validate(bad)
            obs.setdefault("invalid_accepted", []).append(bad)
        except InvalidConfig as e:
            obs.setdefault("invalid_messages", []).append(str(e))
    drv.validate({**config, "user.anything": "x"})
    drv.config = config
    await drv.create()
    await drv.start()
    obs["started"] = await asyncio.to_thread(_snapshot, drv, ctx)
    await drv.start()
    obs["started_again"] = await asyncio.to_thread(_snapshot, drv, ctx)
    state = await drv.state()
    obs["state_keys"] = sorted(state)
    obs["nic_parent"], obs["mtu"] = drv.nic_parent(), drv.mtu()
    old, drv.config = dict(drv.config), drv.fill_config(spec["update"])
    drv.validate(drv.config)
    await drv.update(old)
    obs["updated"] = await asyncio.to_thread(_snapshot, drv, ctx)
    obs["mtu_updated"] = drv.mtu()
    await drv.close()  # daemon exit: everything keeps running
    again = cls(spec["name"], drv.config, ctx, id=1)
    await again.start()  # next daemon start: adopts
    obs["adopted"] = await asyncio.to_thread(_snapshot, again, ctx)
    await again.rename(spec["rename"])
    obs["renamed"] = await asyncio.to_thread(_snapshot, again, ctx)
    await again.delete()
    obs["deleted"] = await asyncio.to_thread(_snapshot, again, ctx)
    return obs


def main() -> None:
    spec = json.loads(sys.argv[1])
    print(json.dumps(asyncio.run(_scenario(spec))))


# -- the cases ------------------------------------------------------------------------------------

CASES = {
    "bridge": {
        "type": "bridge", "config": {"ipv4.address": "10.71.0.1/24", "ipv6.address": "fd42:71::1/64",
                                     "ipv4.routes": "10.171.0.0/24"},
        "update": {"ipv4.address": "10.72.0.1/24", "ipv6.address": "none", "bridge.mtu": "1400",
                   "ipv4.routes": "10.172.0.0/24"},
        "bad_key": "ipv4.nat", "parent": None,
    },
    "macvlan": {
        "type": "macvlan", "config": {"parent": "uplink0", "mtu": "1500"},
        "update": {"parent": "uplink0", "mtu": "1400"}, "bad_key": "mtu", "parent": "uplink0",
    },
    "physical": {
        "type": "physical", "config": {"parent": "uplink0", "ipv4.gateway": "192.0.2.1/24"},
        "update": {"parent": "uplink0", "mtu": "1400"}, "bad_key": "vlan", "parent": "uplink0",
    },
}


@pytest.fixture
def ns():
    n = NetNS("tc" + uuid.uuid4().hex[:8]).create()
    yield n
    n.destroy()


def run_in(ns: NetNS, spec: dict) -> dict:
    r = subprocess.run([*ns.prefix(), sys.executable, "-m", "tests.networks.test_drivers_conformance",
                        json.dumps(spec)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", sorted(CASES))
def test_driver_scenario(case, ns, tmp_path):
    c = CASES[case]
    if c["parent"]:
        ns.run("ip", "link", "add", c["parent"], "type", "veth", "peer", "name", c["parent"] + "p")
    name, renamed = "cn" + uuid.uuid4().hex[:6], "cr" + uuid.uuid4().hex[:6]
    obs = run_in(ns, {**c, "name": name, "rename": renamed, "lxd_dir": str(tmp_path / "var")})

    assert "invalid_accepted" not in obs
    assert any("Invalid option for network" in m and "'no.such.key'" in m for m in obs["invalid_messages"])
    assert any(f"Invalid value for network {name!r} option {c['bad_key']!r}" in m for m in obs["invalid_messages"])
    assert {"addresses", "counters", "hwaddr", "mtu", "state", "type"} <= set(obs["state_keys"])
    assert obs["started"] == obs["started_again"], "start() is idempotent"
    assert obs["adopted"] == obs["updated"], "a new start after daemon exit adopts what runs"
    assert obs["mtu_updated"] == 1400

    if c["type"] == "bridge":
        assert obs["nic_parent"] == name and obs["mtu"] is None
        assert obs["started"]["addrs"][name] == ["10.71.0.1/24", "fd42:71::1/64"]
        assert obs["started"]["dnsmasq"] and obs["started"]["chains"] == [name]
        assert obs["started"]["state_dirs"] == [name]
        assert obs["updated"]["addrs"][name] == ["10.72.0.1/24"]
        assert "10.171.0.0/24" in obs["started"]["routes"], "ipv4.routes"
        assert "10.172.0.0/24" in obs["updated"]["routes"] and "10.171.0.0/24" not in obs["updated"]["routes"]
        assert obs["deleted"]["routes"] == []
        assert obs["adopted"]["dnsmasq"] == obs["updated"]["dnsmasq"], "the running dnsmasq is adopted"
        assert renamed in obs["renamed"]["links"] and name not in obs["renamed"]["links"]
        assert obs["renamed"]["addrs"][renamed] == ["10.72.0.1/24"]
        assert obs["renamed"]["chains"] == [renamed] and obs["renamed"]["state_dirs"] == [renamed]
    else:
        assert obs["nic_parent"] == c["parent"]
        # A parent network puts nothing of its own on the host.
        for snap in ("started", "updated", "renamed"):
            assert obs[snap]["links"] == sorted([c["parent"], c["parent"] + "p"], key=obs[snap]["links"].index)
            assert obs[snap]["chains"] == [] and obs[snap]["dnsmasq"] is None
    deleted = obs["deleted"]
    assert name not in deleted["links"] and renamed not in deleted["links"]
    assert deleted["chains"] == [] and deleted["dnsmasq"] is None and deleted["state_dirs"] == []
    # Nothing of the network is left running in the namespace.
    assert not [p for p in ns.pids() if b"dnsmasq" in Path(f"/proc/{p}/cmdline").read_bytes()
                and Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]


@pytest.mark.parametrize("case", sorted(c for c in CASES if CASES[c]["parent"]))
def test_missing_parent_is_refused(case, ns, tmp_path):
    c = CASES[case]
    code = ("import asyncio, sys\n"
            "from pathlib import Path\n"
            "from lxd_daemon.networks.drivers import DRIVERS, DriverContext, InvalidConfig\n"
            f"d = DRIVERS[{c['type']!r}]('m0', {{'parent': 'nosuch0'}}, DriverContext(lxd_dir=Path({str(tmp_path)!r})))\n"
            "try:\n    asyncio.run(d.start())\nexcept InvalidConfig as e:\n    print(e)\n")
    r = subprocess.run([*ns.prefix(), sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.stdout.strip() == "Parent interface 'nosuch0' not found", r.stderr


if __name__ == "__main__":
    main()
