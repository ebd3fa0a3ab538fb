"""lxd_daemon.networks.dnsmasq: a real dnsmasq on a bridge inside a namespace the test makes,
with a DHCP/DNS client (busybox) in a second namespace behind a veth."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lxd_daemon.networks.dnsmasq import DnsmasqConfig, argv
from tests.helpers import REPO, run_prefix
from tests.netns import NetNS

PRELUDE = textwrap.dedent("""
    import asyncio, ipaddress, json, os, signal, subprocess, sys, time
    from pathlib import Path
    from lxd_daemon.networks import netlink as nl
    from lxd_daemon.networks.dnsmasq import Dnsmasq, DnsmasqConfig, DnsmasqError, stop_stale
    STATE = Path(sys.argv[1])
    def config(**kw):
        base = dict(network="tnet", bridge="tbr0", state_dir=STATE,
                    ipv4=ipaddress.ip_interface("10.71.0.1/24"), ipv6=ipaddress.ip_interface("fd71::1/64"))
        base.update(kw)
        return DnsmasqConfig(**base)
""")

UDHCPC_SCRIPT = """#!/bin/sh
if [ "$1" = bound ]; then
    busybox ip addr flush dev "$interface"
    busybox ip addr add "$ip/$mask" dev "$interface"
    echo "BOUND $ip"
