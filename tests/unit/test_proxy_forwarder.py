"""The proxy forwarder's pure parts (lxd_daemon/networks/forwarder.py): LXD's address grammar,
port mapping, the PROXY header, listening sockets; and the device's forwarder command line."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from lxd_daemon.devices import DeviceContext, load
from lxd_daemon.instances.idmap import IdmapEntry, IdmapSet
from lxd_daemon.networks import forwarder as fwd


@pytest.mark.parametrize("text, kind, host, ports, path", [
    ("tcp:0.0.0.0:80-81,90", "tcp", "0.0.0.0", (80, 81, 90), ""),
    ("udp:[::1]:53", "udp", "::1", (53,), ""),
    ("tcp::8080", "tcp", "0.0.0.0", (8080,), ""),
    ("unix:/run/x.sock", "unix", "", (), "/run/x.sock"),
    ("unix:@abstract", "unix", "", (), "@abstract"),
])
def test_parse_address(text, kind, host, ports, path):
    a = fwd.parse_address(text)
    assert (a.kind, a.host, a.ports, a.path) == (kind, host, ports, path)


def test_parse_address_connect_default_host_and_endpoints():
    assert fwd.parse_address("tcp::80", listen=False).host == "127.0.0.1"
    assert fwd.parse_address("unix:@n").endpoints() == ["\0n"]
    assert fwd.parse_address("tcp:[fd00::1]:1-2").endpoints() == [("fd00::1", 1), ("fd00::1", 2)]


@pytest.mark.parametrize("text, err", [
    ("", "Address is required"), ("sctp:1.2.3.4:1", "Unknown protocol type"),
    ("tcp:localhost:80", "Not an IP address"), ("tcp:1.2.3.4", "missing port"),
    ("tcp:1.2.3.4:0", "Invalid port range"), ("tcp:1.2.3.4:5-3", "Invalid port range"),
    ("tcp:1.2.3.4:70000", "Invalid port range"), ("tcp:::1:80", "too many colons"),
    ("unix:rel.sock", "must be absolute"),
])
def test_parse_address_errors(text, err):
    with pytest.raises(ValueError, match=err):
        fwd.parse_address(text)


def test_connect_index():
    listen = fwd.parse_address("tcp:1.2.3.4:1-3")
    assert [fwd.connect_index(listen, fwd.parse_address("tcp:1.1.1.1:9"), i) for i in range(3)] == [0, 0, 0]
    assert [fwd.connect_index(listen, fwd.parse_address("tcp:1.1.1.1:7-9"), i) for i in range(3)] == [0, 1, 2]


def test_proxy_header_and_listeners(tmp_path):
    socks = fwd.listen_sockets(fwd.Address("tcp", "127.0.0.1", (0,)))  # an ephemeral port
    try:
        port = socks[0].getsockname()[1]
        c = socket.create_connection(("127.0.0.1", port))
        socks[0].setblocking(True)
        conn, peer = socks[0].accept()
        head = fwd.proxy_header(fwd.parse_address("tcp:127.0.0.1:1"), conn, peer)
        assert head == f"PROXY TCP4 127.0.0.1 127.0.0.1 {c.getsockname()[1]} {port}\r\n".encode()
        assert fwd.proxy_header(fwd.parse_address("unix:/x"), conn, peer) == b"PROXY UNKNOWN\r\n"
        c.close()
        conn.close()
        # in use: ListenError naming the endpoint, nothing left open
        with pytest.raises(fwd.ListenError, match=f"Failed to listen on 127.0.0.1:{port}: .*in use"):
            fwd.listen_sockets(fwd.parse_address(f"tcp:127.0.0.1:{port}"))
    finally:
        for s in socks:
            s.close()
    # a unix socket: stale sockets replaced, mode applied, other files refused
    path = tmp_path / "s.sock"
    for _ in range(2):
        [u] = fwd.listen_sockets(fwd.parse_address(f"unix:{path}"), mode=0o600)
        assert path.is_socket() and path.stat().st_mode & 0o777 == 0o600
        u.close()
    (tmp_path / "f").write_text("x")
    with pytest.raises(fwd.ListenError, match="isn't a socket"):
        fwd.listen_sockets(fwd.parse_address(f"unix:{tmp_path / 'f'}"))


def test_forwarder_argv_maps_ids_through_the_container(tmp_path):
    idmap = IdmapSet((IdmapEntry(True, True, 1000000, 0, 65536),))
    ctx = DeviceContext(instance="c1", idmap=idmap, privileged=False, devices_dir=tmp_path)
    dev = load("p", {"type": "proxy", "listen": "unix:/run/a.sock", "connect": "tcp:127.0.0.1:80",
                     "bind": "instance", "uid": "5", "gid": "6", "mode": "0660",
                     "security.uid": "7", "security.gid": "8"})
    spec = dev.spec(ctx, 42)
    # listening inside the container: its ids mapped; connecting on the host: given as they are
    assert (spec["listen_uid"], spec["listen_gid"], spec["listen_mode"]) == (1000005, 1000006, 0o660)
    assert (spec["security_uid"], spec["security_gid"], spec["pid"]) == (7, 8, 42)
    argv = dev.argv(ctx, 42)
    assert argv[1:4] == ["-I", "-S", str(Path(fwd.__file__).resolve())] and argv[4:6] == ["--name", "default_c1.p"]
    host = load("q", {"type": "proxy", "listen": "tcp:1.2.3.4:1", "connect": "unix:/x", "security.uid": "7"})
    assert host.spec(ctx, 1)["security_uid"] == 1000007 and host.spec(ctx, 1)["security_gid"] == 1000000
