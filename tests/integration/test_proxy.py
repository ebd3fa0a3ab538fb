"""`proxy` devices through the stock client, on a daemon inside a network namespace of the test's
own (`net_daemon`): TCP and UDP from a port of the daemon's namespace to a server inside the
container, unix sockets both ways, hotplug and removal, a port in use, a killed forwarder
restarted, a daemon restart adopting the forwarders, validation.

One busybox container serves the module (its servers: busybox `nc -ll -e cat` for TCP; busybox
has no UDP server, so a small python echo server runs in the container's network namespace via
nsenter). Clients run in the daemon's namespace (`d.netns.run`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lxd_daemon.devices.proxy import FORWARDER
from tests.helpers import init_pid, run_prefix, wait_for

pytestmark = pytest.mark.integration

ECHO_PORT = 7000        # busybox nc inside the container
UDP_PORT = 7001         # python echo server in the container's network namespace

_CLIENT = textwrap.dedent("""
    import socket, sys
    kind, addr, payload = sys.argv[1], sys.argv[2], sys.argv[3].encode()
    if kind == "unix":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(addr)
    else:
        host, port = addr.rsplit(":", 1)
        stype = socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM
        s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, stype)
        s.settimeout(5)
        s.connect((host.strip("[]"), int(port)))
    if kind == "udp":
        s.send(payload)
        print(s.recv(65536).decode(), end="")
        sys.exit(0)
    s.sendall(payload)
    s.shutdown(socket.SHUT_WR)
    out = b""
    while True:
        b = s.recv(65536)
        if not b:
            break
        out += b
    print(out.decode(), end="")
""")

_UDP_ECHO = textwrap.dedent("""
    import socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", int(sys.argv[1])))
    while True:
        data, peer = s.recvfrom(65536)
        s.sendto(b"udp:" + data, peer)
""")

_TCP_SERVER = textwrap.dedent("""
    import socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", int(sys.argv[1])))
    s.listen(8)
    while True:
        c, _ = s.accept()
        data = b""
        while True:
            b = c.recv(65536)
            if not b:
                break
            data += b
        c.sendall(b"host:" + data)
        c.close()
""")

_UNIX_SERVER = textwrap.dedent("""
    import os, socket, sys
    path = sys.argv[1]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    os.chmod(path, 0o666)
    s.listen(8)
    print("ready", flush=True)
    while True:
        c, _ = s.accept()
        data = b""
        while True:
            b = c.recv(65536)
            if not b:
                break
            data += b
        c.sendall(b"unix:" + data)
        c.close()
""")


def client(d, kind: str, addr: str, payload: str = "hello", check: bool = True) -> str:
    r = d.netns.run(sys.executable, "-c", _CLIENT, kind, addr, payload, check=check, timeout=20)
    return r.stdout


def forwarder_pids(key: str) -> list[int]:
    """Processes running the forwarder for device key `<project>_<instance>.<device>`."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
        except OSError:
            continue
        if str(FORWARDER).encode() in cmd and key.encode() in cmd:
            out.append(int(entry))
    return sorted(out)


