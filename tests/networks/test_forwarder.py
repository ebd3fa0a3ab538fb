"""lxd_daemon/networks/forwarder.py run as the daemon runs it (`python -I -S forwarder.py`), without
a container: two namespaces the test makes, "host" (where the forwarder starts) and "inst" (a
`sleep` stands in for the container's init). Covers what the container tests don't: a stream
forwarded to a UDP target, bind=instance TCP, an abstract unix listener, the exit when "init"
exits, and the unix socket removed on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from lxd_daemon.networks import forwarder as fwd
from tests.helpers import run_prefix, wait_for
from tests.netns import NetNS

pytestmark = pytest.mark.integration

UDP_ECHO = textwrap.dedent("""
    import socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", int(sys.argv[1])))
    print("ready", flush=True)
    while True:
        d, p = s.recvfrom(65536); s.sendto(b"udp:" + d, p)
""")

TCP_ECHO = textwrap.dedent("""
    import socket, sys
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(8); print("ready", flush=True)
    while True:
        c, _ = s.accept(); c.sendall(b"tcp:" + c.recv(100)); c.close()
""")

# send once, print one answer (no half-close: a UDP target answers after the request)
ASK = textwrap.dedent("""
    import socket, sys
    kind, addr, msg = sys.argv[1:4]
    if kind == "unix":
        s = socket.socket(socket.AF_UNIX); a = "\\0" + addr[1:] if addr.startswith("@") else addr
    else:
        s = socket.socket(); host, port = addr.rsplit(":", 1); a = (host, int(port))
    s.settimeout(5); s.connect(a); s.sendall(msg.encode()); print(s.recv(100).decode())
""")


@pytest.fixture
def nets():
    pre = run_prefix()
    host, inst = NetNS(pre + "h").create(), NetNS(pre + "i").create()
    procs: list[subprocess.Popen] = []

    def spawn(ns: NetNS, *cmd: str, ready: bool = True) -> subprocess.Popen:
        p = subprocess.Popen([*ns.prefix(), *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(p)
        if ready:
            assert p.stdout.readline().strip() == "ready"
        return p

    init = spawn(inst, "sleep", "300", ready=False)
    try:
        yield host, inst, init, spawn
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        host.destroy()
        inst.destroy()


def forwarder(spawn, host: NetNS, init: subprocess.Popen, **spec) -> subprocess.Popen:
    spec.setdefault("pid", init.pid)
    p = spawn(host, sys.executable, "-I", "-S", fwd.__file__, "--name", "t_c.p", json.dumps(spec), ready=False)
    line = p.stderr.readline()
    assert "Status: Started" in line, line + p.stderr.read()
    return p


def ask(ns: NetNS, kind: str, addr: str, msg: str) -> str:
    return ns.run(sys.executable, "-c", ASK, kind, addr, msg).stdout.strip()


def test_stream_to_udp_and_exit_with_init(nets):
    host, inst, init, spawn = nets
    spawn(inst, sys.executable, "-c", UDP_ECHO, "5300")
    p = forwarder(spawn, host, init, listen="tcp:127.0.0.1:5301", connect="udp:127.0.0.1:5300", bind="host")
    assert ask(host, "tcp", "127.0.0.1:5301", "q") == "udp:q"
    os.kill(init.pid, signal.SIGKILL)  # the "container" stops: the forwarder goes with it
    init.wait()
    assert p.wait(timeout=10) == 0


def test_bind_instance_tcp(nets):
    host, inst, init, spawn = nets
    spawn(host, sys.executable, "-c", TCP_ECHO, "5400")
    p = forwarder(spawn, host, init, listen="tcp:127.0.0.1:5401", connect="tcp:127.0.0.1:5400", bind="instance")
    assert ask(inst, "tcp", "127.0.0.1:5401", "in") == "tcp:in"
    # the listener lives in the instance's namespace only
    r = host.run(sys.executable, "-c", ASK, "tcp", "127.0.0.1:5401", "x", check=False)
    assert r.returncode != 0 and "refused" in r.stderr.lower()
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=10) == 0


def test_unix_listeners(nets, tmp_path):
    host, inst, init, spawn = nets
    spawn(inst, sys.executable, "-c", TCP_ECHO, "5500")
    # abstract: bound in the listening side's network namespace
    forwarder(spawn, host, init, listen="unix:@" + run_prefix(), connect="tcp:127.0.0.1:5500")
    # a path: mode applied, removed on SIGTERM
    path = tmp_path / "f.sock"
    p = forwarder(spawn, host, init, listen=f"unix:{path}", connect="tcp:127.0.0.1:5500", listen_mode=0o600)
    assert path.is_socket() and path.stat().st_mode & 0o777 == 0o600
    assert ask(host, "unix", str(path), "u") == "tcp:u"
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=10) == 0
    wait_for(lambda: not path.exists(), timeout=5)


def test_setup_errors_are_reported(nets):
    host, inst, init, spawn = nets
    spawn(host, sys.executable, "-c", TCP_ECHO, "5600")  # holds the port
    p = spawn(host, sys.executable, "-I", "-S", fwd.__file__, "--name", "t_c.p",
              json.dumps({"listen": "tcp:127.0.0.1:5600", "connect": "tcp:127.0.0.1:1", "pid": init.pid}),
              ready=False)
    assert p.wait(timeout=10) == 1
    assert "Failed to listen on 127.0.0.1:5600" in p.stderr.read()
    start = time.monotonic()
    p = spawn(host, sys.executable, "-I", "-S", fwd.__file__, "--name", "t_c.p",
              json.dumps({"listen": "tcp:127.0.0.1:5601", "connect": "tcp:127.0.0.1:1", "pid": 999999999}),
              ready=False)
    assert p.wait(timeout=10) == 1 and time.monotonic() - start < 10