fi
exit 0
"""


def run_py(ns: NetNS, code: str, *args: str, timeout: float = 60) -> dict:
    r = subprocess.run([*ns.prefix(), sys.executable, "-c", PRELUDE + textwrap.dedent(code), *args],
                       capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert r.returncode == 0, r.stderr + r.stdout
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_argv_is_pure_and_complete(tmp_path):
    cfg = DnsmasqConfig(network="n1", bridge="br1", state_dir=tmp_path, ipv4=ipaddress.ip_interface("10.1.2.1/24"),
                        ipv6=ipaddress.ip_interface("fd00:1::1/64"), mtu=1400, raw="log-queries")
    a = argv(cfg)
    assert a == argv(cfg)
    for flag in ("--strict-order", "--bind-interfaces", "--except-interface=lo", "--no-ping", "--interface=br1",
                 "--dhcp-rapid-commit", "--no-negcache", "--dhcp-no-override", "--dhcp-authoritative",
                 f"--pid-file={tmp_path}/dnsmasq.pid", f"--dhcp-leasefile={tmp_path}/dnsmasq.leases",
                 f"--dhcp-hostsfile={tmp_path}/dnsmasq.hosts", f"--conf-file={tmp_path}/dnsmasq.raw",
                 "--listen-address=10.1.2.1", "--listen-address=fd00:1::1", "--enable-ra",
                 "--dhcp-range=10.1.2.2,10.1.2.254,255.255.255.0,1h", "--dhcp-option-force=26,1400",
                 "--dhcp-range=::,constructor:br1,ra-stateless,ra-names", "--domain=lxd", "--local=/lxd/",
                 "--no-resolv"):
        assert flag in a, flag
    stateful = argv(DnsmasqConfig(network="n1", bridge="br1", state_dir=tmp_path, ipv4=None,
                                  ipv6=ipaddress.ip_interface("fd00:1::1/64"), ipv6_stateful=True,
                                  ipv6_ranges=[("fd00:1::10", "fd00:1::20")], dns_mode="none"))
    assert "--dhcp-range=fd00:1::10,fd00:1::20,64,1h" in stateful
    assert not any(x.startswith(("--domain", "--listen-address=10.")) for x in stateful)
    ranges = argv(DnsmasqConfig(network="n1", bridge="br1", state_dir=tmp_path,
                                ipv4=ipaddress.ip_interface("10.1.2.1/24"), ipv4_ranges=[("10.1.2.100", "10.1.2.110")],
                                ipv4_expiry="30m", ipv6=None))
    assert "--dhcp-range=10.1.2.100,10.1.2.110,255.255.255.0,30m" in ranges
    (tmp_path / "dnsmasq.raw").write_text("")
    for args in (a, stateful, ranges):  # dnsmasq itself accepts each command line
        r = subprocess.run([*args, "--test"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr


@pytest.fixture
def nets(tmp_path):
    """(server namespace, client namespace, state dir): a bridge tbr0 10.71.0.1/24 + fd71::1/64 in
    the server namespace, and eth0 (a veth whose other end is on tbr0) in the client namespace."""
    with NetNS("hd" + run_prefix()) as server, NetNS("hc" + run_prefix()) as client:
        sleeper = subprocess.Popen([*client.prefix(), "sleep", "60"])
        try:
            while os.stat(f"/proc/{sleeper.pid}/ns/net").st_ino != client.inode():
                time.sleep(0.005)
            run_py(server, """
                nl.create_bridge("tbr0"); nl.set_link("tbr0", up=True)
                nl.set_addresses("tbr0", [ipaddress.ip_interface("10.71.0.1/24"),
                                          ipaddress.ip_interface("fd71::1/64")])
                nl.create_veth("tv0", "tv1"); nl.set_link("tv0", master="tbr0")
                nl.move_to_netns("tv1", int(sys.argv[2]), "eth0")
                print("{}")
            """, str(tmp_path / "state"), str(sleeper.pid))
        finally:
            sleeper.kill()
            sleeper.wait()
        client.run("ip", "link", "set", "eth0", "address", "00:16:3e:71:00:01", "up")
        script = tmp_path / "udhcpc.sh"
        script.write_text(UDHCPC_SCRIPT)
        script.chmod(0o755)
        yield server, client, tmp_path / "state"


def dhcp(client: NetNS, script: Path) -> str:
    r = client.run("busybox", "udhcpc", "-i", "eth0", "-n", "-q", "-f", "-t", "5", "-T", "1", "-s", str(script))
    bound = [ln.split()[1] for ln in r.stdout.splitlines() if ln.startswith("BOUND ")]
    assert bound, r.stdout + r.stderr
    return bound[0]


def lookup(client: NetNS, name: str) -> str:
    return client.run("busybox", "nslookup", name, "10.71.0.1", check=False).stdout


@pytest.mark.integration
def test_dhcp_dns_static_entries_and_supervision(nets, tmp_path):
    server, client, state = nets
    script = tmp_path / "udhcpc.sh"
    # a supervised dnsmasq in a process that stays up while the client works (driven over stdin)
    proc = subprocess.Popen([*server.prefix(), sys.executable, "-c", PRELUDE + textwrap.dedent("""
        async def main():
            d = Dnsmasq(config())
            await d.start()
            loop = asyncio.get_running_loop()
            reader = asyncio.StreamReader(); await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
            print(json.dumps({"pid": d.pid}), flush=True)
            while line := (await reader.readline()).decode().strip():
                cmd = json.loads(line)
                if cmd[0] == "set_host":
                    await asyncio.to_thread(d.set_host, cmd[1], cmd[2], hostname=cmd[3], ipv4=cmd[4])
                    out = {}
                elif cmd[0] == "drop_host":
                    await asyncio.to_thread(d.drop_host, cmd[1]); out = {}
                elif cmd[0] == "leases":
                    out = {"leases": await asyncio.to_thread(d.leases)}
                elif cmd[0] == "wait_restart":
                    old = cmd[1]
                    for _ in range(100):
                        await asyncio.sleep(0.05)
                        if d.pid and d.pid != old and os.path.exists(f"/proc/{d.pid}"):
                            break
                    out = {"pid": d.pid}
                elif cmd[0] == "stop":
                    await d.stop(); out = {"pid": d.pid}
                print(json.dumps(out), flush=True)
        asyncio.run(main())
    """), str(state)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)

    def call(*cmd) -> dict:
        proc.stdin.write(json.dumps(cmd) + "\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        assert line, "the dnsmasq driver died"
        return json.loads(line)

    try:
        pid = json.loads(proc.stdout.readline())["pid"]
        assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"dnsmasq")
        assert (state / "dnsmasq.pid").read_text().strip() == str(pid)

        # a static lease and a DNS name, effective at once
        call("set_host", "default_c1.eth0", "00:16:3E:71:00:01", "c1", "10.71.0.50")
        assert (state / "dnsmasq.hosts" / "default_c1.eth0").read_text() == "00:16:3e:71:00:01,10.71.0.50,c1\n"
        assert dhcp(client, script) == "10.71.0.50"
        assert "10.71.0.50" in lookup(client, "c1.lxd")
        leases = call("leases")["leases"]
        assert {"hostname": "c1", "hwaddr": "00:16:3e:71:00:01", "address": "10.71.0.50", "type": "static",
                "location": "none", "project": "default"} in leases
        assert len([x for x in leases if x["address"] == "10.71.0.50"]) == 1  # the lease is not listed twice

        # without the entry, another MAC gets a dynamic lease from the range
        call("drop_host", "default_c1.eth0")
        assert not (state / "dnsmasq.hosts" / "default_c1.eth0").exists()
        client.run("ip", "link", "set", "eth0", "address", "00:16:3e:71:00:02")
        addr = dhcp(client, script)
        assert ipaddress.ip_address(addr) in ipaddress.ip_network("10.71.0.0/24") and addr != "10.71.0.1"
        leases = call("leases")["leases"]
        assert any(x["hwaddr"] == "00:16:3e:71:00:02" and x["address"] == addr and x["type"] == "dynamic"
                   for x in leases), leases
        assert any(x["address"] == addr for x in leases)

        # killed: restarted, serving again
        call("set_host", "default_c2.eth0", "00:16:3e:71:00:02", "c2", "10.71.0.60")
        os.kill(pid, 9)
        new = call("wait_restart", pid)["pid"]
        assert new and new != pid
        assert (state / "dnsmasq.pid").read_text().strip() == str(new)
        assert dhcp(client, script) == "10.71.0.60"
        assert "10.71.0.60" in lookup(client, "c2.lxd")  # names come with the lease

        assert call("stop")["pid"] is None
        assert not os.path.exists(f"/proc/{new}") or b"dnsmasq" not in Path(f"/proc/{new}/cmdline").read_bytes()
        assert not (state / "dnsmasq.pid").exists()
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.integration
def test_adopt_restart_and_stale(nets):
    server, client, state = nets
    first = run_py(server, """
        async def main():
            d = Dnsmasq(config()); await d.start(); pid = d.pid
            d.detach()  # daemon shutdown: dnsmasq stays for the next daemon
            await asyncio.sleep(0.2)
            return pid
        print(json.dumps({"pid": asyncio.run(main())}))
    """, str(state))["pid"]
    assert os.path.exists(f"/proc/{first}")
    out = run_py(server, """
        async def main():
            d = Dnsmasq(config()); await d.start(); adopted = d.pid
            await d.restart(config(ipv4_ranges=[("10.71.0.100", "10.71.0.110")]))
            restarted = d.pid
            cmd = open(f"/proc/{restarted}/cmdline").read()
            await d.stop()
            return dict(adopted=adopted, restarted=restarted, cmd=cmd, after=d.pid)
        print(json.dumps(asyncio.run(main())))
    """, str(state))
    assert out["adopted"] == first
    assert out["restarted"] != first and "10.71.0.100,10.71.0.110" in out["cmd"]
    assert out["after"] is None and not os.path.exists(f"/proc/{out['restarted']}")

    # an orphan from a crashed daemon: stop_stale kills it and forgets its pid file
    orphan = run_py(server, """
        async def main():
            d = Dnsmasq(config()); await d.start(); return d.pid
        print(json.dumps({"pid": asyncio.run(main())}))
    """, str(state))["pid"]
    run_py(server, "stop_stale(STATE); print('{}')", str(state))
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{orphan}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{orphan}")
    assert not (state / "dnsmasq.pid").exists()


@pytest.mark.integration
def test_start_failure_names_the_cause(nets):
    server, client, state = nets
    out = run_py(server, """
        async def main():
            try:
                await Dnsmasq(config(bridge="nosuch0")).start()
            except DnsmasqError as e:
                return e.message
        print(json.dumps({"error": asyncio.run(main())}))
    """, str(state))
    assert "tnet" in out["error"] and "nosuch0" in out["error"], out


@pytest.mark.integration
def test_router_advertisements_give_slaac(nets):
    server, client, state = nets
    run_py(server, """
        async def main():
            d = Dnsmasq(config()); await d.start(); return d.pid
        print(json.dumps({"pid": asyncio.run(main())}))
    """, str(state))
    client.run("ip", "link", "set", "eth0", "down")
    client.run("ip", "link", "set", "eth0", "up")  # solicits a router advertisement
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        addrs = client.run("ip", "-6", "addr", "show", "dev", "eth0").stdout
        if "inet6 fd71::216:3eff:fe71:1/64" in addrs:
            break
        time.sleep(0.1)
    assert "inet6 fd71::216:3eff:fe71:1/64" in addrs
    assert "default via fe80:" in client.run("ip", "-6", "route").stdout