def forwards(d, kind: str, addr: str, expect: str, payload: str = "hello", timeout: float = 15) -> None:
    """The forward answers `expect` (retried while the servers come up)."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        r = d.netns.run(sys.executable, "-c", _CLIENT, kind, addr, payload, check=False, timeout=20)
        last = r.stdout + r.stderr
        if r.returncode == 0 and r.stdout == expect:
            return
        time.sleep(0.2)
    raise AssertionError(f"no forward through {kind}:{addr}: {last}")


def _spawn(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)


@pytest.fixture(scope="module")
def box(net_daemon):
    """A running busybox container with a TCP echo server (busybox nc) and a UDP echo server
    (python in its network namespace); the helper processes go with the module."""
    d = net_daemon
    name = run_prefix() + "-px"
    d.lxc("launch", "busybox", name)
    pid = init_pid(d, name)
    d.lxc("exec", name, "--", "sh", "-c",
          f"ip link set lo up; nc -ll -p {ECHO_PORT} -e /bin/cat </dev/null >/dev/null 2>&1 &")
    helpers = [_spawn(["nsenter", f"--net=/proc/{pid}/ns/net", sys.executable, "-c", _UDP_ECHO, str(UDP_PORT)])]
    try:
        yield name
    finally:
        for p in helpers:
            p.kill()
            p.wait()
        d.lxc("delete", "-f", name, check=False)


def _port() -> int:
    import random

    return random.randint(20000, 40000)


def test_tcp_and_udp_bind_host_hotplug_and_removal(net_daemon, box):
    d = net_daemon
    tport, uport = _port(), _port() + 1
    d.lxc("config", "device", "add", box, "web", "proxy", f"listen=tcp:127.0.0.1:{tport}",
          f"connect=tcp:127.0.0.1:{ECHO_PORT}")
    d.lxc("config", "device", "add", box, "dns", "proxy", f"listen=udp:127.0.0.1:{uport}",
          f"connect=udp:127.0.0.1:{UDP_PORT}")
    forwards(d, "tcp", f"127.0.0.1:{tport}", "hello")
    forwards(d, "tcp", f"127.0.0.1:{tport}", "x" * 100000, payload="x" * 100000)
    forwards(d, "udp", f"127.0.0.1:{uport}", "udp:ping", payload="ping")
    key = f"default_{box}.web"
    assert len(forwarder_pids(key)) == 1
    pidfile = d.lxd_dir / "devices" / box / "proxy.web"
    assert int(pidfile.read_text()) == forwarder_pids(key)[0]
    assert (d.lxd_dir / "logs" / box / "proxy.web.log").exists()
    # removal: the forwarder goes, the port is free again
    d.lxc("config", "device", "remove", box, "web")
    d.lxc("config", "device", "remove", box, "dns")
    assert forwarder_pids(key) == [] and forwarder_pids(f"default_{box}.dns") == []
    assert not pidfile.exists()
    r = d.netns.run(sys.executable, "-c", _CLIENT, "tcp", f"127.0.0.1:{tport}", "x", check=False)
    assert r.returncode != 0 and "refused" in r.stderr.lower()


def test_port_ranges(net_daemon, box):
    d = net_daemon
    base = _port()
    # two listen ports to one connect port
    d.lxc("config", "device", "add", box, "rng", "proxy", f"listen=tcp:127.0.0.1:{base}-{base + 1}",
          f"connect=tcp:127.0.0.1:{ECHO_PORT}")
    try:
        forwards(d, "tcp", f"127.0.0.1:{base}", "a", payload="a")
        forwards(d, "tcp", f"127.0.0.1:{base + 1}", "b", payload="b")
    finally:
        d.lxc("config", "device", "remove", box, "rng")


def test_ipv6_proxy_protocol_and_security_ids(net_daemon, box):
    d = net_daemon
    port = _port()
    # the PROXY header (v1, as LXD 5.0 sends it) ahead of the client's bytes: the echo server
    # sends it back
    d.lxc("config", "device", "add", box, "pp", "proxy", f"listen=tcp:[::1]:{port}",
          f"connect=tcp:127.0.0.1:{ECHO_PORT}", "proxy_protocol=true", "security.uid=1000", "security.gid=1000")
    key = f"default_{box}.pp"
    try:
        deadline = time.monotonic() + 15
        out = ""
        while time.monotonic() < deadline and not out:
            out = client(d, "tcp", f"[::1]:{port}", "hello", check=False)
        head, sep, body = out.partition("\n")  # "\r\n" on the wire (text mode folds it)
        assert sep and body == "hello", out
        proto, src, dst, sport, dport = head.split()[1:]
        assert (head.split()[0], proto, src, dst, dport) == ("PROXY", "TCP6", "::1", "::1", str(port))
        assert sport.isdigit()
        # the forwarder dropped to security.uid/gid, as host ids through the container's map
        base = int(d.lxc("config", "get", box, "volatile.idmap.base").stdout.strip() or 0)
        [pid] = forwarder_pids(key)
        status = Path(f"/proc/{pid}/status").read_text()
        uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
        gids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Gid:"))
        assert uids == [str(base + 1000)] * 4 and gids == [str(base + 1000)] * 4
    finally:
        d.lxc("config", "device", "remove", box, "pp")
    assert forwarder_pids(key) == []


def test_unix_both_ways(net_daemon, box, tmp_path):
    d = net_daemon
    pid = init_pid(d, box)
    # host unix socket -> unix socket inside the container (its server: a host process bound
    # at the container's path through /proc/PID/root)
    inside = f"/tmp/{run_prefix()}.sock"
    srv = _spawn([sys.executable, "-c", _UNIX_SERVER, f"/proc/{pid}/root{inside}"])
    host_sock = tmp_path / "h.sock"
    try:
        assert srv.stdout.readline().strip() == "ready"
        d.lxc("config", "device", "add", box, "ux", "proxy", f"listen=unix:{host_sock}", f"connect=unix:{inside}",
              "mode=0600")
        assert host_sock.is_socket() and (host_sock.stat().st_mode & 0o777) == 0o600
        forwards(d, "unix", str(host_sock), "unix:hi", payload="hi")
        d.lxc("config", "device", "remove", box, "ux")
        assert not host_sock.exists()
    finally:
        srv.kill()
        srv.wait()
    # unix socket inside the container (bind=instance) -> a TCP server in the daemon's namespace
    hport = _port()
    tcp = _spawn([*d.netns.prefix(), sys.executable, "-c", _TCP_SERVER, str(hport)])
    in_sock = f"/tmp/{run_prefix()}-in.sock"
    try:
        d.lxc("config", "device", "add", box, "uin", "proxy", f"listen=unix:{in_sock}",
              f"connect=tcp:127.0.0.1:{hport}", "bind=instance", "uid=1000", "gid=1000", "mode=0660")
        st = d.lxc("exec", box, "--", "stat", "-c", "%u %g %a", in_sock).stdout.split()
        assert st == ["1000", "1000", "660"]
        forwards(d, "unix", f"/proc/{pid}/root{in_sock}", "host:yo", payload="yo")
        d.lxc("config", "device", "remove", box, "uin")
        assert d.lxc("exec", box, "--", "test", "-e", in_sock, check=False).returncode != 0
    finally:
        tcp.kill()
        tcp.wait()


def test_port_in_use_is_a_clear_error(net_daemon, box):
    d = net_daemon
    port = _port()
    c = run_prefix() + "-busy"
    holder = _spawn([*d.netns.prefix(), sys.executable, "-c", _TCP_SERVER, str(port)])
    try:
        wait_for(lambda: client(d, "tcp", f"127.0.0.1:{port}", "z", check=False) == "host:z", timeout=10)
        # hotplug
        r = d.lxc("config", "device", "add", box, "busy", "proxy", f"listen=tcp:127.0.0.1:{port}",
                  f"connect=tcp:127.0.0.1:{ECHO_PORT}", check=False)
        assert r.returncode != 0
        assert "address already in use" in r.stderr.lower() and f"127.0.0.1:{port}" in r.stderr, r.stderr
        assert "busy" not in d.lxc("config", "device", "list", box).stdout.split()
        assert forwarder_pids(f"default_{box}.busy") == []
        # bind=instance: the forwarder binds inside the container, where busybox nc holds the port
        r = d.lxc("config", "device", "add", box, "busy", "proxy", f"listen=tcp:127.0.0.1:{ECHO_PORT}",
                  f"connect=tcp:127.0.0.1:{port}", "bind=instance", check=False)
        assert r.returncode != 0 and "address already in use" in r.stderr.lower(), r.stderr
        assert forwarder_pids(f"default_{box}.busy") == []
        # at start: the start fails before the container runs, nothing is left
        d.lxc("init", "busybox", c)
        d.lxc("config", "device", "add", c, "busy", "proxy", f"listen=tcp:127.0.0.1:{port}",
              f"connect=tcp:127.0.0.1:{ECHO_PORT}")
        r = d.lxc("start", c, check=False)
        assert r.returncode != 0 and "address already in use" in r.stderr.lower(), r.stderr
        assert d.api("GET", f"/1.0/instances/{c}").json()["metadata"]["status"] == "Stopped"
        assert forwarder_pids(f"default_{c}.busy") == []
    finally:
        holder.kill()
        holder.wait()
        d.lxc("delete", "-f", c, check=False)


def test_killed_forwarder_restarts_and_daemon_restart_adopts(net_daemon, box):
    d = net_daemon
    port = _port()
    d.lxc("config", "device", "add", box, "kp", "proxy", f"listen=tcp:127.0.0.1:{port}",
          f"connect=tcp:127.0.0.1:{ECHO_PORT}")
    key = f"default_{box}.kp"
    try:
        forwards(d, "tcp", f"127.0.0.1:{port}", "one", payload="one")
        [first] = forwarder_pids(key)
        os.kill(first, signal.SIGKILL)
        new = wait_for(lambda: [p for p in forwarder_pids(key) if p != first], timeout=15)
        assert len(new) == 1
        forwards(d, "tcp", f"127.0.0.1:{port}", "two", payload="two")
        # daemon restart: the running forwarder is adopted, not duplicated
        d.stop()
        assert forwarder_pids(key) == new  # it outlives the daemon
        d.start()
        forwards(d, "tcp", f"127.0.0.1:{port}", "three", payload="three")
        assert forwarder_pids(key) == new
        # ... and supervised by the new daemon: killed -> restarted
        os.kill(new[0], signal.SIGKILL)
        again = wait_for(lambda: [p for p in forwarder_pids(key) if p != new[0]], timeout=15)
        assert len(again) == 1
        forwards(d, "tcp", f"127.0.0.1:{port}", "four", payload="four")
    finally:
        d.lxc("config", "device", "remove", box, "kp", check=False)
    assert forwarder_pids(key) == []


def test_device_at_start_and_stop_kills(net_daemon):
    """A proxy in the config when the container starts (the start path), gone when it stops."""
    d = net_daemon
    c = run_prefix() + "-st"
    port = _port()
    d.lxc("init", "busybox", c)
    try:
        _start_and_stop(d, c, port)
    finally:
        d.lxc("delete", "-f", c, check=False)


def _start_and_stop(d, c: str, port: int) -> None:
    d.lxc("config", "device", "add", c, "p", "proxy", f"listen=tcp:127.0.0.1:{port}",
          f"connect=tcp:127.0.0.1:{ECHO_PORT}")
    # one that can't listen when the container starts (its directory isn't there yet): the start
    # goes on and the forwarder is retried until it can
    d.lxc("config", "device", "add", c, "late", "proxy", "listen=unix:/run/pxlate/s.sock",
          "connect=tcp:127.0.0.1:1", "bind=instance")
    key = f"default_{c}.p"
    assert forwarder_pids(key) == []
    d.lxc("start", c)
    assert len(forwarder_pids(key)) == 1
    assert forwarder_pids(f"default_{c}.late") == []
    d.lxc("exec", c, "--", "mkdir", "-p", "/run/pxlate")
    wait_for(lambda: len(forwarder_pids(f"default_{c}.late")) == 1, timeout=20)
    wait_for(lambda: d.lxc("exec", c, "--", "test", "-S", "/run/pxlate/s.sock", check=False).returncode == 0)
    serve = f"ip link set lo up; nc -ll -p {ECHO_PORT} -e /bin/cat </dev/null >/dev/null 2>&1 &"
    d.lxc("exec", c, "--", "sh", "-c", serve)
    forwards(d, "tcp", f"127.0.0.1:{port}", "started", payload="started")
    d.lxc("stop", c, "-f")
    wait_for(lambda: forwarder_pids(key) == [], timeout=10)
    assert not (d.lxd_dir / "devices" / c / "proxy.p").exists()


@pytest.mark.parametrize("args, err", [
    (["listen=tcp:127.0.0.1:1234", "connect=tcp:localhost:4321"], "Not an IP address"),
    (["listen=tcp:0.0.0.0:1234", "connect=tcp:10.0.0.2:4321", "nat=true"], "wildcard"),
    (["listen=tcp:127.0.0.1:1234", "connect=tcp:[::1]:4321", "nat=true"], "Cannot mix IP versions"),
    (["listen=tcp:127.0.0.1:1234", "connect=tcp:127.0.0.1:1-2"], "Mismatch between listen port(s)"),
    (["listen=tcp:127.0.0.1:1234", "connect=tcp:127.0.0.1:1", "uid=5"], "non-abstract unix sockets"),
    (["listen=udp:127.0.0.1:1234", "connect=tcp:127.0.0.1:1"], "udp to non-udp"),
    (["listen=tcp:127.0.0.1:1234", "connect=udp:127.0.0.1:1", "proxy_protocol=true"], "PROXY header"),
    (["listen=tcp:127.0.0.1:1234", "connect=tcp:127.0.0.1:1", "bind=instance", "nat=true"], "host-bound"),
    (["listen=sctp:127.0.0.1:1234", "connect=tcp:127.0.0.1:1"], "Unknown protocol type"),
    (["listen=tcp:127.0.0.1:99999", "connect=tcp:127.0.0.1:1"], "Invalid port range"),
    (["connect=tcp:127.0.0.1:1"], "listen"),
])
def test_validation(net_daemon, box, args, err):
    r = net_daemon.lxc("config", "device", "add", box, "bad", "proxy", *args, check=False)
    assert r.returncode != 0 and err in r.stderr, r.stderr


def test_forwarder_is_stdlib_only():
    """The forwarder runs as `python -I -S forwarder.py`: it must not import the daemon."""
    text = Path(FORWARDER).read_text()
    assert "lxd_daemon" not in text.split('"""', 2)[2]


