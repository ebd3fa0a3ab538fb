"""wire.py: a migration websocket as a Channel, over a real websocket pair on 127.0.0.1 (uvicorn
accepts, `dial` connects): LXD's framing (binary frames, the empty-text barrier, one protobuf per
frame, the index header JSON then a barrier), TLS with the peer pinned and our certificate
presented, refusals, and a closed or silent peer failing with MigrationError."""

from __future__ import annotations

import asyncio
import ssl
import time
from pathlib import Path

import pytest

from lxd_daemon.migration import migrate_pb2 as pb
from lxd_daemon.migration import rsync
from lxd_daemon.migration.wire import MigrationError, websocket_url
from lxd_daemon.trust.certs import ensure_server_cert
from tests.wspair import pair, ws_server


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(server keypair dir, our client keypair dir, an unrelated keypair dir)."""
    dirs = []
    for tag in ("srv", "cli", "other"):
        d = tmp_path_factory.mktemp(tag)
        ensure_server_cert(d)
        dirs.append(d)
    return tuple(dirs)


def test_websocket_url():
    assert websocket_url("https://10.0.0.1:8443/1.0/operations/abc", "S") == \
        "wss://10.0.0.1:8443/1.0/operations/abc/websocket?secret=S"
    assert websocket_url("https://[::1]:8443/1.0/operations/abc?project=p1", "S") == \
        "wss://[::1]:8443/1.0/operations/abc/websocket?project=p1&secret=S"
    assert websocket_url("http://h:1/1.0/operations/x/websocket?secret=old", "new") == \
        "ws://h:1/1.0/operations/x/websocket?secret=new"
    with pytest.raises(MigrationError):
        websocket_url("ftp://h/1.0/operations/x", "S")


def test_frames_both_ways_over_tls(certs):
    srv, cli, _ = certs

    async def main():
        async with ws_server(keypair=srv) as server:
            dialed, acc = await pair(server, certificate=(srv / "server.crt").read_text(),
                                     cert=cli / "server.crt", key=cli / "server.key")
            # we presented our (server) certificate as the client certificate
            assert server.peers == [ssl.PEM_cert_to_DER_cert((cli / "server.crt").read_text())]
            for a, b in ((dialed, acc), (acc, dialed)):
                # a stream: binary frames then the barrier; the next stream continues after it
                await a.send(b"one")
                await a.send(b"x" * 300_000)
                await a.send(b"")  # nothing goes out
                await a.send_barrier()
                await a.send(b"next")
                await a.send_barrier()
                assert await b.recv(5) == b"one"
                assert await b.recv(5) == b"x" * 300_000
                assert await b.recv(5) is None and not b.closed
                assert await b.recv_stream(5) == b"next"
                # control: one protobuf per binary frame
                hdr = pb.MigrationHeader(fs=pb.RSYNC, snapshotNames=["s0", "s1"], indexHeaderVersion=1,
                                         rsyncFeatures=rsync.Features(compress=False).to_pb())
                await a.send_control(hdr)
                await a.send_control(pb.MigrationControl(success=False, message="no"))
                got = await b.recv_control(pb.MigrationHeader, timeout=5)
                assert got == hdr
                assert rsync.Features.from_pb(got.rsyncFeatures) == rsync.Features(compress=False)
                ctl = await b.recv_control(pb.MigrationControl, timeout=5)
                assert (ctl.success, ctl.message) == (False, "no")
                # the index header: JSON in binary frame(s), then a barrier; the answer likewise
                await a.send_json({"config": {"container": {"name": "c1"}}})
                assert await b.recv_json(5) == {"config": {"container": {"name": "c1"}}}
                await b.send_json({"StatusCode": 200, "Error": "", "Refresh": False})
                assert await a.recv_json(5) == {"StatusCode": 200, "Error": "", "Refresh": False}
            assert dialed.bytes_sent == acc.bytes_received > 300_000
            await dialed.close()
            assert await acc.recv(5) is None and acc.closed
            await asyncio.wait_for(acc.wait_closed(), 5)
            with pytest.raises(MigrationError, match="closed"):
                await acc.send(b"late")
            await acc.close()

    asyncio.run(main())


def test_index_header_is_binary_then_empty_text(certs):
    """What LXD 5.0.2 expects (WebsocketIO.Write then Close): seen from a plain websockets client."""
    from websockets.asyncio.client import connect

    async def main():
        async with ws_server() as server:
            url = websocket_url(server.url, server.secret)
            async with connect(url) as raw:
                acc = await asyncio.wait_for(server.accepted.get(), 10)
                await acc.send_json({"config": None})
                assert await raw.recv() == b'{"config":null}'
                assert await raw.recv() == ""
                await raw.send(b'{"StatusCode":200,')
                await raw.send(b'"Error":"","Refresh":true}')
                await raw.send("")
                assert await acc.recv_json(5) == {"StatusCode": 200, "Error": "", "Refresh": True}
                await raw.send("not empty")
                with pytest.raises(MigrationError, match="Unexpected text"):
                    await acc.recv(5)
                await acc.close()

    asyncio.run(main())


def test_dial_refusals(certs):
    srv, cli, other = certs

    async def main():
        async with ws_server(keypair=srv) as server:
            from lxd_daemon.migration.wire import dial

            with pytest.raises(MigrationError, match="not authorized"):
                await dial(server.url, "wrong", (srv / "server.crt").read_text(),
                           cert=cli / "server.crt", key=cli / "server.key")
            with pytest.raises(MigrationError, match="not the expected one"):
                await dial(server.url, server.secret, (other / "server.crt").read_text(),
                           cert=cli / "server.crt", key=cli / "server.key")
            with pytest.raises(MigrationError, match="not a PEM"):
                await dial(server.url, server.secret, "garbage", cert=cli / "server.crt", key=cli / "server.key")
            port = server.port
        t0 = time.monotonic()
        with pytest.raises(MigrationError, match="Failed connecting.*(refused|Connect call failed)"):
            await dial(f"https://127.0.0.1:{port}/1.0/operations/op1", "s", (srv / "server.crt").read_text())
        assert time.monotonic() - t0 < 5
        assert server.accepted.empty()

    asyncio.run(main())


def test_closed_or_silent_peer_fails(certs):
    async def main():
        async with ws_server() as server:
            dialed, acc = await pair(server)
            t0 = time.monotonic()
            with pytest.raises(MigrationError, match="Timed out waiting for a MigrationHeader"):
                await dialed.recv_control(pb.MigrationHeader, timeout=0.5)
            with pytest.raises(MigrationError, match="Timed out"):
                await acc.recv_json(timeout=0.5)
            assert time.monotonic() - t0 < 3
            with pytest.raises(TimeoutError):
                await dialed.recv(0.2)
            await acc.send_barrier()
            with pytest.raises(MigrationError, match="Only binary"):
                await dialed.recv_control(pb.MigrationControl, timeout=5)
            await acc.close()
            with pytest.raises(MigrationError, match="closed before a MigrationControl"):
                await dialed.recv_control(pb.MigrationControl, timeout=5)
            assert dialed.closed
            with pytest.raises(MigrationError):
                await dialed.send_control(pb.MigrationControl(success=True))
            await dialed.close()

            # the peer goes away in the middle of a stream: the reader learns it at once
            dialed, acc = await pair(server)
            await acc.send(b"partial")
            await acc.close()
            with pytest.raises(MigrationError, match="closed unexpectedly"):
                await dialed.recv_stream(5)
            await dialed.close()

    asyncio.run(main())


def test_features_negotiation():
    # a peer without `bidirectional` is LXD 3.7 level: xattrs, delete and compress
    legacy = rsync.Features.from_pb(pb.rsyncFeatures(xattrs=False))
    assert legacy == rsync.Features(bidirectional=False)
    assert rsync.Features.from_pb(None) == rsync.Features(bidirectional=False)
    mine = rsync.Features(compress=False)
    theirs = rsync.Features.from_pb(pb.rsyncFeatures(xattrs=True, delete=False, compress=True, bidirectional=True))
    assert mine.common(theirs) == rsync.Features(xattrs=True, delete=False, compress=False)
    assert rsync.Features().args() == ["--xattrs", "--filter=-x security.selinux", "--delete",
                                       "--compress", "--compress-level=2"]
    assert rsync.Features(xattrs=False, delete=False, compress=False).args() == []
    msg = rsync.Features(delete=False).to_pb()
    assert (msg.xattrs, msg.delete, msg.compress, msg.bidirectional) == (True, False, True, True)
    assert rsync.progress_text("c1", 12_345_678, 4_500_000) == "c1: 12.35MB (4.50MB/s)"


def test_lxd_netcat_ties_stdio_to_a_unix_socket():
    """`lxd netcat @SOCKET NAME <what rsync appends>`: stdin to the socket (half-closed at its
    end), the socket to stdout; the socket's end ends the command."""
    import socket
    import subprocess
    import sys
    import uuid

    from tests.helpers import REPO

    name = "lxd-test/" + uuid.uuid4().hex
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind("\0" + name)
    listener.listen(1)
    listener.settimeout(20)
    proc = subprocess.Popen([sys.executable, "-m", "lxd_daemon", "netcat", "--", "@" + name, "c1",
                             "localhost", "rsync", "--server", "-vlogDtpre.iLsfx", ".", "/tmp/foo"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=str(REPO))
    try:
        conn, _ = listener.accept()
        conn.settimeout(20)
        proc.stdin.write(b"from rsync" * 10000)
        proc.stdin.close()
        got = b""
        while chunk := conn.recv(65536):  # ends: netcat half-closed after stdin's end
            got += chunk
        assert got == b"from rsync" * 10000
        conn.sendall(b"to rsync")
        conn.shutdown(socket.SHUT_WR)
        assert proc.stdout.read() == b"to rsync"
        assert proc.wait(20) == 0
        conn.close()
    finally:
        listener.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    r = subprocess.run([sys.executable, "-m", "lxd_daemon", "netcat", "@lxd-test/nobody-listens"],
                       capture_output=True, text=True, cwd=str(REPO), timeout=20)
    assert r.returncode == 1 and "could not connect" in r.stderr