def test_nat_mode(net_daemon):
    """nat=true: DNAT rules toward the container's static address on a managed bridge; the
    daemon's own namespace reaches the container through the bridge address."""
    d = net_daemon
    pre = run_prefix()
    br, c = pre + "br", pre + "-nat"
    sub = f"10.{int(pre[1:3], 16)}.{int(pre[3:5], 16)}"
    port = _port()
    d.lxc("network", "create", br, f"ipv4.address={sub}.1/24", "ipv4.nat=false", "ipv6.address=none")
    try:
        d.lxc("init", "busybox", c)
        d.lxc("config", "device", "add", c, "eth0", "nic", f"network={br}", "name=eth0",
              f"ipv4.address={sub}.10")
        # no static address on a nic: a clear error
        r = d.lxc("config", "device", "add", c, "bad", "proxy", f"listen=tcp:{sub}.1:{port}",
                  f"connect=tcp:{sub}.99:{ECHO_PORT}", "nat=true", check=False)
        assert r.returncode == 0  # stored: checked when it starts
        r = d.lxc("start", c, check=False)
        assert r.returncode != 0 and "must be one of the instance's static IPv4 addresses" in r.stderr, r.stderr
        d.lxc("config", "device", "remove", c, "bad")
        d.lxc("config", "device", "add", c, "web", "proxy", f"listen=tcp:{sub}.1:{port}",
              f"connect=tcp:0.0.0.0:{ECHO_PORT}", "nat=true")
        d.lxc("start", c)
        d.lxc("exec", c, "--", "sh", "-c",
              f"ip link set lo up; ip link set eth0 up; ip addr add {sub}.10/24 dev eth0 2>/dev/null; "
              f"nc -ll -p {ECHO_PORT} -e /bin/cat </dev/null >/dev/null 2>&1 &")
        assert forwarder_pids(f"default_{c}.web") == []  # no userspace forwarder in nat mode
        ruleset = d.netns.run("nft", "list", "ruleset").stdout
        assert f"{sub}.10" in ruleset and str(port) in ruleset
        forwards(d, "tcp", f"{sub}.1:{port}", "natted", payload="natted")
        # a daemon restart keeps the rules of running containers and drops those of proxies
        # that are gone (one planted here while the daemon is down)
        d.stop()
        plant = ("from lxd_daemon.networks.firewall import Firewall; Firewall('lxd').proxy_dnat_apply("
                 f"'default_gone.p', family='ipv4', proto='tcp', listen_addr='{sub}.1', listen_ports=[{port + 1}], "
                 f"connect_addr='{sub}.10', connect_port={ECHO_PORT})")
        d.netns.run(sys.executable, "-c", plant)
        assert str(port + 1) in d.netns.run("nft", "list", "ruleset").stdout
        d.start()
        wait_for(lambda: str(port + 1) not in d.netns.run("nft", "list", "ruleset").stdout, timeout=10)
        forwards(d, "tcp", f"{sub}.1:{port}", "still", payload="still")
        # hot-unplug drops the rules
        d.lxc("config", "device", "remove", c, "web")
        ruleset = d.netns.run("nft", "list", "ruleset").stdout
        assert str(port) not in ruleset
        # several listen ports, each to the connect port at its position (hot-plugged)
        p2 = _port()
        d.lxc("config", "device", "add", c, "map", "proxy", f"listen=tcp:{sub}.1:{p2}-{p2 + 1}",
              f"connect=tcp:0.0.0.0:{ECHO_PORT}-{ECHO_PORT + 1}", "nat=true")
        forwards(d, "tcp", f"{sub}.1:{p2}", "mapped", payload="mapped")
        ruleset = d.netns.run("nft", "list", "ruleset").stdout
        assert str(p2 + 1) in ruleset and str(ECHO_PORT + 1) in ruleset
        d.lxc("config", "device", "remove", c, "map")
    finally:
        d.lxc("delete", "-f", c, check=False)
        d.lxc("network", "delete", br, check=False)
